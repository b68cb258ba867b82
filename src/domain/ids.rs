//! Identifier newtypes. Each one can only be built through validation.

use std::fmt;

use sha2::{Digest, Sha256};

/// Why a string is not a valid identifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// An Awala endpoint id is `"0"` followed by 64 lower-case hex digits.
    #[error("not an Awala endpoint id")]
    EndpointId,
    /// A VeraId user id is `name@domain`.
    #[error("not a VeraId user id: {0}")]
    VeraId(&'static str),
}

/// An Awala private endpoint id: `"0"` + lower-case hex SHA-256 of the endpoint's
/// SubjectPublicKeyInfo DER. Comparisons are exact, as in the original server.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EndpointId(String);

impl EndpointId {
    /// Parses an id exactly; upper-case hex or a missing `0` prefix are refused.
    pub fn parse(s: &str) -> Result<Self, IdError> {
        let b = s.as_bytes();
        let ok = b.len() == 65
            && b[0] == b'0'
            && b[1..]
                .iter()
                .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(c));
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(IdError::EndpointId)
        }
    }

    /// The id of the endpoint whose identity key has this SubjectPublicKeyInfo DER.
    pub fn from_spki_der(spki_der: &[u8]) -> Self {
        Self::from_digest(&Sha256::digest(spki_der))
    }

    /// The id for a SHA-256 digest of some SPKI (as carried by X.509 key identifiers).
    pub fn from_digest(digest: &[u8]) -> Self {
        let mut id = String::with_capacity(1 + digest.len() * 2);
        id.push('0');
        super::hex::push_lower(&mut id, digest);
        Self(id)
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for EndpointId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The longest user name we accept, in bytes. VeraId names are short handles.
const MAX_USER_BYTES: usize = 64;
/// RFC 1035: at most 253 characters in a domain name, 63 in a label.
const MAX_DOMAIN_CHARS: usize = 253;
const MAX_LABEL_CHARS: usize = 63;

/// A VeraId user id, `name@domain`.
///
/// The text is kept exactly as received (the match echoes it back to clients, which look
/// their contacts up by the string they typed); equality and hashing use the canonical
/// form, whose domain is lower-cased because domain names are case-insensitive.
#[derive(Debug, Clone)]
pub struct VeraId {
    text: String,
    canonical: String,
}

impl VeraId {
    /// Validates `name@domain`: a name without `@`, commas, whitespace or control
    /// characters, and a syntactically valid domain name with at least two labels
    /// (internationalised labels allowed).
    pub fn parse(s: &str) -> Result<Self, IdError> {
        let (user, domain) = s
            .split_once('@')
            .ok_or(IdError::VeraId("no '@' separator"))?;
        if user.is_empty() {
            return Err(IdError::VeraId("empty user name"));
        }
        if user.len() > MAX_USER_BYTES {
            return Err(IdError::VeraId("user name too long"));
        }
        if user
            .chars()
            .any(|c| c == '@' || c == ',' || c.is_whitespace() || c.is_control())
        {
            return Err(IdError::VeraId("forbidden character in user name"));
        }
        validate_domain(domain)?;
        Ok(Self {
            text: s.to_owned(),
            canonical: canonical(user, domain),
        })
    }

    /// A VeraId whose syntax was checked elsewhere: the signer of a verified VeraId
    /// bundle, or a prospective contact that passed the signed protocol's own rules
    /// (which allow spaces and commas in user names). The domain is compared without
    /// case, as for [`VeraId::parse`].
    pub fn from_verified(s: &str) -> Self {
        let canonical = match s.split_once('@') {
            Some((user, domain)) => canonical(user, domain),
            None => s.to_lowercase(),
        };
        Self {
            text: s.to_owned(),
            canonical,
        }
    }

    /// The id as the client wrote it.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The canonical form (domain lower-cased): what digests and comparisons use.
    pub fn canonical(&self) -> &str {
        &self.canonical
    }
}

impl PartialEq for VeraId {
    fn eq(&self, other: &Self) -> bool {
        self.canonical == other.canonical
    }
}

impl Eq for VeraId {}

/// `user@domain` with the domain lower-cased, in one allocation when the domain is ASCII
/// (two VeraIds are parsed per request).
fn canonical(user: &str, domain: &str) -> String {
    let mut out = String::with_capacity(user.len() + 1 + domain.len());
    out.push_str(user);
    out.push('@');
    if domain.is_ascii() {
        out.extend(domain.bytes().map(|b| char::from(b.to_ascii_lowercase())));
    } else {
        out.push_str(&domain.to_lowercase());
    }
    out
}

fn validate_domain(domain: &str) -> Result<(), IdError> {
    if domain.is_empty() {
        return Err(IdError::VeraId("empty domain"));
    }
    if domain.chars().count() > MAX_DOMAIN_CHARS {
        return Err(IdError::VeraId("domain too long"));
    }
    if !domain.contains('.') {
        return Err(IdError::VeraId("domain needs at least two labels"));
    }
    for label in domain.split('.') {
        let chars = label.chars().count();
        if chars == 0 || chars > MAX_LABEL_CHARS {
            return Err(IdError::VeraId("domain label length"));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(IdError::VeraId("domain label starts or ends with '-'"));
        }
        // ASCII letters, digits and hyphens (RFC 1123), or non-ASCII letters and digits
        // for internationalised names typed in their Unicode form.
        if !label.chars().all(|c| {
            c.is_ascii_alphanumeric() || c == '-' || (!c.is_ascii() && c.is_alphanumeric())
        }) {
            return Err(IdError::VeraId("forbidden character in domain"));
        }
    }
    if domain
        .rsplit('.')
        .next()
        .is_some_and(|tld| tld.chars().all(|c| c.is_ascii_digit()))
    {
        return Err(IdError::VeraId("numeric top-level domain"));
    }
    Ok(())
}

/// The idempotency key of an incoming event: CloudEvent ids are unique per source only.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EventKey {
    /// `ce-source`: the sender's endpoint id.
    pub source: String,
    /// `ce-id`: the parcel id.
    pub id: String,
}

impl EventKey {
    /// The key as SQLite stores it: the first 16 bytes of SHA-256 over the source, a NUL
    /// and the id. Neither may hold a NUL (both are printable ASCII), so two keys share a
    /// digest only by a collision of 128 bits: not by accident (at 10^12 events, about
    /// 10^-15) and not by design (finding a second key for someone's digest takes 2^128
    /// attempts). A fixed 16 bytes instead of up to 130 makes the table a third the size.
    pub fn digest(&self) -> [u8; 16] {
        let mut hash = Sha256::new();
        hash.update(self.source.as_bytes());
        hash.update([0]);
        hash.update(self.id.as_bytes());
        let mut digest = [0; 16];
        digest.copy_from_slice(&hash.finalize()[..16]);
        digest
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn event_digests_separate_source_from_id() {
        let key = |source: &str, id: &str| EventKey {
            source: source.into(),
            id: id.into(),
        };
        assert_eq!(key("0ab", "1").digest(), key("0ab", "1").digest());
        assert_ne!(key("0ab", "1").digest(), key("0a", "b1").digest());
        assert_ne!(key("0ab", "1").digest(), key("0ab", "2").digest());
        // Pinned: a stored key must mean the same event to every later build.
        assert_eq!(
            hex::encode(key("0ab", "1").digest()),
            "98cab4bc42dab03ad42418e288613516"
        );
    }

    #[test]
    fn endpoint_id_is_exact() {
        let good = format!("0{}", "ab".repeat(32));
        assert!(EndpointId::parse(&good).is_ok());
        assert!(EndpointId::parse(&good.to_uppercase()).is_err());
        assert!(EndpointId::parse(&good[1..]).is_err());
        assert!(EndpointId::parse(&format!("1{}", "ab".repeat(32))).is_err());
        assert!(EndpointId::parse(&format!("{good}0")).is_err());
        assert!(EndpointId::parse("").is_err());
    }

    #[test]
    fn endpoint_id_from_spki_is_zero_prefixed_sha256() {
        let id = EndpointId::from_spki_der(b"abc");
        assert_eq!(
            id.as_str(),
            "0ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn veraid_accepts_user_ids() {
        for s in [
            "alice@applepie.rocks",
            "bob@tickety.boo",
            "a.b-c_d@sub.example.com",
            "josé@café.example",
            "x@xn--caf-dma.example",
        ] {
            assert!(VeraId::parse(s).is_ok(), "{s}");
        }
    }

    #[test]
    fn veraid_refuses_non_user_ids() {
        for s in [
            "applepie.rocks",
            "@applepie.rocks",
            "alice@",
            "alice@rocks",
            "al ice@applepie.rocks",
            "al,ice@applepie.rocks",
            "alice@bob@applepie.rocks",
            "alice@apple pie.rocks",
            "alice@-applepie.rocks",
            "alice@applepie-.rocks",
            "alice@applepie..rocks",
            "alice@applepie.rocks.",
            "alice@1.2.3.4",
            "al\tice@applepie.rocks",
            "alice\u{0}@applepie.rocks",
            "alice@apple_pie.rocks",
        ] {
            assert!(VeraId::parse(s).is_err(), "{s:?}");
        }
        assert!(VeraId::parse(&format!("{}@a.io", "u".repeat(65))).is_err());
        assert!(VeraId::parse(&format!("u@{}.io", "d".repeat(64))).is_err());
    }

    #[test]
    fn veraid_domain_is_case_insensitive_but_text_is_kept() {
        let a = VeraId::parse("Alice@ApplePie.Rocks").expect("valid");
        let b = VeraId::parse("Alice@applepie.rocks").expect("valid");
        let c = VeraId::parse("alice@applepie.rocks").expect("valid");
        assert_eq!(a, b);
        assert_ne!(a, c, "user names are case-sensitive");
        assert_eq!(a.as_str(), "Alice@ApplePie.Rocks");
        assert_eq!(a.canonical(), "Alice@applepie.rocks");
    }

    proptest! {
        #[test]
        fn veraid_parse_never_panics(s in ".{0,300}") {
            let _ = VeraId::parse(&s);
        }

        #[test]
        fn valid_veraids_never_contain_csv_breakers(s in "[a-z,@ .\u{e9}-]{0,40}") {
            if let Ok(v) = VeraId::parse(&s) {
                prop_assert!(!v.as_str().contains(','));
                prop_assert_eq!(v.as_str().matches('@').count(), 1);
            }
        }

        #[test]
        fn endpoint_id_round_trips(digest in proptest::collection::vec(any::<u8>(), 32)) {
            let id = EndpointId::from_digest(&digest);
            prop_assert_eq!(EndpointId::parse(id.as_str()), Ok(id));
        }
    }
}
