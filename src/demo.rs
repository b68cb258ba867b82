//! `letro-server demo`: the whole contact-pairing exchange, played for real and printed.
//!
//! A server on a temporary SQLite file and a port of its own, a sink standing in for the
//! Awala Internet Endpoint's broker, and two Letro users with fresh RSA keys who do what
//! the app does: send pairing requests, read their matches, authorise each other with
//! connection params holding a PDA, and read their completions. Everything goes over
//! real HTTP, through the same code as in production. `--signed` plays today's apps,
//! whose requests are signed with VeraId (`signed`).

use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, bail};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use tokio::sync::{mpsc, oneshot};

use crate::app::App;
use crate::cli::DemoArgs;
use crate::client::{
    CertificateOptions, Endpoint, connection_params, read_completion, read_match_in,
};
use crate::codec::cloudevent::{CloudEvent, INCOMING_TYPE, decode_http};
use crate::codec::connparams::decode_connection_params;
use crate::codec::contact_pairing::{CONTACT_PAIRING_FAILURE_TYPE, CONTACT_PAIRING_REQUEST_TYPE};
use crate::codec::pairing::{
    MatchOrder, PAIRING_AUTH_TMP_TYPE, PAIRING_AUTH_TYPE, PAIRING_COMPLETION_TYPE,
    PAIRING_MATCH_TYPE, PAIRING_REQUEST_TYPE,
};
use crate::config::{Config, DatabaseConfig, SqliteSync};
use crate::domain::EndpointId;

/// The server's own endpoint id, as the Awala Internet Endpoint would give it.
const SERVER_ID: &str = "0de0de0de0de0de0de0de0de0de0de0de0de0de0de0de0de0de0de0de0de0de0d";
/// How long to wait for the server to deliver something.
const WAIT: Duration = Duration::from_secs(20);

mod signed;

struct User {
    name: &'static str,
    veraid: &'static str,
    endpoint: Endpoint,
}

/// Plays the demo, writing the story to `out`.
pub async fn run(args: DemoArgs, out: &mut impl Write) -> anyhow::Result<()> {
    crate::outbox::sink::install_crypto_provider();
    if args.signed {
        return signed::run(&args, out).await;
    }
    // The 2023 app reads its own VeraId first in a match and sends `pairing-auth`.
    let order = if args.android_2023 {
        MatchOrder::RecipientFirst
    } else {
        MatchOrder::ContactFirst
    };
    let mut stage = Stage::start(out, |config| config.tmp_match_order = order).await?;
    let (alice, bob) = users(out)?;

    let outcomes = [
        "stored, waiting for Bob's request",
        "both halves are in, so it sends two matches",
    ];
    for (n, ((user, other), outcome)) in
        (1..).zip([(&alice, &bob), (&bob, &alice)].into_iter().zip(outcomes))
    {
        step(
            out,
            n,
            &format!("{} asks to pair with {}", user.name, other.name),
        )?;
        let parcel = format!("request-{n}");
        let body = user.endpoint.pairing_request(user.veraid, other.veraid);
        show_request(out, &args, user, &parcel, PAIRING_REQUEST_TYPE, &body)?;
        let status = stage
            .post(user, &parcel, PAIRING_REQUEST_TYPE, body)
            .await?;
        say(out, &format!("  server answered {status}: {outcome}"))?;
    }

    step(out, 3, "Each receives a pairing match about the other")?;
    let matches = stage.receive(2).await?;
    for (user, other) in [(&alice, &bob), (&bob, &alice)] {
        let event = addressed_to(&matches, user)?;
        show_delivery(out, &args, event)?;
        expect_type(event, PAIRING_MATCH_TYPE)?;
        let m = read_match_in(&event.data, order)?;
        if m.contact_endpoint_id != *other.endpoint.id()
            || m.contact_veraid != other.veraid
            || m.own_veraid != user.veraid
        {
            bail!("{}'s match does not describe {}", user.name, other.name);
        }
        say(
            out,
            &format!(
                "  {} learns: contact {} is endpoint {}, key of {} bytes (checked against the id)",
                user.name,
                m.contact_veraid,
                m.contact_endpoint_id,
                m.contact_key_der.len()
            ),
        )?;
    }

    authorise_each_other(out, &args, &mut stage, (&alice, &bob), 4, args.android_2023).await?;
    stage.stop().await
}

/// The server on a temporary database, the stand-in for the broker, and an HTTP client.
struct Stage {
    server: String,
    http: reqwest::Client,
    delivered: mpsc::UnboundedReceiver<CloudEvent>,
    stop: oneshot::Sender<()>,
    serving: tokio::task::JoinHandle<anyhow::Result<()>>,
    /// Holds the database; deleted when the demo ends.
    _dir: tempfile::TempDir,
}

impl Stage {
    /// Starts the server with the demo's settings, `configure`d, and says where it is.
    async fn start(
        out: &mut impl Write,
        configure: impl FnOnce(&mut Config),
    ) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir().context("creating a temporary directory")?;
        let (sink_addr, delivered) = start_sink().await?;
        let mut config = Config::new(
            SocketAddr::from(([127, 0, 0, 1], 0)),
            DatabaseConfig::Sqlite {
                path: dir.path().join("letro.db"),
                synchronous: SqliteSync::Full,
            },
        );
        config.sink = Some(format!("http://{sink_addr}/").parse()?);
        configure(&mut config);
        let app = App::build(config).await?;
        let server = format!("http://{}/", app.local_addr()?);
        let (stop, stopped) = oneshot::channel::<()>();
        let serving = tokio::spawn(app.run(async {
            let _ = stopped.await;
        }));
        say(out, &format!("letro-server is listening on {server}"))?;
        say(
            out,
            &format!(
                "its outgoing messages go to a stand-in for the Awala broker on http://{sink_addr}/\n\
                 its database is {}",
                dir.path().join("letro.db").display()
            ),
        )?;
        // Everything is on loopback: an HTTP_PROXY in the environment must not apply.
        let http = reqwest::Client::builder()
            .no_proxy()
            .build()
            .context("building the HTTP client")?;
        Ok(Self {
            server,
            http,
            delivered,
            stop,
            serving,
            _dir: dir,
        })
    }

    /// Posts a CloudEvent from `from`, as the Awala Internet Endpoint would; 204 or error.
    async fn post(
        &self,
        from: &User,
        parcel: &str,
        kind: &str,
        body: Vec<u8>,
    ) -> anyhow::Result<StatusCode> {
        let mut request = self.http.post(&self.server).timeout(WAIT);
        for (name, value) in headers(from, parcel, kind) {
            request = request.header(name, value);
        }
        let response = request
            .body(body)
            .send()
            .await
            .context("posting to the server")?;
        let status = response.status();
        if status != StatusCode::NO_CONTENT {
            bail!("the server answered {status}, not 204");
        }
        Ok(status)
    }

    /// The next `n` events the broker stand-in receives.
    async fn receive(&mut self, n: usize) -> anyhow::Result<Vec<CloudEvent>> {
        let mut events = Vec::with_capacity(n);
        while events.len() < n {
            match tokio::time::timeout(WAIT, self.delivered.recv()).await {
                Ok(Some(event)) => events.push(event),
                Ok(None) => bail!("the broker stand-in stopped"),
                Err(_) => bail!("nothing delivered within {WAIT:?}"),
            }
        }
        Ok(events)
    }

    /// Stops the server cleanly.
    async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(());
        self.serving.await.context("server task")?
    }
}

/// Alice and Bob, each on an Awala endpoint of their own.
fn users(out: &mut impl Write) -> anyhow::Result<(User, User)> {
    say(out, "\nGenerating two Awala endpoints with RSA-2048 keys…")?;
    let alice = User {
        name: "Alice",
        veraid: "alice@example.com",
        endpoint: Endpoint::generate(2048)?,
    };
    let bob = User {
        name: "Bob",
        veraid: "bob@example.org",
        endpoint: Endpoint::generate(2048)?,
    };
    for u in [&alice, &bob] {
        say(
            out,
            &format!(
                "  {:<5} is {} on endpoint {}",
                u.name,
                u.veraid,
                u.endpoint.id()
            ),
        )?;
    }
    Ok((alice, bob))
}

/// Phase 2, from step `first_step`: each user authorises the other with connection
/// params holding a PDA, and each receives the other's, as a pairing completion or
/// (the 2023 app's `pairing-auth`) `unchanged`.
async fn authorise_each_other(
    out: &mut impl Write,
    args: &DemoArgs,
    stage: &mut Stage,
    (alice, bob): (&User, &User),
    first_step: u32,
    unchanged: bool,
) -> anyhow::Result<()> {
    let auth_type = if unchanged {
        PAIRING_AUTH_TYPE
    } else {
        PAIRING_AUTH_TMP_TYPE
    };
    step(
        out,
        first_step,
        "Each authorises the other to send it parcels (connection params with a PDA)",
    )?;
    for (parcel, (granter, grantee)) in (3..).zip([(alice, bob), (bob, alice)]) {
        let params = connection_params(
            &granter.endpoint,
            grantee.endpoint.spki_der(),
            &CertificateOptions::pda(Duration::from_secs(30 * 86_400)),
            &[],
            "demo.relaycorp.tech",
        )?;
        say(
            out,
            &format!(
                "  {} signs a 30-day PDA for {}'s key: {} bytes of DER",
                granter.name,
                grantee.name,
                params.len()
            ),
        )?;
        let id = format!("auth-{parcel}");
        show_request(out, args, granter, &id, auth_type, &params)?;
        let status = stage.post(granter, &id, auth_type, params).await?;
        say(
            out,
            &format!(
                "  server answered {status}: the PDA was issued by {}, so it goes to {}",
                granter.name, grantee.name
            ),
        )?;
    }

    if unchanged {
        step(
            out,
            first_step + 1,
            "Each receives the other's authorisation, unchanged",
        )?;
    } else {
        step(
            out,
            first_step + 1,
            "Each receives a pairing completion from the other",
        )?;
    }
    let completions = stage.receive(2).await?;
    for (user, other) in [(alice, bob), (bob, alice)] {
        let event = addressed_to(&completions, user)?;
        show_delivery(out, args, event)?;
        // A forwarded authorisation is the params alone: the granter is their identity key.
        let (granter, params_der) = if unchanged {
            expect_type(event, PAIRING_AUTH_TYPE)?;
            (None, event.data.clone())
        } else {
            expect_type(event, PAIRING_COMPLETION_TYPE)?;
            let (granter, params) = read_completion(&event.data)?;
            (Some(granter), params)
        };
        let params = decode_connection_params(&params_der)
            .map_err(|e| anyhow::anyhow!("connection params: {e:?}"))?;
        let granter =
            granter.unwrap_or_else(|| EndpointId::from_spki_der(&params.identity_key_der));
        if granter != *other.endpoint.id()
            || params.pda.subject_rsa_key_der.as_deref() != Some(user.endpoint.spki_der())
        {
            bail!(
                "{}'s completion is not {}'s PDA for it",
                user.name,
                other.name
            );
        }
        say(
            out,
            &format!(
                "  {} holds {}'s connection params: a PDA for its own key, issued by endpoint {}",
                user.name, other.name, granter
            ),
        )?;
    }
    say(
        out,
        "\nPaired: Alice and Bob can now send each other parcels through Awala.",
    )
}

fn say(out: &mut impl Write, text: &str) -> anyhow::Result<()> {
    writeln!(out, "{text}")?;
    out.flush()?;
    Ok(())
}

fn step(out: &mut impl Write, n: u32, title: &str) -> anyhow::Result<()> {
    say(out, &format!("\n{n}. {title}"))
}

fn shorten(text: &str) -> String {
    if text.len() <= 72 {
        text.to_owned()
    } else {
        format!("{}…({} chars)", &text[..60], text.len())
    }
}

/// Shows the body of a message, shortened unless `--verbose`.
fn printable(args: &DemoArgs, kind: &str, body: &[u8]) -> String {
    let der = [
        PAIRING_AUTH_TMP_TYPE,
        PAIRING_AUTH_TYPE,
        CONTACT_PAIRING_REQUEST_TYPE,
        CONTACT_PAIRING_FAILURE_TYPE,
    ];
    let text = if der.contains(&kind) {
        format!("<DER> {}", STANDARD.encode(body))
    } else {
        String::from_utf8_lossy(body).into_owned()
    };
    if args.verbose {
        text
    } else {
        text.split(',').map(shorten).collect::<Vec<_>>().join(",")
    }
}

fn show_request(
    out: &mut impl Write,
    args: &DemoArgs,
    from: &User,
    parcel: &str,
    kind: &str,
    body: &[u8],
) -> anyhow::Result<()> {
    say(
        out,
        &format!(
            "  POST {} CloudEvent from the Awala Internet Endpoint: parcel {parcel} from {}",
            "/", from.name
        ),
    )?;
    if args.verbose {
        for (name, value) in headers(from, parcel, kind) {
            say(out, &format!("    {name}: {value}"))?;
        }
    } else {
        say(out, &format!("    content-type: {kind}"))?;
    }
    say(out, &format!("    body: {}", printable(args, kind, body)))
}

fn show_delivery(out: &mut impl Write, args: &DemoArgs, event: &CloudEvent) -> anyhow::Result<()> {
    let kind = event.data_content_type.as_deref().unwrap_or_default();
    say(
        out,
        &format!(
            "  the broker stand-in received event {}… for endpoint {}",
            &event.id[..16.min(event.id.len())],
            event.subject.as_deref().unwrap_or_default()
        ),
    )?;
    say(out, &format!("    content-type: {kind}"))?;
    if args.verbose {
        say(out, &format!("    ce-source: {}", event.source))?;
        say(out, &format!("    ce-type: {}", event.ty))?;
        for (name, value) in &event.extensions {
            say(out, &format!("    ce-{name}: {value}"))?;
        }
    }
    say(
        out,
        &format!("    body: {}", printable(args, kind, &event.data)),
    )
}

fn headers<'a>(from: &'a User, parcel: &'a str, kind: &'a str) -> Vec<(&'static str, &'a str)> {
    vec![
        ("ce-specversion", "1.0"),
        ("ce-id", parcel),
        ("ce-source", from.endpoint.id().as_str()),
        ("ce-type", INCOMING_TYPE),
        ("ce-subject", SERVER_ID),
        ("content-type", kind),
    ]
}

fn addressed_to<'a>(events: &'a [CloudEvent], user: &User) -> anyhow::Result<&'a CloudEvent> {
    events
        .iter()
        .find(|e| e.subject.as_deref() == Some(user.endpoint.id().as_str()))
        .with_context(|| format!("nothing was delivered to {}", user.name))
}

fn expect_type(event: &CloudEvent, content_type: &str) -> anyhow::Result<()> {
    if event.data_content_type.as_deref() != Some(content_type) {
        bail!(
            "expected a {content_type}, got {:?}",
            event.data_content_type
        );
    }
    Ok(())
}

/// A stand-in for the Knative broker: accepts every CloudEvent (202) and passes it on.
async fn start_sink() -> anyhow::Result<(SocketAddr, mpsc::UnboundedReceiver<CloudEvent>)> {
    let (tx, rx) = mpsc::unbounded_channel();
    let app = axum::Router::new()
        .route("/", axum::routing::post(accept))
        .with_state(tx);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
        .await
        .context("binding the broker stand-in")?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok((addr, rx))
}

async fn accept(
    State(tx): State<mpsc::UnboundedSender<CloudEvent>>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let headers = headers.iter().map(|(n, v)| (n.as_str(), v.as_bytes()));
    match decode_http(headers, body.to_vec()) {
        Ok(event) => {
            let _ = tx.send(event);
            StatusCode::ACCEPTED
        }
        Err(_) => StatusCode::BAD_REQUEST,
    }
}
