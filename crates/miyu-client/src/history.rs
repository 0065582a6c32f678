//! An account's history as one of its devices hands it to a newly linked one: the rows of the
//! tables a user sees (contacts, conversations, messages, groups, settings), without anything
//! that belongs to the device that made it (its keys, MLS state, outbox, uploads, cursors).
//!
//! The history is encoded as a `History` message (PROTOCOL.md §10.10), sealed like a file and
//! uploaded as a blob of the account; the key travels in the link's sealed answer.

use prost::Message as _;
use rusqlite::types::{Value, ValueRef};
use rusqlite::{Connection, params_from_iter};

use miyu_proto::wire;

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
        let mut statement = db.prepare(&format!("SELECT * FROM {table}"))?;
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
        tables.push(wire::HistoryTable {
            name: (*table).to_string(),
            columns,
            rows,
        });
    }
    Ok(wire::History {
        schema: db::SCHEMA_VERSION as u32,
        tables,
    }
    .encode_to_vec())
}

/// How much a history brought.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Imported {
    pub conversations: usize,
    pub messages: usize,
}

/// Adds a history from another device of the account to this device's database, which must
/// not hold any of it yet (a device being linked). Only the tables and columns this device
/// knows are taken; one transaction, so a bad history leaves nothing behind.
pub(crate) fn import(db: &Connection, bytes: &[u8]) -> Result<Imported, Error> {
    let history = wire::History::decode(bytes)
        .map_err(|error| Error::Protocol(format!("the account's history is malformed: {error}")))?;
    // An older history (a backup made before an update, say) has fewer columns, which take
    // their defaults here; a newer one may mean what this version cannot know.
    if !(OLDEST_SCHEMA..=db::SCHEMA_VERSION).contains(&i64::from(history.schema)) {
        return Err(Error::Usage(format!(
            "the history was written by another version of miyu (profile schema {}, this one {}); update this one",
            history.schema,
            db::SCHEMA_VERSION
        )));
    }
    let mut imported = Imported::default();
    db::in_transaction(db, |db| {
        for table in &history.tables {
            if !TABLES.iter().any(|(name, _)| *name == table.name) {
                return Err(Error::Protocol(format!(
                    "the account's history has an unknown table {:?}",
                    table.name
                )));
            }
            let known: Vec<String> = db
                .prepare(&format!(
                    "SELECT name FROM pragma_table_info('{}')",
                    table.name
                ))?
                .query_map([], |row| row.get(0))?
                .collect::<Result<_, _>>()?;
            if let Some(unknown) = table.columns.iter().find(|column| !known.contains(column)) {
                return Err(Error::Protocol(format!(
                    "the account's history has an unknown column {}.{unknown}",
                    table.name
                )));
            }
            let sql = format!(
                "INSERT OR IGNORE INTO {} ({}) VALUES ({})",
                table.name,
                table.columns.join(", "),
                vec!["?"; table.columns.len()].join(", ")
            );
            let mut statement = db.prepare(&sql)?;
            for row in &table.rows {
                if row.values.len() != table.columns.len() {
                    return Err(Error::Protocol(
                        "the account's history has a row of the wrong width".into(),
                    ));
                }
                statement.execute(params_from_iter(row.values.iter().map(from_wire)))?;
            }
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
}
