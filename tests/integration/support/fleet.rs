//! A fleet on one machine: nodes on separate network hosts, each running a `nats-server` (one
//! cluster; streams and the KV bucket R3) and a `factoryd serve` (the binary under test, with
//! its real stages), and one more host, `infra`, with the source and destination registries
//! (`docker-registry`), each behind a [`WatchProxy`] that notes which node asked for what.
//!
//! ```text
//!             switch namespace: br0 ── node-1, node-2, node-3, infra  (10.213.0.0/24)
//!  node-N  10.213.0.1N   nats-server n{N-1} (:4222, routes :6222) + factoryd serve (:9464)
//!  infra   10.213.0.2    source registry :5000 ◀─ proxy ◀─┐
//!                        destination    :5001 ◀─ proxy ◀──┴─ workers;  the test's client
//! ```
//!
//! The test's own thread moves onto `infra`'s network (only that thread: see
//! [`TestNet::enter`]), so its NATS client, HTTP requests, proxies and `skopeo` are there; its
//! runtime is current-thread for that reason ([`Fleet::block_on`]). A node is cut off and
//! healed at its switch port, and lost for good by killing its processes and deleting its
//! namespace. Every process is stopped by PID when the fleet is dropped, and the namespaces
//! deleted after them, whatever the test's outcome.
//!
//! Leases are short (`nats.ack_wait_secs`, from [`FleetConfig`]), jobs are imports of a small
//! image whose layers the destination soon holds, and the source proxy can slow every manifest
//! and blob GET down for a steady pace of jobs.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

use factoryd::adapters::nats::{self, ConnectionState, Nats};
use factoryd::job::{JobResult, Kind};
use serde_json::json;

use super::http::WatchProxy;
use super::nats::{cluster_on, NatsServer};
use super::netns::{Entered, TestNet};
use super::registry::{skopeo_copy, Auth, LayoutWriter, Registry};
use super::{ChildGuard, Host};

/// The source id of every job: the destination repository is `{source_id}`, so all jobs'
/// images share one repository, and its layers.
pub const SOURCE_ID: &str = "fleet";

/// The NATS servers notice a silent partition within seconds: a route or client that stops
/// answering pings (every 2 s, two missed) or stops taking writes (2 s) is closed. With the
/// defaults (pings every 2 min, a 10 s write deadline reached only once the kernel's buffers
/// are full) a server keeps routing to a cut-off peer for minutes, stalling on it, and the
/// healthy majority's state bucket and jobs stream time out meanwhile (seen here: over 90 s
/// of timeouts on the majority side, so that a job used up its deliveries on claims that
/// could not be written). The README asks operators for the same.
pub const NATS_SERVER_CONFIG: &str = "ping_interval: \"2s\"\nping_max: 2\nwrite_deadline: \"2s\"\n";

/// The knobs a fleet test turns.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    pub nodes: usize,
    /// `nats.ack_wait_secs`: the lease (and ack wait); heartbeats every third of it.
    pub ack_wait_secs: u64,
    pub import_slots: u32,
    pub grace_period_secs: u64,
    pub max_lost_attempts: u32,
    /// How long the source proxy holds every manifest and blob GET.
    pub source_delay: Duration,
}

impl Default for FleetConfig {
    fn default() -> Self {
        FleetConfig {
            nodes: 3,
            ack_wait_secs: 6,
            import_slots: 2,
            grace_period_secs: 10,
            max_lost_attempts: 2,
            source_delay: Duration::ZERO,
        }
    }
}

/// Runs `future` on a current-thread runtime on this thread: a fleet test's thread is on
/// `infra`'s network, and a multi-thread runtime's workers would not be.
pub fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(future)
}

impl Drop for Fleet {
    /// A failed test's logs outlive it: the temporary directory goes, so they are copied.
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let keep = std::env::temp_dir().join(format!(
            "factoryd-fleet-{}-{:08x}",
            std::process::id(),
            fastrand::u32(..)
        ));
        let _ = std::fs::create_dir_all(&keep);
        for entry in std::fs::read_dir(self.dir.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "log" || e == "toml") {
                let _ = std::fs::copy(&path, keep.join(entry.file_name()));
            }
        }
        eprintln!("fleet logs kept in {}", keep.display());
    }
}

/// One node: its host, its NATS server and its worker.
pub struct Node {
    pub name: String,
    pub host: Host,
    worker: Option<ChildGuard>,
    pub nats: NatsServer,
    config: PathBuf,
    log: PathBuf,
    /// Times its worker was started (each start says "Ready" once in the log).
    starts: usize,
    pub lost: bool,
}

impl Node {
    pub fn ip(&self) -> IpAddr {
        IpAddr::V4(self.host.ip)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn worker_pid(&self) -> Option<u32> {
        self.worker.as_ref().map(ChildGuard::pid)
    }
}

pub struct Fleet {
    // Dropped in this order: the workers and NATS servers (killed by PID), the proxies, the
    // registries, then the namespaces (anything left in them killed by PID), the files, and
    // last this thread's move back to its own network.
    pub nodes: Vec<Node>,
    pub source: WatchProxy,
    pub destination: WatchProxy,
    source_registry: Registry,
    destination_registry: Registry,
    pub net: TestNet,
    pub dir: tempfile::TempDir,
    pub config: FleetConfig,
    _inside: Entered,
}

impl Fleet {
    /// Makes the test network, starts the registries, the NATS cluster (and its assets, through
    /// a first client) and a worker on every node, and waits until each worker pulls jobs.
    pub fn start(config: FleetConfig) -> Fleet {
        let mut net = TestNet::create().unwrap_or_else(|e| {
            panic!(
                "cannot make network namespaces although the build found the capabilities \
                 for them ({e}); set FACTORYD_TEST_NETNS=0 to skip the fleet tests"
            )
        });
        let infra = net.add_host("infra", Ipv4Addr::new(10, 213, 0, 2));
        let hosts: Vec<(String, Host)> = (1..=config.nodes)
            .map(|i| {
                let name = format!("node-{i}");
                let host = net.add_host(&name, Ipv4Addr::new(10, 213, 0, 10 + i as u8));
                (name, host)
            })
            .collect();
        let inside = net.enter("infra");
        let dir = tempfile::tempdir().expect("tempdir");

        let source_registry = Registry::start_on(&infra, 5000, Auth::None);
        let destination_registry = Registry::start_on(&infra, 5001, Auth::None);
        let infra_ip = IpAddr::V4(infra.ip);
        let source = WatchProxy::start(infra_ip, &source_registry.host, config.source_delay);
        let destination = WatchProxy::start(infra_ip, &destination_registry.host, Duration::ZERO);

        let servers = cluster_on(
            dir.path(),
            &hosts.iter().map(|(_, h)| h.clone()).collect::<Vec<_>>(),
            NATS_SERVER_CONFIG,
        );
        let nodes = hosts
            .into_iter()
            .zip(servers)
            .map(|((name, host), nats)| Node {
                config: dir.path().join(format!("{name}.toml")),
                log: dir.path().join(format!("{name}.log")),
                name,
                host,
                worker: None,
                nats,
                starts: 0,
                lost: false,
            })
            .collect();
        let mut fleet = Fleet {
            nodes,
            source,
            destination,
            source_registry,
            destination_registry,
            net,
            dir,
            config,
            _inside: inside,
        };
        // A JetStream request sent before the cluster has a meta leader goes unanswered until
        // the client's timeout: wait until every server knows its leader.
        for node in &fleet.nodes {
            let deadline = Instant::now() + Duration::from_secs(30);
            while !node.nats.log().contains("metadata leader") {
                assert!(
                    Instant::now() < deadline,
                    "no JetStream meta leader after 30 s\n{}",
                    fleet.logs()
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        block_on(async {
            // The first client makes the R3 assets.
            drop(fleet.client(&[]).await);
        });
        for i in 0..fleet.nodes.len() {
            fleet.start_worker(i);
        }
        block_on(async {
            for i in 0..fleet.nodes.len() {
                fleet.wait_worker_ready(i).await;
            }
        });
        fleet
    }

    fn server_urls(&self, skip: &[usize]) -> Vec<String> {
        self.nodes
            .iter()
            .enumerate()
            .filter(|(i, n)| !skip.contains(i) && !n.lost)
            .map(|(_, n)| n.nats.url())
            .collect()
    }

    /// Writes node `i`'s config and starts its worker (its log appended to).
    pub fn start_worker(&mut self, i: usize) {
        let c = &self.config;
        let node = &self.nodes[i];
        // A worker talks to the NATS server of its own node, as co-located services do. (Given
        // every server, it may pick one on another node; cut off there, it would notice only
        // by async-nats' pings — 60 s apart, given up after the third — since factoryd sets
        // no shorter interval.)
        let servers = format!("{:?}", node.nats.url());
        let text = format!(
            "[nats]\nservers = [{servers}]\nreplicas = 3\nack_wait_secs = {ack_wait}\n\
             [worker]\nname = \"{name}\"\nwork_root = \"{work}\"\nbuild_slots = 0\n\
             import_slots = {slots}\ngrace_period_secs = {grace}\nmax_lost_attempts = {lost}\n\
             retry_base_delay_secs = 1\nretry_max_delay_secs = 2\nmin_free_mib = 16\n\
             [destination]\nkind = \"registry\"\nregistry = \"http://{destination}\"\n\
             repository = \"{{source_id}}\"\ntag = \"{{job_id}}\"\n\
             [registries]\ninsecure = [\"{source}\"]\n\
             [egress]\nallow_private = true\n\
             [metrics]\nlisten = \"{ip}:9464\"\n\
             [log]\nformat = \"text\"\nlevel = \"info,factoryd::worker=debug,async_nats=warn\"\n",
            servers = servers,
            ack_wait = c.ack_wait_secs,
            name = node.name,
            work = self
                .dir
                .path()
                .join(format!("work-{}", node.name))
                .display(),
            slots = c.import_slots,
            grace = c.grace_period_secs,
            lost = c.max_lost_attempts,
            destination = self.destination.host(),
            source = self.source.host(),
            ip = node.host.ip,
        );
        std::fs::write(&node.config, text).expect("write worker config");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)
            .expect("open worker log");
        let mut cmd = node.host.command(env!("CARGO_BIN_EXE_factoryd"));
        cmd.arg("serve")
            .arg("--config")
            .arg(&node.config)
            .env_clear()
            .env("RUST_BACKTRACE", "0")
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        let guard = ChildGuard::spawn(&node.name, &mut cmd);
        let node = &mut self.nodes[i];
        node.worker = Some(guard);
        node.starts += 1;
    }

    /// Waits (60 s at most) until node `i`'s latest worker pulls jobs.
    pub async fn wait_worker_ready(&self, i: usize) {
        let node = &self.nodes[i];
        self.wait_until(&format!("{} to pull jobs", node.name), 60, || {
            node.log().matches("Ready: pulling jobs.").count() >= node.starts
        })
        .await;
    }

    /// SIGTERM to node `i`'s worker; waits for it to exit (its grace period and 30 s more at
    /// most) and returns its exit status and how long it took.
    pub async fn terminate_worker(&mut self, i: usize) -> (ExitStatus, Duration) {
        let limit = Duration::from_secs(self.config.grace_period_secs + 30);
        let name = self.nodes[i].name.clone();
        let mut guard = self.nodes[i].worker.take().expect("a running worker");
        let sent = Instant::now();
        let status = Command::new("kill")
            .args(["-TERM", &guard.pid().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM {name}");
        loop {
            if let Some(exit) = guard.child.try_wait().expect("wait for the worker") {
                return (exit, sent.elapsed());
            }
            assert!(
                sent.elapsed() < limit,
                "{name} still runs {limit:?} after SIGTERM\n{}",
                self.nodes[i].log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Cuts node `i` off the network (worker and NATS server alike).
    pub fn cut(&self, i: usize) {
        self.net.cut(&self.nodes[i].name);
    }

    pub fn heal(&self, i: usize) {
        self.net.heal(&self.nodes[i].name);
    }

    /// Loses node `i` for good: its worker and NATS server are killed (SIGKILL, by PID) and its
    /// namespace deleted.
    pub fn lose_node(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        node.worker = None;
        node.nats.stop();
        node.lost = true;
        let name = node.name.clone();
        self.net.remove_host(&name);
    }

    /// The node at `ip`.
    pub fn node_at(&self, ip: IpAddr) -> Option<usize> {
        self.nodes.iter().position(|n| n.ip() == ip)
    }

    /// The node whose NATS server is named `server` (`n0`, `n1`, …).
    pub fn node_of_server(&self, server: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.nats.name == server)
    }

    /// A client on the servers of every node but `skip` (and lost ones), retried until the
    /// cluster answers (60 s at most).
    pub async fn client(&self, skip: &[usize]) -> Nats {
        let name = format!("client-{}", fastrand::u32(..));
        // The same queue settings as the workers': the first client makes the assets.
        let servers: Vec<String> = self
            .server_urls(skip)
            .iter()
            .map(|u| format!("{u:?}"))
            .collect();
        let path = self.dir.path().join(format!("{name}.toml"));
        let text = format!(
            "[nats]\nservers = [{}]\nreplicas = 3\nack_wait_secs = {}\n",
            servers.join(", "),
            self.config.ack_wait_secs
        );
        std::fs::write(&path, text).expect("write client config");
        let config = factoryd::config::load(Some(&path), &HashMap::new()).expect("client config");
        let state = std::sync::Arc::new(ConnectionState::default());
        let started = Instant::now();
        let deadline = started + Duration::from_secs(60);
        loop {
            let attempt = async {
                let client = nats::connect(&config.nats, "test", state.clone(), false).await?;
                Nats::open(client, &config.nats).await
            };
            match attempt.await {
                Ok(n) => return n,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("client not ready yet ({:?} in): {e}", started.elapsed());
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => panic!("cannot open NATS: {e}\n{}", self.logs()),
            }
        }
    }

    /// Pushes an image of random layers of `layer_sizes` bytes to the source registry as
    /// `reference` (directly, not through its proxy); returns its manifest digest.
    pub fn seed(&self, reference: &str, layer_sizes: &[usize]) -> String {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut writer = LayoutWriter::new(dir.path());
        let (image, descriptor) = writer.image(layer_sizes, "amd64", 7);
        writer.tag(descriptor, "seed");
        skopeo_copy(
            &format!("oci:{}:seed", dir.path().display()),
            &format!("docker://{}/{reference}", self.source_registry.host),
            &[],
        );
        image.manifest_digest
    }

    /// Copies `reference` from the source registry into the destination repository of every
    /// job (as tag `shared`), so that jobs find its layers there and push only manifests.
    /// (Several workers pushing the same new blobs into one repository at once can make
    /// `docker-registry` refuse one's manifest as `MANIFEST_BLOB_UNKNOWN`, which factoryd takes
    /// for a permanent error.)
    pub fn share_layers(&self, reference: &str) {
        skopeo_copy(
            &format!("docker://{}/{reference}", self.source_registry.host),
            &format!(
                "docker://{}/{SOURCE_ID}:shared",
                self.destination_registry.host
            ),
            &[],
        );
    }

    /// An import job of `target` from the source registry, through its proxy.
    pub fn import_job(&self, id: &str, target: &str) -> bytes::Bytes {
        serde_json::to_vec(&json!({
            "v": 1, "id": id, "source_id": SOURCE_ID,
            "origin": {"type": "docker-registry", "details": {
                "url": format!("http://{}", self.source.host()), "target": target
            }}
        }))
        .expect("job json")
        .into()
    }

    pub async fn publish(&self, nats: &Nats, id: &str, target: &str) {
        let fresh = nats
            .publish_job(Kind::Import, id, self.import_job(id, target))
            .await
            .unwrap_or_else(|e| panic!("publish {id}: {e}"));
        assert!(fresh, "{id} published twice");
    }

    /// The digest the destination registry holds under the job's tag (read directly, not
    /// through the proxy).
    pub async fn destination_digest(&self, job_id: &str) -> Option<String> {
        let url = format!(
            "http://{}/v2/{SOURCE_ID}/manifests/{job_id}",
            self.destination_registry.host
        );
        let response = reqwest::Client::new()
            .head(url)
            .header(
                "Accept",
                "application/vnd.oci.image.manifest.v1+json, \
                 application/vnd.oci.image.index.v1+json, \
                 application/vnd.docker.distribution.manifest.v2+json, \
                 application/vnd.docker.distribution.manifest.list.v2+json",
            )
            .send()
            .await
            .ok()?;
        if !response.status().is_success() {
            return None;
        }
        response
            .headers()
            .get("Docker-Content-Digest")?
            .to_str()
            .ok()
            .map(str::to_owned)
    }

    /// Checks what the fleet must guarantee for `results`: each succeeded, and the destination
    /// holds, under the job's tag, the digest its result names.
    pub async fn assert_destination_holds(&self, results: &HashMap<String, JobResult>) {
        for (id, result) in results {
            let image = result
                .image
                .as_ref()
                .unwrap_or_else(|| panic!("{id} did not succeed: {result:?}"));
            let held = self.destination_digest(id).await;
            assert_eq!(
                held.as_deref(),
                Some(image.digest.as_str()),
                "{id}: the destination holds another digest than its result names"
            );
        }
    }

    /// Waits until `check` holds, `secs` seconds at most; the panic carries every log.
    pub async fn wait_until(&self, what: &str, secs: u64, mut check: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while !check() {
            if Instant::now() >= deadline {
                panic!(
                    "timed out after {secs} s waiting for {what}\n{}",
                    self.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The last lines of every worker's and NATS server's log, for failure messages.
    pub fn logs(&self) -> String {
        let tail = |text: String, n: usize| {
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(n)..].join("\n")
        };
        let mut out = String::new();
        for node in &self.nodes {
            out.push_str(&format!(
                "--- {} worker:\n{}\n--- {} nats-server {}:\n{}\n",
                node.name,
                tail(node.log(), 40),
                node.name,
                node.nats.name,
                tail(node.nats.log(), 15)
            ));
        }
        out
    }

    /// Stops every running worker with SIGTERM and checks each exits 0 within its grace
    /// period: after this nothing can publish or push any more.
    pub async fn stop_workers(&mut self) {
        let grace = Duration::from_secs(self.config.grace_period_secs);
        for i in 0..self.nodes.len() {
            if self.nodes[i].worker.is_none() {
                continue;
            }
            let (status, took) = self.terminate_worker(i).await;
            let node = &self.nodes[i];
            assert_eq!(status.code(), Some(0), "{}:\n{}", node.name, node.log());
            // Within its grace period, and a moment for what ends it: right after a heal the
            // cluster may still elect leaders, and a write of the worker's (a result it found
            // already stored and publishes again) waits for an answer until the grace period
            // is over; then it gives up and the worker exits.
            assert!(
                took < grace + Duration::from_secs(3),
                "{} took {took:?} to stop",
                node.name
            );
        }
    }
}
