//! The checks behind [`super::validate()`], one per kind of value.
//!
//! Each takes the problem list and the dotted path of the key it checks, pushes at most one
//! problem, and returns a value even on failure (a stand-in), so that validation can carry on and
//! report everything; `validate` discards the result as soon as any problem was pushed.

use std::net::Ipv6Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use url::Url;

use super::types::{
    DaemonAddr, Keyword, Platform, RegistryTarget, Template, TEMPLATE_PLACEHOLDERS,
};
use crate::problems::Problems;

pub(super) fn in_range(p: &mut Problems, path: &str, value: u32, min: u32, max: u32) -> u32 {
    if !(min..=max).contains(&value) {
        p.push(
            path,
            format!("expected an integer from {min} to {max}, got {value}"),
        );
    }
    value
}

pub(super) fn seconds(p: &mut Problems, path: &str, value: u64, min: u64, max: u64) -> Duration {
    if !(min..=max).contains(&value) {
        p.push(
            path,
            format!("expected a number of seconds from {min} to {max}, got {value}"),
        );
    }
    Duration::from_secs(value.clamp(min, max))
}

pub(super) fn keyword<T: Keyword>(p: &mut Problems, path: &str, value: &str, stand_in: T) -> T {
    T::parse(value).unwrap_or_else(|| {
        let words: Vec<String> = T::WORDS.iter().map(|(w, _)| format!("{w:?}")).collect();
        p.push(
            path,
            format!("expected one of {}, got {value:?}", words.join(", ")),
        );
        stand_in
    })
}

pub(super) fn absolute_path(p: &mut Problems, path: &str, value: &str) -> PathBuf {
    if !Path::new(value).is_absolute() {
        p.push(path, format!("expected an absolute path, got {value:?}"));
    }
    PathBuf::from(value)
}

/// `""` (unset) or an absolute path.
pub(super) fn optional_path(p: &mut Problems, path: &str, value: &str) -> Option<PathBuf> {
    if value.is_empty() {
        return None;
    }
    Some(absolute_path(p, path, value))
}

/// Like [`optional_path`], for a file holding a credential. A value that is not a path may be
/// the credential itself pasted in the wrong place, so it is not repeated in the message.
pub(super) fn secret_file(p: &mut Problems, path: &str, value: &str) -> Option<PathBuf> {
    if value.is_empty() {
        return None;
    }
    if !Path::new(value).is_absolute() {
        p.push(
            path,
            "expected \"\" or the absolute path of the file holding the credential (the value \
             is not shown: it may be the credential itself)",
        );
    }
    Some(PathBuf::from(value))
}

pub(super) fn nats_url(p: &mut Problems, path: &str, text: &str) -> Option<Url> {
    let url = match Url::parse(text) {
        Ok(url) => url,
        Err(e) => {
            p.push(
                path,
                format!("expected a URL such as \"nats://host:4222\", got {text:?} ({e})"),
            );
            return None;
        }
    };
    if !url.username().is_empty() || url.password().is_some() {
        // The URL is not repeated: its user info is the credential.
        p.push(
            path,
            format!(
                "expected no user or password in the URL (server {}); use nats.user with \
                 nats.password_file, or nats.token_file",
                url.host_str().unwrap_or("?")
            ),
        );
        return None;
    }
    if !matches!(url.scheme(), "nats" | "tls" | "ws" | "wss") {
        p.push(
            path,
            format!("expected a URL with scheme nats, tls, ws or wss, got {text:?}"),
        );
        return None;
    }
    if url.host_str().unwrap_or("").is_empty() {
        p.push(
            path,
            format!("expected a URL with a host, such as \"nats://host:4222\", got {text:?}"),
        );
        return None;
    }
    Some(url)
}

pub(super) fn mirror_url(p: &mut Problems, path: &str, text: &str) -> Option<Url> {
    let url = match Url::parse(text) {
        Ok(url) => url,
        Err(e) => {
            p.push(
                path,
                format!("expected an http(s) URL such as \"https://mirror.example.com\", got {text:?} ({e})"),
            );
            return None;
        }
    };
    if !url.username().is_empty() || url.password().is_some() {
        p.push(
            path,
            format!(
                "expected no user or password in the mirror URL (host {})",
                url.host_str().unwrap_or("?")
            ),
        );
        return None;
    }
    if !matches!(url.scheme(), "http" | "https") || url.host_str().unwrap_or("").is_empty() {
        p.push(
            path,
            format!("expected an http or https URL with a host, got {text:?}"),
        );
        return None;
    }
    Some(url)
}

/// `unix:///absolute/path` or `tcp://host:port`; `other` names what else the key accepts, for
/// the problem's text.
pub(super) fn daemon_addr(p: &mut Problems, path: &str, text: &str, other: &str) -> DaemonAddr {
    let parsed = if let Some(socket) = text.strip_prefix("unix://") {
        Path::new(socket)
            .is_absolute()
            .then(|| DaemonAddr::Unix(PathBuf::from(socket)))
    } else if let Some(authority) = text.strip_prefix("tcp://") {
        match split_authority(authority) {
            Ok((host, Some(port))) => Some(DaemonAddr::Tcp { host, port }),
            _ => None,
        }
    } else {
        None
    };
    parsed.unwrap_or_else(|| {
        p.push(
            path,
            format!("expected {other}unix:///absolute/path or tcp://host:port, got {text:?}"),
        );
        DaemonAddr::Unix(PathBuf::from("/"))
    })
}

pub(super) fn registry_target(
    p: &mut Problems,
    path: &str,
    text: &str,
    insecure: &[String],
) -> Option<RegistryTarget> {
    let (scheme, authority) = match text.split_once("://") {
        Some((scheme, rest)) => (Some(scheme), rest),
        None => (None, text),
    };
    let problem = match scheme {
        Some(s) if s != "http" && s != "https" => {
            Some(format!("scheme {s:?} is not http or https"))
        }
        _ => bare_authority(authority).err(),
    };
    if let Some(why) = problem {
        p.push(
            path,
            format!(
                "expected host[:port], optionally after http:// or https:// ({why}), got {text:?}"
            ),
        );
        return None;
    }
    let plain_http = match scheme {
        Some(scheme) => scheme == "http",
        None => insecure.iter().any(|entry| entry == authority),
    };
    Some(RegistryTarget {
        authority: authority.to_owned(),
        plain_http,
    })
}

/// `host` or `host:port`, nothing else, as registries are named in image references.
pub(super) fn bare_authority(text: &str) -> Result<(), String> {
    if text.contains("://") {
        return Err("no scheme".to_owned());
    }
    if text.contains('/') {
        return Err("no path".to_owned());
    }
    split_authority(text).map(|_| ())
}

/// Splits `host[:port]`, with `[v6]` for IPv6 literals; the host must be a DNS name or an IP.
fn split_authority(text: &str) -> Result<(String, Option<u16>), String> {
    let (host, port) = if let Some(rest) = text.strip_prefix('[') {
        let (inner, after) = rest
            .split_once(']')
            .ok_or_else(|| "unclosed '['".to_owned())?;
        if inner.parse::<Ipv6Addr>().is_err() {
            return Err(format!("{inner:?} is not an IPv6 address"));
        }
        let port = match after {
            "" => None,
            _ => Some(
                after
                    .strip_prefix(':')
                    .ok_or_else(|| "unexpected text after ']'".to_owned())?,
            ),
        };
        (format!("[{inner}]"), port)
    } else {
        let (host, port) = match text.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (text, None),
        };
        if !is_dns_name(host) {
            return Err(format!("{host:?} is not a host name or IPv4 address"));
        }
        (host.to_owned(), port)
    };
    let port = port
        .map(|port| match port.parse::<u16>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(format!("port {port:?} is not 1-65535")),
        })
        .transpose()?;
    Ok((host, port))
}

fn is_dns_name(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

pub(super) fn is_subject_token(text: &str) -> bool {
    (1..=32).contains(&text.len())
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

pub(super) fn is_worker_name(text: &str) -> bool {
    (1..=64).contains(&text.len())
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// Characters of an OCI repository name: lowercase path components joined by '/'.
pub(super) fn is_repository_text(text: &str) -> bool {
    text.bytes().all(|b| {
        b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-' | b'/')
    }) && !text.starts_with('/')
        && !text.ends_with('/')
        && !text.contains("//")
}

pub(super) fn parse_platform(text: &str) -> Option<Platform> {
    let parts: Vec<&str> = text.split('/').collect();
    let well_formed = (2..=3).contains(&parts.len())
        && parts.iter().all(|part| {
            !part.is_empty()
                && part
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        });
    if !well_formed {
        return None;
    }
    Some(Platform {
        os: parts[0].to_owned(),
        architecture: parts[1].to_owned(),
        variant: parts.get(2).map(|v| (*v).to_owned()),
    })
}

/// Which literal text a template may hold around its placeholders.
#[derive(Clone, Copy)]
pub(super) enum TemplateText {
    Repository,
    Tag,
}

pub(super) fn template(
    p: &mut Problems,
    path: &str,
    text: &str,
    namespace: &str,
    allowed: TemplateText,
) -> Template {
    let mut issues = Vec::new();
    let mut literal = String::new();
    let mut rest = text;
    while let Some(at) = rest.find(['{', '}']) {
        literal.push_str(&rest[..at]);
        if rest[at..].starts_with('}') {
            issues.push("unbalanced '}'".to_owned());
            rest = &rest[at + 1..];
            continue;
        }
        let after = &rest[at + 1..];
        match after.find(['{', '}']) {
            Some(close) if after[close..].starts_with('}') => {
                let name = &after[..close];
                if !TEMPLATE_PLACEHOLDERS.contains(&name) {
                    issues.push(format!("unknown placeholder {{{name}}}"));
                } else if name == "namespace" && namespace.is_empty() {
                    issues
                        .push("{namespace} is used but destination.namespace is empty".to_owned());
                }
                // Stand for the substituted value in the literal check below.
                literal.push('x');
                rest = &after[close + 1..];
            }
            _ => {
                issues.push("unbalanced '{'".to_owned());
                rest = after;
            }
        }
    }
    literal.push_str(rest);

    if text.is_empty() {
        issues.push("it is empty".to_owned());
    } else if issues.is_empty() {
        // Only once the placeholders parse: around a stray brace, the literal text is a guess.
        let literal_ok = match allowed {
            TemplateText::Repository => is_repository_text(&literal),
            TemplateText::Tag => literal
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-')),
        };
        if !literal_ok {
            issues.push(match allowed {
                TemplateText::Repository => {
                    "text outside placeholders must be lowercase [a-z0-9._-] components joined \
                     by '/'"
                        .to_owned()
                }
                TemplateText::Tag => "text outside placeholders must be [A-Za-z0-9_.-]".to_owned(),
            });
        }
    }

    if !issues.is_empty() {
        let placeholders: Vec<String> = TEMPLATE_PLACEHOLDERS
            .iter()
            .map(|name| format!("{{{name}}}"))
            .collect();
        p.push(
            path,
            format!(
                "expected a template using only {}: {}, got {text:?}",
                placeholders.join(", "),
                issues.join("; ")
            ),
        );
    }
    Template(text.to_owned())
}
