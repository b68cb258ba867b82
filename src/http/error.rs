//! The one mapping from failures to HTTP status codes.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::store::StoreError;

/// Why a request was not handled. Knative retries 5xx, 404, 408, 409 and 429, so only a
/// transient condition may use a retried code; a permanent one must not.
///
/// | condition | status |
/// | --- | --- |
/// | handled, duplicate, or well-formed content refused (not an `ApiError`) | 204 |
/// | not a CloudEvent, wrong type, missing subject or content type, unsupported content type | 400 |
/// | body not sent within the body read timeout | 408 (retried: the sender was slow, the event may be fine) |
/// | body over the limit | 413 |
/// | transient trouble (database unavailable) | 503 |
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request is not an event we take. Not retried by Knative.
    #[error("bad request: {0}")]
    BadRequest(String),
    /// The body is over the limit. Not retried by Knative.
    #[error("body too large")]
    TooLarge,
    /// The body did not arrive in time. Retried by Knative, which is right: a slow
    /// network is transient.
    #[error("body read timed out")]
    BodyTimeout,
    /// Try again later. Retried.
    #[error("temporarily unavailable: {0}")]
    Unavailable(StoreError),
    /// The pending requests are at their ceiling: try again once matches and expiry
    /// have made room. Retried.
    #[error("pending requests at their ceiling")]
    AtCeiling,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match self {
            Self::BadRequest(reason) => {
                (StatusCode::BAD_REQUEST, format!("{reason}\n")).into_response()
            }
            Self::TooLarge => {
                let mut response =
                    (StatusCode::PAYLOAD_TOO_LARGE, "body too large\n").into_response();
                // The rest of the body is never read, so the connection cannot be reused.
                response
                    .headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
                response
            }
            Self::BodyTimeout => {
                let mut response =
                    (StatusCode::REQUEST_TIMEOUT, "body read timed out\n").into_response();
                response
                    .headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
                response
            }
            Self::AtCeiling => {
                let mut response = (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "pending requests at their ceiling; try again later\n",
                )
                    .into_response();
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("60"));
                response
            }
            // Logged where the context is (the parcel, or the probe), not here.
            Self::Unavailable(_) => {
                let mut response =
                    (StatusCode::SERVICE_UNAVAILABLE, "temporarily unavailable\n").into_response();
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                response
            }
        }
    }
}
