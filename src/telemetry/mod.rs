//! Telemetry: logging set-up, the Prometheus registry and its HTTP endpoints, and systemd
//! notifications.
//!
//! Logs go to stderr, so that commands which print a result (`validate`, `run`) keep stdout
//! for it. The format is human text on a terminal and JSON otherwise when `auto`.

pub mod http;
pub mod metrics;
pub mod systemd;

use std::io::IsTerminal;

pub use metrics::metrics;

use tracing_subscriber::EnvFilter;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogStyle {
    Auto,
    Text,
    Json,
}

/// Whether log lines are JSON: as the style says, and for `Auto` human text only on a terminal.
fn writes_json(style: LogStyle, stderr_is_terminal: bool) -> bool {
    match style {
        LogStyle::Json => true,
        LogStyle::Text => false,
        LogStyle::Auto => !stderr_is_terminal,
    }
}

/// Installs the global subscriber. `level` is an `EnvFilter` directive (`info`, `factoryd=debug`).
pub fn init(style: LogStyle, level: &str) {
    let filter = EnvFilter::try_new(level).unwrap_or_else(|_| EnvFilter::new("info"));
    let terminal = std::io::stderr().is_terminal();
    let json = writes_json(style, terminal);
    // Colours only for a terminal: a file or pipe gets plain text that grep can read.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(terminal)
        .with_writer(std::io::stderr);
    // A second init (tests) keeps the first subscriber.
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_style_is_text_on_a_terminal_and_json_elsewhere() {
        assert!(!writes_json(LogStyle::Auto, true));
        assert!(writes_json(LogStyle::Auto, false));
    }

    #[test]
    fn explicit_styles_ignore_the_terminal() {
        assert!(writes_json(LogStyle::Json, true));
        assert!(!writes_json(LogStyle::Text, false));
    }
}
