//! One client connection's TLS server state (rustls's buffered `ServerConnection`), and the
//! rewriting of the engine's actions across the encryption boundary. Must not decide anything
//! about SMTP: it never looks inside the plaintext.

use std::io::{Read, Write};
use std::sync::Arc;

use rustls::{ServerConfig, ServerConnection};

use crate::relay::{Action, Chunk, Side};

/// Most plaintext taken out of rustls per read call (its own buffer limit bounds the total).
const READ_STEP: usize = 16 * 1024;

/// The TLS server side of one session, from the first ClientHello byte on.
#[derive(Debug)]
pub struct ServerSide {
    conn: ServerConnection,
    /// The handshake failed or the peer sent a fatal alert: nothing more is read or written.
    failed: bool,
}

impl ServerSide {
    /// A server connection under `config`; `None` only if rustls refuses the config itself.
    pub fn new(config: Arc<ServerConfig>) -> Option<ServerSide> {
        let conn = ServerConnection::new(config).ok()?;
        Some(ServerSide {
            conn,
            failed: false,
        })
    }

    /// The handshake has not completed yet.
    pub fn is_handshaking(&self) -> bool {
        self.conn.is_handshaking()
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
                Err(_) => self.failed = true,
            }
            if self.conn.process_new_packets().is_err() {
                self.failed = true;
            }
            self.take_plaintext(plain);
        }
        self.flush(wire);
        !self.failed
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

    /// Rewrites `actions[from..]`, produced by an engine call whose input was `input`: client
    /// sends are encrypted into owned chunks (kept in order with the other actions), and
    /// upstream sends that borrow from `input` are copied when `input` is not the ring's
    /// buffer (it was plaintext this layer decrypted).
    pub fn seal(&mut self, actions: &mut Vec<Action>, from: usize, input: &[u8], copy_input: bool) {
        let tail: Vec<Action> = actions.drain(from..).collect();
        let mut wire = Vec::new();
        for action in tail {
            match action {
                Action::Send(Side::Client, chunk) => self.send(chunk.bytes(input), &mut wire),
                Action::Send(Side::Upstream, Chunk::Input(range)) if copy_input => {
                    push_wire(actions, &mut wire);
                    let bytes = input[range].to_vec();
                    actions.push(Action::Send(Side::Upstream, Chunk::Owned(bytes)));
                }
                Action::Close => {
                    self.close(&mut wire);
                    push_wire(actions, &mut wire);
                    actions.push(Action::Close);
                }
                other => {
                    push_wire(actions, &mut wire);
                    actions.push(other);
                }
            }
        }
        push_wire(actions, &mut wire);
    }
}

/// Queues the records written so far for the client.
pub fn push_wire(actions: &mut Vec<Action>, wire: &mut Vec<u8>) {
    if !wire.is_empty() {
        actions.push(Action::Send(
            Side::Client,
            Chunk::Owned(std::mem::take(wire)),
        ));
    }
}
