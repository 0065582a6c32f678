//! The key that encrypts a profile's database at rest (SQLCipher: every page, the WAL and the
//! OpenMLS tables included). It is derived from the user's passphrase with Argon2id, or, for
//! those who choose convenience, kept in a key file next to the database.
//!
//! The `vault` file in the profile says which, and holds the Argon2id salt and parameters; it
//! holds nothing secret. A `key` file exists only for profiles created without a passphrase.
//!
//! The app lock: [`unlock`] keeps a passphrase profile's derived key (never the passphrase) in
//! the kernel's keyring for a while, so commands need no passphrase until it expires or [`lock`]
//! removes it. The kernel forgets it at reboot, which is why `--no-passphrase` profiles still
//! need their key file.

use std::path::Path;
use std::time::Duration;

use zeroize::Zeroizing;

use crate::{Error, db, keyring};

/// How a new profile's database key is protected.
pub enum Protection {
    /// Derived from this passphrase with Argon2id; nothing on disk reveals it.
    Passphrase(Zeroizing<String>),
    /// A random key stored in the profile folder: anyone who can read the folder can read the
    /// database. For people who choose convenience over protection against device theft.
    DangerKeyFile,
}

const VAULT_FILE: &str = "vault";
const KEY_FILE: &str = "key";
const HEADER: &str = "miyu vault v1";
/// Argon2id memory cost in KiB (64 MiB), with 3 passes and 1 lane: above the common
/// recommendations for interactive logins, and about a quarter of a second here.
const MEMORY_KIB: u32 = 64 * 1024;
const PASSES: u32 = 3;
/// Passphrases shorter than this are refused.
pub const MIN_PASSPHRASE_CHARS: usize = 8;

/// How long [`unlock`] keeps the key unless told otherwise.
pub const DEFAULT_UNLOCK: Duration = Duration::from_secs(15 * 60);
/// The longest [`unlock`] keeps the key.
pub const MAX_UNLOCK: Duration = Duration::from_secs(24 * 3600);

/// What [`unlock`] or [`lock`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum AppLock {
    /// The database key is kept for this long: commands on the profile do not ask for the
    /// passphrase meanwhile.
    Unlocked(Duration),
    /// The kept key was removed.
    Locked,
    /// No key was kept, so nothing changed.
    AlreadyLocked,
    /// The profile has no passphrase (its key is in a file): there is nothing to lock or unlock.
    NoPassphrase,
}

/// A 256-bit database key, wiped from memory when dropped.
pub(crate) struct DatabaseKey(Zeroizing<[u8; 32]>);

impl DatabaseKey {
    /// The statement that hands the key to SQLCipher; it must run before anything else.
    pub(crate) fn pragma(&self) -> Zeroizing<String> {
        let mut hex = Zeroizing::new(String::with_capacity(64));
        for byte in self.0.iter() {
            hex.push(char::from_digit(u32::from(byte >> 4), 16).unwrap_or('0'));
            hex.push(char::from_digit(u32::from(byte & 0xf), 16).unwrap_or('0'));
        }
        Zeroizing::new(format!("PRAGMA key = \"x'{}'\";", hex.as_str()))
    }
}

fn io(context: String) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Io { context, source }
}

fn random<const N: usize>() -> [u8; N] {
    use rand::RngCore;
    let mut bytes = [0u8; N];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    bytes
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io(format!("creating {}", path.display())))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(io(format!("writing {}", path.display())))
}

fn memory_kib() -> u32 {
    // Tests create hundreds of profiles; they may ask for a cheaper (weaker) derivation.
    std::env::var("MIYU_DANGER_KDF_MEMORY_KIB")
        .ok()
        .and_then(|value| value.parse().ok())
        .filter(|&kib| kib >= 8 * 1024)
        .unwrap_or(MEMORY_KIB)
}

fn derive(
    passphrase: &str,
    salt: &[u8],
    memory_kib: u32,
    passes: u32,
) -> Result<DatabaseKey, Error> {
    let params = argon2::Params::new(memory_kib, passes, 1, Some(32))
        .map_err(|error| Error::Usage(format!("bad key derivation parameters: {error}")))?;
    let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let mut key = Zeroizing::new([0u8; 32]);
    argon
        .hash_password_into(passphrase.as_bytes(), salt, key.as_mut())
        .map_err(|error| Error::Usage(format!("key derivation failed: {error}")))?;
    Ok(DatabaseKey(key))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Sets up a new profile's key and returns it.
pub(crate) fn create(profile: &Path, protection: &Protection) -> Result<DatabaseKey, Error> {
    match protection {
        Protection::Passphrase(passphrase) => {
            if passphrase.chars().count() < MIN_PASSPHRASE_CHARS {
                return Err(Error::Usage(format!(
                    "a passphrase has at least {MIN_PASSPHRASE_CHARS} characters"
                )));
            }
            let salt: [u8; 16] = random();
            let memory = memory_kib();
            let key = derive(passphrase, &salt, memory, PASSES)?;
            let vault = format!(
                "{HEADER}\nargon2id m={memory} t={PASSES} p=1 salt={}\n",
                hex(&salt)
            );
            write_private(&profile.join(VAULT_FILE), vault.as_bytes())?;
            Ok(key)
        }
        Protection::DangerKeyFile => {
            let key = Zeroizing::new(random::<32>());
            write_private(&profile.join(KEY_FILE), hex(key.as_ref()).as_bytes())?;
            write_private(
                &profile.join(VAULT_FILE),
                format!("{HEADER}\nkeyfile\n").as_bytes(),
            )?;
            Ok(DatabaseKey(key))
        }
    }
}

/// Deletes the key material of a profile whose creation failed.
pub(crate) fn remove(profile: &Path) {
    let _ = std::fs::remove_file(profile.join(VAULT_FILE));
    let _ = std::fs::remove_file(profile.join(KEY_FILE));
}

/// Whether opening this profile needs a passphrase.
pub fn needs_passphrase(profile: &Path) -> bool {
    std::fs::read_to_string(profile.join(VAULT_FILE))
        .map(|text| {
            text.lines()
                .nth(1)
                .is_some_and(|line| line.starts_with("argon2id"))
        })
        .unwrap_or(false)
}

/// Checks `passphrase` by opening the profile's database with it, then keeps the derived database
/// key (not the passphrase) in the kernel's keyring for `duration` (whole seconds, at most
/// [`MAX_UNLOCK`]), replacing a key kept earlier. Fails, changing nothing, where the keyring
/// cannot be used.
pub fn unlock(
    profile: &Path,
    passphrase: Option<&str>,
    duration: Duration,
) -> Result<AppLock, Error> {
    let path = crate::existing_database(profile)?;
    if !needs_passphrase(profile) {
        return Ok(AppLock::NoPassphrase);
    }
    let duration = Duration::from_secs(duration.as_secs());
    if duration.is_zero() || duration > MAX_UNLOCK {
        return Err(Error::Usage(format!(
            "unlock for 1 second to {} hours",
            MAX_UNLOCK.as_secs() / 3600
        )));
    }
    let key = recover(profile, passphrase)?;
    db::check_key(&path, &key)?;
    keyring::store(&keyring_description(profile)?, key.0.as_ref(), duration).map_err(|source| {
        Error::Io {
            context:
                "cannot keep the key in the kernel keyring (commands still take the passphrase)"
                    .into(),
            source,
        }
    })?;
    Ok(AppLock::Unlocked(duration))
}

/// Removes the key [`unlock`] kept for this profile, at once. Locking a locked profile is
/// harmless.
pub fn lock(profile: &Path) -> Result<AppLock, Error> {
    crate::existing_database(profile)?;
    if !needs_passphrase(profile) {
        return Ok(AppLock::NoPassphrase);
    }
    let removed = keyring::remove(&keyring_description(profile)?).map_err(|source| Error::Io {
        context: "cannot reach the kernel keyring".into(),
        source,
    })?;
    Ok(if removed {
        AppLock::Locked
    } else {
        AppLock::AlreadyLocked
    })
}

/// The key [`unlock`] kept for this passphrase profile, if it is still there. The keyring
/// failing counts as no key: the passphrase still works.
pub(crate) fn kept(profile: &Path) -> Option<DatabaseKey> {
    if !needs_passphrase(profile) {
        return None;
    }
    let description = keyring_description(profile).ok()?;
    let bytes = match keyring::read(&description) {
        Ok(bytes) => bytes?,
        Err(error) => {
            tracing::debug!("kernel keyring unavailable: {error}");
            return None;
        }
    };
    match <[u8; 32]>::try_from(bytes.as_slice()) {
        Ok(key) => Some(DatabaseKey(Zeroizing::new(key))),
        Err(_) => {
            forget(profile);
            None
        }
    }
}

/// Removes a kept key that turned out not to open the profile (it was recreated, say).
pub(crate) fn forget(profile: &Path) {
    if let Ok(description) = keyring_description(profile) {
        let _ = keyring::remove(&description);
    }
}

/// Names the profile's key in the keyring: by a hash of the profile folder's canonical path,
/// so that no path shows in `/proc/keys`.
fn keyring_description(profile: &Path) -> Result<String, Error> {
    use sha2::Digest;
    use std::os::unix::ffi::OsStrExt;
    let canonical =
        std::fs::canonicalize(profile).map_err(io(format!("finding {}", profile.display())))?;
    let digest = sha2::Sha256::digest(canonical.as_os_str().as_bytes());
    Ok(format!("miyu:profile:{}", hex(&digest)))
}

/// Recovers the key of an existing profile.
pub(crate) fn recover(profile: &Path, passphrase: Option<&str>) -> Result<DatabaseKey, Error> {
    let path = profile.join(VAULT_FILE);
    let text = std::fs::read_to_string(&path).map_err(io(format!("reading {}", path.display())))?;
    let damaged = || Error::Usage(format!("{} is damaged", path.display()));
    let mut lines = text.lines();
    if lines.next() != Some(HEADER) {
        return Err(damaged());
    }
    let method = lines.next().ok_or_else(damaged)?;
    if method == "keyfile" {
        let key_path = profile.join(KEY_FILE);
        let text = Zeroizing::new(
            std::fs::read_to_string(&key_path)
                .map_err(io(format!("reading {}", key_path.display())))?,
        );
        let bytes = Zeroizing::new(unhex(text.trim()).ok_or_else(damaged)?);
        let key: [u8; 32] = bytes.as_slice().try_into().map_err(|_| damaged())?;
        return Ok(DatabaseKey(Zeroizing::new(key)));
    }
    let mut fields = method.split(' ');
    if fields.next() != Some("argon2id") {
        return Err(damaged());
    }
    let (mut memory, mut passes, mut salt) = (None, None, None);
    for field in fields {
        match field.split_once('=') {
            Some(("m", value)) => memory = value.parse::<u32>().ok(),
            Some(("t", value)) => passes = value.parse::<u32>().ok(),
            Some(("p", "1")) => {}
            Some(("salt", value)) => salt = unhex(value),
            _ => return Err(damaged()),
        }
    }
    let (Some(memory), Some(passes), Some(salt)) = (memory, passes, salt) else {
        return Err(damaged());
    };
    // The file is not authenticated: refuse parameters that would exhaust memory or time.
    if !(8 * 1024..=1024 * 1024).contains(&memory) || !(1..=64).contains(&passes) || salt.len() < 16
    {
        return Err(damaged());
    }
    let passphrase = passphrase.ok_or_else(|| {
        Error::Locked(
            "this profile is protected by a passphrase: type it on a terminal or set MIYU_PASSPHRASE"
                .into(),
        )
    })?;
    derive(passphrase, &salt, memory, passes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_passphrase_profile_unlocks_only_with_its_passphrase() {
        let profile = tempfile::tempdir().unwrap();
        let created = create(
            profile.path(),
            &Protection::Passphrase(Zeroizing::new("correct horse".into())),
        )
        .unwrap();
        assert!(needs_passphrase(profile.path()));
        let again = recover(profile.path(), Some("correct horse")).unwrap();
        assert_eq!(*created.pragma(), *again.pragma());
        let wrong = recover(profile.path(), Some("wrong horse")).unwrap();
        assert_ne!(*created.pragma(), *wrong.pragma());
        assert!(matches!(
            recover(profile.path(), None),
            Err(Error::Locked(_))
        ));
        let vault = std::fs::read_to_string(profile.path().join(VAULT_FILE)).unwrap();
        assert!(!vault.contains("correct"));
    }

    #[test]
    fn short_passphrases_are_refused_and_key_files_work() {
        let profile = tempfile::tempdir().unwrap();
        let short = Protection::Passphrase(Zeroizing::new("short".into()));
        assert!(matches!(
            create(profile.path(), &short),
            Err(Error::Usage(_))
        ));
        let created = create(profile.path(), &Protection::DangerKeyFile).unwrap();
        assert!(!needs_passphrase(profile.path()));
        assert_eq!(
            *created.pragma(),
            *recover(profile.path(), None).unwrap().pragma()
        );
    }

    /// A passphrase profile with an empty database, as `Client::init` would leave it.
    fn profile_with_database(passphrase: &str) -> (tempfile::TempDir, DatabaseKey) {
        let profile = tempfile::tempdir().unwrap();
        let protection = Protection::Passphrase(Zeroizing::new(passphrase.into()));
        let key = create(profile.path(), &protection).unwrap();
        db::open(&crate::database_path(profile.path()), &key).unwrap();
        (profile, key)
    }

    #[test]
    fn an_unlocked_profile_keeps_its_key_until_it_is_locked() {
        if !keyring::usable_in_tests() {
            return;
        }
        let (profile, key) = profile_with_database("correct horse");
        let profile = profile.path();
        assert!(kept(profile).is_none());
        assert_eq!(
            unlock(profile, Some("correct horse"), Duration::from_secs(60)).unwrap(),
            AppLock::Unlocked(Duration::from_secs(60))
        );
        assert_eq!(*kept(profile).unwrap().pragma(), *key.pragma());
        assert_eq!(lock(profile).unwrap(), AppLock::Locked);
        assert!(kept(profile).is_none());
        assert_eq!(lock(profile).unwrap(), AppLock::AlreadyLocked);
    }

    #[test]
    fn unlock_keeps_nothing_for_a_wrong_passphrase_or_a_duration_out_of_range() {
        let (profile, _key) = profile_with_database("correct horse");
        let profile = profile.path();
        assert!(matches!(
            unlock(profile, Some("wrong horse"), DEFAULT_UNLOCK),
            Err(Error::Locked(_))
        ));
        assert!(matches!(
            unlock(profile, None, DEFAULT_UNLOCK),
            Err(Error::Locked(_))
        ));
        for duration in [Duration::ZERO, Duration::from_millis(999), MAX_UNLOCK * 2] {
            assert!(matches!(
                unlock(profile, Some("correct horse"), duration),
                Err(Error::Usage(_))
            ));
        }
        assert!(kept(profile).is_none());
    }

    #[test]
    fn key_file_profiles_have_nothing_to_lock() {
        let profile = tempfile::tempdir().unwrap();
        let key = create(profile.path(), &Protection::DangerKeyFile).unwrap();
        db::open(&crate::database_path(profile.path()), &key).unwrap();
        assert_eq!(
            unlock(profile.path(), None, DEFAULT_UNLOCK).unwrap(),
            AppLock::NoPassphrase
        );
        assert_eq!(lock(profile.path()).unwrap(), AppLock::NoPassphrase);
        assert!(kept(profile.path()).is_none());
    }

    #[test]
    fn damaged_vault_files_give_an_error_not_a_panic() {
        let profile = tempfile::tempdir().unwrap();
        for text in [
            "",
            "miyu vault v1\n",
            "miyu vault v1\nargon2id m=x salt=zz\n",
            "miyu vault v1\nargon2id m=8192 t=1 p=2 salt=00\n",
        ] {
            std::fs::write(profile.path().join(VAULT_FILE), text).unwrap();
            assert!(
                recover(profile.path(), Some("passphrase")).is_err(),
                "{text:?}"
            );
        }
    }
}
