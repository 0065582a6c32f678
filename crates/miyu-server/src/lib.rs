//! The Miyu delivery service: it authenticates devices, hands out key packages against invite
//! tokens, keeps one ordered log per MLS group and one inbox per device, and pushes what
//! arrives to the devices that are online.
//!
//! It stores and relays ciphertext only. It never depends on the client's secret-handling code
//! and never sees a message in the clear; it verifies public signatures and nothing more.
//!
//! ```no_run
//! # async fn example() -> Result<(), miyu_server::ServerError> {
//! let config = miyu_server::ServerConfig::new("./data".into(), "127.0.0.1:7443".parse().unwrap());
//! let server = miyu_server::start(config).await?;
//! println!("address: {}", server.address());
//! server.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! What it does not do: decrypt, inspect or index messages; record IP addresses; record which
//! member posted a group message.

#![cfg_attr(not(test), warn(clippy::unwrap_used))]

mod blobs;
mod config;
mod connection;
mod http;
mod hub;
mod limits;
pub mod store;
mod tls;

pub use config::{ServerConfig, StoreBackend};
pub use http::{RunningServer, start};
pub use tls::TlsIdentity;

/// Why the server could not start or run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS setup failed: {0}")]
    Tls(String),
    #[error("store failed: {0}")]
    Store(#[from] store::StoreError),
}

impl ServerError {
    fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        ServerError::Io {
            context: context.into(),
            source,
        }
    }
}
