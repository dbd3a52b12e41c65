//! Registry origins: `docker-hub`, `docker-registry` and `oci-registry`, each a target image
//! reference joined with its registry URL, and the registry's credentials (user and token,
//! a credentials webhook, or an AWS ECR provider).

use serde_json::Value;

use super::check_http_url;
use super::fields::{valid_if_given, Fields};
use crate::job::{
    DockerHub, DockerRegistry, EcrCredentials, OciAuth, OciRegistry, ProviderAuth, ProviderFlavor,
};
use crate::problems::Problems;
use crate::reference::{Reference, RegistryUrl};

pub(super) fn read_docker_hub(value: &Value, path: &str, p: &mut Problems) -> Option<DockerHub> {
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

pub(super) fn read_docker_registry(
    value: &Value,
    path: &str,
    p: &mut Problems,
) -> Option<DockerRegistry> {
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
) -> Option<(RegistryUrl, Reference)> {
    match Reference::from_registry(url, target) {
        Ok(pair) => Some(pair),
        Err(e) => {
            // The reference module names which of url/target is at fault in its message.
            p.push(format!("{path}.target"), e.to_string());
            None
        }
    }
}

pub(super) fn read_oci_registry(
    value: &Value,
    path: &str,
    p: &mut Problems,
) -> Option<OciRegistry> {
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
