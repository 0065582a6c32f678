//! `miyu demo`: a server and two clients on this machine, an encrypted conversation between
//! them (one message while the recipient is offline, and a file), and a look at what the server
//! stored.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use miyu_client::{Client, Event, Protection};
use miyu_server::ServerConfig;
use zeroize::Zeroizing;

/// Plaintexts the demo sends; afterwards it searches the server's files for each of them.
const MESSAGES: [(&str, &str); 3] = [
    ("alice", "Hi Bob! This is Miyu, end-to-end encrypted."),
    ("bob", "Hi Alice, got it. The server only sees ciphertext."),
    ("alice", "Bob, you were offline when I sent this one."),
];
/// The file the demo sends, its name and a line of its content; both are searched for too.
const FILE_NAME: &str = "north-gate-plan.txt";
const FILE_LINE: &str = "Meet at the north gate at six; bring the blue folder.";

fn show(who: &str, events: &[Event]) {
    for event in events {
        match event {
            Event::Message(message) if !message.outgoing => {
                println!("  {who} received from {}: {}", message.from, message.body);
            }
            Event::ContactAdded(contact) => {
                println!(
                    "  {who} added {} ({}), who proved they used {who}'s invite",
                    contact.name, contact.account_id
                );
            }
            Event::ContactNamed { new, .. } => {
                println!("  {who} learned the contact's name end-to-end encrypted: {new}");
            }
            _ => {}
        }
    }
}

/// Counts the occurrences of `needle` in every file under `folder`.
fn occurrences(folder: &Path, needle: &[u8]) -> anyhow::Result<usize> {
    let mut count = 0;
    for entry in std::fs::read_dir(folder)? {
        let path = entry?.path();
        if path.is_dir() {
            count += occurrences(&path, needle)?;
        } else {
            let bytes = std::fs::read(&path)?;
            count += bytes.windows(needle.len()).filter(|w| *w == needle).count();
        }
    }
    Ok(count)
}

fn folder_bytes(folder: &Path) -> anyhow::Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(folder)? {
        let entry = entry?;
        total += if entry.path().is_dir() {
            folder_bytes(&entry.path())?
        } else {
            entry.metadata()?.len()
        };
    }
    Ok(total)
}

fn scan(server_data: &Path) -> anyhow::Result<()> {
    let mut hits = 0;
    for (_, text) in MESSAGES {
        hits += occurrences(server_data, text.as_bytes())?;
    }
    for name in ["alice", "bob"] {
        hits += occurrences(server_data, format!("\"{name}\"").as_bytes())?;
    }
    hits += occurrences(server_data, FILE_NAME.as_bytes())?;
    hits += occurrences(server_data, FILE_LINE.as_bytes())?;
    println!(
        "   scanned {} bytes of server files (database, WAL, certificate, file blobs) for every plaintext and name: {hits} hits",
        folder_bytes(server_data)?
    );
    let database = rusqlite::Connection::open_with_flags(
        server_data.join("miyu.sqlite3"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )?;
    let (entries, bytes): (u64, u64) = database.query_row(
        "SELECT (SELECT COUNT(*) FROM group_log) + (SELECT COUNT(*) FROM inbox),
                (SELECT COALESCE(SUM(LENGTH(payload)), 0) FROM group_log) + (SELECT COALESCE(SUM(LENGTH(payload)), 0) FROM inbox)",
        [],
        |row| Ok((row.get(0)?, row.get(1)?)),
    )?;
    println!("   the server holds {entries} undelivered entries: {bytes} bytes of ciphertext");
    anyhow::ensure!(hits == 0, "plaintext found in the server's files");
    Ok(())
}

pub(crate) async fn run() -> anyhow::Result<()> {
    let folder = tempfile::tempdir().context("creating a temporary folder")?;
    let server_data = folder.path().join("server");
    println!(
        "1. Starting a Miyu server on 127.0.0.1 (embedded SQLite, TLS 1.3 with a self-signed key)"
    );
    let server = miyu_server::start(ServerConfig::new(
        server_data.clone(),
        "127.0.0.1:0".parse().context("loopback address")?,
    ))
    .await?;
    println!("   address: {}", server.address());

    println!("2. Creating two accounts: no phone number, no e-mail, just key pairs");
    println!("   (each profile's database is encrypted under a key derived from its passphrase)");
    let passphrase = |text: &str| Protection::Passphrase(Zeroizing::new(text.to_string()));
    let mut alice = Client::init(
        &folder.path().join("alice"),
        server.address().clone(),
        "Alice",
        &passphrase("alice's demo passphrase"),
        None,
    )
    .await?;
    let mut bob = Client::init(
        &folder.path().join("bob"),
        server.address().clone(),
        "Bob",
        &passphrase("bob's demo passphrase"),
        None,
    )
    .await?;
    println!("   alice: {}", alice.account_id());
    println!("   bob:   {}", bob.account_id());

    println!("3. Alice makes a one-time invite link; Bob accepts it");
    let link = alice.invite().await?;
    println!("   {link}");
    bob.accept(&link, None).await?;
    // Introductions are not chat messages: nothing to wait for beyond what is pending.
    show("alice", &alice.sync(Duration::ZERO).await?);
    show("bob", &bob.sync(Duration::ZERO).await?);
    let alice_name_for_bob = alice
        .contacts()?
        .first()
        .map(|c| c.name.clone())
        .context("alice has no contact")?;
    let bob_name_for_alice = bob
        .contacts()?
        .first()
        .map(|c| c.name.clone())
        .context("bob has no contact")?;
    println!(
        "   safety number (same on both sides): {}",
        alice.safety_number(&alice_name_for_bob)?
    );

    println!("4. Messages both ways");
    alice.send(&alice_name_for_bob, MESSAGES[0].1).await?;
    show("bob", &bob.sync(Duration::from_secs(5)).await?);
    bob.send(&bob_name_for_alice, MESSAGES[1].1).await?;
    show("alice", &alice.sync(Duration::from_secs(5)).await?);

    println!("5. Bob goes offline; Alice sends; the server holds the ciphertext until Bob is back");
    bob.disconnect().await;
    alice.send(&alice_name_for_bob, MESSAGES[2].1).await?;
    scan(&server_data)?;
    show("bob", &bob.sync(Duration::from_secs(5)).await?);

    println!(
        "6. Alice sends a file; Bob downloads it (encrypted in 64 KiB chunks, key inside MLS)"
    );
    let file = folder.path().join(FILE_NAME);
    std::fs::write(&file, format!("{FILE_LINE}\n").repeat(2000))?;
    let progress = std::sync::Arc::new(miyu_client::files::Progress::default());
    let sent = alice
        .send_file(
            &alice_name_for_bob,
            &file,
            false,
            std::sync::Arc::clone(&progress),
        )
        .await?;
    show("bob", &bob.sync(Duration::from_secs(5)).await?);
    let received = folder.path().join("bob-received.txt");
    bob.download(&bob_name_for_alice, sent.id, Some(&received), progress)
        .await?;
    anyhow::ensure!(
        std::fs::read(&received)? == std::fs::read(&file)?,
        "the downloaded file differs"
    );
    println!(
        "   {} ({} bytes) arrived intact; the server holds it as ciphertext only",
        sent.name, sent.size
    );
    scan(&server_data)?;

    println!("7. What each side sees");
    for (who, client, contact) in [
        ("alice", &alice, &alice_name_for_bob),
        ("bob", &bob, &bob_name_for_alice),
    ] {
        println!("   {who}'s conversation with {contact}:");
        for message in client.messages(contact)? {
            println!("     {}: {}", message.from, message.body);
        }
    }

    alice.disconnect().await;
    bob.disconnect().await;
    drop((alice, bob));
    server.shutdown().await;
    println!("8. The server stopped; its files after delivery:");
    scan(&server_data)?;
    let mut profile_hits = 0;
    for text in MESSAGES.iter().map(|(_, text)| *text).chain([FILE_NAME]) {
        for profile in ["alice", "bob"] {
            profile_hits += occurrences(&folder.path().join(profile), text.as_bytes())?;
        }
    }
    println!(
        "   Alice's and Bob's own profile files, encrypted at rest, searched the same way: {profile_hits} hits"
    );
    anyhow::ensure!(profile_hits == 0, "plaintext found in a profile's files");
    println!(
        "   Every message was encrypted on the sender's device (MLS) and decrypted on the recipient's."
    );
    Ok(())
}
