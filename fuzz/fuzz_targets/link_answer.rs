//! What a device being linked takes from a server mailbox: `miyu_crypto::link::NewDevice::open`
//! (HPKE ciphertext parsing and opening) and the protobuf answers inside. Must return, never
//! panic, whatever the bytes.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use miyu_crypto::link::{NewDevice, Step};
use miyu_proto::wire;
use prost::Message as _;

fn device() -> &'static NewDevice {
    static DEVICE: OnceLock<NewDevice> = OnceLock::new();
    DEVICE.get_or_init(|| NewDevice::generate().expect("keys"))
}

fuzz_target!(|data: &[u8]| {
    for step in [Step::Certificate, Step::History] {
        let _ = device().open(step, data);
    }
    let _ = wire::LinkPackage::decode(data);
    let _ = wire::LinkHistory::decode(data);
});
