//! A Docker Engine for the build tests: Debian's `dockerd` on a private unix socket, data and
//! exec roots in a temporary directory, and its own network bridge (a RUN step needs one; a
//! private name keeps it off any other engine's `docker0`). One engine is shared by the tests
//! that run at the same time: each holds an `Arc`, the last one to finish stops it (SIGTERM, so
//! that dockerd also stops the containerd it started), and a later test starts a new one.
//!
//! Also: base images made here from Debian's busybox-static and pushed into test registries,
//! and the Debian `docker` client (not the newer one first on PATH) for baselines and checks.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use super::{assert_success, require_program};

/// The Debian client that matches the engine and builds with BuildKit.
pub const DOCKER_CLI: &str = "/usr/bin/docker";

static SHARED: Mutex<Weak<Engine>> = Mutex::new(Weak::new());
static BRIDGES: AtomicU32 = AtomicU32::new(0);

pub struct Engine {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    bridge: String,
    child: Mutex<Child>,
}

impl Engine {
    /// The engine shared by the tests running now; started when there is none.
    pub fn shared() -> Arc<Engine> {
        let mut shared = SHARED.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(engine) = shared.upgrade() {
            return engine;
        }
        let engine = Arc::new(Engine::start());
        *shared = Arc::downgrade(&engine);
        engine
    }

    /// An engine of the caller's own, for tests that count what the engine holds.
    pub fn private() -> Engine {
        Engine::start()
    }

    /// How many file descriptors dockerd holds open (its client connections among them).
    pub fn open_fds(&self) -> usize {
        let pid = self.child.lock().unwrap_or_else(|e| e.into_inner()).id();
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    fn start() -> Engine {
        require_program("dockerd", "docker.io");
        require_program("ip", "iproute2");
        let dir = tempfile::Builder::new()
            .prefix("fdk-engine")
            .tempdir()
            .expect("tempdir");
        let n = BRIDGES.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let bridge = format!("fdk{:x}{n}", pid % 0xffff);
        // 10.213–10.252.x.0/24: private, chosen by pid so that two test runs differ.
        let subnet = format!("10.{}.{}.1/24", 213 + (pid % 40), n % 250);
        for args in [
            vec!["link", "add", &bridge, "type", "bridge"],
            vec!["addr", "add", &subnet, "dev", &bridge],
            vec!["link", "set", &bridge, "up"],
        ] {
            let status = Command::new("ip").args(&args).status().expect("run ip");
            assert!(
                status.success(),
                "ip {args:?} failed (the build tests run as root)"
            );
        }
        let socket = dir.path().join("docker.sock");
        let log = std::fs::File::create(dir.path().join("dockerd.log")).expect("log file");
        let child = Command::new("dockerd")
            .arg("--host")
            .arg(format!("unix://{}", socket.display()))
            .arg("--data-root")
            .arg(dir.path().join("data"))
            .arg("--exec-root")
            .arg(dir.path().join("exec"))
            .arg("--pidfile")
            .arg(dir.path().join("dockerd.pid"))
            .arg("--bridge")
            .arg(&bridge)
            .args(["--iptables=false", "--ip-masq=false", "--ip-forward=false"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn dockerd");
        let engine = Engine {
            dir,
            socket,
            bridge,
            child: Mutex::new(child),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ping = engine.docker(&["version", "--format", "{{.Server.Version}}"]);
            if ping.status.success() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "dockerd did not answer: {}",
                engine.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        engine
    }

    /// `unix:///…/docker.sock`.
    pub fn host(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("dockerd.log")).unwrap_or_default()
    }

    /// The Debian client against this engine, with BuildKit, and a private client config
    /// directory (logins never touch the user's).
    pub fn docker_command(&self) -> Command {
        self.docker_command_in(&self.dir.path().join("client"))
    }

    /// The client with its own config directory `client` (where `login_in` stored logins):
    /// tests running at once must not rewrite one `config.json` together.
    pub fn docker_command_in(&self, client: &Path) -> Command {
        require_program(DOCKER_CLI, "docker.io");
        let mut cmd = Command::new(DOCKER_CLI);
        cmd.env("DOCKER_HOST", self.host())
            .env("DOCKER_BUILDKIT", "1")
            .env("DOCKER_CONFIG", client);
        cmd
    }

    pub fn docker(&self, args: &[&str]) -> Output {
        self.docker_in(&self.dir.path().join("client"), args)
    }

    pub fn docker_in(&self, client: &Path, args: &[&str]) -> Output {
        self.docker_command_in(client)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run docker")
    }

    /// Runs `docker ARGS` and returns stdout; panics with stderr on failure.
    pub fn docker_ok(&self, args: &[&str]) -> String {
        self.docker_ok_in(&self.dir.path().join("client"), args)
    }

    pub fn docker_ok_in(&self, client: &Path, args: &[&str]) -> String {
        let out = self.docker_in(client, args);
        assert_success(&out, &format!("docker {args:?} failed"));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Logs a new client config directory in to `host` (for the tests' own pushes and pulls);
    /// use it with the `*_in` methods.
    pub fn login(&self, host: &str, user: &str, password: &str) -> tempfile::TempDir {
        let client = tempfile::tempdir().expect("client config dir");
        let mut child = self
            .docker_command_in(client.path())
            .args(["login", "--username", user, "--password-stdin", host])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("docker login");
        {
            use std::io::Write;
            let mut stdin = child.stdin.take().expect("stdin");
            stdin.write_all(password.as_bytes()).expect("password");
        }
        let out = child.wait_with_output().expect("docker login");
        assert_success(&out, &format!("docker login {host}"));
        client
    }

    /// Builds a busybox base image from scratch (Debian's busybox-static), with `marker`
    /// written to `/etc/base-marker`, pushes it as `host/repository:tag` (logged in as `user`)
    /// and removes it from the engine again.
    pub fn push_base_image(
        &self,
        host: &str,
        user: &str,
        password: &str,
        name: &str,
        marker: &str,
    ) {
        require_program("/bin/busybox", "busybox-static");
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::copy("/bin/busybox", dir.path().join("busybox")).expect("copy busybox");
        std::fs::write(
            dir.path().join("Dockerfile"),
            format!(
                "FROM scratch\nCOPY busybox /bin/busybox\n\
                 RUN [\"/bin/busybox\", \"--install\", \"-s\", \"/bin\"]\n\
                 RUN [\"/bin/busybox\", \"sh\", \"-c\", \"echo {marker} > /etc/base-marker\"]\n"
            ),
        )
        .expect("Dockerfile");
        let reference = format!("{host}/{name}");
        self.docker_ok(&[
            "build",
            "-q",
            "-t",
            &reference,
            &dir.path().to_string_lossy(),
        ]);
        let client = self.login(host, user, password);
        self.docker_ok_in(client.path(), &["push", &reference]);
        self.docker_ok(&["rmi", &reference]);
    }

    /// The engine's build cache in bytes as `docker system df` counts it (its records not
    /// shared with an image), read from the engine's `/system/df` with curl, independently of
    /// factoryd's own code; and how many records it has.
    pub fn build_cache_bytes(&self) -> (u64, usize) {
        require_program("curl", "curl");
        let out = Command::new("curl")
            .args(["--silent", "--show-error", "--fail", "--unix-socket"])
            .arg(&self.socket)
            .arg("http://docker-engine/v1.41/system/df")
            .output()
            .expect("run curl");
        assert!(
            out.status.success(),
            "GET /system/df: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let df: serde_json::Value = serde_json::from_slice(&out.stdout).expect("df JSON");
        let records = df["BuildCache"].as_array().cloned().unwrap_or_default();
        let bytes = records
            .iter()
            .filter(|r| !r["Shared"].as_bool().unwrap_or(false))
            .map(|r| r["Size"].as_u64().unwrap_or(0))
            .sum();
        (bytes, records.len())
    }

    /// Whether any process on the machine has `needle` in its command line.
    pub fn process_running(needle: &str) -> bool {
        let out = Command::new("ps")
            .args(["-eo", "args"])
            .output()
            .expect("run ps");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .any(|l| l.contains(needle) && !l.contains("ps -eo"))
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        let mut child = self.child.lock().unwrap_or_else(|e| e.into_inner());
        // SIGTERM: dockerd stops its containers and the containerd it started.
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if matches!(child.try_wait(), Ok(Some(_))) {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .status();
        // Leftover mounts under the data root would make the temp dir's removal fail loudly.
        let _ = Command::new("umount")
            .args(["-R", "-l"])
            .arg(self.dir.path().join("data"))
            .stderr(Stdio::null())
            .status();
    }
}

/// A directory path as `&str` for command arguments.
pub fn path_str(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}
