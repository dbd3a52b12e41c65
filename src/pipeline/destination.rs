//! Where a job's image goes: the worker's configured destination, or the job's override,
//! with the repository and tag templates rendered.

use std::path::PathBuf;

use crate::config::{DestinationConfig, DestinationKind, RegistryCredentials, TemplateValues};
use crate::error::{ErrorCode, JobError, Stage};
use crate::job::Job;
use crate::ports::{BasicAuth, Destination};
use crate::reference::Reference;
use crate::secret::Secret;

#[derive(Debug, Clone)]
pub struct DestinationSettings {
    pub config: DestinationConfig,
}

impl DestinationSettings {
    pub fn new(config: DestinationConfig) -> Self {
        DestinationSettings { config }
    }

    /// Renders the destination of `job`. A job asking for a registry on a worker without a
    /// configured registry is a permanent error.
    pub fn resolve(&self, job: &Job) -> Result<Destination, JobError> {
        let c = &self.config;
        let wanted = job.destination.as_ref();
        let kind = wanted.map_or(c.kind, |d| d.kind);
        let values = TemplateValues {
            source_id: &job.source_id,
            job_id: &job.id,
            namespace: &c.namespace,
            kind: job.kind().as_str(),
        };
        let render = |own: Option<&String>, configured: &crate::config::Template| match own {
            Some(template) => render_job_template(template, &values),
            None => configured.render(&values),
        };
        let repository = render(wanted.and_then(|d| d.repository.as_ref()), &c.repository);
        let tag = render(wanted.and_then(|d| d.tag.as_ref()), &c.tag);
        // Templates take ids from the job: check the rendered name is a valid reference.
        let host = c
            .registry
            .as_ref()
            .map_or("localhost", |r| r.authority.as_str());
        if let Err(e) = Reference::parse(&format!("{host}/{repository}:{tag}")) {
            return Err(JobError::new(
                Stage::Resolve,
                ErrorCode::InvalidJob,
                format!("destination {repository}:{tag} is not a valid image name: {e}"),
            ));
        }
        match kind {
            DestinationKind::OciLayout => Ok(Destination::OciLayout {
                path: c.path.clone(),
                tag: format!("{repository}:{tag}"),
            }),
            DestinationKind::Registry => {
                let Some(registry) = &c.registry else {
                    return Err(JobError::new(
                        Stage::Resolve,
                        ErrorCode::InvalidJob,
                        "destination.kind \"registry\" asked for, but this worker has no \
                         destination registry configured",
                    ));
                };
                Ok(Destination::Registry {
                    registry: registry.authority.clone(),
                    plain_http: registry.plain_http,
                    repository,
                    tag,
                    auth: c.credentials.as_ref().map(read_password).transpose()?,
                })
            }
        }
    }
}

/// A job's own template: only the known placeholders are substituted; any other brace text
/// stays and then fails the reference check.
fn render_job_template(template: &str, values: &TemplateValues<'_>) -> String {
    template
        .replace("{source_id}", values.source_id)
        .replace("{job_id}", values.job_id)
        .replace("{namespace}", values.namespace)
        .replace("{kind}", values.kind)
}

/// Reads the destination registry password at push time, so a rotated file needs no restart.
fn read_password(creds: &RegistryCredentials) -> Result<BasicAuth, JobError> {
    let text = std::fs::read_to_string(&creds.password_file).map_err(|e| {
        JobError::transient(
            Stage::Resolve,
            ErrorCode::LocalIo,
            format!(
                "cannot read destination.password_file {}: {e}",
                creds.password_file.display()
            ),
        )
    })?;
    Ok(BasicAuth {
        username: creds.username.clone(),
        password: Secret::new(text.trim_end_matches(['\r', '\n'])),
    })
}

/// Convenience for tests and `run`: an OCI layout destination at `path`.
pub fn oci_layout_settings(path: PathBuf) -> DestinationSettings {
    let mut config = crate::config::Config::defaults().destination;
    config.kind = DestinationKind::OciLayout;
    config.path = path;
    DestinationSettings::new(config)
}
