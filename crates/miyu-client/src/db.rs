//! The client's local database: account keys, contacts, conversations, messages and the
//! outbox. OpenMLS keeps its own tables in the same file, so an incoming message's MLS state
//! change and its stored plaintext commit together.

use std::path::Path;

use rusqlite::{Connection, OptionalExtension, params};

use crate::Error;
use crate::vault::DatabaseKey;

pub(crate) const SCHEMA_VERSION: i64 = 9;

const SCHEMA: &str = "
CREATE TABLE account (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    server TEXT NOT NULL,
    name TEXT NOT NULL,
    identity_secret BLOB NOT NULL,
    device_secret BLOB NOT NULL,
    registered INTEGER NOT NULL DEFAULT 0,
    inbox_cursor INTEGER NOT NULL DEFAULT 0,
    -- socks5h://IP:PORT that every connection goes through, or NULL.
    proxy TEXT
);
CREATE TABLE contacts (
    account_id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    named_locally INTEGER NOT NULL DEFAULT 0,
    certificate BLOB NOT NULL,
    verified INTEGER NOT NULL DEFAULT 0,
    added_at_ms INTEGER NOT NULL,
    -- 'accepted': we accepted their invite, or they proved they used one of ours;
    -- 'pending': joined from a Welcome, their introduction has not arrived yet;
    -- 'unsolicited': their introduction did not carry a token of ours: a message request.
    state TEXT NOT NULL DEFAULT 'accepted'
);
CREATE TABLE conversations (
    group_id BLOB PRIMARY KEY,
    contact TEXT NOT NULL REFERENCES contacts(account_id),
    cursor INTEGER NOT NULL DEFAULT 0,
    -- A CreateGroup request not yet acknowledged by the server, retried on connect.
    announce BLOB,
    -- When this device last replaced its keys in the conversation (an MLS self-update).
    last_update_ms INTEGER NOT NULL DEFAULT 0,
    -- SHA-256 of our commit while the server has not yet said whether it won the epoch.
    pending_commit_hash BLOB,
    -- Why this conversation cannot be used any more (it fell out of sync), or NULL.
    broken TEXT
);
CREATE TABLE invites (
    token BLOB PRIMARY KEY,
    created_at_ms INTEGER NOT NULL,
    used INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE messages (
    id INTEGER PRIMARY KEY,
    group_id BLOB NOT NULL,
    message_id BLOB NOT NULL,
    outgoing INTEGER NOT NULL,
    body TEXT NOT NULL,
    sent_at_ms INTEGER NOT NULL,
    received_at_ms INTEGER NOT NULL,
    state TEXT NOT NULL,
    seq INTEGER,
    ciphertext_hash BLOB,
    UNIQUE (group_id, message_id)
);
CREATE INDEX messages_by_conversation ON messages (group_id, id);
CREATE TABLE outbox (
    id INTEGER PRIMARY KEY,
    group_id BLOB NOT NULL,
    epoch INTEGER NOT NULL,
    ciphertext BLOB NOT NULL,
    plaintext BLOB NOT NULL,
    message_row INTEGER
);
";

/// Version 2: settings, message requests, disappearing messages, receipts and presence.
const MIGRATION_2: &str = "
CREATE TABLE settings (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
-- Accounts whose invitations and messages are dropped unseen.
CREATE TABLE blocked (
    account_id TEXT PRIMARY KEY,
    blocked_at_ms INTEGER NOT NULL
);
-- This account's username, published only while discoverable.
ALTER TABLE account ADD COLUMN username TEXT;
-- When presence was last sent to contacts.
ALTER TABLE account ADD COLUMN presence_sent_ms INTEGER NOT NULL DEFAULT 0;
-- What the contact last said about being online (shown only while our presence is shared).
ALTER TABLE contacts ADD COLUMN online INTEGER NOT NULL DEFAULT 0;
ALTER TABLE contacts ADD COLUMN last_seen_ms INTEGER;
ALTER TABLE contacts ADD COLUMN presence_at_ms INTEGER;
-- Texts received from a stranger before their request was answered.
ALTER TABLE contacts ADD COLUMN request_messages INTEGER NOT NULL DEFAULT 0;
-- Disappearing-message timer of the conversation, seconds; 0 for none.
ALTER TABLE conversations ADD COLUMN timer_s INTEGER NOT NULL DEFAULT 0;
-- 'text', or 'timer' for a notice that the timer changed.
ALTER TABLE messages ADD COLUMN kind TEXT NOT NULL DEFAULT 'text';
-- When the message is deleted, Unix milliseconds; NULL: kept.
ALTER TABLE messages ADD COLUMN expires_at_ms INTEGER;
-- Incoming: when we read it. Outgoing: when the contact said they read it.
ALTER TABLE messages ADD COLUMN read_at_ms INTEGER;
CREATE INDEX messages_by_expiry ON messages (expires_at_ms) WHERE expires_at_ms IS NOT NULL;
ALTER TABLE outbox ADD COLUMN expires_at_ms INTEGER;
";

/// Version 3: files, and replies, edits, deletion for everyone, reactions and forwarding.
const MIGRATION_3: &str = "
-- The message_id this message answers.
ALTER TABLE messages ADD COLUMN reply_to BLOB;
ALTER TABLE messages ADD COLUMN forwarded INTEGER NOT NULL DEFAULT 0;
-- When its author last edited it.
ALTER TABLE messages ADD COLUMN edited_at_ms INTEGER;
-- Deleted for everyone by its author: the body is gone, the row stays as a notice.
ALTER TABLE messages ADD COLUMN deleted INTEGER NOT NULL DEFAULT 0;
-- One reaction per person and message; `account` is 'me' or the reacting account.
CREATE TABLE reactions (
    message_row INTEGER NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
    account TEXT NOT NULL,
    emoji TEXT NOT NULL,
    at_ms INTEGER NOT NULL,
    PRIMARY KEY (message_row, account)
);
-- A file message's key and where its encrypted bytes are. Goes with its message.
CREATE TABLE files (
    id INTEGER PRIMARY KEY,
    message_row INTEGER NOT NULL UNIQUE REFERENCES messages(id) ON DELETE CASCADE,
    blob_id BLOB NOT NULL,
    file_key BLOB NOT NULL,
    size INTEGER NOT NULL,
    chunk_size INTEGER NOT NULL,
    sha256 BLOB NOT NULL,
    name TEXT NOT NULL,
    mime TEXT NOT NULL,
    -- A download in progress, continued by the next `download`.
    part_path TEXT,
    -- Where the finished download was saved.
    saved_path TEXT
);
-- Uploads started and not yet sent as a message: what an interrupted send-file resumes.
CREATE TABLE uploads (
    id INTEGER PRIMARY KEY,
    group_id BLOB NOT NULL,
    source_path TEXT NOT NULL,
    source_size INTEGER NOT NULL,
    -- The source's ctime: an upload resumes only if the file has not changed since.
    source_changed_ns INTEGER NOT NULL,
    keep_metadata INTEGER NOT NULL,
    blob_id BLOB NOT NULL,
    file_key BLOB NOT NULL,
    size INTEGER NOT NULL,
    chunk_size INTEGER NOT NULL,
    created_at_ms INTEGER NOT NULL,
    UNIQUE (group_id, source_path)
);
";

/// Version 4: groups. A conversation belongs to a contact or to a group; `scope` names which
/// (the contact's account id, or `group:` and the group id in hex) for the queries that work
/// on "every conversation of this name".
const MIGRATION_4: &str = "
CREATE TABLE conversations_4 (
    group_id BLOB PRIMARY KEY,
    contact TEXT REFERENCES contacts(account_id),
    scope TEXT NOT NULL,
    cursor INTEGER NOT NULL DEFAULT 0,
    announce BLOB,
    last_update_ms INTEGER NOT NULL DEFAULT 0,
    pending_commit_hash BLOB,
    broken TEXT,
    timer_s INTEGER NOT NULL DEFAULT 0,
    -- The server refused this group's posting key: nothing is posted to the group until a key
    -- update registers a new one (posting attributed instead would tell the server who posts).
    posting_refused INTEGER NOT NULL DEFAULT 0
);
INSERT INTO conversations_4 (group_id, contact, scope, cursor, announce, last_update_ms, pending_commit_hash, broken, timer_s)
    SELECT group_id, contact, contact, cursor, announce, last_update_ms, pending_commit_hash, broken, timer_s FROM conversations;
DROP TABLE conversations;
ALTER TABLE conversations_4 RENAME TO conversations;
CREATE INDEX conversations_by_scope ON conversations (scope);
CREATE TABLE groups (
    group_id BLOB PRIMARY KEY REFERENCES conversations(group_id),
    -- This device's name for the group: unique, and never a contact's name.
    name TEXT NOT NULL UNIQUE,
    -- What the members' GroupInfo says.
    title TEXT NOT NULL DEFAULT '',
    description TEXT NOT NULL DEFAULT '',
    adding TEXT NOT NULL DEFAULT 'admins',
    posting TEXT NOT NULL DEFAULT 'everyone',
    editing TEXT NOT NULL DEFAULT 'admins',
    -- The group's picture (a small image without metadata) and its MIME type.
    avatar BLOB,
    avatar_mime TEXT,
    -- 'pending': joined from a Welcome, the group's info has not arrived (not shown);
    -- 'active'; 'declined' (the adder was not allowed to add us); 'left'; 'removed'.
    state TEXT NOT NULL,
    -- A Leave is queued; the server is told once it is posted.
    leaving INTEGER NOT NULL DEFAULT 0,
    -- Who added this device (signed the Welcome): the only member whose GroupInfo counts
    -- while the group is pending.
    adder TEXT,
    created_at_ms INTEGER NOT NULL
);
-- The accounts in each group as this device knows them (the MLS tree is the truth).
CREATE TABLE group_members (
    group_id BLOB NOT NULL REFERENCES groups(group_id) ON DELETE CASCADE,
    account_id TEXT NOT NULL,
    -- 'owner', 'admin' or 'member'
    role TEXT NOT NULL DEFAULT 'member',
    -- The name the member gave in this group.
    name TEXT,
    certificate BLOB NOT NULL,
    -- Added by someone without the right to: nothing is sent to the group until an admin
    -- removes them.
    unapproved INTEGER NOT NULL DEFAULT 0,
    -- Said it leaves; an admin's device removes its leaves.
    leaving INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (group_id, account_id)
);
-- The group member who wrote an incoming group message (NULL in one-to-one conversations).
ALTER TABLE messages ADD COLUMN sender TEXT;
-- An incoming group text that mentions this account.
ALTER TABLE messages ADD COLUMN mentions_me INTEGER NOT NULL DEFAULT 0;
-- A group's invite link: whoever connects through it asks to join that group, added at once
-- or once this device's user approves. It serves `uses_left` more people.
ALTER TABLE invites ADD COLUMN group_id BLOB;
ALTER TABLE invites ADD COLUMN uses_left INTEGER NOT NULL DEFAULT 1;
ALTER TABLE invites ADD COLUMN approval INTEGER NOT NULL DEFAULT 0;
-- People who asked to join a group through its link: 'waiting' for approval, or 'approved'
-- (added at the next sync).
CREATE TABLE group_requests (
    group_id BLOB NOT NULL REFERENCES groups(group_id) ON DELETE CASCADE,
    account_id TEXT NOT NULL,
    state TEXT NOT NULL,
    requested_at_ms INTEGER NOT NULL,
    PRIMARY KEY (group_id, account_id)
);
-- Accounts whose group we asked to join through its link: their adding us is welcome whatever
-- the `group_invites` setting says, until `until_ms`.
CREATE TABLE expected_groups (
    account_id TEXT PRIMARY KEY,
    until_ms INTEGER NOT NULL
);
";

/// Version 5: a Welcome whose group tree could not be fetched for a reason that may pass (the
/// network, the server busy): which inbox entry, and how many tries, so that one that never
/// succeeds stops holding up the inbox.
const MIGRATION_5: &str = "
ALTER TABLE account ADD COLUMN welcome_seq INTEGER NOT NULL DEFAULT 0;
ALTER TABLE account ADD COLUMN welcome_attempts INTEGER NOT NULL DEFAULT 0;
";

/// Version 6: devices linked to the account. A linked device keeps no identity key (an empty
/// `identity_secret`) but the certificate the account gave it; names of the account's devices
/// as this device knows them (the server never learns them).
const MIGRATION_6: &str = "
ALTER TABLE account ADD COLUMN certificate BLOB;
CREATE TABLE devices (
    device_id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    -- Revoked: never to be added to a conversation again, and removed from those it is in.
    revoked_at_ms INTEGER
);
";

/// Version 7: the account's recovery key (on the device holding the identity key), to show it
/// again, and the key its backups are sealed under (derived from it and the recovery
/// passphrase, which is not kept).
const MIGRATION_7: &str = "
ALTER TABLE account ADD COLUMN recovery_key BLOB;
ALTER TABLE account ADD COLUMN backup_key BLOB;
";

/// Version 8: what the account's devices share: how far each conversation is read (its
/// messages up to this seq of the group log count as read here too, whenever they arrive), and
/// introductions an invite made on another device may answer (such a stranger is kept in the
/// contact state 'held', unseen, while message requests are off).
const MIGRATION_8: &str = "
ALTER TABLE conversations ADD COLUMN read_seq INTEGER NOT NULL DEFAULT 0;
-- A message request's introduction that matched none of this device's invites: checked again
-- when another device of the account tells of an invite it made (the conversation, the
-- sender's certificate and the proof).
ALTER TABLE contacts ADD COLUMN intro_group_id BLOB;
ALTER TABLE contacts ADD COLUMN intro_certificate BLOB;
ALTER TABLE contacts ADD COLUMN intro_proof BLOB;
-- The identity key's signature over a revoked device's revocation: with it any device of the
-- account may remove the device from a group.
ALTER TABLE devices ADD COLUMN revocation BLOB;
-- The server has taken the revocation (this device sent it, or learned it from another).
ALTER TABLE devices ADD COLUMN revoked_at_server INTEGER NOT NULL DEFAULT 0;
";

/// Version 9: incremental backups. The keys of rows a backup holds that changed since the last
/// backup, noted by the triggers `history::track_changes` makes once `backup_tracking` is set
/// (at the first backup), and the chain of backup segments this device last stored on the
/// server: how many, the last one's blob and digest (the next is bound to it), the sizes of the
/// whole segment and of the changes after it, and the schema they follow.
const MIGRATION_9: &str = "
CREATE TABLE backup_changes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    table_name TEXT NOT NULL,
    -- The row's primary key, of one or two columns ('' for the second of one), as stored.
    key_1,
    key_2 NOT NULL DEFAULT '',
    UNIQUE (table_name, key_1, key_2)
);
ALTER TABLE account ADD COLUMN backup_tracking INTEGER NOT NULL DEFAULT 0;
CREATE TABLE backup_chain (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    segments INTEGER NOT NULL,
    last_blob BLOB NOT NULL,
    last_digest BLOB NOT NULL,
    whole_size INTEGER NOT NULL,
    changes_size INTEGER NOT NULL,
    schema INTEGER NOT NULL
);
";

/// Opens (or creates) the profile database, encrypted with `key`. A wrong key is reported as
/// [`Error::Locked`].
pub(crate) fn open(path: &Path, key: &DatabaseKey) -> Result<Connection, Error> {
    let mut connection = Connection::open(path)?;
    apply_key(&connection, key)?;
    configure(&mut connection)?;
    Ok(connection)
}

/// Settings and schema of a profile database whose key (if any) is already set.
pub(crate) fn configure(connection: &mut Connection) -> Result<(), Error> {
    connection.pragma_update(None, "journal_mode", "WAL")?;
    connection.pragma_update(None, "synchronous", "FULL")?;
    connection.pragma_update(None, "foreign_keys", true)?;
    connection.pragma_update(None, "secure_delete", true)?;
    // A row that INSERT OR REPLACE removes for a unique column other than its key fires its
    // delete triggers, so that backups learn it went.
    connection.pragma_update(None, "recursive_triggers", true)?;
    connection.busy_timeout(std::time::Duration::from_secs(5))?;
    let version: i64 = connection.query_row("PRAGMA user_version", [], |row| row.get(0))?;
    match version {
        0..=8 => {
            let transaction = connection.transaction()?;
            if version == 0 {
                transaction.execute_batch(SCHEMA)?;
            }
            if version < 2 {
                transaction.execute_batch(MIGRATION_2)?;
            }
            if version < 3 {
                transaction.execute_batch(MIGRATION_3)?;
            }
            if version < 4 {
                transaction.execute_batch(MIGRATION_4)?;
            }
            if version < 5 {
                transaction.execute_batch(MIGRATION_5)?;
            }
            if version < 6 {
                transaction.execute_batch(MIGRATION_6)?;
            }
            if version < 7 {
                transaction.execute_batch(MIGRATION_7)?;
            }
            if version < 8 {
                transaction.execute_batch(MIGRATION_8)?;
            }
            transaction.execute_batch(MIGRATION_9)?;
            // After every migration: the tables and columns may have changed.
            crate::history::track_changes(&transaction)?;
            transaction.pragma_update(None, "user_version", SCHEMA_VERSION)?;
            transaction.commit()?;
        }
        SCHEMA_VERSION => {}
        newer => {
            return Err(Error::Usage(format!(
                "this profile was written by a newer miyu (schema {newer}); update miyu"
            )));
        }
    }
    miyu_crypto::mls::migrate(connection)?;
    Ok(())
}

/// Checks that `key` opens the existing database at `path`, changing nothing; a wrong key is
/// reported as [`Error::Locked`].
pub(crate) fn check_key(path: &Path, key: &DatabaseKey) -> Result<(), Error> {
    use rusqlite::OpenFlags;
    // Read-write without create: a reader of a WAL database may need to set up its index.
    let connection = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    apply_key(&connection, key)
}

fn apply_key(connection: &Connection, key: &DatabaseKey) -> Result<(), Error> {
    // The key must be the first thing SQLCipher hears on a connection.
    connection.execute_batch(&key.pragma())?;
    let readable = connection.query_row("SELECT count(*) FROM sqlite_master", [], |row| {
        row.get::<_, i64>(0)
    });
    if let Err(rusqlite::Error::SqliteFailure(failure, _)) = &readable
        && failure.code == rusqlite::ErrorCode::NotADatabase
    {
        return Err(Error::Locked(
            "wrong passphrase (or this is not a miyu profile database)".into(),
        ));
    }
    readable?;
    Ok(())
}

/// Runs `body` in one write transaction: all of it is stored, or none.
pub(crate) fn in_transaction<T>(
    connection: &Connection,
    body: impl FnOnce(&Connection) -> Result<T, Error>,
) -> Result<T, Error> {
    connection.execute_batch("BEGIN IMMEDIATE")?;
    match body(connection) {
        Ok(value) => match connection.execute_batch("COMMIT") {
            Ok(()) => Ok(value),
            Err(error) => {
                // Never leave the connection inside a transaction.
                let _ = connection.execute_batch("ROLLBACK");
                Err(error.into())
            }
        },
        Err(error) => {
            let _ = connection.execute_batch("ROLLBACK");
            Err(error)
        }
    }
}

/// Like [`in_transaction`], but without waiting for the disk: for bookkeeping whose loss in a
/// power cut is harmless because it is redone (the write still survives a crash of the
/// process, and the next ordinary commit flushes it). SQLite allows the durability level to
/// change between transactions on one connection.
pub(crate) fn in_relaxed_transaction<T>(
    connection: &Connection,
    body: impl FnOnce(&Connection) -> Result<T, Error>,
) -> Result<T, Error> {
    connection.pragma_update(None, "synchronous", "NORMAL")?;
    let result = in_transaction(connection, body);
    connection.pragma_update(None, "synchronous", "FULL")?;
    result
}

/// A name no other contact and no group has yet: `wanted`, else `wanted-2`, `wanted-3`, ...
pub(crate) fn free_contact_name(
    connection: &Connection,
    wanted: &str,
    except_account: &str,
) -> Result<String, Error> {
    free_name(wanted, |name| {
        Ok(connection
            .query_row(
                "SELECT 1 FROM contacts WHERE name = ?1 AND account_id != ?2
                 UNION ALL SELECT 1 FROM groups WHERE name = ?1",
                params![name, except_account],
                |_| Ok(()),
            )
            .optional()?
            .is_some())
    })
}

/// The contact of a one-to-one conversation (none for a group or an unknown one).
pub(crate) fn conversation_contact(
    connection: &Connection,
    group_id: &[u8],
) -> Result<Option<String>, Error> {
    Ok(connection
        .query_row(
            "SELECT contact FROM conversations WHERE group_id = ?1",
            params![group_id],
            |row| row.get(0),
        )
        .optional()?
        .flatten())
}

/// A name for a group that no contact and no other group has: `wanted`, else `wanted-2`, ...
pub(crate) fn free_group_name(
    connection: &Connection,
    wanted: &str,
    except_group: &[u8],
) -> Result<String, Error> {
    free_name(wanted, |name| {
        Ok(connection
            .query_row(
                "SELECT 1 FROM contacts WHERE name = ?1
                 UNION ALL SELECT 1 FROM groups WHERE name = ?1 AND group_id != ?2",
                params![name, except_group],
                |_| Ok(()),
            )
            .optional()?
            .is_some())
    })
}

fn free_name(wanted: &str, taken: impl Fn(&str) -> Result<bool, Error>) -> Result<String, Error> {
    if !taken(wanted)? {
        return Ok(wanted.to_string());
    }
    for suffix in 2..10_000 {
        let candidate = format!("{wanted}-{suffix}");
        if !taken(&candidate)? {
            return Ok(candidate);
        }
    }
    Err(Error::Usage(format!(
        "too many contacts or groups are called {wanted}"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_version_1_profile_is_upgraded_in_place_and_keeps_its_contacts() {
        let folder = tempfile::tempdir().unwrap();
        let mut connection = Connection::open(folder.path().join("miyu.db")).unwrap();
        connection.execute_batch(SCHEMA).unwrap();
        connection.pragma_update(None, "user_version", 1).unwrap();
        connection
            .execute(
                "INSERT INTO contacts (account_id, name, certificate, added_at_ms) VALUES ('a', 'bob', x'00', 0)",
                [],
            )
            .unwrap();
        configure(&mut connection).unwrap();
        let version: i64 = connection
            .query_row("PRAGMA user_version", [], |row| row.get(0))
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        let (name, requests): (String, i64) = connection
            .query_row(
                "SELECT name, request_messages FROM contacts WHERE account_id = 'a'",
                [],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
            .unwrap();
        assert_eq!((name.as_str(), requests), ("bob", 0));
        connection
            .execute(
                "INSERT INTO settings (key, value) VALUES ('typing', 'on')",
                [],
            )
            .unwrap();
        // Changes are noted for backups once the account starts making them.
        connection
            .execute_batch(
                "INSERT INTO account (id, server, name, identity_secret, device_secret)
                     VALUES (1, 'server', 'me', x'', x'');
                 UPDATE contacts SET name = 'robert';
                 UPDATE account SET backup_tracking = 1;
                 UPDATE contacts SET name = 'bobby';",
            )
            .unwrap();
        let noted: Vec<(String, String)> = connection
            .prepare("SELECT table_name, key_1 FROM backup_changes")
            .unwrap()
            .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(noted, [("contacts".to_string(), "a".to_string())]);
    }
}
