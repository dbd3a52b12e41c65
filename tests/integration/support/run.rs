//! `factoryd run` of one job as an operator runs it: the config and the job written to files,
//! the real binary started on them, and what it printed.

use std::path::Path;
use std::process::{Command, Output};

/// `factoryd run` of `job` under `root`, ready for more arguments and environment:
/// `root/factoryd.toml` puts the work root at `root/work` and an OCI layout destination at
/// `root/store`, allows loopback egress, and ends with `extra` TOML; the job is
/// `root/job.json`.
pub fn factoryd_run(root: &Path, job: &serde_json::Value, extra: &str) -> Command {
    let config = root.join("factoryd.toml");
    std::fs::write(
        &config,
        format!(
            "[worker]\nwork_root = \"{}\"\n[destination]\nkind = \"oci-layout\"\npath = \"{}\"\n\
             [egress]\nallow_loopback = true\n{extra}",
            root.join("work").display(),
            root.join("store").display()
        ),
    )
    .unwrap();
    let job_file = root.join("job.json");
    std::fs::write(&job_file, job.to_string()).unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_factoryd"));
    command
        .arg("run")
        .arg(&job_file)
        .arg("--config")
        .arg(&config);
    command
}

/// What a finished `factoryd run` said: its exit code, stdout and stderr (as text).
pub struct Ran {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Ran {
    pub fn of(output: &Output) -> Ran {
        Ran {
            code: output.status.code(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    /// The result JSON it printed on stdout.
    pub fn result(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout).expect("result JSON on stdout")
    }
}

/// The JSON of a v1 docker-file job `id` of the image source `source_id`, its origin's
/// `details` as given; add `build`, `destination` or `timeout_secs` to it as a test needs.
pub fn docker_file_job(id: &str, source_id: &str, details: serde_json::Value) -> serde_json::Value {
    serde_json::json!({
        "v": 1, "id": id, "source_id": source_id,
        "origin": {"type": "docker-file", "details": details}
    })
}

/// `factoryd store ARGS --config CONFIG`, finished.
pub fn factoryd_store(config: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_factoryd"))
        .arg("store")
        .args(args)
        .arg("--config")
        .arg(config)
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .output()
        .expect("spawn factoryd store")
}

/// The images `factoryd store ls --json` lists for the store of `config`.
pub fn store_ls(config: &Path) -> Vec<serde_json::Value> {
    let out = factoryd_store(config, &["ls", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object a line"))
        .collect()
}
