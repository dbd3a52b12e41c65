//! Readiness: whether this worker can take jobs, and of which kind, for whoever asks — the pull
//! loops (holds), `/readyz`, the systemd watchdog (pull loops going round) and the metrics.
//!
//! It exists from start-up, before NATS is reached or the worker is made, so the probes that
//! feed it (the build backend, free disk space) run from the first second and the worker finds
//! their holds in place when it starts pulling.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{watch, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::adapters::nats::ConnectionState;
use crate::job::Kind;
use crate::ports::Builder;
use crate::store::{CacheKeeper, StoreKeeper};
use crate::telemetry::metrics;

/// How often the build backend and the free disk space are probed.
const PROBE_EVERY: Duration = Duration::from_secs(10);

/// Why a worker takes no jobs of a kind for now ([`Readiness::hold`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum HoldCause {
    /// The build backend's probe fails.
    BuilderUnreachable,
    /// The work root (or the layout store) has less free space than `worker.min_free_mib`.
    LowDisk,
}

/// The causes that hold a kind, each with its explanation.
pub type Holds = BTreeMap<HoldCause, String>;

/// A pull loop's last round: its slots, when, and how long it may wait before it is stuck.
struct Beat {
    slots: Arc<Semaphore>,
    at: Instant,
    stuck_after: Duration,
}

pub struct Readiness {
    /// The NATS connection, once there is one to watch (`serve`); `None`: not checked.
    nats: Option<Arc<ConnectionState>>,
    draining: AtomicBool,
    work_root: PathBuf,
    /// The OCI layout store, when jobs are stored there: watched like the work root when it is
    /// on another file system.
    store: Option<PathBuf>,
    /// `worker.min_free_mib` in bytes; 0: no limit.
    min_free_bytes: u64,
    /// `worker.min_free_inodes`; 0: no limit.
    min_free_inodes: u64,
    /// Collects the layout store when space runs short, before intake is held.
    keeper: Option<Arc<StoreKeeper>>,
    /// Prunes the build cache then too.
    cache: Option<Arc<CacheKeeper>>,
    /// Why the build backend is not reachable, from the last probe; `None` when it is (or
    /// this worker does not build).
    builder_down: Mutex<Option<String>>,
    /// Per kind: why this worker takes no jobs of that kind now, by cause (empty: it takes
    /// them).
    holds: HashMap<Kind, watch::Sender<Holds>>,
    beats: Mutex<HashMap<Kind, Beat>>,
}

impl Readiness {
    pub fn new(work_root: PathBuf) -> Self {
        Readiness {
            nats: None,
            draining: AtomicBool::new(false),
            work_root,
            store: None,
            min_free_bytes: 0,
            min_free_inodes: 0,
            keeper: None,
            cache: None,
            builder_down: Mutex::new(None),
            holds: Kind::ALL
                .into_iter()
                .map(|kind| (kind, watch::Sender::new(Holds::new())))
                .collect(),
            beats: Mutex::new(HashMap::new()),
        }
    }

    /// With the NATS connection checked by `/readyz`.
    pub fn with_nats(mut self, nats: Arc<ConnectionState>) -> Self {
        self.nats = Some(nats);
        self
    }

    /// With the OCI layout store at `path` watched for free space too.
    pub fn with_store(mut self, path: PathBuf) -> Self {
        self.store = Some(path);
        self
    }

    /// With `worker.min_free_mib`, in bytes.
    pub fn with_min_free(mut self, bytes: u64) -> Self {
        self.min_free_bytes = bytes;
        self
    }

    /// With `worker.min_free_inodes`.
    pub fn with_min_free_inodes(mut self, inodes: u64) -> Self {
        self.min_free_inodes = inodes;
        self
    }

    /// With the layout store's keeper: collected before intake is held for low disk space, and
    /// its warnings shown by `/readyz`.
    pub fn with_keeper(mut self, keeper: Arc<StoreKeeper>) -> Self {
        self.keeper = Some(keeper);
        self
    }

    /// With the build cache's keeper: pruned before intake is held for low disk space.
    pub fn with_cache_keeper(mut self, cache: Option<Arc<CacheKeeper>>) -> Self {
        self.cache = cache;
        self
    }

    /// The worker is draining for shutdown: `/readyz` says so.
    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    // ---- holds -------------------------------------------------------------------------

    /// Stops taking jobs of `kind` for `cause` (`Some(why)`), or lifts that cause (`None`);
    /// the worker takes jobs of a kind again once no cause holds it. Jobs already running go
    /// on; jobs waiting in the queue stay there for other workers, so a node that cannot run
    /// them (its build backend unreachable, its disk full) does not spend their retries.
    pub fn hold(&self, kind: Kind, cause: HoldCause, why: Option<String>) {
        let Some(hold) = self.holds.get(&kind) else {
            return;
        };
        hold.send_if_modified(|holds| match why {
            Some(why) => holds.insert(cause, why.clone()).as_ref() != Some(&why),
            None => holds.remove(&cause).is_some(),
        });
        metrics()
            .jobs_held
            .with_label_values(&[kind.as_str()])
            .set(i64::from(self.is_held(kind)));
    }

    pub fn is_held(&self, kind: Kind) -> bool {
        self.holds
            .get(&kind)
            .is_some_and(|hold| !hold.borrow().is_empty())
    }

    /// The holds of `kind`, as they change.
    pub fn watch_holds(&self, kind: Kind) -> Option<watch::Receiver<Holds>> {
        self.holds.get(&kind).map(watch::Sender::subscribe)
    }

    // ---- liveness ----------------------------------------------------------------------

    /// A pull loop of `kind` went round; with its slots free it must go round again within
    /// `stuck_after`.
    pub fn beat(&self, kind: Kind, slots: &Arc<Semaphore>, stuck_after: Duration) {
        if let Ok(mut beats) = self.beats.lock() {
            let beat = Beat {
                slots: Arc::clone(slots),
                at: Instant::now(),
                stuck_after,
            };
            beats.insert(kind, beat);
        }
    }

    /// True while every pull loop goes round: one that has not come back for longer than it
    /// may wait, while it has a free slot, is stuck. A loop whose slots are all busy is waiting
    /// for its jobs, which is fine; before the first loop starts, the runtime answering is
    /// enough. Drives the systemd watchdog.
    pub fn alive(&self) -> bool {
        self.beats
            .lock()
            .map(|beats| {
                beats
                    .values()
                    .all(|b| b.slots.available_permits() == 0 || b.at.elapsed() <= b.stuck_after)
            })
            .unwrap_or(false)
    }

    // ---- probes ------------------------------------------------------------------------

    /// Probes the build backend now: holds builds while it is unreachable.
    pub async fn probe_builder(&self, builder: &dyn Builder) {
        let down = builder.ready().await.err();
        if let Ok(mut slot) = self.builder_down.lock() {
            if slot.is_some() != down.is_some() {
                match &down {
                    Some(why) => warn!(reason = %why, "Build backend unreachable."),
                    None => info!("Build backend reachable."),
                }
            }
            slot.clone_from(&down);
        }
        let why = down.map(|why| format!("build backend unreachable: {why}"));
        self.hold(Kind::Build, HoldCause::BuilderUnreachable, why);
    }

    /// Checks free space now: when the work root or the store is too full, collects the store
    /// first, and holds every kind only while that did not free enough.
    pub async fn probe_disk(&self) {
        let mut low = self.low_on_disk();
        if !low.is_empty() && (self.keeper.is_some() || self.cache.is_some()) {
            if let Some(keeper) = &self.keeper {
                keeper.collect("low disk space").await;
            }
            if let Some(cache) = &self.cache {
                cache.prune("low disk space").await;
            }
            low = self.low_on_disk();
        }
        let low = (!low.is_empty()).then(|| low.join("; "));
        for kind in Kind::ALL {
            self.hold(kind, HoldCause::LowDisk, low.clone());
        }
    }

    /// Runs the probes until `stop`: the disk at once and then every 10 s (when a minimum is
    /// set), the build backend in the background every 10 s (when this worker builds), so that
    /// `/readyz` answers at once.
    pub async fn start_probes(
        self: &Arc<Self>,
        builder: Option<Arc<dyn Builder>>,
        stop: CancellationToken,
    ) {
        if self.min_free_bytes > 0 || self.min_free_inodes > 0 {
            self.probe_disk().await;
            let me = Arc::clone(self);
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut ticks = tokio::time::interval(PROBE_EVERY);
                ticks.tick().await;
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = ticks.tick() => me.probe_disk().await,
                    }
                }
            });
        }
        if let Some(builder) = builder {
            let me = Arc::clone(self);
            tokio::spawn(async move {
                let mut ticks = tokio::time::interval(PROBE_EVERY);
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = ticks.tick() => me.probe_builder(builder.as_ref()).await,
                    }
                }
            });
        }
    }

    // ---- what /readyz and /metrics read -------------------------------------------------

    /// Free bytes on the work root's file system, when it can be read.
    pub fn work_root_free(&self) -> Option<u64> {
        free_space(&self.work_root).map(|s| s.bytes)
    }

    /// What `/readyz` mentions without being unready: the store over its size budget.
    pub fn warnings(&self) -> Vec<String> {
        self.keeper.iter().filter_map(|k| k.warning()).collect()
    }

    /// Why the work root, or the layout store on a file system of its own, is too full to take
    /// jobs; empty when neither is.
    pub fn low_on_disk(&self) -> Vec<String> {
        if self.min_free_bytes == 0 && self.min_free_inodes == 0 {
            return Vec::new();
        }
        let mut seen = Vec::new();
        let watched = [
            ("work root", Some(&self.work_root)),
            ("layout store", self.store.as_ref()),
        ];
        let mut reasons = Vec::new();
        for (what, path) in watched {
            let Some(path) = path else { continue };
            let Some(space) = free_space(path) else {
                continue;
            };
            if seen.contains(&space.fs) {
                continue;
            }
            seen.push(space.fs);
            if space.bytes < self.min_free_bytes {
                reasons.push(format!(
                    "{what} {} has {} MiB free, below worker.min_free_mib ({} MiB)",
                    path.display(),
                    space.bytes >> 20,
                    self.min_free_bytes >> 20
                ));
            }
            // A file system that keeps no inode count (f_files 0, e.g. btrfs) is not judged.
            if space.inodes_total > 0 && space.inodes < self.min_free_inodes {
                reasons.push(format!(
                    "{what} {} has {} free inodes, below worker.min_free_inodes ({})",
                    path.display(),
                    space.inodes,
                    self.min_free_inodes
                ));
            }
        }
        reasons
    }

    /// Every reason the worker is not ready; empty when ready.
    pub fn not_ready(&self) -> Vec<String> {
        let mut reasons = Vec::new();
        if self
            .nats
            .as_ref()
            .is_some_and(|n| !n.connected.load(Ordering::Relaxed))
        {
            reasons.push("not connected to NATS".to_owned());
        }
        if self.draining.load(Ordering::Relaxed) {
            reasons.push("draining for shutdown".to_owned());
        }
        if let Some(why) = self
            .builder_down
            .lock()
            .map(|b| b.clone())
            .unwrap_or_default()
        {
            reasons.push(format!("builder unreachable: {why}"));
        }
        if let Err(e) = probe_writable(&self.work_root) {
            reasons.push(format!(
                "work root {} not writable: {e}",
                self.work_root.display()
            ));
        }
        reasons.extend(self.low_on_disk());
        reasons
    }

    /// Refreshes the gauges that are read rather than counted.
    pub fn update_gauges(&self) {
        let m = metrics();
        if let Some(nats) = &self.nats {
            m.nats_connected
                .set(i64::from(nats.connected.load(Ordering::Relaxed)));
        }
        if let Some(free) = self.work_root_free() {
            m.work_root_free_bytes
                .set(i64::try_from(free).unwrap_or(i64::MAX));
        }
    }
}

/// Free space on a file system.
struct FreeSpace {
    bytes: u64,
    inodes: u64,
    inodes_total: u64,
    fs: u64,
}

/// Free bytes and inodes and the file system's id for `path`, or for its nearest existing
/// ancestor (the store directory is made by the first job that writes to it).
fn free_space(path: &std::path::Path) -> Option<FreeSpace> {
    let existing = path.ancestors().find(|p| p.exists())?;
    let stat = rustix::fs::statvfs(existing).ok()?;
    Some(FreeSpace {
        bytes: stat.f_bavail.saturating_mul(stat.f_frsize),
        inodes: stat.f_favail,
        inodes_total: stat.f_files,
        fs: stat.f_fsid,
    })
}

fn probe_writable(dir: &std::path::Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let probe = dir.join(format!(".readyz-{}", std::process::id()));
    std::fs::write(&probe, b"")?;
    std::fs::remove_file(&probe)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Unreachable;

    #[async_trait::async_trait]
    impl Builder for Unreachable {
        async fn build(
            &self,
            _: crate::ports::BuildRequest,
            _: &crate::ports::StageContext,
        ) -> Result<crate::job::ImageInfo, crate::error::JobError> {
            unreachable!("only probed")
        }

        async fn ready(&self) -> Result<(), String> {
            Err("no engine".to_owned())
        }
    }

    #[tokio::test]
    async fn readiness_names_each_reason() {
        let dir = tempfile::tempdir().unwrap();
        let nats = Arc::new(ConnectionState::default());
        let ready = Readiness::new(dir.path().to_owned()).with_nats(Arc::clone(&nats));
        assert_eq!(ready.not_ready(), ["not connected to NATS"]);
        nats.connected.store(true, Ordering::Relaxed);
        assert!(ready.not_ready().is_empty());

        ready.probe_builder(&Unreachable).await;
        assert_eq!(ready.not_ready(), ["builder unreachable: no engine"]);
        assert!(ready.is_held(Kind::Build) && !ready.is_held(Kind::Import));
        *ready.builder_down.lock().unwrap() = None;
        ready.set_draining();
        assert_eq!(ready.not_ready(), ["draining for shutdown"]);

        let free = ready.work_root_free().unwrap();
        assert!(
            free >= 1 << 20,
            "this machine's temp dir has over 1 MiB free"
        );
        let roomy = Readiness::new(dir.path().to_owned()).with_min_free(1 << 20);
        assert!(roomy.not_ready().is_empty());
        // A store on the same file system (here: not made yet, below the work root) is not
        // reported twice.
        let full = Readiness::new(dir.path().to_owned())
            .with_min_free(free + (1 << 40))
            .with_store(dir.path().join("store/not/made/yet"));
        let reasons = full.not_ready();
        assert_eq!(reasons.len(), 1, "{reasons:?}");
        assert!(
            reasons[0].starts_with(&format!("work root {} has ", dir.path().display()))
                && reasons[0].contains(" MiB free, below worker.min_free_mib ("),
            "{reasons:?}"
        );
        full.probe_disk().await;
        assert!(full.is_held(Kind::Build) && full.is_held(Kind::Import));
    }

    #[tokio::test(start_paused = true)]
    async fn a_loop_is_stuck_only_with_a_free_slot_and_no_round_for_too_long() {
        let ready = Readiness::new(std::env::temp_dir());
        assert!(ready.alive(), "no loop yet");
        let slots = Arc::new(Semaphore::new(1));
        ready.beat(Kind::Import, &slots, Duration::from_secs(60));
        tokio::time::advance(Duration::from_secs(61)).await;
        assert!(!ready.alive());
        let _busy = slots.acquire().await.unwrap();
        assert!(ready.alive(), "all slots busy: waiting for jobs");
    }
}
