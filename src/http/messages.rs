//! One handler per incoming service message, as tokio's mini-redis has one module per
//! command: [`ServiceMessage`] names what the broker takes, by content type, and each
//! handler module parses, checks and decides; the steps every handler shares (refusing,
//! committing, counting, logging) are written once, on [`Incoming`].

mod contact_pairing_request;
mod pairing_auth;
mod pairing_request;

use std::future::Future;

use super::{ApiError, AppState};
use crate::codec::cloudevent::CloudEvent;
use crate::codec::contact_pairing::CONTACT_PAIRING_REQUEST_TYPE;
use crate::codec::pairing::{PAIRING_AUTH_TMP_TYPE, PAIRING_AUTH_TYPE, PAIRING_REQUEST_TYPE};
use crate::domain::{EventKey, Refusal, Timestamp};
use crate::store::StoreError;

/// The service messages the broker takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(
    clippy::enum_variant_names,
    reason = "the messages' own names; the signed protocol's is contact-pairing.request"
)]
pub(super) enum ServiceMessage {
    /// `pairing-request-tmp`: `requester,target,base64(key)`.
    PairingRequest,
    /// `pairing-auth-tmp` (the seed document): answered by a `pairing-completion-tmp`.
    PairingAuthTmp,
    /// `pairing-auth` (the 2023 Letro for Android app): forwarded to the grantee unchanged.
    PairingAuth,
    /// `contact-pairing.request` (Letro since late 2023): a VeraId-signed request.
    ContactPairingRequest,
}

impl ServiceMessage {
    /// The message of this media type (lower-case, without parameters), if we take it.
    pub(super) fn from_media_type(media: &str) -> Option<Self> {
        match media {
            PAIRING_REQUEST_TYPE => Some(Self::PairingRequest),
            PAIRING_AUTH_TMP_TYPE => Some(Self::PairingAuthTmp),
            PAIRING_AUTH_TYPE => Some(Self::PairingAuth),
            CONTACT_PAIRING_REQUEST_TYPE => Some(Self::ContactPairingRequest),
            _ => None,
        }
    }

    /// Its name in logs and in metrics' `content_type` label.
    pub(super) fn label(self) -> &'static str {
        match self {
            Self::PairingRequest => "pairing-request",
            Self::PairingAuthTmp => "pairing-auth-tmp",
            Self::PairingAuth => "pairing-auth",
            Self::ContactPairingRequest => "contact-pairing-request",
        }
    }

    /// Handles `event`, which carries this message. `Ok` means 204: handled, or refused
    /// for its content (logged and counted); an error is the status to answer.
    pub(super) async fn handle(self, state: &AppState, event: &CloudEvent) -> Result<(), ApiError> {
        let incoming = Incoming {
            state,
            event,
            label: self.label(),
        };
        match self {
            Self::PairingRequest => pairing_request::handle(&incoming).await,
            Self::PairingAuthTmp => {
                pairing_auth::handle(&incoming, pairing_auth::Reply::Completion).await
            }
            Self::PairingAuth => {
                pairing_auth::handle(&incoming, pairing_auth::Reply::Forward).await
            }
            Self::ContactPairingRequest => contact_pairing_request::handle(&incoming).await,
        }
    }
}

/// An event in the hands of its handler, with what every handler does to one.
struct Incoming<'a> {
    state: &'a AppState,
    event: &'a CloudEvent,
    /// [`ServiceMessage::label`].
    label: &'static str,
}

impl Incoming<'_> {
    /// The event's idempotency key: what a redelivery has in common with it.
    fn key(&self) -> EventKey {
        EventKey {
            source: self.event.source.clone(),
            id: self.event.id.clone(),
        }
    }

    /// This server's endpoint id: the subject of the incoming event, the source of replies.
    fn server_id(&self) -> &str {
        self.event.subject.as_deref().unwrap_or_default()
    }

    fn now(&self) -> Timestamp {
        self.state.clock.now()
    }

    /// Refuses the event for its content: logged with the parcel id and sender, counted,
    /// answered 204 (a redelivery would be refused again), nothing stored.
    fn refuse(&self, reason: Refusal) -> Result<(), ApiError> {
        tracing::warn!(
            parcel.id = %self.event.id,
            sender = %self.event.source,
            reason = reason.as_str(),
            "refused {}: {reason}",
            self.label
        );
        self.state.metrics.refusal(reason.as_str());
        self.state.metrics.event(self.label, "refused");
        Ok(())
    }

    /// Runs the store operation that handles the event, timing its commit. A store
    /// failure is logged, counted and answered 503, so that the broker redelivers.
    async fn commit<T>(
        &self,
        operation: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, ApiError> {
        let started = std::time::Instant::now();
        match operation.await {
            Ok(outcome) => {
                self.state.metrics.committed(self.label, started.elapsed());
                Ok(outcome)
            }
            Err(e) => {
                // During an outage every request fails the same way, about 500 a second
                // under the broker's retries: the first of each interval is logged, the
                // others summed up in one line per interval (`telemetry::Repeats`).
                if self.state.repeats.store_failures.first() {
                    tracing::error!(
                        parcel.id = %self.event.id,
                        sender = %self.event.source,
                        content_type = self.label,
                        error = %e,
                        "could not store the {}; answering 503 (the broker will redeliver)",
                        self.label
                    );
                }
                self.state.metrics.event(self.label, "unavailable");
                Err(ApiError::Unavailable(e))
            }
        }
    }

    /// A redelivery of an event already handled: counted, and it changed nothing.
    fn duplicate(&self) {
        self.state.metrics.event(self.label, "duplicate");
        tracing::info!(
            parcel.id = %self.event.id,
            sender = %self.event.source,
            "duplicate delivery ignored"
        );
    }

    /// Counts `outcome`, and tells the dispatcher that messages were committed.
    fn queued(&self, outcome: &'static str) {
        self.state.metrics.event(self.label, outcome);
        match &self.state.dispatcher {
            Some(dispatcher) => dispatcher.wake(),
            None => {
                tracing::warn!("no sink configured (K_SINK): outgoing messages wait in the outbox")
            }
        }
    }
}
