//! The coordinator daemon: one event loop that owns the Raft replica, the replicated state, the
//! agents' liveness and their sessions. The QUIC shell, the peer transport, the HTTP API and a
//! ticker feed it events; nothing else touches the state.

use crate::api::types::{AgentView, ClusterView, GpuView, MemberView, NodeView, RuntimeView};
use crate::core::liveness::{AgentStatus, LivenessTracker};
use crate::core::scheduler;
use crate::core::serving::ServingRoutes;
use crate::core::state::{AgentState, Job, Member, Outcome, State};
use crate::peers::PeerTransport;
use crate::replica::disk::RedbLog;
use crate::replica::{ProposeError, Replica, ReplicaConfig};
use crate::{api, data_dir, quic};
use anyhow::{Context, Result};
use gantry_protocol::replicated::{self, Command, MemberChange, Op};
use gantry_protocol::{
    CoordinatorMessage, FetchLogs, GpuSource, LogSlice, LogStream, LogsError, LogsReply, SiteKind,
    Welcome,
};
use raft::eraftpb::{ConfChange, ConfChangeType, Message};
use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, oneshot, watch};

/// Events the loop accepts. A bounded queue: producers wait when the loop is behind.
pub const EVENT_QUEUE_LEN_MAX: usize = 16 * 1024;
/// Events handled before each Ready pass, so that many proposals share one fsync.
const EVENTS_PER_READY_MAX: usize = 4096;
/// One Raft tick. Elections after 10 to 20 ticks without a leader; heartbeats every 2.
pub const TICK: Duration = Duration::from_millis(100);
/// Every this many ticks a member starts copying the artifacts it lacks.
const ARTIFACT_SYNC_TICKS: u64 = 10;
/// A follower writes a Ready of at most this many entries on the event loop's thread.
const FOLLOWER_INLINE_ENTRIES_MAX: usize = 8;
/// Connections the HTTP listener holds before they are accepted, as Go's servers (Nomad) get.
const HTTP_BACKLOG: i32 = 4096;
/// A proposal or linearizable read not answered in this time gets a 503.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a stopped unit gets between the polite signal and the kill.
pub const STOP_GRACE: Duration = Duration::from_secs(10);
/// Proposals waiting for commit at once; more are refused with a 503.
pub const PENDING_PROPOSALS_MAX: usize = 65_536;
/// Log reads waiting for their agents' answers at once, in all and per agent; more are refused
/// with a 503.
pub const LOG_FETCHES_MAX: usize = 256;
pub const LOG_FETCHES_PER_AGENT_MAX: usize = 16;
/// An agent that has not answered a log read in this time is reported as not answering.
pub const LOG_FETCH_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    pub data_dir: PathBuf,
    pub heartbeat_interval: Duration,
    pub agent_ttl: Duration,
    /// Lifetime of certificates issued to agents; they renew at two thirds of it.
    pub agent_cert_ttl: Duration,
    /// Addresses the other members use to reach this one; the bound addresses when unset.
    pub advertise_quic: Option<SocketAddr>,
    pub advertise_http: Option<SocketAddr>,
    /// Snapshot the state and compact the Raft log every this many applied entries at least.
    pub snapshot_every_entries: u64,
    /// Also wait until the entries applied since the last snapshot hold as many bytes as it did
    /// (see [`ReplicaConfig::snapshot_amortized`]).
    pub snapshot_amortized: bool,
}

impl CoordinatorConfig {
    pub fn new(data_dir: PathBuf) -> Self {
        Self {
            data_dir,
            heartbeat_interval: Duration::from_secs(3),
            agent_ttl: Duration::from_secs(15),
            agent_cert_ttl: Duration::from_secs(24 * 3600),
            advertise_quic: None,
            advertise_http: None,
            snapshot_every_entries: 10_000,
            snapshot_amortized: true,
        }
    }
}

/// Sockets the caller bound, so tests and benches can bind port 0.
pub struct Listeners {
    pub quic: std::net::UdpSocket,
    pub http: std::net::TcpListener,
}

/// Why a request could not be served here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unavailable {
    /// Another member leads; its addresses, when known.
    NotLeader {
        leader: Option<Member>,
    },
    /// The answer did not come in time, or leadership changed before commit: the outcome is
    /// unknown and the client should retry (with the same idempotency key).
    Timeout,
    Overloaded,
    ShuttingDown,
    /// Raft takes one membership change at a time and one is still in progress.
    MembershipChanging,
}

pub type Reply<T> = oneshot::Sender<Result<T, Unavailable>>;

#[derive(Debug, Clone)]
pub enum Query {
    Jobs,
    Job(String),
    Explain(String),
    Quotas,
    Agents,
    Cluster,
    Policy,
}

/// A job with its allocations, for the API.
pub type JobWithAllocations = (Job, Vec<crate::core::allocations::Allocation>);

#[derive(Debug, Clone)]
pub enum Answer {
    Jobs(Vec<JobWithAllocations>),
    Job(Option<JobWithAllocations>),
    /// The job, if it exists, and its units the scheduler cannot place now, with why.
    Explain(Option<Job>, Vec<scheduler::Unplaced>),
    Quotas(BTreeMap<String, u32>),
    Agents(Vec<AgentView>),
    Cluster(ClusterView),
    Policy(gantry_protocol::replicated::Policy),
}

/// One allocation whose output a log request reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogTarget {
    pub allocation_id: String,
    pub unit: u32,
    pub attempt: u32,
    pub agent_id: String,
}

/// What a log request reads: one allocation, or a job's allocations by unit, then attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogTargets {
    pub targets: Vec<LogTarget>,
    /// The job has ended: no allocation will be added.
    pub job_final: bool,
}

/// Part of an allocation's output, and whether the allocation has ended in the state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogAnswer {
    pub slice: LogSlice,
    pub allocation_final: bool,
}

/// Why a log request could not be answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogsRefusal {
    Unavailable(Unavailable),
    NoJob {
        job_id: String,
    },
    NoAllocation {
        job_id: String,
        allocation_id: String,
    },
    /// The agent holding the output cannot be asked now: down, disconnected, silent, or busy.
    Agent {
        agent_id: String,
        message: String,
    },
    /// The agent holds no output for the allocation (yet).
    NoLogs {
        message: String,
        allocation_final: bool,
    },
    Failed(String),
}

pub enum Event {
    Registered {
        agent_id: String,
        register: Box<gantry_protocol::Register>,
        session_id: u64,
        outbox: mpsc::Sender<CoordinatorMessage>,
        /// A welcome, or the leader's QUIC address to redirect to (None: no leader yet).
        reply: oneshot::Sender<Result<Welcome, Option<String>>>,
    },
    Heartbeat {
        agent_id: String,
        session_id: u64,
    },
    SessionEnded {
        agent_id: String,
        session_id: u64,
    },
    /// An agent reported on one of its allocations.
    AllocationReport {
        agent_id: String,
        report: gantry_protocol::AllocationStateReport,
    },
    Nodes {
        agent_id: String,
        session_id: u64,
        nodes: Vec<gantry_protocol::NodeCapacity>,
    },
    /// An agent answered a log read.
    Logs {
        agent_id: String,
        reply: LogsReply,
    },
    /// Which allocations a log request reads (leader only).
    LogTargets {
        job_id: String,
        allocation_id: Option<String>,
        reply: oneshot::Sender<Result<LogTargets, LogsRefusal>>,
    },
    /// Reads part of an allocation's output from its agent (leader only). Answered when the
    /// agent answers, or after [`LOG_FETCH_TIMEOUT`].
    FetchLogs {
        allocation_id: String,
        stream: LogStream,
        offset: u64,
        max_bytes: u32,
        reply: oneshot::Sender<Result<LogAnswer, LogsRefusal>>,
    },
    PeerMessages(Vec<Message>),
    PeerStatus {
        from: u64,
        applied_index: u64,
    },
    SnapshotReport {
        to: u64,
        delivered: bool,
    },
    Unreachable {
        to: u64,
    },
    Propose {
        actor: String,
        op: Op,
        reply: Reply<Outcome>,
    },
    AddMember {
        node_id: u64,
        quic_addr: String,
        http_addr: String,
        reply: Reply<Outcome>,
    },
    RemoveMember {
        node_id: u64,
        reply: Reply<Outcome>,
    },
    Read {
        query: Query,
        stale: bool,
        reply: Reply<Answer>,
    },
}

pub type Handle = mpsc::Sender<Event>;

struct Session {
    session_id: u64,
    outbox: mpsc::Sender<CoordinatorMessage>,
}

struct PendingProposal {
    reply: Reply<Outcome>,
    deadline: Instant,
}

struct PendingFetch {
    agent_id: String,
    allocation_id: String,
    reply: oneshot::Sender<Result<LogAnswer, LogsRefusal>>,
    deadline: Instant,
}

struct PendingRead {
    query: Query,
    reply: Reply<Answer>,
    deadline: Instant,
    /// Set once raft confirmed leadership: the index the state must reach.
    index: Option<u64>,
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

struct Coordinator {
    config: CoordinatorConfig,
    started: Instant,
    replica: Replica<State, RedbLog>,
    peers: PeerTransport,
    liveness: LivenessTracker,
    sessions: BTreeMap<String, Session>,
    pending: BTreeMap<u64, PendingProposal>,
    reads: BTreeMap<u64, PendingRead>,
    next_request_id: u64,
    peer_applied: BTreeMap<u64, u64>,
    members_seen: BTreeMap<u64, Member>,
    ticks: u64,
    /// The request id of the placement pass waiting for commit; one at a time.
    place_in_flight: Option<(u64, Instant)>,
    /// Allocations whose Assign, and whose Stop, went to the agent's current session.
    assigned: BTreeSet<String>,
    stopped: BTreeSet<String>,
    artifacts: crate::artifacts::ArtifactStore,
    /// Lets this member copy artifacts from the others.
    admin_token: String,
    /// Log reads sent to agents, by request id.
    log_fetches: BTreeMap<u64, PendingFetch>,
    /// The serving routes of the applied state, for the gateway.
    routes: watch::Sender<Arc<ServingRoutes>>,
}

impl Coordinator {
    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    fn state(&self) -> &State {
        self.replica.machine()
    }

    fn leader_member(&self) -> Option<Member> {
        self.replica
            .leader_id()
            .and_then(|id| self.state().members.get(&id).cloned())
    }

    fn not_leader(&self) -> Unavailable {
        Unavailable::NotLeader {
            leader: self.leader_member(),
        }
    }

    fn request_id(&mut self) -> u64 {
        self.next_request_id = self.next_request_id.wrapping_add(1);
        self.next_request_id
    }

    fn propose(&mut self, actor: String, op: Op, reply: Option<Reply<Outcome>>) {
        if !self.replica.is_leader() {
            if let Some(reply) = reply {
                let _ = reply.send(Err(self.not_leader()));
            }
            return;
        }
        if self.pending.len() >= PENDING_PROPOSALS_MAX {
            if let Some(reply) = reply {
                let _ = reply.send(Err(Unavailable::Overloaded));
            }
            return;
        }
        let request_id = self.request_id();
        let command = Command {
            request_id,
            at_unix_ms: unix_ms(),
            actor,
            op,
        };
        match self.replica.propose(replicated::encode(&command)) {
            Ok(()) => {
                if let Some(reply) = reply {
                    self.pending.insert(
                        request_id,
                        PendingProposal {
                            reply,
                            deadline: Instant::now() + REQUEST_TIMEOUT,
                        },
                    );
                }
            }
            Err(ProposeError::NotLeader { .. }) | Err(ProposeError::Dropped(_)) => {
                if let Some(reply) = reply {
                    let _ = reply.send(Err(self.not_leader()));
                }
            }
        }
    }

    fn propose_member_change(
        &mut self,
        change_type: ConfChangeType,
        member: MemberChange,
        reply: Option<Reply<Outcome>>,
    ) {
        if !self.replica.is_leader() {
            if let Some(reply) = reply {
                let _ = reply.send(Err(self.not_leader()));
            }
            return;
        }
        if self.replica.has_pending_conf_change() {
            // raft-rs would turn this proposal into an empty entry and it would never answer.
            if let Some(reply) = reply {
                let _ = reply.send(Err(Unavailable::MembershipChanging));
            }
            return;
        }
        let node_id = member.node_id;
        let request_id = member.request_id;
        let change = ConfChange {
            change_type,
            node_id,
            context: replicated::encode(&member).into(),
            ..Default::default()
        };
        match self.replica.propose_conf_change(change) {
            Ok(()) => {
                if let Some(reply) = reply {
                    self.pending.insert(
                        request_id,
                        PendingProposal {
                            reply,
                            deadline: Instant::now() + REQUEST_TIMEOUT,
                        },
                    );
                }
            }
            Err(_) => {
                if let Some(reply) = reply {
                    let _ = reply.send(Err(self.not_leader()));
                }
            }
        }
    }

    fn answer(&self, query: &Query) -> Answer {
        match query {
            Query::Jobs => Answer::Jobs(
                self.state()
                    .jobs
                    .values()
                    .map(|job| self.with_allocations(job))
                    .collect(),
            ),
            Query::Job(id) => Answer::Job(
                self.state()
                    .jobs
                    .get(id)
                    .map(|job| self.with_allocations(job)),
            ),
            Query::Explain(id) => {
                Answer::Explain(self.state().jobs.get(id).cloned(), self.explain(id))
            }
            Query::Quotas => Answer::Quotas(self.state().quotas.clone()),
            Query::Policy => Answer::Policy(self.state().policy.clone()),
            Query::Agents => Answer::Agents(self.agent_views()),
            Query::Cluster => Answer::Cluster(self.cluster_view()),
        }
    }

    fn with_allocations(&self, job: &Job) -> JobWithAllocations {
        let allocations = self.state().allocations_of(&job.id).cloned().collect();
        (job.clone(), allocations)
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
                if !self.replica.is_leader() {
                    let _ = reply.send(Err(self.leader_member().map(|m| m.quic_addr)));
                    return;
                }
                let ttl_ms = self.config.agent_ttl.as_millis() as u64;
                self.liveness.handle_register(&agent_id, ttl_ms, now_ms);
                let changed = self.state().agents.get(&agent_id).is_none_or(|record| {
                    record.register != *register || record.state != AgentState::Ready
                });
                if changed {
                    tracing::info!(agent = %agent_id, name = %register.name, site = %register.site, "agent registered");
                    let op = Op::AgentRegistered {
                        agent_id: agent_id.clone(),
                        register: *register,
                    };
                    self.propose(format!("agent:{agent_id}"), op, None);
                }
                self.sessions
                    .insert(agent_id.clone(), Session { session_id, outbox });
                // A new session gets every assignment and stop again; the agent ignores repeats.
                let mine: Vec<String> = self
                    .state()
                    .allocations
                    .values()
                    .filter(|a| a.agent_id == agent_id)
                    .map(|a| a.id.clone())
                    .collect();
                for id in mine {
                    self.assigned.remove(&id);
                    self.stopped.remove(&id);
                }
                let _ = reply.send(Ok(Welcome {
                    agent_id,
                    heartbeat_interval_ms: self.config.heartbeat_interval.as_millis() as u64,
                    ttl_ms,
                }));
            }
            Event::Heartbeat {
                agent_id,
                session_id,
            } => {
                let current = self
                    .sessions
                    .get(&agent_id)
                    .is_some_and(|s| s.session_id == session_id);
                if current && self.liveness.handle_heartbeat(&agent_id, now_ms).is_some() {
                    tracing::info!(agent = %agent_id, "agent is back");
                    self.propose(
                        format!("agent:{agent_id}"),
                        Op::AgentUp {
                            agent_id: agent_id.clone(),
                        },
                        None,
                    );
                }
            }
            Event::SessionEnded {
                agent_id,
                session_id,
            } => {
                if self
                    .sessions
                    .get(&agent_id)
                    .is_some_and(|s| s.session_id == session_id)
                {
                    self.sessions.remove(&agent_id);
                    tracing::info!(agent = %agent_id, "agent session ended; down after its TTL unless it reconnects");
                    let message = format!(
                        "agent {} disconnected before answering",
                        self.agent_label(&agent_id)
                    );
                    self.fail_log_fetches(
                        |fetch| fetch.agent_id == agent_id,
                        |_| LogsRefusal::Agent {
                            agent_id: agent_id.clone(),
                            message: message.clone(),
                        },
                    );
                }
            }
            Event::Logs { agent_id, reply } => self.handle_logs_reply(&agent_id, reply),
            Event::LogTargets {
                job_id,
                allocation_id,
                reply,
            } => {
                let _ = reply.send(self.log_targets(&job_id, allocation_id.as_deref()));
            }
            Event::FetchLogs {
                allocation_id,
                stream,
                offset,
                max_bytes,
                reply,
            } => self.handle_fetch_logs(allocation_id, stream, offset, max_bytes, reply),
            Event::AllocationReport { agent_id, report } => {
                self.handle_allocation_report(&agent_id, report)
            }
            Event::Nodes {
                agent_id,
                session_id,
                nodes,
            } => self.handle_nodes(&agent_id, session_id, nodes),
            Event::PeerMessages(messages) => {
                for message in messages {
                    if let Err(e) = self.replica.step(message) {
                        tracing::warn!("raft refused a peer message: {e}");
                    }
                }
            }
            Event::PeerStatus {
                from,
                applied_index,
            } => {
                self.peer_applied.insert(from, applied_index);
            }
            Event::SnapshotReport { to, delivered } => self.replica.report_snapshot(to, delivered),
            Event::Unreachable { to } => self.replica.report_unreachable(to),
            Event::Propose { actor, op, reply } => self.propose(actor, op, Some(reply)),
            Event::AddMember {
                node_id,
                quic_addr,
                http_addr,
                reply,
            } => {
                if let Some(member) = self.state().members.get(&node_id) {
                    if member.quic_addr == quic_addr && member.http_addr == http_addr {
                        let _ = reply.send(Ok(Outcome::MemberAdded { node_id }));
                        return;
                    }
                }
                let request_id = self.request_id();
                let member = MemberChange {
                    request_id,
                    node_id,
                    quic_addr,
                    http_addr,
                };
                self.propose_member_change(ConfChangeType::AddLearnerNode, member, Some(reply));
            }
            Event::RemoveMember { node_id, reply } => {
                let Some(member) = self.state().members.get(&node_id).cloned() else {
                    let _ = reply.send(Ok(Outcome::MemberRemoved { node_id }));
                    return;
                };
                let request_id = self.request_id();
                let change = MemberChange {
                    request_id,
                    node_id,
                    quic_addr: member.quic_addr,
                    http_addr: member.http_addr,
                };
                self.propose_member_change(ConfChangeType::RemoveNode, change, Some(reply));
            }
            Event::Read {
                query,
                stale,
                reply,
            } => {
                if stale {
                    let _ = reply.send(Ok(self.answer(&query)));
                    return;
                }
                let read_id = self.request_id();
                self.replica.read_index(read_id.to_be_bytes().to_vec());
                self.reads.insert(
                    read_id,
                    PendingRead {
                        query,
                        reply,
                        deadline: Instant::now() + REQUEST_TIMEOUT,
                        index: None,
                    },
                );
            }
        }
    }

    fn handle_tick(&mut self) -> Result<()> {
        self.ticks += 1;
        if self.ticks.is_multiple_of(ARTIFACT_SYNC_TICKS) {
            self.sync_artifacts();
        }
        self.replica.tick().map_err(storage_failed)?;
        let now = Instant::now();
        let expired: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| p.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            let pending = self.pending.remove(&id).expect("listed above");
            let _ = pending.reply.send(Err(Unavailable::Timeout));
        }
        let expired: Vec<u64> = self
            .reads
            .iter()
            .filter(|(_, r)| r.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            let read = self.reads.remove(&id).expect("listed above");
            let _ = read.reply.send(Err(Unavailable::Timeout));
        }
        let timeout = LOG_FETCH_TIMEOUT;
        let labels: BTreeMap<String, String> = self
            .log_fetches
            .values()
            .filter(|fetch| fetch.deadline <= now)
            .map(|fetch| (fetch.agent_id.clone(), self.agent_label(&fetch.agent_id)))
            .collect();
        self.fail_log_fetches(
            |fetch| fetch.deadline <= now,
            |fetch| LogsRefusal::Agent {
                agent_id: fetch.agent_id.clone(),
                message: format!(
                    "agent {} did not answer within {timeout:?}",
                    labels[&fetch.agent_id]
                ),
            },
        );
        if self.ticks.is_multiple_of(10) {
            self.peers.broadcast_status(self.replica.applied());
        }
        // Retries in backoff become due with time alone, so the scheduler also runs on ticks.
        if self.ticks.is_multiple_of(5) {
            self.schedule_pass();
        }
        if !self.replica.is_leader() {
            return Ok(());
        }
        for transition in self.liveness.poll_transitions(self.now_ms()) {
            let recorded_down = self
                .state()
                .agents
                .get(&transition.agent_id)
                .is_some_and(|a| a.state == AgentState::Down);
            if transition.status == AgentStatus::Down {
                // Its log reads will not be answered: say so now rather than at their timeout.
                let agent_id = transition.agent_id.clone();
                let message = format!(
                    "agent {} is down: it missed its heartbeats",
                    self.agent_label(&agent_id)
                );
                self.fail_log_fetches(
                    |fetch| fetch.agent_id == agent_id,
                    |_| LogsRefusal::Agent {
                        agent_id: agent_id.clone(),
                        message: message.clone(),
                    },
                );
            }
            if transition.status == AgentStatus::Down && !recorded_down {
                tracing::warn!(agent = %transition.agent_id, "agent missed its heartbeats past its TTL: down");
                let op = Op::AgentDown {
                    agent_id: transition.agent_id.clone(),
                };
                self.propose(format!("coordinator:{}", self.replica.id()), op, None);
            }
        }
        // Promote a learner once it has caught up with the commit index.
        let commit = self.replica.commit();
        if let Some(learner) = self
            .replica
            .learners()
            .into_iter()
            .find(|&id| self.replica.matched(id).is_some_and(|m| m >= commit))
        {
            if let Some(member) = self.state().members.get(&learner).cloned() {
                tracing::info!(node = learner, "learner caught up; promoting it to voter");
                let change = MemberChange {
                    request_id: 0,
                    node_id: learner,
                    quic_addr: member.quic_addr,
                    http_addr: member.http_addr,
                };
                self.propose_member_change(ConfChangeType::AddNode, change, None);
            }
        }
        Ok(())
    }

    fn handle_allocation_report(
        &mut self,
        agent_id: &str,
        report: gantry_protocol::AllocationStateReport,
    ) {
        if !self.replica.is_leader() {
            return;
        }
        let known = self.state().allocations.get(&report.allocation_id).cloned();
        let Some(allocation) = known.filter(|a| a.agent_id == agent_id) else {
            // Nothing here wants it: make sure it does not run.
            if report.phase == gantry_protocol::AllocationPhase::Running {
                self.send_stop(agent_id, &report.allocation_id, report.fencing);
            }
            return;
        };
        let fencing = gantry_protocol::FencingToken {
            term: allocation.fencing_term,
            index: allocation.fencing_index,
        };
        if report.fencing != fencing {
            tracing::warn!(allocation = %report.allocation_id, "ignoring a report with a stale fencing token");
            return;
        }
        if allocation.is_final() {
            if report.phase == gantry_protocol::AllocationPhase::Running {
                self.send_stop(agent_id, &report.allocation_id, report.fencing);
            }
            return;
        }
        let mut report = report;
        if report.phase == gantry_protocol::AllocationPhase::Succeeded {
            let files = std::mem::take(&mut report.artifacts);
            match self.store_artifacts(agent_id, &report.allocation_id, files) {
                Ok(Some(op)) => self.propose(format!("agent:{agent_id}"), op, None),
                Ok(None) => {}
                Err(reason) => {
                    report.phase = gantry_protocol::AllocationPhase::Failed {
                        exit_code: None,
                        reason: format!("the unit succeeded, but {reason}"),
                    }
                }
            }
        }
        if let Some(image) = report
            .image
            .clone()
            .filter(|i| allocation.image.as_ref() != Some(i))
        {
            let op = Op::RecordImage {
                allocation_id: report.allocation_id.clone(),
                image,
            };
            self.propose(format!("agent:{agent_id}"), op, None);
        }
        if allocation.phase != report.phase {
            let op = Op::AllocationUpdate {
                allocation_id: report.allocation_id,
                phase: report.phase,
            };
            self.propose(format!("agent:{agent_id}"), op, None);
        }
    }

    /// A connected agent's nodes changed: record them as a new registration.
    fn handle_nodes(
        &mut self,
        agent_id: &str,
        session_id: u64,
        nodes: Vec<gantry_protocol::NodeCapacity>,
    ) {
        let current = self
            .sessions
            .get(agent_id)
            .is_some_and(|s| s.session_id == session_id);
        if !current || !self.replica.is_leader() {
            return;
        }
        let Some(record) = self.state().agents.get(agent_id) else {
            return;
        };
        if record.register.nodes == nodes {
            return;
        }
        let mut register = record.register.clone();
        register.nodes = nodes;
        tracing::info!(agent = %agent_id, nodes = register.nodes.len(), "agent nodes changed");
        let op = Op::AgentRegistered {
            agent_id: agent_id.to_string(),
            register,
        };
        self.propose(format!("agent:{agent_id}"), op, None);
    }

    /// A job's inputs from this member's store; `None` while one is still being copied here.
    fn input_files(
        &self,
        job: &crate::core::state::Job,
    ) -> Option<Vec<gantry_protocol::ArtifactFile>> {
        let mut files = Vec::with_capacity(job.inputs.len());
        for input in &job.inputs {
            match self.artifacts.get(&input.sha256) {
                Ok(Some(data)) => files.push(gantry_protocol::ArtifactFile {
                    name: input.name.clone(),
                    sha256: input.sha256.clone(),
                    data,
                }),
                Ok(None) => return None,
                Err(e) => {
                    tracing::warn!(job = %job.id, "{e}");
                    return None;
                }
            }
        }
        Some(files)
    }

    /// Starts copying the artifacts this member lacks from the members that have them.
    fn sync_artifacts(&self) {
        let members: Vec<(u64, String)> = self
            .state()
            .members
            .iter()
            .filter(|(id, _)| **id != self.replica.id())
            .map(|(id, m)| (*id, m.http_addr.clone()))
            .collect();
        for (sha256, holder) in self.state().artifact_checksums() {
            if self.artifacts.has(sha256) {
                continue;
            }
            let mut sources: Vec<(bool, String)> = members
                .iter()
                .map(|(id, addr)| (*id != holder, addr.clone()))
                .collect();
            sources.sort();
            self.artifacts.fetch_in_background(
                sha256.clone(),
                sources.into_iter().map(|(_, addr)| addr).collect(),
                self.admin_token.clone(),
            );
        }
    }

    /// Stores the outputs a succeeded unit reported and proposes their record; `Err` names what
    /// is wrong with them (the unit then counts as failed).
    fn store_artifacts(
        &self,
        agent_id: &str,
        allocation_id: &str,
        files: Vec<gantry_protocol::ArtifactFile>,
    ) -> Result<Option<Op>, String> {
        if files.is_empty() {
            return Ok(None);
        }
        let total: usize = files.iter().map(|f| f.data.len()).sum();
        if total > gantry_protocol::ARTIFACTS_BYTES_PER_UNIT_MAX {
            return Err(format!(
                "its outputs add up to {total} bytes, over the {} one unit may report",
                gantry_protocol::ARTIFACTS_BYTES_PER_UNIT_MAX
            ));
        }
        let mut metas = Vec::with_capacity(files.len());
        for file in files {
            if !gantry_protocol::jobspec::is_artifact_name(&file.name) {
                return Err(format!("output name {:?} is not a file name", file.name));
            }
            self.artifacts
                .put(&file.sha256, &file.data)
                .map_err(|e| format!("output {}: {e}", file.name))?;
            metas.push(gantry_protocol::replicated::ArtifactMeta {
                name: file.name,
                sha256: file.sha256,
                size_bytes: file.data.len() as u64,
            });
        }
        tracing::info!(agent = %agent_id, allocation = %allocation_id, files = metas.len(), "stored outputs");
        Ok(Some(Op::RecordArtifacts {
            allocation_id: allocation_id.to_string(),
            holder: self.replica.id(),
            files: metas,
        }))
    }

    fn send_stop(
        &self,
        agent_id: &str,
        allocation_id: &str,
        fencing: gantry_protocol::FencingToken,
    ) {
        if let Some(session) = self.sessions.get(agent_id) {
            let stop = gantry_protocol::Stop {
                allocation_id: allocation_id.to_string(),
                fencing,
                grace_period_ms: STOP_GRACE.as_millis() as u64,
            };
            let _ = session.outbox.try_send(CoordinatorMessage::Stop(stop));
        }
    }

    /// Sends agents the assignments and stops they have not had in their current session.
    fn dispatch(&mut self) {
        let mut sent_assign = Vec::new();
        let mut sent_stop = Vec::new();
        for allocation in self.state().allocations.values() {
            // A preempted allocation is final in the state at once (its resources go to the
            // preemptor) but its process still has to be stopped.
            if allocation.is_final() && !allocation.preempted {
                continue;
            }
            let Some(session) = self.sessions.get(&allocation.agent_id) else {
                continue;
            };
            let fencing = gantry_protocol::FencingToken {
                term: allocation.fencing_term,
                index: allocation.fencing_index,
            };
            if allocation.stop_requested {
                if !self.stopped.contains(&allocation.id) {
                    let stop = gantry_protocol::Stop {
                        allocation_id: allocation.id.clone(),
                        fencing,
                        grace_period_ms: STOP_GRACE.as_millis() as u64,
                    };
                    if session
                        .outbox
                        .try_send(CoordinatorMessage::Stop(stop))
                        .is_ok()
                    {
                        sent_stop.push(allocation.id.clone());
                    }
                }
            } else if !self.assigned.contains(&allocation.id) {
                let Some(job) = self.state().jobs.get(&allocation.job_id) else {
                    continue;
                };
                let Some(inputs) = self.input_files(job) else {
                    // Not copied to this member yet; the next pass tries again.
                    continue;
                };
                let assign = gantry_protocol::Assign {
                    allocation_id: allocation.id.clone(),
                    fencing,
                    job_id: allocation.job_id.clone(),
                    node: allocation.node.clone(),
                    spec_json: job.spec_json.clone(),
                    env: allocation.env.clone(),
                    gpus: allocation.gpus.clone(),
                    inputs,
                };
                if session
                    .outbox
                    .try_send(CoordinatorMessage::Assign(assign))
                    .is_ok()
                {
                    sent_assign.push(allocation.id.clone());
                }
            }
        }
        self.assigned.extend(sent_assign);
        self.stopped.extend(sent_stop);
        let allocations = &self.replica.machine().allocations;
        self.assigned
            .retain(|id| allocations.get(id).is_some_and(|a| !a.is_final()));
        self.stopped.retain(|id| {
            allocations
                .get(id)
                .is_some_and(|a| !a.is_final() || a.preempted)
        });
    }

    /// One scheduling pass: the pure scheduler's decisions, proposed as one Raft entry.
    fn schedule_pass(&mut self) {
        if !self.replica.is_leader() {
            return;
        }
        if let Some((_, since)) = self.place_in_flight {
            if since.elapsed() < REQUEST_TIMEOUT {
                return;
            }
            self.place_in_flight = None;
        }
        // Nothing can be placed without a ready node: skip building the queue, which costs time
        // in proportion to the jobs waiting (a storm of submissions before any agent is up).
        let any_ready = self
            .state()
            .agents
            .values()
            .any(|agent| agent.state == AgentState::Ready && !agent.register.nodes.is_empty());
        if !any_ready {
            return;
        }
        let queue = self.state().queue(unix_ms());
        if queue.is_empty() {
            return;
        }
        let view = self.state().cluster_view();
        let decisions = scheduler::schedule(&view, &queue, &scheduler::Policy::default());
        if decisions.placements.is_empty() && decisions.preemptions.is_empty() {
            return;
        }
        let op = scheduler::place_op(self.replica.term(), decisions);
        let request_id = self.request_id();
        let actor = format!("scheduler:{}", self.replica.id());
        let command = Command {
            request_id,
            at_unix_ms: unix_ms(),
            actor,
            op,
        };
        if self.replica.propose(replicated::encode(&command)).is_ok() {
            self.place_in_flight = Some((request_id, Instant::now()));
        }
    }

    /// What the scheduler says now of `job_id`'s units that it cannot place.
    fn explain(&self, job_id: &str) -> Vec<scheduler::Unplaced> {
        let queue = self.state().queue(unix_ms());
        let view = self.state().cluster_view();
        let decisions = scheduler::schedule(&view, &queue, &scheduler::Policy::default());
        decisions
            .unplaced
            .into_iter()
            .filter(|u| u.job_id == job_id)
            .collect()
    }

    fn handle_leadership(&mut self, leader: Option<u64>) {
        tracing::info!(leader = ?leader, term = self.replica.term(), "leadership changed");
        // Whatever this node proposed may never commit now; clients retry by idempotency key.
        for (_, pending) in std::mem::take(&mut self.pending) {
            let _ = pending.reply.send(Err(Unavailable::Timeout));
        }
        let not_leader = self.not_leader();
        self.fail_log_fetches(|_| true, |_| LogsRefusal::Unavailable(not_leader.clone()));
        if self.replica.is_leader() {
            // A new leader gives every known agent a full TTL before it can be declared down.
            self.liveness = LivenessTracker::new();
            let ttl_ms = self.config.agent_ttl.as_millis() as u64;
            let now_ms = self.now_ms();
            let agents: Vec<String> = self.state().agents.keys().cloned().collect();
            for agent_id in agents {
                self.liveness.handle_register(&agent_id, ttl_ms, now_ms);
            }
        } else {
            let leader_addr = self.leader_member().map(|m| m.quic_addr);
            for (_, session) in std::mem::take(&mut self.sessions) {
                if let Some(leader_addr) = &leader_addr {
                    let _ = session.outbox.try_send(CoordinatorMessage::Redirect {
                        leader_addr: leader_addr.clone(),
                    });
                }
            }
        }
    }

    async fn handle_ready(&mut self) -> Result<()> {
        let mut applied_any = false;
        while self.replica.has_ready() {
            let peers = &mut self.peers;
            let mut early_failed = Vec::new();
            let Some(mut started) = self
                .replica
                .start_ready(&mut |messages| early_failed.extend(peers.send(messages)))
            else {
                break;
            };
            // A leader's Ready, whose appends went out early, is written and fsynced on a
            // blocking thread while this one serves the network: the appends reach the wire,
            // followers write while the leader does, and requests arriving meanwhile queue up for
            // the next batch. Nothing touches the replica until the write is back. A follower's
            // small write (light load) happens here: it has nothing to send before the write is
            // durable, and the trip to another thread and back measured about 12% fewer
            // one-client commits; under load its large writes go to the blocking thread too, so
            // that it keeps reading the leader's next appends meanwhile.
            let write = if started.sent_early()
                || started.entries_to_write() > FOLLOWER_INLINE_ENTRIES_MAX
            {
                started.take_write()
            } else {
                None
            };
            if let Some(batch) = write {
                // Let the peer links put the appends on the wire first: the thread that writes
                // would otherwise take the CPU from them on a small machine.
                tokio::task::yield_now().await;
                let disk = self.replica.disk().clone();
                let (written, batch) =
                    tokio::task::spawn_blocking(move || (disk.write(&batch), batch))
                        .await
                        .context("the raft log writer stopped")?;
                written.map_err(storage_failed)?;
                self.replica.record_written(&batch);
            }
            let persisted = self
                .replica
                .write_ready(&mut started)
                .map_err(storage_failed)?;
            if !persisted.is_empty() {
                // A follower's acknowledgement goes out before it applies what committed: the
                // leader is waiting for it, and nobody waits for this node's state machine.
                early_failed.extend(self.peers.send(persisted));
                tokio::task::yield_now().await;
            }
            let output = self.replica.finish_ready(started).map_err(storage_failed)?;
            if let Some(leader) = output.leader_changed {
                self.handle_leadership(leader);
            }
            applied_any |= !output.applied.is_empty();
            // Answers first: their tasks then run before the peer links the messages below wake.
            for (_, request_id, outcome) in output.applied {
                if request_id.is_some() && request_id == self.place_in_flight.map(|(id, _)| id) {
                    self.place_in_flight = None;
                }
                if let Some(pending) = request_id.and_then(|id| self.pending.remove(&id)) {
                    let _ = pending.reply.send(Ok(outcome));
                }
            }
            for to in early_failed
                .into_iter()
                .chain(self.peers.send(output.messages))
            {
                self.replica.report_snapshot(to, false);
            }
            for (context, index) in output.reads {
                let Ok(bytes) = <[u8; 8]>::try_from(context.as_slice()) else {
                    continue;
                };
                if let Some(read) = self.reads.get_mut(&u64::from_be_bytes(bytes)) {
                    read.index = Some(index);
                }
            }
        }
        let applied = self.replica.applied();
        let answerable: Vec<u64> = self
            .reads
            .iter()
            .filter(|(_, r)| r.index.is_some_and(|i| i <= applied))
            .map(|(id, _)| *id)
            .collect();
        for id in answerable {
            let read = self.reads.remove(&id).expect("listed above");
            let _ = read.reply.send(Ok(self.answer(&read.query)));
        }
        if applied_any {
            self.publish_routes();
        }
        if self.replica.is_leader() && applied_any {
            self.schedule_pass();
        }
        if self.replica.is_leader() {
            self.dispatch();
        }
        if self.state().members != self.members_seen {
            self.members_seen = self.state().members.clone();
            self.peers.set_members(&self.members_seen);
        }
        Ok(())
    }

    /// Publishes the serving routes for the gateway when the applied state changed them.
    fn publish_routes(&self) {
        let routes = ServingRoutes::from_state(self.state());
        self.routes.send_if_modified(|current| {
            if **current == routes {
                return false;
            }
            *current = Arc::new(routes);
            true
        });
    }

    /// `agent-3f9c2b1d (gpu-07)`, or the id alone for an agent the state does not know.
    fn agent_label(&self, agent_id: &str) -> String {
        match self.state().agents.get(agent_id) {
            Some(record) => format!("{agent_id} ({})", record.register.name),
            None => agent_id.to_string(),
        }
    }

    fn log_targets(
        &self,
        job_id: &str,
        allocation_id: Option<&str>,
    ) -> Result<LogTargets, LogsRefusal> {
        if !self.replica.is_leader() {
            return Err(LogsRefusal::Unavailable(self.not_leader()));
        }
        let Some(job) = self.state().jobs.get(job_id) else {
            return Err(LogsRefusal::NoJob {
                job_id: job_id.to_string(),
            });
        };
        let mut targets: Vec<LogTarget> = self
            .state()
            .allocations
            .values()
            .filter(|a| a.job_id == job_id)
            .filter(|a| allocation_id.is_none_or(|id| id == a.id))
            .map(|a| LogTarget {
                allocation_id: a.id.clone(),
                unit: a.unit,
                attempt: a.attempt,
                agent_id: a.agent_id.clone(),
            })
            .collect();
        targets.sort_by(|a, b| {
            (a.unit, a.attempt, &a.allocation_id).cmp(&(b.unit, b.attempt, &b.allocation_id))
        });
        if let (Some(allocation_id), true) = (allocation_id, targets.is_empty()) {
            return Err(LogsRefusal::NoAllocation {
                job_id: job_id.to_string(),
                allocation_id: allocation_id.to_string(),
            });
        }
        Ok(LogTargets {
            targets,
            job_final: job.state.is_final(),
        })
    }

    /// Asks the allocation's agent for a slice of its output; never waits for the agent.
    fn handle_fetch_logs(
        &mut self,
        allocation_id: String,
        stream: LogStream,
        offset: u64,
        max_bytes: u32,
        reply: oneshot::Sender<Result<LogAnswer, LogsRefusal>>,
    ) {
        if !self.replica.is_leader() {
            let _ = reply.send(Err(LogsRefusal::Unavailable(self.not_leader())));
            return;
        }
        let Some(allocation) = self.state().allocations.get(&allocation_id) else {
            let _ = reply.send(Err(LogsRefusal::Failed(format!(
                "no allocation {allocation_id}"
            ))));
            return;
        };
        let agent_id = allocation.agent_id.clone();
        let label = self.agent_label(&agent_id);
        let refuse = |message: String| LogsRefusal::Agent {
            agent_id: agent_id.clone(),
            message,
        };
        let down = self
            .state()
            .agents
            .get(&agent_id)
            .is_none_or(|record| record.state == AgentState::Down);
        let connected = self.sessions.contains_key(&agent_id);
        let answer = if down {
            Err(refuse(format!(
                "agent {label} is down: the output of {allocation_id} stays on its disk and can be read once it is back"
            )))
        } else if !connected {
            Err(refuse(format!(
                "agent {label} is not connected to the leader right now; retry"
            )))
        } else if self.log_fetches.len() >= LOG_FETCHES_MAX
            || self
                .log_fetches
                .values()
                .filter(|f| f.agent_id == agent_id)
                .count()
                >= LOG_FETCHES_PER_AGENT_MAX
        {
            Err(refuse(format!(
                "too many log reads are waiting for agent {label}; retry"
            )))
        } else {
            Ok(())
        };
        if let Err(refusal) = answer {
            let _ = reply.send(Err(refusal));
            return;
        }
        let request_id = self.request_id();
        let fetch = FetchLogs {
            request_id,
            allocation_id: allocation_id.clone(),
            stream,
            offset,
            max_bytes,
        };
        let session = self.sessions.get(&agent_id).expect("checked above");
        if session
            .outbox
            .try_send(CoordinatorMessage::FetchLogs(fetch))
            .is_err()
        {
            let _ = reply.send(Err(refuse(format!(
                "agent {label}'s session is backed up; retry"
            ))));
            return;
        }
        self.log_fetches.insert(
            request_id,
            PendingFetch {
                agent_id,
                allocation_id,
                reply,
                deadline: Instant::now() + LOG_FETCH_TIMEOUT,
            },
        );
    }

    fn handle_logs_reply(&mut self, agent_id: &str, reply: LogsReply) {
        let Some(fetch) = self.log_fetches.remove(&reply.request_id) else {
            return;
        };
        if fetch.agent_id != agent_id {
            tracing::warn!(agent = %agent_id, request = reply.request_id, "ignoring a log reply to a request sent to another agent");
            self.log_fetches.insert(reply.request_id, fetch);
            return;
        }
        let allocation_final = self
            .state()
            .allocations
            .get(&fetch.allocation_id)
            .is_some_and(|a| a.is_final());
        let answer = match reply.result {
            Ok(slice) => Ok(LogAnswer {
                slice,
                allocation_final,
            }),
            Err(LogsError::NotFound(message)) => Err(LogsRefusal::NoLogs {
                message,
                allocation_final,
            }),
            Err(LogsError::Failed(message)) => Err(LogsRefusal::Failed(message)),
        };
        let _ = fetch.reply.send(answer);
    }

    /// Answers the log reads `which` selects with `refusal`.
    fn fail_log_fetches(
        &mut self,
        which: impl Fn(&PendingFetch) -> bool,
        refusal: impl Fn(&PendingFetch) -> LogsRefusal,
    ) {
        let ids: Vec<u64> = self
            .log_fetches
            .iter()
            .filter(|(_, fetch)| which(fetch))
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            let fetch = self.log_fetches.remove(&id).expect("listed above");
            let refusal = refusal(&fetch);
            let _ = fetch.reply.send(Err(refusal));
        }
    }

    fn cluster_view(&self) -> ClusterView {
        let voters = self.replica.voters();
        let members = self
            .state()
            .members
            .iter()
            .map(|(&id, member)| MemberView {
                id,
                addr: member.quic_addr.clone(),
                http_addr: member.http_addr.clone(),
                role: if voters.contains(&id) {
                    "voter".into()
                } else {
                    "learner".into()
                },
                applied_index: if id == self.replica.id() {
                    Some(self.replica.applied())
                } else {
                    self.peer_applied.get(&id).copied()
                },
            })
            .collect();
        ClusterView {
            node: self.replica.id(),
            leader: self.replica.leader_id(),
            term: self.replica.term(),
            commit_index: self.replica.commit(),
            members,
        }
    }

    fn agent_views(&self) -> Vec<AgentView> {
        let now_ms = self.now_ms();
        self.state()
            .agents
            .iter()
            .map(|(agent_id, record)| {
                let status = match record.state {
                    AgentState::Ready => "ready",
                    AgentState::Down => "down",
                };
                let silence_ms = if self.replica.is_leader() {
                    self.liveness.silence_ms(agent_id, now_ms)
                } else {
                    None
                };
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
                        status_since_unix_ms: record.since_unix_ms,
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

/// Aborts the task when dropped, so that a coordinator future dropped mid-run (a test's crash,
/// a runtime shutting down) leaves no task holding its sockets.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// How this node takes part: it starts a cluster, or joins one, or (restarting) has its data.
#[derive(Debug, Clone)]
pub enum Membership {
    /// The data dir already holds a replica, or `--init` just created a cluster.
    Existing,
    /// `--join TOKEN@SEED`: the data dir is empty and this node joins through the seed.
    Join { token: String, seed: String },
}

/// A failure of the Raft log's disk: the coordinator stops rather than go on without it.
fn storage_failed(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("raft storage failed: {e}")
}

/// Runs a coordinator until `shutdown` resolves.
pub async fn run(
    config: CoordinatorConfig,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    run_with(config, listeners, Membership::Existing, shutdown).await
}

pub async fn run_with(
    config: CoordinatorConfig,
    listeners: Listeners,
    membership: Membership,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let quic_addr = listeners.quic.local_addr().context("read QUIC address")?;
    let http_addr = listeners.http.local_addr().context("read HTTP address")?;
    let advertise_quic = config.advertise_quic.unwrap_or(quic_addr);
    let advertise_http = config.advertise_http.unwrap_or(http_addr);
    if advertise_quic.ip().is_unspecified() || advertise_http.ip().is_unspecified() {
        anyhow::bail!("listening on a wildcard address: pass --advertise-quic and --advertise-http with addresses the other coordinators can reach");
    }
    let joined_now = match &membership {
        Membership::Join { token, seed } if !data_dir::is_initialized(&config.data_dir) => {
            crate::join::join_cluster(
                &config.data_dir,
                token,
                seed,
                advertise_quic,
                advertise_http,
            )
            .await?;
            true
        }
        _ => false,
    };
    let files = data_dir::load(&config.data_dir)?;
    let node_id = files.node_id;
    let disk =
        RedbLog::open(&data_dir::raft_db_path(&config.data_dir)).context("open the raft log")?;
    let fresh = crate::replica::storage::Durable::load(&disk)
        .context("read the raft log")?
        .is_none();
    let self_member = Member {
        quic_addr: advertise_quic.to_string(),
        http_addr: advertise_http.to_string(),
    };
    let bootstrap = fresh && !joined_now;
    let mut initial = State::with_member(node_id, self_member);
    for (id, quic_addr, http_addr) in &files.join_members {
        initial.members.entry(*id).or_insert_with(|| Member {
            quic_addr: quic_addr.clone(),
            http_addr: http_addr.clone(),
        });
    }
    let logger = crate::replica::logging::logger(node_id);
    let mut replica_config = ReplicaConfig::new(node_id);
    replica_config.snapshot_every_entries = config.snapshot_every_entries.max(1);
    replica_config.snapshot_amortized = config.snapshot_amortized;
    let replica = Replica::open(
        replica_config,
        initial,
        disk,
        bootstrap.then_some(&[node_id][..]),
        &logger,
    )
    .map_err(|e| anyhow::anyhow!("open the raft replica: {e}"))?;

    let (events_tx, mut events_rx) = mpsc::channel(EVENT_QUEUE_LEN_MAX);
    let quic_context = Arc::new(quic::QuicContext::new(
        &files,
        events_tx.clone(),
        config.agent_cert_ttl,
    ));
    let endpoint = quic::endpoint(&files, listeners.quic)?;
    let quic_task = AbortOnDrop(tokio::spawn(quic::serve(endpoint.clone(), quic_context)));
    let artifacts = crate::artifacts::ArtifactStore::open(&config.data_dir)
        .context("open the artifact store")?;
    let (routes, routes_rx) =
        watch::channel(Arc::new(ServingRoutes::from_state(replica.machine())));
    let api_state = Arc::new(api::ApiState::new(
        &files,
        events_tx.clone(),
        artifacts.clone(),
        routes_rx,
    ));
    listeners
        .http
        .set_nonblocking(true)
        .context("make the HTTP listener non-blocking")?;
    // The standard library listens with a backlog of 128: hundreds of clients connecting at once
    // would see their SYNs dropped and retried a second later. Listening again raises it.
    socket2::SockRef::from(&listeners.http)
        .listen(HTTP_BACKLOG)
        .context("raise the HTTP listen backlog")?;
    let http_listener =
        tokio::net::TcpListener::from_std(listeners.http).context("adopt the HTTP listener")?;
    let (http_stop_tx, http_stop_rx) = oneshot::channel::<()>();
    let mut http_task = AbortOnDrop(tokio::spawn(async move {
        axum::serve(http_listener, api::router(api_state))
            .with_graceful_shutdown(async {
                let _ = http_stop_rx.await;
            })
            .await
    }));
    tracing::info!(
        node = node_id,
        quic = %quic_addr,
        http = %http_addr,
        ca_sha256 = %files.ca.sha256_hex(),
        bootstrap,
        "coordinator started"
    );

    let mut coordinator = Coordinator {
        peers: PeerTransport::new(node_id, files.credentials.clone(), events_tx.clone()),
        artifacts,
        admin_token: files.admin_token.clone(),
        config,
        started: Instant::now(),
        replica,
        liveness: LivenessTracker::new(),
        sessions: BTreeMap::new(),
        pending: BTreeMap::new(),
        reads: BTreeMap::new(),
        next_request_id: data_dir::new_node_id() << 12,
        peer_applied: BTreeMap::new(),
        members_seen: BTreeMap::new(),
        ticks: 0,
        place_in_flight: None,
        assigned: BTreeSet::new(),
        stopped: BTreeSet::new(),
        log_fetches: BTreeMap::new(),
        routes,
    };
    drop(events_tx);
    if bootstrap {
        // A cluster of one elects itself at once rather than after an election timeout.
        coordinator.replica.campaign().context("campaign")?;
    }
    coordinator.handle_ready().await?;
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    let outcome = loop {
        tokio::select! {
            _ = &mut shutdown => break Ok(()),
            _ = tick.tick() => {
                if let Err(e) = coordinator.handle_tick() {
                    break Err(e);
                }
            }
            event = events_rx.recv() => match event {
                Some(event) => {
                    coordinator.handle_event(event);
                    for _ in 0..EVENTS_PER_READY_MAX {
                        match events_rx.try_recv() {
                            Ok(event) => coordinator.handle_event(event),
                            Err(_) => break,
                        }
                    }
                }
                None => break Ok(()),
            },
        }
        if let Err(e) = coordinator.handle_ready().await {
            break Err(e);
        }
    };
    tracing::info!("coordinator shutting down");
    for (_, pending) in std::mem::take(&mut coordinator.pending) {
        let _ = pending.reply.send(Err(Unavailable::ShuttingDown));
    }
    endpoint.close(
        gantry_protocol::transport::close_code::SHUTDOWN.into(),
        b"coordinator shutting down",
    );
    let _ = http_stop_tx.send(());
    quic_task.0.abort();
    drop(coordinator);
    let _ = (&mut http_task.0).await;
    let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
    outcome
}
