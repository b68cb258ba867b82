#![no_main]
//! Coverage-guided fuzzing of `veraid::verify`: no input makes it panic, and its verdict
//! is the same when asked twice. The verification is that of the interoperability
//! vectors (their trust anchor and time), so that mutations of real bundles get deep.

use veraid::{Period, TrustAnchors, Verification, verify};

const ANCHOR: &str = ". 86400 IN DS 23299 8 2 AB7B803E5336EE64A120DF690A12204B92B90042128DE2D228C7933FFE1D48DA";
/// 2026-12-02T16:27:46Z, when the vectors were made.
const NOW: i64 = 1_796_228_866;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(anchors) = TrustAnchors::parse(ANCHOR) else {
        return;
    };
    let verification = Verification {
        service: "1.3.6.1.4.1.58708.2.0",
        period: Period::new(NOW - 90 * 86_400, NOW),
        now: NOW,
        anchors: &anchors,
    };
    let first = verify(data, &verification);
    assert_eq!(first, verify(data, &verification));
    if first.is_ok() {
        assert!(data.len() <= veraid::MAX_BUNDLE_OCTETS);
    }
});
