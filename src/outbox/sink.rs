//! The HTTP sink: POSTs a message as a binary-mode CloudEvent to `K_SINK`.

use std::time::Duration;

use crate::codec::cloudevent::encode_binary_headers;
use crate::domain::OutgoingMessage;

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
    client: reqwest::Client,
    url: reqwest::Url,
    overrides: Vec<(String, String)>,
}

impl HttpSink {
    /// A sink at `url`, giving each delivery `timeout`.
    pub fn new(
        url: reqwest::Url,
        timeout: Duration,
        overrides: Vec<(String, String)>,
    ) -> reqwest::Result<Self> {
        install_crypto_provider();
        let mut builder = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(5)));
        // HTTP_PROXY and friends are for leaving the machine; a sink on loopback (a
        // sidecar, the demo, tests) is never meant to go through one.
        if is_loopback(&url) {
            builder = builder.no_proxy();
        }
        let client = builder.build()?;
        Ok(Self {
            client,
            url,
            overrides,
        })
    }

    /// The sink's URL.
    pub fn url(&self) -> &reqwest::Url {
        &self.url
    }

    /// POSTs `message`; only a 2xx answer counts as delivered.
    pub async fn deliver(&self, message: &OutgoingMessage) -> Result<(), DeliveryError> {
        let mut request = self.client.post(self.url.clone());
        for (name, value) in encode_binary_headers(message, &self.overrides) {
            request = request.header(name, value);
        }
        let response = request
            .body(message.content.clone())
            .send()
            .await
            .map_err(|e| DeliveryError {
                reason: describe(&e),
                retry_after: None,
                sink_down: true,
            })?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let sink_down = status.is_server_error()
            || status == reqwest::StatusCode::REQUEST_TIMEOUT
            || status == reqwest::StatusCode::TOO_MANY_REQUESTS;
        Err(DeliveryError {
            reason: format!("sink answered {status}"),
            retry_after,
            sink_down,
        })
    }
}

fn describe(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "sink timed out".into()
    } else if e.is_connect() {
        "could not connect to sink".into()
    } else {
        format!("sink request failed: {e}")
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
}
