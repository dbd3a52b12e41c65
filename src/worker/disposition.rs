//! What happens to a queue message: the pure decision of ARCHITECTURE §5, for every way a
//! delivery's journey can end — before the run (held, invalid, duplicate, claimed elsewhere,
//! cancelled before start, poison) and after it.
//!
//! [`decide`] maps (outcome, attempt, policy) to the result to publish, if any, and how to
//! settle the message; [`Disposition::once_reported`] says what is left when the result could
//! not be stored or published. Neither performs I/O or reads a clock: the caller passes the
//! jitter, so every row of the table is a plain test. Only this module and the queue adapters
//! speak the queue's words (ack, nak, term).

use std::time::Duration;

use crate::error::{ErrorClass, JobError};
use crate::job::Status;
use crate::ports::Settle;

/// Where a delivery's journey ended, as far as its message is concerned.
#[derive(Debug, Clone, Copy)]
pub enum Outcome<'a> {
    /// Its kind is held on this worker: handed back untried, at once, for another worker.
    Held,
    /// The message is not a valid job (or names another job than its subject does).
    Invalid,
    /// This worker runs the job already (redelivered during a missed heartbeat).
    RunningHere,
    /// Another worker holds a live claim; it may have lapsed after `retry_in`.
    RunningElsewhere { retry_in: Duration },
    /// The claim could not be read or written: the state store is out of reach.
    ClaimUnavailable,
    /// The job ended before, with this status: its stored result is published again.
    AlreadyEnded(Status),
    /// A cancel request came before the job started.
    CancelledBeforeStart,
    /// Given up without running: its earlier attempts' workers vanished mid-job.
    Poison,
    /// The attempt ran and succeeded.
    Succeeded,
    /// The attempt ran and failed.
    Failed(&'a JobError),
    /// Our lease lapsed mid-run and another worker took the job over.
    LostClaim,
}

/// The decision for one delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Disposition {
    /// The result status to publish before settling, if a result is due.
    pub publish: Option<Status>,
    /// How to settle the message; `None`: leave it (it is another worker's now).
    pub settle: Option<Settle>,
    /// True when a transient failure is given up because the retry budget is spent; the
    /// published result then says so.
    pub retries_exhausted: bool,
}

impl Disposition {
    fn new(publish: Option<Status>, settle: Option<Settle>) -> Self {
        Disposition {
            publish,
            settle,
            retries_exhausted: false,
        }
    }

    /// How to settle once the result is reported: a result that was due but could not be
    /// stored or published leaves the message for redelivery, which reports it again (the
    /// terminal record or the result stream's deduplication keeps that from running it twice).
    pub fn once_reported(self, reported: bool) -> Option<Settle> {
        if self.publish.is_some() && !reported {
            None
        } else {
            self.settle
        }
    }
}

/// The retry budget and delays of a job's attempts. `max_attempts` stays below the consumer's
/// `max_deliver` so the worker always ends a job itself, with a result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobRetryPolicy {
    pub max_attempts: u32,
    pub base_delay: Duration,
    pub max_delay: Duration,
}

impl Default for JobRetryPolicy {
    fn default() -> Self {
        JobRetryPolicy {
            max_attempts: 4,
            base_delay: Duration::from_secs(30),
            max_delay: Duration::from_secs(600),
        }
    }
}

impl JobRetryPolicy {
    /// The delay before attempt `attempt + 1`: `base × 4^(attempt-1)`, plus up to 10 % jitter
    /// (`jitter` in `[0, 1)`), at least the server's `Retry-After`, at most `max_delay`.
    /// With the defaults: ≈ 30 s, 2 min, 8 min.
    pub fn delay(&self, attempt: u32, retry_after: Option<Duration>, jitter: f64) -> Duration {
        let exponent = attempt.saturating_sub(1).min(16);
        let backoff = self
            .base_delay
            .saturating_mul(4u32.saturating_pow(exponent))
            .min(self.max_delay);
        let jitter = jitter.clamp(0.0, 1.0);
        let with_jitter = backoff + backoff.mul_f64(0.1 * jitter);
        with_jitter
            .max(retry_after.unwrap_or_default())
            .min(self.max_delay)
    }
}

/// What the decision depends on besides the outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    pub retry: JobRetryPolicy,
    /// How long a claim holds without a refresh (`nats.ack_wait`).
    pub lease: Duration,
}

/// Decides what to publish and how to settle. `attempt` is 1-based (the delivery count).
pub fn decide(outcome: Outcome<'_>, attempt: u32, policy: &Policy, jitter: f64) -> Disposition {
    let nak = |delay| Some(Settle::Nak { delay });
    match outcome {
        Outcome::Held => Disposition::new(None, nak(Duration::ZERO)),
        Outcome::Invalid => Disposition::new(Some(Status::Failed), Some(Settle::Term)),
        // Left until our own run ends; by then the lease is refreshed or the job settled.
        Outcome::RunningHere => Disposition::new(None, nak(policy.lease)),
        Outcome::RunningElsewhere { retry_in } => Disposition::new(None, nak(retry_in)),
        // A leader election or an outage: back off steeply, so that a short outage does not
        // use up the message's deliveries.
        Outcome::ClaimUnavailable => {
            let delay = Duration::from_secs(5 << attempt.min(4)).min(policy.lease * 2);
            Disposition::new(None, nak(delay))
        }
        Outcome::AlreadyEnded(status) => {
            let settle = match status {
                Status::Succeeded => Settle::Ack,
                Status::Failed | Status::Cancelled => Settle::Term,
            };
            Disposition::new(Some(status), Some(settle))
        }
        Outcome::CancelledBeforeStart => {
            Disposition::new(Some(Status::Cancelled), Some(Settle::Term))
        }
        Outcome::Poison => Disposition::new(Some(Status::Failed), Some(Settle::Term)),
        Outcome::LostClaim => Disposition::new(None, None),
        Outcome::Succeeded => Disposition::new(Some(Status::Succeeded), Some(Settle::Ack)),
        Outcome::Failed(err) => match err.class {
            ErrorClass::Permanent => Disposition::new(Some(Status::Failed), Some(Settle::Term)),
            ErrorClass::Transient if attempt < policy.retry.max_attempts => {
                let delay = policy.retry.delay(attempt, err.retry_after, jitter);
                Disposition::new(None, nak(delay))
            }
            ErrorClass::Transient => Disposition {
                retries_exhausted: true,
                ..Disposition::new(Some(Status::Failed), Some(Settle::Term))
            },
            ErrorClass::Cancelled if err.is_shutdown() => {
                Disposition::new(None, nak(Duration::ZERO))
            }
            ErrorClass::Cancelled => Disposition::new(Some(Status::Cancelled), Some(Settle::Term)),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{ErrorCode, Stage};

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    fn nak(s: u64) -> Option<Settle> {
        Some(Settle::Nak { delay: secs(s) })
    }

    const ACK: Option<Settle> = Some(Settle::Ack);
    const TERM: Option<Settle> = Some(Settle::Term);
    const FAILED: Option<Status> = Some(Status::Failed);
    const CANCELLED: Option<Status> = Some(Status::Cancelled);
    const SUCCEEDED: Option<Status> = Some(Status::Succeeded);

    /// Every row of ARCHITECTURE §5 and every way a delivery ends before its run, with the
    /// default policy (4 attempts, 30 s base, 10 min cap) and a 60 s lease.
    #[test]
    fn every_row_of_the_disposition_table() {
        let policy = Policy {
            retry: JobRetryPolicy::default(),
            lease: secs(60),
        };
        let permanent = JobError::new(Stage::Fetch, ErrorCode::AuthFailed, "refused");
        let transient = JobError::new(Stage::Fetch, ErrorCode::Unavailable, "503");
        let cancelled = JobError::cancelled(Stage::Build);
        let shutdown = JobError::shutdown(Stage::Build);

        type Row<'a> = (
            &'a str,
            Outcome<'a>,
            u32,
            Option<Status>,
            Option<Settle>,
            bool,
        );
        #[rustfmt::skip]
        let rows: Vec<Row> = vec![
            ("held kind: handed back untried", Outcome::Held, 1, None, nak(0), false),
            ("held kind on a later delivery", Outcome::Held, 3, None, nak(0), false),
            ("invalid message", Outcome::Invalid, 1, FAILED, TERM, false),
            ("duplicate of a job running here", Outcome::RunningHere, 2, None, nak(60), false),
            ("claimed by another worker", Outcome::RunningElsewhere { retry_in: secs(42) }, 2, None, nak(42), false),
            ("claim store unreachable, 1st delivery", Outcome::ClaimUnavailable, 1, None, nak(10), false),
            ("claim store unreachable, 3rd delivery", Outcome::ClaimUnavailable, 3, None, nak(40), false),
            ("claim store unreachable, steepest step", Outcome::ClaimUnavailable, 9, None, nak(80), false),
            ("already succeeded: result again, ack", Outcome::AlreadyEnded(Status::Succeeded), 2, SUCCEEDED, ACK, false),
            ("already failed: result again, term", Outcome::AlreadyEnded(Status::Failed), 2, FAILED, TERM, false),
            ("already cancelled: result again, term", Outcome::AlreadyEnded(Status::Cancelled), 2, CANCELLED, TERM, false),
            ("cancelled before start", Outcome::CancelledBeforeStart, 1, CANCELLED, TERM, false),
            ("poison", Outcome::Poison, 3, FAILED, TERM, false),
            ("lost the claim mid-run: leave it", Outcome::LostClaim, 1, None, None, false),
            ("success", Outcome::Succeeded, 1, SUCCEEDED, ACK, false),
            ("success on a retry", Outcome::Succeeded, 3, SUCCEEDED, ACK, false),
            ("permanent", Outcome::Failed(&permanent), 1, FAILED, TERM, false),
            ("permanent on a retry", Outcome::Failed(&permanent), 2, FAILED, TERM, false),
            ("transient, 1st of 4", Outcome::Failed(&transient), 1, None, nak(30), false),
            ("transient, 2nd of 4", Outcome::Failed(&transient), 2, None, nak(120), false),
            ("transient, 3rd of 4", Outcome::Failed(&transient), 3, None, nak(480), false),
            ("transient, budget spent", Outcome::Failed(&transient), 4, FAILED, TERM, true),
            ("transient, past the budget", Outcome::Failed(&transient), 5, FAILED, TERM, true),
            ("cancelled by request", Outcome::Failed(&cancelled), 1, CANCELLED, TERM, false),
            ("cancelled by shutdown", Outcome::Failed(&shutdown), 1, None, nak(0), false),
            ("shutdown on the last attempt still hands over", Outcome::Failed(&shutdown), 4, None, nak(0), false),
        ];
        for (name, outcome, attempt, publish, settle, exhausted) in rows {
            let got = decide(outcome, attempt, &policy, 0.0);
            assert_eq!(
                got,
                Disposition {
                    publish,
                    settle,
                    retries_exhausted: exhausted
                },
                "row: {name}"
            );
        }
    }

    /// A due result that was not stored or published leaves the message; one that was, or none
    /// due, settles as decided.
    #[test]
    fn a_result_not_reported_leaves_the_message() {
        type Row = (
            &'static str,
            Option<Status>,
            Option<Settle>,
            bool,
            Option<Settle>,
        );
        #[rustfmt::skip]
        let rows: [Row; 5] = [
            ("reported", FAILED, TERM, true, TERM),
            ("not stored or not published", FAILED, TERM, false, None),
            ("success not published", SUCCEEDED, ACK, false, None),
            ("no result due: settle anyway", None, nak(30), false, nak(30)),
            ("nothing to do", None, None, false, None),
        ];
        for (name, publish, settle, reported, expected) in rows {
            let d = Disposition::new(publish, settle);
            assert_eq!(d.once_reported(reported), expected, "row: {name}");
        }
    }

    #[test]
    fn a_claim_back_off_is_at_most_two_leases() {
        let policy = Policy {
            retry: JobRetryPolicy::default(),
            lease: secs(15),
        };
        let got = decide(Outcome::ClaimUnavailable, 4, &policy, 0.0);
        assert_eq!(got.settle, nak(30));
    }

    #[test]
    fn retry_delay_is_capped() {
        let policy = JobRetryPolicy {
            max_attempts: 4,
            base_delay: secs(30),
            max_delay: secs(600),
        };
        assert_eq!(policy.delay(4, None, 0.0), secs(600));
        assert_eq!(policy.delay(30, None, 0.99), secs(600));
    }

    #[test]
    fn jitter_adds_at_most_a_tenth() {
        let policy = JobRetryPolicy::default();
        let low = policy.delay(1, None, 0.0);
        let high = policy.delay(1, None, 0.999);
        assert_eq!(low, secs(30));
        assert!(high > low && high <= secs(33), "{high:?}");
    }

    #[test]
    fn rate_limit_honours_retry_after() {
        let policy = Policy {
            retry: JobRetryPolicy::default(),
            lease: secs(60),
        };
        let limited =
            JobError::new(Stage::Import, ErrorCode::RateLimited, "429").with_retry_after(secs(90));
        let got = decide(Outcome::Failed(&limited), 1, &policy, 0.0);
        assert_eq!(got.settle, nak(90));
        // A Retry-After shorter than the backoff does not shorten it.
        let short =
            JobError::new(Stage::Import, ErrorCode::RateLimited, "429").with_retry_after(secs(1));
        let got = decide(Outcome::Failed(&short), 2, &policy, 0.0);
        assert_eq!(got.settle, nak(120));
    }

    #[test]
    fn budget_of_one_attempt_never_retries() {
        let policy = Policy {
            retry: JobRetryPolicy {
                max_attempts: 1,
                ..JobRetryPolicy::default()
            },
            lease: secs(60),
        };
        let transient = JobError::new(Stage::Fetch, ErrorCode::Timeout, "timed out");
        let got = decide(Outcome::Failed(&transient), 1, &policy, 0.0);
        assert_eq!(got.settle, TERM);
        assert!(got.retries_exhausted);
    }
}
