//! The signed pairing protocol's messages (veraid.md §2, §12): the plaintext a VeraId
//! bundle signs, and the failure the server sends back.
//!
//! ```asn1
//! ContactPairingRequest ::= SEQUENCE {
//!     requesterAwalaEndpointPublicKey [0] IMPLICIT SubjectPublicKeyInfo,
//!     prospectiveContactVeraid        [1] IMPLICIT UTF8String }
//! ContactPairingFailure ::= SEQUENCE {
//!     prospectiveContactVeraid [0] IMPLICIT UTF8String,
//!     reason                   [1] IMPLICIT INTEGER }
//! ```
//!
//! Strict DER, as both Letro apps write it.

use der::asn1::{ContextSpecific, Utf8StringRef};
use der::{Decode, Encode, Sequence, TagMode, TagNumber};
use spki::SubjectPublicKeyInfoRef;

use super::awala::{KeyError, canonical_rsa_spki};
use crate::domain::signed::FailureReason;

/// Content type of a signed pairing request, both from a client and, unchanged, to
/// the prospective contact on a match.
pub const CONTACT_PAIRING_REQUEST_TYPE: &str =
    "application/vnd.relaycorp.letro.contact-pairing.request";

/// Content type of the failure sent to the requester of a refused signed request.
pub const CONTACT_PAIRING_FAILURE_TYPE: &str =
    "application/vnd.relaycorp.letro.contact-pairing.failure";

#[derive(Sequence)]
struct RequestDer<'a> {
    #[asn1(context_specific = "0", tag_mode = "IMPLICIT")]
    key: SubjectPublicKeyInfoRef<'a>,
    #[asn1(context_specific = "1", tag_mode = "IMPLICIT")]
    prospective_contact: Utf8StringRef<'a>,
}

/// A `ContactPairingRequest`, read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContactPairingRequest {
    /// The requester's Awala key as canonical RSA SPKI DER, or none if it is a key of
    /// another kind (a failure of reason 2, not a malformed request).
    pub requester_key: Option<Vec<u8>>,
    /// The prospective contact, as written.
    pub prospective_contact: String,
}

/// The plaintext is not a `ContactPairingRequest` in DER.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("not a DER ContactPairingRequest")]
pub struct NotARequest;

/// Reads the plaintext of a signed pairing request.
pub fn parse_contact_pairing_request(
    plaintext: &[u8],
) -> Result<ContactPairingRequest, NotARequest> {
    let request = RequestDer::from_der(plaintext).map_err(|_| NotARequest)?;
    let spki = request.key.to_der().map_err(|_| NotARequest)?;
    let requester_key = match canonical_rsa_spki(&spki) {
        Ok(key) => Some(key),
        Err(KeyError::NotRsa) => None,
        Err(KeyError::NotSpki) => return Err(NotARequest),
    };
    Ok(ContactPairingRequest {
        requester_key,
        prospective_contact: request.prospective_contact.as_str().to_owned(),
    })
}

/// Renders a `ContactPairingFailure` for `prospective_contact` (as the request wrote it).
pub fn encode_failure(prospective_contact: &str, reason: FailureReason) -> Vec<u8> {
    // The contact came from a UTF8String and the reason is a small integer: neither can
    // fail to encode, but an empty Vec is the answer if der ever disagrees.
    (|| -> der::Result<Vec<u8>> {
        let contact = ContextSpecific {
            tag_number: TagNumber(0),
            tag_mode: TagMode::Implicit,
            value: Utf8StringRef::new(prospective_contact)?,
        };
        let reason = ContextSpecific {
            tag_number: TagNumber(1),
            tag_mode: TagMode::Implicit,
            value: reason.code(),
        };
        let mut content = contact.to_der()?;
        content.extend(reason.to_der()?);
        let mut out = vec![0x30];
        der::Length::try_from(content.len())?.encode_to_vec(&mut out)?;
        out.extend(content);
        Ok(out)
    })()
    .unwrap_or_default()
}

/// Renders a `ContactPairingRequest` (what a client signs; for tests, the demo and the
/// benchmark). `key_der` must be an SPKI in DER.
pub fn encode_contact_pairing_request(key_der: &[u8], prospective_contact: &str) -> Vec<u8> {
    (|| -> der::Result<Vec<u8>> {
        RequestDer {
            key: SubjectPublicKeyInfoRef::from_der(key_der)?,
            prospective_contact: Utf8StringRef::new(prospective_contact)?,
        }
        .to_der()
    })()
    .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_failure_of_veraid_md_section_2() {
        assert_eq!(
            encode_failure("bob@example.org", FailureReason::InvalidTargetVeraid),
            [
                0x30, 0x14, 0x80, 0x0f, 0x62, 0x6f, 0x62, 0x40, 0x65, 0x78, 0x61, 0x6d, 0x70, 0x6c,
                0x65, 0x2e, 0x6f, 0x72, 0x67, 0x81, 0x01, 0x01
            ]
        );
    }

    #[test]
    fn not_requests() {
        for bad in [
            &b"hello"[..],
            b"alice@example.com,bob@example.com,AAAA",
            b"",
            b"\x30\x00",
        ] {
            assert_eq!(
                parse_contact_pairing_request(bad),
                Err(NotARequest),
                "{bad:?}"
            );
        }
    }
}
