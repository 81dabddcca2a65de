//! The upstream pool: the backends a session may be relayed to, which one the next connect
//! goes to (round robin or least sessions), which are marked down (a failed connect marks a
//! backend down for `upstream_fail_timeout`; the optional active check marks it down until its
//! next passing check), and the active checker thread itself.
//!
//! Shared by every worker through atomics only: a pick is a handful of loads and one
//! `fetch_add`, never a lock. Owns no session and no ring socket; must not know the engine's
//! state. The guard layer picks, leases and reports failures; the ring only connects where
//! the session tells it.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Most backends one pool holds (a connect attempt remembers the ones it tried in a `u64`).
pub const MAX_BACKENDS: usize = 64;

/// How the next backend is chosen among the live ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Balance {
    /// Each connect goes to the next backend in turn.
    #[default]
    RoundRobin,
    /// Each connect goes to the backend with the fewest open upstream sessions.
    LeastSessions,
}

impl Balance {
    /// The name the config file uses.
    pub fn name(self) -> &'static str {
        match self {
            Balance::RoundRobin => "round-robin",
            Balance::LeastSessions => "least-sessions",
        }
    }
}

impl std::str::FromStr for Balance {
    type Err = String;
    fn from_str(s: &str) -> Result<Balance, String> {
        match s {
            "round-robin" => Ok(Balance::RoundRobin),
            "least-sessions" => Ok(Balance::LeastSessions),
            _ => Err(format!(
                "`{s}` is not an upstream balance (round-robin, least-sessions)"
            )),
        }
    }
}

/// One upstream server and what the pool knows about it.
#[derive(Debug)]
struct Backend {
    addr: SocketAddr,
    /// Upstream connections open (or being opened) to it.
    sessions: AtomicU32,
    /// Down until this many milliseconds after the pool's epoch (0: not marked by a connect).
    down_until_ms: AtomicU64,
    /// The last active check failed.
    check_failed: AtomicBool,
}

/// What the metrics show of one backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendState {
    pub addr: SocketAddr,
    pub sessions: u32,
    pub up: bool,
}

/// The set of upstream servers, shared by every worker.
#[derive(Debug)]
pub struct Pool {
    backends: Vec<Backend>,
    balance: Balance,
    fail_timeout: Duration,
    cursor: AtomicUsize,
    epoch: Instant,
}

/// The backends one connect attempt has tried (bit `i` for backend `i`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tried(u64);

impl Tried {
    fn has(self, i: usize) -> bool {
        self.0 & (1 << i) != 0
    }

    /// Notes backend `i` as tried.
    pub fn add(&mut self, i: usize) {
        self.0 |= 1 << i;
    }
}

impl Pool {
    /// A pool over `addrs` (1 to [`MAX_BACKENDS`], checked by the config).
    pub fn new(addrs: &[SocketAddr], balance: Balance, fail_timeout: Duration) -> Arc<Pool> {
        let backends = addrs
            .iter()
            .take(MAX_BACKENDS)
            .map(|&addr| Backend {
                addr,
                sessions: AtomicU32::new(0),
                down_until_ms: AtomicU64::new(0),
                check_failed: AtomicBool::new(false),
            })
            .collect();
        Arc::new(Pool {
            backends,
            balance,
            fail_timeout,
            cursor: AtomicUsize::new(0),
            epoch: Instant::now(),
        })
    }

    /// The backend addresses, in configured order.
    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.backends.iter().map(|b| b.addr).collect()
    }

    /// The address of backend `i`.
    pub fn addr(&self, i: usize) -> SocketAddr {
        self.backends[i].addr
    }

    fn millis(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.epoch).as_millis() as u64
    }

    fn is_up(&self, i: usize, now: Instant) -> bool {
        let b = &self.backends[i];
        !b.check_failed.load(Ordering::Relaxed)
            && b.down_until_ms.load(Ordering::Relaxed) <= self.millis(now)
    }

    /// Chooses the next backend not in `tried`: a live one by the balance strategy, or, when
    /// every untried one is marked down, the first of those in order (a stale mark must never
    /// stop mail). `None` once every backend was tried.
    pub fn pick(&self, tried: Tried, now: Instant) -> Option<usize> {
        let n = self.backends.len();
        let start = self.cursor.fetch_add(1, Ordering::Relaxed) % n.max(1);
        let live = (0..n)
            .map(|k| (start + k) % n)
            .filter(|&i| !tried.has(i) && self.is_up(i, now));
        let chosen = match self.balance {
            Balance::RoundRobin => live.into_iter().next(),
            Balance::LeastSessions => {
                live.min_by_key(|&i| self.backends[i].sessions.load(Ordering::Relaxed))
            }
        };
        chosen.or_else(|| (0..n).find(|&i| !tried.has(i)))
    }

    /// Counts an upstream connection to backend `i` until the lease is dropped.
    pub fn lease(self: &Arc<Self>, i: usize) -> Lease {
        self.backends[i].sessions.fetch_add(1, Ordering::Relaxed);
        Lease {
            pool: Arc::clone(self),
            index: i,
        }
    }

    /// A connect to backend `i` failed (or it closed before its banner): down for the fail
    /// timeout.
    pub fn mark_failed(&self, i: usize, now: Instant) {
        let until = self.millis(now + self.fail_timeout).max(1);
        let before = self.backends[i]
            .down_until_ms
            .swap(until, Ordering::Relaxed);
        if before <= self.millis(now) {
            tracing::warn!(
                backend = %self.backends[i].addr,
                for_secs = self.fail_timeout.as_secs(),
                "upstream backend marked down: connect failed or refused before its banner"
            );
        }
    }

    /// A connect to backend `i` succeeded: a mark left by earlier failures no longer holds.
    pub fn mark_connected(&self, i: usize) {
        let mark = &self.backends[i].down_until_ms;
        // Load first: a store on every connect would bounce the line between the workers.
        if mark.load(Ordering::Relaxed) != 0 {
            mark.store(0, Ordering::Relaxed);
        }
    }

    /// Records the outcome of an active check of backend `i`.
    fn set_check(&self, i: usize, passed: bool, why: &str) {
        let was_failed = self.backends[i]
            .check_failed
            .swap(!passed, Ordering::Relaxed);
        let addr = self.backends[i].addr;
        match (was_failed, passed) {
            (false, false) => {
                tracing::warn!(backend = %addr, reason = why, "upstream backend failed its check")
            }
            (true, true) => tracing::info!(backend = %addr, "upstream backend passed its check"),
            _ => {}
        }
    }

    /// Every backend's open sessions and up/down state, for metrics.
    pub fn states(&self) -> Vec<BackendState> {
        let now = Instant::now();
        (0..self.backends.len())
            .map(|i| BackendState {
                addr: self.backends[i].addr,
                sessions: self.backends[i].sessions.load(Ordering::Relaxed),
                up: self.is_up(i, now),
            })
            .collect()
    }

    /// Starts the active check: every `interval`, one connection per backend (banner, `EHLO
    /// host`, `QUIT`). It runs until the returned [`Checker`] is dropped.
    pub fn spawn_checker(
        self: &Arc<Self>,
        interval: Duration,
        host: String,
    ) -> std::io::Result<Checker> {
        let (stop, stopped) = mpsc::channel::<()>();
        let pool = Arc::clone(self);
        let thread = std::thread::Builder::new()
            .name("mailguard-check".to_string())
            .spawn(move || loop {
                pool.check_all(interval, &host, &stopped);
                match stopped.recv_timeout(interval) {
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                    _ => return,
                }
            })?;
        Ok(Checker {
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    fn check_all(&self, interval: Duration, host: &str, stopped: &mpsc::Receiver<()>) {
        // One check must not outlast its interval, nor hang on a backend that never answers.
        let timeout = interval.clamp(Duration::from_millis(100), Duration::from_secs(5));
        for i in 0..self.backends.len() {
            // A stopping server waits for one backend's check at most, not for the round.
            if let Err(mpsc::TryRecvError::Disconnected) = stopped.try_recv() {
                return;
            }
            match smtp_check(self.backends[i].addr, host, timeout) {
                Ok(()) => self.set_check(i, true, ""),
                Err(why) => self.set_check(i, false, &why),
            }
        }
    }
}

/// One upstream connection counted on its backend; dropping it uncounts it.
#[derive(Debug)]
pub struct Lease {
    pool: Arc<Pool>,
    index: usize,
}

impl Lease {
    /// The backend this lease counts on.
    pub fn index(&self) -> usize {
        self.index
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.pool.backends[self.index]
            .sessions
            .fetch_sub(1, Ordering::Relaxed);
    }
}

/// The running active check; dropping it stops the thread and waits for it.
#[derive(Debug)]
pub struct Checker {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Checker {
    fn drop(&mut self) {
        // Dropping the sender wakes the thread's wait at once.
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The host name the check says EHLO with (the kernel's, or `localhost`).
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}

/// haproxy's `smtpchk`, finished politely: 220 banner, `EHLO host` answered 250, `QUIT`
/// answered 221. QUIT is sent whenever the connection got that far, even after a bad reply,
/// so the backend logs a clean end rather than a lost connection.
fn smtp_check(addr: SocketAddr, host: &str, timeout: Duration) -> Result<(), String> {
    let stream = TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("connect: {e}"))?;
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|()| stream.set_write_timeout(Some(timeout)))
        .map_err(|e| e.to_string())?;
    let mut writer = stream.try_clone().map_err(|e| e.to_string())?;
    let mut reader = BufReader::new(stream);
    let verdict = expect(&mut reader, 220, "banner").and_then(|()| {
        writer
            .write_all(format!("EHLO {host}\r\n").as_bytes())
            .map_err(|e| format!("EHLO: {e}"))?;
        expect(&mut reader, 250, "EHLO")
    });
    let quit = writer
        .write_all(b"QUIT\r\n")
        .map_err(|e| format!("QUIT: {e}"))
        .and_then(|()| expect(&mut reader, 221, "QUIT"));
    verdict.and(quit)
}

/// Longest reply line the check reads; a backend sending more is not a mail server.
const CHECK_MAX_LINE: u64 = 4096;
/// Most lines of one reply the check reads.
const CHECK_MAX_LINES: usize = 100;

/// Reads one (possibly multi-line) reply and checks its code.
fn expect<R: BufRead>(reader: &mut R, code: u16, what: &str) -> Result<(), String> {
    for _ in 0..CHECK_MAX_LINES {
        let mut line = String::new();
        let n = Read::take(&mut *reader, CHECK_MAX_LINE)
            .read_line(&mut line)
            .map_err(|e| format!("{what}: {e}"))?;
        if n == 0 {
            return Err(format!("{what}: connection closed"));
        }
        let got = line.get(..3).and_then(|c| c.parse::<u16>().ok());
        if got != Some(code) {
            return Err(format!(
                "{what}: expected {code}, got `{}`",
                line.trim_end()
            ));
        }
        if line.as_bytes().get(3) != Some(&b'-') {
            return Ok(());
        }
    }
    Err(format!("{what}: reply too long"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(n: u16) -> Vec<SocketAddr> {
        (0..n)
            .map(|i| SocketAddr::from(([127, 0, 0, 1], 2500 + i)))
            .collect()
    }

    #[test]
    fn round_robin_takes_turns_and_skips_tried_and_down() {
        let pool = Pool::new(&addrs(3), Balance::RoundRobin, Duration::from_secs(10));
        let now = Instant::now();
        let picks: Vec<_> = (0..6).map(|_| pool.pick(Tried::default(), now)).collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2].map(Some));
        pool.mark_failed(1, now);
        for _ in 0..6 {
            assert_ne!(pool.pick(Tried::default(), now), Some(1));
        }
        assert!(pool.is_up(1, now + Duration::from_secs(11)), "mark expires");
        let mut tried = Tried::default();
        tried.add(0);
        tried.add(2);
        assert_eq!(pool.pick(tried, now), Some(1), "down but untried");
        tried.add(1);
        assert_eq!(pool.pick(tried, now), None);
    }

    #[test]
    fn least_sessions_prefers_the_idle_one_and_leases_count() {
        let pool = Pool::new(&addrs(2), Balance::LeastSessions, Duration::from_secs(10));
        let now = Instant::now();
        let busy = pool.lease(0);
        for _ in 0..4 {
            assert_eq!(pool.pick(Tried::default(), now), Some(1));
        }
        let second = pool.lease(1);
        let third = pool.lease(1);
        assert_eq!(pool.pick(Tried::default(), now), Some(0));
        drop((busy, second, third));
        assert!(pool.states().iter().all(|s| s.sessions == 0 && s.up));
    }

    #[test]
    fn all_down_still_tries_in_order() {
        let pool = Pool::new(&addrs(3), Balance::RoundRobin, Duration::from_secs(10));
        let now = Instant::now();
        for i in 0..3 {
            pool.mark_failed(i, now);
        }
        assert_eq!(pool.pick(Tried::default(), now), Some(0));
        pool.mark_connected(0);
        assert!(pool.is_up(0, now));
    }

    #[test]
    fn reply_reader_takes_multiline_and_refuses_wrong_codes() {
        let mut ok = BufReader::new(&b"250-a\r\n250-b\r\n250 c\r\n"[..]);
        assert_eq!(expect(&mut ok, 250, "EHLO"), Ok(()));
        let mut bad = BufReader::new(&b"554 go away\r\n"[..]);
        let e = expect(&mut bad, 220, "banner").unwrap_err();
        assert!(e.contains("554 go away"), "{e}");
        let mut cut = BufReader::new(&b"250-a\r\n"[..]);
        assert!(expect(&mut cut, 250, "EHLO").is_err());
    }
}
