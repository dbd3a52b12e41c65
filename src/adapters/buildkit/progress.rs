//! BuildKit's progress stream turned into log lines, and the engine's build errors turned into
//! classified [`JobError`]s. Pure: no I/O, so every rule here has a unit test.
//!
//! The lines follow the docker CLI's `--progress=plain` shape (`#3 [2/3] RUN make`, `#3 0.41
//! output`, `#3 DONE`, `#3 ERROR: …`), numbered by first appearance. Nothing is truncated: a
//! partial line is held until its newline or the end of the build, never cut. Only the failure
//! message quotes a bounded tail of the failed step's output.

use std::collections::{HashMap, VecDeque};

use bollard_buildkit_proto::moby::buildkit::v1::StatusResponse;

use crate::error::{ErrorCode, JobError, Stage};

/// How many of the failed step's last output lines the failure message quotes.
pub const TAIL_LINES: usize = 20;

/// The vertex BuildKit runs a cache import in: this, then the cache's reference.
const CACHE_IMPORT_VERTEX: &str = "importing cache manifest from ";

/// Whether `name` is the vertex of a registry cache export: `exporting content cache` since
/// BuildKit 0.11, `exporting cache` before.
fn is_cache_export_vertex(name: &str) -> bool {
    name == "exporting content cache" || name == "exporting cache"
}

/// What a build's progress told of a shared cache (the engine's inline cache export is not in
/// it: factoryd pushes that image itself).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CacheProgress {
    pub import: CacheStep,
    pub export: CacheStep,
    /// Steps BuildKit reported `CACHED`: found in the builder's own cache or the imported one.
    pub cached_steps: usize,
}

/// How one cache vertex ended.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub enum CacheStep {
    /// Not in the progress: not asked for, or the build ended before it.
    #[default]
    NotSeen,
    Done,
    Failed(String),
}

#[derive(Default)]
struct VertexState {
    number: usize,
    announced: bool,
    finished: bool,
    cached: bool,
    /// Bytes after the last newline, per stream (stdout 1, stderr 2).
    partial: HashMap<i64, Vec<u8>>,
    /// The step's last output lines, for the failure message.
    tail: VecDeque<String>,
    error: Option<String>,
}

/// Assembles log lines from BuildKit status messages.
#[derive(Default)]
pub struct LogAssembler {
    vertices: HashMap<String, VertexState>,
    next_number: usize,
    /// Vertex digests in order of first appearance, for deterministic flushing.
    order: Vec<String>,
    /// Vertex names, for the failure message.
    names: HashMap<String, String>,
}

impl LogAssembler {
    fn vertex(&mut self, digest: &str) -> &mut VertexState {
        if !self.vertices.contains_key(digest) {
            self.next_number += 1;
            self.order.push(digest.to_owned());
            self.vertices.insert(
                digest.to_owned(),
                VertexState {
                    number: self.next_number,
                    ..VertexState::default()
                },
            );
        }
        self.vertices
            .get_mut(digest)
            .unwrap_or_else(|| unreachable!("inserted above"))
    }

    /// Adds one status message; appends the complete lines it yields to `out`.
    pub fn push(&mut self, status: &StatusResponse, out: &mut Vec<String>) {
        for v in &status.vertexes {
            self.names.insert(v.digest.clone(), v.name.clone());
            let name = v.name.clone();
            let state = self.vertex(&v.digest);
            let n = state.number;
            if !state.announced && (v.started.is_some() || v.cached) {
                state.announced = true;
                out.push(format!("#{n} {name}"));
            }
            if v.cached && !state.finished {
                state.finished = true;
                state.cached = true;
                out.push(format!("#{n} CACHED"));
            }
            if !v.error.is_empty() && state.error.is_none() {
                flush_partials(n, state, out);
                state.error = Some(v.error.clone());
                state.finished = true;
                out.push(format!("#{n} ERROR: {}", v.error));
            } else if v.completed.is_some() && !state.finished {
                flush_partials(n, state, out);
                state.finished = true;
                out.push(format!("#{n} DONE"));
            }
        }
        for s in &status.statuses {
            // Transfer progress (layers pulled, context sent) repeats many times per second;
            // only its completion is a log line.
            if s.completed.is_some() {
                let state = self.vertex(&s.vertex);
                let n = state.number;
                let total = if s.total > 0 { s.total } else { s.current };
                out.push(format!("#{n} {} {total} done", s.id));
            }
        }
        for log in &status.logs {
            let state = self.vertex(&log.vertex);
            let n = state.number;
            let buf = state.partial.entry(log.stream).or_default();
            buf.extend_from_slice(&log.msg);
            while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buf.drain(..=pos).collect();
                let text = String::from_utf8_lossy(&line[..line.len() - 1])
                    .trim_end_matches('\r')
                    .to_owned();
                remember(&mut state.tail, &text);
                out.push(format!("#{n} {text}"));
            }
        }
    }

    /// Emits what is still held (output without a final newline) at the end of the build.
    pub fn finish(&mut self, out: &mut Vec<String>) {
        for digest in self.order.clone() {
            if let Some(state) = self.vertices.get_mut(&digest) {
                let n = state.number;
                flush_partials(n, state, out);
            }
        }
    }

    /// The failed step's name and its last output lines, when a step failed. A failed cache
    /// import or export is not a step: BuildKit builds on without the cache (and an import
    /// fails on every source's first build, when there is no cache yet).
    pub fn failed_step(&self) -> Option<(String, Vec<String>)> {
        self.order.iter().find_map(|digest| {
            let state = self.vertices.get(digest)?;
            state.error.as_ref()?;
            let name = self.names.get(digest).cloned().unwrap_or_default();
            if name.starts_with(CACHE_IMPORT_VERTEX) || is_cache_export_vertex(&name) {
                return None;
            }
            Some((name, state.tail.iter().cloned().collect()))
        })
    }

    /// How the build's cache import and registry cache export went, and how many steps came
    /// from a cache.
    pub fn cache_progress(&self) -> CacheProgress {
        let mut progress = CacheProgress::default();
        for digest in &self.order {
            let (Some(state), Some(name)) = (self.vertices.get(digest), self.names.get(digest))
            else {
                continue;
            };
            progress.cached_steps += usize::from(state.cached);
            let step = match (&state.error, state.finished) {
                (Some(error), _) => CacheStep::Failed(error.clone()),
                (None, true) => CacheStep::Done,
                (None, false) => CacheStep::NotSeen,
            };
            if name.starts_with(CACHE_IMPORT_VERTEX) {
                progress.import = step;
            } else if is_cache_export_vertex(name) {
                progress.export = step;
            }
        }
        progress
    }
}

fn flush_partials(n: usize, state: &mut VertexState, out: &mut Vec<String>) {
    let mut streams: Vec<i64> = state.partial.keys().copied().collect();
    streams.sort_unstable();
    for stream in streams {
        if let Some(buf) = state.partial.get_mut(&stream) {
            if !buf.is_empty() {
                let text = String::from_utf8_lossy(buf).into_owned();
                buf.clear();
                remember(&mut state.tail, &text);
                out.push(format!("#{n} {text}"));
            }
        }
    }
}

fn remember(tail: &mut VecDeque<String>, line: &str) {
    if tail.len() == TAIL_LINES {
        tail.pop_front();
    }
    tail.push_back(line.to_owned());
}

/// Classifies the error the engine reported for a build (the stream's `errorDetail`, or an
/// HTTP error answer), given the failed step if BuildKit named one.
///
/// The engine gives these as text only, so this is where text becomes a class, once: auth and
/// not-found answers from a base image's registry first (they arrive wrapped in "failed to
/// create LLB definition", like Dockerfile errors), then Dockerfile errors, then a failed step.
pub fn classify_build_error(message: &str, failed_step: Option<(String, Vec<String>)>) -> JobError {
    let lower = message.to_ascii_lowercase();
    let has = |needles: &[&str]| needles.iter().any(|n| lower.contains(n));

    let code = if has(&[
        "401 unauthorized",
        "403 forbidden",
        "unauthorized",
        "authorization failed",
        "authentication required",
        "pull access denied",
        "denied:",
        "no basic auth credentials",
        "insufficient_scope",
    ]) {
        ErrorCode::AuthFailed
    } else if has(&[
        "500 internal server error",
        "502 bad gateway",
        "503 service unavailable",
        "504 gateway timeout",
        "connection refused",
        "connection reset",
        "i/o timeout",
        "tls handshake timeout",
        "no such host",
        "unexpected eof",
    ]) && !has(&["dockerfile parse error"])
    {
        ErrorCode::Unavailable
    } else if has(&[
        "manifest unknown",
        ": not found",
        "404 not found",
        "name unknown",
    ]) && !has(&[
        "dockerfile parse error",
        "executor failed",
        "did not complete",
    ]) {
        ErrorCode::NotFound
    } else if has(&[
        "dockerfile parse error",
        "unknown instruction",
        "failed to parse dockerfile",
        "failed to parse stage name",
        "target stage",
        "file with no instructions",
        "the dockerfile cannot be empty",
        "cannot find the dockerfile",
        "failed to read dockerfile",
    ]) {
        ErrorCode::DockerfileError
    } else if failed_step.is_some()
        || has(&["executor failed running", "did not complete successfully"])
    {
        ErrorCode::BuildStepFailed
    } else {
        // Unknown: transient, bounded by the retry budget (ARCHITECTURE §5).
        ErrorCode::Internal
    };

    let mut text = message.trim().to_owned();
    if code == ErrorCode::BuildStepFailed {
        if let Some((name, tail)) = failed_step {
            text = format!("step {name} failed: {text}");
            if !tail.is_empty() {
                text.push_str("\nlast output:\n");
                text.push_str(&tail.join("\n"));
            }
        }
    }
    JobError::new(Stage::Build, code, text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorClass;
    use bollard_buildkit_proto::moby::buildkit::v1::{Vertex, VertexLog};

    fn vertex(digest: &str, name: &str, started: bool, completed: bool, error: &str) -> Vertex {
        Vertex {
            digest: digest.into(),
            name: name.into(),
            started: started.then(Default::default),
            completed: completed.then(Default::default),
            error: error.into(),
            ..Default::default()
        }
    }

    fn log(digest: &str, msg: &str) -> VertexLog {
        VertexLog {
            vertex: digest.into(),
            stream: 1,
            msg: msg.as_bytes().to_vec(),
            ..Default::default()
        }
    }

    #[test]
    fn lines_split_across_messages_are_joined_not_cut() {
        let mut a = LogAssembler::default();
        let mut out = Vec::new();
        a.push(
            &StatusResponse {
                vertexes: vec![vertex("d1", "[1/2] RUN echo", true, false, "")],
                logs: vec![log("d1", "hel")],
                ..Default::default()
            },
            &mut out,
        );
        a.push(
            &StatusResponse {
                logs: vec![log("d1", "lo\nwor")],
                ..Default::default()
            },
            &mut out,
        );
        a.finish(&mut out);
        assert_eq!(out, ["#1 [1/2] RUN echo", "#1 hello", "#1 wor"]);
    }

    #[test]
    fn a_failed_step_keeps_its_last_lines_for_the_message() {
        let mut a = LogAssembler::default();
        let mut out = Vec::new();
        let many: String = (0..30).map(|i| format!("line {i}\n")).collect();
        a.push(
            &StatusResponse {
                vertexes: vec![vertex("d1", "[2/2] RUN false", true, false, "")],
                logs: vec![log("d1", &many)],
                ..Default::default()
            },
            &mut out,
        );
        a.push(
            &StatusResponse {
                vertexes: vec![vertex("d1", "[2/2] RUN false", true, true, "exit code: 1")],
                ..Default::default()
            },
            &mut out,
        );
        assert_eq!(out.len(), 32, "every line kept: {out:?}");
        let step = a.failed_step().expect("failed step");
        let e = classify_build_error("executor failed running [/bin/sh -c false]", Some(step));
        assert_eq!(e.code, ErrorCode::BuildStepFailed);
        assert_eq!(e.class, ErrorClass::Permanent);
        assert!(e.message.contains("line 29"), "{}", e.message);
        assert!(!e.message.contains("line 9\n"), "{}", e.message);
    }

    /// Regression guard: with a shared cache, a source's first build fails its cache import
    /// ("not found"); a later failing `RUN` must still be the failed step.
    #[test]
    fn a_failed_cache_import_is_not_the_failed_step_and_is_reported_as_the_imports() {
        let mut a = LogAssembler::default();
        let mut out = Vec::new();
        let import = "importing cache manifest from 127.0.0.1:5000/buildcache/web:cache";
        a.push(
            &StatusResponse {
                vertexes: vec![
                    vertex(
                        "i",
                        import,
                        true,
                        true,
                        "127.0.0.1:5000/buildcache/web:cache: not found",
                    ),
                    Vertex {
                        cached: true,
                        ..vertex("c", "[1/3] COPY . /", false, false, "")
                    },
                    vertex("r", "[2/3] RUN false", true, true, "exit code: 1"),
                ],
                ..Default::default()
            },
            &mut out,
        );
        let (name, _) = a.failed_step().expect("the RUN failed");
        assert_eq!(name, "[2/3] RUN false");
        let progress = a.cache_progress();
        assert_eq!(
            progress.import,
            CacheStep::Failed("127.0.0.1:5000/buildcache/web:cache: not found".to_owned())
        );
        assert_eq!(progress.export, CacheStep::NotSeen);
        assert_eq!(progress.cached_steps, 1);
    }

    #[test]
    fn a_cache_export_is_reported_by_the_names_old_and_new_buildkit_give_it() {
        for name in ["exporting content cache", "exporting cache"] {
            let mut a = LogAssembler::default();
            let mut out = Vec::new();
            a.push(
                &StatusResponse {
                    vertexes: vec![vertex("e", name, true, true, "")],
                    ..Default::default()
                },
                &mut out,
            );
            assert_eq!(a.cache_progress().export, CacheStep::Done, "{name}");
            a.push(
                &StatusResponse {
                    vertexes: vec![vertex("f", name, true, true, "connection refused")],
                    ..Default::default()
                },
                &mut out,
            );
            assert_eq!(
                a.cache_progress().export,
                CacheStep::Failed("connection refused".to_owned()),
                "{name}"
            );
            assert_eq!(a.failed_step(), None, "{name}");
        }
    }

    #[test]
    fn errors_are_classified_by_what_the_caller_must_do() {
        let cases = [
            ("failed to solve with frontend dockerfile.v0: failed to create LLB definition: dockerfile parse error line 2: unknown instruction: FRM", ErrorCode::DockerfileError),
            ("failed to solve with frontend dockerfile.v0: failed to create LLB definition: failed to authorize: failed to fetch anonymous token: unexpected status: 401 Unauthorized", ErrorCode::AuthFailed),
            ("failed to solve with frontend dockerfile.v0: failed to create LLB definition: 127.0.0.1:5000/base:1: not found", ErrorCode::NotFound),
            ("failed to do request: Head \"http://127.0.0.1:1/v2/x/manifests/1\": dial tcp 127.0.0.1:1: connect: connection refused", ErrorCode::Unavailable),
            ("unexpected status: 503 Service Unavailable", ErrorCode::Unavailable),
            ("failed to solve with frontend dockerfile.v0: failed to create LLB definition: target stage nope could not be found", ErrorCode::DockerfileError),
            ("something nobody has seen", ErrorCode::Internal),
        ];
        for (message, code) in cases {
            assert_eq!(classify_build_error(message, None).code, code, "{message}");
        }
    }
}
