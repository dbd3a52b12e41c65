//! Resolving `context_dir` and `build_file` inside a source without leaving it.
//!
//! A source (git tree, archive index, local directory) answers lstat-like lookups through
//! [`SourceLookup`]; [`resolve`] walks the requested path component by component, follows a
//! symlink only while its target stays inside the source (relative targets, at most
//! [`MAX_SYMLINK_HOPS`] of them), and refuses an absolute target or one that climbs above the
//! root, naming the field (`context_dir`, `build_file`) and the link. A missing component is a
//! permanent error naming what was looked for and what the nearest existing directory holds.
//!
//! This is the only place a source's symlinks are followed: in the context stream every link
//! is sent as it is, whatever its target (see [`crate::context`]).

use crate::error::{ErrorCode, JobError, Stage};

/// Symlinks followed while resolving one path, as Linux's `MAXSYMLINKS`.
pub const MAX_SYMLINK_HOPS: usize = 40;

/// Names listed in a "not found" message at most.
const NEARBY_NAMES: usize = 20;

/// What a path names, without following a symlink at its end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    Dir,
    File,
    Symlink(String),
    /// Anything else (device, FIFO, socket, submodule…), with a word for it.
    Other(&'static str),
}

/// lstat-like access to a source tree by path components from its root.
pub trait SourceLookup {
    /// `None` when nothing is at `path`. `path` is empty for the root.
    fn lookup(&self, path: &[String]) -> Result<Option<Node>, JobError>;
    /// The names in directory `dir` (for error messages; empty when unknown).
    fn list(&self, dir: &[String]) -> Vec<String>;
}

/// A resolved path: its real components (symlinks replaced) and what is there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    pub path: Vec<String>,
    pub node: Node,
}

/// What is being resolved, for messages and the final check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    /// `context_dir`: must be a directory.
    ContextDir,
    /// `build_file`: must be a regular file.
    BuildFile,
}

impl Want {
    fn key(self) -> &'static str {
        match self {
            Want::ContextDir => "context_dir",
            Want::BuildFile => "build_file",
        }
    }
}

/// The components of an absolute or relative `/`-separated path, `.` and empty ones dropped.
pub fn components(path: &str) -> Vec<String> {
    path.split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .map(str::to_owned)
        .collect()
}

/// `/a/b` for components `[a, b]`, `/` for none.
pub fn display(path: &[String]) -> String {
    format!("/{}", path.join("/"))
}

/// Resolves `requested` (as in the job, e.g. `/app-one/Dockerfile`) inside `source`.
pub fn resolve(
    source: &dyn SourceLookup,
    requested: &str,
    want: Want,
) -> Result<Resolved, JobError> {
    let key = want.key();
    // Components still to walk, each with the symlink whose target it came from (an index
    // into `links`; `None`: from `requested`), so that a climb above the root names the link.
    let mut pending: std::collections::VecDeque<(String, Option<usize>)> = components(requested)
        .into_iter()
        .map(|part| (part, None))
        .collect();
    let mut links: Vec<String> = Vec::new();
    let mut current: Vec<String> = Vec::new();
    let mut node = Node::Dir;
    let mut hops = 0;
    while let Some((part, origin)) = pending.pop_front() {
        if part == ".." {
            if current.pop().is_none() {
                let why = match origin {
                    Some(link) => format!("{}, which climbs above the source root", links[link]),
                    None => "it climbs above the source root".to_owned(),
                };
                return Err(escape(key, requested, &why));
            }
            node = Node::Dir;
            continue;
        }
        current.push(part);
        let found = source.lookup(&current)?;
        match found {
            None => {
                let missing = display(&current);
                current.pop();
                let nearby = source.list(&current);
                let listing = if nearby.is_empty() {
                    "which is empty".to_owned()
                } else {
                    let mut names = nearby;
                    names.sort();
                    let more = names.len().saturating_sub(NEARBY_NAMES);
                    names.truncate(NEARBY_NAMES);
                    let mut text = format!("which holds {}", names.join(", "));
                    if more > 0 {
                        text.push_str(&format!(" and {more} more"));
                    }
                    text
                };
                return Err(JobError::permanent(
                    Stage::Seal,
                    ErrorCode::NotFound,
                    format!(
                        "{key} {requested} not found in the source: there is no {missing}; {} \
                         exists, {listing}",
                        display(&current),
                    ),
                ));
            }
            Some(Node::Symlink(target)) => {
                hops += 1;
                if hops > MAX_SYMLINK_HOPS {
                    return Err(JobError::permanent(
                        Stage::Seal,
                        ErrorCode::UnsafeSource,
                        format!("{key} {requested}: more than {MAX_SYMLINK_HOPS} symlinks"),
                    ));
                }
                if target.starts_with('/') {
                    return Err(escape(
                        key,
                        requested,
                        &format!(
                            "{} is a symlink to the absolute path {target}",
                            display(&current)
                        ),
                    ));
                }
                links.push(format!("{} is a symlink to {target}", display(&current)));
                current.pop();
                for part in components(&target).into_iter().rev() {
                    pending.push_front((part, Some(links.len() - 1)));
                }
                node = Node::Dir;
            }
            Some(Node::File) if !pending.is_empty() => {
                return Err(JobError::permanent(
                    Stage::Seal,
                    ErrorCode::NotFound,
                    format!(
                        "{key} {requested} not found in the source: {} is a file, not a directory",
                        display(&current)
                    ),
                ));
            }
            Some(Node::Other(what)) => {
                return Err(JobError::permanent(
                    Stage::Seal,
                    ErrorCode::UnsafeSource,
                    format!("{key} {requested}: {} is a {what}", display(&current)),
                ));
            }
            Some(other) => node = other,
        }
    }
    match (want, &node) {
        (Want::ContextDir, Node::Dir) | (Want::BuildFile, Node::File) => Ok(Resolved {
            path: current,
            node,
        }),
        (Want::ContextDir, _) => Err(JobError::permanent(
            Stage::Seal,
            ErrorCode::NotFound,
            format!("{key} {requested} is a file, not a directory"),
        )),
        (Want::BuildFile, _) => Err(JobError::permanent(
            Stage::Seal,
            ErrorCode::NotFound,
            format!("{key} {requested} is a directory, not a file"),
        )),
    }
}

fn escape(key: &str, requested: &str, why: &str) -> JobError {
    JobError::permanent(
        Stage::Seal,
        ErrorCode::UnsafeSource,
        format!("{key} {requested} leads outside the source: {why}"),
    )
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    /// A source from `path -> node` pairs; parents of every path are directories.
    struct Fake(BTreeMap<String, Node>);

    impl Fake {
        fn new(entries: &[(&str, Node)]) -> Fake {
            let mut map = BTreeMap::new();
            for (path, node) in entries {
                let parts = components(path);
                for i in 1..parts.len() {
                    map.entry(parts[..i].join("/")).or_insert(Node::Dir);
                }
                map.insert(parts.join("/"), node.clone());
            }
            Fake(map)
        }
    }

    impl SourceLookup for Fake {
        fn lookup(&self, path: &[String]) -> Result<Option<Node>, JobError> {
            Ok(self.0.get(&path.join("/")).cloned())
        }
        fn list(&self, dir: &[String]) -> Vec<String> {
            let prefix = if dir.is_empty() {
                String::new()
            } else {
                format!("{}/", dir.join("/"))
            };
            self.0
                .keys()
                .filter_map(|k| k.strip_prefix(&prefix))
                .filter(|rest| !rest.is_empty() && !rest.contains('/'))
                .map(str::to_owned)
                .collect()
        }
    }

    fn source() -> Fake {
        Fake::new(&[
            ("app-one/Dockerfile", Node::File),
            ("app-one/main.go", Node::File),
            ("current", Node::Symlink("app-one".into())),
            ("escape", Node::Symlink("../outside".into())),
            ("abs", Node::Symlink("/etc".into())),
            ("loop", Node::Symlink("loop".into())),
            (
                "docker/Dockerfile",
                Node::Symlink("../app-one/Dockerfile".into()),
            ),
            ("fifo", Node::Other("FIFO")),
            ("app-two/Dockerfile", Node::Symlink("/etc/passwd".into())),
            ("app-two/up", Node::Symlink("../../outside".into())),
        ])
    }

    #[test]
    fn the_root_is_a_context_dir() {
        let r = resolve(&source(), "/", Want::ContextDir).unwrap();
        assert!(r.path.is_empty());
    }

    #[test]
    fn a_plain_build_file_resolves_to_itself() {
        let r = resolve(&source(), "/app-one/Dockerfile", Want::BuildFile).unwrap();
        assert_eq!(r.path, ["app-one", "Dockerfile"]);
    }

    #[test]
    fn symlinks_inside_the_source_are_followed() {
        let r = resolve(&source(), "/current", Want::ContextDir).unwrap();
        assert_eq!(r.path, ["app-one"]);
        let r = resolve(&source(), "/docker/Dockerfile", Want::BuildFile).unwrap();
        assert_eq!(r.path, ["app-one", "Dockerfile"]);
    }

    /// Refused as `unsafe_source`, the message naming the field, the link and its target.
    fn assert_refused_naming(requested: &str, want: Want, words: &[&str]) {
        let err = resolve(&source(), requested, want).unwrap_err();
        assert_eq!(err.code, ErrorCode::UnsafeSource, "{err}");
        assert!(err.message.contains(want.key()), "{err}");
        assert!(err.message.contains("leads outside the source"), "{err}");
        for word in words {
            assert!(err.message.contains(word), "{word} missing: {err}");
        }
    }

    #[test]
    fn a_context_dir_through_a_symlink_out_of_the_source_is_refused() {
        assert_refused_naming("/abs", Want::ContextDir, &["/abs", "/etc"]);
        assert_refused_naming("/abs/app", Want::ContextDir, &["/abs", "/etc"]);
        assert_refused_naming("/escape/x", Want::ContextDir, &["/escape", "../outside"]);
    }

    #[test]
    fn a_build_file_through_a_symlink_out_of_the_source_is_refused() {
        assert_refused_naming("/abs/passwd", Want::BuildFile, &["/abs", "/etc"]);
        assert_refused_naming("/escape/Dockerfile", Want::BuildFile, &["../outside"]);
        assert_refused_naming(
            "/app-two/Dockerfile",
            Want::BuildFile,
            &["/app-two/Dockerfile", "/etc/passwd"],
        );
        assert_refused_naming(
            "/app-two/up/Dockerfile",
            Want::BuildFile,
            &["/app-two/up", "../../outside"],
        );
    }

    /// The link whose target climbs is named, not the last one followed on the way.
    #[test]
    fn a_climb_above_the_root_names_the_link_that_climbs() {
        let source = Fake::new(&[
            ("deep/x/Dockerfile", Node::File),
            ("a/b/c", Node::Symlink("../../deep".into())),
            ("top", Node::Symlink("a/b/c/../../../..".into())),
        ]);
        let err = resolve(&source, "/top/Dockerfile", Want::BuildFile).unwrap_err();
        assert_eq!(err.code, ErrorCode::UnsafeSource, "{err}");
        assert!(
            err.message
                .contains("/top is a symlink to a/b/c/../../../.."),
            "{err}"
        );
        assert!(!err.message.contains("../../deep,"), "{err}");
    }

    #[test]
    fn a_symlink_loop_stops() {
        let err = resolve(&source(), "/loop", Want::ContextDir).unwrap_err();
        assert_eq!(err.code, ErrorCode::UnsafeSource, "{err}");
    }

    #[test]
    fn a_missing_build_file_names_what_exists_nearby() {
        let err = resolve(&source(), "/app-one/Dockerfile.prod", Want::BuildFile).unwrap_err();
        assert_eq!(err.code, ErrorCode::NotFound);
        assert_eq!(err.class, crate::error::ErrorClass::Permanent);
        assert!(err.message.contains("/app-one/Dockerfile.prod"), "{err}");
        assert!(err.message.contains("Dockerfile, main.go"), "{err}");
    }

    #[test]
    fn a_file_is_not_a_context_dir_and_a_dir_is_not_a_build_file() {
        let err = resolve(&source(), "/app-one/main.go", Want::ContextDir).unwrap_err();
        assert!(err.message.contains("not a directory"), "{err}");
        let err = resolve(&source(), "/app-one", Want::BuildFile).unwrap_err();
        assert!(err.message.contains("not a file"), "{err}");
    }

    #[test]
    fn special_files_are_refused() {
        let err = resolve(&source(), "/fifo", Want::BuildFile).unwrap_err();
        assert_eq!(err.code, ErrorCode::UnsafeSource);
    }
}
