//! `factoryd store`: list, remove and collect the images of a config's `oci-layout` store,
//! beside a running `serve` if need be (the collection lock orders them).

use std::collections::HashMap;
use std::process::ExitCode;

use super::{load_config, EXIT_INVALID, EXIT_JOB_FAILED, EXIT_NO_INPUT};
use crate::cli::{StoreArgs, StoreCommand};
use crate::clock::Clock;
use crate::config::DestinationKind;
use crate::store::{self, Collection, CollectionReport, Policy};

/// `factoryd store`.
pub fn store(args: &StoreArgs, env: &HashMap<String, String>) -> ExitCode {
    let config = match load_config(args.config.as_deref(), env) {
        Ok(c) => c,
        Err(code) => return code,
    };
    if config.destination.kind != DestinationKind::OciLayout {
        eprintln!(
            "store: destination.kind is \"registry\": the registry's own garbage collector looks \
             after what is pushed there; factoryd collects only an oci-layout store"
        );
        return ExitCode::from(EXIT_INVALID);
    }
    let root = config.destination.path.clone();
    if !root.join("index.json").exists() {
        eprintln!(
            "store: {} is not an OCI image layout (no index.json); no job has stored an image \
             there yet?",
            root.display()
        );
        return ExitCode::from(EXIT_NO_INPUT);
    }
    let failed = |e: crate::adapters::oci_layout::StoreError| {
        eprintln!("store: {e}");
        ExitCode::from(EXIT_NO_INPUT)
    };
    let now_ms = crate::clock::SystemClock.now_ms();
    match &args.command {
        StoreCommand::Ls { json } => {
            let images = match store::list(&root) {
                Ok(i) => i,
                Err(e) => return failed(e),
            };
            for image in &images {
                if *json {
                    println!("{}", serde_json::to_string(image).unwrap_or_default());
                } else {
                    let stored = image
                        .stored_at
                        .format(&time::format_description::well_known::Rfc3339)
                        .unwrap_or_default();
                    println!(
                        "{}\t{}\t{}\t{}\t{}{}",
                        image.reference,
                        image.source_id.as_deref().unwrap_or("-"),
                        image.digest,
                        image.size_bytes,
                        stored,
                        if image.missing.is_empty() {
                            String::new()
                        } else {
                            format!("\tMISSING {} blob(s)", image.missing.len())
                        }
                    );
                }
            }
            if !*json {
                eprintln!("{} image(s) in {}", images.len(), root.display());
            }
            ExitCode::SUCCESS
        }
        StoreCommand::Rm { references } => {
            let missing = match store::remove(&root, references) {
                Ok(m) => m,
                Err(e) => return failed(e),
            };
            for reference in &missing {
                eprintln!("store: no image {reference:?} in {}", root.display());
            }
            // Only what the removed images alone reached goes; no retention rule applies.
            let report = match collect(&root, Policy::KEEP_ALL, false, now_ms) {
                Ok(r) => r,
                Err(e) => return failed(e),
            };
            eprintln!(
                "removed {} image(s); {}",
                references.len() - missing.len(),
                summary(&report)
            );
            if missing.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(EXIT_JOB_FAILED)
            }
        }
        StoreCommand::Gc { dry_run } => {
            let report = match collect(&root, config.store.retention, *dry_run, now_ms) {
                Ok(r) => r,
                Err(e) => return failed(e),
            };
            for dropped in &report.dropped {
                let verb = if *dry_run { "would drop" } else { "dropped" };
                println!(
                    "{verb}\t{}\t{}\t{}",
                    dropped.reference, dropped.digest, dropped.rule
                );
            }
            eprintln!("{}", summary(&report));
            if let Some(over) = report.over_max_bytes {
                eprintln!(
                    "store: still {over} bytes over store.max_bytes: only images the policy \
                     keeps (the newest of each source, or younger than store.min_age_secs) are \
                     left"
                );
            }
            ExitCode::SUCCESS
        }
    }
}

fn collect(
    root: &std::path::Path,
    policy: Policy,
    dry_run: bool,
    now_ms: u64,
) -> Result<CollectionReport, crate::adapters::oci_layout::StoreError> {
    if store::collection_running(root) {
        eprintln!(
            "store: another collection of {} is running; waiting for it to end",
            root.display()
        );
    }
    store::collect(root, Collection { policy, dry_run }, now_ms)
}

fn summary(r: &CollectionReport) -> String {
    let verb = if r.dry_run { "would remove" } else { "removed" };
    format!(
        "{verb} {} blob(s) and {} temporary file(s), {} bytes; {} image(s) kept, {} blob(s) of \
         {} bytes left",
        r.blobs_removed, r.temp_files_removed, r.bytes_freed, r.kept, r.blobs_left, r.bytes_left
    )
}
