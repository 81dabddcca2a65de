//! The thread-per-core io_uring ring: accepts TCP connections, runs one
//! [`Proxy`](crate::relay::Proxy) session per connection, and moves bytes between each client
//! and its upstream connection.
//!
//! The ring knows nothing of SMTP. It owns sockets, buffers and threads; sessions (made by a
//! [`ProxyFactory`]) own every protocol decision and speak to the ring only through
//! [`crate::relay`]. Each worker thread has its own io_uring, provided-buffer ring and slab of
//! sessions, and both legs of a session stay on the thread that accepted it. Threads share only
//! the listener fd, a stop flag, one eventfd each (to wake them) and their published stats.
//!
//! Startup order for `main`: [`probe`] (one-line diagnostic if io_uring is blocked), [`bind`]
//! (clean "address already in use"), then [`serve`]; later [`Server::drain`] (graceful: stop
//! accepting, let sessions finish, then force them) or [`Server::stop`] (at once), and
//! [`Server::join`]. A [`ServerHandle`] does the same from another thread.
//!
//! `unsafe` in the crate lives only in this module tree; each block states why it holds.

mod bufring;
mod conn;
mod error;
mod ring;
mod stats;
mod userdata;
mod worker;

#[cfg(test)]
mod tests;

use std::net::{Shutdown, SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use socket2::{Domain, Protocol, SockRef, Socket, Type};

pub use error::IoError;
pub use ring::probe;
pub use stats::{ConnectLatency, StatsHandle, WorkerStats, CONNECT_BUCKETS_MICROS};

use crate::relay::ProxyFactory;

/// Listen backlog: room for bursts of connecting clients (Rust's default of 128 is small).
const BACKLOG: i32 = 1024;

/// How the ring runs.
#[derive(Debug, Clone)]
pub struct RingConfig {
    /// Worker threads, one per core.
    pub threads: usize,
    /// Where `Action::Connect` connects to.
    pub upstream: SocketAddr,
    /// Submission queue entries per worker (the completion queue gets four times as many).
    pub ring_entries: u32,
    /// Provided receive buffers per worker (at most 32768).
    pub buf_count: u16,
    /// Size of each receive buffer in bytes.
    pub buf_size: u32,
    /// Bytes queued for one socket above which the ring stops reading the opposite socket.
    pub high_water: usize,
    /// Queued bytes at or below which reading resumes.
    pub low_water: usize,
}

impl RingConfig {
    /// Defaults: 1024 SQ entries, 512 × 16 KiB buffers, backpressure at 256 KiB / 64 KiB.
    pub fn new(threads: usize, upstream: SocketAddr) -> RingConfig {
        RingConfig {
            threads,
            upstream,
            ring_entries: 1024,
            buf_count: 512,
            buf_size: 16 * 1024,
            high_water: 256 * 1024,
            low_water: 64 * 1024,
        }
    }

    fn validate(&self) -> Result<(), IoError> {
        let problem = if self.threads == 0 || self.threads > usize::from(u16::MAX) {
            "threads must be between 1 and 65535"
        } else if self.ring_entries == 0 || self.ring_entries > 32768 {
            "ring_entries must be between 1 and 32768"
        } else if self.buf_count == 0 || self.buf_count > 32768 {
            "buf_count must be between 1 and 32768"
        } else if self.buf_size == 0 || self.buf_size > 1 << 24 {
            "buf_size must be between 1 byte and 16 MiB"
        } else if self.high_water == 0 {
            "high_water must be positive"
        } else {
            return Ok(());
        };
        Err(IoError::Config(problem))
    }
}

/// Creates the one listening socket all workers accept on. `SO_REUSEADDR` but not
/// `SO_REUSEPORT`, so a port already in use fails here, cleanly, with `EADDRINUSE`.
pub fn bind(addr: SocketAddr) -> Result<TcpListener, IoError> {
    let fail = |source| IoError::Listen { addr, source };
    let socket =
        Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP)).map_err(fail)?;
    socket.set_reuse_address(true).map_err(fail)?;
    socket.bind(&addr.into()).map_err(fail)?;
    socket.listen(BACKLOG).map_err(fail)?;
    Ok(socket.into())
}

/// Raises this process's soft limit on open files to its hard limit, and returns the new soft
/// limit. Every session holds two sockets, so the usual soft limit of 1024 caps a proxy at
/// about 500 sessions while the hard limit (systemd's `LimitNOFILE`) allows far more.
pub fn raise_nofile_limit() -> std::io::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one `rlimit` into the live local it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if limit.rlim_cur < limit.rlim_max {
        limit.rlim_cur = limit.rlim_max;
        // SAFETY: setrlimit reads one `rlimit` from the live local it is given.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(limit.rlim_cur)
}

/// `CLOCK_MONOTONIC` in microseconds, the clock `sd_notify`'s `MONOTONIC_USEC=` speaks
/// (`Instant` uses it too, but does not expose its value).
pub fn monotonic_micros() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one `timespec` into the live local it is given; with a
    // valid clock id it cannot fail.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    let secs = u64::try_from(ts.tv_sec).unwrap_or(0);
    let nanos = u64::try_from(ts.tv_nsec).unwrap_or(0);
    secs.saturating_mul(1_000_000).saturating_add(nanos / 1_000)
}

/// What the control side tells the workers: stop now, or drain by a deadline. Workers read the
/// two flags once per loop turn (plain loads of a line nobody writes), the deadline once.
#[derive(Debug, Default)]
pub(crate) struct Command {
    stop: AtomicBool,
    draining: AtomicBool,
    drain_deadline: Mutex<Option<Instant>>,
}

impl Command {
    pub(crate) fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    /// The drain deadline, once a drain was asked for.
    pub(crate) fn drain_deadline(&self) -> Option<Instant> {
        if !self.draining.load(Ordering::Acquire) {
            return None;
        }
        *self.drain_deadline.lock()
    }
}

struct WorkerHandle {
    thread: Option<JoinHandle<Result<(), IoError>>>,
}

/// Stops or drains the workers from any thread (a signal-handling control thread).
#[derive(Clone)]
pub struct ServerHandle {
    command: Arc<Command>,
    wakes: Vec<Arc<OwnedFd>>,
    listener: Arc<TcpListener>,
}

impl ServerHandle {
    /// Stops accepting, ends every session (closing its sockets, without flushing) and makes
    /// the workers return. Callable any number of times, also during a drain; does not wait.
    pub fn stop(&self) {
        self.command.stop.store(true, Ordering::Release);
        self.wake_all();
    }

    /// Graceful shutdown; does not wait. The listener is shut down at once, so new
    /// connections are refused; every session is asked to end at its next quiet point
    /// ([`crate::relay::Proxy::on_shutdown`] without `force`, repeated once per second), and
    /// those still open after `timeout` are told to end now (with `force`). Each worker
    /// returns once its last session is gone and its sends are flushed. A second call keeps
    /// the first deadline. Returns false if a drain was already under way.
    pub fn drain(&self, timeout: Duration) -> bool {
        {
            let mut deadline = self.command.drain_deadline.lock();
            if deadline.is_some() {
                return false;
            }
            *deadline = Some(Instant::now() + timeout);
        }
        self.command.draining.store(true, Ordering::Release);
        // On Linux, shutting down a listening socket stops it listening: connects are refused
        // from here on and the pending accepts end. The fd itself stays open (the workers
        // share it) until the server is dropped.
        let _ = SockRef::from(&*self.listener).shutdown(Shutdown::Read);
        self.wake_all();
        true
    }

    /// Whether [`ServerHandle::drain`] was called.
    pub fn draining(&self) -> bool {
        self.command.draining.load(Ordering::Acquire)
    }

    fn wake_all(&self) {
        for fd in &self.wakes {
            wake(fd);
        }
    }
}

/// The running workers. Dropping it stops and joins them.
pub struct Server {
    workers: Vec<WorkerHandle>,
    handle: ServerHandle,
    stats: StatsHandle,
}

/// Starts `cfg.threads` workers accepting on `listener`. Worker `i` gets the factory
/// `make_factory(i)`, built here and moved into its thread. Returns once every worker has its
/// ring set up, or the first setup error (after stopping the others).
pub fn serve<F, M>(
    listener: TcpListener,
    cfg: RingConfig,
    make_factory: M,
) -> Result<Server, IoError>
where
    M: Fn(usize) -> F,
    F: ProxyFactory + Send + 'static,
{
    cfg.validate()?;
    // io_uring would answer EAGAIN instead of waiting on an O_NONBLOCK listener.
    listener
        .set_nonblocking(false)
        .map_err(|source| IoError::Setup {
            worker: 0,
            what: "use the listener",
            source,
        })?;
    let listener = Arc::new(listener);
    let command = Arc::new(Command::default());
    let (ready_tx, ready_rx) = mpsc::channel();
    let mut server = Server {
        workers: Vec::with_capacity(cfg.threads),
        handle: ServerHandle {
            command: Arc::clone(&command),
            wakes: Vec::with_capacity(cfg.threads),
            listener: Arc::clone(&listener),
        },
        stats: StatsHandle(Vec::with_capacity(cfg.threads)),
    };
    for index in 0..cfg.threads {
        let wake = Arc::new(eventfd().map_err(|source| IoError::Setup {
            worker: index,
            what: "create its eventfd",
            source,
        })?);
        let stats = Arc::new(Mutex::new(WorkerStats::default()));
        let shared = worker::Shared {
            index,
            cfg: cfg.clone(),
            listener: Arc::clone(&listener),
            wake: Arc::clone(&wake),
            command: Arc::clone(&command),
            stats: Arc::clone(&stats),
        };
        let factory = make_factory(index);
        let ready = ready_tx.clone();
        let thread = thread::Builder::new()
            .name(format!("mailguard-io{index}"))
            .spawn(move || worker::run(shared, factory, ready))
            .map_err(|source| IoError::Spawn {
                worker: index,
                source,
            })?;
        server.workers.push(WorkerHandle {
            thread: Some(thread),
        });
        server.handle.wakes.push(wake);
        server.stats.0.push(stats);
    }
    drop(ready_tx);
    for _ in 0..cfg.threads {
        match ready_rx.recv() {
            Ok((_, Ok(()))) => {}
            Ok((_, Err(e))) => return Err(e),
            // A worker died before reporting: join tells which and how.
            Err(_) => {
                return Err(server
                    .join()
                    .err()
                    .unwrap_or(IoError::Panicked { worker: 0 }))
            }
        }
    }
    Ok(server)
}

impl Server {
    /// See [`ServerHandle::stop`].
    pub fn stop(&self) {
        self.handle.stop();
    }

    /// See [`ServerHandle::drain`].
    pub fn drain(&self, timeout: Duration) -> bool {
        self.handle.drain(timeout)
    }

    /// A handle to stop or drain the workers from another thread while this one joins them.
    pub fn handle(&self) -> ServerHandle {
        self.handle.clone()
    }

    /// Waits for every worker to return; the first error (or panic) wins.
    pub fn join(mut self) -> Result<(), IoError> {
        self.join_all()
    }

    /// Last published stats of each worker.
    pub fn stats(&self) -> Vec<WorkerStats> {
        self.stats.snapshot()
    }

    /// A handle on the stats that outlives borrows of the server (e.g. for a metrics thread).
    pub fn stats_handle(&self) -> StatsHandle {
        self.stats.clone()
    }

    fn join_all(&mut self) -> Result<(), IoError> {
        let mut result = Ok(());
        for (index, worker) in self.workers.iter_mut().enumerate() {
            let Some(thread) = worker.thread.take() else {
                continue;
            };
            let outcome = thread
                .join()
                .unwrap_or(Err(IoError::Panicked { worker: index }));
            if result.is_ok() {
                result = outcome;
            }
        }
        result
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.workers.iter().any(|w| w.thread.is_some()) {
            self.stop();
            let _ = self.join_all();
        }
    }
}

fn eventfd() -> std::io::Result<OwnedFd> {
    // Blocking on purpose: io_uring fails reads of an O_NONBLOCK fd with EAGAIN instead of
    // waiting. SAFETY: eventfd(2) takes no pointers.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn wake(fd: &OwnedFd) {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a live local to an eventfd the Arc keeps open. A failure
    // (counter saturated) means a wake-up is already pending, which is all we want.
    unsafe { libc::write(fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
}
