//! NATS JetStream: the work queue, the job state bucket, results, events and cancel requests
//! (ARCHITECTURE §4, §10). Only this module and `pipeline/disposition.rs` speak JetStream's words.
//!
//! Facts this module is built on (Debian's nats-server 2.9.10):
//! * `create_key_value()` fails against 2.9.10, so the bucket's backing stream `KV_<BUCKET>` is
//!   created directly and then opened with `get_key_value()`.
//! * No idle heartbeat on pulls (a job published mid-pull could be missed until `ack_wait`).
//! * No consumer `backoff` array (it overrides `ack_wait` and skews nak delays): the worker
//!   chooses each nak delay.
//! * Several server URLs are passed as a list.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer, kv, stream, AckKind};
use async_nats::{Client, HeaderMap, ServerAddr};
use async_trait::async_trait;
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::config::{NatsAuth, NatsConfig};
use crate::job::{DeadLetter, EventEnvelope, JobEvent, JobResult, Kind, WIRE_VERSION};
use crate::ports::Settle;
use crate::ports::{
    CancelRequests, Conflict, Delivery, DeliveryHandle, EventBus, EventSink, JobQueue, JobStates,
    QueueError, ResultSink,
};

/// Deliveries per message; the worker's retry budget (`worker.max_attempts`) stays below it.
pub const MAX_DELIVER: i64 = 5;
/// Unacknowledged deliveries per consumer across the fleet.
pub const MAX_ACK_PENDING: i64 = 1024;
const JOBS_MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);
const STATE_MAX_AGE: Duration = Duration::from_secs(8 * 24 * 3600);
const RESULTS_MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);
const EVENTS_MAX_AGE: Duration = Duration::from_secs(24 * 3600);
const EVENTS_MAX_BYTES: i64 = 1024 * 1024 * 1024;
const DUPLICATE_WINDOW: Duration = Duration::from_secs(600);
const STATE_HISTORY: i64 = 5;
/// Events buffered per worker before new ones are dropped (events are for watching).
const EVENT_BUFFER: usize = 4096;

/// The names of every asset, derived from the configured prefix.
#[derive(Debug, Clone)]
pub struct Names {
    pub prefix: String,
    pub jobs_stream: String,
    pub state_bucket: String,
    pub results_stream: String,
    pub events_stream: String,
    pub dlq_stream: String,
}

impl Names {
    pub fn new(prefix: &str) -> Self {
        let upper = prefix.to_ascii_uppercase().replace('-', "_");
        Names {
            prefix: prefix.to_owned(),
            jobs_stream: format!("{upper}_JOBS"),
            state_bucket: format!("{upper}_STATE"),
            results_stream: format!("{upper}_RESULTS"),
            events_stream: format!("{upper}_EVENTS"),
            dlq_stream: format!("{upper}_DLQ"),
        }
    }

    pub fn job_subject(&self, kind: Kind, job_id: &str) -> String {
        format!("{}.jobs.{kind}.{job_id}", self.prefix)
    }

    pub fn consumer(&self, kind: Kind) -> String {
        format!("{}-{kind}", self.prefix)
    }

    pub fn result_subject(&self, job_id: &str) -> String {
        format!("{}.results.{job_id}", self.prefix)
    }

    /// Where a worker copies a job it gave up on (`poison`), in the DLQ stream.
    pub fn dead_letter_subject(&self, job_id: &str) -> String {
        format!("{}.dlq.{job_id}", self.prefix)
    }

    pub fn event_subject(&self, job_id: &str) -> String {
        format!("{}.events.{job_id}", self.prefix)
    }

    pub fn cancel_subject(&self, job_id: &str) -> String {
        format!("{}.cancel.{job_id}", self.prefix)
    }

    pub fn state_key(job_id: &str) -> String {
        format!("job.{job_id}")
    }
}

/// Connection state, for readiness and logs.
#[derive(Debug, Default)]
pub struct ConnectionState {
    pub connected: AtomicBool,
    /// Times the connection was lost.
    pub disconnects: AtomicU64,
}

/// Connects with the configured servers, auth and TLS. Auth secrets are read from their files
/// here and handed to the client; they are never logged.
/// `wait_for_server`: keep trying until a server answers (a daemon starting before NATS);
/// otherwise fail after `connect_timeout` (a command line tool).
pub async fn connect(
    config: &NatsConfig,
    name: &str,
    state: Arc<ConnectionState>,
    wait_for_server: bool,
) -> Result<Client, QueueError> {
    let read = |path: &Path| {
        std::fs::read_to_string(path)
            .map(|s| s.trim().to_owned())
            .map_err(|e| {
                QueueError::new("read NATS credentials", format!("{}: {e}", path.display()))
            })
    };
    let mut options = match &config.auth {
        NatsAuth::None => async_nats::ConnectOptions::new(),
        NatsAuth::CredentialsFile(path) => async_nats::ConnectOptions::with_credentials_file(path)
            .await
            .map_err(|e| {
                QueueError::new("read NATS credentials", format!("{}: {e}", path.display()))
            })?,
        NatsAuth::NkeySeedFile(path) => async_nats::ConnectOptions::with_nkey(read(path)?),
        NatsAuth::TokenFile(path) => async_nats::ConnectOptions::with_token(read(path)?),
        NatsAuth::UserPassword {
            user,
            password_file,
        } => async_nats::ConnectOptions::with_user_and_password(user.clone(), read(password_file)?),
    };
    if let Some(ca) = &config.tls_ca_file {
        options = options.add_root_certificates(ca.clone()).require_tls(true);
    }
    let event_state = Arc::clone(&state);
    options = options
        .name(format!("factoryd/{name}"))
        .connection_timeout(config.connect_timeout)
        .max_reconnects(None::<usize>)
        .event_callback(move |event| {
            let state = Arc::clone(&event_state);
            async move {
                // async-nats reports each state change once (not each attempt): log those.
                match event {
                    async_nats::Event::Connected => {
                        let was_connected = state.connected.swap(true, Ordering::Relaxed);
                        // A connection after a lost one is a reconnect; the first one is not.
                        if !was_connected && state.disconnects.load(Ordering::Relaxed) > 0 {
                            crate::telemetry::metrics().nats_reconnects.inc();
                            info!("Connected to NATS again.");
                        }
                    }
                    async_nats::Event::Disconnected => {
                        state.connected.store(false, Ordering::Relaxed);
                        state.disconnects.fetch_add(1, Ordering::Relaxed);
                        warn!("Disconnected from NATS; reconnecting.");
                    }
                    async_nats::Event::LameDuckMode => {
                        info!("NATS server entered lame duck mode.")
                    }
                    other => debug!(event = %other, "NATS client event."),
                }
            }
        });
    if wait_for_server {
        options = options.retry_on_initial_connect();
    }
    let servers: Vec<ServerAddr> = config
        .servers
        .iter()
        .map(|u| u.as_str().parse::<ServerAddr>())
        .collect::<Result<_, _>>()
        .map_err(|e| QueueError::new("parse NATS server address", e))?;
    let client = options
        .connect(servers)
        .await
        .map_err(|e| QueueError::new("connect to NATS", e))?;
    state.connected.store(true, Ordering::Relaxed);
    Ok(client)
}

/// Creates the streams, consumers and bucket when missing; reports settings that differ.
pub async fn ensure_topology(
    js: &jetstream::Context,
    names: &Names,
    replicas: usize,
    ack_wait: Duration,
) -> Result<kv::Store, QueueError> {
    let p = &names.prefix;
    let mut mismatches = Vec::new();

    // Every stream is file-backed with the topology's replicas, and keeps messages up to its
    // limits unless it says otherwise; the rest is per stream.
    let file_stream = |name: String, subjects: Vec<String>| stream::Config {
        name,
        subjects,
        retention: stream::RetentionPolicy::Limits,
        storage: stream::StorageType::File,
        num_replicas: replicas,
        ..Default::default()
    };

    let jobs_config = stream::Config {
        retention: stream::RetentionPolicy::WorkQueue,
        discard: stream::DiscardPolicy::New,
        max_age: JOBS_MAX_AGE,
        duplicate_window: DUPLICATE_WINDOW,
        max_messages_per_subject: -1,
        ..file_stream(names.jobs_stream.clone(), vec![format!("{p}.jobs.>")])
    };
    let jobs = ensure_stream(js, jobs_config, &mut mismatches).await?;
    for kind in Kind::ALL {
        ensure_consumer(&jobs, names, kind, ack_wait, &mut mismatches).await?;
    }

    let state = stream::Config {
        discard: stream::DiscardPolicy::New,
        max_messages_per_subject: STATE_HISTORY,
        max_age: STATE_MAX_AGE,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        ..file_stream(
            format!("KV_{}", names.state_bucket),
            vec![format!("$KV.{}.>", names.state_bucket)],
        )
    };
    let results = stream::Config {
        max_messages_per_subject: 1,
        max_age: RESULTS_MAX_AGE,
        duplicate_window: DUPLICATE_WINDOW,
        ..file_stream(names.results_stream.clone(), vec![format!("{p}.results.>")])
    };
    let events = stream::Config {
        discard: stream::DiscardPolicy::Old,
        max_age: EVENTS_MAX_AGE,
        max_bytes: EVENTS_MAX_BYTES,
        max_messages_per_subject: -1,
        ..file_stream(names.events_stream.clone(), vec![format!("{p}.events.>")])
    };
    // Jobs that ran out of deliveries without a worker's own result (should stay empty: the
    // worker's retry budget is below max_deliver), and jobs a worker gave up on without running
    // them (`poison`, on `<prefix>.dlq.<job_id>`). Terminations are not captured: every term
    // comes with a published result.
    let dlq_subjects = vec![
        format!(
            "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{}.*",
            names.jobs_stream
        ),
        names.dead_letter_subject("*"),
    ];
    let dlq = stream::Config {
        max_age: JOBS_MAX_AGE,
        max_messages_per_subject: -1,
        ..file_stream(names.dlq_stream.clone(), dlq_subjects)
    };
    for config in [state, results, events, dlq] {
        ensure_stream(js, config, &mut mismatches).await?;
    }

    if !mismatches.is_empty() {
        return Err(QueueError::new(
            "check JetStream assets",
            format!(
                "existing assets differ from what this worker needs (fix or remove them): {}",
                mismatches.join("; ")
            ),
        ));
    }
    js.get_key_value(names.state_bucket.clone())
        .await
        .map_err(|e| QueueError::new("open the job state bucket", e))
}

async fn ensure_stream(
    js: &jetstream::Context,
    want: stream::Config,
    mismatches: &mut Vec<String>,
) -> Result<stream::Stream, QueueError> {
    let name = want.name.clone();
    let created = match js.get_stream(&name).await {
        Ok(existing) => return check_stream(js, existing, &want, mismatches).await,
        Err(e)
            if matches!(
                e.kind(),
                jetstream::context::GetStreamErrorKind::JetStream(ref je)
                    if je.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
            ) =>
        {
            js.create_stream(want.clone()).await
        }
        Err(e) => return Err(QueueError::new("look up stream", e)),
    };
    match created {
        Ok(created) => {
            info!(stream = %name, "Created stream.");
            Ok(created)
        }
        // Workers starting together all find the stream missing; the server refuses every
        // create but the first ("subjects overlap", "name already in use"). The stream is
        // there now: check it like any existing one.
        Err(create_error) => match js.get_stream(&name).await {
            Ok(existing) => check_stream(js, existing, &want, mismatches).await,
            Err(_) => Err(QueueError::new(
                "create stream",
                format!("{name}: {create_error}"),
            )),
        },
    }
}

/// Notes in `mismatches` where an existing stream differs from what this worker needs. A
/// stream an older worker made with fewer subjects (the DLQ before `<prefix>.dlq.*`) gets the
/// missing ones added: that changes nothing for what it already holds or for older workers.
async fn check_stream(
    js: &jetstream::Context,
    mut existing: stream::Stream,
    want: &stream::Config,
    mismatches: &mut Vec<String>,
) -> Result<stream::Stream, QueueError> {
    let mut have = existing
        .info()
        .await
        .map_err(|e| QueueError::new("read stream info", e))?
        .config
        .clone();
    let missing: Vec<&String> = want
        .subjects
        .iter()
        .filter(|s| !have.subjects.contains(s))
        .collect();
    if !missing.is_empty() && have.subjects.iter().all(|s| want.subjects.contains(s)) {
        let mut updated = have.clone();
        updated.subjects = want.subjects.clone();
        js.update_stream(&updated)
            .await
            .map_err(|e| QueueError::new("add subjects to stream", e))?;
        info!(stream = %want.name, added = ?missing, "Added subjects to stream.");
        have = updated;
    }
    let mut compared = vec![
        (
            "subjects",
            format!("{:?}", have.subjects),
            format!("{:?}", want.subjects),
        ),
        (
            "retention",
            format!("{:?}", have.retention),
            format!("{:?}", want.retention),
        ),
        (
            "storage",
            format!("{:?}", have.storage),
            format!("{:?}", want.storage),
        ),
        (
            "replicas",
            have.num_replicas.to_string(),
            want.num_replicas.to_string(),
        ),
        (
            "max messages per subject",
            have.max_messages_per_subject.to_string(),
            want.max_messages_per_subject.to_string(),
        ),
    ];
    if want.duplicate_window > Duration::ZERO {
        compared.push((
            "duplicate window",
            format!("{:?}", have.duplicate_window),
            format!("{:?}", want.duplicate_window),
        ));
    }
    for (what, have, expected) in compared {
        if have != expected {
            mismatches.push(format!(
                "stream {} has {what} {have}, expected {expected}",
                want.name
            ));
        }
    }
    Ok(existing)
}

fn consumer_config(names: &Names, kind: Kind, ack_wait: Duration) -> consumer::pull::Config {
    consumer::pull::Config {
        durable_name: Some(names.consumer(kind)),
        filter_subject: format!("{}.jobs.{kind}.>", names.prefix),
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait,
        max_deliver: MAX_DELIVER,
        max_ack_pending: MAX_ACK_PENDING,
        deliver_policy: consumer::DeliverPolicy::All,
        ..Default::default()
    }
}

async fn ensure_consumer(
    jobs: &stream::Stream,
    names: &Names,
    kind: Kind,
    ack_wait: Duration,
    mismatches: &mut Vec<String>,
) -> Result<(), QueueError> {
    let want = consumer_config(names, kind, ack_wait);
    let name = names.consumer(kind);
    let existing = match jobs.get_consumer::<consumer::pull::Config>(&name).await {
        Ok(existing) => existing,
        Err(_) => match jobs.create_consumer(want.clone()).await {
            Ok(_) => {
                info!(consumer = %name, "Created consumer.");
                return Ok(());
            }
            // Another worker starting at the same time may have created it first.
            Err(create_error) => jobs
                .get_consumer::<consumer::pull::Config>(&name)
                .await
                .map_err(|_| {
                    QueueError::new("create consumer", format!("{name}: {create_error}"))
                })?,
        },
    };
    check_consumer(existing, &want, mismatches).await
}

/// Notes in `mismatches` where an existing consumer differs from what this worker needs.
async fn check_consumer(
    mut existing: consumer::PullConsumer,
    want: &consumer::pull::Config,
    mismatches: &mut Vec<String>,
) -> Result<(), QueueError> {
    let have = existing
        .info()
        .await
        .map_err(|e| QueueError::new("read consumer info", e))?
        .config
        .clone();
    if have.filter_subject != want.filter_subject
        || have.ack_wait != want.ack_wait
        || have.max_deliver != want.max_deliver
        || !have.backoff.is_empty()
    {
        mismatches.push(format!(
            "consumer {} has filter {:?}, ack_wait {:?}, max_deliver {}, backoff {:?}; \
             expected {:?}, {:?}, {}, none",
            want.durable_name.as_deref().unwrap_or_default(),
            have.filter_subject,
            have.ack_wait,
            have.max_deliver,
            have.backoff,
            want.filter_subject,
            want.ack_wait,
            want.max_deliver
        ));
    }
    Ok(())
}

/// The NATS side of the worker: every queue port.
#[derive(Clone)]
pub struct Nats {
    pub client: Client,
    pub js: jetstream::Context,
    pub names: Arc<Names>,
    pub kv: kv::Store,
    consumers: Arc<[(Kind, consumer::PullConsumer)]>,
    events: mpsc::Sender<(String, Bytes)>,
    pub events_dropped: Arc<AtomicU64>,
}

impl Nats {
    /// Ensures the topology and opens the consumers. Starts the event publisher task.
    pub async fn open(client: Client, config: &NatsConfig) -> Result<Self, QueueError> {
        let js = jetstream::new(client.clone());
        let names = Names::new(&config.prefix);
        let kv = ensure_topology(&js, &names, config.replicas as usize, config.ack_wait).await?;
        let jobs = js
            .get_stream(&names.jobs_stream)
            .await
            .map_err(|e| QueueError::new("open the jobs stream", e))?;
        let mut consumers = Vec::new();
        for kind in Kind::ALL {
            let c = jobs
                .get_consumer::<consumer::pull::Config>(&names.consumer(kind))
                .await
                .map_err(|e| QueueError::new("open consumer", e))?;
            consumers.push((kind, c));
        }
        let (tx, rx) = mpsc::channel(EVENT_BUFFER);
        tokio::spawn(publish_events(client.clone(), rx));
        Ok(Nats {
            client,
            js,
            names: Arc::new(names),
            kv,
            consumers: consumers.into(),
            events: tx,
            events_dropped: Arc::new(AtomicU64::new(0)),
        })
    }

    /// Publishes a job; `Ok(false)` when the server dropped it as a duplicate of a job published
    /// within the duplicate window.
    pub async fn publish_job(
        &self,
        kind: Kind,
        job_id: &str,
        payload: Bytes,
    ) -> Result<bool, QueueError> {
        let mut headers = HeaderMap::new();
        headers.insert(async_nats::header::NATS_MESSAGE_ID, job_id);
        let ack = self
            .js
            .publish_with_headers(self.names.job_subject(kind, job_id), headers, payload)
            .await
            .map_err(|e| QueueError::new("publish job", e))?
            .await
            .map_err(|e| QueueError::new("publish job", e))?;
        Ok(!ack.duplicate)
    }

    /// Sends a cancel request: the mark in the job's record (wins even before the job starts)
    /// and the core message (reaches a running job at once). `Ok(false)` if the job had ended.
    pub async fn cancel(&self, job_id: &str) -> Result<bool, QueueError> {
        let marked = crate::worker::claim::mark_cancelled(self, job_id).await?;
        self.client
            .publish(self.names.cancel_subject(job_id), Bytes::new())
            .await
            .map_err(|e| QueueError::new("publish cancel", e))?;
        self.client
            .flush()
            .await
            .map_err(|e| QueueError::new("publish cancel", e))?;
        Ok(marked)
    }

    /// An ordered consumer over a stream's subject, from `deliver`.
    pub async fn follow(
        &self,
        stream_name: &str,
        subject: String,
        deliver: consumer::DeliverPolicy,
    ) -> Result<consumer::pull::Ordered, QueueError> {
        let stream = self
            .js
            .get_stream(stream_name)
            .await
            .map_err(|e| QueueError::new("open stream", e))?;
        let consumer = stream
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: subject,
                deliver_policy: deliver,
                ..Default::default()
            })
            .await
            .map_err(|e| QueueError::new("follow", e))?;
        consumer
            .messages()
            .await
            .map_err(|e| QueueError::new("follow", e))
    }
}

async fn publish_events(client: Client, mut rx: mpsc::Receiver<(String, Bytes)>) {
    while let Some((subject, payload)) = rx.recv().await {
        if let Err(e) = client.publish(subject, payload).await {
            debug!(error = %e, "Cannot publish an event.");
        }
    }
}

#[async_trait]
impl JobQueue for Nats {
    async fn pull(&self, kind: Kind, wait: Duration) -> Result<Option<Delivery>, QueueError> {
        let Some((_, consumer)) = self.consumers.iter().find(|(k, _)| *k == kind) else {
            return Ok(None);
        };
        let mut batch = consumer
            .batch()
            .max_messages(1)
            .expires(wait)
            .messages()
            .await
            .map_err(|e| QueueError::new("pull", e))?;
        let message = match batch.next().await {
            None => return Ok(None),
            Some(Err(e)) => return Err(QueueError::new("pull", e)),
            Some(Ok(m)) => m,
        };
        let attempt = message
            .info()
            .map(|i| i.delivered.max(1) as u32)
            .map_err(|e| QueueError::new("read delivery info", e))?;
        let subject_job_id = message
            .subject
            .as_str()
            .rsplit('.')
            .next()
            .unwrap_or_default()
            .to_owned();
        let payload = message.payload.clone();
        Ok(Some(Delivery {
            kind,
            subject_job_id,
            payload,
            attempt,
            handle: Arc::new(NatsDelivery { message }),
        }))
    }
}

struct NatsDelivery {
    message: jetstream::Message,
}

#[async_trait]
impl DeliveryHandle for NatsDelivery {
    async fn in_progress(&self) -> Result<(), QueueError> {
        self.message
            .ack_with(AckKind::Progress)
            .await
            .map_err(|e| QueueError::new("in-progress ack", e))
    }

    async fn settle(&self, settle: Settle) -> Result<(), QueueError> {
        let result = match settle {
            Settle::Ack => self.message.double_ack().await,
            Settle::Nak { delay } if delay.is_zero() => {
                self.message.ack_with(AckKind::Nak(None)).await
            }
            Settle::Nak { delay } => self.message.ack_with(AckKind::Nak(Some(delay))).await,
            Settle::Term => self.message.ack_with(AckKind::Term).await,
        };
        result.map_err(|e| QueueError::new("settle", e))
    }
}

#[async_trait]
impl JobStates for Nats {
    async fn get(&self, job_id: &str) -> Result<Option<(Bytes, u64)>, QueueError> {
        match self.kv.entry(Names::state_key(job_id)).await {
            Ok(Some(entry)) if entry.operation == kv::Operation::Put => {
                Ok(Some((entry.value, entry.revision)))
            }
            Ok(_) => Ok(None),
            Err(e) => Err(QueueError::new("read job state", e)),
        }
    }

    async fn create(
        &self,
        job_id: &str,
        value: Bytes,
    ) -> Result<Result<u64, Conflict>, QueueError> {
        match self.kv.create(Names::state_key(job_id), value).await {
            Ok(rev) => Ok(Ok(rev)),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(Err(Conflict)),
            Err(e) => Err(QueueError::new("create job state", e)),
        }
    }

    async fn update(
        &self,
        job_id: &str,
        value: Bytes,
        revision: u64,
    ) -> Result<Result<u64, Conflict>, QueueError> {
        match self
            .kv
            .update(Names::state_key(job_id), value, revision)
            .await
        {
            Ok(rev) => Ok(Ok(rev)),
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => Ok(Err(Conflict)),
            Err(e) => Err(QueueError::new("update job state", e)),
        }
    }
}

#[async_trait]
impl ResultSink for Nats {
    async fn publish(&self, result: &JobResult) -> Result<(), QueueError> {
        let payload =
            serde_json::to_vec(result).map_err(|e| QueueError::new("encode result", e))?;
        let subject = self.names.result_subject(&result.job_id);
        let id = format!("result-{}", result.job_id);
        self.publish_stored("publish result", subject, &id, payload)
            .await
    }

    async fn dead_letter(&self, letter: &DeadLetter) -> Result<(), QueueError> {
        let payload =
            serde_json::to_vec(letter).map_err(|e| QueueError::new("encode dead letter", e))?;
        let subject = self.names.dead_letter_subject(&letter.job_id);
        let id = format!("dlq-{}", letter.job_id);
        self.publish_stored("publish dead letter", subject, &id, payload)
            .await
    }
}

impl Nats {
    /// Publishes `payload` on `subject` with `Nats-Msg-Id` = `id` and waits for the store.
    async fn publish_stored(
        &self,
        what: &'static str,
        subject: String,
        id: &str,
        payload: Vec<u8>,
    ) -> Result<(), QueueError> {
        let mut headers = HeaderMap::new();
        headers.insert(async_nats::header::NATS_MESSAGE_ID, id);
        self.js
            .publish_with_headers(subject, headers, payload.into())
            .await
            .map_err(|e| QueueError::new(what, e))?
            .await
            .map_err(|e| QueueError::new(what, e))?;
        Ok(())
    }
}

impl EventBus for Nats {
    fn sink(&self, job_id: &str, attempt: u32) -> Arc<dyn EventSink> {
        Arc::new(NatsEventSink {
            job_id: job_id.to_owned(),
            attempt,
            subject: self.names.event_subject(job_id),
            seq: AtomicU64::new(0),
            tx: self.events.clone(),
            dropped: Arc::clone(&self.events_dropped),
        })
    }
}

struct NatsEventSink {
    job_id: String,
    attempt: u32,
    subject: String,
    seq: AtomicU64,
    tx: mpsc::Sender<(String, Bytes)>,
    dropped: Arc<AtomicU64>,
}

impl EventSink for NatsEventSink {
    fn emit(&self, event: JobEvent) {
        let envelope = EventEnvelope {
            v: WIRE_VERSION,
            job_id: self.job_id.clone(),
            seq: self.seq.fetch_add(1, Ordering::Relaxed) + 1,
            attempt: self.attempt,
            at: crate::clock::Clock::now(&crate::clock::SystemClock),
            event,
        };
        let Ok(payload) = serde_json::to_vec(&envelope) else {
            return;
        };
        if self
            .tx
            .try_send((self.subject.clone(), payload.into()))
            .is_err()
        {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            crate::telemetry::metrics().events_dropped.inc();
        }
    }
}

#[async_trait]
impl CancelRequests for Nats {
    async fn subscribe(&self) -> Result<mpsc::Receiver<String>, QueueError> {
        let mut sub = self
            .client
            .subscribe(format!("{}.cancel.*", self.names.prefix))
            .await
            .map_err(|e| QueueError::new("subscribe to cancel requests", e))?;
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            while let Some(msg) = sub.next().await {
                let id = msg.subject.as_str().rsplit('.').next().unwrap_or_default();
                if tx.send(id.to_owned()).await.is_err() {
                    break;
                }
            }
        });
        Ok(rx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_prefix() {
        let n = Names::new("factory");
        assert_eq!(n.jobs_stream, "FACTORY_JOBS");
        assert_eq!(n.state_bucket, "FACTORY_STATE");
        assert_eq!(n.job_subject(Kind::Build, "j1"), "factory.jobs.build.j1");
        assert_eq!(n.consumer(Kind::Import), "factory-import");
        assert_eq!(n.result_subject("j1"), "factory.results.j1");
        assert_eq!(Names::state_key("j1"), "job.j1");
        assert_eq!(Names::new("ci-7").jobs_stream, "CI_7_JOBS");
    }
}
