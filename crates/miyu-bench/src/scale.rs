//! The `mls-scale` scenario: what MLS group operations cost as a group grows to thousands of
//! members, measured with openmls alone in this process (no server, no network).
//!
//! For each group size N one member, the committer, creates the group and adds everyone else;
//! one other member, the observer, joins and processes every later commit; two outsiders join
//! from the Welcome of a one-member add, one with the ratchet tree inside the Welcome and one
//! with the tree delivered apart. Only these four hold a real group state: the other N-2
//! members exist as key packages only, which is all the committer needs from them.
//!
//! Everything uses Miyu's ciphersuite, padding and encrypted handshake messages, but
//! openmls's in-memory provider (`OpenMlsRustCrypto`, `MemoryStorage`) instead of the client's
//! SQLite provider, and basic credentials without Miyu's device certificates: the figures are
//! openmls's own costs, without the database writes and certificate checks a client adds.
//!
//! Key packages are made before anything is timed. Each figure is one sample; timing uses the
//! monotonic clock.

use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail, ensure};
use miyu_crypto::mls::{CIPHERSUITE, PADDING};
use openmls::prelude::tls_codec::{Deserialize as _, Serialize as _};
use openmls::prelude::*;
use openmls_rust_crypto::OpenMlsRustCrypto;
use openmls_traits::OpenMlsProvider;
use openmls_traits::signatures::{Signer, SignerError};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::machine::{CpuMeter, CpuUse};

/// What one run does.
#[derive(Debug, Clone)]
pub(crate) struct ScalePlan {
    pub(crate) members: usize,
    /// Also build the group with one commit per added member (slow: about N² work).
    pub(crate) one_by_one: bool,
}

/// What one group size measured.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ScaleOutcome {
    pub(crate) members: usize,
    /// Making the N-1 key packages and the four members' keys (not part of any figure).
    pub(crate) key_packages_seconds: f64,
    /// The committer parsing and validating the N-1 key packages it was given.
    pub(crate) validate_key_packages_seconds: f64,
    /// One commit that adds the N-1 others at once.
    pub(crate) create_batch: Creation,
    /// One commit per added member, for comparison; only when asked for.
    pub(crate) create_one_by_one: Option<Creation>,
    /// The observer joining from the creation Welcome (tree inside).
    pub(crate) observer_join_seconds: f64,
    /// The committer adds one member (Welcome with the ratchet tree inside).
    pub(crate) add: CommitStep,
    /// The committer removes that member again.
    pub(crate) remove: CommitStep,
    /// The committer replaces its own leaf keys.
    pub(crate) self_update: CommitStep,
    /// The committer adds one member with a Welcome that leaves the tree out.
    pub(crate) add_tree_apart: CommitStep,
    /// The member added by `add` joining from its Welcome alone.
    pub(crate) join_tree_in_welcome: Join,
    /// The member added by `add_tree_apart` joining from its Welcome and the exported tree.
    pub(crate) join_tree_apart: Join,
    /// The high-water mark of this process's resident memory while this size ran, reset at
    /// its start when the kernel allows (`clear_refs`), otherwise since the process started.
    pub(crate) peak_rss_kib: Option<u64>,
    pub(crate) peak_rss_reset: bool,
    pub(crate) cpu: CpuUse,
}

/// Building a whole group.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Creation {
    pub(crate) commits: usize,
    /// Building and merging every commit, at the committer.
    pub(crate) seconds: f64,
    /// The last commit and Welcome (for a batch, the only ones).
    pub(crate) last_commit_bytes: usize,
    pub(crate) last_welcome_bytes: usize,
}

/// One commit, from the committer's build to another member's merge.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct CommitStep {
    /// The committer building the commit (and Welcome), staged as pending.
    pub(crate) build_ms: f64,
    /// The committer merging its pending commit once accepted.
    pub(crate) committer_merge_ms: f64,
    pub(crate) commit_bytes: usize,
    /// The observer parsing, decrypting and validating the commit.
    pub(crate) process_ms: f64,
    /// The observer merging the validated commit.
    pub(crate) merge_ms: f64,
    pub(crate) welcome_bytes: Option<usize>,
}

/// A new member becoming ready from a Welcome.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Join {
    pub(crate) welcome_bytes: usize,
    /// The exported ratchet tree, when it travels apart from the Welcome.
    pub(crate) tree_bytes: Option<usize>,
    /// SHA-256 over the exported tree, the check a joiner would make against a hash it trusts.
    pub(crate) tree_hash_ms: Option<f64>,
    /// Parsing the Welcome (and tree), decrypting, validating the tree, building the group.
    pub(crate) seconds: f64,
}

/// Measures one group size.
pub(crate) fn run(plan: &ScalePlan) -> Result<ScaleOutcome> {
    ensure!(plan.members >= 2, "a group needs at least two members");
    let peak_rss_reset = reset_peak_resident();
    let meter = CpuMeter::start();

    // Setup: every member but the committer has a key package. Only the observer and the two
    // joiners keep their private keys (in their own providers); the others' are thrown away
    // with `others` once the group is built.
    let started = Instant::now();
    let committer = Member::new(0, OpenMlsRustCrypto::default());
    let observer = Member::new(1, OpenMlsRustCrypto::default());
    let joiner = Member::new(u32::MAX - 1, OpenMlsRustCrypto::default());
    let joiner_tree_apart = Member::new(u32::MAX, OpenMlsRustCrypto::default());
    let others = OpenMlsRustCrypto::default();
    let mut key_packages = Vec::with_capacity(plan.members - 1);
    key_packages.push(observer.key_package()?);
    for index in 2..plan.members {
        let index = u32::try_from(index).context("too many members")?;
        let other = Identity::generate(index);
        key_packages.push(key_package(&others, &other.signer, &other.credential)?);
    }
    let joiner_package = joiner.key_package()?;
    let joiner_tree_apart_package = joiner_tree_apart.key_package()?;
    let key_packages_seconds = started.elapsed().as_secs_f64();

    // What the committer receives from the server is bytes; parsing and validating them is
    // its first cost.
    let wire_packages = key_packages
        .iter()
        .map(|package| package.tls_serialize_detached())
        .collect::<Result<Vec<_>, _>>()
        .context("serialising key packages")?;
    let started = Instant::now();
    let key_packages = wire_packages
        .iter()
        .map(|bytes| validate_key_package(&committer.provider, bytes))
        .collect::<Result<Vec<_>>>()?;
    let validate_key_packages_seconds = started.elapsed().as_secs_f64();
    drop(wire_packages);

    let (mut group, create_batch, creation_welcome) = create_batch(&committer, &key_packages)?;
    drop(others);

    let started = Instant::now();
    let mut observer_group = join(&observer.provider, &creation_welcome, None)?;
    let observer_join_seconds = started.elapsed().as_secs_f64();
    drop(creation_welcome);

    // Add one member, Welcome with the tree inside (Miyu's configuration today).
    let (add, welcome) = commit_step(
        &committer,
        &mut group,
        &observer.provider,
        &mut observer_group,
        |group| {
            let (commit, welcome, _) = group
                .add_members(
                    &committer.provider,
                    &committer.signer,
                    std::slice::from_ref(&joiner_package),
                )
                .context("adding one member")?;
            Ok((commit, Some(welcome)))
        },
    )?;
    let welcome = welcome.context("an add produced no Welcome")?;
    let started = Instant::now();
    let joined = join(&joiner.provider, &welcome, None)?;
    let join_tree_in_welcome = Join {
        welcome_bytes: welcome.len(),
        tree_bytes: None,
        tree_hash_ms: None,
        seconds: started.elapsed().as_secs_f64(),
    };
    ensure!(
        joined.epoch() == group.epoch(),
        "the new member is at another epoch than the committer"
    );
    drop(joined);

    let added = group
        .member_leaf_index(&joiner.credential.credential)
        .context("the added member is not in the committer's group")?;
    let (remove, _) = commit_step(
        &committer,
        &mut group,
        &observer.provider,
        &mut observer_group,
        |group| {
            let (commit, welcome, _) = group
                .remove_members(&committer.provider, &committer.signer, &[added])
                .context("removing one member")?;
            Ok((commit, welcome))
        },
    )?;

    let (self_update, _) = commit_step(
        &committer,
        &mut group,
        &observer.provider,
        &mut observer_group,
        |group| {
            let bundle = group
                .self_update(
                    &committer.provider,
                    &committer.signer,
                    LeafNodeParameters::default(),
                )
                .context("updating the committer's own leaf")?;
            Ok((bundle.into_commit(), None))
        },
    )?;

    // Add one member again, this time leaving the tree out of the Welcome; the joiner gets
    // the tree the committer exports after merging.
    let apart = MlsGroupJoinConfig::builder()
        .use_ratchet_tree_extension(false)
        .padding_size(PADDING)
        .build();
    group
        .set_configuration(committer.provider.storage(), &apart)
        .map_err(|error| anyhow!("changing the committer's configuration: {error:?}"))?;
    let (add_tree_apart, welcome) = commit_step(
        &committer,
        &mut group,
        &observer.provider,
        &mut observer_group,
        |group| {
            let (commit, welcome, _) = group
                .add_members(
                    &committer.provider,
                    &committer.signer,
                    std::slice::from_ref(&joiner_tree_apart_package),
                )
                .context("adding one member, tree apart")?;
            Ok((commit, Some(welcome)))
        },
    )?;
    let welcome = welcome.context("an add produced no Welcome")?;
    let tree = group
        .export_ratchet_tree()
        .tls_serialize_detached()
        .context("serialising the ratchet tree")?;
    let expected_hash = Sha256::digest(&tree);
    let started = Instant::now();
    let hash = Sha256::digest(&tree);
    let tree_hash_ms = millis(started);
    ensure!(hash == expected_hash, "the tree's hash changed");
    let started = Instant::now();
    let joined = join(&joiner_tree_apart.provider, &welcome, Some(&tree))?;
    let join_tree_apart = Join {
        welcome_bytes: welcome.len(),
        tree_bytes: Some(tree.len()),
        tree_hash_ms: Some(tree_hash_ms),
        seconds: started.elapsed().as_secs_f64(),
    };
    ensure!(
        joined.epoch() == group.epoch() && observer_group.epoch() == group.epoch(),
        "the members disagree on the epoch"
    );
    drop((joined, observer_group, group));

    let create_one_by_one = if plan.one_by_one {
        Some(create_one_by_one(&key_packages)?)
    } else {
        None
    };
    drop(key_packages);

    Ok(ScaleOutcome {
        members: plan.members,
        key_packages_seconds,
        validate_key_packages_seconds,
        create_batch,
        create_one_by_one,
        observer_join_seconds,
        add,
        remove,
        self_update,
        add_tree_apart,
        join_tree_in_welcome,
        join_tree_apart,
        peak_rss_kib: crate::machine::peak_resident_kib(std::process::id()),
        peak_rss_reset,
        cpu: meter.stop(),
    })
}

/// Bytes for people: exact below 1 KiB, then one decimal in KiB or MiB (powers of 1024).
pub(crate) fn format_bytes(bytes: usize) -> String {
    const KIB: f64 = 1024.0;
    let value = bytes as f64;
    if bytes < 1024 {
        format!("{bytes} B")
    } else if value < KIB * KIB {
        format!("{:.1} KiB", value / KIB)
    } else {
        format!("{:.1} MiB", value / (KIB * KIB))
    }
}

/// Milliseconds or seconds for people, three significant figures or so.
pub(crate) fn format_seconds(seconds: f64) -> String {
    if seconds < 0.01 {
        format!("{:.3} ms", seconds * 1e3)
    } else if seconds < 1.0 {
        format!("{:.1} ms", seconds * 1e3)
    } else {
        format!("{seconds:.2} s")
    }
}

/// A member's keys and, for the few that hold a group, its own provider.
struct Member {
    signer: BenchSigner,
    credential: CredentialWithKey,
    provider: OpenMlsRustCrypto,
}

impl Member {
    fn new(index: u32, provider: OpenMlsRustCrypto) -> Self {
        let Identity { signer, credential } = Identity::generate(index);
        Self {
            signer,
            credential,
            provider,
        }
    }

    fn key_package(&self) -> Result<KeyPackage> {
        key_package(&self.provider, &self.signer, &self.credential)
    }
}

/// Keys only, for a member that never holds the group itself.
struct Identity {
    signer: BenchSigner,
    credential: CredentialWithKey,
}

impl Identity {
    fn generate(index: u32) -> Self {
        let signer = BenchSigner(ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng));
        let credential = CredentialWithKey {
            credential: BasicCredential::new(format!("member {index}").into_bytes()).into(),
            signature_key: signer.0.verifying_key().to_bytes().to_vec().into(),
        };
        Self { signer, credential }
    }
}

/// Signs with an Ed25519 key held in memory.
struct BenchSigner(ed25519_dalek::SigningKey);

impl Signer for BenchSigner {
    fn sign(&self, payload: &[u8]) -> Result<Vec<u8>, SignerError> {
        use ed25519_dalek::Signer as _;
        Ok(self.0.sign(payload).to_bytes().to_vec())
    }

    fn signature_scheme(&self) -> SignatureScheme {
        SignatureScheme::ED25519
    }
}

fn key_package(
    provider: &OpenMlsRustCrypto,
    signer: &BenchSigner,
    credential: &CredentialWithKey,
) -> Result<KeyPackage> {
    Ok(KeyPackage::builder()
        .build(CIPHERSUITE, provider, signer, credential.clone())
        .context("making a key package")?
        .key_package()
        .clone())
}

fn validate_key_package(provider: &OpenMlsRustCrypto, bytes: &[u8]) -> Result<KeyPackage> {
    KeyPackageIn::tls_deserialize_exact(bytes)
        .context("parsing a key package")?
        .validate(provider.crypto(), ProtocolVersion::Mls10)
        .context("validating a key package")
}

fn new_group(committer: &Member, group_id: &[u8]) -> Result<MlsGroup> {
    MlsGroup::new_with_group_id(
        &committer.provider,
        &committer.signer,
        &miyu_crypto::mls::create_config(miyu_crypto::mls::Tree::InWelcome),
        GroupId::from_slice(group_id),
        committer.credential.clone(),
    )
    .context("creating a group")
}

/// The committer builds the group with one commit adding everyone; returns the group, the
/// figures and the Welcome.
fn create_batch(
    committer: &Member,
    key_packages: &[KeyPackage],
) -> Result<(MlsGroup, Creation, Vec<u8>)> {
    let mut group = new_group(committer, b"miyu-bench scale")?;
    let started = Instant::now();
    let (commit, welcome, _) = group
        .add_members(&committer.provider, &committer.signer, key_packages)
        .context("adding every member at once")?;
    group
        .merge_pending_commit(&committer.provider)
        .context("merging the creation commit")?;
    let seconds = started.elapsed().as_secs_f64();
    let commit = commit.tls_serialize_detached().context("serialising")?;
    let welcome = welcome.tls_serialize_detached().context("serialising")?;
    let creation = Creation {
        commits: 1,
        seconds,
        last_commit_bytes: commit.len(),
        last_welcome_bytes: welcome.len(),
    };
    Ok((group, creation, welcome))
}

/// A fresh committer builds the same group with one commit per added member.
fn create_one_by_one(key_packages: &[KeyPackage]) -> Result<Creation> {
    let committer = Member::new(0, OpenMlsRustCrypto::default());
    let mut group = new_group(&committer, b"miyu-bench one by one")?;
    let mut last = None;
    let started = Instant::now();
    for package in key_packages {
        let (commit, welcome, _) = group
            .add_members(
                &committer.provider,
                &committer.signer,
                std::slice::from_ref(package),
            )
            .context("adding one member")?;
        group
            .merge_pending_commit(&committer.provider)
            .context("merging an add")?;
        last = Some((commit, welcome));
    }
    let seconds = started.elapsed().as_secs_f64();
    let (commit, welcome) = last.context("nobody to add")?;
    Ok(Creation {
        commits: key_packages.len(),
        seconds,
        last_commit_bytes: commit
            .tls_serialize_detached()
            .context("serialising")?
            .len(),
        last_welcome_bytes: welcome
            .tls_serialize_detached()
            .context("serialising")?
            .len(),
    })
}

/// The committer builds a commit with `build` and merges it; the observer processes and
/// merges it. Returns the figures and the serialised Welcome, if any.
fn commit_step(
    committer: &Member,
    group: &mut MlsGroup,
    observer: &OpenMlsRustCrypto,
    observer_group: &mut MlsGroup,
    build: impl FnOnce(&mut MlsGroup) -> Result<(MlsMessageOut, Option<MlsMessageOut>)>,
) -> Result<(CommitStep, Option<Vec<u8>>)> {
    let started = Instant::now();
    let (commit, welcome) = build(group)?;
    let build_ms = millis(started);
    let started = Instant::now();
    group
        .merge_pending_commit(&committer.provider)
        .context("merging the committer's own commit")?;
    let committer_merge_ms = millis(started);
    let commit = commit.tls_serialize_detached().context("serialising")?;
    let welcome = welcome
        .map(|welcome| welcome.tls_serialize_detached())
        .transpose()
        .context("serialising")?;

    let started = Instant::now();
    let message = MlsMessageIn::tls_deserialize_exact(&commit)
        .context("parsing the commit")?
        .try_into_protocol_message()
        .context("the commit is not a protocol message")?;
    let processed = observer_group
        .process_message(observer, message)
        .context("processing the commit")?;
    let process_ms = millis(started);
    let ProcessedMessageContent::StagedCommitMessage(staged) = processed.into_content() else {
        bail!("the observer did not get a commit");
    };
    let started = Instant::now();
    observer_group
        .merge_staged_commit(observer, *staged)
        .context("merging the commit at the observer")?;
    let merge_ms = millis(started);
    ensure!(
        observer_group.epoch() == group.epoch(),
        "the observer is at another epoch than the committer"
    );
    Ok((
        CommitStep {
            build_ms,
            committer_merge_ms,
            commit_bytes: commit.len(),
            process_ms,
            merge_ms,
            welcome_bytes: welcome.as_ref().map(Vec::len),
        },
        welcome,
    ))
}

/// Joins from a serialised Welcome, with the tree inside it or given apart.
fn join(provider: &OpenMlsRustCrypto, welcome: &[u8], tree: Option<&[u8]>) -> Result<MlsGroup> {
    let message = MlsMessageIn::tls_deserialize_exact(welcome).context("parsing a Welcome")?;
    let MlsMessageBodyIn::Welcome(welcome) = message.extract() else {
        bail!("not a Welcome");
    };
    let tree = tree
        .map(RatchetTreeIn::tls_deserialize_exact)
        .transpose()
        .context("parsing the ratchet tree")?;
    let staged = StagedWelcome::new_from_welcome(
        provider,
        &miyu_crypto::mls::join_config(miyu_crypto::mls::Tree::InWelcome),
        welcome,
        tree,
    )
    .context("processing a Welcome")?;
    staged.into_group(provider).context("joining")
}

fn millis(started: Instant) -> f64 {
    started.elapsed().as_secs_f64() * 1e3
}

/// Resets this process's high-water mark of resident memory to its current size (Linux 4.0
/// and later); false when that is not possible here.
fn reset_peak_resident() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_are_exact_below_a_kibibyte_then_one_decimal() {
        assert_eq!(format_bytes(0), "0 B");
        assert_eq!(format_bytes(1023), "1023 B");
        assert_eq!(format_bytes(1024), "1.0 KiB");
        assert_eq!(format_bytes(3_300), "3.2 KiB");
        assert_eq!(format_bytes(1024 * 1024 - 1), "1024.0 KiB");
        assert_eq!(format_bytes(1024 * 1024), "1.0 MiB");
        assert_eq!(format_bytes(1_572_864), "1.5 MiB");
    }

    #[test]
    fn short_times_are_in_milliseconds_and_long_ones_in_seconds() {
        assert_eq!(format_seconds(0.000_25), "0.250 ms");
        assert_eq!(format_seconds(0.063), "63.0 ms");
        assert_eq!(format_seconds(0.9994), "999.4 ms");
        assert_eq!(format_seconds(2.4), "2.40 s");
    }
}
