//! Collections over a real store on disk: what goes, what stays, and writers beside them.

use std::time::Duration;

use super::*;
use crate::adapters::oci_layout::OciLayoutStore;
use crate::manifest::{OCI_CONFIG, OCI_LAYER_GZIP, OCI_MANIFEST};

const DAY_MS: u64 = 24 * 3_600_000;

fn now_ms() -> u64 {
    crate::clock::Clock::now_ms(&crate::clock::SystemClock)
}

/// Stores an image of `layers` (their contents) and a config, tagged `tag` for `source`.
async fn image(store: &OciLayoutStore, tag: &str, source: &str, layers: &[&[u8]]) -> String {
    let mut descriptors = Vec::new();
    for layer in layers {
        let digest = Digest::sha256_of(layer);
        store
            .put_blob(*layer, &digest, layer.len() as u64)
            .await
            .unwrap();
        descriptors.push(Descriptor::new(OCI_LAYER_GZIP, &digest, layer.len() as u64));
    }
    let config = format!("{{\"tag\":\"{tag}\"}}");
    let config_digest = Digest::sha256_of(config.as_bytes());
    store
        .put_blob(config.as_bytes(), &config_digest, config.len() as u64)
        .await
        .unwrap();
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": Descriptor::new(OCI_CONFIG, &config_digest, config.len() as u64),
        "layers": descriptors,
    });
    let descriptor = store
        .put_manifest(OCI_MANIFEST, &serde_json::to_vec(&manifest).unwrap())
        .await
        .unwrap();
    store.tag(&descriptor, tag, source).await.unwrap();
    descriptor.digest
}

fn blob_count(root: &Path) -> usize {
    std::fs::read_dir(root.join("blobs/sha256"))
        .unwrap()
        .count()
}

fn collect_now(root: &Path, policy: Policy, dry_run: bool) -> CollectionReport {
    collect(root, Collection { policy, dry_run }, now_ms()).unwrap()
}

#[tokio::test]
async fn an_unreachable_blob_goes_and_everything_a_tag_reaches_stays() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    let store = OciLayoutStore::open(&root).await.unwrap();
    image(&store, "a:1", "a", &[b"base", b"a-one"]).await;
    image(&store, "b:1", "b", &[b"base", b"b-one"]).await;
    // Left by an import whose tag never came (its process gone, no lease).
    let orphan = b"orphan layer";
    store
        .put_blob(&orphan[..], &Digest::sha256_of(orphan), orphan.len() as u64)
        .await
        .unwrap();
    tokio::time::sleep(CLOCK_SLACK_FOR_TESTS).await;
    let before = blob_count(&root);

    let dry = collect_now(&root, Policy::KEEP_ALL, true);
    assert_eq!(
        (dry.blobs_removed, dry.bytes_freed),
        (1, orphan.len() as u64)
    );
    assert_eq!(blob_count(&root), before, "a dry run removes nothing");

    let report = collect_now(&root, Policy::KEEP_ALL, false);
    assert_eq!(report.blobs_removed, 1);
    assert_eq!(blob_count(&root), before - 1);
    for image in list(&root).unwrap() {
        assert!(image.missing.is_empty(), "{image:?}");
    }
    assert_eq!(collect_now(&root, Policy::KEEP_ALL, false).blobs_removed, 0);
}

#[tokio::test]
async fn retention_drops_images_then_their_own_blobs_but_not_shared_ones() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    let store = OciLayoutStore::open(&root).await.unwrap();
    image(&store, "a:1", "a", &[b"base", b"a-one"]).await;
    image(&store, "a:2", "a", &[b"base", b"a-two"]).await;
    image(&store, "b:1", "b", &[b"base", b"b-one"]).await;
    tokio::time::sleep(CLOCK_SLACK_FOR_TESTS).await;

    let policy = Policy {
        keep_per_source: 1,
        ..Policy::KEEP_ALL
    };
    let report = collect_now(&root, policy, false);
    assert_eq!(report.dropped.len(), 1);
    assert_eq!(report.dropped[0].reference, "a:1");
    assert_eq!(report.dropped_by(Rule::KeepPerSource), 1);
    // a:1's manifest, config and own layer; the shared base stays.
    assert_eq!(report.blobs_removed, 3);
    let left: Vec<String> = list(&root)
        .unwrap()
        .into_iter()
        .map(|i| i.reference)
        .collect();
    assert_eq!(left, ["a:2", "b:1"]);
    for image in list(&root).unwrap() {
        assert!(image.missing.is_empty(), "{image:?}");
        assert_eq!(image.source_id.as_deref(), Some(&image.reference[..1]));
    }
}

#[tokio::test]
async fn blobs_a_running_writer_touched_stay_until_its_lease_ends() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    let store = OciLayoutStore::open(&root).await.unwrap();
    image(&store, "a:1", "a", &[b"shared", b"a-one"]).await;
    tokio::time::sleep(CLOCK_SLACK_FOR_TESTS).await;

    // A job starts, finds the shared layer stored, writes its own; its tag is not written yet.
    let lease = store.lease().unwrap();
    let shared = Digest::sha256_of(b"shared");
    // Meanwhile a:1 is dropped, so nothing tagged reaches the shared layer.
    let policy = Policy {
        max_age: Some(Duration::from_millis(1)),
        ..Policy::KEEP_ALL
    };
    assert!(store.has_blob(&shared, 6).await);
    store
        .put_blob(&b"job layer"[..], &Digest::sha256_of(b"job layer"), 9)
        .await
        .unwrap();
    let report = collect(
        &root,
        Collection {
            policy,
            dry_run: false,
        },
        now_ms() + DAY_MS,
    )
    .unwrap();
    assert_eq!(report.dropped_by(Rule::MaxAge), 1);
    assert!(
        store.has_blob(&shared, 6).await,
        "touched by a running job: kept"
    );
    assert!(root
        .join("blobs/sha256")
        .join(Digest::sha256_of(b"job layer").hex())
        .exists());

    // Once the lease ends, what nothing reaches goes.
    drop(lease);
    tokio::time::sleep(CLOCK_SLACK_FOR_TESTS).await;
    let report = collect_now(&root, Policy::KEEP_ALL, false);
    assert_eq!(report.blobs_removed, 2, "{report:?}");
    assert_eq!(blob_count(&root), 0);
}

#[tokio::test]
async fn a_lease_of_a_dead_process_is_ignored_and_removed() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    let store = OciLayoutStore::open(&root).await.unwrap();
    let orphan = b"orphan";
    store
        .put_blob(&orphan[..], &Digest::sha256_of(orphan), 6)
        .await
        .unwrap();
    // pid_max is at most 2^22: this process id is never alive.
    let dead = root.join(".ingest/leases/99999999-0");
    std::fs::create_dir_all(dead.parent().unwrap()).unwrap();
    std::fs::write(&dead, "0").unwrap();
    tokio::time::sleep(CLOCK_SLACK_FOR_TESTS).await;
    let report = collect_now(&root, Policy::KEEP_ALL, false);
    assert_eq!(report.blobs_removed, 1);
    assert!(!dead.exists());
}

/// Longer than the collection's clock slack, so what a test wrote counts as old.
const CLOCK_SLACK_FOR_TESTS: Duration = Duration::from_millis(250);
