//! The command line: `factoryd validate | version`.
//!
//! Subcommands arrive with the issues that give them meaning (`serve`, `run`, `submit`); none
//! is declared before it works.

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
    /// Check a config file and/or job files without starting anything. Exits 0 when all are
    /// valid, 64 when any is invalid (every problem is listed), 66 when a file cannot be read.
    Validate(ValidateArgs),
    /// Print the version and the job wire format version.
    Version,
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
