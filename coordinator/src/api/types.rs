//! The HTTP API's JSON types. With the protocol crate, the only place a wire format is defined;
//! the CLI deserializes exactly these.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GpuView {
    pub index: u32,
    pub model: String,
    pub memory_bytes: u64,
    pub uuid: Option<String>,
    /// `nvml` or `declared`.
    pub source: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RuntimeView {
    pub kind: String,
    pub detail: String,
}

/// One schedulable node: a host agent's host, or one node of a Kubernetes agent's cluster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeView {
    /// The agent id for a host agent's only node, `AGENT/NODE` otherwise.
    pub id: String,
    pub agent: String,
    /// The agent's name (its hostname unless configured).
    pub name: String,
    pub node: String,
    pub site: String,
    /// `on-prem` or `cloud`.
    pub site_kind: String,
    /// `ready` or `down`.
    pub status: String,
    pub hostname: String,
    pub os: String,
    pub arch: String,
    pub cpu_cores: u32,
    pub memory_bytes: u64,
    pub disk_bytes: u64,
    pub disk_free_bytes: u64,
    pub gpus: Vec<GpuView>,
    pub runtimes: Vec<String>,
    pub runtime_details: Vec<RuntimeView>,
    pub labels: BTreeMap<String, String>,
    pub cost_per_gpu_hour: f64,
    pub cost_per_cpu_hour: f64,
    pub software_version: String,
    /// Milliseconds since the leader last heard from the agent; absent when a follower answers.
    pub last_heard_ms_ago: Option<u64>,
    /// When the agent became `ready` or `down` (the leader's clock, Unix milliseconds).
    pub status_since_unix_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentView {
    pub id: String,
    pub name: String,
    pub status: String,
    pub site: String,
    pub nodes: Vec<NodeView>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateTokenRequest {
    /// `agent` or `coordinator`.
    pub role: String,
    /// Lifetime in seconds; 3600 when absent.
    #[serde(default)]
    pub ttl_seconds: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CreateTokenResponse {
    pub token: String,
    pub role: String,
    pub expires_at_unix_s: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// Stable, machine-readable: `unauthorized`, `invalid_request`, `not_found`, ...
    pub code: String,
    pub message: String,
    /// The request field at fault, when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

/// A job as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobView {
    pub id: String,
    pub name: String,
    pub team: String,
    pub kind: String,
    /// `pending`, `running`, `succeeded`, `failed` or `cancelled`.
    pub state: String,
    /// The spec as accepted, with every default filled in.
    pub spec: serde_json::Value,
    pub submitted_by: String,
    pub submitted_at_unix_ms: u64,
    pub updated_at_unix_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// Units done out of the job's units (batch shards, training workers).
    pub progress: Progress,
    /// Times the training gang was placed again.
    pub restarts: u32,
    /// Bumped by each spec update (serving jobs roll over to it).
    pub generation: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
    /// Every allocation the job has had, oldest first per unit.
    pub allocations: Vec<AllocationView>,
    /// The spec's `inputs`, resolved to the artifacts they read when the job was accepted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inputs: Vec<InputView>,
    /// Outputs its succeeded units reported (`GET /v1/jobs/{id}/artifacts/{name}`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub artifacts: Vec<ArtifactView>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InputView {
    pub name: String,
    /// The job that produced it.
    pub job: String,
    pub sha256: String,
    pub size_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ArtifactView {
    pub name: String,
    pub sha256: String,
    pub size_bytes: u64,
}

/// Cluster-wide rules checked when a job is accepted (`GET`/`PUT /v1/policy`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyView {
    /// Refuse images named by a tag alone (`name:tag`): they must be pinned by digest
    /// (`name@sha256:...`) or be an image id (`sha256:...`).
    pub require_digest: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    pub succeeded: u32,
    pub total: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AllocationView {
    pub id: String,
    /// Rank, shard index or replica index.
    pub unit: u32,
    pub attempt: u32,
    /// The agent id, as `gantry nodes` shows it.
    pub agent: String,
    pub node: String,
    /// `pending`, `running`, `succeeded`, `failed` or `lost`.
    pub state: String,
    pub exit_code: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub gpus: Vec<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Retries of this unit so far (batch shards, serving replicas), or the gang's restarts.
    pub restarts: u32,
    pub stop_requested: bool,
    /// The job's spec generation this allocation runs.
    pub generation: u32,
    /// Containers: the image as the agent resolved it when the unit started (`name@sha256:…`,
    /// or the local image id `sha256:…` for an image without a repo digest).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// When the unit was first reported running, and when it reached its final state (the
    /// leader's clock, Unix milliseconds); absent until then, and `started` absent for a unit
    /// that ended without starting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at_unix_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_at_unix_ms: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExplainView {
    pub job: String,
    pub state: String,
    /// One entry per unit the scheduler cannot place now; empty when nothing is waiting.
    pub units: Vec<UnplacedView>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UnplacedView {
    pub unit: u32,
    pub reason: String,
    pub nodes_total: usize,
    /// Filter name to the number of nodes it removed, in the order the filters run.
    pub filtered: Vec<FilterCount>,
    pub candidates: Vec<CandidateView>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FilterCount {
    pub filter: String,
    pub nodes: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CandidateView {
    pub node: String,
    pub score: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetQuotaRequest {
    /// GPUs the team may hold at once; `null` removes the limit.
    pub gpus: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SubmitJobResponse {
    pub id: String,
    /// False when the Idempotency-Key named a job submitted before.
    pub created: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemberView {
    pub id: u64,
    /// The member's QUIC address (its `--listen`, or `--advertise-quic`).
    pub addr: String,
    pub http_addr: String,
    /// `voter` or `learner`.
    pub role: String,
    /// The last log index the member applied, as it last reported; absent if unknown.
    pub applied_index: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterView {
    /// The member that answered.
    pub node: u64,
    pub leader: Option<u64>,
    pub term: u64,
    pub commit_index: u64,
    pub members: Vec<MemberView>,
}

/// A serving job as the gateway sees it (`GET /v1/endpoints`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EndpointView {
    pub name: String,
    pub job: String,
    /// Where the gateway of any coordinator serves it: `/serve/{name}/`.
    pub path: String,
    /// False when a newer serving job of the same name takes the path.
    pub routed: bool,
    /// Replicas that have not ended.
    pub replicas: Vec<ReplicaView>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplicaView {
    pub allocation: String,
    pub unit: u32,
    pub agent: String,
    /// `host:port` the gateway sends requests to; absent while unknown.
    pub address: Option<String>,
    /// `pending`, `running` or `healthy`.
    pub state: String,
    /// Takes traffic from the gateway.
    pub healthy: bool,
}

/// Per step of a usage window (`GET /v1/usage`): what ran and what it cost.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UsageSeriesView {
    pub gpu_seconds: Vec<f64>,
    pub cpu_seconds: Vec<f64>,
    pub cost: Vec<f64>,
}

/// A site's usage per step, its idle cost per step, and its capacity now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SiteUsageView {
    #[serde(flatten)]
    pub used: UsageSeriesView,
    pub idle_cost: Vec<f64>,
    pub gpus: u32,
    pub cpus: f64,
    pub cost_per_hour: f64,
}

/// `GET /v1/usage`: `steps` steps of `step_ms` from `start_unix_ms`, per team and per site.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UsageView {
    pub start_unix_ms: u64,
    pub step_ms: u64,
    pub steps: u64,
    pub teams: BTreeMap<String, UsageSeriesView>,
    pub sites: BTreeMap<String, SiteUsageView>,
}

impl From<crate::core::usage::Series> for UsageSeriesView {
    fn from(series: crate::core::usage::Series) -> Self {
        Self {
            gpu_seconds: series.gpu_seconds,
            cpu_seconds: series.cpu_seconds,
            cost: series.cost,
        }
    }
}

impl From<crate::core::usage::Usage> for UsageView {
    fn from(usage: crate::core::usage::Usage) -> Self {
        Self {
            start_unix_ms: usage.start_unix_ms,
            step_ms: usage.step_ms,
            steps: usage.steps,
            teams: usage
                .teams
                .into_iter()
                .map(|(k, v)| (k, v.into()))
                .collect(),
            sites: usage
                .sites
                .into_iter()
                .map(|(name, site)| {
                    let view = SiteUsageView {
                        used: site.used.into(),
                        idle_cost: site.idle_cost,
                        gpus: site.gpus,
                        cpus: site.cpus,
                        cost_per_hour: site.cost_per_hour,
                    };
                    (name, view)
                })
                .collect(),
        }
    }
}
