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
    /// Milliseconds since the coordinator last heard from the agent.
    pub last_heard_ms_ago: u64,
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
