//! Sources fetched and sealed in the confined child process (`sources.isolation =
//! "process"`): the same context as in-process, and a child that runs away ends its job only.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use factoryd::adapters::sources::SourceFetcher;
use factoryd::error::{ErrorClass, ErrorCode, JobError};
use factoryd::job::JobEvent;
use factoryd::ports::{FetchedSource, Fetcher};
use factoryd::sandbox::ConfinedFetcher;
use factoryd::workspace::Workspace;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::support::failure::assert_failure;
use crate::support::git_servers::{revision_fixture, test_tls, EndlessRefs, GitHttpServer};
use crate::support::http_files::{FileServer, Route};
use crate::support::run::{docker_file_job, factoryd_run, Ran};
use crate::support::sources::{config, context_bytes, fetch_details, tar_entries, targz, Recorder};
use crate::support::{assert_success, assert_within};

const USER: &str = "builder";
const PASSWORD: &str = "s3cret-Passw0rd";

fn factoryd() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_factoryd"))
}

fn test_config(extra: &str) -> factoryd::config::Config {
    let ca = test_tls().ca.display().to_string();
    config(&format!("[git]\ntls_ca_file = \"{ca}\"\n{extra}"))
}

/// Fetches `details` with `fetcher` in a fresh workspace under `root`, cancelling after
/// `cancel_after` if given.
async fn fetch(
    fetcher: &dyn Fetcher,
    root: &std::path::Path,
    name: &str,
    details: serde_json::Value,
    cancel_after: Option<Duration>,
) -> (Result<FetchedSource, JobError>, Arc<Recorder>, Workspace) {
    let cancel = CancellationToken::new();
    if let Some(after) = cancel_after {
        let cancel = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            cancel.cancel();
        });
    }
    fetch_details(fetcher, root, name, details, cancel).await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tarball_sealed_in_the_child_streams_exactly_what_the_worker_would_seal() {
    let server = FileServer::start();
    let url = server.route(
        "/src.tar.gz",
        Route::Body(Arc::new(targz(&[
            ("Dockerfile", "FROM scratch\nCOPY . /\n"),
            (".dockerignore", "secret.txt\n"),
            ("app/main.rs", "fn main() {}\n"),
            ("secret.txt", "left out\n"),
        ]))),
    );
    let root = tempfile::tempdir().unwrap();
    let config = test_config("");
    let details = json!({"targz_url": url});
    let confined = ConfinedFetcher::new(factoryd(), &config);
    let (result, recorder, _ws) =
        fetch(&confined, root.path(), "job-child", details.clone(), None).await;
    let child = result.expect("the child seals the tarball");
    let confinement = confined
        .confinement()
        .expect("the child reported its confinement");
    eprintln!("confinement: {confinement:?}");
    assert!(
        confinement.rlimits && confinement.no_new_privs && confinement.seccomp,
        "{confinement:?}"
    );
    let in_process = SourceFetcher::new(&config).unwrap();
    let (result, _, _ws2) = fetch(&in_process, root.path(), "job-here", details, None).await;
    let here = result.unwrap();
    assert_eq!(child.context.dockerfile(), here.context.dockerfile());
    assert_eq!(
        context_bytes(&child),
        context_bytes(&here),
        "the same context stream, byte for byte"
    );
    assert_eq!(child.fetched_bytes, here.fetched_bytes);
    let names: Vec<String> = tar_entries(&context_bytes(&child))
        .into_iter()
        .map(|e| e.0)
        .collect();
    assert!(!names.iter().any(|n| n == "secret.txt"), "{names:?}");
    assert!(
        recorder
            .events
            .lock()
            .unwrap()
            .iter()
            .any(|e| matches!(e, JobEvent::Progress { .. })),
        "the child's progress events reach the job"
    );
}

/// Fails after `limit` bytes, as a builder that goes away in the middle of the context.
struct Stops {
    taken: usize,
    limit: usize,
}

impl std::io::Write for Stops {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.taken >= self.limit {
            return Err(std::io::Error::new(
                std::io::ErrorKind::BrokenPipe,
                "the reader went away",
            ));
        }
        let n = buf.len().min(self.limit - self.taken);
        self.taken += n;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The context comes over the child's pipe as often as the builder reads it (the build file
/// first, then the whole stream), a reader that stops in the middle included; nothing of it
/// is written into the workspace; the job's cancellation ends the child and its stream.
#[tokio::test(flavor = "multi_thread")]
async fn the_context_streams_from_the_child_each_time_it_is_read_until_the_job_is_cancelled() {
    let big = "0123456789abcdef".repeat(256 << 10); // 4 MiB: many frames
    let server = FileServer::start();
    let url = server.route(
        "/src.tar.gz",
        Route::Body(Arc::new(targz(&[
            ("a-big-file.bin", big.as_str()),
            ("Dockerfile", "FROM scratch\nCOPY . /\n"),
            ("z.txt", "last\n"),
        ]))),
    );
    let root = tempfile::tempdir().unwrap();
    let config = test_config("");
    let details = json!({"targz_url": url});
    let confined = ConfinedFetcher::new(factoryd(), &config);
    let cancel = CancellationToken::new();
    let (result, _, workspace) = fetch_details(
        &confined,
        root.path(),
        "job-child",
        details.clone(),
        cancel.clone(),
    )
    .await;
    let child = Arc::new(result.expect("the child seals the tarball"));
    let (here, _, _ws2) = fetch(
        &SourceFetcher::new(&config).unwrap(),
        root.path(),
        "job-here",
        details,
        None,
    )
    .await;
    let expected = context_bytes(&here.unwrap());

    let reads = Arc::clone(&child);
    let (dockerfile, whole, stopped, again) = tokio::task::spawn_blocking(move || {
        let dockerfile = reads
            .context
            .read_build_file(1 << 20)
            .expect("the build file");
        let whole = context_bytes(&reads);
        let mut stops = Stops {
            taken: 0,
            limit: 300 << 10,
        };
        let stopped = reads.context.write_tar(&mut stops);
        let again = context_bytes(&reads);
        (dockerfile, whole, stopped, again)
    })
    .await
    .unwrap();
    assert_eq!(dockerfile, b"FROM scratch\nCOPY . /\n");
    assert!(whole == expected, "the same context stream as in-process");
    let err = stopped.expect_err("a reader that stops fails that read");
    assert!(err.message.contains("went away"), "{err}");
    assert!(again == expected, "and the next read is whole again");
    let files: Vec<_> = walk_files(workspace.path());
    assert!(
        !files.iter().any(|f| f.ends_with(".tar")),
        "no context file in the workspace: {files:?}"
    );

    cancel.cancel();
    let started = Instant::now();
    let after = tokio::task::spawn_blocking(move || child.context.write_tar(&mut Vec::new()))
        .await
        .unwrap();
    let err = after.expect_err("the child is gone once the job is cancelled");
    assert_eq!(err.code, ErrorCode::Cancelled, "{err}");
    assert_within(started, Duration::from_secs(10));
}

/// Every file below `dir`.
fn walk_files(dir: &std::path::Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            if entry.file_type().unwrap().is_dir() {
                stack.push(path);
            } else {
                found.push(path);
            }
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread")]
async fn git_over_https_in_the_child_gives_the_same_revision_and_context() {
    let root = tempfile::tempdir().unwrap();
    let fixture = revision_fixture(root.path());
    let server = GitHttpServer::start_tls(&root.path().join("repos"), USER, PASSWORD);
    let details = server.app_details(USER, PASSWORD);
    let config = test_config("");
    let work = root.path().join("work");
    let confined = ConfinedFetcher::new(factoryd(), &config);
    let (result, _, _ws) = fetch(&confined, &work, "job-child", details.clone(), None).await;
    let child = result.expect("the child fetches over https with the job's password");
    assert_eq!(child.revision.clone().unwrap().commit, fixture.main_tip());
    let in_process = SourceFetcher::new(&config).unwrap();
    let (result, _, _ws2) = fetch(&in_process, &work, "job-here", details, None).await;
    let here = result.unwrap();
    assert_eq!(child.revision, here.revision);
    assert_eq!(context_bytes(&child), context_bytes(&here));

    // A wrong password: the child's classified error comes back as it is.
    let wrong = server.app_details(USER, "not-it-4471");
    let (result, _, _ws3) = fetch(&confined, &work, "job-wrong", wrong, None).await;
    let Err(err) = result else {
        panic!("a wrong password must fail")
    };
    assert_failure(&err, ErrorClass::Permanent, ErrorCode::AuthFailed, &[]);
    assert!(!err.message.contains("not-it-4471"), "{err}");
}

/// Issue 14: a source that makes its handler burn CPU (here a server that never stops
/// advertising refs, with the advertisement cap raised out of the way) ends in the child's CPU
/// limit: the job fails permanently naming the limit, and the same fetcher goes on.
#[tokio::test(flavor = "multi_thread")]
async fn a_child_that_uses_up_its_cpu_time_fails_its_job_and_the_next_job_runs() {
    let root = tempfile::tempdir().unwrap();
    let server = EndlessRefs::start(root.path(), 0);
    let config =
        test_config("max_ref_advertisement_bytes = 4294967296\n[sources]\nchild_cpu_secs = 1\n");
    let confined = ConfinedFetcher::new(factoryd(), &config);
    let started = Instant::now();
    let details = json!({"repo": {"url": server.url}});
    let (result, _, _ws) = fetch(&confined, root.path(), "job-cpu", details, None).await;
    let Err(err) = result else {
        panic!("the endless advertisement must fail")
    };
    assert_failure(
        &err,
        ErrorClass::Permanent,
        ErrorCode::LimitExceeded,
        &["sources.child_cpu_secs"],
    );
    assert_within(started, Duration::from_secs(25));

    let files = FileServer::start();
    let url = files.route(
        "/ok.tar.gz",
        Route::Body(Arc::new(targz(&[("Dockerfile", "FROM scratch\n")]))),
    );
    let (result, _, _ws2) = fetch(
        &confined,
        root.path(),
        "job-next",
        json!({"targz_url": url}),
        None,
    )
    .await;
    assert!(result.is_ok(), "the next job runs");
}

/// Issue 14: a child that overflows its stack ends its job as permanent `limit_exceeded`
/// saying so, and the next job runs. No input can make the child recurse (its walks keep their
/// own stacks), so a test build of the child overflows on purpose for one magic URL.
#[tokio::test(flavor = "multi_thread")]
async fn a_child_that_overflows_its_stack_fails_its_job_and_the_next_job_runs() {
    let root = tempfile::tempdir().unwrap();
    let confined = ConfinedFetcher::new(factoryd(), &test_config(""));
    let details = json!({"targz_url": "http://overflow-the-stack.test-util.invalid/a.tar.gz"});
    let started = Instant::now();
    let (result, _, _ws) = fetch(&confined, root.path(), "job-stack", details, None).await;
    let Err(err) = result else {
        panic!("a child that overflows its stack must fail its job")
    };
    assert_failure(
        &err,
        ErrorClass::Permanent,
        ErrorCode::LimitExceeded,
        &["overflowed its stack"],
    );
    assert_within(started, Duration::from_secs(20));

    let files = FileServer::start();
    let url = files.route(
        "/ok.tar.gz",
        Route::Body(Arc::new(targz(&[("Dockerfile", "FROM scratch\n")]))),
    );
    let details = json!({"targz_url": url});
    let (result, _, _ws2) = fetch(&confined, root.path(), "job-next", details, None).await;
    assert!(result.is_ok(), "the next job runs");
}

/// Cancellation (and so the job timeout) kills the child at once, wherever it is.
#[tokio::test(flavor = "multi_thread")]
async fn cancellation_kills_the_child() {
    let root = tempfile::tempdir().unwrap();
    let server = EndlessRefs::start(root.path(), 5);
    let confined = ConfinedFetcher::new(factoryd(), &test_config(""));
    let started = Instant::now();
    let details = json!({"repo": {"url": server.url}});
    let (result, _, _ws) = fetch(
        &confined,
        root.path(),
        "job-cancel",
        details,
        Some(Duration::from_secs(1)),
    )
    .await;
    let Err(err) = result else {
        panic!("a cancelled fetch must fail")
    };
    assert_eq!(err.code, ErrorCode::Cancelled, "{err}");
    assert_within(started, Duration::from_secs(10));
}

/// The confinement does what it says on this machine: after it, the process cannot run a
/// program (seccomp refuses execve), signal its parent, fork, or create a file outside the
/// job's workspace (Landlock), and can still write inside the workspace.
#[test]
fn a_confined_process_cannot_exec_or_write_outside_its_workspace() {
    let root = tempfile::tempdir().unwrap();
    let workspace = root.path().join("workspace");
    std::fs::create_dir(&workspace).unwrap();
    let outside = root.path().join("outside.txt");
    let out = std::process::Command::new(factoryd())
        .args(["source-worker", "--probe-workspace"])
        .arg(&workspace)
        .arg("--probe-outside")
        .arg(&outside)
        .output()
        .unwrap();
    assert_success(&out, "source-worker --probe-workspace");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    eprintln!("{report}");
    let confinement = &report["confinement"];
    assert_eq!(confinement["seccomp"], true, "{report}");
    assert_eq!(report["exec_refused"], true, "{report}");
    // The allow list, not a deny list: calls nothing a source needs, such as signalling
    // another process or starting one without exec, fail too.
    assert_eq!(report["signal_parent_refused"], true, "{report}");
    assert_eq!(report["fork_refused"], true, "{report}");
    assert_eq!(report["inside_write_ok"], true, "{report}");
    if confinement["landlock"] == true {
        assert_eq!(report["outside_write_refused"], true, "{report}");
        assert!(!outside.exists());
    } else {
        eprintln!("this kernel has no Landlock: writes outside the workspace are not refused");
    }
}

/// A source that makes its handler allocate without end (refs advertised forever, the
/// advertisement cap raised out of the way) ends at the child's address-space limit: the job
/// fails permanently naming `sources.child_memory_mib`, whichever allocation fails first.
#[tokio::test(flavor = "multi_thread")]
async fn a_child_that_runs_out_of_memory_fails_its_job_naming_the_limit() {
    let root = tempfile::tempdir().unwrap();
    let server = EndlessRefs::start(root.path(), 0);
    let config = test_config(
        "max_ref_advertisement_bytes = 4294967296\n[sources]\nchild_memory_mib = 512\nchild_cpu_secs = 120\n",
    );
    let confined = ConfinedFetcher::new(factoryd(), &config);
    let started = Instant::now();
    let details = json!({"repo": {"url": server.url}});
    let (result, _, _ws) = fetch(&confined, root.path(), "job-mem", details, None).await;
    let Err(err) = result else {
        panic!("the endless advertisement must fail")
    };
    eprintln!(
        "{err} after {:?}, server sent {} B",
        started.elapsed(),
        server.sent()
    );
    assert_failure(
        &err,
        ErrorClass::Permanent,
        ErrorCode::LimitExceeded,
        &["sources.child_memory_mib"],
    );
}

/// Issue 14, item 7: a redirect from https to plain http is refused, here for a tar.gz source
/// fetched by `factoryd run` (in its confined child, which trusts the test CA through
/// `SSL_CERT_FILE`): permanent `egress_refused`, and nothing is built.
#[test]
fn factoryd_run_refuses_a_tarball_redirected_from_https_to_http() {
    use crate::support::{free_port, wait_for_port, ChildGuard};
    let tls = test_tls();
    let files = FileServer::start();
    let plain = files.route(
        "/src.tar.gz",
        Route::Body(Arc::new(targz(&[("Dockerfile", "FROM scratch\n")]))),
    );
    let port = free_port();
    let _redirect = ChildGuard::spawn(
        "https redirect",
        std::process::Command::new("python3")
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/integration/support/tls_redirect.py"
            ))
            .arg(port.to_string())
            .arg(&tls.cert)
            .arg(&tls.key)
            .arg(&plain),
    );
    wait_for_port(([127, 0, 0, 1], port).into(), Duration::from_secs(10));
    let root = tempfile::tempdir().unwrap();
    let https = format!("https://127.0.0.1:{port}/src.tar.gz");
    let job = docker_file_job("job-downgrade", "src", json!({"targz_url": https}));
    let ran = Ran::of(
        &factoryd_run(root.path(), &job, "")
            .env("SSL_CERT_FILE", &tls.ca)
            .output()
            .unwrap(),
    );
    let stderr = &ran.stderr;
    assert_eq!(ran.code, Some(1), "{stderr}");
    let result = ran.result();
    let error = &result["error"];
    assert_eq!(error["code"], "egress_refused", "{result}");
    assert_eq!(error["class"], "permanent", "{result}");
    assert!(
        error["message"]
            .as_str()
            .unwrap_or_default()
            .contains("https:// to plain http://"),
        "{result}"
    );
}

/// Peak resident memory of process `pid` so far (VmHWM), in KiB; `None` once it is gone.
fn peak_rss_kib(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// Issue 14: the worker's memory does not grow with a hostile source. `factoryd run` (the
/// worker process) fetches from a server that advertises refs without end (advertisement cap
/// raised out of the way); its source child runs into its 512 MiB address-space limit while
/// the worker's own peak RSS stays under 64 MiB (debug build), and the job fails as
/// `limit_exceeded`. Before the child, the worker itself held the advertisement (5.5 GiB in
/// the report).
#[test]
fn the_workers_memory_stays_flat_while_a_source_child_runs_out_of_memory() {
    let root = tempfile::tempdir().unwrap();
    let server = EndlessRefs::start(root.path(), 0);
    let extra = format!(
        "[git]\ntls_ca_file = \"{}\"\nmax_ref_advertisement_bytes = 4294967296\n\
         [sources]\nchild_memory_mib = 512\n",
        test_tls().ca.display()
    );
    let job = docker_file_job("job-mem", "src", json!({"repo": {"url": server.url}}));
    let mut run = factoryd_run(root.path(), &job, &extra)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pid = run.id();
    let mut peak = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while run.try_wait().unwrap().is_none() {
        if let Some(kib) = peak_rss_kib(pid) {
            peak = peak.max(kib);
        }
        assert!(Instant::now() < deadline, "factoryd run did not finish");
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = run.wait_with_output().unwrap();
    let result: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    eprintln!(
        "worker peak RSS {peak} KiB; server sent {} B; {result}",
        server.sent()
    );
    assert_eq!(result["error"]["code"], "limit_exceeded", "{result}");
    assert!(
        server.sent() > 100 << 20,
        "the source really grew: {}",
        server.sent()
    );
    assert!(peak > 0 && peak < 64 << 10, "worker peak RSS {peak} KiB");
}
