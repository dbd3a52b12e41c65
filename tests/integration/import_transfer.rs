//! Transfers between real registries and the OCI layout store: platform selection, digests,
//! retries after faults, verification, skipping what is stored, registry destinations.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use factoryd::error::{ErrorClass, ErrorCode};
use factoryd::ports::Destination;

use crate::support::assert_success;
use crate::support::failure::assert_failure;
use crate::support::http::{Fault, FaultProxy};
use crate::support::import::{
    credentials, import_to_layout, importer, job, layout, registry_origin, run, Recorder,
};
use crate::support::registry::{
    digest_of, skopeo_copy, skopeo_raw, Auth, LayoutWriter, Registry, TestImage,
};

/// Pushes an index of an amd64 and an arm64 image to `host/multi:1`, byte for byte.
fn seed_multi(host: &str) -> (String, TestImage, TestImage) {
    let dir = tempfile::tempdir().unwrap();
    let mut w = LayoutWriter::new(dir.path());
    let (amd, amd_d) = w.image(&[50_000, 70_000], "amd64", 1);
    let (arm, arm_d) = w.image(&[60_000], "arm64", 2);
    let index = w.index(vec![amd_d, arm_d], "multi");
    skopeo_copy(
        &format!("oci:{}:multi", dir.path().display()),
        &format!("docker://{host}/multi:1"),
        &["--all", "--preserve-digests"],
    );
    (index, amd, arm)
}

/// Pushes a single image to `host/reference` (OCI unless `extra` says otherwise).
fn seed_single(host: &str, reference: &str, layers: &[usize], extra: &[&str]) -> TestImage {
    let dir = tempfile::tempdir().unwrap();
    let mut w = LayoutWriter::new(dir.path());
    let (image, d) = w.image(layers, "amd64", 3);
    w.tag(d, "one");
    skopeo_copy(
        &format!("oci:{}:one", dir.path().display()),
        &format!("docker://{host}/{reference}"),
        extra,
    );
    image
}

fn stored_raw(store: &std::path::Path, tag: &str) -> Vec<u8> {
    skopeo_raw(&format!("oci:{}:{tag}", store.display()), &[])
}

#[tokio::test]
async fn index_imported_for_one_platform_stores_that_platforms_manifest_unchanged() {
    let registry = Registry::start(Auth::None);
    let (_, _, arm) = seed_multi(&registry.host);
    let store = tempfile::tempdir().unwrap();
    let job = job(registry_origin(&registry.host, "multi:1", None));
    let info = import_to_layout(&importer(&["linux/arm64"]), &job, store.path(), "arm")
        .await
        .expect("import");
    assert_eq!(info.digest, arm.manifest_digest);
    assert_eq!(info.platforms, vec!["linux/arm64"]);
    assert_eq!(
        digest_of(&stored_raw(store.path(), "arm")),
        arm.manifest_digest
    );
}

#[tokio::test]
async fn index_imported_for_all_platforms_keeps_the_index_digest() {
    let registry = Registry::start(Auth::None);
    let (index, amd, arm) = seed_multi(&registry.host);
    let source = skopeo_raw(&format!("docker://{}/multi:1", registry.host), &[]);
    assert_eq!(digest_of(&source), index, "the push kept the index bytes");
    let store = tempfile::tempdir().unwrap();
    let job = job(registry_origin(&registry.host, "multi:1", None));
    let info = import_to_layout(
        &importer(&["linux/amd64", "linux/arm64"]),
        &job,
        store.path(),
        "all",
    )
    .await
    .expect("import");
    assert_eq!(info.digest, index);
    assert_eq!(info.source_digest.as_deref(), Some(index.as_str()));
    assert_eq!(info.platforms, vec!["linux/amd64", "linux/arm64"]);
    assert_eq!(digest_of(&stored_raw(store.path(), "all")), index);
    for child in [&amd.manifest_digest, &arm.manifest_digest] {
        let hex = child.trim_start_matches("sha256:");
        let raw = std::fs::read(store.path().join("blobs/sha256").join(hex)).expect("child stored");
        assert_eq!(&digest_of(&raw), child);
    }
}

#[tokio::test]
async fn import_by_digest_fetches_exactly_that_manifest() {
    let registry = Registry::start(Auth::None);
    let (_, amd, _) = seed_multi(&registry.host);
    let store = tempfile::tempdir().unwrap();
    let target = format!("multi@{}", amd.manifest_digest);
    let job = job(registry_origin(&registry.host, &target, None));
    let info = import_to_layout(&importer(&["linux/arm64"]), &job, store.path(), "pinned")
        .await
        .expect("import");
    assert_eq!(
        info.digest, amd.manifest_digest,
        "the digest wins over the platform setting"
    );
}

#[tokio::test]
async fn source_failing_first_blob_requests_with_500_and_429_then_recovering_imports() {
    let registry = Registry::start(Auth::None);
    let image = seed_single(&registry.host, "flaky/app:1", &[100_000, 100_000], &[]);
    let proxy = FaultProxy::start(
        &registry.host,
        vec![
            Fault {
                status: 500,
                retry_after: None,
                www_authenticate: None,
            },
            Fault {
                status: 429,
                retry_after: Some(1),
                www_authenticate: None,
            },
            Fault {
                status: 503,
                retry_after: None,
                www_authenticate: None,
            },
        ],
    );
    let store = tempfile::tempdir().unwrap();
    let job = job(registry_origin(&proxy.host(), "flaky/app:1", None));
    let started = std::time::Instant::now();
    let info = import_to_layout(&importer(&["linux/amd64"]), &job, store.path(), "f")
        .await
        .expect("import after faults");
    assert_eq!(info.digest, image.manifest_digest);
    assert_eq!(proxy.faults_left(), 0);
    assert!(
        started.elapsed() >= std::time::Duration::from_secs(1),
        "Retry-After was honoured"
    );
}

#[tokio::test]
async fn blob_whose_bytes_do_not_match_its_digest_is_permanent_and_nothing_is_committed() {
    let registry = Registry::start(Auth::None);
    let image = seed_single(&registry.host, "bad/app:1", &[100_000], &[]);
    let path = registry.blob_data_path(&image.layers[0]);
    let mut bytes = std::fs::read(&path).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&path, bytes).unwrap();

    let store = tempfile::tempdir().unwrap();
    let job = job(registry_origin(&registry.host, "bad/app:1", None));
    let err = import_to_layout(&importer(&["linux/amd64"]), &job, store.path(), "bad")
        .await
        .unwrap_err();
    assert_failure(&err, ErrorClass::Permanent, ErrorCode::DigestMismatch, &[]);
    let hex = image.layers[0].trim_start_matches("sha256:");
    assert!(
        !store.path().join("blobs/sha256").join(hex).exists(),
        "bad blob committed"
    );
    let index = std::fs::read_to_string(store.path().join("index.json")).unwrap();
    assert!(!index.contains("\"bad\""), "tagged anyway: {index}");
    // The lock files stay; no temporary file does, and the import's lease is gone.
    let ingest: Vec<_> = std::fs::read_dir(store.path().join(".ingest"))
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| {
            !["index.lock", "gc.lock", "leases"].contains(&&*e.file_name().to_string_lossy())
        })
        .collect();
    assert!(ingest.is_empty(), "temporary files left: {ingest:?}");
    let leases = std::fs::read_dir(store.path().join(".ingest/leases"))
        .unwrap()
        .count();
    assert_eq!(leases, 0, "the import's lease outlived it");
}

#[tokio::test]
async fn reimport_of_a_stored_image_transfers_no_layer_bytes() {
    let registry = Registry::start(Auth::None);
    let image = seed_single(
        &registry.host,
        "again/app:1",
        &[300_000, 300_000, 300_000],
        &[],
    );
    let proxy = FaultProxy::start(&registry.host, Vec::new());
    let store = tempfile::tempdir().unwrap();
    let job = job(registry_origin(&proxy.host(), "again/app:1", None));
    let imp = importer(&["linux/amd64"]);
    let first = Arc::new(Recorder::default());
    run(
        &imp,
        &credentials(None),
        &job,
        layout(store.path(), "first"),
        first.clone(),
    )
    .await
    .expect("first import");
    let gets_after_first = proxy.blob_gets_forwarded.load(Ordering::SeqCst);
    assert!(gets_after_first >= 3, "the first import fetched the layers");
    assert!(first.bytes_moved() >= 900_000);

    let second = Arc::new(Recorder::default());
    let info = run(
        &imp,
        &credentials(None),
        &job,
        layout(store.path(), "second"),
        second.clone(),
    )
    .await
    .expect("second import");
    assert_eq!(info.digest, image.manifest_digest);
    assert_eq!(
        proxy.blob_gets_forwarded.load(Ordering::SeqCst),
        gets_after_first,
        "blobs fetched again"
    );
    assert_eq!(second.bytes_moved(), 0);
}

/// Regression: `factoryd_fetched_bytes_total{source="registry"}` and
/// `factoryd_blobs_skipped_total` were registered but never counted. The registry is
/// process-wide and other tests import in parallel, so only lower bounds hold.
#[tokio::test]
async fn import_counts_fetched_bytes_and_skipped_blobs_in_metrics() {
    let m = factoryd::telemetry::metrics();
    let fetched = || m.fetched_bytes.with_label_values(&["registry"]).get();
    let registry = Registry::start(Auth::None);
    seed_single(&registry.host, "counted/app:1", &[200_000, 200_000], &[]);
    let store = tempfile::tempdir().unwrap();
    let job = job(registry_origin(&registry.host, "counted/app:1", None));
    let imp = importer(&["linux/amd64"]);
    let creds = credentials(None);
    let import = |tag: &'static str| {
        run(
            &imp,
            &creds,
            &job,
            layout(store.path(), tag),
            Arc::new(Recorder::default()),
        )
    };

    let before = fetched();
    import("first").await.expect("first import");
    assert!(
        fetched() - before >= 400_000,
        "{} bytes",
        fetched() - before
    );

    let skipped_before = m.blobs_skipped.get();
    import("second").await.expect("second import");
    // Both layers and the config were already in the store.
    assert!(m.blobs_skipped.get() - skipped_before >= 3);
}

#[tokio::test]
async fn registry_destination_receives_the_manifest_byte_for_byte() {
    let source = Registry::start(Auth::None);
    let destination = Registry::start(Auth::user("pusher", "push-pw-1"));
    let (index, _, _) = seed_multi(&source.host);
    let job = job(registry_origin(&source.host, "multi:1", None));
    let info = run(
        &importer(&["linux/amd64", "linux/arm64"]),
        &credentials(None),
        &job,
        Destination::Registry {
            registry: destination.host.clone(),
            plain_http: true,
            repository: "mirror/multi".into(),
            tag: "job-1".into(),
            auth: Some(factoryd::ports::BasicAuth {
                username: "pusher".into(),
                password: "push-pw-1".into(),
            }),
        },
        Arc::new(Recorder::default()),
    )
    .await
    .expect("import");
    assert_eq!(info.digest, index);
    let pushed = skopeo_raw(
        &format!("docker://{}/mirror/multi:job-1", destination.host),
        &["--creds=pusher:push-pw-1"],
    );
    assert_eq!(digest_of(&pushed), index);
}

#[tokio::test]
async fn same_registry_destination_mounts_layers_instead_of_copying_them() {
    let registry = Registry::start(Auth::None);
    let image = seed_single(&registry.host, "src/app:1", &[200_000, 200_000], &[]);
    let proxy = FaultProxy::start(&registry.host, Vec::new());
    let job = job(registry_origin(&proxy.host(), "src/app:1", None));
    let info = run(
        &importer(&["linux/amd64"]),
        &credentials(None),
        &job,
        Destination::Registry {
            registry: proxy.host(),
            plain_http: true,
            repository: "dst/app".into(),
            tag: "m".into(),
            auth: None,
        },
        Arc::new(Recorder::default()),
    )
    .await
    .expect("import");
    assert_eq!(info.digest, image.manifest_digest);
    // Only the config is read (for the platform); the layers were mounted.
    assert_eq!(proxy.blob_gets_forwarded.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn docker_schema2_image_is_stored_as_oci_that_skopeo_reads() {
    let registry = Registry::start(Auth::None);
    seed_single(
        &registry.host,
        "docker/app:1",
        &[80_000],
        &["--format", "v2s2"],
    );
    let source = skopeo_raw(&format!("docker://{}/docker/app:1", registry.host), &[]);
    assert!(String::from_utf8_lossy(&source)
        .contains("application/vnd.docker.distribution.manifest.v2+json"));
    let store = tempfile::tempdir().unwrap();
    let job = job(registry_origin(&registry.host, "docker/app:1", None));
    let info = import_to_layout(&importer(&["linux/amd64"]), &job, store.path(), "d")
        .await
        .expect("import");
    assert_eq!(
        info.source_digest.as_deref(),
        Some(digest_of(&source).as_str())
    );
    let stored = stored_raw(store.path(), "d");
    assert_eq!(info.digest, digest_of(&stored));
    let text = String::from_utf8_lossy(&stored);
    assert!(
        text.contains("application/vnd.oci.image.manifest.v1+json") && !text.contains("vnd.docker"),
        "{text}"
    );
    // skopeo can read the whole image back (config included).
    let out = std::process::Command::new("skopeo")
        .args(["inspect", &format!("oci:{}:d", store.path().display())])
        .output()
        .unwrap();
    assert_success(&out, "skopeo inspect");
}

#[tokio::test]
async fn corrupt_blob_is_not_committed_to_a_destination_registry() {
    let source = Registry::start(Auth::None);
    let destination = Registry::start(Auth::None);
    let image = seed_single(&source.host, "bad/app:1", &[100_000], &[]);
    let path = source.blob_data_path(&image.layers[0]);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[10] ^= 0xff;
    std::fs::write(&path, bytes).unwrap();
    let job = job(registry_origin(&source.host, "bad/app:1", None));
    let err = run(
        &importer(&["linux/amd64"]),
        &credentials(None),
        &job,
        Destination::Registry {
            registry: destination.host.clone(),
            plain_http: true,
            repository: "copy/app".into(),
            tag: "x".into(),
            auth: None,
        },
        Arc::new(Recorder::default()),
    )
    .await
    .unwrap_err();
    assert_failure(&err, ErrorClass::Permanent, ErrorCode::DigestMismatch, &[]);
    assert!(
        !destination.blob_data_path(&image.layers[0]).exists(),
        "corrupt blob committed"
    );
}

#[tokio::test]
async fn cancelled_import_stops_and_tags_nothing() {
    let registry = Registry::start(Auth::None);
    seed_single(&registry.host, "slow/app:1", &[2_000_000], &[]);
    // Every blob request fails with a long Retry-After, so the import is waiting when cancelled.
    let proxy = FaultProxy::start(
        &registry.host,
        vec![
            Fault {
                status: 429,
                retry_after: Some(4),
                www_authenticate: None,
            };
            8
        ],
    );
    let store = tempfile::tempdir().unwrap();
    let job = job(registry_origin(&proxy.host(), "slow/app:1", None));
    let imp = importer(&["linux/amd64"]);
    let cancel = tokio_util::sync::CancellationToken::new();
    let trigger = cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        trigger.cancel();
    });
    let started = std::time::Instant::now();
    let err = crate::support::import::run_with_cancel(
        &imp,
        &credentials(None),
        &job,
        layout(store.path(), "c"),
        cancel,
    )
    .await
    .unwrap_err();
    assert_eq!(err.code, ErrorCode::Cancelled, "{err}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(3),
        "stopped promptly"
    );
    let index = std::fs::read_to_string(store.path().join("index.json")).unwrap();
    assert!(!index.contains("\"c\""), "{index}");
}

#[tokio::test]
async fn configured_mirror_serves_the_image_before_the_registry() {
    let mirror = Registry::start(Auth::None);
    let image = seed_single(&mirror.host, "library/app:1", &[50_000], &[]);
    // The registry itself does not listen: only the mirror can serve the import.
    let upstream = format!("127.0.0.1:{}", crate::support::free_port());
    let mut settings = crate::support::import::settings(&["linux/amd64"]);
    settings.mirrors.insert(
        upstream.clone(),
        vec![url::Url::parse(&format!("http://{}", mirror.host)).unwrap()],
    );
    let imp =
        factoryd::adapters::oci::RegistryImporter::new(settings, crate::support::import::LOOPBACK)
            .unwrap();
    let store = tempfile::tempdir().unwrap();
    let job = job(registry_origin(
        &upstream,
        "library/app:1",
        Some(("user", "never-sent-to-mirrors")),
    ));
    let info = import_to_layout(&imp, &job, store.path(), "m")
        .await
        .expect("import through the mirror");
    assert_eq!(info.digest, image.manifest_digest);
}

/// Issue 14: a blob size a registry declares is capped (`registries.max_blob_bytes`): an image
/// declaring a larger blob is refused before any blob is fetched, and nothing is tagged.
#[tokio::test]
async fn a_blob_declared_over_the_cap_refuses_the_image_before_any_blob_moves() {
    use factoryd::adapters::oci::RegistryImporter;
    let registry = Registry::start(Auth::None);
    seed_single(&registry.host, "big/app:1", &[200_000, 10_000], &[]);
    let proxy = FaultProxy::start(&registry.host, Vec::new());
    let store = tempfile::tempdir().unwrap();
    let job = job(registry_origin(&proxy.host(), "big/app:1", None));
    let capped = RegistryImporter::new(
        factoryd::adapters::oci::ImporterSettings {
            max_blob_bytes: 100_000,
            ..crate::support::import::settings(&["linux/amd64"])
        },
        crate::support::import::LOOPBACK,
    )
    .unwrap();
    let err = import_to_layout(&capped, &job, store.path(), "big")
        .await
        .expect_err("a blob over the cap must refuse the image");
    assert_failure(
        &err,
        ErrorClass::Permanent,
        ErrorCode::LimitExceeded,
        &["registries.max_blob_bytes"],
    );
    assert!(
        err.message
            .contains("bytes, over registries.max_blob_bytes (100000)"),
        "{err}"
    );
    assert_eq!(proxy.blob_gets_forwarded.load(Ordering::SeqCst), 0);
    let index = std::fs::read_to_string(store.path().join("index.json")).unwrap_or_default();
    assert!(!index.contains("\"big\""), "{index}");
}
