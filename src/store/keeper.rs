//! The worker's store keeper: collects the `oci-layout` store after jobs stored images (it
//! looks every 5 s whether `index.json` changed), every `store.gc_interval_secs`, and
//! when the disk probe finds the work root or the store short of space (before it holds
//! intake). Each collection is counted in the metrics and logged; when `store.max_bytes`
//! cannot be met, it says so (log, `factoryd_store_over_max_bytes`, `/readyz`).

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use prometheus::{Histogram, HistogramOpts, IntCounterVec, IntGauge, Opts};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{collect, Collection, CollectionReport, Rule};
use crate::clock::Clock;
use crate::config::StoreConfig;

/// After-job collections run at most this often: a collection of a store of 10,000 blobs takes
/// about 0.2 s (scripts/bench-store-gc.sh), and the store should not outgrow `max_bytes` by
/// more than what lands in this time.
const DEBOUNCE: Duration = Duration::from_secs(5);
/// Build cache prunes after builds run at most this often (each asks the engine for its disk
/// usage first).
const CACHE_DEBOUNCE: Duration = Duration::from_secs(60);

/// The store's metrics, registered with the process registry on first use.
pub struct StoreMetrics {
    pub bytes: IntGauge,
    pub images: IntGauge,
    pub blobs: IntGauge,
    pub collections: IntCounterVec,
    pub reclaimed_bytes: prometheus::IntCounter,
    pub collection_seconds: Histogram,
    pub images_dropped: IntCounterVec,
    pub over_max_bytes: IntGauge,
}

pub fn store_metrics() -> &'static StoreMetrics {
    static METRICS: OnceLock<StoreMetrics> = OnceLock::new();
    METRICS.get_or_init(|| {
        let registry = &crate::telemetry::metrics().registry;
        fn reg<M: prometheus::core::Collector + Clone + 'static>(
            r: &prometheus::Registry,
            m: prometheus::Result<M>,
        ) -> M {
            let m = m.expect("valid metric");
            r.register(Box::new(m.clone())).expect("unique metric");
            m
        }
        let gauge = |name: &str, help: &str| reg(registry, IntGauge::new(name, help));
        let m = StoreMetrics {
            bytes: gauge(
                "factoryd_store_bytes",
                "Bytes of the blobs in the oci-layout store, after the last collection.",
            ),
            images: gauge(
                "factoryd_store_images",
                "Tagged images in the oci-layout store, after the last collection.",
            ),
            blobs: gauge(
                "factoryd_store_blobs",
                "Blobs in the oci-layout store, after the last collection.",
            ),
            collections: reg(
                registry,
                IntCounterVec::new(
                    Opts::new(
                        "factoryd_store_collections_total",
                        "Collections of the oci-layout store, by outcome (ok, failed).",
                    ),
                    &["outcome"],
                ),
            ),
            reclaimed_bytes: reg(
                registry,
                prometheus::IntCounter::new(
                    "factoryd_store_reclaimed_bytes_total",
                    "Bytes the collections of the oci-layout store freed.",
                ),
            ),
            collection_seconds: reg(
                registry,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "factoryd_store_collection_seconds",
                        "Time one collection of the oci-layout store took.",
                    )
                    .buckets(vec![0.01, 0.05, 0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0]),
                ),
            ),
            images_dropped: reg(
                registry,
                IntCounterVec::new(
                    Opts::new(
                        "factoryd_store_images_dropped_total",
                        "Images the retention policy dropped, by rule (keep_per_source, \
                         max_age, max_bytes).",
                    ),
                    &["rule"],
                ),
            ),
            over_max_bytes: gauge(
                "factoryd_store_over_max_bytes",
                "Bytes the kept images are over store.max_bytes when the policy may drop no \
                 more (0: within it).",
            ),
        };
        for outcome in ["ok", "failed"] {
            m.collections.with_label_values(&[outcome]);
        }
        for rule in Rule::ALL {
            m.images_dropped.with_label_values(&[rule.as_str()]);
        }
        m
    })
}

/// Collects one store on the worker's behalf.
pub struct StoreKeeper {
    root: PathBuf,
    config: StoreConfig,
    clock: Arc<dyn Clock>,
    /// One collection at a time from this process (others wait on the lock file).
    running: tokio::sync::Mutex<()>,
    /// `index.json`'s modification time at the last collection.
    seen_index: std::sync::Mutex<Option<SystemTime>>,
    /// What the last collection left to say (`max_bytes` not met).
    warning: std::sync::Mutex<Option<String>>,
}

impl StoreKeeper {
    pub fn new(root: PathBuf, config: StoreConfig, clock: Arc<dyn Clock>) -> Arc<Self> {
        Arc::new(StoreKeeper {
            root,
            config,
            clock,
            running: tokio::sync::Mutex::new(()),
            seen_index: std::sync::Mutex::new(None),
            warning: std::sync::Mutex::new(None),
        })
    }

    /// Why the store is over its size budget, from the last collection.
    pub fn warning(&self) -> Option<String> {
        self.warning.lock().ok().and_then(|w| w.clone())
    }

    fn index_modified(&self) -> Option<SystemTime> {
        std::fs::metadata(self.root.join("index.json"))
            .and_then(|m| m.modified())
            .ok()
    }

    /// Runs one collection now (`why` for the log); `None` when the store does not exist yet
    /// or the collection failed (logged, counted).
    pub async fn collect(&self, why: &'static str) -> Option<CollectionReport> {
        if !self.root.join("index.json").exists() {
            return None;
        }
        let _one = self.running.lock().await;
        let index = self.index_modified();
        let (root, policy, now_ms) = (
            self.root.clone(),
            self.config.retention,
            self.clock.now_ms(),
        );
        let started = Instant::now();
        let done = tokio::task::spawn_blocking(move || {
            collect(
                &root,
                Collection {
                    policy,
                    dry_run: false,
                },
                now_ms,
            )
        })
        .await;
        let m = store_metrics();
        m.collection_seconds
            .observe(started.elapsed().as_secs_f64());
        let report = match done {
            Ok(Ok(report)) => report,
            Ok(Err(e)) => {
                m.collections.with_label_values(&["failed"]).inc();
                warn!(store = %self.root.display(), error = %e, why, "Store collection failed.");
                return None;
            }
            Err(e) => {
                m.collections.with_label_values(&["failed"]).inc();
                warn!(store = %self.root.display(), error = %e, why, "Store collection failed.");
                return None;
            }
        };
        if let Ok(mut seen) = self.seen_index.lock() {
            *seen = index;
        }
        m.collections.with_label_values(&["ok"]).inc();
        m.reclaimed_bytes.inc_by(report.bytes_freed);
        m.bytes
            .set(i64::try_from(report.bytes_left).unwrap_or(i64::MAX));
        m.blobs
            .set(i64::try_from(report.blobs_left).unwrap_or(i64::MAX));
        m.images.set(report.kept as i64);
        for rule in Rule::ALL {
            m.images_dropped
                .with_label_values(&[rule.as_str()])
                .inc_by(report.dropped_by(rule) as u64);
        }
        m.over_max_bytes
            .set(i64::try_from(report.over_max_bytes.unwrap_or(0)).unwrap_or(i64::MAX));
        let warning = report.over_max_bytes.map(|over| {
            format!(
                "store {} is {over} bytes over store.max_bytes: only the newest image of each \
                 source and images younger than store.min_age_secs are left",
                self.root.display()
            )
        });
        if let Some(w) = &warning {
            warn!("{w}");
        }
        if let Ok(mut slot) = self.warning.lock() {
            *slot = warning;
        }
        if report.bytes_freed > 0 || !report.dropped.is_empty() {
            info!(
                why,
                dropped = report.dropped.len(),
                blobs_removed = report.blobs_removed,
                bytes_freed = report.bytes_freed,
                bytes_left = report.bytes_left,
                "Collected the image store."
            );
        }
        Some(report)
    }

    /// Collects after jobs changed the store (at most once a [`DEBOUNCE`]) and every
    /// `store.gc_interval_secs`, until `stop`.
    pub fn start(self: &Arc<Self>, stop: CancellationToken) {
        let me = Arc::clone(self);
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(DEBOUNCE);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut last_periodic = Instant::now();
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = ticks.tick() => {}
                }
                let due = me
                    .config
                    .gc_interval
                    .is_some_and(|every| last_periodic.elapsed() >= every);
                let changed = {
                    let now = me.index_modified();
                    me.seen_index
                        .lock()
                        .map(|seen| *seen != now)
                        .unwrap_or(true)
                };
                if due {
                    last_periodic = Instant::now();
                    me.collect("interval").await;
                } else if changed {
                    me.collect("after jobs").await;
                }
            }
        });
    }
}

/// Keeps the build backend's cache under `builder.cache_keep_bytes`: after builds (at most
/// once a [`CACHE_DEBOUNCE`], when builds ended since the last look) and, through the disk probe,
/// before intake is held for low disk space. [`Builder::prune_cache`] counts and logs each
/// prune.
///
/// [`Builder::prune_cache`]: crate::ports::Builder::prune_cache
pub struct CacheKeeper {
    builder: Arc<dyn crate::ports::Builder>,
    keep_bytes: u64,
    running: tokio::sync::Mutex<()>,
}

impl CacheKeeper {
    /// `None` when `keep_bytes` is 0 (the cache is left alone).
    pub fn new(builder: Arc<dyn crate::ports::Builder>, keep_bytes: u64) -> Option<Arc<Self>> {
        (keep_bytes > 0).then(|| {
            Arc::new(CacheKeeper {
                builder,
                keep_bytes,
                running: tokio::sync::Mutex::new(()),
            })
        })
    }

    /// Prunes now if the cache is above the limit.
    pub async fn prune(&self, why: &'static str) {
        let _one = self.running.lock().await;
        if let Err(e) = self.builder.prune_cache(self.keep_bytes).await {
            warn!(why, error = %e, "Cannot prune the build cache.");
        }
    }

    pub fn start(self: &Arc<Self>, stop: CancellationToken) {
        let me = Arc::clone(self);
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(CACHE_DEBOUNCE);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut seen = builds_ended();
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = ticks.tick() => {}
                }
                let now = builds_ended();
                if now != seen {
                    seen = now;
                    me.prune("after builds").await;
                }
            }
        });
    }
}

/// Build attempts that ended in this process, however they ended.
fn builds_ended() -> u64 {
    crate::telemetry::metrics::OUTCOMES
        .iter()
        .map(|outcome| {
            crate::telemetry::metrics()
                .jobs_completed
                .with_label_values(&["build", outcome])
                .get()
        })
        .sum()
}
