//! Command-line entry for `scripts/bench-fleet.sh`: publishes a batch of import jobs on one
//! connection. Not a factoryd subcommand.
//!
//! ```text
//! fleet_jobs CONFIG PREFIX COUNT REGISTRY TARGET   publishes jobs PREFIX-0 … PREFIX-(COUNT-1),
//!                                                  each importing REGISTRY/TARGET (plain http)
//! ```
//! Prints `published=COUNT elapsed_ms=…`.

// Benchmarks time real work in real time; the clock port's lint is for the daemon's code.
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

use std::collections::HashMap;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use factoryd::adapters::nats::{self, ConnectionState, Nats};
use factoryd::job::Kind;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [config, prefix, count, registry, target] = args.as_slice() else {
        eprintln!("usage: fleet_jobs CONFIG PREFIX COUNT REGISTRY TARGET");
        return ExitCode::from(64);
    };
    let Ok(count) = count.parse::<usize>() else {
        eprintln!("fleet_jobs: COUNT must be a number, got {count:?}");
        return ExitCode::from(64);
    };
    match publish(Path::new(config), prefix, count, registry, target).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fleet_jobs: {e}");
            ExitCode::from(69)
        }
    }
}

async fn publish(
    config: &Path,
    prefix: &str,
    count: usize,
    registry: &str,
    target: &str,
) -> Result<(), String> {
    let config = factoryd::config::load(Some(config), &HashMap::new())
        .map_err(|e| format!("config: {e}"))?;
    let state = Arc::new(ConnectionState::default());
    let client = nats::connect(&config.nats, "bench", state, false)
        .await
        .map_err(|e| e.to_string())?;
    let nats = Nats::open(client, &config.nats)
        .await
        .map_err(|e| e.to_string())?;
    let started = Instant::now();
    for i in 0..count {
        let id = format!("{prefix}-{i}");
        let job = serde_json::json!({
            "v": 1, "id": id, "source_id": "bench",
            "origin": {"type": "docker-registry", "details": {
                "url": format!("http://{registry}"), "target": target
            }}
        });
        let payload = serde_json::to_vec(&job).map_err(|e| e.to_string())?;
        nats.publish_job(Kind::Import, &id, payload.into())
            .await
            .map_err(|e| e.to_string())?;
    }
    println!(
        "published={count} elapsed_ms={}",
        started.elapsed().as_millis()
    );
    Ok(())
}
