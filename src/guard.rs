//! The glue between the ring and the engine: the live policy, the connection limits, the
//! factory that gives each accepted connection a [`Session`] holding the policy snapshot
//! current at accept, and the choice of upstream backend for each connect the engine asks for.
//!
//! Owns the policy generation, the per-host connection counts, the PROXY protocol header of a
//! PROXY listener (read before anything else, so that limits, rates, logs and the upstream see
//! the real client), per worker the totals of what ended sessions decided (published once per
//! second, never shared per event), and failover: a backend that refuses the connect, or
//! closes before sending a byte, is marked down in the [`Pool`] and the next one is tried
//! before the engine hears of a failure. Must not touch sockets (the ring's) or SMTP (the
//! engine's).
//!
//! Sessions under `starttls = "terminate"` route the client's bytes through the sans-IO TLS
//! layer ([`crate::tls`]) once the engine has answered STARTTLS: ciphertext from the ring goes
//! in, plaintext to the engine, and its replies to the client come back encrypted. Under
//! `upstream_tls = "starttls"` the upstream's bytes do the same once its 220 to mailguard's
//! own STARTTLS came.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use parking_lot::{Mutex, RwLock};

use crate::config::Policy;
use crate::pool::{Lease, Pool, Tried};
use crate::proto::rate::{RateKey, Rates};
use crate::proto::{Identity, Refusal, Session};
use crate::proxy_header;
use crate::relay::{Action, Chunk, Proxy, ProxyFactory, Side};
use crate::tally::{self, End, EngineTotals, Event, SessionReport, Watch};
use crate::tls::{Received, Sides};

/// The policy in force, replaced as a whole on reload. Readers look at the generation (one
/// atomic load per accept) and take the lock only when it changed.
#[derive(Debug)]
pub struct LivePolicy {
    generation: AtomicU64,
    current: RwLock<Arc<Policy>>,
    /// Reloads refused because the new file was invalid (for metrics).
    refused: AtomicU64,
}

impl LivePolicy {
    /// Starts at generation 1 with `policy`.
    pub fn new(policy: Policy) -> Arc<LivePolicy> {
        Arc::new(LivePolicy {
            generation: AtomicU64::new(1),
            current: RwLock::new(Arc::new(policy)),
            refused: AtomicU64::new(0),
        })
    }

    /// Makes `policy` the one new sessions get; returns its generation. Open sessions keep
    /// the snapshot they started with.
    pub fn replace(&self, policy: Policy) -> u64 {
        let mut current = self.current.write();
        *current = Arc::new(policy);
        self.generation.fetch_add(1, Ordering::Release) + 1
    }

    /// Counts a reload that was refused (the policy in force stays).
    pub fn note_refused(&self) {
        self.refused.fetch_add(1, Ordering::Relaxed);
    }

    /// Reloads refused so far.
    pub fn reloads_refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// The generation now in force.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The policy now in force.
    pub fn snapshot(&self) -> Arc<Policy> {
        Arc::clone(&self.current.read())
    }
}

/// Sessions open on this host, in all and per client address. Shared by the workers; touched
/// once when a connection is accepted and once when it ends, never per command.
#[derive(Debug, Default)]
pub struct Connections {
    counts: Mutex<Counts>,
}

#[derive(Debug, Default)]
struct Counts {
    total: u32,
    per_client: HashMap<ClientKey, u32>,
}

/// What `max_connections_per_ip` counts as one client: an IPv4 address, or an IPv6 /64
/// (one site's addresses are usually a /64 it can pick from freely).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ClientKey {
    V4(u32),
    V6Net(u64),
}

impl ClientKey {
    /// The key packed into one integer for the rate table (IPv4 in the low bits, as
    /// IPv4-mapped IPv6 is; an IPv6 /64 in the high bits).
    pub fn packed(self) -> u128 {
        match self {
            ClientKey::V4(v4) => (0xffff_u128 << 32) | u128::from(v4),
            ClientKey::V6Net(net) => u128::from(net) << 64,
        }
    }

    /// The key of a peer address; IPv4-mapped IPv6 counts as IPv4.
    pub fn of(ip: IpAddr) -> ClientKey {
        match ip {
            IpAddr::V4(v4) => ClientKey::V4(u32::from(v4)),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => ClientKey::V4(u32::from(v4)),
                None => ClientKey::V6Net((u128::from(v6) >> 64) as u64),
            },
        }
    }
}

impl Connections {
    /// Counts a new connection from `ip` if the policy's limits allow it.
    pub fn admit(self: &Arc<Self>, ip: IpAddr, policy: &Policy) -> Option<Permit> {
        let key = ClientKey::of(ip);
        let mut counts = self.counts.lock();
        let mine = counts.per_client.get(&key).copied().unwrap_or(0);
        let over_total = policy.max_connections > 0 && counts.total >= policy.max_connections;
        let over_mine = policy.max_connections_per_ip > 0 && mine >= policy.max_connections_per_ip;
        if over_total || over_mine {
            return None;
        }
        counts.total += 1;
        counts.per_client.insert(key, mine + 1);
        Some(Permit {
            connections: Arc::clone(self),
            key,
        })
    }

    /// Sessions open now.
    pub fn open(&self) -> u32 {
        self.counts.lock().total
    }
}

/// One counted connection; dropping it uncounts it.
#[derive(Debug)]
pub struct Permit {
    connections: Arc<Connections>,
    key: ClientKey,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut counts = self.connections.counts.lock();
        counts.total = counts.total.saturating_sub(1);
        if let Some(n) = counts.per_client.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                counts.per_client.remove(&self.key);
            }
        }
    }
}

/// The session the ring drives: the engine's [`Session`] plus what this host counts and logs
/// about it (peer, start, bytes, how it ended).
#[derive(Debug)]
pub struct GuardSession {
    inner: Session,
    _permit: Option<Permit>,
    peer: SocketAddr,
    started: Instant,
    generation: u64,
    client_bytes: u64,
    upstream_bytes: u64,
    /// Set by the call that closed the session.
    end: Option<End>,
    /// Log each policy decision (debug level was on when the session started).
    trace_decisions: bool,
    /// The server asked it to end (a drain).
    draining: bool,
    /// Which backend the upstream connection goes to.
    backend: Backend,
    /// The TLS of either side, once the engine switched it.
    tls: Sides,
    /// On a PROXY listener, until the header has been read: the engine session does not
    /// exist yet (`inner` is a placeholder that is never started).
    awaiting: Option<Box<AwaitHeader>>,
}

/// A PROXY listener's connection before its header: what admitting it will need.
#[derive(Debug)]
struct AwaitHeader {
    gate: Gate,
    /// Header bytes so far (bounded by the parser: at most [`proxy_header::V2_MAX`]).
    buf: Vec<u8>,
    deadline: Instant,
}

/// What admitting a client needs: the policy it gets, the worker's rate table and the host's
/// connection counts, and the address the client connected to (the socket's own).
#[derive(Debug, Clone)]
struct Gate {
    policy: Arc<Policy>,
    rates: Arc<Mutex<Rates>>,
    connections: Arc<Connections>,
    local: SocketAddr,
}

impl Gate {
    /// The engine session for a client at `peer` that connected to `local`: refused before
    /// any banner when a limit says so.
    fn admit(
        &self,
        peer: SocketAddr,
        local: SocketAddr,
        now: Instant,
    ) -> (Session, Option<Permit>) {
        let policy = Arc::clone(&self.policy);
        let client = ClientKey::of(peer.ip()).packed();
        let connection_rate = policy.rate_per_ip.connections;
        if !self
            .rates
            .lock()
            .admit(RateKey::Connections(client), connection_rate, now)
        {
            return (Session::refused(policy, now, Refusal::ConnectionRate), None);
        }
        match self.connections.admit(peer.ip(), &policy) {
            Some(permit) => {
                let identity = Identity {
                    client: peer,
                    local,
                };
                let inner = Session::new(policy, now)
                    .with_rates(Arc::clone(&self.rates), client)
                    .with_identity(identity);
                (inner, Some(permit))
            }
            None => (
                Session::refused(policy, now, Refusal::TooManyConnections),
                None,
            ),
        }
    }
}

/// The upstream side as the pool sees it: which backend the current connect attempt is on,
/// which ones it already tried, and whether the connection has carried a byte yet.
#[derive(Debug, Default)]
struct Backend {
    pool: Option<Arc<Pool>>,
    /// Held while an upstream connection is open or being opened (least-sessions counts it).
    lease: Option<Lease>,
    tried: Tried,
    /// The backend of the last connect, for the ring and the session's log line.
    addr: Option<SocketAddr>,
    /// Nothing was received from the current upstream connection, nor sent to it beyond what
    /// the engine sends on every connect (so a replacement connection gets the same).
    quiet: bool,
}

impl Backend {
    /// Leases the next backend of this connect attempt; false once all were tried.
    fn next(&mut self, now: Instant) -> bool {
        self.lease = None;
        let Some(pool) = &self.pool else {
            return false;
        };
        let Some(i) = pool.pick(self.tried, now) else {
            return false;
        };
        self.tried.add(i);
        self.addr = Some(pool.addr(i));
        self.lease = Some(pool.lease(i));
        self.quiet = true;
        true
    }

    /// The current backend failed before carrying a byte: marks it down and leases the next
    /// untried one. False when there is none (the engine must hear of the failure).
    fn fail_over(&mut self, now: Instant) -> bool {
        let Some(lease) = self.lease.take() else {
            return false;
        };
        if let Some(pool) = &self.pool {
            pool.mark_failed(lease.index(), now);
        }
        self.next(now)
    }

    /// Follows what the engine asked of the upstream in `actions`.
    fn follow(&mut self, actions: &[Action], now: Instant) {
        for action in actions {
            match action {
                Action::Connect => {
                    self.tried = Tried::default();
                    self.next(now);
                }
                Action::CloseUpstream | Action::Close => self.lease = None,
                Action::Send(Side::Upstream, chunk) if !chunk.is_empty() => self.quiet = false,
                Action::Send(..) => {}
            }
        }
    }
}

impl GuardSession {
    fn new(inner: Session, permit: Option<Permit>, peer: SocketAddr, now: Instant) -> Self {
        GuardSession {
            inner,
            _permit: permit,
            peer,
            started: now,
            generation: 0,
            client_bytes: 0,
            upstream_bytes: 0,
            end: None,
            draining: false,
            backend: Backend::default(),
            tls: Sides::default(),
            awaiting: None,
            trace_decisions: tracing::enabled!(
                target: "mailguard::decision",
                tracing::Level::DEBUG
            ),
        }
    }

    /// The engine session inside.
    pub fn engine(&self) -> &Session {
        &self.inner
    }

    /// The client's address.
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// How the session ended: `None` while it runs; [`End::Aborted`] is reported by the
    /// factory for a session the ring ended without its consent.
    pub fn end(&self) -> Option<End> {
        self.end
    }

    /// Runs one engine call whose input was `input` (`copy_input` when that is plaintext the
    /// TLS layer decrypted, not the ring's buffer), then encrypts what it sends to each side
    /// that is TLS, starting a side at the point this call switched it (the engine's `220` to
    /// the client's STARTTLS, or the upstream's `220` to mailguard's).
    fn run(
        &mut self,
        event: Event,
        now: Instant,
        out: &mut Vec<Action>,
        input: &[u8],
        copy_input: bool,
        call: impl FnOnce(&mut Session, &mut Vec<Action>),
    ) {
        let from = out.len();
        self.step(event, now, out, call);
        let client_switch = self.inner.take_tls_switch();
        let upstream_switch = self.inner.take_upstream_tls_switch();
        if let (Some(_), Some(addr)) = (upstream_switch, self.backend.addr) {
            self.tls.aim(addr);
        }
        let sealed = self
            .tls
            .seal(out, from, input, copy_input, client_switch, upstream_switch);
        if !sealed {
            self.fail_tls(out);
        }
    }

    /// Ciphertext from a client that started TLS.
    fn on_client_tls(&mut self, data: &[u8], now: Instant, out: &mut Vec<Action>) {
        let Some(tls) = &mut self.tls.client else {
            return;
        };
        let Received {
            ok,
            established,
            plain,
        } = tls.take_in(data, out);
        if !ok {
            self.fail_tls(out);
            return;
        }
        if established {
            self.inner.tls_established(now);
        }
        if !plain.is_empty() {
            self.run(Event::Client, now, out, &plain, true, |s, out| {
                s.on_client(&plain, now, out)
            });
        }
    }

    /// Ciphertext from an upstream mailguard started TLS with. A failed handshake (its
    /// certificate did not verify, say) is the upstream lost: the client gets the engine's
    /// `421`, and nothing is relayed in plain text.
    fn on_upstream_tls(&mut self, data: &[u8], now: Instant, out: &mut Vec<Action>) {
        let Some(tls) = &mut self.tls.upstream else {
            return;
        };
        let Received {
            ok,
            established,
            plain,
        } = tls.take_in(data, out);
        if !ok {
            let error = tls.error().unwrap_or("connection failed").to_string();
            self.tls.upstream = None;
            tracing::warn!(
                target: "mailguard::session",
                peer = %self.peer,
                %error,
                "upstream TLS failed"
            );
            self.run(Event::UpstreamClosed, now, out, &[], false, |s, out| {
                s.on_upstream_closed(now, out)
            });
            return;
        }
        if established {
            self.run(Event::Upstream, now, out, &[], false, |s, out| {
                s.upstream_tls_established(now, out)
            });
        }
        if !plain.is_empty() {
            self.run(Event::Upstream, now, out, &plain, true, |s, out| {
                s.on_upstream(&plain, now, out)
            });
        }
    }

    /// A failed handshake or a fatal TLS error: the session ends without an SMTP reply, since
    /// there is no channel left to send one on.
    fn fail_tls(&mut self, out: &mut Vec<Action>) {
        if self.end.is_none() {
            self.end = Some(End::ProtocolError);
            out.push(Action::Close);
        }
    }

    /// Reads PROXY header bytes; once the header is whole, admits the real client, starts the
    /// engine and hands it what followed the header.
    fn on_header_bytes(&mut self, data: &[u8], now: Instant, out: &mut Vec<Action>) {
        let Some(wait) = self.awaiting.as_mut() else {
            return;
        };
        let before = wait.buf.len();
        wait.buf.extend_from_slice(data);
        let (header, used) = match proxy_header::parse(&wait.buf) {
            Ok(Some(parsed)) => parsed,
            Ok(None) => return,
            Err(e) => return self.refuse_header(&e.to_string(), out),
        };
        let Some(wait) = self.awaiting.take() else {
            return;
        };
        let (peer, local) = header.addresses.unwrap_or((self.peer, wait.gate.local));
        let (inner, permit) = wait.gate.admit(peer, local, now);
        self.inner = inner;
        self._permit = permit;
        self.peer = peer;
        self.run(Event::Start, now, out, &[], false, |s, out| {
            s.start(now, out)
        });
        // The header ended inside this input: what follows it is the client's first bytes.
        let skip = used.saturating_sub(before);
        if skip < data.len() && self.end.is_none() {
            let first = out.len();
            let rest = &data[skip..];
            self.run(Event::Client, now, out, rest, false, |s, out| {
                s.on_client(rest, now, out)
            });
            shift_input(&mut out[first..], skip);
        }
    }

    /// No valid header: closed without a word of SMTP, since whatever sent it is not a
    /// balancer speaking the PROXY protocol.
    fn refuse_header(&mut self, why: &str, out: &mut Vec<Action>) {
        self.awaiting = None;
        tracing::warn!(
            target: "mailguard::session",
            peer = %self.peer,
            reason = why,
            "PROXY protocol header refused, connection closed"
        );
        self.end = Some(End::ProxyHeader);
        out.push(Action::Close);
    }

    /// Runs one engine call and notes how the session ended if this call ended it.
    fn step(
        &mut self,
        event: Event,
        now: Instant,
        out: &mut Vec<Action>,
        call: impl FnOnce(&mut Session, &mut Vec<Action>),
    ) {
        let from = out.len();
        if self.end.is_some() {
            call(&mut self.inner, out);
            self.backend.follow(&out[from..], now);
            return;
        }
        let before = Watch::of(self.inner.counters());
        let snapshot = self.trace_decisions.then(|| *self.inner.counters());
        let unsent = self.inner.counters().identity_unsent;
        call(&mut self.inner, out);
        self.backend.follow(&out[from..], now);
        if let Some(snapshot) = snapshot {
            tally::log_decisions(self.peer, &snapshot, self.inner.counters());
        }
        if self.inner.counters().identity_unsent > unsent {
            tracing::warn!(
                target: "mailguard::session",
                client = %self.peer,
                "upstream_identity = \"xclient\" but the upstream did not accept XCLIENT; relaying without it"
            );
        }
        if self.inner.is_closed() {
            let after = Watch::of(self.inner.counters());
            self.end = Some(tally::classify(event, before, after, self.draining));
        }
    }
}

impl Proxy for GuardSession {
    fn start(&mut self, now: Instant, out: &mut Vec<Action>) {
        if self.awaiting.is_some() {
            return;
        }
        self.run(Event::Start, now, out, &[], false, |s, out| {
            s.start(now, out)
        });
    }
    fn on_client(&mut self, data: &[u8], now: Instant, out: &mut Vec<Action>) {
        self.client_bytes += data.len() as u64;
        if self.awaiting.is_some() {
            return self.on_header_bytes(data, now, out);
        }
        if self.tls.client.is_some() {
            return self.on_client_tls(data, now, out);
        }
        self.run(Event::Client, now, out, data, false, |s, out| {
            s.on_client(data, now, out)
        });
    }
    fn on_upstream(&mut self, data: &[u8], now: Instant, out: &mut Vec<Action>) {
        self.upstream_bytes += data.len() as u64;
        self.backend.quiet &= data.is_empty();
        if self.tls.upstream.is_some() {
            return self.on_upstream_tls(data, now, out);
        }
        self.run(Event::Upstream, now, out, data, false, |s, out| {
            s.on_upstream(data, now, out)
        });
    }
    fn on_upstream_connected(&mut self, now: Instant, out: &mut Vec<Action>) {
        // Not through `step`: what the engine sends on connect leaves the connection quiet.
        if let (Some(pool), Some(lease)) = (&self.backend.pool, &self.backend.lease) {
            pool.mark_connected(lease.index());
        }
        let from = out.len();
        self.inner.on_upstream_connected(now, out);
        if !self.tls.seal(out, from, &[], false, None, None) {
            self.fail_tls(out);
        }
    }
    fn on_upstream_failed(&mut self, now: Instant, out: &mut Vec<Action>) {
        if self.backend.fail_over(now) {
            out.push(Action::Connect);
            return;
        }
        self.run(Event::UpstreamFailed, now, out, &[], false, |s, out| {
            s.on_upstream_failed(now, out)
        });
    }
    fn on_client_closed(&mut self, now: Instant, out: &mut Vec<Action>) {
        if self.awaiting.take().is_some() {
            // A balancer's plain TCP check: nothing worth a warning.
            self.end = Some(End::ClientClosed);
            return out.push(Action::Close);
        }
        self.run(Event::ClientClosed, now, out, &[], false, |s, out| {
            s.on_client_closed(now, out)
        });
    }
    fn on_upstream_closed(&mut self, now: Instant, out: &mut Vec<Action>) {
        // Closed before a single byte either way: refused before the banner, so nothing of
        // the session was lost and another backend can take it unnoticed.
        if self.backend.quiet && self.backend.fail_over(now) {
            out.extend([Action::CloseUpstream, Action::Connect]);
            return;
        }
        self.backend.lease = None;
        self.run(Event::UpstreamClosed, now, out, &[], false, |s, out| {
            s.on_upstream_closed(now, out)
        });
    }
    fn deadline(&self) -> Option<Instant> {
        match &self.awaiting {
            Some(wait) => Some(wait.deadline),
            None => self.inner.deadline(),
        }
    }
    fn upstream_addr(&self) -> Option<SocketAddr> {
        self.backend.addr
    }
    fn on_timeout(&mut self, now: Instant, out: &mut Vec<Action>) {
        match &self.awaiting {
            Some(wait) if now >= wait.deadline => {
                return self.refuse_header("no PROXY header before greeting_timeout", out)
            }
            Some(_) => return,
            None => {}
        }
        self.run(Event::Timeout, now, out, &[], false, |s, out| {
            s.on_timeout(now, out)
        });
    }
    fn on_shutdown(&mut self, force: bool, now: Instant, out: &mut Vec<Action>) {
        self.draining = true;
        if self.awaiting.take().is_some() {
            self.end = Some(End::Shutdown);
            return out.push(Action::Close);
        }
        self.run(Event::Shutdown, now, out, &[], false, |s, out| {
            s.on_shutdown(force, now, out)
        });
    }
}

/// One per worker thread: makes sessions with a cached policy snapshot.
#[derive(Debug)]
pub struct SessionFactory {
    live: Arc<LivePolicy>,
    connections: Arc<Connections>,
    generation: u64,
    policy: Arc<Policy>,
    /// This worker's rate table (limits are per host, and per worker within it).
    rates: Arc<Mutex<Rates>>,
    /// The backends each connect picks from (without it, the ring's configured upstream).
    pool: Option<Arc<Pool>>,
    /// Every connection starts with a PROXY protocol header.
    proxy_protocol: bool,
    /// What ended sessions decided, owned by this worker; copied to `published` each tick.
    totals: EngineTotals,
    published: Arc<Mutex<EngineTotals>>,
}

/// Keys one worker's rate table holds at most.
const RATE_TABLE_KEYS: usize = 100_000;

impl SessionFactory {
    /// A factory reading from `live` and counting into `connections` (shared by all workers).
    pub fn new(live: Arc<LivePolicy>, connections: Arc<Connections>) -> SessionFactory {
        let generation = live.generation();
        let policy = live.snapshot();
        SessionFactory {
            live,
            connections,
            generation,
            policy,
            rates: Arc::new(Mutex::new(Rates::new(RATE_TABLE_KEYS))),
            pool: None,
            proxy_protocol: false,
            totals: EngineTotals::default(),
            published: Arc::new(Mutex::new(EngineTotals::default())),
        }
    }

    /// Picks the upstream of every connect from `pool`.
    pub fn with_pool(mut self, pool: Arc<Pool>) -> SessionFactory {
        self.pool = Some(pool);
        self
    }

    /// Whether every connection starts with a PROXY protocol header.
    pub fn with_proxy_protocol(mut self, proxy_protocol: bool) -> SessionFactory {
        self.proxy_protocol = proxy_protocol;
        self
    }

    /// Publishes this worker's totals into `published` (about once per second).
    pub fn with_totals(mut self, published: Arc<Mutex<EngineTotals>>) -> SessionFactory {
        self.published = published;
        self
    }

    /// Where this factory publishes its totals.
    pub fn totals(&self) -> Arc<Mutex<EngineTotals>> {
        Arc::clone(&self.published)
    }

    fn session(
        &self,
        inner: Session,
        permit: Option<Permit>,
        peer: SocketAddr,
        now: Instant,
    ) -> GuardSession {
        let mut session = GuardSession::new(inner, permit, peer, now);
        session.generation = self.generation;
        session.backend.pool = self.pool.clone();
        let t = &self.policy.tls;
        session.tls = Sides::new(t.server.clone(), t.client.clone());
        session
    }
}

impl ProxyFactory for SessionFactory {
    type Session = GuardSession;

    fn new_session(&mut self, peer: SocketAddr, local: SocketAddr, now: Instant) -> GuardSession {
        let generation = self.live.generation();
        if generation != self.generation {
            self.policy = self.live.snapshot();
            self.generation = generation;
        }
        let gate = Gate {
            policy: Arc::clone(&self.policy),
            rates: Arc::clone(&self.rates),
            connections: Arc::clone(&self.connections),
            local,
        };
        if self.proxy_protocol {
            // Nothing is counted against the balancer's address: the header names the client.
            let placeholder = Session::new(Arc::clone(&self.policy), now);
            let mut session = self.session(placeholder, None, peer, now);
            session.awaiting = Some(Box::new(AwaitHeader {
                // The header stands where the client's first words would.
                deadline: now + self.policy.greeting_timeout,
                gate,
                buf: Vec::new(),
            }));
            return session;
        }
        let (inner, permit) = gate.admit(peer, local, now);
        self.session(inner, permit, peer, now)
    }

    fn session_ended(&mut self, session: &GuardSession, now: Instant) {
        let end = session.end.unwrap_or(End::Aborted);
        let counters = session.inner.counters();
        self.totals.count(counters, end);
        tally::log_session_end(&SessionReport {
            client: session.peer,
            upstream: session.backend.addr,
            duration: now.saturating_duration_since(session.started),
            generation: session.generation,
            counters,
            end,
            client_bytes: session.client_bytes,
            upstream_bytes: session.upstream_bytes,
        });
    }

    fn publish(&mut self) {
        *self.published.lock() = self.totals;
    }
}

/// Moves input ranges of `actions` by `by`: they were made for a suffix of the ring's input.
fn shift_input(actions: &mut [Action], by: usize) {
    for a in actions {
        if let Action::Send(_, Chunk::Input(r)) = a {
            *r = r.start + by..r.end + by;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(text: &str) -> Policy {
        Policy::parse(text, "test").unwrap()
    }

    #[test]
    fn per_client_limit_counts_ipv6_per_64() {
        let c = Arc::new(Connections::default());
        let p = policy("max_connections_per_ip = 2");
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let other: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        let first = c.admit(a, &p).unwrap();
        let _second = c.admit(b, &p).unwrap();
        assert!(c.admit(a, &p).is_none(), "same /64");
        assert!(c.admit(other, &p).is_some(), "another /64");
        drop(first);
        assert!(c.admit(b, &p).is_some(), "a slot came back");
    }

    #[test]
    fn total_limit_and_mapped_v4() {
        let c = Arc::new(Connections::default());
        let p = policy("max_connections = 1");
        let v4: IpAddr = "192.0.2.1".parse().unwrap();
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        assert_eq!(ClientKey::of(v4), ClientKey::of(mapped));
        let permit = c.admit(v4, &p).unwrap();
        assert!(c.admit("192.0.2.2".parse().unwrap(), &p).is_none());
        assert_eq!(c.open(), 1);
        drop(permit);
        assert_eq!(c.open(), 0);
        assert!(c.admit(mapped, &policy("")).is_some());
    }

    const LOCAL: &str = "192.0.2.1:25";

    fn proxy_factory(policy_text: &str) -> SessionFactory {
        let live = LivePolicy::new(policy(policy_text));
        SessionFactory::new(live, Arc::new(Connections::default())).with_proxy_protocol(true)
    }

    fn actions(f: impl FnOnce(&mut Vec<Action>)) -> Vec<Action> {
        let mut out = Vec::new();
        f(&mut out);
        out
    }

    #[test]
    fn proxy_listener_admits_the_real_client_after_the_header() {
        let mut f = proxy_factory("max_connections_per_ip = 1");
        let now = Instant::now();
        let balancer: SocketAddr = "10.0.0.1:5000".parse().unwrap();
        let header = b"PROXY TCP4 192.0.2.9 192.0.2.1 4000 25\r\n";
        let mut sessions = Vec::new();
        for _ in 0..2 {
            let mut s = f.new_session(balancer, LOCAL.parse().unwrap(), now);
            assert!(
                actions(|o| s.start(now, o)).is_empty(),
                "waits for the header"
            );
            assert!(actions(|o| s.on_client(&header[..10], now, o)).is_empty());
            let out = actions(|o| s.on_client(&header[10..], now, o));
            assert_eq!(s.peer(), "192.0.2.9:4000".parse().unwrap());
            sessions.push((s, out));
        }
        assert_eq!(sessions[0].1, vec![Action::Connect]);
        assert_eq!(
            sessions[1].1,
            vec![
                Action::Send(
                    crate::relay::Side::Client,
                    Chunk::Static(b"421 4.7.0 Too many connections\r\n")
                ),
                Action::Close
            ],
            "the second from the same real client is over the limit"
        );
        assert_eq!(sessions[1].0.end(), Some(End::Refused));
    }

    #[test]
    fn proxy_listener_closes_without_a_reply_on_a_bad_or_late_header() {
        let mut f = proxy_factory("greeting_timeout = 5");
        let now = Instant::now();
        let peer: SocketAddr = "10.0.0.1:5000".parse().unwrap();
        let mut s = f.new_session(peer, LOCAL.parse().unwrap(), now);
        assert_eq!(
            actions(|o| s.on_client(b"EHLO x\r\n", now, o)),
            vec![Action::Close]
        );
        assert_eq!(s.end(), Some(End::ProxyHeader));
        let mut s = f.new_session(peer, LOCAL.parse().unwrap(), now);
        let late = now + std::time::Duration::from_secs(5);
        assert_eq!(s.deadline(), Some(late));
        assert_eq!(actions(|o| s.on_timeout(late, o)), vec![Action::Close]);
        assert_eq!(s.end(), Some(End::ProxyHeader));
        assert_eq!(s.peer(), peer, "no header, no other address");
    }

    #[test]
    fn v2_local_keeps_the_socket_address() {
        let mut f = proxy_factory("");
        let now = Instant::now();
        let peer: SocketAddr = "10.0.0.1:5000".parse().unwrap();
        let mut s = f.new_session(peer, LOCAL.parse().unwrap(), now);
        let local = b"\r\n\r\n\0\r\nQUIT\n\x20\x00\x00\x00";
        assert_eq!(
            actions(|o| s.on_client(local, now, o)),
            vec![Action::Connect]
        );
        assert_eq!(s.peer(), peer);
    }
}
