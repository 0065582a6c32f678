//! The `group-sizes` scenario: what Miyu's own MLS glue costs as a group grows — the client's
//! code path (`miyu_crypto::mls`), with real device certificates in every leaf, the SQLite
//! storage provider (in memory, so the disk is not in the figures) and every member checked as
//! a client checks it — and whether the results fit in one frame (1 MiB), since the client
//! sends a group's Welcome and commits in single requests.
//!
//! One committer creates the group with everyone in one commit; one observer joins from that
//! Welcome and processes the later commits; the committer then adds one member and removes
//! it. The other members exist as key packages only. Each figure is one sample.

use std::time::Instant;

use anyhow::{Context, Result, ensure};
use miyu_crypto::identity::AccountKeys;
use miyu_crypto::mls::{self, Incoming, KeyPackage, Provider};
use miyu_proto::frame::MAX_FRAME_BYTES;
use rusqlite::Connection;
use serde::Serialize;

/// What one group size measured.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct GroupSizes {
    pub(crate) members: usize,
    /// The committer checking the key packages the server handed out (certificate and MLS).
    pub(crate) check_key_packages_seconds: f64,
    /// Building the group with everyone in one commit, merged.
    pub(crate) create_seconds: f64,
    pub(crate) create_welcome_bytes: usize,
    /// The observer joining from that Welcome (every leaf's certificate checked).
    pub(crate) join_seconds: f64,
    /// Adding one member: building the commit, its size, the Welcome's size, and the observer
    /// processing and merging it.
    pub(crate) add_build_ms: f64,
    pub(crate) add_commit_bytes: usize,
    pub(crate) add_welcome_bytes: usize,
    pub(crate) add_process_ms: f64,
    /// Removing that member again.
    pub(crate) remove_build_ms: f64,
    pub(crate) remove_commit_bytes: usize,
    pub(crate) remove_process_ms: f64,
    /// The largest of the above that must travel in one request, against the frame limit.
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

/// Measures one group size.
pub(crate) fn run(members: usize) -> Result<GroupSizes> {
    ensure!(members >= 2, "a group needs at least two members");
    let (committer_db, observer_db, others_db) = (database()?, database()?, database()?);
    let committer = AccountKeys::generate(&mut rand::rngs::OsRng);
    let observer = AccountKeys::generate(&mut rand::rngs::OsRng);
    let joiner = AccountKeys::generate(&mut rand::rngs::OsRng);

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
    let joiner_package = key_package(&others_db, &joiner)?;

    let provider = Provider::new(&committer_db);
    let started = Instant::now();
    let packages: Vec<KeyPackage> = handed_out
        .iter()
        .map(|(bytes, certificate)| mls::check_key_package(&provider, bytes, certificate))
        .collect::<Result<_, _>>()
        .context("checking key packages")?;
    let check_key_packages_seconds = started.elapsed().as_secs_f64();
    let joiner_package = mls::check_key_package(&provider, &joiner_package, joiner.certificate())?;

    let group_id = [7u8; 32];
    let started = Instant::now();
    let created = mls::create_group(&provider, &committer, &group_id, &packages)
        .context("creating the group")?;
    let create_seconds = started.elapsed().as_secs_f64();
    let mut group = created.group;

    let observer_provider = Provider::new(&observer_db);
    let started = Instant::now();
    mls::join_group(&observer_provider, &created.welcome).context("joining")?;
    let join_seconds = started.elapsed().as_secs_f64();
    let mut observed = mls::load_group(&observer_provider, &group_id)?.context("no group")?;

    let started = Instant::now();
    let (add_commit, add_welcome) = mls::add_members(
        &provider,
        &committer,
        &mut group,
        std::slice::from_ref(&joiner_package),
    )?;
    let add_build_ms = started.elapsed().as_secs_f64() * 1e3;
    mls::merge_own_commit(&provider, &mut group)?;
    let started = Instant::now();
    ensure!(
        matches!(
            mls::process(&observer_provider, &mut observed, &add_commit, true)?,
            Incoming::Commit(_)
        ),
        "the add was not a commit"
    );
    let add_process_ms = started.elapsed().as_secs_f64() * 1e3;

    let leaf = mls::members(&group)
        .into_iter()
        .find(|(_, certificate)| certificate == joiner.certificate())
        .context("the added member is missing")?
        .0;
    let started = Instant::now();
    let remove_commit = mls::remove_members(&provider, &committer, &mut group, &[leaf])?;
    let remove_build_ms = started.elapsed().as_secs_f64() * 1e3;
    mls::merge_own_commit(&provider, &mut group)?;
    let started = Instant::now();
    mls::process(&observer_provider, &mut observed, &remove_commit, true)?;
    let remove_process_ms = started.elapsed().as_secs_f64() * 1e3;

    let largest = [
        created.welcome.len(),
        add_commit.len(),
        add_welcome.len(),
        remove_commit.len(),
    ]
    .into_iter()
    .max()
    .unwrap_or(0);
    Ok(GroupSizes {
        members,
        check_key_packages_seconds,
        create_seconds,
        create_welcome_bytes: created.welcome.len(),
        join_seconds,
        add_build_ms,
        add_commit_bytes: add_commit.len(),
        add_welcome_bytes: add_welcome.len(),
        add_process_ms,
        remove_build_ms,
        remove_commit_bytes: remove_commit.len(),
        remove_process_ms,
        // Room for the request's other fields.
        fits_in_a_frame: largest + 4096 <= MAX_FRAME_BYTES,
    })
}
