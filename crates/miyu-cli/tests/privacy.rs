//! End-to-end tests of the private defaults: settings, message requests and usernames,
//! disappearing messages, read receipts, typing and presence. Real `miyu-server` and `miyu`
//! processes on 127.0.0.1.

mod common;

use std::path::Path;

use common::{Chat, PATIENCE, Server, connect_pair, conversation, count_in_files, miyu, miyu_ok};

fn settings_json(profile: &Path) -> serde_json::Value {
    serde_json::from_str(&miyu_ok(profile, &["--json", "settings"])).unwrap()
}

/// When the message with this body disappears from `contact`'s conversation in `profile`, as
/// `miyu messages --json` announces it.
fn announced_expiry(profile: &Path, contact: &str, body: &str) -> u64 {
    let messages: serde_json::Value =
        serde_json::from_str(&miyu_ok(profile, &["--json", "messages", contact])).unwrap();
    let message = messages
        .as_array()
        .unwrap()
        .iter()
        .find(|message| message["body"] == body)
        .unwrap_or_else(|| panic!("no message {body:?} in {messages}"));
    message["expires_at_ms"]
        .as_u64()
        .unwrap_or_else(|| panic!("{message} has no expiry"))
}

#[test]
fn settings_start_hardened_and_refuse_bad_values() {
    let root = tempfile::tempdir().unwrap();
    let server = Server::start(&root.path().join("server"), "127.0.0.1:0", &[]);
    let alice = root.path().join("alice");
    miyu_ok(
        &alice,
        &["init", "--server", &server.address, "--name", "alice"],
    );

    let settings = settings_json(&alice);
    assert_eq!(settings["presence"], "nobody");
    assert_eq!(settings["typing"], false);
    assert_eq!(settings["read_receipts"], false);
    assert_eq!(settings["message_requests"], true);
    assert_eq!(settings["group_invites"], "contacts");
    assert_eq!(settings["discoverable"], false);
    assert_eq!(settings["link_previews"], false);
    assert_eq!(settings["proxy"], serde_json::Value::Null);
    let listed = miyu_ok(&alice, &["settings"]);
    assert!(listed.contains("presence\tnobody"), "{listed}");

    miyu_ok(&alice, &["settings", "set", "read_receipts", "on"]);
    miyu_ok(&alice, &["settings", "set", "group_invites", "nobody"]);
    for (key, value) in [
        ("presence", "everyone"),
        ("link_previews", "on"),
        ("colour", "blue"),
        ("proxy", "http://example.test"),
    ] {
        let output = miyu(&alice, &["settings", "set", key, value]);
        assert_eq!(output.status.code(), Some(2), "{key} {value}");
    }
    let settings = settings_json(&alice);
    assert_eq!(settings["read_receipts"], true);
    assert_eq!(settings["group_invites"], "nobody");
    assert_eq!(settings["presence"], "nobody");
    assert_eq!(settings["link_previews"], false);
}

#[test]
fn a_stranger_found_by_username_waits_in_requests_until_accepted() {
    let root = tempfile::tempdir().unwrap();
    let server = Server::start(&root.path().join("server"), "127.0.0.1:0", &[]);
    let alice = root.path().join("alice");
    let bob = root.path().join("bob");
    miyu_ok(
        &alice,
        &["init", "--server", &server.address, "--name", "Alice"],
    );
    miyu_ok(
        &bob,
        &["init", "--server", &server.address, "--name", "Bob"],
    );

    // A username alone does not make anyone findable.
    let shown = miyu_ok(&alice, &["username", "set", "@Alice_Liddell"]);
    assert!(shown.contains("alice_liddell"), "{shown}");
    assert!(shown.contains("nobody can find you"), "{shown}");
    let output = miyu(&bob, &["add", "alice_liddell"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("nobody can be found"));

    miyu_ok(&alice, &["settings", "set", "discoverable", "on"]);
    miyu_ok(&bob, &["add", "alice_liddell"]);
    miyu_ok(&bob, &["send", "alice_liddell", "hello from a stranger"]);

    // Alice sees a request, not a chat; Bob hears nothing back, not even her name.
    let printed = miyu_ok(&alice, &["sync"]);
    assert!(printed.contains("message request from Bob"), "{printed}");
    assert!(!printed.contains("hello from a stranger"), "{printed}");
    assert_eq!(miyu_ok(&alice, &["contacts"]), "");
    let requests = miyu_ok(&alice, &["requests"]);
    assert!(requests.contains("Bob"), "{requests}");
    assert!(requests.contains("hello from a stranger"), "{requests}");
    assert_eq!(miyu(&alice, &["messages", "Bob"]).status.code(), Some(2));
    assert_eq!(miyu(&alice, &["send", "Bob", "hi"]).status.code(), Some(2));
    let printed = miyu_ok(&bob, &["sync"]);
    assert!(!printed.contains("Alice"), "{printed}");

    // Accepted: now a contact, and Bob learns who she is.
    miyu_ok(&alice, &["requests", "accept", "Bob"]);
    assert!(miyu_ok(&alice, &["contacts"]).contains("Bob"));
    assert_eq!(conversation(&alice, "Bob"), ["Bob: hello from a stranger"]);
    let printed = miyu_ok(&bob, &["sync"]);
    assert!(
        printed.contains("contact alice_liddell is now called Alice"),
        "{printed}"
    );
    miyu_ok(&alice, &["send", "Bob", "welcome"]);
    miyu_ok(&bob, &["sync"]);
    assert_eq!(
        conversation(&bob, "Alice"),
        ["me: hello from a stranger", "Alice: welcome"]
    );

    // Withdrawn: nobody finds her any more.
    miyu_ok(&alice, &["settings", "set", "discoverable", "off"]);
    let carol = root.path().join("carol");
    miyu_ok(
        &carol,
        &["init", "--server", &server.address, "--name", "carol"],
    );
    assert_eq!(
        miyu(&carol, &["add", "alice_liddell"]).status.code(),
        Some(2)
    );

    // The server never saw the username, only its hash.
    drop(server);
    let files: Vec<_> = std::fs::read_dir(root.path().join("server"))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .chain([root.path().join("server.log")])
        .collect();
    assert_eq!(count_in_files(&files, b"alice_liddell"), 0);
    assert_eq!(count_in_files(&files, b"Alice_Liddell"), 0);
}

#[test]
fn declined_and_blocked_strangers_leave_nothing_and_reach_nobody() {
    let root = tempfile::tempdir().unwrap();
    let server = Server::start(&root.path().join("server"), "127.0.0.1:0", &[]);
    let alice = root.path().join("alice");
    let carol = root.path().join("carol");
    let dave = root.path().join("dave");
    for (profile, name) in [(&alice, "alice"), (&carol, "carol"), (&dave, "dave")] {
        miyu_ok(
            profile,
            &["init", "--server", &server.address, "--name", name],
        );
    }
    miyu_ok(&alice, &["username", "set", "alice_here"]);
    miyu_ok(&alice, &["settings", "set", "discoverable", "on"]);
    miyu_ok(&carol, &["add", "alice_here"]);
    miyu_ok(&carol, &["send", "alice_here", "buy my stuff"]);
    miyu_ok(&dave, &["add", "alice_here"]);
    miyu_ok(&dave, &["send", "alice_here", "let me in"]);
    miyu_ok(&alice, &["sync"]);
    let requests = miyu_ok(&alice, &["requests"]);
    assert!(
        requests.contains("carol") && requests.contains("dave"),
        "{requests}"
    );

    miyu_ok(&alice, &["requests", "decline", "carol"]);
    miyu_ok(&alice, &["requests", "block", "dave"]);
    let requests = miyu_ok(&alice, &["requests"]);
    assert!(requests.contains("no message requests"), "{requests}");

    miyu_ok(&carol, &["send", "alice_here", "hello again"]);
    miyu_ok(&dave, &["send", "alice_here", "still here"]);
    let printed = miyu_ok(&alice, &["sync"]);
    assert!(printed.is_empty(), "{printed}");
    assert!(miyu_ok(&alice, &["requests"]).contains("no message requests"));
    assert_eq!(miyu_ok(&alice, &["contacts"]), "");
    assert_eq!(
        miyu(&alice, &["requests", "accept", "dave"]).status.code(),
        Some(2)
    );

    // The block is listed by account id, and can be lifted.
    let blocked: serde_json::Value =
        serde_json::from_str(&miyu_ok(&alice, &["--json", "requests", "blocked"])).unwrap();
    let [entry] = blocked.as_array().unwrap().as_slice() else {
        panic!("one blocked account, got {blocked}");
    };
    let dave_id = entry["account_id"].as_str().unwrap().to_string();
    assert_eq!(
        miyu(&alice, &["requests", "unblock", "not-an-account"])
            .status
            .code(),
        Some(2)
    );
    miyu_ok(&alice, &["requests", "unblock", &dave_id]);
    assert!(miyu_ok(&alice, &["requests", "blocked"]).contains("nobody is blocked"));
}

#[test]
fn message_requests_off_drops_strangers_unseen() {
    let root = tempfile::tempdir().unwrap();
    let server = Server::start(&root.path().join("server"), "127.0.0.1:0", &[]);
    let alice = root.path().join("alice");
    let eve = root.path().join("eve");
    miyu_ok(
        &alice,
        &["init", "--server", &server.address, "--name", "alice"],
    );
    miyu_ok(
        &eve,
        &["init", "--server", &server.address, "--name", "eve"],
    );
    miyu_ok(&alice, &["username", "set", "alice_quiet"]);
    miyu_ok(&alice, &["settings", "set", "discoverable", "on"]);
    miyu_ok(&alice, &["settings", "set", "message_requests", "off"]);
    miyu_ok(&eve, &["add", "alice_quiet"]);
    miyu_ok(&eve, &["send", "alice_quiet", "are you there"]);
    let printed = miyu_ok(&alice, &["sync"]);
    assert!(printed.is_empty(), "{printed}");
    assert!(miyu_ok(&alice, &["requests"]).contains("no message requests"));
}

#[test]
fn username_lookups_are_rate_limited() {
    let root = tempfile::tempdir().unwrap();
    let server = Server::start(&root.path().join("server"), "127.0.0.1:0", &[]);
    let mallory = root.path().join("mallory");
    miyu_ok(
        &mallory,
        &["init", "--server", &server.address, "--name", "m"],
    );
    // A burst of five guesses is answered (none of these names exist)...
    for guess in ["guess_one", "guess_two", "guess_three"] {
        assert_eq!(
            miyu(&mallory, &["add", guess]).status.code(),
            Some(2),
            "{guess}"
        );
    }
    // ...publishing a name counts too, since "taken" would answer the same question...
    miyu_ok(&mallory, &["settings", "set", "discoverable", "on"]);
    miyu_ok(&mallory, &["username", "set", "guess_four"]);
    miyu_ok(&mallory, &["username", "set", "guess_five"]);
    // ...then the server refuses to answer more for a while.
    let output = miyu(&mallory, &["add", "guess_six"]);
    assert_eq!(output.status.code(), Some(4));
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("too many username lookups"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn a_timer_makes_messages_disappear_everywhere_and_tells_the_server_when() {
    let root = tempfile::tempdir().unwrap();
    let server_data = root.path().join("server");
    let server = Server::start(&server_data, "127.0.0.1:0", &[]);
    let pair = connect_pair(root.path(), &server.address);

    let shown = miyu_ok(&pair.alice, &["timer", "bob", "30s"]);
    assert!(shown.contains("30 seconds"), "{shown}");
    let printed = miyu_ok(&pair.bob, &["sync"]);
    assert!(
        printed.contains("alice set disappearing messages to 30 seconds"),
        "{printed}"
    );
    assert!(miyu_ok(&pair.bob, &["timer", "alice"]).contains("30 seconds"));

    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    miyu_ok(&pair.alice, &["send", "bob", "this will vanish"]);
    // The server holds the ciphertext with its expiry, rounded up to the minute.
    let expiries: Vec<i64> = {
        let database = rusqlite::Connection::open(server_data.join("miyu.sqlite3")).unwrap();
        let mut statement = database
            .prepare("SELECT expires_at FROM group_log WHERE expires_at IS NOT NULL")
            .unwrap();
        statement
            .query_map([], |row| row.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    };
    let [expiry] = expiries.as_slice() else {
        panic!("one expiring entry, got {expiries:?}");
    };
    let expiry = u64::try_from(*expiry).unwrap();
    assert_eq!(expiry % 60, 0);
    assert!(
        expiry >= before + 30 && expiry <= before + 30 + 60 + 60,
        "{expiry}"
    );

    // A file sent under the timer: the server's copy expires with it (to the minute, one
    // minute at least).
    let file = root.path().join("vanishing.txt");
    std::fs::write(&file, "a file that will vanish").unwrap();
    miyu_ok(&pair.alice, &["send-file", "bob", file.to_str().unwrap()]);
    let blob_expiry: i64 = rusqlite::Connection::open(server_data.join("miyu.sqlite3"))
        .unwrap()
        .query_row("SELECT expires_at FROM blobs", [], |row| row.get(0))
        .unwrap();
    let blob_expiry = u64::try_from(blob_expiry).unwrap();
    assert!(
        blob_expiry >= before + 30 && blob_expiry <= before + 60 + 60,
        "{blob_expiry}"
    );

    miyu_ok(&pair.bob, &["sync"]);
    let bobs = conversation(&pair.bob, "alice");
    assert!(
        bobs.iter()
            .any(|line| line.starts_with("alice: this will vanish")),
        "{bobs:?}"
    );
    let files = miyu_ok(&pair.bob, &["--json", "files", "alice"]);
    assert!(files.contains("vanishing.txt"), "{files}");

    // Each side announces when the text goes: 30 s after it was sent or received.
    let alice_expiry = announced_expiry(&pair.alice, "bob", "this will vanish");
    let bob_expiry = announced_expiry(&pair.bob, "alice", "this will vanish");
    let sent_ms = before * 1000;
    assert!(
        (sent_ms + 30_000..sent_ms + 30_000 + PATIENCE.as_millis() as u64).contains(&alice_expiry)
    );
    assert!(bob_expiry >= alice_expiry, "{bob_expiry} < {alice_expiry}");

    // Once that time has passed, it is gone on both sides; the notice stays. (Bob stored the
    // file just after the text, so it goes a moment later.)
    let file_expiry = |profile: &Path, contact: &str| -> u64 {
        let messages: serde_json::Value =
            serde_json::from_str(&miyu_ok(profile, &["--json", "messages", contact])).unwrap();
        messages
            .as_array()
            .unwrap()
            .iter()
            .find(|message| message["kind"] == "file")
            .and_then(|message| message["expires_at_ms"].as_u64())
            .expect("the file message disappears")
    };
    let last = bob_expiry
        .max(file_expiry(&pair.bob, "alice"))
        .max(file_expiry(&pair.alice, "bob"));
    common::wait_for_clock(last);
    for (profile, contact) in [(&pair.alice, "bob"), (&pair.bob, "alice")] {
        let lines = conversation(profile, contact);
        assert!(
            !lines.iter().any(|line| line.contains("this will vanish")),
            "{lines:?}"
        );
    }
    for (profile, contact) in [(&pair.alice, "bob"), (&pair.bob, "alice")] {
        assert_eq!(miyu_ok(profile, &["--json", "files", contact]).trim(), "[]");
    }
    let alices = conversation(&pair.alice, "bob");
    assert_eq!(alices.len(), 1, "{alices:?}");
    assert!(
        alices[0].contains("you set disappearing messages"),
        "{alices:?}"
    );

    // Messages sent after turning it off stay.
    miyu_ok(&pair.alice, &["timer", "bob", "off"]);
    miyu_ok(&pair.alice, &["send", "bob", "this stays"]);
    miyu_ok(&pair.bob, &["sync"]);
    assert!(
        conversation(&pair.bob, "alice")
            .iter()
            .any(|line| line == "alice: this stays")
    );
    assert_eq!(
        miyu(&pair.alice, &["timer", "bob", "5s"]).status.code(),
        Some(2)
    );
}

#[test]
fn read_receipts_and_presence_are_shared_only_when_both_sides_share_them() {
    let root = tempfile::tempdir().unwrap();
    let server = Server::start(&root.path().join("server"), "127.0.0.1:0", &[]);
    let pair = connect_pair(root.path(), &server.address);

    // Bob wants receipts, Alice does not: Alice's reading tells Bob nothing.
    miyu_ok(&pair.bob, &["settings", "set", "read_receipts", "on"]);
    miyu_ok(&pair.bob, &["send", "alice", "first"]);
    miyu_ok(&pair.alice, &["sync"]);
    miyu_ok(&pair.alice, &["messages", "bob"]);
    miyu_ok(&pair.bob, &["sync"]);
    assert_eq!(conversation(&pair.bob, "alice"), ["me: first"]);

    // Both on: a read message is marked read for its sender.
    miyu_ok(&pair.alice, &["settings", "set", "read_receipts", "on"]);
    miyu_ok(&pair.bob, &["send", "alice", "second"]);
    miyu_ok(&pair.alice, &["sync"]);
    miyu_ok(&pair.alice, &["messages", "bob"]);
    let printed = miyu_ok(&pair.bob, &["sync"]);
    assert!(printed.contains("alice read your messages"), "{printed}");
    assert_eq!(
        conversation(&pair.bob, "alice"),
        ["me: first", "me: second (read)"]
    );

    // Presence: Alice shares hers, but Bob, who shares nothing, sees nothing.
    miyu_ok(&pair.alice, &["settings", "set", "presence", "contacts"]);
    miyu_ok(&pair.bob, &["sync"]);
    let contacts = miyu_ok(&pair.bob, &["contacts"]);
    assert!(!contacts.contains("last seen"), "{contacts}");
    // Once Bob shares his too, Alice's next announcement shows.
    miyu_ok(&pair.bob, &["settings", "set", "presence", "contacts"]);
    miyu_ok(&pair.alice, &["settings", "set", "presence", "nobody"]);
    miyu_ok(&pair.alice, &["settings", "set", "presence", "contacts"]);
    miyu_ok(&pair.bob, &["sync"]);
    let contacts = miyu_ok(&pair.bob, &["contacts"]);
    assert!(contacts.contains("last seen"), "{contacts}");
    // And when Alice stops sharing, Bob forgets what she shared.
    miyu_ok(&pair.alice, &["settings", "set", "presence", "nobody"]);
    miyu_ok(&pair.bob, &["sync"]);
    let contacts = miyu_ok(&pair.bob, &["contacts"]);
    assert!(!contacts.contains("last seen"), "{contacts}");
}

#[test]
fn typing_shows_live_only_when_both_sides_turned_it_on() {
    let root = tempfile::tempdir().unwrap();
    let server = Server::start(&root.path().join("server"), "127.0.0.1:0", &[]);
    let pair = connect_pair(root.path(), &server.address);
    let output = miyu(&pair.alice, &["typing", "bob"]);
    assert!(output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("typing indicators are off"));

    miyu_ok(&pair.alice, &["settings", "set", "typing", "on"]);
    miyu_ok(&pair.bob, &["settings", "set", "typing", "on"]);
    let mut chat = Chat::start(&pair.bob, "alice");
    miyu_ok(&pair.alice, &["typing", "bob"]);
    chat.wait_for_line(|line| line.contains("alice is typing"));
}

#[test]
fn deleting_an_account_erases_it_on_the_server_and_on_disk() {
    let root = tempfile::tempdir().unwrap();
    let server_data = root.path().join("server");
    let server = Server::start(&server_data, "127.0.0.1:0", &[]);
    let pair = connect_pair(root.path(), &server.address);
    miyu_ok(&pair.bob, &["username", "set", "bob_leaving"]);
    miyu_ok(&pair.bob, &["settings", "set", "discoverable", "on"]);
    miyu_ok(&pair.alice, &["account", "lifetime", "3"]);
    assert_eq!(
        miyu(&pair.alice, &["account", "lifetime", "2"])
            .status
            .code(),
        Some(2)
    );

    let count = |sql: &str| -> i64 {
        let database = rusqlite::Connection::open(server_data.join("miyu.sqlite3")).unwrap();
        database.query_row(sql, [], |row| row.get(0)).unwrap()
    };
    assert_eq!(count("SELECT count(*) FROM devices"), 2);
    assert_eq!(count("SELECT count(*) FROM usernames"), 1);

    // Not without a confirmation.
    assert_eq!(
        miyu(&pair.bob, &["account", "delete"]).status.code(),
        Some(2)
    );
    miyu_ok(&pair.bob, &["account", "delete", "--yes"]);
    assert!(!pair.bob.exists(), "the profile folder is gone");
    for (table, left) in [
        ("devices", 1),
        ("accounts", 1),
        ("usernames", 0),
        ("group_members", 1),
        ("inbox", 0),
    ] {
        assert_eq!(
            count(&format!("SELECT count(*) FROM {table}")),
            left,
            "{table}"
        );
    }
    assert_eq!(
        count(
            "SELECT count(*) FROM key_packages WHERE device_id NOT IN (SELECT device_id FROM devices)"
        ),
        0
    );
    // Alice carries on; her lifetime choice was kept.
    assert_eq!(count("SELECT lifetime_days FROM accounts"), 91);
    miyu_ok(&pair.alice, &["send", "bob", "are you still there?"]);
    miyu_ok(&pair.alice, &["sync"]);
}
