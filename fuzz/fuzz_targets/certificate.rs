//! `miyu_proto::cert::VerifiedCertificate::from_compact`: the device certificate carried in
//! every MLS credential. Must not panic; a certificate that verifies must round-trip.
#![no_main]

use libfuzzer_sys::fuzz_target;
use miyu_proto::cert::VerifiedCertificate;

fuzz_target!(|data: &[u8]| {
    if let Ok(certificate) = VerifiedCertificate::from_compact(data) {
        assert_eq!(certificate.to_compact(), data);
        assert_eq!(
            VerifiedCertificate::verify(&certificate.to_wire()).as_ref(),
            Ok(&certificate)
        );
    }
});
