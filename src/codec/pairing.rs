//! The pairing message texts: comma-separated UTF-8 fields.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;

use super::awala::{KeyError, canonical_rsa_spki};
use crate::domain::{EndpointId, PairingMatch, Refusal, VeraId};

/// Content type of a pairing request.
pub const PAIRING_REQUEST_TYPE: &str = "application/vnd.relaycorp.letro.pairing-request-tmp";

/// Content type of a pairing authorisation in the seed's dialect (Awala connection
/// params, DER), answered by a [`PAIRING_COMPLETION_TYPE`].
pub const PAIRING_AUTH_TMP_TYPE: &str = "application/vnd.relaycorp.letro.pairing-auth-tmp";

/// Content type of a pairing authorisation as the 2023 Letro for Android app sends it
/// (Awala connection params, DER); forwarded to the grantee unchanged, with this same
/// content type.
pub const PAIRING_AUTH_TYPE: &str = "application/vnd.relaycorp.letro.pairing-auth";

/// Content type of a pairing match.
pub const PAIRING_MATCH_TYPE: &str = "application/vnd.relaycorp.letro.pairing-match-tmp";

/// Content type of a pairing completion: `granterId,base64(params)`.
pub const PAIRING_COMPLETION_TYPE: &str = "application/vnd.relaycorp.letro.pairing-completion-tmp";

/// The order of the two VeraIds in a tmp match. The seed document has the contact's
/// first; every Letro for Android release of 2023 reads the recipient's own first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MatchOrder {
    /// `contactVeraId,recipientVeraId,contactEndpointId,base64(contactKey)` (the seed).
    #[default]
    ContactFirst,
    /// `recipientVeraId,contactVeraId,contactEndpointId,base64(contactKey)` (the 2023 app).
    RecipientFirst,
}

impl MatchOrder {
    /// The setting's value for this order.
    pub fn name(self) -> &'static str {
        match self {
            Self::ContactFirst => "contact-first",
            Self::RecipientFirst => "recipient-first",
        }
    }
}

impl std::fmt::Display for MatchOrder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The largest pairing request we read. An RSA-8192 key is about 1.4 KiB in base64 and
/// VeraIds are short: anything bigger is not a request a client would send.
pub const MAX_REQUEST_BYTES: usize = 4096;

/// A syntactically valid pairing request, not yet tied to its sender.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestFields {
    /// The requester's VeraId.
    pub requester: VeraId,
    /// The target's VeraId.
    pub target: VeraId,
    /// The requester's key as canonical RSA SubjectPublicKeyInfo DER.
    pub key_der: Vec<u8>,
}

/// Parses `requester,target,base64(SPKI)`.
pub fn parse_request(content: &[u8]) -> Result<RequestFields, Refusal> {
    if content.len() > MAX_REQUEST_BYTES {
        return Err(Refusal::TooLarge);
    }
    let text = std::str::from_utf8(content).map_err(|_| Refusal::NotUtf8)?;
    let mut fields = text.split(',');
    let (Some(requester), Some(target), Some(key), None) =
        (fields.next(), fields.next(), fields.next(), fields.next())
    else {
        return Err(Refusal::FieldCount);
    };
    let requester = VeraId::parse(requester).map_err(|_| Refusal::InvalidRequester)?;
    let target = VeraId::parse(target).map_err(|_| Refusal::InvalidTarget)?;
    let key = STANDARD.decode(key).map_err(|_| Refusal::KeyNotBase64)?;
    let key_der = canonical_rsa_spki(&key).map_err(|e| match e {
        KeyError::NotSpki => Refusal::KeyNotSpki,
        KeyError::NotRsa => Refusal::KeyNotRsa,
    })?;
    Ok(RequestFields {
        requester,
        target,
        key_der,
    })
}

/// Renders a pairing request (what a client sends; used by tests and tools).
pub fn encode_request(requester: &str, target: &str, key_der: &[u8]) -> Vec<u8> {
    format!("{requester},{target},{}", STANDARD.encode(key_der)).into_bytes()
}

/// Renders a tmp match, with the two VeraIds in `order`, then
/// `contactEndpointId,base64(contactKey)`.
pub fn encode_match(m: &PairingMatch, order: MatchOrder) -> Vec<u8> {
    let (first, second) = match order {
        MatchOrder::ContactFirst => (&m.contact_veraid, &m.recipient_veraid),
        MatchOrder::RecipientFirst => (&m.recipient_veraid, &m.contact_veraid),
    };
    format!(
        "{},{},{},{}",
        first.as_str(),
        second.as_str(),
        m.contact_endpoint_id,
        STANDARD.encode(&m.contact_offer.bytes)
    )
    .into_bytes()
}

/// Renders a completion: `granterId,base64(params)`, the params exactly as received.
pub fn encode_completion(granter: &EndpointId, params_der: &[u8]) -> Vec<u8> {
    format!("{granter},{}", STANDARD.encode(params_der)).into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Offer, Protocol};
    use proptest::prelude::*;

    fn vector_key() -> (Vec<u8>, String) {
        let v: serde_json::Value =
            serde_json::from_str(include_str!("../../tests/fixtures/awala-vectors.json"))
                .expect("vectors parse");
        let k = &v["endpoint_keys"][0];
        (
            STANDARD
                .decode(k["spki_der_b64"].as_str().expect("b64"))
                .expect("base64"),
            k["pairing_request_content"]
                .as_str()
                .expect("content")
                .to_owned(),
        )
    }

    #[test]
    fn parses_the_vector_request() {
        let (der, content) = vector_key();
        let r = parse_request(content.as_bytes()).expect("valid");
        assert_eq!(r.requester.as_str(), "alice@applepie.rocks");
        assert_eq!(r.target.as_str(), "bob@tickety.boo");
        assert_eq!(r.key_der, der);
        assert_eq!(
            encode_request("alice@applepie.rocks", "bob@tickety.boo", &der),
            content.as_bytes()
        );
    }

    #[test]
    fn refusal_reasons() {
        let (der, _) = vector_key();
        let key = STANDARD.encode(&der);
        let cases: Vec<(Vec<u8>, Refusal)> = vec![
            (vec![b'a'; MAX_REQUEST_BYTES + 1], Refusal::TooLarge),
            (b"a@b.io,\xff@c.io,AAAA".to_vec(), Refusal::NotUtf8),
            (format!("a@b.io,{key}").into_bytes(), Refusal::FieldCount),
            (
                format!("a@b.io,c@d.io,{key},").into_bytes(),
                Refusal::FieldCount,
            ),
            (b"".to_vec(), Refusal::FieldCount),
            (
                format!("b.io,c@d.io,{key}").into_bytes(),
                Refusal::InvalidRequester,
            ),
            (
                format!("a@b.io,c d@d.io,{key}").into_bytes(),
                Refusal::InvalidTarget,
            ),
            (b"a@b.io,c@d.io,not base64!".to_vec(), Refusal::KeyNotBase64),
            (
                format!("a@b.io,c@d.io,{}", &key[..key.len() - 1]).into_bytes(),
                Refusal::KeyNotBase64,
            ),
            (
                format!("a@b.io,c@d.io,{}", &key[..key.len() - 4]).into_bytes(),
                Refusal::KeyNotSpki,
            ),
            (
                format!("a@b.io,c@d.io,{}", key.replace('+', "-").replace('/', "_")).into_bytes(),
                Refusal::KeyNotBase64,
            ),
            (
                format!("a@b.io,c@d.io,{key}\n").into_bytes(),
                Refusal::KeyNotBase64,
            ),
            (b"a@b.io,c@d.io,AAAA".to_vec(), Refusal::KeyNotSpki),
        ];
        for (content, expected) in cases {
            assert_eq!(
                parse_request(&content),
                Err(expected),
                "{:?}",
                String::from_utf8_lossy(&content)
            );
        }
    }

    #[test]
    fn match_layouts() {
        let m = PairingMatch {
            recipient_endpoint_id: EndpointId::from_spki_der(b"r"),
            recipient_veraid: VeraId::parse("alice@applepie.rocks").expect("valid"),
            contact_veraid: VeraId::parse("bob@tickety.boo").expect("valid"),
            contact_endpoint_id: EndpointId::from_spki_der(b"c"),
            contact_offer: Offer {
                protocol: Protocol::Tmp,
                bytes: vec![1, 2, 3],
            },
        };
        let contact = EndpointId::from_spki_der(b"c");
        // The protocol document's order.
        assert_eq!(
            String::from_utf8(encode_match(&m, MatchOrder::ContactFirst)).expect("utf8"),
            format!("bob@tickety.boo,alice@applepie.rocks,{contact},AQID")
        );
        // What the 2023 Letro for Android app parses: its own VeraId first.
        assert_eq!(
            String::from_utf8(encode_match(&m, MatchOrder::RecipientFirst)).expect("utf8"),
            format!("alice@applepie.rocks,bob@tickety.boo,{contact},AQID")
        );
    }

    proptest! {
        #[test]
        fn parse_never_panics(content in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = parse_request(&content);
        }

        #[test]
        fn mutated_valid_requests_never_panic(flip in 0usize..800, bit in 0u8..8) {
            let (_, content) = vector_key();
            let mut bytes = content.into_bytes();
            let i = flip % bytes.len();
            bytes[i] ^= 1 << bit;
            let _ = parse_request(&bytes);
        }
    }
}
