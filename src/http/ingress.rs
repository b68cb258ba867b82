//! `POST /`: incoming service messages from the Awala Internet Endpoint.

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use tracing::Instrument;

use super::{ApiError, AppState};
use crate::clock;
use crate::codec::cloudevent::{CloudEvent, INCOMING_TYPE, decode_http, is_header_safe};
use crate::codec::connparams::{decode_connection_params, pda_signature_verifies};
use crate::codec::pairing::{
    PAIRING_AUTH_TYPE, PAIRING_REQUEST_TYPE, encode_completion, parse_request,
};
use crate::domain::authorisation::check_authorisation;
use crate::domain::{EventKey, MessageKind, OutgoingMessage, PairingRequest, Refusal};
use crate::store::{
    CompletionOutcome, CompletionSubmission, PairingOutcome, PairingSubmission, StoreError,
};
use crate::telemetry::request_id;

/// Reads, decodes and routes one event.
pub(super) async fn ingest(State(state): State<AppState>, request: Request) -> Response {
    let request_id = request_id(
        request.headers().get("x-request-id").map(|v| v.as_bytes()),
        request.headers().get("traceparent").map(|v| v.as_bytes()),
    );
    let span = tracing::info_span!("request", request_id = %request_id);
    let metrics = state.metrics.clone();
    let started = std::time::Instant::now();
    let response = ingest_event(state, request).instrument(span).await;
    metrics.request_answered(response.status().as_u16(), started.elapsed());
    response
}

async fn ingest_event(state: AppState, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let event = match read_event(&state, &parts.headers, body).await {
        Ok(event) => event,
        Err(e) => return e.into_response(),
    };
    match handle(&state, &event).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => e.into_response(),
    }
}

async fn read_event(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
) -> Result<CloudEvent, ApiError> {
    let limit = state.max_body_bytes;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) {
        return Err(too_large(state));
    }
    let read = tokio::time::timeout(state.body_read_timeout, Limited::new(body, limit).collect());
    let bytes = match read.await {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => {
            return Err(too_large(state));
        }
        Ok(Err(e)) => {
            tracing::info!(
                parcel.id = %raw_header(headers, "ce-id"),
                sender = %raw_header(headers, "ce-source"),
                error = %e,
                "could not read the body; answering 400"
            );
            state.metrics.event("unknown", "unreadable_body");
            return Err(ApiError::BadRequest(format!("could not read body: {e}")));
        }
        Err(_) => {
            tracing::info!(
                parcel.id = %raw_header(headers, "ce-id"),
                sender = %raw_header(headers, "ce-source"),
                timeout = ?state.body_read_timeout,
                "body not sent in time; answering 408"
            );
            state.metrics.event("unknown", "body_timeout");
            return Err(ApiError::BodyTimeout);
        }
    };
    let event = decode_http(
        headers.iter().map(|(n, v)| (n.as_str(), v.as_bytes())),
        bytes.to_vec(),
    )
    .map_err(|e| reject(state, headers, "not_cloudevent", e.to_string()))?;
    if event.ty != INCOMING_TYPE {
        return Err(reject(
            state,
            headers,
            "wrong_type",
            format!("unexpected event type {:?}", event.ty),
        ));
    }
    match &event.subject {
        None => {
            return Err(reject(
                state,
                headers,
                "missing_subject",
                "missing subject".into(),
            ));
        }
        Some(s) if !is_header_safe(s) => {
            return Err(reject(
                state,
                headers,
                "invalid_subject",
                "subject is not a valid endpoint id".into(),
            ));
        }
        Some(_) => {}
    }
    if event.data_content_type.is_none() {
        return Err(reject(
            state,
            headers,
            "missing_content_type",
            "missing content type".into(),
        ));
    }
    Ok(event)
}

fn too_large(state: &AppState) -> ApiError {
    tracing::info!(
        limit = state.max_body_bytes,
        "body over the limit; answering 413"
    );
    state.metrics.event("unknown", "too_large");
    ApiError::TooLarge
}

/// Whatever a header says, shortened, for correlating a request that did not parse.
fn raw_header(headers: &HeaderMap, name: &str) -> String {
    headers
        .get(name)
        .map(|v| {
            String::from_utf8_lossy(v.as_bytes())
                .chars()
                .take(100)
                .collect::<String>()
        })
        .unwrap_or_default()
}

fn reject(state: &AppState, headers: &HeaderMap, outcome: &str, reason: String) -> ApiError {
    tracing::info!(
        parcel.id = %raw_header(headers, "ce-id"),
        sender = %raw_header(headers, "ce-source"),
        %reason,
        "not an event we take; answering 400"
    );
    state.metrics.event("unknown", outcome);
    ApiError::BadRequest(reason)
}

/// The service message type: the media type without parameters, lower-cased.
fn media_type(event: &CloudEvent) -> String {
    let ct = event.data_content_type.as_deref().unwrap_or_default();
    ct.split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase()
}

async fn handle(state: &AppState, event: &CloudEvent) -> Result<(), ApiError> {
    let media = media_type(event);
    match media.as_str() {
        PAIRING_REQUEST_TYPE => handle_pairing_request(state, event).await,
        PAIRING_AUTH_TYPE => handle_pairing_auth(state, event).await,
        _ => {
            state.metrics.event("unsupported", "unsupported_type");
            tracing::info!(
                parcel.id = %event.id,
                sender = %event.source,
                content_type = %media,
                "unsupported service message type; answering 400"
            );
            Err(ApiError::BadRequest(format!(
                "unsupported content type {media:?}"
            )))
        }
    }
}

fn refuse(
    state: &AppState,
    event: &CloudEvent,
    kind: &str,
    reason: Refusal,
) -> Result<(), ApiError> {
    tracing::warn!(
        parcel.id = %event.id,
        sender = %event.source,
        reason = reason.as_str(),
        "refused {kind}: {reason}"
    );
    state.metrics.refusal(reason.as_str());
    state.metrics.event(kind, "refused");
    Ok(())
}

async fn handle_pairing_request(state: &AppState, event: &CloudEvent) -> Result<(), ApiError> {
    const KIND: &str = "pairing-request";
    let fields = match parse_request(&event.data) {
        Ok(fields) => fields,
        Err(reason) => return refuse(state, event, KIND, reason),
    };
    let request = match PairingRequest::new(
        fields.requester,
        fields.target,
        fields.key_der,
        &event.source,
    ) {
        Ok(request) => request,
        Err(reason) => return refuse(state, event, KIND, reason),
    };
    let requester_digest = state.digester.digest(&request.requester);
    let target_digest = state.digester.digest(&request.target);
    let now = clock::now();
    let submission = PairingSubmission {
        event: EventKey {
            source: event.source.clone(),
            id: event.id.clone(),
        },
        server_id: event.subject.clone().unwrap_or_default(),
        request,
        requester_digest,
        target_digest,
        now,
        request_expiry: now.plus(state.request_ttl),
        message_expiry: now.plus(state.message_ttl),
        limits: state.limits,
    };
    let started = std::time::Instant::now();
    let outcome = state
        .store
        .submit_pairing_request(submission)
        .await
        .map_err(|e| unavailable(state, event, KIND, e))?;
    state.metrics.committed(KIND, started.elapsed());
    let (requester, target) = (requester_digest.short(), target_digest.short());
    match outcome {
        PairingOutcome::Duplicate => {
            state.metrics.event(KIND, "duplicate");
            tracing::info!(parcel.id = %event.id, sender = %event.source, "duplicate delivery ignored");
        }
        PairingOutcome::Refused(reason) => {
            if reason == Refusal::ReplacesOtherEndpoint {
                state.metrics.replaced_other_endpoint();
            }
            return refuse(state, event, KIND, reason);
        }
        PairingOutcome::Stored { replaced } => {
            state.metrics.event(KIND, "stored");
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
            state.metrics.event(KIND, "matched");
            state.metrics.matched();
            tracing::info!(
                parcel.id = %event.id,
                sender = %event.source,
                requester, target,
                messages = messages.len(),
                "pairing matched"
            );
            wake_dispatcher(state);
        }
    }
    Ok(())
}

/// A store failure: counted, and answered 503 so the event is redelivered.
fn unavailable(state: &AppState, event: &CloudEvent, kind: &str, e: StoreError) -> ApiError {
    tracing::error!(
        parcel.id = %event.id,
        sender = %event.source,
        error = %e,
        "could not store the {kind}; answering 503 (the broker will redeliver)"
    );
    state.metrics.event(kind, "unavailable");
    ApiError::Unavailable(e)
}

/// Tells the dispatcher that messages were committed, or the log that they will wait.
fn wake_dispatcher(state: &AppState) {
    match &state.dispatcher {
        Some(dispatcher) => dispatcher.wake(),
        None => tracing::warn!("no sink configured (K_SINK): outgoing messages wait in the outbox"),
    }
}

async fn handle_pairing_auth(state: &AppState, event: &CloudEvent) -> Result<(), ApiError> {
    const KIND: &str = "pairing-auth";
    let params = match decode_connection_params(&event.data) {
        Ok(params) => params,
        Err(_) => return refuse(state, event, KIND, Refusal::ParamsMalformed),
    };
    let now = clock::now();
    let checked = check_authorisation(
        &event.source,
        &params.identity_key_der,
        &params.pda,
        now,
        || pda_signature_verifies(&params.signed_pda, &params.identity_key_der),
    );
    let authorisation = match checked {
        Ok(authorisation) => authorisation,
        Err(reason) => return refuse(state, event, KIND, reason),
    };
    let cause = EventKey {
        source: event.source.clone(),
        id: event.id.clone(),
    };
    let message = OutgoingMessage::caused_by(
        &cause,
        MessageKind::PairingCompletion,
        event.subject.as_deref().unwrap_or_default(),
        authorisation.grantee.clone(),
        encode_completion(&authorisation.granter, &event.data),
        now,
        now.plus(state.message_ttl),
    );
    let submission = CompletionSubmission {
        event: cause,
        message,
        event_expiry: now.plus(state.request_ttl),
    };
    let started = std::time::Instant::now();
    let outcome = state
        .store
        .submit_completion(submission)
        .await
        .map_err(|e| unavailable(state, event, KIND, e))?;
    state.metrics.committed(KIND, started.elapsed());
    match outcome {
        CompletionOutcome::Duplicate => {
            state.metrics.event(KIND, "duplicate");
            tracing::info!(parcel.id = %event.id, sender = %event.source, "duplicate delivery ignored");
        }
        CompletionOutcome::Queued => {
            state.metrics.event(KIND, "forwarded");
            state.metrics.completed();
            tracing::info!(
                parcel.id = %event.id,
                sender = %event.source,
                grantee = authorisation.grantee.as_str(),
                "pairing authorisation forwarded as a completion"
            );
            wake_dispatcher(state);
        }
    }
    Ok(())
}
