//! Feasibility spike for issue #5's `buildkitd` backend (throwaway; not a factoryd command):
//! BuildKit's control API over a Docker Engine's `POST /grpc` (HTTP/1.1 upgrade to h2c on the
//! engine's unix socket) as the transport of a `tonic::transport::Channel`.
//!
//! ```text
//! grpc_spike probe   SOCK   list_workers + disk_usage on the upgraded channel
//! grpc_spike build   SOCK   bollard's BuildkitChannel session (via BuildkitDaemon, see below)
//!                           + moby exporter, with a live Status() on a clone of the channel
//! grpc_spike build-run SOCK the same with a RUN step (host's static busybox) printing 3 lines
//! grpc_spike moby    SOCK   the same build with bollard's Moby driver (/session + /grpc)
//! grpc_spike session SOCK  raw SolveRequests (moby, tar, local) with a hand-made /session
//! grpc_spike exporters SOCK which exporters the engine resolves (bollard Export/Image paths
//!                           and raw SolveRequests)
//! ```
//! Engine: `examples/grpc_spike_engine.sh start DIR` (as root; private socket DIR/docker.sock,
//! data root and bridge `fdkspike0`, as tests/integration/support/docker.rs), `... stop DIR`.
//!
//! bollard 0.21.1's `BuildkitChannel` implements only the crate-private `Driver` trait (no
//! `Build`/`Export`/`Image`), so its session code is reached through `BuildkitDaemon`, whose
//! `grpc_handle` is `BuildkitChannel::new(endpoint.connect()).grpc_handle(..)`: the endpoint is a
//! loopback TCP listener that, per connection, opens an upgraded `/grpc` stream and splices it.
//!
//! Observed on Debian 12's docker.io 20.10.24: `/grpc` answers 101; ListWorkers (`moby`,
//! linux/amd64, linux/386) and DiskUsage answer; the BuildkitChannel session (Control.Session)
//! and the Moby driver both build `FROM scratch` into the engine's store with exporter `moby`;
//! Status on a second client streams vertexes and RUN output live. Exporters: `moby`, `tar`
//! (a rootfs tar, not an image), `local` resolve; `oci`, `docker`, `image` fail with
//! `exporter "NAME" could not be found`.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bollard::grpc::build::{ImageBuildFrontendOptions, ImageBuildLoadInput};
use bollard::grpc::driver::buildkitd::BuildkitDaemon;
use bollard::grpc::driver::moby::Moby;
use bollard::grpc::driver::{Build, Export, Image, ImageExporterEnum};
use bollard::grpc::export::ImageExporterOutput;
use bollard::grpc::registry::ImageRegistryOutput;
use bollard::grpc::BuildRef;
use bollard::moby::buildkit::v1::control_client::ControlClient;
use bollard::moby::buildkit::v1::{
    DiskUsageRequest, ListWorkersRequest, SolveRequest, StatusRequest,
};
use bytes::Bytes;
use futures_util::StreamExt;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// `POST /grpc` with `Upgrade: h2c` on the engine's socket; the 101's upgraded stream.
async fn upgrade_grpc(sock: PathBuf) -> Result<Upgraded, BoxError> {
    let stream = tokio::net::UnixStream::connect(&sock).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            eprintln!("upgrade connection: {e}");
        }
    });
    let req = hyper::Request::post("/grpc")
        .header(hyper::header::HOST, "engine")
        .header(hyper::header::CONNECTION, "Upgrade")
        .header(hyper::header::UPGRADE, "h2c")
        .body(http_body_util::Empty::<Bytes>::new())?;
    let resp = sender.send_request(req).await?;
    if resp.status() != hyper::StatusCode::SWITCHING_PROTOCOLS {
        return Err(format!("POST /grpc: {} {:?}", resp.status(), resp.headers()).into());
    }
    eprintln!("POST /grpc: {} {:?}", resp.status(), resp.headers());
    Ok(hyper::upgrade::on(resp).await?)
}

/// A tonic channel whose every connection is a fresh upgraded `/grpc` stream. `Upgraded` is
/// already `hyper::rt::Read + Write`, which is what tonic 0.14's connector wants (a `TokioIo`
/// around it would be tokio-IO, not hyper-IO).
async fn engine_channel(sock: &Path) -> Result<Channel, BoxError> {
    let sock = sock.to_path_buf();
    let channel = Endpoint::from_static("http://engine")
        .connect_with_connector(tower::service_fn(move |_uri| upgrade_grpc(sock.clone())))
        .await?;
    Ok(channel)
}

/// A loopback TCP endpoint that splices each connection onto a new upgraded `/grpc` stream.
async fn tcp_bridge(sock: &Path) -> Result<Endpoint, BoxError> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let sock = sock.to_path_buf();
    tokio::spawn(async move {
        loop {
            let Ok((mut tcp, _)) = listener.accept().await else {
                return;
            };
            let sock = sock.clone();
            tokio::spawn(async move {
                match upgrade_grpc(sock).await {
                    Ok(up) => {
                        let mut up = TokioIo::new(up);
                        let _ = tokio::io::copy_bidirectional(&mut tcp, &mut up).await;
                    }
                    Err(e) => eprintln!("bridge: {e}"),
                }
            });
        }
    });
    Ok(Endpoint::from_shared(format!("http://{addr}"))?)
}

/// `FROM scratch` + `COPY hello.txt`, gzip tar. With `run`: also the host's static busybox
/// copied in and a RUN step that prints three lines a second apart (to see logs arrive live).
fn context_tar(run: bool) -> Bytes {
    let mut tar = tar::Builder::new(Vec::new());
    let mut files: Vec<(&str, Vec<u8>, u32)> = vec![
        (
            "Dockerfile",
            b"FROM scratch\nCOPY hello.txt /hello.txt\n".to_vec(),
            0o644,
        ),
        ("hello.txt", b"hello from the grpc spike\n".to_vec(), 0o644),
    ];
    if run {
        files[0].1 = b"FROM scratch\nCOPY hello.txt /hello.txt\nCOPY busybox /bin/busybox\n\
RUN [\"/bin/busybox\", \"sh\", \"-c\", \"for i in 1 2 3; do echo line $i; /bin/busybox sleep 1; done\"]\n"
            .to_vec();
        files.push((
            "busybox",
            std::fs::read("/bin/busybox").expect("/bin/busybox"),
            0o755,
        ));
    }
    for (name, data, mode) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(mode);
        h.set_cksum();
        tar.append_data(&mut h, name, &data[..]).unwrap();
    }
    let raw = tar.into_inner().unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&raw).unwrap();
    Bytes::from(gz.finish().unwrap())
}

fn opts() -> ImageBuildFrontendOptions {
    ImageBuildFrontendOptions::builder().build()
}

/// Prints the Status stream of `build_ref` as it arrives, with ms since `t0`.
async fn watch_status(channel: Channel, build_ref: String, t0: Instant) {
    let mut control = ControlClient::new(channel);
    let mut stream = match control
        .status(StatusRequest {
            r#ref: build_ref.clone(),
        })
        .await
    {
        Ok(s) => s.into_inner(),
        Err(e) => {
            println!("[status] call failed: {e:?}");
            return;
        }
    };
    println!("[status +{}ms] stream open", t0.elapsed().as_millis());
    loop {
        match stream.next().await {
            Some(Ok(msg)) => {
                let ms = t0.elapsed().as_millis();
                for v in &msg.vertexes {
                    println!(
                        "[status +{ms}ms] vertex {} {:?} started={} completed={} error={:?}",
                        &v.digest[..v.digest.len().min(19)],
                        v.name,
                        v.started.is_some(),
                        v.completed.is_some(),
                        v.error
                    );
                }
                for s in &msg.statuses {
                    println!("[status +{ms}ms] status {} {}/{}", s.id, s.current, s.total);
                }
                for l in &msg.logs {
                    println!(
                        "[status +{ms}ms] log fd={} {:?}",
                        l.stream,
                        String::from_utf8_lossy(&l.msg)
                    );
                }
            }
            Some(Err(e)) => {
                println!("[status +{}ms] error: {e:?}", t0.elapsed().as_millis());
                return;
            }
            None => {
                println!("[status +{}ms] stream end", t0.elapsed().as_millis());
                return;
            }
        }
    }
}

async fn probe(sock: &Path) -> Result<(), BoxError> {
    let channel = engine_channel(sock).await?;
    println!("channel: connected");
    let mut control = ControlClient::new(channel.clone());
    match control
        .list_workers(ListWorkersRequest { filter: vec![] })
        .await
    {
        Ok(r) => {
            for w in r.into_inner().record {
                println!(
                    "list_workers: id={} platforms={:?} labels={:?}",
                    w.id,
                    w.platforms
                        .iter()
                        .map(|p| format!("{}/{}", p.os, p.architecture))
                        .collect::<Vec<_>>(),
                    w.labels
                );
            }
        }
        Err(e) => println!("list_workers: error {e:?}"),
    }
    let mut control = ControlClient::new(channel);
    match control
        .disk_usage(DiskUsageRequest {
            filter: vec![],
            ..Default::default()
        })
        .await
    {
        Ok(r) => println!("disk_usage: {} records", r.into_inner().record.len()),
        Err(e) => println!("disk_usage: error {e:?}"),
    }
    Ok(())
}

async fn docker(sock: &Path) -> Result<bollard::Docker, BoxError> {
    let d = bollard::Docker::connect_with_unix(
        &sock.to_string_lossy(),
        120,
        bollard::API_DEFAULT_VERSION,
    )?;
    Ok(d.negotiate_version().await?)
}

async fn show_images(sock: &Path) {
    let out = std::process::Command::new("/usr/bin/docker")
        .args(["-H", &format!("unix://{}", sock.display()), "image", "ls"])
        .output()
        .expect("docker image ls");
    println!(
        "docker image ls:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The build through `BuildkitChannel` (reached via `BuildkitDaemon` on the TCP bridge), with a
/// second ControlClient on a clone of the upgraded channel watching Status.
async fn build(sock: &Path, name: &str, run: bool) -> Result<(), BoxError> {
    let channel = engine_channel(sock).await?;
    let endpoint = tcp_bridge(sock).await?;
    let build_ref = BuildRef::random();
    let t0 = Instant::now();
    let watcher = tokio::spawn(watch_status(
        channel.clone(),
        build_ref.as_ref().to_string(),
        t0,
    ));
    let res = BuildkitDaemon::new(endpoint)
        .docker_build(
            name,
            opts(),
            ImageBuildLoadInput::Upload(context_tar(run)),
            None,
            Some(build_ref),
        )
        .await;
    println!(
        "[build +{}ms] docker_build: {res:?}",
        t0.elapsed().as_millis()
    );
    let _ = tokio::time::timeout(Duration::from_secs(5), watcher).await;
    show_images(sock).await;
    Ok(())
}

async fn moby(sock: &Path, name: &str) -> Result<(), BoxError> {
    let docker = docker(sock).await?;
    let channel = engine_channel(sock).await?;
    let build_ref = BuildRef::random();
    let t0 = Instant::now();
    let watcher = tokio::spawn(watch_status(channel, build_ref.as_ref().to_string(), t0));
    let res = Moby::new(&docker)
        .docker_build(
            name,
            opts(),
            ImageBuildLoadInput::Upload(context_tar(false)),
            None,
            Some(build_ref),
        )
        .await;
    println!(
        "[moby +{}ms] docker_build: {res:?}",
        t0.elapsed().as_millis()
    );
    let _ = tokio::time::timeout(Duration::from_secs(5), watcher).await;
    show_images(sock).await;
    Ok(())
}

async fn exporters(sock: &Path) -> Result<(), BoxError> {
    let endpoint = tcp_bridge(sock).await?;
    let out = std::env::temp_dir().join("grpc-spike-out");
    std::fs::create_dir_all(&out)?;
    for (label, req) in [
        (
            "oci",
            ImageExporterEnum::OCI(
                ImageExporterOutput::builder("spike/oci:1").dest(&out.join("oci.tar")),
            ),
        ),
        (
            "docker",
            ImageExporterEnum::Docker(
                ImageExporterOutput::builder("spike/docker:1").dest(&out.join("docker.tar")),
            ),
        ),
    ] {
        let res = BuildkitDaemon::new(endpoint.clone())
            .export(
                req,
                opts(),
                ImageBuildLoadInput::Upload(context_tar(false)),
                None,
                None,
            )
            .await;
        println!("bollard Export {label}: {res:?}");
    }
    let push = ImageRegistryOutput::builder("127.0.0.1:5999/spike/push:1")
        .push(true)
        .insecure_registry(true)
        .consume();
    let res = BuildkitDaemon::new(endpoint.clone())
        .registry(
            push,
            opts(),
            ImageBuildLoadInput::Upload(context_tar(false)),
            None,
            None,
        )
        .await;
    println!("bollard Image::registry (image, push): {res:?}");

    // Raw SolveRequests: no session, no definition; only the exporter name and attrs.
    let channel = engine_channel(sock).await?;
    for (exporter, attrs) in [
        ("moby", vec![("name", "spike/raw:moby")]),
        ("oci", vec![("name", "spike/raw:oci")]),
        ("docker", vec![("name", "spike/raw:docker")]),
        (
            "image",
            vec![("name", "127.0.0.1:5999/spike/raw:image"), ("push", "true")],
        ),
        ("tar", vec![]),
        ("local", vec![]),
        ("nonsense", vec![]),
    ] {
        let mut control = ControlClient::new(channel.clone());
        let res = tokio::time::timeout(
            Duration::from_secs(15),
            control.solve(SolveRequest {
                r#ref: BuildRef::random().into(),
                exporter_deprecated: exporter.to_string(),
                exporter_attrs_deprecated: attrs
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect::<HashMap<_, _>>(),
                ..Default::default()
            }),
        )
        .await;
        let Ok(res) = res else {
            println!("raw Solve {exporter}: no answer in 15 s");
            continue;
        };
        match res {
            Ok(r) => println!("raw Solve {exporter}: ok {:?}", r.into_inner()),
            Err(e) => println!("raw Solve {exporter}: {:?} {:?}", e.code(), e.message()),
        }
    }
    Ok(())
}

// ---- A hand-made session on the engine's `/session` endpoint (the engine is the gRPC client
// ---- there): Upload (the context), FileSend (the `tar` exporter's output), Health. For raw
// ---- SolveRequests with exporters bollard's drivers cannot name.

use bollard::health::health_server::{Health, HealthServer};
use bollard::health::{
    health_check_response::ServingStatus, HealthCheckRequest, HealthCheckResponse,
    HealthListRequest, HealthListResponse,
};
use bollard::moby::filesync::v1::file_send_server::{FileSend, FileSendServer};
use bollard::moby::filesync::v1::BytesMessage as FsBytes;
use bollard::moby::upload::v1::upload_server::{Upload, UploadServer};
use bollard::moby::upload::v1::BytesMessage as UpBytes;
use std::pin::Pin;
use std::task::{Context, Poll};
use tonic::{Request, Response, Status, Streaming};

type Out<T> = Pin<Box<dyn futures_util::Stream<Item = Result<T, Status>> + Send>>;

struct SessionIo(TokioIo<Upgraded>);
impl tokio::io::AsyncRead for SessionIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}
impl tokio::io::AsyncWrite for SessionIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}
impl tonic::transport::server::Connected for SessionIo {
    type ConnectInfo = ();
    fn connect_info(&self) {}
}

struct Ctx(Bytes);
#[tonic::async_trait]
impl Upload for Ctx {
    type PullStream = Out<UpBytes>;
    async fn pull(&self, _: Request<Streaming<UpBytes>>) -> Result<Response<Out<UpBytes>>, Status> {
        let chunks: Vec<Result<UpBytes, Status>> = self
            .0
            .chunks(32 * 1024)
            .map(|c| Ok(UpBytes { data: c.to_vec() }))
            .collect();
        Ok(Response::new(Box::pin(futures_util::stream::iter(chunks))))
    }
}

struct Sink(PathBuf);
#[tonic::async_trait]
impl FileSend for Sink {
    type DiffCopyStream = Out<FsBytes>;
    async fn diff_copy(
        &self,
        req: Request<Streaming<FsBytes>>,
    ) -> Result<Response<Out<FsBytes>>, Status> {
        println!("[session] FileSend.DiffCopy metadata {:?}", req.metadata());
        let mut input = req.into_inner();
        let mut file =
            std::fs::File::create(&self.0).map_err(|e| Status::internal(e.to_string()))?;
        let mut total = 0usize;
        while let Some(msg) = input.next().await {
            let msg = msg?;
            total += msg.data.len();
            file.write_all(&msg.data)
                .map_err(|e| Status::internal(e.to_string()))?;
        }
        println!(
            "[session] FileSend.DiffCopy wrote {total} bytes to {}",
            self.0.display()
        );
        Ok(Response::new(Box::pin(futures_util::stream::empty())))
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
        Err(Status::unimplemented("list"))
    }
    type WatchStream = Out<HealthCheckResponse>;
    async fn watch(
        &self,
        _: Request<HealthCheckRequest>,
    ) -> Result<Response<Out<HealthCheckResponse>>, Status> {
        Err(Status::unimplemented("watch"))
    }
}

/// `POST /session` (upgrade h2c) announcing our methods; serves them on the upgraded stream.
async fn open_session(sock: &Path, id: &str, context: Bytes, out: PathBuf) -> Result<(), BoxError> {
    let stream = tokio::net::UnixStream::connect(sock).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    let mut req = hyper::Request::post("/session")
        .header(hyper::header::HOST, "engine")
        .header(hyper::header::CONNECTION, "Upgrade")
        .header(hyper::header::UPGRADE, "h2c")
        .header("X-Docker-Expose-Session-Uuid", id)
        .header("X-Docker-Expose-Session-Name", "grpc-spike")
        .header("X-Docker-Expose-Session-Sharedkey", "grpc-spike");
    for m in [
        "/grpc.health.v1.Health/Check",
        "/moby.upload.v1.Upload/Pull",
        "/moby.filesync.v1.FileSend/DiffCopy",
    ] {
        req = req.header("X-Docker-Expose-Session-Grpc-Method", m);
    }
    let resp = sender
        .send_request(req.body(http_body_util::Empty::<Bytes>::new())?)
        .await?;
    if resp.status() != hyper::StatusCode::SWITCHING_PROTOCOLS {
        return Err(format!("POST /session: {}", resp.status()).into());
    }
    let io = SessionIo(TokioIo::new(hyper::upgrade::on(resp).await?));
    tokio::spawn(async move {
        let res = tonic::transport::Server::builder()
            .add_service(HealthServer::new(Healthy))
            .add_service(UploadServer::new(Ctx(context)))
            .add_service(FileSendServer::new(Sink(out)))
            .serve_with_incoming(futures_util::stream::iter(vec![Ok::<_, std::io::Error>(
                io,
            )]))
            .await;
        println!("[session] server ended: {res:?}");
    });
    Ok(())
}

/// Raw SolveRequest (dockerfile.v0 frontend, context uploaded through our session) with any
/// exporter name.
async fn raw_session_solve(
    sock: &Path,
    exporter: &str,
    attrs: &[(&str, &str)],
) -> Result<(), BoxError> {
    let id = BuildRef::random().as_ref().to_string();
    let out = std::env::temp_dir().join(format!("grpc-spike-out/{exporter}.out"));
    std::fs::create_dir_all(out.parent().unwrap())?;
    open_session(sock, &id, context_tar(false), out).await?;
    let channel = engine_channel(sock).await?;
    let mut control = ControlClient::new(channel);
    let mut frontend_attrs = HashMap::new();
    frontend_attrs.insert(
        "context".to_string(),
        "http://buildkit-session/spike".to_string(),
    );
    let res = tokio::time::timeout(
        Duration::from_secs(60),
        control.solve(SolveRequest {
            r#ref: BuildRef::random().into(),
            session: id,
            frontend: "dockerfile.v0".to_string(),
            frontend_attrs,
            exporter_deprecated: exporter.to_string(),
            exporter_attrs_deprecated: attrs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        }),
    )
    .await;
    match res {
        Err(_) => println!("session Solve {exporter}: no answer in 60 s"),
        Ok(Ok(r)) => println!(
            "session Solve {exporter}: ok {:?}",
            r.into_inner().exporter_response
        ),
        Ok(Err(e)) => println!("session Solve {exporter}: {:?} {:?}", e.code(), e.message()),
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let args: Vec<String> = std::env::args().collect();
    let (cmd, sock) = match &args[..] {
        [_, cmd, sock] => (cmd.as_str(), PathBuf::from(sock)),
        _ => return Err("usage: grpc_spike probe|build|build-run|moby|exporters SOCK".into()),
    };
    match cmd {
        "probe" => probe(&sock).await,
        "build" => build(&sock, "spike/channel:latest", false).await,
        "build-run" => build(&sock, "spike/channel-run:latest", true).await,
        "moby" => moby(&sock, "spike/moby:latest").await,
        "exporters" => exporters(&sock).await,
        "session" => {
            raw_session_solve(&sock, "moby", &[("name", "spike/session:moby")]).await?;
            raw_session_solve(&sock, "tar", &[]).await?;
            raw_session_solve(&sock, "local", &[]).await
        }
        _ => Err(format!("unknown command {cmd}").into()),
    }
}
