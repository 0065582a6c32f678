//! Server configuration. The binary fills it from, in order of precedence, command-line flags,
//! `MIYU_*` environment variables, a TOML file and the defaults here.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::ServerError;

/// Where the server keeps its state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreBackend {
    /// SQLite in the data folder: the durable default.
    Sqlite,
    /// In memory: for benchmarks and tests only. Everything is lost when the server stops.
    DangerMemory,
}

#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ServerConfig {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    /// Host written in the `address:` line; defaults to the listen address (127.0.0.1 when the
    /// server listens on every interface).
    pub public_host: Option<String>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// When set, registering a device requires this token.
    pub registration_token: Option<String>,
    /// Log and inbox entries older than this are deleted even if not every device has them.
    pub retention_days: u32,
    /// How many requests one disk flush may acknowledge at most.
    pub max_batch: usize,
    /// Sustained requests per second one connection may make (bursts of twice that).
    pub requests_per_second: u32,
    /// Registrations per minute across the whole server.
    pub registrations_per_minute: u32,
    pub store: StoreBackend,
    /// Largest blob (encrypted file) one upload may create, in bytes.
    pub blob_max_bytes: u64,
    /// Bytes of blobs one account may keep on the server at once.
    pub blob_quota_bytes: u64,
    /// Days a blob is kept at most (shorter when its message disappears sooner).
    pub blob_retention_days: u32,
}

/// The TOML file's shape: every field optional, unknown fields refused.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    data_dir: Option<PathBuf>,
    listen: Option<SocketAddr>,
    public_host: Option<String>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    registration_token: Option<String>,
    retention_days: Option<u32>,
    max_batch: Option<usize>,
    requests_per_second: Option<u32>,
    registrations_per_minute: Option<u32>,
    store: Option<StoreBackend>,
    blob_max_bytes: Option<u64>,
    blob_quota_bytes: Option<u64>,
    blob_retention_days: Option<u32>,
}

impl ServerConfig {
    pub fn new(data_dir: PathBuf, listen: SocketAddr) -> Self {
        Self {
            data_dir,
            listen,
            public_host: None,
            cert: None,
            key: None,
            registration_token: None,
            retention_days: 30,
            max_batch: 1024,
            requests_per_second: 2000,
            registrations_per_minute: 120,
            store: StoreBackend::Sqlite,
            // A 4 GiB file with its encryption overhead (16 bytes per chunk of at least 4 KiB)
            // and its padding (to 64 MiB at that size).
            blob_max_bytes: (4 << 30) + (128 << 20),
            blob_quota_bytes: 20 << 30,
            blob_retention_days: 30,
        }
    }

    /// Reads a TOML file; its values replace the defaults but not values given on the command
    /// line, which the caller applies afterwards.
    pub fn from_file(path: &Path, defaults: ServerConfig) -> Result<Self, ServerError> {
        let text = std::fs::read_to_string(path)
            .map_err(|error| ServerError::io(format!("reading {}", path.display()), error))?;
        Self::from_toml(&text, defaults)
    }

    pub fn from_toml(text: &str, defaults: ServerConfig) -> Result<Self, ServerError> {
        let file: ConfigFile =
            toml::from_str(text).map_err(|error| ServerError::Config(error.to_string()))?;
        let mut config = defaults;
        macro_rules! take {
            ($($field:ident),*) => { $( if let Some(value) = file.$field { config.$field = value; } )* };
        }
        take!(
            data_dir,
            listen,
            retention_days,
            max_batch,
            requests_per_second,
            registrations_per_minute,
            store,
            blob_max_bytes,
            blob_quota_bytes,
            blob_retention_days
        );
        macro_rules! take_optional {
            ($($field:ident),*) => { $( if file.$field.is_some() { config.$field = file.$field; } )* };
        }
        take_optional!(public_host, cert, key, registration_token);
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), ServerError> {
        if self.cert.is_some() != self.key.is_some() {
            return Err(ServerError::Config(
                "give both --cert and --key, or neither".into(),
            ));
        }
        if self.max_batch == 0
            || self.requests_per_second == 0
            || self.retention_days == 0
            || self.blob_retention_days == 0
        {
            return Err(ServerError::Config(
                "max_batch, requests_per_second, retention_days and blob_retention_days must be positive".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults() -> ServerConfig {
        ServerConfig::new("d".into(), "127.0.0.1:1".parse().unwrap())
    }

    #[test]
    fn file_values_replace_defaults() {
        let config = ServerConfig::from_toml(
            "listen = \"127.0.0.1:9\"\nregistration_token = \"t\"\nretention_days = 7\n",
            defaults(),
        )
        .unwrap();
        assert_eq!(config.listen.port(), 9);
        assert_eq!(config.registration_token.as_deref(), Some("t"));
        assert_eq!(config.retention_days, 7);
        assert_eq!(config.data_dir, PathBuf::from("d"));
    }

    #[test]
    fn unknown_keys_and_half_tls_settings_are_refused() {
        assert!(ServerConfig::from_toml("colour = 1", defaults()).is_err());
        assert!(ServerConfig::from_toml("cert = \"c.pem\"", defaults()).is_err());
    }
}
