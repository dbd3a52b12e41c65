//! A downloaded tar.gz as a build source: read entry by entry, checked, never extracted.
//!
//! Sealing reads the archive twice, each time a stream from the file in the workspace:
//!
//! 1. **index**: every entry is checked against the archive rules and recorded (kind, link
//!    target); `.dockerignore` files are kept. Refused, with the entry's name: absolute paths,
//!    `..` components, names that are not UTF-8, symlinks with an empty target, hard links to
//!    anything but an earlier file, devices, FIFOs, sparse and unknown entry kinds, entries
//!    below a symlink or a file, and a path that appears twice as different kinds. Caps:
//!    entries, path depth, content bytes, link target length, and decompressed bytes (a
//!    decompression bomb stops at the cap, never at the end of its output). A symlink is kept
//!    whatever its target, absolute or leaving the archive: it is never followed here, and
//!    BuildKit resolves it inside the context (see [`crate::context`]).
//! 2. **check** (in memory): `context_dir` and `build_file` are resolved in the index (never
//!    through a link out of the archive), and the context's entries are judged on the index, so
//!    that context-relative rules (a hard link to outside the context, the caps on what is
//!    sent) fail the seal stage without decompressing the archive a second time.
//! 3. **write**: the same walk, writing the tar stream, when the builder asks for it.
//!
//! Gzip framing: concatenated members are read as one stream, as `gzip -d` and `tar xz` do.
//! Bytes after the last member that are not another gzip member are refused ("trailing
//! data"), and so is anything but zero padding after the tar end-of-archive marker, so nothing
//! in the file escapes the checks.

use std::cell::Cell;
use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use flate2::read::MultiGzDecoder;
use tar::EntryType;
use tokio_util::sync::CancellationToken;

use crate::context::resolve::{self, Node, SourceLookup, Want};
use crate::context::{
    self, unsafe_entry, DockerIgnore, Entry, Limits, Meta, Sealer, DOCKERIGNORE,
    MAX_DOCKERIGNORE_BYTES,
};
use crate::error::{ErrorCode, JobError, Stage};
use crate::ports::{ContextWriter, SealedContext};

/// Tar framing allowed on top of the content cap when decompressing: a header and at most a
/// block of padding per entry, plus extension headers and the end marker.
const FRAMING_PER_ENTRY: u64 = 2048;
const FRAMING_FIXED: u64 = 1 << 20;

/// Checks the archive at `path` and seals `context_dir` / `build_file` from it. Every read and
/// walk stops when `cancel` fires.
///
/// An entry's size is what the archive really holds for it (`entry.size()`: a PAX `size`
/// record overrides the ustar field), for the caps and for the stream alike.
pub fn seal(
    path: &Path,
    context_dir: &str,
    build_file: &str,
    limits: Limits,
    cancel: CancellationToken,
) -> Result<SealedContext, JobError> {
    let index = Index::read(path, limits, &cancel)?;
    let context = resolve::resolve(&index, context_dir, Want::ContextDir)?;
    let dockerfile = resolve::resolve(&index, build_file, Want::BuildFile)?;
    let mut ignore = {
        let mut key = context.path.clone();
        key.push(DOCKERIGNORE.to_owned());
        let found = index.dockerignores.get(&key.join("/"));
        context::load_dockerignore(found.map(|bytes| &bytes[..]))?
    };
    let placed = context::name_build_file(&context.path, &dockerfile.path, &mut ignore);
    let reserved = placed.outside.then(|| placed.name.clone());
    let name = placed.name;
    index.check_context(&context.path, &ignore, limits, &cancel)?;
    let writer = ArchiveContext {
        path: path.to_path_buf(),
        context: context.path,
        build_file: dockerfile.path,
        reserved,
        ignore,
        limits,
        cancel,
    };
    Ok(SealedContext::new(name, Box::new(writer)))
}

/// The decompressed bytes of the file, capped.
type Stream = Capped<MultiGzDecoder<BufReader<File>>>;

/// The gzip + tar stream of the file, with the decompressed-bytes cap.
struct Opened {
    archive: tar::Archive<Stream>,
    over_cap: Rc<Cell<bool>>,
    cap: u64,
}

fn open(path: &Path, limits: Limits) -> Result<Opened, JobError> {
    let file = File::open(path).map_err(|e| {
        JobError::transient(
            Stage::Seal,
            ErrorCode::LocalIo,
            format!("cannot open the downloaded archive: {e}"),
        )
    })?;
    let cap = limits
        .max_context_bytes
        .saturating_add(limits.max_entries.saturating_mul(FRAMING_PER_ENTRY))
        .saturating_add(FRAMING_FIXED);
    let over_cap = Rc::new(Cell::new(false));
    let reader = Capped {
        inner: MultiGzDecoder::new(BufReader::with_capacity(256 * 1024, file)),
        left: cap,
        over: Rc::clone(&over_cap),
    };
    Ok(Opened {
        archive: tar::Archive::new(reader),
        over_cap,
        cap,
    })
}

/// What [`each_entry`] tells about an entry: its type, its name as errors show it, and its
/// path components.
struct Named {
    kind: EntryType,
    shown: String,
    parts: Vec<String>,
}

/// Visits the entries of `opened` in order, skipping extension headers and the archive root,
/// and refusing a name [`archive_path`] refuses. With `cancel`, stops with a `cancelled`
/// error once it fires (checked as each entry is read).
fn each_entry(
    opened: &mut Opened,
    cancel: Option<&CancellationToken>,
    mut visit: impl FnMut(&mut tar::Entry<'_, Stream>, Named) -> Result<(), JobError>,
) -> Result<(), JobError> {
    let over_cap = Rc::clone(&opened.over_cap);
    let cap = opened.cap;
    let entries = opened
        .archive
        .entries()
        .map_err(|e| opened_error(&over_cap, cap, e))?;
    for entry in entries {
        if cancel.is_some_and(CancellationToken::is_cancelled) {
            return Err(JobError::cancelled(Stage::Seal));
        }
        let mut entry = entry.map_err(|e| opened_error(&over_cap, cap, e))?;
        let kind = entry.header().entry_type();
        if matches!(
            kind,
            EntryType::XGlobalHeader | EntryType::XHeader | EntryType::GNULongName
        ) {
            continue;
        }
        let raw_name = entry.path_bytes().into_owned();
        let shown = String::from_utf8_lossy(&raw_name).into_owned();
        let Some(parts) = archive_path(&raw_name).map_err(|why| unsafe_entry(&shown, why))? else {
            continue;
        };
        visit(&mut entry, Named { kind, shown, parts })?;
    }
    Ok(())
}

/// A reader that fails once more than `left` bytes were asked of it.
struct Capped<R> {
    inner: R,
    left: u64,
    over: Rc<Cell<bool>>,
}

impl<R: Read> Read for Capped<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n as u64 > self.left {
            self.over.set(true);
            return Err(io::Error::other("decompressed size cap reached"));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    Dir,
    /// A regular file and its size.
    File(u64),
    Symlink(String),
    /// A hard link and its target's components.
    HardLink(Vec<String>),
}

/// Pass 1: every entry checked and recorded.
struct Index {
    nodes: HashMap<String, Kind>,
    /// Each `.dockerignore` of the archive, read up to one byte over its cap (so that
    /// [`DockerIgnore::load`] refuses an oversized one of the context, and only that one).
    dockerignores: HashMap<String, Vec<u8>>,
}

impl Index {
    fn read(path: &Path, limits: Limits, cancel: &CancellationToken) -> Result<Index, JobError> {
        let mut opened = open(path, limits)?;
        let mut index = Index {
            nodes: HashMap::new(),
            dockerignores: HashMap::new(),
        };
        let mut entries_seen: u64 = 0;
        let mut content_bytes: u64 = 0;
        let over_cap = Rc::clone(&opened.over_cap);
        let cap = opened.cap;
        each_entry(&mut opened, Some(cancel), |entry, named| {
            let Named { kind, shown, parts } = named;
            entries_seen += 1;
            if entries_seen > limits.max_entries {
                return Err(context::limit(format!(
                    "the archive has more than {} entries (sources.max_entries)",
                    limits.max_entries
                )));
            }
            if parts.len() > limits.max_path_depth as usize {
                return Err(context::limit(format!(
                    "{shown:?} is more than {} directories deep (sources.max_path_depth)",
                    limits.max_path_depth
                )));
            }
            let node = match kind {
                EntryType::Regular | EntryType::Continuous => {
                    let size = entry.size();
                    content_bytes = content_bytes.saturating_add(size);
                    if content_bytes > limits.max_context_bytes {
                        return Err(context::limit(format!(
                            "the archive holds more than {} bytes of files \
                             (sources.max_context_bytes)",
                            limits.max_context_bytes
                        )));
                    }
                    if parts.last().is_some_and(|n| n == DOCKERIGNORE) {
                        let mut text = Vec::new();
                        (&mut *entry)
                            .take(MAX_DOCKERIGNORE_BYTES + 1)
                            .read_to_end(&mut text)
                            .map_err(|e| opened_error(&over_cap, cap, e))?;
                        index.dockerignores.insert(parts.join("/"), text);
                    }
                    Kind::File(size)
                }
                EntryType::Directory => Kind::Dir,
                EntryType::Symlink => {
                    let target = link_target(entry, &shown)?;
                    context::check_link_target(&shown, &target)?;
                    Kind::Symlink(target)
                }
                EntryType::Link => {
                    let target = link_target(entry, &shown)?;
                    let target_parts = archive_path(target.as_bytes())
                        .ok()
                        .flatten()
                        .filter(|t| matches!(index.nodes.get(&t.join("/")), Some(Kind::File(_))));
                    let Some(target_parts) = target_parts else {
                        return Err(unsafe_entry(
                            &shown,
                            &format!(
                                "it is a hard link to {target:?}, which is not an earlier \
                                 file of the archive"
                            ),
                        ));
                    };
                    Kind::HardLink(target_parts)
                }
                EntryType::Char => return Err(unsafe_entry(&shown, "it is a character device")),
                EntryType::Block => return Err(unsafe_entry(&shown, "it is a block device")),
                EntryType::Fifo => return Err(unsafe_entry(&shown, "it is a FIFO")),
                other => {
                    return Err(unsafe_entry(
                        &shown,
                        &format!(
                            "its entry type {:?} is not supported",
                            other.as_byte() as char
                        ),
                    ))
                }
            };
            index.insert(&parts, node, &shown)
        })?;
        // What follows the end-of-archive marker must be zero padding; reading it to the end
        // also makes the gzip decoder meet any trailing garbage.
        let mut rest = opened.archive.into_inner();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match rest.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) => return Err(opened_error(&over_cap, cap, e)),
            };
            if buf[..n].iter().any(|b| *b != 0) {
                return Err(JobError::permanent(
                    Stage::Seal,
                    ErrorCode::UnsafeSource,
                    "the archive has data after the tar end-of-archive marker",
                ));
            }
        }
        Ok(index)
    }

    fn insert(&mut self, parts: &[String], node: Kind, shown: &str) -> Result<(), JobError> {
        for i in 1..parts.len() {
            let parent = parts[..i].join("/");
            match self.nodes.get(&parent) {
                None => {
                    self.nodes.insert(parent, Kind::Dir);
                }
                Some(Kind::Dir) => {}
                Some(Kind::Symlink(_)) => {
                    return Err(unsafe_entry(
                        shown,
                        &format!("it lies below {parent:?}, which is a symlink"),
                    ))
                }
                Some(_) => {
                    return Err(unsafe_entry(
                        shown,
                        &format!("it lies below {parent:?}, which is a file"),
                    ))
                }
            }
        }
        let key = parts.join("/");
        match self.nodes.get(&key) {
            None => {}
            Some(Kind::Dir) if node == Kind::Dir => {}
            Some(Kind::File(_)) if matches!(node, Kind::File(_)) => {}
            Some(_) => {
                return Err(unsafe_entry(
                    shown,
                    "the path appears twice in the archive as different kinds (or as a symlink)",
                ))
            }
        }
        self.nodes.insert(key, node);
        Ok(())
    }
}

fn opened_error(over_cap: &Rc<Cell<bool>>, cap: u64, e: io::Error) -> JobError {
    if over_cap.get() {
        context::limit(format!(
            "the archive decompresses to more than {cap} bytes (sources.max_context_bytes plus \
             tar framing); stopped there"
        ))
    } else {
        JobError::permanent(
            Stage::Seal,
            ErrorCode::InvalidJob,
            format!("the archive is not a valid tar.gz: {e}"),
        )
    }
}

impl Index {
    /// The context-relative rules, judged on the index (no second decompression): caps on what
    /// is sent, hard links staying inside the context (symlinks are sent whatever their
    /// target). The write pass applies the same rules again through the [`Sealer`].
    /// Every entry below the context counts against the entry cap, as in the write walk,
    /// whether `.dockerignore` leaves it out or not.
    fn check_context(
        &self,
        context: &[String],
        ignore: &DockerIgnore,
        limits: Limits,
        cancel: &CancellationToken,
    ) -> Result<(), JobError> {
        let mut entries: u64 = 0;
        let mut bytes: u64 = 0;
        for (key, kind) in &self.nodes {
            if cancel.is_cancelled() {
                return Err(JobError::cancelled(Stage::Seal));
            }
            let parts: Vec<String> = key.split('/').map(str::to_owned).collect();
            let Some(rel) = parts.strip_prefix(context) else {
                continue;
            };
            if rel.is_empty() {
                continue;
            }
            entries += 1;
            if entries > limits.max_entries {
                return Err(context::limit(format!(
                    "the build context has more than {} entries (sources.max_entries)",
                    limits.max_entries
                )));
            }
            let rel_name = rel.join("/");
            if ignore.is_excluded(&rel_name) {
                continue;
            }
            match kind {
                Kind::Dir | Kind::Symlink(_) => {}
                Kind::File(size) => {
                    bytes = bytes.saturating_add(*size);
                    if bytes > limits.max_context_bytes {
                        return Err(context::limit(format!(
                            "the build context holds more than {} bytes \
                             (sources.max_context_bytes)",
                            limits.max_context_bytes
                        )));
                    }
                }
                Kind::HardLink(target) => {
                    let inside = target
                        .strip_prefix(context)
                        .filter(|t| !ignore.is_excluded(&t.join("/")));
                    if inside.is_none() {
                        return Err(unsafe_entry(
                            &rel_name,
                            &format!(
                                "it is a hard link to {:?}, which is outside the context or \
                                 excluded by .dockerignore",
                                target.join("/")
                            ),
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}

impl SourceLookup for Index {
    fn lookup(&self, path: &[String]) -> Result<Option<Node>, JobError> {
        if path.is_empty() {
            return Ok(Some(Node::Dir));
        }
        Ok(self.nodes.get(&path.join("/")).map(|kind| match kind {
            Kind::Dir => Node::Dir,
            Kind::File(_) => Node::File,
            Kind::Symlink(target) => Node::Symlink(target.clone()),
            Kind::HardLink(_) => Node::Other("hard link"),
        }))
    }

    fn list(&self, dir: &[String]) -> Vec<String> {
        let prefix = if dir.is_empty() {
            String::new()
        } else {
            format!("{}/", dir.join("/"))
        };
        self.nodes
            .keys()
            .filter_map(|k| k.strip_prefix(&prefix))
            .filter(|rest| !rest.is_empty() && !rest.contains('/'))
            .map(str::to_owned)
            .collect()
    }
}

/// The components of an entry's name; `None` for the archive root (`./`).
fn archive_path(raw: &[u8]) -> Result<Option<Vec<String>>, &'static str> {
    let text = std::str::from_utf8(raw).map_err(|_| "its name is not UTF-8")?;
    if text.starts_with('/') {
        return Err("it has an absolute path");
    }
    if text.contains('\0') {
        return Err("its name holds a NUL byte");
    }
    let parts: Vec<String> = text
        .split('/')
        .filter(|p| !p.is_empty() && *p != ".")
        .map(str::to_owned)
        .collect();
    if parts.iter().any(|p| p == "..") {
        return Err("its path has a '..' component");
    }
    Ok((!parts.is_empty()).then_some(parts))
}

fn link_target<R: Read>(entry: &tar::Entry<'_, R>, shown: &str) -> Result<String, JobError> {
    let target = entry
        .link_name_bytes()
        .ok_or_else(|| unsafe_entry(shown, "it is a link without a target"))?;
    String::from_utf8(target.into_owned())
        .map_err(|_| unsafe_entry(shown, "its link target is not UTF-8"))
}

/// Passes 2 and 3: the context below `context`, from the archive's entries.
struct ArchiveContext {
    path: PathBuf,
    context: Vec<String>,
    build_file: Vec<String>,
    /// The reserved name of a build file outside the context.
    reserved: Option<String>,
    ignore: DockerIgnore,
    limits: Limits,
    cancel: CancellationToken,
}

impl ArchiveContext {
    fn walk(&self, out: Option<&mut dyn Write>) -> Result<u64, JobError> {
        let mut opened = open(&self.path, self.limits)?;
        let mut sealer = Sealer::new(&self.ignore, self.limits, true, &self.cancel, out);
        // The sealer stops the walk when `cancel` fires.
        each_entry(&mut opened, None, |entry, named| {
            let Named { kind, shown, parts } = named;
            let meta = Meta {
                mode: entry.header().mode().unwrap_or(0o644),
                mtime: entry.header().mtime().unwrap_or(0),
            };
            if let Some(reserved) = &self.reserved {
                if parts == self.build_file {
                    let size = entry.size();
                    return sealer.add_build_file(reserved, meta, size, entry);
                }
            }
            let Some(rel) = parts.strip_prefix(self.context.as_slice()) else {
                return Ok(());
            };
            if rel.is_empty() {
                return Ok(());
            }
            match kind {
                EntryType::Directory => sealer.add(rel, meta, Entry::Dir)?,
                EntryType::Regular | EntryType::Continuous => {
                    let size = entry.size();
                    sealer.add(
                        rel,
                        meta,
                        Entry::File {
                            size,
                            content: &mut *entry,
                        },
                    )?
                }
                EntryType::Symlink => {
                    let target = link_target(entry, &shown)?;
                    sealer.add(rel, meta, Entry::Symlink { target })?
                }
                EntryType::Link => {
                    let target = link_target(entry, &shown)?;
                    let target_parts = archive_path(target.as_bytes())
                        .ok()
                        .flatten()
                        .unwrap_or_default();
                    let Some(inside) = target_parts.strip_prefix(self.context.as_slice()) else {
                        return Err(unsafe_entry(
                            &shown,
                            &format!("it is a hard link to {target:?}, outside the context"),
                        ));
                    };
                    sealer.add(
                        rel,
                        meta,
                        Entry::HardLink {
                            target: inside.to_vec(),
                        },
                    )?
                }
                _ => sealer.add(rel, meta, Entry::Special("special file"))?,
            }
            Ok(())
        })?;
        sealer.finish()
    }
}

impl ContextWriter for ArchiveContext {
    fn write_tar(&self, out: &mut dyn Write) -> Result<u64, JobError> {
        self.walk(Some(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_context_bytes: 1 << 20,
        max_entries: 100,
        max_path_depth: 16,
    };

    /// A tar.gz at `dir/source.tar.gz` holding `files` (name, content) and `links` (name,
    /// target) as symlinks.
    fn archive(dir: &Path, files: &[(&str, &str)], links: &[(&str, &str)]) -> PathBuf {
        let mut builder = tar::Builder::new(Vec::new());
        for (name, body) in files {
            let mut header = tar::Header::new_gnu();
            header.set_size(body.len() as u64);
            header.set_mode(0o644);
            builder
                .append_data(&mut header, name, body.as_bytes())
                .unwrap();
        }
        for (name, target) in links {
            let mut header = tar::Header::new_gnu();
            header.set_entry_type(EntryType::Symlink);
            header.set_size(0);
            builder.append_link(&mut header, name, target).unwrap();
        }
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&builder.into_inner().unwrap()).unwrap();
        let path = dir.join("source.tar.gz");
        std::fs::write(&path, gz.finish().unwrap()).unwrap();
        path
    }

    /// (name, link target) of each symlink in the stream of `sealed`.
    fn stream_symlinks(sealed: &SealedContext) -> Vec<(String, String)> {
        let mut out = Vec::new();
        sealed.write_tar(&mut out).unwrap();
        tar::Archive::new(&out[..])
            .entries()
            .unwrap()
            .map(Result::unwrap)
            .filter(|e| e.header().entry_type() == EntryType::Symlink)
            .map(|e| {
                let target = e.link_name().unwrap().unwrap().display().to_string();
                (e.path().unwrap().display().to_string(), target)
            })
            .collect()
    }

    #[test]
    fn symlinks_out_of_the_context_or_archive_are_kept_as_links() {
        let dir = tempfile::tempdir().unwrap();
        let path = archive(
            dir.path(),
            &[("app/Dockerfile", "FROM scratch\n"), ("secret.txt", "s")],
            &[
                ("app/config", "/etc/passwd"),
                ("app/up", "../secret.txt"),
                ("app/out", "../../../x"),
            ],
        );
        let sealed = seal(
            &path,
            "/app",
            "/app/Dockerfile",
            LIMITS,
            CancellationToken::new(),
        )
        .unwrap();
        let links = stream_symlinks(&sealed);
        let want = [
            ("config", "/etc/passwd"),
            ("up", "../secret.txt"),
            ("out", "../../../x"),
        ];
        assert_eq!(links, want.map(|(n, t)| (n.to_owned(), t.to_owned())));
    }

    #[test]
    fn a_build_file_or_context_dir_through_an_absolute_link_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = archive(
            dir.path(),
            &[("app/x", "x")],
            &[("Dockerfile", "/etc/passwd"), ("ctx", "/etc")],
        );
        let cases = [
            ("/app", "/Dockerfile", "build_file /Dockerfile"),
            ("/ctx", "/app/x", "context_dir /ctx"),
        ];
        for (context_dir, build_file, named) in cases {
            let err = seal(
                &path,
                context_dir,
                build_file,
                LIMITS,
                CancellationToken::new(),
            )
            .map(|_| ())
            .unwrap_err();
            assert_eq!(err.code, ErrorCode::UnsafeSource, "{err}");
            assert!(err.message.contains(named), "{err}");
        }
    }

    #[test]
    fn a_symlink_target_longer_than_path_max_is_a_limit() {
        let dir = tempfile::tempdir().unwrap();
        let long = "x/".repeat(3000);
        let path = archive(
            dir.path(),
            &[("Dockerfile", "FROM scratch\n")],
            &[("l", &long)],
        );
        let err = seal(&path, "/", "/Dockerfile", LIMITS, CancellationToken::new())
            .map(|_| ())
            .unwrap_err();
        assert_eq!(err.code, ErrorCode::LimitExceeded, "{err}");
    }

    #[test]
    fn archive_paths_refuse_absolute_and_parent_components() {
        assert_eq!(
            archive_path(b"./a/b").unwrap(),
            Some(vec!["a".into(), "b".into()])
        );
        assert_eq!(archive_path(b"./").unwrap(), None);
        assert!(archive_path(b"/etc/passwd").is_err());
        assert!(archive_path(b"a/../../x").is_err());
        assert!(archive_path(b"a/..").is_err());
        assert!(archive_path(&[0xff, b'a']).is_err());
    }
}
