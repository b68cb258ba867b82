//! The operator's commands: `check-config`, `outbox status|list|retry`,
//! `requests stats|purge-expired`. Each renders a report as text (or JSON) for the
//! binary to print; none prints a VeraId, a digest, a key or a message body.

use std::fmt::Write as _;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use serde_json::json;

use crate::app::{Opening, open_store};
use crate::cli::{DatabaseArgs, OutboxCommand, RequestsCommand};
use crate::clock;
use crate::codec::pairing::MatchOrder;
use crate::config::{Config, DatabaseConfig, HumanDuration, SqliteSync, defaults};
use crate::domain::{MessageId, Timestamp};
use crate::store::Store;
use crate::telemetry::redacted_url;

/// Runs an `outbox` subcommand and returns what to print.
pub async fn outbox(command: OutboxCommand) -> anyhow::Result<String> {
    let now = clock::now();
    match command {
        OutboxCommand::Status(report) => {
            let s = with_store(&report.database, "reading the outbox", |store| async move {
                store.outbox_status(now).await
            })
            .await?;
            if report.json {
                let by_kind: serde_json::Map<_, _> = s
                    .by_kind
                    .iter()
                    .map(|(k, n)| (k.name().to_owned(), json!(n)))
                    .collect();
                return Ok(json_line(&json!({
                    "depth": s.depth,
                    "due": s.due,
                    "retrying": s.retrying,
                    "oldest_created_at": s.oldest.map(rfc3339),
                    "oldest_age_seconds": s.oldest.map(|t| age(now, t).as_secs()),
                    "next_attempt_at": s.next_attempt.map(rfc3339),
                    "by_kind": by_kind,
                })));
            }
            let mut out = String::new();
            let _ = writeln!(out, "messages waiting      {}", s.depth);
            for (kind, n) in &s.by_kind {
                let _ = writeln!(out, "  {:<20}{n}", kind.name());
            }
            let _ = writeln!(out, "due now               {}", s.due);
            let _ = writeln!(out, "failed at least once  {}", s.retrying);
            if let Some(oldest) = s.oldest {
                let _ = writeln!(
                    out,
                    "oldest                created {} ago ({})",
                    human(age(now, oldest)),
                    rfc3339(oldest)
                );
            }
            if let Some(next) = s.next_attempt {
                let _ = writeln!(out, "next attempt          {}", when(now, next));
            }
            Ok(out)
        }
        OutboxCommand::List { report, limit } => {
            let list = with_store(&report.database, "reading the outbox", |store| async move {
                store.outbox_list(limit as usize).await
            })
            .await?;
            if report.json {
                let mut out = String::new();
                for m in &list {
                    out.push_str(&json_line(&json!({
                        "id": m.id.as_str(),
                        "kind": m.kind.name(),
                        "recipient": m.recipient.as_str(),
                        "created_at": rfc3339(m.created),
                        "expires_at": rfc3339(m.expiry),
                        "attempts": m.attempts,
                        "next_attempt_at": rfc3339(m.next_attempt),
                        "last_error": m.last_error,
                    })));
                }
                return Ok(out);
            }
            let mut out = String::new();
            if list.is_empty() {
                out.push_str("the outbox is empty\n");
            }
            for m in &list {
                let _ = writeln!(
                    out,
                    "{}  {}  to {}\n    created {} ago, expires {}, {} failed attempt(s), next attempt {}",
                    m.id.as_str(),
                    m.kind.name(),
                    m.recipient.as_str(),
                    human(age(now, m.created)),
                    rfc3339(m.expiry),
                    m.attempts,
                    when(now, m.next_attempt),
                );
                if let Some(e) = &m.last_error {
                    let _ = writeln!(out, "    last error: {e}");
                }
            }
            Ok(out)
        }
        OutboxCommand::Retry { database, ids, all } => {
            let wanted = (!all).then(|| {
                let distinct: std::collections::BTreeSet<&String> = ids.iter().collect();
                distinct
                    .into_iter()
                    .map(|id| MessageId::from_stored(id.clone()))
                    .collect::<Vec<_>>()
            });
            let named = wanted.as_ref().map(Vec::len);
            let changed = with_store(&database, "updating the outbox", |store| async move {
                store.retry_now(wanted, now).await
            })
            .await?;
            let mut out = format!("{changed} message(s) made due now\n");
            if let Some(named) = named
                && (changed as usize) < named
            {
                let _ = writeln!(
                    out,
                    "{} id(s) not retried: not in the outbox, or not failed yet (a message \
                     on its first attempt may be in flight; retrying it would send it twice)",
                    named - changed as usize
                );
            }
            Ok(out)
        }
    }
}

/// Runs a `requests` subcommand and returns what to print.
pub async fn requests(command: RequestsCommand) -> anyhow::Result<String> {
    let now = clock::now();
    match command {
        RequestsCommand::Stats(report) => {
            let s = with_store(
                &report.database,
                "reading pending requests",
                |store| async move { store.request_stats(now).await },
            )
            .await?;
            if report.json {
                return Ok(json_line(&json!({
                    "waiting": s.live,
                    "expired_not_purged": s.expired,
                    "senders": s.senders,
                    "oldest_created_at": s.oldest.map(rfc3339),
                    "oldest_age_seconds": s.oldest.map(|t| age(now, t).as_secs()),
                    "processed_event_keys": s.processed_events,
                })));
            }
            let mut out = String::new();
            let _ = writeln!(out, "waiting for their reverse half  {}", s.live);
            let _ = writeln!(out, "from distinct endpoints         {}", s.senders);
            let _ = writeln!(out, "expired, not yet purged         {}", s.expired);
            if let Some(oldest) = s.oldest {
                let _ = writeln!(
                    out,
                    "oldest waiting                  {} ago",
                    human(age(now, oldest))
                );
            }
            let _ = writeln!(
                out,
                "processed-event keys kept       {}",
                s.processed_events
            );
            Ok(out)
        }
        RequestsCommand::PurgeExpired(database) => {
            let report = with_store(&database, "purging", |store| async move {
                store.purge_expired(now).await
            })
            .await?;
            Ok(format!(
                "purged {} expired pairing request(s) and {} processed-event key(s)\n",
                report.requests, report.events
            ))
        }
    }
}

/// Opens the database as an admin command does, runs `f` on it, and closes it whatever
/// `f` came to; `what` names the work in an error.
async fn with_store<T, F, Fut>(
    database: &DatabaseArgs,
    what: &'static str,
    f: F,
) -> anyhow::Result<T>
where
    F: FnOnce(Arc<dyn Store>) -> Fut,
    Fut: Future<Output = crate::store::Result<T>>,
{
    let store = open_store(&database.to_config()?, Opening::Admin).await?;
    let result = f(store.clone()).await;
    store.close().await;
    result.context(what)
}

/// What `check-config` prints for a valid configuration: every setting, secrets hidden,
/// then warnings about choices that are valid but risky.
pub fn describe(config: &Config) -> String {
    let mut out = String::from("configuration is valid\n\n");
    let d = |v: Duration| HumanDuration(v).to_string();
    let database = match &config.database {
        DatabaseConfig::Sqlite { path, synchronous } => format!(
            "SQLite file {} (synchronous={})",
            path.display(),
            match synchronous {
                SqliteSync::Full => "full",
                SqliteSync::Normal => "normal",
            }
        ),
        DatabaseConfig::Postgres { url, pool } => format!(
            "PostgreSQL {url} (at most {} connections, timeout {})",
            pool.max_connections,
            d(pool.timeout)
        ),
    };
    let cap = |n: u32| {
        if n == u32::MAX {
            "no cap".to_owned()
        } else {
            n.to_string()
        }
    };
    let rows: Vec<(&str, String)> = vec![
        ("listen on", config.bind.to_string()),
        ("database", database),
        (
            "sink",
            config
                .sink
                .as_ref()
                .map_or("none: outgoing messages wait in the outbox".into(), |u| {
                    redacted_url(u)
                }),
        ),
        (
            "sink CA certificates",
            match &config.sink_ca {
                None => "the system's roots only".into(),
                Some(ca) => format!(
                    "the system's roots and {} from {}: {}",
                    ca.certificates.len(),
                    ca.file.display(),
                    ca.certificates
                        .iter()
                        .map(|c| format!("{} (until {})", c.subject, c.not_after))
                        .collect::<Vec<_>>()
                        .join("; ")
                ),
            },
        ),
        (
            "extensions on outgoing events",
            if config.ce_overrides.is_empty() {
                "none".into()
            } else {
                config
                    .ce_overrides
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            },
        ),
        ("largest body", format!("{} bytes", config.max_body_bytes)),
        (
            "retry delays",
            format!(
                "from {} doubling up to {}",
                d(config.retry_base_delay),
                d(config.retry_max_delay)
            ),
        ),
        ("sink timeout", d(config.sink_timeout)),
        (
            "deliveries in flight",
            config.delivery_concurrency.to_string(),
        ),
        ("message expiry", d(config.message_ttl)),
        ("pairing requests wait", d(config.request_ttl)),
        (
            "VeraId digest secret",
            if config.veraid_secret.is_some() {
                "given (hidden)".into()
            } else {
                "kept in the database (generated on first start)".into()
            },
        ),
        ("purge every", d(config.purge_interval)),
        ("shutdown grace", d(config.shutdown_timeout)),
        ("waiting requests per sender", cap(config.limits.per_sender)),
        (
            "waiting requests per sender per target",
            cap(config.limits.per_target),
        ),
        (
            "waiting requests in all",
            match config.pending_ceiling {
                Some(n) => format!("{n} (counted every {})", d(config.pending_count_interval)),
                None => "no ceiling".into(),
            },
        ),
        (
            "request from another endpoint for a waiting pair",
            if config.limits.refuse_endpoint_replacement {
                "refused".into()
            } else {
                "replaces it (logged and counted)".into()
            },
        ),
        (
            "tmp pairing matches",
            match config.tmp_match_order {
                MatchOrder::ContactFirst => {
                    "contact-first: contact's VeraId, then the recipient's (protocol document)"
                }
                MatchOrder::RecipientFirst => {
                    "recipient-first: recipient's VeraId, then the contact's (Letro for Android 2023)"
                }
            }
            .into(),
        ),
        (
            "VeraId trust anchors",
            {
                let tags: Vec<String> = config
                    .veraid_trust_anchors
                    .key_tags()
                    .iter()
                    .map(u16::to_string)
                    .collect();
                match &config.veraid_trust_anchors_file {
                    Some(file) => format!("key tags {} (from {})", tags.join(", "), file.display()),
                    None => format!("key tags {} (IANA root, built in)", tags.join(", ")),
                }
            },
        ),
        (
            "header / body read timeouts",
            format!(
                "{} / {}",
                d(config.header_read_timeout),
                d(config.body_read_timeout)
            ),
        ),
        ("connections at once", config.max_connections.to_string()),
        (
            "repeated log lines summarised every",
            d(config.log_summary_interval),
        ),
    ];
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    for (k, v) in rows {
        let _ = writeln!(out, "{k:<width$}  {v}");
    }
    let mut warnings = Vec::new();
    if config.sink.is_none() {
        warnings.push("no sink (--sink / K_SINK): nothing will be delivered".to_owned());
    }
    if let DatabaseConfig::Sqlite {
        synchronous: SqliteSync::Normal,
        ..
    } = config.database
    {
        warnings.push(
            "SQLite synchronous=normal: acknowledged requests can be lost on power failure"
                .to_owned(),
        );
    }
    if config.sink_ca.is_some()
        && config
            .sink
            .as_ref()
            .is_some_and(|url| url.scheme() != "https")
    {
        warnings.push(
            "--sink-ca-file is set but the sink is not https: its certificates are not used"
                .to_owned(),
        );
    }
    if config.noop_route {
        warnings.push("the benchmark's POST /noop route is on".to_owned());
    }
    if config.sink_timeout > defaults::SINK_TIMEOUT * 6 {
        warnings.push(format!(
            "a sink timeout of {} holds a message that long before another replica may retry it",
            d(config.sink_timeout)
        ));
    }
    if !warnings.is_empty() {
        out.push('\n');
        for w in warnings {
            let _ = writeln!(out, "warning: {w}");
        }
    }
    out
}

fn json_line(value: &serde_json::Value) -> String {
    format!("{value}\n")
}

fn age(now: Timestamp, then: Timestamp) -> Duration {
    Duration::from_millis(u64::try_from(now.0.saturating_sub(then.0)).unwrap_or(0))
}

/// A duration to the second, as humantime prints it ("3m 20s").
fn human(d: Duration) -> String {
    humantime::format_duration(Duration::from_secs(d.as_secs())).to_string()
}

fn when(now: Timestamp, t: Timestamp) -> String {
    if t <= now {
        "due now".to_owned()
    } else {
        format!("in {}", human(age(t, now)))
    }
}

fn rfc3339(t: Timestamp) -> String {
    let nanos = i128::from(t.0) * 1_000_000;
    time::OffsetDateTime::from_unix_timestamp_nanos(nanos)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| t.0.to_string())
}
