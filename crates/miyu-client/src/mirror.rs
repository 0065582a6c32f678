//! What one device of an account does that the account's other devices take over: how far
//! each conversation is read, contacts accepted, named, verified, declined or blocked, invites
//! made, shared settings (PROTOCOL.md §10.12).
//!
//! The devices of an account share an MLS group of their own, the account group (group ids of
//! [`ACCOUNT_GROUP_ID_LEN`] bytes). The device holding the identity key creates it when it
//! links the first other device (or is recovered), and links add each new device to it like to
//! any conversation. `Sync` messages travel only there, and a device takes them only from its
//! own account. Its members are also the devices each device makes sure are in all of its
//! conversations (`add_missing_own_devices`).

use std::collections::HashSet;

use miyu_crypto::mls::{self, Incoming, JoinedGroup, MlsGroup, Provider};
use miyu_proto::cert::VerifiedCertificate;
use miyu_proto::wire;
use miyu_proto::{AccountId, DeviceId};
use prost::Message as _;
use rusqlite::{Connection, OptionalExtension, params};

use crate::groups::{Claimed, Gone};
use crate::settings::Settings;
use crate::{Client, Contact, Error, Event, db, devices, now_ms, privacy, random};

/// The length of an account group's id: neither a conversation's (16) nor a group's (32).
pub(crate) const ACCOUNT_GROUP_ID_LEN: usize = 24;
/// The `scope` of the account group in the conversations table.
const SCOPE: &str = "account";

/// The settings every device of an account shares; the others (the proxy, say) belong to the
/// device, or to the server (`discoverable`).
const SHARED_SETTINGS: &[&str] = &[
    "presence",
    "typing",
    "read_receipts",
    "message_requests",
    "group_invites",
];

/// A message request's kept introduction: account, name, conversation, certificate, proof.
type WaitingIntroduction = (String, String, Vec<u8>, Vec<u8>, Vec<u8>);

/// At most this many items of each kind are taken from one `Sync`.
const MAX_ITEMS: usize = 1000;
/// Unused invites beyond this many are not taken from other devices.
const MAX_INVITES: usize = 1000;
/// How far past what this device has processed of a conversation another device's read mark
/// may reach.
const READ_AHEAD: i64 = 100_000;

pub(crate) fn is_shared_setting(key: &str) -> bool {
    SHARED_SETTINGS.contains(&key)
}

pub(crate) fn is_account_group_id(group_id: &[u8]) -> bool {
    group_id.len() == ACCOUNT_GROUP_ID_LEN
}

/// Messages not yet read: incoming texts and files that neither this device nor another
/// device of the account (up to the conversation's `read_seq`) has shown. `m` is `messages`.
pub(crate) const UNREAD: &str = "m.outgoing = 0 AND m.kind IN ('text', 'file') AND m.read_at_ms IS NULL
     AND (m.seq IS NULL OR m.seq > (SELECT v.read_seq FROM conversations v WHERE v.group_id = m.group_id))";

/// Joins the account group from a Welcome: only a device of this account may bring us in, and
/// only into a group of this account's devices.
pub(crate) fn join(db: &Connection, joined: &JoinedGroup, me: AccountId) -> Result<(), Error> {
    if joined.sender.account_id() != me
        || joined
            .members
            .iter()
            .any(|member| member.account_id() != me)
    {
        return Err(Error::Security(
            "an account group must hold only this account's devices".into(),
        ));
    }
    for member in &joined.members {
        if devices::is_revoked(db, &member.device_id())? {
            return Err(Error::Security(
                "an account group with a revoked device in it".into(),
            ));
        }
    }
    db.execute(
        "INSERT INTO conversations (group_id, contact, scope, cursor, last_update_ms) VALUES (?1, NULL, ?2, 0, ?3)
         ON CONFLICT (group_id) DO UPDATE SET cursor = 0, broken = NULL, last_update_ms = ?3",
        params![joined.group.group_id().as_slice(), SCOPE, now_ms()],
    )?;
    Ok(())
}

/// The account groups this device is still a member of, with their MLS state.
fn account_groups(db: &Connection) -> Result<Vec<(Vec<u8>, MlsGroup)>, Error> {
    let candidates: Vec<Vec<u8>> = {
        let mut statement = db.prepare_cached(
            "SELECT group_id FROM conversations WHERE scope = ?1 AND broken IS NULL",
        )?;
        statement
            .query_map(params![SCOPE], |row| row.get(0))?
            .collect::<Result<_, _>>()?
    };
    let provider = Provider::new(db);
    let mut groups = Vec::new();
    for group_id in candidates {
        if let Some(group) = mls::load_group(&provider, &group_id)?
            && mls::is_active(&group)
        {
            groups.push((group_id, group));
        }
    }
    Ok(groups)
}

/// The account groups this device can post to with at least one other device in them.
fn shared_groups(db: &Connection) -> Result<Vec<Vec<u8>>, Error> {
    Ok(account_groups(db)?
        .into_iter()
        .filter(|(_, group)| mls::members(group).len() > 1)
        .map(|(group_id, _)| group_id)
        .collect())
}

/// The account's other devices as its account groups know them (MLS-authenticated members,
/// certified by the identity key), without those revoked.
fn account_devices(db: &Connection, me: DeviceId) -> Result<HashSet<DeviceId>, Error> {
    let mut found = HashSet::new();
    for (_, group) in account_groups(db)? {
        for (_, member) in mls::members(&group) {
            let device = member.device_id();
            if device != me && !devices::is_revoked(db, &device)? {
                found.insert(device);
            }
        }
    }
    Ok(found)
}

/// Whether this device has an account group it is still a member of.
fn has_account_group(db: &Connection) -> Result<bool, Error> {
    Ok(!account_groups(db)?.is_empty())
}

/// A contact as `Sync` carries it, if the account has accepted them.
pub(crate) fn contact_item(
    db: &Connection,
    account: &str,
) -> Result<Option<wire::SyncContact>, Error> {
    let row: Option<(String, bool, bool, Vec<u8>)> = db
        .query_row(
            "SELECT name, named_locally, verified, certificate FROM contacts
             WHERE account_id = ?1 AND state = 'accepted'",
            params![account],
            |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?)),
        )
        .optional()?;
    let Some((name, named_locally, verified, certificate)) = row else {
        return Ok(None);
    };
    let Ok(account_id) = account.parse::<AccountId>() else {
        return Ok(None);
    };
    Ok(Some(wire::SyncContact {
        account_id: account_id.as_bytes().to_vec(),
        name,
        named_locally,
        verified,
        certificate,
    }))
}

/// How far each conversation of `scope` is read on this device, where that moved: the
/// conversations' `read_seq` is raised to the last incoming message they hold (not past what
/// this device has processed, which may hold entries it has not shown yet).
pub(crate) fn advance_read(db: &Connection, scope: &str) -> Result<Vec<wire::ReadUpTo>, Error> {
    let moved: Vec<(Vec<u8>, i64)> = {
        let mut statement = db.prepare(
            "SELECT v.group_id, MIN(v.cursor,
                 (SELECT MAX(m.seq) FROM messages m WHERE m.group_id = v.group_id AND m.outgoing = 0)) AS last
             FROM conversations v WHERE v.scope = ?1 AND last > v.read_seq",
        )?;
        statement
            .query_map(params![scope], |row| Ok((row.get(0)?, row.get(1)?)))?
            .collect::<Result<_, _>>()?
    };
    let mut read = Vec::with_capacity(moved.len());
    for (group_id, seq) in moved {
        db.execute(
            "UPDATE conversations SET read_seq = ?2 WHERE group_id = ?1",
            params![group_id, seq],
        )?;
        read.push(wire::ReadUpTo {
            group_id,
            seq: seq.unsigned_abs(),
        });
    }
    Ok(read)
}

fn is_empty(sync: &wire::Sync) -> bool {
    sync.read.is_empty()
        && sync.contacts.is_empty()
        && sync.invites.is_empty()
        && sync.settings.is_empty()
        && sync.blocked.is_empty()
        && sync.declined.is_empty()
        && sync.revoked.is_empty()
        && sync.invites_used.is_empty()
}

impl Client {
    /// Queues `sync` for the account's other devices (in the caller's transaction); returns
    /// whether there was anyone to tell. `flush` (or the next sync) posts it.
    pub(crate) fn queue_sync_in(
        &self,
        db: &Connection,
        mut sync: wire::Sync,
    ) -> Result<bool, Error> {
        if self.keys.has_identity() {
            // The device that revokes repeats its revocations in every Sync: one the server
            // kept from a device is made good by the next.
            for revocation in devices::revocations(db)? {
                let device_id = revocation.device.as_bytes().to_vec();
                if !sync
                    .revoked
                    .iter()
                    .any(|known| known.device_id == device_id)
                {
                    sync.revoked.push(wire::DeviceRevocation {
                        device_id,
                        signature: revocation.signature.to_vec(),
                    });
                }
            }
        }
        if is_empty(&sync) {
            return Ok(false);
        }
        let groups = shared_groups(db)?;
        for group_id in &groups {
            self.queue_app_message_in(
                db,
                group_id,
                wire::app_message::Body::Sync(sync.clone()),
                None,
            )?;
        }
        Ok(!groups.is_empty())
    }

    /// Adds the account's devices (as its account groups know them) to every conversation this
    /// device is in and they are not: a device recovered with the identity key, which the
    /// devices that survived bring into their conversations, or one a link missed. Runs at
    /// each sync; when several devices do it at once, the first commit wins and the others
    /// find nothing left to do.
    pub(crate) async fn add_missing_own_devices(&mut self) -> Result<(), Error> {
        let mine = account_devices(&self.db, self.keys.certificate().device_id())?;
        if mine.is_empty() {
            return Ok(());
        }
        let mut lacking = Vec::new();
        {
            let provider = Provider::new(&self.db);
            for group_id in self.own_conversations()? {
                if is_account_group_id(&group_id) {
                    continue;
                }
                let Some(group) = mls::load_group(&provider, &group_id)? else {
                    continue;
                };
                let present: HashSet<DeviceId> = mls::members(&group)
                    .into_iter()
                    .map(|(_, member)| member.device_id())
                    .collect();
                let missing: HashSet<DeviceId> = mine.difference(&present).copied().collect();
                if !missing.is_empty() {
                    lacking.push((group_id, missing));
                }
            }
        }
        if lacking.is_empty() {
            return Ok(());
        }
        for (group_id, missing) in lacking {
            // One key package of each other device; those the conversation lacks are added.
            let Some(claimed) = self.claim_own_devices().await? else {
                break;
            };
            let (devices, key_packages) = claimed
                .devices
                .into_iter()
                .zip(claimed.key_packages)
                .filter(|(device, _)| missing.contains(device))
                .unzip();
            let claimed = Claimed {
                account: claimed.account,
                devices,
                key_packages,
            };
            if claimed.devices.is_empty() {
                // The server hands out none of them (revoked there, say): no use asking again
                // for every conversation at this sync.
                break;
            }
            match self
                .commit_membership_once(&group_id, std::slice::from_ref(&claimed), Gone::NOBODY)
                .await
            {
                Ok(()) => {
                    // The newcomer may know nothing of the contact (no backup): their name.
                    if let Some(contact) = db::conversation_contact(&self.db, &group_id)? {
                        db::in_transaction(&self.db, |db| self.share_contact_in(db, &contact))?;
                    }
                }
                Err(error) if error.is_transient() => return Err(error),
                Err(error) => {
                    tracing::warn!("could not add an own device to a conversation: {error}")
                }
            }
        }
        self.flush_outbox().await
    }

    /// Tells the account's other devices about a contact as this device now has it (in the
    /// caller's transaction).
    pub(crate) fn share_contact_in(&self, db: &Connection, account: &str) -> Result<bool, Error> {
        let contacts = contact_item(db, account)?.into_iter().collect();
        self.queue_sync_in(
            db,
            wire::Sync {
                contacts,
                ..Default::default()
            },
        )
    }

    /// An entry of the account group that MLS accepted: a `Sync` from another device of the
    /// account, or a change of the group's devices.
    pub(crate) fn on_account_entry(
        &self,
        db: &Connection,
        group_id: &[u8],
        group: &MlsGroup,
        incoming: Incoming,
    ) -> Result<Option<Event>, Error> {
        match incoming {
            Incoming::Application { plaintext, sender } => {
                if sender.account_id() != self.account_id()
                    || devices::is_revoked(db, &sender.device_id())?
                {
                    tracing::debug!(
                        "dropped an account group message of another account or a revoked device"
                    );
                    return Ok(None);
                }
                match wire::AppMessage::decode(plaintext.as_slice()).map(|message| message.body) {
                    Ok(Some(wire::app_message::Body::Sync(sync))) => self.on_sync(db, &sync),
                    _ => Ok(None),
                }
            }
            Incoming::Commit(_) | Incoming::Own => {
                if !mls::is_active(group) {
                    // Revoked, or removed by another device: nothing more comes from here.
                    db.execute(
                        "UPDATE conversations SET broken = ?2 WHERE group_id = ?1",
                        params![group_id, "this device was removed from the account group"],
                    )?;
                    db.execute("DELETE FROM outbox WHERE group_id = ?1", params![group_id])?;
                }
                Ok(None)
            }
        }
    }

    /// Creates the account group if this device is in none, with every other device of the
    /// account the server hands out: before a link adds a new device to every conversation.
    pub(crate) async fn ensure_account_group(&mut self) -> Result<(), Error> {
        if has_account_group(&self.db)? {
            return Ok(());
        }
        let others = self.claim_own_devices().await?;
        let (devices, key_packages): (Vec<DeviceId>, Vec<_>) = others
            .map(|claimed| (claimed.devices, claimed.key_packages))
            .unwrap_or_default();
        let group_id: [u8; ACCOUNT_GROUP_ID_LEN] = random();
        db::in_transaction(&self.db, |db| {
            let announce =
                self.create_conversation_group(db, &group_id, &devices, &key_packages)?;
            db.execute(
                "INSERT INTO conversations (group_id, contact, scope, announce, last_update_ms) VALUES (?1, NULL, ?2, ?3, ?4)",
                params![group_id.as_slice(), SCOPE, announce.encode_to_vec(), now_ms()],
            )?;
            Ok(())
        })?;
        self.announce_pending_groups().await
    }

    /// What another device of the account did, as its `Sync` says.
    pub(crate) fn on_sync(
        &self,
        db: &Connection,
        sync: &wire::Sync,
    ) -> Result<Option<Event>, Error> {
        let now = now_ms();
        for read in sync.read.iter().take(MAX_ITEMS) {
            let Ok(seq) = i64::try_from(read.seq) else {
                continue;
            };
            // The other device may be ahead of this one, but not by more than it could have
            // read: a mark far in the future would hide every later message as read.
            let seq: Option<i64> = db
                .query_row(
                    "UPDATE conversations SET read_seq = MAX(read_seq, MIN(?2, cursor + ?3))
                     WHERE group_id = ?1 RETURNING read_seq",
                    params![read.group_id, seq, READ_AHEAD],
                    |row| row.get(0),
                )
                .optional()?;
            let Some(seq) = seq else {
                continue;
            };
            db.execute(
                "UPDATE messages SET read_at_ms = ?3 WHERE group_id = ?1 AND outgoing = 0
                 AND read_at_ms IS NULL AND seq <= ?2",
                params![read.group_id, seq, now],
            )?;
        }
        let mut events = Vec::new();
        for revocation in sync.revoked.iter().take(MAX_ITEMS) {
            let Ok(device) = DeviceId::from_bytes(&revocation.device_id) else {
                continue;
            };
            let Ok(signature) = <[u8; 64]>::try_from(revocation.signature.as_slice()) else {
                continue;
            };
            // Only the identity key revokes; this device learns of its own revocation from
            // the server, which refuses it.
            if device != self.keys.certificate().device_id()
                && miyu_proto::cert::verify_revocation(
                    self.keys.certificate().identity_key(),
                    &device,
                    &signature,
                )
            {
                let revocation = mls::Revocation { device, signature };
                devices::record_revocation(db, self.keys.certificate(), &revocation, true)?;
            }
        }
        for contact in sync.contacts.iter().take(MAX_ITEMS) {
            events.extend(self.take_contact(db, contact)?);
        }
        let unused: i64 =
            db.query_row("SELECT COUNT(*) FROM invites WHERE used = 0", [], |row| {
                row.get(0)
            })?;
        let room = MAX_INVITES.saturating_sub(usize::try_from(unused).unwrap_or(MAX_INVITES));
        for invite in sync.invites.iter().take(room) {
            if invite.token.len() != 32 {
                continue;
            }
            // A group's invite stays with the device that manages the group; here it only
            // lets the contact who uses it in. Its age counts from no later than now.
            db.execute(
                "INSERT OR IGNORE INTO invites (token, created_at_ms, uses_left) VALUES (?1, ?2, ?3)",
                params![
                    invite.token,
                    invite.created_at_ms.min(now),
                    invite.uses.clamp(1, 10_000)
                ],
            )?;
        }
        for token in sync.invites_used.iter().take(MAX_ITEMS) {
            db.execute(
                "UPDATE invites SET used = 1, uses_left = 0 WHERE token = ?1",
                params![token],
            )?;
        }
        if !sync.invites.is_empty() {
            events.extend(self.answer_waiting_introductions(db)?);
        }
        if !sync.settings.is_empty() {
            let mut settings = Settings::load(db)?;
            for setting in sync.settings.iter().take(MAX_ITEMS) {
                if !is_shared_setting(&setting.key) {
                    continue;
                }
                let before = settings.clone();
                if settings.apply(&setting.key, &setting.value).is_err() {
                    continue;
                }
                settings.store(db, &setting.key)?;
                privacy::after_setting_changed(db, &before, &settings)?;
            }
        }
        for block in sync.blocked.iter().take(MAX_ITEMS) {
            let Ok(account) = AccountId::from_bytes(&block.account_id) else {
                continue;
            };
            let account = account.to_string();
            if block.blocked {
                privacy::block(db, &account)?;
            } else {
                db.execute(
                    "DELETE FROM blocked WHERE account_id = ?1",
                    params![account],
                )?;
            }
        }
        for declined in sync.declined.iter().take(MAX_ITEMS) {
            let Ok(account) = AccountId::from_bytes(declined) else {
                continue;
            };
            privacy::forget_request(db, &account.to_string())?;
        }
        // The caller reports one event; the others go with it.
        let last = events.pop();
        self.extra_events.borrow_mut().extend(events);
        Ok(last)
    }

    /// Message requests whose introduction an invite of the account (made on another device,
    /// and known here only now) answers: they become contacts, as on the invite's device.
    fn answer_waiting_introductions(&self, db: &Connection) -> Result<Vec<Event>, Error> {
        let waiting: Vec<WaitingIntroduction> = {
            let mut statement = db.prepare(
                "SELECT account_id, name, intro_group_id, intro_certificate, intro_proof FROM contacts
                 WHERE state IN ('unsolicited', 'held') AND intro_proof IS NOT NULL",
            )?;
            statement
                .query_map([], |row| {
                    Ok((
                        row.get(0)?,
                        row.get(1)?,
                        row.get(2)?,
                        row.get(3)?,
                        row.get(4)?,
                    ))
                })?
                .collect::<Result<_, _>>()?
        };
        let mut events = Vec::new();
        for (account, name, group_id, certificate, proof) in waiting {
            if let Some(token) = crate::find_invite(db, &group_id, &certificate, &proof)? {
                events.push(self.accept_introduced(db, &group_id, &account, &name, &token)?);
            }
        }
        Ok(events)
    }

    /// A contact another device of the account accepted, named or verified: the same here.
    fn take_contact(
        &self,
        db: &Connection,
        contact: &wire::SyncContact,
    ) -> Result<Option<Event>, Error> {
        let Ok(account_id) = AccountId::from_bytes(&contact.account_id) else {
            return Ok(None);
        };
        let Ok(certificate) = VerifiedCertificate::from_compact(&contact.certificate) else {
            return Ok(None);
        };
        let wanted = contact.name.trim();
        if certificate.account_id() != account_id
            || account_id == self.account_id()
            || wanted.is_empty()
            || wanted.chars().count() > 64
            || wanted.chars().any(char::is_control)
        {
            return Ok(None);
        }
        let account = account_id.to_string();
        if privacy::is_blocked(db, &account)? {
            // Blocked here: only an unblock (SyncBlock) lifts it, never a rename crossing it.
            return Ok(None);
        }
        let known: Option<(String, Vec<u8>)> = db
            .query_row(
                "SELECT state, certificate FROM contacts WHERE account_id = ?1",
                params![account],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
            .optional()?;
        let name = db::free_contact_name(db, wanted, &account)?;
        let newly = match known {
            Some((state, stored)) => {
                // Verification is of the contact's identity key: carried over only if this
                // device has the same one for them.
                let same_identity = VerifiedCertificate::from_compact(&stored)
                    .is_ok_and(|stored| stored.identity_key() == certificate.identity_key());
                db.execute(
                    "UPDATE contacts SET state = 'accepted', name = ?2, named_locally = ?3,
                     verified = CASE WHEN ?5 THEN ?4 ELSE verified END WHERE account_id = ?1",
                    params![
                        account,
                        name,
                        contact.named_locally,
                        contact.verified,
                        same_identity
                    ],
                )?;
                state != "accepted"
            }
            None => {
                db.execute(
                    "INSERT INTO contacts (account_id, name, named_locally, certificate, verified, added_at_ms, state)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'accepted')",
                    params![
                        account,
                        name,
                        contact.named_locally,
                        certificate.to_compact(),
                        contact.verified,
                        now_ms()
                    ],
                )?;
                true
            }
        };
        Ok(newly.then_some(Event::ContactAdded(Contact {
            name,
            account_id: account,
            verified: contact.verified,
            online: false,
            last_seen_ms: None,
            unread: 0,
        })))
    }
}
