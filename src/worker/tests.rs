//! Pipeline tier: the worker loop over in-memory fakes, with paused time.

use std::time::Duration;

use serde_json::json;
use tokio::task::JoinHandle;

use super::claim::{mark_cancelled, ClaimOutcome};
use super::*;
use crate::clock::TokioClock;
use crate::error::{ErrorClass, ErrorCode, JobError, Stage};
use crate::job::{self, JobEvent, Status};
use crate::ports::{Settle, StageContext};
use crate::readiness::HoldCause;
use crate::testing::{
    Behaviour, MemCancels, MemEvents, MemQueue, MemResults, MemStates, ScriptedStages, Settled,
};

const ACK_WAIT: Duration = Duration::from_secs(60);

struct Rig {
    queue: MemQueue,
    states: MemStates,
    results: MemResults,
    events: MemEvents,
    cancels: MemCancels,
    stages: ScriptedStages,
    shutdown: CancellationToken,
    handle: Option<JoinHandle<()>>,
    worker: Arc<Worker>,
    work_root: tempfile::TempDir,
}

fn settings(work_root: &std::path::Path) -> WorkerSettings {
    WorkerSettings {
        name: "node-a".into(),
        build_slots: 1,
        import_slots: 4,
        work_root: work_root.to_owned(),
        grace_period: Duration::from_secs(10),
        default_job_timeout: Duration::from_secs(3600),
        max_job_timeout: Duration::from_secs(7200),
        retry: JobRetryPolicy::default(),
        heartbeat: ACK_WAIT / 3,
        lease: ACK_WAIT,
        pull_wait: Duration::from_secs(30),
        max_lost_attempts: 2,
    }
}

fn rig_with(tweak: impl FnOnce(&mut WorkerSettings)) -> Rig {
    let work_root = tempfile::tempdir().unwrap();
    let mut s = settings(work_root.path());
    tweak(&mut s);
    let queue = MemQueue::new(ACK_WAIT, 5);
    let states = MemStates::new();
    let results = MemResults::new();
    let events = MemEvents::new();
    let cancels = MemCancels::new();
    let stages = ScriptedStages::new();
    let ports = QueuePorts {
        queue: Arc::new(queue.clone()),
        states: Arc::new(states.clone()),
        results: Arc::new(results.clone()),
        events: Arc::new(events.clone()),
        cancels: Arc::new(cancels.clone()),
    };
    let worker = new_worker(s, ports, stages.stages(work_root.path().join("store")));
    let shutdown = CancellationToken::new();
    let handle = tokio::spawn(Arc::clone(&worker).run(shutdown.clone()));
    Rig {
        queue,
        states,
        results,
        events,
        cancels,
        stages,
        shutdown,
        handle: Some(handle),
        worker,
        work_root,
    }
}

/// A worker whose wall clock moves with tokio's paused time.
fn new_worker(settings: WorkerSettings, ports: QueuePorts, stages: Stages) -> Arc<Worker> {
    let readiness = Arc::new(Readiness::new(settings.work_root.clone()));
    Worker::new(
        settings,
        ports,
        stages,
        readiness,
        Arc::new(TokioClock::new()),
    )
}

fn rig() -> Rig {
    rig_with(|_| {})
}

fn import_job(id: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "v": 1, "id": id, "source_id": "src",
        "origin": {"type": "docker-hub", "details": {"target": "busybox:1"}}
    }))
    .unwrap()
}

impl Rig {
    fn publish(&self, id: &str) {
        assert!(self.queue.publish(Kind::Import, id, import_job(id)));
    }

    async fn stop(&mut self) {
        self.shutdown.cancel();
        if let Some(h) = self.handle.take() {
            h.await.unwrap();
        }
    }

    fn settles(&self, id: &str) -> Vec<Settle> {
        self.queue
            .settled()
            .into_iter()
            .filter(|s: &Settled| s.job_id == id)
            .map(|s| s.settle)
            .collect()
    }

    fn workspaces_left(&self) -> usize {
        std::fs::read_dir(self.work_root.path())
            .unwrap()
            .filter(|e| e.as_ref().unwrap().file_name() != "store")
            .count()
    }
}

#[tokio::test(start_paused = true)]
async fn success_publishes_a_result_then_acks() {
    let mut r = rig();
    r.publish("j1");
    let results = r.results.wait_for(1).await;
    assert_eq!(results[0].status, Status::Succeeded);
    assert_eq!(results[0].attempt, 1);
    assert_eq!(results[0].worker, "node-a");
    assert!(results[0].image.is_some());
    r.stop().await;
    assert_eq!(r.settles("j1"), [Settle::Ack]);
    assert_eq!(r.queue.pending(), 0);
    assert_eq!(r.states.record("j1").unwrap()["state"], "succeeded");
    assert_eq!(r.workspaces_left(), 0);
}

#[tokio::test(start_paused = true)]
async fn transient_failure_is_retried_after_a_delay_then_succeeds() {
    let mut r = rig();
    r.stages
        .script("j1", vec![Behaviour::Transient, Behaviour::Succeed]);
    r.publish("j1");
    let results = r.results.wait_for(1).await;
    r.stop().await;
    assert_eq!(results.len(), 1, "no result for the failed attempt");
    assert_eq!(results[0].status, Status::Succeeded);
    assert_eq!(results[0].attempt, 2);
    let settles = r.settles("j1");
    assert_eq!(settles.len(), 2);
    let Settle::Nak { delay } = settles[0] else {
        panic!("{settles:?}")
    };
    assert!(delay >= Duration::from_secs(30) && delay <= Duration::from_secs(33));
    assert_eq!(settles[1], Settle::Ack);
    assert!(r
        .events
        .for_job("j1")
        .iter()
        .any(|e| matches!(e, JobEvent::Retrying { .. })));
}

#[tokio::test(start_paused = true)]
async fn permanent_failure_publishes_failed_and_terms() {
    let mut r = rig();
    r.stages.script("j1", vec![Behaviour::Permanent]);
    r.publish("j1");
    let results = r.results.wait_for(1).await;
    r.stop().await;
    assert_eq!(results[0].status, Status::Failed);
    let error = results[0].error.as_ref().unwrap();
    assert_eq!(error.class, ErrorClass::Permanent);
    assert_eq!(error.stage, Stage::Import);
    assert_eq!(r.settles("j1"), [Settle::Term]);
    assert_eq!(r.stages.runs("j1"), 1);
}

#[tokio::test(start_paused = true)]
async fn transient_failures_until_the_budget_is_spent_end_failed_never_silently() {
    let mut r = rig();
    r.stages.script("j1", vec![Behaviour::Transient]);
    r.publish("j1");
    let results = r.results.wait_for(1).await;
    r.stop().await;
    assert_eq!(results.len(), 1);
    assert_eq!(results[0].status, Status::Failed);
    assert_eq!(results[0].attempt, 4);
    let error = results[0].error.as_ref().unwrap();
    assert!(
        error
            .message
            .starts_with("retries exhausted after 4 attempts"),
        "{}",
        error.message
    );
    let settles = r.settles("j1");
    assert_eq!(settles.len(), 4);
    assert!(matches!(settles[0], Settle::Nak { .. }));
    assert_eq!(settles[3], Settle::Term);
    assert_eq!(r.stages.runs("j1"), 4, "budget (4) below max_deliver (5)");
}

#[tokio::test(start_paused = true)]
async fn cancel_during_the_job_stops_the_stage_and_publishes_cancelled() {
    let mut r = rig();
    r.stages.script("j1", vec![Behaviour::WaitForCancel]);
    r.publish("j1");
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(r.stages.runs("j1"), 1, "the job is running");
    r.cancels.cancel("j1").await;
    let results = r.results.wait_for(1).await;
    r.stop().await;
    assert_eq!(results[0].status, Status::Cancelled);
    assert_eq!(r.settles("j1"), [Settle::Term]);
}

#[tokio::test(start_paused = true)]
async fn cancel_mark_set_during_the_job_is_seen_at_the_next_heartbeat() {
    let mut r = rig();
    r.stages.script("j1", vec![Behaviour::WaitForCancel]);
    r.publish("j1");
    tokio::time::sleep(Duration::from_secs(1)).await;
    // No core message: only the mark in the state store (a missed cancel message).
    assert!(mark_cancelled(&r.states, "j1").await.unwrap());
    let results = r.results.wait_for(1).await;
    r.stop().await;
    assert_eq!(results[0].status, Status::Cancelled);
}

#[tokio::test(start_paused = true)]
async fn cancel_before_start_wins_without_running_the_job() {
    let mut r = rig();
    assert!(mark_cancelled(&r.states, "j1").await.unwrap());
    r.publish("j1");
    let results = r.results.wait_for(1).await;
    r.stop().await;
    assert_eq!(results[0].status, Status::Cancelled);
    assert_eq!(r.stages.runs("j1"), 0);
    assert_eq!(r.settles("j1"), [Settle::Term]);
}

#[tokio::test(start_paused = true)]
async fn a_job_published_again_after_it_ended_is_answered_from_its_record() {
    let mut r = rig();
    r.publish("j1");
    let first = r.results.wait_for(1).await;
    r.publish("j1");
    let both = r.results.wait_for(2).await;
    r.stop().await;
    assert_eq!(r.stages.runs("j1"), 1, "executed once");
    assert_eq!(both[1], first[0], "the same result, re-published");
    assert_eq!(r.worker.stats().duplicates, 1);
}

#[tokio::test(start_paused = true)]
async fn a_job_published_twice_while_queued_is_deduplicated() {
    let mut r = rig_with(|s| s.import_slots = 1);
    r.stages
        .script("j0", vec![Behaviour::Sleep(Duration::from_secs(10))]);
    r.publish("j0");
    r.publish("j1");
    assert!(!r.queue.publish(Kind::Import, "j1", import_job("j1")));
    r.results.wait_for(2).await;
    r.stop().await;
    assert_eq!(r.results.for_job("j1").len(), 1);
}

#[tokio::test(start_paused = true)]
async fn job_timeout_cancels_the_stage_and_fails_permanently() {
    let mut r = rig();
    r.stages.script("t1", vec![Behaviour::WaitForCancel]);
    let job = json!({"v": 1, "id": "t1", "source_id": "s", "timeout_secs": 5,
        "origin": {"type": "docker-hub", "details": {"target": "busybox"}}});
    r.queue
        .publish(Kind::Import, "t1", serde_json::to_vec(&job).unwrap());
    let results = r.results.wait_for(1).await;
    r.stop().await;
    let error = results[0].error.as_ref().unwrap();
    assert_eq!(error.code, ErrorCode::Timeout);
    assert_eq!(error.class, ErrorClass::Permanent);
    assert_eq!(r.settles("t1"), [Settle::Term]);
}

#[tokio::test(start_paused = true)]
async fn shutdown_after_the_grace_period_hands_the_job_back_without_a_result() {
    let mut r = rig_with(|s| s.grace_period = Duration::from_secs(2));
    r.stages.script("j1", vec![Behaviour::WaitForCancel]);
    r.publish("j1");
    tokio::time::sleep(Duration::from_secs(1)).await;
    r.stop().await;
    assert!(r.results.all().is_empty());
    assert_eq!(
        r.settles("j1"),
        [Settle::Nak {
            delay: Duration::ZERO
        }]
    );
    assert_eq!(r.states.record("j1").unwrap()["state"], "pending");
    assert_eq!(r.workspaces_left(), 0, "workspace removed on shutdown too");
}

#[tokio::test(start_paused = true)]
async fn shutdown_lets_a_job_finish_within_the_grace_period() {
    let mut r = rig_with(|s| s.grace_period = Duration::from_secs(30));
    r.stages
        .script("j1", vec![Behaviour::Sleep(Duration::from_secs(5))]);
    r.publish("j1");
    tokio::time::sleep(Duration::from_secs(1)).await;
    r.stop().await;
    assert_eq!(r.results.for_job("j1")[0].status, Status::Succeeded);
    assert_eq!(r.settles("j1"), [Settle::Ack]);
}

#[tokio::test(start_paused = true)]
async fn a_panicking_stage_fails_the_attempt_not_the_worker() {
    let mut r = rig();
    r.stages
        .script("j1", vec![Behaviour::Panic, Behaviour::Succeed]);
    r.publish("j1");
    let results = r.results.wait_for(1).await;
    r.stop().await;
    assert_eq!(results[0].status, Status::Succeeded);
    assert_eq!(results[0].attempt, 2);
    // The failed attempt is reported at the stage it panicked in.
    let retrying: Vec<_> = r
        .events
        .for_job("j1")
        .into_iter()
        .filter_map(|e| match e {
            JobEvent::Retrying { error, .. } => Some((error.stage, error.code)),
            _ => None,
        })
        .collect();
    assert_eq!(retrying, [(Stage::Import, ErrorCode::Internal)]);
}

/// A stage that ignores its timeout is aborted a bounded time later; the job fails at the
/// stage it was in, and the slot is free for the next job.
#[tokio::test(start_paused = true)]
async fn a_stage_that_ignores_the_timeout_is_aborted_and_reported_at_its_stage() {
    let mut r = rig_with(|s| {
        s.import_slots = 1;
        s.build_slots = 0;
    });
    r.stages.script("hangs", vec![Behaviour::Hang]);
    let job = json!({"v": 1, "id": "hangs", "source_id": "s", "timeout_secs": 5,
        "origin": {"type": "docker-hub", "details": {"target": "busybox"}}});
    r.queue
        .publish(Kind::Import, "hangs", serde_json::to_vec(&job).unwrap());
    r.publish("next");
    let results = r.results.wait_for(2).await;
    r.stop().await;
    let hung = r.results.for_job("hangs");
    let error = hung[0].error.as_ref().unwrap();
    assert_eq!(
        (error.class, error.code, error.stage),
        (ErrorClass::Permanent, ErrorCode::Timeout, Stage::Import)
    );
    assert_eq!(
        hung[0].timings_ms.total, 65_000,
        "timeout + the abort bound"
    );
    assert_eq!(r.settles("hangs"), [Settle::Term]);
    assert!(results
        .iter()
        .any(|x| x.job_id == "next" && x.status == Status::Succeeded));
    assert_eq!(r.workspaces_left(), 0);
}

#[tokio::test(start_paused = true)]
async fn an_invalid_message_fails_on_its_subject_id_and_is_termed() {
    let mut r = rig();
    r.queue.publish(Kind::Import, "bad-1", &b"{\"v\": 1}"[..]);
    let results = r.results.wait_for(1).await;
    r.stop().await;
    assert_eq!(results[0].job_id, "bad-1");
    assert_eq!(results[0].status, Status::Failed);
    assert_eq!(
        results[0].error.as_ref().unwrap().code,
        ErrorCode::InvalidJob
    );
    assert_eq!(r.settles("bad-1"), [Settle::Term]);
}

#[tokio::test(start_paused = true)]
async fn a_result_that_cannot_be_published_is_published_on_redelivery_without_rerunning() {
    let mut r = rig();
    r.results
        .failing
        .store(true, std::sync::atomic::Ordering::SeqCst);
    r.publish("j1");
    // Longer than the worker tries again (a lease): the message is left for redelivery.
    tokio::time::sleep(ACK_WAIT + Duration::from_secs(5)).await;
    assert_eq!(r.stages.runs("j1"), 1);
    assert!(
        r.settles("j1").is_empty(),
        "not settled before the result is out"
    );
    r.results
        .failing
        .store(false, std::sync::atomic::Ordering::SeqCst);
    let results = r.results.wait_for(1).await;
    r.stop().await;
    assert_eq!(results[0].status, Status::Succeeded);
    assert_eq!(r.stages.runs("j1"), 1, "answered from the stored record");
    assert_eq!(r.settles("j1"), [Settle::Ack]);
}

#[tokio::test(start_paused = true)]
async fn slots_bound_the_jobs_running_at_once() {
    let mut r = rig_with(|s| s.import_slots = 2);
    for i in 0..5 {
        r.stages.script(
            &format!("j{i}"),
            vec![Behaviour::Sleep(Duration::from_secs(10))],
        );
        r.publish(&format!("j{i}"));
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    let started: u32 = (0..5).map(|i| r.stages.runs(&format!("j{i}"))).sum();
    assert_eq!(started, 2);
    r.results.wait_for(5).await;
    r.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_delivery_of_a_job_running_elsewhere_is_put_back() {
    let mut r = rig();
    // Another worker holds a live lease on j1.
    let other = Claims {
        states: &r.states,
        worker: "node-b",
        lease: ACK_WAIT,
        now_ms: r.worker.clock.now_ms(),
        attempt: 1,
        lost_attempts: 0,
    };
    assert!(matches!(
        other.claim("j1").await.unwrap(),
        ClaimOutcome::Claimed { .. }
    ));
    r.publish("j1");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let settles = r.settles("j1");
    assert!(
        matches!(settles.as_slice(), [Settle::Nak { delay }] if *delay > Duration::from_secs(50)),
        "{settles:?}"
    );
    assert_eq!(r.stages.runs("j1"), 0);
    // Once node-b's lease lapses, this worker takes the job over.
    let results = r.results.wait_for(1).await;
    r.stop().await;
    assert_eq!(results[0].worker, "node-a");
    assert_eq!(r.stages.runs("j1"), 1);
}

/// A queue whose pulls never come back (a wedged client).
struct StuckQueue;

#[async_trait::async_trait]
impl crate::ports::JobQueue for StuckQueue {
    async fn pull(
        &self,
        _: Kind,
        _: Duration,
    ) -> Result<Option<crate::ports::Delivery>, crate::ports::QueueError> {
        std::future::pending().await
    }
}

#[tokio::test(start_paused = true)]
async fn a_pull_loop_that_stops_going_round_is_not_alive() {
    let work_root = tempfile::tempdir().unwrap();
    let ports = QueuePorts {
        queue: Arc::new(StuckQueue),
        states: Arc::new(MemStates::new()),
        results: Arc::new(MemResults::new()),
        events: Arc::new(MemEvents::new()),
        cancels: Arc::new(MemCancels::new()),
    };
    let stages = ScriptedStages::new().stages(work_root.path().join("store"));
    let worker = new_worker(settings(work_root.path()), ports, stages);
    let stop = CancellationToken::new();
    let handle = tokio::spawn(Arc::clone(&worker).run(stop.clone()));
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(worker.readiness().alive());
    tokio::time::sleep(Duration::from_secs(61)).await;
    assert!(
        !worker.readiness().alive(),
        "stuck for longer than pull_wait + 30 s"
    );
    stop.cancel();
    handle.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_worker_whose_slots_are_all_busy_stays_alive() {
    let mut r = rig_with(|s| {
        s.import_slots = 1;
        s.build_slots = 0;
    });
    r.stages
        .script("long", vec![Behaviour::Sleep(Duration::from_secs(600))]);
    r.publish("long");
    tokio::time::sleep(Duration::from_secs(300)).await;
    assert_eq!(r.stages.runs("long"), 1);
    assert!(
        r.worker.readiness().alive(),
        "waiting for a job to finish is not being stuck"
    );
    r.results.wait_for(1).await;
    r.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_held_kind_takes_no_jobs_until_the_hold_clears_and_its_loop_stays_alive() {
    let mut r = rig();
    r.worker.readiness().hold(
        Kind::Import,
        HoldCause::BuilderUnreachable,
        Some("build backend unreachable: test".into()),
    );
    r.publish("waits");
    tokio::time::sleep(Duration::from_secs(300)).await;
    assert_eq!(r.stages.runs("waits"), 0, "taken while held");
    assert!(r.settles("waits").is_empty(), "delivered while held");
    assert!(
        r.worker.readiness().alive(),
        "a held loop is not a stuck loop"
    );

    r.worker
        .readiness()
        .hold(Kind::Import, HoldCause::BuilderUnreachable, None);
    r.results.wait_for(1).await;
    r.stop().await;
    assert_eq!(r.stages.runs("waits"), 1);
    assert_eq!(r.settles("waits"), [Settle::Ack]);
}

#[tokio::test(start_paused = true)]
async fn a_hold_lets_running_jobs_finish() {
    let mut r = rig();
    r.stages
        .script("running", vec![Behaviour::Sleep(Duration::from_secs(60))]);
    r.publish("running");
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(r.stages.runs("running"), 1);
    r.worker
        .readiness()
        .hold(Kind::Import, HoldCause::LowDisk, Some("low on disk".into()));
    r.publish("queued");
    let results = r.results.wait_for(1).await;
    assert_eq!(results[0].job_id, "running");
    assert_eq!(results[0].status, Status::Succeeded);
    tokio::time::sleep(Duration::from_secs(120)).await;
    r.stop().await;
    assert_eq!(r.settles("running"), [Settle::Ack]);
    assert_eq!(r.stages.runs("queued"), 0);
    assert_eq!(r.queue.pending(), 1, "the held job waits in the queue");
}

#[tokio::test(start_paused = true)]
async fn a_kind_held_for_two_causes_waits_until_both_clear() {
    let mut r = rig();
    r.worker.readiness().hold(
        Kind::Import,
        HoldCause::BuilderUnreachable,
        Some("one".into()),
    );
    r.worker
        .readiness()
        .hold(Kind::Import, HoldCause::LowDisk, Some("two".into()));
    r.publish("waits");
    r.worker
        .readiness()
        .hold(Kind::Import, HoldCause::BuilderUnreachable, None);
    tokio::time::sleep(Duration::from_secs(120)).await;
    assert_eq!(r.stages.runs("waits"), 0, "one cause still holds");
    r.worker
        .readiness()
        .hold(Kind::Import, HoldCause::LowDisk, None);
    r.results.wait_for(1).await;
    r.stop().await;
    assert_eq!(r.stages.runs("waits"), 1);
}

/// An importer that learns a credential mid-job (as a webhook or token service hands one over),
/// adds it to the job's masking set, then warns and fails with text that echoes it.
struct EchoingImporter;

const LEARNED: &str = "learned-token-5d2e";

#[async_trait::async_trait]
impl crate::ports::Importer for EchoingImporter {
    async fn import(
        &self,
        _: crate::ports::ImportRequest<'_>,
        cx: &StageContext,
    ) -> Result<job::ImageInfo, JobError> {
        cx.redactor
            .add(&crate::secret::Secret::new(LEARNED), Some("hook-user"));
        cx.emit(JobEvent::Warning {
            code: "echo".into(),
            message: format!("registry said {LEARNED}"),
        });
        Err(JobError::permanent(
            Stage::Import,
            ErrorCode::AuthFailed,
            format!("registry echoed {LEARNED}"),
        ))
    }
}

#[tokio::test(start_paused = true)]
async fn a_credential_a_stage_learns_is_masked_in_the_result_and_events() {
    let work_root = tempfile::tempdir().unwrap();
    let queue = MemQueue::new(ACK_WAIT, 5);
    let results = MemResults::new();
    let events = MemEvents::new();
    let ports = QueuePorts {
        queue: Arc::new(queue.clone()),
        states: Arc::new(MemStates::new()),
        results: Arc::new(results.clone()),
        events: Arc::new(events.clone()),
        cancels: Arc::new(MemCancels::new()),
    };
    let mut stages = ScriptedStages::new().stages(work_root.path().join("store"));
    stages.importer = Arc::new(EchoingImporter);
    let worker = new_worker(settings(work_root.path()), ports, stages);
    let shutdown = CancellationToken::new();
    let handle = tokio::spawn(Arc::clone(&worker).run(shutdown.clone()));
    assert!(queue.publish(Kind::Import, "j1", import_job("j1")));

    let results = results.wait_for(1).await;
    shutdown.cancel();
    handle.await.unwrap();
    let message = &results[0].error.as_ref().unwrap().message;
    assert_eq!(message, "registry echoed ***");
    let events = serde_json::to_string(&events.for_job("j1")).unwrap();
    assert!(events.contains("registry said ***"), "{events}");
    assert!(!events.contains(LEARNED), "{events}");
}

/// Workers `names` each claim `job_id` in turn and vanish (their leases lapse): each one's
/// attempt is lost, counted by the claim that takes over from it (the worker under test takes
/// over from the last, once its lease, live when this returns, lapses).
async fn lose_attempts(r: &Rig, job_id: &str, names: &[&str]) {
    let start = r.worker.clock.now_ms();
    for (i, name) in names.iter().enumerate() {
        let claims = Claims {
            states: &r.states,
            worker: name,
            lease: ACK_WAIT,
            now_ms: start + i as u64 * (ACK_WAIT.as_millis() as u64 + 1_000),
            attempt: i as u32 + 1,
            lost_attempts: 0,
        };
        assert!(matches!(
            claims.claim(job_id).await.unwrap(),
            ClaimOutcome::Claimed { lost_attempts, .. } if lost_attempts == i as u32
        ));
    }
}

/// Issue 14: a job whose attempts keep ending with their worker gone is not run again: it
/// fails as permanent `poison`, is copied to the dead-letter stream, and its message termed.
#[tokio::test(start_paused = true)]
async fn a_job_whose_workers_vanished_twice_is_given_up_as_poison_and_dead_lettered() {
    let mut r = rig();
    lose_attempts(&r, "j1", &["node-b", "node-c"]).await;
    r.publish("j1");
    let results = r.results.wait_for(1).await;
    r.stop().await;
    assert_eq!(r.stages.runs("j1"), 0, "never run");
    let error = results[0].error.as_ref().expect("failed");
    assert_eq!(results[0].status, Status::Failed);
    assert_eq!(
        (error.class, error.code, error.stage),
        (ErrorClass::Permanent, ErrorCode::Poison, Stage::Receive)
    );
    assert!(
        error.message.contains("2 earlier attempt(s)"),
        "{}",
        error.message
    );
    let letters = r.results.dead_letters();
    assert_eq!(letters.len(), 1);
    assert_eq!(
        (
            letters[0].job_id.as_str(),
            letters[0].lost_attempts,
            letters[0].kind
        ),
        ("j1", 2, Kind::Import)
    );
    assert_eq!(letters[0].result, results[0]);
    let settles = r.settles("j1");
    assert!(
        matches!(settles.as_slice(), [Settle::Nak { .. }, Settle::Term]),
        "{settles:?}"
    );
    assert_eq!(r.states.record("j1").unwrap()["state"], "failed");
}

/// One lost attempt is not enough, and `max_lost_attempts = 0` turns the check off: the job
/// runs and succeeds, with no dead letter.
#[tokio::test(start_paused = true)]
async fn a_job_is_run_again_below_the_lost_attempts_limit_or_with_the_check_off() {
    for (max, workers) in [
        (2, &["node-b"][..]),
        (0, &["node-b", "node-c", "node-d"][..]),
    ] {
        let mut r = rig_with(|s| s.max_lost_attempts = max);
        lose_attempts(&r, "j1", workers).await;
        r.publish("j1");
        let results = r.results.wait_for(1).await;
        r.stop().await;
        assert_eq!(results[0].status, Status::Succeeded, "max {max}");
        assert_eq!(r.stages.runs("j1"), 1);
        assert!(r.results.dead_letters().is_empty());
    }
}

/// The state store as a worker cut off from the network sees it: every call fails while `cut`
/// is set. Other workers reach the same store (`inner`) meanwhile.
struct CutOff {
    inner: MemStates,
    cut: Arc<std::sync::atomic::AtomicBool>,
}

impl CutOff {
    fn check(&self) -> Result<(), crate::ports::QueueError> {
        if self.cut.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(crate::ports::QueueError::new("kv", "cut off"));
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl JobStates for CutOff {
    async fn get(
        &self,
        job_id: &str,
    ) -> Result<Option<(bytes::Bytes, u64)>, crate::ports::QueueError> {
        self.check()?;
        self.inner.get(job_id).await
    }

    async fn create(
        &self,
        job_id: &str,
        value: bytes::Bytes,
    ) -> Result<Result<u64, crate::ports::Conflict>, crate::ports::QueueError> {
        self.check()?;
        self.inner.create(job_id, value).await
    }

    async fn update(
        &self,
        job_id: &str,
        value: bytes::Bytes,
        revision: u64,
    ) -> Result<Result<u64, crate::ports::Conflict>, crate::ports::QueueError> {
        self.check()?;
        self.inner.update(job_id, value, revision).await
    }
}

/// An import that works for `takes`, then pushes its tag (the irreversible step), noting when
/// it pushed; a cancel stops it at once, noted too.
struct TimedImport {
    takes: Duration,
    started: std::sync::Mutex<Vec<tokio::time::Instant>>,
    pushed: std::sync::Mutex<Vec<tokio::time::Instant>>,
    stopped: std::sync::Mutex<Vec<tokio::time::Instant>>,
}

#[async_trait::async_trait]
impl crate::ports::Importer for TimedImport {
    async fn import(
        &self,
        _: crate::ports::ImportRequest<'_>,
        cx: &StageContext,
    ) -> Result<crate::job::ImageInfo, JobError> {
        let now = tokio::time::Instant::now;
        self.started.lock().unwrap().push(now());
        tokio::select! {
            _ = tokio::time::sleep(self.takes) => {
                self.pushed.lock().unwrap().push(now());
                Ok(crate::job::ImageInfo {
                    reference: "registry.test/src:j1".into(),
                    digest: format!("sha256:{}", "1".repeat(64)),
                    source_digest: None,
                    size_bytes: 0,
                    platforms: Vec::new(),
                })
            }
            _ = cx.cancel.cancelled() => {
                self.stopped.lock().unwrap().push(now());
                Err(JobError::cancelled(Stage::Import))
            }
        }
    }
}

/// Regression: a worker cut off from the state store mid-job (a network partition) could not
/// refresh its lease, yet its import ran on; after its lease lapsed and another worker took the
/// job over, the cut-off worker, back on the network, pushed the job's tag over the new owner's
/// (only its result was held back, by the compare-and-set of the terminal state). Now the
/// attempt stops itself once its lease has gone unconfirmed for `lease − heartbeat` (40 s of
/// 60), before any other worker may take over, and pushes nothing.
/// A worker whose state store can be cut off (`cut`), running imports that take `takes`.
struct CutOffRig {
    queue: MemQueue,
    states: MemStates,
    results: MemResults,
    cut: Arc<std::sync::atomic::AtomicBool>,
    import: Arc<TimedImport>,
    worker: Arc<Worker>,
    shutdown: CancellationToken,
    handle: JoinHandle<()>,
    _work_root: tempfile::TempDir,
}

impl CutOffRig {
    fn start(takes: Duration) -> CutOffRig {
        let work_root = tempfile::tempdir().unwrap();
        let (queue, states, results) = (
            MemQueue::new(ACK_WAIT, 5),
            MemStates::new(),
            MemResults::new(),
        );
        let cut = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let import = Arc::new(TimedImport {
            takes,
            started: Default::default(),
            pushed: Default::default(),
            stopped: Default::default(),
        });
        let ports = QueuePorts {
            queue: Arc::new(queue.clone()),
            states: Arc::new(CutOff {
                inner: states.clone(),
                cut: Arc::clone(&cut),
            }),
            results: Arc::new(results.clone()),
            events: Arc::new(MemEvents::new()),
            cancels: Arc::new(MemCancels::new()),
        };
        let mut stages = ScriptedStages::new().stages(work_root.path().join("store"));
        stages.importer = import.clone();
        let worker = new_worker(settings(work_root.path()), ports, stages);
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(Arc::clone(&worker).run(shutdown.clone()));
        CutOffRig {
            queue,
            states,
            results,
            cut,
            import,
            worker,
            shutdown,
            handle,
            _work_root: work_root,
        }
    }

    fn set_cut(&self, cut: bool) {
        self.cut.store(cut, std::sync::atomic::Ordering::SeqCst);
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.handle.await.unwrap();
    }
}

/// Regression: a worker cut off from the state store mid-job (a network partition) could not
/// refresh its lease, yet its import ran on; after its lease lapsed and another worker took the
/// job over, the cut-off worker, back on the network, pushed the job's tag over the new owner's
/// (only its result was held back, by the compare-and-set of the terminal state). Now the
/// attempt stops itself once its lease has gone unconfirmed for `lease − heartbeat` (40 s of
/// 60), before any other worker may take over, and pushes nothing.
#[tokio::test(start_paused = true)]
async fn a_worker_cut_off_mid_job_stops_it_before_its_lease_lapses_and_never_pushes_after_a_takeover(
) {
    let r = CutOffRig::start(Duration::from_secs(70));
    assert!(r.queue.publish(Kind::Import, "j1", import_job("j1")));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let started = r.import.started.lock().unwrap()[0];
    r.set_cut(true);

    // Once the lease has lapsed, node-b takes the job over; then node-a is back.
    tokio::time::sleep_until(started + ACK_WAIT + Duration::from_secs(1)).await;
    let takeover = Claims {
        states: &r.states,
        worker: "node-b",
        lease: ACK_WAIT,
        now_ms: r.worker.clock.now_ms(),
        attempt: 2,
        lost_attempts: 0,
    };
    assert!(matches!(
        takeover.claim("j1").await.unwrap(),
        ClaimOutcome::Claimed { .. }
    ));
    r.set_cut(false);
    // Past the moment the import would have pushed (70 s), before node-a's next heartbeat
    // (80 s) could have learnt of the takeover.
    tokio::time::sleep_until(started + Duration::from_secs(75)).await;

    assert!(
        r.import.pushed.lock().unwrap().is_empty(),
        "pushed after the takeover"
    );
    let stopped = r.import.stopped.lock().unwrap().clone();
    assert_eq!(stopped.len(), 1, "stopped once");
    let after = stopped[0] - started;
    assert!(
        after >= Duration::from_secs(39) && after <= Duration::from_secs(41),
        "stopped {after:?} after the start: lease − heartbeat, before the lease lapsed"
    );
    assert_eq!(r.import.started.lock().unwrap().len(), 1);
    assert!(
        r.results.all().is_empty(),
        "no result from the cut-off worker"
    );
    assert_eq!(r.states.record("j1").unwrap()["worker"], "node-b");
    r.stop().await;
}

/// A fenced-off attempt whose state store answers again before its lease would have lapsed
/// (a short outage, a leader election) hands the job back in its record, so its next claim —
/// here this worker's own — counts no lost attempt: outages do not push healthy jobs toward
/// `worker.max_lost_attempts` and the dead-letter stream.
#[tokio::test(start_paused = true)]
async fn a_fenced_attempt_hands_its_job_back_when_the_store_answers_again_and_is_not_counted_lost()
{
    let r = CutOffRig::start(Duration::from_secs(600));
    assert!(r.queue.publish(Kind::Import, "j1", import_job("j1")));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let started = r.import.started.lock().unwrap()[0];
    r.set_cut(true);
    tokio::time::sleep_until(started + Duration::from_secs(45)).await;
    assert_eq!(r.import.stopped.lock().unwrap().len(), 1, "fenced off");
    r.set_cut(false);
    tokio::time::sleep_until(started + Duration::from_secs(47)).await;

    assert_eq!(r.import.started.lock().unwrap().len(), 2, "run again");
    let record = r.states.record("j1").unwrap();
    assert_eq!(
        (&record["state"], &record["worker"], &record["attempt"]),
        (&"running".into(), &"node-a".into(), &2.into())
    );
    assert!(record.get("lost_attempts").is_none(), "{record}");
    r.stop().await;
}

/// A state store out of reach at the moment a job ends (a leader election) used to undo the
/// job: "cannot store the terminal state", no result, the message left to be redelivered, the
/// record left running for the next claim to count as a lost attempt, and the job run again.
/// Now the finish is tried again until the store answers (for up to a lease): one run, one
/// result, no lost attempt.
#[tokio::test(start_paused = true)]
async fn a_store_out_of_reach_when_a_job_ends_delays_its_result_without_rerun_or_lost_attempt() {
    let r = CutOffRig::start(Duration::from_secs(30));
    assert!(r.queue.publish(Kind::Import, "j1", import_job("j1")));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let started = r.import.started.lock().unwrap()[0];
    // Cut just after the heartbeat at 20 s: the run ends (30 s) long before the fence (60 s).
    tokio::time::sleep_until(started + Duration::from_secs(25)).await;
    r.set_cut(true);
    tokio::time::sleep_until(started + Duration::from_secs(40)).await;
    assert!(r.results.all().is_empty(), "no result while cut off");
    r.set_cut(false);
    let results = r.results.wait_for(1).await;
    assert!(
        started.elapsed() < Duration::from_secs(42),
        "published {:?} after the start",
        started.elapsed()
    );
    assert_eq!(
        (results[0].status, results[0].attempt),
        (Status::Succeeded, 1)
    );
    assert_eq!(r.import.started.lock().unwrap().len(), 1, "run once");
    let record = r.states.record("j1").unwrap();
    assert_eq!(record["state"], "succeeded");
    assert!(record.get("lost_attempts").is_none(), "{record}");
    let settles: Vec<Settle> = r.queue.settled().into_iter().map(|s| s.settle).collect();
    assert_eq!(settles, [Settle::Ack]);
    r.stop().await;
}

/// A results stream that does not acknowledge for a moment (its leader is being elected) used
/// to leave the job's message for redelivery a whole `ack_wait` later; now the worker publishes
/// again until it is acknowledged (for up to a lease), then acks.
#[tokio::test(start_paused = true)]
async fn a_result_publish_unanswered_for_a_moment_is_tried_again_not_left_for_redelivery() {
    let mut r = rig();
    r.results
        .failing
        .store(true, std::sync::atomic::Ordering::SeqCst);
    r.publish("j1");
    tokio::time::sleep(Duration::from_secs(7)).await;
    assert!(
        r.settles("j1").is_empty(),
        "not settled before the result is out"
    );
    r.results
        .failing
        .store(false, std::sync::atomic::Ordering::SeqCst);
    let results = r.results.wait_for(1).await;
    r.stop().await;
    assert_eq!(results[0].status, Status::Succeeded);
    assert_eq!(r.settles("j1"), [Settle::Ack]);
    assert_eq!(r.queue.settled()[0].attempt, 1, "no redelivery");
}
