//! Serving routes: for each serving job that has not ended, its replicas, where they listen and
//! which take traffic. The gateway (`/serve/{name}/...`) and `/v1/endpoints` read these; every
//! coordinator computes them from its own replicated state, so they lag the leader by at most
//! what that coordinator has not applied yet.
//!
//! Pure like the rest of the core: derived from the state alone, in a deterministic order.

use super::state::{AgentState, State};
use gantry_protocol::AllocationPhase;
use std::collections::BTreeMap;

/// The routes of every serving job that has not ended, by name, then newest first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServingRoutes {
    pub jobs: Vec<ServingJob>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServingJob {
    pub name: String,
    pub job_id: String,
    /// Whether `/serve/{name}/` goes to this job: names are not unique, and the newest serving
    /// job of a name takes its path.
    pub routed: bool,
    /// Replicas that have not ended, by unit, then allocation id.
    pub replicas: Vec<ReplicaRoute>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaRoute {
    pub allocation_id: String,
    pub unit: u32,
    pub agent_id: String,
    /// `host:port` (an IPv6 host in brackets), when the agent's address and the port are known.
    pub address: Option<String>,
    /// The allocation's state: `pending`, `running` or `healthy`.
    pub state: &'static str,
    /// Takes traffic: its health check passes, no stop is requested, its agent is ready and
    /// its address is known.
    pub healthy: bool,
}

impl ServingRoutes {
    pub fn from_state(state: &State) -> Self {
        let mut serving: BTreeMap<&str, (String, u64)> = BTreeMap::new();
        let jobs = state
            .serving_jobs
            .iter()
            .filter_map(|id| state.jobs.get(id));
        for job in jobs.filter(|job| !job.state.is_final()) {
            let Some(spec) = job.spec() else {
                continue;
            };
            serving.insert(&job.id, (spec.name.clone(), job.index));
        }
        let mut replicas: BTreeMap<&str, Vec<ReplicaRoute>> = BTreeMap::new();
        let live = serving
            .keys()
            .flat_map(|job_id| state.allocations_of(job_id))
            .filter(|a| !a.is_final());
        for allocation in live {
            let agent = state.agents.get(&allocation.agent_id);
            let host = agent.and_then(|agent| agent.register.address.as_deref());
            let address = host
                .zip(allocation.port)
                .map(|(host, port)| authority(host, port));
            let healthy = allocation.phase == AllocationPhase::Healthy
                && !allocation.stop_requested
                && agent.is_some_and(|agent| agent.state == AgentState::Ready)
                && address.is_some();
            replicas
                .entry(&allocation.job_id)
                .or_default()
                .push(ReplicaRoute {
                    allocation_id: allocation.id.clone(),
                    unit: allocation.unit,
                    agent_id: allocation.agent_id.clone(),
                    address,
                    state: allocation.state_name(),
                    healthy,
                });
        }
        let mut jobs: Vec<(u64, ServingJob)> = serving
            .into_iter()
            .map(|(job_id, (name, index))| {
                let mut replicas = replicas.remove(job_id).unwrap_or_default();
                replicas
                    .sort_by(|a, b| (a.unit, &a.allocation_id).cmp(&(b.unit, &b.allocation_id)));
                let job = ServingJob {
                    name,
                    job_id: job_id.to_string(),
                    routed: false,
                    replicas,
                };
                (index, job)
            })
            .collect();
        jobs.sort_by(|(a_index, a), (b_index, b)| {
            (&a.name, std::cmp::Reverse(a_index)).cmp(&(&b.name, std::cmp::Reverse(b_index)))
        });
        let mut previous_name: Option<String> = None;
        for (_, job) in &mut jobs {
            job.routed = previous_name.as_ref() != Some(&job.name);
            previous_name = Some(job.name.clone());
        }
        Self {
            jobs: jobs.into_iter().map(|(_, job)| job).collect(),
        }
    }

    /// The job `/serve/{name}/` goes to.
    pub fn route(&self, name: &str) -> Option<&ServingJob> {
        self.jobs.iter().find(|job| job.routed && job.name == name)
    }
}

impl ServingJob {
    pub fn healthy_replicas(&self) -> Vec<&ReplicaRoute> {
        self.replicas.iter().filter(|r| r.healthy).collect()
    }
}

/// `host:port`, with an IPv6 host in brackets.
pub fn authority(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// The replicas (indexes into `n_replicas`) one request tries, in order: round robin from
/// `cursor` (a counter the caller bumps per request), at most `attempts_max`, each at most once.
pub fn attempt_order(n_replicas: usize, cursor: u64, attempts_max: usize) -> Vec<usize> {
    if n_replicas == 0 {
        return Vec::new();
    }
    let first = (cursor % n_replicas as u64) as usize;
    (0..n_replicas.min(attempts_max))
        .map(|i| (first + i) % n_replicas)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use gantry_protocol::replicated::{Command, Op, PlacementEntry};
    use gantry_protocol::{NodeCapacity, Register, RuntimeKind, RuntimeReport, SiteKind};

    struct World {
        state: State,
        index: u64,
    }

    /// A replica as the tests compare it: (unit, address, state, healthy).
    type Replica = (u32, Option<String>, &'static str, bool);

    impl World {
        fn new(agents: &[(&str, Option<&str>)]) -> Self {
            let mut world = Self {
                state: State::default(),
                index: 0,
            };
            for (agent_id, address) in agents {
                let register = Register {
                    name: agent_id.to_string(),
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
                    nodes: vec![NodeCapacity {
                        name: "local".into(),
                        hostname: agent_id.to_string(),
                        os: String::new(),
                        arch: String::new(),
                        cpu_cores: 16,
                        memory_bytes: 64 << 30,
                        disk_bytes: 0,
                        disk_free_bytes: 0,
                        gpus: Vec::new(),
                    }],
                    serving_ports: (31_000, 31_010),
                    address: address.map(str::to_string),
                };
                world.apply(Op::AgentRegistered {
                    agent_id: agent_id.to_string(),
                    register,
                });
            }
            world
        }

        fn apply(&mut self, op: Op) {
            self.index += 1;
            let command = Command {
                request_id: self.index,
                at_unix_ms: self.index * 1000,
                actor: "test".into(),
                op,
            };
            self.state.apply(self.index, &command);
        }

        /// Submits a job and places unit `i` on `agents[i]`.
        fn submit(&mut self, job_id: &str, name: &str, kind: &str, agents: &[&str]) {
            let mut spec = serde_json::json!({ "name": name, "kind": kind, "command": ["serve"],
                "resources": { "cpus": 0.1, "memory": "1MiB" } });
            if kind == "serving" {
                spec["serving"] = serde_json::json!({ "replicas": agents.len() });
            } else {
                spec["batch"] = serde_json::json!({ "shards": agents.len() });
            }
            let spec_json = gantry_protocol::jobspec::from_json_value(spec)
                .unwrap()
                .canonical_json();
            self.apply(Op::SubmitJob {
                job_id: job_id.into(),
                idempotency_key: None,
                spec_json,
            });
            let placements = agents
                .iter()
                .enumerate()
                .map(|(unit, agent_id)| PlacementEntry {
                    job_id: job_id.into(),
                    unit: unit as u32,
                    agent_id: agent_id.to_string(),
                    node: "local".into(),
                    gpus: Vec::new(),
                    cpu_millis: 100,
                    memory_bytes: 1 << 20,
                })
                .collect();
            self.apply(Op::Place {
                term: 1,
                placements,
                preemptions: Vec::new(),
            });
        }

        fn set(&mut self, job_id: &str, unit: u32, phase: AllocationPhase) {
            let allocation_id = self
                .state
                .allocations
                .values()
                .find(|a| a.job_id == job_id && a.unit == unit && !a.is_final())
                .unwrap()
                .id
                .clone();
            self.apply(Op::AllocationUpdate {
                allocation_id,
                phase,
            });
        }

        /// Per job: (name, routed, [(unit, address, state, healthy)]).
        fn routes(&self) -> Vec<(String, bool, Vec<Replica>)> {
            ServingRoutes::from_state(&self.state)
                .jobs
                .into_iter()
                .map(|job| {
                    let replicas = job
                        .replicas
                        .iter()
                        .map(|r| (r.unit, r.address.clone(), r.state, r.healthy))
                        .collect();
                    (job.name, job.routed, replicas)
                })
                .collect()
        }
    }

    fn replica(unit: u32, address: Option<&str>, state: &'static str, healthy: bool) -> Replica {
        (unit, address.map(str::to_string), state, healthy)
    }

    #[test]
    fn only_healthy_replicas_on_ready_agents_with_an_address_take_traffic() {
        let mut world = World::new(&[("a", Some("10.0.0.1")), ("b", Some("fd00::2")), ("c", None)]);
        world.submit("web", "web", "serving", &["a", "b", "c"]);
        world.submit("batch", "web", "batch", &["a"]);
        assert_eq!(
            world.routes(),
            vec![(
                "web".to_string(),
                true,
                vec![
                    replica(0, Some("10.0.0.1:31000"), "pending", false),
                    replica(1, Some("[fd00::2]:31000"), "pending", false),
                    replica(2, None, "pending", false),
                ]
            )],
            "a batch job is no route, and a pending replica takes no traffic"
        );
        for unit in 0..3 {
            world.set("web", unit, AllocationPhase::Healthy);
        }
        let healthy =
            |world: &World| -> Vec<bool> { world.routes()[0].2.iter().map(|r| r.3).collect() };
        assert_eq!(healthy(&world), [true, true, false], "c has no address");
        world.set("web", 0, AllocationPhase::Running);
        assert_eq!(healthy(&world), [false, true, false], "failing its check");
        world.apply(Op::AgentDown {
            agent_id: "b".into(),
        });
        let units =
            |world: &World| -> Vec<u32> { world.routes()[0].2.iter().map(|r| r.0).collect() };
        assert_eq!(units(&world), [0, 2], "b's replica was lost with b");
        world.set(
            "web",
            0,
            AllocationPhase::Failed {
                exit_code: Some(1),
                reason: "crashed".into(),
            },
        );
        assert_eq!(units(&world), [2], "an ended replica is no longer listed");
        world.apply(Op::CancelJob {
            job_id: "web".into(),
        });
        assert_eq!(world.routes(), vec![], "an ended job has no route");
    }

    #[test]
    fn the_newest_serving_job_of_a_name_takes_its_path() {
        let mut world = World::new(&[("a", Some("10.0.0.1"))]);
        world.submit("old", "web", "serving", &["a"]);
        world.submit("new", "web", "serving", &["a"]);
        world.submit("api", "api", "serving", &["a"]);
        let routes = ServingRoutes::from_state(&world.state);
        let listed: Vec<(&str, &str, bool)> = routes
            .jobs
            .iter()
            .map(|j| (j.name.as_str(), j.job_id.as_str(), j.routed))
            .collect();
        assert_eq!(
            listed,
            [
                ("api", "api", true),
                ("web", "new", true),
                ("web", "old", false)
            ]
        );
        assert_eq!(routes.route("web").unwrap().job_id, "new");
        assert!(routes.route("nope").is_none());
    }

    #[test]
    fn requests_go_round_robin_and_try_each_replica_at_most_once() {
        // (replicas, cursor, attempts max) -> indexes tried
        for (n_replicas, cursor, attempts_max, expected) in [
            (0, 5, 3, vec![]),
            (1, 0, 3, vec![0]),
            (1, 7, 3, vec![0]),
            (2, 0, 3, vec![0, 1]),
            (2, 1, 3, vec![1, 0]),
            (3, 4, 3, vec![1, 2, 0]),
            (5, 3, 3, vec![3, 4, 0]),
            (3, u64::MAX, 1, vec![0]),
        ] {
            assert_eq!(
                attempt_order(n_replicas, cursor, attempts_max),
                expected,
                "{n_replicas} replicas, cursor {cursor}"
            );
        }
        let firsts: Vec<usize> = (0..6)
            .map(|cursor| attempt_order(3, cursor, 3)[0])
            .collect();
        assert_eq!(
            firsts,
            [0, 1, 2, 0, 1, 2],
            "consecutive requests spread evenly"
        );
    }

    #[test]
    fn ipv6_hosts_are_bracketed() {
        assert_eq!(authority("10.0.0.1", 80), "10.0.0.1:80");
        assert_eq!(authority("gpu-07.lab", 80), "gpu-07.lab:80");
        assert_eq!(authority("fd00::2", 80), "[fd00::2]:80");
        assert_eq!(authority("[fd00::2]", 80), "[fd00::2]:80");
    }
}
