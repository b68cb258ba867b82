//! A sink that counts the matches it receives and checks that every party of every pair
//! got exactly one.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use letro_server::codec::contact_pairing::CONTACT_PAIRING_REQUEST_TYPE;
use sha2::{Digest, Sha256};

#[derive(Debug, Default)]
struct Tally {
    /// (recipient VeraId, contact VeraId) of a tmp match, or (recipient endpoint id,
    /// SHA-256 of the bundle) of a forwarded signed request -> distinct ce-ids seen.
    matches: HashMap<(String, String), Vec<String>>,
    deliveries: u64,
    last: Option<Instant>,
}

/// The counting sink, on a real socket.
#[derive(Debug, Clone)]
pub(crate) struct CountingSink {
    /// Where it listens.
    pub(crate) addr: SocketAddr,
    tally: Arc<Mutex<Tally>>,
}

/// What the sink saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SinkCounts {
    /// Deliveries received (redeliveries included).
    pub(crate) deliveries: u64,
    /// Distinct (recipient, contact) matches.
    pub(crate) distinct: u64,
    /// (recipient, contact) matches that came under more than one ce-id: must be 0.
    pub(crate) conflicting: u64,
}

impl CountingSink {
    /// Starts the sink on 127.0.0.1, any port.
    pub(crate) async fn start() -> std::io::Result<Self> {
        let tally = Arc::new(Mutex::new(Tally::default()));
        let app = axum::Router::new()
            .route("/", axum::routing::post(receive))
            .with_state(tally.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self { addr, tally })
    }

    fn tally(&self) -> std::sync::MutexGuard<'_, Tally> {
        self.tally.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts so far.
    pub(crate) fn counts(&self) -> SinkCounts {
        let tally = self.tally();
        SinkCounts {
            deliveries: tally.deliveries,
            distinct: tally.matches.len() as u64,
            conflicting: tally.matches.values().filter(|ids| ids.len() > 1).count() as u64,
        }
    }

    /// When the last delivery arrived.
    pub(crate) fn last_delivery(&self) -> Option<Instant> {
        self.tally().last
    }

    /// Whether endpoint `recipient` was forwarded `bundle` exactly once.
    pub(crate) fn forwarded_once(&self, recipient: &str, bundle: &[u8]) -> bool {
        self.matched_once(recipient, &hex::encode(Sha256::digest(bundle)))
    }

    /// Whether `recipient` got exactly one match naming `contact`.
    pub(crate) fn matched_once(&self, recipient: &str, contact: &str) -> bool {
        self.tally()
            .matches
            .get(&(recipient.to_owned(), contact.to_owned()))
            .is_some_and(|ids| ids.len() == 1)
    }
}

async fn receive(
    State(tally): State<Arc<Mutex<Tally>>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> StatusCode {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
    };
    // A forwarded signed request is the other party's bundle, for the recipient's
    // endpoint; a tmp match names its recipient and contact in its first fields.
    let (recipient, contact) = if header("content-type") == CONTACT_PAIRING_REQUEST_TYPE {
        (
            header("ce-subject").to_owned(),
            hex::encode(Sha256::digest(&body)),
        )
    } else {
        let text = String::from_utf8_lossy(&body);
        let mut fields = text.split(',');
        let (Some(contact), Some(recipient)) = (fields.next(), fields.next()) else {
            return StatusCode::BAD_REQUEST;
        };
        (recipient.to_owned(), contact.to_owned())
    };
    let id = header("ce-id").to_owned();
    let mut tally = tally.lock().unwrap_or_else(PoisonError::into_inner);
    tally.deliveries += 1;
    tally.last = Some(Instant::now());
    let ids = tally.matches.entry((recipient, contact)).or_default();
    if !ids.contains(&id) {
        ids.push(id);
    }
    StatusCode::ACCEPTED
}
