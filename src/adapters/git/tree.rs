//! Sealing a fetched git commit: `context_dir` and `build_file` resolved in its tree (never
//! through a link out of it), and the context stream read straight from the object database
//! (like `git archive`), never from a checkout. A symlink blob is sent as a symlink whatever
//! its target, as `git archive` writes it; only its length is bounded before it is read.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use git2::{ObjectType, Oid, Repository, Tree};
use tokio_util::sync::CancellationToken;

use crate::context::resolve::{self, Node, SourceLookup, Want};
use crate::context::{
    self, DockerIgnore, Entry, Limits, Meta, Sealer, DOCKERIGNORE, MAX_LINK_TARGET_BYTES,
};
use crate::error::{ErrorCode, JobError, Stage};
use crate::ports::{ContextWriter, SealedContext};

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
/// context is fetched through it (during the check walk) and streamed at its path. Both walks
/// stop when `cancel` fires.
///
/// The walk recurses once per directory level, and only into a directory the sealer has
/// counted, so its depth is at most `sources.max_path_depth` (config caps it at 4096; a test
/// walks that deep on a 2 MiB stack, the size of tokio's blocking threads).
pub fn seal(
    repo_path: &Path,
    commit: Oid,
    context_dir: &str,
    build_file: &str,
    limits: Limits,
    cancel: CancellationToken,
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

    // Only a regular file is read, as for archives and local directories: a symlink's blob is
    // its target, not patterns, and a link is never followed (it is sent as a link).
    let ignore_blob = match context_tree.get_name(DOCKERIGNORE) {
        Some(entry)
            if matches!(
                entry.filemode(),
                MODE_BLOB | MODE_BLOB_GROUP_WRITABLE | MODE_BLOB_EXECUTABLE
            ) =>
        {
            let (size, _) = repo
                .odb()
                .and_then(|odb| odb.read_header(entry.id()))
                .map_err(internal)?;
            if size as u64 > context::MAX_DOCKERIGNORE_BYTES {
                return Err(context::limit(format!(
                    "{DOCKERIGNORE} is larger than {} bytes",
                    context::MAX_DOCKERIGNORE_BYTES
                )));
            }
            Some(repo.find_blob(entry.id()).map_err(internal)?)
        }
        _ => None,
    };
    let mut ignore = context::load_dockerignore(ignore_blob.as_ref().map(|b| b.content()))?;
    let placed = context::name_build_file(&context.path, &dockerfile.path, &mut ignore);
    let extra = if placed.outside {
        let entry = root
            .get_path(Path::new(&dockerfile.path.join("/")))
            .map_err(internal)?;
        Some(BuildFile {
            name: placed.name.clone(),
            blob: entry.id(),
            mode: blob_mode(entry.filemode()),
        })
    } else {
        None
    };
    let name = placed.name;

    let mut writer = GitContext {
        repo_path: repo_path.to_path_buf(),
        tree: context_tree.id(),
        prefix: context.path.clone(),
        ignore,
        limits,
        cancel,
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
    cancel: CancellationToken,
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
    ///
    /// The walk keeps its own stack of directories instead of recursing, so no tree, however
    /// deep, can exhaust the thread's stack; the sealer's depth cap ends a deep one.
    fn walk(
        &self,
        out: Option<&mut dyn Write>,
        mut fetch: Option<&mut SubmoduleFetch<'_>>,
        fetched: &mut BTreeMap<String, PathBuf>,
    ) -> Result<u64, JobError> {
        let writing = out.is_some();
        let mut sealer = Sealer::new(&self.ignore, self.limits, false, &self.cancel, out);
        // repos[0] is the superproject; a submodule's repository is added when entered.
        let mut repos = vec![open(&self.repo_path)?];
        let mut stack = {
            let root = repos[0].find_tree(self.tree).map_err(internal)?;
            vec![Frame::of(&root, 0)]
        };
        let mut rel: Vec<String> = Vec::new();
        while let Some(frame) = stack.last_mut() {
            let Some(item) = frame.items.get(frame.next) else {
                stack.pop();
                rel.pop();
                continue;
            };
            frame.next += 1;
            let repo_index = frame.repo;
            let Ok(name) = std::str::from_utf8(&item.name) else {
                return Err(context::unsafe_entry(
                    &String::from_utf8_lossy(&item.name),
                    "its name is not UTF-8",
                ));
            };
            rel.push(name.to_owned());
            let (mode, id) = (item.mode, item.id);
            let repo = &repos[repo_index];
            let meta = Meta {
                mode: blob_mode(mode),
                mtime: self.mtime,
            };
            match mode {
                MODE_TREE => {
                    sealer.add(&rel, dir_meta(self.mtime), Entry::Dir)?;
                    if sealer.descend(&rel) {
                        let sub = repo.find_tree(id).map_err(internal)?;
                        stack.push(Frame::of(&sub, repo_index));
                        continue;
                    }
                }
                MODE_BLOB | MODE_BLOB_GROUP_WRITABLE | MODE_BLOB_EXECUTABLE => {
                    if !sealer.skip_excluded(&rel)? {
                        if writing {
                            let blob = repo.find_blob(id).map_err(internal)?;
                            let size = blob.size() as u64;
                            sealer.add(
                                &rel,
                                meta,
                                Entry::File {
                                    size,
                                    content: &mut blob.content(),
                                },
                            )?;
                        } else {
                            let odb = repo.odb().map_err(internal)?;
                            let (size, _) = odb.read_header(id).map_err(internal)?;
                            sealer.add(
                                &rel,
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
                    if !sealer.skip_excluded(&rel)? {
                        let target = link_target(repo, id, &rel.join("/"))?;
                        sealer.add(&rel, meta, Entry::Symlink { target })?;
                    }
                }
                MODE_COMMIT if self.submodules => {
                    sealer.add(&rel, dir_meta(self.mtime), Entry::Dir)?;
                    if sealer.descend(&rel) {
                        let in_submodule = repo_index != 0;
                        let path =
                            self.submodule_repo(&rel, id, in_submodule, &mut fetch, fetched)?;
                        let sub_repo = open(&path)?;
                        let tree = sub_repo
                            .find_commit(id)
                            .and_then(|c| c.tree())
                            .map_err(internal)?;
                        let frame = Frame::of(&tree, repos.len());
                        drop(tree);
                        repos.push(sub_repo);
                        stack.push(frame);
                        continue;
                    }
                }
                // A submodule not asked for: `git archive` writes an empty directory, so do we.
                MODE_COMMIT => sealer.add(&rel, dir_meta(self.mtime), Entry::Dir)?,
                _ => sealer.add(&rel, meta, Entry::Special("git object of an unknown mode"))?,
            }
            rel.pop();
        }
        if let Some(extra) = &self.extra {
            let blob = repos[0].find_blob(extra.blob).map_err(internal)?;
            let meta = Meta {
                mode: extra.mode,
                mtime: self.mtime,
            };
            sealer.add_build_file(&extra.name, meta, blob.size() as u64, &mut blob.content())?;
        }
        sealer.finish()
    }

    /// The bare repository holding submodule commit `commit` at `rel`, fetched on the check
    /// walk (through `fetch`) and looked up in `fetched` on the write walk.
    fn submodule_repo(
        &self,
        rel: &[String],
        commit: Oid,
        in_submodule: bool,
        fetch: &mut Option<&mut SubmoduleFetch<'_>>,
        fetched: &mut BTreeMap<String, PathBuf>,
    ) -> Result<PathBuf, JobError> {
        let key = rel.join("/");
        let full = self
            .prefix
            .iter()
            .chain(rel.iter())
            .cloned()
            .collect::<Vec<_>>()
            .join("/");
        if in_submodule {
            return Err(JobError::permanent(
                Stage::Fetch,
                ErrorCode::Unsupported,
                format!(
                    "{full:?} is a submodule inside a submodule; only one level of submodules \
                     is fetched"
                ),
            ));
        }
        if let Some(path) = fetched.get(&key) {
            return Ok(path.clone());
        }
        let Some(fetch) = fetch.as_deref_mut() else {
            return Err(JobError::transient(
                Stage::Seal,
                ErrorCode::Internal,
                format!("submodule {full:?} was not fetched when the context was checked"),
            ));
        };
        let path = fetch(&full, commit)?;
        fetched.insert(key, path.clone());
        Ok(path)
    }
}

/// One directory of the walk: its entries, read when it was entered, and the next to visit.
struct Frame {
    items: Vec<Item>,
    next: usize,
    /// Index of the repository the tree is in (0: the superproject).
    repo: usize,
}

struct Item {
    name: Vec<u8>,
    mode: i32,
    id: Oid,
}

impl Frame {
    fn of(tree: &Tree<'_>, repo: usize) -> Frame {
        Frame {
            items: tree
                .iter()
                .map(|e| Item {
                    name: e.name_bytes().to_vec(),
                    mode: e.filemode(),
                    id: e.id(),
                })
                .collect(),
            next: 0,
            repo,
        }
    }
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
            MODE_LINK => Node::Symlink(link_target(self.repo, entry.id(), &path.join("/"))?),
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

/// The target of the symlink blob `id` at `name`, read only when its size is sane: a link is a
/// path, and a blob of gigabytes posing as one must not be loaded.
fn link_target(repo: &Repository, id: Oid, name: &str) -> Result<String, JobError> {
    let (size, _) = repo
        .odb()
        .and_then(|odb| odb.read_header(id))
        .map_err(internal)?;
    if size > MAX_LINK_TARGET_BYTES {
        return Err(context::limit(format!(
            "the symlink {name:?} has a target longer than {MAX_LINK_TARGET_BYTES} bytes"
        )));
    }
    let blob = repo.find_blob(id).map_err(internal)?;
    Ok(String::from_utf8_lossy(blob.content()).into_owned())
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A bare repository whose one commit holds `ignore` as `.dockerignore`, a `Dockerfile`,
    /// and a chain of `depth` directories `d/d/d/…`.
    fn deep_repo(dir: &Path, depth: usize, ignore: &str) -> Oid {
        let repo = Repository::init_bare(dir).unwrap();
        let empty = repo.treebuilder(None).unwrap().write().unwrap();
        let mut inner = empty;
        for _ in 0..depth {
            let mut b = repo.treebuilder(None).unwrap();
            b.insert("d", inner, MODE_TREE).unwrap();
            inner = b.write().unwrap();
        }
        let mut root = repo.treebuilder(None).unwrap();
        root.insert("d", inner, MODE_TREE).unwrap();
        let ignore = repo.blob(ignore.as_bytes()).unwrap();
        root.insert(DOCKERIGNORE, ignore, MODE_BLOB).unwrap();
        let dockerfile = repo.blob(b"FROM scratch\n").unwrap();
        root.insert("Dockerfile", dockerfile, MODE_BLOB).unwrap();
        let tree = repo.find_tree(root.write().unwrap()).unwrap();
        let sig = git2::Signature::new("t", "t@example.invalid", &git2::Time::new(1, 0)).unwrap();
        repo.commit(None, &sig, &sig, "deep", &tree, &[]).unwrap()
    }

    fn seal_all(path: &Path, commit: Oid, limits: Limits) -> Result<SealedContext, JobError> {
        seal(
            path,
            commit,
            "/",
            "/Dockerfile",
            limits,
            CancellationToken::new(),
            None,
        )
    }

    /// A bare repository whose one commit holds `files` (name, content) and `links` (name,
    /// target) as symlinks, all at the root.
    fn flat_repo(dir: &Path, files: &[(&str, &str)], links: &[(&str, &str)]) -> Oid {
        let repo = Repository::init_bare(dir).unwrap();
        let mut root = repo.treebuilder(None).unwrap();
        for (name, body) in files {
            let blob = repo.blob(body.as_bytes()).unwrap();
            root.insert(name, blob, MODE_BLOB).unwrap();
        }
        for (name, target) in links {
            let blob = repo.blob(target.as_bytes()).unwrap();
            root.insert(name, blob, MODE_LINK).unwrap();
        }
        let tree = repo.find_tree(root.write().unwrap()).unwrap();
        let sig = git2::Signature::new("t", "t@example.invalid", &git2::Time::new(1, 0)).unwrap();
        repo.commit(None, &sig, &sig, "flat", &tree, &[]).unwrap()
    }

    const LIMITS: Limits = Limits {
        max_context_bytes: 1 << 20,
        max_entries: 100,
        max_path_depth: 16,
    };

    #[test]
    fn symlinks_out_of_the_repository_are_kept_as_links() {
        let dir = tempfile::tempdir().unwrap();
        let commit = flat_repo(
            dir.path(),
            &[("Dockerfile", "FROM scratch\n")],
            &[("config", "/etc/passwd"), ("up", "../outside")],
        );
        let sealed = seal_all(dir.path(), commit, LIMITS).expect("seals");
        let mut out = Vec::new();
        sealed.write_tar(&mut out).unwrap();
        let mut archive = tar::Archive::new(&out[..]);
        let links: Vec<(String, String)> = archive
            .entries()
            .unwrap()
            .map(Result::unwrap)
            .filter(|e| e.header().entry_type() == tar::EntryType::Symlink)
            .map(|e| {
                let target = e.link_name().unwrap().unwrap().display().to_string();
                (e.path().unwrap().display().to_string(), target)
            })
            .collect();
        let want = [("config", "/etc/passwd"), ("up", "../outside")];
        assert_eq!(links, want.map(|(n, t)| (n.to_owned(), t.to_owned())));
    }

    #[test]
    fn a_build_file_that_is_a_link_out_of_the_repository_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let commit = flat_repo(dir.path(), &[], &[("Dockerfile", "/etc/passwd")]);
        let err = seal_all(dir.path(), commit, LIMITS)
            .map(|_| ())
            .unwrap_err();
        assert_eq!(err.code, ErrorCode::UnsafeSource, "{err}");
        assert!(err.message.contains("build_file /Dockerfile"), "{err}");
    }

    /// Regression: a `.dockerignore` symlink's target was read as its patterns (here it
    /// excluded `secret.txt`). It is sent as a link and not read, as archives and local
    /// directories do.
    #[test]
    fn a_dockerignore_that_is_a_symlink_is_sent_as_a_link_not_read() {
        let dir = tempfile::tempdir().unwrap();
        let commit = flat_repo(
            dir.path(),
            &[("Dockerfile", "FROM scratch\n"), ("secret.txt", "s")],
            &[(DOCKERIGNORE, "secret.txt")],
        );
        let sealed = seal_all(dir.path(), commit, LIMITS).expect("seals");
        let mut out = Vec::new();
        sealed.write_tar(&mut out).unwrap();
        let mut archive = tar::Archive::new(&out[..]);
        let names: Vec<(String, u8)> = archive
            .entries()
            .unwrap()
            .map(Result::unwrap)
            .map(|e| {
                let kind = e.header().entry_type().as_byte();
                (e.path().unwrap().display().to_string(), kind)
            })
            .collect();
        let want = [
            (DOCKERIGNORE, b'2'),
            ("Dockerfile", b'0'),
            ("secret.txt", b'0'),
        ];
        assert_eq!(names, want.map(|(n, k)| (n.to_owned(), k)));
    }

    /// Regression: a `.dockerignore` gitlink made sealing look up a commit the repository does
    /// not hold, a transient internal error retried for nothing.
    #[test]
    fn a_dockerignore_that_is_a_submodule_is_not_read() {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repository::init_bare(dir.path()).unwrap();
        let mut root = repo.treebuilder(None).unwrap();
        let dockerfile = repo.blob(b"FROM scratch\n").unwrap();
        root.insert("Dockerfile", dockerfile, MODE_BLOB).unwrap();
        let elsewhere = Oid::from_str("1111111111111111111111111111111111111111").unwrap();
        root.insert(DOCKERIGNORE, elsewhere, MODE_COMMIT).unwrap();
        let tree = repo.find_tree(root.write().unwrap()).unwrap();
        let sig = git2::Signature::new("t", "t@example.invalid", &git2::Time::new(1, 0)).unwrap();
        let commit = repo
            .commit(None, &sig, &sig, "gitlink", &tree, &[])
            .unwrap();
        seal_all(dir.path(), commit, LIMITS).expect("seals");
    }

    /// Regression: a tree 100,000 directories deep below an excluded directory overflowed the
    /// worker's stack (excluded directories were walked but never counted against the depth).
    /// An exception pattern makes the walk enter excluded directories.
    #[test]
    fn a_deep_excluded_tree_stops_at_the_depth_cap_on_a_blocking_threads_stack() {
        let dir = tempfile::tempdir().unwrap();
        let commit = deep_repo(dir.path(), 10_000, "*\n!**/keep\n");
        for max_path_depth in [64, 4096] {
            let limits = Limits {
                max_context_bytes: 1 << 20,
                max_entries: 1_000_000,
                max_path_depth,
            };
            let path = dir.path().to_path_buf();
            // tokio's blocking threads have 2 MiB stacks; the walk must fit the deepest tree
            // any config allows (max_path_depth is at most 4096; paths at most 4096 bytes).
            let err = std::thread::Builder::new()
                .stack_size(2 << 20)
                .spawn(move || seal_all(&path, commit, limits).map(|_| ()))
                .unwrap()
                .join()
                .expect("the walk must not overflow its stack")
                .expect_err("the tree is deeper than any cap");
            assert_eq!(err.code, ErrorCode::LimitExceeded, "{err}");
        }
    }

    /// Without an exception, an excluded directory is not entered at all: the same deep tree
    /// seals at once, and its entries are not in the stream.
    #[test]
    fn an_excluded_directory_without_exceptions_is_not_walked() {
        let dir = tempfile::tempdir().unwrap();
        let commit = deep_repo(dir.path(), 10_000, "*\n");
        let limits = Limits {
            max_context_bytes: 1 << 20,
            max_entries: 10,
            max_path_depth: 64,
        };
        let sealed = seal_all(dir.path(), commit, limits).expect("seals");
        let mut out = Vec::new();
        sealed.write_tar(&mut out).unwrap();
        let mut archive = tar::Archive::new(&out[..]);
        let names: Vec<String> = archive
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect();
        assert_eq!(names, [".dockerignore", "Dockerfile"]);
    }
}
