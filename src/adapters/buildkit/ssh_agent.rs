//! The SSH agent of a build with `build.ssh`: OpenSSH's `ssh-agent`, started for the build
//! with its socket in a directory of the job's workspace, holding the job's git key, which
//! `ssh-add` reads from a pipe (the passphrase, if any, from another): the key is written to
//! no file. BuildKit reaches the agent only through the session's SSH forwarding
//! ([`super::session`]); `RUN --mount=type=ssh` sees an agent socket, never the key. The agent
//! is killed when the build ends (drop).
//!
//! Needs `ssh-agent` and `ssh-add` (Debian's `openssh-client`) on the node.

use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use crate::error::{ErrorCode, JobError, Stage};
use crate::job::SshKey;
use crate::workspace::random_hex;

/// The agent's socket, relative to its directory (a workspace path can be longer than a
/// socket address may be: the agent binds it from inside the directory, and we connect
/// through `/proc/self/fd`).
const SOCKET: &str = "agent.sock";
/// How long the agent may take to listen, and `ssh-add` to load the key.
const START_WITHIN: Duration = Duration::from_secs(10);

/// A running agent holding one key.
#[derive(Debug)]
pub(in crate::adapters::buildkit) struct Agent {
    /// Killed on drop.
    _agent: tokio::process::Child,
    /// The directory of the socket, open.
    dir: std::fs::File,
}

impl Agent {
    /// Starts an agent in a new directory of `workspace` and adds `key` to it.
    pub(in crate::adapters::buildkit) async fn start(
        key: &SshKey,
        workspace: &Path,
    ) -> Result<Agent, JobError> {
        let dir_path = workspace.join(format!("ssh-agent-{}", random_hex(6)));
        let local = |what: &str, e: std::io::Error| {
            JobError::transient(
                Stage::Build,
                ErrorCode::Internal,
                format!("build.ssh: {what}: {e}"),
            )
        };
        {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(&dir_path)
                .map_err(|e| local("cannot make the agent's directory", e))?;
        }
        let dir = std::fs::File::open(&dir_path)
            .map_err(|e| local("cannot open the agent's directory", e))?;
        let mut agent = tokio::process::Command::new("ssh-agent")
            .args(["-D", "-a", SOCKET])
            .current_dir(&dir_path)
            .env_clear()
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(missing_tool)?;
        // It prints `SSH_AUTH_SOCK=...` once it listens.
        let stdout = agent.stdout.take().expect("piped stdout");
        let mut line = String::new();
        let listening =
            tokio::time::timeout(START_WITHIN, BufReader::new(stdout).read_line(&mut line)).await;
        if !matches!(listening, Ok(Ok(n)) if n > 0) {
            return Err(JobError::transient(
                Stage::Build,
                ErrorCode::Internal,
                "build.ssh: ssh-agent did not start",
            ));
        }
        add_key(key, &dir_path).await?;
        Ok(Agent { _agent: agent, dir })
    }

    /// A new connection to the agent.
    pub(in crate::adapters::buildkit) async fn connect(&self) -> std::io::Result<UnixStream> {
        UnixStream::connect(format!("/proc/self/fd/{}/{SOCKET}", self.dir.as_raw_fd())).await
    }
}

fn missing_tool(e: std::io::Error) -> JobError {
    if e.kind() == std::io::ErrorKind::NotFound {
        JobError::permanent(
            Stage::Build,
            ErrorCode::Unsupported,
            "build.ssh needs ssh-agent and ssh-add (Debian's openssh-client) on this node",
        )
    } else {
        JobError::transient(
            Stage::Build,
            ErrorCode::Internal,
            format!("build.ssh: cannot start ssh-agent or ssh-add: {e}"),
        )
    }
}

/// `ssh-add /dev/fd/3` with the key on fd 3 and the passphrase on stdin, in a session of its
/// own (no terminal to ask on).
async fn add_key(key: &SshKey, dir: &Path) -> Result<(), JobError> {
    let local = |what: &str, e: std::io::Error| {
        JobError::transient(
            Stage::Build,
            ErrorCode::Internal,
            format!("build.ssh: {what}: {e}"),
        )
    };
    let (key_out, mut key_in) = std::io::pipe().map_err(|e| local("cannot open a pipe", e))?;
    let key_fd: OwnedFd = key_out.into();
    let raw_key_fd = key_fd.as_raw_fd();
    let mut command = tokio::process::Command::new("ssh-add");
    command
        .arg("/dev/fd/3")
        .current_dir(dir)
        .env_clear()
        .env("SSH_AUTH_SOCK", SOCKET)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    #[allow(unsafe_code)]
    // SAFETY: between fork and exec, only async-signal-safe calls: setsid, dup2.
    unsafe {
        command.pre_exec(move || {
            libc::setsid();
            if libc::dup2(raw_key_fd, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut add = command.spawn().map_err(missing_tool)?;
    drop(key_fd);
    // A key is a few KiB: it fits the pipe, so this write does not wait for ssh-add.
    let written = key_in.write_all(key.private_key.expose().as_bytes());
    drop(key_in);
    written.map_err(|e| local("cannot hand the key to ssh-add", e))?;
    let mut stdin = add.stdin.take().expect("piped stdin");
    if let Some(passphrase) = &key.passphrase {
        let _ = stdin
            .write_all(format!("{}\n", passphrase.expose()).as_bytes())
            .await;
    }
    drop(stdin);
    let mut stderr = add.stderr.take().expect("piped stderr");
    let finished = tokio::time::timeout(START_WITHIN, async {
        let mut said = String::new();
        let _ = (&mut stderr).take(4096).read_to_string(&mut said).await;
        (add.wait().await, said)
    })
    .await;
    match finished {
        Ok((Ok(status), _)) if status.success() => Ok(()),
        Ok((_, said)) if said.contains("passphrase") => Err(JobError::permanent(
            Stage::Build,
            ErrorCode::AuthFailed,
            "build.ssh: the job's SSH key passphrase does not open its key",
        )),
        Ok((_, said)) => Err(JobError::permanent(
            Stage::Build,
            ErrorCode::AuthFailed,
            format!(
                "build.ssh: ssh-add refused the job's SSH key: {}",
                said.lines().last().unwrap_or("").trim()
            ),
        )),
        Err(_) => Err(JobError::transient(
            Stage::Build,
            ErrorCode::Internal,
            "build.ssh: ssh-add did not finish",
        )),
    }
}
