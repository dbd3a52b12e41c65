//! The retention policy (`[store]`): which images of the store to drop, and by which rule. Pure:
//! it reads a list of images and the time, and returns a plan, so every rule is a plain test.
//!
//! Rules, in order: keep the newest `keep_per_source` images of each source; drop images older
//! than `max_age`; then, while the blobs the kept images reach are over `max_bytes`, drop the
//! least recently stored image that is not the newest of its source. An image stored within
//! `min_age` is never dropped. When `max_bytes` cannot be met that way, the plan says by how
//! much.

use std::collections::HashMap;
use std::time::Duration;

/// The `[store]` retention settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Images kept per source (0: no limit).
    pub keep_per_source: u32,
    /// Images older than this are dropped (`None`: no age limit).
    pub max_age: Option<Duration>,
    /// Bytes the kept images may reach (0: no limit).
    pub max_bytes: u64,
    /// Images stored this recently are never dropped.
    pub min_age: Duration,
}

impl Policy {
    /// Drops nothing: a collection under it removes only what no tag reaches.
    pub const KEEP_ALL: Policy = Policy {
        keep_per_source: 0,
        max_age: None,
        max_bytes: 0,
        min_age: Duration::ZERO,
    };
}

/// Why an image was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rule {
    KeepPerSource,
    MaxAge,
    MaxBytes,
}

impl Rule {
    pub const ALL: [Rule; 3] = [Rule::KeepPerSource, Rule::MaxAge, Rule::MaxBytes];

    /// The rule's name, as the config key says it (and the metric label).
    pub fn as_str(self) -> &'static str {
        match self {
            Rule::KeepPerSource => "keep_per_source",
            Rule::MaxAge => "max_age",
            Rule::MaxBytes => "max_bytes",
        }
    }
}

/// One tagged image, as the policy sees it.
#[derive(Debug, Clone)]
pub struct Image<'a> {
    /// What groups images for `keep_per_source`: the source id.
    pub source: &'a str,
    /// When it was stored, in Unix milliseconds.
    pub stored_at_ms: u64,
    /// The blobs it reaches (digest, size), each once.
    pub blobs: &'a [(String, u64)],
}

/// What to drop: indexes into the images given, with the rule; and the bytes still over
/// `max_bytes` after every image that may go has gone.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    pub drop: Vec<(usize, Rule)>,
    pub over_max_bytes: Option<u64>,
}

/// Plans what `policy` drops from `images` at `now_ms`.
pub fn plan(images: &[Image<'_>], policy: &Policy, now_ms: u64) -> Plan {
    let min_age_ms = policy.min_age.as_millis() as u64;
    let protected = |i: usize| now_ms.saturating_sub(images[i].stored_at_ms) < min_age_ms;
    let mut dropped: Vec<Option<Rule>> = vec![None; images.len()];

    // Newest first within each source; ties by position (later in the index is newer).
    let mut by_source: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, image) in images.iter().enumerate() {
        by_source.entry(image.source).or_default().push(i);
    }
    let mut newest_of_source = vec![false; images.len()];
    for members in by_source.values_mut() {
        members.sort_by_key(|&i| std::cmp::Reverse((images[i].stored_at_ms, i)));
        newest_of_source[members[0]] = true;
        if policy.keep_per_source > 0 {
            for &i in members.iter().skip(policy.keep_per_source as usize) {
                if !protected(i) {
                    dropped[i] = Some(Rule::KeepPerSource);
                }
            }
        }
    }

    if let Some(max_age) = policy.max_age {
        let max_age_ms = max_age.as_millis() as u64;
        for (i, image) in images.iter().enumerate() {
            if dropped[i].is_none()
                && !protected(i)
                && now_ms.saturating_sub(image.stored_at_ms) > max_age_ms
            {
                dropped[i] = Some(Rule::MaxAge);
            }
        }
    }

    let mut over_max_bytes = None;
    if policy.max_bytes > 0 {
        // How many kept images reach each blob, and the bytes they reach together.
        let mut refs: HashMap<&str, (u32, u64)> = HashMap::new();
        for (i, image) in images.iter().enumerate() {
            if dropped[i].is_none() {
                for (digest, size) in image.blobs {
                    refs.entry(digest.as_str()).or_insert((0, *size)).0 += 1;
                }
            }
        }
        let mut total: u64 = refs.values().map(|(_, size)| size).sum();
        let mut oldest_first: Vec<usize> = (0..images.len())
            .filter(|&i| dropped[i].is_none() && !protected(i) && !newest_of_source[i])
            .collect();
        oldest_first.sort_by_key(|&i| (images[i].stored_at_ms, i));
        for i in oldest_first {
            if total <= policy.max_bytes {
                break;
            }
            dropped[i] = Some(Rule::MaxBytes);
            for (digest, _) in images[i].blobs {
                if let Some((count, size)) = refs.get_mut(digest.as_str()) {
                    *count -= 1;
                    if *count == 0 {
                        total -= *size;
                    }
                }
            }
        }
        if total > policy.max_bytes {
            over_max_bytes = Some(total - policy.max_bytes);
        }
    }

    Plan {
        drop: dropped
            .into_iter()
            .enumerate()
            .filter_map(|(i, rule)| rule.map(|r| (i, r)))
            .collect(),
        over_max_bytes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: u64 = 3_600_000;
    const NOW: u64 = 1_000 * HOUR;

    fn blobs(list: &[(&str, u64)]) -> Vec<(String, u64)> {
        list.iter().map(|(d, s)| (d.to_string(), *s)).collect()
    }

    fn policy() -> Policy {
        Policy::KEEP_ALL
    }

    /// A row: source, hours ago, blobs.
    type Row<'a> = (&'a str, u64, Vec<(String, u64)>);

    /// Rows → the plan's dropped indexes and rules.
    fn run(rows: &[Row<'_>], policy: &Policy) -> Plan {
        let images: Vec<Image> = rows
            .iter()
            .map(|(source, ago, blobs)| Image {
                source,
                stored_at_ms: NOW - ago * HOUR,
                blobs,
            })
            .collect();
        plan(&images, policy, NOW)
    }

    #[test]
    fn keeps_the_newest_per_source() {
        #[rustfmt::skip]
        let rows = [
            ("a", 5, blobs(&[("l1", 10)])),
            ("a", 1, blobs(&[("l2", 10)])),
            ("b", 9, blobs(&[("l3", 10)])),
            ("a", 3, blobs(&[("l4", 10)])),
            ("a", 7, blobs(&[("l5", 10)])),
        ];
        let p = Policy {
            keep_per_source: 2,
            ..policy()
        };
        assert_eq!(
            run(&rows, &p).drop,
            [(0, Rule::KeepPerSource), (4, Rule::KeepPerSource)]
        );
    }

    #[test]
    fn drops_by_age_but_never_what_is_younger_than_min_age() {
        #[rustfmt::skip]
        let rows = [
            ("a", 48, blobs(&[("l1", 10)])),
            ("a", 2, blobs(&[("l2", 10)])),
            ("b", 30, blobs(&[("l3", 10)])),
        ];
        let p = Policy {
            max_age: Some(Duration::from_secs(24 * 3600)),
            ..policy()
        };
        assert_eq!(run(&rows, &p).drop, [(0, Rule::MaxAge), (2, Rule::MaxAge)]);
        // min_age above every image's age protects all of them, from every rule.
        let p = Policy {
            min_age: Duration::from_secs(100 * 3600),
            keep_per_source: 1,
            ..p
        };
        assert_eq!(run(&rows, &p), Plan::default());
    }

    #[test]
    fn max_bytes_drops_the_least_recent_counting_shared_blobs_once() {
        // a1 and a2 share the 100-byte base: dropping a1 frees only its own 10 bytes.
        #[rustfmt::skip]
        let rows = [
            ("a", 9, blobs(&[("base", 100), ("a1", 10)])),
            ("b", 8, blobs(&[("base", 100), ("b1", 50)])),
            ("a", 7, blobs(&[("base", 100), ("a2", 10)])),
            ("b", 1, blobs(&[("base", 100), ("b2", 20)])),
        ];
        // Total 190; under 180 needs a1 (→ 180).
        let p = Policy {
            max_bytes: 180,
            ..policy()
        };
        assert_eq!(
            run(&rows, &p),
            Plan {
                drop: vec![(0, Rule::MaxBytes)],
                over_max_bytes: None
            }
        );
        // Under 140: a1, then b1 (→ 130).
        let p = Policy {
            max_bytes: 140,
            ..policy()
        };
        assert_eq!(
            run(&rows, &p).drop,
            [(0, Rule::MaxBytes), (1, Rule::MaxBytes)]
        );
    }

    #[test]
    fn the_newest_of_each_source_stays_and_the_shortfall_is_reported() {
        #[rustfmt::skip]
        let rows = [
            ("a", 9, blobs(&[("a1", 100)])),
            ("a", 1, blobs(&[("a2", 100)])),
            ("b", 5, blobs(&[("b1", 100)])),
        ];
        let p = Policy {
            max_bytes: 50,
            ..policy()
        };
        let plan = run(&rows, &p);
        assert_eq!(plan.drop, [(0, Rule::MaxBytes)]);
        assert_eq!(plan.over_max_bytes, Some(150));
    }

    #[test]
    fn an_image_dropped_by_one_rule_is_not_counted_again() {
        #[rustfmt::skip]
        let rows = [
            ("a", 50, blobs(&[("a1", 100)])),
            ("a", 40, blobs(&[("a2", 100)])),
            ("a", 1, blobs(&[("a3", 100)])),
        ];
        let p = Policy {
            keep_per_source: 2,
            max_age: Some(Duration::from_secs(45 * 3600)),
            max_bytes: 100,
            ..policy()
        };
        assert_eq!(
            run(&rows, &p).drop,
            [(0, Rule::KeepPerSource), (1, Rule::MaxBytes)]
        );
    }
}
