//! End-to-end tests of groups: real `miyu` processes through a real server process.

mod common;

use std::path::{Path, PathBuf};

use common::{Server, conversation, miyu, miyu_ok};

/// Makes `name` a profile on `server` and a contact of `hub` (and `hub` of it).
fn contact_of(root: &Path, server: &str, hub: &Path, hub_name: &str, name: &str) -> PathBuf {
    let profile = root.join(name);
    miyu_ok(&profile, &["init", "--server", server, "--name", name]);
    let link = miyu_ok(hub, &["invite"]);
    miyu_ok(&profile, &["accept", link.trim(), "--name", hub_name]);
    miyu_ok(hub, &["sync"]);
    miyu_ok(&profile, &["sync"]);
    profile
}

fn info(profile: &Path, group: &str) -> serde_json::Value {
    serde_json::from_str(&miyu_ok(profile, &["--json", "group", "info", group])).unwrap()
}

/// Member names and roles as `group info --json` lists them.
fn members(profile: &Path, group: &str) -> Vec<(String, String)> {
    info(profile, group)["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["name"].as_str().unwrap().to_string(),
                m["role"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn failure(profile: &Path, args: &[&str]) -> (Option<i32>, String) {
    let output = miyu(profile, args);
    assert!(!output.status.success(), "miyu {args:?} succeeded");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn a_group_grows_and_shrinks_and_the_server_never_sees_its_name_or_texts() {
    let root = tempfile::tempdir().unwrap();
    let server = Server::start(&root.path().join("server"), "127.0.0.1:0", &[]);
    let alice = root.path().join("alice");
    miyu_ok(
        &alice,
        &["init", "--server", &server.address, "--name", "alice"],
    );
    let bob = contact_of(root.path(), &server.address, &alice, "alice", "bob");
    let carol = contact_of(root.path(), &server.address, &alice, "alice", "carol");
    let dave = contact_of(root.path(), &server.address, &alice, "alice", "dave");

    let created = miyu_ok(
        &alice,
        &["group", "create", "Quiet Harbor Club", "bob", "carol"],
    );
    assert!(created.contains("Quiet Harbor Club"), "{created}");
    let joined = miyu_ok(&bob, &["sync"]);
    assert!(
        joined.contains("alice added you to Quiet Harbor Club"),
        "{joined}"
    );
    miyu_ok(&carol, &["sync"]);
    // Carol introduced herself to the group when she joined; Bob, who does not know her,
    // shows the name she gave marked with `~`.
    miyu_ok(&bob, &["sync"]);
    assert_eq!(
        members(&bob, "Quiet Harbor Club"),
        [("alice", "owner"), ("me", "member"), ("~carol", "member")]
            .map(|(name, role)| (name.to_string(), role.to_string()))
    );

    miyu_ok(
        &alice,
        &["send", "Quiet Harbor Club", "lanterns at dusk on friday"],
    );
    miyu_ok(&bob, &["send", "Quiet Harbor Club", "bringing the map"]);
    miyu_ok(&carol, &["sync"]);
    assert_eq!(
        conversation(&carol, "Quiet Harbor Club")
            .into_iter()
            .filter(|line| !line.starts_with("--"))
            .collect::<Vec<_>>(),
        [
            "alice: lanterns at dusk on friday",
            "~bob: bringing the map"
        ]
    );

    // A member may not add, remove or rename; the owner may.
    let (code, error) = failure(&bob, &["group", "add", "Quiet Harbor Club", "alice"]);
    assert_eq!(code, Some(2), "{error}");
    let (code, error) = failure(&bob, &["group", "remove", "Quiet Harbor Club", "carol"]);
    assert_eq!(code, Some(2), "{error}");
    assert!(error.contains("may not remove"), "{error}");
    let (code, error) = failure(
        &bob,
        &["group", "set", "Quiet Harbor Club", "--name", "Mine"],
    );
    assert_eq!(code, Some(2), "{error}");

    // Dave joins later: he reads what follows, not what came before.
    miyu_ok(&alice, &["group", "add", "Quiet Harbor Club", "dave"]);
    let joined = miyu_ok(&dave, &["sync"]);
    assert!(joined.contains("alice added you"), "{joined}");
    miyu_ok(&alice, &["send", "Quiet Harbor Club", "welcome dave"]);
    miyu_ok(&dave, &["sync"]);
    let at_dave = conversation(&dave, "Quiet Harbor Club").join("\n");
    assert!(at_dave.contains("alice: welcome dave"), "{at_dave}");
    assert!(!at_dave.contains("lanterns"), "{at_dave}");

    // Carol is removed: she is told, and cannot read or post what follows.
    miyu_ok(&alice, &["group", "remove", "Quiet Harbor Club", "carol"]);
    let told = miyu_ok(&carol, &["sync"]);
    assert!(told.contains("alice removed you"), "{told}");
    miyu_ok(
        &alice,
        &["send", "Quiet Harbor Club", "the cove, not the pier"],
    );
    miyu_ok(&carol, &["sync"]);
    let at_carol = conversation(&carol, "Quiet Harbor Club").join("\n");
    assert!(!at_carol.contains("the cove"), "{at_carol}");
    let (_, error) = failure(&carol, &["send", "Quiet Harbor Club", "hello?"]);
    assert!(error.contains("removed"), "{error}");
    for profile in [&bob, &dave] {
        miyu_ok(profile, &["sync"]);
        let lines = conversation(profile, "Quiet Harbor Club").join("\n");
        assert!(lines.contains("alice: the cove, not the pier"), "{lines}");
        assert!(
            lines.contains("alice removed ~carol") || lines.contains("alice removed carol"),
            "{lines}"
        );
    }

    // The owner renames it and makes Bob an admin; everyone follows.
    miyu_ok(
        &alice,
        &[
            "group",
            "set",
            "Quiet Harbor Club",
            "--name",
            "Harbor",
            "--description",
            "sea and maps",
        ],
    );
    miyu_ok(&alice, &["group", "role", "Harbor", "bob", "admin"]);
    miyu_ok(&bob, &["sync"]);
    let at_bob = info(&bob, "Harbor");
    assert_eq!(at_bob["description"], "sea and maps");
    assert_eq!(at_bob["my_role"], "admin");
    // Now Bob may remove Dave.
    miyu_ok(&bob, &["group", "remove", "Harbor", "~dave"]);
    miyu_ok(&alice, &["sync"]);
    assert_eq!(members(&alice, "Harbor").len(), 2);

    // The server's files hold neither the group's names nor anything said in it.
    let files = server.files();
    for needle in [
        "Quiet Harbor Club",
        "Harbor",
        "sea and maps",
        "lanterns at dusk",
        "bringing the map",
        "the cove, not the pier",
    ] {
        assert_eq!(
            common::count_in_files(&files, needle.as_bytes()),
            0,
            "{needle:?} found in the server's files"
        );
    }
}
