//! The allocation lifecycle in the replicated state: placements checked again on apply, reports
//! from agents, and what each kind of job does when a unit ends (a batch shard is retried, a
//! training gang restarts whole, a serving replica is replaced). Also the two views the leader's
//! scheduler pass reads: the cluster and the queue.
//!
//! Pure like the rest of the state machine: time is the leader's stamp on the entry, or (for the
//! queue's retry backoff, outside apply) the leader's clock passed in.

use super::scheduler::{ClusterView, GpuSlot, NodeKey, NodeState, QueuedJob, RunningUnit};
use super::state::{AgentState, JobState, Outcome, State};
use gantry_protocol::jobspec::{JobKind, JobSpec};
use gantry_protocol::replicated::PlacementEntry;
use gantry_protocol::{AllocationPhase, RuntimeKind};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// Ports given to serving replicas when an agent's register names none.
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
    /// The job's spec generation this allocation runs.
    pub generation: u32,
    /// For containers: the image resolved to a digest (or local image id) when the unit started.
    pub image: Option<String>,
    pub created_at_unix_ms: u64,
    pub updated_at_unix_ms: u64,
    /// When the unit was first reported running (or healthy): the stamp of the entry that said
    /// so. `None` while pending, and for a unit that ended without ever starting.
    pub started_at_unix_ms: Option<u64>,
    /// When it reached its final phase: the stamp of that entry.
    pub ended_at_unix_ms: Option<u64>,
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

/// Parsed specs remembered at most; the memo starts over beyond this.
impl State {
    /// Every allocation made for `job_id`, ended ones included.
    pub fn allocations_of<'a>(&'a self, job_id: &str) -> impl Iterator<Item = &'a Allocation> + 'a {
        self.allocations_by_job
            .get(job_id)
            .into_iter()
            .flatten()
            .map(|id| &self.allocations[id])
    }

    fn active_allocations_of<'a>(
        &'a self,
        job_id: &'a str,
    ) -> impl Iterator<Item = &'a Allocation> + 'a {
        self.allocations_of(job_id).filter(|a| !a.is_final())
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
            JobKind::Serving => {
                // Units without a replica of the current generation, within the surge: at most
                // `replicas + max_surge` replicas of any generation at once.
                let current: BTreeSet<u32> = self
                    .active_allocations_of(job_id)
                    .filter(|a| a.generation == job.generation)
                    .map(|a| a.unit)
                    .collect();
                let n_active = self.active_allocations_of(job_id).count() as u32;
                let surge = spec.serving.as_ref().map(|s| s.max_surge).unwrap_or(1);
                let room = (spec.units() + surge).saturating_sub(n_active) as usize;
                (0..spec.units())
                    .filter(|unit| !current.contains(unit))
                    .filter(|unit| self.retry_due(job_id, *unit, now_unix_ms))
                    .take(room)
                    .collect()
            }
            JobKind::Batch => (0..spec.units())
                .filter(|unit| !active.contains(unit) && !job.succeeded_units.contains(unit))
                .filter(|unit| self.retry_due(job_id, *unit, now_unix_ms))
                .collect(),
        }
    }

    /// Whether a unit that failed before has waited out its backoff.
    fn retry_due(&self, job_id: &str, unit: u32, now_unix_ms: Option<u64>) -> bool {
        let Some(now) = now_unix_ms else { return true };
        let retries = self.jobs[job_id].retries.get(&unit).copied().unwrap_or(0);
        if retries == 0 {
            return true;
        }
        let last_end = self
            .allocations_of(job_id)
            .filter(|a| a.unit == unit)
            .map(|a| a.updated_at_unix_ms)
            .max()
            .unwrap_or(0);
        let backoff_ms = (1_000u64 << (retries - 1).min(16)).min(RETRY_BACKOFF_MAX_MS);
        now >= last_end + backoff_ms
    }

    /// A serving job's new spec: only the spec of a running serving job, with the same name and
    /// kind, may change.
    pub(crate) fn apply_update(&mut self, job_id: &str, spec_json: &str, at: u64) -> Outcome {
        let refuse = |reason: &str| Outcome::UpdateRefused {
            job_id: job_id.to_string(),
            reason: reason.to_string(),
        };
        let Some(job) = self.jobs.get(job_id) else {
            return Outcome::JobNotFound {
                job_id: job_id.to_string(),
            };
        };
        if job.state.is_final() {
            return refuse("the job has ended");
        }
        let (Some(old), Some(new)) = (job.spec(), serde_json::from_str::<JobSpec>(spec_json).ok())
        else {
            return refuse("the spec does not decode");
        };
        if old.kind != JobKind::Serving || new.kind != JobKind::Serving {
            return refuse("only serving jobs roll over to a new spec; submit a new job instead");
        }
        if old.name != new.name || old.team != new.team {
            return refuse("name and team cannot change");
        }
        if job.spec_json == spec_json {
            return Outcome::JobUpdated {
                job_id: job_id.to_string(),
                generation: job.generation,
            };
        }
        let inputs = match self.admit(&new) {
            Ok(inputs) => inputs,
            Err(refusal) => return refusal,
        };
        let job = self.jobs.get_mut(job_id).expect("checked above");
        job.inputs = inputs;
        job.set_spec_json(spec_json);
        job.generation += 1;
        job.updated_at_unix_ms = at;
        let generation = job.generation;
        self.roll(job_id, at);
        Outcome::JobUpdated {
            job_id: job_id.to_string(),
            generation,
        }
    }

    /// Moves a serving job's replicas towards its current generation: an old replica is stopped
    /// once a healthy replica of the new generation serves its unit, or sooner while enough
    /// replicas stay healthy (`replicas - max_unavailable`); replicas beyond `replicas` go.
    fn roll(&mut self, job_id: &str, at: u64) {
        let Some(job) = self.jobs.get(job_id) else {
            return;
        };
        let Some(spec) = job.spec() else {
            return;
        };
        let Some(serving) = spec.serving.as_ref() else {
            return;
        };
        let generation = job.generation;
        let replicas = spec.units();
        let live: Vec<Allocation> = self
            .active_allocations_of(job_id)
            .filter(|a| !a.stop_requested)
            .cloned()
            .collect();
        let healthy_new: BTreeSet<u32> = live
            .iter()
            .filter(|a| a.generation == generation && a.phase == AllocationPhase::Healthy)
            .map(|a| a.unit)
            .collect();
        let mut healthy = live
            .iter()
            .filter(|a| a.phase == AllocationPhase::Healthy)
            .count() as u32;
        let floor = replicas.saturating_sub(serving.max_unavailable);
        let mut to_stop = Vec::new();
        for old in live.iter().filter(|a| a.generation < generation) {
            let replaced = healthy_new.contains(&old.unit) || old.unit >= replicas;
            let old_healthy = old.phase == AllocationPhase::Healthy;
            let affordable = !old_healthy || healthy > floor;
            if replaced || affordable {
                if old_healthy {
                    healthy = healthy.saturating_sub(1);
                }
                to_stop.push(old.id.clone());
            }
        }
        for id in to_stop {
            if let Some(allocation) = self.allocations.get_mut(&id) {
                allocation.stop_requested = true;
                allocation.updated_at_unix_ms = at;
            }
        }
    }

    /// The work waiting to be placed, as the scheduler takes it.
    pub fn queue(&self, now_unix_ms: u64) -> Vec<QueuedJob> {
        let mut queue = Vec::new();
        let live = self.live_jobs.iter().filter_map(|id| self.jobs.get(id));
        for job in live.filter(|j| !j.state.is_final()) {
            let Some(spec) = job.spec() else {
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
        let live = self.live_allocations.iter().map(|id| &self.allocations[id]);
        for allocation in live.filter(|a| !a.is_final()) {
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
                .and_then(|job| job.spec())
                .map(|spec| (spec.team.clone(), spec.priority, spec.preemptible))
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
                allocation.ended_at_unix_ms = Some(at);
                self.live_allocations.remove(allocation_id);
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
            let Some(spec) = job.spec() else {
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
        // Ports in use per host, for serving replicas: keyed by hostname, since several agents
        // (or a host agent beside a cluster's node) can share one host and its ports.
        let hostname_of =
            |agents: &BTreeMap<String, super::state::AgentRecord>, agent_id: &str, node: &str| {
                agents
                    .get(agent_id)
                    .and_then(|a| a.register.nodes.iter().find(|n| n.name == node))
                    .map(|n| n.hostname.clone())
                    .unwrap_or_else(|| format!("{agent_id}/{node}"))
            };
        let mut ports: BTreeMap<String, BTreeSet<u16>> = BTreeMap::new();
        let live = self.live_allocations.iter().map(|id| &self.allocations[id]);
        for allocation in live.filter(|a| !a.is_final()) {
            if let Some(port) = allocation.port {
                ports
                    .entry(hostname_of(
                        &self.agents,
                        &allocation.agent_id,
                        &allocation.node,
                    ))
                    .or_default()
                    .insert(port);
            }
        }
        let ranges: BTreeMap<String, (u16, u16)> = self
            .agents
            .iter()
            .map(|(id, agent)| (id.clone(), agent.register.serving_ports))
            .collect();
        let hosts: BTreeMap<(String, String), String> = entries
            .iter()
            .map(|e| {
                (
                    (e.agent_id.clone(), e.node.clone()),
                    hostname_of(&self.agents, &e.agent_id, &e.node),
                )
            })
            .collect();
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
                    let used = ports.entry(hosts[&node_key].clone()).or_default();
                    let (low, high) = ranges
                        .get(&node_key.0)
                        .copied()
                        .unwrap_or((SERVING_PORTS.start, SERVING_PORTS.end - 1));
                    let free = (low..=high).find(|p| !used.contains(p)).unwrap_or(low);
                    used.insert(free);
                    port = Some(free);
                    env.insert("PORT".into(), free.to_string());
                    env.insert("REPLICA_INDEX".into(), entry.unit.to_string());
                }
            }
            self.allocations_by_job
                .entry(job_id.to_string())
                .or_default()
                .insert(id.clone());
            self.live_allocations.insert(id.clone());
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
                    generation: job.generation,
                    image: None,
                    created_at_unix_ms: at,
                    updated_at_unix_ms: at,
                    started_at_unix_ms: None,
                    ended_at_unix_ms: None,
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
            self.live_allocations.remove(allocation_id);
        }
        if matches!(phase, AllocationPhase::Running | AllocationPhase::Healthy) {
            allocation.started_at_unix_ms.get_or_insert(at);
        }
        let job_id = allocation.job_id.clone();
        if allocation.is_final() {
            allocation.ended_at_unix_ms = Some(at);
            let allocation = allocation.clone();
            self.unit_ended(&allocation, at);
        }
        if self.jobs.get(&job_id).is_some_and(|job| job.generation > 0) {
            self.roll(&job_id, at);
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

    /// An agent re-registered without some of the nodes it had (a Kubernetes node left its
    /// cluster): what ran there is lost.
    pub(crate) fn nodes_gone(&mut self, agent_id: &str, nodes: &[String], at: u64) {
        let lost: Vec<String> = self
            .allocations
            .values()
            .filter(|a| a.agent_id == agent_id && !a.is_final() && !nodes.contains(&a.node))
            .map(|a| a.id.clone())
            .collect();
        for allocation_id in lost {
            let node = self.allocations[&allocation_id].node.clone();
            let phase = AllocationPhase::Lost {
                reason: format!("node {node} left agent {agent_id}"),
            };
            self.apply_allocation_update(&allocation_id, &phase, at);
        }
    }

    pub(crate) fn stop_job_allocations(&mut self, job_id: &str, at: u64) {
        let ids = self.allocations_by_job.get(job_id).into_iter().flatten();
        for id in ids {
            let allocation = self
                .allocations
                .get_mut(id)
                .expect("the index names only allocations that exist");
            if !allocation.is_final() && !allocation.stop_requested {
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
            self.live_jobs.remove(job_id);
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
        let Some(spec) = job.spec() else {
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
                        self.live_jobs.remove(&job_id);
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
                        self.live_jobs.remove(&job_id);
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
                // A replica that ends is replaced (unless a newer generation took over); serving
                // jobs run until cancelled.
                let job = self.jobs.get_mut(&job_id).expect("present");
                if allocation.generation == job.generation {
                    *job.retries.entry(allocation.unit).or_insert(0) += 1;
                }
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
        .any(|r| needs_container == (*r != RuntimeKind::Process));
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

#[cfg(test)]
mod tests {
    use super::*;
    use gantry_protocol::replicated::{Command, Op};
    use gantry_protocol::{NodeCapacity, Register, RuntimeKind, RuntimeReport, SiteKind};

    struct World {
        state: State,
        index: u64,
    }

    impl World {
        fn new() -> Self {
            let mut world = Self {
                state: State::default(),
                index: 0,
            };
            let register = Register {
                name: "host".into(),
                software_version: "test".into(),
                site: "s".into(),
                site_kind: SiteKind::OnPrem,
                cost_per_gpu_hour: 0.0,
                cost_per_cpu_hour: 0.0,
                labels: Default::default(),
                runtimes: vec![RuntimeReport {
                    kind: RuntimeKind::Process,
                    detail: String::new(),
                }],
                serving_ports: (31_000, 32_999),
                address: None,
                nodes: vec![NodeCapacity {
                    name: "local".into(),
                    hostname: "host".into(),
                    os: String::new(),
                    arch: String::new(),
                    cpu_cores: 16,
                    memory_bytes: 64 << 30,
                    disk_bytes: 0,
                    disk_free_bytes: 0,
                    gpus: Vec::new(),
                }],
            };
            world.apply(Op::AgentRegistered {
                agent_id: "a".into(),
                register,
            });
            world
        }

        fn apply(&mut self, op: Op) -> Outcome {
            self.index += 1;
            let command = Command {
                request_id: self.index,
                at_unix_ms: self.index * 1000,
                actor: "test".into(),
                op,
            };
            self.state.apply(self.index, &command)
        }

        /// Places what the queue wants, on the one node.
        fn place(&mut self) -> Vec<u32> {
            let queue = self.state.queue(u64::MAX / 2);
            let placements: Vec<PlacementEntry> = queue
                .iter()
                .flat_map(|job| {
                    job.units.iter().map(|&unit| PlacementEntry {
                        job_id: job.job_id.clone(),
                        unit,
                        agent_id: "a".into(),
                        node: "local".into(),
                        gpus: Vec::new(),
                        cpu_millis: 100,
                        memory_bytes: 1 << 20,
                    })
                })
                .collect();
            let units = placements.iter().map(|p| p.unit).collect();
            self.apply(Op::Place {
                term: 1,
                placements,
                preemptions: Vec::new(),
            });
            units
        }

        fn set_all(&mut self, from: AllocationPhase, to: AllocationPhase) {
            let ids: Vec<String> = self
                .state
                .allocations
                .values()
                .filter(|a| a.phase == from && !a.stop_requested)
                .map(|a| a.id.clone())
                .collect();
            for allocation_id in ids {
                self.apply(Op::AllocationUpdate {
                    allocation_id,
                    phase: to.clone(),
                });
            }
        }

        /// Agents confirm every requested stop.
        fn confirm_stops(&mut self) {
            let ids: Vec<String> = self
                .state
                .allocations
                .values()
                .filter(|a| a.stop_requested && !a.is_final())
                .map(|a| a.id.clone())
                .collect();
            for allocation_id in ids {
                self.apply(Op::AllocationUpdate {
                    allocation_id,
                    phase: AllocationPhase::Failed {
                        exit_code: None,
                        reason: "stopped".into(),
                    },
                });
            }
        }

        fn healthy_count(&self) -> usize {
            self.state
                .allocations
                .values()
                .filter(|a| a.phase == AllocationPhase::Healthy && !a.stop_requested)
                .count()
        }
    }

    fn serving(version: &str) -> String {
        let value = serde_json::json!({ "name": "web", "kind": "serving", "command": ["serve"], "env": { "VERSION": version },
            "resources": { "cpus": 0.1, "memory": "1MiB" }, "serving": { "replicas": 3, "max_surge": 1, "max_unavailable": 0 } });
        gantry_protocol::jobspec::from_json_value(value)
            .unwrap()
            .canonical_json()
    }

    #[test]
    fn a_rolling_update_never_drops_below_the_replica_count_and_ends_on_the_new_spec() {
        let mut world = World::new();
        world.apply(Op::SubmitJob {
            job_id: "web".into(),
            idempotency_key: None,
            spec_json: serving("1"),
        });
        assert_eq!(world.place(), vec![0, 1, 2]);
        world.set_all(AllocationPhase::Pending, AllocationPhase::Running);
        world.set_all(AllocationPhase::Running, AllocationPhase::Healthy);
        assert_eq!(world.healthy_count(), 3);

        let outcome = world.apply(Op::UpdateJob {
            job_id: "web".into(),
            spec_json: serving("2"),
        });
        assert_eq!(
            outcome,
            Outcome::JobUpdated {
                job_id: "web".into(),
                generation: 1
            }
        );
        for round in 0..3 {
            // max_surge 1: one new replica at a time, and no old one stopped before it is healthy.
            assert_eq!(world.place().len(), 1, "round {round}");
            assert_eq!(
                world.healthy_count(),
                3,
                "round {round}: max_unavailable 0 keeps every replica up"
            );
            world.set_all(AllocationPhase::Pending, AllocationPhase::Running);
            world.set_all(AllocationPhase::Running, AllocationPhase::Healthy);
            assert_eq!(
                world.healthy_count(),
                3,
                "round {round}: the replaced old replica is stopping"
            );
            world.confirm_stops();
        }
        assert!(world.place().is_empty(), "done rolling");
        let live: Vec<&Allocation> = world
            .state
            .allocations
            .values()
            .filter(|a| !a.is_final())
            .collect();
        assert_eq!(live.len(), 3);
        assert!(live
            .iter()
            .all(|a| a.generation == 1 && a.phase == AllocationPhase::Healthy));
    }

    /// The allocation's id, then its (started, ended) stamps after each step.
    fn stamps(world: &World) -> Vec<(String, Option<u64>, Option<u64>)> {
        world
            .state
            .allocations
            .values()
            .map(|a| (a.id.clone(), a.started_at_unix_ms, a.ended_at_unix_ms))
            .collect()
    }

    #[test]
    fn start_and_end_are_the_stamps_of_the_entries_that_reported_them() {
        let mut world = World::new();
        let batch = gantry_protocol::jobspec::from_json_value(serde_json::json!({
            "name": "b", "kind": "batch", "command": ["x"], "batch": { "shards": 2 }
        }))
        .unwrap()
        .canonical_json();
        world.apply(Op::SubmitJob {
            job_id: "b".into(),
            idempotency_key: None,
            spec_json: batch,
        });
        world.place(); // entry 3, at 3000
        let none = |id: &str| (id.to_string(), None, None);
        assert_eq!(stamps(&world), vec![none("b-0-1"), none("b-1-1")]);

        let update = |allocation_id: &str, phase: AllocationPhase| Op::AllocationUpdate {
            allocation_id: allocation_id.into(),
            phase,
        };
        world.apply(update("b-0-1", AllocationPhase::Running)); // at 4000
        world.apply(update("b-0-1", AllocationPhase::Running)); // a repeat moves nothing
        world.apply(update("b-0-1", AllocationPhase::Succeeded)); // at 6000
                                                                  // Lost while still pending: it never started, and it ended.
        world.apply(update(
            "b-1-1",
            AllocationPhase::Lost {
                reason: "agent down".into(),
            },
        )); // at 7000
        world.apply(update("b-0-1", AllocationPhase::Running)); // after the end: ignored
        assert_eq!(
            stamps(&world),
            vec![
                ("b-0-1".into(), Some(4000), Some(6000)),
                ("b-1-1".into(), None, Some(7000)),
            ]
        );
    }

    #[test]
    fn a_replica_keeps_its_start_through_unhealthy_spells() {
        let mut world = World::new();
        world.apply(Op::SubmitJob {
            job_id: "web".into(),
            idempotency_key: None,
            spec_json: serving("1"),
        });
        world.place();
        world.set_all(AllocationPhase::Pending, AllocationPhase::Healthy); // entries 4-6
        world.set_all(AllocationPhase::Healthy, AllocationPhase::Running); // unhealthy
        world.set_all(AllocationPhase::Running, AllocationPhase::Healthy);
        let started: Vec<Option<u64>> = stamps(&world).iter().map(|s| s.1).collect();
        assert_eq!(started, vec![Some(4000), Some(5000), Some(6000)]);
        assert!(stamps(&world).iter().all(|s| s.2.is_none()));
    }

    #[test]
    fn only_running_serving_jobs_take_a_new_spec() {
        let mut world = World::new();
        let batch = gantry_protocol::jobspec::from_json_value(
            serde_json::json!({ "name": "b", "kind": "batch", "command": ["x"] }),
        )
        .unwrap()
        .canonical_json();
        world.apply(Op::SubmitJob {
            job_id: "b".into(),
            idempotency_key: None,
            spec_json: batch.clone(),
        });
        assert!(matches!(
            world.apply(Op::UpdateJob {
                job_id: "b".into(),
                spec_json: batch
            }),
            Outcome::UpdateRefused { .. }
        ));
        assert!(matches!(
            world.apply(Op::UpdateJob {
                job_id: "nope".into(),
                spec_json: serving("1")
            }),
            Outcome::JobNotFound { .. }
        ));
    }
}
