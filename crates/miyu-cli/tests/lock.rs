//! End-to-end tests of the app lock: `miyu unlock` keeps a profile's database key in the kernel
//! keyring for a while, `miyu lock` removes it. Where the keyring cannot be used (a container's
//! seccomp filter may block it) the tests print "skipped", unless `MIYU_REQUIRE_KEYRING` is set.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::{Server, miyu, miyu_ok};

/// `miyu` without `MIYU_PASSPHRASE` and without a terminal: it can open a passphrase profile
/// only with a kept key.
fn miyu_without_passphrase(profile: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_miyu"))
        .env_remove("MIYU_PASSPHRASE")
        .env("MIYU_DANGER_KDF_MEMORY_KIB", "8192")
        .arg("--profile")
        .arg(profile)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Locks the profile when the test ends, however it ends, so no test leaves a key behind.
struct LockOnDrop(PathBuf);

impl Drop for LockOnDrop {
    fn drop(&mut self) {
        let _ = miyu(&self.0, &["lock"]);
    }
}

/// A new passphrase profile on `server`, locked again when the returned guard drops.
fn profile(root: &Path, name: &str, server: &Server) -> (PathBuf, LockOnDrop) {
    let profile = root.join(name);
    miyu_ok(
        &profile,
        &["init", "--server", &server.address, "--name", name],
    );
    (profile.clone(), LockOnDrop(profile))
}

/// Runs `miyu unlock ARGS`; false (after printing "skipped") when this machine's keyring cannot
/// be used and `MIYU_REQUIRE_KEYRING` is not set.
fn unlock(profile: &Path, args: &[&str]) -> bool {
    let output = miyu(profile, &[&["unlock"][..], args].concat());
    if output.status.success() {
        return true;
    }
    let message = stderr(&output);
    if message.contains("kernel keyring") && std::env::var_os("MIYU_REQUIRE_KEYRING").is_none() {
        eprintln!("skipped: {message}");
        return false;
    }
    panic!("miyu unlock failed with {}: {message}", output.status);
}

#[test]
fn an_unlocked_profile_opens_without_its_passphrase_until_it_is_locked() {
    let root = tempfile::tempdir().unwrap();
    let server = Server::start(&root.path().join("server"), "127.0.0.1:0", &[]);
    let (alice, _lock) = profile(root.path(), "alice", &server);
    let locked = miyu_without_passphrase(&alice, &["contacts"]);
    assert_eq!(locked.status.code(), Some(2), "{}", stderr(&locked));

    if !unlock(&alice, &["--for", "15m"]) {
        return;
    }
    for args in [&["contacts"][..], &["invite"], &["contacts", "--json"]] {
        let output = miyu_without_passphrase(&alice, args);
        assert!(output.status.success(), "{args:?}: {}", stderr(&output));
    }

    let lock = miyu_without_passphrase(&alice, &["lock"]);
    assert!(lock.status.success(), "{}", stderr(&lock));
    assert_eq!(stdout(&lock).trim(), "locked");
    let after = miyu_without_passphrase(&alice, &["contacts"]);
    assert_eq!(after.status.code(), Some(2), "{}", stderr(&after));
    assert!(
        stderr(&after).contains("MIYU_PASSPHRASE"),
        "{}",
        stderr(&after)
    );
    // Locking again changes nothing and still succeeds.
    let again = miyu_without_passphrase(&alice, &["lock", "--json"]);
    assert!(again.status.success(), "{}", stderr(&again));
    assert_eq!(
        stdout(&again).trim(),
        r#"{"state":"locked","was_unlocked":false}"#
    );
    // The passphrase still opens it.
    miyu_ok(&alice, &["contacts"]);
}

#[test]
fn an_unlock_ends_by_itself_when_its_time_is_up() {
    let root = tempfile::tempdir().unwrap();
    let server = Server::start(&root.path().join("server"), "127.0.0.1:0", &[]);
    let (alice, _lock) = profile(root.path(), "alice", &server);
    if !unlock(&alice, &["--for", "2s", "--json"]) {
        return;
    }
    // The kernel drops the key 2 s after storing it, which happened before `unlock`
    // returned; it counts whole seconds, hence one more.
    let unlocked_by = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    common::wait_for_clock(unlocked_by + 3_000);
    let output = miyu_without_passphrase(&alice, &["contacts"]);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("MIYU_PASSPHRASE"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn unlock_refuses_a_wrong_passphrase_and_durations_out_of_range_keeping_nothing() {
    let root = tempfile::tempdir().unwrap();
    let server = Server::start(&root.path().join("server"), "127.0.0.1:0", &[]);
    let (alice, _lock) = profile(root.path(), "alice", &server);
    let wrong = common::miyu_command()
        .env("MIYU_PASSPHRASE", "not the passphrase")
        .arg("--profile")
        .arg(&alice)
        .arg("unlock")
        .output()
        .unwrap();
    assert_eq!(wrong.status.code(), Some(2), "{}", stderr(&wrong));
    assert!(
        stderr(&wrong).contains("wrong passphrase"),
        "{}",
        stderr(&wrong)
    );
    for duration in ["0s", "25h", "15", "forever"] {
        let output = miyu(&alice, &["unlock", "--for", duration]);
        assert_eq!(
            output.status.code(),
            Some(2),
            "{duration}: {}",
            stderr(&output)
        );
    }
    let missing = miyu_without_passphrase(&alice, &["unlock"]);
    assert_eq!(missing.status.code(), Some(2), "{}", stderr(&missing));
    // None of these kept a key.
    let still_locked = miyu_without_passphrase(&alice, &["contacts"]);
    assert_eq!(
        still_locked.status.code(),
        Some(2),
        "{}",
        stderr(&still_locked)
    );
}

#[test]
fn a_kept_key_that_no_longer_opens_the_profile_is_dropped_and_the_passphrase_used() {
    let root = tempfile::tempdir().unwrap();
    let server = Server::start(&root.path().join("server"), "127.0.0.1:0", &[]);
    let (alice, _lock) = profile(root.path(), "alice", &server);
    if !unlock(&alice, &[]) {
        return;
    }
    // A new account in the same folder: same path, new salt, so the kept key is stale.
    std::fs::remove_dir_all(&alice).unwrap();
    miyu_ok(
        &alice,
        &["init", "--server", &server.address, "--name", "alice"],
    );

    let stale = miyu_without_passphrase(&alice, &["contacts"]);
    assert_eq!(stale.status.code(), Some(2), "{}", stderr(&stale));
    assert!(
        stderr(&stale).contains("MIYU_PASSPHRASE"),
        "{}",
        stderr(&stale)
    );
    // The passphrase opens it, and the stale key is gone.
    miyu_ok(&alice, &["contacts"]);
    assert_eq!(
        miyu_ok(&alice, &["lock"]).trim(),
        "locked (it was not unlocked)"
    );
}

#[test]
fn a_profile_without_a_passphrase_has_nothing_to_lock() {
    let root = tempfile::tempdir().unwrap();
    let server = Server::start(&root.path().join("server"), "127.0.0.1:0", &[]);
    let bob = root.path().join("bob");
    let init = miyu(
        &bob,
        &["init", "--server", &server.address, "--no-passphrase"],
    );
    assert!(init.status.success(), "{}", stderr(&init));
    for command in ["unlock", "lock"] {
        let output = miyu_without_passphrase(&bob, &[command]);
        assert!(output.status.success(), "{command}: {}", stderr(&output));
        assert!(
            stdout(&output).contains("no passphrase"),
            "{}",
            stdout(&output)
        );
    }
    let json = miyu_without_passphrase(&bob, &["unlock", "--json"]);
    assert_eq!(stdout(&json).trim(), r#"{"state":"no-passphrase"}"#);
    let contacts = miyu_without_passphrase(&bob, &["contacts"]);
    assert!(contacts.status.success(), "{}", stderr(&contacts));
}

/// `miyu ARGS` with every keyring system call failing, as under a seccomp filter that blocks
/// them (Docker's default one does), by `strace`'s fault injection.
fn miyu_without_keyring(profile: &Path, passphrase: Option<&str>, args: &[&str]) -> Output {
    let mut command = Command::new("strace");
    command
        .args(["-f", "-qq", "-o", "/dev/null", "-e", "trace=add_key,keyctl"])
        .args(["-e", "inject=add_key,keyctl:error=ENOSYS"])
        .arg(env!("CARGO_BIN_EXE_miyu"))
        .arg("--profile")
        .arg(profile)
        .args(args)
        .env_remove("MIYU_PASSPHRASE")
        .env("MIYU_DANGER_KDF_MEMORY_KIB", "8192")
        .stdin(Stdio::null());
    if let Some(passphrase) = passphrase {
        command.env("MIYU_PASSPHRASE", passphrase);
    }
    command
        .output()
        .expect("strace runs (the CI script installs it)")
}

#[test]
fn without_a_keyring_unlock_fails_clearly_and_the_passphrase_still_works() {
    let root = tempfile::tempdir().unwrap();
    let server = Server::start(&root.path().join("server"), "127.0.0.1:0", &[]);
    let (alice, _lock) = profile(root.path(), "alice", &server);
    let passphrase = Some(common::PASSPHRASE);

    let refused = miyu_without_keyring(&alice, passphrase, &["unlock"]);
    assert_eq!(refused.status.code(), Some(1), "{}", stderr(&refused));
    assert!(
        stderr(&refused).contains("cannot keep the key in the kernel keyring"),
        "{}",
        stderr(&refused)
    );
    let opened = miyu_without_keyring(&alice, passphrase, &["contacts"]);
    assert!(opened.status.success(), "{}", stderr(&opened));
    let locked = miyu_without_keyring(&alice, None, &["contacts"]);
    assert_eq!(locked.status.code(), Some(2), "{}", stderr(&locked));
    // `lock` cannot promise that nothing is kept, so it says it could not check.
    let lock = miyu_without_keyring(&alice, None, &["lock"]);
    assert_eq!(lock.status.code(), Some(1), "{}", stderr(&lock));
    assert!(
        stderr(&lock).contains("kernel keyring"),
        "{}",
        stderr(&lock)
    );

    // Nothing was kept by the failed unlock.
    let still_locked = miyu_without_passphrase(&alice, &["contacts"]);
    assert_eq!(
        still_locked.status.code(),
        Some(2),
        "{}",
        stderr(&still_locked)
    );
    // And a key kept where the keyring works is simply not found where it is blocked.
    if !unlock(&alice, &[]) {
        return;
    }
    let blocked = miyu_without_keyring(&alice, None, &["contacts"]);
    assert_eq!(blocked.status.code(), Some(2), "{}", stderr(&blocked));
}
