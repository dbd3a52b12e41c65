//! The job pipeline (ARCHITECTURE §1). Stages arrive with the issues that implement them; for
//! now this holds the pure decision of what happens to a message once its job has run.

pub mod disposition;
