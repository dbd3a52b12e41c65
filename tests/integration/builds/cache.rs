//! The fleet's shared build cache (`[builder.cache]`) against real builders and a
//! `docker-registry` with htpasswd auth as the cache registry: a builder whose own cache was
//! wiped (as another node's is) takes a step from the shared cache instead of running it; a
//! source never imports another's; an unreachable cache registry costs a warning, not the
//! build. "Another node" is a private Docker Engine wiped with `docker builder prune`, or a
//! fresh private buildkitd (`FACTORYD_TEST_BUILDKITD_BIN`): never the shared builders.

use std::path::Path;
use std::sync::Arc;

use factoryd::config::{Config, DaemonAddr};
use factoryd::job::JobEvent;
use serde_json::json;

use super::{
    base_registry, builder_at, builder_for, context_for, log_lines, run_from_layout, stages,
    standalone_missing, test_config, Backend, PASSWORD, USER,
};
use crate::support::buildkitd::{PrivateBuildkitd, BIN_VAR};
use crate::support::docker::Engine;
use crate::support::http_files::{FileServer, Route};
use crate::support::registry::{skopeo_raw, Auth, Registry};
use crate::support::run::docker_file_job;
use crate::support::sources::{targz, Recorder};

const CACHE_USER: &str = "cacher";
const CACHE_PASSWORD: &str = "cache-pass-c4e1";

/// The step whose result the cache must carry: a random stamp, different each time it runs.
const STAMP_STEP: &str = "RUN head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n' > /stamp";

/// A builder whose own cache a test may wipe.
enum Node {
    Engine(Engine),
    Buildkitd(PrivateBuildkitd),
}

impl Node {
    /// A node for `backend`, or `None` (the test reported skipped) when this machine has no
    /// buildkitd binary for a standalone one.
    fn start(backend: Backend) -> Option<Node> {
        match backend {
            Backend::Docker | Backend::Buildkitd => Some(Node::Engine(Engine::private())),
            Backend::Standalone => match PrivateBuildkitd::binary() {
                Some(binary) => Some(Node::Buildkitd(PrivateBuildkitd::start(&binary))),
                None => {
                    let name = std::thread::current().name().unwrap_or("?").to_owned();
                    crate::support::skipped(
                        &name,
                        &format!("needs {BIN_VAR}=… naming a buildkitd binary"),
                    );
                    None
                }
            },
        }
    }

    fn builder(&self, backend: Backend) -> Arc<dyn factoryd::ports::Builder> {
        match self {
            Node::Engine(engine) => builder_at(backend, DaemonAddr::Unix(engine.socket.clone())),
            Node::Buildkitd(daemon) => builder_at(backend, DaemonAddr::Unix(daemon.socket.clone())),
        }
    }

    /// The same node with its own build cache gone: the engine pruned (and checked empty), or
    /// a new buildkitd on an empty root in place of this one.
    fn wiped(self) -> Node {
        match self {
            Node::Engine(engine) => {
                engine.docker_ok(&["builder", "prune", "--all", "--force"]);
                engine.docker_ok(&["image", "prune", "--all", "--force"]);
                let (bytes, records) = engine.build_cache_bytes();
                assert_eq!(
                    (bytes, records),
                    (0, 0),
                    "the engine's build cache is empty"
                );
                Node::Engine(engine)
            }
            Node::Buildkitd(daemon) => {
                let binary = PrivateBuildkitd::binary().expect("started with it before");
                drop(daemon);
                Node::Buildkitd(PrivateBuildkitd::start(&binary))
            }
        }
    }
}

/// A config storing into `layout` with `cache_registry` as the shared cache.
fn cache_config(root: &Path, cache_registry: &str) -> Config {
    let password_file = root.join("cache-password");
    std::fs::write(&password_file, format!("{CACHE_PASSWORD}\n")).unwrap();
    test_config(&format!(
        "[destination]\nkind = \"oci-layout\"\npath = \"{}\"\n\
         [builder.cache]\nregistry = \"{cache_registry}\"\nrepository = \"buildcache/{{source_id}}\"\n\
         username = \"{CACHE_USER}\"\npassword_file = \"{}\"\n",
        root.join("store").display(),
        password_file.display()
    ))
}

/// A tar.gz source building [`STAMP_STEP`] on the private base image.
fn stamp_source(server: &FileServer, base_host: &str) -> String {
    server.route(
        "/stamp.tar.gz",
        Route::Body(Arc::new(targz(&[(
            "Dockerfile",
            &format!("FROM {base_host}/base/busybox:1\n{STAMP_STEP}\n"),
        )]))),
    )
}

/// One build of `url` as `job_id` of `source_id` on `builder`: its log lines and events, or
/// the failure with its log.
async fn build(
    builder: Arc<dyn factoryd::ports::Builder>,
    engine: &Engine,
    config: &Config,
    (job_id, source_id): (&str, &str),
    url: &str,
    base_host: &str,
    work: &Path,
) -> Arc<Recorder> {
    let job = docker_file_job(
        job_id,
        source_id,
        json!({
            "targz_url": url, "context_dir": "/", "build_file": "/Dockerfile",
            "credentials": [{"url": base_host, "username": USER, "token": PASSWORD}]
        }),
    );
    let job = factoryd::job::decode(job.to_string().as_bytes()).expect("job decodes");
    let recorder = Arc::new(Recorder::default());
    let (cx, _ws) = context_for(
        &job,
        work,
        recorder.clone(),
        tokio_util::sync::CancellationToken::new(),
    );
    // The backend's stages, on this node's builder.
    let mut stages = stages(Backend::Docker, engine, config);
    stages.builder = builder;
    if let Err(e) = factoryd::pipeline::run_job(&job, &stages, &cx).await {
        panic!("build {job_id} failed: {e}\n{:?}", log_lines(&recorder));
    }
    recorder
}

/// The stamp in the image stored as `tag`.
fn stamp(engine: &Engine, root: &Path, tag: &str) -> String {
    let stamp = run_from_layout(engine, &root.join("store"), tag, &["/stamp"]);
    assert_eq!(stamp.len(), 32, "{stamp:?}");
    stamp
}

/// Whether the log says the step named `step` came from a cache (`#N <step>`, then `#N
/// CACHED`).
fn step_cached(lines: &[String], step: &str) -> bool {
    lines.iter().any(|line| {
        let Some((number, name)) = line.split_once(' ') else {
            return false;
        };
        name.ends_with(step) && lines.contains(&format!("{number} CACHED"))
    })
}

/// The `build_cache` warnings among `recorder`'s events.
fn cache_warnings(recorder: &Recorder) -> Vec<String> {
    recorder
        .events
        .lock()
        .unwrap()
        .iter()
        .filter_map(|e| match e {
            JobEvent::Warning { code, message } if code == factoryd::job::WARNING_BUILD_CACHE => {
                Some(message.clone())
            }
            _ => None,
        })
        .collect()
}

/// The cache's tag on `backend`.
fn cache_tag(backend: Backend) -> &'static str {
    match backend {
        Backend::Standalone => "cache",
        Backend::Docker | Backend::Buildkitd => "inline",
    }
}

async fn a_wiped_builder_takes_the_step_from_the_fleet_cache(backend: Backend) {
    let Some(node) = Node::start(backend) else {
        return;
    };
    let engine = Engine::shared();
    let base = base_registry(&engine, "marker-fleet-cache");
    let cache = Registry::start(Auth::user(CACHE_USER, CACHE_PASSWORD));
    let server = FileServer::start();
    let url = stamp_source(&server, &base.host);
    let root = tempfile::tempdir().unwrap();
    let config = cache_config(root.path(), &cache.host);
    let work = root.path().join("work");

    let first = build(
        node.builder(backend),
        &engine,
        &config,
        ("job-cold", "src-fleet"),
        &url,
        &base.host,
        &work,
    )
    .await;
    assert!(
        !step_cached(&log_lines(&first), STAMP_STEP),
        "a new node runs the step: {:?}",
        log_lines(&first)
    );
    assert_eq!(cache_warnings(&first), Vec::<String>::new());
    let cold = stamp(&engine, root.path(), "src-fleet:job-cold");
    // The cache is in the registry, under the source's repository, with the cache's login.
    let reference = format!(
        "docker://{}/buildcache/src-fleet:{}",
        cache.host,
        cache_tag(backend)
    );
    let creds = format!("{CACHE_USER}:{CACHE_PASSWORD}");
    skopeo_raw(&reference, &["--creds", &creds, "--tls-verify=false"]);

    let node = node.wiped();
    let second = build(
        node.builder(backend),
        &engine,
        &config,
        ("job-warm", "src-fleet"),
        &url,
        &base.host,
        &work,
    )
    .await;
    let lines = log_lines(&second);
    assert!(
        step_cached(&lines, STAMP_STEP),
        "the step came from the shared cache: {lines:?}"
    );
    assert_eq!(cache_warnings(&second), Vec::<String>::new());
    assert_eq!(
        stamp(&engine, root.path(), "src-fleet:job-warm"),
        cold,
        "the step did not run again"
    );
    assert!(
        !lines.iter().any(|l| l.contains(CACHE_PASSWORD)),
        "{lines:?}"
    );
}

backend_tests! {
    a_wiped_builder_takes_the_step_from_the_fleet_cache =>
    Docker: a_wiped_engine_takes_the_step_from_the_fleet_cache_through_build,
    Buildkitd: a_wiped_engine_takes_the_step_from_the_fleet_cache_through_the_control_api,
    Standalone: standalone_buildkitd_wiped_takes_the_step_from_the_fleet_cache,
}

async fn a_source_never_imports_another_sources_cache(backend: Backend) {
    let Some(node) = Node::start(backend) else {
        return;
    };
    let engine = Engine::shared();
    let base = base_registry(&engine, "marker-fleet-other");
    let cache = Registry::start(Auth::user(CACHE_USER, CACHE_PASSWORD));
    let server = FileServer::start();
    let url = stamp_source(&server, &base.host);
    let root = tempfile::tempdir().unwrap();
    let config = cache_config(root.path(), &cache.host);
    let work = root.path().join("work");

    build(
        node.builder(backend),
        &engine,
        &config,
        ("job-a", "src-a"),
        &url,
        &base.host,
        &work,
    )
    .await;
    let a = stamp(&engine, root.path(), "src-a:job-a");

    // The same context for another source, on a node without a cache of its own.
    let node = node.wiped();
    let other = build(
        node.builder(backend),
        &engine,
        &config,
        ("job-b", "src-b"),
        &url,
        &base.host,
        &work,
    )
    .await;
    let lines = log_lines(&other);
    assert!(!step_cached(&lines, STAMP_STEP), "{lines:?}");
    assert_ne!(stamp(&engine, root.path(), "src-b:job-b"), a);
    let own = format!(
        "importing cache manifest from {}/buildcache/src-b:",
        cache.host
    );
    assert!(lines.iter().any(|l| l.contains(&own)), "{lines:?}");
    assert!(
        !lines.iter().any(|l| l.contains("buildcache/src-a")),
        "{lines:?}"
    );
    // Its first build found no cache of its own: no warning for that.
    assert_eq!(cache_warnings(&other), Vec::<String>::new());
}

backend_tests! {
    a_source_never_imports_another_sources_cache =>
    Docker: a_source_never_imports_another_sources_cache_on_the_engine,
    Standalone: standalone_buildkitd_source_never_imports_another_sources_cache,
}

async fn an_unreachable_cache_costs_a_warning_not_the_build(backend: Backend) {
    let engine = Engine::shared();
    let base = base_registry(&engine, "marker-fleet-down");
    let server = FileServer::start();
    let url = stamp_source(&server, &base.host);
    let root = tempfile::tempdir().unwrap();
    // Nothing listens there: every connection is refused.
    let nowhere = format!("127.0.0.1:{}", crate::support::free_port());
    let config = cache_config(root.path(), &nowhere);

    let recorder = build(
        builder_for(backend, &engine),
        &engine,
        &config,
        ("job-down", "src-down"),
        &url,
        &base.host,
        &root.path().join("work"),
    )
    .await;
    stamp(&engine, root.path(), "src-down:job-down");
    let warnings = cache_warnings(&recorder);
    let imported = format!("could not be imported from {nowhere}/buildcache/src-down:");
    let exported = format!("could not be exported to {nowhere}/buildcache/src-down:");
    assert!(
        warnings.iter().any(|w| w.contains(&imported)),
        "{warnings:?}"
    );
    assert!(
        warnings.iter().any(|w| w.contains(&exported)),
        "{warnings:?}"
    );
    assert!(
        warnings.iter().all(|w| !w.contains(CACHE_PASSWORD)),
        "{warnings:?}"
    );
}

backend_tests! {
    an_unreachable_cache_costs_a_warning_not_the_build =>
    Docker: an_unreachable_cache_registry_costs_a_warning_not_the_build_through_build,
    Buildkitd: an_unreachable_cache_registry_costs_a_warning_not_the_build_through_the_control_api,
    Standalone: standalone_buildkitd_unreachable_cache_registry_costs_a_warning_not_the_build,
}
