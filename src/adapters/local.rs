//! A local directory as a build source (`factoryd run` on a developer's tree), sealed by the
//! same rules as fetched sources: `context_dir` and `build_file` resolved without following a
//! symlink out of the directory, the walk never following symlinks (they are sent as
//! symlinks, whatever their target), `.dockerignore` applied (only a regular file: a
//! `.dockerignore` that is a symlink is not read), devices, FIFOs and sockets refused unless
//! ignored.
//!
//! Must not: change or create anything in the directory.

use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use crate::context::resolve::{self, Node, SourceLookup, Want};
use tokio_util::sync::CancellationToken;

use crate::context::{self, DockerIgnore, Entry, Limits, Meta, Sealer, DOCKERIGNORE};
use crate::error::{classify_io, JobError, Stage};
use crate::job::DockerFile;
use crate::ports::{ContextWriter, FetchedSource, Fetcher, SealedContext, StageContext};

/// Seals `context_dir` / `build_file` of the directory `root`. Blocking; the walks stop when
/// `cancel` fires.
pub fn seal(
    root: &Path,
    context_dir: &str,
    build_file: &str,
    limits: Limits,
    cancel: CancellationToken,
) -> Result<SealedContext, JobError> {
    let root = root.canonicalize().map_err(|e| io_error(root, e))?;
    let lookup = DirLookup { root: &root };
    let context = resolve::resolve(&lookup, context_dir, Want::ContextDir)?;
    let dockerfile = resolve::resolve(&lookup, build_file, Want::BuildFile)?;
    let context_path = join(&root, &context.path);
    let ignore_path = context_path.join(DOCKERIGNORE);
    let ignore_file = match fs::symlink_metadata(&ignore_path) {
        Ok(meta) if meta.is_file() => {
            Some(File::open(&ignore_path).map_err(|e| io_error(&ignore_path, e))?)
        }
        _ => None,
    };
    let mut ignore = context::load_dockerignore(ignore_file)?;
    let placed = context::name_build_file(&context.path, &dockerfile.path, &mut ignore);
    let extra = placed
        .outside
        .then(|| (placed.name.clone(), join(&root, &dockerfile.path)));
    let name = placed.name;
    let writer = DirContext {
        context: context_path,
        extra,
        ignore,
        limits,
        cancel,
    };
    writer.walk(None)?;
    Ok(SealedContext::new(name, Box::new(writer)))
}

/// The [`Fetcher`] of `factoryd run --context DIR`: every docker-file job is built from `DIR`
/// (its `repo` or `targz_url` is not fetched), sealed by [`seal`] with the job's `context_dir`
/// and `build_file`.
#[derive(Debug, Clone)]
pub struct LocalFetcher {
    root: PathBuf,
    limits: Limits,
}

impl LocalFetcher {
    pub fn new(root: impl Into<PathBuf>, limits: Limits) -> LocalFetcher {
        LocalFetcher {
            root: root.into(),
            limits,
        }
    }
}

#[async_trait::async_trait]
impl Fetcher for LocalFetcher {
    async fn fetch(
        &self,
        origin: &DockerFile,
        cx: &StageContext,
    ) -> Result<FetchedSource, JobError> {
        let root = self.root.clone();
        let (context_dir, build_file) = (origin.context_dir.clone(), origin.build_file.clone());
        let limits = self.limits;
        let cancel = cx.cancel.clone();
        let context = tokio::task::spawn_blocking(move || {
            seal(&root, &context_dir, &build_file, limits, cancel)
        })
        .await
        .map_err(|e| {
            JobError::transient(
                Stage::Seal,
                crate::error::ErrorCode::Internal,
                format!("sealing the local context failed: {e}"),
            )
        })??;
        Ok(FetchedSource {
            context,
            revision: None,
            fetched_bytes: 0,
        })
    }
}

struct DirContext {
    context: PathBuf,
    extra: Option<(String, PathBuf)>,
    ignore: DockerIgnore,
    limits: Limits,
    cancel: CancellationToken,
}

impl DirContext {
    fn walk(&self, out: Option<&mut dyn Write>) -> Result<u64, JobError> {
        let writing = out.is_some();
        let mut sealer = Sealer::new(&self.ignore, self.limits, false, &self.cancel, out);
        walk_dir(&self.context, &mut sealer, writing)?;
        if let Some((name, path)) = &self.extra {
            let meta = fs::symlink_metadata(path).map_err(|e| io_error(path, e))?;
            let mut file = File::open(path).map_err(|e| io_error(path, e))?;
            sealer.add_build_file(name, meta_of(&meta), meta.len(), &mut file)?;
        }
        sealer.finish()
    }
}

impl ContextWriter for DirContext {
    fn write_tar(&self, out: &mut dyn Write) -> Result<u64, JobError> {
        self.walk(Some(out))
    }
}

/// Walks the directory `root`, keeping its own stack of directories instead of recursing, so no
/// tree, however deep, can exhaust the thread's stack; the sealer's depth cap ends a deep one.
fn walk_dir(root: &Path, sealer: &mut Sealer<'_>, writing: bool) -> Result<(), JobError> {
    let cap = sealer.limits().max_entries;
    let mut stack = vec![DirFrame::read(root.to_path_buf(), cap)?];
    let mut rel: Vec<String> = Vec::new();
    while let Some(frame) = stack.last_mut() {
        let Some(os_name) = frame.names.get(frame.next) else {
            stack.pop();
            rel.pop();
            continue;
        };
        frame.next += 1;
        let path = frame.dir.join(os_name);
        let Some(name) = os_name.to_str() else {
            return Err(context::unsafe_entry(
                &os_name.to_string_lossy(),
                "its name is not UTF-8",
            ));
        };
        rel.push(name.to_owned());
        let meta = fs::symlink_metadata(&path).map_err(|e| io_error(&path, e))?;
        let kind = meta.file_type();
        if kind.is_dir() {
            sealer.add(&rel, meta_of(&meta), Entry::Dir)?;
            if sealer.descend(&rel) {
                stack.push(DirFrame::read(path, cap)?);
                continue;
            }
        } else if kind.is_file() {
            if !sealer.skip_excluded(&rel)? {
                let mut content: Box<dyn io::Read> = if writing {
                    Box::new(File::open(&path).map_err(|e| io_error(&path, e))?)
                } else {
                    Box::new(io::empty())
                };
                sealer.add(
                    &rel,
                    meta_of(&meta),
                    Entry::File {
                        size: meta.len(),
                        content: &mut content,
                    },
                )?;
            }
        } else if kind.is_symlink() {
            if !sealer.skip_excluded(&rel)? {
                let target = fs::read_link(&path).map_err(|e| io_error(&path, e))?;
                let target = target.to_str().map(str::to_owned).ok_or_else(|| {
                    context::unsafe_entry(name, "its symlink target is not UTF-8")
                })?;
                sealer.add(&rel, meta_of(&meta), Entry::Symlink { target })?;
            }
        } else {
            let what = if kind.is_fifo() {
                "FIFO"
            } else if kind.is_socket() {
                "socket"
            } else if kind.is_block_device() {
                "block device"
            } else {
                "character device"
            };
            sealer.add(&rel, meta_of(&meta), Entry::Special(what))?;
        }
        rel.pop();
    }
    Ok(())
}

/// One directory of the walk: its entry names, sorted, and the next to visit. A directory holding
/// more names than the context may have entries is refused before its names are all read.
struct DirFrame {
    dir: PathBuf,
    names: Vec<std::ffi::OsString>,
    next: usize,
}

impl DirFrame {
    fn read(dir: PathBuf, cap: u64) -> Result<DirFrame, JobError> {
        let mut names: Vec<_> = fs::read_dir(&dir)
            .map_err(|e| io_error(&dir, e))?
            .take(usize::try_from(cap).unwrap_or(usize::MAX).saturating_add(1))
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()
            .map_err(|e| io_error(&dir, e))?;
        if names.len() as u64 > cap {
            return Err(context::limit(format!(
                "a directory of the context holds more than {cap} entries (sources.max_entries)"
            )));
        }
        names.sort();
        Ok(DirFrame {
            dir,
            names,
            next: 0,
        })
    }
}

struct DirLookup<'a> {
    root: &'a Path,
}

impl SourceLookup for DirLookup<'_> {
    fn lookup(&self, path: &[String]) -> Result<Option<Node>, JobError> {
        let full = join(self.root, path);
        let meta = match fs::symlink_metadata(&full) {
            Ok(meta) => meta,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_error(&full, e)),
        };
        let kind = meta.file_type();
        Ok(Some(if kind.is_dir() {
            Node::Dir
        } else if kind.is_file() {
            Node::File
        } else if kind.is_symlink() {
            let target = fs::read_link(&full).map_err(|e| io_error(&full, e))?;
            Node::Symlink(target.to_string_lossy().into_owned())
        } else {
            Node::Other("special file")
        }))
    }

    fn list(&self, dir: &[String]) -> Vec<String> {
        fs::read_dir(join(self.root, dir))
            .map(|entries| {
                entries
                    .flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }
}

fn join(root: &Path, parts: &[String]) -> PathBuf {
    let mut path = root.to_path_buf();
    path.extend(parts);
    path
}

fn meta_of(meta: &fs::Metadata) -> Meta {
    Meta {
        mode: meta.mode(),
        mtime: u64::try_from(meta.mtime()).unwrap_or(0),
    }
}

fn io_error(path: &Path, e: io::Error) -> JobError {
    let (code, class) = classify_io(&e);
    JobError::new(
        Stage::Seal,
        code,
        format!("reading {} failed: {e}", path.display()),
    )
    .with_class(class)
}
