//! Phase one, the part that touches the `config` crate: merging the layers and lowering the
//! merged tree into a [`RawConfig`].
//!
//! The `config` crate owns precedence (file under environment) and the environment-variable
//! syntax. It does not own typing: its deserializer converts freely between kinds (`build_slots
//! = "4"` or `= true` or `= 2.5` would all be accepted, the last one rounded), which would let a
//! mistake in the file pass unseen. So the merged tree is converted to JSON here and typed by
//! `serde_json`, strictly, one key at a time, so that every unknown key and every value of the
//! wrong type is reported at once with its path, not just the first one serde trips over.
//! Only values that came from environment variables, which are always text, are parsed from
//! text into the number or boolean the key expects.
//!
//! Nothing here reads the process environment or the file system: the caller hands in the file's
//! text and the environment as a map.

use std::collections::{BTreeMap, HashMap};

use config::{Environment, File, FileFormat, Map, Source, Value, ValueKind};
use serde_json::Value as Json;

use super::raw::RawConfig;
use crate::problems::Problems;

/// The prefix of every environment variable the daemon reads.
pub(super) const ENV_PREFIX: &str = "FACTORYD";
/// Between the prefix, the section and the key: `FACTORYD__WORKER__BUILD_SLOTS`. Two
/// underscores, because keys contain single ones.
pub(super) const ENV_SEPARATOR: &str = "__";
/// Keys whose environment value is a comma-separated list.
pub(super) const ENV_LIST_KEYS: [&str; 4] = [
    "nats.servers",
    "git.insecure_hosts",
    "registries.insecure",
    "registries.platforms",
];
const ENV_LIST_SEPARATOR: &str = ",";

/// Why the layers could not even be merged.
pub(super) enum MergeError {
    /// The file is not TOML; the message says where.
    Syntax(String),
    /// Anything else the `config` crate refused.
    Other(String),
}

/// The layers merged into one tree, plus what is needed to say where a value came from.
pub(super) struct Merged {
    tree: Map<String, Value>,
    /// Dotted key (`worker.build_slots`) to the environment variable that set it.
    env_vars: BTreeMap<String, String>,
    problems: Problems,
}

/// Merges the file's text (if any) under the `FACTORYD__…` variables of `env`.
///
/// Built-in defaults are not a `config` layer: they are applied by `#[serde(default)]` when the
/// merged tree is typed, for every key that no layer sets. The crate's own ways of seeding
/// defaults from a struct (`Config::try_from`, `set_default`) address keys by dotted path, so
/// the mirror key `"docker.io"` would be split in two, and empty lists would vanish.
pub(super) fn merge(
    file: Option<&str>,
    env: &HashMap<String, String>,
) -> Result<Merged, MergeError> {
    let mut problems = Problems::new();
    let mut env_vars = BTreeMap::new();
    let mut scalars = Map::new();
    let mut lists = Map::new();
    let mut cleared_lists = Vec::new();

    // Sorted, so that a key set twice (by `FACTORYD__X` and `factoryd__x`) is reported the same
    // way on every run.
    let mut names: Vec<&String> = env.keys().collect();
    names.sort();
    for name in names {
        let Some(key) = env_key(name) else { continue };
        let value = &env[name];
        if let Some(previous) = env_vars.insert(key.clone(), name.clone()) {
            problems.push(
                key.clone(),
                format!("set by both {previous} and {name}; keep only one"),
            );
            continue;
        }
        if ENV_LIST_KEYS.contains(&key.as_str()) {
            // Tolerate the spaces people put after commas, and empty entries from a trailing
            // comma; an empty value clears the list, which the `config` crate cannot express
            // (it would produce one empty entry).
            let items: Vec<&str> = value
                .split(ENV_LIST_SEPARATOR)
                .map(str::trim)
                .filter(|item| !item.is_empty())
                .collect();
            if items.is_empty() {
                cleared_lists.push(key);
            } else {
                lists.insert(name.clone(), items.join(ENV_LIST_SEPARATOR));
            }
        } else {
            scalars.insert(name.clone(), value.clone());
        }
    }

    let mut builder = config::Config::builder();
    if let Some(text) = file {
        builder = builder.add_source(File::from_str(text, FileFormat::Toml));
    }
    // Scalars go through a source *without* `try_parsing`: with it, the crate turns `1.10` into
    // the float 1.1 and `007` into 7 before we learn that the key wanted a string (a tag, a
    // worker name). Typing happens later, against the key's known type.
    builder = builder.add_source(environment().source(Some(scalars)));
    // Lists need `try_parsing`: the crate only splits on `list_separator` inside it. The keys
    // given to `with_list_parse_key` are compared with the lower-cased, dotted key.
    let mut list_source = environment()
        .try_parsing(true)
        .list_separator(ENV_LIST_SEPARATOR);
    for key in ENV_LIST_KEYS {
        list_source = list_source.with_list_parse_key(key);
    }
    builder = builder.add_source(list_source.source(Some(lists)));
    for key in cleared_lists {
        builder = builder
            .set_override(key, Vec::<String>::new())
            .map_err(|e| MergeError::Other(e.to_string()))?;
    }

    let built = builder.build().map_err(|e| match e {
        config::ConfigError::FileParse { cause, .. } => MergeError::Syntax(cause.to_string()),
        other => MergeError::Other(other.to_string()),
    })?;
    let tree = built
        .collect()
        .map_err(|e| MergeError::Other(e.to_string()))?;
    Ok(Merged {
        tree,
        env_vars,
        problems,
    })
}

/// An `Environment` reading only the map it is given (never the process environment), with the
/// daemon's prefix and separators.
fn environment() -> Environment {
    Environment::default()
        .prefix(ENV_PREFIX)
        .prefix_separator(ENV_SEPARATOR)
        .separator(ENV_SEPARATOR)
}

/// The dotted key an environment variable sets, computed the way `config::Environment` does
/// (lower-case the name, strip `factoryd__`, turn `__` into `.`), or `None` if it is not ours.
fn env_key(name: &str) -> Option<String> {
    let prefix = format!("{ENV_PREFIX}{ENV_SEPARATOR}").to_lowercase();
    name.to_lowercase()
        .strip_prefix(&prefix)
        .map(|rest| rest.replace(ENV_SEPARATOR, "."))
}

/// Types the merged tree. Returns the configuration built from every key that could be typed
/// (the rest keep their defaults, so that [`super::validate()`] can still report on everything
/// else) and a problem for each key that could not.
pub(super) fn decode(merged: Merged) -> (RawConfig, Problems) {
    let Merged {
        tree,
        env_vars,
        mut problems,
    } = merged;
    let schema = schema();
    let mut accepted = serde_json::Map::new();

    let mut sections: Vec<(String, Value)> = tree.into_iter().collect();
    sections.sort_by(|a, b| a.0.cmp(&b.0));
    for (section, value) in sections {
        let Some(known_keys) = schema.get(&section) else {
            let message = unknown("section", &section, schema.keys().map(String::as_str));
            problems.push(section.clone(), message + &set_by(&env_vars, &section));
            continue;
        };
        let fields = match value.kind {
            ValueKind::Table(fields) => fields,
            other => {
                problems.push(
                    section.clone(),
                    format!(
                        "expected a table of keys ([{section}]), got {}{}",
                        kind_name(&other),
                        set_by(&env_vars, &section)
                    ),
                );
                continue;
            }
        };

        let mut typed = serde_json::Map::new();
        let mut fields: Vec<(String, Value)> = fields.into_iter().collect();
        fields.sort_by(|a, b| a.0.cmp(&b.0));
        for (key, value) in fields {
            let path = format!("{section}.{key}");
            let Some(default) = known_keys.get(&key) else {
                let message = unknown("key", &key, known_keys.keys().map(String::as_str));
                problems.push(path.clone(), message + &set_by(&env_vars, &path));
                continue;
            };
            let mut json = to_json(value.kind);
            if env_vars.contains_key(&path) {
                json = parse_env_text(json, default);
            }
            // Typing one key at a time is what lets every bad key be reported, not only the
            // first one serde meets.
            let probe = Json::Object(serde_json::Map::from_iter([(
                section.clone(),
                Json::Object(serde_json::Map::from_iter([(key.clone(), json.clone())])),
            )]));
            match serde_json::from_value::<RawConfig>(probe) {
                Ok(_) => {
                    typed.insert(key, json);
                }
                Err(e) => problems.push(
                    path.clone(),
                    format!(
                        "{}{}",
                        plain_words(&e.to_string()),
                        set_by(&env_vars, &path)
                    ),
                ),
            }
        }
        accepted.insert(section, Json::Object(typed));
    }

    let raw = match serde_json::from_value::<RawConfig>(Json::Object(accepted)) {
        Ok(raw) => raw,
        // Unreachable while every key was typed on its own above; reported rather than
        // trusted, so a bug here cannot start the daemon on half a configuration.
        Err(e) => {
            problems.push("", format!("cannot assemble the configuration: {e}"));
            RawConfig::default()
        }
    };
    (raw, problems)
}

/// Every section and key `RawConfig` knows, with its default value (which tells the key's type).
/// Derived from the struct itself so that it cannot fall out of step with it.
pub(super) fn schema() -> BTreeMap<String, serde_json::Map<String, Json>> {
    let Ok(Json::Object(sections)) = serde_json::to_value(RawConfig::default()) else {
        return BTreeMap::new();
    };
    sections
        .into_iter()
        .filter_map(|(name, section)| match section {
            Json::Object(keys) => Some((name, keys)),
            _ => None,
        })
        .collect()
}

/// `config`'s value kinds to JSON, keeping the kind the file gave: no conversions.
fn to_json(kind: ValueKind) -> Json {
    match kind {
        ValueKind::Nil => Json::Null,
        ValueKind::Boolean(b) => Json::Bool(b),
        ValueKind::I64(i) => Json::from(i),
        ValueKind::U64(u) => Json::from(u),
        ValueKind::I128(i) => i64::try_from(i)
            .map(Json::from)
            .unwrap_or_else(|_| Json::String(i.to_string())),
        ValueKind::U128(u) => u64::try_from(u)
            .map(Json::from)
            .unwrap_or_else(|_| Json::String(u.to_string())),
        // TOML allows `nan` and `inf`, which JSON cannot hold; as text they still fail to type
        // as a number, with the value in the message.
        ValueKind::Float(f) => serde_json::Number::from_f64(f)
            .map(Json::Number)
            .unwrap_or_else(|| Json::String(f.to_string())),
        ValueKind::String(s) => Json::String(s),
        ValueKind::Array(items) => {
            Json::Array(items.into_iter().map(|item| to_json(item.kind)).collect())
        }
        ValueKind::Table(map) => Json::Object(
            map.into_iter()
                .map(|(key, value)| (key, to_json(value.kind)))
                .collect(),
        ),
    }
}

/// An environment variable is always text; give it the type the key expects when the text
/// reads as that type. Text that does not is left as text and fails typing with its value shown.
fn parse_env_text(value: Json, default: &Json) -> Json {
    let Json::String(text) = &value else {
        return value;
    };
    let trimmed = text.trim();
    match default {
        Json::Number(_) => trimmed.parse::<u64>().map(Json::from).unwrap_or(value),
        Json::Bool(_) => match trimmed.to_ascii_lowercase().as_str() {
            "true" => Json::Bool(true),
            "false" => Json::Bool(false),
            _ => value,
        },
        _ => value,
    }
}

/// serde's type names in the words of a TOML file.
fn plain_words(serde_message: &str) -> String {
    serde_message
        .replace(
            "expected u32",
            "expected a whole number from 0 to 4294967295",
        )
        .replace("expected u64", "expected a whole number")
        .replace("expected a sequence", "expected a list")
        .replace("expected a map", "expected a table")
}

fn kind_name(kind: &ValueKind) -> String {
    match kind {
        ValueKind::Nil => "nothing".to_owned(),
        ValueKind::Boolean(b) => format!("boolean `{b}`"),
        ValueKind::I64(i) => format!("integer `{i}`"),
        ValueKind::I128(i) => format!("integer `{i}`"),
        ValueKind::U64(u) => format!("integer `{u}`"),
        ValueKind::U128(u) => format!("integer `{u}`"),
        ValueKind::Float(f) => format!("floating point `{f}`"),
        ValueKind::String(s) => format!("string {s:?}"),
        ValueKind::Table(_) => "a table".to_owned(),
        ValueKind::Array(_) => "a list".to_owned(),
    }
}

/// ` (set by FACTORYD__…)` when environment variables set `path` or something under it, so an
/// operator does not search the file for a value that came from the unit's environment.
fn set_by(env_vars: &BTreeMap<String, String>, path: &str) -> String {
    let names: Vec<&str> = env_vars
        .iter()
        .filter(|(key, _)| {
            key.as_str() == path
                || key
                    .strip_prefix(path)
                    .is_some_and(|rest| rest.starts_with('.'))
        })
        .map(|(_, name)| name.as_str())
        .collect();
    if names.is_empty() {
        String::new()
    } else {
        format!(" (set by {})", names.join(", "))
    }
}

/// "unknown key, did you mean …? expected one of …".
fn unknown<'a>(what: &str, name: &str, known: impl Iterator<Item = &'a str> + Clone) -> String {
    let suggestion = known
        .clone()
        .map(|candidate| (edit_distance(name, candidate), candidate))
        .filter(|(distance, candidate)| *distance <= 2.max(candidate.len() / 4))
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, candidate)| format!(" (did you mean `{candidate}`?)"))
        .unwrap_or_default();
    let expected: Vec<&str> = known.collect();
    format!(
        "unknown {what}{suggestion}; expected one of: {}",
        expected.join(", ")
    )
}

/// Levenshtein distance, for typo suggestions on names of a few dozen bytes.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut current = Vec::with_capacity(b.len() + 1);
        current.push(i + 1);
        for (j, cb) in b.iter().enumerate() {
            let substitution = previous[j] + usize::from(ca != *cb);
            current.push(substitution.min(previous[j + 1] + 1).min(current[j] + 1));
        }
        previous = current;
    }
    previous[b.len()]
}
