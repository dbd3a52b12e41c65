//! Per-job workspaces: one private directory per job attempt under `worker.work_root`.
//!
//! A [`Workspace`] owns a directory (mode 0700) that holds what a job fetched — a bare git
//! object database or a downloaded archive, never a checkout or an extraction (ARCHITECTURE
//! §6). The directory is removed when the `Workspace` is dropped, so it goes whatever way the
//! job ends: success, failure, cancellation (the future holding it is dropped) or a panic
//! (unwinding drops it). [`cleanup_stale`] removes what a crashed process left behind; call it
//! once at start-up, before any job runs.
//!
//! This module must not interpret what is inside a workspace; the source adapters do. It only
//! names, creates and removes directories, and only ones it named (prefix [`PREFIX`]), so an
//! operator's files in the work root are never touched.

use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::error::{classify_io, JobError, Stage};

/// Every workspace directory's name starts with this; nothing else under the work root is
/// ever removed.
pub const PREFIX: &str = "job-";

/// A job attempt's private directory, removed on drop.
#[derive(Debug)]
pub struct Workspace {
    path: PathBuf,
}

impl Workspace {
    /// Creates `<work_root>/job-<job_id>-<random>` with mode 0700 (and the work root itself,
    /// 0700, when missing). The random part keeps two attempts of one job apart.
    pub fn create(work_root: &Path, job_id: &str) -> Result<Workspace, JobError> {
        let io_error = |what: &str, e: io::Error| {
            let (code, class) = classify_io(&e);
            JobError::new(
                Stage::Fetch,
                code,
                format!("cannot create the job's workspace: {what}: {e}"),
            )
            .with_class(class)
        };
        if !work_root.is_dir() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(work_root)
                .map_err(|e| io_error(&work_root.display().to_string(), e))?;
        }
        // Job ids are [A-Za-z0-9_-] (checked at decode), so they are safe in a file name; the
        // filter keeps that true even for a caller that skipped decoding.
        let safe_id: String = job_id
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
            .take(128)
            .collect();
        let path = work_root.join(format!("{PREFIX}{safe_id}-{}", random_hex(6)));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .map_err(|e| io_error(&path.display().to_string(), e))?;
        // The umask may have narrowed 0700 further, never widened it; set it exactly anyway.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| io_error(&path.display().to_string(), e))?;
        Ok(Workspace { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Workspace {
    fn drop(&mut self) {
        if let Err(e) = remove_tree(&self.path) {
            tracing::warn!(
                path = %self.path.display(),
                error = %e,
                "Could not remove a job workspace; it will be removed at the next start."
            );
        }
    }
}

/// Removes every workspace under `work_root` (entries named `job-…`), left by a process that
/// did not end cleanly. Returns how many were removed. A missing work root is not an error.
pub fn cleanup_stale(work_root: &Path) -> io::Result<usize> {
    let entries = match std::fs::read_dir(work_root) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let mut removed = 0;
    for entry in entries {
        let entry = entry?;
        if !entry.file_name().to_string_lossy().starts_with(PREFIX) {
            continue;
        }
        remove_tree(&entry.path())?;
        removed += 1;
    }
    Ok(removed)
}

/// Removes a directory tree without following symlinks; a tree already gone is fine. Git
/// writes its pack files read-only, which `remove_dir_all` handles on Unix (the directory's
/// write bit is what counts); directories are made writable first in case a job changed them.
fn remove_tree(path: &Path) -> io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
        Ok(meta) if !meta.is_dir() => return std::fs::remove_file(path),
        Ok(_) => {}
    }
    match std::fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(_) => {
            make_dirs_writable(path);
            std::fs::remove_dir_all(path)
        }
    }
}

fn make_dirs_writable(path: &Path) {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return;
    };
    if !meta.is_dir() {
        return;
    }
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700));
    if let Ok(entries) = std::fs::read_dir(path) {
        for entry in entries.flatten() {
            make_dirs_writable(&entry.path());
        }
    }
}

/// `bytes` random bytes as lowercase hex (workspace names, reserved build-file names).
pub fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    if getrandom::getrandom(&mut buf).is_err() {
        // Uniqueness, not secrecy, is what callers need: fall back to the clock and pid.
        use crate::clock::Clock;
        let seed = u128::from(crate::clock::SystemClock.now_ms()) ^ u128::from(std::process::id());
        for (i, b) in buf.iter_mut().enumerate() {
            *b = (seed >> ((i % 16) * 8)) as u8;
        }
    }
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_workspace_is_private_and_removed_on_drop() {
        let root = tempfile::tempdir().unwrap();
        let ws = Workspace::create(root.path(), "job-1").unwrap();
        let path = ws.path().to_path_buf();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        std::fs::create_dir(path.join("objects")).unwrap();
        std::fs::write(path.join("objects/pack"), b"x").unwrap();
        std::fs::set_permissions(path.join("objects"), std::fs::Permissions::from_mode(0o500))
            .unwrap();
        drop(ws);
        assert!(!path.exists());
    }

    #[test]
    fn a_workspace_is_removed_when_its_owner_panics() {
        let root = tempfile::tempdir().unwrap();
        let root_path = root.path().to_path_buf();
        let result = std::panic::catch_unwind(move || {
            let ws = Workspace::create(&root_path, "j").unwrap();
            std::fs::write(ws.path().join("archive.tar.gz"), b"x").unwrap();
            panic!("job code panicked");
        });
        assert!(result.is_err());
        assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 0);
    }

    #[test]
    fn two_attempts_of_one_job_get_different_directories() {
        let root = tempfile::tempdir().unwrap();
        let a = Workspace::create(root.path(), "same").unwrap();
        let b = Workspace::create(root.path(), "same").unwrap();
        assert_ne!(a.path(), b.path());
    }

    #[test]
    fn cleanup_stale_removes_only_workspaces() {
        let root = tempfile::tempdir().unwrap();
        let ws = Workspace::create(root.path(), "crashed").unwrap();
        std::fs::write(ws.path().join("f"), b"x").unwrap();
        // Simulate a crash: the directory outlives its owner.
        let left = ws.path().to_path_buf();
        std::mem::forget(ws);
        std::fs::write(root.path().join("operator-notes.txt"), b"keep").unwrap();
        assert_eq!(cleanup_stale(root.path()).unwrap(), 1);
        assert!(!left.exists());
        assert!(root.path().join("operator-notes.txt").exists());
        assert_eq!(cleanup_stale(&root.path().join("missing")).unwrap(), 0);
    }
}
