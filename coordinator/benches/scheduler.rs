//! Placements per second of one scheduling pass: fleets of 1,000 and 10,000 nodes (four sites, on
//! prem and cloud, A100, H100, L4 and CPU-only machines, some partly used by preemptible work)
//! and a queue of 100,000 units of mixed kinds (batch shards, training gangs, serving replicas)
//! over a few thousand jobs. Throughput counts the placements the pass makes; units that do not
//! fit (most of them at 1,000 nodes) are explained, and that work is in the time too.
//!
//! cargo bench -p gantry-coordinator --bench scheduler -- --measurement-time 5 --warm-up-time 1

use criterion::{
    criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput,
};
use gantry_coordinator::core::scheduler::{
    schedule, ClusterView, GpuSlot, NodeKey, NodeState, Policy, QueuedJob, RunningUnit,
};
use gantry_protocol::jobspec::{
    Batch, JobKind, JobSpec, Placement, PlacementPreference, Resources, Serving, Training,
};
use gantry_protocol::{RuntimeKind, SiteKind};
use std::collections::{BTreeMap, BTreeSet};
use std::hint::black_box;

const QUEUED_UNITS: u32 = 100_000;

/// xorshift64*: the bench's inputs are the same on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

struct Site {
    name: &'static str,
    kind: SiteKind,
    runtimes: &'static [RuntimeKind],
    cost_per_gpu_hour: f64,
    cost_per_cpu_hour: f64,
}

const SITES: [Site; 4] = [
    Site {
        name: "onprem-a",
        kind: SiteKind::OnPrem,
        runtimes: &[RuntimeKind::Docker, RuntimeKind::Process],
        cost_per_gpu_hour: 1.2,
        cost_per_cpu_hour: 0.02,
    },
    Site {
        name: "onprem-b",
        kind: SiteKind::OnPrem,
        runtimes: &[RuntimeKind::Docker],
        cost_per_gpu_hour: 1.5,
        cost_per_cpu_hour: 0.02,
    },
    Site {
        name: "aws-us-east-1",
        kind: SiteKind::Cloud,
        runtimes: &[RuntimeKind::Kubernetes],
        cost_per_gpu_hour: 3.0,
        cost_per_cpu_hour: 0.04,
    },
    Site {
        name: "gcp-europe-west4",
        kind: SiteKind::Cloud,
        runtimes: &[RuntimeKind::Kubernetes],
        cost_per_gpu_hour: 2.8,
        cost_per_cpu_hour: 0.045,
    },
];

/// (GPUs, model, GPU memory GiB, CPUs, memory GiB)
const MACHINES: [(u32, &str, u64, u64, u64); 4] = [
    (8, "A100", 80, 96, 1024),
    (8, "H100", 80, 128, 2048),
    (4, "L4", 24, 48, 256),
    (0, "", 0, 64, 256),
];

fn fleet(n_nodes: usize, rng: &mut Rng) -> ClusterView {
    let mut nodes = Vec::with_capacity(n_nodes);
    let mut running = Vec::new();
    for idx in 0..n_nodes {
        let site = &SITES[idx % SITES.len()];
        let (n_gpus, model, gpu_memory_gib, cpus, memory_gib) =
            MACHINES[(idx / 4) % MACHINES.len()];
        let key = NodeKey {
            agent_id: format!("agent-{idx:06}"),
            node: "local".into(),
        };
        let gpus: Vec<GpuSlot> = (0..n_gpus)
            .map(|index| GpuSlot {
                index,
                model: model.into(),
                memory_bytes: gpu_memory_gib << 30,
            })
            .collect();
        let mut node = NodeState {
            key: key.clone(),
            site: site.name.into(),
            site_kind: site.kind,
            runtimes: site.runtimes.to_vec(),
            ready: idx % 97 != 0,
            cpu_millis: cpus * 1000,
            memory_bytes: memory_gib << 30,
            gpus,
            cost_per_gpu_hour: site.cost_per_gpu_hour,
            cost_per_cpu_hour: site.cost_per_cpu_hour,
            used_cpu_millis: 0,
            used_memory_bytes: 0,
            used_gpus: BTreeSet::new(),
        };
        // A quarter of the nodes run preemptible work already.
        if rng.below(4) == 0 {
            let used_gpus: Vec<u32> = (0..rng.below(u64::from(n_gpus) + 1) as u32).collect();
            let cpu_millis = 1000 * (1 + rng.below(cpus / 2));
            let memory_bytes = (1 + rng.below(memory_gib / 4)) << 30;
            node.used_cpu_millis = cpu_millis;
            node.used_memory_bytes = memory_bytes;
            node.used_gpus = used_gpus.iter().copied().collect();
            running.push(RunningUnit {
                allocation_id: format!("alloc-{idx}"),
                job_id: format!("scavenger-{}", idx % 50),
                team: "research".into(),
                node: key,
                priority: -1,
                preemptible: true,
                cpu_millis,
                memory_bytes,
                gpus: used_gpus,
            });
        }
        nodes.push(node);
    }
    let team_gpu_quota = BTreeMap::from([
        ("research".to_string(), 2_000),
        ("vision".to_string(), 20_000),
    ]);
    ClusterView {
        nodes,
        running,
        team_gpu_quota,
    }
}

fn queue(rng: &mut Rng) -> Vec<QueuedJob> {
    const TEAMS: [&str; 6] = ["vision", "nlp", "speech", "research", "ads", "search"];
    // (GPUs, model, CPUs, memory GiB): the sizes people ask for.
    const GPU_SHAPES: [(u32, Option<&str>, u32, u64); 5] = [
        (1, None, 8, 32),
        (1, Some("L4"), 4, 16),
        (2, Some("A100"), 16, 128),
        (4, None, 32, 256),
        (8, Some("H100"), 96, 1024),
    ];
    const CPU_SHAPES: [(u32, u64); 3] = [(1, 2), (4, 16), (8, 32)];
    let prefers = [
        PlacementPreference::Cheapest,
        PlacementPreference::OnPremFirst,
        PlacementPreference::Fastest,
    ];
    let mut jobs = Vec::new();
    let mut n_units_total = 0;
    while n_units_total < QUEUED_UNITS {
        let idx = jobs.len();
        let roll = rng.below(10);
        let kind = match roll {
            0..=4 => JobKind::Batch,
            5..=6 => JobKind::Training,
            _ => JobKind::Serving,
        };
        let cpu_only = kind != JobKind::Training && rng.below(2) == 0;
        let resources = if cpu_only {
            let &(cpus, memory_gib) = rng.pick(&CPU_SHAPES);
            Resources {
                n_gpus: 0,
                gpu_model: None,
                cpu_millis: cpus * 1000,
                memory_bytes: memory_gib << 30,
            }
        } else {
            let &(n_gpus, model, cpus, memory_gib) = rng.pick(&GPU_SHAPES);
            Resources {
                n_gpus,
                gpu_model: model.map(String::from),
                cpu_millis: cpus * 1000,
                memory_bytes: memory_gib << 30,
            }
        };
        let n_units = match kind {
            JobKind::Batch => 20 + rng.below(180) as u32,
            JobKind::Training => 2 + rng.below(7) as u32,
            JobKind::Serving => 2 + rng.below(15) as u32,
        }
        .min(QUEUED_UNITS - n_units_total);
        n_units_total += n_units;
        let sites = match rng.below(5) {
            0 => vec!["onprem-a".to_string(), "onprem-b".to_string()],
            1 => vec!["aws-us-east-1".to_string()],
            _ => Vec::new(),
        };
        let spec = JobSpec {
            name: format!("job-{idx}"),
            team: rng.pick(&TEAMS).to_string(),
            kind,
            image: (rng.below(8) != 0).then(|| "registry.local/work:1".to_string()),
            command: vec!["run".into()],
            env: BTreeMap::new(),
            resources,
            placement: Placement {
                sites,
                prefer: *rng.pick(&prefers),
                max_cost_per_hour: (rng.below(10) == 0).then_some(5_000.0),
            },
            priority: rng.below(4) as i32 - 1,
            preemptible: rng.below(3) == 0,
            pull: false,
            outputs: Vec::new(),
            inputs: Vec::new(),
            training: (kind == JobKind::Training).then(|| Training {
                n_workers: n_units,
                ..Training::default()
            }),
            batch: (kind == JobKind::Batch).then(|| Batch {
                n_shards: n_units,
                parallelism: Some(if rng.below(3) == 0 {
                    n_units.div_ceil(4)
                } else {
                    n_units
                }),
                ..Batch::default()
            }),
            serving: (kind == JobKind::Serving).then(|| Serving {
                n_replicas: n_units,
                ..Serving::default()
            }),
        };
        jobs.push(QueuedJob {
            job_id: format!("job-{idx:06}"),
            spec: spec.into(),
            units: (0..n_units).collect(),
            order: idx as u64,
        });
    }
    jobs
}

fn placements_per_second(c: &mut Criterion) {
    let policy = Policy {
        placements_per_pass_max: 1_000_000,
        explain_candidates_max: 3,
    };
    let mut group = c.benchmark_group("schedule");
    group.sampling_mode(SamplingMode::Flat).sample_size(10);
    for n_nodes in [1_000, 10_000] {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let view = fleet(n_nodes, &mut rng);
        let queue = queue(&mut rng);
        let decisions = schedule(&view, &queue, &policy);
        let n_units: usize = queue.iter().map(|job| job.units.len()).sum();
        eprintln!(
            "{n_nodes} nodes, {} jobs, {n_units} units: {} placed, {} preemptions, {} unplaced",
            queue.len(),
            decisions.placements.len(),
            decisions.preemptions.len(),
            decisions.unplaced.len(),
        );
        group.throughput(Throughput::Elements(decisions.placements.len() as u64));
        group.bench_with_input(BenchmarkId::new("nodes", n_nodes), &n_nodes, |b, _| {
            b.iter(|| schedule(black_box(&view), black_box(&queue), black_box(&policy)))
        });
    }
    group.finish();
}

criterion_group!(benches, placements_per_second);
criterion_main!(benches);
