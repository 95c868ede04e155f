//! What the Kubernetes runtime knows of the cluster and what follows from it, without I/O. The
//! nodes and pods it watches go in (`handle_*`), and out come the capacity to report
//! ([`Tracker::capacities`]) and [`Action`]s: events for the agent and objects to delete. Time
//! is an argument (milliseconds on the caller's monotonic clock).
//!
//! Each allocation is a [`Unit`]: registered by `start` (or adopted by `recover`), fed the state
//! of its pods, and ended exactly once: by itself (an exit, a failure the pod shows, a timeout),
//! as lost (its pod or node went away without Gantry asking), or stopped (Gantry asked).

use super::manifests::{
    Workload, CONTAINER_NAME, GPU_RESOURCE, LABEL_ALLOCATION, LABEL_MANAGED_BY, MANAGED_BY,
};
use super::quantity::{quantity_millis, quantity_units};
use crate::runtime::{Exit, Recovered, RuntimeEvent};
use gantry_protocol::{Gpu, GpuSource, NodeCapacity};
use k8s_openapi::api::core::v1::{ContainerStateTerminated, Node, Pod};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use std::collections::{BTreeMap, BTreeSet};

/// A coordinator takes at most this many nodes in a registration; more are left out (with a
/// warning from the caller).
pub const NODES_MAX: usize = 10_000;
/// Node labels from NVIDIA GPU feature discovery.
pub const LABEL_GPU_PRODUCT: &str = "nvidia.com/gpu.product";
pub const LABEL_GPU_MEMORY_MIB: &str = "nvidia.com/gpu.memory";
const LABEL_HOSTNAME: &str = "kubernetes.io/hostname";
const LABEL_OS: &str = "kubernetes.io/os";
const LABEL_ARCH: &str = "kubernetes.io/arch";
/// The exit code Kubernetes reports for a container killed for memory (128 + SIGKILL).
const OOM_EXIT_CODE: i32 = 137;

#[derive(Debug, Clone)]
pub struct TrackerConfig {
    /// Where Gantry's objects are; its pods elsewhere are other work.
    pub namespace: String,
    /// A pod the scheduler reports unschedulable this long has failed.
    pub unschedulable_timeout_ms: u64,
    /// A Job or Deployment that shows no pod this long after it was created has failed.
    pub pod_appear_timeout_ms: u64,
    /// A serving replica running but not ready this long has failed (never became ready, or
    /// stopped being ready), so that the coordinator replaces it.
    pub unready_timeout_ms: u64,
    /// How long a Pod or Job that ended by itself is kept, so its logs can be read.
    pub ended_retention_ms: u64,
    /// How long a job's Service outlives the job's last unit here (a rolling update that stops
    /// the old replica before starting the new one keeps its Service and its cluster IP).
    pub service_linger_ms: u64,
}

/// What the runtime shell must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Emit(RuntimeEvent),
    /// Delete the allocation's workload (and with it, its pods).
    DeleteWorkload {
        allocation_id: String,
        workload: Workload,
    },
    /// Delete the job's Service: no unit of the job is left here.
    DeleteJobService {
        job_id: String,
    },
}

/// A unit as `start` registers it or `recover` finds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnitInfo {
    pub allocation_id: String,
    pub job_id: String,
    /// The node it is pinned to.
    pub node: String,
    pub workload: Workload,
}

/// An allocation's objects found by `recover`.
#[derive(Debug, Clone, PartialEq)]
pub struct Found {
    pub info: UnitInfo,
    /// For a Job: how it ended, from its conditions (for when its pod is gone).
    pub job_outcome: Option<Exit>,
}

/// What a pod shows, reduced to what Gantry reports.
#[derive(Debug, Clone, PartialEq)]
pub enum PodState {
    /// Not running yet; `unschedulable` holds the scheduler's message while it cannot place it.
    Pending {
        unschedulable: Option<String>,
    },
    Running {
        ready: bool,
    },
    /// It cannot run and never did (its image cannot be used, its container cannot be made).
    Refused(String),
    Ended(Exit),
}

/// How a stop goes on, for the shell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StopPlan {
    pub workload: Workload,
    /// The unit had ended already (its objects were kept for logs): delete, report nothing.
    pub already_ended: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Requests {
    cpu_millis: u128,
    memory_bytes: u64,
    ephemeral_bytes: u64,
    n_gpus: u64,
}

impl Requests {
    fn add(&mut self, other: &Requests) {
        self.cpu_millis = self.cpu_millis.saturating_add(other.cpu_millis);
        self.memory_bytes = self.memory_bytes.saturating_add(other.memory_bytes);
        self.ephemeral_bytes = self.ephemeral_bytes.saturating_add(other.ephemeral_bytes);
        self.n_gpus = self.n_gpus.saturating_add(other.n_gpus);
    }

    fn sub(&mut self, other: &Requests) {
        self.cpu_millis = self.cpu_millis.saturating_sub(other.cpu_millis);
        self.memory_bytes = self.memory_bytes.saturating_sub(other.memory_bytes);
        self.ephemeral_bytes = self.ephemeral_bytes.saturating_sub(other.ephemeral_bytes);
        self.n_gpus = self.n_gpus.saturating_sub(other.n_gpus);
    }

    fn max(&mut self, other: &Requests) {
        self.cpu_millis = self.cpu_millis.max(other.cpu_millis);
        self.memory_bytes = self.memory_bytes.max(other.memory_bytes);
        self.ephemeral_bytes = self.ephemeral_bytes.max(other.ephemeral_bytes);
        self.n_gpus = self.n_gpus.max(other.n_gpus);
    }
}

/// One pod as the tracker keeps it.
#[derive(Debug, Clone)]
struct PodEntry {
    node: Option<String>,
    requests: Requests,
    /// Counted against its node's capacity: bound, not finished, and not Gantry's own (the
    /// coordinator counts those).
    counted: bool,
    /// Gantry's own: the allocation, what the pod shows and its image id.
    unit: Option<(String, PodState, Option<String>)>,
}

#[derive(Debug)]
struct Unit {
    info: UnitInfo,
    registered_ms: u64,
    /// Names of its pods that exist now.
    pods: BTreeSet<String>,
    seen_pod: bool,
    started: bool,
    healthy: bool,
    unready_since_ms: Option<u64>,
    unschedulable: Option<(u64, String)>,
    stopping: bool,
    /// Set once its end was reported; its objects are deleted at this time.
    delete_at_ms: Option<u64>,
}

pub struct Tracker {
    config: TrackerConfig,
    nodes: BTreeMap<String, Node>,
    pods: BTreeMap<(String, String), PodEntry>,
    /// Requests of the counted pods, by node.
    used: BTreeMap<String, Requests>,
    units: BTreeMap<String, Unit>,
    /// Jobs whose Service no unit here needs any more, since when.
    orphaned_services: BTreeMap<String, u64>,
}

impl Tracker {
    pub fn new(config: TrackerConfig) -> Self {
        Self {
            config,
            nodes: BTreeMap::new(),
            pods: BTreeMap::new(),
            used: BTreeMap::new(),
            units: BTreeMap::new(),
            orphaned_services: BTreeMap::new(),
        }
    }

    // --- getters ---

    /// One entry per node Gantry may place work on, by name, with what other work leaves free.
    pub fn capacities(&self) -> Vec<NodeCapacity> {
        self.nodes
            .iter()
            .filter(|(_, node)| unschedulable_reason(node).is_none())
            .take(NODES_MAX)
            .map(|(name, node)| {
                capacity(name, node, self.used.get(name).copied().unwrap_or_default())
            })
            .collect()
    }

    /// Schedulable nodes beyond what a registration can carry.
    pub fn nodes_left_out(&self) -> usize {
        self.nodes
            .values()
            .filter(|node| unschedulable_reason(node).is_none())
            .count()
            .saturating_sub(NODES_MAX)
    }

    /// Allocations that have not ended (stopping ones included), sorted.
    pub fn running(&self) -> Vec<String> {
        self.units
            .iter()
            .filter(|(_, unit)| unit.delete_at_ms.is_none())
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Whether a stopping unit's pods are all gone.
    pub fn is_gone(&self, allocation_id: &str) -> bool {
        self.units
            .get(allocation_id)
            .is_none_or(|unit| unit.pods.is_empty())
    }

    // --- units: start, stop, recover ---

    /// Registers a unit `start` is about to create; what its pods already show (a start that an
    /// agent restart cut short left them) is taken in at once. False when the allocation is known
    /// already (an assignment delivered twice): nothing is to be created.
    pub fn register(&mut self, info: UnitInfo, now_ms: u64) -> (bool, Vec<Action>) {
        let allocation_id = info.allocation_id.clone();
        if !self.insert_unit(info, now_ms) {
            return (false, Vec::new());
        }
        let actions = self
            .pod_states(&allocation_id)
            .into_iter()
            .flat_map(|(_, state, image)| self.observe_unit(&allocation_id, state, image, now_ms))
            .collect();
        (true, actions)
    }

    /// Whether a unit that `start` just created is still wanted (no stop came in between).
    pub fn is_wanted(&self, allocation_id: &str) -> bool {
        self.units
            .get(allocation_id)
            .is_some_and(|unit| !unit.stopping)
    }

    fn pod_states(&self, allocation_id: &str) -> Vec<(String, PodState, Option<String>)> {
        self.pods
            .iter()
            .filter_map(|((_, name), entry)| match &entry.unit {
                Some((id, state, image)) if id == allocation_id => {
                    Some((name.clone(), state.clone(), image.clone()))
                }
                _ => None,
            })
            .collect()
    }

    fn insert_unit(&mut self, info: UnitInfo, now_ms: u64) -> bool {
        if self.units.contains_key(&info.allocation_id) {
            return false;
        }
        self.orphaned_services.remove(&info.job_id);
        let allocation_id = info.allocation_id.clone();
        let pods: BTreeSet<String> = self
            .pods
            .iter()
            .filter(|(_, entry)| {
                entry
                    .unit
                    .as_ref()
                    .is_some_and(|(id, _, _)| *id == allocation_id)
            })
            .map(|((_, name), _)| name.clone())
            .collect();
        self.units.insert(
            allocation_id,
            Unit {
                info,
                registered_ms: now_ms,
                seen_pod: !pods.is_empty(),
                pods,
                started: false,
                healthy: false,
                unready_since_ms: None,
                unschedulable: None,
                stopping: false,
                delete_at_ms: None,
            },
        );
        true
    }

    /// Forgets a unit whose objects could not be created (`start` failed and says why).
    pub fn unregister(&mut self, allocation_id: &str, now_ms: u64) {
        self.remove_unit(allocation_id, now_ms);
    }

    /// Gantry asks for the unit to stop: from now on its pods' going is expected.
    pub fn begin_stop(&mut self, allocation_id: &str) -> Option<StopPlan> {
        let unit = self.units.get_mut(allocation_id)?;
        unit.stopping = true;
        Some(StopPlan {
            workload: unit.info.workload,
            already_ended: unit.delete_at_ms.is_some(),
        })
    }

    /// The stopped unit's objects are gone (or the wait for them is over).
    pub fn finish_stop(&mut self, allocation_id: &str, now_ms: u64) -> Vec<Action> {
        let Some(unit) = self.units.get(allocation_id) else {
            return Vec::new();
        };
        let mut actions = Vec::new();
        if unit.delete_at_ms.is_none() {
            actions.push(Action::Emit(RuntimeEvent::Exited {
                allocation_id: allocation_id.to_string(),
                exit: Exit::Stopped,
            }));
        }
        self.remove_unit(allocation_id, now_ms);
        actions
    }

    /// Takes up what an earlier run of the agent left: each allocation found is adopted when
    /// its pod runs or may still run, and reported ended (its objects deleted) otherwise. Jobs
    /// whose Service no allocation needs lose it.
    pub fn adopt(
        &mut self,
        found: Vec<Found>,
        service_jobs: Vec<String>,
        now_ms: u64,
    ) -> (Vec<(String, Recovered)>, Vec<Action>) {
        let mut recovered = Vec::new();
        let mut actions = Vec::new();
        for Found { info, job_outcome } in found {
            let allocation_id = info.allocation_id.clone();
            if self.units.contains_key(&allocation_id)
                || recovered.iter().any(|(id, _)| *id == allocation_id)
            {
                continue;
            }
            let states = self.pod_states(&allocation_id);
            let alive = states.iter().any(|(_, state, _)| {
                matches!(state, PodState::Pending { .. } | PodState::Running { .. })
            });
            let ended = states.iter().find_map(|(_, state, _)| match state {
                PodState::Ended(exit) => Some(exit.clone()),
                PodState::Refused(reason) => Some(Exit::Failed {
                    exit_code: None,
                    reason: reason.clone(),
                }),
                _ => None,
            });
            let ended = if alive {
                None
            } else if states.is_empty() {
                job_outcome
            } else {
                ended
            };
            if let Some(exit) = ended {
                actions.push(Action::DeleteWorkload {
                    allocation_id: allocation_id.clone(),
                    workload: info.workload,
                });
                recovered.push((allocation_id, Recovered::Ended(exit)));
                continue;
            }
            let image = states.iter().find_map(|(_, _, image)| image.clone());
            self.insert_unit(info, now_ms);
            if let Some(unit) = self.units.get_mut(&allocation_id) {
                unit.started = true;
            }
            for (_, state, image) in states {
                actions.extend(self.observe_unit(&allocation_id, state, image, now_ms));
            }
            recovered.push((allocation_id, Recovered::Running { image }));
        }
        let needed: BTreeSet<&str> = self
            .units
            .values()
            .map(|unit| unit.info.job_id.as_str())
            .collect();
        let orphaned: BTreeSet<String> = service_jobs
            .into_iter()
            .filter(|job_id| !needed.contains(job_id.as_str()))
            .collect();
        actions.extend(
            orphaned
                .into_iter()
                .map(|job_id| Action::DeleteJobService { job_id }),
        );
        (recovered, actions)
    }

    // --- what the watches see ---

    /// A full list of the nodes (at start, or after the watch had to start over).
    pub fn handle_nodes_listed(&mut self, nodes: Vec<Node>, now_ms: u64) -> Vec<Action> {
        let listed: BTreeSet<String> = nodes.iter().filter_map(node_name).collect();
        let gone: Vec<String> = self
            .nodes
            .keys()
            .filter(|name| !listed.contains(*name))
            .cloned()
            .collect();
        let mut actions = Vec::new();
        for name in gone {
            actions.extend(self.handle_node_deleted(&name, now_ms));
        }
        for node in nodes {
            actions.extend(self.handle_node(node, now_ms));
        }
        actions
    }

    pub fn handle_node(&mut self, node: Node, now_ms: u64) -> Vec<Action> {
        let Some(name) = node_name(&node) else {
            return Vec::new();
        };
        let was_schedulable = self
            .nodes
            .get(&name)
            .is_some_and(|old| unschedulable_reason(old).is_none());
        let why_not = unschedulable_reason(&node);
        self.nodes.insert(name.clone(), node);
        match why_not {
            Some(why) if was_schedulable => {
                self.lose_units_on(&name, &format!("node {name} {why}"), now_ms)
            }
            _ => Vec::new(),
        }
    }

    pub fn handle_node_deleted(&mut self, name: &str, now_ms: u64) -> Vec<Action> {
        let Some(old) = self.nodes.remove(name) else {
            return Vec::new();
        };
        if unschedulable_reason(&old).is_some() {
            return Vec::new();
        }
        self.lose_units_on(name, &format!("node {name} left the cluster"), now_ms)
    }

    /// A full list of the pods (at start, or after the watch had to start over).
    pub fn handle_pods_listed(&mut self, pods: Vec<Pod>, now_ms: u64) -> Vec<Action> {
        let listed: BTreeSet<(String, String)> = pods.iter().filter_map(pod_key).collect();
        let gone: Vec<(String, String)> = self
            .pods
            .keys()
            .filter(|key| !listed.contains(*key))
            .cloned()
            .collect();
        let mut actions = Vec::new();
        for key in gone {
            actions.extend(self.remove_pod(&key, now_ms));
        }
        for pod in pods {
            actions.extend(self.handle_pod(pod, now_ms));
        }
        actions
    }

    pub fn handle_pod(&mut self, pod: Pod, now_ms: u64) -> Vec<Action> {
        let Some(key) = pod_key(&pod) else {
            return Vec::new();
        };
        let phase = pod
            .status
            .as_ref()
            .and_then(|status| status.phase.as_deref())
            .unwrap_or("Pending");
        let finished = matches!(phase, "Succeeded" | "Failed");
        let node = pod.spec.as_ref().and_then(|spec| spec.node_name.clone());
        let allocation = self.allocation_of(&pod);
        let unit = allocation.map(|allocation_id| {
            let (state, image) = observe(&pod);
            (allocation_id, state, image)
        });
        let entry = PodEntry {
            counted: node.is_some() && !finished && unit.is_none(),
            node,
            requests: pod_requests(&pod),
            unit,
        };
        self.upsert_pod(key.clone(), entry.clone());
        let Some((allocation_id, state, image)) = entry.unit else {
            return Vec::new();
        };
        if let Some(unit) = self.units.get_mut(&allocation_id) {
            unit.pods.insert(key.1);
        }
        self.observe_unit(&allocation_id, state, image, now_ms)
    }

    /// The pod is gone; `pod` is its last state.
    pub fn handle_pod_deleted(&mut self, pod: Pod, now_ms: u64) -> Vec<Action> {
        let Some(key) = pod_key(&pod) else {
            return Vec::new();
        };
        // Its last state first: a pod that finished and was deleted at once still ended so.
        let mut actions = self.handle_pod(pod, now_ms);
        actions.extend(self.remove_pod(&key, now_ms));
        actions
    }

    // --- time ---

    /// Timeouts and deletions that are due.
    pub fn poll(&mut self, now_ms: u64) -> Vec<Action> {
        let mut actions = Vec::new();
        let mut ends = Vec::new();
        let mut due = Vec::new();
        for (allocation_id, unit) in &self.units {
            if let Some(delete_at_ms) = unit.delete_at_ms {
                if delete_at_ms <= now_ms && !unit.stopping {
                    due.push(allocation_id.clone());
                }
                continue;
            }
            if unit.stopping {
                continue;
            }
            let config = &self.config;
            let reason = if let Some((since, message)) = &unit.unschedulable {
                (now_ms.saturating_sub(*since) >= config.unschedulable_timeout_ms).then(|| {
                    format!(
                        "Kubernetes cannot schedule it on node {}: {message}",
                        unit.info.node
                    )
                })
            } else if !unit.seen_pod
                && now_ms.saturating_sub(unit.registered_ms) >= config.pod_appear_timeout_ms
            {
                Some(format!(
                    "no pod appeared for {} {} within {} s",
                    unit.info.workload.kind(),
                    super::manifests::workload_name(allocation_id),
                    config.pod_appear_timeout_ms / 1000
                ))
            } else if let Some(since) = unit.unready_since_ms {
                (now_ms.saturating_sub(since) >= config.unready_timeout_ms).then(|| {
                    format!(
                        "its readiness probe has not passed for {} s",
                        config.unready_timeout_ms / 1000
                    )
                })
            } else {
                None
            };
            if let Some(reason) = reason {
                ends.push((allocation_id.clone(), reason));
            }
        }
        for (allocation_id, reason) in ends {
            let exit = Exit::Failed {
                exit_code: None,
                reason,
            };
            actions.extend(self.end_unit(&allocation_id, exit, true, now_ms));
        }
        for allocation_id in due {
            actions.extend(self.delete_unit(&allocation_id, now_ms));
        }
        let linger_ms = self.config.service_linger_ms;
        let expired: Vec<String> = self
            .orphaned_services
            .iter()
            .filter(|(_, since)| now_ms.saturating_sub(**since) >= linger_ms)
            .map(|(job_id, _)| job_id.clone())
            .collect();
        for job_id in expired {
            self.orphaned_services.remove(&job_id);
            actions.push(Action::DeleteJobService { job_id });
        }
        actions
    }

    // --- internals ---

    fn allocation_of(&self, pod: &Pod) -> Option<String> {
        if pod.metadata.namespace.as_deref() != Some(self.config.namespace.as_str()) {
            return None;
        }
        let labels = pod.metadata.labels.as_ref()?;
        if labels.get(LABEL_MANAGED_BY).map(String::as_str) != Some(MANAGED_BY) {
            return None;
        }
        labels.get(LABEL_ALLOCATION).cloned()
    }

    fn upsert_pod(&mut self, key: (String, String), entry: PodEntry) {
        if let Some(old) = self.pods.insert(key, entry.clone()) {
            self.uncount(&old);
        }
        if let (true, Some(node)) = (entry.counted, &entry.node) {
            self.used
                .entry(node.clone())
                .or_default()
                .add(&entry.requests);
        }
    }

    fn uncount(&mut self, entry: &PodEntry) {
        if let (true, Some(node)) = (entry.counted, &entry.node) {
            if let Some(used) = self.used.get_mut(node) {
                used.sub(&entry.requests);
                if *used == Requests::default() {
                    self.used.remove(node);
                }
            }
        }
    }

    fn remove_pod(&mut self, key: &(String, String), now_ms: u64) -> Vec<Action> {
        let Some(entry) = self.pods.remove(key) else {
            return Vec::new();
        };
        self.uncount(&entry);
        let Some((allocation_id, _, _)) = entry.unit else {
            return Vec::new();
        };
        let Some(unit) = self.units.get_mut(&allocation_id) else {
            return Vec::new();
        };
        unit.pods.remove(&key.1);
        if unit.stopping || unit.delete_at_ms.is_some() || !unit.pods.is_empty() {
            return Vec::new();
        }
        let reason = format!("its pod {} was deleted, and not by Gantry", key.1);
        self.end_unit(&allocation_id, Exit::Lost(reason), true, now_ms)
    }

    /// What a pod of the unit shows now becomes events.
    fn observe_unit(
        &mut self,
        allocation_id: &str,
        state: PodState,
        image: Option<String>,
        now_ms: u64,
    ) -> Vec<Action> {
        let Some(unit) = self.units.get_mut(allocation_id) else {
            return Vec::new();
        };
        if unit.stopping || unit.delete_at_ms.is_some() {
            return Vec::new();
        }
        unit.seen_pod = true;
        let mut actions = Vec::new();
        let started = |unit: &mut Unit, actions: &mut Vec<Action>| {
            if !unit.started {
                unit.started = true;
                actions.push(Action::Emit(RuntimeEvent::Started {
                    allocation_id: allocation_id.to_string(),
                    image: image.clone(),
                }));
            }
        };
        match state {
            PodState::Pending { unschedulable } => {
                unit.unschedulable = match (unschedulable, unit.unschedulable.take()) {
                    (Some(message), Some((since, _))) => Some((since, message)),
                    (Some(message), None) => Some((now_ms, message)),
                    (None, _) => None,
                };
            }
            PodState::Running { ready } => {
                unit.unschedulable = None;
                started(unit, &mut actions);
                if unit.info.workload == Workload::Deployment {
                    if ready != unit.healthy {
                        unit.healthy = ready;
                        actions.push(Action::Emit(RuntimeEvent::Health {
                            allocation_id: allocation_id.to_string(),
                            healthy: ready,
                        }));
                    }
                    unit.unready_since_ms = if ready {
                        None
                    } else {
                        Some(unit.unready_since_ms.unwrap_or(now_ms))
                    };
                }
            }
            PodState::Refused(reason) => {
                let exit = Exit::Failed {
                    exit_code: None,
                    reason,
                };
                actions.extend(self.end_unit(allocation_id, exit, true, now_ms));
            }
            PodState::Ended(exit) => {
                let ran = matches!(
                    exit,
                    Exit::Code(_)
                        | Exit::Failed {
                            exit_code: Some(_),
                            ..
                        }
                );
                if ran {
                    started(unit, &mut actions);
                }
                let at_once = unit.info.workload == Workload::Deployment;
                actions.extend(self.end_unit(allocation_id, exit, at_once, now_ms));
            }
        }
        actions
    }

    /// Reports the unit's end and arranges for its objects to go: now, or after the retention
    /// (so that its logs can still be read).
    fn end_unit(
        &mut self,
        allocation_id: &str,
        exit: Exit,
        at_once: bool,
        now_ms: u64,
    ) -> Vec<Action> {
        let Some(unit) = self.units.get_mut(allocation_id) else {
            return Vec::new();
        };
        debug_assert!(unit.delete_at_ms.is_none(), "a unit ends once");
        let mut actions = vec![Action::Emit(RuntimeEvent::Exited {
            allocation_id: allocation_id.to_string(),
            exit,
        })];
        if at_once {
            actions.extend(self.delete_unit(allocation_id, now_ms));
        } else {
            unit.delete_at_ms = Some(now_ms.saturating_add(self.config.ended_retention_ms));
        }
        actions
    }

    fn delete_unit(&mut self, allocation_id: &str, now_ms: u64) -> Vec<Action> {
        let Some(workload) = self.units.get(allocation_id).map(|u| u.info.workload) else {
            return Vec::new();
        };
        self.remove_unit(allocation_id, now_ms);
        vec![Action::DeleteWorkload {
            allocation_id: allocation_id.to_string(),
            workload,
        }]
    }

    fn remove_unit(&mut self, allocation_id: &str, now_ms: u64) {
        let Some(unit) = self.units.remove(allocation_id) else {
            return;
        };
        let job_id = unit.info.job_id;
        let has_service = unit.info.workload != Workload::Job;
        if has_service && !self.units.values().any(|u| u.info.job_id == job_id) {
            self.orphaned_services.entry(job_id).or_insert(now_ms);
        }
    }

    fn lose_units_on(&mut self, node: &str, reason: &str, now_ms: u64) -> Vec<Action> {
        let lost: Vec<String> = self
            .units
            .iter()
            .filter(|(_, unit)| {
                unit.info.node == node && !unit.stopping && unit.delete_at_ms.is_none()
            })
            .map(|(id, _)| id.clone())
            .collect();
        let mut actions = Vec::new();
        for allocation_id in lost {
            actions.extend(self.end_unit(
                &allocation_id,
                Exit::Lost(reason.to_string()),
                true,
                now_ms,
            ));
        }
        actions
    }
}

fn node_name(node: &Node) -> Option<String> {
    node.metadata.name.clone()
}

fn pod_key(pod: &Pod) -> Option<(String, String)> {
    Some((
        pod.metadata.namespace.clone().unwrap_or_default(),
        pod.metadata.name.clone()?,
    ))
}

/// Why Gantry may not place work on the node (`None`: it may): cordoned, not Ready, or tainted
/// with a NoSchedule or NoExecute taint its pods do not tolerate (they tolerate only
/// `nvidia.com/gpu`).
pub fn unschedulable_reason(node: &Node) -> Option<String> {
    if node
        .spec
        .as_ref()
        .and_then(|spec| spec.unschedulable)
        .unwrap_or(false)
    {
        return Some("was cordoned".into());
    }
    let ready = node
        .status
        .as_ref()
        .and_then(|status| status.conditions.as_ref())
        .and_then(|conditions| conditions.iter().find(|c| c.type_ == "Ready"));
    match ready {
        Some(condition) if condition.status == "True" => {}
        Some(condition) => {
            let reason = condition.reason.as_deref().unwrap_or("no reason given");
            return Some(format!("is not Ready ({reason})"));
        }
        None => return Some("reports no Ready condition".into()),
    }
    let taint = node
        .spec
        .as_ref()
        .and_then(|spec| spec.taints.as_ref())
        .and_then(|taints| {
            taints.iter().find(|taint| {
                matches!(taint.effect.as_str(), "NoSchedule" | "NoExecute")
                    && taint.key != GPU_RESOURCE
            })
        });
    taint.map(|taint| {
        format!(
            "is tainted {}{}:{}",
            taint.key,
            taint
                .value
                .as_deref()
                .map(|value| format!("={value}"))
                .unwrap_or_default(),
            taint.effect
        )
    })
}

fn quantity_of(resources: Option<&BTreeMap<String, Quantity>>, name: &str) -> Option<u128> {
    quantity_millis(&resources?.get(name)?.0)
}

fn units_of(resources: Option<&BTreeMap<String, Quantity>>, name: &str) -> u64 {
    resources
        .and_then(|r| r.get(name))
        .and_then(|q| quantity_units(&q.0))
        .unwrap_or(0)
}

/// What the pod holds on its node, as the Kubernetes scheduler counts it: the larger of its
/// containers' sum and its largest init container, plus its overhead. A container without a
/// request for a resource is taken at its limit (what the API server would have defaulted).
fn pod_requests(pod: &Pod) -> Requests {
    let Some(spec) = &pod.spec else {
        return Requests::default();
    };
    let of_container = |container: &k8s_openapi::api::core::v1::Container| {
        let resources = container.resources.as_ref();
        let requests = resources.and_then(|r| r.requests.as_ref());
        let limits = resources.and_then(|r| r.limits.as_ref());
        let either = |name: &str| {
            quantity_of(requests, name)
                .or_else(|| quantity_of(limits, name))
                .unwrap_or(0)
        };
        let units = |name: &str| u64::try_from(either(name).div_ceil(1000)).unwrap_or(u64::MAX);
        Requests {
            cpu_millis: either("cpu"),
            memory_bytes: units("memory"),
            ephemeral_bytes: units("ephemeral-storage"),
            n_gpus: units(GPU_RESOURCE),
        }
    };
    let mut total = Requests::default();
    for container in &spec.containers {
        total.add(&of_container(container));
    }
    for init in spec.init_containers.iter().flatten() {
        total.max(&of_container(init));
    }
    let overhead = spec.overhead.as_ref();
    total.add(&Requests {
        cpu_millis: quantity_of(overhead, "cpu").unwrap_or(0),
        memory_bytes: units_of(overhead, "memory"),
        ephemeral_bytes: units_of(overhead, "ephemeral-storage"),
        n_gpus: 0,
    });
    total
}

fn capacity(name: &str, node: &Node, used: Requests) -> NodeCapacity {
    let status = node.status.as_ref();
    let allocatable = status.and_then(|s| s.allocatable.as_ref());
    let total = status.and_then(|s| s.capacity.as_ref());
    let labels = node.metadata.labels.clone().unwrap_or_default();
    let info = status.and_then(|s| s.node_info.as_ref());
    let cpu_millis = quantity_of(allocatable, "cpu")
        .unwrap_or(0)
        .saturating_sub(used.cpu_millis);
    let n_gpus = units_of(allocatable, GPU_RESOURCE).saturating_sub(used.n_gpus);
    let model = labels
        .get(LABEL_GPU_PRODUCT)
        .cloned()
        .unwrap_or_else(|| "unknown".into());
    let gpu_memory_bytes = labels
        .get(LABEL_GPU_MEMORY_MIB)
        .and_then(|mib| mib.parse::<u64>().ok())
        .map_or(0, |mib| mib.saturating_mul(1 << 20));
    let hostname = labels
        .get(LABEL_HOSTNAME)
        .cloned()
        .or_else(|| {
            status
                .and_then(|s| s.addresses.as_ref())
                .and_then(|addresses| addresses.iter().find(|a| a.type_ == "Hostname"))
                .map(|address| address.address.clone())
        })
        .unwrap_or_else(|| name.to_string());
    let from_info = |value: Option<&String>, label: &str| {
        value
            .filter(|v| !v.is_empty())
            .or_else(|| labels.get(label))
            .cloned()
            .unwrap_or_else(|| "unknown".into())
    };
    NodeCapacity {
        name: name.to_string(),
        hostname,
        os: from_info(info.map(|i| &i.operating_system), LABEL_OS),
        arch: from_info(info.map(|i| &i.architecture), LABEL_ARCH),
        cpu_cores: u32::try_from(cpu_millis / 1000).unwrap_or(u32::MAX),
        memory_bytes: units_of(allocatable, "memory").saturating_sub(used.memory_bytes),
        disk_bytes: units_of(total, "ephemeral-storage"),
        disk_free_bytes: units_of(allocatable, "ephemeral-storage")
            .saturating_sub(used.ephemeral_bytes),
        gpus: (0..u32::try_from(n_gpus).unwrap_or(u32::MAX))
            .map(|index| Gpu {
                index,
                model: model.clone(),
                memory_bytes: gpu_memory_bytes,
                uuid: None,
                // The cluster's labels declare them; the agent cannot see the devices.
                source: GpuSource::Declared,
            })
            .collect(),
    }
}

/// What the pod shows, and the image id its container runs (`name@sha256:...` or
/// `sha256:...`, without a runtime's `docker-pullable://` prefix).
pub fn observe(pod: &Pod) -> (PodState, Option<String>) {
    let status = pod.status.as_ref();
    let phase = status.and_then(|s| s.phase.as_deref()).unwrap_or("Pending");
    let main = status
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|statuses| {
            statuses
                .iter()
                .find(|c| c.name == CONTAINER_NAME)
                .or_else(|| statuses.first())
        });
    let image_id = main
        .map(|c| {
            c.image_id
                .trim_start_matches("docker-pullable://")
                .trim_start_matches("docker://")
                .to_string()
        })
        .filter(|id| !id.is_empty());
    let image = main
        .map(|c| c.image.clone())
        .filter(|image| !image.is_empty())
        .or_else(|| {
            pod.spec
                .as_ref()
                .and_then(|spec| spec.containers.first())
                .and_then(|c| c.image.clone())
        })
        .unwrap_or_default();
    let message_of = |message: Option<&String>| {
        message
            .map(|m| m.trim().to_string())
            .filter(|m| !m.is_empty())
            .unwrap_or_else(|| "no message".into())
    };
    let state = (|| {
        if status.and_then(|s| s.reason.as_deref()) == Some("Evicted") {
            return PodState::Ended(Exit::Failed {
                exit_code: None,
                reason: format!(
                    "evicted by Kubernetes: {}",
                    message_of(status.and_then(|s| s.message.as_ref()))
                ),
            });
        }
        let current = main.and_then(|c| c.state.as_ref());
        let terminated = current
            .and_then(|s| s.terminated.as_ref())
            .or_else(|| main.and_then(|c| c.last_state.as_ref()?.terminated.as_ref()));
        if let Some(oom) = terminated.filter(|t| t.reason.as_deref() == Some("OOMKilled")) {
            let limit = pod
                .spec
                .as_ref()
                .and_then(|spec| spec.containers.first())
                .and_then(|c| {
                    c.resources
                        .as_ref()?
                        .limits
                        .as_ref()?
                        .get("memory")
                        .cloned()
                });
            let limit = limit.map_or_else(String::new, |q| format!(" of {}", q.0));
            return PodState::Ended(Exit::Failed {
                exit_code: Some(if oom.exit_code == 0 {
                    OOM_EXIT_CODE
                } else {
                    oom.exit_code
                }),
                reason: format!("killed for using more than its memory limit{limit} (OOMKilled)"),
            });
        }
        if let Some(waiting) = current.and_then(|s| s.waiting.as_ref()) {
            let reason = waiting.reason.as_deref().unwrap_or_default();
            let message = message_of(waiting.message.as_ref());
            match reason {
                "ErrImagePull" | "ImagePullBackOff" | "ErrImageNeverPull" | "InvalidImageName" => {
                    return PodState::Refused(format!(
                        "the image {image} cannot be used ({reason}): {message}"
                    ))
                }
                "CreateContainerConfigError" | "CreateContainerError" | "RunContainerError" => {
                    return PodState::Refused(format!(
                        "the container cannot be created ({reason}): {message}"
                    ))
                }
                _ => {}
            }
        }
        let exit_of = |t: &ContainerStateTerminated| Exit::Code(t.exit_code);
        match phase {
            "Succeeded" => return PodState::Ended(terminated.map_or(Exit::Code(0), exit_of)),
            "Failed" => {
                return PodState::Ended(terminated.map_or_else(
                    || Exit::Failed {
                        exit_code: None,
                        reason: format!(
                            "the pod failed ({}): {}",
                            status
                                .and_then(|s| s.reason.as_deref())
                                .unwrap_or("no reason given"),
                            message_of(status.and_then(|s| s.message.as_ref()))
                        ),
                    },
                    exit_of,
                ))
            }
            _ => {}
        }
        // A container that ended in a pod that would restart it (a Deployment's): the
        // replica's end, whatever Kubernetes does next.
        if let Some(terminated) = terminated {
            return PodState::Ended(exit_of(terminated));
        }
        if phase == "Running" && current.and_then(|s| s.running.as_ref()).is_some() {
            let ready = status
                .and_then(|s| s.conditions.as_ref())
                .and_then(|conditions| conditions.iter().find(|c| c.type_ == "Ready"))
                .is_some_and(|c| c.status == "True");
            return PodState::Running { ready };
        }
        let unschedulable = status
            .and_then(|s| s.conditions.as_ref())
            .and_then(|conditions| {
                conditions.iter().find(|c| {
                    c.type_ == "PodScheduled"
                        && c.status == "False"
                        && c.reason.as_deref() == Some("Unschedulable")
                })
            })
            .map(|c| message_of(c.message.as_ref()));
        PodState::Pending { unschedulable }
    })();
    (state, image_id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    const MINUTE_MS: u64 = 60_000;

    fn config() -> TrackerConfig {
        TrackerConfig {
            namespace: "gantry".into(),
            unschedulable_timeout_ms: 30_000,
            pod_appear_timeout_ms: 60_000,
            unready_timeout_ms: 60_000,
            ended_retention_ms: 10 * MINUTE_MS,
            service_linger_ms: MINUTE_MS,
        }
    }

    fn node(name: &str, allocatable: Value, labels: Value) -> Node {
        serde_json::from_value(json!({
            "metadata": { "name": name, "labels": labels },
            "status": {
                "allocatable": allocatable,
                "capacity": { "ephemeral-storage": "100Gi" },
                "conditions": [{ "type": "Ready", "status": "True" }],
                "nodeInfo": { "operatingSystem": "linux", "architecture": "amd64" },
            },
        }))
        .unwrap()
    }

    fn plain_node(name: &str) -> Node {
        node(name, json!({ "cpu": "8", "memory": "32Gi" }), json!({}))
    }

    /// A pod on `node` requesting `requests`; Gantry's when `allocation` is given.
    fn pod(
        namespace: &str,
        name: &str,
        allocation: Option<&str>,
        node: Option<&str>,
        requests: Value,
        status: Value,
    ) -> Pod {
        let labels = match allocation {
            Some(allocation) => json!({
                "app.kubernetes.io/managed-by": "gantry", "gantry.job": "j-1", "gantry.allocation": allocation,
            }),
            None => json!({ "app": "other" }),
        };
        serde_json::from_value(json!({
            "metadata": { "name": name, "namespace": namespace, "labels": labels },
            "spec": {
                "nodeName": node,
                "containers": [{ "name": "main", "image": "img:1", "resources": { "requests": requests, "limits": { "memory": "1Gi" } } }],
            },
            "status": status,
        }))
        .unwrap()
    }

    fn ours(name: &str, allocation: &str, status: Value) -> Pod {
        pod(
            "gantry",
            name,
            Some(allocation),
            Some("node-a"),
            json!({}),
            status,
        )
    }

    fn running(ready: bool) -> Value {
        json!({
            "phase": "Running",
            "conditions": [{ "type": "Ready", "status": if ready { "True" } else { "False" } }],
            "containerStatuses": [{
                "name": "main", "image": "img:1", "imageID": "docker-pullable://img@sha256:abc",
                "ready": ready, "restartCount": 0, "state": { "running": {} },
            }],
        })
    }

    fn terminated(phase: &str, exit_code: i32, reason: &str) -> Value {
        json!({
            "phase": phase,
            "containerStatuses": [{
                "name": "main", "image": "img:1", "imageID": "img@sha256:abc", "ready": false, "restartCount": 0,
                "state": { "terminated": { "exitCode": exit_code, "reason": reason } },
            }],
        })
    }

    fn waiting(reason: &str, message: &str) -> Value {
        json!({
            "phase": "Pending",
            "containerStatuses": [{
                "name": "main", "image": "img:1", "imageID": "", "ready": false, "restartCount": 0,
                "state": { "waiting": { "reason": reason, "message": message } },
            }],
        })
    }

    fn unschedulable(message: &str) -> Value {
        json!({
            "phase": "Pending",
            "conditions": [{ "type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": message }],
        })
    }

    fn failed(exit_code: Option<i32>, reason: &str) -> Exit {
        Exit::Failed {
            exit_code,
            reason: reason.into(),
        }
    }

    #[test]
    fn pod_status_reads_as_gantry_reports_it() {
        let cases: Vec<(Value, PodState)> = vec![
            (json!({ "phase": "Pending" }), PodState::Pending { unschedulable: None }),
            (
                unschedulable("0/3 nodes are available: 3 Insufficient cpu."),
                PodState::Pending {
                    unschedulable: Some("0/3 nodes are available: 3 Insufficient cpu.".into()),
                },
            ),
            (running(false), PodState::Running { ready: false }),
            (running(true), PodState::Running { ready: true }),
            (terminated("Succeeded", 0, "Completed"), PodState::Ended(Exit::Code(0))),
            (terminated("Failed", 3, "Error"), PodState::Ended(Exit::Code(3))),
            (
                terminated("Failed", 137, "OOMKilled"),
                PodState::Ended(failed(
                    Some(137),
                    "killed for using more than its memory limit of 1Gi (OOMKilled)",
                )),
            ),
            (
                json!({ "phase": "Failed", "reason": "Evicted", "message": "The node was low on resource: memory." }),
                PodState::Ended(failed(
                    None,
                    "evicted by Kubernetes: The node was low on resource: memory.",
                )),
            ),
            (
                json!({ "phase": "Failed", "reason": "OutOfcpu", "message": "Node didn't have enough resource: cpu" }),
                PodState::Ended(failed(
                    None,
                    "the pod failed (OutOfcpu): Node didn't have enough resource: cpu",
                )),
            ),
            (
                waiting("ErrImagePull", "pull access denied"),
                PodState::Refused("the image img:1 cannot be used (ErrImagePull): pull access denied".into()),
            ),
            (
                waiting("ImagePullBackOff", "Back-off pulling image \"img:1\""),
                PodState::Refused(
                    "the image img:1 cannot be used (ImagePullBackOff): Back-off pulling image \"img:1\"".into(),
                ),
            ),
            (
                waiting("ErrImageNeverPull", "Container image \"img:1\" is not present with pull policy of Never"),
                PodState::Refused("the image img:1 cannot be used (ErrImageNeverPull): Container image \"img:1\" is not present with pull policy of Never".into()),
            ),
            (
                waiting("ContainerCreating", ""),
                PodState::Pending { unschedulable: None },
            ),
            // A Deployment's container that exited and is being restarted: the replica ended.
            (
                json!({
                    "phase": "Running",
                    "containerStatuses": [{
                        "name": "main", "image": "img:1", "imageID": "img@sha256:abc", "ready": false, "restartCount": 1,
                        "state": { "waiting": { "reason": "CrashLoopBackOff" } },
                        "lastState": { "terminated": { "exitCode": 2, "reason": "Error" } },
                    }],
                }),
                PodState::Ended(Exit::Code(2)),
            ),
        ];
        for (status, expected) in cases {
            let (state, _) = observe(&ours("p", "a", status.clone()));
            assert_eq!(state, expected, "{status}");
        }
        let (_, image) = observe(&ours("p", "a", running(true)));
        assert_eq!(
            image.as_deref(),
            Some("img@sha256:abc"),
            "the runtime's prefix goes"
        );
    }

    #[test]
    fn nodes_report_what_other_work_leaves_free() {
        let mut tracker = Tracker::new(config());
        let gpu_labels = json!({
            "nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB", "nvidia.com/gpu.memory": "81920",
            "kubernetes.io/hostname": "gpu-host-1",
        });
        let nodes = vec![
            node(
                "gpu-1",
                json!({ "cpu": "63900m", "memory": "500Gi", "nvidia.com/gpu": "4", "ephemeral-storage": "90Gi" }),
                gpu_labels,
            ),
            plain_node("cpu-1"),
        ];
        let _ = tracker.handle_nodes_listed(nodes, 0);
        let other = json!({ "cpu": "1500m", "memory": "2Gi", "nvidia.com/gpu": "1" });
        let _ = tracker.handle_pods_listed(
            vec![
                pod(
                    "ml",
                    "other-1",
                    None,
                    Some("gpu-1"),
                    other.clone(),
                    json!({ "phase": "Running" }),
                ),
                // Not counted: finished, not yet bound, or Gantry's own (the coordinator counts those).
                pod(
                    "ml",
                    "done",
                    None,
                    Some("gpu-1"),
                    other.clone(),
                    json!({ "phase": "Succeeded" }),
                ),
                pod(
                    "ml",
                    "unbound",
                    None,
                    None,
                    other.clone(),
                    json!({ "phase": "Pending" }),
                ),
                pod(
                    "gantry",
                    "mine",
                    Some("j-1-0-1"),
                    Some("gpu-1"),
                    other.clone(),
                    running(true),
                ),
                // Gantry's label in another namespace is someone else's work.
                pod(
                    "elsewhere",
                    "theirs",
                    Some("j-9-0-1"),
                    Some("cpu-1"),
                    json!({ "cpu": "2" }),
                    running(true),
                ),
            ],
            0,
        );
        let capacities = tracker.capacities();
        let names: Vec<&str> = capacities.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, ["cpu-1", "gpu-1"]);
        let gpu = &capacities[1];
        assert_eq!(
            (gpu.hostname.as_str(), gpu.os.as_str(), gpu.arch.as_str()),
            ("gpu-host-1", "linux", "amd64")
        );
        assert_eq!(gpu.cpu_cores, 62, "63.9 - 1.5 cores, rounded down");
        assert_eq!(gpu.memory_bytes, 498 << 30);
        assert_eq!(gpu.disk_bytes, 100 << 30);
        assert_eq!(gpu.disk_free_bytes, 90 << 30);
        assert_eq!(gpu.gpus.len(), 3, "one of four taken by other work");
        assert!(gpu.gpus.iter().all(|g| g.model == "NVIDIA-A100-SXM4-80GB"
            && g.memory_bytes == 81920 << 20
            && g.uuid.is_none()));
        assert_eq!(
            gpu.gpus.iter().map(|g| g.index).collect::<Vec<_>>(),
            [0, 1, 2]
        );
        assert_eq!(capacities[0].cpu_cores, 6, "8 - 2 cores");
        assert!(capacities[0].gpus.is_empty());

        // The other pod ends: its room comes back.
        let _ = tracker.handle_pod(
            pod(
                "ml",
                "other-1",
                None,
                Some("gpu-1"),
                other,
                json!({ "phase": "Failed" }),
            ),
            1,
        );
        assert_eq!(tracker.capacities()[1].gpus.len(), 4);
        assert_eq!(tracker.capacities()[1].cpu_cores, 63);

        // GPUs without feature discovery labels are of an unknown model.
        let _ = tracker.handle_node(
            node(
                "gpu-2",
                json!({ "cpu": "8", "memory": "8Gi", "nvidia.com/gpu": "1" }),
                json!({}),
            ),
            2,
        );
        let unknown = &tracker.capacities()[2];
        assert_eq!(unknown.hostname, "gpu-2");
        assert_eq!(
            (unknown.gpus[0].model.as_str(), unknown.gpus[0].memory_bytes),
            ("unknown", 0)
        );
    }

    #[test]
    fn only_schedulable_nodes_are_offered() {
        let with = |patch: Value| {
            let mut value = serde_json::to_value(plain_node("n")).unwrap();
            json_patch(&mut value, patch);
            serde_json::from_value::<Node>(value).unwrap()
        };
        let cases = [
            (json!({}), None),
            (
                json!({ "spec": { "unschedulable": true } }),
                Some("was cordoned"),
            ),
            (
                json!({ "status": { "conditions": [{ "type": "Ready", "status": "False", "reason": "KubeletNotReady" }] } }),
                Some("is not Ready (KubeletNotReady)"),
            ),
            (
                json!({ "spec": { "taints": [{ "key": "node-role.kubernetes.io/control-plane", "effect": "NoSchedule" }] } }),
                Some("is tainted node-role.kubernetes.io/control-plane:NoSchedule"),
            ),
            (
                json!({ "spec": { "taints": [{ "key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule" }] } }),
                None,
            ),
            (
                json!({ "spec": { "taints": [{ "key": "spot", "effect": "PreferNoSchedule" }] } }),
                None,
            ),
        ];
        for (patch, expected) in cases {
            assert_eq!(
                unschedulable_reason(&with(patch.clone())).as_deref(),
                expected,
                "{patch}"
            );
        }
    }

    /// Merges `patch` into `value` (objects merge, everything else replaces).
    fn json_patch(value: &mut Value, patch: Value) {
        match (value, patch) {
            (Value::Object(target), Value::Object(patch)) => {
                for (key, patch) in patch {
                    json_patch(target.entry(key).or_insert(Value::Null), patch);
                }
            }
            (target, patch) => *target = patch,
        }
    }

    fn info(allocation_id: &str, workload: Workload) -> UnitInfo {
        UnitInfo {
            allocation_id: allocation_id.into(),
            job_id: "j-1".into(),
            node: "node-a".into(),
            workload,
        }
    }

    fn started(allocation_id: &str) -> Action {
        Action::Emit(RuntimeEvent::Started {
            allocation_id: allocation_id.into(),
            image: Some("img@sha256:abc".into()),
        })
    }

    fn exited(allocation_id: &str, exit: Exit) -> Action {
        Action::Emit(RuntimeEvent::Exited {
            allocation_id: allocation_id.into(),
            exit,
        })
    }

    fn delete(allocation_id: &str, workload: Workload) -> Action {
        Action::DeleteWorkload {
            allocation_id: allocation_id.into(),
            workload,
        }
    }

    fn tracker_with_node_a() -> Tracker {
        let mut tracker = Tracker::new(config());
        let _ = tracker.handle_nodes_listed(vec![plain_node("node-a"), plain_node("node-b")], 0);
        tracker
    }

    #[test]
    fn a_shard_runs_ends_and_is_kept_for_its_logs() {
        let mut tracker = tracker_with_node_a();
        assert_eq!(
            tracker.register(info("s", Workload::Job), 0),
            (true, vec![])
        );
        assert_eq!(
            tracker.register(info("s", Workload::Job), 1),
            (false, vec![]),
            "a second start is a no-op"
        );
        assert_eq!(
            tracker.handle_pod(ours("s-x", "s", json!({ "phase": "Pending" })), 10),
            []
        );
        assert_eq!(
            tracker.handle_pod(ours("s-x", "s", running(false)), 20),
            [started("s")]
        );
        assert_eq!(tracker.running(), ["s"]);
        assert_eq!(
            tracker.handle_pod(
                ours("s-x", "s", terminated("Succeeded", 0, "Completed")),
                30
            ),
            [exited("s", Exit::Code(0))]
        );
        assert!(tracker.running().is_empty());
        assert_eq!(
            tracker.poll(30 + 10 * MINUTE_MS - 1),
            [],
            "kept for its logs"
        );
        assert_eq!(
            tracker.poll(30 + 10 * MINUTE_MS),
            [delete("s", Workload::Job)]
        );
        assert_eq!(
            tracker.handle_pod_deleted(ours("s-x", "s", terminated("Succeeded", 0, "")), 40),
            [],
            "its own deletion is no news"
        );
    }

    #[test]
    fn a_unit_registered_again_takes_in_what_its_pods_show() {
        let mut tracker = tracker_with_node_a();
        // A start cut short by an agent restart left a pod that has ended since.
        let _ = tracker.handle_pod(ours("s-x", "s", terminated("Succeeded", 0, "")), 1);
        assert_eq!(
            tracker.register(info("s", Workload::Job), 2),
            (true, vec![started("s"), exited("s", Exit::Code(0))])
        );
        // A stop while the objects are being created: the start must not leave them running.
        tracker.register(info("t", Workload::Pod), 3);
        assert!(tracker.is_wanted("t"));
        tracker.begin_stop("t");
        assert!(!tracker.is_wanted("t"));
        assert!(!tracker.is_wanted("unknown"));
    }

    #[test]
    fn a_pod_that_finished_before_it_was_seen_running_still_reports_its_start() {
        let mut tracker = tracker_with_node_a();
        tracker.register(info("s", Workload::Job), 0);
        assert_eq!(
            tracker.handle_pod(ours("s-x", "s", terminated("Failed", 3, "Error")), 5),
            [started("s"), exited("s", Exit::Code(3))]
        );
    }

    #[test]
    fn failures_the_pod_shows_end_the_unit_and_delete_it() {
        let image = failed(
            None,
            "the image img:1 cannot be used (ErrImageNeverPull): absent",
        );
        let cases = [
            (
                waiting("ErrImageNeverPull", "absent"),
                vec![exited("s", image), delete("s", Workload::Job)],
            ),
            (
                json!({ "phase": "Failed", "reason": "Evicted", "message": "low on memory" }),
                vec![exited(
                    "s",
                    failed(None, "evicted by Kubernetes: low on memory"),
                )],
            ),
            (
                terminated("Failed", 137, "OOMKilled"),
                vec![
                    started("s"),
                    exited(
                        "s",
                        failed(
                            Some(137),
                            "killed for using more than its memory limit of 1Gi (OOMKilled)",
                        ),
                    ),
                ],
            ),
        ];
        for (status, expected) in cases {
            let mut tracker = tracker_with_node_a();
            tracker.register(info("s", Workload::Job), 0);
            let mut pod = ours("s-x", "s", status.clone());
            if let Some(spec) = pod.spec.as_mut() {
                spec.containers[0].resources =
                    serde_json::from_value(json!({ "limits": { "memory": "1Gi" } })).unwrap();
            }
            assert_eq!(tracker.handle_pod(pod, 1), expected, "{status}");
        }
    }

    #[test]
    fn an_unschedulable_pod_fails_after_the_bound_with_the_schedulers_message() {
        let mut tracker = tracker_with_node_a();
        tracker.register(info("w", Workload::Pod), 0);
        let message = "0/2 nodes are available: 1 Insufficient nvidia.com/gpu.";
        assert_eq!(
            tracker.handle_pod(ours("w", "w", unschedulable(message)), 1_000),
            []
        );
        assert_eq!(
            tracker.handle_pod(ours("w", "w", unschedulable(message)), 20_000),
            []
        );
        assert_eq!(tracker.poll(30_999), []);
        let reason = format!("Kubernetes cannot schedule it on node node-a: {message}");
        assert_eq!(
            tracker.poll(31_000),
            [
                exited("w", failed(None, &reason)),
                delete("w", Workload::Pod)
            ]
        );
    }

    #[test]
    fn a_workload_without_a_pod_fails_after_the_bound() {
        let mut tracker = tracker_with_node_a();
        tracker.register(info("s", Workload::Job), 0);
        assert_eq!(tracker.poll(59_999), []);
        assert_eq!(
            tracker.poll(60_000),
            [
                exited(
                    "s",
                    failed(None, "no pod appeared for Job gantry-s within 60 s")
                ),
                delete("s", Workload::Job)
            ]
        );
    }

    #[test]
    fn a_pod_or_node_gone_without_gantry_asking_is_lost() {
        let mut tracker = tracker_with_node_a();
        tracker.register(info("a", Workload::Pod), 0);
        tracker.register(info("b", Workload::Job), 0);
        let mut on_b = info("c", Workload::Job);
        on_b.node = "node-b".into();
        tracker.register(on_b, 0);
        for (name, allocation) in [("a", "a"), ("b-x", "b"), ("c-x", "c")] {
            tracker.handle_pod(ours(name, allocation, running(false)), 1);
        }
        assert_eq!(
            tracker.handle_pod_deleted(ours("a", "a", running(false)), 2),
            [
                exited(
                    "a",
                    Exit::Lost("its pod a was deleted, and not by Gantry".into())
                ),
                delete("a", Workload::Pod)
            ]
        );
        assert_eq!(
            tracker.handle_node_deleted("node-a", 3),
            [
                exited("b", Exit::Lost("node node-a left the cluster".into())),
                delete("b", Workload::Job)
            ]
        );
        let mut cordoned = serde_json::to_value(plain_node("node-b")).unwrap();
        cordoned["spec"] = json!({ "unschedulable": true });
        assert_eq!(
            tracker.handle_node(serde_json::from_value(cordoned).unwrap(), 4),
            [
                exited("c", Exit::Lost("node node-b was cordoned".into())),
                delete("c", Workload::Job)
            ]
        );
        assert!(tracker.capacities().is_empty());
    }

    #[test]
    fn a_stop_waits_for_the_pods_and_the_service_lingers() {
        let mut tracker = tracker_with_node_a();
        tracker.register(info("r", Workload::Deployment), 0);
        tracker.handle_pod(ours("r-1", "r", running(true)), 1);
        let plan = tracker.begin_stop("r").unwrap();
        assert_eq!(plan.workload, Workload::Deployment);
        assert!(!plan.already_ended);
        assert!(!tracker.is_gone("r"));
        assert_eq!(
            tracker.handle_pod_deleted(ours("r-1", "r", running(false)), 2),
            [],
            "no Lost, no Health"
        );
        assert!(tracker.is_gone("r"));
        assert_eq!(tracker.finish_stop("r", 3), [exited("r", Exit::Stopped)]);
        assert!(tracker.running().is_empty());
        assert_eq!(tracker.poll(3 + MINUTE_MS - 1), []);
        // A new replica of the job within the linger keeps the Service.
        tracker.register(info("r2", Workload::Deployment), 10);
        assert_eq!(tracker.poll(3 + MINUTE_MS), []);
        tracker.begin_stop("r2");
        assert_eq!(tracker.finish_stop("r2", 20), [exited("r2", Exit::Stopped)]);
        assert_eq!(
            tracker.poll(20 + MINUTE_MS),
            [Action::DeleteJobService {
                job_id: "j-1".into()
            }]
        );
        assert!(tracker.begin_stop("unknown").is_none());
    }

    #[test]
    fn a_replica_reports_readiness_and_fails_when_it_stays_unready_or_restarts() {
        let health = |healthy| {
            Action::Emit(RuntimeEvent::Health {
                allocation_id: "r".into(),
                healthy,
            })
        };
        let mut tracker = tracker_with_node_a();
        tracker.register(info("r", Workload::Deployment), 0);
        assert_eq!(
            tracker.handle_pod(ours("r-1", "r", running(false)), 1_000),
            [started("r")]
        );
        assert_eq!(
            tracker.handle_pod(ours("r-1", "r", running(true)), 2_000),
            [health(true)]
        );
        assert_eq!(
            tracker.handle_pod(ours("r-1", "r", running(true)), 3_000),
            []
        );
        assert_eq!(
            tracker.handle_pod(ours("r-1", "r", running(false)), 4_000),
            [health(false)]
        );
        assert_eq!(tracker.poll(63_999), []);
        assert_eq!(
            tracker.poll(64_000),
            [
                exited(
                    "r",
                    failed(None, "its readiness probe has not passed for 60 s")
                ),
                delete("r", Workload::Deployment)
            ]
        );

        let mut tracker = tracker_with_node_a();
        tracker.register(info("r", Workload::Deployment), 0);
        tracker.handle_pod(ours("r-1", "r", running(true)), 1);
        let restarted = json!({
            "phase": "Running",
            "containerStatuses": [{
                "name": "main", "image": "img:1", "imageID": "img@sha256:abc", "ready": false, "restartCount": 1,
                "state": { "running": {} }, "lastState": { "terminated": { "exitCode": 1 } },
            }],
        });
        assert_eq!(
            tracker.handle_pod(ours("r-1", "r", restarted), 2),
            [
                exited("r", Exit::Code(1)),
                delete("r", Workload::Deployment)
            ],
            "a Deployment would restart it: the replica ended, at once"
        );
    }

    #[test]
    fn adoption_takes_up_running_units_and_reports_ended_ones() {
        let mut tracker = tracker_with_node_a();
        let _ = tracker.handle_pods_listed(
            vec![
                ours("run", "run", running(true)),
                ours("done-x", "done", terminated("Succeeded", 0, "Completed")),
                ours("serve-1", "serve", running(true)),
            ],
            0,
        );
        let found = |id: &str, workload, job_outcome| Found {
            info: info(id, workload),
            job_outcome,
        };
        let (recovered, actions) = tracker.adopt(
            vec![
                found("run", Workload::Pod, None),
                found("done", Workload::Job, None),
                found("serve", Workload::Deployment, None),
                // A Job whose pod is gone: its conditions say how it ended.
                found("old", Workload::Job, Some(Exit::Code(0))),
                // A Job whose pod is not there yet: adopted, to wait for it.
                found("new", Workload::Job, None),
            ],
            vec!["j-1".into(), "j-gone".into()],
            5,
        );
        let image = Some("img@sha256:abc".to_string());
        assert_eq!(
            recovered,
            [
                (
                    "run".to_string(),
                    Recovered::Running {
                        image: image.clone()
                    }
                ),
                ("done".to_string(), Recovered::Ended(Exit::Code(0))),
                ("serve".to_string(), Recovered::Running { image }),
                ("old".to_string(), Recovered::Ended(Exit::Code(0))),
                ("new".to_string(), Recovered::Running { image: None }),
            ]
        );
        assert_eq!(
            actions,
            [
                delete("done", Workload::Job),
                Action::Emit(RuntimeEvent::Health {
                    allocation_id: "serve".into(),
                    healthy: true
                }),
                delete("old", Workload::Job),
                Action::DeleteJobService {
                    job_id: "j-gone".into()
                },
            ]
        );
        assert_eq!(tracker.running(), ["new", "run", "serve"]);
        assert_eq!(
            tracker.handle_pod(ours("run", "run", terminated("Succeeded", 0, "")), 6),
            [exited("run", Exit::Code(0))],
            "adopted units are watched again"
        );
    }
}
