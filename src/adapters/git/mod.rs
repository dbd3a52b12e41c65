//! Git sources through libgit2 (git2): fetch a job's revision into a bare repository in its
//! workspace, then seal the commit's tree into a build context (ARCHITECTURE §3, §6).
//!
//! What this module guarantees:
//!
//! * Transports: `https` and `ssh`; `http` only for hosts in `git.insecure_hosts`. The job's
//!   URL was already limited to those schemes (and scp-like `user@host:path`) at decode time;
//!   `file://`, local paths and remote helpers never get here. Off-site redirects are not
//!   followed, and the host is checked against the egress policy before connecting. Over
//!   https, libgit2 connects through the fetch's own egress proxy (`proxy.rs`): the proxy
//!   resolves the host through the policy and connects to the allowed address itself, caps
//!   the bytes before the pack (`git.max_ref_advertisement_bytes`) and in all, and closes the
//!   connection when the job is cancelled. Plain http (only `git.insecure_hosts`) and ssh
//!   connect directly: libgit2 1.9 sends plain-http requests in proxy form but to the server
//!   itself, and libssh2 has no proxy; for them the policy check before connecting stands.
//! * Credentials go only to the host the job named (the URL in the credential callback is
//!   checked), each kind at most once per connection: a refused password or key fails the job
//!   as `auth_failed` instead of looping. SSH keys stay in memory.
//! * SSH host keys are checked against `git.known_hosts_file` unless
//!   `git.host_key_checking = false`.
//! * Revision rules: no branch → the remote's default branch; a tag → the tagged commit; a hash
//!   reachable from the branch tip → that commit; a hash elsewhere in the repository → the
//!   branch tip with `fallback = true` and a warning (or an error under
//!   `git.unaligned_hash = "fail"`); an unknown branch, tag or hash → permanent `not_found`.
//! * Fetch size: depth 1 for a branch tip or a tag. For a hash, the branch is deepened in steps
//!   (50, 1,000 commits, then the full branch) until the hash shows up, because a shallow
//!   fetch of a hash that is not advertised needs server options many hosts lack; only when the
//!   whole branch lacks it are the other branches and tags fetched, to tell "elsewhere" from
//!   "unknown".
//! * Submodules: without `repo.submodules` a submodule is sent as an empty directory (as
//!   `git archive` does). With it, each gitlink inside the context is looked up in the
//!   superproject commit's `.gitmodules` (relative URLs resolve against the job's URL), checked
//!   like the job's URL (transports, `git.insecure_hosts`, egress), and its pinned commit is
//!   fetched into its own bare repository in the workspace: by hash first, and if the server
//!   refuses an unadvertised hash, its branches and tags, deeper and deeper, until the commit
//!   shows up. The job's credentials go only to a submodule on the job's host and port; any
//!   other submodule is fetched anonymously. One level: a submodule inside a submodule fails
//!   as `unsupported`.
//! * Progress is emitted as `Progress` events; cancellation stops the transfer at the next
//!   packet (over https at once, through the proxy), and libgit2's connect and I/O timeouts (`git.connect_timeout_secs`,
//!   `git.io_timeout_secs`) bound a silent server. Bytes received are capped by
//!   `sources.max_fetch_bytes`.
//!
//! Must not: write a checkout, run a git subprocess, read the node's git configuration (the
//! search paths are emptied at start), or put a credential or URL userinfo in an error.

pub mod known_hosts;
mod proxy;
mod submodule;
mod tree;

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::{Arc, Once};
use std::time::Duration;

use tokio::time::Instant;

use git2::{
    AutotagOption, CertificateCheckStatus, Cred, CredentialType, FetchOptions, Oid, ProxyOptions,
    RemoteCallbacks, RemoteRedirect, Repository, RepositoryInitOptions,
};

use crate::config::{GitConfig, UnalignedHash};
use crate::context::Limits;
use crate::egress::EgressPolicy;
use crate::error::{ErrorCode, JobError, Stage};
use crate::job::{GitAuth, GitRef, GitRepo, GitTransport, JobEvent, Revision};
use crate::ports::{EventSink, SealedContext, StageContext};
use known_hosts::{HostKeyVerdict, KnownHosts};

/// Deepening steps when looking for a requested hash below the branch tip; `i32::MAX` is
/// libgit2's "unshallow" (the whole history).
const DEEPEN_STEPS: [i32; 3] = [50, 1000, i32::MAX];

/// Matches no ref a server advertises: the advertisement-only first connection wants nothing.
const PROBE_REFSPEC: &str = "refs/factoryd-probe/none:refs/factoryd-probe/none";

/// The bare repository's directory inside the workspace.
const REPO_DIR: &str = "source.git";

/// Minimum time between two progress events.
const PROGRESS_EVERY: Duration = Duration::from_millis(500);

/// Fetches git sources; one per worker, shared by jobs.
#[derive(Debug, Clone)]
pub struct GitFetcher {
    config: GitConfig,
    policy: EgressPolicy,
    max_fetch_bytes: u64,
    limits: Limits,
}

/// A fetched and sealed git source.
pub struct GitSource {
    pub context: SealedContext,
    pub revision: Revision,
    pub fetched_bytes: u64,
}

impl GitFetcher {
    pub fn new(
        config: GitConfig,
        policy: EgressPolicy,
        max_fetch_bytes: u64,
        limits: Limits,
    ) -> GitFetcher {
        init_libgit2(config.connect_timeout, config.io_timeout);
        if let Some(file) = &config.tls_ca_file {
            trust_ca_file(file);
        }
        GitFetcher {
            config,
            policy,
            max_fetch_bytes,
            limits,
        }
    }

    /// Fetches `repo` into the workspace and seals `context_dir` / `build_file` of the commit.
    pub async fn fetch(
        &self,
        repo: &GitRepo,
        context_dir: &str,
        build_file: &str,
        cx: &StageContext,
    ) -> Result<GitSource, JobError> {
        let remote = &repo.remote;
        if remote.transport == GitTransport::Http && !self.is_insecure_host(repo) {
            return Err(JobError::permanent(
                Stage::Fetch,
                ErrorCode::Unsupported,
                format!(
                    "plain http:// is refused for {}: use https:// or ssh://, or list the host \
                     in git.insecure_hosts",
                    remote.host
                ),
            ));
        }
        let port = remote.port.unwrap_or(match remote.transport {
            GitTransport::Https => 443,
            GitTransport::Http => 80,
            GitTransport::Ssh => 22,
        });
        self.policy
            .resolve(&remote.host, port)
            .await
            .map_err(|e| e.into_job_error(Stage::Fetch))?;
        let known_hosts = if remote.transport == GitTransport::Ssh && self.config.host_key_checking
        {
            let path = &self.config.known_hosts_file;
            let text = tokio::fs::read_to_string(path)
                .await
                .map_err(|e| known_hosts_unreadable(path, e))?;
            Some(KnownHosts::parse(&text))
        } else {
            None
        };

        let task = FetchTask {
            repo: repo.clone(),
            port,
            known_hosts,
            unaligned: self.config.unaligned_hash,
            max_fetch_bytes: self.max_fetch_bytes,
            limits: self.limits,
            repo_path: cx.workspace.join(REPO_DIR),
            context_dir: context_dir.to_owned(),
            build_file: build_file.to_owned(),
            cx: cx.clone(),
            fetcher: self.clone(),
        };
        // libgit2 blocks; the task watches `cx.cancel` from its progress callback. It is always
        // awaited, so when this returns nothing writes into the workspace any more.
        tokio::task::spawn_blocking(move || task.run())
            .await
            .map_err(|e| {
                JobError::transient(
                    Stage::Fetch,
                    ErrorCode::Internal,
                    format!("the git fetch task failed: {e}"),
                )
            })?
    }

    fn is_insecure_host(&self, repo: &GitRepo) -> bool {
        let host = repo.remote.host.to_ascii_lowercase();
        let with_port = repo.remote.port.map(|p| format!("{host}:{p}"));
        self.config
            .insecure_hosts
            .iter()
            .any(|h| *h == host || Some(h) == with_port.as_ref())
    }
}

/// Sets libgit2's process-wide options once: server timeouts, and no configuration search path,
/// so a node's `~/.gitconfig` or `/etc/gitconfig` (`insteadOf`, proxies, `sslVerify`) cannot
/// change what a job fetches. Objects are not hashed again on every read: the indexer computed
/// each object's id from its content when the pack arrived, and the pack then sits in the job's
/// private workspace; a second pass of collision-detecting SHA-1 over every blob streamed
/// into the context adds time, not safety.
fn init_libgit2(connect_timeout: Duration, io_timeout: Duration) {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        git2::opts::strict_hash_verification(false);
        let ms = |d: Duration| i32::try_from(d.as_millis()).unwrap_or(i32::MAX);
        #[allow(unsafe_code)]
        // SAFETY: these calls only store integers and strings in libgit2's global settings.
        // `Once` makes them run once, before this adapter's first fetch; git2 marks them unsafe
        // because they race with libgit2 calls on other threads, and none of this process's
        // other git2 users (none today) run before a `GitFetcher` is built at start-up.
        unsafe {
            let _ = git2::opts::set_server_connect_timeout_in_milliseconds(ms(connect_timeout));
            let _ = git2::opts::set_server_timeout_in_milliseconds(ms(io_timeout));
            for level in [
                git2::ConfigLevel::ProgramData,
                git2::ConfigLevel::System,
                git2::ConfigLevel::XDG,
                git2::ConfigLevel::Global,
            ] {
                let _ = git2::opts::set_search_path(level, "");
            }
        }
    });
}

/// Adds the certificates in `file` to those libgit2 trusts for https (process-wide, on top of
/// the system's), once per file. A file that cannot be read is logged: git over https to a
/// server behind that CA then fails as `auth_failed` (certificate), naming the host.
fn trust_ca_file(file: &std::path::Path) {
    static LOADED: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());
    let mut loaded = LOADED.lock().unwrap_or_else(|e| e.into_inner());
    if loaded.iter().any(|f| f == file) {
        return;
    }
    #[allow(unsafe_code)]
    // SAFETY: stores a path in libgit2's global TLS context (OpenSSL's
    // SSL_CTX_load_verify_locations, which adds to the certificate store under its own lock).
    // The mutex keeps two of these calls apart; in the daemon it runs once, at start-up, before
    // any fetch.
    let added = unsafe { git2::opts::set_ssl_cert_file(file) };
    match added {
        Ok(()) => loaded.push(file.to_owned()),
        Err(e) => tracing::error!(
            file = %file.display(),
            error = %e.message(),
            "Cannot read git.tls_ca_file; git over https trusts the system's CAs only."
        ),
    }
}

/// Everything the blocking fetch needs, owned.
struct FetchTask {
    repo: GitRepo,
    port: u16,
    known_hosts: Option<KnownHosts>,
    unaligned: UnalignedHash,
    max_fetch_bytes: u64,
    limits: Limits,
    repo_path: PathBuf,
    context_dir: String,
    build_file: String,
    cx: StageContext,
    /// For the settings a submodule's fetch is checked against.
    fetcher: GitFetcher,
}

/// What the callbacks of one connection saw, to classify a libgit2 failure precisely.
#[derive(Default)]
struct CallbackState {
    cancelled: bool,
    over_cap: bool,
    auth_refused: bool,
    no_credentials: bool,
    /// A host other than the job's asked for credentials (after a redirect).
    other_host: Option<String>,
    host_key: Option<String>,
    asked: Vec<CredentialType>,
    received_bytes: u64,
    /// Why the egress proxy cut the connection, if it did.
    proxy_stop: Option<proxy::Stop>,
}

/// `git.known_hosts_file` could not be read: SSH host keys cannot be checked.
fn known_hosts_unreadable(path: &std::path::Path, e: std::io::Error) -> JobError {
    JobError::transient(
        Stage::Fetch,
        ErrorCode::LocalIo,
        format!(
            "cannot read git.known_hosts_file {}: {e}; SSH host keys cannot be checked",
            path.display()
        ),
    )
}

impl FetchTask {
    fn run(self) -> Result<GitSource, JobError> {
        let repo = self.init_repo()?;
        let mut total_bytes = 0;

        // Phase 1: the advertisement alone (a download that wants nothing), to learn the
        // default branch and which refs exist before choosing what to fetch.
        let advertised = {
            let mut remote = repo
                .remote_anonymous(&self.repo.url)
                .map_err(|e| self.local_error(e))?;
            let state = Rc::new(RefCell::new(CallbackState::default()));
            let proxy = self.start_proxy()?;
            let mut options = self.fetch_options(&state, None, proxy.as_ref());
            // With no refspec libgit2 would fetch all of HEAD's history; a refspec that matches
            // no remote ref makes the download want nothing, so only the refs are exchanged.
            let result = remote.download(&[PROBE_REFSPEC], Some(&mut options));
            state.borrow_mut().proxy_stop = proxy.as_ref().and_then(|p| p.meter.stopped());
            total_bytes += state.borrow().received_bytes;
            result.map_err(|e| self.fetch_error(&e, &state.borrow()))?;
            let heads: BTreeMap<String, Oid> = remote
                .list()
                .map_err(|e| self.fetch_error(&e, &state.borrow()))?
                .iter()
                .map(|h| (h.name().to_owned(), h.oid()))
                .collect();
            let default = remote
                .default_branch()
                .ok()
                .and_then(|b| b.as_str().ok().map(str::to_owned));
            let _ = remote.disconnect();
            Advertised { heads, default }
        };

        let branch = match &self.repo.branch {
            Some(branch) => branch.clone(),
            None => advertised.default_branch().ok_or_else(|| {
                JobError::permanent(
                    Stage::Fetch,
                    ErrorCode::NotFound,
                    "the repository has no default branch (is it empty?)",
                )
            })?,
        };
        let branch_ref = format!("refs/heads/{branch}");
        let tip = *advertised.heads.get(&branch_ref).ok_or_else(|| {
            JobError::permanent(
                Stage::Fetch,
                ErrorCode::NotFound,
                format!("branch {branch:?} not found in the repository"),
            )
        })?;
        let branch_spec = format!("+{branch_ref}:refs/factoryd/branch");

        let mut revision = Revision {
            commit: tip.to_string(),
            branch: branch.clone(),
            tag: None,
            requested_hash: None,
            fallback: false,
        };
        let commit = match &self.repo.git_ref {
            None => {
                total_bytes += self.fetch(&repo, &[&branch_spec], 1)?;
                tip
            }
            Some(GitRef::Tag(tag)) => {
                let tag_ref = format!("refs/tags/{tag}");
                let tag_oid = *advertised.heads.get(&tag_ref).ok_or_else(|| {
                    JobError::permanent(
                        Stage::Fetch,
                        ErrorCode::NotFound,
                        format!("tag {tag:?} not found in the repository"),
                    )
                })?;
                total_bytes += self.fetch(&repo, &[&format!("+{tag_ref}:{tag_ref}")], 1)?;
                let commit = repo
                    .find_object(tag_oid, None)
                    .and_then(|o| o.peel_to_commit())
                    .map_err(|_| {
                        JobError::permanent(
                            Stage::Fetch,
                            ErrorCode::NotFound,
                            format!("tag {tag:?} does not point to a commit"),
                        )
                    })?;
                revision.tag = Some(tag.clone());
                commit.id()
            }
            Some(GitRef::Hash(hash)) => {
                revision.requested_hash = Some(hash.clone());
                let wanted = Oid::from_str(hash).map_err(|_| {
                    JobError::permanent(
                        Stage::Fetch,
                        ErrorCode::InvalidJob,
                        format!("{hash:?} is not a commit hash"),
                    )
                })?;
                let (commit, bytes) =
                    self.fetch_hash(&repo, &advertised, &branch, &branch_spec, tip, wanted)?;
                total_bytes += bytes;
                revision.fallback = commit != wanted;
                commit
            }
        };
        revision.commit = commit.to_string();
        let gitmodules = if self.repo.submodules {
            submodule::read_gitmodules(&repo, commit).map_err(|e| self.local_error(e))??
        } else {
            None
        };
        drop(repo);

        let mut fetched_submodules = 0usize;
        let mut fetch_submodule = |path: &str, pinned: Oid| {
            fetched_submodules += 1;
            let (repo_path, bytes) =
                self.fetch_submodule(gitmodules.as_deref(), path, pinned, fetched_submodules)?;
            total_bytes += bytes;
            Ok(repo_path)
        };
        let context = tree::seal(
            &self.repo_path,
            commit,
            &self.context_dir,
            &self.build_file,
            self.limits,
            self.cx.cancel.clone(),
            if self.repo.submodules {
                Some(&mut fetch_submodule)
            } else {
                None
            },
        )?;
        Ok(GitSource {
            context,
            revision,
            fetched_bytes: total_bytes,
        })
    }

    /// Fetches the branch deeper and deeper until `wanted` is reachable from `tip`. Returns the
    /// commit to build (`wanted`, or `tip` on fallback) and the bytes received.
    fn fetch_hash(
        &self,
        repo: &Repository,
        advertised: &Advertised,
        branch: &str,
        branch_spec: &str,
        tip: Oid,
        wanted: Oid,
    ) -> Result<(Oid, u64), JobError> {
        let mut bytes = 0;
        if wanted == tip {
            bytes += self.fetch(repo, &[branch_spec], 1)?;
            return Ok((tip, bytes));
        }
        for depth in DEEPEN_STEPS {
            bytes += self.fetch(repo, &[branch_spec], depth)?;
            if reachable(repo, tip, wanted) {
                return Ok((wanted, bytes));
            }
        }
        // Not on the branch: does the repository have it at all?
        let exists = advertised.heads.values().any(|oid| *oid == wanted) || {
            bytes += self.fetch(
                repo,
                &[
                    "+refs/heads/*:refs/factoryd/heads/*",
                    "+refs/tags/*:refs/factoryd/tags/*",
                ],
                0,
            )?;
            repo.find_commit(wanted).is_ok()
        };
        let hash = wanted.to_string();
        if !exists {
            return Err(JobError::permanent(
                Stage::Fetch,
                ErrorCode::NotFound,
                format!("commit {hash} not found in the repository"),
            ));
        }
        match self.unaligned {
            UnalignedHash::Fail => Err(JobError::permanent(
                Stage::Fetch,
                ErrorCode::InvalidJob,
                format!(
                    "commit {hash} is not on branch {branch:?} (git.unaligned_hash = \"fail\")"
                ),
            )),
            UnalignedHash::UseBranchHead => {
                self.cx.emit(JobEvent::Warning {
                    code: "revision_fallback".to_owned(),
                    message: format!(
                        "commit {hash} is not on branch {branch:?}; building the branch's \
                         latest commit {tip} instead"
                    ),
                });
                Ok((tip, bytes))
            }
        }
    }

    /// One fetch of `specs` (depth 0: as deep as the refs go). Returns the bytes received.
    fn fetch(&self, repo: &Repository, specs: &[&str], depth: i32) -> Result<u64, JobError> {
        let mut remote = repo
            .remote_anonymous(&self.repo.url)
            .map_err(|e| self.local_error(e))?;
        let state = Rc::new(RefCell::new(CallbackState::default()));
        let proxy = self.start_proxy()?;
        let mut options = self.fetch_options(&state, Some(depth), proxy.as_ref());
        let result = remote.fetch(specs, Some(&mut options), None);
        state.borrow_mut().proxy_stop = proxy.as_ref().and_then(|p| p.meter.stopped());
        let received = state.borrow().received_bytes;
        result.map_err(|e| self.fetch_error(&e, &state.borrow()))?;
        Ok(received)
    }

    /// The egress proxy of one https connection series (see `proxy`); none for ssh, which
    /// libssh2 connects itself, nor for plain http, which libgit2 1.9 would send in proxy form
    /// to the server itself (both checked by the egress policy before, not pinned).
    fn start_proxy(&self) -> Result<Option<proxy::Proxy>, JobError> {
        if self.repo.remote.transport != GitTransport::Https {
            return Ok(None);
        }
        let config = &self.fetcher.config;
        let caps = proxy::Caps {
            before_pack: config.max_ref_advertisement_bytes,
            // A backstop above the pack cap the progress callback applies (TLS and HTTP
            // framing add a little to what the pack counts).
            total: self
                .max_fetch_bytes
                .saturating_add(self.max_fetch_bytes / 16)
                .saturating_add(config.max_ref_advertisement_bytes),
        };
        proxy::Proxy::start(
            &tokio::runtime::Handle::current(),
            self.fetcher.policy,
            caps,
            self.cx.cancel.clone(),
            config.connect_timeout,
        )
        .map(Some)
        .map_err(|e| {
            JobError::transient(
                Stage::Fetch,
                ErrorCode::LocalIo,
                format!("cannot start the git egress proxy on a loopback port: {e}"),
            )
        })
    }

    fn fetch_options<'a>(
        &'a self,
        state: &Rc<RefCell<CallbackState>>,
        depth: Option<i32>,
        proxy: Option<&proxy::Proxy>,
    ) -> FetchOptions<'a> {
        let mut callbacks = RemoteCallbacks::new();

        let creds_state = Rc::clone(state);
        callbacks.credentials(move |url, username_from_url, allowed| {
            self.credentials(
                &mut creds_state.borrow_mut(),
                url,
                username_from_url,
                allowed,
            )
        });

        let cert_state = Rc::clone(state);
        callbacks.certificate_check(move |cert, host| {
            let Some(hostkey) = cert.as_hostkey() else {
                // TLS: libgit2 has verified the chain and name with OpenSSL; keep its verdict.
                return Ok(CertificateCheckStatus::CertificatePassthrough);
            };
            let Some(known) = &self.known_hosts else {
                return Ok(CertificateCheckStatus::CertificateOk);
            };
            let key = hostkey.hostkey().unwrap_or_default();
            let verdict = known.check(host, self.port, key);
            let problem = match verdict {
                HostKeyVerdict::Known => return Ok(CertificateCheckStatus::CertificateOk),
                HostKeyVerdict::Unknown => "is not in git.known_hosts_file",
                HostKeyVerdict::Mismatch => {
                    "does not match git.known_hosts_file (the key changed, or someone is in \
                     the middle)"
                }
                HostKeyVerdict::Revoked => "is marked @revoked in git.known_hosts_file",
            };
            let message = format!("the SSH host key of {host} {problem}");
            cert_state.borrow_mut().host_key = Some(message.clone());
            Err(git2::Error::from_str(&message))
        });

        let progress_state = Rc::clone(state);
        let cancel = self.cx.cancel.clone();
        let events: Arc<dyn EventSink> = Arc::clone(&self.cx.events);
        let cap = self.max_fetch_bytes;
        let mut last_emit: Option<Instant> = None;
        let meter = proxy.map(|p| Arc::clone(&p.meter));
        callbacks.transfer_progress(move |progress| {
            if let Some(meter) = &meter {
                meter.pack_started();
            }
            let mut state = progress_state.borrow_mut();
            state.received_bytes = progress.received_bytes() as u64;
            if cancel.is_cancelled() {
                state.cancelled = true;
                return false;
            }
            if state.received_bytes > cap {
                state.over_cap = true;
                return false;
            }
            let done = progress.received_objects() == progress.total_objects();
            if done || last_emit.is_none_or(|t| t.elapsed() >= PROGRESS_EVERY) {
                last_emit = Some(Instant::now());
                events.emit(JobEvent::Progress {
                    stage: Stage::Fetch,
                    item: "objects".to_owned(),
                    done_bytes: state.received_bytes,
                    total_bytes: None,
                });
            }
            true
        });
        // Cancellation before the pack starts (negotiation) is noticed here too.
        let sideband_cancel = self.cx.cancel.clone();
        let sideband_state = Rc::clone(state);
        callbacks.sideband_progress(move |_| {
            if sideband_cancel.is_cancelled() {
                sideband_state.borrow_mut().cancelled = true;
                return false;
            }
            true
        });

        let mut options = FetchOptions::new();
        options
            .remote_callbacks(callbacks)
            .follow_redirects(RemoteRedirect::None)
            .download_tags(AutotagOption::None)
            .update_fetchhead(false);
        if let Some(depth) = depth {
            options.depth(depth);
        }
        if let Some(proxy) = proxy {
            let mut proxy_options = ProxyOptions::new();
            proxy_options.url(&proxy.url());
            options.proxy_options(proxy_options);
        }
        options
    }

    fn credentials(
        &self,
        state: &mut CallbackState,
        url: &str,
        username_from_url: Option<&str>,
        allowed: CredentialType,
    ) -> Result<Cred, git2::Error> {
        if self.cx.cancel.is_cancelled() {
            state.cancelled = true;
            return Err(git2::Error::from_str("cancelled"));
        }
        let asked_host = url_host(url);
        if !asked_host.eq_ignore_ascii_case(&self.repo.remote.host) {
            state.other_host = Some(asked_host);
            return Err(git2::Error::from_str(
                "credentials withheld from another host",
            ));
        }
        // Each kind once per connection: a second request means the first was refused.
        let kind = if allowed.contains(CredentialType::SSH_KEY) {
            CredentialType::SSH_KEY
        } else if allowed.contains(CredentialType::USER_PASS_PLAINTEXT) {
            CredentialType::USER_PASS_PLAINTEXT
        } else if allowed.contains(CredentialType::USERNAME) {
            CredentialType::USERNAME
        } else {
            state.no_credentials = true;
            return Err(git2::Error::from_str("no supported credential type"));
        };
        if state.asked.contains(&kind) {
            state.auth_refused = true;
            return Err(git2::Error::from_str("credentials refused"));
        }
        state.asked.push(kind);
        match (&self.repo.auth, kind) {
            (Some(GitAuth::Http { username, password }), CredentialType::USER_PASS_PLAINTEXT) => {
                Cred::userpass_plaintext(username, password.expose())
            }
            (Some(GitAuth::Ssh { username, .. }), CredentialType::USERNAME) => {
                Cred::username(username)
            }
            (
                Some(GitAuth::Ssh {
                    username,
                    private_key,
                    passphrase,
                }),
                CredentialType::SSH_KEY,
            ) => Cred::ssh_key_from_memory(
                username,
                None,
                private_key.expose(),
                passphrase.as_ref().map(|p| p.expose()),
            ),
            (None, CredentialType::USERNAME) => match username_from_url {
                Some(user) => Cred::username(user),
                None => {
                    state.no_credentials = true;
                    Err(git2::Error::from_str("no credentials"))
                }
            },
            _ => {
                state.no_credentials = true;
                Err(git2::Error::from_str("no matching credentials"))
            }
        }
    }

    /// Classifies a libgit2 failure: first by what the callbacks saw, then by libgit2's code,
    /// class and (last resort) message.
    fn fetch_error(&self, e: &git2::Error, state: &CallbackState) -> JobError {
        let host = &self.repo.remote.host;
        let permanent = |code, message: String| JobError::permanent(Stage::Fetch, code, message);
        if state.cancelled || self.cx.cancel.is_cancelled() {
            return JobError::cancelled(Stage::Fetch);
        }
        match &state.proxy_stop {
            Some(proxy::Stop::AdvertisementCap(cap)) => {
                return permanent(
                    ErrorCode::LimitExceeded,
                    format!(
                        "{host} sent more than {cap} bytes before its pack (refs advertised and \
                         negotiation; git.max_ref_advertisement_bytes)"
                    ),
                );
            }
            Some(proxy::Stop::TotalCap(_)) => {
                return permanent(
                    ErrorCode::LimitExceeded,
                    format!(
                        "the repository sent more than {} bytes (sources.max_fetch_bytes)",
                        self.max_fetch_bytes
                    ),
                );
            }
            Some(proxy::Stop::Refused { message, transient }) => {
                let message = format!("fetching from {host}: {message}");
                return if *transient {
                    JobError::transient(Stage::Fetch, ErrorCode::Unavailable, message)
                } else {
                    JobError::permanent(Stage::Fetch, ErrorCode::EgressRefused, message)
                };
            }
            None => {}
        }
        if state.over_cap {
            return permanent(
                ErrorCode::LimitExceeded,
                format!(
                    "the repository sent more than {} bytes (sources.max_fetch_bytes)",
                    self.max_fetch_bytes
                ),
            );
        }
        if let Some(message) = &state.host_key {
            return permanent(ErrorCode::AuthFailed, message.clone());
        }
        if let Some(other) = &state.other_host {
            return permanent(
                ErrorCode::AuthFailed,
                format!(
                    "{other} asked for credentials meant for {host}; they are only offered to \
                     the host the job names"
                ),
            );
        }
        if state.auth_refused {
            return permanent(
                ErrorCode::AuthFailed,
                format!("{host} refused the job's credentials"),
            );
        }
        if state.no_credentials {
            return permanent(
                ErrorCode::AuthFailed,
                format!("{host} requires credentials the job does not give"),
            );
        }
        let detail = self.scrub(e.message());
        let lower = detail.to_ascii_lowercase();
        // An allocation libgit2 could not make: in the source child that is its address-space
        // limit, and the same source hits it again.
        if e.class() == git2::ErrorClass::NoMemory {
            return permanent(
                ErrorCode::LimitExceeded,
                format!(
                    "fetching from {host} ran out of memory (sources.child_memory_mib): {detail}"
                ),
            );
        }
        // libssh2 could not use the job's key: the same key fails the same way every time.
        if lower.contains("passphrase")
            || lower.contains("unable to extract public key")
            || lower.contains("unable to initialize private key")
            || (e.class() == git2::ErrorClass::Ssh && lower.contains("private key"))
        {
            return permanent(
                ErrorCode::AuthFailed,
                format!(
                    "the job's SSH key could not be used for {host}: {detail} (check \
                     repo.auth.credentials.private_key and .passphrase)"
                ),
            );
        }
        let (code, transient) = match e.code() {
            git2::ErrorCode::Auth => (ErrorCode::AuthFailed, false),
            git2::ErrorCode::Certificate => (ErrorCode::AuthFailed, false),
            git2::ErrorCode::NotFound => (ErrorCode::NotFound, false),
            _ if lower.contains("401") || lower.contains("403") => (ErrorCode::AuthFailed, false),
            _ if lower.contains("404")
                || lower.contains("not found")
                || lower.contains("does not appear to be a git repository")
                || lower.contains("no such file or directory") =>
            {
                (ErrorCode::NotFound, false)
            }
            _ if lower.contains("timed out") || lower.contains("timeout") => {
                (ErrorCode::Timeout, true)
            }
            _ if lower.contains("status code: 5")
                || lower.contains("connection refused")
                || lower.contains("connection reset")
                || lower.contains("broken pipe")
                || lower.contains("failed to connect")
                || lower.contains("unable to exchange encryption keys")
                || lower.contains("failed to start ssh session")
                || lower.contains("early eof")
                || lower.contains("unexpected eof") =>
            {
                (ErrorCode::Unavailable, true)
            }
            _ if lower.contains("authentication") || lower.contains("publickey") => {
                (ErrorCode::AuthFailed, false)
            }
            _ => (ErrorCode::Internal, true),
        };
        let message = format!("fetching from {host} failed: {detail}");
        if transient {
            JobError::transient(Stage::Fetch, code, message)
        } else {
            JobError::permanent(Stage::Fetch, code, message)
        }
    }

    /// Creates the empty bare repository this task fetches into, at `repo_path`.
    fn init_repo(&self) -> Result<Repository, JobError> {
        Repository::init_opts(
            &self.repo_path,
            RepositoryInitOptions::new()
                .bare(true)
                .mkdir(true)
                .external_template(false),
        )
        .map_err(|e| self.local_error(e))
    }

    fn local_error(&self, e: git2::Error) -> JobError {
        JobError::transient(
            Stage::Fetch,
            ErrorCode::LocalIo,
            format!(
                "preparing the repository in the workspace failed: {}",
                self.scrub(e.message())
            ),
        )
    }

    /// Removes URL userinfo and the job's secrets from libgit2's text.
    fn scrub(&self, text: &str) -> String {
        let text = text.replace(&self.repo.url, &display_url(&self.repo.url));
        self.cx.redactor.redact(&strip_userinfo(&text))
    }
}

struct Advertised {
    heads: BTreeMap<String, Oid>,
    /// `refs/heads/<name>` that HEAD points to, when the server says.
    default: Option<String>,
}

impl Advertised {
    fn default_branch(&self) -> Option<String> {
        if let Some(name) = self
            .default
            .as_deref()
            .and_then(|r| r.strip_prefix("refs/heads/"))
        {
            return Some(name.to_owned());
        }
        // An old server that does not name HEAD's target: the branch whose tip is HEAD's.
        let head = self.heads.get("HEAD")?;
        self.heads
            .iter()
            .find(|(name, oid)| name.starts_with("refs/heads/") && *oid == head)
            .and_then(|(name, _)| name.strip_prefix("refs/heads/").map(str::to_owned))
    }
}

/// Whether `wanted` is `tip` or one of its ancestors among the commits fetched so far.
fn reachable(repo: &Repository, tip: Oid, wanted: Oid) -> bool {
    if repo.find_commit(wanted).is_err() {
        return false;
    }
    repo.graph_descendant_of(tip, wanted).unwrap_or(false)
}

/// The host of a URL libgit2 passes to a callback (scheme URL or scp-like).
fn url_host(url: &str) -> String {
    if let Ok(parsed) = url::Url::parse(url) {
        if let Some(host) = parsed.host_str() {
            return host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned();
        }
    }
    let before_colon = url.split(':').next().unwrap_or_default();
    before_colon
        .rsplit_once('@')
        .map_or(before_colon, |(_, h)| h)
        .to_owned()
}

/// A repository URL fit for messages: no userinfo.
pub fn display_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) if parsed.has_host() => {
            let _ = parsed.set_username("");
            let _ = parsed.set_password(None);
            parsed.to_string()
        }
        _ => url
            .split_once('@')
            .map_or_else(|| url.to_owned(), |(_, rest)| rest.to_owned()),
    }
}

/// Removes `user[:password]@` from anything that looks like a URL in `text`.
fn strip_userinfo(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        out.push_str(&rest[..i + 3]);
        rest = &rest[i + 3..];
        let end = rest
            .find(|c: char| c.is_whitespace() || c == '/' || c == '\'' || c == '"')
            .unwrap_or(rest.len());
        if let Some(at) = rest[..end].rfind('@') {
            rest = &rest[at + 1..];
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn userinfo_is_stripped_from_messages() {
        assert_eq!(
            strip_userinfo("failed for https://bob:hunter2@git.example.com/x.git now"),
            "failed for https://git.example.com/x.git now"
        );
        assert_eq!(
            strip_userinfo("ssh://git@host:2222/repo"),
            "ssh://host:2222/repo"
        );
        assert_eq!(
            display_url("git@github.com:org/repo.git"),
            "github.com:org/repo.git"
        );
        assert_eq!(
            display_url("ssh://git@host:2222/repo"),
            "ssh://host:2222/repo"
        );
    }

    #[test]
    fn the_host_asking_for_credentials_is_read_from_either_url_form() {
        assert_eq!(url_host("https://git.example.com/a.git"), "git.example.com");
        assert_eq!(url_host("ssh://git@[::1]:22/a"), "::1");
        assert_eq!(url_host("git@host.example:org/a.git"), "host.example");
    }

    #[test]
    fn the_default_branch_falls_back_to_heads_tip() {
        let oid = Oid::from_str("1111111111111111111111111111111111111111").unwrap();
        let other = Oid::from_str("2222222222222222222222222222222222222222").unwrap();
        let advertised = Advertised {
            heads: BTreeMap::from([
                ("HEAD".to_owned(), oid),
                ("refs/heads/dev".to_owned(), other),
                ("refs/heads/trunk".to_owned(), oid),
            ]),
            default: None,
        };
        assert_eq!(advertised.default_branch().as_deref(), Some("trunk"));
    }
}
