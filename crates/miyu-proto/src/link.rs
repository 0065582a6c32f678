//! Link codes: how a new device asks to join an account.
//!
//! `miyu-link://device?v=1&device=KEY&key=HPKE_KEY&secret=SECRET&name=NAME`
//!
//! The new device shows the code; the user gives it to a device of the account (by hand, or
//! by scanning it), never through the server. It names the new device's key (which the account
//! certifies), the public key the account seals its answer to, a 32-byte secret that names the
//! server mailbox the answer goes to (and binds the answer to this code), and the name the user
//! gave the device (base32 of its UTF-8). Whoever holds the code can answer it: it is a secret
//! until used.

use std::fmt;
use std::str::FromStr;

use crate::text;

/// Longest code this parser reads; real codes are about 330 characters.
const MAX_CODE_LEN: usize = 1024;
/// Longest device name, in bytes of UTF-8.
pub const MAX_DEVICE_NAME_BYTES: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LinkCodeError {
    #[error("a link code starts with miyu-link://device?")]
    Scheme,
    #[error("link code is longer than {MAX_CODE_LEN} characters")]
    TooLong,
    #[error("link code version {0} is not supported; update miyu")]
    UnsupportedVersion(String),
    #[error("link code lacks its `{0}` part")]
    Missing(&'static str),
    #[error("link code has an invalid `{0}` part")]
    Invalid(&'static str),
}

/// A parsed link code.
#[derive(Clone, PartialEq, Eq)]
pub struct LinkCode {
    /// The new device's Ed25519 key.
    pub device_key: [u8; 32],
    /// The X25519 key the answer is sealed to (HPKE).
    pub seal_key: [u8; 32],
    pub secret: [u8; 32],
    pub name: String,
}

impl fmt::Debug for LinkCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The secret lets its holder answer the code: keep it out of debug output.
        f.debug_struct("LinkCode")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl fmt::Display for LinkCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "miyu-link://device?v=1&device={}&key={}&secret={}&name={}",
            text::encode(&self.device_key),
            text::encode(&self.seal_key),
            text::encode(&self.secret),
            text::encode(self.name.as_bytes()),
        )
    }
}

/// Whether `name` can name a device: 1 to 64 bytes, no control characters, and none of the
/// invisible marks that could make one name pass for another (zero-width characters, direction
/// marks, overrides and isolates, the byte-order mark).
pub fn valid_device_name(name: &str) -> bool {
    let invisible = |c: char| {
        matches!(
            c,
            '\u{061C}' | '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2060}'..='\u{2069}' | '\u{FEFF}'
        )
    };
    !name.trim().is_empty()
        && name.len() <= MAX_DEVICE_NAME_BYTES
        && !name.chars().any(|c| c.is_control() || invisible(c))
}

impl FromStr for LinkCode {
    type Err = LinkCodeError;

    fn from_str(s: &str) -> Result<Self, LinkCodeError> {
        let s = s.trim();
        if s.len() > MAX_CODE_LEN {
            return Err(LinkCodeError::TooLong);
        }
        let query = s
            .strip_prefix("miyu-link://device?")
            .ok_or(LinkCodeError::Scheme)?;
        let (mut version, mut device, mut key, mut secret, mut name) =
            (None, None, None, None, None);
        for pair in query.split('&') {
            let (part, value) = pair.split_once('=').unwrap_or((pair, ""));
            let slot = match part {
                "v" => &mut version,
                "device" => &mut device,
                "key" => &mut key,
                "secret" => &mut secret,
                "name" => &mut name,
                _ => continue,
            };
            *slot = Some(value);
        }
        match version.ok_or(LinkCodeError::Missing("v"))? {
            "1" => {}
            other => {
                return Err(LinkCodeError::UnsupportedVersion(
                    other.chars().take(8).collect(),
                ));
            }
        }
        let array = |value: Option<&str>, part: &'static str| {
            text::decode_array::<32>(value.ok_or(LinkCodeError::Missing(part))?)
                .ok_or(LinkCodeError::Invalid(part))
        };
        let (device_key, seal_key, secret) = (
            array(device, "device")?,
            array(key, "key")?,
            array(secret, "secret")?,
        );
        let name = text::decode_vec(
            name.ok_or(LinkCodeError::Missing("name"))?,
            1,
            MAX_DEVICE_NAME_BYTES,
        )
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .filter(|name| valid_device_name(name))
        .ok_or(LinkCodeError::Invalid("name"))?;
        Ok(Self {
            device_key,
            seal_key,
            secret,
            name,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code() -> LinkCode {
        LinkCode {
            device_key: [1; 32],
            seal_key: [2; 32],
            secret: [3; 32],
            name: "laptop 💻".into(),
        }
    }

    #[test]
    fn round_trips_and_hides_the_secret() {
        let text = code().to_string();
        assert!(text.starts_with("miyu-link://device?v=1&"));
        assert_eq!(text.parse::<LinkCode>().unwrap(), code());
        assert!(!format!("{:?}", code()).contains(&text::encode(&[3; 32])));
    }

    #[test]
    fn names_what_is_wrong() {
        let good = code().to_string();
        assert_eq!("miyu://x".parse::<LinkCode>(), Err(LinkCodeError::Scheme));
        assert_eq!(
            good.replace("v=1", "v=2").parse::<LinkCode>(),
            Err(LinkCodeError::UnsupportedVersion("2".into()))
        );
        let cut = good.split("&secret=").next().unwrap().to_string();
        assert_eq!(
            cut.parse::<LinkCode>(),
            Err(LinkCodeError::Missing("secret"))
        );
        assert_eq!(
            format!("{cut}&secret=abc&name=x").parse::<LinkCode>(),
            Err(LinkCodeError::Invalid("secret"))
        );
        let unnamed = good.split("&name=").next().unwrap().to_string();
        let control = format!("{unnamed}&name={}", text::encode(b"a\nb"));
        assert_eq!(
            control.parse::<LinkCode>(),
            Err(LinkCodeError::Invalid("name"))
        );
        let reversed = format!(
            "{unnamed}&name={}",
            text::encode("pad\u{202E}txt".as_bytes())
        );
        assert_eq!(
            reversed.parse::<LinkCode>(),
            Err(LinkCodeError::Invalid("name"))
        );
        assert_eq!(
            "x".repeat(2000).parse::<LinkCode>(),
            Err(LinkCodeError::TooLong)
        );
    }
}
