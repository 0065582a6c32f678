//! The `latency` scenario: the whole path with real clients. A sender encrypts with MLS, keeps
//! its outbox in SQLite and waits for the server's durable acknowledgement (`Client::send`); the
//! receiver decrypts and stores each message (`Client::next_event`). Each client lives in its
//! own task, since a client holds a SQLite connection that must stay on one task at a time.
//!
//! The sender puts the moment it started sending into the text (`t=<nanoseconds since a
//! process-wide Instant>`), together with the moment the fixed-rate schedule wanted it sent
//! (`d=`), so the receiver can tell both the service latency and the latency including any time
//! the message waited for the sender to fall back into step.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use miyu_client::{Client, Event, Protection};
use miyu_proto::ServerAddress;
use serde::Serialize;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinSet;

use crate::machine::{CpuMeter, CpuUse};
use crate::stats::{Percentiles, nanos, per_second};

/// What one run does.
#[derive(Debug, Clone)]
pub(crate) struct LatencyPlan {
    pub(crate) pairs: usize,
    /// Messages per second each sender aims for.
    pub(crate) rate: u32,
    pub(crate) seconds: u64,
}

impl LatencyPlan {
    fn messages_per_pair(&self) -> u64 {
        u64::from(self.rate) * self.seconds
    }
}

/// The name under which a sender knows its receiver.
const RECEIVER: &str = "receiver";
/// A sender that has fallen this far behind its schedule, as a share of the run, stops: the
/// run's length stays bounded whatever the client manages.
const MAX_SLIP: f64 = 0.01;
/// How long a receiver waits for stragglers after its sender has finished.
const DRAIN_GRACE: Duration = Duration::from_secs(5);
/// Longest any setup step may take.
const SETUP_TIMEOUT: Duration = Duration::from_secs(60);

/// What one run measured.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct LatencyOutcome {
    pub(crate) pairs: usize,
    pub(crate) rate_per_pair: u32,
    pub(crate) seconds: u64,
    pub(crate) planned: u64,
    /// Messages the server acknowledged to their senders.
    pub(crate) sent: u64,
    /// Messages decrypted by their receivers.
    pub(crate) received: u64,
    /// Sent messages that no receiver decrypted before giving up.
    pub(crate) missing: u64,
    /// Messages sent per second, all senders together, over the sending time.
    pub(crate) achieved_send_rate: f64,
    /// Messages decrypted per second, all receivers together, from first send to last receipt.
    pub(crate) received_per_second: f64,
    /// Whether every sender sent all its messages without falling behind its schedule for
    /// more than 1% of the run.
    pub(crate) kept_up: bool,
    /// How far behind its schedule the slowest sender was when it sent its last message.
    pub(crate) final_lag_ms: f64,
    /// Send started → receiver has decrypted and stored it.
    pub(crate) send_to_decrypted: Option<Percentiles>,
    /// Scheduled send time → decrypted: includes time spent waiting for the sender to catch up.
    pub(crate) scheduled_to_decrypted: Option<Percentiles>,
    /// How long one `Client::send` took (encrypt, store, post, wait for the durable answer).
    pub(crate) send_call: Option<Percentiles>,
    pub(crate) setup_seconds: f64,
    /// From the start of sending until every task finished.
    pub(crate) cpu: CpuUse,
}

/// Runs one latency measurement against `server`, keeping the client profiles under `profiles`.
pub(crate) async fn run(
    plan: &LatencyPlan,
    server: &ServerAddress,
    profiles: &Path,
    epoch: Instant,
) -> Result<LatencyOutcome> {
    ensure!(
        plan.pairs > 0 && plan.rate > 0 && plan.seconds > 0,
        "pairs, rate and seconds must be positive"
    );
    let setup_started = Instant::now();
    let mut senders = Vec::with_capacity(plan.pairs);
    let mut receivers = JoinSet::new();
    let mut ready = Vec::with_capacity(plan.pairs);
    for index in 1..=plan.pairs {
        let (sender, receiver) = connect_pair(server, profiles, index)
            .await
            .with_context(|| format!("setting up pair {index}"))?;
        let (finished_sender, finished) = watch::channel(None);
        let (ready_sender, ready_receiver) = oneshot::channel();
        receivers.spawn(receive(
            receiver,
            plan.messages_per_pair(),
            ready_sender,
            finished,
            epoch,
        ));
        ready.push(ready_receiver);
        senders.push((sender, finished_sender));
    }
    for (index, ready) in ready.into_iter().enumerate() {
        tokio::time::timeout(SETUP_TIMEOUT, ready)
            .await
            .map_err(|_| anyhow!("receiver {} never saw its new contact", index + 1))?
            .map_err(|_| anyhow!("receiver {} stopped during setup", index + 1))?;
    }
    let setup_seconds = setup_started.elapsed().as_secs_f64();

    let cpu = CpuMeter::start();
    let mut sending = JoinSet::new();
    for (client, finished) in senders {
        sending.spawn(send(client, plan.clone(), finished, epoch));
    }
    let mut first_send: Option<Instant> = None;
    let mut last_sent: Option<Instant> = None;
    let mut sent = 0;
    let mut send_calls = Vec::new();
    let mut kept_up = true;
    let mut final_lag = Duration::ZERO;
    let mut sending_span = Duration::ZERO;
    while let Some(joined) = sending.join_next().await {
        let tally = joined.context("a sender task failed")??;
        first_send = Some(first_send.map_or(tally.started, |t| t.min(tally.started)));
        if let Some(last) = tally.last_sent {
            last_sent = Some(last_sent.map_or(last, |t: Instant| t.max(last)));
            sending_span = sending_span.max(last.saturating_duration_since(tally.started));
        }
        sent += tally.sent;
        send_calls.extend(tally.send_calls);
        kept_up &= tally.kept_up;
        final_lag = final_lag.max(tally.final_lag);
    }
    let mut received = 0;
    let mut last_received: Option<Instant> = None;
    let mut send_to_decrypted = Vec::new();
    let mut scheduled_to_decrypted = Vec::new();
    while let Some(joined) = receivers.join_next().await {
        let tally = joined.context("a receiver task failed")??;
        received += tally.received;
        if let Some(last) = tally.last_received {
            last_received = Some(last_received.map_or(last, |t: Instant| t.max(last)));
        }
        send_to_decrypted.extend(tally.send_to_decrypted);
        scheduled_to_decrypted.extend(tally.scheduled_to_decrypted);
    }
    let cpu = cpu.stop();
    let first_send = first_send.ok_or_else(|| anyhow!("no sender ran"))?;
    let receiving_span = last_received.map_or(Duration::ZERO, |last| {
        last.saturating_duration_since(first_send)
    });
    Ok(LatencyOutcome {
        pairs: plan.pairs,
        rate_per_pair: plan.rate,
        seconds: plan.seconds,
        planned: plan.messages_per_pair() * plan.pairs as u64,
        sent,
        received,
        missing: sent.saturating_sub(received),
        // Senders run side by side: their rates add up.
        achieved_send_rate: per_second(sent, sending_span),
        received_per_second: per_second(received, receiving_span),
        kept_up,
        final_lag_ms: final_lag.as_secs_f64() * 1e3,
        send_to_decrypted: Percentiles::of_nanos(send_to_decrypted),
        scheduled_to_decrypted: Percentiles::of_nanos(scheduled_to_decrypted),
        send_call: Percentiles::of_nanos(send_calls),
        setup_seconds,
        cpu,
    })
}

/// Two new accounts in fresh profiles, the sender having accepted the receiver's invite.
async fn connect_pair(
    server: &ServerAddress,
    profiles: &Path,
    index: usize,
) -> Result<(Client, Client)> {
    let step = |what: &'static str| {
        move |_| anyhow!("{what} took longer than {} s", SETUP_TIMEOUT.as_secs())
    };
    let mut receiver = tokio::time::timeout(
        SETUP_TIMEOUT,
        Client::init(
            &profiles.join(format!("receiver-{index}")),
            server.clone(),
            &format!("receiver {index}"),
            // Encrypted at rest like any profile; the key file skips a deliberately slow
            // passphrase derivation that would only add to the setup time.
            &Protection::DangerKeyFile,
            None,
        ),
    )
    .await
    .map_err(step("creating the receiver"))?
    .context("creating the receiver")?;
    let mut sender = tokio::time::timeout(
        SETUP_TIMEOUT,
        Client::init(
            &profiles.join(format!("sender-{index}")),
            server.clone(),
            &format!("sender {index}"),
            // Encrypted at rest like any profile; the key file skips a deliberately slow
            // passphrase derivation that would only add to the setup time.
            &Protection::DangerKeyFile,
            None,
        ),
    )
    .await
    .map_err(step("creating the sender"))?
    .context("creating the sender")?;
    let link = tokio::time::timeout(SETUP_TIMEOUT, receiver.invite())
        .await
        .map_err(step("creating an invite"))?
        .context("creating an invite")?;
    tokio::time::timeout(SETUP_TIMEOUT, sender.accept(&link, Some(RECEIVER)))
        .await
        .map_err(step("accepting the invite"))?
        .context("accepting the invite")?;
    Ok((sender, receiver))
}

/// A sender's report that it is done: how many it sent, and when it stopped.
#[derive(Debug, Clone, Copy)]
struct Finished {
    sent: u64,
    at: Instant,
}

struct SenderTally {
    started: Instant,
    last_sent: Option<Instant>,
    sent: u64,
    send_calls: Vec<u64>,
    kept_up: bool,
    final_lag: Duration,
}

/// Sends on a fixed schedule, message `i` due at `i / rate` seconds, one `Client::send` at a
/// time. A sender that is late sends at once, without sleeping, until it is back in step.
async fn send(
    mut client: Client,
    plan: LatencyPlan,
    finished: watch::Sender<Option<Finished>>,
    epoch: Instant,
) -> Result<SenderTally> {
    let planned = plan.messages_per_pair();
    let run_length = Duration::from_secs(plan.seconds);
    let give_up = run_length + run_length.mul_f64(MAX_SLIP);
    let mut send_calls = Vec::with_capacity(usize::try_from(planned).unwrap_or(0));
    let mut sent = 0;
    let mut last_sent = None;
    let mut final_lag = Duration::ZERO;
    let started = Instant::now();
    let outcome: Result<()> = async {
        for index in 0..planned {
            let due = started + due_after(index, plan.rate);
            let now = Instant::now();
            if now.saturating_duration_since(started) > give_up {
                break;
            }
            if due > now {
                tokio::time::sleep_until(due.into()).await;
            }
            let send_started = Instant::now();
            let text = format!(
                "t={} d={} i={index}",
                nanos(send_started.saturating_duration_since(epoch)),
                nanos(due.saturating_duration_since(epoch)),
            );
            client
                .send(RECEIVER, &text)
                .await
                .with_context(|| format!("sending message {}", index + 1))?;
            let done = Instant::now();
            send_calls.push(nanos(done.saturating_duration_since(send_started)));
            final_lag = send_started.saturating_duration_since(due);
            sent += 1;
            last_sent = Some(done);
        }
        Ok(())
    }
    .await;
    // Tell the receiver even after a failure, so it stops waiting.
    let _ = finished.send(Some(Finished {
        sent,
        at: Instant::now(),
    }));
    outcome?;
    client.disconnect().await;
    let kept_up = sent == planned && final_lag <= run_length.mul_f64(MAX_SLIP);
    Ok(SenderTally {
        started,
        last_sent,
        sent,
        send_calls,
        kept_up,
        final_lag,
    })
}

/// When message `index` is due, counted from the start of the run.
fn due_after(index: u64, rate: u32) -> Duration {
    let nanos = u128::from(index) * 1_000_000_000 / u128::from(rate.max(1));
    Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
}

struct ReceiverTally {
    received: u64,
    last_received: Option<Instant>,
    send_to_decrypted: Vec<u64>,
    scheduled_to_decrypted: Vec<u64>,
}

/// Waits until the sender is a contact, says so, then records every message until all that
/// were planned (or, once the sender is done, all it sent) have arrived.
async fn receive(
    mut client: Client,
    planned: u64,
    ready: oneshot::Sender<()>,
    mut finished: watch::Receiver<Option<Finished>>,
    epoch: Instant,
) -> Result<ReceiverTally> {
    loop {
        match client
            .next_event()
            .await
            .context("waiting for the invitation")?
        {
            Event::ContactAdded(_) => break,
            _ => continue,
        }
    }
    let _ = ready.send(());
    let mut tally = ReceiverTally {
        received: 0,
        last_received: None,
        send_to_decrypted: Vec::with_capacity(usize::try_from(planned).unwrap_or(0)),
        scheduled_to_decrypted: Vec::with_capacity(usize::try_from(planned).unwrap_or(0)),
    };
    let all_in = |received: u64, finished: &watch::Receiver<Option<Finished>>| {
        received >= planned || finished.borrow().is_some_and(|done| received >= done.sent)
    };
    while !all_in(tally.received, &finished) {
        tokio::select! {
            event = client.next_event() => {
                let Event::Message(message) = event.context("receiving")? else {
                    continue;
                };
                if message.outgoing {
                    continue;
                }
                let now = Instant::now();
                let Some(stamps) = Stamps::parse(&message.body) else {
                    bail!("a message that this benchmark did not send: {:?}", message.body);
                };
                let now = nanos(now.saturating_duration_since(epoch));
                tally.send_to_decrypted.push(now.saturating_sub(stamps.send_started));
                tally.scheduled_to_decrypted.push(now.saturating_sub(stamps.due));
                tally.received += 1;
                tally.last_received = Some(Instant::now());
            }
            // Only once the sender is done and everything it sent is in, or the grace has
            // passed (missing messages are then reported). The unfinished `next_event` is
            // dropped along with the client.
            () = sender_done(&mut finished, tally.received) => break,
        }
    }
    client.disconnect().await;
    Ok(tally)
}

/// Resolves once the sender has finished and either `received` covers all it sent or
/// `DRAIN_GRACE` has passed since.
async fn sender_done(finished: &mut watch::Receiver<Option<Finished>>, received: u64) {
    let done = loop {
        if let Some(done) = *finished.borrow_and_update() {
            break done;
        }
        if finished.changed().await.is_err() {
            // The sender went away without a word (it panicked): its result says why.
            return;
        }
    };
    if received < done.sent {
        tokio::time::sleep_until((done.at + DRAIN_GRACE).into()).await;
    }
}

/// The times a message's text carries, in nanoseconds since the shared epoch.
#[derive(Debug, PartialEq, Eq)]
struct Stamps {
    send_started: u64,
    due: u64,
}

impl Stamps {
    fn parse(text: &str) -> Option<Self> {
        let mut send_started = None;
        let mut due = None;
        for part in text.split_whitespace() {
            match part.split_once('=')? {
                ("t", value) => send_started = Some(value.parse().ok()?),
                ("d", value) => due = Some(value.parse().ok()?),
                _ => {}
            }
        }
        Some(Self {
            send_started: send_started?,
            due: due?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_round_trip_through_the_message_text() {
        assert_eq!(
            Stamps::parse("t=1500 d=1000 i=7"),
            Some(Stamps {
                send_started: 1500,
                due: 1000
            })
        );
        assert_eq!(Stamps::parse("hello"), None);
        assert_eq!(Stamps::parse("t=x d=1"), None);
        assert_eq!(Stamps::parse("t=1"), None);
    }

    #[test]
    fn the_schedule_spreads_messages_evenly() {
        assert_eq!(due_after(0, 1000), Duration::ZERO);
        assert_eq!(due_after(1, 1000), Duration::from_millis(1));
        assert_eq!(due_after(3, 200), Duration::from_millis(15));
        assert_eq!(due_after(1, 3), Duration::from_nanos(333_333_333));
    }
}
