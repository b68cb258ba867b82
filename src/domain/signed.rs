//! The signed pairing protocol's rules (`contact-pairing.request`, veraid.md §12): what
//! a verified request must satisfy, in letro-server's order, and the failure each rule
//! answers with.

use super::ids::{EndpointId, VeraId};
use super::pairing::{Offer, PairingRequest, Protocol};
use super::refusal::Refusal;

/// Why a verified request is refused with a failure message to its sender: the
/// `reason` of a `ContactPairingFailure`, with letro-server's numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureReason {
    /// The signer is an organisation's bot, not a user (0).
    InvalidRequesterVeraid,
    /// The prospective contact is not a VeraId user id (1).
    InvalidTargetVeraid,
    /// The requester's Awala key is not RSA, or is not the sender's (2).
    InvalidRequesterAwalaKey,
}

impl FailureReason {
    /// The number carried in the failure message.
    pub fn code(self) -> u8 {
        match self {
            Self::InvalidRequesterVeraid => 0,
            Self::InvalidTargetVeraid => 1,
            Self::InvalidRequesterAwalaKey => 2,
        }
    }

    /// A stable name for logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidRequesterVeraid => "invalid_requester_veraid",
            Self::InvalidTargetVeraid => "invalid_target_veraid",
            Self::InvalidRequesterAwalaKey => "invalid_requester_awala_key",
        }
    }
}

/// A verified, well-formed `ContactPairingRequest`, before the rules.
#[derive(Debug, Clone)]
pub struct SignedRequest<'a> {
    /// The signer's VeraId (`user@organisation`), or none for an organisation's bot.
    pub signer: Option<VeraId>,
    /// The requester's Awala key as canonical RSA SPKI DER, or none if it is not an RSA
    /// key (the plaintext carried something else).
    pub requester_key: Option<Vec<u8>>,
    /// The prospective contact, as written in the plaintext.
    pub prospective_contact: &'a str,
    /// The sender of the event that carried it.
    pub sender: &'a str,
    /// The bundle: what the prospective contact receives on a match.
    pub bundle: &'a [u8],
}

/// What the rules make of a verified request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// A request to store or match.
    Request(PairingRequest),
    /// A failure message to the sender.
    Failure(FailureReason),
    /// Refused without a message.
    Refused(Refusal),
}

/// Applies letro-server's checks in its order: a bot signer (0), then the key (2), then
/// the prospective contact (1); then self-pairing, refused without a message (the
/// original matched such a request with itself).
pub fn judge(request: SignedRequest<'_>) -> Verdict {
    let Some(requester) = request.signer else {
        return Verdict::Failure(FailureReason::InvalidRequesterVeraid);
    };
    let Some(key) = request.requester_key else {
        return Verdict::Failure(FailureReason::InvalidRequesterAwalaKey);
    };
    let endpoint_id = EndpointId::from_spki_der(&key);
    if endpoint_id.as_str() != request.sender {
        return Verdict::Failure(FailureReason::InvalidRequesterAwalaKey);
    }
    let Ok(target) = parse_user_id(request.prospective_contact) else {
        return Verdict::Failure(FailureReason::InvalidTargetVeraid);
    };
    if target == requester {
        return Verdict::Refused(Refusal::SelfPairing);
    }
    Verdict::Request(PairingRequest {
        requester,
        target,
        endpoint_id,
        offer: Offer {
            protocol: Protocol::Signed,
            bytes: request.bundle.to_vec(),
        },
    })
}

/// Why a prospective contact is not a VeraId user id (letro-server's
/// `isValidVeraidIdForUser`, veraid.md §9).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotAUserId(pub &'static str);

/// The longest prospective contact taken, in bytes (a domain is at most 253 octets; a
/// user name of a few hundred is already absurd).
const MAX_USER_ID_BYTES: usize = 1024;

/// Parses a prospective contact as letro-server does: `user@domain`, a user name
/// without `@`, tab or line breaks (spaces, commas, any Unicode allowed), and a domain
/// that `is-valid-domain` 0.1.6 accepts with Unicode allowed.
pub fn parse_user_id(s: &str) -> Result<VeraId, NotAUserId> {
    if s.len() > MAX_USER_ID_BYTES {
        return Err(NotAUserId("too long"));
    }
    let (user, domain) = s.split_once('@').ok_or(NotAUserId("no '@'"))?;
    if user.is_empty() {
        return Err(NotAUserId("empty user name"));
    }
    // `^([^@]+)@(.+[^\\.])$`: a domain of two characters or more, not ending in `.` or `\`.
    if domain.chars().count() < 2 || domain.ends_with(['.', '\\']) {
        return Err(NotAUserId("domain too short or ends with '.'"));
    }
    if user.contains(['\t', '\r', '\n']) {
        return Err(NotAUserId("user name with a tab or line break"));
    }
    valid_domain(domain)?;
    Ok(VeraId::from_verified(s))
}

/// `is-valid-domain` 0.1.6 with `allowUnicode` (veraid.md §9): lower-cased, each
/// non-ASCII label in punycode, then the ASCII rules.
fn valid_domain(domain: &str) -> Result<(), NotAUserId> {
    let lower = domain.to_lowercase();
    let labels = lower
        .split('.')
        .map(|label| {
            if label.is_ascii() {
                Some(label.to_owned())
            } else {
                punycode(label).map(|p| format!("xn--{p}"))
            }
        })
        .collect::<Option<Vec<String>>>()
        .ok_or(NotAUserId("label not encodable"))?;
    let ascii = labels.join(".");
    if ascii.len() > 253 {
        return Err(NotAUserId("domain too long"));
    }
    if !ascii
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b))
    {
        return Err(NotAUserId("forbidden character in domain"));
    }
    let [rest @ .., sld, tld] = &labels[..] else {
        return Err(NotAUserId("domain needs two labels"));
    };
    let tld_ok = tld.starts_with("xn--")
        || (!tld.is_empty()
            && tld.bytes().all(|b| b.is_ascii_alphanumeric())
            && !tld.bytes().all(|b| b.is_ascii_digit()));
    if !tld_ok {
        return Err(NotAUserId("top-level domain"));
    }
    let label_ok = |l: &str| {
        (1..=63).contains(&l.len())
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    if !rest.iter().all(|l| label_ok(l)) || !label_ok(sld) {
        return Err(NotAUserId("domain label"));
    }
    if sld.contains('_') || sld.matches("--").count() != sld.matches("xn--").count() {
        return Err(NotAUserId("second-level label"));
    }
    Ok(())
}

/// RFC 3492 punycode of one label (without the `xn--` prefix), or none on overflow.
fn punycode(label: &str) -> Option<String> {
    const BASE: u32 = 36;
    const T_MIN: u32 = 1;
    const T_MAX: u32 = 26;
    const SKEW: u32 = 38;
    const DAMP: u32 = 700;
    fn digit(d: u32) -> char {
        // 0-25 are a-z, 26-35 are 0-9.
        char::from_u32(if d < 26 {
            u32::from(b'a') + d
        } else {
            u32::from(b'0') + d - 26
        })
        .unwrap_or('a')
    }
    fn adapt(mut delta: u32, points: u32, first: bool) -> u32 {
        delta /= if first { DAMP } else { 2 };
        delta += delta / points;
        let mut k = 0;
        while delta > ((BASE - T_MIN) * T_MAX) / 2 {
            delta /= BASE - T_MIN;
            k += BASE;
        }
        k + (BASE - T_MIN + 1) * delta / (delta + SKEW)
    }
    let input: Vec<u32> = label.chars().map(u32::from).collect();
    let mut output: String = label.chars().filter(char::is_ascii).collect();
    let basic = u32::try_from(output.len()).ok()?;
    if basic > 0 {
        output.push('-');
    }
    let (mut n, mut delta, mut bias, mut handled) = (128u32, 0u32, 72u32, basic);
    let total = u32::try_from(input.len()).ok()?;
    while handled < total {
        let m = input.iter().copied().filter(|&c| c >= n).min()?;
        delta = delta.checked_add((m - n).checked_mul(handled + 1)?)?;
        n = m;
        for &c in &input {
            if c < n {
                delta = delta.checked_add(1)?;
            }
            if c == n {
                let mut q = delta;
                let mut k = BASE;
                loop {
                    let t = if k <= bias {
                        T_MIN
                    } else if k >= bias + T_MAX {
                        T_MAX
                    } else {
                        k - bias
                    };
                    if q < t {
                        break;
                    }
                    output.push(digit(t + (q - t) % (BASE - t)));
                    q = (q - t) / (BASE - t);
                    k += BASE;
                }
                output.push(digit(q));
                bias = adapt(delta, handled + 1, handled == basic);
                delta = 0;
                handled += 1;
            }
        }
        delta = delta.checked_add(1)?;
        n = n.checked_add(1)?;
    }
    Some(output)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn punycode_of_rfc_3492_and_common_labels() {
        assert_eq!(punycode("münchen").as_deref(), Some("mnchen-3ya"));
        assert_eq!(punycode("bücher").as_deref(), Some("bcher-kva"));
        assert_eq!(punycode("café").as_deref(), Some("caf-dma"));
        assert_eq!(punycode("例え").as_deref(), Some("r8jz45g"));
    }

    #[test]
    fn the_vectors_targets() {
        for ok in [
            "bob@example.org",
            "bob,smith@example.org",
            "bob smith@example.org",
            "bob@münchen.example",
            "Bob@Example.ORG",
            "al🦄ice@example.com",
            "bob@sub_domain.example.org",
        ] {
            assert!(parse_user_id(ok).is_ok(), "{ok}");
        }
        for bad in [
            "example.org",
            "bob@",
            "@example.org",
            "bob@eve@example.org",
            "bob@example.org.",
            "bob@exa mple.org",
            "bob@localhost",
            "bob@exa_mple.org",
            "bob\tsmith@example.org",
            "bob\nsmith@example.org",
            "bob@example.123",
            "bob@-example.org",
            "bob@ex--ample.org",
            "bob@*.example.org",
        ] {
            assert!(parse_user_id(bad).is_err(), "{bad:?}");
        }
        assert!(parse_user_id("bob@xn--mnchen-3ya.example").is_ok());
    }

    fn request<'a>(
        signer: Option<&str>,
        key: Option<&[u8]>,
        target: &'a str,
        sender: &'a str,
    ) -> SignedRequest<'a> {
        SignedRequest {
            signer: signer.map(VeraId::from_verified),
            requester_key: key.map(<[u8]>::to_vec),
            prospective_contact: target,
            sender,
            bundle: b"bundle",
        }
    }

    #[test]
    fn the_checks_run_in_letro_servers_order() {
        let key = b"spki";
        let sender = EndpointId::from_spki_der(key).to_string();
        let other = EndpointId::from_spki_der(b"other").to_string();
        let fail = |r| Verdict::Failure(r);
        use FailureReason::*;
        assert_eq!(
            judge(request(None, None, "example.org", &other)),
            fail(InvalidRequesterVeraid)
        );
        assert_eq!(
            judge(request(Some("a@x.io"), None, "example.org", &sender)),
            fail(InvalidRequesterAwalaKey)
        );
        assert_eq!(
            judge(request(Some("a@x.io"), Some(key), "bob@y.io", &other)),
            fail(InvalidRequesterAwalaKey)
        );
        assert_eq!(
            judge(request(Some("a@x.io"), Some(key), "example.org", &sender)),
            fail(InvalidTargetVeraid)
        );
        assert_eq!(
            judge(request(Some("a@x.io"), Some(key), "a@x.io", &sender)),
            Verdict::Refused(Refusal::SelfPairing)
        );
        let Verdict::Request(r) = judge(request(Some("a@x.io"), Some(key), "Bob@Y.io", &sender))
        else {
            panic!("a request");
        };
        assert_eq!(
            (r.requester.as_str(), r.target.as_str()),
            ("a@x.io", "Bob@Y.io")
        );
        assert_eq!(r.endpoint_id.as_str(), sender);
        assert_eq!(
            r.offer,
            Offer {
                protocol: Protocol::Signed,
                bytes: b"bundle".to_vec()
            }
        );
    }
}
