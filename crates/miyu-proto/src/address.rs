//! Server addresses. A server is named by where it listens and the SHA-256 of its TLS
//! certificate, so clients pin the key without any certificate authority:
//! `wss://127.0.0.1:7443/#<52 base32 characters>`.

use std::fmt;
use std::str::FromStr;

use crate::text;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AddressError {
    #[error("a server address starts with wss://")]
    Scheme,
    #[error("the server's host or port is missing or invalid")]
    HostPort,
    #[error("the server address lacks its certificate fingerprint (#...)")]
    Fingerprint,
}

/// Where a server listens and which certificate it must present.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ServerAddress {
    host: String,
    port: u16,
    certificate_sha256: [u8; 32],
}

const MAX_HOST_LEN: usize = 253;

fn valid_host(host: &str) -> bool {
    if host.is_empty() || host.len() > MAX_HOST_LEN {
        return false;
    }
    if let Some(inner) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        return inner.parse::<std::net::Ipv6Addr>().is_ok();
    }
    host.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
}

/// Splits `host:port`, where host may be a bracketed IPv6 address.
pub(crate) fn parse_host_port(text: &str) -> Result<(String, u16), AddressError> {
    let (host, port) = text.rsplit_once(':').ok_or(AddressError::HostPort)?;
    // Digits only: the integer parser would also take a sign.
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(AddressError::HostPort);
    }
    let port: u16 = port.parse().map_err(|_| AddressError::HostPort)?;
    if port == 0 || !valid_host(host) {
        return Err(AddressError::HostPort);
    }
    Ok((host.to_ascii_lowercase(), port))
}

impl ServerAddress {
    pub fn new(host: &str, port: u16, certificate_sha256: [u8; 32]) -> Result<Self, AddressError> {
        if port == 0 || !valid_host(host) {
            return Err(AddressError::HostPort);
        }
        Ok(Self {
            host: host.to_ascii_lowercase(),
            port,
            certificate_sha256,
        })
    }

    /// The host as it goes into a connection: brackets stripped from IPv6 literals.
    pub fn connect_host(&self) -> &str {
        self.host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(&self.host)
    }

    /// The host as written in a URL.
    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn certificate_sha256(&self) -> &[u8; 32] {
        &self.certificate_sha256
    }

    /// `host:port`, as written in URLs and links.
    pub fn authority(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    pub fn certificate_fingerprint(&self) -> String {
        text::encode(&self.certificate_sha256)
    }

    pub(crate) fn parse_fingerprint(text: &str) -> Result<[u8; 32], AddressError> {
        text::decode_array(text).ok_or(AddressError::Fingerprint)
    }
}

impl fmt::Display for ServerAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "wss://{}/#{}",
            self.authority(),
            self.certificate_fingerprint()
        )
    }
}

impl FromStr for ServerAddress {
    type Err = AddressError;

    fn from_str(s: &str) -> Result<Self, AddressError> {
        let rest = s
            .trim()
            .strip_prefix("wss://")
            .ok_or(AddressError::Scheme)?;
        let (authority, fingerprint) = rest.split_once('#').ok_or(AddressError::Fingerprint)?;
        let authority = authority.strip_suffix('/').unwrap_or(authority);
        let (host, port) = parse_host_port(authority)?;
        let certificate_sha256 = Self::parse_fingerprint(fingerprint)?;
        Ok(Self {
            host,
            port,
            certificate_sha256,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_ipv4_names_and_ipv6() {
        for host in ["127.0.0.1", "chat.example", "[::1]"] {
            let address = ServerAddress::new(host, 7443, [3; 32]).unwrap();
            let text = address.to_string();
            assert!(text.starts_with("wss://"));
            assert_eq!(text.parse::<ServerAddress>().unwrap(), address);
        }
        let v6 = ServerAddress::new("[::1]", 1, [0; 32]).unwrap();
        assert_eq!(v6.connect_host(), "::1");
    }

    #[test]
    fn rejects_what_is_not_an_address() {
        let fp = ServerAddress::new("h", 1, [0; 32])
            .unwrap()
            .certificate_fingerprint();
        for bad in [
            "https://h:1/#x".to_string(),
            "wss://h:1/".to_string(),
            format!("wss://h/#{fp}"),
            format!("wss://h:0/#{fp}"),
            format!("wss://h:99999/#{fp}"),
            format!("wss://h:+80/#{fp}"),
            format!("wss://h_x:1/#{fp}"),
            format!("wss://[zz]:1/#{fp}"),
            "wss://h:1/#tooshort".to_string(),
        ] {
            assert!(bad.parse::<ServerAddress>().is_err(), "{bad}");
        }
    }
}
