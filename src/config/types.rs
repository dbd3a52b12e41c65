//! The typed configuration: [`Config`] and the section structs and enums it is made of, as the
//! rest of the daemon sees them after validation.
//!
//! Only plain data and the few methods that read it (`Template::render`, `NodeLogin::offered_to`,
//! the `Display` of addresses and keywords). Nothing here parses configuration text or checks a
//! value: that is [`super::validate()`]'s job, the only code that builds these types from a file.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use url::Url;

use super::raw::RawConfig;
use super::validate::validate;

/// The placeholders `destination.repository` and `destination.tag` may contain.
pub const TEMPLATE_PLACEHOLDERS: [&str; 4] = ["source_id", "job_id", "namespace", "kind"];

/// The validated configuration. Built only by [`validate`] (through [`load`](super::load())),
/// so holding one means every value in it has been checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub nats: NatsConfig,
    pub worker: WorkerConfig,
    pub builder: BuilderConfig,
    pub destination: DestinationConfig,
    pub registries: RegistriesConfig,
    pub git: GitConfig,
    pub sources: SourcesConfig,
    pub egress: EgressConfig,
    pub store: StoreConfig,
    pub metrics: MetricsConfig,
    pub log: LogConfig,
}

impl Config {
    /// The built-in defaults, validated. `worker.name` is empty (meaning the host name).
    pub fn defaults() -> Config {
        match validate(RawConfig::default()) {
            Ok(config) => config,
            Err(problems) => panic!("the built-in configuration defaults are invalid:\n{problems}"),
        }
    }
}

/// `[nats]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatsConfig {
    /// Never empty; schemes `nats`, `tls`, `ws` or `wss`, no credentials in the URL.
    pub servers: Vec<Url>,
    /// Prefix of every stream, subject and bucket name, one subject token.
    pub prefix: String,
    /// Replicas of the streams the worker creates, 1..=5.
    pub replicas: u32,
    pub auth: NatsAuth,
    /// Extra CA bundle for TLS to the servers, on top of the system roots.
    pub tls_ca_file: Option<PathBuf>,
    pub connect_timeout: Duration,
    /// How long a job message may go unacknowledged before redelivery; a running job sends an
    /// in-progress ack every third of it, and its claim lease lasts this long.
    pub ack_wait: Duration,
}

/// How to authenticate to NATS: at most one method, each given as files to read at connect time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NatsAuth {
    None,
    /// A `.creds` file (JWT plus NKey seed).
    CredentialsFile(PathBuf),
    NkeySeedFile(PathBuf),
    TokenFile(PathBuf),
    UserPassword {
        user: String,
        password_file: PathBuf,
    },
}

/// `[worker]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerConfig {
    /// The worker's identity in job results and metrics. Never empty after
    /// [`load`](super::load()); after [`validate`] or [`from_toml_str`](super::from_toml_str)
    /// alone, empty means "the host name".
    pub name: String,
    /// Build jobs run at once, 0..=64 (0: this worker does not build).
    pub build_slots: u32,
    /// Import jobs run at once, 0..=64 (0: this worker does not import).
    pub import_slots: u32,
    /// Absolute; each job gets a directory under it.
    pub work_root: PathBuf,
    /// On SIGTERM, how long running jobs get to finish before they are abandoned to redelivery.
    pub grace_period: Duration,
    /// Ceiling on any job's timeout, including one the job itself asks for.
    pub max_job_timeout: Duration,
    /// Timeout of a job that asks for none; at most `max_job_timeout`.
    pub default_job_timeout: Duration,
    /// Attempts per job, 1..=4, below the consumer's delivery limit.
    pub max_attempts: u32,
    /// Attempts of one job that may end with their worker gone before the job fails as
    /// `poison` instead of running again (0: never).
    pub max_lost_attempts: u32,
    /// First retry delay; doubles per attempt up to `retry_max_delay`.
    pub retry_base_delay: Duration,
    pub retry_max_delay: Duration,
    /// Below this many free bytes on the work root's file system (or the layout store's) the
    /// worker takes no jobs (0: no limit).
    pub min_free_bytes: u64,
    /// `worker.min_free_inodes`; 0: no limit.
    pub min_free_inodes: u64,
}

/// `[builder]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuilderConfig {
    pub backend: BuilderBackend,
    pub docker_host: DaemonAddr,
    pub buildkitd_addr: BuildkitdAddr,
    /// Frontend images a build may name, canonical (`docker.io/docker/dockerfile:1`); empty:
    /// only the built-in Dockerfile frontend.
    pub allowed_frontends: Vec<String>,
    /// The builder's BuildKit cache is pruned down to this many bytes, least recently used
    /// first ([`crate::ports::Builder::prune_cache`]); 0: the cache is left alone.
    pub cache_keep_bytes: u64,
    /// `[builder.cache]`; `None` when `builder.cache.registry` is `""`.
    pub cache: Option<BuildCacheConfig>,
}

/// `[builder.cache]`: the registry that holds every source's build cache, shared by the fleet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildCacheConfig {
    /// A registry of its own: neither `destination.registry` nor a host of
    /// `registries.credentials` (its credentials must answer for the cache only).
    pub registry: RegistryTarget,
    /// Contains `{source_id}` (and at most `{namespace}` besides), so each source has its own.
    pub repository: Template,
    /// The value of `{namespace}` (`destination.namespace`).
    pub namespace: String,
    pub credentials: Option<RegistryCredentials>,
}

/// Where the `buildkitd` backend finds BuildKit's control API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BuildkitdAddr {
    /// `docker-engine`: the BuildKit of the Docker Engine at `builder.docker_host`, on its
    /// `/grpc` endpoint.
    DockerEngine,
    /// A standalone buildkitd.
    Daemon(DaemonAddr),
}

impl fmt::Display for BuildkitdAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BuildkitdAddr::DockerEngine => f.write_str(BUILDKITD_DOCKER_ENGINE),
            BuildkitdAddr::Daemon(addr) => addr.fmt(f),
        }
    }
}

/// The `builder.buildkitd_addr` that names the engine's own BuildKit.
pub(super) const BUILDKITD_DOCKER_ENGINE: &str = "docker-engine";

/// Which daemon builds images.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BuilderBackend {
    /// The Docker Engine API (BuildKit inside dockerd).
    Docker,
    /// A standalone `buildkitd`.
    Buildkitd,
}

/// Where a local daemon listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DaemonAddr {
    /// `unix:///absolute/path`.
    Unix(PathBuf),
    /// `tcp://host:port`.
    Tcp { host: String, port: u16 },
}

impl fmt::Display for DaemonAddr {
    /// The URL form both Docker and BuildKit clients accept.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DaemonAddr::Unix(path) => write!(f, "unix://{}", path.display()),
            DaemonAddr::Tcp { host, port } => write!(f, "tcp://{host}:{port}"),
        }
    }
}

/// `[destination]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DestinationConfig {
    pub kind: DestinationKind,
    /// The OCI image layout directory; absolute, and only meaningful for `oci-layout`.
    pub path: PathBuf,
    /// The registry pushed to; `Some` exactly when `kind` is `registry`.
    pub registry: Option<RegistryTarget>,
    pub repository: Template,
    pub tag: Template,
    /// Value of `{namespace}`; may be empty when no template uses it.
    pub namespace: String,
    pub credentials: Option<RegistryCredentials>,
}

/// Where finished images go: the same two kinds a job may ask for.
pub use crate::job::DestinationKind;

/// The registry `destination.registry` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryTarget {
    /// `host` or `host:port`, as used in image references.
    pub authority: String,
    /// Plain HTTP: written as `http://`, or the authority is listed in `registries.insecure`.
    pub plain_http: bool,
}

/// Basic-auth credentials for the destination registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryCredentials {
    pub username: String,
    /// Read at push time, so a rotated password needs no restart.
    pub password_file: PathBuf,
}

/// A repository or tag template with only known `{placeholders}`, checked at load time so a
/// typo fails the daemon's start, not every push.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template(pub(super) String);

/// The values substituted into a [`Template`].
#[derive(Debug, Clone, Copy)]
pub struct TemplateValues<'a> {
    pub source_id: &'a str,
    pub job_id: &'a str,
    pub namespace: &'a str,
    pub kind: &'a str,
}

impl Template {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Substitutes every placeholder. The caller checks that the result is a valid repository
    /// or tag: the values come from jobs, not from the configuration.
    pub fn render(&self, values: &TemplateValues<'_>) -> String {
        let mut out = String::with_capacity(self.0.len());
        let mut rest = self.0.as_str();
        // Validation guarantees braces are balanced and names are known.
        while let Some(open) = rest.find('{') {
            out.push_str(&rest[..open]);
            let after = &rest[open + 1..];
            let close = after.find('}').unwrap_or(after.len());
            out.push_str(match &after[..close] {
                "source_id" => values.source_id,
                "job_id" => values.job_id,
                "namespace" => values.namespace,
                "kind" => values.kind,
                _ => "",
            });
            rest = after.get(close + 1..).unwrap_or("");
        }
        out.push_str(rest);
        out
    }
}

impl fmt::Display for Template {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// `[registries]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistriesConfig {
    /// `host` or `host:port` entries reached over plain HTTP.
    pub insecure: Vec<String>,
    /// Never empty.
    pub platforms: Vec<Platform>,
    /// Registry host to mirror base URLs, tried in order before the registry itself.
    pub mirrors: BTreeMap<String, Vec<Url>>,
    pub max_parallel_blobs: u32,
    /// Largest manifest or index read from a registry.
    pub max_manifest_bytes: usize,
    /// Largest blob a manifest may declare; an image with a larger one is refused before any
    /// of it is downloaded.
    pub max_blob_bytes: u64,
    /// AWS ECR API endpoint override, for private endpoints and tests.
    pub ecr_endpoint: Option<Url>,
    /// How long a credentials webhook may take.
    pub webhook_timeout: Duration,
    /// Largest credentials webhook answer read.
    pub webhook_max_bytes: usize,
    /// Node-level credentials for builds' `FROM` registries, by host (`docker.io` for Docker
    /// Hub); passwords are read from their files when the worker starts.
    pub credentials: Vec<(String, NodeLogin)>,
}

/// One of `registries.credentials`: a login and the sources whose builds may use it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeLogin {
    pub login: RegistryCredentials,
    /// `source_id`s, or prefixes ending in `*`; `None`: every source.
    pub sources: Option<Vec<String>>,
}

impl NodeLogin {
    /// Whether a build of `source_id` is offered this login.
    pub fn offered_to(&self, source_id: &str) -> bool {
        source_scope_matches(self.sources.as_deref(), source_id)
    }
}

/// Whether `source_id` is in a `sources` list (`None`: every source): an entry is an id, or a
/// prefix ending in `*`.
pub fn source_scope_matches(sources: Option<&[String]>, source_id: &str) -> bool {
    sources.is_none_or(|list| {
        list.iter().any(|entry| match entry.strip_suffix('*') {
            Some(prefix) => source_id.starts_with(prefix),
            None => entry == source_id,
        })
    })
}

/// An OCI platform, `os/architecture[/variant]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(variant) = &self.variant {
            write!(f, "/{variant}")?;
        }
        Ok(())
    }
}

/// `[git]`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GitConfig {
    pub host_key_checking: bool,
    pub known_hosts_file: PathBuf,
    pub unaligned_hash: UnalignedHash,
    /// `host` or `host:port` entries (lowercase) whose repositories may be fetched over plain
    /// `http://`; every other host must use `https://` or `ssh://`.
    pub insecure_hosts: Vec<String>,
    /// Connecting to a git server (TCP and TLS/SSH handshake).
    pub connect_timeout: Duration,
    /// Longest wait for the git server to send or accept data mid-transfer.
    pub io_timeout: Duration,
    /// Bytes an HTTP(S) git server may send before its pack starts (ref advertisement and
    /// negotiation), per fetch.
    pub max_ref_advertisement_bytes: u64,
    /// CA certificates trusted for git over https, in addition to the system's.
    pub tls_ca_file: Option<PathBuf>,
}

/// `[sources]`: caps and timeouts on what a build job fetches and seals.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SourcesConfig {
    /// Bytes received from a git server or a tarball server, per job.
    pub max_fetch_bytes: u64,
    /// Bytes of file content in a build context (uncompressed), and of a tarball decompressed.
    pub max_context_bytes: u64,
    /// Entries (files, directories, links) a walk of a source tree or archive may visit,
    /// `.dockerignore`d ones included.
    pub max_entries: u64,
    /// Path components of any entry.
    pub max_path_depth: u32,
    pub download_connect_timeout: Duration,
    /// Longest wait for the next bytes of a tarball download.
    pub download_read_timeout: Duration,
    /// Where git and tar.gz sources are fetched and sealed.
    pub isolation: Isolation,
    /// The resource limits of that child process.
    pub child: ChildLimits,
}

/// Where a docker-file job's source is fetched and sealed (`sources.isolation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Isolation {
    /// In a confined child process per job (`factoryd source-worker`).
    Process,
    /// In the worker process itself (tests, or kernels where the child cannot run).
    None,
}

/// Limits of the source child process (`sources.child_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChildLimits {
    /// Address space (RLIMIT_AS).
    pub memory_bytes: u64,
    /// CPU time (RLIMIT_CPU).
    pub cpu_secs: u64,
    /// Open file descriptors (RLIMIT_NOFILE).
    pub open_files: u64,
    /// Largest file it may write (RLIMIT_FSIZE).
    pub file_size_bytes: u64,
}

/// What to do when a job's commit hash is not the head of the branch it names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum UnalignedHash {
    /// Build the branch head and record the hash actually built.
    UseBranchHead,
    /// Fail the job.
    Fail,
}

/// `[egress]`: whether job-supplied URLs may point at this host or private networks.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EgressConfig {
    pub allow_loopback: bool,
    pub allow_private: bool,
}

/// `[store]`: what the `oci-layout` store keeps, and how often it is collected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreConfig {
    pub retention: crate::store::Policy,
    /// Collect this often (besides after jobs and before the disk hold); `None`: only then.
    pub gc_interval: Option<Duration>,
}

/// `[metrics]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsConfig {
    pub listen: SocketAddr,
}

/// `[log]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A `tracing` `EnvFilter` directive such as `info` or `info,factoryd=debug`; its syntax is
    /// checked where the filter is built.
    pub level: String,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LogFormat {
    /// Text on a terminal, JSON otherwise (journald, files).
    Auto,
    Text,
    Json,
}

/// A closed set of words a key may take, with their spelling in the file.
pub(super) trait Keyword: Copy + PartialEq + 'static {
    const WORDS: &'static [(&'static str, Self)];

    fn parse(word: &str) -> Option<Self> {
        Self::WORDS
            .iter()
            .find(|(name, _)| *name == word)
            .map(|(_, value)| *value)
    }

    fn word(self) -> &'static str {
        Self::WORDS
            .iter()
            .find(|(_, value)| *value == self)
            .map_or("", |(name, _)| *name)
    }
}

macro_rules! keyword_enum {
    ($ty:ty, [$(($word:literal, $variant:expr)),+ $(,)?]) => {
        impl Keyword for $ty {
            const WORDS: &'static [(&'static str, Self)] = &[$(($word, $variant)),+];
        }

        impl $ty {
            /// The spelling used in the configuration file.
            pub fn as_str(self) -> &'static str {
                self.word()
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.word())
            }
        }
    };
}

keyword_enum!(
    BuilderBackend,
    [
        ("docker", BuilderBackend::Docker),
        ("buildkitd", BuilderBackend::Buildkitd),
    ]
);
keyword_enum!(
    DestinationKind,
    [
        ("oci-layout", DestinationKind::OciLayout),
        ("registry", DestinationKind::Registry),
    ]
);
keyword_enum!(
    Isolation,
    [("process", Isolation::Process), ("none", Isolation::None)]
);
keyword_enum!(
    UnalignedHash,
    [
        ("use-branch-head", UnalignedHash::UseBranchHead),
        ("fail", UnalignedHash::Fail),
    ]
);
keyword_enum!(
    LogFormat,
    [
        ("auto", LogFormat::Auto),
        ("text", LogFormat::Text),
        ("json", LogFormat::Json),
    ]
);
