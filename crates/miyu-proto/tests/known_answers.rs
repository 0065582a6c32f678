//! Known-answer tests: fixed inputs and the exact bytes and text Miyu must derive from them.
//! Another implementation of the protocol can check itself against `known_answers.txt`; a
//! change here is a wire-format change and needs a new protocol version.

use miyu_proto::cert::{auth_payload, certificate_payload};
use miyu_proto::frame;
use miyu_proto::wire::{self, client_frame::Body as Request};
use miyu_proto::{AccountId, DeviceId, IdentityFingerprint, InviteLink, ServerAddress};

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Computes the value named `kind` from the test inputs.
fn derive(kind: &str) -> String {
    let identity_key = [0x11u8; 32];
    let device_key = [0x22u8; 32];
    let server = ServerAddress::new("127.0.0.1", 7443, [0x33; 32]).expect("valid address");
    match kind {
        "account_id" => AccountId::from_identity_key(&identity_key).to_string(),
        "device_id" => DeviceId::from_device_key(&device_key).to_string(),
        "identity_fingerprint" => IdentityFingerprint::of(&identity_key).to_string(),
        "certificate_payload" => hex(&certificate_payload(&identity_key, &device_key)),
        "auth_payload" => hex(&auth_payload(&[0x33; 32], &[0x44; 32])),
        "server_address" => server.to_string(),
        "invite_link" => InviteLink {
            server,
            account: AccountId::from_identity_key(&identity_key),
            identity: IdentityFingerprint::of(&identity_key),
            token: [0x55; 32],
            group: false,
        }
        .to_string(),
        "hello_frame" => hex(&frame::encode(&wire::ClientFrame {
            version: frame::PROTOCOL_VERSION,
            request_id: 1,
            body: Some(Request::Hello(wire::Hello { versions: vec![1] })),
        })),
        "post_frame" => hex(&frame::encode(&wire::ClientFrame {
            version: frame::PROTOCOL_VERSION,
            request_id: 300,
            body: Some(Request::Post(wire::Post {
                group_id: vec![0x66; 16],
                epoch: 1,
                kind: wire::EntryKind::Application as i32,
                payload: vec![0x77; 4],
                expires_at: 0,
                next_posting_key: Vec::new(),
            })),
        })),
        "username_hash" => hex(&"@Miyu_Test".parse::<miyu_proto::Username>().unwrap().hash()),
        "recovery_payload" => hex(&miyu_proto::cert::recovery_payload(
            &[0x66; 32],
            &[0x77; 32],
            b"sealed",
        )),
        other => panic!("unknown vector kind {other}"),
    }
}

#[test]
fn every_known_answer_matches() {
    let vectors = include_str!("known_answers.txt");
    let mut checked = 0;
    for line in vectors
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
    {
        let (kind, expected) = line.split_once(' ').expect("`kind value` per line");
        assert_eq!(derive(kind), expected.trim(), "vector {kind}");
        checked += 1;
    }
    assert_eq!(checked, 11, "every vector kind is in the file");
}
