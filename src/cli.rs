//! The command line: `factoryd serve | run | submit | validate | version`.
//!
//! Subcommands arrive with the issues that give them meaning (`run` arrives with builds and
//! imports); none is declared before it works.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "factoryd",
    version,
    about = "Build-and-import worker daemon for container images"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the worker: pull jobs from NATS JetStream until SIGTERM/SIGINT, then drain.
    Serve(ServeArgs),
    /// Run one job here, without NATS: progress on stderr, the result JSON on stdout. Exits 0
    /// when the job succeeded, 1 failed, 2 cancelled (Ctrl-C cancels), 64 invalid job or
    /// config, 66 unreadable file.
    Run(RunArgs),
    /// Publish a job (or a cancel request) and optionally follow it to its result. Exits 0 when
    /// the job succeeded (or without --wait/--follow, once published), 1 failed, 2 cancelled,
    /// 64 invalid job, 69 NATS unreachable, 75 no result within --wait-timeout-secs.
    Submit(SubmitArgs),
    /// Check a config file and/or job files without starting anything. Exits 0 when all are
    /// valid, 64 when any is invalid (every problem is listed), 66 when a file cannot be read.
    Validate(ValidateArgs),
    /// Look after the oci-layout store of a config (`destination.path`): list its images,
    /// remove some, or apply the `[store]` retention policy and collect what nothing reaches.
    /// Safe while `serve` runs on the same store. Exits 0, 1 when an image named to `rm` is not
    /// there, 64 invalid config, 66 store unreadable.
    Store(StoreArgs),
    /// Print the version and the job wire format version.
    Version,
    /// Internal: fetch and seal one docker-file source in a confined process (started by the
    /// worker, request on stdin).
    #[command(name = "source-worker", hide = true)]
    SourceWorker(SourceWorkerArgs),
}

#[derive(Debug, Args)]
pub struct SourceWorkerArgs {
    /// Instead of serving a request: confine this process as for a job whose workspace is
    /// DIR, try what the confinement must stop, print a JSON report, and exit.
    #[arg(long, value_name = "DIR", requires = "probe_outside")]
    pub probe_workspace: Option<PathBuf>,
    /// With --probe-workspace: a file outside DIR the probe tries to create.
    #[arg(long, value_name = "FILE")]
    pub probe_outside: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Config file (default /etc/factoryd/factoryd.toml when it exists).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The job file (JSON, wire format v1).
    #[arg(value_name = "JOB.json")]
    pub job: PathBuf,
    /// Config file (default /etc/factoryd/factoryd.toml when it exists).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Build a docker-file job from this local directory instead of fetching its source; the
    /// job's `context_dir` and `build_file` are taken inside it.
    #[arg(long, value_name = "DIR")]
    pub context: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct SubmitArgs {
    /// The job file (JSON, wire format v1).
    #[arg(value_name = "JOB.json", required_unless_present = "cancel")]
    pub job: Option<PathBuf>,
    /// Config file: its [nats] section says where to publish.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Wait for the result and print it as JSON on stdout.
    #[arg(long)]
    pub wait: bool,
    /// Like --wait, and show the job's progress events on stderr as they come.
    #[arg(long)]
    pub follow: bool,
    /// How long --wait/--follow wait for the result.
    #[arg(long, value_name = "SECS", default_value_t = 7200)]
    pub wait_timeout_secs: u64,
    /// Request the cancellation of a job instead of publishing one.
    #[arg(long, value_name = "JOB_ID", conflicts_with_all = ["job", "wait", "follow"])]
    pub cancel: Option<String>,
}

#[derive(Debug, Args)]
pub struct StoreArgs {
    /// Config file (default /etc/factoryd/factoryd.toml when it exists).
    #[arg(long, value_name = "FILE", global = true)]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: StoreCommand,
}

#[derive(Debug, Subcommand)]
pub enum StoreCommand {
    /// List the images: reference, source, digest, size, when stored.
    Ls {
        /// One JSON object per line per image (reference, source_id, digest, size_bytes,
        /// stored_at).
        #[arg(long)]
        json: bool,
    },
    /// Remove images by reference (`repository:tag`), then collect what only they reached.
    Rm {
        #[arg(value_name = "REF", required = true)]
        references: Vec<String>,
    },
    /// Apply the retention policy, then collect: print what went (or, with --dry-run, what
    /// would go) and the bytes freed.
    Gc {
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Debug, Args)]
pub struct ValidateArgs {
    /// Config file to check (layered over the built-in defaults and FACTORYD__* variables).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Job file to check; a valid job is printed normalised, with secrets as <redacted>.
    #[arg(long, value_name = "FILE")]
    pub job: Vec<PathBuf>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn validate_takes_several_jobs_and_a_config() {
        let cli = Cli::try_parse_from([
            "factoryd", "validate", "--config", "c.toml", "--job", "a.json", "--job", "b.json",
        ])
        .unwrap();
        let Command::Validate(args) = cli.command else {
            panic!("expected validate");
        };
        assert_eq!(args.job.len(), 2);
        assert_eq!(args.config, Some(PathBuf::from("c.toml")));
    }
}
