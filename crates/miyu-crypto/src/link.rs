//! Linking a device to an account: the new device's secrets, and the account's answers sealed
//! to them.
//!
//! The new device makes a device key, an X25519 key pair and a 32-byte secret, and shows them
//! (the private half excepted) as a link code ([`miyu_proto::LinkCode`]). A device of the account
//! that is given the code seals each answer to the code's key with HPKE (RFC 9180, base mode,
//! DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, ChaCha20-Poly1305; info `"miyu link v1"`, the
//! secret and the step as associated data) and leaves it in the server mailbox named
//! SHA-256(`"miyu link mailbox v1"` || secret || step). The server, which never sees the code,
//! can neither find the mailbox ahead of time nor read or forge what is in it.

use ed25519_dalek::SigningKey;
use miyu_proto::LinkCode;
use openmls::prelude::tls_codec::{Deserialize as _, Serialize as _};
use openmls_rust_crypto::RustCrypto;
use openmls_traits::crypto::OpenMlsCrypto;
use openmls_traits::types::{HpkeAeadType, HpkeCiphertext, HpkeConfig, HpkeKdfType, HpkeKemType};
use rand::RngCore;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

const CONFIG: HpkeConfig = HpkeConfig(
    HpkeKemType::DhKem25519,
    HpkeKdfType::HkdfSha256,
    HpkeAeadType::ChaCha20Poly1305,
);
const INFO: &[u8] = b"miyu link v1";
const MAILBOX_CONTEXT: &[u8] = b"miyu link mailbox v1";

/// The steps of a link, each with its own mailbox: the certificate first, then where the
/// history is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Certificate = 1,
    History = 2,
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LinkError {
    #[error("sealing the answer failed")]
    Seal,
    #[error("the answer does not open: it was not made for this link code")]
    Open,
    #[error("the answer is malformed")]
    Malformed,
}

/// The mailbox of one step of the link the secret belongs to.
pub fn mailbox(secret: &[u8; 32], step: Step) -> [u8; 32] {
    Sha256::new()
        .chain_update(MAILBOX_CONTEXT)
        .chain_update(secret)
        .chain_update([step as u8])
        .finalize()
        .into()
}

fn aad(secret: &[u8; 32], step: Step) -> Vec<u8> {
    [INFO, secret.as_slice(), &[step as u8]].concat()
}

/// Seals one answer to the device that showed `code`.
pub fn seal(code: &LinkCode, step: Step, plaintext: &[u8]) -> Result<Vec<u8>, LinkError> {
    RustCrypto::default()
        .hpke_seal(
            CONFIG,
            &code.seal_key,
            INFO,
            &aad(&code.secret, step),
            plaintext,
        )
        .map_err(|_| LinkError::Seal)?
        .tls_serialize_detached()
        .map_err(|_| LinkError::Seal)
}

/// A device waiting to be linked: its own key and the secrets of the code it shows.
pub struct NewDevice {
    device: SigningKey,
    seal_private: Zeroizing<Vec<u8>>,
    seal_public: [u8; 32],
    secret: Zeroizing<[u8; 32]>,
}

impl NewDevice {
    pub fn generate() -> Result<Self, LinkError> {
        let mut rng = rand::rngs::OsRng;
        let mut seed = Zeroizing::new([0u8; 32]);
        rng.fill_bytes(seed.as_mut());
        let pair = RustCrypto::default()
            .derive_hpke_keypair(CONFIG, seed.as_slice())
            .map_err(|_| LinkError::Seal)?;
        let seal_public: [u8; 32] = pair
            .public
            .as_slice()
            .try_into()
            .map_err(|_| LinkError::Seal)?;
        let mut secret = Zeroizing::new([0u8; 32]);
        rng.fill_bytes(secret.as_mut());
        Ok(Self {
            device: SigningKey::generate(&mut rng),
            seal_private: Zeroizing::new(pair.private.to_vec()),
            seal_public,
            secret,
        })
    }

    /// The code this device shows, under the name the user gave it.
    pub fn code(&self, name: &str) -> LinkCode {
        LinkCode {
            device_key: self.device.verifying_key().to_bytes(),
            seal_key: self.seal_public,
            secret: *self.secret,
            name: name.to_string(),
        }
    }

    pub fn mailbox(&self, step: Step) -> [u8; 32] {
        mailbox(&self.secret, step)
    }

    /// Opens an answer taken from the mailbox of `step`.
    pub fn open(&self, step: Step, sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, LinkError> {
        let ciphertext =
            HpkeCiphertext::tls_deserialize_exact(sealed).map_err(|_| LinkError::Malformed)?;
        RustCrypto::default()
            .hpke_open(
                CONFIG,
                &ciphertext,
                &self.seal_private,
                INFO,
                &aad(&self.secret, step),
            )
            .map(Zeroizing::new)
            .map_err(|_| LinkError::Open)
    }

    /// The new device's key, to keep once the account has certified it.
    pub fn device_secret(&self) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(self.device.to_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_device_that_showed_the_code_opens_the_answer_of_its_step() {
        let device = NewDevice::generate().unwrap();
        let code: LinkCode = device.code("laptop").to_string().parse().unwrap();
        assert_eq!(code.device_key, device.device.verifying_key().to_bytes());
        let sealed = seal(&code, Step::Certificate, b"your certificate").unwrap();
        assert_eq!(
            device.open(Step::Certificate, &sealed).unwrap().as_slice(),
            b"your certificate"
        );
        // Not as the other step's answer, not by another device, not altered.
        assert!(matches!(
            device.open(Step::History, &sealed),
            Err(LinkError::Open)
        ));
        let other = NewDevice::generate().unwrap();
        assert!(matches!(
            other.open(Step::Certificate, &sealed),
            Err(LinkError::Open)
        ));
        let mut altered = sealed.clone();
        let last = altered.len() - 1;
        altered[last] ^= 1;
        assert!(device.open(Step::Certificate, &altered).is_err());
        assert!(matches!(
            device.open(Step::Certificate, b"junk"),
            Err(LinkError::Malformed)
        ));
        // An answer sealed for a code with another secret (a guess) does not open either.
        let guessed = LinkCode {
            secret: [0; 32],
            ..code.clone()
        };
        let sealed = seal(&guessed, Step::Certificate, b"x").unwrap();
        assert!(device.open(Step::Certificate, &sealed).is_err());
        // Each step has its own mailbox; mailboxes of two links differ.
        assert_ne!(
            device.mailbox(Step::Certificate),
            device.mailbox(Step::History)
        );
        assert_ne!(
            device.mailbox(Step::Certificate),
            other.mailbox(Step::Certificate)
        );
        assert_eq!(
            device.mailbox(Step::History),
            mailbox(&code.secret, Step::History)
        );
    }
}
