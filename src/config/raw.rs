//! Phase one of the configuration: the file's shape, exactly as written, with the built-in
//! defaults.
//!
//! These types mirror `factoryd.toml` key for key and hold plain values (strings, integers,
//! lists, maps) so that a value of the wrong *type* is the only thing that can fail here; whether a
//! value makes sense is decided by [`super::validate()`], which sees the whole file at once.
//! Every struct denies unknown fields so a misspelt key can never be silently ignored, and every
//! struct takes `default` so that a key left out keeps its built-in value.
//!
//! The `Default` impls below *are* the built-in defaults: the shipped `config/factoryd.toml`
//! must repeat them (a test compares the two), and [`super::Config::defaults`] validates them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The whole file: one field per `[section]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawConfig {
    pub nats: RawNats,
    pub worker: RawWorker,
    pub builder: RawBuilder,
    pub destination: RawDestination,
    pub registries: RawRegistries,
    pub git: RawGit,
    pub sources: RawSources,
    pub egress: RawEgress,
    pub store: RawStore,
    pub metrics: RawMetrics,
    pub log: RawLog,
}

/// `[nats]`: where the job stream lives and how to authenticate to it.
///
/// Credentials are only ever referenced by file path, never inline, so this struct (and any
/// error message quoting it) holds no secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawNats {
    pub servers: Vec<String>,
    pub prefix: String,
    pub replicas: u32,
    pub credentials_file: String,
    pub nkey_seed_file: String,
    pub token_file: String,
    pub user: String,
    pub password_file: String,
    pub tls_ca_file: String,
    pub connect_timeout_secs: u64,
    pub ack_wait_secs: u64,
}

impl Default for RawNats {
    fn default() -> Self {
        RawNats {
            servers: vec!["nats://127.0.0.1:4222".to_owned()],
            prefix: "factory".to_owned(),
            replicas: 1,
            credentials_file: String::new(),
            nkey_seed_file: String::new(),
            token_file: String::new(),
            user: String::new(),
            password_file: String::new(),
            tls_ca_file: String::new(),
            connect_timeout_secs: 10,
            ack_wait_secs: 60,
        }
    }
}

/// `[worker]`: identity, concurrency and time limits of this worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawWorker {
    /// Empty means "use the host name", resolved by [`super::load()`].
    pub name: String,
    pub build_slots: u32,
    pub import_slots: u32,
    pub work_root: String,
    pub grace_period_secs: u64,
    pub max_job_timeout_secs: u64,
    pub default_job_timeout_secs: u64,
    pub max_attempts: u32,
    pub max_lost_attempts: u32,
    pub retry_base_delay_secs: u64,
    pub retry_max_delay_secs: u64,
    pub min_free_mib: u32,
    pub min_free_inodes: u64,
}

impl Default for RawWorker {
    fn default() -> Self {
        RawWorker {
            name: String::new(),
            build_slots: 1,
            import_slots: 4,
            work_root: "/var/lib/factoryd/work".to_owned(),
            grace_period_secs: 300,
            max_job_timeout_secs: 7200,
            default_job_timeout_secs: 3600,
            max_attempts: 4,
            max_lost_attempts: 2,
            retry_base_delay_secs: 30,
            retry_max_delay_secs: 600,
            min_free_mib: 1024,
            min_free_inodes: 10_000,
        }
    }
}

/// `[builder]`: which image builder runs build jobs and how to reach it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawBuilder {
    pub backend: String,
    pub docker_host: String,
    pub buildkitd_addr: String,
    /// Frontend images a build may name (`# syntax=` or `BUILDKIT_SYNTAX`); empty: none.
    pub allowed_frontends: Vec<String>,
    /// Size the builder's BuildKit cache is pruned down to; 0: the cache is left alone.
    pub cache_keep_bytes: u64,
    /// `[builder.cache]`: the build cache the fleet shares through a registry.
    pub cache: RawBuildCache,
}

impl Default for RawBuilder {
    fn default() -> Self {
        RawBuilder {
            backend: "docker".to_owned(),
            docker_host: "unix:///var/run/docker.sock".to_owned(),
            buildkitd_addr: "docker-engine".to_owned(),
            allowed_frontends: Vec::new(),
            cache_keep_bytes: 10 << 30,
            cache: RawBuildCache::default(),
        }
    }
}

/// `[builder.cache]`: where builds import their cache from and export it to, shared by every
/// worker of the fleet. `registry = ""` turns it off.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawBuildCache {
    /// `host[:port]`, optionally after `http://` or `https://`; `""`: no shared cache.
    pub registry: String,
    /// Repository template, rendered per source; must contain `{source_id}`.
    pub repository: String,
    pub username: String,
    pub password_file: String,
}

impl Default for RawBuildCache {
    fn default() -> Self {
        RawBuildCache {
            registry: String::new(),
            repository: "buildcache/{source_id}".to_owned(),
            username: String::new(),
            password_file: String::new(),
        }
    }
}

/// `[destination]`: where finished images go.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawDestination {
    pub kind: String,
    pub path: String,
    pub registry: String,
    pub repository: String,
    pub tag: String,
    pub namespace: String,
    pub username: String,
    pub password_file: String,
}

impl Default for RawDestination {
    fn default() -> Self {
        RawDestination {
            kind: "oci-layout".to_owned(),
            path: "/var/lib/factoryd/store".to_owned(),
            registry: String::new(),
            repository: "{source_id}".to_owned(),
            tag: "{job_id}".to_owned(),
            namespace: String::new(),
            username: String::new(),
            password_file: String::new(),
        }
    }
}

/// `[registries]`: how source images are pulled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawRegistries {
    pub insecure: Vec<String>,
    pub platforms: Vec<String>,
    /// Registry host to mirror base URLs. A `BTreeMap` so that iteration, and therefore the
    /// order of reported problems, does not depend on hashing.
    pub mirrors: BTreeMap<String, Vec<String>>,
    pub max_parallel_blobs: u32,
    /// Largest manifest or index read from a registry, in bytes.
    pub max_manifest_bytes: u64,
    /// Largest blob (layer or config) a manifest may declare, in bytes.
    pub max_blob_bytes: u64,
    /// AWS ECR API endpoint override (`""`: the SDK's regional endpoint).
    pub ecr_endpoint: String,
    /// Seconds a credentials webhook may take to answer.
    pub webhook_timeout_secs: u64,
    /// Largest credentials webhook answer read, in bytes.
    pub webhook_max_bytes: u64,
    /// Node-level credentials for the registries of builds' `FROM` lines, by registry host; a
    /// job's own credentials for the same host win.
    pub credentials: BTreeMap<String, RawRegistryLogin>,
}

/// One registry login: a user name and the file holding the password or token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRegistryLogin {
    pub username: String,
    pub password_file: String,
    /// The sources whose builds are offered this login: `source_id`s, or prefixes ending in
    /// `*`. Absent: every source's.
    #[serde(default)]
    pub sources: Option<Vec<String>>,
}

impl Default for RawRegistries {
    fn default() -> Self {
        RawRegistries {
            insecure: Vec::new(),
            platforms: vec!["linux/amd64".to_owned()],
            mirrors: BTreeMap::from([("docker.io".to_owned(), Vec::new())]),
            max_parallel_blobs: 4,
            max_manifest_bytes: 4 * 1024 * 1024,
            max_blob_bytes: 16 << 30,
            ecr_endpoint: String::new(),
            webhook_timeout_secs: 10,
            webhook_max_bytes: 4096,
            credentials: BTreeMap::new(),
        }
    }
}

/// `[git]`: how source repositories are fetched.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawGit {
    pub host_key_checking: bool,
    pub known_hosts_file: String,
    pub unaligned_hash: String,
    /// `host` or `host:port` entries whose repositories may be fetched over plain `http://`.
    pub insecure_hosts: Vec<String>,
    pub connect_timeout_secs: u64,
    pub io_timeout_secs: u64,
    pub max_ref_advertisement_bytes: u64,
    pub tls_ca_file: String,
}

impl Default for RawGit {
    fn default() -> Self {
        RawGit {
            host_key_checking: true,
            known_hosts_file: "/etc/factoryd/known_hosts".to_owned(),
            unaligned_hash: "use-branch-head".to_owned(),
            insecure_hosts: Vec::new(),
            connect_timeout_secs: 30,
            io_timeout_secs: 120,
            max_ref_advertisement_bytes: 64 << 20,
            tls_ca_file: String::new(),
        }
    }
}

/// `[sources]`: caps and timeouts on what a build job fetches and seals.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawSources {
    pub max_fetch_bytes: u64,
    pub max_context_bytes: u64,
    pub max_entries: u64,
    pub max_path_depth: u32,
    pub download_connect_timeout_secs: u64,
    pub download_read_timeout_secs: u64,
    pub isolation: String,
    pub child_memory_mib: u32,
    pub child_cpu_secs: u32,
    pub child_open_files: u32,
    pub child_file_size_mib: u32,
}

impl Default for RawSources {
    fn default() -> Self {
        RawSources {
            max_fetch_bytes: 2 << 30,
            max_context_bytes: 8 << 30,
            max_entries: 500_000,
            max_path_depth: 64,
            download_connect_timeout_secs: 30,
            download_read_timeout_secs: 120,
            isolation: "process".to_owned(),
            child_memory_mib: 4096,
            child_cpu_secs: 1800,
            child_open_files: 1024,
            child_file_size_mib: 16384,
        }
    }
}

/// `[egress]`: which addresses jobs may make the worker connect to.
///
/// Both default to `false` because job inputs (repository and registry URLs) come from
/// tenants, and a worker that fetches whatever it is told is a server-side request forgery tool.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawEgress {
    pub allow_loopback: bool,
    pub allow_private: bool,
}

/// `[store]`: retention and collection of the `oci-layout` store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawStore {
    pub keep_per_source: u32,
    pub max_age_days: u32,
    pub max_bytes: u64,
    pub min_age_secs: u64,
    pub gc_interval_secs: u64,
}

impl Default for RawStore {
    fn default() -> Self {
        RawStore {
            keep_per_source: 3,
            max_age_days: 0,
            max_bytes: 0,
            min_age_secs: 600,
            gc_interval_secs: 3600,
        }
    }
}

/// `[metrics]`: the Prometheus endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawMetrics {
    pub listen: String,
}

impl Default for RawMetrics {
    fn default() -> Self {
        RawMetrics {
            listen: "127.0.0.1:9464".to_owned(),
        }
    }
}

/// `[log]`: what the daemon writes to stderr.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawLog {
    pub format: String,
    pub level: String,
}

impl Default for RawLog {
    fn default() -> Self {
        RawLog {
            format: "auto".to_owned(),
            level: "info".to_owned(),
        }
    }
}
