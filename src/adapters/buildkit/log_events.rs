//! A build's log lines as batched, redacted `Log` events, and the loop that follows a build's
//! event stream until it ends or is cancelled. Shared by both backends; owns no connection.

use std::ops::ControlFlow;
use std::time::Duration;

use bollard_buildkit_proto::moby::buildkit::v1::StatusResponse;
use futures_util::{Stream, StreamExt};

use super::progress::LogAssembler;
use crate::job::JobEvent;
use crate::ports::StageContext;

/// Log lines per `Log` event, and the longest a line waits before its batch is sent.
const LOG_BATCH_LINES: usize = 64;
const LOG_BATCH_DELAY: Duration = Duration::from_millis(250);

/// The lines of one build, assembled from BuildKit status and emitted in batches.
pub(super) struct BuildLog<'a> {
    cx: &'a StageContext,
    assembler: LogAssembler,
    pending: Vec<String>,
}

impl<'a> BuildLog<'a> {
    pub(super) fn new(cx: &'a StageContext) -> BuildLog<'a> {
        BuildLog {
            cx,
            assembler: LogAssembler::default(),
            pending: Vec::new(),
        }
    }

    pub(super) fn status(&mut self, status: &StatusResponse) {
        self.assembler.push(status, &mut self.pending);
        self.emit_if_full();
    }

    /// Plain lines (the engine's `stream` messages).
    pub(super) fn lines(&mut self, text: &str) {
        self.pending
            .extend(text.lines().filter(|l| !l.is_empty()).map(str::to_owned));
        self.emit_if_full();
    }

    fn emit_if_full(&mut self) {
        if self.pending.len() >= LOG_BATCH_LINES {
            self.emit();
        }
    }

    /// The worker's event sink redacts too; masking here as well keeps a sink that does not
    /// (a test's, a future one's) from ever seeing a credential a RUN step echoed.
    fn emit(&mut self) {
        if !self.pending.is_empty() {
            let lines = self
                .pending
                .drain(..)
                .map(|l| self.cx.redactor.redact(&l))
                .collect();
            self.cx.emit(JobEvent::Log { lines });
        }
    }

    /// Emits everything still held, partial lines included.
    pub(super) fn finish(&mut self) {
        self.assembler.finish(&mut self.pending);
        self.emit();
    }

    pub(super) fn assembler(&self) -> &LogAssembler {
        &self.assembler
    }
}

/// Why [`follow`] stopped.
pub(super) enum Followed<R> {
    /// The stream ended.
    Ended,
    /// `on_item` broke with this value.
    Stopped(R),
    /// `cx.cancel` fired; the stream has been dropped.
    Cancelled,
}

/// Feeds `events` to `on_item` until the stream ends, `on_item` breaks, or the job is cancelled
/// (the stream is dropped at once, which is what stops the build in BuildKit); the log is
/// flushed every [`LOG_BATCH_DELAY`] and at the end.
pub(super) async fn follow<T, R>(
    events: impl Stream<Item = T>,
    log: &mut BuildLog<'_>,
    mut on_item: impl FnMut(T, &mut BuildLog<'_>) -> ControlFlow<R>,
) -> Followed<R> {
    let cancel = log.cx.cancel.clone();
    let mut events = std::pin::pin!(events);
    let mut flush_tick = tokio::time::interval(LOG_BATCH_DELAY);
    flush_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let followed = loop {
        tokio::select! {
            biased;
            _ = cancel.cancelled() => break Followed::Cancelled,
            item = events.next() => match item {
                None => break Followed::Ended,
                Some(item) => {
                    if let ControlFlow::Break(r) = on_item(item, log) {
                        break Followed::Stopped(r);
                    }
                }
            },
            _ = flush_tick.tick() => log.emit(),
        }
    };
    log.finish();
    followed
}
