//! MLS bytes as a client receives them from the server: `miyu_crypto::mls::process` (a group
//! log entry), `miyu_crypto::mls::join_group` (an inbox entry), and the sealed ratchet tree a
//! group's Welcome names (downloaded from the server). All must return, never panic, whatever
//! the bytes.
//!
//! The two clients are set up once per process, like the 1:1 conversation of the unit test in
//! `crates/miyu-crypto/src/mls.rs`: Bob creates a group with Alice's key package and Alice
//! joins it. Each input is then processed as a message of Alice's group, and offered as a
//! Welcome to a third device that holds an unused key package.
#![no_main]

use std::cell::RefCell;

use libfuzzer_sys::fuzz_target;
use miyu_crypto::identity::AccountKeys;
use miyu_crypto::mls::{self, Provider};
use openmls_sqlite_storage::Connection;

type Target = Box<dyn FnMut(&[u8])>;

/// A migrated in-memory database that lives as long as the process, so providers borrowing it
/// can be kept between inputs.
fn database() -> &'static Connection {
    let mut connection = Connection::open_in_memory().expect("in-memory SQLite opens");
    mls::migrate(&mut connection).expect("OpenMLS tables are created");
    Box::leak(Box::new(connection))
}

fn keys(seed: u8) -> AccountKeys {
    AccountKeys::from_secrets(&[seed; 32], &[seed.wrapping_add(100); 32]).expect("fixed keys load")
}

fn setup() -> Target {
    let (alice, bob, carol) = (keys(1), keys(2), keys(3));
    let carol_db = database();
    let (alice_mls, bob_mls, carol_mls) = (
        Provider::new(database()),
        Provider::new(database()),
        Provider::new(carol_db),
    );

    let package = mls::new_key_package(&alice_mls, &alice, false).expect("key package");
    let package = mls::check_key_package(&bob_mls, &package, alice.certificate())
        .expect("key package checks");
    let created = mls::create_group(
        &bob_mls,
        &bob,
        &[9; 16],
        &[package],
        mls::Tree::InWelcome,
    )
    .expect("group created");
    let mut group = mls::join_group(&alice_mls, &created.welcome, None)
        .expect("Alice joins")
        .group;
    // Carol holds a key package no Welcome has used yet, so a Welcome's lookup has something
    // to find; Bob makes a Welcome for it (in a second group) to serve as a seed.
    let package = mls::new_key_package(&carol_mls, &carol, false).expect("key package");
    let package = mls::check_key_package(&bob_mls, &package, carol.certificate())
        .expect("key package checks");
    let welcome = mls::create_group(
        &bob_mls,
        &bob,
        &[10; 16],
        std::slice::from_ref(&package),
        mls::Tree::InWelcome,
    )
    .expect("group created")
    .welcome;
    // And a group's Welcome whose tree is served apart, to which each input is offered as the
    // downloaded tree.
    let served = mls::create_group(&bob_mls, &bob, &[11; 32], &[package], mls::Tree::Served)
        .expect("group created");
    let served_welcome = served.welcome;
    let served_len = served.tree.as_ref().expect("a served tree").plaintext_len;

    // A message the harness knows Alice accepts, to check the setup and to serve as a seed.
    let mut bob_group = created.group;
    let application =
        mls::encrypt(&bob_mls, &bob, &mut bob_group, b"hello alice").expect("encrypts");
    assert!(matches!(
        mls::process(&alice_mls, &mut group, &application, false),
        Ok(mls::Incoming::Application { .. })
    ));

    // `MIYU_FUZZ_SEEDS=DIR` writes valid inputs there, for use as a starting corpus.
    if let Some(dir) = std::env::var_os("MIYU_FUZZ_SEEDS") {
        let dir = std::path::PathBuf::from(dir);
        std::fs::create_dir_all(&dir).expect("seed directory");
        std::fs::write(dir.join("welcome"), &welcome).expect("seed written");
        std::fs::write(dir.join("application"), &application).expect("seed written");
    }

    Box::new(move |data: &[u8]| {
        // Bob's side is kept only so that its leaked database stays reachable.
        let _ = &bob_mls;
        let _ = mls::process(&alice_mls, &mut group, data, true);
        // As the client does with a failed join, every join is rolled back, so that Carol's
        // key package stays for the next input.
        carol_db.execute_batch("SAVEPOINT attempt").expect("savepoint");
        let _ = mls::join_group(&carol_mls, data, None);
        carol_db
            .execute_batch("ROLLBACK TO attempt; RELEASE attempt")
            .expect("rollback");
        carol_db.execute_batch("SAVEPOINT attempt").expect("savepoint");
        let tree = mls::SealedTree {
            ciphertext: data,
            plaintext_len: served_len.min(data.len().saturating_sub(16) as u64),
        };
        let _ = mls::join_group(&carol_mls, &served_welcome, Some(tree));
        carol_db
            .execute_batch("ROLLBACK TO attempt; RELEASE attempt")
            .expect("rollback");
    })
}

thread_local! {
    // Leaked rather than owned by the thread: dropping it at exit would leave the leaked
    // databases unreachable, which LeakSanitizer reports as a leak.
    static TARGET: &'static RefCell<Target> = Box::leak(Box::new(RefCell::new(setup())));
}

fuzz_target!(
    init: {
        TARGET.with(|_| ());
    },
    |data: &[u8]| {
        TARGET.with(|target| (target.borrow_mut())(data));
    }
);
