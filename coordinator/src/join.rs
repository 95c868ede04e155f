//! A coordinator joining an existing cluster with `--join TOKEN@SEED`: it checks the seed's CA
//! against the token's pin, asks to be added, follows redirects to the leader, and stores the
//! certificate and cluster secrets it is given. Raft then brings it up to date with a snapshot,
//! as a learner, and the leader promotes it to voter once it has caught up.

use crate::data_dir;
use anyhow::{bail, Context, Result};
use gantry_protocol::pki::{self, COORDINATOR_SERVER_NAME};
use gantry_protocol::tls::{self, PinObservation};
use gantry_protocol::token::JoinToken;
use gantry_protocol::transport::{self, ALPN_JOIN};
use gantry_protocol::{CoordinatorJoin, ErrorCode, JoinRequest, JoinResponse, Role};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Redirects followed before giving up (an election in progress).
const REDIRECTS_MAX: usize = 5;
const JOIN_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a join keeps retrying while the cluster answers "not now" (another member joining,
/// an election), as nodes started together do.
const JOIN_RETRY_FOR: Duration = Duration::from_secs(120);
const JOIN_RETRY_DELAY_MAX: Duration = Duration::from_secs(2);

/// Splits `TOKEN@SEED_ADDR`.
pub fn parse_join(text: &str) -> Result<(String, String)> {
    let (token, seed) = text
        .rsplit_once('@')
        .context("--join takes TOKEN@SEED_ADDR: a token from `gantry token create --role coordinator`, '@', and any member's --listen address")?;
    if seed.is_empty() {
        bail!("--join TOKEN@SEED_ADDR: the seed address after '@' is empty");
    }
    Ok((token.to_string(), seed.to_string()))
}

pub async fn join_cluster(
    dir: &Path,
    token_text: &str,
    seed: &str,
    quic: SocketAddr,
    http: SocketAddr,
) -> Result<()> {
    let token = JoinToken::parse(token_text)?;
    let node_id = data_dir::new_node_id();
    let identity = data_dir::coordinator_identity(node_id);
    let (key, csr_der) = pki::generate_key_and_csr(&identity)?;
    let request = JoinRequest {
        token: token_text.trim().to_string(),
        role: Role::Coordinator,
        name: identity,
        csr_der,
        coordinator: Some(CoordinatorJoin {
            node_id,
            quic_addr: quic.to_string(),
            http_addr: http.to_string(),
        }),
    };
    let started = tokio::time::Instant::now();
    let mut delay = Duration::from_millis(100);
    let mut target = seed.to_string();
    let mut redirects = 0;
    while redirects <= REDIRECTS_MAX {
        let response = tokio::time::timeout(JOIN_TIMEOUT, ask(&target, &token, &request))
            .await
            .with_context(|| format!("joining through {target} timed out"))??;
        match response {
            JoinResponse::AcceptedCoordinator(grant) => {
                if pki::sha256_hex(&grant.ca_der) != token.ca_sha256_hex {
                    bail!("{target} answered with a CA that does not match the join token's pin");
                }
                data_dir::write_joined(dir, node_id, &grant, &key.serialize_pem())?;
                tracing::info!(node = node_id, via = %target, "joined the cluster as a learner");
                return Ok(());
            }
            JoinResponse::Redirect { leader_addr } => {
                tracing::info!(from = %target, to = %leader_addr, "join redirected to the leader");
                target = leader_addr;
                redirects += 1;
            }
            JoinResponse::Refused(error)
                if error.code == ErrorCode::Unavailable && started.elapsed() < JOIN_RETRY_FOR =>
            {
                tracing::info!(via = %target, "join not taken yet ({}); retrying", error.message);
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(JOIN_RETRY_DELAY_MAX);
            }
            JoinResponse::Refused(error) => {
                bail!("the cluster refused the join: {}", error.message)
            }
            JoinResponse::Accepted { .. } => {
                bail!("{target} answered a coordinator's join as an agent's")
            }
        }
    }
    bail!("gave up after {REDIRECTS_MAX} redirects: the cluster may be electing a leader; retry")
}

async fn ask(target: &str, token: &JoinToken, request: &JoinRequest) -> Result<JoinResponse> {
    let addr = tokio::net::lookup_host(target)
        .await
        .with_context(|| format!("resolve {target}"))?
        .next()
        .with_context(|| format!("{target} resolved to nothing"))?;
    let observation: PinObservation = Arc::new(Mutex::new(None));
    let config = transport::quinn_client_config(tls::pinned_client_config(
        &token.ca_sha256_hex,
        ALPN_JOIN,
        observation.clone(),
    )?)?;
    let endpoint = transport::client_endpoint(addr)?;
    let connection = match endpoint
        .connect_with(config, addr, COORDINATOR_SERVER_NAME)?
        .await
    {
        Ok(connection) => connection,
        Err(e) => {
            if let Some(mismatch) = observation.lock().expect("observation lock").take() {
                bail!(
                    "the coordinator at {target} presents a CA that does not match the join token (pinned sha256 {}, presented {})",
                    mismatch.pinned_sha256_hex,
                    mismatch.presented_sha256_hex.last().cloned().unwrap_or_default()
                );
            }
            bail!("connect to {target}: {e}");
        }
    };
    let (mut send, mut recv, _) =
        transport::client_hello(&connection, "gantry-coordinator").await?;
    send.send(request).await?;
    let response = recv.expect::<JoinResponse>().await?;
    connection.close(0u32.into(), b"done");
    endpoint.wait_idle().await;
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn join_arguments_split_at_the_last_at_sign() {
        assert_eq!(
            parse_join("gantry1.a.b@127.0.0.1:7443").unwrap(),
            ("gantry1.a.b".into(), "127.0.0.1:7443".into())
        );
        assert!(parse_join("no-seed")
            .unwrap_err()
            .to_string()
            .contains("TOKEN@SEED_ADDR"));
        assert!(parse_join("token@").is_err());
    }
}
