//! `Verifier` remembers organisations, and that never changes an outcome: every vector,
//! in two orders, twice over, gives what the memoryless `verify` gives; what depends on
//! time is judged afresh; the memory stays within its bounds.

mod common;

use common::{bundle, cases, unix_seconds, vectors};
use veraid::testing::{KeyPair, MockHierarchy};
use veraid::{Period, TrustAnchors, Verification, Verified, Verifier, VerifyError, verify};

const LETRO: &str = "1.3.6.1.4.1.58708.2.0";
const DAY: i64 = 86_400;

fn anchors() -> TrustAnchors {
    let line = vectors()["trust_anchors"][0].as_str().expect("anchor");
    TrustAnchors::parse(line).expect("anchor")
}

fn period_and_now(case: &serde_json::Value) -> (Period, i64) {
    let at = |v: &serde_json::Value| {
        i64::try_from(unix_seconds(v.as_str().expect("time"))).expect("i64")
    };
    let p = &case["verification_period"];
    (
        Period::new(at(&p["start"]), at(&p["end"])),
        at(&case["now"]),
    )
}

/// The outcome without the cache flag, to compare a remembering verifier with `verify`.
fn outcome(r: Result<Verified, VerifyError>) -> Result<Verified, VerifyError> {
    r.map(|v| Verified {
        from_cache: false,
        ..v
    })
}

#[test]
fn remembering_never_changes_an_outcome() {
    let anchors = anchors();
    let all: Vec<_> = cases().collect();
    let reversed: Vec<_> = all.iter().rev().cloned().collect();
    for order in [all, reversed] {
        let verifier = Verifier::new(anchors.clone());
        let mut hits = 0;
        for _ in 0..2 {
            for (name, case) in &order {
                let (period, now) = period_and_now(case);
                let data = bundle(case);
                let fresh = verify(
                    &data,
                    &Verification {
                        service: LETRO,
                        period,
                        now,
                        anchors: &anchors,
                    },
                );
                let remembered = verifier.verify(&data, LETRO, period, now);
                hits += usize::from(remembered.as_ref().is_ok_and(|v| v.from_cache));
                assert_eq!(outcome(remembered), fresh, "{name}");
            }
        }
        // Most valid bundles share one chain: all but the first are remembered.
        assert!(hits > 60, "{hits} remembered");
    }
}

#[test]
fn a_remembered_chain_must_still_reach_the_window() {
    let now = 1_800_000_000;
    let mut hierarchy = MockHierarchy::new(now);
    let key = KeyPair::generate(2048);
    let org = hierarchy.organisation("example.com", key.clone());
    let verifier = Verifier::new(hierarchy.trust_anchors());
    let sign_at = |t: i64| {
        org.member(Some("alice"), key.clone(), t)
            .sign(b"p", LETRO, Period::new(t - 60, t + DAY))
    };
    let first = verifier
        .verify(&sign_at(now), LETRO, Period::new(now - 90 * DAY, now), now)
        .expect("valid");
    assert!(!first.from_cache);
    let second = verifier
        .verify(&sign_at(now), LETRO, Period::new(now - 90 * DAY, now), now)
        .expect("valid");
    assert!(second.from_cache, "the same organisation again");
    // 200 days on, the hierarchy's RRSIGs (90 days) no longer reach the window: the
    // remembered chain does not count, and validation refuses it afresh.
    let later = now + 200 * DAY;
    let error = verifier
        .verify(
            &sign_at(later),
            LETRO,
            Period::new(later - 90 * DAY, later),
            later,
        )
        .expect_err("refused");
    assert_eq!(error.check(), "dnssec", "{error}");
}

#[test]
fn the_memory_is_bounded() {
    let now = 1_800_000_000;
    let mut hierarchy = MockHierarchy::new(now);
    let key = KeyPair::generate(2048);
    let verifier = Verifier::with_capacity(hierarchy.trust_anchors(), 2, 3);
    for i in 0..5 {
        let org = hierarchy.organisation(&format!("org{i}.example"), key.clone());
        let bundle = org.member(Some("u"), key.clone(), now).sign(
            b"p",
            LETRO,
            Period::new(now - 60, now + DAY),
        );
        let verified = verifier
            .verify(&bundle, LETRO, Period::new(now - DAY, now), now)
            .expect("valid");
        assert!(!verified.from_cache);
    }
    assert_eq!(verifier.remembered(), (2, 3));
    // Nothing is remembered with no capacity.
    let forgetful = Verifier::with_capacity(hierarchy.trust_anchors(), 0, 0);
    let org = hierarchy.organisation("org0.example", key.clone());
    let bundle =
        org.member(Some("u"), key.clone(), now)
            .sign(b"p", LETRO, Period::new(now - 60, now + DAY));
    for _ in 0..2 {
        let v = forgetful
            .verify(&bundle, LETRO, Period::new(now - DAY, now), now)
            .expect("valid");
        assert!(!v.from_cache);
    }
    assert_eq!(forgetful.remembered(), (0, 0));
}
