//! The embedded backend: one SQLite database in WAL mode, written through one connection.
//!
//! A batch is one transaction, opened by the first operation after a commit; each operation
//! runs inside its own savepoint so that a failed one is undone without disturbing the rest of
//! the batch.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use miyu_proto::{AccountId, DeviceId, Epoch, GroupId};
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use super::{
    Appended, BackupSegment, BlobId, BlobRecord, ClaimedKeyPackage, Committed, DeviceRecord,
    DeviceSummary, EntryKind, GroupCreated, InboxEntry, LogEntry, Membership, NewBlob, NewCommit,
    NewDevice, NewGroup, NewRecovery, Recovery, RecoveryBundle, RecoveryDecision, RecoveryFailures,
    Store, StoreError, UNFINISHED_BLOB_LIFETIME, check_blob_length, coarse_day, coarse_hour,
    day_number,
};

/// A [`Store`] in one SQLite database file.
pub struct SqliteStore {
    connection: Connection,
    in_transaction: bool,
    /// Set when SQLite rolled back the open transaction by itself, or a savepoint could not be
    /// settled: the operations already answered in this batch are gone, so the commit must fail.
    lost_batch: Option<String>,
}

impl SqliteStore {
    /// Opens the database at `path`, creating it and its schema if missing.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        Self::set_up(Connection::open(path)?)
    }

    /// A database that lives only as long as the value, for tests.
    pub fn open_in_memory() -> Result<Self, StoreError> {
        Self::set_up(Connection::open_in_memory()?)
    }
}

impl Store for SqliteStore {
    fn commit(&mut self) -> Result<(), StoreError> {
        if let Some(reason) = self.lost_batch.take() {
            self.roll_back();
            return Err(StoreError::CommitFailed(reason));
        }
        if !self.in_transaction {
            return Ok(());
        }
        self.in_transaction = false;
        self.execute_cached("COMMIT").map_err(|error| {
            self.roll_back();
            error.into()
        })
    }

    fn register_device(&mut self, device: NewDevice) -> Result<(), StoreError> {
        self.write(|db| {
            let revoked = db
                .prepare_cached("SELECT 1 FROM revoked_devices WHERE device_id = ?1")?
                .exists([device.device_id.as_bytes().as_slice()])?;
            if revoked {
                return Err(StoreError::AuthenticationFailed);
            }
            let inserted = db
                .prepare_cached(
                    "INSERT INTO devices (device_id, account_id, device_key, certificate, \
                     created_hour, active_day) VALUES (?1, ?2, ?3, ?4, ?5, ?6) \
                     ON CONFLICT (device_id) DO NOTHING",
                )?
                .execute(params![
                    device.device_id.as_bytes().as_slice(),
                    device.account_id.as_bytes().as_slice(),
                    device.device_key.as_slice(),
                    device.certificate,
                    clamp_to_sql(coarse_hour(device.now)),
                    clamp_to_sql(coarse_day(device.now)),
                ])?;
            if inserted == 0 {
                return Err(StoreError::AlreadyExists);
            }
            insert_key_packages(db, &device.device_id, &device.key_packages)?;
            if let Some(last_resort) = &device.last_resort_key_package {
                replace_last_resort(db, &device.device_id, last_resort)?;
            }
            Ok(())
        })
    }

    fn device(&mut self, device_id: &DeviceId) -> Result<Option<DeviceRecord>, StoreError> {
        self.read(|db| {
            let row = db
                .prepare_cached(
                    "SELECT account_id, device_key, certificate FROM devices WHERE device_id = ?1",
                )?
                .query_row([device_id.as_bytes().as_slice()], |row| {
                    Ok((
                        row.get::<_, Vec<u8>>(0)?,
                        row.get::<_, Vec<u8>>(1)?,
                        row.get::<_, Vec<u8>>(2)?,
                    ))
                })
                .optional()?;
            let Some((account_id, device_key, certificate)) = row else {
                return Ok(None);
            };
            Ok(Some(DeviceRecord {
                device_id: *device_id,
                account_id: AccountId::from_bytes(&account_id)
                    .map_err(|_| StoreError::Corrupt("a stored account id has the wrong length"))?,
                device_key: device_key
                    .try_into()
                    .map_err(|_| StoreError::Corrupt("a stored device key has the wrong length"))?,
                certificate,
            }))
        })
    }

    fn add_key_packages(
        &mut self,
        device_id: &DeviceId,
        key_packages: Vec<Vec<u8>>,
        last_resort: Option<Vec<u8>>,
    ) -> Result<u32, StoreError> {
        self.write(|db| {
            if !device_exists(db, device_id)? {
                return Err(StoreError::NotFound);
            }
            insert_key_packages(db, device_id, &key_packages)?;
            if let Some(last_resort) = &last_resort {
                replace_last_resort(db, device_id, last_resort)?;
            }
            count_key_packages(db, device_id)
        })
    }

    fn key_package_count(&mut self, device_id: &DeviceId) -> Result<u32, StoreError> {
        self.read(|db| {
            if !device_exists(db, device_id)? {
                return Err(StoreError::NotFound);
            }
            count_key_packages(db, device_id)
        })
    }

    fn create_invite(
        &mut self,
        account_id: &AccountId,
        token_hash: [u8; 32],
        expires_at: u64,
        uses: u32,
    ) -> Result<(), StoreError> {
        self.write(|db| {
            let inserted = db
                .prepare_cached(
                    "INSERT INTO invites (token_hash, account_id, expires_at, uses_left) \
                     VALUES (?1, ?2, ?3, ?4) ON CONFLICT (token_hash) DO NOTHING",
                )?
                .execute(params![
                    token_hash.as_slice(),
                    account_id.as_bytes().as_slice(),
                    clamp_to_sql(expires_at),
                    uses.max(1),
                ])?;
            if inserted == 0 {
                return Err(StoreError::AlreadyExists);
            }
            Ok(())
        })
    }

    fn claim_invite(
        &mut self,
        token_hash: &[u8; 32],
        claimer: &DeviceId,
        now: u64,
    ) -> Result<Vec<ClaimedKeyPackage>, StoreError> {
        self.write(|db| {
            // An expired invite stays until `expire`: the savepoint undoes this change.
            let invite = db
                .prepare_cached(
                    "UPDATE invites SET uses_left = uses_left - 1 WHERE token_hash = ?1 \
                     RETURNING account_id, expires_at",
                )?
                .query_row([token_hash.as_slice()], |row| {
                    Ok((row.get::<_, Vec<u8>>(0)?, row.get::<_, i64>(1)?))
                })
                .optional()?;
            db.prepare_cached("DELETE FROM invites WHERE token_hash = ?1 AND uses_left <= 0")?
                .execute([token_hash.as_slice()])?;
            let Some((account_id, expires_at)) = invite else {
                return Err(StoreError::NotFound);
            };
            if expires_at <= clamp_to_sql(now) {
                return Err(StoreError::NotFound);
            }
            claim_account(db, &account_id, claimer, now, None)
        })
    }

    fn set_username(
        &mut self,
        account_id: &AccountId,
        name_hash: Option<[u8; 32]>,
    ) -> Result<(), StoreError> {
        self.write(|db| {
            let account = account_id.as_bytes().as_slice();
            db.prepare_cached("DELETE FROM usernames WHERE account_id = ?1")?
                .execute([account])?;
            let Some(name_hash) = name_hash else {
                return Ok(());
            };
            let inserted = db
                .prepare_cached(
                    "INSERT INTO usernames (name_hash, account_id) VALUES (?1, ?2) \
                     ON CONFLICT (name_hash) DO NOTHING",
                )?
                .execute(params![name_hash.as_slice(), account])?;
            if inserted == 0 {
                return Err(StoreError::AlreadyExists);
            }
            Ok(())
        })
    }

    fn touch_account(
        &mut self,
        account_id: &AccountId,
        lifetime_days: Option<u32>,
        now: u64,
    ) -> Result<(), StoreError> {
        self.write(|db| {
            let account = account_id.as_bytes().as_slice();
            touch_account_row(db, account, now)?;
            if let Some(days) = lifetime_days {
                db.prepare_cached("UPDATE accounts SET lifetime_days = ?2 WHERE account_id = ?1")?
                    .execute(params![account, days])?;
            }
            Ok(())
        })
    }

    fn touch_device(&mut self, device_id: &DeviceId, now: u64) -> Result<(), StoreError> {
        self.write(|db| {
            let account = account_of(db, device_id)?.ok_or(StoreError::AuthenticationFailed)?;
            // Written only when the day changes: most authentications then write nothing.
            db.prepare_cached(
                "UPDATE devices SET active_day = ?2 WHERE device_id = ?1 AND active_day != ?2",
            )?
            .execute(params![
                device_id.as_bytes().as_slice(),
                clamp_to_sql(coarse_day(now))
            ])?;
            touch_account_row(db, &account, now)
        })
    }

    fn account_devices(&mut self, requester: &DeviceId) -> Result<Vec<DeviceSummary>, StoreError> {
        self.read(|db| {
            let account = account_of(db, requester)?.ok_or(StoreError::AuthenticationFailed)?;
            db.prepare_cached(
                "SELECT device_id, certificate, created_hour, active_day FROM devices \
                 WHERE account_id = ?1 ORDER BY device_id",
            )?
            .query_map([&account], |row| {
                Ok((
                    row.get::<_, Vec<u8>>(0)?,
                    row.get::<_, Vec<u8>>(1)?,
                    row.get::<_, i64>(2)?,
                    row.get::<_, i64>(3)?,
                ))
            })?
            .map(|row| {
                let (device_id, certificate, created_hour, active_day) = row?;
                Ok(DeviceSummary {
                    device_id: decode_device_id(&device_id)?,
                    certificate,
                    created_day: day_number(u64_from_sql(created_hour)?),
                    active_day: day_number(u64_from_sql(active_day)?),
                })
            })
            .collect()
        })
    }

    fn revoke_device(
        &mut self,
        requester: &DeviceId,
        device_id: &DeviceId,
        signature: &[u8],
    ) -> Result<(), StoreError> {
        self.write(|db| {
            let (account, certificate) = requester_of(db, requester)?;
            let device = device_id.as_bytes().as_slice();
            let registered = account_of(db, device_id)?.is_some_and(|of| of == account);
            let revoked_already = !registered
                && db
                    .prepare_cached(
                        "SELECT 1 FROM revoked_devices WHERE device_id = ?1 AND account_id = ?2",
                    )?
                    .exists(params![device, account])?;
            if !registered && !revoked_already {
                return Err(StoreError::NotFound);
            }
            let account_id = AccountId::from_bytes(&account)
                .map_err(|_| StoreError::Corrupt("a stored account id has the wrong length"))?;
            super::check_revocation(&certificate, &account_id, device_id, signature)?;
            if revoked_already {
                return Ok(());
            }
            let groups = db
                .prepare_cached("SELECT group_id FROM group_members WHERE device_id = ?1")?
                .query_map([device], |row| row.get::<_, Vec<u8>>(0))?
                .collect::<Result<Vec<_>, _>>()?;
            for sql in [
                "DELETE FROM key_packages WHERE device_id = ?1",
                "DELETE FROM add_grants WHERE claimer = ?1 OR target = ?1",
                "DELETE FROM inbox WHERE device_id = ?1",
                "DELETE FROM group_members WHERE device_id = ?1",
                "DELETE FROM devices WHERE device_id = ?1",
            ] {
                db.prepare_cached(sql)?.execute([device])?;
            }
            // As after leaving: the device may have been what held the oldest entries back.
            for group in &groups {
                drop_acknowledged(db, group)?;
            }
            db.prepare_cached(
                "INSERT INTO revoked_devices (device_id, account_id) VALUES (?1, ?2)",
            )?
            .execute(params![device, account])?;
            Ok(())
        })
    }

    fn put_link(
        &mut self,
        mailbox: [u8; 32],
        payload: Vec<u8>,
        expires_at: u64,
        now: u64,
    ) -> Result<(), StoreError> {
        self.write(|db| {
            db.prepare_cached(
                "DELETE FROM link_mailboxes WHERE mailbox = ?1 AND expires_at <= ?2",
            )?
            .execute(params![mailbox.as_slice(), clamp_to_sql(now)])?;
            let inserted = db
                .prepare_cached(
                    "INSERT INTO link_mailboxes (mailbox, payload, expires_at) VALUES (?1, ?2, ?3) \
                     ON CONFLICT (mailbox) DO NOTHING",
                )?
                .execute(params![
                    mailbox.as_slice(),
                    payload,
                    clamp_to_sql(expires_at)
                ])?;
            if inserted == 0 {
                return Err(StoreError::AlreadyExists);
            }
            Ok(())
        })
    }

    fn take_link(&mut self, mailbox: &[u8; 32], now: u64) -> Result<Vec<u8>, StoreError> {
        self.write(|db| {
            db.prepare_cached(
                "DELETE FROM link_mailboxes WHERE mailbox = ?1 AND expires_at > ?2 \
                 RETURNING payload",
            )?
            .query_row(params![mailbox.as_slice(), clamp_to_sql(now)], |row| {
                row.get::<_, Vec<u8>>(0)
            })
            .optional()?
            .ok_or(StoreError::NotFound)
        })
    }

    fn set_recovery(
        &mut self,
        requester: &DeviceId,
        recovery: NewRecovery,
    ) -> Result<(), StoreError> {
        self.write(|db| {
            let (account, certificate) = requester_of(db, requester)?;
            let account_id = AccountId::from_bytes(&account)
                .map_err(|_| StoreError::Corrupt("a stored account id has the wrong length"))?;
            super::check_recovery(&certificate, &account_id, &recovery)?;
            let taken = db
                .prepare_cached("SELECT 1 FROM recovery WHERE locator = ?1 AND account_id != ?2")?
                .exists(params![recovery.locator.as_slice(), account])?;
            if taken {
                return Err(StoreError::AlreadyExists);
            }
            db.prepare_cached(
                "INSERT INTO recovery (account_id, locator, verifier, bundle, failures, \
                 window_ends_at) VALUES (?1, ?2, ?3, ?4, 0, 0) ON CONFLICT (account_id) DO \
                 UPDATE SET locator = excluded.locator, verifier = excluded.verifier, \
                 bundle = excluded.bundle, failures = 0, window_ends_at = 0",
            )?
            .execute(params![
                account,
                recovery.locator.as_slice(),
                recovery.verifier.as_slice(),
                recovery.bundle
            ])?;
            Ok(())
        })
    }

    fn recover(
        &mut self,
        locator: &[u8; 32],
        auth_key: &[u8; 32],
        now: u64,
    ) -> Result<Recovery, StoreError> {
        self.write(|db| {
            let (account, verifier, bundle, count, window_ends_at) = db
                .prepare_cached(
                    "SELECT account_id, verifier, bundle, failures, window_ends_at FROM recovery \
                     WHERE locator = ?1",
                )?
                .query_row([locator.as_slice()], |row| {
                    Ok((
                        row.get::<_, Vec<u8>>(0)?,
                        row.get::<_, Vec<u8>>(1)?,
                        row.get::<_, Vec<u8>>(2)?,
                        row.get::<_, i64>(3)?,
                        row.get::<_, i64>(4)?,
                    ))
                })
                .optional()?
                .ok_or(StoreError::NotFound)?;
            let failures = RecoveryFailures {
                count: u32::try_from(count)
                    .map_err(|_| StoreError::Corrupt("a stored failure count is out of range"))?,
                window_ends_at: u64_from_sql(window_ends_at)?,
            };
            match super::decide_recovery(&verifier, failures, auth_key, now)? {
                RecoveryDecision::Locked => Ok(Recovery::Locked),
                RecoveryDecision::WrongKey(failures) => {
                    db.prepare_cached(
                        "UPDATE recovery SET failures = ?2, window_ends_at = ?3 \
                         WHERE account_id = ?1",
                    )?
                    .execute(params![
                        account,
                        failures.count,
                        clamp_to_sql(failures.window_ends_at)
                    ])?;
                    Ok(Recovery::WrongKey)
                }
                RecoveryDecision::Granted => Ok(Recovery::Granted(RecoveryBundle {
                    bundle,
                    backup: backup_chain(db, &account)?,
                })),
            }
        })
    }

    fn set_backup(
        &mut self,
        account_id: &AccountId,
        segment: BackupSegment,
        append_after: Option<&BlobId>,
        now: u64,
    ) -> Result<Vec<BlobId>, StoreError> {
        self.write(|db| {
            let account = account_id.as_bytes().as_slice();
            let chain = backup_chain(db, account)?;
            let blob = blob_row(db, &segment.blob_id)?;
            let (chain, replaced) = super::next_backup_chain(
                &chain,
                blob.as_ref(),
                account_id,
                segment,
                append_after,
                now,
            )?;
            // At most 64 rows: rewritten whole rather than patched.
            db.prepare_cached("DELETE FROM backup_segments WHERE account_id = ?1")?
                .execute([account])?;
            let mut insert = db.prepare_cached(
                "INSERT INTO backup_segments (account_id, position, blob_id, size) \
                 VALUES (?1, ?2, ?3, ?4)",
            )?;
            for (position, kept) in chain.iter().enumerate() {
                insert.execute(params![
                    account,
                    i64::try_from(position).unwrap_or(i64::MAX),
                    kept.blob_id.as_slice(),
                    clamp_to_sql(kept.size)
                ])?;
            }
            let mut delete = db.prepare_cached("DELETE FROM blobs WHERE blob_id = ?1")?;
            for blob_id in &replaced {
                delete.execute([blob_id.as_slice()])?;
            }
            Ok(replaced)
        })
    }

    fn delete_account(&mut self, account_id: &AccountId) -> Result<(), StoreError> {
        self.write(|db| delete_account_rows(db, account_id.as_bytes()))
    }

    fn claim_username(
        &mut self,
        name_hash: &[u8; 32],
        claimer: &DeviceId,
        now: u64,
    ) -> Result<Vec<ClaimedKeyPackage>, StoreError> {
        self.write(|db| {
            let account_id = db
                .prepare_cached("SELECT account_id FROM usernames WHERE name_hash = ?1")?
                .query_row([name_hash.as_slice()], |row| row.get::<_, Vec<u8>>(0))
                .optional()?
                .ok_or(StoreError::NotFound)?;
            claim_account(db, &account_id, claimer, now, None)
        })
    }

    fn create_group(&mut self, group: NewGroup) -> Result<GroupCreated, StoreError> {
        self.write(|db| {
            let group_id = group.group_id.as_bytes();
            let inserted = db
                .prepare_cached(
                    "INSERT INTO groups (group_id, epoch, next_seq, posting_key) \
                     VALUES (?1, ?2, 1, ?3) ON CONFLICT (group_id) DO NOTHING",
                )?
                .execute(params![
                    group_id,
                    epoch_to_sql(group.epoch),
                    group.posting_key.map(|key| key.to_vec())
                ])?;
            if inserted == 0 {
                return Err(StoreError::AlreadyExists);
            }
            let creator_account = account_of(db, &group.creator)?.ok_or(StoreError::Forbidden)?;
            let mut members: BTreeSet<DeviceId> = group.members.iter().copied().collect();
            members.insert(group.creator);
            for member in &members {
                if *member != group.creator {
                    consume_grant(db, &group.creator, &creator_account, member, group.now)?;
                }
                db.prepare_cached(
                    "INSERT INTO group_members (group_id, device_id, cursor) VALUES (?1, ?2, 0)",
                )?
                .execute(params![group_id, member.as_bytes().as_slice()])?;
            }
            let mut welcomed = BTreeSet::new();
            for (device_id, welcome) in &group.welcomes {
                if !members.contains(device_id) {
                    return Err(StoreError::Forbidden);
                }
                push_to_inbox(db, device_id, welcome, group.now)?;
                welcomed.insert(*device_id);
            }
            if let Some(welcome) = &group.welcome {
                for member in members.iter().filter(|member| **member != group.creator) {
                    push_to_inbox(db, member, welcome, group.now)?;
                    welcomed.insert(*member);
                }
            }
            Ok(GroupCreated {
                members: members.into_iter().collect(),
                welcomed: welcomed.into_iter().collect(),
            })
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn append(
        &mut self,
        group_id: &GroupId,
        poster: &DeviceId,
        epoch: Epoch,
        kind: EntryKind,
        payload: Vec<u8>,
        expires_at: Option<u64>,
        now: u64,
    ) -> Result<Appended, StoreError> {
        self.write(|db| {
            let seq = append_entry(db, group_id, poster, epoch, kind, &payload, expires_at, now)?;
            Ok(Appended {
                seq,
                members: members_of(db, group_id.as_bytes())?,
            })
        })
    }

    fn claim_contact(
        &mut self,
        account_id: &AccountId,
        claimer: &DeviceId,
        now: u64,
    ) -> Result<Vec<ClaimedKeyPackage>, StoreError> {
        self.write(|db| {
            let own = account_of(db, claimer)?
                .is_some_and(|of| of.as_slice() == account_id.as_bytes().as_slice());
            if own {
                // The claimer's other devices: it needs no key package of its own.
                return claim_account(db, account_id.as_bytes(), claimer, now, Some(claimer));
            }
            let shares_a_group = db
                .prepare_cached(
                    "SELECT 1 FROM group_members mine \
                     JOIN group_members theirs ON theirs.group_id = mine.group_id \
                     JOIN devices d ON d.device_id = theirs.device_id \
                     WHERE mine.device_id = ?1 AND d.account_id = ?2 \
                     AND mine.until_seq IS NULL AND theirs.until_seq IS NULL LIMIT 1",
                )?
                .exists(params![
                    claimer.as_bytes().as_slice(),
                    account_id.as_bytes().as_slice()
                ])?;
            if !shares_a_group {
                return Err(StoreError::NotFound);
            }
            claim_account(db, account_id.as_bytes(), claimer, now, None)
        })
    }

    fn commit_members(&mut self, commit: NewCommit) -> Result<Committed, StoreError> {
        super::check_commit_shape(&commit)?;
        self.write(|db| {
            let group_key = commit.group_id.as_bytes();
            let committer_account =
                account_of(db, &commit.committer)?.ok_or(StoreError::Forbidden)?;
            check_own_removals(db, &committer_account, &commit.remove)?;
            let seq = append_entry(
                db,
                &commit.group_id,
                &commit.committer,
                commit.epoch,
                EntryKind::Commit,
                &commit.payload,
                None,
                commit.now,
            )?;
            // Devices that left by themselves are gone already; the commit still takes their
            // leaves out of the MLS tree.
            let mut removed_now = Vec::new();
            for device in &commit.remove {
                // It still reads up to this commit, which tells it it was removed.
                let removed = db
                    .prepare_cached(
                        "UPDATE group_members SET until_seq = ?3 \
                         WHERE group_id = ?1 AND device_id = ?2 AND until_seq IS NULL",
                    )?
                    .execute(params![
                        group_key,
                        device.as_bytes().as_slice(),
                        clamp_to_sql(seq)
                    ])?;
                if removed == 1 {
                    removed_now.push(*device);
                }
            }
            for device in &commit.add {
                if is_member(db, group_key, device)? {
                    return Err(StoreError::Invalid("an added device is a member already"));
                }
                // Until it has read the commit that removed it, its own state still says it
                // is in: a Welcome now would find it "in the group already" and be lost.
                let unread_removal = db
                    .prepare_cached(
                        "SELECT 1 FROM group_members WHERE group_id = ?1 AND device_id = ?2 \
                         AND until_seq IS NOT NULL",
                    )?
                    .exists(params![group_key, device.as_bytes().as_slice()])?;
                if unread_removal {
                    return Err(StoreError::Invalid(
                        "an added device has not yet read its removal; try again later",
                    ));
                }
                consume_grant(
                    db,
                    &commit.committer,
                    &committer_account,
                    device,
                    commit.now,
                )?;
                db.prepare_cached(
                    // Removed earlier (and not done reading up to it) and added again: it
                    // starts afresh after this commit.
                    "INSERT INTO group_members (group_id, device_id, cursor) VALUES (?1, ?2, ?3) \
                     ON CONFLICT (group_id, device_id) DO UPDATE \
                     SET cursor = excluded.cursor, until_seq = NULL",
                )?
                .execute(params![
                    group_key,
                    device.as_bytes().as_slice(),
                    clamp_to_sql(seq)
                ])?;
            }
            let mut welcomed = BTreeSet::new();
            for (device_id, welcome) in &commit.welcomes {
                push_to_inbox(db, device_id, welcome, commit.now)?;
                welcomed.insert(*device_id);
            }
            if let Some(welcome) = &commit.welcome {
                for device_id in &commit.add {
                    push_to_inbox(db, device_id, welcome, commit.now)?;
                    welcomed.insert(*device_id);
                }
            }
            set_posting_key(db, group_key, commit.next_posting_key)?;
            Ok(Committed {
                seq,
                members: members_of(db, group_key)?,
                removed: removed_now,
                welcomed: welcomed.into_iter().collect(),
            })
        })
    }

    fn set_posting_key(
        &mut self,
        group_id: &GroupId,
        epoch: Epoch,
        posting_key: Option<[u8; 32]>,
    ) -> Result<(), StoreError> {
        self.write(|db| {
            let current = group_epoch_and_key(db, group_id.as_bytes())?.0;
            if current != epoch {
                return Err(StoreError::EpochMismatch { current });
            }
            set_posting_key(db, group_id.as_bytes(), posting_key)
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn append_unattributed(
        &mut self,
        group_id: &GroupId,
        epoch: Epoch,
        payload: Vec<u8>,
        expires_at: Option<u64>,
        signed_expires_at: u64,
        signature: &[u8],
        now: u64,
    ) -> Result<Appended, StoreError> {
        self.write(|db| {
            let group_key = group_id.as_bytes();
            let (current, posting_key) = group_epoch_and_key(db, group_key)?;
            super::check_unattributed(
                group_id,
                current,
                posting_key,
                epoch,
                signed_expires_at,
                &payload,
                signature,
            )?;
            let seq = insert_entry(
                db,
                group_key,
                current,
                EntryKind::Application,
                &payload,
                expires_at,
                now,
            )?;
            Ok(Appended {
                seq,
                members: members_of(db, group_key)?,
            })
        })
    }

    fn leave_group(&mut self, group_id: &GroupId, device_id: &DeviceId) -> Result<(), StoreError> {
        self.write(|db| {
            let group_key = group_id.as_bytes();
            let left = db
                .prepare_cached("DELETE FROM group_members WHERE group_id = ?1 AND device_id = ?2")?
                .execute(params![group_key, device_id.as_bytes().as_slice()])?;
            if left == 0 {
                return Err(StoreError::Forbidden);
            }
            // The leaver may have been the one holding the oldest entries back.
            drop_acknowledged(db, group_key)
        })
    }

    fn group_entries(
        &mut self,
        group_id: &GroupId,
        device_id: &DeviceId,
        after_seq: u64,
        limit: usize,
        now: u64,
    ) -> Result<Vec<LogEntry>, StoreError> {
        self.read(|db| {
            let group_key = group_id.as_bytes();
            // A removed device reads up to the commit that removed it.
            let until = db
                .prepare_cached(
                    "SELECT until_seq FROM group_members WHERE group_id = ?1 AND device_id = ?2",
                )?
                .query_row(params![group_key, device_id.as_bytes().as_slice()], |row| {
                    row.get::<_, Option<i64>>(0)
                })
                .optional()?
                .ok_or(StoreError::Forbidden)?
                .unwrap_or(i64::MAX);
            db.prepare_cached(
                "SELECT seq, epoch, kind, payload FROM group_log \
                 WHERE group_id = ?1 AND seq > ?2 AND seq <= ?5 \
                 AND (expires_at IS NULL OR expires_at > ?4) ORDER BY seq LIMIT ?3",
            )?
            .query_map(
                params![
                    group_key,
                    clamp_to_sql(after_seq),
                    i64::try_from(limit).unwrap_or(i64::MAX),
                    clamp_to_sql(now),
                    until,
                ],
                |row| {
                    Ok((
                        row.get::<_, i64>(0)?,
                        row.get::<_, i64>(1)?,
                        row.get::<_, i64>(2)?,
                        row.get::<_, Vec<u8>>(3)?,
                    ))
                },
            )?
            .map(|row| {
                let (seq, epoch, kind, payload) = row?;
                Ok(LogEntry {
                    seq: seq_from_sql(seq)?,
                    epoch: epoch_from_sql(epoch),
                    kind: kind_from_sql(kind)?,
                    payload,
                })
            })
            .collect()
        })
    }

    fn memberships(&mut self, device_id: &DeviceId) -> Result<Vec<Membership>, StoreError> {
        self.read(|db| {
            db.prepare_cached(
                "SELECT group_id, cursor FROM group_members WHERE device_id = ?1 \
                 ORDER BY group_id",
            )?
            .query_map([device_id.as_bytes().as_slice()], |row| {
                Ok((row.get::<_, Vec<u8>>(0)?, row.get::<_, i64>(1)?))
            })?
            .map(|row| {
                let (group_id, cursor) = row?;
                Ok(Membership {
                    group_id: decode_group_id(&group_id)?,
                    cursor: seq_from_sql(cursor)?,
                })
            })
            .collect()
        })
    }

    fn ack_group(
        &mut self,
        device_id: &DeviceId,
        group_id: &GroupId,
        seq: u64,
    ) -> Result<(), StoreError> {
        self.write(|db| {
            let group_key = group_id.as_bytes();
            // Acknowledging entries that do not exist yet would hide them once they do.
            let next_seq = db
                .prepare_cached("SELECT next_seq FROM groups WHERE group_id = ?1")?
                .query_row([group_key], |row| row.get::<_, i64>(0))
                .optional()?
                .ok_or(StoreError::Forbidden)?;
            let acknowledged = clamp_to_sql(seq).min(next_seq.saturating_sub(1));
            let updated = db
                .prepare_cached(
                    "UPDATE group_members SET cursor = max(cursor, ?3) \
                     WHERE group_id = ?1 AND device_id = ?2",
                )?
                .execute(params![
                    group_key,
                    device_id.as_bytes().as_slice(),
                    acknowledged
                ])?;
            if updated == 0 {
                return Err(StoreError::Forbidden);
            }
            // A removed device that has everything up to its removal is gone for good.
            db.prepare_cached(
                "DELETE FROM group_members WHERE group_id = ?1 AND device_id = ?2 \
                 AND until_seq IS NOT NULL AND cursor >= until_seq",
            )?
            .execute(params![group_key, device_id.as_bytes().as_slice()])?;
            db.prepare_cached(
                "DELETE FROM group_log WHERE group_id = ?1 AND seq <= \
                 (SELECT min(cursor) FROM group_members WHERE group_id = ?1)",
            )?
            .execute([group_key])?;
            Ok(())
        })
    }

    fn inbox_entries(
        &mut self,
        device_id: &DeviceId,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<InboxEntry>, StoreError> {
        self.read(|db| {
            db.prepare_cached(
                "SELECT seq, payload FROM inbox WHERE device_id = ?1 AND seq > ?2 \
                 ORDER BY seq LIMIT ?3",
            )?
            .query_map(
                params![
                    device_id.as_bytes().as_slice(),
                    clamp_to_sql(after_seq),
                    i64::try_from(limit).unwrap_or(i64::MAX)
                ],
                |row| Ok((row.get::<_, i64>(0)?, row.get::<_, Vec<u8>>(1)?)),
            )?
            .map(|row| {
                let (seq, payload) = row?;
                Ok(InboxEntry {
                    seq: seq_from_sql(seq)?,
                    payload,
                })
            })
            .collect()
        })
    }

    fn ack_inbox(&mut self, device_id: &DeviceId, seq: u64) -> Result<(), StoreError> {
        self.write(|db| {
            db.prepare_cached("DELETE FROM inbox WHERE device_id = ?1 AND seq <= ?2")?
                .execute(params![device_id.as_bytes().as_slice(), clamp_to_sql(seq)])?;
            Ok(())
        })
    }

    fn expire(&mut self, now: u64, cutoff: u64) -> Result<u64, StoreError> {
        self.write(|db| {
            // Only whole hours before the cutoff's are surely older than it.
            let cutoff_hour = clamp_to_sql(coarse_hour(cutoff));
            // Likewise, only whole hours before the day's start surely are a day old.
            let unfinished_cutoff_hour =
                clamp_to_sql(coarse_hour(now.saturating_sub(UNFINISHED_BLOB_LIFETIME)));
            let now = clamp_to_sql(now);
            let inactive = db
                .prepare_cached(
                    "SELECT account_id FROM accounts WHERE active_day + lifetime_days * 86400 <= ?1",
                )?
                .query_map([now], |row| row.get::<_, Vec<u8>>(0))?
                .collect::<Result<Vec<_>, _>>()?;
            for account in &inactive {
                delete_account_rows(db, account)?;
            }
            let mut removed = inactive.len();
            for (sql, bound) in [
                ("DELETE FROM group_log WHERE created_hour < ?1", cutoff_hour),
                ("DELETE FROM group_log WHERE expires_at <= ?1", now),
                ("DELETE FROM inbox WHERE created_hour < ?1", cutoff_hour),
                ("DELETE FROM invites WHERE expires_at <= ?1", now),
                ("DELETE FROM add_grants WHERE expires_at <= ?1", now),
                (
                    "DELETE FROM blobs WHERE expires_at <= ?1 \
                     AND blob_id NOT IN (SELECT blob_id FROM backup_segments)",
                    now,
                ),
                ("DELETE FROM link_mailboxes WHERE expires_at <= ?1", now),
                (
                    "DELETE FROM blobs WHERE length < size AND created_hour < ?1",
                    unfinished_cutoff_hour,
                ),
            ] {
                removed += db.prepare_cached(sql)?.execute([bound])?;
            }
            // Removed devices with nothing left to read up to their removal.
            removed += db
                .prepare_cached(
                    "DELETE FROM group_members WHERE until_seq IS NOT NULL AND NOT EXISTS \
                     (SELECT 1 FROM group_log l WHERE l.group_id = group_members.group_id \
                     AND l.seq > group_members.cursor AND l.seq <= group_members.until_seq)",
                )?
                .execute([])?;
            removed += db
                .prepare_cached(
                    "DELETE FROM blobs WHERE group_id IN (SELECT group_id FROM groups \
                     WHERE NOT EXISTS (SELECT 1 FROM group_members \
                     WHERE group_members.group_id = groups.group_id \
                     AND group_members.until_seq IS NULL))",
                )?
                .execute([])?;
            Ok(u64::try_from(removed).unwrap_or(u64::MAX))
        })
    }

    fn create_blob(&mut self, blob: NewBlob, quota_bytes: u64) -> Result<(), StoreError> {
        self.write(|db| {
            let group_key = blob.group_id.as_ref().map(GroupId::as_bytes);
            let group_exists = match group_key {
                Some(group_key) => db
                    .prepare_cached("SELECT 1 FROM groups WHERE group_id = ?1")?
                    .exists([group_key])?,
                None => true,
            };
            let account_id = account_of(db, &blob.uploader)?;
            let (true, Some(account_id)) = (group_exists, account_id) else {
                return Err(StoreError::NotFound);
            };
            if let Some(group_key) = group_key
                && !is_member(db, group_key, &blob.uploader)?
            {
                return Err(StoreError::Forbidden);
            }
            let taken = db
                .prepare_cached("SELECT 1 FROM blobs WHERE blob_id = ?1")?
                .exists([blob.blob_id.as_slice()])?;
            if taken {
                return Err(StoreError::AlreadyExists);
            }
            // Summed here rather than by SQLite, whose sum() fails on overflow.
            let mut used = 0u64;
            let mut count = 0usize;
            for size in db
                .prepare_cached("SELECT size FROM blobs WHERE account_id = ?1")?
                .query_map([&account_id], |row| row.get::<_, i64>(0))?
            {
                used = used.saturating_add(u64_from_sql(size?)?);
                count += 1;
            }
            if used.saturating_add(blob.size) > quota_bytes || count >= blob.max_blobs {
                return Err(StoreError::QuotaExceeded);
            }
            db.prepare_cached(
                "INSERT INTO blobs (blob_id, account_id, uploader, group_id, size, length, \
                 created_hour, expires_at) VALUES (?1, ?2, ?3, ?4, ?5, 0, ?6, ?7)",
            )?
            .execute(params![
                blob.blob_id.as_slice(),
                account_id,
                blob.uploader.as_bytes().as_slice(),
                group_key,
                clamp_to_sql(blob.size),
                clamp_to_sql(coarse_hour(blob.now)),
                clamp_to_sql(blob.expires_at),
            ])?;
            Ok(())
        })
    }

    fn blob(
        &mut self,
        blob_id: &BlobId,
        device: &DeviceId,
        now: u64,
    ) -> Result<BlobRecord, StoreError> {
        self.read(|db| {
            let Some(blob) = blob_row(db, blob_id)? else {
                return Err(StoreError::NotFound);
            };
            if blob.expires_at <= now && !is_backup(db, blob_id)? {
                return Err(StoreError::NotFound);
            }
            let allowed = blob.uploader == *device
                || match &blob.group_id {
                    Some(group_id) => is_member(db, group_id.as_bytes(), device)?,
                    // An account's blob: for its registered devices, not revoked ones.
                    None => account_of(db, device)?
                        .is_some_and(|of| of.as_slice() == blob.account_id.as_bytes().as_slice()),
                };
            if !allowed {
                return Err(StoreError::Forbidden);
            }
            Ok(blob)
        })
    }

    fn set_blob_length(
        &mut self,
        blob_id: &BlobId,
        uploader: &DeviceId,
        length: u64,
    ) -> Result<(), StoreError> {
        self.write(|db| {
            let (stored_uploader, size, recorded) = db
                .prepare_cached("SELECT uploader, size, length FROM blobs WHERE blob_id = ?1")?
                .query_row([blob_id.as_slice()], |row| {
                    Ok((
                        row.get::<_, Vec<u8>>(0)?,
                        row.get::<_, i64>(1)?,
                        row.get::<_, i64>(2)?,
                    ))
                })
                .optional()?
                .ok_or(StoreError::NotFound)?;
            if stored_uploader.as_slice() != uploader.as_bytes().as_slice() {
                return Err(StoreError::Forbidden);
            }
            check_blob_length(u64_from_sql(size)?, u64_from_sql(recorded)?, length)?;
            db.prepare_cached("UPDATE blobs SET length = ?2 WHERE blob_id = ?1")?
                .execute(params![blob_id.as_slice(), clamp_to_sql(length)])?;
            Ok(())
        })
    }

    fn live_blob_ids(&mut self) -> Result<Vec<BlobId>, StoreError> {
        self.read(|db| {
            db.prepare_cached("SELECT blob_id FROM blobs ORDER BY blob_id")?
                .query_map([], |row| row.get::<_, Vec<u8>>(0))?
                .map(|blob_id| {
                    BlobId::try_from(blob_id?)
                        .map_err(|_| StoreError::Corrupt("a stored blob id has the wrong length"))
                })
                .collect()
        })
    }
}

impl SqliteStore {
    fn set_up(mut connection: Connection) -> Result<Self, StoreError> {
        // Another process (a backup tool, the operator's sqlite3 shell) may hold the lock briefly.
        connection.busy_timeout(Duration::from_secs(5))?;
        connection.pragma_update(None, "journal_mode", "WAL")?;
        // In WAL mode only FULL syncs the log on every commit; NORMAL may lose the last batches,
        // which were already acknowledged, on power loss.
        connection.pragma_update(None, "synchronous", "FULL")?;
        connection.pragma_update(None, "foreign_keys", "ON")?;
        // Deleted messages should not linger in free pages.
        connection.pragma_update(None, "secure_delete", "ON")?;
        connection.set_prepared_statement_cache_capacity(64);
        migrate(&mut connection)?;
        Ok(Self {
            connection,
            in_transaction: false,
            lost_batch: None,
        })
    }

    /// Runs one writing operation inside the batch's transaction, atomically.
    fn write<R>(
        &mut self,
        operation: impl FnOnce(&Connection) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        if !self.in_transaction {
            self.execute_cached("BEGIN IMMEDIATE")?;
            self.in_transaction = true;
        }
        if let Err(error) = self.execute_cached("SAVEPOINT operation") {
            self.lose_batch(&error);
            return Err(error.into());
        }
        let result = operation(&self.connection);
        if self.connection.is_autocommit() {
            // Some errors (disk full, I/O) make SQLite roll back the whole transaction.
            self.lose_batch(&"SQLite rolled back the transaction");
            return result;
        }
        let settled = if result.is_ok() {
            self.execute_cached("RELEASE operation")
        } else {
            self.execute_cached("ROLLBACK TO operation")
                .and_then(|()| self.execute_cached("RELEASE operation"))
        };
        match settled {
            Ok(()) => result,
            Err(error) => {
                self.lose_batch(&error);
                match result {
                    Ok(_) => Err(error.into()),
                    Err(original) => Err(original),
                }
            }
        }
    }

    /// Runs a reading operation; it needs no savepoint as it leaves nothing to undo.
    fn read<R>(
        &self,
        operation: impl FnOnce(&Connection) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        operation(&self.connection)
    }

    fn execute_cached(&self, sql: &str) -> rusqlite::Result<()> {
        self.connection.prepare_cached(sql)?.execute([]).map(|_| ())
    }

    fn lose_batch(&mut self, reason: &dyn std::fmt::Display) {
        self.roll_back();
        self.lost_batch.get_or_insert_with(|| reason.to_string());
    }

    fn roll_back(&mut self) {
        if !self.connection.is_autocommit() {
            // Best effort: if even this fails, the connection is unusable and the next
            // statement reports it.
            let _ = self.connection.execute_batch("ROLLBACK");
        }
        self.in_transaction = false;
    }
}

#[cfg(test)]
impl SqliteStore {
    /// Removes every member of a group: a state that no operation reaches yet (the last member
    /// goes only with its account, and its blobs with it), for the tests of `expire`.
    pub(super) fn remove_group_members(&mut self, group_id: &GroupId) -> Result<(), StoreError> {
        self.write(|db| {
            db.prepare_cached("DELETE FROM group_members WHERE group_id = ?1")?
                .execute([group_id.as_bytes()])?;
            Ok(())
        })
    }
}

/// How long the right to add a device, won by claiming an invite, lasts.
const GRANT_LIFETIME: u64 = 24 * 3600;

const SCHEMA_VERSION: i64 = 8;

const SCHEMA: &str = "
CREATE TABLE devices (
    device_id BLOB PRIMARY KEY NOT NULL,
    account_id BLOB NOT NULL,
    device_key BLOB NOT NULL,
    certificate BLOB NOT NULL,
    created_hour INTEGER NOT NULL,
    inbox_next_seq INTEGER NOT NULL DEFAULT 1
);
CREATE INDEX devices_by_account ON devices (account_id);

CREATE TABLE key_packages (
    id INTEGER PRIMARY KEY,
    device_id BLOB NOT NULL REFERENCES devices (device_id),
    key_package BLOB NOT NULL,
    last_resort INTEGER NOT NULL
);
CREATE INDEX key_packages_by_device ON key_packages (device_id, last_resort);

CREATE TABLE invites (
    token_hash BLOB PRIMARY KEY NOT NULL,
    account_id BLOB NOT NULL,
    expires_at INTEGER NOT NULL
) WITHOUT ROWID;

CREATE TABLE add_grants (
    claimer BLOB NOT NULL REFERENCES devices (device_id),
    target BLOB NOT NULL REFERENCES devices (device_id),
    expires_at INTEGER NOT NULL,
    PRIMARY KEY (claimer, target)
) WITHOUT ROWID;

CREATE TABLE groups (
    group_id BLOB PRIMARY KEY NOT NULL,
    epoch INTEGER NOT NULL,
    next_seq INTEGER NOT NULL
) WITHOUT ROWID;

CREATE TABLE group_members (
    group_id BLOB NOT NULL REFERENCES groups (group_id),
    device_id BLOB NOT NULL REFERENCES devices (device_id),
    cursor INTEGER NOT NULL,
    PRIMARY KEY (group_id, device_id)
) WITHOUT ROWID;
CREATE INDEX group_members_by_device ON group_members (device_id);

CREATE TABLE group_log (
    group_id BLOB NOT NULL REFERENCES groups (group_id),
    seq INTEGER NOT NULL,
    epoch INTEGER NOT NULL,
    kind INTEGER NOT NULL,
    payload BLOB NOT NULL,
    created_hour INTEGER NOT NULL,
    PRIMARY KEY (group_id, seq)
);
CREATE INDEX group_log_by_hour ON group_log (created_hour);

CREATE TABLE inbox (
    device_id BLOB NOT NULL REFERENCES devices (device_id),
    seq INTEGER NOT NULL,
    payload BLOB NOT NULL,
    created_hour INTEGER NOT NULL,
    PRIMARY KEY (device_id, seq)
);
CREATE INDEX inbox_by_hour ON inbox (created_hour);
";

/// Version 2: disappearing messages and usernames.
const MIGRATION_2: &str = "
-- When a disappearing message's ciphertext is dropped, Unix seconds (rounded up to the minute).
ALTER TABLE group_log ADD COLUMN expires_at INTEGER;
CREATE INDEX group_log_by_expiry ON group_log (expires_at) WHERE expires_at IS NOT NULL;

-- Published usernames, known only by a hash the clients compute; see docs/PROTOCOL.md.
CREATE TABLE usernames (
    name_hash BLOB PRIMARY KEY NOT NULL,
    account_id BLOB NOT NULL UNIQUE
) WITHOUT ROWID;

-- When each account was last active (to the day), and how long it may stay inactive before
-- it is deleted with everything stored for it.
CREATE TABLE accounts (
    account_id BLOB PRIMARY KEY NOT NULL,
    lifetime_days INTEGER NOT NULL,
    active_day INTEGER NOT NULL
) WITHOUT ROWID;
INSERT OR IGNORE INTO accounts (account_id, lifetime_days, active_day)
    SELECT account_id, 365, max(created_hour - created_hour % 86400) FROM devices GROUP BY account_id;
";

/// Version 3: metadata of encrypted file blobs, whose bytes are files kept outside the database.
const MIGRATION_3: &str = "
-- `account_id` is the uploader's: the quota it counts against and the deletion that removes it.
-- `length` is how many bytes are durably stored; the upload is finished when it equals `size`.
CREATE TABLE blobs (
    blob_id BLOB PRIMARY KEY NOT NULL,
    account_id BLOB NOT NULL,
    uploader BLOB NOT NULL REFERENCES devices (device_id),
    group_id BLOB NOT NULL REFERENCES groups (group_id),
    size INTEGER NOT NULL,
    length INTEGER NOT NULL,
    created_hour INTEGER NOT NULL,
    expires_at INTEGER NOT NULL
) WITHOUT ROWID;
-- Covers the quota sum as well as deleting an account's blobs.
CREATE INDEX blobs_by_account ON blobs (account_id, size);
CREATE INDEX blobs_by_expiry ON blobs (expires_at);
CREATE INDEX blobs_by_group ON blobs (group_id);
CREATE INDEX blobs_unfinished_by_hour ON blobs (created_hour) WHERE length < size;
";

/// Version 4: a device removed from a group still reads the log up to the commit that removed
/// it (`until_seq`), so that it learns of its removal and gets what was sent before; the row
/// goes once it has acknowledged that far.
/// It also added the posting key of each group's current epoch, which checks that an
/// unattributed post comes from a member.
const MIGRATION_4: &str = "
ALTER TABLE group_members ADD COLUMN until_seq INTEGER;
ALTER TABLE groups ADD COLUMN posting_key BLOB;
-- How many more times an invite can be claimed (a group's invite link serves many).
ALTER TABLE invites ADD COLUMN uses_left INTEGER NOT NULL DEFAULT 1;
";

/// Version 5: the devices of one account. Each device's last active day (for listing them),
/// revoked devices, the linking mailboxes, and blobs that belong to an account rather than to
/// a group (`group_id` NULL). SQLite cannot drop a NOT NULL constraint, so `blobs` is built
/// anew; its uploader no longer references `devices`, since a revoked device's row goes while
/// its blobs stay with the account.
const MIGRATION_5: &str = "
-- The start of the day (Unix seconds) the device last registered or authenticated. Devices
-- from before knew only their account's, which is theirs while an account had one device.
ALTER TABLE devices ADD COLUMN active_day INTEGER NOT NULL DEFAULT 0;
UPDATE devices SET active_day = coalesce(
    (SELECT active_day FROM accounts WHERE accounts.account_id = devices.account_id),
    created_hour - created_hour % 86400);

-- Devices their account revoked: they never register or authenticate again. Kept until the
-- account is deleted.
CREATE TABLE revoked_devices (
    device_id BLOB PRIMARY KEY NOT NULL,
    account_id BLOB NOT NULL
) WITHOUT ROWID;
CREATE INDEX revoked_devices_by_account ON revoked_devices (account_id);

-- Sealed messages for a device being linked, known by a hash of the link secret; taken once.
CREATE TABLE link_mailboxes (
    mailbox BLOB PRIMARY KEY NOT NULL,
    payload BLOB NOT NULL,
    expires_at INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX link_mailboxes_by_expiry ON link_mailboxes (expires_at);

CREATE TABLE blobs_5 (
    blob_id BLOB PRIMARY KEY NOT NULL,
    account_id BLOB NOT NULL,
    uploader BLOB NOT NULL,
    group_id BLOB REFERENCES groups (group_id),
    size INTEGER NOT NULL,
    length INTEGER NOT NULL,
    created_hour INTEGER NOT NULL,
    expires_at INTEGER NOT NULL
) WITHOUT ROWID;
INSERT INTO blobs_5 (blob_id, account_id, uploader, group_id, size, length, created_hour,
    expires_at)
    SELECT blob_id, account_id, uploader, group_id, size, length, created_hour, expires_at
    FROM blobs;
DROP TABLE blobs;
ALTER TABLE blobs_5 RENAME TO blobs;
CREATE INDEX blobs_by_account ON blobs (account_id, size);
CREATE INDEX blobs_by_expiry ON blobs (expires_at);
CREATE INDEX blobs_by_group ON blobs (group_id);
CREATE INDEX blobs_unfinished_by_hour ON blobs (created_hour) WHERE length < size;
";

/// Version 6: account recovery and backups. The recovery bundle is sealed by the client and
/// opaque here; the verifier is the SHA-256 of the key `Recover` must present. An account's
/// backup blob is kept past its expiry while it is named here, which the reference makes
/// sure of: a blob row cannot go while a backup names it.
const MIGRATION_6: &str = "
-- Failed recovery attempts: how many in the window that ends at `window_ends_at` (Unix
-- seconds, on the hour). A table with row ids: a bundle may take a few KiB.
CREATE TABLE recovery (
    account_id BLOB PRIMARY KEY NOT NULL,
    verifier BLOB NOT NULL,
    bundle BLOB NOT NULL,
    failures INTEGER NOT NULL,
    window_ends_at INTEGER NOT NULL
);

-- `size` is the backup's plaintext length as the client gave it, handed back by `Recover`.
CREATE TABLE backups (
    account_id BLOB PRIMARY KEY NOT NULL,
    blob_id BLOB NOT NULL UNIQUE REFERENCES blobs (blob_id),
    size INTEGER NOT NULL
) WITHOUT ROWID;
";

/// Version 7: an account's backup is a chain of segments, a whole one then changes (at most
/// 64), each a blob kept past its expiry while it is in the chain. A backup named before
/// becomes a chain of one.
const MIGRATION_7: &str = "
CREATE TABLE backup_segments (
    account_id BLOB NOT NULL,
    -- 0 for the first segment, then 1, 2, ... without gaps.
    position INTEGER NOT NULL,
    blob_id BLOB NOT NULL UNIQUE REFERENCES blobs (blob_id),
    size INTEGER NOT NULL,
    PRIMARY KEY (account_id, position)
) WITHOUT ROWID;
INSERT INTO backup_segments (account_id, position, blob_id, size)
    SELECT account_id, 0, blob_id, size FROM backups;
DROP TABLE backups;
";

/// Version 8: a recovery bundle is found by its locator, derived from the recovery key, which
/// only the key's holder knows, rather than by the account id anyone may know. Bundles stored
/// before have none and can never be found: they are dropped (their accounts set recovery up
/// again).
const MIGRATION_8: &str = "
CREATE TABLE recovery_8 (
    account_id BLOB PRIMARY KEY NOT NULL,
    locator BLOB NOT NULL UNIQUE,
    verifier BLOB NOT NULL,
    bundle BLOB NOT NULL,
    failures INTEGER NOT NULL,
    window_ends_at INTEGER NOT NULL
);
DROP TABLE recovery;
ALTER TABLE recovery_8 RENAME TO recovery;
";

fn migrate(connection: &mut Connection) -> Result<(), StoreError> {
    // Immediate, so that two processes opening a new file do not both create the schema.
    let transaction = connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let version: i64 = transaction.pragma_query_value(None, "user_version", |row| row.get(0))?;
    match version {
        0..=7 => {
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
            transaction.execute_batch(MIGRATION_8)?;
            transaction.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        }
        SCHEMA_VERSION => {}
        newer if newer > SCHEMA_VERSION => {
            return Err(StoreError::Corrupt(
                "the database was written by a newer version of the server",
            ));
        }
        _ => {
            return Err(StoreError::Corrupt(
                "the database has an unknown schema version",
            ));
        }
    }
    transaction.commit()?;
    Ok(())
}

/// Deletes every row stored for an account and its devices.
fn delete_account_rows(db: &Connection, account_id: &[u8]) -> Result<(), StoreError> {
    let by_device = [
        "DELETE FROM key_packages WHERE device_id IN (SELECT device_id FROM devices WHERE account_id = ?1)",
        "DELETE FROM add_grants WHERE claimer IN (SELECT device_id FROM devices WHERE account_id = ?1) \
         OR target IN (SELECT device_id FROM devices WHERE account_id = ?1)",
        "DELETE FROM group_members WHERE device_id IN (SELECT device_id FROM devices WHERE account_id = ?1)",
        "DELETE FROM inbox WHERE device_id IN (SELECT device_id FROM devices WHERE account_id = ?1)",
        // Before the blobs, which it names.
        "DELETE FROM backup_segments WHERE account_id = ?1",
        "DELETE FROM blobs WHERE account_id = ?1",
        "DELETE FROM devices WHERE account_id = ?1",
        "DELETE FROM revoked_devices WHERE account_id = ?1",
        "DELETE FROM invites WHERE account_id = ?1",
        "DELETE FROM usernames WHERE account_id = ?1",
        "DELETE FROM recovery WHERE account_id = ?1",
        "DELETE FROM accounts WHERE account_id = ?1",
    ];
    for sql in by_device {
        db.prepare_cached(sql)?.execute([account_id])?;
    }
    Ok(())
}

/// Records that an account was active on the day of `now`, creating its record if needed.
fn touch_account_row(db: &Connection, account: &[u8], now: u64) -> Result<(), StoreError> {
    db.prepare_cached(
        "INSERT INTO accounts (account_id, lifetime_days, active_day) VALUES (?1, ?2, ?3) \
         ON CONFLICT (account_id) DO UPDATE SET active_day = excluded.active_day \
         WHERE active_day != excluded.active_day",
    )?
    .execute(params![
        account,
        super::DEFAULT_LIFETIME_DAYS,
        clamp_to_sql(coarse_day(now))
    ])?;
    Ok(())
}

/// A blob's record, expired or not.
fn blob_row(db: &Connection, blob_id: &BlobId) -> Result<Option<BlobRecord>, StoreError> {
    let row = db
        .prepare_cached(
            "SELECT account_id, uploader, group_id, size, length, expires_at FROM blobs \
             WHERE blob_id = ?1",
        )?
        .query_row([blob_id.as_slice()], |row| {
            Ok((
                row.get::<_, Vec<u8>>(0)?,
                row.get::<_, Vec<u8>>(1)?,
                row.get::<_, Option<Vec<u8>>>(2)?,
                row.get::<_, i64>(3)?,
                row.get::<_, i64>(4)?,
                row.get::<_, i64>(5)?,
            ))
        })
        .optional()?;
    let Some((account_id, uploader, group_id, size, length, expires_at)) = row else {
        return Ok(None);
    };
    Ok(Some(BlobRecord {
        blob_id: *blob_id,
        account_id: AccountId::from_bytes(&account_id)
            .map_err(|_| StoreError::Corrupt("a stored account id has the wrong length"))?,
        uploader: decode_device_id(&uploader)?,
        group_id: group_id.as_deref().map(decode_group_id).transpose()?,
        size: u64_from_sql(size)?,
        length: u64_from_sql(length)?,
        expires_at: u64_from_sql(expires_at)?,
    }))
}

/// True when the blob is a segment of an account's backup.
fn is_backup(db: &Connection, blob_id: &BlobId) -> Result<bool, StoreError> {
    Ok(db
        .prepare_cached("SELECT 1 FROM backup_segments WHERE blob_id = ?1")?
        .exists([blob_id.as_slice()])?)
}

/// The segments of an account's backup, first to last.
fn backup_chain(db: &Connection, account: &[u8]) -> Result<Vec<BackupSegment>, StoreError> {
    let rows = db
        .prepare_cached(
            "SELECT blob_id, size FROM backup_segments WHERE account_id = ?1 ORDER BY position",
        )?
        .query_map([account], |row| {
            Ok((row.get::<_, Vec<u8>>(0)?, row.get::<_, i64>(1)?))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    rows.into_iter()
        .map(|(blob_id, size)| {
            Ok(BackupSegment {
                blob_id: BlobId::try_from(blob_id)
                    .map_err(|_| StoreError::Corrupt("a stored blob id has the wrong length"))?,
                size: u64_from_sql(size)?,
            })
        })
        .collect()
}

/// The account of a registered device.
fn account_of(db: &Connection, device_id: &DeviceId) -> Result<Option<Vec<u8>>, StoreError> {
    Ok(db
        .prepare_cached("SELECT account_id FROM devices WHERE device_id = ?1")?
        .query_row([device_id.as_bytes().as_slice()], |row| row.get(0))
        .optional()?)
}

/// The account and certificate of a device making a request that needs them (a revocation,
/// a recovery bundle): `AuthenticationFailed` if it is no longer registered.
fn requester_of(db: &Connection, requester: &DeviceId) -> Result<(Vec<u8>, Vec<u8>), StoreError> {
    db.prepare_cached("SELECT account_id, certificate FROM devices WHERE device_id = ?1")?
        .query_row([requester.as_bytes().as_slice()], |row| {
            Ok((row.get::<_, Vec<u8>>(0)?, row.get::<_, Vec<u8>>(1)?))
        })
        .optional()?
        .ok_or(StoreError::AuthenticationFailed)
}

/// `Forbidden` if `remove` names a registered device of `committer_account`: only a
/// revocation, signed by the identity key, ends the memberships of an account's own devices,
/// so that a stolen linked device cannot cut the others off. A revoked device is registered no
/// longer, and may be named.
fn check_own_removals(
    db: &Connection,
    committer_account: &[u8],
    remove: &[DeviceId],
) -> Result<(), StoreError> {
    for device in remove {
        if account_of(db, device)?.is_some_and(|account| account == committer_account) {
            return Err(StoreError::Forbidden);
        }
    }
    Ok(())
}

/// The right of `adder` (of `adder_account`) to add `device` to a group: a device of the same
/// account needs nothing more than to be registered; any other needs an unexpired grant from
/// a claim, which this consumes. `Forbidden` otherwise.
fn consume_grant(
    db: &Connection,
    adder: &DeviceId,
    adder_account: &[u8],
    device: &DeviceId,
    now: u64,
) -> Result<(), StoreError> {
    match account_of(db, device)? {
        None => return Err(StoreError::Forbidden),
        Some(account) if account == adder_account => return Ok(()),
        Some(_) => {}
    }
    let consumed = db
        .prepare_cached(
            "DELETE FROM add_grants WHERE claimer = ?1 AND target = ?2 AND expires_at > ?3",
        )?
        .execute(params![
            adder.as_bytes().as_slice(),
            device.as_bytes().as_slice(),
            clamp_to_sql(now),
        ])?;
    if consumed == 0 {
        return Err(StoreError::Forbidden);
    }
    Ok(())
}

/// Deletes a group's entries that every member and every removed device still reading has.
fn drop_acknowledged(db: &Connection, group_key: &[u8]) -> Result<(), StoreError> {
    db.prepare_cached(
        "DELETE FROM group_log WHERE group_id = ?1 AND seq <= \
         (SELECT min(cursor) FROM group_members WHERE group_id = ?1)",
    )?
    .execute([group_key])?;
    Ok(())
}

/// Takes one key package of every device of `account_id` but `except` for `claimer`, and
/// grants `claimer` the right to add each of those devices to one group.
fn claim_account(
    db: &Connection,
    account_id: &[u8],
    claimer: &DeviceId,
    now: u64,
    except: Option<&DeviceId>,
) -> Result<Vec<ClaimedKeyPackage>, StoreError> {
    if !device_exists(db, claimer)? {
        return Err(StoreError::Forbidden);
    }
    let devices = db
        .prepare_cached(
            "SELECT device_id, certificate FROM devices WHERE account_id = ?1 \
             ORDER BY device_id",
        )?
        .query_map([account_id], |row| {
            Ok((row.get::<_, Vec<u8>>(0)?, row.get::<_, Vec<u8>>(1)?))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    let grant_expires_at = clamp_to_sql(coarse_hour(now).saturating_add(GRANT_LIFETIME));
    let mut claimed = Vec::with_capacity(devices.len());
    for (device_id, certificate) in devices {
        if except.is_some_and(|except| except.as_bytes().as_slice() == device_id.as_slice()) {
            continue;
        }
        let Some(key_package) = take_key_package(db, &device_id)? else {
            continue;
        };
        db.prepare_cached(
            "INSERT INTO add_grants (claimer, target, expires_at) VALUES (?1, ?2, ?3) \
             ON CONFLICT (claimer, target) DO UPDATE SET expires_at = excluded.expires_at",
        )?
        .execute(params![
            claimer.as_bytes().as_slice(),
            device_id,
            grant_expires_at
        ])?;
        claimed.push(ClaimedKeyPackage {
            device_id: decode_device_id(&device_id)?,
            certificate,
            key_package,
        });
    }
    Ok(claimed)
}

/// Appends one entry to a group log at the group's current epoch (compare-and-set) and returns
/// its sequence number; a commit moves the group to the next epoch.
#[allow(clippy::too_many_arguments)] // One per column of the entry.
fn append_entry(
    db: &Connection,
    group_id: &GroupId,
    poster: &DeviceId,
    epoch: Epoch,
    kind: EntryKind,
    payload: &[u8],
    expires_at: Option<u64>,
    now: u64,
) -> Result<u64, StoreError> {
    let group_key = group_id.as_bytes();
    let (current, _) = group_epoch_and_key(db, group_key)?;
    if !is_member(db, group_key, poster)? {
        return Err(StoreError::Forbidden);
    }
    if epoch != current {
        return Err(StoreError::EpochMismatch { current });
    }
    let seq = insert_entry(db, group_key, current, kind, payload, expires_at, now)?;
    if kind == EntryKind::Commit {
        // A commit that names no key for its epoch leaves none: the old one is stale.
        set_posting_key(db, group_key, None)?;
    }
    Ok(seq)
}

/// The group's current epoch and its posting key. `NotFound` if there is no such group.
fn group_epoch_and_key(
    db: &Connection,
    group_key: &[u8],
) -> Result<(Epoch, Option<[u8; 32]>), StoreError> {
    let (epoch, key) = db
        .prepare_cached("SELECT epoch, posting_key FROM groups WHERE group_id = ?1")?
        .query_row([group_key], |row| {
            Ok((row.get::<_, i64>(0)?, row.get::<_, Option<Vec<u8>>>(1)?))
        })
        .optional()?
        .ok_or(StoreError::NotFound)?;
    let key = match key {
        Some(bytes) => Some(
            <[u8; 32]>::try_from(bytes.as_slice())
                .map_err(|_| StoreError::Corrupt("a posting key is not 32 bytes"))?,
        ),
        None => None,
    };
    Ok((epoch_from_sql(epoch), key))
}

fn set_posting_key(
    db: &Connection,
    group_key: &[u8],
    posting_key: Option<[u8; 32]>,
) -> Result<(), StoreError> {
    db.prepare_cached("UPDATE groups SET posting_key = ?2 WHERE group_id = ?1")?
        .execute(params![group_key, posting_key.map(|key| key.to_vec())])?;
    Ok(())
}

/// Stores an entry at the group's next sequence number; a commit moves the group from
/// `current` to the next epoch. The caller has checked the poster and the epoch.
fn insert_entry(
    db: &Connection,
    group_key: &[u8],
    current: Epoch,
    kind: EntryKind,
    payload: &[u8],
    expires_at: Option<u64>,
    now: u64,
) -> Result<u64, StoreError> {
    let seq: i64 = db
        .prepare_cached("SELECT next_seq FROM groups WHERE group_id = ?1")?
        .query_row([group_key], |row| row.get(0))?;
    let next_seq = seq.checked_add(1).ok_or(StoreError::Corrupt(
        "a group's sequence number is exhausted",
    ))?;
    let next_epoch = match kind {
        EntryKind::Application => current,
        EntryKind::Commit => Epoch(
            current
                .0
                .checked_add(1)
                .ok_or(StoreError::Invalid("the epoch cannot advance further"))?,
        ),
    };
    db.prepare_cached(
        "INSERT INTO group_log (group_id, seq, epoch, kind, payload, created_hour, \
         expires_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?
    .execute(params![
        group_key,
        seq,
        epoch_to_sql(current),
        kind_to_sql(kind),
        payload,
        clamp_to_sql(coarse_hour(now)),
        expires_at.map(clamp_to_sql),
    ])?;
    db.prepare_cached("UPDATE groups SET epoch = ?2, next_seq = ?3 WHERE group_id = ?1")?
        .execute(params![group_key, epoch_to_sql(next_epoch), next_seq])?;
    seq_from_sql(seq)
}

fn members_of(db: &Connection, group_key: &[u8]) -> Result<Vec<DeviceId>, StoreError> {
    db.prepare_cached(
        "SELECT device_id FROM group_members WHERE group_id = ?1 AND until_seq IS NULL \
         ORDER BY device_id",
    )?
    .query_map([group_key], |row| row.get::<_, Vec<u8>>(0))?
    .map(|device_id| decode_device_id(&device_id?))
    .collect()
}

fn device_exists(db: &Connection, device_id: &DeviceId) -> Result<bool, StoreError> {
    Ok(db
        .prepare_cached("SELECT 1 FROM devices WHERE device_id = ?1")?
        .exists([device_id.as_bytes().as_slice()])?)
}

fn is_member(db: &Connection, group_id: &[u8], device_id: &DeviceId) -> Result<bool, StoreError> {
    Ok(db
        .prepare_cached(
            "SELECT 1 FROM group_members WHERE group_id = ?1 AND device_id = ?2 \
             AND until_seq IS NULL",
        )?
        .exists(params![group_id, device_id.as_bytes().as_slice()])?)
}

fn insert_key_packages(
    db: &Connection,
    device_id: &DeviceId,
    key_packages: &[Vec<u8>],
) -> Result<(), StoreError> {
    let mut insert = db.prepare_cached(
        "INSERT INTO key_packages (device_id, key_package, last_resort) VALUES (?1, ?2, 0)",
    )?;
    for key_package in key_packages {
        insert.execute(params![device_id.as_bytes().as_slice(), key_package])?;
    }
    Ok(())
}

fn replace_last_resort(
    db: &Connection,
    device_id: &DeviceId,
    key_package: &[u8],
) -> Result<(), StoreError> {
    let device_id = device_id.as_bytes().as_slice();
    db.prepare_cached("DELETE FROM key_packages WHERE device_id = ?1 AND last_resort = 1")?
        .execute([device_id])?;
    db.prepare_cached(
        "INSERT INTO key_packages (device_id, key_package, last_resort) VALUES (?1, ?2, 1)",
    )?
    .execute(params![device_id, key_package])?;
    Ok(())
}

fn count_key_packages(db: &Connection, device_id: &DeviceId) -> Result<u32, StoreError> {
    let count: i64 = db
        .prepare_cached(
            "SELECT count(*) FROM key_packages WHERE device_id = ?1 AND last_resort = 0",
        )?
        .query_row([device_id.as_bytes().as_slice()], |row| row.get(0))?;
    Ok(u32::try_from(count).unwrap_or(u32::MAX))
}

/// The oldest one-time key package, which is deleted, or else the last-resort one, which stays.
fn take_key_package(db: &Connection, device_id: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
    let found = db
        .prepare_cached(
            "SELECT id, key_package, last_resort FROM key_packages WHERE device_id = ?1 \
             ORDER BY last_resort, id LIMIT 1",
        )?
        .query_row([device_id], |row| {
            Ok((
                row.get::<_, i64>(0)?,
                row.get::<_, Vec<u8>>(1)?,
                row.get::<_, bool>(2)?,
            ))
        })
        .optional()?;
    let Some((id, key_package, last_resort)) = found else {
        return Ok(None);
    };
    if !last_resort {
        db.prepare_cached("DELETE FROM key_packages WHERE id = ?1")?
            .execute([id])?;
    }
    Ok(Some(key_package))
}

fn push_to_inbox(
    db: &Connection,
    device_id: &DeviceId,
    payload: &[u8],
    now: u64,
) -> Result<(), StoreError> {
    let device_id = device_id.as_bytes().as_slice();
    let seq: i64 = db
        .prepare_cached(
            "UPDATE devices SET inbox_next_seq = inbox_next_seq + 1 WHERE device_id = ?1 \
             RETURNING inbox_next_seq - 1",
        )?
        .query_row([device_id], |row| row.get(0))
        .optional()?
        .ok_or(StoreError::NotFound)?;
    db.prepare_cached(
        "INSERT INTO inbox (device_id, seq, payload, created_hour) VALUES (?1, ?2, ?3, ?4)",
    )?
    .execute(params![
        device_id,
        seq,
        payload,
        clamp_to_sql(coarse_hour(now))
    ])?;
    Ok(())
}

/// Times, sequence numbers and limits beyond SQLite's signed integers are clamped, which keeps
/// their meaning: "never", "everything".
fn clamp_to_sql(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn u64_from_sql(value: i64) -> Result<u64, StoreError> {
    u64::try_from(value).map_err(|_| StoreError::Corrupt("a stored size or time is negative"))
}

fn seq_from_sql(value: i64) -> Result<u64, StoreError> {
    u64::try_from(value).map_err(|_| StoreError::Corrupt("a stored sequence number is negative"))
}

/// Epochs come from clients and may use all 64 bits, and are only ever compared for equality,
/// so they are stored bit for bit.
fn epoch_to_sql(epoch: Epoch) -> i64 {
    epoch.0.cast_signed()
}

fn epoch_from_sql(value: i64) -> Epoch {
    Epoch(value.cast_unsigned())
}

fn kind_to_sql(kind: EntryKind) -> i64 {
    match kind {
        EntryKind::Application => 0,
        EntryKind::Commit => 1,
    }
}

fn kind_from_sql(value: i64) -> Result<EntryKind, StoreError> {
    match value {
        0 => Ok(EntryKind::Application),
        1 => Ok(EntryKind::Commit),
        _ => Err(StoreError::Corrupt(
            "a stored log entry has an unknown kind",
        )),
    }
}

fn decode_device_id(bytes: &[u8]) -> Result<DeviceId, StoreError> {
    DeviceId::from_bytes(bytes)
        .map_err(|_| StoreError::Corrupt("a stored device id has the wrong length"))
}

fn decode_group_id(bytes: &[u8]) -> Result<GroupId, StoreError> {
    GroupId::from_bytes(bytes)
        .map_err(|_| StoreError::Corrupt("a stored group id has the wrong length"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_699_999_200;

    fn new_device(number: u8) -> NewDevice {
        NewDevice {
            device_id: DeviceId::from_device_key(&[number; 32]),
            account_id: AccountId::from_identity_key(&[number; 32]),
            device_key: [number; 32],
            certificate: vec![b'c', number],
            key_packages: vec![vec![b'k', number]],
            last_resort_key_package: None,
            now: NOW,
        }
    }

    /// A device of the account of identity key `seed`, whose certificate names that key (its
    /// signature left blank: the store trusts certificates checked at registration), and the
    /// identity key's signature setting recovery with `verifier` at `locator`.
    fn owner(seed: u8, verifier: [u8; 32], locator: [u8; 32]) -> (NewDevice, NewRecovery) {
        use ed25519_dalek::Signer;
        let identity = ed25519_dalek::SigningKey::from_bytes(&[seed; 32]);
        let identity_key = identity.verifying_key().to_bytes();
        let device = NewDevice {
            device_id: DeviceId::from_device_key(&[seed; 32]),
            account_id: AccountId::from_identity_key(&identity_key),
            certificate: [identity_key.as_slice(), &[seed; 32], &[0; 64]].concat(),
            ..new_device(seed)
        };
        let bundle = b"sealed".to_vec();
        let signature = identity
            .sign(&miyu_proto::cert::recovery_payload(
                &verifier, &locator, &bundle,
            ))
            .to_bytes()
            .to_vec();
        let recovery = NewRecovery {
            verifier,
            locator,
            bundle,
            signature,
        };
        (device, recovery)
    }

    /// Device 1 alone in group 1.
    fn group_alone(store: &mut SqliteStore) -> Result<(DeviceId, GroupId), StoreError> {
        let device = new_device(1);
        let device_id = device.device_id;
        store.register_device(device)?;
        let group_id = GroupId::from_bytes(&[1; 16]).expect("16 bytes make a group id");
        store.create_group(NewGroup {
            group_id: group_id.clone(),
            epoch: Epoch(0),
            creator: device_id,
            members: Vec::new(),
            welcomes: Vec::new(),
            welcome: None,
            posting_key: None,
            now: NOW,
        })?;
        Ok((device_id, group_id))
    }

    fn files_contain(folder: &Path, needle: &[u8]) -> std::io::Result<bool> {
        for file in std::fs::read_dir(folder)? {
            let bytes = std::fs::read(file?.path())?;
            if bytes.windows(needle.len()).any(|window| window == needle) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    #[test]
    fn a_committed_batch_survives_closing_and_reopening() -> Result<(), StoreError> {
        let folder = tempfile::tempdir().expect("a temporary folder");
        let path = folder.path().join("miyu.sqlite");
        let mut store = SqliteStore::open(&path)?;
        let (device_id, group_id) = group_alone(&mut store)?;
        store.append(
            &group_id,
            &device_id,
            Epoch(0),
            EntryKind::Commit,
            b"c".to_vec(),
            None,
            NOW,
        )?;
        assert!(matches!(
            store.register_device(new_device(1)),
            Err(StoreError::AlreadyExists)
        ));
        store.commit()?;
        drop(store);

        let mut store = SqliteStore::open(&path)?;
        assert_eq!(
            store.device(&device_id)?.map(|record| record.device_key),
            Some([1; 32])
        );
        assert_eq!(store.key_package_count(&device_id)?, 1);
        let entries = store.group_entries(&group_id, &device_id, 0, 10, NOW)?;
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].kind, EntryKind::Commit);
        let next = store.append(
            &group_id,
            &device_id,
            Epoch(1),
            EntryKind::Application,
            Vec::new(),
            None,
            NOW,
        )?;
        assert_eq!(next.seq, 2);
        Ok(())
    }

    #[test]
    fn an_uncommitted_batch_is_gone_after_reopening() -> Result<(), StoreError> {
        let folder = tempfile::tempdir().expect("a temporary folder");
        let path = folder.path().join("miyu.sqlite");
        let mut store = SqliteStore::open(&path)?;
        store.register_device(new_device(1))?;
        store.commit()?;
        store.register_device(new_device(2))?;
        drop(store);

        let mut store = SqliteStore::open(&path)?;
        assert!(store.device(&new_device(1).device_id)?.is_some());
        assert!(store.device(&new_device(2).device_id)?.is_none());
        Ok(())
    }

    #[test]
    fn the_database_is_durable_on_every_commit() -> Result<(), StoreError> {
        let folder = tempfile::tempdir().expect("a temporary folder");
        let store = SqliteStore::open(&folder.path().join("miyu.sqlite"))?;
        let journal_mode: String =
            store
                .connection
                .pragma_query_value(None, "journal_mode", |row| row.get(0))?;
        assert_eq!(journal_mode, "wal");
        let synchronous: i64 = store
            .connection
            .pragma_query_value(None, "synchronous", |row| row.get(0))?;
        assert_eq!(synchronous, 2, "FULL");
        let foreign_keys: bool =
            store
                .connection
                .pragma_query_value(None, "foreign_keys", |row| row.get(0))?;
        assert!(foreign_keys);
        Ok(())
    }

    #[test]
    fn a_payload_is_stored_as_given_and_overwritten_once_deleted() -> Result<(), StoreError> {
        let marker = b"miyu-opaque-marker-5b0c1e";
        let folder = tempfile::tempdir().expect("a temporary folder");
        let path = folder.path().join("miyu.sqlite");
        let mut store = SqliteStore::open(&path)?;
        let (device_id, group_id) = group_alone(&mut store)?;
        store.append(
            &group_id,
            &device_id,
            Epoch(0),
            EntryKind::Application,
            marker.to_vec(),
            None,
            NOW,
        )?;
        store.commit()?;
        drop(store);
        assert!(files_contain(folder.path(), marker).expect("readable files"));

        let mut store = SqliteStore::open(&path)?;
        store.ack_group(&device_id, &group_id, 1)?;
        store.commit()?;
        drop(store);
        assert!(!files_contain(folder.path(), marker).expect("readable files"));
        Ok(())
    }

    #[test]
    fn a_batch_that_sqlite_rolled_back_by_itself_fails_to_commit() -> Result<(), StoreError> {
        let mut store = SqliteStore::open_in_memory()?;
        store.register_device(new_device(1))?;
        // What SQLite does on a full disk or an I/O error in the middle of a statement.
        let failed = store.write(|db| -> Result<(), StoreError> {
            db.execute_batch("ROLLBACK")?;
            Err(StoreError::Invalid("disk full"))
        });
        assert!(failed.is_err());
        store.register_device(new_device(2))?;
        assert!(matches!(store.commit(), Err(StoreError::CommitFailed(_))));
        assert!(store.device(&new_device(1).device_id)?.is_none());
        assert!(store.device(&new_device(2).device_id)?.is_none());

        store.register_device(new_device(3))?;
        store.commit()?;
        assert!(store.device(&new_device(3).device_id)?.is_some());
        Ok(())
    }

    #[test]
    fn a_database_from_a_newer_version_is_refused() -> Result<(), StoreError> {
        let folder = tempfile::tempdir().expect("a temporary folder");
        let path = folder.path().join("miyu.sqlite");
        drop(SqliteStore::open(&path)?);
        Connection::open(&path)?.pragma_update(None, "user_version", SCHEMA_VERSION + 1)?;
        assert!(matches!(
            SqliteStore::open(&path),
            Err(StoreError::Corrupt(_))
        ));
        Ok(())
    }

    #[test]
    fn a_database_of_versions_1_to_7_is_upgraded_in_place_and_keeps_its_data()
    -> Result<(), StoreError> {
        use sha2::{Digest, Sha256};
        const DAY: u64 = 86_400;
        let account_active_day = NOW - NOW % DAY + 2 * DAY;
        for old_version in [1, 2, 3, 4, 5, 6, 7] {
            let folder = tempfile::tempdir().expect("a temporary folder");
            let path = folder.path().join("miyu.sqlite");
            let device_id = new_device(1).device_id;
            let account_id = new_device(1).account_id;
            {
                let connection = Connection::open(&path)?;
                connection.execute_batch(SCHEMA)?;
                for (version, migration) in [
                    (2, MIGRATION_2),
                    (3, MIGRATION_3),
                    (4, MIGRATION_4),
                    (5, MIGRATION_5),
                    (6, MIGRATION_6),
                    (7, MIGRATION_7),
                ] {
                    if old_version >= version {
                        connection.execute_batch(migration)?;
                    }
                }
                connection.pragma_update(None, "user_version", old_version)?;
                connection.execute(
                    "INSERT INTO devices (device_id, account_id, device_key, certificate, \
                     created_hour) VALUES (?1, ?2, ?3, ?4, ?5)",
                    params![
                        device_id.as_bytes().as_slice(),
                        account_id.as_bytes().as_slice(),
                        [1u8; 32].as_slice(),
                        b"certificate".as_slice(),
                        clamp_to_sql(NOW),
                    ],
                )?;
                if old_version >= 2 {
                    connection.execute(
                        "INSERT INTO accounts (account_id, lifetime_days, active_day) \
                         VALUES (?1, 365, ?2)",
                        params![
                            account_id.as_bytes().as_slice(),
                            clamp_to_sql(account_active_day)
                        ],
                    )?;
                }
                if old_version >= 3 {
                    // A blob of a group, from when every blob had one.
                    connection.execute(
                        "INSERT INTO groups (group_id, epoch, next_seq) VALUES (?1, 0, 1)",
                        [[2u8; 16].as_slice()],
                    )?;
                    connection.execute(
                        "INSERT INTO blobs (blob_id, account_id, uploader, group_id, size, \
                         length, created_hour, expires_at) VALUES (?1, ?2, ?3, ?4, 10, 10, ?5, ?6)",
                        params![
                            [2u8; 32].as_slice(),
                            account_id.as_bytes().as_slice(),
                            device_id.as_bytes().as_slice(),
                            [2u8; 16].as_slice(),
                            clamp_to_sql(NOW),
                            clamp_to_sql(NOW + 3600),
                        ],
                    )?;
                }
                if old_version >= 5 {
                    // Version 5 kept the device's own active day; a finished blob of the
                    // account, which version 5 introduced; a linking mailbox.
                    connection.execute(
                        "UPDATE devices SET active_day = ?1",
                        [clamp_to_sql(account_active_day)],
                    )?;
                    connection.execute(
                        "INSERT INTO blobs (blob_id, account_id, uploader, group_id, size, \
                         length, created_hour, expires_at) VALUES (?1, ?2, ?3, NULL, 10, 10, \
                         ?4, ?5)",
                        params![
                            [4u8; 32].as_slice(),
                            account_id.as_bytes().as_slice(),
                            device_id.as_bytes().as_slice(),
                            clamp_to_sql(NOW),
                            clamp_to_sql(NOW + 3600),
                        ],
                    )?;
                    connection.execute(
                        "INSERT INTO link_mailboxes (mailbox, payload, expires_at) \
                         VALUES (?1, x'01', ?2)",
                        params![[6u8; 32].as_slice(), clamp_to_sql(NOW + 600)],
                    )?;
                }
                if old_version >= 6 {
                    // A recovery bundle without a locator, and one blob as the account's
                    // backup: version 6 named it, version 7 made it a chain of one.
                    connection.execute(
                        "INSERT INTO recovery (account_id, verifier, bundle, failures, \
                         window_ends_at) VALUES (?1, ?2, x'02', 0, 0)",
                        params![
                            account_id.as_bytes().as_slice(),
                            Sha256::digest([1u8; 32]).as_slice()
                        ],
                    )?;
                    let backup = if old_version == 6 {
                        "INSERT INTO backups (account_id, blob_id, size) VALUES (?1, ?2, 7)"
                    } else {
                        "INSERT INTO backup_segments (account_id, position, blob_id, size) \
                         VALUES (?1, 0, ?2, 7)"
                    };
                    connection.execute(
                        backup,
                        params![account_id.as_bytes().as_slice(), [4u8; 32].as_slice()],
                    )?;
                }
            }
            let mut store = SqliteStore::open(&path)?;
            assert!(store.device(&device_id)?.is_some());
            if old_version >= 5 {
                assert_eq!(store.take_link(&[6; 32], NOW)?, [1]);
                assert_eq!(store.blob(&[4; 32], &device_id, NOW)?.length, 10);
            }
            if old_version >= 6 {
                // The backup is a segment: served past its expiry.
                assert_eq!(store.blob(&[4; 32], &device_id, NOW + 7200)?.length, 10);
            }
            // The device's last active day is its account's, which version 1 did not keep.
            let listed = store.account_devices(&device_id)?;
            assert_eq!(listed.len(), 1);
            assert_eq!(listed[0].created_day, NOW / DAY);
            let active = if old_version >= 2 {
                account_active_day
            } else {
                NOW
            };
            assert_eq!(
                listed[0].active_day,
                active / DAY,
                "from version {old_version}"
            );
            store.set_username(&account_id, Some([7; 32]))?;
            let group_id = GroupId::from_bytes(&[1; 16]).expect("16 bytes make a group id");
            store.create_group(NewGroup {
                group_id: group_id.clone(),
                epoch: Epoch(0),
                creator: device_id,
                members: Vec::new(),
                welcomes: Vec::new(),
                welcome: None,
                posting_key: None,
                now: NOW,
            })?;
            let blob = |number: u8, group_id: Option<GroupId>| NewBlob {
                blob_id: [number; 32],
                uploader: device_id,
                group_id,
                size: 10,
                expires_at: NOW + 3600,
                max_blobs: 10,
                now: NOW,
            };
            store.create_blob(blob(1, Some(group_id)), 40)?;
            // A blob of the account, which has no group.
            store.create_blob(blob(3, None), 40)?;
            store.put_link([5; 32], b"sealed".to_vec(), NOW + 600, NOW)?;
            let (owner_device, owner_recovery) = owner(9, [8; 32], [10; 32]);
            store.register_device(owner_device)?;
            store.set_recovery(&DeviceId::from_device_key(&[9; 32]), owner_recovery)?;
            store.set_blob_length(&[3; 32], &device_id, 10)?;
            let segment = BackupSegment {
                blob_id: [3; 32],
                size: 5,
            };
            // The one named before, if any, is replaced.
            let replaced = store.set_backup(&account_id, segment, None, NOW)?;
            assert_eq!(replaced.len(), usize::from(old_version >= 6));
            store.commit()?;
            drop(store);
            let connection = Connection::open(&path)?;
            let version: i64 = connection.query_row("PRAGMA user_version", [], |row| row.get(0))?;
            assert_eq!(version, SCHEMA_VERSION);
            let dangling: i64 = connection.query_row(
                "SELECT count(*) FROM pragma_foreign_key_check",
                [],
                |row| row.get(0),
            )?;
            assert_eq!(dangling, 0);
            // A bundle without a locator could never be found again: it went.
            let bundles: i64 =
                connection.query_row("SELECT count(*) FROM recovery", [], |row| row.get(0))?;
            assert_eq!(bundles, 1);
            let mut store = SqliteStore::open(&path)?;
            let mut live = vec![[1; 32], [3; 32]];
            if old_version >= 3 {
                live.insert(1, [2; 32]);
                let old = store.blob(&[2; 32], &device_id, NOW)?;
                assert_eq!(old.group_id, GroupId::from_bytes(&[2; 16]).ok());
                assert_eq!(old.length, 10);
            }
            if old_version == 5 {
                live.push([4; 32]);
            }
            assert_eq!(store.live_blob_ids()?, live);
            assert_eq!(store.blob(&[3; 32], &device_id, NOW)?.group_id, None);
            // The new tables work: a bundle is found by its locator and a wrong key counts,
            // and the backup outlives its expiry.
            assert_eq!(store.recover(&[10; 32], &[1; 32], NOW)?, Recovery::WrongKey);
            store.expire(NOW + 7200, 0)?;
            store.commit()?;
            assert_eq!(store.live_blob_ids()?, [[3; 32]]);
        }
        Ok(())
    }

    #[test]
    fn failed_recovery_attempts_survive_closing_and_reopening() -> Result<(), StoreError> {
        use sha2::{Digest, Sha256};
        let folder = tempfile::tempdir().expect("a temporary folder");
        let path = folder.path().join("miyu.sqlite");
        let verifier: [u8; 32] = Sha256::digest([1u8; 32]).into();
        let (device, recovery) = owner(1, verifier, [10; 32]);
        let requester = device.device_id;
        let mut store = SqliteStore::open(&path)?;
        store.register_device(device)?;
        store.set_recovery(&requester, recovery)?;
        for _ in 0..5 {
            assert_eq!(store.recover(&[10; 32], &[9; 32], NOW)?, Recovery::WrongKey);
            store.commit()?;
            drop(store);
            store = SqliteStore::open(&path)?;
        }
        assert_eq!(store.recover(&[10; 32], &[1; 32], NOW)?, Recovery::Locked);
        Ok(())
    }

    #[test]
    fn corrupt_rows_are_reported_not_panicked_on() -> Result<(), StoreError> {
        let mut store = SqliteStore::open_in_memory()?;
        let (device_id, group_id) = group_alone(&mut store)?;
        store.append(
            &group_id,
            &device_id,
            Epoch(0),
            EntryKind::Application,
            Vec::new(),
            None,
            NOW,
        )?;
        store.commit()?;
        store.connection.execute_batch(
            "UPDATE devices SET device_key = x'0102'; UPDATE group_log SET kind = 7;",
        )?;
        assert!(matches!(
            store.device(&device_id),
            Err(StoreError::Corrupt(_))
        ));
        assert!(matches!(
            store.group_entries(&group_id, &device_id, 0, 10, NOW),
            Err(StoreError::Corrupt(_))
        ));
        store
            .connection
            .execute_batch("UPDATE groups SET next_seq = 9223372036854775807")?;
        assert!(matches!(
            store.append(
                &group_id,
                &device_id,
                Epoch(0),
                EntryKind::Application,
                Vec::new(),
                None,
                NOW
            ),
            Err(StoreError::Corrupt(_))
        ));
        Ok(())
    }
}
