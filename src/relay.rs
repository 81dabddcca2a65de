//! The vocabulary shared by the protocol engine and the ring: which side of a proxied pair,
//! what bytes to send, what to do with the connections, and the [`Proxy`] trait through which
//! the ring drives one session.
//!
//! This module owns no I/O and knows no protocol. The ring (`io/`) only ever sees these types,
//! so it stays ignorant of SMTP; the engine (`proto/`) only ever produces them, so it stays
//! ignorant of sockets and io_uring.

use std::net::SocketAddr;
use std::ops::Range;
use std::time::Instant;

/// One of the two connections of a proxied session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Side {
    /// The connection accepted from the mail client.
    Client,
    /// The connection the proxy opened to the upstream mail server.
    Upstream,
}

/// Bytes to send. `Input` borrows from the slice handed to the call that produced it, so
/// forwarded bytes are never copied by the engine; the ring must consume the actions of a call
/// before it reuses that input buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Chunk {
    /// A range of the input slice of the call that produced this chunk.
    Input(Range<usize>),
    /// Constant bytes (fixed replies, line-ending fix-ups).
    Static(&'static [u8]),
    /// Bytes the engine generated (rewritten replies, reassembled lines).
    Owned(Vec<u8>),
}

impl Chunk {
    /// The bytes of this chunk, given the input of the call that produced it.
    pub fn bytes<'a>(&'a self, input: &'a [u8]) -> &'a [u8] {
        match self {
            Chunk::Input(r) => &input[r.clone()],
            Chunk::Static(s) => s,
            Chunk::Owned(v) => v,
        }
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        match self {
            Chunk::Input(r) => r.len(),
            Chunk::Static(s) => s.len(),
            Chunk::Owned(v) => v.len(),
        }
    }

    /// True when the chunk holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What the engine asks the ring to do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Open a connection to the upstream server. The ring answers with
    /// [`Proxy::on_upstream_connected`] or [`Proxy::on_upstream_failed`].
    Connect,
    /// Queue bytes for a side; bytes for one side leave in the order they were queued.
    Send(Side, Chunk),
    /// Drop the upstream connection now, discarding whatever is still queued for it. This is
    /// how an upstream transaction is aborted without delivery. No `on_upstream_closed` follows.
    CloseUpstream,
    /// Flush what is queued for the client, then close both connections and end the session.
    Close,
}

/// One proxied session as the ring sees it: bytes and events in, [`Action`]s out.
///
/// Every method appends to `out`; the ring executes the actions in order after the call. No
/// method blocks or performs I/O. `now` is the only clock the session sees.
pub trait Proxy {
    /// The client connection was accepted.
    fn start(&mut self, now: Instant, out: &mut Vec<Action>);
    /// Bytes arrived from the client.
    fn on_client(&mut self, data: &[u8], now: Instant, out: &mut Vec<Action>);
    /// Bytes arrived from the upstream.
    fn on_upstream(&mut self, data: &[u8], now: Instant, out: &mut Vec<Action>);
    /// The connection asked for by [`Action::Connect`] is established.
    fn on_upstream_connected(&mut self, now: Instant, out: &mut Vec<Action>);
    /// The connection asked for by [`Action::Connect`] could not be established.
    fn on_upstream_failed(&mut self, now: Instant, out: &mut Vec<Action>);
    /// The client closed its side or the connection failed; nothing more will arrive from it.
    fn on_client_closed(&mut self, now: Instant, out: &mut Vec<Action>);
    /// The upstream closed its side or the connection failed.
    fn on_upstream_closed(&mut self, now: Instant, out: &mut Vec<Action>);
    /// The instant at which [`Proxy::on_timeout`] should be called, if any.
    fn deadline(&self) -> Option<Instant>;
    /// The deadline returned by [`Proxy::deadline`] has passed.
    fn on_timeout(&mut self, now: Instant, out: &mut Vec<Action>);
    /// The server is shutting down. Without `force` the session should end at its next
    /// quiet point (it may be called again); with `force` it must end now.
    fn on_shutdown(&mut self, force: bool, now: Instant, out: &mut Vec<Action>);
}

/// Makes one [`Proxy`] per accepted connection. Each worker thread owns one factory, so a
/// factory may cache per-thread state (such as the policy snapshot) without locks.
pub trait ProxyFactory {
    /// The session type this factory makes.
    type Session: Proxy;
    /// A client connected from `peer` to `local` (the accepted socket's own address).
    fn new_session(&mut self, peer: SocketAddr, local: SocketAddr, now: Instant) -> Self::Session;
    /// The ring is done with `session`: its sockets are closed and its slot is being freed.
    /// Called on the worker thread, once per session (sessions still open when a worker gives
    /// up on them at exit are not reported). For per-worker totals and the session's log line.
    fn session_ended(&mut self, session: &Self::Session, now: Instant) {
        let _ = (session, now);
    }
    /// Called on the worker thread about once per second and once more before it returns:
    /// the moment to copy per-worker totals where other threads can read them.
    fn publish(&mut self) {}
}
