//! Integration tests: the real `factoryd` binary, and (as the issues land) real servers started
//! on free loopback ports and stopped on drop. One test binary, one module per area.

// These tests time real servers and processes in real time: the clock port's lint is for the
// daemon's code, where paused-time tests must be able to drive every clock.
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

mod builds;
mod cli;
#[cfg(feature = "test-util")]
mod fleet;
mod import_auth;
mod import_credentials;
mod import_transfer;
#[cfg(feature = "test-util")]
mod ops;
mod serve_import;
mod sources_confined;
mod sources_git;
mod sources_local;
mod sources_tarball;
mod store;
mod support;
#[cfg(feature = "test-util")]
mod worker_nats;
