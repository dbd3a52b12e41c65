//! The consume loop (ARCHITECTURE §1, §4): slot → pull → claim → run → publish → settle.
//!
//! Each kind (build, import) has its own slots. A slot is taken *before* a pull, and a pull asks
//! for exactly one message, so a worker never holds more jobs than it can run. Each job runs in
//! a tracked task with a heartbeat (in-progress ack and lease refresh), a timeout, and a
//! cancellation token that a cancel request, the timeout or the shutdown fires. When the job
//! ends, [`decide`](crate::pipeline::disposition::decide) says what to publish and how to
//! settle; the result is stored and published (and its publish acknowledged) before the message
//! is settled, so a crash in between re-publishes rather than loses it.
//!
//! Waiting is interruptible, working is drained: on shutdown the pull loops stop at once, and
//! running jobs get the grace period before they are cancelled and handed back to the queue.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use time::OffsetDateTime;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn, Instrument};

use crate::error::{ErrorClass, ErrorCode, JobError, Stage};
use crate::job::{self, DeadLetter, ErrorInfo, Job, JobEvent, JobResult, Kind, Redactor, Status};
use crate::pipeline::claim::{ClaimOutcome, Claims};
use crate::pipeline::disposition::{decide, Outcome, RetryPolicy, Settle};
use crate::pipeline::{run_job, JobOutput, Stages};
use crate::ports::{
    CancelRequests, Delivery, DeliveryHandle, EventBus, EventSink, JobQueue, JobStates, ResultSink,
    StageContext,
};
use crate::telemetry::metrics;
use crate::workspace::Workspace;

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
    pub retry: RetryPolicy,
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
            retry: RetryPolicy {
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

/// Why a running job's token fired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StopReason {
    Requested,
    Timeout,
    Shutdown,
    /// Our lease lapsed and another worker took the job: stop quietly.
    LostClaim,
}

struct Running {
    token: CancellationToken,
    reason: Arc<Mutex<Option<StopReason>>>,
}

impl Running {
    fn stop(&self, reason: StopReason) {
        let mut slot = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        slot.get_or_insert(reason);
        self.token.cancel();
    }
}

/// Why a worker takes no jobs of a kind for now ([`Worker::hold`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum HoldCause {
    /// The build backend's probe fails.
    BuilderUnreachable,
    /// The work root (or the layout store) has less free space than `worker.min_free_mib`.
    LowDisk,
}

type Holds = std::collections::BTreeMap<HoldCause, String>;

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
    stages: Stages,
    running: Mutex<HashMap<String, Running>>,
    stats: Mutex<WorkerStats>,
    /// Per pull loop: its slots and when it last went round, for [`Worker::alive`].
    beats: Mutex<HashMap<Kind, (Arc<Semaphore>, Instant)>>,
    /// Per kind: why this worker takes no jobs of that kind now, by cause (empty: it takes
    /// them).
    holds: HashMap<Kind, tokio::sync::watch::Sender<Holds>>,
    /// Wall clock derived from tokio's clock, so paused-time tests move leases too.
    wall_base_ms: u64,
    instant_base: Instant,
}

impl Worker {
    pub fn new(settings: WorkerSettings, ports: QueuePorts, stages: Stages) -> Arc<Self> {
        let wall_base_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        Arc::new(Worker {
            settings,
            ports,
            stages,
            running: Mutex::new(HashMap::new()),
            stats: Mutex::new(WorkerStats::default()),
            beats: Mutex::new(HashMap::new()),
            holds: Kind::ALL
                .into_iter()
                .map(|kind| (kind, tokio::sync::watch::Sender::new(Holds::new())))
                .collect(),
            wall_base_ms,
            instant_base: Instant::now(),
        })
    }

    /// True while every pull loop goes round: each waits at most `pull_wait` for a message,
    /// so one that has not come back for longer, while it has a free slot, is stuck. A loop
    /// whose slots are all busy is waiting for its jobs, which is fine. Drives the systemd
    /// watchdog.
    pub fn alive(&self) -> bool {
        let limit = self.settings.pull_wait + Duration::from_secs(30);
        self.beats
            .lock()
            .map(|beats| {
                beats
                    .values()
                    .all(|(slots, last)| slots.available_permits() == 0 || last.elapsed() <= limit)
            })
            .unwrap_or(false)
    }

    /// Stops taking jobs of `kind` for `cause` (`Some(why)`), or lifts that cause (`None`);
    /// the worker takes jobs of a kind again once no cause holds it. Jobs already running go
    /// on; jobs waiting in the queue stay there for other workers, so a node that cannot run
    /// them (its build backend unreachable, its disk full) does not spend their retries.
    pub fn hold(&self, kind: Kind, cause: HoldCause, why: Option<String>) {
        let Some(hold) = self.holds.get(&kind) else {
            return;
        };
        hold.send_if_modified(|holds| match why {
            Some(why) => holds.insert(cause, why.clone()).as_ref() != Some(&why),
            None => holds.remove(&cause).is_some(),
        });
        metrics()
            .jobs_held
            .with_label_values(&[kind.as_str()])
            .set(i64::from(self.is_held(kind)));
    }

    fn is_held(&self, kind: Kind) -> bool {
        self.holds
            .get(&kind)
            .is_some_and(|hold| !hold.borrow().is_empty())
    }

    /// Waits while jobs of `kind` are held, going round every `pull_wait` so that the watchdog
    /// sees the loop alive. False when `stop` fired.
    async fn wait_while_held(
        &self,
        kind: Kind,
        slots: &Arc<Semaphore>,
        stop: &CancellationToken,
    ) -> bool {
        let Some(hold) = self.holds.get(&kind) else {
            return true;
        };
        let mut hold = hold.subscribe();
        // Logged when the causes change, not their texts (free space changes at every check).
        let mut said: Vec<HoldCause> = Vec::new();
        loop {
            let (causes, why): (Vec<HoldCause>, Vec<String>) = hold
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

    fn beat(&self, kind: Kind, slots: &Arc<Semaphore>) {
        if let Ok(mut beats) = self.beats.lock() {
            beats.insert(kind, (Arc::clone(slots), Instant::now()));
        }
    }

    pub fn stats(&self) -> WorkerStats {
        *self.stats.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn count(&self, f: impl FnOnce(&mut WorkerStats)) {
        f(&mut self.stats.lock().unwrap_or_else(|e| e.into_inner()));
    }

    fn now_ms(&self) -> u64 {
        self.wall_base_ms + self.instant_base.elapsed().as_millis() as u64
    }

    fn now(&self) -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp_nanos(i128::from(self.now_ms()) * 1_000_000)
            .unwrap_or(OffsetDateTime::UNIX_EPOCH)
    }

    /// The claim protocol for `attempt`, keeping the record's `lost_attempts` in every write.
    fn claims(&self, attempt: u32, lost_attempts: u32) -> Claims<'_> {
        Claims {
            states: self.ports.states.as_ref(),
            worker: &self.settings.name,
            lease: self.settings.lease,
            now_ms: self.now_ms(),
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
            for id in ids {
                self.cancel_running(&id, StopReason::Shutdown);
            }
            jobs.wait().await;
        }
        info!("Worker stopped.");
    }

    fn cancel_running(&self, job_id: &str, reason: StopReason) {
        if let Ok(running) = self.running.lock() {
            if let Some(job) = running.get(job_id) {
                info!(job.id = %job_id, ?reason, "Stopping job.");
                job.stop(reason);
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
                    // Held while the pull waited: hand the job back for another worker, untried.
                    if self.is_held(kind) {
                        debug!(%kind, "Handing a job back: this kind is held.");
                        self.settle(
                            &delivery,
                            Settle::Nak {
                                delay: Duration::ZERO,
                            },
                        )
                        .await;
                        continue;
                    }
                    let me = Arc::clone(&self);
                    let slots = Arc::clone(&slots);
                    jobs.spawn(async move {
                        me.handle(delivery).await;
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

    /// One delivery, start to settle.
    async fn handle(self: Arc<Self>, delivery: Delivery) {
        self.count(|s| s.received += 1);
        metrics()
            .jobs_received
            .with_label_values(&[delivery.kind.as_str()])
            .inc();
        let attempt = delivery.attempt;
        let job = match job::decode(&delivery.payload) {
            Ok(job) if job.id == delivery.subject_job_id && job.kind() == delivery.kind => job,
            Ok(job) => {
                let msg = format!(
                    "job {} of kind {} was published on the subject of job {} of kind {}",
                    job.id,
                    job.kind(),
                    delivery.subject_job_id,
                    delivery.kind
                );
                return self.reject(delivery, &job.source_id, msg).await;
            }
            Err(problems) => {
                let msg = format!("invalid job: {}", problems.to_string().replace('\n', "; "));
                return self.reject(delivery, "", msg).await;
            }
        };
        let span = tracing::info_span!("job", job.id = %job.id, kind = %job.kind(), attempt);
        self.run_delivery(job, delivery).instrument(span).await;
    }

    /// A job whose earlier attempts ended with their worker gone (`lost_attempts`, at least
    /// `worker.max_lost_attempts`): most likely the job itself brings workers down, so it is not
    /// run again. It is copied to the dead-letter stream first, then fails permanently as
    /// `poison` like any finished job (terminal record, result, term). A failure on the way
    /// leaves the message for redelivery, which comes back here; the copy is deduplicated.
    async fn give_up_poison(
        &self,
        job: &Job,
        delivery: &Delivery,
        revision: u64,
        lost_attempts: u32,
    ) {
        let attempt = delivery.attempt;
        let err = JobError::permanent(
            Stage::Receive,
            ErrorCode::Poison,
            format!(
                "not run again: {lost_attempts} earlier attempt(s) ended with their worker gone \
                 mid-job (it crashed, was killed or lost its connection; \
                 worker.max_lost_attempts = {}); a copy is in the dead-letter stream",
                self.settings.max_lost_attempts
            ),
        );
        error!(
            lost_attempts,
            "Giving the job up as poison: its earlier attempts ended with their worker gone."
        );
        let now = self.now();
        let result = self.result_of(
            &job.id,
            &job.source_id,
            attempt,
            Err((&err, false)),
            now,
            now,
            &Redactor::for_job(job),
        );
        let letter = DeadLetter {
            v: job::WIRE_VERSION,
            job_id: job.id.clone(),
            source_id: job.source_id.clone(),
            kind: job.kind(),
            delivery: attempt,
            lost_attempts,
            result: result.clone(),
        };
        if let Err(e) = self.ports.results.dead_letter(&letter).await {
            warn!(error = %e, "Cannot copy the job to the dead-letter stream; it will be redelivered.");
            return;
        }
        match self
            .claims(attempt, lost_attempts)
            .finish(&job.id, revision, &result)
            .await
        {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => {
                warn!(error = %e, "Cannot store the terminal state; the job will be redelivered.");
                return;
            }
        }
        if self.publish(&result).await {
            self.settle(delivery, Settle::Term).await;
        }
        metrics()
            .jobs_completed
            .with_label_values(&[job.kind().as_str(), "poisoned"])
            .inc();
        self.count(|s| s.finished += 1);
    }

    /// A message that is not a valid job: a permanent failure, reported on the subject's id.
    async fn reject(&self, delivery: Delivery, source_id: &str, message: String) {
        let err = JobError::new(Stage::Receive, ErrorCode::InvalidJob, message);
        warn!(job.id = %delivery.subject_job_id, error = %err, "Rejecting message.");
        let now = self.now();
        let result = self.result_of(
            &delivery.subject_job_id,
            source_id,
            delivery.attempt,
            Err((&err, false)),
            now,
            now,
            &Redactor::default(),
        );
        if self.publish(&result).await {
            self.settle(&delivery, Settle::Term).await;
        }
    }

    async fn run_delivery(self: Arc<Self>, job: Job, delivery: Delivery) {
        let attempt = delivery.attempt;
        if self
            .running
            .lock()
            .map(|r| r.contains_key(&job.id))
            .unwrap_or(false)
        {
            // Redelivered to us while we still run it (a missed heartbeat): leave it be.
            self.count(|s| s.duplicates += 1);
            self.settle(
                &delivery,
                Settle::Nak {
                    delay: self.settings.lease,
                },
            )
            .await;
            return;
        }

        let (revision, lost_attempts) = match self.claims(attempt, 0).claim(&job.id).await {
            Ok(ClaimOutcome::Claimed {
                revision,
                lost_attempts,
            }) => (revision, lost_attempts),
            Ok(ClaimOutcome::AlreadyDone(result)) => {
                info!(
                    status = result.status.as_str(),
                    "Job already ended; re-publishing its result."
                );
                self.count(|s| s.duplicates += 1);
                if self.publish(&result).await {
                    let settle = match result.status {
                        Status::Succeeded => Settle::Ack,
                        _ => Settle::Term,
                    };
                    self.settle(&delivery, settle).await;
                }
                return;
            }
            Ok(ClaimOutcome::RunningElsewhere { retry_in }) => {
                debug!(
                    retry_in_ms = retry_in.as_millis() as u64,
                    "Job runs on another worker; putting it back."
                );
                self.count(|s| s.duplicates += 1);
                self.settle(&delivery, Settle::Nak { delay: retry_in })
                    .await;
                return;
            }
            Ok(ClaimOutcome::CancelledBeforeStart { revision }) => {
                let now = self.now();
                let err = JobError::cancelled(Stage::Receive);
                let result = self.result_of(
                    &job.id,
                    &job.source_id,
                    attempt,
                    Err((&err, false)),
                    now,
                    now,
                    &Redactor::default(),
                );
                info!("Job cancelled before it started.");
                let stored = self
                    .claims(attempt, 0)
                    .finish_cancelled_before_start(&job.id, revision, &result)
                    .await
                    .unwrap_or(false);
                if stored && self.publish(&result).await {
                    self.settle(&delivery, Settle::Term).await;
                }
                return;
            }
            Err(e) => {
                // The state store is unreachable (a leader election, an outage): back off
                // steeply, so a short outage does not use up the message's deliveries.
                let delay = Duration::from_secs(5 << attempt.min(4)).min(self.settings.lease * 2);
                warn!(error = %e, delay_ms = delay.as_millis() as u64, "Claim failed; the job will be redelivered.");
                self.settle(&delivery, Settle::Nak { delay }).await;
                return;
            }
        };

        let max_lost = self.settings.max_lost_attempts;
        if max_lost > 0 && lost_attempts >= max_lost {
            return self
                .give_up_poison(&job, &delivery, revision, lost_attempts)
                .await;
        }

        let token = CancellationToken::new();
        let reason = Arc::new(Mutex::new(None));
        if let Ok(mut running) = self.running.lock() {
            running.insert(
                job.id.clone(),
                Running {
                    token: token.clone(),
                    reason: Arc::clone(&reason),
                },
            );
        }

        // One masking set for the whole attempt: its stages add the credentials they learn, and
        // the events and the result below are masked with all of them.
        let redactor = Arc::new(Redactor::for_job(&job));
        let events: Arc<dyn EventSink> = Arc::new(RedactingSink {
            inner: self.ports.events.sink(&job.id, attempt),
            redactor: Arc::clone(&redactor),
        });
        events.emit(JobEvent::Started {
            kind: job.kind(),
            worker: self.settings.name.clone(),
        });
        info!(kind = %job.kind(), "Job started.");
        let started_at = self.now();
        let in_flight = metrics()
            .jobs_in_flight
            .with_label_values(&[job.kind().as_str()]);
        in_flight.inc();

        let revision = Arc::new(tokio::sync::Mutex::new(revision));
        let heartbeat = tokio::spawn(Arc::clone(&self).heartbeat(
            job.id.clone(),
            (attempt, lost_attempts),
            Arc::clone(&revision),
            Arc::clone(&delivery.handle),
            token.clone(),
            Arc::clone(&reason),
        ));
        let outcome = self
            .run_attempt(
                &job,
                attempt,
                token.clone(),
                Arc::clone(&reason),
                events.clone(),
                redactor.clone(),
            )
            .await;
        heartbeat.abort();
        let _ = heartbeat.await;
        in_flight.dec();
        if let Ok(mut running) = self.running.lock() {
            running.remove(&job.id);
        }

        let stop = *reason.lock().unwrap_or_else(|e| e.into_inner());
        if stop == Some(StopReason::LostClaim) {
            warn!("Lost the claim to another worker; dropping this attempt quietly.");
            return;
        }
        let finished_at = self.now();
        self.conclude(
            &job,
            &delivery,
            (*revision.lock().await, lost_attempts),
            outcome,
            started_at,
            finished_at,
            &events,
            &redactor,
        )
        .await;
        self.count(|s| s.finished += 1);
    }

    #[allow(clippy::too_many_arguments)]
    async fn conclude(
        &self,
        job: &Job,
        delivery: &Delivery,
        (revision, lost_attempts): (u64, u32),
        outcome: Result<JobOutput, JobError>,
        started_at: OffsetDateTime,
        finished_at: OffsetDateTime,
        events: &Arc<dyn EventSink>,
        redactor: &Redactor,
    ) {
        let attempt = delivery.attempt;
        let kind = job.kind().as_str();
        let seconds = (finished_at - started_at).as_seconds_f64().max(0.0);
        let record = |outcome: &str| {
            let m = metrics();
            m.jobs_completed.with_label_values(&[kind, outcome]).inc();
            m.job_duration
                .with_label_values(&[kind, outcome])
                .observe(seconds);
        };
        if let Ok(output) = &outcome {
            let t = output.timings;
            for (stage, ms) in [
                (Stage::Fetch, t.fetch),
                (Stage::Build, t.build),
                (Stage::Import, t.import),
                (Stage::Export, t.export),
            ] {
                if ms > 0 {
                    metrics()
                        .stage_duration
                        .with_label_values(&[stage.as_str()])
                        .observe(ms as f64 / 1000.0);
                }
            }
        }
        let decision = match &outcome {
            Ok(_) => decide(
                Outcome::Succeeded,
                attempt,
                &self.settings.retry,
                fastrand::f64(),
            ),
            Err(e) => decide(
                Outcome::Failed(e),
                attempt,
                &self.settings.retry,
                fastrand::f64(),
            ),
        };
        let claims = self.claims(attempt, lost_attempts);
        match decision.publish {
            Some(status) => {
                let result = self.result_of(
                    &job.id,
                    &job.source_id,
                    attempt,
                    outcome
                        .as_ref()
                        .map_err(|e| (e, decision.retries_exhausted)),
                    started_at,
                    finished_at,
                    redactor,
                );
                debug_assert_eq!(result.status, status);
                match claims.finish(&job.id, revision, &result).await {
                    Ok(true) => {}
                    Ok(false) => {
                        warn!("Job taken over by another worker before it finished here; not publishing.");
                        return;
                    }
                    Err(e) => {
                        // Without the terminal record we cannot tell a duplicate from a retry
                        // later: leave the message for redelivery.
                        warn!(error = %e, "Cannot store the terminal state; the job will be redelivered.");
                        return;
                    }
                }
                events.emit(JobEvent::Finished { status });
                let publishing = Instant::now();
                if self.publish(&result).await {
                    metrics()
                        .result_publish_seconds
                        .observe(publishing.elapsed().as_secs_f64());
                    self.settle(delivery, decision.settle).await;
                }
                record(status.as_str());
                match &outcome {
                    Ok(_) => info!(outcome = status.as_str(), "Job finished."),
                    Err(e) => {
                        info!(outcome = status.as_str(), class = %e.class, code = %e.code, error = %redactor.redact(&e.message), "Job finished.")
                    }
                }
            }
            None => {
                if let Err(e) = &outcome {
                    if let Settle::Nak { delay } = decision.settle {
                        if e.class == ErrorClass::Transient {
                            record("retried");
                            metrics()
                                .retries
                                .with_label_values(&[e.stage.as_str(), e.class.as_str()])
                                .inc();
                            events.emit(JobEvent::Retrying {
                                error: redacted_info(e, attempt, false, redactor),
                                delay_ms: delay.as_millis() as u64,
                            });
                        }
                        if e.class != ErrorClass::Transient {
                            record("handed_back");
                        }
                        info!(class = %e.class, code = %e.code, delay_ms = delay.as_millis() as u64, error = %redactor.redact(&e.message), "Attempt failed; handing the job back.");
                    }
                }
                if let Err(e) = claims.release(&job.id, revision).await {
                    debug!(error = %e, "Cannot release the claim; it will lapse.");
                }
                self.settle(delivery, decision.settle).await;
            }
        }
    }

    /// Runs the pipeline under the job's timeout, in its own task (a panic fails the attempt,
    /// not the worker), in a fresh workspace that is removed afterwards.
    async fn run_attempt(
        &self,
        job: &Job,
        attempt: u32,
        token: CancellationToken,
        reason: Arc<Mutex<Option<StopReason>>>,
        events: Arc<dyn EventSink>,
        redactor: Arc<Redactor>,
    ) -> Result<JobOutput, JobError> {
        // Removed when dropped, at the end of this function, whatever the outcome.
        let workspace = Workspace::create(&self.settings.work_root, &job.id)?;
        let cx = StageContext {
            job_id: job.id.clone(),
            attempt,
            cancel: token.clone(),
            events,
            redactor,
            workspace: workspace.path().to_owned(),
        };
        let timeout = job
            .timeout_secs
            .map(Duration::from_secs)
            .unwrap_or(self.settings.default_job_timeout)
            .min(self.settings.max_job_timeout);
        let stages = self.stages.clone();
        let owned_job = job.clone();
        let mut task = tokio::spawn(async move { run_job(&owned_job, &stages, &cx).await });

        let joined = tokio::select! {
            joined = &mut task => joined,
            _ = tokio::time::sleep(timeout) => {
                Running { token: token.clone(), reason: Arc::clone(&reason) }.stop(StopReason::Timeout);
                // Stages stop their work on the token; give them a bounded time to do so.
                match tokio::time::timeout(Duration::from_secs(60), &mut task).await {
                    Ok(joined) => joined,
                    Err(_) => {
                        task.abort();
                        Ok(Err(JobError::cancelled(Stage::Receive)))
                    }
                }
            }
        };
        drop(workspace);

        let result = match joined {
            Ok(result) => result,
            Err(e) if e.is_panic() => Err(JobError::transient(
                Stage::Receive,
                ErrorCode::Internal,
                "internal error: the job's task panicked",
            )),
            Err(_) => Err(JobError::cancelled(Stage::Receive)),
        };
        let stop = *reason.lock().unwrap_or_else(|e| e.into_inner());
        match (result, stop) {
            (Ok(output), _) => Ok(output),
            (Err(e), None) => Err(e),
            // The token fired: whatever the stage reported, the reason decides the class.
            (Err(e), Some(StopReason::Requested)) => Err(JobError::cancelled(e.stage)),
            (Err(e), Some(StopReason::Shutdown | StopReason::LostClaim)) => {
                Err(JobError::shutdown(e.stage))
            }
            (Err(e), Some(StopReason::Timeout)) => Err(JobError::permanent(
                e.stage,
                ErrorCode::Timeout,
                format!("job timed out after {} s", timeout.as_secs()),
            )),
        }
    }

    async fn heartbeat(
        self: Arc<Self>,
        job_id: String,
        (attempt, lost_attempts): (u32, u32),
        revision: Arc<tokio::sync::Mutex<u64>>,
        delivery: Arc<dyn DeliveryHandle>,
        token: CancellationToken,
        reason: Arc<Mutex<Option<StopReason>>>,
    ) {
        let running = Running { token, reason };
        let mut ticker = tokio::time::interval(self.settings.heartbeat);
        ticker.tick().await;
        loop {
            ticker.tick().await;
            if let Err(e) = delivery.in_progress().await {
                debug!(job.id = %job_id, error = %e, "In-progress ack failed.");
            }
            let mut rev = revision.lock().await;
            match self
                .claims(attempt, lost_attempts)
                .refresh(&job_id, *rev)
                .await
            {
                Ok(Some((new, cancel))) => {
                    *rev = new;
                    if cancel {
                        running.stop(StopReason::Requested);
                    }
                }
                Ok(None) => {
                    running.stop(StopReason::LostClaim);
                    return;
                }
                Err(e) => debug!(job.id = %job_id, error = %e, "Lease refresh failed; will retry."),
            }
        }
    }

    /// Publishes a result; false (logged) when the message system did not confirm it.
    async fn publish(&self, result: &JobResult) -> bool {
        match self.ports.results.publish(result).await {
            Ok(()) => true,
            Err(e) => {
                error!(job.id = %result.job_id, error = %e, "Cannot publish the result; the job will be redelivered and the result published again.");
                false
            }
        }
    }

    async fn settle(&self, delivery: &Delivery, settle: Settle) {
        if let Err(e) = delivery.handle.settle(settle).await {
            warn!(job.id = %delivery.subject_job_id, error = %e, ?settle, "Cannot settle the message; it will be redelivered.");
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn result_of(
        &self,
        job_id: &str,
        source_id: &str,
        attempt: u32,
        outcome: Result<&JobOutput, (&JobError, bool)>,
        started_at: OffsetDateTime,
        finished_at: OffsetDateTime,
        redactor: &Redactor,
    ) -> JobResult {
        job_result(
            JobRun {
                job_id,
                source_id,
                attempt,
                worker: &self.settings.name,
                started_at,
                finished_at,
            },
            outcome,
            redactor,
        )
    }
}

/// Who ran which attempt of a job, and when: what a result says besides the outcome.
pub struct JobRun<'a> {
    pub job_id: &'a str,
    pub source_id: &'a str,
    pub attempt: u32,
    pub worker: &'a str,
    pub started_at: OffsetDateTime,
    pub finished_at: OffsetDateTime,
}

/// The result (§4) of one attempt: the worker's and `factoryd run`'s. `outcome`'s error carries
/// whether the retry budget is spent; its message is redacted with `redactor`.
pub fn job_result(
    run: JobRun<'_>,
    outcome: Result<&JobOutput, (&JobError, bool)>,
    redactor: &Redactor,
) -> JobResult {
    let JobRun {
        job_id,
        source_id,
        attempt,
        worker,
        started_at,
        finished_at,
    } = run;
    let (status, image, revision, error, timings) = match outcome {
        Ok(out) => (
            Status::Succeeded,
            Some(out.image.clone()),
            out.revision.clone(),
            None,
            out.timings,
        ),
        Err((e, exhausted)) => (
            if e.class == ErrorClass::Cancelled {
                Status::Cancelled
            } else {
                Status::Failed
            },
            None,
            None,
            Some(redacted_info(e, attempt, exhausted, redactor)),
            job::Timings::default(),
        ),
    };
    let mut timings = timings;
    timings.total = (finished_at - started_at).whole_milliseconds().max(0) as u64;
    JobResult {
        v: job::WIRE_VERSION,
        job_id: job_id.to_owned(),
        source_id: source_id.to_owned(),
        status,
        attempt,
        worker: worker.to_owned(),
        image,
        revision,
        error,
        timings_ms: timings,
        started_at,
        finished_at,
    }
}

fn redacted_info(e: &JobError, attempt: u32, exhausted: bool, redactor: &Redactor) -> ErrorInfo {
    let mut info = ErrorInfo::from_error(e, attempt, exhausted);
    info.message = redactor.redact(&info.message);
    info
}

/// Masks the job's secrets in every text an event carries.
pub struct RedactingSink {
    pub inner: Arc<dyn EventSink>,
    pub redactor: Arc<Redactor>,
}

impl EventSink for RedactingSink {
    fn emit(&self, event: JobEvent) {
        let event = match event {
            JobEvent::Log { lines } => {
                metrics().build_log_lines.inc_by(lines.len() as u64);
                JobEvent::Log {
                    lines: lines.iter().map(|l| self.redactor.redact(l)).collect(),
                }
            }
            JobEvent::Warning { code, message } => JobEvent::Warning {
                code,
                message: self.redactor.redact(&message),
            },
            other => other,
        };
        self.inner.emit(event);
    }
}

#[cfg(test)]
mod tests;
