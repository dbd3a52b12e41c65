//! Operating factoryd: the systemd unit and its companion files checked by systemd's own tools,
//! and a running worker watched the way an operator watches one — a real Prometheus scraping
//! `/metrics`, `promtool` linting the exposition, `/readyz` following the NATS connection, and
//! JSON log lines for each job state change.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use factoryd::job::Status;

use crate::support::prometheus::Prometheus;
use crate::support::require_program;
use crate::worker_nats::{ids, publish, single, wait_results, Fleet};

fn repo_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo_file(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The values of `key` in a systemd unit file (or drop-in), in order; comments skipped.
fn unit_values(text: &str, key: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|line| !line.starts_with('#') && !line.starts_with(';'))
        .filter_map(|line| line.split_once('='))
        .filter(|(k, _)| k.trim() == key)
        .map(|(_, v)| v.trim().to_owned())
        .collect()
}

/// A systemd time span such as `330`, `330s` or `5min 30s`.
fn timespan(text: &str) -> Duration {
    let mut total = Duration::ZERO;
    for word in text.split_whitespace() {
        let digits = word.trim_end_matches(|c: char| c.is_ascii_alphabetic());
        let number: u64 = digits
            .parse()
            .unwrap_or_else(|_| panic!("not a time span: {text:?}"));
        let unit = match &word[digits.len()..] {
            "" | "s" | "sec" | "second" | "seconds" => 1,
            "m" | "min" | "minute" | "minutes" => 60,
            "h" | "hr" | "hour" | "hours" => 3600,
            other => panic!("unit {other:?} of {text:?} not handled by this test"),
        };
        total += Duration::from_secs(number * unit);
    }
    total
}

fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {cmd:?}: {e}"))
}

fn text_of(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A file system root holding what `systemd-analyze --root` needs to load the unit as it is
/// installed: this host's unit directory (for the targets it depends on), the unit and the
/// credentials drop-in under /etc/systemd/system, and the built `factoryd` at /usr/bin.
/// The binary is copied (or hard-linked), since symlinks are resolved inside the root.
fn installed_root() -> tempfile::TempDir {
    require_program("systemd-analyze", "systemd");
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    std::fs::create_dir_all(r.join("usr/lib/systemd")).unwrap();
    std::os::unix::fs::symlink("usr/lib", r.join("lib")).unwrap();
    let copied = run(Command::new("cp")
        .arg("-a")
        .arg("/usr/lib/systemd/system")
        .arg(r.join("usr/lib/systemd/")));
    assert!(copied.status.success(), "{}", text_of(&copied));
    let units = r.join("etc/systemd/system");
    std::fs::create_dir_all(units.join("factoryd.service.d")).unwrap();
    std::fs::copy(
        repo_file("systemd/factoryd.service"),
        units.join("factoryd.service"),
    )
    .unwrap();
    std::fs::copy(
        repo_file("systemd/credentials.conf.example"),
        units.join("factoryd.service.d/credentials.conf"),
    )
    .unwrap();
    std::fs::create_dir_all(r.join("usr/bin")).unwrap();
    let binary = r.join("usr/bin/factoryd");
    if std::fs::hard_link(env!("CARGO_BIN_EXE_factoryd"), &binary).is_err() {
        std::fs::copy(env!("CARGO_BIN_EXE_factoryd"), &binary).unwrap();
    }
    root
}

#[test]
fn unit_stop_timeout_outlasts_the_configured_drain_grace_period() {
    let unit = read("systemd/factoryd.service");
    let stop = unit_values(&unit, "TimeoutStopSec");
    assert_eq!(stop.len(), 1, "one TimeoutStopSec in the unit: {stop:?}");
    let stop = timespan(&stop[0]);
    let config = factoryd::config::load(Some(&repo_file("config/factoryd.toml")), &HashMap::new())
        .expect("the shipped config loads");
    assert!(
        stop > config.worker.grace_period,
        "TimeoutStopSec {stop:?} must exceed worker.grace_period_secs {:?}, or systemd kills \
         a draining worker",
        config.worker.grace_period
    );
}

#[test]
fn systemd_analyze_verify_accepts_the_unit_and_its_credentials_drop_in() {
    let root = installed_root();
    let out = run(Command::new("systemd-analyze")
        .arg("verify")
        .arg(format!("--root={}", root.path().display()))
        .arg("factoryd.service"));
    let text = text_of(&out);
    assert!(out.status.success(), "{text}");
    // Unknown keys and bad values are warnings that leave the exit status at 0.
    let about_us: Vec<&str> = text.lines().filter(|l| l.contains("factoryd")).collect();
    assert!(about_us.is_empty(), "{}", about_us.join("\n"));
}

#[test]
fn systemd_analyze_security_rates_the_unit_exposure_at_most_2_0() {
    let root = installed_root();
    let out = run(Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(format!("--root={}", root.path().display()))
        .arg("factoryd.service"));
    let text = text_of(&out);
    let exposure: f64 = text
        .lines()
        .find_map(|l| l.split_once("Overall exposure level for factoryd.service:"))
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in:\n{text}"));
    assert!(exposure <= 2.0, "exposure {exposure}:\n{text}");
}

#[test]
fn sysusers_creates_the_user_the_unit_runs_as() {
    require_program("systemd-sysusers", "systemd");
    let unit = read("systemd/factoryd.service");
    let user = unit_values(&unit, "User");
    assert_eq!(user.len(), 1, "{user:?}");
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir(root.path().join("etc")).unwrap();
    let out = run(Command::new("systemd-sysusers")
        .arg(format!("--root={}", root.path().display()))
        .arg(repo_file("systemd/factoryd.sysusers")));
    assert!(out.status.success(), "{}", text_of(&out));
    let passwd = std::fs::read_to_string(root.path().join("etc/passwd")).unwrap();
    let entry = passwd
        .lines()
        .find(|l| l.starts_with(&format!("{}:", user[0])))
        .unwrap_or_else(|| panic!("no user {} in:\n{passwd}", user[0]));
    // A system account whose home is the state directory, with no login shell.
    let fields: Vec<&str> = entry.split(':').collect();
    let uid: u32 = fields[2].parse().unwrap();
    assert!(uid > 0 && uid < 1000, "{entry}");
    assert_eq!(fields[5], "/var/lib/factoryd", "{entry}");
    assert_eq!(fields[6], "/usr/sbin/nologin", "{entry}");
}

#[test]
fn tmpfiles_creates_the_config_paths_with_credentials_private_to_root() {
    use std::os::unix::fs::PermissionsExt;
    require_program("systemd-tmpfiles", "systemd");
    let root = tempfile::tempdir().unwrap();
    let out = run(Command::new("systemd-tmpfiles")
        .arg(format!("--root={}", root.path().display()))
        .arg("--create")
        .arg(repo_file("systemd/factoryd.tmpfiles")));
    assert!(out.status.success(), "{}", text_of(&out));
    let mode = |p: &str| {
        std::fs::metadata(root.path().join(p))
            .unwrap_or_else(|e| panic!("{p}: {e}"))
            .permissions()
            .mode()
            & 0o7777
    };
    assert_eq!(mode("etc/factoryd"), 0o755);
    assert_eq!(mode("etc/factoryd/known_hosts"), 0o644);
    assert_eq!(mode("etc/factoryd/credentials"), 0o700);
}

/// `Environment=` lines of the drop-in that set `FACTORYD__…` keys, with `%d` (the credentials
/// directory) replaced by `credentials`.
fn drop_in_environment(credentials: &Path) -> Vec<(String, String)> {
    unit_values(&read("systemd/credentials.conf.example"), "Environment")
        .iter()
        .map(|assignment| {
            let (name, value) = assignment.split_once('=').expect("NAME=value");
            let value = value.replace("%d", &credentials.display().to_string());
            (name.to_owned(), value)
        })
        .collect()
}

#[test]
fn credentials_drop_in_reads_only_credentials_it_loads() {
    let dropin = read("systemd/credentials.conf.example");
    let loaded: Vec<String> = unit_values(&dropin, "LoadCredential")
        .iter()
        .map(|v| {
            v.split_once(':')
                .map_or(v.as_str(), |(id, _)| id)
                .to_owned()
        })
        .collect();
    let environment = drop_in_environment(Path::new("%d"));
    assert!(!environment.is_empty());
    for (name, value) in environment {
        let id = value
            .strip_prefix("%d/")
            .unwrap_or_else(|| panic!("{name} should point into %d, not {value}"));
        assert!(
            loaded.iter().any(|l| l == id),
            "{name} reads credential {id}, which no LoadCredential= provides ({loaded:?})"
        );
    }
}

#[test]
fn credentials_drop_in_environment_validates_with_the_shipped_config() {
    let credentials = tempfile::tempdir().unwrap();
    let mut env = drop_in_environment(credentials.path());
    // What factoryd.toml must say besides, per the drop-in's comment.
    env.extend(
        [
            ("FACTORYD__DESTINATION__KIND", "registry"),
            ("FACTORYD__DESTINATION__REGISTRY", "registry.example.com"),
            ("FACTORYD__DESTINATION__USERNAME", "factoryd"),
            ("FACTORYD__BUILDER__CACHE__REGISTRY", "cache.example.com"),
            ("FACTORYD__BUILDER__CACHE__USERNAME", "factoryd"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned())),
    );
    let out = run(Command::new(env!("CARGO_BIN_EXE_factoryd"))
        .args(["validate", "--config"])
        .arg(repo_file("config/factoryd.toml"))
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v))));
    assert!(out.status.success(), "{env:?}\n{}", text_of(&out));
}

// ---- A running worker, as operators see it.

async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    match reqwest::get(format!("http://{addr}{path}")).await {
        Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
        Err(e) => (0, e.to_string()),
    }
}

/// Polls `path` until it answers `status`, or panics after `timeout` with the last answer.
async fn wait_status(addr: SocketAddr, path: &str, status: u16, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let (got, body) = get(addr, path).await;
        if got == status {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "{path} answered {got} {body:?}, not {status}, for {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn prometheus_sees_the_job_counters_move_after_jobs_run() {
    let (dir, server) = single();
    let fleet = Fleet::new(vec![server.url()], 1, dir);
    fleet.script("p-fails", "permanent");
    let _worker = fleet.worker("node-a", 30);
    let addr = fleet.metrics_addr("node-a").await;
    wait_status(addr, "/readyz", 200, Duration::from_secs(30)).await;
    let store = tempfile::tempdir().unwrap();
    let prometheus = Prometheus::start(store.path(), addr).await;
    let succeeded = r#"factoryd_jobs_completed_total{kind="import",outcome="succeeded"}"#;
    let failed = r#"factoryd_jobs_completed_total{kind="import",outcome="failed"}"#;
    // Scraped before any job ran: the series exist at zero.
    prometheus
        .wait_for(succeeded, Duration::from_secs(30), |v| v == 0.0)
        .await;

    let nats = fleet.client().await;
    let mut all = ids("p", 3);
    all.push("p-fails".to_owned());
    for id in &all {
        assert!(publish(&nats, id).await);
    }
    let results = wait_results(&nats, &all, Duration::from_secs(60)).await;
    assert_eq!(results["p-fails"].status, Status::Failed);

    prometheus
        .wait_for(succeeded, Duration::from_secs(30), |v| v == 3.0)
        .await;
    prometheus
        .wait_for(failed, Duration::from_secs(30), |v| v == 1.0)
        .await;
    prometheus
        .wait_for(
            r#"factoryd_jobs_received_total{kind="import"}"#,
            Duration::from_secs(30),
            |v| v == 4.0,
        )
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn promtool_finds_nothing_to_report_in_the_metrics_exposition() {
    require_program("promtool", "prometheus");
    let (dir, server) = single();
    let fleet = Fleet::new(vec![server.url()], 1, dir);
    fleet.script("m-retry", "transient,succeed");
    let _worker = fleet.worker("node-a", 30);
    let addr = fleet.metrics_addr("node-a").await;
    wait_status(addr, "/readyz", 200, Duration::from_secs(30)).await;
    // Jobs first, so that histograms and labelled series have samples to lint.
    let nats = fleet.client().await;
    let all = vec!["m-ok".to_owned(), "m-retry".to_owned()];
    for id in &all {
        assert!(publish(&nats, id).await);
    }
    wait_results(&nats, &all, Duration::from_secs(60)).await;
    let exposition = wait_status(addr, "/metrics", 200, Duration::from_secs(5)).await;
    assert!(
        exposition.contains("factoryd_retries_total{"),
        "{exposition}"
    );

    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool");
    {
        use std::io::Write;
        let mut stdin = promtool.stdin.take().unwrap();
        stdin.write_all(exposition.as_bytes()).unwrap();
    }
    let out = promtool.wait_with_output().unwrap();
    let text = text_of(&out);
    assert!(out.status.success(), "{text}");
    assert!(text.trim().is_empty(), "promtool reports:\n{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn readyz_is_unavailable_while_nats_is_down_and_ready_once_it_returns() {
    let (dir, mut server) = single();
    let fleet = Fleet::new(vec![server.url()], 1, dir);
    let _worker = fleet.worker("node-a", 30);
    let addr = fleet.metrics_addr("node-a").await;
    wait_status(addr, "/readyz", 200, Duration::from_secs(30)).await;
    let reconnects = "factoryd_nats_reconnects_total";
    assert_eq!(
        sample(&get(addr, "/metrics").await.1, reconnects),
        Some(0.0)
    );

    server.stop();
    let body = wait_status(addr, "/readyz", 503, Duration::from_secs(30)).await;
    assert!(body.contains("not connected to NATS"), "{body}");
    // Alive all along: only readiness follows the connection.
    assert_eq!(get(addr, "/healthz").await.0, 200);
    // Lost, not yet regained: no reconnect so far.
    assert_eq!(
        sample(&get(addr, "/metrics").await.1, reconnects),
        Some(0.0)
    );

    server.restart();
    wait_status(addr, "/readyz", 200, Duration::from_secs(60)).await;
    // One connection lost, one regained: counted once, as a reconnect.
    assert_eq!(
        sample(&get(addr, "/metrics").await.1, reconnects),
        Some(1.0)
    );
}

/// The value of the unlabelled series `name` in a Prometheus exposition.
fn sample(exposition: &str, name: &str) -> Option<f64> {
    exposition
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// The worker's log lines that are JSON objects.
fn json_lines(log: &str) -> Vec<serde_json::Value> {
    log.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(serde_json::Value::is_object)
        .collect()
}

/// The JSON line saying `message` about `job_id`.
fn job_line<'a>(
    lines: &'a [serde_json::Value],
    message: &str,
    job_id: &str,
) -> &'a serde_json::Value {
    lines
        .iter()
        .find(|l| l["fields"]["message"] == message && l["span"]["job.id"] == job_id)
        .unwrap_or_else(|| panic!("no {message:?} line for {job_id} in {lines:#?}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn json_logs_give_job_id_kind_and_outcome_for_each_job_state_change() {
    let (dir, server) = single();
    let fleet = Fleet::new(vec![server.url()], 1, dir);
    fleet.script("l-fails", "permanent");
    let _worker = fleet.worker_with_env("node-a", 30, &[("FACTORYD__LOG__FORMAT", "json")]);
    let nats = fleet.client().await;
    let all = vec!["l-ok".to_owned(), "l-fails".to_owned()];
    for id in &all {
        assert!(publish(&nats, id).await);
    }
    wait_results(&nats, &all, Duration::from_secs(60)).await;

    // The result is published before the worker logs that the job finished.
    let deadline = Instant::now() + Duration::from_secs(10);
    let lines = loop {
        let lines = json_lines(&fleet.log("node-a"));
        let finished = lines
            .iter()
            .filter(|l| l["fields"]["message"] == "Job finished.")
            .count();
        if finished >= all.len() || Instant::now() > deadline {
            break lines;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for (id, outcome) in [("l-ok", "succeeded"), ("l-fails", "failed")] {
        let started = job_line(&lines, "Job started.", id);
        assert_eq!(started["span"]["kind"], "import", "{started}");
        let finished = job_line(&lines, "Job finished.", id);
        assert_eq!(finished["span"]["kind"], "import", "{finished}");
        assert_eq!(finished["fields"]["outcome"], outcome, "{finished}");
    }
}
