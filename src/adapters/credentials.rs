//! The [`CredentialResolver`] for import origins: static credentials from the job, a webhook,
//! or the ECR provider. It only chooses; the technologies live in [`super::webhook`] and
//! [`super::ecr`]. Whatever it resolves joins the job's masking set (`StageContext::redactor`).

use async_trait::async_trait;

use super::ecr::EcrTokens;
use super::webhook::WebhookCredentials;
use crate::config::Config;
use crate::egress::EgressPolicy;
use crate::error::JobError;
use crate::job::{OciAuth, Origin, ProviderFlavor};
use crate::ports::{BasicAuth, CredentialResolver, StageContext};
use crate::secret::Secret;

/// The user name sent with a `docker-registry` token given without one: registries that take
/// personal access tokens (GHCR, GitLab, Harbor robots) accept any user name with them.
pub const TOKEN_USERNAME: &str = "token";

pub struct OriginCredentials {
    webhook: WebhookCredentials,
    ecr: EcrTokens,
}

impl OriginCredentials {
    pub fn new(webhook: WebhookCredentials, ecr: EcrTokens) -> OriginCredentials {
        OriginCredentials { webhook, ecr }
    }

    pub fn from_config(config: &Config) -> Result<OriginCredentials, JobError> {
        let registries = &config.registries;
        Ok(OriginCredentials {
            webhook: WebhookCredentials::new(
                EgressPolicy::from_config(&config.egress),
                registries.webhook_timeout,
                registries.webhook_max_bytes,
            )?,
            ecr: EcrTokens::new(registries.ecr_endpoint.clone()),
        })
    }
}

fn basic(username: &str, password: &Secret) -> BasicAuth {
    BasicAuth {
        username: username.to_owned(),
        password: password.clone(),
    }
}

#[async_trait]
impl CredentialResolver for OriginCredentials {
    async fn resolve(
        &self,
        origin: &Origin,
        fresh: bool,
        cx: &StageContext,
    ) -> Result<Option<BasicAuth>, JobError> {
        let auth = match origin {
            Origin::DockerHub(hub) => match (&hub.username, &hub.token) {
                (Some(user), Some(token)) => Some(basic(user, token)),
                _ => None,
            },
            Origin::DockerRegistry(reg) => {
                match (&reg.username, reg.password.as_ref().or(reg.token.as_ref())) {
                    (Some(user), Some(secret)) => Some(basic(user, secret)),
                    (None, Some(token)) => Some(basic(TOKEN_USERNAME, token)),
                    _ => None,
                }
            }
            Origin::OciRegistry(oci) => match &oci.auth {
                None => None,
                Some(OciAuth::User { username, token }) => Some(basic(username, token)),
                Some(OciAuth::Webhook { url }) => Some(self.webhook.fetch(url).await?),
                Some(OciAuth::Provider(provider)) => match provider.flavor {
                    ProviderFlavor::Ecr => Some(
                        self.ecr
                            .credentials(&provider.credentials, fresh, &cx.redactor)
                            .await?,
                    ),
                },
            },
            Origin::DockerFile(_) => None,
        };
        // A webhook's or ECR's answer (fresh or cached) is new to the job's masking set: add it
        // before any request carries it, so a registry echoing it back is masked.
        if let Some(auth) = &auth {
            cx.redactor.add(&auth.password, Some(&auth.username));
        }
        Ok(auth)
    }
}
