//! End-to-end tests of what can be done to messages: reply, edit, delete for everyone, react
//! and forward, each an encrypted message between real `miyu` processes through a real server.

mod common;

use common::{Chat, Server, connect_pair, conversation, id_of, messages, miyu, miyu_ok};

#[test]
fn replies_edits_reactions_deletions_and_forwards_reach_the_other_side() {
    let root = tempfile::tempdir().unwrap();
    let server = Server::start(&root.path().join("server"), "127.0.0.1:0", &[]);
    let pair = connect_pair(root.path(), &server.address);
    let (alice, bob) = (&pair.alice, &pair.bob);

    miyu_ok(alice, &["send", "bob", "lunch at noon?"]);
    miyu_ok(bob, &["sync"]);
    let question_at_bob = id_of(bob, "alice", "lunch at noon?");
    miyu_ok(
        bob,
        &["reply", "alice", &question_at_bob, "yes, the usual place"],
    );
    miyu_ok(alice, &["sync"]);
    let question_at_alice = id_of(alice, "bob", "lunch at noon?");
    assert_eq!(
        conversation(alice, "bob"),
        [
            "me: lunch at noon?".to_string(),
            format!("bob: (reply to #{question_at_alice}) yes, the usual place"),
        ]
    );

    // Alice corrects her question; Bob is told, and sees the new text, marked as edited.
    miyu_ok(alice, &["edit", "bob", &question_at_alice, "lunch at one?"]);
    let told = miyu_ok(bob, &["sync"]);
    assert!(
        told.contains(&format!("alice edited #{question_at_bob}: lunch at one?")),
        "{told}"
    );
    assert_eq!(
        conversation(bob, "alice")[0],
        "alice: lunch at one? (edited)"
    );
    // Nobody edits someone else's words.
    let output = miyu(bob, &["edit", "alice", &question_at_bob, "no lunch"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("only your own texts"));

    // A reaction arrives, and can be taken back.
    miyu_ok(bob, &["react", "alice", &question_at_bob, "👍"]);
    miyu_ok(alice, &["sync"]);
    assert_eq!(
        conversation(alice, "bob")[0],
        "me: lunch at one? (edited) [👍 bob]"
    );
    miyu_ok(bob, &["react", "alice", &question_at_bob, "--remove"]);
    miyu_ok(alice, &["sync"]);
    assert_eq!(conversation(alice, "bob")[0], "me: lunch at one? (edited)");

    // Deleted for everyone: the words go on both sides, a notice stays; Bob's reply still
    // points at it.
    miyu_ok(alice, &["delete", "bob", &question_at_alice, "--everyone"]);
    miyu_ok(bob, &["sync"]);
    let at_bob = messages(bob, "alice");
    assert_eq!(at_bob[0]["deleted"], true);
    assert_eq!(at_bob[0]["body"], "");
    assert_eq!(
        conversation(bob, "alice"),
        [
            "alice: (message deleted)".to_string(),
            format!("me: (reply to #{question_at_bob}) yes, the usual place"),
        ]
    );
    assert_eq!(conversation(alice, "bob")[0], "me: (message deleted)");
    // Someone else's message can only go from this device.
    let reply_at_alice = id_of(alice, "bob", "yes, the usual place");
    let output = miyu(alice, &["delete", "bob", &reply_at_alice, "--everyone"]);
    assert_eq!(output.status.code(), Some(2));
    miyu_ok(alice, &["delete", "bob", &reply_at_alice]);
    assert_eq!(conversation(alice, "bob"), ["me: (message deleted)"]);
    miyu_ok(bob, &["sync"]);
    assert_eq!(
        conversation(bob, "alice").len(),
        2,
        "a local deletion stays local"
    );

    // Bob forwards his reply to Carol, who sees it marked as forwarded.
    let carol = root.path().join("carol");
    miyu_ok(
        &carol,
        &["init", "--server", &server.address, "--name", "carol"],
    );
    let link = miyu_ok(&carol, &["invite"]);
    miyu_ok(bob, &["accept", link.trim(), "--name", "carol"]);
    miyu_ok(&carol, &["sync"]);
    let reply_at_bob = id_of(bob, "alice", "yes, the usual place");
    miyu_ok(bob, &["forward", "alice", &reply_at_bob, "carol"]);
    miyu_ok(&carol, &["sync"]);
    assert_eq!(
        conversation(&carol, "bob"),
        ["bob: (forwarded) yes, the usual place"]
    );
}

#[test]
fn the_chat_sends_files_and_answers_and_shows_changes_as_they_happen() {
    let root = tempfile::tempdir().unwrap();
    let server = Server::start(&root.path().join("server"), "127.0.0.1:0", &[]);
    let pair = connect_pair(root.path(), &server.address);
    let (alice, bob) = (&pair.alice, &pair.bob);
    miyu_ok(alice, &["send", "bob", "are you there?"]);

    let mut chat = Chat::start(bob, "alice");
    // The chat prints the conversation first, each line with its number: `#N time  from: text`.
    let shown = chat.wait_for_line(|line| line.contains("alice: are you there?"));
    let asked_at_bob = shown
        .strip_prefix('#')
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no number in {shown:?}"))
        .to_string();
    chat.type_line(&format!("/reply {asked_at_bob} here"));
    chat.type_line("//slash at the start");
    let file = root.path().join("notes.txt");
    std::fs::write(&file, "chat file").unwrap();
    chat.type_line(&format!("/file {}", file.display()));
    let sent = chat.wait_for_line(|line| line.contains("-- sent #") && line.contains("notes.txt"));
    // The number printed is the message's, so `/delete` takes it: gone from Bob's side only.
    let file_message = sent
        .trim_start_matches("-- sent #")
        .split(':')
        .next()
        .unwrap()
        .to_string();
    chat.type_line(&format!("/delete {file_message}"));
    chat.type_line(" /help");
    chat.wait_for_line(|line| line.contains("commands: /file PATH"));

    miyu_ok(alice, &["sync"]);
    let asked_at_alice = id_of(alice, "bob", "are you there?");
    let lines = conversation(alice, "bob");
    assert!(
        lines.contains(&format!("bob: (reply to #{asked_at_alice}) here")),
        "{lines:?}"
    );
    assert!(
        lines.contains(&"bob: /slash at the start".to_string()),
        "{lines:?}"
    );
    assert!(
        lines.iter().any(|line| line.contains("notes.txt")),
        "{lines:?}"
    );

    // Alice edits and reacts while Bob chats: he sees both at once.
    miyu_ok(
        alice,
        &["edit", "bob", &asked_at_alice, "are you still there?"],
    );
    chat.wait_for_line(|line| {
        line.contains(&format!(
            "alice edited #{asked_at_bob}: are you still there?"
        ))
    });
    let here_at_alice = id_of(alice, "bob", "here");
    miyu_ok(alice, &["react", "bob", &here_at_alice, "👍"]);
    chat.wait_for_line(|line| line.contains("alice reacted 👍 to #"));
}
