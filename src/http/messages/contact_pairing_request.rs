//! `contact-pairing.request`: a pairing request signed with VeraId (veraid.md §12).
//! Verified, checked in letro-server's order, then stored until the reverse request
//! arrives, when each party gets the other's bundle unchanged; or answered with a
//! `contact-pairing.failure`; or refused without a message.

use super::Incoming;
use crate::codec::contact_pairing::{
    CONTACT_PAIRING_FAILURE_TYPE, encode_failure, parse_contact_pairing_request,
};
use crate::domain::signed::{FailureReason, SignedRequest, Verdict, judge};
use crate::domain::{EndpointId, MessageKind, OutgoingMessage, Refusal, VeraId};
use crate::http::ApiError;
use crate::store::{EventMessages, PairingSubmission, QueueOutcome};

pub(super) async fn handle(incoming: &Incoming<'_>) -> Result<(), ApiError> {
    let (state, event) = (incoming.state, incoming.event);
    let now = incoming.now();
    let verified = match state.bundles.verify(&event.data, now) {
        Ok(verified) => {
            state.metrics.veraid_verified(verified.from_cache);
            verified
        }
        Err(e) => {
            state.metrics.veraid_refusal(e.check());
            tracing::warn!(
                parcel.id = %event.id,
                sender = %event.source,
                check = e.check(),
                "the VeraId bundle does not verify"
            );
            return incoming.refuse(Refusal::BundleInvalid);
        }
    };
    let Ok(request) = parse_contact_pairing_request(&verified.plaintext) else {
        return incoming.refuse(Refusal::NotAContactPairingRequest);
    };
    let signer = verified
        .member
        .user
        .is_some()
        .then(|| VeraId::from_verified(&verified.member.veraid_id()));
    let verdict = judge(SignedRequest {
        signer,
        requester_key: request.requester_key,
        prospective_contact: &request.prospective_contact,
        sender: &event.source,
        bundle: &event.data,
    });
    match verdict {
        Verdict::Refused(reason) => incoming.refuse(reason),
        Verdict::Failure(reason) => fail(incoming, reason, &request.prospective_contact).await,
        Verdict::Request(request) => {
            let submission = PairingSubmission {
                event: incoming.key(),
                server_id: incoming.server_id().to_owned(),
                requester_digest: state.digester.digest(&request.requester),
                target_digest: state.digester.digest(&request.target),
                request,
                now,
                request_expiry: now.plus(state.request_ttl),
                message_expiry: now.plus(state.message_ttl),
                limits: state.limits,
                at_ceiling: state.store_counts.at_ceiling(state.pending_ceiling),
                match_order: state.match_order,
            };
            super::pairing_request::submit(incoming, submission).await
        }
    }
}

/// Sends the requester a `ContactPairingFailure`, once per event: the event is recorded
/// with the message, so a redelivery sends no second one.
async fn fail(
    incoming: &Incoming<'_>,
    reason: FailureReason,
    prospective_contact: &str,
) -> Result<(), ApiError> {
    let (state, event) = (incoming.state, incoming.event);
    // The sender of an event is an endpoint id (the ingress checks it).
    let Ok(requester) = EndpointId::parse(&event.source) else {
        return incoming.refuse(Refusal::KeyNotSender);
    };
    let now = incoming.now();
    let cause = incoming.key();
    let message = OutgoingMessage::caused_by(
        &cause,
        MessageKind::CONTACT_PAIRING_FAILURE,
        incoming.server_id(),
        requester,
        CONTACT_PAIRING_FAILURE_TYPE,
        encode_failure(prospective_contact, reason),
        now,
        now.plus(state.message_ttl),
    );
    let submission = EventMessages {
        event: cause,
        messages: vec![message],
        event_expiry: now.plus(state.request_ttl),
    };
    match incoming
        .commit(state.store.record_and_queue(submission))
        .await?
    {
        QueueOutcome::Duplicate => incoming.duplicate(),
        QueueOutcome::Queued => {
            state.metrics.pairing_failure(reason.as_str());
            tracing::info!(
                parcel.id = %event.id,
                sender = %event.source,
                reason = reason.as_str(),
                code = reason.code(),
                "signed pairing request refused with a failure message"
            );
            incoming.queued("failed");
        }
    }
    Ok(())
}
