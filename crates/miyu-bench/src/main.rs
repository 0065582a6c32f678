//! `miyu-bench`: measures Miyu through its real network protocol (TLS, WebSocket, protobuf
//! frames, HTTPS for files), against a server started in-process on 127.0.0.1, one named with
//! `--server`, or the release binaries run as processes.
//!
//! - `relay`: raw protocol connections post opaque payloads as fast as a bounded window allows;
//!   how many messages a second the server durably stores and delivers.
//! - `mls-scale`: openmls alone in this process, no server: what creating, changing and joining
//!   a group of thousands of members costs in time, bytes and memory.
//! - `latency`: real clients (MLS, local SQLite) send at a fixed rate; how long from the start
//!   of sending until the receiver has decrypted the message.
//! - `files`: one `miyu` process sends a file end-to-end encrypted through a `miyu-server`
//!   process and another downloads it; throughput, and peak memory of each process.
//!
//! Every run is bounded in messages and time and stops by itself. Timing uses the monotonic
//! clock only and is reported, never relied on for correctness.

mod embedded;
mod files;
mod group_sizes;
mod latency;
mod link_device;
mod machine;
mod relay;
mod scale;
mod stats;

use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result, ensure};
use clap::{Args, Parser, Subcommand, ValueEnum};
use miyu_proto::ServerAddress;
use miyu_proto::frame::MAX_FRAME_BYTES;
use miyu_server::StoreBackend;
use serde::Serialize;

use crate::embedded::EmbeddedServer;
use crate::files::{FilesOutcome, FilesPlan};
use crate::latency::{LatencyOutcome, LatencyPlan};
use crate::machine::Machine;
use crate::relay::{RelayOutcome, RelayPlan};
use crate::scale::{ScaleOutcome, ScalePlan, format_bytes, format_seconds};

#[derive(Debug, Parser)]
#[command(
    name = "miyu-bench",
    version,
    about = "Load generator and benchmarks for the Miyu delivery server"
)]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
    /// Print one JSON object instead of text.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Debug, Subcommand)]
enum Scenario {
    /// Server-only throughput: pipelined posts of opaque payloads between raw connections.
    Relay(RelayArgs),
    /// End-to-end latency with real clients sending at a fixed rate.
    Latency(LatencyArgs),
    /// End-to-end encrypted file transfer between `miyu` processes through a `miyu-server`
    /// process, all found next to this program.
    Files(FilesArgs),
    /// MLS group operations at thousands of members, openmls alone in this process with its
    /// in-memory storage (no server, no SQLite).
    MlsScale(MlsScaleArgs),
    /// Miyu's own MLS code path (device certificates, SQLite provider) at growing group sizes,
    /// and whether its Welcomes and commits fit in one frame.
    GroupSizes(GroupSizesArgs),
    /// Linking a new device to an account with many conversations and a long history: real
    /// clients through a server in this process.
    LinkDevice(LinkDeviceArgs),
}

#[derive(Debug, Args)]
struct LinkDeviceArgs {
    /// Conversations of the account (one contact each).
    #[arg(long, default_value_t = 100)]
    conversations: usize,
    /// Messages of history, spread over the conversations.
    #[arg(long, default_value_t = 10_000)]
    messages: usize,
}

#[derive(Debug, Args)]
struct GroupSizesArgs {
    /// Group sizes in members, committer included.
    #[arg(long, value_delimiter = ',', default_value = "100,1000,10000")]
    sizes: Vec<usize>,
}

#[derive(Debug, Args)]
struct RelayArgs {
    /// Sender/receiver pairs; a comma-separated list runs once per value, each on a fresh server.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    pairs: Vec<usize>,
    /// Messages each sender posts.
    #[arg(long, default_value_t = 20_000)]
    messages: u64,
    /// Bytes per message payload (the first 8 carry a timestamp, the rest are random).
    #[arg(long, default_value_t = 256)]
    payload: usize,
    /// Posts a sender may have unanswered at once.
    #[arg(long, default_value_t = 256)]
    window: usize,
    /// A receiver acknowledges after this many deliveries.
    #[arg(long, default_value_t = 64)]
    ack_every: u64,
    /// Storage of the embedded server.
    #[arg(long, value_enum, default_value_t = StoreChoice::Sqlite, conflicts_with = "server")]
    store: StoreChoice,
    /// Measure this server (wss://HOST:PORT/#FINGERPRINT) instead of an embedded one.
    #[arg(long)]
    server: Option<ServerAddress>,
    /// Registration token, for a server that requires one.
    #[arg(
        long,
        env = "MIYU_REGISTRATION_TOKEN",
        default_value = "",
        hide_env_values = true
    )]
    registration_token: String,
}

#[derive(Debug, Args)]
struct LatencyArgs {
    /// Messages per second each sender aims for.
    #[arg(long, default_value_t = 1000)]
    rate: u32,
    /// How long each sender sends.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Sender/receiver pairs, each its own conversation.
    #[arg(long, default_value_t = 1)]
    pairs: usize,
    /// Measure this server (wss://HOST:PORT/#FINGERPRINT) instead of an embedded one.
    #[arg(long)]
    server: Option<ServerAddress>,
}

#[derive(Debug, Args)]
struct FilesArgs {
    /// Size of the file: bytes, or K, M, G in powers of 1024 (1G = 1 GiB), at most 4G. The
    /// disk needs about three times this free: the file, the server's copy, the download.
    #[arg(long, default_value = "1G", value_parser = files::parse_size)]
    size: u64,
    /// Create the profiles with `miyu init --no-passphrase` (the key kept in a file), so that
    /// no passphrase derivation (Argon2id, 64 MiB) is in the times and memory peaks.
    #[arg(long)]
    no_passphrase: bool,
}

#[derive(Debug, Args)]
struct MlsScaleArgs {
    /// Group sizes in members, committer included; one run each, in the order given.
    #[arg(long, value_delimiter = ',', default_value = "100,1000,10000")]
    sizes: Vec<usize>,
    /// Also build groups of at most this many members with one commit per added member, to
    /// compare with one commit adding everyone (about N² work: 1,000 takes a minute).
    #[arg(long, default_value_t = 1000)]
    one_by_one_up_to: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum StoreChoice {
    /// SQLite with full sync: durable, what the server runs with.
    Sqlite,
    /// In memory: nothing survives a restart. For comparison only.
    Memory,
}

impl StoreChoice {
    fn backend(self) -> StoreBackend {
        match self {
            StoreChoice::Sqlite => StoreBackend::Sqlite,
            StoreChoice::Memory => StoreBackend::DangerMemory,
        }
    }

    fn describe(self) -> &'static str {
        match self {
            StoreChoice::Sqlite => "embedded server, SQLite store (durable)",
            StoreChoice::Memory => "embedded server, in-memory store (not durable)",
        }
    }
}

/// Limits that keep a run bounded in count and size.
const MAX_PAIRS: usize = 256;
const MAX_MESSAGES_PER_PAIR: u64 = 10_000_000;
const MAX_WINDOW: usize = 8192;
const MAX_RATE: u32 = 100_000;
const MAX_SECONDS: u64 = 3600;
const MAX_MEMBERS: usize = 1_000_000;
/// Room for the frame's other fields around the payload.
const FRAME_OVERHEAD: usize = 256;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("miyu-bench: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("miyu-bench: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    // The one origin every timestamp in a payload or message counts from.
    let epoch = Instant::now();
    let machine = Machine::this();
    match cli.scenario {
        Scenario::Relay(args) => relay(args, machine, epoch, cli.json).await,
        Scenario::Latency(args) => latency(args, machine, epoch, cli.json).await,
        Scenario::Files(args) => files(args, machine, cli.json),
        Scenario::MlsScale(args) => mls_scale(args, machine, cli.json),
        Scenario::GroupSizes(args) => group_sizes(args, cli.json),
        Scenario::LinkDevice(args) => link_device(args, cli.json).await,
    }
}

#[derive(Debug, Serialize)]
struct RelayReport {
    scenario: &'static str,
    target: String,
    machine: Machine,
    runs: Vec<RelayOutcome>,
}

async fn relay(args: RelayArgs, machine: Machine, epoch: Instant, json: bool) -> Result<()> {
    ensure!(!args.pairs.is_empty(), "give at least one --pairs value");
    for &pairs in &args.pairs {
        ensure!(
            (1..=MAX_PAIRS).contains(&pairs),
            "--pairs must be between 1 and {MAX_PAIRS}"
        );
    }
    ensure!(
        (1..=MAX_MESSAGES_PER_PAIR).contains(&args.messages),
        "--messages must be between 1 and {MAX_MESSAGES_PER_PAIR}"
    );
    let max_payload = MAX_FRAME_BYTES - FRAME_OVERHEAD;
    ensure!(
        (relay::STAMP_BYTES..=max_payload).contains(&args.payload),
        "--payload must be between {} and {max_payload} bytes",
        relay::STAMP_BYTES
    );
    ensure!(
        (1..=MAX_WINDOW).contains(&args.window),
        "--window must be between 1 and {MAX_WINDOW}"
    );
    ensure!(args.ack_every >= 1, "--ack-every must be at least 1");

    let target = match &args.server {
        Some(server) => format!("server at {}", server.authority()),
        None => args.store.describe().to_string(),
    };
    let mut runs = Vec::with_capacity(args.pairs.len());
    for &pairs in &args.pairs {
        let plan = RelayPlan {
            pairs,
            messages: args.messages,
            payload_bytes: args.payload,
            window: args.window,
            ack_every: args.ack_every,
            registration_token: args.registration_token.clone(),
        };
        let outcome = match &args.server {
            Some(server) => relay::run(&plan, server, epoch).await?,
            None => {
                let embedded = EmbeddedServer::start(args.store.backend()).await?;
                let measured = relay::run(&plan, embedded.address(), epoch).await;
                embedded.stop().await;
                measured?
            }
        };
        if !json {
            print_relay(&target, &outcome);
        }
        runs.push(outcome);
    }
    if json {
        let report = RelayReport {
            scenario: "relay",
            target,
            machine,
            runs,
        };
        println!(
            "{}",
            serde_json::to_string(&report).context("writing JSON")?
        );
    } else {
        println!(
            "machine: {} ({} logical cores), shared by the clients and the server",
            machine.cpu_model, machine.logical_cores
        );
    }
    Ok(())
}

fn print_relay(target: &str, outcome: &RelayOutcome) {
    println!(
        "relay: {} pair(s) x {} messages of {} bytes, window {}, ack every {} ({target})",
        outcome.pairs,
        outcome.messages_per_pair,
        outcome.payload_bytes,
        outcome.window,
        outcome.ack_every
    );
    println!(
        "  delivered     {:>9} messages in {:.3} s = {:>9.0} msg/s (first post to last delivery)",
        outcome.delivered, outcome.delivery_seconds, outcome.delivered_per_second
    );
    println!(
        "  acknowledged  {:>9} posts    in {:.3} s = {:>9.0} posts/s (first post to last Posted)",
        outcome.posted, outcome.posted_seconds, outcome.posted_per_second
    );
    if let Some(latency) = &outcome.post_to_posted {
        println!("  post -> Posted     {latency}");
    }
    if let Some(latency) = &outcome.post_to_delivered {
        println!("  post -> delivered  {latency}");
    }
    if outcome.own_posts_echoed_in_full > 0 {
        println!(
            "  {} own posts came back to their senders in full (own flag unset)",
            outcome.own_posts_echoed_in_full
        );
    }
    println!("  {}", outcome.cpu);
    println!("  setup {:.2} s", outcome.setup_seconds);
}

#[derive(Debug, Serialize)]
struct LatencyReport {
    scenario: &'static str,
    target: String,
    machine: Machine,
    #[serde(flatten)]
    outcome: LatencyOutcome,
}

async fn latency(args: LatencyArgs, machine: Machine, epoch: Instant, json: bool) -> Result<()> {
    ensure!(
        (1..=MAX_PAIRS).contains(&args.pairs),
        "--pairs must be between 1 and {MAX_PAIRS}"
    );
    ensure!(
        (1..=MAX_RATE).contains(&args.rate),
        "--rate must be between 1 and {MAX_RATE}"
    );
    ensure!(
        (1..=MAX_SECONDS).contains(&args.seconds),
        "--seconds must be between 1 and {MAX_SECONDS}"
    );
    let plan = LatencyPlan {
        pairs: args.pairs,
        rate: args.rate,
        seconds: args.seconds,
    };
    let profiles = tempfile::Builder::new()
        .prefix("miyu-bench-clients-")
        .tempdir()
        .context("creating a temporary folder for the client profiles")?;
    let (target, outcome) = match &args.server {
        Some(server) => (
            format!("server at {}", server.authority()),
            latency::run(&plan, server, profiles.path(), epoch).await?,
        ),
        None => {
            let embedded = EmbeddedServer::start(StoreBackend::Sqlite).await?;
            let measured = latency::run(&plan, embedded.address(), profiles.path(), epoch).await;
            embedded.stop().await;
            (StoreChoice::Sqlite.describe().to_string(), measured?)
        }
    };
    let report = LatencyReport {
        scenario: "latency",
        target,
        machine,
        outcome,
    };
    if json {
        println!(
            "{}",
            serde_json::to_string(&report).context("writing JSON")?
        );
    } else {
        print_latency(&report);
    }
    Ok(())
}

fn print_latency(report: &LatencyReport) {
    let outcome = &report.outcome;
    println!(
        "latency: {} pair(s), each sending {} msg/s for {} s with real clients ({})",
        outcome.pairs, outcome.rate_per_pair, outcome.seconds, report.target
    );
    println!(
        "  sent {} of {} planned, {:.0} msg/s achieved; received {} ({:.0} msg/s), missing {}",
        outcome.sent,
        outcome.planned,
        outcome.achieved_send_rate,
        outcome.received,
        outcome.received_per_second,
        outcome.missing
    );
    if outcome.kept_up {
        println!("  the senders kept up with the requested rate");
    } else {
        println!(
            "  the senders could NOT keep up with the requested rate (one client sends one message at a time and waits for the server's acknowledgement); lag behind schedule at the end: {:.0} ms",
            outcome.final_lag_ms
        );
    }
    if let Some(latency) = &outcome.send_to_decrypted {
        println!("  send start -> decrypted   {latency}");
    }
    if let Some(latency) = &outcome.scheduled_to_decrypted {
        println!("  scheduled  -> decrypted   {latency}");
    }
    if let Some(latency) = &outcome.send_call {
        println!("  Client::send call         {latency}");
    }
    println!("  {}", outcome.cpu);
    println!("  setup {:.2} s", outcome.setup_seconds);
    println!(
        "machine: {} ({} logical cores), shared by the clients and the server",
        report.machine.cpu_model, report.machine.logical_cores
    );
}

#[derive(Debug, Serialize)]
struct FilesReport {
    scenario: &'static str,
    target: String,
    binaries: String,
    machine: Machine,
    #[serde(flatten)]
    outcome: FilesOutcome,
}

/// Runs the processes from this thread: they are the measurement, the runtime is idle.
fn files(args: FilesArgs, machine: Machine, json: bool) -> Result<()> {
    let max = miyu_crypto::file::MAX_FILE_BYTES;
    ensure!(
        (1..=max).contains(&args.size),
        "--size must be between 1 byte and 4G"
    );
    let executable = std::env::current_exe().context("finding this program")?;
    let binaries = executable
        .parent()
        .context("finding the folder of this program")?;
    let plan = FilesPlan {
        size_bytes: args.size,
        passphrase: !args.no_passphrase,
    };
    let outcome = files::run(&plan, binaries, &std::env::temp_dir())?;
    let report = FilesReport {
        scenario: "files",
        target: "miyu-server process, SQLite store, clients as miyu processes".into(),
        binaries: binaries.display().to_string(),
        machine,
        outcome,
    };
    if json {
        println!(
            "{}",
            serde_json::to_string(&report).context("writing JSON")?
        );
    } else {
        print_files(&report);
    }
    Ok(())
}

fn print_files(report: &FilesReport) {
    let outcome = &report.outcome;
    let mib =
        |kib: Option<u64>| kib.map_or("?".into(), |kib| format!("{:.1}", kib as f64 / 1024.0));
    let seconds = |value: Option<f64>| value.map_or("?".into(), |value| format!("{value:.2}"));
    println!(
        "files: {:.2} GiB ({} bytes) from alice to bob through miyu-server, processes on 127.0.0.1, profiles {}",
        outcome.size_bytes as f64 / f64::from(1u32 << 30),
        outcome.size_bytes,
        if outcome.passphrase {
            "unlocked with a passphrase (Argon2id) by every command"
        } else {
            "with their key in a file (no passphrase)"
        }
    );
    println!(
        "  {:<26} {:>8} {:>9} {:>14} {:>10} {:>10} {:>10}",
        "command", "time s", "MB/s", "peak RSS MiB", "CPU s", "server CPU", "others CPU"
    );
    let rows = [
        ("start-up (contacts)", &outcome.start_up, None),
        (
            "upload (send-file)",
            &outcome.upload,
            Some(outcome.upload_mb_per_second),
        ),
        ("receive message (sync)", &outcome.receive_message, None),
        (
            "download",
            &outcome.download,
            Some(outcome.download_mb_per_second),
        ),
    ];
    for (name, step, rate) in rows {
        println!(
            "  {:<26} {:>8.2} {:>9} {:>14} {:>10} {:>10} {:>10}",
            name,
            step.seconds,
            rate.map_or(String::new(), |rate| format!("{rate:.0}")),
            mib(step.peak_rss_kib),
            seconds(step.cpu_seconds),
            seconds(step.server_cpu_seconds),
            seconds(step.other_cpu_seconds)
        );
    }
    println!(
        "  end to end (upload + download): {:.0} MB/s; without the start-up time: upload {:.0} MB/s, download {:.0} MB/s",
        outcome.end_to_end_mb_per_second,
        outcome.upload_without_start_up_mb_per_second,
        outcome.download_without_start_up_mb_per_second
    );
    println!(
        "  server peak RSS {} MiB; the download's SHA-256 matches the original ({})",
        mib(outcome.server_peak_rss_kib),
        outcome.sha256
    );
    println!(
        "  setup {:.2} s; binaries from {}",
        outcome.setup_seconds, report.binaries
    );
    println!(
        "machine: {} ({} logical cores), shared by the clients and the server",
        report.machine.cpu_model, report.machine.logical_cores
    );
}

#[derive(Debug, Serialize)]
struct ScaleReport {
    scenario: &'static str,
    target: &'static str,
    machine: Machine,
    /// The 1, 5 and 15 minute load averages when the run started.
    load_average: Option<String>,
    runs: Vec<ScaleOutcome>,
}

/// Runs on this thread, like `mls_scale`.
fn group_sizes(args: GroupSizesArgs, json: bool) -> Result<()> {
    ensure!(!args.sizes.is_empty(), "give at least one --sizes value");
    let mut runs = Vec::new();
    for &members in &args.sizes {
        ensure!(
            (2..=MAX_MEMBERS).contains(&members),
            "--sizes must be between 2 and {MAX_MEMBERS}"
        );
        let run =
            group_sizes::run(members).with_context(|| format!("measuring a group of {members}"))?;
        if !json {
            println!(
                "{:>6} members: check key packages {}, create {} in {} batches (largest request \
                 {}), tree {}; add one: build {} commit {} Welcome {} processed {}, newcomer \
                 ready {}; self-update: build {} commit {} processed {}; remove: build {} \
                 commit {} processed {}; fits in a frame: {}",
                run.members,
                format_seconds(run.check_key_packages_seconds),
                format_seconds(run.create_seconds),
                run.create_batches,
                format_bytes(run.create_largest_request_bytes),
                format_bytes(run.tree_bytes),
                format_seconds(run.add_build_ms / 1e3),
                format_bytes(run.add_commit_bytes),
                format_bytes(run.add_welcome_bytes),
                format_seconds(run.add_process_ms / 1e3),
                format_seconds(run.join_seconds),
                format_seconds(run.update_build_ms / 1e3),
                format_bytes(run.update_commit_bytes),
                format_seconds(run.update_process_ms / 1e3),
                format_seconds(run.remove_build_ms / 1e3),
                format_bytes(run.remove_commit_bytes),
                format_seconds(run.remove_process_ms / 1e3),
                if run.fits_in_a_frame { "yes" } else { "NO" },
            );
        }
        runs.push(run);
    }
    if json {
        println!("{}", serde_json::to_string(&runs).context("writing JSON")?);
    }
    Ok(())
}

async fn link_device(args: LinkDeviceArgs, json: bool) -> Result<()> {
    let server = EmbeddedServer::start(StoreBackend::Sqlite).await?;
    let profiles = tempfile::Builder::new()
        .prefix("miyu-bench-link-")
        .tempdir()
        .context("creating a folder for the profiles")?;
    let outcome = link_device::run(
        server.address(),
        profiles.path(),
        args.conversations,
        args.messages,
    )
    .await;
    server.stop().await;
    let outcome = outcome?;
    if json {
        println!(
            "{}",
            serde_json::to_string(&outcome).context("writing JSON")?
        );
    } else {
        println!(
            "{} conversations, {} messages: linked in {} (the first device's part {}); the new \
             device got {} conversations and {} messages (setup {})",
            outcome.conversations,
            outcome.messages,
            format_seconds(outcome.link_seconds),
            format_seconds(outcome.approve_seconds),
            outcome.received_conversations,
            outcome.received_messages,
            format_seconds(outcome.setup_seconds),
        );
    }
    Ok(())
}

/// Runs on this thread: openmls is synchronous and the runtime is idle.
fn mls_scale(args: MlsScaleArgs, machine: Machine, json: bool) -> Result<()> {
    ensure!(!args.sizes.is_empty(), "give at least one --sizes value");
    for &members in &args.sizes {
        ensure!(
            (2..=MAX_MEMBERS).contains(&members),
            "--sizes must be between 2 and {MAX_MEMBERS}"
        );
    }
    let load_average = std::fs::read_to_string("/proc/loadavg").ok().map(|line| {
        line.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    });
    let target = "openmls 0.9 in one process, in-memory provider (OpenMlsRustCrypto)";
    if !json {
        println!(
            "mls-scale: {target}, {:?}, handshake messages encrypted, padding {} bytes",
            miyu_crypto::mls::CIPHERSUITE,
            miyu_crypto::mls::PADDING
        );
    }
    let mut runs = Vec::with_capacity(args.sizes.len());
    for &members in &args.sizes {
        let plan = ScalePlan {
            members,
            one_by_one: members <= args.one_by_one_up_to,
        };
        let outcome =
            scale::run(&plan).with_context(|| format!("measuring a group of {members}"))?;
        if !json {
            print_scale(&outcome);
        }
        runs.push(outcome);
    }
    let report = ScaleReport {
        scenario: "mls-scale",
        target,
        machine,
        load_average,
        runs,
    };
    if json {
        println!(
            "{}",
            serde_json::to_string(&report).context("writing JSON")?
        );
    } else {
        println!(
            "machine: {} ({} logical cores), one thread; load average at start {}",
            report.machine.cpu_model,
            report.machine.logical_cores,
            report.load_average.as_deref().unwrap_or("unknown")
        );
    }
    Ok(())
}

fn print_scale(outcome: &ScaleOutcome) {
    let seconds = |value: f64| format_seconds(value);
    let ms = |value: f64| format_seconds(value / 1e3);
    println!("{} members", outcome.members);
    println!(
        "  key packages made in {} (setup); the committer validates them in {}",
        seconds(outcome.key_packages_seconds),
        seconds(outcome.validate_key_packages_seconds)
    );
    let creations = [
        Some(&outcome.create_batch),
        outcome.create_one_by_one.as_ref(),
    ];
    for creation in creations.into_iter().flatten() {
        println!(
            "  create, {:>5} commit(s): {:>10}   last commit {:>10}, last Welcome {:>10}",
            creation.commits,
            seconds(creation.seconds),
            format_bytes(creation.last_commit_bytes),
            format_bytes(creation.last_welcome_bytes)
        );
    }
    println!(
        "  observer joins from the creation Welcome in {}",
        seconds(outcome.observer_join_seconds)
    );
    println!(
        "  {:<22} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "commit", "build", "own merge", "bytes", "process", "merge", "Welcome"
    );
    let steps = [
        ("add one (tree inside)", &outcome.add),
        ("remove one", &outcome.remove),
        ("self-update", &outcome.self_update),
        ("add one (tree apart)", &outcome.add_tree_apart),
    ];
    for (name, step) in steps {
        println!(
            "  {:<22} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}",
            name,
            ms(step.build_ms),
            ms(step.committer_merge_ms),
            format_bytes(step.commit_bytes),
            ms(step.process_ms),
            ms(step.merge_ms),
            step.welcome_bytes.map_or("-".into(), format_bytes)
        );
    }
    let joins = [
        ("join, tree inside", &outcome.join_tree_in_welcome),
        ("join, tree apart", &outcome.join_tree_apart),
    ];
    for (name, join) in joins {
        print!(
            "  {:<22} ready in {:>10}; Welcome {:>10}",
            name,
            seconds(join.seconds),
            format_bytes(join.welcome_bytes)
        );
        if let (Some(tree), Some(hash_ms)) = (join.tree_bytes, join.tree_hash_ms) {
            print!(
                " + tree {} (SHA-256 in {})",
                format_bytes(tree),
                ms(hash_ms)
            );
        }
        println!();
    }
    let peak = outcome.peak_rss_kib.map_or("?".into(), |kib| {
        format_bytes(
            usize::try_from(kib)
                .unwrap_or(usize::MAX)
                .saturating_mul(1024),
        )
    });
    println!(
        "  peak RSS {peak}{}; {}",
        if outcome.peak_rss_reset {
            " (this size alone)"
        } else {
            " (since the process started)"
        },
        outcome.cpu
    );
}
