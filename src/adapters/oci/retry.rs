//! The retry loop around one registry request: [`retrying`] and its policy, [`RequestRetry`].
//!
//! A transient failure (connection reset, 5xx, 429) is retried a few times in-process, with
//! exponential delays on tokio's clock, before the import gives up and the job goes back to the
//! queue, whose own retry waits minutes. Permanent and cancelled failures are returned at once.

use std::future::Future;
use std::time::Duration;

use crate::error::{ErrorClass, JobError};

/// How often and how long a transient failure is retried inside one import, before it is
/// handed to the queue's retry (which waits minutes).
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
