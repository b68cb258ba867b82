//! Mock VeraId organisations, for tests, demos and benchmarks (feature `testing`).
//!
//! [`MockHierarchy`] is a DNSSEC hierarchy of its own: a root whose DS record is the
//! only trust anchor needed ([`MockHierarchy::trust_anchors`]), and a signed zone for
//! every label down to each organisation, as dnssec-js's MockChain builds them. An
//! [`Organisation`] has its RSA key, its self-issued certificate and its DNSSEC chain
//! (DS and DNSKEY of every zone, and the `_veraid` TXT record naming its key); a
//! [`SigningMember`] signs plaintexts into bundles that [`crate::verify`] accepts, as
//! veraid-js writes them.
//!
//! DNSSEC keys are Ed25519 (algorithm 15): fast to make and to sign with. Nothing here
//! is for production: keys live in memory, unprotected.
//!
//! ```
//! use veraid::testing::{KeyPair, MockHierarchy};
//! use veraid::{Period, Verification, verify};
//!
//! let now = 1_800_000_000;
//! let mut hierarchy = MockHierarchy::new(now);
//! let organisation = hierarchy.organisation("example.com", KeyPair::generate(2048));
//! let alice = organisation.member(Some("alice"), KeyPair::generate(2048), now);
//! let bundle = alice.sign(b"hello", "1.3.6.1.4.1.58708.2.0", Period::new(now - 60, now + 3600));
//!
//! let anchors = hierarchy.trust_anchors();
//! let verified = verify(&bundle, &Verification {
//!     service: "1.3.6.1.4.1.58708.2.0",
//!     period: Period::new(now - 86_400, now),
//!     now,
//!     anchors: &anchors,
//! }).expect("valid");
//! assert_eq!(verified.member.veraid_id(), "alice@example.com");
//! assert_eq!(verified.plaintext, b"hello");
//! ```

use std::collections::HashMap;
use std::sync::Arc;

use ed25519_dalek::Signer as _;
use rsa::pkcs8::EncodePublicKey;
use rsa::signature::{RandomizedSigner, SignatureEncoding};
use rsa::traits::PublicKeyParts;
use sha2::{Digest, Sha256};

use crate::anchors::TrustAnchors;
use crate::asn1::{days_from_civil, oid_content, tag};
use crate::bundle::Period;
use crate::dns::{CLASS_IN, Dnskey, Name, Rrsig, rtype};
use crate::dnssec::crypto::algorithm::ED25519;

const TTL: u32 = 3600;

/// An RSA key pair for an organisation or a member.
#[derive(Clone)]
pub struct KeyPair(rsa::PrivateKey);

impl std::fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeyPair(RSA-{})", self.0.size() * 8)
    }
}

impl KeyPair {
    /// A fresh key of `bits` (2048, 3072 or 4096 for an organisation). Slow: tens of
    /// milliseconds to seconds; reuse keys where the test allows.
    pub fn generate(bits: usize) -> Self {
        match rsa::PrivateKey::new(&mut rand::rng(), bits) {
            Ok(key) => Self(key),
            Err(e) => panic!("RSA key generation failed: {e}"),
        }
    }

    /// The public key's SubjectPublicKeyInfo (DER).
    pub fn spki(&self) -> Vec<u8> {
        rsa::PublicKey::from(&self.0)
            .to_public_key_der()
            .map(|d| d.as_bytes().to_vec())
            .unwrap_or_default()
    }

    /// RSASSA-PSS with SHA-256, MGF1-SHA-256 and a 32-octet salt, as the references sign.
    fn sign(&self, message: &[u8]) -> Vec<u8> {
        let key = rsa::pss::SigningKey::<Sha256>::new(self.0.clone());
        key.sign_with_rng(&mut rand::rng(), message).to_vec()
    }
}

/// A zone of the mock hierarchy: its name and its one key (KSK and ZSK at once).
struct Zone {
    name: Name,
    key: ed25519_dalek::SigningKey,
    dnskey: Vec<u8>,
}

impl Zone {
    fn new(name: Name) -> Self {
        let key = ed25519_dalek::SigningKey::from_bytes(&rand::random::<[u8; 32]>());
        let mut dnskey = vec![0x01, 0x01, 3, ED25519];
        dnskey.extend(key.verifying_key().as_bytes());
        Self { name, key, dnskey }
    }

    fn key_tag(&self) -> u16 {
        Dnskey::parse(&self.dnskey).map_or(0, |k| k.key_tag())
    }

    /// The DS record data naming this zone's key (SHA-256).
    fn ds(&self) -> Vec<u8> {
        let mut data = Vec::new();
        self.name.write_canonical(&mut data);
        data.extend(&self.dnskey);
        let mut ds = self.key_tag().to_be_bytes().to_vec();
        ds.extend([ED25519, 2]);
        ds.extend(Sha256::digest(&data));
        ds
    }

    /// An RRSIG by this zone over the RRset of `owner` and `rtype` made of `rdatas`.
    fn rrsig(&self, owner: &Name, rtype: u16, rdatas: &[Vec<u8>], validity: (u32, u32)) -> Vec<u8> {
        let mut prefix = rtype.to_be_bytes().to_vec();
        prefix.push(ED25519);
        prefix.push(u8::try_from(owner.label_count()).unwrap_or(u8::MAX));
        prefix.extend(TTL.to_be_bytes());
        prefix.extend(validity.1.to_be_bytes());
        prefix.extend(validity.0.to_be_bytes());
        prefix.extend(self.key_tag().to_be_bytes());
        self.name.write_canonical(&mut prefix);
        let Ok(unsigned) = Rrsig::parse(&prefix) else {
            return prefix;
        };
        let rdatas: Vec<&[u8]> = rdatas.iter().map(Vec::as_slice).collect();
        let signature = self
            .key
            .sign(&unsigned.signed_data(owner, CLASS_IN, &rdatas));
        prefix.extend(signature.to_bytes());
        prefix
    }
}

/// A DNSSEC hierarchy of mock zones, from a root of its own down to organisations.
pub struct MockHierarchy {
    zones: HashMap<String, Arc<Zone>>,
    /// Inception and expiration of every RRSIG.
    validity: (u32, u32),
}

impl std::fmt::Debug for MockHierarchy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MockHierarchy")
            .field("zones", &self.zones.len())
            .finish()
    }
}

impl MockHierarchy {
    /// A hierarchy whose signatures are valid from a day before `now` (Unix seconds) to
    /// 90 days after.
    pub fn new(now: i64) -> Self {
        let secs = |t: i64| u32::try_from(t.max(0)).unwrap_or(u32::MAX);
        let mut zones = HashMap::new();
        zones.insert(".".to_owned(), Arc::new(Zone::new(Name::root())));
        Self {
            zones,
            validity: (secs(now - 86_400), secs(now + 90 * 86_400)),
        }
    }

    /// The DS record of the root's key: the one trust anchor of this hierarchy.
    pub fn trust_anchors(&self) -> TrustAnchors {
        TrustAnchors::parse(&self.trust_anchors_text()).unwrap_or_default()
    }

    /// The trust anchor as a zone-file line (for `--veraid-trust-anchors`).
    pub fn trust_anchors_text(&self) -> String {
        let root = &self.zones["."];
        let hex: String = root.ds()[4..].iter().map(|b| format!("{b:02X}")).collect();
        format!(". {TTL} IN DS {} {ED25519} 2 {hex}\n", root.key_tag())
    }

    fn zone(&mut self, name: &Name) -> Arc<Zone> {
        let text = name.to_string();
        self.zones
            .entry(text)
            .or_insert_with(|| Arc::new(Zone::new(name.clone())))
            .clone()
    }

    /// An organisation `domain` (`example.com`) holding `key`, with zones signed for
    /// each of its labels and a `_veraid` TXT record for every service. Its certificate
    /// is valid from a day before the hierarchy's start to a year after.
    pub fn organisation(&mut self, domain: &str, key: KeyPair) -> Organisation {
        self.organisation_with_record(domain, key, None)
    }

    /// As [`MockHierarchy::organisation`], with a TXT record limited to `service` if
    /// one is given.
    pub fn organisation_with_record(
        &mut self,
        domain: &str,
        key: KeyPair,
        service: Option<&str>,
    ) -> Organisation {
        let Ok(apex) = Name::parse(domain) else {
            panic!("not a domain name: {domain:?}");
        };
        let mut chain = Vec::new();
        let zones: Vec<Arc<Zone>> = apex.ancestry().iter().map(|n| self.zone(n)).collect();
        for (i, zone) in zones.iter().enumerate() {
            let keys = [zone.dnskey.clone()];
            let sig = zone.rrsig(&zone.name, rtype::DNSKEY, &keys, self.validity);
            chain.push(message(&zone.name, rtype::DNSKEY, &keys, &sig));
            if i > 0 {
                let parent = &zones[i - 1];
                let ds = [zone.ds()];
                let sig = parent.rrsig(&zone.name, rtype::DS, &ds, self.validity);
                chain.push(message(&zone.name, rtype::DS, &ds, &sig));
            }
        }
        let Some(apex_zone) = zones.last() else {
            panic!("no zones");
        };
        let spki = canonical_spki(&key);
        let key_id = {
            use base64::Engine;
            base64::engine::general_purpose::STANDARD.encode(Sha256::digest(&spki))
        };
        let mut record = format!("1 {key_id} 7776000");
        if let Some(service) = service {
            record.push(' ');
            record.push_str(service);
        }
        let owner = match Name::parse(&format!("_veraid.{domain}")) {
            Ok(owner) => owner,
            Err(_) => panic!("bad organisation name {domain:?}"),
        };
        let mut txt = vec![u8::try_from(record.len()).unwrap_or(u8::MAX)];
        txt.extend(record.as_bytes());
        let records = [txt];
        let sig = apex_zone.rrsig(&owner, rtype::TXT, &records, self.validity);
        chain.push(message(&owner, rtype::TXT, &records, &sig));

        let start = i64::from(self.validity.0);
        let name = domain.trim_end_matches('.').to_owned();
        let subject = dn(&name);
        let certificate = certificate(
            &key,
            &subject,
            &subject,
            &spki,
            &spki,
            true,
            Period::new(start, start + 366 * 86_400),
        );
        Organisation {
            inner: Arc::new(OrganisationInner {
                name,
                key,
                subject,
                spki,
                certificate,
                chain,
            }),
        }
    }
}

/// A DNS response to `owner`/`rtype` answering `records` and their RRSIG.
fn message(owner: &Name, rtype: u16, records: &[Vec<u8>], rrsig: &[u8]) -> Vec<u8> {
    let count = u16::try_from(records.len() + 1).unwrap_or(u16::MAX);
    // ID 0; QR, AA; one question; the answers.
    let mut m = vec![0, 0, 0x84, 0, 0, 1];
    m.extend(count.to_be_bytes());
    m.extend([0, 0, 0, 0]);
    owner.write_canonical(&mut m);
    m.extend(rtype.to_be_bytes());
    m.extend(CLASS_IN.to_be_bytes());
    let mut answer = |kind: u16, rdata: &[u8]| {
        owner.write_canonical(&mut m);
        m.extend(kind.to_be_bytes());
        m.extend(CLASS_IN.to_be_bytes());
        m.extend(TTL.to_be_bytes());
        m.extend(u16::try_from(rdata.len()).unwrap_or(u16::MAX).to_be_bytes());
        m.extend(rdata);
    };
    for record in records {
        answer(rtype, record);
    }
    answer(rtype::RRSIG, rrsig);
    m
}

struct OrganisationInner {
    name: String,
    key: KeyPair,
    subject: Vec<u8>,
    spki: Vec<u8>,
    certificate: Vec<u8>,
    chain: Vec<Vec<u8>>,
}

/// A mock VeraId organisation: key, certificate and DNSSEC chain. Cheap to clone.
#[derive(Clone)]
pub struct Organisation {
    inner: Arc<OrganisationInner>,
}

impl std::fmt::Debug for Organisation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Organisation({})", self.inner.name)
    }
}

impl Organisation {
    /// Its domain name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The DNS messages of its DNSSEC chain.
    pub fn chain(&self) -> &[Vec<u8>] {
        &self.inner.chain
    }

    /// A member holding `key`: `user`, or the organisation's bot for none. The member
    /// certificate is valid from an hour before `now` for 30 days.
    pub fn member(&self, user: Option<&str>, key: KeyPair, now: i64) -> SigningMember {
        let spki = canonical_spki(&key);
        let certificate = certificate(
            &self.inner.key,
            &self.inner.subject,
            &dn(user.unwrap_or("@")),
            &spki,
            &self.inner.spki,
            false,
            Period::new(now - 3600, now + 30 * 86_400),
        );
        SigningMember {
            organisation: self.clone(),
            key,
            certificate,
        }
    }
}

/// A member of a mock organisation, who signs bundles.
#[derive(Clone)]
pub struct SigningMember {
    organisation: Organisation,
    key: KeyPair,
    certificate: Vec<u8>,
}

impl std::fmt::Debug for SigningMember {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SigningMember(of {})", self.organisation.name())
    }
}

impl SigningMember {
    /// The member's organisation.
    pub fn organisation(&self) -> &Organisation {
        &self.organisation
    }

    /// A SignatureBundle over `plaintext` for `service`, valid during `period`, laid out
    /// as veraid-js writes it (the chain in query order, the plaintext encapsulated).
    pub fn sign(&self, plaintext: &[u8], service: &str, period: Period) -> Vec<u8> {
        let org = &self.organisation.inner;
        let (issuer, serial) = issuer_and_serial(&self.certificate);
        let digest_algorithm = seq(&[
            tlv(tag::OID, &oid_content("2.16.840.1.101.3.4.2.1")),
            vec![0x05, 0x00],
        ]);
        let data = oid_content("1.2.840.113549.1.7.1");
        let metadata = seq(&[
            tlv(tag::context(0), &oid_content(service)),
            tlv(
                tag::context_constructed(1),
                &[
                    tlv(tag::context(0), generalized_time(period.start).as_bytes()),
                    tlv(tag::context(1), generalized_time(period.end).as_bytes()),
                ]
                .concat(),
            ),
        ]);
        let attribute = |oid: &str, value: Vec<u8>| {
            seq(&[tlv(tag::OID, &oid_content(oid)), tlv(tag::SET, &value)])
        };
        let mut attributes = [
            attribute("1.2.840.113549.1.9.3", tlv(tag::OID, &data)),
            attribute(
                "1.2.840.113549.1.9.4",
                tlv(tag::OCTET_STRING, &Sha256::digest(plaintext)),
            ),
            attribute("1.3.6.1.4.1.58708.1.0", metadata),
        ];
        // DER orders a SET OF by its encodings.
        attributes.sort();
        let attributes = attributes.concat();
        let signature = self.key.sign(&tlv(tag::SET, &attributes));
        let signer_info = seq(&[
            tlv(tag::INTEGER, &[1]),
            seq(&[issuer, serial]),
            digest_algorithm.clone(),
            tlv(tag::context_constructed(0), &attributes),
            pss_sha256(),
            tlv(tag::OCTET_STRING, &signature),
        ]);
        let signed_data = seq(&[
            tlv(tag::INTEGER, &[1]),
            tlv(tag::SET, &digest_algorithm),
            seq(&[
                tlv(tag::OID, &data),
                tlv(
                    tag::context_constructed(0),
                    &tlv(tag::OCTET_STRING, plaintext),
                ),
            ]),
            tlv(tag::context_constructed(0), &self.certificate),
            tlv(tag::SET, &signer_info),
        ]);
        let content_info = [
            tlv(tag::OID, &oid_content("1.2.840.113549.1.7.2")),
            tlv(tag::context_constructed(0), &signed_data),
        ]
        .concat();
        let chain: Vec<u8> = org
            .chain
            .iter()
            .flat_map(|m| tlv(tag::OCTET_STRING, m))
            .collect();
        seq(&[
            tlv(tag::context(0), &[0]),
            tlv(tag::context_constructed(1), &chain),
            tlv(tag::context_constructed(2), content(&org.certificate)),
            tlv(tag::context_constructed(3), &content_info),
        ])
    }
}

/// The SPKI as VeraId hashes it: canonical DER.
fn canonical_spki(key: &KeyPair) -> Vec<u8> {
    key.spki()
}

/// A Name of one RDN, the common name as a BMPString (as veraid-js writes it).
fn dn(common_name: &str) -> Vec<u8> {
    let bmp: Vec<u8> = common_name
        .encode_utf16()
        .flat_map(u16::to_be_bytes)
        .collect();
    let atv = seq(&[
        tlv(tag::OID, &oid_content("2.5.4.3")),
        tlv(tag::BMP_STRING, &bmp),
    ]);
    seq(&[tlv(tag::SET, &atv)])
}

/// A v3 certificate for `subject_spki`, signed by `issuer_key` with RSA-PSS/SHA-256.
fn certificate(
    issuer_key: &KeyPair,
    issuer: &[u8],
    subject: &[u8],
    subject_spki: &[u8],
    issuer_spki: &[u8],
    ca: bool,
    validity: Period,
) -> Vec<u8> {
    let mut serial = rand::random::<[u8; 8]>();
    serial[0] &= 0x7f;
    serial[0] |= 0x01;
    let basic_constraints = if ca {
        seq(&[vec![0x01, 0x01, 0xff], vec![0x02, 0x01, 0x00]])
    } else {
        seq(&[vec![0x02, 0x01, 0x00]])
    };
    let extension = |oid: &str, critical: bool, value: Vec<u8>| {
        let mut parts = vec![tlv(tag::OID, &oid_content(oid))];
        if critical {
            parts.push(vec![0x01, 0x01, 0xff]);
        }
        parts.push(tlv(tag::OCTET_STRING, &value));
        seq(&parts)
    };
    let extensions = seq(&[
        extension("2.5.29.19", true, basic_constraints),
        extension(
            "2.5.29.35",
            false,
            seq(&[tlv(tag::context(0), &Sha256::digest(issuer_spki))]),
        ),
        extension(
            "2.5.29.14",
            false,
            tlv(tag::OCTET_STRING, &Sha256::digest(subject_spki)),
        ),
    ]);
    let tbs = seq(&[
        tlv(tag::context_constructed(0), &[0x02, 0x01, 0x02]),
        tlv(tag::INTEGER, &serial),
        pss_sha256(),
        issuer.to_vec(),
        seq(&[
            tlv(tag::UTC_TIME, utc_time(validity.start).as_bytes()),
            tlv(tag::UTC_TIME, utc_time(validity.end).as_bytes()),
        ]),
        subject.to_vec(),
        subject_spki.to_vec(),
        tlv(tag::context_constructed(3), &extensions),
    ]);
    let signature = issuer_key.sign(&tbs);
    let mut bits = vec![0];
    bits.extend(signature);
    seq(&[tbs, pss_sha256(), tlv(tag::BIT_STRING, &bits)])
}

/// The issuer Name and the serial INTEGER of a certificate this module wrote.
fn issuer_and_serial(certificate: &[u8]) -> (Vec<u8>, Vec<u8>) {
    fn parse(certificate: &[u8]) -> Result<(Vec<u8>, Vec<u8>), crate::asn1::Asn1Error> {
        let mut r = crate::asn1::Reader::new(certificate);
        let mut cert = r.enter(tag::SEQUENCE, "certificate")?;
        let mut tbs = cert.enter(tag::SEQUENCE, "tbs")?;
        tbs.any("version")?;
        let serial = tbs.expect(tag::INTEGER, "serial")?.raw.to_vec();
        tbs.any("signature")?;
        let issuer = tbs.expect(tag::SEQUENCE, "issuer")?.raw.to_vec();
        Ok((issuer, serial))
    }
    parse(certificate).unwrap_or_default()
}

/// The content octets of a DER TLV this module wrote.
fn content(der: &[u8]) -> &[u8] {
    crate::asn1::Reader::new(der)
        .any("tlv")
        .map_or(&[][..], |t| t.content)
}

/// `RSASSA-PSS` with SHA-256, MGF1-SHA-256, salt 32: the references' AlgorithmIdentifier.
fn pss_sha256() -> Vec<u8> {
    let sha256 = seq(&[
        tlv(tag::OID, &oid_content("2.16.840.1.101.3.4.2.1")),
        vec![0x05, 0x00],
    ]);
    let mgf1 = seq(&[
        tlv(tag::OID, &oid_content("1.2.840.113549.1.1.8")),
        sha256.clone(),
    ]);
    seq(&[
        tlv(tag::OID, &oid_content("1.2.840.113549.1.1.10")),
        seq(&[
            tlv(tag::context_constructed(0), &sha256),
            tlv(tag::context_constructed(1), &mgf1),
            tlv(tag::context_constructed(2), &[0x02, 0x01, 0x20]),
        ]),
    ])
}

fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let len = content.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let octets: Vec<u8> = len
            .to_be_bytes()
            .into_iter()
            .skip_while(|&b| b == 0)
            .collect();
        out.push(0x80 | octets.len() as u8);
        out.extend(octets);
    }
    out.extend(content);
    out
}

fn seq(parts: &[Vec<u8>]) -> Vec<u8> {
    tlv(tag::SEQUENCE, &parts.concat())
}

/// `(year, month, day, hour, minute, second)` of Unix seconds.
fn civil(t: i64) -> (i64, i64, i64, i64, i64, i64) {
    let days = t.div_euclid(86_400);
    let secs = t.rem_euclid(86_400);
    // Inverse of days_from_civil (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    debug_assert_eq!(days_from_civil(year, month, day), days);
    (year, month, day, secs / 3600, secs % 3600 / 60, secs % 60)
}

fn utc_time(t: i64) -> String {
    let (y, mo, d, h, mi, s) = civil(t);
    format!("{:02}{mo:02}{d:02}{h:02}{mi:02}{s:02}Z", y % 100)
}

fn generalized_time(t: i64) -> String {
    let (y, mo, d, h, mi, s) = civil(t);
    format!("{y:04}{mo:02}{d:02}{h:02}{mi:02}{s:02}Z")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dns::Ds;

    #[test]
    fn times_in_both_forms() {
        assert_eq!(utc_time(1_796_228_866), "261202162746Z");
        assert_eq!(generalized_time(951_782_400), "20000229000000Z");
    }

    #[test]
    fn a_root_anchor_names_the_root_key() {
        let h = MockHierarchy::new(1_800_000_000);
        let anchors = h.trust_anchors();
        let root = &h.zones["."];
        let key = Dnskey::parse(&root.dnskey).expect("key");
        assert!(anchors.records()[0].matches(&Name::root(), &key));
        assert_eq!(Ds::parse(&root.ds()).expect("ds").key_tag, root.key_tag());
    }
}
