//! The agent's session with the coordinators: connect, register, heartbeat at the interval the
//! coordinator sets, renew the certificate before it expires, follow redirects to the leader, and
//! reconnect with jittered exponential backoff across the list of coordinators.

use crate::credentials::{now_unix_s, AgentCredentials};
use anyhow::{bail, Context, Result};
use gantry_protocol::pki::{self, COORDINATOR_SERVER_NAME};
use gantry_protocol::tls;
use gantry_protocol::transport::{self, close_code, ALPN_AGENT};
use gantry_protocol::{
    AgentMessage, AllocationStateReport, CoordinatorMessage, Heartbeat, LogsReply, Register,
};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::sync::watch;

/// Redirects followed in a row before the agent backs off (a leader election in progress).
const REDIRECTS_IN_A_ROW_MAX: u32 = 5;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Log replies read and waiting for the control stream.
const LOG_REPLIES_LEN_MAX: usize = 16;

/// Exponential backoff with full jitter: the n-th delay is uniform in [0, min(max, initial * 2^n)].
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max,
            attempt: 0,
        }
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// The next delay; `random_fraction` in [0, 1) supplies the jitter.
    pub fn next_delay(&mut self, random_fraction: f64) -> Duration {
        let ceiling = self
            .initial
            .saturating_mul(1u32 << self.attempt.min(20))
            .min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        ceiling.mul_f64(random_fraction.clamp(0.0, 1.0))
    }
}

pub struct SessionConfig {
    pub coordinators: Vec<String>,
    pub data_dir: PathBuf,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
}

enum Outcome {
    /// The session ended; `welcomed` says whether it had been established.
    Ended {
        welcomed: bool,
        reason: String,
    },
    Redirect(String),
}

pub struct Session {
    config: SessionConfig,
    credentials: AgentCredentials,
    /// Builds the register message afresh for each connection (capacity can change).
    make_register: Box<dyn Fn() -> Register + Send + Sync>,
    work: Work,
    /// Log reads run on tasks of their own and hand their replies back here. A reply that
    /// outlives its session goes to the next one, whose coordinator ignores the unknown id.
    log_replies_tx: mpsc::Sender<LogsReply>,
    log_replies: mpsc::Receiver<LogsReply>,
}

/// The agent's work, which lives across sessions: the supervisor, the runtime's events, and the
/// reports not yet delivered to a coordinator.
pub struct Work {
    pub supervisor: crate::supervisor::Supervisor,
    pub runtime_events: mpsc::UnboundedReceiver<crate::runtime::RuntimeEvent>,
    pub reports: mpsc::UnboundedReceiver<AllocationStateReport>,
    pub undelivered: VecDeque<AllocationStateReport>,
    /// For an agent that reports a cluster's nodes (Kubernetes): their current capacity, which
    /// changes as nodes come and go and other pods take or free room. Each change is sent.
    pub nodes: Option<watch::Receiver<Vec<gantry_protocol::NodeCapacity>>>,
}

async fn resolve(address: &str) -> Result<SocketAddr> {
    tokio::net::lookup_host(address)
        .await
        .with_context(|| format!("resolve coordinator address {address}"))?
        .next()
        .with_context(|| format!("coordinator address {address} resolved to nothing"))
}

impl Session {
    pub fn new(
        config: SessionConfig,
        credentials: AgentCredentials,
        make_register: Box<dyn Fn() -> Register + Send + Sync>,
        work: Work,
    ) -> Self {
        let (log_replies_tx, log_replies) = mpsc::channel(LOG_REPLIES_LEN_MAX);
        Self {
            config,
            credentials,
            make_register,
            work,
            log_replies_tx,
            log_replies,
        }
    }

    /// Stops everything the agent runs: nothing outlives it.
    pub async fn shutdown_work(&self, grace: Duration) {
        self.work.supervisor.shutdown(grace).await;
    }

    /// Runs until `shutdown` turns true. Returns an error only for conditions a restart cannot
    /// cure (an expired certificate).
    pub async fn run(&mut self, mut shutdown: watch::Receiver<bool>) -> Result<()> {
        let mut backoff = Backoff::new(self.config.backoff_initial, self.config.backoff_max);
        let mut rotation = 0usize;
        let mut redirect: Option<String> = None;
        let mut redirects_in_a_row = 0u32;
        while !*shutdown.borrow() {
            if now_unix_s() >= self.credentials.not_after_unix {
                bail!(
                    "this agent's certificate expired at unix time {}: remove {} and restart with --join TOKEN",
                    self.credentials.not_after_unix,
                    self.config.data_dir.join("agent.crt").display()
                );
            }
            let target = match redirect.take() {
                Some(leader) => leader,
                None => {
                    let target =
                        self.config.coordinators[rotation % self.config.coordinators.len()].clone();
                    rotation += 1;
                    target
                }
            };
            let outcome = tokio::select! {
                outcome = self.connect_and_serve(&target, shutdown.clone()) => outcome,
                _ = shutdown.changed() => break,
            };
            match outcome {
                Ok(Outcome::Redirect(leader)) => {
                    redirects_in_a_row += 1;
                    tracing::info!(from = %target, to = %leader, "redirected to the leader");
                    redirect = Some(leader);
                    if redirects_in_a_row <= REDIRECTS_IN_A_ROW_MAX {
                        continue;
                    }
                }
                Ok(Outcome::Ended { welcomed, reason }) => {
                    redirects_in_a_row = 0;
                    if welcomed {
                        backoff.reset();
                    }
                    tracing::warn!(coordinator = %target, "session ended: {reason}");
                }
                Err(error) => {
                    redirects_in_a_row = 0;
                    tracing::warn!(coordinator = %target, "could not connect: {error:#}");
                }
            }
            let delay = backoff.next_delay(rand::random::<f64>());
            tracing::debug!(?delay, "reconnecting after backoff");
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = shutdown.changed() => break,
            }
        }
        Ok(())
    }

    async fn connect_and_serve(
        &mut self,
        target: &str,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<Outcome> {
        let addr = resolve(target).await?;
        let tls = tls::client_config(&self.credentials.tls, ALPN_AGENT)?;
        let client_config = transport::quinn_client_config(tls)?;
        let endpoint = transport::client_endpoint(addr)?;
        let connecting = endpoint.connect_with(client_config, addr, COORDINATOR_SERVER_NAME)?;
        let connection = tokio::time::timeout(CONNECT_TIMEOUT, connecting)
            .await
            .context("QUIC handshake timed out")?
            .context("QUIC handshake")?;
        let outcome = self.serve(&connection, &mut shutdown).await;
        let reason: &[u8] = if *shutdown.borrow() {
            b"agent shutting down"
        } else {
            b"session over"
        };
        connection.close(close_code::NORMAL.into(), reason);
        // Bounded: a vanished coordinator must not hold up a shutdown or a reconnect.
        let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
        outcome
    }

    async fn serve(
        &mut self,
        connection: &quinn::Connection,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<Outcome> {
        let (mut send, mut recv, version) = transport::client_hello(
            connection,
            concat!("gantry-agent ", env!("CARGO_PKG_VERSION")),
        )
        .await?;
        let mut register = (self.make_register)();
        if register.address.is_none() {
            register.address = local_address_towards(connection.remote_address());
        }
        send.send(&AgentMessage::Register(register)).await?;
        let welcome = match recv.expect::<CoordinatorMessage>().await? {
            CoordinatorMessage::Welcome(welcome) => welcome,
            CoordinatorMessage::Redirect { leader_addr } => {
                return Ok(Outcome::Redirect(leader_addr))
            }
            CoordinatorMessage::Error(error) => {
                bail!("coordinator refused the session: {}", error.message)
            }
            other => bail!("expected Welcome, got {other:?}"),
        };
        tracing::info!(
            agent = %welcome.agent_id,
            coordinator = %connection.remote_address(),
            protocol_version = version,
            heartbeat_interval_ms = welcome.heartbeat_interval_ms,
            ttl_ms = welcome.ttl_ms,
            "registered"
        );
        let mut heartbeat = tokio::time::interval(Duration::from_millis(
            welcome.heartbeat_interval_ms.max(100),
        ));
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // A new coordinator (or the same after a break) hears what runs here now.
        self.work.supervisor.report_running().await;
        while let Ok(report) = self.work.reports.try_recv() {
            self.work.undelivered.push_back(report);
        }
        while let Some(report) = self.work.undelivered.front().cloned() {
            if let Err(e) = send.send(&AgentMessage::AllocationState(report)).await {
                return Ok(Outcome::Ended {
                    welcomed: true,
                    reason: e.to_string(),
                });
            }
            self.work.undelivered.pop_front();
        }
        let mut seq = 0u64;
        let mut pending_key: Option<rcgen::KeyPair> = None;
        let mut nodes = self.work.nodes.clone();
        if let Some(nodes) = &mut nodes {
            // The registration carried the current nodes.
            nodes.mark_unchanged();
        }
        loop {
            let nodes_changed = async {
                if let Some(nodes) = &mut nodes {
                    if nodes.changed().await.is_ok() {
                        return nodes.borrow_and_update().clone();
                    }
                }
                std::future::pending().await
            };
            tokio::select! {
                current = nodes_changed => {
                    if let Err(e) = send.send(&AgentMessage::Nodes(current)).await {
                        return Ok(Outcome::Ended { welcomed: true, reason: e.to_string() });
                    }
                }
                _ = heartbeat.tick() => {
                    seq += 1;
                    if let Err(e) = send.send(&AgentMessage::Heartbeat(Heartbeat { seq })).await {
                        return Ok(Outcome::Ended { welcomed: true, reason: e.to_string() });
                    }
                    if pending_key.is_none() && now_unix_s() >= self.credentials.renew_at_unix() {
                        let (key, csr_der) = pki::generate_key_and_csr(&self.credentials.agent_id)?;
                        send.send(&AgentMessage::RenewCertificate { csr_der }).await?;
                        pending_key = Some(key);
                        tracing::info!("asked the coordinator to renew this agent's certificate");
                    }
                }
                message = recv.recv::<CoordinatorMessage>() => match message {
                    Ok(Some(CoordinatorMessage::Certificate { cert_der })) => {
                        let Some(key) = pending_key.take() else {
                            tracing::warn!("ignoring a certificate that was not asked for");
                            continue;
                        };
                        let ca_der = self.credentials.tls.ca_der.to_vec();
                        match AgentCredentials::store(&self.config.data_dir, &ca_der, &cert_der, &key.serialize_pem()) {
                            Ok(renewed) if renewed.agent_id == self.credentials.agent_id => {
                                tracing::info!(not_after_unix = renewed.not_after_unix, "certificate renewed");
                                self.credentials = renewed;
                            }
                            Ok(renewed) => bail!("coordinator renewed the certificate for {} instead of {}", renewed.agent_id, self.credentials.agent_id),
                            Err(e) => tracing::error!("could not store the renewed certificate: {e}"),
                        }
                    }
                    Ok(Some(CoordinatorMessage::Redirect { leader_addr })) => return Ok(Outcome::Redirect(leader_addr)),
                    Ok(Some(CoordinatorMessage::Error(error))) => {
                        return Ok(Outcome::Ended { welcomed: true, reason: format!("coordinator error: {}", error.message) });
                    }
                    Ok(Some(CoordinatorMessage::Assign(assign))) => {
                        tracing::info!(allocation = %assign.allocation_id, job = %assign.job_id, "assigned");
                        self.work.supervisor.handle_assign(assign);
                    }
                    Ok(Some(CoordinatorMessage::Stop(stop))) => {
                        tracing::info!(allocation = %stop.allocation_id, "asked to stop");
                        self.work.supervisor.handle_stop(stop);
                    }
                    Ok(Some(CoordinatorMessage::FetchLogs(fetch))) => {
                        let read = self.work.supervisor.fetch_logs(fetch);
                        let replies = self.log_replies_tx.clone();
                        tokio::spawn(async move {
                            let _ = replies.send(read.await).await;
                        });
                    }
                    Ok(Some(other)) => tracing::debug!(?other, "ignoring message"),
                    Ok(None) => return Ok(Outcome::Ended { welcomed: true, reason: "coordinator closed the session".into() }),
                    Err(e) => return Ok(Outcome::Ended { welcomed: true, reason: e.to_string() }),
                },
                Some(event) = self.work.runtime_events.recv() => self.work.supervisor.handle_runtime_event(event),
                Some(reply) = self.log_replies.recv() => {
                    if let Err(e) = send.send(&AgentMessage::Logs(reply)).await {
                        return Ok(Outcome::Ended { welcomed: true, reason: e.to_string() });
                    }
                }
                Some(report) = self.work.reports.recv() => {
                    if let Err(e) = send.send(&AgentMessage::AllocationState(report.clone())).await {
                        self.work.undelivered.push_back(report);
                        return Ok(Outcome::Ended { welcomed: true, reason: e.to_string() });
                    }
                }
                _ = shutdown.changed() => return Ok(Outcome::Ended { welcomed: true, reason: "shutting down".into() }),
            }
        }
    }
}

/// The local address this host sends from towards `remote`: what the coordinator's gateway is
/// most likely to reach it at. Asks the kernel's routing (a UDP "connect" sends nothing).
fn local_address_towards(remote: SocketAddr) -> Option<String> {
    let bind: SocketAddr = if remote.is_ipv4() {
        "0.0.0.0:0".parse().expect("literal")
    } else {
        "[::]:0".parse().expect("literal")
    };
    let socket = std::net::UdpSocket::bind(bind).ok()?;
    socket.connect(remote).ok()?;
    let local = socket.local_addr().ok()?.ip();
    (!local.is_unspecified()).then(|| local.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_its_ceiling_and_resets() {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
        let ceilings: Vec<u128> = (0..8)
            .map(|_| backoff.next_delay(0.999_999).as_millis())
            .collect();
        assert_eq!(ceilings, vec![199, 399, 799, 1599, 3199, 6399, 9999, 9999]);
        assert_eq!(
            backoff.next_delay(0.0),
            Duration::ZERO,
            "full jitter reaches zero"
        );
        backoff.reset();
        assert!(backoff.next_delay(0.999_999) < Duration::from_millis(200));
    }

    #[test]
    fn the_local_address_towards_loopback_is_loopback() {
        let remote: SocketAddr = "127.0.0.1:7443".parse().unwrap();
        assert_eq!(local_address_towards(remote).as_deref(), Some("127.0.0.1"));
    }
}
