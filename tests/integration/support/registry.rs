//! Registries for the import tests: `docker-registry` (distribution) with no auth, htpasswd or
//! token auth; the token service that signs its tokens; moto's ECR API; and test images pushed
//! into them with `skopeo copy` from OCI layouts written here.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use sha2::{Digest as _, Sha256};

use super::{assert_success, free_port, require_program, wait_for_port, ChildGuard, Host};

pub enum Auth {
    None,
    /// Users and passwords, stored bcrypt-hashed with `htpasswd`.
    Htpasswd(Vec<(String, String)>),
    /// Token auth through a [`TokenService`] granting these users.
    Token(Vec<(String, String)>),
}

impl Auth {
    /// htpasswd auth with one user.
    pub fn user(name: &str, password: &str) -> Auth {
        Auth::Htpasswd(vec![(name.to_owned(), password.to_owned())])
    }
}

/// A running `docker-registry` on a free loopback port (or on a [`Host`] of a test network).
pub struct Registry {
    pub host: String,
    pub dir: tempfile::TempDir,
    _registry: ChildGuard,
    _token_service: Option<ChildGuard>,
}

impl Registry {
    pub fn start(auth: Auth) -> Registry {
        Registry::start_on(&Host::loopback(), 5000, auth)
    }

    /// A registry on `host`, on port `port` there (a free port instead on loopback). Token
    /// auth only on loopback: its token service listens there.
    pub fn start_on(host: &Host, port: u16, auth: Auth) -> Registry {
        require_program("docker-registry", "docker-registry");
        assert!(
            host.netns.is_none() || !matches!(auth, Auth::Token(_)),
            "token auth needs a loopback registry"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let port = host.port(port);
        let mut token_service = None;
        let auth_yaml = match &auth {
            Auth::None => String::new(),
            Auth::Htpasswd(users) => {
                require_program("htpasswd", "apache2-utils");
                let file = dir.path().join("htpasswd");
                for (i, (user, password)) in users.iter().enumerate() {
                    let mut cmd = Command::new("htpasswd");
                    cmd.arg("-bB");
                    if i == 0 {
                        cmd.arg("-c");
                    }
                    let status = cmd
                        .arg(&file)
                        .arg(user)
                        .arg(password)
                        .stderr(Stdio::null())
                        .status()
                        .expect("run htpasswd");
                    assert!(status.success(), "htpasswd failed");
                }
                format!(
                    "auth:\n  htpasswd:\n    realm: test\n    path: {}\n",
                    file.display()
                )
            }
            Auth::Token(users) => {
                let (service, realm) = TokenService::start(dir.path(), users);
                token_service = Some(service);
                format!(
                    "auth:\n  token:\n    realm: {realm}\n    service: test-registry\n    issuer: test-issuer\n    rootcertbundle: {}\n",
                    dir.path().join("token.crt").display()
                )
            }
        };
        let config = format!(
            "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {}\n  secret: factoryd-test\n{auth_yaml}",
            dir.path().join("data").display(),
            host.addr(port),
        );
        let config_path = dir.path().join("config.yml");
        std::fs::write(&config_path, config).expect("write registry config");
        let registry = ChildGuard::spawn(
            "docker-registry",
            host.command("docker-registry")
                .arg("serve")
                .arg(&config_path)
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        );
        wait_for_port(host.addr(port), Duration::from_secs(20));
        Registry {
            host: host.addr(port).to_string(),
            dir,
            _registry: registry,
            _token_service: token_service,
        }
    }

    /// The file holding a blob's bytes in the registry's storage (to corrupt it).
    pub fn blob_data_path(&self, digest: &str) -> PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        self.dir
            .path()
            .join("data/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }
}

/// The token service of a token-auth registry (tests/integration/support/token_service.py).
pub struct TokenService;

impl TokenService {
    /// Writes a key and self-signed certificate into `dir` (`token.key`, `token.crt`), starts
    /// the service, and returns it with its realm URL.
    fn start(dir: &Path, users: &[(String, String)]) -> (ChildGuard, String) {
        require_program("openssl", "openssl");
        require_program("python3", "python3");
        let key = dir.join("token.key");
        let cert = dir.join("token.crt");
        let status = Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            ])
            .args(["-subj", "/CN=factoryd-test-token"])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("run openssl");
        assert!(status.success(), "openssl req failed");
        let port = free_port();
        let script = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/integration/support/token_service.py");
        let mut cmd = Command::new("python3");
        cmd.arg(script)
            .arg(port.to_string())
            .arg(&key)
            .arg(&cert)
            .arg("test-issuer")
            .arg("test-registry");
        for (user, password) in users {
            cmd.arg(format!("{user}:{password}"));
        }
        let guard = ChildGuard::spawn("token service", cmd.stdout(Stdio::null()));
        wait_for_port(
            SocketAddr::from(([127, 0, 0, 1], port)),
            Duration::from_secs(20),
        );
        (guard, format!("http://127.0.0.1:{port}/token"))
    }
}

/// moto's AWS API server (ECR among others) on a free port.
pub struct Moto {
    pub endpoint: String,
    _child: ChildGuard,
}

impl Moto {
    pub fn start() -> Moto {
        let venv =
            Path::new(env!("CARGO_MANIFEST_DIR")).join(".factoryd-test/venv/bin/moto_server");
        let program = if venv.is_file() {
            venv.to_string_lossy().into_owned()
        } else {
            require_program("moto_server", "moto[server] from PyPI");
            "moto_server".to_owned()
        };
        let port = free_port();
        let child = ChildGuard::spawn(
            "moto_server",
            Command::new(program)
                .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        );
        wait_for_port(
            SocketAddr::from(([127, 0, 0, 1], port)),
            Duration::from_secs(30),
        );
        Moto {
            endpoint: format!("http://127.0.0.1:{port}"),
            _child: child,
        }
    }
}

/// The password moto's GetAuthorizationToken puts in its token (`AWS:<account>-auth-token`,
/// account 123456789012 by default).
pub const MOTO_ECR_PASSWORD: &str = "123456789012-auth-token";

/// One image written into an OCI layout.
#[derive(Debug, Clone)]
pub struct TestImage {
    pub manifest_digest: String,
    pub layers: Vec<String>,
    pub config: String,
}

/// Writes OCI layouts of test images: gzip layers (stored, not compressed, so big layers are
/// cheap to make) of random bytes.
pub struct LayoutWriter {
    pub dir: PathBuf,
    index: Vec<serde_json::Value>,
}

fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// A small non-cryptographic generator: test data only needs to differ, fast.
pub struct Noise(u64);

impl Noise {
    pub fn new(seed: u64) -> Noise {
        Noise(
            seed.wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407)
                | 1,
        )
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            let bytes = self.0.to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
    }
}

impl LayoutWriter {
    pub fn new(dir: &Path) -> LayoutWriter {
        std::fs::create_dir_all(dir.join("blobs/sha256")).expect("create layout");
        std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#)
            .expect("write oci-layout");
        LayoutWriter {
            dir: dir.to_path_buf(),
            index: Vec::new(),
        }
    }

    fn put(&self, bytes: &[u8]) -> String {
        let digest = sha256(bytes);
        std::fs::write(
            self.dir
                .join("blobs/sha256")
                .join(digest.trim_start_matches("sha256:")),
            bytes,
        )
        .expect("write blob");
        digest
    }

    /// A gzip layer of `size` random bytes, streamed to disk; returns (digest, compressed size).
    fn layer(&self, size: usize, seed: u64) -> (String, u64) {
        let tmp = self.dir.join(format!("layer-{seed}.tmp"));
        let file = std::fs::File::create(&tmp).expect("create layer");
        let mut gz = flate2::write::GzEncoder::new(
            std::io::BufWriter::new(file),
            flate2::Compression::none(),
        );
        let mut noise = Noise::new(seed);
        let mut buf = vec![0u8; 1 << 20];
        let mut left = size;
        while left > 0 {
            let n = left.min(buf.len());
            noise.fill(&mut buf[..n]);
            gz.write_all(&buf[..n]).expect("write layer");
            left -= n;
        }
        gz.finish().expect("finish gzip").flush().expect("flush");
        let bytes = std::fs::read(&tmp).expect("read layer");
        let digest = sha256(&bytes);
        std::fs::rename(
            &tmp,
            self.dir
                .join("blobs/sha256")
                .join(digest.trim_start_matches("sha256:")),
        )
        .expect("rename layer");
        (digest, bytes.len() as u64)
    }

    /// An image of `layer_sizes` random layers for `os/arch`; returns it with its descriptor.
    pub fn image(
        &mut self,
        layer_sizes: &[usize],
        arch: &str,
        seed: u64,
    ) -> (TestImage, serde_json::Value) {
        let mut layers = Vec::new();
        for (i, size) in layer_sizes.iter().enumerate() {
            layers.push(self.layer(*size, seed * 1000 + i as u64));
        }
        let config = serde_json::json!({
            "architecture": arch, "os": "linux",
            "config": {"Env": [format!("SEED={seed}")]},
            "rootfs": {"type": "layers", "diff_ids": layers.iter().map(|(d, _)| d.clone()).collect::<Vec<_>>()},
        });
        let config_bytes = serde_json::to_vec(&config).expect("config json");
        let config_digest = self.put(&config_bytes);
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config_bytes.len()},
            "layers": layers.iter().map(|(d, s)| serde_json::json!({
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d, "size": s})).collect::<Vec<_>>(),
        });
        let bytes = serde_json::to_vec(&manifest).expect("manifest json");
        let digest = self.put(&bytes);
        let descriptor = serde_json::json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": digest, "size": bytes.len(),
            "platform": {"architecture": arch, "os": "linux"},
        });
        (
            TestImage {
                manifest_digest: digest,
                layers: layers.into_iter().map(|(d, _)| d).collect(),
                config: config_digest,
            },
            descriptor,
        )
    }

    /// Tags `descriptor` (an image) as `tag` in the layout's index.json.
    pub fn tag(&mut self, mut descriptor: serde_json::Value, tag: &str) {
        descriptor["annotations"] = serde_json::json!({"org.opencontainers.image.ref.name": tag});
        self.index.push(descriptor);
        self.write_index();
    }

    /// Writes an index of `entries` as a blob, tags it `tag`, and returns its digest.
    pub fn index(&mut self, entries: Vec<serde_json::Value>, tag: &str) -> String {
        let index = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": entries,
        });
        let bytes = serde_json::to_vec(&index).expect("index json");
        let digest = self.put(&bytes);
        self.tag(
            serde_json::json!({"mediaType": "application/vnd.oci.image.index.v1+json", "digest": digest, "size": bytes.len()}),
            tag,
        );
        digest
    }

    fn write_index(&self) {
        let index = serde_json::json!({"schemaVersion": 2, "manifests": self.index});
        std::fs::write(
            self.dir.join("index.json"),
            serde_json::to_vec(&index).expect("json"),
        )
        .expect("write index.json");
    }
}

/// `skopeo copy` between two transports, plain http on the registry side; panics on failure.
pub fn skopeo_copy(from: &str, to: &str, extra: &[&str]) {
    require_program("skopeo", "skopeo");
    let out = Command::new("skopeo")
        .args([
            "copy",
            "-q",
            "--src-tls-verify=false",
            "--dest-tls-verify=false",
        ])
        .args(extra)
        .arg(from)
        .arg(to)
        .output()
        .expect("run skopeo");
    assert_success(&out, &format!("skopeo copy {from} {to}"));
}

/// `skopeo inspect --raw` of a reference: the manifest bytes as stored.
pub fn skopeo_raw(reference: &str, extra: &[&str]) -> Vec<u8> {
    require_program("skopeo", "skopeo");
    let out = Command::new("skopeo")
        .args(["inspect", "--raw", "--tls-verify=false"])
        .args(extra)
        .arg(reference)
        .output()
        .expect("run skopeo");
    assert_success(&out, &format!("skopeo inspect {reference}"));
    out.stdout
}

/// The sha256 digest of bytes.
pub fn digest_of(bytes: &[u8]) -> String {
    sha256(bytes)
}
