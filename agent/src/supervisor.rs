//! The supervisor: turns assignments and stops from the coordinator into runtime calls, and the
//! runtime's events into allocation state reports. It outlives sessions: what happens while the
//! agent is disconnected is reported once it is connected again.
//!
//! Fencing: each assignment carries (term, index); an assignment or stop older than the newest
//! seen for the same allocation is ignored. The token is stored beside the allocation's files so
//! that after a restart the agent can still report on it.

use crate::runtime::{Exit, GpuAssignment, Runtime, RuntimeEvent, UnitSpec};
use gantry_protocol::jobspec::JobSpec;
use gantry_protocol::{AllocationPhase, AllocationStateReport, Assign, FencingToken, Gpu, Stop};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;

const FENCING_FILE: &str = "fencing.json";

fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

pub struct Supervisor {
    runtime: Option<Arc<dyn Runtime>>,
    work_root: PathBuf,
    /// This node's GPUs, to give units their UUIDs.
    gpus: Vec<Gpu>,
    fencing: BTreeMap<String, FencingToken>,
    /// Serving replicas' health checks: the port and path, and the task once it runs.
    health: BTreeMap<String, (u16, String)>,
    health_tasks: BTreeMap<String, tokio::task::JoinHandle<()>>,
    /// Reports waiting for a session to carry them.
    reports: mpsc::UnboundedSender<AllocationStateReport>,
}

impl Supervisor {
    /// `runtime` is `None` when this agent may run nothing (no runtime allowed).
    pub fn new(
        runtime: Option<Arc<dyn Runtime>>,
        work_root: PathBuf,
        gpus: Vec<Gpu>,
        reports: mpsc::UnboundedSender<AllocationStateReport>,
    ) -> Self {
        Self {
            runtime,
            work_root,
            gpus,
            fencing: BTreeMap::new(),
            health: BTreeMap::new(),
            health_tasks: BTreeMap::new(),
            reports,
        }
    }

    fn report(&self, allocation_id: &str, phase: AllocationPhase) {
        let Some(&fencing) = self.fencing.get(allocation_id) else {
            return;
        };
        let report = AllocationStateReport {
            allocation_id: allocation_id.to_string(),
            fencing,
            phase,
            at_unix_ms: now_unix_ms(),
        };
        let _ = self.reports.send(report);
    }

    /// Allocations left from before a restart: the process runtime kept none of them running.
    pub fn report_previous(&mut self, previous: Vec<String>) {
        for allocation_id in previous {
            let path = self.work_root.join(&allocation_id).join(FENCING_FILE);
            let Some(fencing) = std::fs::read(&path)
                .ok()
                .and_then(|bytes| serde_json::from_slice::<(u64, u64)>(&bytes).ok())
            else {
                continue;
            };
            self.fencing.insert(
                allocation_id.clone(),
                FencingToken {
                    term: fencing.0,
                    index: fencing.1,
                },
            );
            let reason =
                "the agent restarted; the process runtime keeps no work across restarts".into();
            self.report(&allocation_id, AllocationPhase::Lost { reason });
        }
    }

    /// What is running now, reported again to a new session so the coordinator can reconcile.
    pub async fn report_running(&self) {
        if let Some(runtime) = &self.runtime {
            for allocation_id in runtime.running().await {
                self.report(&allocation_id, AllocationPhase::Running);
            }
        }
    }

    pub fn handle_assign(&mut self, assign: Assign) {
        if let Some(known) = self.fencing.get(&assign.allocation_id) {
            if *known > assign.fencing {
                tracing::warn!(allocation = %assign.allocation_id, "ignoring an assignment superseded by a newer one");
                return;
            }
        }
        self.fencing
            .insert(assign.allocation_id.clone(), assign.fencing);
        let Some(runtime) = self.runtime.clone() else {
            let reason = "this agent has no runtime allowed (set allow_process = true, or run Docker or Kubernetes)".into();
            self.report(
                &assign.allocation_id,
                AllocationPhase::Failed {
                    exit_code: None,
                    reason,
                },
            );
            return;
        };
        let spec: JobSpec = match serde_json::from_str(&assign.spec_json) {
            Ok(spec) => spec,
            Err(e) => {
                let reason = format!("the assignment's spec does not decode: {e}");
                self.report(
                    &assign.allocation_id,
                    AllocationPhase::Failed {
                        exit_code: None,
                        reason,
                    },
                );
                return;
            }
        };
        let mut env = spec.env.clone();
        env.extend(assign.env.clone());
        if let (Some(serving), Some(port)) = (
            &spec.serving,
            assign.env.get("PORT").and_then(|p| p.parse::<u16>().ok()),
        ) {
            self.health.insert(
                assign.allocation_id.clone(),
                (port, serving.health_path.clone()),
            );
        }
        let gpus = assign
            .gpus
            .iter()
            .map(|&index| GpuAssignment {
                index,
                uuid: self
                    .gpus
                    .iter()
                    .find(|g| g.index == index)
                    .and_then(|g| g.uuid.clone()),
            })
            .collect();
        let unit = UnitSpec {
            allocation_id: assign.allocation_id.clone(),
            job_id: assign.job_id.clone(),
            image: spec.image.clone(),
            command: spec.command.clone(),
            env,
            gpus,
            cpu_millis: u64::from(spec.resources.cpu_millis),
            memory_bytes: spec.resources.memory_bytes,
        };
        let fencing_path = self.work_root.join(&assign.allocation_id);
        let token = (assign.fencing.term, assign.fencing.index);
        let reports = self.reports.clone();
        let fencing = assign.fencing;
        tokio::spawn(async move {
            let allocation_id = unit.allocation_id.clone();
            if let Err(e) = runtime.start(unit).await {
                let report = AllocationStateReport {
                    allocation_id,
                    fencing,
                    phase: AllocationPhase::Failed {
                        exit_code: None,
                        reason: e.to_string(),
                    },
                    at_unix_ms: now_unix_ms(),
                };
                let _ = reports.send(report);
                return;
            }
            // Written after the runtime made the directory: survives a restart for reporting.
            let _ = std::fs::write(
                fencing_path.join(FENCING_FILE),
                serde_json::to_vec(&token).unwrap_or_default(),
            );
        });
    }

    pub fn handle_stop(&mut self, stop: Stop) {
        if let Some(known) = self.fencing.get(&stop.allocation_id) {
            if *known > stop.fencing {
                return;
            }
        }
        let Some(runtime) = self.runtime.clone() else {
            return;
        };
        let grace = Duration::from_millis(stop.grace_period_ms);
        tokio::spawn(async move { runtime.stop(&stop.allocation_id, grace).await });
    }

    pub fn handle_runtime_event(&mut self, event: RuntimeEvent) {
        match event {
            RuntimeEvent::Started { allocation_id } => {
                self.report(&allocation_id, AllocationPhase::Running);
                if let (Some((port, path)), Some(fencing), Some(runtime)) = (
                    self.health.get(&allocation_id).cloned(),
                    self.fencing.get(&allocation_id).copied(),
                    self.runtime.clone(),
                ) {
                    let check = HealthCheck {
                        allocation_id: allocation_id.clone(),
                        fencing,
                        port,
                        path,
                        reports: self.reports.clone(),
                        runtime,
                    };
                    self.health_tasks
                        .insert(allocation_id, tokio::spawn(check.run()));
                }
            }
            RuntimeEvent::Exited {
                allocation_id,
                exit,
            } => {
                if let Some(task) = self.health_tasks.remove(&allocation_id) {
                    task.abort();
                }
                self.health.remove(&allocation_id);
                let phase = match exit {
                    Exit::Code(0) => AllocationPhase::Succeeded,
                    Exit::Code(code) => AllocationPhase::Failed {
                        exit_code: Some(code),
                        reason: format!("exited with code {code}"),
                    },
                    Exit::Signal(signal) => AllocationPhase::Failed {
                        exit_code: None,
                        reason: format!("killed by signal {signal}"),
                    },
                    Exit::Stopped => AllocationPhase::Failed {
                        exit_code: None,
                        reason: "stopped by Gantry".into(),
                    },
                    Exit::Lost(reason) => AllocationPhase::Lost { reason },
                };
                self.report(&allocation_id, phase);
            }
        }
    }

    pub async fn shutdown(&self, grace: Duration) {
        if let Some(runtime) = &self.runtime {
            runtime.shutdown(grace).await;
        }
    }
}

/// How often a serving replica's health is checked, how long it has to become healthy, and how
/// many failed checks in a row make a healthy replica unhealthy enough to replace.
pub const HEALTH_INTERVAL: Duration = Duration::from_secs(1);
pub const HEALTH_STARTUP_TIMEOUT: Duration = Duration::from_secs(60);
pub const HEALTH_FAILURES_MAX: u32 = 3;

struct HealthCheck {
    allocation_id: String,
    fencing: FencingToken,
    port: u16,
    path: String,
    reports: mpsc::UnboundedSender<AllocationStateReport>,
    runtime: Arc<dyn Runtime>,
}

impl HealthCheck {
    fn report(&self, phase: AllocationPhase) {
        let report = AllocationStateReport {
            allocation_id: self.allocation_id.clone(),
            fencing: self.fencing,
            phase,
            at_unix_ms: now_unix_ms(),
        };
        let _ = self.reports.send(report);
    }

    /// Checks until the replica ends. Healthy and unhealthy are reported as they change; a
    /// replica that never becomes healthy, or stays unhealthy, is stopped and reported failed so
    /// that the coordinator replaces it.
    async fn run(self) {
        let started = std::time::Instant::now();
        let mut healthy = false;
        let mut failures = 0u32;
        loop {
            tokio::time::sleep(HEALTH_INTERVAL).await;
            match http_get_status(self.port, &self.path).await {
                Ok(status) if (200..300).contains(&status) => {
                    failures = 0;
                    if !healthy {
                        healthy = true;
                        self.report(AllocationPhase::Healthy);
                    }
                    continue;
                }
                Ok(status) => {
                    tracing::debug!(allocation = %self.allocation_id, status, "health check answered non-2xx")
                }
                Err(e) => {
                    tracing::debug!(allocation = %self.allocation_id, "health check failed: {e}")
                }
            }
            failures += 1;
            if healthy && failures == 1 {
                self.report(AllocationPhase::Running);
            }
            let reason = if healthy && failures >= HEALTH_FAILURES_MAX {
                Some(format!(
                    "health check of {} on port {} failed {failures} times in a row",
                    self.path, self.port
                ))
            } else if !healthy && started.elapsed() >= HEALTH_STARTUP_TIMEOUT {
                Some(format!(
                    "health check of {} on port {} never passed in {:?}",
                    self.path, self.port, HEALTH_STARTUP_TIMEOUT
                ))
            } else {
                None
            };
            if let Some(reason) = reason {
                tracing::warn!(allocation = %self.allocation_id, "{reason}; stopping the replica so it is replaced");
                self.report(AllocationPhase::Failed {
                    exit_code: None,
                    reason,
                });
                self.runtime
                    .stop(&self.allocation_id, Duration::from_secs(10))
                    .await;
                return;
            }
        }
    }
}

/// The status code of `GET path` on the replica's port on this host (HTTP/1.0, 2 s bound).
async fn http_get_status(port: u16, path: &str) -> std::io::Result<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        stream
            .write_all(
                format!(
                    "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nUser-Agent: gantry-health\r\n\r\n"
                )
                .as_bytes(),
            )
            .await?;
        let mut head = [0u8; 64];
        let n = stream.read(&mut head).await?;
        let line = std::str::from_utf8(&head[..n]).unwrap_or_default();
        line.split_whitespace()
            .nth(1)
            .and_then(|code| code.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("not an HTTP answer: {line:?}")))
    };
    tokio::time::timeout(Duration::from_secs(2), exchange)
        .await
        .map_err(|_| std::io::Error::other("timed out"))?
}
