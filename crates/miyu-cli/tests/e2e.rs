//! End-to-end tests: the real `miyu-server` binary and real `miyu` clients, talking TLS over
//! loopback, with their state in temporary folders.

mod common;

use std::path::Path;

use common::{
    Chat, Server, answer, connect_pair, conversation, count_in_files, miyu, miyu_ok, register,
    register_keys, register_second_device, runtime,
};
use miyu_client::net::Connection;
use miyu_proto::ServerAddress;
use miyu_proto::frame::{self, MAX_FRAME_BYTES, PROTOCOL_VERSION};
use miyu_proto::wire::{
    self, ErrorCode, client_frame::Body as Request, server_frame::Body as Reply,
};

fn unique(label: &str) -> String {
    let mut bytes = [0u8; 8];
    getrandom(&mut bytes);
    format!(
        "{label}-{}",
        bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()
    )
}

fn getrandom(bytes: &mut [u8]) {
    use std::io::Read;
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(bytes)
        .unwrap();
}

#[test]
fn accounts_connect_by_invite_and_learn_each_others_names_end_to_end() {
    let root = tempfile::tempdir().unwrap();
    let server = Server::start(&root.path().join("server"), "127.0.0.1:0", &[]);
    let pair = connect_pair(root.path(), &server.address);

    // The inviter sees the name the invitee chose at `init`, learned inside MLS.
    let contacts = miyu_ok(&pair.alice, &["contacts"]);
    assert!(contacts.starts_with("bob\t"), "{contacts}");
    assert!(contacts.contains("not verified"));
    let bob_account = miyu_ok(&pair.bob, &["contacts", "--json"]);
    assert!(bob_account.contains("\"name\":\"alice\""), "{bob_account}");

    // Both sides compute the same safety number.
    let alice_number = miyu_ok(&pair.alice, &["safety-number", "bob"]);
    let bob_number = miyu_ok(&pair.bob, &["safety-number", "alice"]);
    assert_eq!(alice_number, bob_number);
    assert_eq!(alice_number.trim().len(), 60 + 11);

    miyu_ok(&pair.alice, &["rename", "bob", "robert"]);
    miyu_ok(&pair.alice, &["send", "robert", "hello robert"]);
    miyu_ok(&pair.bob, &["sync"]);
    assert_eq!(conversation(&pair.bob, "alice"), ["alice: hello robert"]);

    // A used invite cannot be used again, and the error says what to do.
    let carol = root.path().join("carol");
    miyu_ok(
        &carol,
        &["init", "--server", &server.address, "--name", "carol"],
    );
    let link = miyu_ok(&pair.alice, &["invite"]);
    miyu_ok(&carol, &["accept", link.trim()]);
    let dave = root.path().join("dave");
    miyu_ok(
        &dave,
        &["init", "--server", &server.address, "--name", "dave"],
    );
    let again = miyu(&dave, &["accept", link.trim()]);
    assert_eq!(again.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&again.stderr).contains("already used or has expired"));
    // Accepting someone who is already a contact is refused too.
    let link = miyu_ok(&pair.alice, &["invite"]);
    let twice = miyu(&pair.bob, &["accept", link.trim()]);
    assert_eq!(twice.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&twice.stderr).contains("already a contact"));
}

#[test]
fn live_chat_delivers_both_ways() {
    let root = tempfile::tempdir().unwrap();
    let server = Server::start(&root.path().join("server"), "127.0.0.1:0", &[]);
    let pair = connect_pair(root.path(), &server.address);
    let mut alice = Chat::start(&pair.alice, "bob");
    let mut bob = Chat::start(&pair.bob, "alice");

    let to_bob = unique("live-to-bob");
    alice.type_line(&to_bob);
    let seen = bob.wait_for_line(|line| line.contains(&to_bob));
    assert!(seen.contains("alice: "), "{seen}");

    let to_alice = unique("live-to-alice");
    bob.type_line(&to_alice);
    let seen = alice.wait_for_line(|line| line.contains(&to_alice));
    assert!(seen.contains("bob: "), "{seen}");
}

#[test]
fn offline_recipient_gets_messages_in_order_after_reconnecting() {
    let root = tempfile::tempdir().unwrap();
    let server = Server::start(&root.path().join("server"), "127.0.0.1:0", &[]);
    let pair = connect_pair(root.path(), &server.address);
    for text in ["first", "second", "third"] {
        miyu_ok(&pair.alice, &["send", "bob", text]);
    }
    let printed = miyu_ok(&pair.bob, &["sync"]);
    assert_eq!(printed.lines().count(), 3, "{printed}");
    assert_eq!(
        conversation(&pair.bob, "alice"),
        ["alice: first", "alice: second", "alice: third"]
    );
    assert_eq!(
        conversation(&pair.alice, "bob"),
        ["me: first", "me: second", "me: third"]
    );
}

#[test]
fn an_acknowledged_message_survives_kill_9_and_is_delivered_exactly_once() {
    let root = tempfile::tempdir().unwrap();
    let server = Server::start(&root.path().join("server"), "127.0.0.1:0", &[]);
    let pair = connect_pair(root.path(), &server.address);
    let text = unique("durable");
    // `send` exits 0 only after the server acknowledged, so the crash comes after the ack.
    miyu_ok(&pair.alice, &["send", "bob", &text]);
    let (data, listen) = server.kill9();

    // While the server is down, a send fails with a network error, and the message waits.
    let down = miyu(&pair.alice, &["send", "bob", "while down"]);
    assert_eq!(
        down.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&down.stderr)
    );

    let _server = Server::start(&data, &listen.to_string(), &[]);
    miyu_ok(&pair.bob, &["sync"]);
    miyu_ok(&pair.bob, &["sync"]);
    assert_eq!(conversation(&pair.bob, "alice"), [format!("alice: {text}")]);

    // The message queued while the server was down goes out on the next connection.
    miyu_ok(&pair.alice, &["sync"]);
    miyu_ok(&pair.bob, &["sync"]);
    assert_eq!(
        conversation(&pair.bob, "alice"),
        [format!("alice: {text}"), "alice: while down".to_string()]
    );
}

#[test]
fn a_key_update_moves_the_epoch_and_a_stale_sender_catches_up() {
    let root = tempfile::tempdir().unwrap();
    let server = Server::start(&root.path().join("server"), "127.0.0.1:0", &[]);
    let pair = connect_pair(root.path(), &server.address);
    // Bob's commit wins epoch 1; Alice has not seen it when she sends at epoch 1, is refused,
    // processes the commit and sends again at epoch 2.
    miyu_ok(&pair.bob, &["update-keys", "alice"]);
    miyu_ok(&pair.alice, &["send", "bob", "sent across a key update"]);
    miyu_ok(&pair.bob, &["sync"]);
    assert_eq!(
        conversation(&pair.bob, "alice"),
        ["alice: sent across a key update"]
    );
    miyu_ok(&pair.bob, &["send", "alice", "and back"]);
    miyu_ok(&pair.alice, &["sync"]);
    assert_eq!(
        conversation(&pair.alice, "bob"),
        ["me: sent across a key update", "bob: and back"]
    );
}

#[test]
fn simultaneous_key_updates_never_fork_the_conversation() {
    let root = tempfile::tempdir().unwrap();
    let server = Server::start(&root.path().join("server"), "127.0.0.1:0", &[]);
    let pair = connect_pair(root.path(), &server.address);
    for round in 0..3 {
        let spawn = |profile: &Path, contact: &str| {
            common::miyu_command()
                .arg("--profile")
                .arg(profile)
                .args(["update-keys", contact])
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        };
        let alice = spawn(&pair.alice, "bob");
        let bob = spawn(&pair.bob, "alice");
        for child in [alice, bob] {
            let output = child.wait_with_output().unwrap();
            assert!(
                output.status.success(),
                "{}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        miyu_ok(&pair.alice, &["send", "bob", &format!("round {round}")]);
        miyu_ok(&pair.bob, &["sync"]);
        miyu_ok(&pair.bob, &["send", "alice", &format!("reply {round}")]);
        miyu_ok(&pair.alice, &["sync"]);
    }
    assert_eq!(
        conversation(&pair.bob, "alice"),
        [
            "alice: round 0",
            "me: reply 0",
            "alice: round 1",
            "me: reply 1",
            "alice: round 2",
            "me: reply 2"
        ]
    );
}

#[test]
fn server_files_and_logs_never_contain_plaintext_or_names() {
    let root = tempfile::tempdir().unwrap();
    let server = Server::start(&root.path().join("server"), "127.0.0.1:0", &[]);
    let alice = root.path().join("alice");
    let bob = root.path().join("bob");
    let alice_name = unique("alicename");
    let bob_name = unique("bobname");
    miyu_ok(
        &alice,
        &["init", "--server", &server.address, "--name", &alice_name],
    );
    miyu_ok(
        &bob,
        &["init", "--server", &server.address, "--name", &bob_name],
    );
    let link = miyu_ok(&alice, &["invite"]);
    miyu_ok(&bob, &["accept", link.trim()]);
    miyu_ok(&alice, &["sync"]);
    miyu_ok(&bob, &["sync"]);

    let marker = unique("plaintext-marker");
    miyu_ok(&alice, &["send", &bob_name, &marker]);
    // Bob is offline: the ciphertext sits in the server's database now.
    for needle in [&marker, &alice_name, &bob_name] {
        assert_eq!(
            count_in_files(&server.files(), needle.as_bytes()),
            0,
            "{needle} leaked"
        );
    }
    miyu_ok(&bob, &["sync"]);
    assert_eq!(
        conversation(&bob, &alice_name),
        [format!("{alice_name}: {marker}")]
    );
    let files = server.files();
    server.terminate();
    for needle in [&marker, &alice_name, &bob_name] {
        assert_eq!(
            count_in_files(&files, needle.as_bytes()),
            0,
            "{needle} leaked"
        );
    }
    // The log is there and was written (at debug level), so the scan above meant something.
    assert!(std::fs::metadata(&files[0]).unwrap().len() > 0);
    assert_eq!(
        count_in_files(&files, b"127.0.0.1"),
        0,
        "an IP address was logged or stored"
    );
}

// ---------------------------------------------------------------------------------------------
// Raw protocol: what a hostile client can and cannot do.
// ---------------------------------------------------------------------------------------------

/// Sends a request that must be refused, and returns the error code it was refused with.
async fn refused(connection: &mut Connection, body: Request) -> ErrorCode {
    let id = connection.send(body).await.unwrap();
    code(&answer(connection, id).await.unwrap_err())
}

/// The next error frame, whatever request it answers.
async fn next_error(connection: &mut Connection) -> wire::Error {
    loop {
        if let Some(Reply::Error(error)) = connection.receive().await.unwrap().body {
            return error;
        }
    }
}

fn code(error: &wire::Error) -> ErrorCode {
    ErrorCode::try_from(error.code).unwrap()
}

fn group_ids(server_data: &Path) -> Vec<Vec<u8>> {
    let database = rusqlite::Connection::open(server_data.join("miyu.sqlite3")).unwrap();
    let mut statement = database.prepare("SELECT group_id FROM groups").unwrap();
    statement
        .query_map([], |row| row.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

#[test]
fn malformed_oversized_and_unauthenticated_frames_get_errors_while_others_chat() {
    let root = tempfile::tempdir().unwrap();
    let server = Server::start(&root.path().join("server"), "127.0.0.1:0", &[]);
    let pair = connect_pair(root.path(), &server.address);
    let address: ServerAddress = server.address.parse().unwrap();
    let runtime = runtime();
    runtime.block_on(async {
        let mut hostile = Connection::open(&address, None).await.unwrap();

        hostile
            .send_raw(vec![0xff, 0x00, 0x13, 0x37])
            .await
            .unwrap();
        assert_eq!(
            code(&next_error(&mut hostile).await),
            ErrorCode::MalformedFrame
        );

        hostile
            .send_raw(vec![0u8; MAX_FRAME_BYTES + 1])
            .await
            .unwrap();
        assert_eq!(
            code(&next_error(&mut hostile).await),
            ErrorCode::FrameTooLarge
        );

        hostile.send_text("hello?").await.unwrap();
        assert_eq!(
            code(&next_error(&mut hostile).await),
            ErrorCode::MalformedFrame
        );

        let future = frame::encode(&wire::ClientFrame {
            version: PROTOCOL_VERSION + 1,
            request_id: 77,
            body: Some(Request::Ping(wire::Ping {})),
        });
        hostile.send_raw(future).await.unwrap();
        let error = next_error(&mut hostile).await;
        assert_eq!(code(&error), ErrorCode::UnsupportedVersion);
        assert_eq!(error.supported_versions, [PROTOCOL_VERSION]);

        let id = hostile
            .send(Request::Post(wire::Post {
                group_id: vec![1; 16],
                epoch: 1,
                kind: wire::EntryKind::Application as i32,
                payload: vec![1],
                expires_at: 0,
                next_posting_key: Vec::new(),
            }))
            .await
            .unwrap();
        assert_eq!(
            code(&answer(&mut hostile, id).await.unwrap_err()),
            ErrorCode::NotAuthenticated
        );

        // The connection is still usable after all that.
        let id = hostile.send(Request::Ping(wire::Ping {})).await.unwrap();
        assert!(matches!(answer(&mut hostile, id).await, Ok(Reply::Pong(_))));
    });

    // Meanwhile the server serves everyone else as usual.
    miyu_ok(&pair.alice, &["send", "bob", "still working"]);
    miyu_ok(&pair.bob, &["sync"]);
    assert_eq!(conversation(&pair.bob, "alice"), ["alice: still working"]);

    // A connection that keeps sending garbage is eventually closed.
    runtime.block_on(async {
        let mut hostile = Connection::open(&address, None).await.unwrap();
        let mut closed = false;
        for _ in 0..100 {
            if hostile.send_raw(vec![0xff]).await.is_err() {
                closed = true;
                break;
            }
        }
        while !closed {
            closed = hostile.receive().await.is_err();
        }
    });
}

#[test]
fn a_device_can_neither_impersonate_nor_touch_a_group_it_is_not_in() {
    let root = tempfile::tempdir().unwrap();
    let server_data = root.path().join("server");
    let server = Server::start(&server_data, "127.0.0.1:0", &[]);
    let pair = connect_pair(root.path(), &server.address);
    let address: ServerAddress = server.address.parse().unwrap();
    let groups = group_ids(&server_data);
    assert_eq!(groups.len(), 1);
    let group = groups[0].clone();

    runtime().block_on(async {
        // Mallory has a real account, and (worst case) knows the group's id.
        let (mut mallory, mallory_keys) = register(&address).await;

        assert_eq!(
            refused(
                &mut mallory,
                Request::Post(wire::Post {
                    group_id: group.clone(),
                    epoch: 1,
                    kind: wire::EntryKind::Application as i32,
                    payload: b"forged".to_vec(),
                    expires_at: 0,
                    next_posting_key: Vec::new(),
                })
            )
            .await,
            ErrorCode::Forbidden
        );

        assert_eq!(
            refused(
                &mut mallory,
                Request::FetchGroup(wire::FetchGroup {
                    group_id: group.clone(),
                    after_seq: 0,
                })
            )
            .await,
            ErrorCode::Forbidden
        );

        assert_eq!(
            refused(
                &mut mallory,
                Request::AckGroup(wire::AckGroup {
                    group_id: group.clone(),
                    seq: 1000,
                })
            )
            .await,
            ErrorCode::Forbidden
        );

        // Nor can Mallory push a "Welcome" into Bob's inbox: that needs a claimed invite.
        let bob_device = {
            let database = rusqlite::Connection::open(server_data.join("miyu.sqlite3")).unwrap();
            let devices: Vec<Vec<u8>> = database
                .prepare("SELECT device_id FROM devices")
                .unwrap()
                .query_map([], |row| row.get(0))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
            devices
                .into_iter()
                .find(|d| d.as_slice() != mallory_keys.certificate().device_id().as_bytes())
                .unwrap()
        };
        let id = mallory
            .send(Request::CreateGroup(wire::CreateGroup {
                group_id: vec![7; 16],
                epoch: 1,
                member_devices: vec![bob_device.clone()],
                welcome: Vec::new(),
                posting_key: Vec::new(),
                welcomes: vec![wire::InboxMessage {
                    device_id: bob_device.clone(),
                    payload: b"spam".to_vec(),
                }],
            }))
            .await
            .unwrap();
        assert_eq!(
            code(&answer(&mut mallory, id).await.unwrap_err()),
            ErrorCode::Forbidden
        );

        // And Mallory cannot log in as someone else's device to read their inbox.
        let mut impostor = Connection::open(&address, None).await.unwrap();
        let (sha, nonce) = impostor.challenge();
        let signature = mallory_keys.sign_auth(sha, nonce);
        assert_eq!(
            refused(
                &mut impostor,
                Request::Authenticate(wire::Authenticate {
                    device_id: bob_device,
                    signature,
                })
            )
            .await,
            ErrorCode::AuthenticationFailed
        );
        assert_eq!(
            refused(&mut impostor, Request::AckInbox(wire::AckInbox { seq: 1 })).await,
            ErrorCode::NotAuthenticated
        );

        // Alice and Bob keep talking; Mallory's connection is told nothing about it.
        miyu_ok(&pair.alice, &["send", "bob", "private"]);
        let id = mallory.send(Request::Ping(wire::Ping {})).await.unwrap();
        loop {
            let frame = mallory.receive().await.unwrap();
            assert!(
                !matches!(frame.body, Some(Reply::Delivery(_))),
                "Mallory got a delivery"
            );
            if frame.request_id == id {
                break;
            }
        }
    });
    miyu_ok(&pair.bob, &["sync"]);
    assert_eq!(conversation(&pair.bob, "alice"), ["alice: private"]);
}

#[test]
fn a_message_replayed_or_redelivered_by_the_server_is_shown_once() {
    let root = tempfile::tempdir().unwrap();
    let server_data = root.path().join("server");
    let server = Server::start(&server_data, "127.0.0.1:0", &[]);
    let listen = server.listen.to_string();
    let pair = connect_pair(root.path(), &server.address);
    miyu_ok(&pair.alice, &["send", "bob", "only once"]);
    server.terminate();

    // A malicious or broken server appends the same ciphertext again under a new number.
    {
        let database = rusqlite::Connection::open(server_data.join("miyu.sqlite3")).unwrap();
        let replayed = database
            .execute(
                "INSERT INTO group_log (group_id, seq, epoch, kind, payload, created_hour)
                 SELECT group_id, seq + 100, epoch, kind, payload, created_hour FROM group_log
                 WHERE seq = (SELECT MAX(seq) FROM group_log)",
                [],
            )
            .unwrap();
        assert_eq!(replayed, 1);
        database
            .execute("UPDATE groups SET next_seq = next_seq + 200", [])
            .unwrap();
    }
    let server = Server::start(&server_data, &listen, &[]);
    miyu_ok(&pair.bob, &["sync"]);
    assert_eq!(conversation(&pair.bob, "alice"), ["alice: only once"]);
    server.terminate();

    // And it forgets Bob's acknowledgement, delivering everything again from the start.
    {
        let database = rusqlite::Connection::open(server_data.join("miyu.sqlite3")).unwrap();
        database
            .execute("UPDATE group_members SET cursor = 0", [])
            .unwrap();
    }
    let _server = Server::start(&server_data, &listen, &[]);
    miyu_ok(&pair.bob, &["sync"]);
    miyu_ok(&pair.alice, &["send", "bob", "and this once too"]);
    miyu_ok(&pair.bob, &["sync"]);
    assert_eq!(
        conversation(&pair.bob, "alice"),
        ["alice: only once", "alice: and this once too"]
    );
}

#[test]
fn a_server_that_makes_up_an_invite_cannot_make_up_a_contact() {
    let root = tempfile::tempdir().unwrap();
    let server_data = root.path().join("server");
    let server = Server::start(&server_data, "127.0.0.1:0", &[]);
    let listen = server.listen.to_string();
    let address: ServerAddress = server.address.parse().unwrap();
    let alice = root.path().join("alice");
    let mallory = root.path().join("mallory");
    miyu_ok(
        &alice,
        &["init", "--server", &server.address, "--name", "alice"],
    );
    miyu_ok(
        &mallory,
        &["init", "--server", &server.address, "--name", "mallory"],
    );
    server.terminate();

    // The server's operator plants an invite for Alice's account that Alice never made,
    // and hands the link to Mallory. Everything in it is public except the token.
    let token = [0x5a_u8; 32];
    let link = {
        let database = rusqlite::Connection::open(server_data.join("miyu.sqlite3")).unwrap();
        let (account, certificate): (Vec<u8>, Vec<u8>) = database
            .query_row(
                "SELECT account_id, certificate FROM devices ORDER BY created_hour LIMIT 1",
                [],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
            .unwrap();
        let account = miyu_proto::AccountId::from_bytes(&account).unwrap();
        let certificate = miyu_proto::VerifiedCertificate::from_compact(&certificate).unwrap();
        database
            .execute(
                "INSERT INTO invites (token_hash, account_id, expires_at) VALUES (?1, ?2, ?3)",
                rusqlite::params![
                    miyu_crypto::invite::claim_hash(&token).to_vec(),
                    account.as_bytes().to_vec(),
                    i64::MAX
                ],
            )
            .unwrap();
        miyu_proto::InviteLink {
            server: address.clone(),
            account,
            identity: certificate.identity_fingerprint(),
            token,
            group: false,
        }
    };
    let _server = Server::start(&server_data, &listen, &[]);
    miyu_ok(&mallory, &["accept", &link.to_string()]);
    miyu_ok(
        &mallory,
        &[
            "send",
            &link.account.to_string()[..8],
            "hi alice, it's your bank",
        ],
    );

    // Alice's client sees an introduction without one of her tokens: a stranger, so a
    // message request, not a contact; she does not tell the stranger her name.
    let printed = miyu_ok(&alice, &["sync"]);
    assert!(
        printed.contains("message request from mallory"),
        "{printed}"
    );
    assert_eq!(miyu_ok(&alice, &["contacts"]), "");
    let requests = miyu_ok(&alice, &["requests"]);
    assert!(requests.contains("it's your bank"), "{requests}");
    miyu_ok(&mallory, &["sync"]);
    let mallorys_view = miyu_ok(&mallory, &["contacts"]);
    assert!(!mallorys_view.contains("alice"), "{mallorys_view}");
}

#[test]
fn init_against_a_wrong_fingerprint_fails_with_a_security_hint() {
    let root = tempfile::tempdir().unwrap();
    let server = Server::start(&root.path().join("server"), "127.0.0.1:0", &[]);
    let address: ServerAddress = server.address.parse().unwrap();
    let impostor = ServerAddress::new(address.host(), address.port(), [0; 32]).unwrap();
    let output = miyu(
        &root.path().join("eve"),
        &["init", "--server", &impostor.to_string()],
    );
    assert_eq!(output.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&output.stderr).contains("fingerprint"));
    // Nothing half-made is left behind: init works once pointed at the right server.
    miyu_ok(
        &root.path().join("eve"),
        &["init", "--server", &server.address],
    );
}

#[test]
fn chat_reconnects_after_the_server_restarts_and_health_check_answers() {
    let root = tempfile::tempdir().unwrap();
    let server = Server::start(&root.path().join("server"), "127.0.0.1:0", &[]);
    let address: ServerAddress = server.address.parse().unwrap();
    assert!(
        runtime()
            .block_on(miyu_client::net::check_health(&address, None))
            .unwrap()
    );
    let pair = connect_pair(root.path(), &server.address);
    let mut bob = Chat::start(&pair.bob, "alice");
    let (data, listen) = server.kill9();
    // Bob's chat notices the loss and retries with growing pauses until the server is back.
    let _server = Server::start(&data, &listen.to_string(), &[]);
    let text = unique("after-restart");
    miyu_ok(&pair.alice, &["send", "bob", &text]);
    bob.wait_for_line(|line| line.contains(&text));
    assert!(
        runtime()
            .block_on(miyu_client::net::check_health(&address, None))
            .unwrap()
    );
}

#[test]
fn configuration_file_and_environment_are_honoured() {
    let root = tempfile::tempdir().unwrap();
    let config = root.path().join("miyu.toml");
    std::fs::write(
        &config,
        "registration_token = \"from-file\"\nretention_days = 7\n",
    )
    .unwrap();
    let config_flag = config.to_str().unwrap().to_string();
    let server = Server::start(
        &root.path().join("server"),
        "127.0.0.1:0",
        &["--config", &config_flag],
    );
    let refused = miyu(
        &root.path().join("a"),
        &["init", "--server", &server.address],
    );
    assert_eq!(refused.status.code(), Some(4));
    let output = common::miyu_command()
        .arg("--profile")
        .arg(root.path().join("b"))
        .args(["init", "--server", &server.address])
        .env("MIYU_REGISTRATION_TOKEN", "from-file")
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );

    // A bad file is refused with a message naming the problem.
    std::fs::write(&config, "colour = \"blue\"\n").unwrap();
    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_miyu-server"))
        .args([
            "--data",
            root.path().join("other").to_str().unwrap(),
            "--config",
            &config_flag,
        ])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("colour"));
}

#[test]
fn a_client_that_lost_the_answer_to_its_registration_still_gets_in() {
    let root = tempfile::tempdir().unwrap();
    let server = Server::start(&root.path().join("server"), "127.0.0.1:0", &[]);
    let alice = root.path().join("alice");
    // Without a passphrase the key sits in the profile, so the test can open the database.
    let init = miyu(
        &alice,
        &["init", "--server", &server.address, "--no-passphrase"],
    );
    assert!(init.status.success());
    assert!(String::from_utf8_lossy(&init.stderr).contains("warning: --no-passphrase"));
    let key = std::fs::read_to_string(alice.join("key")).unwrap();
    // As if the client crashed after the server stored the registration but before the
    // client recorded it: the next connection registers again and must not be locked out.
    let database = rusqlite::Connection::open(alice.join("miyu.db")).unwrap();
    database
        .execute_batch(&format!("PRAGMA key = \"x'{}'\";", key.trim()))
        .unwrap();
    database
        .execute("UPDATE account SET registered = 0", [])
        .unwrap();
    drop(database);
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_miyu"))
        .arg("--profile")
        .arg(&alice)
        .arg("invite")
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(String::from_utf8_lossy(&output.stdout).starts_with("miyu://invite?"));
}

#[test]
fn profiles_are_encrypted_at_rest_and_open_only_with_their_passphrase() {
    let root = tempfile::tempdir().unwrap();
    let server = Server::start(&root.path().join("server"), "127.0.0.1:0", &[]);
    let pair = connect_pair(root.path(), &server.address);
    let marker = unique("at-rest-marker");
    miyu_ok(&pair.alice, &["send", "bob", &marker]);
    miyu_ok(&pair.bob, &["sync"]);
    assert_eq!(
        conversation(&pair.bob, "alice"),
        [format!("alice: {marker}")]
    );
    for profile in [&pair.alice, &pair.bob] {
        let files: Vec<_> = std::fs::read_dir(profile)
            .unwrap()
            .map(|entry| entry.unwrap().path())
            .collect();
        assert!(files.iter().any(|f| f.ends_with("miyu.db")));
        // Needles of five bytes or more: a shorter one ("bob") turns up by chance in a few
        // megabytes of ciphertext (about once in 16 MiB for three bytes).
        for needle in [marker.as_str(), "alice", "SQLite format"] {
            assert_eq!(
                count_in_files(&files, needle.as_bytes()),
                0,
                "{needle} readable"
            );
        }
    }

    let run = |profile: &Path, passphrase: Option<&str>, args: &[&str]| {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_miyu"));
        command.arg("--profile").arg(profile).args(args);
        command.env("MIYU_DANGER_KDF_MEMORY_KIB", "8192");
        if let Some(passphrase) = passphrase {
            command.env("MIYU_PASSPHRASE", passphrase);
        }
        command.output().unwrap()
    };
    let wrong = run(
        &pair.alice,
        Some("not the passphrase"),
        &["messages", "bob"],
    );
    assert_eq!(wrong.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("wrong passphrase"));
    let missing = run(&pair.alice, None, &["contacts"]);
    assert_eq!(missing.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("MIYU_PASSPHRASE"));
    let no_choice = run(
        &root.path().join("carol"),
        None,
        &["init", "--server", &server.address],
    );
    assert_eq!(no_choice.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&no_choice.stderr).contains("--no-passphrase"));
    // The right passphrase still opens everything.
    assert_eq!(conversation(&pair.alice, "bob"), [format!("me: {marker}")]);
}

#[test]
fn key_packages_are_replenished_after_invites_use_them_up() {
    let root = tempfile::tempdir().unwrap();
    let server_data = root.path().join("server");
    let server = Server::start(&server_data, "127.0.0.1:0", &[]);
    let address: ServerAddress = server.address.parse().unwrap();
    let alice = root.path().join("alice");
    miyu_ok(
        &alice,
        &["init", "--server", &server.address, "--name", "alice"],
    );
    let database = rusqlite::Connection::open(server_data.join("miyu.sqlite3")).unwrap();
    // Alice's is the only device yet; the claimers registered below have their own.
    let alice_device: Vec<u8> = database
        .query_row("SELECT device_id FROM devices", [], |row| row.get(0))
        .unwrap();
    let one_time_left = || -> i64 {
        database
            .query_row(
                "SELECT COUNT(*) FROM key_packages WHERE last_resort = 0 AND device_id = ?1",
                [&alice_device],
                |row| row.get(0),
            )
            .unwrap()
    };
    assert_eq!(one_time_left(), 20);
    let links: Vec<String> = (0..12)
        .map(|_| miyu_ok(&alice, &["invite"]).trim().to_string())
        .collect();
    runtime().block_on(async {
        for link in &links {
            let link: miyu_proto::InviteLink = link.parse().unwrap();
            let (mut claimer, _) = register(&address).await;
            let id = claimer
                .send(Request::ClaimInvite(wire::ClaimInvite {
                    token: miyu_crypto::invite::claim_secret(&link.token).to_vec(),
                }))
                .await
                .unwrap();
            assert!(matches!(
                answer(&mut claimer, id).await,
                Ok(Reply::InviteClaimed(_))
            ));
        }
    });
    assert_eq!(one_time_left(), 8);
    // Alice's next connection notices fewer than half are left and tops them up.
    miyu_ok(&alice, &["sync"]);
    assert_eq!(one_time_left(), 20);
}

#[test]
fn an_operator_certificate_given_with_cert_and_key_is_used() {
    let root = tempfile::tempdir().unwrap();
    let first = Server::start(&root.path().join("first"), "127.0.0.1:0", &[]);
    let cert = root.path().join("first/tls-cert.pem");
    let key = root.path().join("first/tls-key.pem");
    let second = Server::start(
        &root.path().join("second"),
        "127.0.0.1:0",
        &[
            "--cert",
            cert.to_str().unwrap(),
            "--key",
            key.to_str().unwrap(),
        ],
    );
    let fingerprint = |address: &str| address.rsplit_once('#').unwrap().1.to_string();
    assert_eq!(fingerprint(&first.address), fingerprint(&second.address));
    assert!(!root.path().join("second/tls-cert.pem").exists());
    miyu_ok(
        &root.path().join("a"),
        &["init", "--server", &second.address],
    );
}

#[test]
fn registration_token_is_enforced() {
    let root = tempfile::tempdir().unwrap();
    let server = Server::start(
        &root.path().join("server"),
        "127.0.0.1:0",
        &["--registration-token", "open-sesame"],
    );
    let refused = miyu(
        &root.path().join("a"),
        &["init", "--server", &server.address],
    );
    assert_eq!(refused.status.code(), Some(4));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("registration token"));
    let output = common::miyu_command()
        .args(["--profile"])
        .arg(root.path().join("b"))
        .args(["init", "--server", &server.address])
        .env("MIYU_REGISTRATION_TOKEN", "open-sesame")
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Connects and opens recorded by `strace` while a command ran: (inet ports connected to,
/// files opened).
fn traced(profile: &Path, args: &[&str], trace: &Path) -> (Vec<u16>, Vec<String>) {
    let output = std::process::Command::new("strace")
        .args(["-f", "-qq", "-e", "trace=connect,openat", "-o"])
        .arg(trace)
        .arg(env!("CARGO_BIN_EXE_miyu"))
        .arg("--profile")
        .arg(profile)
        .args(args)
        .env("MIYU_PASSPHRASE", common::PASSPHRASE)
        .output()
        .expect("strace runs (the CI script installs it)");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = std::fs::read_to_string(trace).unwrap();
    let ports = text
        .lines()
        .filter(|line| line.contains("connect(") && line.contains("sin"))
        .filter_map(|line| {
            let rest = line.split("htons(").nth(1)?;
            rest.split(')').next()?.parse().ok()
        })
        .collect();
    let files = text
        .lines()
        .filter(|line| line.contains("openat("))
        .filter_map(|line| Some(line.split('"').nth(1)?.to_string()))
        .collect();
    (ports, files)
}

/// Files a program reads when it resolves a host name itself.
const RESOLVER_FILES: [&str; 4] = [
    "/etc/hosts",
    "/etc/resolv.conf",
    "/etc/nsswitch.conf",
    "/etc/host.conf",
];

#[test]
fn a_proxied_client_connects_only_to_its_proxy_and_resolves_no_names() {
    let root = tempfile::tempdir().unwrap();
    let server = Server::start(&root.path().join("server"), "127.0.0.1:0", &[]);
    // Name the server by host name, so that a client that resolved names itself would show it.
    let by_name = server.address.replace("127.0.0.1", "localhost");
    let socks_port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().port()
    };
    let _socks = common::Reaped(
        std::process::Command::new("microsocks")
            .args(["-i", "127.0.0.1", "-p", &socks_port.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("microsocks runs (the CI script installs it)"),
    );
    let deadline = std::time::Instant::now() + common::PATIENCE;
    while std::net::TcpStream::connect(("127.0.0.1", socks_port)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "the proxy never listened"
        );
        std::thread::yield_now();
    }
    let proxy = format!("socks5h://127.0.0.1:{socks_port}");

    let alice = root.path().join("alice");
    let bob = root.path().join("bob");
    miyu_ok(
        &alice,
        &[
            "--proxy", &proxy, "init", "--server", &by_name, "--name", "alice",
        ],
    );
    miyu_ok(&bob, &["init", "--server", &by_name, "--name", "bob"]);
    let link = miyu_ok(&alice, &["invite"]);
    miyu_ok(&bob, &["accept", link.trim(), "--name", "alice"]);
    miyu_ok(&alice, &["sync"]);

    // The profile remembers its proxy: no flag needed from now on.
    let (ports, files) = traced(
        &alice,
        &["send", "bob", "through the proxy"],
        &root.path().join("alice.trace"),
    );
    assert!(!ports.is_empty(), "the trace saw no connection at all");
    assert!(
        ports.iter().all(|&port| port == socks_port),
        "direct connection: {ports:?}"
    );
    for file in RESOLVER_FILES {
        assert!(
            !files.iter().any(|f| f == file),
            "alice's client resolved a name ({file})"
        );
    }
    miyu_ok(&bob, &["sync"]);
    assert_eq!(conversation(&bob, "alice"), ["alice: through the proxy"]);

    // The same trace of a direct client shows what a leak looks like, so the checks above
    // could fail.
    let (ports, files) = traced(
        &bob,
        &["send", "alice", "direct"],
        &root.path().join("bob.trace"),
    );
    assert!(ports.contains(&server.listen.port()));
    assert!(
        RESOLVER_FILES
            .iter()
            .any(|file| files.iter().any(|f| f == file))
    );

    // --no-proxy goes back to direct connections.
    miyu_ok(&alice, &["--no-proxy", "sync"]);
    let (ports, _) = traced(&alice, &["sync"], &root.path().join("alice2.trace"));
    assert!(ports.contains(&server.listen.port()));
}

#[test]
fn a_client_that_stops_reading_is_disconnected_and_cannot_hold_the_server_up() {
    let root = tempfile::tempdir().unwrap();
    // No rate limit in the way: the flood must be answered until the peer's buffers are full.
    let server = Server::start(
        &root.path().join("server"),
        "127.0.0.1:0",
        &["--requests-per-second", "10000000"],
    );
    let address: ServerAddress = server.address.parse().unwrap();
    let (ended, flood_ended) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        runtime().block_on(async {
            let mut flood = Connection::open(&address, None).await.unwrap();
            // Ask forever, never read an answer. Sending fails once the server gives up on us.
            loop {
                if flood.send(Request::Ping(wire::Ping {})).await.is_err() {
                    break;
                }
            }
        });
        let _ = ended.send(());
    });
    flood_ended
        .recv_timeout(common::PATIENCE)
        .expect("the server kept a connection open for a peer that never reads");
    // And it still serves others, then shuts down cleanly.
    let pair = connect_pair(root.path(), &server.address);
    miyu_ok(&pair.alice, &["send", "bob", "still serving"]);
    server.terminate();
}

#[test]
fn the_demo_of_the_quick_start_runs_and_finds_no_plaintext_on_the_server() {
    let folder = tempfile::tempdir().unwrap();
    let output = common::miyu_command()
        .current_dir(folder.path())
        .arg("demo")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("arrived intact"), "{stdout}");
    assert!(
        stdout.contains("Bob, you were offline when I sent this one."),
        "{stdout}"
    );
    let scans = stdout.matches(": 0 hits").count();
    assert_eq!(scans, 4, "{stdout}");
}

// ---------------------------------------------------------------------------------------------
// Devices of one account: linking mailboxes, listing, revoking.
// ---------------------------------------------------------------------------------------------

fn link_put(mailbox: &[u8], payload: &[u8]) -> Request {
    Request::LinkPut(wire::LinkPut {
        mailbox: mailbox.to_vec(),
        payload: payload.to_vec(),
    })
}

fn link_take(mailbox: &[u8]) -> Request {
    Request::LinkTake(wire::LinkTake {
        mailbox: mailbox.to_vec(),
    })
}

#[test]
fn a_device_being_linked_takes_its_mailbox_once_before_it_has_authenticated() {
    let root = tempfile::tempdir().unwrap();
    let server = Server::start(&root.path().join("server"), "127.0.0.1:0", &[]);
    let address: ServerAddress = server.address.parse().unwrap();
    runtime().block_on(async {
        let (mut old_device, _) = register(&address).await;
        let mut mailbox = [0u8; 32];
        getrandom(&mut mailbox);
        let id = old_device
            .send(link_put(&mailbox, b"sealed for the new device"))
            .await
            .unwrap();
        assert!(matches!(
            answer(&mut old_device, id).await,
            Ok(Reply::Done(_))
        ));
        // One message per mailbox, of bounded size, under a well-formed name.
        assert_eq!(
            refused(&mut old_device, link_put(&mailbox, b"another")).await,
            ErrorCode::AlreadyExists
        );
        assert_eq!(
            refused(&mut old_device, link_put(&mailbox[..31], b"x")).await,
            ErrorCode::InvalidArgument
        );
        assert_eq!(
            refused(&mut old_device, link_put(&[7; 32], &vec![0; 64 * 1024 + 1])).await,
            ErrorCode::InvalidArgument
        );

        // The new device has said Hello and nothing more: it has no certificate yet.
        let mut new_device = Connection::open(&address, None).await.unwrap();
        assert_eq!(
            refused(&mut new_device, link_put(&[8; 32], b"x")).await,
            ErrorCode::NotAuthenticated
        );
        let id = new_device.send(link_take(&mailbox)).await.unwrap();
        match answer(&mut new_device, id).await {
            Ok(Reply::LinkPayload(taken)) => {
                assert_eq!(taken.payload, b"sealed for the new device");
            }
            other => panic!("expected the mailbox's message, got {other:?}"),
        }
        // Taken once: nobody, not even the taker, gets it again.
        assert_eq!(
            refused(&mut new_device, link_take(&mailbox)).await,
            ErrorCode::NotFound
        );
        assert_eq!(
            refused(&mut old_device, link_take(&mailbox)).await,
            ErrorCode::NotFound
        );

        // Polling as fast as it can send, a connection soon runs out of takes (2 a second).
        let mut ids = Vec::new();
        for _ in 0..10 {
            ids.push(new_device.send(link_take(&[9; 32])).await.unwrap());
        }
        // Answers may come in any order: take them as they come.
        let mut codes = Vec::new();
        while codes.len() < ids.len() {
            let frame = new_device.receive().await.unwrap();
            if ids.contains(&frame.request_id)
                && let Some(Reply::Error(error)) = frame.body
            {
                codes.push(code(&error));
            }
        }
        assert!(codes.contains(&ErrorCode::RateLimited), "{codes:?}");
    });
}

/// The identity key's signature revoking a device, as PROTOCOL.md §7.17 asks for.
fn revocation(keys: &miyu_crypto::identity::AccountKeys, device: &miyu_proto::DeviceId) -> Vec<u8> {
    use ed25519_dalek::Signer;
    ed25519_dalek::SigningKey::from_bytes(&keys.identity_secret().unwrap())
        .sign(&miyu_proto::cert::revoke_payload(device))
        .to_bytes()
        .to_vec()
}

fn revoke(device: &miyu_proto::DeviceId, signature: Vec<u8>) -> Request {
    Request::RevokeDevice(wire::RevokeDevice {
        device_id: device.as_bytes().to_vec(),
        signature,
    })
}

async fn list_devices(connection: &mut Connection) -> Vec<wire::DeviceEntry> {
    let id = connection
        .send(Request::ListDevices(wire::ListDevices {}))
        .await
        .unwrap();
    match answer(connection, id).await {
        Ok(Reply::DeviceList(list)) => list.devices,
        other => panic!("expected a device list, got {other:?}"),
    }
}

#[test]
fn a_revoked_device_is_disconnected_at_once_and_can_never_get_back_in() {
    let root = tempfile::tempdir().unwrap();
    let server = Server::start(&root.path().join("server"), "127.0.0.1:0", &[]);
    let address: ServerAddress = server.address.parse().unwrap();
    runtime().block_on(async {
        let (mut phone, phone_keys) = register(&address).await;
        // A second device of the same account, certified by the same identity key.
        let (mut laptop, laptop_keys) = register_second_device(&address, &phone_keys).await;
        let laptop_id = laptop_keys.certificate().device_id();
        let (mut stranger, stranger_keys) = register(&address).await;

        let today = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            / 86_400;
        let listed = list_devices(&mut laptop).await;
        let mut certificates: Vec<_> = listed
            .iter()
            .map(|entry| entry.certificate.clone().unwrap())
            .collect();
        let mut expected = vec![
            phone_keys.certificate().to_wire(),
            laptop_keys.certificate().to_wire(),
        ];
        certificates.sort_by(|a, b| a.device_key.cmp(&b.device_key));
        expected.sort_by(|a, b| a.device_key.cmp(&b.device_key));
        assert_eq!(certificates, expected);
        // Registered and active today; yesterday at the earliest if the day just turned.
        for entry in &listed {
            assert!(entry.created_day.abs_diff(today) <= 1, "{entry:?}");
            assert_eq!(entry.last_active_day, entry.created_day);
        }

        // Neither another identity key's signature nor another account's device will do.
        assert_eq!(
            refused(
                &mut phone,
                revoke(&laptop_id, revocation(&stranger_keys, &laptop_id))
            )
            .await,
            ErrorCode::AuthenticationFailed
        );
        let stranger_id = stranger_keys.certificate().device_id();
        assert_eq!(
            refused(
                &mut phone,
                revoke(&stranger_id, revocation(&phone_keys, &stranger_id))
            )
            .await,
            ErrorCode::NotFound
        );
        let id = laptop.send(Request::Ping(wire::Ping {})).await.unwrap();
        assert!(matches!(answer(&mut laptop, id).await, Ok(Reply::Pong(_))));

        let id = phone
            .send(revoke(&laptop_id, revocation(&phone_keys, &laptop_id)))
            .await
            .unwrap();
        assert!(matches!(answer(&mut phone, id).await, Ok(Reply::Done(_))));
        // The laptop's open connection is told, then closed.
        let error = next_error(&mut laptop).await;
        assert_eq!(code(&error), ErrorCode::AuthenticationFailed);
        assert_eq!(error.message, "this device was revoked");
        loop {
            if laptop.receive().await.is_err() {
                break;
            }
        }
        // It can neither authenticate nor register again, though its key still signs.
        let mut again = Connection::open(&address, None).await.unwrap();
        let (sha, nonce) = again.challenge();
        let signature = laptop_keys.sign_auth(sha, nonce);
        assert_eq!(
            refused(
                &mut again,
                Request::Authenticate(wire::Authenticate {
                    device_id: laptop_id.as_bytes().to_vec(),
                    signature: signature.clone(),
                })
            )
            .await,
            ErrorCode::AuthenticationFailed
        );
        assert_eq!(
            refused(
                &mut again,
                Request::Register(wire::Register {
                    certificate: Some(laptop_keys.certificate().to_wire()),
                    challenge_signature: signature,
                    registration_token: String::new(),
                    key_packages: vec![vec![1, 2, 3]],
                    last_resort_key_package: vec![4, 5, 6],
                })
            )
            .await,
            ErrorCode::AuthenticationFailed
        );
        let listed = list_devices(&mut phone).await;
        assert_eq!(listed.len(), 1);
        assert_eq!(
            listed[0].certificate,
            Some(phone_keys.certificate().to_wire())
        );
        // The others carry on.
        let id = stranger.send(Request::Ping(wire::Ping {})).await.unwrap();
        assert!(matches!(
            answer(&mut stranger, id).await,
            Ok(Reply::Pong(_))
        ));
    });
}

fn removal(group_id: &[u8], epoch: u64, device: &miyu_proto::DeviceId) -> Request {
    Request::Commit(wire::Commit {
        group_id: group_id.to_vec(),
        epoch,
        payload: b"a commit removing a leaf".to_vec(),
        remove_devices: vec![device.as_bytes().to_vec()],
        ..Default::default()
    })
}

#[test]
fn a_linked_device_cannot_remove_its_accounts_other_devices_until_they_are_revoked() {
    let root = tempfile::tempdir().unwrap();
    let server = Server::start(&root.path().join("server"), "127.0.0.1:0", &[]);
    let address: ServerAddress = server.address.parse().unwrap();
    runtime().block_on(async {
        let (mut phone, phone_keys) = register(&address).await;
        let phone_id = phone_keys.certificate().device_id();
        // A second device of the same account, certified by the same identity key.
        let (mut laptop, laptop_keys) = register_second_device(&address, &phone_keys).await;
        let laptop_id = laptop_keys.certificate().device_id();
        let mut group_id = vec![0u8; 16];
        getrandom(&mut group_id);
        let id = phone
            .send(Request::CreateGroup(wire::CreateGroup {
                group_id: group_id.clone(),
                epoch: 0,
                member_devices: vec![laptop_id.as_bytes().to_vec()],
                ..Default::default()
            }))
            .await
            .unwrap();
        assert!(matches!(answer(&mut phone, id).await, Ok(Reply::Done(_))));

        // Stolen, say: it may not end the phone's membership.
        assert_eq!(
            refused(&mut laptop, removal(&group_id, 0, &phone_id)).await,
            ErrorCode::Forbidden
        );
        // The group is where it was: the phone posts at epoch 0, and the laptop still gets it.
        let id = phone
            .send(Request::Post(wire::Post {
                group_id: group_id.clone(),
                epoch: 0,
                kind: wire::EntryKind::Application as i32,
                payload: b"still in".to_vec(),
                ..Default::default()
            }))
            .await
            .unwrap();
        assert!(matches!(answer(&mut phone, id).await, Ok(Reply::Posted(_))));
        let delivered = loop {
            if let Some(Reply::Delivery(wire::Delivery {
                entry: Some(wire::delivery::Entry::GroupEntry(entry)),
            })) = laptop.receive().await.unwrap().body
            {
                break entry;
            }
        };
        assert_eq!((delivered.seq, delivered.epoch), (1, 0));
        assert_eq!(delivered.payload, b"still in");

        // Revoked with the identity key, the laptop is out; naming it in a commit is then fine.
        let id = phone
            .send(revoke(&laptop_id, revocation(&phone_keys, &laptop_id)))
            .await
            .unwrap();
        assert!(matches!(answer(&mut phone, id).await, Ok(Reply::Done(_))));
        let id = phone.send(removal(&group_id, 0, &laptop_id)).await.unwrap();
        assert!(matches!(answer(&mut phone, id).await, Ok(Reply::Posted(_))));
    });
}

// ---------------------------------------------------------------------------------------------
// Recovery: a bundle found by its locator, handed out against a key, set by the identity key
// only, guessing locked out per bundle.
// ---------------------------------------------------------------------------------------------

/// What a recovery key gives a client, as far as the server sees: the key `Recover` presents
/// and the locator it finds the bundle by.
struct RecoveryKeys {
    auth_key: [u8; 32],
    locator: [u8; 32],
}

impl RecoveryKeys {
    fn random() -> Self {
        Self {
            auth_key: random_key(),
            locator: random_key(),
        }
    }

    /// What a client registers for this key.
    fn verifier(&self) -> [u8; 32] {
        use sha2::Digest;
        sha2::Sha256::digest(self.auth_key).into()
    }

    /// `SetRecovery` of `bundle`, signed by the account's identity key in `keys`.
    fn set(&self, keys: &miyu_crypto::identity::AccountKeys, bundle: &[u8]) -> Request {
        let signature = keys
            .sign_recovery(&self.verifier(), &self.locator, bundle)
            .unwrap();
        self.set_signed(bundle, &signature)
    }

    fn set_signed(&self, bundle: &[u8], signature: &[u8]) -> Request {
        Request::SetRecovery(wire::SetRecovery {
            verifier: self.verifier().to_vec(),
            bundle: bundle.to_vec(),
            locator: self.locator.to_vec(),
            signature: signature.to_vec(),
        })
    }
}

fn recover(locator: &[u8], auth_key: &[u8]) -> Request {
    Request::Recover(wire::Recover {
        locator: locator.to_vec(),
        auth_key: auth_key.to_vec(),
    })
}

fn set_backup(blob_id: &[u8], size: u64, append_after: &[u8]) -> Request {
    Request::SetBackup(wire::SetBackup {
        blob_id: blob_id.to_vec(),
        size,
        append_after: append_after.to_vec(),
    })
}

fn random_key() -> [u8; 32] {
    let mut key = [0u8; 32];
    getrandom(&mut key);
    key
}

/// One `Recover` on a connection of its own that only said Hello, as a person who lost every
/// device would send it.
async fn recover_as_a_stranger(
    address: &ServerAddress,
    locator: &[u8; 32],
    auth_key: &[u8; 32],
) -> Result<Reply, wire::Error> {
    let mut connection = Connection::open(address, None).await.unwrap();
    let id = connection.send(recover(locator, auth_key)).await.unwrap();
    answer(&mut connection, id).await
}

/// The bundle `recover_as_a_stranger` gets with the right key.
async fn bundle_at(address: &ServerAddress, keys: &RecoveryKeys) -> Vec<u8> {
    match recover_as_a_stranger(address, &keys.locator, &keys.auth_key).await {
        Ok(Reply::RecoveryBundle(granted)) => granted.bundle,
        other => panic!("expected the recovery bundle, got {other:?}"),
    }
}

#[test]
fn a_lost_account_gets_its_recovery_bundle_before_authenticating_with_the_right_key_only() {
    let root = tempfile::tempdir().unwrap();
    let server = Server::start(&root.path().join("server"), "127.0.0.1:0", &[]);
    let address: ServerAddress = server.address.parse().unwrap();
    runtime().block_on(async {
        let (mut phone, keys) = register(&address).await;
        let recovery = RecoveryKeys::random();
        let signature = keys
            .sign_recovery(&recovery.verifier(), &recovery.locator, b"sealed")
            .unwrap();
        let verifier = recovery.verifier();
        let malformed = |verifier: &[u8], locator: &[u8], bundle: &[u8], signature: &[u8]| {
            Request::SetRecovery(wire::SetRecovery {
                verifier: verifier.to_vec(),
                bundle: bundle.to_vec(),
                locator: locator.to_vec(),
                signature: signature.to_vec(),
            })
        };
        for malformed in [
            malformed(&verifier[..31], &recovery.locator, b"sealed", &signature),
            malformed(&verifier, &recovery.locator[..31], b"sealed", &signature),
            malformed(&verifier, &recovery.locator, b"sealed", &signature[..63]),
            malformed(&verifier, &recovery.locator, b"", &signature),
            malformed(&verifier, &recovery.locator, &[0; 4097], &signature),
        ] {
            assert_eq!(
                refused(&mut phone, malformed).await,
                ErrorCode::InvalidArgument
            );
        }
        let id = phone.send(recovery.set(&keys, &[7; 4096])).await.unwrap();
        assert!(matches!(answer(&mut phone, id).await, Ok(Reply::Done(_))));
        // The later one replaces it.
        let id = phone
            .send(recovery.set(&keys, b"sealed identity key"))
            .await
            .unwrap();
        assert!(matches!(answer(&mut phone, id).await, Ok(Reply::Done(_))));
        // A backup must name a finished blob of the account; this one names nothing, and
        // there is no backup to append a segment to.
        for nothing in [
            set_backup(&[7; 32], 10, &[]),
            set_backup(&[7; 32], 10, &[8; 32]),
        ] {
            assert_eq!(refused(&mut phone, nothing).await, ErrorCode::NotFound);
        }
        for malformed in [
            set_backup(&[7; 31], 10, &[]),
            set_backup(&[7; 32], (4 << 30) + 1, &[]),
            set_backup(&[7; 32], 10, &[8; 31]),
        ] {
            assert_eq!(
                refused(&mut phone, malformed).await,
                ErrorCode::InvalidArgument
            );
        }

        // Whoever lost every device has only said Hello.
        match recover_as_a_stranger(&address, &recovery.locator, &recovery.auth_key).await {
            Ok(Reply::RecoveryBundle(granted)) => {
                assert_eq!(granted.bundle, b"sealed identity key");
                assert!(granted.backup.is_empty());
            }
            other => panic!("expected the recovery bundle, got {other:?}"),
        }
        let wrong = code(
            &recover_as_a_stranger(&address, &recovery.locator, &random_key())
                .await
                .unwrap_err(),
        );
        assert_eq!(wrong, ErrorCode::AuthenticationFailed);
        // A locator no bundle has, the right key or not: as if nothing were there.
        for auth_key in [recovery.auth_key, random_key()] {
            let error = recover_as_a_stranger(&address, &random_key(), &auth_key)
                .await
                .unwrap_err();
            assert_eq!(code(&error), ErrorCode::NotFound);
        }

        let mut lost = Connection::open(&address, None).await.unwrap();
        // Setting a bundle needs a device of the account.
        assert_eq!(
            refused(&mut lost, recovery.set(&keys, b"x")).await,
            ErrorCode::NotAuthenticated
        );
        assert_eq!(
            refused(&mut lost, recover(&[1; 31], &recovery.auth_key)).await,
            ErrorCode::InvalidArgument
        );
        // One connection soon runs out of attempts (2 a second), whatever the locator.
        let mut ids = std::collections::HashSet::new();
        for _ in 0..10 {
            ids.insert(
                lost.send(recover(&random_key(), &recovery.auth_key))
                    .await
                    .unwrap(),
            );
        }
        // Refused at once or answered by the store: the answers come in any order.
        let mut codes = Vec::new();
        while !ids.is_empty() {
            let frame = lost.receive().await.unwrap();
            if ids.remove(&frame.request_id) {
                match frame.body {
                    Some(Reply::Error(error)) => codes.push(code(&error)),
                    other => panic!("expected an error, got {other:?}"),
                }
            }
        }
        assert!(codes.contains(&ErrorCode::RateLimited), "{codes:?}");
        assert!(codes.contains(&ErrorCode::NotFound), "{codes:?}");
    });
}

#[test]
fn only_the_identity_key_sets_the_recovery_bundle_not_a_linked_device_nor_a_bad_signature() {
    use ed25519_dalek::Signer;
    let root = tempfile::tempdir().unwrap();
    let server = Server::start(&root.path().join("server"), "127.0.0.1:0", &[]);
    let address: ServerAddress = server.address.parse().unwrap();
    runtime().block_on(async {
        let (mut phone, phone_keys) = register(&address).await;
        // A linked laptop: a certificate from the identity key, but not the key.
        let laptop_key = ed25519_dalek::SigningKey::from_bytes(&random_key());
        let certificate = phone_keys
            .certify_device(laptop_key.verifying_key().as_bytes())
            .unwrap();
        let laptop_keys =
            miyu_crypto::identity::AccountKeys::linked(&laptop_key.to_bytes(), certificate)
                .unwrap();
        assert!(!laptop_keys.has_identity());
        let mut laptop = register_keys(&address, &laptop_keys).await;
        let (_stranger, stranger_keys) = register(&address).await;

        let recovery = RecoveryKeys::random();
        let id = phone
            .send(recovery.set(&phone_keys, b"the real bundle"))
            .await
            .unwrap();
        assert!(matches!(answer(&mut phone, id).await, Ok(Reply::Done(_))));

        // The laptop signs with the only key it has; the phone sends another account's
        // signature, or one over other bytes; either sends no signature worth the name.
        let payload = |bundle: &[u8]| {
            miyu_proto::cert::recovery_payload(&recovery.verifier(), &recovery.locator, bundle)
        };
        let by_laptop = laptop_key.sign(&payload(b"spoilt")).to_bytes();
        let by_stranger = stranger_keys
            .sign_recovery(&recovery.verifier(), &recovery.locator, b"spoilt")
            .unwrap();
        let over_other_bytes = phone_keys
            .sign_recovery(&recovery.verifier(), &recovery.locator, b"other")
            .unwrap();
        for (from_laptop, signature) in [
            (true, by_laptop),
            (true, [0; 64]),
            (false, by_stranger),
            (false, over_other_bytes),
        ] {
            let connection = if from_laptop { &mut laptop } else { &mut phone };
            assert_eq!(
                refused(connection, recovery.set_signed(b"spoilt", &signature)).await,
                ErrorCode::AuthenticationFailed
            );
        }
        // Nor may the laptop move the bundle elsewhere, or start one of its own.
        let elsewhere = RecoveryKeys::random();
        let by_laptop = laptop_key.sign(&miyu_proto::cert::recovery_payload(
            &elsewhere.verifier(),
            &elsewhere.locator,
            b"spoilt",
        ));
        assert_eq!(
            refused(
                &mut laptop,
                elsewhere.set_signed(b"spoilt", &by_laptop.to_bytes())
            )
            .await,
            ErrorCode::AuthenticationFailed
        );
        // The stored bundle is the identity key's, where it was.
        assert_eq!(bundle_at(&address, &recovery).await, b"the real bundle");
        let error = recover_as_a_stranger(&address, &elsewhere.locator, &elsewhere.auth_key)
            .await
            .unwrap_err();
        assert_eq!(code(&error), ErrorCode::NotFound);
        // Refusals are not bad frames: the laptop's connection carries on.
        let id = laptop.send(Request::Ping(wire::Ping {})).await.unwrap();
        assert!(matches!(answer(&mut laptop, id).await, Ok(Reply::Pong(_))));
    });
}

#[test]
fn five_wrong_recovery_keys_lock_the_bundle_even_against_the_right_one_across_a_restart() {
    let root = tempfile::tempdir().unwrap();
    let server = Server::start(&root.path().join("server"), "127.0.0.1:0", &[]);
    let address: ServerAddress = server.address.parse().unwrap();
    let runtime = runtime();
    let recovery = RecoveryKeys::random();
    let keys = runtime.block_on(async {
        let (mut phone, keys) = register(&address).await;
        let id = phone.send(recovery.set(&keys, b"sealed")).await.unwrap();
        assert!(matches!(answer(&mut phone, id).await, Ok(Reply::Done(_))));
        // Without the locator, which only the recovery key gives, no guess even reaches the
        // bundle: knowing the account is no way to lock it.
        for _ in 0..10 {
            let error = recover_as_a_stranger(&address, &random_key(), &random_key())
                .await
                .unwrap_err();
            assert_eq!(code(&error), ErrorCode::NotFound);
        }
        assert_eq!(bundle_at(&address, &recovery).await, b"sealed");
        // A fresh connection for every guess: the count is the bundle's, not the
        // connection's.
        for _ in 0..5 {
            let error = recover_as_a_stranger(&address, &recovery.locator, &random_key())
                .await
                .unwrap_err();
            assert_eq!(code(&error), ErrorCode::AuthenticationFailed);
        }
        let error = recover_as_a_stranger(&address, &recovery.locator, &recovery.auth_key)
            .await
            .unwrap_err();
        assert_eq!(code(&error), ErrorCode::RateLimited);
        keys
    });

    let (data, listen) = server.kill9();
    let _server = Server::start(&data, &listen.to_string(), &[]);
    runtime.block_on(async {
        let error = recover_as_a_stranger(&address, &recovery.locator, &recovery.auth_key)
            .await
            .unwrap_err();
        assert_eq!(
            code(&error),
            ErrorCode::RateLimited,
            "the count was forgotten"
        );

        // The identity key's device, setting the bundle again, starts the count afresh.
        let mut phone = Connection::open(&address, None).await.unwrap();
        let (sha, nonce) = phone.challenge();
        let signature = keys.sign_auth(sha, nonce);
        let id = phone
            .send(Request::Authenticate(wire::Authenticate {
                device_id: keys.certificate().device_id().as_bytes().to_vec(),
                signature,
            }))
            .await
            .unwrap();
        assert!(matches!(
            answer(&mut phone, id).await,
            Ok(Reply::Authenticated(_))
        ));
        let id = phone
            .send(recovery.set(&keys, b"sealed again"))
            .await
            .unwrap();
        assert!(matches!(answer(&mut phone, id).await, Ok(Reply::Done(_))));
        assert_eq!(bundle_at(&address, &recovery).await, b"sealed again");
    });
}
