//! One proxied session on a worker: its two sockets, their outgoing bytes, and the session
//! ([`Proxy`]) that decides what happens.
//!
//! Owns per-socket bookkeeping (operations in flight, receive arming, backpressure, the send
//! queues whose memory the kernel reads during a send) and turns session [`Action`]s into
//! submission entries appended to [`Cx::sqes`]. It never touches the ring, the buffer ring or
//! the slab: the worker hands it completions (with the received bytes, if any) and frees its
//! slot once [`Conn::finished`] says so.
//!
//! Socket life: a socket is *live* while the session may use it. Tearing it down (`retire`)
//! shuts it down with a direct `shutdown(2)`, cancels its operations by fd and parks it in
//! `retired` until its last operation completes; dropping it then closes the fd. So an fd is
//! never closed (and its number never reused) while the kernel may still act on it, and the
//! memory of an in-flight send lives exactly as long as the socket struct that owns it.

use std::mem;
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use io_uring::opcode;
use io_uring::squeue;
use io_uring::types::{CancelBuilder, Fd};
use socket2::{Protocol, SockAddr, Socket, Type};

use super::userdata::{Op, SlotId, Token, EPOCH_MASK};
use super::WorkerStats;
use crate::relay::{Action, Chunk, Proxy, Side};

/// Scratch actions kept between session calls (a call makes a handful).
const MAX_KEPT_ACTIONS: usize = 256;

/// How long a closing session may take to flush what is queued for its peers.
pub(crate) const FLUSH_LIMIT: Duration = Duration::from_secs(10);
/// A send queue that just emptied keeps at most this much capacity, so a bulk transfer does not
/// reallocate on every receive but one burst does not pin megabytes.
const BURST_KEEP: usize = 64 * 1024;
/// Largest single send; longer queues go out in several sends.
const MAX_SEND: usize = 1 << 30;

/// What a worker lends to connection code while it handles one completion.
pub(crate) struct Cx {
    /// Entries to submit, in order; the worker moves them into the SQ as room allows.
    pub sqes: Vec<squeue::Entry>,
    /// Scratch vector the session appends actions to (kept for its capacity).
    pub actions: Vec<Action>,
    pub stats: WorkerStats,
    /// Where `Action::Connect` goes. Boxed so its address is stable while a connect is queued.
    pub upstream: Box<SockAddr>,
    /// Buffer group of the worker's provided-buffer ring.
    pub bgid: u16,
    /// Time of the current loop iteration.
    pub now: Instant,
    /// Queued bytes for one socket above which the opposite socket stops being read.
    pub high_water: usize,
    /// Queued bytes below which reading resumes.
    pub low_water: usize,
    /// Sockets whose receive ended on an empty buffer ring; the worker re-arms them a few at a
    /// time (see [`Conn::unstarve`]) instead of letting them all race for the same buffers.
    pub starved: Vec<(SlotId, Side, u16)>,
}

/// Bytes waiting to be sent on one socket. `flight` is what the kernel may be reading (from
/// `flight[sent..]`); it is never written, reallocated or dropped while a send is in flight.
/// New bytes accumulate in `pending` and swap in once `flight` is fully sent.
#[derive(Default)]
struct OutQueue {
    flight: Vec<u8>,
    sent: usize,
    pending: Vec<u8>,
}

impl OutQueue {
    fn queued(&self) -> usize {
        self.flight.len() - self.sent + self.pending.len()
    }

    fn push(&mut self, bytes: &[u8]) {
        self.pending.extend_from_slice(bytes);
    }

    fn push_owned(&mut self, bytes: Vec<u8>) {
        if self.pending.is_empty() {
            self.pending = bytes;
        } else {
            self.pending.extend_from_slice(&bytes);
        }
    }

    /// The next range to send. Only call with no send in flight.
    fn next(&mut self) -> Option<(*const u8, u32)> {
        if self.sent == self.flight.len() {
            if self.pending.is_empty() {
                return None;
            }
            self.flight.clear();
            self.sent = 0;
            mem::swap(&mut self.flight, &mut self.pending);
        }
        let rest = &self.flight[self.sent..];
        Some((rest.as_ptr(), rest.len().min(MAX_SEND) as u32))
    }

    /// Records `n` bytes sent. Only call once the send that carried them has completed.
    fn advance(&mut self, n: usize) {
        self.sent = (self.sent + n).min(self.flight.len());
        if self.queued() == 0 {
            self.flight.clear();
            self.sent = 0;
            shrink(&mut self.flight, BURST_KEEP);
            shrink(&mut self.pending, BURST_KEEP);
        }
    }

    /// Gives all capacity back. Only call with no send in flight.
    fn trim(&mut self) {
        if self.queued() == 0 {
            self.flight = Vec::new();
            self.sent = 0;
            shrink(&mut self.pending, 0);
        }
    }
}

fn shrink(buf: &mut Vec<u8>, keep: usize) {
    if buf.capacity() > keep {
        *buf = Vec::new();
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Connecting,
    Open,
}

/// One socket of a session, live or retired.
struct Sock {
    socket: Socket,
    side: Side,
    epoch: u16,
    state: State,
    /// Submitted (or queued for submission) operations that have not completed for good.
    inflight: u32,
    recv_armed: bool,
    recv_cancelling: bool,
    /// EOF or error seen: never receive again.
    read_done: bool,
    /// `on_*_closed` already delivered for this socket.
    closed_reported: bool,
    /// Reading paused because the opposite socket's queue is over the high-water mark.
    throttled: bool,
    /// Receive ended on an empty buffer ring; waiting for the worker to let it re-arm.
    starved: bool,
    send_busy: bool,
    cancel_all_sent: bool,
    out: OutQueue,
    /// Where an upstream socket connects to (the connect entry points into it).
    target: Option<Box<SockAddr>>,
}

impl Sock {
    fn new(socket: Socket, side: Side, epoch: u16, state: State) -> Sock {
        Sock {
            socket,
            side,
            epoch,
            state,
            inflight: 0,
            recv_armed: false,
            recv_cancelling: false,
            read_done: false,
            closed_reported: false,
            throttled: false,
            starved: false,
            send_busy: false,
            cancel_all_sent: false,
            out: OutQueue::default(),
            target: None,
        }
    }

    fn token(&self, id: SlotId, op: Op) -> u64 {
        Token {
            id,
            side: self.side,
            epoch: self.epoch,
            op,
        }
        .encode()
    }

    fn fd(&self) -> Fd {
        Fd(self.socket.as_raw_fd())
    }

    fn submit(&mut self, cx: &mut Cx, entry: squeue::Entry) {
        cx.sqes.push(entry);
        self.inflight += 1;
    }

    fn complete_one(&mut self) {
        self.inflight = self.inflight.saturating_sub(1);
    }

    fn sync_recv(&mut self, want: bool, id: SlotId, cx: &mut Cx) {
        if want && !self.recv_armed {
            let entry = opcode::RecvMulti::new(self.fd(), cx.bgid)
                .build()
                .user_data(self.token(id, Op::Recv));
            self.submit(cx, entry);
            self.recv_armed = true;
        } else if !want && self.recv_armed && !self.recv_cancelling {
            let target = CancelBuilder::user_data(self.token(id, Op::Recv));
            let entry = opcode::AsyncCancel2::new(target)
                .build()
                .user_data(self.token(id, Op::Cancel));
            self.submit(cx, entry);
            self.recv_cancelling = true;
        }
    }

    fn kick_send(&mut self, id: SlotId, cx: &mut Cx) {
        if self.send_busy || self.state != State::Open {
            return;
        }
        if let Some((ptr, len)) = self.out.next() {
            // The entry points into `out.flight`, which stays untouched until this send's
            // completion clears `send_busy`, and lives in this Sock, which is not dropped while
            // `inflight > 0`.
            let entry = opcode::Send::new(self.fd(), ptr, len)
                .flags(libc::MSG_NOSIGNAL)
                .build()
                .user_data(self.token(id, Op::Send));
            self.submit(cx, entry);
            self.send_busy = true;
        }
    }

    fn connect(&mut self, id: SlotId, cx: &mut Cx, addr: Box<SockAddr>) {
        // The kernel copies the address when it prepares the request, which may be after this
        // call returns; the box lives in this Sock, which outlives every queued entry of it.
        let addr: &SockAddr = self.target.insert(addr);
        let (ptr, len) = (addr.as_ptr(), addr.len());
        let entry = opcode::Connect::new(self.fd(), ptr.cast(), len)
            .build()
            .user_data(self.token(id, Op::Connect));
        self.submit(cx, entry);
    }

    fn update_throttle(&mut self, peer_queued: usize, cx: &mut Cx) {
        if !self.throttled && peer_queued > cx.high_water {
            self.throttled = true;
            cx.stats.recv_throttled += 1;
        } else if self.throttled && peer_queued <= cx.low_water {
            self.throttled = false;
        }
    }

    /// An idle socket holds no queue memory (checked once per second, off the hot path).
    fn trim_idle(&mut self) {
        if !self.send_busy {
            self.out.trim();
        }
    }

    /// Nothing left to write (or never connected): a closing session may tear it down.
    fn flushed(&self) -> bool {
        self.state == State::Connecting || (!self.send_busy && self.out.queued() == 0)
    }

    fn teardown(&mut self, id: SlotId, cx: &mut Cx) {
        // A direct shutdown(2) wakes every pending operation of the socket at once and sends
        // FIN; IORING_OP_SHUTDOWN would be punted to a kernel worker thread.
        let _ = self.socket.shutdown(Shutdown::Both);
        self.out.pending = Vec::new();
        if self.inflight > 0 && !self.cancel_all_sent {
            let entry = opcode::AsyncCancel2::new(CancelBuilder::fd(self.fd()).all())
                .build()
                .user_data(self.token(id, Op::Cancel));
            self.submit(cx, entry);
            self.cancel_all_sent = true;
        }
    }
}

fn upstream_socket(addr: &SockAddr) -> std::io::Result<Socket> {
    let socket = Socket::new(addr.domain(), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_tcp_nodelay(true)?;
    Ok(socket)
}

#[derive(Debug, Clone, Copy)]
enum Found {
    Live(Side),
    Retired(usize),
}

/// How a receive completed, as far as the session is concerned.
pub(crate) enum Received<'a> {
    Data(&'a [u8]),
    Eof,
    /// Negative errno.
    Error(i32),
}

/// A session and its sockets.
pub(crate) struct Conn<S> {
    session: S,
    client: Option<Sock>,
    upstream: Option<Sock>,
    retired: Vec<Sock>,
    next_epoch: u16,
    /// Set once the session returned `Close` (or the worker aborts it): the flush deadline.
    closing: Option<Instant>,
    /// An `Action::Connect` could not even create a socket; reported after the current call.
    connect_failed: bool,
    /// When the current upstream connect was submitted (for the latency histogram).
    connect_started: Instant,
}

impl<S: Proxy> Conn<S> {
    pub(crate) fn new(session: S, client: Socket) -> Conn<S> {
        Conn {
            session,
            client: Some(Sock::new(client, Side::Client, 0, State::Open)),
            upstream: None,
            retired: Vec::new(),
            next_epoch: 0,
            closing: None,
            connect_failed: false,
            connect_started: Instant::now(),
        }
    }

    /// The session this connection drives.
    pub(crate) fn session(&self) -> &S {
        &self.session
    }

    /// Runs `Proxy::start` and arms the client receive.
    pub(crate) fn start(&mut self, id: SlotId, cx: &mut Cx) {
        self.drive(id, cx, &[], |s, now, out| s.start(now, out));
        self.settle(id, cx);
    }

    /// True once the session is over and no operation of any of its sockets is in flight.
    pub(crate) fn finished(&self) -> bool {
        self.closing.is_some()
            && self.client.is_none()
            && self.upstream.is_none()
            && self.retired.is_empty()
    }

    pub(crate) fn on_recv(
        &mut self,
        id: SlotId,
        cx: &mut Cx,
        (side, epoch): (Side, u16),
        more: bool,
        received: Received<'_>,
    ) {
        let Some(found) = self.find(side, epoch) else {
            return;
        };
        let sock = self.sock_mut(found);
        if !more {
            sock.complete_one();
            sock.recv_armed = false;
            sock.recv_cancelling = false;
        }
        if let Found::Live(side) = found {
            self.received(side, received, id, cx);
        }
        self.settle(id, cx);
    }

    pub(crate) fn on_send(
        &mut self,
        id: SlotId,
        cx: &mut Cx,
        (side, epoch): (Side, u16),
        res: i32,
    ) {
        let Some(found) = self.find(side, epoch) else {
            return;
        };
        let sock = self.sock_mut(found);
        sock.complete_one();
        sock.send_busy = false;
        if let Found::Live(side) = found {
            match usize::try_from(res) {
                Ok(sent) if sent > 0 => {
                    sock.out.advance(sent);
                    cx.stats.sent(side, sent);
                }
                // 0 bytes for a non-empty send would loop forever; treat it like EPIPE.
                _ => self.fail(side, id, cx),
            }
        }
        self.settle(id, cx);
    }

    pub(crate) fn on_connect(&mut self, id: SlotId, cx: &mut Cx, epoch: u16, res: i32) {
        let Some(found) = self.find(Side::Upstream, epoch) else {
            return;
        };
        let sock = self.sock_mut(found);
        sock.complete_one();
        if let Found::Live(_) = found {
            if res == 0 {
                sock.state = State::Open;
                cx.stats.upstream_connects += 1;
                let took = cx.now.saturating_duration_since(self.connect_started);
                cx.stats.connect_latency.record(took);
                self.drive(id, cx, &[], |s, now, out| s.on_upstream_connected(now, out));
            } else {
                cx.stats.upstream_connect_failures += 1;
                self.retire(Side::Upstream, id, cx);
                self.drive(id, cx, &[], |s, now, out| s.on_upstream_failed(now, out));
            }
        }
        self.settle(id, cx);
    }

    pub(crate) fn on_cancel(&mut self, id: SlotId, cx: &mut Cx, (side, epoch): (Side, u16)) {
        if let Some(found) = self.find(side, epoch) {
            self.sock_mut(found).complete_one();
            self.settle(id, cx);
        }
    }

    /// Lets a socket starved of receive buffers receive again (buffers have been replenished).
    pub(crate) fn unstarve(&mut self, id: SlotId, cx: &mut Cx, (side, epoch): (Side, u16)) {
        if let Some(Found::Live(side)) = self.find(side, epoch) {
            self.sock_mut(Found::Live(side)).starved = false;
            self.settle(id, cx);
        }
    }

    /// Once-per-second housekeeping: session deadline, bounded flush of a closing session.
    pub(crate) fn on_tick(&mut self, id: SlotId, cx: &mut Cx) {
        match self.closing {
            Some(deadline) if cx.now >= deadline => {
                self.retire(Side::Client, id, cx);
                self.retire(Side::Upstream, id, cx);
            }
            Some(_) => {}
            None => {
                if self.session.deadline().is_some_and(|d| d <= cx.now) {
                    self.drive(id, cx, &[], |s, now, out| s.on_timeout(now, out));
                }
            }
        }
        self.settle(id, cx);
        for sock in [&mut self.client, &mut self.upstream].into_iter().flatten() {
            sock.trim_idle();
        }
    }

    /// Tells the session the server is shutting down (see [`Proxy::on_shutdown`]); a session
    /// already closing is left to finish its flush.
    pub(crate) fn shutdown(&mut self, id: SlotId, cx: &mut Cx, force: bool) {
        self.drive(id, cx, &[], |s, now, out| s.on_shutdown(force, now, out));
        self.settle(id, cx);
    }

    /// Ends the session now, without flushing (worker shutdown).
    pub(crate) fn abort(&mut self, id: SlotId, cx: &mut Cx) {
        self.closing.get_or_insert(cx.now);
        self.retire(Side::Client, id, cx);
        self.retire(Side::Upstream, id, cx);
        self.settle(id, cx);
    }

    fn received(&mut self, side: Side, received: Received<'_>, id: SlotId, cx: &mut Cx) {
        match received {
            Received::Data(data) if !data.is_empty() => {
                cx.stats.received(side, data.len());
                self.drive(id, cx, data, |s, now, out| match side {
                    Side::Client => s.on_client(data, now, out),
                    Side::Upstream => s.on_upstream(data, now, out),
                });
            }
            Received::Data(_) => {}
            Received::Eof => {
                if let Some(sock) = self.live_mut(side) {
                    sock.read_done = true;
                    if !mem::replace(&mut sock.closed_reported, true) {
                        self.notify_closed(side, id, cx);
                    }
                }
            }
            Received::Error(errno) if errno == -libc::ENOBUFS => {
                cx.stats.recv_enobufs += 1;
                if let Some(sock) = self.live_mut(side) {
                    sock.starved = true;
                    cx.starved.push((id, side, sock.epoch));
                }
            }
            Received::Error(errno) if errno == -libc::ECANCELED => {}
            Received::Error(_) => self.fail(side, id, cx),
        }
    }

    /// The socket is broken: tear it down first (so a reconnect the session asks for is not
    /// torn down with it), then tell the session unless it already knows.
    fn fail(&mut self, side: Side, id: SlotId, cx: &mut Cx) {
        let reported = self.live(side).is_none_or(|s| s.closed_reported);
        self.retire(side, id, cx);
        if !reported {
            self.notify_closed(side, id, cx);
        }
    }

    fn notify_closed(&mut self, side: Side, id: SlotId, cx: &mut Cx) {
        self.drive(id, cx, &[], |s, now, out| match side {
            Side::Client => s.on_client_closed(now, out),
            Side::Upstream => s.on_upstream_closed(now, out),
        });
    }

    /// Calls the session and executes its actions; `data` is the input `Chunk::Input` refers to.
    fn drive<C>(&mut self, id: SlotId, cx: &mut Cx, data: &[u8], call: C)
    where
        C: FnOnce(&mut S, Instant, &mut Vec<Action>),
    {
        self.call(id, cx, data, call);
        // Reported here rather than from inside `execute` so session calls never nest.
        while mem::take(&mut self.connect_failed) {
            cx.stats.upstream_connect_failures += 1;
            self.call(id, cx, &[], |s, now, out| s.on_upstream_failed(now, out));
        }
    }

    fn call<C>(&mut self, id: SlotId, cx: &mut Cx, data: &[u8], call: C)
    where
        C: FnOnce(&mut S, Instant, &mut Vec<Action>),
    {
        if self.closing.is_some() {
            return;
        }
        let mut actions = mem::take(&mut cx.actions);
        call(&mut self.session, cx.now, &mut actions);
        for action in actions.drain(..) {
            self.execute(action, id, cx, data);
        }
        // One session's burst must not leave the worker holding a large scratch vector.
        if actions.capacity() > MAX_KEPT_ACTIONS {
            actions = Vec::new();
        }
        cx.actions = actions;
    }

    fn execute(&mut self, action: Action, id: SlotId, cx: &mut Cx, data: &[u8]) {
        if self.closing.is_some() {
            return;
        }
        match action {
            Action::Connect => self.connect(id, cx),
            Action::Send(side, chunk) => self.queue(side, chunk, data),
            Action::CloseUpstream => self.retire(Side::Upstream, id, cx),
            Action::Close => self.closing = Some(cx.now + FLUSH_LIMIT),
        }
    }

    fn queue(&mut self, side: Side, chunk: Chunk, data: &[u8]) {
        // Bytes for a socket that is gone (failed, or never connected) have nowhere to go.
        let Some(sock) = self.live_mut(side) else {
            return;
        };
        match chunk {
            Chunk::Input(range) => {
                if let Some(bytes) = data.get(range) {
                    sock.out.push(bytes);
                }
            }
            Chunk::Static(bytes) => sock.out.push(bytes),
            Chunk::Owned(bytes) => sock.out.push_owned(bytes),
        }
    }

    fn connect(&mut self, id: SlotId, cx: &mut Cx) {
        // A live upstream here is an engine bug; dropping it keeps one upstream per session.
        self.retire(Side::Upstream, id, cx);
        let target = match self.session.upstream_addr() {
            Some(addr) => Box::new(SockAddr::from(addr)),
            None => cx.upstream.clone(),
        };
        let Ok(socket) = upstream_socket(&target) else {
            self.connect_failed = true;
            return;
        };
        // Epochs run 1..=EPOCH_MASK so they differ from the client socket's 0.
        self.next_epoch = self.next_epoch % EPOCH_MASK + 1;
        let mut sock = Sock::new(socket, Side::Upstream, self.next_epoch, State::Connecting);
        sock.connect(id, cx, target);
        self.connect_started = cx.now;
        self.upstream = Some(sock);
    }

    fn retire(&mut self, side: Side, id: SlotId, cx: &mut Cx) {
        let Some(mut sock) = self.slot(side).take() else {
            return;
        };
        sock.teardown(id, cx);
        if sock.inflight > 0 {
            self.retired.push(sock);
        }
    }

    /// Brings sockets in line with the session state: sends, receive arming, backpressure,
    /// teardown of flushed sockets of a closing session, closing of drained retired sockets.
    fn settle(&mut self, id: SlotId, cx: &mut Cx) {
        let queued = |s: &Option<Sock>| s.as_ref().map_or(0, |s| s.out.queued());
        let (to_client, to_upstream) = (queued(&self.client), queued(&self.upstream));
        let reading = self.closing.is_none();
        for (side, peer_queued) in [(Side::Client, to_upstream), (Side::Upstream, to_client)] {
            let Some(sock) = self.live_mut(side) else {
                continue;
            };
            sock.update_throttle(peer_queued, cx);
            sock.kick_send(id, cx);
            let flushed = sock.flushed();
            if !reading && flushed {
                self.retire(side, id, cx);
                continue;
            }
            let want = reading
                && sock.state == State::Open
                && !sock.read_done
                && !sock.throttled
                && !sock.starved;
            sock.sync_recv(want, id, cx);
        }
        // Dropping a retired socket closes its fd: only now is nothing of it in flight.
        self.retired.retain(|s| s.inflight > 0);
    }

    fn find(&self, side: Side, epoch: u16) -> Option<Found> {
        if self.live(side).is_some_and(|s| s.epoch == epoch) {
            return Some(Found::Live(side));
        }
        self.retired
            .iter()
            .position(|s| s.side == side && s.epoch == epoch)
            .map(Found::Retired)
    }

    fn sock_mut(&mut self, found: Found) -> &mut Sock {
        match found {
            Found::Live(side) => match side {
                Side::Client => self.client.as_mut(),
                Side::Upstream => self.upstream.as_mut(),
            }
            .expect("find() saw this socket live"),
            Found::Retired(i) => &mut self.retired[i],
        }
    }

    fn slot(&mut self, side: Side) -> &mut Option<Sock> {
        match side {
            Side::Client => &mut self.client,
            Side::Upstream => &mut self.upstream,
        }
    }

    fn live(&self, side: Side) -> Option<&Sock> {
        match side {
            Side::Client => self.client.as_ref(),
            Side::Upstream => self.upstream.as_ref(),
        }
    }

    fn live_mut(&mut self, side: Side) -> Option<&mut Sock> {
        self.slot(side).as_mut()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_queue_short_sends_and_swap() {
        let mut q = OutQueue::default();
        q.push(b"hello ");
        let (_, len) = q.next().expect("bytes");
        assert_eq!(len, 6);
        q.push(b"world");
        q.advance(2);
        assert_eq!(q.queued(), 9);
        let (ptr, len) = q.next().expect("rest");
        assert_eq!(len, 4);
        // SAFETY: `ptr`/`len` come from `next()` on `q`, untouched since.
        assert_eq!(
            unsafe { std::slice::from_raw_parts(ptr, len as usize) },
            b"llo "
        );
        q.advance(4);
        let (_, len) = q.next().expect("pending swapped in");
        assert_eq!(len, 5);
        q.advance(5);
        assert_eq!(q.queued(), 0);
        assert!(q.next().is_none());
    }

    #[test]
    fn idle_queue_gives_memory_back() {
        let mut q = OutQueue::default();
        q.push_owned(vec![7; 100_000]);
        let (_, len) = q.next().expect("bytes");
        q.advance(len as usize);
        assert_eq!(q.flight.capacity() + q.pending.capacity(), 0);
        q.push(&[1; 1000]);
        let (_, len) = q.next().expect("bytes");
        q.advance(len as usize);
        assert!(q.flight.capacity() + q.pending.capacity() > 0);
        q.trim();
        assert_eq!(q.flight.capacity() + q.pending.capacity(), 0);
    }

    #[test]
    fn idle_session_bookkeeping_is_small() {
        // Sockets and queues, without the session itself or kernel socket buffers.
        assert!(std::mem::size_of::<Conn<()>>() <= 512);
    }
}
