//! The systemd notification protocol (`Type=notify`): READY, STOPPING and WATCHDOG pings,
//! sent as datagrams to `$NOTIFY_SOCKET`. Without that variable (not under systemd) every call
//! does nothing.

use std::collections::HashMap;
use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use tracing::debug;

#[derive(Debug, Clone, Default)]
pub struct Notifier {
    socket: Option<String>,
    watchdog: Option<Duration>,
}

impl Notifier {
    /// Reads `NOTIFY_SOCKET` and `WATCHDOG_USEC` from the injected environment.
    pub fn from_env(env: &HashMap<String, String>) -> Self {
        Notifier {
            socket: env.get("NOTIFY_SOCKET").filter(|s| !s.is_empty()).cloned(),
            watchdog: env
                .get("WATCHDOG_USEC")
                .and_then(|v| v.parse::<u64>().ok())
                .map(Duration::from_micros),
        }
    }

    /// How often to ping the watchdog: half its timeout, as systemd recommends.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog.map(|d| d / 2)
    }

    pub fn notify(&self, state: &str) {
        let Some(path) = &self.socket else {
            return;
        };
        let result = UnixDatagram::unbound().and_then(|sock| {
            if let Some(name) = path.strip_prefix('@') {
                use std::os::linux::net::SocketAddrExt;
                let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
                sock.send_to_addr(state.as_bytes(), &addr)
            } else {
                sock.send_to(state.as_bytes(), path)
            }
        });
        if let Err(e) = result {
            debug!(error = %e, state, "Cannot notify systemd.");
        }
    }

    pub fn ready(&self) {
        self.notify("READY=1\nSTATUS=pulling jobs");
    }

    pub fn stopping(&self) {
        self.notify("STOPPING=1\nSTATUS=draining");
    }

    pub fn watchdog(&self) {
        self.notify("WATCHDOG=1");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_states_to_the_notify_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let listener = UnixDatagram::bind(&path).unwrap();
        let env = HashMap::from([
            ("NOTIFY_SOCKET".to_owned(), path.display().to_string()),
            ("WATCHDOG_USEC".to_owned(), "20000000".to_owned()),
        ]);
        let n = Notifier::from_env(&env);
        assert_eq!(n.watchdog_interval(), Some(Duration::from_secs(10)));
        n.ready();
        let mut buf = [0u8; 128];
        let len = listener.recv(&mut buf).unwrap();
        assert!(std::str::from_utf8(&buf[..len])
            .unwrap()
            .starts_with("READY=1"));
    }

    #[test]
    fn does_nothing_outside_systemd() {
        let n = Notifier::from_env(&HashMap::new());
        assert_eq!(n.watchdog_interval(), None);
        n.ready();
    }
}
