//! Node credentials a job uses join its masking set (issue 14).

use std::sync::Arc;

use base64::Engine as _;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::config::{Config, DestinationKind, RegistryCredentials, RegistryTarget};
use crate::job::Redactor;
use crate::ports::NoEvents;
use crate::testing::ScriptedStages;

fn job(origin: serde_json::Value) -> Job {
    crate::job::decode_value(&json!({"v": 1, "id": "j1", "source_id": "s1", "origin": origin}))
        .expect("valid job")
}

fn context(workspace: &std::path::Path, job: &Job) -> StageContext {
    StageContext {
        job_id: job.id.clone(),
        attempt: 1,
        cancel: CancellationToken::new(),
        events: Arc::new(NoEvents),
        redactor: Arc::new(Redactor::for_job(job)),
        workspace: workspace.to_owned(),
    }
}

fn assert_masked(cx: &StageContext, user: &str, password: &str) {
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    assert_eq!(
        cx.redactor.redact(&format!("{password} Basic {basic}")),
        "*** Basic ***"
    );
}

#[tokio::test]
async fn the_destination_registry_password_joins_the_masking_set() {
    let dir = tempfile::tempdir().unwrap();
    let password_file = dir.path().join("password");
    std::fs::write(&password_file, "dest-pass-91xq\n").unwrap();
    let mut destination = Config::defaults().destination;
    destination.kind = DestinationKind::Registry;
    destination.registry = Some(RegistryTarget {
        authority: "registry.example:5000".into(),
        plain_http: false,
    });
    destination.credentials = Some(RegistryCredentials {
        username: "factoryd".into(),
        password_file,
    });
    let mut stages = ScriptedStages::new().stages(dir.path().join("store"));
    stages.destinations = DestinationSettings::new(destination);
    let job = job(json!({"type": "docker-hub", "details": {"target": "busybox:1"}}));
    let cx = context(dir.path(), &job);

    run_job(&job, &stages, &cx).await.expect("scripted import");
    assert_masked(&cx, "factoryd", "dest-pass-91xq");
}

#[tokio::test]
async fn node_registry_credentials_given_to_a_build_join_the_masking_set() {
    let dir = tempfile::tempdir().unwrap();
    let mut stages = ScriptedStages::new().stages(dir.path().join("store"));
    stages.node_registry_auth = vec![NodeRegistryAuth {
        host: "base.example".into(),
        auth: BasicAuth {
            username: "node-user".into(),
            password: crate::secret::Secret::new("node-pass-77ab"),
        },
        sources: None,
    }];
    let job = job(json!({"type": "docker-file", "details": {
        "targz_url": "https://example.com/src.tar.gz"}}));
    let cx = context(dir.path(), &job);

    run_job(&job, &stages, &cx).await.expect("scripted build");
    assert_masked(&cx, "node-user", "node-pass-77ab");
}

#[tokio::test]
async fn the_nodes_nats_credentials_are_masked_in_every_job() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("nats-token");
    std::fs::write(&token_file, "nats-token-5kq2\n").unwrap();
    let mut config = Config::defaults();
    config.nats.auth = crate::config::NatsAuth::TokenFile(token_file);
    let mut stages = ScriptedStages::new().stages(dir.path().join("store"));
    stages.node_secrets = crate::app::nats_secrets(&config.nats.auth);
    let job = job(json!({"type": "docker-hub", "details": {"target": "busybox:1"}}));
    let cx = context(dir.path(), &job);
    assert_eq!(cx.redactor.redact("nats-token-5kq2"), "nats-token-5kq2");

    run_job(&job, &stages, &cx).await.expect("scripted import");
    assert_eq!(cx.redactor.redact("token nats-token-5kq2"), "token ***");
}

/// Issue 14: a `# syntax=` directive makes BuildKit pull and run the image it names. One not
/// in `builder.allowed_frontends` fails the job before the builder is called.
#[tokio::test]
async fn a_frontend_not_allowed_fails_the_build_before_the_builder_runs() {
    let dir = tempfile::tempdir().unwrap();
    let scripted =
        ScriptedStages::new().with_build_file("# syntax=evil.example/frontend:1\nFROM scratch\n");
    let mut stages = scripted.stages(dir.path().join("store"));
    let job = job(json!({"type": "docker-file", "details": {
        "targz_url": "https://example.com/src.tar.gz"}}));
    let cx = context(dir.path(), &job);

    let err = run_job(&job, &stages, &cx).await.expect_err("refused");
    assert_eq!(err.code, crate::error::ErrorCode::UnsafeSource, "{err}");
    assert_eq!(err.stage, Stage::Build);
    assert!(err.message.contains("evil.example/frontend:1"), "{err}");
    assert_eq!(scripted.runs(&job.id), 0, "the builder must not be called");

    stages.allowed_frontends = vec!["evil.example/frontend:1".into()];
    run_job(&job, &stages, &cx)
        .await
        .expect("allowed frontends build");
    assert_eq!(scripted.runs(&job.id), 1);
}

#[tokio::test]
async fn a_buildkit_syntax_build_arg_is_checked_like_the_directive() {
    let dir = tempfile::tempdir().unwrap();
    let scripted = ScriptedStages::new();
    let stages = scripted.stages(dir.path().join("store"));
    let job = job(json!({"type": "docker-file", "details": {
        "targz_url": "https://example.com/src.tar.gz"}}));
    let mut job = job;
    job.build = Some(crate::job::BuildOptions {
        args: [(
            "BUILDKIT_SYNTAX".to_owned(),
            "docker/dockerfile:1".to_owned(),
        )]
        .into(),
        ..Default::default()
    });
    let cx = context(dir.path(), &job);
    let err = run_job(&job, &stages, &cx).await.expect_err("refused");
    assert_eq!(err.code, crate::error::ErrorCode::UnsafeSource, "{err}");
    assert_eq!(scripted.runs(&job.id), 0);
}

/// `registries.credentials` with `sources`: a node login reaches only the builds of the
/// sources it names, and a job's own login for the same host wins.
#[test]
fn node_registry_logins_are_offered_only_to_the_sources_they_name() {
    let login = |host: &str, user: &str, sources: Option<Vec<&str>>| NodeRegistryAuth {
        host: host.into(),
        auth: BasicAuth {
            username: user.into(),
            password: crate::secret::Secret::new("p"),
        },
        sources: sources.map(|s| s.into_iter().map(str::to_owned).collect()),
    };
    let node = [
        login("shared.example", "everyone", None),
        login("team.example", "team-a", Some(vec!["team-a-*", "web"])),
        login("nobody.example", "nobody", Some(vec![])),
    ];
    let offered = |source_id: &str, own: serde_json::Value| {
        let mut value = json!({"v": 1, "id": "j1", "source_id": source_id,
            "origin": {"type": "docker-file", "details": {
                "targz_url": "https://example.com/src.tar.gz", "credentials": own}}});
        if value["origin"]["details"]["credentials"].is_null() {
            value["origin"]["details"]
                .as_object_mut()
                .unwrap()
                .remove("credentials");
        }
        let job = crate::job::decode_value(&value).expect("valid job");
        let Origin::DockerFile(df) = &job.origin else {
            unreachable!()
        };
        build_registry_auth(&node, &df.credentials, &job)
            .into_iter()
            .map(|(host, auth)| format!("{host}={}", auth.username))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        offered("team-a-api", json!(null)),
        ["shared.example=everyone", "team.example=team-a"]
    );
    assert_eq!(
        offered("web", json!(null)),
        ["shared.example=everyone", "team.example=team-a"]
    );
    assert_eq!(
        offered("team-b-api", json!(null)),
        ["shared.example=everyone"]
    );
    assert_eq!(
        offered(
            "team-b-api",
            json!([{"url": "team.example", "username": "b", "token": "t"}])
        ),
        ["team.example=b", "shared.example=everyone"]
    );
}

// ---- the fleet's shared build cache ----

/// A builder that keeps each request's cache and succeeds.
#[derive(Default)]
struct CacheRecorder {
    seen: std::sync::Mutex<Vec<Option<crate::ports::BuildCache>>>,
}

#[async_trait::async_trait]
impl Builder for CacheRecorder {
    async fn build(&self, request: BuildRequest, _: &StageContext) -> Result<ImageInfo, JobError> {
        self.seen.lock().unwrap().push(request.cache);
        Ok(ImageInfo {
            reference: "oci:x".into(),
            digest: "sha256:00".into(),
            source_digest: None,
            size_bytes: 0,
            platforms: Vec::new(),
        })
    }
}

/// Events, kept.
#[derive(Default)]
struct KeptEvents(std::sync::Mutex<Vec<JobEvent>>);

impl crate::ports::EventSink for KeptEvents {
    fn emit(&self, event: JobEvent) {
        self.0.lock().unwrap().push(event);
    }
}

fn cache_settings(repository: &str) -> BuildCacheSettings {
    let config = crate::config::from_toml_str(
        &format!(
            "[builder.cache]\nregistry = \"cache.example:5000\"\nrepository = \"{repository}\"\n"
        ),
        &std::collections::HashMap::new(),
    )
    .expect("config");
    BuildCacheSettings::with_auth(
        config.builder.cache.expect("a cache"),
        Some(BasicAuth {
            username: "cacher".into(),
            password: crate::secret::Secret::new("cache-pass-3x9"),
        }),
    )
}

fn build_job(source_id: &str, no_cache: bool) -> Job {
    crate::job::decode_value(&json!({"v": 1, "id": "j1", "source_id": source_id,
        "build": {"no_cache": no_cache},
        "origin": {"type": "docker-file", "details": {
            "targz_url": "https://example.com/src.tar.gz"}}}))
    .expect("valid job")
}

#[tokio::test]
async fn a_build_gets_its_own_sources_cache_and_no_cache_drops_only_the_import() {
    let dir = tempfile::tempdir().unwrap();
    let recorder = Arc::new(CacheRecorder::default());
    let mut stages = ScriptedStages::new().stages(dir.path().join("store"));
    stages.builder = recorder.clone();
    stages.build_cache = Some(cache_settings("buildcache/{source_id}"));

    for (source, no_cache) in [("web", false), ("api", false), ("web", true)] {
        let job = build_job(source, no_cache);
        let cx = context(dir.path(), &job);
        run_job(&job, &stages, &cx).await.expect("build");
        assert_masked(&cx, "cacher", "cache-pass-3x9");
    }
    let seen = recorder.seen.lock().unwrap();
    let described: Vec<(String, bool, String)> = seen
        .iter()
        .map(|c| {
            let c = c.as_ref().expect("a cache for every build");
            let user = c
                .auth
                .as_ref()
                .map(|a| a.username.clone())
                .unwrap_or_default();
            (c.reference("cache"), c.import, user)
        })
        .collect();
    assert_eq!(
        described,
        [
            (
                "cache.example:5000/buildcache/web:cache".to_owned(),
                true,
                "cacher".to_owned()
            ),
            (
                "cache.example:5000/buildcache/api:cache".to_owned(),
                true,
                "cacher".to_owned()
            ),
            (
                "cache.example:5000/buildcache/web:cache".to_owned(),
                false,
                "cacher".to_owned()
            ),
        ]
    );
}

#[tokio::test]
async fn a_build_file_naming_the_cache_registry_fails_before_the_builder_runs() {
    let dir = tempfile::tempdir().unwrap();
    let scripted = ScriptedStages::new()
        .with_build_file("FROM cache.example:5000/buildcache/other:inline\nRUN true\n");
    let mut stages = scripted.stages(dir.path().join("store"));
    stages.build_cache = Some(cache_settings("buildcache/{source_id}"));
    let job = build_job("web", false);
    let cx = context(dir.path(), &job);

    let err = run_job(&job, &stages, &cx).await.expect_err("refused");
    assert_eq!(err.code, crate::error::ErrorCode::UnsafeSource, "{err}");
    assert!(err.message.contains("cache.example:5000"), "{err}");
    assert_eq!(scripted.runs(&job.id), 0, "the builder must not be called");

    // Without a shared cache the same build file is any other.
    stages.build_cache = None;
    run_job(&job, &stages, &cx)
        .await
        .expect("no cache, no rule");
}

#[tokio::test]
async fn a_source_whose_id_makes_no_repository_builds_without_the_cache_and_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let recorder = Arc::new(CacheRecorder::default());
    let mut stages = ScriptedStages::new().stages(dir.path().join("store"));
    stages.builder = recorder.clone();
    stages.build_cache = Some(cache_settings("buildcache/{source_id}"));
    // A destination that does not name the source, which would refuse the job first.
    let destination = crate::config::from_toml_str(
        &format!(
            "[destination]\npath = \"{}\"\nrepository = \"images\"\n",
            dir.path().join("store").display()
        ),
        &std::collections::HashMap::new(),
    )
    .expect("config")
    .destination;
    stages.destinations = DestinationSettings::new(destination);
    let job = build_job("Web", false);
    let events = Arc::new(KeptEvents::default());
    let mut cx = context(dir.path(), &job);
    cx.events = events.clone();

    run_job(&job, &stages, &cx).await.expect("built anyway");
    assert!(recorder.seen.lock().unwrap()[0].is_none());
    let warnings: Vec<String> = events
        .0
        .lock()
        .unwrap()
        .iter()
        .filter_map(|e| match e {
            JobEvent::Warning { code, message } if code == crate::job::WARNING_BUILD_CACHE => {
                Some(message.clone())
            }
            _ => None,
        })
        .collect();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(warnings[0].contains("\"Web\""), "{warnings:?}");
}
