//! The deployment files, checked without a Docker engine or a cluster: every YAML
//! document under deploy/ parses, and the keys that matter agree with the binary (its
//! flags' environment variables, its probe paths, its port), with the codec (the incoming
//! event type) and with each other (names, Secret keys, broker, user id). The Dockerfile
//! is read line by line for its stages, user, build command and entry point.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use clap::{CommandFactory, Parser};
use letro_server::cli::{Cli, Command as CliCommand};
use letro_server::codec::cloudevent::INCOMING_TYPE;
use letro_server::config::{Config, DatabaseConfig, defaults};
use serde::Deserialize;
use serde_yaml_ng::Value;

use crate::support::BIN;

/// Every file under deploy/ that holds YAML, with the one document it must hold.
const EXPECTED: &[(&str, &str, &str)] = &[
    ("dead-letter.yaml", "serving.knative.dev/v1", "Service"),
    (
        "kustomization.yaml",
        "kustomize.config.k8s.io/v1beta1",
        "Kustomization",
    ),
    ("secret.example.yaml", "v1", "Secret"),
    ("service.yaml", "serving.knative.dev/v1", "Service"),
    ("sinkbinding.yaml", "sources.knative.dev/v1", "SinkBinding"),
    ("trigger.yaml", "eventing.knative.dev/v1", "Trigger"),
];

/// Files that hold placeholders and must not be applied by the kustomization.
const NOT_APPLIED: &[&str] = &["kustomization.yaml", "secret.example.yaml"];

/// Environment variables that the platform sets, never the Service: Knative reserves
/// PORT, and the SinkBinding injects K_SINK and K_CE_OVERRIDES.
const PLATFORM_ENV: &[&str] = &["PORT", "K_SINK", "K_CE_OVERRIDES"];

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// One YAML document and the file it came from.
struct Doc {
    file: String,
    value: Value,
}

/// Every YAML document of every .yaml/.yml file under deploy/, files in name order.
fn deploy_docs() -> Vec<Doc> {
    let dir = repo().join("deploy");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
        .collect();
    files.sort();
    let mut docs = Vec::new();
    for path in files {
        let file = path
            .file_name()
            .and_then(|n| n.to_str())
            .expect("a UTF-8 file name")
            .to_owned();
        let text = read(&path);
        for document in serde_yaml_ng::Deserializer::from_str(&text) {
            let value = Value::deserialize(document)
                .unwrap_or_else(|e| panic!("deploy/{file} is not valid YAML: {e}"));
            if !value.is_null() {
                docs.push(Doc {
                    file: file.clone(),
                    value,
                });
            }
        }
    }
    docs
}

/// The value at `path` (mapping keys, or indexes into sequences); panics naming the
/// missing part.
fn at<'a>(v: &'a Value, path: &[&str]) -> &'a Value {
    let mut current = v;
    for (i, key) in path.iter().enumerate() {
        let next = match key.parse::<usize>() {
            Ok(index) if current.is_sequence() => current.get(index),
            _ => current.get(*key),
        };
        current = next.unwrap_or_else(|| panic!("missing {}", path[..=i].join(".")));
    }
    current
}

fn text<'a>(v: &'a Value, path: &[&str]) -> &'a str {
    at(v, path)
        .as_str()
        .unwrap_or_else(|| panic!("{} is not a string: {:?}", path.join("."), at(v, path)))
}

fn int(v: &Value, path: &[&str]) -> i64 {
    at(v, path)
        .as_i64()
        .unwrap_or_else(|| panic!("{} is not an integer: {:?}", path.join("."), at(v, path)))
}

/// The only document of `file`.
fn doc<'a>(docs: &'a [Doc], file: &str) -> &'a Value {
    let mut found = docs.iter().filter(|d| d.file == file);
    let first = found
        .next()
        .unwrap_or_else(|| panic!("deploy/{file}: no document"));
    assert!(found.next().is_none(), "deploy/{file}: several documents");
    &first.value
}

fn container(service: &Value) -> &Value {
    let containers = at(service, &["spec", "template", "spec", "containers"])
        .as_sequence()
        .expect("containers is a list");
    assert_eq!(containers.len(), 1, "one container");
    &containers[0]
}

/// The Service's environment: (name, entry) in order.
fn env(service: &Value) -> Vec<(&str, &Value)> {
    at(container(service), &["env"])
        .as_sequence()
        .expect("env is a list")
        .iter()
        .map(|entry| (text(entry, &["name"]), entry))
        .collect()
}

/// The plain value of an environment variable of the Service.
fn env_value<'a>(service: &'a Value, name: &str) -> &'a str {
    let (_, entry) = env(service)
        .into_iter()
        .find(|(n, _)| *n == name)
        .unwrap_or_else(|| panic!("{name} is not set in service.yaml"));
    text(entry, &["value"])
}

/// Every environment variable name in `letro-server serve --help` (`[env: NAME=…]`).
fn env_names_in_help() -> BTreeSet<String> {
    let out = Command::new(BIN)
        .args(["serve", "--help"])
        .env_clear()
        .output()
        .expect("run letro-server serve --help");
    assert!(out.status.success(), "serve --help failed");
    let help = String::from_utf8(out.stdout).expect("UTF-8 help");
    let names: BTreeSet<String> = help
        .split("[env: ")
        .skip(1)
        .map(|rest| {
            rest.split(['=', ']'])
                .next()
                .expect("a name")
                .trim()
                .to_owned()
        })
        .collect();
    assert!(names.contains("DATABASE_URL"), "help: {help}");
    names
}

/// The instructions of the Dockerfile: (KEYWORD, arguments), continuation lines joined,
/// comments left out.
fn dockerfile() -> Vec<(String, String)> {
    let text = read(&repo().join("Dockerfile"));
    let mut instructions = Vec::new();
    let mut pending = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && pending.is_empty()) {
            continue;
        }
        let (part, continues) = match trimmed.strip_suffix('\\') {
            Some(part) => (part, true),
            None => (trimmed, false),
        };
        pending.push_str(part);
        pending.push(' ');
        if !continues {
            let logical = std::mem::take(&mut pending);
            let logical = logical.trim();
            let (keyword, args) = logical
                .split_once(char::is_whitespace)
                .unwrap_or((logical, ""));
            instructions.push((keyword.to_ascii_uppercase(), args.trim().to_owned()));
        }
    }
    assert!(
        pending.trim().is_empty(),
        "Dockerfile ends in a continuation"
    );
    instructions
}

/// An instruction's leading `--flag=value` options, and the words after them.
type Options<'a> = (Vec<(&'a str, &'a str)>, Vec<&'a str>);

/// `--flag=value` options at the start of an instruction's arguments, and the rest.
fn options(args: &str) -> Options<'_> {
    let mut opts = Vec::new();
    let mut rest = Vec::new();
    for word in args.split_whitespace() {
        match word.strip_prefix("--") {
            Some(opt) if rest.is_empty() => {
                let (k, v) = opt.split_once('=').unwrap_or((opt, ""));
                opts.push((k, v));
            }
            _ => rest.push(word),
        }
    }
    (opts, rest)
}

/// `KEY=value` pairs of an ENV instruction.
fn env_pairs(args: &str) -> Vec<(String, String)> {
    args.split_whitespace()
        .map(|pair| {
            let (k, v) = pair
                .split_once('=')
                .unwrap_or_else(|| panic!("ENV {args}: use KEY=value"));
            (k.to_owned(), v.trim_matches('"').to_owned())
        })
        .collect()
}

/// The numeric user id of `USER uid[:gid]` or `--chown=uid[:gid]`.
fn uid(spec: &str) -> u32 {
    let user = spec.split(':').next().unwrap_or_default();
    user.parse()
        .unwrap_or_else(|_| panic!("user {spec:?} is not numeric"))
}

/// The final stage's USER.
fn dockerfile_user() -> u32 {
    let instructions = dockerfile();
    let last_from = instructions
        .iter()
        .rposition(|(k, _)| k == "FROM")
        .expect("a FROM");
    let user = instructions[last_from..]
        .iter()
        .rev()
        .find(|(k, _)| k == "USER")
        .map(|(_, args)| args.clone())
        .expect("the final stage sets USER");
    uid(&user)
}

/// The server's configuration from the Service's environment, as the binary would build
/// it: each variable given as its flag (clap maps them one to one), values from the
/// example Secret where the Service takes them from the Secret.
fn config_from_service(service: &Value, secret: &Value) -> Config {
    let command = Cli::command();
    let serve = command.find_subcommand("serve").expect("serve subcommand");
    let flag_of = |name: &str| {
        command
            .get_arguments()
            .chain(serve.get_arguments())
            .find(|arg| arg.get_env().and_then(|e| e.to_str()) == Some(name))
            .map(|arg| {
                let long = arg.get_long().expect("a long flag");
                (format!("--{long}"), arg.get_action().takes_values())
            })
            .unwrap_or_else(|| panic!("no flag reads {name}"))
    };
    let mut argv = vec!["letro-server".to_owned(), "serve".to_owned()];
    // What the failure messages show: argv with the Secret's values left out.
    let mut shown = argv.clone();
    for (name, entry) in env(service) {
        let (value, show) = match entry.get("value") {
            Some(v) => {
                let v = v
                    .as_str()
                    .unwrap_or_else(|| panic!("{name}: quote the value, env values are strings"));
                (v.to_owned(), v.to_owned())
            }
            None => {
                let key = text(entry, &["valueFrom", "secretKeyRef", "key"]);
                let v = text(secret, &["stringData", key]).to_owned();
                (v, format!("<secret {key}>"))
            }
        };
        let (flag, takes_value) = flag_of(name);
        if takes_value {
            argv.extend([flag.clone(), value]);
            shown.extend([flag, show]);
        } else if value == "true" {
            argv.push(flag.clone());
            shown.push(flag);
        }
    }
    let cli = Cli::try_parse_from(&argv).unwrap_or_else(|e| panic!("{shown:?}: {e}"));
    let CliCommand::Serve(args) = cli.command else {
        panic!("serve expected");
    };
    args.to_config()
        .unwrap_or_else(|e| panic!("the Service's settings are refused: {e}"))
}

#[test]
fn every_yaml_document_parses_and_is_the_expected_kind() {
    let docs = deploy_docs();
    let files: BTreeSet<&str> = docs.iter().map(|d| d.file.as_str()).collect();
    let expected: BTreeSet<&str> = EXPECTED.iter().map(|(f, _, _)| *f).collect();
    assert_eq!(
        files, expected,
        "YAML files under deploy/ (update EXPECTED)"
    );
    for (file, api_version, kind) in EXPECTED {
        let v = doc(&docs, file);
        assert_eq!(text(v, &["apiVersion"]), *api_version, "deploy/{file}");
        assert_eq!(text(v, &["kind"]), *kind, "deploy/{file}");
        if *kind != "Kustomization" {
            assert!(!text(v, &["metadata", "name"]).is_empty(), "deploy/{file}");
            // The kustomization's namespace (the broker's) applies to every resource.
            assert!(
                at(v, &["metadata"]).get("namespace").is_none(),
                "deploy/{file} sets its own namespace"
            );
        }
    }
}

#[test]
fn the_kustomization_applies_every_manifest_but_the_example_secret() {
    let docs = deploy_docs();
    let kustomization = doc(&docs, "kustomization.yaml");
    let resources: BTreeSet<&str> = at(kustomization, &["resources"])
        .as_sequence()
        .expect("resources is a list")
        .iter()
        .map(|r| r.as_str().expect("a file name"))
        .collect();
    let manifests: BTreeSet<&str> = EXPECTED
        .iter()
        .map(|(f, _, _)| *f)
        .filter(|f| !NOT_APPLIED.contains(f))
        .collect();
    assert_eq!(resources, manifests);
    assert!(!text(kustomization, &["namespace"]).is_empty());
    // The `images` override must name the Service's image, or it changes nothing.
    let image = text(container(doc(&docs, "service.yaml")), &["image"]);
    let image_name = image.rsplit_once(':').map_or(image, |(name, _)| name);
    assert_eq!(text(kustomization, &["images", "0", "name"]), image_name);
}

#[test]
fn the_service_probes_runs_locked_down_and_keeps_a_replica() {
    let docs = deploy_docs();
    let service = doc(&docs, "service.yaml");
    let c = container(service);
    assert_eq!(
        int(c, &["ports", "0", "containerPort"]),
        i64::from(defaults::PORT)
    );
    assert_eq!(text(c, &["readinessProbe", "httpGet", "path"]), "/readyz");
    assert_eq!(text(c, &["livenessProbe", "httpGet", "path"]), "/livez");
    for probe in ["readinessProbe", "livenessProbe"] {
        if let Some(port) = at(c, &[probe, "httpGet"]).get("port") {
            assert_eq!(port.as_i64(), Some(i64::from(defaults::PORT)), "{probe}");
        }
    }
    if let Some(args) = c.get("args") {
        assert_eq!(args.as_sequence().map(Vec::len), Some(1));
        assert_eq!(text(c, &["args", "0"]), "serve");
    }

    let security = at(c, &["securityContext"]);
    assert_eq!(at(security, &["runAsNonRoot"]).as_bool(), Some(true));
    assert_eq!(
        at(security, &["readOnlyRootFilesystem"]).as_bool(),
        Some(true)
    );
    assert_eq!(
        at(security, &["allowPrivilegeEscalation"]).as_bool(),
        Some(false)
    );
    let dropped: Vec<&str> = at(security, &["capabilities", "drop"])
        .as_sequence()
        .expect("drop is a list")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(dropped, ["ALL"]);
    if security.get("runAsUser").is_some() {
        assert_eq!(
            int(security, &["runAsUser"]),
            i64::from(dockerfile_user()),
            "runAsUser and the Dockerfile's USER"
        );
    }
    for bound in ["requests", "limits"] {
        for resource in ["cpu", "memory"] {
            assert!(
                at(c, &["resources", bound]).get(resource).is_some(),
                "resources.{bound}.{resource}"
            );
        }
    }

    let spec = at(service, &["spec", "template", "spec"]);
    let concurrency = int(spec, &["containerConcurrency"]);
    assert!(
        (1..=1000).contains(&concurrency),
        "containerConcurrency {concurrency}"
    );
    // The outbox is drained by a loop inside the process: scaling to zero would stop
    // deliveries until the next incoming event.
    let annotations = at(service, &["spec", "template", "metadata", "annotations"]);
    let min_scale: u32 = text(annotations, &["autoscaling.knative.dev/min-scale"])
        .parse()
        .expect("min-scale is a number");
    assert!(min_scale >= 1, "min-scale {min_scale}");
    assert_eq!(env_value(service, "LETRO_LOG_FORMAT"), "json");
}

#[test]
fn every_environment_variable_is_one_the_binary_reads() {
    let known = env_names_in_help();
    for name in PLATFORM_ENV {
        assert!(known.contains(*name), "the binary does not read {name}");
    }
    let docs = deploy_docs();
    let service = doc(&docs, "service.yaml");
    let names: Vec<&str> = env(service).into_iter().map(|(n, _)| n).collect();
    for name in &names {
        assert!(
            known.contains(*name),
            "service.yaml sets {name}, which `letro-server serve --help` does not list"
        );
        assert!(
            !PLATFORM_ENV.contains(name),
            "service.yaml sets {name}, which the platform sets"
        );
    }
    assert_eq!(
        names.len(),
        names.iter().collect::<BTreeSet<_>>().len(),
        "a variable is set twice"
    );
    for (keyword, args) in dockerfile() {
        if keyword == "ENV" {
            for (name, _) in env_pairs(&args) {
                assert!(known.contains(&name), "the Dockerfile sets unknown {name}");
            }
        }
    }
}

#[test]
fn the_services_settings_are_accepted_and_use_postgresql_from_the_secret() {
    let docs = deploy_docs();
    let service = doc(&docs, "service.yaml");
    let secret = doc(&docs, "secret.example.yaml");
    // Credentials come from the Secret, never from a plain value.
    for name in ["DATABASE_URL", "LETRO_VERAID_SECRET"] {
        let (_, entry) = env(service)
            .into_iter()
            .find(|(n, _)| *n == name)
            .unwrap_or_else(|| panic!("{name} is not set in service.yaml"));
        assert!(entry.get("value").is_none(), "{name} has a plain value");
        at(entry, &["valueFrom", "secretKeyRef"]);
    }
    let config = config_from_service(service, secret);
    let DatabaseConfig::Postgres { pool, .. } = &config.database else {
        panic!("several replicas need PostgreSQL: {:?}", config.database);
    };
    // Every replica shares the VeraId key: 32 bytes, as `openssl rand -hex 32` makes.
    let key = config.veraid_secret.as_ref().expect("LETRO_VERAID_SECRET");
    assert_eq!(key.0.len(), 32);

    let annotations = at(service, &["spec", "template", "metadata", "annotations"]);
    let max_scale: u32 = text(annotations, &["autoscaling.knative.dev/max-scale"])
        .parse()
        .expect("max-scale is a number");
    assert!(
        max_scale * pool.max_connections < 100,
        "{max_scale} replicas × {} connections reach PostgreSQL's default max_connections",
        pool.max_connections
    );
    // Knative gives the pod timeoutSeconds to stop; the server must be done before.
    let timeout = int(service, &["spec", "template", "spec", "timeoutSeconds"]);
    assert!(
        u64::try_from(timeout).expect("positive") > config.shutdown_timeout.as_secs(),
        "timeoutSeconds {timeout} ≤ LETRO_SHUTDOWN_TIMEOUT"
    );
}

#[test]
fn secret_references_name_the_example_secret_and_its_keys() {
    let docs = deploy_docs();
    let secret = doc(&docs, "secret.example.yaml");
    let secret_name = text(secret, &["metadata", "name"]);
    let keys: BTreeSet<&str> = at(secret, &["stringData"])
        .as_mapping()
        .expect("stringData is a mapping")
        .keys()
        .map(|k| k.as_str().expect("string keys"))
        .collect();
    let service = doc(&docs, "service.yaml");
    let mut refs = 0;
    for (name, entry) in env(service) {
        if let Some(source) = entry.get("valueFrom") {
            let reference = at(source, &["secretKeyRef"]);
            assert_eq!(text(reference, &["name"]), secret_name, "{name}");
            let key = text(reference, &["key"]);
            assert!(keys.contains(key), "{name}: no key {key} in the Secret");
            refs += 1;
        }
    }
    assert_eq!(refs, 2, "DATABASE_URL and LETRO_VERAID_SECRET");
    // The example must not pass for a real credential.
    assert!(text(secret, &["stringData", "database-url"]).contains("CHANGE-ME"));
}

#[test]
fn the_trigger_takes_only_incoming_messages_and_keeps_what_fails() {
    let docs = deploy_docs();
    let trigger = doc(&docs, "trigger.yaml");
    let service_name = text(doc(&docs, "service.yaml"), &["metadata", "name"]);
    assert_eq!(
        text(trigger, &["spec", "filter", "attributes", "type"]),
        INCOMING_TYPE
    );
    let subscriber = at(trigger, &["spec", "subscriber", "ref"]);
    assert_eq!(text(subscriber, &["apiVersion"]), "serving.knative.dev/v1");
    assert_eq!(text(subscriber, &["kind"]), "Service");
    assert_eq!(text(subscriber, &["name"]), service_name);
    // The broker the server is subscribed to is the one it sends to.
    let binding = doc(&docs, "sinkbinding.yaml");
    assert_eq!(
        text(trigger, &["spec", "broker"]),
        text(binding, &["spec", "sink", "ref", "name"])
    );

    let delivery = at(trigger, &["spec", "delivery"]);
    let retry = int(delivery, &["retry"]);
    assert!(retry >= 3, "retry {retry}");
    assert_eq!(text(delivery, &["backoffPolicy"]), "exponential");
    let delay = text(delivery, &["backoffDelay"]);
    assert!(
        delay.starts_with("PT") && delay.len() > 3,
        "backoffDelay {delay:?} is not an ISO 8601 duration"
    );
    let dead_letters = at(delivery, &["deadLetterSink"]);
    match dead_letters.get("ref") {
        Some(reference) => {
            // A ref must resolve, or the Trigger never becomes ready: it is applied here.
            let name = text(reference, &["name"]);
            let kind = text(reference, &["kind"]);
            assert!(
                docs.iter().any(|d| {
                    !NOT_APPLIED.contains(&d.file.as_str())
                        && d.value.get("kind").and_then(Value::as_str) == Some(kind)
                        && text(&d.value, &["metadata", "name"]) == name
                }),
                "the dead-letter sink {kind}/{name} is not among the applied manifests"
            );
            assert_ne!(name, service_name, "dead letters back to the server");
        }
        None => assert!(!text(dead_letters, &["uri"]).is_empty()),
    }
}

#[test]
fn the_sinkbinding_gives_the_service_the_broker() {
    let docs = deploy_docs();
    let binding = doc(&docs, "sinkbinding.yaml");
    let service_name = text(doc(&docs, "service.yaml"), &["metadata", "name"]);
    let subject = at(binding, &["spec", "subject"]);
    assert_eq!(text(subject, &["apiVersion"]), "serving.knative.dev/v1");
    assert_eq!(text(subject, &["kind"]), "Service");
    assert_eq!(text(subject, &["name"]), service_name);
    let sink = at(binding, &["spec", "sink", "ref"]);
    assert_eq!(text(sink, &["apiVersion"]), "eventing.knative.dev/v1");
    assert_eq!(text(sink, &["kind"]), "Broker");
}

/// Where each `FROM` of the Dockerfile's `instructions` is: at least a build stage and a
/// runtime stage.
fn stages(instructions: &[(String, String)]) -> Vec<usize> {
    let froms: Vec<usize> = instructions
        .iter()
        .enumerate()
        .filter(|(_, (k, _))| k == "FROM")
        .map(|(i, _)| i)
        .collect();
    assert!(froms.len() >= 2, "a build stage and a runtime stage");
    froms
}

#[test]
fn the_dockerfile_builds_locked_and_runs_the_binary_as_non_root() {
    let instructions = dockerfile();
    let froms = stages(&instructions);

    // The builder: the official Rust image, at least the crate's rust-version.
    let args: Vec<(String, String)> = instructions[..froms[0]]
        .iter()
        .filter(|(k, _)| k == "ARG")
        .filter_map(|(_, a)| a.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())))
        .collect();
    let (_, builder_from) = &instructions[froms[0]];
    let (_, rest) = options(builder_from);
    let mut image = rest[0].to_owned();
    for (name, value) in &args {
        image = image.replace(&format!("${{{name}}}"), value);
    }
    let version = image
        .strip_prefix("rust:")
        .unwrap_or_else(|| panic!("builder image {image}"));
    let builder_stage = match rest.as_slice() {
        [_, as_kw, name] if as_kw.eq_ignore_ascii_case("as") => *name,
        _ => panic!("the builder stage is named: FROM image AS name"),
    };
    let numbers = |v: &str| -> (u32, u32) {
        let mut parts = v.split(['.', '-']).map(|p| p.parse::<u32>().unwrap_or(0));
        (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
    };
    let manifest = read(&repo().join("Cargo.toml"));
    let rust_version = manifest
        .lines()
        .find_map(|l| l.strip_prefix("rust-version"))
        .map(|l| l.trim_start_matches([' ', '=']).trim().trim_matches('"'))
        .expect("Cargo.toml rust-version");
    assert!(
        numbers(version) >= numbers(rust_version),
        "builder {image} is older than rust-version {rust_version}"
    );
    let build = instructions[froms[0]..froms[1]]
        .iter()
        .find(|(k, a)| k == "RUN" && a.contains("cargo build"))
        .map(|(_, a)| a.as_str())
        .expect("a RUN cargo build in the builder");
    for flag in ["--release", "--locked", "--bin letro-server"] {
        assert!(build.contains(flag), "cargo build without {flag}: {build}");
    }

    // The runtime stage.
    let last = &instructions[*froms.last().expect("a FROM")..];
    let find = |keyword: &str| -> Vec<&str> {
        last.iter()
            .filter(|(k, _)| k == keyword)
            .map(|(_, a)| a.as_str())
            .collect()
    };
    let user = dockerfile_user();
    assert_ne!(user, 0, "the runtime user is root");
    let entrypoint: Vec<String> =
        serde_json::from_str(find("ENTRYPOINT").last().expect("ENTRYPOINT")).expect("JSON form");
    assert_eq!(entrypoint, ["/usr/local/bin/letro-server"]);
    let cmd: Vec<String> =
        serde_json::from_str(find("CMD").last().expect("CMD")).expect("JSON form");
    assert_eq!(cmd, ["serve"]);
    assert!(
        find("EXPOSE").iter().any(|e| e
            .split_whitespace()
            .any(|p| p == defaults::PORT.to_string())),
        "EXPOSE {}",
        defaults::PORT
    );
    let copies: Vec<Options<'_>> = find("COPY").into_iter().map(options).collect();
    assert!(
        copies.iter().any(|(opts, rest)| {
            opts.contains(&("from", builder_stage)) && rest.last() == Some(&entrypoint[0].as_str())
        }),
        "the binary is copied from the builder to {}",
        entrypoint[0]
    );

    // The default database: SQLite, in a volume that the runtime user owns.
    let env: Vec<(String, String)> = find("ENV").into_iter().flat_map(env_pairs).collect();
    let get = |name: &str| {
        env.iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .unwrap_or_else(|| panic!("ENV {name}"))
    };
    assert_eq!(get("LETRO_LOG_FORMAT"), "json");
    let database = DatabaseConfig::from_url(
        get("DATABASE_URL"),
        letro_server::config::SqliteSync::Full,
        Default::default(),
    )
    .expect("the image's DATABASE_URL");
    let DatabaseConfig::Sqlite { path, .. } = database else {
        panic!("the image's default database is SQLite");
    };
    assert!(path.is_absolute(), "{}", path.display());
    let volumes: Vec<String> = find("VOLUME")
        .into_iter()
        .flat_map(|v| {
            serde_json::from_str::<Vec<String>>(v)
                .unwrap_or_else(|_| v.split_whitespace().map(str::to_owned).collect())
        })
        .collect();
    let volume = volumes
        .iter()
        .find(|v| path.starts_with(v.as_str()))
        .unwrap_or_else(|| panic!("{} is not in a VOLUME ({volumes:?})", path.display()));
    // The runtime image has no shell: the directory is made in the builder and copied
    // with the runtime user as owner.
    let (source, below) = copies
        .iter()
        .find_map(|(opts, rest)| {
            let [source, dest] = rest.as_slice() else {
                return None;
            };
            let below = Path::new(volume).strip_prefix(dest).ok()?;
            let owned = opts.iter().any(|(k, v)| *k == "chown" && uid(v) == user);
            let from_builder = opts.contains(&("from", builder_stage));
            (owned && from_builder).then_some((*source, below))
        })
        .unwrap_or_else(|| {
            panic!("no COPY --from={builder_stage} --chown={user} creates {volume}")
        });
    let made = Path::new(source).join(below);
    assert!(
        instructions[froms[0]..froms[1]].iter().any(|(k, a)| {
            k == "RUN" && a.contains("mkdir") && a.contains(made.to_str().expect("UTF-8"))
        }),
        "the builder does not mkdir {}",
        made.display()
    );

    let ignored = read(&repo().join(".dockerignore"));
    let ignored: BTreeSet<&str> = ignored
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .collect();
    for entry in ["target", ".git", "fuzz"] {
        assert!(ignored.contains(entry), ".dockerignore lacks {entry}");
    }
}

#[test]
fn the_image_is_built_with_build_rs_and_the_commit_it_is_given() {
    let instructions = dockerfile();
    let froms = stages(&instructions);
    let builder = &instructions[froms[0]..froms[1]];
    let build_at = builder
        .iter()
        .position(|(k, a)| k == "RUN" && a.contains("cargo build"))
        .expect("a RUN cargo build in the builder");
    // build.rs records the commit for letro_build_info; without it in the context, cargo
    // does not run it and every image says commit="unknown".
    assert!(
        builder[..build_at].iter().any(|(k, a)| {
            k == "COPY"
                && options(a)
                    .1
                    .split_last()
                    .is_some_and(|(_, sources)| sources.contains(&"build.rs"))
        }),
        "build.rs is not copied before the build: {builder:?}"
    );
    // The context has no .git: the commit comes in as a build argument of this stage
    // (an ARG before the first FROM is not seen by RUN), which RUN sees in its environment.
    assert!(
        builder[..build_at]
            .iter()
            .any(|(k, a)| k == "ARG"
                && a.split('=').next().map(str::trim) == Some("LETRO_BUILD_COMMIT")),
        "no ARG LETRO_BUILD_COMMIT in the builder stage before the build"
    );
    assert!(
        read(&repo().join("build.rs")).contains("std::env::var(\"LETRO_BUILD_COMMIT\")"),
        "build.rs reads another variable"
    );
    let ignored = read(&repo().join(".dockerignore"));
    assert!(
        !ignored
            .lines()
            .map(str::trim)
            .any(|l| l == "build.rs" || l == "*.rs" || l == "/build.rs"),
        ".dockerignore leaves build.rs out"
    );
    let readme = read(&repo().join("deploy/README.md"));
    assert!(
        readme.contains("--build-arg LETRO_BUILD_COMMIT="),
        "deploy/README.md does not say how to pass the commit"
    );
}
