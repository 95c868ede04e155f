//! The cluster's PKI: a CA created at first start, certificates whose subject says the holder's
//! role and identity, and certificate signing requests.
//!
//! A certificate's role is in its subject's organizational unit (`agent` or `coordinator`) and
//! its identity in the common name. Coordinator certificates also carry the DNS name
//! [`COORDINATOR_SERVER_NAME`] and the server-auth usage; agent certificates carry neither, so an
//! agent certificate presented by a server fails TLS verification outright, and one presented by
//! a client on a coordinator-only connection fails the role check.

use crate::messages::Role;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use ring::digest::{digest, SHA256};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The DNS name every coordinator certificate holds and every client verifies.
pub const COORDINATOR_SERVER_NAME: &str = "coordinator.gantry";

/// Certificates are valid from this long before issue, to tolerate clock skew between hosts.
pub const CLOCK_SKEW_ALLOWANCE: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("certificate signing request is invalid: {0}")]
    InvalidCsr(String),
    #[error("certificate could not be parsed: {0}")]
    InvalidCertificate(String),
    #[error("certificate has no role (organizational unit agent or coordinator)")]
    MissingRole,
    #[error("key could not be parsed: {0}")]
    InvalidKey(String),
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
}

/// SHA-256 of a certificate's DER encoding, lower-case hex. Join tokens pin the CA by this.
pub fn sha256_hex(der: &[u8]) -> String {
    hex::encode(digest(&SHA256, der))
}

/// What a certificate says about its holder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertIdentity {
    pub role: Role,
    pub identity: String,
    pub not_before_unix: i64,
    pub not_after_unix: i64,
}

pub fn parse_certificate(der: &[u8]) -> Result<CertIdentity, PkiError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| PkiError::InvalidCertificate(e.to_string()))?;
    let subject = cert.subject();
    let role = subject
        .iter_organizational_unit()
        .filter_map(|attribute| attribute.as_str().ok())
        .find_map(|unit| unit.parse::<Role>().ok())
        .ok_or(PkiError::MissingRole)?;
    let identity = subject
        .iter_common_name()
        .find_map(|attribute| attribute.as_str().ok())
        .ok_or_else(|| PkiError::InvalidCertificate("no common name".into()))?
        .to_string();
    Ok(CertIdentity {
        role,
        identity,
        not_before_unix: cert.validity().not_before.timestamp(),
        not_after_unix: cert.validity().not_after.timestamp(),
    })
}

fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .expect("the system random source works");
    bytes[0] &= 0x7f; // a positive integer
    SerialNumber::from_slice(&bytes)
}

fn offset_date_time(at: SystemTime) -> time::OffsetDateTime {
    let unix_s = at.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs() as i64;
    time::OffsetDateTime::from_unix_timestamp(unix_s).unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

/// The cluster certificate authority: its certificate and signing key.
pub struct ClusterCa {
    cert_der: CertificateDer<'static>,
    key: KeyPair,
}

impl ClusterCa {
    /// Creates a new CA valid for ten years from `now`.
    pub fn generate(cluster_name: &str, now: SystemTime) -> Result<Self, PkiError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        name.push(
            DnType::CommonName,
            format!("gantry cluster CA {cluster_name}"),
        );
        name.push(DnType::OrganizationName, "gantry");
        params.distinguished_name = name;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = offset_date_time(now - CLOCK_SKEW_ALLOWANCE);
        params.not_after = offset_date_time(now + Duration::from_secs(10 * 365 * 24 * 3600));
        params.serial_number = Some(random_serial());
        let cert = params.self_signed(&key)?;
        Ok(Self {
            cert_der: cert.der().clone(),
            key,
        })
    }

    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, PkiError> {
        let cert_der = pem_to_der(cert_pem, "CERTIFICATE")?;
        let key = KeyPair::from_pem(key_pem).map_err(|e| PkiError::InvalidKey(e.to_string()))?;
        Ok(Self {
            cert_der: CertificateDer::from(cert_der),
            key,
        })
    }

    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    pub fn cert_pem(&self) -> String {
        der_to_pem(&self.cert_der, "CERTIFICATE")
    }

    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    pub fn sha256_hex(&self) -> String {
        sha256_hex(&self.cert_der)
    }

    /// Issues a certificate for `identity` in `role` over the public key of `csr_der`. Nothing
    /// else in the request is trusted: the coordinator decides names, usages and lifetime.
    pub fn issue(
        &self,
        csr_der: &[u8],
        role: Role,
        identity: &str,
        now: SystemTime,
        ttl: Duration,
    ) -> Result<CertificateDer<'static>, PkiError> {
        let csr = CertificateSigningRequestParams::from_der(&csr_der.to_vec().into())
            .map_err(|e| PkiError::InvalidCsr(e.to_string()))?;
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        name.push(DnType::CommonName, identity);
        name.push(DnType::OrganizationalUnitName, role.as_str());
        name.push(DnType::OrganizationName, "gantry");
        params.distinguished_name = name;
        params.not_before = offset_date_time(now - CLOCK_SKEW_ALLOWANCE);
        params.not_after = offset_date_time(now + ttl);
        params.serial_number = Some(random_serial());
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        match role {
            Role::Agent => {
                params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
                params.subject_alt_names = vec![SanType::DnsName(
                    format!("{identity}.agent.gantry").try_into()?,
                )];
            }
            Role::Coordinator => {
                params.extended_key_usages = vec![
                    ExtendedKeyUsagePurpose::ServerAuth,
                    ExtendedKeyUsagePurpose::ClientAuth,
                ];
                params.subject_alt_names = vec![
                    SanType::DnsName(COORDINATOR_SERVER_NAME.try_into()?),
                    SanType::DnsName(format!("{identity}.coordinator.gantry").try_into()?),
                ];
            }
        }
        let issuer = Issuer::from_ca_cert_der(&self.cert_der, &self.key)?;
        let cert = params.signed_by(&csr.public_key, &issuer)?;
        Ok(cert.der().clone())
    }
}

/// A fresh key pair and a CSR for it. The CSR's subject is informational only.
pub fn generate_key_and_csr(name: &str) -> Result<(KeyPair, Vec<u8>), PkiError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    let mut subject = DistinguishedName::new();
    subject.push(DnType::CommonName, name);
    params.distinguished_name = subject;
    let csr = params.serialize_request(&key)?;
    Ok((key, csr.der().to_vec()))
}

pub fn key_from_pem(key_pem: &str) -> Result<KeyPair, PkiError> {
    KeyPair::from_pem(key_pem).map_err(|e| PkiError::InvalidKey(e.to_string()))
}

pub fn private_key_der(key: &KeyPair) -> PrivateKeyDer<'static> {
    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()))
}

pub fn der_to_pem(der: &[u8], label: &str) -> String {
    use base64::Engine;
    let body = base64::engine::general_purpose::STANDARD.encode(der);
    let mut pem = format!("-----BEGIN {label}-----\n");
    for line in body.as_bytes().chunks(64) {
        pem.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        pem.push('\n');
    }
    pem.push_str(&format!("-----END {label}-----\n"));
    pem
}

pub fn pem_to_der(pem: &str, label: &str) -> Result<Vec<u8>, PkiError> {
    use base64::Engine;
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let start = pem
        .find(&begin)
        .ok_or_else(|| PkiError::InvalidCertificate(format!("no {begin} line")))?
        + begin.len();
    let stop = pem[start..]
        .find(&end)
        .ok_or_else(|| PkiError::InvalidCertificate(format!("no {end} line")))?
        + start;
    let body: String = pem[start..stop]
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    base64::engine::general_purpose::STANDARD
        .decode(body)
        .map_err(|e| PkiError::InvalidCertificate(format!("bad base64 in PEM: {e}")))
}

/// Writes `contents` to `path` atomically (temp file, fsync, rename), readable by the owner only
/// when `secret`. Keys and certificates are stored this way so a crash never leaves half a file.
pub fn write_file_atomic(path: &Path, contents: &[u8], secret: bool) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(if secret { 0o600 } else { 0o644 });
        }
        let mut file = options.open(&tmp)?;
        std::io::Write::write_all(&mut file, contents)?;
        file.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_certificates_carry_role_identity_and_lifetime() {
        let now = SystemTime::now();
        let ca = ClusterCa::generate("test", now).unwrap();
        let (_key, csr) = generate_key_and_csr("ignored-name").unwrap();
        let der = ca
            .issue(
                &csr,
                Role::Agent,
                "agent-1234",
                now,
                Duration::from_secs(3600),
            )
            .unwrap();
        let identity = parse_certificate(&der).unwrap();
        assert_eq!(identity.role, Role::Agent);
        assert_eq!(identity.identity, "agent-1234");
        let expected = now.duration_since(UNIX_EPOCH).unwrap().as_secs() as i64 + 3600;
        assert!((identity.not_after_unix - expected).abs() <= 1);
    }

    #[test]
    fn ca_survives_a_pem_round_trip() {
        let ca = ClusterCa::generate("test", SystemTime::now()).unwrap();
        let again = ClusterCa::from_pem(&ca.cert_pem(), &ca.key_pem()).unwrap();
        assert_eq!(again.sha256_hex(), ca.sha256_hex());
        let (_key, csr) = generate_key_and_csr("n").unwrap();
        again
            .issue(
                &csr,
                Role::Coordinator,
                "c1",
                SystemTime::now(),
                Duration::from_secs(60),
            )
            .unwrap();
    }

    #[test]
    fn garbage_csr_is_refused() {
        let ca = ClusterCa::generate("test", SystemTime::now()).unwrap();
        let err = ca
            .issue(
                b"not a csr",
                Role::Agent,
                "a",
                SystemTime::now(),
                Duration::from_secs(60),
            )
            .unwrap_err();
        assert!(matches!(err, PkiError::InvalidCsr(_)), "{err}");
    }
}
