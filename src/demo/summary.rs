//! The demo's closing figures, computed from what the API shows: for each job, where its units
//! ran, how long it took (first unit started → last unit ended), its GPU-hours (GPUs × run time,
//! summed over allocations) and its cost (GPU-hours and CPU-hours at the prices of the agent each
//! allocation ran on). Pure: the jobs, the prices and `now` come in, figures go out.
//!
//! An allocation's run time is from when it was reported running to when it ended, both stamped
//! by the leader; one still running counts until `now`, one that never started counts nothing.
//! A lost allocation counts until it was declared lost: the GPUs of a dead host are paid for
//! until the fleet knows it is dead.

use gantry_coordinator::api::types::{AllocationView, JobView};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

const MS_PER_HOUR: f64 = 3_600_000.0;

/// An agent's configured prices, and what to call it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentPrices {
    pub agent: String,
    pub name: String,
    pub site: String,
    pub cost_per_gpu_hour: f64,
    pub cost_per_cpu_hour: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AllocationFigures {
    pub id: String,
    pub unit: u32,
    pub agent: String,
    pub agent_name: String,
    pub site: String,
    /// The allocation's state, except `stopped` for one that ended because Gantry stopped it.
    pub state: String,
    pub n_gpus: u32,
    pub cpus: f64,
    pub run_seconds: f64,
    pub gpu_hours: f64,
    pub cpu_hours: f64,
    pub cost: f64,
    /// Containers: the image as the agent resolved it when the unit started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
}

/// How many of a job's allocations one agent had, and how they ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Placement {
    pub agent: String,
    pub agent_name: String,
    pub site: String,
    pub allocations: usize,
    /// How many ended each way (or stand now): `succeeded`, `lost`, `stopped` (by Gantry: a
    /// cancel, a rollout), `failed`, `running`...
    pub states: BTreeMap<String, usize>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobFigures {
    pub id: String,
    pub name: String,
    pub kind: String,
    pub state: String,
    pub units: u32,
    /// First allocation started → last one ended (or `now`, for one still running).
    pub duration_seconds: f64,
    pub gpu_hours: f64,
    pub cpu_hours: f64,
    pub cost: f64,
    /// By agent name.
    pub placements: Vec<Placement>,
    pub allocations: Vec<AllocationFigures>,
}

/// The figures of `job`; `prices` by agent id. An agent without prices costs nothing.
pub fn job_figures(
    job: &JobView,
    prices: &BTreeMap<String, AgentPrices>,
    now_unix_ms: u64,
) -> JobFigures {
    let cpus = job
        .spec
        .pointer("/resources/cpus")
        .and_then(serde_json::Value::as_f64)
        .unwrap_or(0.0);
    let allocations: Vec<AllocationFigures> = job
        .allocations
        .iter()
        .map(|a| allocation_figures(a, cpus, prices.get(&a.agent), now_unix_ms))
        .collect();
    let start = job
        .allocations
        .iter()
        .filter_map(|a| a.started_at_unix_ms)
        .min();
    let end = job
        .allocations
        .iter()
        .filter(|a| a.started_at_unix_ms.is_some())
        .map(|a| a.ended_at_unix_ms.unwrap_or(now_unix_ms))
        .max();
    let duration_seconds = match (start, end) {
        (Some(start), Some(end)) => end.saturating_sub(start) as f64 / 1000.0,
        _ => 0.0,
    };
    let mut placements: BTreeMap<&str, Placement> = BTreeMap::new();
    for figures in &allocations {
        let placement = placements
            .entry(&figures.agent_name)
            .or_insert_with(|| Placement {
                agent: figures.agent.clone(),
                agent_name: figures.agent_name.clone(),
                site: figures.site.clone(),
                allocations: 0,
                states: BTreeMap::new(),
            });
        placement.allocations += 1;
        *placement.states.entry(figures.state.clone()).or_insert(0) += 1;
    }
    JobFigures {
        id: job.id.clone(),
        name: job.name.clone(),
        kind: job.kind.clone(),
        state: job.state.clone(),
        units: job.progress.total,
        duration_seconds,
        gpu_hours: allocations.iter().map(|a| a.gpu_hours).sum(),
        cpu_hours: allocations.iter().map(|a| a.cpu_hours).sum(),
        cost: allocations.iter().map(|a| a.cost).sum(),
        placements: placements.into_values().collect(),
        allocations,
    }
}

fn allocation_figures(
    allocation: &AllocationView,
    cpus: f64,
    prices: Option<&AgentPrices>,
    now_unix_ms: u64,
) -> AllocationFigures {
    let run_ms = match allocation.started_at_unix_ms {
        Some(start) => allocation
            .ended_at_unix_ms
            .unwrap_or(now_unix_ms)
            .saturating_sub(start),
        None => 0,
    };
    let hours = run_ms as f64 / MS_PER_HOUR;
    let n_gpus = allocation.gpus.len() as u32;
    let gpu_hours = f64::from(n_gpus) * hours;
    let cpu_hours = cpus * hours;
    let (cost_per_gpu_hour, cost_per_cpu_hour) =
        prices.map_or((0.0, 0.0), |p| (p.cost_per_gpu_hour, p.cost_per_cpu_hour));
    AllocationFigures {
        id: allocation.id.clone(),
        unit: allocation.unit,
        agent: allocation.agent.clone(),
        agent_name: prices.map_or_else(|| allocation.agent.clone(), |p| p.name.clone()),
        site: prices.map_or_else(String::new, |p| p.site.clone()),
        state: if allocation.stop_requested && allocation.state == "failed" {
            "stopped".into()
        } else {
            allocation.state.clone()
        },
        n_gpus,
        cpus,
        run_seconds: run_ms as f64 / 1000.0,
        gpu_hours,
        cpu_hours,
        cost: gpu_hours * cost_per_gpu_hour + cpu_hours * cost_per_cpu_hour,
        image: allocation.image.clone(),
    }
}

/// `cloud-gpu: 8 succeeded; onprem-gpu: 4 lost`, most allocations first (agent names: the
/// fleet table shows their sites, and the table stays narrow).
pub fn where_it_ran(job: &JobFigures) -> String {
    let mut placements: Vec<&Placement> = job.placements.iter().collect();
    placements.sort_by_key(|p| std::cmp::Reverse(p.allocations));
    placements
        .iter()
        .map(|p| {
            let states: Vec<String> = p
                .states
                .iter()
                .map(|(state, n)| format!("{n} {state}"))
                .collect();
            format!("{}: {}", p.agent_name, states.join(", "))
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// The summary table's rows: one per job, then the total.
pub fn table_rows(jobs: &[JobFigures]) -> Vec<[String; 6]> {
    let mut rows: Vec<[String; 6]> = jobs
        .iter()
        .map(|job| {
            [
                job.name.clone(),
                job.kind.clone(),
                where_it_ran(job),
                format!("{:.1} s", job.duration_seconds),
                format!("{:.6}", job.gpu_hours),
                format!("${:.6}", job.cost),
            ]
        })
        .collect();
    rows.push([
        "total".into(),
        String::new(),
        String::new(),
        String::new(),
        format!("{:.6}", jobs.iter().map(|j| j.gpu_hours).sum::<f64>()),
        format!("${:.6}", jobs.iter().map(|j| j.cost).sum::<f64>()),
    ]);
    rows
}

pub const TABLE_HEADER: [&str; 6] = ["JOB", "KIND", "RAN ON", "DURATION", "GPU-HOURS", "COST"];

#[cfg(test)]
mod tests {
    use super::*;
    use gantry_coordinator::api::types::Progress;

    fn allocation(
        id: &str,
        agent: &str,
        state: &str,
        n_gpus: u32,
        started: Option<u64>,
        ended: Option<u64>,
    ) -> AllocationView {
        AllocationView {
            id: id.into(),
            unit: 0,
            attempt: 1,
            agent: agent.into(),
            node: "local".into(),
            state: state.into(),
            exit_code: None,
            reason: None,
            gpus: (0..n_gpus).collect(),
            port: None,
            restarts: 0,
            stop_requested: false,
            generation: 0,
            image: None,
            started_at_unix_ms: started,
            ended_at_unix_ms: ended,
        }
    }

    fn prices() -> BTreeMap<String, AgentPrices> {
        [
            ("a-1", "onprem-gpu", "onprem-a", 1.10, 0.01),
            ("a-2", "cloud-gpu", "aws", 3.20, 0.04),
        ]
        .into_iter()
        .map(|(agent, name, site, gpu, cpu)| {
            (
                agent.to_string(),
                AgentPrices {
                    agent: agent.into(),
                    name: name.into(),
                    site: site.into(),
                    cost_per_gpu_hour: gpu,
                    cost_per_cpu_hour: cpu,
                },
            )
        })
        .collect()
    }

    fn job(allocations: Vec<AllocationView>) -> JobView {
        JobView {
            id: "j".into(),
            name: "infer".into(),
            team: "default".into(),
            kind: "batch".into(),
            state: "succeeded".into(),
            spec: serde_json::json!({ "resources": { "cpus": 0.5 } }),
            submitted_by: "admin".into(),
            submitted_at_unix_ms: 0,
            updated_at_unix_ms: 0,
            idempotency_key: None,
            progress: Progress {
                succeeded: 2,
                total: 2,
            },
            restarts: 0,
            generation: 0,
            failure: None,
            allocations,
            inputs: Vec::new(),
            artifacts: Vec::new(),
        }
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn gpu_hours_and_cost_follow_each_allocation_s_run_time_and_agent() {
        let hour = 3_600_000;
        let figures = job_figures(
            &job(vec![
                // Two GPUs on-prem for half an hour, lost.
                allocation("j-0-1", "a-1", "lost", 2, Some(hour), Some(hour + hour / 2)),
                // The same unit again in the cloud for an hour.
                allocation(
                    "j-0-2",
                    "a-2",
                    "succeeded",
                    2,
                    Some(2 * hour),
                    Some(3 * hour),
                ),
                // Never started: costs nothing, counts for no time.
                allocation("j-1-1", "a-1", "lost", 1, None, Some(4 * hour)),
                // Still running at `now`: counted until now, by an agent without prices.
                allocation("j-1-2", "a-9", "running", 1, Some(3 * hour), None),
            ]),
            &prices(),
            4 * hour,
        );
        let run: Vec<f64> = figures.allocations.iter().map(|a| a.run_seconds).collect();
        assert_eq!(run, [1800.0, 3600.0, 0.0, 3600.0]);
        let gpu_hours: Vec<f64> = figures.allocations.iter().map(|a| a.gpu_hours).collect();
        assert_eq!(gpu_hours, [1.0, 2.0, 0.0, 1.0]);
        let costs: Vec<f64> = figures.allocations.iter().map(|a| a.cost).collect();
        assert!(close(costs[0], 1.0 * 1.10 + 0.25 * 0.01), "{costs:?}");
        assert!(close(costs[1], 2.0 * 3.20 + 0.5 * 0.04), "{costs:?}");
        assert_eq!(costs[2..], [0.0, 0.0]);
        assert!(close(figures.cost, costs.iter().sum()));
        assert!(close(figures.gpu_hours, 4.0));
        assert!(close(figures.cpu_hours, 0.25 + 0.5 + 0.5));
        // From the first start to `now` (the running one has not ended).
        assert_eq!(figures.duration_seconds, 3.0 * 3600.0);
        assert_eq!(
            where_it_ran(&figures),
            "onprem-gpu: 2 lost; a-9: 1 running; cloud-gpu: 1 succeeded"
        );
    }

    #[test]
    fn a_replica_stopped_by_gantry_counts_as_stopped_not_failed() {
        let mut stopped = allocation("j-0-1", "a-1", "failed", 0, Some(0), Some(1000));
        stopped.stop_requested = true;
        let crashed = allocation("j-1-1", "a-1", "failed", 0, Some(0), Some(1000));
        let figures = job_figures(&job(vec![stopped, crashed]), &prices(), 1000);
        assert_eq!(where_it_ran(&figures), "onprem-gpu: 1 failed, 1 stopped");
    }

    #[test]
    fn a_job_that_never_started_took_no_time_and_cost_nothing() {
        let figures = job_figures(
            &job(vec![allocation("j-0-1", "a-1", "lost", 1, None, Some(5))]),
            &prices(),
            10,
        );
        assert_eq!(figures.duration_seconds, 0.0);
        assert_eq!(figures.cost, 0.0);
        let rows = table_rows(&[figures]);
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[1][0], "total");
        assert_eq!(rows[1][5], "$0.000000");
    }
}
