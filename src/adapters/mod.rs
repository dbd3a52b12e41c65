//! Adapters: one module per technology, each implementing ports and classifying its library's
//! errors at the boundary.

pub mod nats;
pub mod unavailable;
