//! DNSSEC validation of a VeraId chain: from the trust anchors down to the RRset asked
//! for, over the responses the bundle carries (no network), for a window of time.
//!
//! The rules are those of the reference (dnssec-js, as veraid-js drives it): every zone
//! from the root down to the apex of the answer must be in the chain, each zone's DNSKEY
//! RRset must be signed by a key its parent's DS set (or a trust anchor) names, and every
//! RRSIG relied on must overlap the window. Owner and signer names compare without ASCII
//! case (RFC 4034 §6.2), which agrees with the reference on real, lower-case data.

pub mod crypto;

use crate::dns::{
    CLASS_IN, Dnskey, Ds, Message, Name, RCODE_NOERROR, RCODE_NXDOMAIN, Record, Rrsig, rtype,
};

/// A closed interval of time, in seconds since the Unix epoch: when the data must have
/// been validly signed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// First second of the window.
    pub start: u64,
    /// Last second of the window.
    pub end: u64,
}

impl Window {
    /// Whether an RRSIG valid from `inception` to `expiration` overlaps the window (both
    /// read as plain unsigned seconds, as the reference does: no serial arithmetic).
    pub fn overlaps(&self, inception: u32, expiration: u32) -> bool {
        u64::from(inception) <= self.end && u64::from(expiration) >= self.start
    }
}

/// Why a chain does not validate, in the reference's three kinds: the chain lacks data
/// it needs (indeterminate), a zone on the way is not signed (insecure), or a signature
/// or digest does not hold (bogus).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DnssecError {
    /// No response in the chain answers the question of the answer.
    #[error("the chain has no response for {name} type {rtype}")]
    MissingResponse {
        /// The name asked about.
        name: String,
        /// The type asked for.
        rtype: u16,
    },
    /// More than one response in the chain answers the question of the answer.
    #[error("the chain has several responses for {name} type {rtype}")]
    SeveralResponses {
        /// The name asked about.
        name: String,
        /// The type asked for.
        rtype: u16,
    },
    /// An RRset the chain needs has no RRSIG at all.
    #[error("{name} type {rtype} is not signed (indeterminate)")]
    Unsigned {
        /// The RRset's owner.
        name: String,
        /// Its type.
        rtype: u16,
    },
    /// A zone's DS or DNSKEY response is missing from the chain or not NOERROR (a
    /// missing one counts as NXDOMAIN, rcode 3).
    #[error("zone {zone} is not secured: its {what} response has rcode {rcode} (insecure)")]
    NotSecured {
        /// The zone.
        zone: String,
        /// Which response.
        what: &'static str,
        /// Its response code.
        rcode: u8,
    },
    /// No DNSKEY named by the trust anchors or the parent's DS set signs the zone's
    /// DNSKEY RRset within the window.
    #[error("zone {zone}: no DNSKEY that its DS records name signs its keys (bogus)")]
    NoTrustedKey {
        /// The zone.
        zone: String,
    },
    /// The DS RRset of a zone is not validly signed by its parent.
    #[error("zone {zone}: its DS records are not validly signed by {parent} (bogus)")]
    BadDelegation {
        /// The zone.
        zone: String,
        /// Its parent.
        parent: String,
    },
    /// The answer RRset is not validly signed by its zone.
    #[error("{name} type {rtype} does not have a valid signature (bogus)")]
    BadAnswer {
        /// The RRset's owner.
        name: String,
        /// Its type.
        rtype: u16,
    },
    /// The records of one response disagree on their TTL, which the reference refuses.
    #[error("the response for {name} type {rtype} has records of different TTLs")]
    InconsistentTtl {
        /// The name asked about.
        name: String,
        /// The type asked for.
        rtype: u16,
    },
    /// A record's data does not parse.
    #[error("a {0} record in the chain is malformed")]
    Malformed(&'static str),
    /// Validating would take more signature checks than any real chain needs
    /// ([`MAX_SIGNATURE_CHECKS`]): the chain is refused rather than followed.
    #[error("the chain needs more than {MAX_SIGNATURE_CHECKS} signature checks")]
    TooMuchWork,
    /// The answer's zone is deeper than [`MAX_ZONE_DEPTH`] labels.
    #[error("the chain is deeper than {MAX_ZONE_DEPTH} zones")]
    TooDeep,
}

/// The most signature verifications one validation may make. A real chain makes one per
/// zone for its keys, one per delegation and one for the answer (seven for
/// `_veraid.example.com`); a hostile one could otherwise pair every RRSIG with every key
/// of the same tag.
pub const MAX_SIGNATURE_CHECKS: usize = 64;

/// The most zones below the root that a chain may pass through.
pub const MAX_ZONE_DEPTH: usize = 16;

/// The responses of a chain, answered as an offline resolver would: the first message
/// whose question is exactly the one asked.
struct Chain<'a> {
    messages: &'a [Message],
    /// Signature verifications made so far, against [`MAX_SIGNATURE_CHECKS`].
    checks: std::cell::Cell<usize>,
    /// The validity (inception, expiration) of each RRSIG that verified.
    relied_on: std::cell::RefCell<Vec<(u32, u32)>>,
}

impl<'a> Chain<'a> {
    /// The NOERROR response to `name`/`rtype`. A question no message answers gets, as
    /// from the reference's offline resolver, an empty NXDOMAIN: the zone is insecure.
    fn secure_response(
        &self,
        name: &Name,
        rtype: u16,
        what: &'static str,
    ) -> Result<&'a Message, DnssecError> {
        let response = self
            .messages
            .iter()
            .find(|m| m.answers_question(name, rtype));
        match response {
            Some(response) if response.rcode == RCODE_NOERROR => Ok(response),
            other => Err(DnssecError::NotSecured {
                zone: name.to_string(),
                what,
                rcode: other.map_or(RCODE_NXDOMAIN, |m| m.rcode),
            }),
        }
    }

    /// Spends one signature check of the budget.
    fn spend(&self) -> Result<(), DnssecError> {
        let spent = self.checks.get() + 1;
        self.checks.set(spent);
        if spent > MAX_SIGNATURE_CHECKS {
            return Err(DnssecError::TooMuchWork);
        }
        Ok(())
    }
}

/// An RRset of a response and the RRSIGs over it.
struct SignedRrset<'a> {
    owner: Name,
    rtype: u16,
    records: Vec<&'a Record>,
    signatures: Vec<Rrsig>,
}

impl<'a> SignedRrset<'a> {
    /// The RRset of `owner` and `rtype` in `message`'s answers, with the RRSIGs that
    /// cover it. `all_answers_share_ttl` says which records must agree on their TTL:
    /// every answer (true) or every answer but the RRSIGs.
    fn from(
        message: &'a Message,
        owner: &Name,
        rtype: u16,
        all_answers_share_ttl: bool,
    ) -> Result<Self, DnssecError> {
        let mut ttls = message
            .answers
            .iter()
            .filter(|r| all_answers_share_ttl || r.rtype != rtype::RRSIG)
            .map(|r| r.ttl);
        if let Some(first) = ttls.next()
            && ttls.any(|ttl| ttl != first)
        {
            return Err(DnssecError::InconsistentTtl {
                name: owner.to_string(),
                rtype,
            });
        }
        let owned = |r: &&Record| r.name == *owner && r.class == CLASS_IN;
        let records: Vec<&Record> = message
            .answers
            .iter()
            .filter(owned)
            .filter(|r| r.rtype == rtype)
            .collect();
        let mut signatures = Vec::new();
        for record in message
            .answers
            .iter()
            .filter(owned)
            .filter(|r| r.rtype == rtype::RRSIG)
        {
            let sig = Rrsig::parse(&record.rdata).map_err(|_| DnssecError::Malformed("RRSIG"))?;
            // An RRSIG by a zone that is neither the owner nor above it is no signature
            // of this RRset.
            if sig.type_covered == rtype && owner.is_at_or_below(&sig.signer) {
                signatures.push(sig);
            }
        }
        if signatures.is_empty() {
            return Err(DnssecError::Unsigned {
                name: owner.to_string(),
                rtype,
            });
        }
        Ok(Self {
            owner: owner.clone(),
            rtype,
            records,
            signatures,
        })
    }

    /// Whether one of the RRSIGs, by `zone`, verifies the RRset with one of `keys`
    /// within `window`.
    fn verified_by(
        &self,
        chain: &Chain<'_>,
        zone: &Name,
        keys: &[Dnskey],
        window: Window,
    ) -> Result<bool, DnssecError> {
        let rdatas: Vec<&[u8]> = self.records.iter().map(|r| r.rdata.as_slice()).collect();
        let owner_labels = self.owner.label_count() - usize::from(self.owner.is_wildcard());
        for sig in &self.signatures {
            if sig.signer != *zone
                || sig.type_covered != self.rtype
                || usize::from(sig.labels) > owner_labels
                || !window.overlaps(sig.inception, sig.expiration)
            {
                continue;
            }
            let mut data = None;
            for key in keys
                .iter()
                .filter(|key| key.algorithm == sig.algorithm && key.key_tag() == sig.key_tag)
            {
                chain.spend()?;
                let data =
                    data.get_or_insert_with(|| sig.signed_data(&self.owner, CLASS_IN, &rdatas));
                if crypto::verifies(sig.algorithm, &key.public_key, data, &sig.signature) {
                    chain
                        .relied_on
                        .borrow_mut()
                        .push((sig.inception, sig.expiration));
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }
}

/// The keys of `zone`, given the DS records (or trust anchors) that name its key-signing
/// keys: the whole DNSKEY RRset, once a key that a DS names has signed it.
fn zone_keys(
    chain: &Chain<'_>,
    zone: &Name,
    ds: &[Ds],
    window: Window,
) -> Result<Vec<Dnskey>, DnssecError> {
    let response = chain.secure_response(zone, rtype::DNSKEY, "DNSKEY")?;
    let rrset = SignedRrset::from(response, zone, rtype::DNSKEY, false)?;
    let keys = rrset
        .records
        .iter()
        .map(|r| Dnskey::parse(&r.rdata).map_err(|_| DnssecError::Malformed("DNSKEY")))
        .collect::<Result<Vec<_>, _>>()?;
    let trusted: Vec<Dnskey> = keys
        .iter()
        .filter(|key| ds.iter().any(|d| d.matches(zone, key)))
        .cloned()
        .collect();
    if !rrset.verified_by(chain, zone, &trusted, window)? {
        return Err(DnssecError::NoTrustedKey {
            zone: zone.to_string(),
        });
    }
    Ok(keys)
}

/// An RRset that validated, and the validity of the signatures it was validated with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Validated {
    /// The data of the RRset's records.
    pub rdatas: Vec<Vec<u8>>,
    /// The (inception, expiration) of every RRSIG that verified during the validation
    /// (those it relied on, and any verified on a path it then left). The same chain
    /// validates for another window if each of these overlaps it, since the
    /// signatures themselves do not depend on the time: that is what lets a verifier
    /// remember a chain it validated. (It may validate in other windows too, through
    /// other signatures; a verifier then validates it afresh.)
    pub signatures: Vec<(u32, u32)>,
}

/// Validates the RRset of `owner` and `rtype` in `messages` from the trust `anchors`
/// (DS records of the root) within `window`, and returns its records' data.
///
/// Exactly one message must answer the question `owner`/`rtype`. The apex of the answer
/// is the deepest zone among its RRSIGs' signers; the root and every zone below it down
/// to the apex must be delegated with signed DS records and sign their own keys.
pub fn validate(
    messages: &[Message],
    owner: &Name,
    rtype: u16,
    anchors: &[Ds],
    window: Window,
) -> Result<Vec<Vec<u8>>, DnssecError> {
    validate_relying(messages, owner, rtype, anchors, window).map(|v| v.rdatas)
}

/// As [`validate`], and says which signatures verified on the way.
pub fn validate_relying(
    messages: &[Message],
    owner: &Name,
    rtype: u16,
    anchors: &[Ds],
    window: Window,
) -> Result<Validated, DnssecError> {
    let chain = Chain {
        messages,
        checks: std::cell::Cell::new(0),
        relied_on: std::cell::RefCell::new(Vec::new()),
    };
    let answers: Vec<&Message> = messages
        .iter()
        .filter(|m| m.answers_question(owner, rtype))
        .collect();
    let answer = match answers[..] {
        [answer] => answer,
        [] => {
            return Err(DnssecError::MissingResponse {
                name: owner.to_string(),
                rtype,
            });
        }
        _ => {
            return Err(DnssecError::SeveralResponses {
                name: owner.to_string(),
                rtype,
            });
        }
    };
    let rrset = SignedRrset::from(answer, owner, rtype, true)?;
    let apex = rrset
        .signatures
        .iter()
        .map(|s| &s.signer)
        .max_by_key(|s| s.label_count())
        .cloned()
        .unwrap_or_else(|| owner.clone());

    if apex.label_count() > MAX_ZONE_DEPTH {
        return Err(DnssecError::TooDeep);
    }
    let mut zone = Name::root();
    let mut keys = zone_keys(&chain, &zone, anchors, window)?;
    for child in apex.ancestry().into_iter().skip(1) {
        let response = chain.secure_response(&child, rtype::DS, "DS")?;
        let delegation = SignedRrset::from(response, &child, rtype::DS, false)?;
        if !delegation.verified_by(&chain, &zone, &keys, window)? {
            return Err(DnssecError::BadDelegation {
                zone: child.to_string(),
                parent: zone.to_string(),
            });
        }
        let ds = delegation
            .records
            .iter()
            .map(|r| Ds::parse(&r.rdata).map_err(|_| DnssecError::Malformed("DS")))
            .collect::<Result<Vec<_>, _>>()?;
        keys = zone_keys(&chain, &child, &ds, window)?;
        zone = child;
    }
    if !rrset.verified_by(&chain, &zone, &keys, window)? {
        return Err(DnssecError::BadAnswer {
            name: owner.to_string(),
            rtype,
        });
    }
    Ok(Validated {
        rdatas: rrset.records.iter().map(|r| r.rdata.clone()).collect(),
        signatures: chain.relied_on.into_inner(),
    })
}
