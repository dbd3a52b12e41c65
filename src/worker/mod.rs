//! The worker: slots, pull loops and the queue protocol around each job (ARCHITECTURE §1, §4).
//!
//! Each kind (build, import) has its own slots. A slot is taken *before* a pull, and a pull asks
//! for exactly one message, so a worker never holds more jobs than it can run. Each message then
//! takes one journey, read top to bottom in [`delivery`]: receive → claim → attempt → report →
//! settle. The attempt itself is the [`AttemptRunner`]'s, shared with `factoryd run`; the claim
//! protocol is in [`claim`], the settle decision in [`disposition`] (pure), and what operators
//! see of it in [`telemetry`].
//!
//! Waiting is interruptible, working is drained: on shutdown the pull loops stop at once, and
//! running jobs get the grace period before they are cancelled and handed back to the queue.

pub mod claim;
mod delivery;
pub mod disposition;
mod telemetry;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::clock::Clock;
use crate::job::Kind;
use crate::pipeline::attempt::{AttemptRunner, RunnerSettings, Stop, StopReason};
use crate::pipeline::Stages;
use crate::ports::{CancelRequests, EventBus, JobQueue, JobStates, ResultSink};
use crate::readiness::Readiness;
use crate::telemetry::metrics;
use claim::Claims;
use disposition::{JobRetryPolicy, Policy};

/// The worker's settings, from `[worker]` and the queue's timings.
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    pub name: String,
    pub build_slots: u32,
    pub import_slots: u32,
    pub work_root: PathBuf,
    pub grace_period: Duration,
    pub default_job_timeout: Duration,
    pub max_job_timeout: Duration,
    pub retry: JobRetryPolicy,
    /// How often a running job sends an in-progress ack and refreshes its lease
    /// (`ack_wait / 3`).
    pub heartbeat: Duration,
    /// How long a claim holds without a refresh (`ack_wait`).
    pub lease: Duration,
    /// How long one pull waits for a message.
    pub pull_wait: Duration,
    /// Lost attempts (worker gone mid-job) after which a job is given up as `poison` (0: never).
    pub max_lost_attempts: u32,
}

impl WorkerSettings {
    pub fn from_config(config: &crate::config::Config) -> Self {
        let w = &config.worker;
        let ack_wait = config.nats.ack_wait;
        WorkerSettings {
            name: w.name.clone(),
            build_slots: w.build_slots,
            import_slots: w.import_slots,
            work_root: w.work_root.clone(),
            grace_period: w.grace_period,
            default_job_timeout: w.default_job_timeout,
            max_job_timeout: w.max_job_timeout,
            retry: JobRetryPolicy {
                max_attempts: w.max_attempts,
                base_delay: w.retry_base_delay,
                max_delay: w.retry_max_delay,
            },
            heartbeat: ack_wait / 3,
            lease: ack_wait,
            pull_wait: Duration::from_secs(30),
            max_lost_attempts: w.max_lost_attempts,
        }
    }

    /// What the attempt runner needs of these settings.
    pub fn runner(&self) -> RunnerSettings {
        RunnerSettings {
            worker: self.name.clone(),
            work_root: self.work_root.clone(),
            default_job_timeout: self.default_job_timeout,
            max_job_timeout: self.max_job_timeout,
            abort_after: crate::pipeline::attempt::ABORT_AFTER,
        }
    }

    /// How long a running attempt may go without confirming its lease before the worker stops
    /// it itself: `lease − heartbeat` after the last confirmed claim or refresh was sent. Other
    /// workers take the job over only once the lease has lapsed on their own clocks, so the
    /// remaining `heartbeat` (ack_wait / 3) is the margin for clock offsets between nodes and
    /// for the stop to take effect.
    pub fn fence_after(&self) -> Duration {
        self.lease.saturating_sub(self.heartbeat)
    }

    fn policy(&self) -> Policy {
        Policy {
            retry: self.retry,
            lease: self.lease,
        }
    }

    fn slots(&self, kind: Kind) -> u32 {
        match kind {
            Kind::Build => self.build_slots,
            Kind::Import => self.import_slots,
        }
    }
}

/// The message system as the worker sees it.
#[derive(Clone)]
pub struct QueuePorts {
    pub queue: Arc<dyn JobQueue>,
    pub states: Arc<dyn JobStates>,
    pub results: Arc<dyn ResultSink>,
    pub events: Arc<dyn EventBus>,
    pub cancels: Arc<dyn CancelRequests>,
}

/// Counts for tests and metrics; read with [`Worker::stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WorkerStats {
    pub received: u64,
    pub finished: u64,
    pub duplicates: u64,
}

pub struct Worker {
    settings: WorkerSettings,
    ports: QueuePorts,
    runner: AttemptRunner,
    readiness: Arc<Readiness>,
    clock: Arc<dyn Clock>,
    /// The attempts running now, by job id: how a cancel request or the shutdown stops one.
    running: Mutex<HashMap<String, Stop>>,
    /// Fires when the shutdown's grace period is over: writes still waiting for an answer (a
    /// result, a record) give up, so the worker exits; their messages are redelivered.
    grace_over: CancellationToken,
    stats: Mutex<WorkerStats>,
}

impl Worker {
    /// A worker over `ports`, running jobs on `stages`; its holds and liveness are kept in
    /// `readiness`, made (and probed) before it; wall-clock times come from `clock`.
    pub fn new(
        settings: WorkerSettings,
        ports: QueuePorts,
        stages: Stages,
        readiness: Arc<Readiness>,
        clock: Arc<dyn Clock>,
    ) -> Arc<Self> {
        let runner = AttemptRunner::new(stages, settings.runner(), Arc::clone(&clock));
        Arc::new(Worker {
            settings,
            ports,
            runner,
            readiness,
            clock,
            running: Mutex::new(HashMap::new()),
            grace_over: CancellationToken::new(),
            stats: Mutex::new(WorkerStats::default()),
        })
    }

    pub fn readiness(&self) -> &Arc<Readiness> {
        &self.readiness
    }

    pub fn stats(&self) -> WorkerStats {
        *self.stats.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn count(&self, f: impl FnOnce(&mut WorkerStats)) {
        f(&mut self.stats.lock().unwrap_or_else(|e| e.into_inner()));
    }

    /// How long a pull loop may take to go round before it counts as stuck: a pull waits at
    /// most `pull_wait`.
    fn stuck_after(&self) -> Duration {
        self.settings.pull_wait + Duration::from_secs(30)
    }

    fn beat(&self, kind: Kind, slots: &Arc<Semaphore>) {
        self.readiness.beat(kind, slots, self.stuck_after());
    }

    /// Waits while jobs of `kind` are held, going round every `pull_wait` so that the watchdog
    /// sees the loop alive. False when `stop` fired.
    async fn wait_while_held(
        &self,
        kind: Kind,
        slots: &Arc<Semaphore>,
        stop: &CancellationToken,
    ) -> bool {
        let Some(mut hold) = self.readiness.watch_holds(kind) else {
            return true;
        };
        // Logged when the causes change, not their texts (free space changes at every check).
        let mut said = Vec::new();
        loop {
            let (causes, why): (Vec<_>, Vec<String>) = hold
                .borrow_and_update()
                .iter()
                .map(|(cause, why)| (*cause, why.clone()))
                .unzip();
            if causes.is_empty() {
                if !said.is_empty() {
                    info!(%kind, "Taking jobs of this kind again.");
                }
                return true;
            }
            if causes != said {
                let why = why.join("; ");
                warn!(%kind, reason = %why, "Not taking jobs of this kind until this clears.");
                said = causes;
            }
            self.beat(kind, slots);
            tokio::select! {
                _ = stop.cancelled() => return false,
                _ = hold.changed() => {}
                _ = tokio::time::sleep(self.settings.pull_wait) => {}
            }
        }
    }

    /// The claim protocol for `attempt`, keeping the record's `lost_attempts` in every write.
    fn claims(&self, attempt: u32, lost_attempts: u32) -> Claims<'_> {
        Claims {
            states: self.ports.states.as_ref(),
            worker: &self.settings.name,
            lease: self.settings.lease,
            now_ms: self.clock.now_ms(),
            attempt,
            lost_attempts,
        }
    }

    /// Runs until `shutdown` fires, then drains: running jobs get the grace period, then are
    /// cancelled and handed back to the queue.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let jobs = TaskTracker::new();
        let pullers = TaskTracker::new();

        match self.ports.cancels.subscribe().await {
            Ok(mut requests) => {
                let me = Arc::clone(&self);
                let stop = shutdown.clone();
                pullers.spawn(async move {
                    loop {
                        tokio::select! {
                            _ = stop.cancelled() => break,
                            id = requests.recv() => match id {
                                Some(id) => me.cancel_running(&id, StopReason::Requested),
                                None => break,
                            },
                        }
                    }
                });
            }
            // Cancel marks in the state store still reach running jobs at their next heartbeat.
            Err(e) => {
                warn!(error = %e, "Cannot subscribe to cancel requests; relying on cancel marks.")
            }
        }

        for kind in Kind::ALL {
            let slots = self.settings.slots(kind);
            if slots == 0 {
                continue;
            }
            let semaphore = Arc::new(Semaphore::new(slots as usize));
            let me = Arc::clone(&self);
            let stop = shutdown.clone();
            let jobs = jobs.clone();
            pullers.spawn(async move { me.pull_loop(kind, semaphore, stop, jobs).await });
        }
        pullers.close();

        shutdown.cancelled().await;
        pullers.wait().await;
        jobs.close();
        let in_flight = self.running.lock().map(|r| r.len()).unwrap_or(0);
        if in_flight > 0 {
            info!(
                jobs = in_flight,
                grace_secs = self.settings.grace_period.as_secs(),
                "Draining: waiting for running jobs."
            );
        }
        if tokio::time::timeout(self.settings.grace_period, jobs.wait())
            .await
            .is_err()
        {
            let ids: Vec<String> = self
                .running
                .lock()
                .map(|r| r.keys().cloned().collect())
                .unwrap_or_default();
            warn!(
                jobs = ids.len(),
                "Grace period over; handing running jobs back to the queue."
            );
            self.grace_over.cancel();
            for id in ids {
                self.cancel_running(&id, StopReason::Shutdown);
            }
            jobs.wait().await;
        }
        info!("Worker stopped.");
    }

    fn cancel_running(&self, job_id: &str, reason: StopReason) {
        if let Ok(running) = self.running.lock() {
            if let Some(stop) = running.get(job_id) {
                info!(job.id = %job_id, ?reason, "Stopping job.");
                stop.stop(reason);
            }
        }
    }

    async fn pull_loop(
        self: Arc<Self>,
        kind: Kind,
        slots: Arc<Semaphore>,
        stop: CancellationToken,
        jobs: TaskTracker,
    ) {
        let mut backoff = Duration::from_millis(100);
        loop {
            self.beat(kind, &slots);
            let permit = tokio::select! {
                _ = stop.cancelled() => return,
                permit = Arc::clone(&slots).acquire_owned() => match permit {
                    Ok(p) => p,
                    Err(_) => return,
                },
            };
            let free = metrics().slots_free.with_label_values(&[kind.as_str()]);
            free.set(slots.available_permits() as i64);
            if !self.wait_while_held(kind, &slots, &stop).await {
                return;
            }
            self.beat(kind, &slots);
            let pulled = tokio::select! {
                _ = stop.cancelled() => return,
                pulled = self.ports.queue.pull(kind, self.settings.pull_wait) => pulled,
            };
            match pulled {
                Ok(Some(delivery)) => {
                    backoff = Duration::from_millis(100);
                    let me = Arc::clone(&self);
                    let slots = Arc::clone(&slots);
                    jobs.spawn(async move {
                        me.process(delivery).await;
                        drop(permit);
                        free.set(slots.available_permits() as i64);
                    });
                }
                Ok(None) => {}
                Err(e) => {
                    // The connection is down or the consumer is missing; the client reconnects.
                    debug!(%kind, error = %e, "Pull failed; retrying.");
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
