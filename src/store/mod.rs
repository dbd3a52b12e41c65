//! The image store's lifecycle (issue 10): what an `oci-layout` store holds ([`list`]), which
//! images the retention policy drops ([`retention`]), and the collection of what nothing
//! reaches any more ([`collect`]). A `registry` destination is not collected here: that is the
//! registry's own garbage collector's job.
//!
//! A collection is safe while jobs write to the same store, from this process or another
//! (`factoryd store gc` beside `serve`):
//!
//! 1. it takes the store's collection lock exclusively (a second collector waits), so no writer
//!    is checking a blob at the same time (writers take it shared for that moment);
//! 2. it drops the images the policy names from `index.json` (one atomic replace);
//! 3. it marks every blob the remaining tags reach, through indexes and manifests;
//! 4. it sweeps the blobs nothing reaches that no running writer touched — older than the
//!    oldest live [`StoreLease`](crate::adapters::oci_layout::StoreLease) — and the temporary
//!    files of writes that died.
//!
//! A SIGKILL anywhere leaves `index.json` whole (old or new) and every blob it reaches in place,
//! since only unreachable blobs are removed; the next collection finishes the sweep.

pub mod gc;
pub mod keeper;
pub mod retention;

use std::collections::HashSet;
use std::path::Path;

use serde::Serialize;
use time::OffsetDateTime;

use crate::adapters::oci_layout::{
    read_index, StoreError, SOURCE_ID_ANNOTATION, STORED_AT_ANNOTATION,
};
use crate::manifest::{Descriptor, Digest, REF_NAME_ANNOTATION};

pub use gc::{collect, Collection, CollectionReport};
pub use keeper::{store_metrics, CacheKeeper, StoreKeeper};
pub use retention::{Policy, Rule};

/// Manifests larger than this are not read while marking (an index or a manifest is a few KiB;
/// the registry import refuses larger ones too).
const MAX_MANIFEST_BYTES: u64 = 4 << 20;
/// Indexes nest at most this deep (an index of indexes of manifests is already unusual).
const MAX_NESTING: usize = 8;

/// One tagged image in the store.
#[derive(Debug, Clone, Serialize)]
pub struct StoredImage {
    /// The tag (`org.opencontainers.image.ref.name`): `repository:tag`.
    pub reference: String,
    /// The source it was stored for; `null` for images stored before factoryd recorded it.
    pub source_id: Option<String>,
    pub digest: String,
    /// Bytes of every blob the image reaches (shared blobs counted for each image).
    pub size_bytes: u64,
    /// When it was stored (the tag's annotation; for older images, the manifest file's time).
    #[serde(with = "time::serde::rfc3339")]
    pub stored_at: OffsetDateTime,
    /// Blobs it reaches that are missing from the store (a damaged store), if any.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub missing: Vec<String>,
    #[serde(skip)]
    pub(crate) blobs: Vec<(String, u64)>,
}

/// Every tagged image of the store at `root`, in `index.json` order. Blocking.
pub fn list(root: &Path) -> Result<Vec<StoredImage>, StoreError> {
    read_index(root)?
        .iter()
        .map(|d| describe(root, d))
        .collect()
}

/// Removes the images tagged `references` from `index.json` (their blobs go at the next
/// collection); returns the references that were not there. Blocking.
pub fn remove(root: &Path, references: &[String]) -> Result<Vec<String>, StoreError> {
    let mut found = HashSet::new();
    crate::adapters::oci_layout::update_index(root, |manifests| {
        manifests.retain(|d| {
            let name = d
                .annotations
                .as_ref()
                .and_then(|a| a.get(REF_NAME_ANNOTATION));
            match name {
                Some(name) if references.contains(name) => {
                    found.insert(name.clone());
                    false
                }
                _ => true,
            }
        })
    })?;
    Ok(references
        .iter()
        .filter(|r| !found.contains(*r))
        .cloned()
        .collect())
}

/// Whether a collection holds the store's collection lock now.
pub fn collection_running(root: &Path) -> bool {
    let path = root.join(".ingest").join("gc.lock");
    std::fs::File::open(&path).is_ok_and(|f| f.try_lock().is_err())
}

fn describe(root: &Path, tagged: &Descriptor) -> Result<StoredImage, StoreError> {
    let annotation = |key: &str| {
        tagged
            .annotations
            .as_ref()
            .and_then(|a| a.get(key))
            .cloned()
    };
    let mut blobs = Vec::new();
    let mut missing = Vec::new();
    reach(
        root,
        tagged,
        &mut HashSet::new(),
        &mut blobs,
        &mut missing,
        0,
    );
    let stored_at = annotation(STORED_AT_ANNOTATION)
        .and_then(|t| {
            OffsetDateTime::parse(&t, &time::format_description::well_known::Rfc3339).ok()
        })
        .or_else(|| {
            let digest = Digest::parse(&tagged.digest).ok()?;
            let modified = std::fs::metadata(blob_path(root, &digest))
                .and_then(|m| m.modified())
                .ok()?;
            Some(OffsetDateTime::from(modified))
        })
        .unwrap_or(OffsetDateTime::UNIX_EPOCH);
    Ok(StoredImage {
        reference: annotation(REF_NAME_ANNOTATION).unwrap_or_default(),
        source_id: annotation(SOURCE_ID_ANNOTATION),
        digest: tagged.digest.clone(),
        size_bytes: blobs.iter().map(|(_, size)| size).sum(),
        stored_at,
        missing,
        blobs,
    })
}

fn blob_path(root: &Path, digest: &Digest) -> std::path::PathBuf {
    root.join("blobs")
        .join(digest.algorithm().as_str())
        .join(digest.hex())
}

/// Adds `descriptor` and everything it reaches to `blobs` (each once, through `seen`); a blob
/// that is not stored goes to `missing`. Manifests and indexes are read (bounded in size and
/// nesting); anything else is a leaf.
fn reach(
    root: &Path,
    descriptor: &Descriptor,
    seen: &mut HashSet<String>,
    blobs: &mut Vec<(String, u64)>,
    missing: &mut Vec<String>,
    depth: usize,
) {
    if !seen.insert(descriptor.digest.clone()) {
        return;
    }
    let Ok(digest) = Digest::parse(&descriptor.digest) else {
        missing.push(descriptor.digest.clone());
        return;
    };
    let path = blob_path(root, &digest);
    let Ok(meta) = std::fs::metadata(&path) else {
        missing.push(descriptor.digest.clone());
        return;
    };
    blobs.push((descriptor.digest.clone(), meta.len()));
    let is_manifest = descriptor.media_type.contains("manifest")
        || descriptor.media_type.contains("index")
        || descriptor.media_type.is_empty();
    if !is_manifest || depth >= MAX_NESTING || meta.len() > MAX_MANIFEST_BYTES {
        return;
    }
    let Ok(bytes) = std::fs::read(&path) else {
        return;
    };
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
        return;
    };
    let children = value
        .get("manifests")
        .and_then(|m| m.as_array())
        .into_iter()
        .flatten()
        .chain(value.get("config"))
        .chain(
            value
                .get("layers")
                .and_then(|l| l.as_array())
                .into_iter()
                .flatten(),
        );
    for child in children {
        if let Ok(child) = serde_json::from_value::<Descriptor>(child.clone()) {
            reach(root, &child, seen, blobs, missing, depth + 1);
        }
    }
}

#[cfg(test)]
mod tests;
