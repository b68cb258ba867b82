//! DNSSEC validation against the chains of the interoperability vectors: every chain the
//! reference accepts validates, and every chain it refuses for a DNSSEC reason does not.

mod common;

use common::{bundle, cases, chain, now, trust_anchor};
use veraid::dns::{Message, Name, rtype, txt_strings};
use veraid::dnssec::{DnssecError, Window, validate};

const NINETY_DAYS: u64 = 90 * 86_400;

/// The cases the reference refuses because of the chain itself (its error names the
/// DNSSEC status or the TXT response), with the error this crate must give.
fn dnssec_refusal(case: &str) -> Option<fn(&DnssecError) -> bool> {
    Some(match case {
        "rrsig_unknown_key_tag" | "rrsig_bad_signature" => {
            |e| matches!(e, DnssecError::BadAnswer { .. })
        }
        "chain_not_to_trust_anchor" | "rrsig_expired_beyond_ttl_override" => {
            |e| matches!(e, DnssecError::NoTrustedKey { zone } if zone == ".")
        }
        "chain_missing_ds" => {
            |e| matches!(e, DnssecError::NotSecured { zone, what: "DS", .. } if zone == "example.com.")
        }
        "chain_with_two_txt_responses" => |e| matches!(e, DnssecError::SeveralResponses { .. }),
        "chain_for_other_domain" => |e| matches!(e, DnssecError::MissingResponse { .. }),
        _ => return None,
    })
}

/// The TTL override of the first VeraId TXT record the chain carries (read without
/// validation: the test needs it to build the window the bundle-level check would).
fn ttl_override(messages: &[Message], owner: &Name) -> u64 {
    messages
        .iter()
        .find(|m| m.answers_question(owner, rtype::TXT))
        .and_then(|m| m.answers.iter().find(|r| r.rtype == rtype::TXT))
        .and_then(|r| txt_strings(&r.rdata).ok())
        .and_then(|strings| {
            let text = String::from_utf8(strings.first()?.clone()).ok()?;
            text.split_whitespace().nth(2)?.parse::<u64>().ok()
        })
        .map_or(NINETY_DAYS, |ttl| ttl.min(NINETY_DAYS))
}

#[test]
fn every_chain_gives_the_references_dnssec_outcome() {
    let owner = Name::parse("_veraid.example.com.").expect("name");
    let anchors = [trust_anchor()];
    let now = now();
    let (mut accepted, mut refused) = (0, 0);
    for (name, case) in cases() {
        let messages: Vec<Message> = chain(&bundle(case))
            .iter()
            .map(|m| Message::parse(m).expect("parses"))
            .collect();
        // The bundle-level window anchored at now, as the vectors' signatures and
        // certificates all cover it (their own refusals are tested with the bundle).
        let window = Window {
            start: now - ttl_override(&messages, &owner),
            end: now,
        };
        let outcome = validate(&messages, &owner, rtype::TXT, &anchors, window);
        match (dnssec_refusal(name), outcome) {
            (None, Ok(records)) => {
                assert!(!records.is_empty(), "{name}");
                accepted += 1;
            }
            (Some(expected), Err(error)) => {
                assert!(
                    expected(&error),
                    "{name}: refused for another reason: {error}"
                );
                refused += 1;
            }
            (None, Err(error)) => panic!("{name}: refused: {error}"),
            (Some(_), Ok(_)) => panic!("{name}: accepted, the reference refuses it"),
        }
    }
    assert_eq!(refused, 7);
    assert_eq!(accepted + refused, 67);
}

#[test]
fn a_window_the_signatures_do_not_reach_refuses_the_chain() {
    let (_, case) = cases()
        .find(|(n, _)| *n == "valid_user_signed")
        .expect("case");
    let messages: Vec<Message> = chain(&bundle(case))
        .iter()
        .map(|m| Message::parse(m).expect("parses"))
        .collect();
    let owner = Name::parse("_veraid.example.com.").expect("name");
    let anchors = [trust_anchor()];
    let far_future = now() + 10 * 365 * 86_400;
    let window = Window {
        start: far_future,
        end: far_future + 1,
    };
    let error = validate(&messages, &owner, rtype::TXT, &anchors, window).expect_err("refused");
    assert!(matches!(error, DnssecError::NoTrustedKey { .. }), "{error}");
    // Right on the edge of the signatures' validity still counts (closed intervals).
    let ok = Window {
        start: now(),
        end: now(),
    };
    validate(&messages, &owner, rtype::TXT, &anchors, ok).expect("valid at now");
}

#[test]
fn no_trust_anchor_validates_nothing() {
    let (_, case) = cases()
        .find(|(n, _)| *n == "valid_user_signed")
        .expect("case");
    let messages: Vec<Message> = chain(&bundle(case))
        .iter()
        .map(|m| Message::parse(m).expect("parses"))
        .collect();
    let owner = Name::parse("_veraid.example.com.").expect("name");
    let window = Window {
        start: now() - NINETY_DAYS,
        end: now(),
    };
    let error = validate(&messages, &owner, rtype::TXT, &[], window).expect_err("refused");
    assert!(matches!(error, DnssecError::NoTrustedKey { .. }), "{error}");
}

#[test]
fn a_chain_missing_a_zones_keys_is_insecure() {
    let (_, case) = cases()
        .find(|(n, _)| *n == "valid_user_signed")
        .expect("case");
    let com = Name::parse("com.").expect("name");
    let messages: Vec<Message> = chain(&bundle(case))
        .iter()
        .map(|m| Message::parse(m).expect("parses"))
        .filter(|m| !m.answers_question(&com, rtype::DNSKEY))
        .collect();
    let owner = Name::parse("_veraid.example.com.").expect("name");
    let window = Window {
        start: now() - NINETY_DAYS,
        end: now(),
    };
    let error =
        validate(&messages, &owner, rtype::TXT, &[trust_anchor()], window).expect_err("refused");
    assert!(
        matches!(&error, DnssecError::NotSecured { zone, what: "DNSKEY", rcode: 3 } if zone == "com."),
        "{error}"
    );
}

#[test]
fn a_chain_that_would_need_many_signature_checks_is_refused() {
    let (_, case) = cases()
        .find(|(n, _)| *n == "valid_user_signed")
        .expect("case");
    let mut messages: Vec<Message> = chain(&bundle(case))
        .iter()
        .map(|m| Message::parse(m).expect("parses"))
        .collect();
    let root = Name::root();
    let keys = messages
        .iter_mut()
        .find(|m| m.answers_question(&root, rtype::DNSKEY))
        .expect("root keys");
    // A hundred RRSIGs that each name the trusted key and each fail: without a budget,
    // a hundred RSA verifications for one zone.
    let mut sig = keys
        .answers
        .iter()
        .find(|r| r.rtype == rtype::RRSIG)
        .expect("RRSIG")
        .clone();
    let last = sig.rdata.len() - 1;
    sig.rdata[last] ^= 0xff;
    keys.answers.retain(|r| r.rtype != rtype::RRSIG);
    keys.answers.extend(std::iter::repeat_n(sig, 100));
    let owner = Name::parse("_veraid.example.com.").expect("name");
    let window = Window {
        start: now() - NINETY_DAYS,
        end: now(),
    };
    let error =
        validate(&messages, &owner, rtype::TXT, &[trust_anchor()], window).expect_err("refused");
    assert_eq!(error, DnssecError::TooMuchWork);
}
