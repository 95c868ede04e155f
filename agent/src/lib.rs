//! The agent: fingerprints the host, holds one QUIC session with the coordinators, and (with the
//! issues that bring them) runs the allocations it is assigned through a runtime.
//!
//! Architecture invariant: the agent decides nothing about placement. It reports what it has and
//! what it runs; the coordinator decides.

pub mod config;
pub mod credentials;
pub mod fingerprint;
pub mod retention;
pub mod runtime;
pub mod runtimes;
pub mod session;
pub mod supervisor;

use anyhow::{bail, Context, Result};
use config::AgentConfig;
use credentials::{now_unix_s, AgentCredentials};
use gantry_protocol::{NodeCapacity, Register, RuntimeKind, RuntimeReport};
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// `host:port` of each coordinator's QUIC listener; tried in turn.
    pub coordinators: Vec<String>,
    pub join_token: Option<String>,
    pub data_dir: PathBuf,
    pub config: AgentConfig,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
}

impl AgentOptions {
    pub fn new(coordinators: Vec<String>, data_dir: PathBuf, config: AgentConfig) -> Self {
        Self {
            coordinators,
            join_token: None,
            data_dir,
            config,
            backoff_initial: Duration::from_millis(200),
            backoff_max: Duration::from_secs(10),
        }
    }
}

/// The name the agent shows: configured, else the hostname.
pub fn agent_name(config: &AgentConfig) -> String {
    config
        .name
        .clone()
        .or_else(sysinfo::System::host_name)
        .unwrap_or_else(|| "agent".into())
}

/// Everything the agent would register with: used by `gantry agent fingerprint` too. A runtime
/// the config names that does not answer is left out (the agent itself refuses to start then).
pub async fn fingerprint(config: &AgentConfig, data_dir: &std::path::Path) -> Register {
    let runtimes = match runtimes::select(config).await {
        Ok(selection) => selection.reports(),
        Err(reason) => {
            tracing::warn!("{reason}");
            Vec::new()
        }
    };
    let cluster_nodes = if runtimes.iter().any(|r| r.kind == RuntimeKind::Kubernetes) {
        let listed = async {
            let client = runtime::kubernetes::infer_client().await?;
            runtime::kubernetes::list_capacities(&client, &config.kubernetes_namespace).await
        };
        match listed.await {
            Ok(nodes) => Some(nodes),
            Err(e) => {
                tracing::warn!("cannot list the cluster's nodes: {e}");
                None
            }
        }
    } else {
        None
    };
    register_message(config, data_dir, &runtimes, cluster_nodes)
}

/// What the agent registers with. `cluster_nodes`: a Kubernetes agent reports the cluster's
/// nodes instead of its own host.
fn register_message(
    config: &AgentConfig,
    data_dir: &std::path::Path,
    runtimes: &[RuntimeReport],
    cluster_nodes: Option<Vec<NodeCapacity>>,
) -> Register {
    Register {
        name: agent_name(config),
        software_version: env!("CARGO_PKG_VERSION").into(),
        site: config.site.clone(),
        site_kind: config.kind,
        cost_per_gpu_hour: config.cost_per_gpu_hour,
        cost_per_cpu_hour: config.cost_per_cpu_hour,
        labels: config.labels.clone(),
        runtimes: runtimes.to_vec(),
        nodes: cluster_nodes.unwrap_or_else(|| vec![fingerprint::local_node(config, data_dir)]),
        serving_ports: (config.serving_port_min, config.serving_port_max),
        // The session fills in its connection's local address when the config names none.
        address: config.advertise_address.clone(),
    }
}

async fn resolve_all(addresses: &[String]) -> Vec<SocketAddr> {
    let mut resolved = Vec::new();
    for address in addresses {
        match tokio::net::lookup_host(address).await {
            Ok(addrs) => resolved.extend(addrs.take(1)),
            Err(e) => tracing::warn!(%address, "cannot resolve coordinator address: {e}"),
        }
    }
    resolved
}

/// Loads the stored identity, or joins with the token to get one.
async fn credentials(options: &AgentOptions) -> Result<AgentCredentials> {
    let stored = AgentCredentials::load(&options.data_dir).map_err(anyhow::Error::msg)?;
    match (stored, &options.join_token) {
        (Some(stored), token) if stored.not_after_unix > now_unix_s() => {
            if token.is_some() {
                tracing::info!(agent = %stored.agent_id, "using the certificate stored in the data dir; the join token is not needed");
            }
            Ok(stored)
        }
        (stored, Some(token)) => {
            if let Some(expired) = stored {
                tracing::warn!(agent = %expired.agent_id, "stored certificate has expired; joining again with the token");
            }
            let addrs = resolve_all(&options.coordinators).await;
            if addrs.is_empty() {
                bail!("none of the coordinator addresses {:?} resolved", options.coordinators);
            }
            Ok(credentials::join(&addrs, token, &agent_name(&options.config), &options.data_dir).await?)
        }
        (Some(_), None) => bail!(
            "the certificate stored in {} has expired: restart with --join TOKEN (create one with `gantry token create --role agent`)",
            options.data_dir.display()
        ),
        (None, None) => bail!(
            "{} holds no agent certificate: start with --join TOKEN the first time (create one with `gantry token create --role agent`)",
            options.data_dir.display()
        ),
    }
}

/// Runs the agent until `shutdown` resolves. Errors are those a restart would not cure: a refused
/// join, a missing or expired identity.
pub async fn run(
    options: AgentOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    if options.coordinators.is_empty() {
        bail!("no coordinator address given: pass --coordinator HOST:PORT");
    }
    std::fs::create_dir_all(&options.data_dir)
        .with_context(|| format!("create data dir {}", options.data_dir.display()))?;
    let credentials = credentials(&options).await?;
    tracing::info!(agent = %credentials.agent_id, "agent identity loaded");
    let mut selection = runtimes::select(&options.config)
        .await
        .map_err(anyhow::Error::msg)?;
    let work_root = options.data_dir.join("allocations");
    std::fs::create_dir_all(&work_root)
        .with_context(|| format!("create {}", work_root.display()))?;
    let (events_tx, runtime_events) = tokio::sync::mpsc::unbounded_channel();
    let mut cluster_nodes = None;
    let container: Option<std::sync::Arc<dyn runtime::Runtime>> =
        match selection.container.as_ref().map(|report| report.kind) {
            Some(RuntimeKind::Kubernetes) => {
                if selection.process.take().is_some() {
                    // The nodes reported are the cluster's: a process placed on one would run
                    // on this host instead.
                    tracing::warn!(
                        "allow_process is ignored: this agent reports a Kubernetes cluster's nodes"
                    );
                }
                let client = runtime::kubernetes::infer_client()
                    .await
                    .context("connect to the Kubernetes cluster")?;
                let config = runtime::RuntimeConfig {
                    work_root: work_root.clone(),
                    log_bytes_max: LOG_BYTES_MAX,
                };
                let (kubernetes, nodes) = runtime::kubernetes::KubernetesRuntime::new(
                    client,
                    options.config.kubernetes_namespace.clone(),
                    config,
                    events_tx.clone(),
                )
                .await
                .context("start the Kubernetes runtime")?;
                cluster_nodes = Some(nodes);
                Some(std::sync::Arc::new(kubernetes))
            }
            Some(RuntimeKind::Docker) => {
                // It answered the probe a moment ago; a failure now is not one to retry.
                let docker = runtime::docker::connect()
                    .await
                    .map_err(anyhow::Error::msg)
                    .context("connect to the Docker daemon")?;
                let config = runtime::RuntimeConfig {
                    work_root: work_root.clone(),
                    log_bytes_max: LOG_BYTES_MAX,
                };
                Some(std::sync::Arc::new(runtime::docker::DockerRuntime::new(
                    docker,
                    config,
                    events_tx.clone(),
                )))
            }
            Some(RuntimeKind::Process) => None,
            None => None,
        };
    let runtimes: Vec<RuntimeReport> = selection.reports();
    let process: Option<std::sync::Arc<dyn runtime::Runtime>> =
        selection.process.is_some().then(|| {
            let config = runtime::RuntimeConfig {
                work_root: work_root.clone(),
                log_bytes_max: LOG_BYTES_MAX,
            };
            std::sync::Arc::new(runtime::process::ProcessRuntime::new(config, events_tx))
                as std::sync::Arc<dyn runtime::Runtime>
        });
    let runtimes_used = supervisor::Runtimes {
        container,
        process,
        allow_pull: options.config.allow_pull,
    };
    let (reports_tx, reports) = tokio::sync::mpsc::unbounded_channel();
    let gpus = fingerprint::local_node(&options.config, &options.data_dir).gpus;
    let mut supervisor =
        supervisor::Supervisor::new(runtimes_used, work_root.clone(), gpus, reports_tx);
    supervisor.recover().await;
    let retention = retention::Retention {
        max_age: Duration::from_secs(options.config.allocation_retention_hours * 3600),
        max_count: options.config.allocations_kept_max,
    };
    let sweep_root = work_root.clone();
    let sweeper = tokio::spawn(async move {
        let mut every = tokio::time::interval(RETENTION_SWEEP_INTERVAL);
        loop {
            every.tick().await;
            let root = sweep_root.clone();
            let _ = tokio::task::spawn_blocking(move || {
                retention::sweep(&root, retention, std::time::SystemTime::now())
            })
            .await;
        }
    });
    let work = session::Work {
        supervisor,
        runtime_events,
        reports,
        undelivered: Default::default(),
        nodes: cluster_nodes.clone(),
    };
    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = shutdown_tx.send(true);
    });
    let config = options.config.clone();
    let data_dir = options.data_dir.clone();
    let mut session = session::Session::new(
        session::SessionConfig {
            coordinators: options.coordinators.clone(),
            data_dir: options.data_dir.clone(),
            backoff_initial: options.backoff_initial,
            backoff_max: options.backoff_max,
        },
        credentials,
        Box::new(move || {
            let nodes = cluster_nodes.as_ref().map(|nodes| nodes.borrow().clone());
            register_message(&config, &data_dir, &runtimes, nodes)
        }),
        work,
    );
    let outcome = session.run(shutdown_rx).await;
    sweeper.abort();
    session.shutdown_work(STOP_GRACE_ON_EXIT).await;
    outcome
}

/// How often finished allocations past their retention are removed.
const RETENTION_SWEEP_INTERVAL: Duration = Duration::from_secs(600);

/// Output kept per allocation and stream.
pub const LOG_BYTES_MAX: u64 = 16 * 1024 * 1024;
/// When the agent exits, its units get this long to stop before they are killed.
pub const STOP_GRACE_ON_EXIT: Duration = Duration::from_secs(10);
