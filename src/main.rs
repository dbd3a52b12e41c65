//! `factoryd`: thin entry point. CLI → the command (which loads config and sets up logging)
//! → exit code.

use std::process::ExitCode;

use clap::Parser;

use factoryd::app;
use factoryd::cli::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The process environment is read here, once, and injected everywhere else.
    let env: std::collections::HashMap<String, String> = std::env::vars().collect();
    match cli.command {
        Command::Serve(args) => app::serve(&args, &env),
        Command::Run(args) => app::run(&args, &env),
        Command::Submit(args) => app::submit(&args, &env),
        Command::Validate(args) => app::validate(&args, &env),
        Command::Store(args) => app::store(&args, &env),
        Command::SourceWorker(args) => match (args.probe_workspace, args.probe_outside) {
            (Some(workspace), Some(outside)) => factoryd::sandbox::probe_main(&workspace, &outside),
            _ => factoryd::sandbox::source_worker_main(),
        },
        Command::Version => {
            println!("{}", app::version_line());
            ExitCode::SUCCESS
        }
    }
}
