//! What recovery reads from people and from the server: `RecoveryKey::parse` (typed or pasted
//! by users) and opening a recovery bundle or a backup segment (handed out by the server). Must
//! return, never panic, whatever the bytes.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use miyu_crypto::recovery::{ChainLink, RecoveryKey, RecoverySecrets};
use miyu_proto::AccountId;

fn secrets() -> &'static RecoverySecrets {
    static SECRETS: OnceLock<RecoverySecrets> = OnceLock::new();
    SECRETS.get_or_init(|| {
        RecoverySecrets::derive(
            &RecoveryKey::from_bytes([7; 32]),
            None,
            &AccountId::from_identity_key(&[1; 32]),
        )
        .expect("keys")
    })
}

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = RecoveryKey::parse(text);
    }
    let _ = secrets().open_bundle(data);
    let backup = secrets().backup_key();
    let _ = backup.open_segment(data, &ChainLink::FIRST);
    let _ = backup.open_segment(
        data,
        &ChainLink {
            index: 1,
            previous: [3; 32],
        },
    );
});
