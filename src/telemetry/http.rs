//! `/metrics`, `/healthz` and `/readyz` on `metrics.listen`.
//!
//! A deliberately small HTTP/1.1 responder (GET only, one request per connection, bounded
//! request size): the endpoints are scraped by Prometheus and probed by load balancers, and a
//! web framework would be most of the daemon's dependency tree.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::metrics::metrics;
use crate::adapters::nats::ConnectionState;

/// What `/readyz` checks.
pub struct Health {
    pub nats: Arc<ConnectionState>,
    pub draining: AtomicBool,
    pub work_root: PathBuf,
    /// Why the build backend is not reachable, from the last probe; `None` when it is (or
    /// this worker does not build).
    pub builder_down: std::sync::Mutex<Option<String>>,
    /// `worker.min_free_mib` in bytes; 0: no limit.
    pub min_free_bytes: u64,
    /// The OCI layout store, when jobs are stored there: watched like the work root when it is
    /// on another file system.
    pub store: Option<PathBuf>,
}

impl Health {
    pub fn new(nats: Arc<ConnectionState>, work_root: PathBuf) -> Self {
        Health {
            nats,
            draining: AtomicBool::new(false),
            work_root,
            builder_down: std::sync::Mutex::new(None),
            min_free_bytes: 0,
            store: None,
        }
    }

    /// With the OCI layout store at `path` watched for free space too.
    pub fn with_store(mut self, path: PathBuf) -> Self {
        self.store = Some(path);
        self
    }

    /// With `worker.min_free_mib`, in bytes.
    pub fn with_min_free(mut self, bytes: u64) -> Self {
        self.min_free_bytes = bytes;
        self
    }

    /// Free bytes on the work root's file system, when it can be read.
    pub fn work_root_free(&self) -> Option<u64> {
        free_space(&self.work_root).map(|(free, _)| free)
    }

    /// Why the work root, or the layout store on a file system of its own, is too full to take
    /// jobs; empty when neither is.
    pub fn low_on_disk(&self) -> Vec<String> {
        if self.min_free_bytes == 0 {
            return Vec::new();
        }
        let mut seen = Vec::new();
        let watched = [
            ("work root", Some(&self.work_root)),
            ("layout store", self.store.as_ref()),
        ];
        let mut reasons = Vec::new();
        for (what, path) in watched {
            let Some(path) = path else { continue };
            let Some((free, fs)) = free_space(path) else {
                continue;
            };
            if seen.contains(&fs) {
                continue;
            }
            seen.push(fs);
            if free < self.min_free_bytes {
                reasons.push(format!(
                    "{what} {} has {} MiB free, below worker.min_free_mib ({} MiB)",
                    path.display(),
                    free >> 20,
                    self.min_free_bytes >> 20
                ));
            }
        }
        reasons
    }

    /// Every reason the worker is not ready; empty when ready.
    pub fn not_ready(&self) -> Vec<String> {
        let mut reasons = Vec::new();
        if !self.nats.connected.load(Ordering::Relaxed) {
            reasons.push("not connected to NATS".to_owned());
        }
        if self.draining.load(Ordering::Relaxed) {
            reasons.push("draining for shutdown".to_owned());
        }
        if let Some(why) = self
            .builder_down
            .lock()
            .map(|b| b.clone())
            .unwrap_or_default()
        {
            reasons.push(format!("builder unreachable: {why}"));
        }
        if let Err(e) = probe_writable(&self.work_root) {
            reasons.push(format!(
                "work root {} not writable: {e}",
                self.work_root.display()
            ));
        }
        reasons.extend(self.low_on_disk());
        reasons
    }

    /// Refreshes the gauges that are read rather than counted.
    pub fn update_gauges(&self) {
        let m = metrics();
        m.nats_connected
            .set(i64::from(self.nats.connected.load(Ordering::Relaxed)));
        if let Some(free) = self.work_root_free() {
            m.work_root_free_bytes
                .set(i64::try_from(free).unwrap_or(i64::MAX));
        }
    }
}

/// Free bytes and the file system's id for `path`, or for its nearest existing ancestor (the
/// store directory is made by the first job that writes to it).
fn free_space(path: &std::path::Path) -> Option<(u64, u64)> {
    let existing = path.ancestors().find(|p| p.exists())?;
    let stat = rustix::fs::statvfs(existing).ok()?;
    Some((stat.f_bavail.saturating_mul(stat.f_frsize), stat.f_fsid))
}

fn probe_writable(dir: &std::path::Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let probe = dir.join(format!(".readyz-{}", std::process::id()));
    std::fs::write(&probe, b"")?;
    std::fs::remove_file(&probe)
}

/// Binds `listen` (so a bad address fails start-up) and serves until `stop` fires.
pub async fn bind(listen: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(listen).await
}

pub async fn serve(listener: TcpListener, health: Arc<Health>, stop: CancellationToken) {
    loop {
        let (mut socket, _) = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    warn!(error = %e, "Metrics endpoint cannot accept.");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let health = Arc::clone(&health);
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let mut len = 0;
            // Read the request head (we ignore any body), with a deadline.
            let read = tokio::time::timeout(Duration::from_secs(5), async {
                while len < buf.len() {
                    let n = socket.read(&mut buf[len..]).await?;
                    if n == 0 {
                        break;
                    }
                    len += n;
                    if buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
                Ok::<_, std::io::Error>(())
            })
            .await;
            if !matches!(read, Ok(Ok(()))) {
                return;
            }
            let head = String::from_utf8_lossy(&buf[..len]);
            let mut words = head.split_whitespace();
            let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
            let (status, content_type, body) = respond(method, path, &health);
            // HEAD gets GET's headers, Content-Length included, and no body: a client reads
            // anything after the head as the start of the next response.
            let length = body.len();
            let body = if method == "HEAD" { "" } else { body.as_str() };
            let response = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {length}\r\nConnection: close\r\n\r\n{body}"
            );
            if let Err(e) = socket.write_all(response.as_bytes()).await {
                debug!(error = %e, "Metrics client went away.");
            }
            let _ = socket.shutdown().await;
        });
    }
}

fn respond(method: &str, path: &str, health: &Health) -> (&'static str, &'static str, String) {
    const TEXT: &str = "text/plain; charset=utf-8";
    if method != "GET" && method != "HEAD" {
        return ("405 Method Not Allowed", TEXT, "GET only\n".to_owned());
    }
    match path.split('?').next().unwrap_or("") {
        "/metrics" => {
            health.update_gauges();
            (
                "200 OK",
                "text/plain; version=0.0.4; charset=utf-8",
                metrics().render(),
            )
        }
        "/healthz" => ("200 OK", TEXT, "ok\n".to_owned()),
        "/readyz" => {
            let reasons = health.not_ready();
            if reasons.is_empty() {
                ("200 OK", TEXT, "ready\n".to_owned())
            } else {
                (
                    "503 Service Unavailable",
                    TEXT,
                    format!("not ready: {}\n", reasons.join("; ")),
                )
            }
        }
        _ => ("404 Not Found", TEXT, "not found\n".to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_names_each_reason() {
        let dir = tempfile::tempdir().unwrap();
        let health = Health::new(Arc::new(ConnectionState::default()), dir.path().to_owned());
        assert_eq!(health.not_ready(), ["not connected to NATS"]);
        health.nats.connected.store(true, Ordering::Relaxed);
        assert!(health.not_ready().is_empty());
        *health.builder_down.lock().unwrap() = Some("no engine".to_owned());
        assert_eq!(health.not_ready(), ["builder unreachable: no engine"]);
        *health.builder_down.lock().unwrap() = None;
        health.draining.store(true, Ordering::Relaxed);
        assert_eq!(health.not_ready(), ["draining for shutdown"]);
        health.draining.store(false, Ordering::Relaxed);
        let free = health.work_root_free().unwrap();
        let roomy = Health {
            min_free_bytes: 1 << 20,
            ..health
        };
        assert!(
            free >= 1 << 20,
            "this machine's temp dir has over 1 MiB free"
        );
        assert!(roomy.not_ready().is_empty());
        // A store on the same file system (here: not made yet, below the work root) is not
        // reported twice.
        let full = Health {
            min_free_bytes: free + (1 << 40),
            ..roomy
        }
        .with_store(dir.path().join("store/not/made/yet"));
        let reasons = full.not_ready();
        assert_eq!(reasons.len(), 1, "{reasons:?}");
        assert!(
            reasons[0].starts_with(&format!("work root {} has ", dir.path().display()))
                && reasons[0].contains(" MiB free, below worker.min_free_mib ("),
            "{reasons:?}"
        );
        let health = full;
        health.draining.store(true, Ordering::Relaxed);
        let (status, _, _) = respond("GET", "/readyz", &health);
        assert_eq!(status, "503 Service Unavailable");
        let (status, _, body) = respond("GET", "/metrics", &health);
        assert_eq!(status, "200 OK");
        assert!(body.contains("factoryd_work_root_free_bytes"));
        assert_eq!(
            respond("POST", "/metrics", &health).0,
            "405 Method Not Allowed"
        );
        assert_eq!(respond("GET", "/nope", &health).0, "404 Not Found");
    }

    async fn exchange(request: &str) -> String {
        let dir = tempfile::tempdir().unwrap();
        let health = Arc::new(Health::new(
            Arc::new(ConnectionState::default()),
            dir.path().to_owned(),
        ));
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        tokio::spawn(serve(listener, health, stop.clone()));
        let mut socket = tokio::net::TcpStream::connect(addr).await.unwrap();
        socket.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        socket.read_to_string(&mut response).await.unwrap();
        stop.cancel();
        response
    }

    #[tokio::test]
    async fn head_request_gets_the_headers_without_a_body() {
        let get = exchange("GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(get.ends_with("\r\n\r\nok\n"), "{get:?}");
        let head = exchange("HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head:?}");
        assert!(head.contains("Content-Length: 3\r\n"), "{head:?}");
        assert!(head.ends_with("\r\n\r\n"), "{head:?}");
    }
}
