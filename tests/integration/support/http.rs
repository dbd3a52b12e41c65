//! Small HTTP servers for the import tests, on threads: a fixed-answer server (credential
//! webhooks), a hostile registry that echoes the credentials it is sent, a fault-injecting
//! proxy in front of a real registry, and a proxy that notes which client asked for what (and
//! can hold one client's blob downloads).
//!
//! Both speak just enough HTTP/1.1: every answer closes its connection (`Connection: close`),
//! so each request arrives on a fresh connection and can be looked at on its own.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::Duration;

/// Stops an accept loop when dropped.
struct Acceptor {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
}

impl Drop for Acceptor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept.
        let _ = TcpStream::connect(self.addr);
    }
}

fn serve(handler: impl Fn(TcpStream) + Send + Sync + 'static) -> Acceptor {
    serve_on(IpAddr::from([127, 0, 0, 1]), handler)
}

/// Serves on a port the kernel picks on `ip`, in the calling thread's network namespace (the
/// threads it starts inherit it, so their upstream connections leave from there too).
fn serve_on(ip: IpAddr, handler: impl Fn(TcpStream) + Send + Sync + 'static) -> Acceptor {
    let listener = TcpListener::bind((ip, 0)).expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let stop = Arc::new(AtomicBool::new(false));
    let stopped = stop.clone();
    let handler = Arc::new(handler);
    thread::spawn(move || {
        for stream in listener.incoming() {
            if stopped.load(Ordering::SeqCst) {
                break;
            }
            let Ok(stream) = stream else { continue };
            let handler = handler.clone();
            thread::spawn(move || handler(stream));
        }
    });
    Acceptor { addr, stop }
}

/// Reads a request head (through the blank line); returns it and any bytes read past it.
fn read_head(stream: &mut TcpStream) -> Option<(String, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(end + 4);
            return Some((String::from_utf8_lossy(&buf).into_owned(), rest));
        }
    }
}

/// Answers every request with `status` and `body`.
pub struct StaticServer {
    acceptor: Acceptor,
    pub requests: Arc<AtomicUsize>,
}

impl StaticServer {
    pub fn start(status: u16, body: Vec<u8>) -> StaticServer {
        let requests = Arc::new(AtomicUsize::new(0));
        let counter = requests.clone();
        let acceptor = serve(move |mut stream| {
            if read_head(&mut stream).is_none() {
                return;
            }
            counter.fetch_add(1, Ordering::SeqCst);
            let head = format!(
                "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = stream.write_all(head.as_bytes());
            let _ = stream.write_all(&body);
        });
        StaticServer { acceptor, requests }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.acceptor.addr)
    }
}

/// A hostile registry: it asks for Basic credentials, then refuses every authenticated request
/// with HTTP 403 and a distribution error whose message quotes the `Authorization` header it
/// received, the `user:password` decoded from it and the base64 of the password alone, so that
/// each form a leak could take is offered to the client's error text.
pub struct AuthEchoRegistry {
    acceptor: Acceptor,
    pub authenticated_requests: Arc<AtomicUsize>,
}

impl AuthEchoRegistry {
    pub fn start() -> AuthEchoRegistry {
        use base64::Engine as _;
        let counter = Arc::new(AtomicUsize::new(0));
        let authenticated = counter.clone();
        let acceptor = serve(move |mut stream| {
            let Some((head, _)) = read_head(&mut stream) else {
                return;
            };
            let authorization = head.split("\r\n").find_map(|line| {
                let (name, value) = line.split_once(':')?;
                name.eq_ignore_ascii_case("authorization")
                    .then(|| value.trim().to_owned())
            });
            let answer = match authorization {
                None => "HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic realm=\"echo\"\r\n\
                         Content-Length: 0\r\nConnection: close\r\n\r\n"
                    .to_owned(),
                Some(value) => {
                    authenticated.fetch_add(1, Ordering::SeqCst);
                    let engine = base64::engine::general_purpose::STANDARD;
                    let decoded = value
                        .strip_prefix("Basic ")
                        .and_then(|b| engine.decode(b).ok())
                        .map(|d| String::from_utf8_lossy(&d).into_owned())
                        .unwrap_or_default();
                    let password = decoded.split_once(':').map_or("", |(_, p)| p);
                    let message = format!(
                        "denied: you sent Authorization: {value}, that is {decoded}, \
                         password base64 {}",
                        engine.encode(password)
                    );
                    let body =
                        serde_json::json!({"errors": [{"code": "DENIED", "message": message}]})
                            .to_string();
                    format!(
                        "HTTP/1.1 403 Forbidden\r\nContent-Type: application/json\r\n\
                         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    )
                }
            };
            let _ = stream.write_all(answer.as_bytes());
        });
        AuthEchoRegistry {
            acceptor,
            authenticated_requests: counter,
        }
    }

    pub fn host(&self) -> String {
        self.acceptor.addr.to_string()
    }
}

/// A fault to answer instead of forwarding.
#[derive(Debug, Clone)]
pub struct Fault {
    /// 0: no fault, the request goes through (see [`Fault::pass`]).
    pub status: u16,
    pub retry_after: Option<u64>,
    /// The challenge of a 401, as the registry would send it.
    pub www_authenticate: Option<String>,
}

impl Fault {
    /// A queue entry that lets its blob GET through, between faults.
    pub fn pass() -> Fault {
        Fault {
            status: 0,
            retry_after: None,
            www_authenticate: None,
        }
    }
}

/// A proxy in front of a server (a registry, moto): the first blob GETs get the queued faults,
/// the rest go through. Counts blob GETs that reached the registry, and keeps every request
/// head in order of arrival.
pub struct FaultProxy {
    acceptor: Acceptor,
    faults: Arc<Mutex<VecDeque<Fault>>>,
    heads: Arc<Mutex<Vec<String>>>,
    pub blob_gets_forwarded: Arc<AtomicUsize>,
    pub faults_served: Arc<AtomicUsize>,
    /// Requests a delaying proxy held before forwarding them.
    pub requests_held: Arc<AtomicUsize>,
}

impl FaultProxy {
    pub fn start(upstream: &str, faults: Vec<Fault>) -> FaultProxy {
        FaultProxy::start_with(upstream, faults, Duration::ZERO)
    }

    /// A proxy that holds every manifest and blob request for `delay` before forwarding it: a
    /// pull that stays in flight long enough for another one to start.
    pub fn delaying(upstream: &str, delay: Duration) -> FaultProxy {
        FaultProxy::start_with(upstream, Vec::new(), delay)
    }

    fn start_with(upstream: &str, faults: Vec<Fault>, delay: Duration) -> FaultProxy {
        let upstream = upstream.to_owned();
        let queue = Arc::new(Mutex::new(VecDeque::from(faults)));
        let heads = Arc::new(Mutex::new(Vec::new()));
        let forwarded = Arc::new(AtomicUsize::new(0));
        let served = Arc::new(AtomicUsize::new(0));
        let requests_held = Arc::new(AtomicUsize::new(0));
        let (q, h, f, s, held) = (
            queue.clone(),
            heads.clone(),
            forwarded.clone(),
            served.clone(),
            requests_held.clone(),
        );
        let acceptor = serve(move |mut client| {
            let Some((head, rest)) = read_head(&mut client) else {
                return;
            };
            h.lock().expect("request heads").push(head.clone());
            let request_line = head.lines().next().unwrap_or("").to_owned();
            let is_blob_get =
                request_line.starts_with("GET ") && request_line.contains("/blobs/sha256:");
            if is_blob_get {
                let fault = q.lock().expect("fault queue").pop_front();
                if let Some(fault) = fault.filter(|f| f.status != 0) {
                    s.fetch_add(1, Ordering::SeqCst);
                    let mut answer = format!(
                        "HTTP/1.1 {} Fault\r\nContent-Length: 0\r\nConnection: close\r\n",
                        fault.status
                    );
                    if let Some(after) = fault.retry_after {
                        answer.push_str(&format!("Retry-After: {after}\r\n"));
                    }
                    if let Some(challenge) = &fault.www_authenticate {
                        answer.push_str(&format!("WWW-Authenticate: {challenge}\r\n"));
                    }
                    answer.push_str("\r\n");
                    let _ = client.write_all(answer.as_bytes());
                    return;
                }
                f.fetch_add(1, Ordering::SeqCst);
            }
            if !delay.is_zero() && (is_blob_get || request_line.contains("/manifests/")) {
                held.fetch_add(1, Ordering::SeqCst);
                thread::sleep(delay);
            }
            forward(client, &head, &rest, &upstream);
        });
        FaultProxy {
            acceptor,
            faults: queue,
            heads,
            blob_gets_forwarded: forwarded,
            faults_served: served,
            requests_held,
        }
    }

    pub fn host(&self) -> String {
        self.acceptor.addr.to_string()
    }

    pub fn faults_left(&self) -> usize {
        self.faults.lock().expect("fault queue").len()
    }

    /// The request heads received so far (request line and headers), oldest first, faulted
    /// ones included. They hold the requests' `Authorization` headers: never print them.
    pub fn request_heads(&self) -> Vec<String> {
        self.heads.lock().expect("request heads").clone()
    }
}

/// Sends one request (its `head` and the body bytes read with it, `rest`) to `upstream` on a
/// connection of its own, then relays both ways until either side is done.
fn forward(mut client: TcpStream, head: &str, rest: &[u8], upstream: &str) {
    let Ok(mut server) = TcpStream::connect(upstream) else {
        return;
    };
    // Force one request per connection, so the next one is seen by this proxy.
    let mut lines: Vec<&str> = head
        .trim_end_matches("\r\n\r\n")
        .split("\r\n")
        .filter(|l| !l.to_ascii_lowercase().starts_with("connection:"))
        .collect();
    lines.push("Connection: close");
    let new_head = format!("{}\r\n\r\n", lines.join("\r\n"));
    if server.write_all(new_head.as_bytes()).is_err() || server.write_all(rest).is_err() {
        return;
    }
    let (Ok(mut client_reader), Ok(mut server_writer)) = (client.try_clone(), server.try_clone())
    else {
        return;
    };
    let upload = thread::spawn(move || {
        let _ = std::io::copy(&mut client_reader, &mut server_writer);
        let _ = server_writer.shutdown(Shutdown::Write);
    });
    let _ = std::io::copy(&mut server, &mut client);
    let _ = client.shutdown(Shutdown::Both);
    let _ = upload.join();
}

/// A proxy in front of a registry that notes each request's client address and request line,
/// in order of arrival; holds every manifest and blob GET for a delay (a registry slow to
/// answer, for a steady pace of jobs; [`WatchProxy::set_delay`]), and, once
/// [`WatchProxy::hold_first_blob_client`] is called, holds the blob GETs of the first client
/// that asks for a blob until [`WatchProxy::release`] (a job stopped at a known point).
pub struct WatchProxy {
    acceptor: Acceptor,
    seen: Arc<Mutex<Vec<(IpAddr, String)>>>,
    gate: Arc<Gate>,
    delay_ms: Arc<std::sync::atomic::AtomicU64>,
}

#[derive(Default)]
struct Gate {
    armed: AtomicBool,
    /// The client whose blob GETs are held, once one asked.
    held_client: Mutex<Option<IpAddr>>,
    held: AtomicUsize,
    released: Mutex<bool>,
    opened: Condvar,
}

impl WatchProxy {
    /// A proxy on a port of `ip` (in the calling thread's network namespace) to `upstream`.
    pub fn start(ip: IpAddr, upstream: &str, delay: Duration) -> WatchProxy {
        let upstream = upstream.to_owned();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let gate = Arc::new(Gate::default());
        let delay_ms = Arc::new(std::sync::atomic::AtomicU64::new(delay.as_millis() as u64));
        let (noted, g, slow) = (seen.clone(), gate.clone(), delay_ms.clone());
        let acceptor = serve_on(ip, move |mut client| {
            let Some((head, rest)) = read_head(&mut client) else {
                return;
            };
            let Ok(peer) = client.peer_addr() else { return };
            let request_line = head.lines().next().unwrap_or("").to_owned();
            noted
                .lock()
                .expect("requests seen")
                .push((peer.ip(), request_line.clone()));
            let is_get = request_line.starts_with("GET ");
            let is_blob_get = is_get && request_line.contains("/blobs/sha256:");
            if is_blob_get && g.armed.load(Ordering::SeqCst) {
                let holds = *g
                    .held_client
                    .lock()
                    .expect("held client")
                    .get_or_insert(peer.ip())
                    == peer.ip();
                if holds {
                    g.held.fetch_add(1, Ordering::SeqCst);
                    let mut released = g.released.lock().expect("gate");
                    while !*released {
                        released = g.opened.wait(released).expect("gate");
                    }
                }
            }
            let delay = Duration::from_millis(slow.load(Ordering::SeqCst));
            if !delay.is_zero() && (is_blob_get || (is_get && request_line.contains("/manifests/")))
            {
                thread::sleep(delay);
            }
            forward(client, &head, &rest, &upstream);
        });
        WatchProxy {
            acceptor,
            seen,
            gate,
            delay_ms,
        }
    }

    /// Holds each later manifest and blob GET for `delay`.
    pub fn set_delay(&self, delay: Duration) {
        self.delay_ms
            .store(delay.as_millis() as u64, Ordering::SeqCst);
    }

    pub fn host(&self) -> String {
        self.acceptor.addr.to_string()
    }

    /// From now on, the first client to GET a blob has its blob GETs held until
    /// [`WatchProxy::release`].
    pub fn hold_first_blob_client(&self) {
        self.gate.armed.store(true, Ordering::SeqCst);
    }

    /// The client whose blob GETs are held, once one of them is (none before).
    pub fn holding(&self) -> Option<IpAddr> {
        if self.gate.held.load(Ordering::SeqCst) == 0 {
            return None;
        }
        *self.gate.held_client.lock().expect("held client")
    }

    /// Lets the held requests (and any later ones of that client) through.
    pub fn release(&self) {
        *self.gate.released.lock().expect("gate") = true;
        self.gate.opened.notify_all();
    }

    /// Every request so far: the client's address and the request line, oldest first.
    pub fn seen(&self) -> Vec<(IpAddr, String)> {
        self.seen.lock().expect("requests seen").clone()
    }
}

impl Drop for WatchProxy {
    fn drop(&mut self) {
        // Held handler threads end instead of waiting for ever.
        self.release();
    }
}
