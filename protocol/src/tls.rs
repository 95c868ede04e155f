//! rustls configurations for every connection Gantry makes, all TLS 1.3 on the ring provider.
//!
//! - Coordinators serve with their certificate chain and ask clients for a certificate signed by
//!   the cluster CA. A client without one may only use the join ALPN; the shell enforces that.
//! - Agents and coordinators connect with their own certificate, trusting only the cluster CA and
//!   checking the name [`crate::pki::COORDINATOR_SERVER_NAME`].
//! - A node joining with a token trusts exactly the CA whose SHA-256 the token pins.

use crate::pki::sha256_hex;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use std::sync::{Arc, Mutex};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("TLS configuration failed: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client certificate verifier could not be built: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A node's certificate, its key, and the cluster CA it trusts.
#[derive(Debug)]
pub struct NodeCredentials {
    pub ca_der: CertificateDer<'static>,
    pub cert_der: CertificateDer<'static>,
    pub key_der: PrivateKeyDer<'static>,
}

impl Clone for NodeCredentials {
    fn clone(&self) -> Self {
        Self {
            ca_der: self.ca_der.clone(),
            cert_der: self.cert_der.clone(),
            key_der: self.key_der.clone_key(),
        }
    }
}

fn roots(ca_der: &CertificateDer<'static>) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    roots.add(ca_der.clone())?;
    Ok(Arc::new(roots))
}

/// The coordinator's server side: its chain (leaf then CA, so joining nodes can pin the CA),
/// client certificates optional at the TLS layer and required per ALPN by the shell.
pub fn server_config(
    credentials: &NodeCredentials,
    alpn_protocols: &[&[u8]],
) -> Result<rustls::ServerConfig, TlsError> {
    let client_verifier =
        WebPkiClientVerifier::builder_with_provider(roots(&credentials.ca_der)?, provider())
            .allow_unauthenticated()
            .build()?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(client_verifier)
        .with_single_cert(
            vec![credentials.cert_der.clone(), credentials.ca_der.clone()],
            credentials.key_der.clone_key(),
        )?;
    config.alpn_protocols = alpn_protocols.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// A client with its own certificate, trusting only the cluster CA.
pub fn client_config(
    credentials: &NodeCredentials,
    alpn: &[u8],
) -> Result<rustls::ClientConfig, TlsError> {
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots(&credentials.ca_der)?)
        .with_client_auth_cert(
            vec![credentials.cert_der.clone()],
            credentials.key_der.clone_key(),
        )?;
    config.alpn_protocols = vec![alpn.to_vec()];
    Ok(config)
}

/// What the pinning verifier saw, so a caller can explain a failed handshake precisely.
pub type PinObservation = Arc<Mutex<Option<PinMismatch>>>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PinMismatch {
    pub pinned_sha256_hex: String,
    /// Hashes of every certificate the server presented.
    pub presented_sha256_hex: Vec<String>,
}

/// A client without a certificate that trusts the CA whose hash it was given, and nothing else.
pub fn pinned_client_config(
    ca_sha256_hex: &str,
    alpn: &[u8],
    observation: PinObservation,
) -> Result<rustls::ClientConfig, TlsError> {
    let verifier = PinnedCaVerifier {
        pinned_sha256_hex: ca_sha256_hex.to_ascii_lowercase(),
        provider: provider(),
        observation,
    };
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    Ok(config)
}

#[derive(Debug)]
struct PinnedCaVerifier {
    pinned_sha256_hex: String,
    provider: Arc<CryptoProvider>,
    observation: PinObservation,
}

impl ServerCertVerifier for PinnedCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let pinned = intermediates
            .iter()
            .find(|cert| sha256_hex(cert.as_ref()) == self.pinned_sha256_hex);
        let Some(ca) = pinned else {
            let presented = std::iter::once(end_entity)
                .chain(intermediates)
                .map(|cert| sha256_hex(cert.as_ref()))
                .collect();
            *self.observation.lock().expect("observation lock") = Some(PinMismatch {
                pinned_sha256_hex: self.pinned_sha256_hex.clone(),
                presented_sha256_hex: presented,
            });
            return Err(rustls::Error::General(
                "the coordinator's CA does not match the hash pinned by the join token".into(),
            ));
        };
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            self.provider.clone(),
        )
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
        inner.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
