//! factoryd: a build-and-import worker daemon.
//!
//! A control plane publishes *image source jobs* to NATS JetStream; factoryd agents pull them
//! and either import an image from a registry or build one from a Dockerfile through BuildKit,
//! then store or push it and publish a result. Each job takes this journey (ARCHITECTURE §1):
//!
//! ```text
//! JetStream ─▶ receive ─▶ resolve ─▶ fetch ─▶ seal ─▶ build | import ─▶ export ─▶ report ─▶ settle
//!  (queue)      Job      Credentials  Source  SealedContext  Image      StoredImage  Result   ack/nak/term
//! ```
//!
//! # Layout
//!
//! * [`cli`] — the command line; [`app`] — the composition root, one module per command.
//! * [`worker`] — slots and pull loops; `worker/delivery.rs` reads one delivery's journey
//!   (receive → claim → attempt → report → settle); [`worker::claim`] the claim protocol,
//!   [`worker::disposition`] the pure settle decision.
//! * [`readiness`] — holds, the builder and disk probes, pull-loop liveness, `/readyz`.
//! * [`clock`] — the wall-clock port (the only place the wall clock is read).
//! * [`config`] — raw TOML mirror → validated [`config::Config`], reporting every problem.
//! * [`job`] — the wire format: [`job::Job`] with Cycle-compatible origins, and the result.
//! * [`reference`](mod@reference) — the image reference grammar (docker.io, `library/`, `:latest`, digests),
//!   and the grammar of the git repository URLs a job may name.
//! * [`error`] — [`error::JobError`] and the classes that drive the queue.
//! * [`pipeline`] — [`pipeline::run_job`], the stages in order, and
//!   [`pipeline::attempt`], the one attempt runner `serve` and `run` share.
//! * [`ports`] — the traits stages call; [`adapters`] — their implementations (git, tar.gz).
//! * [`workspace`] — one private directory per job attempt, removed when the job ends.
//! * [`context`] — build-context rules: `.dockerignore`, path resolution, the tar stream.
//! * [`egress`] — which addresses a job may make the worker connect to.
//! * [`secret`] — a credential type that prints and serialises as `<redacted>`.
//! * [`problems`] — validation reports with the path of each field at fault.
//! * [`telemetry`] — logging set-up, the metrics and their HTTP endpoint, systemd.
//! * [`manifest`] — digests, descriptors, manifest media types; platform selection and the
//!   Docker → OCI conversion (pure).
//! * [`adapters`] — technologies behind the ports: [`adapters::oci_layout`] (the local OCI image
//!   store), …
//!
//! # Where unit tests live
//!
//! A small module keeps its unit tests inline, in a `#[cfg(test)] mod tests` at the bottom of
//! its file. When a module's tests are large (more than about 250 lines), the module is a
//! directory and its tests are a sibling file: `foo/mod.rs` with `foo/tests.rs`, declared in
//! `foo/mod.rs` as `#[cfg(test)] mod tests;`. Tests against real servers are in `tests/`.

pub mod adapters;
pub mod app;
pub mod cli;
pub mod clock;
pub mod config;
pub mod context;
pub mod egress;
pub mod error;
pub mod job;
pub mod manifest;
pub mod pipeline;
pub mod ports;
pub mod problems;
pub mod readiness;
pub mod reference;
pub mod sandbox;
pub mod secret;
pub mod shutdown;
pub mod store;
pub mod telemetry;
#[cfg(any(test, feature = "test-util"))]
pub mod testing;
pub mod worker;
pub mod workspace;
