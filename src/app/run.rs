//! `factoryd run`: one job on the production stages, no NATS, through the same
//! [`AttemptRunner`] as the worker (workspace, timeout, abort bound, panic isolation, the
//! result). Events go to stderr as the worker would publish them (masked); the result goes to
//! stdout; Ctrl-C cancels the job.

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::{
    exit_code, init_logs, load_config, print_problems, production_stages, runtime, show_event,
    EXIT_INVALID, EXIT_NO_INPUT,
};
use crate::adapters::local::LocalFetcher;
use crate::cli::RunArgs;
use crate::clock::Clock;
use crate::config::Config;
use crate::job::{self, EventEnvelope, JobEvent};
use crate::pipeline::attempt::{Attempt, AttemptRunner, StopReason};
use crate::worker::WorkerSettings;

/// `factoryd run`.
pub fn run(args: &RunArgs, env: &HashMap<String, String>) -> ExitCode {
    let config = match load_config(args.config.as_deref(), env) {
        Ok(c) => c,
        Err(code) => return code,
    };
    init_logs(&config, env);
    let bytes = match std::fs::read(&args.job) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("{}: cannot read: {e}", args.job.display());
            return ExitCode::from(EXIT_NO_INPUT);
        }
    };
    let job = match job::decode(&bytes) {
        Ok(job) => job,
        Err(problems) => {
            print_problems(&args.job.display().to_string(), &problems);
            return ExitCode::from(EXIT_INVALID);
        }
    };
    if args.context.is_some() && !matches!(job.origin, job::Origin::DockerFile(_)) {
        eprintln!(
            "--context builds docker-file jobs only; job {} is an import",
            job.id
        );
        return ExitCode::from(EXIT_INVALID);
    }
    runtime().block_on(run_one(job, config, args.context.clone()))
}

async fn run_one(job: job::Job, config: Config, context: Option<std::path::PathBuf>) -> ExitCode {
    let mut stages = match production_stages(&config) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("run: {e}");
            return ExitCode::from(EXIT_INVALID);
        }
    };
    if let Some(dir) = context {
        stages.fetcher = Arc::new(LocalFetcher::new(
            dir,
            crate::context::Limits::from_config(&config.sources),
        ));
    }
    let clock = crate::clock::system();
    let runner = AttemptRunner::new(
        stages,
        WorkerSettings::from_config(&config).runner(),
        Arc::clone(&clock),
    );
    let sink = Arc::new(StderrEvents {
        job_id: job.id.clone(),
        seq: AtomicU64::new(0),
        live: std::io::stderr().is_terminal(),
        clock,
    });
    let attempt = Attempt::new(job, 1, sink);
    let stop = attempt.stop.clone();
    let interrupt = tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            eprintln!("run: interrupted; cancelling the job");
            stop.stop(StopReason::Requested);
        }
    });
    let ran = runner.run(&attempt).await;
    interrupt.abort();
    let result = runner.result(&attempt, &ran, false);
    attempt.emit(JobEvent::Finished {
        status: result.status,
    });
    let text = serde_json::to_string_pretty(&result).unwrap_or_default();
    let _ = writeln!(std::io::stdout(), "{text}");
    exit_code(result.status)
}

/// `factoryd run`'s events: printed to stderr as `submit --follow` shows them.
struct StderrEvents {
    job_id: String,
    seq: AtomicU64,
    live: bool,
    clock: Arc<dyn Clock>,
}

impl crate::ports::EventSink for StderrEvents {
    fn emit(&self, event: JobEvent) {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed) + 1;
        let envelope = EventEnvelope {
            v: job::WIRE_VERSION,
            job_id: self.job_id.clone(),
            seq,
            attempt: 1,
            at: self.clock.now(),
            event,
        };
        show_event(&envelope, self.live);
    }
}
