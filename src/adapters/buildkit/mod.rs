//! The [`Builder`] on a Docker Engine's embedded BuildKit, through bollard (ARCHITECTURE §7).
//!
//! One build: negotiate the API version; `POST /build` with a BuildKit session whose auth
//! provider answers the `FROM` registries' credentials (host → credentials), the context tar
//! streamed from the sealed context on a blocking thread, and a forced pull so that a private
//! base image cached in the engine is never used without credentials; BuildKit's progress
//! becomes `Log` events; then the image is exported ([`export`]) and removed from the engine.
//!
//! Each build runs on its own thread with its own single-threaded runtime, dropped when the
//! build ends. bollard spawns the session's gRPC server as a detached task that lives as long as
//! the engine keeps the session connection open, which the engine does until the client goes;
//! dropping the runtime ends that task and closes the connection, so a long-running worker
//! leaks neither tasks nor engine sessions.
//!
//! Cancellation (`cx.cancel`: a request, the job's timeout, the worker's shutdown) drops the
//! `/build` request: the engine cancels a BuildKit build whose client disconnected, which kills
//! the running step's processes. Must not: hold the whole context in memory, log or put in an
//! error any credential.

pub mod export;
pub mod progress;

use std::collections::HashMap;
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bollard::auth::DockerCredentials;
use bollard::models::{BuildInfo, BuildInfoAux};
use bollard::query_parameters::{BuildImageOptions, BuilderVersion, RemoveImageOptions};
use bollard::Docker;
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};

use crate::adapters::oci_layout::OciLayoutStores;
use crate::config::{BuilderBackend, Config, DaemonAddr};
use crate::error::{ErrorCode, JobError, Stage};
use crate::job::{BuildOptions, ImageInfo, JobEvent};
use crate::ports::{BasicAuth, BuildRequest, Builder, SealedContext, StageContext};
use crate::workspace::random_hex;

use progress::LogAssembler;

/// Docker Hub as the BuildKit session's auth provider is asked for it: BuildKit resolves
/// `docker.io` images against `registry-1.docker.io`.
const DOCKER_HUB_AUTH_HOST: &str = "registry-1.docker.io";

/// Log lines per `Log` event, and the longest a line waits before its batch is sent.
const LOG_BATCH_LINES: usize = 64;
const LOG_BATCH_DELAY: Duration = Duration::from_millis(250);

/// Context tar chunks handed to the HTTP body; a few in flight keep the upload streaming
/// without holding more than a few hundred KiB.
const TAR_CHUNK: usize = 256 * 1024;
const TAR_CHUNKS_IN_FLIGHT: usize = 4;

/// bollard's timeout covers a request until the engine answers its headers; our own deadline
/// is the job's (`cx.cancel`), so this only has to be longer than any job.
const ENGINE_REQUEST_TIMEOUT_SECS: u64 = 7 * 24 * 3600;

/// Builds through a Docker Engine. Cheap to share; each build opens its own connection.
#[derive(Debug, Clone)]
pub struct DockerBuilder {
    host: DaemonAddr,
    stores: Arc<OciLayoutStores>,
}

impl DockerBuilder {
    /// From `[builder]`. The `buildkitd` backend is refused here, at start-up, with the reason:
    /// see the README ("Builds").
    pub fn from_config(config: &Config) -> Result<DockerBuilder, JobError> {
        match config.builder.backend {
            BuilderBackend::Docker => Ok(DockerBuilder::new(config.builder.docker_host.clone())),
            BuilderBackend::Buildkitd => Err(JobError::permanent(
                Stage::Build,
                ErrorCode::Unsupported,
                "builder.backend = \"buildkitd\" is not implemented in this build of factoryd: \
                 use \"docker\" (see README, Builds)",
            )),
        }
    }

    pub fn new(host: DaemonAddr) -> DockerBuilder {
        DockerBuilder {
            host,
            stores: Arc::new(OciLayoutStores::default()),
        }
    }
}

#[async_trait]
impl Builder for DockerBuilder {
    async fn ready(&self) -> Result<(), String> {
        let probe = async {
            let docker = connect(&self.host).await.map_err(|e| e.message)?;
            docker
                .ping()
                .await
                .map(|_| ())
                .map_err(|e| format!("the Docker Engine at {} does not answer: {e}", self.host))
        };
        match tokio::time::timeout(std::time::Duration::from_secs(5), probe).await {
            Ok(result) => result,
            Err(_) => Err(format!(
                "the Docker Engine at {} did not answer in 5 s",
                self.host
            )),
        }
    }

    async fn build(&self, request: BuildRequest, cx: &StageContext) -> Result<ImageInfo, JobError> {
        // A child token, cancelled when this future is dropped too, so the build thread never
        // outlives a caller that stopped waiting.
        let stop = cx.cancel.child_token();
        let _stop_on_drop = stop.clone().drop_guard();
        let mut thread_cx = cx.clone();
        thread_cx.cancel = stop;
        let (tx, rx) = oneshot::channel();
        let host = self.host.clone();
        let stores = self.stores.clone();
        let spawned = std::thread::Builder::new()
            .name("factoryd-build".to_owned())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = tx.send(Err(JobError::transient(
                            Stage::Build,
                            ErrorCode::Internal,
                            format!("cannot start the build's runtime: {e}"),
                        )));
                        return;
                    }
                };
                let result = runtime.block_on(build_and_export(host, stores, request, &thread_cx));
                let _ = tx.send(result);
                // Ends the session task and every connection of this build at once, without
                // waiting for a context writer that is still blocked (it stops on its own when
                // its channel closes).
                runtime.shutdown_background();
            });
        if let Err(e) = spawned {
            return Err(JobError::transient(
                Stage::Build,
                ErrorCode::Internal,
                format!("cannot start the build thread: {e}"),
            ));
        }
        rx.await.unwrap_or_else(|_| {
            Err(JobError::transient(
                Stage::Build,
                ErrorCode::Internal,
                "the build thread ended without a result",
            ))
        })
    }
}

async fn build_and_export(
    host: DaemonAddr,
    stores: Arc<OciLayoutStores>,
    request: BuildRequest,
    cx: &StageContext,
) -> Result<ImageInfo, JobError> {
    let docker = connect(&host).await?;
    // Lower-case hex only: a valid repository name whatever the job id looks like.
    let image = format!("factoryd-build:{}", random_hex(12));
    let BuildRequest {
        context,
        options,
        registry_auth,
        destination,
    } = request;
    let built = build_image(&docker, &image, context, &options, &registry_auth, cx).await;
    let result = match built {
        Ok(()) => {
            if cx.cancel.is_cancelled() {
                Err(JobError::cancelled(Stage::Build))
            } else {
                cx.emit(JobEvent::Stage {
                    stage: Stage::Export,
                });
                export::export(&docker, &stores, &image, &destination, cx).await
            }
        }
        Err(e) => Err(e),
    };
    remove_image(&docker, &image).await;
    result.map_err(|mut e| {
        e.message = cx.redactor.redact(&e.message);
        e
    })
}

/// Connects and negotiates the API version (the client's default is newer than 20.10's).
async fn connect(host: &DaemonAddr) -> Result<Docker, JobError> {
    let unavailable = |e: bollard::errors::Error| {
        JobError::transient(
            Stage::Build,
            ErrorCode::Unavailable,
            format!("the Docker Engine at {host} is unavailable: {e}"),
        )
    };
    let docker = match host {
        DaemonAddr::Unix(path) => Docker::connect_with_unix(
            &path.to_string_lossy(),
            ENGINE_REQUEST_TIMEOUT_SECS,
            bollard::API_DEFAULT_VERSION,
        ),
        DaemonAddr::Tcp { .. } => Docker::connect_with_http(
            &host.to_string(),
            ENGINE_REQUEST_TIMEOUT_SECS,
            bollard::API_DEFAULT_VERSION,
        ),
    }
    .map_err(unavailable)?;
    docker.negotiate_version().await.map_err(unavailable)
}

/// The session's auth provider map: host → credentials, Docker Hub under the host BuildKit
/// asks for.
fn session_credentials(auth: &[(String, BasicAuth)]) -> HashMap<String, DockerCredentials> {
    let mut map = HashMap::new();
    for (host, basic) in auth {
        let creds = DockerCredentials {
            username: Some(basic.username.clone()),
            password: Some(basic.password.expose().to_owned()),
            serveraddress: Some(host.clone()),
            ..DockerCredentials::default()
        };
        let hub = matches!(
            host.as_str(),
            "docker.io" | "index.docker.io" | "registry-1.docker.io"
        );
        if hub {
            map.insert(DOCKER_HUB_AUTH_HOST.to_owned(), creds.clone());
        }
        map.entry(host.clone()).or_insert(creds);
    }
    map
}

async fn build_image(
    docker: &Docker,
    image: &str,
    context: SealedContext,
    options: &BuildOptions,
    registry_auth: &[(String, BasicAuth)],
    cx: &StageContext,
) -> Result<(), JobError> {
    let build_options = BuildImageOptions {
        dockerfile: context.dockerfile().to_owned(),
        t: Some(image.to_owned()),
        pull: Some("1".to_owned()),
        nocache: options.no_cache,
        rm: true,
        forcerm: true,
        buildargs: Some(options.args.clone().into_iter().collect()),
        target: options.target.clone().unwrap_or_default(),
        platform: options.platform.clone().unwrap_or_default(),
        version: BuilderVersion::BuilderBuildKit,
        session: Some(format!("factoryd-{}", random_hex(12))),
        ..BuildImageOptions::default()
    };

    let (body, writer) = context_body(context);
    let credentials = session_credentials(registry_auth);
    let mut stream = docker.build_image(
        build_options,
        Some(credentials),
        Some(bollard::body_stream(body)),
    );

    let mut assembler = LogAssembler::default();
    let mut pending: Vec<String> = Vec::new();
    let mut flush_tick = tokio::time::interval(LOG_BATCH_DELAY);
    flush_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The worker's event sink redacts too; masking here as well keeps a sink that does not
    // (a test's, a future one's) from ever seeing a credential a RUN step echoed.
    let emit = |pending: &mut Vec<String>| {
        if !pending.is_empty() {
            let lines = pending.drain(..).map(|l| cx.redactor.redact(&l)).collect();
            cx.emit(JobEvent::Log { lines });
        }
    };

    let outcome: Result<(), bollard::errors::Error> = loop {
        tokio::select! {
            biased;
            _ = cx.cancel.cancelled() => {
                // Dropping the stream closes the /build request: the engine cancels the solve.
                drop(stream);
                assembler.finish(&mut pending);
                emit(&mut pending);
                return Err(JobError::cancelled(Stage::Build));
            }
            item = stream.next() => match item {
                None => break Ok(()),
                Some(Err(e)) => break Err(e),
                Some(Ok(info)) => {
                    take_info(&info, &mut assembler, &mut pending);
                    if pending.len() >= LOG_BATCH_LINES {
                        emit(&mut pending);
                    }
                }
            },
            _ = flush_tick.tick() => emit(&mut pending),
        }
    };
    drop(stream);
    assembler.finish(&mut pending);
    emit(&mut pending);

    // A context that could not be written (an unsafe entry, a limit) explains the build's
    // failure better than the engine's view of a cut upload.
    let written = writer.await;
    match written {
        Ok(Err(e)) => return Err(e),
        Err(e) => {
            return Err(JobError::transient(
                Stage::Build,
                ErrorCode::Internal,
                format!("the context writer failed: {e}"),
            ))
        }
        Ok(Ok(bytes)) => debug!(job.id = %cx.job_id, bytes, "Context sent."),
    }
    match outcome {
        Ok(()) => Ok(()),
        Err(e) => Err(engine_error(e, &assembler)),
    }
}

/// Log lines from one message of the build stream.
fn take_info(info: &BuildInfo, assembler: &mut LogAssembler, out: &mut Vec<String>) {
    if let Some(BuildInfoAux::BuildKit(status)) = &info.aux {
        assembler.push(status, out);
    }
    if let Some(text) = &info.stream {
        out.extend(text.lines().filter(|l| !l.is_empty()).map(str::to_owned));
    }
}

/// Classifies a bollard error from the build request.
fn engine_error(e: bollard::errors::Error, assembler: &LogAssembler) -> JobError {
    use bollard::errors::Error as E;
    match e {
        E::DockerStreamError { error } => {
            progress::classify_build_error(&error, assembler.failed_step())
        }
        E::DockerResponseServerError {
            status_code,
            message,
        } if status_code < 500 => {
            let e = progress::classify_build_error(&message, assembler.failed_step());
            if e.code == ErrorCode::Internal {
                JobError::permanent(
                    Stage::Build,
                    ErrorCode::InvalidJob,
                    format!("the engine refused the build ({status_code}): {message}"),
                )
            } else {
                e
            }
        }
        other => JobError::transient(
            Stage::Build,
            ErrorCode::Unavailable,
            format!("lost the Docker Engine during the build: {other}"),
        ),
    }
}

/// The context as an HTTP body: a blocking task writes the tar into a bounded channel, so the
/// upload streams and at most a few chunks are in memory.
fn context_body(
    context: SealedContext,
) -> (
    impl futures_util::Stream<Item = Bytes> + Send + 'static,
    tokio::task::JoinHandle<Result<u64, JobError>>,
) {
    let (tx, rx) = mpsc::channel::<Bytes>(TAR_CHUNKS_IN_FLIGHT);
    let writer = tokio::task::spawn_blocking(move || {
        let mut out = ChannelWriter {
            tx,
            buf: BytesMut::with_capacity(TAR_CHUNK),
        };
        let bytes = context.write_tar(&mut out)?;
        out.flush().map_err(|e| {
            JobError::transient(
                Stage::Build,
                ErrorCode::Unavailable,
                format!("the engine stopped reading the build context: {e}"),
            )
        })?;
        Ok(bytes)
    });
    let body = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|chunk| (chunk, rx))
    });
    (body, writer)
}

/// `Write` into the body channel, in `TAR_CHUNK` pieces.
struct ChannelWriter {
    tx: mpsc::Sender<Bytes>,
    buf: BytesMut,
}

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= TAR_CHUNK {
            self.flush()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = self.buf.split().freeze();
        self.tx
            .blocking_send(chunk)
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::BrokenPipe))
    }
}

/// Removes the build's image from the engine's store. A failure leaves an untagged image for
/// the engine's own pruning; it does not fail the job.
async fn remove_image(docker: &Docker, image: &str) {
    let options = RemoveImageOptions {
        force: true,
        noprune: false,
        ..RemoveImageOptions::default()
    };
    match docker.remove_image(image, Some(options), None).await {
        Ok(_) => {}
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        }) => {}
        Err(e) => warn!(image, error = %e, "Could not remove the built image from the engine."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::Secret;

    #[tokio::test]
    async fn an_engine_that_does_not_answer_is_not_ready() {
        let dir = tempfile::tempdir().unwrap();
        let builder = DockerBuilder::new(DaemonAddr::Unix(dir.path().join("docker.sock")));
        let why = builder.ready().await.unwrap_err();
        assert!(why.contains("docker.sock"), "{why}");
    }

    #[test]
    fn docker_hub_credentials_are_offered_under_the_host_buildkit_asks_for() {
        let auth = vec![
            (
                "docker.io".to_owned(),
                BasicAuth {
                    username: "u".into(),
                    password: Secret::new("p"),
                },
            ),
            (
                "127.0.0.1:5000".to_owned(),
                BasicAuth {
                    username: "v".into(),
                    password: Secret::new("q"),
                },
            ),
        ];
        let map = session_credentials(&auth);
        assert_eq!(
            map.get(DOCKER_HUB_AUTH_HOST)
                .and_then(|c| c.username.as_deref()),
            Some("u")
        );
        assert_eq!(
            map.get("127.0.0.1:5000")
                .and_then(|c| c.password.as_deref()),
            Some("q")
        );
    }
}
