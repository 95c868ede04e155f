//! The commands in the coordinators' Raft log. Every replica decodes the same bytes and applies
//! them the same way, so this encoding is as much a wire format as any message: it changes only
//! with [`crate::PROTOCOL_VERSION`].

use crate::messages::Register;
use serde::{Deserialize, Serialize};

/// One entry of the replicated log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Command {
    /// Chosen by the proposing node, unique per node; the node waiting on the answer matches it.
    pub request_id: u64,
    /// The leader's wall clock when it proposed: the only time the state machine ever sees.
    pub at_unix_ms: u64,
    /// Who asked (for the audit log): "admin", "agent:ID", "coordinator:ID".
    pub actor: String,
    pub op: Op,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Op {
    SubmitJob {
        /// Chosen by the proposer, so that apply stays deterministic.
        job_id: String,
        idempotency_key: Option<String>,
        /// The canonical JSON of a validated `JobSpec`.
        spec_json: String,
    },
    CancelJob {
        job_id: String,
    },
    /// An agent registered (or re-registered) with this capacity; it is `ready`.
    AgentRegistered {
        agent_id: String,
        register: Register,
    },
    /// The leader's liveness tracker saw the agent silent past its TTL.
    AgentDown {
        agent_id: String,
    },
    /// A down agent was heard from again.
    AgentUp {
        agent_id: String,
    },
    /// The scheduler's decisions of one pass. Each placement is checked again on apply against
    /// the state as it is then; what no longer fits is skipped and placed in a later pass.
    Place {
        /// The proposing leader's term: with the entry's index, the fencing token.
        term: u64,
        placements: Vec<PlacementEntry>,
        /// Allocations to stop so that higher-priority work fits; their units are requeued.
        preemptions: Vec<String>,
    },
    /// An agent reported an allocation's state.
    AllocationUpdate {
        allocation_id: String,
        phase: crate::AllocationPhase,
    },
    /// A new spec for a serving job: its replicas roll over to it within the job's surge and
    /// unavailability bounds.
    UpdateJob {
        job_id: String,
        spec_json: String,
    },
    /// A team's GPU quota; `None` removes the limit.
    SetQuota {
        team: String,
        gpus: Option<u32>,
    },
    /// The image a container allocation started from, resolved to a digest or image id by its
    /// agent: what makes the run reproducible.
    RecordImage {
        allocation_id: String,
        image: String,
    },
    /// Cluster-wide rules checked when a job is accepted.
    SetPolicy(Policy),
    /// Outputs a succeeded unit reported. The bytes are not in the log: the coordinator that
    /// received them stored them under their checksum (`holder`), and the others copy them from
    /// a member that has them.
    RecordArtifacts {
        allocation_id: String,
        holder: u64,
        files: Vec<ArtifactMeta>,
    },
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    /// Refuse jobs whose image is named by a tag alone: it must be pinned by digest
    /// (`name@sha256:...`) or be an image id (`sha256:...`).
    pub require_digest: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactMeta {
    pub name: String,
    pub sha256: String,
    pub size_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlacementEntry {
    pub job_id: String,
    pub unit: u32,
    pub agent_id: String,
    pub node: String,
    pub gpus: Vec<u32>,
    pub cpu_millis: u64,
    pub memory_bytes: u64,
}

/// The context of a membership change in the log: who the member is, and who asked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberChange {
    pub request_id: u64,
    pub node_id: u64,
    pub quic_addr: String,
    pub http_addr: String,
}

pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    postcard::to_stdvec(value).expect("replicated types always encode")
}

pub fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, postcard::Error> {
    postcard::from_bytes(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_round_trip() {
        for op in [
            Op::SubmitJob {
                job_id: "j-1".into(),
                idempotency_key: Some("k".into()),
                spec_json: "{}".into(),
            },
            Op::CancelJob {
                job_id: "j-1".into(),
            },
            Op::AgentDown {
                agent_id: "agent-1".into(),
            },
            Op::AgentUp {
                agent_id: "agent-1".into(),
            },
        ] {
            let command = Command {
                request_id: 9,
                at_unix_ms: 1,
                actor: "admin".into(),
                op,
            };
            assert_eq!(decode::<Command>(&encode(&command)).unwrap(), command);
        }
        let change = MemberChange {
            request_id: 1,
            node_id: 2,
            quic_addr: "a".into(),
            http_addr: "b".into(),
        };
        assert_eq!(decode::<MemberChange>(&encode(&change)).unwrap(), change);
    }
}
