//! One collection of an `oci-layout` store: retention, then mark and sweep (see the module
//! above for why it is safe beside running writers and after a SIGKILL).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use super::retention::{self, Rule};
use super::{list, StoredImage};
use crate::adapters::oci_layout::{gc_lock, update_index, StoreError};
use crate::manifest::REF_NAME_ANNOTATION;

/// Files touched this little before the oldest lease (or the collection's start) are kept too:
/// file times come from the kernel's coarse clock, up to a tick (≤ 10 ms) behind the clock
/// leases are read from.
pub(crate) const CLOCK_SLACK: Duration = Duration::from_millis(100);

/// What one collection is asked to do.
#[derive(Debug, Clone, Copy)]
pub struct Collection {
    pub policy: retention::Policy,
    /// Say what would go, remove nothing.
    pub dry_run: bool,
}

/// What a collection did (or, dry, would do).
#[derive(Debug, Clone, Default, Serialize)]
pub struct CollectionReport {
    /// Images dropped from `index.json`, with the rule that dropped each.
    pub dropped: Vec<DroppedImage>,
    /// Images kept.
    pub kept: usize,
    /// Blobs removed (nothing reached them and no running writer touched them).
    pub blobs_removed: u64,
    /// Temporary files of writes that died, removed.
    pub temp_files_removed: u64,
    /// Bytes freed by both.
    pub bytes_freed: u64,
    /// Blobs left in the store.
    pub blobs_left: u64,
    /// Bytes of the blobs left.
    pub bytes_left: u64,
    /// Bytes still over `max_bytes` when only images that may not go are left.
    pub over_max_bytes: Option<u64>,
    pub dry_run: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct DroppedImage {
    pub reference: String,
    pub digest: String,
    pub rule: &'static str,
}

impl CollectionReport {
    pub fn dropped_by(&self, rule: Rule) -> usize {
        self.dropped
            .iter()
            .filter(|d| d.rule == rule.as_str())
            .count()
    }
}

/// Collects the store at `root` at `now_ms` (Unix milliseconds). Blocking; waits for a
/// collection running elsewhere to end first.
pub fn collect(root: &Path, what: Collection, now_ms: u64) -> Result<CollectionReport, StoreError> {
    let _exclusive = gc_lock(root, true)?;
    // Everything a running writer touched is at least as new as its lease.
    let cutoff_ms = oldest_lease_ms(root)
        .unwrap_or(now_ms)
        .min(now_ms)
        .saturating_sub(CLOCK_SLACK.as_millis() as u64);

    let images = list(root)?;
    let plan = retention::plan(&policy_view(&images), &what.policy, now_ms);
    let dropped: Vec<DroppedImage> = plan
        .drop
        .iter()
        .map(|&(i, rule)| DroppedImage {
            reference: images[i].reference.clone(),
            digest: images[i].digest.clone(),
            rule: rule.as_str(),
        })
        .collect();
    if !what.dry_run && !dropped.is_empty() {
        // Only the entries as listed: a tag moved to a new image meanwhile stays.
        let gone: HashSet<(String, String)> = dropped
            .iter()
            .map(|d| (d.reference.clone(), d.digest.clone()))
            .collect();
        update_index(root, |manifests| {
            manifests.retain(|d| {
                let name = d
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get(REF_NAME_ANNOTATION))
                    .cloned()
                    .unwrap_or_default();
                !gone.contains(&(name, d.digest.clone()))
            })
        })?;
    }

    // Mark from the index as it is now (a dry run: as it would be).
    let dropped_names: HashSet<(&str, &str)> = dropped
        .iter()
        .map(|d| (d.reference.as_str(), d.digest.as_str()))
        .collect();
    let kept: Vec<StoredImage> = if what.dry_run {
        images
            .into_iter()
            .filter(|i| !dropped_names.contains(&(i.reference.as_str(), i.digest.as_str())))
            .collect()
    } else {
        list(root)?
    };
    let reachable: HashSet<String> = kept
        .iter()
        .flat_map(|i| i.blobs.iter().map(|(d, _)| d.clone()))
        .collect();

    let mut report = CollectionReport {
        kept: kept.len(),
        over_max_bytes: plan.over_max_bytes,
        dry_run: what.dry_run,
        ..CollectionReport::default()
    };
    report.dropped = dropped;
    sweep_blobs(root, &reachable, cutoff_ms, what.dry_run, &mut report)?;
    sweep_temp_files(root, cutoff_ms, what.dry_run, &mut report);
    Ok(report)
}

fn policy_view(images: &[StoredImage]) -> Vec<retention::Image<'_>> {
    images
        .iter()
        .map(|i| retention::Image {
            source: i
                .source_id
                .as_deref()
                .unwrap_or_else(|| repository(&i.reference)),
            stored_at_ms: (i.stored_at.unix_timestamp_nanos() / 1_000_000).max(0) as u64,
            blobs: &i.blobs,
        })
        .collect()
}

/// An image without a recorded source is grouped by its repository.
fn repository(reference: &str) -> &str {
    match reference.rsplit_once(':') {
        Some((repo, tag)) if !tag.contains('/') => repo,
        _ => reference,
    }
}

/// Unix milliseconds of the oldest lease of a live writer; leases of processes that are gone
/// are removed.
fn oldest_lease_ms(root: &Path) -> Option<u64> {
    let dir = root.join(".ingest").join("leases");
    let entries = std::fs::read_dir(&dir).ok()?;
    let mut oldest: Option<u64> = None;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let pid: Option<i32> = name.split('-').next().and_then(|p| p.parse().ok());
        if pid.is_some_and(|pid| !process_alive(pid)) {
            let _ = std::fs::remove_file(entry.path());
            continue;
        }
        // A lease being written or unreadable counts as the oldest there can be: nothing
        // unreachable is swept this time.
        let since = std::fs::read_to_string(entry.path())
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or(0);
        oldest = Some(oldest.map_or(since, |o| o.min(since)));
    }
    oldest
}

fn process_alive(pid: i32) -> bool {
    Path::new("/proc").join(pid.to_string()).exists()
}

fn modified_ms(meta: &std::fs::Metadata) -> u64 {
    meta.modified()
        .ok()
        .and_then(|m| m.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(u64::MAX, |d| d.as_millis() as u64)
}

fn sweep_blobs(
    root: &Path,
    reachable: &HashSet<String>,
    cutoff_ms: u64,
    dry_run: bool,
    report: &mut CollectionReport,
) -> Result<(), StoreError> {
    let blobs = root.join("blobs");
    let algorithms = std::fs::read_dir(&blobs).map_err(|source| StoreError::Io {
        op: "list",
        path: blobs.clone(),
        source,
    })?;
    for algorithm in algorithms.flatten() {
        let Ok(files) = std::fs::read_dir(algorithm.path()) else {
            continue;
        };
        let name = algorithm.file_name().to_string_lossy().into_owned();
        for file in files.flatten() {
            let Ok(meta) = file.metadata() else { continue };
            let digest = format!("{name}:{}", file.file_name().to_string_lossy());
            if reachable.contains(&digest) || modified_ms(&meta) >= cutoff_ms {
                report.blobs_left += 1;
                report.bytes_left += meta.len();
                continue;
            }
            if dry_run || remove(&file.path()) {
                report.blobs_removed += 1;
                report.bytes_freed += meta.len();
            }
        }
    }
    Ok(())
}

/// Temporary blob and index files older than every live writer: their writer died.
fn sweep_temp_files(root: &Path, cutoff_ms: u64, dry_run: bool, report: &mut CollectionReport) {
    let ingest = root.join(".ingest");
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Ok(entries) = std::fs::read_dir(&ingest) {
        candidates.extend(entries.flatten().map(|e| e.path()));
    }
    // `index.json.tmp-*` of a rename that never happened.
    if let Ok(entries) = std::fs::read_dir(root) {
        candidates.extend(
            entries
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with("index.tmp-"))
                .map(|e| e.path()),
        );
    }
    for path in candidates {
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
        let lock = matches!(name.as_deref(), Some("gc.lock" | "index.lock"));
        if !meta.is_file() || lock || modified_ms(&meta) >= cutoff_ms {
            continue;
        }
        if dry_run || remove(&path) {
            report.temp_files_removed += 1;
            report.bytes_freed += meta.len();
        }
    }
}

fn remove(path: &Path) -> bool {
    std::fs::remove_file(path).is_ok()
}
