//! X.509 certificates as VeraId uses them, RSA public keys and the RSA signature
//! algorithms of certificates and CMS (RSASSA-PSS with explicit parameters, and
//! PKCS#1 v1.5, which PKI.js also accepts).

use rsa::pkcs8::DecodePublicKey;
use rsa::signature::Verifier;

use crate::asn1::{Asn1Error, Reader, Tlv, oid_string, tag, time};

pub(crate) mod oid {
    pub(crate) const RSA_ENCRYPTION: &str = "1.2.840.113549.1.1.1";
    pub(crate) const RSASSA_PSS: &str = "1.2.840.113549.1.1.10";
    pub(crate) const MGF1: &str = "1.2.840.113549.1.1.8";
    pub(crate) const SHA1_WITH_RSA: &str = "1.2.840.113549.1.1.5";
    pub(crate) const SHA256_WITH_RSA: &str = "1.2.840.113549.1.1.11";
    pub(crate) const SHA384_WITH_RSA: &str = "1.2.840.113549.1.1.12";
    pub(crate) const SHA512_WITH_RSA: &str = "1.2.840.113549.1.1.13";
    pub(crate) const SHA1: &str = "1.3.14.3.2.26";
    pub(crate) const SHA256: &str = "2.16.840.1.101.3.4.2.1";
    pub(crate) const SHA384: &str = "2.16.840.1.101.3.4.2.2";
    pub(crate) const SHA512: &str = "2.16.840.1.101.3.4.2.3";
    pub(crate) const COMMON_NAME: &str = "2.5.4.3";
    pub(crate) const BASIC_CONSTRAINTS: &str = "2.5.29.19";
    pub(crate) const KEY_USAGE: &str = "2.5.29.15";
    pub(crate) const AUTHORITY_KEY_ID: &str = "2.5.29.35";
    pub(crate) const SUBJECT_KEY_ID: &str = "2.5.29.14";
}

/// A digest algorithm of certificates and CMS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Hash {
    Sha1,
    Sha256,
    Sha384,
    Sha512,
}

impl Hash {
    fn from_oid(oid: &str) -> Option<Self> {
        Some(match oid {
            oid::SHA1 => Self::Sha1,
            oid::SHA256 => Self::Sha256,
            oid::SHA384 => Self::Sha384,
            oid::SHA512 => Self::Sha512,
            _ => return None,
        })
    }

    /// Reads an AlgorithmIdentifier naming a digest (parameters absent or NULL).
    pub(crate) fn from_algorithm(tlv: Tlv<'_>) -> Result<Self, Asn1Error> {
        let (oid, _) = algorithm(tlv)?;
        Self::from_oid(&oid).ok_or(Asn1Error("digest algorithm"))
    }

    pub(crate) fn digest(self, data: &[u8]) -> Vec<u8> {
        use sha2::Digest;
        match self {
            Self::Sha1 => sha1::Sha1::digest(data).to_vec(),
            Self::Sha256 => sha2::Sha256::digest(data).to_vec(),
            Self::Sha384 => sha2::Sha384::digest(data).to_vec(),
            Self::Sha512 => sha2::Sha512::digest(data).to_vec(),
        }
    }
}

/// The OID and the parameters (if any) of an AlgorithmIdentifier.
fn algorithm(tlv: Tlv<'_>) -> Result<(String, Option<Tlv<'_>>), Asn1Error> {
    if tlv.tag != tag::SEQUENCE {
        return Err(Asn1Error("algorithm identifier"));
    }
    let mut r = Reader::new(tlv.content);
    let oid = oid_string(r.expect(tag::OID, "algorithm identifier")?.content)?;
    let params = if r.is_empty() {
        None
    } else {
        Some(r.any("algorithm parameters")?)
    };
    r.finish("algorithm identifier")?;
    Ok((oid, params))
}

/// An RSA signature algorithm with its parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SignatureAlgorithm {
    /// RSASSA-PSS; the MGF1 digest is the same as the message digest (the only form
    /// producers write, and the only one the RSA library verifies).
    Pss {
        hash: Hash,
        salt_len: usize,
    },
    Pkcs1v15(Hash),
}

impl SignatureAlgorithm {
    pub(crate) fn parse(tlv: Tlv<'_>) -> Result<Self, Asn1Error> {
        let err = Asn1Error("signature algorithm");
        let (oid, params) = algorithm(tlv)?;
        let pkcs1 = |hash| Ok(Self::Pkcs1v15(hash));
        match oid.as_str() {
            oid::SHA1_WITH_RSA => pkcs1(Hash::Sha1),
            oid::SHA256_WITH_RSA => pkcs1(Hash::Sha256),
            oid::SHA384_WITH_RSA => pkcs1(Hash::Sha384),
            oid::SHA512_WITH_RSA => pkcs1(Hash::Sha512),
            oid::RSASSA_PSS => {
                // RSASSA-PSS-params (RFC 4055): every field has a default.
                let params = params.ok_or(err)?;
                if params.tag != tag::SEQUENCE {
                    return Err(err);
                }
                let mut r = Reader::new(params.content);
                let hash = match r.optional(tag::context_constructed(0), "PSS hash")? {
                    Some(t) => Hash::from_algorithm(Reader::new(t.content).any("PSS hash")?)?,
                    None => Hash::Sha1,
                };
                let mgf_hash = match r.optional(tag::context_constructed(1), "PSS MGF")? {
                    Some(t) => {
                        let (mgf, mgf_params) = algorithm(Reader::new(t.content).any("PSS MGF")?)?;
                        if mgf != oid::MGF1 {
                            return Err(err);
                        }
                        Hash::from_algorithm(mgf_params.ok_or(err)?)?
                    }
                    None => Hash::Sha1,
                };
                let salt_len = match r.optional(tag::context_constructed(2), "PSS salt")? {
                    Some(t) => {
                        small_integer(Reader::new(t.content).expect(tag::INTEGER, "PSS salt")?)?
                    }
                    None => 20,
                };
                if let Some(t) = r.optional(tag::context_constructed(3), "PSS trailer")?
                    && small_integer(Reader::new(t.content).expect(tag::INTEGER, "PSS trailer")?)?
                        != 1
                {
                    return Err(err);
                }
                r.finish("PSS parameters")?;
                if mgf_hash != hash {
                    return Err(err);
                }
                Ok(Self::Pss { hash, salt_len })
            }
            _ => Err(err),
        }
    }

    /// Whether `signature` over `message` verifies with `key`.
    pub(crate) fn verifies(self, key: &RsaKey, message: &[u8], signature: &[u8]) -> bool {
        fn pss<D>(key: &rsa::PublicKey, salt: usize, message: &[u8], sig: &[u8]) -> bool
        where
            D: sha2::Digest + sha2::digest::FixedOutputReset,
        {
            rsa::pss::Signature::try_from(sig).is_ok_and(|sig| {
                rsa::pss::VerifyingKey::<D>::new_with_salt_len(key.clone(), salt)
                    .verify(message, &sig)
                    .is_ok()
            })
        }
        fn pkcs1<D>(key: &rsa::PublicKey, message: &[u8], sig: &[u8]) -> bool
        where
            D: sha2::Digest
                + sha2::digest::FixedOutputReset
                + sha2::digest::const_oid::AssociatedOid,
        {
            rsa::pkcs1v15::Signature::try_from(sig).is_ok_and(|sig| {
                rsa::pkcs1v15::VerifyingKey::<D>::new(key.clone())
                    .verify(message, &sig)
                    .is_ok()
            })
        }
        if let Some(params) = self.ring_parameters()
            && ring_rsa_verifies(params, &key.n, &key.e, message, signature)
        {
            return true;
        }
        let Some(key) = key.rsa() else {
            return false;
        };
        match self {
            Self::Pss { hash, salt_len } => match hash {
                Hash::Sha1 => pss::<sha1::Sha1>(key, salt_len, message, signature),
                Hash::Sha256 => pss::<sha2::Sha256>(key, salt_len, message, signature),
                Hash::Sha384 => pss::<sha2::Sha384>(key, salt_len, message, signature),
                Hash::Sha512 => pss::<sha2::Sha512>(key, salt_len, message, signature),
            },
            Self::Pkcs1v15(hash) => match hash {
                Hash::Sha1 => pkcs1::<sha1::Sha1>(key, message, signature),
                Hash::Sha256 => pkcs1::<sha2::Sha256>(key, message, signature),
                Hash::Sha384 => pkcs1::<sha2::Sha384>(key, message, signature),
                Hash::Sha512 => pkcs1::<sha2::Sha512>(key, message, signature),
            },
        }
    }
}

impl SignatureAlgorithm {
    /// ring's parameters for this algorithm, where ring has them (PSS only with a salt
    /// as long as the digest, which is what producers write).
    fn ring_parameters(self) -> Option<&'static ring::signature::RsaParameters> {
        use ring::signature as r;
        Some(match self {
            Self::Pss {
                hash: Hash::Sha256,
                salt_len: 32,
            } => &r::RSA_PSS_2048_8192_SHA256,
            Self::Pss {
                hash: Hash::Sha384,
                salt_len: 48,
            } => &r::RSA_PSS_2048_8192_SHA384,
            Self::Pss {
                hash: Hash::Sha512,
                salt_len: 64,
            } => &r::RSA_PSS_2048_8192_SHA512,
            Self::Pkcs1v15(Hash::Sha1) => &r::RSA_PKCS1_1024_8192_SHA1_FOR_LEGACY_USE_ONLY,
            Self::Pkcs1v15(Hash::Sha256) => &r::RSA_PKCS1_1024_8192_SHA256_FOR_LEGACY_USE_ONLY,
            Self::Pkcs1v15(Hash::Sha384) => &r::RSA_PKCS1_2048_8192_SHA384,
            Self::Pkcs1v15(Hash::Sha512) => &r::RSA_PKCS1_1024_8192_SHA512_FOR_LEGACY_USE_ONLY,
            Self::Pss { .. } => return None,
        })
    }
}

/// Whether ring verifies an RSA `signature` with the key (`n`, `e`: big-endian, no
/// leading zeros). ring's assembly takes a fifth of the `rsa` crate's time, so it is
/// asked first; but its `false` is not final: it refuses some keys the `rsa` crate
/// takes (exponents of more than 33 bits, moduli of fewer than 2048 bits for some
/// algorithms), so callers then ask the `rsa` crate, and every outcome stays what the
/// `rsa` crate alone decides, or a signature both libraries agree holds.
pub(crate) fn ring_rsa_verifies(
    params: &'static ring::signature::RsaParameters,
    n: &[u8],
    e: &[u8],
    message: &[u8],
    signature: &[u8],
) -> bool {
    ring::signature::RsaPublicKeyComponents { n, e }
        .verify(params, message, signature)
        .is_ok()
}

/// An INTEGER of at most four octets, non-negative.
fn small_integer(tlv: Tlv<'_>) -> Result<usize, Asn1Error> {
    let err = Asn1Error("integer");
    if tlv.content.is_empty() || tlv.content.len() > 4 || tlv.content[0] & 0x80 != 0 {
        return Err(err);
    }
    Ok(tlv
        .content
        .iter()
        .fold(0usize, |v, &b| (v << 8) | usize::from(b)))
}

/// An RSA public key read from a SubjectPublicKeyInfo.
///
/// It takes exactly the keys the `rsa` crate takes, but builds the `rsa` crate's key
/// (whose Montgomery set-up costs as much as ring's whole verification) only when
/// asked: when ring does not decide a signature, and for the canonical encoding.
#[derive(Debug, Clone)]
pub(crate) struct RsaKey {
    /// The SubjectPublicKeyInfo as received.
    spki: Box<[u8]>,
    /// The modulus and the exponent, big-endian without leading zeros, for ring.
    n: Box<[u8]>,
    e: Box<[u8]>,
    /// The `rsa` crate's key, once needed.
    key: std::sync::OnceLock<Option<rsa::PublicKey>>,
}

impl RsaKey {
    /// Reads an `rsaEncryption` (or parameterless RSASSA-PSS) SubjectPublicKeyInfo
    /// (DER), with the `rsa` crate's rules: a modulus of 1024 to 8192 bits, odd; an odd
    /// exponent from 2 to 2^33 - 1.
    pub(crate) fn from_spki(spki: &[u8]) -> Option<Self> {
        use rsa::pkcs8::spki::SubjectPublicKeyInfoRef;
        let info = SubjectPublicKeyInfoRef::try_from(spki).ok()?;
        let algorithm = &info.algorithm;
        let parameters_ok = match algorithm.oid.to_string().as_str() {
            oid::RSA_ENCRYPTION => algorithm
                .parameters
                .is_some_and(|p| der::Tagged::tag(&p) == der::Tag::Null && p.value().is_empty()),
            oid::RSASSA_PSS => algorithm.parameters.is_none(),
            _ => false,
        };
        if !parameters_ok {
            return None;
        }
        let key = pkcs1::RsaPublicKeyRef::try_from(info.subject_public_key.as_bytes()?).ok()?;
        let (n, e) = (
            key.modulus.as_bytes().to_vec().into_boxed_slice(),
            key.public_exponent.as_bytes().to_vec().into_boxed_slice(),
        );
        let exponent = match e.len() {
            1..=8 => e.iter().fold(0u64, |v, &b| (v << 8) | u64::from(b)),
            _ => return None,
        };
        let bits = bit_length(&n);
        let odd = |b: &[u8]| b.last().is_some_and(|&x| x & 1 == 1);
        if !(1024..=8192).contains(&bits)
            || !(2..=(1 << 33) - 1).contains(&exponent)
            || !odd(&n)
            || !odd(&e)
        {
            return None;
        }
        Some(Self {
            spki: spki.into(),
            n,
            e,
            key: std::sync::OnceLock::new(),
        })
    }

    /// The `rsa` crate's key.
    fn rsa(&self) -> Option<&rsa::PublicKey> {
        self.key
            .get_or_init(|| rsa::PublicKey::from_public_key_der(&self.spki).ok())
            .as_ref()
    }

    /// The modulus length in bits, rounded up to whole octets as the `rsa` crate does.
    pub(crate) fn bits(&self) -> usize {
        bit_length(&self.n).div_ceil(8) * 8
    }

    /// The SubjectPublicKeyInfo re-encoded in canonical DER (`rsaEncryption`, NULL
    /// parameters, minimal integers): what VeraId key ids and Awala ids hash.
    pub(crate) fn canonical_spki(&self) -> Vec<u8> {
        use rsa::pkcs8::EncodePublicKey;
        self.rsa()
            .and_then(|key| key.to_public_key_der().ok())
            .map(|doc| doc.as_bytes().to_vec())
            .unwrap_or_default()
    }
}

/// The bit length of a big-endian unsigned integer.
fn bit_length(bytes: &[u8]) -> usize {
    let bytes = &bytes[bytes.iter().take_while(|&&b| b == 0).count()..];
    bytes.first().map_or(0, |&first| {
        8 * bytes.len() - usize::try_from(first.leading_zeros()).unwrap_or(0)
    })
}

/// A certificate, read far enough for VeraId: names, validity, key, the extensions a
/// path check looks at, and the signature with the octets it covers.
#[derive(Debug, Clone)]
pub(crate) struct Certificate<'a> {
    /// The content octets of the Certificate SEQUENCE as received.
    pub(crate) raw: &'a [u8],
    /// The TBSCertificate as received: what the issuer signed.
    pub(crate) tbs: &'a [u8],
    /// The serial number's content octets as received (not necessarily minimal).
    pub(crate) serial: &'a [u8],
    /// The issuer Name as received.
    pub(crate) issuer: &'a [u8],
    /// The subject Name as received.
    pub(crate) subject: &'a [u8],
    pub(crate) not_before: i64,
    pub(crate) not_after: i64,
    /// The SubjectPublicKeyInfo as received.
    pub(crate) spki: &'a [u8],
    /// The subject's common name, if it has one.
    pub(crate) common_name: Option<String>,
    pub(crate) is_ca: bool,
    /// Whether KeyUsage is present and lacks keyCertSign.
    pub(crate) key_usage_forbids_signing_certificates: bool,
    pub(crate) authority_key_id: Option<&'a [u8]>,
    pub(crate) subject_key_id: Option<&'a [u8]>,
    /// Whether an extension this reader does not know is marked critical.
    pub(crate) has_unknown_critical_extension: bool,
    pub(crate) signature_algorithm: SignatureAlgorithm,
    pub(crate) signature: &'a [u8],
}

impl<'a> Certificate<'a> {
    /// Reads the content octets of a Certificate SEQUENCE (a bundle carries the
    /// organisation's under `[2] IMPLICIT`, so only its content is at hand).
    pub(crate) fn from_content(content: &'a [u8]) -> Result<Self, Asn1Error> {
        let mut r = Reader::new(content);
        let tbs = r.expect(tag::SEQUENCE, "TBSCertificate")?;
        let signature_algorithm =
            SignatureAlgorithm::parse(r.any("certificate signature algorithm")?)?;
        let signature = bit_string(r.expect(tag::BIT_STRING, "certificate signature")?)?;
        r.finish("certificate")?;

        let mut t = Reader::new(tbs.content);
        if let Some(version) = t.optional(tag::context_constructed(0), "certificate version")? {
            // v3 (2) is what every producer writes; v1 certificates have no extensions.
            let v = Reader::new(version.content).expect(tag::INTEGER, "certificate version")?;
            if v.content != [2] {
                return Err(Asn1Error("certificate version"));
            }
        }
        let serial = t.expect(tag::INTEGER, "serial number")?.content;
        if serial.is_empty() || serial.len() > 64 {
            return Err(Asn1Error("serial number"));
        }
        t.any("TBSCertificate signature")?;
        let issuer = t.expect(tag::SEQUENCE, "issuer")?.raw;
        let mut validity = t.enter(tag::SEQUENCE, "validity")?;
        let not_before = time(validity.any("notBefore")?)?;
        let not_after = time(validity.any("notAfter")?)?;
        validity.finish("validity")?;
        let subject = t.expect(tag::SEQUENCE, "subject")?;
        let spki = t.expect(tag::SEQUENCE, "subject public key info")?.raw;
        t.optional(tag::context(1), "issuerUniqueID")?;
        t.optional(tag::context(2), "subjectUniqueID")?;
        let mut certificate = Self {
            raw: content,
            tbs: tbs.raw,
            serial,
            issuer,
            subject: subject.raw,
            not_before,
            not_after,
            spki,
            common_name: common_name(subject)?,
            is_ca: false,
            key_usage_forbids_signing_certificates: false,
            authority_key_id: None,
            subject_key_id: None,
            has_unknown_critical_extension: false,
            signature_algorithm,
            signature,
        };
        if let Some(extensions) = t.optional(tag::context_constructed(3), "extensions")? {
            let mut list = Reader::new(extensions.content).enter(tag::SEQUENCE, "extensions")?;
            while !list.is_empty() {
                certificate.read_extension(list.expect(tag::SEQUENCE, "extension")?)?;
            }
        }
        t.finish("TBSCertificate")?;
        Ok(certificate)
    }

    fn read_extension(&mut self, extension: Tlv<'a>) -> Result<(), Asn1Error> {
        let mut r = Reader::new(extension.content);
        let id = oid_string(r.expect(tag::OID, "extension id")?.content)?;
        let critical = match r.optional(tag::BOOLEAN, "extension criticality")? {
            Some(b) => b.content != [0],
            None => false,
        };
        let value = r.expect(tag::OCTET_STRING, "extension value")?.content;
        r.finish("extension")?;
        let mut v = Reader::new(value);
        match id.as_str() {
            oid::BASIC_CONSTRAINTS => {
                let mut bc = v.enter(tag::SEQUENCE, "basic constraints")?;
                self.is_ca = bc
                    .optional(tag::BOOLEAN, "basic constraints")?
                    .is_some_and(|b| b.content != [0]);
                bc.optional(tag::INTEGER, "path length")?;
                bc.finish("basic constraints")?;
            }
            oid::KEY_USAGE => {
                let bits = bit_string(v.expect(tag::BIT_STRING, "key usage")?)?;
                // keyCertSign is bit 5: 0x04 of the first octet.
                self.key_usage_forbids_signing_certificates =
                    bits.first().is_none_or(|b| b & 0x04 == 0);
            }
            oid::AUTHORITY_KEY_ID => {
                let mut aki = v.enter(tag::SEQUENCE, "authority key id")?;
                self.authority_key_id = aki
                    .optional(tag::context(0), "authority key id")?
                    .map(|t| t.content);
            }
            oid::SUBJECT_KEY_ID => {
                self.subject_key_id = Some(v.expect(tag::OCTET_STRING, "subject key id")?.content);
            }
            _ => self.has_unknown_critical_extension |= critical,
        }
        v.finish("extension value")?;
        Ok(())
    }

    /// Whether `self` is valid at `at` (Unix seconds), bounds included.
    pub(crate) fn valid_at(&self, at: i64) -> bool {
        self.not_before <= at && at <= self.not_after
    }
}

/// The octets of a BIT STRING with no unused bits (signatures, keys, key usage).
fn bit_string(tlv: Tlv<'_>) -> Result<&[u8], Asn1Error> {
    match tlv.content.split_first() {
        Some((0, bits)) => Ok(bits),
        // Key usage may have unused bits; its first octet is all this crate reads.
        Some((unused, bits)) if *unused < 8 && !bits.is_empty() => Ok(bits),
        _ => Err(Asn1Error("bit string")),
    }
}

/// The first common name of a Name, in any directory string type producers write
/// (VeraId's write BMPString).
fn common_name(name: Tlv<'_>) -> Result<Option<String>, Asn1Error> {
    let mut rdns = Reader::new(name.content);
    while !rdns.is_empty() {
        let mut rdn = rdns.enter(tag::SET, "relative distinguished name")?;
        while !rdn.is_empty() {
            let mut atv = rdn.enter(tag::SEQUENCE, "attribute type and value")?;
            let kind = oid_string(atv.expect(tag::OID, "attribute type")?.content)?;
            let value = atv.any("attribute value")?;
            if kind == oid::COMMON_NAME {
                return directory_string(value).map(Some);
            }
        }
    }
    Ok(None)
}

fn directory_string(tlv: Tlv<'_>) -> Result<String, Asn1Error> {
    let err = Asn1Error("directory string");
    let c = tlv.content;
    match tlv.tag {
        tag::UTF8_STRING | tag::PRINTABLE_STRING | tag::IA5_STRING => {
            String::from_utf8(c.to_vec()).map_err(|_| err)
        }
        tag::TELETEX_STRING => Ok(c.iter().map(|&b| char::from(b)).collect()),
        tag::BMP_STRING if c.len().is_multiple_of(2) => {
            char::decode_utf16(c.chunks_exact(2).map(|p| u16::from_be_bytes([p[0], p[1]])))
                .collect::<Result<String, _>>()
                .map_err(|_| err)
        }
        tag::UNIVERSAL_STRING if c.len().is_multiple_of(4) => c
            .chunks_exact(4)
            .map(|p| char::from_u32(u32::from_be_bytes([p[0], p[1], p[2], p[3]])).ok_or(err))
            .collect(),
        _ => Err(err),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Signs `message` with `key` for `algorithm`, with the `rsa` crate.
    fn sign(key: &rsa::PrivateKey, algorithm: SignatureAlgorithm, message: &[u8]) -> Vec<u8> {
        use rsa::signature::{RandomizedSigner, SignatureEncoding, Signer};
        match algorithm {
            SignatureAlgorithm::Pss {
                hash: Hash::Sha256,
                salt_len,
            } => rsa::pss::SigningKey::<sha2::Sha256>::new_with_salt_len(key.clone(), salt_len)
                .sign_with_rng(&mut rand::rng(), message)
                .to_vec(),
            SignatureAlgorithm::Pkcs1v15(Hash::Sha384) => {
                rsa::pkcs1v15::SigningKey::<sha2::Sha384>::new(key.clone())
                    .sign(message)
                    .to_vec()
            }
            other => panic!("no signer for {other:?} here"),
        }
    }

    /// A DER TLV with a definite length.
    fn der(tag: u8, content: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        match content.len() {
            n if n < 0x80 => out.push(n as u8),
            n if n < 0x100 => out.extend([0x81, n as u8]),
            n => out.extend([0x82, (n >> 8) as u8, n as u8]),
        }
        out.extend(content);
        out
    }

    /// A SubjectPublicKeyInfo with algorithm `oid` (content octets), `parameters`
    /// (whole TLVs) and the INTEGERs `n` and `e` given as content octets.
    fn spki(oid: &[u8], parameters: &[u8], n: &[u8], e: &[u8]) -> Vec<u8> {
        let algorithm = der(0x30, &[der(0x06, oid), parameters.to_vec()].concat());
        let key = der(0x30, &[der(0x02, n), der(0x02, e)].concat());
        let bits = der(0x03, &[&[0][..], &key].concat());
        der(0x30, &[algorithm, bits].concat())
    }

    #[test]
    fn keys_are_taken_exactly_as_the_rsa_crate_takes_them() {
        const RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];
        const PSS: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0a];
        const NULL: &[u8] = &[0x05, 0x00];
        let modulus = |bits: usize, odd: bool| {
            let mut n = vec![0xff; bits.div_ceil(8)];
            n[0] = 0xff >> ((8 - bits % 8) % 8);
            if !odd {
                *n.last_mut().expect("octets") = 0xfe;
            }
            // A leading zero keeps the INTEGER positive.
            [&[0][..], &n].concat()
        };
        let n2048 = modulus(2048, true);
        let mut cases = vec![
            spki(RSA, NULL, &n2048, &[0x01, 0x00, 0x01]),
            spki(RSA, &[], &n2048, &[0x01, 0x00, 0x01]),
            spki(RSA, &[0x05, 0x01, 0x00], &n2048, &[0x01, 0x00, 0x01]),
            spki(PSS, &[], &n2048, &[0x01, 0x00, 0x01]),
            spki(PSS, NULL, &n2048, &[0x01, 0x00, 0x01]),
        ];
        for e in [
            &[0x01][..],
            &[0x02],
            &[0x03],
            &[0x04],
            &[0x01, 0xff, 0xff, 0xff, 0xff],
            &[0x02, 0x00, 0x00, 0x00, 0x01],
            &[0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01],
        ] {
            cases.push(spki(RSA, NULL, &n2048, e));
        }
        for (bits, odd) in [
            (1023, true),
            (1024, true),
            (4096, true),
            (8192, true),
            (8193, true),
            (2048, false),
        ] {
            cases.push(spki(RSA, NULL, &modulus(bits, odd), &[0x01, 0x00, 0x01]));
        }
        // Every octet of a real key flipped, and every truncation.
        let real = rsa::PrivateKey::new(&mut rand::rng(), 1024).expect("key");
        let real = {
            use rsa::pkcs8::EncodePublicKey;
            rsa::PublicKey::from(&real)
                .to_public_key_der()
                .expect("spki")
                .as_bytes()
                .to_vec()
        };
        for i in 0..real.len() {
            for flip in [0x01, 0x80, 0xff] {
                let mut mutated = real.clone();
                mutated[i] ^= flip;
                cases.push(mutated);
            }
            cases.push(real[..i].to_vec());
        }
        let mut taken = 0;
        for case in &cases {
            let ours = RsaKey::from_spki(case);
            let theirs = rsa::PublicKey::from_public_key_der(case).ok();
            assert_eq!(ours.is_some(), theirs.is_some(), "{}", hex(case));
            if let (Some(ours), Some(theirs)) = (ours, theirs) {
                use rsa::traits::PublicKeyParts;
                assert_eq!(ours.bits(), theirs.size() * 8);
                assert!(ours.rsa().is_some());
                taken += 1;
            }
        }
        assert!(taken >= 8, "{taken} keys taken");
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn ring_first_never_changes_what_verifies() {
        let small = rsa::PrivateKey::new(&mut rand::rng(), 1024).expect("key");
        let large = rsa::PrivateKey::new(&mut rand::rng(), 2048).expect("key");
        let spki = |k: &rsa::PrivateKey| {
            use rsa::pkcs8::EncodePublicKey;
            rsa::PublicKey::from(k)
                .to_public_key_der()
                .expect("spki")
                .as_bytes()
                .to_vec()
        };
        let pss = |salt_len| SignatureAlgorithm::Pss {
            hash: Hash::Sha256,
            salt_len,
        };
        let pkcs1 = SignatureAlgorithm::Pkcs1v15(Hash::Sha384);
        // (key, algorithm, whether ring decides it): ring takes PSS with a digest-long
        // salt and 2048-bit keys for PKCS#1 SHA-384; the `rsa` crate takes the rest.
        for (key, algorithm, ring_decides) in [
            (&large, pss(32), true),
            (&large, pss(20), false),
            (&large, pkcs1, true),
            (&small, pkcs1, false),
        ] {
            let public = RsaKey::from_spki(&spki(key)).expect("key");
            let signature = sign(key, algorithm, b"message");
            let by_ring = algorithm.ring_parameters().is_some_and(|p| {
                ring_rsa_verifies(p, &public.n, &public.e, b"message", &signature)
            });
            assert_eq!(
                by_ring,
                ring_decides,
                "{algorithm:?}, {} bits",
                public.bits()
            );
            assert!(algorithm.verifies(&public, b"message", &signature));
            assert!(!algorithm.verifies(&public, b"massage", &signature));
            let mut tampered = signature.clone();
            tampered[10] ^= 1;
            assert!(!algorithm.verifies(&public, b"message", &tampered));
        }
    }

    #[test]
    fn bmp_strings_with_surrogate_pairs() {
        // "a🦄" in UTF-16BE.
        let content = [0x00, 0x61, 0xd8, 0x3e, 0xdd, 0x84];
        let tlv = Tlv {
            tag: tag::BMP_STRING,
            content: &content,
            raw: &[],
        };
        assert_eq!(directory_string(tlv).expect("string"), "a🦄");
        let unpaired = [0xd8, 0x3e];
        let tlv = Tlv {
            tag: tag::BMP_STRING,
            content: &unpaired,
            raw: &[],
        };
        assert!(directory_string(tlv).is_err());
    }

    #[test]
    fn the_pss_parameters_references_write() {
        let der = [
            0x30, 0x41, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0a, 0x30,
            0x34, 0xa0, 0x0f, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04,
            0x02, 0x01, 0x05, 0x00, 0xa1, 0x1c, 0x30, 0x1a, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86,
            0xf7, 0x0d, 0x01, 0x01, 0x08, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65,
            0x03, 0x04, 0x02, 0x01, 0x05, 0x00, 0xa2, 0x03, 0x02, 0x01, 0x20,
        ];
        let tlv = Reader::new(&der).any("x").expect("tlv");
        assert_eq!(
            SignatureAlgorithm::parse(tlv).expect("PSS"),
            SignatureAlgorithm::Pss {
                hash: Hash::Sha256,
                salt_len: 32
            }
        );
        // Without parameters fields, RFC 4055's defaults: SHA-1, salt 20.
        let defaults = [
            0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0a, 0x30,
            0x00,
        ];
        let tlv = Reader::new(&defaults).any("x").expect("tlv");
        assert_eq!(
            SignatureAlgorithm::parse(tlv).expect("PSS"),
            SignatureAlgorithm::Pss {
                hash: Hash::Sha1,
                salt_len: 20
            }
        );
    }
}
