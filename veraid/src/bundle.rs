//! SignatureBundle: decoding, and verification in the reference's order (veraid.md §4).

use base64::Engine;
use base64::engine::general_purpose::STANDARD;

use crate::anchors::TrustAnchors;
use crate::asn1::{Asn1Error, Reader, oid_string, tag, time};
use crate::cache::{Cache, ChainFacts};
use crate::cms::{CmsFailure, SignedData};
use crate::dns::{CLASS_IN, Message, Name, WireError, rtype, txt_strings};
use crate::dnssec::{self, DnssecError, Window};
use crate::pki::{Certificate, Hash, RsaKey, SignatureAlgorithm};
use crate::record::{self, RecordError};

/// The largest bundle accepted, in octets. Real ones are 6 to 10 KiB (RSA-2048 to
/// RSA-4096 organisations).
pub const MAX_BUNDLE_OCTETS: usize = 64 * 1024;
/// The most DNS messages a chain may hold. `retrieveVeraidDnssecChain` stores about
/// two per zone; eight zones deep is far beyond real organisations.
pub const MAX_CHAIN_MESSAGES: usize = 32;

const SIGNATURE_METADATA: &str = "1.3.6.1.4.1.58708.1.0";
const MEMBER_ATTRIBUTION: &str = "1.3.6.1.4.1.58708.1.2";
/// The name a member certificate (or an attribution) gives the organisation's bot.
const BOT_NAME: &str = "@";

/// A closed period of time, in seconds since the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Period {
    /// Its first second.
    pub start: i64,
    /// Its last second.
    pub end: i64,
}

impl Period {
    /// The period from `start` to `end`, both included.
    pub fn new(start: i64, end: i64) -> Self {
        Self { start, end }
    }

    /// The common part of two periods, if they overlap (touching ends count).
    pub fn intersect(self, other: Self) -> Option<Self> {
        let p = Self::new(self.start.max(other.start), self.end.min(other.end));
        (p.start <= p.end).then_some(p)
    }
}

/// Who signed: a member of an organisation.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Member {
    /// The organisation's domain name, without a trailing dot (`example.com`).
    pub organisation: String,
    /// The user name, or none for the organisation's bot.
    pub user: Option<String>,
}

impl Member {
    /// The member's VeraId: `user@organisation`, or the organisation alone for its bot.
    pub fn veraid_id(&self) -> String {
        match &self.user {
            Some(user) => format!("{user}@{}", self.organisation),
            None => self.organisation.clone(),
        }
    }
}

/// Which key made the CMS signature.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignedBy {
    /// The member's own key, certified by the organisation.
    Member,
    /// The organisation's key, attributing the signature to the member (VeraId 2.x).
    Organisation,
}

/// A bundle that verified: whose signature it is, and what they signed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// The signer.
    pub member: Member,
    /// Whose key signed.
    pub signed_by: SignedBy,
    /// The signed plaintext.
    pub plaintext: Vec<u8>,
    /// The part of the requested period in which every piece of the bundle was valid.
    pub period: Period,
    /// Whether the organisation's DNSSEC chain and certificate had been validated before
    /// (by the same [`Verifier`]), so that no DNSSEC signature was checked this time.
    pub from_cache: bool,
}

/// Why a bundle does not verify; each variant is one check of veraid.md §4.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum VerifyError {
    /// Larger than [`MAX_BUNDLE_OCTETS`].
    #[error("the bundle is larger than {MAX_BUNDLE_OCTETS} octets")]
    TooLarge,
    /// Not a SignatureBundle (or one of its parts is not what it should be).
    #[error("not a SignatureBundle: {0}")]
    Malformed(#[from] Asn1Error),
    /// The version is not 0.
    #[error("unsupported SignatureBundle version")]
    UnsupportedVersion,
    /// A message of the DNSSEC chain is not a DNS message, or there are too many.
    #[error("the DNSSEC chain is malformed: {0}")]
    MalformedChain(String),
    /// No certificate in the SignedData is the one its signer names.
    #[error("the signer's certificate is not in the signature")]
    SignerCertificateMissing,
    /// The plaintext is not in the signature (a detached signature).
    #[error("the plaintext is not encapsulated in the signature")]
    Detached,
    /// The CMS signature lacks its content-type or message-digest attribute.
    #[error("the signature lacks its signed attributes")]
    SignedAttributesMissing,
    /// The message digest is not that of the plaintext.
    #[error("the plaintext does not match the signature's digest")]
    DigestMismatch,
    /// The signature does not verify with the signer's key.
    #[error("the signature is invalid")]
    BadSignature,
    /// The VeraId signature metadata attribute is absent.
    #[error("the signature metadata is missing")]
    MetadataMissing,
    /// The VeraId signature metadata does not parse, or its period ends before it starts.
    #[error("the signature metadata is malformed")]
    MetadataMalformed,
    /// The signature is for another service.
    #[error("the signature is bound to another service ({0})")]
    WrongService(String),
    /// The signature's validity period does not overlap the period asked about.
    #[error("the signature is not valid in the period asked about")]
    SignatureOutsidePeriod,
    /// The member certificate was not issued by the organisation certificate.
    #[error("the member certificate was not issued by the organisation")]
    NotIssuedByOrganisation,
    /// The organisation certificate is not a CA certificate.
    #[error("the organisation certificate is not a CA certificate")]
    OrganisationNotCa,
    /// A certificate is not valid at the time of verification.
    #[error("a certificate is not valid now")]
    CertificateNotValidNow,
    /// The certificates' validity does not overlap the signature's period.
    #[error("the certificates are not valid in the signature's period")]
    CertificatesOutsidePeriod,
    /// The organisation certificate has no common name.
    #[error("the organisation certificate has no common name")]
    OrganisationNameMissing,
    /// The organisation key is not an RSA-PSS key of 2048, 3072 or 4096 bits.
    #[error("the organisation key is not a supported RSA-PSS key")]
    UnsupportedOrganisationKey,
    /// A TXT record at `_veraid.<organisation>` is not a VeraId record.
    #[error("the VeraId TXT record is malformed: {0}")]
    Record(#[from] RecordError),
    /// No VeraId record names the organisation key for the service.
    #[error("no VeraId record for the organisation key and service")]
    NoRecord,
    /// The DNSSEC chain does not validate the VeraId TXT record.
    #[error("the DNSSEC chain does not validate: {0}")]
    Dnssec(#[from] DnssecError),
    /// The member's name contains `@`, a tab or a line break.
    #[error("the user name is invalid")]
    InvalidUserName,
}

impl VerifyError {
    /// A short, stable name of the check that failed (`dnssec`, `signature`, …), for
    /// metric labels and logs: unlike the message, it names no domain or user.
    pub fn check(&self) -> &'static str {
        match self {
            Self::TooLarge | Self::Malformed(_) | Self::UnsupportedVersion => "format",
            Self::MalformedChain(_) => "chain_format",
            Self::SignerCertificateMissing
            | Self::Detached
            | Self::SignedAttributesMissing
            | Self::DigestMismatch
            | Self::BadSignature => "signature",
            Self::MetadataMissing | Self::MetadataMalformed => "metadata",
            Self::WrongService(_) => "service",
            Self::SignatureOutsidePeriod => "signature_period",
            Self::NotIssuedByOrganisation | Self::OrganisationNotCa => "certificate_path",
            Self::CertificateNotValidNow | Self::CertificatesOutsidePeriod => "certificate_period",
            Self::OrganisationNameMissing | Self::UnsupportedOrganisationKey => {
                "organisation_certificate"
            }
            Self::Record(_) | Self::NoRecord => "veraid_record",
            Self::Dnssec(_) => "dnssec",
            Self::InvalidUserName => "user_name",
        }
    }
}

impl From<CmsFailure> for VerifyError {
    fn from(failure: CmsFailure) -> Self {
        match failure {
            CmsFailure::Detached => Self::Detached,
            CmsFailure::MissingAttributes => Self::SignedAttributesMissing,
            CmsFailure::DigestMismatch => Self::DigestMismatch,
            CmsFailure::BadSignature => Self::BadSignature,
        }
    }
}

/// The parts of a SignatureBundle, borrowed from its octets.
struct Bundle<'a> {
    chain: Vec<&'a [u8]>,
    organisation: Certificate<'a>,
    signature: SignedData<'a>,
}

impl<'a> Bundle<'a> {
    fn decode(octets: &'a [u8]) -> Result<Self, VerifyError> {
        if octets.len() > MAX_BUNDLE_OCTETS {
            return Err(VerifyError::TooLarge);
        }
        let mut outer = Reader::new(octets);
        let mut r = outer.enter(tag::SEQUENCE, "SignatureBundle")?;
        // Data after the bundle is refused: no producer writes it (veraid.md §10.1).
        outer.finish("SignatureBundle (trailing data)")?;
        let version = r.expect(tag::context(0), "version")?;
        if version.content != [0] {
            return Err(VerifyError::UnsupportedVersion);
        }
        // A SET OF whose order and duplicates are kept as written (veraid.md §10.1).
        let mut set = r.enter(tag::context_constructed(1), "DNSSEC chain")?;
        let mut chain = Vec::new();
        while !set.is_empty() {
            if chain.len() == MAX_CHAIN_MESSAGES {
                return Err(VerifyError::MalformedChain(format!(
                    "more than {MAX_CHAIN_MESSAGES} messages"
                )));
            }
            chain.push(
                set.expect(tag::OCTET_STRING, "DNSSEC chain message")?
                    .content,
            );
        }
        let organisation = Certificate::from_content(
            r.expect(tag::context_constructed(2), "organisation certificate")?
                .content,
        )?;
        let signature = SignedData::from_content_info(
            r.expect(tag::context_constructed(3), "signature")?.content,
        )?;
        r.finish("SignatureBundle")?;
        Ok(Self {
            chain,
            organisation,
            signature,
        })
    }
}

/// What to verify a bundle for: the service, the period, the time now and the roots.
#[derive(Debug, Clone, Copy)]
pub struct Verification<'a> {
    /// The service OID the signature must be bound to (Letro: `1.3.6.1.4.1.58708.2.0`).
    pub service: &'a str,
    /// The period in which the signature must have been valid at some point.
    pub period: Period,
    /// The current time: the certificates must be valid at it.
    pub now: i64,
    /// The DNSSEC trust anchors.
    pub anchors: &'a TrustAnchors,
}

/// Verifies a SignatureBundle with an encapsulated plaintext, as veraid-js 3.x does
/// (veraid.md §4), and returns the signer and the plaintext. Remembers nothing: a
/// [`Verifier`] verifies many bundles of one organisation for less.
pub fn verify(bundle: &[u8], verification: &Verification<'_>) -> Result<Verified, VerifyError> {
    verify_with(bundle, verification, None)
}

/// Verifies bundles from fixed trust anchors, remembering what it verified of each
/// organisation (its DNSSEC chain and certificate) and of each member certificate, so
/// that the next bundle of the same organisation costs about one RSA signature check.
///
/// Its results are those of [`verify`]: it reuses only what a successful verification of
/// the very same octets established, re-checks on every bundle what depends on time (each
/// remembered DNSSEC signature must still overlap the new window, each certificate must
/// be valid now), and forgets the oldest entries past its capacity.
#[derive(Debug)]
pub struct Verifier {
    anchors: TrustAnchors,
    cache: Cache,
}

impl Verifier {
    /// Organisations remembered by [`Verifier::new`].
    pub const DEFAULT_ORGANISATIONS: usize = 1024;
    /// Member certificates remembered by [`Verifier::new`].
    pub const DEFAULT_MEMBERS: usize = 65_536;

    /// A verifier trusting `anchors`, remembering up to [`Verifier::DEFAULT_ORGANISATIONS`]
    /// organisations and [`Verifier::DEFAULT_MEMBERS`] member certificates: about 8 MiB
    /// at the most (an organisation takes at most ~3 KiB, a member certificate ~72
    /// octets), a few hundred kilobytes in practice.
    pub fn new(anchors: TrustAnchors) -> Self {
        Self::with_capacity(anchors, Self::DEFAULT_ORGANISATIONS, Self::DEFAULT_MEMBERS)
    }

    /// A verifier remembering up to `organisations` chains and `members` member
    /// certificates; zero remembers none.
    pub fn with_capacity(anchors: TrustAnchors, organisations: usize, members: usize) -> Self {
        Self {
            anchors,
            cache: Cache::new(organisations, members),
        }
    }

    /// The trust anchors.
    pub fn anchors(&self) -> &TrustAnchors {
        &self.anchors
    }

    /// How many organisations and member certificates it remembers now.
    pub fn remembered(&self) -> (usize, usize) {
        self.cache.len()
    }

    /// Verifies `bundle` for `service`, valid at some point in `period`, with its
    /// certificates valid at `now`.
    pub fn verify(
        &self,
        bundle: &[u8],
        service: &str,
        period: Period,
        now: i64,
    ) -> Result<Verified, VerifyError> {
        let verification = Verification {
            service,
            period,
            now,
            anchors: &self.anchors,
        };
        verify_with(bundle, &verification, Some(&self.cache))
    }
}

/// The period the DNSSEC signatures must reach (veraid.md §4 step 8): the last
/// `ttl_override` seconds of `p2`, the period in which everything else is valid.
fn dnssec_period(p2: Period, ttl_override: u32) -> Result<Period, VerifyError> {
    Period::new(p2.end - i64::from(ttl_override), p2.end)
        .intersect(p2)
        .ok_or(VerifyError::CertificatesOutsidePeriod)
}

/// `period` as DNSSEC compares times: unsigned seconds, negative times as 0.
fn dnssec_window(period: Period) -> Window {
    Window {
        start: u64::try_from(period.start).unwrap_or(0),
        end: u64::try_from(period.end).unwrap_or(0),
    }
}

/// The SHA-256 of length-prefixed parts: a cache key naming exactly these octets.
fn cache_key(parts: &[&[u8]]) -> [u8; 32] {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    for part in parts {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part);
    }
    h.finalize().into()
}

fn verify_with(
    bundle: &[u8],
    verification: &Verification<'_>,
    cache: Option<&Cache>,
) -> Result<Verified, VerifyError> {
    let bundle = Bundle::decode(bundle)?;
    let signed = &bundle.signature;
    let organisation = &bundle.organisation;

    // 2. The signer: the organisation itself when a member attribution is signed.
    let attribution = signed.signer.attribute(MEMBER_ATTRIBUTION);
    let (signer, signed_by) = match attribution {
        Some(_) => (organisation, SignedBy::Organisation),
        None => (
            signed
                .certificates
                .iter()
                .find(|c| signed.signer.names(c))
                .ok_or(VerifyError::SignerCertificateMissing)?,
            SignedBy::Member,
        ),
    };

    // 3. The CMS signature.
    let signer_key = RsaKey::from_spki(signer.spki).ok_or(VerifyError::BadSignature)?;
    let plaintext = signed.check(&signer_key)?;

    // 4. The signature metadata.
    let metadata = signed
        .signer
        .attribute(SIGNATURE_METADATA)
        .ok_or(VerifyError::MetadataMissing)?;
    let (service, signature_period) =
        signature_metadata(metadata.raw).map_err(|_| VerifyError::MetadataMalformed)?;
    if service != verification.service {
        return Err(VerifyError::WrongService(service));
    }

    // 5. The signature's period within the one asked about.
    let p1 = verification
        .period
        .intersect(signature_period)
        .ok_or(VerifyError::SignatureOutsidePeriod)?;

    // 6. The certificate path, and the certificates' validity.
    let organisation_key =
        RsaKey::from_spki(organisation.spki).ok_or(VerifyError::UnsupportedOrganisationKey)?;
    if signed_by == SignedBy::Member {
        let issued_key = cache_key(&[signer.raw, organisation.raw]);
        if !cache.is_some_and(|c| c.issued(&issued_key)) {
            check_issued(signer, organisation, &organisation_key)?;
            if let Some(cache) = cache {
                cache.remember_issued(issued_key);
            }
        }
    }
    if !organisation.is_ca || organisation.key_usage_forbids_signing_certificates {
        return Err(VerifyError::OrganisationNotCa);
    }
    if organisation.has_unknown_critical_extension {
        return Err(VerifyError::OrganisationNotCa);
    }
    if !signer.valid_at(verification.now) || !organisation.valid_at(verification.now) {
        return Err(VerifyError::CertificateNotValidNow);
    }
    let certificates = Period::new(signer.not_before, signer.not_after)
        .intersect(Period::new(organisation.not_before, organisation.not_after))
        .ok_or(VerifyError::CertificatesOutsidePeriod)?;
    let p2 = certificates
        .intersect(p1)
        .ok_or(VerifyError::CertificatesOutsidePeriod)?;

    // 7. The organisation key's VeraId record.
    let organisation_name = organisation
        .common_name
        .as_deref()
        .ok_or(VerifyError::OrganisationNameMissing)?;
    let organisation_name = organisation_name
        .strip_suffix('.')
        .unwrap_or(organisation_name);
    let chain_key = {
        let mut parts: Vec<&[u8]> = bundle.chain.clone();
        parts.push(organisation.raw);
        cache_key(&parts)
    };

    // 7-9, remembered: this chain and certificate validated before, by signatures that
    // must still reach this bundle's window.
    let remembered = match cache.and_then(|c| c.chain(&chain_key)) {
        Some(facts) => {
            let record = record::select(
                &facts.txt,
                facts.key_algorithm,
                &facts.key_id,
                verification.service,
            )?
            .ok_or(VerifyError::NoRecord)?;
            let p3 = dnssec_period(p2, record.ttl_override)?;
            facts.reaches(dnssec_window(p3)).then_some(p3)
        }
        None => None,
    };
    let from_cache = remembered.is_some();
    let p3 = match remembered {
        Some(p3) => p3,
        None => {
            let (key_algorithm, key_id) = key_spec(organisation, &organisation_key)?;
            let messages = bundle
                .chain
                .iter()
                .map(|m| Message::parse(m))
                .collect::<Result<Vec<_>, WireError>>()
                .map_err(|e| VerifyError::MalformedChain(e.to_string()))?;
            let owner = Name::parse(&format!("_veraid.{organisation_name}."))
                .map_err(|_| VerifyError::OrganisationNameMissing)?;
            let txt = unvalidated_txt(&messages, &owner)?;
            let record = record::select(&txt, key_algorithm, &key_id, verification.service)?
                .ok_or(VerifyError::NoRecord)?;
            // 8. The window the DNSSEC signatures must reach.
            let p3 = dnssec_period(p2, record.ttl_override)?;
            // 9. DNSSEC.
            let validated = dnssec::validate_relying(
                &messages,
                &owner,
                rtype::TXT,
                verification.anchors.records(),
                dnssec_window(p3),
            )?;
            if validated.rdatas.len() != txt.len() {
                return Err(VerifyError::NoRecord);
            }
            if let Some(cache) = cache {
                cache.remember_chain(
                    chain_key,
                    ChainFacts {
                        key_algorithm,
                        key_id,
                        txt,
                        signatures: validated.signatures,
                    },
                );
            }
            p3
        }
    };

    // 10. The member.
    let user = match attribution {
        Some(name) => {
            if name.tag != tag::UTF8_STRING {
                return Err(VerifyError::InvalidUserName);
            }
            String::from_utf8(name.content.to_vec()).map_err(|_| VerifyError::InvalidUserName)?
        }
        None => signer
            .common_name
            .clone()
            .ok_or(VerifyError::InvalidUserName)?,
    };
    let user = if user == BOT_NAME {
        None
    } else if user.contains(['@', '\t', '\r', '\n']) {
        return Err(VerifyError::InvalidUserName);
    } else {
        Some(user)
    };
    Ok(Verified {
        member: Member {
            organisation: organisation_name.to_owned(),
            user,
        },
        signed_by,
        plaintext: plaintext.to_vec(),
        period: p3,
        from_cache,
    })
}

/// Whether `issuer` issued `subject`, as PKI.js's path builder decides (veraid.md §7):
/// key identifiers when both have them, names otherwise, and the signature.
fn check_issued(
    subject: &Certificate<'_>,
    issuer: &Certificate<'_>,
    issuer_key: &RsaKey,
) -> Result<(), VerifyError> {
    let ids_agree = match (subject.authority_key_id, issuer.subject_key_id) {
        (Some(aki), Some(ski)) => aki == ski,
        _ => true,
    };
    if !ids_agree
        || subject.issuer != issuer.subject
        || !subject
            .signature_algorithm
            .verifies(issuer_key, subject.tbs, subject.signature)
    {
        return Err(VerifyError::NotIssuedByOrganisation);
    }
    Ok(())
}

/// The organisation key's VeraId algorithm and key id (veraid.md §3.3).
fn key_spec(organisation: &Certificate<'_>, key: &RsaKey) -> Result<(u8, String), VerifyError> {
    // The reference imports the key as the certificate's signature algorithm says, and
    // takes RSA-PSS keys only.
    if !matches!(
        organisation.signature_algorithm,
        SignatureAlgorithm::Pss { .. }
    ) {
        return Err(VerifyError::UnsupportedOrganisationKey);
    }
    let (algorithm, hash) = match key.bits() {
        2048 => (1, Hash::Sha256),
        3072 => (2, Hash::Sha384),
        4096 => (3, Hash::Sha512),
        _ => return Err(VerifyError::UnsupportedOrganisationKey),
    };
    Ok((
        algorithm,
        STANDARD.encode(hash.digest(&key.canonical_spki())),
    ))
}

/// The character-strings of each TXT record in the one response for `owner`/TXT, before
/// validation (the TTL override they hold decides the validation window).
fn unvalidated_txt(messages: &[Message], owner: &Name) -> Result<Vec<Vec<Vec<u8>>>, VerifyError> {
    let mut responses = messages
        .iter()
        .filter(|m| m.answers_question(owner, rtype::TXT));
    let response = match (responses.next(), responses.next()) {
        (Some(response), None) => response,
        (None, _) => {
            return Err(VerifyError::Dnssec(DnssecError::MissingResponse {
                name: owner.to_string(),
                rtype: rtype::TXT,
            }));
        }
        (Some(_), Some(_)) => {
            return Err(VerifyError::Dnssec(DnssecError::SeveralResponses {
                name: owner.to_string(),
                rtype: rtype::TXT,
            }));
        }
    };
    response
        .answers
        .iter()
        .filter(|r| r.rtype == rtype::TXT && r.class == CLASS_IN && r.name == *owner)
        .map(|r| txt_strings(&r.rdata).map_err(|e| VerifyError::MalformedChain(e.to_string())))
        .collect()
}

/// The service OID and the validity period of a SignatureMetadata attribute value.
fn signature_metadata(value: &[u8]) -> Result<(String, Period), Asn1Error> {
    let mut outer = Reader::new(value);
    let mut r = outer.enter(tag::SEQUENCE, "signature metadata")?;
    outer.finish("signature metadata")?;
    let service = oid_string(r.expect(tag::context(0), "service")?.content)?;
    let mut period = r.enter(tag::context_constructed(1), "validity period")?;
    r.finish("signature metadata")?;
    let start = time(period.expect(tag::context(0), "period start")?)?;
    let end = time(period.expect(tag::context(1), "period end")?)?;
    period.finish("validity period")?;
    if end < start {
        return Err(Asn1Error("validity period"));
    }
    Ok((service, Period::new(start, end)))
}
