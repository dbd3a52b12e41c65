//! Build contexts: the rules every entry of a source must pass, and the tar stream a builder
//! receives (ARCHITECTURE §6).
//!
//! A source adapter (git tree, tar.gz archive, local directory) walks the entries below the
//! resolved context directory and hands each to a [`Sealer`], which applies `.dockerignore`,
//! the caps (entries, bytes, path depth, link target length) and the safety rules (hard links
//! stay inside the context; devices, FIFOs and sockets are refused), sanitises permissions,
//! and — when writing — appends the entry to an uncompressed tar stream.
//!
//! A symlink is sent as a symlink whatever its target, absolute or leaving the context, as
//! `docker build` sends it: nothing here follows a link, nothing untrusted is extracted on the
//! node, and BuildKit resolves links inside the context. A hard link is different (it carries
//! content), so one to a file outside the context is refused. The same walk runs twice:
//! once at seal time without an output, so that an unsafe or oversized source fails the seal
//! stage with a clear error, and again when the builder asks for the stream.
//!
//! This module must not touch the network or create files from a source's entries: nothing
//! untrusted is ever extracted onto the node.

pub mod dockerignore;
pub mod frontend;
pub mod resolve;

use std::collections::HashSet;
use std::io::{self, Read, Write};

use tokio_util::sync::CancellationToken;

use crate::config::SourcesConfig;
use crate::error::{ErrorCode, JobError, Stage};
use crate::workspace::random_hex;

pub use dockerignore::{DockerIgnore, MAX_DOCKERIGNORE_BYTES};

/// The name of the ignore file at the context root.
pub const DOCKERIGNORE: &str = ".dockerignore";

/// Longest name of one path component (NAME_MAX of Linux file systems).
pub const MAX_NAME_BYTES: usize = 255;

/// Longest path of an entry below the context root (PATH_MAX).
pub const MAX_PATH_BYTES: usize = 4096;

/// Longest symlink target (PATH_MAX); a longer one is refused as a limit.
pub const MAX_LINK_TARGET_BYTES: usize = 4096;

/// Caps on one build context.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_context_bytes: u64,
    pub max_entries: u64,
    pub max_path_depth: u32,
}

impl Limits {
    pub fn from_config(config: &SourcesConfig) -> Limits {
        Limits {
            max_context_bytes: config.max_context_bytes,
            max_entries: config.max_entries,
            max_path_depth: config.max_path_depth,
        }
    }
}

/// Permissions and time of an entry as the source states them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Meta {
    pub mode: u32,
    pub mtime: u64,
}

/// One entry of a source walk.
pub enum Entry<'a> {
    Dir,
    File {
        size: u64,
        content: &'a mut dyn Read,
    },
    Symlink {
        target: String,
    },
    /// A hard link to an earlier entry, by its path relative to the context root.
    HardLink {
        target: Vec<String>,
    },
    /// A device, FIFO, socket or another kind that never enters a context; the word names it.
    Special(&'static str),
}

/// Applies the context rules to a walk and, when given an output, writes the tar stream.
///
/// Every entry a walk visits counts against the caps, including those `.dockerignore` leaves
/// out: the caps bound the work a source makes the walk do, not only what is sent. The walk
/// stops with a `cancelled` error once `cancel` fires (job timeout, cancel request, shutdown).
pub struct Sealer<'w> {
    ignore: DockerIgnore,
    limits: Limits,
    cancel: CancellationToken,
    entries: u64,
    content_bytes: u64,
    out: Option<tar::Builder<Counter<'w>>>,
    /// Regular files written so far, for hard links (archives only; `None` elsewhere).
    files: Option<HashSet<String>>,
}

impl<'w> Sealer<'w> {
    /// A sealer that checks without writing.
    pub fn check(
        ignore: DockerIgnore,
        limits: Limits,
        track_files: bool,
        cancel: CancellationToken,
    ) -> Sealer<'w> {
        Sealer {
            ignore,
            limits,
            cancel,
            entries: 0,
            content_bytes: 0,
            out: None,
            files: track_files.then(HashSet::new),
        }
    }

    /// A sealer that checks and writes the tar stream to `out`.
    pub fn write(
        ignore: DockerIgnore,
        limits: Limits,
        track_files: bool,
        cancel: CancellationToken,
        out: &'w mut dyn Write,
    ) -> Sealer<'w> {
        let mut builder = tar::Builder::new(Counter {
            inner: out,
            bytes: 0,
        });
        builder.follow_symlinks(false);
        Sealer {
            out: Some(builder),
            ..Sealer::check(ignore, limits, track_files, cancel)
        }
    }

    /// A sealer for one walk: writing the tar stream to `out` when given, only checking
    /// otherwise.
    pub fn new(
        ignore: &DockerIgnore,
        limits: Limits,
        track_files: bool,
        cancel: &CancellationToken,
        out: Option<&'w mut dyn Write>,
    ) -> Sealer<'w> {
        let (ignore, cancel) = (ignore.clone(), cancel.clone());
        match out {
            Some(out) => Sealer::write(ignore, limits, track_files, cancel, out),
            None => Sealer::check(ignore, limits, track_files, cancel),
        }
    }

    /// The caps this sealer applies.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Whether a walk must look inside directory `rel` (already passed to [`Sealer::add`]): it
    /// is sent, or an exception could bring back something below it.
    pub fn descend(&self, rel: &[String]) -> bool {
        let name = rel.join("/");
        !self.ignore.is_excluded(&name) || self.ignore.may_keep_below(&name)
    }

    /// Visits `rel` for a walk that needs to know, before reading an entry's content, whether
    /// it is sent. An excluded entry is counted here (call nothing else for it) and `true` is
    /// returned; for an entry that is sent, `false`, and the walk then calls [`Sealer::add`].
    pub fn skip_excluded(&mut self, rel: &[String]) -> Result<bool, JobError> {
        let name = rel.join("/");
        if !self.ignore.is_excluded(&name) {
            return Ok(false);
        }
        self.count(rel, &name)?;
        Ok(true)
    }

    /// Checks one entry at `rel` (relative to the context root, not empty) and writes it.
    pub fn add(&mut self, rel: &[String], meta: Meta, entry: Entry<'_>) -> Result<(), JobError> {
        let name = rel.join("/");
        self.count(rel, &name)?;
        if self.ignore.is_excluded(&name) {
            return Ok(());
        }
        match entry {
            Entry::Special(what) => Err(unsafe_entry(&name, &format!("it is a {what}"))),
            Entry::Dir => self.append(
                &format!("{name}/"),
                tar::EntryType::Directory,
                dir_mode(meta),
                meta.mtime,
                0,
                &mut io::empty(),
                None,
            ),
            Entry::File { size, content } => {
                self.content_bytes = self.content_bytes.saturating_add(size);
                if self.content_bytes > self.limits.max_context_bytes {
                    return Err(limit(format!(
                        "the build context holds more than {} bytes (sources.max_context_bytes)",
                        self.limits.max_context_bytes
                    )));
                }
                if let Some(files) = &mut self.files {
                    files.insert(name.clone());
                }
                self.append(
                    &name,
                    tar::EntryType::Regular,
                    file_mode(meta.mode),
                    meta.mtime,
                    size,
                    content,
                    None,
                )
            }
            Entry::Symlink { target } => {
                check_link_target(&name, &target)?;
                self.append(
                    &name,
                    tar::EntryType::Symlink,
                    0o777,
                    meta.mtime,
                    0,
                    &mut io::empty(),
                    Some(&target),
                )
            }
            Entry::HardLink { target } => {
                let target_name = target.join("/");
                let known = self
                    .files
                    .as_ref()
                    .is_some_and(|f| f.contains(&target_name));
                if !known {
                    return Err(unsafe_entry(
                        &name,
                        &format!(
                            "it is a hard link to {target_name:?}, which is not a file sent \
                             earlier in the context (outside it, excluded by .dockerignore, or \
                             later in the archive)"
                        ),
                    ));
                }
                self.append(
                    &name,
                    tar::EntryType::Link,
                    file_mode(meta.mode),
                    meta.mtime,
                    0,
                    &mut io::empty(),
                    Some(&target_name),
                )
            }
        }
    }

    /// Adds the build file under a reserved name (it lies outside the context), whatever
    /// `.dockerignore` says.
    pub fn add_build_file(
        &mut self,
        name: &str,
        meta: Meta,
        size: u64,
        content: &mut dyn Read,
    ) -> Result<(), JobError> {
        self.count(&[name.to_owned()], name)?;
        self.content_bytes = self.content_bytes.saturating_add(size);
        self.append(
            name,
            tar::EntryType::Regular,
            file_mode(meta.mode),
            meta.mtime,
            size,
            content,
            None,
        )
    }

    /// Ends the stream; returns the bytes written (0 when only checking).
    pub fn finish(self) -> Result<u64, JobError> {
        match self.out {
            None => Ok(0),
            Some(builder) => {
                let counter = builder.into_inner().map_err(write_error)?;
                Ok(counter.bytes)
            }
        }
    }

    /// Counts one visited entry against the caps; also where the walk notices cancellation.
    fn count(&mut self, rel: &[String], name: &str) -> Result<(), JobError> {
        if self.cancel.is_cancelled() {
            return Err(JobError::cancelled(Stage::Seal));
        }
        self.entries += 1;
        if self.entries > self.limits.max_entries {
            return Err(limit(format!(
                "the build context has more than {} entries (sources.max_entries)",
                self.limits.max_entries
            )));
        }
        if rel.len() > self.limits.max_path_depth as usize {
            return Err(limit(format!(
                "{name:?} is more than {} directories deep (sources.max_path_depth)",
                self.limits.max_path_depth
            )));
        }
        if let Some(part) = rel.iter().find(|p| p.len() > MAX_NAME_BYTES) {
            let shown: String = part.chars().take(64).collect();
            return Err(limit(format!(
                "an entry's name ({shown:?}…) is longer than {MAX_NAME_BYTES} bytes"
            )));
        }
        if name.len() > MAX_PATH_BYTES {
            let shown: String = name.chars().take(64).collect();
            return Err(limit(format!(
                "the path {shown:?}… is longer than {MAX_PATH_BYTES} bytes"
            )));
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn append(
        &mut self,
        name: &str,
        kind: tar::EntryType,
        mode: u32,
        mtime: u64,
        size: u64,
        content: &mut dyn Read,
        link: Option<&str>,
    ) -> Result<(), JobError> {
        let Some(builder) = &mut self.out else {
            return Ok(());
        };
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(kind);
        header.set_mode(mode);
        header.set_mtime(mtime);
        header.set_uid(0);
        header.set_gid(0);
        header.set_size(size);
        let result = match link {
            Some(target) => builder.append_link(&mut header, name, target),
            // A source that yields fewer bytes than it announced would corrupt the stream;
            // `take` plus the length check below catch one that yields more or fewer.
            None => {
                let mut limited = CountingReader {
                    inner: content.take(size),
                    read: 0,
                };
                let r = builder.append_data(&mut header, name, &mut limited);
                if r.is_ok() && limited.read != size {
                    return Err(JobError::transient(
                        Stage::Seal,
                        ErrorCode::Internal,
                        format!("{name:?}: read {} bytes of {size}", limited.read),
                    ));
                }
                r
            }
        };
        result.map_err(write_error)
    }
}

/// Checks the target of the symlink `name` before it is sent. Any path is accepted, absolute
/// or leaving the context: the link is sent as a link and never followed (see the module docs).
/// Refused: a target that is no path at all (empty, or holding a NUL byte), and one longer than
/// [`MAX_LINK_TARGET_BYTES`] (a limit).
pub fn check_link_target(name: &str, target: &str) -> Result<(), JobError> {
    if target.is_empty() {
        return Err(unsafe_entry(name, "it is a symlink with an empty target"));
    }
    if target.contains('\0') {
        return Err(unsafe_entry(
            name,
            "it is a symlink whose target holds a NUL byte",
        ));
    }
    if target.len() > MAX_LINK_TARGET_BYTES {
        return Err(limit(format!(
            "the symlink {name:?} has a target longer than {MAX_LINK_TARGET_BYTES} bytes"
        )));
    }
    Ok(())
}

/// The `.dockerignore` of a context: read from `found` when the context has one (`None`: it
/// has none, and nothing is ignored). See [`DockerIgnore::load`] for the caps.
pub fn load_dockerignore(found: Option<impl Read>) -> Result<DockerIgnore, JobError> {
    match found {
        Some(mut file) => DockerIgnore::load(&mut file),
        None => Ok(DockerIgnore::default()),
    }
}

/// The build file's place in the context stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildFileName {
    /// Its name in the stream.
    pub name: String,
    /// It lies outside the context directory: `name` is a reserved name at the context root,
    /// and the source adds the file under it after the walk.
    pub outside: bool,
}

/// Names the build file at `build_file` (from the source root) in the stream of the context
/// at `context`, and makes `ignore` keep it and `.dockerignore` itself, as the docker CLI
/// does: both are always sent.
pub fn name_build_file(
    context: &[String],
    build_file: &[String],
    ignore: &mut DockerIgnore,
) -> BuildFileName {
    let placed = match build_file.strip_prefix(context) {
        Some(inside) => {
            let name = inside.join("/");
            ignore.keep(&name);
            BuildFileName {
                name,
                outside: false,
            }
        }
        None => BuildFileName {
            name: format!(".dockerfile.{}", random_hex(10)),
            outside: true,
        },
    };
    ignore.keep(DOCKERIGNORE);
    placed
}

/// Regular files: permission bits only, without setuid/setgid/sticky and world-write.
pub fn file_mode(mode: u32) -> u32 {
    mode & 0o775
}

fn dir_mode(meta: Meta) -> u32 {
    // A directory the owner cannot enter would break the build's COPY; keep u+rwx.
    (meta.mode & 0o775) | 0o700
}

/// An error naming an entry that breaks a rule.
pub fn unsafe_entry(name: &str, why: &str) -> JobError {
    JobError::permanent(
        Stage::Seal,
        ErrorCode::UnsafeSource,
        format!("refused entry {name:?}: {why}"),
    )
}

pub fn limit(message: String) -> JobError {
    JobError::permanent(Stage::Seal, ErrorCode::LimitExceeded, message)
}

pub(crate) fn write_error(e: io::Error) -> JobError {
    let (code, class) = crate::error::classify_io(&e);
    JobError::new(
        Stage::Seal,
        code,
        format!("writing the build context failed: {e}"),
    )
    .with_class(class)
}

struct Counter<'w> {
    inner: &'w mut dyn Write,
    bytes: u64,
}

impl Write for Counter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

struct CountingReader<R> {
    inner: R,
    read: u64,
}

impl<R: Read> Read for CountingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(path: &str) -> Vec<String> {
        resolve::components(path)
    }

    const LIMITS: Limits = Limits {
        max_context_bytes: 100,
        max_entries: 3,
        max_path_depth: 2,
    };
    const META: Meta = Meta {
        mode: 0o6777,
        mtime: 1,
    };

    fn live() -> CancellationToken {
        CancellationToken::new()
    }

    /// A sealer with no ignore rules and [`LIMITS`], that only checks.
    fn checker() -> Sealer<'static> {
        Sealer::check(DockerIgnore::default(), LIMITS, false, live())
    }

    /// The error of a new [`checker`] given `entry` at `rel`.
    fn refusal(rel: &str, entry: Entry<'_>) -> JobError {
        checker().add(&parts(rel), META, entry).unwrap_err()
    }

    /// The tar entries of a stream: (path, kind byte, link target).
    fn stream_links(out: &[u8]) -> Vec<(String, u8, Option<String>)> {
        tar::Archive::new(out)
            .entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (
                    e.path().unwrap().display().to_string(),
                    e.header().entry_type().as_byte(),
                    e.link_name().unwrap().map(|l| l.display().to_string()),
                )
            })
            .collect()
    }

    #[test]
    fn symlinks_are_sent_as_symlinks_whatever_their_target() {
        let targets = [
            ("a/in", "../b"),
            ("a/up", "../../x"),
            ("abs", "/etc/passwd"),
            ("abs-dir", "/etc/"),
        ];
        let limits = Limits {
            max_entries: 10,
            ..LIMITS
        };
        let mut out = Vec::new();
        let mut s = Sealer::write(DockerIgnore::default(), limits, false, live(), &mut out);
        for (name, target) in targets {
            let target = target.to_owned();
            s.add(&parts(name), META, Entry::Symlink { target })
                .unwrap();
        }
        s.finish().unwrap();
        let got = stream_links(&out);
        let want: Vec<_> = targets
            .iter()
            .map(|(name, target)| (name.to_string(), b'2', Some(target.to_string())))
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn a_symlink_without_a_usable_target_is_refused() {
        for target in ["", "a\0b"] {
            let err = refusal(
                "link",
                Entry::Symlink {
                    target: target.into(),
                },
            );
            assert_eq!(err.code, ErrorCode::UnsafeSource, "{target:?}: {err}");
            assert!(err.message.contains("\"link\""), "{err}");
        }
    }

    #[test]
    fn a_symlink_target_longer_than_path_max_is_a_limit() {
        let target = "t/".repeat(MAX_LINK_TARGET_BYTES / 2) + "t";
        let err = refusal("link", Entry::Symlink { target });
        assert_eq!(err.code, ErrorCode::LimitExceeded, "{err}");
        let target = "t".repeat(MAX_LINK_TARGET_BYTES);
        checker()
            .add(&parts("link"), META, Entry::Symlink { target })
            .unwrap();
    }

    #[test]
    fn setuid_setgid_sticky_and_world_write_are_cleared() {
        assert_eq!(file_mode(0o6777), 0o775);
        assert_eq!(file_mode(0o1644), 0o644);
        assert_eq!(
            dir_mode(Meta {
                mode: 0o1777,
                mtime: 0
            }),
            0o775
        );
    }

    #[test]
    fn the_entry_cap_stops_the_walk() {
        let mut s = checker();
        for name in ["a", "b", "c"] {
            s.add(&parts(name), META, Entry::Dir).unwrap();
        }
        let err = s.add(&parts("d"), META, Entry::Dir).unwrap_err();
        assert_eq!(err.code, ErrorCode::LimitExceeded);
    }

    #[test]
    fn the_byte_cap_stops_the_walk() {
        let err = refusal(
            "big",
            Entry::File {
                size: 101,
                content: &mut io::empty(),
            },
        );
        assert_eq!(err.code, ErrorCode::LimitExceeded);
    }

    #[test]
    fn the_depth_cap_stops_the_walk() {
        let err = refusal("a/b/c", Entry::Dir);
        assert_eq!(err.code, ErrorCode::LimitExceeded);
    }

    #[test]
    fn special_files_are_refused_by_name() {
        let err = refusal("pipe", Entry::Special("FIFO"));
        assert_eq!(err.code, ErrorCode::UnsafeSource);
        assert!(err.message.contains("\"pipe\""), "{err}");
    }

    #[test]
    fn ignored_entries_are_not_checked() {
        let mut s = Sealer::check(DockerIgnore::parse("tmp"), LIMITS, false, live());
        s.add(&parts("tmp/sock"), META, Entry::Special("socket"))
            .unwrap();
    }

    #[test]
    fn ignored_entries_count_against_the_entry_and_depth_caps() {
        let mut s = Sealer::check(DockerIgnore::parse("*"), LIMITS, false, live());
        for name in ["a", "b", "c"] {
            assert!(s.skip_excluded(&parts(name)).unwrap());
        }
        let err = s.add(&parts("d"), META, Entry::Dir).unwrap_err();
        assert_eq!(err.code, ErrorCode::LimitExceeded);

        let mut s = Sealer::check(DockerIgnore::parse("*"), LIMITS, false, live());
        let err = s.skip_excluded(&parts("x/y/z")).unwrap_err();
        assert_eq!(err.code, ErrorCode::LimitExceeded);
    }

    #[test]
    fn an_excluded_directory_is_not_descended_unless_something_below_is_kept() {
        let mut ignore = DockerIgnore::parse("*");
        ignore.keep("docker/Dockerfile");
        let s = Sealer::check(ignore, LIMITS, false, live());
        assert!(s.descend(&parts("docker")));
        assert!(!s.descend(&parts("node_modules")));
    }

    #[test]
    fn long_names_and_paths_are_refused_as_limits() {
        let limits = Limits {
            max_path_depth: 64,
            max_entries: 100,
            ..LIMITS
        };
        let mut s = Sealer::check(DockerIgnore::parse("*"), limits, false, live());
        let long = "n".repeat(MAX_NAME_BYTES + 1);
        let err = s.skip_excluded(&parts(&long)).unwrap_err();
        assert_eq!(err.code, ErrorCode::LimitExceeded);
        let deep = vec!["d".repeat(MAX_NAME_BYTES); 17].join("/");
        let err = s.add(&parts(&deep), META, Entry::Dir).unwrap_err();
        assert_eq!(err.code, ErrorCode::LimitExceeded);
    }

    #[test]
    fn a_cancelled_walk_stops_at_the_next_entry() {
        let cancel = CancellationToken::new();
        let mut s = Sealer::check(DockerIgnore::parse("*"), LIMITS, false, cancel.clone());
        assert!(s.skip_excluded(&parts("a")).unwrap());
        cancel.cancel();
        let err = s.skip_excluded(&parts("b")).unwrap_err();
        assert_eq!(err.class, crate::error::ErrorClass::Cancelled);
    }

    #[test]
    fn a_hard_link_to_an_unsent_file_is_refused() {
        let mut s = Sealer::check(DockerIgnore::default(), LIMITS, true, live());
        let err = s
            .add(
                &parts("link"),
                META,
                Entry::HardLink {
                    target: parts("missing"),
                },
            )
            .unwrap_err();
        assert_eq!(err.code, ErrorCode::UnsafeSource);
    }

    #[test]
    fn the_stream_holds_sanitised_entries() {
        let mut out = Vec::new();
        // Four entries visited (the excluded one counts too).
        let limits = Limits {
            max_entries: 4,
            ..LIMITS
        };
        let mut s = Sealer::write(DockerIgnore::parse("skip"), limits, true, live(), &mut out);
        s.add(&parts("dir"), META, Entry::Dir).unwrap();
        s.add(
            &parts("dir/f"),
            META,
            Entry::File {
                size: 2,
                content: &mut &b"hi"[..],
            },
        )
        .unwrap();
        s.add(&parts("skip"), META, Entry::Dir).unwrap();
        s.add(
            &parts("l"),
            META,
            Entry::Symlink {
                target: "dir/f".into(),
            },
        )
        .unwrap();
        let written = s.finish().unwrap();
        assert_eq!(written, out.len() as u64);
        let mut archive = tar::Archive::new(&out[..]);
        let got: Vec<(String, u32)> = archive
            .entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (
                    e.path().unwrap().display().to_string(),
                    e.header().mode().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("dir/".to_owned(), 0o775),
                ("dir/f".to_owned(), 0o775),
                ("l".to_owned(), 0o777)
            ]
        );
    }
}
