//! `miyu_client::strip`: images the user picks to send, which may have come from anywhere (a
//! download, another messenger), parsed to remove their metadata. Must not panic; an image that
//! is stripped stays the same kind, and stripping it again changes nothing.
#![no_main]

use libfuzzer_sys::fuzz_target;
use miyu_client::strip::{ImageKind, sniff, strip_metadata};

fuzz_target!(|data: &[u8]| {
    // Every parser gets every input, not only the one its first bytes name, so a parser also
    // sees what the others' signatures would have let through.
    for kind in [ImageKind::Jpeg, ImageKind::Png, ImageKind::Webp] {
        let Ok(stripped) = strip_metadata(kind, data.to_vec()) else {
            continue;
        };
        assert_eq!(sniff(&stripped), Some(kind), "a stripped image keeps its kind");
        let again = strip_metadata(kind, stripped.clone()).expect("a stripped image strips again");
        assert!(again == stripped, "stripping is idempotent");
    }
});
