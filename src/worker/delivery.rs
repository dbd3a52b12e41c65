//! One delivery's journey, top to bottom: **receive** (is it a job we take now?) → **claim**
//! (is it ours to run?) → **attempt** (run it, with a heartbeat) → **report** (terminal
//! record, result, events) → **settle** (ack, nak or term, as [`decide`] says).
//!
//! Every settle decision, including those before the run, comes from the pure
//! [`decide`]; a result is stored and published (and its publish acknowledged) before the
//! message is settled, so a crash in between re-publishes rather than loses it.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

use super::claim::ClaimOutcome;
use super::disposition::{decide, Disposition, Outcome};
use super::telemetry::{record, Event};
use super::Worker;
use crate::error::{ErrorClass, ErrorCode, JobError, Stage};
use crate::job::{self, DeadLetter, Job, JobEvent, JobResult, Redactor};
use crate::pipeline::attempt::{redacted_info, Attempt, Ran, StopReason};
use crate::ports::{Delivery, DeliveryHandle, QueueError, Settle};

/// How often a write (a job's record, a result) is tried again while it is not answered.
const STORE_RETRY: Duration = Duration::from_millis(500);

/// A job this worker won the claim of.
struct Claimed {
    /// The record's revision, for compare-and-set; the heartbeat moves it on.
    revision: Arc<tokio::sync::Mutex<u64>>,
    /// Earlier attempts that ended with their worker gone.
    lost_attempts: u32,
    /// When the winning claim was sent: the lease it wrote runs from (no earlier than) here.
    sent_at: Instant,
}

impl Worker {
    /// One delivery, from the message to its settle.
    pub(super) async fn process(self: Arc<Self>, delivery: Delivery) {
        // 1. Receive: a kind held while the pull waited goes back untried, for another worker.
        if self.readiness.is_held(delivery.kind) {
            debug!(kind = %delivery.kind, "Handing a job back: this kind is held.");
            return self.settle_as(&delivery, Outcome::Held).await;
        }
        self.count(|s| s.received += 1);
        record(Event::Received {
            kind: delivery.kind,
        });
        let job = match receive(&delivery) {
            Ok(job) => job,
            Err((source_id, err)) => return self.reject(&delivery, &source_id, &err).await,
        };
        let span = tracing::info_span!("job", job.id = %job.id, kind = %job.kind(), attempt = delivery.attempt);
        self.journey(job, delivery).instrument(span).await;
    }

    /// Claim → attempt → report → settle, for a message that holds a valid job.
    async fn journey(self: Arc<Self>, job: Job, delivery: Delivery) {
        // 2. Claim.
        let Some(claimed) = self.claim(&job, &delivery).await else {
            return;
        };
        let max_lost = self.settings.max_lost_attempts;
        if max_lost > 0 && claimed.lost_attempts >= max_lost {
            return self.give_up_poison(&job, &delivery, &claimed).await;
        }

        // 3. Attempt.
        let sink = self.ports.events.sink(&job.id, delivery.attempt);
        let attempt = Attempt::new(job, delivery.attempt, sink);
        let ran = self.attempt(&attempt, &delivery, &claimed).await;
        if !matches!(
            ran.stopped,
            Some(StopReason::LostClaim | StopReason::LeaseUnconfirmed)
        ) {
            self.count(|s| s.finished += 1);
        }

        // 4. Report and 5. settle.
        self.report(&attempt, &delivery, &claimed, ran).await;
    }

    /// Claims the job, or settles the delivery as the claim says and returns `None`.
    async fn claim(&self, job: &Job, delivery: &Delivery) -> Option<Claimed> {
        let attempt = delivery.attempt;
        let running_here = self
            .running
            .lock()
            .map(|r| r.contains_key(&job.id))
            .unwrap_or(false);
        if running_here {
            self.count(|s| s.duplicates += 1);
            self.settle_as(delivery, Outcome::RunningHere).await;
            return None;
        }
        // Taken before the claim's wall-clock time is read (in `claims`), so that the lease
        // counted from here never ends later than the one written.
        let sent_at = Instant::now();
        match self.claims(attempt, 0).claim(&job.id).await {
            Ok(ClaimOutcome::Claimed {
                revision,
                lost_attempts,
            }) => {
                return Some(Claimed {
                    revision: Arc::new(tokio::sync::Mutex::new(revision)),
                    lost_attempts,
                    sent_at,
                })
            }
            Ok(ClaimOutcome::AlreadyDone(result)) => {
                info!(
                    status = result.status.as_str(),
                    "Job already ended; re-publishing its result."
                );
                self.count(|s| s.duplicates += 1);
                let d = self.decide(Outcome::AlreadyEnded(result.status), attempt);
                let reported = self.publish(&result).await;
                self.settle_once_reported(delivery, d, reported).await;
            }
            Ok(ClaimOutcome::RunningElsewhere { retry_in }) => {
                debug!(
                    retry_in_ms = retry_in.as_millis() as u64,
                    "Job runs on another worker; putting it back."
                );
                self.count(|s| s.duplicates += 1);
                self.settle_as(delivery, Outcome::RunningElsewhere { retry_in })
                    .await;
            }
            Ok(ClaimOutcome::CancelledBeforeStart { revision }) => {
                info!("Job cancelled before it started.");
                let err = JobError::cancelled(Stage::Receive);
                let result = self.result_without_run(job, attempt, &err);
                let d = self.decide(Outcome::CancelledBeforeStart, attempt);
                let stored = self
                    .claims(attempt, 0)
                    .finish_cancelled_before_start(&job.id, revision, &result)
                    .await
                    .unwrap_or(false);
                let reported = stored && self.publish(&result).await;
                self.settle_once_reported(delivery, d, reported).await;
            }
            Err(e) => {
                let d = self.decide(Outcome::ClaimUnavailable, attempt);
                warn!(error = %e, settle = ?d.settle, "Claim failed; the job will be redelivered.");
                self.settle_once_reported(delivery, d, false).await;
            }
        }
        None
    }

    /// Runs the attempt on the shared runner, with a heartbeat that keeps the message and the
    /// claim alive, and registered so that a cancel request or the shutdown can stop it.
    async fn attempt(
        self: &Arc<Self>,
        attempt: &Attempt,
        delivery: &Delivery,
        claimed: &Claimed,
    ) -> Ran {
        let job = &attempt.job;
        if let Ok(mut running) = self.running.lock() {
            running.insert(job.id.clone(), attempt.stop.clone());
        }
        record(Event::Started { kind: job.kind() });
        let heartbeat = tokio::spawn(Arc::clone(self).heartbeat(
            job.id.clone(),
            (attempt.number, claimed.lost_attempts),
            (Arc::clone(&claimed.revision), claimed.sent_at),
            Arc::clone(&delivery.handle),
            attempt.stop.clone(),
        ));
        let ran = self.runner.run(attempt).await;
        heartbeat.abort();
        let _ = heartbeat.await;
        record(Event::RunEnded {
            kind: job.kind(),
            timings: ran.outcome.as_ref().ok().map(|o| o.timings),
        });
        if let Ok(mut running) = self.running.lock() {
            running.remove(&job.id);
        }
        ran
    }

    /// Reports a finished attempt and settles its message: the terminal record first (a
    /// compare-and-set that fails when another worker took the job over), then the result,
    /// then the settle; a transient failure releases the claim and goes back to the queue.
    async fn report(&self, attempt: &Attempt, delivery: &Delivery, claimed: &Claimed, ran: Ran) {
        let job = &attempt.job;
        let outcome = match (&ran.outcome, ran.stopped) {
            (_, Some(StopReason::LostClaim)) => Outcome::LostClaim,
            (Ok(_), _) => Outcome::Succeeded,
            (Err(e), _) => Outcome::Failed(e),
        };
        let d = self.decide(outcome, attempt.number);
        let revision = *claimed.revision.lock().await;
        let claims = self.claims(attempt.number, claimed.lost_attempts);
        let seconds = (ran.finished_at - ran.started_at).as_seconds_f64().max(0.0);

        let Some(status) = d.publish else {
            match (&ran.outcome, d.settle) {
                (_, None) => {
                    warn!("Lost the claim to another worker; dropping this attempt quietly.");
                }
                (Err(e), Some(Settle::Nak { delay })) => {
                    if e.class == ErrorClass::Transient {
                        attempt.emit(JobEvent::Retrying {
                            error: redacted_info(e, attempt.number, false, &attempt.redactor),
                            delay_ms: delay.as_millis() as u64,
                        });
                    }
                    record(Event::HandedBack {
                        kind: job.kind(),
                        seconds,
                        error: e,
                        delay,
                        redactor: &attempt.redactor,
                    });
                }
                _ => {}
            }
            if d.settle.is_some() {
                // An attempt fenced off by its unconfirmed lease most likely met a state store
                // that is out of reach for a while (a partition, a leader election): keep
                // trying to hand the job back, so that the next claim does not count this
                // attempt as lost. The release is a compare-and-set on our revision, so it is
                // refused once another worker has taken the job over.
                let patience = match ran.stopped {
                    Some(StopReason::LeaseUnconfirmed) => self.settings.lease,
                    _ => Duration::ZERO,
                };
                let released = until_answered(patience, &self.grace_over, || {
                    claims.release(&job.id, revision)
                });
                if let Err(e) = released.await {
                    debug!(error = %e, "Cannot release the claim; it will lapse.");
                }
            }
            return self.settle_once_reported(delivery, d, false).await;
        };

        let result = self.runner.result(attempt, &ran, d.retries_exhausted);
        debug_assert_eq!(result.status, status);
        // The work is done: a state store out of reach for a moment (a leader election) must
        // not undo it, nor leave the record running for the next claim to count as a lost
        // attempt. The finish is a compare-and-set on our revision, so retrying it is safe: it
        // is refused once another worker has taken the job over.
        let finished = until_answered(self.settings.lease, &self.grace_over, || {
            claims.finish(&job.id, revision, &result)
        });
        let reported = match finished.await {
            Ok(true) => {
                attempt.emit(JobEvent::Finished { status });
                let publishing = tokio::time::Instant::now();
                let published = self.publish(&result).await;
                if published {
                    crate::telemetry::metrics()
                        .result_publish_seconds
                        .observe(publishing.elapsed().as_secs_f64());
                }
                record(Event::Finished {
                    kind: job.kind(),
                    status,
                    seconds,
                    error: ran
                        .outcome
                        .as_ref()
                        .err()
                        .map(|e| (e, attempt.redactor.as_ref())),
                });
                published
            }
            Ok(false) => {
                warn!("Job taken over by another worker before it finished here; not publishing.");
                false
            }
            Err(e) => {
                // Without the terminal record we cannot tell a duplicate from a retry later:
                // leave the message for redelivery.
                warn!(error = %e, "Cannot store the terminal state; the job will be redelivered.");
                false
            }
        };
        self.settle_once_reported(delivery, d, reported).await;
    }

    /// A message that is not a valid job: a permanent failure, reported on the subject's id.
    async fn reject(&self, delivery: &Delivery, source_id: &str, err: &JobError) {
        record(Event::Rejected {
            job_id: &delivery.subject_job_id,
            error: err,
        });
        let result = self.runner.result_without_run(
            &delivery.subject_job_id,
            source_id,
            delivery.attempt,
            err,
            &Redactor::default(),
        );
        let d = self.decide(Outcome::Invalid, delivery.attempt);
        let reported = self.publish(&result).await;
        self.settle_once_reported(delivery, d, reported).await;
    }

    /// A job whose earlier attempts ended with their worker gone (`lost_attempts`, at least
    /// `worker.max_lost_attempts`): most likely the job itself brings workers down, so it is not
    /// run again. It is copied to the dead-letter stream first, then fails permanently as
    /// `poison` like any finished job (terminal record, result, term). A failure on the way
    /// leaves the message for redelivery, which comes back here; the copy is deduplicated.
    async fn give_up_poison(&self, job: &Job, delivery: &Delivery, claimed: &Claimed) {
        let attempt = delivery.attempt;
        let lost_attempts = claimed.lost_attempts;
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
        let result = self.result_without_run(job, attempt, &err);
        let d = self.decide(Outcome::Poison, attempt);
        let letter = DeadLetter {
            v: job::WIRE_VERSION,
            job_id: job.id.clone(),
            source_id: job.source_id.clone(),
            kind: job.kind(),
            delivery: attempt,
            lost_attempts,
            result: result.clone(),
        };
        let reported = match self.ports.results.dead_letter(&letter).await {
            Err(e) => {
                warn!(error = %e, "Cannot copy the job to the dead-letter stream; it will be redelivered.");
                false
            }
            Ok(()) => {
                let revision = *claimed.revision.lock().await;
                match self
                    .claims(attempt, lost_attempts)
                    .finish(&job.id, revision, &result)
                    .await
                {
                    Ok(true) => {
                        record(Event::Poisoned {
                            kind: job.kind(),
                            lost_attempts,
                        });
                        self.count(|s| s.finished += 1);
                        self.publish(&result).await
                    }
                    Ok(false) => false,
                    Err(e) => {
                        warn!(error = %e, "Cannot store the terminal state; the job will be redelivered.");
                        false
                    }
                }
            }
        };
        self.settle_once_reported(delivery, d, reported).await;
    }

    /// Keeps a running attempt's message and claim alive: an in-progress ack and a lease
    /// refresh every `heartbeat`. Stops the attempt when the record asks for a cancel, or when
    /// the lease was lost to another worker.
    ///
    /// It is also the attempt's fence: a worker cut off from the state store cannot learn that
    /// another worker took its job over, and its stages would go on to push the image and its
    /// report would try to publish a result once the network is back. So the attempt may run
    /// only while its lease is confirmed: when no claim or refresh sent in the last
    /// [`WorkerSettings::fence_after`](super::WorkerSettings::fence_after) has been confirmed,
    /// the attempt is stopped — before the lease can have lapsed for any other worker — and
    /// handed back.
    async fn heartbeat(
        self: Arc<Self>,
        job_id: String,
        (attempt, lost_attempts): (u32, u32),
        (revision, claim_sent_at): (Arc<tokio::sync::Mutex<u64>>, Instant),
        delivery: Arc<dyn DeliveryHandle>,
        stop: crate::pipeline::attempt::Stop,
    ) {
        let fence_after = self.settings.fence_after();
        let mut confirmed_at = claim_sent_at;
        let mut ticker = tokio::time::interval(self.settings.heartbeat);
        ticker.tick().await;
        loop {
            let beat = async {
                ticker.tick().await;
                if let Err(e) = delivery.in_progress().await {
                    debug!(job.id = %job_id, error = %e, "In-progress ack failed.");
                }
                let mut rev = revision.lock().await;
                let sent_at = Instant::now();
                let refreshed = self
                    .claims(attempt, lost_attempts)
                    .refresh(&job_id, *rev)
                    .await;
                if let Ok(Some((new, _))) = &refreshed {
                    *rev = *new;
                }
                (sent_at, refreshed)
            };
            let (sent_at, refreshed) = tokio::select! {
                beat = beat => beat,
                _ = tokio::time::sleep_until(confirmed_at + fence_after) => {
                    record(Event::LeaseUnconfirmed {
                        job_id: &job_id,
                        unconfirmed: confirmed_at.elapsed(),
                    });
                    stop.stop(StopReason::LeaseUnconfirmed);
                    return;
                }
            };
            match refreshed {
                Ok(Some((_, cancel))) => {
                    confirmed_at = sent_at;
                    if cancel {
                        stop.stop(StopReason::Requested);
                    }
                }
                Ok(None) => {
                    stop.stop(StopReason::LostClaim);
                    return;
                }
                Err(e) => debug!(job.id = %job_id, error = %e, "Lease refresh failed; will retry."),
            }
        }
    }

    fn decide(&self, outcome: Outcome<'_>, attempt: u32) -> Disposition {
        decide(outcome, attempt, &self.settings.policy(), fastrand::f64())
    }

    fn result_without_run(&self, job: &Job, attempt: u32, err: &JobError) -> JobResult {
        self.runner.result_without_run(
            &job.id,
            &job.source_id,
            attempt,
            err,
            &Redactor::for_job(job),
        )
    }

    /// Publishes a result; false (logged) when the message system did not confirm it. A
    /// publish the results stream does not acknowledge (its leader is being elected) is tried
    /// again for up to a lease rather than left to a redelivery a whole `ack_wait` later: the
    /// stream drops a second copy of a result (`Nats-Msg-Id`), so a retry never stores one
    /// twice.
    async fn publish(&self, result: &JobResult) -> bool {
        let published = until_answered(self.settings.lease, &self.grace_over, || {
            self.ports.results.publish(result)
        });
        match published.await {
            Ok(()) => true,
            Err(e) => {
                tracing::error!(job.id = %result.job_id, error = %e, "Cannot publish the result; the job will be redelivered and the result published again.");
                false
            }
        }
    }

    /// Settles as decided for an outcome that reports nothing.
    async fn settle_as(&self, delivery: &Delivery, outcome: Outcome<'_>) {
        let d = self.decide(outcome, delivery.attempt);
        self.settle_once_reported(delivery, d, false).await;
    }

    async fn settle_once_reported(&self, delivery: &Delivery, d: Disposition, reported: bool) {
        let Some(settle) = d.once_reported(reported) else {
            return;
        };
        if let Err(e) = delivery.handle.settle(settle).await {
            warn!(job.id = %delivery.subject_job_id, error = %e, ?settle, "Cannot settle the message; it will be redelivered.");
        }
    }
}

/// Runs `write` (a compare-and-set on this worker's revision of a job's record, or an
/// idempotent publish) until the message system answers, for up to `patience`; after that, its
/// last error. Once `grace_over` fires (the shutdown's grace period ended) it tries no more: a
/// try under way is given up, and a write begun after it (the hand-back of a job stopped
/// then) is tried once. The message is redelivered and the write made again by whoever takes
/// it.
async fn until_answered<T, W, F>(
    patience: Duration,
    grace_over: &CancellationToken,
    mut write: W,
) -> Result<T, QueueError>
where
    W: FnMut() -> F,
    F: std::future::Future<Output = Result<T, QueueError>>,
{
    let give_up = Instant::now() + patience;
    let over = || QueueError::new("write", "the worker's grace period is over");
    if grace_over.is_cancelled() {
        return write().await;
    }
    loop {
        let answered = tokio::select! {
            answered = write() => answered,
            _ = grace_over.cancelled() => return Err(over()),
        };
        match answered {
            Err(_) if Instant::now() < give_up => tokio::select! {
                _ = tokio::time::sleep(STORE_RETRY) => {}
                _ = grace_over.cancelled() => return Err(over()),
            },
            answered => return answered,
        }
    }
}

/// Decodes the message: a valid job of the kind and id its subject names, or the error to
/// report (with the job's `source_id`, when the payload had one).
fn receive(delivery: &Delivery) -> Result<Job, (String, JobError)> {
    let invalid = |message| JobError::new(Stage::Receive, ErrorCode::InvalidJob, message);
    match job::decode(&delivery.payload) {
        Ok(job) if job.id == delivery.subject_job_id && job.kind() == delivery.kind => Ok(job),
        Ok(job) => {
            let msg = format!(
                "job {} of kind {} was published on the subject of job {} of kind {}",
                job.id,
                job.kind(),
                delivery.subject_job_id,
                delivery.kind
            );
            Err((job.source_id, invalid(msg)))
        }
        Err(problems) => {
            let msg = format!("invalid job: {}", problems.to_string().replace('\n', "; "));
            Err((String::new(), invalid(msg)))
        }
    }
}

#[cfg(test)]
mod grace_tests {
    use super::*;

    /// A write that never answers is given up when the grace period ends, not a lease later;
    /// one begun after that is tried once.
    #[tokio::test(start_paused = true)]
    async fn an_unanswered_write_gives_up_when_the_grace_period_ends() {
        let grace_over = CancellationToken::new();
        let tries = std::sync::atomic::AtomicU32::new(0);
        let never = || async {
            tries.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            std::future::pending::<Result<(), QueueError>>().await
        };
        let started = Instant::now();
        let end = {
            let grace_over = grace_over.clone();
            async move {
                tokio::time::sleep(Duration::from_secs(3)).await;
                grace_over.cancel();
            }
        };
        let (answered, ()) = tokio::join!(
            until_answered(Duration::from_secs(60), &grace_over, never),
            end
        );
        assert!(answered.is_err());
        assert_eq!(started.elapsed(), Duration::from_secs(3));

        let once = || async {
            tries.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Err::<(), _>(QueueError::new("write", "refused"))
        };
        let before = tries.load(std::sync::atomic::Ordering::SeqCst);
        assert!(until_answered(Duration::from_secs(60), &grace_over, once)
            .await
            .is_err());
        assert_eq!(tries.load(std::sync::atomic::Ordering::SeqCst), before + 1);
    }
}
