//! The HTTP sink: POSTs a message as a binary-mode CloudEvent to `K_SINK`.

use std::borrow::Cow;
use std::time::Duration;

use crate::codec::cloudevent::encode_binary_headers;
use crate::domain::OutgoingMessage;
use crate::telemetry::{clipped, redacted_url};

/// Why a delivery did not succeed. Every failure is retried until the message expires:
/// a broker that refuses today (4xx) may accept after an operator fixes it, and dropping
/// early would lose a match for good.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct DeliveryError {
    /// What happened, for logs and the outbox row.
    pub reason: String,
    /// The sink's `Retry-After`, if it sent one.
    pub retry_after: Option<Duration>,
    /// Whether the failure says nothing about this message and much about the sink
    /// (unreachable, timed out, 5xx, 408, 429): then every delivery pauses, not just
    /// this one, so that an outage costs a probe now and then instead of a storm.
    pub sink_down: bool,
    /// What kind of failure it was, for the `cause` label of
    /// `letro_outbox_delivery_failures_total`.
    pub cause: FailureCause,
}

/// What kind of failure a delivery met.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureCause {
    /// No connection to the sink (refused, reset, DNS).
    Unreachable,
    /// No answer within `--sink-timeout`.
    Timeout,
    /// The TLS handshake with an https sink failed: most often its certificate was
    /// refused (an unknown issuer: see `--sink-ca-file`; expired; for another name).
    Tls,
    /// A 3xx: the sink URL points at a redirect, which is never followed.
    Redirect,
    /// A 4xx.
    ClientError,
    /// A 5xx.
    ServerError,
    /// Anything else (a 1xx, a broken response).
    Other,
}

impl FailureCause {
    /// Its name in the metric's `cause` label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Unreachable => "unreachable",
            Self::Timeout => "timeout",
            Self::Tls => "tls",
            Self::Redirect => "redirect",
            Self::ClientError => "client_error",
            Self::ServerError => "server_error",
            Self::Other => "other",
        }
    }
}

/// Makes ring the process's TLS provider (reqwest is built without a default one).
/// Idempotent; must run before any `reqwest::Client` is built.
pub fn install_crypto_provider() {
    // Fails only when a provider is already installed, which is what we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Delivers messages to one sink URL.
#[derive(Debug, Clone)]
pub struct HttpSink {
    transport: Transport,
    url: reqwest::Url,
    overrides: Vec<(String, String)>,
    timeout: Duration,
}

/// How requests reach the sink.
#[derive(Debug, Clone)]
enum Transport {
    /// A plain-http sink reached directly, without credentials (the usual case: a
    /// broker in the cluster, a sidecar): hyper's pooled client, without reqwest's
    /// layers, which parse the URL twice, copy the body for a retry and wrap every
    /// request in a redirect policy that never follows (issue 17: those layers were
    /// about 8% of the server's CPU at full load).
    Plain {
        client: PlainClient,
        uri: hyper::Uri,
    },
    /// An https sink, one behind a proxy (`HTTP_PROXY`, `ALL_PROXY`), or one whose URL
    /// carries credentials: reqwest, which does TLS with the platform's roots, the proxy
    /// settings, and Basic authorisation from the URL. See [`plain_uri`].
    Full(reqwest::Client),
}

type PlainClient = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    http_body_util::Full<bytes::Bytes>,
>;

/// Most of an answer's body read, so that its connection can serve the next delivery;
/// a longer body is dropped, and the connection with it.
const ANSWER_BODY_LIMIT: usize = 64 * 1024;

/// How long an answer's body may take once its head is in (brokers answer 202 with an
/// empty body or a few bytes).
const ANSWER_BODY_WAIT: Duration = Duration::from_secs(1);

/// What the sink answered, whichever transport carried it.
struct Answer {
    status: hyper::StatusCode,
    retry_after: Option<Duration>,
    location: Option<hyper::header::HeaderValue>,
}

impl Answer {
    fn from_headers(status: hyper::StatusCode, headers: &hyper::HeaderMap) -> Self {
        let retry_after = headers
            .get(hyper::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        Self {
            status,
            retry_after,
            location: headers.get(hyper::header::LOCATION).cloned(),
        }
    }
}

impl HttpSink {
    /// A sink at `url`, giving each delivery `timeout`. An https sink's certificate must
    /// chain to one of the system's roots or of `extra_roots` (DER certificates, from
    /// `--sink-ca-file`).
    pub fn new(
        url: reqwest::Url,
        timeout: Duration,
        overrides: Vec<(String, String)>,
        extra_roots: &[Vec<u8>],
    ) -> reqwest::Result<Self> {
        install_crypto_provider();
        let connect_timeout = timeout.min(Duration::from_secs(5));
        let plain = plain_uri(&url);
        let transport = match plain {
            Some(uri) => {
                let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
                connector.set_nodelay(true);
                connector.set_connect_timeout(Some(connect_timeout));
                // As reqwest does: a connection a middlebox dropped while it sat in the
                // pool is found by the kernel, not by the next delivery's timeout.
                connector.set_keepalive(Some(Duration::from_secs(15)));
                connector.set_keepalive_interval(Some(Duration::from_secs(15)));
                connector.set_keepalive_retries(Some(3));
                let client = hyper_util::client::legacy::Client::builder(
                    hyper_util::rt::TokioExecutor::new(),
                )
                // As reqwest does: an idle connection is closed after 90 s.
                .pool_timer(hyper_util::rt::TokioTimer::new())
                .pool_idle_timeout(Duration::from_secs(90))
                .build(connector);
                Transport::Plain { client, uri }
            }
            None => Transport::Full(full_client(&url, timeout, connect_timeout, extra_roots)?),
        };
        Ok(Self {
            transport,
            url,
            overrides,
            timeout,
        })
    }

    /// The sink's URL.
    pub fn url(&self) -> &reqwest::Url {
        &self.url
    }

    /// POSTs `message`; only a 2xx answer counts as delivered. A redirect is not
    /// followed: it is a failure like any other non-2xx.
    pub async fn deliver(&self, message: &OutgoingMessage) -> Result<(), DeliveryError> {
        let headers = encode_binary_headers(message, &self.overrides);
        let answer = match &self.transport {
            Transport::Plain { client, uri } => {
                deliver_plain(client, uri, headers, &message.content, self.timeout).await
            }
            Transport::Full(client) => deliver_full(client, &self.url, headers, message).await,
        }
        .map_err(|(reason, cause)| DeliveryError {
            reason,
            retry_after: None,
            sink_down: true,
            cause,
        })?;
        self.judge(answer)
    }

    /// Whether an answer means delivered, and if not, what kind of failure it is.
    fn judge(&self, answer: Answer) -> Result<(), DeliveryError> {
        let Answer {
            status,
            retry_after,
            location,
        } = answer;
        if status.is_success() {
            return Ok(());
        }
        if status.is_redirection() {
            // The sink URL itself is wrong (http for https, a missing trailing slash):
            // every message would get the same answer, so the whole sink counts as down
            // and is probed with backoff until the operator fixes `--sink`.
            let location = location
                .map(|v| describe_location(&self.url, v.as_bytes()))
                .unwrap_or_else(|| "no Location".into());
            return Err(DeliveryError {
                reason: format!(
                    "sink answered {status} redirecting to {location}; redirects are not followed (set the sink URL to where it redirects, if that is the broker)"
                ),
                retry_after,
                sink_down: true,
                cause: FailureCause::Redirect,
            });
        }
        let sink_down = status.is_server_error()
            || status == hyper::StatusCode::REQUEST_TIMEOUT
            || status == hyper::StatusCode::TOO_MANY_REQUESTS;
        let cause = if status.is_server_error() {
            FailureCause::ServerError
        } else if status.is_client_error() {
            FailureCause::ClientError
        } else {
            FailureCause::Other
        };
        Err(DeliveryError {
            reason: format!("sink answered {status}"),
            retry_after,
            sink_down,
            cause,
        })
    }
}

/// reqwest's client for an https or proxied sink.
fn full_client(
    url: &reqwest::Url,
    timeout: Duration,
    connect_timeout: Duration,
    extra_roots: &[Vec<u8>],
) -> reqwest::Result<reqwest::Client> {
    let extra_roots = extra_roots
        .iter()
        .map(|der| reqwest::Certificate::from_der(der))
        .collect::<reqwest::Result<Vec<_>>>()?;
    let mut builder = reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(connect_timeout)
        // Never follow a redirect: a 301-303 would turn the delivery into a GET
        // without a body, and its 2xx would count as delivered; a 307 or 308 would
        // re-POST the message (VeraIds, keys) to wherever the Location says. A 3xx
        // is a failed delivery, retried, logged with its Location and counted.
        .redirect(reqwest::redirect::Policy::none())
        // Added to the system's roots (reqwest's platform verifier), not instead.
        .tls_certs_merge(extra_roots);
    // HTTP_PROXY and friends are for leaving the machine; a sink on loopback (a
    // sidecar, the demo, tests) is never meant to go through one.
    if is_loopback(url) {
        builder = builder.no_proxy();
    }
    builder.build()
}

/// One delivery over the plain client. The timeout covers connecting, sending and the
/// answer's head, as reqwest's does: once the status is in, the delivery is judged by
/// it, and a body that is slow to follow cannot turn an accepted message into a retry.
async fn deliver_plain(
    client: &PlainClient,
    uri: &hyper::Uri,
    headers: Vec<(Cow<'static, str>, String)>,
    content: &[u8],
    timeout: Duration,
) -> Result<Answer, (String, FailureCause)> {
    use http_body_util::BodyExt;

    let mut request = hyper::Request::new(http_body_util::Full::new(
        bytes::Bytes::copy_from_slice(content),
    ));
    *request.method_mut() = hyper::Method::POST;
    *request.uri_mut() = uri.clone();
    let map = request.headers_mut();
    map.reserve(headers.len());
    for (name, value) in headers {
        let name = match name {
            // The codec's own names, all valid: made without a copy.
            Cow::Borrowed(name) => Ok(hyper::header::HeaderName::from_static(name)),
            Cow::Owned(name) => hyper::header::HeaderName::try_from(name),
        };
        let value = hyper::header::HeaderValue::from_maybe_shared(bytes::Bytes::from(value));
        match (name, value) {
            (Ok(name), Ok(value)) => {
                map.append(name, value);
            }
            // The configuration checks every header it adds; a value from a message
            // is checked when the message is made.
            _ => {
                return Err((
                    "sink request failed: a header is not valid HTTP".into(),
                    FailureCause::Other,
                ));
            }
        }
    }
    let response = match tokio::time::timeout(timeout, client.request(request)).await {
        Ok(Ok(response)) => response,
        Ok(Err(e)) if caused_by_timeout(&e) => {
            return Err(("sink timed out".into(), FailureCause::Timeout));
        }
        Ok(Err(e)) if e.is_connect() => {
            return Err((
                "could not connect to sink".into(),
                FailureCause::Unreachable,
            ));
        }
        Ok(Err(e)) => {
            return Err((
                format!("sink request failed: {}", with_sources(&e)),
                FailureCause::Other,
            ));
        }
        Err(_) => return Err(("sink timed out".into(), FailureCause::Timeout)),
    };
    let (parts, body) = response.into_parts();
    let answer = Answer::from_headers(parts.status, &parts.headers);
    // Read what little body there is so that the connection goes back to the pool; a
    // body that is long or slow only costs its connection.
    let drain = http_body_util::Limited::new(body, ANSWER_BODY_LIMIT).collect();
    let _ = tokio::time::timeout(ANSWER_BODY_WAIT, drain).await;
    Ok(answer)
}

/// One delivery over reqwest.
async fn deliver_full(
    client: &reqwest::Client,
    url: &reqwest::Url,
    headers: Vec<(Cow<'static, str>, String)>,
    message: &OutgoingMessage,
) -> Result<Answer, (String, FailureCause)> {
    let mut request = client.post(url.clone());
    for (name, value) in headers {
        request = request.header(name.into_owned(), value);
    }
    let response = request
        .body(message.content.clone())
        .send()
        .await
        .map_err(|e| describe(&e))?;
    Ok(Answer::from_headers(response.status(), response.headers()))
}

/// An error and what caused it, as one line: hyper's own words ("client error
/// (SendRequest)") say little without their source.
fn with_sources(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        next = cause.source();
    }
    text
}

/// The sink's URI if the plain client can carry its deliveries: plain http, no
/// credentials in the URL (reqwest turns them into a Basic `Authorization`), and no
/// proxy on the way, decided from the environment as reqwest decides it (HTTP_PROXY,
/// ALL_PROXY, NO_PROXY, as curl reads them). A loopback sink never goes through a proxy.
fn plain_uri(url: &reqwest::Url) -> Option<hyper::Uri> {
    if url.scheme() != "http" || !url.username().is_empty() || url.password().is_some() {
        return None;
    }
    let uri = url.as_str().parse::<hyper::Uri>().ok()?;
    let proxied = !is_loopback(url)
        && hyper_util::client::proxy::matcher::Matcher::from_system()
            .intercept(&uri)
            .is_some();
    (!proxied).then_some(uri)
}

/// Whether `e` comes from a timeout: hyper's connect timeout is an `io::Error` of kind
/// `TimedOut` under a connect error, which reqwest reports as a timeout too.
fn caused_by_timeout(e: &(dyn std::error::Error + 'static)) -> bool {
    causes(e).any(|err| {
        err.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
    })
}

/// `e` and the errors under it. An `io::Error`'s `source()` skips the error it wraps
/// (rustls's, for a failed handshake, reaches reqwest inside one, itself inside
/// another), so an `io::Error` is opened rather than asked for its source.
fn causes<'a>(
    e: &'a (dyn std::error::Error + 'static),
) -> impl Iterator<Item = &'a (dyn std::error::Error + 'static)> {
    std::iter::successors(Some(e), |err| match err.downcast_ref::<std::io::Error>() {
        Some(io) => io
            .get_ref()
            .map(|inner| inner as &(dyn std::error::Error + 'static)),
        None => err.source(),
    })
}

fn describe(e: &reqwest::Error) -> (String, FailureCause) {
    if e.is_timeout() {
        ("sink timed out".into(), FailureCause::Timeout)
    } else if let Some(tls) = tls_error(e) {
        // Before `is_connect`, which a failed handshake also is.
        (
            format!("TLS handshake with the sink failed: {tls}"),
            FailureCause::Tls,
        )
    } else if e.is_connect() {
        (
            "could not connect to sink".into(),
            FailureCause::Unreachable,
        )
    } else {
        (format!("sink request failed: {e}"), FailureCause::Other)
    }
}

/// The TLS error under `e`, if a handshake failed.
fn tls_error(e: &reqwest::Error) -> Option<&rustls::Error> {
    causes(e).find_map(|err| err.downcast_ref::<rustls::Error>())
}

/// A redirect's `Location`, resolved against the sink URL, without credentials, and
/// bounded: it goes into a log line and the outbox row.
fn describe_location(sink: &reqwest::Url, location: &[u8]) -> String {
    let text = String::from_utf8_lossy(location);
    match sink.join(&text) {
        Ok(url) => clipped(&redacted_url(&url)).into_owned(),
        Err(_) => format!("{:?} (not a URL)", clipped(&text)),
    }
}

/// Whether `url` names this machine.
fn is_loopback(url: &reqwest::Url) -> bool {
    let Some(host) = url.host_str() else {
        return false;
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_sinks_are_recognised() {
        let at = |u: &str| is_loopback(&reqwest::Url::parse(u).expect("url"));
        assert!(at("http://127.0.0.1:8080/") && at("http://[::1]/") && at("http://LOCALHOST/"));
        assert!(!at("http://broker-ingress.knative-eventing.svc/ns/default"));
        assert!(!at("http://10.0.0.1/"));
    }

    #[test]
    fn only_plain_http_without_credentials_goes_over_the_plain_client() {
        let plain = |u: &str| plain_uri(&reqwest::Url::parse(u).expect("url"));
        assert_eq!(
            plain("http://127.0.0.1:8080/ns/default").map(|u| u.to_string()),
            Some("http://127.0.0.1:8080/ns/default".to_owned())
        );
        assert!(plain("https://127.0.0.1:8443/").is_none());
        assert!(plain("http://user:secret@127.0.0.1:8080/").is_none());
        assert!(plain("http://user@127.0.0.1:8080/").is_none());
    }

    #[test]
    fn a_timed_out_connection_is_a_timeout_however_deep() {
        #[derive(Debug)]
        struct Wrapper(std::io::Error);
        impl std::fmt::Display for Wrapper {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("client error (Connect)")
            }
        }
        impl std::error::Error for Wrapper {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let timed_out = Wrapper(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "tcp connect error",
        ));
        let refused = Wrapper(std::io::ErrorKind::ConnectionRefused.into());
        assert!(caused_by_timeout(&timed_out));
        assert!(!caused_by_timeout(&refused));
        assert_eq!(
            with_sources(&timed_out),
            "client error (Connect): tcp connect error"
        );
    }

    #[test]
    fn a_location_is_resolved_redacted_and_bounded() {
        let sink = reqwest::Url::parse("http://broker.svc/ns/default").expect("url");
        assert_eq!(
            describe_location(&sink, b"/ns/default/"),
            "http://broker.svc/ns/default/"
        );
        assert_eq!(
            describe_location(&sink, b"https://user:secret@broker.svc/ns/default"),
            redacted_url(
                &reqwest::Url::parse("https://user:secret@broker.svc/ns/default").expect("url")
            )
        );
        assert!(!describe_location(&sink, b"https://user:secret@x/").contains("secret"));
        let long = format!("https://x/{}", "a".repeat(10_000));
        let described = describe_location(&sink, long.as_bytes());
        assert!(
            described.len() < 400 && described.contains("truncated"),
            "{described}"
        );
    }
}
