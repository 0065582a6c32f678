//! Known-answer tests of the keys a recovery key gives: fixed inputs and the exact bytes Miyu
//! must derive from them, listed in `known_answers.txt`. A change here makes every recovery key
//! already written down useless.

use miyu_crypto::recovery::{RecoveryKey, RecoverySecrets};
use miyu_proto::AccountId;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Computes the value named `kind` from the test inputs.
fn derive(kind: &str) -> String {
    let key = RecoveryKey::from_bytes(core::array::from_fn(|i| i as u8));
    let account = AccountId::from_bytes(&[0x11; 16]).expect("16 bytes make an account id");
    let secrets = RecoverySecrets::derive(&key, None, &account).expect("the keys derive");
    match kind {
        "locator" => hex(&key.locator(&account)),
        "auth_key" => hex(secrets.auth_key()),
        "verifier" => hex(&secrets.verifier()),
        other => panic!("unknown vector kind {other}"),
    }
}

#[test]
fn every_known_answer_matches() {
    let vectors = include_str!("known_answers.txt");
    let mut checked = 0;
    for line in vectors
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
    {
        let (kind, expected) = line.split_once(' ').expect("`kind value` per line");
        assert_eq!(derive(kind), expected.trim(), "vector {kind}");
        checked += 1;
    }
    assert_eq!(checked, 3, "every vector kind is in the file");
}
