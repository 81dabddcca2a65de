//! One side's TLS state (rustls's buffered `ServerConnection` towards the client,
//! `ClientConnection` towards the upstream), and the rewriting of the engine's actions across
//! the encryption boundary. Must not decide anything about SMTP: it never looks inside the
//! plaintext.

use std::io::{Read, Write};
use std::sync::Arc;

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, Connection, ServerConfig, ServerConnection};

use crate::relay::{Action, Chunk, Side};

/// Most plaintext taken out of rustls per read call (its own buffer limit bounds the total).
const READ_STEP: usize = 16 * 1024;

/// One TLS connection of a session: the server side towards the client from its first
/// ClientHello byte on, or the client side towards the upstream from its 220 to STARTTLS on.
#[derive(Debug)]
pub struct Endpoint {
    conn: Connection,
    /// The side of the session this connection is on.
    side: Side,
    /// The handshake failed or the peer sent a fatal alert: nothing more is read or written.
    failed: bool,
    /// What rustls said when it failed, for the log.
    error: Option<String>,
}

impl Endpoint {
    /// The server side towards the client; `None` only if rustls refuses the config itself.
    pub fn server(config: Arc<ServerConfig>) -> Option<Endpoint> {
        let conn = ServerConnection::new(config).ok()?;
        Some(Endpoint {
            conn: conn.into(),
            side: Side::Client,
            failed: false,
            error: None,
        })
    }

    /// The client side towards the upstream, verifying (or not, per the config) `name`. Its
    /// ClientHello is ready at once: see [`Endpoint::pending`].
    pub fn client(config: Arc<ClientConfig>, name: ServerName<'static>) -> Option<Endpoint> {
        let conn = ClientConnection::new(config, name).ok()?;
        Some(Endpoint {
            conn: conn.into(),
            side: Side::Upstream,
            failed: false,
            error: None,
        })
    }

    /// Queues the TLS records owed to the peer now (a client's ClientHello).
    pub fn pending(&mut self, actions: &mut Vec<Action>) {
        let mut wire = Vec::new();
        self.flush(&mut wire);
        push_wire(actions, self.side, &mut wire);
    }

    /// The handshake has not completed yet.
    pub fn is_handshaking(&self) -> bool {
        self.conn.is_handshaking()
    }

    fn fail(&mut self, error: String) {
        self.failed = true;
        self.error.get_or_insert(error);
    }

    /// Why the connection failed, if it did.
    pub fn error(&self) -> Option<&str> {
        self.error.as_deref()
    }

    /// Whether a fatal TLS error ended this connection.
    pub fn failed(&self) -> bool {
        self.failed
    }

    /// Takes ciphertext from the ring, appending any plaintext it yields to `plain` and any
    /// TLS records owed to the peer (handshake, alerts) to `wire`. Returns false once the
    /// connection failed; the caller then closes the session without a reply.
    pub fn receive(
        &mut self,
        mut ciphertext: &[u8],
        plain: &mut Vec<u8>,
        wire: &mut Vec<u8>,
    ) -> bool {
        while !ciphertext.is_empty() && !self.failed {
            match self.conn.read_tls(&mut ciphertext) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) => self.fail(e.to_string()),
            }
            if let Err(e) = self.conn.process_new_packets() {
                self.fail(e.to_string());
            }
            self.take_plaintext(plain);
        }
        self.flush(wire);
        !self.failed
    }

    /// [`Endpoint::receive`] for one read from the ring: queues what TLS owes the peer, and
    /// says whether this read finished the handshake.
    pub fn take_in(&mut self, ciphertext: &[u8], actions: &mut Vec<Action>) -> Received {
        let was_handshaking = self.is_handshaking();
        let mut plain = Vec::new();
        let mut wire = Vec::new();
        let ok = self.receive(ciphertext, &mut plain, &mut wire);
        push_wire(actions, self.side, &mut wire);
        Received {
            ok,
            established: was_handshaking && !self.is_handshaking(),
            plain,
        }
    }

    fn take_plaintext(&mut self, plain: &mut Vec<u8>) {
        let mut reader = self.conn.reader();
        loop {
            let start = plain.len();
            plain.resize(start + READ_STEP, 0);
            match reader.read(&mut plain[start..]) {
                Ok(n) => {
                    plain.truncate(start + n);
                    if n == 0 {
                        return;
                    }
                }
                Err(_) => {
                    // WouldBlock: nothing buffered; any other error is a peer that closed
                    // without close_notify, which the ring reports as a close anyway.
                    plain.truncate(start);
                    return;
                }
            }
        }
    }

    /// Encrypts `plain` for the peer. Dropped while the handshake is still running: the engine
    /// has nothing to say to a client that has not finished it (a timeout closes silently).
    pub fn send(&mut self, plain: &[u8], wire: &mut Vec<u8>) {
        if self.failed || self.conn.is_handshaking() {
            return;
        }
        if self.conn.writer().write_all(plain).is_err() {
            self.failed = true;
        }
        self.flush(wire);
    }

    /// Queues a close_notify alert ahead of the session's close.
    pub fn close(&mut self, wire: &mut Vec<u8>) {
        if !self.failed && !self.conn.is_handshaking() {
            self.conn.send_close_notify();
        }
        self.flush(wire);
    }

    fn flush(&mut self, wire: &mut Vec<u8>) {
        while self.conn.wants_write() {
            match self.conn.write_tls(wire) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    }

    /// Rewrites `actions[from..]`, produced by an engine call whose input was `input`: sends
    /// to this endpoint's side are encrypted into owned chunks (kept in order with the other
    /// actions), and sends to the other side that borrow from `input` are copied when `input`
    /// is not the ring's buffer (it was plaintext a TLS layer decrypted). Returns false when an
    /// upstream endpoint's connection ended in these actions (dropped or replaced): what
    /// follows is for a new connection and is left as it is.
    pub fn seal(
        &mut self,
        actions: &mut Vec<Action>,
        from: usize,
        input: &[u8],
        copy_input: bool,
    ) -> bool {
        let tail: Vec<Action> = actions.drain(from..).collect();
        let mut wire = Vec::new();
        let mut live = true;
        for action in tail {
            match action {
                Action::Send(side, chunk) if side == self.side && live => {
                    self.send(chunk.bytes(input), &mut wire)
                }
                Action::Send(side, Chunk::Input(range)) if copy_input => {
                    push_wire(actions, self.side, &mut wire);
                    let bytes = input[range].to_vec();
                    actions.push(Action::Send(side, Chunk::Owned(bytes)));
                }
                Action::Close if live => {
                    self.close(&mut wire);
                    push_wire(actions, self.side, &mut wire);
                    actions.push(Action::Close);
                }
                other => {
                    if self.side == Side::Upstream
                        && matches!(other, Action::CloseUpstream | Action::Connect)
                    {
                        live = false;
                    }
                    push_wire(actions, self.side, &mut wire);
                    actions.push(other);
                }
            }
        }
        push_wire(actions, self.side, &mut wire);
        live
    }
}

/// What one read of ciphertext gave.
#[derive(Debug)]
pub struct Received {
    /// False once the connection failed: the caller ends it without a reply.
    pub ok: bool,
    /// This read completed the handshake.
    pub established: bool,
    /// The plaintext it yielded.
    pub plain: Vec<u8>,
}

/// Queues the records written so far for `side`.
fn push_wire(actions: &mut Vec<Action>, side: Side, wire: &mut Vec<u8>) {
    if !wire.is_empty() {
        actions.push(Action::Send(side, Chunk::Owned(std::mem::take(wire))));
    }
}
