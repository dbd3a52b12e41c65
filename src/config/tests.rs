//! Tests of loading and validation. They never touch the process environment: every test
//! passes its own environment map.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use url::Url;

use super::load::load_with;
use super::*;
use crate::problems::Problem;

/// The shipped file, resolved relative to this source file so the same test works in any crate
/// that includes this module.
const SHIPPED: &str = include_str!("../../config/factoryd.toml");

fn no_env() -> HashMap<String, String> {
    HashMap::new()
}

fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn parse(text: &str) -> Config {
    match from_toml_str(text, &no_env()) {
        Ok(config) => config,
        Err(e) => panic!("expected {text:?} to be valid, got: {e}"),
    }
}

fn parse_with_env(text: &str, vars: &[(&str, &str)]) -> Config {
    match from_toml_str(text, &env(vars)) {
        Ok(config) => config,
        Err(e) => panic!("expected {text:?} with {vars:?} to be valid, got: {e}"),
    }
}

fn problems_with_env(text: &str, vars: &[(&str, &str)]) -> Vec<Problem> {
    match from_toml_str(text, &env(vars)) {
        Err(ConfigError::Invalid(problems)) => problems.into_iter().collect(),
        Err(other) => panic!("expected problems for {text:?}, got: {other}"),
        Ok(_) => panic!("expected problems for {text:?} with {vars:?}, got a valid config"),
    }
}

fn problems(text: &str) -> Vec<Problem> {
    problems_with_env(text, &[])
}

fn paths(problems: &[Problem]) -> Vec<&str> {
    problems.iter().map(|p| p.path.as_str()).collect()
}

fn no_host_name() -> io::Result<String> {
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        "no host name in this test",
    ))
}

// ---- defaults and the shipped file ----

#[test]
fn defaults_validate() {
    let config = Config::defaults();
    assert_eq!(config.nats.servers[0].as_str(), "nats://127.0.0.1:4222");
    assert_eq!(config.worker.grace_period, Duration::from_secs(300));
    assert_eq!(config.destination.kind, DestinationKind::OciLayout);
    assert_eq!(config.worker.name, "");
}

#[test]
fn empty_file_gives_the_defaults() {
    assert_eq!(parse(""), Config::defaults());
}

#[test]
fn shipped_file_validates() {
    parse(SHIPPED);
}

#[test]
fn shipped_file_states_exactly_the_built_in_defaults() {
    let merged = match layers::merge(Some(SHIPPED), &no_env()) {
        Ok(merged) => merged,
        Err(_) => panic!("the shipped file does not merge"),
    };
    let (raw, problems) = layers::decode(merged);
    assert!(problems.is_empty(), "{problems}");
    assert_eq!(raw, RawConfig::default());
}

#[test]
fn shipped_file_documents_every_key_in_its_section() {
    // Keys as the file states them: `key =` lines under their `[section]` header, each with
    // the line above it a comment.
    let mut documented: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut section = String::new();
    let mut previous = "";
    for line in SHIPPED.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_owned();
        } else if let Some((key, _)) = line.split_once('=').filter(|_| !line.starts_with('#')) {
            assert!(
                previous.starts_with('#'),
                "{section}.{} has no comment above it",
                key.trim()
            );
            documented
                .entry(section.clone())
                .or_default()
                .insert(key.trim().to_owned());
        }
        previous = line;
    }

    let serde_json::Value::Object(sections) = serde_json::to_value(RawConfig::default()).unwrap()
    else {
        panic!("RawConfig does not serialise to an object");
    };
    let mut expected: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (section, keys) in sections {
        let serde_json::Value::Object(keys) = keys else {
            panic!("[{section}] does not serialise to an object");
        };
        for (key, value) in keys {
            // A table of its own (`[builder.cache]`) has its keys under its own header; a map
            // value (`mirrors = {…}`) is one key.
            let sub = format!("{section}.{key}");
            match value {
                serde_json::Value::Object(sub_keys) if documented.contains_key(&sub) => {
                    expected.insert(sub, sub_keys.keys().cloned().collect());
                }
                _ => {
                    expected.entry(section.clone()).or_default().insert(key);
                }
            }
        }
    }
    for (section, keys) in &expected {
        for key in keys {
            assert!(
                documented.get(section).is_some_and(|s| s.contains(key)),
                "the shipped file does not document {section}.{key} under [{section}]"
            );
        }
    }
    assert_eq!(
        documented, expected,
        "the shipped file states keys RawConfig does not have"
    );
}

// ---- reporting every problem ----

#[test]
fn five_independent_mistakes_are_five_problems_with_their_paths() {
    let found = problems(
        r#"
        [nats]
        replicas = 9
        [worker]
        biuld_slots = 2
        [builder]
        backend = "podman"
        [registries]
        platforms = ["Linux/AMD64"]
        [metrics]
        listen = "localhost"
        "#,
    );
    let mut found_paths = paths(&found);
    found_paths.sort_unstable();
    assert_eq!(
        found_paths,
        [
            "builder.backend",
            "metrics.listen",
            "nats.replicas",
            "registries.platforms[0]",
            "worker.biuld_slots",
        ],
        "{found:#?}"
    );
}

#[test]
fn unknown_key_in_the_file_is_reported_with_its_path_and_a_suggestion() {
    let found = problems("[worker]\nbiuld_slots = 2\n");
    assert_eq!(paths(&found), ["worker.biuld_slots"]);
    assert!(found[0].message.contains("unknown key"), "{}", found[0]);
    assert!(
        found[0].message.contains("did you mean `build_slots`"),
        "{}",
        found[0]
    );
}

#[test]
fn unknown_section_is_reported_with_its_name() {
    let found = problems("[wroker]\nbuild_slots = 2\n");
    assert_eq!(paths(&found), ["wroker"]);
    assert!(
        found[0].message.contains("did you mean `worker`"),
        "{}",
        found[0]
    );
}

#[test]
fn section_that_is_not_a_table_is_reported() {
    let found = problems("worker = 3\n");
    assert_eq!(paths(&found), ["worker"]);
}

#[test]
fn string_for_a_number_is_reported_with_its_path() {
    let found = problems("[worker]\nbuild_slots = \"4\"\n");
    assert_eq!(paths(&found), ["worker.build_slots"]);
    assert!(found[0].message.contains("string \"4\""), "{}", found[0]);
}

#[test]
fn float_for_an_integer_is_reported_not_rounded() {
    let found = problems("[worker]\nbuild_slots = 2.5\n");
    assert_eq!(paths(&found), ["worker.build_slots"]);
}

#[test]
fn number_for_a_boolean_is_reported() {
    let found = problems("[git]\nhost_key_checking = 0\n");
    assert_eq!(paths(&found), ["git.host_key_checking"]);
}

#[test]
fn negative_number_for_a_count_is_reported() {
    let found = problems("[nats]\nreplicas = -1\n");
    assert_eq!(paths(&found), ["nats.replicas"]);
}

#[test]
fn type_errors_and_rule_violations_are_reported_together() {
    let found = problems("[worker]\nbuild_slots = \"many\"\nwork_root = \"work\"\n");
    assert_eq!(paths(&found), ["worker.build_slots", "worker.work_root"]);
}

#[test]
fn invalid_error_lists_every_problem_on_its_own_line() {
    let err = match from_toml_str("[nats]\nreplicas = 0\n[log]\nformat = \"xml\"\n", &no_env()) {
        Err(err) => err,
        Ok(_) => panic!("expected an error"),
    };
    let text = err.to_string();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert!(lines[0].contains("2 problems"), "{text}");
    assert!(lines[1].starts_with("nats.replicas: "), "{text}");
    assert!(lines[2].starts_with("log.format: "), "{text}");
}

// ---- layering ----

#[test]
fn file_overrides_defaults() {
    let config = parse("[worker]\nbuild_slots = 7\n");
    assert_eq!(config.worker.build_slots, 7);
    assert_eq!(
        config.worker.import_slots, 4,
        "an unset key keeps its default"
    );
}

#[test]
fn env_overrides_the_file() {
    let config = parse_with_env(
        "[worker]\nbuild_slots = 7\n",
        &[("FACTORYD__WORKER__BUILD_SLOTS", "3")],
    );
    assert_eq!(config.worker.build_slots, 3);
}

#[test]
fn env_list_value_is_split_on_commas() {
    let config = parse_with_env(
        "",
        &[("FACTORYD__NATS__SERVERS", "nats://a:4222,nats://b:4222")],
    );
    let servers: Vec<&str> = config.nats.servers.iter().map(Url::as_str).collect();
    assert_eq!(servers, ["nats://a:4222", "nats://b:4222"]);
}

#[test]
fn env_list_with_one_entry_is_a_list() {
    let config = parse_with_env("", &[("FACTORYD__REGISTRIES__PLATFORMS", "linux/arm64")]);
    assert_eq!(config.registries.platforms[0].to_string(), "linux/arm64");
    assert_eq!(config.registries.platforms.len(), 1);
}

#[test]
fn env_list_entries_are_trimmed_and_empty_entries_dropped() {
    let config = parse_with_env(
        "",
        &[(
            "FACTORYD__REGISTRIES__INSECURE",
            " a.example:5000 , b.example, ",
        )],
    );
    assert_eq!(config.registries.insecure, ["a.example:5000", "b.example"]);
}

#[test]
fn empty_env_list_value_clears_the_list() {
    let config = parse_with_env(
        "[registries]\ninsecure = [\"a.example:5000\"]\n",
        &[("FACTORYD__REGISTRIES__INSECURE", "")],
    );
    assert!(config.registries.insecure.is_empty());
}

#[test]
fn env_with_other_prefixes_is_ignored() {
    let config = parse_with_env(
        "",
        &[
            ("FACTORY__WORKER__BUILD_SLOTS", "9"),
            ("FACTORYD_WORKER__BUILD_SLOTS", "9"),
            ("XFACTORYD__WORKER__BUILD_SLOTS", "9"),
            ("WORKER__BUILD_SLOTS", "9"),
            ("PATH", "/usr/bin"),
        ],
    );
    assert_eq!(config.worker.build_slots, 1);
}

#[test]
fn env_keys_match_case_insensitively() {
    let config = parse_with_env(
        "",
        &[
            ("factoryd__worker__build_slots", "5"),
            ("Factoryd__Log__Level", "debug"),
        ],
    );
    assert_eq!(config.worker.build_slots, 5);
    assert_eq!(config.log.level, "debug");
}

#[test]
fn env_unknown_key_is_reported_with_its_path_and_variable() {
    let found = problems_with_env("", &[("FACTORYD__WORKER__BIULD_SLOTS", "3")]);
    assert_eq!(paths(&found), ["worker.biuld_slots"]);
    assert!(
        found[0].message.contains("FACTORYD__WORKER__BIULD_SLOTS"),
        "{}",
        found[0]
    );
}

#[test]
fn env_text_that_is_not_a_number_is_reported_with_its_variable() {
    let found = problems_with_env("", &[("FACTORYD__WORKER__BUILD_SLOTS", "many")]);
    assert_eq!(paths(&found), ["worker.build_slots"]);
    assert!(
        found[0].message.contains("FACTORYD__WORKER__BUILD_SLOTS"),
        "{}",
        found[0]
    );
}

#[test]
fn env_text_for_string_keys_is_kept_verbatim() {
    // With the `config` crate's `try_parsing`, these would become 1.1, 7 and true.
    let config = parse_with_env(
        "",
        &[
            ("FACTORYD__DESTINATION__TAG", "1.10"),
            ("FACTORYD__WORKER__NAME", "007"),
            ("FACTORYD__NATS__PREFIX", "TRUE"),
        ],
    );
    assert_eq!(config.destination.tag.as_str(), "1.10");
    assert_eq!(config.worker.name, "007");
    assert_eq!(config.nats.prefix, "TRUE");
}

#[test]
fn env_booleans_parse_case_insensitively() {
    let config = parse_with_env("", &[("FACTORYD__GIT__HOST_KEY_CHECKING", "False")]);
    assert!(!config.git.host_key_checking);
}

#[test]
fn env_setting_one_key_twice_is_reported() {
    let found = problems_with_env(
        "",
        &[
            ("FACTORYD__WORKER__BUILD_SLOTS", "2"),
            ("factoryd__worker__build_slots", "3"),
        ],
    );
    assert_eq!(paths(&found), ["worker.build_slots"]);
}

#[test]
fn mirror_keys_containing_dots_stay_whole() {
    let config = parse("[registries]\nmirrors = { \"ghcr.io\" = [\"https://m.example/ghcr\"] }\n");
    let mirrors = &config.registries.mirrors["ghcr.io"];
    assert_eq!(mirrors[0].as_str(), "https://m.example/ghcr");
}

// ---- reading files and the host name ----

#[test]
fn explicit_missing_file_is_a_read_error_naming_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.toml");
    match load(Some(&missing), &no_env()) {
        Err(ConfigError::Read { path, message }) => {
            assert_eq!(path, missing);
            assert!(!message.is_empty());
        }
        other => panic!("expected a read error, got {other:?}"),
    }
    let shown = load(Some(&missing), &no_env()).unwrap_err().to_string();
    assert!(shown.contains(&missing.display().to_string()), "{shown}");
}

#[test]
fn explicit_file_is_read_and_layered_under_env() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("factoryd.toml");
    std::fs::write(
        &file,
        "[worker]\nname = \"w1\"\nbuild_slots = 7\nimport_slots = 7\n",
    )
    .unwrap();
    let config = load(Some(&file), &env(&[("FACTORYD__WORKER__BUILD_SLOTS", "2")])).unwrap();
    assert_eq!(config.worker.name, "w1");
    assert_eq!(config.worker.build_slots, 2);
    assert_eq!(config.worker.import_slots, 7);
}

#[test]
fn toml_syntax_error_is_a_read_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("factoryd.toml");
    std::fs::write(&file, "[worker\nbuild_slots = 1\n").unwrap();
    match load(Some(&file), &no_env()) {
        Err(ConfigError::Read { path, .. }) => assert_eq!(path, file),
        other => panic!("expected a read error, got {other:?}"),
    }
}

#[test]
fn missing_default_file_means_defaults_only() {
    let dir = tempfile::tempdir().unwrap();
    let config = load_with(None, &dir.path().join("absent.toml"), &no_env(), || {
        Ok("host-1\n".to_owned())
    })
    .unwrap();
    assert_eq!(
        config.worker,
        WorkerConfig {
            name: "host-1".to_owned(),
            ..Config::defaults().worker
        }
    );
}

#[test]
fn existing_default_file_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("factoryd.toml");
    std::fs::write(&file, "[worker]\nbuild_slots = 9\n").unwrap();
    let config = load_with(None, &file, &no_env(), || Ok("host-1".to_owned())).unwrap();
    assert_eq!(config.worker.build_slots, 9);
}

#[test]
fn unreadable_default_file_is_a_read_error() {
    // A directory where the file should be: it exists, so it must not be skipped silently.
    let dir = tempfile::tempdir().unwrap();
    match load_with(None, dir.path(), &no_env(), || Ok("host-1".to_owned())) {
        Err(ConfigError::Read { path, .. }) => assert_eq!(path, dir.path()),
        other => panic!("expected a read error, got {other:?}"),
    }
}

#[test]
fn configured_worker_name_is_kept_without_reading_the_host_name() {
    let config = load_with(
        None,
        Path::new("/nonexistent/factoryd.toml"),
        &env(&[("FACTORYD__WORKER__NAME", "w7")]),
        no_host_name,
    )
    .unwrap();
    assert_eq!(config.worker.name, "w7");
}

#[test]
fn unreadable_host_name_is_reported_at_worker_name() {
    let result = load_with(
        None,
        Path::new("/nonexistent/factoryd.toml"),
        &no_env(),
        no_host_name,
    );
    match result {
        Err(ConfigError::Invalid(problems)) => {
            let found: Vec<Problem> = problems.into_iter().collect();
            assert_eq!(paths(&found), ["worker.name"]);
            assert!(found[0].message.contains(HOSTNAME_PATH), "{}", found[0]);
        }
        other => panic!("expected a problem, got {other:?}"),
    }
}

#[test]
fn host_name_that_is_not_a_worker_name_is_reported() {
    let result = load_with(
        None,
        Path::new("/nonexistent/factoryd.toml"),
        &no_env(),
        || Ok("bad host name".to_owned()),
    );
    assert!(matches!(result, Err(ConfigError::Invalid(_))), "{result:?}");
}

// ---- the rules, key by key ----

#[test]
fn each_rule_rejects_a_bad_value_at_its_path() {
    let cases: &[(&str, &[&str])] = &[
        ("[nats]\nservers = []", &["nats.servers"]),
        ("[nats]\nservers = [\"nats://a:4222\", \"http://b:80\"]", &["nats.servers[1]"]),
        ("[nats]\nservers = [\"localhost:4222\"]", &["nats.servers[0]"]),
        ("[nats]\nservers = [\"nats://\"]", &["nats.servers[0]"]),
        ("[nats]\nservers = [\"not a url\"]", &["nats.servers[0]"]),
        ("[nats]\nprefix = \"fac.tory\"", &["nats.prefix"]),
        ("[nats]\nprefix = \"\"", &["nats.prefix"]),
        ("[nats]\nprefix = \"abcdefghijklmnopqrstuvwxyz0123456\"", &["nats.prefix"]),
        ("[nats]\nreplicas = 0", &["nats.replicas"]),
        ("[nats]\nreplicas = 6", &["nats.replicas"]),
        ("[nats]\ncredentials_file = \"nats.creds\"", &["nats.credentials_file"]),
        ("[nats]\nnkey_seed_file = \"seed\"", &["nats.nkey_seed_file"]),
        ("[nats]\ntoken_file = \"token\"", &["nats.token_file"]),
        ("[nats]\ntls_ca_file = \"ca.pem\"", &["nats.tls_ca_file"]),
        ("[nats]\nuser = \"bob\"", &["nats.password_file"]),
        ("[nats]\npassword_file = \"/etc/factoryd/nats-password\"", &["nats.user"]),
        ("[nats]\ntoken_file = \"/t\"\nnkey_seed_file = \"/s\"", &["nats"]),
        ("[nats]\nconnect_timeout_secs = 0", &["nats.connect_timeout_secs"]),
        ("[worker]\nname = \"bad name\"", &["worker.name"]),
        ("[worker]\nname = \"a234567890123456789012345678901234567890123456789012345678901234x\"", &["worker.name"]),
        ("[worker]\nbuild_slots = 65", &["worker.build_slots"]),
        ("[worker]\nimport_slots = 65", &["worker.import_slots"]),
        ("[worker]\nbuild_slots = 0\nimport_slots = 0", &["worker.build_slots"]),
        ("[worker]\nwork_root = \"work\"", &["worker.work_root"]),
        ("[worker]\ngrace_period_secs = 0", &["worker.grace_period_secs"]),
        ("[worker]\ngrace_period_secs = 86401", &["worker.grace_period_secs"]),
        ("[worker]\nmax_job_timeout_secs = 0", &["worker.max_job_timeout_secs", "worker.default_job_timeout_secs"]),
        ("[worker]\nmax_job_timeout_secs = 604801\ndefault_job_timeout_secs = 60", &["worker.max_job_timeout_secs"]),
        ("[worker]\ndefault_job_timeout_secs = 0", &["worker.default_job_timeout_secs"]),
        ("[worker]\ndefault_job_timeout_secs = 7201", &["worker.default_job_timeout_secs"]),
        ("[worker]\nmax_attempts = 0", &["worker.max_attempts"]),
        ("[worker]\nmax_attempts = 5", &["worker.max_attempts"]),
        ("[worker]\nmin_free_mib = 1048577", &["worker.min_free_mib"]),
        ("[worker]\nretry_base_delay_secs = 0", &["worker.retry_base_delay_secs"]),
        ("[worker]\nretry_base_delay_secs = 601", &["worker.retry_base_delay_secs"]),
        ("[worker]\nretry_max_delay_secs = 10", &["worker.retry_base_delay_secs"]),
        ("[worker]\nretry_max_delay_secs = 86401", &["worker.retry_max_delay_secs"]),
        ("[store]\nkeep_per_source = 100001", &["store.keep_per_source"]),
        ("[store]\nmax_age_days = 36501", &["store.max_age_days"]),
        ("[store]\nmin_age_secs = 2592001", &["store.min_age_secs"]),
        ("[store]\ngc_interval_secs = 5", &["store.gc_interval_secs"]),
        ("[store]\ngc_interval_secs = 604801", &["store.gc_interval_secs"]),
        ("[store]\nmax_bytes = -1", &["store.max_bytes"]),
        ("[builder]\nbackend = \"podman\"", &["builder.backend"]),
        ("[builder]\ndocker_host = \"/var/run/docker.sock\"", &["builder.docker_host"]),
        ("[builder]\ndocker_host = \"tcp://docker.example\"", &["builder.docker_host"]),
        ("[builder]\ndocker_host = \"unix://docker.sock\"", &["builder.docker_host"]),
        ("[builder]\nbuildkitd_addr = \"ssh://builder.example\"", &["builder.buildkitd_addr"]),
        ("[builder]\nbuildkitd_addr = \"docker\"", &["builder.buildkitd_addr"]),
        ("[destination]\nkind = \"s3\"", &["destination.kind"]),
        ("[destination]\nkind = \"registry\"", &["destination.registry"]),
        ("[destination]\npath = \"store\"", &["destination.path"]),
        ("[destination]\nregistry = \"ftp://r.example\"", &["destination.registry"]),
        ("[destination]\nregistry = \"r.example/v2\"", &["destination.registry"]),
        ("[destination]\nregistry = \"r.example:0\"", &["destination.registry"]),
        ("[destination]\nrepository = \"{source}\"", &["destination.repository"]),
        ("[destination]\nrepository = \"My/{source_id}\"", &["destination.repository"]),
        ("[destination]\nrepository = \"{namespace}/{source_id}\"", &["destination.repository"]),
        ("[destination]\ntag = \"{job_id\"", &["destination.tag"]),
        ("[destination]\ntag = \"job_id}\"", &["destination.tag"]),
        ("[destination]\ntag = \"\"", &["destination.tag"]),
        ("[destination]\ntag = \"v:{job_id}\"", &["destination.tag"]),
        ("[destination]\nnamespace = \"Team\"", &["destination.namespace"]),
        ("[destination]\nusername = \"u\"", &["destination.password_file"]),
        ("[destination]\npassword_file = \"/etc/factoryd/registry-password\"", &["destination.username"]),
        ("[destination]\nusername = \"u\"\npassword_file = \"pw\"", &["destination.password_file"]),
        ("[registries]\ninsecure = [\"http://r.example:5000\"]", &["registries.insecure[0]"]),
        ("[registries]\ninsecure = [\"r.example:5000/v2\"]", &["registries.insecure[0]"]),
        ("[registries]\ninsecure = [\"ok.example\", \"r.example:99999\"]", &["registries.insecure[1]"]),
        ("[registries]\ninsecure = [\"\"]", &["registries.insecure[0]"]),
        ("[registries]\nplatforms = []", &["registries.platforms"]),
        ("[registries]\nplatforms = [\"linux\"]", &["registries.platforms[0]"]),
        ("[registries]\nplatforms = [\"linux/amd64\", \"Linux/amd64\"]", &["registries.platforms[1]"]),
        ("[registries]\nplatforms = [\"linux/arm64/v8/x\"]", &["registries.platforms[0]"]),
        ("[registries]\nmirrors = { \"docker.io\" = [\"ftp://m.example\"] }", &["registries.mirrors.\"docker.io\"[0]"]),
        ("[registries]\nmirrors = { \"docker.io\" = [\"https://u:p@m.example\"] }", &["registries.mirrors.\"docker.io\"[0]"]),
        ("[registries]\nmirrors = { \"https://quay.io\" = [] }", &["registries.mirrors.\"https://quay.io\""]),
        ("[registries]\nmax_parallel_blobs = 0", &["registries.max_parallel_blobs"]),
        ("[registries]\nmax_parallel_blobs = 65", &["registries.max_parallel_blobs"]),
        ("[git]\nknown_hosts_file = \"known_hosts\"", &["git.known_hosts_file"]),
        ("[git]\nunaligned_hash = \"rebase\"", &["git.unaligned_hash"]),
        ("[metrics]\nlisten = \"localhost:9464\"", &["metrics.listen"]),
        ("[metrics]\nlisten = \"127.0.0.1\"", &["metrics.listen"]),
        ("[log]\nformat = \"xml\"", &["log.format"]),
        ("[log]\nlevel = \"\"", &["log.level"]),
        ("[log]\nlevel = \"  \"", &["log.level"]),
        ("[log]\nlevel = \"factoryd=loud\"", &["log.level"]),
    ];
    let mut failures = Vec::new();
    for (text, expected) in cases {
        match from_toml_str(text, &no_env()) {
            Err(ConfigError::Invalid(problems)) => {
                let found: Vec<Problem> = problems.into_iter().collect();
                if paths(&found) != *expected {
                    failures.push(format!("{text:?}: expected {expected:?}, got {found:?}"));
                }
            }
            other => failures.push(format!("{text:?}: expected problems, got {other:?}")),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn each_rule_accepts_a_good_value() {
    let cases = [
        "[nats]\nservers = [\"tls://n1.example:4222\", \"ws://n2.example\", \"wss://n3.example/nats\", \"nats://[::1]:4222\"]",
        "[nats]\nprefix = \"a-b_C9\"",
        "[nats]\nreplicas = 5",
        "[nats]\nuser = \"bob\"\npassword_file = \"/etc/factoryd/nats-password\"",
        "[nats]\ncredentials_file = \"/etc/factoryd/nats.creds\"\ntls_ca_file = \"/etc/factoryd/ca.pem\"",
        "[worker]\nname = \"node-1.example_x\"",
        "[worker]\nbuild_slots = 0\nimport_slots = 64",
        "[worker]\nbuild_slots = 64\nimport_slots = 0",
        "[worker]\nmax_attempts = 1\nretry_base_delay_secs = 600",
        "[worker]\ndefault_job_timeout_secs = 7200",
        "[builder]\nbackend = \"buildkitd\"\ndocker_host = \"tcp://127.0.0.1:2375\"\nbuildkitd_addr = \"tcp://[::1]:1234\"",
        "[builder]\nbackend = \"buildkitd\"\nbuildkitd_addr = \"docker-engine\"",
        "[destination]\nkind = \"registry\"\nregistry = \"https://r.example:5000\"\npath = \"relative is fine when unused\"",
        "[destination]\nkind = \"registry\"\nregistry = \"[::1]:5000\"\nusername = \"u\"\npassword_file = \"/etc/factoryd/pw\"",
        "[destination]\nnamespace = \"team/a\"\nrepository = \"{namespace}/{kind}/{source_id}\"\ntag = \"v1.{job_id}-X\"",
        "[registries]\ninsecure = [\"localhost:5000\", \"10.0.0.1\", \"[::1]:5000\"]",
        "[registries]\nplatforms = [\"linux/arm64/v8\", \"linux/arm/v7\", \"linux/s390x\"]",
        "[registries]\nmirrors = { \"docker.io\" = [\"https://mirror.gcr.io\"], \"ghcr.io:443\" = [\"http://10.0.0.2:5000/ghcr\"] }",
        "[registries]\nmax_parallel_blobs = 64",
        "[git]\nhost_key_checking = false\nunaligned_hash = \"fail\"",
        "[egress]\nallow_loopback = true\nallow_private = true",
        "[metrics]\nlisten = \"[::1]:9464\"",
        "[log]\nformat = \"json\"\nlevel = \"info,factoryd=debug\"",
    ];
    let failures: Vec<String> = cases
        .iter()
        .filter_map(|text| {
            from_toml_str(text, &no_env())
                .err()
                .map(|e| format!("{text:?}: {e}"))
        })
        .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn credential_file_values_are_not_repeated_in_problems() {
    let found = problems("[nats]\ntoken_file = \"s3cr3t-token\"\n");
    assert_eq!(paths(&found), ["nats.token_file"]);
    assert!(!found[0].message.contains("s3cr3t"), "{}", found[0]);
}

#[test]
fn nats_url_with_credentials_is_rejected_without_repeating_them() {
    let found = problems("[nats]\nservers = [\"nats://bob:hunter2@n1.example:4222\"]\n");
    assert_eq!(paths(&found), ["nats.servers[0]"]);
    assert!(!found[0].message.contains("hunter2"), "{}", found[0]);
    assert!(found[0].message.contains("n1.example"), "{}", found[0]);
}

#[test]
fn nats_auth_is_typed_by_method() {
    let config = parse("[nats]\nuser = \"bob\"\npassword_file = \"/etc/factoryd/nats-password\"\n");
    assert_eq!(
        config.nats.auth,
        NatsAuth::UserPassword {
            user: "bob".to_owned(),
            password_file: "/etc/factoryd/nats-password".into(),
        }
    );
    let config = parse("[nats]\ntoken_file = \"/etc/factoryd/nats-token\"\n");
    assert_eq!(
        config.nats.auth,
        NatsAuth::TokenFile("/etc/factoryd/nats-token".into())
    );
    assert_eq!(Config::defaults().nats.auth, NatsAuth::None);
}

#[test]
fn two_nats_auth_methods_are_named_in_one_problem() {
    let found = problems(
        "[nats]\ncredentials_file = \"/a.creds\"\nuser = \"bob\"\npassword_file = \"/p\"\n",
    );
    assert_eq!(paths(&found), ["nats"]);
    assert!(
        found[0].message.contains("credentials_file"),
        "{}",
        found[0]
    );
    assert!(
        found[0].message.contains("user + password_file"),
        "{}",
        found[0]
    );
}

#[test]
fn unknown_template_placeholder_is_named() {
    let found = problems("[destination]\nrepository = \"{source}/{job}\"\n");
    assert_eq!(paths(&found), ["destination.repository"]);
    assert!(found[0].message.contains("{source}"), "{}", found[0]);
    assert!(found[0].message.contains("{job}"), "{}", found[0]);
}

#[test]
fn template_renders_every_placeholder() {
    let config = parse(
        "[destination]\nnamespace = \"team\"\nrepository = \"{namespace}/{kind}/{source_id}\"\ntag = \"{job_id}-{kind}\"\n",
    );
    let values = TemplateValues {
        source_id: "src-1",
        job_id: "job-9",
        namespace: &config.destination.namespace,
        kind: "build",
    };
    assert_eq!(
        config.destination.repository.render(&values),
        "team/build/src-1"
    );
    assert_eq!(config.destination.tag.render(&values), "job-9-build");
}

#[test]
fn registry_destination_uses_plain_http_only_when_asked() {
    let listed = parse(
        "[destination]\nkind = \"registry\"\nregistry = \"r.example:5000\"\n[registries]\ninsecure = [\"r.example:5000\"]\n",
    );
    let explicit = parse("[destination]\nkind = \"registry\"\nregistry = \"http://r.example\"\n");
    let secure = parse("[destination]\nkind = \"registry\"\nregistry = \"r.example:5000\"\n");
    let target = |config: &Config| config.destination.registry.clone().unwrap();
    assert_eq!(
        target(&listed),
        RegistryTarget {
            authority: "r.example:5000".to_owned(),
            plain_http: true
        }
    );
    assert_eq!(
        target(&explicit),
        RegistryTarget {
            authority: "r.example".to_owned(),
            plain_http: true
        }
    );
    assert!(!target(&secure).plain_http);
}

#[test]
fn oci_layout_destination_has_no_registry_target() {
    let config = parse("[destination]\nkind = \"oci-layout\"\nregistry = \"r.example\"\n");
    assert_eq!(config.destination.registry, None);
}

#[test]
fn validated_values_are_typed() {
    let config = parse(
        r#"
        [worker]
        retry_base_delay_secs = 5
        [builder]
        docker_host = "tcp://docker.example:2376"
        [registries]
        platforms = ["linux/arm64/v8"]
        [metrics]
        listen = "[::1]:9100"
        [log]
        format = "text"
        "#,
    );
    assert_eq!(config.worker.retry_base_delay, Duration::from_secs(5));
    assert_eq!(
        config.builder.docker_host,
        DaemonAddr::Tcp {
            host: "docker.example".to_owned(),
            port: 2376
        }
    );
    assert_eq!(
        config.builder.docker_host.to_string(),
        "tcp://docker.example:2376"
    );
    assert_eq!(
        config.registries.platforms,
        [Platform {
            os: "linux".to_owned(),
            architecture: "arm64".to_owned(),
            variant: Some("v8".to_owned()),
        }]
    );
    assert_eq!(
        config.metrics.listen,
        "[::1]:9100".parse::<SocketAddr>().unwrap()
    );
    assert_eq!(config.log.format, LogFormat::Text);
    assert_eq!(
        Config::defaults().builder.buildkitd_addr,
        BuildkitdAddr::DockerEngine
    );
}

#[test]
fn keyword_enums_spell_as_in_the_file() {
    assert_eq!(BuilderBackend::Buildkitd.as_str(), "buildkitd");
    assert_eq!(DestinationKind::OciLayout.to_string(), "oci-layout");
    assert_eq!(UnalignedHash::UseBranchHead.as_str(), "use-branch-head");
    assert_eq!(LogFormat::Json.as_str(), "json");
}

#[test]
fn node_registry_credentials_are_read_by_host_and_checked() {
    let config = from_toml_str(
        "[registries]\ncredentials = { \"registry.example.com:5000\" = { username = \"ci\", password_file = \"/etc/factoryd/reg.pass\" } }",
        &HashMap::new(),
    )
    .unwrap();
    let (host, node) = &config.registries.credentials[0];
    assert_eq!(host, "registry.example.com:5000");
    assert_eq!(node.login.username, "ci");
    assert_eq!(
        node.login.password_file,
        PathBuf::from("/etc/factoryd/reg.pass")
    );
    assert_eq!(node.sources, None);
    assert!(node.offered_to("any-source"));

    let found = problems(
        "[registries]\ncredentials = { \"https://x\" = { username = \"\", password_file = \"reg.pass\" } }",
    );
    for path in [
        "registries.credentials.\"https://x\"",
        "registries.credentials.\"https://x\".username",
        "registries.credentials.\"https://x\".password_file",
    ] {
        assert!(paths(&found).contains(&path), "{path} in {found:?}");
    }
}

#[test]
fn allowed_frontends_are_image_references_kept_canonical() {
    let config = parse("[builder]\nallowed_frontends = [\"docker/dockerfile:1\"]\n");
    assert_eq!(
        config.builder.allowed_frontends,
        ["docker.io/docker/dockerfile:1"]
    );
    assert!(Config::defaults().builder.allowed_frontends.is_empty());
    let p = problems("[builder]\nallowed_frontends = [\"docker/dockerfile:1\", \"Not A Ref\"]\n");
    assert_eq!(paths(&p), ["builder.allowed_frontends[1]"]);
}

#[test]
fn builder_cache_keep_bytes_defaults_to_10_gib_and_0_leaves_the_cache_alone() {
    assert_eq!(Config::defaults().builder.cache_keep_bytes, 10 << 30);
    assert_eq!(
        parse("[builder]\ncache_keep_bytes = 0\n")
            .builder
            .cache_keep_bytes,
        0
    );
    assert_eq!(
        parse("[builder]\ncache_keep_bytes = 536870912\n")
            .builder
            .cache_keep_bytes,
        512 << 20
    );
    let from_env = parse_with_env(
        "[builder]\ncache_keep_bytes = 1\n",
        &[("FACTORYD__BUILDER__CACHE_KEEP_BYTES", "2147483648")],
    );
    assert_eq!(from_env.builder.cache_keep_bytes, 2 << 30);
}

#[test]
fn builder_cache_keep_bytes_beyond_what_the_engine_takes_is_reported() {
    let found = problems_with_env(
        "",
        &[("FACTORYD__BUILDER__CACHE_KEEP_BYTES", "9223372036854775808")],
    );
    assert_eq!(paths(&found), ["builder.cache_keep_bytes"]);
    assert!(
        found[0].message.contains("9223372036854775807"),
        "{}",
        found[0]
    );
    let found = problems("[builder]\ncache_keep_bytes = -1\n");
    assert_eq!(paths(&found), ["builder.cache_keep_bytes"]);
}

#[test]
fn build_cache_is_off_by_default_and_typed_when_a_registry_is_named() {
    assert_eq!(Config::defaults().builder.cache, None);
    let config = parse(
        "[builder.cache]\nregistry = \"cache.example:5000\"\nusername = \"cacher\"\npassword_file = \"/etc/factoryd/cache.pass\"\n",
    );
    let cache = config.builder.cache.expect("a cache");
    assert_eq!(
        cache.registry,
        RegistryTarget {
            authority: "cache.example:5000".to_owned(),
            plain_http: false
        }
    );
    assert_eq!(cache.repository.as_str(), "buildcache/{source_id}");
    let credentials = cache.credentials.expect("credentials");
    assert_eq!(credentials.username, "cacher");
    assert_eq!(
        credentials.password_file,
        Path::new("/etc/factoryd/cache.pass")
    );

    // Plain HTTP as for a destination: written so, or listed in registries.insecure.
    let explicit = parse("[builder.cache]\nregistry = \"http://cache.example\"\n");
    assert!(explicit.builder.cache.unwrap().registry.plain_http);
    let listed = parse(
        "[registries]\ninsecure = [\"cache.example:5000\"]\n[builder.cache]\nregistry = \"cache.example:5000\"\n",
    );
    assert!(listed.builder.cache.unwrap().registry.plain_http);

    // Every key from the environment, as the systemd drop-in sets password files.
    let from_env = parse_with_env(
        "",
        &[
            ("FACTORYD__BUILDER__CACHE__REGISTRY", "cache.example"),
            (
                "FACTORYD__BUILDER__CACHE__REPOSITORY",
                "cache/{namespace}/{source_id}",
            ),
            ("FACTORYD__DESTINATION__NAMESPACE", "team"),
        ],
    );
    let cache = from_env.builder.cache.unwrap();
    assert_eq!(cache.registry.authority, "cache.example");
    assert_eq!(
        cache.repository.render(&TemplateValues {
            source_id: "web",
            job_id: "",
            namespace: &cache.namespace,
            kind: "",
        }),
        "cache/team/web"
    );
}

#[test]
fn build_cache_mistakes_are_reported_at_their_keys() {
    for (text, expected) in [
        (
            "[builder.cache]\nregistry = \"ftp://cache.example\"\n",
            &["builder.cache.registry"][..],
        ),
        (
            "[builder.cache]\nusername = \"cacher\"\npassword_file = \"/p\"\n",
            &["builder.cache.registry"],
        ),
        (
            "[builder.cache]\nregistry = \"c.example\"\nrepository = \"buildcache/shared\"\n",
            &["builder.cache.repository"],
        ),
        (
            "[builder.cache]\nregistry = \"c.example\"\nrepository = \"cache/{source_id}/{job_id}\"\n",
            &["builder.cache.repository"],
        ),
        (
            "[builder.cache]\nregistry = \"c.example\"\nrepository = \"Cache/{source_id}\"\n",
            &["builder.cache.repository"],
        ),
        (
            "[builder.cache]\nregistry = \"c.example\"\nusername = \"cacher\"\n",
            &["builder.cache.password_file"],
        ),
        (
            "[builder.cache]\nregistry = \"c.example\"\npassword_file = \"/p\"\n",
            &["builder.cache.username"],
        ),
        (
            "[builder.cache]\nregistry = \"c.example\"\nusername = \"u\"\npassword_file = \"p\"\n",
            &["builder.cache.password_file"],
        ),
        // A registry of its own: not the destination's, not one of the node's logins.
        (
            "[destination]\nkind = \"registry\"\nregistry = \"https://r.example\"\n[builder.cache]\nregistry = \"r.example\"\n",
            &["builder.cache.registry"],
        ),
        (
            "[registries]\ncredentials = { \"r.example:5000\" = { username = \"ci\", password_file = \"/p\" } }\n[builder.cache]\nregistry = \"r.example:5000\"\n",
            &["builder.cache.registry"],
        ),
    ] {
        let found = problems(text);
        assert_eq!(paths(&found), expected, "{text}: {found:?}");
    }
    // A key the section does not have is named with the section's path.
    let found = problems("[builder.cache]\nregistry = \"c.example\"\nrepo = \"x\"\n");
    assert_eq!(paths(&found), ["builder.cache"]);
    assert!(found[0].message.contains("repo"), "{}", found[0]);
}

#[test]
fn node_registry_credentials_can_be_limited_to_sources() {
    let config = parse(
        "[registries]\ncredentials = { \"r.example\" = { username = \"ci\", password_file = \"/p\", sources = [\"web\", \"team-a-*\"] } }",
    );
    let node = &config.registries.credentials[0].1;
    for (source, offered) in [
        ("web", true),
        ("team-a-api", true),
        ("team-a-", true),
        ("web2", false),
        ("team-b-api", false),
        ("tea", false),
    ] {
        assert_eq!(node.offered_to(source), offered, "{source}");
    }
    let none = parse(
        "[registries]\ncredentials = { \"r.example\" = { username = \"ci\", password_file = \"/p\", sources = [] } }",
    );
    assert!(!none.registries.credentials[0].1.offered_to("web"));

    let found = problems(
        "[registries]\ncredentials = { \"r.example\" = { username = \"ci\", password_file = \"/p\", sources = [\"ok\", \"a/b\", \"\", \"x**\"] } }",
    );
    assert_eq!(
        paths(&found),
        [
            "registries.credentials.\"r.example\".sources[1]",
            "registries.credentials.\"r.example\".sources[2]",
            "registries.credentials.\"r.example\".sources[3]",
        ]
    );
}

#[test]
fn sources_run_in_a_confined_child_by_default_with_limits_from_the_file() {
    let defaults = Config::defaults().sources;
    assert_eq!(defaults.isolation, Isolation::Process);
    assert_eq!(defaults.child.memory_bytes, 4096 << 20);
    assert_eq!(defaults.child.cpu_secs, 1800);
    let config = parse(
        "[sources]\nisolation = \"none\"\nchild_memory_mib = 512\nchild_cpu_secs = 5\nchild_open_files = 128\nchild_file_size_mib = 64\n",
    );
    assert_eq!(config.sources.isolation, Isolation::None);
    assert_eq!(
        config.sources.child,
        ChildLimits {
            memory_bytes: 512 << 20,
            cpu_secs: 5,
            open_files: 128,
            file_size_bytes: 64 << 20,
        }
    );
    let found = problems(
        "[sources]\nisolation = \"thread\"\nchild_memory_mib = 1\nchild_cpu_secs = 0\nchild_open_files = 2\n",
    );
    assert_eq!(
        paths(&found),
        [
            "sources.isolation",
            "sources.child_memory_mib",
            "sources.child_cpu_secs",
            "sources.child_open_files",
        ]
    );
}

#[test]
fn git_advertisement_cap_and_ca_file_are_checked() {
    let config =
        parse("[git]\nmax_ref_advertisement_bytes = 1048576\ntls_ca_file = \"/etc/ssl/ca.pem\"\n");
    assert_eq!(config.git.max_ref_advertisement_bytes, 1 << 20);
    assert_eq!(
        config.git.tls_ca_file,
        Some(PathBuf::from("/etc/ssl/ca.pem"))
    );
    assert_eq!(Config::defaults().git.max_ref_advertisement_bytes, 64 << 20);
    let found =
        problems("[git]\nmax_ref_advertisement_bytes = 10\ntls_ca_file = \"relative.pem\"\n");
    assert_eq!(
        paths(&found),
        ["git.max_ref_advertisement_bytes", "git.tls_ca_file"]
    );
}

#[test]
fn max_lost_attempts_defaults_to_two_and_stays_below_max_deliver() {
    assert_eq!(Config::defaults().worker.max_lost_attempts, 2);
    assert_eq!(
        parse("[worker]\nmax_lost_attempts = 0\n")
            .worker
            .max_lost_attempts,
        0
    );
    assert_eq!(
        paths(&problems("[worker]\nmax_lost_attempts = 5\n")),
        ["worker.max_lost_attempts"]
    );
}
