//! The sealed context, streamed from the child over its stdout after its `done` message.
//!
//! The child keeps the fetched source (the bare repository or the archive, in the job's
//! workspace) and seals it again each time the builder reads the context; the parent asks
//! on the child's stdin:
//!
//! ```text
//! parent: "seal\n"  ──▶ child: frames (u32 big-endian length, then that many tar bytes; at
//!                              most MAX_FRAME_BYTES), a zero-length frame, then one JSON line:
//!                              `sealed` (the bytes written) or `failed` (the seal's error)
//! parent: "stop\n"  ──▶ child: the stream in progress ends at its next frame (the reader of
//!                              the context stopped early: the build file was found, or the
//!                              builder went away); the parent reads to the zero-length frame
//! parent: EOF or kill ─▶ child exits
//! ```
//!
//! The child is untrusted like the source it read: a frame over the bound, an unreadable
//! status line or an early end of the stream fails the seal and the child is not asked
//! again. The job's cancellation kills the child, which ends a read in progress.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::process::ExitStatus;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{crash_error, Message, MAX_LINE_BYTES};
use crate::config::ChildLimits;
use crate::error::{ErrorCode, JobError, Stage};
use crate::ports::{ContextWriter, SealedContext};

/// Asks the child for the context stream.
pub(super) const SEAL: &[u8] = b"seal\n";
/// Asks the child to end the stream in progress.
pub(super) const STOP: &[u8] = b"stop\n";
/// Bytes the child collects before it sends a frame.
const FRAME_BYTES: usize = 256 << 10;
/// Largest frame the parent accepts.
const MAX_FRAME_BYTES: usize = 1 << 20;
/// How long a child whose stream ended early may take to exit before it is killed.
const EXIT_GRACE: Duration = Duration::from_secs(5);

// ---- the child's side ----

/// Serves the context stream of `context` until the parent closes the child's stdin (or
/// the parent is gone); then exits the process. `commands` is the rest of the child's stdin;
/// `frames` is its stdout (unbuffered); `send` writes one status line.
pub(super) fn serve(
    context: &SealedContext,
    commands: Box<dyn BufRead + Send>,
    mut frames: File,
    send: impl Fn(&Message),
) -> ! {
    let stop = Arc::new(AtomicBool::new(false));
    let (asked, requests) = std::sync::mpsc::channel::<()>();
    {
        let stop = stop.clone();
        // Reads commands while a stream runs, so that `stop` arrives in the middle of one.
        // Commands are read in order: a `stop` meant for a stream that already ended is
        // cleared by the next `seal`.
        std::thread::spawn(move || {
            let mut commands = commands;
            let mut line = Vec::new();
            loop {
                line.clear();
                match commands.read_until(b'\n', &mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                if line == SEAL {
                    stop.store(false, Ordering::SeqCst);
                    if asked.send(()).is_err() {
                        break;
                    }
                } else if line == STOP {
                    stop.store(true, Ordering::SeqCst);
                }
            }
            // Dropping `asked` ends the loop below.
        });
    }
    while requests.recv().is_ok() {
        let mut writer = FrameWriter {
            out: &mut frames,
            stop: &stop,
            pending: Vec::with_capacity(FRAME_BYTES),
        };
        let result = context.write_tar(&mut writer);
        // After a stop (or a failed seal) what is pending is dropped, not sent.
        let tail = if result.is_ok() {
            writer.send_pending()
        } else {
            Ok(())
        };
        if tail
            .and_then(|()| frames.write_all(&0u32.to_be_bytes()))
            .is_err()
        {
            std::process::exit(75);
        }
        match result {
            Ok(bytes) => send(&Message::Sealed { bytes }),
            Err(e) => send(&Message::Failed {
                stage: e.stage,
                class: e.class,
                code: e.code,
                message: e.message,
            }),
        }
    }
    std::process::exit(0)
}

/// Collects the tar stream into frames.
struct FrameWriter<'a> {
    out: &'a mut File,
    stop: &'a AtomicBool,
    pending: Vec<u8>,
}

impl FrameWriter<'_> {
    fn send_pending(&mut self) -> io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let len = u32::try_from(self.pending.len()).map_err(io::Error::other)?;
        let sent = self
            .out
            .write_all(&len.to_be_bytes())
            .and_then(|()| self.out.write_all(&self.pending));
        if sent.is_err() {
            // The parent is gone: no one to work for.
            std::process::exit(75);
        }
        self.pending.clear();
        Ok(())
    }
}

impl Write for FrameWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.stop.load(Ordering::SeqCst) {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the reader of the context stopped",
            ));
        }
        let n = buf.len().min(FRAME_BYTES - self.pending.len());
        self.pending.extend_from_slice(&buf[..n]);
        if self.pending.len() == FRAME_BYTES {
            self.send_pending()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

// ---- the parent's side ----

/// How the child ended.
#[derive(Debug)]
pub(super) struct Ended {
    status: io::Result<ExitStatus>,
    stderr: String,
}

/// The context of a child that has fetched its source: each `write_tar` asks it for the
/// stream. Dropping it kills the child.
pub(super) struct PipeContext {
    link: Mutex<Link>,
    ended: watch::Receiver<Option<Ended>>,
    /// Kills the child (on drop, or when a stream breaks).
    end: CancellationToken,
    cancel: CancellationToken,
    runtime: tokio::runtime::Handle,
    limits: ChildLimits,
}

struct Link {
    commands: File,
    replies: BufReader<File>,
    frame: Vec<u8>,
    /// Set once a stream broke; the child is not asked again.
    broken: bool,
}

/// Why a stream did not complete.
enum Break {
    /// The child broke the protocol (or its pipe): it is killed and its end explains.
    Child(Option<String>),
    /// The child's seal failed, or the reader stopped; the child can serve again.
    Job(JobError),
}

impl PipeContext {
    /// Takes over a child that sent `done`: `commands` and `replies` are its stdin and
    /// stdout (blocking). `cancel` (the job's) kills it.
    pub(super) fn start(
        mut child: tokio::process::Child,
        stderr_tail: tokio::task::JoinHandle<String>,
        commands: File,
        replies: File,
        cancel: CancellationToken,
        limits: ChildLimits,
    ) -> PipeContext {
        let (tell, ended) = watch::channel(None);
        let end = CancellationToken::new();
        {
            let (end, cancel) = (end.clone(), cancel.clone());
            tokio::spawn(async move {
                let status = tokio::select! {
                    status = child.wait() => status,
                    _ = end.cancelled() => { let _ = child.start_kill(); child.wait().await }
                    _ = cancel.cancelled() => { let _ = child.start_kill(); child.wait().await }
                };
                let stderr = stderr_tail.await.unwrap_or_default();
                let _ = tell.send(Some(Ended { status, stderr }));
            });
        }
        PipeContext {
            link: Mutex::new(Link {
                commands,
                replies: BufReader::new(replies),
                frame: Vec::new(),
                broken: false,
            }),
            ended,
            end,
            cancel,
            runtime: tokio::runtime::Handle::current(),
            limits,
        }
    }

    /// The error of a child that can no longer serve: cancelled, or how it ended.
    fn gone(&self, protocol: Option<String>) -> JobError {
        if let Some(what) = protocol {
            self.end.cancel();
            return JobError::permanent(
                Stage::Seal,
                ErrorCode::UnsafeSource,
                format!("the source process broke the context stream: {what}"),
            );
        }
        let mut ended = self.ended.clone();
        let wait = async {
            let graceful = tokio::time::timeout(EXIT_GRACE, ended.wait_for(Option::is_some))
                .await
                .is_ok();
            if !graceful {
                self.end.cancel();
                let _ = ended.wait_for(Option::is_some).await;
            }
        };
        self.runtime.block_on(wait);
        if self.cancel.is_cancelled() {
            return JobError::cancelled(Stage::Seal);
        }
        match &*self.ended.borrow() {
            Some(Ended {
                status: Ok(status),
                stderr,
            }) => crash_error(Stage::Seal, status, stderr, &self.limits),
            _ => JobError::transient(
                Stage::Seal,
                ErrorCode::Internal,
                "the source process ended and its status is unknown",
            ),
        }
    }
}

impl Drop for PipeContext {
    fn drop(&mut self) {
        self.end.cancel();
    }
}

impl ContextWriter for PipeContext {
    fn write_tar(&self, out: &mut dyn Write) -> Result<u64, JobError> {
        if self.cancel.is_cancelled() {
            return Err(JobError::cancelled(Stage::Seal));
        }
        let mut link = self.link.lock().unwrap_or_else(|e| e.into_inner());
        if link.broken {
            return Err(self.gone(None));
        }
        match link.stream(out) {
            Ok(bytes) => Ok(bytes),
            Err(Break::Job(e)) => Err(e),
            Err(Break::Child(protocol)) => {
                link.broken = true;
                Err(self.gone(protocol))
            }
        }
    }
}

impl Link {
    /// One stream: `seal`, the frames copied to `out`, the status line.
    fn stream(&mut self, out: &mut dyn Write) -> Result<u64, Break> {
        let pipe = |_: io::Error| Break::Child(None);
        self.commands.write_all(SEAL).map_err(pipe)?;
        let mut out_error = None;
        let mut sent = 0u64;
        loop {
            let mut len = [0u8; 4];
            self.replies.read_exact(&mut len).map_err(pipe)?;
            let len = u32::from_be_bytes(len) as usize;
            if len == 0 {
                break;
            }
            if len > MAX_FRAME_BYTES {
                return Err(Break::Child(Some(format!(
                    "a frame of {len} bytes (at most {MAX_FRAME_BYTES})"
                ))));
            }
            self.frame.resize(len, 0);
            self.replies.read_exact(&mut self.frame).map_err(pipe)?;
            if out_error.is_none() {
                match out.write_all(&self.frame) {
                    Ok(()) => sent += len as u64,
                    Err(e) => {
                        out_error = Some(e);
                        // The child may have ended the stream already; the zero frame comes.
                        let _ = self.commands.write_all(STOP);
                    }
                }
            }
        }
        let mut line = Vec::new();
        (&mut self.replies)
            .take(MAX_LINE_BYTES as u64 + 1)
            .read_until(b'\n', &mut line)
            .map_err(pipe)?;
        let status = serde_json::from_slice::<Message>(&line);
        if let Some(e) = out_error {
            return Err(Break::Job(crate::context::write_error(e)));
        }
        match status {
            Ok(Message::Sealed { bytes }) if bytes == sent => Ok(sent),
            Ok(Message::Sealed { bytes }) => Err(Break::Child(Some(format!(
                "it announced {bytes} bytes and sent {sent}"
            )))),
            Ok(Message::Failed {
                stage,
                class,
                code,
                message,
            }) => Err(Break::Job(
                JobError::new(stage, code, message).with_class(class),
            )),
            _ if line.is_empty() => Err(Break::Child(None)),
            _ => Err(Break::Child(Some("an unreadable status line".into()))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorClass;

    /// A link whose child has already written `replies` and closed its stdout; returns it
    /// and what the parent sent the child.
    fn link(replies: &[u8]) -> (Link, std::io::PipeReader) {
        let (commands_read, commands) = std::io::pipe().unwrap();
        let (replies_read, mut replies_write) = std::io::pipe().unwrap();
        replies_write.write_all(replies).unwrap();
        drop(replies_write);
        let link = Link {
            commands: File::from(std::os::fd::OwnedFd::from(commands)),
            replies: BufReader::new(File::from(std::os::fd::OwnedFd::from(replies_read))),
            frame: Vec::new(),
            broken: false,
        };
        (link, commands_read)
    }

    fn frame(bytes: &[u8]) -> Vec<u8> {
        let mut out = (bytes.len() as u32).to_be_bytes().to_vec();
        out.extend_from_slice(bytes);
        out
    }

    fn status(message: &Message) -> Vec<u8> {
        let mut line = serde_json::to_vec(message).unwrap();
        line.push(b'\n');
        line
    }

    fn sent(link: Link, commands: std::io::PipeReader) -> String {
        drop(link);
        let mut text = String::new();
        let mut commands = commands;
        commands.read_to_string(&mut text).unwrap();
        text
    }

    #[test]
    fn a_stream_is_its_frames_in_order() {
        let replies = [
            frame(b"abc"),
            frame(b"defg"),
            frame(b""),
            status(&Message::Sealed { bytes: 7 }),
        ]
        .concat();
        let (mut link, commands) = link(&replies);
        let mut out = Vec::new();
        assert!(matches!(link.stream(&mut out), Ok(7)));
        assert_eq!(out, b"abcdefg");
        assert_eq!(sent(link, commands), "seal\n");
    }

    #[test]
    fn a_reader_that_stops_asks_the_child_to_stop_and_gets_the_write_error() {
        let replies = [
            frame(b"abc"),
            frame(b"def"),
            frame(b""),
            status(&Message::Failed {
                stage: Stage::Seal,
                class: ErrorClass::Transient,
                code: ErrorCode::Internal,
                message: "stopped".into(),
            }),
        ]
        .concat();
        let (mut link, commands) = link(&replies);
        let mut out = [0u8; 2];
        let Err(Break::Job(e)) = link.stream(&mut &mut out[..]) else {
            panic!("the write error")
        };
        assert!(e.message.contains("writing the build context"), "{e}");
        assert_eq!(sent(link, commands), "seal\nstop\n");
    }

    #[test]
    fn the_childs_seal_error_comes_back_as_it_is() {
        let replies = [
            frame(b""),
            status(&Message::Failed {
                stage: Stage::Seal,
                class: ErrorClass::Permanent,
                code: ErrorCode::LimitExceeded,
                message: "over max_entries".into(),
            }),
        ]
        .concat();
        let (mut link, _commands) = link(&replies);
        let Err(Break::Job(e)) = link.stream(&mut Vec::new()) else {
            panic!("the child's error")
        };
        assert_eq!(
            (e.class, e.code, e.message.as_str()),
            (
                ErrorClass::Permanent,
                ErrorCode::LimitExceeded,
                "over max_entries"
            )
        );
    }

    #[test]
    fn a_child_that_breaks_the_protocol_is_not_believed() {
        let too_big = (MAX_FRAME_BYTES as u32 + 1).to_be_bytes().to_vec();
        let cases: [(Vec<u8>, Option<&str>); 5] = [
            (too_big, Some("a frame of")),
            (
                [
                    frame(b"abc"),
                    frame(b""),
                    status(&Message::Sealed { bytes: 9 }),
                ]
                .concat(),
                Some("announced 9 bytes and sent 3"),
            ),
            (
                [frame(b"abc"), frame(b""), b"{nonsense\n".to_vec()].concat(),
                Some("unreadable"),
            ),
            // Ends in the middle of a frame, or without a status: the child's end explains.
            ([frame(b"abc")[..5].to_vec()].concat(), None),
            ([frame(b"abc"), frame(b"")].concat(), None),
        ];
        for (replies, says) in cases {
            let (mut link, _commands) = link(&replies);
            match (link.stream(&mut Vec::new()), says) {
                (Err(Break::Child(Some(what))), Some(says)) => {
                    assert!(what.contains(says), "{says:?} in {what:?}")
                }
                (Err(Break::Child(None)), None) => {}
                (Err(Break::Child(what)), _) => panic!("{says:?}: got {what:?}"),
                (Ok(n), _) => panic!("{says:?}: accepted {n} bytes"),
                (Err(Break::Job(e)), _) => panic!("{says:?}: a job error {e}"),
            }
        }
    }
}
