//! `factoryd submit`: publishes a job (or a cancel request) and, with `--wait`/`--follow`,
//! shows its events and prints its result.

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::DeliverPolicy;
use futures_util::StreamExt;

use super::{
    exit_code, init_logs, load_config, print_problems, runtime, show_event, EXIT_INVALID,
    EXIT_NO_INPUT, EXIT_UNAVAILABLE, EXIT_WAIT_TIMEOUT,
};
use crate::adapters::nats::{self, ConnectionState, Nats};
use crate::cli::SubmitArgs;
use crate::config::Config;
use crate::job::{self, EventEnvelope, JobResult};

/// `factoryd submit`.
pub fn submit(args: &SubmitArgs, env: &HashMap<String, String>) -> ExitCode {
    let config = match load_config(args.config.as_deref(), env) {
        Ok(c) => c,
        Err(code) => return code,
    };
    // A command line tool: only problems go to stderr besides its own lines.
    let mut quiet = config.clone();
    quiet.log.level = "warn".to_owned();
    init_logs(&quiet, env);
    runtime().block_on(run_submit(args, config))
}

async fn run_submit(args: &SubmitArgs, config: Config) -> ExitCode {
    let state = Arc::new(ConnectionState::default());
    let connected = nats::connect(&config.nats, "submit", state, false).await;
    let nats = match connected {
        Ok(client) => Nats::open(client, &config.nats).await,
        Err(e) => Err(e),
    };
    let nats = match nats {
        Ok(n) => n,
        Err(e) => {
            eprintln!("submit: {e}");
            return ExitCode::from(EXIT_UNAVAILABLE);
        }
    };

    if let Some(job_id) = &args.cancel {
        return match nats.cancel(job_id).await {
            Ok(true) => {
                eprintln!("cancel requested for job {job_id}");
                ExitCode::SUCCESS
            }
            Ok(false) => {
                eprintln!("job {job_id} has already ended; nothing to cancel");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("submit: {e}");
                ExitCode::from(EXIT_UNAVAILABLE)
            }
        };
    }

    let Some(path) = &args.job else {
        eprintln!("submit: give a job file, or --cancel JOB_ID");
        return ExitCode::from(EXIT_INVALID);
    };
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("{}: cannot read: {e}", path.display());
            return ExitCode::from(EXIT_NO_INPUT);
        }
    };
    let job = match job::decode(&bytes) {
        Ok(j) => j,
        Err(problems) => {
            print_problems(&path.display().to_string(), &problems);
            return ExitCode::from(EXIT_INVALID);
        }
    };

    let wait = args.wait || args.follow;
    // Subscribe before publishing, so nothing is missed.
    let follow = if wait {
        let results = nats
            .follow(
                &nats.names.results_stream,
                nats.names.result_subject(&job.id),
                DeliverPolicy::LastPerSubject,
            )
            .await;
        let events = if args.follow {
            Some(
                nats.follow(
                    &nats.names.events_stream,
                    nats.names.event_subject(&job.id),
                    DeliverPolicy::All,
                )
                .await,
            )
        } else {
            None
        };
        match (results, events.transpose()) {
            (Ok(r), Ok(e)) => Some((r, e)),
            (Err(e), _) | (_, Err(e)) => {
                eprintln!("submit: {e}");
                return ExitCode::from(EXIT_UNAVAILABLE);
            }
        }
    } else {
        None
    };

    match nats.publish_job(job.kind(), &job.id, bytes.into()).await {
        Ok(true) => eprintln!("published {} job {}", job.kind(), job.id),
        Ok(false) => eprintln!(
            "job {} was already published within the duplicate window; following that one",
            job.id
        ),
        Err(e) => {
            eprintln!("submit: {e}");
            return ExitCode::from(EXIT_UNAVAILABLE);
        }
    }
    let Some((mut results, mut events)) = follow else {
        println!("{}", job.id);
        return ExitCode::SUCCESS;
    };

    let live = std::io::stderr().is_terminal();
    let deadline = tokio::time::sleep(Duration::from_secs(args.wait_timeout_secs));
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            _ = &mut deadline => {
                if live { eprintln!(); }
                eprintln!("submit: no result for job {} after {} s", job.id, args.wait_timeout_secs);
                return ExitCode::from(EXIT_WAIT_TIMEOUT);
            }
            Some(msg) = next_message(&mut events) => {
                if let Ok(envelope) = serde_json::from_slice::<EventEnvelope>(&msg) {
                    show_event(&envelope, live);
                }
            }
            msg = results.next() => {
                let Some(Ok(msg)) = msg else {
                    eprintln!("submit: lost the result subscription");
                    return ExitCode::from(EXIT_UNAVAILABLE);
                };
                let Ok(result) = serde_json::from_slice::<JobResult>(&msg.payload) else {
                    continue;
                };
                if live { eprintln!(); }
                let text = serde_json::to_string_pretty(&result).unwrap_or_default();
                let _ = writeln!(std::io::stdout(), "{text}");
                return exit_code(result.status);
            }
        }
    }
}

async fn next_message(
    events: &mut Option<async_nats::jetstream::consumer::pull::Ordered>,
) -> Option<bytes::Bytes> {
    match events {
        Some(stream) => match stream.next().await {
            Some(Ok(m)) => Some(m.payload.clone()),
            _ => std::future::pending().await,
        },
        None => std::future::pending().await,
    }
}
