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

/// A parsed `.dockerignore`.
#[derive(Debug, Clone, Default)]
pub struct DockerIgnore {
    patterns: Vec<Pattern>,
}

#[derive(Debug, Clone)]
struct Pattern {
    exclusion: bool,
    tokens: Vec<Token>,
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
        });
    }

    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    /// True when some pattern is an exception, so an excluded directory must still be walked.
    pub fn has_exceptions(&self) -> bool {
        self.patterns.iter().any(|p| p.exclusion)
    }

    /// Whether `path` (relative to the context root, `/`-separated, no leading `/`) is left out
    /// of the context: `MatchesOrParentMatches` of moby's patternmatcher.
    pub fn is_excluded(&self, path: &str) -> bool {
        let parents: Vec<&str> = match path.rfind('/') {
            Some(i) => path[..i].split('/').collect(),
            None => Vec::new(),
        };
        let mut matched = false;
        for pattern in &self.patterns {
            // An exception only matters once something matched, an exclusion only before.
            if pattern.exclusion != matched {
                continue;
            }
            let mut hit = matches(&pattern.tokens, path);
            if !hit {
                let mut prefix = String::new();
                for (i, dir) in parents.iter().enumerate() {
                    if i > 0 {
                        prefix.push('/');
                    }
                    prefix.push_str(dir);
                    if matches(&pattern.tokens, &prefix) {
                        hit = true;
                        break;
                    }
                }
            }
            if hit {
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

/// Whole-string match of `tokens` against `text`, by backtracking with memoisation (paths are
/// short, patterns shorter: at most tokens × characters states).
fn matches(tokens: &[Token], text: &str) -> bool {
    let chars: Vec<char> = text.chars().collect();
    let mut seen = vec![false; (tokens.len() + 1) * (chars.len() + 1)];
    match_at(tokens, &chars, 0, 0, &mut seen)
}

fn match_at(tokens: &[Token], text: &[char], t: usize, s: usize, seen: &mut [bool]) -> bool {
    let key = t * (text.len() + 1) + s;
    if seen[key] {
        return false;
    }
    seen[key] = true;
    let Some(token) = tokens.get(t) else {
        return s == text.len();
    };
    match token {
        Token::Literal(c) => text.get(s) == Some(c) && match_at(tokens, text, t + 1, s + 1, seen),
        Token::AnyChar => {
            text.get(s).is_some_and(|c| *c != '/') && match_at(tokens, text, t + 1, s + 1, seen)
        }
        Token::Class { negated, ranges } => {
            text.get(s).is_some_and(|c| {
                *c != '/' && ranges.iter().any(|(lo, hi)| lo <= c && c <= hi) != *negated
            }) && match_at(tokens, text, t + 1, s + 1, seen)
        }
        Token::Star => {
            let mut end = s;
            loop {
                if match_at(tokens, text, t + 1, end, seen) {
                    return true;
                }
                if end >= text.len() || text[end] == '/' {
                    return false;
                }
                end += 1;
            }
        }
        Token::AnyTail => true,
        Token::AnyDirs => {
            // Zero components, or any prefix ending just after a '/'.
            if match_at(tokens, text, t + 1, s, seen) {
                return true;
            }
            (s..text.len())
                .filter(|i| text[*i] == '/')
                .any(|i| match_at(tokens, text, t + 1, i + 1, seen))
        }
    }
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
    fn kept_paths_survive_any_exclusion() {
        let mut ignore = DockerIgnore::parse("*\n");
        ignore.keep("Dockerfile");
        ignore.keep(".dockerignore");
        assert!(!ignore.is_excluded("Dockerfile"));
        assert!(!ignore.is_excluded(".dockerignore"));
        assert!(ignore.is_excluded("src"));
    }
}
