//! The production `factoryd serve` with its real stages, driven by `factoryd submit`: an import
//! job goes from the queue through a real registry into the OCI layout store.

use std::process::{Command, Output};
use std::time::Duration;

use factoryd::job::JobResult;
use serde_json::json;

use crate::import_auth::seed;
use crate::support::nats::NatsServer;
use crate::support::registry::{skopeo_raw, Auth, Registry};
use crate::support::run::{factoryd_store, store_ls};
use crate::support::{free_port, wait_for_port, ChildGuard};

struct Node {
    dir: tempfile::TempDir,
    config: std::path::PathBuf,
    metrics_port: u16,
    _server: NatsServer,
    serve: Option<ChildGuard>,
}

impl Node {
    fn start() -> Node {
        Node::start_with("build_slots = 0\n")
    }

    /// `worker` is added to the `[worker]` section.
    fn start_with(worker: &str) -> Node {
        let dir = tempfile::tempdir().unwrap();
        let (work_root, store) = (dir.path().join("work"), dir.path().join("store"));
        Node::start_in(dir, &work_root, &store, worker)
    }

    fn start_in(
        dir: tempfile::TempDir,
        work_root: &std::path::Path,
        store: &std::path::Path,
        worker: &str,
    ) -> Node {
        let server = NatsServer::start(dir.path());
        let metrics_port = free_port();
        let config = dir.path().join("factoryd.toml");
        std::fs::write(
            &config,
            format!(
                "[nats]\nservers = [\"{}\"]\n[worker]\nname = \"serve-test\"\nwork_root = \"{}\"\n\
                 {worker}\
                 [destination]\npath = \"{}\"\n[egress]\nallow_loopback = true\n\
                 [metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n[log]\nformat = \"json\"\n",
                server.url(),
                work_root.display(),
                store.display(),
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.path().join("serve.log")).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_factoryd"));
        cmd.arg("serve")
            .arg("--config")
            .arg(&config)
            .env_clear()
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        let serve = ChildGuard::spawn("factoryd serve", &mut cmd);
        wait_for_port(
            ([127, 0, 0, 1], metrics_port).into(),
            Duration::from_secs(20),
        );
        Node {
            dir,
            config,
            metrics_port,
            _server: server,
            serve: Some(serve),
        }
    }

    fn submit(&self, job: serde_json::Value) -> (Output, Option<JobResult>) {
        self.submit_with(job, &["--follow", "--wait-timeout-secs", "60"])
    }

    /// Submits `job`, waits 5 s for a result that must not come, and checks the worker did not
    /// take it; returns the worker's log.
    fn assert_stays_queued(&self, job: serde_json::Value) -> String {
        let id = job["id"].as_str().unwrap().to_owned();
        let (out, _) = self.submit_with(job, &["--wait", "--wait-timeout-secs", "5"]);
        let log = self.log();
        assert_eq!(
            out.status.code(),
            Some(75),
            "no result while held\nstdout: {}\nstderr: {}\n{log}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!log.contains(&id), "the job was taken: {log}");
        log
    }

    fn submit_with(&self, job: serde_json::Value, wait: &[&str]) -> (Output, Option<JobResult>) {
        let path = self.dir.path().join("job.json");
        std::fs::write(&path, serde_json::to_vec(&job).unwrap()).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_factoryd"))
            .arg("submit")
            .args(wait)
            .arg("--config")
            .arg(&self.config)
            .arg(&path)
            .env_clear()
            .output()
            .unwrap();
        let result = serde_json::from_slice(&out.stdout).ok();
        (out, result)
    }

    /// Waits (15 s at most) until `/readyz` answers 503 with `reason`; returns the answer.
    fn not_ready_for(&self, reason: &str) -> String {
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        loop {
            let ready = http_get(self.metrics_port, "/readyz");
            if ready.starts_with("HTTP/1.1 503") && ready.contains(reason) {
                return ready;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{ready}\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("serve.log")).unwrap_or_default()
    }
}

fn import_job(id: &str, registry: &str, password: &str) -> serde_json::Value {
    json!({
        "v": 1, "id": id, "source_id": "src-web",
        "origin": {"type": "docker-registry", "details": {
            "url": format!("http://{registry}"), "target": "team/web:1",
            "username": "alice", "password": password
        }}
    })
}

#[test]
fn serve_imports_a_submitted_job_into_the_layout_store() {
    let registry = Registry::start(Auth::user("alice", "pw-Secret-77"));
    let digest = seed(
        &registry.host,
        "team/web:1",
        Some(("alice", "pw-Secret-77")),
    );
    let node = Node::start();

    let (out, result) = node.submit(import_job("imp-1", &registry.host, "pw-Secret-77"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}\n{}", node.log());
    let result = result.expect("a result on stdout");
    let image = result.image.expect("an image");
    assert_eq!(image.source_digest.as_deref(), Some(digest.as_str()));
    assert_eq!(
        image.reference,
        format!(
            "oci:{}:src-web:imp-1",
            node.dir.path().join("store").display()
        )
    );
    // skopeo reads what the store holds, under the result's name.
    let stored = skopeo_raw(
        &format!(
            "oci:{}:src-web:imp-1",
            node.dir.path().join("store").display()
        ),
        &[],
    );
    assert_eq!(crate::support::registry::digest_of(&stored), image.digest);
    // Progress was shown, and no secret anywhere.
    assert!(stderr.contains("stage import"), "{stderr}");
    for text in [
        stderr.as_ref(),
        String::from_utf8_lossy(&out.stdout).as_ref(),
        node.log().as_str(),
    ] {
        assert!(!text.contains("pw-Secret-77"), "a secret leaked: {text}");
    }
}

#[test]
fn serve_fails_an_import_with_wrong_credentials_permanently() {
    let registry = Registry::start(Auth::user("alice", "pw-Secret-77"));
    seed(
        &registry.host,
        "team/web:1",
        Some(("alice", "pw-Secret-77")),
    );
    let node = Node::start();

    let (out, result) = node.submit(import_job("imp-2", &registry.host, "wrong-Pass-99"));
    assert_eq!(out.status.code(), Some(1), "{}", node.log());
    let error = result.unwrap().error.unwrap();
    assert_eq!(error.code.as_str(), "auth_failed");
    assert_eq!(error.class.as_str(), "permanent");
    assert!(!node.log().contains("wrong-Pass-99"));
}

#[test]
fn serve_exits_zero_on_sigterm_and_its_metrics_counted_the_job() {
    let registry = Registry::start(Auth::None);
    seed(&registry.host, "team/web:1", None);
    let mut node = Node::start();
    let job = json!({"v": 1, "id": "imp-3", "source_id": "s",
        "origin": {"type": "docker-registry", "details": {
            "url": format!("http://{}", registry.host), "target": "team/web:1"}}});
    let (out, _) = node.submit(job);
    assert_eq!(out.status.code(), Some(0), "{}", node.log());

    let metrics = http_get(node.metrics_port, "/metrics");
    assert!(
        metrics.contains("factoryd_jobs_completed_total{kind=\"import\",outcome=\"succeeded\"} 1"),
        "{metrics}"
    );
    // An import-only worker (no build slots) does not depend on a Docker Engine.
    let ready = http_get(node.metrics_port, "/readyz");
    assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");

    let mut serve = node.serve.take().unwrap();
    let status = Command::new("kill")
        .args(["-TERM", &serve.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(
        serve.child.wait().unwrap().code(),
        Some(0),
        "{}",
        node.log()
    );
    // One JSON log line per job state change, with the job's id, kind and outcome.
    let finished = node
        .log()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|l| l["fields"]["message"] == "Job finished.")
        .expect("a Job finished. line");
    assert_eq!(finished["fields"]["outcome"], "succeeded");
    assert_eq!(finished["span"]["job.id"], "imp-3");
    assert_eq!(finished["span"]["kind"], "import");
}

fn http_get(port: u16, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn a_build_worker_without_a_reachable_engine_is_not_ready_says_why_and_leaves_builds_queued() {
    let node = Node::start_with(
        "build_slots = 1\n[builder]\ndocker_host = \"unix:///nonexistent/docker.sock\"\n",
    );
    let ready = node.not_ready_for("builder unreachable");
    assert!(ready.contains("/nonexistent/docker.sock"), "{ready}");

    // A build job waits in the queue instead of being tried (and its retries spent) here.
    let job = json!({
        "v": 1, "id": "held-build", "source_id": "src-held",
        "origin": {"type": "docker-file", "details": {"targz_url": "https://example.invalid/x.tar.gz"}}
    });
    let log = node.assert_stays_queued(job);
    let metrics = http_get(node.metrics_port, "/metrics");
    assert!(
        metrics.contains("factoryd_jobs_held{kind=\"build\"} 1")
            && metrics.contains("factoryd_jobs_held{kind=\"import\"} 0"),
        "{metrics}"
    );
    assert!(
        log.contains("Not taking jobs of this kind until this clears")
            && log.contains("build backend unreachable"),
        "{log}"
    );
}

/// A size-limited tmpfs mounted for the life of the value (the tests run as root).
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(at: &std::path::Path, size: &str) -> Tmpfs {
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .expect("run mount");
        assert!(
            status.success(),
            "mount tmpfs on {} (needs root)",
            at.display()
        );
        Tmpfs(at.to_owned())
    }

    fn resize(&self, size: &str) {
        let status = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .status()
            .expect("run mount");
        assert!(status.success(), "remount {}", self.0.display());
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_worker_low_on_disk_takes_no_jobs_until_space_returns() {
    let registry = Registry::start(Auth::user("alice", "pw-Disk-31"));
    let digest = seed(&registry.host, "team/web:1", Some(("alice", "pw-Disk-31")));
    let work = tempfile::tempdir().unwrap();
    let disk = Tmpfs::mount(work.path(), "16m");
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let node = Node::start_in(
        dir,
        work.path(),
        &store,
        "build_slots = 0\nmin_free_mib = 64\n",
    );
    node.not_ready_for("MiB free, below worker.min_free_mib (64 MiB)");

    let job = import_job("imp-disk", &registry.host, "pw-Disk-31");
    let log = node.assert_stays_queued(job.clone());
    assert!(log.contains("below worker.min_free_mib"), "{log}");
    let metrics = http_get(node.metrics_port, "/metrics");
    assert!(
        metrics.contains("factoryd_jobs_held{kind=\"import\"} 1"),
        "{metrics}"
    );

    // Space returns: the job still queued runs (the same job submitted again is the same
    // message, de-duplicated; `submit` then follows it to its result).
    disk.resize("256m");
    let (out, result) = node.submit(job);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}\n{}", node.log());
    let result = result.expect("a result on stdout");
    assert_eq!(result.image.unwrap().digest, digest);
    assert_eq!(result.attempt, 1, "never tried while the disk was low");
    assert!(node.log().contains("Taking jobs of this kind again."));
}

#[test]
fn a_worker_whose_layout_store_is_low_on_disk_takes_no_jobs() {
    let store = tempfile::tempdir().unwrap();
    let _disk = Tmpfs::mount(store.path(), "16m");
    let dir = tempfile::tempdir().unwrap();
    let work_root = dir.path().join("work");
    let node = Node::start_in(
        dir,
        &work_root,
        store.path(),
        "build_slots = 0\nmin_free_mib = 64\n",
    );
    let ready = node.not_ready_for(&format!("layout store {} has ", store.path().display()));
    assert!(
        ready.contains("below worker.min_free_mib (64 MiB)"),
        "{ready}"
    );
    assert!(
        !ready.contains("work root"),
        "the work root has room: {ready}"
    );
    let job = import_job("imp-store", "127.0.0.1:9", "unused-pw-1");
    let log = node.assert_stays_queued(job);
    assert!(log.contains("layout store"), "{log}");
}

/// Issue 10: `factoryd store ls / gc --dry-run / rm` on the store a running `serve` writes to,
/// and `serve`'s own collection after jobs (`keep_per_source = 1`): the newest image stays.
#[test]
fn store_commands_work_beside_a_running_serve_that_collects_after_jobs() {
    let registry = Registry::start(Auth::user("alice", "pw-Secret-77"));
    seed(
        &registry.host,
        "team/web:1",
        Some(("alice", "pw-Secret-77")),
    );
    // The [store] section rides in after the worker's keys.
    let node =
        Node::start_with("build_slots = 0\n[store]\nkeep_per_source = 1\nmin_age_secs = 0\n");
    for id in ["imp-1", "imp-2", "imp-3"] {
        let (out, result) = node.submit(import_job(id, &registry.host, "pw-Secret-77"));
        assert_eq!(out.status.code(), Some(0), "{}", node.log());
        assert!(result.is_some());
    }
    let store = |args: &[&str]| factoryd_store(&node.config, args);
    let listed = || -> Vec<String> {
        store_ls(&node.config)
            .iter()
            .map(|image| image["reference"].to_string())
            .collect()
    };
    // serve looks for new images every 5 s and keeps the newest of the source.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while listed() != ["\"src-web:imp-3\""] {
        assert!(
            std::time::Instant::now() < deadline,
            "{:?}\n{}",
            listed(),
            node.log()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let metrics = http_get(node.metrics_port, "/metrics");
    assert!(
        metrics.contains("factoryd_store_images_dropped_total{rule=\"keep_per_source\"} 2"),
        "{metrics}"
    );

    let dry = store(&["gc", "--dry-run"]);
    assert!(dry.status.success());
    assert!(
        String::from_utf8_lossy(&dry.stdout).is_empty(),
        "nothing more to drop"
    );
    let rm = store(&["rm", "src-web:imp-3"]);
    assert!(
        rm.status.success(),
        "{}",
        String::from_utf8_lossy(&rm.stderr)
    );
    assert!(listed().is_empty());

    // serve goes on storing into the store the commands changed.
    let (out, _) = node.submit(import_job("imp-4", &registry.host, "pw-Secret-77"));
    assert_eq!(out.status.code(), Some(0), "{}", node.log());
    assert_eq!(listed(), ["\"src-web:imp-4\""]);
    skopeo_raw(
        &format!(
            "oci:{}:src-web:imp-4",
            node.dir.path().join("store").display()
        ),
        &[],
    );
}
