//! Submodules (`repo.submodules: true`): the URL of a gitlink from the superproject's
//! `.gitmodules`, checked like the job's own URL, and its pinned commit fetched into a bare
//! repository of its own in the workspace.

use std::path::{Path, PathBuf};

use git2::{Config, ObjectType, Oid, Repository};

use super::known_hosts::KnownHosts;
use super::{display_url, known_hosts_unreadable, FetchTask, DEEPEN_STEPS};
use crate::error::{ErrorCode, JobError, Stage};
use crate::job::{parse_git_url, GitRepo, GitTransport};
use crate::problems::Problems;

const GITMODULES: &str = ".gitmodules";

/// Where submodule repositories go inside the workspace.
const SUBMODULES_DIR: &str = "submodules";

/// Largest `.gitmodules` read; a bigger one is refused before it is loaded.
const MAX_GITMODULES_BYTES: usize = 1 << 20;

/// The `.gitmodules` blob at the root of `commit`, if there is one. The outer error is a
/// failure to read our own repository; the inner one a `.gitmodules` over its cap.
pub(super) fn read_gitmodules(
    repo: &Repository,
    commit: Oid,
) -> Result<Result<Option<Vec<u8>>, JobError>, git2::Error> {
    let tree = repo.find_commit(commit)?.tree()?;
    let Some(entry) = tree.get_name(GITMODULES) else {
        return Ok(Ok(None));
    };
    if entry.kind() != Some(ObjectType::Blob) {
        return Ok(Ok(None));
    }
    let (size, _) = repo.odb()?.read_header(entry.id())?;
    if size > MAX_GITMODULES_BYTES {
        return Ok(Err(JobError::permanent(
            Stage::Fetch,
            ErrorCode::LimitExceeded,
            format!("{GITMODULES} is larger than {MAX_GITMODULES_BYTES} bytes"),
        )));
    }
    Ok(Ok(Some(repo.find_blob(entry.id())?.content().to_vec())))
}

/// The URL `.gitmodules` (written to `scratch` to be read as git configuration) gives for the
/// submodule whose `path` is `path`.
fn lookup_url(text: &[u8], scratch: &Path, path: &str) -> Result<Option<String>, git2::Error> {
    std::fs::write(scratch, text).map_err(|e| git2::Error::from_str(&e.to_string()))?;
    let config = Config::open(scratch)?;
    let mut name = None;
    config
        .entries(Some(r"^submodule\..*\.path$"))?
        .for_each(|entry| {
            if name.is_none() && entry.value().ok() == Some(path) {
                name = entry.name().ok().and_then(|n| {
                    n.strip_prefix("submodule.")
                        .and_then(|n| n.strip_suffix(".path"))
                        .map(str::to_owned)
                });
            }
        })?;
    let Some(name) = name else {
        return Ok(None);
    };
    match config.get_string(&format!("submodule.{name}.url")) {
        Ok(url) => Ok(Some(url)),
        Err(e) if e.code() == git2::ErrorCode::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Resolves a relative submodule URL (`./x`, `../x`) against the superproject's URL, as git
/// does: each `../` drops one path component of the superproject URL.
pub(super) fn resolve_url(base: &str, url: &str) -> String {
    if !(url.starts_with("./") || url.starts_with("../")) {
        return url.to_owned();
    }
    let mut base = base.trim_end_matches('/').to_owned();
    // Where the path starts: after the host of a scheme URL, after the ':' of an scp-like one.
    let path_start = match base.find("://") {
        Some(i) => base[i + 3..].find('/').map_or(base.len(), |j| i + 3 + j),
        None => base.find(':').map_or(0, |i| i + 1),
    };
    let mut rest = url;
    loop {
        if let Some(r) = rest.strip_prefix("./") {
            rest = r;
        } else if let Some(r) = rest.strip_prefix("../") {
            rest = r;
            let cut = base[path_start..]
                .rfind('/')
                .map_or(path_start, |i| path_start + i);
            base.truncate(cut);
        } else {
            break;
        }
    }
    if base.ends_with(':') {
        format!("{base}{rest}")
    } else {
        format!("{base}/{rest}")
    }
}

impl FetchTask {
    /// Fetches the submodule at `path` (from the superproject's root) pinned at `commit`.
    /// Returns its bare repository and the bytes received.
    pub(super) fn fetch_submodule(
        &self,
        gitmodules: Option<&[u8]>,
        path: &str,
        commit: Oid,
        index: usize,
    ) -> Result<(PathBuf, u64), JobError> {
        if self.cx.cancel.is_cancelled() {
            return Err(JobError::cancelled(Stage::Fetch));
        }
        let permanent = |code, message: String| {
            JobError::permanent(Stage::Fetch, code, format!("submodule {path:?}: {message}"))
        };
        let Some(text) = gitmodules else {
            return Err(permanent(
                ErrorCode::NotFound,
                format!("the commit has no {GITMODULES}, so the submodule's URL is unknown"),
            ));
        };
        let submodules_dir = self.cx.workspace.join(SUBMODULES_DIR);
        std::fs::create_dir_all(&submodules_dir).map_err(|e| {
            JobError::transient(
                Stage::Fetch,
                ErrorCode::LocalIo,
                format!("creating the submodule directory in the workspace failed: {e}"),
            )
        })?;
        let raw = lookup_url(text, &submodules_dir.join("gitmodules"), path)
            .map_err(|e| {
                permanent(
                    ErrorCode::InvalidJob,
                    format!("{GITMODULES} cannot be read: {}", self.scrub(e.message())),
                )
            })?
            .ok_or_else(|| {
                permanent(
                    ErrorCode::NotFound,
                    format!("{GITMODULES} has no entry (path and url) for it"),
                )
            })?;
        let url = resolve_url(&self.repo.url, &raw);
        let mut problems = Problems::new();
        let Some(remote) = parse_git_url("url", &url, &mut problems) else {
            let why: Vec<String> = problems.iter().map(|p| p.message.clone()).collect();
            return Err(permanent(
                ErrorCode::Unsupported,
                format!(
                    "its URL {} is refused: {}",
                    display_url(&url),
                    why.join("; ")
                ),
            ));
        };
        let port = remote.port.unwrap_or(match remote.transport {
            GitTransport::Https => 443,
            GitTransport::Http => 80,
            GitTransport::Ssh => 22,
        });
        // The job's credentials only for the job's own host and port.
        let same_host =
            remote.host.eq_ignore_ascii_case(&self.repo.remote.host) && port == self.port;
        let sub = GitRepo {
            url: url.clone(),
            remote: remote.clone(),
            branch: None,
            auth: if same_host {
                self.repo.auth.clone()
            } else {
                None
            },
            git_ref: None,
            submodules: false,
        };
        if remote.transport == GitTransport::Http && !self.fetcher.is_insecure_host(&sub) {
            return Err(permanent(
                ErrorCode::Unsupported,
                format!(
                    "plain http:// is refused for {}: use https:// or ssh://, or list the host \
                     in git.insecure_hosts",
                    remote.host
                ),
            ));
        }
        tokio::runtime::Handle::current()
            .block_on(self.fetcher.policy.resolve(&remote.host, port))
            .map_err(|e| with_path(e.into_job_error(Stage::Fetch), path))?;
        let config = &self.fetcher.config;
        let known_hosts = if remote.transport == GitTransport::Ssh && config.host_key_checking {
            let text = std::fs::read_to_string(&config.known_hosts_file)
                .map_err(|e| known_hosts_unreadable(&config.known_hosts_file, e))?;
            Some(KnownHosts::parse(&text))
        } else {
            None
        };
        let task = FetchTask {
            repo: sub,
            port,
            known_hosts,
            unaligned: self.unaligned,
            max_fetch_bytes: self.max_fetch_bytes,
            limits: self.limits,
            repo_path: submodules_dir.join(format!("{index}.git")),
            context_dir: String::new(),
            build_file: String::new(),
            cx: self.cx.clone(),
            fetcher: self.fetcher.clone(),
        };
        let bytes = task.fetch_pinned(commit).map_err(|mut e| {
            if e.code == ErrorCode::AuthFailed && !same_host {
                e.message.push_str(
                    " (the job's credentials are only offered to the host and port of the job's \
                     URL; this submodule was fetched anonymously)",
                );
            }
            with_path(e, path)
        })?;
        Ok((task.repo_path, bytes))
    }

    /// Fetches `commit` into this task's new bare repository: by hash first; when the server
    /// refuses a hash it does not advertise, its branches and tags, deeper and deeper, until
    /// the commit is there. Returns the bytes received.
    fn fetch_pinned(&self, commit: Oid) -> Result<u64, JobError> {
        let repo = self.init_repo()?;
        let mut bytes = 0;
        let by_hash = format!("+{commit}:refs/factoryd/submodule");
        match self.fetch(&repo, &[&by_hash], 1) {
            Ok(received) => {
                bytes += received;
                if repo.find_commit(commit).is_ok() {
                    return Ok(bytes);
                }
            }
            Err(e)
                if matches!(
                    e.code,
                    ErrorCode::AuthFailed
                        | ErrorCode::Cancelled
                        | ErrorCode::Shutdown
                        | ErrorCode::LimitExceeded
                        | ErrorCode::Timeout
                        | ErrorCode::Unavailable
                ) =>
            {
                return Err(e);
            }
            // The server would not send an unadvertised hash (or does not have it).
            // libgit2 refuses when the server does not announce allow-reachable-sha1-in-want
            // ("cannot fetch a specific object"), or the server did not send it.
            Err(_) => {}
        }
        for depth in DEEPEN_STEPS {
            bytes += self.fetch(
                &repo,
                &[
                    "+refs/heads/*:refs/factoryd/heads/*",
                    "+refs/tags/*:refs/factoryd/tags/*",
                ],
                depth,
            )?;
            if repo.find_commit(commit).is_ok() {
                return Ok(bytes);
            }
        }
        Err(JobError::permanent(
            Stage::Fetch,
            ErrorCode::NotFound,
            format!("commit {commit} not found in the submodule's repository"),
        ))
    }
}

/// Names the submodule in an error (a cancellation stays as it is).
fn with_path(mut e: JobError, path: &str) -> JobError {
    if !matches!(e.code, ErrorCode::Cancelled | ErrorCode::Shutdown) {
        e.message = format!("submodule {path:?}: {}", e.message);
    }
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_submodule_urls_resolve_against_the_superproject() {
        let base = "https://git.example.com/org/app.git";
        assert_eq!(
            resolve_url(base, "../lib.git"),
            "https://git.example.com/org/lib.git"
        );
        assert_eq!(
            resolve_url(base, "../../other/lib.git"),
            "https://git.example.com/other/lib.git"
        );
        assert_eq!(
            resolve_url(base, "./sub.git"),
            "https://git.example.com/org/app.git/sub.git"
        );
        assert_eq!(
            resolve_url("http://127.0.0.1:8080/app.git/", "../lib.git"),
            "http://127.0.0.1:8080/lib.git"
        );
        assert_eq!(
            resolve_url("git@host.example:org/app.git", "../lib.git"),
            "git@host.example:org/lib.git"
        );
        assert_eq!(
            resolve_url(base, "https://elsewhere.example/x.git"),
            "https://elsewhere.example/x.git"
        );
    }

    #[test]
    fn the_url_is_found_by_the_submodule_path() {
        let dir = tempfile::tempdir().unwrap();
        let text = b"[submodule \"a\"]\n\tpath = vendor/a\n\turl = ../a.git\n\
                     [submodule \"lib.b\"]\n\tpath = app/lib\n\turl = https://h.example/b.git\n";
        let scratch = dir.path().join("gm");
        assert_eq!(
            lookup_url(text, &scratch, "app/lib").unwrap().as_deref(),
            Some("https://h.example/b.git")
        );
        assert_eq!(
            lookup_url(text, &scratch, "vendor/a").unwrap().as_deref(),
            Some("../a.git")
        );
        assert_eq!(lookup_url(text, &scratch, "missing").unwrap(), None);
    }
}
