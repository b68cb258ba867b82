//! Awala `PrivateEndpointConnParams` in DER: the content of a pairing authorisation.
//!
//! ```asn1
//! PrivateEndpointConnParams ::= SEQUENCE {
//!     identityKey            [0] IMPLICIT SubjectPublicKeyInfo,
//!     internetGatewayAddress [1] IMPLICIT VisibleString,
//!     deliveryAuth           [2] IMPLICIT CertificationPath,
//!     sessionKey             [3] IMPLICIT SessionKey OPTIONAL }
//! CertificationPath ::= SEQUENCE {
//!     leafCertificate        [0] IMPLICIT Certificate,       -- the PDA
//!     certificateAuthorities [1] IMPLICIT SEQUENCE OF Certificate }
//! SessionKey ::= SEQUENCE { keyId [0] IMPLICIT OCTET STRING,
//!                           publicKey [1] IMPLICIT SubjectPublicKeyInfo }
//! ```
//!
//! Strict DER: the BER-only forms the original library tolerated (trailing bytes,
//! indefinite or non-minimal lengths, an `A0` outer tag, a fifth field, non-minimal
//! serial numbers) are refused as malformed. Android never produces them.

use der::asn1::OctetString;
use der::{Decode, Encode, Sequence};
use spki::{ObjectIdentifier, SubjectPublicKeyInfoOwned};
use x509_cert::Certificate;
use x509_cert::ext::pkix::AuthorityKeyIdentifier;

use super::awala::canonical_rsa_spki;
use crate::domain::{AuthorityKeyId, PdaFacts, Timestamp};

/// `id-ecPublicKey`: session keys are ECDH keys.
const ID_EC_PUBLIC_KEY: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.2.1");
/// `id-RSASSA-PSS`: the signature algorithm of Awala certificates.
pub const ID_RSASSA_PSS: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.10");
/// `id-ce-authorityKeyIdentifier`.
const ID_CE_AUTHORITY_KEY_IDENTIFIER: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.29.35");

#[derive(Sequence)]
struct ConnParamsDer {
    #[asn1(context_specific = "0", tag_mode = "IMPLICIT")]
    identity_key: SubjectPublicKeyInfoOwned,
    // A VisibleString; der has no such type, and we only carry the bytes.
    #[asn1(context_specific = "1", tag_mode = "IMPLICIT")]
    internet_gateway_address: OctetString,
    #[asn1(context_specific = "2", tag_mode = "IMPLICIT")]
    delivery_auth: CertPathDer,
    #[asn1(context_specific = "3", tag_mode = "IMPLICIT", optional = "true")]
    session_key: Option<SessionKeyDer>,
}

#[derive(Sequence)]
struct CertPathDer {
    #[asn1(context_specific = "0", tag_mode = "IMPLICIT")]
    leaf: Certificate,
    // SEQUENCE OF, not SET OF: DER SET OF would force a sort order nobody writes.
    #[asn1(context_specific = "1", tag_mode = "IMPLICIT")]
    cas: Vec<Certificate>,
}

#[derive(Sequence)]
struct SessionKeyDer {
    #[asn1(context_specific = "0", tag_mode = "IMPLICIT")]
    key_id: OctetString,
    #[asn1(context_specific = "1", tag_mode = "IMPLICIT")]
    public_key: SubjectPublicKeyInfoOwned,
}

/// Why bytes are not connection params.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ParamsError {
    /// Not the ASN.1 structure above, in DER.
    #[error("not DER PrivateEndpointConnParams")]
    Structure,
    /// The identity key is not an RSA key.
    #[error("identity key is not an RSA key")]
    IdentityKey,
    /// The session key is not an EC key.
    #[error("session key is not an EC key")]
    SessionKey,
}

/// The signed part of the PDA, for signature verification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedPda {
    /// The signature algorithm's OID.
    pub algorithm: ObjectIdentifier,
    /// The signature algorithm's parameters, DER, if any.
    pub parameters_der: Option<Vec<u8>>,
    /// The signed bytes (the DER TBSCertificate).
    pub tbs_der: Vec<u8>,
    /// The signature.
    pub signature: Vec<u8>,
}

/// Decoded connection params.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionParams {
    /// The granter's identity key, canonical RSA SPKI DER.
    pub identity_key_der: Vec<u8>,
    /// What the pairing rules need of the delivery authorisation's leaf (the PDA).
    pub pda: PdaFacts,
    /// The PDA's signature and what it covers.
    pub signed_pda: SignedPda,
    /// How many certificate authorities came with the PDA.
    pub ca_count: usize,
}

/// Decodes connection params.
pub fn decode_connection_params(der: &[u8]) -> Result<ConnectionParams, ParamsError> {
    let params = ConnParamsDer::from_der(der).map_err(|_| ParamsError::Structure)?;
    let identity_spki = params
        .identity_key
        .to_der()
        .map_err(|_| ParamsError::Structure)?;
    let identity_key_der =
        canonical_rsa_spki(&identity_spki).map_err(|_| ParamsError::IdentityKey)?;
    if let Some(session_key) = &params.session_key
        && session_key.public_key.algorithm.oid != ID_EC_PUBLIC_KEY
    {
        return Err(ParamsError::SessionKey);
    }
    let leaf = &params.delivery_auth.leaf;
    let tbs = leaf.tbs_certificate();
    let subject_spki = tbs
        .subject_public_key_info()
        .to_der()
        .map_err(|_| ParamsError::Structure)?;
    let authority_key_id = match tbs.extensions().and_then(|exts| {
        exts.iter()
            .find(|e| e.extn_id == ID_CE_AUTHORITY_KEY_IDENTIFIER)
    }) {
        None => AuthorityKeyId::Absent,
        Some(ext) => match AuthorityKeyIdentifier::from_der(ext.extn_value.as_bytes()) {
            Ok(aki) => match aki.key_identifier {
                Some(id) => AuthorityKeyId::KeyIdentifier(id.as_bytes().to_vec()),
                None => AuthorityKeyId::WithoutKeyIdentifier,
            },
            Err(_) => return Err(ParamsError::Structure),
        },
    };
    let algorithm = leaf.signature_algorithm();
    let validity = tbs.validity();
    let ms = |t: &x509_cert::time::Time| {
        Timestamp(i64::try_from(t.to_unix_duration().as_millis()).unwrap_or(i64::MAX))
    };
    Ok(ConnectionParams {
        identity_key_der,
        pda: PdaFacts {
            authority_key_id,
            signed_with_rsa_pss: algorithm.oid == ID_RSASSA_PSS,
            subject_rsa_key_der: canonical_rsa_spki(&subject_spki).ok(),
            not_before: ms(&validity.not_before),
            not_after: ms(&validity.not_after),
        },
        signed_pda: SignedPda {
            algorithm: algorithm.oid,
            parameters_der: algorithm.parameters.as_ref().and_then(|p| p.to_der().ok()),
            tbs_der: tbs.to_der().map_err(|_| ParamsError::Structure)?,
            signature: leaf
                .signature()
                .as_bytes()
                .ok_or(ParamsError::Structure)?
                .to_vec(),
        },
        ca_count: params.delivery_auth.cas.len(),
    })
}

/// Encodes connection params in the layout above (what an Awala endpoint sends). The
/// certificates must be DER X.509; the session key, if any, is `(key id, SPKI DER)`.
pub fn encode_connection_params(
    identity_spki_der: &[u8],
    internet_gateway_address: &str,
    pda_der: &[u8],
    cas_der: &[Vec<u8>],
    session_key: Option<(&[u8], &[u8])>,
) -> der::Result<Vec<u8>> {
    let session_key = match session_key {
        Some((key_id, spki)) => Some(SessionKeyDer {
            key_id: OctetString::new(key_id)?,
            public_key: SubjectPublicKeyInfoOwned::from_der(spki)?,
        }),
        None => None,
    };
    ConnParamsDer {
        identity_key: SubjectPublicKeyInfoOwned::from_der(identity_spki_der)?,
        internet_gateway_address: OctetString::new(internet_gateway_address.as_bytes())?,
        delivery_auth: CertPathDer {
            leaf: Certificate::from_der(pda_der)?,
            cas: cas_der
                .iter()
                .map(|c| Certificate::from_der(c))
                .collect::<der::Result<_>>()?,
        },
        session_key,
    }
    .to_der()
}

const ID_SHA256: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.16.840.1.101.3.4.2.1");
const ID_SHA384: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.16.840.1.101.3.4.2.2");
const ID_SHA512: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.16.840.1.101.3.4.2.3");
const ID_MGF1: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.8");

/// Whether `pda`'s RSASSA-PSS signature verifies with the RSA key `issuer_spki_der`
/// (canonical SPKI DER). The hash is the one the signature parameters name (SHA-256,
/// -384 or -512), MGF1 must use the same hash, and the salt length is taken from them.
pub fn pda_signature_verifies(pda: &SignedPda, issuer_spki_der: &[u8]) -> bool {
    use der::asn1::{Any, UintRef};
    use rsa::signature::Verifier;

    if pda.algorithm != ID_RSASSA_PSS {
        return false;
    }
    let Some(params) = pda
        .parameters_der
        .as_deref()
        .and_then(|p| pkcs1::RsaPssParams::<Any>::from_der(p).ok())
    else {
        return false;
    };
    let mgf_hash_matches = params.mask_gen.oid == ID_MGF1
        && params
            .mask_gen
            .parameters
            .as_ref()
            .is_some_and(|h| h.oid == params.hash.oid);
    if !mgf_hash_matches {
        return false;
    }
    let Ok(spki) = spki::SubjectPublicKeyInfoRef::from_der(issuer_spki_der) else {
        return false;
    };
    let Some(key) = spki
        .subject_public_key
        .as_bytes()
        .and_then(|bits| pkcs1::RsaPublicKey::<UintRef<'_>>::from_der(bits).ok())
        .and_then(|k| rsa::PublicKey::try_from(k).ok())
    else {
        return false;
    };
    let Ok(signature) = rsa::pss::Signature::try_from(pda.signature.as_slice()) else {
        return false;
    };
    let salt = usize::from(params.salt_len);
    let tbs = pda.tbs_der.as_slice();
    match params.hash.oid {
        ID_SHA256 => rsa::pss::VerifyingKey::<sha2::Sha256>::new_with_salt_len(key, salt)
            .verify(tbs, &signature)
            .is_ok(),
        ID_SHA384 => rsa::pss::VerifyingKey::<sha2::Sha384>::new_with_salt_len(key, salt)
            .verify(tbs, &signature)
            .is_ok(),
        ID_SHA512 => rsa::pss::VerifyingKey::<sha2::Sha512>::new_with_salt_len(key, salt)
            .verify(tbs, &signature)
            .is_ok(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;
    use proptest::prelude::*;

    use crate::domain::EndpointId;

    fn vectors() -> serde_json::Value {
        serde_json::from_str(include_str!("../../tests/fixtures/awala-vectors.json"))
            .expect("vectors parse")
    }

    fn params_of(case: &serde_json::Value) -> Vec<u8> {
        STANDARD
            .decode(case["params_der_b64"].as_str().expect("params"))
            .expect("base64")
    }

    #[test]
    fn valid_vectors_decode_to_the_expected_ids() {
        let v = vectors();
        for case in v["valid_connection_params"].as_array().expect("group") {
            let name = case["name"].as_str().expect("name");
            let p = decode_connection_params(&params_of(case)).expect(name);
            let AuthorityKeyId::KeyIdentifier(aki) = &p.pda.authority_key_id else {
                panic!("{name}: no key identifier");
            };
            assert_eq!(
                EndpointId::from_digest(aki).as_str(),
                case["granter_id_from_pda_issuer"].as_str().expect("id"),
                "{name}"
            );
            let grantee =
                EndpointId::from_spki_der(p.pda.subject_rsa_key_der.as_ref().expect("RSA"));
            assert_eq!(
                grantee.as_str(),
                case["grantee_id"].as_str().expect("id"),
                "{name}"
            );
            assert_eq!(
                EndpointId::from_spki_der(&p.identity_key_der).as_str(),
                case["deserialized"]["identity_key_id"]
                    .as_str()
                    .expect("id"),
                "{name}"
            );
            assert_eq!(
                p.ca_count.to_string(),
                case["deserialized"]["ca_count"]
                    .to_string()
                    .trim_matches('"'),
                "{name}"
            );
            assert!(p.pda.signed_with_rsa_pss, "{name}");
            let verifies = pda_signature_verifies(&p.signed_pda, &p.identity_key_der);
            let expected = !matches!(
                name,
                "pda_signature_invalid_still_forwarded" | "identity_key_differs_from_pda_issuer"
            );
            assert_eq!(verifies, expected, "{name}: signature");
        }
    }

    #[test]
    fn invalid_vectors_are_malformed() {
        let v = vectors();
        for case in v["invalid_connection_params"].as_array().expect("group") {
            let name = case["name"].as_str().expect("name");
            assert!(
                decode_connection_params(&params_of(case)).is_err(),
                "{name} decoded"
            );
        }
    }

    #[test]
    fn accepted_edge_cases_follow_canonical_der() {
        let v = vectors();
        for case in v["accepted_edge_cases"].as_array().expect("group") {
            let name = case["name"].as_str().expect("name");
            let decoded = decode_connection_params(&params_of(case));
            if case["canonical_der"].as_bool() == Some(true) {
                assert!(decoded.is_ok(), "{name}: {decoded:?}");
            } else {
                // Deliberate: BER that only the lenient original accepted.
                assert!(decoded.is_err(), "{name} is BER but decoded");
            }
        }
    }

    #[test]
    fn issuer_and_handler_error_vectors_decode_with_the_flaw_visible() {
        let v = vectors();
        let find = |group: &str, name: &str| {
            v[group]
                .as_array()
                .expect("group")
                .iter()
                .find(|c| c["name"] == name)
                .map(params_of)
                .expect("case")
        };
        let p = decode_connection_params(&find(
            "not_issued_by_sender",
            "pda_without_authority_key_identifier",
        ))
        .expect("decodes");
        assert_eq!(p.pda.authority_key_id, AuthorityKeyId::Absent);
        let p = decode_connection_params(&find("handler_errors", "aki_without_key_identifier"))
            .expect("decodes");
        assert_eq!(p.pda.authority_key_id, AuthorityKeyId::WithoutKeyIdentifier);
        let p = decode_connection_params(&find("handler_errors", "pda_signed_with_pkcs1v15"))
            .expect("decodes");
        assert!(!p.pda.signed_with_rsa_pss);
        assert!(!pda_signature_verifies(&p.signed_pda, &p.identity_key_der));
        let p = decode_connection_params(&find("handler_errors", "pda_subject_key_is_ec"))
            .expect("decodes");
        assert_eq!(p.pda.subject_rsa_key_der, None);
    }

    #[test]
    fn encoding_the_decoded_parts_gives_the_original_bytes() {
        let v = vectors();
        for case in v["valid_connection_params"].as_array().expect("group") {
            let d = &case["deserialized"];
            let b64 =
                |x: &serde_json::Value| STANDARD.decode(x.as_str().expect("b64")).expect("base64");
            let cas: Vec<Vec<u8>> = d["cas_der_b64"]
                .as_array()
                .expect("cas")
                .iter()
                .map(b64)
                .collect();
            let key_id = b64(&d["session_key_id_b64"]);
            let session = b64(&d["session_public_key_spki_der_b64"]);
            let encoded = encode_connection_params(
                &b64(&d["identity_key_spki_der_b64"]),
                d["internet_gateway_address"].as_str().expect("address"),
                &b64(&d["pda_der_b64"]),
                &cas,
                Some((&key_id, &session)),
            )
            .expect("encodes");
            assert_eq!(encoded, params_of(case), "{}", case["name"]);
        }
    }

    proptest! {
        #[test]
        fn mutated_vectors_never_panic(case in 0usize..10, at in any::<usize>(), bit in 0u8..8, cut in any::<bool>()) {
            let v = vectors();
            let mut der = params_of(&v["valid_connection_params"][case]);
            let i = at % der.len();
            if cut {
                der.truncate(i);
            } else {
                der[i] ^= 1 << bit;
            }
            let _ = decode_connection_params(&der);
        }
    }
}
