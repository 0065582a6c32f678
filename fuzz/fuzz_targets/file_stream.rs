//! `miyu_crypto::file::Opener`: a downloaded file's ciphertext, which the server (or a sender)
//! controls entirely. Must not panic, and must never hand unauthenticated bytes to its sink.
#![no_main]

use libfuzzer_sys::fuzz_target;
use miyu_crypto::file::{FileCipher, FileKey, Layout, Opener};

fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else {
        return;
    };
    let key = FileKey::from_bytes([7; 32]);
    let layout = Layout::new(rest.len() as u64 % 20_000, 4096).unwrap();
    let mut opener = Opener::new(FileCipher::new(&key, layout), 0);
    let mut delivered = 0u64;
    for piece in rest.chunks(usize::from(split).max(1)) {
        let fed = opener.feed(piece, &mut |_, plaintext| {
            delivered += plaintext.len() as u64;
            Ok(())
        });
        if fed.is_err() {
            break;
        }
    }
    // Random bytes never authenticate under the key: nothing may come out.
    assert_eq!(delivered, 0);
    let _ = opener.finish();
});
