//! Credentials from a webhook and from AWS ECR (moto's server), used against real registries.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use base64::Engine as _;
use factoryd::adapters::oci::{ImporterSettings, RegistryImporter};
use factoryd::adapters::webhook::WebhookCredentials;
use factoryd::egress::EgressPolicy;
use factoryd::error::{ErrorClass, ErrorCode, JobError};
use factoryd::job::ImageInfo;
use tracing::instrument::WithSubscriber as _;

use crate::import_auth::seed;
use crate::support::failure::assert_failure;
use crate::support::http::{AuthEchoRegistry, Fault, FaultProxy, StaticServer};
use crate::support::import::{
    credentials, import_to_layout, importer, job, layout, run, settings, LogCapture, Recorder,
    LOOPBACK,
};
use crate::support::registry::{Auth, Moto, Registry, MOTO_ECR_PASSWORD};
use crate::support::run::{factoryd_run, Ran};

fn webhook_origin(host: &str, target: &str, webhook: &str) -> serde_json::Value {
    serde_json::json!({"type": "oci-registry", "details": {
        "url": format!("http://{host}"), "target": target,
        "auth": {"type": "webhook", "details": {"url": webhook}}}})
}

#[tokio::test]
async fn webhook_credentials_authenticate_an_import() {
    let registry = Registry::start(Auth::user("hook-user", "hook-pass-1"));
    let digest = seed(
        &registry.host,
        "acme/web:3",
        Some(("hook-user", "hook-pass-1")),
    );
    let body = base64::engine::general_purpose::STANDARD.encode("hook-user:hook-pass-1");
    let hook = StaticServer::start(200, body.into_bytes());
    let store = tempfile::tempdir().unwrap();
    let job = job(webhook_origin(
        &registry.host,
        "acme/web:3",
        &hook.url("/creds?source=x"),
    ));
    let info = import_to_layout(&importer(&["linux/amd64"]), &job, store.path(), "w")
        .await
        .expect("import");
    assert_eq!(info.digest, digest);
    assert_eq!(hook.requests.load(std::sync::atomic::Ordering::SeqCst), 1);
}

#[tokio::test]
async fn malformed_webhook_body_is_a_permanent_error_that_does_not_echo_it() {
    let hook = StaticServer::start(200, b"not-base64 leaked-secret-value".to_vec());
    let job = job(webhook_origin(
        "127.0.0.1:9",
        "acme/web:3",
        &hook.url("/creds"),
    ));
    let store = tempfile::tempdir().unwrap();
    let err = import_to_layout(&importer(&["linux/amd64"]), &job, store.path(), "w")
        .await
        .unwrap_err();
    assert_eq!(err.class, ErrorClass::Permanent, "{err}");
    assert!(!err.message.contains("leaked-secret-value"), "{err}");
    assert!(err.message.contains("not shown"), "{err}");
}

#[tokio::test]
async fn webhook_on_a_refused_address_is_refused_by_the_egress_policy() {
    // A listening server, so only the policy can stop the call.
    let hook = StaticServer::start(200, b"dTpw".to_vec());
    let strict = WebhookCredentials::new(
        EgressPolicy::default(),
        std::time::Duration::from_secs(5),
        4096,
    )
    .unwrap();
    let err = strict.fetch(&hook.url("/creds")).await.unwrap_err();
    assert_failure(&err, ErrorClass::Permanent, ErrorCode::EgressRefused, &[]);
    let err = strict
        .fetch("http://169.254.169.254/latest/meta-data")
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::EgressRefused, "{err}");
    assert_eq!(hook.requests.load(std::sync::atomic::Ordering::SeqCst), 0);
}

/// Regression (issue 14): credentials a webhook returned were unknown to the job's redactor, so a
/// registry echoing the `Authorization` header it got put them in the result's message.
#[test]
fn factoryd_run_masks_webhook_credentials_that_a_registry_echoes_back() {
    const CANARY: &str = "canary-pass-7f3c91";
    let b64 = |text: &str| base64::engine::general_purpose::STANDARD.encode(text);
    let registry = AuthEchoRegistry::start();
    let hook = StaticServer::start(200, b64(&format!("hook-user:{CANARY}")).into_bytes());
    let root = tempfile::tempdir().unwrap();
    let job = serde_json::json!({"v": 1, "id": "job-echo", "source_id": "src-echo",
        "origin": webhook_origin(&registry.host(), "acme/web:3", &hook.url("/creds"))});
    let extra = format!(
        "[registries]\ninsecure = [\"{}\"]\n[log]\nlevel = \"debug\"\n",
        registry.host()
    );
    let ran = Ran::of(
        &factoryd_run(root.path(), &job, &extra)
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .output()
            .expect("spawn factoryd"),
    );
    let (stdout, stderr) = (&ran.stdout, &ran.stderr);

    let result = ran.result();
    assert_eq!(result["status"], "failed");
    assert_eq!(result["error"]["code"], "auth_failed");
    assert!(
        registry.authenticated_requests.load(Ordering::SeqCst) >= 1,
        "the registry never saw the webhook's credentials"
    );
    let message = result["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("denied: you sent"),
        "the registry's words are quoted"
    );
    // The secrets themselves are never printed: a failure names the forms and where they are.
    let mut leaks = Vec::new();
    for (form, secret) in [
        ("the password", CANARY.to_owned()),
        (
            "base64 of user:password",
            b64(&format!("hook-user:{CANARY}")),
        ),
        ("base64 of the password", b64(CANARY)),
    ] {
        for (place, text) in [("the result", &stdout), ("stderr", &stderr)] {
            if text.contains(&secret) {
                leaks.push(format!("{place} holds {form}"));
            }
        }
    }
    assert!(leaks.is_empty(), "{leaks:?}");
}

/// An `oci-registry` origin on `host` whose credentials come from ECR (moto's API).
fn ecr_origin(host: &str, target: &str) -> serde_json::Value {
    serde_json::json!({"type": "oci-registry", "details": {
        "url": format!("http://{host}"), "target": target,
        "auth": {"type": "provider", "details": {"flavor": "ecr", "credentials": {
            "region": "us-east-1", "api_key": "AKIDEXAMPLEKEY", "secret": ECR_SECRET}}}}})
}

const ECR_SECRET: &str = "example-secret-key-value";

/// A registry that takes moto's ECR token (user `AWS`), seeded with `team/svc:9`; returned with
/// the image's manifest digest.
fn ecr_registry() -> (Registry, String) {
    let registry = Registry::start(Auth::user("AWS", MOTO_ECR_PASSWORD));
    let digest = seed(
        &registry.host,
        "team/svc:9",
        Some(("AWS", MOTO_ECR_PASSWORD)),
    );
    (registry, digest)
}

#[tokio::test]
async fn ecr_token_from_moto_authenticates_against_a_registry() {
    let moto = Moto::start();
    let (registry, digest) = ecr_registry();
    let job = job(ecr_origin(&registry.host, "team/svc:9"));
    let store = tempfile::tempdir().unwrap();
    let info = run(
        &importer(&["linux/amd64"]),
        &credentials(Some(&moto.endpoint)),
        &job,
        layout(store.path(), "e"),
        Arc::new(Recorder::default()),
    )
    .await
    .expect("import");
    assert_eq!(info.digest, digest);
}

/// An ECR-authenticated registry seeded with `team/svc:9`, reached through a proxy that answers
/// the first `refusals` blob GETs with the registry's own 401 challenge; moto's API reached
/// through a proxy that sees every `GetAuthorizationToken` call.
struct RefusingEcrSource {
    registry_proxy: FaultProxy,
    moto_proxy: FaultProxy,
    digest: String,
    _registry: Registry,
    _moto: Moto,
}

impl RefusingEcrSource {
    async fn start(refusals: usize) -> RefusingEcrSource {
        RefusingEcrSource::start_pattern(&vec![true; refusals]).await
    }

    /// Blob GETs in order of arrival: `true` refused, `false` let through; the rest go through.
    async fn start_pattern(refuse: &[bool]) -> RefusingEcrSource {
        let moto = Moto::start();
        let (registry, digest) = ecr_registry();
        let challenge = basic_challenge(&registry.host).await;
        let refusal = Fault {
            status: 401,
            retry_after: None,
            www_authenticate: Some(challenge),
        };
        let moto_host = moto.endpoint.trim_start_matches("http://");
        let faults = refuse
            .iter()
            .map(|&r| if r { refusal.clone() } else { Fault::pass() })
            .collect();
        RefusingEcrSource {
            registry_proxy: FaultProxy::start(&registry.host, faults),
            moto_proxy: FaultProxy::start(moto_host, Vec::new()),
            digest,
            _registry: registry,
            _moto: moto,
        }
    }

    /// Imports `team/svc:9` into a layout at `store` as `tag`, logging into `log`.
    async fn import(
        &self,
        store: &Path,
        tag: &str,
        events: Arc<Recorder>,
        log: &LogCapture,
    ) -> Result<ImageInfo, JobError> {
        self.import_with(&importer(&["linux/amd64"]), store, tag, events, log)
            .await
    }

    async fn import_with(
        &self,
        importer: &RegistryImporter,
        store: &Path,
        tag: &str,
        events: Arc<Recorder>,
        log: &LogCapture,
    ) -> Result<ImageInfo, JobError> {
        let job = job(ecr_origin(&self.registry_proxy.host(), "team/svc:9"));
        let endpoint = format!("http://{}", self.moto_proxy.host());
        run(
            importer,
            &credentials(Some(&endpoint)),
            &job,
            layout(store, tag),
            events,
        )
        .with_subscriber(log.subscriber())
        .await
    }

    /// `GetAuthorizationToken` calls that reached moto.
    fn token_calls(&self) -> usize {
        self.moto_proxy
            .request_heads()
            .iter()
            .filter(|head| {
                head.starts_with("POST ")
                    && head.lines().any(|line| {
                        let line = line.to_ascii_lowercase();
                        line.starts_with("x-amz-target:") && line.contains("getauthorizationtoken")
                    })
            })
            .count()
    }
}

/// The `WWW-Authenticate` challenge the registry sends to an anonymous request.
async fn basic_challenge(host: &str) -> String {
    let response = reqwest::get(format!("http://{host}/v2/"))
        .await
        .expect("GET /v2/");
    assert_eq!(
        response.status().as_u16(),
        401,
        "the registry wants credentials"
    );
    let challenge = response
        .headers()
        .get(reqwest::header::WWW_AUTHENTICATE)
        .and_then(|v| v.to_str().ok())
        .expect("a challenge")
        .to_owned();
    assert!(challenge.starts_with("Basic "), "{challenge}");
    challenge
}

fn is_blob_get(head: &str) -> bool {
    head.starts_with("GET ") && head.contains("/blobs/sha256:")
}

/// The strings that must never reach an event, a log line or an error message.
fn ecr_secrets() -> [String; 3] {
    let token =
        base64::engine::general_purpose::STANDARD.encode(format!("AWS:{MOTO_ECR_PASSWORD}"));
    [ECR_SECRET.to_owned(), MOTO_ECR_PASSWORD.to_owned(), token]
}

#[tokio::test]
async fn an_ecr_token_refused_mid_import_is_fetched_again_once_and_the_import_succeeds() {
    let source = RefusingEcrSource::start(1).await;
    let store = tempfile::tempdir().unwrap();
    let events = Arc::new(Recorder::default());
    let log = LogCapture::default();
    let info = source
        .import(store.path(), "refreshed", events.clone(), &log)
        .await
        .expect("import after one refresh");

    assert_eq!(info.source_digest.as_deref(), Some(source.digest.as_str()));
    assert_eq!(
        source.registry_proxy.faults_served.load(Ordering::SeqCst),
        1
    );
    assert_eq!(source.token_calls(), 2, "the first token and one refresh");
    // Mid-import: the manifest came with the first token before the first blob was refused.
    let heads = source.registry_proxy.request_heads();
    let first_blob = heads
        .iter()
        .position(|h| is_blob_get(h))
        .expect("a blob GET");
    assert!(
        heads[..first_blob].iter().any(|h| h.starts_with("GET ")
            && h.contains("/manifests/")
            && h.to_ascii_lowercase().contains("\r\nauthorization: basic ")),
        "no authenticated manifest GET before the first blob GET"
    );
    let log = log.text();
    assert!(
        log.contains("resolving them afresh once"),
        "the refresh was not logged"
    );
    let events = serde_json::to_string(&*events.0.lock().unwrap()).unwrap();
    assert!(events.contains("progress"), "no events recorded");
    for secret in ecr_secrets() {
        assert!(!events.contains(&secret), "an event holds a secret");
        assert!(!log.contains(&secret), "the log holds a secret");
    }
}

#[tokio::test]
async fn an_ecr_token_still_refused_after_one_refresh_is_a_permanent_auth_error() {
    // More refusals than the import can ask for: every blob GET is refused.
    let source = RefusingEcrSource::start(64).await;
    let store = tempfile::tempdir().unwrap();
    let log = LogCapture::default();
    let err = source
        .import(store.path(), "refused", Arc::new(Recorder::default()), &log)
        .await
        .unwrap_err();

    let log = log.text();
    for secret in ecr_secrets() {
        assert!(
            !err.to_string().contains(&secret),
            "the error holds a secret"
        );
        assert!(!log.contains(&secret), "the log holds a secret");
    }
    assert_failure(&err, ErrorClass::Permanent, ErrorCode::AuthFailed, &[]);
    assert_eq!(
        source.token_calls(),
        2,
        "the first token and one refresh, no more"
    );
    assert!(
        source.registry_proxy.faults_served.load(Ordering::SeqCst) >= 2,
        "the GET with the fresh token was not refused too"
    );
    assert_eq!(
        source
            .registry_proxy
            .blob_gets_forwarded
            .load(Ordering::SeqCst),
        0
    );
    let index = std::fs::read_to_string(store.path().join("index.json")).unwrap_or_default();
    assert!(!index.contains("\"refused\""), "tagged anyway: {index}");
}

#[tokio::test]
async fn a_second_refusal_after_a_successful_refresh_does_not_fetch_a_third_token() {
    // One blob at a time: the first GET is refused, its retry with the fresh token goes
    // through, and the next blob's GET, made with the fresh token, is refused again. One
    // refresh per import: no third token, a permanent error.
    let mut pattern = vec![true, false];
    pattern.extend([true; 64]);
    let source = RefusingEcrSource::start_pattern(&pattern).await;
    let one_at_a_time = RegistryImporter::new(
        ImporterSettings {
            max_parallel_blobs: 1,
            ..settings(&["linux/amd64"])
        },
        LOOPBACK,
    )
    .unwrap();
    let store = tempfile::tempdir().unwrap();
    let log = LogCapture::default();
    let err = source
        .import_with(
            &one_at_a_time,
            store.path(),
            "twice",
            Arc::new(Recorder::default()),
            &log,
        )
        .await
        .unwrap_err();

    assert_failure(&err, ErrorClass::Permanent, ErrorCode::AuthFailed, &[]);
    assert_eq!(source.token_calls(), 2, "one refresh per import");
    assert!(
        source
            .registry_proxy
            .blob_gets_forwarded
            .load(Ordering::SeqCst)
            >= 1,
        "the GET after the refresh went through"
    );
    let index = std::fs::read_to_string(store.path().join("index.json")).unwrap_or_default();
    assert!(!index.contains("\"twice\""), "tagged anyway: {index}");
}
