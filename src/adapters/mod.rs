//! Adapters: one module per technology, each implementing ports (ARCHITECTURE §2) and
//! classifying its library's errors into [`crate::error::ErrorClass`] at its boundary.

pub mod credentials;
pub mod ecr;
pub mod nats;
pub mod oci;
pub mod oci_layout;
pub mod unavailable;
pub mod webhook;
