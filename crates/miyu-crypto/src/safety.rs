//! Safety numbers: 60 digits both people see identically and compare out of band (in person,
//! or by reading them over a call) to rule out a key substituted by the server.
//!
//! Each side contributes 30 digits derived from its identity key and account id by 5,200
//! iterations of SHA-512 (the iterated-hash construction of Signal's numeric fingerprints); the
//! two halves are sorted so both people get the same number.

use miyu_proto::cert::VerifiedCertificate;
use sha2::{Digest, Sha512};

const ITERATIONS: usize = 5200;
const VERSION: [u8; 2] = [0, 1];

fn half(identity_key: &[u8; 32], account: &[u8; 16]) -> String {
    let mut hash = Sha512::new()
        .chain_update(VERSION)
        .chain_update(identity_key)
        .chain_update(account)
        .finalize();
    for _ in 0..ITERATIONS {
        hash = Sha512::new()
            .chain_update(hash)
            .chain_update(identity_key)
            .finalize();
    }
    hash[..30]
        .chunks_exact(5)
        .map(|chunk| {
            let value = chunk
                .iter()
                .fold(0u64, |acc, byte| (acc << 8) | u64::from(*byte));
            format!("{:05}", value % 100_000)
        })
        .collect()
}

/// The safety number of a conversation between two accounts, as 12 groups of 5 digits.
pub fn safety_number(ours: &VerifiedCertificate, theirs: &VerifiedCertificate) -> String {
    let mut halves = [
        half(ours.identity_key(), ours.account_id().as_bytes()),
        half(theirs.identity_key(), theirs.account_id().as_bytes()),
    ];
    halves.sort();
    let digits = halves.concat();
    digits
        .as_bytes()
        .chunks(5)
        .map(|group| String::from_utf8_lossy(group).into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::AccountKeys;

    #[test]
    fn both_sides_see_the_same_number_and_it_changes_with_a_key() {
        let alice = AccountKeys::from_secrets(&[1; 32], &[2; 32]).unwrap();
        let bob = AccountKeys::from_secrets(&[3; 32], &[4; 32]).unwrap();
        let mallory = AccountKeys::from_secrets(&[5; 32], &[6; 32]).unwrap();
        let number = safety_number(alice.certificate(), bob.certificate());
        assert_eq!(
            number,
            safety_number(bob.certificate(), alice.certificate())
        );
        assert_eq!(number.split(' ').count(), 12);
        assert!(number.replace(' ', "").bytes().all(|b| b.is_ascii_digit()));
        assert_ne!(
            number,
            safety_number(alice.certificate(), mallory.certificate())
        );
    }

    #[test]
    fn a_new_device_does_not_change_the_number() {
        let alice = AccountKeys::from_secrets(&[1; 32], &[2; 32]).unwrap();
        let alice_laptop = AccountKeys::from_secrets(&[1; 32], &[9; 32]).unwrap();
        let bob = AccountKeys::from_secrets(&[3; 32], &[4; 32]).unwrap();
        assert_eq!(
            safety_number(alice.certificate(), bob.certificate()),
            safety_number(alice_laptop.certificate(), bob.certificate())
        );
    }
}

#[cfg(test)]
mod known_answers {
    use super::*;
    use crate::identity::AccountKeys;

    #[test]
    fn safety_number_of_fixed_keys() {
        let alice = AccountKeys::from_secrets(&[1; 32], &[2; 32]).unwrap();
        let bob = AccountKeys::from_secrets(&[3; 32], &[4; 32]).unwrap();
        assert_eq!(
            safety_number(alice.certificate(), bob.certificate()),
            "09415 57352 42349 20242 83291 59188 98293 80957 61301 27122 96284 17261"
        );
    }
}
