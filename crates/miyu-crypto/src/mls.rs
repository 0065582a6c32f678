//! The MLS glue: an OpenMLS provider whose state lives in the client's SQLite database, a
//! signer over the device key, and the group operations Miyu uses.
//!
//! Every member leaf carries a Basic credential whose identity is the member's device
//! certificate (compact form), and whose signature key is the certified device key. Peers
//! accept a leaf only if both check out ([`member_certificate`]), so a server cannot slip in a
//! device the account's identity key did not certify.

use miyu_proto::cert::VerifiedCertificate;
use openmls::prelude::tls_codec::{Deserialize as _, Serialize as _};
use openmls::prelude::*;
use openmls_rust_crypto::RustCrypto;
use openmls_sqlite_storage::{Codec, Connection, SqliteStorageProvider};
use openmls_traits::OpenMlsProvider;
use openmls_traits::signatures::{Signer, SignerError};
use openmls_traits::storage::StorageProvider as _;

use crate::identity::AccountKeys;

pub use openmls::prelude::{KeyPackage, MlsGroup};

/// X25519 key exchange, ChaCha20-Poly1305, SHA-256, Ed25519 signatures.
pub const CIPHERSUITE: Ciphersuite =
    Ciphersuite::MLS_128_DHKEMX25519_CHACHA20POLY1305_SHA256_Ed25519;

/// Application messages are padded to a multiple of this many bytes, so the server sees sizes
/// in buckets rather than exact lengths.
pub const PADDING: usize = 256;

/// Why an MLS operation failed, sorted by who must act.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MlsError {
    /// A peer or the server sent bytes that are not a valid MLS message of the expected kind.
    #[error("malformed MLS data: {0}")]
    Malformed(String),
    /// A member's credential is not a valid device certificate for its key.
    #[error("member rejected: {0}")]
    BadMember(&'static str),
    /// The message could not be decrypted or verified (a replay, an own message, a message
    /// from an epoch this device no longer keeps, or tampering).
    #[error("message not accepted: {0}")]
    Rejected(String),
    #[error("local MLS state failed: {0}")]
    State(String),
}

/// Serialises OpenMLS state for the SQLite storage provider.
#[derive(Default)]
pub struct JsonCodec;

impl Codec for JsonCodec {
    type Error = serde_json::Error;

    fn to_vec<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, Self::Error> {
        serde_json::to_vec(value)
    }

    fn from_slice<T: serde::de::DeserializeOwned>(slice: &[u8]) -> Result<T, Self::Error> {
        serde_json::from_slice(slice)
    }
}

/// An OpenMLS provider writing its state into the caller's SQLite connection, so MLS state and
/// the client's own tables change in one transaction.
pub struct Provider<'a> {
    crypto: RustCrypto,
    storage: SqliteStorageProvider<JsonCodec, &'a Connection>,
}

impl<'a> Provider<'a> {
    pub fn new(connection: &'a Connection) -> Self {
        Self {
            crypto: RustCrypto::default(),
            storage: SqliteStorageProvider::new(connection),
        }
    }
}

impl<'a> OpenMlsProvider for Provider<'a> {
    type CryptoProvider = RustCrypto;
    type RandProvider = RustCrypto;
    type StorageProvider = SqliteStorageProvider<JsonCodec, &'a Connection>;

    fn storage(&self) -> &Self::StorageProvider {
        &self.storage
    }

    fn crypto(&self) -> &Self::CryptoProvider {
        &self.crypto
    }

    fn rand(&self) -> &Self::RandProvider {
        &self.crypto
    }
}

/// Creates or upgrades OpenMLS's tables in the client database.
pub fn migrate(connection: &mut Connection) -> Result<(), MlsError> {
    SqliteStorageProvider::<JsonCodec, &mut Connection>::new(connection)
        .run_migrations()
        .map_err(|error| MlsError::State(error.to_string()))
}

/// Signs MLS messages with the device key.
struct DeviceSigner<'a>(&'a AccountKeys);

impl Signer for DeviceSigner<'_> {
    fn sign(&self, payload: &[u8]) -> Result<Vec<u8>, SignerError> {
        use ed25519_dalek::Signer as _;
        Ok(self.0.device_key().sign(payload).to_bytes().to_vec())
    }

    fn signature_scheme(&self) -> SignatureScheme {
        SignatureScheme::ED25519
    }
}

fn credential_with_key(keys: &AccountKeys) -> CredentialWithKey {
    CredentialWithKey {
        credential: BasicCredential::new(keys.certificate().to_compact()).into(),
        signature_key: keys.certificate().device_key().to_vec().into(),
    }
}

/// Checks that a leaf's credential is a valid device certificate for the leaf's signature key,
/// and returns the certificate.
pub fn member_certificate(
    credential: &Credential,
    signature_key: &[u8],
) -> Result<VerifiedCertificate, MlsError> {
    let basic = BasicCredential::try_from(credential.clone())
        .map_err(|_| MlsError::BadMember("credential is not a basic credential"))?;
    let certificate = VerifiedCertificate::from_compact(basic.identity())
        .map_err(|_| MlsError::BadMember("credential is not a valid device certificate"))?;
    if certificate.device_key().as_slice() != signature_key {
        return Err(MlsError::BadMember(
            "leaf signature key is not the certified device key",
        ));
    }
    Ok(certificate)
}

fn state_error(error: impl std::fmt::Display) -> MlsError {
    MlsError::State(error.to_string())
}

/// Where a new member of a group finds its ratchet tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tree {
    /// Inside the Welcome: one-to-one conversations, whose tree is two leaves.
    InWelcome,
    /// Sealed apart under a key from the new epoch's exporter and served as a blob
    /// (PROTOCOL.md §10.9): groups, whose tree takes about 300 bytes a member and would
    /// otherwise make every Welcome as large as the group.
    Served,
}

/// The exporter label of the key that seals a served ratchet tree.
const TREE_KEY_LABEL: &str = "miyu ratchet tree v1";

/// The largest served ratchet tree a device accepts: twice what a group of 12,000 devices (the
/// most Miyu lets a group grow to) needs.
pub const MAX_TREE_BYTES: u64 = 8 << 20;

/// Miyu's group configuration: its ciphersuite, where the tree travels, padding.
pub fn create_config(tree: Tree) -> MlsGroupCreateConfig {
    MlsGroupCreateConfig::builder()
        .ciphersuite(CIPHERSUITE)
        .use_ratchet_tree_extension(tree == Tree::InWelcome)
        .padding_size(PADDING)
        .build()
}

/// How Miyu joins a group: where the tree travels in the Welcomes it sends later, padding.
pub fn join_config(tree: Tree) -> MlsGroupJoinConfig {
    MlsGroupJoinConfig::builder()
        .use_ratchet_tree_extension(tree == Tree::InWelcome)
        .padding_size(PADDING)
        .build()
}

/// A ratchet tree sealed for the members a Welcome adds: the blob to upload (padded) and the
/// length of the tree inside it.
pub struct ServedTree {
    pub blob: Vec<u8>,
    pub plaintext_len: u64,
}

impl ServedTree {
    /// The blob without its padding, as a newcomer downloads it.
    pub fn sealed(&self) -> SealedTree<'_> {
        let end = crate::file::Layout::new(self.plaintext_len, crate::file::DEFAULT_CHUNK)
            .map(|layout| layout.ciphertext_len() as usize)
            .unwrap_or(self.blob.len())
            .min(self.blob.len());
        SealedTree {
            ciphertext: &self.blob[..end],
            plaintext_len: self.plaintext_len,
        }
    }
}

/// The served tree as a newcomer downloaded it: the ciphertext without padding.
pub struct SealedTree<'a> {
    pub ciphertext: &'a [u8],
    pub plaintext_len: u64,
}

fn tree_key(secret: Vec<u8>) -> Result<crate::file::FileKey, MlsError> {
    let secret = zeroize::Zeroizing::new(secret);
    let bytes: [u8; 32] = secret
        .as_slice()
        .try_into()
        .map_err(|_| MlsError::State("exporter returned a short secret".into()))?;
    Ok(crate::file::FileKey::from_bytes(bytes))
}

fn seal_tree(
    tree: &openmls::treesync::RatchetTree,
    secret: Vec<u8>,
) -> Result<ServedTree, MlsError> {
    let plaintext = tree.tls_serialize_detached().map_err(state_error)?;
    let blob = crate::file::seal_all(&tree_key(secret)?, &plaintext).map_err(state_error)?;
    Ok(ServedTree {
        blob,
        plaintext_len: plaintext.len() as u64,
    })
}

/// The tree of the epoch our pending commit starts, sealed for its newcomers.
fn pending_tree(provider: &Provider<'_>, group: &MlsGroup) -> Result<ServedTree, MlsError> {
    let staged = group
        .pending_commit()
        .ok_or_else(|| MlsError::State("no pending commit".into()))?;
    let tree = staged
        .export_ratchet_tree(provider.crypto(), group.export_ratchet_tree())
        .map_err(state_error)?
        .ok_or_else(|| MlsError::State("a pending commit without a tree".into()))?;
    let secret = staged
        .export_secret(provider.crypto(), TREE_KEY_LABEL, &[], 32)
        .map_err(state_error)?;
    seal_tree(&tree, secret)
}

/// Makes a key package for this device, serialised for upload. Its private half stays in the
/// provider's storage until a Welcome uses it.
pub fn new_key_package(
    provider: &Provider<'_>,
    keys: &AccountKeys,
    last_resort: bool,
) -> Result<Vec<u8>, MlsError> {
    let mut builder = KeyPackage::builder();
    if last_resort {
        // A key package's extensions must be among its leaf's capabilities, or peers refuse
        // it (RFC 9420 §10.1).
        builder = builder.mark_as_last_resort().leaf_node_capabilities(
            Capabilities::builder()
                .extensions(vec![ExtensionType::LastResort])
                .build(),
        );
    }
    let bundle = builder
        .build(
            CIPHERSUITE,
            provider,
            &DeviceSigner(keys),
            credential_with_key(keys),
        )
        .map_err(state_error)?;
    bundle
        .key_package()
        .tls_serialize_detached()
        .map_err(state_error)
}

/// How many bytes a key package takes in a commit.
pub fn key_package_len(key_package: &KeyPackage) -> usize {
    use openmls::prelude::tls_codec::Size as _;
    key_package.tls_serialized_len()
}

/// Parses and validates a key package a server handed out, and checks that it belongs to the
/// device `certificate` names.
pub fn check_key_package(
    provider: &Provider<'_>,
    bytes: &[u8],
    certificate: &VerifiedCertificate,
) -> Result<KeyPackage, MlsError> {
    let key_package = KeyPackageIn::tls_deserialize_exact(bytes)
        .map_err(|error| MlsError::Malformed(error.to_string()))?
        .validate(provider.crypto(), ProtocolVersion::Mls10)
        .map_err(|error| MlsError::Malformed(error.to_string()))?;
    if key_package.ciphersuite() != CIPHERSUITE {
        return Err(MlsError::Malformed("unsupported ciphersuite".into()));
    }
    let leaf = key_package.leaf_node();
    let leaf_certificate = member_certificate(leaf.credential(), leaf.signature_key().as_slice())?;
    if &leaf_certificate != certificate {
        return Err(MlsError::BadMember(
            "key package belongs to another device than the server claimed",
        ));
    }
    Ok(key_package)
}

/// A group just created with its first members, ready to be announced to the server.
pub struct CreatedGroup {
    pub group: MlsGroup,
    pub welcome: Vec<u8>,
    /// The tree for the Welcome's newcomers, when it does not travel inside it.
    pub tree: Option<ServedTree>,
    pub epoch: u64,
}

/// Creates a group with the given id and adds the devices of `key_packages` in one commit.
pub fn create_group(
    provider: &Provider<'_>,
    keys: &AccountKeys,
    group_id: &[u8],
    key_packages: &[KeyPackage],
    tree: Tree,
) -> Result<CreatedGroup, MlsError> {
    let signer = DeviceSigner(keys);
    let mut group = MlsGroup::new_with_group_id(
        provider,
        &signer,
        &create_config(tree),
        GroupId::from_slice(group_id),
        credential_with_key(keys),
    )
    .map_err(state_error)?;
    if key_packages.is_empty() {
        // A group of one, which others join later: nobody to welcome.
        let epoch = group.epoch().as_u64();
        return Ok(CreatedGroup {
            group,
            welcome: Vec::new(),
            tree: None,
            epoch,
        });
    }
    let (_commit, welcome, _info) = group
        .add_members(provider, &signer, key_packages)
        .map_err(state_error)?;
    let tree = match tree {
        Tree::Served => Some(pending_tree(provider, &group)?),
        Tree::InWelcome => None,
    };
    group.merge_pending_commit(provider).map_err(state_error)?;
    let welcome = welcome.tls_serialize_detached().map_err(state_error)?;
    let epoch = group.epoch().as_u64();
    Ok(CreatedGroup {
        group,
        welcome,
        tree,
        epoch,
    })
}

/// A group joined from a Welcome, with every member's verified certificate.
pub struct JoinedGroup {
    pub group: MlsGroup,
    pub members: Vec<VerifiedCertificate>,
    /// The member who signed the Welcome's GroupInfo: who added us.
    pub sender: VerifiedCertificate,
}

/// Whether a Welcome is addressed to one of this device's key packages (nothing is consumed):
/// checked before downloading a tree for it.
pub fn welcome_is_for_us(provider: &Provider<'_>, welcome: &[u8]) -> Result<bool, MlsError> {
    let message = MlsMessageIn::tls_deserialize_exact(welcome)
        .map_err(|error| MlsError::Malformed(error.to_string()))?;
    let MlsMessageBodyIn::Welcome(welcome) = message.extract() else {
        return Err(MlsError::Malformed("not a Welcome".into()));
    };
    for secrets in welcome.secrets() {
        let bundle: Option<KeyPackageBundle> = provider
            .storage()
            .key_package(&secrets.new_member())
            .map_err(state_error)?;
        if bundle.is_some() {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Joins a group from a Welcome, with the tree the group served apart if it did (opened under
/// the joined epoch's exporter and checked against the tree hash the Welcome's signed
/// GroupInfo holds). Fails, leaving no group behind, if any member's credential is not a valid
/// device certificate.
pub fn join_group(
    provider: &Provider<'_>,
    welcome: &[u8],
    served: Option<SealedTree<'_>>,
) -> Result<JoinedGroup, MlsError> {
    let message = MlsMessageIn::tls_deserialize_exact(welcome)
        .map_err(|error| MlsError::Malformed(error.to_string()))?;
    let MlsMessageBodyIn::Welcome(welcome) = message.extract() else {
        return Err(MlsError::Malformed("not a Welcome".into()));
    };
    let tree_mode = if served.is_some() {
        Tree::Served
    } else {
        Tree::InWelcome
    };
    let processed = ProcessedWelcome::new_from_welcome(provider, &join_config(tree_mode), welcome)
        .map_err(|error| MlsError::Rejected(error.to_string()))?;
    let tree = match served {
        None => None,
        Some(served) => {
            if served.plaintext_len > MAX_TREE_BYTES {
                return Err(MlsError::Malformed("the group's tree is too large".into()));
            }
            let secret = processed
                .export_secret(provider.crypto(), TREE_KEY_LABEL, &[], 32)
                .map_err(state_error)?;
            let bytes =
                crate::file::open_all(&tree_key(secret)?, served.plaintext_len, served.ciphertext)
                    .map_err(|error| MlsError::Rejected(format!("the group's tree: {error}")))?;
            Some(
                RatchetTreeIn::tls_deserialize_exact(&bytes)
                    .map_err(|error| MlsError::Malformed(format!("the group's tree: {error}")))?,
            )
        }
    };
    let staged = processed
        .into_staged_welcome(provider, tree)
        .map_err(|error| MlsError::Rejected(error.to_string()))?;
    let members = staged
        .members()
        .map(|member| member_certificate(&member.credential, &member.signature_key))
        .collect::<Result<Vec<_>, _>>()?;
    let sender = staged
        .welcome_sender()
        .map_err(|error| MlsError::Rejected(error.to_string()))?;
    let sender = member_certificate(sender.credential(), sender.signature_key().as_slice())?;
    let group = staged.into_group(provider).map_err(state_error)?;
    Ok(JoinedGroup {
        group,
        members,
        sender,
    })
}

/// Loads a group's state from storage.
pub fn load_group(provider: &Provider<'_>, group_id: &[u8]) -> Result<Option<MlsGroup>, MlsError> {
    MlsGroup::load(provider.storage(), &GroupId::from_slice(group_id)).map_err(state_error)
}

/// Deletes a group's state (its keys included) from storage: nothing sent to the group can be
/// read by this device afterwards.
pub fn delete_group(provider: &Provider<'_>, group_id: &[u8]) -> Result<(), MlsError> {
    if let Some(mut group) = load_group(provider, group_id)? {
        group.delete(provider.storage()).map_err(state_error)?;
    }
    Ok(())
}

/// Encrypts an application message for the group's current epoch.
pub fn encrypt(
    provider: &Provider<'_>,
    keys: &AccountKeys,
    group: &mut MlsGroup,
    plaintext: &[u8],
) -> Result<Vec<u8>, MlsError> {
    group
        .create_message(provider, &DeviceSigner(keys), plaintext)
        .map_err(state_error)?
        .tls_serialize_detached()
        .map_err(state_error)
}

/// Starts a commit that replaces this device's leaf keys (post-compromise security). The
/// group holds it as pending until [`merge_own_commit`] (the server accepted it) or
/// [`discard_own_commit`] (it lost the race for the epoch).
pub fn self_update(
    provider: &Provider<'_>,
    keys: &AccountKeys,
    group: &mut MlsGroup,
) -> Result<Vec<u8>, MlsError> {
    group
        .self_update(provider, &DeviceSigner(keys), LeafNodeParameters::default())
        .map_err(state_error)?
        .into_commit()
        .tls_serialize_detached()
        .map_err(state_error)
}

/// Starts a commit that adds the devices of `key_packages`; returns the commit and the
/// Welcome for them. Pending until merged or discarded, as for [`self_update`].
///
/// The commit carries no update path (RFC 9420 §12.4 allows it for adds): it holds the new
/// key packages rather than one ciphertext per member, so its size and every member's cost
/// to process it no longer grow with the group. The committer's own keys are refreshed by
/// the weekly self-update instead.
pub fn add_members(
    provider: &Provider<'_>,
    keys: &AccountKeys,
    group: &mut MlsGroup,
    key_packages: &[KeyPackage],
) -> Result<Added, MlsError> {
    let (commit, welcome, _info) = group
        .add_members_without_update(provider, &DeviceSigner(keys), key_packages)
        .map_err(state_error)?;
    Ok(Added {
        commit: commit.tls_serialize_detached().map_err(state_error)?,
        welcome: welcome.tls_serialize_detached().map_err(state_error)?,
        tree: pending_tree(provider, group)?,
    })
}

/// Makes a group's later Welcomes leave the tree out, since it is served apart: for groups made
/// before trees were.
pub fn serve_tree_apart(provider: &Provider<'_>, group: &mut MlsGroup) -> Result<(), MlsError> {
    group
        .set_configuration(provider.storage(), &join_config(Tree::Served))
        .map_err(state_error)
}

/// A pending commit adding members: the commit, the Welcome for the newcomers, and the tree
/// they need, sealed to be served apart (see [`Tree`]; a group created with the tree in its
/// Welcomes has it there too, and its newcomers ignore the served copy).
pub struct Added {
    pub commit: Vec<u8>,
    pub welcome: Vec<u8>,
    pub tree: ServedTree,
}

/// Starts a commit that removes the members at `leaves` (see [`members`]). Pending until
/// merged or discarded, as for [`self_update`].
pub fn remove_members(
    provider: &Provider<'_>,
    keys: &AccountKeys,
    group: &mut MlsGroup,
    leaves: &[u32],
    revocations: &[Revocation],
) -> Result<Vec<u8>, MlsError> {
    let leaves: Vec<LeafNodeIndex> = leaves
        .iter()
        .map(|leaf| LeafNodeIndex::new(*leaf))
        .collect();
    // Devices of our own account go only with the identity key's revocation of each (made by
    // `RevokeDevice`'s signer and passed in), which every member checks: a stolen linked device
    // cannot push the account's others out.
    let me = keys.certificate().account_id();
    let mut authenticated_data = Vec::new();
    for leaf in &leaves {
        let member = group.member_at(*leaf).ok_or(MlsError::BadMember(
            "a removal names a leaf not in the group",
        ))?;
        let device = member_certificate(&member.credential, &member.signature_key)?;
        if device.account_id() == me {
            let device_id = device.device_id();
            let signature = revocations
                .iter()
                .find(|revocation| revocation.device == device_id)
                .ok_or(MlsError::BadMember(
                    "an own device is removed only once the identity key revoked it",
                ))?
                .signature;
            authenticated_data.extend_from_slice(device_id.as_bytes());
            authenticated_data.extend_from_slice(&signature);
        }
    }
    group.set_aad(authenticated_data);
    let (commit, _welcome, _info) = group
        .remove_members(provider, &DeviceSigner(keys), &leaves)
        .map_err(state_error)?;
    commit.tls_serialize_detached().map_err(state_error)
}

/// Every member of the group with its leaf index. Leaves whose credential is not a valid
/// device certificate cannot be in a group this device joined or followed.
pub fn members(group: &MlsGroup) -> Vec<(u32, VerifiedCertificate)> {
    group
        .members()
        .filter_map(|member| {
            let certificate = member_certificate(&member.credential, &member.signature_key).ok()?;
            Some((member.index.u32(), certificate))
        })
        .collect()
}

/// True while this device is a member (false once a commit removed it).
pub fn is_active(group: &MlsGroup) -> bool {
    group.is_active()
}

/// The label of the MLS exporter secret a group's posting key is made from.
const POSTING_KEY_LABEL: &str = "miyu posting key v1";

/// A group's posting key for one epoch: an Ed25519 key every member derives from the epoch's
/// MLS exporter secret, so that the server can check that a post comes from a member without
/// learning which (PROTOCOL.md §4.4).
pub struct PostingKey(ed25519_dalek::SigningKey);

impl PostingKey {
    fn from_exported(secret: Vec<u8>) -> Result<Self, MlsError> {
        let secret = zeroize::Zeroizing::new(secret);
        let seed: [u8; 32] = secret
            .as_slice()
            .try_into()
            .map_err(|_| MlsError::State("exporter returned a short secret".into()))?;
        Ok(Self(ed25519_dalek::SigningKey::from_bytes(&seed)))
    }

    /// The key of the group's current epoch.
    pub fn current(provider: &Provider<'_>, group: &MlsGroup) -> Result<Self, MlsError> {
        let secret = group
            .export_secret(provider.crypto(), POSTING_KEY_LABEL, &[], 32)
            .map_err(state_error)?;
        Self::from_exported(secret)
    }

    /// The key of the epoch our pending commit would start, if there is one.
    pub fn next(provider: &Provider<'_>, group: &MlsGroup) -> Result<Option<Self>, MlsError> {
        let Some(staged) = group.pending_commit() else {
            return Ok(None);
        };
        let secret = staged
            .export_secret(provider.crypto(), POSTING_KEY_LABEL, &[], 32)
            .map_err(state_error)?;
        Self::from_exported(secret).map(Some)
    }

    pub fn public(&self) -> [u8; 32] {
        self.0.verifying_key().to_bytes()
    }

    /// Signs a `GroupPost`.
    pub fn sign_post(
        &self,
        group_id: &[u8],
        epoch: u64,
        expires_at: u64,
        payload: &[u8],
    ) -> [u8; 64] {
        use ed25519_dalek::Signer as _;
        self.0
            .sign(&miyu_proto::cert::group_post_payload(
                group_id, epoch, expires_at, payload,
            ))
            .to_bytes()
    }
}

/// True when the group has a commit of ours waiting for the server's verdict.
pub fn has_pending_commit(group: &MlsGroup) -> bool {
    group.pending_commit().is_some()
}

pub fn merge_own_commit(provider: &Provider<'_>, group: &mut MlsGroup) -> Result<(), MlsError> {
    group.merge_pending_commit(provider).map_err(state_error)
}

pub fn discard_own_commit(provider: &Provider<'_>, group: &mut MlsGroup) -> Result<(), MlsError> {
    group
        .clear_pending_commit(provider.storage())
        .map_err(state_error)
}

/// What an incoming group message turned out to be.
pub enum Incoming {
    Application {
        plaintext: Vec<u8>,
        sender: Box<VerifiedCertificate>,
    },
    /// A commit from another member, merged: the group moved to a new epoch.
    Commit(Box<CommitSummary>),
    /// A message this device sent itself, echoed back; it cannot be decrypted by its sender.
    Own,
}

/// Who made a commit and how it changed the members.
pub struct CommitSummary {
    pub committer: VerifiedCertificate,
    pub added: Vec<VerifiedCertificate>,
    pub removed: Vec<VerifiedCertificate>,
    /// The identity key's revocations of the removed devices of the committer's own account,
    /// checked: whoever reads the commit learns of them.
    pub revocations: Vec<Revocation>,
}

/// Checks a leaf that replaces the one at `index`: valid certificate, same account.
fn check_replacement(
    group: &MlsGroup,
    index: LeafNodeIndex,
    leaf: &LeafNode,
) -> Result<(), MlsError> {
    let new = member_certificate(leaf.credential(), leaf.signature_key().as_slice())?;
    let old_member = group.member_at(index).ok_or(MlsError::BadMember(
        "an update names a leaf that is not in the group",
    ))?;
    let old = member_certificate(&old_member.credential, &old_member.signature_key)?;
    if old.account_id() != new.account_id() {
        return Err(MlsError::BadMember(
            "an update may not move a leaf to another account",
        ));
    }
    Ok(())
}

/// A device's revocation: the identity key's signature over it (PROTOCOL.md §7.17), which
/// lets any device of the account remove it from a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Revocation {
    pub device: miyu_proto::DeviceId,
    pub signature: [u8; 64],
}

/// Length of one revocation in a commit's authenticated data: a device id (16 bytes) and the
/// identity key's signature over its revocation (64 bytes, PROTOCOL.md §10.10).
const REVOCATION_LEN: usize = 16 + 64;

/// The revocation of `device` a commit's authenticated data carries, signed by the identity
/// key of the committer's account (which is also the device's), if it does.
fn revoked_in(
    authenticated_data: &[u8],
    committer: &VerifiedCertificate,
    device: &VerifiedCertificate,
) -> Option<Revocation> {
    let device_id = device.device_id();
    if !authenticated_data.len().is_multiple_of(REVOCATION_LEN) {
        return None;
    }
    authenticated_data
        .chunks_exact(REVOCATION_LEN)
        .find_map(|revocation| {
            let (id, signature) = revocation.split_at(16);
            let signature: [u8; 64] = signature.try_into().ok()?;
            (id == device_id.as_bytes()
                && miyu_proto::cert::verify_revocation(
                    committer.identity_key(),
                    &device_id,
                    &signature,
                ))
            .then_some(Revocation {
                device: device_id,
                signature,
            })
        })
}

/// Decrypts and verifies one message of the group's log. Unless `membership_changes`, a commit
/// may add or remove only devices of its committer's own account (a one-to-one conversation
/// keeps its two accounts, while each links and revokes its own devices).
pub fn process(
    provider: &Provider<'_>,
    group: &mut MlsGroup,
    bytes: &[u8],
    membership_changes: bool,
) -> Result<Incoming, MlsError> {
    let message = MlsMessageIn::tls_deserialize_exact(bytes)
        .map_err(|error| MlsError::Malformed(error.to_string()))?
        .try_into_protocol_message()
        .map_err(|error| MlsError::Malformed(error.to_string()))?;
    let processed = group
        .process_message(provider, message)
        .map_err(|error| MlsError::Rejected(error.to_string()))?;
    let sender_leaf = processed.sender().clone();
    let credential = processed.credential().clone();
    let authenticated_data = processed.aad().to_vec();
    match processed.into_content() {
        ProcessedMessageContent::ApplicationMessage(application) => {
            let Sender::Member(index) = sender_leaf else {
                return Err(MlsError::Rejected(
                    "application message from a non-member".into(),
                ));
            };
            let member = group
                .member_at(index)
                .ok_or_else(|| MlsError::Rejected("sender is not in the group".into()))?;
            if member.credential != credential {
                return Err(MlsError::Rejected("sender credential mismatch".into()));
            }
            let sender = member_certificate(&member.credential, &member.signature_key)?;
            Ok(Incoming::Application {
                plaintext: application.into_bytes(),
                sender: Box::new(sender),
            })
        }
        ProcessedMessageContent::StagedCommitMessage(staged) => {
            // Joins from outside are refused; in a one-to-one conversation a commit may only
            // replace its sender's own keys.
            let Sender::Member(committer_index) = sender_leaf else {
                return Err(MlsError::BadMember("commit from outside the group"));
            };
            let committer = group
                .member_at(committer_index)
                .ok_or(MlsError::BadMember("commit from a leaf not in the group"))?;
            let committer = member_certificate(&committer.credential, &committer.signature_key)?;
            // Every leaf the commit adds or replaces must carry a valid device certificate,
            // and a replaced leaf must stay with the same account.
            let mut added = Vec::new();
            for member in staged.add_proposals() {
                let leaf = member.add_proposal().key_package().leaf_node();
                added.push(member_certificate(
                    leaf.credential(),
                    leaf.signature_key().as_slice(),
                )?);
            }
            let mut removed = Vec::new();
            for member in staged.remove_proposals() {
                let leaf = group.member_at(member.remove_proposal().removed()).ok_or(
                    MlsError::BadMember("a removal names a leaf not in the group"),
                )?;
                removed.push(member_certificate(&leaf.credential, &leaf.signature_key)?);
            }
            if !membership_changes
                && added
                    .iter()
                    .chain(&removed)
                    .any(|device| device.account_id() != committer.account_id())
            {
                return Err(MlsError::BadMember("commit changes the group's members"));
            }
            let mut revocations = Vec::new();
            for device in removed
                .iter()
                .filter(|device| device.account_id() == committer.account_id())
            {
                revocations.push(revoked_in(&authenticated_data, &committer, device).ok_or(
                    MlsError::BadMember(
                        "a removal of the committer's own device without its revocation",
                    ),
                )?);
            }
            if let (Some(leaf), Sender::Member(index)) =
                (staged.update_path_leaf_node(), &sender_leaf)
            {
                check_replacement(group, *index, leaf)?;
            }
            for update in staged.update_proposals() {
                if let Sender::Member(index) = update.sender() {
                    check_replacement(group, *index, update.update_proposal().leaf_node())?;
                }
            }
            group
                .merge_staged_commit(provider, *staged)
                .map_err(state_error)?;
            Ok(Incoming::Commit(Box::new(CommitSummary {
                committer,
                added,
                removed,
                revocations,
            })))
        }
        // A stored proposal would ride along in this device's next commit (openmls commits
        // every stored proposal), so a peer could use it to make us add someone. Miyu sends
        // no stand-alone proposals; refuse them.
        ProcessedMessageContent::ProposalMessage(_)
        | ProcessedMessageContent::ExternalJoinProposalMessage(_) => Err(MlsError::Rejected(
            "stand-alone proposals are not accepted".into(),
        )),
        ProcessedMessageContent::OwnPrivateMessage => Ok(Incoming::Own),
        _ => Err(MlsError::Rejected("unsupported message type".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn database() -> Connection {
        let mut connection = Connection::open_in_memory().unwrap();
        migrate(&mut connection).unwrap();
        connection
    }

    fn keys() -> AccountKeys {
        AccountKeys::generate(&mut rand::rngs::OsRng)
    }

    /// Bob creates group `[id; 16]` with Alice; Alice has not joined yet. Returns both
    /// databases, both keys and the Welcome for Alice.
    fn bob_invites_alice(id: u8) -> (Connection, Connection, AccountKeys, AccountKeys, Vec<u8>) {
        let (alice_db, bob_db) = (database(), database());
        let (alice, bob) = (keys(), keys());
        let welcome = {
            let (alice_mls, bob_mls) = (Provider::new(&alice_db), Provider::new(&bob_db));
            let package = new_key_package(&alice_mls, &alice, false).unwrap();
            let package = check_key_package(&bob_mls, &package, alice.certificate()).unwrap();
            create_group(&bob_mls, &bob, &[id; 16], &[package], Tree::InWelcome)
                .unwrap()
                .welcome
        };
        (alice_db, bob_db, alice, bob, welcome)
    }

    #[test]
    fn two_devices_talk_and_a_replay_is_rejected() {
        let (alice_db, bob_db) = (database(), database());
        let (alice, bob) = (keys(), keys());
        let (alice_mls, bob_mls) = (Provider::new(&alice_db), Provider::new(&bob_db));

        let package = new_key_package(&alice_mls, &alice, false).unwrap();
        let package = check_key_package(&bob_mls, &package, alice.certificate()).unwrap();
        let created = create_group(&bob_mls, &bob, &[9; 16], &[package], Tree::InWelcome).unwrap();
        let mut bob_group = created.group;

        let joined = join_group(&alice_mls, &created.welcome, None).unwrap();
        assert!(joined.members.contains(bob.certificate()));
        let mut alice_group = load_group(&alice_mls, &[9; 16]).unwrap().unwrap();
        assert_eq!(alice_group.epoch().as_u64(), created.epoch);

        let ciphertext = encrypt(&bob_mls, &bob, &mut bob_group, b"hello alice").unwrap();
        match process(&alice_mls, &mut alice_group, &ciphertext, false).unwrap() {
            Incoming::Application { plaintext, sender } => {
                assert_eq!(plaintext, b"hello alice");
                assert_eq!(&*sender, bob.certificate());
            }
            _ => panic!("expected an application message"),
        }
        assert!(matches!(
            process(&alice_mls, &mut alice_group, &ciphertext, false),
            Err(MlsError::Rejected(_))
        ));
        assert!(matches!(
            process(&alice_mls, &mut alice_group, b"garbage", false),
            Err(MlsError::Malformed(_))
        ));
    }

    #[test]
    fn a_self_update_moves_both_sides_to_the_next_epoch() {
        let (alice_db, bob_db, alice, bob, welcome) = bob_invites_alice(3);
        let (alice_mls, bob_mls) = (Provider::new(&alice_db), Provider::new(&bob_db));
        join_group(&alice_mls, &welcome, None).unwrap();
        let mut alice_group = load_group(&alice_mls, &[3; 16]).unwrap().unwrap();
        let mut bob_group = load_group(&bob_mls, &[3; 16]).unwrap().unwrap();

        let commit = self_update(&bob_mls, &bob, &mut bob_group).unwrap();
        assert!(has_pending_commit(&bob_group));
        // A lost race: the commit is dropped and the group is usable at its old epoch.
        discard_own_commit(&bob_mls, &mut bob_group).unwrap();
        assert!(!has_pending_commit(&bob_group));
        let commit_again = self_update(&bob_mls, &bob, &mut bob_group).unwrap();
        assert_ne!(commit, commit_again);
        merge_own_commit(&bob_mls, &mut bob_group).unwrap();
        assert!(matches!(
            process(&alice_mls, &mut alice_group, &commit_again, false).unwrap(),
            Incoming::Commit(_)
        ));
        assert_eq!(alice_group.epoch(), bob_group.epoch());
        let ciphertext = encrypt(&alice_mls, &alice, &mut alice_group, b"after").unwrap();
        assert!(matches!(
            process(&bob_mls, &mut bob_group, &ciphertext, false).unwrap(),
            Incoming::Application { .. }
        ));
    }

    #[test]
    fn an_update_that_moves_a_leaf_to_another_account_is_refused() {
        let (alice_db, bob_db, _alice, bob, welcome) = bob_invites_alice(4);
        let mallory = keys();
        let (alice_mls, bob_mls) = (Provider::new(&alice_db), Provider::new(&bob_db));
        join_group(&alice_mls, &welcome, None).unwrap();
        let mut alice_group = load_group(&alice_mls, &[4; 16]).unwrap().unwrap();
        let mut bob_group = load_group(&bob_mls, &[4; 16]).unwrap().unwrap();

        // Bob's device swaps its leaf for a device certified by another account's identity.
        let commit = bob_group
            .self_update_with_new_signer(
                &bob_mls,
                &DeviceSigner(&bob),
                NewSignerBundle {
                    signer: &DeviceSigner(&mallory),
                    credential_with_key: credential_with_key(&mallory),
                },
                LeafNodeParameters::default(),
            )
            .unwrap()
            .into_commit()
            .tls_serialize_detached()
            .unwrap();
        let epoch = alice_group.epoch();
        assert!(matches!(
            process(&alice_mls, &mut alice_group, &commit, false),
            Err(MlsError::BadMember(_))
        ));
        assert_eq!(
            alice_group.epoch(),
            epoch,
            "the refused commit was not merged"
        );
    }

    #[test]
    fn stand_alone_proposals_are_refused_and_never_stored() {
        let (alice_db, bob_db, _alice, bob, welcome) = bob_invites_alice(5);
        let (alice_mls, bob_mls) = (Provider::new(&alice_db), Provider::new(&bob_db));
        join_group(&alice_mls, &welcome, None).unwrap();
        let mut alice_group = load_group(&alice_mls, &[5; 16]).unwrap().unwrap();
        let mut bob_group = load_group(&bob_mls, &[5; 16]).unwrap().unwrap();

        let (proposal, _) = bob_group
            .propose_self_update(&bob_mls, &DeviceSigner(&bob), LeafNodeParameters::default())
            .unwrap();
        let proposal = proposal.tls_serialize_detached().unwrap();
        assert!(matches!(
            process(&alice_mls, &mut alice_group, &proposal, false),
            Err(MlsError::Rejected(_))
        ));
        assert_eq!(alice_group.pending_proposals().count(), 0);
    }

    #[test]
    fn in_a_conversation_of_two_each_account_links_and_revokes_only_its_own_devices() {
        let (alice_db, bob_db, alice, bob, welcome) = bob_invites_alice(12);
        let (alice_mls, bob_mls) = (Provider::new(&alice_db), Provider::new(&bob_db));
        join_group(&alice_mls, &welcome, None).unwrap();
        let mut alice_group = load_group(&alice_mls, &[12; 16]).unwrap().unwrap();
        let mut bob_group = load_group(&bob_mls, &[12; 16]).unwrap().unwrap();

        // Bob links a second device: his first adds it, Alice follows.
        let laptop_db = database();
        let laptop_mls = Provider::new(&laptop_db);
        let laptop_key = ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng);
        let certificate = bob
            .certify_device(laptop_key.verifying_key().as_bytes())
            .unwrap();
        let laptop = AccountKeys::linked(&laptop_key.to_bytes(), certificate.clone()).unwrap();
        let package = new_key_package(&laptop_mls, &laptop, false).unwrap();
        let package = check_key_package(&bob_mls, &package, &certificate).unwrap();
        let added = add_members(&bob_mls, &bob, &mut bob_group, &[package]).unwrap();
        merge_own_commit(&bob_mls, &mut bob_group).unwrap();
        match process(&alice_mls, &mut alice_group, &added.commit, false).unwrap() {
            Incoming::Commit(summary) => assert_eq!(summary.added, vec![certificate.clone()]),
            _ => panic!("expected a commit"),
        }
        join_group(&laptop_mls, &added.welcome, None).unwrap();
        let mut laptop_group = load_group(&laptop_mls, &[12; 16]).unwrap().unwrap();
        let hello = encrypt(&alice_mls, &alice, &mut alice_group, b"to both").unwrap();
        assert!(matches!(
            process(&laptop_mls, &mut laptop_group, &hello, false).unwrap(),
            Incoming::Application { .. }
        ));

        // The laptop holds no identity key: it cannot remove Bob's first device, and a commit
        // that does so without the identity key's revocation is refused by every member.
        let phone_leaf = members(&laptop_group)
            .into_iter()
            .find(|(_, member)| member == bob.certificate())
            .unwrap()
            .0;
        assert!(matches!(
            remove_members(&laptop_mls, &laptop, &mut laptop_group, &[phone_leaf], &[]),
            Err(MlsError::BadMember(_))
        ));
        let forged = laptop_group
            .remove_members(
                &laptop_mls,
                &DeviceSigner(&laptop),
                &[LeafNodeIndex::new(phone_leaf)],
            )
            .unwrap()
            .0
            .tls_serialize_detached()
            .unwrap();
        laptop_group
            .clear_pending_commit(laptop_mls.storage())
            .unwrap();
        let epoch = alice_group.epoch();
        assert!(matches!(
            process(&alice_mls, &mut alice_group, &forged, false),
            Err(MlsError::BadMember(_))
        ));
        assert_eq!(
            alice_group.epoch(),
            epoch,
            "the refused commit was not merged"
        );

        // And revokes it: removed, it cannot read what follows.
        let leaf = members(&bob_group)
            .into_iter()
            .find(|(_, member)| *member == certificate)
            .unwrap()
            .0;
        let revocation = Revocation {
            device: certificate.device_id(),
            signature: bob.sign_revocation(&certificate.device_id()).unwrap(),
        };
        let commit =
            remove_members(&bob_mls, &bob, &mut bob_group, &[leaf], &[revocation]).unwrap();
        merge_own_commit(&bob_mls, &mut bob_group).unwrap();
        assert!(matches!(
            process(&alice_mls, &mut alice_group, &commit, false).unwrap(),
            Incoming::Commit(_)
        ));
        process(&laptop_mls, &mut laptop_group, &commit, false).unwrap();
        let secret = encrypt(&alice_mls, &alice, &mut alice_group, b"after").unwrap();
        assert!(process(&laptop_mls, &mut laptop_group, &secret, false).is_err());

        // Alice may not bring a third account into the conversation.
        let mallory_db = database();
        let mallory = keys();
        let package = new_key_package(&Provider::new(&mallory_db), &mallory, false).unwrap();
        let package = check_key_package(&alice_mls, &package, mallory.certificate()).unwrap();
        let sneaky = add_members(&alice_mls, &alice, &mut alice_group, &[package]).unwrap();
        let epoch = bob_group.epoch();
        assert!(matches!(
            process(&bob_mls, &mut bob_group, &sneaky.commit, false),
            Err(MlsError::BadMember(_))
        ));
        assert_eq!(bob_group.epoch(), epoch);
    }

    /// A device certified by `owner`'s identity key, with its database, keys and certificate.
    fn linked_device(owner: &AccountKeys) -> (Connection, AccountKeys, VerifiedCertificate) {
        let key = ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng);
        let certificate = owner
            .certify_device(key.verifying_key().as_bytes())
            .unwrap();
        let keys = AccountKeys::linked(&key.to_bytes(), certificate.clone()).unwrap();
        (database(), keys, certificate)
    }

    #[test]
    fn a_revocation_made_by_the_identity_key_lets_any_own_device_remove_the_revoked_one() {
        let (alice_db, bob_db, _alice, bob, welcome) = bob_invites_alice(13);
        let (alice_mls, bob_mls) = (Provider::new(&alice_db), Provider::new(&bob_db));
        join_group(&alice_mls, &welcome, None).unwrap();
        let mut alice_group = load_group(&alice_mls, &[13; 16]).unwrap().unwrap();
        let mut bob_group = load_group(&bob_mls, &[13; 16]).unwrap().unwrap();
        let (laptop_db, laptop, laptop_certificate) = linked_device(&bob);
        let (tablet_db, tablet, tablet_certificate) = linked_device(&bob);
        let (laptop_mls, tablet_mls) = (Provider::new(&laptop_db), Provider::new(&tablet_db));
        let packages = [
            (&laptop_mls, &laptop, &laptop_certificate),
            (&tablet_mls, &tablet, &tablet_certificate),
        ]
        .map(|(provider, keys, certificate)| {
            let package = new_key_package(provider, keys, false).unwrap();
            check_key_package(&bob_mls, &package, certificate).unwrap()
        });
        let added = add_members(&bob_mls, &bob, &mut bob_group, &packages).unwrap();
        merge_own_commit(&bob_mls, &mut bob_group).unwrap();
        process(&alice_mls, &mut alice_group, &added.commit, false).unwrap();
        join_group(&laptop_mls, &added.welcome, None).unwrap();
        let mut laptop_group = load_group(&laptop_mls, &[13; 16]).unwrap().unwrap();
        let tablet_leaf = members(&laptop_group)
            .into_iter()
            .find(|(_, member)| *member == tablet_certificate)
            .unwrap()
            .0;

        // A revocation of another device does not stand in for the tablet's.
        let wrong = Revocation {
            device: laptop_certificate.device_id(),
            signature: bob
                .sign_revocation(&laptop_certificate.device_id())
                .unwrap(),
        };
        let forged = Revocation {
            device: tablet_certificate.device_id(),
            ..wrong
        };
        assert!(matches!(
            remove_members(
                &laptop_mls,
                &laptop,
                &mut laptop_group,
                &[tablet_leaf],
                &[wrong]
            ),
            Err(MlsError::BadMember(_))
        ));
        let commit = remove_members(
            &laptop_mls,
            &laptop,
            &mut laptop_group,
            &[tablet_leaf],
            &[forged],
        )
        .unwrap();
        laptop_group
            .clear_pending_commit(laptop_mls.storage())
            .unwrap();
        assert!(matches!(
            process(&alice_mls, &mut alice_group, &commit, false),
            Err(MlsError::BadMember(_))
        ));

        // The identity key revoked the tablet (on the first device); the laptop, told of it,
        // removes the tablet, and everyone follows.
        let revocation = Revocation {
            device: tablet_certificate.device_id(),
            signature: bob
                .sign_revocation(&tablet_certificate.device_id())
                .unwrap(),
        };
        let commit = remove_members(
            &laptop_mls,
            &laptop,
            &mut laptop_group,
            &[tablet_leaf],
            &[revocation],
        )
        .unwrap();
        merge_own_commit(&laptop_mls, &mut laptop_group).unwrap();
        for (provider, group) in [(&alice_mls, &mut alice_group), (&bob_mls, &mut bob_group)] {
            match process(provider, group, &commit, false).unwrap() {
                Incoming::Commit(summary) => {
                    assert_eq!(summary.removed, vec![tablet_certificate.clone()]);
                    // Whoever reads the commit learns of the revocation.
                    assert_eq!(summary.revocations, vec![revocation]);
                }
                _ => panic!("expected a commit"),
            }
        }
    }

    #[test]
    fn a_last_resort_key_package_is_accepted_and_serves_more_than_once() {
        let (alice_db, bob_db) = (database(), database());
        let (alice, bob) = (keys(), keys());
        let (alice_mls, bob_mls) = (Provider::new(&alice_db), Provider::new(&bob_db));
        let bytes = new_key_package(&alice_mls, &alice, true).unwrap();
        for id in [30u8, 31] {
            let package = check_key_package(&bob_mls, &bytes, alice.certificate()).unwrap();
            let created =
                create_group(&bob_mls, &bob, &[id; 16], &[package], Tree::InWelcome).unwrap();
            join_group(&alice_mls, &created.welcome, None).unwrap();
        }
    }

    #[test]
    fn a_key_package_of_another_device_is_refused() {
        let db = database();
        let provider = Provider::new(&db);
        let (alice, mallory) = (keys(), keys());
        let package = new_key_package(&provider, &mallory, false).unwrap();
        assert!(matches!(
            check_key_package(&provider, &package, alice.certificate()),
            Err(MlsError::BadMember(_))
        ));
    }

    #[test]
    fn members_are_added_and_removed_and_the_removed_cannot_read_what_follows() {
        let (alice_db, bob_db, carol_db, dave_db) =
            (database(), database(), database(), database());
        let (alice, bob, carol, dave) = (keys(), keys(), keys(), keys());
        let (alice_mls, bob_mls, carol_mls, dave_mls) = (
            Provider::new(&alice_db),
            Provider::new(&bob_db),
            Provider::new(&carol_db),
            Provider::new(&dave_db),
        );
        // Alice makes a group of one, then adds Bob, Carol and Dave in one commit.
        let mut alice_group = create_group(&alice_mls, &alice, &[6; 32], &[], Tree::Served)
            .unwrap()
            .group;
        let packages: Vec<KeyPackage> =
            [(&bob_mls, &bob), (&carol_mls, &carol), (&dave_mls, &dave)]
                .into_iter()
                .map(|(provider, keys)| {
                    let package = new_key_package(provider, keys, false).unwrap();
                    check_key_package(&alice_mls, &package, keys.certificate()).unwrap()
                })
                .collect();
        let added = add_members(&alice_mls, &alice, &mut alice_group, &packages).unwrap();
        merge_own_commit(&alice_mls, &mut alice_group).unwrap();
        let tree = &added.tree;
        for provider in [&bob_mls, &carol_mls, &dave_mls] {
            join_group(provider, &added.welcome, Some(tree.sealed())).unwrap();
        }
        let mut bob_group = load_group(&bob_mls, &[6; 32]).unwrap().unwrap();
        let mut carol_group = load_group(&carol_mls, &[6; 32]).unwrap().unwrap();
        let mut dave_group = load_group(&dave_mls, &[6; 32]).unwrap().unwrap();
        assert_eq!(members(&alice_group).len(), 4);

        // Alice removes Carol: Bob learns who removed whom, Carol learns she is out.
        let carol_leaf = members(&alice_group)
            .into_iter()
            .find(|(_, certificate)| certificate == carol.certificate())
            .unwrap()
            .0;
        let commit =
            remove_members(&alice_mls, &alice, &mut alice_group, &[carol_leaf], &[]).unwrap();
        merge_own_commit(&alice_mls, &mut alice_group).unwrap();
        // Where membership changes are not allowed (a one-to-one conversation), it is refused.
        let epoch = dave_group.epoch();
        assert!(matches!(
            process(&dave_mls, &mut dave_group, &commit, false),
            Err(MlsError::BadMember(_))
        ));
        assert_eq!(dave_group.epoch(), epoch);
        match process(&bob_mls, &mut bob_group, &commit, true).unwrap() {
            Incoming::Commit(summary) => {
                assert_eq!(&summary.committer, alice.certificate());
                assert!(summary.added.is_empty());
                assert_eq!(summary.removed, vec![carol.certificate().clone()]);
            }
            _ => panic!("expected a commit"),
        }
        assert!(matches!(
            process(&carol_mls, &mut carol_group, &commit, true).unwrap(),
            Incoming::Commit(_)
        ));
        assert!(!is_active(&carol_group));
        assert!(is_active(&bob_group));

        let secret = encrypt(&alice_mls, &alice, &mut alice_group, b"after carol").unwrap();
        assert!(matches!(
            process(&bob_mls, &mut bob_group, &secret, true).unwrap(),
            Incoming::Application { .. }
        ));
        assert!(process(&carol_mls, &mut carol_group, &secret, true).is_err());
    }

    #[test]
    fn a_newcomer_joins_only_with_the_tree_the_welcome_vouches_for() {
        let (alice_db, bob_db, carol_db) = (database(), database(), database());
        let (alice, bob, carol) = (keys(), keys(), keys());
        let (alice_mls, bob_mls, carol_mls) = (
            Provider::new(&alice_db),
            Provider::new(&bob_db),
            Provider::new(&carol_db),
        );
        let package = |provider: &Provider<'_>, keys: &AccountKeys| {
            let package = new_key_package(provider, keys, false).unwrap();
            check_key_package(&alice_mls, &package, keys.certificate()).unwrap()
        };
        let mut group = create_group(&alice_mls, &alice, &[8; 32], &[], Tree::Served)
            .unwrap()
            .group;
        let first =
            add_members(&alice_mls, &alice, &mut group, &[package(&bob_mls, &bob)]).unwrap();
        merge_own_commit(&alice_mls, &mut group).unwrap();
        let tree_before = group.export_ratchet_tree();
        let added = add_members(
            &alice_mls,
            &alice,
            &mut group,
            &[package(&carol_mls, &carol)],
        )
        .unwrap();
        merge_own_commit(&alice_mls, &mut group).unwrap();
        let served = &added.tree;
        // The Welcome alone does not hold the tree, so the server sees no member list in it.
        assert!(added.welcome.len() < 2048, "{} bytes", added.welcome.len());
        // Carol's device knows the Welcome is for her before fetching anything; Bob's, whose
        // key package is spent, does not take it for his.
        assert!(welcome_is_for_us(&carol_mls, &added.welcome).unwrap());
        assert!(!welcome_is_for_us(&bob_mls, &added.welcome).unwrap());

        // Every failed attempt must leave Carol's state as it was, as the client's savepoint
        // does: no group, and her key package still there for the right tree.
        let refused = |served: Option<SealedTree<'_>>| {
            carol_db.execute_batch("SAVEPOINT attempt").unwrap();
            let outcome = join_group(&carol_mls, &added.welcome, served);
            carol_db
                .execute_batch("ROLLBACK TO attempt; RELEASE attempt")
                .unwrap();
            assert!(load_group(&carol_mls, &[8; 32]).unwrap().is_none());
            outcome.err().expect("the join should fail")
        };
        // No tree at all.
        refused(None);
        // A byte changed (by the server, say).
        let mut altered = served.sealed().ciphertext.to_vec();
        altered[10] ^= 1;
        assert!(matches!(
            refused(Some(SealedTree {
                ciphertext: &altered,
                plaintext_len: served.plaintext_len
            })),
            MlsError::Rejected(_)
        ));
        // The tree served for an earlier Welcome: sealed under another epoch's key.
        let earlier = &first.tree;
        assert!(matches!(
            refused(Some(earlier.sealed())),
            MlsError::Rejected(_)
        ));
        // A tree sealed under the right key (by a member) that is not the group's: its hash
        // differs from the one in the signed GroupInfo.
        let secret = group
            .export_secret(alice_mls.crypto(), TREE_KEY_LABEL, &[], 32)
            .unwrap();
        let forged = seal_tree(&tree_before, secret).unwrap();
        assert!(matches!(
            refused(Some(forged.sealed())),
            MlsError::Rejected(_)
        ));

        let joined = join_group(&carol_mls, &added.welcome, Some(served.sealed())).unwrap();
        assert_eq!(joined.members.len(), 3);
        assert_eq!(&joined.sender, alice.certificate());
    }

    #[test]
    fn every_member_derives_the_same_posting_key_and_the_committer_knows_the_next_one() {
        let (alice_db, bob_db, alice, bob, welcome) = bob_invites_alice(7);
        let (alice_mls, bob_mls) = (Provider::new(&alice_db), Provider::new(&bob_db));
        join_group(&alice_mls, &welcome, None).unwrap();
        let mut alice_group = load_group(&alice_mls, &[7; 16]).unwrap().unwrap();
        let mut bob_group = load_group(&bob_mls, &[7; 16]).unwrap().unwrap();
        let key = |provider: &Provider<'_>, group: &MlsGroup| {
            PostingKey::current(provider, group).unwrap().public()
        };
        assert_eq!(key(&alice_mls, &alice_group), key(&bob_mls, &bob_group));
        assert!(PostingKey::next(&bob_mls, &bob_group).unwrap().is_none());

        // Bob commits: before the server takes it he knows the key of the epoch it starts.
        let before = key(&bob_mls, &bob_group);
        let commit = self_update(&bob_mls, &bob, &mut bob_group).unwrap();
        let next = PostingKey::next(&bob_mls, &bob_group)
            .unwrap()
            .unwrap()
            .public();
        assert_ne!(next, before);
        merge_own_commit(&bob_mls, &mut bob_group).unwrap();
        process(&alice_mls, &mut alice_group, &commit, false).unwrap();
        assert_eq!(key(&alice_mls, &alice_group), next);
        assert_eq!(key(&bob_mls, &bob_group), next);

        // A signature by Alice's copy verifies under the key Bob registered.
        let signature = PostingKey::current(&alice_mls, &alice_group)
            .unwrap()
            .sign_post(&[7; 16], 2, 0, b"ciphertext");
        assert!(miyu_proto::cert::verify_group_post(
            &next,
            &[7; 16],
            2,
            0,
            b"ciphertext",
            &signature
        ));
        assert!(!miyu_proto::cert::verify_group_post(
            &next,
            &[7; 16],
            2,
            0,
            b"other bytes",
            &signature
        ));
        let _ = alice;
    }

    #[test]
    fn padding_hides_exact_lengths() {
        let (alice_db, bob_db) = (database(), database());
        let (alice, bob) = (keys(), keys());
        let (alice_mls, bob_mls) = (Provider::new(&alice_db), Provider::new(&bob_db));
        let package = new_key_package(&alice_mls, &alice, false).unwrap();
        let package = check_key_package(&bob_mls, &package, alice.certificate()).unwrap();
        let mut group = create_group(&bob_mls, &bob, &[1; 16], &[package], Tree::InWelcome)
            .unwrap()
            .group;
        let short = encrypt(&bob_mls, &bob, &mut group, b"a").unwrap();
        let longer = encrypt(&bob_mls, &bob, &mut group, &[b'a'; 100]).unwrap();
        assert_eq!(short.len(), longer.len());
    }
}
