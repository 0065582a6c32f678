//! Domain identifiers. A value that exists is valid: constructors check, users don't have to.

use std::fmt;
use std::str::FromStr;

use sha2::{Digest, Sha256};

use crate::text;

/// Why a piece of text or bytes is not an identifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdError {
    #[error("an account id is 26 base32 characters")]
    BadAccountId,
    #[error("a device id is 16 bytes")]
    BadDeviceId,
    #[error("a group id is 16 to 64 bytes")]
    BadGroupId,
    #[error("an identity fingerprint is 52 base32 characters")]
    BadFingerprint,
}

fn tagged_sha256(tag: &[u8], data: &[u8]) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(tag);
    hasher.update(data);
    hasher.finalize().into()
}

fn truncated<const N: usize>(digest: [u8; 32]) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&digest[..N]);
    out
}

/// An account: the hash of its Ed25519 identity key, shown as 26 base32 characters.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AccountId([u8; 16]);

impl AccountId {
    pub fn from_identity_key(identity_key: &[u8; 32]) -> Self {
        Self(truncated(tagged_sha256(
            b"miyu account id v1",
            identity_key,
        )))
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, IdError> {
        bytes
            .try_into()
            .map(Self)
            .map_err(|_| IdError::BadAccountId)
    }

    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }
}

impl fmt::Display for AccountId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&text::encode(&self.0))
    }
}

impl fmt::Debug for AccountId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AccountId({self})")
    }
}

impl FromStr for AccountId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        text::decode_array(s).map(Self).ok_or(IdError::BadAccountId)
    }
}

/// A device: the hash of its Ed25519 device key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceId([u8; 16]);

impl DeviceId {
    pub fn from_device_key(device_key: &[u8; 32]) -> Self {
        Self(truncated(tagged_sha256(b"miyu device id v1", device_key)))
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, IdError> {
        bytes.try_into().map(Self).map_err(|_| IdError::BadDeviceId)
    }

    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&text::encode(&self.0))
    }
}

impl FromStr for DeviceId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        text::decode_array(s).map(Self).ok_or(IdError::BadDeviceId)
    }
}

impl fmt::Debug for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DeviceId({self})")
    }
}

/// The full SHA-256 fingerprint of an identity key, carried in invite links and checked by the
/// invitee before it trusts anything the server hands out.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct IdentityFingerprint([u8; 32]);

impl IdentityFingerprint {
    pub fn of(identity_key: &[u8; 32]) -> Self {
        Self(tagged_sha256(b"miyu identity fingerprint v1", identity_key))
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Display for IdentityFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&text::encode(&self.0))
    }
}

impl fmt::Debug for IdentityFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "IdentityFingerprint({self})")
    }
}

impl FromStr for IdentityFingerprint {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        text::decode_array(s)
            .map(Self)
            .ok_or(IdError::BadFingerprint)
    }
}

/// An MLS group, chosen at random by its creator.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GroupId(Vec<u8>);

impl GroupId {
    pub const MIN_LEN: usize = 16;
    pub const MAX_LEN: usize = 64;

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, IdError> {
        if (Self::MIN_LEN..=Self::MAX_LEN).contains(&bytes.len()) {
            Ok(Self(bytes.to_vec()))
        } else {
            Err(IdError::BadGroupId)
        }
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Display for GroupId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&text::encode(&self.0))
    }
}

impl FromStr for GroupId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        text::decode_vec(s, Self::MIN_LEN, Self::MAX_LEN)
            .map(Self)
            .ok_or(IdError::BadGroupId)
    }
}

impl fmt::Debug for GroupId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "GroupId({self})")
    }
}

/// An MLS epoch of a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Epoch(pub u64);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn account_id_text_round_trips() {
        let id = AccountId::from_identity_key(&[1; 32]);
        let text = id.to_string();
        assert_eq!(text.len(), 26);
        assert_eq!(text.parse::<AccountId>(), Ok(id));
        assert_eq!("short".parse::<AccountId>(), Err(IdError::BadAccountId));
    }

    #[test]
    fn ids_of_different_kinds_never_coincide_for_one_key() {
        let key = [9; 32];
        assert_ne!(
            AccountId::from_identity_key(&key).as_bytes(),
            DeviceId::from_device_key(&key).as_bytes()
        );
    }

    #[test]
    fn group_id_length_is_checked() {
        assert!(GroupId::from_bytes(&[0; 15]).is_err());
        assert!(GroupId::from_bytes(&[0; 16]).is_ok());
        assert!(GroupId::from_bytes(&[0; 64]).is_ok());
        assert!(GroupId::from_bytes(&[0; 65]).is_err());
    }
}
