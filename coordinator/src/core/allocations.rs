//! The allocation lifecycle in the replicated state: placements checked again on apply, reports
//! from agents, and what each kind of job does when a unit ends (a batch shard is retried, a
//! training gang restarts whole, a serving replica is replaced). Also the two views the leader's
//! scheduler pass reads: the cluster and the queue.
//!
//! Pure like the rest of the state machine: time is the leader's stamp on the entry, or (for the
//! queue's retry backoff, outside apply) the leader's clock passed in.

use super::scheduler::{ClusterView, GpuSlot, NodeKey, NodeState, QueuedJob, RunningUnit};
use super::state::{AgentState, JobState, State};
use gantry_protocol::jobspec::{JobKind, JobSpec};
use gantry_protocol::replicated::PlacementEntry;
use gantry_protocol::{AllocationPhase, RuntimeKind};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// Ports given to serving replicas on their node.
pub const SERVING_PORTS: std::ops::Range<u16> = 31_000..33_000;
/// The rendezvous port of a training gang on rank 0's node.
pub const MASTER_PORT: u16 = 29_500;
/// Batch retries wait 1 s, 2 s, 4 s... up to this.
pub const RETRY_BACKOFF_MAX_MS: u64 = 60_000;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allocation {
    pub id: String,
    pub job_id: String,
    /// Rank, shard index or replica index.
    pub unit: u32,
    pub attempt: u32,
    pub agent_id: String,
    pub node: String,
    pub gpus: Vec<u32>,
    pub cpu_millis: u64,
    pub memory_bytes: u64,
    /// For serving replicas: the port on the node.
    pub port: Option<u16>,
    /// The fencing token: the placing leader's term and the entry's index.
    pub fencing_term: u64,
    pub fencing_index: u64,
    pub phase: AllocationPhase,
    /// Gantry wants it stopped (cancel, a gang restart, preemption).
    pub stop_requested: bool,
    /// Stopped to make room for higher-priority work: its unit is requeued without counting as a
    /// failure.
    pub preempted: bool,
    /// Env Gantry adds for this unit (RANK, SHARD_INDEX, PORT, ...).
    pub env: BTreeMap<String, String>,
    pub created_at_unix_ms: u64,
    pub updated_at_unix_ms: u64,
}

impl Allocation {
    pub fn is_final(&self) -> bool {
        matches!(
            self.phase,
            AllocationPhase::Succeeded
                | AllocationPhase::Failed { .. }
                | AllocationPhase::Lost { .. }
        )
    }

    pub fn state_name(&self) -> &'static str {
        match self.phase {
            AllocationPhase::Pending => "pending",
            AllocationPhase::Running => "running",
            AllocationPhase::Healthy => "healthy",
            AllocationPhase::Succeeded => "succeeded",
            AllocationPhase::Failed { .. } => "failed",
            AllocationPhase::Lost { .. } => "lost",
        }
    }
}

fn spec_of(spec_json: &str) -> Option<JobSpec> {
    serde_json::from_str(spec_json).ok()
}

impl State {
    fn active_allocations_of<'a>(
        &'a self,
        job_id: &'a str,
    ) -> impl Iterator<Item = &'a Allocation> + 'a {
        self.allocations
            .values()
            .filter(move |a| a.job_id == job_id && !a.is_final())
    }

    /// Units of `job` that want a placement now; `now_unix_ms` holds back retries in backoff.
    fn wanted_units(&self, job_id: &str, spec: &JobSpec, now_unix_ms: Option<u64>) -> Vec<u32> {
        let job = &self.jobs[job_id];
        let active: BTreeSet<u32> = self.active_allocations_of(job_id).map(|a| a.unit).collect();
        match spec.kind {
            // A gang is placed whole, and only once every worker of the last attempt has ended.
            JobKind::Training => {
                if active.is_empty() {
                    (0..spec.units()).collect()
                } else {
                    Vec::new()
                }
            }
            JobKind::Batch | JobKind::Serving => (0..spec.units())
                .filter(|unit| !active.contains(unit) && !job.succeeded_units.contains(unit))
                .filter(|unit| {
                    let Some(now) = now_unix_ms else { return true };
                    let retries = job.retries.get(unit).copied().unwrap_or(0);
                    if retries == 0 {
                        return true;
                    }
                    let last_end = self
                        .allocations
                        .values()
                        .filter(|a| a.job_id == job_id && a.unit == *unit)
                        .map(|a| a.updated_at_unix_ms)
                        .max()
                        .unwrap_or(0);
                    let backoff_ms = (1_000u64 << (retries - 1).min(16)).min(RETRY_BACKOFF_MAX_MS);
                    now >= last_end + backoff_ms
                })
                .collect(),
        }
    }

    /// The work waiting to be placed, as the scheduler takes it.
    pub fn queue(&self, now_unix_ms: u64) -> Vec<QueuedJob> {
        let mut queue = Vec::new();
        for job in self.jobs.values().filter(|j| !j.state.is_final()) {
            let Some(spec) = spec_of(&job.spec_json) else {
                continue;
            };
            let units = self.wanted_units(&job.id, &spec, Some(now_unix_ms));
            if !units.is_empty() {
                queue.push(QueuedJob {
                    job_id: job.id.clone(),
                    spec,
                    units,
                    order: job.index,
                });
            }
        }
        queue
    }

    /// The fleet and what is promised on it, as the scheduler takes it.
    pub fn cluster_view(&self) -> ClusterView {
        let mut nodes = BTreeMap::new();
        for (agent_id, agent) in &self.agents {
            let register = &agent.register;
            let runtimes: Vec<RuntimeKind> = register.runtimes.iter().map(|r| r.kind).collect();
            for node in &register.nodes {
                let key = NodeKey {
                    agent_id: agent_id.clone(),
                    node: node.name.clone(),
                };
                nodes.insert(
                    key.clone(),
                    NodeState {
                        key,
                        site: register.site.clone(),
                        site_kind: register.site_kind,
                        runtimes: runtimes.clone(),
                        ready: agent.state == AgentState::Ready,
                        cpu_millis: u64::from(node.cpu_cores) * 1000,
                        memory_bytes: node.memory_bytes,
                        gpus: node
                            .gpus
                            .iter()
                            .map(|g| GpuSlot {
                                index: g.index,
                                model: g.model.clone(),
                                memory_bytes: g.memory_bytes,
                            })
                            .collect(),
                        cost_per_gpu_hour: register.cost_per_gpu_hour,
                        cost_per_cpu_hour: register.cost_per_cpu_hour,
                        used_cpu_millis: 0,
                        used_memory_bytes: 0,
                        used_gpus: BTreeSet::new(),
                    },
                );
            }
        }
        let mut running = Vec::new();
        for allocation in self.allocations.values().filter(|a| !a.is_final()) {
            let key = NodeKey {
                agent_id: allocation.agent_id.clone(),
                node: allocation.node.clone(),
            };
            if let Some(node) = nodes.get_mut(&key) {
                node.used_cpu_millis += allocation.cpu_millis;
                node.used_memory_bytes += allocation.memory_bytes;
                node.used_gpus.extend(allocation.gpus.iter().copied());
            }
            let (team, priority, preemptible) = self
                .jobs
                .get(&allocation.job_id)
                .and_then(|job| spec_of(&job.spec_json))
                .map(|spec| (spec.team, spec.priority, spec.preemptible))
                .unwrap_or_default();
            running.push(RunningUnit {
                allocation_id: allocation.id.clone(),
                job_id: allocation.job_id.clone(),
                team,
                node: key,
                priority,
                preemptible,
                cpu_millis: allocation.cpu_millis,
                memory_bytes: allocation.memory_bytes,
                gpus: allocation.gpus.clone(),
            });
        }
        ClusterView {
            nodes: nodes.into_values().collect(),
            running,
            team_gpu_quota: self.quotas.clone(),
        }
    }

    /// Applies one pass of placements, each checked against the state as it is now; a training
    /// gang is applied whole or not at all. Returns (placed, rejected).
    pub(crate) fn apply_place(
        &mut self,
        index: u64,
        term: u64,
        at: u64,
        placements: &[PlacementEntry],
        preemptions: &[String],
    ) -> (usize, usize) {
        for allocation_id in preemptions {
            if let Some(allocation) = self
                .allocations
                .get_mut(allocation_id)
                .filter(|a| !a.is_final())
            {
                allocation.stop_requested = true;
                allocation.preempted = true;
                allocation.phase = AllocationPhase::Lost {
                    reason: "preempted by higher-priority work".into(),
                };
                allocation.updated_at_unix_ms = at;
            }
        }
        let mut view = self.cluster_view();
        let mut by_job: BTreeMap<&str, Vec<&PlacementEntry>> = BTreeMap::new();
        for placement in placements {
            by_job
                .entry(placement.job_id.as_str())
                .or_default()
                .push(placement);
        }
        let (mut placed, mut rejected) = (0, 0);
        // GPUs promised to each team earlier in this entry (not yet in `view.running`).
        let mut placed_gpus: BTreeMap<String, u64> = BTreeMap::new();
        for (job_id, entries) in by_job {
            let Some(job) = self.jobs.get(job_id).filter(|j| !j.state.is_final()) else {
                rejected += entries.len();
                continue;
            };
            let Some(spec) = spec_of(&job.spec_json) else {
                rejected += entries.len();
                continue;
            };
            let wanted: BTreeSet<u32> =
                self.wanted_units(job_id, &spec, None).into_iter().collect();
            if let Some(&quota) = self.quotas.get(&spec.team) {
                let held: u64 = view
                    .running
                    .iter()
                    .filter(|unit| unit.team == spec.team)
                    .map(|unit| unit.gpus.len() as u64)
                    .sum::<u64>()
                    + placed_gpus.get(&spec.team).copied().unwrap_or(0);
                let asked: u64 = entries.iter().map(|e| e.gpus.len() as u64).sum();
                if held + asked > u64::from(quota) {
                    rejected += entries.len();
                    continue;
                }
            }
            let mut trial = view.clone();
            let fits: Vec<bool> = entries
                .iter()
                .map(|entry| wanted.contains(&entry.unit) && reserve(&mut trial, entry, &spec))
                .collect();
            let whole = spec.kind == JobKind::Training;
            if whole && (fits.iter().any(|f| !f) || entries.len() != wanted.len()) {
                rejected += entries.len();
                continue;
            }
            view = trial;
            let mut accepted = Vec::new();
            for (entry, fits) in entries.into_iter().zip(fits) {
                if fits {
                    accepted.push(entry.clone());
                } else {
                    rejected += 1;
                }
            }
            placed += accepted.len();
            *placed_gpus.entry(spec.team.clone()).or_insert(0) +=
                accepted.iter().map(|e| e.gpus.len() as u64).sum::<u64>();
            self.create_allocations(index, term, at, &spec, job_id, &accepted);
        }
        (placed, rejected)
    }

    fn create_allocations(
        &mut self,
        index: u64,
        term: u64,
        at: u64,
        spec: &JobSpec,
        job_id: &str,
        entries: &[PlacementEntry],
    ) {
        // Ports in use per node, for serving replicas.
        let mut ports: BTreeMap<(String, String), BTreeSet<u16>> = BTreeMap::new();
        for allocation in self.allocations.values().filter(|a| !a.is_final()) {
            if let Some(port) = allocation.port {
                ports
                    .entry((allocation.agent_id.clone(), allocation.node.clone()))
                    .or_default()
                    .insert(port);
            }
        }
        // The gang's rendezvous: rank 0's node, and each worker's position among its nodes.
        let master = entries
            .iter()
            .find(|e| e.unit == 0)
            .map(|e| (e.agent_id.clone(), e.node.clone()));
        let master_addr = master
            .as_ref()
            .and_then(|(agent_id, node)| {
                self.agents
                    .get(agent_id)
                    .and_then(|a| a.register.nodes.iter().find(|n| &n.name == node))
            })
            .map(|n| n.hostname.clone())
            .unwrap_or_else(|| "127.0.0.1".into());
        let gang_nodes: Vec<(String, String)> = entries
            .iter()
            .map(|e| (e.agent_id.clone(), e.node.clone()))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let job = self.jobs.get_mut(job_id).expect("checked by the caller");
        for entry in entries {
            let attempt = job.attempts.entry(entry.unit).or_insert(0);
            *attempt += 1;
            let id = format!("{job_id}-{}-{}", entry.unit, attempt);
            let node_key = (entry.agent_id.clone(), entry.node.clone());
            let mut env = BTreeMap::new();
            let mut port = None;
            match spec.kind {
                JobKind::Training => {
                    let node_rank = gang_nodes.iter().position(|n| *n == node_key).unwrap_or(0);
                    let local_rank = entries
                        .iter()
                        .filter(|e| {
                            (e.agent_id.clone(), e.node.clone()) == node_key && e.unit < entry.unit
                        })
                        .count();
                    env.insert("RANK".into(), entry.unit.to_string());
                    env.insert("WORLD_SIZE".into(), spec.units().to_string());
                    env.insert("LOCAL_RANK".into(), local_rank.to_string());
                    env.insert("NODE_RANK".into(), node_rank.to_string());
                    env.insert("MASTER_ADDR".into(), master_addr.clone());
                    env.insert("MASTER_PORT".into(), MASTER_PORT.to_string());
                }
                JobKind::Batch => {
                    env.insert("SHARD_INDEX".into(), entry.unit.to_string());
                    env.insert("SHARD_COUNT".into(), spec.units().to_string());
                }
                JobKind::Serving => {
                    let used = ports.entry(node_key.clone()).or_default();
                    let free = SERVING_PORTS
                        .clone()
                        .find(|p| !used.contains(p))
                        .unwrap_or(SERVING_PORTS.start);
                    used.insert(free);
                    port = Some(free);
                    env.insert("PORT".into(), free.to_string());
                    env.insert("REPLICA_INDEX".into(), entry.unit.to_string());
                }
            }
            self.allocations.insert(
                id.clone(),
                Allocation {
                    id,
                    job_id: job_id.to_string(),
                    unit: entry.unit,
                    attempt: *attempt,
                    agent_id: entry.agent_id.clone(),
                    node: entry.node.clone(),
                    gpus: entry.gpus.clone(),
                    cpu_millis: entry.cpu_millis,
                    memory_bytes: entry.memory_bytes,
                    port,
                    fencing_term: term,
                    fencing_index: index,
                    phase: AllocationPhase::Pending,
                    stop_requested: false,
                    preempted: false,
                    env,
                    created_at_unix_ms: at,
                    updated_at_unix_ms: at,
                },
            );
        }
        if job.state == JobState::Pending {
            job.state = JobState::Running;
            job.updated_at_unix_ms = at;
        }
    }

    /// An agent's report. Only forward moves count; a report about a final allocation changes
    /// nothing.
    pub(crate) fn apply_allocation_update(
        &mut self,
        allocation_id: &str,
        phase: &AllocationPhase,
        at: u64,
    ) {
        let Some(allocation) = self.allocations.get_mut(allocation_id) else {
            return;
        };
        if allocation.is_final() {
            return;
        }
        // Forward only, except that a replica may go from healthy back to running (unhealthy).
        if *phase == AllocationPhase::Pending || allocation.phase == *phase {
            return;
        }
        allocation.phase = phase.clone();
        allocation.updated_at_unix_ms = at;
        if allocation.is_final() {
            let allocation = allocation.clone();
            self.unit_ended(&allocation, at);
        }
    }

    /// Every unfinished allocation on a down agent is lost.
    pub(crate) fn agent_lost(&mut self, agent_id: &str, at: u64) {
        let lost: Vec<String> = self
            .allocations
            .values()
            .filter(|a| a.agent_id == agent_id && !a.is_final())
            .map(|a| a.id.clone())
            .collect();
        for allocation_id in lost {
            let phase = AllocationPhase::Lost {
                reason: format!("agent {agent_id} is down"),
            };
            self.apply_allocation_update(&allocation_id, &phase, at);
        }
    }

    pub(crate) fn stop_job_allocations(&mut self, job_id: &str, at: u64) {
        for allocation in self
            .allocations
            .values_mut()
            .filter(|a| a.job_id == job_id && !a.is_final())
        {
            if !allocation.stop_requested {
                allocation.stop_requested = true;
                allocation.updated_at_unix_ms = at;
            }
        }
    }

    fn fail_job(&mut self, job_id: &str, reason: String, at: u64) {
        if let Some(job) = self.jobs.get_mut(job_id) {
            job.state = JobState::Failed;
            job.failure = Some(reason);
            job.updated_at_unix_ms = at;
        }
        self.stop_job_allocations(job_id, at);
    }

    /// What a unit's end means for its job.
    fn unit_ended(&mut self, allocation: &Allocation, at: u64) {
        let Some(job) = self.jobs.get(&allocation.job_id) else {
            return;
        };
        if job.state.is_final() || allocation.preempted || allocation.stop_requested {
            return;
        }
        let Some(spec) = spec_of(&job.spec_json) else {
            return;
        };
        let job_id = allocation.job_id.clone();
        let succeeded = allocation.phase == AllocationPhase::Succeeded;
        let describe = || match &allocation.phase {
            AllocationPhase::Failed { exit_code, reason } => match exit_code {
                Some(code) => format!("exit code {code}: {reason}"),
                None => reason.clone(),
            },
            AllocationPhase::Lost { reason } => format!("lost: {reason}"),
            _ => String::new(),
        };
        match spec.kind {
            JobKind::Batch => {
                let job = self.jobs.get_mut(&job_id).expect("present");
                if succeeded {
                    job.succeeded_units.insert(allocation.unit);
                    if job.succeeded_units.len() as u32 >= spec.units() {
                        job.state = JobState::Succeeded;
                        job.updated_at_unix_ms = at;
                    }
                    return;
                }
                let retries = job.retries.entry(allocation.unit).or_insert(0);
                *retries += 1;
                let max_retries = spec.batch.as_ref().map(|b| b.max_retries).unwrap_or(0);
                if *retries > max_retries {
                    let reason = format!(
                        "shard {} failed {} time(s), more than max_retries {max_retries}: {}",
                        allocation.unit,
                        *retries,
                        describe()
                    );
                    self.fail_job(&job_id, reason, at);
                }
            }
            JobKind::Training => {
                if succeeded {
                    let job = self.jobs.get_mut(&job_id).expect("present");
                    job.succeeded_units.insert(allocation.unit);
                    if job.succeeded_units.len() as u32 >= spec.units() {
                        job.state = JobState::Succeeded;
                        job.updated_at_unix_ms = at;
                    }
                    return;
                }
                // One worker down takes the gang down; it is placed again whole.
                let job = self.jobs.get_mut(&job_id).expect("present");
                job.restarts += 1;
                job.succeeded_units.clear();
                let restarts = job.restarts;
                let max_restarts = spec.training.as_ref().map(|t| t.max_restarts).unwrap_or(0);
                if restarts > max_restarts {
                    let reason = format!("worker {} ended ({}); the gang restarted {} time(s), more than max_restarts {max_restarts}", allocation.unit, describe(), restarts);
                    self.fail_job(&job_id, reason, at);
                } else {
                    self.stop_job_allocations(&job_id, at);
                }
            }
            JobKind::Serving => {
                // A replica that ends is replaced; serving jobs run until cancelled.
                let job = self.jobs.get_mut(&job_id).expect("present");
                *job.retries.entry(allocation.unit).or_insert(0) += 1;
            }
        }
    }
}

/// Takes `entry`'s resources on its node in `view`, if they are there: the node exists and is
/// ready, has the CPU and memory, the GPUs exist, are free and are of the spec's model.
fn reserve(view: &mut ClusterView, entry: &PlacementEntry, spec: &JobSpec) -> bool {
    let key = NodeKey {
        agent_id: entry.agent_id.clone(),
        node: entry.node.clone(),
    };
    let Some(node) = view.nodes.iter_mut().find(|n| n.key == key) else {
        return false;
    };
    let needs_container = spec.image.is_some();
    let runtime_ok = node
        .runtimes
        .iter()
        .any(|r| !needs_container || *r != RuntimeKind::Process);
    let gpus_ok = entry.gpus.len() as u32 == spec.resources.n_gpus
        && entry.gpus.iter().collect::<BTreeSet<_>>().len() == entry.gpus.len()
        && entry.gpus.iter().all(|index| {
            !node.used_gpus.contains(index)
                && node.gpus.iter().any(|g| {
                    g.index == *index
                        && spec
                            .resources
                            .gpu_model
                            .as_ref()
                            .is_none_or(|m| &g.model == m)
                })
        });
    let fits = node.ready
        && runtime_ok
        && gpus_ok
        && node.used_cpu_millis + entry.cpu_millis <= node.cpu_millis
        && node.used_memory_bytes + entry.memory_bytes <= node.memory_bytes;
    if fits {
        node.used_cpu_millis += entry.cpu_millis;
        node.used_memory_bytes += entry.memory_bytes;
        node.used_gpus.extend(entry.gpus.iter().copied());
    }
    fits
}
