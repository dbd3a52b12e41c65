//! Phase two: [`validate()`], the pure function from a [`RawConfig`] to a [`Config`] that checks
//! every key and reports every problem at once.
//!
//! One function per section; the checks for each kind of value are in `checks`. No I/O here:
//! the same input always gives the same problems in the same order.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::checks::{
    absolute_path, bare_authority, daemon_addr, in_range, is_repository_text, is_subject_token,
    is_worker_name, keyword, mirror_url, nats_url, optional_path, parse_platform, registry_target,
    seconds, secret_file, template, TemplateText,
};
use super::raw::{self, RawConfig};
use super::types::{
    BuildCacheConfig, BuilderBackend, BuilderConfig, BuildkitdAddr, ChildLimits, Config,
    DestinationConfig, DestinationKind, EgressConfig, GitConfig, Isolation, LogConfig, LogFormat,
    MetricsConfig, NatsAuth, NatsConfig, NodeLogin, RegistriesConfig, RegistryCredentials,
    SourcesConfig, StoreConfig, UnalignedHash, WorkerConfig, BUILDKITD_DOCKER_ENGINE,
};
use crate::problems::Problems;

/// The JetStream consumer redelivers a job at most this many times; the worker's own retry
/// budget must stay below it so that the last attempt is the worker's decision, not a silent
/// redelivery cut-off.
const CONSUMER_MAX_DELIVER: u32 = 5;

/// Upper bounds on durations: a value near `u64::MAX` seconds would make `Instant + Duration`
/// overflow and panic at the first job instead of failing here with a message.
const MAX_JOB_TIMEOUT_SECS: u64 = 7 * 24 * 3600;
const MAX_DELAY_SECS: u64 = 24 * 3600;
const MAX_CONNECT_TIMEOUT_SECS: u64 = 300;
/// Upper bound of `builder.cache_keep_bytes`: the Docker Engine and BuildKit take the limit
/// as a signed 64-bit number.
const MAX_CACHE_KEEP_BYTES: u64 = i64::MAX as u64;

/// Upper bound of `worker.min_free_mib`: 1 TiB.
const MAX_MIN_FREE_MIB: u32 = 1 << 20;

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
        builder: validate_builder(&raw, &mut p),
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
        store: validate_store(&raw.store, &mut p),
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
        min_free_inodes: {
            if raw.min_free_inodes > 1 << 32 {
                p.push(
                    "worker.min_free_inodes",
                    format!("expected 0 to 4294967296, got {}", raw.min_free_inodes),
                );
            }
            raw.min_free_inodes
        },
    }
}

fn validate_store(raw: &raw::RawStore, p: &mut Problems) -> StoreConfig {
    const DAY: u64 = 24 * 3600;
    let keep_per_source = in_range(p, "store.keep_per_source", raw.keep_per_source, 0, 100_000);
    let max_age_days = in_range(p, "store.max_age_days", raw.max_age_days, 0, 36_500);
    let min_age = if raw.min_age_secs == 0 {
        Duration::ZERO
    } else {
        seconds(p, "store.min_age_secs", raw.min_age_secs, 1, 30 * DAY)
    };
    let gc_interval = (raw.gc_interval_secs != 0).then(|| {
        seconds(
            p,
            "store.gc_interval_secs",
            raw.gc_interval_secs,
            10,
            7 * DAY,
        )
    });
    StoreConfig {
        retention: crate::store::Policy {
            keep_per_source,
            max_age: (max_age_days != 0)
                .then(|| Duration::from_secs(u64::from(max_age_days) * DAY)),
            max_bytes: raw.max_bytes,
            min_age,
        },
        gc_interval,
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

fn validate_builder(whole: &RawConfig, p: &mut Problems) -> BuilderConfig {
    let raw = &whole.builder;
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
        cache_keep_bytes: {
            let value = raw.cache_keep_bytes;
            if value > MAX_CACHE_KEEP_BYTES {
                p.push(
                    "builder.cache_keep_bytes",
                    format!("expected 0 to {MAX_CACHE_KEEP_BYTES} bytes, got {value}"),
                );
            }
            value
        },
        cache: validate_build_cache(whole, p),
    }
}

/// `[builder.cache]`. Its registry must be one of its own: the session that carries its
/// credentials answers them for every image of that host, so it must not be a host a build
/// pulls from or pushes its product to (README, Builds).
fn validate_build_cache(whole: &RawConfig, p: &mut Problems) -> Option<BuildCacheConfig> {
    let raw = &whole.builder.cache;
    if raw.registry.is_empty() {
        for (key, value) in [
            ("username", &raw.username),
            ("password_file", &raw.password_file),
        ] {
            if !value.is_empty() {
                p.push(
                    "builder.cache.registry",
                    format!(
                        "expected the cache registry, because builder.cache.{key} is set, got an \
                         empty string"
                    ),
                );
                break;
            }
        }
        return None;
    }
    let registry = registry_target(
        p,
        "builder.cache.registry",
        &raw.registry,
        &whole.registries.insecure,
    );
    if let Some(target) = &registry {
        let host = target.authority.as_str();
        let destination = whole.destination.registry.as_str();
        let destination = destination
            .split_once("://")
            .map_or(destination, |(_, authority)| authority);
        if destination.eq_ignore_ascii_case(host) {
            p.push(
                "builder.cache.registry",
                format!(
                    "expected a registry of its own, not destination.registry ({host:?}): builds \
                     would be offered the cache's credentials for every image there"
                ),
            );
        }
        if whole
            .registries
            .credentials
            .keys()
            .any(|h| h.eq_ignore_ascii_case(host))
        {
            p.push(
                "builder.cache.registry",
                format!(
                    "expected a registry of its own, not one of registries.credentials \
                     ({host:?}): a build offered both would get one of them for either use"
                ),
            );
        }
    }

    let repository = template(
        p,
        "builder.cache.repository",
        &raw.repository,
        &whole.destination.namespace,
        TemplateText::Repository,
    );
    if !raw.repository.contains("{source_id}") {
        p.push(
            "builder.cache.repository",
            format!(
                "expected a template containing {{source_id}}, so that each source has a cache \
                 of its own, got {:?}",
                raw.repository
            ),
        );
    }
    for placeholder in ["{job_id}", "{kind}"] {
        if raw.repository.contains(placeholder) {
            p.push(
                "builder.cache.repository",
                format!(
                    "expected a template with only {{source_id}} and {{namespace}}: {placeholder} \
                     would give every job a cache of its own, got {:?}",
                    raw.repository
                ),
            );
        }
    }

    let password_file = secret_file(p, "builder.cache.password_file", &raw.password_file);
    if !raw.username.is_empty() && raw.password_file.is_empty() {
        p.push(
            "builder.cache.password_file",
            "expected the path of the file holding the cache registry's password, because \
             builder.cache.username is set",
        );
    }
    if raw.username.is_empty() && !raw.password_file.is_empty() {
        p.push(
            "builder.cache.username",
            "expected the user name that builder.cache.password_file is the password of",
        );
    }
    let credentials = password_file
        .filter(|_| !raw.username.is_empty())
        .map(|password_file| RegistryCredentials {
            username: raw.username.clone(),
            password_file,
        });
    Some(BuildCacheConfig {
        registry: registry?,
        repository,
        namespace: whole.destination.namespace.clone(),
        credentials,
    })
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
        registry_target(p, "destination.registry", &raw.registry, insecure)
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
