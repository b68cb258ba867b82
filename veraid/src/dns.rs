//! The DNS wire format, as far as DNSSEC validation of a VeraId chain needs it: messages
//! (header, question and answer sections; authority and additional are not read), the
//! DNSKEY, DS, RRSIG and TXT record data, key tags, DS digests, and the data an RRSIG
//! signs. Pure and bounded: every length is checked against the input, and hostile
//! input gives an error, never a panic.

mod name;

use sha2::{Digest, Sha256, Sha384};

pub use name::Name;

/// Why DNS wire data could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The data ends before what it declares.
    #[error("DNS data is truncated")]
    Truncated,
    /// A label is empty where it may not be, longer than 63 octets, or of a reserved type.
    #[error("invalid DNS label")]
    BadLabel,
    /// A name is longer than 255 octets.
    #[error("DNS name longer than 255 octets")]
    NameTooLong,
    /// A compression pointer points forwards, at itself, or too many follow each other.
    #[error("invalid DNS name compression")]
    BadCompression,
    /// A record's data does not have the layout of its type.
    #[error("malformed {0} record data")]
    BadRdata(&'static str),
    /// Bytes are left after the last section that was declared.
    #[error("trailing bytes after the DNS message")]
    TrailingBytes,
}

/// Record types this crate reads.
pub mod rtype {
    /// TXT (RFC 1035).
    pub const TXT: u16 = 16;
    /// DS (RFC 4034).
    pub const DS: u16 = 43;
    /// RRSIG (RFC 4034).
    pub const RRSIG: u16 = 46;
    /// DNSKEY (RFC 4034).
    pub const DNSKEY: u16 = 48;
}

/// The Internet class.
pub const CLASS_IN: u16 = 1;

/// A response code of `NOERROR`.
pub const RCODE_NOERROR: u8 = 0;

/// The response code for a name that does not exist.
pub const RCODE_NXDOMAIN: u8 = 3;

/// One question of a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Question {
    /// The name asked about.
    pub name: Name,
    /// The type asked for.
    pub rtype: u16,
    /// The class asked for.
    pub class: u16,
}

/// One resource record, its data as received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Its owner.
    pub name: Name,
    /// Its type.
    pub rtype: u16,
    /// Its class.
    pub class: u16,
    /// Its TTL, in seconds.
    pub ttl: u32,
    /// Its data, as received (names in it are not decompressed: the types read here
    /// carry no compressible names, RFC 3597 §4).
    pub rdata: Vec<u8>,
}

/// A DNS message: what the DNSSEC chain of a VeraId bundle holds, one per response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// The response code (the header's low four bits; extended codes are not read).
    pub rcode: u8,
    /// The question section.
    pub questions: Vec<Question>,
    /// The answer section.
    pub answers: Vec<Record>,
}

/// Reads a big-endian u16 at `at`.
fn u16_at(data: &[u8], at: usize) -> Result<u16, WireError> {
    let bytes = data.get(at..at + 2).ok_or(WireError::Truncated)?;
    Ok(u16::from_be_bytes([bytes[0], bytes[1]]))
}

/// Reads a big-endian u32 at `at`.
fn u32_at(data: &[u8], at: usize) -> Result<u32, WireError> {
    let bytes = data.get(at..at + 4).ok_or(WireError::Truncated)?;
    Ok(u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
}

impl Message {
    /// Parses a whole message. The authority and additional sections are skipped but
    /// must be well formed, and nothing may follow them.
    pub fn parse(data: &[u8]) -> Result<Self, WireError> {
        let rcode = data.get(3).ok_or(WireError::Truncated)? & 0x0f;
        let counts = [
            u16_at(data, 4)?,
            u16_at(data, 6)?,
            u16_at(data, 8)?,
            u16_at(data, 10)?,
        ];
        let mut at = 12;
        // Each question takes at least 5 octets and each record 11: counts beyond what
        // the data can hold are refused before anything is allocated for them.
        let room = data.len().saturating_sub(at);
        if usize::from(counts[0]) * 5
            + (usize::from(counts[1]) + usize::from(counts[2]) + usize::from(counts[3])) * 11
            > room
        {
            return Err(WireError::Truncated);
        }
        let mut questions = Vec::with_capacity(usize::from(counts[0]));
        for _ in 0..counts[0] {
            let (name, end) = Name::read(data, at)?;
            questions.push(Question {
                name,
                rtype: u16_at(data, end)?,
                class: u16_at(data, end + 2)?,
            });
            at = end + 4;
        }
        let mut answers = Vec::with_capacity(usize::from(counts[1]));
        for (section, &count) in counts.iter().enumerate().skip(1) {
            for _ in 0..count {
                let (record, end) = Self::record(data, at)?;
                if section == 1 {
                    answers.push(record);
                }
                at = end;
            }
        }
        if at != data.len() {
            return Err(WireError::TrailingBytes);
        }
        Ok(Self {
            rcode,
            questions,
            answers,
        })
    }

    fn record(data: &[u8], at: usize) -> Result<(Record, usize), WireError> {
        let (name, end) = Name::read(data, at)?;
        let rtype = u16_at(data, end)?;
        let class = u16_at(data, end + 2)?;
        let ttl = u32_at(data, end + 4)?;
        let len = usize::from(u16_at(data, end + 8)?);
        let start = end + 10;
        let rdata = data
            .get(start..start + len)
            .ok_or(WireError::Truncated)?
            .to_vec();
        Ok((
            Record {
                name,
                rtype,
                class,
                ttl,
                rdata,
            },
            start + len,
        ))
    }

    /// Whether the question section is exactly this one question (the offline
    /// resolver's test for "the response to this query").
    pub fn answers_question(&self, name: &Name, rtype: u16) -> bool {
        matches!(&self.questions[..], [q] if q.name == *name && q.rtype == rtype && q.class == CLASS_IN)
    }
}

/// DNSKEY record data (RFC 4034 §2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dnskey {
    /// The flags: bit 7 (0x0100) is the Zone Key flag, bit 15 (0x0001) the SEP flag.
    pub flags: u16,
    /// Always 3 in valid keys (not checked, as in the reference).
    pub protocol: u8,
    /// The DNSSEC algorithm number.
    pub algorithm: u8,
    /// The public key, in the algorithm's format.
    pub public_key: Vec<u8>,
    /// The whole record data, which key tags and DS digests are computed over.
    pub rdata: Vec<u8>,
}

impl Dnskey {
    /// The Zone Key flag.
    pub const ZONE_KEY: u16 = 0x0100;

    /// Reads DNSKEY record data.
    pub fn parse(rdata: &[u8]) -> Result<Self, WireError> {
        if rdata.len() < 5 {
            return Err(WireError::BadRdata("DNSKEY"));
        }
        Ok(Self {
            flags: u16::from_be_bytes([rdata[0], rdata[1]]),
            protocol: rdata[2],
            algorithm: rdata[3],
            public_key: rdata[4..].to_vec(),
            rdata: rdata.to_vec(),
        })
    }

    /// The key tag of RFC 4034 Appendix B (algorithm 1's special case is not needed:
    /// RSA/MD5 is not supported).
    pub fn key_tag(&self) -> u16 {
        let mut sum: u32 = 0;
        for (i, &b) in self.rdata.iter().enumerate() {
            sum += if i % 2 == 0 {
                u32::from(b) << 8
            } else {
                u32::from(b)
            };
        }
        sum += (sum >> 16) & 0xffff;
        (sum & 0xffff) as u16
    }
}

/// DS record data (RFC 4034 §5), also the form of a trust anchor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ds {
    /// The key tag of the key it names.
    pub key_tag: u16,
    /// That key's algorithm.
    pub algorithm: u8,
    /// The digest type: 1 SHA-1, 2 SHA-256, 4 SHA-384.
    pub digest_type: u8,
    /// The digest of the key's owner name and DNSKEY record data.
    pub digest: Vec<u8>,
}

impl Ds {
    /// Reads DS record data.
    pub fn parse(rdata: &[u8]) -> Result<Self, WireError> {
        if rdata.len() < 5 {
            return Err(WireError::BadRdata("DS"));
        }
        Ok(Self {
            key_tag: u16::from_be_bytes([rdata[0], rdata[1]]),
            algorithm: rdata[2],
            digest_type: rdata[3],
            digest: rdata[4..].to_vec(),
        })
    }

    /// Whether `key`, owned by `owner`, is the key this DS names: a zone key of the same
    /// algorithm whose digest matches. The key tag is not compared, nor the SEP or
    /// REVOKE flags nor the protocol octet (as in the reference, dnssec-js). An unknown
    /// digest type matches nothing.
    pub fn matches(&self, owner: &Name, key: &Dnskey) -> bool {
        if key.flags & Dnskey::ZONE_KEY == 0 || key.algorithm != self.algorithm {
            return false;
        }
        let mut data = Vec::with_capacity(owner.wire_len() + key.rdata.len());
        owner.write_canonical(&mut data);
        data.extend(&key.rdata);
        let digest = match self.digest_type {
            1 => sha1::Sha1::digest(&data).to_vec(),
            2 => Sha256::digest(&data).to_vec(),
            4 => Sha384::digest(&data).to_vec(),
            _ => return false,
        };
        digest == self.digest
    }
}

/// RRSIG record data (RFC 4034 §3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rrsig {
    /// The type of the RRset it signs.
    pub type_covered: u16,
    /// The DNSSEC algorithm.
    pub algorithm: u8,
    /// Labels of the signed owner name, not counting the root or a leading `*`.
    pub labels: u8,
    /// The TTL of the RRset as signed.
    pub original_ttl: u32,
    /// End of validity, in seconds since the epoch (read as plain u32).
    pub expiration: u32,
    /// Start of validity, in seconds since the epoch (read as plain u32).
    pub inception: u32,
    /// The key tag of the signing DNSKEY.
    pub key_tag: u16,
    /// The zone of the signing key.
    pub signer: Name,
    /// The signature.
    pub signature: Vec<u8>,
    /// The record data up to the signature, the signer name in canonical form: the
    /// first part of what the signature covers.
    signed_prefix: Vec<u8>,
}

impl Rrsig {
    /// Reads RRSIG record data. The signer name must not be compressed (RFC 4034 §3.1.7).
    pub fn parse(rdata: &[u8]) -> Result<Self, WireError> {
        if rdata.len() < 19 {
            return Err(WireError::BadRdata("RRSIG"));
        }
        // The signer name is read from the rdata alone, so a pointer (which would point
        // outside it, or backwards into the fixed fields) is refused.
        let (signer, end) = Name::read(rdata, 18).map_err(|_| WireError::BadRdata("RRSIG"))?;
        // Uncompressed, the name took exactly its wire length.
        if end - 18 != signer.wire_len() {
            return Err(WireError::BadRdata("RRSIG"));
        }
        let mut signed_prefix = rdata[..18].to_vec();
        signer.write_canonical(&mut signed_prefix);
        Ok(Self {
            type_covered: u16::from_be_bytes([rdata[0], rdata[1]]),
            algorithm: rdata[2],
            labels: rdata[3],
            original_ttl: u32::from_be_bytes([rdata[4], rdata[5], rdata[6], rdata[7]]),
            expiration: u32::from_be_bytes([rdata[8], rdata[9], rdata[10], rdata[11]]),
            inception: u32::from_be_bytes([rdata[12], rdata[13], rdata[14], rdata[15]]),
            key_tag: u16::from_be_bytes([rdata[16], rdata[17]]),
            signer,
            signature: rdata[end..].to_vec(),
            signed_prefix,
        })
    }

    /// What the signature covers, for the RRset of `owner`, `class` and this RRSIG's
    /// type made of `rdatas` (RFC 4034 §3.1.8.1, §6.3): the RRSIG data without the
    /// signature, then each record in canonical form with the original TTL, sorted by
    /// record data, exact duplicates once.
    pub fn signed_data(&self, owner: &Name, class: u16, rdatas: &[&[u8]]) -> Vec<u8> {
        let mut sorted: Vec<&[u8]> = rdatas.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        let mut owner_wire = Vec::with_capacity(owner.wire_len());
        owner.write_canonical(&mut owner_wire);
        let mut data = self.signed_prefix.clone();
        for rdata in sorted {
            data.extend(&owner_wire);
            data.extend(self.type_covered.to_be_bytes());
            data.extend(class.to_be_bytes());
            data.extend(self.original_ttl.to_be_bytes());
            // Record data read from a message is at most 65535 octets.
            data.extend((rdata.len() as u16).to_be_bytes());
            data.extend(rdata);
        }
        data
    }
}

/// The character-strings of TXT record data (RFC 1035 §3.3.14).
pub fn txt_strings(rdata: &[u8]) -> Result<Vec<Vec<u8>>, WireError> {
    let mut strings = Vec::new();
    let mut at = 0;
    while at < rdata.len() {
        let len = usize::from(rdata[at]);
        let string = rdata
            .get(at + 1..at + 1 + len)
            .ok_or(WireError::BadRdata("TXT"))?;
        strings.push(string.to_vec());
        at += 1 + len;
    }
    Ok(strings)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A response for `example.com./DS` with one DS record and one unrelated
    /// additional record, names compressed.
    fn ds_response() -> Vec<u8> {
        let mut m = vec![0x12, 0x34, 0x81, 0x80, 0, 1, 0, 1, 0, 0, 0, 1];
        m.extend(b"\x07example\x03com\x00");
        m.extend([0, 43, 0, 1]);
        m.extend([0xc0, 12, 0, 43, 0, 1, 0, 0, 0x0e, 0x10, 0, 8]);
        m.extend([0x30, 0x39, 8, 2, 0xaa, 0xbb, 0xcc, 0xdd]);
        m.extend([0, 0, 41, 0x10, 0, 0, 0, 0, 0, 0, 0]);
        m
    }

    #[test]
    fn a_response_reads_its_question_and_answers_and_skips_the_rest() {
        let m = Message::parse(&ds_response()).expect("valid");
        assert_eq!(m.rcode, RCODE_NOERROR);
        let example = Name::parse("example.com.").expect("name");
        assert!(m.answers_question(&example, rtype::DS));
        assert!(!m.answers_question(&example, rtype::DNSKEY));
        assert_eq!(m.answers.len(), 1);
        let ds = Ds::parse(&m.answers[0].rdata).expect("DS");
        assert_eq!(
            ds,
            Ds {
                key_tag: 12345,
                algorithm: 8,
                digest_type: 2,
                digest: vec![0xaa, 0xbb, 0xcc, 0xdd]
            }
        );
        assert_eq!(m.answers[0].ttl, 3600);
        assert_eq!(m.answers[0].name, example);
    }

    #[test]
    fn lengths_are_checked_against_the_data() {
        let whole = ds_response();
        for cut in 0..whole.len() {
            assert!(Message::parse(&whole[..cut]).is_err(), "cut at {cut}");
        }
        let mut longer = whole.clone();
        longer.push(0);
        assert_eq!(Message::parse(&longer), Err(WireError::TrailingBytes));
        // 65535 answers declared in a few bytes: refused before allocating for them.
        let mut huge = whole[..12].to_vec();
        huge[6] = 0xff;
        huge[7] = 0xff;
        assert_eq!(Message::parse(&huge), Err(WireError::Truncated));
    }

    #[test]
    fn key_tags_follow_rfc_4034_appendix_b() {
        // RFC 4034 §5.4's example DNSKEY for dskey.example.com (algorithm 5, key tag
        // 60485) and its SHA-1 DS digest.
        let key = base64_decode(
            "AQOeiiR0GOMYkDshWoSKz9XzfwJr1AYtsmx3TGkJaNXVbfi/2pHm822aJ5iI9BMzNXxeYCmZDRD99WYwYqUSdjMmmAphXdvxegXd/M5+X7OrzKBaMbCVdFLUUh6DhweJBjEVv5f2wwjM9XzcnOf+EPbtG9DMBmADjFDc2w/rljwvFw==",
        );
        let mut rdata = vec![0x01, 0x00, 3, 5];
        rdata.extend(&key);
        let dnskey = Dnskey::parse(&rdata).expect("DNSKEY");
        assert_eq!(dnskey.key_tag(), 60485);
        let owner = Name::parse("dskey.example.com.").expect("name");
        let ds = Ds {
            key_tag: 60485,
            algorithm: 5,
            digest_type: 1,
            digest: hex("2BB183AF5F22588179A53B0A98631FAD1A292118"),
        };
        assert!(ds.matches(&owner, &dnskey));
        assert!(!ds.matches(&Name::parse("other.example.com.").expect("name"), &dnskey));
        let not_a_zone_key = Dnskey::parse(&[&[0, 0, 3, 5][..], &key].concat()).expect("key");
        assert!(!ds.matches(&owner, &not_a_zone_key));
        let unknown_digest = Ds {
            digest_type: 3,
            ..ds.clone()
        };
        assert!(!unknown_digest.matches(&owner, &dnskey));
    }

    #[test]
    fn txt_character_strings() {
        assert_eq!(
            txt_strings(b"\x03abc\x00\x01d").expect("valid"),
            [b"abc".to_vec(), vec![], b"d".to_vec()]
        );
        assert_eq!(txt_strings(b"\x05ab"), Err(WireError::BadRdata("TXT")));
        assert_eq!(txt_strings(b"").expect("empty"), Vec::<Vec<u8>>::new());
    }

    #[test]
    fn rrsig_signed_data_is_canonical() {
        let mut rdata = vec![0, 16, 8, 3, 0, 0, 0x0e, 0x10];
        rdata.extend([0, 0, 0, 2, 0, 0, 0, 1, 0x30, 0x39]);
        rdata.extend(b"\x07Example\x03COM\x00");
        rdata.extend([0xde, 0xad]);
        let sig = Rrsig::parse(&rdata).expect("RRSIG");
        assert_eq!(
            (sig.type_covered, sig.algorithm, sig.labels, sig.key_tag),
            (16, 8, 3, 12345)
        );
        assert_eq!((sig.inception, sig.expiration), (1, 2));
        assert_eq!(sig.signer, Name::parse("example.com").expect("name"));
        assert_eq!(sig.signature, [0xde, 0xad]);
        let owner = Name::parse("_veraid.Example.com.").expect("name");
        let data = sig.signed_data(&owner, CLASS_IN, &[b"\x01b", b"\x01a", b"\x01b"]);
        let mut expected = rdata[..18].to_vec();
        expected.extend(b"\x07example\x03com\x00");
        for txt in [b"\x01a", b"\x01b"] {
            expected.extend(b"\x07_veraid\x07example\x03com\x00");
            expected.extend([0, 16, 0, 1, 0, 0, 0x0e, 0x10, 0, 2]);
            expected.extend(txt);
        }
        assert_eq!(data, expected);
        assert!(Rrsig::parse(&rdata[..18]).is_err());
    }

    fn hex(text: &str) -> Vec<u8> {
        (0..text.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&text[i..i + 2], 16).expect("hex"))
            .collect()
    }

    fn base64_decode(text: &str) -> Vec<u8> {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD
            .decode(text)
            .expect("base64")
    }
}
