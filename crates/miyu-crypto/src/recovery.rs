//! Recovering an account when all its devices are lost, and its backups.
//!
//! At account creation the first device draws a **recovery key**: 256 random bits, shown to the
//! user as text that also names the account. From it (and, if the user chose one, a recovery
//! passphrase) come three keys by HKDF-SHA256 (RFC 5869): one the server checks before it hands
//! out the recovery bundle (it stores only SHA-256 of it), one that seals the bundle (the
//! identity key and the account's name), and one that seals backups. From the key alone comes
//! the bundle's *locator*, under which the server keeps it: without the key nobody can ask for
//! the bundle, let alone spend the account's few wrong tries. A passphrase is first
//! stretched with Argon2id (64 MiB, 3 passes) salted with the recovery key, so that the key
//! alone does not open the account. Every sealed item carries a random 32-byte salt from which
//! its own file key is derived, so a key never seals two plaintexts.
//!
//! A backup is a chain of segments: a whole history, then changes. Each segment's key also
//! depends on where it sits in its chain (its index and the digest of the segment before it),
//! so a segment opens only in its own place: a server cannot reorder segments, swap one for
//! another or leave one out of the middle without the restore failing. It can still hand out
//! fewer segments from the end, or an older chain, which only a client remembering the chain
//! would notice.

use hmac::{Hmac, Mac};
use miyu_proto::AccountId;
use rand::RngCore;
use ring::hkdf;
use sha2::{Digest, Sha256};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::file::{self, FileKey};

const TEXT_PREFIX: &str = "miyu-recovery:";
const SALT_LEN: usize = 32;
/// Salt and the plaintext's length.
const HEADER_LEN: usize = SALT_LEN + 8;
/// What the recovery bundle's locator is derived under (see [`RecoveryKey::locator`]).
const LOCATOR_LABEL: &[u8] = b"miyu recovery locator v1";
/// What a backup segment's place in its chain is bound under (see [`ChainLink`]).
const SEGMENT_LABEL: &[u8] = b"miyu backup segment v1";

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RecoveryError {
    #[error("not a recovery key: {0}")]
    BadText(&'static str),
    #[error("deriving the recovery keys failed")]
    Derive,
    #[error("the recovery key or passphrase does not open this")]
    Open,
}

/// An account's recovery key. Wiped from memory when dropped.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct RecoveryKey([u8; 32]);

impl RecoveryKey {
    pub fn generate() -> Self {
        let mut key = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut key);
        Self(key)
    }

    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// `miyu-recovery:ACCOUNT:KEY`, the key in base32 in groups of four for writing down.
    pub fn to_text(&self, account: &AccountId) -> Zeroizing<String> {
        let encoded = Zeroizing::new(
            data_encoding::BASE32_NOPAD
                .encode(&self.0)
                .to_ascii_lowercase(),
        );
        let grouped: Vec<&str> = encoded
            .as_bytes()
            .chunks(4)
            .map(|chunk| std::str::from_utf8(chunk).unwrap_or_default())
            .collect();
        Zeroizing::new(format!("{TEXT_PREFIX}{account}:{}", grouped.join("-")))
    }

    /// Reads what [`to_text`](Self::to_text) wrote (any letter case, with or without the
    /// dashes and spaces).
    pub fn parse(text: &str) -> Result<(AccountId, Self), RecoveryError> {
        let lowered = Zeroizing::new(text.trim().to_ascii_lowercase());
        let rest = lowered
            .strip_prefix(TEXT_PREFIX)
            .ok_or(RecoveryError::BadText("it starts with miyu-recovery:"))?;
        let (account, key) = rest
            .split_once(':')
            .ok_or(RecoveryError::BadText("it names the account"))?;
        let account: AccountId = account
            .trim()
            .parse()
            .map_err(|_| RecoveryError::BadText("the account id is malformed"))?;
        let compact = Zeroizing::new(
            key.chars()
                .filter(|c| !matches!(c, '-' | ' '))
                .collect::<String>()
                .to_ascii_uppercase(),
        );
        let bytes = Zeroizing::new(
            data_encoding::BASE32_NOPAD
                .decode(compact.as_bytes())
                .map_err(|_| RecoveryError::BadText("the key is malformed"))?,
        );
        let key: [u8; 32] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| RecoveryError::BadText("the key has the wrong length"))?;
        Ok((account, Self(key)))
    }

    /// Where the server keeps the account's recovery bundle: derived from the key alone, not
    /// the passphrase, so that only whoever holds the key can even ask for the bundle (and
    /// spend the account's wrong tries).
    pub fn locator(&self, account: &AccountId) -> [u8; 32] {
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, account.as_bytes()).extract(&self.0);
        let mut locator = [0u8; 32];
        prk.expand(&[LOCATOR_LABEL], Len(32))
            .and_then(|okm| okm.fill(&mut locator))
            .expect("HKDF-SHA256 gives 32 bytes");
        locator
    }
}

/// The keys a recovery key (and passphrase) give for one account.
pub struct RecoverySecrets {
    auth: Zeroizing<[u8; 32]>,
    bundle: Zeroizing<[u8; 32]>,
    backup: Zeroizing<[u8; 32]>,
}

struct Len(usize);

impl hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

impl RecoverySecrets {
    pub fn derive(
        key: &RecoveryKey,
        passphrase: Option<&str>,
        account: &AccountId,
    ) -> Result<Self, RecoveryError> {
        let mut input = Zeroizing::new(key.0.to_vec());
        if let Some(passphrase) = passphrase {
            let params = argon2::Params::new(64 * 1024, 3, 1, Some(32))
                .map_err(|_| RecoveryError::Derive)?;
            let argon =
                argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
            let mut stretched = Zeroizing::new([0u8; 32]);
            argon
                .hash_password_into(passphrase.as_bytes(), &key.0, stretched.as_mut())
                .map_err(|_| RecoveryError::Derive)?;
            input.extend_from_slice(stretched.as_slice());
        }
        let salt = hkdf::Salt::new(hkdf::HKDF_SHA256, account.as_bytes());
        let prk = salt.extract(&input);
        let expand = |label: &[u8]| -> Result<Zeroizing<[u8; 32]>, RecoveryError> {
            let info = [b"miyu recovery v1 ".as_slice(), label];
            let mut out = Zeroizing::new([0u8; 32]);
            prk.expand(&info, Len(32))
                .and_then(|okm| okm.fill(out.as_mut()))
                .map_err(|_| RecoveryError::Derive)?;
            Ok(out)
        };
        Ok(Self {
            auth: expand(b"auth")?,
            bundle: expand(b"bundle")?,
            backup: expand(b"backup")?,
        })
    }

    /// What `Recover` presents to the server.
    pub fn auth_key(&self) -> &[u8; 32] {
        &self.auth
    }

    /// What the server keeps to check it: SHA-256 of the auth key.
    pub fn verifier(&self) -> [u8; 32] {
        Sha256::digest(self.auth.as_slice()).into()
    }

    pub fn seal_bundle(&self, plaintext: &[u8]) -> Result<Vec<u8>, RecoveryError> {
        seal(&self.bundle, plaintext, &[])
    }

    pub fn open_bundle(&self, sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, RecoveryError> {
        open(&self.bundle, sealed, &[]).map(|(plaintext, _)| plaintext)
    }

    /// The key backups are sealed under, kept by the device that makes them (the passphrase,
    /// if any, is not).
    pub fn backup_key(&self) -> BackupKey {
        BackupKey(self.backup.clone())
    }
}

/// Where a backup segment sits in its chain: the first (a whole history) has index 0 and no
/// segment before it, each later one the next index and the digest of the one before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChainLink {
    pub index: u32,
    /// [`SealedSegment::digest`] of the segment before; zeros before the first.
    pub previous: [u8; 32],
}

impl ChainLink {
    /// The place of a chain's first segment.
    pub const FIRST: Self = Self {
        index: 0,
        previous: [0; 32],
    };

    /// The place right after the segment at this place whose digest is `digest`.
    pub fn next(&self, digest: [u8; 32]) -> Option<Self> {
        Some(Self {
            index: self.index.checked_add(1)?,
            previous: digest,
        })
    }

    /// What the segment's item key is bound to besides its salt.
    fn context(&self) -> Vec<u8> {
        [
            SEGMENT_LABEL,
            &self.index.to_be_bytes(),
            self.previous.as_slice(),
        ]
        .concat()
    }
}

/// A backup segment ready to upload, and the digest the next segment is bound to.
pub struct SealedSegment {
    pub blob: Vec<u8>,
    /// SHA-256 of the sealed item without its padding: salt, length and ciphertext.
    pub digest: [u8; 32],
}

/// A backup segment opened at its place, and its digest.
pub struct OpenedSegment {
    pub plaintext: Zeroizing<Vec<u8>>,
    pub digest: [u8; 32],
}

/// The key an account's backups are sealed under.
pub struct BackupKey(Zeroizing<[u8; 32]>);

impl BackupKey {
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(Zeroizing::new(bytes))
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Seals one segment of a backup for its place in the chain: the blob to upload.
    pub fn seal_segment(
        &self,
        plaintext: &[u8],
        link: &ChainLink,
    ) -> Result<SealedSegment, RecoveryError> {
        let blob = seal(&self.0, plaintext, &link.context())?;
        let end = usize::try_from(sealed_len(plaintext.len() as u64)?)
            .map_err(|_| RecoveryError::Derive)?;
        let digest = Sha256::digest(blob.get(..end).ok_or(RecoveryError::Derive)?).into();
        Ok(SealedSegment { blob, digest })
    }

    /// Opens a segment from its blob, or from the first [`sealed_len`] bytes of it, if it was
    /// sealed for exactly this place in the chain.
    pub fn open_segment(
        &self,
        blob: &[u8],
        link: &ChainLink,
    ) -> Result<OpenedSegment, RecoveryError> {
        let (plaintext, item) = open(&self.0, blob, &link.context())?;
        Ok(OpenedSegment {
            plaintext,
            digest: Sha256::digest(item).into(),
        })
    }
}

/// How many bytes at the start of a sealed item of `size` plaintext bytes hold it (the rest
/// of its blob is padding).
pub fn sealed_len(size: u64) -> Result<u64, RecoveryError> {
    let layout = file::Layout::new(size, file::DEFAULT_CHUNK).map_err(|_| RecoveryError::Open)?;
    Ok(HEADER_LEN as u64 + layout.ciphertext_len())
}

/// HMAC-SHA256(key, salt ‖ context): the salt has a fixed length, so the two never run into
/// each other.
fn item_key(key: &[u8; 32], salt: &[u8], context: &[u8]) -> FileKey {
    let mut mac =
        <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes a key of any length");
    mac.update(salt);
    mac.update(context);
    FileKey::from_bytes(mac.finalize().into_bytes().into())
}

/// Salt, then the plaintext's length (8 bytes, big endian), then the file-sealed plaintext
/// with its padding. The item opens only with the same `context`.
fn seal(key: &[u8; 32], plaintext: &[u8], context: &[u8]) -> Result<Vec<u8>, RecoveryError> {
    let mut salt = [0u8; SALT_LEN];
    rand::rngs::OsRng.fill_bytes(&mut salt);
    let sealed = file::seal_all(&item_key(key, &salt, context), plaintext)
        .map_err(|_| RecoveryError::Derive)?;
    Ok([
        salt.as_slice(),
        &(plaintext.len() as u64).to_be_bytes(),
        &sealed,
    ]
    .concat())
}

/// The plaintext, and the sealed item it came from without its padding.
fn open<'a>(
    key: &[u8; 32],
    sealed: &'a [u8],
    context: &[u8],
) -> Result<(Zeroizing<Vec<u8>>, &'a [u8]), RecoveryError> {
    let (header, ciphertext) = sealed
        .split_at_checked(HEADER_LEN)
        .ok_or(RecoveryError::Open)?;
    let (salt, length) = header.split_at(SALT_LEN);
    let length = u64::from_be_bytes(length.try_into().map_err(|_| RecoveryError::Open)?);
    let end = usize::try_from(sealed_len(length)?).map_err(|_| RecoveryError::Open)?;
    let item = sealed.get(..end).ok_or(RecoveryError::Open)?;
    let ciphertext = ciphertext
        .get(..end.saturating_sub(HEADER_LEN))
        .ok_or(RecoveryError::Open)?;
    let plaintext = file::open_all(&item_key(key, salt, context), length, ciphertext)
        .map(Zeroizing::new)
        .map_err(|_| RecoveryError::Open)?;
    Ok((plaintext, item))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn account() -> AccountId {
        AccountId::from_identity_key(&[5; 32])
    }

    #[test]
    fn a_recovery_key_survives_writing_down_and_opens_only_its_own_bundle() {
        let key = RecoveryKey::generate();
        let text = key.to_text(&account());
        let (read_account, read) = RecoveryKey::parse(&text.to_ascii_uppercase()).unwrap();
        assert_eq!(read_account, account());
        assert_eq!(read.as_bytes(), key.as_bytes());
        assert!(RecoveryKey::parse("miyu-recovery:nonsense").is_err());

        let secrets = RecoverySecrets::derive(&key, None, &account()).unwrap();
        let bundle = secrets.seal_bundle(b"identity and name").unwrap();
        assert_eq!(
            secrets.open_bundle(&bundle).unwrap().as_slice(),
            b"identity and name"
        );
        // Sealing twice never gives the same bytes (a fresh salt, so a fresh key).
        assert_ne!(secrets.seal_bundle(b"identity and name").unwrap(), bundle);
        // Another key, the same key for another account, or a passphrase it was not made
        // with: the bundle does not open, and the server's check differs.
        for other in [
            RecoverySecrets::derive(&RecoveryKey::generate(), None, &account()).unwrap(),
            RecoverySecrets::derive(&key, None, &AccountId::from_identity_key(&[6; 32])).unwrap(),
            RecoverySecrets::derive(&key, Some("a passphrase"), &account()).unwrap(),
        ] {
            assert!(other.open_bundle(&bundle).is_err());
            assert_ne!(other.verifier(), secrets.verifier());
        }
        let mut altered = bundle.clone();
        let last = altered.len() - 1;
        altered[SALT_LEN + 8] ^= 1;
        altered[last] ^= 1;
        assert!(secrets.open_bundle(&altered).is_err());
        assert!(secrets.open_bundle(&bundle[..10]).is_err());
        assert_eq!(
            secrets.verifier(),
            <[u8; 32]>::from(Sha256::digest(secrets.auth_key()))
        );
    }

    #[test]
    fn the_locator_comes_from_the_key_and_account_alone() {
        let key = RecoveryKey::generate();
        let locator = key.locator(&account());
        // The same key finds the same bundle again; no passphrase goes into it, so a key whose
        // passphrase is forgotten still finds the bundle (and a wrong one counts as a try).
        assert_eq!(
            RecoveryKey::from_bytes(*key.as_bytes()).locator(&account()),
            locator
        );
        assert_ne!(RecoveryKey::generate().locator(&account()), locator);
        assert_ne!(
            key.locator(&AccountId::from_identity_key(&[6; 32])),
            locator
        );
        // Nor is it any key the server could use: neither the key it checks nor its hash.
        for passphrase in [None, Some("a passphrase")] {
            let secrets = RecoverySecrets::derive(&key, passphrase, &account()).unwrap();
            assert_ne!(secrets.auth_key(), &locator);
            assert_ne!(secrets.verifier(), locator);
        }
        assert_ne!(&locator, key.as_bytes());
    }

    #[test]
    fn a_backup_segment_opens_from_its_blob_or_its_announced_start() {
        let key = RecoveryKey::generate();
        let secrets = RecoverySecrets::derive(&key, Some("second factor"), &account()).unwrap();
        let backup = secrets.backup_key();
        let history: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let sealed = backup.seal_segment(&history, &ChainLink::FIRST).unwrap();
        let opened = backup
            .open_segment(&sealed.blob, &ChainLink::FIRST)
            .unwrap();
        assert_eq!(opened.plaintext.as_slice(), history.as_slice());
        assert_eq!(opened.digest, sealed.digest);
        let start = sealed_len(history.len() as u64).unwrap() as usize;
        assert!(sealed.blob.len() > start, "the blob is padded");
        assert_eq!(
            sealed.digest,
            <[u8; 32]>::from(Sha256::digest(&sealed.blob[..start])),
            "the digest leaves the padding out"
        );
        let from_start = backup
            .open_segment(&sealed.blob[..start], &ChainLink::FIRST)
            .unwrap();
        assert_eq!(from_start.plaintext.as_slice(), history.as_slice());
        assert_eq!(from_start.digest, sealed.digest);
        assert!(
            backup
                .open_segment(&sealed.blob[..start - 1], &ChainLink::FIRST)
                .is_err()
        );
        assert!(
            secrets.open_bundle(&sealed.blob).is_err(),
            "a backup is not a bundle"
        );
        let other = RecoverySecrets::derive(&key, None, &account()).unwrap();
        assert!(
            other
                .backup_key()
                .open_segment(&sealed.blob, &ChainLink::FIRST)
                .is_err()
        );
    }

    #[test]
    fn a_segment_opens_only_at_its_place_in_the_chain() {
        let backup = RecoverySecrets::derive(&RecoveryKey::generate(), None, &account())
            .unwrap()
            .backup_key();
        let first = backup
            .seal_segment(b"everything", &ChainLink::FIRST)
            .unwrap();
        let second_link = ChainLink::FIRST.next(first.digest).unwrap();
        let second = backup.seal_segment(b"what changed", &second_link).unwrap();
        let third_link = second_link.next(second.digest).unwrap();
        assert_eq!(third_link.index, 2);
        let third = backup.seal_segment(b"more changes", &third_link).unwrap();

        // In order, each opens and gives the digest the next one is bound to.
        let mut link = ChainLink::FIRST;
        for (segment, plaintext) in [
            (&first, b"everything".as_slice()),
            (&second, b"what changed"),
            (&third, b"more changes"),
        ] {
            let opened = backup.open_segment(&segment.blob, &link).unwrap();
            assert_eq!(opened.plaintext.as_slice(), plaintext);
            link = link.next(opened.digest).unwrap();
        }
        // Out of order, in another chain's place or after a segment left out: none opens.
        let other_first = backup
            .seal_segment(b"everything", &ChainLink::FIRST)
            .unwrap();
        assert_ne!(other_first.digest, first.digest);
        for (segment, link) in [
            (&second, ChainLink::FIRST),
            (&third, second_link),
            (&first, second_link),
            (&second, ChainLink::FIRST.next(other_first.digest).unwrap()),
            (&third, ChainLink::FIRST.next(first.digest).unwrap()),
            (
                &second,
                ChainLink {
                    index: 2,
                    previous: first.digest,
                },
            ),
        ] {
            assert!(backup.open_segment(&segment.blob, &link).is_err());
        }
        assert_eq!(
            ChainLink {
                index: u32::MAX,
                previous: [0; 32]
            }
            .next([1; 32]),
            None
        );
    }
}
