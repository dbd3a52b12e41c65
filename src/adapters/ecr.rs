//! Credentials from AWS ECR (`oci-registry` auth `provider`, flavor `ecr`): the SDK's
//! `GetAuthorizationToken` with the job's access key, secret and region, and the endpoint from
//! `registries.ecr_endpoint` when set.
//!
//! The token is base64 of `AWS:<password>`; it is used as Basic credentials for the registry,
//! cached per (region, access key, secret) until five minutes before it expires, and fetched
//! afresh when asked (`fresh`, after a 401 in the middle of an import). The token and its
//! password join the job's masking set as soon as they are decoded. What it must not do:
//! keep a secret as a cache key (a hash is used), or pass AWS's error text on unredacted.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use aws_sdk_ecr::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_ecr::error::{ProvideErrorMetadata, SdkError};
use base64::Engine as _;
use tokio::sync::Mutex;
use tokio::time::Instant;
use url::Url;

use crate::clock::{Clock, SystemClock};
use crate::error::{error_chain, ErrorCode, JobError, Stage};
use crate::job::{EcrCredentials, Redactor};
use crate::manifest::Digest;
use crate::ports::BasicAuth;
use crate::secret::Secret;

const STAGE: Stage = Stage::Resolve;
/// A token is not reused within this long of its expiry.
const EXPIRY_MARGIN: Duration = Duration::from_secs(300);

pub struct EcrTokens {
    endpoint: Option<Url>,
    cache: Mutex<HashMap<String, (BasicAuth, Instant)>>,
}

impl EcrTokens {
    pub fn new(endpoint: Option<Url>) -> EcrTokens {
        EcrTokens {
            endpoint,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// Registry credentials for the job's AWS credentials.
    pub async fn credentials(
        &self,
        aws: &EcrCredentials,
        fresh: bool,
        redactor: &Redactor,
    ) -> Result<BasicAuth, JobError> {
        let key = format!(
            "{}\n{}\n{}",
            aws.region,
            aws.api_key.expose(),
            aws.secret.expose()
        );
        let key = Digest::sha256_of(key.as_bytes()).to_string();
        if !fresh {
            if let Some((auth, until)) = self.cache.lock().await.get(&key) {
                if Instant::now() < *until {
                    return Ok(auth.clone());
                }
            }
        }
        let (auth, expires_at) = self.fetch(aws, redactor).await?;
        let mut cache = self.cache.lock().await;
        cache.remove(&key);
        let now = std::time::UNIX_EPOCH + Duration::from_millis(SystemClock.now_ms());
        let left = expires_at.and_then(|at| at.duration_since(now).ok());
        if let Some(keep) = left.and_then(|l| l.checked_sub(EXPIRY_MARGIN)) {
            cache.insert(key, (auth.clone(), Instant::now() + keep));
        }
        Ok(auth)
    }

    async fn fetch(
        &self,
        aws: &EcrCredentials,
        redactor: &Redactor,
    ) -> Result<(BasicAuth, Option<SystemTime>), JobError> {
        let mut config = aws_sdk_ecr::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(aws.region.clone()))
            .credentials_provider(Credentials::new(
                aws.api_key.expose(),
                aws.secret.expose(),
                None,
                None,
                "factoryd-job",
            ));
        if let Some(endpoint) = &self.endpoint {
            config = config.endpoint_url(endpoint.as_str().trim_end_matches('/'));
        }
        let client = aws_sdk_ecr::Client::from_conf(config.build());
        let output = client
            .get_authorization_token()
            .send()
            .await
            .map_err(|e| sdk_error(e, redactor))?;
        let data = output
            .authorization_data()
            .first()
            .ok_or_else(|| malformed("no authorization data"))?;
        let token = data
            .authorization_token()
            .ok_or_else(|| malformed("no authorization token"))?;
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(token.trim())
            .ok()
            .and_then(|d| String::from_utf8(d).ok())
            .ok_or_else(|| malformed("a token that is not base64 text"))?;
        let (username, password) = decoded
            .split_once(':')
            .ok_or_else(|| malformed("a token that is not user:password"))?;
        // The token as AWS sent it, and the password in it, are credentials of the job now.
        redactor.add(&Secret::new(token.trim()), None);
        redactor.add(&Secret::new(password), Some(username));
        let expires_at = data
            .expires_at()
            .and_then(|t| SystemTime::try_from(*t).ok());
        Ok((
            BasicAuth {
                username: username.to_owned(),
                password: Secret::new(password),
            },
            expires_at,
        ))
    }
}

fn malformed(what: &str) -> JobError {
    JobError::transient(
        STAGE,
        ErrorCode::Unavailable,
        format!("ECR GetAuthorizationToken answered {what}"),
    )
}

fn sdk_error<E, R>(err: SdkError<E, R>, redactor: &Redactor) -> JobError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug + 'static,
{
    match &err {
        SdkError::ServiceError(service) => {
            let e = service.err();
            let code = e.code().unwrap_or("unknown");
            let text = redactor.redact(e.message().unwrap_or(""));
            let text: String = text.chars().take(300).collect();
            let message = format!("ECR GetAuthorizationToken refused: {code}: {text}");
            let lower = code.to_ascii_lowercase();
            if lower.contains("throttl") || lower.contains("toomanyrequests") {
                JobError::transient(STAGE, ErrorCode::RateLimited, message)
            } else if lower.contains("server") || lower.contains("unavailable") {
                JobError::transient(STAGE, ErrorCode::Unavailable, message)
            } else {
                // Unrecognised keys, bad signatures, access denied: the job's credentials.
                JobError::permanent(STAGE, ErrorCode::AuthFailed, message)
            }
        }
        SdkError::TimeoutError(_) => JobError::transient(
            STAGE,
            ErrorCode::Timeout,
            "ECR GetAuthorizationToken timed out",
        ),
        SdkError::ConstructionFailure(_) => JobError::permanent(
            STAGE,
            ErrorCode::InvalidJob,
            "ECR GetAuthorizationToken could not be made (check the region)",
        ),
        _ => JobError::transient(
            STAGE,
            ErrorCode::Unavailable,
            format!(
                "ECR GetAuthorizationToken failed: {}",
                redactor.redact(&error_chain(&err))
            ),
        ),
    }
}
