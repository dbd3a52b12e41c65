//! Test harness: real servers on free loopback ports, stopped when dropped.
//!
//! Nothing here installs anything (`scripts/install-test-deps.sh` does); a missing server binary
//! fails the test with a message naming the package. No fixed ports, no global state.

#![allow(dead_code)]

pub mod http;
pub mod import;
pub mod nats;
pub mod netns;
pub mod prometheus;
pub mod registry;
pub mod run;

use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Where `free_port` hands out ports: below Linux's default ephemeral range (32768-60999), so
/// neither an outgoing connection nor a bind to port 0 can take a port between the moment it
/// is handed out and the moment its server binds it.
const PORTS: std::ops::Range<u16> = 20_000..32_000;

/// A free TCP port on 127.0.0.1 for a server to bind: a random one of `PORTS`, checked free
/// by binding it once. Two tests would collide only by drawing the same port within the few
/// milliseconds before their servers bind.
pub fn free_port() -> u16 {
    for _ in 0..1000 {
        let port = fastrand::u16(PORTS);
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port on 127.0.0.1 in {PORTS:?}");
}

/// Where a server the harness starts runs: this process's own network, on loopback (most
/// tests), or a host of a [`netns::TestNet`] (its own network namespace and address).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    /// `None`: the test process's own network namespace.
    pub netns: Option<String>,
    pub ip: Ipv4Addr,
}

impl Host {
    pub fn loopback() -> Host {
        Host {
            netns: None,
            ip: Ipv4Addr::LOCALHOST,
        }
    }

    /// A command running `program` on this host. In a namespace that is `ip netns exec NS
    /// program`, and `ip` execs the program, so the child's PID is the program's own.
    pub fn command(&self, program: &str) -> Command {
        match &self.netns {
            None => Command::new(program),
            Some(netns) => {
                let mut cmd = Command::new("ip");
                cmd.args(["netns", "exec", netns, program]);
                cmd
            }
        }
    }

    /// A port for a server to bind on this host: a free one on loopback; `fixed` in a
    /// namespace, which is the test's alone (so no other test can hold that port there).
    pub fn port(&self, fixed: u16) -> u16 {
        match self.netns {
            None => free_port(),
            Some(_) => fixed,
        }
    }

    pub fn addr(&self, port: u16) -> SocketAddr {
        SocketAddr::from((self.ip, port))
    }
}

/// Waits until something accepts TCP connections on `addr`, or panics after `timeout`.
pub fn wait_for_port(addr: SocketAddr, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("nothing listens on {addr} after {timeout:?}");
}

/// Fails with the Debian package to install when `program` is missing.
pub fn require_program(program: &str, package: &str) {
    let found = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|p| p.join(program).is_file()))
        .unwrap_or(false)
        || Path::new(program).is_file();
    assert!(
        found,
        "{program} not found: install the Debian package {package} (scripts/install-test-deps.sh)"
    );
}

/// Asserts that less than `limit` has passed since `since`; the panic shows how long it was.
#[track_caller]
pub fn assert_within(since: Instant, limit: Duration) {
    let taken = since.elapsed();
    assert!(taken < limit, "{taken:?}");
}

/// Asserts that the process that gave `out` succeeded; the panic names `what` and shows its
/// stderr.
#[track_caller]
pub fn assert_success(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A spawned server process, killed (and reaped) when dropped.
pub struct ChildGuard {
    pub name: String,
    pub child: Child,
}

impl ChildGuard {
    pub fn spawn(name: &str, command: &mut Command) -> ChildGuard {
        let child = command
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        ChildGuard {
            name: name.to_owned(),
            child,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// True while the process has not exited.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub mod buildkitd;
pub mod docker;
pub mod failure;
#[cfg(feature = "test-util")]
pub mod fleet;
pub mod git_servers;
pub mod http_files;
pub mod sources;

/// Reports the test `name` skipped for `reason` (the caller then returns): on stderr, and as a
/// line of the file `FACTORYD_TEST_SKIPS` names, which `scripts/test.sh` counts as skipped and
/// lists by name (libtest itself has no run-time skip: the test shows as passed there).
pub fn skipped(name: &str, reason: &str) {
    use std::io::Write;
    eprintln!("skipped: {name} ({reason})");
    if let Some(path) = std::env::var_os("FACTORYD_TEST_SKIPS") {
        let line = format!("{name} ({reason})\n");
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .and_then(|mut f| f.write_all(line.as_bytes()))
            .expect("record a skipped test in FACTORYD_TEST_SKIPS");
    }
}
