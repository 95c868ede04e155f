//! The coordinator daemon: one event loop that owns the state, fed by the QUIC shell, the HTTP
//! API and a ticker. Nothing else mutates state; handlers talk to the loop through [`Handle`].

use crate::api::types::{AgentView, GpuView, NodeView, RuntimeView};
use crate::core::liveness::{AgentStatus, LivenessTracker};
use crate::{api, data_dir, quic};
use anyhow::{Context, Result};
use gantry_protocol::{CoordinatorMessage, GpuSource, Register, SiteKind, Welcome};
use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// Events the loop accepts. A bounded queue: producers wait when the loop is behind.
pub const EVENT_QUEUE_LEN_MAX: usize = 16 * 1024;
/// How often the loop checks for agents past their TTL.
const LIVENESS_TICK: Duration = Duration::from_millis(250);

#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    pub data_dir: PathBuf,
    pub heartbeat_interval: Duration,
    pub agent_ttl: Duration,
    /// Lifetime of certificates issued to agents; they renew at two thirds of it.
    pub agent_cert_ttl: Duration,
}

impl CoordinatorConfig {
    pub fn new(data_dir: PathBuf) -> Self {
        Self {
            data_dir,
            heartbeat_interval: Duration::from_secs(3),
            agent_ttl: Duration::from_secs(15),
            agent_cert_ttl: Duration::from_secs(24 * 3600),
        }
    }
}

/// Sockets the caller bound, so tests and benches can bind port 0.
pub struct Listeners {
    pub quic: std::net::UdpSocket,
    pub http: std::net::TcpListener,
}

pub enum Event {
    Registered {
        agent_id: String,
        register: Box<Register>,
        session_id: u64,
        outbox: mpsc::Sender<CoordinatorMessage>,
        reply: oneshot::Sender<Welcome>,
    },
    Heartbeat {
        agent_id: String,
        session_id: u64,
    },
    SessionEnded {
        agent_id: String,
        session_id: u64,
    },
    ListAgents {
        reply: oneshot::Sender<Vec<AgentView>>,
    },
}

pub type Handle = mpsc::Sender<Event>;

struct AgentRecord {
    register: Register,
    session_id: u64,
    /// Dropping it tells the session task that a newer session replaced it.
    _outbox: Option<mpsc::Sender<CoordinatorMessage>>,
}

struct Coordinator {
    config: CoordinatorConfig,
    started: Instant,
    liveness: LivenessTracker,
    agents: BTreeMap<String, AgentRecord>,
}

impl Coordinator {
    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    fn handle_event(&mut self, event: Event) {
        let now_ms = self.now_ms();
        match event {
            Event::Registered {
                agent_id,
                register,
                session_id,
                outbox,
                reply,
            } => {
                let ttl_ms = self.config.agent_ttl.as_millis() as u64;
                if let Some(transition) = self.liveness.handle_register(&agent_id, ttl_ms, now_ms) {
                    tracing::info!(agent = %agent_id, name = %register.name, site = %register.site, status = ?transition.status, "agent registered");
                }
                self.agents.insert(
                    agent_id.clone(),
                    AgentRecord {
                        register: *register,
                        session_id,
                        _outbox: Some(outbox),
                    },
                );
                let _ = reply.send(Welcome {
                    agent_id,
                    heartbeat_interval_ms: self.config.heartbeat_interval.as_millis() as u64,
                    ttl_ms,
                });
            }
            Event::Heartbeat {
                agent_id,
                session_id,
            } => {
                let current = self
                    .agents
                    .get(&agent_id)
                    .is_some_and(|r| r.session_id == session_id);
                if current {
                    if let Some(transition) = self.liveness.handle_heartbeat(&agent_id, now_ms) {
                        tracing::info!(agent = %agent_id, status = ?transition.status, "agent is back");
                    }
                }
            }
            Event::SessionEnded {
                agent_id,
                session_id,
            } => {
                if let Some(record) = self.agents.get_mut(&agent_id) {
                    if record.session_id == session_id {
                        record._outbox = None;
                        tracing::info!(agent = %agent_id, "agent session ended; down after its TTL unless it reconnects");
                    }
                }
            }
            Event::ListAgents { reply } => {
                let _ = reply.send(self.agent_views(now_ms));
            }
        }
    }

    fn handle_tick(&mut self) {
        for transition in self.liveness.poll_transitions(self.now_ms()) {
            tracing::warn!(agent = %transition.agent_id, "agent missed its heartbeats past its TTL: down");
        }
    }

    fn agent_views(&self, now_ms: u64) -> Vec<AgentView> {
        self.agents
            .iter()
            .map(|(agent_id, record)| {
                let status = match self.liveness.status(agent_id) {
                    Some(AgentStatus::Ready) => "ready",
                    Some(AgentStatus::Down) | None => "down",
                };
                let silence_ms = self.liveness.silence_ms(agent_id, now_ms).unwrap_or(0);
                let register = &record.register;
                let single = register.nodes.len() == 1;
                let nodes = register
                    .nodes
                    .iter()
                    .map(|node| NodeView {
                        id: if single {
                            agent_id.clone()
                        } else {
                            format!("{agent_id}/{}", node.name)
                        },
                        agent: agent_id.clone(),
                        name: register.name.clone(),
                        node: node.name.clone(),
                        site: register.site.clone(),
                        site_kind: match register.site_kind {
                            SiteKind::OnPrem => "on-prem",
                            SiteKind::Cloud => "cloud",
                        }
                        .into(),
                        status: status.into(),
                        hostname: node.hostname.clone(),
                        os: node.os.clone(),
                        arch: node.arch.clone(),
                        cpu_cores: node.cpu_cores,
                        memory_bytes: node.memory_bytes,
                        disk_bytes: node.disk_bytes,
                        disk_free_bytes: node.disk_free_bytes,
                        gpus: node
                            .gpus
                            .iter()
                            .map(|gpu| GpuView {
                                index: gpu.index,
                                model: gpu.model.clone(),
                                memory_bytes: gpu.memory_bytes,
                                uuid: gpu.uuid.clone(),
                                source: match gpu.source {
                                    GpuSource::Nvml => "nvml",
                                    GpuSource::Declared => "declared",
                                }
                                .into(),
                            })
                            .collect(),
                        runtimes: register
                            .runtimes
                            .iter()
                            .map(|r| r.kind.as_str().to_string())
                            .collect(),
                        runtime_details: register
                            .runtimes
                            .iter()
                            .map(|r| RuntimeView {
                                kind: r.kind.as_str().into(),
                                detail: r.detail.clone(),
                            })
                            .collect(),
                        labels: register.labels.clone(),
                        cost_per_gpu_hour: register.cost_per_gpu_hour,
                        cost_per_cpu_hour: register.cost_per_cpu_hour,
                        software_version: register.software_version.clone(),
                        last_heard_ms_ago: silence_ms,
                    })
                    .collect();
                AgentView {
                    id: agent_id.clone(),
                    name: register.name.clone(),
                    status: status.into(),
                    site: register.site.clone(),
                    nodes,
                }
            })
            .collect()
    }
}

/// Runs a coordinator until `shutdown` resolves. The data dir must be initialised.
pub async fn run(
    config: CoordinatorConfig,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let files = data_dir::load(&config.data_dir)?;
    let quic_addr = listeners.quic.local_addr().context("read QUIC address")?;
    let http_addr = listeners.http.local_addr().context("read HTTP address")?;
    let (events_tx, mut events_rx) = mpsc::channel(EVENT_QUEUE_LEN_MAX);

    let quic_context = Arc::new(quic::QuicContext::new(
        &files,
        events_tx.clone(),
        config.agent_cert_ttl,
    ));
    let endpoint = quic::endpoint(&files, listeners.quic)?;
    let quic_task = tokio::spawn(quic::serve(endpoint.clone(), quic_context));

    let api_state = Arc::new(api::ApiState {
        handle: events_tx.clone(),
        admin_token_sha256: ring::digest::digest(
            &ring::digest::SHA256,
            files.admin_token.as_bytes(),
        )
        .as_ref()
        .to_vec(),
        cluster_key: files.cluster_key.clone(),
        ca_sha256_hex: files.ca.sha256_hex(),
    });
    listeners
        .http
        .set_nonblocking(true)
        .context("make the HTTP listener non-blocking")?;
    let http_listener =
        tokio::net::TcpListener::from_std(listeners.http).context("adopt the HTTP listener")?;
    let (http_stop_tx, http_stop_rx) = oneshot::channel::<()>();
    let http_task = tokio::spawn(async move {
        axum::serve(http_listener, api::router(api_state))
            .with_graceful_shutdown(async {
                let _ = http_stop_rx.await;
            })
            .await
    });
    drop(events_tx);

    tracing::info!(
        node = %files.node_id,
        quic = %quic_addr,
        http = %http_addr,
        ca_sha256 = %files.ca.sha256_hex(),
        "coordinator started"
    );

    let mut coordinator = Coordinator {
        config,
        started: Instant::now(),
        liveness: LivenessTracker::new(),
        agents: BTreeMap::new(),
    };
    let mut tick = tokio::time::interval(LIVENESS_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = tick.tick() => coordinator.handle_tick(),
            event = events_rx.recv() => match event {
                Some(event) => coordinator.handle_event(event),
                None => break,
            },
        }
    }
    tracing::info!("coordinator shutting down");
    endpoint.close(
        gantry_protocol::transport::close_code::SHUTDOWN.into(),
        b"coordinator shutting down",
    );
    let _ = http_stop_tx.send(());
    quic_task.abort();
    let _ = http_task.await;
    endpoint.wait_idle().await;
    Ok(())
}
