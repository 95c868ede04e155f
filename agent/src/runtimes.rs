//! Which runtimes this agent uses. `runtime = "auto"` (the default) takes Kubernetes when a cluster
//! answers (in-cluster service account or a kubeconfig), else Docker when its daemon answers;
//! `runtime = "kubernetes"` or `"docker"` insists on that one; `"process"` takes none. The process
//! runtime is added for jobs without an image when the config allows it. Probes are bounded in
//! time so a dead endpoint never stalls start-up; the choice and the reason are logged and
//! reported to the coordinators (`gantry nodes` shows them).

use crate::config::{AgentConfig, RuntimeChoice};
use gantry_protocol::{RuntimeKind, RuntimeReport};
use std::time::Duration;

const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// The runtimes an agent runs work through, each with the reason it was chosen.
#[derive(Debug, Clone, PartialEq)]
pub struct Selection {
    /// Runs jobs that name an image.
    pub container: Option<RuntimeReport>,
    /// Runs jobs that name only a command.
    pub process: Option<RuntimeReport>,
}

impl Selection {
    /// What the agent offers the scheduler.
    pub fn reports(&self) -> Vec<RuntimeReport> {
        self.container
            .iter()
            .chain(&self.process)
            .cloned()
            .collect()
    }
}

/// Probes what the config's `runtime` needs and chooses. Fails when the config names a runtime
/// that does not answer.
pub async fn select(config: &AgentConfig) -> Result<Selection, String> {
    let (kubernetes, docker) = match config.runtime {
        RuntimeChoice::Auto => {
            let kubernetes = probe_kubernetes().await;
            let docker = match kubernetes {
                Ok(_) => Err("not probed: Kubernetes answered first".to_string()),
                Err(_) => probe_docker().await,
            };
            (kubernetes, docker)
        }
        RuntimeChoice::Kubernetes => (probe_kubernetes().await, Err("not asked for".into())),
        RuntimeChoice::Docker => (Err("not asked for".into()), probe_docker().await),
        RuntimeChoice::Process => (Err("not asked for".into()), Err("not asked for".into())),
    };
    let selection = choose(config.runtime, config.allow_process, kubernetes, docker)?;
    match &selection.container {
        Some(report) => tracing::info!(runtime = report.kind.as_str(), "{}", report.detail),
        None => {
            tracing::warn!("no container runtime: jobs that name an image will not be placed here")
        }
    }
    match &selection.process {
        Some(report) => tracing::info!(runtime = "process", "{}", report.detail),
        None => tracing::info!(
            runtime = "process",
            "not used: allow_process is false in the agent config"
        ),
    }
    Ok(selection)
}

/// The choice, from the probes' outcomes (`Ok(what answered)` or `Err(why not)`).
pub fn choose(
    choice: RuntimeChoice,
    allow_process: bool,
    kubernetes: Result<String, String>,
    docker: Result<String, String>,
) -> Result<Selection, String> {
    let report = |kind, detail: String| RuntimeReport { kind, detail };
    let container = match choice {
        RuntimeChoice::Auto => match (kubernetes, docker) {
            (Ok(k), _) => Some(report(
                RuntimeKind::Kubernetes,
                format!("runtime = auto chose Kubernetes: {k}"),
            )),
            (Err(k), Ok(d)) => Some(report(
                RuntimeKind::Docker,
                format!("runtime = auto chose Docker: {d} (Kubernetes: {k})"),
            )),
            (Err(_), Err(_)) => None,
        },
        RuntimeChoice::Kubernetes => Some(report(
            RuntimeKind::Kubernetes,
            format!(
                "runtime = kubernetes: {}",
                kubernetes.map_err(|e| format!("runtime = kubernetes, but {e}"))?
            ),
        )),
        RuntimeChoice::Docker => Some(report(
            RuntimeKind::Docker,
            format!(
                "runtime = docker: {}",
                docker.map_err(|e| format!("runtime = docker, but {e}"))?
            ),
        )),
        RuntimeChoice::Process => None,
    };
    let process = if choice == RuntimeChoice::Process {
        Some("runtime = process".to_string())
    } else if allow_process {
        Some("allow_process = true, for jobs without an image".to_string())
    } else {
        None
    };
    Ok(Selection {
        container,
        process: process.map(|detail| report(RuntimeKind::Process, detail)),
    })
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
        let docker = crate::runtime::docker::connect().await?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(selection: &Selection) -> Vec<RuntimeKind> {
        selection.reports().iter().map(|r| r.kind).collect()
    }

    #[test]
    fn auto_prefers_kubernetes_then_docker_and_says_why() {
        let up = |what: &str| Ok(what.to_string());
        let down = |why: &str| Err(why.to_string());
        let both = choose(RuntimeChoice::Auto, false, up("k8s 1.31"), up("docker 27")).unwrap();
        assert_eq!(kinds(&both), [RuntimeKind::Kubernetes]);
        assert!(both.reports()[0].detail.contains("k8s 1.31"));

        let docker = choose(
            RuntimeChoice::Auto,
            true,
            down("no kubeconfig"),
            up("docker 27"),
        )
        .unwrap();
        assert_eq!(kinds(&docker), [RuntimeKind::Docker, RuntimeKind::Process]);
        let detail = &docker.reports()[0].detail;
        assert!(
            detail.contains("docker 27") && detail.contains("no kubeconfig"),
            "{detail}"
        );

        let none = choose(RuntimeChoice::Auto, false, down("a"), down("b")).unwrap();
        assert!(none.reports().is_empty());
    }

    #[test]
    fn a_named_runtime_must_answer() {
        let err = choose(
            RuntimeChoice::Docker,
            true,
            Ok("k".into()),
            Err("daemon did not answer".into()),
        )
        .unwrap_err();
        assert!(
            err.contains("runtime = docker") && err.contains("daemon did not answer"),
            "{err}"
        );
        let err = choose(
            RuntimeChoice::Kubernetes,
            false,
            Err("no cluster".into()),
            Ok("d".into()),
        )
        .unwrap_err();
        assert!(err.contains("runtime = kubernetes"), "{err}");
        let process = choose(
            RuntimeChoice::Process,
            false,
            Err("x".into()),
            Err("y".into()),
        )
        .unwrap();
        assert_eq!(kinds(&process), [RuntimeKind::Process]);
    }
}
