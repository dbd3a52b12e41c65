//! The work queue, the job state store, results, events and cancel requests: what the worker
//! needs from its message system. `adapters/nats.rs` implements these with JetStream and KV;
//! `testing/` with in-memory fakes.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::mpsc;

use super::EventSink;
use crate::job::{DeadLetter, JobResult, Kind};

/// A failure talking to the message system. All are worth retrying: the worker logs them,
/// and the queue's redelivery covers what was not settled.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{operation}: {message}")]
pub struct QueueError {
    pub operation: &'static str,
    pub message: String,
}

impl QueueError {
    pub fn new(operation: &'static str, message: impl ToString) -> Self {
        QueueError {
            operation,
            message: message.to_string(),
        }
    }
}

/// How a queue message is settled: the queue's own vocabulary, spoken by the worker's
/// disposition and by the queue adapters only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settle {
    /// Done; the message leaves the queue (a double ack, awaited).
    Ack,
    /// Redeliver after `delay` (zero: at once, to another worker).
    Nak { delay: Duration },
    /// Never redeliver.
    Term,
}

/// One delivery of one job message.
pub struct Delivery {
    pub kind: Kind,
    /// The job id named by the subject (`<prefix>.jobs.<kind>.<job_id>`), known even when the
    /// payload does not decode.
    pub subject_job_id: String,
    pub payload: Bytes,
    /// 1-based delivery count: the attempt number.
    pub attempt: u32,
    pub handle: Arc<dyn DeliveryHandle>,
}

#[async_trait]
pub trait DeliveryHandle: Send + Sync {
    /// Tells the queue the job is still being worked on (resets the redelivery timer).
    async fn in_progress(&self) -> Result<(), QueueError>;
    /// Settles the delivery; `Ack` waits for the server's confirmation.
    async fn settle(&self, settle: Settle) -> Result<(), QueueError>;
}

#[async_trait]
pub trait JobQueue: Send + Sync {
    /// Waits at most `wait` for one message of `kind`. Pulls exactly one message: the worker
    /// calls this only while it holds a free slot.
    async fn pull(&self, kind: Kind, wait: Duration) -> Result<Option<Delivery>, QueueError>;
}

/// A compare-and-set conflict: someone else wrote the key since the revision we read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conflict;

/// The per-job state records (claims, leases, cancel marks, terminal results).
#[async_trait]
pub trait JobStates: Send + Sync {
    /// The record and its revision.
    async fn get(&self, job_id: &str) -> Result<Option<(Bytes, u64)>, QueueError>;
    /// Creates the record if there is none.
    async fn create(&self, job_id: &str, value: Bytes)
        -> Result<Result<u64, Conflict>, QueueError>;
    /// Replaces the record if it is still at `revision`.
    async fn update(
        &self,
        job_id: &str,
        value: Bytes,
        revision: u64,
    ) -> Result<Result<u64, Conflict>, QueueError>;
}

#[async_trait]
pub trait ResultSink: Send + Sync {
    /// Publishes the result and waits until the server has stored it. Publishing the same
    /// job's result twice is harmless (deduplicated by job id).
    async fn publish(&self, result: &JobResult) -> Result<(), QueueError>;

    /// Copies a job the worker gave up on without running it to the dead-letter stream and
    /// waits until the server has stored it (deduplicated by job id, like results).
    async fn dead_letter(&self, letter: &DeadLetter) -> Result<(), QueueError>;
}

/// Creates the event sink of one attempt of one job.
pub trait EventBus: Send + Sync {
    fn sink(&self, job_id: &str, attempt: u32) -> Arc<dyn EventSink>;
}

#[async_trait]
pub trait CancelRequests: Send + Sync {
    /// A channel of job ids whose cancellation was requested, for as long as the worker runs.
    async fn subscribe(&self) -> Result<mpsc::Receiver<String>, QueueError>;
}
