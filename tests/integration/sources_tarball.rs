//! tar.gz sources against a real HTTP server on loopback: a valid archive, every unsafe entry
//! kind, decompression bombs, gzip framing, HTTP statuses and cancellation.

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use factoryd::adapters::sources::SourceFetcher;
use factoryd::error::{ErrorClass, ErrorCode, JobError};
use factoryd::ports::{FetchedSource, Fetcher};
use factoryd::workspace::Workspace;
use serde_json::json;
use tar::EntryType;
use tokio_util::sync::CancellationToken;

use crate::support::failure::{assert_code, assert_failure};
use crate::support::http_files::{FileServer, Route};
use crate::support::sources::{
    config, docker_file, stage_context, tar_entries, tree_listing, Recorder,
};

/// One raw entry: name bytes as stored (unchecked), kind, content, link target.
struct Raw<'a>(&'a [u8], EntryType, &'a [u8], Option<&'a [u8]>);

/// A tar stream with names written byte for byte, so hostile names survive.
fn tar_of(entries: &[Raw<'_>]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for Raw(name, kind, data, link) in entries {
        let mut header = tar::Header::new_old();
        header.as_old_mut().name[..name.len()].copy_from_slice(name);
        if let Some(link) = link {
            header.as_old_mut().linkname[..link.len()].copy_from_slice(link);
        }
        header.set_entry_type(*kind);
        header.set_mode(if *kind == EntryType::Directory {
            0o755
        } else {
            0o644
        });
        header.set_size(data.len() as u64);
        header.set_mtime(1_700_000_000);
        header.set_cksum();
        builder.append(&header, *data).unwrap();
    }
    builder.into_inner().unwrap()
}

/// A tar stream holding only `Dockerfile` (`FROM scratch`).
fn dockerfile_only() -> Vec<u8> {
    tar_of(&[Raw(
        b"Dockerfile",
        EntryType::Regular,
        b"FROM scratch\n",
        None,
    )])
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(bytes).unwrap();
    enc.finish().unwrap()
}

struct Setup {
    root: tempfile::TempDir,
    server: FileServer,
}

fn setup() -> Setup {
    let root = tempfile::tempdir().unwrap();
    // A sibling of the work root that no entry may ever reach.
    std::fs::create_dir_all(root.path().join("canary")).unwrap();
    std::fs::write(root.path().join("canary/alive.txt"), "alive").unwrap();
    Setup {
        root,
        server: FileServer::start(),
    }
}

impl Setup {
    /// Serves `archive` at `path`; returns its URL.
    fn serve(&self, path: &str, archive: Vec<u8>) -> String {
        self.server.route(path, Route::Body(Arc::new(archive)))
    }
}

const SMALL_CAPS: &str = "[sources]\nmax_context_bytes = 1048576\nmax_entries = 50\n";

async fn fetch(
    setup: &Setup,
    url: &str,
    context_dir: &str,
    build_file: &str,
    extra_config: &str,
) -> (Result<FetchedSource, JobError>, Workspace) {
    let fetcher = SourceFetcher::new(&config(extra_config)).unwrap();
    let origin = docker_file(json!({
        "targz_url": url, "context_dir": context_dir, "build_file": build_file,
    }));
    let ws = Workspace::create(&setup.root.path().join("work"), "job-test").unwrap();
    let cx = stage_context(
        &ws,
        &origin,
        Arc::new(Recorder::default()),
        CancellationToken::new(),
    );
    (fetcher.fetch(&origin, &cx).await, ws)
}

fn assert_canary_untouched(setup: &Setup, ws: &Workspace) {
    assert_eq!(
        std::fs::read_to_string(setup.root.path().join("canary/alive.txt")).unwrap(),
        "alive"
    );
    assert_eq!(
        tree_listing(&setup.root.path().join("canary")),
        ["alive.txt"]
    );
    // The workspace holds the download and nothing extracted from it.
    assert_eq!(tree_listing(ws.path()), ["source.tar.gz"]);
    let top: Vec<String> = tree_listing(setup.root.path())
        .into_iter()
        .filter(|p| !p.contains('/'))
        .collect();
    assert_eq!(top, ["canary", "work"]);
}

fn valid_archive() -> Vec<u8> {
    gzip(&tar_of(&[
        Raw(b"./", EntryType::Directory, b"", None),
        Raw(b"./app-one/", EntryType::Directory, b"", None),
        Raw(
            b"./app-one/Dockerfile",
            EntryType::Regular,
            b"FROM scratch\n",
            None,
        ),
        Raw(
            b"./app-one/main.go",
            EntryType::Regular,
            b"package main\n",
            None,
        ),
        Raw(
            b"./app-one/copy.go",
            EntryType::Link,
            b"",
            Some(b"app-one/main.go"),
        ),
        Raw(b"./README.md", EntryType::Regular, b"hello\n", None),
        Raw(b"./current", EntryType::Symlink, b"", Some(b"app-one")),
    ]))
}

/// Regression: `factoryd_fetched_bytes_total{source="tarball"}` was registered but never
/// counted. The registry is process-wide and other tests fetch in parallel: a lower bound.
#[tokio::test]
async fn a_fetched_archive_counts_its_bytes_in_metrics() {
    let counter = factoryd::telemetry::metrics()
        .fetched_bytes
        .with_label_values(&["tarball"]);
    let setup = setup();
    let archive = valid_archive();
    let size = archive.len() as u64;
    let url = setup.serve("/counted.tar.gz", archive);
    let before = counter.get();
    let (result, _ws) = fetch(&setup, &url, "/", "/app-one/Dockerfile", "").await;
    let source = result.unwrap();
    assert_eq!(source.fetched_bytes, size);
    assert!(counter.get() - before >= size);
}

#[tokio::test]
async fn a_valid_archive_seals_with_the_dockerfile_in_app_one_and_context_root() {
    let setup = setup();
    let url = setup.serve("/src.tar.gz", valid_archive());
    let (result, ws) = fetch(&setup, &url, "/", "/app-one/Dockerfile", "").await;
    let source = result.unwrap();
    assert_eq!(source.context.dockerfile(), "app-one/Dockerfile");
    assert!(source.revision.is_none());
    let mut out = Vec::new();
    source.context.write_tar(&mut out).unwrap();
    let entries = tar_entries(&out);
    let find = |name: &str| entries.iter().find(|e| e.0 == name).cloned();
    assert_eq!(find("app-one/Dockerfile").unwrap().4, b"FROM scratch\n");
    assert_eq!(find("README.md").unwrap().4, b"hello\n");
    let link = find("current").unwrap();
    assert_eq!((link.2, link.3.as_deref()), (b'2', Some("app-one")));
    let hard = find("app-one/copy.go").unwrap();
    assert_eq!((hard.2, hard.3.as_deref()), (b'1', Some("app-one/main.go")));
    assert_canary_untouched(&setup, &ws);
}

#[tokio::test]
async fn every_unsafe_entry_kind_is_refused_by_name_with_nothing_written_outside() {
    let setup = setup();
    let dockerfile = Raw(b"Dockerfile", EntryType::Regular, b"FROM scratch\n", None);
    let cases: Vec<(&str, Raw<'_>, &str)> = vec![
        (
            "dotdot",
            Raw(b"../escape.txt", EntryType::Regular, b"x", None),
            "../escape.txt",
        ),
        (
            "absolute",
            Raw(b"/tmp/abs.txt", EntryType::Regular, b"x", None),
            "/tmp/abs.txt",
        ),
        (
            "hardlink-out",
            Raw(b"hard", EntryType::Link, b"", Some(b"../canary/alive.txt")),
            "hard",
        ),
        (
            "hardlink-absolute",
            Raw(b"hard", EntryType::Link, b"", Some(b"/etc/passwd")),
            "hard",
        ),
        (
            "char-device",
            Raw(b"null", EntryType::Char, b"", None),
            "null",
        ),
        (
            "block-device",
            Raw(b"sda", EntryType::Block, b"", None),
            "sda",
        ),
        ("fifo", Raw(b"pipe", EntryType::Fifo, b"", None), "pipe"),
    ];
    for (label, entry, name) in cases {
        let archive = gzip(&tar_of(&[
            Raw(dockerfile.0, dockerfile.1, dockerfile.2, None),
            entry,
        ]));
        let url = setup.serve(&format!("/{label}.tar.gz"), archive);
        let (result, ws) = fetch(&setup, &url, "/", "/Dockerfile", "").await;
        let err = result
            .err()
            .unwrap_or_else(|| panic!("{label} was accepted"));
        assert_eq!(err.code, ErrorCode::UnsafeSource, "{label}: {err}");
        assert_eq!(err.class, ErrorClass::Permanent, "{label}");
        assert!(err.message.contains(&format!("{name:?}")), "{label}: {err}");
        assert_canary_untouched(&setup, &ws);
    }
}

#[tokio::test]
async fn an_entry_below_a_symlink_is_refused() {
    let setup = setup();
    let archive = gzip(&tar_of(&[
        Raw(b"Dockerfile", EntryType::Regular, b"FROM scratch\n", None),
        Raw(b"sub/", EntryType::Directory, b"", None),
        Raw(b"d", EntryType::Symlink, b"", Some(b"sub")),
        Raw(b"d/x", EntryType::Regular, b"through the link", None),
    ]));
    let url = setup.serve("/below.tar.gz", archive);
    let (result, _ws) = fetch(&setup, &url, "/", "/Dockerfile", "").await;
    let err = result.err().expect("must be refused");
    assert_code(&err, ErrorCode::UnsafeSource, &["\"d/x\""]);
}

/// As `docker build` keeps them: a symlink is sent as a symlink whatever its target (absolute,
/// out of the archive, out of the context dir), never followed, and nothing lands outside the
/// workspace.
#[tokio::test]
async fn symlinks_out_of_the_context_are_kept_as_links_whatever_their_target() {
    let setup = setup();
    let archive = gzip(&tar_of(&[
        Raw(
            b"app/Dockerfile",
            EntryType::Regular,
            b"FROM scratch\n",
            None,
        ),
        Raw(b"app/config", EntryType::Symlink, b"", Some(b"/etc/passwd")),
        Raw(
            b"app/canary",
            EntryType::Symlink,
            b"",
            Some(b"../../canary/alive.txt"),
        ),
        Raw(b"app/up", EntryType::Symlink, b"", Some(b"../secret.txt")),
        Raw(b"secret.txt", EntryType::Regular, b"s", None),
    ]));
    let url = setup.serve("/links.tar.gz", archive);
    let (result, ws) = fetch(&setup, &url, "/app", "/app/Dockerfile", "").await;
    let source = result.unwrap_or_else(|e| panic!("links are kept: {e}"));
    let mut out = Vec::new();
    source.context.write_tar(&mut out).unwrap();
    let entries: Vec<(String, u8, Option<String>)> = tar_entries(&out)
        .into_iter()
        .map(|(name, _, kind, link, _)| (name, kind, link))
        .collect();
    let link = |name: &str, target: &str| (name.to_owned(), b'2', Some(target.to_owned()));
    assert_eq!(
        entries,
        [
            ("Dockerfile".to_owned(), b'0', None),
            link("config", "/etc/passwd"),
            link("canary", "../../canary/alive.txt"),
            link("up", "../secret.txt"),
        ]
    );
    assert_canary_untouched(&setup, &ws);
}

/// Links are never followed out of the archive to find `context_dir` or `build_file`: each is
/// refused naming the field and the link.
#[tokio::test]
async fn a_context_dir_or_build_file_through_a_link_out_of_the_archive_is_refused() {
    let setup = setup();
    let archive = gzip(&tar_of(&[
        Raw(b"app/x", EntryType::Regular, b"x", None),
        Raw(b"Dockerfile", EntryType::Symlink, b"", Some(b"/etc/passwd")),
        Raw(b"etc", EntryType::Symlink, b"", Some(b"/etc")),
        Raw(b"up", EntryType::Symlink, b"", Some(b"../..")),
    ]));
    let url = setup.serve("/through.tar.gz", archive);
    let cases = [
        (
            "/app",
            "/Dockerfile",
            &["build_file /Dockerfile", "/etc/passwd"][..],
        ),
        (
            "/app",
            "/etc/passwd",
            &["build_file /etc/passwd", "/etc"][..],
        ),
        ("/etc", "/app/x", &["context_dir /etc", "/etc"][..]),
        (
            "/up/tmp",
            "/app/x",
            &["context_dir /up/tmp", "/up", "../.."][..],
        ),
    ];
    for (context_dir, build_file, words) in cases {
        let (result, ws) = fetch(&setup, &url, context_dir, build_file, "").await;
        let err = result.err().expect("must be refused");
        assert_code(&err, ErrorCode::UnsafeSource, words);
        assert_canary_untouched(&setup, &ws);
    }
}

#[tokio::test]
async fn a_file_bigger_than_the_cap_stops_at_its_header() {
    let setup = setup();
    let big = vec![0u8; 2 << 20];
    let archive = gzip(&tar_of(&[
        Raw(b"Dockerfile", EntryType::Regular, b"FROM scratch\n", None),
        Raw(b"big.bin", EntryType::Regular, &big, None),
    ]));
    let url = setup.serve("/big.tar.gz", archive);
    let (result, ws) = fetch(&setup, &url, "/", "/Dockerfile", SMALL_CAPS).await;
    let err = result.err().expect("must hit the cap");
    assert_failure(&err, ErrorClass::Permanent, ErrorCode::LimitExceeded, &[]);
    assert_canary_untouched(&setup, &ws);
}

#[tokio::test]
async fn a_decompression_bomb_stops_at_the_cap() {
    let setup = setup();
    // 256 MiB of zeros: a tar end marker followed by endless "padding", ~250 KiB gzipped.
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    let block = vec![0u8; 1 << 20];
    for _ in 0..256 {
        enc.write_all(&block).unwrap();
    }
    let bomb = enc.finish().unwrap();
    assert!(bomb.len() < 1 << 20);
    let url = setup.serve("/bomb.tar.gz", bomb);
    let started = Instant::now();
    let (result, ws) = fetch(&setup, &url, "/", "/Dockerfile", SMALL_CAPS).await;
    let err = result.err().expect("a bomb must stop");
    assert_code(
        &err,
        ErrorCode::LimitExceeded,
        &["decompresses to more than"],
    );
    // Stopped at a ~2 MiB cap, not after inflating 256 MiB.
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_canary_untouched(&setup, &ws);
}

#[tokio::test]
async fn concatenated_gzip_members_are_read_as_one_stream() {
    let setup = setup();
    let tar = tar_of(&[
        Raw(b"Dockerfile", EntryType::Regular, b"FROM scratch\n", None),
        Raw(b"b.txt", EntryType::Regular, b"second member", None),
    ]);
    let (first, second) = tar.split_at(512 * 2);
    let mut archive = gzip(first);
    archive.extend(gzip(second));
    let url = setup.serve("/multi.tar.gz", archive);
    let (result, _ws) = fetch(&setup, &url, "/", "/Dockerfile", "").await;
    let source = result.unwrap();
    let mut out = Vec::new();
    source.context.write_tar(&mut out).unwrap();
    assert!(tar_entries(&out).iter().any(|e| e.0 == "b.txt"));
}

#[tokio::test]
async fn trailing_bytes_after_the_gzip_data_are_refused() {
    let setup = setup();
    let mut archive = gzip(&dockerfile_only());
    archive.extend_from_slice(b"not gzip at all, appended");
    let url = setup.serve("/trailing.tar.gz", archive);
    let (result, _ws) = fetch(&setup, &url, "/", "/Dockerfile", "").await;
    let err = result.err().expect("trailing garbage must be refused");
    assert_eq!(err.class, ErrorClass::Permanent, "{err}");
}

#[tokio::test]
async fn data_hidden_after_the_tar_end_marker_is_refused() {
    let setup = setup();
    let mut tar = dockerfile_only();
    tar.extend_from_slice(&[0u8; 1024]);
    tar.extend_from_slice(b"hidden payload");
    let url = setup.serve("/hidden.tar.gz", gzip(&tar));
    let (result, _ws) = fetch(&setup, &url, "/", "/Dockerfile", "").await;
    let err = result.err().expect("hidden data must be refused");
    assert_eq!(err.code, ErrorCode::UnsafeSource, "{err}");
}

#[tokio::test]
async fn http_404_is_permanent_and_503_is_transient() {
    let setup = setup();
    let missing = setup.server.route("/missing.tar.gz", Route::Status(404));
    let (result, _ws) = fetch(&setup, &missing, "/", "/Dockerfile", "").await;
    let err = result.err().expect("404");
    assert_failure(&err, ErrorClass::Permanent, ErrorCode::NotFound, &[]);

    let busy = setup.server.route("/busy.tar.gz", Route::Status(503));
    let (result, _ws) = fetch(&setup, &busy, "/", "/Dockerfile", "").await;
    let err = result.err().expect("503");
    assert_failure(&err, ErrorClass::Transient, ErrorCode::Unavailable, &[]);
}

#[tokio::test]
async fn a_download_larger_than_the_fetch_cap_is_refused() {
    let setup = setup();
    let noise: Vec<u8> = (0..3u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let url = setup.serve("/large.tar.gz", noise);
    let (result, _ws) = fetch(
        &setup,
        &url,
        "/",
        "/Dockerfile",
        "[sources]\nmax_fetch_bytes = 1048576\n",
    )
    .await;
    let err = result.err().expect("over the fetch cap");
    assert_eq!(err.code, ErrorCode::LimitExceeded, "{err}");
}

#[tokio::test]
async fn cancellation_interrupts_a_stalled_download_and_removes_the_workspace() {
    let setup = setup();
    let url = setup.server.route("/stall.tar.gz", Route::Stall(4096));
    let fetcher = SourceFetcher::new(&config("")).unwrap();
    let origin = docker_file(json!({"targz_url": url}));
    let work_root = setup.root.path().join("work");
    let ws = Workspace::create(&work_root, "job-test").unwrap();
    let cancel = CancellationToken::new();
    let cx = stage_context(&ws, &origin, Arc::new(Recorder::default()), cancel.clone());
    let canceller = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        cancel.cancel();
    });
    let started = Instant::now();
    let err = fetcher.fetch(&origin, &cx).await.err().expect("cancelled");
    canceller.await.unwrap();
    assert_eq!(err.class, ErrorClass::Cancelled, "{err}");
    assert!(started.elapsed() < Duration::from_secs(5));
    drop(ws);
    assert!(std::fs::read_dir(&work_root).unwrap().next().is_none());
}

#[tokio::test]
async fn a_metadata_address_is_refused_by_the_egress_policy() {
    let setup = setup();
    let (result, _ws) = fetch(
        &setup,
        "http://169.254.169.254/latest/src.tar.gz",
        "/",
        "/Dockerfile",
        "",
    )
    .await;
    let err = result.err().expect("refused");
    assert_eq!(err.code, ErrorCode::EgressRefused, "{err}");
}

/// A PAX extended header (`x`) giving `name` the size `pax_size`, then its ustar header
/// claiming `ustar_size`, then `content` (which must be `pax_size` bytes for a valid archive).
fn pax_sized_entry(out: &mut Vec<u8>, name: &[u8], ustar_size: u64, pax_size: u64, content: &[u8]) {
    let body = format!(" size={pax_size}\n");
    // The record's length counts its own digits.
    let mut len = body.len() + 1;
    while format!("{len}{body}").len() != len {
        len += 1;
    }
    let record = format!("{len}{body}");
    let mut append = |name: &[u8], kind: EntryType, size: u64, data: &[u8]| {
        let mut header = tar::Header::new_ustar();
        header.as_ustar_mut().unwrap().name[..name.len()].copy_from_slice(name);
        header.set_entry_type(kind);
        header.set_mode(0o644);
        header.set_size(size);
        header.set_mtime(1_700_000_000);
        header.set_cksum();
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(512) * 512, 0);
    };
    append(
        b"PaxHeaders/x",
        EntryType::XHeader,
        record.len() as u64,
        record.as_bytes(),
    );
    append(name, EntryType::Regular, ustar_size, content);
}

fn with_end_marker(mut tar: Vec<u8>) -> Vec<u8> {
    tar.extend_from_slice(&[0u8; 1024]);
    tar
}

/// Issue 14: the `.dockerignore` cap read the ustar size (0) while the archive held 64 MiB for
/// it under a PAX `size`; the worker read it all and the build went on. The PAX size is what
/// counts: refused as over the 1 MiB cap, at its header.
#[tokio::test]
async fn a_dockerignore_whose_pax_size_exceeds_the_cap_is_refused() {
    let setup = setup();
    let mut tar = dockerfile_only();
    tar.truncate(tar.len() - 1024); // drop the end marker to append more entries
    let ignore = vec![b'#'; 64 << 20];
    pax_sized_entry(&mut tar, b".dockerignore", 0, ignore.len() as u64, &ignore);
    let archive = gzip(&with_end_marker(tar));
    let url = setup.serve("/pax.tar.gz", archive);
    let (result, ws) = fetch(&setup, &url, "/", "/Dockerfile", "").await;
    let err = result
        .err()
        .expect("an oversized .dockerignore must be refused");
    assert_failure(
        &err,
        ErrorClass::Permanent,
        ErrorCode::LimitExceeded,
        &[".dockerignore"],
    );
    assert_canary_untouched(&setup, &ws);
}

/// A file whose PAX size differs from its ustar size is streamed whole: the ustar field said 4
/// bytes, the archive holds 3000, and all 3000 reach the context (and count against its caps).
#[tokio::test]
async fn a_file_with_a_pax_size_is_streamed_whole() {
    let setup = setup();
    let mut tar = dockerfile_only();
    tar.truncate(tar.len() - 1024);
    let content: Vec<u8> = (0..3000u32).map(|i| b'a' + (i % 26) as u8).collect();
    pax_sized_entry(&mut tar, b"data.txt", 4, content.len() as u64, &content);
    let archive = gzip(&with_end_marker(tar));
    let url = setup.serve("/pax-file.tar.gz", archive);
    let (result, _ws) = fetch(&setup, &url, "/", "/Dockerfile", "").await;
    let source = result.expect("a valid PAX archive seals");
    let mut out = Vec::new();
    source.context.write_tar(&mut out).unwrap();
    let entries = tar_entries(&out);
    let data = entries
        .iter()
        .find(|e| e.0 == "data.txt")
        .expect("data.txt in the stream");
    assert_eq!(data.4, content);
}
