//! `verify` against every interoperability vector: the reference's outcome (signer,
//! plaintext, or a refusal for the same reason), and this crate's decision where the
//! vectors leave the outcome open.

mod common;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use common::{bundle, cases, unix_seconds, vectors};
use veraid::dnssec::DnssecError;
use veraid::{Member, Period, SignedBy, TrustAnchors, Verification, VerifyError, verify};

fn anchors() -> TrustAnchors {
    let lines: Vec<&str> = vectors()["trust_anchors"]
        .as_array()
        .expect("anchors")
        .iter()
        .map(|l| l.as_str().expect("line"))
        .collect();
    TrustAnchors::parse(&lines.join("\n")).expect("anchors parse")
}

fn verify_case(
    case: &serde_json::Value,
    anchors: &TrustAnchors,
) -> Result<veraid::Verified, VerifyError> {
    let period = &case["verification_period"];
    let at = |v: &serde_json::Value| {
        i64::try_from(unix_seconds(v.as_str().expect("time"))).expect("i64")
    };
    verify(
        &bundle(case),
        &Verification {
            service: vectors()["service_oid"].as_str().expect("oid"),
            period: Period::new(at(&period["start"]), at(&period["end"])),
            now: at(&case["now"]),
            anchors,
        },
    )
}

/// Why the reference refuses each refused case, as this crate's error.
fn expected_refusal(case: &str) -> fn(&VerifyError) -> bool {
    use VerifyError as E;
    match case {
        "wrong_service_oid" => |e| matches!(e, E::WrongService(s) if s == "1.3.6.1.4.1.58708.1.1"),
        "signature_expired" | "signature_not_yet_valid" => |e| *e == E::SignatureOutsidePeriod,
        "tampered_plaintext" => |e| *e == E::DigestMismatch,
        "signed_with_other_key" => |e| *e == E::BadSignature,
        "member_cert_not_issued_by_org" => |e| *e == E::NotIssuedByOrganisation,
        "txt_names_other_key" | "txt_other_service_only" => |e| *e == E::NoRecord,
        "txt_rrset_with_foreign_record" => {
            |e| matches!(e, E::Record(veraid::RecordError::UnknownAlgorithm(a)) if a == "v=spf1")
        }
        "txt_split_in_two_strings" => |e| *e == E::Record(veraid::RecordError::NotOneString(2)),
        "rrsig_unknown_key_tag" | "rrsig_bad_signature" => {
            |e| matches!(e, E::Dnssec(DnssecError::BadAnswer { .. }))
        }
        "chain_for_other_domain" => |e| matches!(e, E::Dnssec(DnssecError::MissingResponse { .. })),
        "chain_not_to_trust_anchor" | "rrsig_expired_beyond_ttl_override" => {
            |e| matches!(e, E::Dnssec(DnssecError::NoTrustedKey { zone }) if zone == ".")
        }
        "chain_missing_ds" => {
            |e| matches!(e, E::Dnssec(DnssecError::NotSecured { what: "DS", .. }))
        }
        "chain_with_two_txt_responses" => {
            |e| matches!(e, E::Dnssec(DnssecError::SeveralResponses { .. }))
        }
        "member_cert_expired_now" => |e| *e == E::CertificateNotValidNow,
        "detached_plaintext" => |e| *e == E::Detached,
        "signer_name_with_tab" => |e| *e == E::InvalidUserName,
        "metadata_attribute_missing" => |e| *e == E::MetadataMissing,
        "bundle_version_1" => |e| *e == E::UnsupportedVersion,
        // Where the vectors accept either outcome and this crate refuses (the README's
        // "Leniency" section): data after the bundle.
        "der_trailing_byte" => |e| matches!(e, E::Malformed(_)),
        other => panic!("{other}: no expected refusal"),
    }
}

/// The lenient cases this crate refuses; every other lenient case it accepts, as the
/// latest reference does.
const REFUSED_WHERE_LENIENT: &[&str] = &["der_trailing_byte"];

#[test]
fn every_vector_gives_the_references_outcome() {
    let anchors = anchors();
    let (mut valid, mut invalid) = (0, 0);
    for (name, case) in cases() {
        let reference = &case["veraid"];
        let lenient = case.get("lenient").is_some();
        let outcome = verify_case(case, &anchors);
        let reference_valid = reference["outcome"] == "valid";
        let expect_valid = reference_valid && !(lenient && REFUSED_WHERE_LENIENT.contains(&name));
        match outcome {
            Ok(verified) => {
                assert!(expect_valid, "{name}: accepted, expected a refusal");
                let user = reference["user"].as_str().map(str::to_owned);
                assert_eq!(
                    verified.member,
                    Member {
                        organisation: reference["organisation"].as_str().expect("org").to_owned(),
                        user,
                    },
                    "{name}"
                );
                let signed_by = match reference["signed_by"].as_str() {
                    Some("member") => SignedBy::Member,
                    Some("organisation") => SignedBy::Organisation,
                    other => panic!("{name}: signed_by {other:?}"),
                };
                assert_eq!(verified.signed_by, signed_by, "{name}");
                let plaintext = STANDARD
                    .decode(reference["plaintext_b64"].as_str().expect("plaintext"))
                    .expect("base64");
                assert_eq!(verified.plaintext, plaintext, "{name}");
                valid += 1;
            }
            Err(error) => {
                assert!(!expect_valid, "{name}: refused: {error}");
                assert!(
                    expected_refusal(name)(&error),
                    "{name}: refused for another reason: {error}"
                );
                invalid += 1;
            }
        }
    }
    assert_eq!(valid + invalid, 67);
    assert!(invalid >= 20, "{invalid} refused");
}

#[test]
fn the_period_is_where_every_part_is_valid() {
    let anchors = anchors();
    let (_, case) = cases()
        .find(|(n, _)| *n == "valid_user_signed")
        .expect("case");
    let verified = verify_case(case, &anchors).expect("valid");
    let now = i64::try_from(common::now()).expect("i64");
    // The signature started five minutes before now; the TTL override is 90 days.
    assert_eq!(verified.period, Period::new(now - 300, now));
    assert_eq!(verified.member.veraid_id(), "alice@example.com");
}

#[test]
fn a_period_before_the_signature_refuses_it() {
    let anchors = anchors();
    let (_, case) = cases()
        .find(|(n, _)| *n == "valid_user_signed")
        .expect("case");
    let now = i64::try_from(common::now()).expect("i64");
    let error = verify(
        &bundle(case),
        &Verification {
            service: "1.3.6.1.4.1.58708.2.0",
            period: Period::new(now - 86_400, now - 3600),
            now,
            anchors: &anchors,
        },
    )
    .expect_err("refused");
    assert_eq!(error, VerifyError::SignatureOutsidePeriod);
}

#[test]
fn the_iana_anchors_do_not_validate_a_mock_chain() {
    let (_, case) = cases()
        .find(|(n, _)| *n == "valid_user_signed")
        .expect("case");
    let error = verify_case(case, &TrustAnchors::iana()).expect_err("refused");
    assert!(
        matches!(error, VerifyError::Dnssec(DnssecError::NoTrustedKey { .. })),
        "{error}"
    );
}
