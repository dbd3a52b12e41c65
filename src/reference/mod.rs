//! Image references: the distribution (docker) reference grammar, as `docker pull`
//! understands it, parsed by hand.
//!
//! ```text
//! reference      := name [":" tag] ["@" digest]
//! name           := [domain "/"] path-component ("/" path-component)*
//! domain         := host [":" port]
//! host           := domain-name | IPv4 | "[" IPv6 "]"
//! domain-name    := label ("." label)*      label := [a-zA-Z0-9] | [a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9]
//! port           := [0-9]+
//! path-component := [a-z0-9]+ (separator [a-z0-9]+)*   separator := "." | "_" | "__" | "-"+
//! tag            := [A-Za-z0-9_][A-Za-z0-9_.-]{0,127}
//! digest         := algorithm ":" hex           algorithm := [a-z0-9]+ ([+._-] [a-z0-9]+)*
//! hex            := [0-9a-fA-F]{32,}            (sha256: 64, sha384: 96, sha512: 128 lowercase)
//! ```
//!
//! Normalisation follows docker's `ParseNormalizedNamed`: the first path element is a
//! registry only if it contains `.` or `:`, is `localhost`, or contains an uppercase
//! letter; otherwise the registry is `docker.io`. `index.docker.io` becomes `docker.io`,
//! a one-element name on `docker.io` gets `library/`, and a reference with neither tag
//! nor digest gets the tag `latest`. `registry/repository` is at most 255 characters.
//!
//! Every [`ReferenceError`] message names what is wrong and quotes the offending part;
//! none of them ever repeats the credentials of a registry URL.
//!
//! Choices where docker leaves room:
//! * An uppercase first element is a registry, as in distribution (`Foo/bar` is registry
//!   `Foo`); registry names keep the case they were written in.
//! * The 255-character limit counts the normalised `registry/repository`, as
//!   `ParseNormalizedNamed` does (so `a/…/a` of 255 characters is too long once
//!   `docker.io/` is added). Newer distribution/reference counts only the path.
//! * A 64-hex name is refused only when it is the whole input, as in docker:
//!   `<64 hex>:tag` and `docker.io/<64 hex>` are accepted.
//! * Digests: like go-digest, only sha256, sha384 and sha512 are supported; another
//!   well-formed algorithm is refused as unsupported.
//! * IPv6 hosts must be real IPv6 addresses (`[1:2:3:4:5:6:7:8:9]` is refused), which is
//!   stricter than distribution's "hex digits and colons in brackets".
//!
//! The grammar of git repository URLs, the other kind of source a job names, is in `git_url`
//! (`parse_git_url`).

mod git_url;

use std::fmt;
use std::net::Ipv6Addr;
use std::str::FromStr;

pub(crate) use self::git_url::parse_git_url;

/// The registry docker uses for names without a registry.
pub const DOCKER_HUB: &str = "docker.io";
/// The host that actually serves the distribution API for [`DOCKER_HUB`].
pub const DOCKER_HUB_API_HOST: &str = "registry-1.docker.io";
/// The legacy Docker Hub name that docker rewrites to [`DOCKER_HUB`].
const LEGACY_DOCKER_HUB: &str = "index.docker.io";
/// The tag given to a reference that has neither tag nor digest.
pub const DEFAULT_TAG: &str = "latest";
/// The namespace of Docker Hub's official images.
const OFFICIAL_PREFIX: &str = "library/";
/// Maximum length of `registry/repository` (tag and digest not counted).
pub const NAME_MAX_LEN: usize = 255;
/// Maximum length of a tag.
pub const TAG_MAX_LEN: usize = 128;

/// A parsed, normalised image reference: `registry/repository[:tag][@digest]`.
///
/// A `Reference` always has a tag, a digest, or both.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Reference {
    registry: String,
    repository: String,
    tag: Option<String>,
    digest: Option<String>,
}

/// The scheme and host of a registry origin's `url`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryUrl {
    /// The scheme the url was written with, if any.
    pub scheme: Option<Scheme>,
    /// `host[:port]` exactly as written in the url (IPv6 hosts keep their brackets).
    pub host: String,
}

/// A registry url scheme.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Http,
    Https,
}

/// Why an image reference or registry url was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReferenceError {
    #[error(
        "empty image reference: expected [registry/]repository[:tag][@digest], e.g. \"mysql:5.7\""
    )]
    Empty,

    #[error("invalid reference {input:?}: there is no repository name before the \":\" tag or \"@\" digest")]
    MissingName { input: String },

    #[error("invalid repository name {input:?}: a name of 64 hexadecimal characters is ambiguous with an image ID; name the registry explicitly, e.g. \"docker.io/{input}\"")]
    AmbiguousHexName { input: String },

    #[error("invalid registry {registry:?}: {reason}")]
    InvalidRegistry {
        registry: String,
        reason: &'static str,
    },

    #[error("repository name must be lowercase: {repository:?}")]
    UppercaseRepository { repository: String },

    #[error("invalid repository name {repository:?}: {reason}")]
    InvalidRepository { repository: String, reason: String },

    #[error("repository name {name:?} is {len} characters long; at most 255 are allowed (registry and path, not counting tag or digest)")]
    NameTooLong { name: String, len: usize },

    #[error("invalid tag {tag:?}: a tag starts with a letter, digit or _ and has at most 128 of [A-Za-z0-9_.-]")]
    InvalidTag { tag: String },

    #[error("invalid digest {digest:?}: {reason}")]
    InvalidDigest {
        digest: String,
        reason: &'static str,
    },

    #[error(
        "unsupported digest algorithm {algorithm:?} in {digest:?}: use sha256, sha384 or sha512"
    )]
    UnsupportedDigestAlgorithm { digest: String, algorithm: String },

    #[error("{target:?} names registry {registry:?}, but a docker-hub origin only pulls from docker.io; use a registry origin with url {registry:?} instead")]
    NotDockerHub { target: String, registry: String },

    #[error("target {target:?} starts with registry {target_registry:?}, but the url's registry is {url_registry:?}; write the target relative to the url (organization/image:tag), or as \"{url_registry}/{target}\" if {target_registry:?} really is part of the repository path")]
    RegistryMismatch {
        target: String,
        target_registry: String,
        url_registry: String,
    },

    #[error("unsupported registry url scheme {scheme:?}: write https://, http://, or no scheme")]
    UnsupportedScheme { scheme: String },

    #[error("registry url for {host:?} must not contain credentials (user:password@); configure them separately")]
    UrlCredentials { host: String },

    #[error("invalid registry url {url:?}: {reason}")]
    InvalidRegistryUrl { url: String, reason: String },
}

impl Reference {
    /// Parses as `docker pull` does, normalised (docker.io, library/, latest).
    pub fn parse(input: &str) -> Result<Reference, ReferenceError> {
        if input.is_empty() {
            return Err(ReferenceError::Empty);
        }
        if is_image_id(input) {
            return Err(ReferenceError::AmbiguousHexName {
                input: input.to_string(),
            });
        }
        let parts = split_reference(input)?;
        let (domain, path) = split_docker_domain(parts.name);
        if let Some(domain) = domain {
            check_domain(domain).map_err(|reason| ReferenceError::InvalidRegistry {
                registry: domain.to_string(),
                reason,
            })?;
        }
        check_repository_path(path)?;
        let registry = match domain {
            None | Some(LEGACY_DOCKER_HUB) => DOCKER_HUB,
            Some(domain) => domain,
        };
        let repository = if registry == DOCKER_HUB && !path.contains('/') {
            format!("{OFFICIAL_PREFIX}{path}")
        } else {
            path.to_string()
        };
        Reference::build(registry.to_string(), repository, parts.tag, parts.digest)
    }

    /// A docker-hub origin's `target`: like [`Reference::parse`], but a target naming a
    /// registry other than docker.io (e.g. `ghcr.io/x/y`) is an error that says to use a
    /// registry origin instead.
    pub fn from_docker_hub(target: &str) -> Result<Reference, ReferenceError> {
        let reference = Reference::parse(target)?;
        if reference.registry == DOCKER_HUB {
            return Ok(reference);
        }
        if !looks_like_registry(&reference.registry) {
            // Only an uppercase letter made docker read the first element as a registry
            // ("MyOrg/app"); on Docker Hub that is an uppercase organisation.
            return Err(ReferenceError::UppercaseRepository {
                repository: format!("{}/{}", reference.registry, reference.repository),
            });
        }
        Err(ReferenceError::NotDockerHub {
            target: target.to_string(),
            registry: reference.registry,
        })
    }

    /// A registry origin's `url` + `target` combined: `url/organization/image:tag`.
    ///
    /// `url` may carry a scheme (`https://` or `http://`, returned in
    /// [`RegistryUrl::scheme`]; anything else is an error) and a path prefix
    /// (`registry.example.com/team`) that is joined before the target path. Userinfo,
    /// query and fragment are refused, and userinfo is never echoed in the error.
    ///
    /// A target that begins with the url's host (`r.example.com:5000/org/img:1`) is
    /// not doubled, and then the url's path prefix is not doubled either if the target
    /// already starts with it. Any other registry-looking first element (with `.` or `:`,
    /// or `localhost`) is refused as a mismatch; prefix it with the url's host if it
    /// really is part of the path.
    ///
    /// The registry of the result is the url's `host[:port]`; the Docker Hub hosts
    /// (`docker.io`, `index.docker.io`, `registry-1.docker.io`, `registry.hub.docker.com`)
    /// become `docker.io`, and only there is `library/` added to a one-element path.
    /// Errors about the url say "registry url"; the others are about the target.
    pub fn from_registry(
        url: &str,
        target: &str,
    ) -> Result<(RegistryUrl, Reference), ReferenceError> {
        let (registry_url, prefix) = parse_registry_url(url)?;
        if target.is_empty() {
            return Err(ReferenceError::Empty);
        }
        let parts = split_reference(target)?;

        let mut path = parts.name;
        let mut host_given = false;
        if let Some((first, rest)) = parts.name.split_once('/') {
            if same_registry(first, &registry_url.host) {
                path = rest;
                host_given = true;
            } else if looks_like_registry(first) {
                return Err(ReferenceError::RegistryMismatch {
                    target: target.to_string(),
                    target_registry: first.to_string(),
                    url_registry: registry_url.host.clone(),
                });
            }
        }
        check_repository_path(path)?;

        let prefix_present = host_given
            && (path == prefix
                || path
                    .strip_prefix(prefix.as_str())
                    .is_some_and(|rest| rest.starts_with('/')));
        let path = if prefix.is_empty() || prefix_present {
            path.to_string()
        } else {
            format!("{prefix}/{path}")
        };

        let hub = is_docker_hub_host(&registry_url.host);
        let registry = if hub {
            DOCKER_HUB.to_string()
        } else {
            registry_url.host.clone()
        };
        let repository = if hub && !path.contains('/') {
            format!("{OFFICIAL_PREFIX}{path}")
        } else {
            path
        };
        let reference = Reference::build(registry, repository, parts.tag, parts.digest)?;
        Ok((registry_url, reference))
    }

    /// The registry: `"docker.io"`, `"localhost:5000"`, `"[::1]:5000"`.
    pub fn registry(&self) -> &str {
        &self.registry
    }

    /// The repository path within the registry: `"library/mysql"`.
    pub fn repository(&self) -> &str {
        &self.repository
    }

    /// The tag, if any (`latest` was added when neither tag nor digest was given).
    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    /// The digest (`algorithm:hex`), if any.
    pub fn digest(&self) -> Option<&str> {
        self.digest.as_deref()
    }

    /// `registry/repository`, without tag or digest.
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }

    /// The host to talk the distribution API to: `"registry-1.docker.io"` for
    /// docker.io, else [`Reference::registry`].
    pub fn api_host(&self) -> &str {
        if self.registry == DOCKER_HUB {
            DOCKER_HUB_API_HOST
        } else {
            &self.registry
        }
    }

    /// A copy with `tag` as its tag (the digest is kept).
    pub fn with_tag(&self, tag: &str) -> Result<Reference, ReferenceError> {
        check_tag(tag)?;
        Ok(Reference {
            tag: Some(tag.to_string()),
            ..self.clone()
        })
    }

    /// A copy without the digest; it gets the tag `latest` if it has no tag.
    pub fn without_digest(&self) -> Reference {
        Reference {
            tag: Some(self.tag.clone().unwrap_or_else(|| DEFAULT_TAG.to_string())),
            digest: None,
            ..self.clone()
        }
    }

    /// Validates the length, tag and digest, and adds `latest` when both are absent.
    fn build(
        registry: String,
        repository: String,
        tag: Option<&str>,
        digest: Option<&str>,
    ) -> Result<Reference, ReferenceError> {
        let len = registry.len() + 1 + repository.len();
        if len > NAME_MAX_LEN {
            return Err(ReferenceError::NameTooLong {
                name: format!("{registry}/{repository}"),
                len,
            });
        }
        if let Some(tag) = tag {
            check_tag(tag)?;
        }
        if let Some(digest) = digest {
            check_digest(digest)?;
        }
        let tag = match (tag, digest) {
            (None, None) => Some(DEFAULT_TAG.to_string()),
            (tag, _) => tag.map(str::to_string),
        };
        Ok(Reference {
            registry,
            repository,
            tag,
            digest: digest.map(str::to_string),
        })
    }
}

impl fmt::Display for Reference {
    /// The full normalised form: `docker.io/library/mysql:5.7`, `host:5000/a/b@sha256:…`,
    /// `docker.io/a/b:t@sha256:…` (tag before digest).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

impl FromStr for Reference {
    type Err = ReferenceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Reference::parse(s)
    }
}

impl Scheme {
    /// `"http"` or `"https"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }
}

impl fmt::Display for Scheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for RegistryUrl {
    /// `https://host[:port]`, or just `host[:port]` when no scheme was given.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.scheme {
            Some(scheme) => write!(f, "{scheme}://{}", self.host),
            None => f.write_str(&self.host),
        }
    }
}

/// A reference cut at its `:` tag and `@` digest, nothing validated yet.
struct Parts<'a> {
    name: &'a str,
    tag: Option<&'a str>,
    digest: Option<&'a str>,
}

/// Splits `name[:tag][@digest]`. The digest starts at the first `@`; the tag is after
/// the last `:` that follows the last `/` (a `:` before it belongs to a port).
fn split_reference(input: &str) -> Result<Parts<'_>, ReferenceError> {
    let (name_tag, digest) = match input.split_once('@') {
        Some((name_tag, digest)) => (name_tag, Some(digest)),
        None => (input, None),
    };
    if name_tag.starts_with('[') && !name_tag.contains('/') {
        return Err(ReferenceError::InvalidRepository {
            repository: name_tag.to_string(),
            reason: "an IPv6 registry must be followed by \"/\" and a repository path".to_string(),
        });
    }
    let last_slash = name_tag.rfind('/');
    let (name, tag) = match name_tag.rfind(':') {
        Some(colon) if !matches!(last_slash, Some(slash) if slash > colon) => {
            (&name_tag[..colon], Some(&name_tag[colon + 1..]))
        }
        _ => (name_tag, None),
    };
    if name.is_empty() {
        return Err(ReferenceError::MissingName {
            input: input.to_string(),
        });
    }
    Ok(Parts { name, tag, digest })
}

/// Docker's rule for whether the first element of a name is a registry.
fn split_docker_domain(name: &str) -> (Option<&str>, &str) {
    match name.split_once('/') {
        Some((first, rest))
            if looks_like_registry(first) || first.chars().any(char::is_uppercase) =>
        {
            (Some(first), rest)
        }
        _ => (None, name),
    }
}

/// Contains `.` or `:`, or is `localhost`.
fn looks_like_registry(first: &str) -> bool {
    first == "localhost" || first.contains(['.', ':'])
}

fn is_docker_hub_host(host: &str) -> bool {
    [
        DOCKER_HUB,
        LEGACY_DOCKER_HUB,
        DOCKER_HUB_API_HOST,
        "registry.hub.docker.com",
    ]
    .iter()
    .any(|hub| host.eq_ignore_ascii_case(hub))
}

fn same_registry(a: &str, b: &str) -> bool {
    a.eq_ignore_ascii_case(b) || (is_docker_hub_host(a) && is_docker_hub_host(b))
}

/// Exactly 64 lowercase hex characters: what docker takes for an image ID.
fn is_image_id(input: &str) -> bool {
    input.len() == 64
        && input
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Checks `host[:port]`; the error is the reason.
fn check_domain(domain: &str) -> Result<(), &'static str> {
    const IPV6: &str = "an IPv6 address goes in [ ] and has only hex digits and colons (no zone, no embedded IPv4)";
    let port = if let Some(rest) = domain.strip_prefix('[') {
        let end = rest.find(']').ok_or(IPV6)?;
        let address = &rest[..end];
        if address.is_empty()
            || !address.bytes().all(|b| b.is_ascii_hexdigit() || b == b':')
            || address.parse::<Ipv6Addr>().is_err()
        {
            return Err(IPV6);
        }
        let after = &rest[end + 1..];
        if after.is_empty() {
            None
        } else {
            Some(
                after
                    .strip_prefix(':')
                    .ok_or("only \":port\" may follow the ] of an IPv6 address")?,
            )
        }
    } else {
        let (host, port) = match domain.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (domain, None),
        };
        let label_ok = |label: &str| {
            let bytes = label.as_bytes();
            !bytes.is_empty()
                && bytes
                    .iter()
                    .all(|b| b.is_ascii_alphanumeric() || *b == b'-')
                && bytes[0] != b'-'
                && bytes[bytes.len() - 1] != b'-'
        };
        if !host.split('.').all(label_ok) {
            return Err("a host name is dot-separated labels of letters, digits and inner hyphens");
        }
        port
    };
    match port {
        Some(port) if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) => {
            Err("the port after \":\" must be digits")
        }
        _ => Ok(()),
    }
}

/// Checks a repository path: lowercase first (docker's clearer message), then each
/// component.
fn check_repository_path(path: &str) -> Result<(), ReferenceError> {
    if path.chars().any(char::is_uppercase) {
        return Err(ReferenceError::UppercaseRepository {
            repository: path.to_string(),
        });
    }
    for component in path.split('/') {
        check_path_component(component).map_err(|reason| ReferenceError::InvalidRepository {
            repository: path.to_string(),
            reason,
        })?;
    }
    Ok(())
}

/// `[a-z0-9]+ (separator [a-z0-9]+)*`, separator `.` | `_` | `__` | `-`+.
fn check_path_component(component: &str) -> Result<(), String> {
    const RULE: &str = "path components are lowercase letters and digits, separated by one \".\", one or two \"_\", or any number of \"-\"";
    if component.is_empty() {
        return Err(
            "it has an empty path component (a leading, trailing or doubled \"/\")".to_string(),
        );
    }
    if let Some(bad) = component
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!("component {component:?} contains {bad:?}; {RULE}"));
    }
    let bytes = component.as_bytes();
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if !alnum(bytes[0]) || !alnum(bytes[bytes.len() - 1]) {
        return Err(format!(
            "component {component:?} must start and end with a lowercase letter or digit"
        ));
    }
    let mut i = 0;
    while i < bytes.len() {
        if alnum(bytes[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && !alnum(bytes[i]) {
            i += 1;
        }
        let separator = &component[start..i];
        let ok = matches!(separator, "." | "_" | "__") || separator.bytes().all(|b| b == b'-');
        if !ok {
            return Err(format!(
                "component {component:?} has the separator {separator:?}; {RULE}"
            ));
        }
    }
    Ok(())
}

/// `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`.
fn check_tag(tag: &str) -> Result<(), ReferenceError> {
    let word = |b: &u8| b.is_ascii_alphanumeric() || *b == b'_';
    let bytes = tag.as_bytes();
    let ok = !bytes.is_empty()
        && bytes.len() <= TAG_MAX_LEN
        && word(&bytes[0])
        && bytes.iter().all(|b| word(b) || *b == b'.' || *b == b'-');
    if ok {
        Ok(())
    } else {
        Err(ReferenceError::InvalidTag {
            tag: tag.to_string(),
        })
    }
}

/// `algorithm:hex`; sha256/sha384/sha512 with exactly 64/96/128 lowercase hex digits.
fn check_digest(digest: &str) -> Result<(), ReferenceError> {
    let invalid = |reason| ReferenceError::InvalidDigest {
        digest: digest.to_string(),
        reason,
    };
    let (algorithm, hex) = digest
        .split_once(':')
        .ok_or_else(|| invalid("a digest is algorithm:hex, e.g. sha256:<64 hex digits>"))?;
    let algorithm_ok = algorithm.split(['+', '.', '_', '-']).all(|part| {
        !part.is_empty()
            && part
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    });
    if !algorithm_ok {
        return Err(invalid(
            "the algorithm is lowercase letters and digits, optionally joined by single +, ., _ or -",
        ));
    }
    let (expected_len, reason) = match algorithm {
        "sha256" => (64, "a sha256 digest has exactly 64 lowercase hex digits"),
        "sha384" => (96, "a sha384 digest has exactly 96 lowercase hex digits"),
        "sha512" => (128, "a sha512 digest has exactly 128 lowercase hex digits"),
        _ => {
            if hex.len() < 32 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(invalid("the encoded part must be at least 32 hex digits"));
            }
            return Err(ReferenceError::UnsupportedDigestAlgorithm {
                digest: digest.to_string(),
                algorithm: algorithm.to_string(),
            });
        }
    };
    let lower_hex = hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    if hex.len() != expected_len || !lower_hex {
        return Err(invalid(reason));
    }
    Ok(())
}

/// Splits a registry url into its scheme/host and path prefix (without slashes at
/// either end). Credentials are refused before anything else is looked at, and only
/// the part after the last `@` is ever quoted.
fn parse_registry_url(url: &str) -> Result<(RegistryUrl, String), ReferenceError> {
    if let Some(at) = url.rfind('@') {
        let after = &url[at + 1..];
        let end = after.find(['/', '?', '#']).unwrap_or(after.len());
        return Err(ReferenceError::UrlCredentials {
            host: after[..end].to_string(),
        });
    }
    let (scheme, rest) = match url.split_once("://") {
        Some((scheme, rest)) => {
            let scheme = if scheme.eq_ignore_ascii_case("https") {
                Scheme::Https
            } else if scheme.eq_ignore_ascii_case("http") {
                Scheme::Http
            } else {
                return Err(ReferenceError::UnsupportedScheme {
                    scheme: scheme.to_string(),
                });
            };
            (Some(scheme), rest)
        }
        None => (None, url),
    };
    if let Some(at) = rest.find(['?', '#']) {
        // Quote the url only up to the query/fragment: a query may carry a token.
        let shown = url.len() - rest.len() + at;
        return Err(ReferenceError::InvalidRegistryUrl {
            url: url[..shown].to_string(),
            reason: "a registry url must not have a query (?...) or fragment (#...)".to_string(),
        });
    }
    let rest = rest.trim_end_matches('/');
    let (host, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    if host.is_empty() {
        return Err(ReferenceError::InvalidRegistryUrl {
            url: url.to_string(),
            reason: "it has no host".to_string(),
        });
    }
    // From here on the url holds neither credentials nor query: it is safe to quote.
    check_domain(host).map_err(|reason| ReferenceError::InvalidRegistryUrl {
        url: url.to_string(),
        reason: format!("host {host:?}: {reason}"),
    })?;
    if !prefix.is_empty() {
        check_repository_path(prefix).map_err(|e| ReferenceError::InvalidRegistryUrl {
            url: url.to_string(),
            reason: format!("its path is joined before the target, so {e}"),
        })?;
    }
    Ok((
        RegistryUrl {
            scheme,
            host: host.to_string(),
        },
        prefix.to_string(),
    ))
}

#[cfg(test)]
mod tests;
