//! Claims: who runs a job, and whether it already ran (ARCHITECTURE §4, worker protocol 2-4).
//!
//! Each job has a record under `job.<id>` in the state store. A worker creates it (or takes it
//! over by compare-and-set) before running the job, refreshes its lease while the job runs, and
//! writes the terminal state with the result before publishing it. So a redelivered job whose
//! record is terminal is answered from the record without being run again, a delivery of a job
//! that another worker holds is put back, and a job whose worker died is taken over once the
//! lease lapses. A cancel request sets `cancel` in the record, so it wins even before the job
//! starts.

use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::job::JobResult;
use crate::ports::{Conflict, JobStates, QueueError};

/// Compare-and-set rounds before giving up on a busy record (cancel marks racing a refresh).
const MAX_CAS_ROUNDS: usize = 5;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordState {
    /// Known (e.g. a cancel mark written before any worker saw the job) or waiting for a retry.
    Pending,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl RecordState {
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            RecordState::Succeeded | RecordState::Failed | RecordState::Cancelled
        )
    }
}

/// The value stored under `job.<id>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    pub state: RecordState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
    #[serde(default)]
    pub attempt: u32,
    /// Unix milliseconds until which the running worker holds the job.
    #[serde(default)]
    pub lease_until_ms: u64,
    #[serde(default)]
    pub cancel: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<JobResult>,
    /// Attempts that ended with their worker gone (died, killed, cut off) instead of a
    /// settled outcome: each takeover of a running record counts one.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub lost_attempts: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl JobRecord {
    /// The record a cancel request writes when no worker has seen the job yet.
    pub fn cancel_mark() -> Self {
        JobRecord {
            state: RecordState::Pending,
            worker: None,
            attempt: 0,
            lease_until_ms: 0,
            cancel: true,
            result: None,
            lost_attempts: 0,
        }
    }

    fn encode(&self) -> Bytes {
        // A record holds only plain data; serialising it cannot fail.
        Bytes::from(serde_json::to_vec(self).unwrap_or_default())
    }

    fn decode(bytes: &[u8]) -> Result<Self, QueueError> {
        serde_json::from_slice(bytes).map_err(|e| QueueError::new("decode job record", e))
    }

    fn owned_by(&self, worker: &str) -> bool {
        self.state == RecordState::Running && self.worker.as_deref() == Some(worker)
    }
}

/// What a worker may do with a delivery.
#[derive(Debug, Clone, PartialEq)]
pub enum ClaimOutcome {
    /// Ours to run; `revision` is the record's revision for later compare-and-set;
    /// `lost_attempts` the attempts before this one whose worker went away mid-job (pass it to
    /// the [`Claims`] of every later write, which keep it).
    Claimed { revision: u64, lost_attempts: u32 },
    /// The job already ended: re-publish this result and settle, without running it again.
    AlreadyDone(Box<JobResult>),
    /// A cancel was requested before the job started.
    CancelledBeforeStart { revision: u64 },
    /// Another worker holds a live lease; try again once it would have lapsed.
    RunningElsewhere { retry_in: Duration },
}

/// The claim protocol, over a state store and a wall clock (shared between workers, so leases
/// are wall-clock times).
pub struct Claims<'a> {
    pub states: &'a dyn JobStates,
    pub worker: &'a str,
    pub lease: Duration,
    pub now_ms: u64,
    /// The attempt (delivery) this worker claims or holds.
    pub attempt: u32,
    /// The record's count of lost attempts, kept by every write (0 when claiming).
    pub lost_attempts: u32,
}

impl Claims<'_> {
    fn running(&self, cancel: bool) -> JobRecord {
        JobRecord {
            state: RecordState::Running,
            worker: Some(self.worker.to_owned()),
            attempt: self.attempt,
            lease_until_ms: self.now_ms + self.lease.as_millis() as u64,
            cancel,
            result: None,
            lost_attempts: self.lost_attempts,
        }
    }

    /// Claims `job_id` for `self.attempt`.
    pub async fn claim(&self, job_id: &str) -> Result<ClaimOutcome, QueueError> {
        // Most jobs are new: try to create the record first, and read only if it exists.
        if let Ok(revision) = self
            .states
            .create(job_id, self.running(false).encode())
            .await?
        {
            return Ok(ClaimOutcome::Claimed {
                revision,
                lost_attempts: 0,
            });
        }
        for _ in 0..MAX_CAS_ROUNDS {
            let mut lost_attempts = 0;
            let written = match self.states.get(job_id).await? {
                None => {
                    self.states
                        .create(job_id, self.running(false).encode())
                        .await?
                }
                Some((bytes, revision)) => {
                    let record = JobRecord::decode(&bytes)?;
                    if record.state.is_terminal() {
                        if let Some(result) = record.result {
                            return Ok(ClaimOutcome::AlreadyDone(Box::new(result)));
                        }
                    }
                    if record.cancel {
                        return Ok(ClaimOutcome::CancelledBeforeStart { revision });
                    }
                    let lease_live = record.lease_until_ms > self.now_ms;
                    if record.state == RecordState::Running
                        && lease_live
                        && record.worker.as_deref() != Some(self.worker)
                    {
                        let left = record.lease_until_ms - self.now_ms;
                        return Ok(ClaimOutcome::RunningElsewhere {
                            retry_in: Duration::from_millis(left) + Duration::from_secs(1),
                        });
                    }
                    // Pending, a lapsed lease, or our own record from before a restart. A
                    // record still running lost its worker mid-job: count that attempt.
                    lost_attempts =
                        record.lost_attempts + u32::from(record.state == RecordState::Running);
                    let claimed = JobRecord {
                        lost_attempts,
                        ..self.running(false)
                    };
                    self.states
                        .update(job_id, claimed.encode(), revision)
                        .await?
                }
            };
            if let Ok(revision) = written {
                return Ok(ClaimOutcome::Claimed {
                    revision,
                    lost_attempts,
                });
            }
            // Someone wrote in between: read again and decide again.
        }
        Err(QueueError::new(
            "claim job",
            format!("record of {job_id} kept changing; giving up this delivery"),
        ))
    }

    /// Applies `change` to the record while this worker still owns it, retrying on conflicts
    /// (a cancel mark written meanwhile is kept). `Ok(None)`: the job is no longer ours.
    async fn update_owned(
        &self,
        job_id: &str,
        mut revision: u64,
        change: impl Fn(&mut JobRecord),
    ) -> Result<Option<(u64, JobRecord)>, QueueError> {
        // Usually nobody wrote since our last write: update blind at our revision, and read
        // the record only when that conflicts.
        let mut ours = self.running(false);
        change(&mut ours);
        if let Ok(new) = self.states.update(job_id, ours.encode(), revision).await? {
            return Ok(Some((new, ours)));
        }
        for _ in 0..MAX_CAS_ROUNDS {
            let Some((bytes, current)) = self.states.get(job_id).await? else {
                return Ok(None);
            };
            let mut record = JobRecord::decode(&bytes)?;
            if !record.owned_by(self.worker) {
                return Ok(None);
            }
            if current != revision {
                revision = current;
            }
            change(&mut record);
            match self
                .states
                .update(job_id, record.encode(), revision)
                .await?
            {
                Ok(new) => return Ok(Some((new, record))),
                Err(Conflict) => continue,
            }
        }
        Err(QueueError::new(
            "update job record",
            format!("record of {job_id} kept changing"),
        ))
    }

    /// Extends the lease. Returns the new revision and whether a cancel was requested, or
    /// `None` when another worker took the job over.
    pub async fn refresh(
        &self,
        job_id: &str,
        revision: u64,
    ) -> Result<Option<(u64, bool)>, QueueError> {
        let until = self.now_ms + self.lease.as_millis() as u64;
        Ok(self
            .update_owned(job_id, revision, |r| r.lease_until_ms = until)
            .await?
            .map(|(rev, record)| (rev, record.cancel)))
    }

    /// Writes the terminal state and result. `Ok(false)`: the job is no longer ours, so the
    /// caller must not publish. A record that already holds this very result (an earlier try
    /// of this finish was stored, but its answer was lost) counts as written.
    pub async fn finish(
        &self,
        job_id: &str,
        revision: u64,
        result: &JobResult,
    ) -> Result<bool, QueueError> {
        let state = match result.status {
            crate::job::Status::Succeeded => RecordState::Succeeded,
            crate::job::Status::Failed => RecordState::Failed,
            crate::job::Status::Cancelled => RecordState::Cancelled,
        };
        let written = self
            .update_owned(job_id, revision, |r| {
                r.state = state;
                r.lease_until_ms = 0;
                r.result = Some(result.clone());
            })
            .await?;
        if written.is_some() {
            return Ok(true);
        }
        Ok(match self.states.get(job_id).await? {
            Some((bytes, _)) => {
                let record = JobRecord::decode(&bytes)?;
                record.state == state && record.result.as_ref() == Some(result)
            }
            None => false,
        })
    }

    /// Gives the job back (for a retry or to another worker) without waiting for the lease.
    pub async fn release(&self, job_id: &str, revision: u64) -> Result<bool, QueueError> {
        Ok(self
            .update_owned(job_id, revision, |r| {
                r.state = RecordState::Pending;
                r.worker = None;
                r.lease_until_ms = 0;
            })
            .await?
            .is_some())
    }

    /// Writes the terminal result of a job cancelled before it started.
    pub async fn finish_cancelled_before_start(
        &self,
        job_id: &str,
        revision: u64,
        result: &JobResult,
    ) -> Result<bool, QueueError> {
        let mut record = JobRecord::cancel_mark();
        record.state = RecordState::Cancelled;
        record.result = Some(result.clone());
        Ok(self
            .states
            .update(job_id, record.encode(), revision)
            .await?
            .is_ok())
    }
}

/// Sets the cancel mark of `job_id` (creating the record if no worker has seen the job).
/// Returns false when the job had already ended.
pub async fn mark_cancelled(states: &dyn JobStates, job_id: &str) -> Result<bool, QueueError> {
    for _ in 0..MAX_CAS_ROUNDS {
        let written = match states.get(job_id).await? {
            None => {
                states
                    .create(job_id, JobRecord::cancel_mark().encode())
                    .await?
            }
            Some((bytes, revision)) => {
                let mut record = JobRecord::decode(&bytes)?;
                if record.state.is_terminal() {
                    return Ok(false);
                }
                record.cancel = true;
                states.update(job_id, record.encode(), revision).await?
            }
        };
        if written.is_ok() {
            return Ok(true);
        }
    }
    Err(QueueError::new(
        "mark cancelled",
        format!("record of {job_id} kept changing"),
    ))
}

/// Reads the stored terminal result of a job, if it has ended.
pub async fn stored_result(
    states: &dyn JobStates,
    job_id: &str,
) -> Result<Option<JobResult>, QueueError> {
    Ok(match states.get(job_id).await? {
        Some((bytes, _)) => JobRecord::decode(&bytes)?.result,
        None => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::MemStates;

    fn claims<'a>(states: &'a MemStates, worker: &'a str, now_ms: u64) -> Claims<'a> {
        Claims {
            states,
            worker,
            lease: Duration::from_secs(60),
            now_ms,
            attempt: 1,
            lost_attempts: 0,
        }
    }

    #[tokio::test]
    async fn a_lapsed_lease_is_taken_over_and_a_live_one_is_not() {
        let states = MemStates::new();
        let a = claims(&states, "a", 1_000);
        assert!(matches!(
            a.claim("j").await.unwrap(),
            ClaimOutcome::Claimed { .. }
        ));
        let b_early = claims(&states, "b", 30_000);
        assert!(matches!(
            b_early.claim("j").await.unwrap(),
            ClaimOutcome::RunningElsewhere { retry_in } if retry_in == Duration::from_secs(32)
        ));
        let b_late = claims(&states, "b", 62_000);
        assert!(matches!(
            b_late.claim("j").await.unwrap(),
            ClaimOutcome::Claimed { .. }
        ));
        assert_eq!(states.record("j").unwrap()["worker"], "b");
    }

    #[tokio::test]
    async fn the_old_owner_cannot_refresh_or_finish_after_a_takeover() {
        let states = MemStates::new();
        let a = claims(&states, "a", 0);
        let ClaimOutcome::Claimed { revision, .. } = a.claim("j").await.unwrap() else {
            panic!()
        };
        let b = claims(&states, "b", 120_000);
        assert!(matches!(
            b.claim("j").await.unwrap(),
            ClaimOutcome::Claimed { .. }
        ));
        assert_eq!(a.refresh("j", revision).await.unwrap(), None);
        assert!(!a.release("j", revision).await.unwrap());
    }

    /// A finish retried after its first try was stored but its answer lost (a timeout) is
    /// refused by the compare-and-set, yet finds its own result in the record: it counts as
    /// written, so the result is published. Another result there is not ours.
    #[tokio::test]
    async fn a_finish_whose_answer_was_lost_counts_as_written_when_retried() {
        let states = MemStates::new();
        let a = claims(&states, "a", 0);
        let ClaimOutcome::Claimed { revision, .. } = a.claim("j").await.unwrap() else {
            panic!()
        };
        let result = |attempt| JobResult {
            v: 1,
            job_id: "j".into(),
            source_id: "s".into(),
            status: crate::job::Status::Succeeded,
            attempt,
            worker: "a".into(),
            image: None,
            revision: None,
            error: None,
            timings_ms: Default::default(),
            started_at: time::OffsetDateTime::UNIX_EPOCH,
            finished_at: time::OffsetDateTime::UNIX_EPOCH,
        };
        assert!(a.finish("j", revision, &result(1)).await.unwrap());
        assert!(a.finish("j", revision, &result(1)).await.unwrap());
        assert!(!a.finish("j", revision, &result(2)).await.unwrap());
    }

    #[tokio::test]
    async fn a_cancel_mark_written_during_the_job_survives_a_refresh() {
        let states = MemStates::new();
        let a = claims(&states, "a", 0);
        let ClaimOutcome::Claimed { revision, .. } = a.claim("j").await.unwrap() else {
            panic!()
        };
        assert!(mark_cancelled(&states, "j").await.unwrap());
        // The blind update conflicts; the re-read keeps the mark and reports it.
        let (_, cancel) = a.refresh("j", revision).await.unwrap().unwrap();
        assert!(cancel);
        assert_eq!(states.record("j").unwrap()["cancel"], true);
    }

    #[tokio::test]
    async fn a_cancel_mark_before_any_claim_wins() {
        let states = MemStates::new();
        assert!(mark_cancelled(&states, "j").await.unwrap());
        assert!(matches!(
            claims(&states, "a", 0).claim("j").await.unwrap(),
            ClaimOutcome::CancelledBeforeStart { .. }
        ));
    }

    #[tokio::test]
    async fn a_released_job_is_claimed_at_once_by_another_worker() {
        let states = MemStates::new();
        let a = claims(&states, "a", 0);
        let ClaimOutcome::Claimed { revision, .. } = a.claim("j").await.unwrap() else {
            panic!()
        };
        assert!(a.release("j", revision).await.unwrap());
        assert!(matches!(
            claims(&states, "b", 1).claim("j").await.unwrap(),
            ClaimOutcome::Claimed { .. }
        ));
    }

    /// Each takeover of a running record (its worker died or was cut off) counts a lost
    /// attempt; the count survives the new owner's refreshes and releases; a released or
    /// pending record taken over counts nothing.
    #[tokio::test]
    async fn takeovers_of_running_records_count_lost_attempts_and_writes_keep_the_count() {
        let states = MemStates::new();
        let lost = |states: &MemStates| states.record("j").unwrap()["lost_attempts"].as_u64();
        claims(&states, "a", 0).claim("j").await.unwrap();
        let b = claims(&states, "b", 61_000);
        let ClaimOutcome::Claimed {
            revision,
            lost_attempts: 1,
        } = b.claim("j").await.unwrap()
        else {
            panic!("a's lapsed attempt counts")
        };
        let b = Claims {
            lost_attempts: 1,
            ..b
        };
        let (revision, _) = b.refresh("j", revision).await.unwrap().unwrap();
        assert_eq!(lost(&states), Some(1));
        assert!(b.release("j", revision).await.unwrap());
        assert_eq!(lost(&states), Some(1));
        // Released: the next claim counts nothing new.
        let c = claims(&states, "c", 62_000);
        assert!(matches!(
            c.claim("j").await.unwrap(),
            ClaimOutcome::Claimed {
                lost_attempts: 1,
                ..
            }
        ));
        // A worker restarted finds its own running record: its attempt was lost too.
        let c_again = claims(&states, "c", 63_000);
        assert!(matches!(
            c_again.claim("j").await.unwrap(),
            ClaimOutcome::Claimed {
                lost_attempts: 2,
                ..
            }
        ));
        assert_eq!(lost(&states), Some(2));
    }
}
