//! An https sink: the test kit's fake sink behind a real TLS server on a real socket,
//! with certificates for 127.0.0.1 issued by certificate authorities made here, and
//! `--sink-ca-file` as the server reads it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use letro_server::config::load_sink_ca;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::net::{TcpListener, TcpStream};

use crate::support::*;

/// A certificate authority made for one test.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    /// Its self-signed certificate, PEM.
    pub pem: String,
    der: CertificateDer<'static>,
}

impl TestCa {
    /// A fresh CA whose certificate's common name is `name`.
    pub fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().expect("CA key");
        let cert = params.self_signed(&key).expect("CA certificate");
        Self {
            pem: cert.pem(),
            der: cert.der().clone(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A server certificate for 127.0.0.1 and localhost, issued by this CA, and its key.
    pub fn issue_server(&self) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let params = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
            .expect("server params");
        let key = KeyPair::generate().expect("server key");
        let cert = params.signed_by(&key, &self.issuer).expect("server cert");
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        (vec![cert.der().clone(), self.der.clone()], key)
    }

    /// Writes its certificate to `dir/name` and returns the path.
    pub fn write_pem(&self, dir: &Path, name: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, &self.pem).expect("write CA file");
        path
    }
}

/// A TLS server in front of a fake sink: it completes handshakes with the certificate
/// it is given (which can change), counts them, and passes the decrypted bytes to the
/// fake sink. A refused certificate is a failed handshake here.
struct TlsFront {
    url: String,
    config: Arc<Mutex<Arc<rustls::ServerConfig>>>,
    handshakes: Arc<AtomicUsize>,
    failed_handshakes: Arc<AtomicUsize>,
    _server: tokio::task::JoinHandle<()>,
}

fn server_config(ca: &TestCa) -> Arc<rustls::ServerConfig> {
    let (chain, key) = ca.issue_server();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("protocol versions")
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .expect("server certificate");
    Arc::new(config)
}

impl TlsFront {
    /// `https://127.0.0.1:PORT/` in front of `sink`, presenting a certificate from `ca`.
    async fn start(sink: &FakeSink, ca: &TestCa) -> Self {
        let backend: SocketAddr = sink
            .url
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .parse()
            .expect("fake sink address");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let config = Arc::new(Mutex::new(server_config(ca)));
        let handshakes = Arc::new(AtomicUsize::new(0));
        let failed_handshakes = Arc::new(AtomicUsize::new(0));
        let server = {
            let (config, handshakes, failed) = (
                config.clone(),
                handshakes.clone(),
                failed_handshakes.clone(),
            );
            tokio::spawn(async move {
                loop {
                    let Ok((tcp, _)) = listener.accept().await else {
                        continue;
                    };
                    let acceptor =
                        tokio_rustls::TlsAcceptor::from(config.lock().expect("lock").clone());
                    let (handshakes, failed) = (handshakes.clone(), failed.clone());
                    tokio::spawn(async move {
                        let mut tls = match acceptor.accept(tcp).await {
                            Ok(tls) => tls,
                            Err(_) => {
                                failed.fetch_add(1, Ordering::SeqCst);
                                return;
                            }
                        };
                        handshakes.fetch_add(1, Ordering::SeqCst);
                        if let Ok(mut plain) = TcpStream::connect(backend).await {
                            let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
                        }
                    });
                }
            })
        };
        Self {
            url: format!("https://{addr}/"),
            config,
            handshakes,
            failed_handshakes,
            _server: server,
        }
    }

    /// Presents a certificate from `ca` to the next connections.
    fn present(&self, ca: &TestCa) {
        *self.config.lock().expect("lock") = server_config(ca);
    }

    fn handshakes(&self) -> usize {
        self.handshakes.load(Ordering::SeqCst)
    }

    fn failed_handshakes(&self) -> usize {
        self.failed_handshakes.load(Ordering::SeqCst)
    }
}

async fn make_match(app: &TestApp, tag: &str) {
    let p = parties();
    app.post_request(&p[0], &format!("{tag}-a"), "a@x.io", "b@y.io")
        .await;
    app.post_request(&p[1], &format!("{tag}-b"), "b@y.io", "a@x.io")
        .await;
}

const TLS_FAILURES: &str = "letro_outbox_delivery_failures_total{cause=\"tls\"}";
const DELIVERED: &str = "letro_outbox_deliveries_total{result=\"delivered\"}";
const RETRIED: &str = "letro_outbox_deliveries_total{result=\"retry\"}";

/// Waits until `what` holds, for at most 15 s.
async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn an_https_sink_whose_ca_is_configured_gets_each_message_once() {
    let ca = TestCa::new("letro test sink CA");
    let mut sink = FakeSink::start().await;
    let front = TlsFront::start(&sink, &ca).await;
    let (dir, db) = temp_db();
    let mut config = test_config(&db, Some(&front.url));
    config.sink_ca =
        Some(load_sink_ca(&ca.write_pem(dir.path(), "sink-ca.pem")).expect("the CA file"));
    let app = TestApp::spawn(config).await;
    make_match(&app, "tls").await;

    let received = sink.take(2).await;
    sink.assert_quiet(Duration::from_millis(500)).await;
    for r in &received {
        assert_match_event(r);
    }
    assert_eq!(
        distinct(received.iter().map(|r| r.header("ce-id").to_owned())),
        2,
        "each message once"
    );
    assert!(front.handshakes() >= 1, "the deliveries came over TLS");
    assert_eq!(front.failed_handshakes(), 0);
    eventually("both deliveries recorded", async || {
        app.metric(DELIVERED).await == 2
    })
    .await;
    assert_eq!(app.stats().await.outbox_depth, 0);
    assert_eq!(app.metric(TLS_FAILURES).await, 0);
    assert_eq!(app.metric(RETRIED).await, 0);
    app.stop().await;
}

#[tokio::test]
async fn a_certificate_from_another_ca_is_refused_retried_and_delivered_once_trusted() {
    let trusted = TestCa::new("letro trusted CA");
    let other = TestCa::new("letro other CA");
    let mut sink = FakeSink::start().await;
    let front = TlsFront::start(&sink, &other).await;
    let (dir, db) = temp_db();
    let mut config = test_config(&db, Some(&front.url));
    config.sink_ca =
        Some(load_sink_ca(&trusted.write_pem(dir.path(), "sink-ca.pem")).expect("the CA file"));
    let app = TestApp::spawn(config).await;
    make_match(&app, "untrusted").await;

    // Refused at every attempt, each a failed delivery with the tls cause, retried.
    eventually(
        "three refused handshakes counted as tls failures",
        async || {
            let (failed, counted) = (front.failed_handshakes(), app.metric(TLS_FAILURES).await);
            failed >= 3 && counted >= 3
        },
    )
    .await;
    assert_eq!(front.handshakes(), 0, "a refused certificate was accepted");
    assert!(
        sink.try_next(Duration::from_millis(100)).await.is_none(),
        "something got through"
    );
    assert!(app.metric(RETRIED).await >= 3);
    assert_eq!(app.metric(DELIVERED).await, 0);
    assert_eq!(
        app.metric("letro_outbox_deliveries_total{result=\"dropped\"}")
            .await,
        0
    );
    assert_eq!(app.stats().await.outbox_depth, 2, "the messages wait");
    let waiting = app.state.store.outbox_list(10).await.expect("outbox list");
    let errors: Vec<String> = waiting
        .iter()
        .filter_map(|m| m.last_error.clone())
        .collect();
    assert!(
        !errors.is_empty()
            && errors
                .iter()
                .all(|e| e.contains("TLS handshake") && e.contains("UnknownIssuer")),
        "{errors:?}"
    );

    // The sink now presents a certificate the server trusts: each message, once.
    front.present(&trusted);
    let received = sink.take(2).await;
    sink.assert_quiet(Duration::from_millis(500)).await;
    assert_eq!(
        distinct(received.iter().map(|r| r.header("ce-id").to_owned())),
        2
    );
    eventually("both deliveries recorded", async || {
        app.metric(DELIVERED).await == 2
    })
    .await;
    assert_eq!(app.stats().await.outbox_depth, 0);
    app.stop().await;
}

#[tokio::test]
async fn without_a_ca_file_a_private_ca_is_refused_and_the_messages_wait() {
    let ca = TestCa::new("letro private CA");
    let mut sink = FakeSink::start().await;
    let front = TlsFront::start(&sink, &ca).await;
    let (_dir, db) = temp_db();
    let app = TestApp::spawn(test_config(&db, Some(&front.url))).await;
    make_match(&app, "no-ca").await;

    eventually(
        "two refused handshakes counted as tls failures",
        async || front.failed_handshakes() >= 2 && app.metric(TLS_FAILURES).await >= 2,
    )
    .await;
    assert_eq!(front.handshakes(), 0);
    assert!(sink.try_next(Duration::from_millis(100)).await.is_none());
    assert_eq!(app.metric(DELIVERED).await, 0);
    assert_eq!(
        app.metric("letro_outbox_delivery_failures_total{cause=\"unreachable\"}")
            .await,
        0,
        "a refused certificate is not an unreachable sink"
    );
    app.stop().await;
    assert_eq!(outbox_ids(&db).len(), 2, "the messages stay in the outbox");
}
