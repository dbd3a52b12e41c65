//! The git repository URL grammar: which URLs a job may name as a build source
//! (`https://`, `http://`, `ssh://`, scp-like `user@host:path`) and the transport, host and port
//! they reach. Local paths, `file://`, `git://`, remote helpers (`ext::`) and credentials in the
//! URL are refused, without echoing the URL.

use url::Url;

use crate::job::{GitRemote, GitTransport};
use crate::problems::Problems;

/// Accepts `https://`, `http://` and `ssh://` URLs and scp-like `user@host:path`. Refuses
/// `file://`, local paths, `git://`, `ext::` and other transports, and passwords in URLs.
pub(crate) fn parse_git_url(path: &str, raw: &str, p: &mut Problems) -> Option<GitRemote> {
    const EXPECTED: &str =
        "expected an https://, http:// or ssh:// URL, or scp-like user@host:path";
    if raw.contains("::") || raw.starts_with('/') || raw.starts_with('.') || raw.starts_with('~') {
        p.push(
            path,
            format!("{EXPECTED}; local paths and remote helpers are refused"),
        );
        return None;
    }
    if let Some(scheme_end) = raw.find("://") {
        let scheme = &raw[..scheme_end];
        let transport = match scheme.to_ascii_lowercase().as_str() {
            "https" => GitTransport::Https,
            "http" => GitTransport::Http,
            "ssh" | "git+ssh" | "ssh+git" => GitTransport::Ssh,
            _ => {
                // The scheme is safe to show: it holds no credentials.
                p.push(
                    path,
                    format!("{EXPECTED}; the {scheme:?} transport is refused"),
                );
                return None;
            }
        };
        let Ok(url) = Url::parse(raw) else {
            p.push(path, format!("{EXPECTED}; it does not parse as a URL"));
            return None;
        };
        if url.password().is_some() {
            p.push(
                path,
                "must not carry a password; put credentials in repo.auth",
            );
            return None;
        }
        if transport != GitTransport::Ssh && !url.username().is_empty() {
            p.push(
                path,
                "must not carry a user name; put credentials in repo.auth",
            );
            return None;
        }
        let Some(host) = url.host_str().filter(|h| !h.is_empty()) else {
            p.push(path, format!("{EXPECTED}; no host"));
            return None;
        };
        if url.path().len() <= 1 {
            p.push(path, "names no repository path");
            return None;
        }
        return Some(GitRemote {
            transport,
            host: host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned(),
            port: url.port(),
        });
    }
    // scp-like: [user@]host:path, where host has no '/'.
    let (before, after) = match raw.split_once(':') {
        Some(pair) if !pair.0.contains('/') && !pair.0.is_empty() && !pair.1.is_empty() => pair,
        _ => {
            p.push(path, EXPECTED);
            return None;
        }
    };
    let host = before.rsplit_once('@').map_or(before, |(_, h)| h);
    let host_ok = !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-');
    if !host_ok || after.starts_with('/') && after.len() == 1 {
        p.push(path, EXPECTED);
        return None;
    }
    Some(GitRemote {
        transport: GitTransport::Ssh,
        host: host.to_ascii_lowercase(),
        port: None,
    })
}
