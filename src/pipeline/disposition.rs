//! What happens to a queue message once its job has run: the pure decision of ARCHITECTURE §5.
//!
//! `decide` maps (outcome, attempt, retry policy) to the result to publish, if any, and how to
//! settle the message. It performs no I/O and reads no clock: the caller passes the jitter, so
//! every row of the table is a plain test. Only this module and `adapters/nats.rs` speak
//! JetStream's words (ack, nak, term).

use std::time::Duration;

use crate::error::{ErrorClass, JobError};
use crate::job::Status;

/// How the queue message is settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settle {
    /// Done; the message leaves the queue (a double ack, awaited).
    Ack,
    /// Redeliver after `delay` (zero: at once, to another worker).
    Nak { delay: Duration },
    /// Never redeliver.
    Term,
}

/// The decision for one finished attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Disposition {
    /// The result status to publish before settling, if a result is due.
    pub publish: Option<Status>,
    pub settle: Settle,
    /// True when a transient failure is given up because the retry budget is spent; the
    /// published result then says so.
    pub retries_exhausted: bool,
}

/// The retry budget and delays. `max_attempts` stays below the consumer's `max_deliver` so the
/// worker always ends a job itself, with a result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub base_delay: Duration,
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 4,
            base_delay: Duration::from_secs(30),
            max_delay: Duration::from_secs(600),
        }
    }
}

impl RetryPolicy {
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

/// The outcome of one attempt at a job.
#[derive(Debug, Clone, Copy)]
pub enum Outcome<'a> {
    Succeeded,
    Failed(&'a JobError),
}

/// Decides what to publish and how to settle. `attempt` is 1-based (JetStream's delivery count).
pub fn decide(
    outcome: Outcome<'_>,
    attempt: u32,
    policy: &RetryPolicy,
    jitter: f64,
) -> Disposition {
    let (publish, settle, retries_exhausted) = match outcome {
        Outcome::Succeeded => (Some(Status::Succeeded), Settle::Ack, false),
        Outcome::Failed(err) => match err.class {
            ErrorClass::Permanent => (Some(Status::Failed), Settle::Term, false),
            ErrorClass::Transient if attempt < policy.max_attempts => {
                let delay = policy.delay(attempt, err.retry_after, jitter);
                (None, Settle::Nak { delay }, false)
            }
            ErrorClass::Transient => (Some(Status::Failed), Settle::Term, true),
            ErrorClass::Cancelled if err.is_shutdown() => (
                None,
                Settle::Nak {
                    delay: Duration::ZERO,
                },
                false,
            ),
            ErrorClass::Cancelled => (Some(Status::Cancelled), Settle::Term, false),
        },
    };
    Disposition {
        publish,
        settle,
        retries_exhausted,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{ErrorCode, Stage};

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    /// Every row of ARCHITECTURE §5, with the default policy (4 attempts, 30 s base, 10 min cap).
    #[test]
    fn every_row_of_the_disposition_table() {
        let policy = RetryPolicy::default();
        let permanent = JobError::new(Stage::Fetch, ErrorCode::AuthFailed, "refused");
        let transient = JobError::new(Stage::Fetch, ErrorCode::Unavailable, "503");
        let cancelled = JobError::cancelled(Stage::Build);
        let shutdown = JobError::shutdown(Stage::Build);

        type Row<'a> = (&'a str, Outcome<'a>, u32, Option<Status>, Settle, bool);
        #[rustfmt::skip]
        let rows: Vec<Row> = vec![
            ("success", Outcome::Succeeded, 1, Some(Status::Succeeded), Settle::Ack, false),
            ("success on a retry", Outcome::Succeeded, 3, Some(Status::Succeeded), Settle::Ack, false),
            ("permanent", Outcome::Failed(&permanent), 1, Some(Status::Failed), Settle::Term, false),
            ("permanent on a retry", Outcome::Failed(&permanent), 2, Some(Status::Failed), Settle::Term, false),
            ("transient, 1st of 4", Outcome::Failed(&transient), 1, None, Settle::Nak { delay: secs(30) }, false),
            ("transient, 2nd of 4", Outcome::Failed(&transient), 2, None, Settle::Nak { delay: secs(120) }, false),
            ("transient, 3rd of 4", Outcome::Failed(&transient), 3, None, Settle::Nak { delay: secs(480) }, false),
            ("transient, budget spent", Outcome::Failed(&transient), 4, Some(Status::Failed), Settle::Term, true),
            ("transient, past the budget", Outcome::Failed(&transient), 5, Some(Status::Failed), Settle::Term, true),
            ("cancelled by request", Outcome::Failed(&cancelled), 1, Some(Status::Cancelled), Settle::Term, false),
            ("cancelled by shutdown", Outcome::Failed(&shutdown), 1, None, Settle::Nak { delay: Duration::ZERO }, false),
            ("shutdown on the last attempt still hands over", Outcome::Failed(&shutdown), 4, None, Settle::Nak { delay: Duration::ZERO }, false),
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

    #[test]
    fn retry_delay_is_capped() {
        let policy = RetryPolicy {
            max_attempts: 4,
            base_delay: secs(30),
            max_delay: secs(600),
        };
        assert_eq!(policy.delay(4, None, 0.0), secs(600));
        assert_eq!(policy.delay(30, None, 0.99), secs(600));
    }

    #[test]
    fn jitter_adds_at_most_a_tenth() {
        let policy = RetryPolicy::default();
        let low = policy.delay(1, None, 0.0);
        let high = policy.delay(1, None, 0.999);
        assert_eq!(low, secs(30));
        assert!(high > low && high <= secs(33), "{high:?}");
    }

    #[test]
    fn rate_limit_honours_retry_after() {
        let policy = RetryPolicy::default();
        let limited =
            JobError::new(Stage::Import, ErrorCode::RateLimited, "429").with_retry_after(secs(90));
        let got = decide(Outcome::Failed(&limited), 1, &policy, 0.0);
        assert_eq!(got.settle, Settle::Nak { delay: secs(90) });
        // A Retry-After shorter than the backoff does not shorten it.
        let short =
            JobError::new(Stage::Import, ErrorCode::RateLimited, "429").with_retry_after(secs(1));
        let got = decide(Outcome::Failed(&short), 2, &policy, 0.0);
        assert_eq!(got.settle, Settle::Nak { delay: secs(120) });
    }

    #[test]
    fn budget_of_one_attempt_never_retries() {
        let policy = RetryPolicy {
            max_attempts: 1,
            ..RetryPolicy::default()
        };
        let transient = JobError::new(Stage::Fetch, ErrorCode::Timeout, "timed out");
        let got = decide(Outcome::Failed(&transient), 1, &policy, 0.0);
        assert_eq!(got.settle, Settle::Term);
        assert!(got.retries_exhausted);
    }
}
