//! The Miyu client core: the account and its keys, contacts and invites, one end-to-end
//! encrypted MLS conversation per contact, the sync engine (cursors, acknowledgements,
//! de-duplication, an outbox that survives crashes), and an event stream for front ends.
//!
//! ```no_run
//! # async fn example() -> Result<(), miyu_client::Error> {
//! use miyu_client::{Client, Protection};
//! let server = "wss://127.0.0.1:7443/#...".parse().map_err(|_| miyu_client::Error::Usage("bad".into()))?;
//! let passphrase = Protection::Passphrase("correct horse battery".to_string().into());
//! let mut alice = Client::init("alice-profile".as_ref(), server, "alice", &passphrase, None).await?;
//! let link = alice.invite().await?;
//! println!("send this link to a friend: {link}");
//! # Ok(()) }
//! ```
//!
//! Front ends (the `miyu` CLI, later a TUI and a web UI) only parse input and print; all logic
//! is here. What it does not do: trust the server. Keys handed out by the server are checked
//! against the invite link's fingerprint and every member's device certificate.

#![cfg_attr(not(test), warn(clippy::unwrap_used))]

mod db;
pub mod devices;
pub mod features;
pub mod files;
pub mod groups;
mod history;
mod keyring;
mod mirror;
pub mod net;
mod privacy;
pub mod recovery;
pub mod settings;
pub mod strip;
pub mod vault;

use std::collections::VecDeque;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use miyu_crypto::identity::AccountKeys;
use miyu_crypto::mls::{self, Incoming, MlsError, Provider};
use miyu_proto::blob::BlobId;
use miyu_proto::cert::VerifiedCertificate;
use miyu_proto::wire::{self, client_frame::Body as Request, server_frame::Body as Reply};
use miyu_proto::{AccountId, InviteLink, ServerAddress};
use prost::Message as _;
use rand::RngCore;
use rusqlite::{Connection, OptionalExtension, params};
use sha2::{Digest, Sha256};

use privacy::Received;

pub use net::{Proxy, ServerError};
pub use privacy::{Blocked, MessageRequest, parse_timer, timer_text};
pub use settings::Settings;
pub use vault::Protection;

/// One-time key packages kept on the server; topped up when fewer than half remain.
const KEY_PACKAGE_TARGET: u32 = 20;
/// How long a request may take before the connection is considered dead.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// A device replaces its keys in a conversation (an MLS self-update, for post-compromise
/// security) before sending, once its last update is older than this.
const KEY_UPDATE_INTERVAL: Duration = Duration::from_secs(7 * 24 * 3600);
/// A live connection that has been quiet this long is probed with a Ping; if the next quiet
/// spell ends without an answer either, it is considered dead.
const KEEPALIVE: Duration = Duration::from_secs(60);
/// Attempts at winning an epoch for a commit before giving up.
const COMMIT_ATTEMPTS: usize = 5;
/// How long an invite this device made can be answered: the server's 30 days, and its
/// rounding to the hour.
pub(crate) const INVITE_LIFETIME_MS: u64 = (30 * 24 + 2) * 3600 * 1000;

/// Errors, sorted by who must act.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The user asked for something that cannot be done; the message says what to do instead.
    #[error("{0}")]
    Usage(String),
    /// The profile's database is encrypted and the passphrase is missing or wrong.
    #[error("{0}")]
    Locked(String),
    /// The server refused a request.
    #[error("the server refused: {0}")]
    Server(ServerError),
    /// The server or a peer sent something that does not follow the protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// A peer's keys or certificates did not check out.
    #[error("security check failed: {0}")]
    Security(String),
    #[error("network: {0}")]
    Network(String),
    /// The message is stored and goes out when the server can be reached.
    #[error("not sent yet, kept in the outbox: {0}")]
    Queued(String),
    #[error("local database: {0}")]
    Database(#[from] rusqlite::Error),
    #[error("encryption: {0}")]
    Mls(#[from] MlsError),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// Something this client should never do; please report it.
    #[error("bug: {0}")]
    Bug(String),
}

impl Error {
    /// True when retrying after reconnecting may help.
    pub fn is_transient(&self) -> bool {
        matches!(self, Error::Network(_) | Error::Queued(_))
            || matches!(self, Error::Server(e) if e.code == wire::ErrorCode::ShuttingDown || e.code == wire::ErrorCode::RateLimited)
    }
}

/// A contact as front ends show it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Contact {
    pub name: String,
    pub account_id: String,
    pub verified: bool,
    /// Online now, as far as the contact shares it with us (and we share ours).
    pub online: bool,
    /// When the contact was last online, Unix milliseconds to the minute, if shared.
    pub last_seen_ms: Option<u64>,
    /// Messages from them that no device of the account has shown yet.
    pub unread: u64,
}

/// Where a message stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MessageState {
    /// Stored locally, not yet acknowledged by the server.
    #[default]
    Pending,
    /// Durably stored by the server.
    Sent,
    /// Received from the contact.
    Received,
    /// Read by the contact (only known while both sides have read receipts on).
    Read,
}

/// What a message row is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MessageKind {
    #[default]
    Text,
    /// A notice that the disappearing-message timer changed; `body` says how.
    Timer,
    /// A file; `body` names it with its id for `download`.
    File,
    /// Something that happened in a group (a member added, removed, a change refused).
    Notice,
}

/// A message as front ends show it.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize)]
pub struct MessageView {
    /// This device's number for the message, for `reply`, `edit`, `delete`, `react` and
    /// `forward` (0 where not known yet, as in events).
    pub id: i64,
    pub contact: String,
    /// Who wrote it: the contact's name, or "me".
    pub from: String,
    pub outgoing: bool,
    pub body: String,
    pub sent_at_ms: u64,
    pub state: MessageState,
    pub kind: MessageKind,
    /// When the message disappears from this device, Unix milliseconds.
    pub expires_at_ms: Option<u64>,
    /// The message this one answers, by its `id`, if this device has it.
    pub reply_to: Option<i64>,
    pub forwarded: bool,
    /// When its author last edited it.
    pub edited_at_ms: Option<u64>,
    /// Deleted for everyone by its author; `body` is empty.
    pub deleted: bool,
    pub reactions: Vec<features::ReactionView>,
    /// A group text that mentions us.
    pub mentions_me: bool,
}

/// Something front ends may want to show.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    Message(MessageView),
    ContactAdded(Contact),
    /// The contact told us their name.
    ContactNamed {
        old: String,
        new: String,
    },
    /// Someone who is not a contact wrote: see `requests`.
    Request {
        name: String,
    },
    /// The contact started or stopped typing (only while both sides share typing).
    Typing {
        contact: String,
        active: bool,
    },
    /// The contact read our messages (only while both sides have read receipts on).
    Read {
        contact: String,
    },
    /// The contact changed the text of its message `id`.
    Edited {
        contact: String,
        id: i64,
        body: String,
    },
    /// The contact deleted its message `id` for everyone.
    Deleted {
        contact: String,
        id: i64,
    },
    /// The contact reacted to message `id` (`None`: took its reaction back).
    Reacted {
        contact: String,
        id: i64,
        emoji: Option<String>,
    },
    /// Everything the server held for this device has been processed.
    CaughtUp,
}

/// The name a contact chose, made safe to store: printable, trimmed, at most 64 characters.
fn profile_name(profile: &wire::Profile) -> String {
    profile
        .name
        .chars()
        .filter(|c| !c.is_control())
        .take(64)
        .collect::<String>()
        .trim()
        .to_string()
}

/// What the server decided about a commit of ours.
#[derive(Clone, Copy)]
enum Verdict {
    Accepted,
    Lost,
}

/// Applies the server's verdict to our pending commit, if the group still has one: merged when
/// accepted, dropped when another commit took the epoch. Either way its hash is forgotten.
fn settle_own_commit(db: &Connection, group_id: &[u8], verdict: Verdict) -> Result<(), Error> {
    let provider = Provider::new(db);
    if let Some(mut group) = mls::load_group(&provider, group_id)?
        && mls::has_pending_commit(&group)
    {
        match verdict {
            Verdict::Accepted => {
                mls::merge_own_commit(&provider, &mut group)?;
                groups::after_own_commit(db, group_id)?;
            }
            Verdict::Lost => mls::discard_own_commit(&provider, &mut group)?,
        }
    }
    forget_commit_hash(db, group_id)
}

fn forget_commit_hash(db: &Connection, group_id: &[u8]) -> Result<(), Error> {
    db.execute(
        "UPDATE conversations SET pending_commit_hash = NULL WHERE group_id = ?1",
        params![group_id],
    )?;
    Ok(())
}

/// The unused invite of ours whose token `proof` shows the sender of an introduction holds
/// (over the conversation's id and the sender's certificate).
fn find_invite(
    db: &Connection,
    group_id: &[u8],
    certificate: &[u8],
    proof: &[u8],
) -> Result<Option<Vec<u8>>, Error> {
    if proof.is_empty() {
        return Ok(None);
    }
    let unused: Vec<Vec<u8>> = {
        // Links expire on the server after 30 days (and an hour): so here.
        let mut statement =
            db.prepare("SELECT token FROM invites WHERE used = 0 AND created_at_ms > ?1")?;
        statement
            .query_map(
                params![now_ms().saturating_sub(INVITE_LIFETIME_MS)],
                |row| row.get(0),
            )?
            .collect::<Result<_, _>>()?
    };
    Ok(unused.into_iter().find(|token| {
        <[u8; 32]>::try_from(token.as_slice()).is_ok_and(|token| {
            miyu_crypto::invite::verify_introduction(&token, group_id, certificate, proof)
        })
    }))
}

/// What another device of this account said in a conversation: what it wrote, edited, deleted
/// or reacted, and the timer it set, as if this device had; receipts, typing, presence and
/// profiles are between the account and its contacts, and are not repeated here.
fn own_message(
    db: &Connection,
    received: &privacy::Received<'_>,
    body: Option<wire::app_message::Body>,
) -> Result<Option<Event>, Error> {
    match body {
        Some(wire::app_message::Body::Text(text)) => privacy::store_text(db, received, &text),
        Some(wire::app_message::Body::File(file)) => files::store_file(db, received, &file),
        Some(wire::app_message::Body::Edit(edit)) => features::on_edit(db, received, &edit),
        Some(wire::app_message::Body::Delete(delete)) => features::on_delete(db, received, &delete),
        Some(wire::app_message::Body::Reaction(reaction)) => {
            features::on_reaction(db, received, &reaction)
        }
        Some(wire::app_message::Body::Timer(timer)) => {
            privacy::on_timer(db, received, timer.seconds)
        }
        _ => Ok(None),
    }
}

/// Writes this device's account row: its keys (a linked device's without the identity key, with
/// its certificate instead), server, name and proxy.
fn store_account(
    db: &Connection,
    keys: &AccountKeys,
    server: &ServerAddress,
    name: &str,
    proxy: Option<Proxy>,
) -> Result<(), Error> {
    let identity = keys.identity_secret();
    db.execute(
        "INSERT INTO account (id, server, name, identity_secret, device_secret, certificate, proxy)
         VALUES (1, ?1, ?2, ?3, ?4, ?5, ?6)",
        params![
            server.to_string(),
            name,
            identity
                .as_ref()
                .map_or(&[][..], |secret| secret.as_slice()),
            keys.device_secret().as_slice(),
            keys.certificate().to_compact(),
            proxy.map(|p| p.to_string())
        ],
    )?;
    Ok(())
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as u64)
}

fn random<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    bytes
}

/// Serialised one-time key packages, and a last-resort one when asked for.
type KeyPackages = (Vec<Vec<u8>>, Option<Vec<u8>>);

/// An outbox row: id, group, epoch, ciphertext, the message row it delivers (if shown) and
/// when it disappears.
type OutboxRow = (i64, Vec<u8>, u64, Vec<u8>, Option<i64>, Option<u64>);

/// How long fetching one Welcome's group tree may take.
const WELCOME_FETCH_TIMEOUT: Duration = Duration::from_secs(120);
/// How many syncs in a row may fail to fetch a Welcome's tree for a passing reason before the
/// Welcome is dropped.
const WELCOME_FETCH_ATTEMPTS: u32 = 5;

/// A Welcome and, when its group serves the tree apart, the tree's ciphertext and length.
type FetchedWelcome = (Vec<u8>, Option<(Vec<u8>, u64)>);

/// A profile: one device of one account, with its local state.
pub struct Client {
    db: Connection,
    keys: AccountKeys,
    server: ServerAddress,
    name: String,
    /// Every connection goes through this SOCKS5 proxy when set.
    proxy: Option<Proxy>,
    session: Option<Session>,
    events: VecDeque<Event>,
    /// The outbox got entries while a request was in flight; flush at the next chance.
    outbox_waiting: bool,
    /// Processing an entry queued a message (a group introduction, say).
    queued_while_processing: std::cell::Cell<bool>,
    /// Events found while processing an entry besides the one it returns.
    extra_events: std::cell::RefCell<Vec<Event>>,
    /// A connection that never authenticates, for posting to one group without saying who
    /// posts; never reused for another group, so the server cannot link posts across groups.
    unattributed: Option<(Vec<u8>, net::Connection)>,
    /// A device being linked leaves what the server pushes unread (and so unacknowledged,
    /// delivered again on the next connection) until the account's history is in.
    holding_deliveries: bool,
    _lock: File,
}

/// An authenticated connection and what it has told us.
struct Session {
    connection: net::Connection,
    /// Every step of `connect` after authenticating has completed on this connection.
    ready: bool,
    caught_up: bool,
    /// A keep-alive Ping went out and nothing has arrived since.
    ping_outstanding: bool,
}

fn lock_profile(profile: &Path) -> Result<File, Error> {
    std::fs::create_dir_all(profile).map_err(|source| Error::Io {
        context: format!("creating profile folder {}", profile.display()),
        source,
    })?;
    restrict_permissions(profile);
    let path = profile.join("lock");
    let file = File::create(&path).map_err(|source| Error::Io {
        context: format!("creating {}", path.display()),
        source,
    })?;
    file.try_lock().map_err(|_| {
        Error::Usage(format!(
            "profile {} is in use by another miyu process (is `miyu chat` running?)",
            profile.display()
        ))
    })?;
    Ok(file)
}

fn restrict_permissions(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700));
}

/// The stored account row: server, name, identity secret (empty on a linked device), device
/// secret, certificate, proxy.
type AccountRow = (
    String,
    String,
    Vec<u8>,
    Vec<u8>,
    Option<Vec<u8>>,
    Option<String>,
);

/// What a new profile's account row holds.
pub(crate) struct NewAccount<'a> {
    pub(crate) keys: AccountKeys,
    pub(crate) server: ServerAddress,
    pub(crate) name: &'a str,
    pub(crate) proxy: Option<Proxy>,
    /// See [`Client::holding_deliveries`].
    pub(crate) holding_deliveries: bool,
}

/// Locks a profile that is to hold a new account; refused if it holds one.
fn claim_new_profile(profile: &Path) -> Result<(File, PathBuf), Error> {
    let lock = lock_profile(profile)?;
    let path = database_path(profile);
    if path.exists() {
        return Err(Error::Usage(format!(
            "{} already holds an account; use another --profile",
            profile.display()
        )));
    }
    Ok((lock, path))
}

/// Leaves no half-made account behind, so that the command can simply be run again.
fn discard_new_profile(profile: &Path, path: &Path) {
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
    vault::remove(profile);
}

fn database_path(profile: &Path) -> PathBuf {
    profile.join("miyu.db")
}

/// The profile's database, which must exist: commands other than `init` never create one.
fn existing_database(profile: &Path) -> Result<PathBuf, Error> {
    let path = database_path(profile);
    if !path.exists() {
        return Err(Error::Usage(format!(
            "no account in {}; create one with `miyu --profile {} init --server URL`",
            profile.display(),
            profile.display()
        )));
    }
    Ok(path)
}

impl Drop for Client {
    fn drop(&mut self) {
        // Fold the write-ahead log back into the encrypted database and truncate it, so that
        // overwritten and deleted pages do not linger in a second file.
        let _ = self.db.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);");
    }
}

impl Client {
    /// Creates an account on `server`: new identity and device keys, registration with a batch
    /// of key packages. No phone number, no e-mail. Fails if the profile already holds one.
    pub async fn init(
        profile: &Path,
        server: ServerAddress,
        name: &str,
        protection: &Protection,
        proxy: Option<Proxy>,
    ) -> Result<Self, Error> {
        let name = name.trim();
        if name.is_empty() || name.chars().count() > 64 || name.chars().any(char::is_control) {
            return Err(Error::Usage(
                "a name is 1 to 64 printable characters".into(),
            ));
        }
        let (lock, path) = claim_new_profile(profile)?;
        let keys = AccountKeys::generate(&mut rand::rngs::OsRng);
        let result = match vault::create(profile, protection) {
            Ok(key) => {
                let account = NewAccount {
                    keys,
                    server,
                    name,
                    proxy,
                    holding_deliveries: false,
                };
                Self::create_account(&path, &key, lock, account).await
            }
            Err(error) => Err(error),
        };
        if result.is_err() {
            discard_new_profile(profile, &path);
        }
        result
    }

    /// Writes a new profile's account and registers its device.
    pub(crate) async fn create_account(
        path: &Path,
        key: &vault::DatabaseKey,
        lock: File,
        account: NewAccount<'_>,
    ) -> Result<Self, Error> {
        let NewAccount {
            keys,
            server,
            name,
            proxy,
            holding_deliveries,
        } = account;
        let db = db::open(path, key)?;
        store_account(&db, &keys, &server, name, proxy)?;
        let mut client = Self {
            db,
            keys,
            server,
            proxy,
            name: name.to_string(),
            session: None,
            events: VecDeque::new(),
            outbox_waiting: false,
            queued_while_processing: std::cell::Cell::new(false),
            extra_events: std::cell::RefCell::new(Vec::new()),
            unattributed: None,
            holding_deliveries,
            _lock: lock,
        };
        client.connect().await?;
        Ok(client)
    }

    /// Opens an existing profile. Does not connect yet. A profile with a passphrase opens with
    /// the key [`vault::unlock`] kept, if it is still kept, else with `passphrase`; without
    /// either it fails with [`Error::Locked`]. A kept key that no longer opens the profile is
    /// removed.
    pub fn open(profile: &Path, passphrase: Option<&str>) -> Result<Self, Error> {
        let lock = lock_profile(profile)?;
        let path = existing_database(profile)?;
        let kept = match vault::kept(profile) {
            Some(key) => match db::open(&path, &key) {
                Ok(db) => Some(db),
                Err(Error::Locked(_)) => {
                    vault::forget(profile);
                    None
                }
                Err(error) => return Err(error),
            },
            None => None,
        };
        let db = match kept {
            Some(db) => db,
            None => db::open(&path, &vault::recover(profile, passphrase)?)?,
        };
        let (server, name, identity, device, certificate, proxy): AccountRow = db.query_row(
            "SELECT server, name, identity_secret, device_secret, certificate, proxy FROM account WHERE id = 1",
            [],
            |row| {
                Ok((
                    row.get(0)?,
                    row.get(1)?,
                    row.get(2)?,
                    row.get(3)?,
                    row.get(4)?,
                    row.get(5)?,
                ))
            },
        )?;
        let proxy = proxy.map(|text| text.parse::<Proxy>()).transpose()?;
        let identity = zeroize::Zeroizing::new(identity);
        let device = zeroize::Zeroizing::new(device);
        let damaged = |error: String| Error::Usage(format!("profile keys are damaged: {error}"));
        // A linked device keeps no identity key, only its certificate.
        let keys = if identity.is_empty() {
            let certificate = VerifiedCertificate::from_compact(&certificate.unwrap_or_default())
                .map_err(|error| damaged(error.to_string()))?;
            AccountKeys::linked(&device, certificate)
        } else {
            AccountKeys::from_secrets(&identity, &device)
        }
        .map_err(|error| damaged(error.to_string()))?;
        let server = server
            .parse()
            .map_err(|_| Error::Usage("profile's server address is damaged".into()))?;
        let client = Self {
            db,
            keys,
            server,
            proxy,
            name,
            session: None,
            events: VecDeque::new(),
            outbox_waiting: false,
            queued_while_processing: std::cell::Cell::new(false),
            extra_events: std::cell::RefCell::new(Vec::new()),
            unattributed: None,
            holding_deliveries: false,
            _lock: lock,
        };
        client.delete_expired()?;
        Ok(client)
    }

    pub fn account_id(&self) -> AccountId {
        self.keys.certificate().account_id()
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn server(&self) -> &ServerAddress {
        &self.server
    }

    pub fn proxy(&self) -> Option<Proxy> {
        self.proxy
    }

    /// Sends every later connection through `proxy` (or directly, with `None`), and remembers
    /// that for this profile.
    pub async fn set_proxy(&mut self, proxy: Option<Proxy>) -> Result<(), Error> {
        self.db.execute(
            "UPDATE account SET proxy = ?1 WHERE id = 1",
            params![proxy.map(|p| p.to_string())],
        )?;
        self.proxy = proxy;
        self.disconnect().await;
        Ok(())
    }

    // -----------------------------------------------------------------------------------------
    // Connection and sync
    // -----------------------------------------------------------------------------------------

    /// Connects and authenticates (registering on first use), then re-sends what the outbox
    /// holds. Incoming entries are processed as they arrive, inside any later call.
    pub async fn connect(&mut self) -> Result<(), Error> {
        if let Some(session) = &self.session {
            if session.ready {
                return Ok(());
            }
            // An earlier connect stopped half-way (an error, or a cancelled future): finish
            // its remaining steps on this connection.
            return self.finish_connect(None).await;
        }
        let mut connection = net::Connection::open(&self.server, self.proxy.as_ref()).await?;
        let (server_sha256, nonce) = connection.challenge();
        let signature = self.keys.sign_auth(server_sha256, nonce);
        let registered: bool =
            self.db
                .query_row("SELECT registered FROM account WHERE id = 1", [], |row| {
                    row.get(0)
                })?;
        let remaining = if registered {
            let reply = connection
                .call(Request::Authenticate(wire::Authenticate {
                    device_id: self.keys.certificate().device_id().as_bytes().to_vec(),
                    signature,
                }))
                .await?;
            match reply {
                Reply::Authenticated(authenticated) => authenticated.key_packages_remaining,
                other => return Err(Error::Protocol(format!("unexpected answer: {other:?}"))),
            }
        } else {
            let (key_packages, last_resort) = self.new_key_packages(KEY_PACKAGE_TARGET, true)?;
            let token = std::env::var("MIYU_REGISTRATION_TOKEN").unwrap_or_default();
            let reply = connection
                .call(Request::Register(wire::Register {
                    certificate: Some(self.keys.certificate().to_wire()),
                    challenge_signature: signature,
                    registration_token: token,
                    key_packages,
                    last_resort_key_package: last_resort.unwrap_or_default(),
                }))
                .await;
            match reply {
                Ok(Reply::Registered(_)) => {}
                Err(Error::Server(error)) if error.code == wire::ErrorCode::AlreadyExists => {
                    // Registered before a crash took the answer away. The device id is derived
                    // from our own key, and the server checked our signature: it is ours.
                    self.db
                        .execute("UPDATE account SET registered = 1 WHERE id = 1", [])?;
                    connection.close().await;
                    return Box::pin(self.connect()).await;
                }
                Ok(other) => return Err(Error::Protocol(format!("unexpected answer: {other:?}"))),
                Err(error) => return Err(error),
            }
            self.db
                .execute("UPDATE account SET registered = 1 WHERE id = 1", [])?;
            KEY_PACKAGE_TARGET
        };
        self.session = Some(Session {
            connection,
            ready: false,
            caught_up: false,
            ping_outstanding: false,
        });
        self.finish_connect(Some(remaining)).await
    }

    /// The steps after authenticating: top up key packages (when the count is known), send
    /// pending group announcements and flush the outbox. The session is ready once all ran.
    async fn finish_connect(&mut self, key_packages_remaining: Option<u32>) -> Result<(), Error> {
        if let Some(remaining) = key_packages_remaining
            && remaining < KEY_PACKAGE_TARGET / 2
        {
            let (key_packages, _) = self.new_key_packages(KEY_PACKAGE_TARGET - remaining, false)?;
            self.call(Request::UploadKeyPackages(wire::UploadKeyPackages {
                key_packages,
                last_resort_key_package: Vec::new(),
            }))
            .await?;
        }
        self.announce_pending_groups().await?;
        self.flush_outbox().await?;
        self.session()?.ready = true;
        Ok(())
    }

    /// Drops the connection (the server keeps everything unacknowledged for next time).
    pub async fn disconnect(&mut self) {
        if let Some(session) = self.session.take() {
            session.connection.close().await;
        }
    }

    fn new_key_packages(&self, count: u32, with_last_resort: bool) -> Result<KeyPackages, Error> {
        db::in_transaction(&self.db, |db| {
            let provider = Provider::new(db);
            let packages = (0..count)
                .map(|_| mls::new_key_package(&provider, &self.keys, false))
                .collect::<Result<Vec<_>, _>>()?;
            let last_resort = if with_last_resort {
                Some(mls::new_key_package(&provider, &self.keys, true)?)
            } else {
                None
            };
            Ok((packages, last_resort))
        })
    }

    fn session(&mut self) -> Result<&mut Session, Error> {
        self.session
            .as_mut()
            .ok_or_else(|| Error::Network("not connected".into()))
    }

    /// Sends a request and waits for its answer, processing whatever the server pushes
    /// meanwhile.
    async fn call(&mut self, body: Request) -> Result<Reply, Error> {
        let id = self.session()?.connection.send(body).await?;
        loop {
            let frame = self.receive().await?;
            if frame.request_id == id {
                return net::into_result(frame);
            }
            self.handle_frame(frame).await?;
        }
    }

    async fn receive(&mut self) -> Result<wire::ServerFrame, Error> {
        let session = self.session()?;
        match tokio::time::timeout(REQUEST_TIMEOUT, session.connection.receive()).await {
            Ok(Ok(frame)) => Ok(frame),
            Ok(Err(error)) => {
                self.session = None;
                Err(error)
            }
            Err(_) => {
                self.session = None;
                Err(Error::Network("the server stopped answering".into()))
            }
        }
    }

    /// Waits for and processes the next frame the server pushes, then posts anything that
    /// processing queued.
    async fn pump(&mut self) -> Result<(), Error> {
        let frame = self.receive().await?;
        self.handle_frame(frame).await?;
        if self.outbox_waiting {
            self.outbox_waiting = false;
            self.flush_outbox().await?;
        }
        Ok(())
    }

    /// Processes everything pending on the server. With a `wait`, then keeps listening until
    /// at least one new message arrives or `wait` has passed.
    pub async fn sync(&mut self, wait: Duration) -> Result<Vec<Event>, Error> {
        // A fresh connection makes the server send everything this device has not
        // acknowledged, then `CaughtUp`: the one point at which "nothing is pending" is known.
        // On a connection that is already up, pushes may still be on their way.
        self.disconnect().await;
        self.connect().await?;
        let mut events = Vec::new();
        while !self.session()?.caught_up {
            self.pump().await?;
        }
        self.remove_leavers().await?;
        self.remove_revoked_devices().await?;
        self.add_missing_own_devices().await?;
        self.decline_silent_groups().await?;
        self.admit_requests().await?;
        self.refresh_posting_keys().await?;
        self.refresh_presence().await?;
        self.delete_expired()?;
        events.extend(self.events.drain(..));
        let received = |events: &[Event]| {
            events
                .iter()
                .any(|e| matches!(e, Event::Message(m) if !m.outgoing))
        };
        if !wait.is_zero() && !received(&events) {
            let deadline = tokio::time::Instant::now() + wait;
            while !received(&events) {
                match tokio::time::timeout_at(deadline, self.pump_live()).await {
                    Ok(result) => result?,
                    Err(_) => break,
                }
                events.extend(self.events.drain(..));
            }
        }
        events.extend(self.events.drain(..));
        Ok(events)
    }

    /// The next event, connecting if needed. For live front ends such as `miyu chat`: a quiet
    /// connection is kept alive with pings rather than timed out.
    pub async fn next_event(&mut self) -> Result<Event, Error> {
        loop {
            if let Some(event) = self.events.pop_front() {
                return Ok(event);
            }
            self.delete_expired()?;
            self.connect().await?;
            self.pump_live().await?;
        }
    }

    /// Like `pump`, for a connection that may stay quiet for long: after `KEEPALIVE` without
    /// a frame it sends a Ping, and only a second quiet spell counts as a dead connection.
    async fn pump_live(&mut self) -> Result<(), Error> {
        let session = self.session()?;
        let frame = match tokio::time::timeout(KEEPALIVE, session.connection.receive()).await {
            Ok(Ok(frame)) => frame,
            Ok(Err(error)) => {
                self.session = None;
                return Err(error);
            }
            Err(_) if session.ping_outstanding => {
                self.session = None;
                return Err(Error::Network("the server stopped answering".into()));
            }
            Err(_) => {
                session
                    .connection
                    .send(Request::Ping(wire::Ping {}))
                    .await?;
                session.ping_outstanding = true;
                return Ok(());
            }
        };
        self.session()?.ping_outstanding = false;
        self.handle_frame(frame).await?;
        if self.outbox_waiting {
            self.outbox_waiting = false;
            self.flush_outbox().await?;
        }
        Ok(())
    }

    async fn handle_frame(&mut self, frame: wire::ServerFrame) -> Result<(), Error> {
        match frame.body {
            Some(Reply::Delivery(_)) if self.holding_deliveries => Ok(()),
            Some(Reply::Delivery(delivery)) => match delivery.entry {
                Some(wire::delivery::Entry::InboxEntry(entry)) => self.on_inbox_entry(entry).await,
                Some(wire::delivery::Entry::GroupEntry(entry)) => self.on_group_entry(entry).await,
                None => Ok(()),
            },
            Some(Reply::CaughtUp(_)) => {
                self.discard_unaccepted_commits()?;
                self.session()?.caught_up = true;
                self.events.push_back(Event::CaughtUp);
                Ok(())
            }
            Some(Reply::Error(error)) if frame.request_id == 0 => {
                let error = ServerError::from(error);
                if error.code == wire::ErrorCode::ShuttingDown {
                    self.session = None;
                    return Err(Error::Network("the server is restarting".into()));
                }
                Err(Error::Server(error))
            }
            // Answers to acknowledgements we did not wait for.
            Some(Reply::Error(error)) => {
                tracing::debug!(
                    "request {} failed: {}",
                    frame.request_id,
                    ServerError::from(error)
                );
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Sends a request whose answer nobody waits for.
    async fn send_and_forget(&mut self, body: Request) -> Result<(), Error> {
        self.session()?.connection.send(body).await.map(|_| ())
    }

    async fn on_inbox_entry(&mut self, entry: wire::InboxEntry) -> Result<(), Error> {
        let cursor: u64 =
            self.db
                .query_row("SELECT inbox_cursor FROM account WHERE id = 1", [], |row| {
                    row.get(0)
                })?;
        if entry.seq > cursor {
            // A group's tree comes apart from its Welcome: fetched first, the only network
            // step. A failure the next sync may not see again is kept for it.
            let fetched = match tokio::time::timeout(
                WELCOME_FETCH_TIMEOUT,
                self.fetch_welcome(&entry.payload),
            )
            .await
            .unwrap_or_else(|_| Err(Error::Network("fetching a group's tree timed out".into())))
            {
                Ok(fetched) => Ok(fetched),
                Err(error) if error.is_transient() => {
                    // Tried again at the next sync, a few times: a tree that can never be
                    // fetched must not hold up every later entry.
                    let attempts: u32 = self.db.query_row(
                        "UPDATE account SET welcome_attempts =
                             CASE welcome_seq WHEN ?1 THEN welcome_attempts + 1 ELSE 1 END,
                             welcome_seq = ?1 WHERE id = 1 RETURNING welcome_attempts",
                        params![entry.seq],
                        |row| row.get(0),
                    )?;
                    if attempts < WELCOME_FETCH_ATTEMPTS {
                        return Err(error);
                    }
                    Err(format!("gave up after {attempts} tries: {error}"))
                }
                Err(error) => Err(error.to_string()),
            };
            let joined = db::in_transaction(&self.db, |db| {
                // A Welcome that fails its checks must leave no trace, not even the one-time
                // key package it consumed, while the inbox cursor still moves past it.
                db.execute_batch("SAVEPOINT welcome")?;
                let joined = match &fetched {
                    Ok((welcome, tree)) => self.join_from_welcome(
                        db,
                        welcome,
                        tree.as_ref()
                            .map(|(ciphertext, plaintext_len)| mls::SealedTree {
                                ciphertext,
                                plaintext_len: *plaintext_len,
                            }),
                    ),
                    Err(reason) => Err(Error::Security(reason.clone())),
                };
                if joined.is_err() {
                    db.execute_batch("ROLLBACK TO welcome")?;
                }
                db.execute_batch("RELEASE welcome")?;
                if let Err(error @ (Error::Database(_) | Error::Mls(MlsError::State(_)))) = joined {
                    // Our own storage failed, not the Welcome: keep it for another try rather
                    // than acknowledging (and so deleting) the only copy.
                    return Err(error);
                }
                db.execute(
                    "UPDATE account SET inbox_cursor = ?1 WHERE id = 1",
                    params![entry.seq],
                )?;
                Ok(joined)
            })?;
            // The newcomer stays hidden until their introduction proves they hold one of our
            // invite tokens; only then do we tell them who we are (see `process_entry`).
            if let Err(error) = joined {
                tracing::warn!("ignored an invitation that failed checks: {error}");
            }
        }
        self.send_and_forget(Request::AckInbox(wire::AckInbox { seq: entry.seq }))
            .await
    }

    /// Reads a Welcome inbox entry and downloads the group's tree if it is served apart:
    /// the MLS Welcome, and the tree's ciphertext with its length.
    async fn fetch_welcome(&mut self, payload: &[u8]) -> Result<FetchedWelcome, Error> {
        // An MLS message starts with its version, 0x0001, which no `WelcomePackage` does: a
        // bare Welcome (from before packages) carries its tree.
        if payload.first() == Some(&0) {
            return Ok((payload.to_vec(), None));
        }
        let package = wire::WelcomePackage::decode(payload)
            .map_err(|error| Error::Protocol(format!("a malformed invitation: {error}")))?;
        if package.tree_blob.is_empty() {
            return Ok((package.welcome, None));
        }
        if package.tree_size > mls::MAX_TREE_BYTES {
            return Err(Error::Security(
                "an invitation whose group tree is too large".into(),
            ));
        }
        // Nothing is downloaded for a Welcome none of our key packages can open.
        if !mls::welcome_is_for_us(&Provider::new(&self.db), &package.welcome)? {
            return Err(Error::Security(
                "an invitation for none of this device's keys".into(),
            ));
        }
        let blob_id = BlobId(
            package
                .tree_blob
                .as_slice()
                .try_into()
                .map_err(|_| Error::Protocol("an invitation names a malformed blob".into()))?,
        );
        let ciphertext_len =
            miyu_crypto::file::Layout::new(package.tree_size, miyu_crypto::file::DEFAULT_CHUNK)
                .map_err(|error| Error::Protocol(error.to_string()))?
                .ciphertext_len();
        let ciphertext = files::BlobClient::new(&self.keys, &self.server, self.proxy)
            .download_whole(&blob_id, ciphertext_len)
            .await?;
        Ok((package.welcome, Some((ciphertext, package.tree_size))))
    }

    /// Joins a conversation from a Welcome. Local failures (database, MLS state) are retried;
    /// any other error means the Welcome failed its checks and is dropped.
    fn join_from_welcome(
        &self,
        db: &Connection,
        welcome: &[u8],
        tree: Option<mls::SealedTree<'_>>,
    ) -> Result<(), Error> {
        let provider = Provider::new(db);
        let joined = mls::join_group(&provider, welcome, tree)?;
        if groups::is_group_id(joined.group.group_id().as_slice()) {
            return groups::join(db, &joined, self.account_id());
        }
        if mirror::is_account_group_id(joined.group.group_id().as_slice()) {
            return mirror::join(db, &joined, self.account_id());
        }
        let me = self.account_id();
        let others: Vec<&VerifiedCertificate> = joined
            .members
            .iter()
            .filter(|member| member.account_id() != me)
            .collect();
        // The other account may have several devices; there is one other account.
        let Some(other) = others.first() else {
            return Err(Error::Security(
                "a conversation must have exactly one other account".into(),
            ));
        };
        if others
            .iter()
            .any(|member| member.account_id() != other.account_id())
        {
            return Err(Error::Security(
                "a conversation must have exactly one other account".into(),
            ));
        }
        let group_id = joined.group.group_id().as_slice().to_vec();
        let account = other.account_id().to_string();
        // A conversation the account's history brought: only our own device may bring us
        // into it, and only with the contact it is with (a server could otherwise build a
        // Welcome of its own for the same id and stand in for the contact).
        let known = db::conversation_contact(db, &group_id)?;
        if let Some(contact) = known
            && (contact != account || joined.sender.account_id() != me)
        {
            return Err(Error::Security(
                "a Welcome to a conversation this device knows, from someone else".into(),
            ));
        }
        if privacy::is_blocked(db, &account)? {
            return Err(Error::Security(
                "an invitation from a blocked account".into(),
            ));
        }
        let existing: Option<String> = db
            .query_row(
                "SELECT name FROM contacts WHERE account_id = ?1",
                params![account],
                |row| row.get(0),
            )
            .optional()?;
        if existing.is_none() {
            // A conversation another device of ours started: that device accepted the contact.
            let from_us = joined.sender.account_id() == me;
            if !from_us {
                privacy::make_room_for_newcomer(db)?;
            }
            let placeholder = db::free_contact_name(db, &account[..8], &account)?;
            db.execute(
                "INSERT INTO contacts (account_id, name, certificate, added_at_ms, state) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![
                    account,
                    placeholder,
                    other.to_compact(),
                    now_ms(),
                    if from_us { "accepted" } else { "pending" }
                ],
            )?;
        }
        // A conversation another device of ours handed over (with its history) keeps what it
        // knows; this device reads the group from here on.
        db.execute(
            "INSERT INTO conversations (group_id, contact, scope, cursor, last_update_ms) VALUES (?1, ?2, ?2, 0, ?3)
             ON CONFLICT (group_id) DO UPDATE SET cursor = 0, broken = NULL, last_update_ms = ?3",
            params![group_id, account, now_ms()],
        )?;
        Ok(())
    }

    async fn on_group_entry(&mut self, entry: wire::GroupEntry) -> Result<(), Error> {
        let conversation: Option<(Option<String>, u64)> = self
            .db
            .query_row(
                "SELECT contact, cursor FROM conversations WHERE group_id = ?1",
                params![entry.group_id],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
            .optional()?;
        let Some((contact_account, cursor)) = conversation else {
            // Welcomes arrive before their group's entries; an unknown group is one whose
            // Welcome failed its checks. Its entries can never be read.
            tracing::debug!("dropping an entry of an unknown group");
            return self.ack_group(entry.group_id, entry.seq).await;
        };
        if entry.seq <= cursor {
            // Delivered again (after a reconnect, say): already processed.
            return self.ack_group(entry.group_id, entry.seq).await;
        }
        let is_commit = entry.kind == wire::EntryKind::Commit as i32;
        if entry.own && !is_commit {
            // The echo of a message we posted on this connection: nothing to store. The local
            // cursor only filters repeats, so leaving it behind costs nothing, and saves the
            // sender a disk flush per message.
            return self.ack_group(entry.group_id, entry.seq).await;
        }
        let event = db::in_transaction(&self.db, |db| {
            let event = if entry.own {
                if is_commit {
                    // The server accepted our commit (the answer may still be on its way).
                    settle_own_commit(db, &entry.group_id, Verdict::Accepted)?;
                }
                None
            } else {
                self.process_entry(db, &entry, contact_account.as_deref())?
            };
            db.execute(
                "UPDATE conversations SET cursor = ?1 WHERE group_id = ?2",
                params![entry.seq, entry.group_id],
            )?;
            Ok(event)
        })?;
        if self.queued_while_processing.take() {
            self.outbox_waiting = true;
        }
        let extra = self.extra_events.take();
        self.events.extend(extra);
        if let Some(event) = event {
            if matches!(event, Event::ContactAdded(_)) {
                // Our introduction was queued with the acceptance; it is posted by the next
                // flush, since this runs inside `call`, which must not recurse.
                self.outbox_waiting = true;
            }
            self.events.push_back(event);
        }
        self.ack_group(entry.group_id, entry.seq).await
    }

    async fn ack_group(&mut self, group_id: Vec<u8>, seq: u64) -> Result<(), Error> {
        self.send_and_forget(Request::AckGroup(wire::AckGroup { group_id, seq }))
            .await
    }

    /// Decrypts one entry and stores what it says. Entries that fail to decrypt are dropped
    /// (they are replays, our own messages echoed back, or forgeries), but a local storage
    /// failure is returned so the entry is retried.
    fn process_entry(
        &self,
        db: &Connection,
        entry: &wire::GroupEntry,
        contact_account: Option<&str>,
    ) -> Result<Option<Event>, Error> {
        let hash: [u8; 32] = Sha256::digest(&entry.payload).into();
        let pending_commit_hash: Option<Vec<u8>> = db
            .query_row(
                "SELECT pending_commit_hash FROM conversations WHERE group_id = ?1",
                params![entry.group_id],
                |row| row.get(0),
            )
            .optional()?
            .flatten();
        let is_commit = entry.kind == wire::EntryKind::Commit as i32;
        if is_commit && pending_commit_hash.as_deref() == Some(hash.as_slice()) {
            // Our own commit, echoed after a reconnect: the server accepted it.
            settle_own_commit(db, &entry.group_id, Verdict::Accepted)?;
            return Ok(None);
        }
        let provider = Provider::new(db);
        let Some(mut group) = mls::load_group(&provider, &entry.group_id)? else {
            return Ok(None);
        };
        if is_commit && mls::has_pending_commit(&group) {
            // The log's order is the truth: another member's commit took the epoch ours was
            // built on, so ours can never be accepted. Drop it and follow theirs.
            mls::discard_own_commit(&provider, &mut group)?;
            forget_commit_hash(db, &entry.group_id)?;
        }
        let account_group = mirror::is_account_group_id(&entry.group_id);
        let incoming = match mls::process(
            &provider,
            &mut group,
            &entry.payload,
            contact_account.is_none() && !account_group,
        ) {
            Ok(Incoming::Own) => {
                // One of our messages, echoed after a reconnect: it reached the server.
                db.execute(
                    "UPDATE messages SET state = 'sent', seq = ?1 WHERE ciphertext_hash = ?2 AND state = 'pending'",
                    params![entry.seq, hash.as_slice()],
                )?;
                return Ok(None);
            }
            Ok(incoming) => incoming,
            Err(MlsError::State(error)) => return Err(Error::Mls(MlsError::State(error))),
            Err(error) => {
                tracing::debug!("dropped a group entry that did not decrypt: {error}");
                return Ok(None);
            }
        };
        if let Incoming::Commit(summary) = &incoming
            && summary.committer.account_id() == self.account_id()
        {
            // Another device of ours removed a revoked one: now this device knows it too, and
            // never brings it back (even if the account group's word of it never came).
            for revocation in &summary.revocations {
                devices::record_revocation(db, self.keys.certificate(), revocation, true)?;
            }
        }
        if account_group {
            return self.on_account_entry(db, &entry.group_id, &group, incoming);
        }
        let Some(contact_account) = contact_account else {
            return match incoming {
                Incoming::Application { plaintext, sender } => {
                    self.on_group_message(db, entry, &sender, &plaintext)
                }
                Incoming::Commit(summary) => {
                    groups::on_commit(db, entry, &group, &summary, self.account_id())
                }
                Incoming::Own => Ok(None),
            };
        };
        let Incoming::Application { plaintext, sender } = incoming else {
            tracing::debug!(
                "processed a commit or proposal; now at epoch {}",
                group.epoch().as_u64()
            );
            if !mls::is_active(&group) {
                // Another device of ours removed this one (it was revoked, or the account's
                // other device did it): nothing here can be read or sent any more.
                db.execute(
                    "UPDATE conversations SET broken = ?2 WHERE group_id = ?1",
                    params![
                        entry.group_id,
                        "this device was removed from the conversation by another device of the account"
                    ],
                )?;
                db.execute(
                    "DELETE FROM outbox WHERE group_id = ?1",
                    params![entry.group_id],
                )?;
            }
            return Ok(None);
        };
        let own = sender.account_id() == self.account_id();
        if !own && sender.account_id().to_string() != contact_account {
            tracing::warn!("dropped a message whose sender is not the conversation's contact");
            return Ok(None);
        }
        let Ok(message) = wire::AppMessage::decode(plaintext.as_slice()) else {
            tracing::debug!("dropped a message that is not a Miyu message");
            return Ok(None);
        };
        if i64::try_from(message.sent_at_ms).is_err() {
            // Not a time; storing it would fail, and the entry would be retried forever.
            tracing::debug!("dropped a message with an impossible time");
            return Ok(None);
        }
        let (contact_name, state): (String, String) = db.query_row(
            "SELECT name, state FROM contacts WHERE account_id = ?1",
            params![contact_account],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )?;
        let accepted = state == "accepted";
        let received = Received {
            group_id: &entry.group_id,
            seq: entry.seq,
            contact_account,
            contact_name: &contact_name,
            conversation_name: &contact_name,
            sender: None,
            message_id: &message.message_id,
            sent_at_ms: message.sent_at_ms,
            expires_in_s: message.expires_in_s,
            own,
        };
        if own {
            return own_message(db, &received, message.body);
        }
        match message.body {
            Some(wire::app_message::Body::Profile(profile)) if state == "pending" => self
                .introduce(
                    db,
                    &entry.group_id,
                    contact_account,
                    &sender.to_compact(),
                    &profile,
                ),
            Some(wire::app_message::Body::Text(text)) if state == "unsolicited" => {
                privacy::store_request_message(db, &received, &text)
            }
            Some(wire::app_message::Body::Text(_)) if !accepted => {
                // Not stored: someone who has not introduced themselves yet.
                Ok(None)
            }
            Some(wire::app_message::Body::Text(text)) => privacy::store_text(db, &received, &text),
            Some(wire::app_message::Body::Profile(profile)) => {
                let wanted = profile_name(&profile);
                let named_locally: bool = db.query_row(
                    "SELECT named_locally FROM contacts WHERE account_id = ?1",
                    params![contact_account],
                    |row| row.get(0),
                )?;
                if !accepted || named_locally || wanted.is_empty() || wanted == contact_name {
                    return Ok(None);
                }
                let new = db::free_contact_name(db, &wanted, contact_account)?;
                db.execute(
                    "UPDATE contacts SET name = ?1 WHERE account_id = ?2",
                    params![new, contact_account],
                )?;
                Ok(Some(Event::ContactNamed {
                    old: contact_name,
                    new,
                }))
            }
            // Nobody outside the contacts learns anything from these, nor tells us anything.
            Some(_) if !accepted => Ok(None),
            Some(wire::app_message::Body::Receipt(receipt)) => {
                privacy::on_receipt(db, &received, &receipt)
            }
            Some(wire::app_message::Body::Typing(typing)) => {
                privacy::on_typing(db, &received, typing.active)
            }
            Some(wire::app_message::Body::Presence(presence)) => {
                privacy::on_presence(db, &received, &presence)
            }
            Some(wire::app_message::Body::Timer(timer)) => {
                privacy::on_timer(db, &received, timer.seconds)
            }
            Some(wire::app_message::Body::File(file)) => files::store_file(db, &received, &file),
            Some(wire::app_message::Body::Reaction(reaction)) => {
                features::on_reaction(db, &received, &reaction)
            }
            Some(wire::app_message::Body::Edit(edit)) => features::on_edit(db, &received, &edit),
            Some(wire::app_message::Body::Delete(delete)) => {
                features::on_delete(db, &received, &delete)
            }
            // Group business means nothing between two contacts.
            Some(
                wire::app_message::Body::GroupInfo(_)
                | wire::app_message::Body::Leave(_)
                | wire::app_message::Body::Sync(_),
            )
            | None => Ok(None),
        }
    }

    /// The first message of someone who joined us through a Welcome: accepted as a contact
    /// only if it carries the token of an invite we made and have not seen used. A server
    /// that skips its own checks cannot make up contacts this way.
    fn introduce(
        &self,
        db: &Connection,
        group_id: &[u8],
        contact_account: &str,
        certificate: &[u8],
        profile: &wire::Profile,
    ) -> Result<Option<Event>, Error> {
        let wanted = profile_name(profile);
        let fallback = contact_account.get(..8).unwrap_or(contact_account);
        let name = db::free_contact_name(
            db,
            if wanted.is_empty() { fallback } else { &wanted },
            contact_account,
        )?;
        let Some(token) = find_invite(db, group_id, certificate, &profile.invite_proof)? else {
            // A stranger (they found our username, or replayed an old invite): a message
            // request, or nothing at all if requests are off. Their proof is kept: an invite
            // another device of the account made, and tells us of later, may still answer it.
            let has_proof = !profile.invite_proof.is_empty();
            let event = privacy::on_stranger(db, contact_account, &name, has_proof)?;
            if has_proof {
                db.execute(
                    "UPDATE contacts SET intro_group_id = ?2, intro_certificate = ?3, intro_proof = ?4
                     WHERE account_id = ?1 AND state IN ('unsolicited', 'held')",
                    params![contact_account, group_id, certificate, profile.invite_proof],
                )?;
            }
            return Ok(event);
        };
        self.accept_introduced(db, group_id, contact_account, &name, &token)
            .map(Some)
    }

    /// Makes a contact of whoever proved they hold our invite `token`: the invite is used once
    /// more, and we introduce ourselves, in the caller's transaction (so a crash cannot accept
    /// them without introducing us).
    pub(crate) fn accept_introduced(
        &self,
        db: &Connection,
        group_id: &[u8],
        contact_account: &str,
        name: &str,
        token: &[u8],
    ) -> Result<Event, Error> {
        let used_up: bool = db.query_row(
            "UPDATE invites SET uses_left = uses_left - 1,
             used = CASE WHEN uses_left <= 1 THEN 1 ELSE 0 END WHERE token = ?1 RETURNING used",
            params![token],
            |row| row.get(0),
        )?;
        db.execute(
            "UPDATE contacts SET state = 'accepted', name = ?1, intro_group_id = NULL,
             intro_certificate = NULL, intro_proof = NULL WHERE account_id = ?2",
            params![name, contact_account],
        )?;
        let profile = wire::app_message::Body::Profile(wire::Profile {
            name: self.name.clone(),
            invite_proof: Vec::new(),
        });
        self.queue_app_message_in(db, group_id, profile, None)?;
        if let Some(event) = groups::on_join_request(db, token, contact_account, name)? {
            self.extra_events.borrow_mut().push(event);
        }
        // Our other devices may not know the invite (made after they were linked), nor that
        // it is used up.
        let contacts = mirror::contact_item(db, contact_account)?
            .into_iter()
            .collect();
        self.queue_sync_in(
            db,
            wire::Sync {
                contacts,
                invites_used: if used_up {
                    vec![token.to_vec()]
                } else {
                    Vec::new()
                },
                ..Default::default()
            },
        )?;
        Ok(Event::ContactAdded(Contact {
            name: name.to_string(),
            account_id: contact_account.to_string(),
            verified: false,
            online: false,
            last_seen_ms: None,
            unread: 0,
        }))
    }

    // -----------------------------------------------------------------------------------------
    // Invites
    // -----------------------------------------------------------------------------------------

    /// Creates a one-time invite link. Whoever holds it can become a contact.
    pub async fn invite(&mut self) -> Result<InviteLink, Error> {
        self.create_invite(1, None, false).await
    }

    /// Creates an invite link for `uses` people; with a group, those who use it ask to join
    /// it (and become contacts, like with any invite).
    pub(crate) async fn create_invite(
        &mut self,
        uses: u32,
        group_id: Option<&[u8]>,
        approval: bool,
    ) -> Result<InviteLink, Error> {
        self.connect().await?;
        let token: [u8; 32] = random();
        self.call(Request::CreateInvite(wire::CreateInvite {
            token_hash: miyu_crypto::invite::claim_hash(&token).to_vec(),
            uses,
        }))
        .await?;
        let created_at_ms = now_ms();
        db::in_transaction(&self.db, |db| {
            db.execute(
                "INSERT INTO invites (token, created_at_ms, group_id, uses_left, approval) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![token.as_slice(), created_at_ms, group_id, uses.max(1), approval],
            )?;
            if group_id.is_none() {
                // Any device of the account can then check the introduction of whoever uses it.
                let invite = wire::SyncInvite {
                    token: token.to_vec(),
                    created_at_ms,
                    uses: uses.max(1),
                };
                self.queue_sync_in(
                    db,
                    wire::Sync {
                        invites: vec![invite],
                        ..Default::default()
                    },
                )?;
            }
            Ok(())
        })?;
        // The other devices learn of it now, or at the next connection.
        match self.flush_outbox().await {
            Err(error) if !error.is_transient() => return Err(error),
            _ => {}
        }
        Ok(InviteLink {
            server: self.server.clone(),
            account: self.account_id(),
            identity: self.keys.certificate().identity_fingerprint(),
            token,
            group: group_id.is_some(),
        })
    }

    /// Accepts an invite link: fetches the inviter's key packages with the link's token,
    /// checks them against the link's identity fingerprint, creates the encrypted conversation
    /// and introduces us by name. `name` is what we call the inviter locally.
    pub async fn accept(
        &mut self,
        link: &InviteLink,
        name: Option<&str>,
    ) -> Result<Contact, Error> {
        if link.server != self.server {
            return Err(Error::Usage(format!(
                "this invite is for server {}, but this profile uses {}; contacts on other servers are not supported yet",
                link.server.authority(),
                self.server.authority()
            )));
        }
        if link.account == self.account_id() {
            return Err(Error::Usage("this is your own invite link".into()));
        }
        let account = link.account.to_string();
        self.ensure_unknown(&account)?;
        self.connect().await?;
        let claimed = match self
            .call(Request::ClaimInvite(wire::ClaimInvite {
                token: miyu_crypto::invite::claim_secret(&link.token).to_vec(),
            }))
            .await
        {
            Ok(Reply::InviteClaimed(claimed)) => claimed,
            Ok(other) => return Err(Error::Protocol(format!("unexpected answer: {other:?}"))),
            Err(Error::Server(error)) if error.code == wire::ErrorCode::NotFound => {
                return Err(Error::Usage(
                    "this invite link was already used or has expired; ask for a new one".into(),
                ));
            }
            Err(error) => return Err(error),
        };
        let contact = self
            .start_conversation(claimed, Some(link), name, None)
            .await?;
        if link.group {
            // We asked to join their group: its Welcome is welcome, whatever `group_invites`
            // says, for a week.
            self.db.execute(
                "INSERT OR REPLACE INTO expected_groups (account_id, until_ms) VALUES (?1, ?2)",
                params![account, now_ms() + 7 * 24 * 3600 * 1000],
            )?;
        }
        Ok(contact)
    }

    /// Refuses to start a second conversation with a contact, a message request or a blocked
    /// account.
    fn ensure_unknown(&self, account: &str) -> Result<(), Error> {
        let known: Option<(String, String)> = self
            .db
            .query_row(
                "SELECT name, state FROM contacts WHERE account_id = ?1",
                params![account],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
            .optional()?;
        match known {
            Some((name, state)) if state == "unsolicited" => Err(Error::Usage(format!(
                "{name} already wrote to you: `miyu requests accept {name}`"
            ))),
            Some((_, state)) if state == "held" => {
                // Held unseen for an invite another device may have made: starting afresh
                // with them is the user's answer.
                db::in_transaction(&self.db, |db| privacy::forget_request(db, account))
            }
            Some((name, _)) => Err(Error::Usage(format!("{name} is already a contact"))),
            None if privacy::is_blocked(&self.db, account)? => {
                Err(Error::Usage("you blocked this account".into()))
            }
            None => Ok(()),
        }
    }

    /// Creates the conversation with the account whose key packages the server handed out
    /// (for an invite link, or a username lookup), and introduces us. With a `link`, the keys
    /// must match its fingerprint, and the introduction proves we hold its token; without one,
    /// we are a stranger to them and land in their message requests.
    async fn start_conversation(
        &mut self,
        claimed: wire::InviteClaimed,
        link: Option<&InviteLink>,
        name: Option<&str>,
        placeholder: Option<&str>,
    ) -> Result<Contact, Error> {
        if claimed.devices.is_empty() {
            return Err(Error::Protocol(
                "the server returned no devices for this account".into(),
            ));
        }
        let mut key_packages = Vec::new();
        let mut devices = Vec::new();
        let mut inviter_certificate = None;
        {
            let provider = Provider::new(&self.db);
            for device in &claimed.devices {
                let certificate = device
                    .certificate
                    .as_ref()
                    .ok_or_else(|| Error::Security("a device came without certificate".into()))
                    .and_then(|c| {
                        VerifiedCertificate::verify(c)
                            .map_err(|e| Error::Security(format!("device certificate: {e}")))
                    })?;
                if let Some(link) = link
                    && (certificate.identity_fingerprint() != link.identity
                        || certificate.account_id() != link.account)
                {
                    return Err(Error::Security(
                        "the server returned keys that do not match the invite link's fingerprint; not connecting".into(),
                    ));
                }
                if inviter_certificate
                    .as_ref()
                    .is_some_and(|first: &VerifiedCertificate| {
                        first.account_id() != certificate.account_id()
                    })
                {
                    return Err(Error::Security(
                        "the server returned devices of more than one account".into(),
                    ));
                }
                key_packages.push(mls::check_key_package(
                    &provider,
                    &device.key_package,
                    &certificate,
                )?);
                devices.push(certificate.device_id());
                inviter_certificate = Some(certificate);
            }
        }
        let certificate =
            inviter_certificate.ok_or_else(|| Error::Protocol("no devices".into()))?;
        let account = certificate.account_id().to_string();
        if certificate.account_id() == self.account_id() {
            return Err(Error::Usage("that is your own account".into()));
        }
        self.ensure_unknown(&account)?;
        // Our other devices take part from the start.
        if let Some(own) = self.claim_own_devices().await? {
            devices.extend(own.devices);
            key_packages.extend(own.key_packages);
        }
        let group_id: [u8; 16] = random();
        // Until they tell us their name: the placeholder (a username), else the id's start.
        let wanted = name
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .or(placeholder)
            .unwrap_or(&account[..8])
            .to_string();
        let named_locally = name.is_some();
        let contact = db::in_transaction(&self.db, |db| {
            let announce =
                self.create_conversation_group(db, &group_id, &devices, &key_packages)?;
            let contact_name = db::free_contact_name(db, &wanted, &account)?;
            db.execute(
                "INSERT INTO contacts (account_id, name, named_locally, certificate, added_at_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![account, contact_name, named_locally, certificate.to_compact(), now_ms()],
            )?;
            db.execute(
                "INSERT INTO conversations (group_id, contact, scope, announce, last_update_ms) VALUES (?1, ?2, ?2, ?3, ?4)",
                params![group_id.as_slice(), account, announce.encode_to_vec(), now_ms()],
            )?;
            self.share_contact_in(db, &account)?;
            Ok(Contact {
                name: contact_name,
                account_id: account.clone(),
                verified: false,
                online: false,
                last_seen_ms: None,
                unread: 0,
            })
        })?;
        let invite_proof = link.map_or_else(Vec::new, |link| {
            miyu_crypto::invite::introduction_proof(
                &link.token,
                &group_id,
                &self.keys.certificate().to_compact(),
            )
            .to_vec()
        });
        let profile = wire::app_message::Body::Profile(wire::Profile {
            name: self.name.clone(),
            invite_proof,
        });
        self.queue_app_message(&group_id, profile, None)?;
        self.announce_pending_groups().await?;
        self.flush_outbox().await?;
        Ok(contact)
    }

    /// Creates the MLS group of a conversation with the devices of `key_packages` (its small
    /// tree travels in the Welcome), in the caller's transaction; returns the `CreateGroup`
    /// that announces it to the server (`announce_pending_groups` sends it).
    fn create_conversation_group(
        &self,
        db: &Connection,
        group_id: &[u8],
        devices: &[miyu_proto::DeviceId],
        key_packages: &[mls::KeyPackage],
    ) -> Result<wire::CreateGroup, Error> {
        let created = mls::create_group(
            &Provider::new(db),
            &self.keys,
            group_id,
            key_packages,
            mls::Tree::InWelcome,
        )?;
        let welcome = if devices.is_empty() {
            Vec::new()
        } else {
            wire::WelcomePackage {
                welcome: created.welcome,
                ..Default::default()
            }
            .encode_to_vec()
        };
        Ok(wire::CreateGroup {
            group_id: group_id.to_vec(),
            epoch: created.epoch,
            member_devices: devices.iter().map(|d| d.as_bytes().to_vec()).collect(),
            welcomes: Vec::new(),
            welcome,
            posting_key: Vec::new(),
        })
    }

    /// Sends CreateGroup for conversations the server does not know yet.
    async fn announce_pending_groups(&mut self) -> Result<(), Error> {
        let pending: Vec<(Vec<u8>, Vec<u8>)> = {
            let mut statement = self.db.prepare(
                "SELECT group_id, announce FROM conversations WHERE announce IS NOT NULL",
            )?;
            statement
                .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?
                .collect::<Result<_, _>>()?
        };
        for (group_id, announce) in pending {
            let create = wire::CreateGroup::decode(announce.as_slice())
                .map_err(|error| Error::Protocol(format!("stored group announcement: {error}")))?;
            match self.call(Request::CreateGroup(create)).await {
                Ok(_) => {}
                // Announced before a crash took the answer away.
                Err(Error::Server(error)) if error.code == wire::ErrorCode::AlreadyExists => {}
                Err(error) if error.is_transient() => return Err(error),
                Err(error) => {
                    self.mark_broken(&group_id, &error)?;
                    continue;
                }
            }
            self.db.execute(
                "UPDATE conversations SET announce = NULL WHERE group_id = ?1",
                params![group_id],
            )?;
        }
        Ok(())
    }

    // -----------------------------------------------------------------------------------------
    // Sending
    // -----------------------------------------------------------------------------------------

    /// Encrypts an application message and puts it in the outbox, in one transaction. Returns
    /// the message row when the message is one the user sees.
    fn queue_app_message(
        &self,
        group_id: &[u8],
        body: wire::app_message::Body,
        shown: Option<&str>,
    ) -> Result<Option<i64>, Error> {
        db::in_transaction(&self.db, |db| {
            self.queue_app_message_in(db, group_id, body, shown)
        })
    }

    /// [`queue_app_message`](Self::queue_app_message) inside the caller's transaction.
    fn queue_app_message_in(
        &self,
        db: &Connection,
        group_id: &[u8],
        body: wire::app_message::Body,
        shown: Option<&str>,
    ) -> Result<Option<i64>, Error> {
        if groups::is_group_id(group_id) {
            groups::check_can_send(db, group_id, &self.account_id().to_string(), &body)?;
        }
        // Texts disappear under the conversation's timer; the notices that set it up do not,
        // or a peer offline for longer would never learn of the timer.
        let timer_s: u32 = db
            .prepare_cached("SELECT timer_s FROM conversations WHERE group_id = ?1")?
            .query_row(params![group_id], |row| row.get(0))?;
        let expires_in_s = match body {
            wire::app_message::Body::Text(_)
            | wire::app_message::Body::File(_)
            | wire::app_message::Body::Edit(_) => timer_s,
            _ => 0,
        };
        let kind = match body {
            wire::app_message::Body::Timer(_) => "timer",
            wire::app_message::Body::File(_) => "file",
            _ => "text",
        };
        let message = wire::AppMessage {
            message_id: random::<16>().to_vec(),
            sent_at_ms: now_ms(),
            expires_in_s,
            body: Some(body),
        };
        let expires_at_ms =
            (expires_in_s > 0).then(|| message.sent_at_ms + u64::from(expires_in_s) * 1000);
        let plaintext = message.encode_to_vec();
        let provider = Provider::new(db);
        let mut group = mls::load_group(&provider, group_id)?
            .ok_or_else(|| Error::Usage("conversation state is missing".into()))?;
        let ciphertext = mls::encrypt(&provider, &self.keys, &mut group, &plaintext)?;
        let epoch = group.epoch().as_u64();
        let row = match shown {
            Some(text) => {
                let hash: [u8; 32] = Sha256::digest(&ciphertext).into();
                db.prepare_cached(
                    "INSERT INTO messages (group_id, message_id, outgoing, body, sent_at_ms, received_at_ms, state, ciphertext_hash, kind, expires_at_ms)
                     VALUES (?1, ?2, 1, ?3, ?4, ?4, 'pending', ?5, ?6, ?7)",
                )?
                .execute(params![group_id, message.message_id, text, message.sent_at_ms, hash.as_slice(), kind, expires_at_ms])?;
                Some(db.last_insert_rowid())
            }
            None => None,
        };
        db.prepare_cached(
            "INSERT INTO outbox (group_id, epoch, ciphertext, plaintext, message_row, expires_at_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )?
        .execute(params![group_id, epoch, ciphertext, plaintext, row, expires_at_ms])?;
        Ok(row)
    }

    /// Posts what the outbox holds, oldest first; each entry leaves the outbox only once the
    /// server has acknowledged it.
    async fn flush_outbox(&mut self) -> Result<(), Error> {
        loop {
            let next: Option<OutboxRow> = self
                .db
                .prepare_cached(
                    "SELECT o.id, o.group_id, o.epoch, o.ciphertext, o.message_row, o.expires_at_ms FROM outbox o
                     JOIN conversations c ON c.group_id = o.group_id
                     WHERE c.broken IS NULL AND c.posting_refused = 0 ORDER BY o.id LIMIT 1",
                )?
                .query_row(
                    [],
                    |row| {
                        Ok((
                            row.get(0)?,
                            row.get(1)?,
                            row.get(2)?,
                            row.get(3)?,
                            row.get(4)?,
                            row.get(5)?,
                        ))
                    },
                )
                .optional()?;
            let Some((id, group_id, epoch, ciphertext, message_row, expires_at_ms)) = next else {
                if let Some((_, connection)) = self.unattributed.take() {
                    connection.close().await;
                }
                return self.finish_leaving().await;
            };
            if expires_at_ms.is_some_and(|at| at <= now_ms()) {
                // It disappeared before it could be sent.
                self.db
                    .execute("DELETE FROM outbox WHERE id = ?1", params![id])?;
                continue;
            }
            let expires_at = expires_at_ms.map_or(0, |at| at.div_ceil(1000));
            let result = if groups::is_group_id(&group_id) {
                // In a group the server is not told which member posts (PROTOCOL.md §4.4).
                match self
                    .post_unattributed(&group_id, epoch, ciphertext, expires_at)
                    .await
                {
                    Err(Error::Server(error)) if error.code == wire::ErrorCode::Forbidden => {
                        // The server holds no (or a wrong) posting key for this epoch. Posting
                        // as ourselves would tell it who posts: hold the group's outbox until
                        // a key update registers a fresh key (`refresh_posting_keys`).
                        tracing::warn!(
                            "the server refused the group's posting key; its messages wait for a key update"
                        );
                        self.db.execute(
                            "UPDATE conversations SET posting_refused = 1 WHERE group_id = ?1",
                            params![group_id],
                        )?;
                        continue;
                    }
                    other => other,
                }
            } else {
                self.post(
                    &group_id,
                    epoch,
                    wire::EntryKind::Application,
                    ciphertext,
                    expires_at,
                )
                .await
            };
            match result {
                Ok(Reply::Posted(posted)) => {
                    // If a power cut undid this, the outbox would post the same ciphertext
                    // again, which receivers drop (MLS refuses a used generation): no need to
                    // wait for the disk here.
                    db::in_relaxed_transaction(&self.db, |db| {
                        db.prepare_cached("DELETE FROM outbox WHERE id = ?1")?
                            .execute(params![id])?;
                        if let Some(row) = message_row {
                            db.prepare_cached(
                                "UPDATE messages SET state = 'sent', seq = ?1 WHERE id = ?2",
                            )?
                            .execute(params![posted.seq, row])?;
                        }
                        Ok(())
                    })?;
                }
                Ok(other) => return Err(Error::Protocol(format!("unexpected answer: {other:?}"))),
                Err(Error::Server(error)) if error.code == wire::ErrorCode::EpochMismatch => {
                    // Someone committed first: process their commit, then encrypt again for
                    // the new epoch. Receivers drop repeats by message id.
                    match self.wait_for_epoch(&group_id, error.current_epoch).await {
                        Ok(()) => self.reencrypt_outbox_row(id)?,
                        Err(error) if error.is_transient() => return Err(error),
                        Err(error) => self.mark_broken(&group_id, &error)?,
                    }
                }
                Err(error) if error.is_transient() => return Err(error),
                // One conversation that cannot be posted to must not hold up the others.
                Err(error) => self.mark_broken(&group_id, &error)?,
            }
        }
    }

    /// Takes a conversation out of service: its outbox waits, and sending to it says why.
    fn mark_broken(&self, group_id: &[u8], error: &Error) -> Result<(), Error> {
        tracing::warn!("a conversation is out of service: {error}");
        self.db.execute(
            "UPDATE conversations SET broken = ?1 WHERE group_id = ?2",
            params![error.to_string(), group_id],
        )?;
        Ok(())
    }

    /// Posts an application message to a group on a connection that never authenticated,
    /// signed with the epoch's posting key: the server checks it comes from a member without
    /// learning which.
    async fn post_unattributed(
        &mut self,
        group_id: &[u8],
        epoch: u64,
        payload: Vec<u8>,
        expires_at: u64,
    ) -> Result<Reply, Error> {
        let signature = {
            let provider = Provider::new(&self.db);
            let group = mls::load_group(&provider, group_id)?
                .ok_or_else(|| Error::Usage("conversation state is missing".into()))?;
            if group.epoch().as_u64() != epoch {
                // Stale: let the server say which epoch it is at, as for any post.
                [0u8; 64]
            } else {
                mls::PostingKey::current(&provider, &group)?
                    .sign_post(group_id, epoch, expires_at, &payload)
            }
        };
        let request = Request::GroupPost(wire::GroupPost {
            group_id: group_id.to_vec(),
            epoch,
            payload,
            expires_at,
            signature: signature.to_vec(),
        });
        if self
            .unattributed
            .as_ref()
            .is_some_and(|(group, _)| group.as_slice() != group_id)
            && let Some((_, connection)) = self.unattributed.take()
        {
            connection.close().await;
        }
        if self.unattributed.is_none() {
            let connection = net::Connection::open(&self.server, self.proxy.as_ref()).await?;
            self.unattributed = Some((group_id.to_vec(), connection));
        }
        let (_, connection) = self
            .unattributed
            .as_mut()
            .ok_or_else(|| Error::Network("not connected".into()))?;
        match tokio::time::timeout(REQUEST_TIMEOUT, connection.call(request)).await {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(error)) => {
                if error.is_transient() {
                    self.unattributed = None;
                }
                Err(error)
            }
            Err(_) => {
                self.unattributed = None;
                Err(Error::Network("the server stopped answering".into()))
            }
        }
    }

    async fn post(
        &mut self,
        group_id: &[u8],
        epoch: u64,
        kind: wire::EntryKind,
        payload: Vec<u8>,
        expires_at: u64,
    ) -> Result<Reply, Error> {
        self.call(Request::Post(wire::Post {
            group_id: group_id.to_vec(),
            epoch,
            kind: kind as i32,
            payload,
            expires_at,
            next_posting_key: Vec::new(),
        }))
        .await
    }

    fn reencrypt_outbox_row(&self, id: i64) -> Result<(), Error> {
        db::in_transaction(&self.db, |db| {
            let (group_id, plaintext, message_row): (Vec<u8>, Vec<u8>, Option<i64>) = db
                .query_row(
                    "SELECT group_id, plaintext, message_row FROM outbox WHERE id = ?1",
                    params![id],
                    |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)),
                )?;
            let provider = Provider::new(db);
            let mut group = mls::load_group(&provider, &group_id)?
                .ok_or_else(|| Error::Usage("conversation state is missing".into()))?;
            let ciphertext = mls::encrypt(&provider, &self.keys, &mut group, &plaintext)?;
            let hash: [u8; 32] = Sha256::digest(&ciphertext).into();
            db.execute(
                "UPDATE outbox SET epoch = ?1, ciphertext = ?2 WHERE id = ?3",
                params![group.epoch().as_u64(), ciphertext, id],
            )?;
            if let Some(row) = message_row {
                db.execute(
                    "UPDATE messages SET ciphertext_hash = ?1 WHERE id = ?2",
                    params![hash.as_slice(), row],
                )?;
            }
            Ok(())
        })
    }

    fn local_epoch(&self, group_id: &[u8]) -> Result<u64, Error> {
        let provider = Provider::new(&self.db);
        let group = mls::load_group(&provider, group_id)?
            .ok_or_else(|| Error::Usage("conversation state is missing".into()))?;
        Ok(group.epoch().as_u64())
    }

    /// Processes pushed entries until the conversation has reached `epoch` locally.
    async fn wait_for_epoch(&mut self, group_id: &[u8], epoch: u64) -> Result<(), Error> {
        let deadline = tokio::time::Instant::now() + REQUEST_TIMEOUT;
        while self.local_epoch(group_id)? < epoch {
            let frame = tokio::time::timeout_at(deadline, self.receive())
                .await
                .map_err(|_| {
                    Error::Protocol(
                        "the conversation moved to a new epoch this device cannot follow".into(),
                    )
                })??;
            self.handle_frame(frame).await?;
        }
        Ok(())
    }

    /// Processes the backlog the server pushes after connecting.
    async fn catch_up(&mut self) -> Result<(), Error> {
        while !self.session()?.caught_up {
            let frame = self.receive().await?;
            self.handle_frame(frame).await?;
        }
        Ok(())
    }

    /// Once caught up, a commit of ours that is still pending was never accepted: whatever the
    /// server took for that epoch has been processed already.
    fn discard_unaccepted_commits(&self) -> Result<(), Error> {
        let pending: Vec<Vec<u8>> = {
            let mut statement = self.db.prepare(
                "SELECT group_id FROM conversations WHERE pending_commit_hash IS NOT NULL",
            )?;
            statement
                .query_map([], |row| row.get(0))?
                .collect::<Result<_, _>>()?
        };
        for group_id in pending {
            db::in_transaction(&self.db, |db| {
                settle_own_commit(db, &group_id, Verdict::Lost)
            })?;
        }
        Ok(())
    }

    /// Replaces this device's keys in the conversation with `contact` (an MLS self-update),
    /// so that whoever might have stolen the old ones can no longer read what follows. Runs
    /// by itself every week before sending.
    pub async fn update_keys(&mut self, contact: &str) -> Result<(), Error> {
        let (_, group_id) = self.conversation_of(contact)?;
        self.update_keys_of(&group_id).await
    }

    /// Key updates for the groups whose posting key the server refused: each registers a
    /// fresh key, and their held messages go out.
    async fn refresh_posting_keys(&mut self) -> Result<(), Error> {
        let refused: Vec<Vec<u8>> = {
            let mut statement = self.db.prepare(
                // Groups we are no longer in have nothing to renew.
                "SELECT c.group_id FROM conversations c JOIN groups g ON g.group_id = c.group_id
                 WHERE c.posting_refused = 1 AND c.broken IS NULL AND g.state = 'active'",
            )?;
            statement
                .query_map([], |row| row.get(0))?
                .collect::<Result<_, _>>()?
        };
        if refused.is_empty() {
            return Ok(());
        }
        for group_id in refused {
            match self.update_keys_of(&group_id).await {
                Err(error) if error.is_transient() => return Err(error),
                Err(error) => tracing::warn!("could not register a new posting key: {error}"),
                Ok(()) => {}
            }
        }
        self.flush_outbox().await
    }

    async fn update_keys_of(&mut self, group_id: &[u8]) -> Result<(), Error> {
        let group_id = group_id.to_vec();
        self.connect().await?;
        self.catch_up().await?;
        for _ in 0..COMMIT_ATTEMPTS {
            let commit = db::in_transaction(&self.db, |db| {
                let provider = Provider::new(db);
                let mut group = mls::load_group(&provider, &group_id)?
                    .ok_or_else(|| Error::Usage("conversation state is missing".into()))?;
                if mls::has_pending_commit(&group) {
                    mls::discard_own_commit(&provider, &mut group)?;
                }
                let epoch = group.epoch().as_u64();
                let commit = mls::self_update(&provider, &self.keys, &mut group)?;
                let next_posting_key = mls::PostingKey::next(&provider, &group)?
                    .map(|key| key.public().to_vec())
                    .unwrap_or_default();
                let hash: [u8; 32] = Sha256::digest(&commit).into();
                db.execute(
                    "UPDATE conversations SET pending_commit_hash = ?1 WHERE group_id = ?2",
                    params![hash.as_slice(), group_id],
                )?;
                Ok((commit, epoch, next_posting_key))
            })?;
            let (commit, epoch, next_posting_key) = commit;
            let result = self
                .call(Request::Post(wire::Post {
                    group_id: group_id.clone(),
                    epoch,
                    kind: wire::EntryKind::Commit as i32,
                    payload: commit,
                    expires_at: 0,
                    next_posting_key,
                }))
                .await;
            match result {
                Ok(Reply::Posted(_)) => {
                    tracing::debug!("our commit at epoch {epoch} was accepted");
                    db::in_transaction(&self.db, |db| {
                        settle_own_commit(db, &group_id, Verdict::Accepted)?;
                        db.execute(
                            "UPDATE conversations SET last_update_ms = ?1, posting_refused = 0 WHERE group_id = ?2",
                            params![now_ms(), group_id],
                        )?;
                        Ok(())
                    })?;
                    return Ok(());
                }
                Ok(other) => return Err(Error::Protocol(format!("unexpected answer: {other:?}"))),
                Err(Error::Server(error)) if error.code == wire::ErrorCode::EpochMismatch => {
                    tracing::debug!(
                        "our commit at epoch {epoch} lost to epoch {}",
                        error.current_epoch
                    );
                    // Another member won this epoch: drop our commit, follow theirs, retry.
                    db::in_transaction(&self.db, |db| {
                        settle_own_commit(db, &group_id, Verdict::Lost)
                    })?;
                    self.wait_for_epoch(&group_id, error.current_epoch).await?;
                }
                Err(error) => return Err(error),
            }
        }
        Err(Error::Network(
            "the conversation kept changing while updating keys; try again".into(),
        ))
    }

    /// Sends a text message to a contact; returns once the server has durably stored it.
    pub async fn send(&mut self, contact: &str, text: &str) -> Result<MessageView, Error> {
        self.send_text(
            contact,
            wire::Text {
                body: text.to_string(),
                ..Default::default()
            },
        )
        .await
    }

    /// Sends a text (a reply or a forward, too); returns once the server has stored it.
    pub(crate) async fn send_text(
        &mut self,
        contact: &str,
        message: wire::Text,
    ) -> Result<MessageView, Error> {
        let text = message.body.clone();
        let text = text.as_str();
        if text.is_empty() {
            return Err(Error::Usage("the message is empty".into()));
        }
        let (_, group_id) = self.conversation_of(contact)?;
        let mut message = message;
        if groups::is_group_id(&group_id) {
            message.mentions = groups::mentions_in(&self.db, &group_id, text, self.account_id())?;
        }
        let (last_update_ms, pending_commit, broken, posting_refused): (u64, bool, Option<String>, bool) = self.db.query_row(
            "SELECT last_update_ms, pending_commit_hash IS NOT NULL, broken, posting_refused FROM conversations WHERE group_id = ?1",
            params![group_id],
            |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?)),
        )?;
        if let Some(reason) = broken {
            return Err(Error::Protocol(format!(
                "the conversation with {contact} fell out of sync and cannot be used: {reason}"
            )));
        }
        if pending_commit {
            // A key update was interrupted; its fate is known once caught up. Until then
            // nothing can be encrypted, so a failure here means the message was not queued.
            self.connect().await?;
            self.catch_up().await?;
        }
        if posting_refused
            || now_ms().saturating_sub(last_update_ms) > KEY_UPDATE_INTERVAL.as_millis() as u64
        {
            // Best effort: offline, the message still goes into the outbox, and the keys are
            // updated next time.
            match self.update_keys(contact).await {
                Err(error) if !error.is_transient() => return Err(error),
                _ => {}
            }
        }
        let reply_to = (!message.reply_to.is_empty()).then(|| message.reply_to.clone());
        let forwarded = message.forwarded;
        let row = db::in_transaction(&self.db, |db| {
            let row = self.queue_app_message_in(
                db,
                &group_id,
                wire::app_message::Body::Text(message),
                Some(text),
            )?;
            if reply_to.is_some() || forwarded {
                db.execute(
                    "UPDATE messages SET reply_to = ?1, forwarded = ?2 WHERE id = ?3",
                    params![reply_to, forwarded, row],
                )?;
            }
            Ok(row)
        })?;
        let queued = |error: Error| {
            if error.is_transient() {
                Error::Queued(error.to_string())
            } else {
                error
            }
        };
        self.connect().await.map_err(queued)?;
        self.flush_outbox().await.map_err(queued)?;
        // A refused posting key holds the group's messages: register a new one and try again.
        self.refresh_posting_keys().await.map_err(queued)?;
        let (state, sent_at_ms, expires_at_ms): (String, u64, Option<u64>) = self.db.query_row(
            "SELECT state, sent_at_ms, expires_at_ms FROM messages WHERE id = ?1",
            params![row],
            |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)),
        )?;
        if state == "pending" {
            let (reason, held): (Option<String>, bool) = self.db.query_row(
                "SELECT broken, posting_refused FROM conversations WHERE group_id = ?1",
                params![group_id],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )?;
            if held && reason.is_none() {
                return Err(Error::Queued(
                    "the server refuses the group's posting key; the message waits for a key update and goes out with the next sync".into(),
                ));
            }
            return Err(Error::Protocol(format!(
                "the conversation with {contact} fell out of sync; the message was not sent: {}",
                reason.unwrap_or_default()
            )));
        }
        Ok(MessageView {
            id: row.unwrap_or_default(),
            contact: contact.to_string(),
            from: "me".into(),
            outgoing: true,
            body: text.to_string(),
            sent_at_ms,
            state: MessageState::Sent,
            kind: MessageKind::Text,
            expires_at_ms,
            ..Default::default()
        })
    }

    /// The conversation called `name`: a contact's (the newest), else a group's. Returns its
    /// scope (the contact's account id, or the group's `group:` name) and group id.
    pub(crate) fn conversation_of(&self, name: &str) -> Result<(String, Vec<u8>), Error> {
        let contact: Option<(String, Vec<u8>)> = self
            .db
            .query_row(
                "SELECT c.account_id, v.group_id FROM contacts c JOIN conversations v ON v.contact = c.account_id
                 WHERE c.name = ?1 AND c.state = 'accepted' ORDER BY v.rowid DESC LIMIT 1",
                params![name],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
            .optional()?;
        if let Some(found) = contact {
            return Ok(found);
        }
        let group: Option<Vec<u8>> = self
            .db
            .query_row(
                "SELECT group_id FROM groups WHERE name = ?1 AND state IN ('active', 'left', 'removed')",
                params![name],
                |row| row.get(0),
            )
            .optional()?;
        match group {
            Some(group_id) => Ok((groups::scope(&group_id), group_id)),
            None => Err(Error::Usage(format!(
                "no contact or group called {name:?}; `miyu contacts` and `miyu groups` list them"
            ))),
        }
    }

    pub fn contacts(&self) -> Result<Vec<Contact>, Error> {
        let settings = self.settings()?;
        let mut statement = self.db.prepare(&format!(
            "SELECT c.name, c.account_id, c.verified, c.online, c.last_seen_ms, c.presence_at_ms,
                 (SELECT COUNT(*) FROM messages m WHERE {} AND m.group_id IN
                     (SELECT group_id FROM conversations WHERE scope = c.account_id))
                 FROM contacts c WHERE c.state = 'accepted' ORDER BY c.name",
            mirror::UNREAD
        ))?;
        let contacts = statement
            .query_map([], |row| {
                let (online, last_seen_ms) =
                    privacy::shown_presence(&settings, row.get(3)?, row.get(4)?, row.get(5)?);
                Ok(Contact {
                    name: row.get(0)?,
                    account_id: row.get(1)?,
                    verified: row.get(2)?,
                    online,
                    last_seen_ms,
                    unread: row.get(6)?,
                })
            })?
            .collect::<Result<_, _>>()?;
        Ok(contacts)
    }

    /// Renames a contact locally; their own choice of name no longer overrides it.
    pub fn rename(&self, old: &str, new: &str) -> Result<(), Error> {
        let new = new.trim();
        if new.is_empty() || new.chars().count() > 64 || new.chars().any(char::is_control) {
            return Err(Error::Usage(
                "a name is 1 to 64 printable characters".into(),
            ));
        }
        let taken: Option<String> = self
            .db
            .query_row(
                "SELECT account_id FROM contacts WHERE name = ?1",
                params![new],
                |row| row.get(0),
            )
            .optional()?;
        if taken.is_some() {
            return Err(Error::Usage(format!(
                "another contact is already called {new:?}"
            )));
        }
        db::in_transaction(&self.db, |db| {
            let account: Option<String> = db
                .query_row(
                    "UPDATE contacts SET name = ?1, named_locally = 1 WHERE name = ?2 AND state = 'accepted'
                     RETURNING account_id",
                    params![new, old],
                    |row| row.get(0),
                )
                .optional()?;
            let account =
                account.ok_or_else(|| Error::Usage(format!("no contact called {old:?}")))?;
            self.share_contact_in(db, &account)?;
            Ok(())
        })
    }

    /// Marks a contact as verified, after the safety numbers were compared out of band.
    pub fn verify(&self, contact: &str) -> Result<(), Error> {
        db::in_transaction(&self.db, |db| {
            let account: Option<String> = db
                .query_row(
                    "UPDATE contacts SET verified = 1 WHERE name = ?1 AND state = 'accepted'
                     RETURNING account_id",
                    params![contact],
                    |row| row.get(0),
                )
                .optional()?;
            let account =
                account.ok_or_else(|| Error::Usage(format!("no contact called {contact:?}")))?;
            self.share_contact_in(db, &account)?;
            Ok(())
        })
    }

    /// The conversation with a contact, oldest first, without messages whose time is up.
    pub fn messages(&self, contact: &str) -> Result<Vec<MessageView>, Error> {
        // All conversations with the contact: a contact who started over (a new group, after
        // losing their state) keeps the history of the old one.
        let (scope, _) = self.conversation_of(contact)?;
        privacy::history(&self.db, &scope, contact)
    }

    /// The safety number shared with a contact: compare it in person to rule out a server that
    /// substituted keys.
    pub fn safety_number(&self, contact: &str) -> Result<String, Error> {
        let compact: Vec<u8> = self
            .db
            .query_row(
                "SELECT certificate FROM contacts WHERE name = ?1 AND state = 'accepted'",
                params![contact],
                |row| row.get(0),
            )
            .optional()?
            .ok_or_else(|| Error::Usage(format!("no contact called {contact:?}")))?;
        let theirs = VerifiedCertificate::from_compact(&compact)
            .map_err(|error| Error::Security(format!("stored certificate: {error}")))?;
        Ok(miyu_crypto::safety::safety_number(
            self.keys.certificate(),
            &theirs,
        ))
    }
}
