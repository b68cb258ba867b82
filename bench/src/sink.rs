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

/// 16 bytes of SHA-256 over strings separated by NULs: the tally keeps digests, not the
/// strings, so that counting millions of matches in a soak costs the machine (which the
/// server shares) little memory and no growing work.
type Digest16 = [u8; 16];

fn digest16(parts: &[&str]) -> Digest16 {
    let mut hash = Sha256::new();
    for part in parts {
        hash.update(part.as_bytes());
        hash.update([0]);
    }
    let mut out = [0; 16];
    out.copy_from_slice(&hash.finalize()[..16]);
    out
}

/// The ce-ids one match arrived under.
#[derive(Debug)]
struct Seen {
    first_id: Digest16,
    /// Another ce-id came too: the match is conflicting.
    other_id: bool,
}

#[derive(Debug, Default)]
struct Tally {
    /// (recipient VeraId, contact VeraId) of a tmp match, or (recipient endpoint id,
    /// SHA-256 of the bundle) of a forwarded signed request -> the ce-ids seen.
    matches: HashMap<Digest16, Seen>,
    conflicting: u64,
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
            conflicting: tally.conflicting,
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
            .get(&digest16(&[recipient, contact]))
            .is_some_and(|seen| !seen.other_id)
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
    let (pair, id) = (
        digest16(&[&recipient, &contact]),
        digest16(&[header("ce-id")]),
    );
    let mut tally = tally.lock().unwrap_or_else(PoisonError::into_inner);
    tally.deliveries += 1;
    tally.last = Some(Instant::now());
    let seen = tally.matches.entry(pair).or_insert(Seen {
        first_id: id,
        other_id: false,
    });
    if seen.first_id != id && !seen.other_id {
        seen.other_id = true;
        tally.conflicting += 1;
    }
    StatusCode::ACCEPTED
}
