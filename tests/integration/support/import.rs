//! Running one import the way the pipeline does: a decoded job, its credentials resolved, the
//! importer called with a stage context that records events.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use factoryd::adapters::credentials::OriginCredentials;
use factoryd::adapters::ecr::EcrTokens;
use factoryd::adapters::oci::{ImporterSettings, RegistryImporter, RequestRetry};
use factoryd::adapters::webhook::WebhookCredentials;
use factoryd::config::Platform;
use factoryd::egress::EgressPolicy;
use factoryd::error::JobError;
use factoryd::job::{ImageInfo, Job, JobEvent, Origin, Redactor};
use factoryd::ports::{
    CredentialResolver, Destination, EventSink, ImportRequest, Importer, StageContext,
};
use factoryd::reference::{Reference, Scheme};
use tokio_util::sync::CancellationToken;

/// Records every event.
#[derive(Default)]
pub struct Recorder(pub Mutex<Vec<JobEvent>>);

impl EventSink for Recorder {
    fn emit(&self, event: JobEvent) {
        self.0.lock().expect("events").push(event);
    }
}

impl Recorder {
    /// Blob bytes reported moved, summed over the final progress event of each item.
    pub fn bytes_moved(&self) -> u64 {
        let mut last = std::collections::HashMap::new();
        for e in self.0.lock().expect("events").iter() {
            if let JobEvent::Progress {
                item, done_bytes, ..
            } = e
            {
                last.insert(item.clone(), *done_bytes);
            }
        }
        last.values().sum()
    }
}

/// What factoryd logs, at every level, while a future runs with [`LogCapture::subscriber`]
/// (`tracing::instrument::WithSubscriber`), kept as plain text.
#[derive(Clone, Default)]
pub struct LogCapture(Arc<Mutex<Vec<u8>>>);

impl LogCapture {
    pub fn subscriber(&self) -> impl tracing::Subscriber + Send + Sync {
        let capture = self.clone();
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("factoryd=trace"))
            .with_ansi(false)
            .with_writer(move || capture.clone())
            .finish()
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().expect("log")).into_owned()
    }
}

impl std::io::Write for LogCapture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("log").extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

pub const LOOPBACK: EgressPolicy = EgressPolicy {
    allow_loopback: true,
    allow_private: false,
};

pub fn platform(text: &str) -> Platform {
    let parts: Vec<&str> = text.split('/').collect();
    Platform {
        os: parts[0].to_owned(),
        architecture: parts[1].to_owned(),
        variant: parts.get(2).map(|v| (*v).to_owned()),
    }
}

pub fn settings(platforms: &[&str]) -> ImporterSettings {
    ImporterSettings {
        platforms: platforms.iter().map(|p| platform(p)).collect(),
        mirrors: Default::default(),
        max_parallel_blobs: 4,
        max_manifest_bytes: 4 * 1024 * 1024,
        max_blob_bytes: 16 << 30,
        retry: RequestRetry {
            attempts: 4,
            base_delay: Duration::from_millis(50),
            max_wait: Duration::from_secs(5),
        },
    }
}

pub fn importer(platforms: &[&str]) -> RegistryImporter {
    RegistryImporter::new(settings(platforms), LOOPBACK).expect("importer")
}

pub fn credentials(ecr_endpoint: Option<&str>) -> OriginCredentials {
    OriginCredentials::new(
        WebhookCredentials::new(LOOPBACK, Duration::from_secs(5), 4096).expect("webhook client"),
        EcrTokens::new(ecr_endpoint.map(|e| url::Url::parse(e).expect("endpoint"))),
    )
}

/// A job with `origin` (the JSON of the `origin` object).
pub fn job(origin: serde_json::Value) -> Job {
    factoryd::job::decode_value(&serde_json::json!({
        "v": 1, "id": "job-1", "source_id": "src-1", "origin": origin,
    }))
    .unwrap_or_else(|p| panic!("invalid test job: {p}"))
}

/// A `docker-registry` origin on `host` (plain http).
pub fn registry_origin(host: &str, target: &str, user: Option<(&str, &str)>) -> serde_json::Value {
    let mut details = serde_json::json!({"url": format!("http://{host}"), "target": target});
    if let Some((u, p)) = user {
        details["username"] = u.into();
        details["password"] = p.into();
    }
    serde_json::json!({"type": "docker-registry", "details": details})
}

pub fn layout(path: &Path, tag: &str) -> Destination {
    Destination::OciLayout {
        path: path.to_path_buf(),
        tag: tag.to_owned(),
        source_id: "src".into(),
    }
}

/// Resolves the job's credentials and imports it into `destination`.
pub async fn run(
    importer: &RegistryImporter,
    resolver: &dyn CredentialResolver,
    job: &Job,
    destination: Destination,
    events: Arc<Recorder>,
) -> Result<ImageInfo, JobError> {
    run_inner(
        importer,
        resolver,
        job,
        destination,
        events,
        CancellationToken::new(),
    )
    .await
}

/// [`run`] with the job's own credentials only (no ECR endpoint), into the OCI layout at
/// `store` under `tag`, with events nobody reads.
pub async fn import_to_layout(
    importer: &RegistryImporter,
    job: &Job,
    store: &Path,
    tag: &str,
) -> Result<ImageInfo, JobError> {
    run(
        importer,
        &credentials(None),
        job,
        layout(store, tag),
        Arc::new(Recorder::default()),
    )
    .await
}

/// [`run`] with a cancellation token the test fires.
pub async fn run_with_cancel(
    importer: &RegistryImporter,
    resolver: &dyn CredentialResolver,
    job: &Job,
    destination: Destination,
    cancel: CancellationToken,
) -> Result<ImageInfo, JobError> {
    run_inner(
        importer,
        resolver,
        job,
        destination,
        Arc::new(Recorder::default()),
        cancel,
    )
    .await
}

async fn run_inner(
    importer: &RegistryImporter,
    resolver: &dyn CredentialResolver,
    job: &Job,
    destination: Destination,
    events: Arc<Recorder>,
    cancel: CancellationToken,
) -> Result<ImageInfo, JobError> {
    let cx = StageContext {
        attempt: 1,
        job_id: job.id.clone(),
        cancel,
        events,
        redactor: Arc::new(Redactor::for_job(job)),
        workspace: std::env::temp_dir(),
    };
    let (source, plain_http): (Reference, bool) = match &job.origin {
        Origin::DockerHub(o) => (o.target.clone(), false),
        Origin::DockerRegistry(o) => (o.target.clone(), o.registry.scheme == Some(Scheme::Http)),
        Origin::OciRegistry(o) => (o.target.clone(), o.registry.scheme == Some(Scheme::Http)),
        Origin::DockerFile(_) => panic!("not an import"),
    };
    let auth = resolver.resolve(&job.origin, false, &cx).await?;
    importer
        .import(
            ImportRequest {
                origin: &job.origin,
                source,
                plain_http,
                auth,
                resolver,
                destination,
            },
            &cx,
        )
        .await
}
