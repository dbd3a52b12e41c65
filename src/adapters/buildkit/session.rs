//! The BuildKit session factoryd serves for each build, on both backends: BuildKit (the
//! engine's or a standalone daemon) is the gRPC client of these services, over a byte stream
//! the build opens — `Control/Session` for the control API ([`super::grpc`]), the engine's
//! upgraded `POST /session` for its `/build` ([`open_engine_session`]).
//!
//! Services: Health; Auth (registry credentials by host: `Credentials` only, so BuildKit
//! fetches tokens itself); Secrets (the job's `build.secrets`, for `RUN
//! --mount=type=secret`); SSH (only with `build.ssh`: an agent holding the job's git key, for
//! `RUN --mount=type=ssh`); Upload (the context, control API only) and FileSend (an exporter's
//! output to us). A method not announced is never called. Must not: log or put in an error
//! any credential, secret or key.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use bollard_buildkit_proto::health::health_check_response::ServingStatus;
use bollard_buildkit_proto::health::health_server::{Health, HealthServer};
use bollard_buildkit_proto::health::{
    HealthCheckRequest, HealthCheckResponse, HealthListRequest, HealthListResponse,
};
use bollard_buildkit_proto::moby::buildkit::secrets::v1::secrets_server::{Secrets, SecretsServer};
use bollard_buildkit_proto::moby::buildkit::secrets::v1::{GetSecretRequest, GetSecretResponse};
use bollard_buildkit_proto::moby::filesync::v1::auth_server::{Auth, AuthServer};
use bollard_buildkit_proto::moby::filesync::v1::file_send_server::{FileSend, FileSendServer};
use bollard_buildkit_proto::moby::filesync::v1::BytesMessage as FileBytes;
use bollard_buildkit_proto::moby::filesync::v1::{
    CredentialsRequest, CredentialsResponse, FetchTokenRequest, FetchTokenResponse,
    GetTokenAuthorityRequest, GetTokenAuthorityResponse, VerifyTokenAuthorityRequest,
    VerifyTokenAuthorityResponse,
};
use bollard_buildkit_proto::moby::sshforward::v1::ssh_server::{Ssh, SshServer};
use bollard_buildkit_proto::moby::sshforward::v1::{
    BytesMessage as SshBytes, CheckAgentRequest, CheckAgentResponse,
};
use bollard_buildkit_proto::moby::upload::v1::upload_server::{Upload, UploadServer};
use bollard_buildkit_proto::moby::upload::v1::BytesMessage as UploadBytes;
use bytes::Bytes;
use futures_util::stream::BoxStream;
use futures_util::StreamExt;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio_util::task::AbortOnDropHandle;
use tonic::{Request, Response, Status, Streaming};
use tracing::debug;

use super::ssh_agent::Agent;
use crate::config::DaemonAddr;
use crate::error::{error_chain, ErrorCode, JobError, Stage};
use crate::ports::BasicAuth;
use crate::secret::Secret;

/// The services of one build's session.
pub(super) struct SessionServices {
    pub(super) auth: SessionAuth,
    pub(super) secrets: SessionSecrets,
    pub(super) ssh: Option<SessionSsh>,
    /// The context, for the control API (`/build` sends it as the request body).
    pub(super) upload: Option<ContextUpload>,
    pub(super) file: Option<FileReceiver>,
}

impl SessionServices {
    /// Registry credentials by host, the job's build secrets, and its SSH agent if any.
    pub(super) fn new(
        by_host: HashMap<String, BasicAuth>,
        secrets: &BTreeMap<String, Secret>,
        agent: Option<Agent>,
    ) -> SessionServices {
        SessionServices {
            auth: SessionAuth { by_host },
            secrets: SessionSecrets {
                by_id: secrets.clone(),
            },
            ssh: agent.map(|agent| SessionSsh {
                agent: Arc::new(agent),
            }),
            upload: None,
            file: None,
        }
    }

    /// The methods to announce: BuildKit calls only these.
    pub(super) fn methods(&self) -> Vec<&'static str> {
        let mut methods = vec![
            "/grpc.health.v1.Health/Check",
            "/moby.filesync.v1.Auth/Credentials",
            "/moby.buildkit.secrets.v1.Secrets/GetSecret",
        ];
        if self.ssh.is_some() {
            methods.push("/moby.sshforward.v1.SSH/CheckAgent");
            methods.push("/moby.sshforward.v1.SSH/ForwardAgent");
        }
        if self.upload.is_some() {
            methods.push("/moby.upload.v1.Upload/Pull");
        }
        if self.file.is_some() {
            methods.push("/moby.filesync.v1.FileSend/DiffCopy");
        }
        methods
    }

    /// Serves the services on `transport` (one connection, BuildKit the client) until the
    /// returned handle is dropped.
    pub(super) fn serve<T>(self, transport: T) -> AbortOnDropHandle<()>
    where
        T: AsyncRead + AsyncWrite + tonic::transport::server::Connected + Unpin + Send + 'static,
    {
        let server = tonic::transport::Server::builder()
            .add_service(HealthServer::new(Healthy))
            .add_service(AuthServer::new(self.auth))
            .add_service(SecretsServer::new(self.secrets))
            .add_optional_service(self.ssh.map(SshServer::new))
            .add_optional_service(self.upload.map(UploadServer::new))
            .add_optional_service(self.file.map(FileSendServer::new))
            .serve_with_incoming(futures_util::stream::iter([Ok::<_, io::Error>(transport)]));
        AbortOnDropHandle::new(tokio::spawn(async move {
            if let Err(e) = server.await {
                debug!(error = %e, "The build session ended.");
            }
        }))
    }
}

/// Opens a session on the engine at `host` (`POST /session`, upgraded to h2c, the engine the
/// gRPC client) and serves `services` on it until the returned handle is dropped; `/build`
/// with `session = session_id` then uses it.
pub(super) async fn open_engine_session(
    host: &DaemonAddr,
    session_id: &str,
    services: SessionServices,
) -> Result<AbortOnDropHandle<()>, JobError> {
    let mut headers = vec![("X-Docker-Expose-Session-Uuid", session_id.to_owned())];
    for method in services.methods() {
        headers.push(("X-Docker-Expose-Session-Grpc-Method", method.to_owned()));
    }
    let upgraded = super::grpc::upgraded(host, "/session", &headers)
        .await
        .map_err(|e| {
            JobError::transient(
                Stage::Build,
                ErrorCode::Unavailable,
                format!(
                    "the Docker Engine at {host} refused a build session: {}",
                    error_chain(&*e)
                ),
            )
        })?;
    Ok(services.serve(Upgraded(TokioIo::new(upgraded))))
}

/// An upgraded engine connection as one connection for our gRPC server.
struct Upgraded(TokioIo<hyper::upgrade::Upgraded>);

impl AsyncRead for Upgraded {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for Upgraded {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        std::pin::Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl tonic::transport::server::Connected for Upgraded {
    type ConnectInfo = ();
    fn connect_info(&self) {}
}

/// The job's build secrets by id. A secret the job lacks is "not found", which fails a `RUN`
/// that requires it (`required=false` mounts nothing).
pub(super) struct SessionSecrets {
    by_id: BTreeMap<String, Secret>,
}

#[tonic::async_trait]
impl Secrets for SessionSecrets {
    async fn get_secret(
        &self,
        request: Request<GetSecretRequest>,
    ) -> Result<Response<GetSecretResponse>, Status> {
        let id = &request.get_ref().id;
        match self.by_id.get(id) {
            Some(secret) => Ok(Response::new(GetSecretResponse {
                data: secret.expose().as_bytes().to_vec(),
            })),
            None => Err(Status::not_found(format!(
                "the job has no build secret {id:?} (build.secrets)"
            ))),
        }
    }
}

/// SSH forwarding to the build's agent, under the id `default` only.
pub(super) struct SessionSsh {
    agent: Arc<Agent>,
}

/// The metadata key under which BuildKit names the SSH id it forwards.
const SSH_ID_KEY: &str = "buildkit.ssh.id";

fn check_ssh_id(id: &str) -> Result<(), Status> {
    if id.is_empty() || id == "default" {
        Ok(())
    } else {
        Err(Status::not_found(format!(
            "only the SSH id \"default\" is forwarded (the job's key), not {id:?}"
        )))
    }
}

#[tonic::async_trait]
impl Ssh for SessionSsh {
    async fn check_agent(
        &self,
        request: Request<CheckAgentRequest>,
    ) -> Result<Response<CheckAgentResponse>, Status> {
        check_ssh_id(&request.get_ref().id)?;
        Ok(Response::new(CheckAgentResponse {}))
    }

    type ForwardAgentStream = BoxStream<'static, Result<SshBytes, Status>>;

    /// One agent connection, bytes both ways until either side ends.
    async fn forward_agent(
        &self,
        request: Request<Streaming<SshBytes>>,
    ) -> Result<Response<Self::ForwardAgentStream>, Status> {
        if let Some(id) = request.metadata().get(SSH_ID_KEY) {
            check_ssh_id(id.to_str().unwrap_or("?"))?;
        }
        let socket = self
            .agent
            .connect()
            .await
            .map_err(|e| Status::unavailable(format!("the build's SSH agent: {e}")))?;
        let (read, mut write) = socket.into_split();
        let mut incoming = request.into_inner();
        tokio::spawn(async move {
            while let Some(Ok(message)) = incoming.next().await {
                if write.write_all(&message.data).await.is_err() {
                    break;
                }
            }
            let _ = write.shutdown().await;
        });
        let outgoing = tokio_util::io::ReaderStream::new(read).map(|chunk| {
            chunk
                .map(|data| SshBytes {
                    data: data.to_vec(),
                })
                .map_err(|e| Status::unavailable(format!("the build's SSH agent: {e}")))
        });
        Ok(Response::new(outgoing.boxed()))
    }
}

struct Healthy;

#[tonic::async_trait]
impl Health for Healthy {
    async fn check(
        &self,
        _: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        Ok(Response::new(HealthCheckResponse {
            status: ServingStatus::Serving as i32,
        }))
    }

    async fn list(
        &self,
        _: Request<HealthListRequest>,
    ) -> Result<Response<HealthListResponse>, Status> {
        Err(Status::unimplemented("not offered"))
    }

    type WatchStream = BoxStream<'static, Result<HealthCheckResponse, Status>>;

    async fn watch(
        &self,
        _: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        Err(Status::unimplemented("not offered"))
    }
}

/// The build context, sent once, as it is written.
pub(super) struct ContextUpload {
    pub(super) body: Mutex<Option<BoxStream<'static, Bytes>>>,
}

#[tonic::async_trait]
impl Upload for ContextUpload {
    type PullStream = BoxStream<'static, Result<UploadBytes, Status>>;

    async fn pull(
        &self,
        _: Request<Streaming<UploadBytes>>,
    ) -> Result<Response<Self::PullStream>, Status> {
        let body = self
            .body
            .lock()
            .map_err(|_| Status::internal("upload state poisoned"))?
            .take()
            .ok_or_else(|| Status::failed_precondition("the build context was already sent"))?;
        let chunks = body.map(|chunk| {
            Ok(UploadBytes {
                data: chunk.to_vec(),
            })
        });
        Ok(Response::new(chunks.boxed()))
    }
}

/// The exporter's output (one tar stream), written to a file as it arrives.
pub(super) struct FileReceiver(pub(super) PathBuf);

#[tonic::async_trait]
impl FileSend for FileReceiver {
    /// Nothing goes back to BuildKit.
    type DiffCopyStream = futures_util::stream::Empty<Result<FileBytes, Status>>;

    async fn diff_copy(
        &self,
        request: Request<Streaming<FileBytes>>,
    ) -> Result<Response<Self::DiffCopyStream>, Status> {
        let local = |e: io::Error| Status::internal(format!("cannot write the export: {e}"));
        let mut file = tokio::fs::File::create(&self.0).await.map_err(local)?;
        let mut input = request.into_inner();
        while let Some(message) = input.next().await {
            file.write_all(&message?.data).await.map_err(local)?;
        }
        file.sync_all().await.map_err(local)?;
        Ok(Response::new(futures_util::stream::empty()))
    }
}

/// Registry credentials by host, as BuildKit asks for them. Never logs what it answers.
pub(super) struct SessionAuth {
    pub(super) by_host: HashMap<String, BasicAuth>,
}

#[tonic::async_trait]
impl Auth for SessionAuth {
    async fn credentials(
        &self,
        request: Request<CredentialsRequest>,
    ) -> Result<Response<CredentialsResponse>, Status> {
        let answer = match self.by_host.get(&request.get_ref().host) {
            Some(basic) => CredentialsResponse {
                username: basic.username.clone(),
                secret: basic.password.expose().to_owned(),
            },
            // Anonymous.
            None => CredentialsResponse::default(),
        };
        Ok(Response::new(answer))
    }

    async fn fetch_token(
        &self,
        _: Request<FetchTokenRequest>,
    ) -> Result<Response<FetchTokenResponse>, Status> {
        Err(Status::unimplemented("not offered"))
    }

    async fn get_token_authority(
        &self,
        _: Request<GetTokenAuthorityRequest>,
    ) -> Result<Response<GetTokenAuthorityResponse>, Status> {
        Err(Status::unimplemented("not offered"))
    }

    async fn verify_token_authority(
        &self,
        _: Request<VerifyTokenAuthorityRequest>,
    ) -> Result<Response<VerifyTokenAuthorityResponse>, Status> {
        Err(Status::unimplemented("not offered"))
    }
}
