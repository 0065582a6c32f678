//! Storage of the delivery service, behind one trait with coarse, use-case shaped operations.
//!
//! Every operation is atomic on its own: when it returns an error it has left no trace. The
//! operations since the last [`Store::commit`] become durable together when it returns, which
//! lets the [`worker`] acknowledge many requests with one disk flush (group commit).
//!
//! Two backends exist today: [`sqlite::SqliteStore`] (the embedded default) and
//! [`memory::MemoryStore`] (tests and benchmarks of everything but the disk). One conformance
//! suite, in `conformance.rs`, runs against both.
//!
//! Times are Unix seconds passed in by the caller, so that expiry can be tested with an
//! injected clock. Stored times are rounded down to the hour: the server keeps no finer record
//! of when anything happened.

use miyu_proto::{AccountId, DeviceId, Epoch, GroupId};

pub mod memory;
pub mod sqlite;
pub mod worker;

#[cfg(test)]
mod conformance;

/// What kind of MLS message a log entry holds. The server sees nothing else of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    Application,
    /// Advances the group's epoch by one.
    Commit,
}

/// A device to create, with the public material it registers with.
#[derive(Debug, Clone)]
pub struct NewDevice {
    pub device_id: DeviceId,
    pub account_id: AccountId,
    pub device_key: [u8; 32],
    /// The device certificate in its compact form (identity key, device key, signature).
    pub certificate: Vec<u8>,
    pub key_packages: Vec<Vec<u8>>,
    pub last_resort_key_package: Option<Vec<u8>>,
    pub now: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceRecord {
    pub device_id: DeviceId,
    pub account_id: AccountId,
    pub device_key: [u8; 32],
    pub certificate: Vec<u8>,
}

/// One device of an account, as its owner sees it in a list of the account's devices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSummary {
    pub device_id: DeviceId,
    /// The device certificate in its compact form.
    pub certificate: Vec<u8>,
    /// Days since the Unix epoch: when the device registered.
    pub created_day: u64,
    /// Days since the Unix epoch: when the device last registered or authenticated.
    pub active_day: u64,
}

/// One key package handed out for one device of an invite's account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimedKeyPackage {
    pub device_id: DeviceId,
    pub certificate: Vec<u8>,
    pub key_package: Vec<u8>,
}

#[derive(Debug, Clone)]
pub struct NewGroup {
    pub group_id: GroupId,
    pub epoch: Epoch,
    /// Becomes a member without needing a grant.
    pub creator: DeviceId,
    /// The other members; each needs a grant to the creator from `claim_invite`.
    pub members: Vec<DeviceId>,
    /// Welcome messages, each to the inbox of one member.
    pub welcomes: Vec<(DeviceId, Vec<u8>)>,
    /// One Welcome for the inbox of every member but the creator (kept as one copy until
    /// the checks pass).
    pub welcome: Option<Vec<u8>>,
    /// The public posting key of the first epoch, for unattributed posts.
    pub posting_key: Option<[u8; 32]>,
    pub now: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupCreated {
    /// Every member, the creator included.
    pub members: Vec<DeviceId>,
    /// The devices whose inbox got a Welcome.
    pub welcomed: Vec<DeviceId>,
}

/// A commit that changes a group's members; see [`Store::commit_members`].
#[derive(Debug, Clone)]
pub struct NewCommit {
    pub group_id: GroupId,
    pub committer: DeviceId,
    /// The epoch the commit was built on.
    pub epoch: Epoch,
    pub payload: Vec<u8>,
    /// Devices that become members; each needs a grant to the committer.
    pub add: Vec<DeviceId>,
    /// Members that stop being members; never the committer.
    pub remove: Vec<DeviceId>,
    /// Welcome messages, each to the inbox of one added device.
    pub welcomes: Vec<(DeviceId, Vec<u8>)>,
    /// One Welcome for the inbox of every added device.
    pub welcome: Option<Vec<u8>>,
    /// The public posting key of the epoch the commit starts.
    pub next_posting_key: Option<[u8; 32]>,
    pub now: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Committed {
    pub seq: u64,
    /// The members after the commit, the added ones included.
    pub members: Vec<DeviceId>,
    /// The devices that stopped being members (the commit is still pushed to them).
    pub removed: Vec<DeviceId>,
    /// The devices whose inbox got a Welcome.
    pub welcomed: Vec<DeviceId>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Appended {
    pub seq: u64,
    /// The group's members after the append, the poster included.
    pub members: Vec<DeviceId>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogEntry {
    pub seq: u64,
    pub epoch: Epoch,
    pub kind: EntryKind,
    pub payload: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboxEntry {
    pub seq: u64,
    pub payload: Vec<u8>,
}

/// How far a device has acknowledged one of its groups.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Membership {
    pub group_id: GroupId,
    pub cursor: u64,
}

/// A blob's id: 32 random bytes chosen by the server.
pub type BlobId = [u8; 32];

/// The record of an encrypted file blob to create. The bytes are kept outside the store.
#[derive(Debug, Clone)]
pub struct NewBlob {
    pub blob_id: BlobId,
    /// The device uploading it; must be a member of `group_id`.
    pub uploader: DeviceId,
    /// The group whose members may read it; `None` for a blob of the uploader's account, which
    /// only the account's devices may read.
    pub group_id: Option<GroupId>,
    /// Bytes the finished blob will have.
    pub size: u64,
    /// Unix seconds; `expire` deletes the blob from then on.
    pub expires_at: u64,
    /// How many blobs the uploader's account may have at once, this one included: the byte
    /// quota alone would let tiny blobs pile up in the store.
    pub max_blobs: usize,
    pub now: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobRecord {
    pub blob_id: BlobId,
    /// The uploader's account: whose quota it counts against, and whose deletion removes it.
    pub account_id: AccountId,
    pub uploader: DeviceId,
    /// `None` for a blob of the account rather than of a group.
    pub group_id: Option<GroupId>,
    pub size: u64,
    /// Bytes durably stored so far; equal to `size` once the upload is complete.
    pub length: u64,
    pub expires_at: u64,
}

/// A recovery bundle to store for an account; see [`Store::set_recovery`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewRecovery {
    /// SHA-256 of the key [`Store::recover`] must be given.
    pub verifier: [u8; 32],
    /// What [`Store::recover`] finds the bundle by.
    pub locator: [u8; 32],
    pub bundle: Vec<u8>,
    /// The account's identity key's signature over the three
    /// (`miyu_proto::cert::recovery_payload`).
    pub signature: Vec<u8>,
}

/// How an account can be recovered when its devices are lost (PROTOCOL.md §7.18): the bundle
/// its client sealed, opaque to the server, and the account's backup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecoveryBundle {
    pub bundle: Vec<u8>,
    /// The segments of the account's backup, first to last; empty when it has none.
    pub backup: Vec<BackupSegment>,
}

/// One segment of an account's backup (PROTOCOL.md §7.19): a blob of the account, and the
/// segment's plaintext length as its client gave it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackupSegment {
    pub blob_id: BlobId,
    pub size: u64,
}

/// The most segments an account's backup may have: a whole one, then changes.
pub const MAX_BACKUP_SEGMENTS: usize = 64;
// The refusal of one more segment names the number.
const _: () = assert!(MAX_BACKUP_SEGMENTS == 64);

/// What one attempt to recover an account came to; see [`Store::recover`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recovery {
    /// The key was right.
    Granted(RecoveryBundle),
    /// The key was wrong, and the failure is counted against the account.
    WrongKey,
    /// The account's failed attempts in the current window are used up: the key was not
    /// checked.
    Locked,
}

/// Failed recovery attempts an account may have in one window before every attempt is refused
/// until the window ends.
pub const MAX_RECOVERY_FAILURES: u32 = 5;

/// How long a window of failed recovery attempts lasts at least. It opens with the first
/// failure when none is open and closes this long after the end of that failure's hour (the
/// server keeps only the hour), so it lasts 24 to 25 hours.
pub const RECOVERY_WINDOW: u64 = 24 * 3600;

/// Errors, sorted by who must act.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    // The request cannot be granted as asked.
    #[error("not found")]
    NotFound,
    #[error("already exists")]
    AlreadyExists,
    #[error("not allowed")]
    Forbidden,
    #[error("the group is at epoch {}", current.0)]
    EpochMismatch { current: Epoch },
    #[error("invalid request: {0}")]
    Invalid(&'static str),
    #[error("the account's storage quota is used up")]
    QuotaExceeded,
    /// A signature does not verify under the account's identity key, a revoked device tries to
    /// register again, or the requesting device is no longer registered (revoked, or its
    /// account deleted).
    #[error("authentication failed")]
    AuthenticationFailed,
    // The storage failed.
    #[error("database error: {0}")]
    Database(#[from] rusqlite::Error),
    #[error("stored data is corrupt: {0}")]
    Corrupt(&'static str),
    #[error("the batch could not be committed: {0}")]
    CommitFailed(String),
    #[error("the store is shut down")]
    Closed,
}

/// The delivery service's storage. See the module documentation for the atomicity and
/// durability contract.
pub trait Store: Send + 'static {
    /// Makes every operation since the previous commit durable. If it fails, all of them are
    /// rolled back.
    fn commit(&mut self) -> Result<(), StoreError>;

    /// Creates a device, active on the day of `now`. `AlreadyExists` if the device id is taken,
    /// `AuthenticationFailed` if its account revoked it.
    fn register_device(&mut self, device: NewDevice) -> Result<(), StoreError>;

    fn device(&mut self, device_id: &DeviceId) -> Result<Option<DeviceRecord>, StoreError>;

    /// Adds one-time key packages, and replaces the last-resort one when given. Returns how many
    /// one-time key packages the device now has.
    fn add_key_packages(
        &mut self,
        device_id: &DeviceId,
        key_packages: Vec<Vec<u8>>,
        last_resort: Option<Vec<u8>>,
    ) -> Result<u32, StoreError>;

    /// How many one-time key packages the device has left.
    fn key_package_count(&mut self, device_id: &DeviceId) -> Result<u32, StoreError>;

    /// Registers an invite of `account`, known only by the hash of its token, that can be
    /// claimed `uses` times (at least once).
    fn create_invite(
        &mut self,
        account_id: &AccountId,
        token_hash: [u8; 32],
        expires_at: u64,
        uses: u32,
    ) -> Result<(), StoreError>;

    /// Redeems an invite: uses it up (deletes it after its last use), takes one key package of every device of its account (a
    /// one-time one if any is left, else the last-resort one, which is kept) and grants the
    /// claiming device the right to add each of those devices to one group. `NotFound` if the
    /// invite does not exist or has expired.
    fn claim_invite(
        &mut self,
        token_hash: &[u8; 32],
        claimer: &DeviceId,
        now: u64,
    ) -> Result<Vec<ClaimedKeyPackage>, StoreError>;

    /// Publishes `name_hash` as the account's username, replacing the one it had, or removes
    /// it (`None`). `AlreadyExists` if another account holds that name.
    fn set_username(
        &mut self,
        account_id: &AccountId,
        name_hash: Option<[u8; 32]>,
    ) -> Result<(), StoreError>;

    /// Looks a published username up and, like `claim_invite`, takes one key package of every
    /// device of its account and grants them to `claimer`. Nothing else is consumed. `NotFound`
    /// if no account publishes the name.
    fn claim_username(
        &mut self,
        name_hash: &[u8; 32],
        claimer: &DeviceId,
        now: u64,
    ) -> Result<Vec<ClaimedKeyPackage>, StoreError>;

    /// Records that the account was active at `now` (kept to the day) and, with
    /// `lifetime_days`, sets how long it may stay inactive before `expire` deletes it (365 days
    /// unless set). Creates the account's record if it has none.
    fn touch_account(
        &mut self,
        account_id: &AccountId,
        lifetime_days: Option<u32>,
        now: u64,
    ) -> Result<(), StoreError>;

    /// Records that a registered device, and so its account, was active at `now` (kept to the
    /// day). `AuthenticationFailed` if the device is not registered (revoked, or never was).
    fn touch_device(&mut self, device_id: &DeviceId, now: u64) -> Result<(), StoreError>;

    /// The devices of `requester`'s account that are not revoked, in device id order, the
    /// requester included. `AuthenticationFailed` if the requester is not registered.
    fn account_devices(&mut self, requester: &DeviceId) -> Result<Vec<DeviceSummary>, StoreError>;

    /// Revokes a device of `requester`'s account for good, if `signature` is the account's
    /// identity key's (taken from the requester's certificate) over
    /// `miyu_proto::cert::revoke_payload(device_id)`. The device's id is remembered until the
    /// account is deleted, so that it can never register again; its key packages, inbox and
    /// grants (given or received) are deleted, and it leaves every group as by `leave_group`.
    /// The blobs it uploaded stay with the account. `AuthenticationFailed` if the requester is
    /// not registered or the signature does not verify, `NotFound` if the device is not one of
    /// the account's. Revoking a device already revoked changes nothing and succeeds.
    fn revoke_device(
        &mut self,
        requester: &DeviceId,
        device_id: &DeviceId,
        signature: &[u8],
    ) -> Result<(), StoreError>;

    /// Leaves a sealed message in a linking mailbox until `expires_at`, replacing an expired
    /// one. `AlreadyExists` if the mailbox holds a message that has not expired at `now`.
    fn put_link(
        &mut self,
        mailbox: [u8; 32],
        payload: Vec<u8>,
        expires_at: u64,
        now: u64,
    ) -> Result<(), StoreError>;

    /// Takes the message out of a linking mailbox, which is then empty. `NotFound` if it holds
    /// none, or only one that has expired at `now`.
    fn take_link(&mut self, mailbox: &[u8; 32], now: u64) -> Result<Vec<u8>, StoreError>;

    /// Stores the recovery bundle of `requester`'s account, with its verifier and locator,
    /// replacing any earlier one, and forgets the account's failed recovery attempts.
    /// `AuthenticationFailed` if the requester is not a registered device, or the signature
    /// does not verify under the account's identity key (named by the requester's
    /// certificate); `AlreadyExists` if another account's bundle has the locator.
    fn set_recovery(
        &mut self,
        requester: &DeviceId,
        recovery: NewRecovery,
    ) -> Result<(), StoreError>;

    /// Hands out the recovery bundle found by `locator`, and its account's backup, if the
    /// SHA-256 of `auth_key` is its verifier (compared in constant time). Once
    /// [`MAX_RECOVERY_FAILURES`] attempts failed in the current window (see
    /// [`RECOVERY_WINDOW`]), every attempt is `Locked`, the key unchecked, until the window
    /// ends. A wrong key is `WrongKey` and counts one failure, which stays with the batch like
    /// any other change. A right key changes nothing. `NotFound` if no bundle has the locator.
    fn recover(
        &mut self,
        locator: &[u8; 32],
        auth_key: &[u8; 32],
        now: u64,
    ) -> Result<Recovery, StoreError>;

    /// Sets the account's backup, a chain of segments (PROTOCOL.md §7.19). Without
    /// `append_after`, `segment` becomes the whole backup, replacing the chain; with it, the
    /// segment is added after the chain's last, which must be the blob `append_after` names
    /// (`NotFound` otherwise, also when the account has no backup). The segment's blob must be
    /// a finished blob of the account (none of a group) that has not expired at `now`, unless
    /// it is in the chain already and replaces it (then only its size changes); `NotFound`
    /// otherwise. `Invalid` if an appended blob is in the chain already, or the chain has
    /// [`MAX_BACKUP_SEGMENTS`] already. The segments replaced are deleted, and their ids
    /// returned so that their files can go too. While a blob is a segment, `expire` leaves it
    /// be and `blob` hands it out whatever its expiry.
    fn set_backup(
        &mut self,
        account_id: &AccountId,
        segment: BackupSegment,
        append_after: Option<&BlobId>,
        now: u64,
    ) -> Result<Vec<BlobId>, StoreError>;

    /// Deletes an account and everything stored for it: devices, the record of its revoked
    /// devices, key packages, inboxes, group memberships, invites, grants, username, recovery
    /// bundle, backup and the blobs its devices uploaded. Log
    /// entries it posted stay until the other members have them (they carry no poster).
    fn delete_account(&mut self, account_id: &AccountId) -> Result<(), StoreError>;

    /// Creates a group log at `epoch` with its members and puts the Welcomes in their inboxes.
    /// `AlreadyExists` if the group exists; `Forbidden` if a member is not registered, or is
    /// of another account than the creator's and has no grant to the creator (grants are
    /// consumed), or a Welcome goes to a non-member.
    fn create_group(&mut self, group: NewGroup) -> Result<GroupCreated, StoreError>;

    /// Like `claim_username`, for an account that shares a group with `claimer` (a contact):
    /// takes one key package of each of its devices and grants them to `claimer`. `NotFound`
    /// if the account shares no group with `claimer`, so that nobody can drain the key
    /// packages of accounts they have never talked to. The claimer's own account needs no
    /// shared group, and then every device but the claimer is claimed.
    fn claim_contact(
        &mut self,
        account_id: &AccountId,
        claimer: &DeviceId,
        now: u64,
    ) -> Result<Vec<ClaimedKeyPackage>, StoreError>;

    /// Appends a commit that changes the group's members, and applies the change, in one
    /// step. `NotFound` if there is no such group, `EpochMismatch` as for `append`,
    /// `Forbidden` if the committer is not a member, an added device is not registered or, of
    /// another account than the committer's, has no grant to the committer (grants are
    /// consumed), a removed device is a registered one of the committer's own account (only
    /// `revoke_device`, signed by the identity key, ends those), or a Welcome goes to a device
    /// not being added,
    /// `Invalid` if a device is named twice, both added and removed, the committer, or added
    /// while a member already. A removed device that is no longer a member (it left) is
    /// skipped. Added devices start reading after the commit; removed ones still read up to
    /// it, until they acknowledge it.
    fn commit_members(&mut self, commit: NewCommit) -> Result<Committed, StoreError>;

    /// Sets the public posting key of the group's current epoch (`None`: no unattributed posts
    /// until the next). `NotFound` if there is no such group, `EpochMismatch` unless the group
    /// is at `epoch`.
    fn set_posting_key(
        &mut self,
        group_id: &GroupId,
        epoch: Epoch,
        posting_key: Option<[u8; 32]>,
    ) -> Result<(), StoreError>;

    /// Appends an application message whose poster is not known: it is accepted if
    /// `signature` verifies under the group's posting key for `epoch` (PROTOCOL.md §4.4).
    /// `NotFound` if there is no such group, `EpochMismatch` if `epoch` is not the current
    /// one, `Forbidden` if the epoch has no posting key or the signature does not verify.
    #[allow(clippy::too_many_arguments)] // One per field of the request.
    fn append_unattributed(
        &mut self,
        group_id: &GroupId,
        epoch: Epoch,
        payload: Vec<u8>,
        expires_at: Option<u64>,
        signed_expires_at: u64,
        signature: &[u8],
        now: u64,
    ) -> Result<Appended, StoreError>;

    /// Ends a device's membership of a group. `Forbidden` if it is not a member.
    fn leave_group(&mut self, group_id: &GroupId, device_id: &DeviceId) -> Result<(), StoreError>;

    /// Appends to a group log. `NotFound` if there is no such group, `Forbidden` if the poster
    /// is not a member, `EpochMismatch` if `epoch` is not the group's current one. A commit
    /// moves the group to `epoch + 1`. Sequence numbers start at 1 and never repeat. An entry
    /// with `expires_at` (Unix seconds) is no longer handed out from then on, and `expire`
    /// deletes it.
    #[allow(clippy::too_many_arguments)] // One per column of the entry.
    fn append(
        &mut self,
        group_id: &GroupId,
        poster: &DeviceId,
        epoch: Epoch,
        kind: EntryKind,
        payload: Vec<u8>,
        expires_at: Option<u64>,
        now: u64,
    ) -> Result<Appended, StoreError>;

    /// Up to `limit` entries after `after_seq` that have not expired at `now`, oldest first.
    /// `Forbidden` for non-members.
    fn group_entries(
        &mut self,
        group_id: &GroupId,
        device_id: &DeviceId,
        after_seq: u64,
        limit: usize,
        now: u64,
    ) -> Result<Vec<LogEntry>, StoreError>;

    /// The groups a device is a member of, with its cursor in each.
    fn memberships(&mut self, device_id: &DeviceId) -> Result<Vec<Membership>, StoreError>;

    /// Records that `device_id` has everything up to `seq` (clamped to the last entry), then
    /// deletes the entries every member has. `Forbidden` for non-members.
    fn ack_group(
        &mut self,
        device_id: &DeviceId,
        group_id: &GroupId,
        seq: u64,
    ) -> Result<(), StoreError>;

    /// Up to `limit` unacknowledged inbox entries of a device after `after_seq`, oldest first.
    fn inbox_entries(
        &mut self,
        device_id: &DeviceId,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<InboxEntry>, StoreError>;

    /// Deletes a device's inbox entries up to and including `seq`.
    fn ack_inbox(&mut self, device_id: &DeviceId, seq: u64) -> Result<(), StoreError>;

    /// Deletes log and inbox entries stored before `cutoff`, log entries, invites, grants,
    /// blobs (but an account's backup segments) and linking mailboxes that expired before `now`,
    /// accounts inactive for longer than
    /// their lifetime, blobs whose group has no member left, and unfinished blobs created more than a day before
    /// `now` (they go once their whole hour of creation is: late rather than early, so that no
    /// upload in progress loses its blob). Returns how many rows went.
    fn expire(&mut self, now: u64, cutoff: u64) -> Result<u64, StoreError>;

    /// Records a new, empty blob of a group or, without one, of the uploader's account.
    /// `NotFound` if the group or the uploader device does not exist, `Forbidden` if the
    /// uploader is not a member of the group, `AlreadyExists` if the
    /// id is taken, `QuotaExceeded` if the sizes of the uploader's account's blobs plus `size`
    /// would exceed `quota_bytes` or the account already has `max_blobs` blobs. A blob counts until `expire` or `delete_account` deletes it,
    /// as its bytes take space until then.
    fn create_blob(&mut self, blob: NewBlob, quota_bytes: u64) -> Result<(), StoreError>;

    /// A blob, for a device allowed to see it: its uploader, a current member of its group or,
    /// for a blob of an account, a registered device of that account. `NotFound` if there is
    /// no such blob or it has expired at `now` (an account's backup segments do not expire);
    /// `Forbidden` for anyone else.
    fn blob(
        &mut self,
        blob_id: &BlobId,
        device: &DeviceId,
        now: u64,
    ) -> Result<BlobRecord, StoreError>;

    /// Records that `length` bytes of the blob are durably stored. `NotFound` if there is no
    /// such blob, `Forbidden` unless `uploader` uploaded it, `Invalid` if `length` is larger
    /// than its size or smaller than the length already recorded.
    fn set_blob_length(
        &mut self,
        blob_id: &BlobId,
        uploader: &DeviceId,
        length: u64,
    ) -> Result<(), StoreError>;

    /// The ids of every blob that exists (for removing files whose row is gone), expired ones
    /// included until `expire` deletes them, in ascending order.
    fn live_blob_ids(&mut self) -> Result<Vec<BlobId>, StoreError>;
}

/// The checks of [`Store::append_unattributed`], given the group's current epoch and posting
/// key: the post must be for the current epoch and signed with its key.
#[allow(clippy::too_many_arguments)] // The stored state, then the request's fields.
fn check_unattributed(
    group_id: &GroupId,
    current: Epoch,
    posting_key: Option<[u8; 32]>,
    epoch: Epoch,
    signed_expires_at: u64,
    payload: &[u8],
    signature: &[u8],
) -> Result<(), StoreError> {
    if current != epoch {
        return Err(StoreError::EpochMismatch { current });
    }
    let Some(posting_key) = posting_key else {
        return Err(StoreError::Forbidden);
    };
    if !miyu_proto::cert::verify_group_post(
        &posting_key,
        group_id.as_bytes(),
        epoch.0,
        signed_expires_at,
        payload,
        signature,
    ) {
        return Err(StoreError::Forbidden);
    }
    Ok(())
}

/// The identity key of `account_id` as the certificate (compact form) of one of its devices
/// names it.
fn identity_key_of(
    requester_certificate: &[u8],
    account_id: &AccountId,
) -> Result<[u8; 32], StoreError> {
    let identity_key: [u8; 32] = requester_certificate
        .get(..32)
        .and_then(|bytes| bytes.try_into().ok())
        .ok_or(StoreError::Corrupt("a stored certificate is too short"))?;
    if AccountId::from_identity_key(&identity_key) != *account_id {
        return Err(StoreError::Corrupt(
            "a stored certificate names another account's identity key",
        ));
    }
    Ok(identity_key)
}

/// The signature check of [`Store::revoke_device`]: the requester's certificate (compact form)
/// names the account's identity key, which must have signed the revocation.
fn check_revocation(
    requester_certificate: &[u8],
    account_id: &AccountId,
    device_id: &DeviceId,
    signature: &[u8],
) -> Result<(), StoreError> {
    let identity_key = identity_key_of(requester_certificate, account_id)?;
    if !miyu_proto::cert::verify_revocation(&identity_key, device_id, signature) {
        return Err(StoreError::AuthenticationFailed);
    }
    Ok(())
}

/// The signature check of [`Store::set_recovery`], as for a revocation.
fn check_recovery(
    requester_certificate: &[u8],
    account_id: &AccountId,
    recovery: &NewRecovery,
) -> Result<(), StoreError> {
    let identity_key = identity_key_of(requester_certificate, account_id)?;
    if !miyu_proto::cert::verify_recovery(
        &identity_key,
        &recovery.verifier,
        &recovery.locator,
        &recovery.bundle,
        &recovery.signature,
    ) {
        return Err(StoreError::AuthenticationFailed);
    }
    Ok(())
}

/// The failed recovery attempts of an account in its current window; both backends store
/// these two numbers and let this decide.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct RecoveryFailures {
    count: u32,
    /// Unix seconds, on the hour; 0 when no window was ever opened.
    window_ends_at: u64,
}

impl RecoveryFailures {
    /// True when no attempt may be made at `now`.
    fn locked(&self, now: u64) -> bool {
        now < self.window_ends_at && self.count >= MAX_RECOVERY_FAILURES
    }

    /// Counts one more failure at `now`, in the open window or in a new one.
    fn counted(self, now: u64) -> Self {
        if now < self.window_ends_at {
            Self {
                count: self.count.saturating_add(1),
                ..self
            }
        } else {
            Self {
                count: 1,
                window_ends_at: coarse_hour(now)
                    .saturating_add(3600)
                    .saturating_add(RECOVERY_WINDOW),
            }
        }
    }
}

/// What [`Store::recover`] does, decided on the stored verifier and failures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RecoveryDecision {
    /// Refuse without checking the key.
    Locked,
    /// Refuse, and store these failures.
    WrongKey(RecoveryFailures),
    /// Hand the bundle out.
    Granted,
}

fn decide_recovery(
    verifier: &[u8],
    failures: RecoveryFailures,
    auth_key: &[u8; 32],
    now: u64,
) -> Result<RecoveryDecision, StoreError> {
    use sha2::{Digest, Sha256};
    use subtle::ConstantTimeEq;
    let verifier: &[u8; 32] = verifier
        .try_into()
        .map_err(|_| StoreError::Corrupt("a stored recovery verifier has the wrong length"))?;
    if failures.locked(now) {
        return Ok(RecoveryDecision::Locked);
    }
    if bool::from(Sha256::digest(auth_key).ct_eq(verifier)) {
        Ok(RecoveryDecision::Granted)
    } else {
        Ok(RecoveryDecision::WrongKey(failures.counted(now)))
    }
}

/// What [`Store::set_backup`] makes of the account's `chain`, given the record of the
/// segment's blob: the chain to store and the blobs that leave it. Both backends store the
/// chain and let this decide.
fn next_backup_chain(
    chain: &[BackupSegment],
    blob: Option<&BlobRecord>,
    account_id: &AccountId,
    segment: BackupSegment,
    append_after: Option<&BlobId>,
    now: u64,
) -> Result<(Vec<BackupSegment>, Vec<BlobId>), StoreError> {
    let in_chain = chain.iter().any(|kept| kept.blob_id == segment.blob_id);
    if let Some(after) = append_after {
        if chain.last().map(|last| &last.blob_id) != Some(after) {
            return Err(StoreError::NotFound);
        }
        if in_chain {
            return Err(StoreError::Invalid("that blob is in the backup already"));
        }
        if chain.len() >= MAX_BACKUP_SEGMENTS {
            return Err(StoreError::Invalid(
                "the backup has 64 segments, the most it may have: send a whole backup",
            ));
        }
    }
    // A segment replacing the chain it is in may have outlived its expiry.
    let fits = blob.is_some_and(|blob| {
        blob.account_id == *account_id
            && blob.group_id.is_none()
            && blob.length == blob.size
            && (blob.expires_at > now || (in_chain && append_after.is_none()))
    });
    if !fits {
        return Err(StoreError::NotFound);
    }
    if append_after.is_some() {
        let mut longer = chain.to_vec();
        longer.push(segment);
        return Ok((longer, Vec::new()));
    }
    let replaced = chain
        .iter()
        .map(|kept| kept.blob_id)
        .filter(|blob_id| *blob_id != segment.blob_id)
        .collect();
    Ok((vec![segment], replaced))
}

/// The checks of [`Store::commit_members`] that need no stored data.
fn check_commit_shape(commit: &NewCommit) -> Result<(), StoreError> {
    use std::collections::BTreeSet;
    let added: BTreeSet<&DeviceId> = commit.add.iter().collect();
    let removed: BTreeSet<&DeviceId> = commit.remove.iter().collect();
    if added.len() != commit.add.len() || removed.len() != commit.remove.len() {
        return Err(StoreError::Invalid("a device is named twice"));
    }
    if added.iter().any(|device| removed.contains(device)) {
        return Err(StoreError::Invalid(
            "a device cannot be added and removed at once",
        ));
    }
    if removed.contains(&commit.committer) || added.contains(&commit.committer) {
        return Err(StoreError::Invalid(
            "a commit cannot add or remove its committer",
        ));
    }
    if commit
        .welcomes
        .iter()
        .any(|(device, _)| !added.contains(device))
    {
        return Err(StoreError::Forbidden);
    }
    Ok(())
}

/// How long an account may stay inactive unless its owner chose otherwise.
pub const DEFAULT_LIFETIME_DAYS: u32 = 365;

/// How long an upload may stay unfinished before `expire` deletes its blob.
const UNFINISHED_BLOB_LIFETIME: u64 = 24 * 3600;

/// The rule both backends apply in [`Store::set_blob_length`]: a length only grows, up to the
/// size, so that a retried write never hides bytes already acknowledged.
fn check_blob_length(size: u64, recorded: u64, length: u64) -> Result<(), StoreError> {
    if length > size {
        return Err(StoreError::Invalid("a blob cannot grow beyond its size"));
    }
    if length < recorded {
        return Err(StoreError::Invalid("a blob's stored length cannot shrink"));
    }
    Ok(())
}

/// Rounds a time down to the day: how precisely account activity is kept.
pub fn coarse_day(unix_seconds: u64) -> u64 {
    unix_seconds - unix_seconds % 86_400
}

/// Days since the Unix epoch of a time.
fn day_number(unix_seconds: u64) -> u64 {
    unix_seconds / 86_400
}

/// Rounds a time down to the hour, the only resolution the server keeps.
pub fn coarse_hour(unix_seconds: u64) -> u64 {
    unix_seconds - unix_seconds % 3600
}
