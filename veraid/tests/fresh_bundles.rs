//! Fresh bundles from the mock hierarchy (`veraid::testing`): what verifies, and each
//! check refusing what it should, on bundles made now rather than replayed.

use std::sync::OnceLock;

use veraid::testing::{KeyPair, MockHierarchy, Organisation, SigningMember};
use veraid::{Member, Period, SignedBy, Verification, VerifyError, verify};

const LETRO: &str = "1.3.6.1.4.1.58708.2.0";
const NOW: i64 = 1_800_000_000;
const DAY: i64 = 86_400;

struct World {
    hierarchy: MockHierarchy,
    example: Organisation,
    deep: Organisation,
    alice: SigningMember,
    bot: SigningMember,
    keys: Vec<KeyPair>,
}

fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        let keys: Vec<KeyPair> = (0..3).map(|_| KeyPair::generate(2048)).collect();
        let mut hierarchy = MockHierarchy::new(NOW);
        let example = hierarchy.organisation("example.com", keys[0].clone());
        let deep = hierarchy.organisation("letro.chat.example.org", keys[1].clone());
        let alice = example.member(Some("alice"), keys[2].clone(), NOW);
        let bot = example.member(None, keys[2].clone(), NOW);
        World {
            hierarchy,
            example,
            deep,
            alice,
            bot,
            keys,
        }
    })
}

fn check(bundle: &[u8]) -> Result<veraid::Verified, VerifyError> {
    let anchors = world().hierarchy.trust_anchors();
    verify(
        bundle,
        &Verification {
            service: LETRO,
            period: Period::new(NOW - 90 * DAY, NOW),
            now: NOW,
            anchors: &anchors,
        },
    )
}

fn recent() -> Period {
    Period::new(NOW - 300, NOW + 90 * DAY)
}

#[test]
fn a_fresh_member_signature_verifies() {
    let w = world();
    let verified = check(&w.alice.sign(b"plaintext", LETRO, recent())).expect("valid");
    assert_eq!(
        verified.member,
        Member {
            organisation: "example.com".into(),
            user: Some("alice".into())
        }
    );
    assert_eq!(verified.signed_by, SignedBy::Member);
    assert_eq!(verified.plaintext, b"plaintext");
    assert_eq!(verified.period, Period::new(NOW - 300, NOW));
}

#[test]
fn the_bot_and_deep_organisations_and_unicode_names() {
    let w = world();
    let bot = check(&w.bot.sign(b"x", LETRO, recent())).expect("bot");
    assert_eq!(bot.member.user, None);
    assert_eq!(bot.member.veraid_id(), "example.com");
    let bob = w.deep.member(Some("bób 🦄"), w.keys[2].clone(), NOW);
    let verified = check(&bob.sign(b"y", LETRO, recent())).expect("deep");
    assert_eq!(verified.member.veraid_id(), "bób 🦄@letro.chat.example.org");
}

#[test]
fn each_check_refuses_what_it_should() {
    let w = world();
    let bundle = w.alice.sign(b"plaintext", LETRO, recent());
    assert!(matches!(
        check(&w.alice.sign(b"p", "1.2.3", recent())),
        Err(VerifyError::WrongService(s)) if s == "1.2.3"
    ));
    assert_eq!(
        check(&w.alice.sign(b"p", LETRO, Period::new(NOW + 60, NOW + DAY))),
        Err(VerifyError::SignatureOutsidePeriod)
    );
    // The plaintext is the last octets but the signature's: tamper with its first one.
    let at = bundle
        .windows(9)
        .position(|w| w == b"plaintext")
        .expect("plaintext in the bundle");
    let mut tampered = bundle.clone();
    tampered[at] ^= 1;
    assert_eq!(check(&tampered), Err(VerifyError::DigestMismatch));
    // A member certified by another organisation's key, in this one's bundle.
    let outsider = w.deep.member(Some("alice"), w.keys[2].clone(), NOW);
    let foreign = outsider.sign(b"p", LETRO, recent());
    assert!(check(&foreign).is_ok(), "valid for its own organisation");
    let grafted = graft_organisation(&foreign, &bundle);
    assert_eq!(check(&grafted), Err(VerifyError::NotIssuedByOrganisation));
    // A certificate not yet valid at the time of verification.
    let future = w
        .example
        .member(Some("carol"), w.keys[2].clone(), NOW + 2 * 3600);
    assert_eq!(
        check(&future.sign(b"p", LETRO, recent())),
        Err(VerifyError::CertificateNotValidNow)
    );
}

#[test]
fn a_record_for_another_service_names_no_key_for_letro() {
    let w = world();
    let mut hierarchy = MockHierarchy::new(NOW);
    let org = hierarchy.organisation_with_record("other.net", w.keys[0].clone(), Some("1.2.3"));
    let member = org.member(Some("dan"), w.keys[2].clone(), NOW);
    let anchors = hierarchy.trust_anchors();
    let verify_for = |service: &'static str| {
        verify(
            &member.sign(b"p", service, recent()),
            &Verification {
                service,
                period: Period::new(NOW - DAY, NOW),
                now: NOW,
                anchors: &anchors,
            },
        )
    };
    assert_eq!(verify_for(LETRO), Err(VerifyError::NoRecord));
    assert!(verify_for("1.2.3").is_ok());
}

#[test]
fn another_hierarchys_anchors_refuse_the_chain() {
    let w = world();
    let other = MockHierarchy::new(NOW).trust_anchors();
    let error = verify(
        &w.alice.sign(b"p", LETRO, recent()),
        &Verification {
            service: LETRO,
            period: Period::new(NOW - DAY, NOW),
            now: NOW,
            anchors: &other,
        },
    )
    .expect_err("refused");
    assert_eq!(error.check(), "dnssec");
}

/// `bundle` with the DNSSEC chain and organisation certificate of `host`: the member
/// certificate and signature of one organisation under another's chain.
fn graft_organisation(bundle: &[u8], host: &[u8]) -> Vec<u8> {
    fn parts(b: &[u8]) -> Vec<&[u8]> {
        // SEQUENCE header, then version, chain, certificate, signature: each a TLV.
        let (_, content) = tlv(b);
        let mut out = Vec::new();
        let mut rest = content;
        while !rest.is_empty() {
            let (len, _) = tlv(rest);
            out.push(&rest[..len]);
            rest = &rest[len..];
        }
        out
    }
    fn tlv(b: &[u8]) -> (usize, &[u8]) {
        let (len, header) = if b[1] < 0x80 {
            (usize::from(b[1]), 2)
        } else {
            let n = usize::from(b[1] & 0x7f);
            (
                b[2..2 + n].iter().fold(0, |l, &x| l << 8 | usize::from(x)),
                2 + n,
            )
        };
        (header + len, &b[header..header + len])
    }
    let (guest, host) = (parts(bundle), parts(host));
    let content = [host[0], host[1], host[2], guest[3]].concat();
    let mut out = vec![0x30, 0x82];
    out.extend(u16::try_from(content.len()).expect("short").to_be_bytes());
    out.extend(content);
    out
}
