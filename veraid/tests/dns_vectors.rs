//! The DNS layer against the DNSSEC chains of the interoperability vectors
//! (`tests/fixtures/veraid-vectors.json`, made with the reference JavaScript libraries).

mod common;

use common::{bundle, chain, trust_anchor, vectors};
use proptest::prelude::*;
use veraid::dns::{CLASS_IN, Dnskey, Ds, Message, Name, Rrsig, rtype, txt_strings};

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
