//! letro-testkit: what the tests and the benchmark of letro-server need around the
//! server, written once: a fake sink standing in for the Knative broker, the real binary
//! as a child process, PostgreSQL scratch databases, and a lean HTTP/1.1 load generator. Unpublished; never linked into
//! the server.

pub mod load;
mod postgres;
mod process;
mod sink;

pub use postgres::{PgDatabase, PrivatePostgres};
pub use process::{ServerProcess, server_binary};
pub use sink::{FakeSink, Received};

/// A port nothing listens on (for now): a sink that is down, a server to come.
pub fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr").port()
}
