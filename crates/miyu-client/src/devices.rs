//! The account's devices: linking a new one (with the account's history), listing them and
//! revoking one (PROTOCOL.md §10.10).
//!
//! The new device shows a link code; a device holding the account's identity key approves it
//! by certifying the code's device key, which no one else can do. The answers travel sealed to
//! the code's key through server mailboxes named by the code's secret, which the server never
//! sees. The approving device then adds the new device to every conversation (MLS commits, as
//! for any member) and hands it the history, sealed as a file in a blob of the account.

use std::time::{Duration, Instant};

use miyu_crypto::file::{self as sealed_file, FileKey, Layout};
use miyu_crypto::identity::AccountKeys;
use miyu_crypto::link::{self, NewDevice, Step};
use miyu_crypto::mls::{self, Provider};
use miyu_proto::blob::BlobId;
use miyu_proto::cert::VerifiedCertificate;
use miyu_proto::link::valid_device_name;
use miyu_proto::wire::{self, client_frame::Body as Request, server_frame::Body as Reply};
use miyu_proto::{DeviceId, LinkCode, ServerAddress};
use prost::Message as _;
use rusqlite::{Connection, OptionalExtension, params};

use crate::files::BlobClient;
use crate::groups::{Claimed, Gone};
use crate::net::{self, Proxy};
use crate::vault::Protection;
use crate::{
    Client, Error, NewAccount, claim_new_profile, db, discard_new_profile, history, now_ms,
};

/// How long either side of a link waits for the other by default.
pub const LINK_WAIT: Duration = Duration::from_secs(600);
/// How often a waiting side asks the server again (it allows two a second).
const LINK_POLL: Duration = Duration::from_millis(600);

/// One device of the account, as `miyu devices` lists it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DeviceView {
    pub id: String,
    /// The name given when it was linked, if this device knows it.
    pub name: Option<String>,
    /// Days since the Unix epoch.
    pub created_day: u64,
    pub last_active_day: u64,
    pub this_device: bool,
}

/// What a link did.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Linked {
    pub device: String,
    pub name: String,
    /// Conversations the new device was added to (approving side), or received (new side).
    pub conversations: usize,
    pub messages: usize,
}

/// Takes what a mailbox holds, asking again until `deadline`. The connection has not
/// authenticated, so the server closes it now and then: it is opened again.
async fn take_mailbox(
    server: &ServerAddress,
    proxy: Option<&Proxy>,
    connection: &mut Option<net::Connection>,
    mailbox: [u8; 32],
    deadline: Instant,
) -> Result<Vec<u8>, Error> {
    loop {
        if connection.is_none() {
            *connection = Some(net::Connection::open(server, proxy).await?);
        }
        let Some(open) = connection.as_mut() else {
            continue;
        };
        let asked = open.call(Request::LinkTake(wire::LinkTake {
            mailbox: mailbox.to_vec(),
        }));
        match tokio::time::timeout(Duration::from_secs(30), asked).await {
            Ok(Ok(Reply::LinkPayload(payload))) => return Ok(payload.payload),
            Ok(Ok(other)) => {
                return Err(Error::Protocol(format!("unexpected answer: {other:?}")));
            }
            Ok(Err(Error::Server(error)))
                if matches!(
                    error.code,
                    wire::ErrorCode::NotFound | wire::ErrorCode::RateLimited
                ) => {}
            // Closed by the server, or cut off: open another.
            Ok(Err(Error::Network(_))) | Err(_) => *connection = None,
            Ok(Err(error)) => return Err(error),
        }
        if Instant::now() >= deadline {
            return Err(Error::Usage(
                "no device of the account answered the link code in time; run `miyu link` again"
                    .into(),
            ));
        }
        tokio::time::sleep(LINK_POLL).await;
    }
}

fn link_error(error: link::LinkError) -> Error {
    Error::Security(format!("the link's answer: {error}"))
}

impl Client {
    /// On a new device: makes `profile` a device of an existing account. Shows the link code
    /// through `show`, waits (up to `wait`) for a device of the account to approve it, then
    /// registers, takes in the account's history and joins every conversation.
    pub async fn link(
        profile: &std::path::Path,
        server: ServerAddress,
        device_name: &str,
        protection: &Protection,
        proxy: Option<Proxy>,
        wait: Duration,
        show: impl FnOnce(&LinkCode),
    ) -> Result<(Self, Linked), Error> {
        let device_name = device_name.trim();
        if !valid_device_name(device_name) {
            return Err(Error::Usage(
                "a device name is 1 to 64 bytes of printable text".into(),
            ));
        }
        let (lock, path) = claim_new_profile(profile)?;
        let new = NewDevice::generate().map_err(link_error)?;
        show(&new.code(device_name));
        let deadline = Instant::now() + wait;
        let mut connection = None;
        let sealed = take_mailbox(
            &server,
            proxy.as_ref(),
            &mut connection,
            new.mailbox(Step::Certificate),
            deadline,
        )
        .await?;
        let package = wire::LinkPackage::decode(
            new.open(Step::Certificate, &sealed)
                .map_err(link_error)?
                .as_slice(),
        )
        .map_err(|error| Error::Protocol(format!("the link's answer is malformed: {error}")))?;
        let certificate = package
            .certificate
            .as_ref()
            .ok_or_else(|| Error::Protocol("the link's answer holds no certificate".into()))
            .and_then(|certificate| {
                VerifiedCertificate::verify(certificate)
                    .map_err(|error| Error::Security(format!("the link's certificate: {error}")))
            })?;
        let keys = AccountKeys::linked(&*new.device_secret(), certificate)
            .map_err(|error| Error::Security(format!("the link's certificate: {error}")))?;
        let account_name = crate::profile_name(&wire::Profile {
            name: package.account_name.clone(),
            invite_proof: Vec::new(),
        });
        let account_name = if account_name.is_empty() {
            "me".to_string()
        } else {
            account_name
        };
        let created = async {
            let key = crate::vault::create(profile, protection)?;
            let account = NewAccount {
                keys,
                server: server.clone(),
                name: &account_name,
                proxy,
                holding_deliveries: true,
            };
            let client = Self::create_account(&path, &key, lock, account).await?;
            client.db.execute(
                "INSERT OR REPLACE INTO devices (device_id, name) VALUES (?1, ?2)",
                params![
                    client.keys.certificate().device_id().to_string(),
                    device_name
                ],
            )?;
            Ok::<_, Error>(client)
        }
        .await;
        let mut client = match created {
            Ok(client) => client,
            Err(error) => {
                discard_new_profile(profile, &path);
                return Err(error);
            }
        };
        // Registered: the other device now adds this one to every conversation, then says
        // where the history is. What the server pushes meanwhile waits for the history.
        client.disconnect().await;
        // The other device now has a conversation to add this one to, at a time, and the
        // history to send: a wait of its own.
        let sealed = take_mailbox(
            &server,
            proxy.as_ref(),
            &mut connection,
            new.mailbox(Step::History),
            Instant::now() + wait,
        )
        .await?;
        if let Some(connection) = connection {
            connection.close().await;
        }
        let pointer = wire::LinkHistory::decode(
            new.open(Step::History, &sealed)
                .map_err(link_error)?
                .as_slice(),
        )
        .map_err(|error| Error::Protocol(format!("the link's answer is malformed: {error}")))?;
        let imported = client.take_history(&pointer).await?;
        client.holding_deliveries = false;
        client.sync(Duration::ZERO).await?;
        let linked = Linked {
            device: client.keys.certificate().device_id().to_string(),
            name: device_name.to_string(),
            conversations: imported.conversations,
            messages: imported.messages,
        };
        Ok((client, linked))
    }

    async fn take_history(
        &mut self,
        pointer: &wire::LinkHistory,
    ) -> Result<history::Imported, Error> {
        let malformed = || Error::Protocol("the link's history pointer is malformed".into());
        let blob_id = BlobId(
            pointer
                .blob_id
                .as_slice()
                .try_into()
                .map_err(|_| malformed())?,
        );
        let key = FileKey::from_bytes(pointer.key.as_slice().try_into().map_err(|_| malformed())?);
        let length = Layout::new(pointer.size, sealed_file::DEFAULT_CHUNK)
            .map_err(|error| Error::Security(format!("the account's history: {error}")))?
            .ciphertext_len();
        let ciphertext = BlobClient::new(&self.keys, &self.server, self.proxy)
            .download_whole(&blob_id, length)
            .await?;
        let bytes = zeroize::Zeroizing::new(
            sealed_file::open_all(&key, pointer.size, &ciphertext)
                .map_err(|error| Error::Security(format!("the account's history: {error}")))?,
        );
        history::import(&self.db, &bytes)
    }

    /// On a device holding the account's identity key: approves the device that shows `code`.
    /// Certifies its key, waits (up to `wait`) for it to register, adds it to every
    /// conversation this device is in and hands it the history.
    pub async fn approve_device(
        &mut self,
        code: &LinkCode,
        wait: Duration,
    ) -> Result<Linked, Error> {
        let certificate = self.keys.certify_device(&code.device_key).map_err(|_| {
            Error::Usage(
                "only the account's first device (which holds its identity key) links devices"
                    .into(),
            )
        })?;
        let device = certificate.device_id();
        if device == self.keys.certificate().device_id() {
            return Err(Error::Usage("that is this device's own code".into()));
        }
        if self.is_revoked(&device)? {
            return Err(Error::Usage(
                "that device was revoked; a new `miyu link` makes a new one".into(),
            ));
        }
        self.connect().await?;
        if self.account_devices().await?.contains(&device) {
            return Err(Error::Usage(
                "that device is linked already; a code serves once".into(),
            ));
        }
        // The account's devices share a group for what each does (read state, contacts,
        // settings): made before the new device registers, which is then added to it like to
        // every conversation.
        self.ensure_account_group().await?;
        let package = wire::LinkPackage {
            certificate: Some(certificate.to_wire()),
            account_name: self.name.clone(),
        };
        self.put_mailbox(code, Step::Certificate, &package.encode_to_vec())
            .await?;
        self.db.execute(
            "INSERT OR REPLACE INTO devices (device_id, name) VALUES (?1, ?2)",
            params![device.to_string(), code.name],
        )?;
        let deadline = Instant::now() + wait;
        while !self.account_devices().await?.contains(&device) {
            if Instant::now() >= deadline {
                return Err(Error::Usage(
                    "the new device did not register in time; run `miyu link` there again".into(),
                ));
            }
            tokio::time::sleep(LINK_POLL).await;
        }
        self.catch_up().await?;
        let conversations = self.own_conversations()?;
        let mut added = 0;
        for group_id in &conversations {
            let claimed = self.claim_own_device(&certificate).await?;
            // One conversation that refuses (it fell out of step, say) does not keep the
            // device out of the others, nor from its history.
            match self
                .commit_membership_once(group_id, std::slice::from_ref(&claimed), Gone::NOBODY)
                .await
            {
                Ok(()) => added += 1,
                Err(error) if error.is_transient() => return Err(error),
                Err(error) => {
                    tracing::warn!("could not add the new device to a conversation: {error}")
                }
            }
        }
        // The history, after the commits: it holds every conversation the device is in.
        let bytes = zeroize::Zeroizing::new(history::export(&self.db)?);
        let messages: usize = self
            .db
            .query_row("SELECT COUNT(*) FROM messages", [], |row| row.get(0))?;
        let key = FileKey::random();
        let blob = sealed_file::seal_all(&key, &bytes)
            .map_err(|error| Error::Usage(format!("the history: {error}")))?;
        let blob_id = BlobClient::new(&self.keys, &self.server, self.proxy)
            .upload_whole(None, blob)
            .await?;
        let pointer = wire::LinkHistory {
            blob_id: blob_id.0.to_vec(),
            key: key.as_bytes().to_vec(),
            size: bytes.len() as u64,
        };
        self.put_mailbox(code, Step::History, &pointer.encode_to_vec())
            .await?;
        Ok(Linked {
            device: device.to_string(),
            name: code.name.clone(),
            conversations: added,
            messages,
        })
    }

    async fn put_mailbox(
        &mut self,
        code: &LinkCode,
        step: Step,
        plaintext: &[u8],
    ) -> Result<(), Error> {
        let payload = link::seal(code, step, plaintext).map_err(link_error)?;
        match self
            .call(Request::LinkPut(wire::LinkPut {
                mailbox: link::mailbox(&code.secret, step).to_vec(),
                payload,
            }))
            .await
        {
            Ok(_) => Ok(()),
            Err(Error::Server(error)) if error.code == wire::ErrorCode::AlreadyExists => {
                Err(Error::Usage(
                    "this link code was answered already; show a new one with `miyu link`".into(),
                ))
            }
            Err(error) => Err(error),
        }
    }

    /// The conversations this device takes part in (and so can add a device to).
    pub(crate) fn own_conversations(&self) -> Result<Vec<Vec<u8>>, Error> {
        let mut statement = self.db.prepare(
            "SELECT c.group_id FROM conversations c LEFT JOIN groups g ON g.group_id = c.group_id
             WHERE c.broken IS NULL AND c.announce IS NULL AND (g.state IS NULL OR g.state = 'active')
             ORDER BY c.last_update_ms",
        )?;
        let candidates: Vec<Vec<u8>> = statement
            .query_map([], |row| row.get(0))?
            .collect::<Result<_, _>>()?;
        let provider = Provider::new(&self.db);
        let mut conversations = Vec::new();
        for group_id in candidates {
            if mls::load_group(&provider, &group_id)?.is_some_and(|group| mls::is_active(&group)) {
                conversations.push(group_id);
            }
        }
        Ok(conversations)
    }

    /// One key package of an own device, for adding it to one conversation.
    async fn claim_own_device(
        &mut self,
        certificate: &VerifiedCertificate,
    ) -> Result<Claimed, Error> {
        let device = certificate.device_id();
        let claimed = self.claim_own_devices().await?;
        let found = claimed.as_ref().and_then(|claimed| {
            claimed
                .devices
                .iter()
                .position(|handed| *handed == device)
                .map(|index| claimed.key_packages[index].clone())
        });
        let key_package = found
            .ok_or_else(|| Error::Protocol("the server had no key of the new device".into()))?;
        Ok(Claimed {
            account: self.account_id().to_string(),
            devices: vec![device],
            key_packages: vec![key_package],
        })
    }

    /// One key package of each other device of the account (none if it has no other), for
    /// bringing them into a conversation this device starts.
    pub(crate) async fn claim_own_devices(&mut self) -> Result<Option<Claimed>, Error> {
        let reply = self
            .call(Request::ClaimKeyPackages(wire::ClaimKeyPackages {
                account_id: self.account_id().as_bytes().to_vec(),
            }))
            .await?;
        let Reply::InviteClaimed(claimed) = reply else {
            return Err(Error::Protocol(format!("unexpected answer: {reply:?}")));
        };
        let me = self.keys.certificate().clone();
        let provider = Provider::new(&self.db);
        let (mut devices, mut key_packages) = (Vec::new(), Vec::new());
        for handed in &claimed.devices {
            let certificate = handed
                .certificate
                .as_ref()
                .ok_or_else(|| Error::Security("a device came without certificate".into()))
                .and_then(|certificate| {
                    VerifiedCertificate::verify(certificate).map_err(|error| {
                        Error::Security(format!("a device's certificate: {error}"))
                    })
                })?;
            // The server cannot slip another account's device, this one, or one we revoked
            // into our own: such a device is left out (and what else is to be done goes on).
            if certificate.account_id() != me.account_id()
                || certificate == me
                || self.is_revoked(&certificate.device_id())?
            {
                tracing::warn!("the server handed out a device that is not another of ours");
                continue;
            }
            key_packages.push(mls::check_key_package(
                &provider,
                &handed.key_package,
                &certificate,
            )?);
            devices.push(certificate.device_id());
        }
        Ok((!devices.is_empty()).then(|| Claimed {
            account: me.account_id().to_string(),
            devices,
            key_packages,
        }))
    }

    async fn account_devices(&mut self) -> Result<Vec<DeviceId>, Error> {
        Ok(self
            .list_devices()
            .await?
            .into_iter()
            .map(|certificate| certificate.0.device_id())
            .collect())
    }

    async fn list_devices(&mut self) -> Result<Vec<(VerifiedCertificate, u64, u64)>, Error> {
        let reply = self
            .call(Request::ListDevices(wire::ListDevices {}))
            .await?;
        let Reply::DeviceList(list) = reply else {
            return Err(Error::Protocol(format!("unexpected answer: {reply:?}")));
        };
        let me = self.account_id();
        let mut devices = Vec::with_capacity(list.devices.len());
        for entry in list.devices {
            let certificate = entry
                .certificate
                .as_ref()
                .ok_or_else(|| Error::Protocol("a device came without certificate".into()))
                .and_then(|certificate| {
                    VerifiedCertificate::verify(certificate).map_err(|error| {
                        Error::Security(format!("a device's certificate: {error}"))
                    })
                })?;
            // The server cannot pass off another account's device as ours.
            if certificate.account_id() != me {
                return Err(Error::Security(
                    "the server listed a device of another account".into(),
                ));
            }
            devices.push((certificate, entry.created_day, entry.last_active_day));
        }
        Ok(devices)
    }

    /// The account's devices, as the server knows them, with the names this device knows.
    pub async fn devices(&mut self) -> Result<Vec<DeviceView>, Error> {
        self.connect().await?;
        let me = self.keys.certificate().device_id();
        let mut views = Vec::new();
        for (certificate, created_day, last_active_day) in self.list_devices().await? {
            let id = certificate.device_id();
            let name: Option<String> = self
                .db
                .query_row(
                    "SELECT name FROM devices WHERE device_id = ?1",
                    params![id.to_string()],
                    |row| row.get(0),
                )
                .optional()?;
            views.push(DeviceView {
                id: id.to_string(),
                name,
                created_day,
                last_active_day,
                this_device: id == me,
            });
        }
        Ok(views)
    }

    /// Revokes a device of the account (by its id, or the start of it): the server refuses it
    /// from now on, and this device removes it from every conversation it is in, so that it
    /// cannot read what is sent afterwards. Needs the account's identity key.
    pub async fn revoke_device(&mut self, id: &str) -> Result<String, Error> {
        if !self.keys.has_identity() {
            return Err(Error::Usage(
                "only the account's first device (which holds its identity key) revokes devices"
                    .into(),
            ));
        }
        let id = id.trim().to_ascii_lowercase();
        if id.len() < 4 {
            return Err(Error::Usage(
                "give at least 4 characters of the device id".into(),
            ));
        }
        self.connect().await?;
        let matching: Vec<DeviceId> = self
            .account_devices()
            .await?
            .into_iter()
            .filter(|device| device.to_string().starts_with(&id))
            .collect();
        let device = match matching.as_slice() {
            [device] => *device,
            [] => {
                return Err(Error::Usage(format!(
                    "no device of this account has the id {id}"
                )));
            }
            _ => {
                return Err(Error::Usage(format!(
                    "more than one device's id starts with {id}"
                )));
            }
        };
        if device == self.keys.certificate().device_id() {
            return Err(Error::Usage(
                "this device holds the account's identity key; it cannot revoke itself".into(),
            ));
        }
        let signature = self
            .keys
            .sign_revocation(&device)
            .map_err(|error| Error::Usage(error.to_string()))?;
        // Remembered first: the removals below are retried at every sync until done, and the
        // device is never added anywhere again. The account's other devices are told, with
        // the signature, so that they remove it from their groups too (this device may not be
        // in all of them).
        let revocation = mls::Revocation { device, signature };
        db::in_transaction(&self.db, |db| {
            record_revocation(db, self.keys.certificate(), &revocation, false)?;
            // Every Sync of this device carries its revocations (`queue_sync_in`).
            self.queue_sync_in(db, wire::Sync::default())?;
            Ok(())
        })?;
        self.revoke_at_server(&revocation).await?;
        self.catch_up().await?;
        self.remove_revoked_devices().await?;
        // The Sync, sealed before the removals, goes out now (sealed again for the account
        // group's new epoch, which the revoked device no longer holds).
        self.flush_outbox().await?;
        Ok(device.to_string())
    }

    /// Sends a revocation to the server (which takes it again without harm) and notes it.
    async fn revoke_at_server(&mut self, revocation: &mls::Revocation) -> Result<(), Error> {
        match self
            .call(Request::RevokeDevice(wire::RevokeDevice {
                device_id: revocation.device.as_bytes().to_vec(),
                signature: revocation.signature.to_vec(),
            }))
            .await
        {
            Ok(_) => {}
            // Never registered, or gone with its account: nothing to revoke there.
            Err(Error::Server(error)) if error.code == wire::ErrorCode::NotFound => {}
            Err(error) => return Err(error),
        }
        self.db.execute(
            "UPDATE devices SET revoked_at_server = 1 WHERE device_id = ?1",
            params![revocation.device.to_string()],
        )?;
        Ok(())
    }

    fn is_revoked(&self, device: &DeviceId) -> Result<bool, Error> {
        is_revoked(&self.db, device)
    }

    /// Commits the removal of revoked devices of the account from every conversation this
    /// device is in and they still are: at revocation, and again at each sync until done, on
    /// every device of the account that knows of the revocation.
    pub(crate) async fn remove_revoked_devices(&mut self) -> Result<(), Error> {
        // A `RevokeDevice` that failed (the network) is sent again until the server takes it.
        let unsent: Vec<mls::Revocation> = {
            let mut statement = self.db.prepare(
                "SELECT device_id FROM devices WHERE revocation IS NOT NULL AND revoked_at_server = 0",
            )?;
            let ids: Vec<String> = statement
                .query_map([], |row| row.get(0))?
                .collect::<Result<_, _>>()?;
            let known = revocations(&self.db)?;
            known
                .into_iter()
                .filter(|revocation| ids.contains(&revocation.device.to_string()))
                .collect()
        };
        for revocation in &unsent {
            self.revoke_at_server(revocation).await?;
        }
        let revoked: Vec<DeviceId> = {
            let mut statement = self
                .db
                .prepare("SELECT device_id FROM devices WHERE revoked_at_ms IS NOT NULL")?;
            statement
                .query_map([], |row| row.get::<_, String>(0))?
                .filter_map(|id| id.ok().and_then(|id| id.parse().ok()))
                .collect()
        };
        if revoked.is_empty() {
            return Ok(());
        }
        let mut holding = Vec::new();
        {
            let provider = Provider::new(&self.db);
            for group_id in self.own_conversations()? {
                if let Some(group) = mls::load_group(&provider, &group_id)?
                    && mls::members(&group)
                        .iter()
                        .any(|(_, member)| revoked.contains(&member.device_id()))
                {
                    holding.push(group_id);
                }
            }
        }
        for group_id in holding {
            match self
                .commit_membership_once(&group_id, &[], Gone::Devices(&revoked))
                .await
            {
                Ok(()) => {}
                Err(error) if error.is_transient() => return Err(error),
                Err(error) => tracing::warn!("could not remove a revoked device: {error}"),
            }
        }
        Ok(())
    }
}

/// Whether this device knows `device` as revoked.
pub(crate) fn is_revoked(db: &Connection, device: &DeviceId) -> Result<bool, Error> {
    Ok(db
        .query_row(
            "SELECT 1 FROM devices WHERE device_id = ?1 AND revoked_at_ms IS NOT NULL",
            params![device.to_string()],
            |_| Ok(()),
        )
        .optional()?
        .is_some())
}

/// Remembers a device the identity key revoked, with the signature that lets this device
/// remove it from groups; `at_server` once the server has taken it (or another device saw to
/// that). This device's own revocation is left to the server, which refuses it.
pub(crate) fn record_revocation(
    db: &Connection,
    me: &VerifiedCertificate,
    revocation: &mls::Revocation,
    at_server: bool,
) -> Result<(), Error> {
    if revocation.device == me.device_id() {
        return Ok(());
    }
    db.execute(
        "INSERT INTO devices (device_id, name, revoked_at_ms, revocation, revoked_at_server)
         VALUES (?1, '', ?2, ?3, ?4)
         ON CONFLICT (device_id) DO UPDATE SET revoked_at_ms = COALESCE(revoked_at_ms, ?2),
         revocation = ?3, revoked_at_server = MAX(revoked_at_server, ?4)",
        params![
            revocation.device.to_string(),
            now_ms(),
            revocation.signature.as_slice(),
            at_server
        ],
    )?;
    Ok(())
}

/// The revocations this device holds, for commits removing revoked devices.
pub(crate) fn revocations(db: &Connection) -> Result<Vec<mls::Revocation>, Error> {
    let mut statement = db
        .prepare_cached("SELECT device_id, revocation FROM devices WHERE revocation IS NOT NULL")?;
    let rows: Vec<(String, Vec<u8>)> = statement
        .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?
        .collect::<Result<_, _>>()?;
    Ok(rows
        .into_iter()
        .filter_map(|(device, signature)| {
            Some(mls::Revocation {
                device: device.parse().ok()?,
                signature: signature.try_into().ok()?,
            })
        })
        .collect())
}
