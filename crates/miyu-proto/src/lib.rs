//! Miyu's wire types and their codecs: frames, identifiers, device certificates, server
//! addresses, invite links, usernames and the blob endpoints' headers.
//!
//! Everything here is pure: no network, no files, no clock, no randomness. Every decoder of
//! untrusted bytes returns a typed error and never panics; each has a fuzz target in `fuzz/`.
//!
//! ```
//! use miyu_proto::{frame, wire};
//! let hello = wire::ClientFrame {
//!     version: frame::PROTOCOL_VERSION,
//!     request_id: 1,
//!     body: Some(wire::client_frame::Body::Hello(wire::Hello { versions: vec![1] })),
//! };
//! let bytes = frame::encode(&hello);
//! let back = frame::decode_client_frame(&bytes).unwrap();
//! assert_eq!(back, hello);
//! ```
//!
//! What it does not do: open connections, hold secret keys or speak MLS.

#![cfg_attr(not(test), warn(clippy::unwrap_used))]

pub mod address;
pub mod blob;
pub mod cert;
pub mod frame;
pub mod ids;
pub mod invite;
pub mod link;
mod text;
pub mod username;

/// Types generated from `proto/miyu.proto`, the single source of truth for the wire format.
#[allow(unreachable_pub, clippy::all)]
pub mod wire {
    include!(concat!(env!("OUT_DIR"), "/miyu.v1.rs"));
}

pub use address::ServerAddress;
pub use cert::{CertificateError, VerifiedCertificate};
pub use ids::{AccountId, DeviceId, Epoch, GroupId, IdError, IdentityFingerprint};
pub use invite::InviteLink;
pub use link::LinkCode;
pub use username::Username;
