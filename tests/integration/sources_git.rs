//! Git sources against real servers: `git http-backend` behind basic auth, and `sshd`.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use factoryd::adapters::sources::SourceFetcher;
use factoryd::error::{ErrorClass, ErrorCode, JobError};
use factoryd::ports::{FetchedSource, Fetcher};
use factoryd::workspace::Workspace;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::support::assert_within;
use crate::support::failure::{assert_code, assert_failure};
use crate::support::git_servers::{
    clone_bare, git, hostile_tree_fixture, revision_fixture, ssh_key, submodule_fixture, test_tls,
    EndlessRefs, GitHttpServer, Hostile, RevisionFixture, SshServer,
};
use crate::support::sources::{
    config, context_bytes, docker_file, fetch_details, stage_context, tar_entries, Recorder,
};

const USER: &str = "builder";
const PASSWORD: &str = "s3cret-Passw0rd";

struct HttpSetup {
    root: tempfile::TempDir,
    fixture: RevisionFixture,
    server: GitHttpServer,
}

fn http_setup() -> HttpSetup {
    let root = tempfile::tempdir().unwrap();
    let fixture = revision_fixture(root.path());
    let server = GitHttpServer::start(&root.path().join("repos"), USER, PASSWORD);
    HttpSetup {
        root,
        fixture,
        server,
    }
}

impl HttpSetup {
    /// Fetches `details` with the default fetcher into a work root below `root`.
    async fn fetch(
        &self,
        details: serde_json::Value,
    ) -> (Result<FetchedSource, JobError>, Arc<Recorder>, Workspace) {
        fetch_with(&fetcher(""), &self.root.path().join("wr"), details).await
    }
}

fn http_repo(setup: &HttpSetup, extra: serde_json::Value) -> serde_json::Value {
    let mut details = setup.server.app_details(USER, PASSWORD);
    if let (Some(repo), Some(extra)) = (details["repo"].as_object_mut(), extra.as_object()) {
        repo.extend(extra.clone());
    }
    details
}

fn fetcher(extra_config: &str) -> SourceFetcher {
    let insecure = "[git]\ninsecure_hosts = [\"127.0.0.1\"]\n";
    SourceFetcher::new(&config(&format!("{insecure}{extra_config}"))).unwrap()
}

async fn fetch_with(
    fetcher: &SourceFetcher,
    work_root: &Path,
    details: serde_json::Value,
) -> (Result<FetchedSource, JobError>, Arc<Recorder>, Workspace) {
    let cancel = CancellationToken::new();
    fetch_details(fetcher, work_root, "job-test", details, cancel).await
}

fn dockerfile_text(source: &FetchedSource) -> String {
    let entries = tar_entries(&context_bytes(source));
    let name = source.context.dockerfile();
    let entry = entries
        .iter()
        .find(|e| e.0 == name)
        .unwrap_or_else(|| panic!("{name} not in the stream"));
    String::from_utf8(entry.4.clone()).unwrap()
}

#[tokio::test]
async fn http_clone_with_username_and_password_builds_the_default_branch_tip() {
    let setup = http_setup();
    let (result, _, _ws) = fetch_with(
        &fetcher(""),
        &setup.root.path().join("work-root"),
        http_repo(&setup, json!({})),
    )
    .await;
    let source = result.unwrap();
    let revision = source.revision.clone().unwrap();
    assert_eq!(revision.commit, setup.fixture.main_tip());
    assert_eq!(revision.branch, "main");
    assert!(!revision.fallback);
    assert_eq!(source.context.dockerfile(), "Dockerfile");
    assert!(dockerfile_text(&source).contains("# three"));
    assert!(source.fetched_bytes > 0);
}

#[tokio::test]
async fn http_wrong_password_is_permanent_auth_failed_without_looping() {
    let setup = http_setup();
    let mut details = http_repo(&setup, json!({}));
    details["repo"]["auth"]["credentials"]["password"] = json!("wrong-password");
    let (result, _, _ws) = setup.fetch(details).await;
    let err = result.err().expect("a wrong password must fail");
    assert_failure(&err, ErrorClass::Permanent, ErrorCode::AuthFailed, &[]);
    assert!(!err.message.contains("wrong-password"), "{err}");
    // One anonymous probe and one attempt with the password; never a loop.
    let attempts = setup.server.unauthorized_count();
    assert!(attempts <= 3, "{attempts} refused requests");
}

#[tokio::test]
async fn plain_http_is_refused_for_hosts_not_listed_as_insecure() {
    let setup = http_setup();
    let fetcher = SourceFetcher::new(&config("")).unwrap();
    let (result, _, _ws) = fetch_with(
        &fetcher,
        &setup.root.path().join("wr"),
        http_repo(&setup, json!({})),
    )
    .await;
    let err = result.err().expect("http must be refused");
    assert_eq!(err.code, ErrorCode::Unsupported, "{err}");
    assert_eq!(setup.server.unauthorized_count(), 0);
}

#[tokio::test]
async fn a_tag_builds_the_tagged_commit() {
    let setup = http_setup();
    let details = http_repo(&setup, json!({"ref": {"type": "tag", "value": "v1"}}));
    let (result, _, _ws) = setup.fetch(details).await;
    let source = result.unwrap();
    let revision = source.revision.clone().unwrap();
    assert_eq!(revision.commit, setup.fixture.main[1]);
    assert_eq!(revision.tag.as_deref(), Some("v1"));
    assert!(dockerfile_text(&source).contains("# two"));
}

#[tokio::test]
async fn a_hash_on_the_branch_builds_that_commit() {
    let setup = http_setup();
    let hash = setup.fixture.main[0].clone();
    let details = http_repo(
        &setup,
        json!({"branch": "main", "ref": {"type": "hash", "value": hash}}),
    );
    let (result, recorder, _ws) = setup.fetch(details).await;
    let source = result.unwrap();
    let revision = source.revision.clone().unwrap();
    assert_eq!(revision.commit, hash);
    assert_eq!(revision.requested_hash.as_deref(), Some(hash.as_str()));
    assert!(!revision.fallback);
    assert!(recorder.warnings().is_empty());
    assert!(dockerfile_text(&source).contains("# one"));
}

#[tokio::test]
async fn a_hash_on_another_branch_falls_back_to_the_branch_tip_with_a_warning() {
    let setup = http_setup();
    let hash = setup.fixture.other_tip.clone();
    let details = http_repo(
        &setup,
        json!({"branch": "main", "ref": {"type": "hash", "value": hash}}),
    );
    let (result, recorder, _ws) = setup.fetch(details).await;
    let revision = result.unwrap().revision.unwrap();
    assert_eq!(revision.commit, setup.fixture.main_tip());
    assert!(revision.fallback);
    assert_eq!(revision.requested_hash.as_deref(), Some(hash.as_str()));
    let warnings = recorder.warnings();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert_eq!(warnings[0].0, "revision_fallback");
    assert!(warnings[0].1.contains(&hash));
}

#[tokio::test]
async fn a_hash_on_another_branch_fails_when_unaligned_hashes_are_strict() {
    let setup = http_setup();
    let details = http_repo(
        &setup,
        json!({"branch": "main", "ref": {"type": "hash", "value": setup.fixture.other_tip}}),
    );
    let strict = fetcher("unaligned_hash = \"fail\"\n");
    let (result, _, _ws) = fetch_with(&strict, &setup.root.path().join("wr"), details).await;
    let err = result.err().expect("strict mode must fail");
    assert_eq!(err.class, ErrorClass::Permanent);
    assert!(err.message.contains(&setup.fixture.other_tip), "{err}");
}

#[tokio::test]
async fn an_unknown_hash_is_a_permanent_not_found_naming_it() {
    let setup = http_setup();
    let hash = "0123456789abcdef0123456789abcdef01234567";
    let details = http_repo(&setup, json!({"ref": {"type": "hash", "value": hash}}));
    let (result, _, _ws) = setup.fetch(details).await;
    let err = result.err().expect("an unknown hash must fail");
    assert_failure(&err, ErrorClass::Permanent, ErrorCode::NotFound, &[hash]);
}

#[tokio::test]
async fn an_unknown_branch_or_tag_is_a_permanent_not_found_naming_it() {
    let setup = http_setup();
    for (extra, name) in [
        (json!({"branch": "nope"}), "nope"),
        (json!({"ref": {"type": "tag", "value": "v9"}}), "v9"),
    ] {
        let (result, _, _ws) = setup.fetch(http_repo(&setup, extra)).await;
        let err = result.err().expect("must fail");
        assert_code(&err, ErrorCode::NotFound, &[name]);
    }
}

#[tokio::test]
async fn a_missing_build_file_is_permanent_and_names_what_exists() {
    let setup = http_setup();
    let mut details = http_repo(&setup, json!({}));
    details["build_file"] = json!("/app/Dockerfile.prod");
    let (result, _, _ws) = setup.fetch(details).await;
    let err = result.err().expect("must fail");
    assert_code(
        &err,
        ErrorCode::NotFound,
        &["/app/Dockerfile.prod", "Dockerfile"],
    );
}

#[tokio::test]
async fn the_workspace_is_removed_after_success_failure_and_cancellation() {
    let setup = http_setup();
    let work_root = setup.root.path().join("wr");
    // Success.
    let (result, _, ws) = fetch_with(&fetcher(""), &work_root, http_repo(&setup, json!({}))).await;
    let source = result.unwrap();
    assert!(ws.path().join("source.git").is_dir());
    drop(source);
    drop(ws);
    assert!(std::fs::read_dir(&work_root).unwrap().next().is_none());
    // Failure.
    let (result, _, ws) = fetch_with(
        &fetcher(""),
        &work_root,
        http_repo(&setup, json!({"branch": "nope"})),
    )
    .await;
    assert!(result.is_err());
    drop(ws);
    assert!(std::fs::read_dir(&work_root).unwrap().next().is_none());
    // Cancellation, fired by the first progress event of the transfer.
    let origin = docker_file(http_repo(&setup, json!({})));
    let ws = Workspace::create(&work_root, "job-test").unwrap();
    let cancel = CancellationToken::new();
    let recorder = Arc::new(Recorder {
        cancel_on_progress: Some(cancel.clone()),
        ..Recorder::default()
    });
    let cx = stage_context(&ws, &origin, recorder, cancel);
    let err = fetcher("")
        .fetch(&origin, &cx)
        .await
        .err()
        .expect("cancelled");
    assert_eq!(err.class, ErrorClass::Cancelled, "{err}");
    drop(ws);
    assert!(std::fs::read_dir(&work_root).unwrap().next().is_none());
}

#[tokio::test]
async fn the_sealed_stream_equals_git_archive_minus_dockerignored_entries() {
    let root = tempfile::tempdir().unwrap();
    let work = root.path().join("work");
    std::fs::create_dir_all(work.join("app/src/nested")).unwrap();
    std::fs::create_dir_all(work.join("app/logs")).unwrap();
    std::fs::create_dir_all(work.join("outside")).unwrap();
    let files: &[(&str, &str)] = &[
        ("app/Dockerfile", "FROM scratch\nCOPY . /\n"),
        (
            "app/.dockerignore",
            "# build noise\n*.log\n!keep.log\nlogs\nsrc/**/*.tmp\n",
        ),
        ("app/main.go", "package main\n"),
        ("app/run.sh", "#!/bin/sh\necho hi\n"),
        ("app/keep.log", "kept\n"),
        ("app/debug.log", "ignored\n"),
        ("app/logs/a.txt", "ignored dir\n"),
        ("app/src/lib.go", "package src\n"),
        ("app/src/nested/x.tmp", "ignored\n"),
        ("app/src/nested/y.go", "package nested\n"),
        ("outside/secret.txt", "not in the context\n"),
    ];
    for (path, body) in files {
        std::fs::write(work.join(path), body).unwrap();
    }
    std::os::unix::fs::symlink("src/lib.go", work.join("app/link-to-lib")).unwrap();
    std::os::unix::fs::symlink("nested", work.join("app/src/dir-link")).unwrap();
    git(&work, &["init", "-q", "-b", "main"]);
    git(&work, &["add", "-A"]);
    git(&work, &["update-index", "--chmod=+x", "app/run.sh"]);
    // A submodule entry: git archive writes it as an empty directory.
    git(
        &work,
        &[
            "update-index",
            "--add",
            "--cacheinfo",
            "160000,1111111111111111111111111111111111111111,app/vendor-sub",
        ],
    );
    git(&work, &["commit", "-q", "-m", "fixture"]);
    let commit = git(&work, &["rev-parse", "HEAD"]);
    let repos = root.path().join("repos");
    clone_bare(&work, &repos.join("ctx.git"));
    let server = GitHttpServer::start(&repos, USER, PASSWORD);
    let details = json!({
        "repo": {"url": server.url("ctx.git"),
                 "auth": {"type": "http", "credentials": {"username": USER, "password": PASSWORD}}},
        "context_dir": "/app", "build_file": "/app/Dockerfile",
    });
    let (result, _, _ws) = fetch_with(&fetcher(""), &root.path().join("wr"), details).await;
    let source = result.unwrap();
    let ours = tar_entries(&context_bytes(&source));

    let archive = std::process::Command::new("git")
        .arg("-C")
        .arg(&work)
        .args(["-c", "tar.umask=022", "archive", "--format=tar"])
        .arg(format!("{commit}:app"))
        .output()
        .unwrap();
    assert!(archive.status.success());
    let ignored = ["debug.log", "logs", "logs/a.txt", "src/nested/x.tmp"];
    let expected: Vec<_> = tar_entries(&archive.stdout)
        .into_iter()
        .filter(|e| !ignored.contains(&e.0.as_str()))
        .collect();
    assert_eq!(ours, expected);
    // Not a vacuous comparison: the interesting entries are there.
    let names: Vec<&str> = ours.iter().map(|e| e.0.as_str()).collect();
    for name in [
        "keep.log",
        "run.sh",
        "link-to-lib",
        "src/dir-link",
        "vendor-sub",
    ] {
        assert!(names.contains(&name), "{name} missing from {names:?}");
    }
}

/// As `docker build` (and `git archive`) keep them: a symlink is sent as a symlink whatever its
/// target, absolute or out of the repository, and never followed; `context_dir` and
/// `build_file` are still never resolved through a link out of the repository.
#[tokio::test]
async fn symlinks_out_of_the_repository_are_kept_as_links_but_never_lead_the_build_there() {
    let root = tempfile::tempdir().unwrap();
    let work = root.path().join("work");
    std::fs::create_dir_all(work.join("app")).unwrap();
    std::fs::write(work.join("app/Dockerfile"), "FROM scratch\n").unwrap();
    for (link, target) in [
        ("app/config", "/etc/passwd"),
        ("app/up", "../../outside.txt"),
        ("etc", "/etc"),
        ("Dockerfile.abs", "/etc/passwd"),
    ] {
        std::os::unix::fs::symlink(target, work.join(link)).unwrap();
    }
    git(&work, &["init", "-q", "-b", "main"]);
    git(&work, &["add", "-A"]);
    git(&work, &["commit", "-q", "-m", "links"]);
    let repos = root.path().join("repos");
    clone_bare(&work, &repos.join("links.git"));
    let server = GitHttpServer::start(&repos, USER, PASSWORD);
    let details = |context_dir: &str, build_file: &str| {
        json!({
            "repo": {"url": server.url("links.git"),
                     "auth": {"type": "http", "credentials": {"username": USER, "password": PASSWORD}}},
            "context_dir": context_dir, "build_file": build_file,
        })
    };
    let work_root = root.path().join("wr");

    let (result, _, _ws) =
        fetch_with(&fetcher(""), &work_root, details("/app", "/app/Dockerfile")).await;
    let source = result.unwrap_or_else(|e| panic!("links are kept: {e}"));
    let entries: Vec<(String, u8, Option<String>)> = tar_entries(&context_bytes(&source))
        .into_iter()
        .map(|(name, _, kind, link, _)| (name, kind, link))
        .collect();
    let link = |name: &str, target: &str| (name.to_owned(), b'2', Some(target.to_owned()));
    assert_eq!(
        entries,
        [
            ("Dockerfile".to_owned(), b'0', None),
            link("config", "/etc/passwd"),
            link("up", "../../outside.txt"),
        ]
    );

    for (context_dir, build_file, words) in [
        (
            "/",
            "/Dockerfile.abs",
            &["build_file /Dockerfile.abs", "/etc/passwd"][..],
        ),
        ("/etc", "/app/Dockerfile", &["context_dir /etc", "/etc"][..]),
        (
            "/app/up",
            "/app/Dockerfile",
            &["context_dir /app/up", "../../outside.txt"][..],
        ),
    ] {
        let (result, _, _ws) =
            fetch_with(&fetcher(""), &work_root, details(context_dir, build_file)).await;
        let err = result.err().expect("must be refused");
        assert_failure(&err, ErrorClass::Permanent, ErrorCode::UnsafeSource, words);
    }
}

#[tokio::test]
async fn a_build_file_outside_the_context_is_added_under_a_reserved_name() {
    let setup = http_setup();
    let mut details = http_repo(&setup, json!({}));
    details["context_dir"] = json!("/");
    details["build_file"] = json!("/app/Dockerfile");
    let (result, _, _ws) = setup.fetch(details).await;
    let source = result.unwrap();
    assert_eq!(source.context.dockerfile(), "app/Dockerfile");

    let mut details = http_repo(&setup, json!({}));
    details["context_dir"] = json!("/app");
    details["build_file"] = json!("/version.txt");
    let (result, _, _ws) = setup.fetch(details).await;
    let source = result.unwrap();
    let name = source.context.dockerfile().to_owned();
    assert!(name.starts_with(".dockerfile."), "{name}");
    assert_eq!(dockerfile_text(&source), "three");
}

// ---- SSH ----

struct SshSetup {
    root: tempfile::TempDir,
    fixture: RevisionFixture,
    server: SshServer,
    protected: crate::support::git_servers::KeyPair,
    plain: crate::support::git_servers::KeyPair,
    stranger: crate::support::git_servers::KeyPair,
    known_hosts: std::path::PathBuf,
}

const PASSPHRASE: &str = "correct horse battery";

fn ssh_setup() -> SshSetup {
    let root = tempfile::tempdir().unwrap();
    let fixture = revision_fixture(root.path());
    let keys = root.path().join("keys");
    std::fs::create_dir_all(&keys).unwrap();
    let protected = ssh_key(&keys, "protected", "ecdsa", PASSPHRASE);
    let plain = ssh_key(&keys, "plain", "ed25519", "");
    let stranger = ssh_key(&keys, "stranger", "ed25519", "");
    let sshd_dir = root.path().join("sshd");
    std::fs::create_dir_all(&sshd_dir).unwrap();
    let server = SshServer::start(&sshd_dir, &[&protected.public, &plain.public]);
    let known_hosts = root.path().join("known_hosts");
    std::fs::write(&known_hosts, &server.known_hosts_line).unwrap();
    SshSetup {
        root,
        fixture,
        server,
        protected,
        plain,
        stranger,
        known_hosts,
    }
}

impl SshSetup {
    /// Fetches `details` with a fetcher trusting the server's host key, into a work root below
    /// `root`.
    async fn fetch(
        &self,
        details: serde_json::Value,
    ) -> (Result<FetchedSource, JobError>, Arc<Recorder>, Workspace) {
        fetch_with(
            &ssh_fetcher(&self.known_hosts),
            &self.root.path().join("wr"),
            details,
        )
        .await
    }
}

fn ssh_details(setup: &SshSetup, key: &str, passphrase: Option<&str>) -> serde_json::Value {
    let mut credentials = json!({"username": setup.server.user, "private_key": key});
    if let Some(p) = passphrase {
        credentials["passphrase"] = json!(p);
    }
    json!({
        "repo": {"url": setup.server.url(&setup.fixture.bare),
                 "auth": {"type": "ssh", "credentials": credentials}},
        "context_dir": "/app", "build_file": "/app/Dockerfile",
    })
}

fn ssh_fetcher(known_hosts: &Path) -> SourceFetcher {
    SourceFetcher::new(&config(&format!(
        "[git]\nknown_hosts_file = \"{}\"\n",
        known_hosts.display()
    )))
    .unwrap()
}

/// Issue 14: ssh (libssh2, its key exchange and the passphrase-protected key's decryption) in
/// the confined source child, under its seccomp allow list: the same revision and context as
/// in the worker's own process.
#[tokio::test(flavor = "multi_thread")]
async fn ssh_clone_in_the_confined_child_gives_the_same_revision_and_context() {
    let setup = ssh_setup();
    let details = ssh_details(&setup, &setup.protected.private, Some(PASSPHRASE));
    let config = config(&format!(
        "[git]\nknown_hosts_file = \"{}\"\n",
        setup.known_hosts.display()
    ));
    let confined = factoryd::sandbox::ConfinedFetcher::new(
        std::path::PathBuf::from(env!("CARGO_BIN_EXE_factoryd")),
        &config,
    );
    let work = setup.root.path().join("child");
    let cancel = CancellationToken::new();
    let (result, _, _ws) =
        fetch_details(&confined, &work, "job-child", details.clone(), cancel).await;
    let child = result.expect("ssh in the confined child");
    let (result, _, _ws2) = setup.fetch(details).await;
    let here = result.unwrap();
    assert_eq!(child.revision, here.revision);
    assert_eq!(context_bytes(&child), context_bytes(&here));
}

#[tokio::test]
async fn ssh_clone_with_a_passphrase_protected_key() {
    let setup = ssh_setup();
    let details = ssh_details(&setup, &setup.protected.private, Some(PASSPHRASE));
    let (result, _, _ws) = setup.fetch(details).await;
    let revision = result.unwrap().revision.unwrap();
    assert_eq!(revision.commit, setup.fixture.main_tip());
}

#[tokio::test]
async fn ssh_clone_with_an_unprotected_key() {
    let setup = ssh_setup();
    let details = ssh_details(&setup, &setup.plain.private, None);
    let (result, _, _ws) = setup.fetch(details).await;
    let source = result.unwrap();
    assert_eq!(source.revision.unwrap().commit, setup.fixture.main_tip());
}

#[tokio::test]
async fn ssh_with_a_key_the_server_does_not_know_is_permanent_auth_failed() {
    let setup = ssh_setup();
    let details = ssh_details(&setup, &setup.stranger.private, None);
    let (result, _, _ws) = setup.fetch(details).await;
    let err = result.err().expect("an unknown key must fail");
    assert_failure(&err, ErrorClass::Permanent, ErrorCode::AuthFailed, &[]);
    assert!(!err.message.contains("PRIVATE KEY"), "{err}");
}

/// Issue 14: a wrong passphrase failed as a transient internal error and was retried. The job's
/// own key cannot be used: permanent `auth_failed`, naming the passphrase, never echoing it.
#[tokio::test]
async fn ssh_with_a_wrong_passphrase_is_permanent_auth_failed() {
    let setup = ssh_setup();
    for passphrase in [Some("not the passphrase"), None] {
        let details = ssh_details(&setup, &setup.protected.private, passphrase);
        let (result, _, _ws) = setup.fetch(details).await;
        let err = result.err().expect("a wrong passphrase must fail");
        assert_eq!(err.code, ErrorCode::AuthFailed, "{passphrase:?}: {err}");
        assert_eq!(err.class, ErrorClass::Permanent, "{err}");
        assert!(err.message.contains("passphrase"), "{err}");
        assert!(!err.message.contains("not the passphrase"), "{err}");
        assert!(!err.message.contains("PRIVATE KEY"), "{err}");
    }
}

#[tokio::test]
async fn ssh_to_a_host_whose_key_is_not_known_is_refused() {
    let setup = ssh_setup();
    let empty = setup.root.path().join("empty_known_hosts");
    std::fs::write(&empty, "# nobody\n").unwrap();
    let details = ssh_details(&setup, &setup.plain.private, None);
    let (result, _, _ws) =
        fetch_with(&ssh_fetcher(&empty), &setup.root.path().join("wr"), details).await;
    let err = result.err().expect("an unknown host key must be refused");
    assert_eq!(err.class, ErrorClass::Permanent, "{err}");
    assert!(err.message.contains("host key"), "{err}");
}

#[tokio::test]
async fn a_branch_tip_fetch_brings_only_the_tip_commit() {
    // Regression: the advertisement probe once let libgit2 fetch all of HEAD's history.
    let setup = http_setup();
    let (result, _, ws) = setup.fetch(http_repo(&setup, json!({}))).await;
    result.unwrap();
    let repo = git2::Repository::open_bare(ws.path().join("source.git")).unwrap();
    assert!(repo.is_shallow());
    let tip = git2::Oid::from_str(setup.fixture.main_tip()).unwrap();
    assert!(repo.find_commit(tip).is_ok());
    for older in &setup.fixture.main[..2] {
        let oid = git2::Oid::from_str(older).unwrap();
        assert!(repo.find_commit(oid).is_err(), "{older} was fetched");
    }
}

fn submodule_details(server: &GitHttpServer, submodules: bool) -> serde_json::Value {
    json!({
        "repo": {"url": server.url("app-sub.git"), "submodules": submodules,
                 "auth": {"type": "http", "credentials": {"username": USER, "password": PASSWORD}}},
        "context_dir": "/app", "build_file": "/app/Dockerfile",
    })
}

/// Fetches the repository `app-sub.git` of `server` (`submodules` as the job's flag) with the
/// default fetcher, into a work root below `root`.
async fn fetch_submodules(
    server: &GitHttpServer,
    root: &Path,
    submodules: bool,
) -> (Result<FetchedSource, JobError>, Arc<Recorder>, Workspace) {
    let details = submodule_details(server, submodules);
    fetch_with(&fetcher(""), &root.join("wr"), details).await
}

/// Fetches the fixture's submodule from the job's own server; returns the refs of the
/// submodule's repository in the workspace (which tell how its commit was fetched).
async fn fetch_same_host_submodule(allow_reachable_hash: bool) -> String {
    let root = tempfile::tempdir().unwrap();
    let repos = root.path().join("repos");
    let fixture = submodule_fixture(&repos, &repos, Some("../lib.git"), None);
    if allow_reachable_hash {
        git(
            &repos.join("lib.git"),
            &["config", "uploadpack.allowReachableSHA1InWant", "true"],
        );
    }
    let server = GitHttpServer::start(&repos, USER, PASSWORD);
    let (result, _, _ws) = fetch_submodules(&server, root.path(), true).await;
    let source = result.unwrap();
    let entries = tar_entries(&context_bytes(&source));
    let file = |name: &str| {
        entries
            .iter()
            .find(|e| e.0 == name)
            .map(|e| String::from_utf8(e.4.clone()).unwrap())
    };
    // The pinned commit (not the submodule's tip), streamed under the gitlink's path.
    assert_ne!(fixture.lib_pinned, fixture.lib_tip);
    assert_eq!(file("lib.txt"), None);
    assert_eq!(file("lib/lib.txt").as_deref(), Some("lib one\n"));
    assert_eq!(file("lib/docs/readme.md").as_deref(), Some("# lib\n"));
    let lib = entries
        .iter()
        .find(|e| e.0 == "lib")
        .expect("lib directory");
    assert_eq!(lib.2, b'5', "lib is a directory");
    assert!(file("Dockerfile").is_some());
    // The submodule's repository was asked for with the job's credentials.
    assert!(server
        .requests()
        .iter()
        .any(|l| l.starts_with("200 ") && l.contains("/lib.git/")));
    git(&_ws.path().join("submodules/1.git"), &["for-each-ref"])
}

#[tokio::test]
async fn a_submodule_on_the_jobs_host_is_fetched_at_its_pinned_commit_when_asked_for() {
    // git http-backend announces no allow-reachable-sha1-in-want by default: libgit2 will not
    // ask for the bare hash, so the branches are fetched until the pinned commit shows up.
    let refs = fetch_same_host_submodule(false).await;
    assert!(refs.contains("refs/factoryd/heads/main"), "{refs}");
    assert!(!refs.contains("refs/factoryd/submodule"), "{refs}");
}

#[tokio::test]
async fn a_submodule_commit_is_fetched_by_hash_when_the_server_allows_it() {
    let refs = fetch_same_host_submodule(true).await;
    assert!(refs.contains("refs/factoryd/submodule"), "{refs}");
    assert!(!refs.contains("refs/factoryd/heads/"), "{refs}");
}

#[tokio::test]
async fn without_the_flag_a_real_submodule_is_an_empty_directory() {
    let root = tempfile::tempdir().unwrap();
    let repos = root.path().join("repos");
    submodule_fixture(&repos, &repos, Some("../lib.git"), None);
    let server = GitHttpServer::start(&repos, USER, PASSWORD);
    let (result, _, _ws) = fetch_submodules(&server, root.path(), false).await;
    let entries = tar_entries(&context_bytes(&result.unwrap()));
    let names: Vec<&str> = entries.iter().map(|e| e.0.as_str()).collect();
    assert!(names.contains(&"lib"), "{names:?}");
    assert!(!names.iter().any(|n| n.starts_with("lib/")), "{names:?}");
    assert!(!server.requests().iter().any(|l| l.contains("/lib.git/")));
}

#[tokio::test]
async fn the_jobs_credentials_are_not_offered_to_a_submodule_on_another_port() {
    let root = tempfile::tempdir().unwrap();
    let repos = root.path().join("repos");
    let other_repos = root.path().join("other-repos");
    std::fs::create_dir_all(&other_repos).unwrap();
    let other = GitHttpServer::start(&other_repos, "other-user", "other-Passw0rd");
    submodule_fixture(&repos, &other_repos, Some(&other.url("lib.git")), None);
    let server = GitHttpServer::start(&repos, USER, PASSWORD);
    let (result, _, _ws) = fetch_submodules(&server, root.path(), true).await;
    let err = result.err().expect("the other host wants its own password");
    assert_failure(
        &err,
        ErrorClass::Permanent,
        ErrorCode::AuthFailed,
        &["app/lib"],
    );
    assert!(!err.message.contains(PASSWORD), "{err}");
    // The other server was asked (anonymously), never with the job's credentials.
    use base64::Engine as _;
    let jobs = base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASSWORD}"));
    let requests = other.requests();
    assert!(
        requests.iter().any(|l| l.contains("/lib.git/")),
        "{requests:?}"
    );
    for line in &requests {
        assert!(line.ends_with("auth=-"), "{line}");
        assert!(!line.contains(&jobs), "{line}");
    }
}

/// The error of fetching, submodules on, a repository whose submodule has `url` in
/// `.gitmodules` (none: no entry) and is pinned at `commit` (none: the fixture's own pin).
async fn submodule_fetch_error(url: Option<&str>, commit: Option<&str>, why: &str) -> JobError {
    let root = tempfile::tempdir().unwrap();
    let repos = root.path().join("repos");
    submodule_fixture(&repos, &repos, url, commit);
    let server = GitHttpServer::start(&repos, USER, PASSWORD);
    let (result, _, _ws) = fetch_submodules(&server, root.path(), true).await;
    result.err().expect(why)
}

#[tokio::test]
async fn a_submodule_without_a_gitmodules_entry_is_a_permanent_error_naming_it() {
    let err = submodule_fetch_error(None, None, "no URL for the submodule").await;
    assert_failure(
        &err,
        ErrorClass::Permanent,
        ErrorCode::NotFound,
        &["\"app/lib\""],
    );
}

#[tokio::test]
async fn a_submodule_commit_its_repository_lacks_is_a_permanent_not_found_naming_it() {
    let missing = "2222222222222222222222222222222222222222";
    let err = submodule_fetch_error(
        Some("../lib.git"),
        Some(missing),
        "the pinned commit does not exist",
    )
    .await;
    assert_failure(
        &err,
        ErrorClass::Permanent,
        ErrorCode::NotFound,
        &["\"app/lib\"", missing],
    );
}

/// A repository under `repos/<name>` built by `hostile_tree_fixture`, served by http-backend.
fn hostile_setup(
    name: &str,
    dockerignore: &str,
    shape: Hostile,
) -> (tempfile::TempDir, GitHttpServer) {
    let root = tempfile::tempdir().unwrap();
    let repos = root.path().join("repos");
    std::fs::create_dir_all(&repos).unwrap();
    hostile_tree_fixture(&repos, name, dockerignore, shape);
    let server = GitHttpServer::start(&repos, USER, PASSWORD);
    (root, server)
}

fn hostile_details(server: &GitHttpServer, name: &str) -> serde_json::Value {
    json!({"repo": {
        "url": server.url(name),
        "auth": {"type": "http", "credentials": {"username": USER, "password": PASSWORD}},
    }})
}

/// What [`fetch_hostile`] fetched, with what must outlive the result.
struct HostileFetch {
    result: Result<FetchedSource, JobError>,
    _ws: Workspace,
    _server: GitHttpServer,
    _root: tempfile::TempDir,
}

/// Fetches the repository [`hostile_setup`] builds, with `extra_config`, and at most 300 s: a
/// guard against a walk hanging the suite, not a timing assertion.
async fn fetch_hostile(
    name: &str,
    dockerignore: &str,
    shape: Hostile,
    extra_config: &str,
) -> HostileFetch {
    let (root, server) = hostile_setup(name, dockerignore, shape);
    let (fetcher, work_root) = (fetcher(extra_config), root.path().join("work-root"));
    let fetch = fetch_with(&fetcher, &work_root, hostile_details(&server, name));
    let (result, _, ws) = tokio::time::timeout(Duration::from_secs(300), fetch)
        .await
        .expect("the walk must end");
    HostileFetch {
        result,
        _ws: ws,
        _server: server,
        _root: root,
    }
}

/// Issue 14: `*` plus an exception in `.dockerignore` over a tree of 10^8 paths ran for
/// minutes past the job's timeout, because excluded entries were walked but never counted.
/// They count now: the walk stops at `max_entries` with `limit_exceeded`.
#[tokio::test]
async fn a_huge_tree_behind_an_exception_stops_at_the_entry_cap() {
    let fetched = fetch_hostile(
        "wide.git",
        "*\n!**/keep\n",
        Hostile::Wide,
        "[sources]\nmax_entries = 10000\n",
    )
    .await;
    let err = fetched
        .result
        .err()
        .expect("10^8 walked entries are over the cap");
    assert_failure(
        &err,
        ErrorClass::Permanent,
        ErrorCode::LimitExceeded,
        &["max_entries"],
    );
}

/// Without an exception an excluded directory is not entered at all: the same tree seals
/// to the Dockerfile and `.dockerignore` alone.
#[tokio::test]
async fn a_huge_excluded_tree_without_exceptions_is_skipped() {
    let fetched = fetch_hostile(
        "wide.git",
        "*\n",
        Hostile::Wide,
        "[sources]\nmax_entries = 10000\n",
    )
    .await;
    let source = fetched.result.expect("an excluded tree is not walked");
    let names: Vec<String> = tar_entries(&context_bytes(&source))
        .into_iter()
        .map(|e| e.0)
        .collect();
    assert_eq!(names, [".dockerignore", "Dockerfile"]);
}

/// Issue 14: a tree thousands of directories deep overflowed the worker's stack (SIGABRT).
/// The walk keeps its own stack: the path caps end the job, and the process is still here to
/// say so.
#[tokio::test]
async fn a_tree_deeper_than_any_cap_is_limit_exceeded_not_a_crash() {
    let fetched = fetch_hostile(
        "deep.git",
        "*\n!**/keep\n",
        Hostile::Deep(5000),
        "[sources]\nmax_path_depth = 4096\n",
    )
    .await;
    let err = fetched
        .result
        .err()
        .expect("the tree is deeper than the caps");
    assert_failure(&err, ErrorClass::Permanent, ErrorCode::LimitExceeded, &[]);
}

fn endless_details(server: &EndlessRefs) -> serde_json::Value {
    json!({"repo": {"url": server.url}, "context_dir": "/", "build_file": "/Dockerfile"})
}

/// A fetcher that trusts the test CA for git over https.
fn tls_fetcher(extra_config: &str) -> SourceFetcher {
    let ca = test_tls().ca.display().to_string();
    fetcher(&format!("tls_ca_file = \"{ca}\"\n{extra_config}"))
}

/// Over https, libgit2 reaches the server through the fetch's egress proxy (CONNECT to the
/// address the egress policy allowed); TLS, the credentials and the revision rules work as
/// over http.
#[tokio::test]
async fn https_clone_through_the_egress_proxy_with_username_and_password() {
    let root = tempfile::tempdir().unwrap();
    let fixture = revision_fixture(root.path());
    let server = GitHttpServer::start_tls(&root.path().join("repos"), USER, PASSWORD);
    let details = server.app_details(USER, PASSWORD);
    let (result, _, _ws) = fetch_with(
        &tls_fetcher(""),
        &root.path().join("work-root"),
        details.clone(),
    )
    .await;
    let source = result.unwrap();
    assert_eq!(source.revision.clone().unwrap().commit, fixture.main_tip());
    assert!(dockerfile_text(&source).contains("# three"));
}

/// Issue 14: a git server that never stops advertising refs grew the worker to 5.5 GiB. The
/// advertisement now passes through the fetch's egress proxy, which cuts it off at
/// `git.max_ref_advertisement_bytes`.
#[tokio::test(flavor = "multi_thread")]
async fn a_server_that_never_stops_advertising_refs_is_cut_off_at_the_cap() {
    let root = tempfile::tempdir().unwrap();
    let server = EndlessRefs::start(root.path(), 0);
    let started = std::time::Instant::now();
    let (result, _, _ws) = fetch_with(
        &tls_fetcher("max_ref_advertisement_bytes = 1048576\n"),
        root.path(),
        endless_details(&server),
    )
    .await;
    let Err(err) = result else {
        panic!("an endless advertisement must fail")
    };
    assert_failure(
        &err,
        ErrorClass::Permanent,
        ErrorCode::LimitExceeded,
        &["git.max_ref_advertisement_bytes"],
    );
    assert_within(started, Duration::from_secs(20));
    // What the server got out: the cap plus what socket buffers hold, far below its 256 MiB.
    assert!(server.sent() < 16 << 20, "sent {} bytes", server.sent());
}

/// The same server, trickling (never silent long enough for `git.io_timeout_secs`): the
/// job's cancellation (and so its timeout) stops the fetch, though libgit2 never reaches a
/// callback that could see it.
#[tokio::test(flavor = "multi_thread")]
async fn a_trickling_advertisement_is_stopped_by_cancellation() {
    let root = tempfile::tempdir().unwrap();
    let server = EndlessRefs::start(root.path(), 5);
    let origin = docker_file(endless_details(&server));
    let workspace = Workspace::create(root.path(), "job-test").unwrap();
    let cancel = CancellationToken::new();
    let cx = stage_context(
        &workspace,
        &origin,
        Arc::new(Recorder::default()),
        cancel.clone(),
    );
    let fetcher = tls_fetcher("");
    let fetch = fetcher.fetch(&origin, &cx);
    tokio::pin!(fetch);
    // Cancelled once the advertisement flows (on a loaded machine the TLS handshake through
    // the egress proxy can take a while), so the cancellation meets a flowing fetch.
    let flowing = std::time::Instant::now();
    while server.sent() == 0 {
        assert!(
            flowing.elapsed() < Duration::from_secs(30),
            "the advertisement never started"
        );
        tokio::select! {
            _ = &mut fetch => panic!("the fetch ended before the advertisement flowed"),
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
    }
    cancel.cancel();
    let started = std::time::Instant::now();
    let Err(err) = fetch.await else {
        panic!("a cancelled fetch must fail")
    };
    assert_eq!(err.code, ErrorCode::Cancelled, "{err}");
    assert_within(started, Duration::from_secs(10));
}
