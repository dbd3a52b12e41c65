//! Progress events (ARCHITECTURE §4): what a job publishes on `factory.events.<job_id>` while
//! it runs. Events are for watching; the result is the record. Every text field is redacted
//! before it is emitted (see [`super::Redactor`]).

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::{ErrorInfo, Kind, Status};
use crate::error::Stage;

/// The `code` of the `Warning` a build gets when the fleet's shared build cache could not be
/// used (unreachable, refused, or no cache for its source); the build goes on without it.
pub const WARNING_BUILD_CACHE: &str = "build_cache";

/// One event as published: envelope and body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventEnvelope {
    pub v: u32,
    pub job_id: String,
    /// Per job and attempt, from 1; lets a follower spot gaps.
    pub seq: u64,
    pub attempt: u32,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    #[serde(flatten)]
    pub event: JobEvent,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum JobEvent {
    /// A worker claimed the job and starts an attempt.
    Started { kind: Kind, worker: String },
    /// The job entered a stage.
    Stage { stage: Stage },
    /// Bytes moved within a stage; `item` names what (a layer digest, "archive", "objects").
    Progress {
        stage: Stage,
        item: String,
        done_bytes: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        total_bytes: Option<u64>,
    },
    /// Build output lines, batched, redacted, never truncated.
    Log { lines: Vec<String> },
    /// Something the caller should know that did not fail the job (e.g. a git ref fallback).
    Warning { code: String, message: String },
    /// A transient failure; the job will be tried again after `delay_ms`.
    Retrying { error: ErrorInfo, delay_ms: u64 },
    /// The attempt ended with a published result.
    Finished { status: Status },
}
