//! Decoding and validating a job: bytes → [`Job`], or every problem with its JSON path.
//!
//! serde's derive stops at the first error, and an operator wants all of them at once, so the
//! job is read as a `serde_json::Value` and walked by hand. `Fields` (in `fields`) tracks which keys of an
//! object were asked for; whatever else the object holds is reported as an unknown field. The
//! walk never echoes a value that could be a secret, and never echoes a URL that failed to parse
//! (it could carry a password).
//!
//! # Layout
//!
//! * this file — the job's top level (`v`, ids, `origin` dispatch, `build`, `destination`);
//! * `fields` — the generic walker: typed fields of one object, problems with their paths;
//! * `registry` — the `docker-hub`, `docker-registry` and `oci-registry` origins;
//! * `docker_file` — the `docker-file` origin: git or tar.gz source, paths, credentials.

mod docker_file;
mod fields;
mod registry;

use std::collections::BTreeMap;

use serde_json::Value;
use url::Url;

use self::docker_file::read_docker_file;
use self::fields::{kind_of, Fields};
use self::registry::{read_docker_hub, read_docker_registry, read_oci_registry};
use super::*;
use crate::problems::Problems;

pub use self::docker_file::normalise_source_path;

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
    // `build.ssh` forwards the job's git SSH key.
    let build = build.map(|(mut build, ssh)| {
        if ssh {
            match &origin {
                Some(Origin::DockerFile(DockerFile {
                    source:
                        BuildSource::Repo(GitRepo {
                            auth:
                                Some(GitAuth::Ssh {
                                    private_key,
                                    passphrase,
                                    ..
                                }),
                            ..
                        }),
                    ..
                })) => {
                    build.ssh = Some(SshKey {
                        private_key: private_key.clone(),
                        passphrase: passphrase.clone(),
                    })
                }
                // An origin with problems has them reported already.
                None => {}
                Some(_) => p.push(
                    "build.ssh",
                    "forwards the job's git SSH key: it needs a repo with auth of type \"ssh\"",
                ),
            }
        }
        build
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

/// The build options, and whether `build.ssh` asks for the job's SSH key (set by the caller,
/// which knows the origin).
fn read_build_options(value: &Value, p: &mut Problems) -> Option<(BuildOptions, bool)> {
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
    let secrets = f
        .get("secrets")
        .map(|v| read_build_secrets(v, p))
        .unwrap_or_default();
    let ssh = f.opt_bool("ssh", p).unwrap_or(false);
    f.finish(p);
    Some((
        BuildOptions {
            args,
            target,
            platform,
            no_cache,
            secrets,
            ssh: None,
        },
        ssh,
    ))
}

/// `build.secrets`: id → value. Ids are what a Dockerfile can name in `--mount=type=secret,id=`
/// (1-64 of `[A-Za-z0-9_.-]`); values are non-empty strings of at most 500 KiB, never shown
/// in a problem.
fn read_build_secrets(value: &Value, p: &mut Problems) -> BTreeMap<String, Secret> {
    let mut secrets = BTreeMap::new();
    let Value::Object(map) = value else {
        p.push(
            "build.secrets",
            format!("expected an object of id → value, got {}", kind_of(value)),
        );
        return secrets;
    };
    for (id, v) in map {
        let path = format!("build.secrets.{id}");
        let id_ok = (1..=64).contains(&id.len())
            && id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
        if !id_ok {
            p.push(path, "a secret id is 1-64 of [A-Za-z0-9_.-]");
            continue;
        }
        match v {
            Value::String(s) if s.is_empty() => p.push(path, "must not be empty"),
            Value::String(s) if s.len() > crate::job::MAX_BUILD_SECRET_BYTES => p.push(
                path,
                format!(
                    "is {} bytes; a build secret is at most {} bytes",
                    s.len(),
                    crate::job::MAX_BUILD_SECRET_BYTES
                ),
            ),
            Value::String(s) => {
                secrets.insert(id.clone(), Secret::new(s.clone()));
            }
            other => p.push(path, format!("expected a string, got {}", kind_of(other))),
        }
    }
    secrets
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
