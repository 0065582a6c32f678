//! The in-memory backend, for tests and for benchmarks of everything but the disk.
//!
//! Every operation checks all it needs before it changes anything, which is how it keeps the
//! promise that a failed operation leaves no trace.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::ops::Bound;

use miyu_proto::{AccountId, DeviceId, Epoch, GroupId};

use super::{
    Appended, BackupSegment, BlobId, BlobRecord, ClaimedKeyPackage, Committed, DeviceRecord,
    DeviceSummary, EntryKind, GroupCreated, InboxEntry, LogEntry, Membership, NewBlob, NewCommit,
    NewDevice, NewGroup, NewRecovery, Recovery, RecoveryBundle, RecoveryDecision, RecoveryFailures,
    Store, StoreError, UNFINISHED_BLOB_LIFETIME, check_blob_length, coarse_day, coarse_hour,
    day_number,
};

/// A [`Store`] that keeps everything in memory; nothing survives the value.
#[derive(Default)]
pub struct MemoryStore {
    devices: BTreeMap<DeviceId, Device>,
    invites: HashMap<[u8; 32], Invite>,
    /// Expiry of the right of `.0` to add `.1` to a group.
    grants: BTreeMap<(DeviceId, DeviceId), u64>,
    groups: BTreeMap<GroupId, Group>,
    usernames: HashMap<[u8; 32], AccountId>,
    /// Each account's lifetime in days and the day it was last active.
    accounts: HashMap<AccountId, (u32, u64)>,
    blobs: BTreeMap<BlobId, StoredBlob>,
    /// Devices their account revoked, with that account.
    revoked: HashMap<DeviceId, AccountId>,
    /// Linking mailboxes: the sealed message and when it expires.
    links: HashMap<[u8; 32], (Vec<u8>, u64)>,
    recoveries: HashMap<AccountId, StoredRecovery>,
    /// Each account's backup, first segment first.
    backups: HashMap<AccountId, Vec<BackupSegment>>,
}

impl Store for MemoryStore {
    fn commit(&mut self) -> Result<(), StoreError> {
        Ok(())
    }

    fn register_device(&mut self, device: NewDevice) -> Result<(), StoreError> {
        if self.revoked.contains_key(&device.device_id) {
            return Err(StoreError::AuthenticationFailed);
        }
        if self.devices.contains_key(&device.device_id) {
            return Err(StoreError::AlreadyExists);
        }
        self.devices.insert(
            device.device_id,
            Device {
                record: DeviceRecord {
                    device_id: device.device_id,
                    account_id: device.account_id,
                    device_key: device.device_key,
                    certificate: device.certificate,
                },
                key_packages: device.key_packages.into(),
                last_resort: device.last_resort_key_package,
                inbox: BTreeMap::new(),
                inbox_next_seq: 1,
                created_hour: coarse_hour(device.now),
                active_day: coarse_day(device.now),
            },
        );
        Ok(())
    }

    fn device(&mut self, device_id: &DeviceId) -> Result<Option<DeviceRecord>, StoreError> {
        Ok(self
            .devices
            .get(device_id)
            .map(|device| device.record.clone()))
    }

    fn add_key_packages(
        &mut self,
        device_id: &DeviceId,
        key_packages: Vec<Vec<u8>>,
        last_resort: Option<Vec<u8>>,
    ) -> Result<u32, StoreError> {
        let device = self
            .devices
            .get_mut(device_id)
            .ok_or(StoreError::NotFound)?;
        device.key_packages.extend(key_packages);
        if last_resort.is_some() {
            device.last_resort = last_resort;
        }
        Ok(device.one_time_count())
    }

    fn key_package_count(&mut self, device_id: &DeviceId) -> Result<u32, StoreError> {
        self.devices
            .get(device_id)
            .map(Device::one_time_count)
            .ok_or(StoreError::NotFound)
    }

    fn create_invite(
        &mut self,
        account_id: &AccountId,
        token_hash: [u8; 32],
        expires_at: u64,
        uses: u32,
    ) -> Result<(), StoreError> {
        if self.invites.contains_key(&token_hash) {
            return Err(StoreError::AlreadyExists);
        }
        self.invites.insert(
            token_hash,
            Invite {
                account_id: *account_id,
                expires_at,
                uses_left: uses.max(1),
            },
        );
        Ok(())
    }

    fn claim_invite(
        &mut self,
        token_hash: &[u8; 32],
        claimer: &DeviceId,
        now: u64,
    ) -> Result<Vec<ClaimedKeyPackage>, StoreError> {
        let invite = self.invites.get(token_hash).ok_or(StoreError::NotFound)?;
        if invite.expires_at <= now {
            return Err(StoreError::NotFound);
        }
        if !self.devices.contains_key(claimer) {
            return Err(StoreError::Forbidden);
        }
        let account_id = invite.account_id;
        if let Some(invite) = self.invites.get_mut(token_hash) {
            invite.uses_left -= 1;
            if invite.uses_left == 0 {
                self.invites.remove(token_hash);
            }
        }
        Ok(self.claim_account(account_id, claimer, now, None))
    }

    fn set_username(
        &mut self,
        account_id: &AccountId,
        name_hash: Option<[u8; 32]>,
    ) -> Result<(), StoreError> {
        if let Some(name_hash) = name_hash
            && self
                .usernames
                .get(&name_hash)
                .is_some_and(|holder| holder != account_id)
        {
            return Err(StoreError::AlreadyExists);
        }
        self.usernames.retain(|_, holder| holder != account_id);
        if let Some(name_hash) = name_hash {
            self.usernames.insert(name_hash, *account_id);
        }
        Ok(())
    }

    fn touch_account(
        &mut self,
        account_id: &AccountId,
        lifetime_days: Option<u32>,
        now: u64,
    ) -> Result<(), StoreError> {
        let entry = self
            .accounts
            .entry(*account_id)
            .or_insert((super::DEFAULT_LIFETIME_DAYS, 0));
        entry.1 = super::coarse_day(now);
        if let Some(days) = lifetime_days {
            entry.0 = days;
        }
        Ok(())
    }

    fn touch_device(&mut self, device_id: &DeviceId, now: u64) -> Result<(), StoreError> {
        let device = self
            .devices
            .get_mut(device_id)
            .ok_or(StoreError::AuthenticationFailed)?;
        device.active_day = coarse_day(now);
        let account_id = device.record.account_id;
        self.touch_account(&account_id, None, now)
    }

    fn account_devices(&mut self, requester: &DeviceId) -> Result<Vec<DeviceSummary>, StoreError> {
        let account_id = self
            .devices
            .get(requester)
            .ok_or(StoreError::AuthenticationFailed)?
            .record
            .account_id;
        Ok(self
            .devices
            .values()
            .filter(|device| device.record.account_id == account_id)
            .map(|device| DeviceSummary {
                device_id: device.record.device_id,
                certificate: device.record.certificate.clone(),
                created_day: day_number(device.created_hour),
                active_day: day_number(device.active_day),
            })
            .collect())
    }

    fn revoke_device(
        &mut self,
        requester: &DeviceId,
        device_id: &DeviceId,
        signature: &[u8],
    ) -> Result<(), StoreError> {
        let requester = &self
            .devices
            .get(requester)
            .ok_or(StoreError::AuthenticationFailed)?
            .record;
        let account_id = requester.account_id;
        let registered = self
            .devices
            .get(device_id)
            .is_some_and(|device| device.record.account_id == account_id);
        let revoked_already = self.revoked.get(device_id) == Some(&account_id);
        if !registered && !revoked_already {
            return Err(StoreError::NotFound);
        }
        super::check_revocation(&requester.certificate, &account_id, device_id, signature)?;
        if revoked_already {
            return Ok(());
        }
        // Its key packages and inbox go with its record.
        self.devices.remove(device_id);
        self.grants
            .retain(|(claimer, target), _| claimer != device_id && target != device_id);
        for group in self.groups.values_mut() {
            let was_member = group.members.remove(device_id).is_some();
            let was_removed = group.removed.remove(device_id).is_some();
            if was_member || was_removed {
                group.drop_acknowledged();
            }
        }
        self.revoked.insert(*device_id, account_id);
        Ok(())
    }

    fn put_link(
        &mut self,
        mailbox: [u8; 32],
        payload: Vec<u8>,
        expires_at: u64,
        now: u64,
    ) -> Result<(), StoreError> {
        if self
            .links
            .get(&mailbox)
            .is_some_and(|(_, stored_expiry)| *stored_expiry > now)
        {
            return Err(StoreError::AlreadyExists);
        }
        self.links.insert(mailbox, (payload, expires_at));
        Ok(())
    }

    fn take_link(&mut self, mailbox: &[u8; 32], now: u64) -> Result<Vec<u8>, StoreError> {
        // An expired message stays until `expire`, as it does in SQLite.
        match self.links.get(mailbox) {
            Some((_, expires_at)) if *expires_at > now => self
                .links
                .remove(mailbox)
                .map(|(payload, _)| payload)
                .ok_or(StoreError::NotFound),
            _ => Err(StoreError::NotFound),
        }
    }

    fn set_recovery(
        &mut self,
        requester: &DeviceId,
        recovery: NewRecovery,
    ) -> Result<(), StoreError> {
        let record = &self
            .devices
            .get(requester)
            .ok_or(StoreError::AuthenticationFailed)?
            .record;
        let account_id = record.account_id;
        super::check_recovery(&record.certificate, &account_id, &recovery)?;
        let taken = self
            .recoveries
            .iter()
            .any(|(holder, stored)| *holder != account_id && stored.locator == recovery.locator);
        if taken {
            return Err(StoreError::AlreadyExists);
        }
        self.recoveries.insert(
            account_id,
            StoredRecovery {
                locator: recovery.locator,
                verifier: recovery.verifier,
                bundle: recovery.bundle,
                failures: RecoveryFailures::default(),
            },
        );
        Ok(())
    }

    fn recover(
        &mut self,
        locator: &[u8; 32],
        auth_key: &[u8; 32],
        now: u64,
    ) -> Result<Recovery, StoreError> {
        let (account_id, recovery) = self
            .recoveries
            .iter_mut()
            .find(|(_, stored)| stored.locator == *locator)
            .ok_or(StoreError::NotFound)?;
        match super::decide_recovery(&recovery.verifier, recovery.failures, auth_key, now)? {
            RecoveryDecision::Locked => Ok(Recovery::Locked),
            RecoveryDecision::WrongKey(failures) => {
                recovery.failures = failures;
                Ok(Recovery::WrongKey)
            }
            RecoveryDecision::Granted => Ok(Recovery::Granted(RecoveryBundle {
                bundle: recovery.bundle.clone(),
                backup: self.backups.get(account_id).cloned().unwrap_or_default(),
            })),
        }
    }

    fn set_backup(
        &mut self,
        account_id: &AccountId,
        segment: BackupSegment,
        append_after: Option<&BlobId>,
        now: u64,
    ) -> Result<Vec<BlobId>, StoreError> {
        let chain = self
            .backups
            .get(account_id)
            .map(Vec::as_slice)
            .unwrap_or_default();
        let (chain, replaced) = super::next_backup_chain(
            chain,
            self.blobs.get(&segment.blob_id).map(|blob| &blob.record),
            account_id,
            segment,
            append_after,
            now,
        )?;
        self.backups.insert(*account_id, chain);
        for blob_id in &replaced {
            self.blobs.remove(blob_id);
        }
        Ok(replaced)
    }

    fn delete_account(&mut self, account_id: &AccountId) -> Result<(), StoreError> {
        let devices: BTreeSet<DeviceId> = self
            .devices
            .values()
            .filter(|device| device.record.account_id == *account_id)
            .map(|device| device.record.device_id)
            .collect();
        self.devices.retain(|id, _| !devices.contains(id));
        self.grants
            .retain(|(claimer, target), _| !devices.contains(claimer) && !devices.contains(target));
        for group in self.groups.values_mut() {
            group.members.retain(|id, _| !devices.contains(id));
            group.removed.retain(|id, _| !devices.contains(id));
        }
        self.invites
            .retain(|_, invite| invite.account_id != *account_id);
        self.usernames.retain(|_, holder| holder != account_id);
        self.accounts.remove(account_id);
        self.blobs
            .retain(|_, blob| blob.record.account_id != *account_id);
        self.revoked.retain(|_, holder| holder != account_id);
        self.recoveries.remove(account_id);
        self.backups.remove(account_id);
        Ok(())
    }

    fn claim_username(
        &mut self,
        name_hash: &[u8; 32],
        claimer: &DeviceId,
        now: u64,
    ) -> Result<Vec<ClaimedKeyPackage>, StoreError> {
        let account_id = *self.usernames.get(name_hash).ok_or(StoreError::NotFound)?;
        if !self.devices.contains_key(claimer) {
            return Err(StoreError::Forbidden);
        }
        Ok(self.claim_account(account_id, claimer, now, None))
    }

    fn create_group(&mut self, group: NewGroup) -> Result<GroupCreated, StoreError> {
        if self.groups.contains_key(&group.group_id) {
            return Err(StoreError::AlreadyExists);
        }
        let mut members: BTreeSet<DeviceId> = group.members.iter().copied().collect();
        members.insert(group.creator);
        if !self.devices.contains_key(&group.creator) {
            return Err(StoreError::Forbidden);
        }
        let allowed = members
            .iter()
            .filter(|member| **member != group.creator)
            .all(|member| self.may_add(&group.creator, member, group.now).is_some());
        if !allowed {
            return Err(StoreError::Forbidden);
        }
        if group
            .welcomes
            .iter()
            .any(|(device_id, _)| !members.contains(device_id))
        {
            return Err(StoreError::Forbidden);
        }

        for member in members.iter().filter(|member| **member != group.creator) {
            if self.may_add(&group.creator, member, group.now) == Some(Right::Grant) {
                self.grants.remove(&(group.creator, *member));
            }
        }
        let mut welcomed = BTreeSet::new();
        let shared = group.welcome.iter().flat_map(|welcome| {
            members
                .iter()
                .filter(|member| **member != group.creator)
                .map(|member| (*member, welcome.clone()))
        });
        for (device_id, welcome) in group.welcomes.into_iter().chain(shared) {
            if let Some(device) = self.devices.get_mut(&device_id) {
                device.push_to_inbox(welcome, group.now);
                welcomed.insert(device_id);
            }
        }
        self.groups.insert(
            group.group_id,
            Group {
                epoch: group.epoch,
                next_seq: 1,
                members: members.iter().map(|member| (*member, 0)).collect(),
                removed: BTreeMap::new(),
                posting_key: group.posting_key,
                log: BTreeMap::new(),
            },
        );
        Ok(GroupCreated {
            members: members.into_iter().collect(),
            welcomed: welcomed.into_iter().collect(),
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
        let group = self.groups.get_mut(group_id).ok_or(StoreError::NotFound)?;
        group.check_append(poster, epoch, kind)?;
        let seq = group.append(epoch, kind, payload, expires_at, now);
        Ok(Appended {
            seq,
            members: group.members.keys().copied().collect(),
        })
    }

    fn claim_contact(
        &mut self,
        account_id: &AccountId,
        claimer: &DeviceId,
        now: u64,
    ) -> Result<Vec<ClaimedKeyPackage>, StoreError> {
        if self.account_of(claimer) == Some(*account_id) {
            // The claimer's other devices: it needs no key package of its own.
            return Ok(self.claim_account(*account_id, claimer, now, Some(*claimer)));
        }
        let shares_a_group = self.groups.values().any(|group| {
            group.members.contains_key(claimer)
                && group
                    .members
                    .keys()
                    .any(|member| self.account_of(member) == Some(*account_id))
        });
        if !shares_a_group {
            return Err(StoreError::NotFound);
        }
        Ok(self.claim_account(*account_id, claimer, now, None))
    }

    fn commit_members(&mut self, commit: NewCommit) -> Result<Committed, StoreError> {
        super::check_commit_shape(&commit)?;
        // Only a revocation, signed by the identity key, ends the memberships of an account's
        // own devices, so that a stolen linked device cannot cut the others off. A revoked
        // device is registered no longer, and may be named.
        let committer_account = self
            .account_of(&commit.committer)
            .ok_or(StoreError::Forbidden)?;
        if commit
            .remove
            .iter()
            .any(|device| self.account_of(device) == Some(committer_account))
        {
            return Err(StoreError::Forbidden);
        }
        let group = self
            .groups
            .get(&commit.group_id)
            .ok_or(StoreError::NotFound)?;
        group.check_append(&commit.committer, commit.epoch, EntryKind::Commit)?;
        if commit
            .add
            .iter()
            .any(|device| group.members.contains_key(device))
        {
            return Err(StoreError::Invalid("an added device is a member already"));
        }
        if commit
            .add
            .iter()
            .any(|device| group.removed.contains_key(device))
        {
            return Err(StoreError::Invalid(
                "an added device has not yet read its removal; try again later",
            ));
        }
        if !commit.add.iter().all(|device| {
            self.may_add(&commit.committer, device, commit.now)
                .is_some()
        }) {
            return Err(StoreError::Forbidden);
        }

        for device in &commit.add {
            if self.may_add(&commit.committer, device, commit.now) == Some(Right::Grant) {
                self.grants.remove(&(commit.committer, *device));
            }
        }
        let mut welcomed = BTreeSet::new();
        let shared = commit
            .welcome
            .iter()
            .flat_map(|welcome| commit.add.iter().map(|device| (*device, welcome.clone())));
        for (device_id, welcome) in commit.welcomes.into_iter().chain(shared) {
            if let Some(device) = self.devices.get_mut(&device_id) {
                device.push_to_inbox(welcome, commit.now);
                welcomed.insert(device_id);
            }
        }
        let group = self
            .groups
            .get_mut(&commit.group_id)
            .ok_or(StoreError::NotFound)?;
        let seq = group.append(
            commit.epoch,
            EntryKind::Commit,
            commit.payload,
            None,
            commit.now,
        );
        // Devices that left by themselves are gone already; the commit still takes their
        // leaves out of the MLS tree.
        let mut removed_now = Vec::new();
        for device in &commit.remove {
            if let Some(cursor) = group.members.remove(device) {
                group.removed.insert(*device, (cursor, seq));
                removed_now.push(*device);
            }
        }
        for device in &commit.add {
            group.removed.remove(device);
            group.members.insert(*device, seq);
        }
        group.posting_key = commit.next_posting_key;
        Ok(Committed {
            seq,
            members: group.members.keys().copied().collect(),
            removed: removed_now,
            welcomed: welcomed.into_iter().collect(),
        })
    }

    fn set_posting_key(
        &mut self,
        group_id: &GroupId,
        epoch: Epoch,
        posting_key: Option<[u8; 32]>,
    ) -> Result<(), StoreError> {
        let group = self.groups.get_mut(group_id).ok_or(StoreError::NotFound)?;
        if group.epoch != epoch {
            return Err(StoreError::EpochMismatch {
                current: group.epoch,
            });
        }
        group.posting_key = posting_key;
        Ok(())
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
        let group = self.groups.get_mut(group_id).ok_or(StoreError::NotFound)?;
        super::check_unattributed(
            group_id,
            group.epoch,
            group.posting_key,
            epoch,
            signed_expires_at,
            &payload,
            signature,
        )?;
        let seq = group.append(epoch, EntryKind::Application, payload, expires_at, now);
        Ok(Appended {
            seq,
            members: group.members.keys().copied().collect(),
        })
    }

    fn leave_group(&mut self, group_id: &GroupId, device_id: &DeviceId) -> Result<(), StoreError> {
        let group = self.groups.get_mut(group_id).ok_or(StoreError::Forbidden)?;
        if group.members.remove(device_id).is_none() && group.removed.remove(device_id).is_none() {
            return Err(StoreError::Forbidden);
        }
        group.drop_acknowledged();
        Ok(())
    }

    fn group_entries(
        &mut self,
        group_id: &GroupId,
        device_id: &DeviceId,
        after_seq: u64,
        limit: usize,
        now: u64,
    ) -> Result<Vec<LogEntry>, StoreError> {
        let group = self.groups.get(group_id).ok_or(StoreError::Forbidden)?;
        // A removed device reads up to the commit that removed it.
        let until = match (group.members.get(device_id), group.removed.get(device_id)) {
            (Some(_), _) => u64::MAX,
            (None, Some((_, until))) => *until,
            (None, None) => return Err(StoreError::Forbidden),
        };
        Ok(group
            .log
            .range((Bound::Excluded(after_seq), Bound::Included(until)))
            .filter(|(_, stored)| stored.expires_at.is_none_or(|at| at > now))
            .take(limit)
            .map(|(_, stored)| stored.value.clone())
            .collect())
    }

    fn memberships(&mut self, device_id: &DeviceId) -> Result<Vec<Membership>, StoreError> {
        Ok(self
            .groups
            .iter()
            .filter_map(|(group_id, group)| {
                let cursor = group
                    .members
                    .get(device_id)
                    .or_else(|| group.removed.get(device_id).map(|(cursor, _)| cursor))?;
                Some(Membership {
                    group_id: group_id.clone(),
                    cursor: *cursor,
                })
            })
            .collect())
    }

    fn ack_group(
        &mut self,
        device_id: &DeviceId,
        group_id: &GroupId,
        seq: u64,
    ) -> Result<(), StoreError> {
        let group = self.groups.get_mut(group_id).ok_or(StoreError::Forbidden)?;
        let last_seq = group.next_seq - 1;
        if let Some(cursor) = group.members.get_mut(device_id) {
            *cursor = (*cursor).max(seq.min(last_seq));
        } else if let Some((cursor, until)) = group.removed.get_mut(device_id) {
            *cursor = (*cursor).max(seq.min(last_seq));
            if *cursor >= *until {
                // It has everything up to its removal: gone for good.
                group.removed.remove(device_id);
            }
        } else {
            return Err(StoreError::Forbidden);
        }
        group.drop_acknowledged();
        Ok(())
    }

    fn inbox_entries(
        &mut self,
        device_id: &DeviceId,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<InboxEntry>, StoreError> {
        let Some(device) = self.devices.get(device_id) else {
            return Ok(Vec::new());
        };
        Ok(device
            .inbox
            .range((Bound::Excluded(after_seq), Bound::Unbounded))
            .take(limit)
            .map(|(seq, stored)| InboxEntry {
                seq: *seq,
                payload: stored.value.clone(),
            })
            .collect())
    }

    fn ack_inbox(&mut self, device_id: &DeviceId, seq: u64) -> Result<(), StoreError> {
        if let Some(device) = self.devices.get_mut(device_id) {
            match seq.checked_add(1) {
                Some(first_kept) => device.inbox = device.inbox.split_off(&first_kept),
                None => device.inbox.clear(),
            }
        }
        Ok(())
    }

    fn expire(&mut self, now: u64, cutoff: u64) -> Result<u64, StoreError> {
        let inactive: Vec<AccountId> = self
            .accounts
            .iter()
            .filter(|(_, (days, day))| day + u64::from(*days) * 86_400 <= now)
            .map(|(account, _)| *account)
            .collect();
        for account in &inactive {
            self.delete_account(account)?;
        }
        // Only whole hours before the cutoff's are surely older than it.
        let cutoff_hour = coarse_hour(cutoff);
        let mut removed = inactive.len();
        for group in self.groups.values_mut() {
            let before = group.log.len();
            group.log.retain(|_, entry| {
                entry.created_hour >= cutoff_hour && entry.expires_at.is_none_or(|at| at > now)
            });
            removed += before - group.log.len();
            // Removed devices with nothing left to read up to their removal.
            let log = &group.log;
            let before = group.removed.len();
            group.removed.retain(|_, (cursor, until)| {
                log.range((Bound::Excluded(*cursor), Bound::Included(*until)))
                    .next()
                    .is_some()
            });
            removed += before - group.removed.len();
        }
        for device in self.devices.values_mut() {
            let before = device.inbox.len();
            device
                .inbox
                .retain(|_, entry| entry.created_hour >= cutoff_hour);
            removed += before - device.inbox.len();
        }
        let before = self.invites.len() + self.grants.len();
        self.invites.retain(|_, invite| invite.expires_at > now);
        self.grants.retain(|_, expires_at| *expires_at > now);
        removed += before - (self.invites.len() + self.grants.len());
        let before = self.links.len();
        self.links.retain(|_, (_, expires_at)| *expires_at > now);
        removed += before - self.links.len();
        // Likewise, only whole hours before the day's start surely are a day old.
        let unfinished_cutoff_hour = coarse_hour(now.saturating_sub(UNFINISHED_BLOB_LIFETIME));
        let groups = &self.groups;
        let backups: BTreeSet<BlobId> = self
            .backups
            .values()
            .flatten()
            .map(|segment| segment.blob_id)
            .collect();
        let before = self.blobs.len();
        self.blobs.retain(|blob_id, blob| {
            let unfinished = blob.record.length < blob.record.size;
            (blob.record.expires_at > now || backups.contains(blob_id))
                && !(unfinished && blob.created_hour < unfinished_cutoff_hour)
                && blob.record.group_id.as_ref().is_none_or(|group_id| {
                    groups
                        .get(group_id)
                        .is_some_and(|group| !group.members.is_empty())
                })
        });
        removed += before - self.blobs.len();
        Ok(u64::try_from(removed).unwrap_or(u64::MAX))
    }

    fn create_blob(&mut self, blob: NewBlob, quota_bytes: u64) -> Result<(), StoreError> {
        let group = match &blob.group_id {
            Some(group_id) => Some(self.groups.get(group_id).ok_or(StoreError::NotFound)?),
            None => None,
        };
        let uploader = self
            .devices
            .get(&blob.uploader)
            .ok_or(StoreError::NotFound)?;
        if group.is_some_and(|group| !group.members.contains_key(&blob.uploader)) {
            return Err(StoreError::Forbidden);
        }
        if self.blobs.contains_key(&blob.blob_id) {
            return Err(StoreError::AlreadyExists);
        }
        let account_id = uploader.record.account_id;
        let (used, count) = self
            .blobs
            .values()
            .filter(|stored| stored.record.account_id == account_id)
            .fold((0u64, 0usize), |(used, count), stored| {
                (used.saturating_add(stored.record.size), count + 1)
            });
        if used.saturating_add(blob.size) > quota_bytes || count >= blob.max_blobs {
            return Err(StoreError::QuotaExceeded);
        }
        self.blobs.insert(
            blob.blob_id,
            StoredBlob {
                record: BlobRecord {
                    blob_id: blob.blob_id,
                    account_id,
                    uploader: blob.uploader,
                    group_id: blob.group_id,
                    size: blob.size,
                    length: 0,
                    expires_at: blob.expires_at,
                },
                created_hour: coarse_hour(blob.now),
            },
        );
        Ok(())
    }

    fn blob(
        &mut self,
        blob_id: &BlobId,
        device: &DeviceId,
        now: u64,
    ) -> Result<BlobRecord, StoreError> {
        let is_backup = || {
            self.backups
                .values()
                .flatten()
                .any(|segment| segment.blob_id == *blob_id)
        };
        let blob = &self
            .blobs
            .get(blob_id)
            .filter(|blob| blob.record.expires_at > now || is_backup())
            .ok_or(StoreError::NotFound)?
            .record;
        let allowed = blob.uploader == *device
            || match &blob.group_id {
                Some(group_id) => self
                    .groups
                    .get(group_id)
                    .is_some_and(|group| group.members.contains_key(device)),
                // An account's blob: for its registered devices, not revoked ones.
                None => self
                    .devices
                    .get(device)
                    .is_some_and(|of| of.record.account_id == blob.account_id),
            };
        if !allowed {
            return Err(StoreError::Forbidden);
        }
        Ok(blob.clone())
    }

    fn set_blob_length(
        &mut self,
        blob_id: &BlobId,
        uploader: &DeviceId,
        length: u64,
    ) -> Result<(), StoreError> {
        let blob = &mut self
            .blobs
            .get_mut(blob_id)
            .ok_or(StoreError::NotFound)?
            .record;
        if blob.uploader != *uploader {
            return Err(StoreError::Forbidden);
        }
        check_blob_length(blob.size, blob.length, length)?;
        blob.length = length;
        Ok(())
    }

    fn live_blob_ids(&mut self) -> Result<Vec<BlobId>, StoreError> {
        Ok(self.blobs.keys().copied().collect())
    }
}

impl MemoryStore {
    /// Takes one key package of every device of `account_id` for `claimer`, and grants
    /// `claimer` the right to add each of those devices to one group.
    fn claim_account(
        &mut self,
        account_id: AccountId,
        claimer: &DeviceId,
        now: u64,
        except: Option<DeviceId>,
    ) -> Vec<ClaimedKeyPackage> {
        let grant_expires_at = coarse_hour(now).saturating_add(GRANT_LIFETIME);
        let mut claimed = Vec::new();
        for device in self.devices.values_mut() {
            if device.record.account_id != account_id || except == Some(device.record.device_id) {
                continue;
            }
            let Some(key_package) = device
                .key_packages
                .pop_front()
                .or_else(|| device.last_resort.clone())
            else {
                continue;
            };
            let device_id = device.record.device_id;
            self.grants.insert((*claimer, device_id), grant_expires_at);
            claimed.push(ClaimedKeyPackage {
                device_id,
                certificate: device.record.certificate.clone(),
                key_package,
            });
        }
        claimed
    }
}

#[cfg(test)]
impl MemoryStore {
    /// Removes every member of a group: a state that no operation reaches yet (the last member
    /// goes only with its account, and its blobs with it), for the tests of `expire`.
    pub(super) fn remove_group_members(&mut self, group_id: &GroupId) {
        if let Some(group) = self.groups.get_mut(group_id) {
            group.members.clear();
        }
    }
}

impl MemoryStore {
    /// The account of a registered device; `None` for one unknown or revoked.
    fn account_of(&self, device: &DeviceId) -> Option<AccountId> {
        self.devices
            .get(device)
            .map(|device| device.record.account_id)
    }

    /// What lets `adder` add `device` to a group at `now`, if anything: being of the same
    /// account (and registered), or an unexpired grant from a claim.
    fn may_add(&self, adder: &DeviceId, device: &DeviceId, now: u64) -> Option<Right> {
        let target = self.account_of(device)?;
        if self.account_of(adder) == Some(target) {
            return Some(Right::SameAccount);
        }
        self.grants
            .get(&(*adder, *device))
            .is_some_and(|expires_at| *expires_at > now)
            .then_some(Right::Grant)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Right {
    SameAccount,
    /// Consumed by the addition.
    Grant,
}

/// How long the right to add a device, won by claiming an invite, lasts.
const GRANT_LIFETIME: u64 = 24 * 3600;

struct Device {
    record: DeviceRecord,
    key_packages: VecDeque<Vec<u8>>,
    last_resort: Option<Vec<u8>>,
    inbox: BTreeMap<u64, Stored<Vec<u8>>>,
    inbox_next_seq: u64,
    created_hour: u64,
    /// The start of the day it last registered or authenticated, Unix seconds.
    active_day: u64,
}

struct Invite {
    account_id: AccountId,
    expires_at: u64,
    uses_left: u32,
}

struct Group {
    epoch: Epoch,
    next_seq: u64,
    /// Each member's cursor.
    members: BTreeMap<DeviceId, u64>,
    /// Removed devices: cursor, and the commit that removed them, which they still read up to.
    removed: BTreeMap<DeviceId, (u64, u64)>,
    /// The public posting key of the current epoch.
    posting_key: Option<[u8; 32]>,
    log: BTreeMap<u64, Stored<LogEntry>>,
}

struct Stored<T> {
    value: T,
    created_hour: u64,
    /// When the entry disappears, for disappearing messages.
    expires_at: Option<u64>,
}

struct StoredRecovery {
    locator: [u8; 32],
    verifier: [u8; 32],
    bundle: Vec<u8>,
    failures: RecoveryFailures,
}

struct StoredBlob {
    record: BlobRecord,
    created_hour: u64,
}

impl Group {
    /// Deletes the entries every member and every removed device still reading has.
    fn drop_acknowledged(&mut self) {
        let everyone_has = self
            .members
            .values()
            .chain(self.removed.values().map(|(cursor, _)| cursor))
            .min();
        if let Some(everyone_has) = everyone_has {
            self.log = self.log.split_off(&(everyone_has + 1));
        }
    }

    /// The checks of appending one entry: membership and epoch (compare-and-set).
    fn check_append(
        &self,
        poster: &DeviceId,
        epoch: Epoch,
        kind: EntryKind,
    ) -> Result<(), StoreError> {
        if !self.members.contains_key(poster) {
            return Err(StoreError::Forbidden);
        }
        if epoch != self.epoch {
            return Err(StoreError::EpochMismatch {
                current: self.epoch,
            });
        }
        if kind == EntryKind::Commit && self.epoch.0 == u64::MAX {
            return Err(StoreError::Invalid("the epoch cannot advance further"));
        }
        Ok(())
    }

    /// Appends an entry that passed `check_append`; returns its sequence number.
    fn append(
        &mut self,
        epoch: Epoch,
        kind: EntryKind,
        payload: Vec<u8>,
        expires_at: Option<u64>,
        now: u64,
    ) -> u64 {
        let seq = self.next_seq;
        self.log.insert(
            seq,
            Stored {
                value: LogEntry {
                    seq,
                    epoch,
                    kind,
                    payload,
                },
                created_hour: coarse_hour(now),
                expires_at,
            },
        );
        self.next_seq += 1;
        if kind == EntryKind::Commit {
            self.epoch = Epoch(self.epoch.0 + 1);
            // A commit that names no key for its epoch leaves none: the old one is stale.
            self.posting_key = None;
        }
        seq
    }
}

impl Device {
    fn one_time_count(&self) -> u32 {
        u32::try_from(self.key_packages.len()).unwrap_or(u32::MAX)
    }

    fn push_to_inbox(&mut self, payload: Vec<u8>, now: u64) {
        let seq = self.inbox_next_seq;
        self.inbox_next_seq += 1;
        self.inbox.insert(
            seq,
            Stored {
                value: payload,
                created_hour: coarse_hour(now),
                expires_at: None,
            },
        );
    }
}
