//! Job wire format v1 (ARCHITECTURE §3): the typed job, its decoder, and the result (§4).
//!
//! The `origin` object has the shape of Cycle's public API image origin (`type` + `details`),
//! so a control plane that already speaks that schema publishes unchanged. [`decode`] turns
//! bytes into a [`Job`] or reports *every* problem with its JSON path; it applies the defaults
//! (`context_dir = "/"`, `build_file = "/Dockerfile"`) and normalises references and paths.
//!
//! Every credential is a [`Secret`], so a job can be printed or serialised (`validate --job`)
//! with each secret shown as `<redacted>`. The serialised form is the wire form, normalised.

mod decode;
pub(crate) use crate::reference::parse_git_url;
mod event;
mod redact;
mod result;

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize, Serializer};

use crate::reference::{Reference, RegistryUrl};
use crate::secret::Secret;

pub use decode::{decode, decode_value, normalise_source_path, MAX_JOB_BYTES};
pub use event::{EventEnvelope, JobEvent, WARNING_BUILD_CACHE};
pub use redact::{Redactor, MASK};
pub use result::{DeadLetter, ErrorInfo, ImageInfo, JobResult, Revision, Status, Timings};

/// The wire format version this worker reads and writes.
pub const WIRE_VERSION: u32 = 1;

/// Which queue a job belongs to; builds and imports have their own slots and retry budgets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Build,
    Import,
}

impl Kind {
    pub const ALL: [Kind; 2] = [Kind::Build, Kind::Import];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Build => "build",
            Kind::Import => "import",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One image source job, validated and normalised.
#[derive(Debug, Clone, Serialize)]
pub struct Job {
    pub v: u32,
    /// Unique; the idempotency key (also `Nats-Msg-Id`). 1-128 of `[A-Za-z0-9_-]`.
    pub id: String,
    /// The image source this job belongs to. 1-128 of `[A-Za-z0-9_-]`.
    pub source_id: String,
    pub origin: Origin,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub build: Option<BuildOptions>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub destination: Option<DestinationOverride>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<u64>,
}

impl Job {
    pub fn kind(&self) -> Kind {
        match self.origin {
            Origin::DockerFile(_) => Kind::Build,
            _ => Kind::Import,
        }
    }

    /// Every credential value the job carries, for redacting text that may echo one (build logs,
    /// server messages).
    pub fn secrets(&self) -> Vec<&Secret> {
        let mut out = Vec::new();
        match &self.origin {
            Origin::DockerHub(o) => out.extend(o.token.iter()),
            Origin::DockerRegistry(o) => {
                out.extend(o.password.iter());
                out.extend(o.token.iter());
            }
            Origin::OciRegistry(o) => match &o.auth {
                Some(OciAuth::User { token, .. }) => out.push(token),
                Some(OciAuth::Provider(p)) => {
                    out.push(&p.credentials.api_key);
                    out.push(&p.credentials.secret);
                }
                Some(OciAuth::Webhook { .. }) | None => {}
            },
            Origin::DockerFile(o) => {
                if let BuildSource::Repo(repo) = &o.source {
                    match &repo.auth {
                        Some(GitAuth::Http { password, .. }) => out.push(password),
                        Some(GitAuth::Ssh {
                            private_key,
                            passphrase,
                            ..
                        }) => {
                            out.push(private_key);
                            out.extend(passphrase.iter());
                        }
                        None => {}
                    }
                }
                out.extend(o.credentials.iter().map(|c| &c.token));
            }
        }
        if let Some(build) = &self.build {
            out.extend(build.secrets.values());
        }
        out.retain(|s| !s.is_empty());
        out
    }

    /// The user names that go with the job's secrets (for redacting Basic auth headers).
    pub fn usernames(&self) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        match &self.origin {
            Origin::DockerHub(o) => out.extend(o.username.as_deref()),
            Origin::DockerRegistry(o) => out.extend(o.username.as_deref()),
            Origin::OciRegistry(o) => match &o.auth {
                Some(OciAuth::User { username, .. }) => out.push(username),
                Some(OciAuth::Provider(_)) => out.push("AWS"),
                _ => {}
            },
            Origin::DockerFile(o) => {
                if let BuildSource::Repo(GitRepo {
                    auth: Some(GitAuth::Http { username, .. }),
                    ..
                }) = &o.source
                {
                    out.push(username);
                }
                out.extend(o.credentials.iter().map(|c| c.username.as_str()));
            }
        }
        out
    }
}

/// Where the image comes from: `type` + `details`, as in Cycle's API.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", content = "details", rename_all = "kebab-case")]
pub enum Origin {
    DockerHub(DockerHub),
    DockerRegistry(DockerRegistry),
    OciRegistry(OciRegistry),
    DockerFile(DockerFile),
}

impl Origin {
    pub fn type_name(&self) -> &'static str {
        match self {
            Origin::DockerHub(_) => "docker-hub",
            Origin::DockerRegistry(_) => "docker-registry",
            Origin::OciRegistry(_) => "oci-registry",
            Origin::DockerFile(_) => "docker-file",
        }
    }
}

/// `docker-hub`: `target` exactly as `docker pull` takes it.
#[derive(Debug, Clone, Serialize)]
pub struct DockerHub {
    #[serde(serialize_with = "display")]
    pub target: Reference,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<Secret>,
}

/// `docker-registry`: a private Docker registry, `url` + `target`.
#[derive(Debug, Clone, Serialize)]
pub struct DockerRegistry {
    /// The combined reference (`url/organization/image:tag`).
    #[serde(serialize_with = "display")]
    pub target: Reference,
    pub url: String,
    #[serde(skip)]
    pub registry: RegistryUrl,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password: Option<Secret>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<Secret>,
}

/// `oci-registry`: ECR, GCR, ACR, GHCR… with `user`, `webhook` or `provider` auth.
#[derive(Debug, Clone, Serialize)]
pub struct OciRegistry {
    #[serde(serialize_with = "display")]
    pub target: Reference,
    pub url: String,
    #[serde(skip)]
    pub registry: RegistryUrl,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auth: Option<OciAuth>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", content = "details", rename_all = "lowercase")]
pub enum OciAuth {
    User {
        username: String,
        token: Secret,
    },
    /// HTTP GET to `url`; the body is base64 of `username:password`.
    Webhook {
        url: String,
    },
    Provider(ProviderAuth),
}

#[derive(Debug, Clone, Serialize)]
pub struct ProviderAuth {
    pub flavor: ProviderFlavor,
    pub credentials: EcrCredentials,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderFlavor {
    Ecr,
}

#[derive(Debug, Clone, Serialize)]
pub struct EcrCredentials {
    pub region: String,
    pub api_key: Secret,
    pub secret: Secret,
}

/// `docker-file`: build from a git repository or a tar.gz.
#[derive(Debug, Clone, Serialize)]
pub struct DockerFile {
    #[serde(flatten)]
    pub source: BuildSource,
    /// Normalised absolute path inside the source (default `/`).
    pub context_dir: String,
    /// Normalised absolute path from the source root (default `/Dockerfile`).
    pub build_file: String,
    /// Credentials for the registries the Dockerfile's `FROM` lines need.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub credentials: Vec<RegistryCredential>,
}

/// Exactly one of `repo` or `targz_url`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BuildSource {
    Repo(GitRepo),
    TargzUrl(String),
}

#[derive(Debug, Clone, Serialize)]
pub struct GitRepo {
    pub url: String,
    #[serde(skip)]
    pub remote: GitRemote,
    /// `None`: the remote's default branch.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub branch: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auth: Option<GitAuth>,
    #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
    pub git_ref: Option<GitRef>,
    /// Submodules are fetched only when asked for.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub submodules: bool,
}

/// The transport and host of a repository URL, checked at decode time.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GitRemote {
    pub transport: GitTransport,
    /// Host name or address, without port or user.
    pub host: String,
    pub port: Option<u16>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GitTransport {
    #[default]
    Https,
    /// Allowed at fetch time only for hosts configured as insecure.
    Http,
    Ssh,
}

#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", content = "credentials", rename_all = "lowercase")]
pub enum GitAuth {
    Http {
        username: String,
        password: Secret,
    },
    Ssh {
        username: String,
        /// PEM.
        private_key: Secret,
        #[serde(skip_serializing_if = "Option::is_none")]
        passphrase: Option<Secret>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type", content = "value", rename_all = "lowercase")]
pub enum GitRef {
    Tag(String),
    /// A full commit hash, lowercase.
    Hash(String),
}

#[derive(Debug, Clone, Serialize)]
pub struct RegistryCredential {
    /// Registry host (`host[:port]`), normalised without scheme; `docker.io` for Docker Hub.
    pub url: String,
    pub username: String,
    pub token: Secret,
}

/// Optional build settings; docker-file only.
#[derive(Debug, Clone, Default, Serialize)]
pub struct BuildOptions {
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub args: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub platform: Option<String>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub no_cache: bool,
    /// Build secrets by id, for `RUN --mount=type=secret,id=ID` (served by the build's session,
    /// never in the image, a log or a result; serialized masked).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub secrets: BTreeMap<String, Secret>,
    /// `build.ssh: true`: `RUN --mount=type=ssh` gets an agent holding this key, the job's git
    /// SSH key (serialized as `true`).
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "serialize_present"
    )]
    pub ssh: Option<SshKey>,
}

/// A private key (PEM or OpenSSH) and its passphrase, for a build's SSH agent.
#[derive(Debug, Clone)]
pub struct SshKey {
    pub private_key: Secret,
    pub passphrase: Option<Secret>,
}

fn serialize_present<S: serde::Serializer, T>(
    value: &Option<T>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.serialize_bool(value.is_some())
}

/// The largest build secret (BuildKit's own limit for a secret is 500 KiB).
pub const MAX_BUILD_SECRET_BYTES: usize = 500 * 1024;

/// A job's own choice of destination; the worker's configured default otherwise. Credentials
/// for a destination registry are the worker's, never the job's.
#[derive(Debug, Clone, Serialize)]
pub struct DestinationOverride {
    pub kind: DestinationKind,
    /// Repository template, as in `destination.repository` of the config.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repository: Option<String>,
    /// Tag template, as in `destination.tag` of the config.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
}

/// Where finished images go (a job's `destination.kind`, the config's `destination.kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DestinationKind {
    /// An OCI image layout on local disk.
    OciLayout,
    /// A registry, over the distribution API.
    Registry,
}

fn display<T: fmt::Display, S: Serializer>(value: &T, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.collect_str(value)
}

#[cfg(test)]
mod tests;
