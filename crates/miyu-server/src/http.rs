//! The listening side: TLS 1.3, then HTTP — `GET /healthz`, the WebSocket at `GET /v1/ws` and
//! the blob endpoints under `/v1/blobs` — and the life cycle of a running server (start,
//! graceful shutdown).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{State, WebSocketUpgrade};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use miyu_proto::ServerAddress;
use miyu_proto::frame::MAX_FRAME_BYTES;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use crate::blobs::{self, BlobLimits, BlobState, Blobs};
use crate::connection::{self, Shared, stopped, unix_now};
use crate::hub::Hub;
use crate::limits::TokenBucket;
use crate::store::memory::MemoryStore;
use crate::store::sqlite::SqliteStore;
use crate::store::worker::StoreHandle;
use crate::store::{Store, coarse_hour};
use crate::{ServerConfig, ServerError, StoreBackend, TlsIdentity};

/// TLS handshakes that may be in progress at once; more wait in the kernel's backlog.
const MAX_HANDSHAKES: usize = 256;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long shutdown waits for connections to say goodbye.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// How often old entries, invites and grants are swept.
const EXPIRY_INTERVAL: Duration = Duration::from_secs(60);

/// A server that is accepting connections.
pub struct RunningServer {
    address: ServerAddress,
    local_addr: SocketAddr,
    stop: watch::Sender<bool>,
    serving: tokio::task::JoinHandle<()>,
    connections_done: mpsc::Receiver<()>,
    store_thread: std::thread::JoinHandle<()>,
}

impl RunningServer {
    /// What clients use to reach and pin this server.
    pub fn address(&self) -> &ServerAddress {
        &self.address
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting, tells every connection goodbye, waits for them (a few seconds at most)
    /// and closes the store after its last commit.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        let _ = self.serving.await;
        let _ = tokio::time::timeout(SHUTDOWN_GRACE, self.connections_done.recv()).await;
        // The store thread ends once the last handle (held by the tasks above) is gone. A
        // connection stuck on a peer could hold one: every acknowledged write is already
        // committed, so after a grace period shutdown goes on without it.
        let store_thread = self.store_thread;
        let joined = tokio::task::spawn_blocking(move || store_thread.join());
        if tokio::time::timeout(SHUTDOWN_GRACE, joined).await.is_err() {
            tracing::warn!("shutting down without waiting any longer for the store thread");
        }
    }
}

/// The address line the server prints: where it listens, with its certificate fingerprint.
fn public_address(
    config: &ServerConfig,
    local: SocketAddr,
    sha256: [u8; 32],
) -> Result<ServerAddress, ServerError> {
    let host = match &config.public_host {
        Some(host) => host.clone(),
        None if local.ip().is_unspecified() => "127.0.0.1".to_string(),
        None => match local {
            SocketAddr::V4(v4) => v4.ip().to_string(),
            SocketAddr::V6(v6) => format!("[{}]", v6.ip()),
        },
    };
    ServerAddress::new(&host, local.port(), sha256)
        .map_err(|error| ServerError::Config(format!("public host {host:?}: {error}")))
}

fn open_store(config: &ServerConfig) -> Result<Box<dyn Store>, ServerError> {
    Ok(match config.store {
        StoreBackend::Sqlite => Box::new(SqliteStore::open(&config.data_dir.join("miyu.sqlite3"))?),
        StoreBackend::DangerMemory => Box::new(MemoryStore::default()),
    })
}

/// Opens the store, binds the listener and starts serving.
pub async fn start(config: ServerConfig) -> Result<RunningServer, ServerError> {
    config.validate()?;
    std::fs::create_dir_all(&config.data_dir).map_err(|error| {
        ServerError::io(format!("creating {}", config.data_dir.display()), error)
    })?;
    let identity = TlsIdentity::load_or_create(&config)?;
    let certificate_sha256 = identity.certificate_sha256();
    let acceptor = TlsAcceptor::from(identity.rustls_config()?);
    let (store, store_thread) = StoreHandle::spawn(open_store(&config)?, config.max_batch)
        .map_err(|error| ServerError::io("starting the store thread", error))?;

    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|error| ServerError::io(format!("listening on {}", config.listen), error))?;
    let local_addr = listener
        .local_addr()
        .map_err(|error| ServerError::io("reading the listen address", error))?;
    let address = public_address(&config, local_addr, certificate_sha256)?;

    let blobs = Arc::new(
        Blobs::open(
            &config.data_dir,
            BlobLimits {
                max_bytes: config.blob_max_bytes,
                quota_bytes: config.blob_quota_bytes,
                retention_s: u64::from(config.blob_retention_days) * 86_400,
            },
        )
        .map_err(|error| ServerError::io("creating the blob folder", error))?,
    );
    let (stop, stop_signal) = watch::channel(false);
    let per_minute = f64::from(config.registrations_per_minute);
    let shared = Arc::new(Shared {
        store: store.clone(),
        hub: Hub::default(),
        certificate_sha256,
        registration_token: config.registration_token.clone(),
        registrations: Mutex::new(TokenBucket::new(
            per_minute / 60.0,
            per_minute,
            Instant::now(),
        )),
        lookups: Mutex::new(crate::connection::Lookups::new(Instant::now())),
        contact_claims: Mutex::new(crate::connection::DeviceBudgets::contact_claims()),
        link_puts: Mutex::new(crate::connection::DeviceBudgets::link_puts()),
        requests_per_second: config.requests_per_second,
        shutdown: stop_signal.clone(),
        blobs,
    });

    // Every connection task holds a clone of this sender; shutdown waits for all to drop.
    let (connection_alive, connections_done) = mpsc::channel::<()>(1);
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/v1/ws", get(websocket))
        .with_state(AppState {
            shared: Arc::clone(&shared),
            connection_alive,
        })
        .merge(
            Router::new()
                .route("/v1/blobs", post(blobs::create))
                .route(
                    "/v1/blobs/{id}",
                    get(blobs::download)
                        .head(blobs::status)
                        .patch(blobs::append),
                )
                .with_state::<()>(BlobState::clone(&shared)),
        );

    tokio::spawn(expire_periodically(
        Arc::clone(&shared),
        config.retention_days,
        stop_signal.clone(),
    ));
    let tls_listener = TlsListener::start(listener, acceptor, stop_signal.clone());
    let mut stopping = stop_signal;
    let serving = tokio::spawn(async move {
        let shutdown = async move {
            stopped(&mut stopping).await;
        };
        let _ = axum::serve(tls_listener, app)
            .with_graceful_shutdown(shutdown)
            .await;
    });
    drop(shared);
    Ok(RunningServer {
        address,
        local_addr,
        stop,
        serving,
        connections_done,
        store_thread,
    })
}

#[derive(Clone)]
struct AppState {
    shared: Arc<Shared>,
    connection_alive: mpsc::Sender<()>,
}

async fn healthz(State(state): State<AppState>) -> impl IntoResponse {
    match state.shared.store.run(|_| Ok(())).await {
        Ok(()) => (StatusCode::OK, "ok\n"),
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "store unavailable\n"),
    }
}

async fn websocket(State(state): State<AppState>, upgrade: WebSocketUpgrade) -> impl IntoResponse {
    // Frames a little over the protocol's limit still reach the decoder, which answers with a
    // typed FRAME_TOO_LARGE error; far larger ones end the connection at the WebSocket layer.
    upgrade
        .max_message_size(2 * MAX_FRAME_BYTES)
        .max_frame_size(2 * MAX_FRAME_BYTES)
        .on_upgrade(move |socket| async move {
            let _alive = state.connection_alive;
            connection::serve(socket, state.shared).await;
        })
}

/// Deletes what has expired, then the files of blobs whose rows went, every
/// [`EXPIRY_INTERVAL`].
async fn expire_periodically(
    shared: Arc<Shared>,
    retention_days: u32,
    mut stop: watch::Receiver<bool>,
) {
    let retention = u64::from(retention_days) * 24 * 3600;
    loop {
        let now = unix_now();
        let cutoff = coarse_hour(now.saturating_sub(retention));
        match shared
            .store
            .run(move |store| store.expire(now, cutoff))
            .await
        {
            Ok(removed) if removed > 0 => tracing::info!("expired {removed} stored items"),
            Ok(_) => {}
            Err(error) => tracing::warn!("expiry failed: {error}"),
        }
        shared.blobs.forget_idle(now);
        match blobs::remove_orphans(&shared).await {
            Ok(removed) if removed > 0 => tracing::info!("removed {removed} blob files"),
            Ok(_) => {}
            Err(error) => tracing::warn!("removing blob files failed: {error}"),
        }
        tokio::select! {
            _ = tokio::time::sleep(EXPIRY_INTERVAL) => {}
            _ = stopped(&mut stop) => return,
        }
    }
}

/// A peer's address, deliberately empty: the server does not keep or log where anyone
/// connects from, so nothing downstream of the listener ever sees an IP address.
#[derive(Debug, Clone, Copy)]
struct Anonymous;

/// Accepts TCP connections and completes TLS handshakes concurrently, handing finished
/// streams to the HTTP server.
struct TlsListener {
    ready: mpsc::Receiver<TlsStream<TcpStream>>,
}

impl TlsListener {
    fn start(
        listener: TcpListener,
        acceptor: TlsAcceptor,
        mut stop: watch::Receiver<bool>,
    ) -> Self {
        let (ready_sender, ready) = mpsc::channel(MAX_HANDSHAKES);
        let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    accepted = listener.accept() => accepted,
                    _ = stopped(&mut stop) => return,
                };
                let stream = match accepted {
                    Ok((stream, _peer)) => stream,
                    Err(error) => {
                        tracing::debug!("accept failed: {error}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let Ok(permit) = Arc::clone(&handshakes).acquire_owned().await else {
                    return;
                };
                let acceptor = acceptor.clone();
                let ready_sender = ready_sender.clone();
                tokio::spawn(async move {
                    let _permit = permit;
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            let _ = ready_sender.send(tls).await;
                        }
                        Ok(Err(error)) => tracing::debug!("TLS handshake failed: {error}"),
                        Err(_) => tracing::debug!("TLS handshake timed out"),
                    }
                });
            }
        });
        Self { ready }
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = Anonymous;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(stream) => (stream, Anonymous),
            // The acceptor stopped: the server is shutting down. Park until axum notices.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(Anonymous)
    }
}
