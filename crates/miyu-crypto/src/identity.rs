//! An account's identity key and one device's key, and the certificate that binds them.

use ed25519_dalek::{Signer as _, SigningKey};
use miyu_proto::cert::{self, VerifiedCertificate};
use miyu_proto::wire;
use rand::{CryptoRng, RngCore};
use zeroize::Zeroizing;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    #[error("stored key material is malformed")]
    Malformed,
    #[error("the certificate is not for this device's key")]
    WrongDevice,
    #[error("only the device holding the account's identity key can do this")]
    NoIdentity,
}

/// The identity key of the account (on the device that created it, or restored it) and the
/// key of this device. A linked device holds only its own key and the certificate the identity
/// key gave it. Secret halves are wiped from memory when dropped.
pub struct AccountKeys {
    identity: Option<SigningKey>,
    device: SigningKey,
    certificate: VerifiedCertificate,
}

impl std::fmt::Debug for AccountKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccountKeys")
            .field("account", &self.certificate.account_id())
            .finish_non_exhaustive()
    }
}

fn certify(
    identity: &SigningKey,
    device: &SigningKey,
) -> Result<VerifiedCertificate, IdentityError> {
    let identity_key = identity.verifying_key().to_bytes();
    let device_key = device.verifying_key().to_bytes();
    let signature = identity.sign(&cert::certificate_payload(&identity_key, &device_key));
    VerifiedCertificate::verify(&wire::DeviceCertificate {
        identity_key: identity_key.to_vec(),
        device_key: device_key.to_vec(),
        signature: signature.to_bytes().to_vec(),
    })
    .map_err(|_| IdentityError::Malformed)
}

impl AccountKeys {
    /// Makes a new account with its first device.
    pub fn generate<R: RngCore + CryptoRng>(rng: &mut R) -> Self {
        let identity = SigningKey::generate(rng);
        let device = SigningKey::generate(rng);
        let certificate = certify(&identity, &device).expect("a fresh certificate verifies");
        Self {
            identity: Some(identity),
            device,
            certificate,
        }
    }

    /// A linked device's keys: its own key and the certificate the account's identity key
    /// gave it, which must be for that key.
    pub fn linked(device: &[u8], certificate: VerifiedCertificate) -> Result<Self, IdentityError> {
        let device: &[u8; 32] = device.try_into().map_err(|_| IdentityError::Malformed)?;
        let device = SigningKey::from_bytes(device);
        if device.verifying_key().as_bytes() != certificate.device_key() {
            return Err(IdentityError::WrongDevice);
        }
        Ok(Self {
            identity: None,
            device,
            certificate,
        })
    }

    /// Whether this device holds the account's identity key (and so can link and revoke).
    pub fn has_identity(&self) -> bool {
        self.identity.is_some()
    }

    fn identity(&self) -> Result<&SigningKey, IdentityError> {
        self.identity.as_ref().ok_or(IdentityError::NoIdentity)
    }

    /// Certifies another device's key for this account.
    pub fn certify_device(
        &self,
        device_key: &[u8; 32],
    ) -> Result<VerifiedCertificate, IdentityError> {
        let identity = self.identity()?;
        let identity_key = identity.verifying_key().to_bytes();
        let signature = identity.sign(&cert::certificate_payload(&identity_key, device_key));
        VerifiedCertificate::verify(&wire::DeviceCertificate {
            identity_key: identity_key.to_vec(),
            device_key: device_key.to_vec(),
            signature: signature.to_bytes().to_vec(),
        })
        .map_err(|_| IdentityError::Malformed)
    }

    /// The identity key's signature revoking one of the account's devices.
    pub fn sign_revocation(
        &self,
        device_id: &miyu_proto::DeviceId,
    ) -> Result<[u8; 64], IdentityError> {
        Ok(self
            .identity()?
            .sign(&cert::revoke_payload(device_id))
            .to_bytes())
    }

    /// The identity key's signature setting the account's recovery bundle (its verifier,
    /// locator and sealed bundle), so that no other device of the account can replace it.
    pub fn sign_recovery(
        &self,
        verifier: &[u8; 32],
        locator: &[u8; 32],
        bundle: &[u8],
    ) -> Result<[u8; 64], IdentityError> {
        Ok(self
            .identity()?
            .sign(&cert::recovery_payload(verifier, locator, bundle))
            .to_bytes())
    }

    /// Rebuilds the keys from their stored secret halves.
    pub fn from_secrets(identity: &[u8], device: &[u8]) -> Result<Self, IdentityError> {
        let identity: &[u8; 32] = identity.try_into().map_err(|_| IdentityError::Malformed)?;
        let device: &[u8; 32] = device.try_into().map_err(|_| IdentityError::Malformed)?;
        let identity = SigningKey::from_bytes(identity);
        let device = SigningKey::from_bytes(device);
        let certificate = certify(&identity, &device)?;
        Ok(Self {
            identity: Some(identity),
            device,
            certificate,
        })
    }

    /// The identity key's secret half, on the device that holds it.
    pub fn identity_secret(&self) -> Option<Zeroizing<[u8; 32]>> {
        self.identity
            .as_ref()
            .map(|identity| Zeroizing::new(identity.to_bytes()))
    }

    pub fn device_secret(&self) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(self.device.to_bytes())
    }

    pub fn certificate(&self) -> &VerifiedCertificate {
        &self.certificate
    }

    /// Signs a server's authentication challenge with the device key.
    pub fn sign_auth(&self, server_certificate_sha256: &[u8; 32], nonce: &[u8]) -> Vec<u8> {
        self.device
            .sign(&cert::auth_payload(server_certificate_sha256, nonce))
            .to_bytes()
            .to_vec()
    }

    /// Signs an HTTP request to the server's blob endpoints. Only payloads built by
    /// [`miyu_proto::blob::HttpAuth::payload`] are signed: they start with their own context, so
    /// no other kind of signature can be obtained this way.
    pub fn sign_http_request(&self, payload: &[u8]) -> [u8; 64] {
        assert!(
            payload.starts_with(miyu_proto::blob::HTTP_AUTH_CONTEXT),
            "not an HTTP request payload"
        );
        self.device.sign(payload).to_bytes()
    }

    pub(crate) fn device_key(&self) -> &SigningKey {
        &self.device
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_survive_a_round_trip_through_their_secrets() {
        let keys = AccountKeys::generate(&mut rand::rngs::OsRng);
        let again =
            AccountKeys::from_secrets(&*keys.identity_secret().unwrap(), &*keys.device_secret())
                .unwrap();
        assert_eq!(again.certificate(), keys.certificate());
        assert!(AccountKeys::from_secrets(&[1; 3], &[2; 32]).is_err());
    }

    #[test]
    fn auth_signature_verifies_against_the_certificate() {
        let keys = AccountKeys::generate(&mut rand::rngs::OsRng);
        let signature = keys.sign_auth(&[7; 32], b"nonce");
        assert!(
            keys.certificate()
                .verify_auth(&[7; 32], b"nonce", &signature)
        );
    }

    #[test]
    fn a_linked_device_holds_a_certificate_for_its_own_key_only() {
        let account = AccountKeys::generate(&mut rand::rngs::OsRng);
        let device = SigningKey::generate(&mut rand::rngs::OsRng);
        let certificate = account
            .certify_device(device.verifying_key().as_bytes())
            .unwrap();
        assert_eq!(certificate.account_id(), account.certificate().account_id());
        let linked = AccountKeys::linked(&device.to_bytes(), certificate.clone()).unwrap();
        assert!(!linked.has_identity());
        assert!(linked.identity_secret().is_none());
        assert_eq!(linked.certificate(), &certificate);
        // It can neither certify nor revoke.
        assert!(matches!(
            linked.certify_device(&[9; 32]),
            Err(IdentityError::NoIdentity)
        ));
        assert!(linked.sign_revocation(&certificate.device_id()).is_err());
        assert!(linked.sign_recovery(&[1; 32], &[2; 32], b"sealed").is_err());
        // Another key cannot wear this certificate.
        let other = SigningKey::generate(&mut rand::rngs::OsRng);
        assert!(matches!(
            AccountKeys::linked(&other.to_bytes(), certificate.clone()),
            Err(IdentityError::WrongDevice)
        ));
        // The account's revocation verifies under its identity key.
        let signature = account.sign_revocation(&certificate.device_id()).unwrap();
        assert!(cert::verify_revocation(
            certificate.identity_key(),
            &certificate.device_id(),
            &signature
        ));
        // So does its recovery bundle's, and only over what it signed.
        let signature = account
            .sign_recovery(&[1; 32], &[2; 32], b"sealed")
            .unwrap();
        let identity_key = certificate.identity_key();
        assert!(cert::verify_recovery(
            identity_key,
            &[1; 32],
            &[2; 32],
            b"sealed",
            &signature
        ));
        for (verifier, locator, bundle) in [
            ([9; 32], [2; 32], b"sealed".as_slice()),
            ([1; 32], [9; 32], b"sealed"),
            ([1; 32], [2; 32], b"spoilt"),
        ] {
            assert!(!cert::verify_recovery(
                identity_key,
                &verifier,
                &locator,
                bundle,
                &signature
            ));
        }
        assert!(!cert::verify_recovery(
            identity_key,
            &[1; 32],
            &[2; 32],
            b"sealed",
            &signature[..63]
        ));
    }
}
