//! The signature algorithms of DNSSEC (RFC 8624's list): what a DNSKEY's public key
//! and an RRSIG's signature are in each, and whether a signature verifies.

use der::asn1::UintRef;
use rsa::signature::Verifier;

/// DNSSEC algorithm numbers this crate verifies.
pub mod algorithm {
    /// RSA/SHA-1 (RFC 3110).
    pub const RSASHA1: u8 = 5;
    /// RSA/SHA-256 (RFC 5702).
    pub const RSASHA256: u8 = 8;
    /// RSA/SHA-512 (RFC 5702).
    pub const RSASHA512: u8 = 10;
    /// ECDSA P-256 with SHA-256 (RFC 6605).
    pub const ECDSAP256SHA256: u8 = 13;
    /// ECDSA P-384 with SHA-384 (RFC 6605).
    pub const ECDSAP384SHA384: u8 = 14;
    /// Ed25519 (RFC 8080).
    pub const ED25519: u8 = 15;
    /// Ed448 (RFC 8080).
    pub const ED448: u8 = 16;
}

/// Whether this crate can verify signatures of `algorithm`.
pub fn supported(algorithm: u8) -> bool {
    use algorithm::*;
    matches!(
        algorithm,
        RSASHA1 | RSASHA256 | RSASHA512 | ECDSAP256SHA256 | ECDSAP384SHA384 | ED25519 | ED448
    )
}

/// Whether `signature` over `data` verifies with the DNSKEY public key `key` of
/// `algorithm`. Malformed keys and signatures, and unknown algorithms, do not verify.
pub fn verifies(algorithm: u8, key: &[u8], data: &[u8], signature: &[u8]) -> bool {
    use algorithm::*;
    match algorithm {
        RSASHA1 => rsa_verifies::<sha1::Sha1>(
            &ring::signature::RSA_PKCS1_1024_8192_SHA1_FOR_LEGACY_USE_ONLY,
            key,
            data,
            signature,
        ),
        RSASHA256 => rsa_verifies::<sha2::Sha256>(
            &ring::signature::RSA_PKCS1_1024_8192_SHA256_FOR_LEGACY_USE_ONLY,
            key,
            data,
            signature,
        ),
        RSASHA512 => rsa_verifies::<sha2::Sha512>(
            &ring::signature::RSA_PKCS1_1024_8192_SHA512_FOR_LEGACY_USE_ONLY,
            key,
            data,
            signature,
        ),
        ECDSAP256SHA256 => {
            let Ok(key) = p256::ecdsa::VerifyingKey::from_sec1_bytes(&sec1(key, 64)) else {
                return false;
            };
            p256::ecdsa::Signature::from_slice(signature)
                .is_ok_and(|sig| key.verify(data, &sig).is_ok())
        }
        ECDSAP384SHA384 => {
            let Ok(key) = p384::ecdsa::VerifyingKey::from_sec1_bytes(&sec1(key, 96)) else {
                return false;
            };
            p384::ecdsa::Signature::from_slice(signature)
                .is_ok_and(|sig| key.verify(data, &sig).is_ok())
        }
        ED25519 => {
            let (Ok(key), Ok(sig)) = (<[u8; 32]>::try_from(key), <[u8; 64]>::try_from(signature))
            else {
                return false;
            };
            ed25519_dalek::VerifyingKey::from_bytes(&key).is_ok_and(|key| {
                key.verify(data, &ed25519_dalek::Signature::from_bytes(&sig))
                    .is_ok()
            })
        }
        ED448 => {
            let (Ok(key), Ok(sig)) = (<[u8; 57]>::try_from(key), <[u8; 114]>::try_from(signature))
            else {
                return false;
            };
            let (Ok(key), Ok(sig)) = (
                ed448_goldilocks::VerifyingKey::from_bytes(&key),
                ed448_goldilocks::Signature::try_from(&sig[..]),
            ) else {
                return false;
            };
            key.verify_raw(&sig, data).is_ok()
        }
        _ => false,
    }
}

/// The SEC1 uncompressed point `04 || x || y` of a DNSSEC ECDSA key, which is `x || y`
/// (RFC 6605 §4); a key of the wrong length gives bytes no curve accepts.
fn sec1(key: &[u8], len: usize) -> Vec<u8> {
    if key.len() != len {
        return Vec::new();
    }
    let mut point = Vec::with_capacity(len + 1);
    point.push(0x04);
    point.extend(key);
    point
}

/// RSA with PKCS#1 v1.5 and digest `D` (`ring_params` in ring's terms, asked first:
/// see [`crate::pki::ring_rsa_verifies`]); the key as RFC 3110 writes it: the
/// exponent's length in one octet (or `00` and two octets), the exponent, the modulus.
fn rsa_verifies<D>(
    ring_params: &'static ring::signature::RsaParameters,
    key: &[u8],
    data: &[u8],
    signature: &[u8],
) -> bool
where
    D: sha2::Digest + const_oid_shim::AssociatedOid + sha2::digest::FixedOutputReset,
{
    let Some((exponent, modulus)) = rfc3110(key) else {
        return false;
    };
    if crate::pki::ring_rsa_verifies(ring_params, modulus, exponent, data, signature) {
        return true;
    }
    let Some(key) = rsa_key(exponent, modulus) else {
        return false;
    };
    let Ok(signature) = rsa::pkcs1v15::Signature::try_from(signature) else {
        return false;
    };
    rsa::pkcs1v15::VerifyingKey::<D>::new(key)
        .verify(data, &signature)
        .is_ok()
}

/// Re-exports the OID trait the digests implement, under one name.
mod const_oid_shim {
    pub(crate) use sha2::digest::const_oid::AssociatedOid;
}

fn without_leading_zeros(b: &[u8]) -> &[u8] {
    let zeros = b.iter().take_while(|&&x| x == 0).count();
    &b[zeros..]
}

/// The exponent and the modulus of an RFC 3110 key, without leading zeros; neither empty.
fn rfc3110(key: &[u8]) -> Option<(&[u8], &[u8])> {
    let (&first, rest) = key.split_first()?;
    let (exponent_len, rest) = if first == 0 {
        let (len, rest) = rest.split_at_checked(2)?;
        (usize::from(u16::from_be_bytes([len[0], len[1]])), rest)
    } else {
        (usize::from(first), rest)
    };
    let (exponent, modulus) = rest.split_at_checked(exponent_len)?;
    let (modulus, exponent) = (
        without_leading_zeros(modulus),
        without_leading_zeros(exponent),
    );
    if modulus.is_empty() || exponent.is_empty() {
        return None;
    }
    Some((exponent, modulus))
}

fn rsa_key(exponent: &[u8], modulus: &[u8]) -> Option<rsa::PublicKey> {
    let key = pkcs1::RsaPublicKey {
        modulus: UintRef::new(modulus).ok()?,
        public_exponent: UintRef::new(exponent).ok()?,
    };
    rsa::PublicKey::try_from(key).ok()
}
