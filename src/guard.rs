//! The glue between the ring and the engine: the live policy, the connection limits, and the
//! factory that gives each accepted connection a [`Session`] holding the policy snapshot
//! current at accept.
//!
//! Sessions under `starttls = "terminate"` route the client's bytes through the sans-IO TLS
//! layer ([`crate::tls`]) once the engine has answered STARTTLS: ciphertext from the ring goes
//! in, plaintext to the engine, and its replies to the client come back encrypted.
//!
//! Owns the policy generation, the per-host connection counts and, per worker, the totals of
//! what ended sessions decided (published once per second, never shared per event). Must not
//! touch sockets (the ring's) or SMTP (the engine's).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use parking_lot::{Mutex, RwLock};

use crate::config::Policy;
use crate::proto::rate::{RateKey, Rates};
use crate::proto::{Refusal, Session};
use crate::relay::{Action, Proxy, ProxyFactory};
use crate::tally::{self, End, EngineTotals, Event, SessionReport, Watch};
use crate::tls::{self, ServerSide};

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
    /// What the client is shown when the guard terminates STARTTLS.
    tls_config: Option<Arc<rustls::ServerConfig>>,
    /// The client connection's TLS, from the engine's `220` to STARTTLS on.
    tls: Option<ServerSide>,
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
            tls_config: None,
            tls: None,
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
    /// TLS layer decrypted, not the ring's buffer), then encrypts what it sends the client
    /// once the client side is TLS, starting at the engine's `220` if this call sent it.
    fn run(
        &mut self,
        event: Event,
        out: &mut Vec<Action>,
        input: &[u8],
        copy_input: bool,
        call: impl FnOnce(&mut Session, &mut Vec<Action>),
    ) {
        let from = out.len();
        self.step(event, out, call);
        let seal_from = match self.inner.take_tls_switch() {
            Some(at) => {
                self.tls = self.tls_config.clone().and_then(ServerSide::new);
                if self.tls.is_none() {
                    self.fail_tls(out);
                    return;
                }
                at
            }
            None => from,
        };
        if let Some(tls) = &mut self.tls {
            tls.seal(out, seal_from, input, copy_input);
        }
    }

    /// Ciphertext from a client that started TLS.
    fn on_client_tls(&mut self, data: &[u8], now: Instant, out: &mut Vec<Action>) {
        let Some(tls) = &mut self.tls else {
            return;
        };
        let was_handshaking = tls.is_handshaking();
        let mut plain = Vec::new();
        let mut wire = Vec::new();
        let ok = tls.receive(data, &mut plain, &mut wire);
        let established = was_handshaking && !tls.is_handshaking();
        tls::push_wire(out, &mut wire);
        if !ok {
            self.fail_tls(out);
            return;
        }
        if established {
            self.inner.tls_established(now);
        }
        if !plain.is_empty() {
            self.run(Event::Client, out, &plain, true, |s, out| {
                s.on_client(&plain, now, out)
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

    /// Runs one engine call and notes how the session ended if this call ended it.
    fn step(
        &mut self,
        event: Event,
        out: &mut Vec<Action>,
        call: impl FnOnce(&mut Session, &mut Vec<Action>),
    ) {
        if self.end.is_some() {
            call(&mut self.inner, out);
            return;
        }
        let before = Watch::of(self.inner.counters());
        let snapshot = self.trace_decisions.then(|| *self.inner.counters());
        call(&mut self.inner, out);
        if let Some(snapshot) = snapshot {
            tally::log_decisions(self.peer, &snapshot, self.inner.counters());
        }
        if self.inner.is_closed() {
            let after = Watch::of(self.inner.counters());
            self.end = Some(tally::classify(event, before, after, self.draining));
        }
    }
}

impl Proxy for GuardSession {
    fn start(&mut self, now: Instant, out: &mut Vec<Action>) {
        self.run(Event::Start, out, &[], false, |s, out| s.start(now, out));
    }
    fn on_client(&mut self, data: &[u8], now: Instant, out: &mut Vec<Action>) {
        self.client_bytes += data.len() as u64;
        if self.tls.is_some() {
            self.on_client_tls(data, now, out);
            return;
        }
        self.run(Event::Client, out, data, false, |s, out| {
            s.on_client(data, now, out)
        });
    }
    fn on_upstream(&mut self, data: &[u8], now: Instant, out: &mut Vec<Action>) {
        self.upstream_bytes += data.len() as u64;
        self.run(Event::Upstream, out, data, false, |s, out| {
            s.on_upstream(data, now, out)
        });
    }
    fn on_upstream_connected(&mut self, now: Instant, out: &mut Vec<Action>) {
        let from = out.len();
        self.inner.on_upstream_connected(now, out);
        if let Some(tls) = &mut self.tls {
            tls.seal(out, from, &[], false);
        }
    }
    fn on_upstream_failed(&mut self, now: Instant, out: &mut Vec<Action>) {
        self.run(Event::UpstreamFailed, out, &[], false, |s, out| {
            s.on_upstream_failed(now, out)
        });
    }
    fn on_client_closed(&mut self, now: Instant, out: &mut Vec<Action>) {
        self.run(Event::ClientClosed, out, &[], false, |s, out| {
            s.on_client_closed(now, out)
        });
    }
    fn on_upstream_closed(&mut self, now: Instant, out: &mut Vec<Action>) {
        self.run(Event::UpstreamClosed, out, &[], false, |s, out| {
            s.on_upstream_closed(now, out)
        });
    }
    fn deadline(&self) -> Option<Instant> {
        self.inner.deadline()
    }
    fn on_timeout(&mut self, now: Instant, out: &mut Vec<Action>) {
        self.run(Event::Timeout, out, &[], false, |s, out| {
            s.on_timeout(now, out)
        });
    }
    fn on_shutdown(&mut self, force: bool, now: Instant, out: &mut Vec<Action>) {
        self.draining = true;
        self.run(Event::Shutdown, out, &[], false, |s, out| {
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
    /// Where sessions are relayed to, for their log line.
    upstream: Option<SocketAddr>,
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
            upstream: None,
            totals: EngineTotals::default(),
            published: Arc::new(Mutex::new(EngineTotals::default())),
        }
    }

    /// Names the upstream in session log lines.
    pub fn with_upstream(mut self, upstream: SocketAddr) -> SessionFactory {
        self.upstream = Some(upstream);
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
        session.tls_config = self.policy.tls.server.clone();
        session
    }
}

impl ProxyFactory for SessionFactory {
    type Session = GuardSession;

    fn new_session(&mut self, peer: SocketAddr, now: Instant) -> GuardSession {
        let generation = self.live.generation();
        if generation != self.generation {
            self.policy = self.live.snapshot();
            self.generation = generation;
        }
        let policy = Arc::clone(&self.policy);
        let client = ClientKey::of(peer.ip()).packed();
        let connection_rate = policy.rate_per_ip.connections;
        if !self
            .rates
            .lock()
            .admit(RateKey::Connections(client), connection_rate, now)
        {
            let refused = Session::refused(policy, now, Refusal::ConnectionRate);
            return self.session(refused, None, peer, now);
        }
        match self.connections.admit(peer.ip(), &policy) {
            Some(permit) => {
                let inner = Session::new(policy, now).with_rates(Arc::clone(&self.rates), client);
                self.session(inner, Some(permit), peer, now)
            }
            None => {
                let refused = Session::refused(policy, now, Refusal::TooManyConnections);
                self.session(refused, None, peer, now)
            }
        }
    }

    fn session_ended(&mut self, session: &GuardSession, now: Instant) {
        let end = session.end.unwrap_or(End::Aborted);
        let counters = session.inner.counters();
        self.totals.count(counters, end);
        tally::log_session_end(&SessionReport {
            client: session.peer,
            upstream: self.upstream,
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
}
