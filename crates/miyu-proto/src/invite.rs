//! Invite links: how two people connect without phone numbers or a directory.
//!
//! `miyu://invite?v=1&server=HOST:PORT&cert=FP&account=ID&key=IDENTITY_FP&token=TOKEN`
//!
//! The link names the inviter's server (and pins its certificate), the inviter's account and
//! the fingerprint of their identity key, and carries a one-time token that authorises fetching
//! the inviter's key packages. It is a secret until used: whoever holds it can connect.
//!
//! A group's invite link is the same with `&group=1` at the end: connecting through it asks
//! the inviter (an admin) to add us to the group the link was made for.

use std::fmt;
use std::str::FromStr;

use crate::address::{AddressError, ServerAddress, parse_host_port};
use crate::ids::{AccountId, IdentityFingerprint};
use crate::text;

/// Longest link this parser reads; real links are about 250 characters.
const MAX_LINK_LEN: usize = 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InviteError {
    #[error("an invite link starts with miyu://invite?")]
    Scheme,
    #[error("invite link is longer than {MAX_LINK_LEN} characters")]
    TooLong,
    #[error("invite link version {0} is not supported; update miyu")]
    UnsupportedVersion(String),
    #[error("invite link lacks its `{0}` part")]
    Missing(&'static str),
    #[error("invite link has an invalid `{0}` part")]
    Invalid(&'static str),
    #[error("invite link names the server wrongly: {0}")]
    Server(#[from] AddressError),
}

/// A parsed invite link.
#[derive(Clone, PartialEq, Eq)]
pub struct InviteLink {
    pub server: ServerAddress,
    pub account: AccountId,
    pub identity: IdentityFingerprint,
    pub token: [u8; 32],
    /// A group's invite link: using it asks to join that group.
    pub group: bool,
}

impl fmt::Debug for InviteLink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The token is a bearer secret: keep it out of debug output.
        f.debug_struct("InviteLink")
            .field("server", &self.server)
            .field("account", &self.account)
            .field("identity", &self.identity)
            .field("group", &self.group)
            .finish_non_exhaustive()
    }
}

impl fmt::Display for InviteLink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "miyu://invite?v=1&server={}&cert={}&account={}&key={}&token={}",
            self.server.authority(),
            self.server.certificate_fingerprint(),
            self.account,
            self.identity,
            text::encode(&self.token)
        )?;
        if self.group {
            f.write_str("&group=1")?;
        }
        Ok(())
    }
}

impl FromStr for InviteLink {
    type Err = InviteError;

    fn from_str(s: &str) -> Result<Self, InviteError> {
        let s = s.trim();
        if s.len() > MAX_LINK_LEN {
            return Err(InviteError::TooLong);
        }
        let query = s
            .strip_prefix("miyu://invite?")
            .ok_or(InviteError::Scheme)?;
        let mut version = None;
        let mut server = None;
        let mut cert = None;
        let mut account = None;
        let mut key = None;
        let mut token = None;
        let mut group = None;
        for pair in query.split('&') {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            let slot = match name {
                "v" => &mut version,
                "server" => &mut server,
                "cert" => &mut cert,
                "account" => &mut account,
                "key" => &mut key,
                "token" => &mut token,
                "group" => &mut group,
                // Parts from later versions are ignored, so old clients read new links.
                _ => continue,
            };
            *slot = Some(value);
        }
        match version.ok_or(InviteError::Missing("v"))? {
            "1" => {}
            other => {
                return Err(InviteError::UnsupportedVersion(
                    other.chars().take(8).collect(),
                ));
            }
        }
        let (host, port) = parse_host_port(server.ok_or(InviteError::Missing("server"))?)?;
        let certificate =
            ServerAddress::parse_fingerprint(cert.ok_or(InviteError::Missing("cert"))?)?;
        Ok(Self {
            server: ServerAddress::new(&host, port, certificate)?,
            account: account
                .ok_or(InviteError::Missing("account"))?
                .parse()
                .map_err(|_| InviteError::Invalid("account"))?,
            identity: key
                .ok_or(InviteError::Missing("key"))?
                .parse()
                .map_err(|_| InviteError::Invalid("key"))?,
            token: text::decode_array(token.ok_or(InviteError::Missing("token"))?)
                .ok_or(InviteError::Invalid("token"))?,
            group: match group {
                None | Some("0") => false,
                Some("1") => true,
                Some(_) => return Err(InviteError::Invalid("group")),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link() -> InviteLink {
        InviteLink {
            server: ServerAddress::new("127.0.0.1", 7443, [1; 32]).unwrap(),
            account: AccountId::from_identity_key(&[2; 32]),
            identity: IdentityFingerprint::of(&[2; 32]),
            token: [4; 32],
            group: false,
        }
    }

    #[test]
    fn round_trips() {
        let text = link().to_string();
        assert_eq!(text.parse::<InviteLink>().unwrap(), link());
        let group = InviteLink {
            group: true,
            ..link()
        };
        assert!(group.to_string().ends_with("&group=1"));
        assert_eq!(group.to_string().parse::<InviteLink>().unwrap(), group);
    }

    #[test]
    fn debug_output_hides_the_token() {
        let debug = format!("{:?}", link());
        assert!(!debug.contains(&text::encode(&[4; 32])));
    }

    #[test]
    fn names_what_is_wrong() {
        let good = link().to_string();
        assert_eq!("http://x".parse::<InviteLink>(), Err(InviteError::Scheme));
        assert_eq!(
            good.replace("v=1", "v=9").parse::<InviteLink>(),
            Err(InviteError::UnsupportedVersion("9".into()))
        );
        let without_token = good.split("&token=").next().unwrap().to_string();
        assert_eq!(
            without_token.parse::<InviteLink>(),
            Err(InviteError::Missing("token"))
        );
        assert_eq!(
            format!("{without_token}&token=abc").parse::<InviteLink>(),
            Err(InviteError::Invalid("token"))
        );
        assert_eq!(
            "x".repeat(2000).parse::<InviteLink>(),
            Err(InviteError::TooLong)
        );
    }

    #[test]
    fn ignores_parts_from_later_versions() {
        let text = format!("{}&future=1", link());
        assert_eq!(text.parse::<InviteLink>().unwrap(), link());
    }
}
