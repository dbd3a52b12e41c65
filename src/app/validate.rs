//! `factoryd validate`: checks a config and jobs without running anything.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use super::{print_problems, EXIT_INVALID, EXIT_NO_INPUT};
use crate::cli::ValidateArgs;
use crate::config::{self, ConfigError};
use crate::job;

/// Checks the config and each job; prints every problem to stderr, and each valid job,
/// normalised with its secrets redacted, to stdout.
pub fn validate(args: &ValidateArgs, env: &HashMap<String, String>) -> ExitCode {
    let mut worst = 0u8;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();

    let mut loaded = None;
    if args.config.is_some() || args.job.is_empty() {
        match config::load(args.config.as_deref(), env) {
            Ok(c) => {
                // With --config, each job is also checked against this node's destination.
                loaded = args
                    .config
                    .is_some()
                    .then(|| crate::pipeline::DestinationSettings::new(c.destination.clone()));
                let shown = args
                    .config
                    .as_deref()
                    .unwrap_or(Path::new(config::DEFAULT_CONFIG_PATH));
                eprintln!("config {}: valid", shown.display());
            }
            Err(ConfigError::Invalid(problems)) => {
                print_problems("config", &problems);
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
                if let Some(refused) = loaded.as_ref().and_then(|d| d.check_override(&job).err()) {
                    eprintln!("{}: 1 problem(s):", path.display());
                    eprintln!("  {}", refused.message);
                    worst = worst.max(EXIT_INVALID);
                    continue;
                }
                let text = serde_json::to_string_pretty(&job)
                    .unwrap_or_else(|e| format!("(cannot print job: {e})"));
                let _ = writeln!(out, "{text}");
                eprintln!("{}: valid {} job {}", path.display(), job.kind(), job.id);
            }
            Err(problems) => {
                print_problems(&path.display().to_string(), &problems);
                worst = worst.max(EXIT_INVALID);
            }
        }
    }
    ExitCode::from(worst)
}
