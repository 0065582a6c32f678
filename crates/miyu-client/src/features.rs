//! Replies, edits, deletion for everyone, reactions and forwarding. Each is an end-to-end
//! encrypted message in the conversation (PROTOCOL.md §10.7), never a request the server could
//! act on or read: the server sees one more ciphertext.
//!
//! Authority comes from authorship, checked by every receiver: a contact may edit or delete
//! only messages it wrote itself, and react to any message of the conversation. Messages are
//! named by this device's row number (`MessageView::id`) in the API and on the wire by their
//! random `message_id`, which both sides share.

use std::collections::HashMap;

use miyu_proto::wire;
use rusqlite::{Connection, OptionalExtension, params};

use crate::privacy::{self, Received};
use crate::{Client, Error, Event, MessageView, db, now_ms};

/// How long after sending a text its author may still edit it.
pub const EDIT_WINDOW_MS: u64 = 48 * 3600 * 1000;
/// Longest reaction accepted, in bytes (family and flag emoji take up to ~25).
pub const MAX_EMOJI_BYTES: usize = 32;

/// One person's reaction to a message.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ReactionView {
    /// "me" or the contact's name.
    pub from: String,
    pub emoji: String,
}

/// A reaction as it may be stored and shown: short, printable, one "word".
fn valid_emoji(emoji: &str) -> bool {
    !emoji.is_empty()
        && emoji.len() <= MAX_EMOJI_BYTES
        && !emoji.chars().any(|c| c.is_control() || c.is_whitespace())
}

/// This device's number for the message of a conversation with `message_id`, if it has it.
pub(crate) fn local_id(
    db: &Connection,
    group_id: &[u8],
    message_id: &[u8],
) -> Result<Option<i64>, Error> {
    if message_id.is_empty() {
        return Ok(None);
    }
    Ok(db
        .prepare_cached("SELECT id FROM messages WHERE group_id = ?1 AND message_id = ?2")?
        .query_row(params![group_id, message_id], |row| row.get(0))
        .optional()?)
}

/// Fills in the reactions of `messages` (the conversations of `scope`, see
/// [`Client::conversation_of`]).
pub(crate) fn attach_reactions(
    db: &Connection,
    scope: &str,
    contact: &str,
    messages: &mut [MessageView],
) -> Result<(), Error> {
    let mut statement = db.prepare(
        "SELECT r.message_row, r.account, r.emoji FROM reactions r JOIN messages m ON m.id = r.message_row
         WHERE m.group_id IN (SELECT group_id FROM conversations WHERE scope = ?1)
         ORDER BY r.at_ms",
    )?;
    let in_group = scope.starts_with(crate::groups::SCOPE_PREFIX);
    let mut names = crate::groups::Names::new(db);
    let mut by_row: HashMap<i64, Vec<ReactionView>> = HashMap::new();
    for reaction in statement.query_map(params![scope], |row| {
        Ok((
            row.get::<_, i64>(0)?,
            row.get::<_, String>(1)?,
            row.get::<_, String>(2)?,
        ))
    })? {
        let (message_row, who, emoji) = reaction?;
        let from = if who == "me" {
            "me".into()
        } else if in_group {
            names.of(&who)?
        } else {
            contact.to_string()
        };
        by_row
            .entry(message_row)
            .or_default()
            .push(ReactionView { from, emoji });
    }
    for message in messages {
        if let Some(reactions) = by_row.remove(&message.id) {
            message.reactions = reactions;
        }
    }
    Ok(())
}

/// The target of an edit, deletion or reaction from the contact: a message of this
/// conversation, with who wrote it.
struct Target {
    row: i64,
    outgoing: bool,
    kind: String,
    deleted: bool,
    /// In a group, the member who wrote it.
    sender: Option<String>,
}

impl Target {
    /// Written by the sender of `received`: the contact, or in a group that very member.
    fn written_by(&self, received: &Received<'_>) -> bool {
        if received.own {
            return self.outgoing;
        }
        !self.outgoing && self.sender.as_deref() == received.sender
    }
}

fn target(db: &Connection, group_id: &[u8], message_id: &[u8]) -> Result<Option<Target>, Error> {
    Ok(db
        .query_row(
            "SELECT id, outgoing, kind, deleted, sender FROM messages WHERE group_id = ?1 AND message_id = ?2",
            params![group_id, message_id],
            |row| {
                Ok(Target {
                    row: row.get(0)?,
                    outgoing: row.get(1)?,
                    kind: row.get(2)?,
                    deleted: row.get(3)?,
                    sender: row.get(4)?,
                })
            },
        )
        .optional()?)
}

/// Replaces a message's body, as `edit` or its receipt does, unless a later edit (by the
/// author's clock) is already applied: edits delivered out of order end with the last one.
fn apply_edit(db: &Connection, row: i64, body: &str, at_ms: u64) -> Result<bool, Error> {
    let changed = db.execute(
        "UPDATE messages SET body = ?1, edited_at_ms = ?2
         WHERE id = ?3 AND (edited_at_ms IS NULL OR edited_at_ms <= ?2)",
        params![body, at_ms, row],
    )?;
    Ok(changed > 0)
}

/// Deletes a message for everyone: its body, its file and its reactions go; a notice stays.
fn apply_delete(db: &Connection, row: i64) -> Result<(), Error> {
    crate::files::remove_partials(db, "m.id = ?1", row)?;
    db.execute("DELETE FROM files WHERE message_row = ?1", params![row])?;
    db.execute("DELETE FROM reactions WHERE message_row = ?1", params![row])?;
    db.execute(
        "UPDATE messages SET body = '', deleted = 1, reply_to = NULL WHERE id = ?1",
        params![row],
    )?;
    Ok(())
}

fn apply_reaction(db: &Connection, row: i64, who: &str, emoji: &str) -> Result<(), Error> {
    if emoji.is_empty() {
        db.execute(
            "DELETE FROM reactions WHERE message_row = ?1 AND account = ?2",
            params![row, who],
        )?;
    } else {
        db.execute(
            "INSERT OR REPLACE INTO reactions (message_row, account, emoji, at_ms) VALUES (?1, ?2, ?3, ?4)",
            params![row, who, emoji, now_ms()],
        )?;
    }
    Ok(())
}

/// A contact's reaction to a message of the conversation.
pub(crate) fn on_reaction(
    db: &Connection,
    received: &Received<'_>,
    reaction: &wire::Reaction,
) -> Result<Option<Event>, Error> {
    if !reaction.emoji.is_empty() && !valid_emoji(&reaction.emoji) {
        return Ok(None);
    }
    match target(db, received.group_id, &reaction.message_id)? {
        Some(target) if !target.deleted && !matches!(target.kind.as_str(), "timer" | "notice") => {
            let who = if received.own {
                "me"
            } else {
                received.contact_account
            };
            apply_reaction(db, target.row, who, &reaction.emoji)?;
            Ok(Some(Event::Reacted {
                contact: received.conversation_name.to_string(),
                id: target.row,
                emoji: (!reaction.emoji.is_empty()).then(|| reaction.emoji.clone()),
            }))
        }
        _ => Ok(None),
    }
}

/// A contact's edit of one of its own texts.
pub(crate) fn on_edit(
    db: &Connection,
    received: &Received<'_>,
    edit: &wire::Edit,
) -> Result<Option<Event>, Error> {
    match target(db, received.group_id, &edit.message_id)? {
        // Only the author's own, undeleted texts: a contact cannot put words in our mouth.
        Some(target) if target.written_by(received) && target.kind == "text" && !target.deleted => {
            if edit.body.is_empty() {
                return Ok(None);
            }
            let applied = apply_edit(db, target.row, &edit.body, received.sent_at_ms)?;
            Ok(applied.then(|| Event::Edited {
                contact: received.conversation_name.to_string(),
                id: target.row,
                body: edit.body.clone(),
            }))
        }
        _ => {
            tracing::debug!("dropped an edit of a message the sender did not write");
            Ok(None)
        }
    }
}

/// A contact's deletion of one of its own messages, for everyone.
pub(crate) fn on_delete(
    db: &Connection,
    received: &Received<'_>,
    delete: &wire::Delete,
) -> Result<Option<Event>, Error> {
    match target(db, received.group_id, &delete.message_id)? {
        Some(target) if target.deleted => Ok(None),
        Some(target)
            if target.written_by(received)
                && !matches!(target.kind.as_str(), "timer" | "notice") =>
        {
            apply_delete(db, target.row)?;
            Ok(Some(Event::Deleted {
                contact: received.conversation_name.to_string(),
                id: target.row,
            }))
        }
        // Not here (yet): keep the deletion, so that the message, if it comes later, is
        // stored as deleted. A server that withholds it and delivers the deletion first
        // cannot make it reappear.
        None if delete.message_id.len() == 16 => {
            // Under the conversation's timer, like the message it stands for.
            let timer_s: u32 = db
                .query_row(
                    "SELECT timer_s FROM conversations WHERE group_id = ?1",
                    params![received.group_id],
                    |row| row.get(0),
                )
                .optional()?
                .unwrap_or(0);
            let expires_at_ms = (timer_s > 0).then(|| now_ms() + u64::from(timer_s) * 1000);
            db.execute(
                "INSERT OR IGNORE INTO messages (group_id, message_id, outgoing, body, sent_at_ms, received_at_ms, state, seq, kind, deleted, expires_at_ms, sender)
                 VALUES (?1, ?2, ?3, '', ?4, ?5, ?6, ?7, 'text', 1, ?8, ?9)",
                params![
                    received.group_id,
                    delete.message_id,
                    received.own,
                    received.sent_at_ms,
                    now_ms(),
                    if received.own { "sent" } else { "received" },
                    received.seq,
                    expires_at_ms,
                    if received.own { None } else { received.sender }
                ],
            )?;
            Ok(None)
        }
        _ => {
            tracing::debug!("dropped a deletion of a message the sender did not write");
            Ok(None)
        }
    }
}

/// A message of the conversation with a contact, by this device's number for it.
struct Own {
    group_id: Vec<u8>,
    message_id: Vec<u8>,
    outgoing: bool,
    kind: String,
    deleted: bool,
    sent_at_ms: u64,
    body: String,
}

impl Client {
    fn message_of(&self, contact: &str, id: i64) -> Result<Own, Error> {
        let (scope, _) = self.conversation_of(contact)?;
        self.db
            .query_row(
                "SELECT group_id, message_id, outgoing, kind, deleted, sent_at_ms, body FROM messages
                 WHERE id = ?1 AND group_id IN (SELECT group_id FROM conversations WHERE scope = ?2)
                 AND (expires_at_ms IS NULL OR expires_at_ms > ?3)",
                params![id, scope, now_ms()],
                |row| {
                    Ok(Own {
                        group_id: row.get(0)?,
                        message_id: row.get(1)?,
                        outgoing: row.get(2)?,
                        kind: row.get(3)?,
                        deleted: row.get(4)?,
                        sent_at_ms: row.get(5)?,
                        body: row.get(6)?,
                    })
                },
            )
            .optional()?
            .ok_or_else(|| {
                Error::Usage(format!(
                    "no message #{id} with {contact}; `miyu messages {contact}` shows the numbers"
                ))
            })
    }

    /// Queues an instruction about a message (with its local effect, in one transaction) and
    /// sends it.
    async fn send_instruction(
        &mut self,
        group_id: &[u8],
        body: wire::app_message::Body,
        local: impl FnOnce(&Connection) -> Result<(), Error>,
    ) -> Result<(), Error> {
        db::in_transaction(&self.db, |db| {
            self.queue_app_message_in(db, group_id, body, None)?;
            local(db)
        })?;
        self.flush().await.map_err(|error| {
            if error.is_transient() {
                Error::Queued(error.to_string())
            } else {
                error
            }
        })
    }

    /// Answers message `id` of the conversation with `contact`, quoting it.
    pub async fn reply(
        &mut self,
        contact: &str,
        id: i64,
        text: &str,
    ) -> Result<MessageView, Error> {
        let quoted = self.message_of(contact, id)?;
        if quoted.deleted || matches!(quoted.kind.as_str(), "timer" | "notice") {
            return Err(Error::Usage(format!("message #{id} cannot be answered")));
        }
        self.send_text(
            contact,
            wire::Text {
                body: text.to_string(),
                reply_to: quoted.message_id,
                forwarded: false,
                mentions: Vec::new(),
            },
        )
        .await
    }

    /// Replaces the text of one of our own messages, for both sides, within 48 hours of
    /// sending it.
    pub async fn edit(&mut self, contact: &str, id: i64, text: &str) -> Result<(), Error> {
        if text.is_empty() {
            return Err(Error::Usage("the new text is empty".into()));
        }
        let own = self.message_of(contact, id)?;
        if !own.outgoing || own.kind != "text" || own.deleted {
            return Err(Error::Usage(format!(
                "message #{id} is not a text of yours; only your own texts can be edited"
            )));
        }
        if now_ms().saturating_sub(own.sent_at_ms) > EDIT_WINDOW_MS {
            return Err(Error::Usage(
                "texts can be edited for 48 hours after sending".into(),
            ));
        }
        let body = wire::app_message::Body::Edit(wire::Edit {
            message_id: own.message_id.clone(),
            body: text.to_string(),
        });
        let row = id;
        let text = text.to_string();
        self.send_instruction(&own.group_id, body, move |db| {
            apply_edit(db, row, &text, now_ms()).map(|_| ())
        })
        .await
    }

    /// Deletes message `id`: on this device only, or with `everyone` (our own messages only)
    /// on every device of the conversation, leaving a notice there.
    pub async fn delete_message(
        &mut self,
        contact: &str,
        id: i64,
        everyone: bool,
    ) -> Result<(), Error> {
        let own = self.message_of(contact, id)?;
        if !everyone {
            db::in_transaction(&self.db, |db| {
                crate::files::remove_partials(db, "m.id = ?1", id)?;
                // Not sent yet: then it is not sent at all.
                db.execute("DELETE FROM outbox WHERE message_row = ?1", params![id])?;
                db.execute("DELETE FROM messages WHERE id = ?1", params![id])?;
                Ok(())
            })?;
            privacy::checkpoint(&self.db)?;
            return Ok(());
        }
        if !own.outgoing || matches!(own.kind.as_str(), "timer" | "notice") {
            return Err(Error::Usage(format!(
                "message #{id} is not yours; only your own messages can be deleted for everyone (without --everyone it goes from this device)"
            )));
        }
        let body = wire::app_message::Body::Delete(wire::Delete {
            message_id: own.message_id.clone(),
        });
        self.send_instruction(&own.group_id, body, move |db| apply_delete(db, id))
            .await?;
        privacy::checkpoint(&self.db)
    }

    /// Reacts to message `id` with `emoji`, or withdraws our reaction (`None`).
    pub async fn react(
        &mut self,
        contact: &str,
        id: i64,
        emoji: Option<&str>,
    ) -> Result<(), Error> {
        let target = self.message_of(contact, id)?;
        if target.deleted || matches!(target.kind.as_str(), "timer" | "notice") {
            return Err(Error::Usage(format!("message #{id} cannot be reacted to")));
        }
        let emoji = emoji.map(str::trim).unwrap_or_default().to_string();
        if !emoji.is_empty() && !valid_emoji(&emoji) {
            return Err(Error::Usage(format!(
                "a reaction is one emoji or short word: at most {MAX_EMOJI_BYTES} bytes, no spaces"
            )));
        }
        let body = wire::app_message::Body::Reaction(wire::Reaction {
            message_id: target.message_id.clone(),
            emoji: emoji.clone(),
        });
        self.send_instruction(&target.group_id, body, move |db| {
            apply_reaction(db, id, "me", &emoji)
        })
        .await
    }

    /// Sends a copy of text message `id` of the conversation with `from` to `to`, marked as
    /// forwarded. Files are sent again with `send-file` (their blob belongs to the first
    /// conversation).
    pub async fn forward(&mut self, from: &str, id: i64, to: &str) -> Result<MessageView, Error> {
        let original = self.message_of(from, id)?;
        if original.kind == "file" {
            return Err(Error::Usage(
                "files are forwarded by downloading them and sending them with send-file".into(),
            ));
        }
        if original.kind != "text" || original.deleted {
            return Err(Error::Usage(format!("message #{id} cannot be forwarded")));
        }
        self.send_text(
            to,
            wire::Text {
                body: original.body,
                reply_to: Vec::new(),
                forwarded: true,
                mentions: Vec::new(),
            },
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body_and_deleted(db: &Connection, message_id: u8) -> (String, bool) {
        db.query_row(
            "SELECT body, deleted FROM messages WHERE message_id = ?1",
            params![vec![message_id]],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )
        .unwrap()
    }

    #[test]
    fn in_a_group_a_member_edits_and_deletes_only_what_that_member_wrote() {
        let folder = tempfile::tempdir().unwrap();
        let mut db = Connection::open(folder.path().join("miyu.db")).unwrap();
        crate::db::configure(&mut db).unwrap();
        db.execute(
            "INSERT INTO messages (group_id, message_id, outgoing, body, sent_at_ms, received_at_ms, state, sender)
             VALUES (x'02', x'cc', 0, 'by ann', 0, 0, 'received', 'ann')",
            [],
        )
        .unwrap();
        let from = |sender: &'static str| Received {
            group_id: &[2],
            seq: 1,
            contact_account: sender,
            contact_name: sender,
            conversation_name: "club",
            sender: Some(sender),
            message_id: &[9],
            sent_at_ms: 5,
            expires_in_s: 0,
            own: false,
        };
        let edit = wire::Edit {
            message_id: vec![0xcc],
            body: "by ben".into(),
        };
        let delete = wire::Delete {
            message_id: vec![0xcc],
        };
        // Ben, another member, can neither rewrite nor delete Ann's words.
        assert!(on_edit(&db, &from("ben"), &edit).unwrap().is_none());
        assert!(on_delete(&db, &from("ben"), &delete).unwrap().is_none());
        assert_eq!(body_and_deleted(&db, 0xcc), ("by ann".into(), false));
        // Ann can.
        assert!(on_edit(&db, &from("ann"), &edit).unwrap().is_some());
        assert!(on_delete(&db, &from("ann"), &delete).unwrap().is_some());
        assert_eq!(body_and_deleted(&db, 0xcc), (String::new(), true));
    }

    #[test]
    fn a_contact_edits_and_deletes_only_what_it_wrote() {
        let folder = tempfile::tempdir().unwrap();
        let mut db = Connection::open(folder.path().join("miyu.db")).unwrap();
        crate::db::configure(&mut db).unwrap();
        for (message_id, outgoing, body) in [(0xaa_u8, true, "mine"), (0xbb, false, "theirs")] {
            db.execute(
                "INSERT INTO messages (group_id, message_id, outgoing, body, sent_at_ms, received_at_ms, state)
                 VALUES (x'01', ?1, ?2, ?3, 0, 0, 'sent')",
                params![vec![message_id], outgoing, body],
            )
            .unwrap();
        }
        let received = Received {
            group_id: &[1],
            seq: 1,
            contact_account: "contact",
            contact_name: "bob",
            conversation_name: "bob",
            sender: None,
            message_id: &[9],
            sent_at_ms: 5,
            expires_in_s: 0,
            own: false,
        };
        // What a modified client of the contact could send about our message: ignored.
        let forged_edit = wire::Edit {
            message_id: vec![0xaa],
            body: "forged".into(),
        };
        on_edit(&db, &received, &forged_edit).unwrap();
        on_delete(
            &db,
            &received,
            &wire::Delete {
                message_id: vec![0xaa],
            },
        )
        .unwrap();
        assert_eq!(body_and_deleted(&db, 0xaa), ("mine".into(), false));
        // About its own: applied.
        let edit = wire::Edit {
            message_id: vec![0xbb],
            body: "changed".into(),
        };
        on_edit(&db, &received, &edit).unwrap();
        assert_eq!(body_and_deleted(&db, 0xbb), ("changed".into(), false));
        on_delete(
            &db,
            &received,
            &wire::Delete {
                message_id: vec![0xbb],
            },
        )
        .unwrap();
        assert_eq!(body_and_deleted(&db, 0xbb), (String::new(), true));
        // Reactions: a well-formed one is kept, one per person; garbage is dropped.
        let react = |emoji: &str| wire::Reaction {
            message_id: vec![0xaa],
            emoji: emoji.into(),
        };
        on_reaction(&db, &received, &react("a b")).unwrap();
        on_reaction(&db, &received, &react("👍")).unwrap();
        on_reaction(&db, &received, &react("🎉")).unwrap();
        let reactions: Vec<(String, String)> = db
            .prepare("SELECT account, emoji FROM reactions")
            .unwrap()
            .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(reactions, [("contact".to_string(), "🎉".to_string())]);
    }

    #[test]
    fn deletions_and_edits_out_of_order_end_as_their_author_meant() {
        let folder = tempfile::tempdir().unwrap();
        let mut db = Connection::open(folder.path().join("miyu.db")).unwrap();
        crate::db::configure(&mut db).unwrap();
        let at = |sent_at_ms| Received {
            group_id: &[1],
            seq: 1,
            contact_account: "contact",
            contact_name: "bob",
            conversation_name: "bob",
            sender: None,
            message_id: &[9; 16],
            sent_at_ms,
            expires_in_s: 0,
            own: false,
        };
        // The deletion arrives before its message (a server withheld the message): the
        // message, when it comes, stays deleted.
        let late = [7u8; 16];
        on_delete(
            &db,
            &at(10),
            &wire::Delete {
                message_id: late.to_vec(),
            },
        )
        .unwrap();
        let original = Received {
            message_id: &late,
            ..at(5)
        };
        let text = wire::Text {
            body: "you never saw this".into(),
            ..Default::default()
        };
        assert!(
            crate::privacy::store_text(&db, &original, &text)
                .unwrap()
                .is_none()
        );
        let (body, deleted): (String, bool) = db
            .query_row(
                "SELECT body, deleted FROM messages WHERE message_id = ?1",
                params![late.to_vec()],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
            .unwrap();
        assert_eq!((body.as_str(), deleted), ("", true));

        // Two edits delivered in the wrong order: the later one wins.
        let edited = [8u8; 16];
        let message = Received {
            message_id: &edited,
            ..at(1)
        };
        crate::privacy::store_text(
            &db,
            &message,
            &wire::Text {
                body: "first".into(),
                ..Default::default()
            },
        )
        .unwrap();
        let edit = |body: &str| wire::Edit {
            message_id: edited.to_vec(),
            body: body.into(),
        };
        on_edit(&db, &at(30), &edit("third")).unwrap();
        on_edit(&db, &at(20), &edit("second")).unwrap();
        let body: String = db
            .query_row(
                "SELECT body FROM messages WHERE message_id = ?1",
                params![edited.to_vec()],
                |row| row.get(0),
            )
            .unwrap();
        assert_eq!(body, "third");
    }

    #[test]
    fn reactions_are_short_printable_words() {
        assert!(valid_emoji("👍"));
        assert!(valid_emoji("👨‍👩‍👧‍👦"));
        assert!(valid_emoji("ok"));
        assert!(!valid_emoji(""));
        assert!(!valid_emoji("two words"));
        assert!(!valid_emoji("a\u{7}"));
        assert!(!valid_emoji(&"x".repeat(MAX_EMOJI_BYTES + 1)));
    }
}
