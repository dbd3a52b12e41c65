//! Fakes of the queue ports.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;

use crate::job::{DeadLetter, JobEvent, JobResult, Kind};
use crate::ports::Settle;
use crate::ports::{
    CancelRequests, Conflict, Delivery, DeliveryHandle, EventBus, EventSink, JobQueue, JobStates,
    QueueError, ResultSink,
};

/// How a message left the queue (or was put back), in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settled {
    pub job_id: String,
    pub attempt: u32,
    pub settle: Settle,
}

struct Message {
    seq: u64,
    kind: Kind,
    job_id: String,
    payload: Bytes,
    deliveries: u32,
    /// Not deliverable before this instant (nak delay, or in flight until ack_wait).
    available_at: Instant,
    /// The delivery number currently in flight, if any.
    in_flight: Option<u32>,
    done: bool,
}

struct QueueState {
    messages: Vec<Message>,
    next_seq: u64,
    settled: Vec<Settled>,
    /// Message ids seen, for the duplicate window.
    seen_ids: HashMap<String, u64>,
}

/// A work queue with JetStream's delivery semantics: one consumer per kind, redelivery after
/// `ack_wait` unless in-progress acked, nak with delay, term, `max_deliver`, and de-duplication
/// of publishes by job id.
#[derive(Clone)]
pub struct MemQueue {
    state: Arc<Mutex<QueueState>>,
    notify: Arc<Notify>,
    pub ack_wait: Duration,
    pub max_deliver: u32,
}

impl MemQueue {
    pub fn new(ack_wait: Duration, max_deliver: u32) -> Self {
        MemQueue {
            state: Arc::new(Mutex::new(QueueState {
                messages: Vec::new(),
                next_seq: 1,
                settled: Vec::new(),
                seen_ids: HashMap::new(),
            })),
            notify: Arc::new(Notify::new()),
            ack_wait,
            max_deliver,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Publishes a job; a second publish of the same id while it is queued is dropped (the
    /// duplicate window). Returns false for a dropped duplicate.
    pub fn publish(&self, kind: Kind, job_id: &str, payload: impl Into<Bytes>) -> bool {
        let mut st = self.lock();
        let live = st
            .seen_ids
            .get(job_id)
            .is_some_and(|seq| st.messages.iter().any(|m| m.seq == *seq && !m.done));
        if live {
            return false;
        }
        let seq = st.next_seq;
        st.next_seq += 1;
        st.seen_ids.insert(job_id.to_owned(), seq);
        st.messages.push(Message {
            seq,
            kind,
            job_id: job_id.to_owned(),
            payload: payload.into(),
            deliveries: 0,
            available_at: Instant::now(),
            in_flight: None,
            done: false,
        });
        drop(st);
        self.notify.notify_waiters();
        true
    }

    pub fn settled(&self) -> Vec<Settled> {
        self.lock().settled.clone()
    }

    /// Messages not yet acked or termed.
    pub fn pending(&self) -> usize {
        self.lock().messages.iter().filter(|m| !m.done).count()
    }

    fn try_take(&self, kind: Kind) -> Result<Option<Delivery>, Option<Instant>> {
        let now = Instant::now();
        let mut st = self.lock();
        let max = self.max_deliver;
        let mut next_wake: Option<Instant> = None;
        let found = st.messages.iter_mut().find(|m| {
            if m.done || m.kind != kind || m.deliveries >= max {
                return false;
            }
            if m.available_at > now {
                next_wake = Some(next_wake.map_or(m.available_at, |w| w.min(m.available_at)));
                return false;
            }
            true
        });
        let Some(m) = found else {
            return Err(next_wake);
        };
        m.deliveries += 1;
        m.in_flight = Some(m.deliveries);
        m.available_at = now + self.ack_wait;
        let delivery = Delivery {
            kind,
            subject_job_id: m.job_id.clone(),
            payload: m.payload.clone(),
            attempt: m.deliveries,
            handle: Arc::new(MemDelivery {
                queue: self.clone(),
                seq: m.seq,
                delivery: m.deliveries,
            }),
        };
        Ok(Some(delivery))
    }
}

#[async_trait]
impl JobQueue for MemQueue {
    async fn pull(&self, kind: Kind, wait: Duration) -> Result<Option<Delivery>, QueueError> {
        let deadline = Instant::now() + wait;
        loop {
            let notified = self.notify.notified();
            let wake = match self.try_take(kind) {
                Ok(delivery) => return Ok(delivery),
                Err(wake) => wake,
            };
            let until = wake.map_or(deadline, |w| w.min(deadline));
            if Instant::now() >= deadline {
                return Ok(None);
            }
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep_until(until) => {}
            }
        }
    }
}

struct MemDelivery {
    queue: MemQueue,
    seq: u64,
    delivery: u32,
}

#[async_trait]
impl DeliveryHandle for MemDelivery {
    async fn in_progress(&self) -> Result<(), QueueError> {
        let mut st = self.queue.lock();
        if let Some(m) = st.messages.iter_mut().find(|m| m.seq == self.seq) {
            if m.in_flight == Some(self.delivery) {
                m.available_at = Instant::now() + self.queue.ack_wait;
            }
        }
        Ok(())
    }

    async fn settle(&self, settle: Settle) -> Result<(), QueueError> {
        let mut st = self.queue.lock();
        let Some(m) = st.messages.iter_mut().find(|m| m.seq == self.seq) else {
            return Ok(());
        };
        if m.done {
            return Ok(());
        }
        let job_id = m.job_id.clone();
        match settle {
            // Acks and terms of any delivery settle the message, as JetStream does.
            Settle::Ack | Settle::Term => m.done = true,
            Settle::Nak { delay } => {
                if m.in_flight == Some(self.delivery) {
                    m.in_flight = None;
                    m.available_at = Instant::now() + delay;
                }
            }
        }
        st.settled.push(Settled {
            job_id,
            attempt: self.delivery,
            settle,
        });
        drop(st);
        self.queue.notify.notify_waiters();
        Ok(())
    }
}

/// Last revision, and key → (value, revision).
type Revisions = (u64, HashMap<String, (Bytes, u64)>);

/// A key-value store with revisions and compare-and-set.
#[derive(Clone, Default)]
pub struct MemStates {
    inner: Arc<Mutex<Revisions>>,
}

impl MemStates {
    pub fn new() -> Self {
        Self::default()
    }

    /// The record of a job as JSON, for assertions.
    pub fn record(&self, job_id: &str) -> Option<serde_json::Value> {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner
            .1
            .get(job_id)
            .and_then(|(b, _)| serde_json::from_slice(b).ok())
    }
}

#[async_trait]
impl JobStates for MemStates {
    async fn get(&self, job_id: &str) -> Result<Option<(Bytes, u64)>, QueueError> {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        Ok(inner.1.get(job_id).cloned())
    }

    async fn create(
        &self,
        job_id: &str,
        value: Bytes,
    ) -> Result<Result<u64, Conflict>, QueueError> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if inner.1.contains_key(job_id) {
            return Ok(Err(Conflict));
        }
        inner.0 += 1;
        let rev = inner.0;
        inner.1.insert(job_id.to_owned(), (value, rev));
        Ok(Ok(rev))
    }

    async fn update(
        &self,
        job_id: &str,
        value: Bytes,
        revision: u64,
    ) -> Result<Result<u64, Conflict>, QueueError> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        match inner.1.get(job_id) {
            Some((_, current)) if *current == revision => {}
            _ => return Ok(Err(Conflict)),
        }
        inner.0 += 1;
        let rev = inner.0;
        inner.1.insert(job_id.to_owned(), (value, rev));
        Ok(Ok(rev))
    }
}

/// Published results, in order, with a way to wait for them.
#[derive(Clone, Default)]
pub struct MemResults {
    results: Arc<Mutex<Vec<JobResult>>>,
    dead_letters: Arc<Mutex<Vec<DeadLetter>>>,
    notify: Arc<Notify>,
    /// While set, publishing fails (a message system that is down).
    pub failing: Arc<std::sync::atomic::AtomicBool>,
}

impl MemResults {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn all(&self) -> Vec<JobResult> {
        self.results
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Every dead letter, in order.
    pub fn dead_letters(&self) -> Vec<DeadLetter> {
        self.dead_letters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn for_job(&self, job_id: &str) -> Vec<JobResult> {
        self.all()
            .into_iter()
            .filter(|r| r.job_id == job_id)
            .collect()
    }

    /// Waits until at least `n` results were published.
    pub async fn wait_for(&self, n: usize) -> Vec<JobResult> {
        loop {
            let notified = self.notify.notified();
            let all = self.all();
            if all.len() >= n {
                return all;
            }
            notified.await;
        }
    }
}

#[async_trait]
impl ResultSink for MemResults {
    async fn publish(&self, result: &JobResult) -> Result<(), QueueError> {
        if self.failing.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(QueueError::new("publish result", "no responders"));
        }
        self.results
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(result.clone());
        self.notify.notify_waiters();
        Ok(())
    }

    async fn dead_letter(&self, letter: &DeadLetter) -> Result<(), QueueError> {
        if self.failing.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(QueueError::new("publish dead letter", "no responders"));
        }
        self.dead_letters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(letter.clone());
        Ok(())
    }
}

/// Every event emitted, with its job id and attempt.
#[derive(Clone, Default)]
pub struct MemEvents {
    events: Arc<Mutex<Vec<(String, u32, JobEvent)>>>,
}

impl MemEvents {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn for_job(&self, job_id: &str) -> Vec<JobEvent> {
        self.events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(id, _, _)| id == job_id)
            .map(|(_, _, e)| e.clone())
            .collect()
    }
}

struct MemSink {
    job_id: String,
    attempt: u32,
    events: Arc<Mutex<Vec<(String, u32, JobEvent)>>>,
}

impl EventSink for MemSink {
    fn emit(&self, event: JobEvent) {
        self.events.lock().unwrap_or_else(|e| e.into_inner()).push((
            self.job_id.clone(),
            self.attempt,
            event,
        ));
    }
}

impl EventBus for MemEvents {
    fn sink(&self, job_id: &str, attempt: u32) -> Arc<dyn EventSink> {
        Arc::new(MemSink {
            job_id: job_id.to_owned(),
            attempt,
            events: Arc::clone(&self.events),
        })
    }
}

/// Cancel requests sent by the test.
#[derive(Clone)]
pub struct MemCancels {
    tx: Arc<Mutex<Vec<mpsc::Sender<String>>>>,
}

impl Default for MemCancels {
    fn default() -> Self {
        MemCancels {
            tx: Arc::new(Mutex::new(Vec::new())),
        }
    }
}

impl MemCancels {
    pub fn new() -> Self {
        Self::default()
    }

    /// Sends a cancel request to every subscribed worker (core NATS semantics: only those
    /// subscribed now hear it).
    pub async fn cancel(&self, job_id: &str) {
        let senders: Vec<_> = self.tx.lock().unwrap_or_else(|e| e.into_inner()).clone();
        for tx in senders {
            let _ = tx.send(job_id.to_owned()).await;
        }
    }
}

#[async_trait]
impl CancelRequests for MemCancels {
    async fn subscribe(&self) -> Result<mpsc::Receiver<String>, QueueError> {
        let (tx, rx) = mpsc::channel(64);
        self.tx.lock().unwrap_or_else(|e| e.into_inner()).push(tx);
        Ok(rx)
    }
}
