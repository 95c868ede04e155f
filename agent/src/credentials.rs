//! The agent's identity on disk, and getting one by joining with a token.
//!
//! Data dir files: `ca.crt` (the cluster CA, trusted from the moment it matched the token's pin),
//! `agent.crt` (our certificate: role agent, our id as common name) and `agent.key` (mode 0600).

use gantry_protocol::pki::{self, parse_certificate, write_file_atomic};
use gantry_protocol::tls::{self, NodeCredentials, PinMismatch, PinObservation};
use gantry_protocol::token::JoinToken;
use gantry_protocol::transport::{self, ALPN_JOIN};
use gantry_protocol::{ErrorCode, JoinRequest, JoinResponse, Role};
use rustls::pki_types::CertificateDer;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const JOIN_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error("{0}")]
    Token(#[from] gantry_protocol::token::TokenError),
    #[error(
        "the coordinator at {addr} presents a CA that does not match the join token: the token pins sha256 {pinned}, \
         the coordinator presents {presented}. The token belongs to another cluster, or the connection is intercepted."
    )]
    CaMismatch {
        addr: SocketAddr,
        pinned: String,
        presented: String,
    },
    #[error("the coordinator refused the join: {message}")]
    Refused { code: ErrorCode, message: String },
    #[error("could not reach any coordinator to join: {0}")]
    Unreachable(String),
    #[error("store credentials in the data dir: {0}")]
    Store(String),
}

impl JoinError {
    /// Whether trying another coordinator could help.
    fn is_final(&self) -> bool {
        !matches!(self, JoinError::Unreachable(_))
    }
}

/// The agent's certificate, key and CA, and what the certificate says.
#[derive(Debug, Clone)]
pub struct AgentCredentials {
    pub tls: NodeCredentials,
    pub agent_id: String,
    pub not_after_unix: i64,
    /// When the certificate was issued: its not-before plus the clock-skew allowance.
    pub issued_unix: i64,
}

impl AgentCredentials {
    fn from_parts(ca_der: Vec<u8>, cert_der: Vec<u8>, key_pem: &str) -> Result<Self, String> {
        let identity = parse_certificate(&cert_der).map_err(|e| e.to_string())?;
        if identity.role != Role::Agent {
            return Err(format!(
                "stored certificate has role {}, not agent",
                identity.role
            ));
        }
        let key = pki::key_from_pem(key_pem).map_err(|e| e.to_string())?;
        Ok(Self {
            tls: NodeCredentials {
                ca_der: CertificateDer::from(ca_der),
                cert_der: CertificateDer::from(cert_der),
                key_der: pki::private_key_der(&key),
            },
            agent_id: identity.identity,
            not_after_unix: identity.not_after_unix,
            issued_unix: identity.not_before_unix + pki::CLOCK_SKEW_ALLOWANCE.as_secs() as i64,
        })
    }

    /// The moment to ask for a fresh certificate: two thirds into its lifetime.
    pub fn renew_at_unix(&self) -> i64 {
        self.issued_unix + (self.not_after_unix - self.issued_unix) * 2 / 3
    }

    pub fn load(dir: &Path) -> Result<Option<Self>, String> {
        let cert_path = dir.join("agent.crt");
        if !cert_path.exists() {
            return Ok(None);
        }
        let read = |name: &str| {
            std::fs::read_to_string(dir.join(name))
                .map_err(|e| format!("read {}: {e}", dir.join(name).display()))
        };
        let ca_der = pki::pem_to_der(&read("ca.crt")?, "CERTIFICATE").map_err(|e| e.to_string())?;
        let cert_der =
            pki::pem_to_der(&read("agent.crt")?, "CERTIFICATE").map_err(|e| e.to_string())?;
        Self::from_parts(ca_der, cert_der, &read("agent.key")?).map(Some)
    }

    /// Stores certificate and key (and the CA) so a restart needs no token.
    pub fn store(
        dir: &Path,
        ca_der: &[u8],
        cert_der: &[u8],
        key_pem: &str,
    ) -> Result<Self, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
        let credentials = Self::from_parts(ca_der.to_vec(), cert_der.to_vec(), key_pem)?;
        let write = |name: &str, contents: &[u8], secret: bool| {
            write_file_atomic(&dir.join(name), contents, secret)
                .map_err(|e| format!("write {}: {e}", dir.join(name).display()))
        };
        write(
            "ca.crt",
            pki::der_to_pem(ca_der, "CERTIFICATE").as_bytes(),
            false,
        )?;
        write("agent.key", key_pem.as_bytes(), true)?;
        write(
            "agent.crt",
            pki::der_to_pem(cert_der, "CERTIFICATE").as_bytes(),
            false,
        )?;
        Ok(credentials)
    }
}

pub fn now_unix_s() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs() as i64
}

/// Exchanges `token_text` for a certificate with the first coordinator that answers, and stores
/// it in `data_dir`.
pub async fn join(
    addrs: &[SocketAddr],
    token_text: &str,
    name: &str,
    data_dir: &Path,
) -> Result<AgentCredentials, JoinError> {
    // The role is checked by the coordinator, so that it logs every refused join.
    let token = JoinToken::parse(token_text)?;
    let mut failures = Vec::new();
    for &addr in addrs {
        match tokio::time::timeout(JOIN_TIMEOUT, join_one(addr, &token, token_text, name)).await {
            Ok(Ok((ca_der, cert_der, key_pem))) => {
                return AgentCredentials::store(data_dir, &ca_der, &cert_der, &key_pem)
                    .map_err(JoinError::Store);
            }
            Ok(Err(error)) if error.is_final() => return Err(error),
            Ok(Err(error)) => failures.push(format!("{addr}: {error}")),
            Err(_) => failures.push(format!("{addr}: timed out")),
        }
    }
    Err(JoinError::Unreachable(failures.join("; ")))
}

async fn join_one(
    addr: SocketAddr,
    token: &JoinToken,
    token_text: &str,
    name: &str,
) -> Result<(Vec<u8>, Vec<u8>, String), JoinError> {
    let unreachable = |e: &dyn std::fmt::Display| JoinError::Unreachable(e.to_string());
    let observation: PinObservation = Arc::new(Mutex::new(None));
    let tls = tls::pinned_client_config(&token.ca_sha256_hex, ALPN_JOIN, observation.clone())
        .map_err(|e| unreachable(&e))?;
    let config = transport::quinn_client_config(tls).map_err(|e| unreachable(&e))?;
    let endpoint = transport::client_endpoint(addr).map_err(|e| unreachable(&e))?;
    let connecting = endpoint
        .connect_with(config, addr, pki::COORDINATOR_SERVER_NAME)
        .map_err(|e| unreachable(&e))?;
    let connection = match connecting.await {
        Ok(connection) => connection,
        Err(error) => {
            let mismatch: Option<PinMismatch> =
                observation.lock().expect("observation lock").take();
            return Err(match mismatch {
                Some(mismatch) => JoinError::CaMismatch {
                    addr,
                    pinned: mismatch.pinned_sha256_hex,
                    // The CA is the last certificate of the chain the coordinator sends.
                    presented: mismatch
                        .presented_sha256_hex
                        .last()
                        .cloned()
                        .unwrap_or_default(),
                },
                None => unreachable(&error),
            });
        }
    };
    let (key, csr_der) =
        pki::generate_key_and_csr(name).map_err(|e| JoinError::Store(e.to_string()))?;
    let exchange = async {
        let (mut send, mut recv, _version) =
            transport::client_hello(&connection, "gantry-agent").await?;
        send.send(&JoinRequest {
            token: token_text.trim().to_string(),
            role: Role::Agent,
            name: name.to_string(),
            csr_der,
            coordinator: None,
        })
        .await?;
        recv.expect::<JoinResponse>().await
    };
    let response = exchange.await;
    connection.close(transport::close_code::NORMAL.into(), b"joined");
    endpoint.wait_idle().await;
    match response {
        Ok(JoinResponse::Accepted {
            identity,
            cert_der,
            ca_der,
        }) => {
            if pki::sha256_hex(&ca_der) != token.ca_sha256_hex {
                return Err(JoinError::CaMismatch {
                    addr,
                    pinned: token.ca_sha256_hex.clone(),
                    presented: pki::sha256_hex(&ca_der),
                });
            }
            tracing::info!(%identity, coordinator = %addr, "joined the cluster");
            Ok((ca_der, cert_der, key.serialize_pem()))
        }
        Ok(JoinResponse::AcceptedCoordinator(_)) | Ok(JoinResponse::Redirect { .. }) => Err(
            unreachable(&"the coordinator answered an agent's join as if it were a coordinator's"),
        ),
        Ok(JoinResponse::Refused(error)) => Err(JoinError::Refused {
            code: error.code,
            message: error.message,
        }),
        Err(error) => Err(unreachable(&error)),
    }
}
