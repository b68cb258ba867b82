//! Phase 2 over real HTTP, against every group of the interoperability vectors made with
//! the original Awala library.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use reqwest::StatusCode;

use crate::support::*;

const COMPLETION_TYPE: &str = "application/vnd.relaycorp.letro.pairing-completion-tmp";

/// Cases the original forwarded but this server refuses on purpose, with the reason.
const STRICTER: &[(&str, &str)] = &[
    // The grantee cannot use an expired PDA.
    ("expired_pda_still_forwarded", "pda_expired"),
    // Nor one whose signature does not verify.
    (
        "pda_signature_invalid_still_forwarded",
        "pda_signature_invalid",
    ),
    // Connection params whose identity key is not the PDA's issuer are inconsistent.
    (
        "identity_key_differs_from_pda_issuer",
        "identity_key_not_granter",
    ),
    // These two edge cases swap in an identity key of another size, which is then not
    // the key that issued the PDA.
    ("identity_key_rsa1024", "identity_key_not_granter"),
    ("identity_key_rsa8192", "identity_key_not_granter"),
];

/// What this server does with each case: `None` = forwarded, `Some(reason)` = refused.
fn expected_refusal(group: &str, case: &serde_json::Value) -> Option<String> {
    let name = case["name"].as_str().expect("name");
    if let Some((_, reason)) = STRICTER.iter().find(|(n, _)| *n == name) {
        return Some((*reason).to_owned());
    }
    let reason = match group {
        "valid_connection_params" => return None,
        "not_issued_by_sender" => "not_issued_by_sender",
        "handler_errors" => match name {
            "aki_without_key_identifier" => "pda_without_key_identifier",
            "pda_signed_with_pkcs1v15" => "pda_not_rsa_pss",
            "pda_subject_key_is_ec" => "pda_subject_not_rsa",
            other => panic!("unknown handler_errors case {other}"),
        },
        "invalid_connection_params" => "params_malformed",
        // Strict DER: the BER-only forms are refused, deliberately.
        "accepted_edge_cases" if case["canonical_der"] == false => "params_malformed",
        "accepted_edge_cases" => return None,
        other => panic!("unknown group {other}"),
    };
    Some(reason.to_owned())
}

fn params(case: &serde_json::Value) -> Vec<u8> {
    STANDARD
        .decode(case["params_der_b64"].as_str().expect("params"))
        .expect("base64")
}

#[tokio::test]
async fn every_vector_gets_the_documented_outcome() {
    let mut sink = FakeSink::start().await;
    let (_dir, db) = temp_db();
    let app = TestApp::spawn(test_config(&db, Some(&sink.url))).await;
    let v = vectors();
    let mut forwarded = 0;
    let mut refused = 0;
    let mut mismatches = Vec::new();
    for group in [
        "valid_connection_params",
        "not_issued_by_sender",
        "handler_errors",
        "invalid_connection_params",
        "accepted_edge_cases",
    ] {
        for (i, case) in v[group].as_array().expect("group").iter().enumerate() {
            let name = case["name"].as_str().expect("name");
            let sender = case["sender_id"].as_str().expect("sender");
            let expected = expected_refusal(group, case);
            let metric = |reason: &str| format!("letro_refusals_total{{reason=\"{reason}\"}}");
            let before = match &expected {
                Some(reason) => app.metric(&metric(reason)).await,
                None => 0,
            };
            let status = app
                .post_message(sender, &format!("{group}-{i}"), AUTH_TYPE, params(case))
                .await;
            assert_eq!(status, StatusCode::NO_CONTENT, "{group}/{name}");
            match &expected {
                None => {
                    let Some(r) = sink.try_next(Duration::from_secs(5)).await else {
                        mismatches.push(format!("{group}/{name}: not forwarded"));
                        continue;
                    };
                    forwarded += 1;
                    let want = &case["expected"];
                    assert_eq!(
                        r.header("ce-subject"),
                        want["completion_recipient_id"].as_str().expect("recipient"),
                        "{name}"
                    );
                    assert_eq!(
                        r.text(),
                        want["completion_content"].as_str().expect("content"),
                        "{name}"
                    );
                    assert_eq!(r.header("content-type"), COMPLETION_TYPE);
                    assert_eq!(r.header("ce-source"), SERVER_ID);
                    assert_eq!(
                        r.header("ce-type"),
                        "tech.relaycorp.awala.endpoint-internet.outgoing-service-message"
                    );
                }
                Some(reason) => {
                    refused += 1;
                    if app.metric(&metric(reason)).await != before + 1 {
                        mismatches.push(format!("{group}/{name}: not refused as {reason}"));
                    }
                }
            }
        }
    }
    assert!(mismatches.is_empty(), "{mismatches:#?}");
    sink.assert_quiet(Duration::from_millis(200)).await;
    assert_eq!(app.stats().await.outbox_depth, 0);
    assert_eq!(app.metric("letro_completions_total").await, forwarded);
    // 10 valid minus 3 stricter refusals, plus 9 canonical edge cases minus 2.
    assert_eq!((forwarded, refused), (14, 54));
    app.stop().await;
}
