//! The `factoryd` binary as an operator runs it: `validate` and `version`.

use std::path::PathBuf;
use std::process::{Command, Output};

fn factoryd(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_factoryd"))
        .args(args)
        // A clean, injected environment: no FACTORYD__* from the developer's shell.
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .output()
        .expect("spawn factoryd")
}

fn fixture(name: &str) -> String {
    let p: PathBuf = [
        env!("CARGO_MANIFEST_DIR"),
        "tests",
        "fixtures",
        "jobs",
        name,
    ]
    .iter()
    .collect();
    p.to_string_lossy().into_owned()
}

fn shipped_config() -> String {
    format!("{}/config/factoryd.toml", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn validate_job_with_five_mistakes_lists_five_problems_and_exits_64() {
    let out = factoryd(&["validate", "--job", &fixture("invalid-five-mistakes.json")]);
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let problems: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("  "))
        .map(str::trim)
        .collect();
    assert_eq!(problems.len(), 5, "{stderr}");
    for path in [
        "id: ",
        "origin.details.repo.url: ",
        "origin.details.repo.ref.type: ",
        "origin.details.build_file: ",
        "priority: ",
    ] {
        assert!(
            problems.iter().any(|p| p.starts_with(path)),
            "{path}: {stderr}"
        );
    }
    assert!(out.stdout.is_empty(), "nothing printed for an invalid job");
}

#[test]
fn validate_prints_each_valid_job_normalised_with_secrets_redacted() {
    for name in [
        "docker-hub.json",
        "docker-registry.json",
        "oci-registry-user.json",
        "oci-registry-webhook.json",
        "oci-registry-ecr.json",
        "docker-file-git-https.json",
        "docker-file-git-ssh.json",
        "docker-file-targz.json",
    ] {
        let out = factoryd(&["validate", "--job", &fixture(name)]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{name}: {stderr}");
        let printed: serde_json::Value = serde_json::from_str(&stdout).expect("stdout is JSON");
        assert_eq!(printed["v"], 1, "{name}");
        assert!(
            !stdout.contains("SECRET"),
            "{name} leaks a secret: {stdout}"
        );
        assert!(
            !stderr.contains("SECRET"),
            "{name} leaks a secret: {stderr}"
        );
    }
}

#[test]
fn validate_job_normalises_defaults_and_references() {
    let out = factoryd(&["validate", "--job", &fixture("docker-hub.json")]);
    let printed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        printed["origin"]["details"]["target"],
        "docker.io/library/mysql:5.7"
    );
    assert_eq!(printed["origin"]["details"]["token"], "<redacted>");
}

#[test]
fn validate_unreadable_job_exits_66() {
    let out = factoryd(&["validate", "--job", "/nonexistent/job.json"]);
    assert_eq!(out.status.code(), Some(66));
}

#[test]
fn validate_shipped_config_succeeds() {
    let out = factoryd(&["validate", "--config", &shipped_config()]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn validate_bad_config_lists_every_problem_and_exits_64() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[worker]\nbuild_slots = 0\nimport_slots = 0\nwork_root = \"relative\"\n[log]\nformat = \"xml\"\n",
    )
    .unwrap();
    let out = factoryd(&["validate", "--config", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    for path in ["worker.", "worker.work_root", "log.format"] {
        assert!(stderr.contains(path), "{path}: {stderr}");
    }
}

#[test]
fn environment_overrides_reach_the_config() {
    let out = Command::new(env!("CARGO_BIN_EXE_factoryd"))
        .args(["validate", "--config", &shipped_config()])
        .env_clear()
        .env("FACTORYD__WORKER__BUILD_SLOTS", "many")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("build_slots"), "{stderr}");
}

#[test]
fn version_names_the_wire_format() {
    let out = factoryd(&["version"]);
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.starts_with("factoryd "), "{stdout}");
    assert!(stdout.contains("wire format v1"), "{stdout}");
}

/// With `--config`, `validate` also checks a job's destination override against that node's
/// namespace rule (issue 14): another source's repository is refused, naming the field; a
/// repository below the job's own passes.
#[test]
fn validate_with_a_config_refuses_a_destination_outside_the_sources_namespace() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("node.toml");
    std::fs::write(
        &config,
        "[destination]\nkind = \"oci-layout\"\npath = \"/var/lib/factoryd/store\"\nrepository = \"tenants/{source_id}\"\n",
    )
    .unwrap();
    let job = |name: &str, repository: &str| {
        let path = dir.path().join(name);
        std::fs::write(
            &path,
            serde_json::json!({"v": 1, "id": "j1", "source_id": "web",
                "origin": {"type": "docker-hub", "details": {"target": "alpine:3"}},
                "destination": {"kind": "oci-layout", "repository": repository}})
            .to_string(),
        )
        .unwrap();
        path.display().to_string()
    };
    let config = config.display().to_string();
    let theirs = job("theirs.json", "tenants/db");
    let out = factoryd(&["validate", "--config", &config, "--job", &theirs]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("destination.repository: "), "{stderr}");
    assert!(stderr.contains("\"tenants/web\""), "{stderr}");

    let ours = job("ours.json", "tenants/web/tools");
    let out = factoryd(&["validate", "--config", &config, "--job", &ours]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Without --config there is no node to ask: the job itself is valid.
    let out = factoryd(&["validate", "--job", &theirs]);
    assert_eq!(out.status.code(), Some(0));
}
