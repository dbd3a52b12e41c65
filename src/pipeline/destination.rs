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

    /// The repository and tag `job` gets: its own templates where it has them, the node's
    /// otherwise, rendered for the job.
    fn render(&self, job: &Job) -> (String, String) {
        let c = &self.config;
        let wanted = job.destination.as_ref();
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
        (
            render(wanted.and_then(|d| d.repository.as_ref()), &c.repository),
            render(wanted.and_then(|d| d.tag.as_ref()), &c.tag),
        )
    }

    /// Whether this node accepts `job`'s destination override (`factoryd validate --config
    /// --job` asks this without resolving anything else).
    pub fn check_override(&self, job: &Job) -> Result<(), JobError> {
        let (repository, _) = self.render(job);
        self.check_namespace(job, &repository)
    }

    /// Renders the destination of `job`. A job asking for a registry on a worker without a
    /// configured registry is a permanent error.
    pub fn resolve(&self, job: &Job) -> Result<Destination, JobError> {
        let c = &self.config;
        let kind = job.destination.as_ref().map_or(c.kind, |d| d.kind);
        let (repository, tag) = self.render(job);
        self.check_namespace(job, &repository)?;
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
                source_id: job.source_id.clone(),
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

impl DestinationSettings {
    /// A job's `destination` override stays in its source's namespace: the repository the
    /// node's `destination.repository` template gives the job's source, or a repository below
    /// it (by whole path components), so no job can write where another source's images are.
    /// A tag override is allowed only where that namespace is the source's own (the template
    /// has `{source_id}`); on a node whose repositories are shared, the tag is the node's.
    /// Only the override is checked: the node's own templates are the operator's choice.
    pub fn check_namespace(&self, job: &Job, repository: &str) -> Result<(), JobError> {
        let Some(wanted) = &job.destination else {
            return Ok(());
        };
        let c = &self.config;
        let own = c.repository.as_str().contains("{source_id}");
        let refuse = |field: &str, why: String| {
            JobError::permanent(
                Stage::Resolve,
                ErrorCode::InvalidJob,
                format!("destination.{field}: {why}"),
            )
        };
        let values = TemplateValues {
            source_id: &job.source_id,
            job_id: &job.id,
            namespace: &c.namespace,
            kind: job.kind().as_str(),
        };
        let base = c.repository.render(&values);
        if wanted.repository.is_some() {
            if !own {
                return Err(refuse(
                    "repository",
                    format!(
                        "this node's destination.repository template ({:?}) has no {{source_id}}, \
                         so its repositories are shared by every source and a job may not \
                         choose one",
                        c.repository.as_str()
                    ),
                ));
            }
            let below = repository
                .strip_prefix(base.as_str())
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'));
            if !below {
                return Err(refuse(
                    "repository",
                    format!(
                        "{repository:?} is outside this source's namespace; a job of source \
                         {:?} may write to {base:?} or a repository below it",
                        job.source_id
                    ),
                ));
            }
        }
        if wanted.tag.is_some() && !own {
            return Err(refuse(
                "tag",
                format!(
                    "this node's destination.repository template ({:?}) has no {{source_id}}, \
                     so a job may not choose its tag (it could replace another source's image)",
                    c.repository.as_str()
                ),
            ));
        }
        Ok(())
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

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// A layout destination with the node's `repository` template.
    fn settings(repository: &str) -> DestinationSettings {
        let text = format!("[destination]\nrepository = \"{repository}\"\ntag = \"{{job_id}}\"\n");
        let config =
            crate::config::from_toml_str(&text, &Default::default()).expect("valid config");
        DestinationSettings::new(config.destination)
    }

    fn job(source_id: &str, destination: serde_json::Value) -> Job {
        let mut value = json!({"v": 1, "id": "j1", "source_id": source_id,
            "origin": {"type": "docker-hub", "details": {"target": "alpine:3"}}});
        if !destination.is_null() {
            value["destination"] = destination;
        }
        crate::job::decode_value(&value).expect("valid job")
    }

    fn tag(destination: Destination) -> String {
        match destination {
            Destination::OciLayout { tag, .. } => tag,
            other => panic!("expected a layout destination, got {other:?}"),
        }
    }

    fn refused(settings: &DestinationSettings, job: &Job) -> String {
        let err = settings
            .resolve(job)
            .expect_err("the override must be refused");
        assert_eq!(
            (err.class, err.code),
            (crate::error::ErrorClass::Permanent, ErrorCode::InvalidJob),
            "{err}"
        );
        err.message
    }

    #[test]
    fn an_override_at_or_below_the_sources_repository_is_kept() {
        let s = settings("mirror/{source_id}");
        let cases = [
            (json!(null), "mirror/web:j1"),
            (
                json!({"kind": "oci-layout", "tag": "latest"}),
                "mirror/web:latest",
            ),
            (
                json!({"kind": "oci-layout", "repository": "mirror/{source_id}"}),
                "mirror/web:j1",
            ),
            (
                json!({"kind": "oci-layout", "repository": "mirror/web/debug", "tag": "x"}),
                "mirror/web/debug:x",
            ),
        ];
        for (destination, want) in cases {
            let got = tag(s
                .resolve(&job("web", destination.clone()))
                .expect("allowed"));
            assert_eq!(got, want, "{destination}");
        }
    }

    #[test]
    fn an_override_naming_another_sources_repository_is_refused_naming_the_field() {
        let s = settings("mirror/{source_id}");
        for repository in [
            "mirror/db",
            "mirror/web-other",
            "mirror",
            "other/web",
            "mirror/webx/y",
        ] {
            let message = refused(
                &s,
                &job(
                    "web",
                    json!({"kind": "oci-layout", "repository": repository}),
                ),
            );
            assert!(message.starts_with("destination.repository: "), "{message}");
            assert!(message.contains("\"mirror/web\""), "{message}");
        }
    }

    #[test]
    fn on_shared_repositories_a_job_chooses_neither_repository_nor_tag() {
        let s = settings("images");
        let message = refused(
            &s,
            &job("web", json!({"kind": "oci-layout", "tag": "db-1"})),
        );
        assert!(message.starts_with("destination.tag: "), "{message}");
        let message = refused(
            &s,
            &job("web", json!({"kind": "oci-layout", "repository": "images"})),
        );
        assert!(message.starts_with("destination.repository: "), "{message}");
        // Only the kind: the node's names are used.
        let got = s.resolve(&job("web", json!({"kind": "oci-layout"})));
        assert_eq!(tag(got.expect("allowed")), "images:j1");
    }
}
