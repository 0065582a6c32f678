//! `miyu_proto::LinkCode` parsing: codes are pasted or scanned by users. A code that parses
//! must print as a code that parses to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use miyu_proto::LinkCode;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(code) = text.parse::<LinkCode>() else {
        return;
    };
    let printed = code.to_string();
    let again = printed.parse::<LinkCode>().expect("a printed link code parses");
    assert!(again == code, "round trip changed the code");
});
