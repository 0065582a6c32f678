//! The `files` scenario: how fast a file travels, end-to-end encrypted, from one `miyu`
//! process to another through a `miyu-server` process, and how much memory each side needs.
//!
//! Everything runs as the release binaries found next to `miyu-bench`, on 127.0.0.1, in a
//! temporary folder that is deleted afterwards: the server, and one `miyu` command per step
//! for two accounts, alice and bob, that have connected through an invite as people do. The
//! file holds random (incompressible) bytes and is written and flushed to disk before anything
//! is timed.
//!
//! A timed command is a whole process: start-up, unlocking the profile (with a passphrase
//! unless `--no-passphrase`), connecting, the transfer, exiting. The fixed part is measured on
//! its own with a command that does nothing else (`miyu contacts`), so that it can be told
//! apart from the transfer.
//!
//! Peak memory is the high-water mark of resident memory (`VmHWM`): sampled every few
//! milliseconds while a client runs (it only grows, so a late sample holds every earlier
//! peak), and read from the server just before it is stopped. CPU time of a client comes from
//! the kernel's accounting when it is reaped; the server's from `/proc` around each command.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::machine::{
    machine_busy_seconds, peak_resident_kib, process_cpu_seconds, waited_children_cpu_seconds,
};

/// What one run does.
#[derive(Debug, Clone)]
pub(crate) struct FilesPlan {
    pub(crate) size_bytes: u64,
    /// Whether the profiles are protected by a passphrase (Argon2id on every command) or
    /// keep their key in a file.
    pub(crate) passphrase: bool,
}

/// What one run measured.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct FilesOutcome {
    pub(crate) size_bytes: u64,
    pub(crate) passphrase: bool,
    /// `miyu contacts`, the median of a few runs: what every command costs before it does
    /// anything (process start, unlocking and opening the profile).
    pub(crate) start_up: Step,
    /// `miyu send-file`: read, encrypt and upload, then send the message that carries the key.
    pub(crate) upload: Step,
    /// `miyu sync` on the receiving side, which receives that message.
    pub(crate) receive_message: Step,
    /// `miyu download`: download, decrypt, write, flush and check the hash.
    pub(crate) download: Step,
    /// Megabytes (10^6 bytes) per second, each over its whole command.
    pub(crate) upload_mb_per_second: f64,
    pub(crate) download_mb_per_second: f64,
    /// Over upload and download together.
    pub(crate) end_to_end_mb_per_second: f64,
    /// With the median start-up time taken off each command: the transfer alone, estimated.
    pub(crate) upload_without_start_up_mb_per_second: f64,
    pub(crate) download_without_start_up_mb_per_second: f64,
    /// The server's high-water mark of resident memory over the whole run.
    pub(crate) server_peak_rss_kib: Option<u64>,
    /// Starting the server and connecting the two accounts.
    pub(crate) setup_seconds: f64,
    /// SHA-256 of the file, which the downloaded copy matched.
    pub(crate) sha256: String,
}

/// One `miyu` command.
#[derive(Debug, Clone, Copy, Serialize)]
pub(crate) struct Step {
    pub(crate) seconds: f64,
    /// The client's high-water mark of resident memory.
    pub(crate) peak_rss_kib: Option<u64>,
    /// User + system CPU of the client process.
    pub(crate) cpu_seconds: Option<f64>,
    /// User + system CPU of the server while the command ran.
    pub(crate) server_cpu_seconds: Option<f64>,
    /// Busy CPU of every other process meanwhile: well above zero means the measurement was
    /// disturbed.
    pub(crate) other_cpu_seconds: Option<f64>,
}

/// Runs of `miyu contacts` whose median is the start-up cost.
const START_UP_RUNS: usize = 3;
/// How often a running client's memory high-water mark is read.
const MEMORY_SAMPLE_INTERVAL: Duration = Duration::from_millis(5);
/// The passphrase of the benchmark's profiles.
const PASSPHRASE: &str = "miyu-bench file transfer passphrase";
/// Bytes generated and written at a time.
const WRITE_PIECE: usize = 1 << 20;

/// Runs one transfer of `plan.size_bytes` with the binaries in `binaries`, in a fresh
/// temporary folder under `parent`.
pub(crate) fn run(plan: &FilesPlan, binaries: &Path, parent: &Path) -> Result<FilesOutcome> {
    let folder = tempfile::Builder::new()
        .prefix("miyu-bench-files-")
        .tempdir_in(parent)
        .with_context(|| format!("creating a temporary folder in {}", parent.display()))?;
    let original = folder
        .path()
        .join(format!("miyu-bench-{}.bin", plan.size_bytes));
    let sha256 = write_random_file(&original, plan.size_bytes)?;

    let setup_started = Instant::now();
    let server = ServerProcess::start(&binaries.join("miyu-server"), folder.path())?;
    let mut clients = Clients {
        binary: binaries.join("miyu"),
        folder: folder.path().to_path_buf(),
        passphrase: plan.passphrase,
        server_pid: server.pid(),
        commands_run: 0,
    };
    connect(&mut clients, &server.address)?;
    let setup_seconds = setup_started.elapsed().as_secs_f64();

    let mut start_ups = Vec::with_capacity(START_UP_RUNS);
    for _ in 0..START_UP_RUNS {
        start_ups.push(clients.run("alice", &["contacts"])?.step);
    }
    let start_up = median_step(start_ups);

    let upload = clients.run(
        "alice",
        &[
            OsStr::new("--json"),
            OsStr::new("send-file"),
            OsStr::new("bob"),
            original.as_os_str(),
        ],
    )?;
    let sent: serde_json::Value =
        serde_json::from_str(&upload.stdout).context("reading what send-file printed")?;
    ensure!(
        sent["sha256"].as_str() == Some(sha256.as_str()) && sent["size"] == plan.size_bytes,
        "send-file reports another file than the one written: {sent}"
    );

    let receive_message = clients.run("bob", &["sync"])?;
    let listed = clients.run("bob", &["--json", "files", "alice"])?;
    let file_id = file_id_in(&listed.stdout, &original, plan.size_bytes)?;

    let received = folder.path().join("received.bin");
    let download = clients.run(
        "bob",
        &[
            OsStr::new("--json"),
            OsStr::new("download"),
            OsStr::new("alice"),
            OsStr::new(&file_id.to_string()),
            OsStr::new("--out"),
            received.as_os_str(),
        ],
    )?;
    let received_sha256 = sha256_of(&received)?;
    ensure!(
        received_sha256 == sha256,
        "the downloaded file differs from the original: SHA-256 {received_sha256}, expected {sha256}"
    );
    let server_peak_rss_kib = server.stop()?;
    folder
        .close()
        .context("deleting the temporary folder and its files")?;

    let megabytes = plan.size_bytes as f64 / 1e6;
    let rate = |seconds: f64| {
        if seconds > 0.0 {
            megabytes / seconds
        } else {
            0.0
        }
    };
    let (upload, download) = (upload.step, download.step);
    Ok(FilesOutcome {
        size_bytes: plan.size_bytes,
        passphrase: plan.passphrase,
        start_up,
        upload,
        receive_message: receive_message.step,
        download,
        upload_mb_per_second: rate(upload.seconds),
        download_mb_per_second: rate(download.seconds),
        end_to_end_mb_per_second: rate(upload.seconds + download.seconds),
        upload_without_start_up_mb_per_second: rate(upload.seconds - start_up.seconds),
        download_without_start_up_mb_per_second: rate(download.seconds - start_up.seconds),
        server_peak_rss_kib,
        setup_seconds,
        sha256,
    })
}

/// Reads a size such as `4G`, `200M`, `512K` or `1000`: bytes, or binary units (`G` is
/// 2^30 bytes); `GiB`, `MB` and lower case are taken the same way.
pub(crate) fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let digits_end = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(digits_end);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a size such as 1G, 200M or 4096"))?;
    let shift = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        _ => return Err(format!("unknown unit {unit:?}: use K, M or G")),
    };
    number
        .checked_mul(1 << shift)
        .ok_or_else(|| format!("{text} is too large"))
}

/// The median by time; the peak memory is the largest of all.
fn median_step(mut steps: Vec<Step>) -> Step {
    steps.sort_by(|a, b| a.seconds.total_cmp(&b.seconds));
    let peak = steps.iter().filter_map(|step| step.peak_rss_kib).max();
    Step {
        peak_rss_kib: peak,
        ..steps[steps.len() / 2]
    }
}

/// Writes `size` pseudo-random bytes (xorshift64*, which no compressor shrinks) to `path`,
/// flushes them to disk so that no write-back runs during the measurement, and returns their
/// SHA-256 in hex.
fn write_random_file(path: &Path, size: u64) -> Result<String> {
    let mut file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut state: u64 = rand::random::<u64>() | 1;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; WRITE_PIECE];
    let mut left = size;
    while left > 0 {
        for word in buffer.chunks_exact_mut(8) {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            word.copy_from_slice(&state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
        }
        let piece = &buffer[..left.min(WRITE_PIECE as u64) as usize];
        file.write_all(piece)
            .with_context(|| format!("writing {}", path.display()))?;
        hasher.update(piece);
        left -= piece.len() as u64;
    }
    file.sync_all()
        .with_context(|| format!("flushing {}", path.display()))?;
    Ok(hex(&hasher.finalize()))
}

fn sha256_of(path: &Path) -> Result<String> {
    let mut file = File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; WRITE_PIECE];
    loop {
        let read = file
            .read(&mut buffer)
            .with_context(|| format!("reading {}", path.display()))?;
        if read == 0 {
            return Ok(hex(&hasher.finalize()));
        }
        hasher.update(&buffer[..read]);
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// The id `miyu --json files` gives the file alice sent.
fn file_id_in(listing: &str, original: &Path, size: u64) -> Result<i64> {
    let name = original
        .file_name()
        .and_then(OsStr::to_str)
        .ok_or_else(|| anyhow!("the test file has no name"))?;
    let files: Vec<serde_json::Value> =
        serde_json::from_str(listing).context("reading what `miyu files` printed")?;
    files
        .iter()
        .find(|file| file["name"] == name && file["sender"] == "alice" && file["size"] == size)
        .and_then(|file| file["id"].as_i64())
        .ok_or_else(|| anyhow!("bob's file list does not hold the file alice sent: {listing}"))
}

/// Creates alice and bob on the server and connects them through an invite, the way
/// `miyu-cli`'s end-to-end tests do.
fn connect(clients: &mut Clients, address: &str) -> Result<()> {
    for name in ["alice", "bob"] {
        let mut arguments = vec!["init", "--server", address, "--name", name];
        if !clients.passphrase {
            arguments.push("--no-passphrase");
        }
        clients.run(name, &arguments)?;
    }
    let link = clients.run("alice", &["invite"])?.stdout;
    clients.run("bob", &["accept", link.trim(), "--name", "alice"])?;
    // Alice joins from the Welcome; then bob learns who she is.
    clients.run("alice", &["sync"])?;
    clients.run("bob", &["sync"])?;
    Ok(())
}

/// Copies the environment without any `MIYU_` setting, so that only what the benchmark sets
/// applies (no proxy, no cheaper key derivation, no other profile or configuration).
fn without_miyu_settings(command: &mut Command) -> &mut Command {
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("MIYU_") {
            command.env_remove(&name);
        }
    }
    command
}

/// A `miyu-server` process, killed if the run ends early.
struct ServerProcess {
    child: Option<Child>,
    address: String,
    log: PathBuf,
}

impl ServerProcess {
    /// Starts the server with its data in `folder/server`, logging into `folder/server.log`,
    /// and waits for its address line.
    fn start(binary: &Path, folder: &Path) -> Result<Self> {
        let data = folder.join("server");
        let log = folder.join("server.log");
        let log_file = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let mut child = without_miyu_settings(&mut Command::new(binary))
            .arg("--data")
            .arg(&data)
            .args(["--listen", "127.0.0.1:0"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log_file)
            .spawn()
            .with_context(|| {
                format!(
                    "starting {} (build it with `cargo build --release -p miyu-cli`)",
                    binary.display()
                )
            })?;
        let stdout = child.stdout.take().context("the server's output")?;
        let mut server = Self {
            child: Some(child),
            address: String::new(),
            log,
        };
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .context("reading the server's address line")?;
        server.address = match line.strip_prefix("address: ") {
            Some(address) => address.trim().to_string(),
            None => bail!(
                "the server printed no address line (got {line:?}); its log: {}",
                tail(&server.log)
            ),
        };
        Ok(server)
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Reads the server's peak memory, then stops it with SIGTERM and waits for a clean exit.
    fn stop(mut self) -> Result<Option<u64>> {
        let mut child = self.child.take().context("the server is gone")?;
        let peak = peak_resident_kib(child.id());
        let signalled = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .context("running kill")?;
        ensure!(signalled.success(), "kill -TERM failed: {signalled}");
        let exit = child.wait().context("waiting for the server")?;
        ensure!(
            exit.success(),
            "the server exited with {exit}; its log: {}",
            tail(&self.log)
        );
        Ok(peak)
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The `miyu` binary and the profiles it runs on.
struct Clients {
    binary: PathBuf,
    folder: PathBuf,
    passphrase: bool,
    server_pid: u32,
    commands_run: usize,
}

/// What a command printed, and what it cost.
struct Ran {
    stdout: String,
    step: Step,
}

impl Clients {
    /// Runs `miyu --profile FOLDER/PROFILE ARGUMENTS...` to its end, measuring it. Output goes
    /// to files, so that the pipes never hold the command up.
    fn run(&mut self, profile: &str, arguments: &[impl AsRef<OsStr>]) -> Result<Ran> {
        self.commands_run += 1;
        let what = arguments
            .iter()
            .map(|argument| argument.as_ref().to_string_lossy())
            .find(|argument| !argument.starts_with('-'))
            .unwrap_or_default()
            .into_owned();
        let stem = self
            .folder
            .join(format!("{:02}-{profile}-{what}", self.commands_run));
        let stdout_path = stem.with_extension("out");
        let stderr_path = stem.with_extension("err");
        let stdout = File::create(&stdout_path)
            .with_context(|| format!("creating {}", stdout_path.display()))?;
        let stderr = File::create(&stderr_path)
            .with_context(|| format!("creating {}", stderr_path.display()))?;
        let mut command = Command::new(&self.binary);
        without_miyu_settings(&mut command);
        if self.passphrase {
            command.env("MIYU_PASSPHRASE", PASSPHRASE);
        }
        command
            .arg("--profile")
            .arg(self.folder.join(profile))
            .args(arguments)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr);

        let children_before = waited_children_cpu_seconds();
        let server_before = process_cpu_seconds(self.server_pid);
        let machine_before = machine_busy_seconds();
        let started = Instant::now();
        let mut child = command.spawn().with_context(|| {
            format!(
                "starting {} (build it with `cargo build --release -p miyu-cli`)",
                self.binary.display()
            )
        })?;
        let (status, peak_rss_kib) =
            wait_sampling_memory(&mut child).with_context(|| format!("waiting for miyu {what}"))?;
        let seconds = started.elapsed().as_secs_f64();
        let server_after = process_cpu_seconds(self.server_pid);
        let children_after = waited_children_cpu_seconds();
        let machine_after = machine_busy_seconds();

        ensure!(
            status.success(),
            "miyu {what} (profile {profile}) failed with {status}: {}",
            tail(&stderr_path)
        );
        let stdout = std::fs::read_to_string(&stdout_path)
            .with_context(|| format!("reading {}", stdout_path.display()))?;
        let difference = |after: Option<f64>, before: Option<f64>| Some(after? - before?);
        let cpu_seconds = difference(children_after, children_before);
        let server_cpu_seconds = difference(server_after, server_before);
        let other_cpu_seconds = difference(machine_after, machine_before).map(|machine| {
            (machine - cpu_seconds.unwrap_or(0.0) - server_cpu_seconds.unwrap_or(0.0)).max(0.0)
        });
        Ok(Ran {
            stdout,
            step: Step {
                seconds,
                peak_rss_kib,
                cpu_seconds,
                server_cpu_seconds,
                other_cpu_seconds,
            },
        })
    }
}

/// Waits for `child` while another thread samples its memory high-water mark; returns how it
/// exited and the last mark read.
fn wait_sampling_memory(child: &mut Child) -> Result<(std::process::ExitStatus, Option<u64>)> {
    let pid = child.id();
    let (stop, stopped) = mpsc::channel::<()>();
    std::thread::scope(|scope| {
        let sampler = scope.spawn(move || {
            let mut peak = None;
            loop {
                if let Some(mark) = peak_resident_kib(pid) {
                    peak = Some(mark);
                }
                match stopped.recv_timeout(MEMORY_SAMPLE_INTERVAL) {
                    Err(mpsc::RecvTimeoutError::Timeout) => continue,
                    _ => return peak,
                }
            }
        });
        let status = child.wait();
        let _ = stop.send(());
        let peak = sampler
            .join()
            .map_err(|_| anyhow!("the memory sampler failed"))?;
        Ok((status.context("waiting")?, peak))
    })
}

/// The end of a log or error output, for an error message.
fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_take_binary_units() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("200M"), Ok(200 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("4g"), Ok(4 << 30));
        assert_eq!(parse_size("512KiB"), Ok(512 << 10));
        assert!(parse_size("1T").is_err());
        assert!(parse_size("G").is_err());
        assert!(parse_size("1.5G").is_err());
        assert!(parse_size("99999999999999999999G").is_err());
    }

    #[test]
    fn the_start_up_cost_is_the_median_with_the_highest_peak() {
        let step = |seconds, peak| Step {
            seconds,
            peak_rss_kib: Some(peak),
            cpu_seconds: None,
            server_cpu_seconds: None,
            other_cpu_seconds: None,
        };
        let median = median_step(vec![step(0.5, 10), step(0.3, 30), step(0.4, 20)]);
        assert_eq!((median.seconds, median.peak_rss_kib), (0.4, Some(30)));
    }

    #[test]
    fn the_received_file_is_found_by_name_sender_and_size() {
        let listing = r#"[{"id":1,"name":"other.bin","size":5,"sender":"alice"},
            {"id":2,"name":"miyu-bench-5.bin","size":5,"sender":"me"},
            {"id":3,"name":"miyu-bench-5.bin","size":5,"sender":"alice"}]"#;
        let original = Path::new("some/folder/miyu-bench-5.bin");
        assert_eq!(file_id_in(listing, original, 5).unwrap(), 3);
        assert!(file_id_in(listing, original, 6).is_err());
    }
}
