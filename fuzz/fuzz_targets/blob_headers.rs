//! The blob endpoints' header parsers, which read what any client sends the server:
//! `HttpAuth::parse`, `parse_range` and `BlobId` ids. Must not panic; what parses must
//! round-trip or stay within the resource.
#![no_main]

use libfuzzer_sys::fuzz_target;
use miyu_proto::blob::{BlobId, HttpAuth, parse_range};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(auth) = HttpAuth::parse(text) {
        assert_eq!(HttpAuth::parse(&auth.to_header()), Ok(auth));
    }
    if let Ok(id) = text.parse::<BlobId>() {
        assert_eq!(id.to_string().parse::<BlobId>(), Ok(id));
    }
    let len = data.len() as u64 * 1000;
    if let Ok((start, count)) = parse_range(text, len) {
        assert!(count > 0 && start + count <= len);
    }
});
