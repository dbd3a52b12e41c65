//! One registry endpoint spoken to over the distribution API, with our own authentication in
//! front: anonymous, Basic, and the bearer-token challenge (realm, service, scope; tokens cached
//! per scope). Every failure leaves here as a classified [`JobError`].
//!
//! Credentials go to a token realm on another host only over https, or to a loopback realm when
//! the egress policy allows loopback (test set-ups); otherwise the token is asked for anonymously.
//! Text a server sends back is redacted and cut short before it goes into a message; bearer
//! tokens join the job's masking set as they arrive, so that text is masked for them too.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use base64::Engine as _;
use reqwest::header::{HeaderMap, HeaderValue, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE};
use reqwest::{Method, RequestBuilder, Response, StatusCode};
use serde::Deserialize;
use tokio::sync::Mutex;
use url::Url;

use super::auth::{parse_challenge, token_lifetime, Challenge, TokenCache};
use crate::egress::{refusal_in, EgressPolicy};
use crate::error::{classify_http_status, ErrorClass, ErrorCode, JobError, Stage};
use crate::job::Redactor;
use crate::manifest::{Digest, MANIFEST_ACCEPT};
use crate::ports::BasicAuth;
use crate::secret::Secret;

const STAGE: Stage = Stage::Import;
/// Longest server text quoted in an error message.
const MAX_QUOTED: usize = 300;
/// Largest token-service answer read.
const MAX_TOKEN_RESPONSE: usize = 64 * 1024;

/// A registry's base URL (`https://host[:port]/`) with its client, credentials and tokens.
pub struct RegistryClient {
    http: reqwest::Client,
    base: Url,
    /// `host[:port]` of `base`, for messages.
    host: String,
    credentials: RwLock<Option<BasicAuth>>,
    auth: Mutex<AuthState>,
    /// Present for job-named registries: realms are checked against it.
    egress: Option<EgressPolicy>,
    redactor: Arc<Redactor>,
}

#[derive(Default)]
struct AuthState {
    challenge: Option<Challenge>,
    tokens: TokenCache,
}

/// How a blob upload starts.
pub enum UploadStart {
    /// The registry mounted the blob from another repository: nothing to send.
    Mounted,
    /// Send the blob to this URL.
    Location(Url),
}

#[derive(Deserialize)]
struct TokenResponse {
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    access_token: Option<String>,
    #[serde(default)]
    expires_in: Option<u64>,
}

impl RegistryClient {
    /// `base` is `scheme://host[:port]` with an optional path prefix (mirrors).
    pub fn new(
        http: reqwest::Client,
        mut base: Url,
        credentials: Option<BasicAuth>,
        egress: Option<EgressPolicy>,
        redactor: Arc<Redactor>,
    ) -> Result<RegistryClient, JobError> {
        if let Some(policy) = &egress {
            policy
                .check_url(&base)
                .map_err(|r| r.into_job_error(STAGE))?;
        }
        if !base.path().ends_with('/') {
            let path = format!("{}/", base.path());
            base.set_path(&path);
        }
        let host = match base.port() {
            Some(port) => format!("{}:{port}", base.host_str().unwrap_or_default()),
            None => base.host_str().unwrap_or_default().to_owned(),
        };
        Ok(RegistryClient {
            http,
            base,
            host,
            credentials: RwLock::new(credentials),
            auth: Mutex::new(AuthState::default()),
            egress,
            redactor,
        })
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn has_credentials(&self) -> bool {
        self.credentials
            .read()
            .map(|c| c.is_some())
            .unwrap_or(false)
    }

    /// Replaces the credentials (after a refresh) and forgets every token.
    pub async fn set_credentials(&self, credentials: Option<BasicAuth>) {
        if let Ok(mut c) = self.credentials.write() {
            *c = credentials;
        }
        self.auth.lock().await.tokens.clear();
    }

    fn credentials(&self) -> Option<BasicAuth> {
        self.credentials.read().ok().and_then(|c| c.clone())
    }

    fn url(&self, path: &str) -> Result<Url, JobError> {
        self.base.join(path).map_err(|e| {
            JobError::permanent(
                STAGE,
                ErrorCode::InvalidJob,
                format!("bad registry path: {e}"),
            )
        })
    }

    /// The scope string of a pull, or of a push (with pulls from `mount_from` for a mount).
    pub fn scope(repository: &str, push: bool, mount_from: Option<&str>) -> String {
        let mut scope = format!(
            "repository:{repository}:{}",
            if push { "pull,push" } else { "pull" }
        );
        if let Some(from) = mount_from.filter(|f| *f != repository) {
            scope.push_str(&format!(" repository:{from}:pull"));
        }
        scope
    }

    /// The `Authorization` value to send for `scope`, from what the registry asked for before.
    async fn authorization(&self, scope: &str) -> Result<Option<HeaderValue>, JobError> {
        let state = self.auth.lock().await;
        match &state.challenge {
            None => Ok(None),
            Some(Challenge::Basic) => Ok(self.credentials().map(|c| basic_header(&c))),
            Some(Challenge::Bearer { realm, service }) => {
                if let Some(token) = state.tokens.get(scope) {
                    return Ok(Some(bearer_header(token)));
                }
                let (realm, service) = (realm.clone(), service.clone());
                drop(state);
                let token = self.fetch_token(&realm, service.as_deref(), scope).await?;
                Ok(Some(bearer_header(&token)))
            }
        }
    }

    async fn fetch_token(
        &self,
        realm: &str,
        service: Option<&str>,
        scope: &str,
    ) -> Result<Secret, JobError> {
        let mut url = Url::parse(realm).map_err(|_| {
            JobError::permanent(
                STAGE,
                ErrorCode::AuthFailed,
                format!("registry {} named an invalid token realm", self.host),
            )
        })?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(JobError::permanent(
                STAGE,
                ErrorCode::AuthFailed,
                format!(
                    "registry {} named a token realm with scheme {:?}",
                    self.host,
                    url.scheme()
                ),
            ));
        }
        if let Some(policy) = &self.egress {
            policy
                .check_url(&url)
                .map_err(|r| r.into_job_error(STAGE))?;
        }
        {
            let mut query = url.query_pairs_mut();
            if let Some(service) = service {
                query.append_pair("service", service);
            }
            for part in scope.split(' ') {
                query.append_pair("scope", part);
            }
        }
        let mut request = self.http.get(url.clone());
        if let Some(creds) = self.credentials() {
            if self.may_send_credentials_to(&url) {
                request = request.header(AUTHORIZATION, basic_header(&creds));
            } else {
                tracing::warn!(
                    registry = %self.host,
                    realm = %url.host_str().unwrap_or_default(),
                    "Token realm is on another host over plain http; asking for a token without credentials."
                );
            }
        }
        let response = request
            .send()
            .await
            .map_err(|e| registry_request_error(&self.host, e))?;
        let status = response.status();
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            return Err(JobError::permanent(
                STAGE,
                ErrorCode::AuthFailed,
                format!(
                    "the token service of registry {} refused the {} (HTTP {})",
                    self.host,
                    if self.has_credentials() {
                        "credentials"
                    } else {
                        "anonymous request"
                    },
                    status.as_u16()
                ),
            ));
        }
        if !status.is_success() {
            return Err(self.status_error(response, "token request").await);
        }
        let body = read_capped(response, MAX_TOKEN_RESPONSE, &self.host).await?;
        let parsed: TokenResponse = serde_json::from_slice(&body).map_err(|_| {
            JobError::transient(
                STAGE,
                ErrorCode::Unavailable,
                format!(
                    "the token service of registry {} answered no token",
                    self.host
                ),
            )
        })?;
        let token = parsed
            .token
            .or(parsed.access_token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                JobError::transient(
                    STAGE,
                    ErrorCode::Unavailable,
                    format!(
                        "the token service of registry {} answered no token",
                        self.host
                    ),
                )
            })?;
        let token = Secret::new(token);
        // A registry may echo the bearer token in an error body: mask it from now on.
        self.redactor.add(&token, None);
        self.auth.lock().await.tokens.insert(
            scope,
            token.clone(),
            token_lifetime(parsed.expires_in),
        );
        Ok(token)
    }

    /// https anywhere; plain http to the registry's own host (configured insecure), or to a
    /// loopback realm when the egress policy allows loopback.
    fn may_send_credentials_to(&self, realm: &Url) -> bool {
        if realm.scheme() == "https" {
            return true;
        }
        if realm.host_str() == self.base.host_str() {
            return true;
        }
        let loopback = match realm.host() {
            Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
            Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
            Some(url::Host::Domain(d)) => d == "localhost",
            None => false,
        };
        loopback && self.egress.is_none_or(|p| p.allow_loopback)
    }

    /// Sends a request built by `build` (called at most twice: once more after a challenge).
    /// A 401 teaches the client the registry's challenge; a 401 after that is an auth failure.
    pub async fn send(
        &self,
        scope: &str,
        build: impl Fn() -> RequestBuilder,
    ) -> Result<Response, JobError> {
        let authorization = self.authorization(scope).await?;
        let response = with_auth(build(), authorization.clone())
            .send()
            .await
            .map_err(|e| registry_request_error(&self.host, e))?;
        if response.status() != StatusCode::UNAUTHORIZED {
            return Ok(response);
        }
        let challenge = response
            .headers()
            .get(reqwest::header::WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_challenge);
        let Some(challenge) = challenge else {
            return Err(self.auth_refused(response.status()));
        };
        let basic = challenge == Challenge::Basic;
        if basic && (!self.has_credentials() || authorization.is_some()) {
            // Nothing to add, or the credentials themselves were just refused.
            return Err(self.auth_refused(response.status()));
        }
        {
            // A cached token may have expired early or lack the scope: ask again, once.
            let mut state = self.auth.lock().await;
            state.challenge = Some(challenge);
            state.tokens.remove(scope);
        }
        let authorization = self.authorization(scope).await?;
        let response = with_auth(build(), authorization)
            .send()
            .await
            .map_err(|e| registry_request_error(&self.host, e))?;
        if response.status() == StatusCode::UNAUTHORIZED {
            return Err(self.auth_refused(response.status()));
        }
        Ok(response)
    }

    /// Sends a request that cannot be repeated (a streamed body) with the authorization already
    /// learned for `scope`: call after a repeatable request with the same scope.
    pub async fn send_once(
        &self,
        scope: &str,
        request: RequestBuilder,
    ) -> Result<Response, JobError> {
        let authorization = self.authorization(scope).await?;
        let response = with_auth(request, authorization)
            .send()
            .await
            .map_err(|e| registry_request_error(&self.host, e))?;
        if response.status() == StatusCode::UNAUTHORIZED {
            return Err(self.auth_refused(response.status()));
        }
        Ok(response)
    }

    fn auth_refused(&self, status: StatusCode) -> JobError {
        let message = if self.has_credentials() {
            format!(
                "registry {} refused the credentials (HTTP {})",
                self.host,
                status.as_u16()
            )
        } else {
            format!(
                "registry {} requires credentials and none were given (HTTP {})",
                self.host,
                status.as_u16()
            )
        };
        JobError::permanent(STAGE, ErrorCode::AuthFailed, message)
    }

    /// GETs a manifest by tag or digest. Returns the bytes (at most `cap`), the Content-Type
    /// and the `Docker-Content-Digest` header.
    pub async fn get_manifest(
        &self,
        repository: &str,
        reference: &str,
        cap: usize,
    ) -> Result<(Vec<u8>, Option<String>, Option<String>), JobError> {
        let url = self.url(&format!("v2/{repository}/manifests/{reference}"))?;
        let scope = Self::scope(repository, false, None);
        let response = self
            .send(&scope, || {
                self.http
                    .get(url.clone())
                    .header(reqwest::header::ACCEPT, MANIFEST_ACCEPT)
            })
            .await?;
        if !response.status().is_success() {
            return Err(self
                .status_error(response, &format!("manifest {repository}:{reference}"))
                .await);
        }
        if let Some(len) = response.content_length() {
            if len > cap as u64 {
                return Err(limit_error(&self.host, len, cap));
            }
        }
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let content_type = header("content-type");
        let digest = header("docker-content-digest");
        let bytes = read_capped(response, cap, &self.host).await?;
        Ok((bytes, content_type, digest))
    }

    /// Starts a streamed GET of a blob (redirects to storage are followed under the egress
    /// policy; reqwest drops the Authorization header when a redirect leaves the host).
    pub async fn get_blob(&self, repository: &str, digest: &Digest) -> Result<Response, JobError> {
        let url = self.url(&format!("v2/{repository}/blobs/{digest}"))?;
        let scope = Self::scope(repository, false, None);
        let response = self.send(&scope, || self.http.get(url.clone())).await?;
        if !response.status().is_success() {
            return Err(self
                .status_error(response, &format!("blob {}", digest.short()))
                .await);
        }
        Ok(response)
    }

    /// Whether the repository has the blob (HEAD).
    pub async fn has_blob(
        &self,
        repository: &str,
        digest: &Digest,
        push: bool,
    ) -> Result<bool, JobError> {
        let url = self.url(&format!("v2/{repository}/blobs/{digest}"))?;
        let scope = Self::scope(repository, push, None);
        let response = self
            .send(&scope, || self.http.request(Method::HEAD, url.clone()))
            .await?;
        match response.status() {
            s if s.is_success() => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            _ => Err(self
                .status_error(response, &format!("blob {}", digest.short()))
                .await),
        }
    }

    /// Starts an upload, trying a cross-repository mount from `mount_from` first.
    pub async fn start_upload(
        &self,
        repository: &str,
        digest: &Digest,
        mount_from: Option<&str>,
    ) -> Result<UploadStart, JobError> {
        let mut url = self.url(&format!("v2/{repository}/blobs/uploads/"))?;
        if let Some(from) = mount_from {
            url.query_pairs_mut()
                .append_pair("mount", digest.as_str())
                .append_pair("from", from);
        }
        let scope = Self::scope(repository, true, mount_from);
        let response = self
            .send(&scope, || {
                self.http
                    .post(url.clone())
                    .header(CONTENT_LENGTH, HeaderValue::from_static("0"))
            })
            .await?;
        match response.status() {
            StatusCode::CREATED if mount_from.is_some() => Ok(UploadStart::Mounted),
            StatusCode::ACCEPTED => {
                let location = response
                    .headers()
                    .get(reqwest::header::LOCATION)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|l| self.base.join(l).ok())
                    .ok_or_else(|| {
                        JobError::transient(
                            STAGE,
                            ErrorCode::Unavailable,
                            format!(
                                "registry {} started an upload without a Location",
                                self.host
                            ),
                        )
                    })?;
                Ok(UploadStart::Location(location))
            }
            _ => Err(self.status_error(response, "blob upload").await),
        }
    }

    /// Finishes an upload in one PUT with the whole (streamed) blob.
    pub async fn put_upload(
        &self,
        repository: &str,
        mut location: Url,
        digest: &Digest,
        size: u64,
        body: reqwest::Body,
    ) -> Result<(), JobError> {
        location
            .query_pairs_mut()
            .append_pair("digest", digest.as_str());
        let scope = Self::scope(repository, true, None);
        let request = self
            .http
            .put(location)
            .header(CONTENT_TYPE, "application/octet-stream")
            .header(CONTENT_LENGTH, size)
            .body(body);
        let response = self.send_once(&scope, request).await?;
        if response.status().is_success() {
            return Ok(());
        }
        Err(self
            .status_error(response, &format!("upload of blob {}", digest.short()))
            .await)
    }

    /// PUTs manifest bytes unchanged under `reference` (a tag or the digest).
    pub async fn put_manifest(
        &self,
        repository: &str,
        reference: &str,
        media_type: &str,
        bytes: &[u8],
    ) -> Result<(), JobError> {
        let url = self.url(&format!("v2/{repository}/manifests/{reference}"))?;
        let scope = Self::scope(repository, true, None);
        let body = bytes::Bytes::copy_from_slice(bytes);
        let response = self
            .send(&scope, || {
                self.http
                    .put(url.clone())
                    .header(CONTENT_TYPE, media_type)
                    .body(body.clone())
            })
            .await?;
        if response.status().is_success() {
            return Ok(());
        }
        let err = self
            .status_error(response, &format!("manifest push {repository}:{reference}"))
            .await;
        Err(manifest_push_error(err))
    }

    /// A classified error for an unexpected status, quoting the registry's own words (redacted).
    pub async fn status_error(&self, response: Response, what: &str) -> JobError {
        let status = response.status().as_u16();
        let retry_after = retry_after(response.headers());
        let (code, class) =
            classify_http_status(status).unwrap_or((ErrorCode::Internal, ErrorClass::Transient));
        let text = read_capped(response, 4096, &self.host)
            .await
            .map(|b| registry_message(&b))
            .unwrap_or_default();
        let text = self.redactor.redact(&text);
        let mut message = format!("{what} on registry {}: HTTP {status}", self.host);
        if !text.is_empty() {
            message.push_str(&format!(" ({text})"));
        }
        let mut err = JobError::new(STAGE, code, message).with_class(class);
        if let Some(after) = retry_after {
            err = err.with_retry_after(after);
        }
        err
    }
}

/// A refused manifest PUT whose registry does not know a blob the push has just sent
/// (`MANIFEST_BLOB_UNKNOWN`, HTTP 400) is transient: jobs pushing the same blobs at the same
/// moment, or a registry whose storage catches up later, make it happen (the fleet tests met
/// it on first pushes), and the next attempt uploads what is missing. Any other refusal keeps
/// its class.
fn manifest_push_error(err: JobError) -> JobError {
    if err.message.contains("MANIFEST_BLOB_UNKNOWN") || err.message.contains("BLOB_UNKNOWN:") {
        err.with_class(ErrorClass::Transient)
    } else {
        err
    }
}

fn with_auth(request: RequestBuilder, authorization: Option<HeaderValue>) -> RequestBuilder {
    match authorization {
        Some(value) => request.header(AUTHORIZATION, value),
        None => request,
    }
}

fn basic_header(creds: &BasicAuth) -> HeaderValue {
    let raw = format!("{}:{}", creds.username, creds.password.expose());
    let encoded = base64::engine::general_purpose::STANDARD.encode(raw);
    let mut value = HeaderValue::from_str(&format!("Basic {encoded}"))
        .unwrap_or_else(|_| HeaderValue::from_static(""));
    value.set_sensitive(true);
    value
}

fn bearer_header(token: &Secret) -> HeaderValue {
    let mut value = HeaderValue::from_str(&format!("Bearer {}", token.expose()))
        .unwrap_or_else(|_| HeaderValue::from_static(""));
    value.set_sensitive(true);
    value
}

/// Classifies a reqwest failure (no response) of a request to registry `host`: egress refusals are permanent, timeouts and connection
/// failures transient.
pub(super) fn registry_request_error(host: &str, err: reqwest::Error) -> JobError {
    if let Some(refused) = refusal_in(&err) {
        return refused.clone().into_job_error(STAGE);
    }
    let (code, what) = if err.is_timeout() {
        (ErrorCode::Timeout, "timed out")
    } else if err.is_connect() {
        (ErrorCode::Unavailable, "connection failed")
    } else if err.is_redirect() {
        (ErrorCode::Unavailable, "too many redirects")
    } else {
        (ErrorCode::Unavailable, "connection error")
    };
    // reqwest's text names the URL, which never carries userinfo here; the inner cause says
    // "connection refused", "reset by peer" and the like.
    let mut cause = String::new();
    let mut source = std::error::Error::source(&err);
    while let Some(s) = source {
        cause = s.to_string();
        source = s.source();
    }
    let message = if cause.is_empty() {
        format!("registry {host}: {what}")
    } else {
        format!("registry {host}: {what}: {cause}")
    };
    JobError::transient(STAGE, code, message)
}

/// Reads a whole body of at most `cap` bytes.
pub async fn read_capped(response: Response, cap: usize, host: &str) -> Result<Vec<u8>, JobError> {
    use futures_util::StreamExt;
    let mut out = Vec::new();
    let mut stream = response.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| registry_request_error(host, e))?;
        if out.len() + chunk.len() > cap {
            return Err(limit_error(host, (out.len() + chunk.len()) as u64, cap));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

fn limit_error(host: &str, len: u64, cap: usize) -> JobError {
    JobError::permanent(
        STAGE,
        ErrorCode::LimitExceeded,
        format!(
            "registry {host} sent a document of {len} bytes or more; at most {cap} are accepted"
        ),
    )
}

/// `Retry-After` in seconds or as an HTTP date.
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at =
        time::OffsetDateTime::parse(value, &time::format_description::well_known::Rfc2822).ok()?;
    let left = at - crate::clock::Clock::now(&crate::clock::SystemClock);
    Some(Duration::from_secs(left.whole_seconds().max(0) as u64))
}

/// The `message` fields of a distribution error body, or the start of a text body.
fn registry_message(body: &[u8]) -> String {
    #[derive(Deserialize)]
    struct Errors {
        errors: Vec<Item>,
    }
    #[derive(Deserialize)]
    struct Item {
        #[serde(default)]
        code: String,
        #[serde(default)]
        message: String,
    }
    let text = match serde_json::from_slice::<Errors>(body) {
        Ok(e) => e
            .errors
            .iter()
            .map(|i| format!("{}: {}", i.code, i.message))
            .collect::<Vec<_>>()
            .join("; "),
        Err(_) => String::from_utf8_lossy(body)
            .chars()
            .filter(|c| !c.is_control())
            .collect(),
    };
    text.chars()
        .take(MAX_QUOTED)
        .collect::<String>()
        .trim()
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_errors_are_quoted_briefly() {
        let body =
            br#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown","detail":{}}]}"#;
        assert_eq!(registry_message(body), "MANIFEST_UNKNOWN: manifest unknown");
        assert_eq!(registry_message(&[b'x'; 1000]).len(), MAX_QUOTED);
    }

    #[test]
    fn a_manifest_naming_a_blob_the_registry_does_not_know_yet_is_retried() {
        let refused = |text: &str| {
            JobError::permanent(
                STAGE,
                ErrorCode::InvalidJob,
                format!("manifest push r:t on registry h: HTTP 400 ({text})"),
            )
        };
        let blob = manifest_push_error(refused("MANIFEST_BLOB_UNKNOWN: blob unknown to registry"));
        assert_eq!(blob.class, ErrorClass::Transient, "{blob}");
        let invalid = manifest_push_error(refused("MANIFEST_INVALID: manifest invalid"));
        assert_eq!(invalid.class, ErrorClass::Permanent, "{invalid}");
    }

    #[test]
    fn retry_after_reads_seconds() {
        let mut h = HeaderMap::new();
        h.insert(reqwest::header::RETRY_AFTER, HeaderValue::from_static("3"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(3)));
    }

    #[test]
    fn scopes_for_pull_push_and_mount() {
        assert_eq!(
            RegistryClient::scope("a/b", false, None),
            "repository:a/b:pull"
        );
        assert_eq!(
            RegistryClient::scope("a/b", true, Some("c")),
            "repository:a/b:pull,push repository:c:pull"
        );
    }
}
