//! What the source tests share: a worker configuration for loopback servers, a job's stage
//! context over a real workspace, an event recorder, and docker-file origins decoded from JSON
//! exactly as jobs arrive.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use factoryd::config::Config;
use factoryd::error::JobError;
use factoryd::job::{DockerFile, JobEvent, Origin, Redactor};
use factoryd::ports::{EventSink, FetchedSource, Fetcher, StageContext};
use factoryd::workspace::Workspace;
use tokio_util::sync::CancellationToken;

/// Config for tests: loopback allowed, `extra` TOML appended (e.g. `[git]` keys).
pub fn config(extra: &str) -> Config {
    let text = format!("[egress]\nallow_loopback = true\n{extra}");
    factoryd::config::from_toml_str(&text, &HashMap::new()).expect("test config")
}

/// Records events; optionally cancels a token at the first `Progress` event.
#[derive(Default)]
pub struct Recorder {
    pub events: Mutex<Vec<JobEvent>>,
    pub cancel_on_progress: Option<CancellationToken>,
}

impl EventSink for Recorder {
    fn emit(&self, event: JobEvent) {
        if let (JobEvent::Progress { .. }, Some(token)) = (&event, &self.cancel_on_progress) {
            token.cancel();
        }
        self.events.lock().unwrap().push(event);
    }
}

impl Recorder {
    pub fn warnings(&self) -> Vec<(String, String)> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .filter_map(|e| match e {
                JobEvent::Warning { code, message } => Some((code.clone(), message.clone())),
                _ => None,
            })
            .collect()
    }
}

/// Fetches the docker-file origin `details` with `fetcher` in a new workspace `name` under
/// `work_root`, recording its events; the fetch stops when `cancel` fires.
pub async fn fetch_details(
    fetcher: &dyn Fetcher,
    work_root: &Path,
    name: &str,
    details: serde_json::Value,
    cancel: CancellationToken,
) -> (Result<FetchedSource, JobError>, Arc<Recorder>, Workspace) {
    let origin = docker_file(details);
    let workspace = Workspace::create(work_root, name).unwrap();
    let recorder = Arc::new(Recorder::default());
    let cx = stage_context(&workspace, &origin, Arc::clone(&recorder), cancel);
    let result = fetcher.fetch(&origin, &cx).await;
    (result, recorder, workspace)
}

/// The whole context stream of `source`.
pub fn context_bytes(source: &FetchedSource) -> Vec<u8> {
    let mut out = Vec::new();
    source.context.write_tar(&mut out).unwrap();
    out
}

/// A job attempt's context over `workspace`, with the job's redactor.
pub fn stage_context(
    workspace: &Workspace,
    origin: &DockerFile,
    recorder: Arc<Recorder>,
    cancel: CancellationToken,
) -> StageContext {
    let mut secrets = Vec::new();
    let mut users = Vec::new();
    if let factoryd::job::BuildSource::Repo(repo) = &origin.source {
        match &repo.auth {
            Some(factoryd::job::GitAuth::Http { username, password }) => {
                secrets.push(password.clone());
                users.push(username.clone());
            }
            Some(factoryd::job::GitAuth::Ssh {
                private_key,
                passphrase,
                ..
            }) => {
                secrets.push(private_key.clone());
                secrets.extend(passphrase.clone());
            }
            None => {}
        }
    }
    StageContext {
        job_id: "job-test".to_owned(),
        attempt: 1,
        cancel,
        events: recorder,
        redactor: Arc::new(Redactor::new(
            secrets.iter(),
            users.iter().map(String::as_str),
        )),
        workspace: workspace.path().to_path_buf(),
    }
}

/// A docker-file origin from its `details` JSON, decoded as a job would be.
pub fn docker_file(details: serde_json::Value) -> DockerFile {
    let job = serde_json::json!({
        "v": 1, "id": "job-test", "source_id": "src-test",
        "origin": { "type": "docker-file", "details": details },
    });
    let job = factoryd::job::decode(job.to_string().as_bytes())
        .unwrap_or_else(|p| panic!("test job does not decode: {p}"));
    match job.origin {
        Origin::DockerFile(d) => d,
        _ => unreachable!(),
    }
}

/// The entries of a tar stream: (path, mode, kind byte, link target, contents).
pub type TarEntry = (String, u32, u8, Option<String>, Vec<u8>);

pub fn tar_entries(bytes: &[u8]) -> Vec<TarEntry> {
    use std::io::Read;
    let mut archive = tar::Archive::new(bytes);
    let mut out = Vec::new();
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let kind = entry.header().entry_type();
        if kind == tar::EntryType::XGlobalHeader {
            continue;
        }
        let path = String::from_utf8_lossy(&entry.path_bytes())
            .trim_end_matches('/')
            .to_owned();
        let mode = entry.header().mode().unwrap();
        let link = entry
            .link_name_bytes()
            .map(|l| String::from_utf8_lossy(&l).into_owned());
        let mut content = Vec::new();
        entry.read_to_end(&mut content).unwrap();
        out.push((path, mode, kind.as_byte(), link, content));
    }
    out
}

/// Every path below `dir`, relative, sorted (to assert that nothing else was written).
pub fn tree_listing(dir: &Path) -> Vec<String> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                let p = e.path();
                out.push(p.strip_prefix(base).unwrap().display().to_string());
                if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    walk(base, &p, out);
                }
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// A tar.gz of `files` (name, text), regular files with mode 0644 and a fixed mtime.
pub fn targz(files: &[(&str, &str)]) -> Vec<u8> {
    targz_with_links(files, &[])
}

/// [`targz`], then `links` (name, target) as symlinks.
pub fn targz_with_links(files: &[(&str, &str)], links: &[(&str, &str)]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (name, body) in files {
        let mut header = tar::Header::new_gnu();
        header.set_size(body.len() as u64);
        header.set_mode(0o644);
        header.set_mtime(1_700_000_000);
        header.set_cksum();
        builder
            .append_data(&mut header, name, body.as_bytes())
            .unwrap();
    }
    for (name, target) in links {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Symlink);
        header.set_size(0);
        header.set_mode(0o777);
        header.set_mtime(1_700_000_000);
        builder.append_link(&mut header, name, target).unwrap();
    }
    let tar = builder.into_inner().unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, &tar).unwrap();
    gz.finish().unwrap()
}
