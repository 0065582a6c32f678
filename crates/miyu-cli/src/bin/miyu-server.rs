//! `miyu-server`: runs the Miyu delivery service.
//!
//! Settings come from flags, then `MIYU_*` environment variables, then `--config FILE` (TOML),
//! then defaults. On start it prints one line, `address: URL`, that clients use to connect and
//! pin the server's certificate.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use miyu_server::{ServerConfig, StoreBackend};

#[derive(Parser, Debug)]
#[command(
    name = "miyu-server",
    version,
    about = "The Miyu delivery service: stores and relays ciphertext only"
)]
struct Args {
    /// Folder for the database and the TLS certificate.
    #[arg(long, env = "MIYU_DATA", default_value = "miyu-data")]
    data: PathBuf,
    /// Address to listen on [default: 127.0.0.1:7443].
    #[arg(long, env = "MIYU_LISTEN")]
    listen: Option<SocketAddr>,
    /// TOML file with any of these settings (flags and environment win over it).
    #[arg(long, env = "MIYU_CONFIG")]
    config: Option<PathBuf>,
    /// PEM certificate chain to present instead of the self-signed one.
    #[arg(long, env = "MIYU_CERT")]
    cert: Option<PathBuf>,
    /// PEM private key for --cert.
    #[arg(long, env = "MIYU_KEY")]
    key: Option<PathBuf>,
    /// Require this token to register a device.
    #[arg(long, env = "MIYU_REGISTRATION_TOKEN", hide_env_values = true)]
    registration_token: Option<String>,
    /// Host name or IP to print in the address line.
    #[arg(long, env = "MIYU_PUBLIC_HOST")]
    public_host: Option<String>,
    /// Delete log entries older than this many days even if undelivered [default: 30].
    #[arg(long, env = "MIYU_RETENTION_DAYS")]
    retention_days: Option<u32>,
    /// Sustained requests per second one connection may make [default: 2000].
    #[arg(long, env = "MIYU_REQUESTS_PER_SECOND")]
    requests_per_second: Option<u32>,
    /// Largest file an upload may create, in MiB [default: 4 GiB plus encryption overhead].
    #[arg(long, env = "MIYU_BLOB_MAX_MB")]
    blob_max_mb: Option<u64>,
    /// Storage each account may use for files, in MiB [default: 20480].
    #[arg(long, env = "MIYU_BLOB_QUOTA_MB")]
    blob_quota_mb: Option<u64>,
    /// Delete files this many days after upload [default: 30].
    #[arg(long, env = "MIYU_BLOB_RETENTION_DAYS")]
    blob_retention_days: Option<u32>,
    /// Keep everything in memory and lose it on exit. Benchmarks only.
    #[arg(long, hide = true)]
    danger_memory_store: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MIYU_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("miyu-server: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn config_from(args: Args) -> anyhow::Result<ServerConfig> {
    let defaults = ServerConfig::new(args.data.clone(), SocketAddr::from(([127, 0, 0, 1], 7443)));
    let mut config = match &args.config {
        Some(path) => ServerConfig::from_file(path, defaults)?,
        None => defaults,
    };
    config.data_dir = args.data;
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    if args.cert.is_some() || args.key.is_some() {
        config.cert = args.cert;
        config.key = args.key;
    }
    if args.registration_token.is_some() {
        config.registration_token = args.registration_token;
    }
    if args.public_host.is_some() {
        config.public_host = args.public_host;
    }
    if let Some(days) = args.retention_days {
        config.retention_days = days;
    }
    if let Some(rate) = args.requests_per_second {
        config.requests_per_second = rate;
    }
    if let Some(mb) = args.blob_max_mb {
        config.blob_max_bytes = mb.saturating_mul(1 << 20);
    }
    if let Some(mb) = args.blob_quota_mb {
        config.blob_quota_bytes = mb.saturating_mul(1 << 20);
    }
    if let Some(days) = args.blob_retention_days {
        config.blob_retention_days = days;
    }
    if args.danger_memory_store {
        config.store = StoreBackend::DangerMemory;
    }
    config.validate()?;
    Ok(config)
}

fn run(args: Args) -> anyhow::Result<()> {
    let config = config_from(args)?;
    let runtime = tokio::runtime::Runtime::new().context("starting the runtime")?;
    runtime.block_on(async {
        let server = miyu_server::start(config).await?;
        {
            let mut stdout = std::io::stdout().lock();
            writeln!(stdout, "address: {}", server.address())?;
            stdout.flush()?;
        }
        tracing::info!("serving; stop with SIGTERM or Ctrl-C");
        wait_for_signal().await?;
        tracing::info!("shutting down");
        server.shutdown().await;
        tracing::info!("stopped");
        Ok(())
    })
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    tokio::select! {
        _ = terminate.recv() => {}
        result = tokio::signal::ctrl_c() => result.context("waiting for Ctrl-C")?,
    }
    Ok(())
}
