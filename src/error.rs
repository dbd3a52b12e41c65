//! Job errors and their classes.
//!
//! Every failure that reaches the pipeline is a [`JobError`]: the stage it happened in, its
//! [`ErrorClass`] (what the queue must do), a [`ErrorCode`] from a closed set (what happened, fit
//! for a metric label) and a message for people. Adapters classify their library's errors once,
//! at the boundary; nothing downstream inspects messages to decide whether to retry.
//!
//! A message must never contain a credential or URL userinfo. Constructors take the message
//! as given, so the adapters are responsible for what they put in it; [`crate::job`] redaction
//! helpers exist for text that came from outside (build logs, server bodies).

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// What the queue must do with a failure: give up, try again, or stop because someone asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorClass {
    /// Retrying cannot help: bad input, auth refused, not found, a failing `RUN` step.
    Permanent,
    /// Retrying may help: connection refused or reset, timeouts, 408/429/5xx, disk full.
    /// Errors of unknown origin are transient too, bounded by the retry budget.
    Transient,
    /// Stopped on request (a cancel) or by the worker's shutdown.
    Cancelled,
}

impl ErrorClass {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::Permanent => "permanent",
            ErrorClass::Transient => "transient",
            ErrorClass::Cancelled => "cancelled",
        }
    }
}

impl fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The pipeline stage a job was in (ARCHITECTURE §1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    Receive,
    Resolve,
    Fetch,
    Seal,
    Build,
    Import,
    Export,
}

impl Stage {
    pub const ALL: [Stage; 7] = [
        Stage::Receive,
        Stage::Resolve,
        Stage::Fetch,
        Stage::Seal,
        Stage::Build,
        Stage::Import,
        Stage::Export,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Receive => "receive",
            Stage::Resolve => "resolve",
            Stage::Fetch => "fetch",
            Stage::Seal => "seal",
            Stage::Build => "build",
            Stage::Import => "import",
            Stage::Export => "export",
        }
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What went wrong, from a closed set so that it can label a metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The job itself is malformed or asks for something the worker refuses.
    InvalidJob,
    /// Credentials were refused (401/403, git auth, SSH key).
    AuthFailed,
    /// The image, repository, revision, file or URL does not exist.
    NotFound,
    /// The Dockerfile does not parse or names a missing stage.
    DockerfileError,
    /// A build step (`RUN`) exited non-zero.
    BuildStepFailed,
    /// An archive or tree entry would escape its root, or is a device, FIFO or socket.
    UnsafeSource,
    /// A size, count, depth or time cap was reached.
    LimitExceeded,
    /// Content did not match its digest or declared size.
    DigestMismatch,
    /// A manifest, media type, transport or feature this worker does not handle.
    Unsupported,
    /// An address refused by the egress policy.
    EgressRefused,
    /// Earlier attempts of the job ended with their worker gone; not run again.
    Poison,
    /// The remote side is unreachable, reset the connection, or answered 5xx.
    Unavailable,
    /// The remote side asked us to slow down (429).
    RateLimited,
    /// A network or job deadline passed.
    Timeout,
    /// Local I/O failed (disk full, permissions).
    LocalIo,
    /// Cancelled by a request.
    Cancelled,
    /// Stopped because the worker is shutting down.
    Shutdown,
    /// A failure we did not recognise; treated as transient.
    Internal,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidJob => "invalid_job",
            ErrorCode::AuthFailed => "auth_failed",
            ErrorCode::NotFound => "not_found",
            ErrorCode::DockerfileError => "dockerfile_error",
            ErrorCode::BuildStepFailed => "build_step_failed",
            ErrorCode::UnsafeSource => "unsafe_source",
            ErrorCode::LimitExceeded => "limit_exceeded",
            ErrorCode::DigestMismatch => "digest_mismatch",
            ErrorCode::Unsupported => "unsupported",
            ErrorCode::EgressRefused => "egress_refused",
            ErrorCode::Poison => "poison",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Timeout => "timeout",
            ErrorCode::LocalIo => "local_io",
            ErrorCode::Cancelled => "cancelled",
            ErrorCode::Shutdown => "shutdown",
            ErrorCode::Internal => "internal",
        }
    }

    /// The class a code has unless the adapter knows better.
    pub fn default_class(self) -> ErrorClass {
        match self {
            ErrorCode::InvalidJob
            | ErrorCode::AuthFailed
            | ErrorCode::NotFound
            | ErrorCode::DockerfileError
            | ErrorCode::BuildStepFailed
            | ErrorCode::UnsafeSource
            | ErrorCode::LimitExceeded
            | ErrorCode::DigestMismatch
            | ErrorCode::Unsupported
            | ErrorCode::EgressRefused
            | ErrorCode::Poison => ErrorClass::Permanent,
            ErrorCode::Unavailable
            | ErrorCode::RateLimited
            | ErrorCode::Timeout
            | ErrorCode::LocalIo
            | ErrorCode::Internal => ErrorClass::Transient,
            ErrorCode::Cancelled | ErrorCode::Shutdown => ErrorClass::Cancelled,
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A classified failure of one job.
#[derive(Debug)]
pub struct JobError {
    pub stage: Stage,
    pub class: ErrorClass,
    pub code: ErrorCode,
    /// For people; never holds a secret.
    pub message: String,
    /// A server's `Retry-After`, honoured by the retry delay.
    pub retry_after: Option<Duration>,
    pub source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

impl JobError {
    /// An error whose class follows from its code.
    pub fn new(stage: Stage, code: ErrorCode, message: impl Into<String>) -> Self {
        JobError {
            stage,
            class: code.default_class(),
            code,
            message: message.into(),
            retry_after: None,
            source: None,
        }
    }

    pub fn permanent(stage: Stage, code: ErrorCode, message: impl Into<String>) -> Self {
        JobError::new(stage, code, message).with_class(ErrorClass::Permanent)
    }

    pub fn transient(stage: Stage, code: ErrorCode, message: impl Into<String>) -> Self {
        JobError::new(stage, code, message).with_class(ErrorClass::Transient)
    }

    /// Cancelled by a request (`factory.cancel.<id>` or the KV mark).
    pub fn cancelled(stage: Stage) -> Self {
        JobError::new(stage, ErrorCode::Cancelled, "cancelled on request")
    }

    /// Stopped by the worker's shutdown; another worker will take the job.
    pub fn shutdown(stage: Stage) -> Self {
        JobError::new(stage, ErrorCode::Shutdown, "worker shutting down")
    }

    pub fn with_class(mut self, class: ErrorClass) -> Self {
        self.class = class;
        self
    }

    pub fn with_retry_after(mut self, after: Duration) -> Self {
        self.retry_after = Some(after);
        self
    }

    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    /// True when the job was stopped by the worker's own shutdown, not by a request.
    pub fn is_shutdown(&self) -> bool {
        self.class == ErrorClass::Cancelled && self.code == ErrorCode::Shutdown
    }
}

impl fmt::Display for JobError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} failed ({}, {}): {}",
            self.stage, self.class, self.code, self.message
        )
    }
}

impl std::error::Error for JobError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

/// Classifies an HTTP status answered by a registry, tarball server or webhook.
/// Returns `None` for success statuses.
pub fn classify_http_status(status: u16) -> Option<(ErrorCode, ErrorClass)> {
    let code = match status {
        200..=399 => return None,
        401 | 403 => ErrorCode::AuthFailed,
        404 | 410 => ErrorCode::NotFound,
        408 => ErrorCode::Timeout,
        429 => ErrorCode::RateLimited,
        413 => ErrorCode::LimitExceeded,
        500..=599 => ErrorCode::Unavailable,
        _ => ErrorCode::InvalidJob,
    };
    Some((code, code.default_class()))
}

/// Classifies a local or network I/O error by its kind.
pub fn classify_io(err: &std::io::Error) -> (ErrorCode, ErrorClass) {
    use std::io::ErrorKind as K;
    let code = match err.kind() {
        K::NotFound => ErrorCode::NotFound,
        K::PermissionDenied => ErrorCode::LocalIo,
        K::TimedOut => ErrorCode::Timeout,
        K::ConnectionRefused
        | K::ConnectionReset
        | K::ConnectionAborted
        | K::NotConnected
        | K::BrokenPipe
        | K::UnexpectedEof
        | K::AddrNotAvailable => ErrorCode::Unavailable,
        K::StorageFull | K::OutOfMemory => ErrorCode::LocalIo,
        _ => ErrorCode::Internal,
    };
    (code, code.default_class())
}

/// `err` and its sources, joined with `: `, at most 300 characters (an error chain for a
/// message; redact it before it leaves the process).
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut parts = vec![err.to_string()];
    let mut source = err.source();
    while let Some(s) = source {
        parts.push(s.to_string());
        source = s.source();
    }
    parts.join(": ").chars().take(300).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_statuses_map_to_classes() {
        let cases: &[(u16, Option<(ErrorCode, ErrorClass)>)] = &[
            (200, None),
            (307, None),
            (400, Some((ErrorCode::InvalidJob, ErrorClass::Permanent))),
            (401, Some((ErrorCode::AuthFailed, ErrorClass::Permanent))),
            (403, Some((ErrorCode::AuthFailed, ErrorClass::Permanent))),
            (404, Some((ErrorCode::NotFound, ErrorClass::Permanent))),
            (408, Some((ErrorCode::Timeout, ErrorClass::Transient))),
            (429, Some((ErrorCode::RateLimited, ErrorClass::Transient))),
            (500, Some((ErrorCode::Unavailable, ErrorClass::Transient))),
            (503, Some((ErrorCode::Unavailable, ErrorClass::Transient))),
        ];
        for (status, want) in cases {
            assert_eq!(classify_http_status(*status), *want, "status {status}");
        }
    }

    #[test]
    fn io_errors_map_to_classes() {
        use std::io::{Error, ErrorKind};
        assert_eq!(
            classify_io(&Error::from(ErrorKind::ConnectionRefused)).1,
            ErrorClass::Transient
        );
        assert_eq!(
            classify_io(&Error::from(ErrorKind::StorageFull)),
            (ErrorCode::LocalIo, ErrorClass::Transient)
        );
        assert_eq!(
            classify_io(&Error::from(ErrorKind::NotFound)),
            (ErrorCode::NotFound, ErrorClass::Permanent)
        );
    }

    #[test]
    fn every_code_has_a_distinct_label() {
        let all = [
            ErrorCode::InvalidJob,
            ErrorCode::AuthFailed,
            ErrorCode::NotFound,
            ErrorCode::DockerfileError,
            ErrorCode::BuildStepFailed,
            ErrorCode::UnsafeSource,
            ErrorCode::LimitExceeded,
            ErrorCode::DigestMismatch,
            ErrorCode::Unsupported,
            ErrorCode::EgressRefused,
            ErrorCode::Poison,
            ErrorCode::Unavailable,
            ErrorCode::RateLimited,
            ErrorCode::Timeout,
            ErrorCode::LocalIo,
            ErrorCode::Cancelled,
            ErrorCode::Shutdown,
            ErrorCode::Internal,
        ];
        let mut labels: Vec<_> = all.iter().map(|c| c.as_str()).collect();
        labels.sort_unstable();
        labels.dedup();
        assert_eq!(labels.len(), all.len());
        for code in all {
            // The serde form and the label are the same word.
            assert_eq!(
                serde_json::to_string(&code).unwrap(),
                format!("\"{}\"", code.as_str())
            );
        }
    }

    #[test]
    fn shutdown_and_request_cancels_are_told_apart() {
        assert!(JobError::shutdown(Stage::Build).is_shutdown());
        let requested = JobError::cancelled(Stage::Build);
        assert_eq!(requested.class, ErrorClass::Cancelled);
        assert!(!requested.is_shutdown());
    }
}
