//! A delivery server started inside the benchmark process, on 127.0.0.1 with a temporary data
//! folder, with its rate limits lifted so that they do not cap what is being measured.

use anyhow::{Context, Result};
use miyu_proto::ServerAddress;
use miyu_server::{RunningServer, ServerConfig, StoreBackend};
use tempfile::TempDir;

/// Requests per second one connection may make: far above anything two cores can produce.
const UNLIMITED_REQUESTS_PER_SECOND: u32 = 100_000_000;
/// Registrations per minute: every benchmark device registers at once.
const UNLIMITED_REGISTRATIONS_PER_MINUTE: u32 = 1_000_000;

/// A running in-process server; its data folder is deleted after [`EmbeddedServer::stop`].
pub(crate) struct EmbeddedServer {
    server: RunningServer,
    _data: TempDir,
}

impl EmbeddedServer {
    pub(crate) async fn start(store: StoreBackend) -> Result<Self> {
        let data = tempfile::Builder::new()
            .prefix("miyu-bench-server-")
            .tempdir()
            .context("creating a temporary data folder for the server")?;
        let listen = "127.0.0.1:0"
            .parse()
            .context("parsing the listen address")?;
        let mut config = ServerConfig::new(data.path().to_path_buf(), listen);
        config.store = store;
        config.requests_per_second = UNLIMITED_REQUESTS_PER_SECOND;
        config.registrations_per_minute = UNLIMITED_REGISTRATIONS_PER_MINUTE;
        let server = miyu_server::start(config)
            .await
            .context("starting the embedded server")?;
        Ok(Self {
            server,
            _data: data,
        })
    }

    pub(crate) fn address(&self) -> &ServerAddress {
        self.server.address()
    }

    /// Shuts the server down (its store commits and closes) before the folder goes.
    pub(crate) async fn stop(self) {
        self.server.shutdown().await;
    }
}
