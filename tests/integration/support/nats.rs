//! `nats-server -js` on free loopback ports: one server, or a 3-node cluster (also one server
//! per host of a test network); and a client side for tests (publish jobs, read results) built
//! on factoryd's own NATS adapter.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{free_port, require_program, wait_for_port, ChildGuard, Host};

pub struct NatsServer {
    pub host: Host,
    pub port: u16,
    extra_args: Vec<String>,
    pub cluster_port: u16,
    pub name: String,
    store: PathBuf,
    /// Cluster route URLs (every node's, its own included).
    routes: Vec<String>,
    guard: Option<ChildGuard>,
}

impl NatsServer {
    /// A single JetStream server with its store under `dir`.
    pub fn start(dir: &Path) -> NatsServer {
        Self::start_node(
            "n0",
            dir,
            Host::loopback(),
            (free_port(), free_port()),
            &[],
            &[],
        )
    }

    /// A single JetStream server with extra command-line arguments (e.g. `--auth TOKEN`).
    pub fn start_with(dir: &Path, args: &[&str]) -> NatsServer {
        require_program("nats-server", "nats-server");
        let mut s = NatsServer {
            host: Host::loopback(),
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

    fn start_node(
        name: &str,
        dir: &Path,
        host: Host,
        (port, cluster_port): (u16, u16),
        routes: &[String],
        extra_args: &[String],
    ) -> NatsServer {
        require_program("nats-server", "nats-server");
        let mut s = NatsServer {
            host,
            port,
            extra_args: extra_args.to_vec(),
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
        let ip = self.host.ip.to_string();
        let mut cmd = self.host.command("nats-server");
        cmd.args(["-js", "-a", &ip, "-p", &self.port.to_string()])
            .arg("-sd")
            .arg(&self.store)
            .args(["-n", &self.name])
            .args(&self.extra_args);
        if !self.routes.is_empty() {
            cmd.args(["--cluster_name", "factoryd-test"])
                .args(["--cluster", &format!("nats://{ip}:{}", self.cluster_port)])
                .args(["--routes", &self.routes.join(",")]);
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.store.with_extension("log"))
            .expect("open the nats-server log");
        cmd.stdout(std::process::Stdio::null()).stderr(log);
        self.guard = Some(ChildGuard::spawn("nats-server", &mut cmd));
        wait_for_port(self.host.addr(self.port), Duration::from_secs(10));
    }

    pub fn url(&self) -> String {
        format!("nats://{}:{}", self.host.ip, self.port)
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
    cluster_on(
        dir,
        &[Host::loopback(), Host::loopback(), Host::loopback()],
        "",
    )
}

/// One JetStream server per host, in one cluster; server `i` is named `n{i}`. In a namespace a
/// server listens on 4222 (clients) and 6222 (routes) of its host's address, with `config`
/// (nats-server configuration text, e.g. ping and write-deadline settings) when not empty.
pub fn cluster_on(dir: &Path, hosts: &[Host], config: &str) -> Vec<NatsServer> {
    let ports: Vec<(u16, u16)> = hosts.iter().map(|h| (h.port(4222), h.port(6222))).collect();
    let routes: Vec<String> = hosts
        .iter()
        .zip(&ports)
        .map(|(h, (_, cluster))| format!("nats://{}:{cluster}", h.ip))
        .collect();
    let extra_args = if config.is_empty() {
        Vec::new()
    } else {
        let path = dir.join("nats-server.conf");
        std::fs::write(&path, config).expect("write the nats-server config");
        vec!["-c".to_owned(), path.display().to_string()]
    };
    hosts
        .iter()
        .zip(&ports)
        .enumerate()
        .map(|(i, (host, (port, cluster)))| {
            NatsServer::start_node(
                &format!("n{i}"),
                dir,
                host.clone(),
                (*port, *cluster),
                &routes,
                &extra_args,
            )
        })
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
