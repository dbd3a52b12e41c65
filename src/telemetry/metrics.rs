//! The Prometheus registry: every metric factoryd exports, with help text, and label values
//! only from closed sets (kind, stage, outcome, class, source) — never a job id, URL or image.

use std::sync::OnceLock;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// How a job attempt can end, as counted by `factoryd_jobs_completed_total`.
pub const OUTCOMES: [&str; 6] = [
    "succeeded",
    "failed",
    "cancelled",
    "retried",
    "handed_back",
    "poisoned",
];

/// How a prune of the builder's cache can end, as counted by
/// `factoryd_builder_cache_prunes_total`.
pub const PRUNE_OUTCOMES: [&str; 2] = ["ok", "failed"];

/// Buckets for jobs and stages: from a second to hours.
const DURATION_BUCKETS: &[f64] = &[
    0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0, 7200.0,
    14400.0,
];

pub struct Metrics {
    pub registry: Registry,
    pub jobs_received: IntCounterVec,
    pub jobs_completed: IntCounterVec,
    pub job_duration: HistogramVec,
    pub stage_duration: HistogramVec,
    pub jobs_in_flight: IntGaugeVec,
    pub slots_free: IntGaugeVec,
    pub jobs_held: IntGaugeVec,
    pub retries: IntCounterVec,
    pub fetched_bytes: IntCounterVec,
    pub blobs_skipped: IntCounter,
    pub build_log_lines: IntCounter,
    pub nats_connected: IntGauge,
    pub nats_reconnects: IntCounter,
    pub lease_fences: IntCounter,
    pub events_dropped: IntCounter,
    pub work_root_free_bytes: IntGauge,
    pub builder_cache_bytes: IntGauge,
    pub builder_cache_pruned_bytes: IntCounter,
    pub builder_cache_prunes: IntCounterVec,
    pub build_info: IntGaugeVec,
    pub result_publish_seconds: Histogram,
}

/// Registers a metric built from constant names and help texts. Neither step can fail at run
/// time for such a metric; `every_metric_has_help_and_a_unique_name` proves it for all of them.
fn register<M: prometheus::core::Collector + Clone + 'static>(
    r: &Registry,
    metric: prometheus::Result<M>,
) -> M {
    let metric = metric.expect("valid metric");
    r.register(Box::new(metric.clone())).expect("unique metric");
    metric
}

fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    register(r, IntCounterVec::new(Opts::new(name, help), labels))
}

fn gauge_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    register(r, IntGaugeVec::new(Opts::new(name, help), labels))
}

fn histogram_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> HistogramVec {
    register(
        r,
        HistogramVec::new(
            HistogramOpts::new(name, help).buckets(DURATION_BUCKETS.to_vec()),
            labels,
        ),
    )
}

impl Metrics {
    fn new() -> Self {
        let r = Registry::new();
        let blobs_skipped = register(
            &r,
            IntCounter::new(
                "factoryd_blobs_skipped_total",
                "Image blobs not transferred because the destination already had them.",
            ),
        );
        let build_log_lines = register(
            &r,
            IntCounter::new(
                "factoryd_build_log_lines_total",
                "Build log lines emitted as events.",
            ),
        );
        let nats_connected = register(
            &r,
            IntGauge::new(
                "factoryd_nats_connected",
                "1 while the worker is connected to a NATS server, else 0.",
            ),
        );
        let nats_reconnects = register(
            &r,
            IntCounter::new(
                "factoryd_nats_reconnects_total",
                "Times the worker connected to NATS again after losing its connection.",
            ),
        );
        let lease_fences = register(
            &r,
            IntCounter::new(
                "factoryd_lease_fences_total",
                "Running attempts stopped because their lease could not be confirmed in time.",
            ),
        );
        let events_dropped = register(
            &r,
            IntCounter::new(
                "factoryd_events_dropped_total",
                "Progress events dropped because the publisher could not keep up.",
            ),
        );
        let work_root_free_bytes = register(
            &r,
            IntGauge::new(
                "factoryd_work_root_free_bytes",
                "Free bytes on the file system of worker.work_root.",
            ),
        );
        let builder_cache_bytes = register(
            &r,
            IntGauge::new(
                "factoryd_builder_cache_bytes",
                "Bytes in the builder's BuildKit cache as last seen, after the last prune.",
            ),
        );
        let builder_cache_pruned_bytes = register(
            &r,
            IntCounter::new(
                "factoryd_builder_cache_pruned_bytes_total",
                "Bytes reclaimed by pruning the builder's BuildKit cache.",
            ),
        );
        let result_publish_seconds = register(
            &r,
            Histogram::with_opts(
                HistogramOpts::new(
                    "factoryd_result_publish_seconds",
                    "Time to store and publish a job's result, until the server acknowledged it.",
                )
                .buckets(vec![
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0, 5.0,
                ]),
            ),
        );

        let m = Metrics {
            jobs_received: counter_vec(
                &r,
                "factoryd_jobs_received_total",
                "Job deliveries taken from the queue, by kind.",
                &["kind"],
            ),
            jobs_completed: counter_vec(
                &r,
                "factoryd_jobs_completed_total",
                "Job attempts that ended, by kind and outcome (succeeded, failed, cancelled, \
                 retried, handed_back, poisoned).",
                &["kind", "outcome"],
            ),
            job_duration: histogram_vec(
                &r,
                "factoryd_job_duration_seconds",
                "Duration of job attempts, by kind and outcome.",
                &["kind", "outcome"],
            ),
            stage_duration: histogram_vec(
                &r,
                "factoryd_stage_duration_seconds",
                "Duration of pipeline stages that completed, by stage.",
                &["stage"],
            ),
            jobs_in_flight: gauge_vec(
                &r,
                "factoryd_jobs_in_flight",
                "Jobs running now, by kind.",
                &["kind"],
            ),
            slots_free: gauge_vec(
                &r,
                "factoryd_slots_free",
                "Free job slots, by kind.",
                &["kind"],
            ),
            jobs_held: gauge_vec(
                &r,
                "factoryd_jobs_held",
                "1 while this worker takes no jobs of a kind (build backend unreachable, work root or layout store low on space), by kind.",
                &["kind"],
            ),
            retries: counter_vec(
                &r,
                "factoryd_retries_total",
                "Attempts handed back for a retry, by the stage and class of their error.",
                &["stage", "class"],
            ),
            fetched_bytes: counter_vec(
                &r,
                "factoryd_fetched_bytes_total",
                "Bytes received on jobs' behalf, by source kind (git, tarball, registry).",
                &["source"],
            ),
            blobs_skipped,
            build_log_lines,
            nats_connected,
            nats_reconnects,
            lease_fences,
            events_dropped,
            work_root_free_bytes,
            builder_cache_bytes,
            builder_cache_pruned_bytes,
            builder_cache_prunes: counter_vec(
                &r,
                "factoryd_builder_cache_prunes_total",
                "Prunes of the builder's BuildKit cache, by outcome (ok, failed).",
                &["outcome"],
            ),
            build_info: gauge_vec(
                &r,
                "factoryd_build_info",
                "Always 1; its labels name the running version and job wire format.",
                &["version", "wire_version"],
            ),
            result_publish_seconds,
            registry: r,
        };
        m.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION"), "1"])
            .set(1);
        // Every label value of the closed sets exists from the start, so a dashboard shows 0
        // rather than nothing.
        for kind in ["build", "import"] {
            m.jobs_received.with_label_values(&[kind]);
            m.jobs_in_flight.with_label_values(&[kind]);
            m.slots_free.with_label_values(&[kind]);
            m.jobs_held.with_label_values(&[kind]);
            for outcome in OUTCOMES {
                m.jobs_completed.with_label_values(&[kind, outcome]);
            }
        }
        for source in ["git", "tarball", "registry"] {
            m.fetched_bytes.with_label_values(&[source]);
        }
        for outcome in PRUNE_OUTCOMES {
            m.builder_cache_prunes.with_label_values(&[outcome]);
        }
        m
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let encoder = TextEncoder::new();
        if encoder.encode(&self.registry.gather(), &mut buf).is_err() {
            return String::new();
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

/// The process-wide registry.
pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_has_help_and_a_unique_name() {
        let m = metrics();
        m.jobs_received.with_label_values(&["build"]).inc();
        let families = m.registry.gather();
        assert!(families.len() >= 10, "{}", families.len());
        let mut names: Vec<&str> = families.iter().map(|f| f.name()).collect();
        for f in &families {
            assert!(f.name().starts_with("factoryd_"), "{}", f.name());
            assert!(!f.help().is_empty(), "{} has no help", f.name());
        }
        names.sort_unstable();
        let n = names.len();
        names.dedup();
        assert_eq!(names.len(), n);
        assert!(m.render().contains("factoryd_build_info{version="));
    }
}
