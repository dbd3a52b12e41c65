//! The job result (ARCHITECTURE §4): what a worker publishes once a job has ended.
//!
//! A result holds no credential: its fields are identifiers, digests, revisions and an error
//! message that the adapters wrote without secrets.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::error::{ErrorClass, ErrorCode, JobError, Stage};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Succeeded,
    Failed,
    Cancelled,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Succeeded => "succeeded",
            Status::Failed => "failed",
            Status::Cancelled => "cancelled",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobResult {
    pub v: u32,
    pub job_id: String,
    pub source_id: String,
    pub status: Status,
    pub attempt: u32,
    pub worker: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<ImageInfo>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<Revision>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorInfo>,
    pub timings_ms: Timings,
    #[serde(with = "time::serde::rfc3339")]
    pub started_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub finished_at: OffsetDateTime,
}

/// What a worker copies to the dead-letter stream when it gives a job up without running it
/// (`poison`): enough to find the job and see why, without the job itself (its payload holds
/// credentials; the publisher has it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeadLetter {
    pub v: u32,
    pub job_id: String,
    pub source_id: String,
    pub kind: super::Kind,
    /// The delivery that gave it up (JetStream's count).
    pub delivery: u32,
    /// Attempts that ended with their worker gone.
    pub lost_attempts: u32,
    /// The result published for it (failed, `poison`).
    pub result: JobResult,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageInfo {
    /// Where the image now is: a registry reference or `oci:<layout dir>:<ref>`.
    pub reference: String,
    /// What the destination holds.
    pub digest: String,
    /// What the source served (imports); equal to `digest` when stored byte for byte.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_digest: Option<String>,
    pub size_bytes: u64,
    pub platforms: Vec<String>,
}

/// The git revision a docker-file job built.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Revision {
    pub commit: String,
    pub branch: String,
    pub tag: Option<String>,
    pub requested_hash: Option<String>,
    /// True when the requested hash was not on the branch and the branch head was built.
    pub fallback: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorInfo {
    pub stage: Stage,
    pub class: ErrorClass,
    pub code: ErrorCode,
    pub message: String,
    pub retryable: bool,
}

impl ErrorInfo {
    /// The result's view of an error. `retries_exhausted` marks a transient error given up on
    /// because the retry budget is spent.
    pub fn from_error(err: &JobError, attempts: u32, retries_exhausted: bool) -> Self {
        let message = if retries_exhausted {
            format!(
                "retries exhausted after {attempts} attempts: {}",
                err.message
            )
        } else {
            err.message.clone()
        };
        ErrorInfo {
            stage: err.stage,
            class: err.class,
            code: err.code,
            message,
            // Published errors are final: the worker already spent any retries.
            retryable: false,
        }
    }
}

/// Milliseconds spent per stage; stages that did not run stay 0.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Timings {
    pub fetch: u64,
    pub build: u64,
    pub import: u64,
    pub export: u64,
    pub total: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> JobResult {
        JobResult {
            v: 1,
            job_id: "job-1".into(),
            source_id: "src".into(),
            status: Status::Failed,
            attempt: 4,
            worker: "node-a".into(),
            image: None,
            revision: Some(Revision {
                commit: "a".repeat(40),
                branch: "main".into(),
                tag: None,
                requested_hash: Some("b".repeat(40)),
                fallback: true,
            }),
            error: Some(ErrorInfo::from_error(
                &JobError::new(Stage::Fetch, ErrorCode::Unavailable, "503 from server"),
                4,
                true,
            )),
            timings_ms: Timings::default(),
            started_at: OffsetDateTime::UNIX_EPOCH,
            finished_at: OffsetDateTime::UNIX_EPOCH,
        }
    }

    #[test]
    fn serialises_in_the_documented_shape_and_round_trips() {
        let r = sample();
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["status"], "failed");
        assert_eq!(json["error"]["stage"], "fetch");
        assert_eq!(json["error"]["class"], "transient");
        assert_eq!(json["error"]["code"], "unavailable");
        assert_eq!(json["error"]["retryable"], false);
        assert_eq!(json["revision"]["fallback"], true);
        assert_eq!(json["revision"]["tag"], serde_json::Value::Null);
        assert_eq!(json["started_at"], "1970-01-01T00:00:00Z");
        assert!(json.get("image").is_none());
        let back: JobResult = serde_json::from_value(json).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn exhausted_retries_say_so_in_the_message() {
        let r = sample();
        let msg = &r.error.unwrap().message;
        assert!(
            msg.starts_with("retries exhausted after 4 attempts"),
            "{msg}"
        );
    }
}
