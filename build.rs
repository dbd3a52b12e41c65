//! Build-time facts for the test suite only; the daemon's code reads none of them.
//!
//! `cfg(fleet_netns)`: this machine can make network namespaces (the build runs with
//! CAP_SYS_ADMIN and CAP_NET_ADMIN, and iproute2's `ip` is installed), so the fleet tests
//! (`tests/integration/fleet.rs`) run. Without it they are compiled `#[ignore]`d, which libtest
//! reports by name as `ignored` and `scripts/test.sh` counts as skipped: a test cannot mark
//! itself ignored once it runs. `FACTORYD_TEST_NETNS=1` or `=0` overrides the probe (e.g. when
//! the tests run as another user than the build).

use std::path::Path;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(fleet_netns)");
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-env-changed=FACTORYD_TEST_NETNS");
    // The probe's answer changes with the user the build runs as.
    println!("cargo::rerun-if-env-changed=USER");
    let netns = match std::env::var("FACTORYD_TEST_NETNS").as_deref() {
        Ok("1") => true,
        Ok("0") => false,
        _ => can_make_network_namespaces(),
    };
    if netns {
        println!("cargo::rustc-cfg=fleet_netns");
    }
}

/// CAP_SYS_ADMIN (21, to create and mount namespaces) and CAP_NET_ADMIN (12, to make links)
/// in the effective set, and `ip` on a standard path.
fn can_make_network_namespaces() -> bool {
    const CAP_NET_ADMIN: u32 = 12;
    const CAP_SYS_ADMIN: u32 = 21;
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return false;
    };
    let effective = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .unwrap_or(0);
    let has = |cap: u32| effective & (1 << cap) != 0;
    let ip = ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"]
        .iter()
        .any(|p| Path::new(p).is_file());
    has(CAP_SYS_ADMIN) && has(CAP_NET_ADMIN) && ip && Path::new("/proc/self/ns/net").exists()
}
