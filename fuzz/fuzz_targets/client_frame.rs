//! `miyu_proto::frame::decode_client_frame`: what the server does with every binary WebSocket
//! message. A frame that decodes must survive re-encoding unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use miyu_proto::frame;

fuzz_target!(|data: &[u8]| {
    let Ok(decoded) = frame::decode_client_frame(data) else {
        return;
    };
    let encoded = frame::encode(&decoded);
    let again = frame::decode_client_frame(&encoded).expect("a re-encoded client frame decodes");
    assert_eq!(again, decoded);
});
