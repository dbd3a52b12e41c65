//! The clock port: every wall-clock read (lease times, result and event timestamps) goes
//! through a [`Clock`], so a test can drive the time a worker sees. Durations inside the
//! process use `tokio::time::Instant`, which paused-time tests drive too; `.clippy.toml`
//! keeps `std::time::Instant`, `SystemTime::now` and `OffsetDateTime::now_utc` out of the
//! code outside this module.

use std::sync::Arc;

use time::OffsetDateTime;

/// Wall-clock time, as Unix milliseconds and as a timestamp.
pub trait Clock: Send + Sync {
    /// Milliseconds since the Unix epoch.
    fn now_ms(&self) -> u64;

    fn now(&self) -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp_nanos(i128::from(self.now_ms()) * 1_000_000)
            .unwrap_or(OffsetDateTime::UNIX_EPOCH)
    }
}

/// The machine's wall clock. Lease times are compared across nodes, so they are read from the
/// clock the nodes keep in sync (NTP), not from a monotonic clock that drifts from it.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    #[allow(clippy::disallowed_methods)] // the one place the wall clock is read
    fn now_ms(&self) -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    }
}

/// A wall clock that starts at the machine's time and then moves with tokio's clock, so a
/// paused-time test that advances tokio's time moves leases and timestamps with it.
#[derive(Debug, Clone, Copy)]
pub struct TokioClock {
    base_ms: u64,
    base: tokio::time::Instant,
}

impl TokioClock {
    pub fn new() -> Self {
        TokioClock {
            base_ms: SystemClock.now_ms(),
            base: tokio::time::Instant::now(),
        }
    }
}

impl Default for TokioClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for TokioClock {
    fn now_ms(&self) -> u64 {
        self.base_ms + self.base.elapsed().as_millis() as u64
    }
}

/// The clock production code uses.
pub fn system() -> Arc<dyn Clock> {
    Arc::new(SystemClock)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_tokio_clock_moves_with_paused_time() {
        let clock = TokioClock::new();
        let before = clock.now_ms();
        tokio::time::advance(std::time::Duration::from_secs(90)).await;
        assert_eq!(clock.now_ms() - before, 90_000);
        assert_eq!(
            (clock.now() - OffsetDateTime::UNIX_EPOCH).whole_milliseconds() as u64,
            clock.now_ms()
        );
    }

    #[test]
    fn the_system_clock_reads_the_wall_clock() {
        // 2026-01-01 in Unix ms: a clock reading before it is not the wall clock.
        assert!(SystemClock.now_ms() > 1_767_225_600_000);
    }
}
