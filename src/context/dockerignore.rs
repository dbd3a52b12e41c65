//! `.dockerignore`, with the semantics of moby's `patternmatcher` (the docker CLI and BuildKit).
//!
//! * Lines starting with `#` are comments; lines are trimmed; empty lines are skipped.
//! * `!pattern` is an exception: it re-includes what an earlier pattern excluded.
//! * Patterns are cleaned like Go's `filepath.Clean` and a leading `/` is dropped, so `/a` and
//!   `a` are the same pattern, both anchored at the context root.
//! * `*` matches any run of characters except `/`; `?` one character except `/`; `[...]` a
//!   class (`[!...]`/`[^...]` negated, `a-z` ranges); `\` escapes the next character; `**`
//!   matches any number of path components (`**/` may match none; a trailing `**` matches
//!   everything below).
//! * A path is excluded when the last pattern that matches it, or one of its parent
//!   directories, is an exclusion ("last match wins").
//!
//! BuildKit does not apply `.dockerignore` to an uploaded context (ARCHITECTURE §10), so the
//! sealer applies it when the stream is made.
//!
//! A source's `.dockerignore` is hostile input: [`DockerIgnore::load`] caps the file and each
//! pattern, so that matching (tokens × characters states per path) stays small.

use std::io::Read;

use crate::context::{limit, DOCKERIGNORE};
use crate::error::JobError;

/// Largest `.dockerignore` read; a bigger one is refused rather than buffered.
pub const MAX_DOCKERIGNORE_BYTES: u64 = 1 << 20;

/// Longest pattern line: as long as the longest path the sealer sends (PATH_MAX).
pub const MAX_PATTERN_BYTES: usize = 4096;

/// A parsed `.dockerignore`.
#[derive(Debug, Clone, Default)]
pub struct DockerIgnore {
    patterns: Vec<Pattern>,
}

#[derive(Debug, Clone)]
struct Pattern {
    exclusion: bool,
    tokens: Vec<Token>,
    /// The path of an exception added by [`DockerIgnore::keep`] (matches that path only).
    kept: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Literal(char),
    /// `*`: any run without `/`.
    Star,
    /// `?`: one character, not `/`.
    AnyChar,
    /// `[...]`.
    Class {
        negated: bool,
        ranges: Vec<(char, char)>,
    },
    /// `**/` (or `**` followed by more pattern): `(.*/)?`.
    AnyDirs,
    /// A trailing `**`: `.*`.
    AnyTail,
}

impl DockerIgnore {
    /// Reads a source's `.dockerignore` from `reader`: at most [`MAX_DOCKERIGNORE_BYTES`], no
    /// pattern longer than [`MAX_PATTERN_BYTES`]; either is refused as `limit_exceeded`.
    pub fn load(reader: &mut dyn std::io::Read) -> Result<DockerIgnore, JobError> {
        let mut bytes = Vec::new();
        reader
            .take(MAX_DOCKERIGNORE_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| {
                JobError::transient(
                    crate::error::Stage::Seal,
                    crate::error::ErrorCode::LocalIo,
                    format!("reading {DOCKERIGNORE} failed: {e}"),
                )
            })?;
        if bytes.len() as u64 > MAX_DOCKERIGNORE_BYTES {
            return Err(limit(format!(
                "{DOCKERIGNORE} is larger than {MAX_DOCKERIGNORE_BYTES} bytes"
            )));
        }
        let text = String::from_utf8_lossy(&bytes);
        if let Some((n, _)) = text
            .lines()
            .enumerate()
            .find(|(_, l)| l.len() > MAX_PATTERN_BYTES)
        {
            return Err(limit(format!(
                "{DOCKERIGNORE} line {} is longer than {MAX_PATTERN_BYTES} bytes",
                n + 1
            )));
        }
        Ok(DockerIgnore::parse(&text))
    }

    /// Parses the file's text. Never fails: a malformed class is taken literally.
    pub fn parse(text: &str) -> DockerIgnore {
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let mut patterns = Vec::new();
        for line in text.lines() {
            if line.starts_with('#') {
                continue;
            }
            let mut pattern = line.trim();
            if pattern.is_empty() {
                continue;
            }
            let exception = pattern.starts_with('!');
            if exception {
                pattern = pattern[1..].trim();
            }
            if pattern.is_empty() {
                continue;
            }
            let mut cleaned = clean(pattern);
            if cleaned.len() > 1 && cleaned.starts_with('/') {
                cleaned.remove(0);
            }
            patterns.push(Pattern {
                exclusion: exception,
                tokens: compile(&cleaned),
                kept: None,
            });
        }
        DockerIgnore { patterns }
    }

    /// Adds an exception for `path` at the end, as the docker CLI does for the build file and
    /// `.dockerignore` itself, which are always sent.
    pub fn keep(&mut self, path: &str) {
        self.patterns.push(Pattern {
            exclusion: true,
            tokens: compile(&escape(path)),
            kept: Some(path.to_owned()),
        });
    }

    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    /// Whether an exception could bring back something below the directory `dir`, so that an
    /// excluded `dir` must still be walked: any exception from the file itself, or a kept path
    /// (the build file, `.dockerignore`) below `dir`.
    pub fn may_keep_below(&self, dir: &str) -> bool {
        self.patterns.iter().any(|p| match (&p.kept, p.exclusion) {
            (_, false) => false,
            (None, true) => true,
            (Some(path), true) => path
                .strip_prefix(dir)
                .is_some_and(|rest| rest.starts_with('/')),
        })
    }

    /// Whether `path` (relative to the context root, `/`-separated, no leading `/`) is left out
    /// of the context: `MatchesOrParentMatches` of moby's patternmatcher.
    pub fn is_excluded(&self, path: &str) -> bool {
        let mut matched = false;
        for pattern in &self.patterns {
            // An exception only matters once something matched, an exclusion only before.
            if pattern.exclusion != matched {
                continue;
            }
            if matches_path_or_parent(&pattern.tokens, path) {
                matched = !pattern.exclusion;
            }
        }
        matched
    }
}

/// Go's `filepath.Clean` on a `/`-separated path.
fn clean(path: &str) -> String {
    let rooted = path.starts_with('/');
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                if parts.last().is_some_and(|p| *p != "..") {
                    parts.pop();
                } else if !rooted {
                    parts.push("..");
                }
            }
            other => parts.push(other),
        }
    }
    let joined = parts.join("/");
    match (rooted, joined.is_empty()) {
        (true, _) => format!("/{joined}"),
        (false, true) => ".".to_owned(),
        (false, false) => joined,
    }
}

fn escape(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for c in path.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn compile(pattern: &str) -> Vec<Token> {
    let chars: Vec<char> = pattern.chars().collect();
    let mut tokens = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        match chars[i] {
            '*' if chars.get(i + 1) == Some(&'*') => {
                i += 2;
                if chars.get(i) == Some(&'/') {
                    i += 1;
                }
                if i >= chars.len() {
                    tokens.push(Token::AnyTail);
                } else {
                    tokens.push(Token::AnyDirs);
                }
                continue;
            }
            '*' => tokens.push(Token::Star),
            '?' => tokens.push(Token::AnyChar),
            '\\' if i + 1 < chars.len() => {
                i += 1;
                tokens.push(Token::Literal(chars[i]));
            }
            '[' => match parse_class(&chars[i + 1..]) {
                Some((token, used)) => {
                    tokens.push(token);
                    i += used + 1;
                    continue;
                }
                None => tokens.push(Token::Literal('[')),
            },
            c => tokens.push(Token::Literal(c)),
        }
        i += 1;
    }
    tokens
}

/// Parses a class after its `[`; returns the token and the characters used, `]` included.
fn parse_class(chars: &[char]) -> Option<(Token, usize)> {
    let mut i = 0;
    let negated = matches!(chars.first(), Some('!') | Some('^'));
    if negated {
        i += 1;
    }
    let mut ranges = Vec::new();
    let mut first = true;
    while i < chars.len() {
        let mut c = chars[i];
        if c == ']' && !first {
            return Some((Token::Class { negated, ranges }, i + 1));
        }
        first = false;
        if c == '\\' && i + 1 < chars.len() {
            i += 1;
            c = chars[i];
        }
        if chars.get(i + 1) == Some(&'-') && chars.get(i + 2).is_some_and(|e| *e != ']') {
            let mut end = chars[i + 2];
            let mut used = 3;
            if end == '\\' {
                end = *chars.get(i + 3)?;
                used = 4;
            }
            ranges.push((c, end));
            i += used;
        } else {
            ranges.push((c, c));
            i += 1;
        }
    }
    None
}

/// Whether `tokens` match `text` whole or any of its parent directories (`text` up to one of
/// its `/`). One pass over `text` with the set of pattern positions reached so far (a Thompson
/// simulation), so the cost is tokens × characters however deep the path: a walk of a deep tree
/// stays linear in each path's length instead of matching every parent again from the start.
fn matches_path_or_parent(tokens: &[Token], text: &str) -> bool {
    let mut now = vec![false; tokens.len() + 1];
    let mut next = vec![false; tokens.len() + 1];
    now[0] = true;
    close(tokens, &mut now);
    for c in text.chars() {
        if c == '/' && accepts(tokens, &now) {
            return true;
        }
        next.fill(false);
        for (t, token) in tokens.iter().enumerate() {
            if !now[t] {
                continue;
            }
            match token {
                Token::Literal(l) if *l == c => next[t + 1] = true,
                Token::Literal(_) => {}
                Token::AnyChar => next[t + 1] |= c != '/',
                Token::Class { negated, ranges } => {
                    next[t + 1] |=
                        c != '/' && ranges.iter().any(|(lo, hi)| *lo <= c && c <= *hi) != *negated;
                }
                Token::Star => next[t] |= c != '/',
                Token::AnyTail => next[t] = true,
                Token::AnyDirs => {
                    next[t] = true;
                    next[t + 1] |= c == '/';
                }
            }
        }
        close(tokens, &mut next);
        if !next.contains(&true) {
            return false;
        }
        std::mem::swap(&mut now, &mut next);
    }
    accepts(tokens, &now)
}

/// Adds the positions reachable without reading a character: past a `*` or a `**/` that
/// matches nothing.
fn close(tokens: &[Token], set: &mut [bool]) {
    for (t, token) in tokens.iter().enumerate() {
        if set[t] && matches!(token, Token::Star | Token::AnyDirs) {
            set[t + 1] = true;
        }
    }
}

/// Whether the set holds the end of the pattern, or a trailing `**` that matches the rest.
fn accepts(tokens: &[Token], set: &[bool]) -> bool {
    set[tokens.len()]
        || tokens
            .iter()
            .enumerate()
            .any(|(t, token)| set[t] && matches!(token, Token::AnyTail))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn excluded(ignore: &str, path: &str) -> bool {
        DockerIgnore::parse(ignore).is_excluded(path)
    }

    #[test]
    fn star_stays_within_one_component() {
        assert!(excluded("*.md", "README.md"));
        assert!(!excluded("*.md", "docs/README.md"));
        assert!(excluded("*/*.md", "docs/README.md"));
    }

    #[test]
    fn question_mark_is_one_character_but_not_a_slash() {
        assert!(excluded("fil?", "file"));
        assert!(!excluded("fil?", "fil"));
        assert!(!excluded("a?b", "a/b"));
    }

    #[test]
    fn double_star_spans_any_number_of_directories() {
        assert!(excluded("**/*.go", "main.go"));
        assert!(excluded("**/*.go", "a/b/c/main.go"));
        assert!(excluded("a/**/z", "a/z"));
        assert!(excluded("a/**/z", "a/b/c/z"));
        assert!(excluded("a/**", "a/b/c"));
        assert!(!excluded("a/**/z", "b/z"));
        assert!(excluded("**", "a/b"));
        assert!(excluded("**/keep", "d/d/keep"));
        assert!(excluded("**/keep", "d/keep/x"));
        assert!(!excluded("**/keep", "d/keeper"));
        assert!(excluded("a/**/b", "a/x/b/c"));
        assert!(excluded("a/**/b/*", "a/b/c"));
        assert!(!excluded("a/**/b/*", "a/b"));
    }

    /// A parent that matches excludes its contents at any depth, and a path thousands of
    /// components deep is matched whole (one pass, not once per parent).
    #[test]
    fn parents_match_at_any_depth() {
        assert!(excluded("a*", "ab/c"));
        assert!(!excluded("a*", "b/c"));
        let deep = vec!["d"; 2000].join("/");
        assert!(excluded("d/d", &format!("{deep}/f")));
        assert!(excluded(&format!("{deep}/f"), &format!("{deep}/f")));
        assert!(!excluded(&format!("{deep}/g"), &format!("{deep}/f")));
        assert!(excluded("**/f", &format!("{deep}/f")));
    }

    #[test]
    fn a_matching_parent_directory_excludes_its_contents() {
        assert!(excluded("node_modules", "node_modules/x/index.js"));
        assert!(excluded("build/out", "build/out/bin/app"));
        assert!(!excluded("build/out", "build/outside"));
    }

    #[test]
    fn leading_slash_and_dot_components_are_cleaned() {
        assert!(excluded("/secret.txt", "secret.txt"));
        assert!(excluded("./a/../b", "b"));
        assert!(excluded("dir/", "dir/file"));
    }

    #[test]
    fn the_last_matching_pattern_wins() {
        let ignore = "*.md\n!README.md\n";
        assert!(excluded(ignore, "CHANGES.md"));
        assert!(!excluded(ignore, "README.md"));
        assert!(excluded("!README.md\n*.md", "README.md"));
        assert!(!excluded("docs\n!docs/keep.txt", "docs/keep.txt"));
        assert!(excluded("docs\n!docs/keep.txt", "docs/other.txt"));
    }

    #[test]
    fn comments_blank_lines_and_whitespace_are_ignored() {
        let ignore = "# a comment\n\n   \n  tmp  \n";
        assert!(excluded(ignore, "tmp"));
        assert!(!excluded(ignore, "# a comment"));
    }

    #[test]
    fn character_classes_and_escapes() {
        assert!(excluded("log[0-9].txt", "log7.txt"));
        assert!(!excluded("log[0-9].txt", "logx.txt"));
        assert!(excluded("log[!0-9].txt", "logx.txt"));
        assert!(excluded("\\*star", "*star"));
        assert!(!excluded("\\*star", "xstar"));
    }

    #[test]
    fn an_excluded_directory_is_walked_only_when_something_below_it_may_be_kept() {
        let mut ignore = DockerIgnore::parse("*\n");
        ignore.keep("docker/Dockerfile");
        ignore.keep(".dockerignore");
        assert!(ignore.may_keep_below("docker"));
        assert!(!ignore.may_keep_below("dock"));
        assert!(!ignore.may_keep_below("node_modules"));
        let with_exception = DockerIgnore::parse("*\n!**/keep.txt\n");
        assert!(with_exception.may_keep_below("node_modules"));
    }

    #[test]
    fn an_oversized_file_or_pattern_is_refused_as_a_limit() {
        let big = vec![b'#'; MAX_DOCKERIGNORE_BYTES as usize + 1];
        let err = DockerIgnore::load(&mut &big[..]).unwrap_err();
        assert_eq!(err.code, crate::error::ErrorCode::LimitExceeded);
        let long_line = format!("ok\n{}\n", "a".repeat(MAX_PATTERN_BYTES + 1));
        let err = DockerIgnore::load(&mut long_line.as_bytes()).unwrap_err();
        assert_eq!(err.code, crate::error::ErrorCode::LimitExceeded);
        assert!(err.message.contains("line 2"), "{err}");
        let fine = DockerIgnore::load(&mut &b"*.log\n"[..]).unwrap();
        assert!(fine.is_excluded("a.log"));
    }

    #[test]
    fn kept_paths_survive_any_exclusion() {
        let mut ignore = DockerIgnore::parse("*\n");
        ignore.keep("Dockerfile");
        ignore.keep(".dockerignore");
        assert!(!ignore.is_excluded("Dockerfile"));
        assert!(!ignore.is_excluded(".dockerignore"));
        assert!(ignore.is_excluded("src"));
    }
}
