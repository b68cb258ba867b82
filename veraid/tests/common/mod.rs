//! Reading the interoperability vectors (`fixtures/veraid-vectors.json`, made with the
//! reference JavaScript libraries), shared by the test binaries.

#![allow(dead_code)] // each test binary uses some of these

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use veraid::dns::Ds;

pub(crate) fn vectors() -> &'static serde_json::Value {
    static VECTORS: std::sync::OnceLock<serde_json::Value> = std::sync::OnceLock::new();
    VECTORS.get_or_init(|| {
        serde_json::from_str(include_str!("../fixtures/veraid-vectors.json"))
            .expect("vectors parse")
    })
}

/// One DER TLV at the start of `data`: (tag, content, rest). Test code: the crate's own
/// bundle decoder is a later layer.
pub(crate) fn tlv(data: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let tag = *data.first()?;
    let first = *data.get(1)?;
    let (len, header) = if first < 0x80 {
        (usize::from(first), 2)
    } else {
        let n = usize::from(first & 0x7f);
        let bytes = data.get(2..2 + n)?;
        (
            bytes.iter().fold(0usize, |l, &b| l << 8 | usize::from(b)),
            2 + n,
        )
    };
    let content = data.get(header..header + len)?;
    Some((tag, content, &data[header + len..]))
}

/// The DNS messages of a bundle's `[1] dnssecChain`, in the order they were written.
pub(crate) fn chain(bundle: &[u8]) -> Vec<Vec<u8>> {
    let (_, bundle, _) = tlv(bundle).expect("SignatureBundle");
    let (_, _, rest) = tlv(bundle).expect("version");
    let (tag, mut set, _) = tlv(rest).expect("dnssecChain");
    assert_eq!(tag, 0xa1);
    let mut messages = Vec::new();
    while !set.is_empty() {
        let (tag, message, rest) = tlv(set).expect("OCTET STRING");
        assert_eq!(tag, 0x04);
        messages.push(message.to_vec());
        set = rest;
    }
    messages
}

pub(crate) fn bundle(case: &serde_json::Value) -> Vec<u8> {
    STANDARD
        .decode(case["bundle_der_b64"].as_str().expect("bundle"))
        .expect("base64")
}

/// The vectors' trust anchor, `. 86400 IN DS 23299 8 2 AB7B…`.
pub(crate) fn trust_anchor() -> Ds {
    let v = vectors();
    let line = v["trust_anchors"][0].as_str().expect("anchor");
    let fields: Vec<&str> = line.split_whitespace().collect();
    let [".", _, "IN", "DS", tag, alg, digest_type, digest] = fields[..] else {
        panic!("unexpected anchor {line}");
    };
    Ds {
        key_tag: tag.parse().expect("tag"),
        algorithm: alg.parse().expect("alg"),
        digest_type: digest_type.parse().expect("type"),
        digest: (0..digest.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&digest[i..i + 2], 16).expect("hex"))
            .collect(),
    }
}

/// The instant every case is to be verified at (`generated_at`), in Unix seconds.
pub(crate) fn now() -> u64 {
    let text = vectors()["generated_at"].as_str().expect("generated_at");
    unix_seconds(text)
}

/// Unix seconds of an RFC 3339 UTC time such as `2026-12-02T16:27:46.000Z` (test code:
/// the vectors write only that form).
pub(crate) fn unix_seconds(text: &str) -> u64 {
    let field = |range: std::ops::Range<usize>| -> i64 { text[range].parse().expect("digits") };
    let (year, month, day) = (field(0..4), field(5..7), field(8..10));
    let (hour, minute, second) = (field(11..13), field(14..16), field(17..19));
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    u64::try_from(days * 86_400 + hour * 3600 + minute * 60 + second).expect("after 1970")
}

/// Every case, with its name.
pub(crate) fn cases() -> impl Iterator<Item = (&'static str, &'static serde_json::Value)> {
    vectors()["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .map(|case| (case["name"].as_str().expect("name"), case))
}
