//! The messages of the agent session, the join exchange and coordinator-to-coordinator traffic.
//!
//! Agent session (ALPN [`crate::transport::ALPN_AGENT`]): the agent opens one bidirectional control
//! stream, sends a [`crate::Hello`] and then [`AgentMessage`]s; the coordinator answers with a
//! [`crate::HelloReply`] and then [`CoordinatorMessage`]s. Join (ALPN
//! [`crate::transport::ALPN_JOIN`]): one stream, Hello, then one [`JoinRequest`] and one
//! [`JoinResponse`].

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Where a unit of work can be run. The agent reports those it can use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RuntimeKind {
    Kubernetes,
    Docker,
    Process,
}

impl RuntimeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RuntimeKind::Kubernetes => "kubernetes",
            RuntimeKind::Docker => "docker",
            RuntimeKind::Process => "process",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SiteKind {
    OnPrem,
    Cloud,
}

/// Where a GPU's description came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GpuSource {
    /// Found through the NVIDIA driver at run time: NVML, or `nvidia-smi` where the binary
    /// cannot load NVML (the static build).
    Nvml,
    /// Declared in the agent's config file.
    Declared,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Gpu {
    /// Index on its node (what CUDA calls the device ordinal).
    pub index: u32,
    pub model: String,
    pub memory_bytes: u64,
    /// NVML's UUID ("GPU-…"); absent for declared GPUs.
    pub uuid: Option<String>,
    pub source: GpuSource,
}

/// The capacity of one node: a host for a host agent, a cluster node for a Kubernetes agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeCapacity {
    /// Unique within its agent ("local" for a host agent's only node).
    pub name: String,
    pub hostname: String,
    pub os: String,
    pub arch: String,
    /// Logical CPUs the agent may use (cgroup quota taken into account).
    pub cpu_cores: u32,
    pub memory_bytes: u64,
    /// Size of the file system holding the agent's data dir, and what is free on it.
    pub disk_bytes: u64,
    pub disk_free_bytes: u64,
    pub gpus: Vec<Gpu>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RuntimeReport {
    pub kind: RuntimeKind,
    /// Why it is available ("docker daemon 28.2.2 answered at unix:///var/run/docker.sock").
    pub detail: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Register {
    /// Human-facing name (the hostname unless configured).
    pub name: String,
    pub software_version: String,
    pub site: String,
    pub site_kind: SiteKind,
    pub cost_per_gpu_hour: f64,
    pub cost_per_cpu_hour: f64,
    pub labels: BTreeMap<String, String>,
    pub runtimes: Vec<RuntimeReport>,
    pub nodes: Vec<NodeCapacity>,
    /// Ports the coordinator may give serving replicas on this agent's hosts, inclusive.
    pub serving_ports: (u16, u16),
    /// Where others reach this agent's serving replicas (a host name or IP address, no port):
    /// the config's `advertise_address`, else the local address of the agent's connection to the
    /// coordinator. The serving gateway sends requests to `http://{address}:{port}`.
    pub address: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// Increases by one per heartbeat within a session.
    pub seq: u64,
}

/// Identifies one allocation (one worker, shard or replica placed on a node).
pub type AllocationId = String;

/// Orders assignments: a (Raft term, log index) pair. An agent ignores an assignment whose token
/// is older than the newest it has seen for the same allocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct FencingToken {
    pub term: u64,
    pub index: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AllocationPhase {
    Pending,
    Running,
    /// Running, and its health check passes (serving replicas): ready for traffic.
    Healthy,
    Succeeded,
    Failed {
        exit_code: Option<i32>,
        reason: String,
    },
    Lost {
        reason: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllocationStateReport {
    pub allocation_id: AllocationId,
    pub fencing: FencingToken,
    pub phase: AllocationPhase,
    /// Agent's wall-clock time of the transition, milliseconds since the Unix epoch.
    pub at_unix_ms: u64,
    /// The image the unit runs, resolved when it started: `name@sha256:...` from the registry
    /// digest, or the local image id (`sha256:...`) for an image that never came from a registry.
    /// Set on the first `Running` report of a container; `None` for processes.
    pub image: Option<String>,
    /// With `Succeeded`: the files of the job's declared `outputs` the unit wrote.
    pub artifacts: Vec<ArtifactFile>,
}

/// A small file carried with a report (an output) or an assignment (an input).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactFile {
    pub name: String,
    /// Lowercase hex SHA-256 of `data`; the receiver checks it.
    pub sha256: String,
    pub data: Vec<u8>,
}

/// One artifact file at most, and all the artifacts one unit reports or one assignment carries
/// together: far below the frame limit, since they travel in a report, a Raft entry or an
/// assignment. Larger outputs (model weights of real size) belong on a shared path or an object
/// store that the job names itself.
pub const ARTIFACT_BYTES_MAX: usize = 1024 * 1024;
pub const ARTIFACTS_BYTES_PER_UNIT_MAX: usize = 3 * 1024 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LogStream {
    Stdout,
    Stderr,
}

impl LogStream {
    pub fn as_str(self) -> &'static str {
        match self {
            LogStream::Stdout => "stdout",
            LogStream::Stderr => "stderr",
        }
    }
}

/// The most a [`LogSlice`] carries, well under the 4 MiB frame: the agent cuts larger requests
/// down to this, so a log reply never holds up the control stream for long.
pub const LOG_SLICE_BYTES_MAX: u32 = 1024 * 1024;

/// Asks an agent for part of an allocation's output, kept on its disk. Answered by one
/// [`AgentMessage::Logs`] with the same `request_id`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FetchLogs {
    pub request_id: u64,
    pub allocation_id: AllocationId,
    pub stream: LogStream,
    /// Byte offset within the stream, counted from the unit's first byte of output.
    pub offset: u64,
    /// At most this many bytes (the agent caps it at [`LOG_SLICE_BYTES_MAX`]).
    pub max_bytes: u32,
}

/// Part of an allocation's output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogSlice {
    /// Where `data` starts in the stream: the offset asked for, or, when the bytes there were
    /// already rotated away, the oldest byte still kept (then `offset` is larger than asked).
    pub offset: u64,
    pub data: Vec<u8>,
    /// The offset just after the last byte the stream holds so far.
    pub end_offset: u64,
    /// The unit was not running on the agent when it read, and `data` reaches `end_offset`:
    /// no more output will come.
    pub ended: bool,
}

/// Why an agent could not read an allocation's output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LogsError {
    /// The agent holds no output for the allocation (it never started here, or was cleaned up).
    NotFound(String),
    /// Reading failed, or the agent is busy with other reads.
    Failed(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogsReply {
    pub request_id: u64,
    pub result: Result<LogSlice, LogsError>,
}

/// Agent to coordinator, on the control stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum AgentMessage {
    Register(Register),
    Heartbeat(Heartbeat),
    AllocationState(AllocationStateReport),
    /// The answer to a [`CoordinatorMessage::FetchLogs`].
    Logs(LogsReply),
    /// Asks for a fresh certificate for the same identity and a new key.
    RenewCertificate {
        csr_der: Vec<u8>,
    },
    /// The agent's nodes changed (a Kubernetes agent: a node joined, left, or other pods took or
    /// freed capacity). Replaces the `nodes` of its registration.
    Nodes(Vec<NodeCapacity>),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    pub agent_id: String,
    pub heartbeat_interval_ms: u64,
    /// Silent for longer than this, the agent is declared down.
    pub ttl_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assign {
    pub allocation_id: AllocationId,
    pub fencing: FencingToken,
    pub job_id: String,
    pub node: String,
    /// The job's spec: the canonical JSON of a `jobspec::JobSpec`.
    pub spec_json: String,
    /// What Gantry adds to the job's env for this unit (RANK, SHARD_INDEX, PORT, ...).
    pub env: BTreeMap<String, String>,
    /// GPU indexes on the node given to this unit.
    pub gpus: Vec<u32>,
    /// The job's `inputs`, to be placed in the unit's input directory before it starts.
    pub inputs: Vec<ArtifactFile>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stop {
    pub allocation_id: AllocationId,
    pub fencing: FencingToken,
    pub grace_period_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    VersionMismatch,
    Unauthenticated,
    InvalidMessage,
    TokenInvalid,
    TokenExpired,
    TokenWrongRole,
    Internal,
    /// Not now (an election, a membership change in progress): the same request may succeed
    /// when retried.
    Unavailable,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireError {
    pub code: ErrorCode,
    pub message: String,
}

/// Coordinator to agent, on the control stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CoordinatorMessage {
    Welcome(Welcome),
    /// This coordinator is not the leader; connect to the one named.
    Redirect {
        leader_addr: String,
    },
    Assign(Assign),
    Stop(Stop),
    Certificate {
        cert_der: Vec<u8>,
    },
    /// Asks for part of an allocation's output; answered by an [`AgentMessage::Logs`].
    FetchLogs(FetchLogs),
    /// The coordinator is closing the session because of this.
    Error(WireError),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Agent,
    Coordinator,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Agent => "agent",
            Role::Coordinator => "coordinator",
        }
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "agent" => Ok(Role::Agent),
            "coordinator" => Ok(Role::Coordinator),
            other => Err(format!(
                "unknown role {other:?}: expected agent or coordinator"
            )),
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinRequest {
    /// The whole join token as printed by `gantry token create`.
    pub token: String,
    pub role: Role,
    /// The name the joining node would like to be shown as.
    pub name: String,
    /// A PKCS#10 request; only its public key is used, the coordinator chooses the identity.
    pub csr_der: Vec<u8>,
    /// Set when a coordinator joins: who it is and where the others reach it.
    pub coordinator: Option<CoordinatorJoin>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CoordinatorJoin {
    /// The Raft node id the joining coordinator chose (random, non-zero).
    pub node_id: u64,
    /// Its QUIC address (`--listen`, or `--advertise` when listening on a wildcard).
    pub quic_addr: String,
    /// Its HTTP API address, to which followers forward writes.
    pub http_addr: String,
}

/// What a joining coordinator receives: a certificate, and the cluster's secrets, so that it can
/// sign agent certificates and check join tokens as any member can.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CoordinatorGrant {
    pub identity: String,
    pub cert_der: Vec<u8>,
    pub ca_der: Vec<u8>,
    pub ca_key_pem: String,
    pub cluster_key: Vec<u8>,
    pub admin_token: String,
    /// The members as the admitting coordinator knew them, so the new one can answer them
    /// before the leader's snapshot tells it the rest.
    pub members: Vec<CoordinatorJoin>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum JoinResponse {
    Accepted {
        identity: String,
        cert_der: Vec<u8>,
        ca_der: Vec<u8>,
    },
    /// A coordinator was added to the cluster as a learner.
    AcceptedCoordinator(Box<CoordinatorGrant>),
    /// Only the leader admits coordinators; ask it (its QUIC address).
    Redirect {
        leader_addr: String,
    },
    Refused(WireError),
}

/// Coordinator-to-coordinator traffic (ALPN [`crate::transport::ALPN_PEER`]). The envelope carries
/// the sender and the addressee so that a message that reached the wrong node is dropped rather
/// than misapplied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerEnvelope {
    pub from_node: u64,
    pub to_node: u64,
    pub payload: PeerPayload,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeerPayload {
    /// Raft messages, each encoded by raft-rs (protobuf), in send order.
    Raft(Vec<Vec<u8>>),
    /// The sender's progress, sent every second, for `gantry cluster status`.
    Status { applied_index: u64 },
    /// One part of a single Raft message too large for one frame (a snapshot of a large state),
    /// encoded by raft-rs; its parts follow one another on the stream, the last one marked.
    RaftPart { bytes: Vec<u8>, last: bool },
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{decode_body, encode, FrameDecoder};
    use serde::de::DeserializeOwned;
    use std::fmt::Debug;

    fn round_trip<T: Serialize + DeserializeOwned + PartialEq + Debug>(message: T) {
        let frame = encode(&message).unwrap();
        let mut decoder = FrameDecoder::default();
        decoder.handle_bytes(&frame);
        let body = decoder.poll_frame().unwrap().expect("a whole frame");
        assert_eq!(decode_body::<T>(&body).unwrap(), message);
    }

    fn node() -> NodeCapacity {
        NodeCapacity {
            name: "local".into(),
            hostname: "gpu-07".into(),
            os: "Debian GNU/Linux 12".into(),
            arch: "x86_64".into(),
            cpu_cores: 64,
            memory_bytes: 512 << 30,
            disk_bytes: 2 << 40,
            disk_free_bytes: 1 << 40,
            gpus: vec![
                Gpu {
                    index: 0,
                    model: "NVIDIA H100 80GB HBM3".into(),
                    memory_bytes: 80 << 30,
                    uuid: Some("GPU-5c1e9f2a-0000-0000-0000-000000000000".into()),
                    source: GpuSource::Nvml,
                },
                Gpu {
                    index: 1,
                    model: "A100".into(),
                    memory_bytes: 40 << 30,
                    uuid: None,
                    source: GpuSource::Declared,
                },
            ],
        }
    }

    fn fencing() -> FencingToken {
        FencingToken {
            term: 3,
            index: 1042,
        }
    }

    #[test]
    fn every_agent_message_round_trips() {
        round_trip(AgentMessage::Register(Register {
            name: "gpu-07".into(),
            software_version: "0.1.0".into(),
            site: "onprem-a".into(),
            site_kind: SiteKind::OnPrem,
            cost_per_gpu_hour: 1.25,
            cost_per_cpu_hour: 0.02,
            labels: BTreeMap::from([("rack".into(), "r12".into())]),
            runtimes: vec![RuntimeReport {
                kind: RuntimeKind::Docker,
                detail: "ping ok".into(),
            }],
            nodes: vec![node()],
            serving_ports: (31_000, 32_999),
            address: Some("10.0.0.7".into()),
        }));
        round_trip(AgentMessage::Heartbeat(Heartbeat { seq: u64::MAX }));
        for phase in [
            AllocationPhase::Pending,
            AllocationPhase::Running,
            AllocationPhase::Healthy,
            AllocationPhase::Succeeded,
            AllocationPhase::Failed {
                exit_code: Some(137),
                reason: "OOM killed".into(),
            },
            AllocationPhase::Lost {
                reason: "agent restarted".into(),
            },
        ] {
            round_trip(AgentMessage::AllocationState(AllocationStateReport {
                allocation_id: "a-1".into(),
                fencing: fencing(),
                phase,
                at_unix_ms: 1_700_000_000_000,
                image: Some("registry.local/train@sha256:4f1c".into()),
                artifacts: vec![ArtifactFile {
                    name: "model.json".into(),
                    sha256: "00".repeat(32),
                    data: b"{}".to_vec(),
                }],
            }));
        }
        round_trip(AgentMessage::Nodes(vec![node(), node()]));
        round_trip(AgentMessage::Logs(LogsReply {
            request_id: 7,
            result: Ok(LogSlice {
                offset: 4096,
                data: b"epoch 1 loss 0.31\n".to_vec(),
                end_offset: 4114,
                ended: false,
            }),
        }));
        round_trip(AgentMessage::Logs(LogsReply {
            request_id: 8,
            result: Err(LogsError::NotFound("no logs for a-1".into())),
        }));
        round_trip(AgentMessage::RenewCertificate {
            csr_der: vec![0x30, 0x82, 1, 2],
        });
    }

    #[test]
    fn the_largest_log_slice_fits_in_a_frame() {
        let reply = AgentMessage::Logs(LogsReply {
            request_id: u64::MAX,
            result: Ok(LogSlice {
                offset: u64::MAX,
                data: vec![0xff; LOG_SLICE_BYTES_MAX as usize],
                end_offset: u64::MAX,
                ended: true,
            }),
        });
        let frame = encode(&reply).unwrap();
        assert!(frame.len() < crate::FRAME_BYTES_MAX / 2, "{}", frame.len());
    }

    #[test]
    fn every_coordinator_message_round_trips() {
        round_trip(CoordinatorMessage::Welcome(Welcome {
            agent_id: "agent-3f9c2b1d".into(),
            heartbeat_interval_ms: 3000,
            ttl_ms: 15000,
        }));
        round_trip(CoordinatorMessage::Redirect {
            leader_addr: "10.0.0.2:7443".into(),
        });
        round_trip(CoordinatorMessage::Assign(Assign {
            allocation_id: "a-1".into(),
            fencing: fencing(),
            job_id: "j-1".into(),
            node: "local".into(),
            spec_json: "{}".into(),
            env: BTreeMap::from([("RANK".into(), "0".into())]),
            gpus: vec![0, 3],
            inputs: vec![ArtifactFile {
                name: "model.json".into(),
                sha256: "11".repeat(32),
                data: vec![7; 64],
            }],
        }));
        round_trip(CoordinatorMessage::Stop(Stop {
            allocation_id: "a-1".into(),
            fencing: fencing(),
            grace_period_ms: 10_000,
        }));
        round_trip(CoordinatorMessage::Certificate {
            cert_der: vec![1, 2, 3],
        });
        round_trip(CoordinatorMessage::FetchLogs(FetchLogs {
            request_id: 7,
            allocation_id: "a-1".into(),
            stream: LogStream::Stdout,
            offset: 0,
            max_bytes: 256 * 1024,
        }));
        round_trip(CoordinatorMessage::Error(WireError {
            code: ErrorCode::InvalidMessage,
            message: "register expected first".into(),
        }));
    }

    #[test]
    fn join_and_peer_messages_round_trip() {
        round_trip(JoinRequest {
            token: "gantry1:abc".into(),
            role: Role::Agent,
            name: "gpu-07".into(),
            csr_der: vec![9; 300],
            coordinator: Some(CoordinatorJoin {
                node_id: 7,
                quic_addr: "127.0.0.1:7443".into(),
                http_addr: "127.0.0.1:7080".into(),
            }),
        });
        round_trip(JoinResponse::AcceptedCoordinator(Box::new(
            CoordinatorGrant {
                identity: "coordinator-7".into(),
                cert_der: vec![1],
                ca_der: vec![2],
                ca_key_pem: "-----BEGIN PRIVATE KEY-----".into(),
                cluster_key: vec![3; 32],
                admin_token: "t".into(),
                members: vec![CoordinatorJoin {
                    node_id: 1,
                    quic_addr: "a".into(),
                    http_addr: "b".into(),
                }],
            },
        )));
        round_trip(JoinResponse::Redirect {
            leader_addr: "127.0.0.1:7444".into(),
        });
        round_trip(PeerEnvelope {
            from_node: 1,
            to_node: 2,
            payload: PeerPayload::Status { applied_index: 9 },
        });
        round_trip(JoinResponse::Accepted {
            identity: "agent-1".into(),
            cert_der: vec![1],
            ca_der: vec![2],
        });
        for code in [
            ErrorCode::TokenInvalid,
            ErrorCode::TokenExpired,
            ErrorCode::TokenWrongRole,
        ] {
            round_trip(JoinResponse::Refused(WireError {
                code,
                message: "no".into(),
            }));
        }
        round_trip(crate::Hello::current("gantry-agent 0.1.0"));
        round_trip(crate::HelloReply::Accepted { version: 1 });
        round_trip(crate::HelloReply::Refused {
            message: "mismatch".into(),
        });
        round_trip(PeerEnvelope {
            from_node: 1,
            to_node: 2,
            payload: PeerPayload::Raft(vec![vec![8, 1], vec![]]),
        });
    }
}
