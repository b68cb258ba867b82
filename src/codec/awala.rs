//! Awala identity keys: RSA SubjectPublicKeyInfo in DER.

use der::asn1::{AnyRef, BitStringRef, UintRef};
use der::{Decode, Encode};
use spki::{AlgorithmIdentifier, SubjectPublicKeyInfo, SubjectPublicKeyInfoRef};

/// Why some bytes are not an Awala identity key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// Not a DER SubjectPublicKeyInfo.
    #[error("not a DER SubjectPublicKeyInfo")]
    NotSpki,
    /// A SubjectPublicKeyInfo, but not of an RSA key.
    #[error("not an RSA key")]
    NotRsa,
}

/// Parses an RSA SubjectPublicKeyInfo (strict DER, `rsaEncryption`) and returns its
/// canonical DER: algorithm parameters NULL, key re-encoded. The endpoint id is the
/// digest of this form, as the Awala libraries compute it from the re-exported key.
pub fn canonical_rsa_spki(der: &[u8]) -> Result<Vec<u8>, KeyError> {
    let spki = SubjectPublicKeyInfoRef::from_der(der).map_err(|_| KeyError::NotSpki)?;
    if spki.algorithm.oid != pkcs1::ALGORITHM_OID {
        return Err(KeyError::NotRsa);
    }
    if spki.algorithm.parameters.is_some_and(|p| !p.is_null()) {
        return Err(KeyError::NotRsa);
    }
    let bits = spki.subject_public_key.as_bytes().ok_or(KeyError::NotRsa)?;
    let key = pkcs1::RsaPublicKey::<UintRef<'_>>::from_der(bits).map_err(|_| KeyError::NotRsa)?;
    if key.modulus.as_bytes().is_empty() || key.public_exponent.as_bytes() <= [1u8].as_slice() {
        return Err(KeyError::NotRsa);
    }
    let key_der = key.to_der().map_err(|_| KeyError::NotRsa)?;
    let canonical = SubjectPublicKeyInfo {
        algorithm: AlgorithmIdentifier {
            oid: pkcs1::ALGORITHM_OID,
            parameters: Some(AnyRef::NULL),
        },
        subject_public_key: BitStringRef::from_bytes(&key_der).map_err(|_| KeyError::NotRsa)?,
    };
    canonical.to_der().map_err(|_| KeyError::NotRsa)
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;

    use crate::domain::EndpointId;

    fn vectors() -> serde_json::Value {
        serde_json::from_str(include_str!("../../tests/fixtures/awala-vectors.json"))
            .expect("vectors parse")
    }

    #[test]
    fn vector_endpoint_keys_give_the_expected_ids() {
        let v = vectors();
        let keys = v["endpoint_keys"].as_array().expect("endpoint_keys");
        let mut checked = 0;
        for k in keys {
            let der = STANDARD
                .decode(k["spki_der_b64"].as_str().expect("b64"))
                .expect("base64");
            match k["endpoint_id"].as_str() {
                Some(expected) => {
                    let canonical = canonical_rsa_spki(&der).expect("RSA key");
                    assert_eq!(EndpointId::from_spki_der(&canonical).as_str(), expected);
                    checked += 1;
                }
                // The RSASSA-PSS-OID key that the original library refused to import.
                None => assert_eq!(canonical_rsa_spki(&der), Err(KeyError::NotRsa)),
            }
        }
        assert_eq!(checked, 5);
    }

    #[test]
    fn non_keys_are_refused() {
        assert_eq!(canonical_rsa_spki(b""), Err(KeyError::NotSpki));
        assert_eq!(canonical_rsa_spki(b"\x30\x00"), Err(KeyError::NotSpki));
        let v = vectors();
        let der = STANDARD
            .decode(v["endpoint_keys"][0]["spki_der_b64"].as_str().expect("b64"))
            .expect("base64");
        let mut trailing = der.clone();
        trailing.push(0);
        assert_eq!(canonical_rsa_spki(&trailing), Err(KeyError::NotSpki));
        assert!(canonical_rsa_spki(&der[..der.len() - 1]).is_err());
    }

    #[test]
    fn ec_keys_are_not_rsa() {
        let v = vectors();
        let ec = STANDARD
            .decode(
                v["valid_connection_params"][0]["deserialized"]["session_public_key_spki_der_b64"]
                    .as_str()
                    .expect("b64"),
            )
            .expect("base64");
        assert_eq!(canonical_rsa_spki(&ec), Err(KeyError::NotRsa));
    }
}
