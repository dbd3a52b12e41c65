//! Composition root: turns a parsed command into work. For now it runs the checks of
//! `factoryd validate`; the worker's start-up and shutdown arrive with `serve`.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use crate::cli::ValidateArgs;
use crate::config;
use crate::job;

/// `EX_DATAERR`-style exit for invalid input, as the contract fixes it (64).
pub const EXIT_INVALID: u8 = 64;
/// `EX_NOINPUT`: a named file cannot be read.
pub const EXIT_NO_INPUT: u8 = 66;

pub fn version_line() -> String {
    format!(
        "factoryd {} (job wire format v{})",
        env!("CARGO_PKG_VERSION"),
        job::WIRE_VERSION
    )
}

/// Checks the config and each job; prints every problem to stderr, and each valid job,
/// normalised with its secrets redacted, to stdout.
pub fn validate(args: &ValidateArgs, env: &HashMap<String, String>) -> ExitCode {
    let mut worst = 0u8;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();

    if args.config.is_some() || args.job.is_empty() {
        match config::load(args.config.as_deref(), env) {
            Ok(_) => {
                let shown = args
                    .config
                    .as_deref()
                    .unwrap_or(Path::new(config::DEFAULT_CONFIG_PATH));
                eprintln!("config {}: valid", shown.display());
            }
            Err(config::ConfigError::Invalid(problems)) => {
                eprintln!("config: {} problem(s):", problems.len());
                for p in problems.iter() {
                    eprintln!("  {p}");
                }
                worst = worst.max(EXIT_INVALID);
            }
            Err(e) => {
                eprintln!("config: {e}");
                worst = worst.max(EXIT_NO_INPUT);
            }
        }
    }

    for path in &args.job {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) => {
                eprintln!("{}: cannot read: {e}", path.display());
                worst = worst.max(EXIT_NO_INPUT);
                continue;
            }
        };
        match job::decode(&bytes) {
            Ok(job) => {
                let text = serde_json::to_string_pretty(&job)
                    .unwrap_or_else(|e| format!("(cannot print job: {e})"));
                let _ = writeln!(out, "{text}");
                eprintln!("{}: valid {} job {}", path.display(), job.kind(), job.id);
            }
            Err(problems) => {
                eprintln!("{}: {} problem(s):", path.display(), problems.len());
                for p in problems.iter() {
                    eprintln!("  {p}");
                }
                worst = worst.max(EXIT_INVALID);
            }
        }
    }
    ExitCode::from(worst)
}
