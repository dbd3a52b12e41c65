//! A developer's directory (`factoryd run`) sealed by the same rules as fetched sources.

use factoryd::error::ErrorCode;

use crate::support::sources::{config, tar_entries};

#[test]
fn a_local_directory_seals_like_a_fetched_source() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::create_dir_all(root.join("app/tmp")).unwrap();
    std::fs::write(root.join("app/Dockerfile"), "FROM scratch\n").unwrap();
    std::fs::write(root.join("app/.dockerignore"), "tmp\n").unwrap();
    std::fs::write(root.join("app/tmp/junk"), "x").unwrap();
    std::os::unix::fs::symlink("Dockerfile", root.join("app/df-link")).unwrap();
    let limits = factoryd::context::Limits::from_config(&config("").sources);
    let sealed = factoryd::adapters::local::seal(
        root,
        "/app",
        "/app/Dockerfile",
        limits,
        Default::default(),
    )
    .unwrap();
    let mut out = Vec::new();
    sealed.write_tar(&mut out).unwrap();
    let names: Vec<String> = tar_entries(&out).into_iter().map(|e| e.0).collect();
    assert_eq!(names, [".dockerignore", "Dockerfile", "df-link"]);
}

/// As `docker build` keeps them: a link out of the directory is sent as a link, never followed.
#[test]
fn a_symlink_out_of_the_directory_is_kept_as_a_link() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::create_dir_all(root.join("app")).unwrap();
    std::fs::write(root.join("app/Dockerfile"), "FROM scratch\n").unwrap();
    std::os::unix::fs::symlink("/etc/passwd", root.join("app/config")).unwrap();
    std::os::unix::fs::symlink("../outside.txt", root.join("app/up")).unwrap();
    let limits = factoryd::context::Limits::from_config(&config("").sources);
    let sealed = factoryd::adapters::local::seal(
        root,
        "/app",
        "/app/Dockerfile",
        limits,
        Default::default(),
    )
    .unwrap_or_else(|e| panic!("links are kept: {e}"));
    let mut out = Vec::new();
    sealed.write_tar(&mut out).unwrap();
    let entries: Vec<(String, u8, Option<String>)> = tar_entries(&out)
        .into_iter()
        .map(|(name, _, kind, link, _)| (name, kind, link))
        .collect();
    assert_eq!(
        entries,
        [
            ("Dockerfile".to_owned(), b'0', None),
            ("config".to_owned(), b'2', Some("/etc/passwd".to_owned())),
            ("up".to_owned(), b'2', Some("../outside.txt".to_owned())),
        ]
    );
}

#[test]
fn a_build_file_through_a_symlink_out_of_the_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::create_dir_all(root.join("app")).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", root.join("app/Dockerfile")).unwrap();
    let limits = factoryd::context::Limits::from_config(&config("").sources);
    let err = factoryd::adapters::local::seal(
        root,
        "/app",
        "/app/Dockerfile",
        limits,
        Default::default(),
    )
    .map(|_| ())
    .expect_err("a build file out of the directory is refused");
    assert_eq!(err.code, ErrorCode::UnsafeSource, "{err}");
    assert!(err.message.contains("build_file /app/Dockerfile"), "{err}");
}
