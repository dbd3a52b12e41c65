//! Docker-file origins: the build source (a git repository with its branch, ref and
//! credentials, or a `tar.gz` URL), the context directory and build file inside it, and the
//! credentials for the registries its `FROM` lines name. The git URL grammar itself is
//! [`crate::reference::parse_git_url`].

use std::collections::BTreeMap;

use serde_json::Value;

use super::check_http_url;
use super::fields::{kind_of, valid_if_given, Fields};
use crate::job::{
    BuildSource, DockerFile, GitAuth, GitRef, GitRepo, GitTransport, RegistryCredential,
};
use crate::problems::Problems;
use crate::reference::parse_git_url;

pub(super) fn read_docker_file(value: &Value, path: &str, p: &mut Problems) -> Option<DockerFile> {
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
