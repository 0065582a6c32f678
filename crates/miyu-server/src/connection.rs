//! One client connection: the handshake, authentication, requests, and the delivery task that
//! pushes inbox and group entries to the device.
//!
//! A connection moves through [`Phase`]s: it must say `Hello` (and get a challenge), then
//! `Register` or `Authenticate` by signing that challenge, and only then may it use the store.
//! Requests after authentication are pipelined: each is queued on the store in the order it
//! arrived and answered when its batch is durable.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::extract::ws::{Message, WebSocket};
use futures_util::{SinkExt, StreamExt};
use miyu_proto::cert::VerifiedCertificate;
use miyu_proto::frame::{self, FrameError, PROTOCOL_VERSION};
use miyu_proto::wire::{
    self, ErrorCode, client_frame::Body as Request, server_frame::Body as Reply,
};
use miyu_proto::{AccountId, DeviceId, Epoch, GroupId};
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::sync::{mpsc, watch};

use crate::hub::{Hub, Mailbox, PushedEntry};
use crate::limits::TokenBucket;
use crate::store::worker::StoreHandle;
use crate::store::{
    BackupSegment, EntryKind, NewCommit, NewDevice, NewGroup, NewRecovery, Recovery, StoreError,
};

/// Frames waiting to be written to one connection.
const OUTBOUND_DEPTH: usize = 256;
/// A peer that has not taken a queued frame, or let one be written, for this long is not
/// reading: the connection is closed rather than holding memory and tasks for it.
const STALL_TIMEOUT: Duration = Duration::from_secs(15);
/// A connection must authenticate this soon after it opens.
const AUTHENTICATION_DEADLINE: Duration = Duration::from_secs(30);
/// One-time key packages one device may keep on the server.
const MAX_STORED_KEY_PACKAGES: u32 = 1000;
/// Entries read from the store at a time when a device catches up.
const PAGE: usize = 256;
/// A connection that keeps sending frames the server cannot use is closed after this many.
const MAX_BAD_FRAMES: u32 = 32;
/// Key packages one request may upload.
const MAX_KEY_PACKAGES_PER_UPLOAD: usize = 200;
/// How many times one invite (a group's invite link) can be claimed.
const MAX_INVITE_USES: u32 = 1000;
/// How long an unused invite stays valid.
const INVITE_LIFETIME: Duration = Duration::from_secs(30 * 24 * 3600);
/// Invite claims one connection may make per minute: tokens are unguessable, this only keeps
/// a hostile client from turning the server into a key-package pump.
const CLAIMS_PER_MINUTE: f64 = 20.0;

/// Contact key-package claims (for adding contacts to a group) one device may make: enough to
/// create a group with a thousand contacts at once, then one a second. Each claim takes a key
/// package of every device of an account that shares a group with the claimer already. Kept
/// per device (not per connection), so reconnecting does not refill it.
const CONTACT_CLAIMS_BURST: f64 = 1000.0;
const CONTACT_CLAIMS_PER_SECOND: f64 = 1.0;
/// Username lookups one device may make: a burst of this many, then one every
/// `LOOKUP_REFILL`. Registering is free, so the server-wide budget below is what really bounds
/// how many names anyone can test.
const LOOKUP_BURST: f64 = 5.0;
const LOOKUP_REFILL: Duration = Duration::from_secs(360);
/// Username lookups the whole server answers per minute.
pub(crate) const LOOKUPS_PER_MINUTE: f64 = 60.0;
/// Per-device lookup budgets kept before idle ones are forgotten.
const MAX_LOOKUP_BUCKETS: usize = 10_000;
/// Disappearing messages last at most this long on the server (the longest timer is 4 weeks).
const MAX_EXPIRY: u64 = 5 * 7 * 24 * 3600;
/// How long an account may stay inactive before the server deletes it: 1, 3, 6 or 12 months.
const ACCOUNT_LIFETIMES_DAYS: [u32; 4] = [30, 91, 182, 365];
/// A connection that sends nothing for this long is closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// The largest sealed message a linking mailbox holds, and how long it holds it.
const MAX_LINK_PAYLOAD: usize = 64 * 1024;
const LINK_LIFETIME: Duration = Duration::from_secs(600);
/// Messages one device may leave in linking mailboxes: a burst of this many, refilled over an
/// hour. Linking a device takes one; the budget only keeps a device from filling the store.
const LINK_PUTS_PER_HOUR: f64 = 30.0;
/// Mailbox takes one connection may make a second (bursts of as many): a new device polls its
/// mailbox, and a connection that has not authenticated must not hammer the store.
const LINK_TAKES_PER_SECOND: f64 = 2.0;
/// The largest recovery bundle: the identity key, sealed, with room to spare.
const MAX_RECOVERY_BUNDLE: usize = 4096;
/// Recovery attempts one connection may make a second (bursts of as many). What bounds
/// guessing is the account's count of failures, kept in the store; this only keeps a
/// connection that has not authenticated from hammering the store.
const RECOVERIES_PER_SECOND: f64 = 2.0;
/// The longest backup, in plaintext bytes: the largest file a client sends.
const MAX_BACKUP_SIZE: u64 = 4 * 1024 * 1024 * 1024;

/// What every connection shares.
pub(crate) struct Shared {
    pub(crate) store: StoreHandle,
    pub(crate) hub: Hub,
    pub(crate) certificate_sha256: [u8; 32],
    pub(crate) registration_token: Option<String>,
    pub(crate) registrations: Mutex<TokenBucket>,
    pub(crate) lookups: Mutex<Lookups>,
    pub(crate) contact_claims: Mutex<DeviceBudgets>,
    pub(crate) link_puts: Mutex<DeviceBudgets>,
    pub(crate) requests_per_second: u32,
    pub(crate) shutdown: watch::Receiver<bool>,
    /// Encrypted file blobs: where they live, their limits and bookkeeping.
    pub(crate) blobs: Arc<crate::blobs::Blobs>,
}

/// Username lookup budgets: one per device, and one for the whole server.
pub(crate) struct Lookups {
    pub(crate) server: TokenBucket,
    pub(crate) devices: HashMap<DeviceId, TokenBucket>,
}

impl Lookups {
    pub(crate) fn new(now: Instant) -> Self {
        Self {
            server: TokenBucket::new(LOOKUPS_PER_MINUTE / 60.0, LOOKUPS_PER_MINUTE, now),
            devices: HashMap::new(),
        }
    }

    /// Takes one lookup from the device's budget and the server's.
    fn try_take(&mut self, device: DeviceId, now: Instant) -> bool {
        if self.devices.len() >= MAX_LOOKUP_BUCKETS {
            self.devices.retain(|_, bucket| !bucket.is_full(now));
        }
        let bucket = self.devices.entry(device).or_insert_with(|| {
            TokenBucket::new(1.0 / LOOKUP_REFILL.as_secs_f64(), LOOKUP_BURST, now)
        });
        // The device's budget is spent even when the server's is empty: otherwise a device
        // could keep trying for free while others use the server's budget up.
        bucket.try_take(now) && self.server.try_take(now)
    }
}

/// One token bucket per device, forgetting full (idle) ones when there are too many.
pub(crate) struct DeviceBudgets {
    rate: f64,
    burst: f64,
    devices: HashMap<DeviceId, TokenBucket>,
}

impl DeviceBudgets {
    pub(crate) fn contact_claims() -> Self {
        Self {
            rate: CONTACT_CLAIMS_PER_SECOND,
            burst: CONTACT_CLAIMS_BURST,
            devices: HashMap::new(),
        }
    }

    pub(crate) fn link_puts() -> Self {
        Self {
            rate: LINK_PUTS_PER_HOUR / 3600.0,
            burst: LINK_PUTS_PER_HOUR,
            devices: HashMap::new(),
        }
    }

    fn try_take(&mut self, device: DeviceId, now: Instant) -> bool {
        if self.devices.len() >= MAX_LOOKUP_BUCKETS {
            self.devices.retain(|_, bucket| !bucket.is_full(now));
        }
        let (rate, burst) = (self.rate, self.burst);
        self.devices
            .entry(device)
            .or_insert_with(|| TokenBucket::new(rate, burst, now))
            .try_take(now)
    }
}

/// Resolves once the server is stopping (or its stop signal is gone).
pub(crate) async fn stopped(stop: &mut watch::Receiver<bool>) {
    loop {
        let stopping = *stop.borrow_and_update();
        if stopping || stop.changed().await.is_err() {
            return;
        }
    }
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}

fn encode(request_id: u64, body: Reply) -> Vec<u8> {
    frame::encode(&wire::ServerFrame {
        version: PROTOCOL_VERSION,
        request_id,
        body: Some(body),
    })
}

fn error_frame(request_id: u64, code: ErrorCode, message: impl Into<String>) -> Vec<u8> {
    encode(request_id, error_reply(code, message))
}

fn error_reply(code: ErrorCode, message: impl Into<String>) -> Reply {
    Reply::Error(wire::Error {
        code: code as i32,
        message: message.into(),
        current_epoch: 0,
        supported_versions: vec![],
    })
}

fn store_error_frame(request_id: u64, error: &StoreError) -> Vec<u8> {
    let (code, message) = match error {
        StoreError::NotFound => (ErrorCode::NotFound, "not found".to_string()),
        StoreError::AlreadyExists => (ErrorCode::AlreadyExists, "already exists".into()),
        StoreError::Forbidden => (ErrorCode::Forbidden, "not allowed".into()),
        StoreError::EpochMismatch { current } => {
            return encode(
                request_id,
                Reply::Error(wire::Error {
                    code: ErrorCode::EpochMismatch as i32,
                    message: format!("the group is at epoch {}", current.0),
                    current_epoch: current.0,
                    supported_versions: vec![],
                }),
            );
        }
        StoreError::Invalid(why) => (ErrorCode::InvalidArgument, (*why).to_string()),
        // No request of this protocol stores blobs; should one, the reason tells the client.
        StoreError::QuotaExceeded => (ErrorCode::Forbidden, error.to_string()),
        StoreError::AuthenticationFailed => (
            ErrorCode::AuthenticationFailed,
            "authentication failed".into(),
        ),
        StoreError::Closed => (ErrorCode::ShuttingDown, "server is shutting down".into()),
        StoreError::Database(_) | StoreError::Corrupt(_) | StoreError::CommitFailed(_) => {
            tracing::error!("store failure: {error}");
            (ErrorCode::Internal, "internal error".into())
        }
    };
    error_frame(request_id, code, message)
}

fn frame_error_frame(error: &FrameError) -> Vec<u8> {
    let request_id = error.request_id();
    match error {
        FrameError::TooLarge { .. } => {
            error_frame(request_id, ErrorCode::FrameTooLarge, error.to_string())
        }
        FrameError::Malformed(_) => {
            error_frame(request_id, ErrorCode::MalformedFrame, error.to_string())
        }
        FrameError::UnsupportedVersion { .. } => encode(
            request_id,
            Reply::Error(wire::Error {
                code: ErrorCode::UnsupportedVersion as i32,
                message: error.to_string(),
                current_epoch: 0,
                supported_versions: vec![PROTOCOL_VERSION],
            }),
        ),
        FrameError::UnknownBody { .. } => {
            error_frame(request_id, ErrorCode::UnknownRequest, error.to_string())
        }
        _ => error_frame(request_id, ErrorCode::MalformedFrame, error.to_string()),
    }
}

enum Phase {
    New,
    Challenged { nonce: [u8; 32] },
    Authenticated(Authenticated),
}

struct Authenticated {
    device: DeviceId,
    account: AccountId,
    mailbox: Arc<Mailbox>,
    delivery: tokio::task::JoinHandle<()>,
}

struct Session {
    shared: Arc<Shared>,
    outbound: mpsc::Sender<Vec<u8>>,
    connection: u64,
    phase: Phase,
    requests: TokenBucket,
    claims: TokenBucket,
    link_takes: TokenBucket,
    recoveries: TokenBucket,
    bad_frames: u32,
    /// Told by the delivery task when it stops for a reason other than the peer leaving.
    delivery_failed: Arc<tokio::sync::Notify>,
    /// The peer stopped reading what we send.
    stalled: bool,
}

/// Serves one WebSocket until the peer leaves, misbehaves too often, or the server stops.
pub(crate) async fn serve(socket: WebSocket, shared: Arc<Shared>) {
    let (mut sink, mut stream) = socket.split();
    let (outbound, mut queue) = mpsc::channel::<Vec<u8>>(OUTBOUND_DEPTH);
    let mut writer = tokio::spawn(async move {
        // Write everything that is queued, then flush once: one TLS record burst per wake-up
        // rather than one per frame.
        // A peer that stops reading stalls these writes; give up on it after a while.
        let written = async {
            while let Some(first) = queue.recv().await {
                sink.feed(Message::Binary(first.into())).await?;
                while let Ok(more) = queue.try_recv() {
                    sink.feed(Message::Binary(more.into())).await?;
                }
                tokio::time::timeout(STALL_TIMEOUT, sink.flush())
                    .await
                    .map_err(|_| axum::Error::new("peer stopped reading"))??;
            }
            Ok::<_, axum::Error>(())
        };
        if written.await.is_ok() {
            let _ = tokio::time::timeout(STALL_TIMEOUT, sink.close()).await;
        }
    });

    let now = Instant::now();
    let rate = f64::from(shared.requests_per_second);
    let mut session = Session {
        connection: shared.hub.connection_number(),
        shared: Arc::clone(&shared),
        outbound,
        phase: Phase::New,
        requests: TokenBucket::new(rate, rate * 2.0, now),
        claims: TokenBucket::new(CLAIMS_PER_MINUTE / 60.0, CLAIMS_PER_MINUTE, now),
        link_takes: TokenBucket::new(LINK_TAKES_PER_SECOND, LINK_TAKES_PER_SECOND, now),
        recoveries: TokenBucket::new(RECOVERIES_PER_SECOND, RECOVERIES_PER_SECOND, now),
        bad_frames: 0,
        delivery_failed: Arc::new(tokio::sync::Notify::new()),
        stalled: false,
    };
    let authentication_deadline = tokio::time::Instant::now() + AUTHENTICATION_DEADLINE;
    let mut shutdown = shared.shutdown.clone();
    let delivery_failed = Arc::clone(&session.delivery_failed);
    loop {
        let authenticated = matches!(session.phase, Phase::Authenticated(_));
        let mailbox = match &session.phase {
            Phase::Authenticated(auth) => Some(Arc::clone(&auth.mailbox)),
            Phase::New | Phase::Challenged { .. } => None,
        };
        let revoked = async {
            match &mailbox {
                Some(mailbox) => mailbox.revoked().await,
                None => std::future::pending().await,
            }
        };
        let message = tokio::select! {
            // The writer gave up on the peer (it stopped reading): nothing more can reach it.
            _ = &mut writer => {
                tracing::debug!("closing a connection whose peer stopped reading");
                break;
            }
            () = tokio::time::sleep_until(authentication_deadline), if !authenticated => {
                tracing::debug!("closing a connection that did not authenticate in time");
                break;
            }
            () = revoked => {
                // Its account revoked it: nothing it sends may count any more.
                tracing::debug!("closing a connection of a revoked device");
                session.send(error_frame(0, ErrorCode::AuthenticationFailed, "this device was revoked")).await;
                break;
            }
            () = delivery_failed.notified() => {
                // Without deliveries the connection is useless; the client reconnects.
                session.send(error_frame(0, ErrorCode::Internal, "delivery interrupted; reconnect")).await;
                break;
            }
            message = tokio::time::timeout(IDLE_TIMEOUT, stream.next()) => match message {
                Ok(message) => message,
                Err(_) => break,
            },
            _ = stopped(&mut shutdown) => {
                session.send(error_frame(0, ErrorCode::ShuttingDown, "server is shutting down")).await;
                break;
            }
        };
        match message {
            Some(Ok(Message::Binary(bytes))) => session.handle(&bytes).await,
            Some(Ok(Message::Text(_))) => {
                session
                    .bad_frame(error_frame(
                        0,
                        ErrorCode::MalformedFrame,
                        "text frames are not part of the protocol; send binary frames",
                    ))
                    .await;
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            Some(Ok(Message::Close(_))) | None => break,
            Some(Err(error)) => {
                tracing::debug!("connection ended: {error}");
                break;
            }
        }
        if session.bad_frames >= MAX_BAD_FRAMES {
            tracing::debug!("closing a connection that sent too many bad frames");
            break;
        }
        if session.stalled {
            tracing::debug!("closing a connection whose peer stopped reading");
            break;
        }
    }
    if let Phase::Authenticated(auth) = &session.phase {
        shared.hub.unregister(&auth.device, &auth.mailbox);
        auth.delivery.abort();
    }
    drop(session);
    if !writer.is_finished() {
        let _ = writer.await;
    }
}

impl Session {
    async fn send(&mut self, bytes: Vec<u8>) {
        // The writer only goes away when the socket is gone; then there is nobody to tell. A
        // queue that stays full means the peer stopped reading: close the connection.
        if let Err(_timeout) = tokio::time::timeout(STALL_TIMEOUT, self.outbound.send(bytes)).await
        {
            self.stalled = true;
        }
    }

    /// Parses a group id from a request, answering a malformed one with an error.
    async fn group_id(&mut self, id: u64, bytes: &[u8]) -> Option<GroupId> {
        match GroupId::from_bytes(bytes) {
            Ok(group_id) => Some(group_id),
            Err(_) => {
                self.bad_frame(error_frame(
                    id,
                    ErrorCode::InvalidArgument,
                    "malformed group id",
                ))
                .await;
                None
            }
        }
    }

    async fn bad_frame(&mut self, bytes: Vec<u8>) {
        self.bad_frames += 1;
        self.send(bytes).await;
    }

    /// Refuses request `id` as malformed, counting it as a bad frame.
    async fn invalid(&mut self, id: u64, message: &str) {
        self.bad_frame(error_frame(id, ErrorCode::InvalidArgument, message))
            .await;
    }

    async fn handle(&mut self, bytes: &[u8]) {
        let frame = match frame::decode_client_frame(bytes) {
            Ok(frame) => frame,
            Err(error) => {
                let reply = frame_error_frame(&error);
                return self.bad_frame(reply).await;
            }
        };
        let id = frame.request_id;
        if id == 0 {
            return self
                .bad_frame(error_frame(
                    0,
                    ErrorCode::InvalidArgument,
                    "request id 0 is reserved for pushes",
                ))
                .await;
        }
        let Some(body) = frame.body else {
            return self
                .bad_frame(error_frame(id, ErrorCode::UnknownRequest, "empty frame"))
                .await;
        };
        if !self.requests.try_take(Instant::now()) {
            return self
                .send(error_frame(
                    id,
                    ErrorCode::RateLimited,
                    "too many requests; slow down",
                ))
                .await;
        }
        match (&self.phase, body) {
            (_, Request::Ping(_)) => self.send(encode(id, Reply::Pong(wire::Pong {}))).await,
            (Phase::New, Request::Hello(hello)) => self.hello(id, hello).await,
            (Phase::New, _) => {
                self.bad_frame(error_frame(id, ErrorCode::BadSequence, "send Hello first"))
                    .await;
            }
            (Phase::Challenged { nonce }, Request::Register(register)) => {
                let nonce = *nonce;
                self.register(id, nonce, register).await;
            }
            (Phase::Challenged { nonce }, Request::Authenticate(authenticate)) => {
                let nonce = *nonce;
                self.authenticate(id, nonce, authenticate).await;
            }
            (Phase::Challenged { .. }, Request::GroupPost(post)) => self.group_post(id, post).await,
            // The device being linked has no certificate yet: it takes its mailbox before it
            // can register.
            (Phase::Challenged { .. } | Phase::Authenticated(_), Request::LinkTake(take)) => {
                self.link_take(id, take).await;
            }
            // All devices of the account may be lost: whoever holds the recovery key asks
            // before it has a device to authenticate with.
            (Phase::Challenged { .. } | Phase::Authenticated(_), Request::Recover(recover)) => {
                self.recover(id, recover).await;
            }
            (Phase::Authenticated(_), Request::GroupPost(_)) => {
                // Sent here it would say who posted: refuse rather than quietly attribute it.
                self.bad_frame(error_frame(
                    id,
                    ErrorCode::BadSequence,
                    "post unattributed messages on a connection that has not authenticated",
                ))
                .await;
            }
            (Phase::Challenged { .. }, Request::Hello(_)) => {
                self.bad_frame(error_frame(
                    id,
                    ErrorCode::BadSequence,
                    "Hello was already sent",
                ))
                .await;
            }
            (Phase::Challenged { .. }, _) => {
                self.bad_frame(error_frame(
                    id,
                    ErrorCode::NotAuthenticated,
                    "register or authenticate first",
                ))
                .await;
            }
            (
                Phase::Authenticated(_),
                Request::Hello(_) | Request::Register(_) | Request::Authenticate(_),
            ) => {
                self.bad_frame(error_frame(
                    id,
                    ErrorCode::BadSequence,
                    "already authenticated",
                ))
                .await;
            }
            (Phase::Authenticated(auth), request) => {
                let context = RequestContext {
                    id,
                    device: auth.device,
                    account: auth.account,
                    mailbox: Arc::clone(&auth.mailbox),
                    connection: self.connection,
                };
                self.request(context, request).await;
            }
        }
    }

    async fn hello(&mut self, id: u64, hello: wire::Hello) {
        if !hello.versions.contains(&PROTOCOL_VERSION) {
            let reply = encode(
                id,
                Reply::Error(wire::Error {
                    code: ErrorCode::UnsupportedVersion as i32,
                    message: format!("this server speaks protocol version {PROTOCOL_VERSION}"),
                    current_epoch: 0,
                    supported_versions: vec![PROTOCOL_VERSION],
                }),
            );
            return self.bad_frame(reply).await;
        }
        let mut nonce = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        self.phase = Phase::Challenged { nonce };
        self.send(encode(
            id,
            Reply::Challenge(wire::Challenge {
                version: PROTOCOL_VERSION,
                nonce: nonce.to_vec(),
            }),
        ))
        .await;
    }

    fn registration_token_ok(&self, offered: &str) -> bool {
        match &self.shared.registration_token {
            None => true,
            // Hash both sides so the comparison takes the same time whatever the lengths.
            Some(expected) => Sha256::digest(expected.as_bytes())
                .ct_eq(&Sha256::digest(offered.as_bytes()))
                .into(),
        }
    }

    async fn register(&mut self, id: u64, nonce: [u8; 32], register: wire::Register) {
        if !self.registration_token_ok(&register.registration_token) {
            return self
                .bad_frame(error_frame(
                    id,
                    ErrorCode::RegistrationRefused,
                    "this server needs a valid registration token",
                ))
                .await;
        }
        let certificate = match register
            .certificate
            .as_ref()
            .map(VerifiedCertificate::verify)
        {
            Some(Ok(certificate)) => certificate,
            Some(Err(error)) => {
                return self
                    .bad_frame(error_frame(
                        id,
                        ErrorCode::AuthenticationFailed,
                        error.to_string(),
                    ))
                    .await;
            }
            None => {
                return self.invalid(id, "certificate missing").await;
            }
        };
        if !certificate.verify_auth(
            &self.shared.certificate_sha256,
            &nonce,
            &register.challenge_signature,
        ) {
            return self
                .bad_frame(error_frame(
                    id,
                    ErrorCode::AuthenticationFailed,
                    "challenge signature does not verify",
                ))
                .await;
        }
        if register.key_packages.len() > MAX_KEY_PACKAGES_PER_UPLOAD
            || register.last_resort_key_package.is_empty()
        {
            return self
                .invalid(
                    id,
                    "register with at most 200 key packages and one last-resort key package",
                )
                .await;
        }
        // Only a well-formed, signed registration spends from the server-wide budget, so
        // garbage cannot lock everyone else out.
        let allowed = self
            .shared
            .registrations
            .lock()
            .map(|mut bucket| bucket.try_take(Instant::now()))
            .unwrap_or(false);
        if !allowed {
            return self
                .send(error_frame(
                    id,
                    ErrorCode::RateLimited,
                    "too many registrations; try again in a minute",
                ))
                .await;
        }
        let device = certificate.device_id();
        let account = certificate.account_id();
        let new_device = NewDevice {
            device_id: device,
            account_id: account,
            device_key: *certificate.device_key(),
            certificate: certificate.to_compact(),
            key_packages: register.key_packages,
            last_resort_key_package: Some(register.last_resort_key_package),
            now: unix_now(),
        };
        // Online before it is stored: a revocation that follows the registration then finds
        // this connection to close.
        let mailbox = self.shared.hub.register(device, self.connection);
        let registered = self
            .shared
            .store
            .run(move |store| {
                let now = new_device.now;
                store.register_device(new_device)?;
                store.touch_account(&account, None, now)
            })
            .await;
        if registered.is_err() {
            self.shared.hub.unregister(&device, &mailbox);
        }
        match registered {
            Ok(()) => {
                // The answer is queued before the delivery task starts, so it precedes every
                // push on this connection.
                self.send(encode(
                    id,
                    Reply::Registered(wire::Registered {
                        account_id: account.as_bytes().to_vec(),
                        device_id: device.as_bytes().to_vec(),
                    }),
                ))
                .await;
                self.become_authenticated(device, account, mailbox);
            }
            Err(StoreError::AlreadyExists) => {
                self.send(error_frame(
                    id,
                    ErrorCode::AlreadyExists,
                    "this device is already registered; authenticate instead",
                ))
                .await;
            }
            Err(StoreError::AuthenticationFailed) => {
                self.bad_frame(error_frame(
                    id,
                    ErrorCode::AuthenticationFailed,
                    "this device was revoked",
                ))
                .await;
            }
            Err(error) => self.send(store_error_frame(id, &error)).await,
        }
    }

    async fn authenticate(&mut self, id: u64, nonce: [u8; 32], request: wire::Authenticate) {
        let failed = |session: &mut Session| {
            session.bad_frames += 1;
            error_frame(id, ErrorCode::AuthenticationFailed, "authentication failed")
        };
        let Ok(device) = DeviceId::from_bytes(&request.device_id) else {
            let reply = failed(self);
            return self.send(reply).await;
        };
        let record = match self
            .shared
            .store
            .run(move |store| store.device(&device))
            .await
        {
            Ok(Some(record)) => record,
            Ok(None) => {
                let reply = failed(self);
                return self.send(reply).await;
            }
            Err(error) => return self.send(store_error_frame(id, &error)).await,
        };
        if !miyu_proto::cert::verify_auth(
            &record.device_key,
            &self.shared.certificate_sha256,
            &nonce,
            &request.signature,
        ) {
            let reply = failed(self);
            return self.send(reply).await;
        }
        // Online before the device is read again: a revocation committed after that read finds
        // this connection to close, and one committed before fails the read.
        let mailbox = self.shared.hub.register(device, self.connection);
        let remaining = self
            .shared
            .store
            .run(move |store| {
                store.touch_device(&device, unix_now())?;
                store.key_package_count(&device)
            })
            .await;
        if remaining.is_err() {
            self.shared.hub.unregister(&device, &mailbox);
        }
        match remaining {
            Ok(remaining) => {
                self.send(encode(
                    id,
                    Reply::Authenticated(wire::Authenticated {
                        key_packages_remaining: remaining,
                    }),
                ))
                .await;
                self.become_authenticated(device, record.account_id, mailbox);
            }
            Err(StoreError::AuthenticationFailed) => {
                let reply = failed(self);
                self.send(reply).await;
            }
            Err(error) => self.send(store_error_frame(id, &error)).await,
        }
    }

    /// `mailbox` was registered with the hub before the device was last read from the store,
    /// so that nothing posted since is missed.
    fn become_authenticated(
        &mut self,
        device: DeviceId,
        account: AccountId,
        mailbox: Arc<Mailbox>,
    ) {
        let delivery = tokio::spawn(deliver(
            Arc::clone(&self.shared),
            device,
            Arc::clone(&mailbox),
            self.outbound.clone(),
            Arc::clone(&self.delivery_failed),
        ));
        self.phase = Phase::Authenticated(Authenticated {
            device,
            account,
            mailbox,
            delivery,
        });
    }

    async fn request(&mut self, context: RequestContext, request: Request) {
        let id = context.id;
        let store = self.shared.store.clone();
        let device = context.device;
        let now = unix_now();
        // Each arm checks its arguments, queues its store operation (in arrival order) and
        // leaves the answer to a task that waits for the batch to be durable.
        match request {
            Request::UploadKeyPackages(upload) => {
                if upload.key_packages.len() > MAX_KEY_PACKAGES_PER_UPLOAD {
                    return self.invalid(id, "too many key packages").await;
                }
                let last_resort =
                    Some(upload.last_resort_key_package).filter(|bytes| !bytes.is_empty());
                let pending = store.submit(move |store| {
                    let stored = store.key_package_count(&device)?;
                    let adding = u32::try_from(upload.key_packages.len()).unwrap_or(u32::MAX);
                    if stored.saturating_add(adding) > MAX_STORED_KEY_PACKAGES {
                        return Err(StoreError::Invalid("too many key packages stored already"));
                    }
                    store.add_key_packages(&device, upload.key_packages, last_resort)
                });
                self.answer(context, pending.await, |remaining| {
                    Reply::KeyPackageCount(wire::KeyPackageCount { remaining })
                });
            }
            Request::CreateInvite(invite) => {
                let Ok(token_hash) = <[u8; 32]>::try_from(invite.token_hash.as_slice()) else {
                    return self.invalid(id, "token hash is 32 bytes").await;
                };
                if invite.uses > MAX_INVITE_USES {
                    return self
                        .invalid(id, "an invite can be used at most 1,000 times")
                        .await;
                }
                let account = context.account;
                // Rounded to the hour, like every time the server stores.
                let expires = crate::store::coarse_hour(now) + 3600 + INVITE_LIFETIME.as_secs();
                let uses = invite.uses;
                let pending = store.submit(move |store| {
                    still_registered(store, &device)?;
                    store.create_invite(&account, token_hash, expires, uses)
                });
                self.answer(context, pending.await, |()| Reply::Done(wire::Done {}));
            }
            Request::ClaimInvite(claim) => {
                if !self.claims.try_take(Instant::now()) {
                    return self
                        .send(error_frame(
                            id,
                            ErrorCode::RateLimited,
                            "too many invite claims; wait a minute",
                        ))
                        .await;
                }
                let token_hash: [u8; 32] = Sha256::digest(&claim.token).into();
                let pending =
                    store.submit(move |store| store.claim_invite(&token_hash, &device, now));
                self.answer(context, pending.await, claimed_reply);
            }
            Request::SetUsername(set) => {
                // "Taken" answers whether a name exists, as a lookup does: publishing draws
                // on the same budget, or it would be a free way to test names.
                let name_hash = if set.name_hash.is_empty() {
                    None
                } else {
                    let Some(hash) = self.budgeted_name_hash(id, device, &set.name_hash).await
                    else {
                        return;
                    };
                    Some(hash)
                };
                let account = context.account;
                let pending = store.submit(move |store| {
                    still_registered(store, &device)?;
                    store.set_username(&account, name_hash)
                });
                self.answer(context, pending.await, |()| Reply::Done(wire::Done {}));
            }
            Request::SetAccountLifetime(set) => {
                if !ACCOUNT_LIFETIMES_DAYS.contains(&set.days) {
                    return self
                        .invalid(id, "an account lifetime is 30, 91, 182 or 365 days")
                        .await;
                }
                let account = context.account;
                let pending = store.submit(move |store| {
                    still_registered(store, &device)?;
                    store.touch_account(&account, Some(set.days), now)
                });
                self.answer(context, pending.await, |()| Reply::Done(wire::Done {}));
            }
            Request::DeleteAccount(_) => {
                let account = context.account;
                let shared = Arc::clone(&self.shared);
                let pending = store.submit(move |store| {
                    still_registered(store, &device)?;
                    store.delete_account(&account)
                });
                // The account's blob files go before the answer: once told, the owner can
                // rely on nothing of the account being left.
                let pending = pending.await.map(|deleted| async move {
                    deleted.await?;
                    crate::blobs::remove_orphans(&shared).await?;
                    Ok(())
                });
                self.answer(context, pending, |()| Reply::Done(wire::Done {}));
            }
            Request::LookupUsername(lookup) => {
                let Some(name_hash) = self.budgeted_name_hash(id, device, &lookup.name_hash).await
                else {
                    return;
                };
                let pending =
                    store.submit(move |store| store.claim_username(&name_hash, &device, now));
                self.answer(context, pending.await, claimed_reply);
            }
            Request::CreateGroup(create) => {
                let Some(new_group) = parse_new_group(create, device, now) else {
                    return self.invalid(id, "malformed group id or device id").await;
                };
                let group_id = new_group.group_id.clone();
                let shared = Arc::clone(&self.shared);
                let pending = store.submit_then(
                    move |store| store.create_group(new_group),
                    move |created| {
                        shared.hub.notify_inbox(&created.welcomed);
                        shared.hub.notify_group(&group_id, &created.members, None);
                    },
                );
                self.answer(context, pending.await, |_| Reply::Done(wire::Done {}));
            }
            Request::Post(post) => {
                let kind = match wire::EntryKind::try_from(post.kind) {
                    Ok(wire::EntryKind::Application) => EntryKind::Application,
                    Ok(wire::EntryKind::Commit) => EntryKind::Commit,
                    _ => {
                        return self.invalid(id, "unknown entry kind").await;
                    }
                };
                let Some(group_id) = self.group_id(id, &post.group_id).await else {
                    return;
                };
                if post.payload.is_empty() {
                    return self
                        .bad_frame(error_frame(id, ErrorCode::InvalidArgument, "empty payload"))
                        .await;
                }
                let epoch = Epoch(post.epoch);
                let expires_at = stored_expiry(post.expires_at, kind, now);
                let Ok(next_posting_key) = posting_key_of(&post.next_posting_key) else {
                    return self.invalid(id, "a posting key is 32 bytes").await;
                };
                let payload = post.payload;
                let connection = context.connection;
                let group = group_id.clone();
                // Pushed from the store thread right after the commit, in commit order, so
                // delivery tasks see entries in sequence and can send them from memory.
                let shared = Arc::clone(&self.shared);
                let pending = store.submit_then(
                    move |store| {
                        let appended = store.append(
                            &group,
                            &device,
                            epoch,
                            kind,
                            payload.clone(),
                            expires_at,
                            now,
                        )?;
                        if kind == EntryKind::Commit && next_posting_key.is_some() {
                            store.set_posting_key(
                                &group,
                                Epoch(epoch.0.saturating_add(1)),
                                next_posting_key,
                            )?;
                        }
                        let pushed = Arc::new(PushedEntry {
                            entry: crate::store::LogEntry {
                                seq: appended.seq,
                                epoch,
                                kind,
                                payload,
                            },
                            poster_connection: connection,
                        });
                        Ok((appended, pushed))
                    },
                    move |(appended, pushed)| {
                        shared
                            .hub
                            .notify_group(&group_id, &appended.members, Some(pushed));
                    },
                );
                self.answer(context, pending.await, |(appended, _)| {
                    Reply::Posted(wire::Posted { seq: appended.seq })
                });
            }
            Request::ClaimKeyPackages(claim) => {
                let allowed = self
                    .shared
                    .contact_claims
                    .lock()
                    .map(|mut budgets| budgets.try_take(device, Instant::now()))
                    .unwrap_or(false);
                if !allowed {
                    return self
                        .send(error_frame(
                            id,
                            ErrorCode::RateLimited,
                            "too many key package claims; wait a minute",
                        ))
                        .await;
                }
                let Ok(account) = AccountId::from_bytes(&claim.account_id) else {
                    return self.invalid(id, "an account id is 16 bytes").await;
                };
                let pending =
                    store.submit(move |store| store.claim_contact(&account, &device, now));
                self.answer(context, pending.await, claimed_reply);
            }
            Request::Commit(commit) => {
                let Some(new_commit) = parse_commit(commit, device, now) else {
                    return self
                        .invalid(id, "malformed group id, device id or empty commit")
                        .await;
                };
                let group_id = new_commit.group_id.clone();
                let epoch = new_commit.epoch;
                let payload = new_commit.payload.clone();
                let connection = context.connection;
                let shared = Arc::clone(&self.shared);
                let pending = store.submit_then(
                    move |store| store.commit_members(new_commit),
                    move |committed| {
                        let pushed = Arc::new(PushedEntry {
                            entry: crate::store::LogEntry {
                                seq: committed.seq,
                                epoch,
                                kind: EntryKind::Commit,
                                payload,
                            },
                            poster_connection: connection,
                        });
                        // Welcomes first, so that a new member joins before its first entry;
                        // removed devices still get the commit that removes them.
                        shared.hub.notify_inbox(&committed.welcomed);
                        let mut devices = committed.members.clone();
                        devices.extend_from_slice(&committed.removed);
                        shared.hub.notify_group(&group_id, &devices, Some(&pushed));
                    },
                );
                self.answer(context, pending.await, |committed| {
                    Reply::Posted(wire::Posted { seq: committed.seq })
                });
            }
            Request::LeaveGroup(leave) => {
                let Some(group_id) = self.group_id(id, &leave.group_id).await else {
                    return;
                };
                let pending = store.submit(move |store| store.leave_group(&group_id, &device));
                self.answer(context, pending.await, |()| Reply::Done(wire::Done {}));
            }
            Request::AckGroup(ack) => {
                let Some(group_id) = self.group_id(id, &ack.group_id).await else {
                    return;
                };
                let pending =
                    store.submit(move |store| store.ack_group(&device, &group_id, ack.seq));
                self.answer(context, pending.await, |()| Reply::Done(wire::Done {}));
            }
            Request::AckInbox(ack) => {
                let pending = store.submit(move |store| store.ack_inbox(&device, ack.seq));
                self.answer(context, pending.await, |()| Reply::Done(wire::Done {}));
            }
            Request::FetchGroup(fetch) => {
                let Some(group_id) = self.group_id(id, &fetch.group_id).await else {
                    return;
                };
                let group = group_id.clone();
                // Reading one entry checks membership without sending anything yet.
                let pending =
                    store.submit(move |store| store.group_entries(&group, &device, 0, 0, now));
                let after = fetch.after_seq;
                let mailbox = Arc::clone(&context.mailbox);
                self.answer(context, pending.await, move |_| {
                    mailbox.refetch(group_id, after);
                    Reply::Done(wire::Done {})
                });
            }
            Request::LinkPut(put) => {
                let Ok(mailbox) = <[u8; 32]>::try_from(put.mailbox.as_slice()) else {
                    return self.invalid(id, "a linking mailbox id is 32 bytes").await;
                };
                if put.payload.len() > MAX_LINK_PAYLOAD {
                    return self
                        .invalid(id, "a linking message is at most 64 KiB")
                        .await;
                }
                let allowed = self
                    .shared
                    .link_puts
                    .lock()
                    .map(|mut budgets| budgets.try_take(device, Instant::now()))
                    .unwrap_or(false);
                if !allowed {
                    return self
                        .send(error_frame(
                            id,
                            ErrorCode::RateLimited,
                            "too many linking messages; try again later",
                        ))
                        .await;
                }
                let expires_at = link_expiry(now);
                let pending = store.submit(move |store| {
                    still_registered(store, &device)?;
                    store.put_link(mailbox, put.payload, expires_at, now)
                });
                self.answer(context, pending.await, |()| Reply::Done(wire::Done {}));
            }
            Request::ListDevices(_) => {
                let pending = store.submit(move |store| store.account_devices(&device));
                self.answer(context, pending.await, device_list_reply);
            }
            Request::RevokeDevice(revoke) => {
                let Ok(revoked) = DeviceId::from_bytes(&revoke.device_id) else {
                    return self.invalid(id, "a device id is 16 bytes").await;
                };
                let shared = Arc::clone(&self.shared);
                // Its connections close as soon as the revocation is durable, this one too if
                // a device revokes itself (after its answer is queued or not: it is told).
                let pending = store.submit_then(
                    move |store| store.revoke_device(&device, &revoked, &revoke.signature),
                    move |()| shared.hub.revoke(&revoked),
                );
                self.answer(context, pending.await, |()| Reply::Done(wire::Done {}));
            }
            Request::SetRecovery(set) => {
                let Ok(verifier) = <[u8; 32]>::try_from(set.verifier.as_slice()) else {
                    return self.invalid(id, "a recovery verifier is 32 bytes").await;
                };
                let Ok(locator) = <[u8; 32]>::try_from(set.locator.as_slice()) else {
                    return self.invalid(id, "a recovery locator is 32 bytes").await;
                };
                if set.signature.len() != 64 {
                    return self.invalid(id, "a recovery signature is 64 bytes").await;
                }
                if set.bundle.is_empty() || set.bundle.len() > MAX_RECOVERY_BUNDLE {
                    return self
                        .invalid(id, "a recovery bundle is 1 to 4,096 bytes")
                        .await;
                }
                let recovery = NewRecovery {
                    verifier,
                    locator,
                    bundle: set.bundle,
                    signature: set.signature,
                };
                // The store checks that the device is still registered and that the account's
                // identity key signed the bundle.
                let pending = store.submit(move |store| store.set_recovery(&device, recovery));
                self.answer(context, pending.await, |()| Reply::Done(wire::Done {}));
            }
            Request::SetBackup(set) => {
                let Ok(blob_id) = <[u8; 32]>::try_from(set.blob_id.as_slice()) else {
                    return self.invalid(id, "a blob id is 32 bytes").await;
                };
                let append_after = if set.append_after.is_empty() {
                    None
                } else {
                    let Ok(after) = <[u8; 32]>::try_from(set.append_after.as_slice()) else {
                        return self
                            .invalid(id, "append_after is empty or a 32-byte blob id")
                            .await;
                    };
                    Some(after)
                };
                if set.size > MAX_BACKUP_SIZE {
                    return self.invalid(id, "a backup is at most 4 GiB").await;
                }
                let account = context.account;
                let shared = Arc::clone(&self.shared);
                let segment = BackupSegment {
                    blob_id,
                    size: set.size,
                };
                let pending = store.submit(move |store| {
                    still_registered(store, &device)?;
                    store.set_backup(&account, segment, append_after.as_ref(), now)
                });
                // The replaced segments' files go before the answer, as their rows did; should
                // removing one fail, the sweep removes it as an orphan.
                let pending = pending.await.map(|named| async move {
                    for replaced in named.await? {
                        shared.blobs.remove_file(replaced).await;
                    }
                    Ok(())
                });
                self.answer(context, pending, |()| Reply::Done(wire::Done {}));
            }
            Request::Hello(_)
            | Request::Register(_)
            | Request::Authenticate(_)
            | Request::GroupPost(_)
            | Request::LinkTake(_)
            | Request::Recover(_)
            | Request::Ping(_) => {
                // Routed elsewhere by `handle`.
            }
        }
    }

    /// An application message from a connection that has not authenticated, signed with the
    /// group's posting key: a member posted it, the server does not learn which.
    async fn group_post(&mut self, id: u64, post: wire::GroupPost) {
        let Some(group_id) = self.group_id(id, &post.group_id).await else {
            return;
        };
        if post.payload.is_empty() || post.signature.len() != 64 {
            return self
                .invalid(id, "an empty payload or a signature that is not 64 bytes")
                .await;
        }
        let now = unix_now();
        let epoch = Epoch(post.epoch);
        let expires_at = stored_expiry(post.expires_at, EntryKind::Application, now);
        let signed_expires_at = post.expires_at;
        let payload = post.payload;
        let signature = post.signature;
        let connection = self.connection;
        let group = group_id.clone();
        let shared = Arc::clone(&self.shared);
        let store = self.shared.store.clone();
        let pending = store.submit_then(
            move |store| {
                let appended = store.append_unattributed(
                    &group,
                    epoch,
                    payload.clone(),
                    expires_at,
                    signed_expires_at,
                    &signature,
                    now,
                )?;
                let pushed = Arc::new(PushedEntry {
                    entry: crate::store::LogEntry {
                        seq: appended.seq,
                        epoch,
                        kind: EntryKind::Application,
                        payload,
                    },
                    poster_connection: connection,
                });
                Ok((appended, pushed))
            },
            move |(appended, pushed)| {
                shared
                    .hub
                    .notify_group(&group_id, &appended.members, Some(pushed));
            },
        );
        // Queued in arrival order here; answered once durable, without holding up the next.
        let pending = pending.await;
        let outbound = self.outbound.clone();
        tokio::spawn(async move {
            let result = match pending {
                Ok(pending) => pending.await,
                Err(error) => Err(error),
            };
            let bytes = match result {
                Ok((appended, _)) => encode(id, Reply::Posted(wire::Posted { seq: appended.seq })),
                Err(error) => store_error_frame(id, &error),
            };
            let _ = tokio::time::timeout(STALL_TIMEOUT, outbound.send(bytes)).await;
        });
    }

    /// A username hash from a request, once it is well formed and the device's and the
    /// server's lookup budgets allow one more; otherwise answers the request and returns None.
    async fn budgeted_name_hash(
        &mut self,
        id: u64,
        device: DeviceId,
        bytes: &[u8],
    ) -> Option<[u8; 32]> {
        let Ok(name_hash) = <[u8; 32]>::try_from(bytes) else {
            self.bad_frame(error_frame(
                id,
                ErrorCode::InvalidArgument,
                "a username hash is 32 bytes",
            ))
            .await;
            return None;
        };
        let allowed = self
            .shared
            .lookups
            .lock()
            .map(|mut lookups| lookups.try_take(device, Instant::now()))
            .unwrap_or(false);
        if !allowed {
            self.send(error_frame(
                id,
                ErrorCode::RateLimited,
                "too many username lookups; try again later",
            ))
            .await;
            return None;
        }
        Some(name_hash)
    }

    /// Takes the message out of a linking mailbox, on a connection that may not have
    /// authenticated.
    async fn link_take(&mut self, id: u64, take: wire::LinkTake) {
        let Ok(mailbox) = <[u8; 32]>::try_from(take.mailbox.as_slice()) else {
            return self.invalid(id, "a linking mailbox id is 32 bytes").await;
        };
        if !self.link_takes.try_take(Instant::now()) {
            return self
                .send(error_frame(
                    id,
                    ErrorCode::RateLimited,
                    "too many mailbox takes; slow down",
                ))
                .await;
        }
        let now = unix_now();
        let pending = self
            .shared
            .store
            .submit(move |store| store.take_link(&mailbox, now))
            .await;
        self.answer_to(id, pending, |payload| {
            Reply::LinkPayload(wire::LinkPayload { payload })
        });
    }

    /// Hands out an account's recovery bundle against the key derived from its recovery key,
    /// on a connection that may not have authenticated.
    async fn recover(&mut self, id: u64, recover: wire::Recover) {
        let Ok(locator) = <[u8; 32]>::try_from(recover.locator.as_slice()) else {
            return self.invalid(id, "a recovery locator is 32 bytes").await;
        };
        let Ok(auth_key) = <[u8; 32]>::try_from(recover.auth_key.as_slice()) else {
            return self
                .invalid(id, "a recovery authentication key is 32 bytes")
                .await;
        };
        if !self.recoveries.try_take(Instant::now()) {
            return self
                .send(error_frame(
                    id,
                    ErrorCode::RateLimited,
                    "too many recovery attempts on this connection; slow down",
                ))
                .await;
        }
        let now = unix_now();
        let pending = self
            .shared
            .store
            .submit(move |store| store.recover(&locator, &auth_key, now))
            .await;
        // A wrong key is counted in the store, durably, before it is answered: failing it as a
        // store error would undo the count.
        self.answer_to(id, pending, |recovery| match recovery {
            Recovery::Granted(granted) => Reply::RecoveryBundle(wire::RecoveryBundle {
                bundle: granted.bundle,
                backup: granted
                    .backup
                    .into_iter()
                    .map(|segment| wire::BackupSegment {
                        blob_id: segment.blob_id.to_vec(),
                        size: segment.size,
                    })
                    .collect(),
            }),
            Recovery::WrongKey => error_reply(
                ErrorCode::AuthenticationFailed,
                "wrong recovery key; the attempt was counted",
            ),
            Recovery::Locked => error_reply(
                ErrorCode::RateLimited,
                "too many failed recovery attempts for this account; try again tomorrow",
            ),
        });
    }

    /// Sends the answer to a queued store operation once it is durable, without holding up
    /// the next request.
    fn answer<R, F>(
        &self,
        context: RequestContext,
        pending: Result<impl Future<Output = Result<R, StoreError>> + Send + 'static, StoreError>,
        reply: F,
    ) where
        R: Send + 'static,
        F: FnOnce(R) -> Reply + Send + 'static,
    {
        self.answer_to(context.id, pending, reply);
    }

    /// [`answer`](Self::answer) for a request of a connection in any phase.
    fn answer_to<R, F>(
        &self,
        id: u64,
        pending: Result<impl Future<Output = Result<R, StoreError>> + Send + 'static, StoreError>,
        reply: F,
    ) where
        R: Send + 'static,
        F: FnOnce(R) -> Reply + Send + 'static,
    {
        let outbound = self.outbound.clone();
        tokio::spawn(async move {
            let result = match pending {
                Ok(pending) => pending.await,
                Err(error) => Err(error),
            };
            let bytes = match result {
                Ok(value) => encode(id, reply(value)),
                Err(error) => store_error_frame(id, &error),
            };
            // A peer that stopped reading is dropped by the session; do not wait for it here.
            let _ = tokio::time::timeout(STALL_TIMEOUT, outbound.send(bytes)).await;
        });
    }
}

struct RequestContext {
    id: u64,
    device: DeviceId,
    account: AccountId,
    mailbox: Arc<Mailbox>,
    connection: u64,
}

/// The answer to an invite claim or a username lookup.
fn claimed_reply(claimed: Vec<crate::store::ClaimedKeyPackage>) -> Reply {
    let devices = claimed
        .into_iter()
        .filter_map(|claimed| {
            // Certificates were verified when stored; one that no longer parses
            // is left out rather than handed to a client.
            let certificate = VerifiedCertificate::from_compact(&claimed.certificate).ok()?;
            Some(wire::DeviceKeyPackage {
                device_id: claimed.device_id.as_bytes().to_vec(),
                certificate: Some(certificate.to_wire()),
                key_package: claimed.key_package,
            })
        })
        .collect();
    Reply::InviteClaimed(wire::InviteClaimed { devices })
}

/// The answer to `ListDevices`.
fn device_list_reply(devices: Vec<crate::store::DeviceSummary>) -> Reply {
    let devices = devices
        .into_iter()
        .filter_map(|device| {
            // Verified when stored; one that no longer parses is left out, as in a claim.
            let certificate = VerifiedCertificate::from_compact(&device.certificate).ok()?;
            Some(wire::DeviceEntry {
                certificate: Some(certificate.to_wire()),
                created_day: device.created_day,
                last_active_day: device.active_day,
            })
        })
        .collect();
    Reply::DeviceList(wire::DeviceList { devices })
}

/// Requests that act for the whole account are refused once the requesting device is no
/// longer registered: a device revoked a moment ago may still have requests in flight, and
/// none of them may touch the account.
fn still_registered(
    store: &mut dyn crate::store::Store,
    device: &DeviceId,
) -> Result<(), StoreError> {
    store
        .device(device)?
        .map(|_| ())
        .ok_or(StoreError::AuthenticationFailed)
}

/// When a linking mailbox's message goes: `LINK_LIFETIME` from now, rounded up to the minute
/// so that the stored time says less about when it was left.
fn link_expiry(now: u64) -> u64 {
    now.saturating_add(LINK_LIFETIME.as_secs())
        .div_ceil(60)
        .saturating_mul(60)
}

/// Devices one `CreateGroup` or `Commit` may name: bounds the work a request makes the store
/// do (a 1 MiB frame could otherwise list some 50,000).
const MAX_DEVICES_PER_REQUEST: usize = 10_000;

/// The per-device Welcomes of a request. The shared `welcome` stays one copy: the store hands
/// it to each device once the request's checks pass.
fn welcomes_of(welcomes: Vec<wire::InboxMessage>) -> Option<Vec<(DeviceId, Vec<u8>)>> {
    if welcomes.len() > MAX_DEVICES_PER_REQUEST {
        return None;
    }
    welcomes
        .into_iter()
        .map(|welcome| {
            Some((
                DeviceId::from_bytes(&welcome.device_id).ok()?,
                welcome.payload,
            ))
        })
        .collect()
}

fn parse_new_group(create: wire::CreateGroup, creator: DeviceId, now: u64) -> Option<NewGroup> {
    if create.member_devices.len() > MAX_DEVICES_PER_REQUEST {
        return None;
    }
    let members = create
        .member_devices
        .iter()
        .map(|bytes| DeviceId::from_bytes(bytes).ok())
        .collect::<Option<Vec<_>>>()?;
    let welcomes = welcomes_of(create.welcomes)?;
    let welcome = Some(create.welcome).filter(|welcome| !welcome.is_empty());
    Some(NewGroup {
        posting_key: posting_key_of(&create.posting_key).ok()?,
        group_id: GroupId::from_bytes(&create.group_id).ok()?,
        epoch: Epoch(create.epoch),
        creator,
        members,
        welcomes,
        welcome,
        now,
    })
}

/// When an entry's ciphertext is deleted, from the expiry a client asked for: rounded up to
/// the minute (the stored time then says less about when the message was sent), never later
/// than the longest timer allows, and moved to the next minute if already past (the sender's
/// clock is behind), so that members online now and members fetching later agree. Commits never
/// expire: a member offline past the expiry would fall out of the group.
fn stored_expiry(expires_at: u64, kind: EntryKind, now: u64) -> Option<u64> {
    (expires_at != 0 && kind == EntryKind::Application)
        .then(|| expires_at.clamp(now.saturating_add(1), now.saturating_add(MAX_EXPIRY)))
        .map(|at| at.div_ceil(60).saturating_mul(60))
}

/// A posting key from a request: empty for none, else 32 bytes.
fn posting_key_of(bytes: &[u8]) -> Result<Option<[u8; 32]>, ()> {
    if bytes.is_empty() {
        return Ok(None);
    }
    <[u8; 32]>::try_from(bytes).map(Some).map_err(|_| ())
}

fn parse_commit(commit: wire::Commit, committer: DeviceId, now: u64) -> Option<NewCommit> {
    let devices = |list: &[Vec<u8>]| {
        list.iter()
            .map(|bytes| DeviceId::from_bytes(bytes).ok())
            .collect::<Option<Vec<_>>>()
    };
    if commit.payload.is_empty() {
        return None;
    }
    if commit.add_devices.len() + commit.remove_devices.len() > MAX_DEVICES_PER_REQUEST {
        return None;
    }
    let add = devices(&commit.add_devices)?;
    let welcomes = welcomes_of(commit.welcomes)?;
    let welcome = Some(commit.welcome).filter(|welcome| !welcome.is_empty());
    Some(NewCommit {
        next_posting_key: posting_key_of(&commit.next_posting_key).ok()?,
        group_id: GroupId::from_bytes(&commit.group_id).ok()?,
        committer,
        epoch: Epoch(commit.epoch),
        payload: commit.payload,
        add,
        remove: devices(&commit.remove_devices)?,
        welcomes,
        welcome,
        now,
    })
}

/// Pushes a device's inbox and group entries to one connection: first the backlog, then
/// `CaughtUp`, then whatever arrives. Ends when the connection does.
async fn deliver(
    shared: Arc<Shared>,
    device: DeviceId,
    mailbox: Arc<Mailbox>,
    outbound: mpsc::Sender<Vec<u8>>,
    failed: Arc<tokio::sync::Notify>,
) {
    let mut delivery = Delivery {
        shared,
        device,
        connection: mailbox.connection,
        outbound,
        inbox_sent: 0,
        groups: HashMap::new(),
    };
    match delivery.run(&mailbox).await {
        Ok(()) | Err(Stop::Disconnected) => {}
        Err(Stop::Store(error)) => {
            tracing::warn!("delivery stopped: {error}");
            failed.notify_one();
        }
        Err(Stop::Stalled) => {
            tracing::debug!("delivery stopped: the peer stopped reading");
            failed.notify_one();
        }
    }
}

#[derive(Debug)]
enum Stop {
    Disconnected,
    /// The peer stopped reading.
    Stalled,
    Store(StoreError),
}

impl From<StoreError> for Stop {
    fn from(error: StoreError) -> Self {
        Stop::Store(error)
    }
}

struct Delivery {
    shared: Arc<Shared>,
    device: DeviceId,
    connection: u64,
    outbound: mpsc::Sender<Vec<u8>>,
    inbox_sent: u64,
    /// Highest sequence number sent on this connection, per group.
    groups: HashMap<GroupId, u64>,
}

impl Delivery {
    async fn run(&mut self, mailbox: &Mailbox) -> Result<(), Stop> {
        self.refresh_memberships().await?;
        self.send_inbox().await?;
        let groups: Vec<GroupId> = self.groups.keys().cloned().collect();
        for group in groups {
            self.send_group_from_store(&group).await?;
        }
        self.send(encode(0, Reply::CaughtUp(wire::CaughtUp {})))
            .await?;
        loop {
            mailbox.wait().await;
            let pending = mailbox.take();
            // Inbox first: a Welcome must reach the device before its group's first entries.
            if pending.inbox {
                self.send_inbox().await?;
            }
            for (group, group_pending) in pending.groups {
                if !self.groups.contains_key(&group) {
                    self.refresh_memberships().await?;
                }
                let Some(&sent) = self.groups.get(&group) else {
                    continue;
                };
                let mut sent = sent;
                let mut read_store = group_pending.read_store;
                if let Some(after) = group_pending.refetch_after {
                    sent = sent.min(after);
                    read_store = true;
                }
                self.groups.insert(group.clone(), sent);
                // Entries are dropped into the mailbox by the tasks that answered their posts,
                // which may finish out of order: sort, so that a batch in the mailbox can be
                // sent straight from memory instead of falling back to a store read.
                let mut entries = group_pending.entries;
                entries.sort_unstable_by_key(|pushed| pushed.entry.seq);
                if !read_store {
                    for pushed in &entries {
                        let seq = pushed.entry.seq;
                        if seq <= sent {
                            continue;
                        }
                        if seq != sent + 1 {
                            read_store = true;
                            break;
                        }
                        let own = pushed.poster_connection == self.connection;
                        self.send_entry(&group, &pushed.entry, own).await?;
                        sent = seq;
                        self.groups.insert(group.clone(), sent);
                    }
                }
                if read_store {
                    self.send_group_from_store(&group).await?;
                }
            }
        }
    }

    async fn send(&self, bytes: Vec<u8>) -> Result<(), Stop> {
        match tokio::time::timeout(STALL_TIMEOUT, self.outbound.send(bytes)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(Stop::Disconnected),
            Err(_) => Err(Stop::Stalled),
        }
    }

    async fn refresh_memberships(&mut self) -> Result<(), Stop> {
        let device = self.device;
        let memberships = self
            .shared
            .store
            .run(move |store| store.memberships(&device))
            .await?;
        for membership in memberships {
            self.groups
                .entry(membership.group_id)
                .or_insert(membership.cursor);
        }
        Ok(())
    }

    async fn send_inbox(&mut self) -> Result<(), Stop> {
        loop {
            let device = self.device;
            let after = self.inbox_sent;
            let entries = self
                .shared
                .store
                .run(move |store| store.inbox_entries(&device, after, PAGE))
                .await?;
            let full_page = entries.len() == PAGE;
            for entry in entries {
                self.inbox_sent = entry.seq;
                self.send(encode(
                    0,
                    Reply::Delivery(wire::Delivery {
                        entry: Some(wire::delivery::Entry::InboxEntry(wire::InboxEntry {
                            seq: entry.seq,
                            payload: entry.payload,
                        })),
                    }),
                ))
                .await?;
            }
            if !full_page {
                return Ok(());
            }
        }
    }

    async fn send_group_from_store(&mut self, group: &GroupId) -> Result<(), Stop> {
        loop {
            let device = self.device;
            let after = self.groups.get(group).copied().unwrap_or(0);
            let group_id = group.clone();
            let entries = match self
                .shared
                .store
                .run(move |store| store.group_entries(&group_id, &device, after, PAGE, unix_now()))
                .await
            {
                Ok(entries) => entries,
                // Removed from the group since: nothing more to send.
                Err(StoreError::Forbidden | StoreError::NotFound) => {
                    self.groups.remove(group);
                    return Ok(());
                }
                Err(error) => return Err(error.into()),
            };
            let full_page = entries.len() == PAGE;
            for entry in &entries {
                self.send_entry(group, entry, false).await?;
                self.groups.insert(group.clone(), entry.seq);
            }
            if !full_page {
                return Ok(());
            }
        }
    }

    async fn send_entry(
        &self,
        group: &GroupId,
        entry: &crate::store::LogEntry,
        own: bool,
    ) -> Result<(), Stop> {
        let kind = match entry.kind {
            EntryKind::Application => wire::EntryKind::Application,
            EntryKind::Commit => wire::EntryKind::Commit,
        };
        self.send(encode(
            0,
            Reply::Delivery(wire::Delivery {
                entry: Some(wire::delivery::Entry::GroupEntry(wire::GroupEntry {
                    group_id: group.as_bytes().to_vec(),
                    seq: entry.seq,
                    epoch: entry.epoch.0,
                    kind: kind as i32,
                    payload: if own {
                        Vec::new()
                    } else {
                        entry.payload.clone()
                    },
                    own,
                })),
            }),
        ))
        .await
    }
}
