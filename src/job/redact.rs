//! Redaction of text that may echo a credential: build logs, server messages, error text.
//!
//! A [`Redactor`] knows the job's secret values and replaces each — and its base64 and
//! URL-encoded forms, and the base64 of `username:secret` as sent in a Basic auth header — with
//! `***`. It starts with the secrets the job carries ([`Redactor::for_job`]) and grows while the
//! job runs: credentials the worker learns on the job's behalf (a webhook's answer, an ECR
//! token, a bearer token, the node's own registry passwords) are [`Redactor::add`]ed the moment
//! they are known, through the one instance the job's stages share, so that the final result,
//! events and logs are masked with everything the job used. It cannot know secrets it was not
//! given: adapters still must not put credentials in messages; this is the second line.

use std::sync::{PoisonError, RwLock};

use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use base64::Engine;

use super::Job;
use crate::secret::Secret;

pub const MASK: &str = "***";

/// Values shorter than this are not redacted: masking every "a" would destroy the text and
/// protect nothing.
const MIN_SECRET_LEN: usize = 4;

/// Thread-safe: stages running in parallel (blob copies, log followers) add and redact through
/// a shared `Arc<Redactor>`.
#[derive(Default)]
pub struct Redactor {
    known: RwLock<Known>,
}

#[derive(Default)]
struct Known {
    secrets: Vec<Secret>,
    usernames: Vec<String>,
    /// Every masked form of every secret, longest first, so that a value containing another is
    /// masked whole.
    needles: Vec<String>,
}

impl Known {
    /// Adds what is new and rebuilds the needles. Rebuilding everything keeps one rule for
    /// every secret, whenever it came (a job holds a handful).
    fn add(&mut self, secret: Option<&Secret>, username: Option<&str>) {
        if self.insert(secret, username) {
            self.rebuild();
        }
    }

    /// Records what is new; true when something was.
    fn insert(&mut self, secret: Option<&Secret>, username: Option<&str>) -> bool {
        let mut changed = false;
        if let Some(secret) = secret.filter(|s| !self.secrets.contains(s)) {
            self.secrets.push(secret.clone());
            changed = true;
        }
        if let Some(user) = username.filter(|u| !self.usernames.iter().any(|k| k == u)) {
            self.usernames.push(user.to_owned());
            changed = true;
        }
        changed
    }

    fn rebuild(&mut self) {
        self.needles = needles(&self.secrets, &self.usernames);
    }
}

/// The masked forms of each secret: the value, its URL-encoded and base64 forms, each long line
/// of a multi-line value, and the base64 of `username:value` for every known user name.
fn needles(secrets: &[Secret], usernames: &[String]) -> Vec<String> {
    let mut needles = Vec::new();
    for secret in secrets {
        let value = secret.expose();
        if value.len() < MIN_SECRET_LEN {
            continue;
        }
        needles.push(value.to_owned());
        needles.push(url_encode(value));
        for engine in [&STANDARD, &URL_SAFE, &URL_SAFE_NO_PAD] {
            needles.push(engine.encode(value));
        }
        // Multi-line values (PEM keys): each long line alone too.
        needles.extend(
            value
                .lines()
                .map(str::trim)
                .filter(|l| l.len() >= 16 && !l.starts_with("-----"))
                .map(str::to_owned),
        );
        for user in usernames {
            // Padded as in a Basic header, and without the padding (a credentials webhook may
            // answer so, and some servers strip it when they echo a header).
            let pair = format!("{user}:{value}");
            needles.push(STANDARD.encode(&pair));
            needles.push(STANDARD_NO_PAD.encode(&pair));
        }
    }
    needles.retain(|n| n.len() >= MIN_SECRET_LEN);
    // Equal lengths ordered by value, so that `dedup` sees every duplicate.
    needles.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
    needles.dedup();
    needles
}

impl Redactor {
    /// A redactor for `secrets`; `usernames` are combined with each secret for Basic headers.
    pub fn new<'a>(
        secrets: impl IntoIterator<Item = &'a Secret>,
        usernames: impl IntoIterator<Item = &'a str>,
    ) -> Self {
        let mut known = Known::default();
        for secret in secrets {
            known.insert(Some(secret), None);
        }
        for user in usernames {
            known.insert(None, Some(user));
        }
        known.rebuild();
        Redactor {
            known: RwLock::new(known),
        }
    }

    /// The redactor for every credential of `job`; what the job's stages learn joins it later
    /// through [`Redactor::add`].
    pub fn for_job(job: &Job) -> Self {
        Redactor::new(job.secrets(), job.usernames())
    }

    /// Adds a credential learned while the job runs, in every form [`Redactor::new`] masks;
    /// `username` (the user it is sent with in a Basic header) joins the known user names.
    /// Call it before the credential is sent anywhere, so that no answer can echo it unmasked.
    pub fn add(&self, secret: &Secret, username: Option<&str>) {
        // A poisoned lock still holds a consistent list (it is replaced whole): keep masking.
        self.known
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .add(Some(secret), username);
    }

    pub fn redact(&self, text: &str) -> String {
        let known = self.known.read().unwrap_or_else(PoisonError::into_inner);
        let mut out = text.to_owned();
        for needle in &known.needles {
            if out.contains(needle.as_str()) {
                out = out.replace(needle.as_str(), MASK);
            }
        }
        out
    }
}

impl std::fmt::Debug for Redactor {
    /// Counts only: the needles are the secrets themselves.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let known = self.known.read().unwrap_or_else(PoisonError::into_inner);
        f.debug_struct("Redactor")
            .field("secrets", &known.secrets.len())
            .field("needles", &known.needles.len())
            .finish()
    }
}

fn url_encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_the_value_and_its_encoded_forms() {
        let s = Secret::new("p@ss w/rd+1");
        let r = Redactor::new([&s], ["bob"]);
        let basic = STANDARD.encode("bob:p@ss w/rd+1");
        let text = format!(
            "raw p@ss w/rd+1 url p%40ss%20w%2Frd%2B1 b64 {} auth Basic {basic}",
            STANDARD.encode("p@ss w/rd+1")
        );
        let out = r.redact(&text);
        assert!(!out.contains("p@ss"), "{out}");
        assert!(!out.contains("p%40ss"), "{out}");
        assert!(!out.contains(&basic), "{out}");
        assert_eq!(out.matches(MASK).count(), 4, "{out}");
    }

    #[test]
    fn short_values_are_left_alone() {
        let s = Secret::new("ab");
        assert_eq!(Redactor::new([&s], []).redact("abc"), "abc");
    }

    #[test]
    fn pem_key_lines_are_masked_one_by_one() {
        let key = Secret::new(
            "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n-----END OPENSSH PRIVATE KEY-----\n",
        );
        let out = Redactor::new([&key], []).redact("echo b3BlbnNzaC1rZXktdjEAAAAA");
        assert_eq!(out, "echo ***");
    }

    #[test]
    fn an_added_secret_is_masked_in_every_form_a_job_secret_is() {
        let job_secret = Secret::new("p@ss w/rd+1");
        let grown = Redactor::new([], []);
        grown.add(&job_secret, Some("bob"));
        let text = format!(
            "raw p@ss w/rd+1 url p%40ss%20w%2Frd%2B1 b64 {} {} {} auth Basic {}",
            STANDARD.encode("p@ss w/rd+1"),
            URL_SAFE.encode("p@ss w/rd+1"),
            URL_SAFE_NO_PAD.encode("p@ss w/rd+1"),
            STANDARD.encode("bob:p@ss w/rd+1"),
        );
        let from_the_start = Redactor::new([&job_secret], ["bob"]);
        assert_eq!(grown.redact(&text), from_the_start.redact(&text));
        assert_eq!(
            grown.redact(&text),
            "raw *** url *** b64 *** *** *** auth Basic ***"
        );
    }

    #[test]
    fn an_added_secret_is_combined_with_the_user_names_already_known() {
        let r = Redactor::new([], ["AWS"]);
        r.add(&Secret::new("ecr-password"), None);
        let header = STANDARD.encode("AWS:ecr-password");
        assert_eq!(r.redact(&format!("Basic {header}")), "Basic ***");
    }

    #[test]
    fn the_user_password_pair_is_masked_with_and_without_base64_padding() {
        // "AWS:ecr-password1" is 17 bytes: its base64 ends in "=" padding.
        let r = Redactor::new([&Secret::new("ecr-password1")], ["AWS"]);
        let padded = STANDARD.encode("AWS:ecr-password1");
        assert!(padded.ends_with('='), "{padded}");
        let unpadded = padded.trim_end_matches('=');
        assert_eq!(
            r.redact(&format!("a {padded} b {unpadded} c")),
            "a *** b *** c"
        );
    }

    #[test]
    fn a_secret_added_through_one_handle_is_masked_through_every_other() {
        let shared = std::sync::Arc::new(Redactor::new([&Secret::new("job-token-1")], ["bob"]));
        let stage_handle = std::sync::Arc::clone(&shared);
        assert_eq!(shared.redact("token tok-3f9a1"), "token tok-3f9a1");
        stage_handle.add(&Secret::new("tok-3f9a1"), None);
        assert_eq!(shared.redact("token tok-3f9a1"), "token ***");
    }

    #[test]
    fn added_short_values_are_left_alone() {
        let r = Redactor::default();
        r.add(&Secret::new("ab"), Some("u"));
        assert_eq!(r.redact("abc u:ab"), "abc u:ab");
    }

    #[test]
    fn secrets_added_from_many_threads_are_all_masked() {
        let r = std::sync::Arc::new(Redactor::default());
        let threads: Vec<_> = (0..8)
            .map(|i| {
                let r = std::sync::Arc::clone(&r);
                std::thread::spawn(move || {
                    r.add(&Secret::new(format!("secret-{i}-value")), Some("user"));
                    r.redact("text while others add")
                })
            })
            .collect();
        for t in threads {
            t.join().expect("thread");
        }
        for i in 0..8 {
            assert_eq!(r.redact(&format!("secret-{i}-value")), MASK);
        }
    }

    #[test]
    fn debug_shows_counts_not_secrets() {
        let r = Redactor::new([&Secret::new("hunter2-pass")], ["bob"]);
        let shown = format!("{r:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("secrets: 1"), "{shown}");
    }
}
