//! The server must never be able to read messages: it may not depend on the client's
//! secret-handling crates or on MLS. This test fails if someone adds such a dependency.

#[test]
fn server_depends_on_no_secret_handling_or_mls_crate() {
    let manifest = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"))
        .expect("the server's manifest is readable");
    for forbidden in ["miyu-crypto", "miyu-client", "openmls"] {
        assert!(
            !manifest.contains(forbidden),
            "miyu-server must not depend on {forbidden}"
        );
    }
}

#[test]
fn protocol_crate_does_no_io_and_holds_no_secrets() {
    let manifest = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../miyu-proto/Cargo.toml"
    ))
    .expect("the protocol crate's manifest is readable");
    for forbidden in ["tokio", "rusqlite", "openmls", "rand"] {
        assert!(
            !manifest
                .lines()
                .any(|line| line.trim_start().starts_with(forbidden)),
            "miyu-proto must stay pure; it depends on {forbidden}"
        );
    }
}
