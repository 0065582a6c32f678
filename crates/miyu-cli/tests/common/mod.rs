//! Helpers for end-to-end tests: the real `miyu-server` and `miyu` binaries as processes, on
//! 127.0.0.1, in temporary folders.

#![allow(dead_code, unreachable_pub)]

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// Upper bound for waiting on an event that should come; reaching it fails the test.
pub const PATIENCE: Duration = Duration::from_secs(60);

pub struct Server {
    child: Child,
    pub data: PathBuf,
    pub log: PathBuf,
    pub address: String,
    pub listen: SocketAddr,
}

impl Server {
    /// Starts `miyu-server` with its data in `data`, logging at debug level into a file next to
    /// it, and waits for its address line.
    pub fn start(data: &Path, listen: &str, extra: &[&str]) -> Server {
        Server::start_via(&[], data, listen, extra)
    }

    /// Like [`Server::start`], with the server run by a program that then runs it, such as
    /// `ip netns exec NAMESPACE`. The wrapper must exec the server, so that its pid is the
    /// server's.
    pub fn start_via(wrapper: &[&str], data: &Path, listen: &str, extra: &[&str]) -> Server {
        let log = data.with_extension("log");
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let mut child = command_via(wrapper, env!("CARGO_BIN_EXE_miyu-server"))
            .args(["--data", data.to_str().unwrap(), "--listen", listen])
            .args(extra)
            .env("MIYU_LOG", "debug")
            .stdout(Stdio::piped())
            .stderr(log_file)
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let address = line
            .strip_prefix("address: ")
            .unwrap_or_else(|| panic!("no address line, got {line:?}"))
            .trim()
            .to_string();
        let authority = address
            .trim_start_matches("wss://")
            .split('/')
            .next()
            .unwrap();
        Server {
            child,
            data: data.to_path_buf(),
            log,
            listen: authority.parse().unwrap(),
            address,
        }
    }

    /// Kills the server without warning, as a crash or power cut would.
    pub fn kill9(mut self) -> (PathBuf, SocketAddr) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        (self.data.clone(), self.listen)
    }

    /// Stops the server with SIGTERM and waits for a clean exit.
    pub fn terminate(mut self) {
        let pid = self.child.id().to_string();
        let status = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        assert!(status.success());
        let exit = self.child.wait().unwrap();
        assert!(exit.success(), "server exited with {exit}");
    }

    /// Every file the server wrote, its log and blob files included.
    pub fn files(&self) -> Vec<PathBuf> {
        let mut files = vec![self.log.clone()];
        let mut folders = vec![self.data.clone()];
        while let Some(folder) = folders.pop() {
            for entry in std::fs::read_dir(&folder).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    folders.push(path);
                } else {
                    files.push(path);
                }
            }
        }
        files
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn count_in_files(files: &[PathBuf], needle: &[u8]) -> usize {
    files
        .iter()
        .filter(|path| path.is_file())
        .map(|path| {
            let bytes = std::fs::read(path).unwrap();
            bytes.windows(needle.len()).filter(|w| *w == needle).count()
        })
        .sum()
}

/// Returns once the wall clock has passed `unix_ms`: for behaviour that is due at a time the
/// product announced (an expiry), where the passing of that time is the event itself.
pub fn wait_for_clock(unix_ms: u64) {
    let due = std::time::UNIX_EPOCH + Duration::from_millis(unix_ms + 1);
    if let Ok(left) = due.duration_since(std::time::SystemTime::now()) {
        std::thread::sleep(left);
    }
}

/// The passphrase every test profile is encrypted with.
pub const PASSPHRASE: &str = "a test passphrase";

/// A `miyu` command that unlocks test profiles. Test profiles use a cheaper (8 MiB) key
/// derivation than real ones, so hundreds of them do not slow the suite down.
pub fn miyu_command() -> Command {
    miyu_command_via(&[])
}

/// [`miyu_command`] run by a wrapper program such as `ip netns exec NAMESPACE`.
pub fn miyu_command_via(wrapper: &[&str]) -> Command {
    let mut command = command_via(wrapper, env!("CARGO_BIN_EXE_miyu"));
    command
        .env("MIYU_PASSPHRASE", PASSPHRASE)
        .env("MIYU_DANGER_KDF_MEMORY_KIB", "8192");
    command
}

/// `program`, or `wrapper... program` when there is a wrapper.
fn command_via(wrapper: &[&str], program: &str) -> Command {
    match wrapper.split_first() {
        None => Command::new(program),
        Some((first, rest)) => {
            let mut command = Command::new(first);
            command.args(rest).arg(program);
            command
        }
    }
}

/// Runs `miyu --profile PROFILE ARGS...`.
pub fn miyu(profile: &Path, args: &[&str]) -> Output {
    miyu_command()
        .arg("--profile")
        .arg(profile)
        .args(args)
        .output()
        .unwrap()
}

/// Runs `miyu` and returns its stdout, failing the test if it did not succeed.
pub fn miyu_ok(profile: &Path, args: &[&str]) -> String {
    let output = miyu(profile, args);
    assert!(
        output.status.success(),
        "miyu {args:?} failed with {}: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// A conversation (a contact's or a group's) as `miyu --json messages` gives it.
pub fn messages(profile: &Path, conversation: &str) -> Vec<serde_json::Value> {
    let json: serde_json::Value =
        serde_json::from_str(&miyu_ok(profile, &["--json", "messages", conversation])).unwrap();
    json.as_array().unwrap().clone()
}

/// This device's number for the message of `conversation` whose body is `body`.
pub fn id_of(profile: &Path, conversation: &str, body: &str) -> String {
    messages(profile, conversation)
        .iter()
        .find(|m| m["body"] == body)
        .unwrap_or_else(|| panic!("no {body:?} in {conversation}"))["id"]
        .as_i64()
        .unwrap()
        .to_string()
}

/// Two accounts on one server that have connected through an invite and both processed it.
pub struct Pair {
    pub alice: PathBuf,
    pub bob: PathBuf,
}

pub fn connect_pair(root: &Path, server: &str) -> Pair {
    let alice = root.join("alice");
    let bob = root.join("bob");
    miyu_ok(&alice, &["init", "--server", server, "--name", "alice"]);
    miyu_ok(&bob, &["init", "--server", server, "--name", "bob"]);
    let link = miyu_ok(&alice, &["invite"]);
    miyu_ok(&bob, &["accept", link.trim(), "--name", "alice"]);
    // Alice joins from the Welcome and introduces herself; Bob learns nothing new but syncs.
    miyu_ok(&alice, &["sync"]);
    miyu_ok(&bob, &["sync"]);
    Pair { alice, bob }
}

/// The bodies of a conversation, as `miyu messages` prints them (after the time stamp).
pub fn conversation(profile: &Path, contact: &str) -> Vec<String> {
    miyu_ok(profile, &["messages", contact])
        .lines()
        .map(|line| {
            line.split_once("  ")
                .map_or(line, |(_, rest)| rest)
                .to_string()
        })
        .collect()
}

/// A running `miyu chat`: lines typed into it, lines it printed.
pub struct Chat {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
}

impl Chat {
    pub fn start(profile: &Path, contact: &str) -> Chat {
        let mut child = miyu_command()
            .arg("--profile")
            .arg(profile)
            .args(["chat", contact])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (sender, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if sender.send(line).is_err() {
                    return;
                }
            }
        });
        let mut chat = Chat {
            child,
            stdin,
            lines,
        };
        chat.wait_for_line(|line| line.starts_with("-- chatting with"));
        chat
    }

    pub fn type_line(&mut self, text: &str) {
        writeln!(self.stdin, "{text}").unwrap();
        self.stdin.flush().unwrap();
    }

    /// Waits until the chat prints a line matching `wanted`, and returns it.
    pub fn wait_for_line(&mut self, wanted: impl Fn(&str) -> bool) -> String {
        loop {
            let line = self
                .lines
                .recv_timeout(PATIENCE)
                .expect("chat did not print the expected line");
            if wanted(&line) {
                return line;
            }
        }
    }
}

impl Drop for Chat {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A helper process that is killed when the test ends, however it ends.
pub struct Reaped(pub Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Waits for the answer to request `id`, skipping pushes.
pub async fn answer(
    connection: &mut miyu_client::net::Connection,
    id: u64,
) -> Result<miyu_proto::wire::server_frame::Body, miyu_proto::wire::Error> {
    use miyu_proto::wire::server_frame::Body as Reply;
    loop {
        let frame = connection.receive().await.unwrap();
        if frame.request_id == id {
            return match frame.body.unwrap() {
                Reply::Error(error) => Err(error),
                other => Ok(other),
            };
        }
    }
}

/// Registers a fresh device over a raw connection.
pub async fn register(
    address: &miyu_proto::ServerAddress,
) -> (
    miyu_client::net::Connection,
    miyu_crypto::identity::AccountKeys,
) {
    let keys = miyu_crypto::identity::AccountKeys::generate(&mut rand::rngs::OsRng);
    let connection = register_keys(address, &keys).await;
    (connection, keys)
}

/// Registers another device of the account of `first` (which holds its identity key) over a
/// raw connection.
pub async fn register_second_device(
    address: &miyu_proto::ServerAddress,
    first: &miyu_crypto::identity::AccountKeys,
) -> (
    miyu_client::net::Connection,
    miyu_crypto::identity::AccountKeys,
) {
    use rand::RngCore as _;
    let mut device_secret = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut device_secret);
    let keys = miyu_crypto::identity::AccountKeys::from_secrets(
        first.identity_secret().unwrap().as_slice(),
        &device_secret,
    )
    .unwrap();
    let connection = register_keys(address, &keys).await;
    (connection, keys)
}

/// Registers the device of `keys` over a raw connection.
pub async fn register_keys(
    address: &miyu_proto::ServerAddress,
    keys: &miyu_crypto::identity::AccountKeys,
) -> miyu_client::net::Connection {
    use miyu_proto::wire::{self, client_frame::Body as Request, server_frame::Body as Reply};
    let mut connection = miyu_client::net::Connection::open(address, None)
        .await
        .unwrap();
    let (sha, nonce) = connection.challenge();
    let signature = keys.sign_auth(sha, nonce);
    let id = connection
        .send(Request::Register(wire::Register {
            certificate: Some(keys.certificate().to_wire()),
            challenge_signature: signature,
            registration_token: String::new(),
            key_packages: vec![vec![1, 2, 3]],
            last_resort_key_package: vec![4, 5, 6],
        }))
        .await
        .unwrap();
    assert!(matches!(
        answer(&mut connection, id).await,
        Ok(Reply::Registered(_))
    ));
    connection
}
