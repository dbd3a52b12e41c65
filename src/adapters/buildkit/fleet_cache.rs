//! The fleet's shared build cache ([`BuildCache`], `[builder.cache]`) on each backend: where a
//! build imports its source's cache from and exports it to, the cache registry's credentials,
//! and the one log line (and, when the cache could not be used, the `Warning`) per build.
//!
//! * **Standalone buildkitd**: BuildKit's registry cache at `REPOSITORY:cache` — imported
//!   through the Dockerfile frontend's `cache-imports`, exported with a `registry` cache export
//!   in `mode=max` (every step's result, intermediate stages included) and `ignore-error=true`
//!   (BuildKit 0.11 and later then finish the build when the export fails).
//! * **Docker Engine** (BuildKit 0.8: no registry cache exporter): inline cache at
//!   `REPOSITORY:inline` — imported as `cachefrom` (`/build`) or `cache-imports` (control
//!   API), written into the image's config (`BUILDKIT_INLINE_CACHE=1` for `/build`, an `inline`
//!   cache export on the control API), and the built image pushed there by the engine once the
//!   destination has it ([`push_inline`]). Inline cache holds the final image's steps only.
//!
//! The cache's credentials go to BuildKit through the build's session Auth, for the cache host
//! only and over any the job brought for it ([`CachePlan::offer_credentials`]), and to the
//! engine's push as `X-Registry-Auth`; never into build arguments, where `RUN` could read them.
//! A failed import or export is a warning, never the build's failure: BuildKit builds on
//! without a cache it cannot import, and a failed push is only reported.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use bollard::auth::DockerCredentials;
use bollard::Docker;
use bollard_buildkit_proto::moby::buildkit::v1::{CacheOptions, CacheOptionsEntry};
use tracing::{info, warn};

use super::export;
use super::progress::{CacheProgress, CacheStep};
use crate::job::{JobEvent, WARNING_BUILD_CACHE};
use crate::ports::{BasicAuth, BuildCache, StageContext};

/// The tag of a standalone buildkitd's registry cache (a cache manifest, not an image).
pub(super) const REGISTRY_CACHE_TAG: &str = "cache";
/// The tag of an engine's image carrying inline cache.
pub(super) const INLINE_CACHE_TAG: &str = "inline";

/// Which kind of cache a backend keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum CacheKind {
    /// BuildKit's registry cache (`mode=max`): a standalone buildkitd.
    Registry,
    /// Inline cache in the built image, pushed by the engine: the Docker Engine.
    Inline,
}

/// One build's use of its source's cache.
#[derive(Debug, Clone)]
pub(super) struct CachePlan {
    pub(super) cache: BuildCache,
    pub(super) kind: CacheKind,
}

impl CachePlan {
    pub(super) fn new(cache: BuildCache, kind: CacheKind) -> CachePlan {
        CachePlan { cache, kind }
    }

    /// `registry/repository:tag` of this kind of cache.
    pub(super) fn reference(&self) -> String {
        self.cache.reference(match self.kind {
            CacheKind::Registry => REGISTRY_CACHE_TAG,
            CacheKind::Inline => INLINE_CACHE_TAG,
        })
    }

    /// The registry cache entry's attributes: the reference, and `registry.insecure` for a
    /// plain-HTTP registry (read by BuildKit 0.12 and later; older ones reach a registry over
    /// plain HTTP only when it is on loopback or their `buildkitd.toml` says so).
    fn registry_attrs(&self) -> HashMap<String, String> {
        let mut attrs = HashMap::from([("ref".to_owned(), self.reference())]);
        if self.cache.plain_http {
            attrs.insert("registry.insecure".to_owned(), "true".to_owned());
        }
        attrs
    }

    /// The Dockerfile frontend's `cache-imports` (a JSON list of cache entries, as BuildKit's
    /// own client sends it), unless the job asked for `no_cache`.
    pub(super) fn add_frontend_attrs(&self, attrs: &mut HashMap<String, String>) {
        if !self.cache.import {
            return;
        }
        let entry = serde_json::json!([{"Type": "registry", "Attrs": self.registry_attrs()}]);
        attrs.insert("cache-imports".to_owned(), entry.to_string());
    }

    /// The `Solve` request's cache export: the registry cache in `mode=max`, or inline cache
    /// in the image the `moby` exporter stores.
    pub(super) fn solve_options(&self) -> CacheOptions {
        let export = match self.kind {
            CacheKind::Registry => {
                let mut attrs = self.registry_attrs();
                attrs.insert("mode".to_owned(), "max".to_owned());
                attrs.insert("ignore-error".to_owned(), "true".to_owned());
                CacheOptionsEntry {
                    r#type: "registry".to_owned(),
                    attrs,
                }
            }
            CacheKind::Inline => CacheOptionsEntry {
                r#type: "inline".to_owned(),
                attrs: HashMap::new(),
            },
        };
        CacheOptions {
            exports: vec![export],
            ..CacheOptions::default()
        }
    }

    /// The engine's `/build` parameters: `cachefrom` (unless `no_cache`) and the build
    /// argument by which the engine writes inline cache.
    pub(super) fn engine_build_options(
        &self,
        cache_from: &mut Option<Vec<String>>,
        args: &mut HashMap<String, String>,
    ) {
        if self.cache.import {
            *cache_from = Some(vec![self.reference()]);
        }
        args.insert("BUILDKIT_INLINE_CACHE".to_owned(), "1".to_owned());
    }

    /// Offers the cache's credentials for its host, and nothing else for it: a job's own
    /// credentials for that host (which no build file may name) are dropped.
    pub(super) fn offer_credentials(&self, by_host: &mut HashMap<String, BasicAuth>) {
        by_host.remove(&self.cache.registry);
        if let Some(auth) = &self.cache.auth {
            by_host.insert(self.cache.registry.clone(), auth.clone());
        }
    }
}

/// Pushes the built `image` (in the engine's store) to the cache's inline reference with the
/// cache's credentials, then removes that tag. Builds of one source on this worker push one
/// at a time: they share the tag in the engine's store.
pub(super) async fn push_inline(
    docker: &Docker,
    image: &str,
    plan: &CachePlan,
    cx: &StageContext,
) -> CacheStep {
    let cache = &plan.cache;
    let target = format!("{}/{}", cache.registry, cache.repository);
    let lock = push_lock(&target);
    let _turn = lock.lock().await;
    let credentials = cache.auth.as_ref().map(|a| DockerCredentials {
        username: Some(a.username.clone()),
        password: Some(a.password.expose().to_owned()),
        serveraddress: Some(cache.registry.clone()),
        ..DockerCredentials::default()
    });
    let pushed = export::push(docker, image, &target, INLINE_CACHE_TAG, credentials, cx).await;
    export::untag(docker, &format!("{target}:{INLINE_CACHE_TAG}")).await;
    match pushed {
        Ok(_) => CacheStep::Done,
        Err(e) => CacheStep::Failed(e.message),
    }
}

/// The lock of one cache repository's tag in this process.
fn push_lock(target: &str) -> Arc<tokio::sync::Mutex<()>> {
    static LOCKS: OnceLock<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>> = OnceLock::new();
    let mut locks = LOCKS
        .get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    Arc::clone(locks.entry(target.to_owned()).or_default())
}

/// What became of the cache in a build that succeeded: one log line, and a `Warning` event
/// for each of the import and export that failed. `export` is the push's outcome for inline
/// cache, the progress's for registry cache.
pub(super) fn report(
    plan: &CachePlan,
    progress: &CacheProgress,
    export: &CacheStep,
    cx: &StageContext,
) {
    let reference = plan.reference();
    let import = if plan.cache.import {
        describe_import(&progress.import)
    } else {
        Described::Said("skipped (no_cache)")
    };
    let exported = match export {
        CacheStep::Done => Described::Said("exported"),
        CacheStep::NotSeen => Described::Said("not reported"),
        CacheStep::Failed(why) => Described::Failed(why),
    };
    info!(
        job.id = %cx.job_id,
        cache = %reference,
        import = import.word(),
        export = exported.word(),
        cached_steps = progress.cached_steps,
        "Build cache: import {}, export {}.",
        import.word(),
        exported.word()
    );
    for (what, outcome) in [("imported from", &import), ("exported to", &exported)] {
        if let Described::Failed(why) = outcome {
            let why = cx.redactor.redact(why);
            warn!(job.id = %cx.job_id, cache = %reference, error = %why, "The build cache could not be {what}; the build went on without it.");
            cx.emit(JobEvent::Warning {
                code: WARNING_BUILD_CACHE.to_owned(),
                message: format!(
                    "the build cache could not be {what} {reference}: {why}; the build went on \
                     without it"
                ),
            });
        }
    }
}

/// A cache step in the log's words, or its failure.
enum Described<'a> {
    Said(&'static str),
    Failed(&'a str),
}

impl Described<'_> {
    fn word(&self) -> &'static str {
        match self {
            Described::Said(word) => word,
            Described::Failed(_) => "failed",
        }
    }
}

/// A source's first build finds no cache: BuildKit's import then fails "not found", which is
/// no reason for a warning.
fn describe_import(step: &CacheStep) -> Described<'_> {
    match step {
        CacheStep::Done => Described::Said("imported"),
        CacheStep::NotSeen => Described::Said("not asked for"),
        CacheStep::Failed(why)
            if why.ends_with(": not found") || why.contains("manifest unknown") =>
        {
            Described::Said("none yet")
        }
        CacheStep::Failed(why) => Described::Failed(why),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::Secret;

    fn cache(import: bool, plain_http: bool) -> BuildCache {
        BuildCache {
            registry: "cache.example:5000".to_owned(),
            plain_http,
            repository: "buildcache/web".to_owned(),
            auth: Some(BasicAuth {
                username: "cacher".to_owned(),
                password: Secret::new("cache-pass"),
            }),
            import,
        }
    }

    #[test]
    fn a_standalone_buildkitd_imports_and_exports_the_sources_registry_cache_in_max_mode() {
        let plan = CachePlan::new(cache(true, false), CacheKind::Registry);
        let mut attrs = HashMap::new();
        plan.add_frontend_attrs(&mut attrs);
        let imports: serde_json::Value = serde_json::from_str(&attrs["cache-imports"]).unwrap();
        assert_eq!(
            imports,
            serde_json::json!([{"Type": "registry", "Attrs": {"ref": "cache.example:5000/buildcache/web:cache"}}])
        );
        let options = plan.solve_options();
        assert!(options.imports.is_empty());
        let [export] = &options.exports[..] else {
            panic!("one export: {options:?}")
        };
        assert_eq!(export.r#type, "registry");
        assert_eq!(
            export.attrs,
            HashMap::from([
                (
                    "ref".to_owned(),
                    "cache.example:5000/buildcache/web:cache".to_owned()
                ),
                ("mode".to_owned(), "max".to_owned()),
                ("ignore-error".to_owned(), "true".to_owned()),
            ])
        );
    }

    #[test]
    fn no_cache_drops_the_import_but_keeps_the_export() {
        for kind in [CacheKind::Registry, CacheKind::Inline] {
            let plan = CachePlan::new(cache(false, false), kind);
            let mut attrs = HashMap::new();
            plan.add_frontend_attrs(&mut attrs);
            assert!(attrs.is_empty(), "{attrs:?}");
            assert_eq!(plan.solve_options().exports.len(), 1);
            let (mut cache_from, mut args) = (None, HashMap::new());
            plan.engine_build_options(&mut cache_from, &mut args);
            assert_eq!(cache_from, None);
        }
    }

    #[test]
    fn the_engine_imports_and_writes_inline_cache_without_credentials_in_its_arguments() {
        let plan = CachePlan::new(cache(true, false), CacheKind::Inline);
        let (mut cache_from, mut args) = (None, HashMap::new());
        plan.engine_build_options(&mut cache_from, &mut args);
        assert_eq!(
            cache_from,
            Some(vec!["cache.example:5000/buildcache/web:inline".to_owned()])
        );
        assert_eq!(
            args,
            HashMap::from([("BUILDKIT_INLINE_CACHE".to_owned(), "1".to_owned())])
        );
        let export = &plan.solve_options().exports[0];
        assert_eq!((export.r#type.as_str(), export.attrs.len()), ("inline", 0));
        let mut attrs = HashMap::new();
        plan.add_frontend_attrs(&mut attrs);
        assert!(!attrs["cache-imports"].contains("cache-pass"));
    }

    #[test]
    fn a_plain_http_cache_registry_is_marked_insecure_for_buildkit() {
        let plan = CachePlan::new(cache(true, true), CacheKind::Registry);
        assert_eq!(
            plan.solve_options().exports[0].attrs["registry.insecure"],
            "true"
        );
        let mut attrs = HashMap::new();
        plan.add_frontend_attrs(&mut attrs);
        assert!(attrs["cache-imports"].contains(r#""registry.insecure":"true""#));
    }

    #[test]
    fn the_cache_host_is_offered_the_caches_credentials_only() {
        let plan = CachePlan::new(cache(true, false), CacheKind::Registry);
        let job_own = BasicAuth {
            username: "job".to_owned(),
            password: Secret::new("job-pass"),
        };
        let mut by_host = HashMap::from([
            ("cache.example:5000".to_owned(), job_own.clone()),
            ("base.example".to_owned(), job_own),
        ]);
        plan.offer_credentials(&mut by_host);
        assert_eq!(by_host["cache.example:5000"].username, "cacher");
        assert_eq!(by_host["base.example"].username, "job");

        let mut anonymous = CachePlan::new(cache(true, false), CacheKind::Registry);
        anonymous.cache.auth = None;
        anonymous.offer_credentials(&mut by_host);
        assert!(!by_host.contains_key("cache.example:5000"));
    }

    #[test]
    fn a_missing_cache_is_no_failure_but_a_refused_one_is() {
        assert!(matches!(
            describe_import(&CacheStep::Failed(
                "cache.example:5000/buildcache/web:cache: not found".to_owned()
            )),
            Described::Said("none yet")
        ));
        assert!(matches!(
            describe_import(&CacheStep::Failed("connection refused".to_owned())),
            Described::Failed("connection refused")
        ));
    }
}
