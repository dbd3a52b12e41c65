//! Redaction of text that may echo a credential: build logs, server messages, error text.
//!
//! A [`Redactor`] knows the job's secret values and replaces each — and its base64 and
//! URL-encoded forms, and the base64 of `username:secret` as sent in a Basic auth header — with
//! `***`. It cannot know secrets it was not given: adapters still must not put credentials in
//! messages; this is the second line.

use base64::engine::general_purpose::{STANDARD, URL_SAFE, URL_SAFE_NO_PAD};
use base64::Engine;

use super::Job;
use crate::secret::Secret;

pub const MASK: &str = "***";

/// Values shorter than this are not redacted: masking every "a" would destroy the text and
/// protect nothing.
const MIN_SECRET_LEN: usize = 4;

#[derive(Debug, Clone, Default)]
pub struct Redactor {
    /// Longest first, so that a value containing another is masked whole.
    needles: Vec<String>,
}

impl Redactor {
    /// A redactor for `secrets`; `usernames` are combined with each secret for Basic headers.
    pub fn new<'a>(
        secrets: impl IntoIterator<Item = &'a Secret>,
        usernames: impl IntoIterator<Item = &'a str>,
    ) -> Self {
        let usernames: Vec<&str> = usernames.into_iter().collect();
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
            for user in &usernames {
                needles.push(STANDARD.encode(format!("{user}:{value}")));
            }
        }
        needles.retain(|n| n.len() >= MIN_SECRET_LEN);
        needles.sort_by_key(|n| std::cmp::Reverse(n.len()));
        needles.dedup();
        Redactor { needles }
    }

    /// The redactor for every credential of `job`.
    pub fn for_job(job: &Job) -> Self {
        Redactor::new(job.secrets(), job.usernames())
    }

    pub fn redact(&self, text: &str) -> String {
        let mut out = text.to_owned();
        for needle in &self.needles {
            if out.contains(needle.as_str()) {
                out = out.replace(needle.as_str(), MASK);
            }
        }
        out
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
}
