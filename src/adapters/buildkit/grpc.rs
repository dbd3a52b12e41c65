//! The `buildkitd` backend: BuildKit's control API (gRPC) instead of the engine's `/build`
//! (ARCHITECTURE §7), here on the Docker Engine's own BuildKit, reached by upgrading `POST
//! /grpc` on the engine's socket to HTTP/2. [`solve`] (session, Solve, Status, cancellation)
//! also serves a standalone buildkitd ([`super::standalone`]).
//!
//! One build: open the control channel; open our own session (`Control/Session`, a byte stream
//! carrying HTTP/2 in which BuildKit is the client of our Health, Upload and Auth services);
//! `Solve` with the `dockerfile.v0` frontend whose context is the session's Upload (the sealed
//! context's tar, streamed in chunks) and the `moby` exporter into the engine's image store,
//! while `Status` of the same build ref becomes `Log` events; then the shared export (`docker
//! save` into the destination) and removal, as for the `docker` backend.
//!
//! Cancellation drops the `Solve` call: BuildKit cancels a solve whose caller went away, which
//! stops the running step. Must not: hold the whole context in memory, log or put in an error
//! any credential.

use std::collections::HashMap;
use std::io;
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll};
use std::time::Duration;

use bollard_buildkit_proto::moby::buildkit::v1::control_client::ControlClient;
use bollard_buildkit_proto::moby::buildkit::v1::{
    BytesMessage, DiskUsageRequest, ListWorkersRequest, PruneRequest, SolveRequest, SolveResponse,
    StatusRequest, StatusResponse,
};
use bytes::Bytes;
use futures_util::stream::BoxStream;
use futures_util::{FutureExt, StreamExt, TryFutureExt};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, DuplexStream};
use tokio_util::io::StreamReader;
use tokio_util::task::AbortOnDropHandle;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::{Request, Response, Status, Streaming};
use tracing::debug;

use super::cache::{signed_limit, unshared_bytes};
use super::log_events::{follow, BuildLog, Followed};
use super::progress::CacheProgress;
use super::session::{ContextUpload, FileReceiver, SessionServices};
use super::ssh_agent::Agent;
use super::{context_body, context_written, engine_unavailable, progress, BuildInput};
use crate::config::DaemonAddr;
use crate::error::{error_chain, ErrorCode, JobError, Stage};
use crate::job::BuildOptions;
use crate::ports::{CachePrune, StageContext};
use crate::workspace::random_hex;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The context URL that makes BuildKit pull the context from the session's Upload service,
/// before the build's unique name. Unique because BuildKit merges and caches HTTP sources by
/// URL: with one URL for every build, a build could get another build's context.
const UPLOAD_CONTEXT_PREFIX: &str = "http://buildkit-session/";

/// Bytes of HTTP/2 buffered between our session server and the `Session` stream.
const SESSION_BUFFER: usize = 64 * 1024;

/// How long the Status stream may still deliver lines after `Solve` answered.
const STATUS_GRACE: Duration = Duration::from_secs(2);

/// Whether the engine's BuildKit answers a control API call.
pub(super) async fn control_api_answers(host: &DaemonAddr) -> Result<(), String> {
    let channel = control_channel(host).await.map_err(|e| e.message)?;
    workers_answer(channel, &format!("BuildKit in the Docker Engine at {host}")).await
}

/// Prunes the cache of the engine's BuildKit through its control API on `/grpc`.
pub(super) async fn prune_engine_cache(
    host: &DaemonAddr,
    keep_bytes: u64,
) -> Result<CachePrune, String> {
    let channel = control_channel(host).await.map_err(|e| e.message)?;
    let who = format!("BuildKit in the Docker Engine at {host}");
    prune_cache(channel, keep_bytes, &who).await
}

/// Whether BuildKit on `channel` answers `ListWorkers`; `who` names it in the reason.
pub(super) async fn workers_answer(channel: Channel, who: &str) -> Result<(), String> {
    ControlClient::new(channel)
        .list_workers(ListWorkersRequest::default())
        .await
        .map(|_| ())
        .map_err(|e| format!("{who} does not answer: {}", e.message()))
}

/// Prunes the cache of the BuildKit on `channel` down to `keep_bytes` (see [`super::cache`]):
/// `DiskUsage` for its size, then, when it is above the limit, `Prune` with `all` and the limit;
/// the bytes reclaimed are those of the records Prune reports deleted. `who` names BuildKit in
/// the errors.
pub(super) async fn prune_cache(
    channel: Channel,
    keep_bytes: u64,
    who: &str,
) -> Result<CachePrune, String> {
    let mut control = ControlClient::new(channel);
    let usage = control
        .disk_usage(DiskUsageRequest::default())
        .await
        .map_err(|e| control_api_refused(who, "report its cache's size", &e))?
        .into_inner();
    let before_bytes = unshared_bytes(usage.record.iter().map(|r| (r.size, r.shared)));
    if keep_bytes == 0 || before_bytes <= keep_bytes {
        return Ok(CachePrune {
            before_bytes,
            reclaimed_bytes: 0,
        });
    }
    let mut deleted = control
        .prune(prune_request(signed_limit(keep_bytes)?))
        .await
        .map_err(|e| control_api_refused(who, "prune its cache", &e))?
        .into_inner();
    let mut reclaimed_bytes = 0u64;
    while let Some(record) = deleted
        .message()
        .await
        .map_err(|e| control_api_refused(who, "finish pruning its cache", &e))?
    {
        reclaimed_bytes += u64::try_from(record.size).unwrap_or(0);
    }
    Ok(CachePrune {
        before_bytes,
        reclaimed_bytes,
    })
}

/// `Prune` of every kind of record down to `limit`, under both of the limit's names. BuildKit
/// before 0.17 reads field 4 as `keepBytes` and ignores field 5; later ones read field 4 as
/// `reservedSpace` (a floor) and prune down to `maxUsedSpace` (field 5), and with field 5 unset
/// would delete everything.
fn prune_request(limit: i64) -> PruneRequest {
    PruneRequest {
        all: true,
        reserved_space: limit,
        max_used_space: limit,
        ..PruneRequest::default()
    }
}

/// Why a control API call for housekeeping failed, by what the caller can do about it.
fn control_api_refused(who: &str, what: &str, status: &Status) -> String {
    use tonic::Code;
    match status.code() {
        Code::Unavailable | Code::Cancelled => {
            format!("{who} is unavailable: {}", status.message())
        }
        Code::Unimplemented => format!(
            "{who} cannot {what}: its control API does not offer it ({})",
            status.message()
        ),
        code => format!("{who} could not {what} ({code:?}): {}", status.message()),
    }
}

/// Builds `image` into the engine's store through the control API; what the progress said of
/// the shared cache.
pub(super) async fn build_image(
    host: &DaemonAddr,
    image: &str,
    input: BuildInput<'_>,
    cx: &StageContext,
) -> Result<CacheProgress, JobError> {
    let channel = control_channel(host).await?;
    solve(channel, input, Exporter::moby(image), cx)
        .await
        .map(|solved| solved.cache)
}

/// A build BuildKit finished.
pub(super) struct Solved {
    /// The exporter's response attributes (`containerimage.digest`, …).
    pub(super) exporter_response: HashMap<String, String>,
    /// What the progress said of the shared cache.
    pub(super) cache: CacheProgress,
}

/// Where BuildKit puts the built image.
pub(super) struct Exporter {
    /// BuildKit's exporter name (`moby`, `image`, `oci`).
    pub(super) name: &'static str,
    pub(super) attrs: HashMap<String, String>,
    /// For exporters that send their output to the client (`oci`): the file it is written to.
    pub(super) file: Option<PathBuf>,
}

impl Exporter {
    /// Into the engine's image store as `image`.
    fn moby(image: &str) -> Exporter {
        Exporter {
            name: "moby",
            attrs: HashMap::from([("name".to_owned(), image.to_owned())]),
            file: None,
        }
    }
}

/// Runs one build on `channel` with our own session, importing and exporting the shared cache
/// `input` names.
pub(super) async fn solve(
    channel: Channel,
    input: BuildInput<'_>,
    exporter: Exporter,
    cx: &StageContext,
) -> Result<Solved, JobError> {
    let session_id = format!("factoryd-{}", random_hex(12));
    let build_ref = format!("factoryd-{}", random_hex(12));
    let mut attrs = frontend_attrs(
        input.context.dockerfile(),
        &format!("{UPLOAD_CONTEXT_PREFIX}{session_id}"),
        input.options,
    );
    if let Some(plan) = input.cache {
        plan.add_frontend_attrs(&mut attrs);
    }
    let solve_request = SolveRequest {
        r#ref: build_ref.clone(),
        session: session_id.clone(),
        frontend: "dockerfile.v0".to_owned(),
        frontend_attrs: attrs,
        exporter_deprecated: exporter.name.to_owned(),
        exporter_attrs_deprecated: exporter.attrs,
        cache: input.cache.map(|plan| plan.solve_options()),
        ..SolveRequest::default()
    };

    let agent = match &input.options.ssh {
        Some(key) => Some(Agent::start(key, &cx.workspace).await?),
        None => None,
    };
    let session_auth = input.session_auth();
    let (body, writer) = context_body(input.context);
    let mut services = SessionServices::new(session_auth, &input.options.secrets, agent);
    services.upload = Some(ContextUpload {
        body: Mutex::new(Some(body.boxed())),
    });
    services.file = exporter.file.map(FileReceiver);
    let session = open_session(channel.clone(), &session_id, services)
        .await
        .map_err(|e| {
            JobError::transient(
                Stage::Build,
                ErrorCode::Unavailable,
                format!("BuildKit refused a session: {}", e.message()),
            )
        })?;

    let mut status_client = ControlClient::new(channel.clone());
    let mut solve_client = ControlClient::new(channel);
    let (solved_tx, solved_rx) = tokio::sync::oneshot::channel::<()>();
    let solve = async move {
        let answer = solve_client.solve(solve_request).await;
        let _ = solved_tx.send(());
        Event::Solved(answer.map(Response::into_inner))
    }
    .into_stream();
    let status = async move {
        status_client
            .status(StatusRequest { r#ref: build_ref })
            .await
    }
    .map_ok(Response::into_inner)
    .try_flatten_stream()
    .take_until(async {
        let _ = solved_rx.await;
        tokio::time::sleep(STATUS_GRACE).await;
    })
    .map(Event::Status);

    let mut log = BuildLog::new(cx);
    let mut solved = None;
    // Dropping the Solve call (cancel) is what makes BuildKit stop the build.
    let followed = follow(
        futures_util::stream::select(solve, status),
        &mut log,
        |event, log| {
            match event {
                Event::Status(Ok(status)) => log.status(&status),
                Event::Status(Err(e)) => {
                    debug!(job.id = %cx.job_id, code = ?e.code(), "Build status stream failed.")
                }
                Event::Solved(answer) => solved = Some(answer),
            }
            ControlFlow::<()>::Continue(())
        },
    )
    .await;
    // Closes the Upload too: a context writer BuildKit never read to the end stops.
    drop(session);
    if let Followed::Cancelled = followed {
        return Err(JobError::cancelled(Stage::Build));
    }
    match solved {
        Some(Ok(answer)) => {
            context_written(writer, cx).await?;
            Ok(Solved {
                exporter_response: answer.exporter_response,
                cache: log.assembler().cache_progress(),
            })
        }
        Some(Err(status)) => {
            // A context that could not be written (an unsafe entry, a limit) ends the upload
            // early and explains the failure better than BuildKit's view of a cut tar.
            if writer.is_finished() {
                context_written(writer, cx).await?;
            }
            Err(solve_error(&status, log.assembler()))
        }
        None => Err(JobError::transient(
            Stage::Build,
            ErrorCode::Unavailable,
            "BuildKit ended the build without an answer",
        )),
    }
}

enum Event {
    Status(Result<StatusResponse, Status>),
    Solved(Result<SolveResponse, Status>),
}

/// The `dockerfile.v0` frontend's attributes: the same build as the `docker` backend's
/// `/build` parameters, with the context from the session's Upload and a forced pull.
fn frontend_attrs(
    dockerfile: &str,
    context_url: &str,
    options: &BuildOptions,
) -> HashMap<String, String> {
    let mut attrs = HashMap::from([
        ("filename".to_owned(), dockerfile.to_owned()),
        ("context".to_owned(), context_url.to_owned()),
        ("image-resolve-mode".to_owned(), "pull".to_owned()),
    ]);
    for (name, value) in &options.args {
        attrs.insert(format!("build-arg:{name}"), value.clone());
    }
    if let Some(target) = &options.target {
        attrs.insert("target".to_owned(), target.clone());
    }
    if let Some(platform) = &options.platform {
        attrs.insert("platform".to_owned(), platform.clone());
    }
    if options.no_cache {
        // Empty: no step may come from the cache.
        attrs.insert("no-cache".to_owned(), String::new());
    }
    attrs
}

/// Classifies a failed `Solve`: the engine going away is transient; otherwise BuildKit's
/// message is classified like the `docker` backend's.
fn solve_error(status: &Status, assembler: &progress::LogAssembler) -> JobError {
    use tonic::Code;
    let transport = matches!(status.code(), Code::Unavailable | Code::Cancelled)
        || (status.code() == Code::Unknown && status.message().starts_with("h2 protocol error"));
    if transport {
        return JobError::transient(
            Stage::Build,
            ErrorCode::Unavailable,
            format!("lost BuildKit during the build: {}", status.message()),
        );
    }
    progress::classify_build_error(status.message(), assembler.failed_step())
}

/// A gRPC channel to the engine's BuildKit; each connection is a new upgraded `POST /grpc`.
async fn control_channel(host: &DaemonAddr) -> Result<Channel, JobError> {
    let target = host.clone();
    Endpoint::from_static("http://docker-engine")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            upgraded_grpc(target.clone())
        }))
        .await
        .map_err(|e| engine_unavailable(host, error_chain(&e)))
}

async fn upgraded_grpc(host: DaemonAddr) -> Result<Upgraded, BoxError> {
    upgraded(&host, "/grpc", &[]).await
}

/// `POST path` on the engine at `host` with `Upgrade: h2c` and `headers`; the stream after
/// the engine's 101.
pub(super) async fn upgraded(
    host: &DaemonAddr,
    path: &str,
    headers: &[(&'static str, String)],
) -> Result<Upgraded, BoxError> {
    match host {
        DaemonAddr::Unix(socket) => {
            upgrade(
                tokio::net::UnixStream::connect(socket).await?,
                path,
                headers,
            )
            .await
        }
        DaemonAddr::Tcp { host, port } => {
            let stream = tokio::net::TcpStream::connect((host.as_str(), *port)).await?;
            upgrade(stream, path, headers).await
        }
    }
}

async fn upgrade<S>(
    stream: S,
    path: &str,
    headers: &[(&'static str, String)],
) -> Result<Upgraded, BoxError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.with_upgrades().await {
            debug!(error = %e, "An upgraded engine connection ended.");
        }
    });
    let mut request = hyper::Request::post(path)
        .header(hyper::header::HOST, "docker-engine")
        .header(hyper::header::CONNECTION, "Upgrade")
        .header(hyper::header::UPGRADE, "h2c");
    for (name, value) in headers {
        request = request.header(*name, value.as_str());
    }
    let request = request.body(http_body_util::Empty::<Bytes>::new())?;
    let response = sender.send_request(request).await?;
    if response.status() != hyper::StatusCode::SWITCHING_PROTOCOLS {
        return Err(format!(
            "POST {path} answered {} (an engine without BuildKit?)",
            response.status()
        )
        .into());
    }
    Ok(hyper::upgrade::on(response).await?)
}

/// Opens `Control/Session` and serves `services` on it until the returned handle is dropped.
async fn open_session(
    channel: Channel,
    session_id: &str,
    services: SessionServices,
) -> Result<AbortOnDropHandle<()>, Status> {
    let (ours, theirs) = tokio::io::duplex(SESSION_BUFFER);
    let outgoing = futures_util::stream::unfold(theirs, |mut theirs| async move {
        let mut buf = vec![0u8; SESSION_BUFFER];
        match theirs.read(&mut buf).await {
            Ok(0) | Err(_) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((BytesMessage { data: buf }, theirs))
            }
        }
    });
    let mut request = Request::new(outgoing);
    let metadata = request.metadata_mut();
    let id = session_id
        .parse()
        .map_err(|_| Status::internal("session id is not ASCII"))?;
    metadata.insert("x-docker-expose-session-uuid", id);
    for method in services.methods() {
        metadata.append(
            "x-docker-expose-session-grpc-method",
            tonic::metadata::MetadataValue::from_static(method),
        );
    }
    let incoming = ControlClient::new(channel)
        .session(request)
        .await?
        .into_inner();
    let transport = SessionTransport {
        incoming: StreamReader::new(incoming_bytes(incoming)),
        outgoing: ours,
    };
    Ok(services.serve(transport))
}

fn incoming_bytes(incoming: Streaming<BytesMessage>) -> BoxStream<'static, io::Result<Bytes>> {
    incoming
        .map(|message| {
            message
                .map(|m| Bytes::from(m.data))
                .map_err(io::Error::other)
        })
        .boxed()
}

/// The session's byte stream as one connection for our gRPC server.
struct SessionTransport {
    incoming: StreamReader<BoxStream<'static, io::Result<Bytes>>, Bytes>,
    outgoing: DuplexStream,
}

impl AsyncRead for SessionTransport {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.incoming).poll_read(cx, buf)
    }
}

impl AsyncWrite for SessionTransport {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.outgoing).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.outgoing).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.outgoing).poll_shutdown(cx)
    }
}

impl tonic::transport::server::Connected for SessionTransport {
    type ConnectInfo = ();
    fn connect_info(&self) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prune_caps_the_cache_for_old_and_new_buildkit_alike() {
        let request = prune_request(30 << 20);
        assert!(request.all);
        assert_eq!(request.keep_duration, 0);
        assert!(request.filter.is_empty());
        // Field 4 (`keepBytes` before BuildKit 0.17) and field 5 (`maxUsedSpace` since).
        assert_eq!(
            (request.reserved_space, request.max_used_space),
            (30 << 20, 30 << 20)
        );
        assert_eq!(request.min_free_space, 0);
    }

    #[test]
    fn frontend_attrs_carry_the_same_build_as_the_docker_backend() {
        let options = BuildOptions {
            args: [("TOKEN".to_owned(), "t".to_owned())].into(),
            target: Some("final".to_owned()),
            platform: Some("linux/amd64".to_owned()),
            no_cache: true,
            ..BuildOptions::default()
        };
        let attrs = frontend_attrs("sub/Dockerfile", "http://buildkit-session/x", &options);
        assert_eq!(attrs["filename"], "sub/Dockerfile");
        assert_eq!(attrs["context"], "http://buildkit-session/x");
        assert_eq!(attrs["image-resolve-mode"], "pull");
        assert_eq!(attrs["build-arg:TOKEN"], "t");
        assert_eq!(attrs["target"], "final");
        assert_eq!(attrs["platform"], "linux/amd64");
        assert_eq!(attrs["no-cache"], "");
        let plain = frontend_attrs(
            "Dockerfile",
            "http://buildkit-session/y",
            &BuildOptions::default(),
        );
        assert!(!plain.contains_key("no-cache") && !plain.contains_key("target"));
    }
}
