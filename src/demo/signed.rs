//! `letro-server demo --signed`: today's Letro apps, whose pairing requests are signed
//! with VeraId (`contact-pairing.request`).
//!
//! A mock VeraId world (`veraid::testing`): a DNSSEC root of its own, which the server is
//! told to trust, and an organisation under it for each user, with a member certificate
//! for the user. Each app signs a `ContactPairingRequest` naming its endpoint's key and
//! the other user; the server verifies the bundles and forwards each party the other's,
//! byte for byte; each app verifies what it gets. Phase 2 is the 2023 app's
//! (`pairing-auth`, forwarded unchanged). Last, a bundle replayed from another endpoint
//! is answered with a `contact-pairing.failure`.

use std::io::Write;

use anyhow::{Context, bail};
use veraid::testing::{KeyPair, MockHierarchy, SigningMember};
use veraid::{Period, TrustAnchors, Verification, Verified};

use super::{
    Stage, User, addressed_to, authorise_each_other, expect_type, say, show_delivery, show_request,
    step, users,
};
use crate::bundles::{BundleVerifier, LETRO_SERVICE_OID, VERIFICATION_WINDOW};
use crate::cli::DemoArgs;
use crate::codec::contact_pairing::{
    CONTACT_PAIRING_FAILURE_TYPE, CONTACT_PAIRING_REQUEST_TYPE, encode_contact_pairing_request,
    encode_failure, parse_contact_pairing_request,
};
use crate::domain::EndpointId;
use crate::domain::signed::FailureReason;

/// How long the apps' signatures are valid for.
const SIGNATURE_VALIDITY: i64 = 30 * 86_400;

/// Plays the signed protocol, writing the story to `out`.
pub(super) async fn run(args: &DemoArgs, out: &mut impl Write) -> anyhow::Result<()> {
    let now = unix_now();
    let mut hierarchy = MockHierarchy::new(now);
    let anchors = hierarchy.trust_anchors();
    let mut stage = Stage::start(out, |config| {
        config.veraid_trust_anchors = anchors.clone();
    })
    .await?;
    say(
        out,
        &format!(
            "it trusts one VeraId root, a mock DNSSEC root made for this demo: {}",
            short_anchor(&hierarchy.trust_anchors_text())
        ),
    )?;
    let (alice, bob) = users(out)?;

    say(
        out,
        "\nMaking their VeraId organisations under the mock root (RSA-2048 keys)…",
    )?;
    let mut signers = Vec::new();
    for user in [&alice, &bob] {
        let (name, domain) = user
            .veraid
            .split_once('@')
            .context("a VeraId user id has an '@'")?;
        let organisation = hierarchy.organisation(domain, KeyPair::generate(2048));
        say(
            out,
            &format!(
                "  {domain}: DNSSEC chain from the mock root, _veraid TXT record, certificate for {name}"
            ),
        )?;
        signers.push(organisation.member(Some(name), KeyPair::generate(2048), now));
    }
    let [alice_signs, bob_signs] = signers.as_slice() else {
        bail!("two signers expected");
    };

    // The server's own check, run here to show whom it finds.
    let server_check = BundleVerifier::new(anchors.clone());
    let outcomes = [
        "stored, waiting for Bob's request".to_owned(),
        "it is the reverse of Alice's, so each gets the other's bundle".to_owned(),
    ];
    let mut bundles = Vec::new();
    for (n, ((user, other, signs), outcome)) in (1..).zip(
        [(&alice, &bob, alice_signs), (&bob, &alice, bob_signs)]
            .into_iter()
            .zip(outcomes),
    ) {
        step(
            out,
            n,
            &format!(
                "{} asks to pair with {}, signing as {}",
                user.name, other.name, user.veraid
            ),
        )?;
        let bundle = sign_request(signs, user, other, now);
        say(
            out,
            &format!(
                "  {}'s app signs a ContactPairingRequest (its endpoint key and {:?}): a VeraId bundle of {} bytes",
                user.name,
                other.veraid,
                bundle.len()
            ),
        )?;
        let parcel = format!("request-{n}");
        show_request(
            out,
            args,
            user,
            &parcel,
            CONTACT_PAIRING_REQUEST_TYPE,
            &bundle,
        )?;
        let verified = server_check
            .verify(&bundle, crate::clock::now())
            .context("the server's VeraId check")?;
        say(
            out,
            &format!(
                "  verified with the server's own check (src/bundles.rs): signed by {}, a user of {}, from the mock root",
                verified.member.veraid_id(),
                verified.member.organisation
            ),
        )?;
        let status = stage
            .post(user, &parcel, CONTACT_PAIRING_REQUEST_TYPE, bundle.clone())
            .await?;
        say(out, &format!("  server answered {status}: {outcome}"))?;
        bundles.push(bundle);
    }
    let [alice_bundle, bob_bundle] = bundles.as_slice() else {
        bail!("two bundles expected");
    };

    step(
        out,
        3,
        "Each receives the other's signed request, byte for byte",
    )?;
    let forwarded = stage.receive(2).await?;
    for (user, other, sent) in [(&alice, &bob, bob_bundle), (&bob, &alice, alice_bundle)] {
        let event = addressed_to(&forwarded, user)?;
        show_delivery(out, args, event)?;
        expect_type(event, CONTACT_PAIRING_REQUEST_TYPE)?;
        if event.data != *sent {
            bail!("{} did not get the bundle {} sent", user.name, other.name);
        }
        say(
            out,
            &format!(
                "  {} receives {}'s bundle: {} bytes, byte for byte the one {} sent",
                user.name,
                other.name,
                event.data.len(),
                other.name
            ),
        )?;
        let verified = verify_as_app(&event.data, &anchors)?;
        let request = parse_contact_pairing_request(&verified.plaintext)
            .context("the forwarded plaintext")?;
        let endpoint = request
            .requester_key
            .map(|k| EndpointId::from_spki_der(&k))
            .context("the forwarded request has no RSA key")?;
        if verified.member.veraid_id() != other.veraid
            || request.prospective_contact != user.veraid
            || endpoint != *other.endpoint.id()
        {
            bail!(
                "{}'s bundle does not say what {} signed",
                other.name,
                other.name
            );
        }
        say(
            out,
            &format!(
                "  {}'s app verifies it (Letro service, 90-day window): signed by {}, for {}, from endpoint {}",
                user.name,
                verified.member.veraid_id(),
                request.prospective_contact,
                endpoint
            ),
        )?;
    }

    authorise_each_other(out, args, &mut stage, (&alice, &bob), 4, true).await?;

    step(
        out,
        6,
        "A bundle works only from its signer's endpoint: a replay gets a failure",
    )?;
    say(
        out,
        "  Bob's endpoint sends Alice's bundle, which it has just received, as its own request",
    )?;
    show_request(
        out,
        args,
        &bob,
        "request-3",
        CONTACT_PAIRING_REQUEST_TYPE,
        alice_bundle,
    )?;
    let status = stage
        .post(
            &bob,
            "request-3",
            CONTACT_PAIRING_REQUEST_TYPE,
            alice_bundle.clone(),
        )
        .await?;
    say(
        out,
        &format!(
            "  server answered {status}: signed by {}, but the key in it is Alice's, not the sender's",
            alice.veraid
        ),
    )?;
    let failures = stage.receive(1).await?;
    let event = addressed_to(&failures, &bob)?;
    show_delivery(out, args, event)?;
    expect_type(event, CONTACT_PAIRING_FAILURE_TYPE)?;
    let reason = FailureReason::InvalidRequesterAwalaKey;
    if event.data != encode_failure(bob.veraid, reason) {
        bail!(
            "Bob's endpoint did not get a failure of reason {}",
            reason.code()
        );
    }
    say(
        out,
        &format!(
            "  Bob's endpoint gets a ContactPairingFailure: {}, reason {} ({})",
            bob.veraid,
            reason.code(),
            reason.as_str()
        ),
    )?;
    stage.stop().await
}

/// The bundle `user`'s app sends: a `ContactPairingRequest` for `other`, with `user`'s
/// endpoint key, signed by `signs` for Letro.
fn sign_request(signs: &SigningMember, user: &User, other: &User, now: i64) -> Vec<u8> {
    let plaintext = encode_contact_pairing_request(user.endpoint.spki_der(), other.veraid);
    signs.sign(
        &plaintext,
        LETRO_SERVICE_OID,
        Period::new(now - 60, now + SIGNATURE_VALIDITY),
    )
}

/// Verifies a forwarded bundle as a Letro app does: for Letro's service, valid at some
/// point in the last 90 days.
fn verify_as_app(bundle: &[u8], anchors: &TrustAnchors) -> anyhow::Result<Verified> {
    let now = unix_now();
    let window = i64::try_from(VERIFICATION_WINDOW.as_secs())?;
    let verification = Verification {
        service: LETRO_SERVICE_OID,
        period: Period::new(now - window, now),
        now,
        anchors,
    };
    veraid::verify(bundle, &verification).context("verifying a forwarded bundle")
}

/// Unix seconds now.
fn unix_now() -> i64 {
    crate::clock::now().0.div_euclid(1000)
}

/// A DS trust anchor line with its digest shortened.
fn short_anchor(text: &str) -> String {
    let line = text.trim();
    match line.rsplit_once(' ') {
        Some((head, digest)) if digest.len() > 16 => format!("{head} {}…", &digest[..16]),
        _ => line.to_owned(),
    }
}
