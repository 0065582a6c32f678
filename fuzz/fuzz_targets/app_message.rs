//! `miyu_proto::wire::AppMessage`: the plaintext inside an MLS application message, written by
//! another member. Must not panic; a message that decodes must round-trip.
#![no_main]

use libfuzzer_sys::fuzz_target;
use miyu_proto::wire::AppMessage;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let Ok(message) = AppMessage::decode(data) else {
        return;
    };
    let again = AppMessage::decode(message.encode_to_vec().as_slice())
        .expect("a re-encoded app message decodes");
    assert_eq!(again, message);
});
