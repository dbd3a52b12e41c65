//! Composition root: turns a parsed command into work. Each command is a module of its own
//! (`serve`, `run`, `submit`, `validate`); this one holds what they share — the runtime, config
//! loading and its problem report, logging, the production stages, and exit codes.

mod run;
mod serve;
mod store;
mod submit;
mod validate;

use std::collections::HashMap;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use crate::adapters::buildkit;
use crate::adapters::credentials::OriginCredentials;
use crate::adapters::oci::RegistryImporter;
use crate::adapters::sources::SourceFetcher;
use crate::config::{self, Config, ConfigError};
use crate::job::{self, EventEnvelope, JobEvent, Status};
use crate::pipeline::{DestinationSettings, Stages};
use crate::telemetry::{self, LogStyle};

pub use run::run;
pub use serve::{run_serve, serve};
pub use store::store;
pub use submit::submit;
pub use validate::validate;

/// Invalid input (a job or a config), as the contract fixes it.
pub const EXIT_INVALID: u8 = 64;
/// `EX_UNAVAILABLE`: NATS (or another service) cannot be reached.
pub const EXIT_UNAVAILABLE: u8 = 69;
/// `EX_NOINPUT`: a named file cannot be read.
pub const EXIT_NO_INPUT: u8 = 66;
/// `EX_TEMPFAIL`: gave up waiting for a result.
pub const EXIT_WAIT_TIMEOUT: u8 = 75;
/// A job that ended `failed`.
pub const EXIT_JOB_FAILED: u8 = 1;
/// A job that ended `cancelled`.
pub const EXIT_JOB_CANCELLED: u8 = 2;

pub fn version_line() -> String {
    format!(
        "factoryd {} (job wire format v{})",
        env!("CARGO_PKG_VERSION"),
        job::WIRE_VERSION
    )
}

/// The multi-threaded runtime every async command runs on.
pub fn runtime() -> tokio::runtime::Runtime {
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("factoryd: cannot start the async runtime: {e}");
            std::process::exit(i32::from(EXIT_UNAVAILABLE));
        }
    }
}

/// Loads the config or says why not, with the exit code to use.
pub fn load_config(path: Option<&Path>, env: &HashMap<String, String>) -> Result<Config, ExitCode> {
    match config::load(path, env) {
        Ok(c) => Ok(c),
        Err(ConfigError::Invalid(problems)) => {
            print_problems("config", &problems);
            Err(ExitCode::from(EXIT_INVALID))
        }
        Err(e) => {
            eprintln!("config: {e}");
            Err(ExitCode::from(EXIT_NO_INPUT))
        }
    }
}

pub fn init_logs(config: &Config, env: &HashMap<String, String>) {
    telemetry::init(log_style(config.log.format, env), &config.log.level);
}

/// The configured log format, with `auto` settled when the environment says where stderr goes.
fn log_style(format: config::LogFormat, env: &HashMap<String, String>) -> LogStyle {
    match format {
        config::LogFormat::Text => LogStyle::Text,
        config::LogFormat::Json => LogStyle::Json,
        // Under systemd, stderr goes to the journal (systemd sets JOURNAL_STREAM to say so):
        // structured lines.
        config::LogFormat::Auto if env.contains_key("JOURNAL_STREAM") => LogStyle::Json,
        config::LogFormat::Auto => LogStyle::Auto,
    }
}

/// The stages of a production worker: the real adapters where this build has them.
pub fn production_stages(config: &Config) -> Result<Stages, crate::error::JobError> {
    let node_registry_auth = node_registry_auth(config)?;
    let build_cache = config
        .builder
        .cache
        .as_ref()
        .map(crate::pipeline::BuildCacheSettings::load)
        .transpose()?;
    let mut node_secrets = nats_secrets(&config.nats.auth);
    node_secrets.extend(node_registry_auth.iter().map(|n| n.auth.password.clone()));
    node_secrets.extend(
        build_cache
            .iter()
            .filter_map(|c| c.auth().map(|a| a.password.clone())),
    );
    let fetcher: Arc<dyn crate::ports::Fetcher> = match config.sources.isolation {
        config::Isolation::Process => {
            // The running binary itself, even after a package upgrade replaced the file: a
            // child of another version could speak another protocol.
            let this = std::path::PathBuf::from("/proc/self/exe");
            let program = if this.exists() {
                this
            } else {
                std::env::current_exe().map_err(|e| {
                    crate::error::JobError::transient(
                        crate::error::Stage::Fetch,
                        crate::error::ErrorCode::LocalIo,
                        format!("cannot find this program to start source processes: {e}"),
                    )
                })?
            };
            Arc::new(crate::sandbox::ConfinedFetcher::new(program, config))
        }
        config::Isolation::None => Arc::new(SourceFetcher::new(config)?),
    };
    Ok(Stages {
        fetcher,
        builder: buildkit::from_config(config)?,
        resolver: Arc::new(OriginCredentials::from_config(config)?),
        importer: Arc::new(RegistryImporter::from_config(config)?),
        node_registry_auth,
        node_secrets,
        allowed_frontends: config.builder.allowed_frontends.clone(),
        insecure_registries: config.registries.insecure.clone(),
        destinations: DestinationSettings::new(config.destination.clone()),
        build_cache,
    })
}

/// The worker's own NATS credentials, for masking: a job never receives them, but a server a
/// job talks to must not be able to make them appear in its text either. A file that cannot be
/// read here adds nothing (the connection reports it).
pub(crate) fn nats_secrets(auth: &config::NatsAuth) -> Vec<crate::secret::Secret> {
    let file = match auth {
        config::NatsAuth::None => return Vec::new(),
        config::NatsAuth::CredentialsFile(f)
        | config::NatsAuth::NkeySeedFile(f)
        | config::NatsAuth::TokenFile(f) => f,
        config::NatsAuth::UserPassword { password_file, .. } => password_file,
    };
    // A `.creds` file is masked line by line (the redactor masks each long line of a value).
    std::fs::read_to_string(file)
        .map(|text| vec![crate::secret::Secret::new(text.trim())])
        .unwrap_or_default()
}

/// `registries.credentials`, with each password read from its file now: a file that cannot be
/// read stops the start-up rather than failing every build that needs it.
fn node_registry_auth(
    config: &Config,
) -> Result<Vec<crate::pipeline::NodeRegistryAuth>, crate::error::JobError> {
    config
        .registries
        .credentials
        .iter()
        .map(|(host, node)| {
            let login = &node.login;
            let text = std::fs::read_to_string(&login.password_file).map_err(|e| {
                crate::error::JobError::transient(
                    crate::error::Stage::Resolve,
                    crate::error::ErrorCode::LocalIo,
                    format!(
                        "cannot read registries.credentials.{host:?}.password_file {}: {e}",
                        login.password_file.display()
                    ),
                )
            })?;
            Ok(crate::pipeline::NodeRegistryAuth {
                host: host.clone(),
                auth: crate::ports::BasicAuth {
                    username: login.username.clone(),
                    password: crate::secret::Secret::new(text.trim_end_matches(['\r', '\n'])),
                },
                sources: node.sources.clone(),
            })
        })
        .collect()
}

/// Prints a report of `problems` found in `what` (a file, or `config`) to stderr.
pub(crate) fn print_problems(what: &str, problems: &crate::problems::Problems) {
    eprintln!("{what}: {} problem(s):", problems.len());
    for p in problems.iter() {
        eprintln!("  {p}");
    }
}

/// The exit code that reports a job's end (`run`, `submit --wait`).
pub(crate) fn exit_code(status: Status) -> ExitCode {
    ExitCode::from(match status {
        Status::Succeeded => 0,
        Status::Failed => EXIT_JOB_FAILED,
        Status::Cancelled => EXIT_JOB_CANCELLED,
    })
}

/// One event as a line; on a terminal, progress updates rewrite one status line.
pub(crate) fn show_event(envelope: &EventEnvelope, live: bool) {
    let line = match &envelope.event {
        JobEvent::Started { kind, worker } => {
            format!("attempt {}: {kind} started on {worker}", envelope.attempt)
        }
        JobEvent::Stage { stage } => format!("stage {stage}"),
        JobEvent::Progress {
            stage,
            item,
            done_bytes,
            total_bytes,
        } => {
            let total = total_bytes.map(|t| format!(" of {t}")).unwrap_or_default();
            let text = format!("{stage} {item}: {done_bytes}{total} bytes");
            if live {
                eprint!("\r\x1b[2K{text}");
                return;
            }
            text
        }
        JobEvent::Log { lines } => lines.join("\n"),
        JobEvent::Warning { code, message } => format!("warning ({code}): {message}"),
        JobEvent::Retrying { error, delay_ms } => format!(
            "attempt {} failed ({}, {}): {}; retrying in {} s",
            envelope.attempt,
            error.class,
            error.code,
            error.message,
            delay_ms / 1000
        ),
        JobEvent::Finished { status } => format!("finished: {}", status.as_str()),
    };
    if live {
        eprint!("\r\x1b[2K");
    }
    eprintln!("{line}");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::LogFormat;

    #[test]
    fn auto_log_format_is_json_under_journald() {
        let journal = HashMap::from([("JOURNAL_STREAM".to_owned(), "8:12345".to_owned())]);
        assert_eq!(log_style(LogFormat::Auto, &journal), LogStyle::Json);
        assert_eq!(log_style(LogFormat::Auto, &HashMap::new()), LogStyle::Auto);
    }

    #[test]
    fn explicit_log_format_wins_over_journald() {
        let journal = HashMap::from([("JOURNAL_STREAM".to_owned(), "8:12345".to_owned())]);
        assert_eq!(log_style(LogFormat::Text, &journal), LogStyle::Text);
        assert_eq!(log_style(LogFormat::Json, &HashMap::new()), LogStyle::Json);
    }
}
