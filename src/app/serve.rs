//! `factoryd serve`: the long-running worker, until SIGTERM/SIGINT.
//!
//! Start-up order: readiness (with its probes) and the metrics endpoint first, so `/healthz`
//! answers and `/readyz` explains while NATS is still out of reach; then NATS and the worker;
//! then `READY=1` to systemd. The watchdog is pinged while the pull loops go round.

use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::{init_logs, load_config, production_stages, runtime, EXIT_UNAVAILABLE};
use crate::adapters::nats::{self, ConnectionState, Nats};
use crate::cli::ServeArgs;
use crate::config::{Config, DestinationKind};
use crate::pipeline::Stages;
use crate::readiness::Readiness;
use crate::store::{CacheKeeper, StoreKeeper};
use crate::telemetry;
use crate::telemetry::systemd::Notifier;
use crate::worker::{QueuePorts, Worker, WorkerSettings};

/// `factoryd serve`.
pub fn serve(args: &ServeArgs, env: &HashMap<String, String>) -> ExitCode {
    let config = match load_config(args.config.as_deref(), env) {
        Ok(c) => c,
        Err(code) => return code,
    };
    init_logs(&config, env);
    let stages = match production_stages(&config) {
        Ok(s) => s,
        Err(e) => {
            error!(error = %e, "Cannot set up the job stages.");
            return ExitCode::from(EXIT_UNAVAILABLE);
        }
    };
    runtime().block_on(run_serve(config, stages, env))
}

/// Runs a worker until SIGTERM/SIGINT; shared by `serve` and the scripted test worker.
pub async fn run_serve(config: Config, stages: Stages, env: &HashMap<String, String>) -> ExitCode {
    let shutdown = crate::shutdown::on_signals();
    let state = Arc::new(ConnectionState::default());
    let name = config.worker.name.clone();
    let systemd = Notifier::from_env(env);
    info!(worker = %name, servers = config.nats.servers.len(), "Starting factoryd.");
    // Workspaces left by a crashed process; each worker owns its work root.
    match crate::workspace::cleanup_stale(&config.worker.work_root) {
        Ok(0) => {}
        Ok(n) => info!(removed = n, "Removed stale workspaces."),
        Err(e) => warn!(error = %e, "Cannot clean the work root."),
    }

    let listener = match telemetry::http::bind(config.metrics.listen).await {
        Ok(l) => l,
        Err(e) => {
            error!(listen = %config.metrics.listen, error = %e, "Cannot listen for metrics.");
            return ExitCode::from(EXIT_UNAVAILABLE);
        }
    };
    if let Ok(addr) = listener.local_addr() {
        info!(listen = %addr, "Serving metrics and health.");
    }
    let background = CancellationToken::new();
    let mut readiness = Readiness::new(config.worker.work_root.clone())
        .with_nats(Arc::clone(&state))
        .with_min_free(config.worker.min_free_bytes)
        .with_min_free_inodes(config.worker.min_free_inodes);
    if config.destination.kind == DestinationKind::OciLayout {
        // The store looks after itself: after jobs, every store.gc_interval_secs, and before
        // the disk hold.
        let keeper = StoreKeeper::new(
            config.destination.path.clone(),
            config.store,
            crate::clock::system(),
        );
        keeper.start(background.clone());
        readiness = readiness
            .with_store(config.destination.path.clone())
            .with_keeper(keeper);
    }
    // The build cache stays under builder.cache_keep_bytes: after builds, before the disk hold.
    let cache = (config.worker.build_slots > 0)
        .then(|| CacheKeeper::new(Arc::clone(&stages.builder), config.builder.cache_keep_bytes))
        .flatten();
    if let Some(cache) = &cache {
        cache.start(background.clone());
    }
    let readiness = Arc::new(readiness.with_cache_keeper(cache));
    tokio::spawn(telemetry::http::serve(
        listener,
        Arc::clone(&readiness),
        background.clone(),
    ));
    // The disk is checked now, before the first pull; the builder in the background.
    let builder = (config.worker.build_slots > 0).then(|| Arc::clone(&stages.builder));
    readiness.start_probes(builder, background.clone()).await;
    if let Some(every) = systemd.watchdog_interval() {
        let (pinger, readiness, stop) =
            (systemd.clone(), Arc::clone(&readiness), background.clone());
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(every);
            let mut warned = false;
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = ticks.tick() => {
                        if readiness.alive() {
                            pinger.watchdog();
                            warned = false;
                        } else if !warned {
                            error!("A pull loop is stuck; withholding the watchdog ping.");
                            warned = true;
                        }
                    }
                }
            }
        });
    }

    let client = tokio::select! {
        _ = shutdown.cancelled() => return ExitCode::SUCCESS,
        c = nats::connect(&config.nats, &name, Arc::clone(&state), true) => c,
    };
    let client = match client {
        Ok(c) => c,
        Err(e) => {
            error!(error = %e, "Cannot connect to NATS.");
            return ExitCode::from(EXIT_UNAVAILABLE);
        }
    };
    let nats = tokio::select! {
        _ = shutdown.cancelled() => return ExitCode::SUCCESS,
        n = Nats::open(client.clone(), &config.nats) => n,
    };
    let nats = match nats {
        Ok(n) => Arc::new(n),
        Err(e) => {
            error!(error = %e, "Cannot set up the JetStream assets.");
            return ExitCode::from(EXIT_UNAVAILABLE);
        }
    };
    let ports = QueuePorts {
        queue: nats.clone(),
        states: nats.clone(),
        results: nats.clone(),
        events: nats.clone(),
        cancels: nats.clone(),
    };
    let settings = WorkerSettings::from_config(&config);
    let worker = Worker::new(
        settings,
        ports,
        stages,
        Arc::clone(&readiness),
        crate::clock::system(),
    );
    info!(
        build_slots = config.worker.build_slots,
        import_slots = config.worker.import_slots,
        "Ready: pulling jobs."
    );
    systemd.ready();
    let draining = {
        let (shutdown, readiness, systemd) =
            (shutdown.clone(), Arc::clone(&readiness), systemd.clone());
        tokio::spawn(async move {
            shutdown.cancelled().await;
            readiness.set_draining();
            systemd.stopping();
        })
    };
    worker.run(shutdown).await;
    let _ = draining.await;
    background.cancel();
    if let Err(e) = client.flush().await {
        warn!(error = %e, "Cannot flush NATS on exit.");
    }
    ExitCode::SUCCESS
}
