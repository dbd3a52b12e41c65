//! Loading: reading the configuration file and the host name, layering the environment over
//! them, and running both phases ([`super::layers`] lowering into a
//! [`RawConfig`](super::RawConfig), then
//! [`super::validate()`]) to produce the typed [`Config`].
//!
//! The only I/O of the configuration module lives here: reading the file and the host name. The
//! environment is handed in by the caller as a map, never read from the process.

use std::collections::{HashMap, HashSet};
use std::io;
use std::path::{Path, PathBuf};

use super::checks::is_worker_name;
use super::layers;
use super::types::{Config, WorkerConfig};
use super::validate::validate;
use crate::problems::Problems;

/// The file read when no `--config` is given; its absence is not an error.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/factoryd/factoryd.toml";

/// Where an empty `worker.name` is taken from.
pub const HOSTNAME_PATH: &str = "/proc/sys/kernel/hostname";

/// Prefix of the environment variables that override the file: `FACTORYD__WORKER__BUILD_SLOTS=3`
/// sets `worker.build_slots`. List keys take a comma-separated value.
pub const ENV_PREFIX: &str = layers::ENV_PREFIX;

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
pub(super) fn load_with(
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
