//! What to copy: [`Plan`], from the top manifest and the wanted platforms. An image is copied
//! as it is; an index is filtered by `registries.platforms`, and one kept image out of several
//! is copied alone, as `docker pull` does. Nested indexes are refused.

use super::{manifest_error, Run, STAGE};
use crate::config::Platform;
use crate::error::{ErrorCode, JobError};
use crate::manifest::{select_platforms, Descriptor, Digest, Kind, Manifest};

/// What to copy: the images, and the index that lists them when one is kept.
pub(super) struct Plan {
    pub(super) index: Option<Manifest>,
    /// Index entries (or the top manifest's own descriptor) with the image manifests.
    pub(super) images: Vec<(Descriptor, Manifest)>,
}

impl Run<'_> {
    pub(super) async fn plan(&self, top: Manifest, wanted: &[Platform]) -> Result<Plan, JobError> {
        if top.kind == Kind::Image {
            return Ok(Plan {
                index: None,
                images: vec![(top.descriptor(), top)],
            });
        }
        let kept: Vec<Descriptor> = select_platforms(&top, wanted)
            .into_iter()
            .cloned()
            .collect();
        let images_kept: Vec<&Descriptor> = kept
            .iter()
            .filter(|d| d.platform.as_ref().is_some_and(|p| p.os != "unknown"))
            .collect();
        if images_kept.is_empty() {
            let offered: Vec<String> = top
                .manifests
                .iter()
                .filter_map(|d| d.platform.as_ref())
                .map(|p| p.display())
                .collect();
            let wanted: Vec<String> = wanted.iter().map(ToString::to_string).collect();
            return Err(JobError::permanent(
                STAGE,
                ErrorCode::NotFound,
                format!(
                    "the image index offers no wanted platform: wanted {}, offered {}",
                    wanted.join(", "),
                    offered.join(", ")
                ),
            ));
        }
        // One image out of several: copy it alone, as `docker pull` does; its digest is the
        // source's. Every entry kept: the index is copied whole, byte for byte.
        let single = images_kept.len() == 1 && kept.len() < top.manifests.len();
        let entries: Vec<Descriptor> = if single {
            images_kept.into_iter().cloned().collect()
        } else {
            kept
        };
        let mut images = Vec::with_capacity(entries.len());
        for entry in entries {
            let digest = entry.checked_digest().map_err(|e| {
                manifest_error(
                    e,
                    self.source.client.host(),
                    &self.source.repository,
                    "index",
                )
            })?;
            let child = self.fetch_child(&digest).await?;
            if child.kind != Kind::Image {
                return Err(JobError::permanent(
                    STAGE,
                    ErrorCode::Unsupported,
                    format!(
                        "index entry {digest} is itself an index; nested indexes are not imported"
                    ),
                ));
            }
            images.push((entry, child));
        }
        Ok(Plan {
            index: (!single).then_some(top),
            images,
        })
    }

    async fn fetch_child(&self, digest: &Digest) -> Result<Manifest, JobError> {
        self.with_source_auth(|| {
            self.importer
                .fetch_manifest(&self.source, digest.as_str(), Some(digest))
        })
        .await
    }
}
