//! Who is online, and what each online connection still has to be told.
//!
//! A connection's delivery task owns a [`Mailbox`]. Posting a message drops a shared reference
//! to the stored entry into the mailbox of every online member and wakes its task; the task
//! sends entries straight from the mailbox while they follow on from what it already sent, and
//! falls back to reading the store when there is a gap. Mailboxes are bounded, so a slow reader
//! costs a store read, not memory.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use miyu_proto::{DeviceId, GroupId};
use tokio::sync::Notify;

use crate::store::LogEntry;

/// Entries kept per group in a mailbox before it gives up and reads the store instead: one
/// full store batch, so a burst the store committed at once still fits.
const MAX_PENDING_PER_GROUP: usize = 1024;

/// A log entry as it was just appended, shared by every mailbox it goes to.
#[derive(Debug)]
pub(crate) struct PushedEntry {
    pub(crate) entry: LogEntry,
    /// The connection that posted it: that one is told "yours" instead of getting the bytes.
    pub(crate) poster_connection: u64,
}

#[derive(Debug, Default)]
pub(crate) struct GroupPending {
    pub(crate) entries: Vec<Arc<PushedEntry>>,
    /// Entries were dropped or never attached: read the store.
    pub(crate) read_store: bool,
    /// The device asked to have entries after this sequence number again.
    pub(crate) refetch_after: Option<u64>,
}

#[derive(Debug, Default)]
pub(crate) struct Pending {
    pub(crate) inbox: bool,
    pub(crate) groups: HashMap<GroupId, GroupPending>,
}

/// What one connection's delivery task has yet to deliver.
#[derive(Debug)]
pub(crate) struct Mailbox {
    pub(crate) connection: u64,
    pending: Mutex<Pending>,
    wake: Notify,
    /// Told when the device is revoked: its connection must end.
    revoked: Notify,
}

impl Mailbox {
    fn pending(&self) -> MutexGuard<'_, Pending> {
        // A panic while holding this lock cannot leave `Pending` half-updated in a way that
        // matters: the worst case is a redundant store read.
        self.pending
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Takes everything pending, leaving the mailbox empty.
    pub(crate) fn take(&self) -> Pending {
        std::mem::take(&mut *self.pending())
    }

    /// Waits until something is put into the mailbox (returns at once if it already was).
    pub(crate) async fn wait(&self) {
        self.wake.notified().await;
    }

    /// Waits until the device is revoked (returns at once if it already was).
    pub(crate) async fn revoked(&self) {
        self.revoked.notified().await;
    }

    pub(crate) fn refetch(&self, group_id: GroupId, after_seq: u64) {
        {
            let mut pending = self.pending();
            let group = pending.groups.entry(group_id).or_default();
            group.refetch_after = Some(group.refetch_after.map_or(after_seq, |s| s.min(after_seq)));
        }
        self.wake.notify_one();
    }

    fn push_inbox(&self) {
        self.pending().inbox = true;
        self.wake.notify_one();
    }

    fn push_group(&self, group_id: &GroupId, entry: Option<&Arc<PushedEntry>>) {
        {
            let mut pending = self.pending();
            let group = pending.groups.entry(group_id.clone()).or_default();
            match entry {
                Some(entry) if !group.read_store && group.entries.len() < MAX_PENDING_PER_GROUP => {
                    group.entries.push(Arc::clone(entry));
                }
                _ => {
                    group.entries.clear();
                    group.read_store = true;
                }
            }
        }
        self.wake.notify_one();
    }
}

/// The online devices and their mailboxes (one per connection).
#[derive(Debug, Default)]
pub(crate) struct Hub {
    devices: Mutex<HashMap<DeviceId, Vec<Arc<Mailbox>>>>,
    next_connection: AtomicU64,
}

impl Hub {
    fn devices(&self) -> MutexGuard<'_, HashMap<DeviceId, Vec<Arc<Mailbox>>>> {
        self.devices
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A number unique to one connection for the life of the process.
    pub(crate) fn connection_number(&self) -> u64 {
        self.next_connection.fetch_add(1, Ordering::Relaxed) + 1
    }

    pub(crate) fn register(&self, device: DeviceId, connection: u64) -> Arc<Mailbox> {
        let mailbox = Arc::new(Mailbox {
            connection,
            pending: Mutex::default(),
            wake: Notify::new(),
            revoked: Notify::new(),
        });
        self.devices()
            .entry(device)
            .or_default()
            .push(Arc::clone(&mailbox));
        mailbox
    }

    pub(crate) fn unregister(&self, device: &DeviceId, mailbox: &Arc<Mailbox>) {
        let mut devices = self.devices();
        if let Some(mailboxes) = devices.get_mut(device) {
            mailboxes.retain(|m| !Arc::ptr_eq(m, mailbox));
            if mailboxes.is_empty() {
                devices.remove(device);
            }
        }
    }

    #[cfg(test)]
    pub(crate) fn online_connections(&self) -> usize {
        self.devices().values().map(Vec::len).sum()
    }

    fn each_mailbox(&self, devices: &[DeviceId], mut action: impl FnMut(&Mailbox)) {
        let online: Vec<Arc<Mailbox>> = {
            let registry = self.devices();
            devices
                .iter()
                .filter_map(|device| registry.get(device))
                .flatten()
                .cloned()
                .collect()
        };
        for mailbox in &online {
            action(mailbox);
        }
    }

    /// Tells every connection of a revoked device to end.
    pub(crate) fn revoke(&self, device: &DeviceId) {
        // A stored permit: a connection busy with a frame sees it when it next waits.
        self.each_mailbox(std::slice::from_ref(device), |mailbox| {
            mailbox.revoked.notify_one();
        });
    }

    pub(crate) fn notify_inbox(&self, devices: &[DeviceId]) {
        self.each_mailbox(devices, Mailbox::push_inbox);
    }

    /// Tells the members' connections about a new entry, or (with `None`) that the group has
    /// entries they should read from the store.
    pub(crate) fn notify_group(
        &self,
        group_id: &GroupId,
        members: &[DeviceId],
        entry: Option<&Arc<PushedEntry>>,
    ) {
        self.each_mailbox(members, |mailbox| mailbox.push_group(group_id, entry));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::EntryKind;
    use miyu_proto::Epoch;

    fn entry(seq: u64) -> Arc<PushedEntry> {
        Arc::new(PushedEntry {
            entry: LogEntry {
                seq,
                epoch: Epoch(1),
                kind: EntryKind::Application,
                payload: vec![1],
            },
            poster_connection: 0,
        })
    }

    #[test]
    fn a_full_mailbox_falls_back_to_the_store_instead_of_growing() {
        let hub = Hub::default();
        let device = DeviceId::from_device_key(&[1; 32]);
        let group = GroupId::from_bytes(&[2; 16]).unwrap();
        let mailbox = hub.register(device, hub.connection_number());
        for seq in 1..=(MAX_PENDING_PER_GROUP as u64 + 1) {
            hub.notify_group(&group, &[device], Some(&entry(seq)));
        }
        let pending = mailbox.take();
        let group_pending = &pending.groups[&group];
        assert!(group_pending.read_store);
        assert!(group_pending.entries.is_empty());
        assert!(mailbox.take().groups.is_empty());
    }

    #[tokio::test]
    async fn revoking_a_device_tells_each_of_its_connections_and_no_other() {
        let hub = Hub::default();
        let device = DeviceId::from_device_key(&[1; 32]);
        let other = DeviceId::from_device_key(&[2; 32]);
        let first = hub.register(device, hub.connection_number());
        let second = hub.register(device, hub.connection_number());
        let bystander = hub.register(other, hub.connection_number());
        hub.revoke(&device);
        // Each returns at once: the revocation waits for them.
        first.revoked().await;
        second.revoked().await;
        let told = futures_util::FutureExt::now_or_never(bystander.revoked());
        assert!(told.is_none());
    }

    #[test]
    fn offline_devices_get_nothing_and_unregistered_mailboxes_are_forgotten() {
        let hub = Hub::default();
        let device = DeviceId::from_device_key(&[1; 32]);
        let mailbox = hub.register(device, hub.connection_number());
        assert_eq!(hub.online_connections(), 1);
        hub.unregister(&device, &mailbox);
        assert_eq!(hub.online_connections(), 0);
        hub.notify_inbox(&[device]);
        assert!(!mailbox.take().inbox);
    }
}
