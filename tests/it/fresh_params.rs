//! Phase 2 with connection params built here, in Rust, by the client toolkit: forwarded
//! when sound, refused for each rule, idempotent, and never a 5xx for mangled input.

use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use letro_server::client::{
    AuthorityKeyIdMode, CertificateOptions, Endpoint, PssHash, SignatureScheme, connection_params,
    issue_certificate, session_key,
};
use letro_server::codec::connparams::encode_connection_params;
use letro_server::fuzz::Rng;
use reqwest::StatusCode;

use crate::support::*;

const DAY: Duration = Duration::from_secs(86_400);
const ADDRESS: &str = "frankfurt.relaycorp.cloud";

/// A private gateway, the granter endpoint it certified, and a grantee: what a phone
/// holds. Generated once per test binary, since RSA key generation is the slow part.
struct World {
    gateway: Endpoint,
    granter: Endpoint,
    grantee: Endpoint,
    /// [endpoint certificate, gateway certificate], leaf-most first, as Android sends.
    cas: Vec<Vec<u8>>,
}

fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        let gateway = Endpoint::generate(2048).expect("gateway key");
        let granter = Endpoint::generate(2048).expect("granter key");
        let grantee = Endpoint::generate(2048).expect("grantee key");
        let gateway_cert = issue_certificate(
            &gateway,
            gateway.spki_der(),
            &CertificateOptions::ca(365 * DAY, 2),
        )
        .expect("gateway certificate");
        let endpoint_cert = issue_certificate(
            &gateway,
            granter.spki_der(),
            &CertificateOptions::ca(365 * DAY, 0),
        )
        .expect("endpoint certificate");
        World {
            gateway,
            granter,
            grantee,
            cas: vec![endpoint_cert, gateway_cert],
        }
    })
}

fn sound_params(options: &CertificateOptions) -> Vec<u8> {
    let w = world();
    connection_params(&w.granter, w.grantee.spki_der(), options, &w.cas, ADDRESS).expect("params")
}

async fn post_auth(app: &TestApp, sender: &str, parcel: &str, params: &[u8]) -> StatusCode {
    app.post_message(sender, parcel, AUTH_TYPE, params.to_vec())
        .await
}

#[tokio::test]
async fn sound_params_are_forwarded_to_the_grantee() {
    let w = world();
    let mut sink = FakeSink::start().await;
    let (_dir, db) = temp_db();
    let app = TestApp::spawn(test_config(&db, Some(&sink.url))).await;
    let skewed = CertificateOptions {
        // A granter whose clock is two minutes ahead.
        not_before: SystemTime::now() + Duration::from_secs(120),
        ..CertificateOptions::pda(30 * DAY)
    };
    let variants: Vec<(&str, Vec<u8>)> = vec![
        (
            "android-like",
            sound_params(&CertificateOptions::pda(365 * DAY)),
        ),
        (
            "no CAs",
            connection_params(
                &w.granter,
                w.grantee.spki_der(),
                &CertificateOptions::pda(DAY),
                &[],
                ADDRESS,
            )
            .expect("params"),
        ),
        (
            "SHA-384",
            sound_params(&CertificateOptions {
                signature: SignatureScheme::Pss(PssHash::Sha384),
                ..CertificateOptions::pda(DAY)
            }),
        ),
        (
            "SHA-512",
            sound_params(&CertificateOptions {
                signature: SignatureScheme::Pss(PssHash::Sha512),
                ..CertificateOptions::pda(DAY)
            }),
        ),
        ("clock skew", sound_params(&skewed)),
    ];
    for (i, (what, params)) in variants.iter().enumerate() {
        let status = post_auth(&app, w.granter.id().as_str(), &format!("auth-{i}"), params).await;
        assert_eq!(status, StatusCode::NO_CONTENT, "{what}");
        let r = sink.next().await;
        assert_eq!(r.header("ce-subject"), w.grantee.id().as_str(), "{what}");
        assert_eq!(
            r.header("content-type"),
            "application/vnd.relaycorp.letro.pairing-completion-tmp"
        );
        let text = r.text();
        let (granter, b64) = text.split_once(',').expect("two fields");
        assert_eq!(granter, w.granter.id().as_str(), "{what}");
        assert_eq!(
            STANDARD.decode(b64).expect("base64"),
            *params,
            "{what}: params forwarded as received"
        );
    }
    assert_eq!(
        app.metric("letro_completions_total").await,
        variants.len() as u64
    );
    app.stop().await;
}

#[tokio::test]
async fn each_rule_refuses_unusable_params() {
    let w = world();
    let mut sink = FakeSink::start().await;
    let (_dir, db) = temp_db();
    let app = TestApp::spawn(test_config(&db, Some(&sink.url))).await;
    let granter_id = w.granter.id().as_str();
    let pda = CertificateOptions::pda(30 * DAY);
    let build = |options: &CertificateOptions| sound_params(options);
    let (key_id, session_spki) = session_key().expect("session key");
    let rebuild = |identity: &[u8], pda_der: &[u8]| {
        encode_connection_params(
            identity,
            ADDRESS,
            pda_der,
            &w.cas,
            Some((&key_id, &session_spki)),
        )
        .expect("params")
    };
    let good_pda = issue_certificate(&w.granter, w.grantee.spki_der(), &pda).expect("pda");
    let mut bad_signature = good_pda.clone();
    let last = bad_signature.len() - 1;
    bad_signature[last] ^= 0x01;
    let ec_subject = issue_certificate(&w.granter, &session_spki, &pda).expect("pda");
    let now = SystemTime::now();
    let sound = build(&pda);
    let cases: Vec<(&str, String, Vec<u8>, &str)> = vec![
        (
            "sent by the grantee",
            w.grantee.id().to_string(),
            sound.clone(),
            "not_issued_by_sender",
        ),
        (
            "sent by the gateway",
            w.gateway.id().to_string(),
            sound.clone(),
            "not_issued_by_sender",
        ),
        (
            "no AKI",
            granter_id.into(),
            build(&CertificateOptions {
                authority_key_id: AuthorityKeyIdMode::Absent,
                ..pda.clone()
            }),
            "not_issued_by_sender",
        ),
        (
            "keyless AKI",
            granter_id.into(),
            build(&CertificateOptions {
                authority_key_id: AuthorityKeyIdMode::WithoutKeyIdentifier,
                ..pda.clone()
            }),
            "pda_without_key_identifier",
        ),
        (
            "PKCS#1 v1.5",
            granter_id.into(),
            build(&CertificateOptions {
                signature: SignatureScheme::Pkcs1v15,
                ..pda.clone()
            }),
            "pda_not_rsa_pss",
        ),
        (
            "EC subject",
            granter_id.into(),
            rebuild(w.granter.spki_der(), &ec_subject),
            "pda_subject_not_rsa",
        ),
        (
            "someone else's identity key",
            granter_id.into(),
            rebuild(w.grantee.spki_der(), &good_pda),
            "identity_key_not_granter",
        ),
        (
            "bad signature",
            granter_id.into(),
            rebuild(w.granter.spki_der(), &bad_signature),
            "pda_signature_invalid",
        ),
        (
            "expired",
            granter_id.into(),
            build(&CertificateOptions {
                not_before: now - 2 * DAY,
                not_after: now - DAY,
                ..pda.clone()
            }),
            "pda_expired",
        ),
        (
            "not yet valid",
            granter_id.into(),
            build(&CertificateOptions {
                not_before: now + 3600 * Duration::from_secs(1),
                ..pda.clone()
            }),
            "pda_not_yet_valid",
        ),
        (
            "truncated",
            granter_id.into(),
            sound[..sound.len() - 1].to_vec(),
            "params_malformed",
        ),
        (
            "a pairing request",
            granter_id.into(),
            w.granter.pairing_request("a@b.io", "c@d.io"),
            "params_malformed",
        ),
    ];
    for (i, (what, sender, params, reason)) in cases.iter().enumerate() {
        let metric = format!("letro_refusals_total{{reason=\"{reason}\"}}");
        let before = app.metric(&metric).await;
        assert_eq!(
            post_auth(&app, sender, &format!("bad-{i}"), params).await,
            StatusCode::NO_CONTENT,
            "{what}"
        );
        assert_eq!(
            app.metric(&metric).await,
            before + 1,
            "{what} refused as {reason}"
        );
    }
    sink.assert_quiet(Duration::from_millis(200)).await;
    assert_eq!(app.stats().await.outbox_depth, 0);
    // The sound params themselves still go through.
    assert_eq!(
        post_auth(&app, granter_id, "good", &sound).await,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        sink.next().await.header("ce-subject"),
        w.grantee.id().as_str()
    );
    app.stop().await;
}

#[tokio::test]
async fn a_redelivered_authorisation_is_forwarded_once() {
    let w = world();
    let mut sink = FakeSink::start().await;
    let (_dir, db) = temp_db();
    let app = TestApp::spawn(test_config(&db, Some(&sink.url))).await;
    let params = sound_params(&CertificateOptions::pda(DAY));
    let sender = w.granter.id().as_str();
    for _ in 0..3 {
        assert_eq!(
            post_auth(&app, sender, "once", &params).await,
            StatusCode::NO_CONTENT
        );
    }
    let first = sink.next().await;
    sink.assert_quiet(Duration::from_millis(200)).await;
    // The same params in a new parcel is a new event: forwarded again, under a new id.
    assert_eq!(
        post_auth(&app, sender, "twice", &params).await,
        StatusCode::NO_CONTENT
    );
    let second = sink.next().await;
    assert_eq!(first.body, second.body);
    assert_ne!(first.header("ce-id"), second.header("ce-id"));
    assert_eq!(
        app.metric("letro_events_total{content_type=\"pairing-auth-tmp\",outcome=\"duplicate\"}")
            .await,
        2
    );
    app.stop().await;
}

#[tokio::test]
async fn mangled_params_never_cause_a_5xx() {
    let (_dir, db) = temp_db();
    let app = TestApp::spawn(test_config(&db, None)).await;
    let v = vectors();
    let seeds: Vec<(String, Vec<u8>)> = v["valid_connection_params"]
        .as_array()
        .expect("group")
        .iter()
        .map(|c| {
            (
                c["sender_id"].as_str().expect("sender").to_owned(),
                STANDARD
                    .decode(c["params_der_b64"].as_str().expect("b64"))
                    .expect("base64"),
            )
        })
        .collect();
    let mut rng = Rng(0x5eed_1e77_0000_0001);
    for i in 0..300 {
        let (sender, seed) = &seeds[rng.below(seeds.len())];
        let mut params = seed.clone();
        match rng.below(4) {
            0 => {
                let at = rng.below(params.len());
                params[at] ^= 1 << rng.below(8);
            }
            1 => params.truncate(rng.below(params.len())),
            2 => {
                // Length bytes live near the front of each TLV: bump one.
                let at = rng.below(params.len().min(64));
                params[at] = params[at].wrapping_add(1 + rng.below(3) as u8);
            }
            _ => {
                let at = rng.below(params.len());
                let extra: Vec<u8> = (0..1 + rng.below(16))
                    .map(|_| rng.next_u64() as u8)
                    .collect();
                params.splice(at..at, extra);
            }
        }
        let status = post_auth(&app, sender, &format!("fuzz-{i}"), &params).await;
        assert_eq!(status, StatusCode::NO_CONTENT, "case {i}");
    }
    assert_eq!(app.health().await, StatusCode::OK);
    app.stop().await;
}
