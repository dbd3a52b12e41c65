//! Composition root: turns a parsed command into work. It builds the adapters from the
//! configuration, owns start-up and shutdown, and maps outcomes to exit codes.

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::DeliverPolicy;
use futures_util::StreamExt;
use tracing::{error, info, warn};

use crate::adapters::buildkit;
use crate::adapters::credentials::OriginCredentials;
use crate::adapters::local::LocalFetcher;
use crate::adapters::nats::{self, ConnectionState, Nats};
use crate::adapters::oci::RegistryImporter;
use crate::adapters::sources::SourceFetcher;
use crate::cli::{RunArgs, ServeArgs, SubmitArgs, ValidateArgs};
use crate::config::{self, Config, ConfigError, DestinationKind};
use crate::job::{self, EventEnvelope, JobEvent, JobResult, Kind, Status};
use crate::pipeline::{DestinationSettings, Stages};
use crate::telemetry::http::Health;
use crate::telemetry::systemd::Notifier;
use crate::telemetry::{self, LogStyle};
use crate::worker::{HoldCause, QueuePorts, Worker, WorkerSettings};
use tokio_util::sync::CancellationToken;

/// Invalid input (a job or a config), as the contract fixes it.
pub const EXIT_INVALID: u8 = 64;
/// `EX_UNAVAILABLE`: NATS (or another service) cannot be reached.
pub const EXIT_UNAVAILABLE: u8 = 69;
/// `EX_NOINPUT`: a named file cannot be read.
pub const EXIT_NO_INPUT: u8 = 66;
/// `EX_TEMPFAIL`: gave up waiting for a result.
pub const EXIT_WAIT_TIMEOUT: u8 = 75;
/// A job that ended `failed`.
pub const EXIT_JOB_FAILED: u8 = 1;
/// A job that ended `cancelled`.
pub const EXIT_JOB_CANCELLED: u8 = 2;

pub fn version_line() -> String {
    format!(
        "factoryd {} (job wire format v{})",
        env!("CARGO_PKG_VERSION"),
        job::WIRE_VERSION
    )
}

/// The multi-threaded runtime every async command runs on.
pub fn runtime() -> tokio::runtime::Runtime {
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("factoryd: cannot start the async runtime: {e}");
            std::process::exit(i32::from(EXIT_UNAVAILABLE));
        }
    }
}

/// Loads the config or says why not, with the exit code to use.
pub fn load_config(path: Option<&Path>, env: &HashMap<String, String>) -> Result<Config, ExitCode> {
    match config::load(path, env) {
        Ok(c) => Ok(c),
        Err(ConfigError::Invalid(problems)) => {
            eprintln!("config: {} problem(s):", problems.len());
            for p in problems.iter() {
                eprintln!("  {p}");
            }
            Err(ExitCode::from(EXIT_INVALID))
        }
        Err(e) => {
            eprintln!("config: {e}");
            Err(ExitCode::from(EXIT_NO_INPUT))
        }
    }
}

pub fn init_logs(config: &Config, env: &HashMap<String, String>) {
    telemetry::init(log_style(config.log.format, env), &config.log.level);
}

/// The configured log format, with `auto` settled when the environment says where stderr goes.
fn log_style(format: config::LogFormat, env: &HashMap<String, String>) -> LogStyle {
    match format {
        config::LogFormat::Text => LogStyle::Text,
        config::LogFormat::Json => LogStyle::Json,
        // Under systemd, stderr goes to the journal (systemd sets JOURNAL_STREAM to say so):
        // structured lines.
        config::LogFormat::Auto if env.contains_key("JOURNAL_STREAM") => LogStyle::Json,
        config::LogFormat::Auto => LogStyle::Auto,
    }
}

/// The stages of a production worker: the real adapters where this build has them.
pub fn production_stages(config: &Config) -> Result<Stages, crate::error::JobError> {
    let node_registry_auth = node_registry_auth(config)?;
    let mut node_secrets = nats_secrets(&config.nats.auth);
    node_secrets.extend(node_registry_auth.iter().map(|n| n.auth.password.clone()));
    let fetcher: Arc<dyn crate::ports::Fetcher> = match config.sources.isolation {
        config::Isolation::Process => {
            // The running binary itself, even after a package upgrade replaced the file: a
            // child of another version could speak another protocol.
            let this = std::path::PathBuf::from("/proc/self/exe");
            let program = if this.exists() {
                this
            } else {
                std::env::current_exe().map_err(|e| {
                    crate::error::JobError::transient(
                        crate::error::Stage::Fetch,
                        crate::error::ErrorCode::LocalIo,
                        format!("cannot find this program to start source processes: {e}"),
                    )
                })?
            };
            Arc::new(crate::sandbox::ConfinedFetcher::new(program, config))
        }
        config::Isolation::None => Arc::new(SourceFetcher::new(config)?),
    };
    Ok(Stages {
        fetcher,
        builder: buildkit::from_config(config)?,
        resolver: Arc::new(OriginCredentials::from_config(config)?),
        importer: Arc::new(RegistryImporter::from_config(config)?),
        node_registry_auth,
        node_secrets,
        allowed_frontends: config.builder.allowed_frontends.clone(),
        insecure_registries: config.registries.insecure.clone(),
        destinations: DestinationSettings::new(config.destination.clone()),
    })
}

/// The worker's own NATS credentials, for masking: a job never receives them, but a server a
/// job talks to must not be able to make them appear in its text either. A file that cannot be
/// read here adds nothing (the connection reports it).
pub(crate) fn nats_secrets(auth: &config::NatsAuth) -> Vec<crate::secret::Secret> {
    let file = match auth {
        config::NatsAuth::None => return Vec::new(),
        config::NatsAuth::CredentialsFile(f)
        | config::NatsAuth::NkeySeedFile(f)
        | config::NatsAuth::TokenFile(f) => f,
        config::NatsAuth::UserPassword { password_file, .. } => password_file,
    };
    // A `.creds` file is masked line by line (the redactor masks each long line of a value).
    std::fs::read_to_string(file)
        .map(|text| vec![crate::secret::Secret::new(text.trim())])
        .unwrap_or_default()
}

/// `registries.credentials`, with each password read from its file now: a file that cannot be
/// read stops the start-up rather than failing every build that needs it.
fn node_registry_auth(
    config: &Config,
) -> Result<Vec<crate::pipeline::NodeRegistryAuth>, crate::error::JobError> {
    config
        .registries
        .credentials
        .iter()
        .map(|(host, node)| {
            let login = &node.login;
            let text = std::fs::read_to_string(&login.password_file).map_err(|e| {
                crate::error::JobError::transient(
                    crate::error::Stage::Resolve,
                    crate::error::ErrorCode::LocalIo,
                    format!(
                        "cannot read registries.credentials.{host:?}.password_file {}: {e}",
                        login.password_file.display()
                    ),
                )
            })?;
            Ok(crate::pipeline::NodeRegistryAuth {
                host: host.clone(),
                auth: crate::ports::BasicAuth {
                    username: login.username.clone(),
                    password: crate::secret::Secret::new(text.trim_end_matches(['\r', '\n'])),
                },
                sources: node.sources.clone(),
            })
        })
        .collect()
}

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

    // The metrics endpoint comes up first, so /healthz answers and /readyz explains while
    // NATS is still out of reach.
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
    let mut health = Health::new(Arc::clone(&state), config.worker.work_root.clone())
        .with_min_free(config.worker.min_free_bytes);
    if config.destination.kind == DestinationKind::OciLayout {
        health = health.with_store(config.destination.path.clone());
    }
    let health = Arc::new(health);
    let http_stop = CancellationToken::new();
    tokio::spawn(telemetry::http::serve(
        listener,
        Arc::clone(&health),
        http_stop.clone(),
    ));
    // The worker, once connected: the backend probe holds its builds, the watchdog asks it.
    let live_worker: Arc<std::sync::OnceLock<Arc<Worker>>> = Arc::default();
    if config.worker.build_slots > 0 {
        // The build backend is probed in the background so /readyz answers at once.
        let builder = Arc::clone(&stages.builder);
        let health = Arc::clone(&health);
        let stop = http_stop.clone();
        let live_worker = Arc::clone(&live_worker);
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(Duration::from_secs(10));
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = ticks.tick() => {
                        let down = builder.ready().await.err();
                        if let Ok(mut slot) = health.builder_down.lock() {
                            if slot.is_some() != down.is_some() {
                                match &down {
                                    Some(why) => warn!(reason = %why, "Build backend unreachable."),
                                    None => info!("Build backend reachable."),
                                }
                            }
                            if let Some(worker) = live_worker.get() {
                                worker.hold(
                                    Kind::Build,
                                    HoldCause::BuilderUnreachable,
                                    down.clone().map(unreachable_builder),
                                );
                            }
                            *slot = down;
                        }
                    }
                }
            }
        });
    }
    // The watchdog is pinged only while the worker's pull loops go round (see Worker::alive);
    // during start-up, before the worker exists, the runtime answering is enough.
    if let Some(every) = systemd.watchdog_interval() {
        let pinger = systemd.clone();
        let stop = http_stop.clone();
        let live_worker = Arc::clone(&live_worker);
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(every);
            let mut warned = false;
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = ticks.tick() => {
                        if live_worker.get().is_none_or(|w| w.alive()) {
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
    let worker = Worker::new(settings, ports, stages);
    let _ = live_worker.set(Arc::clone(&worker));
    // What the probe found before the worker existed; later probes tell the worker directly.
    if let Some(why) = health.builder_down.lock().ok().and_then(|b| b.clone()) {
        worker.hold(
            Kind::Build,
            HoldCause::BuilderUnreachable,
            Some(unreachable_builder(why)),
        );
    }
    if config.worker.min_free_bytes > 0 {
        // Checked once before the first pull, then every 10 s.
        let hold_if_full = {
            let (health, worker) = (Arc::clone(&health), Arc::clone(&worker));
            move || {
                let low = health.low_on_disk();
                let low = (!low.is_empty()).then(|| low.join("; "));
                for kind in Kind::ALL {
                    worker.hold(kind, HoldCause::LowDisk, low.clone());
                }
            }
        };
        hold_if_full();
        let stop = http_stop.clone();
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(Duration::from_secs(10));
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = ticks.tick() => hold_if_full(),
                }
            }
        });
    }
    info!(
        build_slots = config.worker.build_slots,
        import_slots = config.worker.import_slots,
        "Ready: pulling jobs."
    );
    systemd.ready();
    let draining = {
        let shutdown = shutdown.clone();
        let health = Arc::clone(&health);
        let systemd = systemd.clone();
        tokio::spawn(async move {
            shutdown.cancelled().await;
            health
                .draining
                .store(true, std::sync::atomic::Ordering::Relaxed);
            systemd.stopping();
        })
    };
    worker.run(shutdown).await;
    let _ = draining.await;
    http_stop.cancel();
    if let Err(e) = client.flush().await {
        warn!(error = %e, "Cannot flush NATS on exit.");
    }
    ExitCode::SUCCESS
}

/// Why builds are held while the backend's probe fails.
fn unreachable_builder(why: String) -> String {
    format!("build backend unreachable: {why}")
}

/// `factoryd run`: one job through [`crate::pipeline::run_job`] on the production stages, no
/// NATS. Events go to stderr as the worker would publish them (redacted); the result, built by
/// the worker's own [`crate::worker::job_result`], goes to stdout.
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
            eprintln!("{}: {} problem(s):", args.job.display(), problems.len());
            for p in problems.iter() {
                eprintln!("  {p}");
            }
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
    use crate::worker::{job_result, JobRun, RedactingSink};

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
    let worker = config.worker.name.clone();
    // One masking set for the run, as in the worker: the stages grow it, the result uses it.
    let redactor = Arc::new(job::Redactor::for_job(&job));
    let events: Arc<dyn crate::ports::EventSink> = Arc::new(RedactingSink {
        inner: Arc::new(StderrEvents {
            job_id: job.id.clone(),
            seq: std::sync::atomic::AtomicU64::new(0),
            live: std::io::stderr().is_terminal(),
        }),
        redactor: Arc::clone(&redactor),
    });
    events.emit(JobEvent::Started {
        kind: job.kind(),
        worker: worker.clone(),
    });
    let started_at = time::OffsetDateTime::now_utc();
    let workspace = match crate::workspace::Workspace::create(&config.worker.work_root, &job.id) {
        Ok(w) => w,
        Err(e) => {
            eprintln!("run: {e}");
            return ExitCode::from(EXIT_NO_INPUT);
        }
    };
    let cancel = CancellationToken::new();
    let cx = crate::ports::StageContext {
        job_id: job.id.clone(),
        attempt: 1,
        cancel: cancel.clone(),
        events: Arc::clone(&events),
        redactor: Arc::clone(&redactor),
        workspace: workspace.path().to_owned(),
    };
    let timeout = job
        .timeout_secs
        .map(Duration::from_secs)
        .unwrap_or(config.worker.default_job_timeout)
        .min(config.worker.max_job_timeout);

    let pipeline = crate::pipeline::run_job(&job, &stages, &cx);
    tokio::pin!(pipeline);
    let mut timed_out = false;
    let outcome = tokio::select! {
        outcome = &mut pipeline => outcome,
        _ = tokio::signal::ctrl_c() => {
            eprintln!("run: interrupted; cancelling the job");
            cancel.cancel();
            pipeline.await
        }
        _ = tokio::time::sleep(timeout) => {
            timed_out = true;
            cancel.cancel();
            pipeline.await
        }
    };
    let outcome = match outcome {
        Err(e) if timed_out => Err(crate::error::JobError::permanent(
            e.stage,
            crate::error::ErrorCode::Timeout,
            format!("job timed out after {} s", timeout.as_secs()),
        )),
        other => other,
    };
    drop(workspace);
    let finished_at = time::OffsetDateTime::now_utc();
    let result = job_result(
        JobRun {
            job_id: &job.id,
            source_id: &job.source_id,
            attempt: 1,
            worker: &worker,
            started_at,
            finished_at,
        },
        outcome.as_ref().map_err(|e| (e, false)),
        &redactor,
    );
    events.emit(JobEvent::Finished {
        status: result.status,
    });
    let text = serde_json::to_string_pretty(&result).unwrap_or_default();
    let _ = writeln!(std::io::stdout(), "{text}");
    ExitCode::from(match result.status {
        Status::Succeeded => 0,
        Status::Failed => EXIT_JOB_FAILED,
        Status::Cancelled => EXIT_JOB_CANCELLED,
    })
}

/// `factoryd run`'s events: printed to stderr as `submit --follow` shows them.
struct StderrEvents {
    job_id: String,
    seq: std::sync::atomic::AtomicU64,
    live: bool,
}

impl crate::ports::EventSink for StderrEvents {
    fn emit(&self, event: JobEvent) {
        let seq = self.seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        let envelope = EventEnvelope {
            v: job::WIRE_VERSION,
            job_id: self.job_id.clone(),
            seq,
            attempt: 1,
            at: time::OffsetDateTime::now_utc(),
            event,
        };
        show_event(&envelope, self.live);
    }
}

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
            eprintln!("{}: {} problem(s):", path.display(), problems.len());
            for p in problems.iter() {
                eprintln!("  {p}");
            }
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
                return ExitCode::from(match result.status {
                    Status::Succeeded => 0,
                    Status::Failed => EXIT_JOB_FAILED,
                    Status::Cancelled => EXIT_JOB_CANCELLED,
                });
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

/// One event as a line; on a terminal, progress updates rewrite one status line.
fn show_event(envelope: &EventEnvelope, live: bool) {
    let line = match &envelope.event {
        JobEvent::Started { kind, worker } => {
            format!("attempt {}: {kind} started on {worker}", envelope.attempt)
        }
        JobEvent::Stage { stage } => format!("stage {stage}"),
        JobEvent::Progress {
            stage,
            item,
            done_bytes,
            total_bytes,
        } => {
            let total = total_bytes.map(|t| format!(" of {t}")).unwrap_or_default();
            let text = format!("{stage} {item}: {done_bytes}{total} bytes");
            if live {
                eprint!("\r\x1b[2K{text}");
                return;
            }
            text
        }
        JobEvent::Log { lines } => lines.join("\n"),
        JobEvent::Warning { code, message } => format!("warning ({code}): {message}"),
        JobEvent::Retrying { error, delay_ms } => format!(
            "attempt {} failed ({}, {}): {}; retrying in {} s",
            envelope.attempt,
            error.class,
            error.code,
            error.message,
            delay_ms / 1000
        ),
        JobEvent::Finished { status } => format!("finished: {}", status.as_str()),
    };
    if live {
        eprint!("\r\x1b[2K");
    }
    eprintln!("{line}");
}

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::LogFormat;

    #[test]
    fn auto_log_format_is_json_under_journald() {
        let journal = HashMap::from([("JOURNAL_STREAM".to_owned(), "8:12345".to_owned())]);
        assert_eq!(log_style(LogFormat::Auto, &journal), LogStyle::Json);
        assert_eq!(log_style(LogFormat::Auto, &HashMap::new()), LogStyle::Auto);
    }

    #[test]
    fn explicit_log_format_wins_over_journald() {
        let journal = HashMap::from([("JOURNAL_STREAM".to_owned(), "8:12345".to_owned())]);
        assert_eq!(log_style(LogFormat::Text, &journal), LogStyle::Text);
        assert_eq!(log_style(LogFormat::Json, &HashMap::new()), LogStyle::Json);
    }
}
