//! `POST /`: incoming service messages from the Awala Internet Endpoint, read within
//! bounds, decoded as CloudEvents and handed to their handler (`messages`).

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use tracing::Instrument;

use super::messages::ServiceMessage;
use super::{ApiError, AppState};
use crate::codec::cloudevent::{
    CloudEvent, DecodeError, INCOMING_TYPE, decode_http, is_header_safe,
};
use crate::telemetry::{clipped, clipped_bytes, request_id};

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
            if state.repeats.body_timeouts.first() {
                tracing::info!(
                    parcel.id = %raw_header(headers, "ce-id"),
                    sender = %raw_header(headers, "ce-source"),
                    timeout = ?state.body_read_timeout,
                    "body not sent in time; answering 408"
                );
            }
            state.metrics.event("unknown", "body_timeout");
            state.metrics.read_timeout("body");
            return Err(ApiError::BodyTimeout);
        }
    };
    let event = decode_http(
        headers.iter().map(|(n, v)| (n.as_str(), v.as_bytes())),
        Vec::from(bytes),
    )
    .map_err(|e| match e {
        DecodeError::TooLong { attribute, .. } => too_long(state, headers, attribute, &e),
        e => reject(state, headers, "not_cloudevent", e.to_string()),
    })?;
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

/// Whatever a header says, as received and clipped (`telemetry::clipped`), for
/// correlating a request that did not parse.
fn raw_header(headers: &HeaderMap, name: &str) -> String {
    headers
        .get(name)
        .map(|v| clipped_bytes(v.as_bytes()))
        .unwrap_or_default()
}

fn reject(
    state: &AppState,
    headers: &HeaderMap,
    outcome: &'static str,
    reason: String,
) -> ApiError {
    // The reason may quote what the sender sent (a type, a format, a JSON key): clipped,
    // in the log and in the answer.
    let reason = clipped(&reason).into_owned();
    tracing::info!(
        parcel.id = %raw_header(headers, "ce-id"),
        sender = %raw_header(headers, "ce-source"),
        %reason,
        "not an event we take; answering 400"
    );
    state.metrics.event("unknown", outcome);
    ApiError::BadRequest(reason)
}

/// An attribute longer than any real one (`ATTRIBUTE_LIMITS`): refused with 400 before
/// anything is stored, counted as a refusal, and logged with the parcel id and sender
/// clipped.
fn too_long(
    state: &AppState,
    headers: &HeaderMap,
    attribute: &'static str,
    error: &DecodeError,
) -> ApiError {
    const REASON: &str = "attribute_too_long";
    tracing::warn!(
        parcel.id = %raw_header(headers, "ce-id"),
        sender = %raw_header(headers, "ce-source"),
        reason = REASON,
        attribute,
        "refused: {error}; answering 400"
    );
    state.metrics.refusal(REASON);
    state.metrics.event("unknown", REASON);
    ApiError::BadRequest(error.to_string())
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
    match ServiceMessage::from_media_type(&media) {
        Some(message) => message.handle(state, event).await,
        None => {
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
