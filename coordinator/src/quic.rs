//! The QUIC shell: accepts connections, tells agents, joining nodes and peer coordinators apart
//! by ALPN and certificate role, and turns their messages into events for the loop.

use crate::data_dir::ClusterFiles;
use crate::server::Unavailable;
use crate::server::{Event, Handle};
use anyhow::Result;
use gantry_protocol::pki::ClusterCa;
use gantry_protocol::token::{JoinToken, TokenError};
use gantry_protocol::transport::{
    self, close_code, server_hello, TransportError, ALPN_AGENT, ALPN_JOIN, ALPN_PEER,
};
use gantry_protocol::{
    AgentMessage, CoordinatorGrant, CoordinatorMessage, ErrorCode, JoinRequest, JoinResponse,
    PeerEnvelope, PeerPayload, Register, Role, WireError,
};
use protobuf::Message as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, oneshot};

/// Messages queued for one agent's session before the loop waits.
const OUTBOX_LEN_MAX: usize = 256;
/// A joining node gets this long to send its request.
const JOIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Bounds on what one register message may declare.
const REGISTER_NODES_MAX: usize = 10_000;
const REGISTER_LABELS_MAX: usize = 256;
/// The longest address an agent may register (a DNS name's limit).
const REGISTER_ADDRESS_BYTES_MAX: usize = 253;

pub struct QuicContext {
    events: Handle,
    node_id: u64,
    ca: ClusterCa,
    cluster_key: Vec<u8>,
    admin_token: String,
    agent_cert_ttl: Duration,
    next_session_id: AtomicU64,
}

impl QuicContext {
    pub fn new(files: &ClusterFiles, events: Handle, agent_cert_ttl: Duration) -> Self {
        let ca = ClusterCa::from_pem(&files.ca.cert_pem(), &files.ca.key_pem())
            .expect("a CA that was just loaded reloads");
        Self {
            events,
            node_id: files.node_id,
            ca,
            cluster_key: files.cluster_key.clone(),
            admin_token: files.admin_token.clone(),
            agent_cert_ttl,
            next_session_id: AtomicU64::new(1),
        }
    }
}

pub fn endpoint(files: &ClusterFiles, socket: std::net::UdpSocket) -> Result<quinn::Endpoint> {
    let tls = gantry_protocol::tls::server_config(
        &files.credentials,
        &[ALPN_AGENT, ALPN_JOIN, ALPN_PEER],
    )?;
    Ok(transport::server_endpoint(socket, tls)?)
}

/// Accepts connections until the endpoint closes. Each connection's task lives in a set owned
/// by this future, so dropping it (a coordinator stopped abruptly) ends them all.
pub async fn serve(endpoint: quinn::Endpoint, context: Arc<QuicContext>) {
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let incoming = tokio::select! {
            incoming = endpoint.accept() => match incoming {
                Some(incoming) => incoming,
                None => break,
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        let context = context.clone();
        connections.spawn(async move {
            let remote = incoming.remote_address();
            let connection = match incoming.await {
                Ok(connection) => connection,
                Err(e) => {
                    tracing::warn!(%remote, "QUIC handshake failed: {e}");
                    return;
                }
            };
            if let Err(reason) = handle_connection(&connection, &context).await {
                tracing::warn!(%remote, "closing connection: {reason}");
                connection.close(close_code::PROTOCOL_VIOLATION.into(), reason.as_bytes());
            }
        });
    }
}

fn refuse(connection: &quinn::Connection, reason: &str) -> Result<(), String> {
    connection.close(close_code::REFUSED.into(), reason.as_bytes());
    Err(reason.to_string())
}

async fn handle_connection(
    connection: &quinn::Connection,
    context: &QuicContext,
) -> Result<(), String> {
    let alpn = transport::alpn_of(connection).unwrap_or_default();
    let identity = transport::peer_identity(connection);
    match alpn.as_slice() {
        ALPN_JOIN => join(connection, context).await,
        ALPN_AGENT => match identity {
            Some(identity) if identity.role == Role::Agent => {
                agent_session(connection, context, identity.identity).await
            }
            Some(identity) => refuse(
                connection,
                &format!(
                    "certificate of {} has role {}; an agent session needs an agent certificate",
                    identity.identity, identity.role
                ),
            ),
            None => refuse(
                connection,
                "an agent session needs a client certificate: join with a token first",
            ),
        },
        ALPN_PEER => match identity {
            Some(identity) if identity.role == Role::Coordinator => {
                peer_session(connection, context).await
            }
            Some(identity) => refuse(
                connection,
                &format!(
                    "certificate of {} has role {}: it cannot act as a coordinator",
                    identity.identity, identity.role
                ),
            ),
            None => refuse(
                connection,
                "peer coordinators must present a coordinator certificate",
            ),
        },
        other => refuse(
            connection,
            &format!("unknown ALPN {:?}", String::from_utf8_lossy(other)),
        ),
    }
}

fn now_unix_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

fn random_suffix() -> String {
    let mut bytes = [0u8; 4];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .expect("the system random source works");
    hex::encode(bytes)
}

fn refusal(error: &TokenError) -> WireError {
    let code = match error {
        TokenError::Malformed(_) | TokenError::BadSignature => ErrorCode::TokenInvalid,
        TokenError::Expired { .. } => ErrorCode::TokenExpired,
        TokenError::WrongRole { .. } => ErrorCode::TokenWrongRole,
    };
    WireError {
        code,
        message: error.to_string(),
    }
}

async fn join(connection: &quinn::Connection, context: &QuicContext) -> Result<(), String> {
    let remote = connection.remote_address();
    let exchange = async {
        let (mut send, mut recv, _version) = server_hello(connection).await?;
        let request: JoinRequest = recv.expect().await?;
        let checked = JoinToken::parse(&request.token)
            .and_then(|token| token.verify(&context.cluster_key, now_unix_s(), request.role));
        let response = match checked {
            Err(error) => {
                tracing::warn!(%remote, name = %request.name, role = %request.role, "refused join: {error}");
                JoinResponse::Refused(refusal(&error))
            }
            Ok(()) if request.role == Role::Coordinator => {
                admit_coordinator(context, &request).await
            }
            Ok(()) => {
                let identity = format!("agent-{}", random_suffix());
                match context.ca.issue(
                    &request.csr_der,
                    Role::Agent,
                    &identity,
                    SystemTime::now(),
                    context.agent_cert_ttl,
                ) {
                    Ok(cert) => {
                        tracing::info!(%remote, name = %request.name, %identity, "agent joined");
                        JoinResponse::Accepted {
                            identity,
                            cert_der: cert.to_vec(),
                            ca_der: context.ca.cert_der().to_vec(),
                        }
                    }
                    Err(error) => JoinResponse::Refused(WireError {
                        code: ErrorCode::InvalidMessage,
                        message: error.to_string(),
                    }),
                }
            }
        };
        send.send(&response).await?;
        send.finish();
        Ok::<_, TransportError>(())
    };
    match tokio::time::timeout(JOIN_TIMEOUT, exchange).await {
        Ok(Ok(())) => {
            // Let the joining node read the answer and close the connection itself.
            let _ = tokio::time::timeout(JOIN_TIMEOUT, connection.closed()).await;
            Ok(())
        }
        Ok(Err(error)) => Err(format!("join exchange failed: {error}")),
        Err(_) => Err("join exchange timed out".into()),
    }
}

/// Adds a joining coordinator to the cluster as a learner (through Raft), then hands it its
/// certificate and the cluster's secrets.
async fn admit_coordinator(context: &QuicContext, request: &JoinRequest) -> JoinResponse {
    let refused = |message: String| {
        JoinResponse::Refused(WireError {
            code: ErrorCode::Internal,
            message,
        })
    };
    let Some(joining) = &request.coordinator else {
        return refused("a coordinator's join must say its node id and addresses".into());
    };
    if joining.node_id == 0 || joining.node_id == context.node_id {
        return refused(format!("node id {} is not available", joining.node_id));
    }
    let (reply, answer) = oneshot::channel();
    let event = Event::AddMember {
        node_id: joining.node_id,
        quic_addr: joining.quic_addr.clone(),
        http_addr: joining.http_addr.clone(),
        reply,
    };
    if context.events.send(event).await.is_err() {
        return refused("the coordinator is shutting down".into());
    }
    match answer.await {
        Ok(Ok(_)) => {}
        Ok(Err(Unavailable::NotLeader {
            leader: Some(leader),
        })) => {
            return JoinResponse::Redirect {
                leader_addr: leader.quic_addr,
            };
        }
        Ok(Err(reason)) => {
            let why = match reason {
                Unavailable::MembershipChanging => "another membership change is in progress",
                Unavailable::NotLeader { .. } => "no coordinator leads right now",
                Unavailable::Timeout => "the change did not commit in time",
                Unavailable::Overloaded => "the coordinator is overloaded",
                Unavailable::ShuttingDown => "the coordinator is shutting down",
            };
            return JoinResponse::Refused(WireError {
                code: ErrorCode::Unavailable,
                message: format!("cannot add a member now: {why}; retry"),
            });
        }
        Err(_) => return refused("the coordinator is shutting down".into()),
    }
    let (reply, answer) = oneshot::channel();
    let read = Event::Read {
        query: crate::server::Query::Cluster,
        stale: true,
        reply,
    };
    let members = match (context.events.send(read).await, answer.await) {
        (Ok(()), Ok(Ok(crate::server::Answer::Cluster(view)))) => view
            .members
            .into_iter()
            .map(|m| gantry_protocol::CoordinatorJoin {
                node_id: m.id,
                quic_addr: m.addr,
                http_addr: m.http_addr,
            })
            .collect(),
        _ => return refused("the coordinator is shutting down".into()),
    };
    let identity = crate::data_dir::coordinator_identity(joining.node_id);
    match context.ca.issue(
        &request.csr_der,
        Role::Coordinator,
        &identity,
        SystemTime::now(),
        Duration::from_secs(365 * 24 * 3600),
    ) {
        Ok(cert) => {
            tracing::info!(node = joining.node_id, addr = %joining.quic_addr, "coordinator joined as a learner");
            JoinResponse::AcceptedCoordinator(Box::new(CoordinatorGrant {
                identity,
                cert_der: cert.to_vec(),
                ca_der: context.ca.cert_der().to_vec(),
                ca_key_pem: context.ca.key_pem(),
                cluster_key: context.cluster_key.clone(),
                admin_token: context.admin_token.clone(),
                members,
            }))
        }
        Err(error) => refused(error.to_string()),
    }
}

/// Raft traffic from another coordinator.
async fn peer_session(connection: &quinn::Connection, context: &QuicContext) -> Result<(), String> {
    let (_send, mut recv, _version) = match server_hello(connection).await {
        Ok(opened) => opened,
        Err(TransportError::Refused(message)) => return refuse(connection, &message),
        Err(e) => return Err(e.to_string()),
    };
    let mut reassembly = crate::peers::Reassembly::default();
    loop {
        let envelope = match recv.recv::<PeerEnvelope>().await {
            Ok(Some(envelope)) => envelope,
            Ok(None) => return Ok(()),
            Err(TransportError::Connection(_))
            | Err(TransportError::Read(quinn::ReadError::ConnectionLost(_))) => {
                return Ok(());
            }
            Err(e) => return Err(format!("peer stream: {e}")),
        };
        if envelope.to_node != context.node_id {
            tracing::warn!(
                to = envelope.to_node,
                from = envelope.from_node,
                "dropping peer traffic addressed to another node"
            );
            continue;
        }
        let event = match envelope.payload {
            PeerPayload::Raft(_) if reassembly.in_progress() => {
                return Err("peer interleaved raft messages with the parts of another".into());
            }
            PeerPayload::RaftPart { bytes, last } => match reassembly.push(bytes, last)? {
                None => continue,
                Some(whole) => match raft::eraftpb::Message::parse_from_bytes(&whole) {
                    Ok(message) => Event::PeerMessages(vec![message]),
                    Err(e) => {
                        return Err(format!(
                            "peer sent a raft message in parts that does not decode: {e}"
                        ))
                    }
                },
            },
            PeerPayload::Raft(encoded) => {
                let mut messages = Vec::with_capacity(encoded.len());
                for bytes in encoded {
                    match raft::eraftpb::Message::parse_from_bytes(&bytes) {
                        Ok(message) => messages.push(message),
                        Err(e) => {
                            return Err(format!(
                                "peer sent a raft message that does not decode: {e}"
                            ))
                        }
                    }
                }
                Event::PeerMessages(messages)
            }
            PeerPayload::Status { applied_index } => Event::PeerStatus {
                from: envelope.from_node,
                applied_index,
            },
        };
        if context.events.send(event).await.is_err() {
            return Ok(());
        }
    }
}

fn validate_register(register: &Register) -> Result<(), String> {
    if register.nodes.is_empty() {
        return Err("register.nodes is empty: an agent reports at least one node".into());
    }
    if register.nodes.len() > REGISTER_NODES_MAX {
        return Err(format!(
            "register.nodes has {} entries, over the limit of {REGISTER_NODES_MAX}",
            register.nodes.len()
        ));
    }
    if register.labels.len() > REGISTER_LABELS_MAX {
        return Err(format!(
            "register.labels has {} entries, over the limit of {REGISTER_LABELS_MAX}",
            register.labels.len()
        ));
    }
    if let Some(address) = &register.address {
        let valid = !address.is_empty()
            && address.len() <= REGISTER_ADDRESS_BYTES_MAX
            && address
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':'));
        if !valid {
            return Err(format!(
                "register.address must be a host name or an IP address without a port, got {address:?}"
            ));
        }
    }
    for (field, cost) in [
        ("cost_per_gpu_hour", register.cost_per_gpu_hour),
        ("cost_per_cpu_hour", register.cost_per_cpu_hour),
    ] {
        if !cost.is_finite() || cost < 0.0 {
            return Err(format!(
                "register.{field} must be a finite, non-negative number, got {cost}"
            ));
        }
    }
    Ok(())
}

async fn agent_session(
    connection: &quinn::Connection,
    context: &QuicContext,
    agent_id: String,
) -> Result<(), String> {
    let (mut send, mut recv, _version) = match server_hello(connection).await {
        Ok(opened) => opened,
        Err(TransportError::Refused(message)) => return refuse(connection, &message),
        Err(e) => return Err(e.to_string()),
    };
    let mut register = match recv.expect::<AgentMessage>().await {
        Ok(AgentMessage::Register(register)) => register,
        Ok(_) => return Err("the first message of an agent session must be Register".into()),
        Err(e) => return Err(format!("reading Register: {e}")),
    };
    if let Err(reason) = validate_register(&register) {
        let _ = send
            .send(&CoordinatorMessage::Error(WireError {
                code: ErrorCode::InvalidMessage,
                message: reason.clone(),
            }))
            .await;
        send.finish_and_flush(transport::REFUSAL_FLUSH_TIMEOUT)
            .await;
        return refuse(connection, &reason);
    }
    if register.address.is_none() {
        // Where this coordinator sees the agent come from: the best guess left.
        register.address = Some(connection.remote_address().ip().to_string());
    }
    let session_id = context.next_session_id.fetch_add(1, Ordering::Relaxed);
    let (outbox, mut outbox_rx) = mpsc::channel(OUTBOX_LEN_MAX);
    let (reply, welcome) = oneshot::channel();
    let registered = Event::Registered {
        agent_id: agent_id.clone(),
        register: Box::new(register),
        session_id,
        outbox,
        reply,
    };
    context
        .events
        .send(registered)
        .await
        .map_err(|_| "coordinator is shutting down".to_string())?;
    let welcome = match welcome
        .await
        .map_err(|_| "coordinator is shutting down".to_string())?
    {
        Ok(welcome) => welcome,
        Err(leader) => {
            // Only the leader keeps agent sessions; send the agent there.
            let message = match leader {
                Some(leader_addr) => CoordinatorMessage::Redirect { leader_addr },
                None => CoordinatorMessage::Error(WireError {
                    code: ErrorCode::Internal,
                    message: "no coordinator leads right now (an election is in progress); retry"
                        .into(),
                }),
            };
            let _ = send.send(&message).await;
            send.finish_and_flush(transport::REFUSAL_FLUSH_TIMEOUT)
                .await;
            connection.close(close_code::NORMAL.into(), b"not the leader");
            return Ok(());
        }
    };
    send.send(&CoordinatorMessage::Welcome(welcome))
        .await
        .map_err(|e| e.to_string())?;

    let outcome = loop {
        tokio::select! {
            message = recv.recv::<AgentMessage>() => match message {
                Ok(Some(AgentMessage::Heartbeat(_))) => {
                    let event = Event::Heartbeat { agent_id: agent_id.clone(), session_id };
                    if context.events.send(event).await.is_err() {
                        break Ok(());
                    }
                }
                Ok(Some(AgentMessage::RenewCertificate { csr_der })) => {
                    let issued = context.ca.issue(&csr_der, Role::Agent, &agent_id, SystemTime::now(), context.agent_cert_ttl);
                    let reply = match issued {
                        Ok(cert) => CoordinatorMessage::Certificate { cert_der: cert.to_vec() },
                        Err(e) => CoordinatorMessage::Error(WireError { code: ErrorCode::InvalidMessage, message: e.to_string() }),
                    };
                    tracing::info!(agent = %agent_id, "renewed agent certificate");
                    if let Err(e) = send.send(&reply).await {
                        break Err(e.to_string());
                    }
                }
                Ok(Some(AgentMessage::Register(_))) => break Err("Register sent twice in one session".into()),
                Ok(Some(AgentMessage::AllocationState(report))) => {
                    tracing::debug!(agent = %agent_id, allocation = %report.allocation_id, phase = ?report.phase, "allocation state report");
                    let event = Event::AllocationReport { agent_id: agent_id.clone(), report };
                    if context.events.send(event).await.is_err() {
                        break Ok(());
                    }
                }
                Ok(Some(AgentMessage::Nodes(nodes))) => {
                    if nodes.len() > REGISTER_NODES_MAX {
                        break Err(format!("nodes has {} entries, over the limit of {REGISTER_NODES_MAX}", nodes.len()));
                    }
                    let event = Event::Nodes { agent_id: agent_id.clone(), session_id, nodes };
                    if context.events.send(event).await.is_err() {
                        break Ok(());
                    }
                }
                Ok(Some(AgentMessage::Logs(reply))) => {
                    let event = Event::Logs { agent_id: agent_id.clone(), reply };
                    if context.events.send(event).await.is_err() {
                        break Ok(());
                    }
                }
                Ok(None) => break Ok(()),
                Err(TransportError::Connection(e)) | Err(TransportError::Read(quinn::ReadError::ConnectionLost(e))) => {
                    tracing::info!(agent = %agent_id, "agent connection lost: {e}");
                    break Ok(());
                }
                Err(e) => break Err(format!("agent {agent_id}: {e}")),
            },
            outgoing = outbox_rx.recv() => match outgoing {
                Some(message) => {
                    if let Err(e) = send.send(&message).await {
                        break Err(e.to_string());
                    }
                }
                None => {
                    connection.close(close_code::NORMAL.into(), b"superseded by a newer session");
                    break Ok(());
                }
            },
        }
    };
    let _ = context
        .events
        .send(Event::SessionEnded {
            agent_id,
            session_id,
        })
        .await;
    outcome
}
