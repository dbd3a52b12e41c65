//! The [`Builder`] on a Docker Engine's embedded BuildKit (ARCHITECTURE §7), in two ways
//! ([`EngineBuilder`]): the engine's `/build` through bollard (`builder.backend = "docker"`,
//! this file) or BuildKit's control API on the engine's `/grpc` with our own session
//! (`"buildkitd"`, [`grpc`]). Both export the image from the engine's store the same way.
//!
//! One `/build` build: negotiate the API version; `POST /build` with a BuildKit session whose auth
//! provider answers the `FROM` registries' credentials (host → credentials), the context tar
//! streamed from the sealed context on a blocking thread, and a forced pull so that a private
//! base image cached in the engine is never used without credentials; BuildKit's progress
//! becomes `Log` events; then the image is exported ([`export`]) and removed from the engine.
//!
//! Each build (of either backend) runs on its own thread with its own single-threaded runtime,
//! dropped when the build ends. bollard spawns the session's gRPC server as a detached task that lives as long as
//! the engine keeps the session connection open, which the engine does until the client goes;
//! dropping the runtime ends that task and closes the connection, so a long-running worker
//! leaks neither tasks nor engine sessions.
//!
//! Cancellation (`cx.cancel`: a request, the job's timeout, the worker's shutdown) drops the
//! `/build` request: the engine cancels a BuildKit build whose client disconnected, which kills
//! the running step's processes. Must not: hold the whole context in memory, log or put in an
//! error any credential.

mod cache;
pub mod export;
mod fleet_cache;
mod gate;
pub mod grpc;
mod log_events;
pub mod progress;
mod session;
mod ssh_agent;
pub mod standalone;

use std::collections::HashMap;
use std::future::Future;
use std::io::Write;
use std::ops::ControlFlow;
use std::sync::Arc;

use async_trait::async_trait;
use bollard::models::BuildInfo;
use bollard::models::BuildInfoAux;
use bollard::query_parameters::{BuildImageOptions, BuilderVersion, RemoveImageOptions};
use bollard::Docker;
use bytes::{Bytes, BytesMut};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};

use crate::adapters::oci_layout::OciLayoutStores;
use crate::config::{BuilderBackend, BuildkitdAddr, Config, DaemonAddr};
use crate::error::{ErrorCode, JobError, Stage};
use crate::job::{BuildOptions, ImageInfo, JobEvent};
use crate::ports::{BasicAuth, BuildRequest, Builder, CachePrune, SealedContext, StageContext};
use crate::workspace::random_hex;

use log_events::{follow, BuildLog, Followed};

/// Docker Hub as the BuildKit session's auth provider is asked for it: BuildKit resolves
/// `docker.io` images against `registry-1.docker.io`.
const DOCKER_HUB_AUTH_HOST: &str = "registry-1.docker.io";

/// Context tar chunks handed to the HTTP body; a few in flight keep the upload streaming
/// without holding more than a few hundred KiB.
const TAR_CHUNK: usize = 256 * 1024;
const TAR_CHUNKS_IN_FLIGHT: usize = 4;

/// bollard's timeout covers a request until the engine answers its headers; our own deadline
/// is the job's (`cx.cancel`), so this only has to be longer than any job.
const ENGINE_REQUEST_TIMEOUT_SECS: u64 = 7 * 24 * 3600;

/// How long `ready` waits for the engine.
const READY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// The builder `[builder]` names.
pub fn from_config(config: &Config) -> Result<Arc<dyn Builder>, JobError> {
    let host = config.builder.docker_host.clone();
    match (&config.builder.backend, &config.builder.buildkitd_addr) {
        (BuilderBackend::Docker, _) => Ok(Arc::new(EngineBuilder::docker(host))),
        (BuilderBackend::Buildkitd, BuildkitdAddr::DockerEngine) => {
            Ok(Arc::new(EngineBuilder::buildkitd(host)))
        }
        (BuilderBackend::Buildkitd, BuildkitdAddr::Daemon(addr)) => {
            Ok(Arc::new(standalone::StandaloneBuilder::new(addr.clone())))
        }
    }
}

/// Builds on a Docker Engine, through its `/build` (the `docker` backend) or BuildKit's control
/// API on its `/grpc` (the `buildkitd` backend); the image is exported from the engine's store
/// either way. Cheap to share; each build opens its own connections.
#[derive(Debug, Clone)]
pub struct EngineBuilder {
    host: DaemonAddr,
    stores: Arc<OciLayoutStores>,
    via: Via,
}

impl EngineBuilder {
    /// `builder.backend = "docker"`.
    pub fn docker(host: DaemonAddr) -> EngineBuilder {
        EngineBuilder::new(host, Via::Build)
    }

    /// `builder.backend = "buildkitd"` with `builder.buildkitd_addr = "docker-engine"`.
    pub fn buildkitd(host: DaemonAddr) -> EngineBuilder {
        EngineBuilder::new(host, Via::ControlApi)
    }

    fn new(host: DaemonAddr, via: Via) -> EngineBuilder {
        EngineBuilder {
            host,
            stores: Arc::new(OciLayoutStores::default()),
            via,
        }
    }
}

#[async_trait]
impl Builder for EngineBuilder {
    async fn ready(&self) -> Result<(), String> {
        let host = &self.host;
        let probe =
            async {
                match self.via {
                    Via::Build => {
                        let docker = connect(host).await.map_err(|e| e.message)?;
                        docker.ping().await.map(|_| ()).map_err(|e| {
                            format!("the Docker Engine at {host} does not answer: {e}")
                        })
                    }
                    Via::ControlApi => grpc::control_api_answers(host).await,
                }
            };
        answer_within(host, probe).await
    }

    /// The engine's BuildKit cache, the way this backend reaches it (see the private `cache`
    /// module): the engine's `/system/df` and `/build/prune` (the `docker` backend), or
    /// BuildKit's `DiskUsage` and `Prune` on the engine's `/grpc` (the `buildkitd` backend).
    async fn prune_cache(&self, keep_bytes: u64) -> Result<CachePrune, String> {
        let host = &self.host;
        let who = format!("the Docker Engine at {host}");
        match self.via {
            Via::Build => {
                cache::recorded(
                    &who,
                    keep_bytes,
                    cache::prune_engine_cache(host, keep_bytes),
                )
                .await
            }
            Via::ControlApi => {
                cache::recorded(&who, keep_bytes, grpc::prune_engine_cache(host, keep_bytes)).await
            }
        }
    }

    async fn build(&self, request: BuildRequest, cx: &StageContext) -> Result<ImageInfo, JobError> {
        let _pass = gate::Gate::for_address(&self.host.to_string())
            .enter(
                gate::CredentialSet::of(&request.registry_auth, &request.options),
                &cx.cancel,
            )
            .await?;
        let (host, stores, via) = (self.host.clone(), self.stores.clone(), self.via);
        on_build_thread(cx, move |cx| async move {
            build_and_export(host, stores, request, &cx, via).await
        })
        .await
    }
}

/// `probe`'s answer, or "did not answer" after [`READY_TIMEOUT`].
async fn answer_within(
    host: &DaemonAddr,
    probe: impl Future<Output = Result<(), String>>,
) -> Result<(), String> {
    match tokio::time::timeout(READY_TIMEOUT, probe).await {
        Ok(result) => result,
        Err(_) => Err(format!(
            "the build backend at {host} did not answer in {} s",
            READY_TIMEOUT.as_secs()
        )),
    }
}

/// Runs `build` on its own thread with its own single-threaded runtime, dropped when the build
/// ends (see the module docs).
async fn on_build_thread<F, Fut>(cx: &StageContext, build: F) -> Result<ImageInfo, JobError>
where
    F: FnOnce(StageContext) -> Fut + Send + 'static,
    Fut: Future<Output = Result<ImageInfo, JobError>>,
{
    // A child token, cancelled when this future is dropped too, so the build thread never
    // outlives a caller that stopped waiting.
    let stop = cx.cancel.child_token();
    let _stop_on_drop = stop.clone().drop_guard();
    let mut thread_cx = cx.clone();
    thread_cx.cancel = stop;
    let (tx, rx) = oneshot::channel();
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
            let result = runtime.block_on(build(thread_cx));
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

/// How a build reaches the engine's BuildKit.
#[derive(Debug, Clone, Copy)]
enum Via {
    /// `POST /build` with a bollard session (the `docker` backend).
    Build,
    /// BuildKit's control API on `POST /grpc` with our own session (the `buildkitd` backend).
    ControlApi,
}

async fn build_and_export(
    host: DaemonAddr,
    stores: Arc<OciLayoutStores>,
    request: BuildRequest,
    cx: &StageContext,
    via: Via,
) -> Result<ImageInfo, JobError> {
    let docker = connect(&host).await?;
    // Lower-case hex only: a valid repository name whatever the job id looks like.
    let image = format!("factoryd-build:{}", random_hex(12));
    let BuildRequest {
        context,
        options,
        registry_auth,
        destination,
        cache,
    } = request;
    let plan = cache.map(|c| fleet_cache::CachePlan::new(c, fleet_cache::CacheKind::Inline));
    let input = BuildInput {
        context,
        options: &options,
        registry_auth: &registry_auth,
        cache: plan.as_ref(),
    };
    let built = match via {
        Via::Build => build_image(&docker, &host, &image, input, cx).await,
        Via::ControlApi => grpc::build_image(&host, &image, input, cx).await,
    };
    let result = match built {
        Ok(progress) => {
            if cx.cancel.is_cancelled() {
                Err(JobError::cancelled(Stage::Build))
            } else {
                cx.emit(JobEvent::Stage {
                    stage: Stage::Export,
                });
                let exported = export::export(&docker, &stores, &image, &destination, cx).await;
                // The cache is pushed once the job's image is where it belongs; its failure
                // is a warning.
                if let (Ok(_), Some(plan)) = (&exported, &plan) {
                    let pushed = fleet_cache::push_inline(&docker, &image, plan, cx).await;
                    if !cx.cancel.is_cancelled() {
                        fleet_cache::report(plan, &progress, &pushed, cx);
                    }
                }
                if cx.cancel.is_cancelled() {
                    Err(JobError::cancelled(Stage::Export))
                } else {
                    exported
                }
            }
        }
        Err(e) => Err(e),
    };
    remove_image(&docker, &image).await;
    result.map_err(|e| redacted(e, cx))
}

/// `e` with every credential of the job masked in its message.
fn redacted(mut e: JobError, cx: &StageContext) -> JobError {
    e.message = cx.redactor.redact(&e.message);
    e
}

/// Connects and negotiates the API version (the client's default is newer than 20.10's).
async fn connect(host: &DaemonAddr) -> Result<Docker, JobError> {
    let unavailable = |e: bollard::errors::Error| engine_unavailable(host, e);
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

/// The engine could not be reached: transient.
fn engine_unavailable(host: &DaemonAddr, e: impl std::fmt::Display) -> JobError {
    JobError::transient(
        Stage::Build,
        ErrorCode::Unavailable,
        format!("the Docker Engine at {host} is unavailable: {e}"),
    )
}

/// The registry credentials as the session's auth provider is asked for them: host →
/// credentials, Docker Hub also under the host BuildKit asks for; the first entry for a host
/// wins.
fn auth_by_host(auth: &[(String, BasicAuth)]) -> HashMap<String, BasicAuth> {
    let mut map = HashMap::new();
    for (host, basic) in auth {
        let hub = matches!(
            host.as_str(),
            "docker.io" | "index.docker.io" | "registry-1.docker.io"
        );
        if hub {
            map.insert(DOCKER_HUB_AUTH_HOST.to_owned(), basic.clone());
        }
        map.entry(host.clone()).or_insert_with(|| basic.clone());
    }
    map
}

/// What a backend's build step builds: the request's build half.
struct BuildInput<'a> {
    context: SealedContext,
    options: &'a BuildOptions,
    registry_auth: &'a [(String, BasicAuth)],
    /// The shared cache this build imports and exports, as its backend keeps it.
    cache: Option<&'a fleet_cache::CachePlan>,
}

impl BuildInput<'_> {
    /// The session's registry credentials: the `FROM` registries' and the cache's.
    fn session_auth(&self) -> HashMap<String, BasicAuth> {
        let mut by_host = auth_by_host(self.registry_auth);
        if let Some(plan) = self.cache {
            plan.offer_credentials(&mut by_host);
        }
        by_host
    }
}

/// Builds `image` into the engine's store through `/build`; what the progress said of the
/// shared cache.
async fn build_image(
    docker: &Docker,
    host: &DaemonAddr,
    image: &str,
    input: BuildInput<'_>,
    cx: &StageContext,
) -> Result<progress::CacheProgress, JobError> {
    let session_auth = input.session_auth();
    let BuildInput {
        context,
        options,
        cache,
        ..
    } = input;
    let session_id = format!("factoryd-{}", random_hex(12));
    let mut build_args: HashMap<String, String> = options.args.clone().into_iter().collect();
    let mut cache_from = None;
    if let Some(plan) = cache {
        plan.engine_build_options(&mut cache_from, &mut build_args);
    }
    let build_options = BuildImageOptions {
        dockerfile: context.dockerfile().to_owned(),
        t: Some(image.to_owned()),
        pull: Some("1".to_owned()),
        nocache: options.no_cache,
        cachefrom: cache_from,
        rm: true,
        forcerm: true,
        buildargs: Some(build_args),
        target: options.target.clone().unwrap_or_default(),
        platform: options.platform.clone().unwrap_or_default(),
        version: BuilderVersion::BuilderBuildKit,
        session: Some(session_id.clone()),
        ..BuildImageOptions::default()
    };

    // Our own session (registry credentials, build secrets, SSH), open before `/build` names
    // it; dropping it (the build's end, or cancel) closes it.
    let agent = match &options.ssh {
        Some(key) => Some(ssh_agent::Agent::start(key, &cx.workspace).await?),
        None => None,
    };
    let services = session::SessionServices::new(session_auth, &options.secrets, agent);
    let _session = session::open_engine_session(host, &session_id, services).await?;
    let (body, writer) = context_body(context);
    let stream = docker.build_image(build_options, None, Some(bollard::body_stream(body)));

    let mut log = BuildLog::new(cx);
    // Dropping the stream (cancel) closes the /build request: the engine cancels the solve.
    let followed = follow(stream, &mut log, |item, log| match item {
        Err(e) => ControlFlow::Break(e),
        Ok(info) => {
            take_info(&info, log);
            ControlFlow::Continue(())
        }
    })
    .await;
    let outcome = match followed {
        Followed::Cancelled => return Err(JobError::cancelled(Stage::Build)),
        Followed::Ended => Ok(()),
        Followed::Stopped(e) => Err(e),
    };

    // A context that could not be written (an unsafe entry, a limit) explains the build's
    // failure better than the engine's view of a cut upload.
    context_written(writer, cx).await?;
    match outcome {
        Ok(()) => Ok(log.assembler().cache_progress()),
        Err(e) => Err(engine_error(e, log.assembler())),
    }
}

/// The context writer's outcome: its error, or how many bytes it sent.
async fn context_written(
    writer: tokio::task::JoinHandle<Result<u64, JobError>>,
    cx: &StageContext,
) -> Result<(), JobError> {
    match writer.await {
        Ok(Err(e)) => Err(e),
        Err(e) => Err(JobError::transient(
            Stage::Build,
            ErrorCode::Internal,
            format!("the context writer failed: {e}"),
        )),
        Ok(Ok(bytes)) => {
            debug!(job.id = %cx.job_id, bytes, "Context sent.");
            Ok(())
        }
    }
}

/// Log lines from one message of the build stream.
fn take_info(info: &BuildInfo, log: &mut BuildLog<'_>) {
    if let Some(BuildInfoAux::BuildKit(status)) = &info.aux {
        log.status(status);
    }
    if let Some(text) = &info.stream {
        log.lines(text);
    }
}

/// Classifies a bollard error from the build request.
fn engine_error(e: bollard::errors::Error, assembler: &progress::LogAssembler) -> JobError {
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
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A unix socket answering like an engine without BuildKit's control API: every GET with
    /// an API version, `POST /grpc` with 404.
    fn engine_without_control_api(path: &std::path::Path) {
        let listener = tokio::net::UnixListener::bind(path).unwrap();
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut byte = [0u8; 1];
                    while conn.read(&mut byte).await.unwrap_or(0) == 1 {
                        head.push(byte[0]);
                        if !head.ends_with(b"\r\n\r\n") {
                            continue;
                        }
                        let grpc = head.starts_with(b"POST /grpc");
                        head.clear();
                        let (status, body) = if grpc {
                            ("404 Not Found", "")
                        } else {
                            ("200 OK", r#"{"ApiVersion":"1.41","Version":"20.10.24"}"#)
                        };
                        let answer = format!(
                            "HTTP/1.1 {status}\r\nContent-Type: application/json\r\n\
                             Content-Length: {}\r\n\r\n{body}",
                            body.len()
                        );
                        if conn.write_all(answer.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
    }

    #[tokio::test]
    async fn the_configured_backend_is_the_one_built_with() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("docker.sock");
        engine_without_control_api(&socket);
        let config = |builder: &str| {
            let text = format!(
                "[builder]\ndocker_host = \"unix://{}\"\n{builder}",
                socket.display()
            );
            crate::config::from_toml_str(&text, &HashMap::new()).expect("config")
        };

        let docker = from_config(&config("backend = \"docker\"")).expect("docker");
        docker.ready().await.expect("the engine answers /_ping");

        let control_api = from_config(&config(
            "backend = \"buildkitd\"\nbuildkitd_addr = \"docker-engine\"",
        ))
        .expect("buildkitd on the engine");
        let why = control_api.ready().await.expect_err("no /grpc here");
        assert!(why.contains("POST /grpc answered 404"), "{why}");

        let buildkitd = dir.path().join("buildkitd.sock");
        let standalone = from_config(&config(&format!(
            "backend = \"buildkitd\"\nbuildkitd_addr = \"unix://{}\"",
            buildkitd.display()
        )))
        .expect("a standalone buildkitd");
        let why = standalone.ready().await.expect_err("no buildkitd here");
        assert!(
            why.starts_with(&format!("buildkitd at unix://{}", buildkitd.display())),
            "{why}"
        );
    }

    #[tokio::test]
    async fn an_engine_that_does_not_answer_is_not_ready() {
        let dir = tempfile::tempdir().unwrap();
        let socket = DaemonAddr::Unix(dir.path().join("docker.sock"));
        for builder in [
            EngineBuilder::docker(socket.clone()),
            EngineBuilder::buildkitd(socket.clone()),
        ] {
            let why = builder.ready().await.unwrap_err();
            assert!(why.contains("docker.sock"), "{why}");
        }
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
        let map = auth_by_host(&auth);
        assert_eq!(
            map.get(DOCKER_HUB_AUTH_HOST).map(|c| c.username.as_str()),
            Some("u")
        );
        assert_eq!(
            map.get("127.0.0.1:5000").map(|c| c.password.expose()),
            Some("q")
        );
    }
}
