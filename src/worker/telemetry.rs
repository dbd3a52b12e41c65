//! What the worker tells its operators about a delivery: each [`Event`] is counted in the
//! metrics and logged in one place, so the two never disagree and the journey in
//! `delivery.rs` names what happened instead of repeating metric-and-log pairs.

use std::time::Duration;

use tracing::{error, info, warn};

use crate::error::{JobError, Stage};
use crate::job::{Kind, Redactor, Status, Timings};
use crate::telemetry::metrics;

/// Something that happened to a delivery or an attempt.
pub enum Event<'a> {
    /// A message was taken for a job of `kind` (not handed back for a hold).
    Received { kind: Kind },
    /// The message is not a valid job: a permanent failure, reported on the subject's id.
    Rejected {
        job_id: &'a str,
        error: &'a JobError,
    },
    /// An attempt started running.
    Started { kind: Kind },
    /// The attempt's run ended (its stages' timings, when it succeeded).
    RunEnded {
        kind: Kind,
        timings: Option<Timings>,
    },
    /// The job ended with a result.
    Finished {
        kind: Kind,
        status: Status,
        seconds: f64,
        error: Option<(&'a JobError, &'a Redactor)>,
    },
    /// The attempt failed and the job goes back to the queue after `delay`: retried when the
    /// failure is transient, handed back (shutdown) otherwise.
    HandedBack {
        kind: Kind,
        seconds: f64,
        error: &'a JobError,
        delay: Duration,
        redactor: &'a Redactor,
    },
    /// The job was given up without running: its earlier attempts' workers vanished.
    Poisoned { kind: Kind, lost_attempts: u32 },
    /// A running attempt is stopped because its lease went `unconfirmed` for too long (the
    /// worker is cut off from the state store); it is handed back.
    LeaseUnconfirmed {
        job_id: &'a str,
        unconfirmed: Duration,
    },
}

/// Counts and logs `event`.
pub fn record(event: Event<'_>) {
    let m = metrics();
    let completed = |kind: Kind, outcome: &str, seconds: Option<f64>| {
        m.jobs_completed
            .with_label_values(&[kind.as_str(), outcome])
            .inc();
        if let Some(seconds) = seconds {
            m.job_duration
                .with_label_values(&[kind.as_str(), outcome])
                .observe(seconds);
        }
    };
    match event {
        Event::Received { kind } => m.jobs_received.with_label_values(&[kind.as_str()]).inc(),
        Event::Rejected { job_id, error } => {
            warn!(job.id = %job_id, error = %error, "Rejecting message.");
        }
        Event::Started { kind } => {
            m.jobs_in_flight.with_label_values(&[kind.as_str()]).inc();
            info!(%kind, "Job started.");
        }
        Event::RunEnded { kind, timings } => {
            m.jobs_in_flight.with_label_values(&[kind.as_str()]).dec();
            let Some(t) = timings else { return };
            for (stage, ms) in [
                (Stage::Fetch, t.fetch),
                (Stage::Build, t.build),
                (Stage::Import, t.import),
                (Stage::Export, t.export),
            ] {
                if ms > 0 {
                    m.stage_duration
                        .with_label_values(&[stage.as_str()])
                        .observe(ms as f64 / 1000.0);
                }
            }
        }
        Event::Finished {
            kind,
            status,
            seconds,
            error,
        } => {
            completed(kind, status.as_str(), Some(seconds));
            match error {
                None => info!(outcome = status.as_str(), "Job finished."),
                Some((e, redactor)) => {
                    info!(outcome = status.as_str(), class = %e.class, code = %e.code, error = %redactor.redact(&e.message), "Job finished.")
                }
            }
        }
        Event::HandedBack {
            kind,
            seconds,
            error: e,
            delay,
            redactor,
        } => {
            if e.class == crate::error::ErrorClass::Transient {
                completed(kind, "retried", Some(seconds));
                m.retries
                    .with_label_values(&[e.stage.as_str(), e.class.as_str()])
                    .inc();
            } else {
                completed(kind, "handed_back", Some(seconds));
            }
            info!(class = %e.class, code = %e.code, delay_ms = delay.as_millis() as u64, error = %redactor.redact(&e.message), "Attempt failed; handing the job back.");
        }
        Event::Poisoned {
            kind,
            lost_attempts,
        } => {
            completed(kind, "poisoned", None);
            error!(
                lost_attempts,
                "Gave the job up as poison: its earlier attempts ended with their worker gone."
            );
        }
        Event::LeaseUnconfirmed {
            job_id,
            unconfirmed,
        } => {
            m.lease_fences.inc();
            warn!(
                job.id = %job_id,
                unconfirmed_ms = unconfirmed.as_millis() as u64,
                "Cannot confirm the job's lease; stopping it before another worker may take it over."
            );
        }
    }
}
