//! Several hosts on one machine: a test network of Linux network namespaces.
//!
//! A [`TestNet`] is a *switch* namespace holding a bridge, and one namespace per host, each
//! joined to the bridge by a veth pair (`eth0` in the host, a port named after the host in the
//! switch). Host addresses are on [`SUBNET`], set inside the host namespaces only: the test
//! process's own namespace gets no link, address or route, and no namespace has a default
//! route, so nothing the tests start can reach — or be reached from — outside the machine.
//! Each test network is separate (its own bridge), so they all use the same subnet.
//!
//! A host is cut off by setting its switch port down (its traffic is dropped, as on a failed
//! link or switch port; the host itself sees no error) and healed by setting it up again.
//!
//! Names are `fdt-<pid>-<random>-<host>`, so parallel tests and test processes never collide;
//! namespaces left by a test process that died (its PID gone) are removed — their processes
//! killed by PID first — when the next test network is made. Dropping a [`TestNet`] kills what
//! still runs in its namespaces, by PID, and deletes them, whatever the test's outcome.
//!
//! Needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN) and iproute2; a test that uses it first asks
//! [`unavailable`], which reports it skipped, by name, where this machine lacks either.

use std::fs::File;
use std::net::Ipv4Addr;
use std::os::fd::AsFd;
use std::process::{Command, Stdio};

use rustix::thread::{move_into_link_name_space, LinkNameSpaceType};

use super::Host;

/// The test subnet: 10.213.0.0/24, inside the namespaces only.
pub const SUBNET: (Ipv4Addr, u8) = (Ipv4Addr::new(10, 213, 0, 0), 24);

const PREFIX: &str = "fdt-";
const BRIDGE: &str = "br0";

/// Runs `ip ARGS`; the error names the command and says what `ip` said.
fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// `ip ARGS`, panicking with what `ip` said.
fn ip_ok(args: &[&str]) {
    if let Err(e) = ip(args) {
        panic!("{e}");
    }
}

/// The names of the namespaces `ip netns list` shows.
fn namespaces() -> Vec<String> {
    Command::new("ip")
        .args(["netns", "list"])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// Kills every process in namespace `name`, by PID, then deletes the namespace.
fn remove_namespace(name: &str) {
    let pids = Command::new("ip")
        .args(["netns", "pids", name])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let own = std::process::id().to_string();
    // A test thread that entered a namespace never makes this process count as in it (only
    // the main thread does), but never kill ourselves whatever `ip` says.
    for pid in pids.split_whitespace().filter(|p| *p != own) {
        // It may have ended since `ip` listed it.
        let _ = Command::new("kill")
            .args(["-KILL", pid])
            .stderr(Stdio::null())
            .status();
    }
    // Killed processes leave the namespace as they are reaped; deletion only unmounts the
    // name, so the namespace itself goes with its last process.
    let _ = ip(&["netns", "del", name]);
}

/// Removes the test namespaces of test processes that no longer run (a crashed or killed run).
fn remove_stale() {
    for name in namespaces() {
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            eprintln!("removing namespace {name} left by test process {pid}");
            remove_namespace(&name);
        }
    }
}

/// A bridge in a namespace of its own, and hosts attached to it.
pub struct TestNet {
    prefix: String,
    switch: String,
    /// Host names, in the order they were added; a removed host is taken out.
    hosts: Vec<String>,
}

impl TestNet {
    /// Makes the switch namespace and its bridge. `Err` when namespaces cannot be made here.
    pub fn create() -> Result<TestNet, String> {
        remove_stale();
        let prefix = format!("{PREFIX}{}-{:08x}", std::process::id(), fastrand::u32(..));
        let switch = format!("{prefix}-switch");
        ip(&["netns", "add", &switch])?;
        let net = TestNet {
            prefix,
            switch,
            hosts: Vec::new(),
        };
        ip(&["-n", &net.switch, "link", "add", BRIDGE, "type", "bridge"])?;
        ip(&["-n", &net.switch, "link", "set", BRIDGE, "up"])?;
        Ok(net)
    }

    /// The namespace of host `host`.
    pub fn netns(&self, host: &str) -> String {
        format!("{}-{host}", self.prefix)
    }

    /// Adds host `host` (at most 15 characters: it names its switch port) at `ip`.
    pub fn add_host(&mut self, host: &str, ip: Ipv4Addr) -> Host {
        assert!(
            host.len() <= 15,
            "{host}: an interface name has at most 15 characters"
        );
        let netns = self.netns(host);
        ip_ok(&["netns", "add", &netns]);
        self.hosts.push(host.to_owned());
        let sw = self.switch.as_str();
        ip_ok(&["-n", &netns, "link", "set", "lo", "up"]);
        ip_ok(&[
            "-n", sw, "link", "add", host, "type", "veth", "peer", "name", "eth0", "netns", &netns,
        ]);
        ip_ok(&["-n", sw, "link", "set", host, "master", BRIDGE, "up"]);
        let address = format!("{ip}/{}", SUBNET.1);
        ip_ok(&["-n", &netns, "addr", "add", &address, "dev", "eth0"]);
        ip_ok(&["-n", &netns, "link", "set", "eth0", "up"]);
        Host {
            netns: Some(netns),
            ip,
        }
    }

    /// Cuts host `host` off: its switch port goes down, and every packet to or from it is
    /// dropped until [`TestNet::heal`].
    pub fn cut(&self, host: &str) {
        ip_ok(&["-n", &self.switch, "link", "set", host, "down"]);
    }

    pub fn heal(&self, host: &str) {
        ip_ok(&["-n", &self.switch, "link", "set", host, "up"]);
    }

    /// Removes host `host` for good: what runs in it is killed (by PID) and its namespace
    /// deleted (its veth pair goes with it).
    pub fn remove_host(&mut self, host: &str) {
        remove_namespace(&self.netns(host));
        self.hosts.retain(|h| h != host);
    }

    /// Moves the calling thread (only) into host `host`'s network until the guard is dropped:
    /// what it connects to and binds, and what it spawns, is on that host's network.
    pub fn enter(&self, host: &str) -> Entered {
        let own = File::open("/proc/thread-self/ns/net").expect("open this thread's namespace");
        let target = File::open(format!("/run/netns/{}", self.netns(host)))
            .unwrap_or_else(|e| panic!("open namespace of {host}: {e}"));
        move_into_link_name_space(target.as_fd(), Some(LinkNameSpaceType::Network))
            .unwrap_or_else(|e| panic!("enter namespace of {host}: {e}"));
        Entered {
            own,
            _this_thread: std::marker::PhantomData,
        }
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        for host in std::mem::take(&mut self.hosts) {
            remove_namespace(&self.netns(&host));
        }
        remove_namespace(&self.switch);
    }
}

/// The calling thread is on a test host's network until this is dropped (on that thread: it
/// is not `Send`).
pub struct Entered {
    own: File,
    _this_thread: std::marker::PhantomData<*const ()>,
}

impl Drop for Entered {
    fn drop(&mut self) {
        // Only this thread moved; moving back cannot fail short of a kernel error.
        let _ = move_into_link_name_space(self.own.as_fd(), Some(LinkNameSpaceType::Network));
    }
}

/// Whether this process cannot make network namespaces (no CAP_SYS_ADMIN and CAP_NET_ADMIN in
/// its effective set, or no `ip`), in which case the test `name` is reported skipped (the
/// caller then returns). `FACTORYD_TEST_NETNS=1` or `=0` overrides the probe.
pub fn unavailable(name: &str) -> bool {
    let netns = match std::env::var("FACTORYD_TEST_NETNS").as_deref() {
        Ok("1") => true,
        Ok("0") => false,
        _ => can_make_network_namespaces(),
    };
    if !netns {
        super::skipped(
            name,
            "needs root: network namespaces (CAP_SYS_ADMIN, CAP_NET_ADMIN) and iproute2",
        );
    }
    !netns
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
        .any(|p| std::path::Path::new(p).is_file());
    has(CAP_SYS_ADMIN)
        && has(CAP_NET_ADMIN)
        && ip
        && std::path::Path::new("/proc/self/ns/net").exists()
}
