//! The HTTPS blob endpoints (PROTOCOL.md §8): encrypted files, uploaded and downloaded in
//! pieces, resumable, and readable only by the members of the conversation they were sent in
//! (or, for a blob of an account, by that account's devices).
//!
//! - `POST /v1/blobs` (`miyu-size`, optional `miyu-group` and `miyu-expires`) creates an empty
//!   blob of a group, or without one of the uploader's account, and answers its random id in
//!   `miyu-blob`.
//! - `PATCH /v1/blobs/{id}` (`upload-offset`) appends the request body at that offset. The bytes
//!   are flushed to disk and recorded every [`CHECKPOINT_BYTES`] and at the end, also when the
//!   body breaks off; the answer's `upload-offset` is the length that is durable.
//! - `HEAD /v1/blobs/{id}` tells the durable length (`upload-offset`) and size (`miyu-size`).
//! - `GET /v1/blobs/{id}` returns a finished blob, or one `Range` of it.
//!
//! Every request carries a device signature ([`miyu_proto::blob::HttpAuth`]). The server sees
//! ciphertext and its size, never a file name or type. Blob bytes live in files named by the
//! id under `blobs/` in the data folder; their rows live in the store, and a file whose row is
//! gone (expired, account deleted) is removed by [`remove_orphans`].

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::{Path as UrlPath, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use miyu_proto::blob::{
    BlobId, HttpAuth, MAX_CLOCK_SKEW_S, SERVER_TIME_HEADER, canonical_headers, parse_range,
};
use miyu_proto::{DeviceId, GroupId};
use rand::RngCore;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

use crate::connection::{Shared, unix_now};
use crate::limits::TokenBucket;
use crate::store::{BlobRecord, NewBlob, StoreError};

/// How many bytes an upload may take between two flushes to disk.
pub(crate) const CHECKPOINT_BYTES: u64 = 32 * 1024 * 1024;
/// Bytes read from a blob file per piece of a download.
const READ_PIECE: usize = 256 * 1024;
/// Bytes gathered before one write to the blob file.
const WRITE_BUFFER: usize = 1024 * 1024;
/// An upload that sends nothing for this long is ended (what arrived is kept), so that a
/// vanished client does not hold its blob's upload slot.
const BODY_IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);
/// Requests per second (sustained) one device may make to the blob endpoints, and its burst.
const DEVICE_REQUESTS_PER_SECOND: f64 = 20.0;
const DEVICE_REQUEST_BURST: f64 = 100.0;
/// Store lookups per second that authentication may cause across the server (a request naming
/// a device must look its key up before its signature can be checked), and the burst: beyond
/// this the blob endpoints answer 503, and messaging, which shares the store, is unaffected.
const AUTH_LOOKUPS_PER_SECOND: f64 = 1000.0;
const AUTH_LOOKUP_BURST: f64 = 2000.0;
/// Uploads one device may run at once.
const MAX_UPLOADS_PER_DEVICE: usize = 4;
/// Blobs one account may hold at once, however small.
const MAX_BLOBS_PER_ACCOUNT: usize = 10_000;
/// The smallest blob: one sealed chunk of an empty file is 16 bytes.
const MIN_BLOB_BYTES: u64 = 16;

pub(crate) const GROUP_HEADER: &str = "miyu-group";
pub(crate) const SIZE_HEADER: &str = "miyu-size";
pub(crate) const EXPIRES_HEADER: &str = "miyu-expires";
pub(crate) const BLOB_HEADER: &str = "miyu-blob";
pub(crate) const OFFSET_HEADER: &str = "upload-offset";

/// What the server allows of blobs (from its configuration).
#[derive(Debug, Clone)]
pub(crate) struct BlobLimits {
    pub(crate) max_bytes: u64,
    pub(crate) quota_bytes: u64,
    pub(crate) retention_s: u64,
}

/// What the server remembers about one device's recent blob requests.
struct DeviceRequests {
    budget: TokenBucket,
    /// Nonces of its signed requests still inside the clock window, with the time they carry.
    nonces: HashMap<[u8; 16], u64>,
    uploads: usize,
}

/// The blob side of the server: where files live, limits, replay and upload bookkeeping.
pub(crate) struct Blobs {
    dir: PathBuf,
    limits: BlobLimits,
    devices: Mutex<HashMap<DeviceId, DeviceRequests>>,
    lookups: Mutex<TokenBucket>,
    /// Blobs with an upload running: one at a time each.
    uploading: Mutex<HashSet<[u8; 32]>>,
}

/// Why a signed request was not let through.
enum Admission {
    Replayed,
    OverBudget,
}

impl Blobs {
    pub(crate) fn open(data_dir: &Path, limits: BlobLimits) -> std::io::Result<Self> {
        let dir = data_dir.join("blobs");
        std::fs::create_dir_all(&dir)?;
        Ok(Self {
            dir,
            limits,
            devices: Mutex::new(HashMap::new()),
            lookups: Mutex::new(TokenBucket::new(
                AUTH_LOOKUPS_PER_SECOND,
                AUTH_LOOKUP_BURST,
                Instant::now(),
            )),
            uploading: Mutex::new(HashSet::new()),
        })
    }

    fn path(&self, id: &BlobId) -> PathBuf {
        self.dir.join(id.to_string())
    }

    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// Removes the file of a blob whose row is gone. A file that is not there is fine (the
    /// upload never started); one that cannot be removed is left to [`remove_orphans`].
    pub(crate) async fn remove_file(&self, id: [u8; 32]) {
        let path = self.path(&BlobId(id));
        let removed = tokio::task::spawn_blocking(move || std::fs::remove_file(path)).await;
        match removed {
            Ok(Ok(())) => {}
            Ok(Err(error)) if error.kind() == std::io::ErrorKind::NotFound => {}
            Ok(Err(error)) => tracing::warn!("removing a replaced blob failed: {error}"),
            Err(error) => tracing::warn!("removing a replaced blob failed: {error}"),
        }
    }

    /// Admits one signed request of a device: within its budget, and with a nonce it has not
    /// used inside the clock window. Nonces are kept with the time the request carried, so
    /// each is remembered for as long as that time is acceptable.
    fn admit(
        &self,
        device: DeviceId,
        nonce: [u8; 16],
        time: u64,
        now: u64,
    ) -> Result<(), Admission> {
        let mut devices = self.devices.lock().unwrap_or_else(|e| e.into_inner());
        let requests = devices.entry(device).or_insert_with(|| DeviceRequests {
            budget: TokenBucket::new(
                DEVICE_REQUESTS_PER_SECOND,
                DEVICE_REQUEST_BURST,
                Instant::now(),
            ),
            nonces: HashMap::new(),
            uploads: 0,
        });
        if !requests.budget.try_take(Instant::now()) {
            return Err(Admission::OverBudget);
        }
        // The budget bounds how many nonces a device can have inside the window; the ones
        // outside it can go.
        if requests.nonces.len() >= 1024 {
            requests
                .nonces
                .retain(|_, signed| signed.abs_diff(now) <= MAX_CLOCK_SKEW_S);
        }
        if requests.nonces.insert(nonce, time).is_some() {
            return Err(Admission::Replayed);
        }
        Ok(())
    }

    /// Forgets devices with nothing left to remember: called by the sweep.
    pub(crate) fn forget_idle(&self, now: u64) {
        let mut devices = self.devices.lock().unwrap_or_else(|e| e.into_inner());
        devices.retain(|_, requests| {
            requests
                .nonces
                .retain(|_, signed| signed.abs_diff(now) <= MAX_CLOCK_SKEW_S);
            !requests.nonces.is_empty()
                || requests.uploads > 0
                || !requests.budget.is_full(Instant::now())
        });
    }

    /// Counts an upload of a device; `None` if it already runs as many as it may.
    fn start_upload(self: &Arc<Self>, device: DeviceId) -> Option<UploadCount> {
        let mut devices = self.devices.lock().unwrap_or_else(|e| e.into_inner());
        let requests = devices.get_mut(&device)?;
        if requests.uploads >= MAX_UPLOADS_PER_DEVICE {
            return None;
        }
        requests.uploads += 1;
        Some(UploadCount {
            blobs: Arc::clone(self),
            device,
        })
    }
}

/// One running upload of a device, counted until dropped.
struct UploadCount {
    blobs: Arc<Blobs>,
    device: DeviceId,
}

impl Drop for UploadCount {
    fn drop(&mut self) {
        let mut devices = self.blobs.devices.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(requests) = devices.get_mut(&self.device) {
            requests.uploads = requests.uploads.saturating_sub(1);
        }
    }
}

/// The answer to a refused request: a status and a short, plain reason.
fn refuse(status: StatusCode, reason: &str) -> Response {
    (status, format!("{reason}\n")).into_response()
}

fn store_refusal(error: &StoreError) -> Response {
    match error {
        StoreError::NotFound => refuse(StatusCode::NOT_FOUND, "no such blob or group"),
        StoreError::Forbidden => refuse(
            StatusCode::FORBIDDEN,
            "this device is not a member of the blob's conversation or account",
        ),
        StoreError::QuotaExceeded => refuse(
            StatusCode::INSUFFICIENT_STORAGE,
            "the account's storage quota on this server is used up",
        ),
        StoreError::Invalid(reason) => refuse(StatusCode::BAD_REQUEST, reason),
        StoreError::AlreadyExists => refuse(StatusCode::CONFLICT, "the blob exists"),
        other => {
            tracing::warn!("blob request failed in the store: {other}");
            refuse(StatusCode::SERVICE_UNAVAILABLE, "storage unavailable")
        }
    }
}

/// Checks a request's device signature; the device it names is the one making it.
async fn authenticate(
    shared: &Shared,
    method: &Method,
    path_and_query: &str,
    headers: &HeaderMap,
) -> Result<DeviceId, Response> {
    let now = unix_now();
    let failed = || {
        let mut response = refuse(StatusCode::UNAUTHORIZED, "authentication failed");
        response
            .headers_mut()
            .insert(SERVER_TIME_HEADER, HeaderValue::from(now));
        response
    };
    let auth = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| HttpAuth::parse(value).ok())
        .ok_or_else(failed)?;
    if auth.time.abs_diff(now) > MAX_CLOCK_SKEW_S {
        return Err(failed());
    }
    let blobs = &shared.blobs;
    if !blobs
        .lookups
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .try_take(Instant::now())
    {
        return Err(refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "busy; try again shortly",
        ));
    }
    let device = auth.device_id;
    let record = shared
        .store
        .run(move |store| store.device(&device))
        .await
        .map_err(|error| store_refusal(&error))?
        .ok_or_else(failed)?;
    let signed_headers = canonical_headers(|name| {
        headers
            .get(name)
            .map(|value| value.to_str().map_err(|_| ()))
    })
    .map_err(|_| failed())?;
    if !auth.verify(
        &record.device_key,
        &shared.certificate_sha256,
        method.as_str(),
        path_and_query,
        &signed_headers,
    ) {
        return Err(failed());
    }
    match blobs.admit(device, auth.nonce, auth.time, now) {
        Ok(()) => Ok(device),
        Err(Admission::Replayed) => Err(failed()),
        Err(Admission::OverBudget) => Err(refuse(
            StatusCode::TOO_MANY_REQUESTS,
            "too many requests from this device; slow down",
        )),
    }
}

fn header_u64(headers: &HeaderMap, name: &str) -> Option<u64> {
    let text = headers.get(name)?.to_str().ok()?;
    if text.is_empty() || text.len() > 20 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// What the blob handlers share: the server's state, blobs included.
pub(crate) type BlobState = Arc<Shared>;

/// `POST /v1/blobs`
pub(crate) async fn create(State(state): State<BlobState>, request: Request) -> Response {
    let (parts, _body) = request.into_parts();
    let path = path_and_query(&parts);
    let device = match authenticate(&state, &parts.method, &path, &parts.headers).await {
        Ok(device) => device,
        Err(response) => return response,
    };
    // Without a group the blob is the account's: its devices read it, no group does.
    let group_id = match parts.headers.get(GROUP_HEADER) {
        None => None,
        Some(value) => match value
            .to_str()
            .ok()
            .and_then(|text| text.parse::<GroupId>().ok())
        {
            Some(group_id) => Some(group_id),
            None => return refuse(StatusCode::BAD_REQUEST, "malformed miyu-group header"),
        },
    };
    let Some(size) = header_u64(&parts.headers, SIZE_HEADER) else {
        return refuse(StatusCode::BAD_REQUEST, "the miyu-size header is required");
    };
    if size < MIN_BLOB_BYTES {
        return refuse(
            StatusCode::BAD_REQUEST,
            "a blob holds at least one sealed chunk (16 bytes)",
        );
    }
    if size > state.blobs.limits.max_bytes {
        return refuse(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!(
                "this server takes files of at most {} bytes",
                state.blobs.limits.max_bytes
            ),
        );
    }
    let now = unix_now();
    let longest = now + state.blobs.limits.retention_s;
    let expires_at = header_u64(&parts.headers, EXPIRES_HEADER)
        .map_or(longest, |wanted| wanted.clamp(now + 60, longest));
    let mut blob_id = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut blob_id);
    let quota = state.blobs.limits.quota_bytes;
    let created = state
        .store
        .run(move |store| {
            store.create_blob(
                NewBlob {
                    blob_id,
                    uploader: device,
                    group_id,
                    size,
                    expires_at,
                    max_blobs: MAX_BLOBS_PER_ACCOUNT,
                    now,
                },
                quota,
            )
        })
        .await;
    match created {
        Ok(()) => {
            let id = BlobId(blob_id).to_string();
            let mut response = (StatusCode::CREATED, format!("{id}\n")).into_response();
            if let Ok(value) = HeaderValue::from_str(&id) {
                response.headers_mut().insert(BLOB_HEADER, value);
            }
            response
                .headers_mut()
                .insert(EXPIRES_HEADER, HeaderValue::from(expires_at));
            response
        }
        Err(error) => store_refusal(&error),
    }
}

/// Authenticates a request about one blob and parses its id.
async fn blob_request_id(
    state: &BlobState,
    id: &str,
    method: &Method,
    path_and_query: &str,
    headers: &HeaderMap,
) -> Result<(DeviceId, BlobId), Response> {
    let device = authenticate(state, method, path_and_query, headers).await?;
    let blob_id: BlobId = id
        .parse()
        .map_err(|_| refuse(StatusCode::NOT_FOUND, "no such blob"))?;
    Ok((device, blob_id))
}

/// The record of a blob, for a device allowed to see it.
async fn blob_record(
    state: &BlobState,
    device: DeviceId,
    blob_id: BlobId,
) -> Result<BlobRecord, Response> {
    let now = unix_now();
    state
        .store
        .run(move |store| store.blob(&blob_id.0, &device, now))
        .await
        .map_err(|error| store_refusal(&error))
}

/// Authenticates a request about one blob and fetches its record.
async fn blob_request(
    state: &BlobState,
    id: &str,
    method: &Method,
    path_and_query: &str,
    headers: &HeaderMap,
) -> Result<(DeviceId, BlobId, BlobRecord), Response> {
    let (device, blob_id) = blob_request_id(state, id, method, path_and_query, headers).await?;
    let record = blob_record(state, device, blob_id).await?;
    Ok((device, blob_id, record))
}

fn path_and_query(request: &axum::http::request::Parts) -> String {
    request.uri.path_and_query().map_or_else(
        || request.uri.path().to_string(),
        |p| p.as_str().to_string(),
    )
}

/// `HEAD /v1/blobs/{id}`
pub(crate) async fn status(
    State(state): State<BlobState>,
    UrlPath(id): UrlPath<String>,
    request: Request,
) -> Response {
    let (parts, _body) = request.into_parts();
    let path = path_and_query(&parts);
    match blob_request(&state, &id, &parts.method, &path, &parts.headers).await {
        Ok((_, _, record)) => {
            let mut response = StatusCode::OK.into_response();
            let headers = response.headers_mut();
            headers.insert(OFFSET_HEADER, HeaderValue::from(record.length));
            headers.insert(SIZE_HEADER, HeaderValue::from(record.size));
            headers.insert(EXPIRES_HEADER, HeaderValue::from(record.expires_at));
            headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            response
        }
        Err(response) => response,
    }
}

/// Releases a blob's upload slot when the upload ends, however it ends.
struct UploadSlot {
    blobs: Arc<Blobs>,
    id: [u8; 32],
}

impl Drop for UploadSlot {
    fn drop(&mut self) {
        self.blobs
            .uploading
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.id);
    }
}

/// `PATCH /v1/blobs/{id}`
pub(crate) async fn append(
    State(state): State<BlobState>,
    UrlPath(id): UrlPath<String>,
    request: Request,
) -> Response {
    let (parts, body) = request.into_parts();
    let path = path_and_query(&parts);
    let (device, blob_id) =
        match blob_request_id(&state, &id, &parts.method, &path, &parts.headers).await {
            Ok(found) => found,
            Err(response) => return response,
        };
    let Some(count) = state.blobs.start_upload(device) else {
        return refuse(
            StatusCode::TOO_MANY_REQUESTS,
            "this device is running as many uploads as it may",
        );
    };
    if !state
        .blobs
        .uploading
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(blob_id.0)
    {
        return refuse(
            StatusCode::CONFLICT,
            "an upload of this blob is already running",
        );
    }
    let slot = UploadSlot {
        blobs: Arc::clone(&state.blobs),
        id: blob_id.0,
    };
    // Read only now that the slot is ours: an upload that just ended has recorded its length.
    let record = match blob_record(&state, device, blob_id).await {
        Ok(record) => record,
        Err(response) => return response,
    };
    if record.uploader != device {
        return refuse(
            StatusCode::FORBIDDEN,
            "only the device that created a blob uploads it",
        );
    }
    let offset_answer = |status: StatusCode, reason: &str, length: u64| {
        let mut response = refuse(status, reason);
        response
            .headers_mut()
            .insert(OFFSET_HEADER, HeaderValue::from(length));
        response
    };
    if header_u64(&parts.headers, OFFSET_HEADER) != Some(record.length) {
        return offset_answer(
            StatusCode::CONFLICT,
            "upload-offset must be the blob's durable length",
            record.length,
        );
    }
    // On a task of its own: if the client goes away, the connection's handler is dropped, but
    // what arrived is still flushed and recorded, so that the upload resumes from there.
    let task_state = state.clone();
    let received = tokio::spawn(async move {
        let _held = (slot, count);
        receive(&task_state, blob_id, &record, device, body).await
    })
    .await;
    match received {
        Ok(Ok(Received::Complete(length))) => offset_answer(StatusCode::NO_CONTENT, "", length),
        Ok(Ok(Received::TooLong(length))) => offset_answer(
            StatusCode::PAYLOAD_TOO_LARGE,
            "the body runs past the blob's size",
            length,
        ),
        Ok(Err(response)) => response,
        Err(_) => refuse(StatusCode::SERVICE_UNAVAILABLE, "the upload failed"),
    }
}

enum Received {
    Complete(u64),
    TooLong(u64),
}

/// Writes a body to the blob's file from its durable length on, flushing and recording the
/// length at every checkpoint and at the end.
async fn receive(
    state: &BlobState,
    blob_id: BlobId,
    record: &BlobRecord,
    device: DeviceId,
    body: Body,
) -> Result<Received, Response> {
    let io_failed = |error: std::io::Error| {
        tracing::warn!("writing a blob failed: {error}");
        refuse(StatusCode::SERVICE_UNAVAILABLE, "storage unavailable")
    };
    let mut file = tokio::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(false)
        .open(state.blobs.path(&blob_id))
        .await
        .map_err(io_failed)?;
    let on_disk = file.metadata().await.map_err(io_failed)?.len();
    if on_disk < record.length {
        tracing::warn!("a blob file is shorter than its recorded length");
        return Err(refuse(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the stored blob is damaged",
        ));
    }
    if record.length == 0 {
        // The file is new: make its name durable with its first bytes.
        let dir = state.blobs.dir().to_path_buf();
        tokio::task::spawn_blocking(move || std::fs::File::open(dir)?.sync_all())
            .await
            .map_err(|_| io_failed(std::io::Error::other("sync task failed")))?
            .map_err(io_failed)?;
    }
    // Whatever lies past the recorded length was never acknowledged (a crash mid-write).
    file.set_len(record.length).await.map_err(io_failed)?;
    file.seek(std::io::SeekFrom::Start(record.length))
        .await
        .map_err(io_failed)?;

    let store = state.store.clone();
    let id = blob_id.0;
    let record_length = move |length: u64| {
        let store = store.clone();
        async move {
            store
                .run(move |store| store.set_blob_length(&id, &device, length))
                .await
        }
    };
    let mut written = record.length;
    let mut durable = record.length;
    // Grows with what arrives, up to about WRITE_BUFFER: a slow upload holds little memory.
    let mut buffer: Vec<u8> = Vec::new();
    let mut stream = body.into_data_stream();
    let mut too_long = false;
    loop {
        let piece: Option<Bytes> =
            match tokio::time::timeout(BODY_IDLE_TIMEOUT, stream.next()).await {
                Ok(Some(Ok(bytes))) => Some(bytes),
                // The client went away or went quiet: keep what arrived (TLS authenticated it) so
                // that it can resume from there.
                Ok(Some(Err(_)) | None) | Err(_) => None,
            };
        let Some(piece) = piece else { break };
        let room = record.size - written - buffer.len() as u64;
        if piece.len() as u64 > room {
            buffer.extend_from_slice(&piece[..room as usize]);
            too_long = true;
            break;
        }
        buffer.extend_from_slice(&piece);
        if buffer.len() >= WRITE_BUFFER {
            file.write_all(&buffer).await.map_err(io_failed)?;
            written += buffer.len() as u64;
            buffer.clear();
            if written - durable >= CHECKPOINT_BYTES {
                file.sync_data().await.map_err(io_failed)?;
                drop_cached(&file, durable, written);
                record_length(written)
                    .await
                    .map_err(|error| store_refusal(&error))?;
                durable = written;
            }
        }
    }
    file.write_all(&buffer).await.map_err(io_failed)?;
    written += buffer.len() as u64;
    file.sync_data().await.map_err(io_failed)?;
    if written != durable {
        record_length(written)
            .await
            .map_err(|error| store_refusal(&error))?;
    }
    Ok(if too_long {
        Received::TooLong(written)
    } else {
        Received::Complete(written)
    })
}

/// `GET /v1/blobs/{id}`
pub(crate) async fn download(
    State(state): State<BlobState>,
    UrlPath(id): UrlPath<String>,
    request: Request,
) -> Response {
    let (parts, _body) = request.into_parts();
    let path = path_and_query(&parts);
    let (_, blob_id, record) =
        match blob_request(&state, &id, &parts.method, &path, &parts.headers).await {
            Ok(found) => found,
            Err(response) => return response,
        };
    if record.length < record.size {
        return refuse(
            StatusCode::CONFLICT,
            "the upload of this blob is not finished",
        );
    }
    let io_failed = |error: std::io::Error| {
        tracing::warn!("reading a blob failed: {error}");
        refuse(StatusCode::SERVICE_UNAVAILABLE, "storage unavailable")
    };
    let mut file = match tokio::fs::File::open(state.blobs.path(&blob_id)).await {
        Ok(file) => file,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound && record.size == 0 => {
            return empty_blob();
        }
        Err(error) => return io_failed(error),
    };
    // Serve what is there: if the file was damaged and is shorter, the client's decryption
    // says so, which is the check that matters (a dishonest server could do the same).
    let available = match file.metadata().await {
        Ok(metadata) => metadata.len().min(record.size),
        Err(error) => return io_failed(error),
    };
    let (start, len, status) = match parts.headers.get(header::RANGE) {
        Some(range) => match range
            .to_str()
            .ok()
            .and_then(|text| parse_range(text, available).ok())
        {
            Some((start, len)) => (start, len, StatusCode::PARTIAL_CONTENT),
            None => {
                let mut response =
                    refuse(StatusCode::RANGE_NOT_SATISFIABLE, "range not satisfiable");
                if let Ok(value) = HeaderValue::from_str(&format!("bytes */{available}")) {
                    response.headers_mut().insert(header::CONTENT_RANGE, value);
                }
                return response;
            }
        },
        None => (0, available, StatusCode::OK),
    };
    if let Err(error) = file.seek(std::io::SeekFrom::Start(start)).await {
        return io_failed(error);
    }
    let pieces = futures_util::stream::unfold((file, len), |(mut file, left)| async move {
        if left == 0 {
            return None;
        }
        let mut buffer = vec![0u8; READ_PIECE.min(left as usize)];
        match file.read(&mut buffer).await {
            Ok(0) => Some((
                Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof)),
                (file, 0),
            )),
            Ok(read) => {
                buffer.truncate(read);
                Some((Ok(Bytes::from(buffer)), (file, left - read as u64)))
            }
            Err(error) => Some((Err(error), (file, 0))),
        }
    });
    let mut response = Response::new(Body::from_stream(pieces));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if status == StatusCode::PARTIAL_CONTENT
        && let Ok(value) =
            HeaderValue::from_str(&format!("bytes {start}-{}/{available}", start + len - 1))
    {
        headers.insert(header::CONTENT_RANGE, value);
    }
    response
}

/// Tells the kernel that bytes `from..to` of a blob, already on disk, will not be read soon:
/// a large upload then does not push everything else out of the page cache (and the cost of
/// reclaiming it does not land on the next write).
fn drop_cached(file: &tokio::fs::File, from: u64, to: u64) {
    #[cfg(target_os = "linux")]
    if let Some(len) = std::num::NonZeroU64::new(to - from) {
        let _ = rustix::fs::fadvise(file, from, Some(len), rustix::fs::Advice::DontNeed);
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (file, from, to);
}

fn empty_blob() -> Response {
    let mut response = Response::new(Body::empty());
    response
        .headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from(0u64));
    response
}

/// Deletes blob files whose row is gone. Rows are created before their file and deleted
/// before it, so a file listed before the live ids were read and not among them is an orphan.
pub(crate) async fn remove_orphans(shared: &Shared) -> Result<usize, StoreError> {
    let dir = shared.blobs.dir().to_path_buf();
    let listed: Vec<(PathBuf, BlobId)> = tokio::task::spawn_blocking(move || {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return Vec::new();
        };
        entries
            .filter_map(|entry| entry.ok())
            .filter_map(|entry| {
                let id = entry.file_name().to_str()?.parse::<BlobId>().ok()?;
                Some((entry.path(), id))
            })
            .collect()
    })
    .await
    .unwrap_or_default();
    if listed.is_empty() {
        return Ok(0);
    }
    let live: HashSet<[u8; 32]> = shared
        .store
        .run(|store| store.live_blob_ids())
        .await?
        .into_iter()
        .collect();
    let orphans: Vec<PathBuf> = listed
        .into_iter()
        .filter(|(_, id)| !live.contains(&id.0))
        .map(|(path, _)| path)
        .collect();
    let count = orphans.len();
    tokio::task::spawn_blocking(move || {
        for path in orphans {
            if let Err(error) = std::fs::remove_file(&path) {
                tracing::warn!("removing an expired blob failed: {error}");
            }
        }
    })
    .await
    .ok();
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_replaced_blobs_file_is_removed_and_a_missing_one_is_no_error() {
        let data = tempfile::tempdir().expect("a temporary folder");
        let limits = BlobLimits {
            max_bytes: 1024,
            quota_bytes: 1024,
            retention_s: 3600,
        };
        let blobs = Blobs::open(data.path(), limits).expect("a blob folder");
        let (replaced, kept) = ([1; 32], [2; 32]);
        for id in [replaced, kept] {
            std::fs::write(blobs.path(&BlobId(id)), b"sealed").expect("a blob file");
        }
        blobs.remove_file(replaced).await;
        assert!(!blobs.path(&BlobId(replaced)).exists());
        assert!(blobs.path(&BlobId(kept)).exists());
        // An upload that never started has no file.
        blobs.remove_file(replaced).await;
    }
}
