//! Registry authentication challenges (`WWW-Authenticate`) and the bearer-token cache.
//!
//! Pure parsing and bookkeeping; the token request itself is made by [`super::client`]. Tokens
//! are cached per scope string for their lifetime (less a margin), on tokio's clock so that
//! tests can pause it.

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;

use crate::secret::Secret;

/// Tokens are dropped this long before the lifetime the token service gave, so that a token
/// never expires on the way to the registry.
const EXPIRY_MARGIN: Duration = Duration::from_secs(10);
/// The lifetime assumed when the token service gives none (the distribution spec's default).
pub const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(60);

/// What a registry asked for in its `WWW-Authenticate` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
    },
}

/// Parses a `WWW-Authenticate` value: `Basic realm="x"` or
/// `Bearer realm="https://auth/token",service="registry",scope="repository:a/b:pull"`.
/// Returns `None` for schemes other than Basic and Bearer, or a Bearer without a realm.
pub fn parse_challenge(header: &str) -> Option<Challenge> {
    let header = header.trim();
    let (scheme, rest) = match header.split_once(char::is_whitespace) {
        Some((s, r)) => (s, r),
        None => (header, ""),
    };
    if scheme.eq_ignore_ascii_case("basic") {
        return Some(Challenge::Basic);
    }
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let params = parse_params(rest);
    let realm = params.get("realm")?.clone();
    Some(Challenge::Bearer {
        realm,
        service: params.get("service").cloned(),
    })
}

/// `key="value", key=value` pairs; quoted values may contain commas and escaped quotes.
fn parse_params(text: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c == ',' {
                break;
            }
            key.push(c);
            chars.next();
        }
        if key.is_empty() {
            break;
        }
        let mut value = String::new();
        if chars.peek() == Some(&'=') {
            chars.next();
            if chars.peek() == Some(&'"') {
                chars.next();
                while let Some(c) = chars.next() {
                    match c {
                        '\\' => {
                            if let Some(escaped) = chars.next() {
                                value.push(escaped);
                            }
                        }
                        '"' => break,
                        c => value.push(c),
                    }
                }
            } else {
                while let Some(&c) = chars.peek() {
                    if c == ',' {
                        break;
                    }
                    value.push(c);
                    chars.next();
                }
            }
        }
        out.insert(key.trim().to_ascii_lowercase(), value.trim().to_owned());
    }
    out
}

/// Most tokens one cache keeps: a long-lived client (the node's destination registry) sees one
/// scope per repository it pushes to, and a fleet has many sources.
const MAX_TOKENS: usize = 256;

/// Bearer tokens by scope string, at most [`MAX_TOKENS`]: expired ones go first, then the one
/// that expires soonest.
#[derive(Debug, Default)]
pub struct TokenCache {
    tokens: HashMap<String, (Secret, Instant)>,
}

impl TokenCache {
    pub fn get(&self, scope: &str) -> Option<&Secret> {
        self.tokens
            .get(scope)
            .filter(|(_, until)| Instant::now() < *until)
            .map(|(token, _)| token)
    }

    /// Keeps `token` for `lifetime` less the margin; a token that would expire within the
    /// margin is not kept at all (it is still used for the request at hand).
    pub fn insert(&mut self, scope: &str, token: Secret, lifetime: Duration) {
        if let Some(keep) = lifetime.checked_sub(EXPIRY_MARGIN).filter(|d| !d.is_zero()) {
            let now = Instant::now();
            if self.tokens.len() >= MAX_TOKENS && !self.tokens.contains_key(scope) {
                self.tokens.retain(|_, (_, until)| now < *until);
                if self.tokens.len() >= MAX_TOKENS {
                    let soonest = self
                        .tokens
                        .iter()
                        .min_by_key(|(_, (_, until))| *until)
                        .map(|(scope, _)| scope.clone());
                    if let Some(soonest) = soonest {
                        self.tokens.remove(&soonest);
                    }
                }
            }
            self.tokens.insert(scope.to_owned(), (token, now + keep));
        }
    }

    pub fn remove(&mut self, scope: &str) {
        self.tokens.remove(scope);
    }

    pub fn clear(&mut self) {
        self.tokens.clear();
    }
}

/// The `expires_in` of a token response, in seconds, with the spec's default and a floor.
pub fn token_lifetime(expires_in: Option<u64>) -> Duration {
    match expires_in {
        Some(secs) if secs > 0 => Duration::from_secs(secs.min(24 * 3600)),
        _ => DEFAULT_TOKEN_LIFETIME,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_challenge_with_quoted_commas() {
        let c = parse_challenge(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/a:pull,push""#,
        );
        assert_eq!(
            c,
            Some(Challenge::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into()),
            })
        );
    }

    #[test]
    fn basic_and_unknown_schemes() {
        assert_eq!(
            parse_challenge(r#"Basic realm="Registry""#),
            Some(Challenge::Basic)
        );
        assert_eq!(parse_challenge("Negotiate abc"), None);
        assert_eq!(parse_challenge(r#"Bearer service="x""#), None, "no realm");
    }

    #[tokio::test(start_paused = true)]
    async fn tokens_expire_before_their_lifetime() {
        let mut cache = TokenCache::default();
        cache.insert("s", Secret::new("t"), Duration::from_secs(60));
        assert!(cache.get("s").is_some());
        tokio::time::advance(Duration::from_secs(49)).await;
        assert!(cache.get("s").is_some());
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(cache.get("s").is_none());
        cache.insert("short", Secret::new("t"), Duration::from_secs(5));
        assert!(cache.get("short").is_none(), "too short to keep");
    }

    #[tokio::test(start_paused = true)]
    async fn the_cache_keeps_at_most_its_bound_dropping_expired_then_soonest_to_expire() {
        let mut cache = TokenCache::default();
        cache.insert("old", Secret::new("t"), Duration::from_secs(60));
        tokio::time::advance(Duration::from_secs(61)).await;
        for i in 1..MAX_TOKENS {
            cache.insert(
                &format!("s{i}"),
                Secret::new("t"),
                Duration::from_secs(600 + i as u64),
            );
        }
        assert_eq!(cache.tokens.len(), MAX_TOKENS);
        cache.insert("new1", Secret::new("t"), Duration::from_secs(3600));
        assert_eq!(cache.tokens.len(), MAX_TOKENS, "the expired one went");
        assert!(!cache.tokens.contains_key("old"));
        cache.insert("new2", Secret::new("t"), Duration::from_secs(3600));
        assert_eq!(cache.tokens.len(), MAX_TOKENS);
        assert!(cache.get("s1").is_none(), "the soonest to expire went");
        assert!(cache.get("s2").is_some() && cache.get("new1").is_some());
        // Replacing a scope's token evicts nothing.
        cache.insert("s2", Secret::new("t2"), Duration::from_secs(3600));
        assert_eq!(cache.tokens.len(), MAX_TOKENS);
        assert!(cache.get("s3").is_some());
    }
}
