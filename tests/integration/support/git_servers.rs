//! Git servers for the source tests: `git http-backend` behind a basic-auth HTTP host, and
//! `sshd` (openssh-server) with a generated host key; plus the fixture repository they serve.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::{assert_success, free_port, require_program, wait_for_port, ChildGuard};

/// Runs `git` in `dir` with a fixed identity and dates; panics with its stderr on failure.
pub fn git(dir: &Path, args: &[&str]) -> String {
    require_program("git", "git");
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .env("GIT_AUTHOR_NAME", "Fixture")
        .env("GIT_AUTHOR_EMAIL", "fixture@example.com")
        .env("GIT_COMMITTER_NAME", "Fixture")
        .env("GIT_COMMITTER_EMAIL", "fixture@example.com")
        .env("GIT_AUTHOR_DATE", "2024-01-01T00:00:00Z")
        .env("GIT_COMMITTER_DATE", "2024-01-01T00:00:00Z")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("HOME", dir)
        .output()
        .expect("run git");
    assert_success(&out, &format!("git {args:?} failed"));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Clones the work tree `work` into a new bare repository at `bare` (its parent created).
pub fn clone_bare(work: &Path, bare: &Path) {
    std::fs::create_dir_all(bare.parent().unwrap()).unwrap();
    git(
        work,
        &[
            "clone",
            "-q",
            "--bare",
            work.to_str().unwrap(),
            bare.to_str().unwrap(),
        ],
    );
}

/// The revision fixture: `main` (three commits, default branch), `other` (one commit off the
/// first), annotated tag `v1` on main's second commit, lightweight tag `first` on the first.
pub struct RevisionFixture {
    /// The bare repository, `<root>/repos/app.git`.
    pub bare: PathBuf,
    pub main: [String; 3],
    pub other_tip: String,
}

impl RevisionFixture {
    pub fn main_tip(&self) -> &str {
        &self.main[2]
    }
}

/// Builds the fixture under `root` (a bare repository in `root/repos/app.git`).
pub fn revision_fixture(root: &Path) -> RevisionFixture {
    let work = root.join("work");
    std::fs::create_dir_all(&work).unwrap();
    git(&work, &["init", "-q", "-b", "main"]);
    let mut main = Vec::new();
    for (i, body) in ["one", "two", "three"].iter().enumerate() {
        std::fs::create_dir_all(work.join("app")).unwrap();
        std::fs::write(
            work.join("app/Dockerfile"),
            format!("FROM scratch\n# {body}\n"),
        )
        .unwrap();
        std::fs::write(work.join("version.txt"), body).unwrap();
        git(&work, &["add", "-A"]);
        git(&work, &["commit", "-q", "-m", body]);
        main.push(git(&work, &["rev-parse", "HEAD"]));
        if i == 0 {
            git(&work, &["tag", "first"]);
        }
        if i == 1 {
            git(&work, &["tag", "-a", "v1", "-m", "release one"]);
        }
    }
    git(&work, &["checkout", "-q", "-b", "other", &main[0]]);
    std::fs::write(work.join("version.txt"), "other").unwrap();
    git(&work, &["commit", "-q", "-am", "other"]);
    let other_tip = git(&work, &["rev-parse", "HEAD"]);
    git(&work, &["checkout", "-q", "main"]);
    let repos = root.join("repos");
    let bare = repos.join("app.git");
    clone_bare(&work, &bare);
    RevisionFixture {
        bare,
        main: [main[0].clone(), main[1].clone(), main[2].clone()],
        other_tip,
    }
}

/// A superproject with a submodule, in `repos/app-sub.git`: `app/Dockerfile`, and a gitlink at
/// `app/lib` pinned to the first of two commits of `lib_repos/lib.git` (`lib.txt` = "lib one",
/// `docs/readme.md`), or to `pin_override`; `.gitmodules` gives `gitmodules_url` for it (no
/// entry when `None`).
pub struct SubmoduleFixture {
    pub lib_pinned: String,
    pub lib_tip: String,
}

pub fn submodule_fixture(
    repos: &Path,
    lib_repos: &Path,
    gitmodules_url: Option<&str>,
    pin_override: Option<&str>,
) -> SubmoduleFixture {
    let scratch = repos.join("..").join("submodule-work");
    let lib = scratch.join("lib");
    std::fs::create_dir_all(lib.join("docs")).unwrap();
    git(&lib, &["init", "-q", "-b", "main"]);
    std::fs::write(lib.join("lib.txt"), "lib one\n").unwrap();
    std::fs::write(lib.join("docs/readme.md"), "# lib\n").unwrap();
    git(&lib, &["add", "-A"]);
    git(&lib, &["commit", "-q", "-m", "lib one"]);
    let lib_pinned = git(&lib, &["rev-parse", "HEAD"]);
    std::fs::write(lib.join("lib.txt"), "lib two\n").unwrap();
    git(&lib, &["commit", "-q", "-am", "lib two"]);
    let lib_tip = git(&lib, &["rev-parse", "HEAD"]);
    clone_bare(&lib, &lib_repos.join("lib.git"));

    let app = scratch.join("app");
    std::fs::create_dir_all(app.join("app")).unwrap();
    git(&app, &["init", "-q", "-b", "main"]);
    std::fs::write(app.join("app/Dockerfile"), "FROM scratch\nCOPY . /\n").unwrap();
    let gitmodules = match gitmodules_url {
        Some(url) => format!("[submodule \"lib\"]\n\tpath = app/lib\n\turl = {url}\n"),
        None => "[submodule \"other\"]\n\tpath = elsewhere\n\turl = ../x.git\n".to_owned(),
    };
    std::fs::write(app.join(".gitmodules"), gitmodules).unwrap();
    git(&app, &["add", "-A"]);
    git(
        &app,
        &[
            "update-index",
            "--add",
            "--cacheinfo",
            &format!("160000,{},app/lib", pin_override.unwrap_or(&lib_pinned)),
        ],
    );
    git(&app, &["commit", "-q", "-m", "app with a submodule"]);
    clone_bare(&app, &repos.join("app-sub.git"));
    SubmoduleFixture {
        lib_pinned,
        lib_tip,
    }
}

/// `git http-backend` on a free loopback port, every request requiring basic auth.
pub struct GitHttpServer {
    _guard: ChildGuard,
    pub port: u16,
    pub log: PathBuf,
    scheme: &'static str,
}

impl GitHttpServer {
    pub fn start(project_root: &Path, user: &str, password: &str) -> GitHttpServer {
        Self::start_with(project_root, user, password, None)
    }

    /// The same over https, with a certificate [`test_tls`]'s CA signed.
    pub fn start_tls(project_root: &Path, user: &str, password: &str) -> GitHttpServer {
        Self::start_with(project_root, user, password, Some(test_tls()))
    }

    fn start_with(
        project_root: &Path,
        user: &str,
        password: &str,
        tls: Option<&TestTls>,
    ) -> GitHttpServer {
        require_program("python3", "python3");
        let port = free_port();
        let log = project_root.join("..").join(format!("http-{port}.log"));
        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/integration/support/git_http_backend.py"
        );
        let mut command = Command::new("python3");
        command
            .arg(script)
            .arg(port.to_string())
            .arg(project_root)
            .arg(user)
            .arg(password)
            .arg(&log);
        if let Some(tls) = tls {
            command.arg(&tls.cert).arg(&tls.key);
        }
        let guard = ChildGuard::spawn("git http-backend host", &mut command);
        wait_for_port(([127, 0, 0, 1], port).into(), Duration::from_secs(10));
        GitHttpServer {
            _guard: guard,
            port,
            log,
            scheme: if tls.is_some() { "https" } else { "http" },
        }
    }

    /// `http://127.0.0.1:PORT/<repo>` (`https` for [`start_tls`](Self::start_tls)).
    pub fn url(&self, repo: &str) -> String {
        format!("{}://127.0.0.1:{}/{repo}", self.scheme, self.port)
    }

    /// Docker-file details for the revision fixture's `app.git` here, authenticated over http
    /// as `user` with `password`: context `/app`, build file `/app/Dockerfile`.
    pub fn app_details(&self, user: &str, password: &str) -> serde_json::Value {
        serde_json::json!({
            "repo": {"url": self.url("app.git"),
                "auth": {"type": "http", "credentials": {"username": user, "password": password}}},
            "context_dir": "/app", "build_file": "/app/Dockerfile"})
    }

    /// Every request line logged so far ("<status> <method> <path> auth=<header or ->").
    pub fn requests(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// Requests answered 401 so far.
    pub fn unauthorized_count(&self) -> usize {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.starts_with("401 "))
            .count()
    }
}

/// A generated SSH key pair.
pub struct KeyPair {
    pub private: String,
    pub public: String,
}

/// Generates a key with `ssh-keygen` (`ed25519` in OpenSSH format, or `ecdsa` in PEM).
pub fn ssh_key(dir: &Path, name: &str, kind: &str, passphrase: &str) -> KeyPair {
    require_program("ssh-keygen", "openssh-client");
    let path = dir.join(name);
    let mut cmd = Command::new("ssh-keygen");
    cmd.args(["-q", "-t", kind, "-N", passphrase, "-C", name, "-f"])
        .arg(&path);
    if kind == "ecdsa" {
        cmd.args(["-b", "256", "-m", "PEM"]);
    }
    let out = cmd.output().expect("run ssh-keygen");
    assert_success(&out, "ssh-keygen");
    KeyPair {
        private: std::fs::read_to_string(&path).unwrap(),
        public: std::fs::read_to_string(path.with_extension("pub")).unwrap(),
    }
}

/// `sshd -D -e` on a free loopback port, admitting the given public keys for the current user.
pub struct SshServer {
    _guard: ChildGuard,
    pub port: u16,
    /// The line for a known_hosts file: `[127.0.0.1]:PORT ssh-ed25519 AAAA…`.
    pub known_hosts_line: String,
    pub user: String,
}

impl SshServer {
    pub fn start(dir: &Path, authorized: &[&str]) -> SshServer {
        let sshd = "/usr/sbin/sshd";
        require_program(sshd, "openssh-server");
        // Privilege separation needs this directory; a fresh machine may lack it until the
        // service first starts.
        let _ = std::fs::create_dir_all("/run/sshd");
        let host_key = ssh_key(dir, "host_ed25519", "ed25519", "");
        let authorized_keys = dir.join("authorized_keys");
        std::fs::write(&authorized_keys, authorized.join("")).unwrap();
        let port = free_port();
        let user = std::env::var("USER")
            .ok()
            .filter(|u| !u.is_empty())
            .unwrap_or_else(|| {
                String::from_utf8_lossy(&Command::new("id").arg("-un").output().unwrap().stdout)
                    .trim()
                    .to_owned()
            });
        let config = dir.join("sshd_config");
        std::fs::write(
            &config,
            format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nPidFile {}\n\
                 AuthorizedKeysFile {}\nStrictModes no\nUsePAM no\nPasswordAuthentication no\n\
                 KbdInteractiveAuthentication no\nPubkeyAuthentication yes\n\
                 PermitRootLogin prohibit-password\nAllowUsers {user}\nLogLevel ERROR\n",
                dir.join("host_ed25519").display(),
                dir.join("sshd.pid").display(),
                authorized_keys.display(),
            ),
        )
        .unwrap();
        let guard = ChildGuard::spawn(
            "sshd",
            Command::new(sshd)
                .arg("-D")
                .arg("-e")
                .arg("-f")
                .arg(&config),
        );
        wait_for_port(([127, 0, 0, 1], port).into(), Duration::from_secs(10));
        let mut fields = host_key.public.split_whitespace();
        let known_hosts_line = format!(
            "[127.0.0.1]:{port} {} {}\n",
            fields.next().unwrap(),
            fields.next().unwrap()
        );
        SshServer {
            _guard: guard,
            port,
            known_hosts_line,
            user,
        }
    }

    /// `ssh://127.0.0.1:PORT/<absolute path>`.
    pub fn url(&self, repo: &Path) -> String {
        format!("ssh://127.0.0.1:{}{}", self.port, repo.display())
    }
}

/// The shape of a hostile tree for [`hostile_tree_fixture`].
pub enum Hostile {
    /// Four levels of 100 directories over 100 files: 10^8 paths from five tree objects.
    Wide,
    /// A chain of directories `d/d/d/...` this deep (one tree object per level).
    Deep(usize),
}

/// A bare repository `repos/<name>` whose single commit on `main` holds `Dockerfile`,
/// `.dockerignore` = `dockerignore` and, under `tree/`, the hostile tree. Written with git2
/// straight into the object database: the git CLI would take a process per tree object.
pub fn hostile_tree_fixture(repos: &Path, name: &str, dockerignore: &str, shape: Hostile) {
    let repo = git2::Repository::init_bare(repos.join(name)).expect("init bare");
    // git's own cap (core.maxTreeDepth, 2048 by default) would make the server refuse the deep
    // tree: this server must serve whatever a hostile one would.
    repo.config()
        .and_then(|mut c| c.set_i64("core.maxTreeDepth", 1_000_000))
        .expect("config");
    let blob = |data: &[u8]| repo.blob(data).expect("blob");
    let tree_of = |entries: &[(String, git2::Oid, i32)]| {
        let mut builder = repo.treebuilder(None).expect("treebuilder");
        for (name, oid, mode) in entries {
            builder.insert(name, *oid, *mode).expect("insert");
        }
        builder.write().expect("write tree")
    };
    let file = blob(b"x\n");
    let hostile = match shape {
        Hostile::Wide => {
            let files: Vec<_> = (0..100)
                .map(|i| (format!("f{i:02}"), file, 0o100644))
                .collect();
            let mut level = tree_of(&files);
            for _ in 0..3 {
                let dirs: Vec<_> = (0..100)
                    .map(|i| (format!("d{i:02}"), level, 0o040000))
                    .collect();
                level = tree_of(&dirs);
            }
            level
        }
        Hostile::Deep(depth) => {
            let mut level = tree_of(&[("f".to_owned(), file, 0o100644)]);
            for _ in 0..depth {
                level = tree_of(&[("d".to_owned(), level, 0o040000)]);
            }
            level
        }
    };
    let root = tree_of(&[
        (
            ".dockerignore".to_owned(),
            blob(dockerignore.as_bytes()),
            0o100644,
        ),
        ("Dockerfile".to_owned(), blob(b"FROM scratch\n"), 0o100644),
        ("tree".to_owned(), hostile, 0o040000),
    ]);
    let tree = repo.find_tree(root).expect("root tree");
    let sig = git2::Signature::new("Fixture", "fixture@example.com", &git2::Time::new(0, 0))
        .expect("signature");
    repo.commit(Some("refs/heads/main"), &sig, &sig, "hostile", &tree, &[])
        .expect("commit");
    repo.set_head("refs/heads/main").expect("HEAD");
}

/// A CA and a server certificate for `127.0.0.1` it signed, made once per test process with
/// `openssl` under the target directory's scratch space.
pub struct TestTls {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

pub fn test_tls() -> &'static TestTls {
    static TLS: std::sync::OnceLock<TestTls> = std::sync::OnceLock::new();
    TLS.get_or_init(|| {
        require_program("openssl", "openssl");
        let dir =
            Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ext = dir.join("server.ext");
        std::fs::write(
            &ext,
            "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
        )
        .unwrap();
        let run = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(&dir)
                .output()
                .expect("run openssl");
            assert_success(&out, &format!("openssl {args:?}"));
        };
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        run(&[
            &["req", "-x509"][..],
            &ec,
            &["-keyout", "ca.key", "-out", "ca.pem", "-days", "2"],
            &["-subj", "/CN=factoryd test CA"],
            &["-addext", "basicConstraints=critical,CA:TRUE"],
            &["-addext", "keyUsage=critical,keyCertSign"],
        ]
        .concat());
        run(&[
            &["req"][..],
            &ec,
            &[
                "-keyout",
                "server.key",
                "-out",
                "server.csr",
                "-subj",
                "/CN=127.0.0.1",
            ],
        ]
        .concat());
        run(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "server.ext",
        ]);
        TestTls {
            ca: dir.join("ca.pem"),
            cert: dir.join("server.pem"),
            key: dir.join("server.key"),
        }
    })
}

/// `endless_refs.py` (see there): an https git server whose ref advertisement never ends.
pub struct EndlessRefs {
    _guard: ChildGuard,
    pub url: String,
    sent_file: PathBuf,
}

impl EndlessRefs {
    /// One more ref every `every_ms` milliseconds (0: as fast as the client reads).
    pub fn start(dir: &Path, every_ms: u64) -> EndlessRefs {
        require_program("python3", "python3");
        let tls = test_tls();
        let port = free_port();
        let sent_file = dir.join(format!("endless-{port}.sent"));
        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/integration/support/endless_refs.py"
        );
        let guard = ChildGuard::spawn(
            "endless ref advertisement",
            Command::new("python3")
                .arg(script)
                .arg(port.to_string())
                .arg(&tls.cert)
                .arg(&tls.key)
                .arg(every_ms.to_string())
                .arg(&sent_file),
        );
        wait_for_port(([127, 0, 0, 1], port).into(), Duration::from_secs(10));
        EndlessRefs {
            _guard: guard,
            url: format!("https://127.0.0.1:{port}/endless.git"),
            sent_file,
        }
    }

    /// Bytes the server has sent so far, over all connections.
    pub fn sent(&self) -> u64 {
        std::fs::read_to_string(&self.sent_file)
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or(0)
    }
}
