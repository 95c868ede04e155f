//! The agent's config file (TOML). Every field is optional; the defaults describe an on-prem host
//! that reports what it finds and runs only containers.
//!
//! ```toml
//! coordinators = ["10.0.0.1:7443", "10.0.0.2:7443"]   # or --coordinator
//! data_dir = "/var/lib/gantry/agent"                  # or --data-dir
//! name = "gpu-07"              # shown in `gantry nodes`; the hostname by default
//! site = "onprem-a"
//! kind = "on-prem"             # or "cloud"
//! cost_per_gpu_hour = 1.20     # amortised for on-prem, so cost reports never show it as free
//! cost_per_cpu_hour = 0.02
//! allow_process = false        # run plain processes (like Nomad's raw_exec); off by default
//! runtime = "auto"             # for images: kubernetes, else docker (whichever answers first)
//! allow_pull = false           # pull missing images; off by default (offline first)
//! kubernetes_namespace = "gantry"
//! allocation_retention_hours = 24  # finished allocations' logs and outputs are kept this long
//! allocations_kept_max = 1000      # and at most this many
//! advertise_address = "10.0.0.7"   # where the serving gateway reaches replicas on this host;
//!                                  # the local address of the coordinator connection by default
//!
//! [labels]
//! rack = "r12"
//!
//! [[gpus]]                     # for hosts where NVML is absent, like Slurm's gres.conf
//! model = "A100"
//! memory = "80GiB"
//! count = 4
//! ```

use gantry_protocol::units::parse_bytes;
use gantry_protocol::SiteKind;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::Path;

/// A declared GPU group may not claim more devices than this (a sanity bound on typos).
pub const DECLARED_GPUS_PER_GROUP_MAX: u32 = 64;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Coordinator QUIC addresses (`host:port`); `--coordinator` overrides.
    #[serde(default)]
    pub coordinators: Vec<String>,
    /// Where the agent keeps its identity; `--data-dir` overrides.
    pub data_dir: Option<std::path::PathBuf>,
    pub name: Option<String>,
    #[serde(default = "default_site")]
    pub site: String,
    #[serde(default = "default_kind")]
    pub kind: SiteKind,
    #[serde(default)]
    pub cost_per_gpu_hour: f64,
    #[serde(default)]
    pub cost_per_cpu_hour: f64,
    #[serde(default)]
    pub allow_process: bool,
    /// Which container runtime runs jobs that name an image.
    #[serde(default)]
    pub runtime: RuntimeChoice,
    /// Every job may pull its image when it is not on the node. Off by default: an air-gapped
    /// site loads images with `gantry images load`, and a job may still ask with `pull: true`.
    #[serde(default)]
    pub allow_pull: bool,
    /// Finished allocations' directories (logs, outputs) are kept this many hours...
    #[serde(default = "default_retention_hours")]
    pub allocation_retention_hours: u64,
    /// ...and at most this many of them, the newest.
    #[serde(default = "default_kept_max")]
    pub allocations_kept_max: usize,
    /// Where the Kubernetes runtime creates its objects.
    #[serde(default = "default_namespace")]
    pub kubernetes_namespace: String,
    /// Ports serving replicas may be given on this host, inclusive (like Nomad's dynamic ports).
    #[serde(default = "default_serving_port_min")]
    pub serving_port_min: u16,
    #[serde(default = "default_serving_port_max")]
    pub serving_port_max: u16,
    /// The host name or IP address the coordinators' serving gateway uses to reach this host's
    /// serving replicas; when unset, the local address of the agent's connection to the
    /// coordinator (right unless NAT or a proxy sits between them).
    pub advertise_address: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub gpus: Vec<DeclaredGpus>,
}

/// The agent config's `runtime`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RuntimeChoice {
    /// Kubernetes when the agent runs in a cluster or has a kubeconfig that answers, else Docker
    /// when its daemon answers, else no container runtime (the process runtime still runs jobs
    /// without an image when `allow_process` is set).
    #[default]
    Auto,
    Kubernetes,
    Docker,
    /// No container runtime: only plain processes (implies `allow_process`).
    Process,
}

impl RuntimeChoice {
    pub fn as_str(self) -> &'static str {
        match self {
            RuntimeChoice::Auto => "auto",
            RuntimeChoice::Kubernetes => "kubernetes",
            RuntimeChoice::Docker => "docker",
            RuntimeChoice::Process => "process",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeclaredGpus {
    pub model: String,
    /// Such as "80GiB".
    pub memory: String,
    #[serde(default = "one")]
    pub count: u32,
}

fn default_serving_port_min() -> u16 {
    31_000
}

fn default_serving_port_max() -> u16 {
    32_999
}

fn default_retention_hours() -> u64 {
    24
}

fn default_kept_max() -> usize {
    1000
}

fn default_namespace() -> String {
    "gantry".into()
}

fn default_site() -> String {
    "default".into()
}

fn default_kind() -> SiteKind {
    SiteKind::OnPrem
}

fn one() -> u32 {
    1
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            coordinators: Vec::new(),
            data_dir: None,
            name: None,
            site: default_site(),
            kind: default_kind(),
            cost_per_gpu_hour: 0.0,
            cost_per_cpu_hour: 0.0,
            allow_process: false,
            runtime: RuntimeChoice::Auto,
            allow_pull: false,
            kubernetes_namespace: default_namespace(),
            allocation_retention_hours: default_retention_hours(),
            allocations_kept_max: default_kept_max(),
            serving_port_min: default_serving_port_min(),
            serving_port_max: default_serving_port_max(),
            advertise_address: None,
            labels: BTreeMap::new(),
            gpus: Vec::new(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("read agent config {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("agent config {path}: {message}")]
    Parse { path: String, message: String },
    #[error("agent config {path}: field `{field}`: {reason}")]
    Invalid {
        path: String,
        field: String,
        reason: String,
    },
}

impl AgentConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses and validates; `origin` names the file in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let config: AgentConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_string(),
            message: e.to_string().trim_end().to_string(),
        })?;
        config.validate(origin)?;
        Ok(config)
    }

    fn validate(&self, origin: &str) -> Result<(), ConfigError> {
        let invalid = |field: String, reason: String| ConfigError::Invalid {
            path: origin.to_string(),
            field,
            reason,
        };
        if self.site.trim().is_empty() {
            return Err(invalid("site".into(), "must not be empty".into()));
        }
        if let Some(name) = &self.name {
            if name.trim().is_empty() {
                return Err(invalid(
                    "name".into(),
                    "must not be empty when given".into(),
                ));
            }
        }
        for (field, cost) in [
            ("cost_per_gpu_hour", self.cost_per_gpu_hour),
            ("cost_per_cpu_hour", self.cost_per_cpu_hour),
        ] {
            if !cost.is_finite() || cost < 0.0 {
                return Err(invalid(
                    field.into(),
                    format!("must be a non-negative number, got {cost}"),
                ));
            }
        }
        if !is_dns_label(&self.kubernetes_namespace) {
            return Err(invalid(
                "kubernetes_namespace".into(),
                format!(
                    "must be a DNS label (lowercase letters, digits and '-', at most 63), got {:?}",
                    self.kubernetes_namespace
                ),
            ));
        }
        if self.serving_port_min == 0 || self.serving_port_min > self.serving_port_max {
            return Err(invalid(
                "serving_port_min".into(),
                format!(
                    "must be at least 1 and at most serving_port_max ({}), got {}",
                    self.serving_port_max, self.serving_port_min
                ),
            ));
        }
        if let Some(address) = &self.advertise_address {
            if !is_host(address) {
                return Err(invalid(
                    "advertise_address".into(),
                    format!("must be a host name or an IP address without a port, got {address:?}"),
                ));
            }
        }
        for (i, group) in self.gpus.iter().enumerate() {
            if group.model.trim().is_empty() {
                return Err(invalid(
                    format!("gpus[{i}].model"),
                    "must not be empty".into(),
                ));
            }
            parse_bytes(&group.memory)
                .map_err(|reason| invalid(format!("gpus[{i}].memory"), reason))?;
            if group.count == 0 || group.count > DECLARED_GPUS_PER_GROUP_MAX {
                return Err(invalid(
                    format!("gpus[{i}].count"),
                    format!(
                        "must be between 1 and {DECLARED_GPUS_PER_GROUP_MAX}, got {}",
                        group.count
                    ),
                ));
            }
        }
        Ok(())
    }
}

fn is_dns_label(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

/// A host name (letters, digits, '-' and '.', at most 253) or an IP address, with no port.
pub fn is_host(value: &str) -> bool {
    if value.parse::<std::net::IpAddr>().is_ok() {
        return true;
    }
    !value.is_empty()
        && value.len() <= 253
        && value.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_config_parses() {
        let config = AgentConfig::parse(
            r#"
            name = "gpu-07"
            site = "onprem-a"
            kind = "on-prem"
            cost_per_gpu_hour = 1.2
            cost_per_cpu_hour = 0.02
            allow_process = true
            [labels]
            rack = "r12"
            [[gpus]]
            model = "A100"
            memory = "80GiB"
            count = 4
            "#,
            "agent.toml",
        )
        .unwrap();
        assert_eq!(config.site, "onprem-a");
        assert_eq!(config.kind, SiteKind::OnPrem);
        assert!(config.allow_process);
        assert_eq!(config.gpus[0].count, 4);
        assert_eq!(config.labels["rack"], "r12");
        for address in ["gpu-07.lab", "10.0.0.7", "fd00::7"] {
            let text = format!("advertise_address = {address:?}");
            let config = AgentConfig::parse(&text, "agent.toml").unwrap();
            assert_eq!(config.advertise_address.as_deref(), Some(address));
        }
    }

    #[test]
    fn an_empty_file_gives_the_defaults() {
        let config = AgentConfig::parse("", "agent.toml").unwrap();
        assert_eq!(config, AgentConfig::default());
        assert!(!config.allow_process, "the process runtime is opt-in");
    }

    #[test]
    fn errors_name_the_field_and_the_reason() {
        for (text, needle) in [
            ("kind = \"edge\"", "unknown variant `edge`"),
            ("sit = \"x\"", "unknown field `sit`"),
            ("runtime = \"podman\"", "unknown variant `podman`"),
            ("kubernetes_namespace = \"Prod\"", "`kubernetes_namespace`"),
            ("cost_per_gpu_hour = -1.0", "`cost_per_gpu_hour`"),
            (
                "[[gpus]]\nmodel = \"A100\"\nmemory = \"80 parsecs\"",
                "`gpus[0].memory`",
            ),
            (
                "[[gpus]]\nmodel = \"A100\"\nmemory = \"80GiB\"\ncount = 0",
                "`gpus[0].count`",
            ),
            (
                "advertise_address = \"10.0.0.7:8080\"",
                "`advertise_address`",
            ),
            (
                "advertise_address = \"http://gpu-07\"",
                "`advertise_address`",
            ),
        ] {
            let err = AgentConfig::parse(text, "agent.toml")
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "{text:?} gave {err}");
        }
    }
}
