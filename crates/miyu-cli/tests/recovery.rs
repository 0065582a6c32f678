//! End-to-end tests of recovery and backups: real `miyu` processes through a real server
//! process. All of an account's devices are lost; its recovery key brings the account back on
//! a new device, and its backup the history.

mod common;

use std::path::Path;

use common::{Server, conversation, miyu, miyu_ok};

/// `miyu init`: the account id and the recovery key it printed.
fn init(profile: &Path, server: &str, name: &str) -> (String, String) {
    let output = miyu(profile, &["init", "--server", server, "--name", name]);
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(output.status.success(), "{stderr}");
    let key = stderr
        .lines()
        .find(|line| line.starts_with("miyu-recovery:"))
        .unwrap_or_else(|| panic!("no recovery key in {stderr}"))
        .to_string();
    let account = String::from_utf8_lossy(&output.stdout).trim().to_string();
    (account, key)
}

#[test]
fn an_account_comes_back_from_its_recovery_key_with_its_backup() {
    let root = tempfile::tempdir().unwrap();
    let server = Server::start(&root.path().join("server"), "127.0.0.1:0", &[]);
    let phone = root.path().join("phone");
    let (account, key) = init(&phone, &server.address, "alice");
    assert_eq!(miyu_ok(&phone, &["recovery-key"]).trim(), key);
    let bob = root.path().join("bob");
    init(&bob, &server.address, "bob");
    let invite = miyu_ok(&phone, &["invite"]);
    miyu_ok(&bob, &["accept", invite.trim(), "--name", "alice"]);
    miyu_ok(&phone, &["sync"]);
    miyu_ok(&phone, &["send", "bob", "before the phone fell in the sea"]);
    miyu_ok(&bob, &["sync"]);
    miyu_ok(&bob, &["send", "alice", "careful with that phone"]);
    miyu_ok(&phone, &["sync"]);
    let backed = miyu_ok(&phone, &["backup"]);
    assert!(backed.contains("backed up (2 messages)"), "{backed}");
    let history = conversation(&phone, "bob");
    assert_eq!(history.len(), 2);

    // Every device is lost.
    std::fs::remove_dir_all(&phone).unwrap();

    // A wrong key is refused and leaves no profile behind.
    let new = root.path().join("new-phone");
    let at = key.rfind(':').unwrap() + 1;
    let first = key[at..].chars().next().unwrap();
    let wrong = format!(
        "{}{}{}",
        &key[..at],
        if first == 'a' { 'b' } else { 'a' },
        &key[at + 1..]
    );
    let refused = miyu(&new, &["recover", "--server", &server.address, &wrong]);
    assert_eq!(refused.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("refused this recovery key"));
    assert!(!new.join("miyu.db").exists());

    // The right key: the same account, its history back from the backup.
    let recovered = miyu_ok(&new, &["recover", "--server", &server.address, &key]);
    assert!(
        recovered.contains(&format!(
            "account {account}: 1 conversations and 2 messages"
        )),
        "{recovered}"
    );
    assert_eq!(conversation(&new, "bob"), history);
    // It holds the identity key again: it lists and revokes the lost device.
    let devices: serde_json::Value =
        serde_json::from_str(&miyu_ok(&new, &["--json", "devices"])).unwrap();
    let devices = devices.as_array().unwrap();
    assert_eq!(devices.len(), 2);
    let lost = devices
        .iter()
        .find(|device| device["this_device"] == false)
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    miyu_ok(&new, &["devices", "revoke", &lost]);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&miyu_ok(&new, &["--json", "devices"]))
            .unwrap()
            .as_array()
            .unwrap()
            .len(),
        1
    );
    // Restoring the backup again changes nothing: it is the same history.
    let again = miyu_ok(&new, &["restore", &key]);
    assert!(again.contains("2 messages"), "{again}");
    assert_eq!(conversation(&new, "bob"), history);
    // The key shows again on the recovered device.
    assert_eq!(miyu_ok(&new, &["recovery-key"]).trim(), key);
}
