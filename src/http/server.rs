//! The connection loop. `axum::serve` sets no header read timeout, so a client that
//! trickles its headers one byte at a time could hold a connection (and a file
//! descriptor) forever; this loop drives hyper directly with one. It also caps the
//! connections open at once (`--max-connections`): without a cap the file descriptor
//! limit was the only bound, and an idle flood either starved real clients of
//! descriptors or, with a high limit, grew the process past its memory limit.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use prometheus_client::metrics::gauge::Gauge;
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

use super::Routes;
use crate::telemetry::{Metrics, Repeats};

/// How connections are read.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Time allowed for the request line and headers of each request; also how long a
    /// keep-alive connection may stay idle between requests (hyper starts this timer
    /// while it waits for the next request).
    pub header_read_timeout: Duration,
    /// Time allowed, once `stop` is raised, for requests in flight to be answered.
    pub shutdown_timeout: Duration,
    /// Most connections open at once; beyond, a new connection gets 503 and is closed.
    pub max_connections: usize,
    /// Where connections, refusals and timeouts are counted.
    pub metrics: Arc<Metrics>,
    /// Refusals and timeouts are logged once per interval with a count.
    pub repeats: Arc<Repeats>,
}

/// The answer to a connection over the limit, written without reading the request: the
/// broker and the platform's proxy retry a 503.
const REFUSED: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: 0\r\n\r\n";

/// Serves `routes` on `listener` until `stop` becomes true; then stops accepting,
/// closes idle connections, and waits up to the shutdown timeout for requests in flight.
/// Returns whether every connection finished in time.
pub async fn serve(
    listener: TcpListener,
    routes: Routes,
    options: ServeOptions,
    mut stop: watch::Receiver<bool>,
) -> bool {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(options.header_read_timeout);
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(options.max_connections));
    let (metrics, repeats) = (&options.metrics, &options.repeats);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // Out of file descriptors, usually: give connections in flight a
                        // moment to finish rather than spinning.
                        metrics.connection_refused("accept_failed");
                        if repeats.accept_failures.first() {
                            tracing::warn!(error = %e, "could not accept a connection");
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Ok(permit) = slots.clone().try_acquire_owned() else {
                    metrics.connection_refused("over_limit");
                    if repeats.connections_refused.first() {
                        tracing::warn!(
                            limit = options.max_connections,
                            "refusing connections: at --max-connections \
                             (LETRO_MAX_CONNECTIONS); answering 503"
                        );
                    }
                    // Best effort: a full socket buffer just gets the close.
                    let _ = stream.try_write(REFUSED);
                    continue;
                };
                let open = Open::new(metrics.connections_open().clone(), permit);
                let _ = stream.set_nodelay(true);
                let served = Arc::new(AtomicBool::new(false));
                let service = Counted {
                    routes: routes.clone(),
                    served: served.clone(),
                };
                let connection = builder.serve_connection(TokioIo::new(stream), service);
                let connection = graceful.watch(connection);
                let (metrics, repeats) = (metrics.clone(), repeats.clone());
                tokio::spawn(async move {
                    let result = connection.await;
                    drop(open);
                    if let Err(e) = result {
                        ended_with(&e, peer, served.load(Ordering::Relaxed), &metrics, &repeats);
                    }
                });
            }
            () = stopped(&mut stop) => break,
        }
    }
    drop(listener);
    tracing::info!(
        connections = graceful.count(),
        "shutting down: no new connections"
    );
    tokio::time::timeout(options.shutdown_timeout, graceful.shutdown())
        .await
        .is_ok()
}

/// Counts and logs a connection that ended with an error. A header timeout on a
/// connection that was answered before is an idle keep-alive connection closed: routine,
/// counted apart, not logged.
fn ended_with(
    e: &hyper::Error,
    peer: SocketAddr,
    served: bool,
    metrics: &Metrics,
    repeats: &Repeats,
) {
    if !e.is_timeout() {
        tracing::debug!(error = %e, "connection ended with an error");
    } else if served {
        metrics.read_timeout("idle");
    } else {
        metrics.read_timeout("header");
        if repeats.header_timeouts.first() {
            tracing::info!(
                peer = %peer,
                "request headers not sent in time; connection closed"
            );
        }
    }
}

/// An open connection: its slot under `--max-connections`, and its place in the gauge.
struct Open {
    gauge: Gauge,
    _slot: OwnedSemaphorePermit,
}

impl Open {
    fn new(gauge: Gauge, slot: OwnedSemaphorePermit) -> Self {
        gauge.inc();
        Self { gauge, _slot: slot }
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

/// The routes as hyper calls them, noting that the connection served a request.
struct Counted {
    routes: Routes,
    served: Arc<AtomicBool>,
}

impl hyper::service::Service<hyper::Request<Incoming>> for Counted {
    type Response = axum::response::Response;
    type Error = std::convert::Infallible;
    type Future = futures_util::future::BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn call(&self, request: hyper::Request<Incoming>) -> Self::Future {
        self.served.store(true, Ordering::Relaxed);
        self.routes.call(request)
    }
}

async fn stopped(stop: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns is not `Send`: drop it here, not in the caller's
    // `select!`.
    let _ = stop.wait_for(|stop| *stop).await;
}
