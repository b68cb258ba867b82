//! Phase 1 of contact pairing: two halves of a request meet and become two matches.

use super::ids::{EndpointId, VeraId};
use super::refusal::Refusal;

/// A validated pairing request: `requester` wants to pair with `target`, and can be
/// reached at the endpoint whose identity key is `key_der`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PairingRequest {
    /// Who asks.
    pub requester: VeraId,
    /// Whom they want to pair with.
    pub target: VeraId,
    /// The requester's endpoint identity key, canonical SubjectPublicKeyInfo DER.
    pub key_der: Vec<u8>,
    /// The requester's endpoint id, derived from `key_der`.
    pub endpoint_id: EndpointId,
}

impl PairingRequest {
    /// Applies the rules that tie a parsed request to the event that carried it: the
    /// two users differ, and the key is the sender's own (anyone can claim a VeraId in
    /// this protocol, but nobody can send from an endpoint whose key they do not hold).
    pub fn new(
        requester: VeraId,
        target: VeraId,
        key_der: Vec<u8>,
        sender: &str,
    ) -> Result<Self, Refusal> {
        if requester == target {
            return Err(Refusal::SelfPairing);
        }
        let endpoint_id = EndpointId::from_spki_der(&key_der);
        if endpoint_id.as_str() != sender {
            return Err(Refusal::KeyNotSender);
        }
        Ok(Self {
            requester,
            target,
            key_der,
            endpoint_id,
        })
    }
}

/// What the store keeps of a request while it waits for its reverse half.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingRequest {
    /// The requester's endpoint id.
    pub endpoint_id: EndpointId,
    /// The requester's endpoint identity key.
    pub key_der: Vec<u8>,
}

/// One party's pairing match: everything it needs about its new contact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PairingMatch {
    /// Who receives this match.
    pub recipient_endpoint_id: EndpointId,
    /// The recipient's own VeraId.
    pub recipient_veraid: VeraId,
    /// The contact's VeraId.
    pub contact_veraid: VeraId,
    /// The contact's endpoint id.
    pub contact_endpoint_id: EndpointId,
    /// The contact's endpoint identity key (SPKI DER).
    pub contact_key_der: Vec<u8>,
}

/// What to do with an incoming request.
#[expect(
    clippy::large_enum_variant,
    reason = "built once per request, never stored"
)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// No reverse request yet: keep this one, replacing any earlier one for the pair.
    Wait,
    /// The reverse request is in: send each party the other's data and forget both.
    Matched {
        /// The match for the sender of the request in hand.
        for_requester: PairingMatch,
        /// The match for the sender of the stored reverse request.
        for_counterpart: PairingMatch,
    },
}

/// Decides the fate of `incoming`, given the stored reverse request if there is one.
///
/// The plain-text VeraIds of both matches come from `incoming`, which names both users:
/// the stored half keeps only digests.
pub fn decide(incoming: &PairingRequest, counterpart: Option<PendingRequest>) -> Decision {
    match counterpart {
        None => Decision::Wait,
        Some(counterpart) => Decision::Matched {
            for_requester: PairingMatch {
                recipient_endpoint_id: incoming.endpoint_id.clone(),
                recipient_veraid: incoming.requester.clone(),
                contact_veraid: incoming.target.clone(),
                contact_endpoint_id: counterpart.endpoint_id.clone(),
                contact_key_der: counterpart.key_der.clone(),
            },
            for_counterpart: PairingMatch {
                recipient_endpoint_id: counterpart.endpoint_id,
                recipient_veraid: incoming.target.clone(),
                contact_veraid: incoming.requester.clone(),
                contact_endpoint_id: incoming.endpoint_id.clone(),
                contact_key_der: incoming.key_der.clone(),
            },
        },
    }
}

/// Caps on what is kept waiting, so that one sender, or many senders aiming at one
/// user, cannot fill the store. None of these existed upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PendingLimits {
    /// Most requests one endpoint may have waiting at once.
    pub per_sender: u32,
    /// Most requests that may wait for one target VeraId at once.
    pub per_target: u32,
    /// Refuse a request that would replace a waiting one sent from another endpoint,
    /// instead of replacing it. Off by default: a reinstalled app has a new endpoint.
    pub refuse_endpoint_replacement: bool,
}

/// What the store sees around a request that is about to wait.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingCounts {
    /// Live requests waiting from the sender's endpoint, not counting the one this
    /// request would replace (counted up to the cap only).
    pub from_sender: u64,
    /// Live requests waiting for the same target, not counting the one this request
    /// would replace (counted up to the cap only).
    pub for_target: u64,
    /// The endpoint of the live request, for the same pair, that this one would replace.
    pub replaces: Option<EndpointId>,
}

/// Decides whether `request` may wait. Only a request that has to wait is checked: one
/// that completes a pair frees a slot rather than taking one.
pub fn admit(
    request: &PairingRequest,
    limits: &PendingLimits,
    counts: &PendingCounts,
) -> Result<(), Refusal> {
    let replaces_other = counts
        .replaces
        .as_ref()
        .is_some_and(|previous| *previous != request.endpoint_id);
    if limits.refuse_endpoint_replacement && replaces_other {
        return Err(Refusal::ReplacesOtherEndpoint);
    }
    if counts.for_target >= u64::from(limits.per_target) {
        return Err(Refusal::TargetPendingLimit);
    }
    if counts.from_sender >= u64::from(limits.per_sender) {
        return Err(Refusal::SenderPendingLimit);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: PendingLimits = PendingLimits {
        per_sender: 3,
        per_target: 2,
        refuse_endpoint_replacement: false,
    };

    fn counts(from_sender: u64, for_target: u64, replaces: Option<EndpointId>) -> PendingCounts {
        PendingCounts {
            from_sender,
            for_target,
            replaces,
        }
    }

    #[test]
    fn caps_refuse_only_at_the_limit() {
        let r = request("a@x.io", "b@y.io", b"ka");
        assert_eq!(admit(&r, &LIMITS, &counts(2, 1, None)), Ok(()));
        assert_eq!(
            admit(&r, &LIMITS, &counts(3, 0, None)),
            Err(Refusal::SenderPendingLimit)
        );
        assert_eq!(
            admit(&r, &LIMITS, &counts(0, 2, None)),
            Err(Refusal::TargetPendingLimit)
        );
    }

    #[test]
    fn replacing_another_endpoint_is_refused_only_when_asked() {
        let r = request("a@x.io", "b@y.io", b"ka");
        let other = Some(EndpointId::from_spki_der(b"kother"));
        let same = Some(r.endpoint_id.clone());
        assert_eq!(admit(&r, &LIMITS, &counts(0, 0, other.clone())), Ok(()));
        let strict = PendingLimits {
            refuse_endpoint_replacement: true,
            ..LIMITS
        };
        assert_eq!(
            admit(&r, &strict, &counts(0, 0, other)),
            Err(Refusal::ReplacesOtherEndpoint)
        );
        // The same app sending again is never a hijack.
        assert_eq!(admit(&r, &strict, &counts(0, 0, same)), Ok(()));
    }

    fn vid(s: &str) -> VeraId {
        VeraId::parse(s).expect("valid VeraId")
    }

    fn request(requester: &str, target: &str, key: &[u8]) -> PairingRequest {
        let sender = EndpointId::from_spki_der(key);
        PairingRequest::new(vid(requester), vid(target), key.to_vec(), sender.as_str())
            .expect("valid request")
    }

    #[test]
    fn request_rules() {
        let key = b"key".to_vec();
        let sender = EndpointId::from_spki_der(&key);
        assert_eq!(
            PairingRequest::new(vid("a@b.io"), vid("a@B.io"), key.clone(), sender.as_str()),
            Err(Refusal::SelfPairing)
        );
        let other = EndpointId::from_spki_der(b"other");
        assert_eq!(
            PairingRequest::new(vid("a@b.io"), vid("c@b.io"), key, other.as_str()),
            Err(Refusal::KeyNotSender)
        );
    }

    #[test]
    fn first_half_waits() {
        assert_eq!(
            decide(&request("a@x.io", "b@y.io", b"ka"), None),
            Decision::Wait
        );
    }

    #[test]
    fn each_party_gets_the_other_partys_data_never_its_own() {
        let a = request("a@x.io", "b@y.io", b"ka");
        let b = request("b@y.io", "a@x.io", b"kb");
        let stored_a = PendingRequest {
            endpoint_id: a.endpoint_id.clone(),
            key_der: a.key_der.clone(),
        };
        let Decision::Matched {
            for_requester,
            for_counterpart,
        } = decide(&b, Some(stored_a))
        else {
            panic!("expected a match");
        };
        // b sent the request in hand: b learns about a.
        assert_eq!(for_requester.recipient_endpoint_id, b.endpoint_id);
        assert_eq!(for_requester.recipient_veraid.as_str(), "b@y.io");
        assert_eq!(for_requester.contact_veraid.as_str(), "a@x.io");
        assert_eq!(for_requester.contact_endpoint_id, a.endpoint_id);
        assert_eq!(for_requester.contact_key_der, b"ka");
        // a learns about b.
        assert_eq!(for_counterpart.recipient_endpoint_id, a.endpoint_id);
        assert_eq!(for_counterpart.recipient_veraid.as_str(), "a@x.io");
        assert_eq!(for_counterpart.contact_veraid.as_str(), "b@y.io");
        assert_eq!(for_counterpart.contact_endpoint_id, b.endpoint_id);
        assert_eq!(for_counterpart.contact_key_der, b"kb");
    }
}
