//! Ports: the traits through which the pipeline reaches the outside world.
//!
//! Stages call these roles (`Fetcher`, `Builder`, `Importer`, `CredentialResolver`, the queue);
//! `adapters/` implements them with real technologies and `testing/` with in-memory fakes, and
//! `app.rs` chooses. A port's errors are already classified [`JobError`]s: adapters classify at
//! their boundary, so nothing here inspects messages.

pub mod builder;
pub mod importer;
pub mod queue;
pub mod source;

use std::path::PathBuf;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::job::{JobEvent, Redactor};
use crate::secret::Secret;

pub use builder::{BuildCache, BuildRequest, Builder, CachePrune};
pub use importer::{CredentialResolver, ImportRequest, Importer};
pub use queue::{
    CancelRequests, Conflict, Delivery, DeliveryHandle, EventBus, JobQueue, JobStates, QueueError,
    ResultSink, Settle,
};
pub use source::{ContextWriter, FetchedSource, Fetcher, SealedContext};

/// Receives a job's progress events. Emitting never blocks and never fails the job: a sink
/// that cannot keep up drops and counts.
pub trait EventSink: Send + Sync {
    fn emit(&self, event: JobEvent);
}

/// An event sink that drops everything (for `validate`-style uses and tests that do not look).
#[derive(Debug, Default, Clone, Copy)]
pub struct NoEvents;

impl EventSink for NoEvents {
    fn emit(&self, _event: JobEvent) {}
}

/// What every stage of one job attempt gets.
#[derive(Clone)]
pub struct StageContext {
    pub job_id: String,
    /// 1-based attempt number (the queue's delivery count).
    pub attempt: u32,
    /// Fires on a cancel request, the job's timeout, or the worker's shutdown. Stages must stop
    /// their *work* (kill the build, abort the transfer), not only stop waiting.
    pub cancel: CancellationToken,
    pub events: Arc<dyn EventSink>,
    /// Masks the job's credentials in any text that leaves the process. Shared by every stage
    /// of the attempt and by the worker's result and events: a stage that learns a credential
    /// (a webhook's answer, a token) adds it here before using it.
    pub redactor: Arc<Redactor>,
    /// The job's private directory (mode 0700), removed when the job ends.
    pub workspace: PathBuf,
}

impl StageContext {
    pub fn emit(&self, event: JobEvent) {
        self.events.emit(event);
    }
}

/// User name and password (or token) for a registry, sent as Basic auth or exchanged for a
/// bearer token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BasicAuth {
    pub username: String,
    pub password: Secret,
}

/// Where a finished image goes, resolved from the worker's config and the job's override.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    /// A local OCI image layout directory shared by all jobs; the image is tagged `tag` in
    /// its `index.json` (`org.opencontainers.image.ref.name`).
    OciLayout {
        path: PathBuf,
        tag: String,
        /// The job's `source_id`, recorded with the image for retention.
        source_id: String,
    },
    /// A registry push to `registry/repository:tag`.
    Registry {
        /// `host[:port]`.
        registry: String,
        plain_http: bool,
        repository: String,
        tag: String,
        auth: Option<BasicAuth>,
    },
}

impl Destination {
    /// How the result names the stored image.
    pub fn reference(&self) -> String {
        match self {
            Destination::OciLayout { path, tag, .. } => format!("oci:{}:{tag}", path.display()),
            Destination::Registry {
                registry,
                repository,
                tag,
                ..
            } => format!("{registry}/{repository}:{tag}"),
        }
    }
}
