//! TLS for the client side of a session, as a sans-IO layer between the ring and the engine:
//! ciphertext from the ring goes in, plaintext for the engine comes out, and the engine's
//! replies to the client are encrypted back into [`Chunk::Owned`](crate::relay::Chunk) sends.
//!
//! Owns the rustls configurations built from the policy's PEM files ([`files`]) and the
//! per-session server connection ([`ServerSide`]). Must not touch sockets (the ring's) or
//! SMTP (the engine's): which bytes are commands, and when the switch happens, is the
//! engine's business; this layer only moves bytes across the encryption boundary.

mod files;
mod server;

pub use files::{certificates, load_server_config, read, TlsError};
pub use server::{push_wire, ServerSide};
