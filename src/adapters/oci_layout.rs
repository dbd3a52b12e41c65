//! The local image store: an OCI image layout directory shared by every job of this worker
//! (and by other OCI tools: `skopeo inspect oci:DIR:TAG` reads it).
//!
//! ```text
//! DIR/oci-layout          {"imageLayoutVersion":"1.0.0"}
//! DIR/index.json          tagged manifests (annotation org.opencontainers.image.ref.name)
//! DIR/blobs/sha256/<hex>  content-addressed blobs: layers, configs, manifests
//! DIR/.ingest/            blobs being written (same file system, so the final rename is atomic),
//!                         the index and collection locks, and `leases/` of running writers
//! ```
//!
//! What it guarantees: a blob appears under its digest only after its bytes were hashed and
//! counted and matched the expected digest and size (written to a temporary name, renamed after
//! verification); `index.json` is replaced whole (temporary file, fsync, rename) under a lock that
//! serialises tag updates from concurrent jobs in this process and, through `flock`, in other
//! processes; manifests stored here have OCI media types only.
//!
//! What it must not do: hold a blob whole in memory (writes stream through a bounded channel to a
//! blocking writer thread, which hashes as it writes), or leave a half-written blob under a
//! digest name. It does no network I/O and knows nothing of registries or jobs.
//!
//! Durability: a blob's data is fsynced before it is renamed under its digest, so after a power
//! loss a blob under its name is whole and `has_blob` can trust its size; the blob directories
//! are fsynced before a tag is written, and `index.json` is fsynced with its directory, so a tag
//! that survives a power loss finds its blobs.
//!
//! Collection (`crate::store`) runs beside writers: each job that writes holds a
//! [`StoreLease`] from before its first blob check until after its tag, and a blob a job finds
//! already stored ([`OciLayoutStore::has_blob`]) has its modification time refreshed, under a
//! shared lock the collector takes exclusively. So a collection sweeps only blobs that nothing
//! reaches and that no running writer has touched (older than the oldest lease).

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::{mpsc, Mutex};
use tokio::task::JoinHandle;

use crate::error::{classify_io, ErrorCode, JobError, Stage};
use crate::manifest::{Descriptor, Digest, Hasher, OCI_INDEX, OCI_MANIFEST, REF_NAME_ANNOTATION};

/// Chunks smaller than this are gathered before they go to the writer thread, so that one
/// channel message carries enough bytes to be worth a wake-up.
const WRITE_CHUNK: usize = 256 * 1024;
/// Chunks in flight to the writer thread per blob: bounds the memory of one blob write to about
/// `WRITER_QUEUE * WRITE_CHUNK`.
const WRITER_QUEUE: usize = 8;
/// A large blob is synced every this many bytes as it is written, so the disk writes run while
/// the rest arrives rather than all at the end.
const SYNC_EVERY: u64 = 8 * 1024 * 1024;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("content of {expected} does not match its digest (got {actual}); nothing was stored")]
    DigestMismatch { expected: Digest, actual: Digest },
    #[error(
        "content of {digest} is {actual} bytes, but {expected} were expected; nothing was stored"
    )]
    SizeMismatch {
        digest: Digest,
        expected: u64,
        actual: u64,
    },
    #[error("the OCI layout holds OCI manifests only, not {0:?}")]
    NotOci(String),
    #[error(
        "invalid image name {0:?}: expected alphanumeric components joined by -._:@+ or --, \
         separated by /"
    )]
    InvalidTag(String),
    #[error("malformed index.json in {}: {message}", path.display())]
    BadIndex { path: PathBuf, message: String },
}

impl StoreError {
    /// Classifies at the store's boundary: bad content is permanent; local I/O (disk full,
    /// permissions) is transient, as ARCHITECTURE §5 says.
    pub fn into_job_error(self, stage: Stage) -> JobError {
        let message = self.to_string();
        match &self {
            StoreError::Io { source, .. } => {
                // Whatever the kind (a missing store file is our problem, not a missing image),
                // a local failure is transient: disk space and permissions can be fixed.
                let (code, _) = classify_io(source);
                let code = match code {
                    ErrorCode::Timeout | ErrorCode::Unavailable => code,
                    _ => ErrorCode::LocalIo,
                };
                JobError::new(stage, code, message)
            }
            StoreError::DigestMismatch { .. } | StoreError::SizeMismatch { .. } => {
                JobError::new(stage, ErrorCode::DigestMismatch, message)
            }
            StoreError::NotOci(_) => JobError::new(stage, ErrorCode::Unsupported, message),
            StoreError::InvalidTag(_) => JobError::new(stage, ErrorCode::InvalidJob, message),
            StoreError::BadIndex { .. } => JobError::new(stage, ErrorCode::LocalIo, message),
        }
    }
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// One OCI image layout directory. Cheap to share (`Arc`); every method takes `&self`.
#[derive(Debug)]
pub struct OciLayoutStore {
    root: PathBuf,
    /// Serialises `index.json` updates within this process; `flock` covers other processes.
    index_lock: Mutex<()>,
}

/// Temporary file names: process id plus a counter, unique within the directory.
static INGEST_COUNTER: AtomicU64 = AtomicU64::new(0);

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct IndexFile {
    schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    media_type: Option<String>,
    #[serde(default)]
    manifests: Vec<Descriptor>,
    #[serde(flatten)]
    other: serde_json::Map<String, serde_json::Value>,
}

impl OciLayoutStore {
    /// Opens the layout at `root`, creating the directory and its `oci-layout`, `index.json` and
    /// `blobs/` when missing. An existing layout is used as it is.
    pub async fn open(root: impl Into<PathBuf>) -> Result<OciLayoutStore, StoreError> {
        let root = root.into();
        let store = OciLayoutStore {
            root,
            index_lock: Mutex::new(()),
        };
        let root = store.root.clone();
        tokio::task::spawn_blocking(move || init_layout(&root))
            .await
            .map_err(|e| StoreError::Io {
                op: "initialise",
                path: store.root.clone(),
                source: std::io::Error::other(e),
            })??;
        Ok(store)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the blob with `digest` lives (whether or not it exists).
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.root
            .join("blobs")
            .join(digest.algorithm().as_str())
            .join(digest.hex())
    }

    /// Whether the blob is stored with `size` bytes. A blob of another size (which verification
    /// makes impossible, unless the file was changed behind the store's back) counts as absent,
    /// so that it is written again. A blob found is touched (its modification time set to now)
    /// under the collection lock, shared: a collection running now has either swept it already
    /// (absent, so the job writes it) or sees it as in use.
    pub async fn has_blob(&self, digest: &Digest, size: u64) -> bool {
        let (root, path) = (self.root.clone(), self.blob_path(digest));
        tokio::task::spawn_blocking(move || {
            let Ok(_shared) = gc_lock(&root, false) else {
                return false;
            };
            match std::fs::metadata(&path) {
                Ok(meta) if meta.is_file() && meta.len() == size => std::fs::File::options()
                    .write(true)
                    .open(&path)
                    .and_then(|f| f.set_modified(std::time::SystemTime::UNIX_EPOCH + now()))
                    .is_ok(),
                _ => false,
            }
        })
        .await
        .unwrap_or(false)
    }

    /// Registers a writer (one job) until the lease is dropped: a collection keeps every blob
    /// touched since the oldest live lease began. Take it before the first [`has_blob`]
    /// and keep it until the image is tagged.
    ///
    /// [`has_blob`]: OciLayoutStore::has_blob
    pub fn lease(&self) -> Result<StoreLease, StoreError> {
        let dir = self.root.join(".ingest").join("leases");
        std::fs::create_dir_all(&dir).map_err(io_err("create directory", &dir))?;
        let n = INGEST_COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = dir.join(format!("{}-{n}", std::process::id()));
        let since_ms = now().as_millis() as u64;
        std::fs::write(&path, since_ms.to_string()).map_err(io_err("write", &path))?;
        Ok(StoreLease { path })
    }

    /// Starts writing the blob `digest` of `size` bytes. Feed it with [`BlobWriter::write`] and
    /// finish with [`BlobWriter::commit`]; dropping it uncommitted removes what was written.
    pub async fn blob_writer(&self, digest: &Digest, size: u64) -> Result<BlobWriter, StoreError> {
        let n = INGEST_COUNTER.fetch_add(1, Ordering::Relaxed);
        let tmp =
            self.root
                .join(".ingest")
                .join(format!("{}-{}-{n}", digest.hex(), std::process::id()));
        // Created here, synchronously (creating an empty file is quick), not in the writer
        // thread or a blocking task: a future dropped mid-await would leave a file that no
        // Drop removes.
        let file = std::fs::File::create(&tmp).map_err(io_err("create", &tmp))?;
        let (tx, mut rx) = mpsc::channel::<Bytes>(WRITER_QUEUE);
        let algorithm = digest.algorithm();
        let tmp_for_thread = tmp.clone();
        let task = tokio::task::spawn_blocking(move || {
            let mut file = file;
            let mut hasher = Hasher::new(algorithm);
            let mut written = 0u64;
            while let Some(chunk) = rx.blocking_recv() {
                hasher.update(&chunk);
                file.write_all(&chunk)
                    .map_err(io_err("write", &tmp_for_thread))?;
                written += chunk.len() as u64;
                if written / SYNC_EVERY != (written - chunk.len() as u64) / SYNC_EVERY {
                    file.sync_data().map_err(io_err("sync", &tmp_for_thread))?;
                }
            }
            // On disk before it can be renamed under its digest: after a power loss, a blob
            // under its name is whole (`has_blob` trusts the size). An abandoned or oversized
            // write is removed, not synced.
            if written == size {
                file.sync_data().map_err(io_err("sync", &tmp_for_thread))?;
            }
            Ok((hasher.finish(), written))
        });
        Ok(BlobWriter {
            tx: Some(tx),
            task: Some(task),
            pending: BytesMut::new(),
            received: 0,
            tmp,
            path: self.blob_path(digest),
            digest: digest.clone(),
            size,
            committed: false,
        })
    }

    /// Stores the blob read from `reader`, verified against `digest` and `size`. Returns the
    /// bytes read. For callers that have an `AsyncRead` (an exported build, a file).
    pub async fn put_blob<R: AsyncRead + Unpin>(
        &self,
        mut reader: R,
        digest: &Digest,
        size: u64,
    ) -> Result<u64, StoreError> {
        let mut writer = self.blob_writer(digest, size).await?;
        loop {
            let mut buf = BytesMut::with_capacity(WRITE_CHUNK);
            let n = reader
                .read_buf(&mut buf)
                .await
                .map_err(io_err("read", &self.root))?;
            if n == 0 {
                break;
            }
            writer.write(buf.freeze()).await?;
        }
        writer.commit().await
    }

    /// Stores manifest bytes as a blob and returns their descriptor. Only OCI media types are
    /// accepted: convert Docker manifests first (see [`crate::manifest::to_oci_image`]).
    pub async fn put_manifest(
        &self,
        media_type: &str,
        bytes: &[u8],
    ) -> Result<Descriptor, StoreError> {
        if media_type != OCI_MANIFEST && media_type != OCI_INDEX {
            return Err(StoreError::NotOci(media_type.to_owned()));
        }
        let digest = Digest::sha256_of(bytes);
        let size = bytes.len() as u64;
        if !self.has_blob(&digest, size).await {
            let mut writer = self.blob_writer(&digest, size).await?;
            writer.write(Bytes::copy_from_slice(bytes)).await?;
            writer.commit().await?;
        }
        Ok(Descriptor::new(media_type, &digest, size))
    }

    /// Reads a whole blob (manifests, configs: small things) when it is stored.
    pub async fn read_blob(&self, digest: &Digest) -> Result<Option<Vec<u8>>, StoreError> {
        let path = self.blob_path(digest);
        match tokio::fs::read(&path).await {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err("read", &path)(e)),
        }
    }

    /// Points `tag` at `descriptor` in `index.json`, replacing what it pointed at, and records
    /// which source it is of and when it was stored (for retention). The manifest must already
    /// be stored.
    pub async fn tag(
        &self,
        descriptor: &Descriptor,
        tag: &str,
        source_id: &str,
    ) -> Result<(), StoreError> {
        if !is_tag(tag) {
            return Err(StoreError::InvalidTag(tag.chars().take(140).collect()));
        }
        let mut entry = descriptor.clone();
        entry.platform = None;
        let stored_at = crate::clock::Clock::now(&crate::clock::SystemClock)
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        let annotations = entry.annotations.get_or_insert_with(Default::default);
        annotations.insert(REF_NAME_ANNOTATION.to_owned(), tag.to_owned());
        annotations.insert(SOURCE_ID_ANNOTATION.to_owned(), source_id.to_owned());
        annotations.insert(STORED_AT_ANNOTATION.to_owned(), stored_at);
        let tag = tag.to_owned();
        let root = self.root.clone();
        let _guard = self.index_lock.lock().await;
        tokio::task::spawn_blocking(move || {
            // The renames of the blobs the tag reaches are made durable before the tag is: a
            // tag must not survive a power loss that its blobs' names did not.
            sync_blob_dirs(&root)?;
            update_index(&root, |manifests| {
                manifests.retain(|d| {
                    d.annotations
                        .as_ref()
                        .and_then(|a| a.get(REF_NAME_ANNOTATION))
                        != Some(&tag)
                });
                manifests.push(entry);
            })
        })
        .await
        .map_err(|e| StoreError::Io {
            op: "update index of",
            path: self.root.clone(),
            source: std::io::Error::other(e),
        })?
    }

    /// The descriptor `tag` points at, if any.
    pub async fn resolve(&self, tag: &str) -> Result<Option<Descriptor>, StoreError> {
        let path = self.root.join("index.json");
        let bytes = tokio::fs::read(&path)
            .await
            .map_err(io_err("read", &path))?;
        let index: IndexFile =
            serde_json::from_slice(&bytes).map_err(|e| StoreError::BadIndex {
                path: path.clone(),
                message: e.to_string(),
            })?;
        Ok(index.manifests.into_iter().find(|d| {
            d.annotations
                .as_ref()
                .and_then(|a| a.get(REF_NAME_ANNOTATION))
                .map(String::as_str)
                == Some(tag)
        }))
    }
}

/// A blob being written. Bytes go to a blocking thread that hashes and writes them; `commit`
/// checks digest and size and only then renames the file into place.
pub struct BlobWriter {
    tx: Option<mpsc::Sender<Bytes>>,
    task: Option<JoinHandle<Result<(Digest, u64), StoreError>>>,
    pending: BytesMut,
    received: u64,
    tmp: PathBuf,
    path: PathBuf,
    digest: Digest,
    size: u64,
    committed: bool,
}

impl BlobWriter {
    /// Bytes received so far.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// Appends `chunk`. Fails as soon as more bytes arrive than the expected size.
    pub async fn write(&mut self, chunk: Bytes) -> Result<(), StoreError> {
        self.received += chunk.len() as u64;
        if self.received > self.size {
            return Err(StoreError::SizeMismatch {
                digest: self.digest.clone(),
                expected: self.size,
                actual: self.received,
            });
        }
        if self.pending.is_empty() && chunk.len() >= WRITE_CHUNK {
            return self.send(chunk).await;
        }
        self.pending.extend_from_slice(&chunk);
        if self.pending.len() >= WRITE_CHUNK {
            let full = self.pending.split().freeze();
            self.send(full).await?;
        }
        Ok(())
    }

    async fn send(&mut self, chunk: Bytes) -> Result<(), StoreError> {
        let Some(tx) = &self.tx else {
            return Err(self.writer_gone());
        };
        if tx.send(chunk).await.is_err() {
            // The thread stopped: its own error says why.
            return Err(self
                .join()
                .await
                .err()
                .unwrap_or_else(|| self.writer_gone()));
        }
        Ok(())
    }

    fn writer_gone(&self) -> StoreError {
        StoreError::Io {
            op: "write",
            path: self.tmp.clone(),
            source: std::io::Error::other("the blob writer stopped"),
        }
    }

    async fn join(&mut self) -> Result<(Digest, u64), StoreError> {
        self.tx = None;
        let Some(task) = self.task.take() else {
            return Err(self.writer_gone());
        };
        task.await.map_err(|e| StoreError::Io {
            op: "write",
            path: self.tmp.clone(),
            source: std::io::Error::other(e),
        })?
    }

    /// Verifies what was written and moves it under its digest. Returns the size.
    pub async fn commit(mut self) -> Result<u64, StoreError> {
        if !self.pending.is_empty() {
            let rest = self.pending.split().freeze();
            self.send(rest).await?;
        }
        let (actual, written) = self.join().await?;
        if written != self.size {
            return Err(StoreError::SizeMismatch {
                digest: self.digest.clone(),
                expected: self.size,
                actual: written,
            });
        }
        if actual != self.digest {
            return Err(StoreError::DigestMismatch {
                expected: self.digest.clone(),
                actual,
            });
        }
        tokio::fs::rename(&self.tmp, &self.path)
            .await
            .map_err(io_err("rename into place", &self.path))?;
        self.committed = true;
        Ok(written)
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        if !self.committed {
            // The writer thread may still hold the file open; unlinking it is still correct.
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

fn init_layout(root: &Path) -> Result<(), StoreError> {
    for dir in [
        root.to_path_buf(),
        root.join("blobs").join("sha256"),
        root.join(".ingest"),
    ] {
        std::fs::create_dir_all(&dir).map_err(io_err("create directory", &dir))?;
    }
    let marker = root.join("oci-layout");
    if !marker.exists() {
        write_atomically(&marker, br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    }
    let index = root.join("index.json");
    if !index.exists() {
        let _lock = lock_file(root)?;
        if !index.exists() {
            write_atomically(
                &index,
                format!(r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[]}}"#)
                    .as_bytes(),
            )?;
        }
    }
    Ok(())
}

/// A running writer's registration with the store ([`OciLayoutStore::lease`]); removed when
/// dropped. One left by a process that died is recognised by its process id and ignored.
#[derive(Debug)]
pub struct StoreLease {
    path: PathBuf,
}

impl Drop for StoreLease {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Which source an image in the store is of (`index.json` annotation).
pub const SOURCE_ID_ANNOTATION: &str = "io.factoryd.source-id";
/// When an image was stored (RFC 3339; `index.json` annotation).
pub const STORED_AT_ANNOTATION: &str = "io.factoryd.stored-at";

/// The wall clock, as a duration since the Unix epoch.
fn now() -> std::time::Duration {
    std::time::Duration::from_millis(crate::clock::Clock::now_ms(&crate::clock::SystemClock))
}

/// The collection lock: shared by writers for a moment (checking and touching a blob),
/// exclusive for a collection. Released when the file is dropped.
pub(crate) fn gc_lock(root: &Path, exclusive: bool) -> Result<std::fs::File, StoreError> {
    lock(root, "gc.lock", exclusive)
}

/// Opens `.ingest/<name>` and locks it (`flock`), shared or exclusive.
fn lock(root: &Path, name: &str, exclusive: bool) -> Result<std::fs::File, StoreError> {
    let path = root.join(".ingest").join(name);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io_err("open", &path))?;
    if exclusive {
        file.lock().map_err(io_err("lock", &path))?;
    } else {
        file.lock_shared().map_err(io_err("lock", &path))?;
    }
    Ok(file)
}

/// The tagged manifests of the store at `root`, as `index.json` lists them now.
pub(crate) fn read_index(root: &Path) -> Result<Vec<Descriptor>, StoreError> {
    let path = root.join("index.json");
    let bytes = std::fs::read(&path).map_err(io_err("read", &path))?;
    let index: IndexFile = serde_json::from_slice(&bytes).map_err(|e| StoreError::BadIndex {
        path: path.clone(),
        message: e.to_string(),
    })?;
    Ok(index.manifests)
}

/// Cross-process exclusion for `index.json` updates, released when the file is dropped.
fn lock_file(root: &Path) -> Result<std::fs::File, StoreError> {
    lock(root, "index.lock", true)
}

pub(crate) fn update_index(
    root: &Path,
    change: impl FnOnce(&mut Vec<Descriptor>),
) -> Result<(), StoreError> {
    let _lock = lock_file(root)?;
    let path = root.join("index.json");
    let bytes = std::fs::read(&path).map_err(io_err("read", &path))?;
    let mut index: IndexFile =
        serde_json::from_slice(&bytes).map_err(|e| StoreError::BadIndex {
            path: path.clone(),
            message: e.to_string(),
        })?;
    change(&mut index.manifests);
    let bytes = serde_json::to_vec(&index).map_err(|e| StoreError::BadIndex {
        path: path.clone(),
        message: e.to_string(),
    })?;
    write_atomically(&path, &bytes)
}

/// Temporary file, fsync, rename: readers see the old or the new file, never a torn one.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let n = INGEST_COUNTER.fetch_add(1, Ordering::Relaxed);
    let tmp = path.with_extension(format!("tmp-{}-{n}", std::process::id()));
    let result = (|| {
        let mut file = std::fs::File::create(&tmp).map_err(io_err("create", &tmp))?;
        file.write_all(bytes).map_err(io_err("write", &tmp))?;
        file.sync_all().map_err(io_err("sync", &tmp))?;
        std::fs::rename(&tmp, path).map_err(io_err("rename", path))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result?;
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

/// fsyncs `blobs/<algorithm>/` of the store: one call per directory makes every rename into it
/// durable, however many blobs an import stored.
fn sync_blob_dirs(root: &Path) -> Result<(), StoreError> {
    let blobs = root.join("blobs");
    let entries = std::fs::read_dir(&blobs).map_err(io_err("list", &blobs))?;
    for entry in entries {
        let entry = entry.map_err(io_err("list", &blobs))?;
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            sync_dir(&entry.path())?;
        }
    }
    Ok(())
}

/// Makes renames into `dir` durable (its entries, not only the files' data).
fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("sync", dir))
}

/// The image-layout `org.opencontainers.image.ref.name` grammar: components of alphanumerics
/// joined by one of `-._:@+` (or `--`), separated by `/`. The worker names images
/// `<repository>:<tag>`, so `:` and `/` must pass.
fn is_tag(tag: &str) -> bool {
    (1..=255).contains(&tag.len())
        && tag.split('/').all(|component| {
            let bytes = component.as_bytes();
            let mut i = 0;
            let mut expect_alnum = true;
            while i < bytes.len() {
                let b = bytes[i];
                if b.is_ascii_alphanumeric() {
                    expect_alnum = false;
                    i += 1;
                } else if expect_alnum {
                    return false;
                } else if b == b'-' && bytes.get(i + 1) == Some(&b'-') {
                    expect_alnum = true;
                    i += 2;
                } else if matches!(b, b'-' | b'.' | b'_' | b':' | b'@' | b'+') {
                    expect_alnum = true;
                    i += 1;
                } else {
                    return false;
                }
            }
            !bytes.is_empty() && !expect_alnum
        })
}

#[cfg(test)]
mod ref_name_tests {
    use super::is_tag;

    #[test]
    fn ref_names_follow_the_image_layout_grammar() {
        for ok in [
            "latest",
            "src-web:imp-1",
            "mirror/app:1.2",
            "a--b",
            "v1+build@x",
        ] {
            assert!(is_tag(ok), "{ok}");
        }
        for bad in ["", ":x", "x:", "a//b", "-a", "a b", "a:::b", "é"] {
            assert!(!is_tag(bad), "{bad}");
        }
    }
}

/// Opened stores by directory, so that every job writing to one directory shares one lock.
#[derive(Debug, Default)]
pub struct OciLayoutStores {
    open: Mutex<HashMap<PathBuf, Arc<OciLayoutStore>>>,
}

impl OciLayoutStores {
    pub async fn get(&self, root: &Path) -> Result<Arc<OciLayoutStore>, StoreError> {
        let mut open = self.open.lock().await;
        if let Some(store) = open.get(root) {
            return Ok(store.clone());
        }
        let store = Arc::new(OciLayoutStore::open(root).await?);
        open.insert(root.to_path_buf(), store.clone());
        Ok(store)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn store() -> (tempfile::TempDir, OciLayoutStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = OciLayoutStore::open(dir.path().join("store"))
            .await
            .unwrap();
        (dir, store)
    }

    fn ingest_is_empty(store: &OciLayoutStore) -> bool {
        std::fs::read_dir(store.root().join(".ingest"))
            .unwrap()
            .filter_map(Result::ok)
            .all(|e| {
                ["index.lock", "gc.lock", "leases"].contains(&&*e.file_name().to_string_lossy())
            })
    }

    #[tokio::test]
    async fn open_creates_a_layout_and_reopens_it_unchanged() {
        let (_dir, store) = store().await;
        let marker = std::fs::read_to_string(store.root().join("oci-layout")).unwrap();
        assert!(marker.contains("1.0.0"));
        let index = std::fs::read_to_string(store.root().join("index.json")).unwrap();
        assert!(index.contains("\"manifests\":[]"), "{index}");
        let again = OciLayoutStore::open(store.root()).await.unwrap();
        assert!(again.resolve("x").await.unwrap().is_none());
    }

    #[tokio::test]
    async fn verified_blob_is_committed_under_its_digest() {
        let (_dir, store) = store().await;
        let data = vec![7u8; 1_000_000];
        let digest = Digest::sha256_of(&data);
        assert!(!store.has_blob(&digest, data.len() as u64).await);
        let n = store
            .put_blob(&data[..], &digest, data.len() as u64)
            .await
            .unwrap();
        assert_eq!(n, data.len() as u64);
        assert!(store.has_blob(&digest, data.len() as u64).await);
        assert_eq!(std::fs::read(store.blob_path(&digest)).unwrap(), data);
        assert!(ingest_is_empty(&store));
    }

    #[tokio::test]
    async fn blob_with_wrong_content_is_refused_and_nothing_stays() {
        let (_dir, store) = store().await;
        let digest = Digest::sha256_of(b"expected");
        let err = store
            .put_blob(&b"tampered"[..], &digest, 8)
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::DigestMismatch { .. }), "{err}");
        assert!(!store.blob_path(&digest).exists());
        assert!(ingest_is_empty(&store));
        let job = err.into_job_error(Stage::Import);
        assert_eq!(job.code, ErrorCode::DigestMismatch);
        assert_eq!(job.class, crate::error::ErrorClass::Permanent);
    }

    #[tokio::test]
    async fn blob_longer_than_declared_is_refused_early() {
        let (_dir, store) = store().await;
        let digest = Digest::sha256_of(b"abc");
        let mut w = store.blob_writer(&digest, 3).await.unwrap();
        let err = w.write(Bytes::from_static(b"abcd")).await.unwrap_err();
        assert!(
            matches!(err, StoreError::SizeMismatch { actual: 4, .. }),
            "{err}"
        );
        drop(w);
        assert!(ingest_is_empty(&store));
    }

    #[tokio::test]
    async fn short_blob_is_refused() {
        let (_dir, store) = store().await;
        let digest = Digest::sha256_of(b"abc");
        let err = store.put_blob(&b"ab"[..], &digest, 3).await.unwrap_err();
        assert!(
            matches!(err, StoreError::SizeMismatch { actual: 2, .. }),
            "{err}"
        );
    }

    #[tokio::test]
    async fn docker_manifests_are_refused() {
        let (_dir, store) = store().await;
        let err = store
            .put_manifest(crate::manifest::DOCKER_MANIFEST, b"{}")
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::NotOci(_)), "{err}");
    }

    #[test]
    fn rendered_repository_and_tag_names_are_valid_tags() {
        // Regression: the destination renders `repository:tag` (default `{source_id}:{job_id}`),
        // which the store refused, so nothing reached an OCI layout through the pipeline.
        for ok in [
            "src-web:job-7f3c",
            "built/src-a:job_1",
            "v1.2",
            "a--b",
            "x@y+z",
        ] {
            assert!(is_tag(ok), "{ok}");
        }
        for bad in ["", ":x", "a:", "a//b", "a..b", "-a", "a b", "a/../b"] {
            assert!(!is_tag(bad), "{bad}");
        }
    }

    #[tokio::test]
    async fn tagging_replaces_the_previous_target_and_keeps_other_tags() {
        let (_dir, store) = store().await;
        let a = store
            .put_manifest(OCI_MANIFEST, b"{\"a\":1}")
            .await
            .unwrap();
        let b = store
            .put_manifest(OCI_MANIFEST, b"{\"b\":1}")
            .await
            .unwrap();
        store.tag(&a, "one", "src").await.unwrap();
        store.tag(&a, "two", "src").await.unwrap();
        store.tag(&b, "one", "src").await.unwrap();
        assert_eq!(
            store.resolve("one").await.unwrap().unwrap().digest,
            b.digest
        );
        assert_eq!(
            store.resolve("two").await.unwrap().unwrap().digest,
            a.digest
        );
        let index: serde_json::Value =
            serde_json::from_slice(&std::fs::read(store.root().join("index.json")).unwrap())
                .unwrap();
        assert_eq!(index["manifests"].as_array().unwrap().len(), 2);
        assert!(store.tag(&a, "../x", "src").await.is_err());
    }

    #[tokio::test]
    async fn concurrent_tags_are_all_kept() {
        let (_dir, store) = store().await;
        let store = Arc::new(store);
        let d = store.put_manifest(OCI_MANIFEST, b"{}").await.unwrap();
        let mut tasks = Vec::new();
        for i in 0..16 {
            let (store, d) = (store.clone(), d.clone());
            tasks.push(tokio::spawn(async move {
                store.tag(&d, &format!("t{i}"), "src").await.unwrap()
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        for i in 0..16 {
            assert!(
                store.resolve(&format!("t{i}")).await.unwrap().is_some(),
                "t{i}"
            );
        }
    }
}
