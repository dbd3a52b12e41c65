//! Scripted fakes of the stage ports: each job's attempts succeed, fail with a chosen class,
//! sleep, wait for cancellation or panic, as the test says.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;

use crate::error::{ErrorCode, JobError, Stage};
use crate::job::{DockerFile, ImageInfo, Origin};
use crate::ports::{
    BasicAuth, BuildRequest, Builder, ContextWriter, CredentialResolver, FetchedSource, Fetcher,
    ImportRequest, Importer, SealedContext, StageContext,
};

/// What one attempt of a job does in its main stage (build or import).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Behaviour {
    Succeed,
    Permanent,
    Transient,
    /// Works for this long, then succeeds; stops early (cancelled) if the token fires.
    Sleep(Duration),
    /// Works until the token fires.
    WaitForCancel,
    Panic,
    /// Works forever and never looks at the token: a stage that does not stop when told.
    Hang,
    /// Ends the whole process at once (SIGABRT), as a stack overflow or the OOM killer would:
    /// only for a worker process a test starts.
    Abort,
}

impl Behaviour {
    /// `succeed`, `permanent`, `transient`, `sleep:<ms>`, `wait-cancel`, `panic`, `hang`,
    /// `abort`.
    pub fn parse(word: &str) -> Option<Behaviour> {
        Some(match word.trim() {
            "succeed" => Behaviour::Succeed,
            "permanent" => Behaviour::Permanent,
            "transient" => Behaviour::Transient,
            "wait-cancel" => Behaviour::WaitForCancel,
            "panic" => Behaviour::Panic,
            "hang" => Behaviour::Hang,
            "abort" => Behaviour::Abort,
            other => {
                let ms = other.strip_prefix("sleep:")?.parse().ok()?;
                Behaviour::Sleep(Duration::from_millis(ms))
            }
        })
    }
}

/// Per-job scripts, by attempt (the last entry repeats). Jobs without a script succeed.
/// With a script directory, `<dir>/<job_id>` holds a comma-separated script, read at each
/// attempt (so several worker processes share it), and `<dir>/<job_id>.runs` gets one line per
/// attempt that ran.
#[derive(Clone, Default)]
pub struct ScriptedStages {
    scripts: Arc<Mutex<HashMap<String, Vec<Behaviour>>>>,
    dir: Option<PathBuf>,
    /// Attempts that reached the main stage, per job.
    runs: Arc<Mutex<HashMap<String, u32>>>,
    /// The build file fetched sources hold (default `FROM scratch`).
    build_file: Option<Arc<str>>,
}

impl ScriptedStages {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn from_dir(dir: PathBuf) -> Self {
        ScriptedStages {
            dir: Some(dir),
            ..Self::default()
        }
    }

    /// Fetched sources hold `text` as their build file.
    pub fn with_build_file(mut self, text: &str) -> Self {
        self.build_file = Some(Arc::from(text));
        self
    }

    pub fn script(&self, job_id: &str, behaviours: Vec<Behaviour>) {
        self.scripts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(job_id.to_owned(), behaviours);
    }

    /// How many attempts of `job_id` reached the main stage in this process.
    pub fn runs(&self, job_id: &str) -> u32 {
        self.runs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(job_id)
            .copied()
            .unwrap_or(0)
    }

    fn behaviour(&self, job_id: &str, attempt: u32) -> Behaviour {
        let from_dir = self.dir.as_ref().and_then(|d| {
            let text = std::fs::read_to_string(d.join(job_id)).ok()?;
            Some(
                text.split(',')
                    .filter_map(Behaviour::parse)
                    .collect::<Vec<_>>(),
            )
        });
        let script = from_dir.or_else(|| {
            self.scripts
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(job_id)
                .cloned()
        });
        match script {
            Some(s) if !s.is_empty() => {
                let i = (attempt.max(1) as usize - 1).min(s.len() - 1);
                s[i].clone()
            }
            _ => Behaviour::Succeed,
        }
    }

    async fn main_stage(&self, stage: Stage, cx: &StageContext) -> Result<ImageInfo, JobError> {
        *self
            .runs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(cx.job_id.clone())
            .or_default() += 1;
        if let Some(dir) = &self.dir {
            // One line per run, so tests in another process can count executions.
            use std::io::Write;
            if let Ok(mut f) = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(dir.join(format!("{}.runs", cx.job_id)))
            {
                let _ = writeln!(f, "{}", cx.attempt);
            }
        }
        match self.behaviour(&cx.job_id, cx.attempt) {
            Behaviour::Succeed => Ok(image(&cx.job_id)),
            Behaviour::Permanent => Err(JobError::new(
                stage,
                ErrorCode::NotFound,
                "scripted permanent failure",
            )),
            Behaviour::Transient => Err(JobError::new(
                stage,
                ErrorCode::Unavailable,
                "scripted transient failure",
            )),
            Behaviour::Sleep(d) => tokio::select! {
                _ = tokio::time::sleep(d) => Ok(image(&cx.job_id)),
                _ = cx.cancel.cancelled() => Err(JobError::cancelled(stage)),
            },
            Behaviour::WaitForCancel => {
                cx.cancel.cancelled().await;
                Err(JobError::cancelled(stage))
            }
            Behaviour::Panic => panic!("scripted panic in {stage}"),
            Behaviour::Hang => std::future::pending().await,
            Behaviour::Abort => std::process::abort(),
        }
    }
}

fn image(job_id: &str) -> ImageInfo {
    ImageInfo {
        reference: format!("oci:/fake:{job_id}"),
        digest: format!("sha256:{}", "0".repeat(64)),
        source_digest: None,
        size_bytes: 0,
        platforms: vec!["linux/amd64".to_owned()],
    }
}

/// A context of one file, `Dockerfile`.
struct ScriptedContext {
    build_file: Arc<str>,
}

impl ContextWriter for ScriptedContext {
    fn write_tar(&self, out: &mut dyn std::io::Write) -> Result<u64, JobError> {
        let io = |e: std::io::Error| JobError::new(Stage::Seal, ErrorCode::LocalIo, e.to_string());
        let mut builder = tar::Builder::new(Vec::new());
        let mut header = tar::Header::new_ustar();
        header.set_size(self.build_file.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        builder
            .append_data(&mut header, "Dockerfile", self.build_file.as_bytes())
            .map_err(io)?;
        let bytes = builder.into_inner().map_err(io)?;
        out.write_all(&bytes).map_err(io)?;
        Ok(bytes.len() as u64)
    }
}

#[async_trait]
impl Fetcher for ScriptedStages {
    async fn fetch(&self, _: &DockerFile, _: &StageContext) -> Result<FetchedSource, JobError> {
        Ok(FetchedSource {
            context: SealedContext::new(
                "Dockerfile",
                Box::new(ScriptedContext {
                    build_file: self
                        .build_file
                        .clone()
                        .unwrap_or_else(|| Arc::from("FROM scratch\n")),
                }),
            ),
            revision: None,
            fetched_bytes: 0,
        })
    }
}

#[async_trait]
impl Builder for ScriptedStages {
    async fn build(&self, _: BuildRequest, cx: &StageContext) -> Result<ImageInfo, JobError> {
        self.main_stage(Stage::Build, cx).await
    }
}

#[async_trait]
impl CredentialResolver for ScriptedStages {
    async fn resolve(
        &self,
        _: &Origin,
        _: bool,
        _: &StageContext,
    ) -> Result<Option<BasicAuth>, JobError> {
        Ok(None)
    }
}

#[async_trait]
impl Importer for ScriptedStages {
    async fn import(&self, _: ImportRequest<'_>, cx: &StageContext) -> Result<ImageInfo, JobError> {
        self.main_stage(Stage::Import, cx).await
    }
}

impl ScriptedStages {
    /// Stages that all run on this script, with an OCI layout destination under `store`.
    pub fn stages(&self, store: PathBuf) -> crate::pipeline::Stages {
        let me = Arc::new(self.clone());
        crate::pipeline::Stages {
            fetcher: me.clone(),
            builder: me.clone(),
            resolver: me.clone(),
            importer: me,
            node_registry_auth: Vec::new(),
            node_secrets: Vec::new(),
            allowed_frontends: Vec::new(),
            insecure_registries: Vec::new(),
            destinations: crate::pipeline::destination::oci_layout_settings(store),
            build_cache: None,
        }
    }
}
