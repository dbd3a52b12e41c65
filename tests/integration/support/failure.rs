//! Assertions on how a job failed: its error class, code and what its message names.

use factoryd::error::{ErrorClass, ErrorCode, JobError};

/// Asserts that `err` has `code`, and that its message holds each of `contains`.
#[track_caller]
pub fn assert_code(err: &JobError, code: ErrorCode, contains: &[&str]) {
    assert_eq!(err.code, code, "{err}");
    for needle in contains {
        assert!(err.message.contains(needle), "{needle:?} not in: {err}");
    }
}

/// [`assert_code`], and that `err` is of `class`.
#[track_caller]
pub fn assert_failure(err: &JobError, class: ErrorClass, code: ErrorCode, contains: &[&str]) {
    assert_eq!((err.code, err.class), (code, class), "{err}");
    assert_code(err, code, contains);
}
