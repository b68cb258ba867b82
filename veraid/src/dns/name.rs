//! Domain names: read from DNS wire format (with compression), compared and written in
//! the canonical form of RFC 4034 §6.2 (lower case, uncompressed).

use std::fmt;

use super::WireError;

/// Longest name in wire format, root label included (RFC 1035 §2.3.4).
const MAX_NAME_OCTETS: usize = 255;
/// Longest label (RFC 1035 §2.3.4).
const MAX_LABEL_OCTETS: usize = 63;
/// Compression pointers followed for one name. A pointer must point backwards, so a
/// loop is impossible anyway; this bounds the work on hostile input regardless.
const MAX_POINTERS: usize = 64;

/// A domain name, as labels from the leftmost down to (not including) the root. Labels
/// keep their octets as received; comparisons and the canonical form lower-case ASCII
/// letters, as RFC 4034 §6.2 says (dnssec-js compares case-sensitively; on real data,
/// which is lower case, the two agree).
#[derive(Clone, Default, Eq)]
pub struct Name {
    labels: Vec<Vec<u8>>,
}

impl Name {
    /// The root name, `.`.
    pub fn root() -> Self {
        Self::default()
    }

    /// Parses a name in presentation form (`_veraid.example.com.` or without the final
    /// dot). Escapes are not supported: VeraId names need none.
    pub fn parse(text: &str) -> Result<Self, WireError> {
        let text = text.strip_suffix('.').unwrap_or(text);
        if text.is_empty() {
            return Ok(Self::root());
        }
        let labels: Vec<Vec<u8>> = text.split('.').map(|l| l.as_bytes().to_vec()).collect();
        let name = Self { labels };
        name.check()?;
        Ok(name)
    }

    /// Reads a name at `offset` of `message`, following compression pointers; returns it
    /// and the offset just past its encoding where it started.
    pub(super) fn read(message: &[u8], offset: usize) -> Result<(Self, usize), WireError> {
        let mut labels = Vec::new();
        let mut at = offset;
        let mut end = None;
        let mut pointers = 0;
        loop {
            let len = *message.get(at).ok_or(WireError::Truncated)?;
            match len & 0xc0 {
                0x00 => {
                    if len == 0 {
                        let name = Self { labels };
                        name.check()?;
                        return Ok((name, end.unwrap_or(at + 1)));
                    }
                    let start = at + 1;
                    let label = message
                        .get(start..start + usize::from(len))
                        .ok_or(WireError::Truncated)?;
                    labels.push(label.to_vec());
                    at = start + usize::from(len);
                }
                0xc0 => {
                    let low = *message.get(at + 1).ok_or(WireError::Truncated)?;
                    let target = usize::from(len & 0x3f) << 8 | usize::from(low);
                    pointers += 1;
                    // Only backwards, and not too many: no loops, bounded work.
                    if target >= at || pointers > MAX_POINTERS {
                        return Err(WireError::BadCompression);
                    }
                    end.get_or_insert(at + 2);
                    at = target;
                }
                _ => return Err(WireError::BadLabel),
            }
        }
    }

    fn check(&self) -> Result<(), WireError> {
        if self
            .labels
            .iter()
            .any(|l| l.is_empty() || l.len() > MAX_LABEL_OCTETS)
        {
            return Err(WireError::BadLabel);
        }
        if self.wire_len() > MAX_NAME_OCTETS {
            return Err(WireError::NameTooLong);
        }
        Ok(())
    }

    /// The number of labels, not counting the root.
    pub fn label_count(&self) -> usize {
        self.labels.len()
    }

    /// Whether the leftmost label is `*` (a wildcard owner).
    pub fn is_wildcard(&self) -> bool {
        self.labels.first().is_some_and(|l| l == b"*")
    }

    /// The name with its leftmost label removed; the root's parent is the root.
    pub fn parent(&self) -> Self {
        Self {
            labels: self.labels.iter().skip(1).cloned().collect(),
        }
    }

    /// Whether `self` is `other` or below it.
    pub fn is_at_or_below(&self, other: &Self) -> bool {
        self.labels.len() >= other.labels.len()
            && self.labels[self.labels.len() - other.labels.len()..]
                .iter()
                .zip(&other.labels)
                .all(|(a, b)| a.eq_ignore_ascii_case(b))
    }

    /// The name `self` and each of its ancestors, root first.
    pub fn ancestry(&self) -> Vec<Self> {
        (0..=self.labels.len())
            .rev()
            .map(|skip| Self {
                labels: self.labels[skip..].to_vec(),
            })
            .collect()
    }

    /// Its length in wire format, root label included.
    pub fn wire_len(&self) -> usize {
        self.labels.iter().map(|l| l.len() + 1).sum::<usize>() + 1
    }

    /// Appends the canonical wire form: uncompressed, ASCII letters in lower case.
    pub fn write_canonical(&self, out: &mut Vec<u8>) {
        for label in &self.labels {
            // Labels are at most 63 octets (checked on every way in).
            out.push(label.len() as u8);
            out.extend(label.iter().map(u8::to_ascii_lowercase));
        }
        out.push(0);
    }
}

impl PartialEq for Name {
    fn eq(&self, other: &Self) -> bool {
        self.labels.len() == other.labels.len()
            && self
                .labels
                .iter()
                .zip(&other.labels)
                .all(|(a, b)| a.eq_ignore_ascii_case(b))
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.labels.is_empty() {
            return f.write_str(".");
        }
        for label in &self.labels {
            for &b in label {
                if b.is_ascii_graphic() && b != b'.' && b != b'\\' {
                    write!(f, "{}", b as char)?;
                } else {
                    write!(f, "\\{b:03}")?;
                }
            }
            f.write_str(".")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Name({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presentation_form_round_trips_and_compares_without_case() {
        let name = Name::parse("_veraid.Example.COM.").expect("valid");
        assert_eq!(name.to_string(), "_veraid.Example.COM.");
        assert_eq!(name, Name::parse("_veraid.example.com").expect("valid"));
        assert_eq!(name.label_count(), 3);
        assert_eq!(Name::parse(".").expect("root"), Name::root());
        assert_eq!(Name::root().to_string(), ".");
        let mut wire = Vec::new();
        name.write_canonical(&mut wire);
        assert_eq!(wire, b"\x07_veraid\x07example\x03com\x00");
        assert!(Name::parse("a..b").is_err());
        assert!(Name::parse(&"a".repeat(64)).is_err());
    }

    #[test]
    fn ancestry_and_parents() {
        let name = Name::parse("_veraid.example.com.").expect("valid");
        let names: Vec<String> = name.ancestry().iter().map(Name::to_string).collect();
        assert_eq!(names, [".", "com.", "example.com.", "_veraid.example.com."]);
        assert_eq!(name.parent().to_string(), "example.com.");
        assert!(name.is_at_or_below(&Name::parse("EXAMPLE.com").expect("valid")));
        assert!(!Name::parse("com").expect("valid").is_at_or_below(&name));
        assert!(name.is_at_or_below(&Name::root()));
    }

    #[test]
    fn compression_pointers_point_backwards_only() {
        // "com" at 0, then "example" + pointer to 0 at 5.
        let message = b"\x03com\x00\x07example\xc0\x00";
        let (name, end) = Name::read(message, 5).expect("valid");
        assert_eq!(name.to_string(), "example.com.");
        assert_eq!(end, message.len());
        // A pointer to itself, or forwards: refused, never a loop.
        assert_eq!(
            Name::read(b"\xc0\x00", 0).map(|_| ()),
            Err(WireError::BadCompression)
        );
        assert_eq!(
            Name::read(b"\xc0\x02\x00", 0).map(|_| ()),
            Err(WireError::BadCompression)
        );
        assert_eq!(
            Name::read(b"\x05ab", 0).map(|_| ()),
            Err(WireError::Truncated)
        );
        assert_eq!(Name::read(b"\x80", 0).map(|_| ()), Err(WireError::BadLabel));
    }

    #[test]
    fn names_longer_than_255_octets_are_refused() {
        let mut message = Vec::new();
        for _ in 0..5 {
            message.push(60);
            message.extend([b'a'; 60]);
        }
        message.push(0);
        assert_eq!(
            Name::read(&message, 0).map(|_| ()),
            Err(WireError::NameTooLong)
        );
    }
}
