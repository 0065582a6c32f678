//! The server's TLS identity: a certificate given by the operator, or a self-signed one made
//! on first start. Clients pin its SHA-256, so no certificate authority is involved.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};

use crate::{ServerConfig, ServerError};

/// The certificate chain and key the server presents.
pub struct TlsIdentity {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

const CERT_FILE: &str = "tls-cert.pem";
const KEY_FILE: &str = "tls-key.pem";

impl TlsIdentity {
    /// Loads `--cert`/`--key`, or the self-signed pair in the data folder, creating it on
    /// first start.
    pub fn load_or_create(config: &ServerConfig) -> Result<Self, ServerError> {
        if let (Some(cert), Some(key)) = (&config.cert, &config.key) {
            return Self::load(cert, key);
        }
        let cert = config.data_dir.join(CERT_FILE);
        let key = config.data_dir.join(KEY_FILE);
        if !cert.exists() {
            Self::create(&cert, &key)?;
        }
        Self::load(&cert, &key)
    }

    fn load(cert: &Path, key: &Path) -> Result<Self, ServerError> {
        let chain = CertificateDer::pem_file_iter(cert)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .map_err(|error| ServerError::Tls(format!("reading {}: {error}", cert.display())))?;
        if chain.is_empty() {
            return Err(ServerError::Tls(format!(
                "{} holds no certificate",
                cert.display()
            )));
        }
        let key = PrivateKeyDer::from_pem_file(key)
            .map_err(|error| ServerError::Tls(format!("reading {}: {error}", key.display())))?;
        Ok(Self { chain, key })
    }

    fn create(cert: &Path, key: &Path) -> Result<(), ServerError> {
        let generated = rcgen::generate_simple_self_signed(vec!["miyu".to_string()])
            .map_err(|error| ServerError::Tls(error.to_string()))?;
        write_private(key, generated.signing_key.serialize_pem().as_bytes())?;
        std::fs::write(cert, generated.cert.pem())
            .map_err(|error| ServerError::io(format!("writing {}", cert.display()), error))
    }

    /// SHA-256 of the leaf certificate: what clients pin.
    pub fn certificate_sha256(&self) -> [u8; 32] {
        // `load` refuses an empty chain.
        let leaf = self.chain.first().map(|c| c.as_ref()).unwrap_or_default();
        Sha256::digest(leaf).into()
    }

    pub(crate) fn rustls_config(&self) -> Result<Arc<rustls::ServerConfig>, ServerError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|error| ServerError::Tls(error.to_string()))?
            .with_no_client_auth()
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|error| ServerError::Tls(error.to_string()))?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), ServerError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|error| ServerError::io(format!("creating {}", path.display()), error))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(|error| ServerError::io(format!("writing {}", path.display()), error))
}
