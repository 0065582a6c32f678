//! Files: encrypted on this device chunk by chunk ([`miyu_crypto::file`]), uploaded to the
//! server's blob endpoints over the same pinned TLS (and proxy) as everything else, announced
//! in the conversation by an MLS message carrying the key, size, hash, name and type, and
//! downloaded and checked by the recipient.
//!
//! Both directions stream: memory stays at a few chunks whatever the file size. Both resume:
//! an upload is remembered (key and blob) until its message is queued, and the server says how
//! much it holds; a download writes to a partial file beside the target and continues after
//! its last whole chunk. Images lose their EXIF, XMP and IPTC metadata before they are
//! encrypted unless the sender asks to keep it.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request as HttpRequest, Response, StatusCode};
use miyu_crypto::file::{self, FileCipher, FileKey, Layout, Opener};
use miyu_crypto::identity::AccountKeys;
use miyu_proto::blob::{BlobId, HttpAuth, SERVER_TIME_HEADER, canonical_headers};
use miyu_proto::{ServerAddress, wire};
use rand::RngCore;
use rusqlite::{Connection, OptionalExtension, params};
use sha2::{Digest, Sha256};

use crate::privacy::{self, Received};
use crate::strip::{self, ImageKind};
use crate::{
    Client, Error, Event, MessageKind, MessageState, MessageView, Proxy, db, net, now_ms, random,
};

/// Chunks queued between the network and the thread that encrypts or decrypts.
const PIECES_IN_FLIGHT: usize = 16;
/// How many bytes a download writes between two flushes to disk.
const FLUSH_BYTES: u64 = 32 * 1024 * 1024;
/// How often an upload that the server reports as running or moved is tried again.
const UPLOAD_ATTEMPTS: u32 = 8;
/// Longest file name kept, in bytes: room is left for the partial download's suffix within
/// the usual 255-byte limit of file systems.
const MAX_NAME_BYTES: usize = 200;
const MAX_MIME_BYTES: usize = 100;

type Body = BoxBody<Bytes, std::io::Error>;
/// An upload row: id, blob, key, plaintext size, chunk size, whether the source is unchanged.
type UploadRow = (i64, Vec<u8>, Vec<u8>, u64, u32, bool);
/// A file row: blob, key, size, chunk size, hash, name, partial download.
type FileRow = (Vec<u8>, Vec<u8>, u64, u32, Vec<u8>, String, Option<String>);

/// How far a transfer is, for a progress bar: both counters in plaintext bytes.
#[derive(Debug, Default)]
pub struct Progress {
    total: AtomicU64,
    done: AtomicU64,
    /// Where this run started: more than 0 when it resumed an earlier one.
    resumed_from: AtomicU64,
}

impl Progress {
    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    pub fn done(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }

    pub fn resumed_from(&self) -> u64 {
        self.resumed_from.load(Ordering::Relaxed)
    }

    fn start(&self, total: u64, done: u64) {
        self.total.store(total, Ordering::Relaxed);
        self.resumed_from.store(done, Ordering::Relaxed);
        self.done.store(done, Ordering::Relaxed);
    }

    fn set(&self, done: u64) {
        self.done.store(done, Ordering::Relaxed);
    }
}

/// A file of a conversation, as `miyu files` lists it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct FileView {
    pub id: i64,
    pub name: String,
    pub size: u64,
    pub mime: String,
    /// "me" or the contact's name.
    pub sender: String,
    pub sent_at_ms: u64,
    /// Where this device saved it, once downloaded.
    pub saved_path: Option<String>,
}

/// What `send_file` sent.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SentFile {
    /// The file's number, for `files` and `download`.
    pub id: i64,
    /// The number of the message that carries it, for `reply`, `delete` and the like.
    pub message: i64,
    pub name: String,
    pub size: u64,
    pub sha256: String,
    /// Whether image metadata was removed before sending.
    pub metadata_stripped: bool,
}

/// Human-readable size: 1.5 MB, 200 B.
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KB", "MB", "GB", "TB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1000.0 && unit + 1 < UNITS.len() {
        value /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// A file name safe to show and to save under: no directories, no control characters, at most
/// 255 bytes, never empty, never `.` or `..`.
pub(crate) fn clean_name(name: &str) -> String {
    let mut clean: String = name
        .chars()
        .filter(|c| !c.is_control() && !is_invisible(*c) && *c != '/' && *c != '\\')
        .collect();
    // No hidden files (a `.bash_login` saved into a home folder would run at the next login)
    // and nothing that reads as an option to a program.
    clean = clean.trim().trim_start_matches(['.', '-', ' ']).to_string();
    while clean.len() > MAX_NAME_BYTES {
        clean.pop();
    }
    if clean.is_empty() {
        "file".into()
    } else {
        clean
    }
}

/// Characters that change how a name is displayed without being seen: direction overrides
/// (which can make `x\u{202E}gpj.exe` look like a `.jpg`) and zero-width marks.
fn is_invisible(c: char) -> bool {
    matches!(
        c,
        '\u{061C}' | '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2060}'..='\u{2069}' | '\u{FEFF}'
    )
}

fn clean_mime(mime: &str) -> String {
    let valid = !mime.is_empty()
        && mime.len() <= MAX_MIME_BYTES
        && mime.contains('/')
        && mime
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/+-.".contains(&b));
    if valid {
        mime.to_ascii_lowercase()
    } else {
        "application/octet-stream".into()
    }
}

/// The type of a file, by its image signature or else its extension.
fn mime_of(name: &str, image: Option<ImageKind>) -> String {
    if let Some(kind) = image {
        return kind.mime().into();
    }
    let extension = name.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase());
    let mime = match extension.as_deref() {
        Some("gif") => "image/gif",
        Some("heic") => "image/heic",
        Some("mp4" | "m4v") => "video/mp4",
        Some("mov") => "video/quicktime",
        Some("webm") => "video/webm",
        Some("mp3") => "audio/mpeg",
        Some("m4a") => "audio/mp4",
        Some("ogg" | "opus") => "audio/ogg",
        Some("wav") => "audio/wav",
        Some("pdf") => "application/pdf",
        Some("zip") => "application/zip",
        Some("txt") => "text/plain",
        _ => "application/octet-stream",
    };
    mime.into()
}

fn io_error(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let context = context.into();
    move |source| Error::Io { context, source }
}

// ---------------------------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------------------------

/// Signed HTTPS requests to the server's blob endpoints, on one kept-alive connection through
/// the same pinned TLS (and proxy) as the WebSocket.
pub struct BlobClient<'a> {
    keys: &'a AccountKeys,
    server: &'a ServerAddress,
    proxy: Option<Proxy>,
    sender: Option<hyper::client::conn::http1::SendRequest<Body>>,
    /// Seconds to add to our clock to get the server's (learnt from a 401).
    clock_offset: i64,
}

fn empty() -> Body {
    Empty::<Bytes>::new()
        .map_err(|never| match never {})
        .boxed()
}

impl<'a> BlobClient<'a> {
    pub fn new(keys: &'a AccountKeys, server: &'a ServerAddress, proxy: Option<Proxy>) -> Self {
        Self {
            keys,
            server,
            proxy,
            sender: None,
            clock_offset: 0,
        }
    }

    async fn sender(
        &mut self,
    ) -> Result<&mut hyper::client::conn::http1::SendRequest<Body>, Error> {
        if self.sender.as_ref().is_none_or(|s| s.is_closed()) {
            let tls = net::open_tls(self.server, self.proxy.as_ref()).await?;
            let (sender, connection) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                    .await
                    .map_err(|error| Error::Network(format!("HTTP setup failed: {error}")))?;
            tokio::spawn(async move {
                let _ = connection.await;
            });
            self.sender = Some(sender);
        }
        let sender = self
            .sender
            .as_mut()
            .ok_or_else(|| Error::Network("no connection to the server".into()))?;
        sender
            .ready()
            .await
            .map_err(|error| Error::Network(format!("connection lost: {error}")))?;
        Ok(sender)
    }

    /// A fresh `Authorization` value for one request without signed headers.
    pub fn authorization(&self, method: &str, path: &str) -> String {
        self.authorization_with(method, path, &[])
    }

    /// A fresh `Authorization` value for one request with these headers.
    pub fn authorization_with(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, String)],
    ) -> String {
        let time = (now_ms() / 1000).saturating_add_signed(self.clock_offset);
        let nonce = random::<16>();
        // Every header this client sends is text, so this cannot fail.
        let signed = canonical_headers(|name| {
            headers
                .iter()
                .find(|(header, _)| header.eq_ignore_ascii_case(name))
                .map(|(_, value)| Ok(value.as_str()))
        })
        .unwrap_or_default();
        let payload = HttpAuth::payload(
            self.server.certificate_sha256(),
            method,
            path,
            time,
            &nonce,
            &signed,
        );
        HttpAuth {
            device_id: self.keys.certificate().device_id(),
            time,
            nonce,
            signature: self.keys.sign_http_request(&payload),
        }
        .to_header()
    }

    /// Sends a bodiless request with the given `Authorization` (or none) and returns the
    /// status. For tests of the server's defences.
    pub async fn status_of(
        &mut self,
        method: &str,
        path: &str,
        authorization: Option<&str>,
    ) -> Result<u16, Error> {
        let method = Method::from_bytes(method.as_bytes())
            .map_err(|error| Error::Usage(error.to_string()))?;
        let mut request = HttpRequest::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, self.server.authority());
        if let Some(authorization) = authorization {
            request = request.header(hyper::header::AUTHORIZATION, authorization);
        }
        let request = request
            .body(empty())
            .map_err(|error| Error::Protocol(format!("building a request: {error}")))?;
        let response = self
            .sender()
            .await?
            .send_request(request)
            .await
            .map_err(|error| Error::Network(format!("HTTP request failed: {error}")))?;
        Ok(response.status().as_u16())
    }

    /// Sends a signed request. Bodiless requests are retried once after a 401 that shows our
    /// clock is off.
    async fn send(
        &mut self,
        method: Method,
        path: &str,
        headers: &[(&str, String)],
        body: Option<Body>,
    ) -> Result<Response<Incoming>, Error> {
        let retriable = body.is_none();
        let mut body = body;
        for attempt in 0..2 {
            let mut request = HttpRequest::builder()
                .method(method.clone())
                .uri(path)
                .header(hyper::header::HOST, self.server.authority())
                .header(
                    hyper::header::AUTHORIZATION,
                    self.authorization_with(method.as_str(), path, headers),
                );
            for (name, value) in headers {
                request = request.header(*name, value);
            }
            let request = request
                .body(body.take().unwrap_or_else(empty))
                .map_err(|error| Error::Protocol(format!("building a request: {error}")))?;
            let response = self
                .sender()
                .await?
                .send_request(request)
                .await
                .map_err(|error| Error::Network(format!("HTTP request failed: {error}")))?;
            if response.status() == StatusCode::UNAUTHORIZED && attempt == 0 && retriable {
                let server_time = response
                    .headers()
                    .get(SERVER_TIME_HEADER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<i64>().ok());
                if let Some(server_time) = server_time {
                    let offset = server_time - (now_ms() / 1000) as i64;
                    if offset.abs() > 60 {
                        self.clock_offset = offset;
                        continue;
                    }
                }
            }
            return Ok(response);
        }
        Err(Error::Security(
            "the server refused this device's signature".into(),
        ))
    }
}

impl BlobClient<'_> {
    /// Creates an empty blob (`POST /v1/blobs` with these headers) and returns its id.
    async fn create(&mut self, headers: &[(&str, String)]) -> Result<BlobId, Error> {
        let response = self.send(Method::POST, "/v1/blobs", headers, None).await?;
        if response.status() != StatusCode::CREATED {
            return Err(refusal(response).await);
        }
        response
            .headers()
            .get("miyu-blob")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| Error::Protocol("the server named no blob".into()))
    }

    /// Uploads a blob held in memory (a group's sealed ratchet tree, an account's history) in
    /// one request, to the group `group_id` or, without one, to the account; returns its id
    /// once the server holds all of it durably.
    pub(crate) async fn upload_whole(
        &mut self,
        group_id: Option<&[u8]>,
        blob: Vec<u8>,
    ) -> Result<BlobId, Error> {
        let size = blob.len() as u64;
        let mut headers = vec![("miyu-size", size.to_string())];
        if let Some(group_id) = group_id {
            headers.push((
                "miyu-group",
                miyu_proto::GroupId::from_bytes(group_id)
                    .map_err(|error| Error::Protocol(error.to_string()))?
                    .to_string(),
            ));
        }
        let blob_id = self.create(&headers).await?;
        let body = Full::new(Bytes::from(blob))
            .map_err(|never| match never {})
            .boxed();
        let response = self
            .send(
                Method::PATCH,
                &format!("/v1/blobs/{blob_id}"),
                &[("upload-offset", "0".to_string())],
                Some(body),
            )
            .await?;
        if response.status() != StatusCode::NO_CONTENT
            || header_u64(&response, "upload-offset") != Some(size)
        {
            return Err(refusal(response).await);
        }
        Ok(blob_id)
    }

    /// Downloads the first `len` bytes of a blob into memory; fewer is an error, and nothing
    /// past them is read.
    pub(crate) async fn download_whole(
        &mut self,
        blob_id: &BlobId,
        len: u64,
    ) -> Result<Vec<u8>, Error> {
        if len == 0 {
            return Ok(Vec::new());
        }
        let response = self
            .send(
                Method::GET,
                &format!("/v1/blobs/{blob_id}"),
                &[("range", format!("bytes=0-{}", len - 1))],
                None,
            )
            .await?;
        match response.status() {
            StatusCode::OK | StatusCode::PARTIAL_CONTENT => {}
            StatusCode::RANGE_NOT_SATISFIABLE => {
                return Err(Error::Security(
                    "the blob on the server is truncated".into(),
                ));
            }
            _ => return Err(refusal(response).await),
        }
        // A blob shorter than promised is answered with what there is: that will not change,
        // so it is not worth another try.
        if header_u64(&response, "content-length").is_some_and(|length| length < len) {
            return Err(Error::Security(
                "the blob on the server is shorter than announced".into(),
            ));
        }
        // Grown as bytes arrive: a length the server announces is not reserved up front.
        let mut bytes = Vec::with_capacity(len.min(1 << 20) as usize);
        let mut body = response.into_body();
        while (bytes.len() as u64) < len {
            match body.frame().await {
                Some(Ok(frame)) => {
                    if let Some(data) = frame.data_ref() {
                        let take = data.len().min((len - bytes.len() as u64) as usize);
                        bytes.extend_from_slice(&data[..take]);
                    }
                }
                Some(Err(error)) => {
                    return Err(Error::Network(format!("the download broke off: {error}")));
                }
                None => {
                    return Err(Error::Security(
                        "the blob on the server is shorter than announced".into(),
                    ));
                }
            }
        }
        Ok(bytes)
    }
}

/// Reads an error answer's short explanation (printable characters only).
async fn refusal(response: Response<Incoming>) -> Error {
    let status = response.status();
    let mut text = Vec::new();
    let mut body = response.into_body();
    while text.len() < 1024 {
        match body.frame().await {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    text.extend_from_slice(data);
                }
            }
            _ => break,
        }
    }
    let reason: String = String::from_utf8_lossy(&text)
        .chars()
        .filter(|c| !c.is_control())
        .take(200)
        .collect();
    match status {
        StatusCode::NOT_FOUND => {
            Error::Usage("the file is no longer on the server (it expired or was deleted)".into())
        }
        StatusCode::TOO_MANY_REQUESTS => {
            Error::Network(format!("the server is busy ({status}); try again later"))
        }
        StatusCode::UNAUTHORIZED => {
            Error::Security("the server refused this device's signature".into())
        }
        status if status.is_server_error() && status != StatusCode::INSUFFICIENT_STORAGE => {
            Error::Network(format!("the server failed ({status}): {reason}"))
        }
        status => Error::Usage(format!("the server refused ({status}): {reason}")),
    }
}

fn header_u64(response: &Response<Incoming>, name: &str) -> Option<u64> {
    response.headers().get(name)?.to_str().ok()?.parse().ok()
}

/// Where an upload continues, as a `HEAD` answer says: never past the blob's end.
fn durable_offset(response: &Response<Incoming>, layout: &Layout) -> Result<u64, Error> {
    let offset = header_u64(response, "upload-offset").unwrap_or(0);
    if offset > layout.padded_len() {
        return Err(Error::Protocol(
            "the server claims to hold more of the file than it has".into(),
        ));
    }
    Ok(offset)
}

// ---------------------------------------------------------------------------------------------
// Sending
// ---------------------------------------------------------------------------------------------

/// What is being sent: the file itself, or its stripped copy in memory.
enum Source {
    File(std::fs::File),
    Memory(std::io::Cursor<Vec<u8>>),
}

impl Read for Source {
    fn read(&mut self, buffer: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Source::File(file) => file.read(buffer),
            Source::Memory(cursor) => cursor.read(buffer),
        }
    }
}

impl Seek for Source {
    fn seek(&mut self, to: SeekFrom) -> std::io::Result<u64> {
        match self {
            Source::File(file) => file.seek(to),
            Source::Memory(cursor) => cursor.seek(to),
        }
    }
}

/// An upload this device started and has not announced yet.
struct Upload {
    id: i64,
    blob_id: BlobId,
    key: FileKey,
    layout: Layout,
}

/// When the file's content or metadata last changed (its ctime), in nanoseconds. Unlike the
/// modification time, no tool can set it back, so an upload resumes only into a file that
/// has not changed since: the same key and nonces never seal different bytes.
#[cfg(unix)]
fn changed_ns(metadata: &std::fs::Metadata) -> i64 {
    use std::os::unix::fs::MetadataExt;
    metadata
        .ctime()
        .saturating_mul(1_000_000_000)
        .saturating_add(metadata.ctime_nsec())
}

#[cfg(not(unix))]
fn changed_ns(metadata: &std::fs::Metadata) -> i64 {
    metadata
        .modified()
        .ok()
        .and_then(|time| time.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |since| since.as_nanos() as i64)
}

/// Reads `len` bytes from the start of `source` into `hasher`.
fn hash_prefix(source: &mut Source, len: u64, hasher: &mut Sha256) -> std::io::Result<()> {
    source.seek(SeekFrom::Start(0))?;
    let mut left = len;
    let mut buffer = vec![0u8; 1 << 20];
    while left > 0 {
        let want = buffer.len().min(left as usize);
        source.read_exact(&mut buffer[..want])?;
        hasher.update(&buffer[..want]);
        left -= want as u64;
    }
    Ok(())
}

/// Encrypts the source from ciphertext byte `offset` on and hands the pieces to the upload
/// body; returns the SHA-256 of the whole plaintext.
fn produce(
    source: &mut Source,
    cipher: FileCipher,
    offset: u64,
    pieces: tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>,
    progress: Arc<Progress>,
) -> std::io::Result<[u8; 32]> {
    let layout = *cipher.layout();
    let first = layout.whole_chunks_in(offset);
    let gone = || std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the upload stopped");
    // Two stages on two threads: this one reads and hashes, the other seals. Each costs about
    // as much as the other, and the network side has the rest of the machine.
    let (plaintexts, to_seal) = std::sync::mpsc::sync_channel::<Vec<u8>>(PIECES_IN_FLIGHT);
    std::thread::scope(|scope| {
        let sealer = scope.spawn(move || -> std::io::Result<()> {
            let mut skip = offset - layout.ciphertext_offset(first);
            for index in first..layout.chunks() {
                let Ok(mut buffer) = to_seal.recv() else {
                    // The reader stopped; its error says why.
                    return Ok(());
                };
                cipher
                    .seal(index, &mut buffer)
                    .map_err(|error| std::io::Error::other(error.to_string()))?;
                let piece = Bytes::from(buffer).slice(skip as usize..);
                skip = 0;
                pieces.blocking_send(Ok(piece)).map_err(|_| gone())?;
                progress.set(layout.plaintext_offset(index + 1));
            }
            // Then the padding: random bytes, which look like the ciphertext before them, so
            // the server cannot tell where the file ends.
            let mut left = layout
                .padded_len()
                .saturating_sub(offset.max(layout.ciphertext_len()));
            while left > 0 {
                let mut padding = vec![0u8; left.min(u64::from(file::DEFAULT_CHUNK)) as usize];
                rand::thread_rng().fill_bytes(&mut padding);
                left -= padding.len() as u64;
                pieces
                    .blocking_send(Ok(Bytes::from(padding)))
                    .map_err(|_| gone())?;
            }
            Ok(())
        });
        let read = (|| -> std::io::Result<[u8; 32]> {
            let mut hasher = Sha256::new();
            hash_prefix(source, layout.plaintext_offset(first), &mut hasher)?;
            for index in first..layout.chunks() {
                let mut buffer = vec![0u8; layout.plaintext_chunk_len(index) as usize];
                source.read_exact(&mut buffer)?;
                hasher.update(&buffer);
                if plaintexts.send(buffer).is_err() {
                    break;
                }
            }
            drop(plaintexts);
            Ok(hasher.finalize().into())
        })();
        let sealed = sealer
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("the encryption thread failed")));
        sealed?;
        read
    })
}

impl Client {
    fn open_upload(
        &self,
        group_id: &[u8],
        source_path: &str,
        size: u64,
        mtime: i64,
        keep_metadata: bool,
        plaintext_len: u64,
    ) -> Result<Option<Upload>, Error> {
        let row: Option<UploadRow> = self
            .db
            .query_row(
                "SELECT id, blob_id, file_key, size, chunk_size, source_size = ?3 AND source_changed_ns = ?4 AND keep_metadata = ?5
                 FROM uploads WHERE group_id = ?1 AND source_path = ?2",
                params![group_id, source_path, size, mtime, keep_metadata],
                |row| UploadRow::try_from(row),
            )
            .optional()?;
        let Some((id, blob_id, key, recorded_len, chunk, same_source)) = row else {
            return Ok(None);
        };
        let usable = same_source && recorded_len == plaintext_len;
        let parsed = (
            <[u8; 32]>::try_from(blob_id.as_slice()),
            <[u8; 32]>::try_from(key.as_slice()),
            Layout::new(recorded_len, chunk),
        );
        match parsed {
            (Ok(blob_id), Ok(key), Ok(layout)) if usable => Ok(Some(Upload {
                id,
                blob_id: BlobId(blob_id),
                key: FileKey::from_bytes(key),
                layout,
            })),
            _ => {
                // The file changed since: start over (the old blob expires on the server).
                self.db
                    .execute("DELETE FROM uploads WHERE id = ?1", params![id])?;
                Ok(None)
            }
        }
    }

    /// Encrypts and uploads a file, then sends it in the conversation with `contact`. Images
    /// (JPEG, PNG, WebP) lose their metadata first unless `keep_metadata`. Run again after an
    /// interruption, it continues where the server's copy ends.
    pub async fn send_file(
        &mut self,
        contact: &str,
        path: &Path,
        keep_metadata: bool,
        progress: Arc<Progress>,
    ) -> Result<SentFile, Error> {
        let (_, group_id) = self.conversation_of(contact)?;
        let absolute =
            std::fs::canonicalize(path).map_err(io_error(format!("reading {}", path.display())))?;
        let mut file = std::fs::File::open(&absolute)
            .map_err(io_error(format!("reading {}", path.display())))?;
        let metadata = file
            .metadata()
            .map_err(io_error(format!("reading {}", path.display())))?;
        if !metadata.is_file() {
            return Err(Error::Usage(format!("{} is not a file", path.display())));
        }
        let size = metadata.len();
        if size > file::MAX_FILE_BYTES {
            return Err(Error::Usage(format!(
                "{} is {}; files of at most 4 GiB can be sent",
                path.display(),
                human_size(size)
            )));
        }
        let mut head = [0u8; 16];
        let head_len = file.read(&mut head).map_err(io_error("reading the file"))?;
        let image = strip::sniff(&head[..head_len]);
        let name = clean_name(
            &absolute
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        );
        let strip_it = image.is_some() && !keep_metadata;
        let source = match image {
            Some(kind) if strip_it => {
                if size > strip::MAX_STRIP_BYTES {
                    return Err(Error::Usage(format!(
                        "{} is too large to remove its metadata ({} at most); send it with --keep-metadata if its metadata may go along",
                        path.display(),
                        human_size(strip::MAX_STRIP_BYTES)
                    )));
                }
                let mut bytes = Vec::with_capacity(size as usize);
                file.seek(SeekFrom::Start(0))
                    .and_then(|_| file.read_to_end(&mut bytes))
                    .map_err(io_error("reading the image"))?;
                let stripped = strip::strip_metadata(kind, bytes).map_err(|error| {
                    Error::Usage(format!(
                        "cannot remove the metadata of {}: {error}; send it with --keep-metadata if its metadata may go along",
                        path.display()
                    ))
                })?;
                Source::Memory(std::io::Cursor::new(stripped))
            }
            _ => Source::File(file),
        };
        let plaintext_len = match &source {
            Source::File(_) => size,
            Source::Memory(cursor) => cursor.get_ref().len() as u64,
        };
        let source_path = absolute.to_string_lossy().into_owned();
        let mtime = changed_ns(&metadata);
        let timer_s: u32 = self.db.query_row(
            "SELECT timer_s FROM conversations WHERE group_id = ?1",
            params![group_id],
            |row| row.get(0),
        )?;

        let mut http = BlobClient::new(&self.keys, &self.server, self.proxy);
        let mut resumed = None;
        if let Some(upload) = self.open_upload(
            &group_id,
            &source_path,
            size,
            mtime,
            keep_metadata,
            plaintext_len,
        )? {
            let path = format!("/v1/blobs/{}", upload.blob_id);
            let response = http.send(Method::HEAD, &path, &[], None).await?;
            match response.status() {
                StatusCode::OK
                    if header_u64(&response, "miyu-size") == Some(upload.layout.padded_len()) =>
                {
                    let offset = durable_offset(&response, &upload.layout)?;
                    resumed = Some((upload, offset));
                }
                // A blob of another size (an upload begun under other rules): start over.
                StatusCode::OK => {
                    self.db
                        .execute("DELETE FROM uploads WHERE id = ?1", params![upload.id])?;
                }
                StatusCode::NOT_FOUND => {
                    self.db
                        .execute("DELETE FROM uploads WHERE id = ?1", params![upload.id])?;
                }
                _ => return Err(refusal(response).await),
            }
        }
        let (upload, offset) = match resumed {
            Some(found) => found,
            None => {
                let layout = Layout::new(plaintext_len, file::DEFAULT_CHUNK)
                    .map_err(|error| Error::Usage(error.to_string()))?;
                let mut headers = vec![
                    (
                        "miyu-group",
                        miyu_proto::GroupId::from_bytes(&group_id)
                            .map_err(|error| Error::Protocol(error.to_string()))?
                            .to_string(),
                    ),
                    ("miyu-size", layout.padded_len().to_string()),
                ];
                if timer_s > 0 {
                    // The file disappears from the server with the message that carries it.
                    let at = now_ms() / 1000 + u64::from(timer_s);
                    headers.push(("miyu-expires", at.to_string()));
                }
                let blob_id = http.create(&headers).await?;
                let key = FileKey::random();
                // Remembered before any byte leaves, so that an interrupted upload resumes
                // into the same blob under the same key.
                db::in_transaction(&self.db, |db| {
                    db.execute(
                        "INSERT OR REPLACE INTO uploads (group_id, source_path, source_size, source_changed_ns, keep_metadata, blob_id, file_key, size, chunk_size, created_at_ms)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                        params![group_id, source_path, size, mtime, keep_metadata, blob_id.0.as_slice(), key.as_bytes().as_slice(), plaintext_len, layout.chunk_size(), now_ms()],
                    )?;
                    Ok(())
                })?;
                let id = self.db.last_insert_rowid();
                (
                    Upload {
                        id,
                        blob_id,
                        key,
                        layout,
                    },
                    0,
                )
            }
        };
        let layout = upload.layout;
        progress.start(
            layout.plaintext_len(),
            layout.plaintext_offset(layout.whole_chunks_in(offset)),
        );

        let path = format!("/v1/blobs/{}", upload.blob_id);
        let mut offset = offset;
        let mut source = source;
        let mut sha256 = None;
        for attempt in 0..UPLOAD_ATTEMPTS {
            if attempt > 0 {
                // The server still finishes an earlier, broken-off upload of this blob, or it
                // holds more than we thought: ask again where to continue.
                tokio::time::sleep(std::time::Duration::from_millis(200 * u64::from(attempt)))
                    .await;
                // Sending again re-seals chunks under the same key and nonces: only if the
                // file is still the one the upload began with.
                let now = std::fs::metadata(&absolute)
                    .map_err(io_error(format!("reading {}", absolute.display())))?;
                if now.len() != size || changed_ns(&now) != mtime {
                    self.db
                        .execute("DELETE FROM uploads WHERE id = ?1", params![upload.id])?;
                    return Err(Error::Usage(format!(
                        "{} changed while it was being sent; send it again",
                        absolute.display()
                    )));
                }
                let response = http.send(Method::HEAD, &path, &[], None).await?;
                if response.status() != StatusCode::OK {
                    return Err(refusal(response).await);
                }
                offset = durable_offset(&response, &layout)?;
            }
            let (pieces, mut queue) = tokio::sync::mpsc::channel(PIECES_IN_FLIGHT);
            let cipher = FileCipher::new(&upload.key, layout);
            let producer_progress = Arc::clone(&progress);
            let producer = tokio::task::spawn_blocking(move || {
                let produced = produce(&mut source, cipher, offset, pieces, producer_progress);
                (source, produced)
            });
            let body_stream = futures_util::stream::poll_fn(move |cx| {
                queue
                    .poll_recv(cx)
                    .map(|piece| piece.map(|piece| piece.map(Frame::data)))
            });
            let outcome = if offset < layout.padded_len() {
                let response = http
                    .send(
                        Method::PATCH,
                        &path,
                        &[("upload-offset", offset.to_string())],
                        Some(BodyExt::boxed(StreamBody::new(body_stream))),
                    )
                    .await;
                match response {
                    Ok(response) if response.status() == StatusCode::NO_CONTENT => {
                        Ok(header_u64(&response, "upload-offset"))
                    }
                    Ok(response) if response.status() == StatusCode::CONFLICT => Err(None),
                    Ok(response) => Err(Some(refusal(response).await)),
                    Err(error) => Err(Some(error)),
                }
            } else {
                drop(body_stream);
                Ok(Some(offset))
            };
            let (returned, produced) = producer
                .await
                .map_err(|error| Error::Protocol(format!("the encryption task failed: {error}")))?;
            source = returned;
            match outcome {
                Ok(length) if length == Some(layout.padded_len()) => {
                    sha256 = Some(produced.map_err(io_error("reading the file"))?);
                    break;
                }
                Ok(_) => {
                    return Err(Error::Network(
                        "the upload ended early; run the same command again to continue".into(),
                    ));
                }
                Err(None) => continue,
                Err(Some(error)) => return Err(error),
            }
        }
        drop(http);
        let sha256 = sha256.ok_or_else(|| {
            Error::Network(
                "another upload of this file is still running on the server; try again shortly"
                    .into(),
            )
        })?;
        progress.set(layout.plaintext_len());

        let body = wire::app_message::Body::File(wire::File {
            blob_id: upload.blob_id.0.to_vec(),
            key: upload.key.as_bytes().to_vec(),
            size: layout.plaintext_len(),
            chunk_size: layout.chunk_size(),
            sha256: sha256.to_vec(),
            name: name.clone(),
            mime: mime_of(&name, image),
        });
        let (file_id, message_row) = db::in_transaction(&self.db, |db| {
            let row = self
                .queue_app_message_in(db, &group_id, body.clone(), Some(&name))?
                .ok_or_else(|| Error::Protocol("the file message has no row".into()))?;
            let wire::app_message::Body::File(file) = &body else {
                return Err(Error::Protocol("not a file message".into()));
            };
            let id = insert_file(db, row, file)?;
            db.execute("DELETE FROM uploads WHERE id = ?1", params![upload.id])?;
            Ok((id, row))
        })?;
        let queued = |error: Error| {
            if error.is_transient() {
                Error::Queued(error.to_string())
            } else {
                error
            }
        };
        self.connect().await.map_err(queued)?;
        self.flush_outbox().await.map_err(queued)?;
        Ok(SentFile {
            id: file_id,
            message: message_row,
            name,
            size: layout.plaintext_len(),
            sha256: hex(&sha256),
            metadata_stripped: strip_it,
        })
    }

    // -----------------------------------------------------------------------------------------
    // Listing and downloading
    // -----------------------------------------------------------------------------------------

    /// The files of the conversation with `contact`, oldest first.
    pub fn files(&self, contact: &str) -> Result<Vec<FileView>, Error> {
        let (account, _) = self.conversation_of(contact)?;
        let mut statement = self.db.prepare(
            "SELECT f.id, f.name, f.size, f.mime, m.outgoing, m.sent_at_ms, f.saved_path
             FROM files f JOIN messages m ON m.id = f.message_row
             WHERE m.group_id IN (SELECT group_id FROM conversations WHERE scope = ?1)
             AND (m.expires_at_ms IS NULL OR m.expires_at_ms > ?2) ORDER BY f.id",
        )?;
        let files = statement
            .query_map(params![account, now_ms()], |row| {
                let outgoing: bool = row.get(4)?;
                Ok(FileView {
                    id: row.get(0)?,
                    name: row.get(1)?,
                    size: row.get(2)?,
                    mime: row.get(3)?,
                    sender: if outgoing {
                        "me".into()
                    } else {
                        contact.to_string()
                    },
                    sent_at_ms: row.get(5)?,
                    saved_path: row.get(6)?,
                })
            })?
            .collect::<Result<_, _>>()?;
        Ok(files)
    }

    /// Downloads, decrypts and checks file `file_id` of the conversation with `contact`, into
    /// `out` (default: its name in the current folder, made unique). Run again after an
    /// interruption, it continues after the last whole chunk written.
    pub async fn download(
        &mut self,
        contact: &str,
        file_id: i64,
        out: Option<&Path>,
        progress: Arc<Progress>,
    ) -> Result<PathBuf, Error> {
        let (account, _) = self.conversation_of(contact)?;
        let row: Option<FileRow> = self
            .db
            .query_row(
                "SELECT f.blob_id, f.file_key, f.size, f.chunk_size, f.sha256, f.name, f.part_path
                 FROM files f JOIN messages m ON m.id = f.message_row
                 WHERE f.id = ?1 AND m.group_id IN (SELECT group_id FROM conversations WHERE scope = ?2)
                 AND (m.expires_at_ms IS NULL OR m.expires_at_ms > ?3)",
                params![file_id, account, now_ms()],
                |row| FileRow::try_from(row),
            )
            .optional()?;
        let Some((blob_id, key, size, chunk, expected_hash, name, part_path)) = row else {
            return Err(Error::Usage(format!(
                "no file {file_id} with {contact}; `miyu files {contact}` lists them"
            )));
        };
        let corrupt = || Error::Protocol("the stored file record is damaged".into());
        let blob_id = BlobId(blob_id.as_slice().try_into().map_err(|_| corrupt())?);
        let key = FileKey::from_bytes(key.as_slice().try_into().map_err(|_| corrupt())?);
        let layout = Layout::new(size, chunk).map_err(|_| corrupt())?;

        let target = match out {
            Some(out) => {
                if out.exists() {
                    return Err(Error::Usage(format!(
                        "{} exists already; choose another --out",
                        out.display()
                    )));
                }
                out.to_path_buf()
            }
            None => unique_path(
                &std::env::current_dir().map_err(io_error("the current folder"))?,
                &name,
            ),
        };
        // A partial download of this file continues, whatever the target is now.
        let (part, resuming) = match part_path.map(PathBuf::from) {
            Some(part) if part.symlink_metadata().is_ok() => (part, true),
            _ => (part_path_for(&target, file_id), false),
        };
        let mut writer = open_part(&part, resuming)?;
        self.db.execute(
            "UPDATE files SET part_path = ?1 WHERE id = ?2",
            params![part.to_string_lossy(), file_id],
        )?;
        let have = writer
            .metadata()
            .map_err(io_error(format!("reading {}", part.display())))?
            .len();
        // Continue after the last whole chunk; anything after it is written again.
        let first = (have / u64::from(layout.chunk_size())).min(layout.chunks() - 1);
        let keep = layout.plaintext_offset(first);
        writer
            .set_len(keep)
            .map_err(io_error(format!("writing {}", part.display())))?;
        let mut hasher = Sha256::new();
        {
            let mut reader = std::io::BufReader::new(&writer);
            let mut left = keep;
            let mut buffer = vec![0u8; 1 << 20];
            reader
                .seek(SeekFrom::Start(0))
                .map_err(io_error("reading the partial download"))?;
            while left > 0 {
                let want = buffer.len().min(left as usize);
                reader
                    .read_exact(&mut buffer[..want])
                    .map_err(io_error("reading the partial download"))?;
                hasher.update(&buffer[..want]);
                left -= want as u64;
            }
        }
        writer
            .seek(SeekFrom::Start(keep))
            .map_err(io_error("writing the partial download"))?;
        progress.start(size, keep);

        let mut http = BlobClient::new(&self.keys, &self.server, self.proxy);
        let path = format!("/v1/blobs/{blob_id}");
        let start = layout.ciphertext_offset(first);
        // The ciphertext only, not the padding after it.
        let end = layout.ciphertext_len() - 1;
        let answered = async {
            let response = http
                .send(
                    Method::GET,
                    &path,
                    &[("range", format!("bytes={start}-{end}"))],
                    None,
                )
                .await?;
            match response.status() {
                StatusCode::OK if start == 0 => Ok(response),
                StatusCode::PARTIAL_CONTENT => Ok(response),
                StatusCode::RANGE_NOT_SATISFIABLE => Err(Error::Security(
                    "the file on the server is truncated: it ends before its last chunk".into(),
                )),
                _ => Err(refusal(response).await),
            }
        }
        .await;
        let response = match answered {
            Ok(response) => response,
            Err(error) => {
                if !resuming {
                    // Nothing was written: leave no empty partial file behind.
                    let _ = std::fs::remove_file(&part);
                    self.db.execute(
                        "UPDATE files SET part_path = NULL WHERE id = ?1",
                        params![file_id],
                    )?;
                }
                return Err(error);
            }
        };

        let (pieces, mut queue) = tokio::sync::mpsc::channel::<Bytes>(PIECES_IN_FLIGHT);
        let consumer_progress = Arc::clone(&progress);
        let consumer = tokio::task::spawn_blocking(move || {
            consume(
                &mut queue,
                FileCipher::new(&key, layout),
                first,
                writer,
                hasher,
                &consumer_progress,
            )
        });
        let mut body = response.into_body();
        let mut network_error = None;
        // Whatever a server sends past the ciphertext (padding it was not asked for) is not read.
        let mut wanted = layout.ciphertext_len() - start;
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(frame) => {
                    let Ok(mut data) = frame.into_data() else {
                        continue;
                    };
                    data.truncate(wanted.min(data.len() as u64) as usize);
                    wanted -= data.len() as u64;
                    if pieces.send(data).await.is_err() {
                        // The consumer stopped: its error says why.
                        break;
                    }
                    if wanted == 0 {
                        break;
                    }
                }
                Err(error) => {
                    network_error = Some(error.to_string());
                    break;
                }
            }
        }
        drop(pieces);
        let digest = consumer
            .await
            .map_err(|error| Error::Protocol(format!("the decryption task failed: {error}")));
        let digest = match (digest?, network_error) {
            (Ok(digest), _) => digest,
            // Cut off mid-way: what was written stays for the next run.
            (Err(Error::Security(reason)), Some(error)) if reason.contains("truncated") => {
                return Err(Error::Network(format!(
                    "the download broke off ({error}); run the same command again to continue"
                )));
            }
            (Err(error), _) => return Err(error),
        };
        if !bool::from(subtle::ConstantTimeEq::ct_eq(
            digest.as_slice(),
            expected_hash.as_slice(),
        )) {
            let _ = std::fs::remove_file(&part);
            return Err(Error::Security(
                "the downloaded file does not match the hash its sender sent; it was deleted"
                    .into(),
            ));
        }
        move_into_place(&part, &target)?;
        self.db.execute(
            "UPDATE files SET part_path = NULL, saved_path = ?1 WHERE id = ?2",
            params![target.to_string_lossy(), file_id],
        )?;
        Ok(target)
    }
}

/// Opens the downloaded ciphertext (this thread) and hashes and writes the plaintext (a second
/// thread), chunk by chunk; returns the SHA-256 of the whole file. What was written stays on
/// any error: every chunk in it opened.
fn consume(
    queue: &mut tokio::sync::mpsc::Receiver<Bytes>,
    cipher: FileCipher,
    first: u64,
    writer: std::fs::File,
    mut hasher: Sha256,
    progress: &Progress,
) -> Result<[u8; 32], Error> {
    let layout = *cipher.layout();
    let (plaintexts, to_write) = std::sync::mpsc::sync_channel::<(u64, Vec<u8>)>(PIECES_IN_FLIGHT);
    std::thread::scope(|scope| {
        let written = scope.spawn(move || -> Result<[u8; 32], Error> {
            let mut output = std::io::BufWriter::with_capacity(1 << 20, writer);
            let mut flushed = layout.plaintext_offset(first);
            for (index, plaintext) in to_write {
                hasher.update(&plaintext);
                output
                    .write_all(&plaintext)
                    .map_err(io_error("writing the download"))?;
                let end = layout.plaintext_offset(index + 1);
                progress.set(end);
                if end - flushed >= FLUSH_BYTES {
                    // On disk as we go: a power cut loses little, the final flush is short,
                    // and the written pages can leave the cache (see `drop_cached`).
                    output.flush().map_err(io_error("writing the download"))?;
                    output
                        .get_ref()
                        .sync_data()
                        .map_err(io_error("writing the download"))?;
                    drop_cached(output.get_ref(), flushed, end);
                    flushed = end;
                }
            }
            let file = output.into_inner().map_err(|error| Error::Io {
                context: "writing the download".into(),
                source: error.into_error(),
            })?;
            file.sync_all().map_err(io_error("writing the download"))?;
            Ok(hasher.finalize().into())
        });
        let opened = (|| -> Result<(), Error> {
            let mut opener = Opener::new(cipher, first);
            while let Some(piece) = queue.blocking_recv() {
                opener
                    .feed(&piece, &mut |index, plaintext| {
                        plaintexts
                            .send((index, plaintext))
                            .map_err(|_| "the writer stopped".to_string())
                    })
                    .map_err(file_error)?;
            }
            opener.finish().map_err(file_error)
        })();
        drop(plaintexts);
        let digest = written
            .join()
            .unwrap_or_else(|_| Err(Error::Protocol("the writing thread failed".into())));
        match (opened, digest) {
            // The writer stopped first: its error is the cause.
            (Err(Error::Io { .. }), Err(cause)) => Err(cause),
            (Err(error), _) => Err(error),
            (Ok(()), digest) => digest,
        }
    })
}

/// Tells the kernel that bytes `from..to` of a file, already on disk, will not be read soon, so
/// that a multi-gigabyte download does not push everything else out of the page cache.
fn drop_cached(file: &std::fs::File, from: u64, to: u64) {
    #[cfg(target_os = "linux")]
    if let Some(len) = std::num::NonZeroU64::new(to.saturating_sub(from)) {
        let _ = rustix::fs::fadvise(file, from, Some(len), rustix::fs::Advice::DontNeed);
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (file, from, to);
}

fn file_error(error: file::FileError) -> Error {
    match error {
        file::FileError::Tampered(chunk) => Error::Security(format!(
            "chunk {chunk} of the file was altered on the server; the download stopped (the chunks before it are kept)"
        )),
        file::FileError::Truncated => Error::Security(
            "the file on the server is truncated: it ends before its last chunk".into(),
        ),
        file::FileError::TrailingData => {
            Error::Security("the server sent more bytes than the file has".into())
        }
        file::FileError::Sink(reason) => Error::Io {
            context: "writing the download".into(),
            source: std::io::Error::other(reason),
        },
        other => Error::Protocol(other.to_string()),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Where the partial download of file `id` into `target` is written: beside it (so that the
/// finished file is moved, not copied), hidden, and named for that file alone.
fn part_path_for(target: &Path, id: i64) -> PathBuf {
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    target.with_file_name(format!(".{name}.{id}.miyu-part"))
}

/// Opens a partial download: a new one is created and must not exist (not even as a link
/// someone planted), an existing one is opened without following a link.
fn open_part(part: &Path, resuming: bool) -> Result<std::fs::File, Error> {
    let mut options = std::fs::OpenOptions::new();
    options.read(true).write(true);
    if resuming {
        options.create(false).truncate(false);
    } else {
        options.create_new(true);
    }
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.custom_flags(libc::O_NOFOLLOW).mode(0o600);
    }
    options.open(part).map_err(|error| {
        if error.kind() == std::io::ErrorKind::AlreadyExists {
            Error::Usage(format!(
                "{} exists already and is not a download this profile started; remove it or choose another --out",
                part.display()
            ))
        } else {
            Error::Io {
                context: format!("writing {}", part.display()),
                source: error,
            }
        }
    })
}

/// Gives the finished download its name without ever replacing a file that appeared there
/// meanwhile (a hard link fails if the name is taken), then makes the name durable.
fn move_into_place(part: &Path, target: &Path) -> Result<(), Error> {
    match std::fs::hard_link(part, target) {
        Ok(()) => {
            std::fs::remove_file(part).map_err(io_error(format!("removing {}", part.display())))?
        }
        Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {
            return Err(Error::Usage(format!(
                "{} appeared while downloading; the file is kept as {}",
                target.display(),
                part.display()
            )));
        }
        // A file system without hard links: check, then rename.
        Err(_) => {
            if target.symlink_metadata().is_ok() {
                return Err(Error::Usage(format!(
                    "{} appeared while downloading; the file is kept as {}",
                    target.display(),
                    part.display()
                )));
            }
            std::fs::rename(part, target).map_err(io_error(format!(
                "moving the download to {}",
                target.display()
            )))?;
        }
    }
    if let Some(folder) = target.parent().filter(|f| !f.as_os_str().is_empty()) {
        let _ = std::fs::File::open(folder).and_then(|folder| folder.sync_all());
    }
    Ok(())
}

/// `folder/name`, or `folder/stem (2).ext` and so on if that exists.
fn unique_path(folder: &Path, name: &str) -> PathBuf {
    let first = folder.join(name);
    if !first.exists() {
        return first;
    }
    let (stem, extension) = match name.rsplit_once('.') {
        Some((stem, extension)) if !stem.is_empty() => (stem, format!(".{extension}")),
        _ => (name, String::new()),
    };
    (2..)
        .map(|n| folder.join(format!("{stem} ({n}){extension}")))
        .find(|candidate| !candidate.exists())
        .unwrap_or(first)
}

/// Removes the partial downloads of the files of messages matching `condition` (an SQL
/// expression over `m`, the messages table, with `?1` bound to `value`): their plaintext must
/// not outlive the message.
pub(crate) fn remove_partials(db: &Connection, condition: &str, value: i64) -> Result<(), Error> {
    let sql = format!(
        "SELECT f.part_path FROM files f JOIN messages m ON m.id = f.message_row
         WHERE f.part_path IS NOT NULL AND ({condition})"
    );
    let parts: Vec<String> = db
        .prepare(&sql)?
        .query_map(params![value], |row| row.get(0))?
        .collect::<Result<_, _>>()?;
    for part in parts {
        let _ = std::fs::remove_file(part);
    }
    Ok(())
}

/// Stores a file record for a message row.
fn insert_file(db: &Connection, message_row: i64, file: &wire::File) -> Result<i64, Error> {
    db.execute(
        "INSERT INTO files (message_row, blob_id, file_key, size, chunk_size, sha256, name, mime)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        params![
            message_row,
            file.blob_id,
            file.key,
            file.size,
            file.chunk_size,
            file.sha256,
            clean_name(&file.name),
            clean_mime(&file.mime)
        ],
    )?;
    Ok(db.last_insert_rowid())
}

/// Stores a contact's file message; `None` if it is a repeat or malformed.
pub(crate) fn store_file(
    db: &Connection,
    received: &Received<'_>,
    file: &wire::File,
) -> Result<Option<Event>, Error> {
    let well_formed = file.blob_id.len() == 32
        && file.key.len() == 32
        && file.sha256.len() == 32
        && Layout::new(file.size, file.chunk_size).is_ok();
    if !well_formed {
        tracing::debug!("dropped a malformed file message");
        return Ok(None);
    }
    let name = clean_name(&file.name);
    let Some(row) = privacy::store_message(db, received, &name, "file")? else {
        return Ok(None);
    };
    let id = insert_file(db, row, file)?;
    Ok(Some(Event::Message(MessageView {
        id: row,
        contact: received.conversation_name.to_string(),
        from: received.contact_name.to_string(),
        outgoing: received.own,
        body: file_line(id, &name, file.size),
        sent_at_ms: received.sent_at_ms,
        state: if received.own {
            MessageState::Sent
        } else {
            MessageState::Received
        },
        kind: MessageKind::File,
        expires_at_ms: privacy::expiry(received),
        ..Default::default()
    })))
}

/// How a file message reads in a conversation.
pub(crate) fn file_line(id: i64, name: &str, size: u64) -> String {
    format!("[file {id}] {name} ({})", human_size(size))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_lose_directories_control_characters_and_disguises() {
        assert_eq!(clean_name("../../etc/passwd"), "etcpasswd");
        assert_eq!(clean_name("a\u{7}b\nc.txt"), "abc.txt");
        assert_eq!(clean_name(".."), "file");
        assert_eq!(clean_name("  "), "file");
        // No hidden files, no option-like names, no direction tricks.
        assert_eq!(clean_name(".bash_login"), "bash_login");
        assert_eq!(clean_name("--help"), "help");
        assert_eq!(clean_name("photo\u{202E}gpj.exe"), "photogpj.exe");
        assert_eq!(clean_name("a\u{200B}b"), "ab");
        assert!(clean_name(&"é".repeat(300)).len() <= MAX_NAME_BYTES);
    }

    #[test]
    fn mime_types_are_checked() {
        assert_eq!(clean_mime("image/jpeg"), "image/jpeg");
        assert_eq!(
            clean_mime("text/html; charset=x"),
            "application/octet-stream"
        );
        assert_eq!(clean_mime(""), "application/octet-stream");
        assert_eq!(mime_of("a.MP4", None), "video/mp4");
        assert_eq!(mime_of("a.jpg", Some(ImageKind::Png)), "image/png");
    }

    #[test]
    fn unique_paths_do_not_overwrite() {
        let folder = tempfile::tempdir().unwrap();
        assert_eq!(
            unique_path(folder.path(), "a.txt"),
            folder.path().join("a.txt")
        );
        std::fs::write(folder.path().join("a.txt"), b"x").unwrap();
        assert_eq!(
            unique_path(folder.path(), "a.txt"),
            folder.path().join("a (2).txt")
        );
    }

    #[test]
    fn sizes_read_like_people_write_them() {
        assert_eq!(human_size(999), "999 B");
        assert_eq!(human_size(1_500_000), "1.5 MB");
        assert_eq!(human_size(4_294_967_296), "4.3 GB");
    }
}
