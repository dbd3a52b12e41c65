//! `factoryd source-worker`: the child side of [`super::ConfinedFetcher`]. Reads its request
//! from stdin, confines itself, fetches and seals the source with the same adapters the worker
//! would use in-process, reports on stdout, then streams the context each time the parent
//! asks (`stream.rs`).

use std::io::{BufRead, Read, Write};
use std::os::fd::AsFd;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;

use super::{confine, stream, Message, Request, Settings};
use crate::adapters::sources::SourceFetcher;
use crate::error::{ErrorCode, JobError, Stage};
use crate::job::{JobEvent, Origin, Redactor};
use crate::ports::{EventSink, Fetcher, SealedContext, StageContext};

/// Largest request read (the source settings and a job; a job is at most 1 MiB).
const MAX_REQUEST_BYTES: u64 = 8 << 20;

/// Every message goes to stdout as one line, whole.
#[derive(Clone)]
struct Out(Arc<Mutex<std::io::Stdout>>);

impl Out {
    /// Sends `message`; when the parent is gone (the pipe is closed), this process has no one
    /// to work for and exits at once.
    fn send(&self, message: &Message) {
        let Ok(mut line) = serde_json::to_vec(message) else {
            return;
        };
        line.push(b'\n');
        let mut out = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if out.write_all(&line).and_then(|()| out.flush()).is_err() {
            std::process::exit(75);
        }
    }
}

struct Events(Out);

impl EventSink for Events {
    fn emit(&self, event: JobEvent) {
        self.0.send(&Message::Event(event));
    }
}

/// The child's `main`: settings (line 1), then the job (line 2). Exit 0 after a `done` or
/// `failed` message; anything else is a crash the parent classifies.
pub fn source_worker_main() -> ExitCode {
    let out = Out(Arc::new(Mutex::new(std::io::stdout())));
    let mut input = std::io::BufReader::new(std::io::stdin().take(MAX_REQUEST_BYTES));
    let mut read_line = |what: &str| {
        let mut line = Vec::new();
        match input.read_until(b'\n', &mut line) {
            Ok(n) if n > 0 => Some(line),
            Ok(_) => None, // the parent went away (a child started ahead, at shutdown)
            Err(e) => {
                eprintln!("source-worker: cannot read the {what}: {e}");
                None
            }
        }
    };
    let Some(line) = read_line("settings") else {
        return ExitCode::SUCCESS;
    };
    let settings: Settings = match serde_json::from_slice(&line) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("source-worker: unreadable settings: {e}");
            return ExitCode::from(70);
        }
    };
    let config = crate::config::Config {
        git: settings.git,
        sources: settings.sources,
        egress: settings.egress,
        ..crate::config::Config::defaults()
    };
    // Built before the job arrives (no thread is started and no job byte is read here).
    let fetcher = SourceFetcher::new(&config);
    let Some(line) = read_line("request") else {
        return ExitCode::SUCCESS;
    };
    let request: Request = match serde_json::from_slice(&line) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("source-worker: unreadable request: {e}");
            return ExitCode::from(70);
        }
    };
    // The context goes to stdout unbuffered, past `Out`'s line buffer (which every message
    // flushes).
    let frames = match std::io::stdout().as_fd().try_clone_to_owned() {
        Ok(fd) => std::fs::File::from(fd),
        Err(e) => {
            eprintln!("source-worker: cannot open stdout for the context: {e}");
            return ExitCode::from(71);
        }
    };
    let confined = confine::confine(&config.sources.child, &request.workspace);
    out.send(&Message::Confined(confined));

    let result = fetcher.and_then(|fetcher| run(&fetcher, &request, &out));
    match result {
        Ok((context, runtime)) => {
            // Inside the runtime, for a writer that needs it; serve exits the process.
            let _runtime = runtime.enter();
            stream::serve(&context, Box::new(input), frames, |m| out.send(m))
        }
        Err(e) => {
            out.send(&Message::Failed {
                stage: e.stage,
                class: e.class,
                code: e.code,
                message: e.message,
            });
            ExitCode::SUCCESS
        }
    }
}

/// Fetches on a runtime started after the confinement, so every thread is under it; sends
/// `done` and returns the sealed context, to be streamed, with the runtime it was made on.
fn run(
    fetcher: &SourceFetcher,
    request: &Request,
    out: &Out,
) -> Result<(SealedContext, tokio::runtime::Runtime), JobError> {
    let internal = |what: String| JobError::transient(Stage::Fetch, ErrorCode::Internal, what);
    let job = crate::job::decode_value(&request.job)
        .map_err(|problems| internal(format!("the source request does not decode: {problems}")))?;
    let Origin::DockerFile(origin) = &job.origin else {
        return Err(internal(
            "the source request is not a docker-file job".into(),
        ));
    };
    #[cfg(feature = "test-util")]
    test_hooks::crash_if_asked(origin);
    // Two workers, as the worker's own runtime has on a small node: the download and the
    // checks of a tarball overlap.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| internal(format!("cannot start a runtime: {e}")))?;
    let fetched = runtime.block_on(async {
        let cx = StageContext {
            job_id: job.id.clone(),
            attempt: request.attempt,
            // The parent kills this process to cancel it.
            cancel: CancellationToken::new(),
            events: Arc::new(Events(out.clone())),
            redactor: Arc::new(Redactor::for_job(&job)),
            workspace: request.workspace.clone(),
        };
        fetcher.fetch(origin, &cx).await
    })?;
    out.send(&Message::Done {
        dockerfile: fetched.context.dockerfile().to_owned(),
        revision: fetched.revision,
        fetched_bytes: fetched.fetched_bytes,
    });
    Ok((fetched.context, runtime))
}

/// Test builds only (`test-util`): a way to make the child die as a hostile input cannot make
/// it die (its walks keep their own stacks), so the parent's handling of that death is tested.
#[cfg(feature = "test-util")]
mod test_hooks {
    use crate::job::{BuildSource, DockerFile};

    /// The tar.gz URL that makes a test child overflow its stack.
    pub const OVERFLOW_STACK_URL: &str = "http://overflow-the-stack.test-util.invalid/a.tar.gz";

    pub fn crash_if_asked(origin: &DockerFile) {
        if matches!(&origin.source, BuildSource::TargzUrl(url) if url == OVERFLOW_STACK_URL) {
            std::hint::black_box(overflow(0));
        }
    }

    #[allow(unconditional_recursion)]
    fn overflow(depth: u64) -> u64 {
        let frame = std::hint::black_box([depth; 512]);
        overflow(depth + 1).wrapping_add(frame[0])
    }
}

/// What `source-worker --probe-workspace` found.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct ProbeReport {
    pub confinement: confine::Confinement,
    /// `execve` of `/bin/true` failed.
    pub exec_refused: bool,
    /// Creating the file outside the workspace failed.
    pub outside_write_refused: bool,
    /// Creating a file inside the workspace worked.
    pub inside_write_ok: bool,
    /// Signalling the parent (`kill(parent, 0)`, which only checks that it may) failed.
    pub signal_parent_refused: bool,
    /// Starting a process without `execve` (`fork`) failed.
    pub fork_refused: bool,
}

/// Confines this process with the default limits for `workspace`, then tries to run a
/// program, to write outside the workspace and inside it; prints a [`ProbeReport`].
pub fn probe_main(workspace: &std::path::Path, outside: &std::path::Path) -> ExitCode {
    let limits = crate::config::Config::defaults().sources.child;
    let confinement = confine::confine(&limits, workspace);
    let exec_refused = std::process::Command::new("/bin/true")
        .status()
        .map(|s| !s.success())
        .unwrap_or(true);
    let outside_write_refused = std::fs::write(outside, b"escaped").is_err();
    let inside_write_ok = std::fs::write(workspace.join("probe"), b"inside").is_ok();
    #[allow(unsafe_code)]
    // SAFETY: getppid and kill take and return integers; signal 0 delivers nothing.
    let signal_parent_refused = unsafe { libc::kill(libc::getppid(), 0) } != 0;
    #[allow(unsafe_code)]
    // SAFETY: a raw fork with SIGCHLD; if it succeeds, the new process exits at once without
    // running any of this process's code (no destructors, no allocations).
    let fork_refused = unsafe {
        match libc::syscall(libc::SYS_clone, libc::SIGCHLD as libc::c_ulong, 0, 0, 0, 0) {
            0 => libc::_exit(0),
            pid if pid > 0 => {
                libc::waitpid(pid as libc::pid_t, std::ptr::null_mut(), 0);
                false
            }
            _ => true,
        }
    };
    let report = ProbeReport {
        confinement,
        exec_refused,
        outside_write_refused,
        inside_write_ok,
        signal_parent_refused,
        fork_refused,
    };
    println!("{}", serde_json::to_string(&report).unwrap_or_default());
    ExitCode::SUCCESS
}
