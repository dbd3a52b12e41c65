//! Issue 10: the `oci-layout` store's retention and collection against real imports from a
//! real registry, through the `factoryd` binary (`run` writes, `store` collects), with
//! `skopeo` reading what is kept.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::{json, Value};

use crate::support::registry::{skopeo_copy, skopeo_raw, Auth, LayoutWriter, Registry};
use crate::support::run::{factoryd_store, store_ls};

/// A store, its config and a registry holding images `app-<source>:<n>`.
struct Rig {
    root: tempfile::TempDir,
    config: PathBuf,
    registry: Registry,
}

impl Rig {
    fn start(store_section: &str) -> Rig {
        let root = tempfile::tempdir().unwrap();
        let registry = Registry::start(Auth::None);
        let config = root.path().join("factoryd.toml");
        std::fs::write(
            &config,
            format!(
                "[worker]\nwork_root = \"{}\"\n[destination]\nkind = \"oci-layout\"\npath = \"{}\"\n\
                 [registries]\ninsecure = [\"{}\"]\n[egress]\nallow_loopback = true\n\
                 [store]\n{store_section}\n",
                root.path().join("work").display(),
                root.path().join("store").display(),
                registry.host,
            ),
        )
        .unwrap();
        Rig {
            root,
            config,
            registry,
        }
    }

    fn store(&self) -> PathBuf {
        self.root.path().join("store")
    }

    /// Pushes an image of two layers: a base shared by every image, and one of its own.
    fn seed(&self, reference: &str, seed: u64) {
        let dir = tempfile::tempdir().unwrap();
        let mut writer = LayoutWriter::new(dir.path());
        let (_, descriptor) = writer.image(&[32 * 1024, 96 * 1024], "amd64", seed);
        writer.tag(descriptor, "seed");
        skopeo_copy(
            &format!("oci:{}:seed", dir.path().display()),
            &format!("docker://{}/{reference}", self.registry.host),
            &[],
        );
    }

    /// `factoryd store ARGS` on this rig's config.
    fn store_cmd(&self, args: &[&str]) -> Output {
        // What was stored just now is newer than a collection's clock slack (100 ms) would let
        // it sweep if unreachable: let it age past that first.
        std::thread::sleep(std::time::Duration::from_millis(250));
        factoryd_store(&self.config, args)
    }

    /// Imports `reference` for `source` as job `id` with `factoryd run`; the result.
    fn import(&self, id: &str, source: &str, reference: &str) -> Value {
        let job = json!({"v": 1, "id": id, "source_id": source,
            "origin": {"type": "docker-registry", "details": {
                "url": format!("http://{}", self.registry.host), "target": reference}}});
        let file = self.root.path().join(format!("{id}.json"));
        std::fs::write(&file, job.to_string()).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_factoryd"))
            .arg("run")
            .arg(&file)
            .arg("--config")
            .arg(&self.config)
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .output()
            .expect("spawn factoryd");
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)))
    }

    fn ls(&self) -> Vec<Value> {
        store_ls(&self.config)
    }

    fn references(&self) -> Vec<String> {
        let mut refs: Vec<String> = self
            .ls()
            .iter()
            .map(|i| i["reference"].as_str().unwrap().to_owned())
            .collect();
        refs.sort();
        refs
    }

    /// Every kept tag reads with skopeo, and every blob left hashes to its name and is reached
    /// by a kept tag (nothing unreachable is left).
    fn assert_whole(&self) {
        let store = self.store();
        let mut reached = std::collections::HashSet::new();
        for image in self.ls() {
            let reference = image["reference"].as_str().unwrap();
            skopeo_raw(&format!("oci:{}:{reference}", store.display()), &[]);
            assert!(image.get("missing").is_none(), "{image}");
            reach(&store, image["digest"].as_str().unwrap(), &mut reached);
        }
        for entry in std::fs::read_dir(store.join("blobs/sha256")).unwrap() {
            let entry = entry.unwrap();
            let name = entry.file_name().to_string_lossy().into_owned();
            let bytes = std::fs::read(entry.path()).unwrap();
            assert_eq!(
                crate::support::registry::digest_of(&bytes),
                format!("sha256:{name}")
            );
            assert!(
                reached.contains(&format!("sha256:{name}")),
                "unreachable blob {name} left"
            );
        }
    }
}

/// Collects the digests `digest` reaches through manifests.
fn reach(store: &Path, digest: &str, out: &mut std::collections::HashSet<String>) {
    if !out.insert(digest.to_owned()) {
        return;
    }
    let path = store
        .join("blobs/sha256")
        .join(digest.trim_start_matches("sha256:"));
    let Ok(value) = serde_json::from_slice::<Value>(&std::fs::read(path).unwrap()) else {
        return;
    };
    let children = ["manifests", "layers"]
        .iter()
        .filter_map(|k| value.get(*k).and_then(Value::as_array))
        .flatten()
        .chain(value.get("config"));
    for child in children {
        if let Some(d) = child.get("digest").and_then(Value::as_str) {
            reach(store, d, out);
        }
    }
}

#[test]
fn retention_keeps_the_newest_per_source_and_the_store_stays_whole() {
    let rig = Rig::start("keep_per_source = 2\nmin_age_secs = 0\n");
    for (i, (source, reference)) in [
        ("a", "app-a:1"),
        ("a", "app-a:2"),
        ("b", "app-b:1"),
        ("a", "app-a:3"),
    ]
    .iter()
    .enumerate()
    {
        rig.seed(reference, 10 + i as u64);
        let result = rig.import(&format!("job-{i}"), source, reference);
        assert_eq!(result["status"], "succeeded", "{result}");
    }
    assert_eq!(
        rig.references(),
        ["a:job-0", "a:job-1", "a:job-3", "b:job-2"]
    );
    let listed = rig.ls();
    for image in &listed {
        for field in [
            "reference",
            "source_id",
            "digest",
            "size_bytes",
            "stored_at",
        ] {
            assert!(!image[field].is_null(), "{field} in {image}");
        }
    }

    // A dry run says what would go and removes nothing.
    let dry = rig.store_cmd(&["gc", "--dry-run"]);
    assert!(dry.status.success());
    let said = String::from_utf8_lossy(&dry.stdout);
    assert!(said.contains("would drop\ta:job-0\t"), "{said}");
    assert!(said.contains("keep_per_source"), "{said}");
    assert_eq!(rig.references().len(), 4);

    let gc = rig.store_cmd(&["gc"]);
    assert!(
        gc.status.success(),
        "{}",
        String::from_utf8_lossy(&gc.stderr)
    );
    assert_eq!(rig.references(), ["a:job-1", "a:job-3", "b:job-2"]);
    rig.assert_whole();

    // rm takes an image out, and what only it reached.
    let rm = rig.store_cmd(&["rm", "a:job-1"]);
    assert!(
        rm.status.success(),
        "{}",
        String::from_utf8_lossy(&rm.stderr)
    );
    assert_eq!(rig.references(), ["a:job-3", "b:job-2"]);
    rig.assert_whole();
    let missing = rig.store_cmd(&["rm", "a:nope"]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no image \"a:nope\""));
}

#[test]
fn max_bytes_drops_the_least_recent_but_never_the_newest_of_a_source() {
    let rig = Rig::start("keep_per_source = 0\nmin_age_secs = 0\nmax_bytes = 1\n");
    for (i, (source, reference)) in [("a", "app-a:1"), ("b", "app-b:1"), ("a", "app-a:2")]
        .iter()
        .enumerate()
    {
        rig.seed(reference, 20 + i as u64);
        assert_eq!(
            rig.import(&format!("job-{i}"), source, reference)["status"],
            "succeeded"
        );
    }
    let gc = rig.store_cmd(&["gc"]);
    assert!(gc.status.success());
    let stderr = String::from_utf8_lossy(&gc.stderr);
    assert!(stderr.contains("over store.max_bytes"), "{stderr}");
    // a:job-0 went; the newest of a and of b stay, though the budget is not met.
    assert_eq!(rig.references(), ["a:job-2", "b:job-1"]);
    rig.assert_whole();
}

/// 100 imports in four processes at a time while collections loop in another: every import
/// succeeds and every kept image stays whole.
#[test]
fn collections_beside_running_imports_lose_nothing() {
    let rig = std::sync::Arc::new(Rig::start("keep_per_source = 0\nmin_age_secs = 0\n"));
    for i in 0..4 {
        rig.seed(&format!("app-{i}:1"), 30 + i);
    }
    // The store exists once something was stored in it.
    assert_eq!(
        rig.import("job-first", "s", "app-0:1")["status"],
        "succeeded"
    );
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let collector = {
        let (rig, stop) = (rig.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut runs = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let out = rig.store_cmd(&["gc"]);
                assert!(
                    out.status.success(),
                    "{}",
                    String::from_utf8_lossy(&out.stderr)
                );
                runs += 1;
            }
            runs
        })
    };
    let importers: Vec<_> = (0..4)
        .map(|worker| {
            let rig = rig.clone();
            std::thread::spawn(move || {
                for round in 0..25 {
                    let i = (worker + round) % 4;
                    let id = format!("job-{worker}-{round}");
                    let result = rig.import(&id, &format!("s{worker}"), &format!("app-{i}:1"));
                    assert_eq!(result["status"], "succeeded", "{result}");
                }
            })
        })
        .collect();
    for importer in importers {
        importer.join().unwrap();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let collections = collector.join().unwrap();
    assert!(collections >= 2, "only {collections} collections ran");
    assert_eq!(rig.references().len(), 101);
    rig.assert_whole();
}

/// Checks every tag of the store at `root` reaches only blobs that are there and hash to
/// their names; returns how many tags.
fn assert_tags_whole(root: &Path) -> usize {
    let images = factoryd::store::list(root).expect("the index reads");
    let mut reached = std::collections::HashSet::new();
    for image in &images {
        assert!(image.missing.is_empty(), "{image:?}");
        reach(root, &image.digest, &mut reached);
    }
    for digest in &reached {
        let path = root
            .join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:"));
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{digest}: {e}"));
        assert_eq!(&crate::support::registry::digest_of(&bytes), digest);
    }
    images.len()
}

/// A collection killed (SIGKILL) at several points of its work leaves every tag in
/// `index.json` whole, and the next collection finishes the job.
#[test]
fn a_collection_killed_at_any_point_leaves_every_tag_whole_and_the_next_one_finishes() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    // 200 images of 20 sources (10 each), 9 layers each, and 3,000 blobs nothing reaches.
    let blobs = factoryd::testing::synthetic_store(&store, 200, 20, 9, 3000).unwrap();
    assert!(blobs > 4500, "{blobs}");
    let config = dir.path().join("factoryd.toml");
    std::fs::write(
        &config,
        format!(
            "[worker]\nwork_root = \"{}\"\n[destination]\nkind = \"oci-layout\"\npath = \"{}\"\n\
             [store]\nkeep_per_source = 5\nmin_age_secs = 0\n",
            dir.path().join("work").display(),
            store.display()
        ),
    )
    .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(250));
    let gc = || {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_factoryd"));
        cmd.args(["store", "gc", "--config"])
            .arg(&config)
            .env_clear()
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        cmd
    };
    let mut killed = 0;
    for delay_ms in [1, 3, 6, 10, 15, 25, 40, 60, 90, 140] {
        let mut child = gc().spawn().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        let finished = child.try_wait().unwrap().is_some();
        let _ = child.kill();
        child.wait().unwrap();
        if !finished {
            killed += 1;
        }
        let tags = assert_tags_whole(&store);
        assert!(
            (100..=200).contains(&tags),
            "{tags} tags after a kill at {delay_ms} ms"
        );
    }
    assert!(
        killed >= 3,
        "only {killed} collections were killed before they ended"
    );

    let status = gc().status().unwrap();
    assert!(status.success());
    assert_eq!(
        assert_tags_whole(&store),
        100,
        "5 of each of the 20 sources kept"
    );
    let left = std::fs::read_dir(store.join("blobs/sha256"))
        .unwrap()
        .count();
    // Every image keeps its manifest, config and 8 own layers; the shared layer once.
    assert_eq!(left, 100 * 10 + 1, "nothing unreachable left");
    let stray: Vec<_> = std::fs::read_dir(store.join(".ingest"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !["gc.lock", "index.lock", "leases"].contains(&n.as_str()))
        .collect();
    assert!(stray.is_empty(), "{stray:?}");
}

/// Unmounts a test tmpfs whatever the outcome.
struct Tmpfs(PathBuf);

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// A work root and store on a small tmpfs: below `worker.min_free_mib` the worker collects
/// the store first and, when that frees enough, keeps taking jobs; with the file system's
/// inodes used up by what a collection cannot remove, it holds. Needs root to mount (the test
/// says so and passes vacuously without it).
#[tokio::test]
async fn on_a_small_file_system_the_worker_collects_first_and_holds_only_when_that_is_not_enough() {
    use factoryd::job::Kind;
    use factoryd::readiness::Readiness;
    use factoryd::store::StoreKeeper;

    let dir = tempfile::tempdir().unwrap();
    let mount = dir.path().join("fs");
    std::fs::create_dir(&mount).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=24m,nr_inodes=3000", "tmpfs"])
        .arg(&mount)
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("SKIPPED: cannot mount a tmpfs here (needs root)");
        return;
    }
    let _unmount = Tmpfs(mount.clone());
    let (store, work) = (mount.join("store"), mount.join("work"));
    std::fs::create_dir_all(&work).unwrap();
    factoryd::testing::synthetic_store(&store, 4, 2, 3, 0).unwrap();
    // 16 MiB of blobs nothing reaches (an import's leftovers): 8 MiB left of 24.
    for i in 0..16u8 {
        let bytes = vec![i; 1 << 20];
        let digest = factoryd::manifest::Digest::sha256_of(&bytes);
        std::fs::write(store.join("blobs/sha256").join(digest.hex()), &bytes).unwrap();
    }
    tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    let config = factoryd::config::Config::defaults();
    let keeper = StoreKeeper::new(store.clone(), config.store, factoryd::clock::system());
    let readiness = Readiness::new(work.clone())
        .with_store(store.clone())
        .with_min_free(12 << 20)
        .with_min_free_inodes(1000)
        .with_keeper(keeper);
    assert_eq!(
        readiness.low_on_disk().len(),
        1,
        "{:?}",
        readiness.low_on_disk()
    );
    readiness.probe_disk().await;
    assert!(
        !readiness.is_held(Kind::Import) && !readiness.is_held(Kind::Build),
        "the collection freed enough: {:?}",
        readiness.low_on_disk()
    );
    assert_eq!(assert_tags_whole(&store), 4);

    // Files a collection cannot remove use up the inodes: the worker holds, and says why.
    for i in 0..2200 {
        std::fs::write(work.join(format!("f{i}")), b"").unwrap();
    }
    readiness.probe_disk().await;
    assert!(readiness.is_held(Kind::Import));
    let why = readiness.low_on_disk().join("; ");
    assert!(why.contains("below worker.min_free_inodes (1000)"), "{why}");
}
