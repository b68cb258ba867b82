//! Hostile input: no bytes make `verify` panic, and the fuzz corpus
//! (`fuzz/corpus/signature_bundle`, the fuzz target of the same name drives it with
//! cargo-fuzz) replays on stable Rust.

mod common;

use common::{bundle, cases, now};
use proptest::prelude::*;
use veraid::{MAX_BUNDLE_OCTETS, Period, TrustAnchors, Verification, VerifyError, verify};

fn check(data: &[u8]) -> Result<veraid::Verified, VerifyError> {
    static ANCHORS: std::sync::OnceLock<TrustAnchors> = std::sync::OnceLock::new();
    let anchors = ANCHORS.get_or_init(|| {
        let line = common::vectors()["trust_anchors"][0]
            .as_str()
            .expect("anchor");
        TrustAnchors::parse(line).expect("anchor")
    });
    let now = i64::try_from(now()).expect("i64");
    let verification = Verification {
        service: "1.3.6.1.4.1.58708.2.0",
        period: Period::new(now - 90 * 86_400, now),
        now,
        anchors,
    };
    let first = verify(data, &verification);
    assert_eq!(first, verify(data, &verification), "verdicts differ");
    first
}

#[test]
fn the_fuzz_corpus_replays() {
    let folder =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/signature_bundle");
    let mut seen = 0;
    for entry in std::fs::read_dir(&folder).expect("corpus folder") {
        let data = std::fs::read(entry.expect("entry").path()).expect("file");
        let _ = check(&data);
        seen += 1;
    }
    assert!(seen >= 67, "{seen} corpus files");
}

#[test]
fn oversized_bundles_are_refused_before_parsing() {
    let (_, case) = cases()
        .find(|(n, _)| *n == "valid_user_signed")
        .expect("case");
    let mut data = bundle(case);
    data.resize(MAX_BUNDLE_OCTETS + 1, 0);
    assert_eq!(check(&data), Err(VerifyError::TooLarge));
}

fn valid_bundles() -> Vec<Vec<u8>> {
    [
        "valid_user_signed",
        "dnssec_alg13_ecdsap256sha256",
        "org_signature_attributed_to_user",
    ]
    .iter()
    .map(|name| bundle(cases().find(|(n, _)| n == name).expect("case").1))
    .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let _ = check(&data);
    }

    #[test]
    fn mutated_real_bundles_never_panic(
        which in 0usize..3,
        edits in proptest::collection::vec((any::<usize>(), any::<u8>(), 0u8..3), 1..8),
    ) {
        let mut data = valid_bundles().swap_remove(which);
        for (at, byte, kind) in edits {
            let at = at % (data.len() + 1);
            match kind {
                0 if at < data.len() => data[at] = byte,
                1 => data.insert(at, byte),
                _ if at < data.len() => { data.remove(at); }
                _ => {}
            }
        }
        let _ = check(&data);
    }

    #[test]
    fn truncated_real_bundles_are_refused(which in 0usize..3, keep in 0usize..8000) {
        let data = valid_bundles().swap_remove(which);
        let keep = keep % data.len();
        prop_assert!(check(&data[..keep]).is_err());
    }
}
