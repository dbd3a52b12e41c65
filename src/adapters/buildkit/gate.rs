//! Keeps builds with different registry credentials from running at the same time on one
//! BuildKit.
//!
//! BuildKit merges identical steps of the builds it is running, and resolving and pulling a
//! base image is such a step: a build whose session has no credentials for a private base
//! gets the image when another build, whose session has them, is pulling it at that moment
//! (`builds::*concurrent_pull*` reproduces it on Debian's dockerd 20.10). So builds on one
//! BuildKit run together only when they carry exactly the same credentials (the same hosts,
//! users and passwords); others wait until those have finished. Builds with the same
//! credentials, for instance the common case of none but the node's own, still run in
//! parallel.
//!
//! The gate is per BuildKit address and process-wide: the hazard belongs to the daemon, not to
//! one builder value. Workers in other processes sharing the daemon are not covered (README:
//! one worker per engine where jobs of different owners build). Waiting is interruptible by
//! the job's cancellation. Turns go in order of arrival: a build does not join the running
//! set while a build with other credentials waits ahead of it, so a steady stream of builds
//! with one set of credentials cannot keep another set waiting for ever.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, OnceLock};

use sha2::{Digest as _, Sha256};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::error::{JobError, Stage};
use crate::job::BuildOptions;
use crate::ports::BasicAuth;

/// Which credentials a build carries, without holding them: a SHA-256 over the sorted
/// (host, user, password) triples, the build secrets (id, value) and the SSH key forwarded.
/// The shared build cache's credentials (`[builder.cache]`) do not count: they are the node's,
/// the same in every build this process runs, so they could never tell two builds apart.
/// Secrets and keys count because BuildKit merges a `RUN` step of two concurrent builds whose
/// inputs are the same, and a secret or SSH mount is not among those inputs: the merged step
/// would run with one build's secret for both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct CredentialSet([u8; 32]);

impl CredentialSet {
    pub(super) fn of(auth: &[(String, BasicAuth)], options: &BuildOptions) -> CredentialSet {
        let mut entries: Vec<(&str, &str, &str)> = auth
            .iter()
            .map(|(host, basic)| {
                (
                    host.as_str(),
                    basic.username.as_str(),
                    basic.password.expose(),
                )
            })
            .collect();
        entries.sort_unstable();
        entries.dedup();
        let mut hasher = Sha256::new();
        let mut part = |bytes: &str| {
            hasher.update((bytes.len() as u64).to_be_bytes());
            hasher.update(bytes.as_bytes());
        };
        for (host, user, password) in entries {
            for p in [host, user, password] {
                part(p);
            }
        }
        // Each kind after a marker no host name can be, so no two kinds are confused.
        part("\0secrets");
        for (id, value) in &options.secrets {
            part(id);
            part(value.expose());
        }
        if let Some(key) = &options.ssh {
            part("\0ssh");
            part(key.private_key.expose());
        }
        CredentialSet(hasher.finalize().into())
    }
}

/// Builds running on one BuildKit, all with the same credentials.
#[derive(Debug, Default)]
pub(super) struct Gate {
    state: Mutex<Running>,
    changed: Notify,
}

#[derive(Debug, Default)]
struct Running {
    credentials: Option<CredentialSet>,
    builds: usize,
    /// Builds waiting to enter, oldest first, by ticket.
    waiting: VecDeque<(u64, CredentialSet)>,
    next_ticket: u64,
}

/// A build let through the gate; leaving it (drop) may let waiting builds in.
pub(super) struct Pass {
    gate: Arc<Gate>,
}

impl Gate {
    /// The gate of the BuildKit at `address`, shared by every builder of this process.
    pub(super) fn for_address(address: &str) -> Arc<Gate> {
        static GATES: OnceLock<Mutex<HashMap<String, Arc<Gate>>>> = OnceLock::new();
        let gates = GATES.get_or_init(Mutex::default);
        let mut gates = gates
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        Arc::clone(gates.entry(address.to_owned()).or_default())
    }

    /// Waits until no build with other credentials runs or waits ahead of this one, then lets
    /// it in; gives up when `cancel` (the job's) fires.
    pub(super) async fn enter(
        self: &Arc<Self>,
        credentials: CredentialSet,
        cancel: &CancellationToken,
    ) -> Result<Pass, JobError> {
        let ticket = {
            let mut running = self.lock();
            let ticket = running.next_ticket;
            running.next_ticket += 1;
            running.waiting.push_back((ticket, credentials));
            ticket
        };
        // Leaves the queue however this future ends (admitted, cancelled or dropped).
        let mut queued = Queued {
            gate: self,
            ticket,
            admitted: false,
        };
        let mut said = false;
        loop {
            // Registered before the check, so a build leaving in between is not missed.
            let changed = self.changed.notified();
            if self.try_enter(ticket, credentials) {
                queued.admitted = true;
                return Ok(Pass {
                    gate: Arc::clone(self),
                });
            }
            if !said {
                tracing::info!(
                    "Waiting for builds with other registry credentials to finish on this BuildKit."
                );
                said = true;
            }
            tokio::select! {
                _ = changed => {}
                _ = cancel.cancelled() => return Err(JobError::cancelled(Stage::Build)),
            }
        }
    }

    /// Lets `ticket` in when the builds running carry its credentials (or none run) and no
    /// build with other credentials waits ahead of it.
    fn try_enter(&self, ticket: u64, credentials: CredentialSet) -> bool {
        let mut running = self.lock();
        let compatible = running.builds == 0 || running.credentials == Some(credentials);
        let overtakes = running
            .waiting
            .iter()
            .take_while(|(t, _)| *t != ticket)
            .any(|(_, other)| *other != credentials);
        if !compatible || overtakes {
            return false;
        }
        running.waiting.retain(|(t, _)| *t != ticket);
        running.credentials = Some(credentials);
        running.builds += 1;
        true
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Running> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// A build's place in the queue while it waits.
struct Queued<'a> {
    gate: &'a Gate,
    ticket: u64,
    admitted: bool,
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        if self.admitted {
            return;
        }
        self.gate.lock().waiting.retain(|(t, _)| *t != self.ticket);
        // Builds behind this one may be free to go now.
        self.gate.changed.notify_waiters();
    }
}

impl Drop for Pass {
    fn drop(&mut self) {
        {
            let mut running = self.gate.lock();
            running.builds = running.builds.saturating_sub(1);
            if running.builds == 0 {
                running.credentials = None;
            }
        }
        self.gate.changed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn none_else() -> BuildOptions {
        BuildOptions::default()
    }
    use crate::secret::Secret;

    fn auth(entries: &[(&str, &str, &str)]) -> Vec<(String, BasicAuth)> {
        entries
            .iter()
            .map(|(host, user, password)| {
                (
                    (*host).to_owned(),
                    BasicAuth {
                        username: (*user).to_owned(),
                        password: Secret::new(*password),
                    },
                )
            })
            .collect()
    }

    #[test]
    fn a_credential_set_ignores_order_and_tells_passwords_apart() {
        let a = auth(&[("r1", "u", "p"), ("r2", "v", "q")]);
        let b = auth(&[("r2", "v", "q"), ("r1", "u", "p")]);
        assert_eq!(
            CredentialSet::of(&a, &none_else()),
            CredentialSet::of(&b, &none_else())
        );
        let other_password = auth(&[("r1", "u", "p2"), ("r2", "v", "q")]);
        assert_ne!(
            CredentialSet::of(&a, &none_else()),
            CredentialSet::of(&other_password, &none_else())
        );
        assert_ne!(
            CredentialSet::of(&a, &none_else()),
            CredentialSet::of(&[], &none_else())
        );
        // No ambiguity from joining the parts.
        assert_ne!(
            CredentialSet::of(&auth(&[("ab", "c", "")]), &none_else()),
            CredentialSet::of(&auth(&[("a", "bc", "")]), &none_else())
        );
    }

    #[test]
    fn build_secrets_and_the_ssh_key_count_as_credentials() {
        let with = |secrets: &[(&str, &str)], key: Option<&str>| BuildOptions {
            secrets: secrets
                .iter()
                .map(|(id, v)| ((*id).to_owned(), Secret::new(*v)))
                .collect(),
            ssh: key.map(|k| crate::job::SshKey {
                private_key: Secret::new(k),
                passphrase: None,
            }),
            ..BuildOptions::default()
        };
        let of = |options: &BuildOptions| CredentialSet::of(&[], options);
        assert_eq!(
            of(&with(&[("a", "1")], None)),
            of(&with(&[("a", "1")], None))
        );
        assert_ne!(
            of(&with(&[("a", "1")], None)),
            of(&with(&[("a", "2")], None))
        );
        assert_ne!(
            of(&with(&[("a", "1")], None)),
            of(&with(&[("b", "1")], None))
        );
        assert_ne!(of(&with(&[], None)), of(&with(&[("a", "1")], None)));
        assert_ne!(of(&with(&[], Some("k1"))), of(&with(&[], Some("k2"))));
        assert_ne!(of(&with(&[], None)), of(&with(&[], Some("k1"))));
        // A registry whose name looks like the secrets' marker is still told apart.
        assert_ne!(
            CredentialSet::of(&auth(&[("\0secrets", "a", "1")]), &none_else()),
            of(&with(&[("a", "1")], None))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn builds_with_other_credentials_wait_and_same_ones_share() {
        let gate = Arc::new(Gate::default());
        let cancel = CancellationToken::new();
        let none = CredentialSet::of(&[], &none_else());
        let private = CredentialSet::of(&auth(&[("r", "u", "p")]), &none_else());

        let first = gate.enter(none, &cancel).await.unwrap();
        let second = gate.enter(none, &cancel).await.unwrap();
        let waiting = tokio::spawn({
            let gate = Arc::clone(&gate);
            let cancel = cancel.clone();
            async move { gate.enter(private, &cancel).await.map(|_pass| ()) }
        });
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        assert!(!waiting.is_finished(), "let in beside other credentials");
        drop(first);
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        assert!(!waiting.is_finished(), "let in while one build still runs");
        drop(second);
        waiting.await.unwrap().expect("let in once the others left");
    }

    /// Enters in a task of its own; the task holds the pass until `release` fires.
    fn spawn_build(
        gate: &Arc<Gate>,
        credentials: CredentialSet,
        cancel: &CancellationToken,
        release: &CancellationToken,
    ) -> tokio::task::JoinHandle<Result<(), JobError>> {
        let (gate, cancel, release) = (Arc::clone(gate), cancel.clone(), release.clone());
        tokio::spawn(async move {
            let _pass = gate.enter(credentials, &cancel).await?;
            release.cancelled().await;
            Ok(())
        })
    }

    async fn settle() {
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }

    /// Only the gate's own bookkeeping: how many builds are in.
    fn builds_in(gate: &Gate) -> usize {
        gate.lock().builds
    }

    #[tokio::test(start_paused = true)]
    async fn later_builds_with_the_running_credentials_do_not_overtake_a_waiting_build() {
        let gate = Arc::new(Gate::default());
        let never = CancellationToken::new();
        let none = CredentialSet::of(&[], &none_else());
        let private = CredentialSet::of(&auth(&[("r", "u", "p")]), &none_else());
        let (release_first, release_private, release_later) = (
            CancellationToken::new(),
            CancellationToken::new(),
            CancellationToken::new(),
        );

        let first = spawn_build(&gate, none, &never, &release_first);
        settle().await;
        assert_eq!(builds_in(&gate), 1);
        let private_build = spawn_build(&gate, private, &never, &release_private);
        settle().await;
        let later = spawn_build(&gate, none, &never, &release_later);
        settle().await;
        assert_eq!(
            builds_in(&gate),
            1,
            "a build with the running credentials overtook one waiting with others"
        );

        release_first.cancel();
        first.await.unwrap().unwrap();
        settle().await;
        assert_eq!(builds_in(&gate), 1, "the private build's turn, alone");
        assert_eq!(gate.lock().credentials, Some(private));

        release_private.cancel();
        private_build.await.unwrap().unwrap();
        settle().await;
        assert_eq!(gate.lock().credentials, Some(none), "then the later one");
        release_later.cancel();
        later.await.unwrap().unwrap();
        assert_eq!(builds_in(&gate), 0);
        assert!(gate.lock().waiting.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiting_build_that_is_cancelled_leaves_the_queue_and_lets_later_ones_in() {
        let gate = Arc::new(Gate::default());
        let never = CancellationToken::new();
        let none = CredentialSet::of(&[], &none_else());
        let private = CredentialSet::of(&auth(&[("r", "u", "p")]), &none_else());
        let (release_first, release_later) = (CancellationToken::new(), CancellationToken::new());
        let cancel_private = CancellationToken::new();

        let first = spawn_build(&gate, none, &never, &release_first);
        settle().await;
        let private_build = spawn_build(&gate, private, &cancel_private, &never);
        settle().await;
        let later = spawn_build(&gate, none, &never, &release_later);
        settle().await;
        assert_eq!(
            builds_in(&gate),
            1,
            "the later build queues behind the private one"
        );

        cancel_private.cancel();
        let e = private_build.await.unwrap().expect_err("cancelled");
        assert_eq!(e.class, crate::error::ErrorClass::Cancelled);
        settle().await;
        assert_eq!(builds_in(&gate), 2, "the later build joins the running one");

        release_first.cancel();
        release_later.cancel();
        first.await.unwrap().unwrap();
        later.await.unwrap().unwrap();
        assert!(gate.lock().waiting.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_wait_leaves_the_queue() {
        let gate = Arc::new(Gate::default());
        let never = CancellationToken::new();
        let running = gate
            .enter(CredentialSet::of(&[], &none_else()), &never)
            .await
            .unwrap();
        let waiting = spawn_build(
            &gate,
            CredentialSet::of(&auth(&[("r", "u", "p")]), &none_else()),
            &never,
            &never,
        );
        settle().await;
        assert_eq!(gate.lock().waiting.len(), 1);
        waiting.abort();
        let _ = waiting.await;
        assert!(gate.lock().waiting.is_empty());
        drop(running);
        assert_eq!(builds_in(&gate), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_job_stops_waiting() {
        let gate = Arc::new(Gate::default());
        let _running = gate
            .enter(
                CredentialSet::of(&auth(&[("r", "u", "p")]), &none_else()),
                &CancellationToken::new(),
            )
            .await
            .unwrap();
        let cancelled = CancellationToken::new();
        cancelled.cancel();
        let err = gate
            .enter(CredentialSet::of(&[], &none_else()), &cancelled)
            .await
            .err()
            .expect("cancelled while waiting");
        assert_eq!(err.class, crate::error::ErrorClass::Cancelled);
    }
}
