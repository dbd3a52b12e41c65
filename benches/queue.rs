//! Queue-path benchmark (issue: serve): no-op jobs (scripted fake stages) through a real
//! `nats-server -js` on loopback, next to a raw "pull one + ack" loop on the same server as the
//! floor. Prints jobs/s with 1 and 8 slots and publish→result latency p50/p99.
//!
//! Run: `cargo bench --features test-util --bench queue` (or scripts/bench-queue.sh).
//! Bounded: a fixed number of jobs per phase, on 127.0.0.1 only.

// Benchmarks time real work in real time; the clock port's lint is for the daemon's code.
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

#[path = "../tests/integration/support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer, stream};
use bytes::Bytes;
use factoryd::adapters::nats::{self, ConnectionState, Nats};
use factoryd::job::Kind;
use factoryd::testing::ScriptedStages;
use factoryd::worker::{QueuePorts, Worker, WorkerSettings};
use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;

use support::nats::pull_at_most_one;

const THROUGHPUT_JOBS: usize = 4000;
const LATENCY_JOBS: usize = 300;

fn job(id: &str) -> Bytes {
    serde_json::to_vec(&serde_json::json!({
        "v": 1, "id": id, "source_id": "bench",
        "origin": {"type": "docker-hub", "details": {"target": "busybox:1"}}
    }))
    .unwrap()
    .into()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The floor: publish N messages, then one consumer pulls one and acks it, N times.
async fn raw_pull_ack(client: async_nats::Client, n: usize) -> (f64, Vec<Duration>) {
    let js = jetstream::new(client);
    let stream = js
        .create_stream(stream::Config {
            name: "RAW".into(),
            subjects: vec!["raw.>".into()],
            retention: stream::RetentionPolicy::WorkQueue,
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await
        .unwrap();
    let consumer: consumer::PullConsumer = stream
        .create_consumer(consumer::pull::Config {
            durable_name: Some("raw".into()),
            ack_policy: consumer::AckPolicy::Explicit,
            ..Default::default()
        })
        .await
        .unwrap();
    // Throughput: a backlog drained one pull + double ack at a time.
    for chunk in (0..n).collect::<Vec<_>>().chunks(1000) {
        let mut acks = Vec::new();
        for i in chunk {
            acks.push(js.publish(format!("raw.{i}"), job("raw")).await.unwrap());
        }
        for a in acks {
            a.await.unwrap();
        }
    }
    let start = Instant::now();
    for _ in 0..n {
        let mut batch = pull_at_most_one(&consumer, Duration::from_secs(5)).await;
        let msg = batch.next().await.unwrap().unwrap();
        msg.double_ack().await.unwrap();
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    // Latency: publish one, pull it, ack it.
    let mut lat = Vec::new();
    for i in 0..LATENCY_JOBS {
        let t = Instant::now();
        js.publish(format!("raw.l{i}"), job("raw"))
            .await
            .unwrap()
            .await
            .unwrap();
        let mut batch = pull_at_most_one(&consumer, Duration::from_secs(5)).await;
        let msg = batch.next().await.unwrap().unwrap();
        msg.double_ack().await.unwrap();
        lat.push(t.elapsed());
    }
    lat.sort();
    (rate, lat)
}

async fn open(url: &str, dir: &std::path::Path, prefix: &str) -> (Nats, factoryd::config::Config) {
    let text = format!(
        "[nats]\nservers = [\"{url}\"]\nprefix = \"{prefix}\"\n[worker]\nname = \"bench\"\n\
         work_root = \"{}\"\nbuild_slots = 0\nimport_slots = 8\n[destination]\npath = \"{}\"\n",
        dir.join("work").display(),
        dir.join("store").display()
    );
    let config = factoryd::config::from_toml_str(&text, &HashMap::new()).unwrap();
    let client = nats::connect(
        &config.nats,
        "bench",
        Arc::new(ConnectionState::default()),
        false,
    )
    .await
    .unwrap();
    (Nats::open(client, &config.nats).await.unwrap(), config)
}

fn start_worker(nats: &Nats, config: &factoryd::config::Config, slots: u32) -> CancellationToken {
    let nats = Arc::new(nats.clone());
    let mut settings = WorkerSettings::from_config(config);
    settings.import_slots = slots;
    settings.build_slots = 0;
    let ports = QueuePorts {
        queue: nats.clone(),
        states: nats.clone(),
        results: nats.clone(),
        events: nats.clone(),
        cancels: nats,
    };
    let stages = ScriptedStages::new().stages(config.destination.path.clone());
    let readiness = Arc::new(factoryd::readiness::Readiness::new(
        settings.work_root.clone(),
    ));
    let worker = Worker::new(
        settings,
        ports,
        stages,
        readiness,
        factoryd::clock::system(),
    );
    let stop = CancellationToken::new();
    tokio::spawn(worker.run(stop.clone()));
    stop
}

/// A backlog of `n` no-op jobs drained by a worker with `slots` import slots.
async fn factoryd_throughput(url: &str, dir: &std::path::Path, slots: u32, n: usize) -> f64 {
    let prefix = format!("tp{slots}");
    let (nats, config) = open(url, dir, &prefix).await;
    let mut results = nats
        .follow(
            &nats.names.results_stream,
            format!("{prefix}.results.>"),
            consumer::DeliverPolicy::New,
        )
        .await
        .unwrap();
    for chunk in (0..n).collect::<Vec<_>>().chunks(1000) {
        let mut acks = Vec::new();
        for i in chunk {
            let id = format!("j{i}");
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(async_nats::header::NATS_MESSAGE_ID, id.as_str());
            acks.push(
                nats.js
                    .publish_with_headers(
                        nats.names.job_subject(Kind::Import, &id),
                        headers,
                        job(&id),
                    )
                    .await
                    .unwrap(),
            );
        }
        for a in acks {
            a.await.unwrap();
        }
    }
    let start = Instant::now();
    let stop = start_worker(&nats, &config, slots);
    for _ in 0..n {
        results.next().await.unwrap().unwrap();
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    stop.cancel();
    rate
}

/// One job at a time: publish, wait for its result.
async fn factoryd_latency(url: &str, dir: &std::path::Path) -> Vec<Duration> {
    let (nats, config) = open(url, dir, "lat").await;
    let stop = start_worker(&nats, &config, 8);
    let mut results = nats
        .follow(
            &nats.names.results_stream,
            "lat.results.>".into(),
            consumer::DeliverPolicy::New,
        )
        .await
        .unwrap();
    let mut lat = Vec::new();
    for i in 0..LATENCY_JOBS {
        let id = format!("l{i}");
        let t = Instant::now();
        assert!(nats.publish_job(Kind::Import, &id, job(&id)).await.unwrap());
        results.next().await.unwrap().unwrap();
        lat.push(t.elapsed());
    }
    stop.cancel();
    lat.sort();
    lat
}

fn main() {
    let dir = tempfile::tempdir().unwrap();
    let server = support::nats::NatsServer::start(dir.path());
    let url = server.url();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let client = async_nats::connect(url.as_str()).await.unwrap();
        let (raw_rate, raw_lat) = raw_pull_ack(client, THROUGHPUT_JOBS).await;
        let one = factoryd_throughput(&url, dir.path(), 1, THROUGHPUT_JOBS / 4).await;
        let eight = factoryd_throughput(&url, dir.path(), 8, THROUGHPUT_JOBS).await;
        let lat = factoryd_latency(&url, dir.path()).await;

        println!("queue benchmark: nats-server 2.9 (file store) on loopback, no-op jobs");
        println!("reference: raw pull-one + double-ack loop, same server, same run");
        println!("  raw pull+ack       {raw_rate:>8.0} msg/s");
        println!(
            "  factoryd 1 slot    {one:>8.0} jobs/s   ({:.2}x raw)",
            one / raw_rate
        );
        println!(
            "  factoryd 8 slots   {eight:>8.0} jobs/s   ({:.2}x raw)",
            eight / raw_rate
        );
        let (rp50, rp99) = (percentile(&raw_lat, 0.5), percentile(&raw_lat, 0.99));
        let (p50, p99) = (percentile(&lat, 0.5), percentile(&lat, 0.99));
        println!(
            "  raw publish→ack    p50 {:>6.2} ms  p99 {:>6.2} ms",
            ms(rp50),
            ms(rp99)
        );
        println!(
            "  factoryd publish→result p50 {:>6.2} ms  p99 {:>6.2} ms  ({:.2}x / {:.2}x raw)",
            ms(p50),
            ms(p99),
            ms(p50) / ms(rp50),
            ms(p99) / ms(rp99)
        );
        println!(
            "  dispatch overhead (factoryd - raw)  p50 {:>6.2} ms  p99 {:>6.2} ms",
            ms(p50.saturating_sub(rp50)),
            ms(p99.saturating_sub(rp99))
        );
    });
    drop(server);
}
