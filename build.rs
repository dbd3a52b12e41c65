//! Only for the integration tests: `FACTORYD_TEST_BUILDKITD` (a standalone buildkitd's address,
//! `unix:///…` or `tcp://…`) turns on the cfg `factoryd_test_buildkitd`, under which the build
//! tests against a standalone buildkitd run; without it they are compiled `#[ignore]`d, so
//! `cargo test` lists them as ignored and `scripts/test.sh` counts them as skipped, by name.
//! libtest cannot decide at run time that a test is skipped, hence a compile-time switch; cargo
//! builds again when the variable changes. Nothing in the daemon reads the cfg.

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-env-changed=FACTORYD_TEST_BUILDKITD");
    println!("cargo::rustc-check-cfg=cfg(factoryd_test_buildkitd)");
    if std::env::var_os("FACTORYD_TEST_BUILDKITD").is_some_and(|v| !v.is_empty()) {
        println!("cargo::rustc-cfg=factoryd_test_buildkitd");
    }
}
