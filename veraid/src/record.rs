//! The VeraId TXT record at `_veraid.<organisation>`: which organisation key signs for
//! which services, and for how long a signature may outlive the DNSSEC signatures.

/// The longest a TTL override may be; larger values are capped to it (veraid.md §3.2).
pub const MAX_TTL_OVERRIDE: u32 = 90 * 86_400;

/// One VeraId record: `<key-algorithm> <key-id> <ttl-override> [<service-oid>]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VeraidRecord {
    /// 1 (RSA-2048), 2 (RSA-3072) or 3 (RSA-4096).
    pub key_algorithm: u8,
    /// Base64, with padding, of the digest of the organisation key's SubjectPublicKeyInfo.
    pub key_id: String,
    /// Seconds, capped at [`MAX_TTL_OVERRIDE`].
    pub ttl_override: u32,
    /// The service the record is limited to, or none for every service.
    pub service: Option<String>,
}

/// Why a TXT record of `_veraid.<organisation>` is not a VeraId record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// A VeraId record is exactly one character-string.
    #[error("a VeraId TXT record must be one string, this one has {0}")]
    NotOneString(usize),
    /// The string is not UTF-8 text.
    #[error("a VeraId TXT record is not text")]
    NotText,
    /// Fewer than three fields.
    #[error("a VeraId TXT record needs at least three fields: {0:?}")]
    TooFewFields(String),
    /// The key algorithm is not 1, 2 or 3.
    #[error("unknown VeraId key algorithm {0:?}")]
    UnknownAlgorithm(String),
    /// The TTL override is not decimal digits.
    #[error("malformed TTL override {0:?}")]
    MalformedTtl(String),
}

impl VeraidRecord {
    /// Reads a record from the character-strings of one TXT rdata.
    pub fn parse(strings: &[Vec<u8>]) -> Result<Self, RecordError> {
        let [string] = strings else {
            return Err(RecordError::NotOneString(strings.len()));
        };
        let text = std::str::from_utf8(string).map_err(|_| RecordError::NotText)?;
        let fields: Vec<&str> = text.split_whitespace().collect();
        let [algorithm, key_id, ttl, ref rest @ ..] = fields[..] else {
            return Err(RecordError::TooFewFields(text.to_owned()));
        };
        let key_algorithm = match algorithm {
            "1" => 1,
            "2" => 2,
            "3" => 3,
            other => return Err(RecordError::UnknownAlgorithm(other.to_owned())),
        };
        if ttl.is_empty() || !ttl.bytes().all(|b| b.is_ascii_digit()) {
            return Err(RecordError::MalformedTtl(ttl.to_owned()));
        }
        // All digits: only an overflow fails to parse, and that is above the cap anyway.
        let ttl_override = ttl
            .parse::<u32>()
            .map_or(MAX_TTL_OVERRIDE, |t| t.min(MAX_TTL_OVERRIDE));
        Ok(Self {
            key_algorithm,
            key_id: key_id.to_owned(),
            ttl_override,
            service: rest.first().map(|s| (*s).to_owned()),
        })
    }
}

/// The record that applies to a key and a service among all of an RRset's: one naming
/// the service wins over one for every service. Every record must parse, as in the
/// reference: a foreign TXT record at `_veraid.<organisation>` refuses them all.
pub(crate) fn select(
    rdatas: &[Vec<Vec<u8>>],
    key_algorithm: u8,
    key_id: &str,
    service: &str,
) -> Result<Option<VeraidRecord>, RecordError> {
    let records = rdatas
        .iter()
        .map(|strings| VeraidRecord::parse(strings))
        .collect::<Result<Vec<_>, _>>()?;
    let mut matching = records
        .into_iter()
        .filter(|r| r.key_algorithm == key_algorithm && r.key_id == key_id)
        .filter(|r| r.service.as_deref().is_none_or(|s| s == service));
    let first = matching.next();
    Ok(match first {
        Some(r) if r.service.is_some() => Some(r),
        other => matching.find(|r| r.service.is_some()).or(other),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(text: &str) -> Vec<Vec<u8>> {
        vec![text.as_bytes().to_vec()]
    }

    #[test]
    fn fields_ttl_cap_and_service() {
        let r = VeraidRecord::parse(&strings("  1 abc=  99999999  1.2.3 extra ")).expect("record");
        assert_eq!(r.key_algorithm, 1);
        assert_eq!(r.key_id, "abc=");
        assert_eq!(r.ttl_override, MAX_TTL_OVERRIDE);
        assert_eq!(r.service.as_deref(), Some("1.2.3"));
        let r = VeraidRecord::parse(&strings("3 k 0")).expect("record");
        assert_eq!((r.ttl_override, r.service), (0, None));
        assert_eq!(
            VeraidRecord::parse(&strings("v=spf1 -all")),
            Err(RecordError::TooFewFields("v=spf1 -all".into()))
        );
        assert!(matches!(
            VeraidRecord::parse(&strings("4 k 1")),
            Err(RecordError::UnknownAlgorithm(_))
        ));
        assert!(matches!(
            VeraidRecord::parse(&strings("1 k -1")),
            Err(RecordError::MalformedTtl(_))
        ));
        assert_eq!(
            VeraidRecord::parse(&[b"1 k".to_vec(), b" 1".to_vec()]),
            Err(RecordError::NotOneString(2))
        );
    }

    #[test]
    fn a_record_for_the_service_wins_over_a_generic_one() {
        let rdatas = [
            strings("1 k 10"),
            strings("1 k 20 9.9"),
            strings("1 k 30 1.2"),
        ];
        let chosen = select(&rdatas, 1, "k", "1.2")
            .expect("parse")
            .expect("match");
        assert_eq!(chosen.ttl_override, 30);
        let chosen = select(&rdatas, 1, "k", "7.7")
            .expect("parse")
            .expect("match");
        assert_eq!(chosen.ttl_override, 10);
        assert_eq!(select(&rdatas, 2, "k", "1.2"), Ok(None));
        assert_eq!(select(&rdatas, 1, "other", "1.2"), Ok(None));
    }
}
