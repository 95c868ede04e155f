//! The scheduler: a pure function from the cluster as it is and the queue of work to placements.
//!
//! `schedule(&ClusterView, &[QueuedJob], &Policy) -> Decisions`. No I/O, no clock, no randomness;
//! every iteration is over ordered collections and every tie breaks on ids, so the same input
//! gives the same output on every replica and in every simulation. The rules (order of work,
//! filters, gangs, parallelism, spread, ranking, preemption) are on [`schedule`].
//!
//! How it stays fast at 10,000 nodes: nodes that every job judges alike (readiness, site,
//! runtimes, prices, GPU models) form a class; a job's static filters and costs are decided once
//! per class, and each class keeps its nodes in an ordered set in packing order, so the best node
//! for a unit is a few ordered-set lookups, not a scan of the fleet. Only an explanation scans
//! every node, and it is computed once per job (every later unit of the job fails alike) and
//! reused for other jobs of the same shape while capacity only shrinks.

use gantry_protocol::jobspec::{JobKind, JobSpec, PlacementPreference};
use gantry_protocol::units::format_bytes;
use gantry_protocol::{RuntimeKind, SiteKind};
use std::cmp::{Ordering, Reverse};
use std::collections::{BTreeMap, BTreeSet};

/// One schedulable node: an agent's host, or one node of a Kubernetes agent's cluster.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeKey {
    pub agent_id: String,
    pub node: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct GpuSlot {
    pub index: u32,
    pub model: String,
    pub memory_bytes: u64,
}

/// A node as the scheduler sees it: capacity, what is already promised, and its prices.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeState {
    pub key: NodeKey,
    pub site: String,
    pub site_kind: SiteKind,
    pub runtimes: Vec<RuntimeKind>,
    /// Only ready nodes receive work.
    pub ready: bool,
    pub cpu_millis: u64,
    pub memory_bytes: u64,
    pub gpus: Vec<GpuSlot>,
    pub cost_per_gpu_hour: f64,
    pub cost_per_cpu_hour: f64,
    /// Promised to allocations that are not finished.
    pub used_cpu_millis: u64,
    pub used_memory_bytes: u64,
    pub used_gpus: BTreeSet<u32>,
}

/// An allocation already placed, as far as the scheduler cares (for spread and preemption).
#[derive(Debug, Clone, PartialEq)]
pub struct RunningUnit {
    pub allocation_id: String,
    pub job_id: String,
    pub team: String,
    pub node: NodeKey,
    pub priority: i32,
    pub preemptible: bool,
    pub cpu_millis: u64,
    pub memory_bytes: u64,
    pub gpus: Vec<u32>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ClusterView {
    /// In node-key order.
    pub nodes: Vec<NodeState>,
    pub running: Vec<RunningUnit>,
    /// GPUs each team may hold at once; a team absent here has no limit.
    pub team_gpu_quota: BTreeMap<String, u32>,
}

/// A job with units waiting to be placed.
#[derive(Debug, Clone, PartialEq)]
pub struct QueuedJob {
    pub job_id: String,
    pub spec: std::sync::Arc<JobSpec>,
    /// Unit indexes (rank, shard index, replica index) still to place. For a training job this is
    /// always the whole gang.
    pub units: Vec<u32>,
    /// Position in the queue among equal priorities (the submission's log index): FIFO.
    pub order: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// Units placed in one pass at most (the leader proposes them as one Raft entry).
    pub placements_per_pass_max: usize,
    /// Candidates listed per unplaced unit in an explanation.
    pub explain_candidates_max: usize,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            placements_per_pass_max: 10_000,
            explain_candidates_max: 3,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Placement {
    pub job_id: String,
    pub unit: u32,
    pub node: NodeKey,
    /// Device indexes on the node.
    pub gpus: Vec<u32>,
    pub cpu_millis: u64,
    pub memory_bytes: u64,
}

/// Why one unit was not placed: how many nodes each filter removed, and the best candidates.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Explanation {
    pub nodes_total: usize,
    /// Filter name (`not_ready`, `runtime`, `site`, `gpu_model`, `gpu_count`, `cpu`, `memory`,
    /// `quota`, `cost_cap`, `gang`) to the number of nodes it removed, in filter order; only the
    /// filters that removed at least one node are listed. Each node is counted once, by the first
    /// filter that removes it. `gang` counts the nodes that would hold one worker of a training
    /// gang that does not fit whole on any one site.
    pub filtered: Vec<(String, usize)>,
    /// The best-scoring nodes that passed every filter, best first, with a summary of their
    /// scores (higher is better; comparable within one explanation only). For a gang that does
    /// not fit whole: the nodes that would hold one worker alone. Empty when no node passed.
    pub candidates: Vec<(NodeKey, i64)>,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Unplaced {
    pub job_id: String,
    pub unit: u32,
    pub explanation: Explanation,
}

/// The `Place` entry that proposes a pass's decisions, stamped with the proposing leader's term.
pub fn place_op(term: u64, decisions: Decisions) -> gantry_protocol::replicated::Op {
    let placements = decisions
        .placements
        .into_iter()
        .map(|p| gantry_protocol::replicated::PlacementEntry {
            job_id: p.job_id,
            unit: p.unit,
            agent_id: p.node.agent_id,
            node: p.node.node,
            gpus: p.gpus,
            cpu_millis: p.cpu_millis,
            memory_bytes: p.memory_bytes,
        })
        .collect();
    gantry_protocol::replicated::Op::Place {
        term,
        placements,
        preemptions: decisions.preemptions,
    }
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Decisions {
    pub placements: Vec<Placement>,
    /// Allocations to stop so that higher-priority work fits; their jobs are requeued.
    pub preemptions: Vec<String>,
    pub unplaced: Vec<Unplaced>,
}

// Architecture Invariant: the scheduler keeps no state between passes and never looks at a clock.
// Everything below lives for one call of `schedule`.

/// One pass over the queue: places what fits, preempts what must make room, explains the rest.
///
/// Jobs go in priority order (higher first), then FIFO (`order`), then by job id. Training gangs
/// are placed whole on one site or not at all; a batch job gets at most `parallelism` units
/// running; serving replicas spread over nodes and sites. Capacity is taken as the pass goes, so
/// no node is over capacity and no GPU is promised twice. At most
/// `policy.placements_per_pass_max` placements are made; when that is reached the pass ends and
/// the remaining work is neither placed nor explained (the next pass takes it).
///
/// Ranking, from most to least significant (see [`Score`]):
/// 1. serving only: fewer replicas of the same job on the node (anti-affinity as a score);
/// 2. the job's `prefer`: `cheapest` → lower cost per hour; `on-prem-first` → on-prem sites, then
///    lower cost; `fastest` → more memory per GPU (CPU-only units: more free CPU), then lower cost;
/// 3. serving only: fewer replicas of the same job on the node's site;
/// 4. packing: fewer free GPUs left on the node, then less free CPU (training and batch bin-pack,
///    so partly used nodes fill up first and whole nodes stay free for whole-node work; a CPU-only
///    unit therefore goes to the node with the fewest free GPUs, keeping GPU nodes for GPU work);
/// 5. the node key (lower first), so that every tie breaks the same way.
///
/// Cost dominates packing on purpose: a user who asked for the cheapest placement gets it, and
/// bin-packing decides among the nodes that cost the same (in practice: the nodes of one site and
/// one machine type). For the same reason site spread only decides among equally preferred
/// sites: spreading a service over sites never overrides where the user said the money goes.
pub fn schedule(view: &ClusterView, queue: &[QueuedJob], policy: &Policy) -> Decisions {
    let mut jobs: Vec<&QueuedJob> = queue.iter().collect();
    // Stable, so even two entries with the same id keep the caller's order.
    jobs.sort_by(|a, b| {
        b.spec
            .priority
            .cmp(&a.spec.priority)
            .then(a.order.cmp(&b.order))
            .then_with(|| a.job_id.cmp(&b.job_id))
    });
    let indexing = Indexing {
        by_free_cpu: jobs.iter().any(|job| is_by_free_cpu(&job.spec)),
        cpu_millis_min: jobs
            .iter()
            .map(|job| u64::from(job.spec.resources.cpu_millis))
            .min()
            .unwrap_or(0),
        memory_bytes_min: jobs
            .iter()
            .map(|job| job.spec.resources.memory_bytes)
            .min()
            .unwrap_or(0),
    };
    let mut pass = Pass::new(view, policy, indexing);
    for job in jobs {
        if pass.handle_job(job) == Flow::PassFull {
            break;
        }
    }
    pass.decisions
}

/// The order of the feasibility filters, which is also the order in which an explanation lists
/// them. `Gang` is not a filter of one node: it counts the nodes that would hold one worker of a
/// gang that does not fit whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Filter {
    NotReady,
    Runtime,
    Site,
    GpuModel,
    GpuCount,
    Cpu,
    Memory,
    Quota,
    CostCap,
    Gang,
}

impl Filter {
    const ALL: [Filter; 10] = [
        Filter::NotReady,
        Filter::Runtime,
        Filter::Site,
        Filter::GpuModel,
        Filter::GpuCount,
        Filter::Cpu,
        Filter::Memory,
        Filter::Quota,
        Filter::CostCap,
        Filter::Gang,
    ];

    fn name(self) -> &'static str {
        match self {
            Filter::NotReady => "not_ready",
            Filter::Runtime => "runtime",
            Filter::Site => "site",
            Filter::GpuModel => "gpu_model",
            Filter::GpuCount => "gpu_count",
            Filter::Cpu => "cpu",
            Filter::Memory => "memory",
            Filter::Quota => "quota",
            Filter::CostCap => "cost_cap",
            Filter::Gang => "gang",
        }
    }
}

/// A node's position in `NodeKey` order: comparing ranks is comparing keys, without cloning or
/// comparing strings in the inner loop.
type NodeRank = u32;

/// A cost per hour, ordered totally (`f64::total_cmp`) so it can sit in a derived `Ord`.
#[derive(Debug, Clone, Copy)]
struct Cost(f64);

impl PartialEq for Cost {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Cost {}

impl PartialOrd for Cost {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Cost {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.total_cmp(&other.0)
    }
}

/// How good a node is for one unit; higher is better. The fields are compared in order (see
/// [`schedule`] for why they come in this order); the last one is the node's key, so no two
/// nodes ever score the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Score {
    /// Serving: replicas of the job already on the node. Zero for other kinds.
    node_replicas: Reverse<u32>,
    /// What the job's `prefer` puts first: 1 for on-prem under `on-prem-first`, the memory per
    /// GPU (or the free CPU left, for a CPU-only unit) under `fastest`, 0 under `cheapest`.
    preferred: u64,
    cost: Reverse<Cost>,
    /// Serving: replicas of the job already on the node's site. Zero for other kinds.
    site_replicas: Reverse<u32>,
    /// Free GPUs, then free CPU millis, left on the node after the placement: fewer is better.
    packing: Reverse<(u32, u64)>,
    node: Reverse<NodeRank>,
}

impl Score {
    /// The score as one number for an explanation, higher is better: the fields packed into bit
    /// ranges, each saturating or rounded (node spread 4 bits, preference 12 as a small float,
    /// cost in hundredths 20, site spread 4, free GPUs 7, free CPUs 16). The candidates are listed
    /// in exact score order; two of them may show the same number when they differ only in what
    /// the packing rounds away, or in the key.
    fn summary(&self) -> i64 {
        fn inverted(value: u64, bits: u32) -> i64 {
            let max = (1u64 << bits) - 1;
            (max - value.min(max)) as i64
        }
        /// 7 bits of exponent, 5 of mantissa: monotone, so bigger stays bigger.
        fn small_float(value: u64) -> i64 {
            let exponent = u64::from(64 - value.leading_zeros());
            let mantissa = if exponent > 5 {
                (value >> (exponent - 6)) & 0x1f
            } else {
                value & 0x1f
            };
            ((exponent << 5) | mantissa) as i64
        }
        let cost_hundredths = (self.cost.0 .0.max(0.0) * 100.0).round() as u64;
        let (gpus_left, cpu_left_millis) = self.packing.0;
        (inverted(u64::from(self.node_replicas.0), 4) << 59)
            | (small_float(self.preferred) << 47)
            | (inverted(cost_hundredths, 20) << 27)
            | (inverted(u64::from(self.site_replicas.0), 4) << 23)
            | (inverted(u64::from(gpus_left), 7) << 16)
            | inverted(cpu_left_millis / 1000, 16)
    }
}

/// Which GPUs a unit can use on a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum GpuWant {
    Any,
    Model(u32),
    /// A model that no node in the fleet has.
    Absent,
}

#[derive(Debug, Clone, Copy)]
struct Demand {
    n_gpus: u32,
    want: GpuWant,
    cpu_millis: u64,
    memory_bytes: u64,
}

#[derive(Debug, Clone)]
struct Gpu {
    index: u32,
    model: u32,
    free: bool,
}

/// A node as the pass sees it: what is left of it changes with every placement.
struct Node<'a> {
    state: &'a NodeState,
    class: usize,
    cpu_used_millis: u64,
    memory_used_bytes: u64,
    /// By device index.
    gpus: Vec<Gpu>,
    n_gpus_free: u32,
}

impl Node<'_> {
    fn cpu_free_millis(&self) -> u64 {
        self.state.cpu_millis.saturating_sub(self.cpu_used_millis)
    }

    fn memory_free_bytes(&self) -> u64 {
        self.state
            .memory_bytes
            .saturating_sub(self.memory_used_bytes)
    }

    fn matches(gpu: &Gpu, want: GpuWant) -> bool {
        match want {
            GpuWant::Any => true,
            GpuWant::Model(model) => gpu.model == model,
            GpuWant::Absent => false,
        }
    }

    fn gpus_free_of(&self, want: GpuWant) -> u32 {
        match want {
            GpuWant::Any => self.n_gpus_free,
            _ => self
                .gpus
                .iter()
                .filter(|g| g.free && Self::matches(g, want))
                .count() as u32,
        }
    }

    /// Whether device `index` is a GPU of the node, in use, and of the wanted model.
    fn is_used_gpu_of(&self, index: u32, want: GpuWant) -> bool {
        self.gpus
            .binary_search_by_key(&index, |g| g.index)
            .is_ok_and(|pos| !self.gpus[pos].free && Self::matches(&self.gpus[pos], want))
    }

    fn has_model(&self, want: GpuWant) -> bool {
        self.gpus.iter().any(|g| Self::matches(g, want))
    }

    fn fits(&self, demand: &Demand) -> bool {
        self.cpu_free_millis() >= demand.cpu_millis
            && self.memory_free_bytes() >= demand.memory_bytes
            && (demand.n_gpus == 0 || self.gpus_free_of(demand.want) >= demand.n_gpus)
    }
}

/// Nodes that every job judges alike: same readiness, site, runtimes, prices and GPU models.
/// Static filters and cost are decided once per class, and each class keeps its nodes ordered
/// for packing, so finding the best node is a few ordered-set lookups, not a scan of the fleet.
struct Class {
    site: u32,
    site_kind: SiteKind,
    ready: bool,
    runtimes: u8,
    cost_per_gpu_hour: f64,
    cost_per_cpu_hour: f64,
    /// The largest memory of one GPU of each model, and of any model.
    gpu_memory_by_model: BTreeMap<u32, u64>,
    gpu_memory_max: u64,
    /// (free GPUs, free CPU millis, node): the packing order.
    by_packing: BTreeSet<(u32, u64, NodeRank)>,
    /// (free CPU millis, fewer free GPUs, lower key): most free CPU last. Kept only when a job
    /// in the queue ranks CPU-only units by free CPU (`fastest`).
    by_free_cpu: BTreeSet<(u64, Reverse<u32>, Reverse<NodeRank>)>,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct ClassKey {
    ready: bool,
    site: u32,
    on_prem: bool,
    runtimes: u8,
    cost_per_gpu_hour_bits: u64,
    cost_per_cpu_hour_bits: u64,
    /// (model, memory) of every GPU, sorted and without repeats.
    gpus: Vec<(u32, u64)>,
}

const RUNTIME_KUBERNETES: u8 = 1;
const RUNTIME_DOCKER: u8 = 2;
const RUNTIME_PROCESS: u8 = 4;

fn runtime_bits(runtimes: &[RuntimeKind]) -> u8 {
    runtimes.iter().fold(0, |bits, runtime| {
        bits | match runtime {
            RuntimeKind::Kubernetes => RUNTIME_KUBERNETES,
            RuntimeKind::Docker => RUNTIME_DOCKER,
            RuntimeKind::Process => RUNTIME_PROCESS,
        }
    })
}

/// A running allocation as the pass sees it.
struct Running<'a> {
    unit: &'a RunningUnit,
    node: Option<NodeRank>,
    preempted: bool,
}

/// How one class looks to one job.
#[derive(Debug, Clone, Copy)]
struct Verdict {
    /// The first static filter (not_ready, runtime, site, gpu_model) that removes the class.
    removed_by: Option<Filter>,
    cost_over_cap: bool,
    preferred: u64,
    cost: Cost,
}

impl Verdict {
    fn passes(&self) -> bool {
        self.removed_by.is_none() && !self.cost_over_cap
    }
}

/// Replicas of one serving job, per node and per site.
#[derive(Default)]
struct Spread {
    by_node: BTreeMap<NodeRank, u32>,
    by_site: BTreeMap<u32, u32>,
}

/// Everything about one job that does not change while its units are placed.
struct Plan<'q> {
    job: &'q QueuedJob,
    demand: Demand,
    /// Indexed by class.
    verdicts: Vec<Verdict>,
    /// Classes that pass every static filter, best static preference first.
    classes: Vec<usize>,
    /// `fastest` for CPU-only units: free CPU decides before cost, so no class can be skipped.
    by_free_cpu: bool,
    spread: Option<Spread>,
    /// Once one unit of the job fails, every later one does too (capacity only shrinks, and
    /// the units are alike): the explanation is reused.
    failed: Option<Explanation>,
}

/// What lets a failed unit's explanation stand for another job's: everything the static filters
/// and the capacity filters look at. Valid only while capacity only shrinks (cleared on any
/// preemption), and only for jobs of no higher priority (which the queue order guarantees).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct ShapeKey<'q> {
    needs_container: bool,
    sites: Vec<&'q str>,
    gpu_model: Option<&'q str>,
    n_gpus: u32,
    cpu_millis: u64,
    memory_bytes: u64,
    cost_cap_bits: Option<u64>,
    concurrent_units: u32,
}

impl<'q> ShapeKey<'q> {
    fn of(spec: &'q JobSpec) -> Self {
        let mut sites: Vec<&str> = spec.placement.sites.iter().map(String::as_str).collect();
        sites.sort_unstable();
        Self {
            needs_container: spec.image.is_some(),
            sites,
            gpu_model: spec.resources.gpu_model.as_deref(),
            n_gpus: spec.resources.n_gpus,
            cpu_millis: u64::from(spec.resources.cpu_millis),
            memory_bytes: spec.resources.memory_bytes,
            cost_cap_bits: spec.placement.max_cost_per_hour.map(f64::to_bits),
            concurrent_units: spec.concurrent_units(),
        }
    }
}

/// What a gang's tentative steps changed, undone in reverse when the gang does not fit.
enum Undo {
    Took {
        node: NodeRank,
        demand: Demand,
        gpus: Vec<u32>,
    },
    Preempted {
        running: usize,
        freed: Freed,
    },
}

/// What a preemption gave back on its node, exactly (so that it can be taken again).
struct Freed {
    cpu_millis: u64,
    memory_bytes: u64,
    gpus: Vec<u32>,
    quota_gpus: u64,
}

/// What the per-class node indexes hold.
#[derive(Debug, Clone, Copy)]
struct Indexing {
    /// Keep `Class::by_free_cpu`: a job in the queue ranks CPU-only units by free CPU.
    by_free_cpu: bool,
    /// A node with less free CPU or memory than the smallest unit in the queue asks for can take
    /// nothing in this pass (capacity only grows by preemption, which indexes the node again), so
    /// it is left out of the indexes rather than stepped over by every search.
    cpu_millis_min: u64,
    memory_bytes_min: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flow {
    Continue,
    PassFull,
}

fn is_by_free_cpu(spec: &JobSpec) -> bool {
    spec.placement.prefer == PlacementPreference::Fastest && spec.resources.n_gpus == 0
}

/// The job's cost per hour if every unit that runs at once costs what one costs here. The job
/// spec's `max_cost_per_hour` is for the whole job, so a node passes the cap when all the job's
/// concurrent units priced like this one stay under it; for a one-unit job that is the unit's
/// own cost.
fn job_cost_per_hour(unit_cost: f64, spec: &JobSpec) -> f64 {
    unit_cost * f64::from(spec.concurrent_units())
}

struct Pass<'a> {
    policy: &'a Policy,
    nodes: Vec<Node<'a>>,
    classes: Vec<Class>,
    site_ids: BTreeMap<&'a str, u32>,
    models: BTreeMap<&'a str, u32>,
    indexing: Indexing,
    running: Vec<Running<'a>>,
    /// Per class, the nodes where preemptible work runs.
    preemptible_nodes: Vec<Vec<NodeRank>>,
    /// Running allocations per node, in preemption order: lowest priority first, larger first,
    /// then by allocation id.
    running_on_node: BTreeMap<NodeRank, Vec<usize>>,
    running_by_job: BTreeMap<&'a str, Vec<usize>>,
    /// GPUs each team holds: running (less preempted) and placed in this pass.
    team_gpus: BTreeMap<&'a str, u64>,
    team_gpu_quota: &'a BTreeMap<String, u32>,
    no_fit_shapes: BTreeMap<ShapeKey<'a>, Explanation>,
    decisions: Decisions,
}

impl<'a> Pass<'a> {
    fn new(view: &'a ClusterView, policy: &'a Policy, indexing: Indexing) -> Self {
        let mut order: Vec<usize> = (0..view.nodes.len()).collect();
        if !view.nodes.windows(2).all(|w| w[0].key <= w[1].key) {
            order.sort_by(|&a, &b| view.nodes[a].key.cmp(&view.nodes[b].key).then(a.cmp(&b)));
        }
        let site_names: BTreeSet<&str> = view.nodes.iter().map(|n| n.site.as_str()).collect();
        let site_ids: BTreeMap<&str, u32> = site_names
            .into_iter()
            .enumerate()
            .map(|(id, site)| (site, id as u32))
            .collect();
        let model_names: BTreeSet<&str> = view
            .nodes
            .iter()
            .flat_map(|n| n.gpus.iter().map(|g| g.model.as_str()))
            .collect();
        let models: BTreeMap<&str, u32> = model_names
            .into_iter()
            .enumerate()
            .map(|(id, model)| (model, id as u32))
            .collect();

        let mut class_ids: BTreeMap<ClassKey, usize> = BTreeMap::new();
        let mut classes: Vec<Class> = Vec::new();
        let mut nodes: Vec<Node<'a>> = Vec::with_capacity(order.len());
        for &view_idx in &order {
            let state = &view.nodes[view_idx];
            let mut gpus: Vec<Gpu> = state
                .gpus
                .iter()
                .map(|slot| Gpu {
                    index: slot.index,
                    model: models[slot.model.as_str()],
                    free: !state.used_gpus.contains(&slot.index),
                })
                .collect();
            gpus.sort_by_key(|g| g.index);
            // A repeated index is one device: keep the first.
            gpus.dedup_by_key(|g| g.index);
            let mut gpu_kinds: Vec<(u32, u64)> = state
                .gpus
                .iter()
                .map(|slot| (models[slot.model.as_str()], slot.memory_bytes))
                .collect();
            gpu_kinds.sort_unstable();
            gpu_kinds.dedup();
            let key = ClassKey {
                ready: state.ready,
                site: site_ids[state.site.as_str()],
                on_prem: state.site_kind == SiteKind::OnPrem,
                runtimes: runtime_bits(&state.runtimes),
                cost_per_gpu_hour_bits: state.cost_per_gpu_hour.to_bits(),
                cost_per_cpu_hour_bits: state.cost_per_cpu_hour.to_bits(),
                gpus: gpu_kinds,
            };
            let class = *class_ids.entry(key).or_insert_with_key(|key| {
                let mut gpu_memory_by_model = BTreeMap::new();
                for &(model, memory) in &key.gpus {
                    let largest = gpu_memory_by_model.entry(model).or_insert(0);
                    *largest = memory.max(*largest);
                }
                classes.push(Class {
                    site: key.site,
                    site_kind: state.site_kind,
                    ready: key.ready,
                    runtimes: key.runtimes,
                    cost_per_gpu_hour: state.cost_per_gpu_hour,
                    cost_per_cpu_hour: state.cost_per_cpu_hour,
                    gpu_memory_max: key.gpus.iter().map(|&(_, m)| m).max().unwrap_or(0),
                    gpu_memory_by_model,
                    by_packing: BTreeSet::new(),
                    by_free_cpu: BTreeSet::new(),
                });
                classes.len() - 1
            });
            let n_gpus_free = gpus.iter().filter(|g| g.free).count() as u32;
            nodes.push(Node {
                state,
                class,
                cpu_used_millis: state.used_cpu_millis,
                memory_used_bytes: state.used_memory_bytes,
                gpus,
                n_gpus_free,
            });
        }

        let mut rank_of: BTreeMap<&NodeKey, NodeRank> = BTreeMap::new();
        for (rank, node) in nodes.iter().enumerate() {
            rank_of.entry(&node.state.key).or_insert(rank as NodeRank);
        }
        let mut running = Vec::with_capacity(view.running.len());
        let mut running_on_node: BTreeMap<NodeRank, Vec<usize>> = BTreeMap::new();
        let mut running_by_job: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
        let mut team_gpus: BTreeMap<&str, u64> = BTreeMap::new();
        for (idx, unit) in view.running.iter().enumerate() {
            let node = rank_of.get(&unit.node).copied();
            running.push(Running {
                unit,
                node,
                preempted: false,
            });
            if let Some(rank) = node {
                running_on_node.entry(rank).or_default().push(idx);
            }
            running_by_job
                .entry(unit.job_id.as_str())
                .or_default()
                .push(idx);
            *team_gpus.entry(unit.team.as_str()).or_insert(0) += unit.gpus.len() as u64;
        }
        let mut preemptible_nodes = vec![Vec::new(); classes.len()];
        for (&rank, units) in &running_on_node {
            if units.iter().any(|&idx| view.running[idx].preemptible) {
                preemptible_nodes[nodes[rank as usize].class].push(rank);
            }
        }
        for units in running_on_node.values_mut() {
            units.sort_by(|&a, &b| {
                let (a, b) = (&view.running[a], &view.running[b]);
                a.priority
                    .cmp(&b.priority)
                    .then(b.gpus.len().cmp(&a.gpus.len()))
                    .then(b.cpu_millis.cmp(&a.cpu_millis))
                    .then_with(|| a.allocation_id.cmp(&b.allocation_id))
            });
        }

        let mut pass = Self {
            policy,
            nodes,
            classes,
            site_ids,
            models,
            indexing,
            running,
            preemptible_nodes,
            running_on_node,
            running_by_job,
            team_gpus,
            team_gpu_quota: &view.team_gpu_quota,
            no_fit_shapes: BTreeMap::new(),
            decisions: Decisions::default(),
        };
        for rank in 0..pass.nodes.len() {
            pass.index(rank as NodeRank);
        }
        pass
    }

    // Getters.

    fn placements_left(&self) -> usize {
        self.policy
            .placements_per_pass_max
            .saturating_sub(self.decisions.placements.len())
    }

    /// The team's GPUs (held and placed in this pass) and its quota, if `asked_gpus` more would
    /// exceed it.
    fn quota_exceeded(&self, team: &str, asked_gpus: u64) -> Option<(u64, u64)> {
        let quota = u64::from(*self.team_gpu_quota.get(team)?);
        let held = self.team_gpus.get(team).copied().unwrap_or(0);
        (asked_gpus > 0 && held + asked_gpus > quota).then_some((held, quota))
    }

    fn live_units_of(&self, job_id: &str) -> impl Iterator<Item = &Running<'a>> + '_ {
        self.running_by_job
            .get(job_id)
            .into_iter()
            .flatten()
            .map(|&idx| &self.running[idx])
            .filter(|running| !running.preempted)
    }

    fn plan<'q>(&self, job: &'q QueuedJob) -> Plan<'q> {
        let spec = &job.spec;
        let resources = &spec.resources;
        let want = match (&resources.gpu_model, resources.n_gpus) {
            (_, 0) | (None, _) => GpuWant::Any,
            (Some(model), _) => self
                .models
                .get(model.as_str())
                .map_or(GpuWant::Absent, |&id| GpuWant::Model(id)),
        };
        let demand = Demand {
            n_gpus: resources.n_gpus,
            want,
            cpu_millis: u64::from(resources.cpu_millis),
            memory_bytes: resources.memory_bytes,
        };
        let needs_container = spec.image.is_some();
        let allowed_sites: Option<BTreeSet<u32>> = (!spec.placement.sites.is_empty()).then(|| {
            spec.placement
                .sites
                .iter()
                .filter_map(|s| self.site_ids.get(s.as_str()).copied())
                .collect()
        });
        let verdicts: Vec<Verdict> = self
            .classes
            .iter()
            .map(|class| {
                // An image needs a container runtime; a bare command, the process runtime.
                let runtime_ok = if needs_container {
                    class.runtimes & (RUNTIME_DOCKER | RUNTIME_KUBERNETES) != 0
                } else {
                    class.runtimes & RUNTIME_PROCESS != 0
                };
                let model_ok = demand.n_gpus == 0
                    || match want {
                        GpuWant::Any => true,
                        GpuWant::Model(model) => class.gpu_memory_by_model.contains_key(&model),
                        GpuWant::Absent => false,
                    };
                let removed_by = if !class.ready {
                    Some(Filter::NotReady)
                } else if !runtime_ok {
                    Some(Filter::Runtime)
                } else if allowed_sites
                    .as_ref()
                    .is_some_and(|sites| !sites.contains(&class.site))
                {
                    Some(Filter::Site)
                } else if !model_ok {
                    Some(Filter::GpuModel)
                } else {
                    None
                };
                let unit_cost = f64::from(demand.n_gpus) * class.cost_per_gpu_hour
                    + demand.cpu_millis as f64 / 1000.0 * class.cost_per_cpu_hour;
                let cost_over_cap = spec
                    .placement
                    .max_cost_per_hour
                    .is_some_and(|cap| job_cost_per_hour(unit_cost, spec) > cap);
                let preferred = match spec.placement.prefer {
                    PlacementPreference::Cheapest => 0,
                    PlacementPreference::OnPremFirst => {
                        u64::from(class.site_kind == SiteKind::OnPrem)
                    }
                    PlacementPreference::Fastest => match want {
                        GpuWant::Model(model) if demand.n_gpus > 0 => {
                            class.gpu_memory_by_model.get(&model).copied().unwrap_or(0)
                        }
                        _ if demand.n_gpus > 0 => class.gpu_memory_max,
                        // Free CPU, which changes as the pass goes: see `Plan::by_free_cpu`.
                        _ => 0,
                    },
                };
                Verdict {
                    removed_by,
                    cost_over_cap,
                    preferred,
                    cost: Cost(unit_cost),
                }
            })
            .collect();
        let mut classes: Vec<usize> = (0..self.classes.len())
            .filter(|&c| verdicts[c].passes())
            .collect();
        classes.sort_by_key(|&c| (Reverse(verdicts[c].preferred), verdicts[c].cost, c));
        let spread = (spec.kind == JobKind::Serving).then(|| {
            let mut spread = Spread::default();
            for running in self.live_units_of(&job.job_id) {
                if let Some(rank) = running.node {
                    *spread.by_node.entry(rank).or_insert(0) += 1;
                    let site = self.classes[self.nodes[rank as usize].class].site;
                    *spread.by_site.entry(site).or_insert(0) += 1;
                }
            }
            spread
        });
        Plan {
            job,
            demand,
            verdicts,
            classes,
            by_free_cpu: is_by_free_cpu(spec),
            spread,
            failed: None,
        }
    }

    fn score(&self, plan: &Plan, rank: NodeRank) -> Score {
        let node = &self.nodes[rank as usize];
        let verdict = &plan.verdicts[node.class];
        let gpus_left = node.n_gpus_free.saturating_sub(plan.demand.n_gpus);
        let cpu_left_millis = node
            .cpu_free_millis()
            .saturating_sub(plan.demand.cpu_millis);
        let (node_replicas, site_replicas) = match &plan.spread {
            Some(spread) => {
                let site = self.classes[node.class].site;
                (
                    spread.by_node.get(&rank).copied().unwrap_or(0),
                    spread.by_site.get(&site).copied().unwrap_or(0),
                )
            }
            None => (0, 0),
        };
        Score {
            node_replicas: Reverse(node_replicas),
            preferred: if plan.by_free_cpu {
                cpu_left_millis
            } else {
                verdict.preferred
            },
            cost: Reverse(verdict.cost),
            site_replicas: Reverse(site_replicas),
            packing: Reverse((gpus_left, cpu_left_millis)),
            node: Reverse(rank),
        }
    }

    /// Visits the class's nodes that fit `demand`, best first (packing order, or most free CPU
    /// first), until `visit` returns true; returns that node.
    fn find_in_class(
        &self,
        class: &Class,
        demand: &Demand,
        by_free_cpu: bool,
        mut visit: impl FnMut(NodeRank) -> bool,
    ) -> Option<NodeRank> {
        if by_free_cpu {
            for &(cpu_free, _, Reverse(rank)) in class.by_free_cpu.iter().rev() {
                if cpu_free < demand.cpu_millis {
                    return None;
                }
                if self.nodes[rank as usize].fits(demand) && visit(rank) {
                    return Some(rank);
                }
            }
            return None;
        }
        let mut from = (demand.n_gpus, demand.cpu_millis, 0);
        'seek: loop {
            for &(gpus_free, cpu_free, rank) in class.by_packing.range(from..) {
                if cpu_free < demand.cpu_millis {
                    // Skip this free-GPU count's nodes with too little CPU in one step.
                    from = (gpus_free, demand.cpu_millis, 0);
                    continue 'seek;
                }
                if self.nodes[rank as usize].fits(demand) && visit(rank) {
                    return Some(rank);
                }
            }
            return None;
        }
    }

    /// The best node for one unit of `plan`'s job that fits without preempting anything,
    /// within `site` if given.
    fn find_best(&self, plan: &Plan, site: Option<u32>) -> Option<(Score, NodeRank)> {
        let demand = &plan.demand;
        let mut best: Option<(Score, NodeRank)> = None;
        let spread_nodes = plan
            .spread
            .as_ref()
            .map(|s| &s.by_node)
            .filter(|by_node| !by_node.is_empty());
        for &class_idx in &plan.classes {
            let class = &self.classes[class_idx];
            if site.is_some_and(|site| site != class.site) {
                continue;
            }
            if let Some((score, _)) = &best {
                let verdict = &plan.verdicts[class_idx];
                // Classes come best static preference first: once one is worse than the best
                // node found, so is every later one.
                if !plan.by_free_cpu
                    && (verdict.preferred, Reverse(verdict.cost)) < (score.preferred, score.cost)
                {
                    break;
                }
            }
            // Nodes without a replica of the job come first for serving; within a class the
            // first fitting one in packing order is the class's best.
            let found = self.find_in_class(class, demand, plan.by_free_cpu, |rank| {
                spread_nodes.is_none_or(|by_node| !by_node.contains_key(&rank))
            });
            if let Some(rank) = found {
                let score = self.score(plan, rank);
                if best.as_ref().is_none_or(|(best, _)| score > *best) {
                    best = Some((score, rank));
                }
            }
        }
        if best.is_none() && spread_nodes.is_some() {
            // Every fitting node already holds a replica: score them all.
            for &class_idx in &plan.classes {
                let class = &self.classes[class_idx];
                if site.is_some_and(|site| site != class.site) {
                    continue;
                }
                self.find_in_class(class, demand, plan.by_free_cpu, |rank| {
                    let score = self.score(plan, rank);
                    if best.as_ref().is_none_or(|(best, _)| score > *best) {
                        best = Some((score, rank));
                    }
                    false
                });
            }
        }
        best
    }

    /// GPUs on `rank` that preempting `victims` would free for `want`, in the victims' order:
    /// theirs, less those another live allocation on the node also holds. Allocation-free: a
    /// node runs few allocations, so the lists are searched directly.
    fn for_each_gpu_freed_by(
        &self,
        rank: NodeRank,
        victims: &[usize],
        want: GpuWant,
        mut f: impl FnMut(u32),
    ) {
        let node = &self.nodes[rank as usize];
        let on_node = &self.running_on_node[&rank];
        for (pos, &victim) in victims.iter().enumerate() {
            for &index in &self.running[victim].unit.gpus {
                let listed_before = victims[..pos]
                    .iter()
                    .any(|&earlier| self.running[earlier].unit.gpus.contains(&index));
                let held_by_another = on_node.iter().any(|&other| {
                    !self.running[other].preempted
                        && !victims.contains(&other)
                        && self.running[other].unit.gpus.contains(&index)
                });
                if !listed_before && !held_by_another && node.is_used_gpu_of(index, want) {
                    f(index);
                }
            }
        }
    }

    fn fits_without(&self, rank: NodeRank, victims: &[usize], demand: &Demand) -> bool {
        let node = &self.nodes[rank as usize];
        let (cpu, memory) = victims.iter().fold((0u64, 0u64), |(cpu, memory), &idx| {
            let unit = self.running[idx].unit;
            (cpu + unit.cpu_millis, memory + unit.memory_bytes)
        });
        let cpu_free = node
            .state
            .cpu_millis
            .saturating_sub(node.cpu_used_millis.saturating_sub(cpu));
        let memory_free = node
            .state
            .memory_bytes
            .saturating_sub(node.memory_used_bytes.saturating_sub(memory));
        if cpu_free < demand.cpu_millis || memory_free < demand.memory_bytes {
            return false;
        }
        demand.n_gpus == 0 || {
            let mut n_freed = 0;
            self.for_each_gpu_freed_by(rank, victims, demand.want, |_| n_freed += 1);
            node.gpus_free_of(demand.want) + n_freed >= demand.n_gpus
        }
    }

    /// The node where preempting running work of lower priority makes one unit fit, and the
    /// victims: the lowest highest-victim priority first, then the fewest victims, then the
    /// node's static preference, then its key. On each node victims are taken lowest priority
    /// (then largest) first until the unit fits, then any that turn out unneeded are kept.
    fn find_preemption(&self, plan: &Plan, site: Option<u32>) -> Option<(NodeRank, Vec<usize>)> {
        let priority = plan.job.spec.priority;
        type Choice = (
            Reverse<i32>,
            Reverse<usize>,
            u64,
            Reverse<Cost>,
            Reverse<NodeRank>,
        );
        let demand = &plan.demand;
        let mut best: Option<(Choice, NodeRank, Vec<usize>)> = None;
        let ranks = plan
            .classes
            .iter()
            .filter(|&&class| site.is_none_or(|site| site == self.classes[class].site))
            .flat_map(|&class| &self.preemptible_nodes[class]);
        for &rank in ranks {
            let node = &self.nodes[rank as usize];
            let verdict = &plan.verdicts[node.class];
            let units = &self.running_on_node[&rank];
            let may_go = |idx: &usize| {
                let running = &self.running[*idx];
                !running.preempted && running.unit.preemptible && running.unit.priority < priority
            };
            // An upper bound on what preempting everything allowed would free, before any
            // allocation: most nodes fail it.
            let (mut cpu, mut memory, mut gpus) = (
                node.cpu_free_millis(),
                node.memory_free_bytes(),
                u64::from(node.gpus_free_of(demand.want)),
            );
            for unit in units
                .iter()
                .filter(|idx| may_go(idx))
                .map(|&idx| self.running[idx].unit)
            {
                cpu += unit.cpu_millis;
                memory += unit.memory_bytes;
                gpus += unit
                    .gpus
                    .iter()
                    .filter(|&&index| node.is_used_gpu_of(index, demand.want))
                    .count() as u64;
            }
            if cpu < demand.cpu_millis
                || memory < demand.memory_bytes
                || gpus < u64::from(demand.n_gpus)
            {
                continue;
            }
            let candidates: Vec<usize> = units.iter().copied().filter(may_go).collect();
            if candidates.is_empty() {
                continue;
            }
            let mut victims = Vec::new();
            for idx in candidates {
                victims.push(idx);
                if self.fits_without(rank, &victims, &plan.demand) {
                    break;
                }
            }
            if !self.fits_without(rank, &victims, &plan.demand) {
                continue;
            }
            for pos in (0..victims.len()).rev() {
                let victim = victims.remove(pos);
                if !self.fits_without(rank, &victims, &plan.demand) {
                    victims.insert(pos, victim);
                }
            }
            let highest = victims
                .iter()
                .map(|&idx| self.running[idx].unit.priority)
                .max()
                .unwrap_or(i32::MIN);
            let choice = (
                Reverse(highest),
                Reverse(victims.len()),
                verdict.preferred,
                Reverse(verdict.cost),
                Reverse(rank),
            );
            if best.as_ref().is_none_or(|(best, _, _)| choice > *best) {
                best = Some((choice, rank, victims));
            }
        }
        best.map(|(_, rank, victims)| (rank, victims))
    }

    // Mutators.

    /// Whether the node can take the smallest unit in the queue (see [`Indexing`]).
    fn is_useful(&self, rank: NodeRank) -> bool {
        let node = &self.nodes[rank as usize];
        node.cpu_free_millis() >= self.indexing.cpu_millis_min
            && node.memory_free_bytes() >= self.indexing.memory_bytes_min
    }

    fn index(&mut self, rank: NodeRank) {
        if !self.is_useful(rank) {
            return;
        }
        let node = &self.nodes[rank as usize];
        let (gpus_free, cpu_free) = (node.n_gpus_free, node.cpu_free_millis());
        let class = &mut self.classes[node.class];
        class.by_packing.insert((gpus_free, cpu_free, rank));
        if self.indexing.by_free_cpu {
            class
                .by_free_cpu
                .insert((cpu_free, Reverse(gpus_free), Reverse(rank)));
        }
    }

    fn unindex(&mut self, rank: NodeRank) {
        if !self.is_useful(rank) {
            return;
        }
        let node = &self.nodes[rank as usize];
        let (gpus_free, cpu_free) = (node.n_gpus_free, node.cpu_free_millis());
        let class = &mut self.classes[node.class];
        let removed = class.by_packing.remove(&(gpus_free, cpu_free, rank));
        debug_assert!(removed, "node {rank} was not indexed");
        if self.indexing.by_free_cpu {
            class
                .by_free_cpu
                .remove(&(cpu_free, Reverse(gpus_free), Reverse(rank)));
        }
    }

    /// Takes one unit's resources on the node: its CPU, memory and the lowest free GPUs that fit.
    fn take(&mut self, rank: NodeRank, demand: &Demand) -> Vec<u32> {
        self.unindex(rank);
        let node = &mut self.nodes[rank as usize];
        assert!(node.fits(demand), "placing on a node the unit does not fit");
        node.cpu_used_millis += demand.cpu_millis;
        node.memory_used_bytes += demand.memory_bytes;
        let mut gpus = Vec::with_capacity(demand.n_gpus as usize);
        for gpu in node.gpus.iter_mut() {
            if gpus.len() == demand.n_gpus as usize {
                break;
            }
            if gpu.free && Node::matches(gpu, demand.want) {
                gpu.free = false;
                gpus.push(gpu.index);
            }
        }
        node.n_gpus_free -= gpus.len() as u32;
        self.index(rank);
        gpus
    }

    fn untake(&mut self, rank: NodeRank, demand: &Demand, gpus: &[u32]) {
        self.unindex(rank);
        let node = &mut self.nodes[rank as usize];
        node.cpu_used_millis -= demand.cpu_millis;
        node.memory_used_bytes -= demand.memory_bytes;
        for gpu in node.gpus.iter_mut().filter(|g| gpus.contains(&g.index)) {
            gpu.free = true;
        }
        node.n_gpus_free += gpus.len() as u32;
        self.index(rank);
    }

    fn preempt(&mut self, idx: usize) -> Freed {
        let rank = self.running[idx].node.expect("victims run on known nodes");
        let mut gpus = Vec::new();
        self.for_each_gpu_freed_by(rank, &[idx], GpuWant::Any, |index| gpus.push(index));
        let unit = self.running[idx].unit;
        self.running[idx].preempted = true;
        self.unindex(rank);
        let node = &mut self.nodes[rank as usize];
        let freed = Freed {
            cpu_millis: unit.cpu_millis.min(node.cpu_used_millis),
            memory_bytes: unit.memory_bytes.min(node.memory_used_bytes),
            quota_gpus: unit.gpus.len() as u64,
            gpus,
        };
        node.cpu_used_millis -= freed.cpu_millis;
        node.memory_used_bytes -= freed.memory_bytes;
        for gpu in node
            .gpus
            .iter_mut()
            .filter(|g| freed.gpus.contains(&g.index))
        {
            gpu.free = true;
        }
        node.n_gpus_free += freed.gpus.len() as u32;
        self.index(rank);
        if let Some(held) = self.team_gpus.get_mut(unit.team.as_str()) {
            *held -= freed.quota_gpus.min(*held);
        }
        freed
    }

    fn unpreempt(&mut self, idx: usize, freed: &Freed) {
        let rank = self.running[idx].node.expect("victims run on known nodes");
        let unit = self.running[idx].unit;
        self.running[idx].preempted = false;
        self.unindex(rank);
        let node = &mut self.nodes[rank as usize];
        node.cpu_used_millis += freed.cpu_millis;
        node.memory_used_bytes += freed.memory_bytes;
        for gpu in node
            .gpus
            .iter_mut()
            .filter(|g| freed.gpus.contains(&g.index))
        {
            gpu.free = false;
        }
        node.n_gpus_free -= freed.gpus.len() as u32;
        self.index(rank);
        *self.team_gpus.entry(unit.team.as_str()).or_insert(0) += freed.quota_gpus;
    }

    fn rollback(&mut self, journal: Vec<Undo>) {
        for undo in journal.into_iter().rev() {
            match undo {
                Undo::Took { node, demand, gpus } => self.untake(node, &demand, &gpus),
                Undo::Preempted { running, freed } => self.unpreempt(running, &freed),
            }
        }
    }

    fn record_placement(
        &mut self,
        job: &QueuedJob,
        unit: u32,
        rank: NodeRank,
        gpus: Vec<u32>,
        demand: &Demand,
    ) {
        self.decisions.placements.push(Placement {
            job_id: job.job_id.clone(),
            unit,
            node: self.nodes[rank as usize].state.key.clone(),
            gpus,
            cpu_millis: demand.cpu_millis,
            memory_bytes: demand.memory_bytes,
        });
    }

    fn record_preemption(&mut self, idx: usize) {
        self.decisions
            .preemptions
            .push(self.running[idx].unit.allocation_id.clone());
        // Capacity grew: what did not fit before may fit now.
        self.no_fit_shapes.clear();
    }

    fn record_unplaced(&mut self, job: &QueuedJob, unit: u32, explanation: Explanation) {
        self.decisions.unplaced.push(Unplaced {
            job_id: job.job_id.clone(),
            unit,
            explanation,
        });
    }

    // Handlers.

    fn handle_job(&mut self, job: &'a QueuedJob) -> Flow {
        if self.placements_left() == 0 {
            return Flow::PassFull;
        }
        let mut units = job.units.clone();
        units.sort_unstable();
        units.dedup();
        let mut plan = self.plan(job);
        match job.spec.kind {
            JobKind::Training => self.handle_gang(&mut plan, &units),
            JobKind::Batch => {
                let parallelism = job
                    .spec
                    .batch
                    .as_ref()
                    .map_or(1, |batch| batch.parallelism());
                let running = self.live_units_of(&job.job_id).count();
                // Units beyond parallelism stay queued without an explanation: nothing is wrong.
                let allowed = (parallelism as usize).saturating_sub(running);
                units.truncate(allowed);
                self.handle_units(&mut plan, &units)
            }
            JobKind::Serving => self.handle_units(&mut plan, &units),
        }
    }

    /// Batch shards and serving replicas: each unit on its own.
    fn handle_units(&mut self, plan: &mut Plan<'a>, units: &[u32]) -> Flow {
        let job = plan.job;
        let shape = ShapeKey::of(&job.spec);
        for &unit in units {
            if self.placements_left() == 0 {
                return Flow::PassFull;
            }
            if let Some(explanation) = &plan.failed {
                self.record_unplaced(job, unit, explanation.clone());
                continue;
            }
            let asked_gpus = u64::from(plan.demand.n_gpus);
            let within_quota = self.quota_exceeded(&job.spec.team, asked_gpus).is_none();
            let known_no_fit = within_quota && self.no_fit_shapes.contains_key(&shape);
            let target = if within_quota && !known_no_fit {
                match self.find_best(plan, None) {
                    Some((_, rank)) => Some((rank, Vec::new())),
                    None => self.find_preemption(plan, None),
                }
            } else {
                None
            };
            let Some((rank, victims)) = target else {
                let explanation = match self.no_fit_shapes.get(&shape) {
                    Some(explanation) if known_no_fit => explanation.clone(),
                    _ => {
                        let explanation = self.explain(plan, 1);
                        if within_quota && explanation.candidates.is_empty() {
                            self.no_fit_shapes
                                .insert(shape.clone(), explanation.clone());
                        }
                        explanation
                    }
                };
                plan.failed = Some(explanation.clone());
                self.record_unplaced(job, unit, explanation);
                continue;
            };
            for idx in victims {
                self.preempt(idx);
                self.record_preemption(idx);
            }
            let gpus = self.take(rank, &plan.demand);
            *self.team_gpus.entry(job.spec.team.as_str()).or_insert(0) += asked_gpus;
            if let Some(spread) = &mut plan.spread {
                *spread.by_node.entry(rank).or_insert(0) += 1;
                let site = self.classes[self.nodes[rank as usize].class].site;
                *spread.by_site.entry(site).or_insert(0) += 1;
            }
            let demand = plan.demand;
            self.record_placement(job, unit, rank, gpus, &demand);
        }
        Flow::Continue
    }

    /// A training gang: every worker on one site, or none.
    fn handle_gang(&mut self, plan: &mut Plan<'a>, units: &[u32]) -> Flow {
        let job = plan.job;
        if units.is_empty() {
            return Flow::Continue;
        }
        if units.len() > self.policy.placements_per_pass_max {
            let explanation = Explanation {
                nodes_total: self.nodes.len(),
                reason: format!(
                    "the gang has {} workers, more than the {} placements one pass may make \
                     (placements_per_pass_max)",
                    units.len(),
                    self.policy.placements_per_pass_max
                ),
                ..Explanation::default()
            };
            for &unit in units {
                self.record_unplaced(job, unit, explanation.clone());
            }
            return Flow::Continue;
        }
        if units.len() > self.placements_left() {
            // Later, smaller work must not overtake the gang: end the pass here.
            return Flow::PassFull;
        }
        let asked_gpus = u64::from(plan.demand.n_gpus) * units.len() as u64;
        let within_quota = self.quota_exceeded(&job.spec.team, asked_gpus).is_none();
        let known_no_fit = self
            .no_fit_shapes
            .get(&ShapeKey::of(&job.spec))
            .filter(|_| within_quota)
            .cloned();
        if within_quota && known_no_fit.is_none() {
            // Sites where the first worker fits, best first; then, if the gang fits whole on
            // none of them, every allowed site again with preemption, best static preference
            // first.
            let mut fitting: Vec<(Score, u32)> = self
                .plan_sites(plan)
                .into_iter()
                .filter_map(|site| {
                    self.find_best(plan, Some(site))
                        .map(|(score, _)| (score, site))
                })
                .collect();
            fitting.sort_by_key(|&(score, _)| Reverse(score));
            let attempts = fitting.into_iter().map(|(_, site)| (site, false)).chain(
                self.plan_sites(plan)
                    .into_iter()
                    .filter(|&site| self.runs_preemptible_work(plan, site))
                    .map(|site| (site, true)),
            );
            let attempts: Vec<(u32, bool)> = attempts.collect();
            for (site, may_preempt) in attempts {
                if let Some((placed, victims)) = self.try_gang(plan, units, site, may_preempt) {
                    for idx in victims {
                        self.record_preemption(idx);
                    }
                    *self.team_gpus.entry(job.spec.team.as_str()).or_insert(0) += asked_gpus;
                    let demand = plan.demand;
                    for (unit, rank, gpus) in placed {
                        self.record_placement(job, unit, rank, gpus, &demand);
                    }
                    return Flow::Continue;
                }
            }
        }
        let explanation = match known_no_fit {
            Some(explanation) => explanation,
            None => self.explain(plan, units.len() as u32),
        };
        for &unit in units {
            self.record_unplaced(job, unit, explanation.clone());
        }
        Flow::Continue
    }

    /// The sites of the classes that pass the job's static filters, best static preference
    /// first (the order of `plan.classes`).
    fn plan_sites(&self, plan: &Plan) -> Vec<u32> {
        let mut sites = Vec::new();
        for &class in &plan.classes {
            let site = self.classes[class].site;
            if !sites.contains(&site) {
                sites.push(site);
            }
        }
        sites
    }

    /// Whether preemptible work runs on a node of `site` that passes the job's static filters.
    fn runs_preemptible_work(&self, plan: &Plan, site: u32) -> bool {
        plan.classes.iter().any(|&class| {
            self.classes[class].site == site && !self.preemptible_nodes[class].is_empty()
        })
    }

    /// Places the gang's workers on `site` one by one; on the first that does not fit, undoes
    /// them all. Returns the placements and the victims when the whole gang fits.
    #[allow(clippy::type_complexity)]
    fn try_gang(
        &mut self,
        plan: &Plan,
        units: &[u32],
        site: u32,
        may_preempt: bool,
    ) -> Option<(Vec<(u32, NodeRank, Vec<u32>)>, Vec<usize>)> {
        let mut journal = Vec::new();
        let mut placed = Vec::with_capacity(units.len());
        let mut victims = Vec::new();
        for &unit in units {
            let target = match self.find_best(plan, Some(site)) {
                Some((_, rank)) => Some((rank, Vec::new())),
                None if may_preempt => self.find_preemption(plan, Some(site)),
                None => None,
            };
            let Some((rank, unit_victims)) = target else {
                self.rollback(journal);
                return None;
            };
            for idx in unit_victims {
                let freed = self.preempt(idx);
                journal.push(Undo::Preempted {
                    running: idx,
                    freed,
                });
                victims.push(idx);
            }
            let gpus = self.take(rank, &plan.demand);
            journal.push(Undo::Took {
                node: rank,
                demand: plan.demand,
                gpus: gpus.clone(),
            });
            placed.push((unit, rank, gpus));
        }
        Some((placed, victims))
    }

    // Explanations.

    /// Why one unit (or one worker of a gang of `gang_units`) is not placed: each node run
    /// through the filters in order, counting the first that removes it.
    fn explain(&self, plan: &Plan, gang_units: u32) -> Explanation {
        let spec = &plan.job.spec;
        let demand = &plan.demand;
        let asked_gpus = u64::from(demand.n_gpus) * u64::from(gang_units);
        let quota = self.quota_exceeded(&spec.team, asked_gpus);
        let mut counts = [0usize; Filter::ALL.len()];
        let mut candidates: Vec<(Score, NodeRank)> = Vec::new();
        for (rank, node) in self.nodes.iter().enumerate() {
            let verdict = &plan.verdicts[node.class];
            let removed_by = if let Some(filter) = verdict.removed_by {
                Some(filter)
            } else if demand.n_gpus > 0 && !node.has_model(demand.want) {
                Some(Filter::GpuModel)
            } else if node.gpus_free_of(demand.want) < demand.n_gpus {
                Some(Filter::GpuCount)
            } else if node.cpu_free_millis() < demand.cpu_millis {
                Some(Filter::Cpu)
            } else if node.memory_free_bytes() < demand.memory_bytes {
                Some(Filter::Memory)
            } else if quota.is_some() {
                Some(Filter::Quota)
            } else if verdict.cost_over_cap {
                Some(Filter::CostCap)
            } else {
                None
            };
            match removed_by {
                Some(filter) => counts[filter as usize] += 1,
                None => candidates.push((self.score(plan, rank as NodeRank), rank as NodeRank)),
            }
        }
        let n_candidates = candidates.len();
        if gang_units > 1 && n_candidates > 0 {
            counts[Filter::Gang as usize] = n_candidates;
        }
        candidates.sort_by_key(|&(score, _)| Reverse(score));
        candidates.truncate(self.policy.explain_candidates_max);
        let filtered: Vec<(String, usize)> = Filter::ALL
            .iter()
            .zip(counts)
            .filter(|&(_, count)| count > 0)
            .map(|(filter, count)| (filter.name().to_string(), count))
            .collect();
        let reason = self.reason(plan, gang_units, &counts, n_candidates, quota);
        Explanation {
            nodes_total: self.nodes.len(),
            filtered,
            candidates: candidates
                .into_iter()
                .map(|(score, rank)| (self.nodes[rank as usize].state.key.clone(), score.summary()))
                .collect(),
            reason,
        }
    }

    fn reason(
        &self,
        plan: &Plan,
        gang_units: u32,
        counts: &[usize; Filter::ALL.len()],
        n_candidates: usize,
        quota: Option<(u64, u64)>,
    ) -> String {
        if self.nodes.is_empty() {
            return "the cluster has no nodes".to_string();
        }
        let spec = &plan.job.spec;
        if gang_units > 1 && n_candidates > 0 {
            return format!(
                "the {gang_units} workers do not fit together on any one site, even preempting \
                 lower-priority work; each would fit alone on {n_candidates} {}",
                plural(n_candidates, "node", "nodes")
            );
        }
        let mut removed: Vec<(usize, Filter)> = Filter::ALL
            .iter()
            .zip(counts)
            .filter(|&(_, &count)| count > 0)
            .map(|(&filter, &count)| (count, filter))
            .collect();
        removed.sort_by_key(|&(count, filter)| (Reverse(count), filter));
        let list: Vec<String> = removed
            .iter()
            .enumerate()
            .map(|(i, &(count, filter))| {
                if i == 0 {
                    format!(
                        "{count} {} removed by {}",
                        plural(count, "node", "nodes"),
                        filter.name()
                    )
                } else {
                    format!("{count} by {}", filter.name())
                }
            })
            .collect();
        let mut reason = format!("no node fits {}: {}", self.describe(plan), list.join(", "));
        if let Some((held, quota)) = quota {
            reason.push_str(&format!(
                "; team {} may hold {quota} GPUs, holds {held} and asks for {}",
                spec.team,
                u64::from(plan.demand.n_gpus) * u64::from(gang_units)
            ));
        }
        if counts[Filter::CostCap as usize] > 0 {
            if let Some(cap) = spec.placement.max_cost_per_hour {
                reason.push_str(&format!("; the job may cost at most {cap} per hour"));
            }
        }
        reason
    }

    /// "8 free A100 GPUs, 16 CPUs and 64GiB of memory".
    fn describe(&self, plan: &Plan) -> String {
        let resources = &plan.job.spec.resources;
        let cpus = format_cpus(resources.cpu_millis);
        let cpus = format!("{cpus} {}", if cpus == "1" { "CPU" } else { "CPUs" });
        let memory = format!("{} of memory", format_bytes(resources.memory_bytes));
        if resources.n_gpus == 0 {
            return format!("{cpus} and {memory}");
        }
        let model = resources
            .gpu_model
            .as_deref()
            .map(|m| format!("{m} "))
            .unwrap_or_default();
        let gpus = plural(resources.n_gpus as usize, "GPU", "GPUs");
        format!(
            "{} free {model}{gpus}, {cpus} and {memory}",
            resources.n_gpus
        )
    }
}

fn plural(count: usize, one: &'static str, many: &'static str) -> &'static str {
    if count == 1 {
        one
    } else {
        many
    }
}

/// CPU millis as CPUs: 16000 → "16", 500 → "0.5".
fn format_cpus(cpu_millis: u32) -> String {
    let (whole, fraction) = (cpu_millis / 1000, cpu_millis % 1000);
    if fraction == 0 {
        return whole.to_string();
    }
    format!("{whole}.{fraction:03}")
        .trim_end_matches('0')
        .to_string()
}

#[cfg(test)]
mod tests {
    //! Scenarios in a small text format, one `check(input, expect)` per behaviour:
    //!
    //! ```text
    //! policy max=3 explain=2
    //! node AGENT/NODE [site=S] [cloud] [down] [cpus=N] [mem=GIB] [gpus=NxMODEL[:GIB]]...
    //!      [gpu$=F] [cpu$=F] [runtimes=docker,process,kubernetes] [used-gpus=0,1]
    //!      [used-cpus=N] [used-mem=GIB]
    //! running ALLOC job=J node=AGENT/NODE [team=T] [prio=P] [preemptible] [gpus=0,1]
    //!      [cpus=N] [mem=GIB]                      (adds its usage to the node's)
    //! quota TEAM=N
    //! job ID training|batch|serving [n=UNITS] [par=N] [gpus=N] [model=M] [cpus=N] [mem=GIB]
    //!      [team=T] [prio=P] [prefer=cheapest|on-prem-first|fastest] [sites=a,b] [cap=F]
    //!      [command] [preemptible] [units=0,2] [order=N]
    //! ```
    //!
    //! The output lists placements, then preemptions, then unplaced units with their
    //! explanations (filters and candidate nodes; candidate scores are left out).

    use super::*;
    use gantry_protocol::jobspec::{self, Batch, Serving, Training};
    use proptest::prelude::*;

    fn parse(input: &str) -> (ClusterView, Vec<QueuedJob>, Policy) {
        let mut view = ClusterView {
            nodes: Vec::new(),
            running: Vec::new(),
            team_gpu_quota: BTreeMap::new(),
        };
        let mut queue = Vec::new();
        let mut policy = Policy::default();
        let list = |value: &str| -> Vec<u32> {
            value
                .split(',')
                .filter(|s| !s.is_empty())
                .map(|s| s.parse().unwrap())
                .collect()
        };
        let gib = |value: &str| -> u64 { value.parse::<u64>().unwrap() << 30 };
        let millis =
            |value: &str| -> u64 { (value.parse::<f64>().unwrap() * 1000.0).round() as u64 };
        for (line_idx, line) in input.lines().enumerate() {
            let mut words = line.split_whitespace();
            let Some(command) = words.next() else {
                continue;
            };
            let words: Vec<&str> = words.collect();
            let options = || words.iter().map(|w| w.split_once('=').unwrap_or((w, "")));
            match command {
                "policy" => {
                    for (name, value) in options() {
                        match name {
                            "max" => policy.placements_per_pass_max = value.parse().unwrap(),
                            "explain" => policy.explain_candidates_max = value.parse().unwrap(),
                            _ => panic!("unknown policy option {name}"),
                        }
                    }
                }
                "node" => {
                    let (agent_id, node) = words[0].split_once('/').unwrap();
                    let mut state = NodeState {
                        key: NodeKey {
                            agent_id: agent_id.into(),
                            node: node.into(),
                        },
                        site: "onprem-a".into(),
                        site_kind: SiteKind::OnPrem,
                        runtimes: vec![RuntimeKind::Docker, RuntimeKind::Process],
                        ready: true,
                        cpu_millis: 64_000,
                        memory_bytes: 256 << 30,
                        gpus: Vec::new(),
                        cost_per_gpu_hour: 1.0,
                        cost_per_cpu_hour: 0.01,
                        used_cpu_millis: 0,
                        used_memory_bytes: 0,
                        used_gpus: BTreeSet::new(),
                    };
                    for (name, value) in options().skip(1) {
                        match name {
                            "site" => state.site = value.into(),
                            "cloud" => state.site_kind = SiteKind::Cloud,
                            "down" => state.ready = false,
                            "cpus" => state.cpu_millis = millis(value),
                            "mem" => state.memory_bytes = gib(value),
                            "gpus" => {
                                let (count, kind) = value.split_once('x').unwrap();
                                let (model, memory) = kind.split_once(':').unwrap_or((kind, "80"));
                                for _ in 0..count.parse::<u32>().unwrap() {
                                    let index = state.gpus.len() as u32;
                                    let memory_bytes = gib(memory);
                                    state.gpus.push(GpuSlot {
                                        index,
                                        model: model.into(),
                                        memory_bytes,
                                    });
                                }
                            }
                            "gpu$" => state.cost_per_gpu_hour = value.parse().unwrap(),
                            "cpu$" => state.cost_per_cpu_hour = value.parse().unwrap(),
                            "runtimes" => {
                                state.runtimes = value
                                    .split(',')
                                    .map(|r| match r {
                                        "docker" => RuntimeKind::Docker,
                                        "process" => RuntimeKind::Process,
                                        "kubernetes" => RuntimeKind::Kubernetes,
                                        _ => panic!("unknown runtime {r}"),
                                    })
                                    .collect()
                            }
                            "used-gpus" => state.used_gpus.extend(list(value)),
                            "used-cpus" => state.used_cpu_millis += millis(value),
                            "used-mem" => state.used_memory_bytes += gib(value),
                            _ => panic!("unknown node option {name}"),
                        }
                    }
                    view.nodes.push(state);
                }
                "running" => {
                    let mut unit = RunningUnit {
                        allocation_id: words[0].into(),
                        job_id: String::new(),
                        team: "default".into(),
                        node: NodeKey {
                            agent_id: String::new(),
                            node: String::new(),
                        },
                        priority: 0,
                        preemptible: false,
                        cpu_millis: 1000,
                        memory_bytes: 1 << 30,
                        gpus: Vec::new(),
                    };
                    for (name, value) in options().skip(1) {
                        match name {
                            "job" => unit.job_id = value.into(),
                            "team" => unit.team = value.into(),
                            "node" => {
                                let (agent_id, node) = value.split_once('/').unwrap();
                                unit.node = NodeKey {
                                    agent_id: agent_id.into(),
                                    node: node.into(),
                                };
                            }
                            "prio" => unit.priority = value.parse().unwrap(),
                            "preemptible" => unit.preemptible = true,
                            "gpus" => unit.gpus = list(value),
                            "cpus" => unit.cpu_millis = millis(value),
                            "mem" => unit.memory_bytes = gib(value),
                            _ => panic!("unknown running option {name}"),
                        }
                    }
                    let node = view
                        .nodes
                        .iter_mut()
                        .find(|n| n.key == unit.node)
                        .expect("running on a known node");
                    node.used_cpu_millis += unit.cpu_millis;
                    node.used_memory_bytes += unit.memory_bytes;
                    node.used_gpus.extend(unit.gpus.iter().copied());
                    view.running.push(unit);
                }
                "quota" => {
                    for (team, value) in options() {
                        view.team_gpu_quota
                            .insert(team.into(), value.parse().unwrap());
                    }
                }
                "job" => {
                    let kind = JobKind::from_name(words[1]).expect("a job kind");
                    let mut spec = JobSpec {
                        name: words[0].into(),
                        team: "default".into(),
                        kind,
                        image: Some("registry.local/image".into()),
                        command: vec!["run".into()],
                        env: BTreeMap::new(),
                        resources: jobspec::Resources {
                            n_gpus: 0,
                            gpu_model: None,
                            cpu_millis: 1000,
                            memory_bytes: 1 << 30,
                        },
                        placement: jobspec::Placement::default(),
                        priority: 0,
                        preemptible: false,
                        pull: false,
                        outputs: Vec::new(),
                        inputs: Vec::new(),
                        training: None,
                        batch: None,
                        serving: None,
                    };
                    let (mut n_units, mut parallelism, mut units, mut order) =
                        (1, None, None, line_idx as u64);
                    for (name, value) in options().skip(2) {
                        match name {
                            "n" => n_units = value.parse().unwrap(),
                            "par" => parallelism = Some(value.parse().unwrap()),
                            "units" => units = Some(list(value)),
                            "order" => order = value.parse().unwrap(),
                            "gpus" => spec.resources.n_gpus = value.parse().unwrap(),
                            "model" => spec.resources.gpu_model = Some(value.into()),
                            "cpus" => spec.resources.cpu_millis = millis(value) as u32,
                            "mem" => spec.resources.memory_bytes = gib(value),
                            "team" => spec.team = value.into(),
                            "prio" => spec.priority = value.parse().unwrap(),
                            "prefer" => {
                                spec.placement.prefer =
                                    PlacementPreference::from_name(value).unwrap()
                            }
                            "sites" => {
                                spec.placement.sites = value.split(',').map(String::from).collect()
                            }
                            "cap" => {
                                spec.placement.max_cost_per_hour = Some(value.parse().unwrap())
                            }
                            "command" => spec.image = None,
                            "preemptible" => spec.preemptible = true,
                            _ => panic!("unknown job option {name}"),
                        }
                    }
                    match kind {
                        JobKind::Training => {
                            spec.training = Some(Training {
                                n_workers: n_units,
                                ..Training::default()
                            })
                        }
                        JobKind::Batch => {
                            spec.batch = Some(Batch {
                                n_shards: n_units,
                                parallelism: Some(parallelism.unwrap_or(n_units)),
                                ..Batch::default()
                            })
                        }
                        JobKind::Serving => {
                            spec.serving = Some(Serving {
                                n_replicas: n_units,
                                ..Serving::default()
                            })
                        }
                    }
                    spec.validate().expect("a valid job spec");
                    queue.push(QueuedJob {
                        job_id: words[0].into(),
                        spec: spec.into(),
                        units: units.unwrap_or_else(|| (0..n_units).collect()),
                        order,
                    });
                }
                _ => panic!("unknown line {line:?}"),
            }
        }
        (view, queue, policy)
    }

    fn render(decisions: &Decisions) -> String {
        let mut lines = Vec::new();
        for p in &decisions.placements {
            let gpus = if p.gpus.is_empty() {
                String::new()
            } else {
                let list: Vec<String> = p.gpus.iter().map(u32::to_string).collect();
                format!(" gpus[{}]", list.join(","))
            };
            lines.push(format!(
                "{}/{} -> {}/{}{gpus}",
                p.job_id, p.unit, p.node.agent_id, p.node.node
            ));
        }
        for allocation_id in &decisions.preemptions {
            lines.push(format!("preempt {allocation_id}"));
        }
        for u in &decisions.unplaced {
            let e = &u.explanation;
            lines.push(format!("unplaced {}/{}: {}", u.job_id, u.unit, e.reason));
            let filtered: Vec<String> =
                e.filtered.iter().map(|(f, n)| format!("{f}={n}")).collect();
            lines.push(format!("  filtered: {}", filtered.join(" ")));
            if !e.candidates.is_empty() {
                let names: Vec<String> = e
                    .candidates
                    .iter()
                    .map(|(k, _)| format!("{}/{}", k.agent_id, k.node))
                    .collect();
                lines.push(format!("  candidates: {}", names.join(" ")));
            }
        }
        lines.join("\n")
    }

    #[track_caller]
    fn check(input: &str, expect: &str) {
        let (view, queue, policy) = parse(input);
        let decisions = schedule(&view, &queue, &policy);
        assert_eq!(
            schedule(&view, &queue, &policy),
            decisions,
            "the same input gave another output"
        );
        let rendered = render(&decisions);
        let actual = rendered
            .lines()
            .map(str::trim_end)
            .collect::<Vec<_>>()
            .join("\n");
        let expect: Vec<&str> = expect
            .lines()
            .map(str::trim_end)
            .filter(|l| !l.trim().is_empty())
            .collect();
        let indent = expect
            .iter()
            .map(|l| l.len() - l.trim_start().len())
            .min()
            .unwrap_or(0);
        let expect: Vec<&str> = expect.iter().map(|l| &l[indent..]).collect();
        let expect = expect.join("\n");
        assert!(
            actual == expect,
            "\n--- expected\n{expect}\n--- actual\n{actual}\n"
        );
    }

    #[test]
    fn training_packs_onto_the_partly_used_node() {
        check(
            "
            node a/n1 gpus=8xA100
            node a/n2 gpus=8xA100 used-gpus=0,1,2,3
            job train training gpus=4 model=A100
            ",
            "train/0 -> a/n2 gpus[4,5,6,7]",
        );
    }

    #[test]
    fn batch_shards_fill_the_fullest_node_first_with_the_lowest_free_gpus() {
        check(
            "
            node a/n1 gpus=8xA100 used-gpus=0,2,3,4,5
            node a/n2 gpus=8xA100 used-gpus=0
            job shards batch n=4 gpus=1
            ",
            "
            shards/0 -> a/n1 gpus[1]
            shards/1 -> a/n1 gpus[6]
            shards/2 -> a/n1 gpus[7]
            shards/3 -> a/n2 gpus[1]
            ",
        );
    }

    #[test]
    fn cpu_only_units_keep_off_gpu_nodes() {
        check(
            "
            node a/gpu gpus=8xA100
            node a/cpu cpus=32
            node a/cpu-big cpus=96
            job etl batch n=2 cpus=8
            ",
            "
            etl/0 -> a/cpu
            etl/1 -> a/cpu
            ",
        );
    }

    #[test]
    fn a_gang_is_placed_whole_or_not_at_all() {
        check(
            "
            node a/n1 gpus=8xA100
            node a/n2 gpus=8xA100 used-gpus=0
            job big training n=2 gpus=8 prio=10
            job small batch gpus=7
            ",
            "
            small/0 -> a/n2 gpus[1,2,3,4,5,6,7]
            unplaced big/0: the 2 workers do not fit together on any one site, even preempting lower-priority work; each would fit alone on 1 node
              filtered: gpu_count=1 gang=1
              candidates: a/n1
            unplaced big/1: the 2 workers do not fit together on any one site, even preempting lower-priority work; each would fit alone on 1 node
              filtered: gpu_count=1 gang=1
              candidates: a/n1
            ",
        );
    }

    #[test]
    fn a_gang_stays_on_one_site() {
        check(
            "
            node a/n1 site=east gpus=8xA100
            node b/n1 site=west gpus=8xA100
            node c/n1 site=north gpus=8xA100 gpu$=2
            node c/n2 site=north gpus=8xA100
            job t training n=2 gpus=8
            ",
            "
            t/0 -> c/n2 gpus[0,1,2,3,4,5,6,7]
            t/1 -> c/n1 gpus[0,1,2,3,4,5,6,7]
            ",
        );
    }

    #[test]
    fn a_gang_goes_to_the_best_site_that_holds_it_whole() {
        // West is cheaper and holds both workers.
        check(
            "
            node e/n1 site=east gpus=4xA100 gpu$=2
            node e/n2 site=east gpus=4xA100 gpu$=2
            node w/n1 site=west gpus=4xA100 gpu$=1
            node w/n2 site=west gpus=4xA100 gpu$=1
            job t training n=2 gpus=4
            ",
            "
            t/0 -> w/n1 gpus[0,1,2,3]
            t/1 -> w/n2 gpus[0,1,2,3]
            ",
        );
        // West is cheaper but holds one worker only; the second gang fits nowhere whole.
        check(
            "
            node e/n1 site=east gpus=4xA100 gpu$=2
            node e/n2 site=east gpus=4xA100 gpu$=2
            node w/n1 site=west gpus=4xA100 gpu$=1
            job t training n=2 gpus=4
            job u training n=2 gpus=4
            ",
            "
            t/0 -> e/n1 gpus[0,1,2,3]
            t/1 -> e/n2 gpus[0,1,2,3]
            unplaced u/0: the 2 workers do not fit together on any one site, even preempting lower-priority work; each would fit alone on 1 node
              filtered: gpu_count=2 gang=1
              candidates: w/n1
            unplaced u/1: the 2 workers do not fit together on any one site, even preempting lower-priority work; each would fit alone on 1 node
              filtered: gpu_count=2 gang=1
              candidates: w/n1
            ",
        );
    }

    #[test]
    fn prefer_cheapest_and_on_prem_first() {
        check(
            "
            node a/n1 site=onprem-a gpus=8xA100 gpu$=2.5
            node b/n1 site=aws cloud gpus=8xA100 gpu$=2
            node c/n1 site=onprem-b gpus=8xA100 gpu$=2.2
            job cheap batch gpus=1
            job local batch gpus=1 prefer=on-prem-first
            ",
            "
            cheap/0 -> b/n1 gpus[0]
            local/0 -> c/n1 gpus[0]
            ",
        );
    }

    #[test]
    fn gpus_of_the_asked_model_lowest_index_first() {
        check(
            "
            node a/n1 gpus=2xH100 gpus=2xA100 used-gpus=2
            job a100 batch gpus=1 model=A100
            job any batch gpus=1
            ",
            "
            a100/0 -> a/n1 gpus[3]
            any/0 -> a/n1 gpus[0]
            ",
        );
    }

    #[test]
    fn cost_dominates_packing() {
        // The partly used node is dearer: the cheapest policy wins over packing.
        check(
            "
            node a/n1 gpus=8xA100 gpu$=2 used-gpus=0,1,2,3,4,5
            node a/n2 gpus=8xA100 gpu$=1
            job j batch gpus=1
            ",
            "j/0 -> a/n2 gpus[0]",
        );
    }

    #[test]
    fn prefer_fastest_takes_the_largest_gpus_then_the_cheapest() {
        check(
            "
            node a/n1 gpus=8xA100:40 gpu$=1
            node b/n1 gpus=8xH100:80 gpu$=3
            node c/n1 gpus=8xH100:80 gpu$=2
            node d/n1 cpus=16
            node e/n1 cpus=96
            job fast batch gpus=2 prefer=fastest
            job roomy batch prefer=fastest
            job cheap batch
            ",
            "
            fast/0 -> c/n1 gpus[0,1]
            roomy/0 -> e/n1
            cheap/0 -> d/n1
            ",
        );
    }

    #[test]
    fn the_site_filter_and_its_explanation() {
        check(
            "
            node a/n1 site=east gpus=4xA100
            node b/n1 site=west gpus=4xA100
            node b/n2 site=west gpus=4xA100 used-gpus=0,1,2,3
            job w batch gpus=2 sites=west
            job x batch gpus=4 sites=west
            ",
            "
            w/0 -> b/n1 gpus[0,1]
            unplaced x/0: no node fits 4 free GPUs, 1 CPU and 1GiB of memory: 2 nodes removed by gpu_count, 1 by site
              filtered: site=1 gpu_count=2
            ",
        );
    }

    #[test]
    fn the_cost_cap_is_for_the_whole_job() {
        // Two replicas at 4.01 an hour each exceed 6 an hour; at 2.51 they do not.
        check(
            "
            node a/n1 site=aws cloud gpus=8xA100 gpu$=4
            node b/n1 site=gcp cloud gpus=8xA100 gpu$=2.5
            job capped serving n=2 gpus=1 cap=6
            job tight batch gpus=1 cap=1
            ",
            "
            capped/0 -> b/n1 gpus[0]
            capped/1 -> b/n1 gpus[1]
            unplaced tight/0: no node fits 1 free GPU, 1 CPU and 1GiB of memory: 2 nodes removed by cost_cap; the job may cost at most 1 per hour
              filtered: cost_cap=2
            ",
        );
    }

    #[test]
    fn team_quotas_count_running_and_placed_gpus() {
        check(
            "
            node a/n1 gpus=16xA100
            running r1 job=old team=vision node=a/n1 gpus=0,1,2,3,4,5
            quota vision=8
            job v1 batch gpus=2 team=vision
            job v2 batch gpus=1 team=vision
            job v3 batch team=vision
            job other batch gpus=1 team=nlp
            ",
            "
            v1/0 -> a/n1 gpus[6,7]
            v3/0 -> a/n1
            other/0 -> a/n1 gpus[8]
            unplaced v2/0: no node fits 1 free GPU, 1 CPU and 1GiB of memory: 1 node removed by quota; team vision may hold 8 GPUs, holds 8 and asks for 1
              filtered: quota=1
            ",
        );
    }

    #[test]
    fn a_gang_counts_against_the_quota_whole() {
        check(
            "
            node a/n1 gpus=8xA100
            node a/n2 gpus=8xA100
            running r1 job=old team=vision node=a/n1 gpus=0
            quota vision=8
            job t training n=2 gpus=4 team=vision
            job u training n=2 gpus=3 team=vision
            ",
            "
            u/0 -> a/n1 gpus[1,2,3]
            u/1 -> a/n1 gpus[4,5,6]
            unplaced t/0: no node fits 4 free GPUs, 1 CPU and 1GiB of memory: 2 nodes removed by quota; team vision may hold 8 GPUs, holds 1 and asks for 8
              filtered: quota=2
            unplaced t/1: no node fits 4 free GPUs, 1 CPU and 1GiB of memory: 2 nodes removed by quota; team vision may hold 8 GPUs, holds 1 and asks for 8
              filtered: quota=2
            ",
        );
    }

    #[test]
    fn batch_parallelism_holds_units_back_quietly() {
        check(
            "
            node a/n1 gpus=8xA100
            running r1 job=b node=a/n1 gpus=0
            job b batch n=5 par=2 gpus=1 units=1,2,3,4
            ",
            "b/1 -> a/n1 gpus[1]",
        );
    }

    #[test]
    fn serving_replicas_spread_over_nodes_then_sites() {
        check(
            "
            node a/n1 site=east gpus=8xA100
            node a/n2 site=east gpus=8xA100
            node b/n1 site=west gpus=8xA100
            running r0 job=web node=a/n1 gpus=0
            job web serving n=4 gpus=1 units=1,2,3
            ",
            "
            web/1 -> b/n1 gpus[0]
            web/2 -> a/n2 gpus[0]
            web/3 -> b/n1 gpus[1]
            ",
        );
    }

    #[test]
    fn serving_spreads_over_nodes_before_cost_and_over_sites_after() {
        check(
            "
            node a/n1 site=onprem gpus=2xA100
            node a/n2 site=onprem gpus=2xA100
            node b/n1 site=aws cloud gpus=2xA100 gpu$=3
            job web serving n=4 gpus=1
            ",
            "
            web/0 -> a/n1 gpus[0]
            web/1 -> a/n2 gpus[0]
            web/2 -> b/n1 gpus[0]
            web/3 -> a/n1 gpus[1]
            ",
        );
    }

    #[test]
    fn preemption_takes_the_fewest_lowest_priority_victims() {
        // `urgent` needs 4 GPUs: low1 alone frees them. `peer` has low2's priority, so it may
        // not preempt it, and `keep` is not preemptible.
        check(
            "
            node a/n1 gpus=8xA100
            running low1 job=old1 node=a/n1 gpus=0,1,2,3 prio=-5 preemptible
            running low2 job=old2 node=a/n1 gpus=4,5 prio=-10 preemptible
            running keep job=old3 node=a/n1 gpus=6,7 prio=-20
            job urgent batch gpus=4 prio=10
            job peer batch gpus=2 prio=-10
            ",
            "
            urgent/0 -> a/n1 gpus[0,1,2,3]
            preempt low1
            unplaced peer/0: no node fits 2 free GPUs, 1 CPU and 1GiB of memory: 1 node removed by gpu_count
              filtered: gpu_count=1
            ",
        );
    }

    #[test]
    fn preemption_prefers_the_lowest_priority_victims_across_nodes() {
        check(
            "
            node a/n1 gpus=4xA100
            node a/n2 gpus=4xA100
            running mid job=m node=a/n1 gpus=0,1,2,3 prio=5 preemptible
            running low1 job=l node=a/n2 gpus=0,1 prio=1 preemptible
            running low2 job=l node=a/n2 gpus=2,3 prio=1 preemptible
            job urgent batch gpus=4 prio=10
            ",
            "
            urgent/0 -> a/n2 gpus[0,1,2,3]
            preempt low1
            preempt low2
            ",
        );
    }

    #[test]
    fn a_gang_preempts_across_its_site() {
        check(
            "
            node a/n1 site=east gpus=4xA100
            node a/n2 site=east gpus=4xA100
            node b/n1 site=west gpus=4xA100
            running s1 job=scav node=a/n1 gpus=0,1 prio=-1 preemptible
            running s2 job=scav node=a/n2 gpus=0,1 prio=-1 preemptible
            job t training n=2 gpus=4
            ",
            "
            t/0 -> a/n1 gpus[0,1,2,3]
            t/1 -> a/n2 gpus[0,1,2,3]
            preempt s1
            preempt s2
            ",
        );
    }

    #[test]
    fn a_gang_that_cannot_fit_even_with_preemption_preempts_nothing() {
        check(
            "
            node a/n1 gpus=4xA100
            node a/n2 gpus=4xA100
            running s1 job=scav node=a/n1 gpus=0,1 prio=-1 preemptible
            running s2 job=keep node=a/n2 gpus=0,1 prio=-1
            job t training n=2 gpus=4
            ",
            "
            unplaced t/0: no node fits 4 free GPUs, 1 CPU and 1GiB of memory: 2 nodes removed by gpu_count
              filtered: gpu_count=2
            unplaced t/1: no node fits 4 free GPUs, 1 CPU and 1GiB of memory: 2 nodes removed by gpu_count
              filtered: gpu_count=2
            ",
        );
    }

    #[test]
    fn images_need_a_container_runtime_and_commands_the_process_runtime() {
        check(
            "
            node a/n1 runtimes=process
            node b/n1 runtimes=kubernetes
            job img batch
            job cmd batch command
            job img2 batch cpus=64
            ",
            "
            img/0 -> b/n1
            cmd/0 -> a/n1
            unplaced img2/0: no node fits 64 CPUs and 1GiB of memory: 1 node removed by runtime, 1 by cpu
              filtered: runtime=1 cpu=1
            ",
        );
    }

    #[test]
    fn every_filter_is_counted_in_order() {
        check(
            "
            node a/n1 gpus=8xA100 down
            node a/n2 gpus=8xL4:24
            node a/n3 gpus=8xA100 mem=16
            node a/n4 gpus=8xA100 used-gpus=0,1,2,3,4,5,6
            node a/n5 gpus=8xA100 cpus=0.5
            node a/n6 gpus=8xA100 used-gpus=0,1,2,3,4,5,6
            job m batch gpus=2 model=A100 mem=32
            ",
            "
            unplaced m/0: no node fits 2 free A100 GPUs, 1 CPU and 32GiB of memory: 2 nodes removed by gpu_count, 1 by not_ready, 1 by gpu_model, 1 by cpu, 1 by memory
              filtered: not_ready=1 gpu_model=1 gpu_count=2 cpu=1 memory=1
            ",
        );
    }

    #[test]
    fn a_model_no_node_has_is_filtered_by_gpu_model() {
        check(
            "
            node a/n1 gpus=8xA100
            job m serving n=2 gpus=1 model=B200
            ",
            "
            unplaced m/0: no node fits 1 free B200 GPU, 1 CPU and 1GiB of memory: 1 node removed by gpu_model
              filtered: gpu_model=1
            unplaced m/1: no node fits 1 free B200 GPU, 1 CPU and 1GiB of memory: 1 node removed by gpu_model
              filtered: gpu_model=1
            ",
        );
    }

    #[test]
    fn explanations_list_at_most_the_best_candidates() {
        check(
            "
            policy explain=2
            node a/n1 site=east gpus=8xA100 used-gpus=0,1,2,3
            node a/n2 site=east gpus=8xA100 used-gpus=0,1
            node a/n3 site=east gpus=8xA100
            node b/n1 site=west gpus=8xA100 used-gpus=0,1,2,3,4,5
            node b/n2 site=west gpus=8xA100 used-gpus=0,1,2,3,4,5
            job t training n=5 gpus=4
            ",
            "
            unplaced t/0: the 5 workers do not fit together on any one site, even preempting lower-priority work; each would fit alone on 3 nodes
              filtered: gpu_count=2 gang=3
              candidates: a/n1 a/n2
            unplaced t/1: the 5 workers do not fit together on any one site, even preempting lower-priority work; each would fit alone on 3 nodes
              filtered: gpu_count=2 gang=3
              candidates: a/n1 a/n2
            unplaced t/2: the 5 workers do not fit together on any one site, even preempting lower-priority work; each would fit alone on 3 nodes
              filtered: gpu_count=2 gang=3
              candidates: a/n1 a/n2
            unplaced t/3: the 5 workers do not fit together on any one site, even preempting lower-priority work; each would fit alone on 3 nodes
              filtered: gpu_count=2 gang=3
              candidates: a/n1 a/n2
            unplaced t/4: the 5 workers do not fit together on any one site, even preempting lower-priority work; each would fit alone on 3 nodes
              filtered: gpu_count=2 gang=3
              candidates: a/n1 a/n2
            ",
        );
    }

    #[test]
    fn priority_then_fifo() {
        check(
            "
            node a/n1 gpus=2xA100
            job first batch gpus=1 order=2
            job second batch gpus=1 order=1
            job vip batch gpus=1 prio=5 order=3
            ",
            "
            vip/0 -> a/n1 gpus[0]
            second/0 -> a/n1 gpus[1]
            unplaced first/0: no node fits 1 free GPU, 1 CPU and 1GiB of memory: 1 node removed by gpu_count
              filtered: gpu_count=1
            ",
        );
    }

    #[test]
    fn a_pass_makes_at_most_the_policy_s_placements() {
        check(
            "
            policy max=3
            node a/n1 gpus=8xA100
            job b batch n=5 gpus=1
            job c batch gpus=1
            ",
            "
            b/0 -> a/n1 gpus[0]
            b/1 -> a/n1 gpus[1]
            b/2 -> a/n1 gpus[2]
            ",
        );
    }

    #[test]
    fn a_gang_waits_for_a_pass_with_room_and_one_too_large_is_explained() {
        check(
            "
            policy max=3
            node a/n1 gpus=8xA100
            job b batch n=2 gpus=1 prio=2
            job t training n=2 gpus=1 prio=1
            job c batch gpus=1
            ",
            "
            b/0 -> a/n1 gpus[0]
            b/1 -> a/n1 gpus[1]
            ",
        );
        check(
            "
            policy max=3
            node a/n1 gpus=8xA100
            job t training n=4 gpus=1 prio=1
            job c batch gpus=1
            ",
            "
            c/0 -> a/n1 gpus[0]
            unplaced t/0: the gang has 4 workers, more than the 3 placements one pass may make (placements_per_pass_max)
              filtered: 
            unplaced t/1: the gang has 4 workers, more than the 3 placements one pass may make (placements_per_pass_max)
              filtered: 
            unplaced t/2: the gang has 4 workers, more than the 3 placements one pass may make (placements_per_pass_max)
              filtered: 
            unplaced t/3: the gang has 4 workers, more than the 3 placements one pass may make (placements_per_pass_max)
              filtered: 
            ",
        );
    }

    #[test]
    fn cpu_and_memory_are_taken_as_the_pass_goes() {
        check(
            "
            node a/n1 cpus=8 mem=32 used-cpus=2
            job j batch n=4 cpus=2.5 mem=8
            ",
            "
            j/0 -> a/n1
            j/1 -> a/n1
            unplaced j/2: no node fits 2.5 CPUs and 8GiB of memory: 1 node removed by cpu
              filtered: cpu=1
            unplaced j/3: no node fits 2.5 CPUs and 8GiB of memory: 1 node removed by cpu
              filtered: cpu=1
            ",
        );
    }

    #[test]
    fn an_empty_cluster_is_explained() {
        check(
            "job j batch",
            "
            unplaced j/0: the cluster has no nodes
              filtered: 
            ",
        );
    }

    // Properties over random fleets and queues.

    #[derive(Debug, Clone)]
    struct NodeSeed {
        site: usize,
        cloud: bool,
        ready: bool,
        cpus: u64,
        memory_gib: u64,
        n_gpus: u32,
        model: usize,
        used_gpus: u32,
        used_cpu_percent: u64,
        gpu_cost: u32,
        runtimes: u8,
        running: Option<(i32, bool, usize)>,
    }

    #[derive(Debug, Clone)]
    struct JobSeed {
        kind: usize,
        n_units: u32,
        parallelism: u32,
        n_gpus: u32,
        model: Option<usize>,
        cpu_millis: u32,
        memory_gib: u64,
        team: usize,
        priority: i32,
        prefer: usize,
        site: Option<usize>,
        cap: Option<u32>,
        image: bool,
    }

    const SITES: [&str; 3] = ["east", "west", "north"];
    const MODELS: [&str; 2] = ["A100", "H100"];
    const TEAMS: [&str; 3] = ["vision", "nlp", "speech"];

    fn node_seed() -> impl Strategy<Value = NodeSeed> {
        (
            (
                0..3usize,
                any::<bool>(),
                prop::bool::weighted(0.9),
                1..=8u64,
                4..=64u64,
                0..=8u32,
                0..2usize,
            ),
            (any::<u32>(), 0..=70u64, 1..=3u32, 1..8u8),
            prop::option::of((-3..=3i32, any::<bool>(), 0..3usize)),
        )
            .prop_map(
                |(
                    (site, cloud, ready, cpus, memory_gib, n_gpus, model),
                    (used_gpus, used_cpu_percent, gpu_cost, runtimes),
                    running,
                )| NodeSeed {
                    site,
                    cloud,
                    ready,
                    cpus,
                    memory_gib,
                    n_gpus,
                    model,
                    used_gpus,
                    used_cpu_percent,
                    gpu_cost,
                    runtimes,
                    running,
                },
            )
    }

    fn job_seed() -> impl Strategy<Value = JobSeed> {
        (
            (
                0..3usize,
                1..=4u32,
                1..=4u32,
                0..=4u32,
                prop::option::of(0..2usize),
            ),
            (
                prop::sample::select(vec![500u32, 1000, 2000, 4000]),
                1..=16u64,
                0..3usize,
                -3..=3i32,
            ),
            (
                0..3usize,
                prop::option::of(0..3usize),
                prop::option::of(1..=40u32),
                any::<bool>(),
            ),
        )
            .prop_map(
                |(
                    (kind, n_units, parallelism, n_gpus, model),
                    (cpu_millis, memory_gib, team, priority),
                    (prefer, site, cap, image),
                )| JobSeed {
                    kind,
                    n_units,
                    parallelism,
                    n_gpus,
                    model,
                    cpu_millis,
                    memory_gib,
                    team,
                    priority,
                    prefer,
                    site,
                    cap,
                    image,
                },
            )
    }

    fn build(
        nodes: &[NodeSeed],
        jobs: &[JobSeed],
        quotas: &[Option<u32>],
    ) -> (ClusterView, Vec<QueuedJob>) {
        let mut view = ClusterView {
            nodes: Vec::new(),
            running: Vec::new(),
            team_gpu_quota: BTreeMap::new(),
        };
        for (idx, seed) in nodes.iter().enumerate() {
            let key = NodeKey {
                agent_id: format!("agent-{}", idx / 2),
                node: format!("n{}", idx % 2),
            };
            let gpus: Vec<GpuSlot> = (0..seed.n_gpus)
                .map(|index| {
                    // Some nodes mix models.
                    let model = (seed.model + usize::from(index >= 6)) % MODELS.len();
                    GpuSlot {
                        index,
                        model: MODELS[model].into(),
                        memory_bytes: (40 + 40 * model as u64) << 30,
                    }
                })
                .collect();
            let used_gpus: BTreeSet<u32> = (0..seed.n_gpus)
                .filter(|i| seed.used_gpus & (1 << i) != 0)
                .collect();
            let cpu_millis = seed.cpus * 8000;
            let memory_bytes = seed.memory_gib << 30;
            let used_cpu_millis = cpu_millis * seed.used_cpu_percent / 100;
            let used_memory_bytes = memory_bytes * seed.used_cpu_percent / 100;
            let runtimes = [
                RuntimeKind::Kubernetes,
                RuntimeKind::Docker,
                RuntimeKind::Process,
            ]
            .into_iter()
            .enumerate()
            .filter(|(bit, _)| seed.runtimes & (1 << bit) != 0)
            .map(|(_, runtime)| runtime)
            .collect();
            if let Some((priority, preemptible, team)) = seed.running {
                // One allocation holds everything in use on the node.
                view.running.push(RunningUnit {
                    allocation_id: format!("alloc-{idx}"),
                    job_id: format!("running-{}", idx % 3),
                    team: TEAMS[team].into(),
                    node: key.clone(),
                    priority,
                    preemptible,
                    cpu_millis: used_cpu_millis,
                    memory_bytes: used_memory_bytes,
                    gpus: used_gpus.iter().copied().collect(),
                });
            }
            view.nodes.push(NodeState {
                key,
                site: SITES[seed.site].into(),
                site_kind: if seed.cloud {
                    SiteKind::Cloud
                } else {
                    SiteKind::OnPrem
                },
                runtimes,
                ready: seed.ready,
                cpu_millis,
                memory_bytes,
                gpus,
                cost_per_gpu_hour: f64::from(seed.gpu_cost),
                cost_per_cpu_hour: 0.05,
                used_cpu_millis,
                used_memory_bytes,
                used_gpus,
            });
        }
        for (team, quota) in TEAMS.iter().zip(quotas) {
            if let Some(quota) = quota {
                view.team_gpu_quota.insert(team.to_string(), *quota);
            }
        }
        let queue = jobs
            .iter()
            .enumerate()
            .map(|(idx, seed)| {
                let kind = [JobKind::Training, JobKind::Batch, JobKind::Serving][seed.kind];
                let spec = JobSpec {
                    name: format!("job-{idx}"),
                    team: TEAMS[seed.team].into(),
                    kind,
                    image: seed.image.then(|| "image".to_string()),
                    command: vec!["run".into()],
                    env: BTreeMap::new(),
                    resources: jobspec::Resources {
                        n_gpus: seed.n_gpus,
                        gpu_model: seed
                            .model
                            .filter(|_| seed.n_gpus > 0)
                            .map(|m| MODELS[m].to_string()),
                        cpu_millis: seed.cpu_millis,
                        memory_bytes: seed.memory_gib << 30,
                    },
                    placement: jobspec::Placement {
                        sites: seed
                            .site
                            .map(|s| vec![SITES[s].to_string()])
                            .unwrap_or_default(),
                        prefer: [
                            PlacementPreference::Cheapest,
                            PlacementPreference::OnPremFirst,
                            PlacementPreference::Fastest,
                        ][seed.prefer],
                        max_cost_per_hour: seed.cap.map(f64::from),
                    },
                    priority: seed.priority,
                    preemptible: true,
                    pull: false,
                    outputs: Vec::new(),
                    inputs: Vec::new(),
                    training: (kind == JobKind::Training).then(|| Training {
                        n_workers: seed.n_units,
                        ..Training::default()
                    }),
                    batch: (kind == JobKind::Batch).then(|| Batch {
                        n_shards: seed.n_units,
                        parallelism: Some(seed.parallelism.min(seed.n_units)),
                        ..Batch::default()
                    }),
                    serving: (kind == JobKind::Serving).then(|| Serving {
                        n_replicas: seed.n_units,
                        ..Serving::default()
                    }),
                };
                QueuedJob {
                    // Some queued jobs share an id with running work (spread, parallelism).
                    job_id: if idx % 4 == 3 {
                        format!("running-{}", idx % 3)
                    } else {
                        format!("job-{idx}")
                    },
                    spec: spec.into(),
                    units: (0..seed.n_units).collect(),
                    order: (jobs.len() - idx) as u64,
                }
            })
            .collect();
        (view, queue)
    }

    /// Every invariant the scheduler promises, checked from the outside.
    fn check_invariants(
        view: &ClusterView,
        queue: &[QueuedJob],
        policy: &Policy,
        decisions: &Decisions,
    ) {
        assert!(decisions.placements.len() <= policy.placements_per_pass_max);
        let preempted: BTreeSet<&str> = decisions.preemptions.iter().map(String::as_str).collect();
        assert_eq!(
            preempted.len(),
            decisions.preemptions.len(),
            "an allocation preempted twice"
        );
        let live: Vec<&RunningUnit> = view
            .running
            .iter()
            .filter(|r| !preempted.contains(r.allocation_id.as_str()))
            .collect();
        let job_of = |job_id: &str| queue.iter().find(|j| j.job_id == job_id).unwrap();

        for node in &view.nodes {
            let placed: Vec<&Placement> = decisions
                .placements
                .iter()
                .filter(|p| p.node == node.key)
                .collect();
            let victims: Vec<&RunningUnit> = view
                .running
                .iter()
                .filter(|r| r.node == node.key && preempted.contains(r.allocation_id.as_str()))
                .collect();
            let cpu = node.used_cpu_millis - victims.iter().map(|r| r.cpu_millis).sum::<u64>()
                + placed.iter().map(|p| p.cpu_millis).sum::<u64>();
            let memory = node.used_memory_bytes
                - victims.iter().map(|r| r.memory_bytes).sum::<u64>()
                + placed.iter().map(|p| p.memory_bytes).sum::<u64>();
            assert!(cpu <= node.cpu_millis, "{:?} over its CPU: {cpu}", node.key);
            assert!(
                memory <= node.memory_bytes,
                "{:?} over its memory: {memory}",
                node.key
            );
            let mut held: BTreeSet<u32> = live
                .iter()
                .filter(|r| r.node == node.key)
                .flat_map(|r| r.gpus.clone())
                .collect();
            let victim_gpus: BTreeSet<u32> = victims.iter().flat_map(|r| r.gpus.clone()).collect();
            held.extend(node.used_gpus.difference(&victim_gpus));
            for p in &placed {
                let spec = &job_of(&p.job_id).spec;
                assert_eq!(p.gpus.len() as u32, spec.resources.n_gpus);
                assert!(node.ready);
                if !spec.placement.sites.is_empty() {
                    assert!(spec.placement.sites.contains(&node.site));
                }
                for &index in &p.gpus {
                    let slot = node
                        .gpus
                        .iter()
                        .find(|g| g.index == index)
                        .expect("a GPU of the node");
                    if let Some(model) = &spec.resources.gpu_model {
                        assert_eq!(&slot.model, model);
                    }
                    assert!(
                        held.insert(index),
                        "GPU {index} of {:?} promised twice",
                        node.key
                    );
                }
            }
        }
        for victim in view
            .running
            .iter()
            .filter(|r| preempted.contains(r.allocation_id.as_str()))
        {
            assert!(
                victim.preemptible,
                "{} is not preemptible",
                victim.allocation_id
            );
            let stronger = decisions.placements.iter().any(|p| {
                p.node == victim.node && job_of(&p.job_id).spec.priority > victim.priority
            });
            assert!(
                stronger,
                "{} preempted for nothing of higher priority",
                victim.allocation_id
            );
        }
        for job in queue {
            let placed: Vec<&Placement> = decisions
                .placements
                .iter()
                .filter(|p| p.job_id == job.job_id)
                .collect();
            let unplaced = decisions
                .unplaced
                .iter()
                .filter(|u| u.job_id == job.job_id)
                .count();
            for p in &placed {
                assert!(!decisions
                    .unplaced
                    .iter()
                    .any(|u| u.job_id == p.job_id && u.unit == p.unit));
            }
            match job.spec.kind {
                JobKind::Training => {
                    assert!(
                        placed.is_empty() || placed.len() == job.units.len(),
                        "a gang split: {placed:?}"
                    );
                    let sites: BTreeSet<&str> = placed
                        .iter()
                        .map(|p| {
                            view.nodes
                                .iter()
                                .find(|n| n.key == p.node)
                                .unwrap()
                                .site
                                .as_str()
                        })
                        .collect();
                    assert!(sites.len() <= 1, "a gang over sites {sites:?}");
                    assert!(unplaced == 0 || unplaced == job.units.len());
                }
                JobKind::Batch => {
                    let running = live.iter().filter(|r| r.job_id == job.job_id).count();
                    let parallelism = job.spec.batch.as_ref().unwrap().parallelism() as usize;
                    assert!(placed.is_empty() || placed.len() + running <= parallelism);
                }
                JobKind::Serving => {}
            }
        }
        for (team, &quota) in &view.team_gpu_quota {
            let placed: u64 = decisions
                .placements
                .iter()
                .filter(|p| &job_of(&p.job_id).spec.team == team)
                .map(|p| p.gpus.len() as u64)
                .sum();
            let held: u64 = live
                .iter()
                .filter(|r| &r.team == team)
                .map(|r| r.gpus.len() as u64)
                .sum();
            assert!(
                placed == 0 || held + placed <= u64::from(quota),
                "team {team}: {held} + {placed} > {quota}"
            );
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn random_fleets_and_queues_keep_every_invariant(
            nodes in prop::collection::vec(node_seed(), 0..12),
            jobs in prop::collection::vec(job_seed(), 0..10),
            quotas in prop::collection::vec(prop::option::of(0..=16u32), 3),
            placements_per_pass_max in 1..=40usize,
            explain_candidates_max in 0..=3usize,
        ) {
            let (view, queue) = build(&nodes, &jobs, &quotas);
            let policy = Policy { placements_per_pass_max, explain_candidates_max };
            let decisions = schedule(&view, &queue, &policy);
            check_invariants(&view, &queue, &policy, &decisions);
                        for unplaced in &decisions.unplaced {
                let explanation = &unplaced.explanation;
                prop_assert!(explanation.candidates.len() <= explain_candidates_max);
                prop_assert!(!explanation.reason.is_empty());
                // Each node is counted once, by the first filter that removes it (a gang's
                // candidates under `gang`); only a gang too large for any pass lists none.
                let counted: usize = explanation.filtered.iter().map(|(_, n)| n).sum();
                prop_assert!(explanation.filtered.is_empty() || counted == explanation.nodes_total);
                prop_assert_eq!(explanation.nodes_total, view.nodes.len());
            }
            prop_assert_eq!(schedule(&view, &queue, &policy), decisions.clone());
            // The order of the inputs does not matter: only priorities, `order` and ids do.
            let mut shuffled = view.clone();
            shuffled.nodes.reverse();
            shuffled.running.reverse();
            let reversed: Vec<QueuedJob> = queue.iter().rev().cloned().collect();
            prop_assert_eq!(schedule(&shuffled, &reversed, &policy), decisions);
        }
    }
}
