//! The glue between the ring and the engine: the live policy, and the factory that gives each
//! accepted connection a [`Session`] holding the policy snapshot current at accept.
//!
//! Owns the policy generation. Must not touch sockets (the ring's) or SMTP (the engine's).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use parking_lot::RwLock;

use crate::config::Policy;
use crate::proto::Session;
use crate::relay::ProxyFactory;

/// The policy in force, replaced as a whole on reload. Readers look at the generation (one
/// atomic load per accept) and take the lock only when it changed.
#[derive(Debug)]
pub struct LivePolicy {
    generation: AtomicU64,
    current: RwLock<Arc<Policy>>,
}

impl LivePolicy {
    /// Starts at generation 1 with `policy`.
    pub fn new(policy: Policy) -> Arc<LivePolicy> {
        Arc::new(LivePolicy {
            generation: AtomicU64::new(1),
            current: RwLock::new(Arc::new(policy)),
        })
    }

    /// Makes `policy` the one new sessions get; returns its generation. Open sessions keep
    /// the snapshot they started with.
    pub fn replace(&self, policy: Policy) -> u64 {
        let mut current = self.current.write();
        *current = Arc::new(policy);
        self.generation.fetch_add(1, Ordering::Release) + 1
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

/// One per worker thread: makes sessions with a cached policy snapshot.
#[derive(Debug)]
pub struct SessionFactory {
    live: Arc<LivePolicy>,
    generation: u64,
    policy: Arc<Policy>,
}

impl SessionFactory {
    /// A factory reading from `live`.
    pub fn new(live: Arc<LivePolicy>) -> SessionFactory {
        let generation = live.generation();
        let policy = live.snapshot();
        SessionFactory {
            live,
            generation,
            policy,
        }
    }
}

impl ProxyFactory for SessionFactory {
    type Session = Session;

    fn new_session(&mut self, _peer: SocketAddr, now: Instant) -> Session {
        let generation = self.live.generation();
        if generation != self.generation {
            self.policy = self.live.snapshot();
            self.generation = generation;
        }
        Session::new(Arc::clone(&self.policy), now)
    }
}
