//! A Raft cluster of 3 or 5 coordinators in simulation: the real raft-rs replicas and the real
//! replicated state machine, over a network that loses, delays and reorders messages and can be
//! partitioned, with nodes that crash and restart from what they had persisted. Everything not yet
//! made durable by a Ready pass (raft's unstable log, in-flight proposals, the lazily written
//! commit index) is lost in a crash, and some crashes strike in the middle of a write, after a
//! leader has already sent the appends raft lets it send before its own write is durable.
//!
//! Checked at every step (Raft paper section in brackets):
//! - at most one leader per term [5.2, Election Safety];
//! - a committed entry never changes or disappears on any node [5.3/5.4, Log Matching and Leader
//!   Completeness]: every node's committed prefix agrees with every other's;
//! - replicas that have applied the same index hold the same state [5.3, State Machine Safety];
//! - and at the end, after a healing phase with no faults: every acknowledged submission is
//!   present exactly once on every node, all nodes have applied the same index with equal state,
//!   and there is a leader.

use crate::Rng;
use gantry_coordinator::core::scheduler;
use gantry_coordinator::core::state::{Member, Outcome, State};
use gantry_coordinator::replica::storage::{Durable, LogStore, PersistBatch, Recovered};
use gantry_coordinator::replica::{Replica, ReplicaConfig};
use gantry_protocol::replicated::{self, Command, Op};
use gantry_protocol::AllocationPhase;
use raft::eraftpb::{Message, MessageType};
use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;

/// What survives a crash: everything `persist` was given and finished. A disk can be set to
/// crash its node in the middle of the next write: that write is lost, after the messages raft
/// let the node send before writing have already gone out.
#[derive(Clone, Default)]
pub struct SimDisk {
    stored: Rc<RefCell<LogStore>>,
    crash_during_next_write: Rc<std::cell::Cell<bool>>,
}

impl Durable for SimDisk {
    type Error = std::io::Error;

    fn persist(&mut self, batch: &PersistBatch) -> Result<(), Self::Error> {
        if self.crash_during_next_write.replace(false) {
            return Err(std::io::Error::other(
                "crashed before the write was durable",
            ));
        }
        self.stored.borrow_mut().apply(batch);
        Ok(())
    }

    fn load(&self) -> Result<Option<Recovered>, Self::Error> {
        let store = self.stored.borrow();
        let recovered = store.to_recovered();
        let empty = recovered.entries.is_empty()
            && recovered.snapshot.get_metadata().index == 0
            && recovered.hard_state == Default::default();
        Ok((!empty).then_some(recovered))
    }
}

#[derive(Debug, Clone)]
pub struct SimConfig {
    pub n_nodes: usize,
    /// Ticks with faults, then ticks of healing with none.
    pub fault_ticks: u64,
    pub heal_ticks: u64,
    pub loss_percent: u64,
    pub delay_ticks_max: u64,
    /// Chance per tick, in percent, that a client submits.
    pub submit_percent: u64,
    /// Snapshot and compact often, so that snapshots are sent and restored during the run.
    pub snapshot_every_entries: u64,
}

impl SimConfig {
    pub fn new(n_nodes: usize) -> Self {
        Self {
            n_nodes,
            fault_ticks: 1_500,
            heal_ticks: 600,
            loss_percent: 5,
            delay_ticks_max: 3,
            submit_percent: 15,
            snapshot_every_entries: 100,
        }
    }
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    pub committed_entries: u64,
    pub acknowledged: usize,
    pub crashes: u64,
    /// Crashes that struck in the middle of a write.
    pub crashes_mid_write: u64,
    pub partitions: u64,
    pub leaders_elected: usize,
}

struct InFlight {
    deliver_at: u64,
    order: u64,
    message: Message,
}

struct Pending {
    node: usize,
    key: String,
    proposed_at: u64,
}

/// A client gives up on an answer after this many ticks and retries with the same key.
const CLIENT_TIMEOUT_TICKS: u64 = 200;

struct Sim {
    seed: u64,
    config: SimConfig,
    rng: Rng,
    now: u64,
    nodes: Vec<Option<Replica<State, SimDisk>>>,
    disks: Vec<SimDisk>,
    network: Vec<InFlight>,
    next_order: u64,
    /// Group of each node while a partition lasts; messages cross only within a group.
    partition: Option<Vec<u8>>,
    leaders_by_term: BTreeMap<u64, u64>,
    committed: BTreeMap<u64, (u64, Vec<u8>)>,
    checked_commit: Vec<u64>,
    state_at_index: BTreeMap<u64, Vec<u8>>,
    last_checked_applied: Vec<u64>,
    pending: BTreeMap<u64, Pending>,
    /// Nodes whose disk will fail their next write, to crash them mid-Ready.
    crashing: Vec<bool>,
    /// What each simulated agent will report about an allocation, and when.
    agent_plans: BTreeMap<String, (u64, AllocationPhase)>,
    place_in_flight: Option<(u64, u64)>,
    agents_down: BTreeSet<String>,
    acknowledged: BTreeMap<String, String>,
    unacknowledged: Vec<String>,
    next_request: u64,
    next_key: u64,
    report: Report,
}

fn ids(n: usize) -> Vec<u64> {
    (1..=n as u64).collect()
}

/// The simulated fleet, known to every replica from the start: two GPU hosts and two CPU hosts.
pub const AGENTS: [(&str, u32); 4] = [
    ("agent-a", 4),
    ("agent-b", 4),
    ("agent-c", 0),
    ("agent-d", 0),
];

fn register(name: &str, n_gpus: u32) -> gantry_protocol::Register {
    gantry_protocol::Register {
        name: name.into(),
        software_version: "sim".into(),
        site: if n_gpus > 0 {
            "gpu-site".into()
        } else {
            "cpu-site".into()
        },
        site_kind: gantry_protocol::SiteKind::OnPrem,
        cost_per_gpu_hour: 1.0,
        cost_per_cpu_hour: 0.01,
        labels: Default::default(),
        runtimes: vec![gantry_protocol::RuntimeReport {
            kind: gantry_protocol::RuntimeKind::Process,
            detail: "sim".into(),
        }],
        serving_ports: (31_000, 32_999),
        address: None,
        nodes: vec![gantry_protocol::NodeCapacity {
            name: "local".into(),
            hostname: name.into(),
            os: "sim".into(),
            arch: "sim".into(),
            cpu_cores: 8,
            memory_bytes: 32 << 30,
            disk_bytes: 1 << 40,
            disk_free_bytes: 1 << 40,
            gpus: (0..n_gpus)
                .map(|index| gantry_protocol::Gpu {
                    index,
                    model: "A100".into(),
                    memory_bytes: 80 << 30,
                    uuid: None,
                    source: gantry_protocol::GpuSource::Declared,
                })
                .collect(),
        }],
    }
}

/// The spec submitted under key number `n`: the same key always means the same spec.
fn spec_for(n: u64) -> String {
    let value = match n % 3 {
        0 => {
            serde_json::json!({ "name": format!("train-{n}"), "kind": "training", "command": ["train"],
            "resources": { "gpus": 1 + n % 2, "cpus": 1, "memory": "1GiB" }, "training": { "workers": 2, "max_restarts": 50 } })
        }
        1 => {
            serde_json::json!({ "name": format!("batch-{n}"), "kind": "batch", "command": ["infer"],
            "resources": { "cpus": 0.5, "memory": "512MiB" }, "batch": { "shards": 1 + n % 3, "max_retries": 50 } })
        }
        _ => {
            serde_json::json!({ "name": format!("gpu-batch-{n}"), "kind": "batch", "command": ["embed"],
            "resources": { "gpus": 1, "cpus": 2, "memory": "4GiB" }, "batch": { "shards": 2, "parallelism": 1, "max_retries": 50 } })
        }
    };
    gantry_protocol::jobspec::from_json_value(value)
        .expect("the simulator's specs are valid")
        .canonical_json()
}

fn initial_state(n: usize) -> State {
    let mut state = State::default();
    for (name, n_gpus) in AGENTS {
        state.agents.insert(
            name.into(),
            gantry_coordinator::core::state::AgentRecord {
                register: register(name, n_gpus),
                state: gantry_coordinator::core::state::AgentState::Ready,
                since_unix_ms: 0,
            },
        );
    }
    for id in ids(n) {
        state.members.insert(
            id,
            Member {
                quic_addr: format!("node{id}:7443"),
                http_addr: format!("node{id}:7080"),
            },
        );
    }
    state
}

impl Sim {
    fn new(seed: u64, config: SimConfig) -> Result<Self, String> {
        let n = config.n_nodes;
        let disks: Vec<SimDisk> = (0..n).map(|_| SimDisk::default()).collect();
        let mut sim = Self {
            seed,
            rng: Rng::new(seed),
            now: 0,
            nodes: (0..n).map(|_| None).collect(),
            disks,
            network: Vec::new(),
            next_order: 0,
            partition: None,
            leaders_by_term: BTreeMap::new(),
            committed: BTreeMap::new(),
            checked_commit: vec![0; n],
            state_at_index: BTreeMap::new(),
            last_checked_applied: vec![0; n],
            pending: BTreeMap::new(),
            crashing: vec![false; n],
            agent_plans: BTreeMap::new(),
            place_in_flight: None,
            agents_down: BTreeSet::new(),
            acknowledged: BTreeMap::new(),
            unacknowledged: Vec::new(),
            next_request: 1,
            next_key: 1,
            report: Report::default(),
            config,
        };
        for idx in 0..n {
            sim.start(idx, true)?;
        }
        Ok(sim)
    }

    fn fail(&self, what: String) -> String {
        format!(
            "seed {} ({} nodes) at tick {}: {what}",
            self.seed, self.config.n_nodes, self.now
        )
    }

    fn start(&mut self, idx: usize, bootstrap: bool) -> Result<(), String> {
        let mut config = ReplicaConfig::new(idx as u64 + 1);
        config.snapshot_every_entries = self.config.snapshot_every_entries;
        // A timeout drawn from the seed, fixed for this incarnation of the node (see ReplicaConfig).
        config.min_election_tick =
            config.election_tick + self.rng.below(config.election_tick as u64) as usize;
        config.max_election_tick = config.min_election_tick + 1;
        let voters = ids(self.config.n_nodes);
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let replica = Replica::open(
            config,
            initial_state(self.config.n_nodes),
            self.disks[idx].clone(),
            bootstrap.then_some(voters.as_slice()),
            &logger,
        )
        .map_err(|e| self.fail(format!("node {} failed to open: {e}", idx + 1)))?;
        self.nodes[idx] = Some(replica);
        self.last_checked_applied[idx] = 0;
        Ok(())
    }

    fn crash(&mut self, idx: usize) {
        self.nodes[idx] = None;
        self.crashing[idx] = false;
        self.disks[idx].crash_during_next_write.set(false);
        self.report.crashes += 1;
        self.give_up_on(|pending| pending.node == idx);
    }

    /// The client stops waiting for these answers (their outcome is unknown) and will retry the
    /// submissions with the same keys, as the API tells clients to.
    fn give_up_on(&mut self, which: impl Fn(&Pending) -> bool) {
        let lost: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| which(p))
            .map(|(id, _)| *id)
            .collect();
        for request_id in lost {
            let pending = self.pending.remove(&request_id).expect("listed above");
            self.unacknowledged.push(pending.key);
        }
    }

    fn connected(&self, from: u64, to: u64) -> bool {
        match &self.partition {
            Some(groups) => groups[from as usize - 1] == groups[to as usize - 1],
            None => true,
        }
    }

    /// Tells the sender whether its snapshot arrived, as the real transport does.
    fn report_snapshot(&mut self, message: &Message, delivered: bool) {
        if message.get_msg_type() == MessageType::MsgSnapshot {
            if let Some(sender) = self.nodes[message.from as usize - 1].as_mut() {
                sender.report_snapshot(message.to, delivered);
            }
        }
    }

    fn send(&mut self, messages: Vec<Message>, lossy: bool) {
        for message in messages {
            if lossy && self.rng.below(100) < self.config.loss_percent {
                self.report_snapshot(&message, false);
                continue;
            }
            let deliver_at = self.now + 1 + self.rng.below(self.config.delay_ticks_max);
            self.next_order += 1;
            // Equal delivery times are shuffled by a random order key: reordering.
            let order = self.rng.next_u64();
            self.network.push(InFlight {
                deliver_at,
                order,
                message,
            });
        }
    }

    fn deliver(&mut self) -> Result<(), String> {
        let mut due: Vec<InFlight> = Vec::new();
        let mut later = Vec::new();
        for in_flight in self.network.drain(..) {
            if in_flight.deliver_at <= self.now {
                due.push(in_flight);
            } else {
                later.push(in_flight);
            }
        }
        self.network = later;
        due.sort_by_key(|m| (m.deliver_at, m.order));
        for in_flight in due {
            let (from, to) = (in_flight.message.from, in_flight.message.to);
            let reachable = self.connected(from, to) && self.nodes[to as usize - 1].is_some();
            self.report_snapshot(&in_flight.message, reachable);
            if !reachable {
                continue;
            }
            let node = self.nodes[to as usize - 1].as_mut().expect("reachable");
            node.step(in_flight.message)
                .map_err(|e| format!("node {to} step failed: {e}"))?;
        }
        Ok(())
    }

    fn live(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&i| self.nodes[i].is_some())
            .collect()
    }

    fn submit(&mut self, key: String) {
        let live = self.live();
        if live.is_empty() {
            self.unacknowledged.push(key);
            return;
        }
        // The client asks a random node; a follower names the leader, and the client goes there.
        let mut idx = live[self.rng.below(live.len() as u64) as usize];
        let node = self.nodes[idx].as_ref().expect("live");
        if !node.is_leader() {
            match node.leader_id().map(|id| id as usize - 1) {
                Some(leader) if self.nodes[leader].as_ref().is_some_and(|n| n.is_leader()) => {
                    idx = leader
                }
                _ => {
                    self.unacknowledged.push(key);
                    return;
                }
            }
        }
        let request_id = self.next_request;
        self.next_request += 1;
        let command = Command {
            request_id,
            at_unix_ms: self.now * 100,
            actor: "sim".into(),
            op: Op::SubmitJob {
                job_id: format!("j-{request_id}"),
                idempotency_key: Some(key.clone()),
                spec_json: spec_for(key[1..].parse().expect("keys are k<number>")),
            },
        };
        match self.nodes[idx]
            .as_mut()
            .expect("live")
            .propose(replicated::encode(&command))
        {
            Ok(()) => {
                self.pending.insert(
                    request_id,
                    Pending {
                        node: idx,
                        key,
                        proposed_at: self.now,
                    },
                );
            }
            Err(_) => self.unacknowledged.push(key),
        }
    }

    fn drive_ready(&mut self, lossy: bool) -> Result<(), String> {
        for idx in 0..self.nodes.len() {
            while let Some(node) = self.nodes[idx].as_mut().filter(|node| node.has_ready()) {
                let mut early = Vec::new();
                let outcome = node.handle_ready(&mut |messages| early.extend(messages));
                self.send(early, lossy);
                let output = match outcome {
                    Ok(output) => output,
                    Err(_) if self.crashing[idx] => {
                        // The node died mid-write: whatever that write held is gone.
                        self.report.crashes_mid_write += 1;
                        self.crash(idx);
                        break;
                    }
                    Err(e) => return Err(self.fail(format!("node {} ready failed: {e}", idx + 1))),
                };
                if output.leader_changed.is_some() {
                    // A node that lost leadership may never commit what it accepted.
                    self.give_up_on(|pending| pending.node == idx);
                }
                for (_, request_id, outcome) in output.applied {
                    let Some(request_id) = request_id else {
                        continue;
                    };
                    let Some(pending) = self.pending.get(&request_id) else {
                        continue;
                    };
                    if pending.node != idx {
                        continue;
                    }
                    let pending = self.pending.remove(&request_id).expect("just seen");
                    match outcome {
                        Outcome::JobSubmitted { job_id, .. } => {
                            if let Some(previous) = self
                                .acknowledged
                                .insert(pending.key.clone(), job_id.clone())
                            {
                                if previous != job_id {
                                    return Err(self.fail(format!(
                                        "key {} acknowledged as {previous} and then as {job_id}",
                                        pending.key
                                    )));
                                }
                            }
                        }
                        other => return Err(self.fail(format!("submission answered {other:?}"))),
                    }
                }
                self.send(output.messages, lossy);
            }
        }
        Ok(())
    }

    fn check(&mut self) -> Result<(), String> {
        for idx in 0..self.nodes.len() {
            let Some(node) = self.nodes[idx].as_ref() else {
                continue;
            };
            if node.is_leader() {
                let term = node.term();
                if let Some(&other) = self.leaders_by_term.get(&term) {
                    if other != node.id() {
                        return Err(self.fail(format!(
                            "two leaders in term {term}: {other} and {}",
                            node.id()
                        )));
                    }
                } else {
                    self.leaders_by_term.insert(term, node.id());
                }
            }
            let commit = node.commit();
            for index in (self.checked_commit[idx] + 1)..=commit {
                let Some(entry) = node.log_entry(index) else {
                    continue;
                };
                let seen = (entry.term, entry.data.to_vec());
                match self.committed.get(&index) {
                    Some(expected) if *expected != seen => {
                        return Err(self.fail(format!(
                            "committed entry {index} differs on node {}: term {} vs {}",
                            node.id(),
                            seen.0,
                            expected.0
                        )));
                    }
                    Some(_) => {}
                    None => {
                        self.committed.insert(index, seen);
                    }
                }
            }
            self.checked_commit[idx] = self.checked_commit[idx].max(commit);
            let applied = node.applied();
            // Encoding the whole state is the costly part of checking; every eighth applied index is
            // compared (all nodes pass through the same indexes, so every node is compared there).
            if applied != self.last_checked_applied[idx] && applied.is_multiple_of(8) {
                self.last_checked_applied[idx] = applied;
                self.check_capacity(node.id(), node.machine())?;
                let state = node.machine().encode_snapshot();
                // The indexes a state derives as it applies entries (live jobs and allocations,
                // each job's allocations, serving jobs) must be those a snapshot rebuilds. Decoding
                // costs as much again, so this runs at every 64th index only.
                let rebuilt = match applied.is_multiple_of(64) {
                    true => Some(State::decode_snapshot(&state).map_err(|e| self.fail(e))?),
                    false => None,
                };
                if rebuilt.is_some_and(|rebuilt| rebuilt != *node.machine()) {
                    return Err(self.fail(format!(
                        "node {} derives indexes at applied index {applied} that its snapshot does not rebuild",
                        node.id()
                    )));
                }
                match self.state_at_index.get(&applied) {
                    Some(expected) if *expected != state => {
                        return Err(self.fail(format!(
                            "node {} has a different state at applied index {applied}",
                            node.id()
                        )));
                    }
                    Some(_) => {}
                    None => {
                        self.state_at_index.insert(applied, state);
                    }
                }
            }
        }
        Ok(())
    }

    fn faults(&mut self) -> Result<(), String> {
        let n = self.nodes.len();
        let roll = self.rng.below(1000);
        if roll < 2 {
            let idx = self.rng.below(n as u64) as usize;
            if self.nodes[idx].is_some() {
                self.crashing[idx] = true;
                self.disks[idx].crash_during_next_write.set(true);
            }
        } else if roll < 4 {
            let idx = self.rng.below(n as u64) as usize;
            if self.nodes[idx].is_some() {
                self.crash(idx);
            }
        } else if roll < 20 {
            let idx = self.rng.below(n as u64) as usize;
            if self.nodes[idx].is_none() {
                self.start(idx, false)?;
            }
        } else if roll < 24 && self.partition.is_none() {
            self.partition = Some((0..n).map(|_| self.rng.below(2) as u8).collect());
            self.report.partitions += 1;
        } else if roll < 40 && self.partition.is_some() {
            self.partition = None;
        }
        Ok(())
    }

    fn step(&mut self, faulty: bool) -> Result<(), String> {
        self.now += 1;
        if faulty {
            self.faults()?;
        }
        self.deliver()?;
        for idx in 0..self.nodes.len() {
            let Some(node) = self.nodes[idx].as_mut() else {
                continue;
            };
            if let Err(e) = node.tick() {
                if !self.crashing[idx] {
                    return Err(self.fail(format!("node {} tick failed: {e}", idx + 1)));
                }
                self.crash(idx);
            }
        }
        if faulty && self.rng.below(100) < self.config.submit_percent {
            let key = format!("k{}", self.next_key);
            self.next_key += 1;
            self.submit(key);
        }
        let now = self.now;
        self.give_up_on(|pending| now - pending.proposed_at > CLIENT_TIMEOUT_TICKS);
        if self.rng.below(100) < 5 && !self.unacknowledged.is_empty() {
            let at = self.rng.below(self.unacknowledged.len() as u64) as usize;
            let key = self.unacknowledged.swap_remove(at);
            self.submit(key);
        }
        self.drive_ready(faulty)?;
        self.fleet(faulty);
        self.check()
    }

    fn leader(&mut self) -> Option<&mut Replica<State, SimDisk>> {
        self.nodes
            .iter_mut()
            .flatten()
            .find(|node| node.is_leader())
    }

    fn propose_as_leader(&mut self, op: Op) -> Option<u64> {
        let request_id = self.next_request;
        self.next_request += 1;
        let command = Command {
            request_id,
            at_unix_ms: self.now * 100,
            actor: "sim-fleet".into(),
            op,
        };
        let leader = self.leader()?;
        leader
            .propose(replicated::encode(&command))
            .ok()
            .map(|_| request_id)
    }

    /// The agents and the leader's scheduler: agents report what their allocations do (some
    /// fail while faults last), go down and come back; the leader places what is queued.
    fn fleet(&mut self, faulty: bool) {
        let now = self.now;
        let Some(leader) = self.nodes.iter().flatten().find(|node| node.is_leader()) else {
            return;
        };
        // Only what the fleet needs, not a copy of the whole state.
        let active: Vec<gantry_coordinator::core::allocations::Allocation> = leader
            .machine()
            .allocations
            .values()
            .filter(|a| !a.is_final())
            .cloned()
            .collect();
        let down_agents: BTreeSet<String> = leader
            .machine()
            .agents
            .iter()
            .filter(|(_, a)| a.state != gantry_coordinator::core::state::AgentState::Ready)
            .map(|(id, _)| id.clone())
            .collect();
        let active_ids: BTreeSet<&str> = active.iter().map(|a| a.id.as_str()).collect();
        self.agent_plans
            .retain(|id, _| active_ids.contains(id.as_str()));
        for allocation in &active {
            if self.agents_down.contains(&allocation.agent_id)
                || self.agent_plans.contains_key(&allocation.id)
            {
                continue;
            }
            let plan = if allocation.stop_requested {
                (
                    now + 1,
                    AllocationPhase::Failed {
                        exit_code: None,
                        reason: "stopped".into(),
                    },
                )
            } else if allocation.phase == AllocationPhase::Pending {
                (now + 1 + self.rng.below(3), AllocationPhase::Running)
            } else if faulty && self.rng.below(10) == 0 {
                (
                    now + 2 + self.rng.below(10),
                    AllocationPhase::Failed {
                        exit_code: Some(1),
                        reason: "sim failure".into(),
                    },
                )
            } else {
                (now + 3 + self.rng.below(15), AllocationPhase::Succeeded)
            };
            self.agent_plans.insert(allocation.id.clone(), plan);
        }
        let due: Vec<(String, AllocationPhase)> = self
            .agent_plans
            .iter()
            .filter(|(_, (at, _))| *at <= now)
            .map(|(id, (_, phase))| (id.clone(), phase.clone()))
            .collect();
        for (allocation_id, phase) in due {
            self.agent_plans.remove(&allocation_id);
            self.propose_as_leader(Op::AllocationUpdate {
                allocation_id,
                phase,
            });
        }
        if faulty && self.rng.below(1000) < 3 {
            let (name, _) = AGENTS[self.rng.below(AGENTS.len() as u64) as usize];
            if self.agents_down.insert(name.to_string()) {
                self.propose_as_leader(Op::AgentDown {
                    agent_id: name.into(),
                });
            }
        }
        let bring_back = if faulty {
            self.rng.below(100) < 2
        } else {
            true
        };
        if bring_back {
            // The agent restarts: it is no longer down as far as the fleet goes.
            self.agents_down.clear();
        }
        // A live agent heartbeats, and the leader records it up again if it was down.
        for agent_id in down_agents
            .difference(&self.agents_down)
            .cloned()
            .collect::<Vec<_>>()
        {
            self.propose_as_leader(Op::AgentUp { agent_id });
        }
        if let Some((_, since)) = self.place_in_flight {
            if now - since < 50 {
                return;
            }
        }
        if !now.is_multiple_of(3) {
            return;
        }
        let Some(leader) = self.nodes.iter().flatten().find(|node| node.is_leader()) else {
            return;
        };
        let queue = leader.machine().queue(now * 100);
        if queue.is_empty() {
            return;
        }
        let view = leader.machine().cluster_view();
        let decisions = scheduler::schedule(&view, &queue, &scheduler::Policy::default());
        if decisions.placements.is_empty() && decisions.preemptions.is_empty() {
            return;
        }
        let term = self.leader().map(|l| l.term()).unwrap_or(0);
        if let Some(request_id) = self.propose_as_leader(scheduler::place_op(term, decisions)) {
            self.place_in_flight = Some((request_id, now));
        }
    }

    /// No node is promised beyond its capacity and no GPU is held by two allocations.
    fn check_capacity(&self, node_id: u64, state: &State) -> Result<(), String> {
        let mut gpus_held: BTreeMap<(&str, &str), BTreeSet<u32>> = BTreeMap::new();
        for allocation in state.allocations.values().filter(|a| !a.is_final()) {
            let held = gpus_held
                .entry((allocation.agent_id.as_str(), allocation.node.as_str()))
                .or_default();
            for gpu in &allocation.gpus {
                if !held.insert(*gpu) {
                    return Err(self.fail(format!(
                        "node {node_id}: GPU {gpu} of {} is held twice",
                        allocation.agent_id
                    )));
                }
            }
        }
        let mut used: BTreeMap<(&str, &str), (u64, u64)> = BTreeMap::new();
        for allocation in state.allocations.values().filter(|a| !a.is_final()) {
            let entry = used
                .entry((allocation.agent_id.as_str(), allocation.node.as_str()))
                .or_default();
            entry.0 += allocation.cpu_millis;
            entry.1 += allocation.memory_bytes;
        }
        for ((agent_id, node_name), (cpu_millis, memory_bytes)) in used {
            let node = state
                .agents
                .get(agent_id)
                .and_then(|a| a.register.nodes.iter().find(|n| n.name == node_name));
            let Some(node) = node else {
                return Err(self.fail(format!("node {node_id}: work is promised on {agent_id}/{node_name}, which does not exist")));
            };
            if cpu_millis > u64::from(node.cpu_cores) * 1000 || memory_bytes > node.memory_bytes {
                return Err(self.fail(format!(
                    "node {node_id}: {agent_id} is promised beyond its capacity"
                )));
            }
            let held = gpus_held
                .get(&(agent_id, node_name))
                .cloned()
                .unwrap_or_default();
            if held
                .iter()
                .any(|gpu| !node.gpus.iter().any(|g| g.index == *gpu))
            {
                return Err(self.fail(format!(
                    "node {node_id}: a GPU {agent_id} does not have is promised"
                )));
            }
        }
        Ok(())
    }

    fn run(mut self) -> Result<Report, String> {
        for _ in 0..self.config.fault_ticks {
            self.step(true)?;
        }
        self.run_rest()?;
        self.report.leaders_elected = self.leaders_by_term.len();
        self.report.committed_entries = self.committed.len() as u64;
        self.report.acknowledged = self.acknowledged.len();
        Ok(self.report)
    }

    fn run_rest(&mut self) -> Result<(), String> {
        self.partition = None;
        for idx in 0..self.nodes.len() {
            self.crashing[idx] = false;
            self.disks[idx].crash_during_next_write.set(false);
            if self.nodes[idx].is_none() {
                self.start(idx, false)?;
            }
        }
        for _ in 0..self.config.heal_ticks {
            self.step(false)?;
        }
        // Whatever is still unacknowledged is retried until it is acknowledged or time runs out.
        let mut rounds = 0;
        while (!self.unacknowledged.is_empty() || !self.pending.is_empty()) && rounds < 2_000 {
            rounds += 1;
            if let Some(key) = self.unacknowledged.pop() {
                self.submit(key);
            }
            self.step(false)?;
        }
        // The fleet finishes the accepted work: every acknowledged job must reach a final state.
        let mut ticks = 0;
        while ticks < 4_000 && !self.all_acknowledged_jobs_final() {
            ticks += 1;
            self.step(false)?;
        }
        // Quiet ticks, so that followers learn the final commit index from heartbeats.
        for _ in 0..50 {
            self.step(false)?;
        }
        self.converged()
    }

    fn all_acknowledged_jobs_final(&self) -> bool {
        let Some(node) = self.nodes.iter().flatten().find(|n| n.is_leader()) else {
            return false;
        };
        let state = node.machine();
        self.acknowledged.values().all(|job_id| {
            state
                .jobs
                .get(job_id)
                .is_some_and(|job| job.state.is_final())
        })
    }

    fn converged(&self) -> Result<(), String> {
        let nodes: Vec<&Replica<State, SimDisk>> = self.nodes.iter().flatten().collect();
        if nodes.len() != self.nodes.len() {
            return Err(self.fail("a node is still down after healing".into()));
        }
        if nodes.iter().filter(|n| n.is_leader()).count() != 1 {
            return Err(self.fail("no single leader after healing".into()));
        }
        let applied = nodes[0].applied();
        let state = nodes[0].machine();
        for node in &nodes {
            if node.applied() != applied || node.machine() != state {
                return Err(self.fail(format!(
                    "node {} applied {} with its own state, node 1 applied {applied}",
                    node.id(),
                    node.applied()
                )));
            }
        }
        for (key, job_id) in &self.acknowledged {
            let matching: Vec<_> = state
                .jobs
                .values()
                .filter(|job| job.idempotency_key.as_deref() == Some(key))
                .collect();
            if matching.len() != 1 || &matching[0].id != job_id {
                return Err(self.fail(format!(
                    "acknowledged {key} as {job_id}, but the state has {} job(s) for it",
                    matching.len()
                )));
            }
        }
        for (key, job_id) in &self.acknowledged {
            let job = &state.jobs[job_id];
            if !job.state.is_final() {
                return Err(self.fail(format!(
                    "job {job_id} ({key}) is still {} after the faults stopped",
                    job.state.as_str()
                )));
            }
        }
        if !self.unacknowledged.is_empty() || !self.pending.is_empty() {
            return Err(self.fail(format!(
                "{} submissions never acknowledged after healing",
                self.unacknowledged.len() + self.pending.len()
            )));
        }
        Ok(())
    }
}

/// Runs one seed. The error names the seed and the tick; the same seed replays the same run.
pub fn run(seed: u64, config: SimConfig) -> Result<Report, String> {
    Sim::new(seed, config)?.run()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seeds() -> u64 {
        std::env::var("GANTRY_SIM_SEEDS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(200)
    }

    fn run_many(n_nodes: usize) {
        let mut totals = Report::default();
        for seed in 0..seeds() {
            let report = run(seed, SimConfig::new(n_nodes)).unwrap_or_else(|failure| panic!("{failure}\nreplay: gantry_simulations::cluster::run({seed}, SimConfig::new({n_nodes}))"));
            totals.crashes += report.crashes;
            totals.crashes_mid_write += report.crashes_mid_write;
            totals.partitions += report.partitions;
            totals.acknowledged += report.acknowledged;
            totals.committed_entries += report.committed_entries;
        }
        assert!(
            totals.crashes > 0 && totals.crashes_mid_write > 0 && totals.partitions > 0,
            "the faults never happened: {totals:?}"
        );
        assert!(
            totals.acknowledged as u64 > seeds() * 10,
            "too little was acknowledged to mean anything: {totals:?}"
        );
    }

    #[test]
    fn three_nodes_stay_safe_and_converge() {
        run_many(3);
    }

    #[test]
    fn five_nodes_stay_safe_and_converge() {
        run_many(5);
    }

    #[test]
    fn a_seed_replays_exactly() {
        assert_eq!(run(11, SimConfig::new(3)), run(11, SimConfig::new(3)));
    }
}
