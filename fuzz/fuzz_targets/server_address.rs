//! `miyu_proto::ServerAddress` parsing. An address that parses must print as an address that
//! parses to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use miyu_proto::ServerAddress;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(address) = text.parse::<ServerAddress>() else {
        return;
    };
    let printed = address.to_string();
    let again = printed
        .parse::<ServerAddress>()
        .expect("a printed server address parses");
    assert_eq!(again, address, "round trip changed the address: {printed}");
});
