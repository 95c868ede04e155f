//! Which runtimes this agent can use: Kubernetes when a cluster answers (in-cluster service
//! account or a kubeconfig), Docker when its daemon answers, the plain process runtime only when
//! the config allows it. Detection is bounded in time so a dead endpoint never stalls start-up.

use gantry_protocol::{RuntimeKind, RuntimeReport};
use std::time::Duration;

const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

pub async fn detect(allow_process: bool) -> Vec<RuntimeReport> {
    let (kubernetes, docker) = tokio::join!(probe_kubernetes(), probe_docker());
    let mut found = Vec::new();
    for (kind, outcome) in [
        (RuntimeKind::Kubernetes, kubernetes),
        (RuntimeKind::Docker, docker),
    ] {
        match outcome {
            Ok(detail) => {
                tracing::info!(runtime = kind.as_str(), "{detail}");
                found.push(RuntimeReport { kind, detail });
            }
            Err(reason) => tracing::info!(runtime = kind.as_str(), "not available: {reason}"),
        }
    }
    if allow_process {
        found.push(RuntimeReport {
            kind: RuntimeKind::Process,
            detail: "allowed by the agent config (allow_process = true)".into(),
        });
    } else {
        tracing::info!(
            runtime = "process",
            "not available: allow_process is false in the agent config"
        );
    }
    found
}

async fn probe_kubernetes() -> Result<String, String> {
    let probe = async {
        let config = kube::Config::infer()
            .await
            .map_err(|e| format!("no cluster configured: {e}"))?;
        let url = config.cluster_url.to_string();
        let client =
            kube::Client::try_from(config).map_err(|e| format!("client for {url}: {e}"))?;
        let version = client
            .apiserver_version()
            .await
            .map_err(|e| format!("{url} did not answer: {e}"))?;
        Ok(format!(
            "Kubernetes {} answered at {url}",
            version.git_version
        ))
    };
    tokio::time::timeout(PROBE_TIMEOUT, probe)
        .await
        .unwrap_or_else(|_| Err("the API server did not answer in time".into()))
}

async fn probe_docker() -> Result<String, String> {
    let probe = async {
        let docker = bollard::Docker::connect_with_local_defaults()
            .map_err(|e| format!("no Docker client: {e}"))?;
        let version = docker
            .version()
            .await
            .map_err(|e| format!("daemon did not answer: {e}"))?;
        Ok(format!(
            "Docker daemon {} (API {}) answered",
            version.version.unwrap_or_default(),
            version.api_version.unwrap_or_default()
        ))
    };
    tokio::time::timeout(PROBE_TIMEOUT, probe)
        .await
        .unwrap_or_else(|_| Err("the daemon did not answer in time".into()))
}
