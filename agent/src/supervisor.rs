//! The supervisor: turns assignments and stops from the coordinator into runtime calls, and the
//! runtimes' events into allocation state reports. It outlives sessions: what happens while the
//! agent is disconnected is reported once it is connected again.
//!
//! Routing: a unit with an image goes to the agent's container runtime (Kubernetes or Docker, the
//! one selected at start), a unit without one to the process runtime when the config allows it.
//!
//! Fencing: each assignment carries (term, index); an assignment or stop older than the newest
//! seen for the same allocation is ignored. The token, the runtime and the health check are
//! stored beside the allocation's files (`assignment.json`, written before the runtime is asked
//! to start anything) so that after a restart the agent can adopt what still runs and report on
//! the rest.

use crate::runtime::{
    Exit, GpuAssignment, Recovered, Runtime, RuntimeEvent, UnitSpec, INPUT_DIR, OUTPUT_DIR,
};
use gantry_protocol::jobspec::{JobKind, JobSpec};
use gantry_protocol::{
    AllocationPhase, AllocationStateReport, ArtifactFile, Assign, FencingToken, Gpu, RuntimeKind,
    Stop,
};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;

const ASSIGNMENT_FILE: &str = "assignment.json";
/// Written when an allocation's final state has been reported: a restart does not report it again.
const ENDED_FILE: &str = "ended";

fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

/// What the agent keeps of an assignment on disk, to take it up again after a restart.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct AssignmentRecord {
    term: u64,
    index: u64,
    runtime: RuntimeKind,
    /// Serving replicas: the port and path of the health check.
    health: Option<(u16, String)>,
    /// The job's declared `outputs`, collected when the unit succeeds.
    #[serde(default)]
    outputs: Vec<String>,
}

/// The runtimes this agent may use, as selected at start.
#[derive(Clone, Default)]
pub struct Runtimes {
    /// Runs units that name an image: Kubernetes or Docker.
    pub container: Option<Arc<dyn Runtime>>,
    /// Runs units that name only a command, when `allow_process` is set.
    pub process: Option<Arc<dyn Runtime>>,
    /// The agent config's `allow_pull`: every job may pull its image.
    pub allow_pull: bool,
}

impl Runtimes {
    fn all(&self) -> impl Iterator<Item = &Arc<dyn Runtime>> {
        self.container.iter().chain(self.process.iter())
    }

    /// The runtime for a job, or why there is none on this agent.
    fn for_job(&self, spec: &JobSpec) -> Result<Arc<dyn Runtime>, String> {
        match &spec.image {
            Some(image) => self.container.clone().ok_or_else(|| {
                format!("the job names the image {image:?}, and this agent has no container runtime (neither Kubernetes nor Docker answered when it started)")
            }),
            None => self.process.clone().ok_or_else(|| {
                "the job names no image, and this agent does not run plain processes (set allow_process = true in its config)".to_string()
            }),
        }
    }
}

pub struct Supervisor {
    runtimes: Runtimes,
    work_root: PathBuf,
    /// This node's GPUs, to give units their UUIDs.
    gpus: Vec<Gpu>,
    fencing: BTreeMap<String, FencingToken>,
    /// Which runtime holds each allocation.
    owner: BTreeMap<String, Arc<dyn Runtime>>,
    /// The declared outputs of each allocation that has any.
    outputs: BTreeMap<String, Vec<String>>,
    /// Serving replicas' health checks: the port and path, and the task once it runs.
    health: BTreeMap<String, (u16, String)>,
    health_tasks: BTreeMap<String, tokio::task::JoinHandle<()>>,
    /// Reports waiting for a session to carry them.
    reports: mpsc::UnboundedSender<AllocationStateReport>,
}

fn failed(reason: String) -> AllocationPhase {
    AllocationPhase::Failed {
        exit_code: None,
        reason,
    }
}

fn phase_of(exit: Exit) -> AllocationPhase {
    match exit {
        Exit::Code(0) => AllocationPhase::Succeeded,
        Exit::Code(code) => AllocationPhase::Failed {
            exit_code: Some(code),
            reason: format!("exited with code {code}"),
        },
        Exit::Signal(signal) => failed(format!("killed by signal {signal}")),
        Exit::Stopped => failed("stopped by Gantry".into()),
        Exit::Lost(reason) => AllocationPhase::Lost { reason },
        Exit::Failed { exit_code, reason } => AllocationPhase::Failed { exit_code, reason },
    }
}

fn is_final(phase: &AllocationPhase) -> bool {
    matches!(
        phase,
        AllocationPhase::Succeeded | AllocationPhase::Failed { .. } | AllocationPhase::Lost { .. }
    )
}

/// Writes an assignment's inputs into the allocation's input directory (checked against their
/// checksums) and makes its output directory.
fn place_inputs(dir: &Path, inputs: &[ArtifactFile]) -> Result<(), String> {
    let input_dir = dir.join(INPUT_DIR);
    let output_dir = dir.join(OUTPUT_DIR);
    for made in [&input_dir, &output_dir] {
        std::fs::create_dir_all(made).map_err(|e| format!("create {}: {e}", made.display()))?;
    }
    for input in inputs {
        if !gantry_protocol::jobspec::is_artifact_name(&input.name) {
            return Err(format!("input name {:?} is not a file name", input.name));
        }
        if sha256_hex(&input.data) != input.sha256 {
            return Err(format!(
                "input {} arrived damaged: its bytes do not match its checksum",
                input.name
            ));
        }
        let path = input_dir.join(&input.name);
        std::fs::write(&path, &input.data)
            .map_err(|e| format!("write input {}: {e}", path.display()))?;
    }
    Ok(())
}

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, data).as_ref())
}

/// The outputs this unit must leave: the job's declared ones, except in a training gang, whose
/// outputs are its rank 0's (a gang's ranks compute one result, and training scripts save it
/// from rank 0 only, as torchrun's do); the other ranks' output directories are not collected.
fn unit_outputs(job: &JobSpec, env: &BTreeMap<String, String>) -> Vec<String> {
    let is_rank_0 = env.get("RANK").is_none_or(|rank| rank == "0");
    if job.kind == JobKind::Training && !is_rank_0 {
        return Vec::new();
    }
    job.outputs.clone()
}

/// The files in `dir` that match the job's declared outputs, within the size limits. A declared
/// name (without `*`) that is missing is an error; a pattern may match nothing.
fn collect_outputs(dir: &Path, outputs: &[String]) -> Result<Vec<ArtifactFile>, String> {
    use gantry_protocol::jobspec::{is_artifact_name, output_matches};
    use gantry_protocol::{ARTIFACTS_BYTES_PER_UNIT_MAX, ARTIFACT_BYTES_MAX};
    let mut names: Vec<String> = match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|name| is_artifact_name(name))
            .filter(|name| outputs.iter().any(|pattern| output_matches(pattern, name)))
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(format!("read the outputs in {}: {e}", dir.display())),
    };
    names.sort();
    for declared in outputs.iter().filter(|o| !o.contains('*')) {
        if !names.contains(declared) {
            return Err(format!(
                "it exited 0 without writing its declared output {declared:?} into $GANTRY_OUTPUT_DIR"
            ));
        }
    }
    let mut files = Vec::new();
    let mut total = 0usize;
    for name in names {
        let data =
            std::fs::read(dir.join(&name)).map_err(|e| format!("read output {name}: {e}"))?;
        if data.len() > ARTIFACT_BYTES_MAX {
            return Err(format!(
                "its output {name:?} is {} bytes, over the {ARTIFACT_BYTES_MAX}-byte limit of an artifact; put large outputs on a shared path instead",
                data.len()
            ));
        }
        total += data.len();
        if total > ARTIFACTS_BYTES_PER_UNIT_MAX {
            return Err(format!(
                "its outputs add up to more than the {ARTIFACTS_BYTES_PER_UNIT_MAX} bytes one unit may report"
            ));
        }
        files.push(ArtifactFile {
            sha256: sha256_hex(&data),
            name,
            data,
        });
    }
    Ok(files)
}

fn read_record(dir: &Path) -> Option<AssignmentRecord> {
    let bytes = std::fs::read(dir.join(ASSIGNMENT_FILE)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

impl Supervisor {
    pub fn new(
        runtimes: Runtimes,
        work_root: PathBuf,
        gpus: Vec<Gpu>,
        reports: mpsc::UnboundedSender<AllocationStateReport>,
    ) -> Self {
        Self {
            runtimes,
            work_root,
            gpus,
            fencing: BTreeMap::new(),
            owner: BTreeMap::new(),
            outputs: BTreeMap::new(),
            health: BTreeMap::new(),
            health_tasks: BTreeMap::new(),
            reports,
        }
    }

    fn report(&self, allocation_id: &str, phase: AllocationPhase) {
        self.report_with_image(allocation_id, phase, None);
    }

    fn report_with_image(
        &self,
        allocation_id: &str,
        phase: AllocationPhase,
        image: Option<String>,
    ) {
        self.send_report(allocation_id, phase, image, Vec::new());
    }

    fn send_report(
        &self,
        allocation_id: &str,
        phase: AllocationPhase,
        image: Option<String>,
        artifacts: Vec<ArtifactFile>,
    ) {
        let Some(&fencing) = self.fencing.get(allocation_id) else {
            return;
        };
        if is_final(&phase) {
            let _ = std::fs::write(self.work_root.join(allocation_id).join(ENDED_FILE), b"");
        }
        let report = AllocationStateReport {
            allocation_id: allocation_id.to_string(),
            fencing,
            phase,
            at_unix_ms: now_unix_ms(),
            image,
            artifacts,
        };
        let _ = self.reports.send(report);
    }

    /// Takes up what an earlier run of the agent left: asks each runtime what it still holds,
    /// adopts what runs, reports what ended, stops what no assignment on disk accounts for, and
    /// reports as lost what no runtime has any more. Call once, before the first session.
    pub async fn recover(&mut self) {
        let mut records = BTreeMap::new();
        if let Ok(entries) = std::fs::read_dir(&self.work_root) {
            for entry in entries.flatten() {
                let Ok(name) = entry.file_name().into_string() else {
                    continue;
                };
                let dir = entry.path();
                if dir.join(ENDED_FILE).exists() {
                    continue;
                }
                if let Some(record) = read_record(&dir) {
                    records.insert(name, record);
                }
            }
        }
        let runtimes: Vec<Arc<dyn Runtime>> = self.runtimes.all().cloned().collect();
        for runtime in runtimes {
            for (allocation_id, recovered) in runtime.recover().await {
                let Some(record) = records.remove(&allocation_id) else {
                    if matches!(recovered, Recovered::Running { .. }) {
                        tracing::warn!(allocation = %allocation_id, runtime = runtime.kind().as_str(), "found running work no assignment accounts for; stopping it");
                        runtime.stop(&allocation_id, Duration::from_secs(10)).await;
                    }
                    continue;
                };
                self.fencing.insert(
                    allocation_id.clone(),
                    FencingToken {
                        term: record.term,
                        index: record.index,
                    },
                );
                self.owner.insert(allocation_id.clone(), runtime.clone());
                if !record.outputs.is_empty() {
                    self.outputs
                        .insert(allocation_id.clone(), record.outputs.clone());
                }
                match recovered {
                    Recovered::Running { image } => {
                        tracing::info!(allocation = %allocation_id, runtime = runtime.kind().as_str(), "adopted a unit that ran on through the agent's restart");
                        if let Some(health) = record.health {
                            self.health.insert(allocation_id.clone(), health);
                        }
                        self.handle_runtime_event(RuntimeEvent::Started {
                            allocation_id,
                            image,
                        });
                    }
                    Recovered::Ended(exit) => self.report_exit(&allocation_id, exit),
                }
            }
        }
        for (allocation_id, record) in records {
            self.fencing.insert(
                allocation_id.clone(),
                FencingToken {
                    term: record.term,
                    index: record.index,
                },
            );
            let reason = format!(
                "the agent restarted and the {} runtime no longer has this unit",
                record.runtime.as_str()
            );
            self.report(&allocation_id, AllocationPhase::Lost { reason });
        }
    }

    /// What is running now, reported again to a new session so the coordinator can reconcile.
    pub async fn report_running(&self) {
        for runtime in self.runtimes.all() {
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
        let spec: JobSpec = match serde_json::from_str(&assign.spec_json) {
            Ok(spec) => spec,
            Err(e) => {
                let reason = format!("the assignment's spec does not decode: {e}");
                self.report(&assign.allocation_id, failed(reason));
                return;
            }
        };
        let runtime = match self.runtimes.for_job(&spec) {
            Ok(runtime) => runtime,
            Err(reason) => {
                self.report(&assign.allocation_id, failed(reason));
                return;
            }
        };
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
        let unit = UnitSpec::new(
            assign.allocation_id.clone(),
            assign.job_id.clone(),
            spec,
            assign.node.clone(),
            &assign.env,
            gpus,
            self.runtimes.allow_pull,
        );
        let health = match (&unit.job.serving, unit.port) {
            (Some(serving), Some(port)) => Some((port, serving.health_path.clone())),
            _ => None,
        };
        if let Some(health) = &health {
            self.health
                .insert(assign.allocation_id.clone(), health.clone());
        }
        // Written before the runtime starts anything: a restart in between still finds it.
        let record = AssignmentRecord {
            term: assign.fencing.term,
            index: assign.fencing.index,
            runtime: runtime.kind(),
            health,
            outputs: unit_outputs(&unit.job, &assign.env),
        };
        let dir = self.work_root.join(&assign.allocation_id);
        let written = std::fs::create_dir_all(&dir).and_then(|()| {
            std::fs::write(
                dir.join(ASSIGNMENT_FILE),
                serde_json::to_vec(&record).unwrap_or_default(),
            )
        });
        if let Err(e) = written {
            let reason = format!("cannot record the assignment in {}: {e}", dir.display());
            self.report(&assign.allocation_id, failed(reason));
            return;
        }
        if let Err(reason) = place_inputs(&dir, &assign.inputs) {
            self.report(&assign.allocation_id, failed(reason));
            return;
        }
        if !record.outputs.is_empty() {
            self.outputs
                .insert(assign.allocation_id.clone(), record.outputs);
        }
        self.owner
            .insert(assign.allocation_id.clone(), runtime.clone());
        let reports = self.reports.clone();
        let fencing = assign.fencing;
        tokio::spawn(async move {
            let allocation_id = unit.allocation_id.clone();
            if let Err(e) = runtime.start(unit).await {
                let report = AllocationStateReport {
                    allocation_id,
                    fencing,
                    phase: failed(e.to_string()),
                    at_unix_ms: now_unix_ms(),
                    image: None,
                    artifacts: Vec::new(),
                };
                let _ = reports.send(report);
            }
        });
    }

    pub fn handle_stop(&mut self, stop: Stop) {
        if let Some(known) = self.fencing.get(&stop.allocation_id) {
            if *known > stop.fencing {
                return;
            }
        }
        let Some(runtime) = self.owner.get(&stop.allocation_id).cloned() else {
            return;
        };
        let grace = Duration::from_millis(stop.grace_period_ms);
        tokio::spawn(async move { runtime.stop(&stop.allocation_id, grace).await });
    }

    pub fn handle_runtime_event(&mut self, event: RuntimeEvent) {
        match event {
            RuntimeEvent::Started {
                allocation_id,
                image,
            } => {
                self.report_with_image(&allocation_id, AllocationPhase::Running, image);
                let Some(runtime) = self.owner.get(&allocation_id).cloned() else {
                    return;
                };
                if runtime.checks_health() {
                    return;
                }
                if let (Some((port, path)), Some(fencing)) = (
                    self.health.get(&allocation_id).cloned(),
                    self.fencing.get(&allocation_id).copied(),
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
            RuntimeEvent::Health {
                allocation_id,
                healthy,
            } => {
                let phase = if healthy {
                    AllocationPhase::Healthy
                } else {
                    AllocationPhase::Running
                };
                self.report(&allocation_id, phase);
            }
            RuntimeEvent::Exited {
                allocation_id,
                exit,
            } => {
                if let Some(task) = self.health_tasks.remove(&allocation_id) {
                    task.abort();
                }
                self.health.remove(&allocation_id);
                self.owner.remove(&allocation_id);
                self.report_exit(&allocation_id, exit);
            }
        }
    }

    /// Reports how a unit ended; a success carries the declared outputs it wrote (or becomes a
    /// failure that says which output is missing or too large).
    fn report_exit(&mut self, allocation_id: &str, exit: Exit) {
        let outputs = self.outputs.remove(allocation_id).unwrap_or_default();
        let phase = phase_of(exit);
        if phase != AllocationPhase::Succeeded || outputs.is_empty() {
            self.report(allocation_id, phase);
            return;
        }
        let dir = self.work_root.join(allocation_id).join(OUTPUT_DIR);
        match collect_outputs(&dir, &outputs) {
            Ok(files) => self.send_report(allocation_id, phase, None, files),
            Err(reason) => self.report(allocation_id, failed(reason)),
        }
    }

    pub async fn shutdown(&self, grace: Duration) {
        let stops = self.runtimes.all().map(|runtime| runtime.shutdown(grace));
        for stop in stops {
            stop.await;
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
            image: None,
            artifacts: Vec::new(),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_training_gang_s_outputs_are_its_rank_0_s() {
        let spec = |kind: &str| {
            gantry_protocol::jobspec::from_json_value(serde_json::json!({
                "name": "j", "kind": kind, "command": ["x"], "outputs": ["model.json"]
            }))
            .unwrap()
        };
        let env = |key: &str, value: &str| BTreeMap::from([(key.to_string(), value.to_string())]);
        let training = spec("training");
        assert_eq!(unit_outputs(&training, &env("RANK", "0")), ["model.json"]);
        assert!(unit_outputs(&training, &env("RANK", "1")).is_empty());
        // Every shard of a batch job leaves its own.
        let batch = spec("batch");
        assert_eq!(
            unit_outputs(&batch, &env("SHARD_INDEX", "3")),
            ["model.json"]
        );
    }
}
