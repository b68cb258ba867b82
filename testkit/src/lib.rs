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

/// A free loopback port for a server to come (a private PostgreSQL server, a sink that
/// comes back). It is taken outside the kernel's ephemeral range, which is where every
/// server bound to port 0 gets its port, so no other test's server can take it between
/// now and then, nor while a server on it is stopped and started again.
pub fn free_port() -> u16 {
    bind_outside_ephemeral(std::net::TcpListener::bind).1
}

/// A loopback port held closed: bound but never listening, so a connection to it is
/// refused, and no other test's server can bind it while this lives (a port that was
/// merely free once became another test's sink, which then received this one's
/// messages). Like [`free_port`]'s, it is outside the ephemeral range, so once this is
/// dropped the port is still free for a sink that comes back.
pub struct ClosedPort {
    _socket: tokio::net::TcpSocket,
    port: u16,
}

impl ClosedPort {
    /// Binds a free loopback port, without listening.
    pub fn new() -> Self {
        let (socket, port) = bind_outside_ephemeral(|addr| {
            let socket = tokio::net::TcpSocket::new_v4()?;
            socket.bind(addr)?;
            Ok(socket)
        });
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

/// The lowest port of the kernel's ephemeral range, where port-0 binds land.
fn ephemeral_low() -> Option<u16> {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Tries random loopback ports below the kernel's ephemeral range until `bind` takes one;
/// what it bound, and the port.
fn bind_outside_ephemeral<T>(
    mut bind: impl FnMut(std::net::SocketAddr) -> std::io::Result<T>,
) -> (T, u16) {
    const LOWEST: u16 = 16_384;
    let ports = LOWEST..ephemeral_low().unwrap_or(32_768).max(LOWEST + 1024);
    for _ in 0..1000 {
        let port = rand::random_range(ports.clone());
        if let Ok(bound) = bind(std::net::SocketAddr::from(([127, 0, 0, 1], port))) {
            return (bound, port);
        }
    }
    panic!("no free loopback port in {ports:?}");
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

    #[test]
    fn ports_for_servers_to_come_are_outside_the_ephemeral_range() {
        let ephemeral_low = ephemeral_low().expect("Linux's ephemeral range");
        for _ in 0..20 {
            assert!(free_port() < ephemeral_low);
            assert!(ClosedPort::new().port() < ephemeral_low);
        }
    }
}
