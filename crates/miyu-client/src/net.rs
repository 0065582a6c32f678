//! A connection to a Miyu server: TCP, TLS 1.3 pinned to the certificate fingerprint in the
//! server address, a WebSocket, and protobuf frames. No certificate authority is consulted and
//! host names are not checked: the fingerprint is the server's identity.

use std::net::SocketAddr;
use std::sync::Arc;

use futures_util::{SinkExt, StreamExt};
use miyu_proto::ServerAddress;
use miyu_proto::frame::{self, MAX_FRAME_BYTES, PROTOCOL_VERSION};
use miyu_proto::wire::{self, client_frame::Body as Request, server_frame::Body as Reply};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::Error;

/// Accepts exactly one certificate: the one whose SHA-256 the server address names. Handshake
/// signatures are still verified, so only the holder of that certificate's key gets through.
#[derive(Debug)]
struct PinnedCertificate {
    sha256: [u8; 32],
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCertificate {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        use subtle::ConstantTimeEq;
        let seen: [u8; 32] = Sha256::digest(end_entity.as_ref()).into();
        if bool::from(seen.ct_eq(&self.sha256)) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // Only TLS 1.3 is offered, so this is never reached; refuse if it somehow is.
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls13RequiredForQuic,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

fn tls_connector(server: &ServerAddress) -> Result<TlsConnector, Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(PinnedCertificate {
        sha256: *server.certificate_sha256(),
        provider: Arc::clone(&provider),
    });
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|error| Error::Network(error.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsConnector::from(Arc::new(config)))
}

/// A SOCKS5 proxy (such as Tor's) that every connection goes through, asking the proxy to
/// resolve the server's name: `socks5h://IP:PORT`. The proxy itself is named by IP address, so
/// that no name is ever looked up outside it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Proxy(SocketAddr);

impl std::str::FromStr for Proxy {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self, Error> {
        let address = text.trim().strip_prefix("socks5h://").ok_or_else(|| {
            Error::Usage(
                "a proxy is written socks5h://IP:PORT (the h: the proxy resolves names, so no DNS query leaves this device)"
                    .into(),
            )
        })?;
        let address = address.strip_suffix('/').unwrap_or(address);
        address.parse().map(Proxy).map_err(|_| {
            Error::Usage(format!(
                "the proxy {address:?} is not IP:PORT; name it by address so that no name lookup happens outside it"
            ))
        })
    }
}

impl std::fmt::Display for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "socks5h://{}", self.0)
    }
}

/// Opens TCP to the server (through the proxy when there is one; the proxy then resolves the
/// host name) and TLS pinned to the server's certificate.
pub(crate) async fn open_tls(
    server: &ServerAddress,
    proxy: Option<&Proxy>,
) -> Result<TlsStream<TcpStream>, Error> {
    let tcp = match proxy {
        None => TcpStream::connect((server.connect_host(), server.port()))
            .await
            .map_err(|error| {
                Error::Network(format!("cannot reach {}: {error}", server.authority()))
            })?,
        Some(proxy) => {
            tokio_socks::tcp::Socks5Stream::connect(proxy.0, (server.connect_host(), server.port()))
                .await
                .map_err(|error| {
                    Error::Network(format!(
                        "cannot reach {} through the proxy {proxy}: {error}",
                        server.authority()
                    ))
                })?
                .into_inner()
        }
    };
    let _ = tcp.set_nodelay(true);
    let name = ServerName::try_from(server.connect_host().to_string())
        .map_err(|error| Error::Network(error.to_string()))?;
    tls_connector(server)?
        .connect(name, tcp)
        .await
        .map_err(|error| {
            Error::Network(format!(
                "TLS with {} failed (is the fingerprint in the server address right?): {error}",
                server.authority()
            ))
        })
}

/// Asks the server's `GET /healthz` whether it can serve, over the same pinned TLS.
pub async fn check_health(server: &ServerAddress, proxy: Option<&Proxy>) -> Result<bool, Error> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tls = open_tls(server, proxy).await?;
    let request = format!(
        "GET /healthz HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        server.authority()
    );
    let io = |error: std::io::Error| Error::Network(format!("health check failed: {error}"));
    tls.write_all(request.as_bytes()).await.map_err(io)?;
    let mut response = Vec::new();
    tls.take(4096)
        .read_to_end(&mut response)
        .await
        .map_err(io)?;
    Ok(response.starts_with(b"HTTP/1.1 200"))
}

/// One open connection, after the version handshake.
pub struct Connection {
    socket: WebSocketStream<TlsStream<TcpStream>>,
    /// Frames that arrived while `call` waited for another one; `receive` returns them first.
    early: std::collections::VecDeque<wire::ServerFrame>,
    next_request_id: u64,
    nonce: Vec<u8>,
    server_certificate_sha256: [u8; 32],
}

impl Connection {
    /// Connects, checks the server's certificate against the pinned fingerprint and says Hello.
    pub async fn open(server: &ServerAddress, proxy: Option<&Proxy>) -> Result<Self, Error> {
        let tls = open_tls(server, proxy).await?;
        let config = WebSocketConfig::default()
            .max_message_size(Some(2 * MAX_FRAME_BYTES))
            .max_frame_size(Some(2 * MAX_FRAME_BYTES));
        let url = format!("wss://{}/v1/ws", server.authority());
        let (socket, _response) =
            tokio_tungstenite::client_async_with_config(url, tls, Some(config))
                .await
                .map_err(|error| Error::Network(format!("WebSocket handshake failed: {error}")))?;
        let mut connection = Self {
            socket,
            early: std::collections::VecDeque::new(),
            next_request_id: 1,
            nonce: Vec::new(),
            server_certificate_sha256: *server.certificate_sha256(),
        };
        let hello = connection
            .call(Request::Hello(wire::Hello {
                versions: vec![PROTOCOL_VERSION],
            }))
            .await?;
        match hello {
            Reply::Challenge(challenge) if challenge.version == PROTOCOL_VERSION => {
                connection.nonce = challenge.nonce;
                Ok(connection)
            }
            other => Err(Error::Protocol(format!(
                "unexpected answer to Hello: {other:?}"
            ))),
        }
    }

    /// The nonce the server wants signed, and the certificate hash that goes with it.
    pub fn challenge(&self) -> (&[u8; 32], &[u8]) {
        (&self.server_certificate_sha256, &self.nonce)
    }

    /// Sends a request and returns its id without waiting for the answer.
    pub async fn send(&mut self, body: Request) -> Result<u64, Error> {
        let request_id = self.next_request_id;
        self.next_request_id += 1;
        let bytes = frame::encode(&wire::ClientFrame {
            version: PROTOCOL_VERSION,
            request_id,
            body: Some(body),
        });
        self.send_raw(bytes).await?;
        Ok(request_id)
    }

    /// Sends bytes as one binary frame, whatever they are. For tests of the server's defences.
    pub async fn send_raw(&mut self, bytes: Vec<u8>) -> Result<(), Error> {
        self.socket
            .send(Message::Binary(bytes.into()))
            .await
            .map_err(|error| Error::Network(format!("send failed: {error}")))
    }

    /// Sends a text frame. For tests of the server's defences.
    pub async fn send_text(&mut self, text: &str) -> Result<(), Error> {
        self.socket
            .send(Message::Text(text.into()))
            .await
            .map_err(|error| Error::Network(format!("send failed: {error}")))
    }

    /// The next frame from the server.
    pub async fn receive(&mut self) -> Result<wire::ServerFrame, Error> {
        if let Some(frame) = self.early.pop_front() {
            return Ok(frame);
        }
        loop {
            match self.socket.next().await {
                Some(Ok(Message::Binary(bytes))) => {
                    return frame::decode_server_frame(&bytes).map_err(|error| {
                        Error::Protocol(format!("bad frame from server: {error}"))
                    });
                }
                Some(Ok(Message::Close(_))) | None => {
                    return Err(Error::Network("the server closed the connection".into()));
                }
                Some(Ok(_)) => continue,
                Some(Err(error)) => {
                    return Err(Error::Network(format!("connection lost: {error}")));
                }
            }
        }
    }

    /// Sends a request and waits for its answer. Frames that arrive in between are kept for
    /// `receive`, so nothing pushed meanwhile is lost.
    pub async fn call(&mut self, body: Request) -> Result<Reply, Error> {
        let id = self.send(body).await?;
        let mut others = Vec::new();
        let answer = loop {
            let frame = match self.early.pop_front() {
                Some(frame) => frame,
                None => match self.receive().await {
                    Ok(frame) => frame,
                    Err(error) => break Err(error),
                },
            };
            if frame.request_id == id {
                break into_result(frame);
            }
            others.push(frame);
        };
        self.early.extend(others);
        answer
    }

    pub async fn close(mut self) {
        let _ = self.socket.close(None).await;
    }
}

/// A server answer as a result: `Error` frames become [`Error::Server`].
pub fn into_result(frame: wire::ServerFrame) -> Result<Reply, Error> {
    match frame.body {
        Some(Reply::Error(error)) => Err(Error::Server(ServerError::from(error))),
        Some(body) => Ok(body),
        None => Err(Error::Protocol("empty frame from server".into())),
    }
}

/// An error the server answered with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerError {
    pub code: wire::ErrorCode,
    pub message: String,
    pub current_epoch: u64,
}

impl From<wire::Error> for ServerError {
    fn from(error: wire::Error) -> Self {
        Self {
            code: wire::ErrorCode::try_from(error.code).unwrap_or(wire::ErrorCode::Unspecified),
            // A server is not trusted to print whatever it likes on a user's terminal.
            message: error
                .message
                .chars()
                .filter(|c| !c.is_control())
                .take(200)
                .collect(),
            current_epoch: error.current_epoch,
        }
    }
}

impl std::fmt::Display for ServerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message, self.code.as_str_name())
    }
}
