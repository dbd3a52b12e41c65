//! A real Prometheus server (Debian's `prometheus` package) on a free loopback port, scraping
//! one target every second, with its query API for the tests.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use super::{free_port, require_program, ChildGuard};

pub struct Prometheus {
    pub port: u16,
    log: std::path::PathBuf,
    _guard: ChildGuard,
}

impl Prometheus {
    /// Starts Prometheus with its config and storage under `dir`, scraping `target` as job
    /// `factoryd` every second; returns once it answers `/-/ready`.
    pub async fn start(dir: &Path, target: SocketAddr) -> Prometheus {
        require_program("prometheus", "prometheus");
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n\
                 scrape_configs:\n  - job_name: factoryd\n    static_configs:\n      \
                 - targets: [\"{target}\"]\n"
            ),
        )
        .expect("write prometheus.yml");
        let port = free_port();
        let log = dir.join("prometheus.log");
        let log_file = std::fs::File::create(&log).expect("create the prometheus log");
        let mut cmd = Command::new("prometheus");
        cmd.arg(format!("--config.file={}", config.display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .stdout(log_file.try_clone().expect("clone the log file"))
            .stderr(log_file);
        let prometheus = Prometheus {
            port,
            log,
            _guard: ChildGuard::spawn("prometheus", &mut cmd),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = reqwest::get(prometheus.url("/-/ready")).await;
            if matches!(&ready, Ok(r) if r.status().is_success()) {
                return prometheus;
            }
            assert!(
                Instant::now() < deadline,
                "prometheus not ready after 30 s: {ready:?}\n{}",
                prometheus.log()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// The value of an instant query whose answer is a single sample; `None` while the query
    /// selects nothing (no scrape has brought the series yet).
    pub async fn value(&self, query: &str) -> Option<f64> {
        let mut url = url::Url::parse(&self.url("/api/v1/query")).expect("a query URL");
        url.query_pairs_mut().append_pair("query", query);
        let text = reqwest::get(url)
            .await
            .expect("query prometheus")
            .text()
            .await
            .expect("an answer from prometheus");
        let answer: serde_json::Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
        assert_eq!(answer["status"], "success", "{answer}");
        let result = answer["data"]["result"].as_array().expect("a vector");
        assert!(
            result.len() <= 1,
            "{query} selects several series: {answer}"
        );
        let sample = result.first()?;
        let text = sample["value"][1].as_str().expect("a sample value");
        Some(text.parse().expect("a number"))
    }

    /// Polls `query` until its value satisfies `want`, or panics after `timeout`.
    pub async fn wait_for(&self, query: &str, timeout: Duration, want: impl Fn(f64) -> bool) {
        let deadline = Instant::now() + timeout;
        loop {
            let value = self.value(query).await;
            if value.is_some_and(&want) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{query} is {value:?} after {timeout:?}\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}
