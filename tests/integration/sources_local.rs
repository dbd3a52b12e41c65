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

    std::os::unix::fs::symlink("/etc/passwd", root.join("app/escape")).unwrap();
    let err = factoryd::adapters::local::seal(
        root,
        "/app",
        "/app/Dockerfile",
        limits,
        Default::default(),
    )
    .map(|_| ())
    .expect_err("an escaping symlink is refused");
    assert_eq!(err.code, ErrorCode::UnsafeSource, "{err}");
}
