//! End-to-end tests of an account's devices: real `miyu` processes through a real server
//! process. A new device shows a link code, the first device approves it, the new device gets
//! the history and every conversation; a revoked device can neither read nor connect.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};

use common::{Server, conversation, miyu, miyu_ok};

fn profile(root: &Path, server: &str, name: &str) -> PathBuf {
    let profile = root.join(name);
    miyu_ok(&profile, &["init", "--server", server, "--name", name]);
    profile
}

/// `miyu link` on a new profile, running until approved; returns the process and its code.
fn start_link(root: &Path, server: &str, name: &str, wait: &str) -> (PathBuf, Child, String) {
    let profile = root.join(name);
    let mut child = common::miyu_command()
        .arg("--profile")
        .arg(&profile)
        .args(["link", "--server", server, "--name", name, "--wait", wait])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut code = String::new();
    BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut code)
        .unwrap();
    assert!(code.starts_with("miyu-link://device?"), "{code:?}");
    (profile, child, code.trim().to_string())
}

fn finish(child: Child) -> String {
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(output.status.success(), "{stderr}");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn link(root: &Path, server: &str, first: &Path, name: &str) -> PathBuf {
    let (profile, child, code) = start_link(root, server, name, "120");
    let approved = miyu_ok(first, &["devices", "add", &code, "--yes"]);
    assert!(approved.contains(&format!("linked {name}")), "{approved}");
    let linked = finish(child);
    assert!(linked.contains(&format!("linked as {name}")), "{linked}");
    profile
}

fn devices(profile: &Path) -> Vec<serde_json::Value> {
    serde_json::from_str::<serde_json::Value>(&miyu_ok(profile, &["--json", "devices"]))
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

#[test]
fn linked_devices_share_the_history_and_a_revoked_one_is_shut_out() {
    let root = tempfile::tempdir().unwrap();
    let server = Server::start(&root.path().join("server"), "127.0.0.1:0", &[]);
    let phone = profile(root.path(), &server.address, "alice");
    let bob = profile(root.path(), &server.address, "bob");
    let link_text = miyu_ok(&phone, &["invite"]);
    miyu_ok(&bob, &["accept", link_text.trim(), "--name", "alice"]);
    miyu_ok(&phone, &["sync"]);
    miyu_ok(&bob, &["sync"]);
    miyu_ok(&phone, &["send", "bob", "hello from the phone"]);
    miyu_ok(&bob, &["sync"]);
    miyu_ok(&bob, &["send", "alice", "hello alice"]);
    miyu_ok(&phone, &["sync"]);
    miyu_ok(&phone, &["group", "create", "Harbor", "bob"]);
    miyu_ok(&bob, &["sync"]);
    miyu_ok(&bob, &["send", "Harbor", "the tide is low"]);
    miyu_ok(&phone, &["sync"]);

    // A second device: the same history, and it takes part in both conversations.
    let laptop = link(root.path(), &server.address, &phone, "laptop");
    assert_eq!(conversation(&laptop, "bob"), conversation(&phone, "bob"));
    assert_eq!(
        conversation(&laptop, "Harbor"),
        conversation(&phone, "Harbor")
    );
    assert!(
        conversation(&laptop, "bob")
            .iter()
            .any(|line| line == "bob: hello alice")
    );
    miyu_ok(&laptop, &["send", "bob", "from the laptop"]);
    miyu_ok(&laptop, &["send", "Harbor", "laptop in the group"]);
    miyu_ok(&bob, &["sync"]);
    assert!(
        conversation(&bob, "alice")
            .iter()
            .any(|line| line == "alice: from the laptop")
    );
    assert!(
        conversation(&bob, "Harbor")
            .iter()
            .any(|line| line.ends_with("laptop in the group"))
    );
    miyu_ok(&phone, &["sync"]);
    assert!(
        conversation(&phone, "bob")
            .iter()
            .any(|line| line == "me: from the laptop")
    );
    miyu_ok(&bob, &["send", "alice", "both of you?"]);
    for device in [&phone, &laptop] {
        miyu_ok(device, &["sync"]);
        assert!(
            conversation(device, "bob")
                .iter()
                .any(|line| line == "bob: both of you?")
        );
    }

    // Conversations the phone starts later take the laptop in from the start.
    let carol = profile(root.path(), &server.address, "carol");
    let invite = miyu_ok(&carol, &["invite"]);
    miyu_ok(&phone, &["accept", invite.trim(), "--name", "carol"]);
    miyu_ok(&carol, &["sync"]);
    miyu_ok(&carol, &["send", "alice", "hi from carol"]);
    miyu_ok(&phone, &["group", "create", "Later", "bob"]);
    miyu_ok(&bob, &["sync"]);
    miyu_ok(&bob, &["send", "Later", "later indeed"]);
    miyu_ok(&laptop, &["sync"]);
    assert!(
        conversation(&laptop, "carol")
            .iter()
            .any(|line| line == "carol: hi from carol")
    );
    assert!(
        conversation(&laptop, "Later")
            .iter()
            .any(|line| line.ends_with("later indeed"))
    );

    // A third, then revoked: it reads nothing sent afterwards and cannot connect.
    let tablet = link(root.path(), &server.address, &phone, "tablet");
    assert_eq!(conversation(&tablet, "bob"), conversation(&phone, "bob"));
    let listed = devices(&phone);
    assert_eq!(listed.len(), 3);
    let tablet_id = listed
        .iter()
        .find(|device| device["name"] == "tablet")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        listed.iter().filter(|d| d["this_device"] == true).count(),
        1
    );
    // Only the device holding the identity key revokes.
    assert!(
        !miyu(&laptop, &["devices", "revoke", &tablet_id])
            .status
            .success()
    );
    miyu_ok(&phone, &["devices", "revoke", &tablet_id]);
    miyu_ok(&phone, &["send", "bob", "after the tablet left"]);
    let refused = miyu(&tablet, &["sync"]);
    assert!(!refused.status.success());
    assert!(
        !conversation(&tablet, "bob")
            .iter()
            .any(|line| line.contains("after the tablet left"))
    );
    assert_eq!(devices(&phone).len(), 2);
    for device in [&laptop, &bob] {
        miyu_ok(device, &["sync"]);
    }
    assert!(
        conversation(&laptop, "bob")
            .iter()
            .any(|line| line == "me: after the tablet left")
    );
}

#[test]
fn a_link_without_approval_or_with_a_bad_or_used_code_changes_nothing() {
    let root = tempfile::tempdir().unwrap();
    let server = Server::start(&root.path().join("server"), "127.0.0.1:0", &[]);
    let phone = profile(root.path(), &server.address, "alice");

    // Nobody approves: the new device gives up, leaving no profile.
    let (lonely, child, _) = start_link(root.path(), &server.address, "lonely", "2");
    let output = child.wait_with_output().unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("in time"));
    assert!(!lonely.join("miyu.db").exists());

    // A damaged code is refused before anything happens.
    let (profile, child, code) = start_link(root.path(), &server.address, "laptop", "60");
    let damaged = code.replace("&secret=", "&secret=x");
    let refused = miyu(&phone, &["devices", "add", &damaged, "--yes"]);
    assert_eq!(refused.status.code(), Some(2));
    assert_eq!(devices(&phone).len(), 1);
    // The right one works, once.
    miyu_ok(&phone, &["devices", "add", &code, "--yes"]);
    finish(child);
    assert_eq!(devices(&phone).len(), 2);
    let again = miyu(&phone, &["devices", "add", &code, "--yes"]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("linked already"));
    assert_eq!(devices(&phone).len(), 2);
    assert_eq!(devices(&profile).len(), 2);
}

/// How many messages of `name` the profile counts as unread, from `contacts --json`.
fn unread(profile: &Path, name: &str) -> u64 {
    let contacts: serde_json::Value =
        serde_json::from_str(&miyu_ok(profile, &["--json", "contacts"])).unwrap();
    contacts
        .as_array()
        .unwrap()
        .iter()
        .find(|contact| contact["name"] == name)
        .unwrap_or_else(|| panic!("no contact {name}: {contacts}"))["unread"]
        .as_u64()
        .unwrap()
}

fn group_unread(profile: &Path, name: &str) -> u64 {
    let groups: serde_json::Value =
        serde_json::from_str(&miyu_ok(profile, &["--json", "groups"])).unwrap();
    groups
        .as_array()
        .unwrap()
        .iter()
        .find(|group| group["name"] == name)
        .unwrap_or_else(|| panic!("no group {name}: {groups}"))["unread"]
        .as_u64()
        .unwrap()
}

#[test]
fn the_devices_of_an_account_share_read_state_contacts_and_settings() {
    let root = tempfile::tempdir().unwrap();
    let server = Server::start(&root.path().join("server"), "127.0.0.1:0", &[]);
    let phone = profile(root.path(), &server.address, "alice");
    let laptop = link(root.path(), &server.address, &phone, "laptop");
    let bob = profile(root.path(), &server.address, "bob");

    // An invite the phone makes after the laptop was linked: whoever uses it is a contact on
    // the laptop too, even before the phone has seen them (the laptop checks the invite).
    let invite = miyu_ok(&phone, &["invite"]);
    miyu_ok(&bob, &["accept", invite.trim(), "--name", "alice"]);
    miyu_ok(&bob, &["send", "alice", "one"]);
    miyu_ok(&bob, &["send", "alice", "two"]);
    miyu_ok(&laptop, &["sync"]);
    assert_eq!(unread(&laptop, "bob"), 2);
    assert!(miyu_ok(&laptop, &["requests"]).contains("no message requests"));
    miyu_ok(&phone, &["sync"]);
    assert_eq!(unread(&phone, "bob"), 2);

    // Read on one device, read on all (told when that device next connects, not at the moment
    // of reading): also what reaches a device after another read it.
    let shown = miyu_ok(&phone, &["messages", "bob"]);
    assert!(shown.contains("two"), "{shown}");
    assert_eq!(unread(&phone, "bob"), 0);
    miyu_ok(&laptop, &["sync"]);
    assert_eq!(unread(&laptop, "bob"), 2, "not told yet");
    miyu_ok(&phone, &["sync"]);
    miyu_ok(&laptop, &["sync"]);
    assert_eq!(unread(&laptop, "bob"), 0);
    miyu_ok(&bob, &["send", "alice", "three"]);
    miyu_ok(&laptop, &["sync"]);
    assert_eq!(unread(&laptop, "bob"), 1);
    miyu_ok(&laptop, &["messages", "bob"]);
    miyu_ok(&laptop, &["sync"]);
    miyu_ok(&phone, &["sync"]);
    assert!(conversation(&phone, "bob").contains(&"bob: three".to_string()));
    assert_eq!(unread(&phone, "bob"), 0);

    // The same in a group.
    miyu_ok(&phone, &["group", "create", "Harbor", "bob"]);
    miyu_ok(&bob, &["sync"]);
    miyu_ok(&bob, &["send", "Harbor", "the tide is low"]);
    for device in [&phone, &laptop] {
        miyu_ok(device, &["sync"]);
        assert_eq!(group_unread(device, "Harbor"), 1);
    }
    miyu_ok(&laptop, &["messages", "Harbor"]);
    miyu_ok(&laptop, &["sync"]);
    miyu_ok(&phone, &["sync"]);
    assert_eq!(group_unread(&phone, "Harbor"), 0);

    // Renamed and verified on the laptop: so on the phone.
    miyu_ok(&laptop, &["rename", "bob", "Robert"]);
    miyu_ok(&laptop, &["verify", "Robert"]);
    miyu_ok(&phone, &["sync"]);
    let contacts: serde_json::Value =
        serde_json::from_str(&miyu_ok(&phone, &["--json", "contacts"])).unwrap();
    let [robert] = contacts.as_array().unwrap().as_slice() else {
        panic!("one contact: {contacts}");
    };
    assert_eq!(robert["name"], "Robert");
    assert_eq!(robert["verified"], true);
    assert!(conversation(&phone, "Robert").contains(&"Robert: three".to_string()));

    // A privacy setting changed on one device holds on all.
    miyu_ok(&phone, &["settings", "set", "read_receipts", "on"]);
    miyu_ok(&laptop, &["sync"]);
    let settings: serde_json::Value =
        serde_json::from_str(&miyu_ok(&laptop, &["--json", "settings"])).unwrap();
    assert_eq!(settings["read_receipts"], true, "{settings}");

    // A stranger's request blocked on the laptop is gone from the phone, and stays blocked.
    miyu_ok(&phone, &["username", "set", "alice_here"]);
    miyu_ok(&phone, &["settings", "set", "discoverable", "on"]);
    let dave = profile(root.path(), &server.address, "dave");
    miyu_ok(&dave, &["add", "alice_here"]);
    miyu_ok(&dave, &["send", "alice_here", "let me in"]);
    for device in [&phone, &laptop] {
        miyu_ok(device, &["sync"]);
        assert!(miyu_ok(device, &["requests"]).contains("dave"));
    }
    miyu_ok(&laptop, &["requests", "block", "dave"]);
    miyu_ok(&phone, &["sync"]);
    assert!(miyu_ok(&phone, &["requests"]).contains("no message requests"));
    let blocked: serde_json::Value =
        serde_json::from_str(&miyu_ok(&phone, &["--json", "requests", "blocked"])).unwrap();
    assert_eq!(blocked.as_array().unwrap().len(), 1, "{blocked}");
    miyu_ok(&dave, &["send", "alice_here", "still here"]);
    assert!(miyu_ok(&phone, &["sync"]).is_empty());
}

#[test]
fn a_recovered_device_is_brought_into_the_conversations_by_a_device_that_survived() {
    let root = tempfile::tempdir().unwrap();
    let server = Server::start(&root.path().join("server"), "127.0.0.1:0", &[]);
    let phone = root.path().join("alice");
    let output = miyu(
        &phone,
        &["init", "--server", &server.address, "--name", "alice"],
    );
    assert!(output.status.success());
    let recovery_key = String::from_utf8_lossy(&output.stderr)
        .lines()
        .find(|line| line.starts_with("miyu-recovery:"))
        .unwrap()
        .to_string();
    let laptop = link(root.path(), &server.address, &phone, "laptop");
    let bob = profile(root.path(), &server.address, "bob");
    let invite = miyu_ok(&phone, &["invite"]);
    miyu_ok(&bob, &["accept", invite.trim(), "--name", "alice"]);
    miyu_ok(&bob, &["send", "alice", "before"]);
    for device in [&phone, &laptop] {
        miyu_ok(device, &["sync"]);
    }
    miyu_ok(&phone, &["backup"]);
    let old_phone = devices(&laptop)
        .into_iter()
        .find(|device| device["this_device"] == false)
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();

    // The phone is lost; the account comes back on a new one, which revokes the lost phone.
    std::fs::remove_dir_all(&phone).unwrap();
    let new_phone = root.path().join("new-phone");
    miyu_ok(
        &new_phone,
        &["recover", "--server", &server.address, &recovery_key],
    );
    miyu_ok(&new_phone, &["devices", "revoke", &old_phone]);

    // The laptop, told of the new phone by the account group it made, brings it into the
    // conversation: the new phone reads and writes there like any device of the account.
    miyu_ok(&laptop, &["sync"]);
    miyu_ok(&new_phone, &["sync"]);
    miyu_ok(&bob, &["send", "alice", "after the recovery"]);
    miyu_ok(&new_phone, &["sync"]);
    let seen = conversation(&new_phone, "bob");
    assert!(seen.contains(&"bob: before".to_string()), "{seen:?}");
    assert!(
        seen.contains(&"bob: after the recovery".to_string()),
        "{seen:?}"
    );
    miyu_ok(&new_phone, &["send", "bob", "back again"]);
    miyu_ok(&bob, &["sync"]);
    assert!(conversation(&bob, "alice").contains(&"alice: back again".to_string()));
    miyu_ok(&laptop, &["sync"]);
    assert!(conversation(&laptop, "bob").contains(&"me: back again".to_string()));
    assert_eq!(devices(&new_phone).len(), 2);
}
