//! Recovering an account when all its devices are lost, and its backups (PROTOCOL.md §7.18,
//! §7.19, §10.11).
//!
//! The first device makes the recovery key at account creation and leaves the server a bundle
//! (the identity key and the account's name, sealed under a key derived from the recovery key)
//! that the server hands out only against a second derived key, five wrong tries a day at most.
//! A recovered device holds the identity key again, as a new device of the same account: its
//! contacts see the same account and safety number. Its history comes back only from a backup
//! (`miyu backup`: the history, sealed under the backup key, in an account blob the server keeps
//! until the next backup).

use std::path::Path;
use std::time::Duration;

use miyu_crypto::identity::AccountKeys;
use miyu_crypto::recovery::{BackupKey, ChainLink, RecoveryKey, RecoverySecrets, sealed_len};
use miyu_proto::blob::BlobId;
use miyu_proto::wire::{self, client_frame::Body as Request, server_frame::Body as Reply};
use miyu_proto::{AccountId, ServerAddress};
use rand::RngCore;
use rusqlite::params;
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

/// What a recovery or restore brought back.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Restored {
    pub account_id: String,
    pub conversations: usize,
    pub messages: usize,
    /// Whether the account had a backup.
    pub backup: bool,
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
        self.connect().await?;
        self.call(Request::SetRecovery(wire::SetRecovery {
            verifier: secrets.verifier().to_vec(),
            bundle,
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
        let key: Option<Vec<u8>> =
            self.db
                .query_row("SELECT recovery_key FROM account WHERE id = 1", [], |row| {
                    row.get(0)
                })?;
        let key = Zeroizing::new(key.ok_or_else(|| {
            Error::Usage(
                "this device has no recovery key (only the account's first device has)".into(),
            )
        })?);
        let bytes: [u8; 32] = key
            .as_slice()
            .try_into()
            .map_err(|_| Error::Usage("the stored recovery key is damaged".into()))?;
        Ok(RecoveryKey::from_bytes(bytes).to_text(&self.account_id()))
    }

    fn backup_key(&self) -> Result<BackupKey, Error> {
        let key: Option<Vec<u8>> =
            self.db
                .query_row("SELECT backup_key FROM account WHERE id = 1", [], |row| {
                    row.get(0)
                })?;
        let key = Zeroizing::new(key.ok_or_else(|| {
            Error::Usage(
                "this device makes no backups (only the account's first device does)".into(),
            )
        })?);
        let bytes: [u8; 32] = key
            .as_slice()
            .try_into()
            .map_err(|_| Error::Usage("the stored backup key is damaged".into()))?;
        Ok(BackupKey::from_bytes(bytes))
    }

    /// Uploads the account's history, sealed under the backup key; the server keeps it until
    /// the next backup, which replaces it. Returns how many messages it holds.
    pub async fn backup(&mut self) -> Result<usize, Error> {
        let key = self.backup_key()?;
        self.connect().await?;
        self.catch_up().await?;
        let bytes = Zeroizing::new(history::export(&self.db)?);
        if bytes.len() as u64 > MAX_BACKUP_BYTES {
            return Err(Error::Usage(
                "the history is too large to back up (1 GiB at most)".into(),
            ));
        }
        let messages: usize = self
            .db
            .query_row("SELECT COUNT(*) FROM messages", [], |row| row.get(0))?;
        let sealed = key
            .seal_segment(&bytes, &ChainLink::FIRST)
            .map_err(recovery_error)?;
        let blob_id = BlobClient::new(&self.keys, &self.server, self.proxy)
            .upload_whole(None, sealed.blob)
            .await?;
        self.call(Request::SetBackup(wire::SetBackup {
            blob_id: blob_id.0.to_vec(),
            size: bytes.len() as u64,
            append_after: Vec::new(),
        }))
        .await?;
        Ok(messages)
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
        let bundle = ask_bundle(&self.server, self.proxy.as_ref(), &account, &secrets).await?;
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
        };
        if bundle.backup.is_empty() {
            return Ok(restored);
        }
        let segments = self.fetch_backup(&bundle.backup, key).await?;
        let mut imported = history::Imported::default();
        for segment in &segments {
            imported = history::import(&self.db, segment)?;
        }
        restored.conversations = imported.conversations;
        restored.messages = imported.messages;
        restored.backup = true;
        Ok(restored)
    }

    /// Downloads the segments of the account's backup and opens each at its place in the
    /// chain: the plaintexts, first to last. Fails, having kept nothing, if one is missing from
    /// the middle, altered, out of order or from another chain.
    async fn fetch_backup(
        &mut self,
        chain: &[wire::BackupSegment],
        key: &BackupKey,
    ) -> Result<Vec<Zeroizing<Vec<u8>>>, Error> {
        // The sizes come from the server: a backup is held in memory, so bound them.
        let total = chain
            .iter()
            .try_fold(0u64, |total, segment| total.checked_add(segment.size));
        if chain.len() > MAX_BACKUP_SEGMENTS || total.is_none_or(|total| total > MAX_BACKUP_BYTES) {
            return Err(Error::Security(
                "the server announces a backup larger than any this client makes".into(),
            ));
        }
        let mut blobs = BlobClient::new(&self.keys, &self.server, self.proxy);
        let mut link = ChainLink::FIRST;
        let mut plaintexts = Vec::with_capacity(chain.len());
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
            link = link.next(opened.digest).ok_or_else(|| {
                Error::Security("the backup has more segments than a chain can".into())
            })?;
            plaintexts.push(opened.plaintext);
        }
        Ok(plaintexts)
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
        let bundle = ask_bundle(&server, proxy.as_ref(), &account, &secrets).await?;
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
        if created.is_err() {
            discard_new_profile(profile, &path);
        }
        created
    }
}

/// Asks the server for the account's recovery bundle on a connection that has not
/// authenticated.
async fn ask_bundle(
    server: &ServerAddress,
    proxy: Option<&Proxy>,
    account: &AccountId,
    secrets: &RecoverySecrets,
) -> Result<wire::RecoveryBundle, Error> {
    let mut connection = net::Connection::open(server, proxy).await?;
    let asked = connection.call(Request::Recover(wire::Recover {
        account_id: account.as_bytes().to_vec(),
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
            wire::ErrorCode::NotFound => {
                Error::Usage("the server has no recovery bundle for this account".into())
            }
            _ => Error::Server(error),
        }),
        Err(error) => Err(error),
    }
}
