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

use std::fmt;
use std::net::Ipv6Addr;
use std::str::FromStr;

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
mod tests {
    use super::*;

    macro_rules! hex64 {
        () => {
            "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
        };
    }
    const HEX64: &str = hex64!();
    const SHA256: &str = concat!("sha256:", hex64!());
    const SHA384: &str = concat!("sha384:", hex64!(), "0123456789abcdef0123456789abcdef");
    const SHA512: &str = concat!("sha512:", hex64!(), hex64!());

    /// The variant name, so tables can say which kind of error they expect.
    fn kind(err: &ReferenceError) -> &'static str {
        match err {
            ReferenceError::Empty => "Empty",
            ReferenceError::MissingName { .. } => "MissingName",
            ReferenceError::AmbiguousHexName { .. } => "AmbiguousHexName",
            ReferenceError::InvalidRegistry { .. } => "InvalidRegistry",
            ReferenceError::UppercaseRepository { .. } => "UppercaseRepository",
            ReferenceError::InvalidRepository { .. } => "InvalidRepository",
            ReferenceError::NameTooLong { .. } => "NameTooLong",
            ReferenceError::InvalidTag { .. } => "InvalidTag",
            ReferenceError::InvalidDigest { .. } => "InvalidDigest",
            ReferenceError::UnsupportedDigestAlgorithm { .. } => "UnsupportedDigestAlgorithm",
            ReferenceError::NotDockerHub { .. } => "NotDockerHub",
            ReferenceError::RegistryMismatch { .. } => "RegistryMismatch",
            ReferenceError::UnsupportedScheme { .. } => "UnsupportedScheme",
            ReferenceError::UrlCredentials { .. } => "UrlCredentials",
            ReferenceError::InvalidRegistryUrl { .. } => "InvalidRegistryUrl",
        }
    }

    /// (input, registry, repository, tag, digest)
    type Valid = (String, String, String, Option<String>, Option<String>);

    fn ok(
        input: &str,
        registry: &str,
        repository: &str,
        tag: Option<&str>,
        digest: Option<&str>,
    ) -> Valid {
        (
            input.to_string(),
            registry.to_string(),
            repository.to_string(),
            tag.map(str::to_string),
            digest.map(str::to_string),
        )
    }

    fn assert_parts(what: &str, got: &Reference, want: &Valid) {
        let (_, registry, repository, tag, digest) = want;
        assert_eq!(got.registry(), registry, "registry of {what}");
        assert_eq!(got.repository(), repository, "repository of {what}");
        assert_eq!(got.tag(), tag.as_deref(), "tag of {what}");
        assert_eq!(got.digest(), digest.as_deref(), "digest of {what}");
    }

    #[test]
    fn parse_accepts_valid_references_and_normalises_them() {
        let latest = Some("latest");
        let long_path = format!("{}a", "a/".repeat(122)); // "localhost/" + 245 = 255
        let cases = vec![
            // distribution's reference_test.go, normalised as docker pull does
            ok("test_com", "docker.io", "library/test_com", latest, None),
            ok(
                "test.com:tag",
                "docker.io",
                "library/test.com",
                Some("tag"),
                None,
            ),
            ok(
                "test.com:5000",
                "docker.io",
                "library/test.com",
                Some("5000"),
                None,
            ),
            ok("test.com/repo:tag", "test.com", "repo", Some("tag"), None),
            ok("test:5000/repo", "test:5000", "repo", latest, None),
            ok("test:5000/repo:tag", "test:5000", "repo", Some("tag"), None),
            ok(
                &format!("test:5000/repo@{SHA256}"),
                "test:5000",
                "repo",
                None,
                Some(SHA256),
            ),
            ok(
                &format!("test:5000/repo:tag@{SHA256}"),
                "test:5000",
                "repo",
                Some("tag"),
                Some(SHA256),
            ),
            ok(
                "lowercase:Uppercase",
                "docker.io",
                "library/lowercase",
                Some("Uppercase"),
                None,
            ),
            ok(
                "sub-dom1.foo.com/bar/baz/quux:some-long-tag",
                "sub-dom1.foo.com",
                "bar/baz/quux",
                Some("some-long-tag"),
                None,
            ),
            ok(
                "b.gcr.io/test.example.com/my-app:test.example.com",
                "b.gcr.io",
                "test.example.com/my-app",
                Some("test.example.com"),
                None,
            ),
            ok(
                "xn--n3h.com/myimage:xn--n3h.com",
                "xn--n3h.com",
                "myimage",
                Some("xn--n3h.com"),
                None,
            ),
            ok(
                &format!("xn--7o8h.com/myimage:xn--7o8h.com@{SHA512}"),
                "xn--7o8h.com",
                "myimage",
                Some("xn--7o8h.com"),
                Some(SHA512),
            ),
            ok(
                "foo_bar.com:8080",
                "docker.io",
                "library/foo_bar.com",
                Some("8080"),
                None,
            ),
            ok(
                "foo/foo_bar.com:8080",
                "docker.io",
                "foo/foo_bar.com",
                Some("8080"),
                None,
            ),
            ok(
                "192.168.1.1",
                "docker.io",
                "library/192.168.1.1",
                latest,
                None,
            ),
            ok("192.168.1.1/repo", "192.168.1.1", "repo", latest, None),
            ok(
                "192.168.1.1:5000/repo:5050",
                "192.168.1.1:5000",
                "repo",
                Some("5050"),
                None,
            ),
            ok(
                "127.0.0.1:5000/docker/docker",
                "127.0.0.1:5000",
                "docker/docker",
                latest,
                None,
            ),
            ok("[2001:db8::1]/repo", "[2001:db8::1]", "repo", latest, None),
            ok(
                "[2001:db8:1:2:3:4:5:6]/repo:tag",
                "[2001:db8:1:2:3:4:5:6]",
                "repo",
                Some("tag"),
                None,
            ),
            ok(
                &format!("[2001:db8::1]:5000/repo:tag@{SHA256}"),
                "[2001:db8::1]:5000",
                "repo",
                Some("tag"),
                Some(SHA256),
            ),
            ok(
                "[2001:db8::]:5000/repo",
                "[2001:db8::]:5000",
                "repo",
                latest,
                None,
            ),
            ok("[::1]:5000/foo", "[::1]:5000", "foo", latest, None),
            ok("localhost/foo", "localhost", "foo", latest, None),
            ok("localhost:5000/foo", "localhost:5000", "foo", latest, None),
            ok("test-com:8080/foo", "test-com:8080", "foo", latest, None),
            // normalize_test.go: docker.io and its legacy name
            ok(
                "index.docker.io/library/ubuntu",
                "docker.io",
                "library/ubuntu",
                latest,
                None,
            ),
            ok(
                "index.docker.io/debian",
                "docker.io",
                "library/debian",
                latest,
                None,
            ),
            ok(
                "docker.io/ubuntu",
                "docker.io",
                "library/ubuntu",
                latest,
                None,
            ),
            ok(
                "docker.io/library/foo/bar",
                "docker.io",
                "library/foo/bar",
                latest,
                None,
            ),
            ok("mysql:5.7", "docker.io", "library/mysql", Some("5.7"), None),
            ok(
                &format!("org/image@{SHA256}"),
                "docker.io",
                "org/image",
                None,
                Some(SHA256),
            ),
            ok(
                &format!("busybox:latest@{SHA256}"),
                "docker.io",
                "library/busybox",
                latest,
                Some(SHA256),
            ),
            ok(
                &format!("foo@{SHA384}"),
                "docker.io",
                "library/foo",
                None,
                Some(SHA384),
            ),
            // an uppercase first element is a registry, as in distribution
            ok(
                "UPPERCASEDOMAIN.com/repo",
                "UPPERCASEDOMAIN.com",
                "repo",
                latest,
                None,
            ),
            ok("Foo/bar", "Foo", "bar", latest, None),
            ok("DOCKER/docker", "DOCKER", "docker", latest, None),
            // path-component separators
            ok("a__b", "docker.io", "library/a__b", latest, None),
            ok("a--b", "docker.io", "library/a--b", latest, None),
            ok(
                "docker---rules/docker",
                "docker.io",
                "docker---rules/docker",
                latest,
                None,
            ),
            ok("x/a.b_c-d", "docker.io", "x/a.b_c-d", latest, None),
            ok("d/docker", "docker.io", "d/docker", latest, None),
            ok("jess/t", "docker.io", "jess/t", latest, None),
            // 64-hex is only ambiguous as the whole input
            ok(
                &format!("docker.io/{HEX64}"),
                "docker.io",
                &format!("library/{HEX64}"),
                latest,
                None,
            ),
            ok(
                &format!("{HEX64}:v1"),
                "docker.io",
                &format!("library/{HEX64}"),
                Some("v1"),
                None,
            ),
            ok(
                &HEX64[..63],
                "docker.io",
                &format!("library/{}", &HEX64[..63]),
                latest,
                None,
            ),
            ok(
                "thisisthesongthatneverendsitgoesonandonandonthisisthesongthatnev",
                "docker.io",
                "library/thisisthesongthatneverendsitgoesonandonandonthisisthesongthatnev",
                latest,
                None,
            ),
            // limits
            ok(
                &format!("localhost/{long_path}"),
                "localhost",
                &long_path,
                latest,
                None,
            ),
            ok(
                &format!("foo:{}", "t".repeat(128)),
                "docker.io",
                "library/foo",
                Some(&"t".repeat(128)),
                None,
            ),
            ok(
                "foo:_under.score-tag",
                "docker.io",
                "library/foo",
                Some("_under.score-tag"),
                None,
            ),
        ];
        assert!(cases.len() >= 40);
        for case in &cases {
            let input = &case.0;
            let got =
                Reference::parse(input).unwrap_or_else(|e| panic!("{input:?} should parse: {e}"));
            assert_parts(input, &got, case);
            // The display form is itself a reference that parses to the same thing.
            let again = Reference::parse(&got.to_string())
                .unwrap_or_else(|e| panic!("display of {input:?} ({got}) should parse: {e}"));
            assert_eq!(again, got, "round trip of {input:?}");
        }
    }

    #[test]
    fn parse_rejects_invalid_references_with_the_right_error() {
        let cases: Vec<(String, &str)> = vec![
            (String::new(), "Empty"),
            (":justtag".into(), "MissingName"),
            (format!("@{SHA256}"), "MissingName"),
            (format!("repo@sha256:{}", "f".repeat(34)), "InvalidDigest"),
            (
                format!("validname@invaliddigest:{HEX64}"),
                "UnsupportedDigestAlgorithm",
            ),
            (
                format!("foo@md5:{}", &HEX64[..32]),
                "UnsupportedDigestAlgorithm",
            ),
            (
                format!("foo@sha256:{}", HEX64.to_uppercase()),
                "InvalidDigest",
            ),
            (format!("foo@sha512:{HEX64}"), "InvalidDigest"),
            ("foo@sha256".into(), "InvalidDigest"),
            ("foo@".into(), "InvalidDigest"),
            (format!("foo@SHA256:{HEX64}"), "InvalidDigest"),
            (format!("foo@{SHA256}@{SHA256}"), "InvalidDigest"),
            ("Uppercase:tag".into(), "UppercaseRepository"),
            (
                "test:5000/Uppercase/lowercase:tag".into(),
                "UppercaseRepository",
            ),
            ("docker.io/Foo/bar".into(), "UppercaseRepository"),
            ("docker/Docker".into(), "UppercaseRepository"),
            (format!("{}a:tag", "a/".repeat(128)), "NameTooLong"),
            // 255 characters of path, but "docker.io/" is counted too
            (format!("{}a:tag", "a/".repeat(127)), "NameTooLong"),
            (format!("localhost/{}aa", "a/".repeat(122)), "NameTooLong"),
            ("aa/asdf$$^/aa".into(), "InvalidRepository"),
            ("[2001:db8::1]".into(), "InvalidRepository"),
            ("[2001:db8::1]:5000".into(), "InvalidRepository"),
            ("[2001:db8::1]:tag".into(), "InvalidRepository"),
            (
                "[fe80::1%@invalidzone]:5000/repo".into(),
                "InvalidRepository",
            ),
            ("[fe80::1%eth0]:5000/repo".into(), "InvalidRegistry"),
            (
                "[2001:db8:3:4::192.0.2.33]:5000/debian".into(),
                "InvalidRegistry",
            ),
            ("[zz::1]/repo".into(), "InvalidRegistry"),
            // distribution only checks [hex and colons]; these are not IPv6 addresses
            ("[1:2:3:4:5:6:7:8:9]/repo".into(), "InvalidRegistry"),
            ("[:::1]/repo".into(), "InvalidRegistry"),
            ("[::1]x/repo".into(), "InvalidRegistry"),
            ("fc00::1:5000/debian".into(), "InvalidRegistry"),
            ("https://github.com/docker/docker".into(), "InvalidRegistry"),
            ("-docker.io/docker/docker".into(), "InvalidRegistry"),
            ("foo_bar.com/repo".into(), "InvalidRegistry"),
            ("test:abc/repo".into(), "InvalidRegistry"),
            ("a..com/repo".into(), "InvalidRegistry"),
            ("-docker".into(), "InvalidRepository"),
            ("-docker/docker".into(), "InvalidRepository"),
            ("docker-/docker".into(), "InvalidRepository"),
            ("trailing-".into(), "InvalidRepository"),
            ("docker///docker".into(), "InvalidRepository"),
            ("docker/".into(), "InvalidRepository"),
            ("a..b".into(), "InvalidRepository"),
            ("a___b".into(), "InvalidRepository"),
            ("dock_.er/docker".into(), "InvalidRegistry"),
            ("dock-.er/docker".into(), "InvalidRegistry"),
            ("____/____".into(), "InvalidRepository"),
            ("foo:bar:baz".into(), "InvalidRepository"),
            ("foo bar".into(), "InvalidRepository"),
            (HEX64.into(), "AmbiguousHexName"),
            (format!("foo:{}", "t".repeat(129)), "InvalidTag"),
            ("foo:-bad".into(), "InvalidTag"),
            ("foo:.bad".into(), "InvalidTag"),
            ("foo:".into(), "InvalidTag"),
        ];
        assert!(cases.len() >= 40);
        for (input, want) in &cases {
            match Reference::parse(input) {
                Ok(got) => panic!("{input:?} should be refused ({want}), got {got}"),
                Err(err) => assert_eq!(kind(&err), *want, "error for {input:?}: {err}"),
            }
        }
    }

    #[test]
    fn display_is_the_full_normalised_form_with_tag_before_digest() {
        let cases = [
            (
                "mysql:5.7".to_string(),
                "docker.io/library/mysql:5.7".to_string(),
            ),
            ("ubuntu".into(), "docker.io/library/ubuntu:latest".into()),
            (
                "docker.io/ubuntu".into(),
                "docker.io/library/ubuntu:latest".into(),
            ),
            (
                "index.docker.io/library/ubuntu".into(),
                "docker.io/library/ubuntu:latest".into(),
            ),
            (
                format!("host:5000/a/b@{SHA256}"),
                format!("host:5000/a/b@{SHA256}"),
            ),
            (
                format!("a/b:t@{SHA256}"),
                format!("docker.io/a/b:t@{SHA256}"),
            ),
            ("[::1]:5000/foo".into(), "[::1]:5000/foo:latest".into()),
        ];
        for (input, want) in &cases {
            let got = Reference::parse(input).unwrap();
            assert_eq!(&got.to_string(), want, "display of {input:?}");
            let via_from_str: Reference = input.parse().unwrap();
            assert_eq!(via_from_str, got, "FromStr of {input:?}");
        }
    }

    #[test]
    fn error_messages_quote_the_offending_part() {
        let cases = [
            ("foo:-bad", "invalid tag \"-bad\": a tag starts with a letter, digit or _ and has at most 128 of [A-Za-z0-9_.-]"),
            ("docker.io/Foo/bar", "repository name must be lowercase: \"Foo/bar\""),
            ("Uppercase:tag", "repository name must be lowercase: \"Uppercase\""),
            ("a___b", "component \"a___b\" has the separator \"___\""),
            ("docker///docker", "invalid repository name \"docker///docker\": it has an empty path component"),
            ("test:abc/repo", "invalid registry \"test:abc\": the port after \":\" must be digits"),
            ("[fe80::1%eth0]:5000/repo", "invalid registry \"[fe80::1%eth0]:5000\": an IPv6 address"),
            ("repo@sha256:abc", "invalid digest \"sha256:abc\": a sha256 digest has exactly 64 lowercase hex digits"),
            (":justtag", "invalid reference \":justtag\": there is no repository name"),
            (HEX64, "ambiguous with an image ID"),
            (
                "[2001:db8::1]:5000",
                "invalid repository name \"[2001:db8::1]:5000\": an IPv6 registry must be followed by \"/\"",
            ),
        ];
        for (input, want) in cases {
            let message = Reference::parse(input).unwrap_err().to_string();
            assert!(
                message.contains(want),
                "message for {input:?} was {message:?}, expected it to contain {want:?}"
            );
        }
        let too_long = Reference::parse(&format!("localhost/{}aa", "a/".repeat(122)))
            .unwrap_err()
            .to_string();
        assert!(
            too_long.contains("is 256 characters long; at most 255"),
            "{too_long}"
        );
    }

    #[test]
    fn from_docker_hub_accepts_only_docker_hub_targets() {
        let accepted = [
            (
                "mysql:5.7".to_string(),
                "docker.io/library/mysql:5.7".to_string(),
            ),
            ("docker.io/x/y".into(), "docker.io/x/y:latest".into()),
            ("index.docker.io/x/y:1".into(), "docker.io/x/y:1".into()),
            (
                format!("org/img@{SHA256}"),
                format!("docker.io/org/img@{SHA256}"),
            ),
        ];
        for (target, want) in &accepted {
            let got =
                Reference::from_docker_hub(target).unwrap_or_else(|e| panic!("{target:?}: {e}"));
            assert_eq!(&got.to_string(), want, "from_docker_hub({target:?})");
        }
        let refused = [
            ("ghcr.io/x/y", "NotDockerHub"),
            ("localhost:5000/x", "NotDockerHub"),
            ("[::1]:5000/x", "NotDockerHub"),
            ("MyOrg/app", "UppercaseRepository"),
            ("Uppercase", "UppercaseRepository"),
            ("x//y", "InvalidRepository"),
        ];
        for (target, want) in refused {
            let err = Reference::from_docker_hub(target).unwrap_err();
            assert_eq!(kind(&err), want, "from_docker_hub({target:?}): {err}");
        }
        let message = Reference::from_docker_hub("ghcr.io/x/y")
            .unwrap_err()
            .to_string();
        assert!(
            message.contains("\"ghcr.io\"") && message.contains("registry origin"),
            "{message}"
        );
    }

    #[test]
    fn from_registry_joins_url_and_target_on_the_url_host() {
        // (url, target, scheme, url host, registry, repository, tag, digest)
        type Case<'a> = (
            &'a str,
            String,
            Option<Scheme>,
            &'a str,
            &'a str,
            &'a str,
            Option<&'a str>,
            Option<&'a str>,
        );
        let cases: Vec<Case> = vec![
            (
                "registry.example.com",
                "org/img:1".into(),
                None,
                "registry.example.com",
                "registry.example.com",
                "org/img",
                Some("1"),
                None,
            ),
            (
                "https://registry.example.com",
                "org/img:1".into(),
                Some(Scheme::Https),
                "registry.example.com",
                "registry.example.com",
                "org/img",
                Some("1"),
                None,
            ),
            (
                "HTTPS://registry.example.com/",
                "org/img".into(),
                Some(Scheme::Https),
                "registry.example.com",
                "registry.example.com",
                "org/img",
                Some("latest"),
                None,
            ),
            (
                "http://localhost:5000",
                "img".into(),
                Some(Scheme::Http),
                "localhost:5000",
                "localhost:5000",
                "img",
                Some("latest"),
                None,
            ),
            (
                "registry.example.com/team",
                "img:2".into(),
                None,
                "registry.example.com",
                "registry.example.com",
                "team/img",
                Some("2"),
                None,
            ),
            (
                "https://registry.example.com/team/sub/",
                "org/img".into(),
                Some(Scheme::Https),
                "registry.example.com",
                "registry.example.com",
                "team/sub/org/img",
                Some("latest"),
                None,
            ),
            (
                "r.example.com:5000",
                "r.example.com:5000/org/img:1".into(),
                None,
                "r.example.com:5000",
                "r.example.com:5000",
                "org/img",
                Some("1"),
                None,
            ),
            (
                "r.example.com/team",
                "r.example.com/team/img".into(),
                None,
                "r.example.com",
                "r.example.com",
                "team/img",
                Some("latest"),
                None,
            ),
            (
                "r.example.com/team",
                "r.example.com/img".into(),
                None,
                "r.example.com",
                "r.example.com",
                "team/img",
                Some("latest"),
                None,
            ),
            (
                "r.example.com",
                "mysql".into(),
                None,
                "r.example.com",
                "r.example.com",
                "mysql",
                Some("latest"),
                None,
            ),
            (
                "myhost",
                "img".into(),
                None,
                "myhost",
                "myhost",
                "img",
                Some("latest"),
                None,
            ),
            (
                "r.example.com",
                "r.example.com/ghcr.io/x".into(),
                None,
                "r.example.com",
                "r.example.com",
                "ghcr.io/x",
                Some("latest"),
                None,
            ),
            (
                "[::1]:5000",
                format!("org/img@{SHA256}"),
                None,
                "[::1]:5000",
                "[::1]:5000",
                "org/img",
                None,
                Some(SHA256),
            ),
            (
                "r.example.com",
                format!("a/b:t@{SHA256}"),
                None,
                "r.example.com",
                "r.example.com",
                "a/b",
                Some("t"),
                Some(SHA256),
            ),
            (
                "docker.io",
                "mysql".into(),
                None,
                "docker.io",
                "docker.io",
                "library/mysql",
                Some("latest"),
                None,
            ),
            (
                "https://index.docker.io",
                "mysql:5.7".into(),
                Some(Scheme::Https),
                "index.docker.io",
                "docker.io",
                "library/mysql",
                Some("5.7"),
                None,
            ),
            (
                "https://registry-1.docker.io",
                "x/y".into(),
                Some(Scheme::Https),
                "registry-1.docker.io",
                "docker.io",
                "x/y",
                Some("latest"),
                None,
            ),
            (
                "registry.hub.docker.com",
                "mysql".into(),
                None,
                "registry.hub.docker.com",
                "docker.io",
                "library/mysql",
                Some("latest"),
                None,
            ),
            (
                "docker.io",
                "docker.io/library/mysql".into(),
                None,
                "docker.io",
                "docker.io",
                "library/mysql",
                Some("latest"),
                None,
            ),
        ];
        for (url, target, scheme, host, registry, repository, tag, digest) in &cases {
            let (got_url, got) = Reference::from_registry(url, target)
                .unwrap_or_else(|e| panic!("from_registry({url:?}, {target:?}): {e}"));
            let what = format!("from_registry({url:?}, {target:?})");
            assert_eq!(got_url.scheme, *scheme, "scheme of {what}");
            assert_eq!(got_url.host, *host, "url host of {what}");
            let want = ok(target, registry, repository, *tag, *digest);
            assert_parts(&what, &got, &want);
        }
        let (url, _) = Reference::from_registry("https://r.example.com:5000/team", "img").unwrap();
        assert_eq!(url.to_string(), "https://r.example.com:5000");
    }

    #[test]
    fn from_registry_rejects_bad_urls_and_targets() {
        let long = format!("{}a", "a/".repeat(119)); // 239: fits after "r.example.com/", not after ".../team/"
        let cases = [
            ("ftp://r.example.com", "a/b", "UnsupportedScheme"),
            ("file:///srv/registry", "a/b", "UnsupportedScheme"),
            ("https://bob:s3cret@r.example.com", "a/b", "UrlCredentials"),
            ("bob@r.example.com", "a/b", "UrlCredentials"),
            ("https://r.example.com?x=1", "a/b", "InvalidRegistryUrl"),
            ("https://r.example.com/#frag", "a/b", "InvalidRegistryUrl"),
            ("", "a/b", "InvalidRegistryUrl"),
            ("https://", "a/b", "InvalidRegistryUrl"),
            ("/team", "a/b", "InvalidRegistryUrl"),
            ("r_example.com", "a/b", "InvalidRegistryUrl"),
            ("r.example.com:port", "a/b", "InvalidRegistryUrl"),
            ("[fe80::1%eth0]:5000", "a/b", "InvalidRegistryUrl"),
            ("r.example.com/Team", "a/b", "InvalidRegistryUrl"),
            ("r.example.com//team", "a/b", "InvalidRegistryUrl"),
            ("r.example.com", "", "Empty"),
            ("r.example.com", "ghcr.io/x/y", "RegistryMismatch"),
            ("r.example.com:5000", "r.example.com/x", "RegistryMismatch"),
            ("r.example.com", "localhost/x", "RegistryMismatch"),
            ("r.example.com", "Org/img", "UppercaseRepository"),
            ("r.example.com", ":tag", "MissingName"),
            ("r.example.com", "img:-bad", "InvalidTag"),
            ("r.example.com", "img@sha256:abc", "InvalidDigest"),
            ("r.example.com", "a//b", "InvalidRepository"),
            ("r.example.com", "r.example.com/", "InvalidRepository"),
            ("r.example.com/team", &long, "NameTooLong"),
        ];
        for (url, target, want) in cases {
            match Reference::from_registry(url, target) {
                Ok((_, got)) => {
                    panic!("from_registry({url:?}, {target:?}) should fail ({want}), got {got}")
                }
                Err(err) => assert_eq!(
                    kind(&err),
                    want,
                    "from_registry({url:?}, {target:?}): {err}"
                ),
            }
        }
        // The same long path fits without the prefix: the limit counts the joined name.
        assert!(Reference::from_registry("r.example.com", &long).is_ok());
    }

    #[test]
    fn from_registry_messages_say_whether_url_or_target_is_at_fault() {
        // (url, target, text the message must contain)
        let cases = [
            ("r_example.com", "a/b", "invalid registry url \"r_example.com\": host \"r_example.com\""),
            ("r.example.com/Team", "a/b", "invalid registry url \"r.example.com/Team\": its path is joined before the target, so repository name must be lowercase: \"Team\""),
            ("ftp://r.example.com", "a/b", "unsupported registry url scheme \"ftp\""),
            ("https://r.example.com?x=1", "a/b", "invalid registry url \"https://r.example.com\": a registry url must not have a query"),
            ("r.example.com", "Org/img", "repository name must be lowercase: \"Org/img\""),
            ("r.example.com", "ghcr.io/x/y", "target \"ghcr.io/x/y\" starts with registry \"ghcr.io\", but the url's registry is \"r.example.com\""),
            ("r.example.com", "img:-bad", "invalid tag \"-bad\""),
        ];
        for (url, target, want) in cases {
            let message = Reference::from_registry(url, target)
                .unwrap_err()
                .to_string();
            assert!(
                message.contains(want),
                "from_registry({url:?}, {target:?}) said {message:?}, expected it to contain {want:?}"
            );
        }
    }

    #[test]
    fn from_registry_never_echoes_url_credentials() {
        let cases = [
            "https://bob:s3cret@r.example.com/team",
            "bob:s3cret@r.example.com",
            "http://bob:s3/cret@r.example.com",
            "https://bob:s3cret@r.example.com?token=x#frag",
            "https://bob:s3@cret@r.example.com",
            "ftp://bob:s3cret@r.example.com",
        ];
        for url in cases {
            let err = Reference::from_registry(url, "org/img").unwrap_err();
            assert_eq!(kind(&err), "UrlCredentials", "{url:?}");
            for shown in [err.to_string(), format!("{err:?}")] {
                for secret in ["bob", "s3", "cret"] {
                    assert!(
                        !shown.contains(secret),
                        "{url:?} leaked {secret:?} in {shown:?}"
                    );
                }
                assert!(shown.contains("r.example.com"), "{url:?}: {shown:?}");
            }
        }
        let query = Reference::from_registry("https://r.example.com?token=t0ps3cret", "a")
            .unwrap_err()
            .to_string();
        assert!(!query.contains("t0ps3cret"), "query leaked in {query:?}");
    }

    #[test]
    fn api_host_is_registry_1_for_docker_hub_only() {
        let cases = [
            ("mysql", "registry-1.docker.io"),
            ("index.docker.io/x/y", "registry-1.docker.io"),
            ("docker.io/x/y", "registry-1.docker.io"),
            ("localhost:5000/x", "localhost:5000"),
            ("[::1]:5000/x", "[::1]:5000"),
            ("ghcr.io/x/y", "ghcr.io"),
        ];
        for (input, want) in cases {
            assert_eq!(
                Reference::parse(input).unwrap().api_host(),
                want,
                "api_host of {input:?}"
            );
        }
    }

    #[test]
    fn with_tag_and_without_digest_keep_the_name() {
        let pinned = Reference::parse(&format!("ghcr.io/x/y@{SHA256}")).unwrap();
        assert_eq!(
            pinned.with_tag("v2").unwrap().to_string(),
            format!("ghcr.io/x/y:v2@{SHA256}")
        );
        assert_eq!(pinned.without_digest().to_string(), "ghcr.io/x/y:latest");
        assert_eq!(pinned.name(), "ghcr.io/x/y");
        let both = Reference::parse(&format!("x/y:1@{SHA256}")).unwrap();
        assert_eq!(both.without_digest().to_string(), "docker.io/x/y:1");
        let err = pinned.with_tag("-bad").unwrap_err();
        assert_eq!(kind(&err), "InvalidTag");
    }
}
