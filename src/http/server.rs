//! The connection loop. `axum::serve` sets no header read timeout, so a client that
//! trickles its headers one byte at a time could hold a connection (and a file
//! descriptor) forever; this loop drives hyper directly with one.

use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// How connections are read.
#[derive(Debug, Clone, Copy)]
pub struct ServeOptions {
    /// Time allowed for the request line and headers of each request.
    pub header_read_timeout: Duration,
    /// Time allowed, once `stop` is raised, for requests in flight to be answered.
    pub shutdown_timeout: Duration,
}

/// Serves `router` on `listener` until `stop` becomes true; then stops accepting,
/// closes idle connections, and waits up to the shutdown timeout for requests in flight.
/// Returns whether every connection finished in time.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    options: ServeOptions,
    mut stop: watch::Receiver<bool>,
) -> bool {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(options.header_read_timeout);
    let graceful = GracefulShutdown::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        // Out of file descriptors, usually: give connections in flight a
                        // moment to finish rather than spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let service = TowerToHyperService::new(router.clone());
                let connection = builder.serve_connection(TokioIo::new(stream), service);
                let connection = graceful.watch(connection);
                tokio::spawn(async move {
                    if let Err(e) = connection.await {
                        tracing::debug!(error = %e, "connection ended with an error");
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

async fn stopped(stop: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns is not `Send`: drop it here, not in the caller's
    // `select!`.
    let _ = stop.wait_for(|stop| *stop).await;
}
