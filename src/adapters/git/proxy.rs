//! The egress proxy of one libgit2 fetch over HTTP(S): libgit2 is pointed at a proxy on a
//! loopback port that factoryd serves itself, so that for git, too, the address the egress
//! policy checked is the address connected to, and every byte a server sends is counted.
//!
//! libgit2 asks the proxy for `CONNECT host:port` (TLS stays end to end between libgit2 and the
//! server, certificates checked by libgit2 as before). The proxy resolves the host through the
//! egress policy, connects to an allowed address itself (libgit2 never looks the name up), and
//! copies bytes both ways while it:
//!
//! * counts what the server sends: before the pack starts (the ref advertisement and the
//!   negotiation) at most `git.max_ref_advertisement_bytes`, in all at most the fetch cap; a
//!   server that never stops advertising refs is cut off there, before libgit2 holds it all;
//! * closes every connection when the job is cancelled or times out, so libgit2 returns from
//!   whatever it was blocked in (its own callbacks only run once the pack flows).
//!
//! What ended a connection is kept in the [`Meter`] for the fetch's error. The proxy lives as
//! long as the [`Proxy`] value: dropping it stops the accept loop and every connection.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;

use crate::egress::EgressPolicy;

/// Largest request head libgit2 sends the proxy (request line and headers).
const MAX_HEAD_BYTES: usize = 16 * 1024;
/// How long libgit2 may take to send its request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(30);
const BUFFER_BYTES: usize = 64 * 1024;

/// The byte caps of one fetch.
#[derive(Debug, Clone, Copy)]
pub(super) struct Caps {
    /// Before the pack starts: the ref advertisement and the negotiation.
    pub before_pack: u64,
    /// Everything the servers send in this fetch.
    pub total: u64,
}

/// Why the proxy ended a connection on its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Stop {
    /// More than `before_pack` bytes before the pack started.
    AdvertisementCap(u64),
    /// More than `total` bytes in all.
    TotalCap(u64),
    /// The egress policy refused the host, or it did not resolve (`transient`).
    Refused { message: String, transient: bool },
}

/// What the servers sent through the proxy, shared with the fetch's callbacks.
#[derive(Debug, Default)]
pub(super) struct Meter {
    received: AtomicU64,
    pack_started: AtomicBool,
    stop: Mutex<Option<Stop>>,
}

impl Meter {
    /// Called from libgit2's transfer progress: pack data is flowing.
    pub fn pack_started(&self) {
        self.pack_started.store(true, Ordering::Relaxed);
    }

    pub fn stopped(&self) -> Option<Stop> {
        self.stop.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set_stop(&self, stop: Stop) {
        let mut slot = self.stop.lock().unwrap_or_else(|e| e.into_inner());
        slot.get_or_insert(stop);
    }

    /// Counts `n` more bytes; the cap that is now exceeded, if any.
    fn add(&self, n: u64, caps: &Caps) -> Option<Stop> {
        let total = self.received.fetch_add(n, Ordering::Relaxed) + n;
        if total > caps.total {
            return Some(Stop::TotalCap(caps.total));
        }
        if !self.pack_started.load(Ordering::Relaxed) && total > caps.before_pack {
            return Some(Stop::AdvertisementCap(caps.before_pack));
        }
        None
    }
}

/// A running proxy; stops when dropped.
pub(super) struct Proxy {
    addr: SocketAddr,
    pub meter: Arc<Meter>,
    task: JoinHandle<()>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What every connection of one proxy shares.
#[derive(Clone)]
struct Shared {
    policy: EgressPolicy,
    caps: Caps,
    meter: Arc<Meter>,
    cancel: CancellationToken,
    connect_timeout: Duration,
}

impl Proxy {
    /// Binds a loopback port and serves it on `runtime`. Called from the blocking thread of a
    /// fetch.
    pub fn start(
        runtime: &tokio::runtime::Handle,
        policy: EgressPolicy,
        caps: Caps,
        cancel: CancellationToken,
        connect_timeout: Duration,
    ) -> std::io::Result<Proxy> {
        let listener = std::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0))?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let meter = Arc::new(Meter::default());
        let shared = Shared {
            policy,
            caps,
            meter: Arc::clone(&meter),
            cancel,
            connect_timeout,
        };
        let task = runtime.spawn(async move {
            let Ok(listener) = TcpListener::from_std(listener) else {
                return;
            };
            // Connections live in this set: aborting the accept task drops them all.
            let mut connections = JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok((client, _)) => {
                            connections.spawn(serve(client, shared.clone()));
                        }
                        Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                    },
                    Some(_) = connections.join_next(), if !connections.is_empty() => {}
                }
            }
        });
        Ok(Proxy { addr, meter, task })
    }

    /// The proxy URL for libgit2.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// One connection from libgit2.
async fn serve(mut client: TcpStream, shared: Shared) {
    let head = tokio::select! {
        head = tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut client)) => match head {
            Ok(Some(head)) => head,
            _ => return,
        },
        _ = shared.cancel.cancelled() => return,
    };
    let Some((host, port)) = parse_connect(&head) else {
        let _ = client
            .write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
            .await;
        return;
    };
    let upstream = tokio::select! {
        upstream = connect_allowed(&shared, &host, port) => upstream,
        _ = shared.cancel.cancelled() => return,
    };
    let upstream = match upstream {
        Ok(s) => s,
        Err(status) => {
            let response = format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n");
            let _ = client.write_all(response.as_bytes()).await;
            return;
        }
    };
    let ready = client
        .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
        .await;
    if ready.is_err() {
        return;
    }
    tokio::select! {
        _ = pump(client, upstream, &shared) => {}
        _ = shared.cancel.cancelled() => {}
    }
}

/// Reads up to the end of the request head; `None` on EOF, an error or a head too large.
/// (libgit2 sends nothing after it until the proxy answers.)
async fn read_head(client: &mut TcpStream) -> Option<Vec<u8>> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 2048];
    loop {
        let n = client.read(&mut buf).await.ok()?;
        if n == 0 {
            return None;
        }
        head.extend_from_slice(&buf[..n]);
        if head.windows(4).any(|w| w == b"\r\n\r\n") {
            return Some(head);
        }
        if head.len() > MAX_HEAD_BYTES {
            return None;
        }
    }
}

/// The host and port of a `CONNECT` request; `None` for anything else.
fn parse_connect(head: &[u8]) -> Option<(String, u16)> {
    let line = head.split(|&b| b == b'\r').next()?;
    let line = std::str::from_utf8(line).ok()?;
    let mut parts = line.split(' ');
    let (method, target) = (parts.next()?, parts.next()?);
    if method != "CONNECT" {
        return None;
    }
    let (host, port) = target.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    Some((host.to_owned(), port.parse().ok()?))
}

/// Connects to an address of `host` the egress policy allows; on failure, the status line
/// for libgit2 (the reason is kept in the meter).
async fn connect_allowed(
    shared: &Shared,
    host: &str,
    port: u16,
) -> Result<TcpStream, &'static str> {
    let addrs = match shared.policy.resolve(host, port).await {
        Ok(addrs) => addrs,
        Err(e) => {
            let transient = matches!(e, crate::egress::ResolveError::Lookup { .. });
            shared.meter.set_stop(Stop::Refused {
                message: e.to_string(),
                transient,
            });
            return Err("403 Forbidden");
        }
    };
    for addr in addrs {
        let attempt = tokio::time::timeout(shared.connect_timeout, TcpStream::connect(addr));
        if let Ok(Ok(stream)) = attempt.await {
            let _ = stream.set_nodelay(true);
            return Ok(stream);
        }
    }
    Err("502 Bad Gateway")
}

/// Copies both ways until either side closes or a cap is reached.
async fn pump(client: TcpStream, upstream: TcpStream, shared: &Shared) {
    let (mut client_read, mut client_write) = client.into_split();
    let (mut upstream_read, mut upstream_write) = upstream.into_split();
    let up = async {
        let _ = tokio::io::copy(&mut client_read, &mut upstream_write).await;
        let _ = upstream_write.shutdown().await;
    };
    let down = async {
        let mut buf = vec![0u8; BUFFER_BYTES];
        loop {
            let n = match upstream_read.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if let Some(stop) = shared.meter.add(n as u64, &shared.caps) {
                shared.meter.set_stop(stop);
                break;
            }
            if client_write.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = client_write.shutdown().await;
    };
    // The server's side decides: when it ends (or is cut off), the connection is over.
    tokio::pin!(down);
    tokio::select! {
        _ = up => (&mut down).await,
        _ = &mut down => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_connect_requests_name_a_target() {
        let target = |head: &str| parse_connect(head.as_bytes());
        assert_eq!(
            target("CONNECT git.example:443 HTTP/1.1\r\nHost: git.example:443\r\n\r\n"),
            Some(("git.example".into(), 443))
        );
        assert_eq!(
            target("CONNECT [::1]:8443 HTTP/1.1\r\n\r\n"),
            Some(("::1".into(), 8443))
        );
        for bad in [
            "GET /r.git/info/refs HTTP/1.1\r\n\r\n",
            "GET http://git.example/r.git/info/refs HTTP/1.1\r\n\r\n",
            "CONNECT git.example HTTP/1.1\r\n\r\n",
            "CONNECT git.example:x HTTP/1.1\r\n\r\n",
        ] {
            assert_eq!(target(bad), None, "{bad}");
        }
    }

    #[test]
    fn the_advertisement_cap_holds_until_the_pack_starts_then_the_total_cap() {
        let caps = Caps {
            before_pack: 100,
            total: 1_000,
        };
        let meter = Meter::default();
        assert_eq!(meter.add(100, &caps), None);
        assert_eq!(meter.add(1, &caps), Some(Stop::AdvertisementCap(100)));
        let meter = Meter::default();
        assert_eq!(meter.add(60, &caps), None);
        meter.pack_started();
        assert_eq!(meter.add(900, &caps), None);
        assert_eq!(meter.add(41, &caps), Some(Stop::TotalCap(1_000)));
    }
}
