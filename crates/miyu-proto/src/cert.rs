//! Device certificates: an account's identity key vouching for one of its device keys, and the
//! signatures a device makes to authenticate to a server. Public keys only.

use ed25519_dalek::{Signature, VerifyingKey};

use crate::ids::{AccountId, DeviceId, IdentityFingerprint};
use crate::wire;

/// What a certificate's signature covers, after this prefix: identity key then device key.
pub const CERTIFICATE_CONTEXT: &[u8] = b"miyu device certificate v1";
/// What an authentication signature covers, after this prefix: the server certificate's
/// SHA-256 then the connection's nonce.
pub const AUTH_CONTEXT: &[u8] = b"miyu auth v1";
/// What a group's posting key signs for an unattributed post, after this prefix.
pub const GROUP_POST_CONTEXT: &[u8] = b"miyu group post v1";
/// Domain separation for an identity key revoking one of its devices.
pub const REVOKE_CONTEXT: &[u8] = b"miyu revoke device v1";
/// Domain separation for an identity key setting its account's recovery bundle.
pub const RECOVERY_CONTEXT: &[u8] = b"miyu set recovery v1";
/// Bytes of a certificate in its compact form: identity key, device key, signature.
pub const CERTIFICATE_LEN: usize = 32 + 32 + 64;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CertificateError {
    #[error("certificate is missing")]
    Missing,
    #[error("certificate has a malformed key or signature")]
    Malformed,
    #[error("certificate signature does not verify")]
    BadSignature,
}

/// The bytes an identity key signs to certify a device key.
pub fn certificate_payload(identity_key: &[u8; 32], device_key: &[u8; 32]) -> Vec<u8> {
    [CERTIFICATE_CONTEXT, identity_key, device_key].concat()
}

/// The bytes a device key signs to authenticate a connection.
pub fn auth_payload(server_certificate_sha256: &[u8; 32], nonce: &[u8]) -> Vec<u8> {
    [AUTH_CONTEXT, server_certificate_sha256, nonce].concat()
}

/// Checks an Ed25519 signature (strictly: no malleable or small-order forms) over `payload`.
fn verify_signature(key: &[u8; 32], payload: &[u8], signature: &[u8]) -> bool {
    let Ok(key) = VerifyingKey::from_bytes(key) else {
        return false;
    };
    let Ok(signature) = <[u8; 64]>::try_from(signature) else {
        return false;
    };
    key.verify_strict(payload, &Signature::from_bytes(&signature))
        .is_ok()
}

/// The bytes a group's posting key signs for a `GroupPost`: the group id (with its length),
/// the epoch, the expiry and the SHA-256 of the payload.
pub fn group_post_payload(group_id: &[u8], epoch: u64, expires_at: u64, payload: &[u8]) -> Vec<u8> {
    use sha2::{Digest, Sha256};
    let mut bytes = GROUP_POST_CONTEXT.to_vec();
    bytes.push(u8::try_from(group_id.len()).unwrap_or(u8::MAX));
    bytes.extend_from_slice(group_id);
    bytes.extend_from_slice(&epoch.to_be_bytes());
    bytes.extend_from_slice(&expires_at.to_be_bytes());
    bytes.extend_from_slice(&Sha256::digest(payload));
    bytes
}

/// Checks a posting key's signature over a `GroupPost`.
pub fn verify_group_post(
    posting_key: &[u8; 32],
    group_id: &[u8],
    epoch: u64,
    expires_at: u64,
    payload: &[u8],
    signature: &[u8],
) -> bool {
    verify_signature(
        posting_key,
        &group_post_payload(group_id, epoch, expires_at, payload),
        signature,
    )
}

/// The bytes an account's identity key signs to revoke one of its devices.
pub fn revoke_payload(device_id: &crate::DeviceId) -> Vec<u8> {
    [REVOKE_CONTEXT, device_id.as_bytes().as_slice()].concat()
}

/// Checks an identity key's signature revoking `device_id`.
pub fn verify_revocation(
    identity_key: &[u8; 32],
    device_id: &crate::DeviceId,
    signature: &[u8],
) -> bool {
    verify_signature(identity_key, &revoke_payload(device_id), signature)
}

/// The bytes an account's identity key signs to set the account's recovery bundle: the
/// verifier and the locator (32 bytes each), then the sealed bundle.
pub fn recovery_payload(verifier: &[u8; 32], locator: &[u8; 32], bundle: &[u8]) -> Vec<u8> {
    [RECOVERY_CONTEXT, verifier, locator, bundle].concat()
}

/// Checks an identity key's signature setting a recovery bundle.
pub fn verify_recovery(
    identity_key: &[u8; 32],
    verifier: &[u8; 32],
    locator: &[u8; 32],
    bundle: &[u8],
    signature: &[u8],
) -> bool {
    verify_signature(
        identity_key,
        &recovery_payload(verifier, locator, bundle),
        signature,
    )
}

/// A device certificate whose signature has been checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedCertificate {
    identity_key: VerifyingKey,
    device_key: VerifyingKey,
    signature: [u8; 64],
}

fn key(bytes: &[u8]) -> Result<VerifyingKey, CertificateError> {
    let array: [u8; 32] = bytes.try_into().map_err(|_| CertificateError::Malformed)?;
    VerifyingKey::from_bytes(&array).map_err(|_| CertificateError::Malformed)
}

impl VerifiedCertificate {
    /// Checks a certificate received on the wire.
    pub fn verify(certificate: &wire::DeviceCertificate) -> Result<Self, CertificateError> {
        let identity_key = key(&certificate.identity_key)?;
        let device_key = key(&certificate.device_key)?;
        let signature: [u8; 64] = certificate
            .signature
            .as_slice()
            .try_into()
            .map_err(|_| CertificateError::Malformed)?;
        identity_key
            .verify_strict(
                &certificate_payload(identity_key.as_bytes(), device_key.as_bytes()),
                &Signature::from_bytes(&signature),
            )
            .map_err(|_| CertificateError::BadSignature)?;
        Ok(Self {
            identity_key,
            device_key,
            signature,
        })
    }

    /// Checks a certificate in its compact form (as carried in an MLS credential).
    pub fn from_compact(bytes: &[u8]) -> Result<Self, CertificateError> {
        if bytes.len() != CERTIFICATE_LEN {
            return Err(CertificateError::Malformed);
        }
        Self::verify(&wire::DeviceCertificate {
            identity_key: bytes[..32].to_vec(),
            device_key: bytes[32..64].to_vec(),
            signature: bytes[64..].to_vec(),
        })
    }

    pub fn to_compact(&self) -> Vec<u8> {
        [
            self.identity_key.as_bytes().as_slice(),
            self.device_key.as_bytes(),
            &self.signature,
        ]
        .concat()
    }

    pub fn to_wire(&self) -> wire::DeviceCertificate {
        wire::DeviceCertificate {
            identity_key: self.identity_key.as_bytes().to_vec(),
            device_key: self.device_key.as_bytes().to_vec(),
            signature: self.signature.to_vec(),
        }
    }

    pub fn identity_key(&self) -> &[u8; 32] {
        self.identity_key.as_bytes()
    }

    pub fn device_key(&self) -> &[u8; 32] {
        self.device_key.as_bytes()
    }

    pub fn account_id(&self) -> AccountId {
        AccountId::from_identity_key(self.identity_key.as_bytes())
    }

    pub fn device_id(&self) -> DeviceId {
        DeviceId::from_device_key(self.device_key.as_bytes())
    }

    pub fn identity_fingerprint(&self) -> IdentityFingerprint {
        IdentityFingerprint::of(self.identity_key.as_bytes())
    }

    /// Checks the device key's signature over a server challenge.
    pub fn verify_auth(
        &self,
        server_certificate_sha256: &[u8; 32],
        nonce: &[u8],
        signature: &[u8],
    ) -> bool {
        verify_auth(
            self.device_key.as_bytes(),
            server_certificate_sha256,
            nonce,
            signature,
        )
    }
}

/// Checks a device key's signature over a server challenge.
pub fn verify_auth(
    device_key: &[u8; 32],
    server_certificate_sha256: &[u8; 32],
    nonce: &[u8],
    signature: &[u8],
) -> bool {
    verify_signature(
        device_key,
        &auth_payload(server_certificate_sha256, nonce),
        signature,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::{Signer, SigningKey};

    fn certificate(identity: &SigningKey, device: &SigningKey) -> wire::DeviceCertificate {
        let payload = certificate_payload(
            identity.verifying_key().as_bytes(),
            device.verifying_key().as_bytes(),
        );
        wire::DeviceCertificate {
            identity_key: identity.verifying_key().as_bytes().to_vec(),
            device_key: device.verifying_key().as_bytes().to_vec(),
            signature: identity.sign(&payload).to_bytes().to_vec(),
        }
    }

    #[test]
    fn accepts_a_genuine_certificate_and_round_trips_compact_form() {
        let identity = SigningKey::from_bytes(&[1; 32]);
        let device = SigningKey::from_bytes(&[2; 32]);
        let verified = VerifiedCertificate::verify(&certificate(&identity, &device)).unwrap();
        let compact = verified.to_compact();
        assert_eq!(compact.len(), CERTIFICATE_LEN);
        assert_eq!(
            VerifiedCertificate::from_compact(&compact).unwrap(),
            verified
        );
    }

    #[test]
    fn rejects_a_certificate_signed_by_another_identity() {
        let identity = SigningKey::from_bytes(&[1; 32]);
        let device = SigningKey::from_bytes(&[2; 32]);
        let thief = SigningKey::from_bytes(&[3; 32]);
        let mut forged = certificate(&thief, &device);
        forged.identity_key = identity.verifying_key().as_bytes().to_vec();
        assert_eq!(
            VerifiedCertificate::verify(&forged),
            Err(CertificateError::BadSignature)
        );
    }

    #[test]
    fn rejects_malformed_certificates() {
        assert_eq!(
            VerifiedCertificate::from_compact(&[0; 10]),
            Err(CertificateError::Malformed)
        );
        let identity = SigningKey::from_bytes(&[1; 32]);
        let device = SigningKey::from_bytes(&[2; 32]);
        let mut bad = certificate(&identity, &device);
        bad.signature.pop();
        assert_eq!(
            VerifiedCertificate::verify(&bad),
            Err(CertificateError::Malformed)
        );
    }

    #[test]
    fn auth_signatures_are_bound_to_server_and_nonce() {
        let device = SigningKey::from_bytes(&[2; 32]);
        let server = [5; 32];
        let signature = device.sign(&auth_payload(&server, b"nonce")).to_bytes();
        let key = device.verifying_key().to_bytes();
        assert!(verify_auth(&key, &server, b"nonce", &signature));
        assert!(!verify_auth(&key, &server, b"other", &signature));
        assert!(!verify_auth(&key, &[6; 32], b"nonce", &signature));
    }
}
