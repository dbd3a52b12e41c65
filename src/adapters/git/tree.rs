//! Sealing a fetched git commit: `context_dir` and `build_file` resolved in its tree, and the
//! context stream read straight from the object database (like `git archive`), never from a
//! checkout.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use git2::{ObjectType, Oid, Repository, Tree};

use crate::context::resolve::{self, Node, SourceLookup, Want};
use crate::context::{
    self, DockerIgnore, Entry, Limits, Meta, Sealer, DOCKERIGNORE, MAX_DOCKERIGNORE_BYTES,
};
use crate::error::{ErrorCode, JobError, Stage};
use crate::ports::{ContextWriter, SealedContext};
use crate::workspace::random_hex;

const MODE_TREE: i32 = 0o040000;
const MODE_BLOB: i32 = 0o100644;
const MODE_BLOB_GROUP_WRITABLE: i32 = 0o100664;
const MODE_BLOB_EXECUTABLE: i32 = 0o100755;
const MODE_LINK: i32 = 0o120000;
const MODE_COMMIT: i32 = 0o160000;

/// Fetches one submodule: given its path from the superproject's root and the commit its
/// gitlink pins, returns the bare repository holding that commit.
pub type SubmoduleFetch<'a> = dyn FnMut(&str, Oid) -> Result<PathBuf, JobError> + 'a;

/// Resolves and checks the context of `commit` in the bare repository at `repo_path`, and
/// returns the sealed context that streams it. With `submodules`, each gitlink inside the
/// context is fetched through it (during the check walk) and streamed at its path.
pub fn seal(
    repo_path: &Path,
    commit: Oid,
    context_dir: &str,
    build_file: &str,
    limits: Limits,
    submodules: Option<&mut SubmoduleFetch<'_>>,
) -> Result<SealedContext, JobError> {
    let repo = open(repo_path)?;
    let commit_obj = repo.find_commit(commit).map_err(internal)?;
    let mtime = u64::try_from(commit_obj.time().seconds()).unwrap_or(0);
    let root = commit_obj.tree().map_err(internal)?;
    let lookup = TreeLookup {
        repo: &repo,
        root: &root,
    };
    let context = resolve::resolve(&lookup, context_dir, Want::ContextDir)?;
    let dockerfile = resolve::resolve(&lookup, build_file, Want::BuildFile)?;
    let context_tree = if context.path.is_empty() {
        root.clone()
    } else {
        let entry = root
            .get_path(Path::new(&context.path.join("/")))
            .map_err(internal)?;
        repo.find_tree(entry.id()).map_err(internal)?
    };

    let mut ignore = match context_tree.get_name(DOCKERIGNORE) {
        Some(entry) if entry.filemode() != MODE_TREE => {
            let blob = repo.find_blob(entry.id()).map_err(internal)?;
            if blob.size() as u64 > MAX_DOCKERIGNORE_BYTES {
                return Err(context::limit(format!(
                    "{DOCKERIGNORE} is larger than {MAX_DOCKERIGNORE_BYTES} bytes"
                )));
            }
            DockerIgnore::parse(&String::from_utf8_lossy(blob.content()))
        }
        _ => DockerIgnore::default(),
    };
    let (name, extra) = match dockerfile.path.strip_prefix(context.path.as_slice()) {
        Some(inside) => {
            let name = inside.join("/");
            ignore.keep(&name);
            (name, None)
        }
        None => {
            let entry = root
                .get_path(Path::new(&dockerfile.path.join("/")))
                .map_err(internal)?;
            let name = format!(".dockerfile.{}", random_hex(10));
            let extra = BuildFile {
                name: name.clone(),
                blob: entry.id(),
                mode: blob_mode(entry.filemode()),
            };
            (name, Some(extra))
        }
    };
    ignore.keep(DOCKERIGNORE);

    let mut writer = GitContext {
        repo_path: repo_path.to_path_buf(),
        tree: context_tree.id(),
        prefix: context.path.clone(),
        ignore,
        limits,
        mtime,
        extra,
        submodules: submodules.is_some(),
        fetched: BTreeMap::new(),
    };
    // Check every entry now, so an unsafe or oversized tree fails the seal stage, not the build.
    // This walk also fetches the submodules it meets, so the stream can read them later.
    let mut fetched = BTreeMap::new();
    writer.walk(None, submodules, &mut fetched)?;
    writer.fetched = fetched;
    Ok(SealedContext::new(name, Box::new(writer)))
}

struct BuildFile {
    name: String,
    blob: Oid,
    mode: u32,
}

struct GitContext {
    repo_path: PathBuf,
    tree: Oid,
    ignore: DockerIgnore,
    limits: Limits,
    mtime: u64,
    extra: Option<BuildFile>,
    /// The context directory's path from the repository root.
    prefix: Vec<String>,
    /// The job asked for submodules: each gitlink in the context is streamed from its own
    /// repository (one level; a submodule inside a submodule is refused).
    submodules: bool,
    /// Gitlink path in the context → the bare repository its commit was fetched into.
    fetched: BTreeMap<String, PathBuf>,
}

impl GitContext {
    /// Walks the context tree; writes the stream when `out` is given, only checks otherwise.
    /// `fetch` (check walk only) fetches the submodules met, recorded in `fetched`.
    fn walk(
        &self,
        out: Option<&mut dyn Write>,
        fetch: Option<&mut SubmoduleFetch<'_>>,
        fetched: &mut BTreeMap<String, PathBuf>,
    ) -> Result<u64, JobError> {
        let repo = open(&self.repo_path)?;
        let writing = out.is_some();
        let mut sealer = match out {
            Some(out) => Sealer::write(self.ignore.clone(), self.limits, false, out),
            None => Sealer::check(self.ignore.clone(), self.limits, false),
        };
        let tree = repo.find_tree(self.tree).map_err(internal)?;
        let mut rel = Vec::new();
        let mut walk = Walk {
            writing,
            fetch,
            fetched,
            in_submodule: false,
        };
        self.walk_tree(&repo, &tree, &mut rel, &mut sealer, &mut walk)?;
        if let Some(extra) = &self.extra {
            let blob = repo.find_blob(extra.blob).map_err(internal)?;
            let meta = Meta {
                mode: extra.mode,
                mtime: self.mtime,
            };
            sealer.add_build_file(&extra.name, meta, blob.size() as u64, &mut blob.content())?;
        }
        sealer.finish()
    }

    fn walk_tree(
        &self,
        repo: &Repository,
        tree: &Tree<'_>,
        rel: &mut Vec<String>,
        sealer: &mut Sealer<'_>,
        walk: &mut Walk<'_, '_>,
    ) -> Result<(), JobError> {
        let writing = walk.writing;
        let odb = repo.odb().map_err(internal)?;
        for entry in tree.iter() {
            let Ok(name) = entry.name() else {
                return Err(context::unsafe_entry(
                    &String::from_utf8_lossy(entry.name_bytes()),
                    "its name is not UTF-8",
                ));
            };
            rel.push(name.to_owned());
            let mode = entry.filemode();
            let meta = Meta {
                mode: blob_mode(mode),
                mtime: self.mtime,
            };
            match mode {
                MODE_TREE => {
                    sealer.add(rel, dir_meta(self.mtime), Entry::Dir)?;
                    if sealer.descend(rel) {
                        let sub = repo.find_tree(entry.id()).map_err(internal)?;
                        self.walk_tree(repo, &sub, rel, sealer, walk)?;
                    }
                }
                MODE_BLOB | MODE_BLOB_GROUP_WRITABLE | MODE_BLOB_EXECUTABLE => {
                    if !sealer.excluded(rel) {
                        if writing {
                            let blob = repo.find_blob(entry.id()).map_err(internal)?;
                            let size = blob.size() as u64;
                            sealer.add(
                                rel,
                                meta,
                                Entry::File {
                                    size,
                                    content: &mut blob.content(),
                                },
                            )?;
                        } else {
                            let (size, _) = odb.read_header(entry.id()).map_err(internal)?;
                            sealer.add(
                                rel,
                                meta,
                                Entry::File {
                                    size: size as u64,
                                    content: &mut io::empty(),
                                },
                            )?;
                        }
                    }
                }
                MODE_LINK => {
                    if !sealer.excluded(rel) {
                        let blob = repo.find_blob(entry.id()).map_err(internal)?;
                        let target = String::from_utf8_lossy(blob.content()).into_owned();
                        sealer.add(rel, meta, Entry::Symlink { target })?;
                    }
                }
                MODE_COMMIT if self.submodules => {
                    sealer.add(rel, dir_meta(self.mtime), Entry::Dir)?;
                    if sealer.descend(rel) {
                        self.walk_submodule(rel, entry.id(), sealer, walk)?;
                    }
                }
                // A submodule not asked for: `git archive` writes an empty directory, so do we.
                MODE_COMMIT => sealer.add(rel, dir_meta(self.mtime), Entry::Dir)?,
                _ => sealer.add(rel, meta, Entry::Special("git object of an unknown mode"))?,
            }
            rel.pop();
        }
        Ok(())
    }

    /// Streams the tree of submodule commit `commit` at `rel`, fetching it first on the check
    /// walk.
    fn walk_submodule(
        &self,
        rel: &mut Vec<String>,
        commit: Oid,
        sealer: &mut Sealer<'_>,
        walk: &mut Walk<'_, '_>,
    ) -> Result<(), JobError> {
        let key = rel.join("/");
        let full = self
            .prefix
            .iter()
            .chain(rel.iter())
            .cloned()
            .collect::<Vec<_>>()
            .join("/");
        if walk.in_submodule {
            return Err(JobError::permanent(
                Stage::Fetch,
                ErrorCode::Unsupported,
                format!(
                    "{full:?} is a submodule inside a submodule; only one level of submodules \
                     is fetched"
                ),
            ));
        }
        let repo_path = match walk.fetched.get(&key) {
            Some(path) => path.clone(),
            None => {
                let Some(fetch) = walk.fetch.as_deref_mut() else {
                    return Err(JobError::transient(
                        Stage::Seal,
                        ErrorCode::Internal,
                        format!("submodule {full:?} was not fetched when the context was checked"),
                    ));
                };
                let path = fetch(&full, commit)?;
                walk.fetched.insert(key, path.clone());
                path
            }
        };
        let repo = open(&repo_path)?;
        let tree = repo
            .find_commit(commit)
            .and_then(|c| c.tree())
            .map_err(internal)?;
        walk.in_submodule = true;
        let result = self.walk_tree(&repo, &tree, rel, sealer, walk);
        walk.in_submodule = false;
        result
    }
}

/// The state of one walk over the context.
struct Walk<'f, 'm> {
    /// Whether the stream is written (else only checked).
    writing: bool,
    fetch: Option<&'f mut SubmoduleFetch<'m>>,
    fetched: &'f mut BTreeMap<String, PathBuf>,
    /// Inside a submodule's tree: a gitlink there is a nested submodule.
    in_submodule: bool,
}

impl ContextWriter for GitContext {
    fn write_tar(&self, out: &mut dyn Write) -> Result<u64, JobError> {
        let mut fetched = self.fetched.clone();
        self.walk(Some(out), None, &mut fetched)
    }
}

struct TreeLookup<'r> {
    repo: &'r Repository,
    root: &'r Tree<'r>,
}

impl SourceLookup for TreeLookup<'_> {
    fn lookup(&self, path: &[String]) -> Result<Option<Node>, JobError> {
        if path.is_empty() {
            return Ok(Some(Node::Dir));
        }
        let entry = match self.root.get_path(Path::new(&path.join("/"))) {
            Ok(entry) => entry,
            Err(e) if e.code() == git2::ErrorCode::NotFound => return Ok(None),
            Err(e) => return Err(internal(e)),
        };
        Ok(Some(match entry.filemode() {
            MODE_TREE => Node::Dir,
            MODE_LINK => {
                let blob = self.repo.find_blob(entry.id()).map_err(internal)?;
                Node::Symlink(String::from_utf8_lossy(blob.content()).into_owned())
            }
            MODE_COMMIT => Node::Other("submodule"),
            _ if entry.kind() == Some(ObjectType::Blob) => Node::File,
            _ => Node::Other("git object of an unknown mode"),
        }))
    }

    fn list(&self, dir: &[String]) -> Vec<String> {
        let tree = if dir.is_empty() {
            Some(self.root.clone())
        } else {
            self.root
                .get_path(Path::new(&dir.join("/")))
                .ok()
                .and_then(|e| self.repo.find_tree(e.id()).ok())
        };
        tree.map(|t| {
            t.iter()
                .filter_map(|e| e.name().ok().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
    }
}

fn blob_mode(filemode: i32) -> u32 {
    if filemode == MODE_BLOB_EXECUTABLE {
        0o755
    } else {
        0o644
    }
}

fn dir_meta(mtime: u64) -> Meta {
    Meta { mode: 0o755, mtime }
}

fn open(path: &Path) -> Result<Repository, JobError> {
    Repository::open_bare(path).map_err(internal)
}

/// A failure reading our own object database: not the job's fault, so worth a retry.
fn internal(e: git2::Error) -> JobError {
    JobError::transient(
        Stage::Seal,
        ErrorCode::Internal,
        format!("reading the fetched repository failed: {}", e.message()),
    )
}
