//! End-to-end tests of recovery and backups: real `miyu` processes through a real server
//! process. All of an account's devices are lost; its recovery key brings the account back on
//! a new device, and its backup (a whole history, then what changed) the history.

mod common;

use std::path::Path;

use common::{Server, conversation, id_of, miyu, miyu_ok};

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

/// `miyu --json backup`: what it did, and how many bytes it uploaded.
fn backup(profile: &Path) -> (String, u64) {
    let backed: serde_json::Value =
        serde_json::from_str(&miyu_ok(profile, &["--json", "backup"])).unwrap();
    (
        backed["kind"].as_str().unwrap().to_string(),
        backed["uploaded"].as_u64().unwrap(),
    )
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
    for number in 1..=24 {
        let text = format!("message {number} before the phone fell in the sea");
        miyu_ok(&phone, &["send", "bob", &text]);
    }
    miyu_ok(&bob, &["sync"]);
    miyu_ok(&bob, &["send", "alice", "careful with that phone"]);
    miyu_ok(&phone, &["sync"]);
    let (kind, whole) = backup(&phone);
    assert_eq!(kind, "full");
    let (kind, nothing) = backup(&phone);
    assert_eq!((kind.as_str(), nothing), ("unchanged", 0));
    assert!(
        miyu_ok(&phone, &["backup"]).contains("nothing changed"),
        "a backup with nothing new uploads nothing"
    );

    // More messages, an edit and a deletion: the next backup holds only those.
    miyu_ok(&phone, &["send", "bob", "still dry"]);
    miyu_ok(&bob, &["sync"]);
    miyu_ok(&bob, &["send", "alice", "good"]);
    miyu_ok(&phone, &["sync"]);
    let edited = id_of(&phone, "bob", "message 3 before the phone fell in the sea");
    miyu_ok(&phone, &["edit", "bob", &edited, "message 3, edited"]);
    let deleted = id_of(&phone, "bob", "message 5 before the phone fell in the sea");
    miyu_ok(&phone, &["delete", "bob", &deleted]);
    let backed = miyu_ok(&phone, &["backup"]);
    assert!(
        backed.starts_with("incremental backup (26 messages)"),
        "{backed}"
    );
    assert!(backed.contains("the backup has 2 segments"), "{backed}");
    let uploaded: u64 = backed
        .split(", ")
        .find_map(|part| part.strip_suffix(" uploaded; the backup has 2 segments\n"))
        .and_then(|number| number.parse().ok())
        .unwrap_or_else(|| panic!("no upload size in {backed}"));
    assert!(
        uploaded * 4 < whole,
        "the changes ({uploaded} bytes) cost far less than the whole history ({whole})"
    );
    let history = conversation(&phone, "bob");
    assert_eq!(history.len(), 26);
    assert!(
        history
            .iter()
            .any(|line| line.contains("message 3, edited"))
    );
    assert!(!history.iter().any(|line| line.contains("message 5 ")));

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
    // It does not even find the bundle: the key locates it.
    assert!(
        String::from_utf8_lossy(&refused.stderr)
            .contains("no recovery bundle for this recovery key")
    );
    assert!(!new.join("miyu.db").exists());
    // The right key with a passphrase it was not made with finds the bundle, and is refused.
    let refused = common::miyu_command()
        .env("MIYU_RECOVERY_PASSPHRASE", "not the passphrase")
        .arg("--profile")
        .arg(&new)
        .args(["recover", "--server", &server.address, &key])
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&refused.stderr)
            .contains("refused this recovery key (or passphrase)")
    );
    assert!(!new.join("miyu.db").exists());

    // The right key: the same account, its history back from the backup.
    let recovered = miyu_ok(&new, &["recover", "--server", &server.address, &key]);
    assert!(
        recovered.contains(&format!(
            "account {account}: 1 conversations and 26 messages back from the backup (2 segments)"
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
    assert!(again.contains("26 messages"), "{again}");
    assert_eq!(conversation(&new, "bob"), history);

    // The server alters the second segment: the restore fails, says which, and brings
    // nothing (not even a message it would have brought back).
    let still_dry = id_of(&new, "bob", "still dry");
    miyu_ok(&new, &["delete", "bob", &still_dry]);
    let segments: Vec<_> = server
        .files()
        .into_iter()
        .filter(|path| {
            path.parent()
                .is_some_and(|folder| folder.ends_with("blobs"))
        })
        .filter(|path| std::fs::metadata(path).unwrap().len() == uploaded)
        .collect();
    assert_eq!(segments.len(), 1, "one blob holds the changes");
    let sealed = std::fs::read(&segments[0]).unwrap();
    let mut altered = sealed.clone();
    altered[100] ^= 1;
    std::fs::write(&segments[0], &altered).unwrap();
    let refused = miyu(&new, &["restore", &key]);
    assert_eq!(refused.status.code(), Some(5));
    assert!(
        String::from_utf8_lossy(&refused.stderr)
            .contains("segment 2 of the backup's 2 does not open in its place"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    assert_eq!(conversation(&new, "bob").len(), history.len() - 1);
    std::fs::write(&segments[0], &sealed).unwrap();
    miyu_ok(&new, &["restore", &key]);
    assert_eq!(conversation(&new, "bob"), history);
    // The key shows again on the recovered device.
    assert_eq!(miyu_ok(&new, &["recovery-key"]).trim(), key);
}

/// Copies a profile folder, as restoring a copy of a device's disk onto a second machine would.
fn copy_profile(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        assert!(path.is_file(), "a profile holds files only");
        std::fs::copy(&path, to.join(path.file_name().unwrap())).unwrap();
    }
}

#[test]
fn two_devices_backing_up_the_same_account_never_fork_its_backup() {
    let root = tempfile::tempdir().unwrap();
    let server = Server::start(&root.path().join("server"), "127.0.0.1:0", &[]);
    let phone = root.path().join("phone");
    let (_, key) = init(&phone, &server.address, "alice");
    assert_eq!(backup(&phone).0, "full");
    // A copy of the phone holds the backup key and believes in the same chain.
    let twin = root.path().join("twin");
    copy_profile(&phone, &twin);
    miyu_ok(&twin, &["settings", "set", "typing", "on"]);
    assert_eq!(backup(&twin).0, "incremental");

    // The phone's chain is no longer the server's: it does not append after its own last
    // segment (which would fork the chain), but starts a new one.
    miyu_ok(&phone, &["settings", "set", "read_receipts", "on"]);
    assert_eq!(backup(&phone).0, "full");
    miyu_ok(&twin, &["settings", "set", "group_invites", "everyone"]);
    assert_eq!(backup(&twin).0, "full");
    miyu_ok(&twin, &["settings", "set", "presence", "contacts"]);
    assert_eq!(backup(&twin).0, "incremental");

    // The backup is the twin's, whole.
    std::fs::remove_dir_all(&phone).unwrap();
    std::fs::remove_dir_all(&twin).unwrap();
    let new = root.path().join("new-phone");
    let recovered = miyu_ok(&new, &["recover", "--server", &server.address, &key]);
    assert!(recovered.contains("(2 segments)"), "{recovered}");
    let settings: serde_json::Value =
        serde_json::from_str(&miyu_ok(&new, &["--json", "settings"])).unwrap();
    for (key, value) in [
        ("typing", serde_json::json!(true)),
        ("group_invites", serde_json::json!("everyone")),
        ("presence", serde_json::json!("contacts")),
        ("read_receipts", serde_json::json!(false)),
    ] {
        assert_eq!(settings[key], value, "{key} in {settings}");
    }
}
