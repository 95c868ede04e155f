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
    AllocationPhase, AllocationStateReport, ArtifactFile, Assign, FencingToken, FetchLogs, Gpu,
    LogSlice, LogStream, LogsError, LogsReply, RuntimeKind, Stop, LOG_SLICE_BYTES_MAX,
};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;

const ASSIGNMENT_FILE: &str = "assignment.json";
// Written when an allocation's final state has been reported: a restart does not report it
// again, and the retention sweep may remove the directory once it is old enough.
use crate::retention::ENDED_FILE;
/// Log reads running at once; more are refused (the coordinator bounds its requests too).
pub const LOG_READS_MAX: usize = 8;

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
    /// Whether each checked replica passes its health check now, so that a new session hears
    /// `Healthy` rather than a bare `Running` for it.
    healthy: BTreeMap<String, Arc<std::sync::atomic::AtomicBool>>,
    /// Reports waiting for a session to carry them.
    reports: mpsc::UnboundedSender<AllocationStateReport>,
    log_reads: Arc<tokio::sync::Semaphore>,
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
            healthy: BTreeMap::new(),
            reports,
            log_reads: Arc::new(tokio::sync::Semaphore::new(LOG_READS_MAX)),
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
                let healthy = self
                    .healthy
                    .get(&allocation_id)
                    .is_some_and(|h| h.load(std::sync::atomic::Ordering::SeqCst));
                let phase = if healthy {
                    AllocationPhase::Healthy
                } else {
                    AllocationPhase::Running
                };
                self.report(&allocation_id, phase);
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
            .map(|&index| {
                let gpu = self.gpus.iter().find(|g| g.index == index);
                GpuAssignment {
                    index,
                    uuid: gpu.and_then(|g| g.uuid.clone()),
                    declared: gpu.is_some_and(|g| g.source == gantry_protocol::GpuSource::Declared),
                }
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
                        healthy: self
                            .healthy
                            .entry(allocation_id.clone())
                            .or_default()
                            .clone(),
                    };
                    self.health_tasks
                        .insert(allocation_id, tokio::spawn(check.run()));
                }
            }
            RuntimeEvent::Health {
                allocation_id,
                healthy,
            } => {
                self.healthy
                    .entry(allocation_id.clone())
                    .or_default()
                    .store(healthy, std::sync::atomic::Ordering::SeqCst);
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
                self.healthy.remove(&allocation_id);
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

    /// Reads what the coordinator asked for from the runtime holding the allocation's output:
    /// the one running it, else the one its assignment record names (the output stays after the
    /// end, and across agent restarts). The future owns what it needs, so the session can run it
    /// on a task of its own and go on serving.
    pub fn fetch_logs(
        &self,
        fetch: FetchLogs,
    ) -> impl std::future::Future<Output = LogsReply> + Send + 'static {
        let valid = is_allocation_id(&fetch.allocation_id);
        let running_in = self.owner.get(&fetch.allocation_id).cloned();
        let runtimes: Vec<Arc<dyn Runtime>> = self.runtimes.all().cloned().collect();
        let dir = self.work_root.join(&fetch.allocation_id);
        let permit = self.log_reads.clone().try_acquire_owned();
        async move {
            let holder = match running_in {
                Some(runtime) => Some(runtime),
                None if valid => {
                    let record = tokio::fs::read(dir.join(ASSIGNMENT_FILE))
                        .await
                        .ok()
                        .and_then(|bytes| serde_json::from_slice::<AssignmentRecord>(&bytes).ok());
                    record.and_then(|record| {
                        runtimes
                            .into_iter()
                            .find(|runtime| runtime.kind() == record.runtime)
                    })
                }
                None => None,
            };
            let result = match (holder, permit) {
                (None, _) => Err(LogsError::NotFound(format!(
                    "this agent holds no output of allocation {}",
                    fetch.allocation_id
                ))),
                (Some(_), Err(_)) => Err(LogsError::Failed(format!(
                    "this agent is already reading {LOG_READS_MAX} logs; retry"
                ))),
                (Some(runtime), Ok(_permit)) => read_slice(runtime.as_ref(), &fetch).await,
            };
            LogsReply {
                request_id: fetch.request_id,
                result,
            }
        }
    }

    pub async fn shutdown(&self, grace: Duration) {
        let stops = self.runtimes.all().map(|runtime| runtime.shutdown(grace));
        for stop in stops {
            stop.await;
        }
    }
}

/// Allocation ids name directories: no separators, never `.` or `..`.
fn is_allocation_id(allocation_id: &str) -> bool {
    !allocation_id.is_empty()
        && allocation_id != "."
        && allocation_id != ".."
        && allocation_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// One slice of an allocation's output. Whether the unit runs is asked before reading, so a
/// slice marked `ended` can miss nothing the unit wrote.
async fn read_slice(runtime: &dyn Runtime, fetch: &FetchLogs) -> Result<LogSlice, LogsError> {
    let running = runtime.running().await.contains(&fetch.allocation_id);
    let max_bytes = fetch.max_bytes.min(LOG_SLICE_BYTES_MAX);
    let stderr = fetch.stream == LogStream::Stderr;
    match runtime
        .logs_from(
            &fetch.allocation_id,
            stderr,
            fetch.offset,
            u64::from(max_bytes),
        )
        .await
    {
        Ok(read) => {
            let next_offset = read.offset + read.data.len() as u64;
            Ok(LogSlice {
                ended: !running && next_offset >= read.end_offset,
                offset: read.offset,
                data: read.data,
                end_offset: read.end_offset,
            })
        }
        Err(crate::runtime::RuntimeError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => {
            Err(LogsError::NotFound(e.to_string()))
        }
        Err(e) => Err(LogsError::Failed(format!(
            "reading the {} of {}: {e}",
            fetch.stream.as_str(),
            fetch.allocation_id
        ))),
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
    /// Shared with the supervisor: whether the last checks passed.
    healthy: Arc<std::sync::atomic::AtomicBool>,
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
                        self.healthy
                            .store(true, std::sync::atomic::Ordering::SeqCst);
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
                self.healthy
                    .store(false, std::sync::atomic::Ordering::SeqCst);
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
    use crate::runtime::process::ProcessRuntime;
    use crate::runtime::RuntimeConfig;

    struct Harness {
        supervisor: Supervisor,
        events: mpsc::UnboundedReceiver<RuntimeEvent>,
        reports: mpsc::UnboundedReceiver<AllocationStateReport>,
        _dir: tempfile::TempDir,
    }

    fn harness() -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let (events_tx, events) = mpsc::unbounded_channel();
        let (reports_tx, reports) = mpsc::unbounded_channel();
        let config = RuntimeConfig {
            work_root: dir.path().to_path_buf(),
            log_bytes_max: 1 << 20,
        };
        let process: Arc<dyn Runtime> = Arc::new(ProcessRuntime::new(config, events_tx));
        let runtimes = Runtimes {
            container: None,
            process: Some(process),
            allow_pull: false,
        };
        Harness {
            supervisor: Supervisor::new(runtimes, dir.path().to_path_buf(), Vec::new(), reports_tx),
            events,
            reports,
            _dir: dir,
        }
    }

    fn assign(id: &str, spec: serde_json::Value, inputs: Vec<ArtifactFile>) -> Assign {
        let spec = gantry_protocol::jobspec::from_json_value(spec).unwrap();
        Assign {
            allocation_id: id.into(),
            fencing: FencingToken { term: 1, index: 1 },
            job_id: "job".into(),
            node: "node".into(),
            spec_json: spec.canonical_json(),
            env: BTreeMap::new(),
            gpus: Vec::new(),
            inputs,
        }
    }

    impl Harness {
        async fn next_report(&mut self) -> AllocationStateReport {
            loop {
                tokio::select! {
                    Some(event) = self.events.recv() => self.supervisor.handle_runtime_event(event),
                    Some(report) = self.reports.recv() => return report,
                    _ = tokio::time::sleep(Duration::from_secs(10)) => panic!("no report in 10 s"),
                }
            }
        }
    }

    #[tokio::test]
    async fn a_healthy_replica_is_reported_healthy_to_a_new_session() {
        let mut h = harness();
        let spec = serde_json::json!({ "name": "web", "kind": "batch", "command": ["sleep", "5"] });
        h.supervisor.handle_assign(assign("a-1", spec, Vec::new()));
        assert_eq!(h.next_report().await.phase, AllocationPhase::Running);
        h.supervisor.handle_runtime_event(RuntimeEvent::Health {
            allocation_id: "a-1".into(),
            healthy: true,
        });
        assert_eq!(h.next_report().await.phase, AllocationPhase::Healthy);
        h.supervisor.report_running().await;
        assert_eq!(
            h.next_report().await.phase,
            AllocationPhase::Healthy,
            "not demoted"
        );
        h.supervisor.shutdown(Duration::from_secs(1)).await;
    }

    #[tokio::test]
    async fn inputs_are_placed_and_declared_outputs_travel_with_success() {
        let mut h = harness();
        let model = b"{\"w\":[1]}".to_vec();
        let input = ArtifactFile {
            name: "model.json".into(),
            sha256: sha256_hex(&model),
            data: model.clone(),
        };
        let spec = serde_json::json!({
            "name": "copy", "kind": "batch",
            "command": ["sh", "-c", "cp \"$GANTRY_INPUT_DIR/model.json\" \"$GANTRY_OUTPUT_DIR/copy.json\" && echo 1 > \"$GANTRY_OUTPUT_DIR/part-1.txt\" && echo x > \"$GANTRY_OUTPUT_DIR/ignored.bin\""],
            "outputs": ["copy.json", "part-*.txt"],
        });
        h.supervisor
            .handle_assign(assign("a-1", spec, vec![input.clone()]));
        assert_eq!(h.next_report().await.phase, AllocationPhase::Running);
        let done = h.next_report().await;
        assert_eq!(done.phase, AllocationPhase::Succeeded, "{done:?}");
        let names: Vec<&str> = done.artifacts.iter().map(|a| a.name.as_str()).collect();
        assert_eq!(names, ["copy.json", "part-1.txt"]);
        assert_eq!(done.artifacts[0].data, model);
        assert_eq!(done.artifacts[0].sha256, input.sha256);

        // A damaged input is refused before anything runs.
        let mut damaged = input;
        damaged.data.push(b'!');
        let spec = serde_json::json!({ "name": "copy", "kind": "batch", "command": ["true"] });
        h.supervisor
            .handle_assign(assign("a-2", spec, vec![damaged]));
        match h.next_report().await.phase {
            AllocationPhase::Failed { reason, .. } => {
                assert!(reason.contains("damaged"), "{reason}")
            }
            other => panic!("expected a failure, got {other:?}"),
        }

        // A declared output that was not written fails the unit, naming it.
        let spec = serde_json::json!({ "name": "lazy", "kind": "batch", "command": ["true"], "outputs": ["model.json"] });
        h.supervisor.handle_assign(assign("a-3", spec, Vec::new()));
        assert_eq!(h.next_report().await.phase, AllocationPhase::Running);
        match h.next_report().await.phase {
            AllocationPhase::Failed { reason, .. } => {
                assert!(reason.contains("\"model.json\""), "{reason}")
            }
            other => panic!("expected a failure, got {other:?}"),
        }
    }
    use crate::runtime::{BoxFuture, RuntimeError};
    use std::sync::Mutex;

    /// A container runtime that keeps its output in memory, as Docker keeps all of it.
    #[derive(Default)]
    struct Recorded {
        output: Mutex<Vec<u8>>,
        running: Mutex<bool>,
    }

    impl Runtime for Recorded {
        fn kind(&self) -> RuntimeKind {
            RuntimeKind::Docker
        }
        fn start(&self, _: UnitSpec) -> BoxFuture<'_, Result<(), RuntimeError>> {
            Box::pin(async { Ok(()) })
        }
        fn stop(&self, _: &str, _: Duration) -> BoxFuture<'_, ()> {
            Box::pin(async {})
        }
        fn running(&self) -> BoxFuture<'_, Vec<String>> {
            let running = *self.running.lock().unwrap();
            Box::pin(async move {
                if running {
                    vec!["a-1".to_string()]
                } else {
                    Vec::new()
                }
            })
        }
        fn logs(
            &self,
            _: &str,
            _: bool,
            bytes: u64,
        ) -> BoxFuture<'_, Result<Vec<u8>, RuntimeError>> {
            let output = self.output.lock().unwrap().clone();
            let start = output
                .len()
                .saturating_sub(bytes.min(usize::MAX as u64) as usize);
            Box::pin(async move { Ok(output[start..].to_vec()) })
        }
        fn shutdown(&self, _: Duration) -> BoxFuture<'_, ()> {
            Box::pin(async {})
        }
    }

    fn fetch(allocation_id: &str, offset: u64, max_bytes: u32) -> FetchLogs {
        FetchLogs {
            request_id: 9,
            allocation_id: allocation_id.into(),
            stream: LogStream::Stdout,
            offset,
            max_bytes,
        }
    }

    #[tokio::test]
    async fn a_slice_is_bounded_and_ends_only_once_the_unit_stopped_writing() {
        let dir = tempfile::tempdir().unwrap();
        let runtime = Arc::new(Recorded::default());
        *runtime.output.lock().unwrap() = vec![b'x'; LOG_SLICE_BYTES_MAX as usize + 10];
        *runtime.running.lock().unwrap() = true;
        let runtimes = Runtimes {
            container: Some(runtime.clone()),
            process: None,
            allow_pull: false,
        };
        // The output of an allocation that is not running is found through its record.
        let record = AssignmentRecord {
            term: 1,
            index: 1,
            runtime: RuntimeKind::Docker,
            health: None,
            outputs: Vec::new(),
        };
        std::fs::create_dir_all(dir.path().join("a-1")).unwrap();
        std::fs::write(
            dir.path().join("a-1").join(ASSIGNMENT_FILE),
            serde_json::to_vec(&record).unwrap(),
        )
        .unwrap();
        let (reports, _) = mpsc::unbounded_channel();
        let supervisor = Supervisor::new(runtimes, dir.path().into(), Vec::new(), reports);

        let reply = supervisor.fetch_logs(fetch("a-1", 0, u32::MAX)).await;
        assert_eq!(reply.request_id, 9);
        let slice = reply.result.unwrap();
        assert_eq!(slice.data.len() as u32, LOG_SLICE_BYTES_MAX, "capped");
        assert!(!slice.ended);
        let rest = u64::from(LOG_SLICE_BYTES_MAX);
        let slice = supervisor
            .fetch_logs(fetch("a-1", rest, 100))
            .await
            .result
            .unwrap();
        assert_eq!((slice.offset, slice.data.len()), (rest, 10));
        assert!(!slice.ended, "still running: more may come");
        *runtime.running.lock().unwrap() = false;
        let slice = supervisor
            .fetch_logs(fetch("a-1", rest, 5))
            .await
            .result
            .unwrap();
        assert!(!slice.ended, "stopped, but five bytes are left");
        let slice = supervisor
            .fetch_logs(fetch("a-1", rest + 5, 5))
            .await
            .result
            .unwrap();
        assert!(slice.ended);

        for unknown in ["a-2", "../a-1", ""] {
            let reply = supervisor.fetch_logs(fetch(unknown, 0, 10)).await;
            assert!(
                matches!(reply.result, Err(LogsError::NotFound(_))),
                "{unknown}: {reply:?}"
            );
        }
    }

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
