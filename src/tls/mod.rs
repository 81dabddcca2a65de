//! TLS for either side of a session, as a sans-IO layer between the ring and the engine:
//! ciphertext from the ring goes in, plaintext for the engine comes out, and what the engine
//! sends that side is encrypted back into [`Chunk::Owned`](crate::relay::Chunk) sends.
//!
//! Owns the rustls configurations built from the policy's PEM files ([`files`]) and the
//! per-session connections ([`Endpoint`]: the server side towards a client, the client side
//! towards the upstream for `upstream_tls = "starttls"`). Must not touch sockets (the ring's) or
//! SMTP (the engine's): which bytes are commands, and when the switch happens, is the
//! engine's business; this layer only moves bytes across the encryption boundary.

mod endpoint;
mod files;
mod sides;

pub use endpoint::{Endpoint, Received};
pub use files::{certificates, load_client_config, load_server_config, read, TlsError};
pub use sides::Sides;
