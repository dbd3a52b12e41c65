//! Registry authentication against real `docker-registry` servers: htpasswd (Basic) and token
//! auth with a token service that signs tokens with a test key.

use factoryd::error::{ErrorClass, ErrorCode, JobError};
use factoryd::job::ImageInfo;

use crate::support::failure::assert_failure;
use crate::support::import::{import_to_layout, importer, job, registry_origin};
use crate::support::registry::{skopeo_copy, Auth, LayoutWriter, Registry};

/// Pushes a two-layer image to `host/repo:tag` with `creds` and returns its manifest digest.
pub fn seed(host: &str, reference: &str, creds: Option<(&str, &str)>) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut writer = LayoutWriter::new(dir.path());
    let (image, descriptor) = writer.image(&[64 * 1024, 200 * 1024], "amd64", 7);
    writer.tag(descriptor, "seed");
    let creds_arg = creds.map(|(u, p)| format!("--dest-creds={u}:{p}"));
    let extra: Vec<&str> = creds_arg.iter().map(String::as_str).collect();
    skopeo_copy(
        &format!("oci:{}:seed", dir.path().display()),
        &format!("docker://{host}/{reference}"),
        &extra,
    );
    image.manifest_digest
}

/// Imports `reference` from `registry` with `creds` (as the job's) into a new OCI layout under
/// `tag`.
async fn import_from(
    registry: &Registry,
    reference: &str,
    creds: Option<(&str, &str)>,
    tag: &str,
) -> Result<ImageInfo, JobError> {
    let store = tempfile::tempdir().unwrap();
    let job = job(registry_origin(&registry.host, reference, creds));
    import_to_layout(&importer(&["linux/amd64"]), &job, store.path(), tag).await
}

#[tokio::test]
async fn basic_auth_registry_imports_with_the_right_credentials() {
    let registry = Registry::start(Auth::user("alice", "s3cret-pw"));
    let digest = seed(&registry.host, "team/app:1", Some(("alice", "s3cret-pw")));
    let info = import_from(&registry, "team/app:1", Some(("alice", "s3cret-pw")), "t1")
        .await
        .expect("import");
    assert_eq!(info.digest, digest);
    assert_eq!(info.platforms, vec!["linux/amd64"]);
}

#[tokio::test]
async fn basic_auth_registry_refuses_wrong_credentials_as_a_permanent_auth_error() {
    let registry = Registry::start(Auth::user("alice", "s3cret-pw"));
    seed(&registry.host, "team/app:1", Some(("alice", "s3cret-pw")));
    let err = import_from(
        &registry,
        "team/app:1",
        Some(("alice", "wrong-password")),
        "t1",
    )
    .await
    .unwrap_err();
    assert_failure(&err, ErrorClass::Permanent, ErrorCode::AuthFailed, &[]);
    assert!(!err.message.contains("wrong-password"), "{err}");
}

#[tokio::test]
async fn token_auth_registry_denies_anonymous_pulls() {
    let registry = Registry::start(Auth::Token(vec![("bob".into(), "tok-pw-123".into())]));
    seed(&registry.host, "private/app:2", Some(("bob", "tok-pw-123")));
    let err = import_from(&registry, "private/app:2", None, "t2")
        .await
        .unwrap_err();
    assert_failure(&err, ErrorClass::Permanent, ErrorCode::AuthFailed, &[]);
}

#[tokio::test]
async fn token_auth_registry_accepts_credentials_through_its_token_service() {
    let registry = Registry::start(Auth::Token(vec![("bob".into(), "tok-pw-123".into())]));
    let digest = seed(&registry.host, "private/app:2", Some(("bob", "tok-pw-123")));
    let info = import_from(
        &registry,
        "private/app:2",
        Some(("bob", "tok-pw-123")),
        "t2",
    )
    .await
    .expect("import");
    assert_eq!(info.digest, digest);
}
