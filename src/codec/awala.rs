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
    if is_canonical_rsa_spki(der) {
        return Ok(der.to_vec());
    }
    decode_and_reencode(der)
}

/// [`canonical_rsa_spki`] through the general DER decoder and encoder.
fn decode_and_reencode(der: &[u8]) -> Result<Vec<u8>, KeyError> {
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
    // Strict DER decoding refused every other spelling of a length, an integer or the bit
    // string, so the one choice left to an encoder is whether to write the parameters:
    // with NULL ones, the key came in its canonical form (the property test below holds
    // this against the re-encoding). That saves half of this function's time per request.
    if spki.algorithm.parameters.is_some() {
        return Ok(der.to_vec());
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

/// The DER of `rsaEncryption`'s AlgorithmIdentifier with NULL parameters, as a canonical
/// key spells it: SEQUENCE { OID 1.2.840.113549.1.1.1, NULL }.
const RSA_ALGORITHM: [u8; 15] = [
    0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00,
];

/// Whether `der` is already the canonical form [`canonical_rsa_spki`] returns, judged by
/// reading the bytes in place. Every key Letro sends is, and the general decoder took
/// about 1.5% of the server's CPU per pairing request to say so (issue 17). Anything
/// else (including every refusal, whose kind the general path decides) gets `false`
/// and goes the general way; the tests hold that whatever this accepts, that way
/// accepts unchanged.
fn is_canonical_rsa_spki(der: &[u8]) -> bool {
    let canonical = || -> Option<()> {
        let (spki, rest) = tlv(der, 0x30)?;
        let key_bits = spki.strip_prefix(&RSA_ALGORITHM)?;
        let (bits, after) = tlv(key_bits, 0x03)?;
        let (key, after_key) = tlv(bits.strip_prefix(&[0])?, 0x30)?;
        let (modulus, key_rest) = tlv(key, 0x02)?;
        let (exponent, key_end) = tlv(key_rest, 0x02)?;
        let ends = rest.is_empty() && after.is_empty() && after_key.is_empty();
        let modulus = positive_integer(modulus)?;
        let exponent = positive_integer(exponent)?;
        (ends && key_end.is_empty() && !modulus.is_empty() && exponent > [1u8].as_slice())
            .then_some(())
    };
    canonical().is_some()
}

/// Splits off one DER element of `tag` with its length in the shortest form (at most 3
/// length bytes: no key comes near 16 MiB): its content and what follows it.
fn tlv(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (&first, rest) = input.split_first()?;
    if first != tag {
        return None;
    }
    let (&length_byte, rest) = rest.split_first()?;
    let (length, rest) = if length_byte < 0x80 {
        (usize::from(length_byte), rest)
    } else {
        let count = usize::from(length_byte & 0x7f);
        if !(1..=3).contains(&count) || rest.len() < count || rest[0] == 0 {
            return None;
        }
        let length = rest[..count]
            .iter()
            .fold(0usize, |length, &b| length << 8 | usize::from(b));
        // The long form only where the short one cannot hold the length.
        if length < 0x80 {
            return None;
        }
        (length, &rest[count..])
    };
    (rest.len() >= length).then(|| rest.split_at(length))
}

/// The magnitude of a DER INTEGER's content if it is positive and minimally encoded:
/// a leading zero only before a byte with its top bit set.
fn positive_integer(content: &[u8]) -> Option<&[u8]> {
    match content {
        [0, next, ..] if *next >= 0x80 => Some(&content[1..]),
        [first, ..] if (0x01..0x80).contains(first) => Some(content),
        _ => None,
    }
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

    /// A valid key's canonical form, computed the long way: always re-encoded.
    fn reencoded(der: &[u8]) -> Vec<u8> {
        let spki = SubjectPublicKeyInfoRef::from_der(der).expect("spki");
        let bits = spki.subject_public_key.as_bytes().expect("bits");
        let key = pkcs1::RsaPublicKey::<UintRef<'_>>::from_der(bits).expect("key");
        let key_der = key.to_der().expect("encode");
        SubjectPublicKeyInfo {
            algorithm: AlgorithmIdentifier {
                oid: pkcs1::ALGORITHM_OID,
                parameters: Some(AnyRef::NULL),
            },
            subject_public_key: BitStringRef::from_bytes(&key_der).expect("bits"),
        }
        .to_der()
        .expect("encode")
    }

    fn vector_keys() -> Vec<Vec<u8>> {
        let v = vectors();
        v["endpoint_keys"]
            .as_array()
            .expect("endpoint_keys")
            .iter()
            .map(|k| {
                STANDARD
                    .decode(k["spki_der_b64"].as_str().expect("b64"))
                    .expect("base64")
            })
            .collect()
    }

    #[test]
    fn other_spellings_of_a_key_are_refused_or_made_canonical() {
        let der = vector_keys().swap_remove(0);
        let canonical = canonical_rsa_spki(&der).expect("RSA key");
        assert_eq!(canonical, der, "the vectors come canonical");
        // Without parameters: canonical once they are added.
        let spki = SubjectPublicKeyInfoRef::from_der(&der).expect("spki");
        let bare = SubjectPublicKeyInfoRef {
            algorithm: AlgorithmIdentifier {
                oid: spki.algorithm.oid,
                parameters: None,
            },
            subject_public_key: spki.subject_public_key,
        }
        .to_der()
        .expect("encode");
        assert_ne!(bare, der);
        assert_eq!(canonical_rsa_spki(&bare), Ok(der.clone()));
        // The outer length written with a byte more than it needs (0x83 0x00 ..., not
        // 0x82 ...).
        assert_eq!(der[1], 0x82, "a two-byte length");
        let mut long = vec![0x30, 0x83, 0x00];
        long.extend_from_slice(&der[2..]);
        assert_eq!(canonical_rsa_spki(&long), Err(KeyError::NotSpki));
        // The modulus with a needless leading zero byte, lengths grown to match.
        let bits = spki.subject_public_key.as_bytes().expect("bits");
        let key = pkcs1::RsaPublicKey::<UintRef<'_>>::from_der(bits).expect("key");
        let mut padded = vec![0u8, 0];
        padded.extend_from_slice(key.modulus.as_bytes());
        let mut rsa = tlv(0x02, &padded, false);
        rsa.extend(key.public_exponent.to_der().expect("encode"));
        let seq = tlv(0x30, &rsa, false);
        let odd = SubjectPublicKeyInfo {
            algorithm: AlgorithmIdentifier {
                oid: pkcs1::ALGORITHM_OID,
                parameters: Some(AnyRef::NULL),
            },
            subject_public_key: BitStringRef::from_bytes(&seq).expect("bits"),
        }
        .to_der()
        .expect("encode");
        assert_eq!(canonical_rsa_spki(&odd), Err(KeyError::NotRsa));
    }

    /// A tag, length and content; the length in its one DER form, or with a byte more.
    fn tlv(tag: u8, content: &[u8], long: bool) -> Vec<u8> {
        let mut length: Vec<u8> = content
            .len()
            .to_be_bytes()
            .into_iter()
            .skip_while(|b| *b == 0)
            .collect();
        let mut out = vec![tag];
        if content.len() < 128 && !long {
            out.extend_from_slice(&length);
            if length.is_empty() {
                out.push(0);
            }
        } else {
            if (long && content.len() >= 128) || length.is_empty() {
                length.insert(0, 0);
            }
            out.push(0x80 | u8::try_from(length.len()).expect("short"));
            out.extend_from_slice(&length);
        }
        out.extend_from_slice(content);
        out
    }

    proptest::proptest! {
        /// Keys spelt every way DER forbids (long lengths at any level, padded integers
        /// and OID arcs, unused bits, NULL with content) are refused; absent parameters
        /// are made canonical; only the one DER spelling comes back as it came.
        #[test]
        fn only_the_der_spelling_of_a_key_comes_back_as_it_came(
            // Each departure from DER one time in ten, so that about a fifth of the
            // keys come out in the DER spelling.
            long in proptest::collection::vec(proptest::bool::weighted(0.1), 8),
            parameters in proptest::sample::select(vec![0u8, 1, 1, 1, 1, 1, 1, 1, 2]),
            unused_bits in proptest::sample::select(vec![0u8, 0, 0, 0, 0, 0, 0, 0, 1, 7]),
            pad_modulus in proptest::bool::weighted(0.1),
            pad_exponent in proptest::bool::weighted(0.1),
            pad_oid in proptest::bool::weighted(0.1),
        ) {
            let der = vector_keys().swap_remove(0);
            let spki = SubjectPublicKeyInfoRef::from_der(&der).expect("spki");
            let bits = spki.subject_public_key.as_bytes().expect("bits");
            let key = pkcs1::RsaPublicKey::<UintRef<'_>>::from_der(bits).expect("key");
            let integer = |value: &[u8], pad: bool, long: bool| {
                // The DER content of a positive integer: a zero byte first if the top
                // bit is set, and a needless one more if `pad`.
                let mut content = Vec::new();
                if value[0] & 0x80 != 0 || pad {
                    content.push(0);
                }
                if value[0] & 0x80 != 0 && pad {
                    content.push(0);
                }
                content.extend_from_slice(value);
                tlv(0x02, &content, long)
            };
            let mut rsa = integer(key.modulus.as_bytes(), pad_modulus, long[0]);
            rsa.extend(integer(key.public_exponent.as_bytes(), pad_exponent, long[1]));
            let rsa = tlv(0x30, &rsa, long[2]);
            let mut bit_string = vec![unused_bits];
            bit_string.extend_from_slice(&rsa);
            // rsaEncryption, 1.2.840.113549.1.1.1; padded: its last arc as 0x80 0x01.
            let mut oid = vec![0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01];
            oid.extend_from_slice(if pad_oid { &[0x80, 0x01] } else { &[0x01] });
            let mut algorithm = tlv(0x06, &oid, long[3]);
            match parameters {
                0 => {}
                1 => algorithm.extend(tlv(0x05, &[], long[4])),
                _ => algorithm.extend(tlv(0x05, &[0], long[4])),
            }
            let mut body = tlv(0x30, &algorithm, long[5]);
            body.extend(tlv(0x03, &bit_string, long[6]));
            let spelt = tlv(0x30, &body, long[7]);

            let lengths_der = long.iter().enumerate().all(|(i, l)| !l || (i == 4 && parameters == 0));
            let der_spelling = lengths_der
                && unused_bits == 0
                && !pad_modulus
                && !pad_exponent
                && !pad_oid
                && parameters != 2;
            proptest::prop_assert_eq!(
                is_canonical_rsa_spki(&spelt),
                der_spelling && parameters == 1,
                "the quick reading takes the canonical spelling, and only it"
            );
            proptest::prop_assert_eq!(canonical_rsa_spki(&spelt), decode_and_reencode(&spelt));
            match canonical_rsa_spki(&spelt) {
                Ok(canonical) => {
                    proptest::prop_assert!(der_spelling, "accepted a non-DER spelling");
                    proptest::prop_assert_eq!(&canonical, &der);
                    proptest::prop_assert_eq!(canonical == spelt, parameters == 1);
                }
                Err(_) => proptest::prop_assert!(!der_spelling, "refused the DER spelling"),
            }
        }

        /// Any byte changed, dropped or added anywhere in a key: refused, or accepted
        /// with the re-encoding's canonical form.
        #[test]
        fn a_key_is_returned_as_it_came_only_when_that_is_its_canonical_form(
            which in proptest::prelude::any::<proptest::sample::Index>(),
            at in proptest::prelude::any::<proptest::sample::Index>(),
            byte in proptest::prelude::any::<u8>(),
            edit in 0u8..3,
        ) {
            let mut keys = vector_keys();
            let mut der = keys.swap_remove(which.index(keys.len()));
            let i = at.index(der.len());
            match edit {
                0 => der[i] = byte,
                1 => { der.remove(i); }
                _ => der.insert(i, byte),
            }
            if let Ok(canonical) = canonical_rsa_spki(&der) {
                proptest::prop_assert_eq!(canonical, reencoded(&der));
            }
            proptest::prop_assert_eq!(canonical_rsa_spki(&der), decode_and_reencode(&der));
        }

        /// The same, with the edits where the structure is (the headers before the
        /// modulus, the exponent at the end): the quick reading of a key never accepts
        /// what the general decoder refuses or would change, nor decides a refusal.
        #[test]
        fn the_quick_reading_agrees_with_the_decoder_on_edited_structure(
            which in proptest::prelude::any::<proptest::sample::Index>(),
            at in 0usize..48,
            byte in proptest::prelude::any::<u8>(),
            edit in 0u8..3,
        ) {
            let mut keys = vector_keys();
            let mut der = keys.swap_remove(which.index(keys.len()));
            // The first 40 bytes, or the last 8.
            let i = if at < 40 { at } else { der.len() - (48 - at) };
            match edit {
                0 => der[i] = byte,
                1 => { der.remove(i); }
                _ => der.insert(i, byte),
            }
            let general = decode_and_reencode(&der);
            if is_canonical_rsa_spki(&der) {
                proptest::prop_assert_eq!(general.as_deref(), Ok(der.as_slice()));
            }
            proptest::prop_assert_eq!(canonical_rsa_spki(&der), general);
        }
    }

    #[test]
    fn the_vector_keys_are_read_quickly() {
        let keys = vector_keys();
        let rsa: Vec<_> = keys
            .iter()
            .filter(|k| decode_and_reencode(k).is_ok())
            .collect();
        assert_eq!(rsa.len(), 5);
        assert!(rsa.iter().all(|k| is_canonical_rsa_spki(k)));
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
