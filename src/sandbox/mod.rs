//! Source handling in a confined child process (`sources.isolation = "process"`).
//!
//! A docker-file job's source is untrusted input for the most complex parsers factoryd runs:
//! libgit2's protocol and pack code, gzip and tar, `.dockerignore` matching. [`ConfinedFetcher`]
//! runs the fetch and seal of each job in a child process of its own — the same binary, hidden
//! subcommand `factoryd source-worker` — so that whatever the input does there (a crash, a
//! runaway allocation, a CPU loop) ends that job, not the worker and every job it runs:
//!
//! ```text
//! worker ──request (JSON on stdin: the source, its credentials, settings)──▶ source-worker
//!        ◀──events, then "done" or "failed" (JSON lines on stdout)──────────  confine(); fetch
//!        ──"seal" (each time the builder reads the context)────────────────▶
//!        ◀──the context tar in frames, then "sealed" or "failed"───────────  seal → stdout
//! ```
//!
//! Credentials travel only over the pipe, never in argv or the environment (the child's
//! environment is emptied). The child confines itself before it touches the source
//! (`confine.rs`). It lives until the build has read its context (the fetched source stays in
//! the job's workspace, and the child seals it again for each read: `stream.rs`); nothing of
//! the context is written to disk on the way. Cancellation and the job timeout kill it. A
//! child that dies or hits a limit fails the job permanently, naming the limit
//! ([`crash_error`]).

mod child;
pub mod confine;
mod stream;

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

use crate::config::{ChildLimits, EgressConfig, GitConfig, SourcesConfig};
use crate::error::{ErrorClass, ErrorCode, JobError, Stage};
use crate::job::{BuildSource, DockerFile, GitAuth, JobEvent, Revision};
use crate::ports::{FetchedSource, Fetcher, SealedContext, StageContext};

pub use child::{probe_main, source_worker_main};

/// The hidden subcommand the child runs.
pub const SUBCOMMAND: &str = "source-worker";
/// Longest line the child may send (an event with a batch of log lines is far below).
pub(super) const MAX_LINE_BYTES: usize = 1 << 20;
/// The capacity asked for the child's stdout pipe (the kernel's default maximum for a user
/// is 1 MiB: `/proc/sys/fs/pipe-max-size`).
const PIPE_BYTES: libc::c_int = 1 << 20;
/// What is kept of the child's stderr, for a crash's message.
const STDERR_TAIL_BYTES: usize = 8 * 1024;
/// Environment variables the child keeps (TLS trust settings); everything else is dropped.
const KEPT_ENV: &[&str] = &["SSL_CERT_FILE", "SSL_CERT_DIR"];

/// The first line the parent sends a child, when it starts it: the node's source settings.
/// The child builds its fetcher from them (loading TLS roots and libgit2 costs tens of
/// milliseconds) and then waits for a job, so a started child is kept ready for the next one.
#[derive(Debug, Serialize, Deserialize)]
struct Settings {
    git: GitConfig,
    sources: SourcesConfig,
    egress: EgressConfig,
}

/// The second line: the job's source.
#[derive(Debug, Serialize, Deserialize)]
struct Request {
    /// A v1 job whose origin is the docker-file source, secrets in the clear.
    job: serde_json::Value,
    workspace: PathBuf,
    attempt: u32,
}

/// A started child, its settings sent.
struct Spawned {
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    stdout: tokio::process::ChildStdout,
    stderr_tail: tokio::task::JoinHandle<String>,
}

/// What the child sends back, one JSON object per line.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Message {
    /// The confinement in force, sent before the source is touched.
    Confined(confine::Confinement),
    Event(JobEvent),
    Done {
        dockerfile: String,
        revision: Option<Revision>,
        fetched_bytes: u64,
    },
    /// After a context stream: the bytes it held.
    Sealed {
        bytes: u64,
    },
    Failed {
        stage: Stage,
        class: ErrorClass,
        code: ErrorCode,
        message: String,
    },
}

/// Runs each fetch in a `factoryd source-worker` child.
#[derive(Debug, Clone)]
pub struct ConfinedFetcher {
    program: PathBuf,
    git: GitConfig,
    sources: SourcesConfig,
    egress: EgressConfig,
    /// The confinement the last child reported (logged when it first arrives or changes).
    confinement: Arc<std::sync::Mutex<Option<confine::Confinement>>>,
    /// A child started ahead, ready for the next job.
    ready: Arc<std::sync::Mutex<Option<Spawned>>>,
}

impl std::fmt::Debug for Spawned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spawned")
            .field("pid", &self.child.id())
            .finish()
    }
}

impl ConfinedFetcher {
    /// `program` is the factoryd binary (`std::env::current_exe()` in the daemon).
    pub fn new(program: PathBuf, config: &crate::config::Config) -> ConfinedFetcher {
        ConfinedFetcher {
            program,
            git: config.git.clone(),
            sources: config.sources.clone(),
            egress: config.egress.clone(),
            confinement: Arc::default(),
            ready: Arc::default(),
        }
    }

    /// The confinement the last child reported, if a child has run.
    pub fn confinement(&self) -> Option<confine::Confinement> {
        self.confinement
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn limits(&self) -> ChildLimits {
        self.sources.child
    }
}

#[async_trait]
impl Fetcher for ConfinedFetcher {
    async fn fetch(
        &self,
        origin: &DockerFile,
        cx: &StageContext,
    ) -> Result<FetchedSource, JobError> {
        crate::adapters::sources::fetch_accounted(origin, cx, || async {
            let request = Request {
                job: wire_job(origin, &cx.job_id),
                workspace: cx.workspace.clone(),
                attempt: cx.attempt,
            };
            self.run_child(&request, cx).await
        })
        .await
    }
}

impl ConfinedFetcher {
    /// Starts a child and sends it the settings; its stderr's tail is kept for a crash.
    async fn spawn(&self) -> std::io::Result<Spawned> {
        let mut command = tokio::process::Command::new(&self.program);
        command
            .arg(SUBCOMMAND)
            .env_clear()
            .envs(
                KEPT_ENV
                    .iter()
                    .filter_map(|k| Some((*k, std::env::var(k).ok()?))),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = command.spawn()?;
        let mut stdin = child.stdin.take().expect("piped stdin");
        let stdout = child.stdout.take().expect("piped stdout");
        widen_pipe(&stdout);
        let mut stderr = child.stderr.take().expect("piped stderr");
        let stderr_tail = tokio::spawn(async move {
            let mut tail: Vec<u8> = Vec::new();
            let mut buf = [0u8; 4096];
            while let Ok(n) = stderr.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                tail.extend_from_slice(&buf[..n]);
                if tail.len() > STDERR_TAIL_BYTES {
                    tail.drain(..tail.len() - STDERR_TAIL_BYTES);
                }
            }
            String::from_utf8_lossy(&tail).into_owned()
        });
        let settings = Settings {
            git: self.git.clone(),
            sources: self.sources.clone(),
            egress: self.egress.clone(),
        };
        let mut line = serde_json::to_vec(&settings).map_err(std::io::Error::other)?;
        line.push(b'\n');
        stdin.write_all(&line).await?;
        Ok(Spawned {
            child,
            stdin,
            stdout,
            stderr_tail,
        })
    }

    /// The child started ahead if it is still alive, else a new one; another is started
    /// ahead for the next job.
    async fn take_child(&self) -> std::io::Result<Spawned> {
        let ready = self.ready.lock().unwrap_or_else(|e| e.into_inner()).take();
        let alive = ready.and_then(|mut s| matches!(s.child.try_wait(), Ok(None)).then_some(s));
        let spawned = match alive {
            Some(s) => s,
            None => self.spawn().await?,
        };
        let me = self.clone();
        tokio::spawn(async move {
            if let Ok(next) = me.spawn().await {
                let mut slot = me.ready.lock().unwrap_or_else(|e| e.into_inner());
                if slot.is_none() {
                    *slot = Some(next);
                }
            }
        });
        Ok(spawned)
    }

    async fn run_child(
        &self,
        request: &Request,
        cx: &StageContext,
    ) -> Result<FetchedSource, JobError> {
        let local = |what: &str, e: std::io::Error| {
            JobError::transient(
                Stage::Fetch,
                ErrorCode::Internal,
                format!("{what} the source process: {e}"),
            )
        };
        let Spawned {
            mut child,
            mut stdin,
            stdout,
            stderr_tail,
        } = self
            .take_child()
            .await
            .map_err(|e| local("cannot start", e))?;
        let mut payload =
            serde_json::to_vec(request).map_err(|e| local("cannot encode", e.into()))?;
        payload.push(b'\n');

        let mut reader = BufReader::new(stdout);
        let talk = async {
            // The request; a child that died before reading it is seen below. Its stdin
            // stays open: the context is asked for on it.
            let _ = stdin.write_all(&payload).await;
            let mut line = Vec::new();
            loop {
                line.clear();
                let n = (&mut reader)
                    .take(MAX_LINE_BYTES as u64 + 1)
                    .read_until(b'\n', &mut line)
                    .await
                    .unwrap_or(0);
                if n == 0 {
                    return Ok(None);
                }
                if line.len() > MAX_LINE_BYTES {
                    return Err(JobError::permanent(
                        Stage::Fetch,
                        ErrorCode::LimitExceeded,
                        "the source process sent a message over 1 MiB",
                    ));
                }
                match serde_json::from_slice::<Message>(&line) {
                    Ok(Message::Confined(c)) => self.log_confinement(&c),
                    Ok(Message::Event(event)) => cx.events.emit(event),
                    Ok(done @ (Message::Done { .. } | Message::Failed { .. })) => {
                        return Ok(Some(done))
                    }
                    Ok(Message::Sealed { .. }) | Err(_) => {}
                }
            }
        };
        let outcome = tokio::select! {
            outcome = talk => outcome?,
            _ = cx.cancel.cancelled() => {
                let _ = child.kill().await;
                return Err(JobError::cancelled(Stage::Fetch));
            }
        };
        match outcome {
            Some(Message::Done {
                dockerfile,
                revision,
                fetched_bytes,
            }) => {
                // The child waits for "seal" and has sent nothing after "done".
                if !reader.buffer().is_empty() {
                    return Err(JobError::permanent(
                        Stage::Fetch,
                        ErrorCode::UnsafeSource,
                        "the source process sent data after its result",
                    ));
                }
                let blocking = |what: &str, e: std::io::Error| local(what, e);
                let commands = stdin
                    .into_owned_fd()
                    .map_err(|e| blocking("cannot take over the stdin of", e))?;
                let replies = reader
                    .into_inner()
                    .into_owned_fd()
                    .map_err(|e| blocking("cannot take over the stdout of", e))?;
                let context = stream::PipeContext::start(
                    child,
                    stderr_tail,
                    commands.into(),
                    replies.into(),
                    cx.cancel.clone(),
                    self.limits(),
                );
                Ok(FetchedSource {
                    context: SealedContext::new(dockerfile, Box::new(context)),
                    revision,
                    fetched_bytes,
                })
            }
            Some(Message::Failed {
                stage,
                class,
                code,
                message,
            }) => {
                drop(stdin);
                let _ = child.wait().await;
                Err(JobError::new(stage, code, message).with_class(class))
            }
            _ => {
                drop(stdin);
                let status = child
                    .wait()
                    .await
                    .map_err(|e| local("cannot wait for", e))?;
                let stderr = stderr_tail.await.unwrap_or_default();
                Err(crash_error(Stage::Fetch, &status, &stderr, &self.limits()))
            }
        }
    }

    fn log_confinement(&self, c: &confine::Confinement) {
        let mut last = self.confinement.lock().unwrap_or_else(|e| e.into_inner());
        if last.as_ref() == Some(c) {
            return;
        }
        *last = Some(c.clone());
        if c.rlimits && c.no_new_privs && c.seccomp && c.landlock {
            tracing::info!(
                "Source processes run confined (limits, no_new_privs, seccomp, landlock)."
            );
        } else {
            tracing::warn!(
                rlimits = c.rlimits,
                no_new_privs = c.no_new_privs,
                seccomp = c.seccomp,
                landlock = c.landlock,
                missing = %c.notes.join("; "),
                "Source processes run with only part of their confinement."
            );
        }
    }
}

/// Gives the child's stdout pipe room for a few frames of the context stream (the kernel's
/// 64 KiB default wakes both sides four times per frame); where the kernel refuses, the
/// default stays.
fn widen_pipe(pipe: &impl std::os::fd::AsRawFd) {
    #[allow(unsafe_code)]
    // SAFETY: fcntl on a pipe this process owns; it only changes the pipe's capacity.
    unsafe {
        libc::fcntl(pipe.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_BYTES);
    }
}

/// The job the child decodes: the docker-file origin in wire form, secrets in the clear (they
/// travel over the pipe only), without the `FROM` credentials the child does not need.
fn wire_job(origin: &DockerFile, job_id: &str) -> serde_json::Value {
    let mut details = serde_json::to_value(origin).unwrap_or_default();
    if let Some(map) = details.as_object_mut() {
        map.remove("credentials");
    }
    // (Indexing a `Value` mutably creates what it names: only where the job has auth.)
    if let BuildSource::Repo(repo) = &origin.source {
        match &repo.auth {
            Some(GitAuth::Http { password, .. }) => {
                details["repo"]["auth"]["credentials"]["password"] = password.expose().into();
            }
            Some(GitAuth::Ssh {
                private_key,
                passphrase,
                ..
            }) => {
                let credentials = &mut details["repo"]["auth"]["credentials"];
                credentials["private_key"] = private_key.expose().into();
                if let Some(p) = passphrase {
                    credentials["passphrase"] = p.expose().into();
                }
            }
            None => {}
        }
    }
    serde_json::json!({
        "v": crate::job::WIRE_VERSION,
        "id": job_id,
        "source_id": "source-worker",
        "origin": {"type": "docker-file", "details": details},
    })
}

/// The error of a child that ended without a result: permanent, naming the limit it hit
/// when that can be told.
fn crash_error(
    stage: Stage,
    status: &std::process::ExitStatus,
    stderr: &str,
    limits: &ChildLimits,
) -> JobError {
    use std::os::unix::process::ExitStatusExt;
    let limit = |what: String| JobError::permanent(stage, ErrorCode::LimitExceeded, what);
    if stderr.contains("has overflowed its stack") {
        return limit("the source process overflowed its stack".to_owned());
    }
    if stderr.contains("memory allocation of") {
        return limit(format!(
            "the source process ran out of memory (sources.child_memory_mib = {} MiB)",
            limits.memory_bytes >> 20
        ));
    }
    match status.signal() {
        Some(libc::SIGXCPU) | Some(libc::SIGKILL) => limit(format!(
            "the source process was killed (signal {}): it used up its CPU time \
             (sources.child_cpu_secs = {}) or the kernel ran out of memory",
            status.signal().unwrap_or_default(),
            limits.cpu_secs
        )),
        Some(libc::SIGXFSZ) => limit(format!(
            "the source process wrote a file over sources.child_file_size_mib ({} MiB)",
            limits.file_size_bytes >> 20
        )),
        Some(libc::SIGSYS) => JobError::permanent(
            stage,
            ErrorCode::UnsafeSource,
            "the source process made a system call its sandbox forbids",
        ),
        signal => {
            let how = match signal {
                Some(s) => format!("signal {s}"),
                None => format!("exit code {}", status.code().unwrap_or(-1)),
            };
            let last = stderr
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("");
            JobError::permanent(
                stage,
                ErrorCode::UnsafeSource,
                format!("the source process died ({how}) handling this source: {last}"),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wire_job_carries_the_secrets_and_decodes_to_the_same_source() {
        let job = crate::job::decode_value(&serde_json::json!({
            "v": 1, "id": "j1", "source_id": "s1",
            "origin": {"type": "docker-file", "details": {
                "repo": {"url": "https://git.example/app.git", "branch": "main",
                    "auth": {"type": "http", "credentials": {"username": "u", "password": "pw-77"}},
                    "ref": {"type": "tag", "value": "v1"}},
                "context_dir": "/app", "build_file": "/app/Dockerfile",
                "credentials": [{"url": "r.example", "username": "x", "token": "from-token"}]}}
        }))
        .unwrap();
        let crate::job::Origin::DockerFile(origin) = &job.origin else {
            unreachable!()
        };
        let wire = wire_job(origin, "j1");
        let text = wire.to_string();
        assert!(text.contains("pw-77"));
        assert!(
            !text.contains("from-token"),
            "FROM credentials stay in the parent"
        );
        let back = crate::job::decode_value(&wire).expect("decodes");
        let crate::job::Origin::DockerFile(back) = &back.origin else {
            unreachable!()
        };
        assert_eq!(
            serde_json::to_value(&back.source).unwrap(),
            serde_json::to_value(&origin.source).unwrap()
        );
        assert_eq!(
            (back.context_dir.as_str(), back.build_file.as_str()),
            ("/app", "/app/Dockerfile")
        );

        // Without auth, and for a tarball, the wire job decodes as well.
        for details in [
            serde_json::json!({"repo": {"url": "https://git.example/app.git"}}),
            serde_json::json!({"targz_url": "https://files.example/src.tar.gz"}),
        ] {
            let job = crate::job::decode_value(&serde_json::json!({
                "v": 1, "id": "j2", "source_id": "s1",
                "origin": {"type": "docker-file", "details": details}
            }))
            .unwrap();
            let crate::job::Origin::DockerFile(origin) = &job.origin else {
                unreachable!()
            };
            crate::job::decode_value(&wire_job(origin, "j2")).expect("decodes");
        }
    }

    #[test]
    fn crashes_name_the_limit_they_hit() {
        use std::os::unix::process::ExitStatusExt;
        let limits = ChildLimits {
            memory_bytes: 256 << 20,
            cpu_secs: 2,
            open_files: 64,
            file_size_bytes: 1 << 20,
        };
        let signalled = |s: i32| std::process::ExitStatus::from_raw(s);
        let exited = |code: i32| std::process::ExitStatus::from_raw(code << 8);
        let (limit, refused) = (ErrorCode::LimitExceeded, ErrorCode::UnsafeSource);
        let cases = [
            (signalled(libc::SIGXCPU), "", limit, "child_cpu_secs"),
            (signalled(libc::SIGXFSZ), "", limit, "child_file_size_mib"),
            (
                signalled(libc::SIGABRT),
                "memory allocation of 1048576 bytes failed\n",
                limit,
                "child_memory_mib = 256 MiB",
            ),
            (
                signalled(libc::SIGSEGV),
                "\nthread 'x' has overflowed its stack\nfatal runtime error: stack overflow\n",
                limit,
                "stack",
            ),
            (signalled(libc::SIGSYS), "", refused, "forbids"),
            (signalled(libc::SIGSEGV), "boom\n", refused, "signal 11"),
            (exited(3), "", refused, "exit code 3"),
        ];
        for (status, stderr, code, says) in cases {
            let err = crash_error(Stage::Fetch, &status, stderr, &limits);
            assert_eq!(
                (err.class, err.code),
                (ErrorClass::Permanent, code),
                "{err}"
            );
            assert!(err.message.contains(says), "{says:?} in {err}");
        }
    }
}
