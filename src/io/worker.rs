//! One worker thread: its ring, its provided buffers, its slab of sessions, its loop.
//!
//! Owns everything the kernel may touch on behalf of this thread (the ring, the buffer ring, the
//! eventfd read buffer, the sessions' send queues through the slab), and decides when each may
//! be freed. It shares only read-mostly things with other threads: the listener fd, the eventfd,
//! the stop/drain command and the stats mutex it publishes to once per second (when it also
//! lets its factory publish). It knows nothing of SMTP.
//!
//! Loop (TigerBeetle style): move queued entries into the SQ, one `io_uring_enter` that submits
//! and waits (with a timeout), copy every completion out of the CQ, handle them (session calls
//! append new entries to a local backlog), then timers and housekeeping. Signals are blocked on
//! this thread, so a batch is never interrupted: the control thread takes them.
//!
//! Shutdown comes in two strengths. *Stop*: cancel the accept, abort every session, return once
//! the kernel let go of our memory. *Drain*: no new sessions (the listener was shut down by the
//! caller; accepts that still complete are closed at once), every session asked to end at its
//! next quiet point, asked again every tick (a session may only become quiet later, e.g. once
//! its upstream greeted), told to end now at the deadline; once the slab is empty (every
//! closing session flushed what it owed its client) the worker stops as above.

use std::collections::VecDeque;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use io_uring::types::{CancelBuilder, Fd, SubmitArgs, Timespec};
use io_uring::{cqueue, opcode, IoUring};
use parking_lot::Mutex;
use slab::Slab;
use socket2::{SockAddr, Socket};

use super::bufring::BufRing;
use super::conn::{Conn, Cx, Received, FLUSH_LIMIT};
use super::error::IoError;
use super::ring;
use super::userdata::{self, Decoded, Op, SlotId, Token, MAX_SLOT};
use super::{Command, RingConfig, WorkerStats};
use crate::relay::{ProxyFactory, Side};

/// Longest wait in the kernel; also the period of the deadline sweep and stats publication.
const TICK: Duration = Duration::from_secs(1);
/// Pause before re-arming accept after it failed (EMFILE, ENFILE, ...), so we do not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Longest wait while buffer-starved sockets are queued.
const STARVED_WAIT: Duration = Duration::from_millis(10);
/// How long a stopping worker waits for the kernel to finish with its sessions' memory.
const STOP_DRAIN: Duration = Duration::from_secs(5);

/// What the thread that spawns a worker hands to it.
pub(crate) struct Shared {
    pub index: usize,
    pub cfg: RingConfig,
    pub listener: Arc<TcpListener>,
    pub wake: Arc<OwnedFd>,
    pub command: Arc<Command>,
    pub stats: Arc<Mutex<WorkerStats>>,
}

/// Thread body: builds the worker, reports setup success or failure on `ready`, then runs.
pub(crate) fn run<F: ProxyFactory>(
    shared: Shared,
    factory: F,
    ready: mpsc::Sender<(usize, Result<(), IoError>)>,
) -> Result<(), IoError> {
    let index = shared.index;
    block_signals();
    match Worker::new(shared, factory) {
        Ok(worker) => {
            let _ = ready.send((index, Ok(())));
            worker.run()
        }
        Err(e) => {
            // `serve` reports this error; the thread itself ends quietly.
            let _ = ready.send((index, Err(e)));
            Ok(())
        }
    }
}

// Field order is drop order: the ring goes first, ending the buffer-ring registration and every
// request, before the memory those requests point into.
struct Worker<F: ProxyFactory> {
    ring: IoUring,
    bufs: BufRing,
    conns: Slab<Conn<F::Session>>,
    /// Generation of each slab index, bumped whenever the slot is freed.
    gens: Vec<u16>,
    factory: F,
    cx: Cx,
    shared: Shared,
    /// The eventfd read lands here; boxed so its address is stable.
    wake_buf: Box<u64>,
    cqes: Vec<cqueue::Entry>,
    keys: Vec<usize>,
    /// Sockets waiting to re-arm a receive after the buffer ring ran dry, oldest first.
    starved: VecDeque<(SlotId, Side, u16)>,
    accept_armed: bool,
    accept_retry_at: Option<Instant>,
    /// The listener's own address when it names one host address: then every accepted socket
    /// has it as its local address, and no `getsockname` per connection is needed.
    listen_local: Option<SocketAddr>,
    wake_armed: bool,
    /// Set when stopping: the time by which the kernel must have let go of our memory.
    stop_deadline: Option<Instant>,
    /// Set when draining.
    drain: Option<Drain>,
    next_tick: Instant,
}

impl<F: ProxyFactory> Worker<F> {
    fn new(shared: Shared, factory: F) -> Result<Worker<F>, IoError> {
        let index = shared.index;
        let cfg = &shared.cfg;
        let setup = |what: &'static str| {
            move |source| IoError::Setup {
                worker: index,
                what,
                source,
            }
        };
        let bgid = u16::try_from(index).map_err(|_| IoError::Config("too many threads"))?;
        let mut bufs = BufRing::new(cfg.buf_count, cfg.buf_size, bgid)
            .map_err(setup("map its receive buffers"))?;
        let ring = ring::build(cfg.ring_entries).map_err(setup("create its io_uring"))?;
        bufs.register(&ring.submitter())
            .map_err(setup("register its provided-buffer ring"))?;
        // Socket operations poll rather than use kernel worker threads, but cap them anyway.
        let _ = ring.submitter().register_iowq_max_workers(&mut [4, 4]);
        let listen_local = shared
            .listener
            .local_addr()
            .ok()
            .filter(|a| !a.ip().is_unspecified());
        let now = Instant::now();
        let cx = Cx {
            sqes: Vec::with_capacity(cfg.ring_entries as usize),
            actions: Vec::new(),
            stats: WorkerStats::default(),
            upstream: Box::new(SockAddr::from(cfg.upstream)),
            bgid: bufs.bgid(),
            now,
            high_water: cfg.high_water,
            low_water: cfg.low_water.min(cfg.high_water),
            starved: Vec::new(),
        };
        Ok(Worker {
            ring,
            bufs,
            conns: Slab::new(),
            gens: Vec::new(),
            factory,
            cx,
            shared,
            wake_buf: Box::new(0),
            cqes: Vec::new(),
            keys: Vec::new(),
            starved: VecDeque::new(),
            accept_armed: false,
            accept_retry_at: None,
            listen_local,
            wake_armed: false,
            stop_deadline: None,
            drain: None,
            next_tick: now + TICK,
        })
    }

    fn run(mut self) -> Result<(), IoError> {
        self.arm_wake();
        self.arm_accept();
        let result = self.run_loop();
        self.publish();
        self.factory.publish();
        let drained = self.drained();
        let Worker {
            ring,
            bufs,
            conns,
            wake_buf,
            cx,
            ..
        } = self;
        drop(ring);
        if !drained {
            // The kernel may still hold pointers into these (a request that ignored its cancel
            // past the drain deadline): leaking is the only safe choice, and we are exiting.
            std::mem::forget(bufs);
            std::mem::forget(conns);
            std::mem::forget(wake_buf);
            std::mem::forget(cx);
        }
        result
    }

    fn run_loop(&mut self) -> Result<(), IoError> {
        loop {
            self.enter()?;
            self.cx.now = Instant::now();
            self.reap();
            self.process();
            self.feed_starved();
            self.housekeeping();
            if let Some(deadline) = self.stop_deadline {
                if self.drained() || self.cx.now >= deadline {
                    return Ok(());
                }
            }
        }
    }

    /// Nothing of ours is in flight any more.
    fn drained(&self) -> bool {
        self.conns.is_empty() && !self.accept_armed && !self.wake_armed && self.cx.sqes.is_empty()
    }

    fn enter(&mut self) -> Result<(), IoError> {
        self.fill_sq();
        // Entries still in the backlog need the SQ emptied first: do not sleep on them.
        let want = usize::from(self.cx.sqes.is_empty());
        let timeout = Timespec::from(self.wait_time());
        let args = SubmitArgs::new().timespec(&timeout);
        match self.ring.submitter().submit_with_args(want, &args) {
            Ok(submitted) => {
                self.cx.stats.submissions += submitted as u64;
                Ok(())
            }
            // Timeout, signal, or CQ backlog (EBUSY: reap, then submit again next turn).
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ETIME | libc::EINTR | libc::EBUSY | libc::EAGAIN)
                ) =>
            {
                Ok(())
            }
            Err(source) => Err(IoError::Ring {
                worker: self.shared.index,
                source,
            }),
        }
    }

    fn wait_time(&self) -> Duration {
        if !self.starved.is_empty() {
            // Normally the re-armed receives wake us; this only bounds the wait if they do not.
            return STARVED_WAIT;
        }
        let now = Instant::now();
        let mut until = self.next_tick;
        if let Some(retry) = self.accept_retry_at {
            until = until.min(retry);
        }
        if let Some(drain) = self.drain.filter(|d| !d.forced) {
            until = until.min(drain.deadline);
        }
        until.saturating_duration_since(now).min(TICK)
    }

    fn fill_sq(&mut self) {
        if self.cx.sqes.is_empty() {
            return;
        }
        let mut sq = self.ring.submission();
        let n = (sq.capacity() - sq.len()).min(self.cx.sqes.len());
        // SAFETY: every pointer in these entries stays valid until its completion: send data
        // lives in a send queue that is neither touched nor dropped while its socket has
        // operations in flight (conn.rs), the eventfd buffer is boxed in the worker, the connect
        // address is boxed in `cx`, and the worker only frees any of them after draining (or
        // leaks them). Receives carry no pointer: their memory is the registered buffer ring.
        let pushed = unsafe { sq.push_multiple(&self.cx.sqes[..n]) }.is_ok();
        drop(sq);
        if pushed {
            self.cx.sqes.drain(..n);
        }
    }

    fn reap(&mut self) {
        let mut cq = self.ring.completion();
        self.cx.stats.cq_overflow = u64::from(cq.overflow());
        self.cqes.extend(&mut cq);
    }

    fn process(&mut self) {
        let mut cqes = std::mem::take(&mut self.cqes);
        self.cx.stats.completions += cqes.len() as u64;
        for cqe in &cqes {
            self.dispatch(cqe.user_data(), cqe.result(), cqe.flags());
        }
        cqes.clear();
        self.cqes = cqes;
    }

    fn dispatch(&mut self, user_data: u64, res: i32, flags: u32) {
        match userdata::decode(user_data) {
            Decoded::Accept => self.on_accept(res, cqueue::more(flags)),
            Decoded::Wake => self.on_wake(),
            Decoded::ControlCancel => {}
            Decoded::Sock(token) => self.on_sock(token, res, flags),
            Decoded::Unknown => {}
        }
    }

    /// Re-arms receives of buffer-starved sockets, at most half a ring's worth per turn: every
    /// buffer is back in the ring by now, and each receive takes at least one, so re-arming more
    /// would only produce another round of ENOBUFS.
    fn feed_starved(&mut self) {
        self.starved.extend(self.cx.starved.drain(..));
        let budget = usize::from(self.bufs.count() / 2).max(1);
        for _ in 0..budget {
            let Some((id, side, epoch)) = self.starved.pop_front() else {
                return;
            };
            let key = id.slot as usize;
            if self.gens.get(key) != Some(&id.gen) {
                continue;
            }
            if let Some(conn) = self.conns.get_mut(key) {
                conn.unstarve(id, &mut self.cx, (side, epoch));
                if conn.finished() {
                    self.release(key);
                }
            }
        }
    }

    fn on_sock(&mut self, token: Token, res: i32, flags: u32) {
        let bid = match token.op {
            Op::Recv => cqueue::buffer_select(flags),
            _ => None,
        };
        let key = token.id.slot as usize;
        let live = self.gens.get(key) == Some(&token.id.gen);
        if let (true, Some(conn)) = (live, self.conns.get_mut(key)) {
            let who = (token.side, token.epoch);
            let cx = &mut self.cx;
            match token.op {
                Op::Recv => {
                    let received = match (res, bid) {
                        (n, Some(bid)) if n > 0 => Received::Data(self.bufs.slice(bid, n as usize)),
                        (0, _) => Received::Eof,
                        (n, _) if n < 0 => Received::Error(n),
                        _ => Received::Data(&[]),
                    };
                    conn.on_recv(token.id, cx, who, cqueue::more(flags), received);
                }
                Op::Send => conn.on_send(token.id, cx, who, res),
                Op::Connect => conn.on_connect(token.id, cx, token.epoch, res),
                Op::Cancel => conn.on_cancel(token.id, cx, who),
                Op::Accept | Op::Wake | Op::ControlCancel => {}
            }
        }
        // Stale or not, a buffer the kernel picked must go back, or the ring slowly empties.
        if let Some(bid) = bid {
            self.bufs.recycle(bid);
        }
        if live && self.conns.get(key).is_some_and(|c| c.finished()) {
            self.release(key);
        }
    }

    fn on_accept(&mut self, res: i32, more: bool) {
        if !more {
            self.accept_armed = false;
        }
        if res < 0 {
            let cancelled = res == -libc::ECANCELED && self.stop_deadline.is_some();
            if !more && !cancelled {
                self.accept_retry_at = Some(self.cx.now + ACCEPT_BACKOFF);
            }
            return;
        }
        // SAFETY: a non-negative accept result is a new fd that nothing else owns.
        let socket = unsafe { Socket::from_raw_fd(res) };
        // While draining or stopping, a connection the kernel still handed us is closed
        // unanswered, like those the shut-down listener refuses.
        if self.accepting() {
            self.open_session(socket);
        }
    }

    fn open_session(&mut self, socket: Socket) {
        let _ = socket.set_tcp_nodelay(true);
        // No peer address: the client is already gone; dropping the socket closes it.
        let Some(peer) = socket.peer_addr().ok().and_then(|a| a.as_socket()) else {
            return;
        };
        let entry = self.conns.vacant_entry();
        let key = entry.key();
        if key > MAX_SLOT {
            return;
        }
        if self.gens.len() <= key {
            self.gens.resize(key + 1, 0);
        }
        let id = SlotId {
            slot: key as u32,
            gen: self.gens[key],
        };
        // A wildcard listener's socket knows which of the host's addresses the client chose.
        let local = self.listen_local.unwrap_or_else(|| {
            socket
                .local_addr()
                .ok()
                .and_then(|a| a.as_socket())
                .unwrap_or(peer)
        });
        let session = self.factory.new_session(peer, local, self.cx.now);
        let conn = entry.insert(Conn::new(session, socket));
        self.cx.stats.sessions_open += 1;
        self.cx.stats.sessions_total += 1;
        conn.start(id, &mut self.cx);
        if conn.finished() {
            self.release(key);
        }
    }

    /// Whether new connections become sessions.
    fn accepting(&self) -> bool {
        self.stop_deadline.is_none() && self.drain.is_none()
    }

    fn release(&mut self, key: usize) {
        let conn = self.conns.remove(key);
        self.factory.session_ended(conn.session(), self.cx.now);
        if let Some(gen) = self.gens.get_mut(key) {
            *gen = gen.wrapping_add(1);
        }
        self.cx.stats.sessions_open = self.cx.stats.sessions_open.saturating_sub(1);
    }

    fn on_wake(&mut self) {
        self.wake_armed = false;
        if self.stop_deadline.is_none() && !self.shared.command.stopping() {
            self.arm_wake();
        }
    }

    /// One accept at a time, re-armed after each connection, rather than a multishot accept:
    /// the kernel wakes the listener's waiters in queue order and a multishot accept never
    /// leaves the head, so one worker took every connection (tuning.md, "Accepts").
    fn arm_accept(&mut self) {
        let fd = Fd(self.shared.listener.as_raw_fd());
        let entry = opcode::Accept::new(fd, std::ptr::null_mut(), std::ptr::null_mut())
            .flags(libc::SOCK_CLOEXEC)
            .build()
            .user_data(userdata::ACCEPT);
        self.cx.sqes.push(entry);
        self.accept_armed = true;
        self.accept_retry_at = None;
    }

    fn arm_wake(&mut self) {
        let buf: *mut u64 = &mut *self.wake_buf;
        let entry = opcode::Read::new(Fd(self.shared.wake.as_raw_fd()), buf.cast(), 8)
            .build()
            .user_data(userdata::WAKE);
        self.cx.sqes.push(entry);
        self.wake_armed = true;
    }

    fn housekeeping(&mut self) {
        if self.stop_deadline.is_none() && self.shared.command.stopping() {
            self.begin_stop();
        }
        if self.accepting() {
            if let Some(deadline) = self.shared.command.drain_deadline() {
                self.begin_drain(deadline);
            }
        }
        let now = self.cx.now;
        if self.accepting() && !self.accept_armed && self.accept_retry_at.is_none_or(|t| now >= t) {
            self.arm_accept();
        }
        let tick = now >= self.next_tick;
        if tick {
            self.next_tick = now + TICK;
            self.sweep();
        }
        if self.drain.is_some() && self.stop_deadline.is_none() {
            self.drive_drain(tick);
        }
        if tick {
            self.publish();
            self.factory.publish();
        }
    }

    fn begin_drain(&mut self, deadline: Instant) {
        self.drain = Some(Drain {
            deadline,
            forced: false,
        });
        if self.accept_armed {
            self.cancel_control(userdata::ACCEPT);
        }
        self.for_each_conn(|conn, id, cx| conn.shutdown(id, cx, false));
    }

    /// Asks quiet sessions to end (again, once per tick), forces the rest at the deadline, and
    /// stops the worker once no session is left (or the forced ones overstay their flush).
    fn drive_drain(&mut self, tick: bool) {
        let Some(drain) = self.drain else {
            return;
        };
        let now = self.cx.now;
        if !drain.forced && now >= drain.deadline {
            self.drain = Some(Drain {
                forced: true,
                ..drain
            });
            self.for_each_conn(|conn, id, cx| conn.shutdown(id, cx, true));
        } else if tick && !drain.forced {
            self.for_each_conn(|conn, id, cx| conn.shutdown(id, cx, false));
        }
        let overstayed = now >= drain.deadline + FLUSH_LIMIT + TICK;
        if self.conns.is_empty() || overstayed {
            self.begin_stop();
        }
    }

    /// Once per second: session deadlines and bounded flushes.
    fn sweep(&mut self) {
        self.for_each_conn(|conn, id, cx| conn.on_tick(id, cx));
    }

    fn begin_stop(&mut self) {
        self.stop_deadline = Some(self.cx.now + STOP_DRAIN);
        if self.accept_armed {
            self.cancel_control(userdata::ACCEPT);
        }
        if self.wake_armed {
            self.cancel_control(userdata::WAKE);
        }
        self.for_each_conn(|conn, id, cx| conn.abort(id, cx));
    }

    fn cancel_control(&mut self, target: u64) {
        let entry = opcode::AsyncCancel2::new(CancelBuilder::user_data(target))
            .build()
            .user_data(userdata::CONTROL_CANCEL);
        self.cx.sqes.push(entry);
    }

    fn for_each_conn(&mut self, mut f: impl FnMut(&mut Conn<F::Session>, SlotId, &mut Cx)) {
        let mut keys = std::mem::take(&mut self.keys);
        keys.extend(self.conns.iter().map(|(key, _)| key));
        for &key in &keys {
            let id = SlotId {
                slot: key as u32,
                gen: self.gens[key],
            };
            if let Some(conn) = self.conns.get_mut(key) {
                f(conn, id, &mut self.cx);
                if conn.finished() {
                    self.release(key);
                }
            }
        }
        keys.clear();
        self.keys = keys;
    }

    fn publish(&mut self) {
        let mut stats = self.cx.stats;
        let fd = self.ring.as_raw_fd();
        stats.buffers_free = u64::from(self.bufs.available(fd).unwrap_or(self.bufs.count()));
        stats.buffers_total = u64::from(self.bufs.count());
        *self.shared.stats.lock() = stats;
    }
}

/// A drain under way on this worker.
#[derive(Debug, Clone, Copy)]
struct Drain {
    /// When sessions still open are told to end now.
    deadline: Instant,
    /// They have been.
    forced: bool,
}

/// Blocks the process-directed signals the control thread handles, so the kernel delivers them
/// there and never interrupts this thread's `io_uring_enter` (synchronous faults still arrive).
fn block_signals() {
    // SAFETY: `set` is a live local that sigemptyset initialises before any other use;
    // pthread_sigmask reads it and changes only this thread's mask (no old mask is asked for).
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for signal in [
            libc::SIGHUP,
            libc::SIGINT,
            libc::SIGTERM,
            libc::SIGUSR1,
            libc::SIGUSR2,
            libc::SIGQUIT,
        ] {
            libc::sigaddset(&mut set, signal);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}
