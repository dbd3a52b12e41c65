//! Credentials from a webhook and from AWS ECR (moto's server), used against real registries.

use std::sync::Arc;

use base64::Engine as _;
use factoryd::adapters::webhook::WebhookCredentials;
use factoryd::egress::EgressPolicy;
use factoryd::error::{ErrorClass, ErrorCode};

use crate::import_auth::seed;
use crate::support::http::StaticServer;
use crate::support::import::{credentials, importer, job, layout, run, Recorder};
use crate::support::registry::{Auth, Moto, Registry, MOTO_ECR_PASSWORD};

fn webhook_origin(host: &str, target: &str, webhook: &str) -> serde_json::Value {
    serde_json::json!({"type": "oci-registry", "details": {
        "url": format!("http://{host}"), "target": target,
        "auth": {"type": "webhook", "details": {"url": webhook}}}})
}

#[tokio::test]
async fn webhook_credentials_authenticate_an_import() {
    let registry = Registry::start(Auth::Htpasswd(vec![(
        "hook-user".into(),
        "hook-pass-1".into(),
    )]));
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
    let info = run(
        &importer(&["linux/amd64"]),
        &credentials(None),
        &job,
        layout(store.path(), "w"),
        Arc::new(Recorder::default()),
    )
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
    let err = run(
        &importer(&["linux/amd64"]),
        &credentials(None),
        &job,
        layout(store.path(), "w"),
        Arc::new(Recorder::default()),
    )
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
    assert_eq!(
        (err.code, err.class),
        (ErrorCode::EgressRefused, ErrorClass::Permanent),
        "{err}"
    );
    let err = strict
        .fetch("http://169.254.169.254/latest/meta-data")
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::EgressRefused, "{err}");
    assert_eq!(hook.requests.load(std::sync::atomic::Ordering::SeqCst), 0);
}

#[tokio::test]
async fn ecr_token_from_moto_authenticates_against_a_registry() {
    let moto = Moto::start();
    let registry = Registry::start(Auth::Htpasswd(vec![(
        "AWS".into(),
        MOTO_ECR_PASSWORD.into(),
    )]));
    let digest = seed(
        &registry.host,
        "team/svc:9",
        Some(("AWS", MOTO_ECR_PASSWORD)),
    );
    let job = job(serde_json::json!({"type": "oci-registry", "details": {
        "url": format!("http://{}", registry.host), "target": "team/svc:9",
        "auth": {"type": "provider", "details": {"flavor": "ecr", "credentials": {
            "region": "us-east-1", "api_key": "AKIDEXAMPLEKEY", "secret": "example-secret-key-value"}}}}}));
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
