//! End-to-end tests of groups: real `miyu` processes through a real server process.

mod common;

use std::path::{Path, PathBuf};

use common::{Server, conversation, id_of, miyu, miyu_ok};

/// A new account called `name` on `server`, in `root/name`.
fn profile(root: &Path, server: &str, name: &str) -> PathBuf {
    let profile = root.join(name);
    miyu_ok(&profile, &["init", "--server", server, "--name", name]);
    profile
}

/// Makes `name` a profile on `server` and a contact of `hub` (and `hub` of it).
fn contact_of(root: &Path, server: &str, hub: &Path, hub_name: &str, name: &str) -> PathBuf {
    let profile = profile(root, server, name);
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

/// Sends to a group and checks that the server took the unattributed post at once (the
/// client warns when the server refuses the group's posting key).
fn post(profile: &Path, group: &str, text: &str) {
    let output = miyu(profile, &["send", group, text]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(!stderr.contains("posting key"), "{stderr}");
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
    let alice = profile(root.path(), &server.address, "alice");
    let bob = contact_of(root.path(), &server.address, &alice, "alice", "bob");
    let carol = contact_of(root.path(), &server.address, &alice, "alice", "carol");
    let dave = contact_of(root.path(), &server.address, &alice, "alice", "dave");

    let created = miyu_ok(
        &alice,
        &["group", "create", "Quiet Harbor Club", "bob", "carol"],
    );
    assert!(created.contains("Quiet Harbor Club"), "{created}");
    // The group's ratchet tree went to the server apart from the Welcome, as a sealed blob of
    // the group: Bob's and Carol's inboxes hold one small Welcome naming it.
    {
        let db = rusqlite::Connection::open(server.data.join("miyu.sqlite3")).unwrap();
        let packages = served_welcomes(&server);
        assert_eq!(packages.len(), 2);
        assert_eq!(packages[0], packages[1]);
        assert!(packages[0].welcome.len() < 4096);
        let (group_id, size): (Vec<u8>, u64) = db
            .query_row(
                "SELECT group_id, size FROM blobs WHERE blob_id = ?1",
                [&packages[0].tree_blob],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
            .unwrap();
        assert_eq!(group_id.len(), 32);
        assert!(size > packages[0].tree_size);
    }
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

    post(&alice, "Quiet Harbor Club", "lanterns at dusk on friday");
    post(&bob, "Quiet Harbor Club", "bringing the map");
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

    // Replies, reactions, edits and deletions work in a group as between two people, and
    // each member may change only what it wrote.
    let map_at_carol = id_of(&carol, "Quiet Harbor Club", "bringing the map");
    miyu_ok(&carol, &["react", "Quiet Harbor Club", &map_at_carol, "👍"]);
    miyu_ok(
        &carol,
        &["reply", "Quiet Harbor Club", &map_at_carol, "which map?"],
    );
    let (code, _) = failure(
        &carol,
        &["edit", "Quiet Harbor Club", &map_at_carol, "no map"],
    );
    assert_eq!(code, Some(2));
    let map_at_bob = id_of(&bob, "Quiet Harbor Club", "bringing the map");
    miyu_ok(
        &bob,
        &[
            "edit",
            "Quiet Harbor Club",
            &map_at_bob,
            "bringing the old map",
        ],
    );
    for profile in [&alice, &bob] {
        miyu_ok(profile, &["sync"]);
    }
    let at_alice = conversation(&alice, "Quiet Harbor Club").join("\n");
    assert!(
        at_alice.contains("bob: bringing the old map (edited) [👍 carol]"),
        "{at_alice}"
    );
    let map_at_alice = id_of(&alice, "Quiet Harbor Club", "bringing the old map");
    assert!(
        at_alice.contains(&format!("carol: (reply to #{map_at_alice}) which map?")),
        "{at_alice}"
    );
    let at_bob = conversation(&bob, "Quiet Harbor Club").join("\n");
    assert!(
        at_bob.contains("me: bringing the old map (edited) [👍 ~carol]"),
        "{at_bob}"
    );
    let which = id_of(&bob, "Quiet Harbor Club", "which map?");
    let (code, _) = failure(&bob, &["delete", "Quiet Harbor Club", &which, "--everyone"]);
    assert_eq!(
        code,
        Some(2),
        "deleting someone else's message for everyone"
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
    post(&alice, "Quiet Harbor Club", "welcome dave");
    miyu_ok(&dave, &["sync"]);
    let at_dave = conversation(&dave, "Quiet Harbor Club").join("\n");
    assert!(at_dave.contains("alice: welcome dave"), "{at_dave}");
    assert!(!at_dave.contains("lanterns"), "{at_dave}");
    // A mention is marked for the one it names only.
    post(&alice, "Quiet Harbor Club", "@dave, glad you came");
    let told = miyu_ok(&dave, &["sync"]);
    assert!(
        told.contains("alice: @dave, glad you came (mentions you)"),
        "{told}"
    );
    miyu_ok(&bob, &["sync"]);
    let at_bob = conversation(&bob, "Quiet Harbor Club").join("\n");
    assert!(at_bob.contains("alice: @dave, glad you came"), "{at_bob}");
    assert!(!at_bob.contains("mentions you"), "{at_bob}");

    // Carol is removed: she is told, and cannot read or post what follows.
    miyu_ok(&alice, &["group", "remove", "Quiet Harbor Club", "carol"]);
    let told = miyu_ok(&carol, &["sync"]);
    assert!(told.contains("alice removed you"), "{told}");
    post(&alice, "Quiet Harbor Club", "the cove, not the pier");
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
    // A picture, end-to-end encrypted like the name: Bob saves the same image.
    let picture =
        image::RgbImage::from_fn(24, 16, |x, y| image::Rgb([x as u8 * 9, y as u8 * 13, 200]));
    let png = root.path().join("harbor.png");
    picture.save(&png).unwrap();
    miyu_ok(
        &alice,
        &["group", "set", "Harbor", "--avatar", png.to_str().unwrap()],
    );
    miyu_ok(&bob, &["sync"]);
    assert_eq!(info(&bob, "Harbor")["avatar_mime"], "image/png");
    let saved = root.path().join("saved.png");
    miyu_ok(
        &bob,
        &[
            "group",
            "avatar",
            "Harbor",
            "--out",
            saved.to_str().unwrap(),
        ],
    );
    assert_eq!(image::open(&saved).unwrap().to_rgb8(), picture);
    let png_bytes = std::fs::read(&png).unwrap();
    // Now Bob may remove Dave.
    miyu_ok(&bob, &["group", "remove", "Harbor", "~dave"]);
    miyu_ok(&alice, &["sync"]);
    assert_eq!(members(&alice, "Harbor").len(), 2);

    // Dave can be added again; his history stays.
    miyu_ok(&dave, &["sync"]);
    miyu_ok(&alice, &["group", "add", "Harbor", "dave"]);
    let joined = miyu_ok(&dave, &["sync"]);
    assert!(joined.contains("alice added you to Harbor"), "{joined}");
    post(&alice, "Harbor", "welcome back");
    miyu_ok(&dave, &["sync"]);
    let at_dave = conversation(&dave, "Harbor").join("\n");
    assert!(at_dave.contains("alice: welcome dave"), "{at_dave}");
    assert!(at_dave.contains("alice: welcome back"), "{at_dave}");

    // The server's files hold neither the group's names nor anything said in it.
    let files = server.files();
    assert_eq!(
        common::count_in_files(&files, &png_bytes[8..40]),
        0,
        "the picture"
    );
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

#[test]
fn two_admins_adding_at_the_same_moment_do_not_fork_the_group() {
    let root = tempfile::tempdir().unwrap();
    let server = Server::start(&root.path().join("server"), "127.0.0.1:0", &[]);
    let alice = profile(root.path(), &server.address, "alice");
    let bob = contact_of(root.path(), &server.address, &alice, "alice", "bob");
    let carol = contact_of(root.path(), &server.address, &alice, "alice", "carol");
    let dave = contact_of(root.path(), &server.address, &bob, "bob", "dave");
    miyu_ok(&alice, &["group", "create", "Relay", "bob"]);
    miyu_ok(&alice, &["group", "role", "Relay", "bob", "admin"]);
    miyu_ok(&bob, &["sync"]);

    // Both commit on the same epoch; the server takes one, the other follows it and retries.
    let spawn = |profile: &Path, contact: &str| {
        common::miyu_command()
            .arg("--profile")
            .arg(profile)
            .args(["group", "add", "Relay", contact])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let by_alice = spawn(&alice, "carol");
    let by_bob = spawn(&bob, "dave");
    for child in [by_alice, by_bob] {
        let output = child.wait_with_output().unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    for profile in [&carol, &dave] {
        let joined = miyu_ok(profile, &["sync"]);
        assert!(joined.contains("added you to Relay"), "{joined}");
    }
    // One group, one epoch: everyone reads everyone.
    post(&carol, "Relay", "carol here");
    post(&dave, "Relay", "dave here");
    for profile in [&alice, &bob, &carol, &dave] {
        miyu_ok(profile, &["sync"]);
        assert_eq!(members(profile, "Relay").len(), 4);
    }
    for (profile, wanted) in [
        (&alice, vec!["carol here", "dave here"]),
        (&bob, vec!["carol here", "dave here"]),
        (&carol, vec!["dave here"]),
        (&dave, vec!["carol here"]),
    ] {
        let lines = conversation(profile, "Relay").join("\n");
        for text in wanted {
            assert!(
                lines.contains(text),
                "{text:?} missing from {profile:?}: {lines}"
            );
        }
    }

    // The owner may leave only once she has handed the group over; the new owner's device
    // then commits her removal.
    let (code, stderr) = failure(&alice, &["group", "leave", "Relay"]);
    assert_eq!(code, Some(2));
    assert!(stderr.contains("hand it over"), "{stderr}");
    miyu_ok(&alice, &["group", "role", "Relay", "carol", "owner"]);
    let told = miyu_ok(&carol, &["sync"]);
    assert!(told.contains("owner"), "{told}");
    miyu_ok(&dave, &["sync"]);
    let roles = |profile: &Path| -> Vec<String> {
        let mut roles: Vec<String> = members(profile, "Relay")
            .into_iter()
            .map(|(_, role)| role)
            .collect();
        roles.sort();
        roles
    };
    assert_eq!(roles(&dave), ["admin", "admin", "member", "owner"]);
    let owner_at_dave: Vec<String> = members(&dave, "Relay")
        .into_iter()
        .filter(|(_, role)| role == "owner")
        .map(|(name, _)| name)
        .collect();
    assert_eq!(owner_at_dave, ["~carol"]);
    miyu_ok(&alice, &["group", "leave", "Relay"]);
    miyu_ok(&carol, &["sync"]);
    for profile in [&bob, &dave] {
        miyu_ok(profile, &["sync"]);
        assert_eq!(roles(profile), ["admin", "member", "owner"]);
    }
}

#[test]
fn who_may_add_me_is_enforced_by_my_device_and_a_left_member_is_removed() {
    let root = tempfile::tempdir().unwrap();
    let server = Server::start(&root.path().join("server"), "127.0.0.1:0", &[]);
    let alice = profile(root.path(), &server.address, "alice");
    let bob = contact_of(root.path(), &server.address, &alice, "alice", "bob");
    let carol = contact_of(root.path(), &server.address, &alice, "alice", "carol");

    // Bob lets nobody add him: the group never shows, and his device leaves it.
    miyu_ok(&bob, &["settings", "set", "group_invites", "nobody"]);
    miyu_ok(&alice, &["group", "create", "Kitchen", "bob", "carol"]);
    let seen = miyu_ok(&bob, &["sync"]);
    assert!(!seen.contains("Kitchen"), "{seen}");
    assert_eq!(miyu_ok(&bob, &["groups"]).trim(), "");
    let (code, _) = failure(&bob, &["messages", "Kitchen"]);
    assert_eq!(code, Some(2));
    // Alice's device, the owner's, removes the leaver's leaf; the server stops delivering.
    miyu_ok(&alice, &["sync"]);
    let names: Vec<String> = members(&alice, "Kitchen")
        .into_iter()
        .map(|m| m.0)
        .collect();
    assert_eq!(names, ["me", "carol"]);

    // An announcement-only group: Carol may read but not post; her device says so.
    miyu_ok(&carol, &["sync"]);
    miyu_ok(&alice, &["group", "set", "Kitchen", "--posting", "admins"]);
    miyu_ok(&carol, &["sync"]);
    let (code, error) = failure(&carol, &["send", "Kitchen", "may I?"]);
    assert_eq!(code, Some(2), "{error}");
    assert!(error.contains("only admins may post"), "{error}");
    miyu_ok(&alice, &["send", "Kitchen", "dinner at eight"]);
    miyu_ok(&carol, &["sync"]);
    assert!(
        conversation(&carol, "Kitchen")
            .join("\n")
            .contains("alice: dinner at eight")
    );

    // Carol leaves; Alice's device removes her, and she gets nothing more.
    miyu_ok(&carol, &["group", "leave", "Kitchen"]);
    let told = miyu_ok(&alice, &["sync"]);
    assert!(told.contains("carol left the group"), "{told}");
    miyu_ok(&alice, &["send", "Kitchen", "after carol left"]);
    miyu_ok(&carol, &["sync"]);
    let lines = conversation(&carol, "Kitchen").join("\n");
    assert!(lines.contains("you left the group"), "{lines}");
    assert!(!lines.contains("after carol left"), "{lines}");
    let names: Vec<String> = members(&alice, "Kitchen")
        .into_iter()
        .map(|m| m.0)
        .collect();
    assert_eq!(names, ["me"]);
}

/// Issue acceptance: a 50-member group with several members posting at the same time; every
/// member gets every message once, in the same order (the server log's).
#[test]
fn fifty_members_with_concurrent_posters_see_every_message_once_in_one_order() {
    const MEMBERS: usize = 50;
    const POSTERS: usize = 6;
    const POSTS: usize = 3;
    let root = tempfile::tempdir().unwrap();
    let server = Server::start(&root.path().join("server"), "127.0.0.1:0", &[]);
    let owner = profile(root.path(), &server.address, "m00");
    let names: Vec<String> = (1..MEMBERS).map(|n| format!("m{n:02}")).collect();
    let profiles: Vec<PathBuf> = names
        .iter()
        .map(|name| contact_of(root.path(), &server.address, &owner, "m00", name))
        .collect();
    let mut create = vec!["group", "create", "Fifty"];
    create.extend(names.iter().map(String::as_str));
    miyu_ok(&owner, &create);
    for profile in &profiles {
        miyu_ok(profile, &["sync"]);
    }

    // Posters (the owner among them) post at the same time, each its messages in turn.
    let mut everyone = vec![owner.clone()];
    everyone.extend(profiles.iter().cloned());
    std::thread::scope(|scope| {
        for (number, profile) in everyone.iter().take(POSTERS).enumerate() {
            scope.spawn(move || {
                for post in 0..POSTS {
                    miyu_ok(
                        profile,
                        &["send", "Fifty", &format!("p{number} says {post}")],
                    );
                }
            });
        }
    });

    // What each member received from the others, in its order.
    let received = |profile: &Path| -> Vec<String> {
        let json: serde_json::Value =
            serde_json::from_str(&miyu_ok(profile, &["--json", "messages", "Fifty"])).unwrap();
        json.as_array()
            .unwrap()
            .iter()
            .filter(|m| m["kind"] == "text" && m["outgoing"] == false)
            .map(|m| m["body"].as_str().unwrap().to_string())
            .collect()
    };
    let sent = |number: usize| -> Vec<String> {
        (0..POSTS)
            .map(|post| format!("p{number} says {post}"))
            .collect()
    };
    let mut reference: Option<Vec<String>> = None;
    for (number, profile) in everyone.iter().enumerate().rev() {
        miyu_ok(profile, &["sync"]);
        let got = received(profile);
        let own = if number < POSTERS {
            sent(number)
        } else {
            Vec::new()
        };
        let reference = reference.get_or_insert_with(|| {
            // A member who did not post got everything: the log's order.
            assert_eq!(got.len(), POSTERS * POSTS, "{got:?}");
            let mut unique = got.clone();
            unique.sort();
            unique.dedup();
            assert_eq!(unique.len(), got.len(), "a message arrived twice: {got:?}");
            got.clone()
        });
        let expected: Vec<String> = reference
            .iter()
            .filter(|body| !own.contains(body))
            .cloned()
            .collect();
        assert_eq!(got, expected, "member {number}");
        // Each poster's own messages went out in order, once each.
        for (index, body) in own.iter().enumerate() {
            let position = reference.iter().position(|b| b == body).unwrap();
            if index > 0 {
                let before = reference.iter().position(|b| *b == own[index - 1]).unwrap();
                assert!(before < position, "{reference:?}");
            }
        }
    }
}

/// The server takes a group post from a connection that never authenticated, if it is signed
/// with the epoch's posting key; it cannot tell which member sent it.
#[test]
fn a_group_post_names_no_poster_and_needs_the_posting_key_of_the_epoch() {
    use ed25519_dalek::{Signer, SigningKey};
    use miyu_proto::wire::{
        self, ErrorCode, client_frame::Body as Request, server_frame::Body as Reply,
    };

    let root = tempfile::tempdir().unwrap();
    let server = Server::start(&root.path().join("server"), "127.0.0.1:0", &[]);
    let address: miyu_proto::ServerAddress = server.address.parse().unwrap();
    let group_id = vec![5u8; 32];
    let posting = SigningKey::from_bytes(&[9; 32]);
    let signed = |key: &SigningKey, epoch: u64, payload: &[u8]| wire::GroupPost {
        group_id: group_id.clone(),
        epoch,
        payload: payload.to_vec(),
        expires_at: 0,
        signature: key
            .sign(&miyu_proto::cert::group_post_payload(
                &group_id, epoch, 0, payload,
            ))
            .to_bytes()
            .to_vec(),
    };
    let code = |error: wire::Error| ErrorCode::try_from(error.code).unwrap();
    common::runtime().block_on(async {
        let (mut member, _keys) = common::register(&address).await;
        let id = member
            .send(Request::CreateGroup(wire::CreateGroup {
                group_id: group_id.clone(),
                epoch: 0,
                posting_key: posting.verifying_key().to_bytes().to_vec(),
                ..Default::default()
            }))
            .await
            .unwrap();
        assert!(matches!(
            common::answer(&mut member, id).await,
            Ok(Reply::Done(_))
        ));

        let mut anonymous = miyu_client::net::Connection::open(&address, None)
            .await
            .unwrap();
        let id = anonymous
            .send(Request::GroupPost(signed(&posting, 0, b"from a member")))
            .await
            .unwrap();
        let Ok(Reply::Posted(posted)) = common::answer(&mut anonymous, id).await else {
            panic!("the signed post was refused");
        };
        // The member gets it like any entry: not marked as its own.
        loop {
            let frame = member.receive().await.unwrap();
            if let Some(Reply::Delivery(wire::Delivery {
                entry: Some(wire::delivery::Entry::GroupEntry(entry)),
            })) = frame.body
            {
                assert_eq!(entry.seq, posted.seq);
                assert_eq!(entry.payload, b"from a member");
                assert!(!entry.own);
                break;
            }
        }

        // Another key, another epoch, an unknown group: refused.
        let stranger = SigningKey::from_bytes(&[8; 32]);
        for (post, expected) in [
            (signed(&stranger, 0, b"x"), ErrorCode::Forbidden),
            (signed(&posting, 1, b"x"), ErrorCode::EpochMismatch),
            (
                wire::GroupPost {
                    group_id: vec![6; 32],
                    ..signed(&posting, 0, b"x")
                },
                ErrorCode::NotFound,
            ),
        ] {
            let id = anonymous.send(Request::GroupPost(post)).await.unwrap();
            let error = common::answer(&mut anonymous, id).await.unwrap_err();
            assert_eq!(code(error), expected);
        }
        // On an authenticated connection it would say who posts: refused.
        let id = member
            .send(Request::GroupPost(signed(&posting, 0, b"x")))
            .await
            .unwrap();
        let error = common::answer(&mut member, id).await.unwrap_err();
        assert_eq!(code(error), ErrorCode::BadSequence);
    });
}

#[test]
fn a_group_link_lets_people_ask_to_join_with_or_without_approval() {
    let root = tempfile::tempdir().unwrap();
    let server = Server::start(&root.path().join("server"), "127.0.0.1:0", &[]);
    let init = |name: &str| profile(root.path(), &server.address, name);
    let (alice, erin, frank, gina) = (init("alice"), init("erin"), init("frank"), init("gina"));
    miyu_ok(&alice, &["group", "create", "Open Door"]);

    // A link that needs Alice's approval. Erin lets nobody add her, but she asked for this.
    miyu_ok(&erin, &["settings", "set", "group_invites", "nobody"]);
    let link = miyu_ok(&alice, &["group", "invite", "Open Door", "--approval"]);
    let asked = miyu_ok(&erin, &["accept", link.trim()]);
    assert!(asked.contains("asked to join their group"), "{asked}");
    let told = miyu_ok(&alice, &["sync"]);
    assert!(told.contains("erin asks to join"), "{told}");
    assert!(miyu_ok(&alice, &["group", "requests", "Open Door"]).contains("erin"));
    miyu_ok(&erin, &["sync"]);
    assert_eq!(
        miyu_ok(&erin, &["groups"]).trim(),
        "",
        "added before approval"
    );
    miyu_ok(&alice, &["group", "approve", "Open Door", "erin"]);
    let joined = miyu_ok(&erin, &["sync"]);
    assert!(joined.contains("alice added you to Open Door"), "{joined}");
    assert_eq!(
        miyu_ok(&alice, &["group", "requests", "Open Door"]).trim(),
        ""
    );

    // A link for two, without approval: each is added at Alice's next sync; a third is refused.
    let link = miyu_ok(&alice, &["group", "invite", "Open Door", "--uses", "2"]);
    miyu_ok(&frank, &["accept", link.trim()]);
    miyu_ok(&gina, &["accept", link.trim()]);
    miyu_ok(&alice, &["sync"]);
    for profile in [&frank, &gina] {
        let joined = miyu_ok(profile, &["sync"]);
        assert!(joined.contains("added you to Open Door"), "{joined}");
    }
    let harry = init("harry");
    let (code, error) = failure(&harry, &["accept", link.trim()]);
    assert_eq!(code, Some(2), "{error}");
    assert!(error.contains("already used"), "{error}");
    // A revoked link makes its user a stranger (a message request), not someone to add.
    miyu_ok(&alice, &["group", "invite", "Open Door", "--uses", "5"]);
    let listed = miyu_ok(&alice, &["--json", "group", "links", "Open Door"]);
    let links: serde_json::Value = serde_json::from_str(&listed).unwrap();
    let links = links.as_array().unwrap();
    assert_eq!(links.len(), 1, "{listed}");
    let id = links[0]["id"].as_i64().unwrap().to_string();
    let link = {
        // The link itself is printed only when made: make another and revoke the first.
        miyu_ok(&alice, &["group", "revoke-link", "Open Door", &id]);
        assert_eq!(miyu_ok(&alice, &["group", "links", "Open Door"]).trim(), "");
        let fresh = miyu_ok(&alice, &["group", "invite", "Open Door"]);
        let listed: serde_json::Value =
            serde_json::from_str(&miyu_ok(&alice, &["--json", "group", "links", "Open Door"]))
                .unwrap();
        let fresh_id = listed[0]["id"].as_i64().unwrap().to_string();
        miyu_ok(&alice, &["group", "revoke-link", "Open Door", &fresh_id]);
        fresh
    };
    miyu_ok(&harry, &["accept", link.trim()]);
    let told = miyu_ok(&alice, &["sync"]);
    assert!(told.contains("message request"), "{told}");
    assert!(!told.contains("asks to join"), "{told}");
    post(&gina, "Open Door", "hello all");
    for profile in [&alice, &erin, &frank] {
        miyu_ok(profile, &["sync"]);
        assert!(
            conversation(profile, "Open Door")
                .join("\n")
                .contains("hello all")
        );
    }
    assert_eq!(members(&alice, "Open Door").len(), 4);
}

/// When the server refuses a group's posting key (here: it holds a wrong one), the sender's
/// messages wait while its device registers a fresh key with a key update, then go out
/// unattributed; they are never posted as the sender.
#[test]
fn a_refused_posting_key_is_renewed_and_the_held_message_goes_out() {
    let root = tempfile::tempdir().unwrap();
    let server = Server::start(&root.path().join("server"), "127.0.0.1:0", &[]);
    let alice = profile(root.path(), &server.address, "alice");
    let bob = contact_of(root.path(), &server.address, &alice, "alice", "bob");
    miyu_ok(&alice, &["group", "create", "Desk", "bob"]);
    miyu_ok(&bob, &["sync"]);
    post(&alice, "Desk", "before");

    let database = rusqlite::Connection::open(server.data.join("miyu.sqlite3")).unwrap();
    database
        .busy_timeout(std::time::Duration::from_secs(10))
        .unwrap();
    let epoch = |database: &rusqlite::Connection| -> u64 {
        database
            .query_row(
                "SELECT epoch FROM groups WHERE length(group_id) = 32",
                [],
                |row| row.get(0),
            )
            .unwrap()
    };
    let before = epoch(&database);
    assert_eq!(
        database
            .execute(
                "UPDATE groups SET posting_key = ?1 WHERE length(group_id) = 32",
                [vec![7u8; 32]],
            )
            .unwrap(),
        1
    );
    let output = miyu(&alice, &["send", "Desk", "held, then sent"]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // A key update moved the group on and registered a key the members derive.
    assert_eq!(epoch(&database), before + 1);
    let key: Vec<u8> = database
        .query_row(
            "SELECT posting_key FROM groups WHERE length(group_id) = 32",
            [],
            |row| row.get(0),
        )
        .unwrap();
    assert_ne!(key, vec![7u8; 32]);
    miyu_ok(&bob, &["sync"]);
    let lines = conversation(&bob, "Desk");
    assert!(
        lines.iter().any(|line| line == "alice: held, then sent"),
        "{lines:?}"
    );
    // Bob's own post uses the renewed key at once.
    post(&bob, "Desk", "bob after");
    miyu_ok(&alice, &["sync"]);
    assert!(
        conversation(&alice, "Desk")
            .iter()
            .any(|line| line.ends_with("bob after"))
    );
}

/// The Welcomes in the server's inboxes that name a served tree.
fn served_welcomes(server: &Server) -> Vec<miyu_proto::wire::WelcomePackage> {
    use prost::Message as _;
    let db = rusqlite::Connection::open(server.data.join("miyu.sqlite3")).unwrap();
    let payloads: Vec<Vec<u8>> = db
        .prepare("SELECT payload FROM inbox")
        .unwrap()
        .query_map([], |row| row.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    payloads
        .iter()
        .filter_map(|payload| miyu_proto::wire::WelcomePackage::decode(payload.as_slice()).ok())
        .filter(|package| !package.tree_blob.is_empty())
        .collect()
}

/// The tree blob named by the one Welcome in the server's inboxes that names one.
fn served_tree_file(server: &Server) -> PathBuf {
    let blobs: Vec<Vec<u8>> = served_welcomes(server)
        .into_iter()
        .map(|package| package.tree_blob)
        .collect();
    assert_eq!(blobs.len(), 1, "one Welcome naming a tree");
    let id = miyu_proto::blob::BlobId(blobs[0].as_slice().try_into().unwrap());
    server.data.join("blobs").join(id.to_string())
}

/// A Welcome whose group tree cannot be had is dropped, at once when the blob is short (that
/// will not change) or after a few syncs when the server fails to serve it, and never holds up
/// what comes after it.
#[test]
fn a_group_tree_that_cannot_be_fetched_does_not_hold_up_the_inbox() {
    let root = tempfile::tempdir().unwrap();
    let server = Server::start(&root.path().join("server"), "127.0.0.1:0", &[]);
    let alice = profile(root.path(), &server.address, "alice");
    let bob = contact_of(root.path(), &server.address, &alice, "alice", "bob");

    miyu_ok(&alice, &["group", "create", "Short", "bob"]);
    let file = served_tree_file(&server);
    let length = std::fs::metadata(&file).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .unwrap()
        .set_len(length / 2)
        .unwrap();
    miyu_ok(&bob, &["sync"]);
    assert!(!miyu_ok(&bob, &["groups"]).contains("Short"));

    miyu_ok(&alice, &["group", "create", "Gone", "bob"]);
    std::fs::remove_file(served_tree_file(&server)).unwrap();
    for _ in 1..5 {
        let (_, stderr) = failure(&bob, &["sync"]);
        assert!(!stderr.is_empty());
    }
    miyu_ok(&bob, &["sync"]);
    assert!(!miyu_ok(&bob, &["groups"]).contains("Gone"));
    miyu_ok(&alice, &["send", "bob", "still here"]);
    miyu_ok(&bob, &["sync"]);
    assert!(
        conversation(&bob, "alice")
            .iter()
            .any(|line| line == "alice: still here")
    );
}
