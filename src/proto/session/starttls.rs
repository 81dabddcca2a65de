//! STARTTLS answered by the guard itself (`starttls = "terminate"`): the engine's side of it.
//!
//! Owns the decision of when the client's byte stream switches to TLS, the discarding of
//! everything the client sent before it saw the `220`, and the forgetting of the client's
//! HELO state afterwards (RFC 3207 4.2). Must not touch the encryption itself: the guard
//! layer learns where the switch falls in the actions with [`Session::take_tls_switch`] and
//! reports the finished handshake with [`Session::tls_established`].

use std::time::Instant;

use crate::config::StartTls;
use crate::relay::{Action, Chunk, Side};

use super::{Line, Pending, Session, Verb};

pub(super) const READY: &[u8] = b"220 2.0.0 Ready to start TLS\r\n";
pub(super) const ALREADY: &[u8] = b"503 5.5.1 TLS already active\r\n";
pub(super) const ARGUMENTS: &[u8] = b"501 5.5.4 STARTTLS takes no arguments\r\n";
pub(super) const EHLO_FIRST: &[u8] = b"503 5.5.1 Send EHLO first\r\n";

/// Where the client connection stands with TLS the guard terminates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
    Plain,
    /// The `220` went out; nothing from the client is read until the handshake completes.
    Handshaking,
    Active,
}

impl Session {
    /// The guard terminates STARTTLS under this session's policy.
    pub(super) fn terminates_tls(&self) -> bool {
        self.policy.starttls == StartTls::Terminate
    }

    /// STARTTLS from the client, answered here.
    pub(super) fn on_starttls(&mut self, line: &Line<'_>, out: &mut Vec<Action>) {
        if self.tls != Phase::Plain {
            self.local_error(ALREADY, out);
        } else if line.content().len() > b"STARTTLS".len() {
            self.local_error(ARGUMENTS, out);
        } else if self.pending.is_empty() {
            self.switch_to_tls(out);
        } else {
            // Replies to earlier pipelined commands go out in plain text first.
            self.pending.push_back(Pending::StartTls);
        }
    }

    /// Sends the `220` and marks the switch. Whatever the client sent before it saw that
    /// reply is discarded: executing it after the handshake is the STARTTLS injection bug.
    pub(super) fn switch_to_tls(&mut self, out: &mut Vec<Action>) {
        self.counters.reply(READY);
        out.push(Action::Send(Side::Client, Chunk::Static(READY)));
        self.tls_switch = Some(out.len());
        self.tls = Phase::Handshaking;
        self.held = Vec::new();
        self.line = Vec::new();
        self.discarding = false;
        self.client_since = self.now;
    }

    /// Where in the actions of the last call the client connection became TLS: actions at
    /// this index and after are to be sent encrypted.
    pub fn take_tls_switch(&mut self) -> Option<usize> {
        self.tls_switch.take()
    }

    /// The client finished the TLS handshake: commands are read again, from a client that
    /// must say EHLO anew and whose earlier HELO and AUTH no longer count.
    pub fn tls_established(&mut self, now: Instant) {
        self.now = now;
        self.client_since = now;
        self.tls = Phase::Active;
        self.counters.tls_terminated += 1;
        self.helo = None;
        self.auth.clear();
        self.auth_in_progress.clear();
        self.pipelining_offered = false;
        self.reset_transaction();
    }

    /// A transaction command after the handshake but before the new EHLO.
    pub(super) fn needs_ehlo_again(&self) -> bool {
        self.tls == Phase::Active && self.helo.is_none()
    }

    /// `503 5.5.1 Send EHLO first`; a refused BDAT's chunk still follows by length and is
    /// skipped, never read as commands.
    pub(super) fn refuse_before_ehlo(&mut self, verb: Verb, content: &[u8], out: &mut Vec<Action>) {
        if verb == Verb::BDAT {
            if let Some(b) = super::command::bdat_args(content) {
                self.mode = super::ClientMode::Bdat {
                    remaining: b.size,
                    forward: false,
                };
            }
        }
        self.local_error(EHLO_FIRST, out);
    }

    /// Adds STARTTLS to a filtered EHLO reply, while the client has not started TLS.
    pub(super) fn announce_starttls(&self, mut reply: Vec<u8>) -> Vec<u8> {
        if !self.terminates_tls() || self.tls != Phase::Plain || !self.policy.allows(Verb::STARTTLS)
        {
            return reply;
        }
        add_keyword(&mut reply, b"STARTTLS");
        reply
    }
}

/// Appends `keyword` as the new last line of a multi-line reply.
fn add_keyword(reply: &mut Vec<u8>, keyword: &[u8]) {
    let body = reply.strip_suffix(b"\r\n").unwrap_or(reply);
    let last = body
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |lf| lf + 1);
    let code: [u8; 3] = match reply.get(last..last + 3) {
        Some(&[a, b, c]) => [a, b, c],
        _ => *b"250",
    };
    if let Some(sep) = reply.get_mut(last + 3) {
        *sep = b'-';
    }
    reply.extend_from_slice(&code);
    reply.push(b' ');
    reply.extend_from_slice(keyword);
    reply.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::add_keyword;

    #[test]
    fn keyword_becomes_the_last_line() {
        let mut one = b"250 mx.example\r\n".to_vec();
        add_keyword(&mut one, b"STARTTLS");
        assert_eq!(one, b"250-mx.example\r\n250 STARTTLS\r\n");
        let mut many = b"250-mx.example\r\n250 PIPELINING\r\n".to_vec();
        add_keyword(&mut many, b"STARTTLS");
        assert_eq!(
            many,
            b"250-mx.example\r\n250-PIPELINING\r\n250 STARTTLS\r\n".to_vec()
        );
    }
}
