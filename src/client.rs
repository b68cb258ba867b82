//! What a Letro client does, for tests, tools and the demo: generate Awala endpoint
//! keys, write pairing requests, issue certificates and parcel delivery authorisations,
//! and wrap them in connection params.
//!
//! Certificates follow what the Awala libraries issue (awala-formats.md §4): CN = the
//! subject's endpoint id, BasicConstraints, AuthorityKeyIdentifier and
//! SubjectKeyIdentifier holding SHA-256 digests of SPKIs, RSASSA-PSS signatures with
//! salt length = hash length. Options can break each of these on purpose, so that tests
//! can check that the broker refuses what a real client would never send.

use std::str::FromStr;
use std::time::{Duration, SystemTime};

use der::asn1::{Any, BitString, OctetString};
use der::{Decode, Encode, Sequence};
use rsa::pkcs8::EncodePublicKey;
use rsa::signature::{RandomizedSigner, SignatureEncoding, Signer};
use sha2::{Digest, Sha256, Sha384, Sha512};
use spki::{AlgorithmIdentifierOwned, ObjectIdentifier, SubjectPublicKeyInfoOwned};
use x509_cert::ext::Extension;
use x509_cert::ext::pkix::{AuthorityKeyIdentifier, BasicConstraints, SubjectKeyIdentifier};
use x509_cert::name::Name;
use x509_cert::time::Time;

use crate::codec::awala::canonical_rsa_spki;
use crate::codec::connparams::{ID_RSASSA_PSS, encode_connection_params};
use crate::codec::pairing::{MatchOrder, encode_request};
use crate::domain::EndpointId;

/// Why the toolkit could not build something.
#[derive(Debug, thiserror::Error)]
pub enum ToolkitError {
    /// Key generation or signing failed.
    #[error("RSA: {0}")]
    Rsa(String),
    /// A structure could not be encoded.
    #[error("DER: {0}")]
    Der(#[from] der::Error),
}

type Result<T, E = ToolkitError> = std::result::Result<T, E>;

/// An Awala endpoint: an RSA identity key pair and the id derived from it.
#[derive(Clone)]
pub struct Endpoint {
    key: rsa::PrivateKey,
    spki_der: Vec<u8>,
    id: EndpointId,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint").field("id", &self.id).finish()
    }
}

impl Endpoint {
    /// Generates a fresh endpoint with an RSA key of `bits` bits (2048 is Awala's default).
    pub fn generate(bits: usize) -> Result<Self> {
        let key = rsa::PrivateKey::new(&mut rand::rng(), bits)
            .map_err(|e| ToolkitError::Rsa(e.to_string()))?;
        let der = key
            .to_public_key()
            .to_public_key_der()
            .map_err(|e| ToolkitError::Rsa(e.to_string()))?;
        let spki_der =
            canonical_rsa_spki(der.as_bytes()).map_err(|e| ToolkitError::Rsa(e.to_string()))?;
        let id = EndpointId::from_spki_der(&spki_der);
        Ok(Self { key, spki_der, id })
    }

    /// The endpoint id.
    pub fn id(&self) -> &EndpointId {
        &self.id
    }

    /// The identity key as SubjectPublicKeyInfo DER.
    pub fn spki_der(&self) -> &[u8] {
        &self.spki_der
    }

    /// The content of a pairing request from this endpoint.
    pub fn pairing_request(&self, requester: &str, target: &str) -> Vec<u8> {
        encode_request(requester, target, &self.spki_der)
    }
}

/// Hash of an RSASSA-PSS signature.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PssHash {
    /// SHA-256 (Awala's default).
    Sha256,
    /// SHA-384.
    Sha384,
    /// SHA-512.
    Sha512,
}

/// How a certificate is signed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignatureScheme {
    /// RSASSA-PSS, as Awala signs.
    Pss(PssHash),
    /// PKCS#1 v1.5 with SHA-256, which Awala never uses.
    Pkcs1v15,
}

/// What the AuthorityKeyIdentifier extension holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthorityKeyIdMode {
    /// The SHA-256 of the issuer's SPKI, as Awala writes it.
    IssuerDigest,
    /// No extension at all.
    Absent,
    /// The extension without a key identifier.
    WithoutKeyIdentifier,
}

/// Options of a certificate.
#[derive(Debug, Clone)]
pub struct CertificateOptions {
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
    /// Whether the subject may issue certificates.
    pub ca: bool,
    /// The path length constraint.
    pub path_len: Option<u8>,
    /// The signature scheme.
    pub signature: SignatureScheme,
    /// The AuthorityKeyIdentifier extension.
    pub authority_key_id: AuthorityKeyIdMode,
}

impl CertificateOptions {
    /// A PDA's options: not a CA, path length 0, PSS/SHA-256, valid from now for `ttl`.
    pub fn pda(ttl: Duration) -> Self {
        let now = SystemTime::now();
        Self {
            not_before: now,
            not_after: now + ttl,
            ca: false,
            path_len: Some(0),
            signature: SignatureScheme::Pss(PssHash::Sha256),
            authority_key_id: AuthorityKeyIdMode::IssuerDigest,
        }
    }

    /// A CA certificate's options (gateway or endpoint certificate).
    pub fn ca(ttl: Duration, path_len: u8) -> Self {
        Self {
            ca: true,
            path_len: Some(path_len),
            ..Self::pda(ttl)
        }
    }
}

#[derive(Sequence)]
struct ValidityDer {
    not_before: Time,
    not_after: Time,
}

#[derive(Sequence)]
struct TbsCertificateDer {
    #[asn1(context_specific = "0", tag_mode = "EXPLICIT")]
    version: u8,
    serial_number: u64,
    signature: AlgorithmIdentifierOwned,
    issuer: Name,
    validity: ValidityDer,
    subject: Name,
    subject_public_key_info: SubjectPublicKeyInfoOwned,
    #[asn1(context_specific = "3", tag_mode = "EXPLICIT")]
    extensions: Vec<Extension>,
}

#[derive(Sequence)]
struct CertificateDer {
    tbs_certificate: TbsCertificateDer,
    signature_algorithm: AlgorithmIdentifierOwned,
    signature: BitString,
}

const SHA256_WITH_RSA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.11");

fn extension(oid: ObjectIdentifier, critical: bool, value: &impl Encode) -> Result<Extension> {
    Ok(Extension {
        extn_id: oid,
        critical,
        extn_value: OctetString::new(value.to_der()?)?,
    })
}

fn name_for(id: &EndpointId) -> Result<Name> {
    Name::from_str(&format!("CN={id}")).map_err(ToolkitError::Der)
}

fn signature_algorithm(scheme: SignatureScheme) -> Result<AlgorithmIdentifierOwned> {
    let (oid, parameters) = match scheme {
        SignatureScheme::Pkcs1v15 => (SHA256_WITH_RSA, Some(Any::null())),
        SignatureScheme::Pss(hash) => {
            let params = match hash {
                PssHash::Sha256 => pkcs1::RsaPssParams::new::<Sha256>(32),
                PssHash::Sha384 => pkcs1::RsaPssParams::new::<Sha384>(48),
                PssHash::Sha512 => pkcs1::RsaPssParams::new::<Sha512>(64),
            };
            (ID_RSASSA_PSS, Some(Any::from_der(&params.to_der()?)?))
        }
    };
    Ok(AlgorithmIdentifierOwned { oid, parameters })
}

fn sign(issuer: &Endpoint, scheme: SignatureScheme, message: &[u8]) -> Vec<u8> {
    let key = issuer.key.clone();
    let mut rng = rand::rng();
    match scheme {
        SignatureScheme::Pkcs1v15 => rsa::pkcs1v15::SigningKey::<Sha256>::new(key)
            .sign(message)
            .to_vec(),
        SignatureScheme::Pss(PssHash::Sha256) => rsa::pss::SigningKey::<Sha256>::new(key)
            .sign_with_rng(&mut rng, message)
            .to_vec(),
        SignatureScheme::Pss(PssHash::Sha384) => rsa::pss::SigningKey::<Sha384>::new(key)
            .sign_with_rng(&mut rng, message)
            .to_vec(),
        SignatureScheme::Pss(PssHash::Sha512) => rsa::pss::SigningKey::<Sha512>::new(key)
            .sign_with_rng(&mut rng, message)
            .to_vec(),
    }
}

/// Issues a certificate for the key `subject_spki_der`, signed by `issuer`.
pub fn issue_certificate(
    issuer: &Endpoint,
    subject_spki_der: &[u8],
    options: &CertificateOptions,
) -> Result<Vec<u8>> {
    let subject_id = EndpointId::from_spki_der(subject_spki_der);
    let mut extensions = vec![extension(
        ID_CE_BASIC_CONSTRAINTS,
        true,
        &BasicConstraints {
            ca: options.ca,
            path_len_constraint: options.path_len,
        },
    )?];
    match options.authority_key_id {
        AuthorityKeyIdMode::Absent => {}
        mode => extensions.push(extension(
            ID_CE_AUTHORITY_KEY_IDENTIFIER,
            false,
            &AuthorityKeyIdentifier {
                key_identifier: match mode {
                    AuthorityKeyIdMode::IssuerDigest => Some(OctetString::new(
                        Sha256::digest(issuer.spki_der()).to_vec(),
                    )?),
                    _ => None,
                },
                authority_cert_issuer: None,
                authority_cert_serial_number: None,
            },
        )?),
    }
    extensions.push(extension(
        ID_CE_SUBJECT_KEY_IDENTIFIER,
        false,
        &SubjectKeyIdentifier(OctetString::new(Sha256::digest(subject_spki_der).to_vec())?),
    )?);
    let algorithm = signature_algorithm(options.signature)?;
    let tbs = TbsCertificateDer {
        version: 2,
        // Positive 63-bit serial: DER needs no padding byte.
        serial_number: rand::random::<u64>() >> 1,
        signature: algorithm.clone(),
        issuer: name_for(issuer.id())?,
        validity: ValidityDer {
            not_before: Time::try_from(options.not_before)?,
            not_after: Time::try_from(options.not_after)?,
        },
        subject: name_for(&subject_id)?,
        subject_public_key_info: SubjectPublicKeyInfoOwned::from_der(subject_spki_der)?,
        extensions,
    };
    let signature = sign(issuer, options.signature, &tbs.to_der()?);
    Ok(CertificateDer {
        tbs_certificate: tbs,
        signature_algorithm: algorithm,
        signature: BitString::from_bytes(&signature)?,
    }
    .to_der()?)
}

const ID_CE_BASIC_CONSTRAINTS: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.29.19");
const ID_CE_AUTHORITY_KEY_IDENTIFIER: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.29.35");
const ID_CE_SUBJECT_KEY_IDENTIFIER: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.29.14");

/// A fresh P-256 session key: `(key id, SPKI DER)`.
pub fn session_key() -> Result<(Vec<u8>, Vec<u8>)> {
    let secret = <p256::SecretKey as rsa::Generate>::generate_from_rng(&mut rand::rng());
    let spki = secret
        .public_key()
        .to_public_key_der()
        .map_err(|e| ToolkitError::Rsa(e.to_string()))?;
    Ok((rand::random::<[u8; 8]>().to_vec(), spki.as_bytes().to_vec()))
}

/// Connection params in which `granter` authorises `grantee` (given by its SPKI) to send
/// it parcels, as `FirstPartyEndpoint.authorizeIndefinitely()` would: the PDA, then the
/// certificate authorities `cas` (leaf-most first), and a fresh session key.
pub fn connection_params(
    granter: &Endpoint,
    grantee_spki_der: &[u8],
    pda_options: &CertificateOptions,
    cas: &[Vec<u8>],
    internet_gateway_address: &str,
) -> Result<Vec<u8>> {
    let pda = issue_certificate(granter, grantee_spki_der, pda_options)?;
    let (key_id, session_spki) = session_key()?;
    Ok(encode_connection_params(
        granter.spki_der(),
        internet_gateway_address,
        &pda,
        cas,
        Some((&key_id, &session_spki)),
    )?)
}

/// What a pairing match tells its recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedMatch {
    /// The contact's VeraId.
    pub contact_veraid: String,
    /// The recipient's own VeraId, as the server has it.
    pub own_veraid: String,
    /// The contact's Awala endpoint id.
    pub contact_endpoint_id: EndpointId,
    /// The contact's identity key, SPKI DER.
    pub contact_key_der: Vec<u8>,
}

/// Why a message from the server could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// Not the expected `a,b,…` text.
    #[error("malformed message: {0}")]
    Malformed(&'static str),
    /// The contact's key does not match its endpoint id.
    #[error("the contact's key does not belong to its endpoint id")]
    KeyMismatch,
}

/// Reads a pairing match as a client built to the protocol document does
/// (`contactVeraId,ownVeraId,endpointId,base64 key`), checking that the key is the
/// endpoint's.
pub fn read_match(content: &[u8]) -> Result<ReceivedMatch, ReadError> {
    read_match_in(content, MatchOrder::ContactFirst)
}

/// Reads a pairing match whose VeraIds come in `order`; the 2023 Letro for Android app
/// reads [`MatchOrder::RecipientFirst`] (`ownVeraId,contactVeraId,endpointId,base64 key`).
pub fn read_match_in(content: &[u8], order: MatchOrder) -> Result<ReceivedMatch, ReadError> {
    use base64::Engine as _;
    let text = std::str::from_utf8(content).map_err(|_| ReadError::Malformed("not UTF-8"))?;
    let fields: Vec<&str> = text.split(',').collect();
    let [first, second, endpoint, key] = fields[..] else {
        return Err(ReadError::Malformed("expected 4 fields"));
    };
    let (contact, own) = match order {
        MatchOrder::ContactFirst => (first, second),
        MatchOrder::RecipientFirst => (second, first),
    };
    let contact_endpoint_id =
        EndpointId::parse(endpoint).map_err(|_| ReadError::Malformed("endpoint id"))?;
    let contact_key_der = base64::engine::general_purpose::STANDARD
        .decode(key)
        .map_err(|_| ReadError::Malformed("key is not base64"))?;
    let canonical =
        canonical_rsa_spki(&contact_key_der).map_err(|_| ReadError::Malformed("key"))?;
    if EndpointId::from_spki_der(&canonical) != contact_endpoint_id {
        return Err(ReadError::KeyMismatch);
    }
    Ok(ReceivedMatch {
        contact_veraid: contact.to_owned(),
        own_veraid: own.to_owned(),
        contact_endpoint_id,
        contact_key_der,
    })
}

/// Reads a pairing completion (`granterEndpointId,base64 connection params`).
pub fn read_completion(content: &[u8]) -> Result<(EndpointId, Vec<u8>), ReadError> {
    use base64::Engine as _;
    let text = std::str::from_utf8(content).map_err(|_| ReadError::Malformed("not UTF-8"))?;
    let (granter, params) = text
        .split_once(',')
        .ok_or(ReadError::Malformed("expected 2 fields"))?;
    let granter = EndpointId::parse(granter).map_err(|_| ReadError::Malformed("granter id"))?;
    let params = base64::engine::general_purpose::STANDARD
        .decode(params)
        .map_err(|_| ReadError::Malformed("params are not base64"))?;
    Ok((granter, params))
}
