//! Which BuildKit frontend a build would run, and whether the node allows it.
//!
//! A Dockerfile may name its own frontend: a `syntax` parser directive, or the
//! `BUILDKIT_SYNTAX` build argument. BuildKit then pulls that image and runs it, with the
//! build's context and secrets, as part of the build: arbitrary code from wherever the job
//! says. Only frontends in `builder.allowed_frontends` may run; by default none, so every build
//! uses the built-in Dockerfile frontend.
//!
//! The directive is found as BuildKit's `DetectSyntax` finds it, so that what BuildKit would
//! obey, this refuses: a leading byte-order mark and a `#!` first line are skipped; then the
//! parser directives at the top (`# key=value` lines, keys `syntax`, `check` or `escape`, any
//! case) are read until the first line that is not one; then the same with `//` comments;
//! then a whole-file JSON object's `"syntax"` string. The frontend is the value up to its first
//! space.

use std::collections::BTreeMap;

use crate::error::{ErrorCode, JobError, Stage};
use crate::reference::Reference;

/// The build argument that names a frontend the way the directive does.
pub const SYNTAX_ARG: &str = "BUILDKIT_SYNTAX";

/// Build files larger than this are refused before the check: the directive may be anywhere
/// in a JSON build file, so the check must read all of it.
pub const MAX_BUILD_FILE_BYTES: u64 = 4 << 20;

/// The frontend `build_file` names, if any.
pub fn detect_syntax(build_file: &[u8]) -> Option<String> {
    let data = build_file
        .strip_prefix(&[0xEF, 0xBB, 0xBF][..])
        .unwrap_or(build_file);
    let data = match data.split(|b| *b == b'\n').next() {
        Some(first) if first.starts_with(b"#!") => &data[(first.len() + 1).min(data.len())..],
        _ => data,
    };
    for comment in ["#", "//"] {
        if let Some(value) = directive(data, comment) {
            return Some(value);
        }
    }
    let json: serde_json::Value = serde_json::from_slice(data).ok()?;
    json.get("syntax")?.as_str().map(str::to_owned)
}

/// The `syntax` value among the parser directives written with `comment`.
fn directive(data: &[u8], comment: &str) -> Option<String> {
    let mut seen: Vec<String> = Vec::new();
    for line in data.split(|b| *b == b'\n') {
        // Go's line scanner drops a trailing CR.
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let line = String::from_utf8_lossy(line);
        let rest = line.strip_prefix(comment)?.trim_start();
        let (key, value) = rest.split_once('=')?;
        let key = key.trim_end();
        let value = value.trim();
        let mut key_chars = key.chars();
        let key_ok = key_chars.next().is_some_and(|c| c.is_ascii_alphabetic())
            && key_chars.all(|c| c.is_ascii_alphanumeric());
        if !key_ok || value.is_empty() {
            return None;
        }
        let key = key.to_ascii_lowercase();
        if !matches!(key.as_str(), "syntax" | "check" | "escape") || seen.contains(&key) {
            // An unknown key ends the directives; BuildKit rejects a repeated one.
            return None;
        }
        if key == "syntax" {
            let frontend = value.split(' ').next().unwrap_or(value);
            return Some(frontend.to_owned());
        }
        seen.push(key);
    }
    None
}

/// The canonical form of a frontend reference (`docker/dockerfile:1` →
/// `docker.io/docker/dockerfile:1`), or `None` when it is not an image reference.
pub fn canonical(frontend: &str) -> Option<String> {
    Reference::parse(frontend).ok().map(|r| r.to_string())
}

/// Refuses a build whose build file or build arguments name a frontend not in `allowed`
/// (canonical references). `build_file_name` is for the message.
pub fn check(
    build_file_name: &str,
    build_file: &[u8],
    args: &BTreeMap<String, String>,
    allowed: &[String],
) -> Result<(), JobError> {
    let named = [
        detect_syntax(build_file)
            .map(|f| (f, format!("the syntax directive of {build_file_name}"))),
        args.get(SYNTAX_ARG)
            .map(|f| (f.clone(), format!("build argument {SYNTAX_ARG}"))),
    ];
    for (frontend, place) in named.into_iter().flatten() {
        let ok = canonical(&frontend).is_some_and(|c| allowed.contains(&c));
        if !ok {
            let allowed_text = if allowed.is_empty() {
                "none are allowed on this node, only the built-in Dockerfile frontend".to_owned()
            } else {
                format!("allowed: {}", allowed.join(", "))
            };
            return Err(JobError::permanent(
                Stage::Build,
                ErrorCode::UnsafeSource,
                format!(
                    "{place} names the frontend {frontend:?}, which is not in \
                     builder.allowed_frontends ({allowed_text})"
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn syntax(text: &str) -> Option<String> {
        detect_syntax(text.as_bytes())
    }

    #[test]
    fn the_directive_forms_buildkit_reads_are_found() {
        let want = Some("evil/frontend:1".to_owned());
        assert_eq!(syntax("# syntax=evil/frontend:1\nFROM scratch\n"), want);
        assert_eq!(syntax("#SYNTAX = evil/frontend:1 extra\nFROM x\n"), want);
        assert_eq!(syntax("#   syntax=evil/frontend:1\r\nFROM x\r\n"), want);
        assert_eq!(syntax("# escape=`\n# syntax=evil/frontend:1\n"), want);
        assert_eq!(syntax("# check=skip=all\n# syntax=evil/frontend:1\n"), want);
        assert_eq!(syntax("\u{feff}# syntax=evil/frontend:1\n"), want);
        assert_eq!(
            syntax("#!/usr/bin/env buildx\n# syntax=evil/frontend:1\n"),
            want
        );
        assert_eq!(syntax("// syntax=evil/frontend:1\nFROM x\n"), want);
        assert_eq!(syntax("{\"syntax\": \"evil/frontend:1\", \"x\": 1}"), want);
    }

    #[test]
    fn directives_end_at_the_first_line_that_is_not_one() {
        assert_eq!(syntax("FROM scratch\n# syntax=evil/frontend:1\n"), None);
        assert_eq!(syntax("\n# syntax=evil/frontend:1\n"), None);
        assert_eq!(syntax("# a comment\n# syntax=evil/frontend:1\n"), None);
        assert_eq!(syntax("# other=1\n# syntax=evil/frontend:1\n"), None);
        assert_eq!(syntax(" # syntax=evil/frontend:1\n"), None);
        assert_eq!(syntax("# escape=\\\n# escape=`\n# syntax=e/f\n"), None);
        assert_eq!(syntax("FROM scratch\n"), None);
        assert_eq!(syntax(""), None);
        assert_eq!(syntax("[\"syntax\"]"), None);
    }

    #[test]
    fn a_frontend_not_allowed_is_refused_naming_where_it_came_from() {
        let none = BTreeMap::new();
        let file = b"# syntax=docker/dockerfile:1\nFROM scratch\n";
        let err = check("Dockerfile", file, &none, &[]).unwrap_err();
        assert_eq!(err.code, ErrorCode::UnsafeSource);
        assert!(
            err.message.contains("syntax directive of Dockerfile"),
            "{err}"
        );
        assert!(err.message.contains("builder.allowed_frontends"), "{err}");

        let allowed = vec![canonical("docker/dockerfile:1").unwrap()];
        check("Dockerfile", file, &none, &allowed).expect("allowed, in another spelling");
        check("Dockerfile", b"FROM scratch\n", &none, &[]).expect("no frontend named");

        let args = BTreeMap::from([(SYNTAX_ARG.to_owned(), "evil.example/f:1".to_owned())]);
        let err = check("Dockerfile", b"FROM scratch\n", &args, &allowed).unwrap_err();
        assert!(
            err.message.contains("build argument BUILDKIT_SYNTAX"),
            "{err}"
        );
        assert!(
            err.message.contains("docker.io/docker/dockerfile:1"),
            "{err}"
        );

        let err = check("Dockerfile", b"# syntax=not a ref!\n", &none, &allowed).unwrap_err();
        assert_eq!(err.code, ErrorCode::UnsafeSource, "{err}");
    }
}
