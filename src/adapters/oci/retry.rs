//! The retry loop around one registry request: [`retrying`] and its policy, [`RequestRetry`].
//!
//! A transient failure (connection reset, 5xx, 429) is retried a few times in-process, with
//! exponential delays on tokio's clock, before the import gives up and the job goes back to the
//! queue, whose own retry waits minutes. Permanent and cancelled failures are returned at once.

use std::future::Future;
use std::time::Duration;

use crate::error::{ErrorClass, JobError};

/// How often and how long a transient failure of one registry request is retried inside one
/// import, before it is handed to the queue's retry (which waits minutes).
#[derive(Debug, Clone, Copy)]
pub struct RequestRetry {
    /// Tries per operation, the first included.
    pub attempts: u32,
    /// Delay before the first retry; doubles each time.
    pub base_delay: Duration,
    /// A `Retry-After` longer than this is left to the queue.
    pub max_wait: Duration,
}

impl Default for RequestRetry {
    fn default() -> Self {
        RequestRetry {
            attempts: 4,
            base_delay: Duration::from_millis(500),
            max_wait: Duration::from_secs(30),
        }
    }
}

/// Retries transient failures of `op` with exponential delays, waiting at least what a
/// `Retry-After` asked for; a wait longer than the policy allows is left to the queue.
pub(super) async fn retrying<T, F, Fut>(
    policy: RequestRetry,
    what: &str,
    op: F,
) -> Result<T, JobError>
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<T, JobError>>,
{
    let mut attempt = 1;
    loop {
        match op().await {
            Ok(value) => return Ok(value),
            Err(e) if e.class == ErrorClass::Transient && attempt < policy.attempts => {
                let backoff = policy.base_delay * 2u32.saturating_pow(attempt - 1);
                let delay = match e.retry_after {
                    Some(after) if after > policy.max_wait => return Err(e),
                    Some(after) => after.max(backoff.min(policy.max_wait)),
                    None => backoff,
                };
                tracing::warn!(attempt, delay_ms = delay.as_millis() as u64, error = %e, "Registry {what} failed; retrying.");
                tokio::time::sleep(delay).await;
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::cell::{Cell, RefCell};

    use tokio::time::Instant;

    use super::*;
    use crate::error::{ErrorCode, Stage};

    fn policy() -> RequestRetry {
        RequestRetry {
            attempts: 4,
            base_delay: Duration::from_millis(500),
            max_wait: Duration::from_secs(30),
        }
    }

    fn transient(call: u32) -> JobError {
        JobError::transient(
            Stage::Import,
            ErrorCode::Unavailable,
            format!("failure {call}"),
        )
    }

    /// Runs `retrying` with an operation that answers call `n` (from 1) with `answer(n)`, and
    /// returns the result with the paused-clock time of every call since the start.
    async fn run(
        policy: RequestRetry,
        answer: impl Fn(u32) -> Result<u32, JobError>,
    ) -> (Result<u32, JobError>, Vec<Duration>) {
        let start = Instant::now();
        let calls = Cell::new(0);
        let times = RefCell::new(Vec::new());
        let result = retrying(policy, "test", || {
            calls.set(calls.get() + 1);
            times.borrow_mut().push(start.elapsed());
            let answer = answer(calls.get());
            async move { answer }
        })
        .await;
        (result, times.into_inner())
    }

    fn ms(millis: u64) -> Duration {
        Duration::from_millis(millis)
    }

    #[tokio::test(start_paused = true)]
    async fn transient_failures_are_retried_after_doubling_delays_then_succeed() {
        let (result, times) =
            run(policy(), |n| if n < 3 { Err(transient(n)) } else { Ok(n) }).await;
        assert_eq!(result.ok(), Some(3));
        assert_eq!(times, [ms(0), ms(500), ms(1500)]);
    }

    #[tokio::test(start_paused = true)]
    async fn permanent_failure_is_not_retried() {
        let (result, times) = run(policy(), |_| {
            Err(JobError::permanent(
                Stage::Import,
                ErrorCode::NotFound,
                "no such manifest",
            ))
        })
        .await;
        let err = result.expect_err("a permanent failure is returned");
        assert_eq!(err.code, ErrorCode::NotFound);
        assert_eq!(times, [ms(0)]);
    }

    #[tokio::test(start_paused = true)]
    async fn cancelled_failure_is_not_retried() {
        let (result, times) = run(policy(), |_| Err(JobError::cancelled(Stage::Import))).await;
        assert_eq!(
            result.expect_err("a cancellation is returned").class,
            ErrorClass::Cancelled
        );
        assert_eq!(times, [ms(0)]);
    }

    #[tokio::test(start_paused = true)]
    async fn attempts_are_bounded_and_the_last_error_is_returned() {
        let (result, times) = run(policy(), |n| Err(transient(n))).await;
        let err = result.expect_err("every attempt failed");
        assert!(err.to_string().contains("failure 4"), "{err}");
        assert_eq!(times, [ms(0), ms(500), ms(1500), ms(3500)]);
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_within_max_wait_is_waited_instead_of_the_backoff() {
        let (result, times) = run(policy(), |n| {
            if n == 1 {
                Err(transient(n).with_retry_after(Duration::from_secs(5)))
            } else {
                Ok(n)
            }
        })
        .await;
        assert_eq!(result.ok(), Some(2));
        assert_eq!(times, [ms(0), ms(5000)]);
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_beyond_max_wait_is_left_to_the_queue() {
        let (result, times) = run(policy(), |n| {
            Err(transient(n).with_retry_after(Duration::from_secs(31)))
        })
        .await;
        assert_eq!(
            result.expect_err("left to the queue").retry_after,
            Some(Duration::from_secs(31))
        );
        assert_eq!(times, [ms(0)]);
    }
}
