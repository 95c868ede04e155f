//! The replicated state machine: members, agents, jobs, idempotency keys and the audit log.
//!
//! Pure and deterministic: `apply` takes a log index and a command and returns an outcome; time is
//! the leader's stamp on the command. Every replica applying the same log reaches the same state,
//! and the snapshot of that state is the same bytes.

use gantry_protocol::jobspec::JobSpec;
use gantry_protocol::replicated::{Command, MemberChange, Op};
use gantry_protocol::Register;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

/// Audit records kept in the state; older ones are dropped first.
pub const AUDIT_LEN_MAX: usize = 10_000;
/// Bumped whenever the snapshot encoding changes; an unknown version refuses to restore.
pub const SNAPSHOT_FORMAT_VERSION: u16 = 3;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub quic_addr: String,
    pub http_addr: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AgentState {
    Ready,
    Down,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentRecord {
    pub register: Register,
    pub state: AgentState,
    pub since_unix_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobState {
    Pending,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Pending => "pending",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    pub fn is_final(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    pub id: String,
    /// Canonical JSON of the validated spec, as submitted.
    pub spec_json: String,
    pub state: JobState,
    pub submitted_by: String,
    pub idempotency_key: Option<String>,
    pub submitted_at_unix_ms: u64,
    pub updated_at_unix_ms: u64,
    /// The log index of the submission: a total order of submissions.
    pub index: u64,
    /// Times a training gang was stopped and placed again after a worker failed or was lost.
    pub restarts: u32,
    /// Failed attempts per batch shard (or serving replica).
    pub retries: BTreeMap<u32, u32>,
    /// Units that finished successfully (batch shards, training workers).
    pub succeeded_units: BTreeSet<u32>,
    /// Attempts started per unit; the next allocation of a unit is `JOB-UNIT-ATTEMPT`.
    pub attempts: BTreeMap<u32, u32>,
    /// Why the job failed, when it did.
    pub failure: Option<String>,
    /// Bumped by each spec update; allocations of an older generation are rolled over.
    pub generation: u32,
    /// The spec's `inputs`, resolved to checksums when the job (or its last update) was accepted.
    pub inputs: Vec<crate::core::artifacts::ResolvedInput>,
    /// Outputs its succeeded units reported, by name.
    pub artifacts: BTreeMap<String, gantry_protocol::replicated::ArtifactMeta>,
    /// `spec_json` parsed, on first use: derived, never encoded.
    #[serde(skip)]
    pub(crate) parsed: ParsedSpec,
}

impl Job {
    /// The job's spec (`None` only for a spec that no longer decodes, which validation at
    /// submission rules out). Parsed once per job: scheduling passes and the serving routes
    /// read every live job's spec after each commit.
    pub fn spec(&self) -> Option<Arc<JobSpec>> {
        self.parsed
            .0
            .get_or_init(|| serde_json::from_str(&self.spec_json).ok().map(Arc::new))
            .clone()
    }

    pub(crate) fn set_spec_json(&mut self, spec_json: &str) {
        self.spec_json = spec_json.to_string();
        self.parsed = ParsedSpec::default();
    }
}

/// A cache of a job's parsed spec. Equal to any other: it is a function of `spec_json`, which
/// the comparison of jobs already covers.
#[derive(Clone, Default)]
pub struct ParsedSpec(std::sync::OnceLock<Option<Arc<JobSpec>>>);

impl ParsedSpec {
    /// The cache already holding `spec`, parsed from the job's `spec_json` by the caller.
    fn holding(spec: Option<Arc<JobSpec>>) -> Self {
        Self(std::sync::OnceLock::from(spec))
    }
}

impl PartialEq for ParsedSpec {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for ParsedSpec {}

impl std::fmt::Debug for ParsedSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ParsedSpec")
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct IdempotencyRecord {
    job_id: String,
    spec_json: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    pub index: u64,
    pub at_unix_ms: u64,
    pub actor: String,
    pub action: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    JobSubmitted {
        job_id: String,
        created: bool,
    },
    JobCancelled {
        job_id: String,
    },
    JobNotFound {
        job_id: String,
    },
    JobAlreadyFinal {
        job_id: String,
        state: JobState,
    },
    IdempotencyConflict {
        key: String,
        job_id: String,
    },
    Placed {
        placed: usize,
        rejected: usize,
    },
    JobUpdated {
        job_id: String,
        generation: u32,
    },
    UpdateRefused {
        job_id: String,
        reason: String,
    },
    QuotaSet,
    MemberAdded {
        node_id: u64,
    },
    MemberRemoved {
        node_id: u64,
    },
    AgentRecorded,
    UnknownAgent {
        agent_id: String,
    },
    /// The job breaks the cluster's policy or names inputs that do not exist.
    SubmitRefused {
        field: String,
        reason: String,
    },
    PolicySet,
    /// The entry did not decode: it is skipped on every replica alike.
    Invalid {
        reason: String,
    },
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct State {
    pub members: BTreeMap<u64, Member>,
    pub agents: BTreeMap<String, AgentRecord>,
    pub jobs: BTreeMap<String, Job>,
    pub allocations: BTreeMap<String, crate::core::allocations::Allocation>,
    /// Each job's allocation ids, in id order like `allocations`: derived from `allocations` (rebuilt when a
    /// snapshot is decoded, never encoded), so that a job's allocations are found without a scan
    /// of every allocation ever made.
    #[serde(skip)]
    pub(crate) allocations_by_job: BTreeMap<String, BTreeSet<String>>,
    /// The ids of serving jobs, ended ones included: derived like `allocations_by_job`, so that
    /// the serving routes, rebuilt after every commit, read only those jobs.
    #[serde(skip)]
    pub(crate) serving_jobs: BTreeSet<String>,
    /// The ids of jobs not yet ended, and of allocations not yet ended: derived likewise, so
    /// that a scheduling pass reads the live work only, however much has ended before.
    #[serde(skip)]
    pub(crate) live_jobs: BTreeSet<String>,
    #[serde(skip)]
    pub(crate) live_allocations: BTreeSet<String>,
    /// GPUs each team may hold at once.
    pub quotas: BTreeMap<String, u32>,
    pub policy: gantry_protocol::replicated::Policy,
    /// Each artifact checksum recorded, and the member whose store first held its bytes.
    pub(crate) artifact_holders: BTreeMap<String, u64>,
    idempotency: BTreeMap<String, IdempotencyRecord>,
    pub audit: VecDeque<AuditRecord>,
    /// The index of the last applied entry.
    pub applied_index: u64,
}

impl State {
    pub fn with_member(node_id: u64, member: Member) -> Self {
        let mut state = Self::default();
        state.members.insert(node_id, member);
        state
    }

    fn is_serving(spec: Option<&Arc<JobSpec>>) -> bool {
        spec.is_some_and(|spec| spec.kind == gantry_protocol::jobspec::JobKind::Serving)
    }

    fn audit(&mut self, index: u64, at_unix_ms: u64, actor: &str, action: String) {
        if self.audit.len() == AUDIT_LEN_MAX {
            self.audit.pop_front();
        }
        self.audit.push_back(AuditRecord {
            index,
            at_unix_ms,
            actor: actor.to_string(),
            action,
        });
    }

    /// Applies one committed command.
    pub fn apply(&mut self, index: u64, command: &Command) -> Outcome {
        assert!(
            index > self.applied_index,
            "entry {index} applied after {}",
            self.applied_index
        );
        self.applied_index = index;
        let at = command.at_unix_ms;
        let actor = command.actor.as_str();
        match &command.op {
            Op::SubmitJob {
                job_id,
                idempotency_key,
                spec_json,
            } => {
                if let Some(key) = idempotency_key {
                    if let Some(existing) = self.idempotency.get(key) {
                        return if &existing.spec_json == spec_json {
                            Outcome::JobSubmitted {
                                job_id: existing.job_id.clone(),
                                created: false,
                            }
                        } else {
                            Outcome::IdempotencyConflict {
                                key: key.clone(),
                                job_id: existing.job_id.clone(),
                            }
                        };
                    }
                }
                if self.jobs.contains_key(job_id) {
                    // A proposer reused an id; only the first submission stands.
                    return Outcome::JobSubmitted {
                        job_id: job_id.clone(),
                        created: false,
                    };
                }
                let spec = serde_json::from_str::<JobSpec>(spec_json)
                    .ok()
                    .map(Arc::new);
                let serving = Self::is_serving(spec.as_ref());
                let inputs = match &spec {
                    Some(spec) => match self.admit(spec) {
                        Ok(inputs) => inputs,
                        Err(refusal) => return refusal,
                    },
                    // Tests submit placeholder specs; a real one was validated by the API.
                    None => Vec::new(),
                };
                self.jobs.insert(
                    job_id.clone(),
                    Job {
                        id: job_id.clone(),
                        spec_json: spec_json.clone(),
                        state: JobState::Pending,
                        submitted_by: actor.to_string(),
                        idempotency_key: idempotency_key.clone(),
                        submitted_at_unix_ms: at,
                        updated_at_unix_ms: at,
                        index,
                        restarts: 0,
                        retries: BTreeMap::new(),
                        succeeded_units: BTreeSet::new(),
                        attempts: BTreeMap::new(),
                        failure: None,
                        generation: 0,
                        inputs,
                        artifacts: BTreeMap::new(),
                        parsed: ParsedSpec::holding(spec),
                    },
                );
                if serving {
                    self.serving_jobs.insert(job_id.clone());
                }
                self.live_jobs.insert(job_id.clone());
                if let Some(key) = idempotency_key {
                    self.idempotency.insert(
                        key.clone(),
                        IdempotencyRecord {
                            job_id: job_id.clone(),
                            spec_json: spec_json.clone(),
                        },
                    );
                }
                self.audit(index, at, actor, format!("submit job {job_id}"));
                Outcome::JobSubmitted {
                    job_id: job_id.clone(),
                    created: true,
                }
            }
            Op::CancelJob { job_id } => {
                let Some(job) = self.jobs.get_mut(job_id) else {
                    return Outcome::JobNotFound {
                        job_id: job_id.clone(),
                    };
                };
                if job.state.is_final() {
                    return Outcome::JobAlreadyFinal {
                        job_id: job_id.clone(),
                        state: job.state,
                    };
                }
                job.state = JobState::Cancelled;
                job.updated_at_unix_ms = at;
                self.live_jobs.remove(job_id);
                self.stop_job_allocations(job_id, at);
                self.audit(index, at, actor, format!("cancel job {job_id}"));
                Outcome::JobCancelled {
                    job_id: job_id.clone(),
                }
            }
            Op::AgentRegistered { agent_id, register } => {
                let nodes: Vec<String> = register.nodes.iter().map(|n| n.name.clone()).collect();
                self.nodes_gone(agent_id, &nodes, at);
                self.agents.insert(
                    agent_id.clone(),
                    AgentRecord {
                        register: register.clone(),
                        state: AgentState::Ready,
                        since_unix_ms: at,
                    },
                );
                self.audit(
                    index,
                    at,
                    actor,
                    format!("register agent {agent_id} ({})", register.name),
                );
                Outcome::AgentRecorded
            }
            Op::AgentDown { agent_id } | Op::AgentUp { agent_id } => {
                let up = matches!(command.op, Op::AgentUp { .. });
                let Some(agent) = self.agents.get_mut(agent_id) else {
                    return Outcome::UnknownAgent {
                        agent_id: agent_id.clone(),
                    };
                };
                agent.state = if up {
                    AgentState::Ready
                } else {
                    AgentState::Down
                };
                agent.since_unix_ms = at;
                let action = if up { "up" } else { "down" };
                self.audit(index, at, actor, format!("agent {agent_id} {action}"));
                if !up {
                    self.agent_lost(agent_id, at);
                }
                Outcome::AgentRecorded
            }
            Op::Place {
                term,
                placements,
                preemptions,
            } => {
                let (placed, rejected) =
                    self.apply_place(index, *term, at, placements, preemptions);
                if placed > 0 {
                    self.audit(
                        index,
                        at,
                        actor,
                        format!("placed {placed} unit(s), {rejected} no longer fit"),
                    );
                }
                Outcome::Placed { placed, rejected }
            }
            Op::AllocationUpdate {
                allocation_id,
                phase,
            } => {
                self.apply_allocation_update(allocation_id, phase, at);
                Outcome::AgentRecorded
            }
            Op::UpdateJob { job_id, spec_json } => {
                let outcome = self.apply_update(job_id, spec_json, at);
                if let Outcome::JobUpdated { generation, .. } = &outcome {
                    self.audit(
                        index,
                        at,
                        actor,
                        format!("update job {job_id} to generation {generation}"),
                    );
                }
                outcome
            }
            Op::SetQuota { team, gpus } => {
                match gpus {
                    Some(gpus) => self.quotas.insert(team.clone(), *gpus),
                    None => self.quotas.remove(team),
                };
                self.audit(
                    index,
                    at,
                    actor,
                    format!("quota of team {team}: {gpus:?} GPUs"),
                );
                Outcome::QuotaSet
            }
            Op::SetPolicy(policy) => {
                self.policy = policy.clone();
                self.audit(index, at, actor, format!("policy: {policy:?}"));
                Outcome::PolicySet
            }
            Op::RecordArtifacts {
                allocation_id,
                holder,
                files,
            } => {
                self.record_artifacts(allocation_id, *holder, files);
                Outcome::AgentRecorded
            }
            Op::RecordImage {
                allocation_id,
                image,
            } => {
                if let Some(allocation) = self.allocations.get_mut(allocation_id) {
                    allocation.image = Some(image.clone());
                }
                Outcome::AgentRecorded
            }
        }
    }

    /// Records a committed membership change.
    pub fn apply_member_change(
        &mut self,
        index: u64,
        added: bool,
        change: &MemberChange,
    ) -> Outcome {
        self.applied_index = self.applied_index.max(index);
        if added {
            self.members.insert(
                change.node_id,
                Member {
                    quic_addr: change.quic_addr.clone(),
                    http_addr: change.http_addr.clone(),
                },
            );
            Outcome::MemberAdded {
                node_id: change.node_id,
            }
        } else {
            self.members.remove(&change.node_id);
            Outcome::MemberRemoved {
                node_id: change.node_id,
            }
        }
    }

    /// Skips an entry that cannot be applied, identically everywhere.
    pub fn skip(&mut self, index: u64, reason: String) -> Outcome {
        self.applied_index = self.applied_index.max(index);
        Outcome::Invalid { reason }
    }

    pub fn encode_snapshot(&self) -> Vec<u8> {
        // Straight after the version: a large state is copied once, not twice.
        let version = SNAPSHOT_FORMAT_VERSION.to_be_bytes().to_vec();
        postcard::to_extend(self, version).expect("the state always encodes")
    }

    pub fn decode_snapshot(bytes: &[u8]) -> Result<Self, String> {
        let (version, body) = bytes
            .split_at_checked(2)
            .ok_or("snapshot is shorter than its version")?;
        let version = u16::from_be_bytes([version[0], version[1]]);
        if version != SNAPSHOT_FORMAT_VERSION {
            return Err(format!("snapshot format {version} is not {SNAPSHOT_FORMAT_VERSION}, the one this build reads"));
        }
        let mut state: Self =
            postcard::from_bytes(body).map_err(|e| format!("snapshot does not decode: {e}"))?;
        state.serving_jobs = state
            .jobs
            .iter()
            .filter(|(_, job)| Self::is_serving(job.spec().as_ref()))
            .map(|(job_id, _)| job_id.clone())
            .collect();
        state.live_jobs = state
            .jobs
            .values()
            .filter(|job| !job.state.is_final())
            .map(|job| job.id.clone())
            .collect();
        state.live_allocations = state
            .allocations
            .values()
            .filter(|allocation| !allocation.is_final())
            .map(|allocation| allocation.id.clone())
            .collect();
        for allocation in state.allocations.values() {
            state
                .allocations_by_job
                .entry(allocation.job_id.clone())
                .or_default()
                .insert(allocation.id.clone());
        }
        Ok(state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn submit(request_id: u64, job_id: &str, key: Option<&str>, spec: &str) -> Command {
        Command {
            request_id,
            at_unix_ms: 1_000 + request_id,
            actor: "admin".into(),
            op: Op::SubmitJob {
                job_id: job_id.into(),
                idempotency_key: key.map(Into::into),
                spec_json: spec.into(),
            },
        }
    }

    #[test]
    fn idempotency_keys_return_the_first_job_or_conflict() {
        let mut state = State::default();
        assert_eq!(
            state.apply(1, &submit(1, "j-1", Some("k"), "{a}")),
            Outcome::JobSubmitted {
                job_id: "j-1".into(),
                created: true
            }
        );
        assert_eq!(
            state.apply(2, &submit(2, "j-2", Some("k"), "{a}")),
            Outcome::JobSubmitted {
                job_id: "j-1".into(),
                created: false
            }
        );
        assert_eq!(
            state.apply(3, &submit(3, "j-3", Some("k"), "{b}")),
            Outcome::IdempotencyConflict {
                key: "k".into(),
                job_id: "j-1".into()
            }
        );
        assert_eq!(state.jobs.len(), 1);
    }

    #[test]
    fn cancel_moves_a_job_to_its_final_state_once() {
        let mut state = State::default();
        state.apply(1, &submit(1, "j-1", None, "{}"));
        let cancel = |request_id| Command {
            request_id,
            at_unix_ms: 5_000,
            actor: "admin".into(),
            op: Op::CancelJob {
                job_id: "j-1".into(),
            },
        };
        assert_eq!(
            state.apply(2, &cancel(2)),
            Outcome::JobCancelled {
                job_id: "j-1".into()
            }
        );
        assert_eq!(
            state.apply(3, &cancel(3)),
            Outcome::JobAlreadyFinal {
                job_id: "j-1".into(),
                state: JobState::Cancelled
            }
        );
        assert_eq!(
            state.jobs["j-1"].updated_at_unix_ms, 5_000,
            "time is the leader's stamp"
        );
        assert_eq!(state.audit.len(), 2);
    }

    #[test]
    fn snapshots_round_trip_and_refuse_other_versions() {
        let mut state = State::with_member(
            1,
            Member {
                quic_addr: "q".into(),
                http_addr: "h".into(),
            },
        );
        state.apply(1, &submit(1, "j-1", Some("k"), "{}"));
        let bytes = state.encode_snapshot();
        assert_eq!(State::decode_snapshot(&bytes).unwrap(), state);
        let mut other = bytes.clone();
        other[1] = 99;
        assert!(State::decode_snapshot(&other)
            .unwrap_err()
            .contains("format 99"));
    }

    #[test]
    fn the_audit_log_is_bounded() {
        let mut state = State::default();
        for i in 1..=(AUDIT_LEN_MAX as u64 + 5) {
            state.apply(i, &submit(i, &format!("j-{i}"), None, "{}"));
        }
        assert_eq!(state.audit.len(), AUDIT_LEN_MAX);
        assert_eq!(state.audit.front().unwrap().index, 6);
    }
}
