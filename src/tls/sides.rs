//! The TLS state of one session, both sides: which endpoints exist, and the ordering of the
//! encryption of one engine call's actions when a side switched to TLS inside it. Must not
//! look at SMTP: the engine says where a switch falls, as an index into its actions.

use std::net::SocketAddr;
use std::sync::Arc;

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ServerConfig};

use super::Endpoint;
use crate::relay::Action;

/// The configurations a session may need and the endpoints it has.
#[derive(Debug, Default)]
pub struct Sides {
    server_config: Option<Arc<ServerConfig>>,
    client_config: Option<Arc<ClientConfig>>,
    upstream_name: Option<ServerName<'static>>,
    /// Towards the client, from the engine's `220` to its STARTTLS on.
    pub client: Option<Endpoint>,
    /// Towards the upstream, from the upstream's `220` to mailguard's STARTTLS on; dropped
    /// with the upstream connection.
    pub upstream: Option<Endpoint>,
}

impl Sides {
    /// A session's TLS: `server` for `starttls = "terminate"`, `client` for
    /// `upstream_tls = "starttls"`, whose certificate is checked against `upstream`'s address.
    pub fn new(
        server: Option<Arc<ServerConfig>>,
        client: Option<Arc<ClientConfig>>,
        upstream: Option<SocketAddr>,
    ) -> Sides {
        Sides {
            server_config: server,
            client_config: client,
            upstream_name: upstream.map(|a| ServerName::IpAddress(a.ip().into())),
            client: None,
            upstream: None,
        }
    }

    /// Encrypts what an engine call appended to `out` from `from` on, for the sides that are
    /// TLS, starting each side that switched in this call at the engine's index. The upstream
    /// switches only while the client is held in the preamble, so the two never switch in the
    /// same call (which keeps the client's index valid after the upstream pass). Returns
    /// false when an endpoint could not be made (the session must close).
    pub fn seal(
        &mut self,
        out: &mut Vec<Action>,
        from: usize,
        input: &[u8],
        copy_input: bool,
        client_switch: Option<usize>,
        upstream_switch: Option<usize>,
    ) -> bool {
        if let Some(at) = upstream_switch {
            let made = match (&self.client_config, &self.upstream_name) {
                (Some(config), Some(name)) => Endpoint::client(Arc::clone(config), name.clone()),
                _ => None,
            };
            let Some(mut endpoint) = made else {
                return false;
            };
            endpoint.seal(out, at, input, copy_input);
            endpoint.pending(out);
            self.upstream = Some(endpoint);
        } else if let Some(up) = &mut self.upstream {
            if !up.seal(out, from, input, copy_input) {
                self.upstream = None;
            }
        }
        let client_from = match client_switch {
            Some(at) => {
                let config = self.server_config.clone();
                self.client = config.and_then(Endpoint::server);
                if self.client.is_none() {
                    return false;
                }
                at
            }
            None => from,
        };
        if let Some(client) = &mut self.client {
            client.seal(out, client_from, input, copy_input);
        }
        true
    }
}
