//! Recovering an account when all its devices are lost, and its backups (PROTOCOL.md §7.18,
//! §7.19, §10.11).
//!
//! The first device makes the recovery key at account creation and leaves the server a bundle
//! (the identity key and the account's name, sealed under a key derived from the recovery key)
//! that the server hands out only against a second derived key, five wrong tries a day at most.
//! A recovered device holds the identity key again, as a new device of the same account: its
//! contacts see the same account and safety number. Its history comes back only from a backup
//! (`miyu backup`, PROTOCOL.md §10.11): a chain of segments sealed under the backup key, each
//! an account blob the server keeps while it is in the chain. The first segment holds the whole
//! history, each later one what changed since the segment before; a restore rebuilds the
//! history from them in a scratch database in memory, then adds it to the profile.

use std::path::Path;
use std::time::Duration;

use miyu_crypto::identity::AccountKeys;
use miyu_crypto::recovery::{BackupKey, ChainLink, RecoveryKey, RecoverySecrets, sealed_len};
use miyu_proto::blob::BlobId;
use miyu_proto::wire::{self, client_frame::Body as Request, server_frame::Body as Reply};
use miyu_proto::{AccountId, ServerAddress};
use rand::RngCore;
use rusqlite::{OptionalExtension, params};
use zeroize::Zeroizing;

use crate::files::BlobClient;
use crate::net::{self, Proxy};
use crate::vault::Protection;
use crate::{Client, Error, NewAccount, claim_new_profile, discard_new_profile, history};

/// Version byte of a recovery bundle's plaintext: then the identity secret (32 bytes) and the
/// account's name.
const BUNDLE_V1: u8 = 1;

/// The largest backup this client makes or takes, all its segments together: its history is
/// held in memory.
const MAX_BACKUP_BYTES: u64 = 1 << 30;

/// The most segments a server keeps of a backup (PROTOCOL.md §7.19).
const MAX_BACKUP_SEGMENTS: usize = 64;

/// This client makes a whole backup again once its chain has this many segments, so that a
/// restore downloads few of them.
const MAX_CHAIN_SEGMENTS: u32 = 16;

/// What a backup did.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct BackedUp {
    pub kind: BackupKind,
    /// Plaintext bytes of the segment uploaded (0 when nothing was).
    pub size: u64,
    /// Bytes uploaded: the segment sealed, with its padding.
    pub uploaded: u64,
    /// Segments of the account's backup on the server now, this one included.
    pub segments: u32,
    /// Messages the history holds.
    pub messages: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackupKind {
    /// The whole history, starting a new chain.
    Full,
    /// What changed since the last backup, added to the chain.
    Incremental,
    /// Nothing changed since the last backup: nothing was uploaded.
    Unchanged,
}

/// What a recovery or restore brought back.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Restored {
    pub account_id: String,
    pub conversations: usize,
    pub messages: usize,
    /// Whether the account had a backup.
    pub backup: bool,
    /// The segments the backup was rebuilt from.
    pub segments: usize,
}

fn recovery_error(error: miyu_crypto::recovery::RecoveryError) -> Error {
    Error::Security(format!("recovery: {error}"))
}

impl Client {
    /// Makes the account's recovery key and leaves the server its recovery bundle; returns
    /// the key as text to write down. `passphrase`, if given, is needed with the key.
    pub async fn set_up_recovery(
        &mut self,
        passphrase: Option<&str>,
    ) -> Result<Zeroizing<String>, Error> {
        let identity = self.keys.identity_secret().ok_or_else(|| {
            Error::Usage(
                "only the device holding the account's identity key sets up recovery".into(),
            )
        })?;
        let key = RecoveryKey::generate();
        let account = self.account_id();
        let secrets =
            RecoverySecrets::derive(&key, passphrase, &account).map_err(recovery_error)?;
        let mut plaintext = Zeroizing::new(vec![BUNDLE_V1]);
        plaintext.extend_from_slice(identity.as_slice());
        plaintext.extend_from_slice(self.name.as_bytes());
        let bundle = secrets.seal_bundle(&plaintext).map_err(recovery_error)?;
        let verifier = secrets.verifier();
        let locator = key.locator(&account);
        let signature = self
            .keys
            .sign_recovery(&verifier, &locator, &bundle)
            .map_err(|error| Error::Usage(error.to_string()))?;
        self.connect().await?;
        self.call(Request::SetRecovery(wire::SetRecovery {
            verifier: verifier.to_vec(),
            bundle,
            locator: locator.to_vec(),
            signature: signature.to_vec(),
        }))
        .await?;
        self.db.execute(
            "UPDATE account SET recovery_key = ?1, backup_key = ?2 WHERE id = 1",
            params![
                key.as_bytes().as_slice(),
                secrets.backup_key().as_bytes().as_slice()
            ],
        )?;
        Ok(key.to_text(&account))
    }

    /// The recovery key this device made, to write down again.
    pub fn recovery_key(&self) -> Result<Zeroizing<String>, Error> {
        let bytes = self.stored_key(
            "recovery_key",
            "this device has no recovery key (only the account's first device has)",
        )?;
        Ok(RecoveryKey::from_bytes(*bytes).to_text(&self.account_id()))
    }

    fn backup_key(&self) -> Result<BackupKey, Error> {
        let bytes = self.stored_key(
            "backup_key",
            "this device makes no backups (only the account's first device does)",
        )?;
        Ok(BackupKey::from_bytes(*bytes))
    }

    /// A 32-byte key kept in the account row's `column` (a fixed name, never user input);
    /// `missing` says why there is none.
    fn stored_key(&self, column: &str, missing: &str) -> Result<Zeroizing<[u8; 32]>, Error> {
        let key: Option<Vec<u8>> = self.db.query_row(
            &format!("SELECT {column} FROM account WHERE id = 1"),
            [],
            |row| row.get(0),
        )?;
        let key = Zeroizing::new(key.ok_or_else(|| Error::Usage(missing.into()))?);
        let bytes: [u8; 32] = key.as_slice().try_into().map_err(|_| {
            Error::Usage(format!(
                "the stored {} is damaged",
                column.replace('_', " ")
            ))
        })?;
        Ok(Zeroizing::new(bytes))
    }

    /// Backs the account's history up, sealed under the backup key: what changed since the last
    /// backup, added to its chain on the server, or the whole history, which replaces the
    /// chain. A whole one when this device has no chain the server confirmed, when the chain
    /// has [`MAX_CHAIN_SEGMENTS`] segments, or when its changes together would reach the size
    /// of the whole history it starts with; nothing when nothing changed.
    pub async fn backup(&mut self) -> Result<BackedUp, Error> {
        let key = self.backup_key()?;
        self.connect().await?;
        self.catch_up().await?;
        let messages: usize = self
            .db
            .query_row("SELECT COUNT(*) FROM messages", [], |row| row.get(0))?;
        let Some(chain) = Chain::stored(&self.db)? else {
            return self.back_up_whole(&key, messages).await;
        };
        let Some(changes) = history::export_changes(&self.db)? else {
            return Ok(BackedUp {
                kind: BackupKind::Unchanged,
                size: 0,
                uploaded: 0,
                segments: chain.segments,
                messages,
            });
        };
        let size = changes.bytes.len() as u64;
        let changes_size = chain.changes_size.saturating_add(size);
        let worth_it = chain.segments < MAX_CHAIN_SEGMENTS
            && changes_size < chain.whole_size
            && chain.whole_size.saturating_add(changes_size) <= MAX_BACKUP_BYTES;
        if !worth_it {
            return self.back_up_whole(&key, messages).await;
        }
        let sealed = key
            .seal_segment(&changes.bytes, &chain.next)
            .map_err(recovery_error)?;
        let uploaded = sealed.blob.len() as u64;
        let blob_id = BlobClient::new(&self.keys, &self.server, self.proxy)
            .upload_whole(None, sealed.blob)
            .await?;
        Chain::forget(&self.db)?;
        let appended = self
            .call(Request::SetBackup(wire::SetBackup {
                blob_id: blob_id.0.to_vec(),
                size,
                append_after: chain.last_blob.0.to_vec(),
            }))
            .await;
        match appended {
            Ok(_) => {}
            // The server's chain is not the one this device made (another device of the
            // account made a backup since), or it is full: start a new one.
            Err(Error::Server(refused))
                if matches!(
                    refused.code,
                    wire::ErrorCode::NotFound | wire::ErrorCode::InvalidArgument
                ) =>
            {
                return self.back_up_whole(&key, messages).await;
            }
            Err(error) => return Err(error),
        }
        let grown = Chain {
            segments: chain.segments + 1,
            last_blob: blob_id,
            next: chain
                .next
                .next(sealed.digest)
                .ok_or_else(|| Error::Bug("a backup chain outgrew its index".into()))?,
            whole_size: chain.whole_size,
            changes_size,
        };
        crate::db::in_transaction(&self.db, |db| {
            history::forget_changes(db, changes.last_change)?;
            grown.store(db)
        })?;
        Ok(BackedUp {
            kind: BackupKind::Incremental,
            size,
            uploaded,
            segments: grown.segments,
            messages,
        })
    }

    /// Uploads the whole history as the first segment of a new chain, which replaces the
    /// account's backup on the server.
    async fn back_up_whole(&mut self, key: &BackupKey, messages: usize) -> Result<BackedUp, Error> {
        // Changes are noted from the moment the history is read: whatever changes later goes
        // into the next backup.
        let (bytes, last_change) = crate::db::in_transaction(&self.db, |db| {
            let bytes = Zeroizing::new(history::export(db)?);
            let last_change: i64 = db.query_row(
                "SELECT coalesce(max(seq), 0) FROM backup_changes",
                [],
                |row| row.get(0),
            )?;
            db.execute("UPDATE account SET backup_tracking = 1 WHERE id = 1", [])?;
            Ok((bytes, last_change))
        })?;
        let size = bytes.len() as u64;
        if size > MAX_BACKUP_BYTES {
            return Err(Error::Usage(
                "the history is too large to back up (1 GiB at most)".into(),
            ));
        }
        let sealed = key
            .seal_segment(&bytes, &ChainLink::FIRST)
            .map_err(recovery_error)?;
        let uploaded = sealed.blob.len() as u64;
        let blob_id = BlobClient::new(&self.keys, &self.server, self.proxy)
            .upload_whole(None, sealed.blob)
            .await?;
        Chain::forget(&self.db)?;
        self.call(Request::SetBackup(wire::SetBackup {
            blob_id: blob_id.0.to_vec(),
            size,
            append_after: Vec::new(),
        }))
        .await?;
        let chain = Chain {
            segments: 1,
            last_blob: blob_id,
            next: ChainLink::FIRST
                .next(sealed.digest)
                .ok_or_else(|| Error::Bug("a backup chain outgrew its index".into()))?,
            whole_size: size,
            changes_size: 0,
        };
        crate::db::in_transaction(&self.db, |db| {
            history::forget_changes(db, last_change)?;
            chain.store(db)
        })?;
        Ok(BackedUp {
            kind: BackupKind::Full,
            size,
            uploaded,
            segments: 1,
            messages,
        })
    }

    /// Brings the account's latest backup into this device's history (what it already has
    /// stays). Needs the recovery key, as recovery does; `passphrase` if it has one.
    pub async fn restore(
        &mut self,
        recovery_text: &str,
        passphrase: Option<&str>,
    ) -> Result<Restored, Error> {
        let (account, key) = RecoveryKey::parse(recovery_text).map_err(recovery_error)?;
        if account != self.account_id() {
            return Err(Error::Usage(
                "that recovery key is another account's".into(),
            ));
        }
        let secrets =
            RecoverySecrets::derive(&key, passphrase, &account).map_err(recovery_error)?;
        let locator = key.locator(&account);
        let bundle = ask_bundle(&self.server, self.proxy.as_ref(), &locator, &secrets).await?;
        self.connect().await?;
        self.take_backup(&bundle, &secrets.backup_key(), account)
            .await
    }

    async fn take_backup(
        &mut self,
        bundle: &wire::RecoveryBundle,
        key: &BackupKey,
        account: AccountId,
    ) -> Result<Restored, Error> {
        let mut restored = Restored {
            account_id: account.to_string(),
            conversations: 0,
            messages: 0,
            backup: false,
            segments: 0,
        };
        if bundle.backup.is_empty() {
            return Ok(restored);
        }
        let whole = self.rebuild_backup(&bundle.backup, key).await?;
        let imported = history::import(&self.db, &whole)?;
        restored.segments = bundle.backup.len();
        restored.conversations = imported.conversations;
        restored.messages = imported.messages;
        restored.backup = true;
        Ok(restored)
    }

    /// Downloads the segments of the account's backup, opens each at its place in the chain
    /// and plays them in order onto a scratch database: the history they make, whole. Fails
    /// if a segment is missing from the middle, altered, out of order or from another chain.
    async fn rebuild_backup(
        &mut self,
        chain: &[wire::BackupSegment],
        key: &BackupKey,
    ) -> Result<Zeroizing<Vec<u8>>, Error> {
        // The sizes come from the server: a backup is held in memory, so bound them.
        let total = chain
            .iter()
            .try_fold(0u64, |total, segment| total.checked_add(segment.size));
        if chain.len() > MAX_BACKUP_SEGMENTS || total.is_none_or(|total| total > MAX_BACKUP_BYTES) {
            return Err(Error::Security(
                "the server announces a backup larger than any this client makes".into(),
            ));
        }
        let scratch = history::scratch()?;
        let mut blobs = BlobClient::new(&self.keys, &self.server, self.proxy);
        let mut link = ChainLink::FIRST;
        for (index, segment) in chain.iter().enumerate() {
            let blob_id =
                BlobId(segment.blob_id.as_slice().try_into().map_err(|_| {
                    Error::Protocol("a backup segment's blob id is malformed".into())
                })?);
            let length = sealed_len(segment.size).map_err(recovery_error)?;
            let sealed = blobs.download_whole(&blob_id, length).await?;
            let opened = key.open_segment(&sealed, &link).map_err(|_| {
                Error::Security(format!(
                    "segment {} of the backup's {} does not open in its place: the server \
                     altered, reordered or left out segments (or the size it announced is wrong)",
                    index + 1,
                    chain.len()
                ))
            })?;
            history::apply(&scratch, &opened.plaintext)?;
            link = link.next(opened.digest).ok_or_else(|| {
                Error::Security("the backup has more segments than a chain can".into())
            })?;
        }
        Ok(Zeroizing::new(history::export(&scratch)?))
    }

    /// On a new device, when the account's devices are lost: takes the identity key back from
    /// the recovery bundle (with the recovery key, and `recovery_passphrase` if it has one),
    /// registers as a new device of the account and brings back the latest backup, if any.
    pub async fn recover(
        profile: &Path,
        server: ServerAddress,
        recovery_text: &str,
        recovery_passphrase: Option<&str>,
        protection: &Protection,
        proxy: Option<Proxy>,
    ) -> Result<(Self, Restored), Error> {
        let (account, key) = RecoveryKey::parse(recovery_text).map_err(recovery_error)?;
        let (lock, path) = claim_new_profile(profile)?;
        let secrets =
            RecoverySecrets::derive(&key, recovery_passphrase, &account).map_err(recovery_error)?;
        let bundle = ask_bundle(&server, proxy.as_ref(), &key.locator(&account), &secrets).await?;
        let plaintext = secrets
            .open_bundle(&bundle.bundle)
            .map_err(recovery_error)?;
        let (version, rest) = plaintext
            .split_first()
            .ok_or_else(|| Error::Security("the recovery bundle is empty".into()))?;
        if *version != BUNDLE_V1 || rest.len() < 32 {
            return Err(Error::Security("the recovery bundle is malformed".into()));
        }
        let (identity, name) = rest.split_at(32);
        let name = String::from_utf8_lossy(name).into_owned();
        let mut device = Zeroizing::new([0u8; 32]);
        rand::rngs::OsRng.fill_bytes(device.as_mut());
        let keys = AccountKeys::from_secrets(identity, device.as_slice())
            .map_err(|error| Error::Security(format!("the recovery bundle: {error}")))?;
        // The bundle must hold this account's identity, not one the server chose.
        if keys.certificate().account_id() != account {
            return Err(Error::Security(
                "the recovery bundle holds another account's identity".into(),
            ));
        }
        let created = async {
            let database_key = crate::vault::create(profile, protection)?;
            let new = NewAccount {
                keys,
                server,
                name: &name,
                proxy,
                holding_deliveries: false,
            };
            let mut client = Self::create_account(&path, &database_key, lock, new).await?;
            client.db.execute(
                "UPDATE account SET recovery_key = ?1, backup_key = ?2 WHERE id = 1",
                params![
                    key.as_bytes().as_slice(),
                    secrets.backup_key().as_bytes().as_slice()
                ],
            )?;
            let restored = client
                .take_backup(&bundle, &secrets.backup_key(), account)
                .await?;
            Ok::<_, Error>((client, restored))
        }
        .await;
        let (mut client, restored) = match created {
            Ok(created) => created,
            Err(error) => {
                discard_new_profile(profile, &path);
                return Err(error);
            }
        };
        // The account's devices that survive learn of this one through a new account group,
        // and bring it into their conversations (PROTOCOL.md §10.12).
        if let Err(error) = client.ensure_account_group().await {
            tracing::warn!("could not tell the account's other devices of this one: {error}");
        }
        Ok((client, restored))
    }
}

/// Asks the server for the recovery bundle at `locator` on a connection that has not
/// authenticated.
async fn ask_bundle(
    server: &ServerAddress,
    proxy: Option<&Proxy>,
    locator: &[u8; 32],
    secrets: &RecoverySecrets,
) -> Result<wire::RecoveryBundle, Error> {
    let mut connection = net::Connection::open(server, proxy).await?;
    let asked = connection.call(Request::Recover(wire::Recover {
        locator: locator.to_vec(),
        auth_key: secrets.auth_key().to_vec(),
    }));
    let answer = tokio::time::timeout(Duration::from_secs(30), asked)
        .await
        .map_err(|_| Error::Network("the server did not answer".into()))?;
    connection.close().await;
    match answer {
        Ok(Reply::RecoveryBundle(bundle)) => Ok(bundle),
        Ok(other) => Err(Error::Protocol(format!("unexpected answer: {other:?}"))),
        Err(Error::Server(error)) => Err(match error.code {
            wire::ErrorCode::AuthenticationFailed => Error::Usage(
                "the server refused this recovery key (or passphrase); each wrong try counts"
                    .into(),
            ),
            wire::ErrorCode::RateLimited => Error::Usage(
                "too many wrong recovery tries for this account; try again tomorrow".into(),
            ),
            // Found by a locator derived from the key: a wrong key finds nothing.
            wire::ErrorCode::NotFound => Error::Usage(
                "the server has no recovery bundle for this recovery key (is it the right key, \
                 and the right server?)"
                    .into(),
            ),
            _ => Error::Server(error),
        }),
        Err(error) => Err(error),
    }
}

/// The chain of backup segments this device last stored on the server.
struct Chain {
    segments: u32,
    last_blob: BlobId,
    /// Where the next segment goes.
    next: ChainLink,
    whole_size: u64,
    /// The plaintext sizes of the segments after the first, together.
    changes_size: u64,
}

impl Chain {
    /// The chain this device stored, if it can grow: none if it never made one, if the last
    /// attempt to store one may have failed (the server's chain is unknown), or if it follows
    /// another version of the profile's schema than this client's.
    fn stored(db: &rusqlite::Connection) -> Result<Option<Self>, Error> {
        let row = db
            .query_row(
                "SELECT segments, last_blob, last_digest, whole_size, changes_size, schema \
                 FROM backup_chain WHERE id = 1",
                [],
                |row| {
                    Ok((
                        row.get::<_, i64>(0)?,
                        row.get::<_, Vec<u8>>(1)?,
                        row.get::<_, Vec<u8>>(2)?,
                        row.get::<_, i64>(3)?,
                        row.get::<_, i64>(4)?,
                        row.get::<_, i64>(5)?,
                    ))
                },
            )
            .optional()?;
        let Some((segments, last_blob, last_digest, whole_size, changes_size, schema)) = row else {
            return Ok(None);
        };
        let chain = (|| {
            let segments = u32::try_from(segments).ok()?;
            Some(Self {
                segments,
                last_blob: BlobId(last_blob.try_into().ok()?),
                next: ChainLink {
                    index: segments,
                    previous: last_digest.try_into().ok()?,
                },
                whole_size: u64::try_from(whole_size).ok()?,
                changes_size: u64::try_from(changes_size).ok()?,
            })
        })();
        // A damaged record costs a whole backup, nothing more.
        Ok(chain.filter(|_| schema == crate::db::SCHEMA_VERSION))
    }

    fn store(&self, db: &rusqlite::Connection) -> Result<(), Error> {
        db.execute(
            "INSERT OR REPLACE INTO backup_chain \
             (id, segments, last_blob, last_digest, whole_size, changes_size, schema) \
             VALUES (1, ?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                self.segments,
                self.last_blob.0.as_slice(),
                self.next.previous.as_slice(),
                i64::try_from(self.whole_size).unwrap_or(i64::MAX),
                i64::try_from(self.changes_size).unwrap_or(i64::MAX),
                crate::db::SCHEMA_VERSION
            ],
        )?;
        Ok(())
    }

    /// Forgets the chain: until the server confirms the next segment, which chain it holds is
    /// unknown, and the next backup is a whole one.
    fn forget(db: &rusqlite::Connection) -> Result<(), Error> {
        db.execute("DELETE FROM backup_chain", [])?;
        Ok(())
    }
}
