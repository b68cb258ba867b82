//! A fake Knative broker ingress: a real HTTP server that records what it receives and
//! answers as the test scripts it.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use tokio::sync::mpsc;

/// A request the fake sink received.
#[derive(Debug, Clone)]
pub struct Received {
    /// The request's path and query, as sent (a sender's URL can mark its requests).
    pub uri: String,
    /// When the sink received it (before any delay in answering).
    pub at: std::time::Instant,
    /// Header names lower-case; values as text (empty when not UTF-8).
    pub headers: HashMap<String, String>,
    /// The body.
    pub body: Vec<u8>,
}

impl Received {
    /// A header's value, empty when absent.
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .map(String::as_str)
            .unwrap_or_default()
    }

    /// The body as UTF-8 text.
    pub fn text(&self) -> String {
        String::from_utf8(self.body.clone()).expect("UTF-8 body")
    }
}

#[derive(Default)]
struct Behaviour {
    /// Statuses to answer first, in order.
    script: VecDeque<u16>,
    /// Answer after the script runs out.
    default: u16,
    /// Recipients (ce-subject) that always get this status.
    poisoned: HashMap<String, u16>,
    /// Answer only after this delay.
    delay: Duration,
}

#[derive(Clone)]
struct SinkState {
    behaviour: Arc<Mutex<Behaviour>>,
    tx: mpsc::UnboundedSender<Received>,
}

/// A fake Knative broker ingress on a real socket.
pub struct FakeSink {
    /// `http://127.0.0.1:PORT/`.
    pub url: String,
    behaviour: Arc<Mutex<Behaviour>>,
    rx: mpsc::UnboundedReceiver<Received>,
    _server: tokio::task::JoinHandle<()>,
}

impl FakeSink {
    /// A sink on any free port, accepting everything (202).
    pub async fn start() -> Self {
        Self::start_at(0).await
    }

    /// A sink on a given port (0: any), e.g. one that was down and comes back.
    pub async fn start_at(port: u16) -> Self {
        let behaviour = Arc::new(Mutex::new(Behaviour {
            default: 202,
            ..Behaviour::default()
        }));
        let (tx, rx) = mpsc::unbounded_channel();
        let state = SinkState {
            behaviour: behaviour.clone(),
            tx,
        };
        let app = axum::Router::new()
            .route("/", axum::routing::post(receive))
            .with_state(state);
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("bind sink");
        let addr = listener.local_addr().expect("sink addr");
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self {
            url: format!("http://{addr}/"),
            behaviour,
            rx,
            _server: server,
        }
    }

    /// Answers these statuses first, then the default.
    pub fn script(&self, statuses: &[u16]) {
        self.behaviour.lock().expect("lock").script.extend(statuses);
    }

    /// What the sink answers when no script or poison applies.
    pub fn set_default(&self, status: u16) {
        self.behaviour.lock().expect("lock").default = status;
    }

    /// Always answers `status` to messages for `recipient` (its `ce-subject`).
    pub fn poison(&self, recipient: &str, status: u16) {
        self.behaviour
            .lock()
            .expect("lock")
            .poisoned
            .insert(recipient.to_owned(), status);
    }

    /// Answers only after `delay`.
    pub fn set_delay(&self, delay: Duration) {
        self.behaviour.lock().expect("lock").delay = delay;
    }

    /// The next request the sink receives, whatever it answered.
    pub async fn next(&mut self) -> Received {
        tokio::time::timeout(Duration::from_secs(20), self.rx.recv())
            .await
            .expect("the sink received nothing within 20 s")
            .expect("sink channel open")
    }

    /// The next request if one arrives within `wait`.
    pub async fn try_next(&mut self, wait: Duration) -> Option<Received> {
        tokio::time::timeout(wait, self.rx.recv())
            .await
            .ok()
            .flatten()
    }

    /// The next `n` requests.
    pub async fn take(&mut self, n: usize) -> Vec<Received> {
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(self.next().await);
        }
        out
    }

    /// Asserts that nothing arrives within `wait`.
    pub async fn assert_quiet(&mut self, wait: Duration) {
        if let Ok(Some(r)) = tokio::time::timeout(wait, self.rx.recv()).await {
            panic!("unexpected delivery: {r:?}");
        }
    }
}

async fn receive(
    State(state): State<SinkState>,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> StatusCode {
    let headers: HashMap<String, String> = headers
        .iter()
        .map(|(n, v)| {
            (
                n.as_str().to_owned(),
                v.to_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    let (status, delay) = {
        let mut b = state.behaviour.lock().expect("lock");
        let subject = headers.get("ce-subject").cloned().unwrap_or_default();
        let status = match b.poisoned.get(&subject) {
            Some(s) => *s,
            None => b.script.pop_front().unwrap_or(b.default),
        };
        (status, b.delay)
    };
    let _ = state.tx.send(Received {
        uri: uri.to_string(),
        at: std::time::Instant::now(),
        headers,
        body: body.to_vec(),
    });
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    StatusCode::from_u16(status).expect("valid status")
}
