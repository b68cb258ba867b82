//! The properties the fuzz targets check, one function per decoder of untrusted bytes.
//!
//! They live in the library, not in `fuzz/`, so that the test suite can replay the
//! fuzz corpus and a bounded mutation pass on stable Rust, while `cargo fuzz` (nightly,
//! coverage-guided) drives the very same functions for as long as one cares to run it.
//! Each function panics when a property fails; "returns an error" is never a failure.

use crate::codec::cloudevent::decode_http;
use crate::codec::connparams::{decode_connection_params, pda_signature_verifies};
use crate::codec::pairing::{MAX_REQUEST_BYTES, encode_request, parse_request};
use crate::domain::authorisation::check_authorisation;
use crate::domain::{EndpointId, Timestamp};

/// Splits fuzz input into HTTP header lines and a body: lines up to the first empty
/// line are `name:value` (bytes, `:` optional), the rest is the body.
pub fn split_http(data: &[u8]) -> (Vec<(String, Vec<u8>)>, Vec<u8>) {
    let (head, body) = match data.windows(2).position(|w| w == b"\n\n") {
        Some(at) => (&data[..at], data[at + 2..].to_vec()),
        None => (data, Vec::new()),
    };
    let headers = head
        .split(|b| *b == b'\n')
        .filter(|line| !line.is_empty())
        .map(|line| {
            let (name, value) = match line.iter().position(|b| *b == b':') {
                Some(at) => (&line[..at], &line[at + 1..]),
                None => (line, &[][..]),
            };
            (String::from_utf8_lossy(name).into_owned(), value.to_vec())
        })
        .collect();
    (headers, body)
}

/// The CloudEvent decoder never panics, and its verdict does not depend on the order of
/// headers with different names (a proxy may reorder those; RFC 9110 §5.3 has it keep
/// the order of lines with the same name, which may matter).
pub fn cloudevent(data: &[u8]) {
    let (headers, body) = split_http(data);
    let forward = decode_http(
        headers.iter().map(|(n, v)| (n.as_str(), v.as_slice())),
        body.clone(),
    );
    let mut reordered: Vec<_> = headers.iter().collect();
    reordered.sort_by_key(|(name, _)| std::cmp::Reverse(name.to_ascii_lowercase()));
    let backward = decode_http(
        reordered.iter().map(|(n, v)| (n.as_str(), v.as_slice())),
        body,
    );
    match (forward, backward) {
        (Ok(a), Ok(b)) => {
            assert_eq!(a, b, "header order changed the event");
            assert!(!a.id.is_empty() && !a.source.is_empty() && !a.ty.is_empty());
        }
        (Err(_), Err(_)) => {}
        (a, b) => panic!("header order changed the verdict: {a:?} vs {b:?}"),
    }
}

/// The pairing request parser never panics, never accepts more than the size limit, and
/// what it accepts renders back into a request that parses to the same fields.
pub fn pairing_request(data: &[u8]) {
    let Ok(fields) = parse_request(data) else {
        return;
    };
    assert!(data.len() <= MAX_REQUEST_BYTES);
    let again = encode_request(
        fields.requester.as_str(),
        fields.target.as_str(),
        &fields.key_der,
    );
    assert_eq!(
        parse_request(&again).as_ref(),
        Ok(&fields),
        "re-encoded request"
    );
}

/// The connection params decoder never panics, is strict DER (a trailing byte makes
/// accepted params malformed), and what it accepts can be checked end to end —
/// authorisation rules and signature — without a panic.
pub fn connection_params(data: &[u8]) {
    let Ok(params) = decode_connection_params(data) else {
        return;
    };
    let mut longer = data.to_vec();
    longer.push(0);
    assert!(
        decode_connection_params(&longer).is_err(),
        "trailing byte accepted"
    );
    // Sent by the identity key's own endpoint, so that the rules get as far as they
    // can; any time will do.
    let sender = EndpointId::from_spki_der(&params.identity_key_der);
    let now = Timestamp(1_767_225_600_000);
    let _ = check_authorisation(
        sender.as_str(),
        &params.identity_key_der,
        &params.pda,
        now,
        || pda_signature_verifies(&params.signed_pda, &params.identity_key_der),
    );
}

/// xorshift64*: a tiny deterministic generator for mutation passes, so that a failure
/// names a reproducible case. Not for anything that must be unpredictable.
#[derive(Debug, Clone)]
pub struct Rng(pub u64);

impl Rng {
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number below `n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next_u64() % (n.max(1) as u64)).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::Rng;

    /// Mutations tried per target in the bounded pass, spread over the corpus: small
    /// enough for every `cargo test`, large enough to walk off each decoder's happy path.
    const MUTATIONS: usize = 20_000;

    fn corpus(target: &str) -> Vec<Vec<u8>> {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz/corpus")
            .join(target);
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|entry| entry.expect("corpus entry").path())
            .collect();
        files.sort();
        files
            .iter()
            .map(|f| std::fs::read(f).expect("corpus file"))
            .collect()
    }

    fn mutate(rng: &mut Rng, seed: &[u8], other: &[u8]) -> Vec<u8> {
        let mut data = seed.to_vec();
        for _ in 0..=rng.below(4) {
            let at = rng.below(data.len() + 1);
            match rng.below(7) {
                0 if !data.is_empty() => {
                    let i = at.min(data.len() - 1);
                    data[i] ^= 1 << rng.below(8);
                }
                1 => data.insert(at, rng.next_u64() as u8),
                2 if at < data.len() => {
                    data.remove(at);
                }
                3 => data.truncate(at),
                // DER lengths and counts live in small bytes: nudge one.
                4 if !data.is_empty() => {
                    let i = at.min(data.len() - 1);
                    data[i] = data[i].wrapping_add(if rng.below(2) == 0 { 1 } else { 255 });
                }
                5 => {
                    let from = rng.below(other.len());
                    let len = rng.below(other.len() - from.min(other.len()) + 1).min(64);
                    let piece = other[from..from + len].to_vec();
                    data.splice(at..at, piece);
                }
                _ => {
                    let interesting = [0x00, 0xff, 0x80, 0x7f, b',', b'@', b'%', b'\n', b':'];
                    data.insert(at, interesting[rng.below(interesting.len())]);
                }
            }
        }
        data
    }

    fn run(target: &str, check: fn(&[u8])) {
        let seeds = corpus(target);
        assert!(!seeds.is_empty(), "empty corpus for {target}");
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for seed in &seeds {
            check(seed);
        }
        for i in 0..MUTATIONS {
            let seed = &seeds[i % seeds.len()];
            let other = &seeds[rng.below(seeds.len())];
            check(&mutate(&mut rng, seed, other));
        }
    }

    #[test]
    fn cloudevent_corpus_and_mutations() {
        run("cloudevent", super::cloudevent);
    }

    #[test]
    fn pairing_request_corpus_and_mutations() {
        run("pairing_request", super::pairing_request);
    }

    #[test]
    fn connection_params_corpus_and_mutations() {
        run("connection_params", super::connection_params);
    }
}
