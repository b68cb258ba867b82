//! The CMS SignedData of a bundle (RFC 5652), read as the references write it: one
//! SignerInfo that names its certificate by issuer and serial number, signed attributes
//! verified over their octets as received.

use crate::asn1::{Asn1Error, Reader, Tlv, octet_string, oid_string, tag};
use crate::pki::{Certificate, Hash, RsaKey, SignatureAlgorithm, oid};

pub(crate) const SIGNED_DATA: &str = "1.2.840.113549.1.7.2";
pub(crate) const CONTENT_TYPE_ATTRIBUTE: &str = "1.2.840.113549.1.9.3";
pub(crate) const MESSAGE_DIGEST_ATTRIBUTE: &str = "1.2.840.113549.1.9.4";

/// Certificates one SignedData may carry (the references put one or two).
const MAX_CERTIFICATES: usize = 8;
/// Signed attributes one SignerInfo may carry (the references put three to five).
const MAX_ATTRIBUTES: usize = 32;

/// How a SignerInfo names the certificate whose key signed.
#[derive(Debug, Clone)]
pub(crate) enum SignerId<'a> {
    /// The issuer Name as received and the serial number's content octets as received.
    IssuerAndSerial { issuer: &'a [u8], serial: &'a [u8] },
    /// A subject key identifier.
    KeyId(&'a [u8]),
}

/// One signed attribute: its type and its values.
#[derive(Debug, Clone)]
pub(crate) struct Attribute<'a> {
    pub(crate) kind: String,
    pub(crate) values: Vec<Tlv<'a>>,
}

#[derive(Debug, Clone)]
pub(crate) struct SignerInfo<'a> {
    pub(crate) sid: SignerId<'a>,
    pub(crate) digest: Hash,
    /// The `[0] IMPLICIT` signed attributes as received, and as read.
    pub(crate) signed_attributes: Option<(&'a [u8], Vec<Attribute<'a>>)>,
    pub(crate) signature_algorithm: SignatureAlgorithm,
    pub(crate) signature: &'a [u8],
}

impl<'a> SignerInfo<'a> {
    /// The first value of the signed attribute `kind`.
    pub(crate) fn attribute(&self, kind: &str) -> Option<Tlv<'a>> {
        self.signed_attributes
            .as_ref()?
            .1
            .iter()
            .find(|a| a.kind == kind)
            .and_then(|a| a.values.first().copied())
    }

    /// Whether this SignerInfo names `certificate`.
    pub(crate) fn names(&self, certificate: &Certificate<'_>) -> bool {
        match self.sid {
            SignerId::IssuerAndSerial { issuer, serial } => {
                issuer == certificate.issuer && serial == certificate.serial
            }
            SignerId::KeyId(id) => certificate.subject_key_id == Some(id),
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct SignedData<'a> {
    /// The encapsulated content, if the signature is not detached.
    pub(crate) content: Option<Vec<u8>>,
    pub(crate) certificates: Vec<Certificate<'a>>,
    /// The first SignerInfo: the only one VeraId signatures have.
    pub(crate) signer: SignerInfo<'a>,
}

/// Why the CMS signature does not hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CmsFailure {
    Detached,
    MissingAttributes,
    DigestMismatch,
    BadSignature,
}

impl<'a> SignedData<'a> {
    /// Reads the content octets of a ContentInfo (`OID signedData, [0] EXPLICIT
    /// SignedData`), as a bundle carries it under `[3] IMPLICIT`.
    pub(crate) fn from_content_info(content: &'a [u8]) -> Result<Self, Asn1Error> {
        let mut r = Reader::new(content);
        if oid_string(r.expect(tag::OID, "content type")?.content)? != SIGNED_DATA {
            return Err(Asn1Error("SignedData content type"));
        }
        let mut explicit = r.enter(tag::context_constructed(0), "SignedData")?;
        r.finish("ContentInfo")?;
        let mut s = explicit.enter(tag::SEQUENCE, "SignedData")?;
        explicit.finish("SignedData")?;

        s.expect(tag::INTEGER, "SignedData version")?;
        s.expect(tag::SET, "digest algorithms")?;
        let mut encapsulated = s.enter(tag::SEQUENCE, "encapsulated content")?;
        encapsulated.expect(tag::OID, "encapsulated content type")?;
        let content = match encapsulated.optional(tag::context_constructed(0), "eContent")? {
            Some(e) => {
                let mut e = Reader::new(e.content);
                let octets = octet_string(e.any("eContent")?)?;
                e.finish("eContent")?;
                Some(octets)
            }
            None => None,
        };
        encapsulated.finish("encapsulated content")?;

        let mut certificates = Vec::new();
        if let Some(set) = s.optional(tag::context_constructed(0), "certificates")? {
            let mut set = Reader::new(set.content);
            while !set.is_empty() {
                if certificates.len() == MAX_CERTIFICATES {
                    return Err(Asn1Error("certificates (too many)"));
                }
                let cert = set.expect(tag::SEQUENCE, "certificate")?;
                certificates.push(Certificate::from_content(cert.content)?);
            }
        }
        s.optional(tag::context_constructed(1), "crls")?;
        let mut signers = s.enter(tag::SET, "signer infos")?;
        s.finish("SignedData")?;
        let signer = SignerInfo::read(signers.expect(tag::SEQUENCE, "signer info")?)?;
        Ok(Self {
            content,
            certificates,
            signer,
        })
    }

    /// Checks the signature of the first signer with `key`: the message digest over the
    /// encapsulated content, and the signature over the signed attributes.
    pub(crate) fn check(&self, key: &RsaKey) -> Result<&[u8], CmsFailure> {
        let content = self.content.as_deref().ok_or(CmsFailure::Detached)?;
        let signer = &self.signer;
        let (raw, _) = signer
            .signed_attributes
            .as_ref()
            .ok_or(CmsFailure::MissingAttributes)?;
        signer
            .attribute(CONTENT_TYPE_ATTRIBUTE)
            .ok_or(CmsFailure::MissingAttributes)?;
        let digest = signer
            .attribute(MESSAGE_DIGEST_ATTRIBUTE)
            .filter(|d| d.tag == tag::OCTET_STRING)
            .ok_or(CmsFailure::MissingAttributes)?;
        if digest.content != signer.digest.digest(content) {
            return Err(CmsFailure::DigestMismatch);
        }
        // RFC 5652 §5.4: the signature covers the attributes' DER with a SET tag.
        let mut signed = raw.to_vec();
        signed[0] = tag::SET;
        if !signer
            .signature_algorithm
            .verifies(key, &signed, signer.signature)
        {
            return Err(CmsFailure::BadSignature);
        }
        Ok(content)
    }
}

impl<'a> SignerInfo<'a> {
    fn read(info: Tlv<'a>) -> Result<Self, Asn1Error> {
        let mut r = Reader::new(info.content);
        r.expect(tag::INTEGER, "SignerInfo version")?;
        let sid = match r.any("signer identifier")? {
            t if t.tag == tag::SEQUENCE => {
                let mut ias = Reader::new(t.content);
                let issuer = ias.expect(tag::SEQUENCE, "issuer")?.raw;
                let serial = ias.expect(tag::INTEGER, "serial number")?.content;
                ias.finish("issuer and serial number")?;
                SignerId::IssuerAndSerial { issuer, serial }
            }
            t if t.tag == tag::context(0) => SignerId::KeyId(t.content),
            _ => return Err(Asn1Error("signer identifier")),
        };
        let digest = Hash::from_algorithm(r.any("digest algorithm")?)?;
        let signed_attributes =
            match r.optional(tag::context_constructed(0), "signed attributes")? {
                Some(attrs) => Some((attrs.raw, attributes(attrs.content)?)),
                None => None,
            };
        let algorithm = r.any("signature algorithm")?;
        let signature_algorithm = match SignatureAlgorithm::parse(algorithm) {
            Ok(a) => a,
            // `rsaEncryption` here means PKCS#1 v1.5 with the digest algorithm's hash.
            Err(e) => {
                let mut a = Reader::new(algorithm.content);
                let named = a.expect(tag::OID, "signature algorithm")?;
                if oid_string(named.content)? != oid::RSA_ENCRYPTION {
                    return Err(e);
                }
                SignatureAlgorithm::Pkcs1v15(digest)
            }
        };
        let signature = r.expect(tag::OCTET_STRING, "signature")?.content;
        r.optional(tag::context_constructed(1), "unsigned attributes")?;
        r.finish("SignerInfo")?;
        Ok(Self {
            sid,
            digest,
            signed_attributes,
            signature_algorithm,
            signature,
        })
    }
}

fn attributes(content: &[u8]) -> Result<Vec<Attribute<'_>>, Asn1Error> {
    let mut list = Reader::new(content);
    let mut out = Vec::new();
    while !list.is_empty() {
        if out.len() == MAX_ATTRIBUTES {
            return Err(Asn1Error("signed attributes (too many)"));
        }
        let mut attribute = list.enter(tag::SEQUENCE, "attribute")?;
        let kind = oid_string(attribute.expect(tag::OID, "attribute type")?.content)?;
        let mut set = attribute.enter(tag::SET, "attribute values")?;
        attribute.finish("attribute")?;
        let mut values = Vec::new();
        while !set.is_empty() {
            if values.len() == MAX_ATTRIBUTES {
                return Err(Asn1Error("attribute values (too many)"));
            }
            values.push(set.any("attribute value")?);
        }
        out.push(Attribute { kind, values });
    }
    Ok(out)
}
