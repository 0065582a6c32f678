//! The `relay` scenario: how fast the server durably relays messages it cannot read.
//!
//! Each pair is two raw protocol connections with real device certificates and challenge
//! signatures. The receiver registers and creates an invite; the sender claims it and creates a
//! group with the receiver as its other member, which is everything the server checks. The
//! sender then pipelines `Post`s of opaque random payloads, keeping a bounded number
//! unanswered, while the receiver reads the `Delivery` pushes and acknowledges them
//! cumulatively. No MLS is involved: the client side costs as little as the protocol allows,
//! so the figures are about the server.
//!
//! The first 8 bytes of each payload carry the time it was posted (nanoseconds since a
//! process-wide `Instant`), so the receiver can tell how long delivery took. The rest is random.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use futures_util::FutureExt;
use miyu_client::net::{self, Connection};
use miyu_crypto::identity::AccountKeys;
use miyu_proto::wire::{self, client_frame::Body as Request, server_frame::Body as Reply};
use miyu_proto::{DeviceId, ServerAddress};
use rand::{RngCore, SeedableRng};
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::sync::Barrier;
use tokio::task::JoinSet;

use crate::machine::{CpuMeter, CpuUse};
use crate::stats::{Percentiles, nanos, per_second};

/// What one run does.
#[derive(Debug, Clone)]
pub(crate) struct RelayPlan {
    pub(crate) pairs: usize,
    /// Messages each sender posts.
    pub(crate) messages: u64,
    pub(crate) payload_bytes: usize,
    /// Posts a sender may have unanswered at once.
    pub(crate) window: usize,
    /// A receiver acknowledges after this many deliveries (and once at the end).
    pub(crate) ack_every: u64,
    pub(crate) registration_token: String,
}

/// Bytes of a payload taken by the posting time.
pub(crate) const STAMP_BYTES: usize = 8;
/// How long any one wait for the server may take before the run is declared stuck.
const STALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Frames a sender reads in one go before it tops its window up again.
const MAX_DRAIN: usize = 1024;
/// Size of the dummy key packages and Welcome: the server stores them without looking.
const DUMMY_BYTES: usize = 64;

/// What one run measured.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct RelayOutcome {
    pub(crate) pairs: usize,
    pub(crate) messages_per_pair: u64,
    pub(crate) payload_bytes: usize,
    pub(crate) window: usize,
    pub(crate) ack_every: u64,
    /// Messages that reached their receiver.
    pub(crate) delivered: u64,
    /// From the first post to the last delivery, across all pairs.
    pub(crate) delivery_seconds: f64,
    pub(crate) delivered_per_second: f64,
    /// Posts the server acknowledged (`Posted`: stored durably).
    pub(crate) posted: u64,
    /// From the first post to the last `Posted`, across all pairs.
    pub(crate) posted_seconds: f64,
    pub(crate) posted_per_second: f64,
    /// Post sent → its `Posted` answer read by the sender.
    pub(crate) post_to_posted: Option<Percentiles>,
    /// Post sent → its `Delivery` read by the receiver.
    pub(crate) post_to_delivered: Option<Percentiles>,
    /// A sender's own posts that came back to it with the payload and without the `own` flag
    /// (the server sends them from its store when a connection's mailbox overflowed).
    pub(crate) own_posts_echoed_in_full: u64,
    /// Time to register the devices, create invites and groups.
    pub(crate) setup_seconds: f64,
    /// From the start of posting until every task finished.
    pub(crate) cpu: CpuUse,
}

/// Runs one relay measurement against `server`. `epoch` is the process-wide time origin the
/// payload stamps count from.
pub(crate) async fn run(
    plan: &RelayPlan,
    server: &ServerAddress,
    epoch: Instant,
) -> Result<RelayOutcome> {
    ensure!(
        plan.pairs > 0 && plan.messages > 0 && plan.window > 0 && plan.ack_every > 0,
        "pairs, messages, window and ack interval must be positive"
    );
    ensure!(
        plan.payload_bytes >= STAMP_BYTES,
        "payloads need at least {STAMP_BYTES} bytes for the timestamp"
    );

    let setup_started = Instant::now();
    let mut pairs = Vec::with_capacity(plan.pairs);
    for index in 0..plan.pairs {
        let pair = Pair::set_up(server, &plan.registration_token)
            .await
            .with_context(|| format!("setting up pair {}", index + 1))?;
        pairs.push(pair);
    }
    let setup_seconds = setup_started.elapsed().as_secs_f64();

    let cpu = CpuMeter::start();
    let plan = Arc::new(plan.clone());
    let start = Arc::new(Barrier::new(plan.pairs));
    let mut senders = JoinSet::new();
    let mut receivers = JoinSet::new();
    for pair in pairs {
        receivers.spawn(receive(
            pair.receiver,
            pair.group_id.clone(),
            Arc::clone(&plan),
            epoch,
        ));
        senders.spawn(send(
            pair.sender,
            pair.group_id,
            Arc::clone(&plan),
            epoch,
            Arc::clone(&start),
        ));
    }

    let mut first_post: Option<Instant> = None;
    let mut last_posted: Option<Instant> = None;
    let mut posted = 0;
    let mut post_to_posted = Vec::new();
    let mut full_echoes = 0;
    while let Some(joined) = senders.join_next().await {
        let tally = joined.context("a sender task failed")??;
        first_post = earliest(first_post, Some(tally.first_post));
        last_posted = latest(last_posted, tally.last_posted);
        posted += tally.posted;
        post_to_posted.extend(tally.latencies);
        full_echoes += tally.full_echoes;
    }
    let mut last_delivery: Option<Instant> = None;
    let mut delivered = 0;
    let mut post_to_delivered = Vec::new();
    while let Some(joined) = receivers.join_next().await {
        let tally = joined.context("a receiver task failed")??;
        last_delivery = latest(last_delivery, tally.last_delivery);
        delivered += tally.delivered;
        post_to_delivered.extend(tally.latencies);
    }
    let cpu = cpu.stop();

    let first_post = first_post.ok_or_else(|| anyhow!("no sender posted anything"))?;
    let span = |last: Option<Instant>| {
        last.map_or(Duration::ZERO, |last| {
            last.saturating_duration_since(first_post)
        })
    };
    let delivery_span = span(last_delivery);
    let posted_span = span(last_posted);
    Ok(RelayOutcome {
        pairs: plan.pairs,
        messages_per_pair: plan.messages,
        payload_bytes: plan.payload_bytes,
        window: plan.window,
        ack_every: plan.ack_every,
        delivered,
        delivery_seconds: delivery_span.as_secs_f64(),
        delivered_per_second: per_second(delivered, delivery_span),
        posted,
        posted_seconds: posted_span.as_secs_f64(),
        posted_per_second: per_second(posted, posted_span),
        post_to_posted: Percentiles::of_nanos(post_to_posted),
        post_to_delivered: Percentiles::of_nanos(post_to_delivered),
        own_posts_echoed_in_full: full_echoes,
        setup_seconds,
        cpu,
    })
}

fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

fn latest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    }
}

/// One authenticated raw connection.
struct Device {
    connection: Connection,
    id: DeviceId,
}

impl Device {
    /// Connects and registers a fresh account with one device, as a real client would, but
    /// with dummy key packages.
    async fn register(server: &ServerAddress, registration_token: &str) -> Result<Self> {
        let keys = AccountKeys::generate(&mut rand::rngs::OsRng);
        let mut connection = within(STALL_TIMEOUT, Connection::open(server, None))
            .await?
            .context("connecting")?;
        let (server_sha256, nonce) = connection.challenge();
        let challenge_signature = keys.sign_auth(server_sha256, nonce);
        let reply = call(
            &mut connection,
            Request::Register(wire::Register {
                certificate: Some(keys.certificate().to_wire()),
                challenge_signature,
                registration_token: registration_token.to_string(),
                key_packages: vec![random_bytes(DUMMY_BYTES)],
                last_resort_key_package: random_bytes(DUMMY_BYTES),
            }),
        )
        .await
        .context("registering")?;
        let Reply::Registered(registered) = reply else {
            bail!("unexpected answer to Register: {reply:?}");
        };
        let id = DeviceId::from_bytes(&registered.device_id).context("the server's device id")?;
        ensure!(
            id == keys.certificate().device_id(),
            "the server registered another device id"
        );
        Ok(Self { connection, id })
    }
}

/// A sender and a receiver sharing one group.
struct Pair {
    sender: Device,
    receiver: Device,
    group_id: Vec<u8>,
}

impl Pair {
    async fn set_up(server: &ServerAddress, registration_token: &str) -> Result<Self> {
        let mut receiver = Device::register(server, registration_token)
            .await
            .context("receiver")?;
        let token = random_bytes(32);
        let reply = call(
            &mut receiver.connection,
            Request::CreateInvite(wire::CreateInvite {
                token_hash: Sha256::digest(&token).to_vec(),
                uses: 1,
            }),
        )
        .await
        .context("creating an invite")?;
        ensure!(
            matches!(reply, Reply::Done(_)),
            "unexpected answer to CreateInvite: {reply:?}"
        );

        let mut sender = Device::register(server, registration_token)
            .await
            .context("sender")?;
        let reply = call(
            &mut sender.connection,
            Request::ClaimInvite(wire::ClaimInvite { token }),
        )
        .await
        .context("claiming the invite")?;
        let Reply::InviteClaimed(claimed) = reply else {
            bail!("unexpected answer to ClaimInvite: {reply:?}");
        };
        ensure!(
            claimed
                .devices
                .iter()
                .any(|device| device.device_id == receiver.id.as_bytes()),
            "the invite did not hand out the receiver's device"
        );

        let group_id = random_bytes(16);
        let reply = call(
            &mut sender.connection,
            Request::CreateGroup(wire::CreateGroup {
                group_id: group_id.clone(),
                epoch: 1,
                member_devices: vec![receiver.id.as_bytes().to_vec()],
                welcome: Vec::new(),
                posting_key: Vec::new(),
                welcomes: vec![wire::InboxMessage {
                    device_id: receiver.id.as_bytes().to_vec(),
                    payload: random_bytes(DUMMY_BYTES),
                }],
            }),
        )
        .await
        .context("creating the group")?;
        ensure!(
            matches!(reply, Reply::Done(_)),
            "unexpected answer to CreateGroup: {reply:?}"
        );
        Ok(Self {
            sender,
            receiver,
            group_id,
        })
    }
}

/// What a sender saw.
struct SenderTally {
    first_post: Instant,
    last_posted: Option<Instant>,
    posted: u64,
    latencies: Vec<u64>,
    /// Own posts pushed back with their payload and `own` unset.
    full_echoes: u64,
}

/// Posts `plan.messages` payloads, at most `plan.window` unanswered, and acknowledges the
/// echoes of its own posts the way a real device does.
async fn send(
    mut device: Device,
    group_id: Vec<u8>,
    plan: Arc<RelayPlan>,
    epoch: Instant,
    start: Arc<Barrier>,
) -> Result<SenderTally> {
    let total = plan.messages;
    let mut unanswered: HashMap<u64, Instant> = HashMap::with_capacity(plan.window);
    let mut acks = Acknowledger::new(group_id.clone(), plan.ack_every);
    let mut latencies = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
    let mut rng = rand::rngs::StdRng::from_entropy();
    let mut sent = 0;
    let mut posted = 0;
    let mut last_posted = None;
    let mut full_echoes = 0;

    start.wait().await;
    let first_post = Instant::now();
    while posted < total {
        while sent < total && unanswered.len() < plan.window {
            let mut payload = vec![0u8; plan.payload_bytes];
            rng.fill_bytes(&mut payload[STAMP_BYTES..]);
            let posted_at = Instant::now();
            stamp(&mut payload, epoch, posted_at);
            let request_id = device
                .connection
                .send(Request::Post(wire::Post {
                    group_id: group_id.clone(),
                    epoch: 1,
                    kind: wire::EntryKind::Application as i32,
                    payload,
                    expires_at: 0,
                    next_posting_key: Vec::new(),
                }))
                .await
                .context("posting")?;
            unanswered.insert(request_id, posted_at);
            sent += 1;
        }
        // Wait for one frame, then take whatever else has already arrived.
        let mut frame = Some(
            within(STALL_TIMEOUT, device.connection.receive())
                .await
                .context("waiting for Posted")??,
        );
        let mut drained = 0;
        while let Some(this) = frame.take() {
            let now = Instant::now();
            match (this.request_id, this.body) {
                (0, Some(Reply::Delivery(delivery))) => {
                    if let Some(wire::delivery::Entry::GroupEntry(entry)) = delivery.entry {
                        if !entry.own && !entry.payload.is_empty() {
                            full_echoes += 1;
                        }
                        acks.delivered(&mut device.connection, entry.seq).await?;
                    }
                }
                (0, Some(Reply::Error(error))) => {
                    bail!("the server said: {}", net::ServerError::from(error));
                }
                (0, _) => {}
                (request_id, Some(Reply::Posted(_))) => {
                    let posted_at = unanswered.remove(&request_id).ok_or_else(|| {
                        anyhow!("Posted for request {request_id}, which is not an unanswered post")
                    })?;
                    latencies.push(nanos(now.saturating_duration_since(posted_at)));
                    posted += 1;
                    last_posted = Some(now);
                }
                (request_id, Some(Reply::Error(error))) => {
                    let what = if unanswered.contains_key(&request_id) {
                        "a post"
                    } else {
                        "an acknowledgement"
                    };
                    let error = net::ServerError::from(error);
                    let hint = if error.code == wire::ErrorCode::RateLimited {
                        "; the server limits requests per connection: give it a higher \
                         requests_per_second in its configuration file"
                    } else {
                        ""
                    };
                    bail!("the server refused {what}: {error}{hint}");
                }
                (_, _) => {} // Done, for an acknowledgement.
            }
            drained += 1;
            if drained < MAX_DRAIN {
                frame = match device.connection.receive().now_or_never() {
                    Some(result) => Some(result.context("reading answers")?),
                    None => None,
                };
            }
        }
    }
    device.connection.close().await;
    Ok(SenderTally {
        first_post,
        last_posted,
        posted,
        latencies,
        full_echoes,
    })
}

/// What a receiver saw.
struct ReceiverTally {
    delivered: u64,
    last_delivery: Option<Instant>,
    latencies: Vec<u64>,
}

/// Reads deliveries until all `plan.messages` of its group have arrived, acknowledging every
/// `plan.ack_every` and once at the end (waiting for that last answer).
async fn receive(
    mut device: Device,
    group_id: Vec<u8>,
    plan: Arc<RelayPlan>,
    epoch: Instant,
) -> Result<ReceiverTally> {
    let mut acks = Acknowledger::new(group_id.clone(), plan.ack_every);
    let mut delivered = 0;
    let mut highest_seq = 0;
    let mut last_delivery = None;
    let mut latencies = Vec::with_capacity(usize::try_from(plan.messages).unwrap_or(0));
    while delivered < plan.messages {
        let frame = within(STALL_TIMEOUT, device.connection.receive())
            .await
            .context("waiting for deliveries")??;
        let now = Instant::now();
        match (frame.request_id, frame.body) {
            (0, Some(Reply::Delivery(delivery))) => match delivery.entry {
                Some(wire::delivery::Entry::GroupEntry(entry)) => {
                    ensure!(
                        entry.group_id == group_id,
                        "a delivery for a group this device is not in"
                    );
                    if entry.seq <= highest_seq {
                        continue; // Delivered again: counted already.
                    }
                    highest_seq = entry.seq;
                    ensure!(
                        entry.payload.len() == plan.payload_bytes,
                        "a delivery of {} bytes, not the {} posted",
                        entry.payload.len(),
                        plan.payload_bytes
                    );
                    if let Some(posted_at) = posted_at(&entry.payload) {
                        let age =
                            nanos(now.saturating_duration_since(epoch)).saturating_sub(posted_at);
                        latencies.push(age);
                    }
                    delivered += 1;
                    last_delivery = Some(now);
                    acks.delivered(&mut device.connection, entry.seq).await?;
                }
                Some(wire::delivery::Entry::InboxEntry(entry)) => {
                    device
                        .connection
                        .send(Request::AckInbox(wire::AckInbox { seq: entry.seq }))
                        .await
                        .context("acknowledging the Welcome")?;
                }
                None => {}
            },
            (_, Some(Reply::Error(error))) => {
                bail!("the server said: {}", net::ServerError::from(error));
            }
            _ => {}
        }
    }
    if let Some(last_ack) = acks.flush(&mut device.connection).await? {
        loop {
            let frame = within(STALL_TIMEOUT, device.connection.receive())
                .await
                .context("waiting for the last acknowledgement's answer")??;
            if frame.request_id == last_ack {
                net::into_result(frame).context("the last acknowledgement")?;
                break;
            }
        }
    }
    device.connection.close().await;
    Ok(ReceiverTally {
        delivered,
        last_delivery,
        latencies,
    })
}

/// Cumulative group acknowledgements, one per `every` new entries.
struct Acknowledger {
    group_id: Vec<u8>,
    every: u64,
    highest_seq: u64,
    unacknowledged: u64,
}

impl Acknowledger {
    fn new(group_id: Vec<u8>, every: u64) -> Self {
        Self {
            group_id,
            every,
            highest_seq: 0,
            unacknowledged: 0,
        }
    }

    /// Notes a delivered entry; returns the sequence number to acknowledge when one is due.
    fn note(&mut self, seq: u64) -> Option<u64> {
        if seq > self.highest_seq {
            self.highest_seq = seq;
            self.unacknowledged += 1;
        }
        if self.unacknowledged >= self.every {
            self.take()
        } else {
            None
        }
    }

    /// The sequence number that acknowledges everything seen, if anything is unacknowledged.
    fn take(&mut self) -> Option<u64> {
        if self.unacknowledged == 0 {
            return None;
        }
        self.unacknowledged = 0;
        Some(self.highest_seq)
    }

    async fn delivered(&mut self, connection: &mut Connection, seq: u64) -> Result<()> {
        if let Some(seq) = self.note(seq) {
            self.send(connection, seq).await?;
        }
        Ok(())
    }

    /// Acknowledges everything seen so far; returns the request id, if anything was sent.
    async fn flush(&mut self, connection: &mut Connection) -> Result<Option<u64>> {
        match self.take() {
            Some(seq) => self.send(connection, seq).await.map(Some),
            None => Ok(None),
        }
    }

    async fn send(&self, connection: &mut Connection, seq: u64) -> Result<u64> {
        connection
            .send(Request::AckGroup(wire::AckGroup {
                group_id: self.group_id.clone(),
                seq,
            }))
            .await
            .context("acknowledging")
    }
}

/// Writes the posting time into the first bytes of a payload.
pub(crate) fn stamp(payload: &mut [u8], epoch: Instant, at: Instant) {
    let since_epoch = nanos(at.saturating_duration_since(epoch));
    payload[..STAMP_BYTES].copy_from_slice(&since_epoch.to_le_bytes());
}

/// Reads the posting time back, in nanoseconds since the epoch.
pub(crate) fn posted_at(payload: &[u8]) -> Option<u64> {
    let bytes: [u8; STAMP_BYTES] = payload.get(..STAMP_BYTES)?.try_into().ok()?;
    Some(u64::from_le_bytes(bytes))
}

fn random_bytes(count: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; count];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    bytes
}

/// Sends a request and waits (bounded) for its answer; server errors become errors.
async fn call(connection: &mut Connection, body: Request) -> Result<Reply> {
    let reply = within(STALL_TIMEOUT, connection.call(body)).await??;
    Ok(reply)
}

async fn within<T>(limit: Duration, future: impl Future<Output = T>) -> Result<T> {
    tokio::time::timeout(limit, future)
        .await
        .map_err(|_| anyhow!("the server did not answer within {} s", limit.as_secs()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stamp_reads_back_and_short_payloads_have_none() {
        let epoch = Instant::now();
        let at = epoch + Duration::from_nanos(123_456_789);
        let mut payload = vec![0xaa; 32];
        stamp(&mut payload, epoch, at);
        assert_eq!(posted_at(&payload), Some(123_456_789));
        assert_eq!(&payload[STAMP_BYTES..], &[0xaa; 24]);
        assert_eq!(posted_at(&[1, 2, 3]), None);
    }

    #[test]
    fn acknowledgements_are_cumulative_and_ignore_repeats() {
        let mut acks = Acknowledger::new(vec![1; 16], 3);
        assert_eq!(acks.note(1), None);
        assert_eq!(acks.note(2), None);
        assert_eq!(acks.note(2), None);
        assert_eq!(acks.note(1), None);
        assert_eq!(acks.note(3), Some(3));
        assert_eq!(acks.take(), None);
        assert_eq!(acks.note(5), None);
        assert_eq!(acks.take(), Some(5));
    }
}
