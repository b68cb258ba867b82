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

/// A port that was free a moment ago, for a server to come. Nothing holds it: another
/// test may bind it first. For a port that must stay dead, hold a [`ClosedPort`].
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr").port()
}

/// A loopback port held closed: bound but never listening, so a connection to it is
/// refused, and no other test's server can bind it while this lives (a port that was
/// merely free once became another test's sink, which then received this one's
/// messages). Dropping it frees the port, e.g. for a sink that comes back.
pub struct ClosedPort {
    _socket: tokio::net::TcpSocket,
    port: u16,
}

impl ClosedPort {
    /// Binds a free loopback port, without listening.
    pub fn new() -> Self {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket
            .bind(std::net::SocketAddr::from(([127, 0, 0, 1], 0)))
            .expect("bind");
        let port = socket.local_addr().expect("addr").port();
        Self {
            _socket: socket,
            port,
        }
    }

    /// The port's number.
    pub fn port(&self) -> u16 {
        self.port
    }
}

impl Default for ClosedPort {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_closed_port_refuses_connections_and_cannot_be_bound_while_held() {
        let closed = ClosedPort::new();
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], closed.port()));
        let refused = std::net::TcpStream::connect(addr).expect_err("nothing listens");
        assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
        assert!(
            std::net::TcpListener::bind(addr).is_err(),
            "the port is held"
        );
        drop(closed);
        std::net::TcpListener::bind(addr).expect("free once dropped");
    }
}
