//! `miyu_proto::frame::decode_server_frame`: what the client does with every binary WebSocket
//! message. A frame that decodes must survive re-encoding unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use miyu_proto::frame;

fuzz_target!(|data: &[u8]| {
    let Ok(decoded) = frame::decode_server_frame(data) else {
        return;
    };
    let encoded = frame::encode(&decoded);
    let again = frame::decode_server_frame(&encoded).expect("a re-encoded server frame decodes");
    assert_eq!(again, decoded);
});
