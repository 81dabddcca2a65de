//! The policy's TLS keys: the certificate and key mailguard presents when it terminates
//! STARTTLS, and how it talks TLS to the upstream. Owns their validation and the loaded
//! rustls configuration; must not touch sessions (the engine's) or sockets.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::{ClientConfig, ServerConfig};
use serde::Deserialize;

use crate::tls::{self, TlsError};

/// How mailguard talks to the upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamTls {
    /// Plain text (the default).
    None,
    /// Its own STARTTLS after the upstream's banner, hidden from the client.
    Starttls,
}

impl UpstreamTls {
    /// The value as written in a policy file.
    pub fn name(self) -> &'static str {
        match self {
            UpstreamTls::None => "none",
            UpstreamTls::Starttls => "starttls",
        }
    }
}

/// The TLS part of a policy. Two are equal when their keys are and the files they name held
/// the same bytes when loaded, so a reload that only replaced a certificate is a change.
#[derive(Debug, Clone)]
pub struct TlsPolicy {
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub upstream: UpstreamTls,
    pub upstream_verify: bool,
    pub upstream_ca: Option<PathBuf>,
    /// What a terminating session presents; set when `tls_cert` and `tls_key` are.
    pub server: Option<Arc<ServerConfig>>,
    /// What mailguard's own STARTTLS to the upstream uses; set when `upstream_tls = "starttls"`.
    pub client: Option<Arc<ClientConfig>>,
    /// A digest of the contents of every file named.
    contents: u64,
}

impl PartialEq for TlsPolicy {
    fn eq(&self, other: &Self) -> bool {
        self.cert == other.cert
            && self.key == other.key
            && self.upstream == other.upstream
            && self.upstream_verify == other.upstream_verify
            && self.upstream_ca == other.upstream_ca
            && self.contents == other.contents
    }
}

impl Default for TlsPolicy {
    fn default() -> Self {
        TlsPolicy {
            cert: None,
            key: None,
            upstream: UpstreamTls::None,
            upstream_verify: true,
            upstream_ca: None,
            server: None,
            client: None,
            contents: 0,
        }
    }
}

/// Why the TLS keys cannot be used, before any file is read.
#[derive(Debug, PartialEq, Eq)]
pub enum Missing {
    /// `starttls = "terminate"` without `tls_cert` and `tls_key`.
    CertOrKey,
    /// `upstream_tls = "starttls"` verifying, without `upstream_tls_ca`.
    UpstreamCa,
}

impl Missing {
    pub fn message(&self) -> &'static str {
        match self {
            Missing::CertOrKey => "starttls = \"terminate\" needs tls_cert and tls_key (PEM files)",
            Missing::UpstreamCa => {
                "upstream_tls = \"starttls\" with upstream_tls_verify = true needs upstream_tls_ca \
                 (a PEM CA bundle); set upstream_tls_verify = false to skip verification"
            }
        }
    }
}

/// The keys as written.
#[derive(Debug, Default)]
pub struct TlsKeys {
    pub terminate: bool,
    pub cert: Option<String>,
    pub key: Option<String>,
    pub upstream: Option<UpstreamTls>,
    pub upstream_verify: Option<bool>,
    pub upstream_ca: Option<String>,
}

impl TlsKeys {
    /// Checks which keys are required by which.
    pub fn check(&self) -> Result<(), Missing> {
        if self.terminate && (self.cert.is_none() || self.key.is_none()) {
            return Err(Missing::CertOrKey);
        }
        let upstream = self.upstream.unwrap_or(UpstreamTls::None);
        if upstream == UpstreamTls::Starttls
            && self.upstream_verify.unwrap_or(true)
            && self.upstream_ca.is_none()
        {
            return Err(Missing::UpstreamCa);
        }
        Ok(())
    }

    /// Reads the files named and builds the configuration.
    pub fn load(self) -> Result<TlsPolicy, TlsError> {
        let mut digest = DefaultHasher::new();
        let cert = self.cert.map(PathBuf::from);
        let key = self.key.map(PathBuf::from);
        // Files are read only when used, so a policy can keep them named while they are off.
        let server = match (&cert, &key) {
            (Some(c), Some(k)) if self.terminate => {
                hash_file(c, &mut digest)?;
                hash_file(k, &mut digest)?;
                Some(tls::load_server_config(c, k)?)
            }
            _ => None,
        };
        let upstream_ca = self.upstream_ca.map(PathBuf::from);
        let upstream = self.upstream.unwrap_or(UpstreamTls::None);
        let verify = self.upstream_verify.unwrap_or(true);
        let client = if upstream == UpstreamTls::Starttls {
            if let Some(ca) = &upstream_ca {
                hash_file(ca, &mut digest)?;
            }
            let ca = upstream_ca.as_deref().filter(|_| verify);
            Some(tls::load_client_config(ca)?)
        } else {
            None
        };
        Ok(TlsPolicy {
            cert,
            key,
            upstream,
            upstream_verify: verify,
            upstream_ca,
            server,
            client,
            contents: digest.finish(),
        })
    }
}

fn hash_file(path: &Path, digest: &mut DefaultHasher) -> Result<Vec<u8>, TlsError> {
    let bytes = tls::read(path)?;
    bytes.hash(digest);
    Ok(bytes)
}
