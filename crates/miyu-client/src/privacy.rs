//! The private-by-default features: settings, message requests from strangers, usernames,
//! disappearing messages, and the signals (read receipts, typing, presence) that are off
//! until the user turns them on. Every signal is an end-to-end encrypted message to a contact
//! allowed to see it; the server learns none of them.

use miyu_proto::Username;
use miyu_proto::wire::{self, client_frame::Body as Request, server_frame::Body as Reply};
use rusqlite::{Connection, OptionalExtension, params};

use crate::settings::{Presence, Settings};
use crate::{
    Client, Contact, Error, Event, MessageKind, MessageState, MessageView, Proxy, db, now_ms,
};

/// The shortest and longest disappearing-message timers.
pub(crate) const MIN_TIMER_S: u32 = 30;
pub(crate) const MAX_TIMER_S: u32 = 28 * 24 * 3600;
/// Messages kept from one stranger until the request is accepted.
const MAX_REQUEST_MESSAGES: i64 = 20;
/// Strangers' conversations kept waiting at once; more are refused.
const MAX_WAITING: i64 = 200;
/// A newcomer who never introduced themselves is forgotten after this long.
const PENDING_LIFETIME_MS: u64 = 7 * 24 * 3600 * 1000;
/// Longest text kept from a stranger, in bytes.
const MAX_REQUEST_TEXT: usize = 4096;
/// A typing indicator older than this is stale and not shown.
const TYPING_FRESH_MS: u64 = 30_000;
/// "Online" is believed for this long after the contact said so.
const ONLINE_FRESH_MS: u64 = 10 * 60_000;
/// While presence is shared, last seen goes out at most this often.
const PRESENCE_INTERVAL_MS: u64 = 3_600_000;

/// An incoming application message, with where it came from.
pub(crate) struct Received<'a> {
    pub(crate) group_id: &'a [u8],
    pub(crate) seq: u64,
    /// Who wrote it: the contact, or in a group the member.
    pub(crate) contact_account: &'a str,
    pub(crate) contact_name: &'a str,
    /// The conversation's name: the contact's, or the group's.
    pub(crate) conversation_name: &'a str,
    /// In a group, the member who wrote it (stored with the message).
    pub(crate) sender: Option<&'a str>,
    /// Written by another device of this account: stored as our own, sent message.
    pub(crate) own: bool,
    pub(crate) message_id: &'a [u8],
    pub(crate) sent_at_ms: u64,
    pub(crate) expires_in_s: u32,
}

/// An account whose invitations and messages are dropped.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Blocked {
    pub account_id: String,
    pub blocked_at_ms: u64,
}

/// A first contact from someone who is not a contact, waiting for the user's decision.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct MessageRequest {
    /// The name they gave; not checked by anyone.
    pub name: String,
    pub account_id: String,
    pub received_at_ms: u64,
    /// What they wrote so far (at most 20 messages).
    pub messages: Vec<MessageView>,
}

/// "1 hour", "30 seconds", ...: how front ends show a timer.
pub fn timer_text(seconds: u32) -> String {
    if seconds == 0 {
        return "off".into();
    }
    let units = [
        (7 * 24 * 3600, "week"),
        (24 * 3600, "day"),
        (3600, "hour"),
        (60, "minute"),
        (1, "second"),
    ];
    for (size, unit) in units {
        if seconds.is_multiple_of(size) {
            let count = seconds / size;
            return format!("{count} {unit}{}", if count == 1 { "" } else { "s" });
        }
    }
    format!("{seconds} seconds")
}

/// Parses "30s", "5m", "1h", "2d", "4w" or "off" into seconds, within the allowed range.
pub fn parse_timer(text: &str) -> Result<u32, Error> {
    let text = text.trim();
    if text == "off" || text == "0" {
        return Ok(0);
    }
    let usage = || {
        Error::Usage(format!(
            "a timer is a number with s, m, h, d or w (from 30s to 4w), or off; not {text:?}"
        ))
    };
    let split = text.find(|c: char| !c.is_ascii_digit()).ok_or_else(usage)?;
    let (number, unit) = text.split_at(split);
    let number: u32 = number.parse().map_err(|_| usage())?;
    let size = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 24 * 3600,
        "w" => 7 * 24 * 3600,
        _ => return Err(usage()),
    };
    let seconds = number.checked_mul(size).ok_or_else(usage)?;
    if seconds == 0 || !valid_timer(seconds) {
        return Err(usage());
    }
    Ok(seconds)
}

/// 0 (off), or from 30 seconds to 4 weeks.
pub(crate) fn valid_timer(seconds: u32) -> bool {
    seconds == 0 || (MIN_TIMER_S..=MAX_TIMER_S).contains(&seconds)
}

/// Before a new account joins us: forgets newcomers who never introduced themselves within a
/// week, then refuses if too many strangers are still waiting (existing contacts are never
/// counted, so they can always start over with us).
pub(crate) fn make_room_for_newcomer(db: &Connection) -> Result<(), Error> {
    let stale: Vec<String> = {
        let mut statement = db.prepare(
            "SELECT account_id FROM contacts WHERE state IN ('pending', 'held') AND added_at_ms < ?1",
        )?;
        statement
            .query_map(
                params![now_ms().saturating_sub(PENDING_LIFETIME_MS)],
                |row| row.get(0),
            )?
            .collect::<Result<_, _>>()?
    };
    for account in stale {
        forget_contact(db, &account)?;
    }
    let waiting: i64 = db.query_row(
        "SELECT count(*) FROM contacts WHERE state IN ('pending', 'unsolicited', 'held')",
        [],
        |row| row.get(0),
    )?;
    if waiting >= MAX_WAITING {
        return Err(Error::Security(
            "too many strangers are waiting for an answer already".into(),
        ));
    }
    Ok(())
}

pub(crate) fn is_blocked(db: &Connection, account: &str) -> Result<bool, Error> {
    Ok(db
        .query_row(
            "SELECT 1 FROM blocked WHERE account_id = ?1",
            params![account],
            |_| Ok(()),
        )
        .optional()?
        .is_some())
}

pub(crate) fn expiry(received: &Received<'_>) -> Option<u64> {
    (received.expires_in_s > 0)
        .then(|| now_ms() + u64::from(received.expires_in_s.min(MAX_TIMER_S)) * 1000)
}

/// Stores a contact's message of `kind` with `body`; its row, or `None` if it is a repeat.
pub(crate) fn store_message(
    db: &Connection,
    received: &Received<'_>,
    body: &str,
    kind: &str,
) -> Result<Option<i64>, Error> {
    if received.own || received.sender.is_some() {
        // A deletion that came first stands only if the message's author sent it (our own
        // device, or in a group that very member): nobody deletes another's message in advance.
        db.execute(
            "DELETE FROM messages WHERE group_id = ?1 AND message_id = ?2 AND deleted = 1
             AND outgoing = 0 AND (?3 OR sender IS NOT ?4)",
            params![
                received.group_id,
                received.message_id,
                received.own,
                received.sender
            ],
        )?;
    }
    let inserted = db.execute(
        "INSERT OR IGNORE INTO messages (group_id, message_id, outgoing, body, sent_at_ms, received_at_ms, state, seq, expires_at_ms, kind, sender)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
        params![
            received.group_id,
            received.message_id,
            received.own,
            body,
            received.sent_at_ms,
            now_ms(),
            if received.own { "sent" } else { "received" },
            received.seq,
            expiry(received),
            kind,
            if received.own { None } else { received.sender }
        ],
    )?;
    if inserted == 0 && received.own {
        // Known from the history the other device handed over, still waiting there.
        db.execute(
            "UPDATE messages SET state = 'sent', seq = ?3
             WHERE group_id = ?1 AND message_id = ?2 AND outgoing = 1 AND state = 'pending'",
            params![received.group_id, received.message_id, received.seq],
        )?;
    }
    Ok((inserted > 0).then(|| db.last_insert_rowid()))
}

/// Stores a contact's text; `None` if it is a repeat.
pub(crate) fn store_text(
    db: &Connection,
    received: &Received<'_>,
    text: &wire::Text,
) -> Result<Option<Event>, Error> {
    let Some(row) = store_message(db, received, &text.body, "text")? else {
        return Ok(None);
    };
    if !text.reply_to.is_empty() || text.forwarded {
        db.execute(
            "UPDATE messages SET reply_to = ?1, forwarded = ?2 WHERE id = ?3",
            params![
                (!text.reply_to.is_empty()).then_some(&text.reply_to),
                text.forwarded,
                row
            ],
        )?;
    }
    Ok(Some(Event::Message(MessageView {
        id: row,
        contact: received.conversation_name.to_string(),
        from: received.contact_name.to_string(),
        outgoing: received.own,
        body: text.body.clone(),
        sent_at_ms: received.sent_at_ms,
        state: if received.own {
            MessageState::Sent
        } else {
            MessageState::Received
        },
        kind: MessageKind::Text,
        expires_at_ms: expiry(received),
        reply_to: crate::features::local_id(db, received.group_id, &text.reply_to)?,
        forwarded: text.forwarded,
        ..Default::default()
    })))
}

/// Keeps a stranger's text for the request, up to a limit, and sends nothing back.
pub(crate) fn store_request_message(
    db: &Connection,
    received: &Received<'_>,
    text: &wire::Text,
) -> Result<Option<Event>, Error> {
    let body = text.body.as_str();
    // Counted as received, not as stored: short timers must not make room for more.
    let received_so_far: i64 = db.query_row(
        "SELECT request_messages FROM contacts WHERE account_id = ?1",
        params![received.contact_account],
        |row| row.get(0),
    )?;
    if received_so_far >= MAX_REQUEST_MESSAGES || body.len() > MAX_REQUEST_TEXT {
        return Ok(None);
    }
    db.execute(
        "UPDATE contacts SET request_messages = request_messages + 1 WHERE account_id = ?1",
        params![received.contact_account],
    )?;
    // Just the words: a stranger's quotes and forwards point at nothing here.
    let plain = wire::Text {
        body: body.to_string(),
        ..Default::default()
    };
    Ok(store_text(db, received, &plain)?.map(|_| Event::Request {
        name: received.contact_name.to_string(),
    }))
}

/// A newcomer whose introduction carried no invite of ours. With message requests off they are
/// forgotten, unless their introduction carries an invite proof: an invite another device of
/// the account made may answer it, so they are held, unseen, until then (or until they expire
/// like a newcomer who never introduced themselves).
pub(crate) fn on_stranger(
    db: &Connection,
    account: &str,
    name: &str,
    has_proof: bool,
) -> Result<Option<Event>, Error> {
    if !Settings::load(db)?.message_requests {
        if has_proof {
            db.execute(
                "UPDATE contacts SET state = 'held', name = ?1 WHERE account_id = ?2",
                params![name, account],
            )?;
            return Ok(None);
        }
        tracing::debug!("dropped a stranger's conversation: message requests are off");
        forget_contact(db, account)?;
        return Ok(None);
    }
    db.execute(
        "UPDATE contacts SET state = 'unsolicited', name = ?1 WHERE account_id = ?2",
        params![name, account],
    )?;
    Ok(Some(Event::Request {
        name: name.to_string(),
    }))
}

/// Deletes a contact with all its conversations, messages and their MLS keys. The server
/// still relays the conversations' entries; they are dropped as unknown.
fn forget_contact(db: &Connection, account: &str) -> Result<(), Error> {
    let groups: Vec<Vec<u8>> = {
        let mut statement = db.prepare("SELECT group_id FROM conversations WHERE contact = ?1")?;
        statement
            .query_map(params![account], |row| row.get(0))?
            .collect::<Result<_, _>>()?
    };
    let provider = miyu_crypto::mls::Provider::new(db);
    for group_id in &groups {
        miyu_crypto::mls::delete_group(&provider, group_id)?;
        db.execute(
            "DELETE FROM messages WHERE group_id = ?1",
            params![group_id],
        )?;
        db.execute("DELETE FROM outbox WHERE group_id = ?1", params![group_id])?;
        db.execute("DELETE FROM uploads WHERE group_id = ?1", params![group_id])?;
    }
    db.execute(
        "DELETE FROM conversations WHERE contact = ?1",
        params![account],
    )?;
    db.execute(
        "DELETE FROM contacts WHERE account_id = ?1",
        params![account],
    )?;
    Ok(())
}

/// The contact read some of our messages: shown only while our read receipts are on too.
pub(crate) fn on_receipt(
    db: &Connection,
    received: &Received<'_>,
    receipt: &wire::Receipt,
) -> Result<Option<Event>, Error> {
    if !Settings::load(db)?.read_receipts {
        return Ok(None);
    }
    let mut changed = 0;
    for message_id in receipt.read_message_ids.iter().take(1000) {
        changed += db.execute(
            "UPDATE messages SET state = 'read', read_at_ms = ?1 WHERE outgoing = 1
             AND state = 'sent' AND message_id = ?2
             AND group_id IN (SELECT group_id FROM conversations WHERE contact = ?3)",
            params![now_ms(), message_id, received.contact_account],
        )?;
    }
    Ok((changed > 0).then(|| Event::Read {
        contact: received.contact_name.to_string(),
    }))
}

pub(crate) fn on_typing(
    db: &Connection,
    received: &Received<'_>,
    active: bool,
) -> Result<Option<Event>, Error> {
    let fresh = now_ms().saturating_sub(received.sent_at_ms) < TYPING_FRESH_MS;
    if !fresh || !Settings::load(db)?.typing {
        return Ok(None);
    }
    Ok(Some(Event::Typing {
        contact: received.contact_name.to_string(),
        active,
    }))
}

pub(crate) fn on_presence(
    db: &Connection,
    received: &Received<'_>,
    presence: &wire::Presence,
) -> Result<Option<Event>, Error> {
    if Settings::load(db)?.presence == Presence::Nobody {
        return Ok(None);
    }
    // Last seen 0: the contact stopped sharing; forget what they shared before. A time in
    // the future is not believed.
    let now = now_ms();
    let last_seen = (presence.last_seen_ms != 0).then_some(presence.last_seen_ms.min(now));
    // "Online" counts from when it was said, not from when it reached us.
    let said_at = received.sent_at_ms.min(now);
    db.execute(
        "UPDATE contacts SET online = ?1, last_seen_ms = ?2, presence_at_ms = ?3 WHERE account_id = ?4",
        params![
            presence.online && last_seen.is_some(),
            last_seen,
            said_at,
            received.contact_account
        ],
    )?;
    Ok(None)
}

pub(crate) fn on_timer(
    db: &Connection,
    received: &Received<'_>,
    seconds: u32,
) -> Result<Option<Event>, Error> {
    if !valid_timer(seconds) {
        tracing::debug!("ignored a timer out of range");
        return Ok(None);
    }
    // Every conversation with the contact, as when we set it ourselves.
    db.execute(
        "UPDATE conversations SET timer_s = ?1 WHERE contact = ?2",
        params![seconds, received.contact_account],
    )?;
    let body = timer_notice(received.contact_name, seconds);
    let inserted = db.execute(
        "INSERT OR IGNORE INTO messages (group_id, message_id, outgoing, body, sent_at_ms, received_at_ms, state, seq, kind)
         VALUES (?1, ?2, 0, ?3, ?4, ?5, 'received', ?6, 'timer')",
        params![
            received.group_id,
            received.message_id,
            body,
            received.sent_at_ms,
            now_ms(),
            received.seq
        ],
    )?;
    Ok((inserted > 0).then(|| {
        Event::Message(MessageView {
            contact: received.contact_name.to_string(),
            from: received.contact_name.to_string(),
            outgoing: false,
            body,
            sent_at_ms: received.sent_at_ms,
            state: MessageState::Received,
            kind: MessageKind::Timer,
            expires_at_ms: None,
            ..Default::default()
        })
    }))
}

pub(crate) fn timer_notice(who: &str, seconds: u32) -> String {
    match seconds {
        0 => format!("{who} turned disappearing messages off"),
        _ => format!("{who} set disappearing messages to {}", timer_text(seconds)),
    }
}

/// What a contact's stored presence shows, as far as we may see it: online (if said recently)
/// and last seen.
pub(crate) fn shown_presence(
    settings: &Settings,
    online: bool,
    last_seen_ms: Option<u64>,
    said_at_ms: Option<u64>,
) -> (bool, Option<u64>) {
    if settings.presence == Presence::Nobody {
        return (false, None);
    }
    let fresh = said_at_ms.is_some_and(|at| now_ms().saturating_sub(at) < ONLINE_FRESH_MS);
    (online && fresh, last_seen_ms)
}

pub(crate) fn message_state(state: &str) -> MessageState {
    match state {
        "pending" => MessageState::Pending,
        "sent" => MessageState::Sent,
        "read" => MessageState::Read,
        _ => MessageState::Received,
    }
}

pub(crate) fn message_kind(kind: &str) -> MessageKind {
    match kind {
        "timer" => MessageKind::Timer,
        "file" => MessageKind::File,
        "notice" => MessageKind::Notice,
        _ => MessageKind::Text,
    }
}

/// Messages of every conversation of `scope` (a contact's or a group's), oldest first, as
/// `conversation` is called.
pub(crate) fn history(
    db: &Connection,
    scope: &str,
    conversation: &str,
) -> Result<Vec<MessageView>, Error> {
    let mut statement = db.prepare(
        "SELECT m.outgoing, m.body, m.sent_at_ms, m.state, m.kind, m.expires_at_ms, f.id, f.size,
                m.id, (SELECT r.id FROM messages r WHERE r.group_id = m.group_id AND r.message_id = m.reply_to),
                m.forwarded, m.edited_at_ms, m.deleted, m.sender, m.mentions_me
         FROM messages m LEFT JOIN files f ON f.message_row = m.id
         WHERE m.group_id IN (SELECT group_id FROM conversations WHERE scope = ?1)
         AND (m.expires_at_ms IS NULL OR m.expires_at_ms > ?2) ORDER BY m.id",
    )?;
    let mut names = crate::groups::Names::new(db);
    let rows: Vec<(MessageView, Option<String>)> = statement
        .query_map(params![scope, now_ms()], |row| {
            let outgoing: bool = row.get(0)?;
            let state: String = row.get(3)?;
            let kind: String = row.get(4)?;
            let body: String = row.get(1)?;
            let file: Option<(i64, u64)> = match row.get::<_, Option<i64>>(6)? {
                Some(id) => Some((id, row.get(7)?)),
                None => None,
            };
            let message = MessageView {
                id: row.get(8)?,
                contact: conversation.to_string(),
                from: if outgoing {
                    "me".into()
                } else {
                    conversation.to_string()
                },
                outgoing,
                body: match file {
                    Some((id, size)) => crate::files::file_line(id, &body, size),
                    None => body,
                },
                sent_at_ms: row.get(2)?,
                state: message_state(&state),
                kind: message_kind(&kind),
                expires_at_ms: row.get(5)?,
                reply_to: row.get(9)?,
                forwarded: row.get(10)?,
                edited_at_ms: row.get(11)?,
                deleted: row.get(12)?,
                reactions: Vec::new(),
                mentions_me: row.get(14)?,
            };
            Ok((message, row.get(13)?))
        })?
        .collect::<Result<_, _>>()?;
    let mut messages = Vec::with_capacity(rows.len());
    for (mut message, sender) in rows {
        if let Some(sender) = sender {
            message.from = names.of(&sender)?;
        }
        messages.push(message);
    }
    crate::features::attach_reactions(db, scope, conversation, &mut messages)?;
    Ok(messages)
}

impl Client {
    // -----------------------------------------------------------------------------------------
    // Settings
    // -----------------------------------------------------------------------------------------

    pub fn settings(&self) -> Result<Settings, Error> {
        Settings::load(&self.db)
    }

    /// Changes one setting. What others can see changes with it: turning presence to
    /// `nobody` tells contacts to forget the last one shared, turning `discoverable` on
    /// publishes the username (off withdraws it), and the proxy applies to the next connection.
    pub async fn set_setting(&mut self, key: &str, value: &str) -> Result<Settings, Error> {
        let mut settings = self.settings()?;
        if key == "proxy" {
            let proxy = match value.trim() {
                "none" | "off" | "" => None,
                text => Some(text.parse::<Proxy>()?),
            };
            self.set_proxy(proxy).await?;
            return self.settings();
        }
        let before = settings.clone();
        settings.apply(key, value)?;
        if key == "discoverable" && settings.discoverable != before.discoverable {
            let username = self.username()?;
            if let Some(username) = username {
                // The server must agree before the setting says so.
                self.publish_username(settings.discoverable.then_some(&username))
                    .await?;
            }
        }
        db::in_transaction(&self.db, |db| {
            settings.store(db, key)?;
            after_setting_changed(db, &before, &settings)?;
            // The account's other devices take it over.
            let shared = wire::SyncSetting {
                key: key.to_string(),
                value: settings.text(key),
            };
            if crate::mirror::is_shared_setting(key) {
                self.queue_sync_in(
                    db,
                    wire::Sync {
                        settings: vec![shared],
                        ..Default::default()
                    },
                )?;
            }
            Ok(())
        })?;
        if key == "presence" && settings.presence != before.presence {
            self.send_presence(false, settings.presence == Presence::Nobody)
                .await?;
        } else if let Err(error) = self.flush().await
            && !error.is_transient()
        {
            return Err(error);
        }
        Ok(settings)
    }

    // -----------------------------------------------------------------------------------------
    // Usernames
    // -----------------------------------------------------------------------------------------

    pub fn username(&self) -> Result<Option<Username>, Error> {
        let stored: Option<String> =
            self.db
                .query_row("SELECT username FROM account WHERE id = 1", [], |row| {
                    row.get(0)
                })?;
        Ok(stored.and_then(|name| name.parse().ok()))
    }

    /// Chooses a username (or clears it with `None`). It can be looked up only while
    /// `discoverable` is on; then the server must agree that nobody else holds it.
    pub async fn set_username(&mut self, name: Option<&str>) -> Result<Option<Username>, Error> {
        let username = name
            .map(|name| name.parse::<Username>())
            .transpose()
            .map_err(|error| Error::Usage(error.to_string()))?;
        if self.settings()?.discoverable {
            self.publish_username(username.as_ref()).await?;
        }
        self.db.execute(
            "UPDATE account SET username = ?1 WHERE id = 1",
            params![username.as_ref().map(Username::as_str)],
        )?;
        Ok(username)
    }

    async fn publish_username(&mut self, username: Option<&Username>) -> Result<(), Error> {
        self.connect().await?;
        let name_hash = username.map_or_else(Vec::new, |name| name.hash().to_vec());
        match self
            .call(Request::SetUsername(wire::SetUsername { name_hash }))
            .await
        {
            Ok(_) => Ok(()),
            Err(Error::Server(error)) if error.code == wire::ErrorCode::AlreadyExists => Err(
                Error::Usage("that username is taken; choose another".into()),
            ),
            Err(error) => Err(error),
        }
    }

    /// Starts a conversation with whoever published `username`. We are strangers to them:
    /// they see a message request (with our name and first messages), and we learn their name
    /// and hear back only when they accept it. `name` is what we call them locally; without
    /// it, the username until they tell us their name.
    pub async fn add_by_username(
        &mut self,
        username: &str,
        name: Option<&str>,
    ) -> Result<Contact, Error> {
        let username: Username =
            username
                .parse()
                .map_err(|error: miyu_proto::username::UsernameError| {
                    Error::Usage(error.to_string())
                })?;
        self.connect().await?;
        let claimed = match self
            .call(Request::LookupUsername(wire::LookupUsername {
                name_hash: username.hash().to_vec(),
            }))
            .await
        {
            Ok(Reply::InviteClaimed(claimed)) => claimed,
            Ok(other) => return Err(Error::Protocol(format!("unexpected answer: {other:?}"))),
            Err(Error::Server(error)) if error.code == wire::ErrorCode::NotFound => {
                return Err(Error::Usage(format!(
                    "nobody can be found as {username} (the name is unknown, or not discoverable)"
                )));
            }
            Err(error) => return Err(error),
        };
        self.start_conversation(claimed, None, name, Some(username.as_str()))
            .await
    }

    // -----------------------------------------------------------------------------------------
    // Account lifetime
    // -----------------------------------------------------------------------------------------

    /// Tells the server to delete the account if no device of it connects for `months` (1, 3,
    /// 6 or 12; 12 unless changed).
    pub async fn set_account_lifetime(&mut self, months: u32) -> Result<(), Error> {
        let days = match months {
            1 => 30,
            3 => 91,
            6 => 182,
            12 => 365,
            _ => {
                return Err(Error::Usage(
                    "an account lifetime is 1, 3, 6 or 12 months".into(),
                ));
            }
        };
        self.connect().await?;
        self.call(Request::SetAccountLifetime(wire::SetAccountLifetime {
            days,
        }))
        .await?;
        Ok(())
    }

    /// Deletes the account on the server (devices, key packages, inboxes, memberships,
    /// invites, username), then this profile's files. Contacts are not told; their
    /// conversations with us simply go quiet.
    pub async fn delete_account(mut self, profile: &std::path::Path) -> Result<(), Error> {
        self.connect().await?;
        self.call(Request::DeleteAccount(wire::DeleteAccount {}))
            .await?;
        self.disconnect().await;
        drop(self);
        for name in [
            "miyu.db",
            "miyu.db-wal",
            "miyu.db-shm",
            "vault",
            "key",
            "lock",
        ] {
            let path = profile.join(name);
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(Error::Io {
                        context: format!("deleting {}", path.display()),
                        source,
                    });
                }
            }
        }
        // Only if nothing else was put there.
        let _ = std::fs::remove_dir(profile);
        Ok(())
    }

    // -----------------------------------------------------------------------------------------
    // Message requests
    // -----------------------------------------------------------------------------------------

    /// Strangers who wrote, waiting for `accept_request`, `decline_request` or `block`.
    pub fn requests(&self) -> Result<Vec<MessageRequest>, Error> {
        let waiting: Vec<(String, String, u64)> = {
            let mut statement = self.db.prepare(
                "SELECT name, account_id, added_at_ms FROM contacts WHERE state = 'unsolicited'
                 ORDER BY added_at_ms, name",
            )?;
            statement
                .query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))?
                .collect::<Result<_, _>>()?
        };
        waiting
            .into_iter()
            .map(|(name, account_id, received_at_ms)| {
                Ok(MessageRequest {
                    messages: history(&self.db, &account_id, &name)?,
                    name,
                    account_id,
                    received_at_ms,
                })
            })
            .collect()
    }

    fn request_account(&self, name: &str) -> Result<String, Error> {
        self.db
            .query_row(
                "SELECT account_id FROM contacts WHERE name = ?1 AND state = 'unsolicited'",
                params![name],
                |row| row.get(0),
            )
            .optional()?
            .ok_or_else(|| {
                Error::Usage(format!(
                    "no message request from {name:?}; `miyu requests` lists them"
                ))
            })
    }

    /// Makes a stranger a contact and introduces us to them (the first thing they hear back).
    pub async fn accept_request(
        &mut self,
        name: &str,
        rename: Option<&str>,
    ) -> Result<Contact, Error> {
        let account = self.request_account(name)?;
        let group_id: Vec<u8> = self.db.query_row(
            "SELECT group_id FROM conversations WHERE contact = ?1 ORDER BY rowid DESC LIMIT 1",
            params![account],
            |row| row.get(0),
        )?;
        let name = db::in_transaction(&self.db, |db| {
            let name = match rename {
                Some(new) => db::free_contact_name(db, new.trim(), &account)?,
                None => name.to_string(),
            };
            db.execute(
                "UPDATE contacts SET state = 'accepted', name = ?1, named_locally = ?2 WHERE account_id = ?3",
                params![name, rename.is_some(), account],
            )?;
            let profile = wire::app_message::Body::Profile(wire::Profile {
                name: self.name.clone(),
                invite_proof: Vec::new(),
            });
            self.queue_app_message_in(db, &group_id, profile, None)?;
            self.share_contact_in(db, &account)?;
            Ok(name)
        })?;
        // Accepted locally either way; the introduction waits in the outbox if offline.
        if let Err(error) = self.flush().await
            && !error.is_transient()
        {
            return Err(error);
        }
        Ok(Contact {
            name,
            account_id: account,
            verified: false,
            online: false,
            last_seen_ms: None,
            unread: 0,
        })
    }

    /// Deletes a request and everything it said. The stranger learns nothing; they may write
    /// again (to stop that, `block`).
    pub fn decline_request(&self, name: &str) -> Result<(), Error> {
        let account = self.request_account(name)?;
        db::in_transaction(&self.db, |db| {
            forget_contact(db, &account)?;
            self.queue_sync_in(
                db,
                wire::Sync {
                    declined: account_bytes(&account).into_iter().collect(),
                    ..Default::default()
                },
            )?;
            Ok(())
        })?;
        self.checkpoint()
    }

    /// Declines a request and drops everything this account sends from now on.
    pub fn block_request(&self, name: &str) -> Result<(), Error> {
        let account = self.request_account(name)?;
        db::in_transaction(&self.db, |db| {
            block(db, &account)?;
            self.share_block_in(db, &account, true)
        })?;
        self.checkpoint()
    }

    /// The blocked accounts (their names went with their requests), most recent first.
    pub fn blocked(&self) -> Result<Vec<Blocked>, Error> {
        let mut statement = self
            .db
            .prepare("SELECT account_id, blocked_at_ms FROM blocked ORDER BY blocked_at_ms DESC")?;
        let blocked = statement
            .query_map([], |row| {
                Ok(Blocked {
                    account_id: row.get(0)?,
                    blocked_at_ms: row.get(1)?,
                })
            })?
            .collect::<Result<_, _>>()?;
        Ok(blocked)
    }

    /// Lets a blocked account reach us again, as a stranger: its next invitation is a message
    /// request like anyone's.
    pub fn unblock(&self, account_id: &str) -> Result<(), Error> {
        db::in_transaction(&self.db, |db| {
            let removed = db.execute(
                "DELETE FROM blocked WHERE account_id = ?1",
                params![account_id.trim()],
            )?;
            if removed == 0 {
                return Err(Error::Usage(format!(
                    "{account_id} is not blocked; `miyu requests blocked` lists who is"
                )));
            }
            self.share_block_in(db, account_id.trim(), false)
        })
    }

    // -----------------------------------------------------------------------------------------
    // Receipts, typing, presence
    // -----------------------------------------------------------------------------------------

    /// Marks the contact's messages read, on every device of the account (told at this
    /// device's next connection). With read receipts on, tells the contact which (queued;
    /// returns true when receipts were queued, to be sent by `flush`).
    pub fn mark_read(&self, contact: &str) -> Result<bool, Error> {
        let (scope, group_id) = self.conversation_of(contact)?;
        // Receipts go to contacts only: in a group they would tell every member.
        let receipts = self.settings()?.read_receipts && !crate::groups::is_group_id(&group_id);
        db::in_transaction(&self.db, |db| {
            // Those another device of the account showed were answered with receipts there.
            let unread: Vec<Vec<u8>> = {
                let mut statement = db.prepare(&format!(
                    "SELECT m.message_id FROM messages m WHERE m.kind = 'text' AND {}
                     AND m.group_id IN (SELECT group_id FROM conversations WHERE scope = ?1)",
                    crate::mirror::UNREAD
                ))?;
                statement
                    .query_map(params![scope], |row| row.get(0))?
                    .collect::<Result<_, _>>()?
            };
            db.execute(
                "UPDATE messages SET read_at_ms = ?1 WHERE outgoing = 0 AND read_at_ms IS NULL
                 AND group_id IN (SELECT group_id FROM conversations WHERE scope = ?2)",
                params![now_ms(), scope],
            )?;
            // The account's other devices stop counting them as unread, once this device next
            // connects: posting now would tell the server when the user reads, receipts or not.
            let read = crate::mirror::advance_read(db, &scope)?;
            self.queue_sync_in(
                db,
                wire::Sync {
                    read,
                    ..Default::default()
                },
            )?;
            if !receipts || unread.is_empty() {
                return Ok(false);
            }
            for chunk in unread.chunks(500) {
                let receipt = wire::app_message::Body::Receipt(wire::Receipt {
                    read_message_ids: chunk.to_vec(),
                });
                self.queue_app_message_in(db, &group_id, receipt, None)?;
            }
            Ok(true)
        })
    }

    /// Whether the outbox holds something to post (`flush` posts it).
    pub fn outbox_waiting(&self) -> Result<bool, Error> {
        Ok(self
            .db
            .query_row("SELECT 1 FROM outbox LIMIT 1", [], |_| Ok(()))
            .optional()?
            .is_some())
    }

    /// Posts whatever the outbox holds (receipts queued by `mark_read`, say).
    pub async fn flush(&mut self) -> Result<(), Error> {
        self.connect().await?;
        self.flush_outbox().await
    }

    /// Tells the contact we are (or stopped) typing, if typing indicators are on; otherwise
    /// does nothing and returns false.
    pub async fn typing(&mut self, contact: &str, active: bool) -> Result<bool, Error> {
        if !self.settings()?.typing {
            return Ok(false);
        }
        let (_, group_id) = self.conversation_of(contact)?;
        if crate::groups::is_group_id(&group_id) {
            return Err(Error::Usage(
                "typing indicators are between contacts, not in groups".into(),
            ));
        }
        let typing = wire::app_message::Body::Typing(wire::Typing { active });
        self.queue_app_message(&group_id, typing, None)?;
        self.flush().await?;
        Ok(true)
    }

    /// Tells every contact we are online (or when we were last), if presence is shared with
    /// contacts. Front ends call it when they start and stop being used.
    pub async fn set_online(&mut self, online: bool) -> Result<(), Error> {
        if self.settings()?.presence == Presence::Contacts {
            self.send_presence(online, false).await?;
        }
        Ok(())
    }

    /// Tells the account's other devices that an account is blocked or unblocked.
    fn share_block_in(&self, db: &Connection, account: &str, blocked: bool) -> Result<(), Error> {
        let blocked = account_bytes(account)
            .map(|account_id| wire::SyncBlock {
                account_id,
                blocked,
            })
            .into_iter()
            .collect();
        self.queue_sync_in(
            db,
            wire::Sync {
                blocked,
                ..Default::default()
            },
        )?;
        Ok(())
    }

    /// Sends last seen to contacts when presence is shared and the last one is old.
    pub(crate) async fn refresh_presence(&mut self) -> Result<(), Error> {
        if self.settings()?.presence == Presence::Nobody {
            return Ok(());
        }
        let sent: u64 = self.db.query_row(
            "SELECT presence_sent_ms FROM account WHERE id = 1",
            [],
            |row| row.get(0),
        )?;
        if now_ms().saturating_sub(sent) < PRESENCE_INTERVAL_MS {
            return Ok(());
        }
        self.send_presence(false, false).await
    }

    /// Queues a Presence to every contact and posts it; `forget` asks them to drop what we
    /// shared before.
    async fn send_presence(&mut self, online: bool, forget: bool) -> Result<(), Error> {
        let now = now_ms();
        let minute = now - now % 60_000;
        let presence = wire::Presence {
            online: online && !forget,
            last_seen_ms: if forget { 0 } else { minute },
        };
        db::in_transaction(&self.db, |db| {
            let groups: Vec<Vec<u8>> = {
                let mut statement = db.prepare(
                    "SELECT v.group_id FROM conversations v JOIN contacts c ON c.account_id = v.contact
                     WHERE c.state = 'accepted' AND v.broken IS NULL
                     AND v.rowid = (SELECT max(rowid) FROM conversations WHERE contact = c.account_id)",
                )?;
                statement
                    .query_map([], |row| row.get(0))?
                    .collect::<Result<_, _>>()?
            };
            for group_id in groups {
                let body = wire::app_message::Body::Presence(presence);
                self.queue_app_message_in(db, &group_id, body, None)?;
            }
            db.execute(
                "UPDATE account SET presence_sent_ms = ?1 WHERE id = 1",
                params![now],
            )?;
            Ok(())
        })?;
        match self.flush().await {
            Err(error) if !error.is_transient() => Err(error),
            _ => Ok(()),
        }
    }

    // -----------------------------------------------------------------------------------------
    // Disappearing messages
    // -----------------------------------------------------------------------------------------

    /// Sets the conversation's disappearing-message timer (0 turns it off) for both sides.
    /// Messages sent from then on disappear that long after they were sent, on every device,
    /// and the server drops their ciphertext then too.
    pub async fn set_timer(&mut self, contact: &str, seconds: u32) -> Result<MessageView, Error> {
        if !valid_timer(seconds) {
            return Err(Error::Usage(
                "a timer is between 30 seconds and 4 weeks".into(),
            ));
        }
        let (scope, group_id) = self.conversation_of(contact)?;
        let body = timer_notice("you", seconds);
        db::in_transaction(&self.db, |db| {
            db.execute(
                "UPDATE conversations SET timer_s = ?1 WHERE scope = ?2",
                params![seconds, scope],
            )?;
            let timer = wire::app_message::Body::Timer(wire::Timer { seconds });
            self.queue_app_message_in(db, &group_id, timer, Some(&body))
        })?;
        let state = match self.flush().await {
            Ok(()) => MessageState::Sent,
            Err(error) if error.is_transient() => MessageState::Pending,
            Err(error) => return Err(error),
        };
        Ok(MessageView {
            contact: contact.to_string(),
            from: "me".into(),
            outgoing: true,
            body,
            sent_at_ms: now_ms(),
            state,
            kind: MessageKind::Timer,
            expires_at_ms: None,
            ..Default::default()
        })
    }

    /// The conversation's timer in seconds (0: off).
    pub fn timer(&self, contact: &str) -> Result<u32, Error> {
        let (_, group_id) = self.conversation_of(contact)?;
        Ok(self.db.query_row(
            "SELECT timer_s FROM conversations WHERE group_id = ?1",
            params![group_id],
            |row| row.get(0),
        )?)
    }

    /// Deletes messages whose time is up, then folds the write-ahead log into the database
    /// and truncates it, so that no copy of them is left in either file (deleted pages are
    /// zeroed: the database runs with `secure_delete`). Returns how many went.
    pub fn delete_expired(&self) -> Result<usize, Error> {
        delete_expired(&self.db, now_ms())
    }

    pub(crate) fn checkpoint(&self) -> Result<(), Error> {
        checkpoint(&self.db)
    }
}

fn delete_expired(db: &Connection, now: u64) -> Result<usize, Error> {
    // Runs before every event: one probe of the expiry index unless something is due. An
    // outbox entry never expires without its message row.
    let next: Option<u64> = db
        .prepare_cached("SELECT min(expires_at_ms) FROM messages WHERE expires_at_ms IS NOT NULL")?
        .query_row([], |row| row.get(0))?;
    if next.is_none_or(|at| at > now) {
        return Ok(0);
    }
    let deleted = db::in_transaction(db, |db| {
        crate::files::remove_partials(
            db,
            "m.expires_at_ms IS NOT NULL AND m.expires_at_ms <= ?1",
            i64::try_from(now).unwrap_or(i64::MAX),
        )?;
        let messages = db.execute(
            "DELETE FROM messages WHERE expires_at_ms IS NOT NULL AND expires_at_ms <= ?1",
            params![now],
        )?;
        db.execute(
            "DELETE FROM outbox WHERE expires_at_ms IS NOT NULL AND expires_at_ms <= ?1",
            params![now],
        )?;
        Ok(messages)
    })?;
    if deleted > 0 {
        checkpoint(db)?;
    }
    Ok(deleted)
}

/// Copies the write-ahead log into the database and truncates it to nothing.
pub(crate) fn checkpoint(db: &Connection) -> Result<(), Error> {
    db.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
    Ok(())
}

/// Deletes receipts or typing notices still waiting in the outbox, so that turning them off
/// also stops what was queued while offline.
fn drop_queued_signals(db: &Connection, receipts: bool, typing: bool) -> Result<(), Error> {
    use prost::Message as _;
    let queued: Vec<(i64, Vec<u8>)> = {
        let mut statement =
            db.prepare("SELECT id, plaintext FROM outbox WHERE message_row IS NULL")?;
        statement
            .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?
            .collect::<Result<_, _>>()?
    };
    for (id, plaintext) in queued {
        let body = wire::AppMessage::decode(plaintext.as_slice())
            .ok()
            .and_then(|message| message.body);
        let drop = match body {
            Some(wire::app_message::Body::Receipt(_)) => receipts,
            Some(wire::app_message::Body::Typing(_)) => typing,
            _ => false,
        };
        if drop {
            db.execute("DELETE FROM outbox WHERE id = ?1", params![id])?;
        }
    }
    Ok(())
}

/// What changes on this device with a setting, here or on another device of the account:
/// signals queued while they were on are dropped when turned off, and the contacts' presence
/// is forgotten when ours is no longer shared.
pub(crate) fn after_setting_changed(
    db: &Connection,
    before: &Settings,
    after: &Settings,
) -> Result<(), Error> {
    if (before.read_receipts && !after.read_receipts) || (before.typing && !after.typing) {
        drop_queued_signals(db, !after.read_receipts, !after.typing)?;
    }
    if after.presence == Presence::Nobody && before.presence != Presence::Nobody {
        db.execute(
            "UPDATE contacts SET online = 0, last_seen_ms = NULL, presence_at_ms = NULL",
            [],
        )?;
    }
    Ok(())
}

/// Forgets an account and drops everything it sends from now on.
pub(crate) fn block(db: &Connection, account: &str) -> Result<(), Error> {
    forget_contact(db, account)?;
    db.execute(
        "INSERT OR IGNORE INTO blocked (account_id, blocked_at_ms) VALUES (?1, ?2)",
        params![account, now_ms()],
    )?;
    Ok(())
}

/// Forgets a message request, or a stranger held unseen (and nothing else: a contact stays).
pub(crate) fn forget_request(db: &Connection, account: &str) -> Result<(), Error> {
    let unsolicited = db
        .query_row(
            "SELECT 1 FROM contacts WHERE account_id = ?1 AND state IN ('unsolicited', 'held')",
            params![account],
            |_| Ok(()),
        )
        .optional()?
        .is_some();
    if unsolicited {
        forget_contact(db, account)?;
    }
    Ok(())
}

/// An account id as the wire carries it (16 bytes), from its text form.
fn account_bytes(account: &str) -> Option<Vec<u8>> {
    account
        .parse::<miyu_proto::AccountId>()
        .ok()
        .map(|account| account.as_bytes().to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timers_parse_within_range() {
        assert_eq!(parse_timer("30s").unwrap(), 30);
        assert_eq!(parse_timer("5m").unwrap(), 300);
        assert_eq!(parse_timer("1h").unwrap(), 3600);
        assert_eq!(parse_timer("2d").unwrap(), 2 * 86_400);
        assert_eq!(parse_timer("4w").unwrap(), MAX_TIMER_S);
        assert_eq!(parse_timer("off").unwrap(), 0);
        for bad in ["29s", "5w", "1y", "h", "", "-1h", "99999999999w"] {
            assert!(parse_timer(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_message_of_our_other_device_stands_against_a_deletion_someone_else_sent_first() {
        let folder = tempfile::tempdir().unwrap();
        let mut db = Connection::open(folder.path().join("p.db")).unwrap();
        crate::db::configure(&mut db).unwrap();
        let group_id = [1u8; 16];
        let message_id = [2u8; 16];
        let received = |own: bool, sender: Option<&'static str>| Received {
            group_id: &group_id,
            seq: 3,
            contact_account: "bob",
            contact_name: "bob",
            conversation_name: "bob",
            sender,
            message_id: &message_id,
            sent_at_ms: 5,
            expires_in_s: 0,
            own,
        };
        // A member's deletion of the message arrived first (the server reordered the log).
        db.execute(
            "INSERT INTO messages (group_id, message_id, outgoing, body, sent_at_ms, received_at_ms, state, kind, deleted, sender)
             VALUES (?1, ?2, 0, '', 1, 1, 'received', 'text', 1, 'mallory')",
            params![group_id.as_slice(), message_id.as_slice()],
        )
        .unwrap();
        let row = store_message(&db, &received(true, None), "from my laptop", "text")
            .unwrap()
            .expect("stored");
        let (body, outgoing, state, deleted): (String, bool, String, bool) = db
            .query_row(
                "SELECT body, outgoing, state, deleted FROM messages WHERE id = ?1",
                params![row],
                |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?)),
            )
            .unwrap();
        assert_eq!(
            (body.as_str(), outgoing, state.as_str(), deleted),
            ("from my laptop", true, "sent", false)
        );
        // A repeat is not stored twice.
        assert!(
            store_message(&db, &received(true, None), "again", "text")
                .unwrap()
                .is_none()
        );
    }

    fn files_contain(folder: &std::path::Path, needle: &[u8]) -> bool {
        std::fs::read_dir(folder).unwrap().any(|entry| {
            let bytes = std::fs::read(entry.unwrap().path()).unwrap();
            bytes.windows(needle.len()).any(|window| window == needle)
        })
    }

    /// The profile is encrypted, so its raw files never show a message anyway; this runs the
    /// same configuration on an unencrypted file to see what deletion leaves behind.
    #[test]
    fn an_expired_message_leaves_no_copy_in_the_database_or_its_log() {
        let folder = tempfile::tempdir().unwrap();
        let db = Connection::open(folder.path().join("miyu.db")).unwrap();
        let mut db = db;
        db::configure(&mut db).unwrap();
        let insert = |body: &str, expires_at_ms: Option<u64>| {
            db.execute(
                "INSERT INTO messages (group_id, message_id, outgoing, body, sent_at_ms, received_at_ms, state, expires_at_ms)
                 VALUES (x'01', ?1, 0, ?2, 0, 0, 'received', ?3)",
                params![body.as_bytes(), body, expires_at_ms],
            )
            .unwrap();
        };
        insert("MARKER-kept-1f3a", None);
        insert("MARKER-gone-9c2e", Some(1_000));
        assert!(files_contain(folder.path(), b"MARKER-gone-9c2e"));

        assert_eq!(delete_expired(&db, 999).unwrap(), 0);
        assert_eq!(delete_expired(&db, 1_000).unwrap(), 1);
        assert!(!files_contain(folder.path(), b"MARKER-gone-9c2e"));
        // The scan does see what is still stored.
        assert!(files_contain(folder.path(), b"MARKER-kept-1f3a"));
        let wal = folder.path().join("miyu.db-wal");
        assert_eq!(std::fs::metadata(wal).map(|m| m.len()).unwrap_or(0), 0);
    }

    #[test]
    fn timers_read_in_the_largest_whole_unit() {
        assert_eq!(timer_text(30), "30 seconds");
        assert_eq!(timer_text(3600), "1 hour");
        assert_eq!(timer_text(90), "90 seconds");
        assert_eq!(timer_text(14 * 86_400), "2 weeks");
        assert_eq!(timer_text(0), "off");
    }
}
