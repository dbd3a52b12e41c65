//! Adapters: one module per technology, each implementing a port and classifying its
//! library's errors once, at the boundary (ARCHITECTURE §2, §5).
//!
//! * [`sources`] — the [`crate::ports::Fetcher`] for docker-file jobs, dispatching to
//!   [`git`] (libgit2) or [`tarball`] (HTTP download) and sealing through [`archive`];
//!   [`local`] seals a developer's directory the same way.

pub mod archive;
pub mod git;
pub mod local;
pub mod sources;
pub mod tarball;
