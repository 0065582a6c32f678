//! The `group-sizes` scenario: what Miyu's own MLS glue costs as a group grows — the client's
//! code path (`miyu_crypto::mls`), with real device certificates in every leaf, the SQLite
//! storage provider (in memory, so the disk is not in the figures) and every member checked as
//! a client checks it — and whether each request fits in one frame (1 MiB).
//!
//! The committer builds the group as the client does: a group of one, then commits adding
//! [`ADD_BATCH_DEVICES`] members each, every one with its Welcome and the ratchet tree sealed
//! apart (PROTOCOL.md §10.9). An observer joins with the first batch and follows every later
//! commit. Then, at full size: a newcomer is added and joins from its Welcome and the served
//! tree; the observer updates its own keys; the committer removes the newcomer. The other
//! members exist as key packages only. Each figure is one sample.

use std::time::Instant;

use anyhow::{Context, Result, ensure};
use miyu_client::groups::ADD_BATCH_DEVICES;
use miyu_crypto::identity::AccountKeys;
use miyu_crypto::mls::{self, Incoming, KeyPackage, MlsGroup, Provider, Tree};
use miyu_proto::frame::MAX_FRAME_BYTES;
use rusqlite::Connection;
use serde::Serialize;

/// What one group size measured.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct GroupSizes {
    pub(crate) members: usize,
    /// The committer checking the key packages the server handed out (certificate and MLS).
    pub(crate) check_key_packages_seconds: f64,
    /// Building the group batch by batch, sealing each batch's tree.
    pub(crate) create_seconds: f64,
    pub(crate) create_batches: usize,
    /// The largest commit and Welcome of one batch together: one request.
    pub(crate) create_largest_request_bytes: usize,
    /// The sealed ratchet tree of the full group, as uploaded (padding included).
    pub(crate) tree_bytes: usize,
    /// Adding one member to the full group: building the commit, its size, the Welcome's size
    /// (without the tree), and the observer processing and merging it.
    pub(crate) add_build_ms: f64,
    pub(crate) add_commit_bytes: usize,
    pub(crate) add_welcome_bytes: usize,
    pub(crate) add_process_ms: f64,
    /// That newcomer opening the served tree and joining (every leaf's certificate checked).
    pub(crate) join_seconds: f64,
    /// The observer's self-update: building it, its size, the committer processing it.
    pub(crate) update_build_ms: f64,
    pub(crate) update_commit_bytes: usize,
    pub(crate) update_process_ms: f64,
    /// Removing the newcomer again.
    pub(crate) remove_build_ms: f64,
    pub(crate) remove_commit_bytes: usize,
    pub(crate) remove_process_ms: f64,
    /// Every request above under the frame limit.
    pub(crate) fits_in_a_frame: bool,
}

fn database() -> Result<Connection> {
    let mut connection = Connection::open_in_memory().context("opening SQLite")?;
    mls::migrate(&mut connection).context("creating the MLS tables")?;
    Ok(connection)
}

fn key_package(db: &Connection, keys: &AccountKeys) -> Result<Vec<u8>> {
    mls::new_key_package(&Provider::new(db), keys, false).context("making a key package")
}

fn expect_commit(provider: &Provider<'_>, group: &mut MlsGroup, commit: &[u8]) -> Result<()> {
    ensure!(
        matches!(
            mls::process(provider, group, commit, true)?,
            Incoming::Commit(_)
        ),
        "not a commit"
    );
    Ok(())
}

/// Measures one group size.
pub(crate) fn run(members: usize) -> Result<GroupSizes> {
    ensure!(members >= 2, "a group needs at least two members");
    let (committer_db, observer_db, others_db, newcomer_db) =
        (database()?, database()?, database()?, database()?);
    let committer = AccountKeys::generate(&mut rand::rngs::OsRng);
    let observer = AccountKeys::generate(&mut rand::rngs::OsRng);
    let newcomer = AccountKeys::generate(&mut rand::rngs::OsRng);

    // Setup (not timed): every member's key package as the server would hand it out.
    let mut handed_out = vec![(
        key_package(&observer_db, &observer)?,
        observer.certificate().clone(),
    )];
    for _ in 2..members {
        let other = AccountKeys::generate(&mut rand::rngs::OsRng);
        handed_out.push((
            key_package(&others_db, &other)?,
            other.certificate().clone(),
        ));
    }
    let newcomer_package = key_package(&newcomer_db, &newcomer)?;

    let provider = Provider::new(&committer_db);
    let started = Instant::now();
    let packages: Vec<KeyPackage> = handed_out
        .iter()
        .map(|(bytes, certificate)| mls::check_key_package(&provider, bytes, certificate))
        .collect::<Result<_, _>>()
        .context("checking key packages")?;
    let check_key_packages_seconds = started.elapsed().as_secs_f64();
    let newcomer_package =
        mls::check_key_package(&provider, &newcomer_package, newcomer.certificate())?;

    let group_id = [7u8; 32];
    let observer_provider = Provider::new(&observer_db);
    let mut observed: Option<MlsGroup> = None;
    let mut create_seconds = 0.0;
    let mut create_largest_request_bytes = 0;
    let started = Instant::now();
    let mut group = mls::create_group(&provider, &committer, &group_id, &[], Tree::Served)
        .context("creating the group")?
        .group;
    create_seconds += started.elapsed().as_secs_f64();
    let batches: Vec<&[KeyPackage]> = packages.chunks(ADD_BATCH_DEVICES).collect();
    for batch in &batches {
        let started = Instant::now();
        let added =
            mls::add_members(&provider, &committer, &mut group, batch).context("adding a batch")?;
        mls::merge_own_commit(&provider, &mut group)?;
        create_seconds += started.elapsed().as_secs_f64();
        create_largest_request_bytes =
            create_largest_request_bytes.max(added.commit.len() + added.welcome.len());
        // The observer is in the first batch and follows the others (not timed).
        match observed.as_mut() {
            None => {
                mls::join_group(
                    &observer_provider,
                    &added.welcome,
                    Some(added.tree.sealed()),
                )
                .context("the observer joining")?;
                observed = mls::load_group(&observer_provider, &group_id)?;
            }
            Some(observed) => expect_commit(&observer_provider, observed, &added.commit)?,
        }
    }
    let mut observed = observed.context("the observer never joined")?;

    let started = Instant::now();
    let added = mls::add_members(
        &provider,
        &committer,
        &mut group,
        std::slice::from_ref(&newcomer_package),
    )?;
    let add_build_ms = started.elapsed().as_secs_f64() * 1e3;
    mls::merge_own_commit(&provider, &mut group)?;
    let started = Instant::now();
    expect_commit(&observer_provider, &mut observed, &added.commit)?;
    let add_process_ms = started.elapsed().as_secs_f64() * 1e3;

    let newcomer_provider = Provider::new(&newcomer_db);
    let started = Instant::now();
    let joined = mls::join_group(
        &newcomer_provider,
        &added.welcome,
        Some(added.tree.sealed()),
    )
    .context("the newcomer joining")?;
    let join_seconds = started.elapsed().as_secs_f64();
    ensure!(
        joined.members.len() == members + 1,
        "the newcomer sees {} members",
        joined.members.len()
    );

    let started = Instant::now();
    let update = mls::self_update(&observer_provider, &observer, &mut observed)?;
    let update_build_ms = started.elapsed().as_secs_f64() * 1e3;
    mls::merge_own_commit(&observer_provider, &mut observed)?;
    let started = Instant::now();
    expect_commit(&provider, &mut group, &update)?;
    let update_process_ms = started.elapsed().as_secs_f64() * 1e3;

    let leaf = mls::members(&group)
        .into_iter()
        .find(|(_, certificate)| certificate == newcomer.certificate())
        .context("the added member is missing")?
        .0;
    let started = Instant::now();
    let remove_commit = mls::remove_members(&provider, &committer, &mut group, &[leaf], &[])?;
    let remove_build_ms = started.elapsed().as_secs_f64() * 1e3;
    mls::merge_own_commit(&provider, &mut group)?;
    let started = Instant::now();
    expect_commit(&observer_provider, &mut observed, &remove_commit)?;
    let remove_process_ms = started.elapsed().as_secs_f64() * 1e3;

    let largest = [
        create_largest_request_bytes,
        added.commit.len() + added.welcome.len(),
        update.len(),
        remove_commit.len(),
    ]
    .into_iter()
    .max()
    .unwrap_or(0);
    Ok(GroupSizes {
        members,
        check_key_packages_seconds,
        create_seconds,
        create_batches: batches.len(),
        create_largest_request_bytes,
        tree_bytes: added.tree.blob.len(),
        add_build_ms,
        add_commit_bytes: added.commit.len(),
        add_welcome_bytes: added.welcome.len(),
        add_process_ms,
        join_seconds,
        update_build_ms,
        update_commit_bytes: update.len(),
        update_process_ms,
        remove_build_ms,
        remove_commit_bytes: remove_commit.len(),
        remove_process_ms,
        // Room for the request's other fields.
        fits_in_a_frame: largest + 4096 <= MAX_FRAME_BYTES,
    })
}
