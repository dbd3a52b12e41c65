//! `nats-server -js` on free loopback ports: one server, or a 3-node cluster; and a client
//! side for tests (publish jobs, read results) built on factoryd's own NATS adapter.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::{free_port, require_program, wait_for_port, ChildGuard};

pub struct NatsServer {
    pub port: u16,
    extra_args: Vec<String>,
    pub cluster_port: u16,
    pub name: String,
    store: PathBuf,
    routes: Vec<u16>,
    guard: Option<ChildGuard>,
}

impl NatsServer {
    /// A single JetStream server with its store under `dir`.
    pub fn start(dir: &Path) -> NatsServer {
        Self::start_node("n0", dir, free_port(), &[])
    }

    /// A single JetStream server with extra command-line arguments (e.g. `--auth TOKEN`).
    pub fn start_with(dir: &Path, args: &[&str]) -> NatsServer {
        require_program("nats-server", "nats-server");
        let mut s = NatsServer {
            port: free_port(),
            extra_args: args.iter().map(|a| a.to_string()).collect(),
            cluster_port: free_port(),
            name: "n0".to_owned(),
            store: dir.join("n0"),
            routes: Vec::new(),
            guard: None,
        };
        s.spawn();
        s
    }

    fn start_node(name: &str, dir: &Path, cluster_port: u16, routes: &[u16]) -> NatsServer {
        require_program("nats-server", "nats-server");
        let mut s = NatsServer {
            port: free_port(),
            extra_args: Vec::new(),
            cluster_port,
            name: name.to_owned(),
            store: dir.join(name),
            routes: routes.to_vec(),
            guard: None,
        };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        let mut cmd = Command::new("nats-server");
        cmd.args(["-js", "-a", "127.0.0.1", "-p", &self.port.to_string()])
            .arg("-sd")
            .arg(&self.store)
            .args(["-n", &self.name])
            .args(&self.extra_args);
        if !self.routes.is_empty() {
            let routes: Vec<String> = self
                .routes
                .iter()
                .map(|p| format!("nats://127.0.0.1:{p}"))
                .collect();
            cmd.args(["--cluster_name", "factoryd-test"])
                .args([
                    "--cluster",
                    &format!("nats://127.0.0.1:{}", self.cluster_port),
                ])
                .args(["--routes", &routes.join(",")]);
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.store.with_extension("log"))
            .expect("open the nats-server log");
        cmd.stdout(std::process::Stdio::null()).stderr(log);
        self.guard = Some(ChildGuard::spawn("nats-server", &mut cmd));
        wait_for_port(([127, 0, 0, 1], self.port).into(), Duration::from_secs(10));
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn stop(&mut self) {
        self.guard = None;
    }

    /// Starts again on the same port with the same store.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// The server's log (stderr), for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.store.with_extension("log")).unwrap_or_default()
    }

    pub fn is_running(&self) -> bool {
        self.guard.is_some()
    }
}

/// Three JetStream servers in one cluster on loopback.
pub fn cluster(dir: &Path) -> Vec<NatsServer> {
    let cluster_ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    (0..3)
        .map(|i| NatsServer::start_node(&format!("n{i}"), dir, cluster_ports[i], &cluster_ports))
        .collect()
}

/// A config file for a worker (or `submit`) against `servers`. The metrics endpoint takes a
/// port the kernel picks when it binds (a port picked earlier could be taken by then); the
/// worker logs the address it got.
pub fn write_config(
    dir: &Path,
    name: &str,
    servers: &[String],
    replicas: u32,
    extra: &str,
) -> PathBuf {
    let servers: Vec<String> = servers.iter().map(|s| format!("{s:?}")).collect();
    let text = format!(
        "[nats]\nservers = [{}]\nreplicas = {replicas}\nack_wait_secs = 6\n\
         [worker]\nname = \"{name}\"\nwork_root = \"{}\"\n\
         retry_base_delay_secs = 1\nretry_max_delay_secs = 2\n{extra}\n\
         [destination]\npath = \"{}\"\n[log]\nformat = \"text\"\nlevel = \"info,async_nats=warn\"\n\
         [metrics]\nlisten = \"127.0.0.1:0\"\n",
        servers.join(", "),
        dir.join(format!("work-{name}")).display(),
        dir.join("store").display(),
    );
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).expect("write config");
    path
}

/// A waiting pull of at most one message from `consumer`, ending after `expires`.
pub async fn pull_at_most_one(
    consumer: &async_nats::jetstream::consumer::PullConsumer,
    expires: Duration,
) -> async_nats::jetstream::consumer::pull::Batch {
    consumer
        .batch()
        .max_messages(1)
        .expires(expires)
        .messages()
        .await
        .unwrap()
}
