//! The fleet's shared build cache (`[builder.cache]`) as one build sees it: its source's own
//! repository in the cache registry ([`BuildCacheSettings::for_job`]), and the rule that no
//! build may name that registry itself ([`check_not_named`]).
//!
//! Why the rule: BuildKit asks the build's session for a registry's credentials by host only,
//! for the cache import and export and for the build's own images alike. A build file whose
//! `FROM` (or `COPY --from`, `RUN --mount=from=`) named an image on the cache registry would be
//! given the cache's credentials for it, and could read another source's cache. So a build
//! file or build argument that names the cache registry is refused before BuildKit is called;
//! the registry must be one no build needs (README, Builds: what this does not catch).
//!
//! Must not: put the cache's credentials anywhere but the [`BuildCache`] handed to the builder.

use std::collections::BTreeMap;

use crate::config::{BuildCacheConfig, TemplateValues};
use crate::error::{ErrorCode, JobError, Stage};
use crate::job::{BuildOptions, Job};
use crate::ports::{BasicAuth, BuildCache};
use crate::reference::Reference;
use crate::secret::Secret;

/// `[builder.cache]` with its password read.
#[derive(Debug, Clone)]
pub struct BuildCacheSettings {
    config: BuildCacheConfig,
    auth: Option<BasicAuth>,
}

impl BuildCacheSettings {
    /// Reads the password file now: a file that cannot be read stops the start-up rather than
    /// making every build go without its cache.
    pub fn load(config: &BuildCacheConfig) -> Result<BuildCacheSettings, JobError> {
        let auth = match &config.credentials {
            None => None,
            Some(credentials) => {
                let text = std::fs::read_to_string(&credentials.password_file).map_err(|e| {
                    JobError::transient(
                        Stage::Resolve,
                        ErrorCode::LocalIo,
                        format!(
                            "cannot read builder.cache.password_file {}: {e}",
                            credentials.password_file.display()
                        ),
                    )
                })?;
                Some(BasicAuth {
                    username: credentials.username.clone(),
                    password: Secret::new(text.trim_end_matches(['\r', '\n'])),
                })
            }
        };
        Ok(BuildCacheSettings {
            config: config.clone(),
            auth,
        })
    }

    /// The settings with credentials given, not read (tests).
    pub fn with_auth(config: BuildCacheConfig, auth: Option<BasicAuth>) -> BuildCacheSettings {
        BuildCacheSettings { config, auth }
    }

    /// The cache registry, `host[:port]`.
    pub fn host(&self) -> &str {
        &self.config.registry.authority
    }

    /// The cache registry's credentials, for masking in every job's text.
    pub fn auth(&self) -> Option<&BasicAuth> {
        self.auth.as_ref()
    }

    /// The cache of `job`'s source; without an import when the job asks for `no_cache`. The
    /// reason when the source has none: its `source_id` does not make a valid repository name
    /// (repositories are lowercase; a source is never given another's cache instead).
    pub fn for_job(&self, job: &Job, options: &BuildOptions) -> Result<BuildCache, String> {
        let c = &self.config;
        let repository = c.repository.render(&TemplateValues {
            source_id: &job.source_id,
            job_id: "",
            namespace: &c.namespace,
            kind: "",
        });
        let host = &c.registry.authority;
        if let Err(e) = Reference::parse(&format!("{host}/{repository}:cache")) {
            return Err(format!(
                "source {:?} has no build cache: {repository:?} is not a valid repository name \
                 ({e})",
                job.source_id
            ));
        }
        Ok(BuildCache {
            registry: host.clone(),
            plain_http: c.registry.plain_http,
            repository,
            auth: self.auth.clone(),
            import: !options.no_cache,
        })
    }
}

/// Refuses a build whose build file or build arguments name the cache registry `host` (an
/// image reference on it, or the host itself, say as an `ARG` default), as BuildKit would read
/// them: case-insensitively, and with the Dockerfile's line continuations (`\` or `` ` ``)
/// joined. A host spelt in pieces that only `ARG` substitution joins is not seen (README).
pub fn check_not_named(
    host: &str,
    build_file_name: &str,
    build_file: &[u8],
    args: &BTreeMap<String, String>,
) -> Result<(), JobError> {
    let refuse = |place: String| {
        JobError::permanent(
            Stage::Build,
            ErrorCode::UnsafeSource,
            format!(
                "{place} names the build cache registry {host}, which builds may not use: its \
                 credentials are this node's (builder.cache)"
            ),
        )
    };
    let text = String::from_utf8_lossy(build_file);
    let joined = join_continuations(&text);
    if names_host(&text, host) || names_host(&joined, host) {
        return Err(refuse(build_file_name.to_owned()));
    }
    for (name, value) in args {
        if names_host(value, host) {
            return Err(refuse(format!("build argument {name}")));
        }
    }
    Ok(())
}

/// `text` with every line continuation (an escape character at the end of a line, either of
/// the two a Dockerfile may choose) removed, so a host split across lines reads whole.
fn join_continuations(text: &str) -> String {
    let mut out = text.replace("\r\n", "\n");
    for escape in ["\\\n", "`\n"] {
        out = out.replace(escape, "");
    }
    out
}

/// Whether `text` holds `host` as a whole host name: not inside a longer name or before
/// another port (`cache.example` is not in `mycache.example` or `cache.example:5000`).
fn names_host(text: &str, host: &str) -> bool {
    let text = text.to_ascii_lowercase();
    let host = host.to_ascii_lowercase();
    let bytes = text.as_bytes();
    let name_before = |b: u8| b.is_ascii_alphanumeric() || b == b'.' || b == b'-';
    let name_after = |b: u8| name_before(b) || b == b':';
    text.match_indices(&host).any(|(at, _)| {
        let before = at.checked_sub(1).map(|i| bytes[i]);
        let after = bytes.get(at + host.len()).copied();
        !before.is_some_and(name_before) && !after.is_some_and(name_after)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(build_file: &str, args: &[(&str, &str)]) -> Result<(), JobError> {
        let args = args
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        check_not_named(
            "cache.example:5000",
            "Dockerfile",
            build_file.as_bytes(),
            &args,
        )
    }

    #[test]
    fn a_build_file_naming_the_cache_registry_is_refused_wherever_it_does() {
        for file in [
            "FROM cache.example:5000/buildcache/other:inline\n",
            "FROM scratch\nCOPY --from=CACHE.EXAMPLE:5000/buildcache/other:cache / /\n",
            "FROM scratch\nRUN --mount=type=bind,from=cache.example:5000/x,target=/x true\n",
            "ARG REGISTRY=cache.example:5000\nFROM ${REGISTRY}/buildcache/other\n",
            "FROM cache.exam\\\nple:5000/buildcache/other\n",
            "# escape=`\nFROM cache.example:`\r\n5000/buildcache/other\n",
        ] {
            let e = check(file, &[]).unwrap_err();
            assert_eq!(e.code, ErrorCode::UnsafeSource, "{file}");
            assert_eq!(e.class, crate::error::ErrorClass::Permanent, "{file}");
            assert!(e.message.contains("Dockerfile names"), "{e}");
        }
    }

    #[test]
    fn a_build_argument_naming_the_cache_registry_is_refused() {
        let e = check(
            "ARG BASE\nFROM $BASE\n",
            &[("BASE", "cache.example:5000/buildcache/other")],
        )
        .unwrap_err();
        assert!(e.message.contains("build argument BASE"), "{e}");
        let e = check("ARG R\nFROM $R/x\n", &[("R", "cache.example:5000")]).unwrap_err();
        assert!(e.message.contains("build argument R"), "{e}");
    }

    #[test]
    fn other_hosts_that_merely_contain_the_name_pass() {
        for file in [
            "FROM mycache.example:5000/x\n",
            "FROM cache.example:50001/x\n",
            "FROM cache.example.org:5000/x\n",
            "FROM registry.example/cache.example:5000-tools\n",
            "FROM scratch\n",
        ] {
            check(file, &[("V", "cache.example:50000")]).unwrap_or_else(|e| panic!("{file}: {e}"));
        }
    }

    #[test]
    fn a_host_without_port_is_not_found_in_the_same_name_with_one() {
        let args = BTreeMap::new();
        let file = b"FROM cache.example:5000/x\n";
        assert!(check_not_named("cache.example", "Dockerfile", file, &args).is_ok());
        let file = b"FROM cache.example/x\n";
        assert!(check_not_named("cache.example", "Dockerfile", file, &args).is_err());
    }
}
