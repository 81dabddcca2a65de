//! The control thread: turns signals into operations on the running proxy, and tells systemd
//! where it stands (`sd_notify`).
//!
//! - SIGHUP: re-read the config file (if any) and the policy; a valid policy becomes the one
//!   new sessions get (open sessions keep theirs) and one line names the new generation and
//!   the keys that changed; an invalid one is refused with one error line (file:line:column)
//!   and the old policy stays.
//! - SIGTERM / SIGINT: drain (no new connections, sessions finish their transaction, the rest
//!   get `421 4.3.2` at `drain_timeout`); a second one stops at once.
//! - SIGUSR1: one log line with the live counters.
//!
//! Owns the reload procedure and the signal loop. It must not touch sessions or sockets: it
//! only calls [`ServerHandle`] and [`LivePolicy`], so a worker is never interrupted mid-batch
//! (workers block these signals; the kernel delivers them to this thread).

use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR1};
use signal_hook::iterator::{Handle, Signals};

use crate::config::{describe, PolicySource, Setup};
use crate::guard::LivePolicy;
use crate::io::ServerHandle;
use crate::metrics::Sources;
use crate::tally::{blocked_verb_name, End, RULES};

/// The signals the control thread handles.
pub const SIGNALS: [i32; 4] = [SIGHUP, SIGINT, SIGTERM, SIGUSR1];

/// Where the policy is re-read from on SIGHUP, the way startup read it.
#[derive(Debug)]
pub struct Reloader {
    /// The config file, if the process was started with one.
    config: Option<PathBuf>,
    /// `--policy`, which wins over the config file's policy.
    policy_flag: Option<PathBuf>,
    /// The config as last read, to tell which settings changed that need a restart.
    setup: Option<Setup>,
    live: Arc<LivePolicy>,
}

/// What a reload did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reloaded {
    /// The new policy is live under this generation; the summary names the changed keys.
    Applied { generation: u64, changes: String },
    /// Nothing changed: the old policy stays, for the reason given (one line).
    Refused { error: String },
}

impl Reloader {
    pub fn new(
        config: Option<PathBuf>,
        policy_flag: Option<PathBuf>,
        setup: Option<Setup>,
        live: Arc<LivePolicy>,
    ) -> Reloader {
        Reloader {
            config,
            policy_flag,
            setup,
            live,
        }
    }

    /// The policy source given the flags and a config: `--policy` first, then the config.
    pub fn source(policy_flag: Option<&PathBuf>, setup: Option<&Setup>) -> PolicySource {
        match (policy_flag, setup) {
            (Some(path), _) => PolicySource::File(path.clone()),
            (None, Some(setup)) => setup.policy.clone(),
            (None, None) => PolicySource::Default,
        }
    }

    /// Re-reads config and policy and makes the policy live if both are valid. Logs the
    /// outcome (one line, plus a warning per setting that only a restart applies).
    pub fn reload(&mut self) -> Reloaded {
        let outcome = self.try_reload();
        match &outcome {
            Reloaded::Applied {
                generation,
                changes,
            } => tracing::info!(
                generation = *generation,
                changed = %changes,
                "policy reloaded: generation {generation} is live"
            ),
            Reloaded::Refused { error } => {
                self.live.note_refused();
                tracing::error!(
                    generation = self.live.generation(),
                    "reload refused, the old policy stays: {error}"
                );
            }
        }
        outcome
    }

    fn try_reload(&mut self) -> Reloaded {
        let setup = match &self.config {
            Some(path) => match Setup::load(path) {
                Ok(setup) => Some(setup),
                Err(e) => {
                    return Reloaded::Refused {
                        error: e.to_string(),
                    }
                }
            },
            None => None,
        };
        let source = Reloader::source(self.policy_flag.as_ref(), setup.as_ref());
        let policy = match source.load() {
            Ok(policy) => policy,
            Err(e) => {
                return Reloaded::Refused {
                    error: e.to_string(),
                }
            }
        };
        if let (Some(old), Some(new)) = (&self.setup, &setup) {
            warn_restart_only(old, new);
        }
        if setup.is_some() {
            self.setup = setup;
        }
        let old = self.live.snapshot();
        let changes = describe::summarize(&describe::changes(&old, &policy));
        let generation = self.live.replace(policy);
        Reloaded::Applied {
            generation,
            changes,
        }
    }

    /// `drain_timeout` as the config last said (the one setting a reload changes besides the
    /// policy), if it says.
    pub fn drain_timeout(&self) -> Option<Duration> {
        self.setup.as_ref().and_then(|s| s.drain_timeout)
    }
}

/// One warning per config setting that changed but needs a restart to apply.
fn warn_restart_only(old: &Setup, new: &Setup) {
    let differs = [
        ("listen", old.listen != new.listen),
        ("proxy_protocol", old.proxy_protocol != new.proxy_protocol),
        ("upstream", old.upstream != new.upstream),
        ("threads", old.threads != new.threads),
        ("metrics", old.metrics != new.metrics),
        ("log_format", old.log_format != new.log_format),
        ("log_level", old.log_level != new.log_level),
    ];
    for (key, changed) in differs {
        if changed {
            tracing::warn!(
                key,
                "config key `{key}` changed: it applies at the next restart"
            );
        }
    }
}

/// `sd_notify(3)` without libsystemd: datagrams to `$NOTIFY_SOCKET`, best effort.
#[derive(Debug, Default)]
pub struct Notifier {
    target: Option<String>,
}

impl Notifier {
    /// Reads `$NOTIFY_SOCKET` (set by systemd for `Type=notify` units).
    pub fn from_env() -> Notifier {
        Notifier {
            target: std::env::var("NOTIFY_SOCKET")
                .ok()
                .filter(|s| !s.is_empty()),
        }
    }

    /// Sends one state line (`READY=1`, `STOPPING=1`, `RELOADING=1`, ...). Failures are
    /// logged at debug: without systemd listening there is nobody to tell.
    pub fn notify(&self, state: &str) {
        let Some(target) = &self.target else {
            return;
        };
        if let Err(e) = send_notify(target, state) {
            tracing::debug!(error = %e, socket = %target, "sd_notify failed");
        }
    }
}

fn send_notify(target: &str, state: &str) -> std::io::Result<usize> {
    let socket = UnixDatagram::unbound()?;
    match target.strip_prefix('@') {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            socket.send_to_addr(state.as_bytes(), &addr)
        }
        None => socket.send_to(state.as_bytes(), target),
    }
}

/// Everything the control thread acts on.
pub struct Control {
    pub signals: Signals,
    pub server: ServerHandle,
    pub reloader: Reloader,
    pub drain_timeout: Duration,
    pub sources: Sources,
    pub notifier: Notifier,
}

/// Registers the handled signals. Call before starting workers, so a signal that arrives
/// during startup is queued for the control thread rather than killing the process; the
/// returned [`Handle`] ends [`Control::run`] once the workers are gone.
pub fn signals() -> std::io::Result<(Signals, Handle)> {
    let signals = Signals::new(SIGNALS)?;
    let handle = signals.handle();
    Ok((signals, handle))
}

impl Control {
    /// The signal loop; returns when the signal handle is closed.
    pub fn run(mut self) {
        let mut draining = false;
        for signal in self.signals.forever() {
            match signal {
                SIGHUP => {
                    let now = crate::io::monotonic_micros();
                    self.notifier
                        .notify(&format!("RELOADING=1\nMONOTONIC_USEC={now}"));
                    if let Reloaded::Applied { .. } = self.reloader.reload() {
                        if let Some(t) = self.reloader.drain_timeout() {
                            self.drain_timeout = t;
                        }
                    }
                    self.notifier.notify("READY=1");
                }
                SIGUSR1 => dump(&self.sources),
                _ if !draining => {
                    draining = true;
                    let open = self.sources.connections.open();
                    tracing::info!(
                        sessions_open = open,
                        drain_timeout_s = self.drain_timeout.as_secs(),
                        "draining: not accepting; open sessions finish their transaction, \
                         then get 421 4.3.2 at the drain timeout"
                    );
                    self.notifier.notify("STOPPING=1");
                    self.server.drain(self.drain_timeout);
                }
                _ => {
                    tracing::warn!("second stop signal: closing every session now");
                    self.server.stop();
                }
            }
        }
    }
}

/// SIGUSR1: the live counters as one log line (the same numbers `/metrics` shows).
pub fn dump(sources: &Sources) {
    let s = sources.snapshot();
    let (r, e) = (&s.ring_total, &s.engine);
    let mut decisions: Vec<String> = Vec::new();
    for (slot, &n) in e.blocked.iter().enumerate() {
        if n > 0 {
            decisions.push(format!("blocked_verb:{}={n}", blocked_verb_name(slot)));
        }
    }
    for (rule, &n) in RULES.iter().zip(e.rules.iter()) {
        if n > 0 {
            decisions.push(format!("{rule}={n}"));
        }
    }
    let ended: Vec<String> = End::ALL
        .iter()
        .filter(|&&end| e.ended(end) > 0)
        .map(|&end| format!("{}={}", end.name(), e.ended(end)))
        .collect();
    tracing::info!(
        target: "mailguard::counters",
        sessions_open = r.sessions_open,
        sessions_total = r.sessions_total,
        sessions_ended = %ended.join(" "),
        messages_relayed = e.messages_accepted,
        messages_rejected = e.messages_refused_upstream,
        commands = e.commands,
        decisions = %decisions.join(" "),
        bytes_from_clients = r.client_bytes_received,
        bytes_from_upstream = r.upstream_bytes_received,
        upstream_connects = r.upstream_connects,
        upstream_connect_failures = r.upstream_connect_failures,
        replies = %format!("2xx={} 3xx={} 4xx={} 5xx={}", e.replies[0], e.replies[1], e.replies[2], e.replies[3]),
        policy_generation = s.generation,
        draining = s.draining,
        "counters"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Policy;

    fn temp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("mailguard-control-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        dir.join(name)
    }

    #[test]
    fn reload_applies_a_valid_policy_and_refuses_an_invalid_one() {
        let path = temp("reload-policy.toml");
        std::fs::write(&path, "max_recipients = 10\n").unwrap();
        let live = LivePolicy::new(Policy::load(&path).unwrap());
        let mut r = Reloader::new(None, Some(path.clone()), None, Arc::clone(&live));
        std::fs::write(&path, "max_recipients = 20\nmask_banner = true\n").unwrap();
        assert_eq!(
            r.reload(),
            Reloaded::Applied {
                generation: 2,
                changes: "mask_banner false -> true; max_recipients 10 -> 20".to_string()
            }
        );
        std::fs::write(&path, "max_recipients = 30\nbogus = 1\n").unwrap();
        let Reloaded::Refused { error } = r.reload() else {
            panic!("an invalid policy must be refused");
        };
        assert!(error.contains("reload-policy.toml:2:1:"), "{error}");
        assert_eq!(live.generation(), 2);
        assert_eq!(live.snapshot().max_recipients, 20);
        assert_eq!(live.reloads_refused(), 1);
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn reload_reads_the_config_and_its_inline_policy() {
        let path = temp("reload-config.toml");
        std::fs::write(&path, "drain_timeout = 5\n[policy]\nmax_recipients = 7\n").unwrap();
        let setup = Setup::load(&path).unwrap();
        let live = LivePolicy::new(setup.policy.load().unwrap());
        let mut r = Reloader::new(Some(path.clone()), None, Some(setup), Arc::clone(&live));
        std::fs::write(&path, "drain_timeout = 9\n[policy]\nmax_recipients = 8\n").unwrap();
        assert!(matches!(
            r.reload(),
            Reloaded::Applied { generation: 2, .. }
        ));
        assert_eq!(live.snapshot().max_recipients, 8);
        assert_eq!(r.drain_timeout(), Some(Duration::from_secs(9)));
        std::fs::write(&path, "drain_timeout = 9\n[policy]\nmax_recipients = -1\n").unwrap();
        assert!(matches!(r.reload(), Reloaded::Refused { .. }));
        assert_eq!(live.snapshot().max_recipients, 8);
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn notify_reaches_a_datagram_socket() {
        let path = temp("notify.sock");
        let _ = std::fs::remove_file(&path);
        let listener = UnixDatagram::bind(&path).expect("bind");
        let n = Notifier {
            target: Some(path.display().to_string()),
        };
        n.notify("READY=1");
        let mut buf = [0u8; 64];
        listener
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let got = listener.recv(&mut buf).expect("a datagram");
        assert_eq!(&buf[..got], b"READY=1");
        Notifier::default().notify("READY=1");
        let _ = std::fs::remove_file(&path);
    }
}
