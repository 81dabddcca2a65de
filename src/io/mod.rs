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
//! (clean "address already in use"), then [`serve`]; later [`Server::stop`] and
//! [`Server::join`].
//!
//! `unsafe` in the crate lives only in this module tree; each block states why it holds.

mod bufring;
mod conn;
mod error;
mod ring;
mod userdata;
mod worker;

#[cfg(test)]
mod tests;

use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::{self, JoinHandle};

use parking_lot::Mutex;
use socket2::{Domain, Protocol, Socket, Type};

pub use error::IoError;
pub use ring::probe;

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

/// Per-worker counters. Each worker keeps its own copy as plain integers and publishes it
/// about once per second; read them with [`Server::stats`] or a [`StatsHandle`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WorkerStats {
    /// Sessions whose slot is still held.
    pub sessions_open: u64,
    /// Sessions accepted since start.
    pub sessions_total: u64,
    /// Submission queue entries consumed by the kernel.
    pub submissions: u64,
    /// Completion queue entries handled.
    pub completions: u64,
    /// Completions the kernel could not post (as reported by the ring).
    pub cq_overflow: u64,
    /// Receive buffers currently available to the kernel.
    pub buffers_free: u64,
    /// Upstream connects that failed.
    pub upstream_connect_failures: u64,
    /// Times a socket stopped being read because its peer's queue was over the high-water mark.
    pub recv_throttled: u64,
    /// Multishot receives ended by an empty buffer ring (re-armed after buffers came back).
    pub recv_enobufs: u64,
}

impl WorkerStats {
    /// Adds `other` into `self` (for whole-process totals).
    pub fn add(&mut self, other: &WorkerStats) {
        self.sessions_open += other.sessions_open;
        self.sessions_total += other.sessions_total;
        self.submissions += other.submissions;
        self.completions += other.completions;
        self.cq_overflow += other.cq_overflow;
        self.buffers_free += other.buffers_free;
        self.upstream_connect_failures += other.upstream_connect_failures;
        self.recv_throttled += other.recv_throttled;
        self.recv_enobufs += other.recv_enobufs;
    }
}

/// A cloneable, `Send` view of every worker's published stats (for a metrics endpoint).
#[derive(Debug, Clone)]
pub struct StatsHandle(Vec<Arc<Mutex<WorkerStats>>>);

impl StatsHandle {
    /// The last published stats of each worker, by worker index.
    pub fn snapshot(&self) -> Vec<WorkerStats> {
        self.0.iter().map(|s| *s.lock()).collect()
    }

    /// Sum over all workers.
    pub fn total(&self) -> WorkerStats {
        let mut total = WorkerStats::default();
        for worker in self.snapshot() {
            total.add(&worker);
        }
        total
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

struct WorkerHandle {
    thread: Option<JoinHandle<Result<(), IoError>>>,
    wake: Arc<OwnedFd>,
}

/// The running workers. Dropping it stops and joins them.
pub struct Server {
    workers: Vec<WorkerHandle>,
    stop: Arc<AtomicBool>,
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
    let stop = Arc::new(AtomicBool::new(false));
    let (ready_tx, ready_rx) = mpsc::channel();
    let mut server = Server {
        workers: Vec::with_capacity(cfg.threads),
        stop: Arc::clone(&stop),
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
            stop: Arc::clone(&stop),
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
            wake,
        });
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
    /// Stops accepting, ends every session (closing its sockets, without flushing) and makes
    /// the workers return. Callable from any thread, any number of times; does not wait.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        for worker in &self.workers {
            wake(&worker.wake);
        }
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
