//! Driver for `scripts/bench-store-gc.sh`: writes a synthetic OCI layout store of TAGS images
//! (SOURCES sources, LAYERS layers each, the first layer shared by all), then times
//! collections of it with the real `factoryd::store::collect`: one that keeps everything (mark
//! all, sweep nothing) and one whose retention drops half the images (and sweeps their blobs).
//! Prints one `key=value` line per figure.

// Benchmarks time real work in real time; the clock port's lint is for the daemon's code.
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

use std::path::Path;
use std::time::Instant;

use factoryd::store::{collect, Collection, Policy};
use factoryd::testing::synthetic_store;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [phase, dir, tags, sources, layers] = &args[..] else {
        eprintln!("usage: store_gc setup|collect DIR TAGS SOURCES LAYERS");
        std::process::exit(64);
    };
    let (tags, sources, layers): (usize, usize, usize) = (
        tags.parse().unwrap(),
        sources.parse().unwrap(),
        layers.parse().unwrap(),
    );
    let root = Path::new(dir);
    if phase == "collect" {
        return collect_phase(root, tags, sources);
    }
    let started = Instant::now();
    let blobs = synthetic_store(root, tags, sources, layers, 0).unwrap();
    println!(
        "tags={tags} blobs={blobs} setup_s={:.2}",
        started.elapsed().as_secs_f64()
    );
}

fn collect_phase(root: &Path, tags: usize, sources: usize) {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let keep_all = Policy::KEEP_ALL;
    for run in 0..3 {
        let t = Instant::now();
        let report = collect(
            root,
            Collection {
                policy: keep_all,
                dry_run: false,
            },
            now_ms,
        )
        .unwrap();
        println!(
            "keep_all_run={run} seconds={:.3} kept={} blobs_left={} removed={}",
            t.elapsed().as_secs_f64(),
            report.kept,
            report.blobs_left,
            report.blobs_removed
        );
    }
    let half = Policy {
        keep_per_source: (tags / sources / 2) as u32,
        ..keep_all
    };
    let t = Instant::now();
    let report = collect(
        root,
        Collection {
            policy: half,
            dry_run: false,
        },
        now_ms,
    )
    .unwrap();
    println!(
        "drop_half seconds={:.3} dropped={} kept={} removed={} blobs_left={}",
        t.elapsed().as_secs_f64(),
        report.dropped.len(),
        report.kept,
        report.blobs_removed,
        report.blobs_left
    );
}
