//! Decoding and validating a job: bytes → [`Job`], or every problem with its JSON path.
//!
//! serde's derive stops at the first error, and an operator wants all of them at once, so the
//! job is read as a `serde_json::Value` and walked by hand. [`Fields`] tracks which keys of an
//! object were asked for; whatever else the object holds is reported as an unknown field. The
//! walk never echoes a value that could be a secret, and never echoes a URL that failed to parse
//! (it could carry a password).

use std::collections::BTreeMap;

use serde_json::{Map, Value};
use url::Url;

use super::*;
use crate::problems::Problems;
use crate::reference::Reference;

/// Jobs larger than this are refused before parsing (a job is a few KiB; a PEM key included).
pub const MAX_JOB_BYTES: usize = 256 * 1024;

const MAX_ID_LEN: usize = 128;

/// Decodes and validates a job from its JSON bytes.
pub fn decode(bytes: &[u8]) -> Result<Job, Problems> {
    let mut problems = Problems::new();
    if bytes.len() > MAX_JOB_BYTES {
        problems.push(
            "",
            format!(
                "job is {} bytes; at most {MAX_JOB_BYTES} are accepted",
                bytes.len()
            ),
        );
        return Err(problems);
    }
    match serde_json::from_slice::<Value>(bytes) {
        Ok(value) => decode_value(&value),
        Err(e) => {
            // serde_json's message names line and column, never the content.
            problems.push("", format!("not valid JSON: {e}"));
            Err(problems)
        }
    }
}

/// Validates an already parsed JSON value.
pub fn decode_value(value: &Value) -> Result<Job, Problems> {
    let mut p = Problems::new();
    let job = read_job(value, &mut p);
    match job {
        Some(job) if p.is_empty() => Ok(job),
        _ => {
            if p.is_empty() {
                p.push("", "invalid job");
            }
            Err(p)
        }
    }
}

fn read_job(value: &Value, p: &mut Problems) -> Option<Job> {
    let mut f = Fields::new(value, "", p)?;
    let v = match f.get("v") {
        None => {
            p.push("v", "required; expected 1");
            None
        }
        Some(Value::Number(n)) if n.as_u64() == Some(u64::from(WIRE_VERSION)) => Some(WIRE_VERSION),
        Some(Value::Number(n)) => {
            p.push(
                "v",
                format!("unsupported version {n}; this worker reads version {WIRE_VERSION}"),
            );
            None
        }
        Some(other) => {
            p.push(
                "v",
                format!("expected the number 1, got {}", kind_of(other)),
            );
            None
        }
    };
    let id = f.req_str("id", p).and_then(|s| check_id("id", s, p));
    let source_id = f
        .req_str("source_id", p)
        .and_then(|s| check_id("source_id", s, p));
    let origin = match f.get("origin") {
        None => {
            p.push("origin", "required");
            None
        }
        Some(o) => read_origin(o, p),
    };
    let is_build = matches!(origin, Some(Origin::DockerFile(_)));
    let build = f.get("build").and_then(|b| {
        if origin.is_some() && !is_build {
            p.push("build", "only docker-file origins are built; remove it");
            None
        } else {
            read_build_options(b, p)
        }
    });
    let destination = f.get("destination").and_then(|d| read_destination(d, p));
    let timeout_secs = f.opt_u64("timeout_secs", p);
    if timeout_secs == Some(0) {
        p.push("timeout_secs", "must be at least 1");
    }
    f.finish(p);
    Some(Job {
        v: v?,
        id: id?,
        source_id: source_id?,
        origin: origin?,
        build,
        destination,
        timeout_secs,
    })
}

fn check_id(path: &str, s: &str, p: &mut Problems) -> Option<String> {
    let ok_chars = s
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if s.is_empty() || s.len() > MAX_ID_LEN || !ok_chars {
        p.push(
            path,
            format!("expected 1-{MAX_ID_LEN} characters of [A-Za-z0-9_-], got {s:?}"),
        );
        return None;
    }
    Some(s.to_owned())
}

fn read_origin(value: &Value, p: &mut Problems) -> Option<Origin> {
    let mut f = Fields::new(value, "origin", p)?;
    let ty = f.req_str("type", p);
    let details = f.get("details");
    f.finish(p);
    const TYPES: &str = r#""docker-hub", "docker-registry", "oci-registry" or "docker-file""#;
    let ty = ty?;
    let Some(details) = details else {
        p.push("origin.details", "required");
        return None;
    };
    let path = "origin.details";
    match ty {
        "docker-hub" => read_docker_hub(details, path, p).map(Origin::DockerHub),
        "docker-registry" => read_docker_registry(details, path, p).map(Origin::DockerRegistry),
        "oci-registry" => read_oci_registry(details, path, p).map(Origin::OciRegistry),
        "docker-file" => read_docker_file(details, path, p).map(Origin::DockerFile),
        other => {
            p.push("origin.type", format!("expected {TYPES}, got {other:?}"));
            None
        }
    }
}

fn read_docker_hub(value: &Value, path: &str, p: &mut Problems) -> Option<DockerHub> {
    let mut f = Fields::new(value, path, p)?;
    let target = f.req_str("target", p).and_then(|t| {
        Reference::from_docker_hub(t)
            .map_err(|e| p.push(f.path("target"), e.to_string()))
            .ok()
    });
    let username = f.opt_nonempty_str("username", p).map(str::to_owned);
    let token = f.opt_secret("token", p);
    if token.is_some() && username.is_none() {
        p.push(
            f.path("username"),
            "required with token (Docker Hub access tokens belong to a user)",
        );
    }
    f.finish(p);
    Some(DockerHub {
        target: target?,
        username,
        token,
    })
}

fn read_docker_registry(value: &Value, path: &str, p: &mut Problems) -> Option<DockerRegistry> {
    let mut f = Fields::new(value, path, p)?;
    let target = f.req_str("target", p);
    let url = f.req_str("url", p);
    let username = f.opt_nonempty_str("username", p).map(str::to_owned);
    let password = f.opt_secret("password", p);
    let token = f.opt_secret("token", p);
    if password.is_some() && token.is_some() {
        p.push(f.path("token"), "give either password or token, not both");
    }
    if password.is_some() && username.is_none() {
        p.push(f.path("username"), "required with password");
    }
    f.finish(p);
    let (registry, target) = combine_registry(url?, target?, path, p)?;
    Some(DockerRegistry {
        target,
        url: url?.to_owned(),
        registry,
        username,
        password,
        token,
    })
}

fn combine_registry(
    url: &str,
    target: &str,
    path: &str,
    p: &mut Problems,
) -> Option<(crate::reference::RegistryUrl, Reference)> {
    match Reference::from_registry(url, target) {
        Ok(pair) => Some(pair),
        Err(e) => {
            // The reference module names which of url/target is at fault in its message.
            p.push(format!("{path}.target"), e.to_string());
            None
        }
    }
}

fn read_oci_registry(value: &Value, path: &str, p: &mut Problems) -> Option<OciRegistry> {
    let mut f = Fields::new(value, path, p)?;
    let target = f.req_str("target", p);
    let url = f.req_str("url", p);
    let auth_path = f.path("auth");
    let auth = f.get("auth").map(|a| read_oci_auth(a, &auth_path, p));
    f.finish(p);
    let (registry, target) = combine_registry(url?, target?, path, p)?;
    Some(OciRegistry {
        target,
        url: url?.to_owned(),
        registry,
        auth: valid_if_given(auth)?,
    })
}

fn read_oci_auth(value: &Value, path: &str, p: &mut Problems) -> Option<OciAuth> {
    let mut f = Fields::new(value, path, p)?;
    let ty = f.req_str("type", p);
    let details = f.get("details");
    f.finish(p);
    let ty = ty?;
    if !["user", "webhook", "provider"].contains(&ty) {
        p.push(
            format!("{path}.type"),
            format!("expected \"user\", \"webhook\" or \"provider\", got {ty:?}"),
        );
        return None;
    }
    let dpath = format!("{path}.details");
    let Some(details) = details else {
        p.push(dpath, "required");
        return None;
    };
    match ty {
        "user" => {
            let mut d = Fields::new(details, &dpath, p)?;
            let username = d.req_str("username", p).map(str::to_owned);
            let token = d.req_secret("token", p);
            d.finish(p);
            Some(OciAuth::User {
                username: username?,
                token: token?,
            })
        }
        "webhook" => {
            let mut d = Fields::new(details, &dpath, p)?;
            let url = d
                .req_str("url", p)
                .and_then(|u| check_http_url(&d.path("url"), u, p));
            d.finish(p);
            Some(OciAuth::Webhook { url: url? })
        }
        "provider" => {
            let mut d = Fields::new(details, &dpath, p)?;
            let flavor = d.req_str("flavor", p).and_then(|fl| match fl {
                "ecr" => Some(ProviderFlavor::Ecr),
                other => {
                    p.push(
                        d.path("flavor"),
                        format!("expected \"ecr\" (the only provider supported), got {other:?}"),
                    );
                    None
                }
            });
            let cpath = d.path("credentials");
            let credentials = match d.get("credentials") {
                None => {
                    p.push(cpath, "required");
                    None
                }
                Some(c) => read_ecr_credentials(c, &cpath, p),
            };
            d.finish(p);
            Some(OciAuth::Provider(ProviderAuth {
                flavor: flavor?,
                credentials: credentials?,
            }))
        }
        _ => unreachable!("type checked above"),
    }
}

fn read_ecr_credentials(value: &Value, path: &str, p: &mut Problems) -> Option<EcrCredentials> {
    let mut f = Fields::new(value, path, p)?;
    let region = f.req_str("region", p).and_then(|r| {
        let ok = r.len() <= 32
            && r.split('-').count() >= 3
            && r.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if ok {
            Some(r.to_owned())
        } else {
            p.push(
                f.path("region"),
                format!("expected an AWS region such as \"us-east-1\", got {r:?}"),
            );
            None
        }
    });
    let api_key = f.req_secret("api_key", p);
    let secret = f.req_secret("secret", p);
    f.finish(p);
    Some(EcrCredentials {
        region: region?,
        api_key: api_key?,
        secret: secret?,
    })
}

fn read_docker_file(value: &Value, path: &str, p: &mut Problems) -> Option<DockerFile> {
    let mut f = Fields::new(value, path, p)?;
    let repo_path = f.path("repo");
    let repo = f.get("repo").map(|r| read_repo(r, &repo_path, p));
    let targz = f.opt_str("targz_url", p).map(|u| {
        let path = f.path("targz_url");
        check_http_url(&path, u, p)
    });
    let source = match (repo, targz) {
        (Some(r), None) => r.map(BuildSource::Repo),
        (None, Some(t)) => t.map(BuildSource::TargzUrl),
        (None, None) => {
            p.push(
                path,
                "exactly one of repo or targz_url is required; got neither",
            );
            None
        }
        (Some(_), Some(_)) => {
            p.push(
                path,
                "exactly one of repo or targz_url is required; got both",
            );
            None
        }
    };
    let context_dir = match f.opt_str("context_dir", p) {
        None => Some("/".to_owned()),
        Some(s) => normalise_source_path(s)
            .map_err(|e| p.push(f.path("context_dir"), e))
            .ok(),
    };
    let build_file = match f.opt_str("build_file", p) {
        None => Some("/Dockerfile".to_owned()),
        Some(s) => normalise_build_file(s)
            .map_err(|e| p.push(f.path("build_file"), e))
            .ok(),
    };
    let cpath = f.path("credentials");
    let credentials = match f.get("credentials") {
        None => Some(Vec::new()),
        Some(c) => read_credentials(c, &cpath, p),
    };
    f.finish(p);
    Some(DockerFile {
        source: source?,
        context_dir: context_dir?,
        build_file: build_file?,
        credentials: credentials?,
    })
}

fn read_credentials(
    value: &Value,
    path: &str,
    p: &mut Problems,
) -> Option<Vec<RegistryCredential>> {
    let Value::Array(items) = value else {
        p.push(path, format!("expected an array, got {}", kind_of(value)));
        return None;
    };
    let mut out = Vec::new();
    let mut ok = true;
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for (i, item) in items.iter().enumerate() {
        let ipath = format!("{path}[{i}]");
        let Some(mut f) = Fields::new(item, &ipath, p) else {
            ok = false;
            continue;
        };
        let url = f
            .req_str("url", p)
            .and_then(|u| registry_host(&f.path("url"), u, p));
        let username = f.req_str("username", p).map(str::to_owned);
        let token = f.req_secret("token", p);
        f.finish(p);
        match (url, username, token) {
            (Some(url), Some(username), Some(token)) => {
                if let Some(first) = seen.insert(url.clone(), i) {
                    p.push(
                        format!("{ipath}.url"),
                        format!("{url} is already given at {path}[{first}]"),
                    );
                    ok = false;
                }
                out.push(RegistryCredential {
                    url,
                    username,
                    token,
                });
            }
            _ => ok = false,
        }
    }
    ok.then_some(out)
}

/// `host[:port]` of a registry given with or without scheme; Docker Hub's aliases become
/// `docker.io`.
fn registry_host(path: &str, raw: &str, p: &mut Problems) -> Option<String> {
    let without_scheme = raw
        .strip_prefix("https://")
        .or_else(|| raw.strip_prefix("http://"))
        .unwrap_or(raw);
    let host = without_scheme.trim_end_matches('/');
    let valid = !host.is_empty()
        && !host.contains('@')
        && !host.contains('/')
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b));
    if !valid {
        p.push(
            path,
            "expected a registry host such as \"registry.example.com:5000\" (scheme optional, no path or credentials)",
        );
        return None;
    }
    let host = host.to_ascii_lowercase();
    Some(match host.as_str() {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => {
            "docker.io".to_owned()
        }
        _ => host,
    })
}

fn read_repo(value: &Value, path: &str, p: &mut Problems) -> Option<GitRepo> {
    let mut f = Fields::new(value, path, p)?;
    let url_path = f.path("url");
    let url = f.req_str("url", p);
    let remote = url.and_then(|u| parse_git_url(&url_path, u, p));
    let branch = f.opt_str("branch", p).and_then(|b| {
        check_ref_name(b)
            .map_err(|e| p.push(f.path("branch"), e))
            .ok()
    });
    let auth_path = f.path("auth");
    let auth = f.get("auth").map(|a| read_git_auth(a, &auth_path, p));
    let ref_path = f.path("ref");
    let git_ref = f.get("ref").map(|r| read_git_ref(r, &ref_path, p));
    let submodules = f.opt_bool("submodules", p).unwrap_or(false);
    f.finish(p);

    let auth = valid_if_given(auth)?;
    if let (Some(remote), Some(auth)) = (&remote, &auth) {
        let mismatch = match (remote.transport, auth) {
            (GitTransport::Ssh, GitAuth::Http { .. }) => {
                Some("http credentials cannot be used with an ssh URL")
            }
            (GitTransport::Https | GitTransport::Http, GitAuth::Ssh { .. }) => {
                Some("ssh credentials cannot be used with an http(s) URL")
            }
            _ => None,
        };
        if let Some(msg) = mismatch {
            p.push(format!("{auth_path}.type"), msg);
        }
    }
    Some(GitRepo {
        url: url?.to_owned(),
        remote: remote?,
        branch,
        auth,
        git_ref: valid_if_given(git_ref)?,
        submodules,
    })
}

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

fn read_git_auth(value: &Value, path: &str, p: &mut Problems) -> Option<GitAuth> {
    let mut f = Fields::new(value, path, p)?;
    let ty = f.req_str("type", p);
    let cpath = f.path("credentials");
    let creds = f.get("credentials");
    f.finish(p);
    let ty = ty?;
    if ty != "http" && ty != "ssh" {
        p.push(
            format!("{path}.type"),
            format!("expected \"http\" or \"ssh\", got {ty:?}"),
        );
        return None;
    }
    let Some(creds) = creds else {
        p.push(cpath, "required");
        return None;
    };
    match ty {
        "http" => {
            let mut c = Fields::new(creds, &cpath, p)?;
            let username = c.req_str("username", p).map(str::to_owned);
            let password = c.req_secret("password", p);
            c.finish(p);
            Some(GitAuth::Http {
                username: username?,
                password: password?,
            })
        }
        "ssh" => {
            let mut c = Fields::new(creds, &cpath, p)?;
            let username = c.req_str("username", p).map(str::to_owned);
            let private_key = c.req_secret("private_key", p).and_then(|k| {
                let pem = k.expose().trim_start();
                if pem.starts_with("-----BEGIN ") && pem.contains("PRIVATE KEY-----") {
                    Some(k)
                } else {
                    // Never echo the value: it is meant to be a key.
                    p.push(
                        c.path("private_key"),
                        "expected a PEM private key (-----BEGIN ... PRIVATE KEY-----)",
                    );
                    None
                }
            });
            let passphrase = c.opt_secret("passphrase", p);
            c.finish(p);
            Some(GitAuth::Ssh {
                username: username?,
                private_key: private_key?,
                passphrase,
            })
        }
        _ => unreachable!("type checked above"),
    }
}

fn read_git_ref(value: &Value, path: &str, p: &mut Problems) -> Option<GitRef> {
    let mut f = Fields::new(value, path, p)?;
    let ty = f.req_str("type", p);
    let val = f.req_str("value", p);
    let vpath = f.path("value");
    f.finish(p);
    match ty? {
        "tag" => {
            let v = val?;
            check_ref_name(v).map_err(|e| p.push(vpath, e)).ok()?;
            Some(GitRef::Tag(v.to_owned()))
        }
        "hash" => {
            let v = val?;
            let hex = v.bytes().all(|b| b.is_ascii_hexdigit());
            if hex && (v.len() == 40 || v.len() == 64) {
                Some(GitRef::Hash(v.to_ascii_lowercase()))
            } else {
                p.push(
                    vpath,
                    format!("expected a full commit hash (40 or 64 hex characters), got {v:?}"),
                );
                None
            }
        }
        other => {
            p.push(
                format!("{path}.type"),
                format!("expected \"tag\" or \"hash\", got {other:?}"),
            );
            None
        }
    }
}

/// The subset of `git check-ref-format` that matters for a branch or tag given by a job.
fn check_ref_name(name: &str) -> Result<String, String> {
    let bad = name.is_empty()
        || name.len() > 255
        || name.starts_with('-')
        || name.starts_with('/')
        || name.ends_with('/')
        || name.ends_with('.')
        || name.ends_with(".lock")
        || name.contains("..")
        || name.contains("//")
        || name.contains("@{")
        || name == "@"
        || name.split('/').any(|c| c.starts_with('.'))
        || name
            .chars()
            .any(|c| c.is_control() || " ~^:?*[\\".contains(c));
    if bad {
        Err(format!(
            "{name:?} is not a valid git branch or tag name (see git check-ref-format)"
        ))
    } else {
        Ok(name.to_owned())
    }
}

fn check_http_url(path: &str, raw: &str, p: &mut Problems) -> Option<String> {
    match Url::parse(raw) {
        Ok(url) if url.scheme() != "http" && url.scheme() != "https" => {
            p.push(
                path,
                format!(
                    "expected an http:// or https:// URL, got scheme {:?}",
                    url.scheme()
                ),
            );
            None
        }
        Ok(url) if !url.username().is_empty() || url.password().is_some() => {
            p.push(path, "must not carry credentials in the URL");
            None
        }
        Ok(url) if url.host_str().is_none_or(str::is_empty) => {
            p.push(path, "expected an http:// or https:// URL with a host");
            None
        }
        Ok(_) => Some(raw.to_owned()),
        Err(e) => {
            p.push(path, format!("expected an http:// or https:// URL ({e})"));
            None
        }
    }
}

/// Normalises a path inside the source to an absolute path without `.`/`..` components.
/// A `..` that would leave the source root is an error.
pub fn normalise_source_path(raw: &str) -> Result<String, String> {
    if raw.is_empty() {
        return Err("must not be empty (use \"/\" for the source root)".to_owned());
    }
    if raw.contains('\0') || raw.contains('\\') {
        return Err(format!("{raw:?} contains a NUL or backslash"));
    }
    let mut parts: Vec<&str> = Vec::new();
    for part in raw.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                if parts.pop().is_none() {
                    return Err(format!("{raw:?} leaves the source root"));
                }
            }
            other => parts.push(other),
        }
    }
    Ok(format!("/{}", parts.join("/")))
}

fn normalise_build_file(raw: &str) -> Result<String, String> {
    let path = normalise_source_path(raw)?;
    if path == "/" || raw.ends_with('/') || raw.ends_with("/.") || raw.ends_with("/..") {
        return Err(format!(
            "{raw:?} names a directory; expected a file such as /Dockerfile"
        ));
    }
    Ok(path)
}

fn read_build_options(value: &Value, p: &mut Problems) -> Option<BuildOptions> {
    let mut f = Fields::new(value, "build", p)?;
    let mut args = BTreeMap::new();
    if let Some(a) = f.get("args") {
        match a {
            Value::Object(map) => {
                for (k, v) in map {
                    let kpath = format!("build.args.{k}");
                    let name_ok = k
                        .chars()
                        .next()
                        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                        && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
                    if !name_ok {
                        p.push(kpath.clone(), "a build arg name is [A-Za-z_][A-Za-z0-9_]*");
                    }
                    match v {
                        Value::String(s) => {
                            args.insert(k.clone(), s.clone());
                        }
                        other => {
                            p.push(kpath, format!("expected a string, got {}", kind_of(other)))
                        }
                    }
                }
            }
            other => p.push(
                "build.args",
                format!("expected an object, got {}", kind_of(other)),
            ),
        }
    }
    let target = f.opt_nonempty_str("target", p).and_then(|t| {
        let ok = t
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
        if ok {
            Some(t.to_owned())
        } else {
            p.push("build.target", format!("{t:?} is not a build stage name"));
            None
        }
    });
    let platform = f.opt_nonempty_str("platform", p).and_then(|pl| {
        if is_platform(pl) {
            Some(pl.to_owned())
        } else {
            p.push(
                "build.platform",
                format!("expected os/arch or os/arch/variant such as \"linux/amd64\", got {pl:?}"),
            );
            None
        }
    });
    let no_cache = f.opt_bool("no_cache", p).unwrap_or(false);
    f.finish(p);
    Some(BuildOptions {
        args,
        target,
        platform,
        no_cache,
    })
}

/// `os/arch` or `os/arch/variant`, lowercase.
pub(crate) fn is_platform(s: &str) -> bool {
    let parts: Vec<&str> = s.split('/').collect();
    (2..=3).contains(&parts.len())
        && parts.iter().all(|part| {
            !part.is_empty()
                && part
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        })
}

fn read_destination(value: &Value, p: &mut Problems) -> Option<DestinationOverride> {
    let mut f = Fields::new(value, "destination", p)?;
    let kind = f.req_str("kind", p).and_then(|k| match k {
        "oci-layout" => Some(DestinationKind::OciLayout),
        "registry" => Some(DestinationKind::Registry),
        other => {
            p.push(
                "destination.kind",
                format!("expected \"oci-layout\" or \"registry\", got {other:?}"),
            );
            None
        }
    });
    let repository = f.opt_nonempty_str("repository", p).map(str::to_owned);
    let tag = f.opt_nonempty_str("tag", p).map(str::to_owned);
    f.finish(p);
    Some(DestinationOverride {
        kind: kind?,
        repository,
        tag,
    })
}

/// The keys of one JSON object, tracking which ones the schema asked for.
struct Fields<'a> {
    path: String,
    map: &'a Map<String, Value>,
    known: Vec<&'static str>,
}

impl<'a> Fields<'a> {
    fn new(value: &'a Value, path: &str, p: &mut Problems) -> Option<Fields<'a>> {
        match value {
            Value::Object(map) => Some(Fields {
                path: path.to_owned(),
                map,
                known: Vec::new(),
            }),
            other => {
                p.push(path, format!("expected an object, got {}", kind_of(other)));
                None
            }
        }
    }

    fn path(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_owned()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    /// The value of `key`; `null` counts as absent.
    fn get(&mut self, key: &'static str) -> Option<&'a Value> {
        self.known.push(key);
        self.map.get(key).filter(|v| !v.is_null())
    }

    fn opt_str(&mut self, key: &'static str, p: &mut Problems) -> Option<&'a str> {
        match self.get(key)? {
            Value::String(s) => Some(s),
            other => {
                p.push(
                    self.path(key),
                    format!("expected a string, got {}", kind_of(other)),
                );
                None
            }
        }
    }

    fn opt_nonempty_str(&mut self, key: &'static str, p: &mut Problems) -> Option<&'a str> {
        self.opt_str(key, p).filter(|s| !s.is_empty())
    }

    fn req_str(&mut self, key: &'static str, p: &mut Problems) -> Option<&'a str> {
        let present = self.map.get(key).is_some_and(|v| !v.is_null());
        match self.opt_str(key, p) {
            Some("") => {
                p.push(self.path(key), "must not be empty");
                None
            }
            Some(s) => Some(s),
            None => {
                if !present {
                    p.push(self.path(key), "required");
                }
                None
            }
        }
    }

    /// Like `opt_str`, but the value is a secret: an empty string counts as absent and a
    /// wrong type is reported without showing the value.
    fn opt_secret(&mut self, key: &'static str, p: &mut Problems) -> Option<Secret> {
        match self.get(key)? {
            Value::String(s) if s.is_empty() => None,
            Value::String(s) => Some(Secret::new(s.clone())),
            other => {
                p.push(
                    self.path(key),
                    format!("expected a string, got {}", kind_of(other)),
                );
                None
            }
        }
    }

    fn req_secret(&mut self, key: &'static str, p: &mut Problems) -> Option<Secret> {
        let raw = self.map.get(key);
        let secret = self.opt_secret(key, p);
        if secret.is_none() {
            match raw {
                None | Some(Value::Null) => p.push(self.path(key), "required"),
                Some(Value::String(_)) => p.push(self.path(key), "must not be empty"),
                // A wrong type was reported by opt_secret.
                Some(_) => {}
            }
        }
        secret
    }

    fn opt_bool(&mut self, key: &'static str, p: &mut Problems) -> Option<bool> {
        match self.get(key)? {
            Value::Bool(b) => Some(*b),
            other => {
                p.push(
                    self.path(key),
                    format!("expected true or false, got {}", kind_of(other)),
                );
                None
            }
        }
    }

    fn opt_u64(&mut self, key: &'static str, p: &mut Problems) -> Option<u64> {
        match self.get(key)? {
            Value::Number(n) if n.as_u64().is_some() => n.as_u64(),
            other => {
                p.push(
                    self.path(key),
                    format!("expected a whole number of seconds, got {}", kind_of(other)),
                );
                None
            }
        }
    }

    /// Reports every key the schema did not ask for.
    fn finish(self, p: &mut Problems) {
        for key in self.map.keys() {
            if !self.known.iter().any(|k| k == key) {
                let mut expected = self.known.clone();
                expected.sort_unstable();
                expected.dedup();
                p.push(
                    self.path(key),
                    format!("unknown field; expected one of: {}", expected.join(", ")),
                );
            }
        }
    }
}

/// An optional part: `Some(None)` when it was absent, `Some(Some(v))` when given and valid,
/// `None` when given but invalid (its problems are already reported).
fn valid_if_given<T>(part: Option<Option<T>>) -> Option<Option<T>> {
    match part {
        None => Some(None),
        Some(Some(v)) => Some(Some(v)),
        Some(None) => None,
    }
}

fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}
