//! DNSSEC trust anchors: DS records of the root zone, from zone-file text or built in.

use crate::dns::Ds;

/// DS records of the root zone that DNSSEC validation starts from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustAnchors {
    records: Vec<Ds>,
}

/// A line of trust-anchor text that is not a root DS record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AnchorError {
    /// The line is not `. [TTL] [IN] DS <key tag> <algorithm> <digest type> <hex digest>`.
    #[error("line {line}: {reason}")]
    Malformed {
        /// One-based line number.
        line: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// The text holds no record (only blank lines and comments).
    #[error("no DS record (only blank lines and comments)")]
    Empty,
}

/// The root KSK of 2017 (key tag 20326), from IANA's root-anchors.xml.
const IANA_20326: &str =
    ". IN DS 20326 8 2 E06D44B80B8F1D39A95C0B0D7C65D08458E880409BBC683457104237C7F8EC8D";
/// The root KSK of 2024 (key tag 38696), from IANA's root-anchors.xml.
const IANA_38696: &str =
    ". IN DS 38696 8 2 683D2D0ACB8C9B712A1948B27F741219298D0A450D612C483AF444A4C0FB2B16";

impl TrustAnchors {
    /// The IANA root zone anchors (key tags 20326 and 38696): what real VeraId
    /// organisations chain to.
    pub fn iana() -> Self {
        let text = format!("{IANA_20326}\n{IANA_38696}\n");
        match Self::parse(&text) {
            Ok(anchors) => anchors,
            // The constants above parse (a unit test says so); no anchors validate nothing.
            Err(_) => Self {
                records: Vec::new(),
            },
        }
    }

    /// Reads DS records in zone-file presentation form, one per line:
    /// `. 86400 IN DS 20326 8 2 E06D…` (TTL and class optional, the digest in hex,
    /// possibly in several groups). `;` starts a comment; blank lines are skipped.
    pub fn parse(text: &str) -> Result<Self, AnchorError> {
        let mut records = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line_number = i + 1;
            let content = line.split(';').next().unwrap_or_default();
            let fields: Vec<&str> = content.split_whitespace().collect();
            if fields.is_empty() {
                continue;
            }
            let malformed = |reason: &str| AnchorError::Malformed {
                line: line_number,
                reason: reason.to_owned(),
            };
            records.push(parse_ds(&fields).map_err(malformed)?);
        }
        if records.is_empty() {
            return Err(AnchorError::Empty);
        }
        Ok(Self { records })
    }

    /// The DS records.
    pub fn records(&self) -> &[Ds] {
        &self.records
    }

    /// The key tags the records name, in order.
    pub fn key_tags(&self) -> Vec<u16> {
        self.records.iter().map(|d| d.key_tag).collect()
    }
}

impl Default for TrustAnchors {
    fn default() -> Self {
        Self::iana()
    }
}

fn parse_ds(fields: &[&str]) -> Result<Ds, &'static str> {
    let (&owner, mut rest) = fields.split_first().ok_or("empty")?;
    if owner != "." {
        return Err("the owner must be the root, \".\"");
    }
    // Optional TTL and class, in either order (RFC 1035 §5.1).
    for _ in 0..2 {
        match rest.first() {
            Some(f) if f.bytes().all(|b| b.is_ascii_digit()) => rest = &rest[1..],
            Some(f) if f.eq_ignore_ascii_case("IN") => rest = &rest[1..],
            _ => break,
        }
    }
    let [kind, tag, algorithm, digest_type, digest @ ..] = rest else {
        return Err("expected DS <key tag> <algorithm> <digest type> <digest>");
    };
    if !kind.eq_ignore_ascii_case("DS") {
        return Err("the record type must be DS");
    }
    let key_tag = tag
        .parse()
        .map_err(|_| "the key tag must be a number up to 65535")?;
    let algorithm = algorithm
        .parse()
        .map_err(|_| "the algorithm must be a number up to 255")?;
    let digest_type = digest_type
        .parse()
        .map_err(|_| "the digest type must be a number up to 255")?;
    let hex: String = digest.concat();
    if hex.is_empty() || !hex.len().is_multiple_of(2) || !hex.bytes().all(|b| b.is_ascii_hexdigit())
    {
        return Err("the digest must be an even number of hexadecimal digits");
    }
    let digest = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).map_err(|_| "bad hex"))
        .collect::<Result<Vec<u8>, _>>()?;
    let expected = match digest_type {
        1 => Some(20),
        2 => Some(32),
        4 => Some(48),
        _ => None,
    };
    if expected.is_some_and(|len| len != digest.len()) {
        return Err("the digest's length does not fit its digest type");
    }
    Ok(Ds {
        key_tag,
        algorithm,
        digest_type,
        digest,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_iana_anchors_are_built_in() {
        assert_eq!(TrustAnchors::iana().key_tags(), [20326, 38696]);
        assert_eq!(TrustAnchors::default(), TrustAnchors::iana());
    }

    #[test]
    fn zone_file_lines_with_comments_ttls_and_split_digests() {
        let text = "; a private root\n\
                    . 86400 IN DS 23299 8 2 AB7B803E5336EE64A120DF690A12204B ; first half\n\
                    \n\
                    . IN 3600 ds 1 13 2 ab7b803e5336ee64a120df690a12204b 92b90042128de2d228c7933ffe1d48da\n";
        let anchors = TrustAnchors::parse(text).expect_err("first digest is short");
        assert_eq!(
            anchors,
            AnchorError::Malformed {
                line: 2,
                reason: "the digest's length does not fit its digest type".into()
            }
        );
        let text = text.replace(" ; first half", " 92B90042128DE2D228C7933FFE1D48DA");
        let anchors = TrustAnchors::parse(&text).expect("anchors");
        assert_eq!(anchors.key_tags(), [23299, 1]);
        assert_eq!(
            anchors.records()[0],
            anchors.records()[1].clone_with_tag(23299, 8)
        );
    }

    #[test]
    fn bad_lines_are_named() {
        for (text, line) in [
            ("example.com. IN DS 1 8 2 00", 1),
            ("; ok\n. IN DNSKEY 256 3 8 AA", 2),
            (". IN DS 70000 8 2 00", 1),
            (". IN DS 1 8 2 0G", 1),
            (". IN DS 1 8", 1),
        ] {
            match TrustAnchors::parse(text) {
                Err(AnchorError::Malformed { line: l, .. }) => assert_eq!(l, line, "{text}"),
                other => panic!("{text}: {other:?}"),
            }
        }
        assert_eq!(
            TrustAnchors::parse("; nothing\n\n"),
            Err(AnchorError::Empty)
        );
    }

    impl Ds {
        fn clone_with_tag(&self, key_tag: u16, algorithm: u8) -> Ds {
            Ds {
                key_tag,
                algorithm,
                ..self.clone()
            }
        }
    }
}
