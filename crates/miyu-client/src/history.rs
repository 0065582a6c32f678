//! An account's history as one of its devices hands it to a newly linked one, or to a backup:
//! the rows of the tables a user sees (contacts, conversations, messages, groups, settings),
//! without anything that belongs to the device that made it (its keys, MLS state, outbox,
//! uploads, cursors).
//!
//! The history is encoded as a `History` message (PROTOCOL.md §10.10), sealed like a file and
//! uploaded as a blob of the account; the key travels in the link's sealed answer.
//!
//! Backups after the first hold only what changed (PROTOCOL.md §10.11). Triggers note the key
//! of every row of these tables that is inserted, updated (in a column the history holds) or
//! deleted once the device makes backups; [`export_changes`] turns the noted keys into a
//! `History` of their current rows and the keys of those deleted, and [`apply`] plays such
//! changes onto a history rebuilt from a backup's segments.

use prost::Message as _;
use rusqlite::types::{Value, ValueRef};
use rusqlite::{Connection, params_from_iter};

use miyu_proto::wire;

use zeroize::Zeroizing;

use crate::{Error, db};

/// The oldest profile schema whose histories this version takes: the first that wrote them.
const OLDEST_SCHEMA: i64 = 6;

/// The tables handed over, in an order that satisfies their references, and the columns of
/// each whose value belongs to the device that made it: the new device starts them afresh.
const TABLES: &[(&str, &[(&str, Value)])] = &[
    ("settings", &[]),
    ("blocked", &[]),
    ("contacts", &[]),
    (
        "conversations",
        &[
            ("cursor", Value::Integer(0)),
            ("announce", Value::Null),
            ("last_update_ms", Value::Integer(0)),
            ("pending_commit_hash", Value::Null),
            ("posting_refused", Value::Integer(0)),
        ],
    ),
    // A group's invite stays with the device that manages the group: here it only lets in
    // the contact who uses it.
    (
        "invites",
        &[("group_id", Value::Null), ("approval", Value::Integer(0))],
    ),
    ("messages", &[]),
    ("reactions", &[]),
    (
        "files",
        &[("part_path", Value::Null), ("saved_path", Value::Null)],
    ),
    ("groups", &[]),
    ("group_members", &[]),
    ("group_requests", &[]),
    ("expected_groups", &[]),
    ("devices", &[]),
];

fn to_wire(value: ValueRef<'_>) -> wire::HistoryValue {
    use wire::history_value::Value as V;
    let value = match value {
        ValueRef::Null => V::Null(true),
        ValueRef::Integer(integer) => V::Integer(integer),
        ValueRef::Real(real) => V::Real(real),
        ValueRef::Text(text) => V::Text(String::from_utf8_lossy(text).into_owned()),
        ValueRef::Blob(blob) => V::Blob(blob.to_vec()),
    };
    wire::HistoryValue { value: Some(value) }
}

fn from_wire(value: &wire::HistoryValue) -> Value {
    use wire::history_value::Value as V;
    match &value.value {
        None | Some(V::Null(_)) => Value::Null,
        Some(V::Integer(integer)) => Value::Integer(*integer),
        Some(V::Real(real)) => Value::Real(*real),
        Some(V::Text(text)) => Value::Text(text.clone()),
        Some(V::Blob(blob)) => Value::Blob(blob.clone()),
    }
}

/// The account's history as this device holds it, encoded.
pub(crate) fn export(db: &Connection) -> Result<Vec<u8>, Error> {
    let mut tables = Vec::with_capacity(TABLES.len());
    for (table, resets) in TABLES {
        tables.push(read_rows(
            db,
            table,
            resets,
            &format!("SELECT * FROM {table}"),
        )?);
    }
    Ok(wire::History {
        schema: db::SCHEMA_VERSION as u32,
        tables,
        deleted: Vec::new(),
    }
    .encode_to_vec())
}

/// What changed since the changes noted up to `last_change` were forgotten: a `History` of the
/// changed rows and the keys of the deleted ones.
pub(crate) struct Changes {
    pub bytes: Zeroizing<Vec<u8>>,
    /// The last change it holds; [`forget_changes`] up to it once it is safely stored.
    pub last_change: i64,
}

/// The rows whose keys changed since the changes were last forgotten, as they are now, and the
/// keys of those that are gone; `None` when nothing changed. Read in one transaction, so the
/// rows and the keys agree.
pub(crate) fn export_changes(db: &Connection) -> Result<Option<Changes>, Error> {
    db::in_transaction(db, |db| {
        let Some(last_change) = db.query_row("SELECT max(seq) FROM backup_changes", [], |row| {
            row.get::<_, Option<i64>>(0)
        })?
        else {
            return Ok(None);
        };
        let mut tables = Vec::new();
        let mut deleted = Vec::new();
        for (table, resets) in TABLES {
            let keys = key_columns(db, table)?;
            let noted = format!(
                "c.table_name = '{table}' AND c.seq <= {last_change} AND {}",
                keys.iter()
                    .zip(["c.key_1", "c.key_2"])
                    .map(|(key, noted)| format!("t.{key} = {noted}"))
                    .collect::<Vec<_>>()
                    .join(" AND ")
            );
            // Changes first: a few of them, looked up by key in a table of any size.
            let changed = read_rows(
                db,
                table,
                resets,
                &format!("SELECT t.* FROM backup_changes c CROSS JOIN {table} t ON {noted}"),
            )?;
            if !changed.rows.is_empty() {
                tables.push(changed);
            }
            let gone_keys = ["c.key_1", "c.key_2"][..keys.len()].join(", ");
            let gone = read_rows(
                db,
                table,
                &[],
                &format!(
                    "SELECT {gone_keys} FROM backup_changes c WHERE c.table_name = '{table}' \
                     AND c.seq <= {last_change} AND NOT EXISTS (SELECT 1 FROM {table} t WHERE {noted})"
                ),
            )?;
            if !gone.rows.is_empty() {
                deleted.push(wire::HistoryTable {
                    columns: keys,
                    ..gone
                });
            }
        }
        let bytes = Zeroizing::new(
            wire::History {
                schema: db::SCHEMA_VERSION as u32,
                tables,
                deleted,
            }
            .encode_to_vec(),
        );
        Ok(Some(Changes { bytes, last_change }))
    })
}

/// Forgets the changes noted up to `last_change`: a backup holds them. Later ones stay.
pub(crate) fn forget_changes(db: &Connection, last_change: i64) -> Result<(), Error> {
    db.execute("DELETE FROM backup_changes WHERE seq <= ?1", [last_change])?;
    Ok(())
}

/// (Re)creates the triggers that note changed rows for backups, for the tables and columns the
/// schema has now: run after every migration. They note nothing until the account's
/// `backup_tracking` is set. Noting a key deletes its earlier note first, so that each change
/// gets a sequence number larger than any taken into a backup before, whatever conflict
/// handling the statement that fired it asked for.
pub(crate) fn track_changes(db: &Connection) -> Result<(), Error> {
    for (table, resets) in TABLES {
        let keys = key_columns(db, table)?;
        let held: Vec<String> = db
            .prepare("SELECT name FROM pragma_table_info(?1)")?
            .query_map([table], |row| row.get::<_, String>(0))?
            .collect::<Result<Vec<_>, _>>()?
            .into_iter()
            .filter(|column| !resets.iter().any(|(reset, _)| reset == column))
            .collect();
        let note = |row: &str| {
            let key_1 = format!("{row}.{}", keys[0]);
            let key_2 = keys
                .get(1)
                .map_or_else(|| "''".to_string(), |key| format!("{row}.{key}"));
            format!(
                "DELETE FROM backup_changes WHERE table_name = '{table}' \
                     AND key_1 IS {key_1} AND key_2 IS {key_2};
                 INSERT INTO backup_changes (table_name, key_1, key_2) \
                     VALUES ('{table}', {key_1}, {key_2});"
            )
        };
        let key_moved = keys
            .iter()
            .map(|key| format!("OLD.{key} IS NOT NEW.{key}"))
            .collect::<Vec<_>>()
            .join(" OR ");
        let tracking = "(SELECT backup_tracking FROM account WHERE id = 1)";
        db.execute_batch(&format!(
            "DROP TRIGGER IF EXISTS backup_{table}_insert;
             DROP TRIGGER IF EXISTS backup_{table}_update;
             DROP TRIGGER IF EXISTS backup_{table}_update_key;
             DROP TRIGGER IF EXISTS backup_{table}_delete;
             CREATE TRIGGER backup_{table}_insert AFTER INSERT ON {table} WHEN {tracking}
             BEGIN {insert} END;
             CREATE TRIGGER backup_{table}_update AFTER UPDATE OF {held} ON {table} WHEN {tracking}
             BEGIN {update} END;
             CREATE TRIGGER backup_{table}_update_key AFTER UPDATE OF {held} ON {table}
                 WHEN {tracking} AND ({key_moved})
             BEGIN {moved} END;
             CREATE TRIGGER backup_{table}_delete AFTER DELETE ON {table} WHEN {tracking}
             BEGIN {delete} END;",
            held = held.join(", "),
            insert = note("NEW"),
            update = note("NEW"),
            moved = note("OLD"),
            delete = note("OLD"),
        ))?;
    }
    Ok(())
}

/// The primary key columns of one of the tables, in key order: one or two of them.
fn key_columns(db: &Connection, table: &str) -> Result<Vec<String>, Error> {
    let mut columns: Vec<(i64, String)> = db
        .prepare("SELECT pk, name FROM pragma_table_info(?1) WHERE pk > 0")?
        .query_map([table], |row| Ok((row.get(0)?, row.get(1)?)))?
        .collect::<Result<_, _>>()?;
    columns.sort();
    if !(1..=2).contains(&columns.len()) {
        return Err(Error::Bug(format!(
            "table {table} has a key of {} columns; backups track one or two",
            columns.len()
        )));
    }
    Ok(columns.into_iter().map(|(_, name)| name).collect())
}

/// The rows `query` selects from `table` (all its columns, or only the key columns it names),
/// with the columns of `resets` set to their fresh values.
fn read_rows(
    db: &Connection,
    table: &str,
    resets: &[(&str, Value)],
    query: &str,
) -> Result<wire::HistoryTable, Error> {
    let mut statement = db.prepare(query)?;
    let columns: Vec<String> = statement
        .column_names()
        .into_iter()
        .map(str::to_string)
        .collect();
    let reset: Vec<Option<&Value>> = columns
        .iter()
        .map(|column| {
            resets
                .iter()
                .find(|(name, _)| name == column)
                .map(|(_, value)| value)
        })
        .collect();
    let mut rows = Vec::new();
    let mut query = statement.query([])?;
    while let Some(row) = query.next()? {
        let mut values = Vec::with_capacity(columns.len());
        for (index, reset) in reset.iter().enumerate() {
            values.push(match reset {
                Some(value) => to_wire(ValueRef::from(*value)),
                None => to_wire(row.get_ref(index)?),
            });
        }
        rows.push(wire::HistoryRow { values });
    }
    Ok(wire::HistoryTable {
        name: table.to_string(),
        columns,
        rows,
    })
}

/// How much a history brought.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Imported {
    pub conversations: usize,
    pub messages: usize,
}

/// Adds a history from another device of the account to this device's database, which must
/// not hold any of it yet (a device being linked). Only the tables and columns this device
/// knows are taken; one transaction, so a bad history leaves nothing behind. A row whose key
/// (or another unique column) this device holds already is left out: what is here stays.
pub(crate) fn import(db: &Connection, bytes: &[u8]) -> Result<Imported, Error> {
    let history = decode(bytes)?;
    if !history.deleted.is_empty() {
        return Err(Error::Protocol(
            "the account's history holds deletions where a whole one was expected".into(),
        ));
    }
    let mut imported = Imported::default();
    db::in_transaction(db, |db| {
        for table in &history.tables {
            check_columns(db, table)?;
            insert_rows(db, table, "INSERT OR IGNORE")?;
            match table.name.as_str() {
                "conversations" => imported.conversations = table.rows.len(),
                "messages" => imported.messages = table.rows.len(),
                _ => {}
            }
        }
        Ok(())
    })?;
    Ok(imported)
}

/// A database in memory with the profile's tables, where a backup's history is rebuilt from
/// its segments before it is imported. It never reaches the disk, and it checks no foreign
/// keys: [`apply`] replaces a row by deleting it first, which must not take rows that refer
/// to it along, and each segment leaves a consistent whole.
pub(crate) fn scratch() -> Result<Connection, Error> {
    let mut scratch = Connection::open_in_memory()?;
    db::configure(&mut scratch)?;
    scratch.pragma_update(None, "foreign_keys", false)?;
    scratch.pragma_update(None, "temp_store", "MEMORY")?;
    Ok(scratch)
}

/// Plays one segment of a backup onto `scratch` (see [`scratch`]): every row it holds replaces
/// the row of the same key, and the keys it lists as deleted go. The first segment, a whole
/// history, is played onto an empty scratch. One transaction: a bad segment changes nothing.
pub(crate) fn apply(scratch: &Connection, bytes: &[u8]) -> Result<(), Error> {
    let history = decode(bytes)?;
    db::in_transaction(scratch, |db| {
        for table in &history.deleted {
            if table.columns.len() != key_columns(db, &table.name)?.len() {
                return Err(Error::Protocol(format!(
                    "the backup deletes rows of {} by more than their key",
                    table.name
                )));
            }
        }
        // All the old rows go before any new one comes, so that values unique across rows
        // (names) may move between them.
        for table in history.tables.iter().chain(&history.deleted) {
            check_columns(db, table)?;
            let keys = key_columns(db, &table.name)?;
            let positions = keys
                .iter()
                .map(|key| table.columns.iter().position(|column| column == key))
                .collect::<Option<Vec<usize>>>()
                .ok_or_else(|| {
                    Error::Protocol(format!(
                        "the backup has rows of {} without their key",
                        table.name
                    ))
                })?;
            let mut delete = db.prepare(&format!(
                "DELETE FROM {} WHERE {}",
                table.name,
                keys.iter()
                    .map(|key| format!("{key} IS ?"))
                    .collect::<Vec<_>>()
                    .join(" AND ")
            ))?;
            for row in &table.rows {
                check_width(table, row)?;
                delete.execute(params_from_iter(
                    positions.iter().map(|&at| from_wire(&row.values[at])),
                ))?;
            }
        }
        for table in &history.tables {
            insert_rows(db, table, "INSERT")?;
        }
        Ok(())
    })
}

fn decode(bytes: &[u8]) -> Result<wire::History, Error> {
    let history = wire::History::decode(bytes)
        .map_err(|error| Error::Protocol(format!("the account's history is malformed: {error}")))?;
    // An older history (from a device not yet updated, say) has fewer columns, which take
    // their defaults here; a newer one may mean what this version cannot know.
    if !(OLDEST_SCHEMA..=db::SCHEMA_VERSION).contains(&i64::from(history.schema)) {
        return Err(Error::Usage(format!(
            "the history was written by another version of miyu (profile schema {}, this one {}); update this one",
            history.schema,
            db::SCHEMA_VERSION
        )));
    }
    Ok(history)
}

/// Checks that the table is one a history holds and that this device knows each column, so
/// that the names can go into SQL.
fn check_columns(db: &Connection, table: &wire::HistoryTable) -> Result<(), Error> {
    if !TABLES.iter().any(|(name, _)| *name == table.name) {
        return Err(Error::Protocol(format!(
            "the account's history has an unknown table {:?}",
            table.name
        )));
    }
    let known: Vec<String> = db
        .prepare("SELECT name FROM pragma_table_info(?1)")?
        .query_map([&table.name], |row| row.get(0))?
        .collect::<Result<_, _>>()?;
    if let Some(unknown) = table.columns.iter().find(|column| !known.contains(column)) {
        return Err(Error::Protocol(format!(
            "the account's history has an unknown column {}.{unknown}",
            table.name
        )));
    }
    Ok(())
}

fn check_width(table: &wire::HistoryTable, row: &wire::HistoryRow) -> Result<(), Error> {
    if row.values.len() == table.columns.len() {
        Ok(())
    } else {
        Err(Error::Protocol(
            "the account's history has a row of the wrong width".into(),
        ))
    }
}

/// Inserts a checked table's rows with `insert` (`INSERT`, or `INSERT OR IGNORE`).
fn insert_rows(db: &Connection, table: &wire::HistoryTable, insert: &str) -> Result<(), Error> {
    let sql = format!(
        "{insert} INTO {} ({}) VALUES ({})",
        table.name,
        table.columns.join(", "),
        vec!["?"; table.columns.len()].join(", ")
    );
    let mut statement = db.prepare(&sql)?;
    for row in &table.rows {
        check_width(table, row)?;
        statement.execute(params_from_iter(row.values.iter().map(from_wire)))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rusqlite::params;

    fn database(folder: &tempfile::TempDir, name: &str) -> Connection {
        let mut db = Connection::open(folder.path().join(name)).unwrap();
        db::configure(&mut db).unwrap();
        db
    }

    #[test]
    fn a_history_moves_what_the_user_sees_and_nothing_of_the_device() {
        let folder = tempfile::tempdir().unwrap();
        let old = database(&folder, "old.db");
        old.execute_batch(
            "INSERT INTO contacts (account_id, name, certificate, added_at_ms) VALUES ('bob', 'Bob', x'01', 5);
             INSERT INTO conversations (group_id, contact, scope, cursor, announce, last_update_ms, pending_commit_hash, timer_s)
                 VALUES (x'0a', 'bob', 'bob', 77, x'99', 123, x'42', 3600);
             INSERT INTO messages (id, group_id, message_id, outgoing, body, sent_at_ms, received_at_ms, state, kind)
                 VALUES (7, x'0a', x'01', 0, 'hello 你好', 1, 2, 'received', 'text');
             INSERT INTO messages (id, group_id, message_id, outgoing, body, sent_at_ms, received_at_ms, state, kind)
                 VALUES (8, x'0a', x'02', 1, 'a file', 3, 4, 'sent', 'file');
             INSERT INTO reactions (message_row, account, emoji, at_ms) VALUES (7, 'me', '👍', 9);
             INSERT INTO files (message_row, blob_id, file_key, size, chunk_size, sha256, name, mime, saved_path)
                 VALUES (8, x'bb', x'cc', 10, 65536, x'dd', 'a.txt', 'text/plain', '/somewhere/a.txt');
             INSERT INTO settings (key, value) VALUES ('read_receipts', 'on');
             INSERT INTO outbox (group_id, epoch, ciphertext, plaintext) VALUES (x'0a', 1, x'00', x'00');",
        )
        .unwrap();
        let bytes = export(&old).unwrap();

        let new = database(&folder, "new.db");
        let imported = import(&new, &bytes).unwrap();
        assert_eq!(
            imported,
            Imported {
                conversations: 1,
                messages: 2
            }
        );
        let messages: Vec<(i64, String, bool)> = new
            .prepare("SELECT id, body, outgoing FROM messages ORDER BY id")
            .unwrap()
            .query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(
            messages,
            [
                (7, "hello 你好".to_string(), false),
                (8, "a file".to_string(), true)
            ]
        );
        let (cursor, announce, timer, pending): (i64, Option<Vec<u8>>, i64, Option<Vec<u8>>) = new
            .query_row(
                "SELECT cursor, announce, timer_s, pending_commit_hash FROM conversations",
                [],
                |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?)),
            )
            .unwrap();
        assert_eq!((cursor, announce, timer, pending), (0, None, 3600, None));
        let saved: Option<String> = new
            .query_row("SELECT saved_path FROM files", [], |row| row.get(0))
            .unwrap();
        assert_eq!(saved, None);
        let emoji: String = new
            .query_row(
                "SELECT emoji FROM reactions WHERE message_row = 7",
                [],
                |row| row.get(0),
            )
            .unwrap();
        assert_eq!(emoji, "👍");
        let outbox: i64 = new
            .query_row("SELECT COUNT(*) FROM outbox", [], |row| row.get(0))
            .unwrap();
        assert_eq!(outbox, 0, "the old device's outbox stays there");
        assert!(!String::from_utf8_lossy(&bytes).contains("somewhere"));
    }

    #[test]
    fn a_bad_history_is_refused_whole() {
        let folder = tempfile::tempdir().unwrap();
        let new = database(&folder, "new.db");
        let row = |values: Vec<wire::HistoryValue>| wire::HistoryRow { values };
        let text = |text: &str| wire::HistoryValue {
            value: Some(wire::history_value::Value::Text(text.into())),
        };
        let good = wire::HistoryTable {
            name: "settings".into(),
            columns: vec!["key".into(), "value".into()],
            rows: vec![row(vec![text("typing"), text("on")])],
        };
        let history = |tables: Vec<wire::HistoryTable>, schema: i64| {
            wire::History {
                schema: schema as u32,
                tables,
                deleted: Vec::new(),
            }
            .encode_to_vec()
        };
        let cases = [
            history(vec![good.clone()], db::SCHEMA_VERSION + 1),
            history(vec![good.clone()], OLDEST_SCHEMA - 1),
            history(
                vec![
                    good.clone(),
                    wire::HistoryTable {
                        name: "account".into(),
                        ..good.clone()
                    },
                ],
                db::SCHEMA_VERSION,
            ),
            history(
                vec![
                    good.clone(),
                    wire::HistoryTable {
                        columns: vec!["key".into(), "value); DROP TABLE contacts; --".into()],
                        ..good.clone()
                    },
                ],
                db::SCHEMA_VERSION,
            ),
            history(
                vec![
                    good.clone(),
                    wire::HistoryTable {
                        rows: vec![row(vec![text("only one")])],
                        ..good.clone()
                    },
                ],
                db::SCHEMA_VERSION,
            ),
            b"\xff\xff not a history".to_vec(),
            // A backup's changes are not a history to take whole.
            wire::History {
                schema: db::SCHEMA_VERSION as u32,
                tables: vec![good.clone()],
                deleted: vec![wire::HistoryTable {
                    rows: Vec::new(),
                    ..good.clone()
                }],
            }
            .encode_to_vec(),
        ];
        for bytes in cases {
            assert!(import(&new, &bytes).is_err());
            let settings: i64 = new
                .query_row("SELECT COUNT(*) FROM settings", params![], |row| row.get(0))
                .unwrap();
            assert_eq!(settings, 0, "nothing of a refused history stays");
        }
        import(&new, &history(vec![good.clone()], db::SCHEMA_VERSION)).unwrap();
        // A history of an older version: its rows come in, columns it lacks take defaults.
        let older = database(&folder, "older.db");
        import(&older, &history(vec![good], OLDEST_SCHEMA)).unwrap();
        let typing: String = older
            .query_row(
                "SELECT value FROM settings WHERE key = 'typing'",
                [],
                |row| row.get(0),
            )
            .unwrap();
        assert_eq!(typing, "on");
    }

    /// A profile database holding an account whose changes are noted from now on.
    fn tracked(folder: &tempfile::TempDir, name: &str) -> Connection {
        let db = database(folder, name);
        db.execute_batch(
            "INSERT INTO account (id, server, name, identity_secret, device_secret, backup_tracking)
                 VALUES (1, 'server', 'me', x'', x'', 1);",
        )
        .unwrap();
        db
    }

    fn decoded(changes: &Changes) -> wire::History {
        wire::History::decode(changes.bytes.as_slice()).unwrap()
    }

    /// Each table's rows as text, sorted: a history's content whatever order SQLite read it in.
    fn content(db: &Connection) -> Vec<(String, Vec<String>)> {
        let history = wire::History::decode(export(db).unwrap().as_slice()).unwrap();
        history
            .tables
            .into_iter()
            .map(|table| {
                let mut rows: Vec<String> = table
                    .rows
                    .iter()
                    .map(|row| format!("{:?}", (&table.columns, &row.values)))
                    .collect();
                rows.sort();
                (table.name, rows)
            })
            .collect()
    }

    /// The keys of one table's rows in a history's tables (or deletions), as text.
    fn keys_of(tables: &[wire::HistoryTable], name: &str) -> Vec<String> {
        let mut keys: Vec<String> = tables
            .iter()
            .filter(|table| table.name == name)
            .flat_map(|table| table.rows.iter())
            .map(|row| format!("{:?}", row.values[0].value))
            .collect();
        keys.sort();
        keys
    }

    fn integer(value: i64) -> String {
        format!("{:?}", Some(wire::history_value::Value::Integer(value)))
    }

    const PEOPLE: &str = "
        INSERT INTO contacts (account_id, name, certificate, added_at_ms) VALUES ('bob', 'Bob', x'01', 5);
        INSERT INTO contacts (account_id, name, certificate, added_at_ms) VALUES ('carol', 'Carol', x'02', 6);
        INSERT INTO conversations (group_id, contact, scope) VALUES (x'0a', 'bob', 'bob');
        INSERT INTO messages (id, group_id, message_id, outgoing, body, sent_at_ms, received_at_ms, state)
            VALUES (7, x'0a', x'07', 0, 'hello', 1, 2, 'received');
        INSERT INTO messages (id, group_id, message_id, outgoing, body, sent_at_ms, received_at_ms, state)
            VALUES (8, x'0a', x'08', 1, 'a file', 3, 4, 'sent');
        INSERT INTO reactions (message_row, account, emoji, at_ms) VALUES (8, 'bob', '👍', 9);
        INSERT INTO files (message_row, blob_id, file_key, size, chunk_size, sha256, name, mime)
            VALUES (8, x'bb', x'cc', 10, 65536, x'dd', 'a.txt', 'text/plain');
        INSERT INTO settings (key, value) VALUES ('typing', 'on');";

    #[test]
    fn changes_are_noted_once_backups_start_for_what_a_history_holds_only() {
        let folder = tempfile::tempdir().unwrap();
        let db = database(&folder, "device.db");
        db.execute_batch(
            "INSERT INTO account (id, server, name, identity_secret, device_secret)
                 VALUES (1, 'server', 'me', x'', x'');",
        )
        .unwrap();
        db.execute_batch(PEOPLE).unwrap();
        assert!(
            export_changes(&db).unwrap().is_none(),
            "nothing is noted before the first backup"
        );
        db.execute("UPDATE account SET backup_tracking = 1", [])
            .unwrap();
        // What belongs to this device alone is not backed up, nor noted.
        db.execute_batch(
            "UPDATE conversations SET cursor = 9, last_update_ms = 10, announce = x'01';
             UPDATE files SET saved_path = '/somewhere/a.txt';
             INSERT INTO outbox (group_id, epoch, ciphertext, plaintext) VALUES (x'0a', 1, x'00', x'00');",
        )
        .unwrap();
        assert!(export_changes(&db).unwrap().is_none());

        // An edit, a new message, a deleted one (its reaction and file go with it), a setting
        // replaced.
        db.execute_batch(
            "UPDATE messages SET body = 'hello again', edited_at_ms = 11 WHERE id = 7;
             INSERT INTO messages (id, group_id, message_id, outgoing, body, sent_at_ms, received_at_ms, state)
                 VALUES (9, x'0a', x'09', 1, 'new', 12, 12, 'sent');
             DELETE FROM messages WHERE id = 8;
             INSERT OR REPLACE INTO settings (key, value) VALUES ('typing', 'off');",
        )
        .unwrap();
        let changes = export_changes(&db).unwrap().unwrap();
        let history = decoded(&changes);
        assert_eq!(history.schema as i64, db::SCHEMA_VERSION);
        assert_eq!(
            keys_of(&history.tables, "messages"),
            [integer(7), integer(9)]
        );
        assert_eq!(keys_of(&history.deleted, "messages"), [integer(8)]);
        assert_eq!(keys_of(&history.deleted, "reactions"), [integer(8)]);
        assert_eq!(keys_of(&history.deleted, "files").len(), 1);
        assert_eq!(keys_of(&history.tables, "settings").len(), 1);
        assert!(keys_of(&history.tables, "contacts").is_empty());
        let reactions = history
            .deleted
            .iter()
            .find(|table| table.name == "reactions")
            .unwrap();
        assert_eq!(reactions.columns, ["message_row", "account"]);
        let edited = history
            .tables
            .iter()
            .find(|table| table.name == "messages")
            .unwrap();
        let body = edited.columns.iter().position(|c| c == "body").unwrap();
        assert!(
            edited
                .rows
                .iter()
                .any(|row| format!("{:?}", row.values[body]).contains("hello again"))
        );

        // A change made after the changes were read, even by a statement that ignores
        // conflicts, outlives forgetting them.
        db.execute(
            "UPDATE OR IGNORE messages SET body = 'third' WHERE id = 9",
            [],
        )
        .unwrap();
        forget_changes(&db, changes.last_change).unwrap();
        let later = decoded(&export_changes(&db).unwrap().unwrap());
        assert_eq!(keys_of(&later.tables, "messages"), [integer(9)]);
        assert!(later.deleted.is_empty());
        let last = export_changes(&db).unwrap().unwrap().last_change;
        forget_changes(&db, last).unwrap();
        assert!(export_changes(&db).unwrap().is_none());

        // A key that moves: the old one is noted as gone.
        db.execute(
            "UPDATE settings SET key = 'receipts' WHERE key = 'typing'",
            [],
        )
        .unwrap();
        let moved = decoded(&export_changes(&db).unwrap().unwrap());
        assert_eq!(moved.tables[0].name, "settings");
        assert_eq!(moved.deleted[0].name, "settings");
        assert!(format!("{:?}", moved.deleted[0].rows).contains("typing"));
    }

    #[test]
    fn a_backup_chain_played_in_order_gives_the_history_as_it_is_now() {
        let folder = tempfile::tempdir().unwrap();
        let device = tracked(&folder, "device.db");
        device.execute_batch(PEOPLE).unwrap();
        device
            .execute_batch(
                "INSERT INTO conversations (group_id, scope) VALUES (x'0b', 'group:0b');
                 INSERT INTO groups (group_id, name, state, created_at_ms) VALUES (x'0b', 'Club', 'active', 1);
                 INSERT INTO group_members (group_id, account_id, certificate) VALUES (x'0b', 'bob', x'01');
                 INSERT INTO group_members (group_id, account_id, certificate) VALUES (x'0b', 'carol', x'02');",
            )
            .unwrap();
        let whole = export(&device).unwrap();
        forget_changes(&device, i64::MAX).unwrap();

        // Two contacts swap names (unique ones), a message is edited, another deleted, a
        // member leaves a group, a new contact and conversation come.
        device
            .execute_batch(
                "UPDATE contacts SET name = 'swap' WHERE account_id = 'bob';
                 UPDATE contacts SET name = 'Bob' WHERE account_id = 'carol';
                 UPDATE contacts SET name = 'Carol' WHERE account_id = 'bob';
                 UPDATE messages SET body = 'edited', edited_at_ms = 20 WHERE id = 7;
                 DELETE FROM messages WHERE id = 8;
                 DELETE FROM group_members WHERE account_id = 'carol';
                 INSERT INTO contacts (account_id, name, certificate, added_at_ms) VALUES ('dave', 'Dave', x'03', 7);
                 INSERT INTO conversations (group_id, contact, scope) VALUES (x'0c', 'dave', 'dave');
                 INSERT INTO messages (id, group_id, message_id, outgoing, body, sent_at_ms, received_at_ms, state)
                     VALUES (10, x'0c', x'10', 0, 'hi from dave', 21, 21, 'received');",
            )
            .unwrap();
        let first = export_changes(&device).unwrap().unwrap();
        forget_changes(&device, first.last_change).unwrap();
        // Then Dave goes again, a deleted key comes back with another row, a member rejoins.
        device
            .execute_batch(
                "DELETE FROM messages WHERE group_id = x'0c';
                 DELETE FROM conversations WHERE group_id = x'0c';
                 DELETE FROM contacts WHERE account_id = 'dave';
                 INSERT INTO messages (id, group_id, message_id, outgoing, body, sent_at_ms, received_at_ms, state)
                     VALUES (8, x'0a', x'18', 0, 'another eight', 22, 22, 'received');
                 INSERT INTO group_members (group_id, account_id, certificate, role) VALUES (x'0b', 'carol', x'02', 'admin');",
            )
            .unwrap();
        let second = export_changes(&device).unwrap().unwrap();
        assert!(!decoded(&second).deleted.is_empty());

        let scratch = scratch().unwrap();
        for segment in [whole.as_slice(), &first.bytes, &second.bytes] {
            apply(&scratch, segment).unwrap();
        }
        assert_eq!(content(&scratch), content(&device));

        // Restored into a new profile, twice: the same history, no duplicates.
        let rebuilt = export(&scratch).unwrap();
        let restored = database(&folder, "restored.db");
        for _ in 0..2 {
            import(&restored, &rebuilt).unwrap();
            assert_eq!(content(&restored), content(&device));
        }
    }

    #[test]
    fn a_segment_that_does_not_fit_changes_nothing() {
        let folder = tempfile::tempdir().unwrap();
        let device = tracked(&folder, "device.db");
        device.execute_batch(PEOPLE).unwrap();
        let scratch = scratch().unwrap();
        apply(&scratch, &export(&device).unwrap()).unwrap();
        let before = content(&scratch);

        let text = |text: &str| wire::HistoryValue {
            value: Some(wire::history_value::Value::Text(text.into())),
        };
        let setting = wire::HistoryTable {
            name: "settings".into(),
            columns: vec!["key".into(), "value".into()],
            rows: vec![wire::HistoryRow {
                values: vec![text("typing"), text("changed")],
            }],
        };
        let changes = |tables: Vec<wire::HistoryTable>, deleted: Vec<wire::HistoryTable>| {
            wire::History {
                schema: db::SCHEMA_VERSION as u32,
                tables,
                deleted,
            }
            .encode_to_vec()
        };
        for bad in [
            // Deleting by more than the key, or without it.
            changes(vec![setting.clone()], vec![setting.clone()]),
            changes(
                vec![setting.clone()],
                vec![wire::HistoryTable {
                    columns: vec!["value".into()],
                    rows: vec![wire::HistoryRow {
                        values: vec![text("on")],
                    }],
                    ..setting.clone()
                }],
            ),
            // Rows without their key.
            changes(
                vec![wire::HistoryTable {
                    columns: vec!["value".into()],
                    rows: vec![wire::HistoryRow {
                        values: vec![text("on")],
                    }],
                    ..setting.clone()
                }],
                vec![],
            ),
            // A table no history holds, a row of the wrong width, another schema.
            changes(
                vec![
                    setting.clone(),
                    wire::HistoryTable {
                        name: "outbox".into(),
                        ..setting.clone()
                    },
                ],
                vec![],
            ),
            changes(
                vec![wire::HistoryTable {
                    rows: vec![wire::HistoryRow {
                        values: vec![text("typing")],
                    }],
                    ..setting.clone()
                }],
                vec![],
            ),
            wire::History {
                schema: db::SCHEMA_VERSION as u32 + 1,
                tables: vec![setting.clone()],
                deleted: vec![],
            }
            .encode_to_vec(),
            b"\x0a\xff\xff".to_vec(),
        ] {
            assert!(apply(&scratch, &bad).is_err());
            assert_eq!(content(&scratch), before);
        }
        apply(&scratch, &changes(vec![setting], vec![])).unwrap();
        assert_ne!(content(&scratch), before);
    }
}
