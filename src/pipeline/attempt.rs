//! One attempt at a job, run the same way by `serve` (for each delivery) and by `run` (once):
//! a fresh workspace, the job's timeout, cancellation, a bound on how long a stopped job may
//! take to end, a panic that fails the attempt rather than the process, the stage the job was
//! in when it ended, and the result built from all that.
//!
//! ```text
//! workspace ─▶ run_job (own task) ─┬─ ends ───────────────────────────┐
//!                                  ├─ timeout  ─▶ stop ─▶ ≤ abort_after ─┼─▶ outcome (class from the stop reason) ─▶ result
//!                                  └─ stopped (cancel, shutdown, lease) ┘
//! ```

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use super::{run_job, JobOutput, Stages};
use crate::clock::Clock;
use crate::error::{ErrorClass, ErrorCode, JobError, Stage};
use crate::job::{self, ErrorInfo, Job, JobEvent, JobResult, Redactor, Status};
use crate::ports::{EventSink, StageContext};
use crate::telemetry::metrics;
use crate::workspace::Workspace;

/// Why a running attempt was stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// A cancel request (or Ctrl-C for `run`).
    Requested,
    Timeout,
    /// The worker is shutting down: the job goes back to the queue.
    Shutdown,
    /// Our lease lapsed and another worker took the job: stop quietly.
    LostClaim,
    /// The worker could not confirm its lease in time (cut off from the state store): it
    /// stops before another worker may take the job over, and hands the job back.
    LeaseUnconfirmed,
}

/// Stops a running attempt and remembers why; the first reason wins.
#[derive(Clone, Default)]
pub struct Stop {
    token: CancellationToken,
    reason: Arc<Mutex<Option<StopReason>>>,
}

impl Stop {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn stop(&self, reason: StopReason) {
        let mut slot = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        slot.get_or_insert(reason);
        self.token.cancel();
    }

    pub fn reason(&self) -> Option<StopReason> {
        *self.reason.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn token(&self) -> &CancellationToken {
        &self.token
    }
}

/// The attempt's events on their way out: every text masked with the attempt's secrets, and
/// the stage the pipeline last entered remembered, so that a timeout, an abort or a panic is
/// reported at the stage the job was in.
pub struct AttemptEvents {
    inner: Arc<dyn EventSink>,
    redactor: Arc<Redactor>,
    stage: Mutex<Stage>,
}

impl AttemptEvents {
    pub fn new(inner: Arc<dyn EventSink>, redactor: Arc<Redactor>) -> Self {
        AttemptEvents {
            inner,
            redactor,
            stage: Mutex::new(Stage::Resolve),
        }
    }

    /// The stage the job is in (the last one the pipeline announced).
    pub fn stage(&self) -> Stage {
        *self.stage.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl EventSink for AttemptEvents {
    fn emit(&self, event: JobEvent) {
        let event = match event {
            JobEvent::Stage { stage } => {
                *self.stage.lock().unwrap_or_else(|e| e.into_inner()) = stage;
                JobEvent::Stage { stage }
            }
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

/// One attempt at one job: the job, its number, how to stop it, its masking set and events.
pub struct Attempt {
    pub job: Job,
    /// 1-based (the queue's delivery count; 1 for `run`).
    pub number: u32,
    pub stop: Stop,
    /// One masking set for the whole attempt: its stages add the credentials they learn, and
    /// its events and its result are masked with all of them.
    pub redactor: Arc<Redactor>,
    pub events: Arc<AttemptEvents>,
}

impl Attempt {
    /// Attempt `number` at `job`, its events going to `sink` once masked.
    pub fn new(job: Job, number: u32, sink: Arc<dyn EventSink>) -> Self {
        let redactor = Arc::new(Redactor::for_job(&job));
        let events = Arc::new(AttemptEvents::new(sink, Arc::clone(&redactor)));
        Attempt {
            job,
            number,
            stop: Stop::new(),
            redactor,
            events,
        }
    }

    pub fn emit(&self, event: JobEvent) {
        self.events.emit(event);
    }
}

/// What the runner needs besides the stages.
#[derive(Debug, Clone)]
pub struct RunnerSettings {
    /// The worker's name, in events and results.
    pub worker: String,
    pub work_root: PathBuf,
    pub default_job_timeout: Duration,
    pub max_job_timeout: Duration,
    /// How long a stopped attempt may take to end before its task is aborted.
    pub abort_after: Duration,
}

/// The default of [`RunnerSettings::abort_after`].
pub const ABORT_AFTER: Duration = Duration::from_secs(60);

/// How an attempt ended.
pub struct Ran {
    pub outcome: Result<JobOutput, JobError>,
    pub started_at: OffsetDateTime,
    pub finished_at: OffsetDateTime,
    /// Why it was stopped, if it was.
    pub stopped: Option<StopReason>,
}

/// Runs attempts on one set of stages.
pub struct AttemptRunner {
    stages: Stages,
    settings: RunnerSettings,
    clock: Arc<dyn Clock>,
}

impl AttemptRunner {
    pub fn new(stages: Stages, settings: RunnerSettings, clock: Arc<dyn Clock>) -> Self {
        AttemptRunner {
            stages,
            settings,
            clock,
        }
    }

    pub fn worker(&self) -> &str {
        &self.settings.worker
    }

    pub fn clock(&self) -> &dyn Clock {
        self.clock.as_ref()
    }

    /// The job's timeout: its own, or the default, at most the maximum.
    pub fn timeout(&self, job: &Job) -> Duration {
        job.timeout_secs
            .map(Duration::from_secs)
            .unwrap_or(self.settings.default_job_timeout)
            .min(self.settings.max_job_timeout)
    }

    /// Runs the pipeline for `attempt` in its own task (a panic fails the attempt, not the
    /// worker), in a fresh workspace that is removed afterwards, under the job's timeout. Once
    /// the attempt is stopped (its timeout, or `attempt.stop` from outside) its stages get
    /// `abort_after` to end their work before the task is aborted.
    pub async fn run(&self, attempt: &Attempt) -> Ran {
        attempt.emit(JobEvent::Started {
            kind: attempt.job.kind(),
            worker: self.settings.worker.clone(),
        });
        let started_at = self.clock.now();
        let outcome = self.run_in_workspace(attempt).await;
        Ran {
            outcome,
            started_at,
            finished_at: self.clock.now(),
            stopped: attempt.stop.reason(),
        }
    }

    async fn run_in_workspace(&self, attempt: &Attempt) -> Result<JobOutput, JobError> {
        // Removed when dropped, at the end of this function, whatever the outcome.
        let workspace = Workspace::create(&self.settings.work_root, &attempt.job.id)?;
        let cx = StageContext {
            job_id: attempt.job.id.clone(),
            attempt: attempt.number,
            cancel: attempt.stop.token().clone(),
            events: Arc::clone(&attempt.events) as Arc<dyn EventSink>,
            redactor: Arc::clone(&attempt.redactor),
            workspace: workspace.path().to_owned(),
        };
        let timeout = self.timeout(&attempt.job);
        let stages = self.stages.clone();
        let job = attempt.job.clone();
        let mut task = tokio::spawn(async move { run_job(&job, &stages, &cx).await });

        let stop = &attempt.stop;
        let joined = tokio::select! {
            joined = &mut task => Some(joined),
            _ = tokio::time::sleep(timeout) => {
                stop.stop(StopReason::Timeout);
                None
            }
            _ = stop.token().cancelled() => None,
        };
        let joined = match joined {
            Some(joined) => joined,
            // Stages stop their work on the token; give them a bounded time to do so.
            None => match tokio::time::timeout(self.settings.abort_after, &mut task).await {
                Ok(joined) => joined,
                Err(_) => {
                    task.abort();
                    tracing::error!(
                        stage = %attempt.events.stage(),
                        abort_after_secs = self.settings.abort_after.as_secs(),
                        "The job's stages did not stop when told to; aborted them."
                    );
                    task.await
                }
            },
        };
        drop(workspace);

        let stage = attempt.events.stage();
        let result = match joined {
            Ok(result) => result,
            Err(e) if e.is_panic() => Err(JobError::transient(
                stage,
                ErrorCode::Internal,
                "internal error: the job's task panicked",
            )),
            Err(_) => Err(JobError::cancelled(stage)),
        };
        match (result, stop.reason()) {
            (Ok(output), _) => Ok(output),
            (Err(e), None) => Err(e),
            // The attempt was stopped: whatever the stage reported, the reason decides the class.
            (Err(e), Some(StopReason::Requested)) => Err(JobError::cancelled(e.stage)),
            (
                Err(e),
                Some(StopReason::Shutdown | StopReason::LostClaim | StopReason::LeaseUnconfirmed),
            ) => Err(JobError::shutdown(e.stage)),
            (Err(e), Some(StopReason::Timeout)) => Err(JobError::permanent(
                e.stage,
                ErrorCode::Timeout,
                format!("job timed out after {} s", timeout.as_secs()),
            )),
        }
    }

    /// The result of an attempt that ran; `exhausted`: a transient failure given up because
    /// the retry budget is spent.
    pub fn result(&self, attempt: &Attempt, ran: &Ran, exhausted: bool) -> JobResult {
        job_result(
            JobRun {
                job_id: &attempt.job.id,
                source_id: &attempt.job.source_id,
                attempt: attempt.number,
                worker: &self.settings.worker,
                started_at: ran.started_at,
                finished_at: ran.finished_at,
            },
            ran.outcome.as_ref().map_err(|e| (e, exhausted)),
            &attempt.redactor,
        )
    }

    /// The result of a delivery that ended without running (an invalid message, a job
    /// cancelled before it started, one given up as poison), timed now.
    pub fn result_without_run(
        &self,
        job_id: &str,
        source_id: &str,
        attempt: u32,
        err: &JobError,
        redactor: &Redactor,
    ) -> JobResult {
        let now = self.clock.now();
        job_result(
            JobRun {
                job_id,
                source_id,
                attempt,
                worker: &self.settings.worker,
                started_at: now,
                finished_at: now,
            },
            Err((err, false)),
            redactor,
        )
    }
}

/// Who ran which attempt of a job, and when: what a result says besides the outcome.
struct JobRun<'a> {
    job_id: &'a str,
    source_id: &'a str,
    attempt: u32,
    worker: &'a str,
    started_at: OffsetDateTime,
    finished_at: OffsetDateTime,
}

/// The result (§4) of one attempt. `outcome`'s error carries whether the retry budget is
/// spent; its message is redacted with `redactor`.
fn job_result(
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
    let (status, image, revision, error, mut timings) = match outcome {
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

/// The error as a result or event carries it, its message masked.
pub fn redacted_info(
    e: &JobError,
    attempt: u32,
    exhausted: bool,
    redactor: &Redactor,
) -> ErrorInfo {
    let mut info = ErrorInfo::from_error(e, attempt, exhausted);
    info.message = redactor.redact(&info.message);
    info
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::TokioClock;
    use crate::testing::{Behaviour, MemEvents, ScriptedStages};

    struct Rig {
        runner: AttemptRunner,
        stages: ScriptedStages,
        events: MemEvents,
        work_root: tempfile::TempDir,
    }

    fn rig() -> Rig {
        let work_root = tempfile::tempdir().unwrap();
        let stages = ScriptedStages::new();
        let settings = RunnerSettings {
            worker: "node-a".into(),
            work_root: work_root.path().to_owned(),
            default_job_timeout: Duration::from_secs(600),
            max_job_timeout: Duration::from_secs(3600),
            abort_after: ABORT_AFTER,
        };
        let runner = AttemptRunner::new(
            stages.stages(work_root.path().join("store")),
            settings,
            Arc::new(TokioClock::new()),
        );
        Rig {
            runner,
            stages,
            events: MemEvents::new(),
            work_root,
        }
    }

    impl Rig {
        fn attempt(&self, id: &str, timeout_secs: u64, script: Behaviour) -> Attempt {
            self.stages.script(id, vec![script]);
            let job = job::decode(
                serde_json::json!({
                    "v": 1, "id": id, "source_id": "src", "timeout_secs": timeout_secs,
                    "origin": {"type": "docker-hub", "details": {"target": "busybox:1"}}
                })
                .to_string()
                .as_bytes(),
            )
            .unwrap();
            let sink = crate::ports::EventBus::sink(&self.events, id, 1);
            Attempt::new(job, 1, sink)
        }

        fn workspaces_left(&self) -> usize {
            std::fs::read_dir(self.work_root.path())
                .unwrap()
                .filter(|e| e.as_ref().unwrap().file_name() != "store")
                .count()
        }
    }

    fn error(ran: &Ran) -> (ErrorClass, ErrorCode, Stage) {
        let e = ran.outcome.as_ref().expect_err("failed");
        (e.class, e.code, e.stage)
    }

    #[tokio::test(start_paused = true)]
    async fn a_timeout_is_reported_at_the_stage_the_job_was_in() {
        let r = rig();
        let attempt = r.attempt("slow", 10, Behaviour::Sleep(Duration::from_secs(7200)));
        let ran = r.runner.run(&attempt).await;
        assert_eq!(
            error(&ran),
            (ErrorClass::Permanent, ErrorCode::Timeout, Stage::Import)
        );
        assert_eq!(ran.stopped, Some(StopReason::Timeout));
        assert_eq!((ran.finished_at - ran.started_at).whole_seconds(), 10);
        let result = r.runner.result(&attempt, &ran, false);
        assert_eq!(result.status, Status::Failed);
        assert_eq!(result.error.unwrap().message, "job timed out after 10 s");
        assert_eq!(r.workspaces_left(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stage_that_ignores_its_timeout_is_aborted_after_the_bound() {
        let r = rig();
        let attempt = r.attempt("hangs", 10, Behaviour::Hang);
        let ran = r.runner.run(&attempt).await;
        assert_eq!(
            error(&ran),
            (ErrorClass::Permanent, ErrorCode::Timeout, Stage::Import)
        );
        assert_eq!((ran.finished_at - ran.started_at).whole_seconds(), 70);
        assert_eq!(r.workspaces_left(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancel_of_a_stage_that_ignores_it_is_bounded_too() {
        let r = rig();
        let attempt = r.attempt("hangs", 3600, Behaviour::Hang);
        let stop = attempt.stop.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(5)).await;
            stop.stop(StopReason::Requested);
        });
        let ran = r.runner.run(&attempt).await;
        assert_eq!(
            error(&ran),
            (ErrorClass::Cancelled, ErrorCode::Cancelled, Stage::Import)
        );
        assert_eq!((ran.finished_at - ran.started_at).whole_seconds(), 65);
        assert_eq!(
            r.runner.result(&attempt, &ran, false).status,
            Status::Cancelled
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_panic_fails_the_attempt_at_its_stage_not_the_process() {
        let r = rig();
        let attempt = r.attempt("panics", 60, Behaviour::Panic);
        let ran = r.runner.run(&attempt).await;
        assert_eq!(
            error(&ran),
            (ErrorClass::Transient, ErrorCode::Internal, Stage::Import)
        );
        assert_eq!(r.workspaces_left(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_shutdown_hands_the_job_back_whatever_the_stage_said() {
        let r = rig();
        let attempt = r.attempt("waits", 3600, Behaviour::WaitForCancel);
        let stop = attempt.stop.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            stop.stop(StopReason::Shutdown);
            // A later reason does not replace the first.
            stop.stop(StopReason::Requested);
        });
        let ran = r.runner.run(&attempt).await;
        let e = ran.outcome.as_ref().unwrap_err();
        assert!(e.is_shutdown(), "{e:?}");
        assert_eq!(ran.stopped, Some(StopReason::Shutdown));
    }

    #[tokio::test(start_paused = true)]
    async fn events_are_masked_and_the_stage_is_followed() {
        let r = rig();
        let attempt = r.attempt("ok", 60, Behaviour::Succeed);
        attempt
            .redactor
            .add(&crate::secret::Secret::new("hunter2-secret"), None);
        attempt.emit(JobEvent::Stage {
            stage: Stage::Fetch,
        });
        attempt.emit(JobEvent::Log {
            lines: vec!["password hunter2-secret".into()],
        });
        assert_eq!(attempt.events.stage(), Stage::Fetch);
        let ran = r.runner.run(&attempt).await;
        assert!(ran.outcome.is_ok());
        assert_eq!(attempt.events.stage(), Stage::Import);
        let shown = serde_json::to_string(&r.events.for_job("ok")).unwrap();
        assert!(shown.contains("password ***"), "{shown}");
        assert!(!shown.contains("hunter2-secret"), "{shown}");
    }
}
