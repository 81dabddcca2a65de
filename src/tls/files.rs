//! Reading the PEM certificate chain and private key named by the policy into a rustls
//! server configuration, and the upstream CA bundle into a client configuration. Owns the file access and its error messages; must not hold any
//! session state.

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};

/// A certificate, key or CA file could not be used. `Display` names the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The file could not be read.
    #[error("{path}: cannot read: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The file holds no usable PEM item of the kind wanted.
    #[error("{path}: {message}")]
    Pem { path: String, message: String },
    /// rustls refused the certificate and key together (typically: they do not match).
    #[error("{cert} with {key}: {message}")]
    Config {
        cert: String,
        key: String,
        message: String,
    },
}

/// Reads `path` whole, naming it in the error.
pub fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.display().to_string(),
        source,
    })
}

/// The certificates of a PEM file, in order; at least one.
pub fn certificates(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(path, &e.to_string()))?;
    if certs.is_empty() {
        return Err(pem_error(path, "no PEM certificate in the file"));
    }
    Ok(certs)
}

fn pem_error(path: &Path, message: &str) -> TlsError {
    TlsError::Pem {
        path: path.display().to_string(),
        message: message.to_string(),
    }
}

/// A server configuration presenting the chain in `cert` with the key in `key` (PKCS#8,
/// PKCS#1 or SEC1 PEM), with the `ring` provider.
pub fn load_server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let chain = certificates(cert, &read(cert)?)?;
    let key_pem = read(key)?;
    let private = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| pem_error(key, &format!("no usable PEM private key ({e})")))?;
    let config_error = |message: String| TlsError::Config {
        cert: cert.display().to_string(),
        key: key.display().to_string(),
        message,
    };
    let config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| config_error(e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(chain, private)
            .map_err(|e| config_error(e.to_string()))?;
    Ok(Arc::new(config))
}

/// The configuration for mailguard's own STARTTLS to the upstream: verifying against the CAs
/// in `ca`, or, with `ca` = `None`, accepting any certificate (`upstream_tls_verify = false`:
/// encryption against passive eavesdroppers only; the policy refuses verification without a
/// CA rather than guess a trust store).
pub fn load_client_config(ca: Option<&Path>) -> Result<Arc<ClientConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| pem_error(ca.unwrap_or(Path::new("upstream_tls")), &e.to_string()))?;
    let config = match ca {
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in certificates(ca, &read(ca)?)? {
                roots
                    .add(cert)
                    .map_err(|e| pem_error(ca, &format!("unusable CA certificate ({e})")))?;
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        None => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
            .with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// `upstream_tls_verify = false`: any certificate is accepted, but the handshake signatures
/// are still checked, so the session keys are bound to the certificate that was shown.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
