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
//! 2. **Validation** ([`validate()`]): a pure function from `RawConfig` to [`Config`] that checks
//!    every key, reports every problem at once, and produces typed values (`Url`, `PathBuf`,
//!    `SocketAddr`, `Duration`, enums), so no other module parses configuration text.
//!
//! What this module must not do: read or change the process environment (the caller passes it
//! in, so tests stay hermetic and the daemon's environment is read in exactly one place); hold a
//! secret (credentials are configured as paths to files that the modules using them read, so
//! neither a `Config` nor an error message quoting it can leak one); or open connections and
//! create directories (whether a path is usable is found out by the code that uses it, and
//! reported there with its context). Its only I/O is reading the file and the host name, in
//! [`load()`].
//!
//! # Layout
//!
//! * `load` — reading the file and the host name, layering the environment, running both
//!   phases: [`load()`], [`from_toml_str`], [`ConfigError`].
//! * [`raw`] — the file's shape with the built-in defaults; `layers` — merging the file and
//!   environment layers into a [`RawConfig`].
//! * `validate` — phase two, [`validate()`]; `checks` — its checks, one per kind of value.
//! * `types` — the typed [`Config`] and its sections.

pub mod raw;

mod checks;
mod layers;
mod load;
#[cfg(test)]
mod tests;
mod types;
mod validate;

pub use load::{from_toml_str, load, ConfigError, DEFAULT_CONFIG_PATH, ENV_PREFIX, HOSTNAME_PATH};
pub use raw::{RawBuildCache, RawConfig};
pub use types::{
    source_scope_matches, BuildCacheConfig, BuilderBackend, BuilderConfig, BuildkitdAddr,
    ChildLimits, Config, DaemonAddr, DestinationConfig, DestinationKind, EgressConfig, GitConfig,
    Isolation, LogConfig, LogFormat, MetricsConfig, NatsAuth, NatsConfig, NodeLogin, Platform,
    RegistriesConfig, RegistryCredentials, RegistryTarget, SourcesConfig, StoreConfig, Template,
    TemplateValues, UnalignedHash, WorkerConfig, TEMPLATE_PLACEHOLDERS,
};
pub use validate::validate;
