//! The `link-device` scenario: how long linking a new device takes for an account with many
//! conversations and a long history — the real client library on both sides, through a server
//! in this process, over loopback TLS.
//!
//! Setup (not timed): each of N contacts accepts an invite of the account's first device, which
//! then sends M messages spread over those conversations. Timed: from the moment the new
//! device shows its code until it has taken in the history and joined every conversation; the
//! approving side (certificate, one commit per conversation, history export and upload) is
//! timed apart.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use miyu_client::devices::LINK_WAIT;
use miyu_client::{Client, Protection};
use miyu_proto::ServerAddress;
use serde::Serialize;

/// What one run measured.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct LinkOutcome {
    pub(crate) conversations: usize,
    pub(crate) messages: usize,
    pub(crate) setup_seconds: f64,
    /// The first device's part: certify, add to every conversation, export and upload.
    pub(crate) approve_seconds: f64,
    /// From the code shown to the new device ready (history in, every conversation joined).
    pub(crate) link_seconds: f64,
    /// What the new device says it received.
    pub(crate) received_conversations: usize,
    pub(crate) received_messages: usize,
}

pub(crate) async fn run(
    server: &ServerAddress,
    profiles: &Path,
    conversations: usize,
    messages: usize,
) -> Result<LinkOutcome> {
    ensure!(conversations >= 1, "at least one conversation");
    let started = Instant::now();
    let mut phone = Client::init(
        &profiles.join("phone"),
        server.clone(),
        "phone",
        // Encrypted at rest like any profile; the key file skips a deliberately slow
        // passphrase derivation that would only add to the setup time.
        &Protection::DangerKeyFile,
        None,
    )
    .await
    .context("creating the first device")?;
    for index in 0..conversations {
        // The contacts redeem the first device's invites (a device may redeem only a few
        // invites a minute itself).
        let mut contact = Client::init(
            &profiles.join(format!("contact-{index}")),
            server.clone(),
            &format!("contact{index}"),
            &Protection::DangerKeyFile,
            None,
        )
        .await
        .context("creating a contact")?;
        let invite = phone.invite().await.context("making an invite")?;
        contact
            .accept(&invite, Some("phone"))
            .await
            .context("accepting an invite")?;
        contact.disconnect().await;
    }
    // The first device takes in their introductions.
    phone
        .sync(Duration::ZERO)
        .await
        .context("taking in the contacts")?;
    for number in 0..messages {
        let contact = format!("contact{}", number % conversations);
        phone
            .send(&contact, &format!("message {number} of the history"))
            .await
            .context("sending the history")?;
    }
    let setup_seconds = started.elapsed().as_secs_f64();

    let (codes, mut code) = tokio::sync::mpsc::unbounded_channel();
    let new_profile = profiles.join("laptop");
    let server = server.clone();
    let started = Instant::now();
    let linking = tokio::spawn(async move {
        Client::link(
            &new_profile,
            server,
            "laptop",
            &Protection::DangerKeyFile,
            None,
            LINK_WAIT,
            move |shown| {
                let _ = codes.send(shown.clone());
            },
        )
        .await
    });
    let shown = tokio::time::timeout(Duration::from_secs(60), code.recv())
        .await
        .context("the new device showed no code")?
        .context("the new device stopped before showing a code")?;
    let approving = Instant::now();
    phone
        .approve_device(&shown, LINK_WAIT)
        .await
        .context("approving the new device")?;
    let approve_seconds = approving.elapsed().as_secs_f64();
    let (mut laptop, linked) = linking
        .await
        .context("the linking task failed")?
        .context("linking")?;
    let link_seconds = started.elapsed().as_secs_f64();
    laptop.disconnect().await;
    phone.disconnect().await;
    Ok(LinkOutcome {
        conversations,
        messages,
        setup_seconds,
        approve_seconds,
        link_seconds,
        received_conversations: linked.conversations,
        received_messages: linked.messages,
    })
}
