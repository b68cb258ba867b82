//! A small reader of DER, as lenient as the producers of real bundles need and no more.
//!
//! The structures of a bundle are read field by field with this reader rather than with
//! a derive-based DER library, because three of the reference's habits break strict
//! decoders and each must be kept (veraid.md §10.1): the DNSSEC chain's SET OF is not
//! sorted, signed attributes must be verified over their octets as received (not
//! re-encoded), and certificate serial numbers are not always minimal. Definite lengths
//! in long form with leading zero octets are accepted too (BER, which the reference
//! accepts); indefinite lengths and tags of more than one octet are refused: no
//! producer writes them.

/// Why some octets are not the ASN.1 expected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("malformed {0}")]
pub struct Asn1Error(pub &'static str);

/// One tag-length-value: its tag octet, its content octets and its whole encoding.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Tlv<'a> {
    pub(crate) tag: u8,
    pub(crate) content: &'a [u8],
    pub(crate) raw: &'a [u8],
}

pub(crate) mod tag {
    pub(crate) const BOOLEAN: u8 = 0x01;
    pub(crate) const INTEGER: u8 = 0x02;
    pub(crate) const BIT_STRING: u8 = 0x03;
    pub(crate) const OCTET_STRING: u8 = 0x04;
    pub(crate) const OCTET_STRING_CONSTRUCTED: u8 = 0x24;
    pub(crate) const OID: u8 = 0x06;
    pub(crate) const UTF8_STRING: u8 = 0x0c;
    pub(crate) const PRINTABLE_STRING: u8 = 0x13;
    pub(crate) const TELETEX_STRING: u8 = 0x14;
    pub(crate) const IA5_STRING: u8 = 0x16;
    pub(crate) const UTC_TIME: u8 = 0x17;
    pub(crate) const UNIVERSAL_STRING: u8 = 0x1c;
    pub(crate) const BMP_STRING: u8 = 0x1e;
    pub(crate) const SEQUENCE: u8 = 0x30;
    pub(crate) const SET: u8 = 0x31;

    /// `[n]` in primitive form (IMPLICIT on a primitive type).
    pub(crate) const fn context(n: u8) -> u8 {
        0x80 | n
    }

    /// `[n]` in constructed form (EXPLICIT, or IMPLICIT on a constructed type).
    pub(crate) const fn context_constructed(n: u8) -> u8 {
        0xa0 | n
    }
}

/// Reads TLVs one after another from some octets.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Reader<'a> {
    data: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(crate) fn new(data: &'a [u8]) -> Self {
        Self { data }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// The next TLV, whatever its tag.
    pub(crate) fn any(&mut self, what: &'static str) -> Result<Tlv<'a>, Asn1Error> {
        let err = Asn1Error(what);
        let (&tag, rest) = self.data.split_first().ok_or(err)?;
        if tag & 0x1f == 0x1f {
            return Err(err);
        }
        let (&first, rest) = rest.split_first().ok_or(err)?;
        let (len, rest) = if first < 0x80 {
            (usize::from(first), rest)
        } else {
            let n = usize::from(first & 0x7f);
            // 0x80 is the indefinite form; more than four length octets is more than
            // any bundle (and than usize on some targets).
            if n == 0 || n > 4 {
                return Err(err);
            }
            let (octets, rest) = rest.split_at_checked(n).ok_or(err)?;
            let len = octets
                .iter()
                .fold(0usize, |l, &b| (l << 8) | usize::from(b));
            (len, rest)
        };
        let (content, rest) = rest.split_at_checked(len).ok_or(err)?;
        let header = self.data.len() - rest.len() - len;
        let raw = &self.data[..header + len];
        self.data = rest;
        Ok(Tlv { tag, content, raw })
    }

    /// The next TLV, which must have `tag`.
    pub(crate) fn expect(&mut self, tag: u8, what: &'static str) -> Result<Tlv<'a>, Asn1Error> {
        let tlv = self.any(what)?;
        if tlv.tag != tag {
            return Err(Asn1Error(what));
        }
        Ok(tlv)
    }

    /// The next TLV if it has `tag`, else nothing (an absent OPTIONAL field).
    pub(crate) fn optional(
        &mut self,
        tag: u8,
        what: &'static str,
    ) -> Result<Option<Tlv<'a>>, Asn1Error> {
        if self.data.first() == Some(&tag) {
            self.any(what).map(Some)
        } else {
            Ok(None)
        }
    }

    /// A reader of the content of the next TLV, which must have `tag`.
    pub(crate) fn enter(&mut self, tag: u8, what: &'static str) -> Result<Reader<'a>, Asn1Error> {
        self.expect(tag, what).map(|tlv| Reader::new(tlv.content))
    }

    /// Fails unless everything has been read.
    pub(crate) fn finish(&self, what: &'static str) -> Result<(), Asn1Error> {
        if self.data.is_empty() {
            Ok(())
        } else {
            Err(Asn1Error(what))
        }
    }
}

/// The dotted form of an OBJECT IDENTIFIER's content octets (`1.3.6.1.4.1.58708.2.0`).
pub(crate) fn oid_string(content: &[u8]) -> Result<String, Asn1Error> {
    let err = Asn1Error("object identifier");
    if content.is_empty() || content.last().is_some_and(|b| b & 0x80 != 0) {
        return Err(err);
    }
    let mut arcs: Vec<u64> = Vec::new();
    let mut value: u64 = 0;
    for (i, &b) in content.iter().enumerate() {
        // A leading 0x80 would be a non-minimal arc.
        if value == 0 && b == 0x80 && (i == 0 || content[i - 1] & 0x80 == 0) {
            return Err(err);
        }
        value = value.checked_mul(128).ok_or(err)? | u64::from(b & 0x7f);
        if b & 0x80 == 0 {
            arcs.push(value);
            value = 0;
        }
    }
    let first = arcs[0];
    let (a, b) = match first {
        0..40 => (0, first),
        40..80 => (1, first - 40),
        _ => (2, first - 80),
    };
    let mut text = format!("{a}.{b}");
    for arc in &arcs[1..] {
        text.push('.');
        text.push_str(&arc.to_string());
    }
    Ok(text)
}

/// The content octets of an OBJECT IDENTIFIER given in dotted form; for constants.
#[cfg(any(test, feature = "testing"))]
pub(crate) fn oid_content(dotted: &str) -> Vec<u8> {
    let arcs: Vec<u64> = dotted.split('.').map(|a| a.parse().expect("arc")).collect();
    let mut out = Vec::new();
    let mut push = |mut v: u64| {
        let mut octets = vec![(v & 0x7f) as u8];
        v >>= 7;
        while v > 0 {
            octets.push((v & 0x7f) as u8 | 0x80);
            v >>= 7;
        }
        out.extend(octets.iter().rev());
    };
    push(arcs[0] * 40 + arcs[1]);
    for &arc in &arcs[2..] {
        push(arc);
    }
    out
}

/// The octets of an OCTET STRING, primitive or constructed (BER, as PKI.js writes a
/// SignedData's eContent: `24 len 04 len …`); nested once at most.
pub(crate) fn octet_string(tlv: Tlv<'_>) -> Result<Vec<u8>, Asn1Error> {
    match tlv.tag {
        tag::OCTET_STRING => Ok(tlv.content.to_vec()),
        tag::OCTET_STRING_CONSTRUCTED => {
            let mut out = Vec::with_capacity(tlv.content.len());
            let mut chunks = Reader::new(tlv.content);
            while !chunks.is_empty() {
                out.extend(
                    chunks
                        .expect(tag::OCTET_STRING, "octet string chunk")?
                        .content,
                );
            }
            Ok(out)
        }
        _ => Err(Asn1Error("octet string")),
    }
}

/// Seconds since the Unix epoch of a UTCTime or GeneralizedTime, UTC (`Z`) only, with
/// seconds; fractions of a second are dropped.
pub(crate) fn time(tlv: Tlv<'_>) -> Result<i64, Asn1Error> {
    let err = Asn1Error("time");
    let text = std::str::from_utf8(tlv.content).map_err(|_| err)?;
    let text = text.strip_suffix('Z').ok_or(err)?;
    // UTCTime has two year digits (1950-2049, RFC 5280); GeneralizedTime, or a context
    // tag IMPLICIT on one, four.
    let (year, rest) = if tlv.tag == tag::UTC_TIME {
        let yy = digits(text.get(..2).ok_or(err)?)?;
        (if yy < 50 { 2000 + yy } else { 1900 + yy }, &text[2..])
    } else {
        (digits(text.get(..4).ok_or(err)?)?, &text[4..])
    };
    let (fields, fraction) = match rest.split_once('.') {
        Some((fields, fraction)) => (fields, Some(fraction)),
        None => (rest, None),
    };
    if fraction.is_some_and(|f| f.is_empty() || !f.bytes().all(|b| b.is_ascii_digit())) {
        return Err(err);
    }
    if fields.len() != 10 {
        return Err(err);
    }
    let field = |i: usize| digits(&fields[i..i + 2]);
    let (month, day, hour, minute, second) =
        (field(0)?, field(2)?, field(4)?, field(6)?, field(8)?);
    if !(1..=12).contains(&month)
        || !(1..=days_in_month(year, month)).contains(&day)
        || hour > 23
        || minute > 59
        || second > 59
    {
        return Err(err);
    }
    Ok(days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second)
}

fn digits(text: &str) -> Result<i64, Asn1Error> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(Asn1Error("time"));
    }
    text.parse().map_err(|_| Asn1Error("time"))
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
pub(crate) fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tlvs_with_short_long_and_non_minimal_lengths() {
        let data = [
            0x04, 0x01, 0xaa, 0x04, 0x81, 0x01, 0xbb, 0x04, 0x82, 0x00, 0x01, 0xcc,
        ];
        let mut r = Reader::new(&data);
        for expected in [0xaa, 0xbb, 0xcc] {
            let tlv = r.expect(tag::OCTET_STRING, "x").expect("tlv");
            assert_eq!(tlv.content, [expected]);
        }
        r.finish("x").expect("all read");
    }

    #[test]
    fn indefinite_lengths_long_tags_and_overruns_are_refused() {
        for data in [
            &[0x30, 0x80, 0, 0][..],
            &[0x1f, 0x01, 0x00],
            &[0x04, 0x02, 0x00],
            &[0x04],
        ] {
            assert!(Reader::new(data).any("x").is_err(), "{data:?}");
        }
    }

    #[test]
    fn object_identifiers_in_dotted_form() {
        let letro = "1.3.6.1.4.1.58708.2.0";
        assert_eq!(
            oid_content(letro),
            [0x2b, 6, 1, 4, 1, 0x83, 0xca, 0x54, 2, 0]
        );
        assert_eq!(oid_string(&oid_content(letro)).expect("oid"), letro);
        assert_eq!(
            oid_string(&oid_content("2.5.29.19")).expect("oid"),
            "2.5.29.19"
        );
        assert!(oid_string(&[0x2b, 0x83]).is_err());
        assert!(oid_string(&[0x2b, 0x80, 0x01]).is_err());
        assert!(oid_string(&[]).is_err());
    }

    #[test]
    fn times() {
        let utc = Tlv {
            tag: tag::UTC_TIME,
            content: b"261202162746Z",
            raw: &[],
        };
        assert_eq!(time(utc).expect("time"), 1_796_228_866);
        let generalized = Tlv {
            tag: tag::context(0),
            content: b"20261202162746.123Z",
            raw: &[],
        };
        assert_eq!(time(generalized).expect("time"), 1_796_228_866);
        let y2k = Tlv {
            tag: 0x18,
            content: b"20000229000000Z",
            raw: &[],
        };
        assert_eq!(time(y2k).expect("time"), 951_782_400);
        for bad in [
            &b"20261302162746Z"[..],
            b"20260230000000Z",
            b"2026120216274Z",
            b"20261202162746",
        ] {
            let tlv = Tlv {
                tag: 0x18,
                content: bad,
                raw: &[],
            };
            assert!(time(tlv).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }
}
