//! Signals → shutdown. SIGTERM (systemd) or SIGINT (a terminal) starts the drain; a second
//! signal exits at once.

use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

/// Exit code when a second signal cuts the drain short.
pub const EXIT_INTERRUPTED: i32 = 130;

/// Returns a token that fires on the first SIGTERM or SIGINT. The second one ends the process.
pub fn on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let fire = token.clone();
    let (mut term, mut int) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(t), Ok(i)) => (t, i),
        _ => {
            error!("Cannot install signal handlers; shutdown by signal will not drain.");
            return token;
        }
    };
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => info!(signal = "SIGTERM", "Shutting down: no new jobs; draining running ones."),
            _ = int.recv() => info!(signal = "SIGINT", "Shutting down: no new jobs; draining running ones."),
        }
        fire.cancel();
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        warn!("Second signal: exiting at once.");
        std::process::exit(EXIT_INTERRUPTED);
    });
    token
}
