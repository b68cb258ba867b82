//! `pairing-request-tmp`: one half of a pair, stored until the other arrives; and the
//! storing and matching that every protocol's requests share.

use super::Incoming;
use crate::codec::pairing::parse_request;
use crate::domain::{PairingRequest, Refusal};
use crate::http::ApiError;
use crate::store::{PairingOutcome, PairingSubmission};

pub(super) async fn handle(incoming: &Incoming<'_>) -> Result<(), ApiError> {
    let (state, event) = (incoming.state, incoming.event);
    let fields = match parse_request(&event.data) {
        Ok(fields) => fields,
        Err(reason) => return incoming.refuse(reason),
    };
    let request = match PairingRequest::new(
        fields.requester,
        fields.target,
        fields.key_der,
        &event.source,
    ) {
        Ok(request) => request,
        Err(reason) => return incoming.refuse(reason),
    };
    let requester_digest = state.digester.digest(&request.requester);
    let target_digest = state.digester.digest(&request.target);
    let now = incoming.now();
    let submission = PairingSubmission {
        event: incoming.key(),
        server_id: incoming.server_id().to_owned(),
        request,
        requester_digest,
        target_digest,
        now,
        request_expiry: now.plus(state.request_ttl),
        message_expiry: now.plus(state.message_ttl),
        limits: state.limits,
        at_ceiling: state.store_counts.at_ceiling(state.pending_ceiling),
        match_order: state.match_order,
    };
    submit(incoming, submission).await
}

/// Stores or matches a validated request of any protocol, then counts and logs what
/// became of it: the tail that the tmp and signed handlers share.
pub(super) async fn submit(
    incoming: &Incoming<'_>,
    submission: PairingSubmission,
) -> Result<(), ApiError> {
    let (state, event) = (incoming.state, incoming.event);
    let (requester, target) = (
        submission.requester_digest.short(),
        submission.target_digest.short(),
    );
    let outcome = incoming
        .commit(state.store.submit_pairing_request(submission))
        .await?;
    match outcome {
        PairingOutcome::Duplicate => incoming.duplicate(),
        PairingOutcome::Refused(Refusal::PendingCeiling) => {
            // Not acknowledged: nothing is lost, the broker redelivers it later.
            if state.repeats.at_ceiling.first() {
                tracing::warn!(
                    parcel.id = %event.id,
                    sender = %event.source,
                    requester, target,
                    "pending requests at --max-pending-requests; answering 503 to a request that would wait"
                );
            }
            state.metrics.refusal(Refusal::PendingCeiling.as_str());
            state.metrics.event(incoming.label, "at_ceiling");
            return Err(ApiError::AtCeiling);
        }
        PairingOutcome::Refused(reason) => {
            if reason == Refusal::ReplacesOtherEndpoint {
                state.metrics.replaced_other_endpoint();
            }
            return incoming.refuse(reason);
        }
        PairingOutcome::Stored { replaced } => {
            state.metrics.event(incoming.label, "stored");
            if replaced
                .as_ref()
                .is_some_and(|old| old.as_str() != event.source)
            {
                state.metrics.replaced_other_endpoint();
                tracing::warn!(
                    parcel.id = %event.id,
                    sender = %event.source,
                    requester, target,
                    previous_endpoint = replaced.as_ref().map(|e| e.as_str()).unwrap_or_default(),
                    "pending request replaced by one from a different endpoint"
                );
            }
            tracing::info!(
                parcel.id = %event.id,
                sender = %event.source,
                requester, target,
                replaced = replaced.is_some(),
                "pairing request stored"
            );
        }
        PairingOutcome::Matched { messages } => {
            state.metrics.matched();
            tracing::info!(
                parcel.id = %event.id,
                sender = %event.source,
                requester, target,
                messages = messages.len(),
                "pairing matched"
            );
            incoming.queued("matched");
        }
    }
    Ok(())
}
