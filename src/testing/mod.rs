//! In-memory fakes of the ports, for the pipeline tier and for benchmarks of the queue path.
//!
//! Compiled for tests and with the `test-util` feature; `app.rs` never chooses them for a
//! production command. Fakes behave like the real systems where the worker depends on it:
//! the queue redelivers after `ack_wait`, honours nak delays and counts deliveries; the state
//! store does compare-and-set on revisions. Time is tokio's, so tests can pause it.

mod queue;
mod stages;
mod store;

pub use queue::{MemCancels, MemEvents, MemQueue, MemResults, MemStates, Settled};
pub use stages::{Behaviour, ScriptedStages};
pub use store::synthetic_store;
