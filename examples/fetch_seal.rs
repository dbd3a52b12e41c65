//! Fetch and seal one source from the command line, for `scripts/bench-sources.sh`: runs the
//! real `SourceFetcher` into a throwaway workspace, reads the context tar stream to its end,
//! and prints one line of figures (wall time, bytes, peak RSS).
//!
//! Usage: fetch_seal (--git URL [--user U --password P] | --targz URL) [--context DIR]
//!        [--build-file PATH] [--insecure-host HOST] [--child FACTORYD]
//!
//! With `--child FACTORYD` the fetch and seal run as the daemon runs them by default: in a
//! confined `FACTORYD source-worker` child (`sources.isolation = "process"`); the peak RSS
//! printed is then this process's only. With `--warm`, one untimed fetch runs first (in its
//! own workspace), as a worker that has run a job before: for the child, the next child is
//! then started ahead, as in the daemon.
//!
//! Loopback is allowed (benchmarks serve from 127.0.0.1). Not a factoryd subcommand.

// Benchmarks time real work in real time; the clock port's lint is for the daemon's code.
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

use std::collections::HashMap;
use std::io::{self, Write};
use std::sync::Arc;
use std::time::Instant;

use factoryd::adapters::sources::SourceFetcher;
use factoryd::job::{Origin, Redactor};
use factoryd::ports::{Fetcher, NoEvents, StageContext};
use factoryd::workspace::Workspace;
use tokio_util::sync::CancellationToken;

/// Counts what the builder would have received.
struct Sink(u64);

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0 += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let context = arg(&args, "--context").unwrap_or_else(|| "/".into());
    let build_file = arg(&args, "--build-file").unwrap_or_else(|| "/Dockerfile".into());
    let mut details = serde_json::json!({"context_dir": context, "build_file": build_file});
    if let Some(url) = arg(&args, "--git") {
        let mut repo = serde_json::json!({"url": url});
        if let (Some(u), Some(p)) = (arg(&args, "--user"), arg(&args, "--password")) {
            repo["auth"] = serde_json::json!({"type": "http",
                "credentials": {"username": u, "password": p}});
        }
        details["repo"] = repo;
    } else if let Some(url) = arg(&args, "--targz") {
        details["targz_url"] = serde_json::json!(url);
    } else {
        return Err("give --git URL or --targz URL".into());
    }
    let job = serde_json::json!({"v": 1, "id": "bench", "source_id": "bench",
        "origin": {"type": "docker-file", "details": details}});
    let job = factoryd::job::decode(job.to_string().as_bytes()).map_err(|p| p.to_string())?;
    let Origin::DockerFile(origin) = &job.origin else {
        return Err("not a docker-file job".into());
    };
    let insecure = arg(&args, "--insecure-host").unwrap_or_else(|| "127.0.0.1".into());
    let config = factoryd::config::from_toml_str(
        &format!("[egress]\nallow_loopback = true\n[git]\ninsecure_hosts = [\"{insecure}\"]\n"),
        &HashMap::new(),
    )?;
    let work_root = std::env::temp_dir().join("factoryd-bench-work");
    let workspace = Workspace::create(&work_root, "bench")?;
    let cx = StageContext {
        job_id: "bench".into(),
        attempt: 1,
        cancel: CancellationToken::new(),
        events: Arc::new(NoEvents),
        redactor: Arc::new(Redactor::for_job(&job)),
        workspace: workspace.path().to_path_buf(),
    };
    let fetcher: Box<dyn Fetcher> = match arg(&args, "--child") {
        Some(program) => Box::new(factoryd::sandbox::ConfinedFetcher::new(
            program.into(),
            &config,
        )),
        None => Box::new(SourceFetcher::new(&config)?),
    };
    if args.iter().any(|a| a == "--warm") {
        let warm_space = Workspace::create(&work_root, "bench-warm")?;
        let warm_cx = StageContext {
            workspace: warm_space.path().to_path_buf(),
            ..cx.clone()
        };
        let warmed = fetcher.fetch(origin, &warm_cx).await?;
        drop(warmed);
        // Time for the child started ahead to be ready, as between a worker's jobs.
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }

    let started = Instant::now();
    let fetched = fetcher.fetch(origin, &cx).await?;
    let fetch_done = started.elapsed();
    let context = fetched.context;
    let written = tokio::task::spawn_blocking(move || {
        let mut sink = Sink(0);
        context.write_tar(&mut sink).map(|n| (n, sink.0))
    })
    .await??;
    let total = started.elapsed();
    println!(
        "fetch+seal {:.3}s (fetch+check {:.3}s) fetched {} B, context stream {} B, peak RSS {} KiB",
        total.as_secs_f64(),
        fetch_done.as_secs_f64(),
        fetched.fetched_bytes,
        written.0,
        peak_rss_kib()
    );
    Ok(())
}
