//! The one suite every [`Store`] backend must pass: each test states a behaviour of the contract
//! in `mod.rs` and runs once per backend, as `sqlite::<behaviour>` and `memory::<behaviour>`.

use miyu_proto::{AccountId, DeviceId, Epoch, GroupId};

use super::memory::MemoryStore;
use super::sqlite::SqliteStore;
use super::{
    BackupSegment, BlobId, BlobRecord, ClaimedKeyPackage, DeviceRecord, EntryKind, GroupCreated,
    InboxEntry, LogEntry, MAX_BACKUP_SEGMENTS, Membership, NewBlob, NewCommit, NewDevice, NewGroup,
    NewRecovery, Recovery, RecoveryBundle, Store, StoreError,
};

macro_rules! conformance_suite {
    ($($behaviour:ident)*) => {
        mod sqlite {
            $(
                #[test]
                fn $behaviour() -> super::Outcome {
                    let mut store = super::SqliteStore::open_in_memory()?;
                    super::$behaviour(&mut store)
                }
            )*
        }

        mod memory {
            $(
                #[test]
                fn $behaviour() -> super::Outcome {
                    super::$behaviour(&mut super::MemoryStore::default())
                }
            )*
        }
    };
}

conformance_suite! {
    a_registered_device_can_be_looked_up
    registering_a_taken_device_id_fails_and_keeps_the_first
    key_package_count_counts_one_time_packages_only
    a_claim_hands_out_one_time_packages_oldest_first_then_keeps_the_last_resort
    adding_a_last_resort_package_replaces_the_old_one
    a_device_without_key_packages_is_left_out_of_a_claim
    claiming_consumes_the_invite
    an_invite_for_several_uses_is_gone_after_the_last
    an_expired_invite_is_not_found
    creating_an_invite_twice_fails
    a_claim_returns_one_key_package_per_device_of_the_account
    an_unknown_device_cannot_claim
    creating_a_group_needs_a_grant_for_every_other_member
    a_grant_is_consumed_by_the_group_it_is_used_for
    a_grant_lasts_a_day
    a_grant_belongs_to_its_claimer
    welcomes_land_in_the_inboxes_of_members
    a_welcome_to_a_non_member_is_forbidden_and_consumes_no_grant
    creating_an_existing_group_fails
    appending_to_an_unknown_group_is_not_found
    appending_as_a_non_member_is_forbidden
    an_application_message_at_another_epoch_is_refused_with_the_current_one
    commits_are_compare_and_swap
    the_epoch_cannot_advance_past_the_largest
    sequence_numbers_start_at_one_and_never_repeat
    an_append_reports_every_member
    group_entries_come_after_the_cursor_oldest_first_up_to_the_limit
    group_entries_are_forbidden_to_non_members
    memberships_list_each_group_with_its_cursor
    an_entry_is_deleted_once_every_member_acknowledged_it
    an_acknowledgement_is_clamped_to_the_last_entry
    a_cursor_never_moves_back
    acknowledging_as_a_non_member_is_forbidden
    inbox_entries_come_oldest_first_and_go_when_acknowledged
    expire_deletes_old_entries_and_expired_invites_and_grants
    expire_keeps_entries_of_the_cutoff_hour
    a_disappearing_entry_is_not_handed_out_after_it_expires_and_expire_deletes_it
    a_username_lookup_claims_key_packages_and_grants_like_an_invite
    a_username_belongs_to_one_account_at_a_time
    withdrawing_a_username_makes_it_unknown_and_free
    deleting_an_account_leaves_nothing_of_it_and_the_others_carry_on
    an_account_inactive_past_its_lifetime_is_deleted_by_expire
    a_failed_operation_leaves_no_trace_while_the_rest_of_the_batch_commits
    a_blob_is_seen_by_its_uploader_and_the_other_members_of_its_group
    a_blob_is_forbidden_to_non_members
    unknown_groups_uploaders_and_blobs_are_not_found
    creating_a_blob_with_a_taken_id_fails_and_keeps_the_first
    the_quota_counts_every_blob_of_the_uploaders_account_and_no_other
    an_account_may_hold_only_so_many_blobs_however_small
    a_blob_length_only_grows_up_to_the_size_and_only_by_its_uploader
    an_expired_blob_is_not_found_and_expire_deletes_it
    expire_deletes_blobs_left_unfinished_for_a_day
    expire_deletes_blobs_of_a_group_without_members
    deleting_an_account_deletes_the_blobs_of_all_its_devices_and_no_others
    live_blob_ids_lists_every_blob_finished_or_not_in_order
    key_packages_of_a_contact_can_be_claimed_only_by_who_shares_a_group_with_it
    a_member_commit_adds_and_removes_devices_at_the_next_epoch
    a_member_commit_is_compare_and_swap_and_a_failed_one_changes_nothing
    adding_a_device_needs_a_grant_and_welcomes_go_only_to_added_devices
    a_member_commit_refuses_impossible_changes
    a_device_that_leaves_gets_nothing_more_and_no_longer_holds_entries_back
    an_unattributed_post_needs_the_posting_key_of_the_current_epoch
    a_removed_device_can_be_added_again_once_it_read_its_removal
    one_shared_welcome_reaches_every_new_member_but_the_poster
    a_linking_mailbox_is_taken_once
    a_linking_mailbox_holds_one_message_until_it_expires_and_expire_deletes_it
    an_accounts_devices_are_listed_with_the_days_they_registered_and_were_last_active
    a_revocation_needs_a_device_of_the_account_and_its_identity_keys_signature
    a_revoked_device_loses_its_rows_and_groups_and_can_never_register_again
    revoked_devices_are_forgotten_with_their_account
    own_devices_are_claimed_without_a_shared_group_and_without_the_claimer
    own_devices_are_added_to_groups_without_a_grant
    a_commit_removes_no_registered_device_of_its_committers_account
    an_account_blob_is_seen_by_the_accounts_registered_devices_only
    account_blobs_count_against_the_quota_expire_and_go_with_the_account
    a_recovery_bundle_is_found_by_its_locator_for_the_right_key_and_replaced_by_the_next
    only_the_accounts_identity_key_sets_its_recovery_bundle
    wrong_recovery_keys_lock_the_bundle_for_a_day_even_against_the_right_key
    setting_the_recovery_again_forgets_the_failures
    recovering_at_an_unknown_locator_is_not_found_and_counts_nothing
    a_backup_is_a_finished_unexpired_blob_of_the_account_and_of_no_group
    naming_another_backup_deletes_the_one_before
    the_backup_outlives_its_expiry_while_it_is_named
    recovery_and_backup_go_with_the_account
    segments_are_appended_in_order_after_the_last_one_named
    a_whole_backup_replaces_the_chain_and_deletes_its_segments
    a_backup_holds_at_most_64_segments
    every_segment_outlives_its_expiry_and_goes_with_the_account
}

/// What the suite needs beyond the contract: a state that no operation reaches yet.
trait Backend: Store {
    /// Removes every member of a group, as if each had left it.
    fn empty_group(&mut self, group_id: &GroupId) -> Outcome;
}

impl Backend for SqliteStore {
    fn empty_group(&mut self, group_id: &GroupId) -> Outcome {
        self.remove_group_members(group_id)
    }
}

impl Backend for MemoryStore {
    fn empty_group(&mut self, group_id: &GroupId) -> Outcome {
        self.remove_group_members(group_id);
        Ok(())
    }
}

type Outcome = Result<(), StoreError>;

/// On an hour boundary, so that the stored coarse times are exact.
const NOW: u64 = 1_699_999_200;
const HOUR: u64 = 3600;
const DAY: u64 = 24 * HOUR;

fn device(number: u8) -> DeviceId {
    DeviceId::from_device_key(&[number; 32])
}

fn account(number: u8) -> AccountId {
    AccountId::from_identity_key(&[number; 32])
}

fn group(number: u8) -> GroupId {
    GroupId::from_bytes(&[number; 16]).expect("16 bytes make a group id")
}

fn key_package(device: u8, number: u8) -> Vec<u8> {
    vec![b'k', device, number]
}

fn certificate(device: u8) -> Vec<u8> {
    vec![b'c', device]
}

/// Two one-time key packages, numbered 1 and 2, and a last-resort one numbered 0.
fn new_device(number: u8, account_number: u8) -> NewDevice {
    NewDevice {
        device_id: device(number),
        account_id: account(account_number),
        device_key: [number; 32],
        certificate: certificate(number),
        key_packages: vec![key_package(number, 1), key_package(number, 2)],
        last_resort_key_package: Some(key_package(number, 0)),
        now: NOW,
    }
}

fn register(store: &mut dyn Store, numbers: &[u8]) -> Outcome {
    for number in numbers {
        store.register_device(new_device(*number, *number))?;
    }
    Ok(())
}

/// Lets `claimer` add every device of the account numbered `account_number`.
fn claim(
    store: &mut dyn Store,
    claimer: DeviceId,
    account_number: u8,
    token: u8,
) -> Result<Vec<ClaimedKeyPackage>, StoreError> {
    store.create_invite(&account(account_number), [token; 32], NOW + DAY, 1)?;
    store.claim_invite(&[token; 32], &claimer, NOW)
}

fn new_group(number: u8, creator: DeviceId, members: &[DeviceId]) -> NewGroup {
    NewGroup {
        group_id: group(number),
        epoch: Epoch(0),
        creator,
        members: members.to_vec(),
        welcomes: Vec::new(),
        welcome: None,
        posting_key: None,
        now: NOW,
    }
}

/// Devices 1, 2 and 3, each its own account, in group 1 at epoch 0, created by device 1.
fn group_of_three(store: &mut dyn Store) -> Result<GroupId, StoreError> {
    register(store, &[1, 2, 3])?;
    claim(store, device(1), 2, 2)?;
    claim(store, device(1), 3, 3)?;
    store.create_group(new_group(1, device(1), &[device(2), device(3)]))?;
    store.commit()?;
    Ok(group(1))
}

fn append_message(store: &mut dyn Store, group_id: &GroupId, payload: &[u8]) -> Outcome {
    store.append(
        group_id,
        &device(1),
        Epoch(0),
        EntryKind::Application,
        payload.to_vec(),
        None,
        NOW,
    )?;
    Ok(())
}

/// Plenty for the blobs of one test.
const QUOTA: u64 = 1000;

fn blob_id(number: u8) -> BlobId {
    [number; 32]
}

/// A blob of a group that expires in 30 days.
fn new_blob(number: u8, uploader: DeviceId, group_id: GroupId, size: u64) -> NewBlob {
    NewBlob {
        group_id: Some(group_id),
        ..account_blob(number, uploader, size)
    }
}

/// A blob of the uploader's account that expires in 30 days.
fn account_blob(number: u8, uploader: DeviceId, size: u64) -> NewBlob {
    NewBlob {
        blob_id: blob_id(number),
        uploader,
        group_id: None,
        size,
        expires_at: NOW + 30 * DAY,
        max_blobs: 1000,
        now: NOW,
    }
}

/// `group_of_three`, and device 4, a second device of account 1, in group 2 with device 1.
fn group_of_three_and_a_second_device_of_account_1(store: &mut dyn Store) -> Outcome {
    group_of_three(store)?;
    store.register_device(new_device(4, 1))?;
    claim(store, device(1), 1, 4)?;
    store.create_group(new_group(2, device(1), &[device(4)]))?;
    store.commit()
}

fn seqs(entries: &[LogEntry]) -> Vec<u64> {
    entries.iter().map(|entry| entry.seq).collect()
}

fn sorted(mut devices: Vec<DeviceId>) -> Vec<DeviceId> {
    devices.sort();
    devices
}

fn a_registered_device_can_be_looked_up(store: &mut dyn Store) -> Outcome {
    register(store, &[1])?;
    store.commit()?;
    assert_eq!(
        store.device(&device(1))?,
        Some(DeviceRecord {
            device_id: device(1),
            account_id: account(1),
            device_key: [1; 32],
            certificate: certificate(1),
        })
    );
    assert_eq!(store.device(&device(2))?, None);
    Ok(())
}

fn registering_a_taken_device_id_fails_and_keeps_the_first(store: &mut dyn Store) -> Outcome {
    register(store, &[1])?;
    let mut impostor = new_device(1, 9);
    impostor.key_packages = vec![vec![9]; 5];
    assert!(matches!(
        store.register_device(impostor),
        Err(StoreError::AlreadyExists)
    ));
    store.commit()?;
    assert_eq!(
        store.device(&device(1))?.map(|record| record.account_id),
        Some(account(1))
    );
    assert_eq!(store.key_package_count(&device(1))?, 2);
    Ok(())
}

fn key_package_count_counts_one_time_packages_only(store: &mut dyn Store) -> Outcome {
    register(store, &[1])?;
    assert_eq!(store.key_package_count(&device(1))?, 2);
    assert_eq!(
        store.add_key_packages(&device(1), vec![key_package(1, 3)], None)?,
        3
    );
    assert_eq!(
        store.add_key_packages(&device(1), Vec::new(), Some(vec![b'n']))?,
        3
    );
    assert_eq!(store.key_package_count(&device(1))?, 3);
    assert!(matches!(
        store.add_key_packages(&device(2), vec![key_package(2, 1)], None),
        Err(StoreError::NotFound)
    ));
    assert!(matches!(
        store.key_package_count(&device(2)),
        Err(StoreError::NotFound)
    ));
    Ok(())
}

fn a_claim_hands_out_one_time_packages_oldest_first_then_keeps_the_last_resort(
    store: &mut dyn Store,
) -> Outcome {
    register(store, &[1, 2])?;
    let mut handed_out = Vec::new();
    for token in 1..=4 {
        let claimed = claim(store, device(1), 2, token)?;
        assert_eq!(claimed.len(), 1);
        handed_out.push(claimed[0].key_package.clone());
    }
    store.commit()?;
    assert_eq!(
        handed_out,
        [
            key_package(2, 1),
            key_package(2, 2),
            key_package(2, 0),
            key_package(2, 0)
        ]
    );
    assert_eq!(store.key_package_count(&device(2))?, 0);
    Ok(())
}

fn adding_a_last_resort_package_replaces_the_old_one(store: &mut dyn Store) -> Outcome {
    register(store, &[1, 2])?;
    claim(store, device(1), 2, 1)?;
    claim(store, device(1), 2, 2)?;
    assert_eq!(
        store.add_key_packages(&device(2), Vec::new(), Some(vec![b'n']))?,
        0
    );
    for token in [3, 4] {
        let claimed = claim(store, device(1), 2, token)?;
        assert_eq!(claimed.len(), 1);
        assert_eq!(claimed[0].key_package, b"n");
    }
    Ok(())
}

fn a_device_without_key_packages_is_left_out_of_a_claim(store: &mut dyn Store) -> Outcome {
    register(store, &[1])?;
    let mut bare = new_device(2, 2);
    bare.key_packages.clear();
    bare.last_resort_key_package = None;
    store.register_device(bare)?;
    store.register_device(new_device(3, 2))?;
    let claimed = claim(store, device(1), 2, 1)?;
    assert_eq!(
        claimed
            .iter()
            .map(|claimed| claimed.device_id)
            .collect::<Vec<_>>(),
        [device(3)]
    );
    Ok(())
}

fn an_invite_for_several_uses_is_gone_after_the_last(store: &mut dyn Store) -> Outcome {
    register(store, &[1, 2, 3, 4])?;
    store.create_invite(&account(1), [9; 32], NOW + DAY, 2)?;
    assert_eq!(store.claim_invite(&[9; 32], &device(2), NOW)?.len(), 1);
    store.commit()?;
    assert_eq!(store.claim_invite(&[9; 32], &device(3), NOW)?.len(), 1);
    store.commit()?;
    assert!(matches!(
        store.claim_invite(&[9; 32], &device(4), NOW),
        Err(StoreError::NotFound)
    ));
    Ok(())
}

fn claiming_consumes_the_invite(store: &mut dyn Store) -> Outcome {
    register(store, &[1, 2])?;
    claim(store, device(1), 2, 7)?;
    store.commit()?;
    assert!(matches!(
        store.claim_invite(&[7; 32], &device(1), NOW),
        Err(StoreError::NotFound)
    ));
    assert!(matches!(
        store.claim_invite(&[8; 32], &device(1), NOW),
        Err(StoreError::NotFound)
    ));
    Ok(())
}

fn an_expired_invite_is_not_found(store: &mut dyn Store) -> Outcome {
    register(store, &[1, 2])?;
    store.create_invite(&account(2), [7; 32], NOW + HOUR, 1)?;
    assert!(matches!(
        store.claim_invite(&[7; 32], &device(1), NOW + HOUR),
        Err(StoreError::NotFound)
    ));
    // The refused claim left the invite alone.
    assert_eq!(
        store
            .claim_invite(&[7; 32], &device(1), NOW + HOUR - 1)?
            .len(),
        1
    );
    Ok(())
}

fn creating_an_invite_twice_fails(store: &mut dyn Store) -> Outcome {
    store.create_invite(&account(2), [7; 32], NOW + DAY, 1)?;
    assert!(matches!(
        store.create_invite(&account(3), [7; 32], NOW + DAY, 1),
        Err(StoreError::AlreadyExists)
    ));
    Ok(())
}

fn a_claim_returns_one_key_package_per_device_of_the_account(store: &mut dyn Store) -> Outcome {
    register(store, &[1, 4])?;
    store.register_device(new_device(2, 2))?;
    store.register_device(new_device(3, 2))?;
    let claimed = claim(store, device(1), 2, 1)?;
    let mut expected = vec![
        ClaimedKeyPackage {
            device_id: device(2),
            certificate: certificate(2),
            key_package: key_package(2, 1),
        },
        ClaimedKeyPackage {
            device_id: device(3),
            certificate: certificate(3),
            key_package: key_package(3, 1),
        },
    ];
    expected.sort_by_key(|claimed| claimed.device_id);
    assert_eq!(claimed, expected);
    // Both devices may now be added.
    store.create_group(new_group(1, device(1), &[device(2), device(3)]))?;
    Ok(())
}

fn an_unknown_device_cannot_claim(store: &mut dyn Store) -> Outcome {
    register(store, &[1, 2])?;
    store.create_invite(&account(2), [7; 32], NOW + DAY, 1)?;
    assert!(matches!(
        store.claim_invite(&[7; 32], &device(9), NOW),
        Err(StoreError::Forbidden)
    ));
    assert_eq!(store.claim_invite(&[7; 32], &device(1), NOW)?.len(), 1);
    Ok(())
}

fn creating_a_group_needs_a_grant_for_every_other_member(store: &mut dyn Store) -> Outcome {
    register(store, &[1, 2, 3])?;
    claim(store, device(1), 2, 2)?;
    assert!(matches!(
        store.create_group(new_group(1, device(1), &[device(2), device(3)])),
        Err(StoreError::Forbidden)
    ));
    let created = store.create_group(new_group(1, device(1), &[device(2)]))?;
    assert_eq!(created.members, sorted(vec![device(1), device(2)]));
    Ok(())
}

fn a_grant_is_consumed_by_the_group_it_is_used_for(store: &mut dyn Store) -> Outcome {
    register(store, &[1, 2])?;
    claim(store, device(1), 2, 1)?;
    store.create_group(new_group(1, device(1), &[device(2)]))?;
    assert!(matches!(
        store.create_group(new_group(2, device(1), &[device(2)])),
        Err(StoreError::Forbidden)
    ));
    claim(store, device(1), 2, 2)?;
    store.create_group(new_group(2, device(1), &[device(2)]))?;
    Ok(())
}

fn a_grant_lasts_a_day(store: &mut dyn Store) -> Outcome {
    register(store, &[1, 2])?;
    claim(store, device(1), 2, 1)?;
    let mut late = new_group(1, device(1), &[device(2)]);
    late.now = NOW + DAY;
    assert!(matches!(
        store.create_group(late),
        Err(StoreError::Forbidden)
    ));
    let mut in_time = new_group(1, device(1), &[device(2)]);
    in_time.now = NOW + DAY - 1;
    store.create_group(in_time)?;
    Ok(())
}

fn a_grant_belongs_to_its_claimer(store: &mut dyn Store) -> Outcome {
    register(store, &[1, 2, 3])?;
    claim(store, device(1), 2, 1)?;
    assert!(matches!(
        store.create_group(new_group(1, device(3), &[device(2)])),
        Err(StoreError::Forbidden)
    ));
    Ok(())
}

fn welcomes_land_in_the_inboxes_of_members(store: &mut dyn Store) -> Outcome {
    register(store, &[1, 2, 3])?;
    claim(store, device(1), 2, 2)?;
    claim(store, device(1), 3, 3)?;
    let mut new = new_group(1, device(1), &[device(2), device(3)]);
    new.welcomes = vec![
        (device(2), b"welcome 2".to_vec()),
        (device(3), b"welcome 3".to_vec()),
    ];
    let created = store.create_group(new)?;
    store.commit()?;
    assert_eq!(
        created,
        GroupCreated {
            members: sorted(vec![device(1), device(2), device(3)]),
            welcomed: sorted(vec![device(2), device(3)]),
        }
    );
    for number in [2, 3] {
        assert_eq!(
            store.inbox_entries(&device(number), 0, 10)?,
            [InboxEntry {
                seq: 1,
                payload: format!("welcome {number}").into_bytes(),
            }]
        );
    }
    assert!(store.inbox_entries(&device(1), 0, 10)?.is_empty());
    Ok(())
}

fn a_welcome_to_a_non_member_is_forbidden_and_consumes_no_grant(store: &mut dyn Store) -> Outcome {
    register(store, &[1, 2, 3])?;
    claim(store, device(1), 2, 2)?;
    let mut new = new_group(1, device(1), &[device(2)]);
    new.welcomes = vec![
        (device(2), b"welcome".to_vec()),
        (device(3), b"stray".to_vec()),
    ];
    assert!(matches!(
        store.create_group(new),
        Err(StoreError::Forbidden)
    ));
    assert!(store.inbox_entries(&device(2), 0, 10)?.is_empty());
    assert!(store.inbox_entries(&device(3), 0, 10)?.is_empty());
    assert!(store.memberships(&device(1))?.is_empty());
    store.create_group(new_group(1, device(1), &[device(2)]))?;
    Ok(())
}

fn creating_an_existing_group_fails(store: &mut dyn Store) -> Outcome {
    let group_id = group_of_three(store)?;
    register(store, &[4])?;
    claim(store, device(1), 4, 4)?;
    let mut again = new_group(1, device(1), &[device(4)]);
    again.welcomes = vec![(device(4), b"welcome".to_vec())];
    assert!(matches!(
        store.create_group(again),
        Err(StoreError::AlreadyExists)
    ));
    assert!(store.memberships(&device(4))?.is_empty());
    assert!(store.inbox_entries(&device(4), 0, 10)?.is_empty());
    let appended = store.append(
        &group_id,
        &device(1),
        Epoch(0),
        EntryKind::Application,
        b"hello".to_vec(),
        None,
        NOW,
    )?;
    assert_eq!(
        appended.members,
        sorted(vec![device(1), device(2), device(3)])
    );
    // The grant was not used up by the refused creation.
    store.create_group(new_group(2, device(1), &[device(4)]))?;
    Ok(())
}

fn appending_to_an_unknown_group_is_not_found(store: &mut dyn Store) -> Outcome {
    group_of_three(store)?;
    assert!(matches!(
        store.append(
            &group(9),
            &device(1),
            Epoch(0),
            EntryKind::Application,
            b"hello".to_vec(),
            None,
            NOW
        ),
        Err(StoreError::NotFound)
    ));
    Ok(())
}

fn appending_as_a_non_member_is_forbidden(store: &mut dyn Store) -> Outcome {
    let group_id = group_of_three(store)?;
    register(store, &[4])?;
    assert!(matches!(
        store.append(
            &group_id,
            &device(4),
            Epoch(0),
            EntryKind::Application,
            b"hello".to_vec(),
            None,
            NOW
        ),
        Err(StoreError::Forbidden)
    ));
    assert!(
        store
            .group_entries(&group_id, &device(1), 0, 10, NOW)?
            .is_empty()
    );
    Ok(())
}

fn an_application_message_at_another_epoch_is_refused_with_the_current_one(
    store: &mut dyn Store,
) -> Outcome {
    register(store, &[1])?;
    let mut new = new_group(1, device(1), &[]);
    new.epoch = Epoch(5);
    store.create_group(new)?;
    for wrong in [4, 6] {
        assert!(matches!(
            store.append(
                &group(1),
                &device(1),
                Epoch(wrong),
                EntryKind::Application,
                b"hello".to_vec(),
                None,
                NOW
            ),
            Err(StoreError::EpochMismatch { current: Epoch(5) })
        ));
    }
    let appended = store.append(
        &group(1),
        &device(1),
        Epoch(5),
        EntryKind::Application,
        b"hello".to_vec(),
        None,
        NOW,
    )?;
    assert_eq!(appended.seq, 1);
    Ok(())
}

fn commits_are_compare_and_swap(store: &mut dyn Store) -> Outcome {
    let group_id = group_of_three(store)?;
    store.append(
        &group_id,
        &device(1),
        Epoch(0),
        EntryKind::Commit,
        b"commit by 1".to_vec(),
        None,
        NOW,
    )?;
    assert!(matches!(
        store.append(
            &group_id,
            &device(2),
            Epoch(0),
            EntryKind::Commit,
            b"commit by 2".to_vec(),
            None,
            NOW
        ),
        Err(StoreError::EpochMismatch { current: Epoch(1) })
    ));
    store.append(
        &group_id,
        &device(2),
        Epoch(1),
        EntryKind::Application,
        b"after".to_vec(),
        None,
        NOW,
    )?;
    store.commit()?;
    assert_eq!(
        store.group_entries(&group_id, &device(3), 0, 10, NOW)?,
        [
            LogEntry {
                seq: 1,
                epoch: Epoch(0),
                kind: EntryKind::Commit,
                payload: b"commit by 1".to_vec(),
            },
            LogEntry {
                seq: 2,
                epoch: Epoch(1),
                kind: EntryKind::Application,
                payload: b"after".to_vec(),
            },
        ]
    );
    Ok(())
}

fn the_epoch_cannot_advance_past_the_largest(store: &mut dyn Store) -> Outcome {
    register(store, &[1])?;
    let mut new = new_group(1, device(1), &[]);
    new.epoch = Epoch(u64::MAX);
    store.create_group(new)?;
    store.append(
        &group(1),
        &device(1),
        Epoch(u64::MAX),
        EntryKind::Application,
        b"hello".to_vec(),
        None,
        NOW,
    )?;
    assert!(matches!(
        store.append(
            &group(1),
            &device(1),
            Epoch(u64::MAX),
            EntryKind::Commit,
            b"commit".to_vec(),
            None,
            NOW
        ),
        Err(StoreError::Invalid(_))
    ));
    let entries = store.group_entries(&group(1), &device(1), 0, 10, NOW)?;
    assert_eq!(seqs(&entries), [1]);
    assert_eq!(entries[0].epoch, Epoch(u64::MAX));
    Ok(())
}

fn sequence_numbers_start_at_one_and_never_repeat(store: &mut dyn Store) -> Outcome {
    let group_id = group_of_three(store)?;
    for expected in 1..=3 {
        let appended = store.append(
            &group_id,
            &device(1),
            Epoch(0),
            EntryKind::Application,
            b"hello".to_vec(),
            None,
            NOW,
        )?;
        assert_eq!(appended.seq, expected);
    }
    for number in [1, 2, 3] {
        store.ack_group(&device(number), &group_id, 3)?;
    }
    store.commit()?;
    assert!(
        store
            .group_entries(&group_id, &device(1), 0, 10, NOW)?
            .is_empty()
    );
    let appended = store.append(
        &group_id,
        &device(1),
        Epoch(0),
        EntryKind::Application,
        b"hello".to_vec(),
        None,
        NOW,
    )?;
    assert_eq!(appended.seq, 4);
    Ok(())
}

fn an_append_reports_every_member(store: &mut dyn Store) -> Outcome {
    let group_id = group_of_three(store)?;
    let appended = store.append(
        &group_id,
        &device(2),
        Epoch(0),
        EntryKind::Application,
        b"hello".to_vec(),
        None,
        NOW,
    )?;
    assert_eq!(
        appended.members,
        sorted(vec![device(1), device(2), device(3)])
    );
    Ok(())
}

fn group_entries_come_after_the_cursor_oldest_first_up_to_the_limit(
    store: &mut dyn Store,
) -> Outcome {
    let group_id = group_of_three(store)?;
    for number in 1..=5u8 {
        append_message(store, &group_id, &[number])?;
    }
    store.commit()?;
    let entries = store.group_entries(&group_id, &device(2), 1, 2, NOW)?;
    assert_eq!(seqs(&entries), [2, 3]);
    assert_eq!(entries[0].payload, [2]);
    assert_eq!(entries[0].kind, EntryKind::Application);
    assert_eq!(entries[0].epoch, Epoch(0));
    assert_eq!(
        seqs(&store.group_entries(&group_id, &device(2), 3, 10, NOW)?),
        [4, 5]
    );
    assert!(
        store
            .group_entries(&group_id, &device(2), 5, 10, NOW)?
            .is_empty()
    );
    assert!(
        store
            .group_entries(&group_id, &device(2), 0, 0, NOW)?
            .is_empty()
    );
    assert!(
        store
            .group_entries(&group_id, &device(2), u64::MAX, 10, NOW)?
            .is_empty()
    );
    Ok(())
}

fn group_entries_are_forbidden_to_non_members(store: &mut dyn Store) -> Outcome {
    let group_id = group_of_three(store)?;
    append_message(store, &group_id, b"secret")?;
    register(store, &[4])?;
    assert!(matches!(
        store.group_entries(&group_id, &device(4), 0, 10, NOW),
        Err(StoreError::Forbidden)
    ));
    assert!(matches!(
        store.group_entries(&group(9), &device(1), 0, 10, NOW),
        Err(StoreError::Forbidden)
    ));
    Ok(())
}

fn memberships_list_each_group_with_its_cursor(store: &mut dyn Store) -> Outcome {
    let first = group_of_three(store)?;
    claim(store, device(1), 2, 4)?;
    store.create_group(new_group(2, device(1), &[device(2)]))?;
    append_message(store, &first, b"hello")?;
    store.ack_group(&device(2), &first, 1)?;
    store.commit()?;
    let mut expected = vec![
        Membership {
            group_id: first,
            cursor: 1,
        },
        Membership {
            group_id: group(2),
            cursor: 0,
        },
    ];
    expected.sort_by(|one, other| one.group_id.cmp(&other.group_id));
    assert_eq!(store.memberships(&device(2))?, expected);
    assert_eq!(store.memberships(&device(3))?.len(), 1);
    assert!(store.memberships(&device(9))?.is_empty());
    Ok(())
}

fn an_entry_is_deleted_once_every_member_acknowledged_it(store: &mut dyn Store) -> Outcome {
    let group_id = group_of_three(store)?;
    for number in 1..=3u8 {
        append_message(store, &group_id, &[number])?;
    }
    store.ack_group(&device(1), &group_id, 3)?;
    store.ack_group(&device(2), &group_id, 2)?;
    store.commit()?;
    assert_eq!(
        seqs(&store.group_entries(&group_id, &device(3), 0, 10, NOW)?),
        [1, 2, 3]
    );
    store.ack_group(&device(3), &group_id, 1)?;
    assert_eq!(
        seqs(&store.group_entries(&group_id, &device(3), 0, 10, NOW)?),
        [2, 3]
    );
    store.ack_group(&device(3), &group_id, 3)?;
    store.commit()?;
    assert_eq!(
        seqs(&store.group_entries(&group_id, &device(2), 0, 10, NOW)?),
        [3]
    );
    Ok(())
}

fn an_acknowledgement_is_clamped_to_the_last_entry(store: &mut dyn Store) -> Outcome {
    let group_id = group_of_three(store)?;
    append_message(store, &group_id, b"one")?;
    append_message(store, &group_id, b"two")?;
    store.ack_group(&device(1), &group_id, u64::MAX)?;
    assert_eq!(store.memberships(&device(1))?[0].cursor, 2);
    append_message(store, &group_id, b"three")?;
    store.commit()?;
    // Had the cursor gone past the last entry, this one would count as read already.
    assert_eq!(
        seqs(&store.group_entries(&group_id, &device(1), 2, 10, NOW)?),
        [3]
    );
    for number in [2, 3] {
        store.ack_group(&device(number), &group_id, 3)?;
    }
    assert_eq!(
        seqs(&store.group_entries(&group_id, &device(1), 0, 10, NOW)?),
        [3]
    );
    Ok(())
}

fn a_cursor_never_moves_back(store: &mut dyn Store) -> Outcome {
    let group_id = group_of_three(store)?;
    append_message(store, &group_id, b"one")?;
    append_message(store, &group_id, b"two")?;
    store.ack_group(&device(2), &group_id, 2)?;
    store.ack_group(&device(2), &group_id, 1)?;
    assert_eq!(store.memberships(&device(2))?[0].cursor, 2);
    Ok(())
}

fn acknowledging_as_a_non_member_is_forbidden(store: &mut dyn Store) -> Outcome {
    let group_id = group_of_three(store)?;
    append_message(store, &group_id, b"one")?;
    register(store, &[4])?;
    assert!(matches!(
        store.ack_group(&device(4), &group_id, 1),
        Err(StoreError::Forbidden)
    ));
    assert!(matches!(
        store.ack_group(&device(1), &group(9), 1),
        Err(StoreError::Forbidden)
    ));
    Ok(())
}

fn inbox_entries_come_oldest_first_and_go_when_acknowledged(store: &mut dyn Store) -> Outcome {
    fn welcome_to_2(store: &mut dyn Store, number: u8) -> Outcome {
        claim(store, device(1), 2, number)?;
        let mut new = new_group(number, device(1), &[device(2)]);
        new.welcomes = vec![(device(2), vec![number])];
        store.create_group(new)?;
        Ok(())
    }

    register(store, &[1, 2])?;
    for number in 1..=3 {
        welcome_to_2(store, number)?;
    }
    store.commit()?;
    assert_eq!(
        store.inbox_entries(&device(2), 1, 1)?,
        [InboxEntry {
            seq: 2,
            payload: vec![2],
        }]
    );
    store.ack_inbox(&device(2), 2)?;
    assert_eq!(
        store.inbox_entries(&device(2), 0, 10)?,
        [InboxEntry {
            seq: 3,
            payload: vec![3],
        }]
    );
    store.ack_inbox(&device(2), u64::MAX)?;
    assert!(store.inbox_entries(&device(2), 0, 10)?.is_empty());
    welcome_to_2(store, 4)?;
    store.commit()?;
    assert_eq!(
        store.inbox_entries(&device(2), 0, 10)?,
        [InboxEntry {
            seq: 4,
            payload: vec![4],
        }]
    );
    assert!(store.inbox_entries(&device(9), 0, 10)?.is_empty());
    store.ack_inbox(&device(9), 1)?;
    Ok(())
}

fn expire_deletes_old_entries_and_expired_invites_and_grants(store: &mut dyn Store) -> Outcome {
    register(store, &[1, 2, 3])?;
    claim(store, device(1), 2, 2)?;
    let mut new = new_group(1, device(1), &[device(2)]);
    new.welcomes = vec![(device(2), b"welcome".to_vec())];
    store.create_group(new)?;
    append_message(store, &group(1), b"old")?;
    store.append(
        &group(1),
        &device(1),
        Epoch(0),
        EntryKind::Application,
        b"new".to_vec(),
        None,
        NOW + 2 * HOUR,
    )?;
    store.create_invite(&account(2), [10; 32], NOW + HOUR, 1)?;
    store.create_invite(&account(2), [11; 32], NOW + 10 * DAY, 1)?;
    claim(store, device(1), 3, 3)?;
    store.commit()?;

    // The old entry, the welcome, one invite and the grant to add device 3.
    assert_eq!(store.expire(NOW + 2 * DAY, NOW + HOUR)?, 4);
    assert_eq!(store.expire(NOW + 2 * DAY, NOW + HOUR)?, 0);
    store.commit()?;
    assert_eq!(
        seqs(&store.group_entries(&group(1), &device(2), 0, 10, NOW)?),
        [2]
    );
    assert!(store.inbox_entries(&device(2), 0, 10)?.is_empty());
    assert!(matches!(
        store.claim_invite(&[10; 32], &device(1), NOW),
        Err(StoreError::NotFound)
    ));
    assert_eq!(store.claim_invite(&[11; 32], &device(1), NOW)?.len(), 1);
    Ok(())
}

/// Only the hour of storage is known, so an entry goes when its whole hour is before the
/// cutoff: early rather than late would lose messages not yet fetched.
fn expire_keeps_entries_of_the_cutoff_hour(store: &mut dyn Store) -> Outcome {
    let group_id = group_of_three(store)?;
    store.append(
        &group_id,
        &device(1),
        Epoch(0),
        EntryKind::Application,
        b"early in the hour".to_vec(),
        None,
        NOW + 60,
    )?;
    assert_eq!(store.expire(NOW, NOW + HOUR - 1)?, 0);
    assert_eq!(store.expire(NOW, NOW + HOUR)?, 1);
    Ok(())
}

fn a_disappearing_entry_is_not_handed_out_after_it_expires_and_expire_deletes_it(
    store: &mut dyn Store,
) -> Outcome {
    let group_id = group_of_three(store)?;
    store.append(
        &group_id,
        &device(1),
        Epoch(0),
        EntryKind::Application,
        b"disappears".to_vec(),
        Some(NOW + 30),
        NOW,
    )?;
    append_message(store, &group_id, b"stays")?;
    store.commit()?;
    assert_eq!(
        seqs(&store.group_entries(&group_id, &device(2), 0, 10, NOW + 29)?),
        [1, 2]
    );
    assert_eq!(
        seqs(&store.group_entries(&group_id, &device(2), 0, 10, NOW + 30)?),
        [2]
    );
    // Undelivered, and long before the retention cutoff: gone all the same.
    assert_eq!(store.expire(NOW + 29, 0)?, 0);
    assert_eq!(store.expire(NOW + 30, 0)?, 1);
    store.commit()?;
    assert_eq!(
        seqs(&store.group_entries(&group_id, &device(3), 0, 10, NOW)?),
        [2]
    );
    Ok(())
}

fn a_username_lookup_claims_key_packages_and_grants_like_an_invite(
    store: &mut dyn Store,
) -> Outcome {
    register(store, &[1, 2])?;
    store.set_username(&account(2), Some([7; 32]))?;
    store.commit()?;
    let claimed = store.claim_username(&[7; 32], &device(1), NOW)?;
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].device_id, device(2));
    assert_eq!(claimed[0].key_package, key_package(2, 1));
    // The name stays published; the next lookup takes the next key package.
    let again = store.claim_username(&[7; 32], &device(1), NOW)?;
    assert_eq!(again[0].key_package, key_package(2, 2));
    store.create_group(new_group(1, device(1), &[device(2)]))?;
    assert!(matches!(
        store.claim_username(&[8; 32], &device(1), NOW),
        Err(StoreError::NotFound)
    ));
    assert!(matches!(
        store.claim_username(&[7; 32], &device(9), NOW),
        Err(StoreError::Forbidden)
    ));
    Ok(())
}

fn a_username_belongs_to_one_account_at_a_time(store: &mut dyn Store) -> Outcome {
    register(store, &[1, 2, 3])?;
    store.set_username(&account(2), Some([7; 32]))?;
    assert!(matches!(
        store.set_username(&account(3), Some([7; 32])),
        Err(StoreError::AlreadyExists)
    ));
    // Choosing another name frees the first.
    store.set_username(&account(2), Some([8; 32]))?;
    store.set_username(&account(3), Some([7; 32]))?;
    store.commit()?;
    assert_eq!(
        store.claim_username(&[7; 32], &device(1), NOW)?[0].device_id,
        device(3)
    );
    assert_eq!(
        store.claim_username(&[8; 32], &device(1), NOW)?[0].device_id,
        device(2)
    );
    // Setting the name one already has is fine.
    store.set_username(&account(2), Some([8; 32]))?;
    Ok(())
}

fn withdrawing_a_username_makes_it_unknown_and_free(store: &mut dyn Store) -> Outcome {
    register(store, &[1, 2, 3])?;
    store.set_username(&account(2), Some([7; 32]))?;
    store.set_username(&account(2), None)?;
    store.commit()?;
    assert!(matches!(
        store.claim_username(&[7; 32], &device(1), NOW),
        Err(StoreError::NotFound)
    ));
    store.set_username(&account(3), Some([7; 32]))?;
    Ok(())
}

fn deleting_an_account_leaves_nothing_of_it_and_the_others_carry_on(
    store: &mut dyn Store,
) -> Outcome {
    let group_id = group_of_three(store)?;
    store.set_username(&account(2), Some([7; 32]))?;
    store.create_invite(&account(2), [20; 32], NOW + DAY, 1)?;
    claim(store, device(2), 3, 30)?;
    append_message(store, &group_id, b"before")?;
    store.commit()?;

    store.delete_account(&account(2))?;
    store.commit()?;
    assert_eq!(store.device(&device(2))?, None);
    assert!(store.memberships(&device(2))?.is_empty());
    assert!(store.inbox_entries(&device(2), 0, 10)?.is_empty());
    assert!(matches!(
        store.group_entries(&group_id, &device(2), 0, 10, NOW),
        Err(StoreError::Forbidden)
    ));
    assert!(matches!(
        store.claim_username(&[7; 32], &device(1), NOW),
        Err(StoreError::NotFound)
    ));
    assert!(matches!(
        store.claim_invite(&[20; 32], &device(1), NOW),
        Err(StoreError::NotFound)
    ));
    // The others keep their group; the entry goes once they both have it.
    let appended = store.append(
        &group_id,
        &device(1),
        Epoch(0),
        EntryKind::Application,
        b"after".to_vec(),
        None,
        NOW,
    )?;
    assert_eq!(sorted(appended.members), [device(1), device(3)]);
    store.ack_group(&device(1), &group_id, 2)?;
    store.ack_group(&device(3), &group_id, 2)?;
    assert!(
        store
            .group_entries(&group_id, &device(1), 0, 10, NOW)?
            .is_empty()
    );
    Ok(())
}

fn an_account_inactive_past_its_lifetime_is_deleted_by_expire(store: &mut dyn Store) -> Outcome {
    register(store, &[1, 2])?;
    store.touch_account(&account(1), Some(30), NOW)?;
    store.touch_account(&account(2), None, NOW)?;
    store.commit()?;
    store.expire(NOW + 29 * DAY, 0)?;
    assert!(store.device(&device(1))?.is_some());
    // Activity moves the deadline.
    store.touch_account(&account(1), None, NOW + 20 * DAY)?;
    store.expire(NOW + 49 * DAY, 0)?;
    assert!(store.device(&device(1))?.is_some());
    store.expire(NOW + 50 * DAY, 0)?;
    assert_eq!(store.device(&device(1))?, None);
    // The default lifetime is a year.
    assert!(store.device(&device(2))?.is_some());
    store.expire(NOW + 365 * DAY, 0)?;
    assert_eq!(store.device(&device(2))?, None);
    Ok(())
}

fn a_failed_operation_leaves_no_trace_while_the_rest_of_the_batch_commits(
    store: &mut dyn Store,
) -> Outcome {
    register(store, &[1, 2, 3, 4])?;
    claim(store, device(1), 2, 2)?;
    claim(store, device(1), 3, 3)?;
    store.commit()?;

    // One batch: failures in between successes.
    let mut doomed = new_group(1, device(1), &[device(2), device(3)]);
    doomed.welcomes = vec![
        (device(2), b"doomed".to_vec()),
        (device(3), b"doomed".to_vec()),
        (device(4), b"stray".to_vec()),
    ];
    assert!(matches!(
        store.create_group(doomed),
        Err(StoreError::Forbidden)
    ));
    store.register_device(new_device(5, 5))?;
    let mut kept = new_group(2, device(1), &[device(2)]);
    kept.welcomes = vec![(device(2), b"kept".to_vec())];
    store.create_group(kept)?;
    assert!(matches!(
        store.register_device(new_device(5, 5)),
        Err(StoreError::AlreadyExists)
    ));
    append_message(store, &group(2), b"hello")?;
    assert!(matches!(
        store.append(
            &group(2),
            &device(1),
            Epoch(7),
            EntryKind::Commit,
            b"stale".to_vec(),
            None,
            NOW
        ),
        Err(StoreError::EpochMismatch { current: Epoch(0) })
    ));
    store.commit()?;

    assert!(store.device(&device(5))?.is_some());
    assert_eq!(
        store.inbox_entries(&device(2), 0, 10)?,
        [InboxEntry {
            seq: 1,
            payload: b"kept".to_vec(),
        }]
    );
    assert!(store.inbox_entries(&device(3), 0, 10)?.is_empty());
    assert_eq!(
        store
            .memberships(&device(2))?
            .into_iter()
            .map(|membership| membership.group_id)
            .collect::<Vec<_>>(),
        [group(2)]
    );
    assert_eq!(
        seqs(&store.group_entries(&group(2), &device(2), 0, 10, NOW)?),
        [1]
    );
    assert!(matches!(
        store.append(
            &group(1),
            &device(1),
            Epoch(0),
            EntryKind::Application,
            b"hello".to_vec(),
            None,
            NOW
        ),
        Err(StoreError::NotFound)
    ));
    // The doomed group used no grant: device 3's is still there.
    store.create_group(new_group(1, device(1), &[device(3)]))?;
    Ok(())
}

fn a_blob_is_seen_by_its_uploader_and_the_other_members_of_its_group(
    store: &mut dyn Store,
) -> Outcome {
    group_of_three(store)?;
    store.create_blob(new_blob(1, device(2), group(1), 100), QUOTA)?;
    store.commit()?;
    let expected = BlobRecord {
        blob_id: blob_id(1),
        account_id: account(2),
        uploader: device(2),
        group_id: Some(group(1)),
        size: 100,
        length: 0,
        expires_at: NOW + 30 * DAY,
    };
    for reader in [2, 1, 3] {
        assert_eq!(store.blob(&blob_id(1), &device(reader), NOW)?, expected);
    }
    Ok(())
}

fn a_blob_is_forbidden_to_non_members(store: &mut dyn Store) -> Outcome {
    group_of_three(store)?;
    register(store, &[4])?;
    store.create_blob(new_blob(1, device(1), group(1), 100), QUOTA)?;
    store.commit()?;
    for outsider in [4, 9] {
        assert!(matches!(
            store.blob(&blob_id(1), &device(outsider), NOW),
            Err(StoreError::Forbidden)
        ));
    }
    // Nor may a non-member upload to the group.
    assert!(matches!(
        store.create_blob(new_blob(2, device(4), group(1), 100), QUOTA),
        Err(StoreError::Forbidden)
    ));
    assert_eq!(store.live_blob_ids()?, [blob_id(1)]);
    Ok(())
}

fn unknown_groups_uploaders_and_blobs_are_not_found(store: &mut dyn Store) -> Outcome {
    group_of_three(store)?;
    assert!(matches!(
        store.create_blob(new_blob(1, device(1), group(9), 100), QUOTA),
        Err(StoreError::NotFound)
    ));
    assert!(matches!(
        store.create_blob(new_blob(1, device(9), group(1), 100), QUOTA),
        Err(StoreError::NotFound)
    ));
    assert!(matches!(
        store.blob(&blob_id(1), &device(1), NOW),
        Err(StoreError::NotFound)
    ));
    assert!(matches!(
        store.set_blob_length(&blob_id(1), &device(1), 0),
        Err(StoreError::NotFound)
    ));
    assert!(store.live_blob_ids()?.is_empty());
    Ok(())
}

fn creating_a_blob_with_a_taken_id_fails_and_keeps_the_first(store: &mut dyn Store) -> Outcome {
    group_of_three(store)?;
    store.create_blob(new_blob(1, device(1), group(1), 100), QUOTA)?;
    assert!(matches!(
        store.create_blob(new_blob(1, device(2), group(1), 200), QUOTA),
        Err(StoreError::AlreadyExists)
    ));
    store.commit()?;
    let kept = store.blob(&blob_id(1), &device(2), NOW)?;
    assert_eq!((kept.uploader, kept.size), (device(1), 100));
    Ok(())
}

fn an_account_may_hold_only_so_many_blobs_however_small(store: &mut dyn Store) -> Outcome {
    group_of_three_and_a_second_device_of_account_1(store)?;
    let capped = |number: u8, uploader: DeviceId, group_id: GroupId| NewBlob {
        max_blobs: 2,
        ..new_blob(number, uploader, group_id, 16)
    };
    store.create_blob(capped(1, device(1), group(1)), QUOTA)?;
    store.create_blob(capped(2, device(1), group(2)), QUOTA)?;
    // The account's second device counts against the same cap.
    assert!(matches!(
        store.create_blob(capped(3, device(4), group(2)), QUOTA),
        Err(StoreError::QuotaExceeded)
    ));
    // Another account is not affected.
    store.create_blob(capped(3, device(2), group(1)), QUOTA)?;
    store.commit()?;
    assert_eq!(store.live_blob_ids()?.len(), 3);
    Ok(())
}

fn the_quota_counts_every_blob_of_the_uploaders_account_and_no_other(
    store: &mut dyn Store,
) -> Outcome {
    group_of_three_and_a_second_device_of_account_1(store)?;
    // Account 1 uploads from both its devices, to both its groups.
    store.create_blob(new_blob(1, device(1), group(1), 400), QUOTA)?;
    store.create_blob(
        NewBlob {
            expires_at: NOW + DAY,
            ..new_blob(2, device(4), group(2), 300)
        },
        QUOTA,
    )?;
    assert!(matches!(
        store.create_blob(new_blob(3, device(1), group(2), 301), QUOTA),
        Err(StoreError::QuotaExceeded)
    ));
    // Filling the quota exactly is allowed.
    store.create_blob(new_blob(3, device(1), group(2), 300), QUOTA)?;
    assert!(matches!(
        store.create_blob(new_blob(4, device(4), group(2), 1), QUOTA),
        Err(StoreError::QuotaExceeded)
    ));
    // Another account has a quota of its own.
    store.create_blob(new_blob(4, device(2), group(1), QUOTA), QUOTA)?;
    store.commit()?;
    assert_eq!(
        store.live_blob_ids()?,
        [blob_id(1), blob_id(2), blob_id(3), blob_id(4)]
    );

    // The space comes back once a blob is deleted.
    store.expire(NOW + DAY, 0)?;
    store.create_blob(
        NewBlob {
            now: NOW + DAY,
            ..new_blob(5, device(4), group(2), 300)
        },
        QUOTA,
    )?;
    Ok(())
}

fn a_blob_length_only_grows_up_to_the_size_and_only_by_its_uploader(
    store: &mut dyn Store,
) -> Outcome {
    group_of_three(store)?;
    store.create_blob(new_blob(1, device(1), group(1), 100), QUOTA)?;
    store.set_blob_length(&blob_id(1), &device(1), 40)?;
    // A retried write reports the same length again.
    store.set_blob_length(&blob_id(1), &device(1), 40)?;
    for refused in [39, 101] {
        assert!(matches!(
            store.set_blob_length(&blob_id(1), &device(1), refused),
            Err(StoreError::Invalid(_))
        ));
    }
    assert!(matches!(
        store.set_blob_length(&blob_id(1), &device(2), 50),
        Err(StoreError::Forbidden)
    ));
    store.commit()?;
    assert_eq!(store.blob(&blob_id(1), &device(2), NOW)?.length, 40);
    store.set_blob_length(&blob_id(1), &device(1), 100)?;
    assert_eq!(store.blob(&blob_id(1), &device(2), NOW)?.length, 100);
    Ok(())
}

fn an_expired_blob_is_not_found_and_expire_deletes_it(store: &mut dyn Store) -> Outcome {
    group_of_three(store)?;
    store.create_blob(
        NewBlob {
            expires_at: NOW + HOUR,
            ..new_blob(1, device(1), group(1), 10)
        },
        QUOTA,
    )?;
    store.create_blob(new_blob(2, device(1), group(1), 10), QUOTA)?;
    for number in [1, 2] {
        store.set_blob_length(&blob_id(number), &device(1), 10)?;
    }
    store.commit()?;
    assert_eq!(
        store.blob(&blob_id(1), &device(2), NOW + HOUR - 1)?.blob_id,
        blob_id(1)
    );
    for reader in [1, 2] {
        assert!(matches!(
            store.blob(&blob_id(1), &device(reader), NOW + HOUR),
            Err(StoreError::NotFound)
        ));
    }
    // Its file stays until `expire` deletes the row.
    assert_eq!(store.live_blob_ids()?, [blob_id(1), blob_id(2)]);
    assert_eq!(store.expire(NOW + HOUR - 1, 0)?, 0);
    assert_eq!(store.expire(NOW + HOUR, 0)?, 1);
    store.commit()?;
    assert_eq!(store.live_blob_ids()?, [blob_id(2)]);
    Ok(())
}

/// Only the hour an upload started is kept, so a blob goes once that whole hour is more than a
/// day ago: late rather than early, which would cut off an upload still going on.
fn expire_deletes_blobs_left_unfinished_for_a_day(store: &mut dyn Store) -> Outcome {
    group_of_three(store)?;
    for number in [1, 2, 3] {
        store.create_blob(
            NewBlob {
                now: NOW + HOUR / 2,
                ..new_blob(number, device(1), group(1), 10)
            },
            QUOTA,
        )?;
    }
    store.set_blob_length(&blob_id(1), &device(1), 10)?;
    store.set_blob_length(&blob_id(2), &device(1), 5)?;
    store.commit()?;
    assert_eq!(store.expire(NOW + DAY + HOUR - 1, 0)?, 0);
    assert_eq!(store.expire(NOW + DAY + HOUR, 0)?, 2);
    store.commit()?;
    assert_eq!(store.live_blob_ids()?, [blob_id(1)]);
    Ok(())
}

fn expire_deletes_blobs_of_a_group_without_members(store: &mut dyn Backend) -> Outcome {
    group_of_three(store)?;
    store.create_group(new_group(2, device(1), &[]))?;
    store.create_blob(new_blob(1, device(1), group(1), 10), QUOTA)?;
    store.create_blob(new_blob(2, device(1), group(2), 10), QUOTA)?;
    store.commit()?;
    assert_eq!(store.expire(NOW, 0)?, 0);
    store.empty_group(&group(2))?;
    store.commit()?;
    assert_eq!(store.expire(NOW, 0)?, 1);
    store.commit()?;
    assert_eq!(store.live_blob_ids()?, [blob_id(1)]);
    Ok(())
}

fn deleting_an_account_deletes_the_blobs_of_all_its_devices_and_no_others(
    store: &mut dyn Store,
) -> Outcome {
    group_of_three_and_a_second_device_of_account_1(store)?;
    store.create_blob(new_blob(1, device(1), group(1), 10), QUOTA)?;
    store.create_blob(new_blob(2, device(4), group(2), 10), QUOTA)?;
    store.create_blob(new_blob(3, device(2), group(1), 10), QUOTA)?;
    store.commit()?;
    store.delete_account(&account(1))?;
    store.commit()?;
    assert_eq!(store.live_blob_ids()?, [blob_id(3)]);
    assert!(matches!(
        store.blob(&blob_id(1), &device(2), NOW),
        Err(StoreError::NotFound)
    ));
    assert_eq!(store.blob(&blob_id(3), &device(3), NOW)?.length, 0);
    Ok(())
}

fn live_blob_ids_lists_every_blob_finished_or_not_in_order(store: &mut dyn Store) -> Outcome {
    group_of_three(store)?;
    assert!(store.live_blob_ids()?.is_empty());
    for number in [3, 1, 2] {
        store.create_blob(new_blob(number, device(number), group(1), 10), QUOTA)?;
    }
    store.set_blob_length(&blob_id(1), &device(1), 10)?;
    // A refused blob leaves nothing behind.
    assert!(matches!(
        store.create_blob(new_blob(4, device(1), group(1), QUOTA), QUOTA),
        Err(StoreError::QuotaExceeded)
    ));
    store.commit()?;
    assert_eq!(store.live_blob_ids()?, [blob_id(1), blob_id(2), blob_id(3)]);
    Ok(())
}

/// A commit of `committer` on `group_id` at `epoch` adding and removing devices.
fn member_commit(
    group_id: &GroupId,
    committer: u8,
    epoch: u64,
    add: &[u8],
    remove: &[u8],
) -> NewCommit {
    NewCommit {
        group_id: group_id.clone(),
        committer: device(committer),
        epoch: Epoch(epoch),
        payload: vec![b'c', committer, epoch as u8],
        add: add.iter().map(|number| device(*number)).collect(),
        remove: remove.iter().map(|number| device(*number)).collect(),
        welcomes: add
            .iter()
            .map(|number| (device(*number), vec![b'w', *number]))
            .collect(),
        welcome: None,
        next_posting_key: None,
        now: NOW,
    }
}

fn key_packages_of_a_contact_can_be_claimed_only_by_who_shares_a_group_with_it(
    store: &mut dyn Store,
) -> Outcome {
    group_of_three(store)?;
    register(store, &[5])?;
    // Device 2 shares group 1 with account 3 (whose first key package made the group).
    let claimed = store.claim_contact(&account(3), &device(2), NOW)?;
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].device_id, device(3));
    assert_eq!(claimed[0].key_package, key_package(3, 2));
    // Device 5 shares nothing with account 3; account 5 shares nothing with device 1.
    assert!(matches!(
        store.claim_contact(&account(3), &device(5), NOW),
        Err(StoreError::NotFound)
    ));
    assert!(matches!(
        store.claim_contact(&account(5), &device(1), NOW),
        Err(StoreError::NotFound)
    ));
    // The claim granted device 2 the right to add device 3 (to another group).
    store.create_group(new_group(7, device(2), &[device(3)]))?;
    Ok(())
}

fn a_member_commit_adds_and_removes_devices_at_the_next_epoch(store: &mut dyn Store) -> Outcome {
    let group_id = group_of_three(store)?;
    register(store, &[4])?;
    append_message(store, &group_id, b"before")?;
    // Device 2 adds account 4, which it shares nothing with yet: through an invite.
    claim(store, device(2), 4, 4)?;
    let committed = store.commit_members(member_commit(&group_id, 2, 0, &[4], &[3]))?;
    store.commit()?;
    assert_eq!(committed.seq, 2);
    assert_eq!(
        committed.members,
        sorted(vec![device(1), device(2), device(4)])
    );
    assert_eq!(committed.removed, vec![device(3)]);
    assert_eq!(committed.welcomed, vec![device(4)]);
    // The newcomer reads only what follows the commit, starting from its Welcome.
    let memberships = store.memberships(&device(4))?;
    assert_eq!(
        memberships,
        vec![Membership {
            group_id: group_id.clone(),
            cursor: 2
        }]
    );
    assert_eq!(store.inbox_entries(&device(4), 0, 10)?.len(), 1);
    // The removed device may no longer post, but still reads up to the commit that removed
    // it (so it learns of it, and gets what was sent before), until it has acknowledged it.
    assert!(matches!(
        store.append(
            &group_id,
            &device(3),
            Epoch(1),
            EntryKind::Application,
            b"x".to_vec(),
            None,
            NOW
        ),
        Err(StoreError::Forbidden)
    ));
    assert_eq!(
        seqs(&store.group_entries(&group_id, &device(3), 0, 10, NOW)?),
        vec![1, 2]
    );
    assert_eq!(store.memberships(&device(3))?.len(), 1);
    // The group moved to epoch 1: an application message at epoch 0 is refused.
    assert!(matches!(
        store.append(
            &group_id,
            &device(1),
            Epoch(0),
            EntryKind::Application,
            b"x".to_vec(),
            None,
            NOW
        ),
        Err(StoreError::EpochMismatch { current: Epoch(1) })
    ));
    let appended = store.append(
        &group_id,
        &device(4),
        Epoch(1),
        EntryKind::Application,
        b"after".to_vec(),
        None,
        NOW,
    )?;
    assert_eq!(appended.seq, 3);
    assert_eq!(
        seqs(&store.group_entries(&group_id, &device(4), 2, 10, NOW)?),
        vec![3]
    );
    // Entry 3 is not for the removed device; once it has the commit, it is out for good.
    assert_eq!(
        seqs(&store.group_entries(&group_id, &device(3), 0, 10, NOW)?),
        vec![1, 2]
    );
    store.ack_group(&device(3), &group_id, 2)?;
    assert!(matches!(
        store.group_entries(&group_id, &device(3), 0, 10, NOW),
        Err(StoreError::Forbidden)
    ));
    assert!(store.memberships(&device(3))?.is_empty());
    Ok(())
}

fn a_member_commit_is_compare_and_swap_and_a_failed_one_changes_nothing(
    store: &mut dyn Store,
) -> Outcome {
    let group_id = group_of_three(store)?;
    register(store, &[4, 5])?;
    claim(store, device(1), 4, 4)?;
    claim(store, device(2), 5, 5)?;
    // Two admins commit on epoch 0: the first wins, the second learns the current epoch.
    store.commit_members(member_commit(&group_id, 1, 0, &[4], &[]))?;
    assert!(matches!(
        store.commit_members(member_commit(&group_id, 2, 0, &[5], &[])),
        Err(StoreError::EpochMismatch { current: Epoch(1) })
    ));
    store.commit()?;
    // Nothing of the loser's commit happened: no member, no Welcome, grant still there.
    assert!(store.memberships(&device(5))?.is_empty());
    assert!(store.inbox_entries(&device(5), 0, 10)?.is_empty());
    let committed = store.commit_members(member_commit(&group_id, 2, 1, &[5], &[]))?;
    assert_eq!(committed.seq, 2);
    assert_eq!(committed.members.len(), 5);
    Ok(())
}

fn adding_a_device_needs_a_grant_and_welcomes_go_only_to_added_devices(
    store: &mut dyn Store,
) -> Outcome {
    let group_id = group_of_three(store)?;
    register(store, &[4])?;
    assert!(matches!(
        store.commit_members(member_commit(&group_id, 1, 0, &[4], &[])),
        Err(StoreError::Forbidden)
    ));
    claim(store, device(2), 4, 4)?;
    // The grant is device 2's, not device 1's.
    assert!(matches!(
        store.commit_members(member_commit(&group_id, 1, 0, &[4], &[])),
        Err(StoreError::Forbidden)
    ));
    let mut stray_welcome = member_commit(&group_id, 2, 0, &[4], &[]);
    stray_welcome.welcomes.push((device(3), b"w3".to_vec()));
    assert!(matches!(
        store.commit_members(stray_welcome),
        Err(StoreError::Forbidden)
    ));
    store.commit()?;
    assert!(store.inbox_entries(&device(3), 0, 10)?.is_empty());
    // The grant survived the failed attempts, and is consumed by the one that succeeds.
    store.commit_members(member_commit(&group_id, 2, 0, &[4], &[]))?;
    let removal = store.commit_members(member_commit(&group_id, 2, 1, &[], &[4]))?;
    store.ack_group(&device(4), &group_id, removal.seq)?;
    assert!(matches!(
        store.commit_members(member_commit(&group_id, 2, 2, &[4], &[])),
        Err(StoreError::Forbidden)
    ));
    Ok(())
}

fn a_member_commit_refuses_impossible_changes(store: &mut dyn Store) -> Outcome {
    let group_id = group_of_three(store)?;
    register(store, &[4, 5])?;
    claim(store, device(1), 4, 4)?;
    for (commit, why) in [
        (member_commit(&group_id, 1, 0, &[], &[1]), "removes itself"),
        (member_commit(&group_id, 1, 0, &[2], &[]), "adds a member"),
        (
            member_commit(&group_id, 1, 0, &[4], &[4]),
            "adds and removes",
        ),
        (member_commit(&group_id, 1, 0, &[], &[2, 2]), "names twice"),
    ] {
        assert!(
            matches!(store.commit_members(commit), Err(StoreError::Invalid(_))),
            "a commit that {why} must be invalid"
        );
    }
    assert!(matches!(
        store.commit_members(member_commit(&group_id, 5, 0, &[], &[2])),
        Err(StoreError::Forbidden)
    ));
    assert!(matches!(
        store.commit_members(member_commit(&group(9), 1, 0, &[], &[2])),
        Err(StoreError::NotFound)
    ));
    store.commit()?;
    // None of them moved the epoch or the members.
    let committed = store.commit_members(member_commit(&group_id, 1, 0, &[4], &[]))?;
    assert_eq!(committed.seq, 1);
    assert_eq!(committed.members.len(), 4);
    // A device that left by itself is skipped by a commit that removes it.
    store.leave_group(&group_id, &device(3))?;
    let committed = store.commit_members(member_commit(&group_id, 1, 1, &[], &[3, 5]))?;
    assert_eq!(committed.seq, 2);
    assert!(committed.removed.is_empty());
    assert_eq!(committed.members.len(), 3);
    Ok(())
}

fn a_device_that_leaves_gets_nothing_more_and_no_longer_holds_entries_back(
    store: &mut dyn Store,
) -> Outcome {
    let group_id = group_of_three(store)?;
    append_message(store, &group_id, b"one")?;
    store.ack_group(&device(1), &group_id, 1)?;
    store.ack_group(&device(2), &group_id, 1)?;
    // Device 3 has not read entry 1; once it leaves, nobody needs it any more.
    store.leave_group(&group_id, &device(3))?;
    store.commit()?;
    assert!(
        store
            .group_entries(&group_id, &device(1), 0, 10, NOW)?
            .is_empty()
    );
    assert!(matches!(
        store.group_entries(&group_id, &device(3), 0, 10, NOW),
        Err(StoreError::Forbidden)
    ));
    assert!(matches!(
        store.leave_group(&group_id, &device(3)),
        Err(StoreError::Forbidden)
    ));
    assert!(matches!(
        store.append(
            &group_id,
            &device(3),
            Epoch(0),
            EntryKind::Application,
            b"x".to_vec(),
            None,
            NOW
        ),
        Err(StoreError::Forbidden)
    ));
    Ok(())
}

fn an_unattributed_post_needs_the_posting_key_of_the_current_epoch(
    store: &mut dyn Store,
) -> Outcome {
    use ed25519_dalek::{Signer, SigningKey};
    let group_id = group_of_three(store)?;
    let (first, second) = (
        SigningKey::from_bytes(&[1; 32]),
        SigningKey::from_bytes(&[2; 32]),
    );
    let post = |store: &mut dyn Store, key: &SigningKey, epoch: u64, payload: &[u8]| {
        let signature = key.sign(&miyu_proto::cert::group_post_payload(
            group_id.as_bytes(),
            epoch,
            0,
            payload,
        ));
        store.append_unattributed(
            &group_id,
            Epoch(epoch),
            payload.to_vec(),
            None,
            0,
            &signature.to_bytes(),
            NOW,
        )
    };
    // No key registered yet.
    assert!(matches!(
        post(store, &first, 0, b"a"),
        Err(StoreError::Forbidden)
    ));
    assert!(matches!(
        store.set_posting_key(&group_id, Epoch(1), Some(first.verifying_key().to_bytes())),
        Err(StoreError::EpochMismatch { current: Epoch(0) })
    ));
    store.set_posting_key(&group_id, Epoch(0), Some(first.verifying_key().to_bytes()))?;
    let appended = post(store, &first, 0, b"a")?;
    assert_eq!(appended.seq, 1);
    assert_eq!(appended.members.len(), 3);
    // Another key, another epoch, or bytes other than those signed: refused.
    assert!(matches!(
        post(store, &second, 0, b"b"),
        Err(StoreError::Forbidden)
    ));
    assert!(matches!(
        post(store, &first, 1, b"b"),
        Err(StoreError::EpochMismatch { current: Epoch(0) })
    ));
    let signature = first.sign(&miyu_proto::cert::group_post_payload(
        group_id.as_bytes(),
        0,
        0,
        b"b",
    ));
    assert!(matches!(
        store.append_unattributed(
            &group_id,
            Epoch(0),
            b"c".to_vec(),
            None,
            0,
            &signature.to_bytes(),
            NOW
        ),
        Err(StoreError::Forbidden)
    ));
    // A commit that names no key leaves none; one that does brings it.
    store.append(
        &group_id,
        &device(1),
        Epoch(0),
        EntryKind::Commit,
        b"c".to_vec(),
        None,
        NOW,
    )?;
    assert!(matches!(
        post(store, &first, 1, b"d"),
        Err(StoreError::Forbidden)
    ));
    let mut commit = member_commit(&group_id, 2, 1, &[], &[3]);
    commit.next_posting_key = Some(second.verifying_key().to_bytes());
    store.commit_members(commit)?;
    assert!(matches!(
        post(store, &first, 2, b"e"),
        Err(StoreError::Forbidden)
    ));
    let appended = post(store, &second, 2, b"e")?;
    assert_eq!(appended.members.len(), 2);
    store.commit()?;
    // The log holds the entries with no trace of who posted them.
    let entries = store.group_entries(&group_id, &device(1), 0, 10, NOW)?;
    assert_eq!(seqs(&entries), vec![1, 2, 3, 4]);
    Ok(())
}

fn a_removed_device_can_be_added_again_once_it_read_its_removal(store: &mut dyn Store) -> Outcome {
    let group_id = group_of_three(store)?;
    let removal = store.commit_members(member_commit(&group_id, 1, 0, &[], &[3]))?;
    claim(store, device(1), 3, 9)?;
    // Device 3 has not read its removal: its own state still says it is in.
    assert!(matches!(
        store.commit_members(member_commit(&group_id, 1, 1, &[3], &[])),
        Err(StoreError::Invalid(_))
    ));
    store.ack_group(&device(3), &group_id, removal.seq)?;
    let committed = store.commit_members(member_commit(&group_id, 1, 1, &[3], &[]))?;
    store.commit()?;
    assert_eq!(committed.members.len(), 3);
    // It reads from the commit that added it back, and may post again.
    assert_eq!(
        store.memberships(&device(3))?,
        vec![Membership {
            group_id: group_id.clone(),
            cursor: committed.seq
        }]
    );
    store.append(
        &group_id,
        &device(3),
        Epoch(2),
        EntryKind::Application,
        b"back".to_vec(),
        None,
        NOW,
    )?;
    Ok(())
}

fn one_shared_welcome_reaches_every_new_member_but_the_poster(store: &mut dyn Store) -> Outcome {
    register(store, &[1, 2, 3, 4])?;
    claim(store, device(1), 2, 2)?;
    claim(store, device(1), 3, 3)?;
    let mut new = new_group(1, device(1), &[device(2), device(3)]);
    new.welcome = Some(b"one welcome".to_vec());
    let created = store.create_group(new)?;
    assert_eq!(created.welcomed, vec![device(2), device(3)]);
    claim(store, device(2), 4, 4)?;
    let mut commit = member_commit(&group(1), 2, 0, &[4], &[]);
    commit.welcomes.clear();
    commit.welcome = Some(b"another".to_vec());
    assert_eq!(store.commit_members(commit)?.welcomed, vec![device(4)]);
    store.commit()?;
    for (number, payload) in [
        (2, &b"one welcome"[..]),
        (3, b"one welcome"),
        (4, b"another"),
    ] {
        let entries = store.inbox_entries(&device(number), 0, 10)?;
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].payload, payload);
    }
    assert!(store.inbox_entries(&device(1), 0, 10)?.is_empty());
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Devices of one account: linking mailboxes, listing, revoking, own-account exemptions.
// ---------------------------------------------------------------------------------------------

/// An identity key, for accounts whose revocations must verify.
fn identity(seed: u8) -> ed25519_dalek::SigningKey {
    ed25519_dalek::SigningKey::from_bytes(&[seed; 32])
}

fn account_of_identity(identity: &ed25519_dalek::SigningKey) -> AccountId {
    AccountId::from_identity_key(&identity.verifying_key().to_bytes())
}

/// Device `number` of `identity`'s account, with a certificate that names the identity key
/// (the store trusts certificates checked at registration, so its signature is left blank).
fn device_of(identity: &ed25519_dalek::SigningKey, number: u8) -> NewDevice {
    NewDevice {
        account_id: account_of_identity(identity),
        certificate: [
            identity.verifying_key().to_bytes().as_slice(),
            &[number; 32],
            &[0; 64],
        ]
        .concat(),
        ..new_device(number, 0)
    }
}

/// The identity key's signature revoking device `number`.
fn revocation(identity: &ed25519_dalek::SigningKey, number: u8) -> Vec<u8> {
    use ed25519_dalek::Signer;
    identity
        .sign(&miyu_proto::cert::revoke_payload(&device(number)))
        .to_bytes()
        .to_vec()
}

const MAILBOX: [u8; 32] = [5; 32];
const LINK_EXPIRY: u64 = NOW + 600;

fn a_linking_mailbox_is_taken_once(store: &mut dyn Store) -> Outcome {
    store.put_link(MAILBOX, b"sealed".to_vec(), LINK_EXPIRY, NOW)?;
    store.put_link([6; 32], b"another".to_vec(), LINK_EXPIRY, NOW)?;
    store.commit()?;
    assert_eq!(store.take_link(&MAILBOX, NOW + 1)?, b"sealed");
    store.commit()?;
    assert!(matches!(
        store.take_link(&MAILBOX, NOW + 2),
        Err(StoreError::NotFound)
    ));
    assert!(matches!(
        store.take_link(&[7; 32], NOW),
        Err(StoreError::NotFound)
    ));
    // Once taken, the mailbox can be used again.
    store.put_link(MAILBOX, b"again".to_vec(), LINK_EXPIRY, NOW + 3)?;
    assert_eq!(store.take_link(&MAILBOX, NOW + 4)?, b"again");
    assert_eq!(store.take_link(&[6; 32], NOW + 5)?, b"another");
    Ok(())
}

fn a_linking_mailbox_holds_one_message_until_it_expires_and_expire_deletes_it(
    store: &mut dyn Store,
) -> Outcome {
    store.put_link(MAILBOX, b"first".to_vec(), LINK_EXPIRY, NOW)?;
    assert!(matches!(
        store.put_link(MAILBOX, b"second".to_vec(), LINK_EXPIRY + 60, NOW + 1),
        Err(StoreError::AlreadyExists)
    ));
    store.commit()?;
    assert!(matches!(
        store.take_link(&MAILBOX, LINK_EXPIRY),
        Err(StoreError::NotFound)
    ));
    // The refused take left the message where it was, as the refused put did.
    assert_eq!(store.take_link(&MAILBOX, LINK_EXPIRY - 1)?, b"first");

    // An expired message gives way to a new one.
    store.put_link(MAILBOX, b"old".to_vec(), LINK_EXPIRY, NOW)?;
    store.put_link(MAILBOX, b"new".to_vec(), LINK_EXPIRY + 600, LINK_EXPIRY)?;
    assert_eq!(store.take_link(&MAILBOX, LINK_EXPIRY + 1)?, b"new");

    // The sweep deletes expired messages and keeps the others.
    store.put_link(MAILBOX, b"expires".to_vec(), LINK_EXPIRY, NOW)?;
    store.put_link([6; 32], b"stays".to_vec(), LINK_EXPIRY + 60, NOW)?;
    store.commit()?;
    assert_eq!(store.expire(LINK_EXPIRY, 0)?, 1);
    store.commit()?;
    assert!(matches!(
        store.take_link(&MAILBOX, NOW),
        Err(StoreError::NotFound)
    ));
    assert_eq!(store.take_link(&[6; 32], NOW)?, b"stays");
    Ok(())
}

fn an_accounts_devices_are_listed_with_the_days_they_registered_and_were_last_active(
    store: &mut dyn Store,
) -> Outcome {
    store.register_device(new_device(1, 1))?;
    store.register_device(NewDevice {
        now: NOW + 3 * DAY + 5 * HOUR,
        ..new_device(4, 1)
    })?;
    store.register_device(new_device(2, 2))?;
    store.touch_device(&device(2), NOW)?;
    store.touch_device(&device(1), NOW + 5 * DAY + 7 * HOUR)?;
    store.commit()?;
    let listed = store.account_devices(&device(4))?;
    let mut expected = vec![
        super::DeviceSummary {
            device_id: device(1),
            certificate: certificate(1),
            created_day: NOW / DAY,
            active_day: (NOW + 5 * DAY + 7 * HOUR) / DAY,
        },
        super::DeviceSummary {
            device_id: device(4),
            certificate: certificate(4),
            created_day: (NOW + 3 * DAY + 5 * HOUR) / DAY,
            active_day: (NOW + 3 * DAY + 5 * HOUR) / DAY,
        },
    ];
    expected.sort_by_key(|summary| summary.device_id);
    assert_eq!(listed, expected);
    assert_eq!(store.account_devices(&device(1))?, listed);
    assert_eq!(store.account_devices(&device(2))?.len(), 1);
    assert!(matches!(
        store.account_devices(&device(9)),
        Err(StoreError::AuthenticationFailed)
    ));
    assert!(matches!(
        store.touch_device(&device(9), NOW),
        Err(StoreError::AuthenticationFailed)
    ));
    // A device's activity is its account's too: it keeps the account from expiring.
    store.touch_device(&device(1), NOW + 300 * DAY)?;
    store.expire(NOW + 400 * DAY, 0)?;
    assert!(store.device(&device(4))?.is_some());
    assert_eq!(store.device(&device(2))?, None);
    Ok(())
}

fn a_revocation_needs_a_device_of_the_account_and_its_identity_keys_signature(
    store: &mut dyn Store,
) -> Outcome {
    let (alice, bob) = (identity(1), identity(2));
    store.register_device(device_of(&alice, 1))?;
    store.register_device(device_of(&alice, 4))?;
    store.register_device(device_of(&bob, 2))?;
    store.commit()?;
    // Another account's device, or no device at all, is not found even with a good signature.
    assert!(matches!(
        store.revoke_device(&device(1), &device(2), &revocation(&alice, 2)),
        Err(StoreError::NotFound)
    ));
    assert!(matches!(
        store.revoke_device(&device(1), &device(9), &revocation(&alice, 9)),
        Err(StoreError::NotFound)
    ));
    // Another key's signature, one over another device, or garbage: refused.
    for signature in [
        revocation(&bob, 4),
        revocation(&alice, 1),
        vec![0; 64],
        vec![1, 2, 3],
    ] {
        assert!(matches!(
            store.revoke_device(&device(1), &device(4), &signature),
            Err(StoreError::AuthenticationFailed)
        ));
    }
    store.commit()?;
    assert!(store.device(&device(4))?.is_some());
    assert_eq!(store.account_devices(&device(1))?.len(), 2);
    // An unknown requester can revoke nothing.
    assert!(matches!(
        store.revoke_device(&device(9), &device(4), &revocation(&alice, 4)),
        Err(StoreError::AuthenticationFailed)
    ));

    store.revoke_device(&device(1), &device(4), &revocation(&alice, 4))?;
    store.commit()?;
    assert_eq!(store.device(&device(4))?, None);
    // Again (a retry whose answer was lost) changes nothing, but still needs the signature.
    store.revoke_device(&device(1), &device(4), &revocation(&alice, 4))?;
    assert!(matches!(
        store.revoke_device(&device(1), &device(4), &revocation(&bob, 4)),
        Err(StoreError::AuthenticationFailed)
    ));
    // A revoked device can revoke nothing; a device may revoke itself.
    assert!(matches!(
        store.revoke_device(&device(4), &device(1), &revocation(&alice, 1)),
        Err(StoreError::AuthenticationFailed)
    ));
    store.revoke_device(&device(1), &device(1), &revocation(&alice, 1))?;
    store.commit()?;
    assert_eq!(store.device(&device(1))?, None);
    assert!(store.device(&device(2))?.is_some());
    Ok(())
}

fn a_revoked_device_loses_its_rows_and_groups_and_can_never_register_again(
    store: &mut dyn Store,
) -> Outcome {
    let alice = identity(1);
    store.register_device(device_of(&alice, 1))?;
    store.register_device(device_of(&alice, 4))?;
    register(store, &[2, 3])?;
    // Group 1: devices 1, 4 and 2. Device 4 has a Welcome in its inbox, has read nothing,
    // uploaded a blob to the group and one for its account, and holds a grant to add device 3.
    claim(store, device(1), 2, 2)?;
    let mut new = new_group(1, device(1), &[device(4), device(2)]);
    new.welcome = Some(b"welcome".to_vec());
    store.create_group(new)?;
    append_message(store, &group(1), b"held back by 4")?;
    store.ack_group(&device(1), &group(1), 1)?;
    store.ack_group(&device(2), &group(1), 1)?;
    store.create_blob(new_blob(1, device(4), group(1), 100), QUOTA)?;
    store.create_blob(account_blob(2, device(4), 100), QUOTA)?;
    claim(store, device(4), 3, 3)?;
    // Group 2: device 2 removed device 4 by a commit device 4 has not read yet.
    claim(store, device(1), 2, 5)?;
    store.create_group(new_group(2, device(1), &[device(4), device(2)]))?;
    store.commit_members(member_commit(&group(2), 2, 0, &[], &[4]))?;
    store.commit()?;
    assert_eq!(store.memberships(&device(4))?.len(), 2);
    assert_eq!(store.inbox_entries(&device(4), 0, 10)?.len(), 1);

    store.revoke_device(&device(1), &device(4), &revocation(&alice, 4))?;
    store.commit()?;
    assert_eq!(store.device(&device(4))?, None);
    assert!(store.memberships(&device(4))?.is_empty());
    assert!(store.inbox_entries(&device(4), 0, 10)?.is_empty());
    assert!(matches!(
        store.key_package_count(&device(4)),
        Err(StoreError::NotFound)
    ));
    for group_id in [group(1), group(2)] {
        assert!(matches!(
            store.group_entries(&group_id, &device(4), 0, 10, NOW),
            Err(StoreError::Forbidden)
        ));
    }
    // What only it held back is gone; the others carry on without it.
    assert!(
        store
            .group_entries(&group(1), &device(1), 0, 10, NOW)?
            .is_empty()
    );
    let appended = store.append(
        &group(1),
        &device(2),
        Epoch(0),
        EntryKind::Application,
        b"after".to_vec(),
        None,
        NOW,
    )?;
    assert_eq!(sorted(appended.members), sorted(vec![device(1), device(2)]));
    // Its grant went with it, and nobody gets its key packages or may add it back.
    assert!(matches!(
        store.commit_members(member_commit(&group(1), 4, 0, &[3], &[])),
        Err(StoreError::Forbidden)
    ));
    let claimed = store.claim_contact(&account_of_identity(&alice), &device(2), NOW)?;
    assert_eq!(
        claimed
            .iter()
            .map(|claimed| claimed.device_id)
            .collect::<Vec<_>>(),
        [device(1)]
    );
    assert!(matches!(
        store.commit_members(member_commit(&group(2), 1, 1, &[4], &[])),
        Err(StoreError::Forbidden)
    ));
    assert_eq!(store.account_devices(&device(1))?.len(), 1);
    // Its blobs stay with the account: the group still reads one, the account the other.
    assert_eq!(
        store.blob(&blob_id(1), &device(2), NOW)?.uploader,
        device(4)
    );
    assert_eq!(
        store.blob(&blob_id(2), &device(1), NOW)?.uploader,
        device(4)
    );
    // Its key may sign anything: it never gets in again.
    assert!(matches!(
        store.register_device(device_of(&alice, 4)),
        Err(StoreError::AuthenticationFailed)
    ));
    assert!(matches!(
        store.touch_device(&device(4), NOW),
        Err(StoreError::AuthenticationFailed)
    ));
    Ok(())
}

fn revoked_devices_are_forgotten_with_their_account(store: &mut dyn Store) -> Outcome {
    let alice = identity(1);
    store.register_device(device_of(&alice, 1))?;
    store.register_device(device_of(&alice, 4))?;
    store.revoke_device(&device(1), &device(4), &revocation(&alice, 4))?;
    store.commit()?;
    store.delete_account(&account_of_identity(&alice))?;
    store.commit()?;
    // Nothing of the account is left, not even the revoked device's id.
    store.register_device(device_of(&alice, 4))?;
    store.commit()?;
    assert!(store.device(&device(4))?.is_some());
    Ok(())
}

fn own_devices_are_claimed_without_a_shared_group_and_without_the_claimer(
    store: &mut dyn Store,
) -> Outcome {
    register(store, &[1, 2])?;
    store.register_device(new_device(4, 1))?;
    store.register_device(new_device(5, 1))?;
    store.commit()?;
    let claimed = store.claim_contact(&account(1), &device(1), NOW)?;
    store.commit()?;
    let mut expected = [4, 5]
        .map(|number| ClaimedKeyPackage {
            device_id: device(number),
            certificate: certificate(number),
            key_package: key_package(number, 1),
        })
        .to_vec();
    expected.sort_by_key(|claimed| claimed.device_id);
    assert_eq!(claimed, expected);
    assert_eq!(store.key_package_count(&device(1))?, 2);
    assert_eq!(store.key_package_count(&device(4))?, 1);
    // Another account still needs a shared group.
    assert!(matches!(
        store.claim_contact(&account(2), &device(1), NOW),
        Err(StoreError::NotFound)
    ));
    assert!(matches!(
        store.claim_contact(&account(1), &device(2), NOW),
        Err(StoreError::NotFound)
    ));
    Ok(())
}

fn own_devices_are_added_to_groups_without_a_grant(store: &mut dyn Store) -> Outcome {
    register(store, &[1, 2, 3])?;
    store.register_device(new_device(4, 1))?;
    store.register_device(new_device(5, 1))?;
    store.commit()?;
    // Device 2 is another account's and was never claimed.
    assert!(matches!(
        store.create_group(new_group(1, device(1), &[device(4), device(2)])),
        Err(StoreError::Forbidden)
    ));
    let created = store.create_group(new_group(1, device(1), &[device(4)]))?;
    assert_eq!(created.members, sorted(vec![device(1), device(4)]));
    // Nor can a device that does not exist be added.
    assert!(matches!(
        store.commit_members(member_commit(&group(1), 1, 0, &[9], &[])),
        Err(StoreError::Forbidden)
    ));
    assert!(matches!(
        store.commit_members(member_commit(&group(1), 4, 0, &[2], &[])),
        Err(StoreError::Forbidden)
    ));
    let committed = store.commit_members(member_commit(&group(1), 4, 0, &[5], &[]))?;
    assert_eq!(
        committed.members,
        sorted(vec![device(1), device(4), device(5)])
    );
    assert_eq!(committed.welcomed, [device(5)]);
    // The usual checks still apply.
    assert!(matches!(
        store.commit_members(member_commit(&group(1), 1, 1, &[5], &[])),
        Err(StoreError::Invalid(_))
    ));
    // The others' devices still need grants, which are consumed.
    claim(store, device(5), 2, 2)?;
    store.commit_members(member_commit(&group(1), 5, 1, &[2], &[]))?;
    store.commit_members(member_commit(&group(1), 5, 2, &[], &[2]))?;
    store.ack_group(&device(2), &group(1), 10)?;
    assert!(matches!(
        store.commit_members(member_commit(&group(1), 5, 3, &[2], &[])),
        Err(StoreError::Forbidden)
    ));
    store.commit()?;
    Ok(())
}

fn a_commit_removes_no_registered_device_of_its_committers_account(
    store: &mut dyn Store,
) -> Outcome {
    let alice = identity(1);
    store.register_device(device_of(&alice, 1))?;
    store.register_device(device_of(&alice, 4))?;
    register(store, &[2])?;
    claim(store, device(4), 2, 2)?;
    // Alice's devices 1 and 4, and device 2 of another account.
    store.create_group(new_group(1, device(4), &[device(1), device(2)]))?;
    store.commit()?;
    // Neither of Alice's devices may cut the other off (a stolen linked one, say), alone or
    // along with another account's device, and a retry at another epoch would not help.
    for (committer, epoch, remove) in [
        (4, 0, &[1][..]),
        (4, 0, &[2, 1]),
        (1, 0, &[4]),
        (4, 5, &[1]),
    ] {
        assert!(
            matches!(
                store.commit_members(member_commit(&group(1), committer, epoch, &[], remove)),
                Err(StoreError::Forbidden)
            ),
            "device {committer} removing {remove:?} at epoch {epoch} must be forbidden"
        );
    }
    store.commit()?;
    // Nothing changed: no entry, every member still in, the group still at epoch 0.
    assert!(
        store
            .group_entries(&group(1), &device(1), 0, 10, NOW)?
            .is_empty()
    );
    assert_eq!(
        store.memberships(&device(1))?,
        vec![Membership {
            group_id: group(1),
            cursor: 0
        }]
    );
    let appended = store.append(
        &group(1),
        &device(1),
        Epoch(0),
        EntryKind::Application,
        b"still here".to_vec(),
        None,
        NOW,
    )?;
    assert_eq!(
        sorted(appended.members),
        sorted(vec![device(1), device(2), device(4)])
    );
    // Another account's device is removed as before.
    let committed = store.commit_members(member_commit(&group(1), 4, 0, &[], &[2]))?;
    assert_eq!(committed.removed, [device(2)]);
    assert_eq!(committed.members, sorted(vec![device(1), device(4)]));
    // Once revoked (which ends its memberships), device 4 may be named; so may an unknown
    // device. Nothing changes for either.
    store.revoke_device(&device(1), &device(4), &revocation(&alice, 4))?;
    let committed = store.commit_members(member_commit(&group(1), 1, 1, &[], &[4, 9]))?;
    store.commit()?;
    assert_eq!(committed.seq, 3);
    assert!(committed.removed.is_empty());
    assert_eq!(committed.members, [device(1)]);
    Ok(())
}

fn an_account_blob_is_seen_by_the_accounts_registered_devices_only(
    store: &mut dyn Store,
) -> Outcome {
    // Device 4 is a second device of account 1, which shares group 1 with devices 2 and 3.
    group_of_three_and_a_second_device_of_account_1(store)?;
    store.create_blob(account_blob(1, device(1), 100), QUOTA)?;
    store.commit()?;
    let expected = BlobRecord {
        blob_id: blob_id(1),
        account_id: account(1),
        uploader: device(1),
        group_id: None,
        size: 100,
        length: 0,
        expires_at: NOW + 30 * DAY,
    };
    for reader in [1, 4] {
        assert_eq!(store.blob(&blob_id(1), &device(reader), NOW)?, expected);
    }
    // Group members are no readers of it, nor is anyone else.
    for reader in [2, 3, 9] {
        assert!(matches!(
            store.blob(&blob_id(1), &device(reader), NOW),
            Err(StoreError::Forbidden)
        ));
    }
    // Only its uploader writes it, and only a registered device creates one.
    assert!(matches!(
        store.set_blob_length(&blob_id(1), &device(4), 10),
        Err(StoreError::Forbidden)
    ));
    store.set_blob_length(&blob_id(1), &device(1), 100)?;
    assert!(matches!(
        store.create_blob(account_blob(2, device(9), 100), QUOTA),
        Err(StoreError::NotFound)
    ));
    Ok(())
}

fn account_blobs_count_against_the_quota_expire_and_go_with_the_account(
    store: &mut dyn Store,
) -> Outcome {
    group_of_three(store)?;
    store.create_blob(new_blob(1, device(1), group(1), 600), QUOTA)?;
    assert!(matches!(
        store.create_blob(account_blob(2, device(1), 401), QUOTA),
        Err(StoreError::QuotaExceeded)
    ));
    store.create_blob(account_blob(2, device(1), 400), QUOTA)?;
    store.create_blob(
        NewBlob {
            expires_at: NOW + DAY,
            ..account_blob(3, device(1), 0)
        },
        QUOTA,
    )?;
    store.create_blob(account_blob(4, device(2), 1000), QUOTA)?;
    for blob in [2, 3, 4] {
        let size = store
            .blob(&blob_id(blob), &device(if blob == 4 { 2 } else { 1 }), NOW)?
            .size;
        store.set_blob_length(&blob_id(blob), &device(if blob == 4 { 2 } else { 1 }), size)?;
    }
    store.commit()?;
    // Having no group, it is not a blob "of a group without members"; it goes when it expires.
    store.expire(NOW + DAY, 0)?;
    store.commit()?;
    assert_eq!(
        store.live_blob_ids()?,
        vec![blob_id(1), blob_id(2), blob_id(4)]
    );
    store.delete_account(&account(1))?;
    store.commit()?;
    assert_eq!(store.live_blob_ids()?, vec![blob_id(4)]);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Recovery and backups
// ---------------------------------------------------------------------------------------------

/// Registers device `number` of the account of identity `number`, with a certificate naming
/// that identity key so that the account's signatures check out; returns the account.
fn register_owner(store: &mut dyn Store, number: u8) -> Result<AccountId, StoreError> {
    store.register_device(device_of(&identity(number), number))?;
    Ok(account_of_identity(&identity(number)))
}

/// The key a client derives from recovery key `key` for `recover`.
fn auth_key(key: u8) -> [u8; 32] {
    [key; 32]
}

/// What `set_recovery` stores for recovery key `key`.
fn verifier(key: u8) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    Sha256::digest(auth_key(key)).into()
}

/// Where recovery key `key` finds its bundle.
fn locator(key: u8) -> [u8; 32] {
    [key.wrapping_add(100); 32]
}

/// Recovery key `key` with `bundle`, signed by `identity`.
fn recovery(identity: &ed25519_dalek::SigningKey, key: u8, bundle: &[u8]) -> NewRecovery {
    use ed25519_dalek::Signer;
    let payload = miyu_proto::cert::recovery_payload(&verifier(key), &locator(key), bundle);
    NewRecovery {
        verifier: verifier(key),
        locator: locator(key),
        bundle: bundle.to_vec(),
        signature: identity.sign(&payload).to_bytes().to_vec(),
    }
}

/// Device `owner` of the account of identity `owner` sets up recovery key `key`.
fn set_recovery(store: &mut dyn Store, owner: u8, key: u8, bundle: &[u8]) -> Outcome {
    store.set_recovery(&device(owner), recovery(&identity(owner), key, bundle))
}

fn granted(store: &mut dyn Store, key: u8, now: u64) -> Result<RecoveryBundle, StoreError> {
    match store.recover(&locator(key), &auth_key(key), now)? {
        Recovery::Granted(bundle) => Ok(bundle),
        other => panic!("expected the bundle, got {other:?}"),
    }
}

/// A finished blob of owner 1's account, uploaded by its device 1, that expires in 30 days.
fn finished_account_blob(store: &mut dyn Store, number: u8, size: u64) -> Outcome {
    store.create_blob(account_blob(number, device(1), size), QUOTA)?;
    store.set_blob_length(&blob_id(number), &device(1), size)
}

fn a_recovery_bundle_is_found_by_its_locator_for_the_right_key_and_replaced_by_the_next(
    store: &mut dyn Store,
) -> Outcome {
    register_owner(store, 1)?;
    register_owner(store, 2)?;
    set_recovery(store, 1, 1, b"sealed 1")?;
    store.commit()?;
    assert_eq!(
        granted(store, 1, NOW)?,
        RecoveryBundle {
            bundle: b"sealed 1".to_vec(),
            backup: Vec::new()
        }
    );
    // A right key counts no failure: it can be used again and again.
    for _ in 0..10 {
        assert_eq!(granted(store, 1, NOW)?.bundle, b"sealed 1");
    }
    // The right key at another locator finds nothing.
    assert!(matches!(
        store.recover(&locator(2), &auth_key(1), NOW),
        Err(StoreError::NotFound)
    ));

    // A new recovery key replaces the bundle, its verifier and its locator.
    set_recovery(store, 1, 2, b"sealed 2")?;
    store.commit()?;
    assert!(matches!(
        store.recover(&locator(1), &auth_key(1), NOW),
        Err(StoreError::NotFound)
    ));
    assert_eq!(
        store.recover(&locator(2), &auth_key(1), NOW)?,
        Recovery::WrongKey
    );
    assert_eq!(granted(store, 2, NOW)?.bundle, b"sealed 2");
    // Another account cannot take a locator in use.
    assert!(matches!(
        set_recovery(store, 2, 2, b"sealed 3"),
        Err(StoreError::AlreadyExists)
    ));
    store.commit()?;
    assert_eq!(granted(store, 2, NOW)?.bundle, b"sealed 2");
    Ok(())
}

fn only_the_accounts_identity_key_sets_its_recovery_bundle(store: &mut dyn Store) -> Outcome {
    register_owner(store, 1)?;
    // Device 4 is a device of the same account (its certificate names the identity key).
    store.register_device(device_of(&identity(1), 4))?;
    register_owner(store, 2)?;
    set_recovery(store, 1, 1, b"sealed")?;
    store.commit()?;
    let signed = recovery(&identity(1), 1, b"sealed");
    for (requester, spoilt) in [
        // Another identity's signature; one over other bytes; no signature worth the name.
        (device(1), recovery(&identity(2), 1, b"spoilt")),
        (
            device(1),
            NewRecovery {
                bundle: b"spoilt".to_vec(),
                ..signed.clone()
            },
        ),
        (
            device(1),
            NewRecovery {
                locator: locator(3),
                ..signed.clone()
            },
        ),
        (
            device(4),
            NewRecovery {
                signature: vec![0; 64],
                ..recovery(&identity(1), 1, b"spoilt")
            },
        ),
        (
            device(4),
            NewRecovery {
                signature: vec![1, 2, 3],
                ..recovery(&identity(1), 1, b"spoilt")
            },
        ),
        // A device that is not registered, even with the right signature.
        (device(9), recovery(&identity(1), 1, b"spoilt")),
    ] {
        assert!(
            matches!(
                store.set_recovery(&requester, spoilt),
                Err(StoreError::AuthenticationFailed)
            ),
            "from {requester:?}"
        );
    }
    store.commit()?;
    assert_eq!(granted(store, 1, NOW)?.bundle, b"sealed");
    // Any registered device of the account may carry what the identity key signed.
    store.set_recovery(&device(4), recovery(&identity(1), 1, b"sealed again"))?;
    store.commit()?;
    assert_eq!(granted(store, 1, NOW)?.bundle, b"sealed again");
    // The account's signature is its own: another account's device cannot use it.
    assert!(matches!(
        store.set_recovery(&device(2), recovery(&identity(1), 5, b"sealed")),
        Err(StoreError::AuthenticationFailed)
    ));
    Ok(())
}

/// The window opens with the first failure and ends a day after the end of its hour.
fn wrong_recovery_keys_lock_the_bundle_for_a_day_even_against_the_right_key(
    store: &mut dyn Store,
) -> Outcome {
    register_owner(store, 1)?;
    register_owner(store, 2)?;
    set_recovery(store, 1, 1, b"sealed 1")?;
    set_recovery(store, 2, 2, b"sealed 2")?;
    store.commit()?;
    let first_failure = NOW + HOUR / 2;
    for attempt in 0..5 {
        assert_eq!(
            store.recover(&locator(1), &auth_key(9), first_failure + attempt)?,
            Recovery::WrongKey
        );
        // Each failure is kept with the batch it was made in.
        store.commit()?;
    }
    let window_end = NOW + HOUR + DAY;
    for key in [1, 9] {
        assert_eq!(
            store.recover(&locator(1), &auth_key(key), window_end - 1)?,
            Recovery::Locked
        );
    }
    // Another bundle is not held up.
    assert_eq!(granted(store, 2, NOW + HOUR)?.bundle, b"sealed 2");

    assert_eq!(granted(store, 1, window_end)?.bundle, b"sealed 1");
    // A new window opens with the next failure, with five attempts again.
    for _ in 0..5 {
        assert_eq!(
            store.recover(&locator(1), &auth_key(9), window_end)?,
            Recovery::WrongKey
        );
    }
    store.commit()?;
    assert_eq!(
        store.recover(&locator(1), &auth_key(1), window_end + DAY)?,
        Recovery::Locked
    );
    assert_eq!(
        granted(store, 1, window_end + DAY + HOUR)?.bundle,
        b"sealed 1"
    );
    Ok(())
}

fn setting_the_recovery_again_forgets_the_failures(store: &mut dyn Store) -> Outcome {
    register_owner(store, 1)?;
    set_recovery(store, 1, 1, b"sealed")?;
    for _ in 0..5 {
        store.recover(&locator(1), &auth_key(9), NOW)?;
    }
    store.commit()?;
    assert_eq!(
        store.recover(&locator(1), &auth_key(1), NOW)?,
        Recovery::Locked
    );
    set_recovery(store, 1, 1, b"sealed again")?;
    store.commit()?;
    assert_eq!(granted(store, 1, NOW)?.bundle, b"sealed again");
    // All five attempts are back.
    for _ in 0..5 {
        assert_eq!(
            store.recover(&locator(1), &auth_key(9), NOW)?,
            Recovery::WrongKey
        );
    }
    assert_eq!(
        store.recover(&locator(1), &auth_key(1), NOW)?,
        Recovery::Locked
    );
    Ok(())
}

fn recovering_at_an_unknown_locator_is_not_found_and_counts_nothing(
    store: &mut dyn Store,
) -> Outcome {
    register_owner(store, 1)?;
    store.commit()?;
    for key in [1, 9] {
        for _ in 0..10 {
            assert!(matches!(
                store.recover(&locator(key), &auth_key(key), NOW),
                Err(StoreError::NotFound)
            ));
        }
    }
    set_recovery(store, 1, 1, b"sealed")?;
    // Whoever does not know the locator cannot spend the bundle's attempts.
    for _ in 0..10 {
        assert!(matches!(
            store.recover(&locator(9), &auth_key(9), NOW),
            Err(StoreError::NotFound)
        ));
    }
    for _ in 0..4 {
        store.recover(&locator(1), &auth_key(9), NOW)?;
    }
    assert_eq!(granted(store, 1, NOW)?.bundle, b"sealed");
    Ok(())
}

/// One segment of `size` plaintext bytes in blob `number`.
fn segment(number: u8, size: u64) -> BackupSegment {
    BackupSegment {
        blob_id: blob_id(number),
        size,
    }
}

/// The backup of the account whose bundle recovery key 1 opens, as `recover` hands it out.
fn backup_of(store: &mut dyn Store) -> Result<Vec<BackupSegment>, StoreError> {
    Ok(granted(store, 1, NOW)?.backup)
}

/// Owner 1's account with recovery key 1 set up.
fn owner_with_recovery(store: &mut dyn Store) -> Result<AccountId, StoreError> {
    let owner = register_owner(store, 1)?;
    set_recovery(store, 1, 1, b"sealed")?;
    Ok(owner)
}

fn a_backup_is_a_finished_unexpired_blob_of_the_account_and_of_no_group(
    store: &mut dyn Store,
) -> Outcome {
    let owner = owner_with_recovery(store)?;
    // Device 4 is a second device of the account; device 2 is another account's.
    store.register_device(device_of(&identity(1), 4))?;
    register_owner(store, 2)?;
    store.create_group(new_group(1, device(1), &[]))?;
    store.create_blob(new_blob(1, device(1), group(1), 10), QUOTA)?;
    store.set_blob_length(&blob_id(1), &device(1), 10)?;
    store.create_blob(account_blob(2, device(2), 10), QUOTA)?;
    store.set_blob_length(&blob_id(2), &device(2), 10)?;
    store.create_blob(account_blob(3, device(1), 10), QUOTA)?;
    store.set_blob_length(&blob_id(3), &device(1), 9)?;
    store.create_blob(
        NewBlob {
            expires_at: NOW + HOUR,
            ..account_blob(4, device(1), 10)
        },
        QUOTA,
    )?;
    store.set_blob_length(&blob_id(4), &device(1), 10)?;
    // Any device of the account may have uploaded it.
    store.create_blob(account_blob(5, device(4), 10), QUOTA)?;
    store.set_blob_length(&blob_id(5), &device(4), 10)?;
    finished_account_blob(store, 6, 10)?;
    store.commit()?;

    // A group's blob, another account's, an unfinished one, an expired one, an unknown one:
    // neither a whole backup nor a segment appended.
    for (number, now) in [(1, NOW), (2, NOW), (3, NOW), (4, NOW + HOUR), (9, NOW)] {
        assert!(
            matches!(
                store.set_backup(&owner, segment(number, 100), None, now),
                Err(StoreError::NotFound)
            ),
            "blob {number}"
        );
    }
    assert!(
        store
            .set_backup(&owner, segment(5, 100), None, NOW)?
            .is_empty()
    );
    store.commit()?;
    for (number, now) in [(1, NOW), (2, NOW), (3, NOW), (4, NOW + HOUR), (9, NOW)] {
        assert!(
            matches!(
                store.set_backup(&owner, segment(number, 100), Some(&blob_id(5)), now),
                Err(StoreError::NotFound)
            ),
            "blob {number} appended"
        );
    }
    // A refused one changes nothing.
    assert_eq!(backup_of(store)?, [segment(5, 100)]);
    assert_eq!(
        store.live_blob_ids()?,
        [1, 2, 3, 4, 5, 6].map(blob_id).to_vec()
    );
    Ok(())
}

fn naming_another_backup_deletes_the_one_before(store: &mut dyn Store) -> Outcome {
    let owner = owner_with_recovery(store)?;
    for number in [1, 2] {
        finished_account_blob(store, number, 10)?;
    }
    store.commit()?;
    assert!(
        store
            .set_backup(&owner, segment(1, 100), None, NOW)?
            .is_empty()
    );
    assert_eq!(
        store.set_backup(&owner, segment(2, 200), None, NOW)?,
        [blob_id(1)]
    );
    store.commit()?;
    assert_eq!(store.live_blob_ids()?, [blob_id(2)]);
    assert!(matches!(
        store.blob(&blob_id(1), &device(1), NOW),
        Err(StoreError::NotFound)
    ));
    // Naming the same blob again only changes its size.
    assert!(
        store
            .set_backup(&owner, segment(2, 300), None, NOW)?
            .is_empty()
    );
    assert_eq!(backup_of(store)?, [segment(2, 300)]);
    assert_eq!(store.live_blob_ids()?, [blob_id(2)]);
    Ok(())
}

fn the_backup_outlives_its_expiry_while_it_is_named(store: &mut dyn Store) -> Outcome {
    let owner = register_owner(store, 1)?;
    for number in [1, 2] {
        store.create_blob(
            NewBlob {
                expires_at: NOW + DAY,
                ..account_blob(number, device(1), 10)
            },
            QUOTA,
        )?;
        store.set_blob_length(&blob_id(number), &device(1), 10)?;
    }
    store.set_backup(&owner, segment(1, 100), None, NOW)?;
    store.commit()?;
    let later = NOW + 90 * DAY;
    store.touch_account(&owner, None, later)?;
    assert_eq!(store.expire(later, later)?, 1);
    store.commit()?;
    assert_eq!(store.live_blob_ids()?, [blob_id(1)]);
    // It is still handed out, past its expiry, and can be named again.
    assert_eq!(store.blob(&blob_id(1), &device(1), later)?.length, 10);
    assert!(
        store
            .set_backup(&owner, segment(1, 100), None, later)?
            .is_empty()
    );

    // Replaced, it goes at once.
    finished_account_blob(store, 3, 10)?;
    assert_eq!(
        store.set_backup(&owner, segment(3, 100), None, NOW)?,
        [blob_id(1)]
    );
    store.commit()?;
    assert_eq!(store.live_blob_ids()?, [blob_id(3)]);
    Ok(())
}

fn recovery_and_backup_go_with_the_account(store: &mut dyn Store) -> Outcome {
    let first = register_owner(store, 1)?;
    let second = register_owner(store, 2)?;
    for number in [1, 2] {
        set_recovery(store, number, number, b"sealed")?;
    }
    finished_account_blob(store, 1, 10)?;
    store.set_backup(&first, segment(1, 100), None, NOW)?;
    store.create_blob(account_blob(2, device(2), 10), QUOTA)?;
    store.set_blob_length(&blob_id(2), &device(2), 10)?;
    store.set_backup(&second, segment(2, 100), None, NOW)?;
    store.touch_account(&second, Some(30), NOW)?;
    store.commit()?;

    store.delete_account(&first)?;
    store.commit()?;
    assert!(matches!(
        store.recover(&locator(1), &auth_key(1), NOW),
        Err(StoreError::NotFound)
    ));
    assert_eq!(store.live_blob_ids()?, [blob_id(2)]);

    // So do an inactive account's, backup and all.
    store.expire(NOW + 30 * DAY, 0)?;
    store.commit()?;
    assert!(matches!(
        store.recover(&locator(2), &auth_key(2), NOW + 30 * DAY),
        Err(StoreError::NotFound)
    ));
    assert!(store.live_blob_ids()?.is_empty());

    // A new account of the same identity starts with neither, and may take the locator again.
    register_owner(store, 1)?;
    assert!(matches!(
        store.recover(&locator(1), &auth_key(1), NOW),
        Err(StoreError::NotFound)
    ));
    set_recovery(store, 1, 2, b"sealed again")?;
    assert_eq!(granted(store, 2, NOW)?.bundle, b"sealed again");
    Ok(())
}

fn segments_are_appended_in_order_after_the_last_one_named(store: &mut dyn Store) -> Outcome {
    let owner = owner_with_recovery(store)?;
    for number in 1..=5 {
        finished_account_blob(store, number, 10)?;
    }
    store.commit()?;
    // Nothing to append to yet.
    assert!(matches!(
        store.set_backup(&owner, segment(2, 20), Some(&blob_id(1)), NOW),
        Err(StoreError::NotFound)
    ));
    store.set_backup(&owner, segment(1, 100), None, NOW)?;
    assert!(
        store
            .set_backup(&owner, segment(2, 20), Some(&blob_id(1)), NOW)?
            .is_empty()
    );
    assert!(
        store
            .set_backup(&owner, segment(3, 30), Some(&blob_id(2)), NOW)?
            .is_empty()
    );
    store.commit()?;
    let chain = [segment(1, 100), segment(2, 20), segment(3, 30)];
    assert_eq!(backup_of(store)?, chain);

    // After any segment but the last (another device's chain moved on), after a blob not in
    // the chain, or a segment the chain holds already: refused, and nothing changes.
    for after in [1, 2, 5] {
        assert!(
            matches!(
                store.set_backup(&owner, segment(4, 40), Some(&blob_id(after)), NOW),
                Err(StoreError::NotFound)
            ),
            "after blob {after}"
        );
    }
    for again in [1, 3] {
        assert!(
            matches!(
                store.set_backup(&owner, segment(again, 40), Some(&blob_id(3)), NOW),
                Err(StoreError::Invalid(_))
            ),
            "blob {again} again"
        );
    }
    store.commit()?;
    assert_eq!(backup_of(store)?, chain);
    assert_eq!(
        store.live_blob_ids()?,
        [1, 2, 3, 4, 5].map(blob_id).to_vec()
    );
    Ok(())
}

fn a_whole_backup_replaces_the_chain_and_deletes_its_segments(store: &mut dyn Store) -> Outcome {
    let owner = owner_with_recovery(store)?;
    for number in 1..=5 {
        finished_account_blob(store, number, 10)?;
    }
    store.set_backup(&owner, segment(1, 100), None, NOW)?;
    store.set_backup(&owner, segment(2, 20), Some(&blob_id(1)), NOW)?;
    store.set_backup(&owner, segment(3, 30), Some(&blob_id(2)), NOW)?;
    store.commit()?;

    let mut replaced = store.set_backup(&owner, segment(4, 400), None, NOW)?;
    replaced.sort();
    assert_eq!(replaced, [1, 2, 3].map(blob_id));
    store.commit()?;
    assert_eq!(backup_of(store)?, [segment(4, 400)]);
    assert_eq!(store.live_blob_ids()?, [blob_id(4), blob_id(5)]);
    // The new chain grows after its own first segment only.
    assert!(matches!(
        store.set_backup(&owner, segment(5, 50), Some(&blob_id(3)), NOW),
        Err(StoreError::NotFound)
    ));
    store.set_backup(&owner, segment(5, 50), Some(&blob_id(4)), NOW)?;
    // A segment of the chain named as the whole backup: the others go.
    assert_eq!(
        store.set_backup(&owner, segment(5, 500), None, NOW)?,
        [blob_id(4)]
    );
    store.commit()?;
    assert_eq!(backup_of(store)?, [segment(5, 500)]);
    assert_eq!(store.live_blob_ids()?, [blob_id(5)]);
    Ok(())
}

fn a_backup_holds_at_most_64_segments(store: &mut dyn Store) -> Outcome {
    let owner = owner_with_recovery(store)?;
    for number in 1..=66 {
        finished_account_blob(store, number, 1)?;
    }
    store.set_backup(&owner, segment(1, 1), None, NOW)?;
    for number in 2..=64 {
        store.set_backup(&owner, segment(number, 1), Some(&blob_id(number - 1)), NOW)?;
    }
    store.commit()?;
    assert_eq!(backup_of(store)?.len(), MAX_BACKUP_SEGMENTS);
    assert!(matches!(
        store.set_backup(&owner, segment(65, 1), Some(&blob_id(64)), NOW),
        Err(StoreError::Invalid(_))
    ));
    store.commit()?;
    let chain = backup_of(store)?;
    assert_eq!(chain.len(), 64);
    assert_eq!(chain.last(), Some(&segment(64, 1)));
    // A whole backup starts a chain again.
    assert_eq!(
        store.set_backup(&owner, segment(65, 1), None, NOW)?.len(),
        64
    );
    store.set_backup(&owner, segment(66, 1), Some(&blob_id(65)), NOW)?;
    store.commit()?;
    assert_eq!(backup_of(store)?, [segment(65, 1), segment(66, 1)]);
    Ok(())
}

fn every_segment_outlives_its_expiry_and_goes_with_the_account(store: &mut dyn Store) -> Outcome {
    let owner = owner_with_recovery(store)?;
    let other = register_owner(store, 2)?;
    for number in 1..=4 {
        store.create_blob(
            NewBlob {
                expires_at: NOW + DAY,
                ..account_blob(number, device(1), 10)
            },
            QUOTA,
        )?;
        store.set_blob_length(&blob_id(number), &device(1), 10)?;
    }
    store.create_blob(account_blob(5, device(2), 10), QUOTA)?;
    store.set_blob_length(&blob_id(5), &device(2), 10)?;
    store.set_backup(&other, segment(5, 10), None, NOW)?;
    store.set_backup(&owner, segment(1, 100), None, NOW)?;
    store.set_backup(&owner, segment(2, 20), Some(&blob_id(1)), NOW)?;
    store.set_backup(&owner, segment(3, 30), Some(&blob_id(2)), NOW)?;
    store.commit()?;

    // Blob 4 was never a segment: it expires; the three segments stay and are handed out.
    let later = NOW + 90 * DAY;
    store.touch_account(&owner, None, later)?;
    store.touch_account(&other, None, later)?;
    assert_eq!(store.expire(later, later)?, 1);
    store.commit()?;
    assert_eq!(store.live_blob_ids()?, [1, 2, 3, 5].map(blob_id).to_vec());
    for number in 1..=3 {
        assert_eq!(store.blob(&blob_id(number), &device(1), later)?.length, 10);
    }
    // The blob that expired is gone: it cannot become a segment.
    assert!(matches!(
        store.set_backup(&owner, segment(4, 40), Some(&blob_id(3)), later),
        Err(StoreError::NotFound)
    ));

    store.delete_account(&owner)?;
    store.commit()?;
    assert_eq!(store.live_blob_ids()?, [blob_id(5)]);
    assert!(matches!(
        store.recover(&locator(1), &auth_key(1), later),
        Err(StoreError::NotFound)
    ));
    Ok(())
}
