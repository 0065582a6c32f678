//! The kernel's key retention service on Linux (the `add_key` and `keyctl` system calls), where
//! `vault` keeps an unlocked profile's database key for a while. Keys go into the user's
//! keyring as `user` keys: every process of the same user can find them, nobody else can, and
//! the kernel drops them at their timeout, when they are invalidated, or at reboot.
//!
//! What it does not do: anything on other systems, where every call fails as unsupported.

// The only unsafe code in the workspace: the system calls below, each with its safety argument.
#![allow(unsafe_code)]
#![warn(clippy::undocumented_unsafe_blocks)]

use std::io;
use std::time::Duration;

use zeroize::Zeroizing;

/// Keeps `secret` under `description` in the user's keyring for `lifetime` (whole seconds, at
/// least one), replacing a key kept there under the same description.
pub(crate) fn store(description: &str, secret: &[u8], lifetime: Duration) -> io::Result<()> {
    let seconds = u32::try_from(lifetime.as_secs())
        .ok()
        .filter(|&seconds| seconds > 0)
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "a key lasts from one second to 2^32 - 1 seconds",
            )
        })?;
    system::store(description, secret, seconds)
}

/// The secret kept under `description`, unless there is none or it has expired.
pub(crate) fn read(description: &str) -> io::Result<Option<Zeroizing<Vec<u8>>>> {
    system::read(description)
}

/// Removes the key kept under `description` at once; false if there was none.
pub(crate) fn remove(description: &str) -> io::Result<bool> {
    system::remove(description)
}

#[cfg(target_os = "linux")]
mod system {
    use std::ffi::{CStr, CString, c_long, c_void};
    use std::io;

    use zeroize::Zeroizing;

    const KEY_TYPE: &CStr = c"user";
    /// The longest secret `read` returns.
    const MAX_SECRET: usize = 64;
    /// The possessor (a process that reaches the key from its own keyrings) may do everything;
    /// other processes of the same user may view, read, update, find and time out the key
    /// (they need that when their session keyring does not link the user keyring); group and
    /// others get nothing. Layout: possessor, user, group, other, one byte each.
    pub(super) const PERMISSIONS: u32 = 0x3f2f_0000;

    pub(super) fn store(description: &str, secret: &[u8], seconds: u32) -> io::Result<()> {
        let description = c_string(description)?;
        // The key is made in this process's own keyring and linked into the user's only once its
        // permissions and timeout are set, so a process killed half-way leaves no key behind
        // that never expires.
        let serial = add_key(&description, secret, libc::KEY_SPEC_PROCESS_KEYRING)?;
        let finished = keyctl(libc::KEYCTL_SETPERM, serial, c_long::from(PERMISSIONS))
            .and_then(|_| keyctl(libc::KEYCTL_SET_TIMEOUT, serial, c_long::from(seconds)))
            // Linking displaces a key with the same type and description from the user's
            // keyring; the kernel then destroys it, as nothing else refers to it.
            .and_then(|_| {
                keyctl(
                    libc::KEYCTL_LINK,
                    serial,
                    c_long::from(libc::KEY_SPEC_USER_KEYRING),
                )
            });
        match finished {
            Ok(_) => {
                let _ = keyctl(
                    libc::KEYCTL_UNLINK,
                    serial,
                    c_long::from(libc::KEY_SPEC_PROCESS_KEYRING),
                );
                Ok(())
            }
            Err(error) => {
                let _ = keyctl(libc::KEYCTL_INVALIDATE, serial, 0);
                Err(error)
            }
        }
    }

    pub(super) fn read(description: &str) -> io::Result<Option<Zeroizing<Vec<u8>>>> {
        let Some(serial) = search(&c_string(description)?)? else {
            return Ok(None);
        };
        let mut buffer = Zeroizing::new(vec![0u8; MAX_SECRET]);
        // SAFETY: the kernel writes at most `buffer.len()` bytes into `buffer`, which is live and
        // exclusively borrowed for the call; it keeps no pointer to it.
        let length = unsafe {
            libc::syscall(
                libc::SYS_keyctl,
                c_long::from(libc::KEYCTL_READ),
                serial,
                buffer.as_mut_ptr().cast::<c_void>(),
                buffer.len(),
                0 as c_long,
            )
        };
        let length = match checked(length) {
            Ok(length) => length,
            // It expired or was removed since the search.
            Err(error) if gone(&error) => return Ok(None),
            Err(error) => return Err(error),
        };
        // The call returns the whole payload's length even when it did not fit.
        let length = usize::try_from(length)
            .ok()
            .filter(|&length| length <= buffer.len())
            .ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidData, "the kept key is too long")
            })?;
        buffer.truncate(length);
        Ok(Some(buffer))
    }

    pub(super) fn remove(description: &str) -> io::Result<bool> {
        let Some(serial) = search(&c_string(description)?)? else {
            return Ok(false);
        };
        // Invalidation makes the key unfindable at once and has the kernel destroy it, wherever
        // it is linked.
        match keyctl(libc::KEYCTL_INVALIDATE, serial, 0) {
            Ok(_) => Ok(true),
            Err(error) if gone(&error) => Ok(false),
            Err(error) => Err(error),
        }
    }

    /// The key's type, owner, group, permissions and description, as the kernel describes it.
    #[cfg(test)]
    pub(super) fn describe(description: &str) -> io::Result<Option<String>> {
        let Some(serial) = search(&c_string(description)?)? else {
            return Ok(None);
        };
        let mut buffer = vec![0u8; 512];
        // SAFETY: as in `read`: the kernel writes at most `buffer.len()` bytes into it.
        let length = checked(unsafe {
            libc::syscall(
                libc::SYS_keyctl,
                c_long::from(libc::KEYCTL_DESCRIBE),
                serial,
                buffer.as_mut_ptr().cast::<c_void>(),
                buffer.len(),
                0 as c_long,
            )
        })?;
        buffer.truncate(usize::try_from(length).unwrap_or(0).min(buffer.len()));
        let text = String::from_utf8_lossy(&buffer);
        Ok(Some(text.trim_end_matches('\0').to_string()))
    }

    /// The serial number of the key under `description` in the user's keyring.
    fn search(description: &CStr) -> io::Result<Option<c_long>> {
        // SAFETY: the type and description are NUL-terminated strings that outlive the call; the
        // kernel copies them. A destination keyring of 0 means the key is linked nowhere.
        let serial = unsafe {
            libc::syscall(
                libc::SYS_keyctl,
                c_long::from(libc::KEYCTL_SEARCH),
                c_long::from(libc::KEY_SPEC_USER_KEYRING),
                KEY_TYPE.as_ptr(),
                description.as_ptr(),
                0 as c_long,
            )
        };
        match checked(serial) {
            Ok(serial) => Ok(Some(serial)),
            Err(error) if gone(&error) => Ok(None),
            Err(error) => Err(error),
        }
    }

    fn add_key(description: &CStr, secret: &[u8], keyring: i32) -> io::Result<c_long> {
        // SAFETY: the type and description are NUL-terminated strings and `secret` is a live
        // slice of the length given; the kernel copies all three and keeps no pointer.
        checked(unsafe {
            libc::syscall(
                libc::SYS_add_key,
                KEY_TYPE.as_ptr(),
                description.as_ptr(),
                secret.as_ptr().cast::<c_void>(),
                secret.len(),
                c_long::from(keyring),
            )
        })
    }

    /// A `keyctl` operation whose arguments are numbers.
    fn keyctl(operation: u32, first: c_long, second: c_long) -> io::Result<c_long> {
        // SAFETY: with these operations (set permissions, set timeout, link, unlink,
        // invalidate) the kernel reads no memory of this process: all arguments are numbers,
        // and the unused ones are zero.
        checked(unsafe {
            libc::syscall(
                libc::SYS_keyctl,
                c_long::from(operation),
                first,
                second,
                0 as c_long,
                0 as c_long,
            )
        })
    }

    fn checked(result: c_long) -> io::Result<c_long> {
        if result < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(result)
        }
    }

    /// The key does not exist (any more): never made, expired, revoked or invalidated.
    fn gone(error: &io::Error) -> bool {
        matches!(
            error.raw_os_error(),
            Some(libc::ENOKEY | libc::EKEYEXPIRED | libc::EKEYREVOKED)
        )
    }

    fn c_string(description: &str) -> io::Result<CString> {
        CString::new(description)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL in a key description"))
    }
}

/// Whether this machine lets tests use the keyring; a container's seccomp filter may not, and
/// then the caller skips its test, saying so. `MIYU_REQUIRE_KEYRING` (set in CI, which runs
/// where the keyring works) turns that into a failure.
#[cfg(test)]
pub(crate) fn usable_in_tests() -> bool {
    let probe = format!("miyu:test:probe:{}", std::process::id());
    match store(&probe, b"probe", Duration::from_secs(60)) {
        Ok(()) => {
            let _ = remove(&probe);
            true
        }
        Err(error) => {
            assert!(
                std::env::var_os("MIYU_REQUIRE_KEYRING").is_none(),
                "the kernel keyring is required but fails: {error}"
            );
            eprintln!("skipped: the kernel keyring is unavailable here: {error}");
            false
        }
    }
}

#[cfg(not(target_os = "linux"))]
mod system {
    use std::io;

    use zeroize::Zeroizing;

    fn unsupported() -> io::Error {
        io::Error::new(
            io::ErrorKind::Unsupported,
            "keeping a key in the kernel is supported on Linux only",
        )
    }

    pub(super) fn store(_description: &str, _secret: &[u8], _seconds: u32) -> io::Result<()> {
        Err(unsupported())
    }

    pub(super) fn read(_description: &str) -> io::Result<Option<Zeroizing<Vec<u8>>>> {
        Err(unsupported())
    }

    pub(super) fn remove(_description: &str) -> io::Result<bool> {
        Err(unsupported())
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    /// A description no other test (or earlier run) uses.
    fn unique_description() -> String {
        use rand::RngCore;
        let mut bytes = [0u8; 8];
        rand::rngs::OsRng.fill_bytes(&mut bytes);
        let suffix: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        format!("miyu:test:{suffix}")
    }

    /// Removes the key when the test ends, however it ends.
    struct Cleanup(String);

    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = remove(&self.0);
        }
    }

    #[test]
    fn a_stored_key_reads_back_until_it_is_removed() {
        if !usable_in_tests() {
            return;
        }
        let cleanup = Cleanup(unique_description());
        let description = cleanup.0.as_str();
        assert!(read(description).unwrap().is_none());
        assert!(!remove(description).unwrap(), "nothing to remove yet");
        store(description, &[7u8; 32], Duration::from_secs(600)).unwrap();
        assert_eq!(read(description).unwrap().as_deref(), Some(&vec![7u8; 32]));
        // Storing again replaces the key rather than adding a second one.
        store(description, &[9u8; 32], Duration::from_secs(600)).unwrap();
        assert_eq!(read(description).unwrap().as_deref(), Some(&vec![9u8; 32]));
        assert!(remove(description).unwrap());
        assert!(read(description).unwrap().is_none());
        assert!(!remove(description).unwrap(), "removing twice is harmless");
    }

    #[test]
    fn only_the_possessor_and_the_same_user_may_use_a_stored_key() {
        if !usable_in_tests() {
            return;
        }
        let cleanup = Cleanup(unique_description());
        store(&cleanup.0, &[1u8; 32], Duration::from_secs(600)).unwrap();
        let described = system::describe(&cleanup.0).unwrap().unwrap();
        // user;UID;GID;PERMISSIONS;DESCRIPTION
        let fields: Vec<&str> = described.split(';').collect();
        assert_eq!(fields.first(), Some(&"user"), "{described}");
        assert_eq!(fields.last(), Some(&cleanup.0.as_str()), "{described}");
        let permissions = u32::from_str_radix(fields[3], 16).unwrap();
        assert_eq!(permissions, system::PERMISSIONS, "{described}");
        assert_eq!(permissions & 0xffff, 0, "group or others may use it");
    }

    #[test]
    fn a_stored_key_disappears_at_its_timeout() {
        if !usable_in_tests() {
            return;
        }
        let cleanup = Cleanup(unique_description());
        store(&cleanup.0, &[3u8; 32], Duration::from_secs(1)).unwrap();
        let stored_by = std::time::Instant::now();
        // The kernel counts whole seconds: 2 s after storing, the key is surely gone. The
        // passing of that time is the event under test.
        std::thread::sleep(
            (stored_by + Duration::from_secs(2))
                .saturating_duration_since(std::time::Instant::now()),
        );
        assert!(
            read(&cleanup.0).unwrap().is_none(),
            "the key outlived its timeout"
        );
    }

    #[test]
    fn a_lifetime_of_zero_is_refused_because_the_kernel_would_keep_the_key_forever() {
        let description = unique_description();
        let error = store(&description, &[0u8; 32], Duration::from_millis(500)).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidInput);
    }
}
