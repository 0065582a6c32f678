//! The secrets derived from an invite link's token.
//!
//! The token itself never leaves the two people's devices. The server gets a *claim secret*
//! (whose SHA-256 it stored when the invite was made) and, against it, hands out key packages.
//! The invitee proves to the inviter that it holds the token with an *introduction proof*: an
//! HMAC keyed by a second derived secret over the group and the invitee's device certificate,
//! sent inside MLS. A server that saw the claim secret still cannot compute the proof, nor
//! reuse one made for another group or device.

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

fn derive(label: &[u8], token: &[u8; 32]) -> [u8; 32] {
    Sha256::new()
        .chain_update(label)
        .chain_update(token)
        .finalize()
        .into()
}

/// What the invitee sends the server to redeem the invite.
pub fn claim_secret(token: &[u8; 32]) -> [u8; 32] {
    derive(b"miyu invite claim v1", token)
}

/// What the inviter registers with the server: SHA-256 of the claim secret.
pub fn claim_hash(token: &[u8; 32]) -> [u8; 32] {
    Sha256::digest(claim_secret(token)).into()
}

/// The invitee's proof, for the inviter, that it holds the token: bound to the group it
/// created and to its own device certificate.
pub fn introduction_proof(token: &[u8; 32], group_id: &[u8], certificate: &[u8]) -> [u8; 32] {
    let key = derive(b"miyu invite introduction v1", token);
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&key).expect("HMAC takes any key length");
    mac.update(&(group_id.len() as u64).to_be_bytes());
    mac.update(group_id);
    mac.update(certificate);
    mac.finalize().into_bytes().into()
}

/// Checks an introduction proof in constant time.
pub fn verify_introduction(
    token: &[u8; 32],
    group_id: &[u8],
    certificate: &[u8],
    proof: &[u8],
) -> bool {
    introduction_proof(token, group_id, certificate)
        .ct_eq(proof)
        .into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_server_side_secret_reveals_nothing_that_proves_an_introduction() {
        let token = [7u8; 32];
        let proof = introduction_proof(&token, b"group one", b"certificate of bob");
        assert!(verify_introduction(
            &token,
            b"group one",
            b"certificate of bob",
            &proof
        ));
        // Bound to the group and to the device: no reuse elsewhere.
        assert!(!verify_introduction(
            &token,
            b"group two",
            b"certificate of bob",
            &proof
        ));
        assert!(!verify_introduction(
            &token,
            b"group one",
            b"certificate of eve",
            &proof
        ));
        // The claim secret the server sees is neither the token nor the proof key.
        let claim = claim_secret(&token);
        assert_ne!(claim, token);
        assert!(!verify_introduction(
            &claim,
            b"group one",
            b"certificate of bob",
            &proof
        ));
        assert!(!verify_introduction(
            &token,
            b"group one",
            b"certificate of bob",
            &proof[..31]
        ));
    }
}
