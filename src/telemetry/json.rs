//! JSON log lines: one object per line, written straight into one buffer.
//!
//! At full load every request logs one line inside one span, so this is on the hot path:
//! building a JSON map and printing it cost a tenth of the server's time per request, and
//! after that, storing span fields as JSON text that each line parsed back, and each
//! `%`-field formatted into a `String` of its own before being escaped, still cost about
//! 3% of the server's CPU. Here nothing is parsed and values are escaped as they are
//! formatted.

use std::fmt::Write as _;

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::field::{MakeVisitor, VisitFmt, VisitOutput};
use tracing_subscriber::fmt::format::{FormatEvent, Writer};
use tracing_subscriber::fmt::{FmtContext, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

use crate::codec::timestamp::format_rfc3339_micros;

/// One JSON object per line, with the names log platforms index: `timestamp`,
/// `severity` (Cloud Logging's name; `level` too, for the others), `message`, `module`,
/// then the event's fields and the fields of the spans it is in (such as `request_id`),
/// all at the top level.
pub(super) struct JsonLine;

impl<S> FormatEvent<S, SpanFields> for JsonLine
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, SpanFields>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        // Highest priority first: the fixed keys, which nothing may overwrite; then the
        // event's fields; then span fields, innermost span first. A key already written
        // is skipped.
        // Room for a typical line and its keys, so that neither grows while it is written.
        let mut line = JsonObject {
            buf: Vec::with_capacity(512),
            keys: Vec::with_capacity(16),
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX));
        let level = event.metadata().level();
        let severity = match *level {
            Level::ERROR => "ERROR",
            Level::WARN => "WARNING",
            Level::INFO => "INFO",
            Level::DEBUG | Level::TRACE => "DEBUG",
        };
        line.str("timestamp", &format_rfc3339_micros(now));
        line.str("severity", severity);
        line.str("level", level.as_str());
        // `module`, not tracing's usual `target`: events have a `target` field of their
        // own (a pairing request's target digest).
        line.str("module", event.metadata().target());
        let mut fields = Json(line);
        event.record(&mut fields);
        let Json(mut line) = fields;
        if let Some(scope) = ctx.event_scope() {
            for span in scope {
                let extensions = span.extensions();
                if let Some(fields) = extensions.get::<FormattedFields<SpanFields>>() {
                    for (key, value) in span_entries(fields) {
                        line.raw(key, value);
                    }
                }
            }
        }
        writer.write_str(line.finish())?;
        writer.write_char('\n')
    }
}

/// How span fields are kept between a span's creation and the lines logged inside it:
/// one entry per field, `key` TAB `JSON value` NEWLINE, so that a line copies the value
/// as it is. Keys are field names (Rust identifiers, never a tab or a newline) and a JSON
/// value never holds a raw newline or tab, so the separators are unambiguous.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct SpanFields;

impl<'a> MakeVisitor<Writer<'a>> for SpanFields {
    type Visitor = Json<SpanEntries<'a>>;

    fn make_visitor(&self, target: Writer<'a>) -> Self::Visitor {
        Json(SpanEntries {
            writer: target,
            value: Vec::new(),
            result: Ok(()),
        })
    }
}

/// Writes a span's fields as [`SpanFields`] entries.
pub(super) struct SpanEntries<'a> {
    writer: Writer<'a>,
    value: Vec<u8>,
    result: std::fmt::Result,
}

impl JsonFields for SpanEntries<'_> {
    fn field(&mut self, field: &Field, write: impl FnOnce(&mut Vec<u8>)) {
        self.value.clear();
        write(&mut self.value);
        // Both halves are UTF-8: a field name, and JSON written from `str`s.
        let value = std::str::from_utf8(&self.value).unwrap_or("null");
        if self.result.is_ok() {
            self.result = writeln!(self.writer, "{}\t{value}", field.name());
        }
    }
}

impl VisitOutput<std::fmt::Result> for Json<SpanEntries<'_>> {
    fn finish(self) -> std::fmt::Result {
        self.0.result
    }
}

impl VisitFmt for Json<SpanEntries<'_>> {
    fn writer(&mut self) -> &mut dyn std::fmt::Write {
        &mut self.0.writer
    }
}

/// The (key, JSON value) entries of a span's [`SpanFields`] text. A span's later
/// `record` calls append after a space (`FormatFields::add_fields`), hence the trim.
fn span_entries(fields: &str) -> impl Iterator<Item = (&str, &str)> {
    fields
        .split('\n')
        .filter_map(|entry| entry.trim_start_matches(' ').split_once('\t'))
}

/// A JSON object written as fields arrive; the first value given for a key is kept.
#[derive(Default)]
struct JsonObject {
    buf: Vec<u8>,
    /// Where each key's text (escaped, without quotes) is in `buf`.
    keys: Vec<std::ops::Range<usize>>,
}

impl JsonObject {
    /// Starts `key`, unless it is already in; false if it is.
    fn key(&mut self, key: &str) -> bool {
        let mut escaped = Vec::new();
        let text = if key.bytes().all(plain) {
            key.as_bytes()
        } else {
            escape_into(&mut escaped, key);
            &escaped
        };
        if self.keys.iter().any(|k| &self.buf[k.clone()] == text) {
            return false;
        }
        self.buf.push(if self.buf.is_empty() { b'{' } else { b',' });
        self.buf.push(b'"');
        let start = self.buf.len();
        self.buf.extend_from_slice(text);
        self.keys.push(start..self.buf.len());
        self.buf.extend_from_slice(b"\":");
        true
    }

    fn str(&mut self, key: &str, value: &str) {
        if self.key(key) {
            push_str(&mut self.buf, value);
        }
    }

    /// `value` is JSON already.
    fn raw(&mut self, key: &str, value: &str) {
        if self.key(key) {
            self.buf.extend_from_slice(value.as_bytes());
        }
    }

    fn finish(&mut self) -> &str {
        if self.buf.is_empty() {
            self.buf.push(b'{');
        }
        self.buf.push(b'}');
        // Keys and values were written from `str`s, escaped byte by byte only below 0x80.
        std::str::from_utf8(&self.buf).unwrap_or("{}")
    }
}

impl JsonFields for JsonObject {
    fn field(&mut self, field: &Field, write: impl FnOnce(&mut Vec<u8>)) {
        if self.key(field.name()) {
            write(&mut self.buf);
        }
    }
}

/// Where field values are written as JSON, field by field: a line, or a span's entries.
trait JsonFields {
    /// Writes `field`, whose value `write` appends as JSON.
    fn field(&mut self, field: &Field, write: impl FnOnce(&mut Vec<u8>));
}

/// The visitor of fields, for either kind of [`JsonFields`]: each kind of value written
/// as JSON.
pub(super) struct Json<F>(F);

impl<F: JsonFields> Visit for Json<F> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.field(field, |buf| push_debug(buf, value));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.field(field, |buf| push_str(buf, value));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.field(field, |buf| push_display(buf, value));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.field(field, |buf| push_display(buf, value));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.field(field, |buf| push_display(buf, value));
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.field(field, |buf| push_f64(buf, value));
    }
}

/// Appends `value` as a JSON string.
fn push_str(buf: &mut Vec<u8>, value: &str) {
    buf.push(b'"');
    escape_into(buf, value);
    buf.push(b'"');
}

/// Appends what `value`'s `Debug` (for a `%` field, its `Display`) writes, as a JSON
/// string, escaping as it is written rather than collecting it first.
fn push_debug(buf: &mut Vec<u8>, value: &dyn std::fmt::Debug) {
    buf.push(b'"');
    let _ = write!(Escaping(buf), "{value:?}");
    buf.push(b'"');
}

fn push_display(buf: &mut Vec<u8>, value: impl std::fmt::Display) {
    let _ = write!(Bytes(buf), "{value}");
}

/// JSON has no NaN or infinity: those are written `null`, as serde_json does.
fn push_f64(buf: &mut Vec<u8>, value: f64) {
    if value.is_finite() {
        push_display(buf, value);
    } else {
        buf.extend_from_slice(b"null");
    }
}

/// The escapes of RFC 8259: quote, backslash and the control characters; the short
/// forms where JSON has them.
fn escape_into(buf: &mut Vec<u8>, value: &str) {
    let bytes = value.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        if plain(b) {
            continue;
        }
        let short = match b {
            b'"' => b'"',
            b'\\' => b'\\',
            b'\n' => b'n',
            b'\r' => b'r',
            b'\t' => b't',
            0x08 => b'b',
            0x0c => b'f',
            _ => 0,
        };
        buf.extend_from_slice(&bytes[start..i]);
        if short == 0 {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            buf.extend_from_slice(b"\\u00");
            buf.push(HEX[usize::from(b >> 4)]);
            buf.push(HEX[usize::from(b & 0xf)]);
        } else {
            buf.extend_from_slice(&[b'\\', short]);
        }
        start = i + 1;
    }
    buf.extend_from_slice(&bytes[start..]);
}

/// Whether `b` stands for itself in a JSON string: not a quote, a backslash or a control
/// character.
fn plain(b: u8) -> bool {
    b >= 0x20 && b != b'"' && b != b'\\'
}

/// A `fmt::Write` that JSON-escapes into a byte buffer.
struct Escaping<'a>(&'a mut Vec<u8>);

impl std::fmt::Write for Escaping<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        escape_into(self.0, s);
        Ok(())
    }
}

/// A `fmt::Write` into a byte buffer.
struct Bytes<'a>(&'a mut Vec<u8>);

impl std::fmt::Write for Bytes<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_log_line_keeps_the_first_value_of_a_key_and_escapes_everything() {
        let mut line = JsonObject::default();
        line.str("severity", "INFO");
        line.str("message", "quote \" newline \n tab \t");
        line.raw("attempt", "3");
        line.str("severity", "forged");
        line.raw("message", "\"forged\"");
        line.str("odd \"key\"", "first");
        line.str("odd \"key\"", "second");
        let text = line.finish().to_owned();
        assert!(!text.contains('\n'), "one line: {text}");
        let parsed: serde_json::Value = serde_json::from_str(&text).expect("JSON");
        assert_eq!(
            parsed,
            serde_json::json!({
                "severity": "INFO",
                "message": "quote \" newline \n tab \t",
                "attempt": 3,
                "odd \"key\"": "first",
            })
        );
        assert_eq!(JsonObject::default().finish(), "{}");
    }

    #[test]
    fn span_entries_survive_a_later_record() {
        let text = "request_id\t\"a\\tb\"\n count\t3\n";
        let entries: Vec<_> = span_entries(text).collect();
        assert_eq!(entries, [("request_id", "\"a\\tb\""), ("count", "3")]);
    }

    #[test]
    fn numbers_that_json_cannot_hold_are_null() {
        let mut buf = Vec::new();
        push_f64(&mut buf, f64::NAN);
        buf.push(b' ');
        push_f64(&mut buf, 1.5);
        assert_eq!(buf, b"null 1.5");
    }

    proptest! {
        /// Escaped as serde_json escapes it, whatever the text, written whole or in
        /// pieces (as `Debug` writes).
        #[test]
        fn strings_are_escaped_as_serde_json_escapes_them(text in any::<String>(), cut in any::<usize>()) {
            let mut whole = Vec::new();
            push_str(&mut whole, &text);
            prop_assert_eq!(&whole, &serde_json::to_vec(&text).expect("JSON"));
            let cut = (0..=cut % (text.len() + 1)).rev().find(|&i| text.is_char_boundary(i)).unwrap_or(0);
            let mut pieces = vec![b'"'];
            let mut escaping = Escaping(&mut pieces);
            escaping.write_str(&text[..cut]).expect("write");
            escaping.write_str(&text[cut..]).expect("write");
            pieces.push(b'"');
            prop_assert_eq!(pieces, whole);
        }
    }
}
