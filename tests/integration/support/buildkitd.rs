//! A standalone buildkitd of a test's own: its own root (so its cache starts empty) and unix
//! socket in a temporary directory, stopped when dropped. For tests that need a builder whose
//! cache they may wipe ("another node"), which the shared buildkitd of
//! `FACTORYD_TEST_BUILDKITD` must never have. The binary is `FACTORYD_TEST_BUILDKITD_BIN`
//! (BuildKit v0.11.6 here); without it such tests report themselves skipped. Needs root, as
//! buildkitd's OCI worker does.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::ChildGuard;

/// The environment variable naming the buildkitd binary.
pub const BIN_VAR: &str = "FACTORYD_TEST_BUILDKITD_BIN";

pub struct PrivateBuildkitd {
    /// The socket, as `builder.buildkitd_addr` names it: `unix:///…/buildkitd.sock`.
    pub addr: String,
    pub socket: PathBuf,
    dir: tempfile::TempDir,
    child: Option<ChildGuard>,
}

impl PrivateBuildkitd {
    /// The binary `FACTORYD_TEST_BUILDKITD_BIN` names, if set.
    pub fn binary() -> Option<PathBuf> {
        std::env::var_os(BIN_VAR)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    }

    /// Starts one on an empty root and waits until its socket answers.
    pub fn start(binary: &std::path::Path) -> PrivateBuildkitd {
        let dir = tempfile::Builder::new()
            .prefix("fdk-buildkitd")
            .tempdir()
            .expect("tempdir");
        let socket = dir.path().join("buildkitd.sock");
        let addr = format!("unix://{}", socket.display());
        let log = std::fs::File::create(dir.path().join("buildkitd.log")).expect("log file");
        let child = ChildGuard::spawn(
            "buildkitd",
            Command::new(binary)
                .arg("--addr")
                .arg(&addr)
                .arg("--root")
                .arg(dir.path().join("root"))
                .args(["--oci-worker=true", "--containerd-worker=false"])
                .stdout(Stdio::null())
                .stderr(log),
        );
        let daemon = PrivateBuildkitd {
            addr,
            socket,
            dir,
            child: Some(child),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::os::unix::net::UnixStream::connect(&daemon.socket).is_err() {
            assert!(
                Instant::now() < deadline,
                "buildkitd did not listen: {}",
                daemon.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        daemon
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("buildkitd.log")).unwrap_or_default()
    }
}

impl Drop for PrivateBuildkitd {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGTERM first: buildkitd then unmounts its snapshots itself.
            let _ = Command::new("kill")
                .args(["-TERM", &child.pid().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while child.is_running() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        // Whatever is still mounted under the root would make the directory's removal fail.
        let root = self.dir.path().to_string_lossy().into_owned();
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        let mut under: Vec<&str> = mounts
            .lines()
            .filter_map(|line| line.split(' ').nth(1))
            .filter(|point| point.starts_with(&root))
            .collect();
        under.sort_by_key(|point| std::cmp::Reverse(point.len()));
        for point in under {
            let _ = Command::new("umount")
                .args(["-l", point])
                .stderr(Stdio::null())
                .status();
        }
    }
}
