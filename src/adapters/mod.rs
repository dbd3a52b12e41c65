//! Adapters: one module per technology, each implementing a port and classifying its
//! library's errors once, at the boundary (ARCHITECTURE §2, §5).
//!
//! * [`sources`] — the [`crate::ports::Fetcher`] for docker-file jobs, dispatching to
//!   [`git`] (libgit2) or [`tarball`] (HTTP download) and sealing through [`archive`];
//!   [`local`] seals a developer's directory the same way.
//! * [`oci`] — registry imports ([`crate::ports::Importer`]) into [`oci_layout`] or a registry;
//!   [`credentials`] resolves origins' credentials with [`webhook`] and [`ecr`].
//! * [`buildkit`] — the [`crate::ports::Builder`]: Dockerfile builds on a Docker Engine's
//!   BuildKit, exported to [`oci_layout`] or pushed to a registry.
//! * [`nats`] — the JetStream work queue, job state, results, events and cancel requests.

pub mod archive;
pub mod buildkit;
pub mod credentials;
pub mod ecr;
pub mod git;
pub mod local;
pub mod nats;
pub mod oci;
pub mod oci_layout;
pub mod sources;
pub mod tarball;
pub mod webhook;
