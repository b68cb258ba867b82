//! `docs/operations.md` checked against the binary: every setting `serve --help` lists,
//! every command `--help` lists, and every metric family and label `GET /metrics`
//! exposes must be mentioned in it, and its trust anchors file must be the built-in
//! anchors.

use std::collections::BTreeSet;
use std::process::Command;

use letro_server::bundles::LETRO_SERVICE_OID;
use letro_server::codec::contact_pairing::encode_contact_pairing_request;
use veraid::testing::{KeyPair, MockHierarchy};
use veraid::{Period, TrustAnchors};

use crate::support::*;

const SIGNED_REQUEST: &str = "application/vnd.relaycorp.letro.contact-pairing.request";

/// The operator's guide, read at run time so that editing it needs no rebuild.
fn operations_md() -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/operations.md");
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {path}: {e}"))
}

/// Whether `name` occurs in `doc` as a whole word: not inside a longer identifier,
/// environment variable, flag or command (`PORT` is not found in `LETRO_PORTS`).
fn mentions(doc: &str, name: &str) -> bool {
    let word = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-';
    doc.match_indices(name).any(|(at, _)| {
        let before = doc[..at].chars().next_back();
        let after = doc[at + name.len()..].chars().next();
        !before.is_some_and(word) && !after.is_some_and(word)
    })
}

/// `letro-server ARGS`, in an empty environment, which must succeed; its stdout.
fn run(args: &[&str]) -> String {
    let out = Command::new(BIN)
        .env_clear()
        .args(args)
        .output()
        .expect("run letro-server");
    assert!(
        out.status.success(),
        "letro-server {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 help")
}

/// The names of the "Commands:" section of a clap help text.
fn commands(help: &str) -> Vec<String> {
    help.lines()
        .skip_while(|l| l.trim() != "Commands:")
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

/// Fails listing everything in `missing`.
fn assert_none_missing(missing: &[String], what: &str) {
    assert!(
        missing.is_empty(),
        "docs/operations.md does not mention these {what}: {missing:?}"
    );
}

#[test]
fn every_setting_of_serve_is_documented() {
    let help = run(&["serve", "--help"]);
    // `[env: NAME=]`, or `[env: NAME]` for the values clap hides.
    let env: BTreeSet<String> = help
        .split("[env: ")
        .skip(1)
        .filter_map(|rest| rest.split(['=', ']']).next())
        .map(|name| name.trim().to_owned())
        .collect();
    let flags: BTreeSet<String> = help
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("--"))
        .filter_map(|l| l.split([' ', '<']).next())
        .filter(|flag| *flag != "help")
        .map(|flag| format!("--{flag}"))
        .collect();
    assert!(
        env.contains("DATABASE_URL") && env.contains("K_SINK"),
        "{help}"
    );
    assert!(env.len() >= 20 && flags.len() >= 20, "{env:?}\n{flags:?}");
    let doc = operations_md();
    let missing: Vec<String> = env
        .iter()
        .chain(&flags)
        .filter(|name| !mentions(&doc, name))
        .cloned()
        .collect();
    assert_none_missing(&missing, "settings of `letro-server serve --help`");
}

#[test]
fn every_command_is_documented() {
    let top = commands(&run(&["--help"]));
    assert!(top.iter().any(|c| c == "serve"), "{top:?}");
    let mut all = Vec::new();
    for command in &top {
        all.push(format!("letro-server {command}"));
        if command == "help" {
            continue;
        }
        // `outbox` and `requests` have their own commands (clap adds `help` to each).
        for sub in commands(&run(&[command, "--help"])) {
            if sub != "help" {
                all.push(format!("letro-server {command} {sub}"));
            }
        }
    }
    assert!(all.len() >= 12, "{all:?}");
    let doc = operations_md();
    let missing: Vec<String> = all.into_iter().filter(|c| !mentions(&doc, c)).collect();
    assert_none_missing(&missing, "commands of `letro-server --help`");
}

#[tokio::test]
async fn every_metric_and_label_is_documented() {
    let (_dir, db) = temp_db();
    let mut sink = FakeSink::start().await;
    // A VeraId organisation under a root of its own, which the server trusts.
    let now = i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("after 1970")
            .as_secs(),
    )
    .expect("i64");
    let mut hierarchy = MockHierarchy::new(now);
    let key = KeyPair::generate(2048);
    let organisation = hierarchy.organisation("example.com", key.clone());
    let mut config = test_config(&db, Some(&sink.url));
    config.veraid_trust_anchors = hierarchy.trust_anchors();
    let app = TestApp::spawn(config).await;
    // Traffic that gives every labelled family samples: a pair matched and delivered
    // (`result`), a refusal (`reason`), answers (`status`) and commits; a signed request
    // that does not verify (`check`), and one signed by the organisation's bot, which
    // verifies (`cache`) and gets a failure message (`reason`).
    let p = parties();
    assert_eq!(
        app.post_request(&p[0], "docs-1", "a@x.io", "b@y.io").await,
        204
    );
    assert_eq!(
        app.post_request(&p[1], "docs-2", "b@y.io", "a@x.io").await,
        204
    );
    assert_eq!(
        app.post_message(&p[2].id, "docs-3", REQUEST_TYPE, "junk")
            .await,
        204
    );
    assert_eq!(
        app.post_message(&p[2].id, "docs-4", SIGNED_REQUEST, "not a bundle")
            .await,
        204
    );
    let bot = organisation.member(None, key, now).sign(
        &encode_contact_pairing_request(&p[2].key_der, "b@y.io"),
        LETRO_SERVICE_OID,
        Period::new(now - 60, now + 86_400),
    );
    assert_eq!(
        app.post_message(&p[2].id, "docs-5", SIGNED_REQUEST, bot)
            .await,
        204
    );
    sink.take(3).await;
    // The sink has the matches and the failure; a delivery is counted once its 2xx is
    // recorded.
    let delivered = "letro_outbox_deliveries_total{result=\"delivered\"}";
    for _ in 0..100 {
        if app.metric(delivered).await == 3 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let text = app.metrics_text().await;
    app.stop().await;

    // `# TYPE <family> <type>`: a counter's samples are `<family>_total`, a histogram's
    // `<family>_bucket`, `_sum` and `_count`.
    let families: Vec<(String, String)> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .map(|(name, ty)| (name.to_owned(), ty.trim().to_owned()))
        .collect();
    assert!(
        families
            .iter()
            .any(|(n, t)| n == "letro_events" && t == "counter"),
        "{text}"
    );
    let mut names = Vec::new();
    for (family, ty) in &families {
        match ty.as_str() {
            "counter" => names.push(format!("{family}_total")),
            "histogram" => {
                names.push(family.clone());
                names.push(format!("{family}_bucket"));
            }
            _ => names.push(family.clone()),
        }
    }
    // Every label name on a sample line: `name{label="value",…} value`.
    let labels: BTreeSet<String> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once('{').map(|(_, rest)| rest))
        .filter_map(|rest| rest.split_once('}').map(|(labels, _)| labels))
        .flat_map(|labels| labels.split(','))
        .filter_map(|pair| pair.split_once('=').map(|(name, _)| name.to_owned()))
        .collect();
    for label in [
        "content_type",
        "outcome",
        "reason",
        "result",
        "status",
        "le",
        "check",
        "cache",
        "step",
    ] {
        assert!(labels.contains(label), "no {label} label in:\n{text}");
    }

    let doc = operations_md();
    let missing: Vec<String> = names
        .iter()
        .filter(|name| !mentions(&doc, name))
        .chain(
            labels
                .iter()
                .filter(|label| !mentions(&doc, &format!("`{label}`"))),
        )
        .cloned()
        .collect();
    assert_none_missing(&missing, "metrics or labels of `GET /metrics`");
}

/// The trust anchors file shown in §2.2 ("The built-in anchors, as a file") is a valid
/// `--veraid-trust-anchors` file holding exactly the anchors built in.
#[test]
fn the_documented_trust_anchors_file_is_the_built_in_one() {
    let doc = operations_md();
    let (_, after) = doc
        .split_once("The built-in anchors, as a file:")
        .expect("docs/operations.md §2.2 shows the built-in anchors as a file");
    let block = after
        .split("```")
        .nth(1)
        .and_then(|b| b.split_once('\n'))
        .map(|(_fence, body)| body)
        .expect("a code block");
    let anchors = TrustAnchors::parse(block).unwrap_or_else(|e| panic!("{e}:\n{block}"));
    assert_eq!(anchors, TrustAnchors::iana(), "{block}");
    for tag in anchors.key_tags() {
        assert!(mentions(&doc, &tag.to_string()), "key tag {tag}");
    }
}

/// The sample names of the metrics table of §3 (first column).
fn documented_samples(doc: &str) -> Vec<String> {
    let section = doc
        .split_once("## 3. Metrics")
        .and_then(|(_, rest)| rest.split_once("## 4. Logs"))
        .map(|(section, _)| section)
        .expect("docs/operations.md has §3 Metrics");
    section
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split_once('`').map(|(name, _)| name.to_owned()))
        .filter(|name| name.starts_with("letro_") || name.starts_with("process_"))
        .collect()
}

/// Dashboards and `rate()` alerts need every series from the start: a fresh server's
/// first scrape has a sample of every metric the table of §3 lists (labelled counters
/// and histograms at zero for their known label values), the process metrics and the
/// build's version and commit among them.
#[tokio::test]
async fn a_fresh_servers_first_scrape_has_every_documented_metric() {
    let doc = operations_md();
    let documented = documented_samples(&doc);
    assert!(documented.len() >= 20, "{documented:?}");
    for name in [
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_max_fds",
        "process_start_time_seconds",
        "letro_build_info",
    ] {
        assert!(documented.iter().any(|d| d == name), "{name} is not in §3");
    }
    let (_dir, db) = temp_db();
    let app = TestApp::spawn(test_config(&db, None)).await;
    let text = app.metrics_text().await;
    app.stop().await;
    let samples: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
    let missing: Vec<&String> = documented
        .iter()
        .filter(|name| {
            // `name 0`, `name{…} 0`, or a histogram's `name_bucket{…}`.
            !samples.iter().any(|s| {
                s.strip_prefix(name.as_str())
                    .is_some_and(|rest| rest.starts_with([' ', '{']) || rest.starts_with("_bucket"))
            })
        })
        .collect();
    assert!(missing.is_empty(), "no sample of {missing:?} in:\n{text}");
    // A labelled family shows each of its known values, at zero.
    for sample in [
        "letro_refusals_total{reason=\"key_not_sender\"} 0",
        "letro_outbox_deliveries_total{result=\"dropped\"} 0",
        "letro_events_total{content_type=\"pairing-request\",outcome=\"unavailable\"} 0",
        "letro_read_timeouts_total{reason=\"header\"} 0",
        "letro_connections_refused_total{reason=\"over_limit\"} 0",
    ] {
        assert!(text.lines().any(|l| l == sample), "no {sample} in:\n{text}");
    }
    let version = format!("version=\"{}\"", env!("CARGO_PKG_VERSION"));
    let build = samples
        .iter()
        .find(|s| s.starts_with("letro_build_info{"))
        .expect("letro_build_info");
    assert!(
        build.contains(&version) && build.contains("commit=\""),
        "{build}"
    );
    assert!(build.ends_with(" 1"), "{build}");
}
