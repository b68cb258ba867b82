//! The DNS layer against the DNSSEC chains of the interoperability vectors
//! (`tests/fixtures/veraid-vectors.json`, made with the reference JavaScript libraries).

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use proptest::prelude::*;
use veraid::dns::{CLASS_IN, Dnskey, Ds, Message, Name, Rrsig, rtype, txt_strings};

fn vectors() -> &'static serde_json::Value {
    static VECTORS: std::sync::OnceLock<serde_json::Value> = std::sync::OnceLock::new();
    VECTORS.get_or_init(|| {
        serde_json::from_str(include_str!("fixtures/veraid-vectors.json")).expect("vectors parse")
    })
}

/// One DER TLV at the start of `data`: (tag, content, rest). Test code: the crate's own
/// bundle decoder is a later layer.
fn tlv(data: &[u8]) -> Option<(u8, &[u8], &[u8])> {
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
fn chain(bundle: &[u8]) -> Vec<Vec<u8>> {
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

fn bundle(case: &serde_json::Value) -> Vec<u8> {
    STANDARD
        .decode(case["bundle_der_b64"].as_str().expect("bundle"))
        .expect("base64")
}

/// The vectors' trust anchor, `. 86400 IN DS 23299 8 2 AB7B…`.
fn trust_anchor() -> Ds {
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

#[test]
fn every_message_of_every_chain_parses() {
    let v = vectors();
    let mut messages = 0;
    for case in v["cases"].as_array().expect("cases") {
        let name = case["name"].as_str().expect("name");
        for (i, message) in chain(&bundle(case)).iter().enumerate() {
            let parsed =
                Message::parse(message).unwrap_or_else(|e| panic!("{name}: message {i}: {e}"));
            assert_eq!(parsed.questions.len(), 1, "{name}: message {i}");
            for record in &parsed.answers {
                let ok = match record.rtype {
                    rtype::DNSKEY => Dnskey::parse(&record.rdata).is_ok(),
                    rtype::DS => Ds::parse(&record.rdata).is_ok(),
                    rtype::RRSIG => Rrsig::parse(&record.rdata).is_ok(),
                    rtype::TXT => txt_strings(&record.rdata).is_ok(),
                    _ => true,
                };
                assert!(ok, "{name}: message {i}: {record:?}");
            }
            messages += 1;
        }
    }
    assert!(messages > 67 * 5, "{messages} messages");
}

#[test]
fn the_trust_anchor_names_the_root_key_of_the_chains_built_on_it() {
    let v = vectors();
    let anchor = trust_anchor();
    let root = Name::root();
    let mut anchored = 0;
    for case in v["cases"].as_array().expect("cases") {
        let name = case["name"].as_str().expect("name");
        let messages: Vec<Message> = chain(&bundle(case))
            .iter()
            .map(|m| Message::parse(m).expect("parses"))
            .collect();
        let Some(keys) = messages
            .iter()
            .find(|m| m.answers_question(&root, rtype::DNSKEY))
        else {
            continue;
        };
        let matched: Vec<Dnskey> = keys
            .answers
            .iter()
            .filter(|r| r.rtype == rtype::DNSKEY && r.class == CLASS_IN && r.name == root)
            .map(|r| Dnskey::parse(&r.rdata).expect("DNSKEY"))
            .filter(|k| anchor.matches(&root, k))
            .collect();
        if name == "chain_not_to_trust_anchor" {
            assert!(matched.is_empty(), "{name}");
            continue;
        }
        assert_eq!(matched.len(), 1, "{name}");
        // The tag is not what matching relies on, but it must be the anchor's.
        assert_eq!(matched[0].key_tag(), anchor.key_tag, "{name}");
        anchored += 1;
    }
    assert!(anchored >= 60, "{anchored} chains anchored");
}

#[test]
fn the_txt_record_of_the_valid_bundle_is_one_string() {
    let v = vectors();
    let case = &v["cases"][0];
    assert_eq!(case["name"], "valid_user_signed");
    let owner = Name::parse("_veraid.example.com.").expect("name");
    let txt = chain(&bundle(case))
        .iter()
        .map(|m| Message::parse(m).expect("parses"))
        .find(|m| m.answers_question(&owner, rtype::TXT))
        .expect("a TXT response");
    let records: Vec<Vec<Vec<u8>>> = txt
        .answers
        .iter()
        .filter(|r| r.rtype == rtype::TXT)
        .map(|r| txt_strings(&r.rdata).expect("TXT"))
        .collect();
    assert_eq!(records.len(), 1);
    let [string] = &records[0][..] else {
        panic!("one character-string");
    };
    let text = String::from_utf8(string.clone()).expect("UTF-8");
    let fields: Vec<&str> = text.split_whitespace().collect();
    assert_eq!(fields[0], "1", "RSA-2048: {text}");
    assert_eq!(fields.len(), 3, "{text}");
    // The RRSIG over it is the apex zone's.
    let signer = txt
        .answers
        .iter()
        .filter(|r| r.rtype == rtype::RRSIG)
        .map(|r| Rrsig::parse(&r.rdata).expect("RRSIG"))
        .find(|s| s.type_covered == rtype::TXT)
        .expect("an RRSIG over the TXT RRset")
        .signer;
    assert_eq!(signer, Name::parse("example.com.").expect("name"));
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = Message::parse(&data);
        let _ = Dnskey::parse(&data);
        let _ = Ds::parse(&data);
        let _ = Rrsig::parse(&data);
        let _ = txt_strings(&data);
    }

    #[test]
    fn mutated_real_messages_never_panic(message in 0usize..7, at in 0usize..2048, byte in any::<u8>()) {
        let v = vectors();
        let messages = chain(&bundle(&v["cases"][0]));
        let mut data = messages[message % messages.len()].clone();
        let i = at % data.len();
        data[i] = byte;
        if let Ok(parsed) = Message::parse(&data) {
            for record in parsed.answers {
                let _ = Rrsig::parse(&record.rdata);
                let _ = Dnskey::parse(&record.rdata).map(|k| k.key_tag());
            }
        }
    }
}
