//! `factoryd`: thin entry point. CLI → telemetry → the command → exit code.

use std::process::ExitCode;

use clap::Parser;

use factoryd::cli::{Cli, Command};
use factoryd::{app, telemetry};

fn main() -> ExitCode {
    let cli = Cli::parse();
    telemetry::init(telemetry::LogStyle::Auto, "warn");
    // The process environment is read here, once, and injected everywhere else.
    let env: std::collections::HashMap<String, String> = std::env::vars().collect();
    match cli.command {
        Command::Validate(args) => app::validate(&args, &env),
        Command::Version => {
            println!("{}", app::version_line());
            ExitCode::SUCCESS
        }
    }
}
