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
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}

pub struct Supervisor {
    runtime: Option<Arc<dyn Runtime>>,
    work_root: PathBuf,
    /// This node's GPUs, to give units their UUIDs.
    gpus: Vec<Gpu>,
    fencing: BTreeMap<String, FencingToken>,
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
        Self { runtime, work_root, gpus, fencing: BTreeMap::new(), reports }
    }

    fn report(&self, allocation_id: &str, phase: AllocationPhase) {
        let Some(&fencing) = self.fencing.get(allocation_id) else { return };
        let report = AllocationStateReport { allocation_id: allocation_id.to_string(), fencing, phase, at_unix_ms: now_unix_ms() };
        let _ = self.reports.send(report);
    }

    /// Allocations left from before a restart: the process runtime kept none of them running.
    pub fn report_previous(&mut self, previous: Vec<String>) {
        for allocation_id in previous {
            let path = self.work_root.join(&allocation_id).join(FENCING_FILE);
            let Some(fencing) = std::fs::read(&path).ok().and_then(|bytes| serde_json::from_slice::<(u64, u64)>(&bytes).ok()) else {
                continue;
            };
            self.fencing.insert(allocation_id.clone(), FencingToken { term: fencing.0, index: fencing.1 });
            let reason = "the agent restarted; the process runtime keeps no work across restarts".into();
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
        self.fencing.insert(assign.allocation_id.clone(), assign.fencing);
        let Some(runtime) = self.runtime.clone() else {
            let reason = "this agent has no runtime allowed (set allow_process = true, or run Docker or Kubernetes)".into();
            self.report(&assign.allocation_id, AllocationPhase::Failed { exit_code: None, reason });
            return;
        };
        let spec: JobSpec = match serde_json::from_str(&assign.spec_json) {
            Ok(spec) => spec,
            Err(e) => {
                let reason = format!("the assignment's spec does not decode: {e}");
                self.report(&assign.allocation_id, AllocationPhase::Failed { exit_code: None, reason });
                return;
            }
        };
        let mut env = spec.env.clone();
        env.extend(assign.env.clone());
        let gpus = assign
            .gpus
            .iter()
            .map(|&index| GpuAssignment { index, uuid: self.gpus.iter().find(|g| g.index == index).and_then(|g| g.uuid.clone()) })
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
                    phase: AllocationPhase::Failed { exit_code: None, reason: e.to_string() },
                    at_unix_ms: now_unix_ms(),
                };
                let _ = reports.send(report);
                return;
            }
            // Written after the runtime made the directory: survives a restart for reporting.
            let _ = std::fs::write(fencing_path.join(FENCING_FILE), serde_json::to_vec(&token).unwrap_or_default());
        });
    }

    pub fn handle_stop(&mut self, stop: Stop) {
        if let Some(known) = self.fencing.get(&stop.allocation_id) {
            if *known > stop.fencing {
                return;
            }
        }
        let Some(runtime) = self.runtime.clone() else { return };
        let grace = Duration::from_millis(stop.grace_period_ms);
        tokio::spawn(async move { runtime.stop(&stop.allocation_id, grace).await });
    }

    pub fn handle_runtime_event(&mut self, event: RuntimeEvent) {
        match event {
            RuntimeEvent::Started { allocation_id } => self.report(&allocation_id, AllocationPhase::Running),
            RuntimeEvent::Exited { allocation_id, exit } => {
                let phase = match exit {
                    Exit::Code(0) => AllocationPhase::Succeeded,
                    Exit::Code(code) => AllocationPhase::Failed { exit_code: Some(code), reason: format!("exited with code {code}") },
                    Exit::Signal(signal) => AllocationPhase::Failed { exit_code: None, reason: format!("killed by signal {signal}") },
                    Exit::Stopped => AllocationPhase::Failed { exit_code: None, reason: "stopped by Gantry".into() },
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
