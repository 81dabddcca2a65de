//! The engine's side of `upstream_tls = "starttls"`: the preamble sends STARTTLS and, on the
//! upstream's 220, the session marks where the upstream connection becomes TLS and waits,
//! still in the preamble, until the guard layer reports the finished handshake.
//!
//! Owns only that hand-over. Must not touch the encryption (the guard layer's) or the order
//! of the hidden steps (`preamble.rs`).

use std::time::Instant;

use crate::relay::Action;

use super::{Session, Up};

impl Session {
    /// Where in the actions of the last call the upstream connection became TLS: upstream
    /// sends at this index and after are to be encrypted.
    pub fn take_upstream_tls_switch(&mut self) -> Option<usize> {
        self.upstream_tls_switch.take()
    }

    /// The upstream TLS handshake finished: the rest of the preamble runs inside it.
    pub fn upstream_tls_established(&mut self, now: Instant, out: &mut Vec<Action>) {
        self.now = now;
        self.upstream_since = now;
        self.counters.upstream_tls += 1;
        if let Up::Preamble { replay } = self.up {
            let next = self.preamble.resume();
            self.preamble_next(next, replay, out);
        }
    }
}
