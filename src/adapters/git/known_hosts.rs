//! SSH host keys: the operator's `known_hosts` file (`git.known_hosts_file`), in OpenSSH's
//! format, checked against the key a git server presents.
//!
//! Supported: plain host patterns (`host`, `[host]:port`, `*` and `?` wildcards, `!` negation,
//! comma-separated lists) and `@revoked` markers. Not supported, and skipped: hashed entries
//! (`|1|…`) and `@cert-authority` lines — write plain host names in the worker's file.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;

/// What the file says about a host's key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostKeyVerdict {
    /// A line for the host holds exactly this key.
    Known,
    /// The host is listed, but with other keys only.
    Mismatch,
    /// The host is not listed.
    Unknown,
    /// The key is marked `@revoked`.
    Revoked,
}

#[derive(Debug, Clone, Default)]
pub struct KnownHosts {
    lines: Vec<Line>,
}

#[derive(Debug, Clone)]
struct Line {
    revoked: bool,
    patterns: Vec<String>,
    key: Vec<u8>,
}

impl KnownHosts {
    pub fn parse(text: &str) -> KnownHosts {
        let mut lines = Vec::new();
        for raw in text.lines() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut fields = line.split_whitespace();
            let mut first = fields.next().unwrap_or_default();
            let mut revoked = false;
            if first.starts_with('@') {
                match first {
                    "@revoked" => revoked = true,
                    _ => continue,
                }
                first = fields.next().unwrap_or_default();
            }
            if first.starts_with('|') {
                continue;
            }
            let (Some(_key_type), Some(blob)) = (fields.next(), fields.next()) else {
                continue;
            };
            let Ok(key) = STANDARD.decode(blob) else {
                continue;
            };
            lines.push(Line {
                revoked,
                patterns: first.split(',').map(str::to_ascii_lowercase).collect(),
                key,
            });
        }
        KnownHosts { lines }
    }

    /// Judges `key` (the SSH wire-format public key blob) for `host` on `port`.
    pub fn check(&self, host: &str, port: u16, key: &[u8]) -> HostKeyVerdict {
        let name = if port == 22 {
            host.to_ascii_lowercase()
        } else {
            format!("[{}]:{port}", host.to_ascii_lowercase())
        };
        if self.lines.iter().any(|l| l.revoked && l.key == key) {
            return HostKeyVerdict::Revoked;
        }
        let mut listed = false;
        for line in self.lines.iter().filter(|l| !l.revoked) {
            if host_matches(&line.patterns, &name) {
                listed = true;
                if line.key == key {
                    return HostKeyVerdict::Known;
                }
            }
        }
        if listed {
            HostKeyVerdict::Mismatch
        } else {
            HostKeyVerdict::Unknown
        }
    }
}

fn host_matches(patterns: &[String], name: &str) -> bool {
    let mut matched = false;
    for pattern in patterns {
        if let Some(negated) = pattern.strip_prefix('!') {
            if wildcard(negated.as_bytes(), name.as_bytes()) {
                return false;
            }
        } else if wildcard(pattern.as_bytes(), name.as_bytes()) {
            matched = true;
        }
    }
    matched
}

fn wildcard(pattern: &[u8], text: &[u8]) -> bool {
    match (pattern.first(), text.first()) {
        (None, None) => true,
        (Some(b'*'), _) => {
            wildcard(&pattern[1..], text) || (!text.is_empty() && wildcard(pattern, &text[1..]))
        }
        (Some(b'?'), Some(_)) => wildcard(&pattern[1..], &text[1..]),
        (Some(p), Some(t)) if p == t => wildcard(&pattern[1..], &text[1..]),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY_A: &[u8] = b"key-a";
    const KEY_B: &[u8] = b"key-b";

    fn file() -> KnownHosts {
        KnownHosts::parse(&format!(
            "# comment\n\
             git.example.com,10.0.0.1 ssh-ed25519 {a}\n\
             [127.0.0.1]:2222 ssh-ed25519 {a}\n\
             *.corp.example ssh-ed25519 {b}\n\
             |1|c2FsdA==|aGFzaA== ssh-ed25519 {b}\n\
             @revoked * ssh-ed25519 {r}\n",
            a = STANDARD.encode(KEY_A),
            b = STANDARD.encode(KEY_B),
            r = STANDARD.encode(b"stolen"),
        ))
    }

    #[test]
    fn a_listed_key_is_known() {
        assert_eq!(
            file().check("git.example.com", 22, KEY_A),
            HostKeyVerdict::Known
        );
        assert_eq!(
            file().check("127.0.0.1", 2222, KEY_A),
            HostKeyVerdict::Known
        );
        assert_eq!(
            file().check("a.corp.example", 22, KEY_B),
            HostKeyVerdict::Known
        );
    }

    #[test]
    fn another_key_for_a_listed_host_is_a_mismatch() {
        assert_eq!(
            file().check("git.example.com", 22, KEY_B),
            HostKeyVerdict::Mismatch
        );
    }

    #[test]
    fn a_host_on_another_port_or_unlisted_is_unknown() {
        assert_eq!(
            file().check("127.0.0.1", 22, KEY_A),
            HostKeyVerdict::Unknown
        );
        assert_eq!(
            file().check("other.example", 22, KEY_A),
            HostKeyVerdict::Unknown
        );
    }

    #[test]
    fn a_revoked_key_is_refused_for_every_host() {
        assert_eq!(
            file().check("git.example.com", 22, b"stolen"),
            HostKeyVerdict::Revoked
        );
    }
}
