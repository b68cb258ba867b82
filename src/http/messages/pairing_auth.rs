//! `pairing-auth-tmp` and `pairing-auth`: a pairing authorisation (Awala connection
//! params), checked the same way in both dialects and passed on to its grantee.

use super::Incoming;
use crate::codec::connparams::{decode_connection_params, pda_signature_verifies};
use crate::codec::pairing::{PAIRING_AUTH_TYPE, PAIRING_COMPLETION_TYPE, encode_completion};
use crate::domain::authorisation::check_authorisation;
use crate::domain::{MessageKind, OutgoingMessage, Refusal};
use crate::http::ApiError;
use crate::store::{EventMessages, QueueOutcome};

/// What the grantee receives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Reply {
    /// A `pairing-completion-tmp`, `granterId,base64(params)` (the seed document).
    Completion,
    /// The incoming body unchanged, as `pairing-auth` (what the 2023 app reads).
    Forward,
}

pub(super) async fn handle(incoming: &Incoming<'_>, reply: Reply) -> Result<(), ApiError> {
    let (state, event) = (incoming.state, incoming.event);
    let params = match decode_connection_params(&event.data) {
        Ok(params) => params,
        Err(_) => return incoming.refuse(Refusal::ParamsMalformed),
    };
    let now = incoming.now();
    let checked = check_authorisation(
        &event.source,
        &params.identity_key_der,
        &params.pda,
        now,
        || pda_signature_verifies(&params.signed_pda, &params.identity_key_der),
    );
    let authorisation = match checked {
        Ok(authorisation) => authorisation,
        Err(reason) => return incoming.refuse(reason),
    };
    let (kind, content_type, content) = match reply {
        Reply::Completion => (
            MessageKind::PAIRING_COMPLETION,
            PAIRING_COMPLETION_TYPE,
            encode_completion(&authorisation.granter, &event.data),
        ),
        Reply::Forward => (
            MessageKind::PAIRING_AUTH,
            PAIRING_AUTH_TYPE,
            event.data.clone(),
        ),
    };
    let cause = incoming.key();
    let message = OutgoingMessage::caused_by(
        &cause,
        kind,
        incoming.server_id(),
        authorisation.grantee.clone(),
        content_type,
        content,
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
            state.metrics.completed();
            tracing::info!(
                parcel.id = %event.id,
                sender = %event.source,
                grantee = authorisation.grantee.as_str(),
                "pairing authorisation forwarded to its grantee"
            );
            incoming.queued("forwarded");
        }
    }
    Ok(())
}
