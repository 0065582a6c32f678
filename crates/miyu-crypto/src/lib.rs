//! Miyu's secret-handling cryptography: identity and device keys, device certificates, safety
//! numbers, and the MLS glue (a SQLite-backed OpenMLS provider and the few group operations
//! Miyu uses).
//!
//! ```
//! use miyu_crypto::identity::AccountKeys;
//! let alice = AccountKeys::generate(&mut rand::rngs::OsRng);
//! let bob = AccountKeys::generate(&mut rand::rngs::OsRng);
//! let number = miyu_crypto::safety::safety_number(alice.certificate(), bob.certificate());
//! assert_eq!(number, miyu_crypto::safety::safety_number(bob.certificate(), alice.certificate()));
//! ```
//!
//! What it does not do: invent primitives. Signatures are Ed25519 (`ed25519-dalek`), group
//! messaging is MLS (RFC 9420) through `openmls`. Nothing here does network or file I/O beyond
//! the SQLite connection the caller hands in.

#![cfg_attr(not(test), warn(clippy::unwrap_used))]

pub mod file;
pub mod identity;
pub mod invite;
pub mod link;
pub mod mls;
pub mod recovery;
pub mod safety;
