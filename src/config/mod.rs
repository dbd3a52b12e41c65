//! The daemon's configuration: where it comes from, what it may contain, and the typed
//! [`Config`] the rest of the daemon is started with.
//!
//! Two phases, so that an operator fixes a bad file in one pass:
//!
//! 1. **Lowering** ([`raw`] and the private `layers`): the TOML file, then
//!    `FACTORYD__SECTION__KEY` environment variables, merged with the `config` crate over the
//!    built-in defaults and typed into a [`RawConfig`] of plain strings, integers and lists.
//!    Unknown keys and values of the wrong type are reported here, every one of them, each with
//!    its dotted path.
//! 2. **Validation** ([`validate`]): a pure function from `RawConfig` to [`Config`] that checks
//!    every key, reports every problem at once, and produces typed values (`Url`, `PathBuf`,
//!    `SocketAddr`, `Duration`, enums), so no other module parses configuration text.
//!
//! What this module must not do: read or change the process environment (the caller passes it
//! in, so tests stay hermetic and the daemon's environment is read in exactly one place); hold a
//! secret (credentials are configured as paths to files that the modules using them read, so
//! neither a `Config` nor an error message quoting it can leak one); or open connections and
//! create directories (whether a path is usable is found out by the code that uses it, and
//! reported there with its context). Its only I/O is reading the file and the host name, in
//! [`load`].

pub mod raw;

mod checks;
mod layers;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use url::Url;

use crate::problems::Problems;
use checks::{
    absolute_path, bare_authority, daemon_addr, in_range, is_repository_text, is_subject_token,
    is_worker_name, keyword, mirror_url, nats_url, optional_path, parse_platform, registry_target,
    seconds, secret_file, template, TemplateText,
};

pub use raw::RawConfig;

/// The file read when no `--config` is given; its absence is not an error.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/factoryd/factoryd.toml";

/// Where an empty `worker.name` is taken from.
pub const HOSTNAME_PATH: &str = "/proc/sys/kernel/hostname";

/// Prefix of the environment variables that override the file: `FACTORYD__WORKER__BUILD_SLOTS=3`
/// sets `worker.build_slots`. List keys take a comma-separated value.
pub const ENV_PREFIX: &str = layers::ENV_PREFIX;

/// The placeholders `destination.repository` and `destination.tag` may contain.
pub const TEMPLATE_PLACEHOLDERS: [&str; 4] = ["source_id", "job_id", "namespace", "kind"];

/// The JetStream consumer redelivers a job at most this many times; the worker's own retry
/// budget must stay below it so that the last attempt is the worker's decision, not a silent
/// redelivery cut-off.
const CONSUMER_MAX_DELIVER: u32 = 5;

/// Upper bounds on durations: a value near `u64::MAX` seconds would make `Instant + Duration`
/// overflow and panic at the first job instead of failing here with a message.
const MAX_JOB_TIMEOUT_SECS: u64 = 7 * 24 * 3600;
const MAX_DELAY_SECS: u64 = 24 * 3600;
const MAX_CONNECT_TIMEOUT_SECS: u64 = 300;
/// Upper bound of `worker.min_free_mib`: 1 TiB.
const MAX_MIN_FREE_MIB: u32 = 1 << 20;

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file is missing, unreadable or not TOML. The message comes from the operating system
    /// or the TOML parser and may quote the offending line; no key holds a secret inline, so
    /// that line holds none either.
    #[error("cannot read configuration file {}: {message}", path.display())]
    Read { path: PathBuf, message: String },
    /// Every problem found, one per line, each as `path: what was expected`.
    #[error("invalid configuration ({count}):\n{0}", count = count_problems(.0))]
    Invalid(Problems),
}

fn count_problems(problems: &Problems) -> String {
    match problems.len() {
        1 => "1 problem".to_owned(),
        n => format!("{n} problems"),
    }
}

/// Loads the configuration the daemon runs with.
///
/// Layers, later ones winning: built-in defaults; the TOML file at `file`, which must exist, or,
/// when `file` is `None`, [`DEFAULT_CONFIG_PATH`] if it exists; then every `FACTORYD__…` entry
/// of `env` (the binary passes `std::env::vars().collect()`). An empty `worker.name` is replaced
/// by the host name read from [`HOSTNAME_PATH`], so `config.worker.name` is never empty after
/// this returns.
pub fn load(file: Option<&Path>, env: &HashMap<String, String>) -> Result<Config, ConfigError> {
    load_with(file, Path::new(DEFAULT_CONFIG_PATH), env, || {
        std::fs::read_to_string(HOSTNAME_PATH)
    })
}

/// Builds a configuration from TOML text and `env`, exactly as [`load`] does from a file, but
/// without I/O: an empty `worker.name` stays empty. For tests and `--check`-style tooling.
pub fn from_toml_str(text: &str, env: &HashMap<String, String>) -> Result<Config, ConfigError> {
    assemble(Some((Path::new("<string>"), text)), env)
}

/// [`load`] with its two I/O dependencies injected, so that their failures can be tested.
fn load_with(
    file: Option<&Path>,
    default_path: &Path,
    env: &HashMap<String, String>,
    read_host_name: impl FnOnce() -> io::Result<String>,
) -> Result<Config, ConfigError> {
    let read_error = |path: &Path, e: io::Error| ConfigError::Read {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    // Read here rather than through `config::File`, which, given a missing path, also tries
    // that path with every format's extensions appended; `--config /etc/x` must read /etc/x.
    let text = match file {
        Some(path) => Some((
            path,
            std::fs::read_to_string(path).map_err(|e| read_error(path, e))?,
        )),
        None => match std::fs::read_to_string(default_path) {
            Ok(text) => Some((default_path, text)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(read_error(default_path, e)),
        },
    };
    let mut config = assemble(text.as_ref().map(|(p, t)| (*p, t.as_str())), env)?;
    resolve_worker_name(&mut config.worker, read_host_name)?;
    Ok(config)
}

/// Both phases, with the file's text already read.
fn assemble(
    file: Option<(&Path, &str)>,
    env: &HashMap<String, String>,
) -> Result<Config, ConfigError> {
    let merged = layers::merge(file.map(|(_, text)| text), env).map_err(|e| match e {
        layers::MergeError::Syntax(message) => ConfigError::Read {
            path: file.map_or_else(PathBuf::new, |(path, _)| path.to_path_buf()),
            message,
        },
        layers::MergeError::Other(message) => {
            let mut problems = Problems::new();
            problems.push("", message);
            ConfigError::Invalid(problems)
        }
    })?;
    let (raw, mut problems) = layers::decode(merged);
    match validate(raw) {
        Ok(config) if problems.is_empty() => Ok(config),
        Ok(_) => Err(ConfigError::Invalid(problems)),
        Err(later) => {
            // A key that failed typing was validated at its default; anything validation says
            // about that same key would be about a value the operator never wrote.
            let reported: HashSet<String> = problems.iter().map(|p| p.path.clone()).collect();
            for problem in later {
                if !reported.contains(&problem.path) {
                    problems.push(problem.path, problem.message);
                }
            }
            Err(ConfigError::Invalid(problems))
        }
    }
}

/// Fills an empty worker name from the host name, checked by the same rule as a configured one.
fn resolve_worker_name(
    worker: &mut WorkerConfig,
    read_host_name: impl FnOnce() -> io::Result<String>,
) -> Result<(), ConfigError> {
    if !worker.name.is_empty() {
        return Ok(());
    }
    let invalid = |message: String| {
        let mut problems = Problems::new();
        problems.push("worker.name", message);
        ConfigError::Invalid(problems)
    };
    let host_name = read_host_name().map_err(|e| {
        invalid(format!(
            "is empty, meaning the host name, but {HOSTNAME_PATH} could not be read ({e}); \
             set worker.name"
        ))
    })?;
    let host_name = host_name.trim();
    if !is_worker_name(host_name) {
        return Err(invalid(format!(
            "is empty, meaning the host name, but the host name {host_name:?} is not 1-64 of \
             [A-Za-z0-9_.-]; set worker.name"
        )));
    }
    worker.name = host_name.to_owned();
    Ok(())
}

/// The validated configuration. Built only by [`validate`] (through [`load`]), so holding one
/// means every value in it has been checked.
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
    /// The worker's identity in job results and metrics. Never empty after [`load`]; after
    /// [`validate`] or [`from_toml_str`] alone, empty means "the host name".
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
const BUILDKITD_DOCKER_ENGINE: &str = "docker-engine";

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
pub struct Template(String);

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
trait Keyword: Copy + PartialEq + 'static {
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

/// Checks every key of `raw` and returns the typed configuration, or every problem found.
///
/// Pure: no I/O, and the same input always gives the same problems in the same order. Where a
/// value is bad, a stand-in is used so that checking can go on; the stand-ins never escape,
/// because any problem means `Err`.
pub fn validate(raw: RawConfig) -> Result<Config, Problems> {
    let mut p = Problems::new();
    let config = Config {
        nats: validate_nats(&raw.nats, &mut p),
        worker: validate_worker(&raw.worker, &mut p),
        builder: validate_builder(&raw.builder, &mut p),
        destination: validate_destination(&raw.destination, &raw.registries.insecure, &mut p),
        registries: validate_registries(&raw.registries, &mut p),
        git: GitConfig {
            host_key_checking: raw.git.host_key_checking,
            known_hosts_file: absolute_path(
                &mut p,
                "git.known_hosts_file",
                &raw.git.known_hosts_file,
            ),
            unaligned_hash: keyword(
                &mut p,
                "git.unaligned_hash",
                &raw.git.unaligned_hash,
                UnalignedHash::UseBranchHead,
            ),
            insecure_hosts: raw
                .git
                .insecure_hosts
                .iter()
                .enumerate()
                .map(|(i, entry)| {
                    if let Err(why) = bare_authority(entry) {
                        p.push(
                            format!("git.insecure_hosts[{i}]"),
                            format!("expected host or host:port ({why}), got {entry:?}"),
                        );
                    }
                    entry.to_ascii_lowercase()
                })
                .collect(),
            connect_timeout: seconds(
                &mut p,
                "git.connect_timeout_secs",
                raw.git.connect_timeout_secs,
                1,
                MAX_CONNECT_TIMEOUT_SECS,
            ),
            io_timeout: seconds(
                &mut p,
                "git.io_timeout_secs",
                raw.git.io_timeout_secs,
                1,
                MAX_DELAY_SECS,
            ),
            max_ref_advertisement_bytes: {
                let value = raw.git.max_ref_advertisement_bytes;
                if !(1 << 16..=1 << 32).contains(&value) {
                    p.push(
                        "git.max_ref_advertisement_bytes",
                        format!("expected 65536 to 4294967296 bytes, got {value}"),
                    );
                }
                value
            },
            tls_ca_file: optional_path(&mut p, "git.tls_ca_file", &raw.git.tls_ca_file),
        },
        sources: validate_sources(&raw.sources, &mut p),
        egress: EgressConfig {
            allow_loopback: raw.egress.allow_loopback,
            allow_private: raw.egress.allow_private,
        },
        metrics: MetricsConfig {
            listen: raw.metrics.listen.parse().unwrap_or_else(|_| {
                p.push(
                    "metrics.listen",
                    format!(
                        "expected an IP address and port such as 127.0.0.1:9464 or [::1]:9464, \
                         got {:?}",
                        raw.metrics.listen
                    ),
                );
                SocketAddr::from(([127, 0, 0, 1], 9464))
            }),
        },
        log: LogConfig {
            format: keyword(&mut p, "log.format", &raw.log.format, LogFormat::Auto),
            level: {
                let level = raw.log.level.trim();
                if level.is_empty() {
                    p.push(
                        "log.level",
                        "expected a log filter such as \"info\" or \"info,factoryd=debug\", got \
                         an empty string",
                    );
                } else if let Err(e) = tracing_subscriber::EnvFilter::try_new(level) {
                    p.push(
                        "log.level",
                        format!(
                            "expected a log filter such as \"info\" or \"info,factoryd=debug\", \
                             got {level:?} ({e})"
                        ),
                    );
                }
                raw.log.level.trim().to_owned()
            },
        },
    };
    p.into_result(config)
}

fn validate_nats(raw: &raw::RawNats, p: &mut Problems) -> NatsConfig {
    if raw.servers.is_empty() {
        p.push(
            "nats.servers",
            "expected at least one server URL such as \"nats://127.0.0.1:4222\", got an empty list",
        );
    }
    let servers = raw
        .servers
        .iter()
        .enumerate()
        .filter_map(|(i, server)| nats_url(p, &format!("nats.servers[{i}]"), server))
        .collect();

    if !is_subject_token(&raw.prefix) {
        p.push(
            "nats.prefix",
            format!(
                "expected a single NATS subject token of 1-32 characters from [A-Za-z0-9_-], \
                 got {:?}",
                raw.prefix
            ),
        );
    }

    let credentials_file = secret_file(p, "nats.credentials_file", &raw.credentials_file);
    let nkey_seed_file = secret_file(p, "nats.nkey_seed_file", &raw.nkey_seed_file);
    let token_file = secret_file(p, "nats.token_file", &raw.token_file);
    let password_file = secret_file(p, "nats.password_file", &raw.password_file);
    if !raw.user.is_empty() && raw.password_file.is_empty() {
        p.push(
            "nats.password_file",
            "expected the path of the file holding nats.user's password, because nats.user is \
             set",
        );
    }
    if raw.user.is_empty() && !raw.password_file.is_empty() {
        p.push(
            "nats.user",
            "expected the user name that nats.password_file is the password of",
        );
    }
    let methods: Vec<&str> = [
        ("credentials_file", !raw.credentials_file.is_empty()),
        ("nkey_seed_file", !raw.nkey_seed_file.is_empty()),
        ("token_file", !raw.token_file.is_empty()),
        (
            "user + password_file",
            !raw.user.is_empty() || !raw.password_file.is_empty(),
        ),
    ]
    .into_iter()
    .filter_map(|(name, set)| set.then_some(name))
    .collect();
    if methods.len() > 1 {
        p.push(
            "nats",
            format!(
                "expected at most one authentication method, got {}",
                methods.join(" and ")
            ),
        );
    }
    let auth = if let Some(file) = credentials_file {
        NatsAuth::CredentialsFile(file)
    } else if let Some(file) = nkey_seed_file {
        NatsAuth::NkeySeedFile(file)
    } else if let Some(file) = token_file {
        NatsAuth::TokenFile(file)
    } else if let Some(password_file) = password_file {
        NatsAuth::UserPassword {
            user: raw.user.clone(),
            password_file,
        }
    } else {
        NatsAuth::None
    };

    NatsConfig {
        servers,
        prefix: raw.prefix.clone(),
        replicas: in_range(p, "nats.replicas", raw.replicas, 1, 5),
        auth,
        tls_ca_file: optional_path(p, "nats.tls_ca_file", &raw.tls_ca_file),
        connect_timeout: seconds(
            p,
            "nats.connect_timeout_secs",
            raw.connect_timeout_secs,
            1,
            MAX_CONNECT_TIMEOUT_SECS,
        ),
        ack_wait: seconds(p, "nats.ack_wait_secs", raw.ack_wait_secs, 3, 3600),
    }
}

fn validate_worker(raw: &raw::RawWorker, p: &mut Problems) -> WorkerConfig {
    if !raw.name.is_empty() && !is_worker_name(&raw.name) {
        p.push(
            "worker.name",
            format!(
                "expected \"\" (the host name) or 1-64 characters from [A-Za-z0-9_.-], got {:?}",
                raw.name
            ),
        );
    }
    let build_slots = in_range(p, "worker.build_slots", raw.build_slots, 0, 64);
    let import_slots = in_range(p, "worker.import_slots", raw.import_slots, 0, 64);
    if build_slots == 0 && import_slots == 0 {
        p.push(
            "worker.build_slots",
            "expected build_slots or import_slots above 0: with both at 0 this worker takes no \
             jobs",
        );
    }
    let max_job_timeout = seconds(
        p,
        "worker.max_job_timeout_secs",
        raw.max_job_timeout_secs,
        1,
        MAX_JOB_TIMEOUT_SECS,
    );
    let default_job_timeout = seconds(
        p,
        "worker.default_job_timeout_secs",
        raw.default_job_timeout_secs,
        1,
        MAX_JOB_TIMEOUT_SECS,
    );
    if raw.default_job_timeout_secs > raw.max_job_timeout_secs {
        p.push(
            "worker.default_job_timeout_secs",
            format!(
                "expected at most worker.max_job_timeout_secs ({}), got {}",
                raw.max_job_timeout_secs, raw.default_job_timeout_secs
            ),
        );
    }
    let retry_max_delay = seconds(
        p,
        "worker.retry_max_delay_secs",
        raw.retry_max_delay_secs,
        1,
        MAX_DELAY_SECS,
    );
    let retry_base_delay = seconds(
        p,
        "worker.retry_base_delay_secs",
        raw.retry_base_delay_secs,
        1,
        MAX_DELAY_SECS,
    );
    if raw.retry_base_delay_secs > raw.retry_max_delay_secs {
        p.push(
            "worker.retry_base_delay_secs",
            format!(
                "expected at most worker.retry_max_delay_secs ({}), got {}",
                raw.retry_max_delay_secs, raw.retry_base_delay_secs
            ),
        );
    }
    let max_attempts = raw.max_attempts;
    if !(1..CONSUMER_MAX_DELIVER).contains(&max_attempts) {
        p.push(
            "worker.max_attempts",
            format!(
                "expected an integer from 1 to {}, below the job consumer's max_deliver of \
                 {CONSUMER_MAX_DELIVER}, got {max_attempts}",
                CONSUMER_MAX_DELIVER - 1
            ),
        );
    }

    WorkerConfig {
        name: raw.name.clone(),
        build_slots,
        import_slots,
        work_root: absolute_path(p, "worker.work_root", &raw.work_root),
        grace_period: seconds(
            p,
            "worker.grace_period_secs",
            raw.grace_period_secs,
            1,
            86_400,
        ),
        max_job_timeout,
        default_job_timeout,
        max_attempts,
        max_lost_attempts: in_range(
            p,
            "worker.max_lost_attempts",
            raw.max_lost_attempts,
            0,
            CONSUMER_MAX_DELIVER - 1,
        ),
        retry_base_delay,
        retry_max_delay,
        min_free_bytes: u64::from(in_range(
            p,
            "worker.min_free_mib",
            raw.min_free_mib,
            0,
            MAX_MIN_FREE_MIB,
        )) << 20,
    }
}

fn validate_sources(raw: &raw::RawSources, p: &mut Problems) -> SourcesConfig {
    let at_least = |p: &mut Problems, path: &str, value: u64, min: u64| {
        if value < min {
            p.push(
                path,
                format!("expected an integer of at least {min}, got {value}"),
            );
        }
        value.max(min)
    };
    SourcesConfig {
        max_fetch_bytes: at_least(p, "sources.max_fetch_bytes", raw.max_fetch_bytes, 1 << 20),
        max_context_bytes: at_least(
            p,
            "sources.max_context_bytes",
            raw.max_context_bytes,
            1 << 20,
        ),
        max_entries: at_least(p, "sources.max_entries", raw.max_entries, 1),
        max_path_depth: in_range(p, "sources.max_path_depth", raw.max_path_depth, 1, 4096),
        download_connect_timeout: seconds(
            p,
            "sources.download_connect_timeout_secs",
            raw.download_connect_timeout_secs,
            1,
            MAX_CONNECT_TIMEOUT_SECS,
        ),
        download_read_timeout: seconds(
            p,
            "sources.download_read_timeout_secs",
            raw.download_read_timeout_secs,
            1,
            MAX_DELAY_SECS,
        ),
        isolation: keyword(p, "sources.isolation", &raw.isolation, Isolation::Process),
        child: ChildLimits {
            memory_bytes: u64::from(in_range(
                p,
                "sources.child_memory_mib",
                raw.child_memory_mib,
                256,
                1 << 20,
            )) << 20,
            cpu_secs: u64::from(in_range(
                p,
                "sources.child_cpu_secs",
                raw.child_cpu_secs,
                1,
                86_400,
            )),
            open_files: u64::from(in_range(
                p,
                "sources.child_open_files",
                raw.child_open_files,
                64,
                1 << 20,
            )),
            file_size_bytes: u64::from(in_range(
                p,
                "sources.child_file_size_mib",
                raw.child_file_size_mib,
                1,
                u32::MAX,
            )) << 20,
        },
    }
}

fn validate_builder(raw: &raw::RawBuilder, p: &mut Problems) -> BuilderConfig {
    BuilderConfig {
        backend: keyword(p, "builder.backend", &raw.backend, BuilderBackend::Docker),
        docker_host: daemon_addr(p, "builder.docker_host", &raw.docker_host, ""),
        buildkitd_addr: if raw.buildkitd_addr == BUILDKITD_DOCKER_ENGINE {
            BuildkitdAddr::DockerEngine
        } else {
            BuildkitdAddr::Daemon(daemon_addr(
                p,
                "builder.buildkitd_addr",
                &raw.buildkitd_addr,
                "\"docker-engine\", ",
            ))
        },
        allowed_frontends: raw
            .allowed_frontends
            .iter()
            .enumerate()
            .filter_map(|(i, f)| {
                let canonical = crate::context::frontend::canonical(f);
                if canonical.is_none() {
                    p.push(
                        format!("builder.allowed_frontends[{i}]"),
                        format!("expected an image reference, got {f:?}"),
                    );
                }
                canonical
            })
            .collect(),
    }
}

fn validate_destination(
    raw: &raw::RawDestination,
    insecure: &[String],
    p: &mut Problems,
) -> DestinationConfig {
    let kind = keyword(p, "destination.kind", &raw.kind, DestinationKind::OciLayout);

    let path = PathBuf::from(&raw.path);
    if kind == DestinationKind::OciLayout && !path.is_absolute() {
        p.push(
            "destination.path",
            format!(
                "expected an absolute path, because destination.kind is \"oci-layout\", got {:?}",
                raw.path
            ),
        );
    }

    let registry = if raw.registry.is_empty() {
        if kind == DestinationKind::Registry {
            p.push(
                "destination.registry",
                "expected a registry such as \"registry.example.com:5000\", because \
                 destination.kind is \"registry\", got an empty string",
            );
        }
        None
    } else {
        registry_target(p, &raw.registry, insecure)
    };
    // The typed config carries a target only for the kind that pushes to one.
    let registry = registry.filter(|_| kind == DestinationKind::Registry);

    if !raw.namespace.is_empty() && !is_repository_text(&raw.namespace) {
        p.push(
            "destination.namespace",
            format!(
                "expected \"\" or lowercase path components of [a-z0-9._-] separated by '/', \
                 got {:?}",
                raw.namespace
            ),
        );
    }
    let repository = template(
        p,
        "destination.repository",
        &raw.repository,
        &raw.namespace,
        TemplateText::Repository,
    );
    let tag = template(
        p,
        "destination.tag",
        &raw.tag,
        &raw.namespace,
        TemplateText::Tag,
    );

    let password_file = secret_file(p, "destination.password_file", &raw.password_file);
    if !raw.username.is_empty() && raw.password_file.is_empty() {
        p.push(
            "destination.password_file",
            "expected the path of the file holding the registry password, because \
             destination.username is set",
        );
    }
    if raw.username.is_empty() && !raw.password_file.is_empty() {
        p.push(
            "destination.username",
            "expected the user name that destination.password_file is the password of",
        );
    }
    let credentials = password_file
        .filter(|_| !raw.username.is_empty())
        .map(|password_file| RegistryCredentials {
            username: raw.username.clone(),
            password_file,
        });

    DestinationConfig {
        kind,
        path,
        registry,
        repository,
        tag,
        namespace: raw.namespace.clone(),
        credentials,
    }
}

fn validate_registries(raw: &raw::RawRegistries, p: &mut Problems) -> RegistriesConfig {
    let mut credentials = Vec::new();
    for (host, login) in &raw.credentials {
        let path = format!("registries.credentials.{host:?}");
        if let Err(why) = bare_authority(host) {
            p.push(
                path.clone(),
                format!("expected a registry host or host:port as the key ({why})"),
            );
        }
        if login.username.is_empty() {
            p.push(format!("{path}.username"), "expected a user name, got \"\"");
        }
        for (i, entry) in login.sources.iter().flatten().enumerate() {
            let id = entry.strip_suffix('*').unwrap_or(entry);
            let valid = id.len() <= 128
                && (!id.is_empty() || entry == "*")
                && id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
            if !valid {
                p.push(
                    format!("{path}.sources[{i}]"),
                    format!(
                        "expected a source_id (1-128 of [A-Za-z0-9_-]) or such a prefix \
                         followed by `*`, got {entry:?}"
                    ),
                );
            }
        }
        let file = secret_file(p, &format!("{path}.password_file"), &login.password_file);
        match file {
            Some(password_file) => credentials.push((
                host.clone(),
                NodeLogin {
                    login: RegistryCredentials {
                        username: login.username.clone(),
                        password_file,
                    },
                    sources: login.sources.clone(),
                },
            )),
            None if login.password_file.is_empty() => p.push(
                format!("{path}.password_file"),
                "expected the path of the file holding the password or token",
            ),
            None => {}
        }
    }
    for (i, entry) in raw.insecure.iter().enumerate() {
        let path = format!("registries.insecure[{i}]");
        if let Err(why) = bare_authority(entry) {
            p.push(
                path,
                format!("expected host or host:port ({why}), got {entry:?}"),
            );
        }
    }

    if raw.platforms.is_empty() {
        p.push(
            "registries.platforms",
            "expected at least one platform such as \"linux/amd64\", got an empty list",
        );
    }
    let platforms = raw
        .platforms
        .iter()
        .enumerate()
        .filter_map(|(i, text)| {
            let platform = parse_platform(text);
            if platform.is_none() {
                p.push(
                    format!("registries.platforms[{i}]"),
                    format!(
                        "expected os/arch or os/arch/variant in lowercase, such as \
                         \"linux/arm64/v8\", got {text:?}"
                    ),
                );
            }
            platform
        })
        .collect();

    let mut mirrors = BTreeMap::new();
    for (registry, urls) in &raw.mirrors {
        let path = format!("registries.mirrors.{registry:?}");
        if let Err(why) = bare_authority(registry) {
            p.push(
                path.clone(),
                format!("expected a registry host or host:port as the key ({why})"),
            );
        }
        let urls = urls
            .iter()
            .enumerate()
            .filter_map(|(i, url)| mirror_url(p, &format!("{path}[{i}]"), url))
            .collect();
        mirrors.insert(registry.clone(), urls);
    }

    if !(1024..=64 * 1024 * 1024).contains(&raw.max_manifest_bytes) {
        p.push(
            "registries.max_manifest_bytes",
            format!(
                "expected a number of bytes from 1024 to 67108864, got {}",
                raw.max_manifest_bytes
            ),
        );
    }
    if !(16..=1024 * 1024).contains(&raw.webhook_max_bytes) {
        p.push(
            "registries.webhook_max_bytes",
            format!(
                "expected a number of bytes from 16 to 1048576, got {}",
                raw.webhook_max_bytes
            ),
        );
    }
    let ecr_endpoint = if raw.ecr_endpoint.is_empty() {
        None
    } else {
        mirror_url(p, "registries.ecr_endpoint", &raw.ecr_endpoint)
    };

    if raw.max_blob_bytes < 1024 {
        p.push(
            "registries.max_blob_bytes",
            format!(
                "expected a number of bytes of at least 1024, got {}",
                raw.max_blob_bytes
            ),
        );
    }
    RegistriesConfig {
        max_manifest_bytes: raw.max_manifest_bytes.clamp(1024, 64 * 1024 * 1024) as usize,
        max_blob_bytes: raw.max_blob_bytes.max(1024),
        ecr_endpoint,
        webhook_timeout: seconds(
            p,
            "registries.webhook_timeout_secs",
            raw.webhook_timeout_secs,
            1,
            300,
        ),
        webhook_max_bytes: raw.webhook_max_bytes.clamp(16, 1024 * 1024) as usize,
        credentials,
        insecure: raw.insecure.clone(),
        platforms,
        mirrors,
        max_parallel_blobs: in_range(
            p,
            "registries.max_parallel_blobs",
            raw.max_parallel_blobs,
            1,
            64,
        ),
    }
}
