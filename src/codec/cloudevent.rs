//! CloudEvents over HTTP (spec 1.0.2): binary and structured mode in, binary mode out.
//!
//! Hand-written rather than taken from the CloudEvents SDK so that status codes, size
//! limits and the percent-decoding policy stay ours (see endpoint-contract.md §13).

use std::borrow::Cow;
use std::collections::BTreeMap;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use percent_encoding::percent_decode;

use super::timestamp::format_rfc3339;
use crate::domain::OutgoingMessage;

/// `type` of the events the Awala Internet Endpoint sends us.
pub const INCOMING_TYPE: &str = "tech.relaycorp.awala.endpoint-internet.incoming-service-message";
/// `type` of the events we send to the Awala Internet Endpoint.
pub const OUTGOING_TYPE: &str = "tech.relaycorp.awala.endpoint-internet.outgoing-service-message";

/// A decoded CloudEvent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloudEvent {
    /// `id`: for Awala, the parcel id.
    pub id: String,
    /// `source`: for Awala, the sender's endpoint id.
    pub source: String,
    /// `type`.
    pub ty: String,
    /// `subject`: for Awala, the recipient (this server's) endpoint id.
    pub subject: Option<String>,
    /// `datacontenttype`: for Awala, the service message type.
    pub data_content_type: Option<String>,
    /// `time`, as received (advisory).
    pub time: Option<String>,
    /// Every other attribute, by name.
    pub extensions: BTreeMap<String, String>,
    /// The data: for Awala, the service message content.
    pub data: Vec<u8>,
}

/// Why an HTTP request is not a CloudEvent we can read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Batch mode was not asked for, so it must not be used.
    #[error("batch mode is not supported")]
    Batch,
    /// A structured-mode format other than JSON.
    #[error("unsupported event format {0}")]
    Format(String),
    /// A required attribute is absent or empty.
    #[error("missing attribute {0}")]
    Missing(&'static str),
    /// Only CloudEvents 1.0 is supported.
    #[error("unsupported specversion")]
    SpecVersion,
    /// An attribute was given twice, so we cannot know which one is meant.
    #[error("attribute {0} appears more than once")]
    Duplicate(String),
    /// An attribute value is not text.
    #[error("attribute {0} is not valid text")]
    Invalid(String),
    /// A structured-mode body that is not a valid JSON event.
    #[error("malformed structured event: {0}")]
    Structured(String),
    /// An attribute is longer than any real one ([`ATTRIBUTE_LIMITS`]).
    #[error("attribute {attribute} is {len} bytes, over the limit of {limit}")]
    TooLong {
        /// The attribute's name.
        attribute: &'static str,
        /// Its length in bytes, once percent-decoded.
        len: usize,
        /// The most it may have.
        limit: usize,
    },
}

/// The longest value taken for each core attribute, in bytes once percent-decoded; a
/// longer one is refused (400). Each is a margin of about four times over real values:
/// a parcel id is at most 64 printable ASCII characters (RAMF; on GCP `ce-id` is a
/// Pub/Sub message id, about 20 digits), an endpoint id (`ce-source`, `ce-subject`) 65,
/// the event type 63, a Letro content type under 70, a time 24. Without a bound, a
/// sender could make the server keep (an event key lives 90 days) and log whatever it
/// likes.
pub const ATTRIBUTE_LIMITS: [(&str, usize); 7] = [
    ("specversion", 16),
    ("id", 256),
    ("source", 256),
    ("type", 256),
    ("subject", 256),
    ("datacontenttype", 256),
    ("time", 64),
];

/// The longest extension value kept, and the longest extension name. Extensions are
/// never used, so one beyond these is ignored like any unknown one, not refused: a
/// broker may add its own (Knative's `knativeerrordata` holds up to 1024 characters).
pub const EXTENSION_LIMITS: (usize, usize) = (64, 4096);

const CORE: [&str; 7] = [
    "specversion",
    "id",
    "source",
    "type",
    "subject",
    "time",
    "datacontenttype",
];

/// The attributes of an event being decoded: the core ones in slots of their own (no
/// name copied, no map node: this runs for every request), the others by name.
#[derive(Default)]
struct Attributes {
    /// By position in [`CORE`].
    core: [Option<String>; 7],
    extensions: BTreeMap<String, String>,
}

impl Attributes {
    fn slot(name: &str) -> Option<usize> {
        CORE.iter().position(|core| *core == name)
    }

    fn contains(&self, name: &str) -> bool {
        match Self::slot(name) {
            Some(i) => self.core[i].is_some(),
            None => self.extensions.contains_key(name),
        }
    }

    fn insert(&mut self, name: &str, value: String) {
        match Self::slot(name) {
            Some(i) => self.core[i] = Some(value),
            None => {
                self.extensions.insert(name.to_owned(), value);
            }
        }
    }

    fn get(&self, core: &str) -> Option<&String> {
        Self::slot(core).and_then(|i| self.core[i].as_ref())
    }

    fn remove(&mut self, core: &str) -> Option<String> {
        Self::slot(core).and_then(|i| self.core[i].take())
    }
}

/// Decodes an HTTP request into a CloudEvent. `headers` are (name, raw value) pairs in
/// the order received; names are compared case-insensitively.
pub fn decode_http<'a>(
    headers: impl IntoIterator<Item = (&'a str, &'a [u8])>,
    body: Vec<u8>,
) -> Result<CloudEvent, DecodeError> {
    let mut content_type: Option<String> = None;
    let mut attrs = Attributes::default();
    for (name, raw) in headers {
        // HTTP/1 and hyper give lower-case names already: copied only when they are not.
        let name: Cow<'_, str> = if name.bytes().any(|b| b.is_ascii_uppercase()) {
            name.to_ascii_lowercase().into()
        } else {
            name.into()
        };
        if name == "content-type" {
            let value =
                header_text(raw).ok_or_else(|| DecodeError::Invalid(name.clone().into_owned()))?;
            if content_type.replace(value).is_some() {
                return Err(DecodeError::Duplicate(name.into_owned()));
            }
        } else if let Some(attr) = name.strip_prefix("ce-") {
            let Some(value) = header_text(raw) else {
                if CORE.contains(&attr) {
                    return Err(DecodeError::Invalid(attr.to_owned()));
                }
                // An unreadable extension we do not use is ignored, like any other.
                continue;
            };
            if attrs.contains(attr) {
                if CORE.contains(&attr) {
                    return Err(DecodeError::Duplicate(attr.to_owned()));
                }
                continue;
            }
            attrs.insert(attr, value);
        }
    }
    let ct = content_type.as_deref().unwrap_or_default();
    if starts_with_ignore_case(ct, "application/cloudevents-batch") {
        Err(DecodeError::Batch)
    } else if starts_with_ignore_case(ct, "application/cloudevents") {
        let format = ct.split(';').next().unwrap_or(ct).trim();
        if format.eq_ignore_ascii_case("application/cloudevents+json") {
            decode_structured(&body)
        } else {
            Err(DecodeError::Format(format.to_ascii_lowercase()))
        }
    } else {
        // Binary mode: the attributes are in the headers.
        attrs.remove("datacontenttype");
        from_attributes(attrs, content_type, body)
    }
}

fn starts_with_ignore_case(s: &str, prefix: &str) -> bool {
    s.as_bytes()
        .get(..prefix.len())
        .is_some_and(|head| head.eq_ignore_ascii_case(prefix.as_bytes()))
}

/// A header value as text: percent-decoded once as the HTTP binding says, falling back to
/// the raw value when decoding does not give UTF-8 (no peer of ours encodes, and a
/// sender-chosen parcel id may contain `%`). `None` if even the raw value is not text.
fn header_text(raw: &[u8]) -> Option<String> {
    if let Ok(decoded) = percent_decode(raw).decode_utf8() {
        return Some(decoded.into_owned());
    }
    std::str::from_utf8(raw).ok().map(str::to_owned)
}

fn from_attributes(
    mut attrs: Attributes,
    content_type: Option<String>,
    data: Vec<u8>,
) -> Result<CloudEvent, DecodeError> {
    for (attribute, limit) in ATTRIBUTE_LIMITS {
        let value = if attribute == "datacontenttype" {
            content_type.as_ref()
        } else {
            attrs.get(attribute)
        };
        if let Some(len) = value.map(String::len).filter(|len| *len > limit) {
            return Err(DecodeError::TooLong {
                attribute,
                len,
                limit,
            });
        }
    }
    let (name_limit, value_limit) = EXTENSION_LIMITS;
    attrs
        .extensions
        .retain(|name, value| name.len() <= name_limit && value.len() <= value_limit);
    let spec_version = attrs
        .remove("specversion")
        .ok_or(DecodeError::Missing("specversion"))?;
    if spec_version != "1.0" {
        return Err(DecodeError::SpecVersion);
    }
    let mut required = |name: &'static str| {
        attrs
            .remove(name)
            .filter(|v| !v.is_empty())
            .ok_or(DecodeError::Missing(name))
    };
    let id = required("id")?;
    let source = required("source")?;
    let ty = required("type")?;
    let subject = attrs.remove("subject").filter(|v| !v.is_empty());
    let time = attrs.remove("time");
    // Control characters (a percent-encoded or JSON-escaped newline) have no business in
    // these attributes, and would let a sender forge lines in text logs, which quote them.
    let named = [
        ("id", Some(&id)),
        ("source", Some(&source)),
        ("type", Some(&ty)),
        ("subject", subject.as_ref()),
        ("time", time.as_ref()),
        ("datacontenttype", content_type.as_ref()),
    ];
    for (name, value) in named {
        if value.is_some_and(|v| v.chars().any(char::is_control)) {
            return Err(DecodeError::Invalid(name.to_owned()));
        }
    }
    Ok(CloudEvent {
        id,
        source,
        ty,
        subject,
        data_content_type: content_type.filter(|v| !v.is_empty()),
        time,
        extensions: attrs.extensions,
        data,
    })
}

fn decode_structured(body: &[u8]) -> Result<CloudEvent, DecodeError> {
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| DecodeError::Structured(e.to_string()))?;
    let serde_json::Value::Object(object) = value else {
        return Err(DecodeError::Structured("not a JSON object".into()));
    };
    let mut attrs = Attributes::default();
    let mut data = None;
    let mut data_base64 = None;
    for (name, value) in object {
        match (name.as_str(), value) {
            ("data", serde_json::Value::String(s)) => data = Some(s.into_bytes()),
            ("data", serde_json::Value::Null) => {}
            ("data", other) => data = Some(other.to_string().into_bytes()),
            ("data_base64", serde_json::Value::String(s)) => {
                let bytes = STANDARD
                    .decode(s)
                    .map_err(|_| DecodeError::Structured("data_base64 is not base64".into()))?;
                data_base64 = Some(bytes);
            }
            (_, serde_json::Value::String(s)) => attrs.insert(&name, s),
            (_, serde_json::Value::Null) => {}
            (_, serde_json::Value::Number(n)) if !CORE.contains(&name.as_str()) => {
                attrs.insert(&name, n.to_string());
            }
            (_, serde_json::Value::Bool(b)) if !CORE.contains(&name.as_str()) => {
                attrs.insert(&name, b.to_string());
            }
            (_, _) => return Err(DecodeError::Invalid(name)),
        }
    }
    let data = match (data, data_base64) {
        (Some(_), Some(_)) => {
            return Err(DecodeError::Structured(
                "both data and data_base64 are present".into(),
            ));
        }
        (Some(d), None) | (None, Some(d)) => d,
        (None, None) => Vec::new(),
    };
    let content_type = attrs.remove("datacontenttype");
    from_attributes(attrs, content_type, data)
}

/// The headers of `message` as a binary-mode CloudEvent, plus the `K_CE_OVERRIDES`
/// extensions. Every `ce-` value is printable ASCII without space, `"` or `%`, so no
/// percent-encoding is needed; `content-type` is a plain header value (it may hold
/// spaces, as parameters do), checked by the store before a message is delivered.
pub fn encode_binary_headers(
    message: &OutgoingMessage,
    overrides: &[(String, String)],
) -> Vec<(Cow<'static, str>, String)> {
    // Names borrowed: one delivery per request at full load, and each owned name was an
    // allocation and, at the sink client, a copy.
    let mut headers = Vec::with_capacity(8 + overrides.len());
    headers.extend([
        (Cow::Borrowed("ce-specversion"), "1.0".to_owned()),
        (Cow::Borrowed("ce-id"), message.id.as_str().to_owned()),
        (Cow::Borrowed("ce-type"), OUTGOING_TYPE.to_owned()),
        (Cow::Borrowed("ce-source"), message.source.clone()),
        (
            Cow::Borrowed("ce-subject"),
            message.recipient.as_str().to_owned(),
        ),
        (Cow::Borrowed("ce-time"), format_rfc3339(message.time)),
        (Cow::Borrowed("ce-expiry"), format_rfc3339(message.expiry)),
        (Cow::Borrowed("content-type"), message.content_type.clone()),
    ]);
    for (name, value) in overrides {
        // Overrides may add extensions, never replace the attributes above.
        let header = format!("ce-{name}");
        if !headers.iter().any(|(h, _)| *h == header) {
            headers.push((Cow::Owned(header), value.clone()));
        }
    }
    headers
}

/// Whether `s` can be sent as a plain HTTP header value, such as `Content-Type` (which,
/// unlike the `ce-` attributes, may hold spaces: `text/plain; charset=utf-8`).
pub fn is_header_value(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 1024
        && s.bytes()
            .all(|b| b == b' ' || b == b'\t' || (0x21..=0x7e).contains(&b))
}

/// Whether `s` can be sent as a header value without percent-encoding.
pub fn is_header_safe(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 1024
        && s.bytes()
            .all(|b| (0x21..=0x7e).contains(&b) && b != b'"' && b != b'%')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{EndpointId, MessageId, MessageKind, Timestamp};
    use proptest::prelude::*;

    fn binary(headers: &[(&str, &str)], body: &[u8]) -> Result<CloudEvent, DecodeError> {
        decode_http(
            headers.iter().map(|(n, v)| (*n, v.as_bytes())),
            body.to_vec(),
        )
    }

    const BASE: [(&str, &str); 6] = [
        ("ce-specversion", "1.0"),
        ("ce-id", "parcel-1"),
        ("ce-source", "0abc"),
        ("ce-type", INCOMING_TYPE),
        ("ce-subject", "0def"),
        ("content-type", "application/x"),
    ];

    #[test]
    fn every_limited_attribute_has_a_slot() {
        // A limited name without a slot would never be found, so never checked.
        for (name, _) in ATTRIBUTE_LIMITS {
            assert!(Attributes::slot(name).is_some(), "{name}");
        }
        assert_eq!(ATTRIBUTE_LIMITS.len(), CORE.len());
    }

    #[test]
    fn binary_mode() {
        let mut h = BASE.to_vec();
        h.push(("ce-expiry", "2026-01-01T00:00:00.000Z"));
        h.push(("ce-knativearrivaltime", "x"));
        h.push(("traceparent", "00-abc"));
        let e = binary(&h, b"body").expect("valid");
        assert_eq!(e.id, "parcel-1");
        assert_eq!(e.source, "0abc");
        assert_eq!(e.ty, INCOMING_TYPE);
        assert_eq!(e.subject.as_deref(), Some("0def"));
        assert_eq!(e.data_content_type.as_deref(), Some("application/x"));
        assert_eq!(
            e.extensions.get("expiry").map(String::as_str),
            Some("2026-01-01T00:00:00.000Z")
        );
        assert_eq!(e.data, b"body");
    }

    #[test]
    fn header_names_are_case_insensitive() {
        let h: Vec<(String, &str)> = BASE.iter().map(|(n, v)| (n.to_uppercase(), *v)).collect();
        let e =
            decode_http(h.iter().map(|(n, v)| (n.as_str(), v.as_bytes())), vec![]).expect("valid");
        assert_eq!(e.id, "parcel-1");
    }

    #[test]
    fn required_attributes() {
        for missing in ["ce-specversion", "ce-id", "ce-source", "ce-type"] {
            let h: Vec<_> = BASE
                .iter()
                .copied()
                .filter(|(n, _)| *n != missing)
                .collect();
            assert!(
                matches!(binary(&h, b""), Err(DecodeError::Missing(_))),
                "{missing}"
            );
        }
        let mut h = BASE.to_vec();
        h[1] = ("ce-id", "");
        assert_eq!(binary(&h, b""), Err(DecodeError::Missing("id")));
        h = BASE.to_vec();
        h[0] = ("ce-specversion", "0.3");
        assert_eq!(binary(&h, b""), Err(DecodeError::SpecVersion));
        // Subject and content type are optional for CloudEvents; the ingress decides.
        let h: Vec<_> = BASE
            .iter()
            .copied()
            .filter(|(n, _)| n.starts_with("ce-") && *n != "ce-subject")
            .collect();
        let e = binary(&h, b"").expect("valid");
        assert_eq!((e.subject, e.data_content_type), (None, None));
    }

    #[test]
    fn duplicates_of_core_attributes_are_refused_and_of_extensions_ignored() {
        let mut h = BASE.to_vec();
        h.push(("ce-id", "parcel-2"));
        assert_eq!(binary(&h, b""), Err(DecodeError::Duplicate("id".into())));
        let mut h = BASE.to_vec();
        h.push(("content-type", "application/y"));
        assert!(matches!(binary(&h, b""), Err(DecodeError::Duplicate(_))));
        let mut h = BASE.to_vec();
        h.push(("ce-foo", "1"));
        h.push(("ce-foo", "2"));
        assert_eq!(binary(&h, b"").expect("valid").extensions["foo"], "1");
    }

    #[test]
    fn control_characters_in_attributes_are_refused() {
        let mut h = BASE.to_vec();
        h[1] = ("ce-id", "p-1%0A2026-11-28T00:00:00Z  INFO forged");
        assert_eq!(binary(&h, b""), Err(DecodeError::Invalid("id".into())));
        let mut h = BASE.to_vec();
        h[2] = ("ce-source", "0abc%09");
        assert_eq!(binary(&h, b""), Err(DecodeError::Invalid("source".into())));
        let structured = format!(
            r#"{{"specversion":"1.0","id":"a\nb","source":"0abc","type":"{INCOMING_TYPE}"}}"#
        );
        let e = decode_http(
            [("content-type", &b"application/cloudevents+json"[..])],
            structured.into_bytes(),
        );
        assert_eq!(e, Err(DecodeError::Invalid("id".into())));
    }

    #[test]
    fn over_long_attributes_are_refused_and_over_long_extensions_ignored() {
        for (attribute, limit) in ATTRIBUTE_LIMITS {
            let header = if attribute == "datacontenttype" {
                "content-type".to_owned()
            } else {
                format!("ce-{attribute}")
            };
            let over = "a".repeat(limit + 1);
            let mut h: Vec<(&str, &str)> =
                BASE.iter().copied().filter(|(n, _)| *n != header).collect();
            h.push((&header, &over));
            assert_eq!(
                binary(&h, b""),
                Err(DecodeError::TooLong {
                    attribute,
                    len: limit + 1,
                    limit
                }),
                "{attribute}"
            );
        }
        // At the limit, and measured once percent-decoded (`%41` is one byte).
        let mut h = BASE.to_vec();
        let at_limit = "p".repeat(256);
        h[1] = ("ce-id", &at_limit);
        assert_eq!(binary(&h, b"").expect("valid").id, at_limit);
        let encoded = "%41".repeat(256);
        h[1] = ("ce-id", &encoded);
        assert_eq!(binary(&h, b"").expect("valid").id, "A".repeat(256));
        // Structured mode has the same limits.
        let structured = serde_json::json!({
            "specversion": "1.0", "id": "p", "source": "s".repeat(257), "type": "t",
        });
        assert!(matches!(
            binary(
                &[("content-type", "application/cloudevents+json")],
                structured.to_string().as_bytes()
            ),
            Err(DecodeError::TooLong {
                attribute: "source",
                ..
            })
        ));
        // Extensions beyond their limits are dropped; the event is taken.
        let (name_limit, value_limit) = EXTENSION_LIMITS;
        let long_name = format!("ce-{}", "n".repeat(name_limit + 1));
        let long_value = "v".repeat(value_limit + 1);
        let mut h = BASE.to_vec();
        h.push((&long_name, "1"));
        h.push(("ce-big", &long_value));
        h.push(("ce-small", "1"));
        let e = binary(&h, b"").expect("valid");
        assert_eq!(e.extensions.keys().collect::<Vec<_>>(), ["small"]);
    }

    #[test]
    fn percent_decoding_with_raw_fallback() {
        let mut h = BASE.to_vec();
        h[1] = ("ce-id", "a%20b");
        assert_eq!(binary(&h, b"").expect("valid").id, "a b");
        h[1] = ("ce-id", "100%");
        assert_eq!(binary(&h, b"").expect("valid").id, "100%");
        h[1] = ("ce-id", "x%C0%AFy");
        assert_eq!(
            binary(&h, b"").expect("valid").id,
            "x%C0%AFy",
            "overlong UTF-8 is not decoded"
        );
        let e = decode_http(
            BASE.iter().map(|(n, v)| {
                (
                    *n,
                    if *n == "ce-id" {
                        &b"\xff"[..]
                    } else {
                        v.as_bytes()
                    },
                )
            }),
            vec![],
        );
        assert_eq!(e, Err(DecodeError::Invalid("id".into())));
    }

    #[test]
    fn structured_mode() {
        let body = serde_json::json!({
            "specversion": "1.0", "id": "p", "source": "0abc", "type": INCOMING_TYPE,
            "subject": "0def", "datacontenttype": "application/x",
            "data_base64": "aGVsbG8=", "expiry": "2026-01-01T00:00:00Z", "n": 3
        });
        let e = binary(
            &[(
                "content-type",
                "application/cloudevents+json; charset=utf-8",
            )],
            body.to_string().as_bytes(),
        )
        .expect("valid");
        assert_eq!(e.data, b"hello");
        assert_eq!(e.data_content_type.as_deref(), Some("application/x"));
        assert_eq!(e.subject.as_deref(), Some("0def"));
        assert_eq!(e.extensions["n"], "3");
        let text = serde_json::json!({"specversion": "1.0", "id": "p", "source": "s", "type": "t", "data": "hi"});
        let e = binary(
            &[("content-type", "application/cloudevents+json")],
            text.to_string().as_bytes(),
        )
        .expect("valid");
        assert_eq!(e.data, b"hi");
    }

    #[test]
    fn structured_mode_errors() {
        let ct = [("content-type", "application/cloudevents+json")];
        assert!(matches!(binary(&ct, b"{"), Err(DecodeError::Structured(_))));
        assert!(matches!(
            binary(&ct, b"[]"),
            Err(DecodeError::Structured(_))
        ));
        let bad_b64 = serde_json::json!({"specversion": "1.0", "id": "p", "source": "s", "type": "t", "data_base64": "!!"});
        assert!(matches!(
            binary(&ct, bad_b64.to_string().as_bytes()),
            Err(DecodeError::Structured(_))
        ));
        let numeric_id =
            serde_json::json!({"specversion": "1.0", "id": 1, "source": "s", "type": "t"});
        assert_eq!(
            binary(&ct, numeric_id.to_string().as_bytes()),
            Err(DecodeError::Invalid("id".into()))
        );
        assert_eq!(
            binary(
                &[("content-type", "application/cloudevents-batch+json")],
                b"[]"
            ),
            Err(DecodeError::Batch)
        );
        assert!(matches!(
            binary(&[("content-type", "application/cloudevents+avro")], b""),
            Err(DecodeError::Format(_))
        ));
    }

    #[test]
    fn outgoing_headers() {
        let m = OutgoingMessage {
            id: MessageId::from_stored("a".repeat(64)),
            source: "0server".into(),
            recipient: EndpointId::from_spki_der(b"r"),
            kind: MessageKind::PAIRING_MATCH,
            content_type: "application/vnd.relaycorp.letro.pairing-match-tmp".into(),
            content: vec![],
            time: Timestamp(0),
            expiry: Timestamp(1000),
        };
        let h = encode_binary_headers(
            &m,
            &[("foo".into(), "bar".into()), ("id".into(), "evil".into())],
        );
        let get = |n: &str| h.iter().find(|(k, _)| k == n).map(|(_, v)| v.as_str());
        assert_eq!(get("ce-id"), Some("a".repeat(64).as_str()));
        assert_eq!(get("ce-type"), Some(OUTGOING_TYPE));
        assert_eq!(get("ce-source"), Some("0server"));
        assert_eq!(get("ce-time"), Some("1970-01-01T00:00:00.000Z"));
        assert_eq!(get("ce-expiry"), Some("1970-01-01T00:00:01.000Z"));
        assert_eq!(get("ce-foo"), Some("bar"));
        assert_eq!(
            get("content-type"),
            Some("application/vnd.relaycorp.letro.pairing-match-tmp")
        );
        assert_eq!(h.iter().filter(|(k, _)| k == "ce-id").count(), 1);
        // The sink client makes header names of borrowed ones without checking them.
        assert!(h.iter().all(|(k, _)| {
            !k.is_empty() && k.bytes().all(|b| b.is_ascii_lowercase() || b == b'-')
        }));
        assert!(h.iter().all(|(_, v)| is_header_safe(v)));
    }

    proptest! {
        #[test]
        fn binary_round_trip(id in "[!-~]{1,64}", source in "[0-9a-f]{1,65}", body in proptest::collection::vec(any::<u8>(), 0..64)) {
            prop_assume!(!id.contains('%'));
            let h = [("ce-specversion", "1.0"), ("ce-id", id.as_str()), ("ce-source", source.as_str()), ("ce-type", "t"), ("content-type", "a/b")];
            let e = binary(&h, &body).expect("valid");
            prop_assert_eq!(e.id, id);
            prop_assert_eq!(e.source, source);
            prop_assert_eq!(e.data, body);
        }

        #[test]
        fn decode_never_panics(
            headers in proptest::collection::vec(("(ce-)?[a-z]{0,12}", proptest::collection::vec(any::<u8>(), 0..20)), 0..10),
            body in proptest::collection::vec(any::<u8>(), 0..200),
            structured in any::<bool>(),
        ) {
            let mut h: Vec<(&str, &[u8])> = headers.iter().map(|(n, v)| (n.as_str(), v.as_slice())).collect();
            if structured {
                h.push(("content-type", b"application/cloudevents+json"));
            }
            let _ = decode_http(h, body);
        }
    }
}
