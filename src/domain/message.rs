//! Outgoing messages: what the broker sends to Letro users through the Awala Internet
//! Endpoint, with ids that stay the same however often a delivery is retried.

use std::borrow::Cow;

use sha2::{Digest, Sha256};

use super::ids::{EndpointId, EventKey};

/// Milliseconds since the Unix epoch. Stored as a plain integer in every backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(pub i64);

impl Timestamp {
    /// This instant plus a duration, saturating.
    pub fn plus(self, d: std::time::Duration) -> Self {
        let ms = i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        Self(self.0.saturating_add(ms))
    }
}

/// What an outgoing message is, as a short stable name: part of the message id
/// derivation, a metric label, and what operators see. Only a label: the message itself
/// (content type and bytes) is data, so a build can deliver rows of kinds it never makes.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MessageKind(Cow<'static, str>);

impl MessageKind {
    /// A pairing match (tmp protocol).
    pub const PAIRING_MATCH: Self = Self(Cow::Borrowed("pairing-match"));
    /// A pairing completion: `granterId,base64(params)` (the seed's phase 2).
    pub const PAIRING_COMPLETION: Self = Self(Cow::Borrowed("pairing-completion"));
    /// A pairing authorisation forwarded to its grantee unchanged (the 2023 app's phase 2).
    pub const PAIRING_AUTH: Self = Self(Cow::Borrowed("pairing-auth"));
    /// A signed pairing request forwarded to its prospective contact on a match.
    pub const CONTACT_PAIRING_REQUEST: Self = Self(Cow::Borrowed("contact-pairing-request"));
    /// A `ContactPairingFailure` to the requester of a refused signed request.
    pub const CONTACT_PAIRING_FAILURE: Self = Self(Cow::Borrowed("contact-pairing-failure"));

    /// The kind named `name`, as read back from storage.
    pub fn from_stored(name: String) -> Self {
        Self(Cow::Owned(name))
    }

    /// The name.
    pub fn name(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for MessageKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The CloudEvent id (and so the Awala parcel id) of an outgoing message.
///
/// 64 lower-case hex characters of SHA-256 over (incoming source, incoming id, kind,
/// recipient): at most 64 printable ASCII characters as RAMF requires, and identical
/// whenever the same incoming event is handled again, so the Internet gateway and the
/// device can merge duplicates.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MessageId(String);

impl MessageId {
    /// Derives the id of the `kind` message for `recipient` caused by `cause`.
    pub fn derive(cause: &EventKey, kind: &MessageKind, recipient: &EndpointId) -> Self {
        let mut h = Sha256::new();
        // Length-prefix each part so that no two different tuples hash the same bytes.
        for part in [
            cause.source.as_bytes(),
            cause.id.as_bytes(),
            kind.name().as_bytes(),
            recipient.as_str().as_bytes(),
        ] {
            h.update((part.len() as u64).to_be_bytes());
            h.update(part);
        }
        Self(super::hex::lower(&h.finalize()))
    }

    /// Wraps an id read back from storage.
    pub fn from_stored(s: String) -> Self {
        Self(s)
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A message waiting in the outbox, complete down to the bytes and the timestamps, so
/// that every delivery attempt sends exactly the same event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutgoingMessage {
    /// Stable CloudEvent id.
    pub id: MessageId,
    /// `ce-source`: this server's endpoint id, taken from the incoming event's subject.
    pub source: String,
    /// `ce-subject`: the recipient's endpoint id.
    pub recipient: EndpointId,
    /// What the message is (a label; see [`MessageKind`]).
    pub kind: MessageKind,
    /// The Awala service message type, sent as the CloudEvent `Content-Type`.
    pub content_type: String,
    /// The service message content.
    pub content: Vec<u8>,
    /// `ce-time`.
    pub time: Timestamp,
    /// `ce-expiry`: the message is dropped, undelivered, once this has passed.
    pub expiry: Timestamp,
}

impl OutgoingMessage {
    /// The `kind` message to `recipient` caused by the incoming event `cause`, sent from
    /// `source` (this server) at `time`, expiring at `expiry`. Its id is derived from the
    /// cause, so handling the same event again yields the same message.
    #[expect(
        clippy::too_many_arguments,
        reason = "each is one field of the message"
    )]
    pub fn caused_by(
        cause: &EventKey,
        kind: MessageKind,
        source: &str,
        recipient: EndpointId,
        content_type: &str,
        content: Vec<u8>,
        time: Timestamp,
        expiry: Timestamp,
    ) -> Self {
        Self {
            id: MessageId::derive(cause, &kind, &recipient),
            source: source.to_owned(),
            recipient,
            kind,
            content_type: content_type.to_owned(),
            content,
            time,
            expiry,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(source: &str, id: &str) -> EventKey {
        EventKey {
            source: source.into(),
            id: id.into(),
        }
    }

    #[test]
    fn message_ids_are_stable_and_distinct() {
        let r1 = EndpointId::from_spki_der(b"1");
        let r2 = EndpointId::from_spki_der(b"2");
        let a = MessageId::derive(&key("s", "i"), &MessageKind::PAIRING_MATCH, &r1);
        assert_eq!(
            a,
            MessageId::derive(&key("s", "i"), &MessageKind::PAIRING_MATCH, &r1)
        );
        assert_ne!(
            a,
            MessageId::derive(&key("s", "i"), &MessageKind::PAIRING_MATCH, &r2)
        );
        assert_ne!(
            a,
            MessageId::derive(&key("s", "j"), &MessageKind::PAIRING_MATCH, &r1)
        );
        // No ambiguity when bytes move between fields.
        assert_ne!(
            MessageId::derive(&key("ab", "c"), &MessageKind::PAIRING_MATCH, &r1),
            MessageId::derive(&key("a", "bc"), &MessageKind::PAIRING_MATCH, &r1)
        );
        assert_eq!(a.as_str().len(), 64);
        assert!(a.as_str().bytes().all(|b| b.is_ascii_hexdigit()));
    }

    #[test]
    fn ids_of_existing_kinds_are_what_earlier_releases_derived() {
        // docs/protocol.md §3.2: Alice's match when Bob's request `b-1` completes the pair.
        // Messages already queued keep their ids; a redelivery after an upgrade must
        // derive the same one, or the gateway could not merge the duplicate.
        let bob = "098b9544f6223a426bbfcec02d2293596fe4928eb18412dc6e63b41875301b463";
        let alice =
            EndpointId::parse("021208ff33689e93851eeff50b34197ffe189befe32d8ea7e0ef390133974c4a2")
                .expect("id");
        assert_eq!(
            MessageId::derive(&key(bob, "b-1"), &MessageKind::PAIRING_MATCH, &alice).as_str(),
            "bcf45be336215ff62fa1f964d3fd4024a0af9e7026a5992d6d9a7f4233b2da65"
        );
        // docs/protocol.md §3.4: the completion of vector `valid_connection_params[0]`.
        let grantee =
            EndpointId::parse("08fc312655268d37b066d53786cab50561db02e8bcb840bb82c9d9d62dbdc1a91")
                .expect("id");
        let granter = "09dbe189bcb70ff5dfcb5f94cf44296838983c4991e3b7747560a566033b1a908";
        assert_eq!(
            MessageId::derive(
                &key(granter, "p-1"),
                &MessageKind::PAIRING_COMPLETION,
                &grantee
            )
            .as_str(),
            "5b7f009540081838a28793ffeeb984f37de27f6ac6f0c115a6061f9b20fe20f6"
        );
        // A kind read back from storage derives as the constant it names.
        assert_eq!(
            MessageId::derive(
                &key(bob, "b-1"),
                &MessageKind::from_stored("pairing-match".into()),
                &alice
            ),
            MessageId::derive(&key(bob, "b-1"), &MessageKind::PAIRING_MATCH, &alice)
        );
    }
}
