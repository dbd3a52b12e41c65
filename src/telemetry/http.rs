//! `/metrics`, `/healthz` and `/readyz` on `metrics.listen`.
//!
//! A deliberately small HTTP/1.1 responder (GET only, one request per connection, bounded
//! request size): the endpoints are scraped by Prometheus and probed by load balancers, and a
//! web framework would be most of the daemon's dependency tree.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::metrics::metrics;
use crate::readiness::Readiness;

/// Binds `listen` (so a bad address fails start-up) and serves until `stop` fires.
pub async fn bind(listen: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(listen).await
}

pub async fn serve(listener: TcpListener, health: Arc<Readiness>, stop: CancellationToken) {
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

fn respond(method: &str, path: &str, health: &Readiness) -> (&'static str, &'static str, String) {
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
                let notes: String = health
                    .warnings()
                    .iter()
                    .map(|w| format!("warning: {w}\n"))
                    .collect();
                ("200 OK", TEXT, format!("ready\n{notes}"))
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
    fn each_endpoint_answers_and_readyz_says_why_not() {
        let dir = tempfile::tempdir().unwrap();
        let ready = Readiness::new(dir.path().to_owned());
        let (status, _, body) = respond("GET", "/readyz", &ready);
        assert_eq!((status, body.as_str()), ("200 OK", "ready\n"));
        ready.set_draining();
        let (status, _, body) = respond("GET", "/readyz", &ready);
        assert_eq!(status, "503 Service Unavailable");
        assert_eq!(body, "not ready: draining for shutdown\n");
        let (status, _, body) = respond("GET", "/metrics", &ready);
        assert_eq!(status, "200 OK");
        assert!(body.contains("factoryd_work_root_free_bytes"));
        assert_eq!(
            respond("POST", "/metrics", &ready).0,
            "405 Method Not Allowed"
        );
        assert_eq!(respond("GET", "/nope", &ready).0, "404 Not Found");
    }

    async fn exchange(request: &str) -> String {
        let dir = tempfile::tempdir().unwrap();
        let health = Arc::new(Readiness::new(dir.path().to_owned()));
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
