//! Image formats: digests, descriptors, manifest media types, and the pure decisions an import
//! makes about a manifest — what it is, which platforms of an index to keep, and how a Docker
//! manifest becomes its OCI equivalent.
//!
//! Nothing here does I/O. Manifest bytes are never re-serialised on the way to a registry (digests
//! must survive byte for byte); only [`to_oci_image`] and [`to_oci_index`] write new JSON, for the
//! local OCI layout, which holds OCI media types only (ARCHITECTURE §8).
//!
//! What must not happen here: accepting a schema 1 manifest or an unknown media type (both are
//! [`ManifestError`]s that name what was found), or trusting a digest without computing it.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::Digest as _;

use crate::config::Platform;

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const OCI_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
pub const OCI_LAYER_FOREIGN_GZIP: &str =
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
pub const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
pub const DOCKER_LAYER_TAR: &str = "application/vnd.docker.image.rootfs.diff.tar";
pub const DOCKER_LAYER_FOREIGN: &str = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip";
pub const DOCKER_SCHEMA1: &str = "application/vnd.docker.distribution.manifest.v1+json";
pub const DOCKER_SCHEMA1_SIGNED: &str = "application/vnd.docker.distribution.manifest.v1+prettyjws";

/// The `Accept` header of a manifest request: the four kinds this worker handles. Schema 1 is
/// deliberately absent, so a registry that can convert serves schema 2 instead.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
     application/vnd.docker.distribution.manifest.list.v2+json, \
     application/vnd.oci.image.manifest.v1+json, \
     application/vnd.docker.distribution.manifest.v2+json";

/// The annotation that names a tag in an OCI layout's `index.json`.
pub const REF_NAME_ANNOTATION: &str = "org.opencontainers.image.ref.name";

/// A content digest, `algorithm:hex`, checked (sha256, sha384 or sha512; lowercase hex of the
/// right length), so it is safe to use as a file name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(String);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Algorithm {
    Sha256,
    Sha384,
    Sha512,
}

impl Algorithm {
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::Sha256 => "sha256",
            Algorithm::Sha384 => "sha384",
            Algorithm::Sha512 => "sha512",
        }
    }

    fn hex_len(self) -> usize {
        match self {
            Algorithm::Sha256 => 64,
            Algorithm::Sha384 => 96,
            Algorithm::Sha512 => 128,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid digest {0:?}: expected sha256:, sha384: or sha512: and lowercase hex")]
pub struct DigestError(pub String);

impl Digest {
    pub fn parse(text: &str) -> Result<Digest, DigestError> {
        let bad = || DigestError(text.chars().take(140).collect());
        let (alg, hex) = text.split_once(':').ok_or_else(bad)?;
        let alg = match alg {
            "sha256" => Algorithm::Sha256,
            "sha384" => Algorithm::Sha384,
            "sha512" => Algorithm::Sha512,
            _ => return Err(bad()),
        };
        if hex.len() != alg.hex_len()
            || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        {
            return Err(bad());
        }
        Ok(Digest(text.to_owned()))
    }

    /// The sha256 digest of `bytes`.
    pub fn sha256_of(bytes: &[u8]) -> Digest {
        let mut h = Hasher::new(Algorithm::Sha256);
        h.update(bytes);
        h.finish()
    }

    pub fn algorithm(&self) -> Algorithm {
        match self.0.split_once(':').map(|(a, _)| a) {
            Some("sha384") => Algorithm::Sha384,
            Some("sha512") => Algorithm::Sha512,
            _ => Algorithm::Sha256,
        }
    }

    pub fn hex(&self) -> &str {
        self.0.split_once(':').map_or("", |(_, h)| h)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// A short form for event items and log lines: `sha256:0123456789ab`.
    pub fn short(&self) -> &str {
        let end = self.0.find(':').map_or(0, |i| i + 13).min(self.0.len());
        &self.0[..end]
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Incremental hashing for the algorithm of an expected digest.
#[derive(Clone)]
pub enum Hasher {
    Sha256(sha2::Sha256),
    Sha384(sha2::Sha384),
    Sha512(sha2::Sha512),
}

impl Hasher {
    pub fn new(algorithm: Algorithm) -> Hasher {
        match algorithm {
            Algorithm::Sha256 => Hasher::Sha256(sha2::Sha256::new()),
            Algorithm::Sha384 => Hasher::Sha384(sha2::Sha384::new()),
            Algorithm::Sha512 => Hasher::Sha512(sha2::Sha512::new()),
        }
    }

    pub fn update(&mut self, bytes: &[u8]) {
        match self {
            Hasher::Sha256(h) => h.update(bytes),
            Hasher::Sha384(h) => h.update(bytes),
            Hasher::Sha512(h) => h.update(bytes),
        }
    }

    pub fn finish(self) -> Digest {
        let (alg, hex) = match self {
            Hasher::Sha256(h) => ("sha256", hex::encode(h.finalize())),
            Hasher::Sha384(h) => ("sha384", hex::encode(h.finalize())),
            Hasher::Sha512(h) => ("sha512", hex::encode(h.finalize())),
        };
        Digest(format!("{alg}:{hex}"))
    }
}

/// An OCI content descriptor. Fields this worker does not interpret (`urls`, `artifactType`,
/// …) are kept in `other`, so a descriptor re-serialised into a converted manifest loses nothing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<PlatformSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
    #[serde(flatten)]
    pub other: serde_json::Map<String, Value>,
}

impl Descriptor {
    pub fn new(media_type: &str, digest: &Digest, size: u64) -> Descriptor {
        Descriptor {
            media_type: media_type.to_owned(),
            digest: digest.to_string(),
            size,
            platform: None,
            annotations: None,
            other: serde_json::Map::new(),
        }
    }

    /// The digest, checked.
    pub fn checked_digest(&self) -> Result<Digest, ManifestError> {
        Digest::parse(&self.digest).map_err(|e| ManifestError::Malformed(e.to_string()))
    }

    fn annotation(&self, key: &str) -> Option<&str> {
        self.annotations.as_ref()?.get(key).map(String::as_str)
    }
}

/// A platform as manifests and image configs write it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct PlatformSpec {
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub os: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    #[serde(flatten)]
    pub other: serde_json::Map<String, Value>,
}

impl PlatformSpec {
    /// `os/arch[/variant]`, as results list platforms.
    pub fn display(&self) -> String {
        match &self.variant {
            Some(v) if !v.is_empty() => format!("{}/{}/{v}", self.os, self.architecture),
            _ => format!("{}/{}", self.os, self.architecture),
        }
    }

    /// Whether a configured platform asks for this one. A configured platform without a
    /// variant takes any variant (`linux/arm64` keeps `linux/arm64/v8`); with one, it must match.
    pub fn matches(&self, wanted: &Platform) -> bool {
        self.os == wanted.os
            && self.architecture == wanted.architecture
            && match &wanted.variant {
                None => true,
                Some(v) => self.variant.as_deref() == Some(v.as_str()),
            }
    }
}

/// Why a manifest was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    #[error("the registry served a Docker schema 1 manifest ({0}); schema 1 is deprecated and not imported: push the image again with a current client")]
    Schema1(String),
    #[error("unsupported manifest media type {0:?}: expected a Docker v2 schema 2 manifest or list, or an OCI manifest or index")]
    UnknownMediaType(String),
    #[error("malformed manifest: {0}")]
    Malformed(String),
}

/// What a manifest is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A single image: config + layers.
    Image,
    /// A list of images (Docker manifest list or OCI index).
    Index,
}

/// A manifest's bytes, with what the import needs from them.
#[derive(Debug, Clone)]
pub struct Manifest {
    pub bytes: Vec<u8>,
    pub digest: Digest,
    pub media_type: String,
    pub kind: Kind,
    /// Image manifests only.
    pub config: Option<Descriptor>,
    /// Image manifests only.
    pub layers: Vec<Descriptor>,
    /// Indexes only.
    pub manifests: Vec<Descriptor>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Shape {
    #[serde(default)]
    schema_version: Option<i64>,
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Option<Vec<Descriptor>>,
    #[serde(default)]
    manifests: Option<Vec<Descriptor>>,
}

impl Manifest {
    /// Reads manifest bytes served with `content_type`. The body's own `mediaType` wins over
    /// the header when both are present (registries sometimes answer a generic JSON type); OCI
    /// manifests without one are told apart by their fields. The digest is computed with
    /// `algorithm` (the one the reference asked for, else sha256).
    pub fn parse(
        bytes: Vec<u8>,
        content_type: Option<&str>,
        algorithm: Algorithm,
    ) -> Result<Manifest, ManifestError> {
        let header = content_type
            .map(|c| c.split(';').next().unwrap_or("").trim().to_owned())
            .filter(|c| !c.is_empty());
        if let Some(h) = header.as_deref() {
            if h == DOCKER_SCHEMA1 || h == DOCKER_SCHEMA1_SIGNED {
                return Err(ManifestError::Schema1(h.to_owned()));
            }
        }
        let shape: Shape = serde_json::from_slice(&bytes)
            .map_err(|e| ManifestError::Malformed(format!("not a JSON manifest ({e})")))?;
        if shape.schema_version == Some(1) {
            return Err(ManifestError::Schema1(
                header.unwrap_or_else(|| "schemaVersion 1".to_owned()),
            ));
        }
        let media_type = match (shape.media_type, header) {
            (Some(m), _) if !m.is_empty() => m,
            (_, Some(h)) if h != "application/json" && h != "text/plain" => h,
            _ if shape.manifests.is_some() => OCI_INDEX.to_owned(),
            _ if shape.layers.is_some() => OCI_MANIFEST.to_owned(),
            _ => {
                return Err(ManifestError::Malformed(
                    "no mediaType, layers or manifests".to_owned(),
                ))
            }
        };
        let kind = match media_type.as_str() {
            OCI_MANIFEST | DOCKER_MANIFEST => Kind::Image,
            OCI_INDEX | DOCKER_LIST => Kind::Index,
            DOCKER_SCHEMA1 | DOCKER_SCHEMA1_SIGNED => {
                return Err(ManifestError::Schema1(media_type))
            }
            _ => return Err(ManifestError::UnknownMediaType(media_type)),
        };
        let mut hasher = Hasher::new(algorithm);
        hasher.update(&bytes);
        let digest = hasher.finish();
        let manifest = match kind {
            Kind::Image => {
                let config = shape.config.ok_or_else(|| {
                    ManifestError::Malformed("an image manifest without config".to_owned())
                })?;
                config.checked_digest()?;
                let layers = shape.layers.unwrap_or_default();
                for layer in &layers {
                    layer.checked_digest()?;
                }
                Manifest {
                    bytes,
                    digest,
                    media_type,
                    kind,
                    config: Some(config),
                    layers,
                    manifests: Vec::new(),
                }
            }
            Kind::Index => {
                let manifests = shape.manifests.unwrap_or_default();
                for m in &manifests {
                    m.checked_digest()?;
                }
                Manifest {
                    bytes,
                    digest,
                    media_type,
                    kind,
                    config: None,
                    layers: Vec::new(),
                    manifests,
                }
            }
        };
        Ok(manifest)
    }

    pub fn is_docker(&self) -> bool {
        self.media_type == DOCKER_MANIFEST || self.media_type == DOCKER_LIST
    }

    /// The descriptor that points at this manifest.
    pub fn descriptor(&self) -> Descriptor {
        Descriptor::new(&self.media_type, &self.digest, self.bytes.len() as u64)
    }
}

/// The entries of an index that `wanted` keeps: images whose platform matches, and attestation
/// manifests (BuildKit's `vnd.docker.reference.type`) that describe a kept image.
pub fn select_platforms<'a>(index: &'a Manifest, wanted: &[Platform]) -> Vec<&'a Descriptor> {
    let kept_images: Vec<&Descriptor> = index
        .manifests
        .iter()
        .filter(|d| {
            d.platform
                .as_ref()
                .is_some_and(|p| wanted.iter().any(|w| p.matches(w)))
        })
        .collect();
    index
        .manifests
        .iter()
        .filter(|d| {
            kept_images.iter().any(|k| std::ptr::eq(*k, *d))
                || d.annotation("vnd.docker.reference.type") == Some("attestation-manifest")
                    && d.annotation("vnd.docker.reference.digest")
                        .is_some_and(|target| kept_images.iter().any(|k| k.digest == target))
        })
        .collect()
}

/// The OCI media type of a Docker one (a layer, config or manifest); OCI types stay.
pub fn oci_media_type(media_type: &str) -> &str {
    match media_type {
        DOCKER_MANIFEST => OCI_MANIFEST,
        DOCKER_LIST => OCI_INDEX,
        DOCKER_CONFIG => OCI_CONFIG,
        DOCKER_LAYER_GZIP => OCI_LAYER_GZIP,
        DOCKER_LAYER_TAR => OCI_LAYER_TAR,
        DOCKER_LAYER_FOREIGN => OCI_LAYER_FOREIGN_GZIP,
        other => other,
    }
}

/// The OCI form of an image manifest, with the same config and layer blobs (as `skopeo copy
/// --format oci` does). An OCI manifest is returned unchanged.
pub fn to_oci_image(manifest: &Manifest) -> Result<Vec<u8>, ManifestError> {
    if manifest.media_type == OCI_MANIFEST {
        return Ok(manifest.bytes.clone());
    }
    let mut value: Value = serde_json::from_slice(&manifest.bytes)
        .map_err(|e| ManifestError::Malformed(e.to_string()))?;
    let obj = value
        .as_object_mut()
        .ok_or_else(|| ManifestError::Malformed("not a JSON object".to_owned()))?;
    obj.insert("mediaType".to_owned(), Value::from(OCI_MANIFEST));
    if let Some(config) = obj.get_mut("config").and_then(Value::as_object_mut) {
        map_media_type(config);
    }
    if let Some(layers) = obj.get_mut("layers").and_then(Value::as_array_mut) {
        for layer in layers.iter_mut().filter_map(Value::as_object_mut) {
            map_media_type(layer);
        }
    }
    serde_json::to_vec(&value).map_err(|e| ManifestError::Malformed(e.to_string()))
}

/// The OCI form of an index keeping `entries` (already converted children, in order). An OCI
/// index keeping every entry unchanged is returned byte for byte.
pub fn to_oci_index(index: &Manifest, entries: &[Descriptor]) -> Result<Vec<u8>, ManifestError> {
    if index.media_type == OCI_INDEX && entries == index.manifests.as_slice() {
        return Ok(index.bytes.clone());
    }
    rewrite_index(index, OCI_INDEX, entries)
}

/// An index of the source's type keeping only `entries` (for a registry destination when some
/// platforms were left out). Keeping every entry returns the source bytes.
pub fn filtered_index(index: &Manifest, entries: &[Descriptor]) -> Result<Vec<u8>, ManifestError> {
    if entries == index.manifests.as_slice() {
        return Ok(index.bytes.clone());
    }
    let media_type = index.media_type.clone();
    rewrite_index(index, &media_type, entries)
}

fn rewrite_index(
    index: &Manifest,
    media_type: &str,
    entries: &[Descriptor],
) -> Result<Vec<u8>, ManifestError> {
    let mut value: Value = serde_json::from_slice(&index.bytes)
        .map_err(|e| ManifestError::Malformed(e.to_string()))?;
    let obj = value
        .as_object_mut()
        .ok_or_else(|| ManifestError::Malformed("not a JSON object".to_owned()))?;
    obj.insert("mediaType".to_owned(), Value::from(media_type));
    let entries =
        serde_json::to_value(entries).map_err(|e| ManifestError::Malformed(e.to_string()))?;
    obj.insert("manifests".to_owned(), entries);
    serde_json::to_vec(&value).map_err(|e| ManifestError::Malformed(e.to_string()))
}

fn map_media_type(obj: &mut serde_json::Map<String, Value>) {
    if let Some(Value::String(m)) = obj.get("mediaType") {
        let mapped = oci_media_type(m).to_owned();
        obj.insert("mediaType".to_owned(), Value::from(mapped));
    }
}

/// The platform an image config declares (`os`, `architecture`, `variant`), for results.
pub fn config_platform(config_bytes: &[u8]) -> Option<PlatformSpec> {
    let p: PlatformSpec = serde_json::from_slice(config_bytes).ok()?;
    (!p.os.is_empty() && !p.architecture.is_empty()).then_some(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(n: u8) -> String {
        format!("sha256:{}", hex::encode([n; 32]))
    }

    fn docker_manifest() -> Vec<u8> {
        format!(
            r#"{{"schemaVersion":2,"mediaType":"{DOCKER_MANIFEST}","config":{{"mediaType":"{DOCKER_CONFIG}","digest":"{}","size":10}},"layers":[{{"mediaType":"{DOCKER_LAYER_GZIP}","digest":"{}","size":20}},{{"mediaType":"{DOCKER_LAYER_FOREIGN}","digest":"{}","size":30,"urls":["https://x.example/l"]}}]}}"#,
            d(1),
            d(2),
            d(3)
        )
        .into_bytes()
    }

    fn index(media_type: &str) -> Vec<u8> {
        format!(
            r#"{{"schemaVersion":2,"mediaType":"{media_type}","manifests":[
            {{"mediaType":"{OCI_MANIFEST}","digest":"{}","size":1,"platform":{{"architecture":"amd64","os":"linux"}}}},
            {{"mediaType":"{OCI_MANIFEST}","digest":"{}","size":2,"platform":{{"architecture":"arm64","os":"linux","variant":"v8"}}}},
            {{"mediaType":"{OCI_MANIFEST}","digest":"{}","size":3,"platform":{{"architecture":"unknown","os":"unknown"}},
              "annotations":{{"vnd.docker.reference.type":"attestation-manifest","vnd.docker.reference.digest":"{}"}}}}]}}"#,
            d(1),
            d(2),
            d(3),
            d(1)
        )
        .into_bytes()
    }

    fn platform(text: &str) -> Platform {
        let parts: Vec<&str> = text.split('/').collect();
        Platform {
            os: parts[0].into(),
            architecture: parts[1].into(),
            variant: parts.get(2).map(|v| (*v).into()),
        }
    }

    #[test]
    fn digests_are_checked_and_computed() {
        assert!(Digest::parse(&d(1)).is_ok());
        assert!(Digest::parse("sha256:ABC").is_err());
        assert!(Digest::parse("md5:00").is_err());
        assert!(Digest::parse(&format!("sha256:../{}", "a".repeat(61))).is_err());
        assert_eq!(
            Digest::sha256_of(b"").as_str(),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn schema1_is_refused_by_header_or_body() {
        let err = Manifest::parse(
            b"{}".to_vec(),
            Some(DOCKER_SCHEMA1_SIGNED),
            Algorithm::Sha256,
        )
        .unwrap_err();
        assert!(matches!(err, ManifestError::Schema1(_)), "{err}");
        let err = Manifest::parse(
            br#"{"schemaVersion":1,"name":"x"}"#.to_vec(),
            Some("application/json"),
            Algorithm::Sha256,
        )
        .unwrap_err();
        assert!(err.to_string().contains("schema 1"), "{err}");
    }

    #[test]
    fn unknown_media_type_names_what_was_found() {
        let err = Manifest::parse(
            br#"{"schemaVersion":2,"mediaType":"application/vnd.example.thing"}"#.to_vec(),
            None,
            Algorithm::Sha256,
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("application/vnd.example.thing"),
            "{err}"
        );
    }

    #[test]
    fn oci_manifest_without_media_type_is_recognised_by_its_fields() {
        let body = format!(
            r#"{{"schemaVersion":2,"config":{{"mediaType":"{OCI_CONFIG}","digest":"{}","size":1}},"layers":[]}}"#,
            d(1)
        );
        let m = Manifest::parse(body.into_bytes(), None, Algorithm::Sha256).unwrap();
        assert_eq!(m.kind, Kind::Image);
        assert_eq!(m.media_type, OCI_MANIFEST);
    }

    #[test]
    fn docker_manifest_converts_to_oci_with_the_same_blobs() {
        let m = Manifest::parse(docker_manifest(), None, Algorithm::Sha256).unwrap();
        let oci = to_oci_image(&m).unwrap();
        let back = Manifest::parse(oci, None, Algorithm::Sha256).unwrap();
        assert_eq!(back.media_type, OCI_MANIFEST);
        let config = back.config.unwrap();
        assert_eq!(config.media_type, OCI_CONFIG);
        assert_eq!(config.digest, d(1));
        assert_eq!(back.layers[0].media_type, OCI_LAYER_GZIP);
        assert_eq!(back.layers[0].digest, d(2));
        assert_eq!(back.layers[1].media_type, OCI_LAYER_FOREIGN_GZIP);
        assert!(back.layers[1].other.contains_key("urls"), "urls kept");
    }

    #[test]
    fn oci_manifest_is_stored_unchanged() {
        let m = Manifest::parse(index(OCI_INDEX), None, Algorithm::Sha256).unwrap();
        assert_eq!(to_oci_index(&m, &m.manifests).unwrap(), m.bytes);
    }

    #[test]
    fn platform_selection_keeps_matches_and_their_attestations() {
        let m = Manifest::parse(index(OCI_INDEX), None, Algorithm::Sha256).unwrap();
        let amd = select_platforms(&m, &[platform("linux/amd64")]);
        assert_eq!(amd.len(), 2, "amd64 and its attestation");
        assert_eq!(amd[0].digest, d(1));
        let arm = select_platforms(&m, &[platform("linux/arm64")]);
        assert_eq!(arm.len(), 1, "any variant matches a platform without one");
        assert!(select_platforms(&m, &[platform("linux/arm64/v7")]).is_empty());
        let both = select_platforms(&m, &[platform("linux/amd64"), platform("linux/arm64")]);
        assert_eq!(both.len(), 3);
    }

    #[test]
    fn docker_list_converts_to_an_oci_index_of_the_given_entries() {
        let m = Manifest::parse(index(DOCKER_LIST), None, Algorithm::Sha256).unwrap();
        let entries = vec![m.manifests[0].clone()];
        let oci =
            Manifest::parse(to_oci_index(&m, &entries).unwrap(), None, Algorithm::Sha256).unwrap();
        assert_eq!(oci.media_type, OCI_INDEX);
        assert_eq!(oci.manifests, entries);
    }

    #[test]
    fn config_platform_reads_os_and_architecture() {
        let p =
            config_platform(br#"{"os":"linux","architecture":"arm","variant":"v7","rootfs":{}}"#)
                .unwrap();
        assert_eq!(p.display(), "linux/arm/v7");
    }
}
