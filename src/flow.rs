//! The pairing flow, written once for every backend and protocol: what becomes of a
//! pairing request, given what the store holds for its pair.
//!
//! A backend records the event key, reads the pair's [`PairState`], calls [`plan`] and
//! carries the [`Plan`] out in the same transaction: upsert the request, or delete both
//! halves and queue the messages the plan holds, or take the event key back for a
//! refusal. It decides nothing and renders nothing itself. Pure: imports `domain` and
//! `codec` only.

use crate::codec::contact_pairing::CONTACT_PAIRING_REQUEST_TYPE;
use crate::codec::pairing::{MatchOrder, PAIRING_MATCH_TYPE, encode_match};
use crate::domain::pairing::{admit, decide};
use crate::domain::{
    Decision, EndpointId, EventKey, MessageId, MessageKind, OutgoingMessage, PairingMatch,
    PairingRequest, PendingCounts, PendingLimits, PendingRequest, Protocol, Refusal, Timestamp,
    VeraIdDigest,
};

/// An incoming pairing request, validated, with everything needed to store it or match it.
#[derive(Debug, Clone)]
pub struct PairingSubmission {
    /// The idempotency key of the event that carried it.
    pub event: EventKey,
    /// This server's endpoint id (the event's subject): the source of any reply.
    pub server_id: String,
    /// The request itself.
    pub request: PairingRequest,
    /// Digest of the requester's VeraId.
    pub requester_digest: VeraIdDigest,
    /// Digest of the target's VeraId.
    pub target_digest: VeraIdDigest,
    /// When it arrived.
    pub now: Timestamp,
    /// When the request, if it has to wait, stops waiting.
    pub request_expiry: Timestamp,
    /// The expiry of any message it causes.
    pub message_expiry: Timestamp,
    /// The caps a request that has to wait must fit under.
    pub limits: PendingLimits,
    /// The live pending requests were at the operator's ceiling when last counted: a
    /// request that would add one is refused (answered 503, redelivered later).
    pub at_ceiling: bool,
    /// How tmp matches list the two VeraIds.
    pub match_order: MatchOrder,
}

/// What the store holds for a request's pair, live (unexpired) rows only.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PairState {
    /// The reverse request (`target` asked for `requester`), if its protocol is one this
    /// build knows (a row of another one can never match this request anyway).
    pub counterpart: Option<PendingRequest>,
    /// The endpoint of the request this one would replace (`requester` asked for
    /// `target` before).
    pub previous: Option<EndpointId>,
}

/// What to do, in the transaction that recorded the event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Change nothing, and take the event key back: a redelivery is judged afresh.
    Refuse(Refusal),
    /// Upsert the request for its (requester, target) pair.
    Wait {
        /// The endpoint of the pending request it replaces, if any.
        replaced: Option<EndpointId>,
    },
    /// Delete both halves of the pair and queue these messages.
    Match {
        /// One for each party, the requester's first.
        messages: Vec<OutgoingMessage>,
    },
}

impl Plan {
    /// What the caller is told once the plan is committed.
    pub fn outcome(&self) -> PairingOutcome {
        match self {
            Self::Refuse(reason) => PairingOutcome::Refused(*reason),
            Self::Wait { replaced } => PairingOutcome::Stored {
                replaced: replaced.clone(),
            },
            Self::Match { messages } => PairingOutcome::Matched {
                messages: messages.iter().map(|m| m.id.clone()).collect(),
            },
        }
    }
}

/// What became of a pairing request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PairingOutcome {
    /// The same event was handled before; nothing changed.
    Duplicate,
    /// Stored to wait for the reverse request.
    Stored {
        /// The endpoint id of the pending request this one replaced, if any.
        replaced: Option<EndpointId>,
    },
    /// It would have had to wait, but did not fit under the caps: nothing was stored,
    /// and the event was not recorded (a redelivery is judged afresh).
    Refused(Refusal),
    /// Matched with the reverse request: both matches are in the outbox.
    Matched {
        /// The ids of the two matches.
        messages: Vec<MessageId>,
    },
}

/// Plans what `s` does to its pair in `state`. `counts` is asked only when the request
/// has to wait (a match frees a slot instead of taking one), so a backend that counts
/// with a query of its own saves it on every match; one that reads the counts with the
/// state anyway passes them in a closure that just returns them.
pub fn plan<E>(
    s: &PairingSubmission,
    state: PairState,
    counts: impl FnOnce() -> Result<PendingCounts, E>,
) -> Result<Plan, E> {
    match decide(&s.request, state.counterpart) {
        // At the ceiling only a request that adds no row may wait: one that replaces its
        // own pair's request. A match frees rows, so it always goes through.
        Decision::Wait if s.at_ceiling && state.previous.is_none() => {
            Ok(Plan::Refuse(Refusal::PendingCeiling))
        }
        Decision::Wait => {
            let counts = counts()?;
            Ok(
                match admit(&s.request, &s.limits, &counts, state.previous.as_ref()) {
                    Ok(()) => Plan::Wait {
                        replaced: state.previous,
                    },
                    Err(reason) => Plan::Refuse(reason),
                },
            )
        }
        Decision::Matched {
            for_requester,
            for_counterpart,
        } => Ok(Plan::Match {
            messages: vec![
                match_message(s, &for_requester),
                match_message(s, &for_counterpart),
            ],
        }),
    }
}

/// The match for one party, in the protocol both requests were made in.
fn match_message(s: &PairingSubmission, m: &PairingMatch) -> OutgoingMessage {
    let (kind, content_type, content) = match m.contact_offer.protocol {
        Protocol::Tmp => (
            MessageKind::PAIRING_MATCH,
            PAIRING_MATCH_TYPE,
            encode_match(m, s.match_order),
        ),
        // Each party gets the other's signed request byte for byte: its app verifies
        // the signature itself.
        Protocol::Signed => (
            MessageKind::CONTACT_PAIRING_REQUEST,
            CONTACT_PAIRING_REQUEST_TYPE,
            m.contact_offer.bytes.clone(),
        ),
    };
    OutgoingMessage::caused_by(
        &s.event,
        kind,
        &s.server_id,
        m.recipient_endpoint_id.clone(),
        content_type,
        content,
        s.now,
        s.message_expiry,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{VeraId, VeraIdDigester};

    const NOW: Timestamp = Timestamp(1_800_000_000_000);
    const LIMITS: PendingLimits = PendingLimits {
        per_sender: 2,
        per_target: 2,
        refuse_endpoint_replacement: true,
    };

    fn submission(
        requester: &str,
        target: &str,
        key: &[u8],
        order: MatchOrder,
    ) -> PairingSubmission {
        let sender = EndpointId::from_spki_der(key);
        let request = PairingRequest::new(
            VeraId::parse(requester).expect("requester"),
            VeraId::parse(target).expect("target"),
            key.to_vec(),
            sender.as_str(),
        )
        .expect("valid");
        let digester = VeraIdDigester::new(b"secret");
        PairingSubmission {
            event: EventKey {
                source: sender.as_str().to_owned(),
                id: "parcel".into(),
            },
            server_id: "0server".into(),
            requester_digest: digester.digest(&request.requester),
            target_digest: digester.digest(&request.target),
            request,
            now: NOW,
            request_expiry: Timestamp(NOW.0 + 10),
            message_expiry: Timestamp(NOW.0 + 20),
            limits: LIMITS,
            at_ceiling: false,
            match_order: order,
        }
    }

    fn pending(s: &PairingSubmission) -> PendingRequest {
        PendingRequest {
            endpoint_id: s.request.endpoint_id.clone(),
            offer: s.request.offer.clone(),
        }
    }

    fn no_counts() -> Result<PendingCounts, ()> {
        panic!("a match must not count")
    }

    fn counts(from_sender: u64, for_target: u64) -> impl FnOnce() -> Result<PendingCounts, ()> {
        move || {
            Ok(PendingCounts {
                from_sender,
                for_target,
            })
        }
    }

    #[test]
    fn a_first_half_waits_within_the_caps() {
        let a = submission("a@x.io", "b@y.io", b"ka", MatchOrder::ContactFirst);
        assert_eq!(
            plan(&a, PairState::default(), counts(1, 1)),
            Ok(Plan::Wait { replaced: None })
        );
        assert_eq!(
            plan(&a, PairState::default(), counts(2, 0)),
            Ok(Plan::Refuse(Refusal::SenderPendingLimit))
        );
        let other = EndpointId::from_spki_der(b"kother");
        let state = PairState {
            counterpart: None,
            previous: Some(other),
        };
        assert_eq!(
            plan(&a, state, counts(0, 0)),
            Ok(Plan::Refuse(Refusal::ReplacesOtherEndpoint))
        );
    }

    #[test]
    fn a_counting_error_is_the_plans_error() {
        let a = submission("a@x.io", "b@y.io", b"ka", MatchOrder::ContactFirst);
        assert_eq!(
            plan(&a, PairState::default(), || Err::<PendingCounts, _>("disk")),
            Err("disk")
        );
    }

    #[test]
    fn a_match_sends_each_party_the_other_in_the_configured_order() {
        let a = submission("a@x.io", "b@y.io", b"ka", MatchOrder::RecipientFirst);
        let b = submission("b@y.io", "a@x.io", b"kb", MatchOrder::RecipientFirst);
        let state = PairState {
            counterpart: Some(pending(&a)),
            previous: None,
        };
        let Ok(Plan::Match { messages }) = plan(&b, state, no_counts) else {
            panic!("expected a match");
        };
        let [for_b, for_a] = &messages[..] else {
            panic!("two messages");
        };
        assert_eq!(for_b.recipient, b.request.endpoint_id);
        assert_eq!(for_a.recipient, a.request.endpoint_id);
        for m in &messages {
            assert_eq!(m.content_type, PAIRING_MATCH_TYPE);
            assert_eq!(m.kind, MessageKind::PAIRING_MATCH);
            assert_eq!(m.source, "0server");
            assert_eq!((m.time, m.expiry), (NOW, Timestamp(NOW.0 + 20)));
        }
        let text = |m: &OutgoingMessage| String::from_utf8(m.content.clone()).expect("utf8");
        assert_eq!(
            text(for_b),
            format!("b@y.io,a@x.io,{},a2E=", a.request.endpoint_id)
        );
        assert_eq!(
            text(for_a),
            format!("a@x.io,b@y.io,{},a2I=", b.request.endpoint_id)
        );
        // Ids derive from the event: the same request handled again makes the same ones.
        let again = plan(
            &b,
            PairState {
                counterpart: Some(pending(&a)),
                previous: None,
            },
            no_counts,
        );
        assert_eq!(
            again.map(|p| p.outcome()),
            Ok(Plan::Match { messages }.outcome())
        );
    }
}
