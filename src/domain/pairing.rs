//! Phase 1 of contact pairing: two halves of a request meet and become two matches.

use super::ids::{EndpointId, VeraId};
use super::refusal::Refusal;

/// The protocol a pairing request was made in. Requests of different protocols never
/// match each other: each party must receive what its own app can read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// `pairing-request-tmp`: unsigned `requester,target,base64(key)`; the offer is the
    /// requester's endpoint key (SPKI DER).
    Tmp,
    /// `contact-pairing.request`: a VeraId SignatureBundle whose plaintext names the
    /// prospective contact; the offer is the bundle itself, forwarded unchanged.
    Signed,
}

impl Protocol {
    /// The name stored beside a pending request.
    pub fn name(self) -> &'static str {
        match self {
            Self::Tmp => "tmp",
            Self::Signed => "signed",
        }
    }

    /// The protocol named `name`, if this build knows it.
    pub fn from_name(name: &str) -> Option<Self> {
        [Self::Tmp, Self::Signed]
            .into_iter()
            .find(|p| p.name() == name)
    }
}

/// What a request hands the other party when the pair matches, in its protocol's terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Offer {
    /// The protocol that gives the bytes their meaning.
    pub protocol: Protocol,
    /// For [`Protocol::Tmp`], the requester's endpoint identity key (canonical SPKI DER);
    /// for [`Protocol::Signed`], the request's SignatureBundle as received.
    pub bytes: Vec<u8>,
}

/// A validated pairing request: `requester` wants to pair with `target`, from the
/// endpoint `endpoint_id`, offering `offer` to the target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PairingRequest {
    /// Who asks.
    pub requester: VeraId,
    /// Whom they want to pair with.
    pub target: VeraId,
    /// The requester's endpoint id: the sender of the event.
    pub endpoint_id: EndpointId,
    /// What the target gets on a match.
    pub offer: Offer,
}

impl PairingRequest {
    /// A tmp-protocol request, after the rules that tie a parsed request to the event
    /// that carried it: the two users differ, and the key is the sender's own (anyone can
    /// claim a VeraId in this protocol, but nobody can send from an endpoint whose key
    /// they do not hold).
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
            endpoint_id,
            offer: Offer {
                protocol: Protocol::Tmp,
                bytes: key_der,
            },
        })
    }
}

/// What the store keeps of a request while it waits for its reverse half (beside the
/// digests of the two VeraIds, which are its key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingRequest {
    /// The requester's endpoint id.
    pub endpoint_id: EndpointId,
    /// What the requester offered.
    pub offer: Offer,
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
    /// What the contact offered (for [`Protocol::Tmp`], its endpoint key, SPKI DER).
    pub contact_offer: Offer,
}

/// What to do with an incoming request.
#[expect(
    clippy::large_enum_variant,
    reason = "built once per request, never stored"
)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// No reverse request of the same protocol yet: keep this one, replacing any earlier
    /// one for the pair.
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
/// A reverse request of another protocol is no match: it keeps waiting for its own kind.
///
/// The plain-text VeraIds of both matches come from `incoming`, which names both users:
/// the stored half keeps only digests.
pub fn decide(incoming: &PairingRequest, counterpart: Option<PendingRequest>) -> Decision {
    match counterpart {
        Some(counterpart) if counterpart.offer.protocol == incoming.offer.protocol => {
            Decision::Matched {
                for_requester: PairingMatch {
                    recipient_endpoint_id: incoming.endpoint_id.clone(),
                    recipient_veraid: incoming.requester.clone(),
                    contact_veraid: incoming.target.clone(),
                    contact_endpoint_id: counterpart.endpoint_id.clone(),
                    contact_offer: counterpart.offer,
                },
                for_counterpart: PairingMatch {
                    recipient_endpoint_id: counterpart.endpoint_id,
                    recipient_veraid: incoming.target.clone(),
                    contact_veraid: incoming.requester.clone(),
                    contact_endpoint_id: incoming.endpoint_id.clone(),
                    contact_offer: incoming.offer.clone(),
                },
            }
        }
        _ => Decision::Wait,
    }
}

/// Caps on what is kept waiting, so that one sender, or many senders aiming at one
/// user, cannot fill the store. None of these existed upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PendingLimits {
    /// Most requests one endpoint may have waiting at once.
    pub per_sender: u32,
    /// Most requests one endpoint may have waiting for one target VeraId at once (per
    /// endpoint, so that no one can use up a target's cap and lock its contacts out).
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
    /// Live requests waiting for the same target from the sender's endpoint, not
    /// counting the one this request would replace (counted up to the cap only).
    pub for_target: u64,
}

/// Decides whether `request` may wait, given the counts around it and the endpoint of the
/// live request for the same pair that it `replaces`, if any. Only a request that has to
/// wait is checked: one that completes a pair frees a slot rather than taking one.
pub fn admit(
    request: &PairingRequest,
    limits: &PendingLimits,
    counts: &PendingCounts,
    replaces: Option<&EndpointId>,
) -> Result<(), Refusal> {
    let replaces_other = replaces.is_some_and(|previous| *previous != request.endpoint_id);
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

    fn counts(from_sender: u64, for_target: u64) -> PendingCounts {
        PendingCounts {
            from_sender,
            for_target,
        }
    }

    #[test]
    fn caps_refuse_only_at_the_limit() {
        let r = request("a@x.io", "b@y.io", b"ka");
        assert_eq!(admit(&r, &LIMITS, &counts(2, 1), None), Ok(()));
        assert_eq!(
            admit(&r, &LIMITS, &counts(3, 0), None),
            Err(Refusal::SenderPendingLimit)
        );
        assert_eq!(
            admit(&r, &LIMITS, &counts(0, 2), None),
            Err(Refusal::TargetPendingLimit)
        );
    }

    #[test]
    fn replacing_another_endpoint_is_refused_only_when_asked() {
        let r = request("a@x.io", "b@y.io", b"ka");
        let other = EndpointId::from_spki_der(b"kother");
        let same = r.endpoint_id.clone();
        assert_eq!(admit(&r, &LIMITS, &counts(0, 0), Some(&other)), Ok(()));
        let strict = PendingLimits {
            refuse_endpoint_replacement: true,
            ..LIMITS
        };
        assert_eq!(
            admit(&r, &strict, &counts(0, 0), Some(&other)),
            Err(Refusal::ReplacesOtherEndpoint)
        );
        // The same app sending again is never a hijack.
        assert_eq!(admit(&r, &strict, &counts(0, 0), Some(&same)), Ok(()));
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
    fn requests_of_different_protocols_never_match() {
        let tmp = request("a@x.io", "b@y.io", b"ka");
        let signed = PendingRequest {
            endpoint_id: EndpointId::from_spki_der(b"kb"),
            offer: Offer {
                protocol: Protocol::Signed,
                bytes: b"bundle".to_vec(),
            },
        };
        assert_eq!(decide(&tmp, Some(signed)), Decision::Wait);
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
            offer: a.offer.clone(),
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
        assert_eq!(for_requester.contact_offer.bytes, b"ka");
        // a learns about b.
        assert_eq!(for_counterpart.recipient_endpoint_id, a.endpoint_id);
        assert_eq!(for_counterpart.recipient_veraid.as_str(), "a@x.io");
        assert_eq!(for_counterpart.contact_veraid.as_str(), "b@y.io");
        assert_eq!(for_counterpart.contact_endpoint_id, b.endpoint_id);
        assert_eq!(for_counterpart.contact_offer.bytes, b"kb");
    }

    #[test]
    fn protocols_are_stored_by_name() {
        for protocol in [Protocol::Tmp, Protocol::Signed] {
            assert_eq!(Protocol::from_name(protocol.name()), Some(protocol));
        }
        // A row written by a newer build, in a protocol this one does not know.
        assert_eq!(Protocol::from_name("signed-v2"), None);
    }
}
