//! Usage over time, per team and per site: how many GPU- and CPU-seconds the allocations ran in
//! each step of a window, what that cost at their nodes' prices, and what the capacity that stood
//! idle would have cost (on-prem capacity is never free: an idle GPU is money spent). Computed
//! from the allocations' run times, the leader's stamps, so every member answers the same.
//!
//! Pure: the caller passes the allocations, the nodes and the clock reading.

use std::collections::BTreeMap;

/// At most this many steps in one answer.
pub const STEPS_MAX: u64 = 1_000;

/// One node's site, prices and capacity.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeRates {
    pub site: String,
    pub cost_per_gpu_hour: f64,
    pub cost_per_cpu_hour: f64,
    pub gpus: u32,
    pub cpu_millis: u64,
}

/// What an allocation ran: its team, its node, its resources and its run time.
#[derive(Debug, Clone, PartialEq)]
pub struct Run<'a> {
    pub team: &'a str,
    /// (agent id, node name)
    pub node: (&'a str, &'a str),
    pub gpus: u32,
    pub cpu_millis: u64,
    pub started_at_unix_ms: u64,
    /// `None` while it runs: it runs until `now`.
    pub ended_at_unix_ms: Option<u64>,
}

/// The window: `steps` steps of `step_ms` from `start_unix_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub start_unix_ms: u64,
    pub step_ms: u64,
    pub steps: u64,
}

impl Window {
    /// The window of `steps` steps ending at `now` (the last step ends at `now`).
    pub fn ending_at(now_unix_ms: u64, span_ms: u64, step_ms: u64) -> Result<Self, String> {
        if step_ms == 0 {
            return Err("must be more than 0".into());
        }
        let steps = span_ms.div_ceil(step_ms).max(1);
        if steps > STEPS_MAX {
            return Err(format!(
                "gives {steps} steps over the window; at most {STEPS_MAX}: take a longer step"
            ));
        }
        Ok(Self {
            start_unix_ms: now_unix_ms.saturating_sub(steps * step_ms),
            step_ms,
            steps,
        })
    }

    fn end_unix_ms(&self) -> u64 {
        self.start_unix_ms + self.steps * self.step_ms
    }
}

/// Per step: what ran and what it cost.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Series {
    pub gpu_seconds: Vec<f64>,
    pub cpu_seconds: Vec<f64>,
    pub cost: Vec<f64>,
}

impl Series {
    fn zeros(steps: usize) -> Self {
        Self {
            gpu_seconds: vec![0.0; steps],
            cpu_seconds: vec![0.0; steps],
            cost: vec![0.0; steps],
        }
    }

    pub fn total_cost(&self) -> f64 {
        self.cost.iter().sum()
    }
}

/// A site's usage, and its capacity now (capacity is not kept over time).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SiteUsage {
    pub used: Series,
    /// What the site's capacity not in use cost, per step.
    pub idle_cost: Vec<f64>,
    pub gpus: u32,
    pub cpus: f64,
    /// What all of the site's capacity costs per hour, in use or not.
    pub cost_per_hour: f64,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Usage {
    pub start_unix_ms: u64,
    pub step_ms: u64,
    pub steps: u64,
    pub teams: BTreeMap<String, Series>,
    pub sites: BTreeMap<String, SiteUsage>,
}

/// The usage of `runs` over `window`, with `now` ending the runs still running. A run on a node
/// no longer known counts for its team at no price, under the site "unknown".
pub fn usage(
    runs: &[Run<'_>],
    nodes: &BTreeMap<(String, String), NodeRates>,
    window: Window,
    now_unix_ms: u64,
) -> Usage {
    let steps = window.steps as usize;
    let mut teams: BTreeMap<String, Series> = BTreeMap::new();
    let mut sites: BTreeMap<String, SiteUsage> = BTreeMap::new();
    for rates in nodes.values() {
        let site = sites
            .entry(rates.site.clone())
            .or_insert_with(|| SiteUsage {
                used: Series::zeros(steps),
                idle_cost: vec![0.0; steps],
                ..SiteUsage::default()
            });
        site.gpus += rates.gpus;
        site.cpus += rates.cpu_millis as f64 / 1000.0;
        site.cost_per_hour += f64::from(rates.gpus) * rates.cost_per_gpu_hour
            + rates.cpu_millis as f64 / 1000.0 * rates.cost_per_cpu_hour;
    }
    for run in runs {
        let from = run.started_at_unix_ms.max(window.start_unix_ms);
        let until = run
            .ended_at_unix_ms
            .unwrap_or(now_unix_ms)
            .min(window.end_unix_ms());
        if until <= from {
            continue;
        }
        let rates = nodes.get(&(run.node.0.to_string(), run.node.1.to_string()));
        let site_name = rates.map_or("unknown", |r| r.site.as_str());
        let (gpu_price, cpu_price) =
            rates.map_or((0.0, 0.0), |r| (r.cost_per_gpu_hour, r.cost_per_cpu_hour));
        let cpus = run.cpu_millis as f64 / 1000.0;
        let team = teams
            .entry(run.team.to_string())
            .or_insert_with(|| Series::zeros(steps));
        let site = sites
            .entry(site_name.to_string())
            .or_insert_with(|| SiteUsage {
                used: Series::zeros(steps),
                idle_cost: vec![0.0; steps],
                ..SiteUsage::default()
            });
        let first = ((from - window.start_unix_ms) / window.step_ms) as usize;
        let last = ((until - 1 - window.start_unix_ms) / window.step_ms) as usize;
        for step in first..=last.min(steps - 1) {
            let step_start = window.start_unix_ms + step as u64 * window.step_ms;
            let overlap_ms = until.min(step_start + window.step_ms) - from.max(step_start);
            let seconds = overlap_ms as f64 / 1000.0;
            let gpu_seconds = f64::from(run.gpus) * seconds;
            let cpu_seconds = cpus * seconds;
            let cost = (gpu_seconds * gpu_price + cpu_seconds * cpu_price) / 3600.0;
            for series in [&mut *team, &mut site.used] {
                series.gpu_seconds[step] += gpu_seconds;
                series.cpu_seconds[step] += cpu_seconds;
                series.cost[step] += cost;
            }
        }
    }
    // Idle cost only up to now: a window may not end in the future, but its last step may.
    for site in sites.values_mut() {
        for step in 0..steps {
            let step_start = window.start_unix_ms + step as u64 * window.step_ms;
            let elapsed_ms = now_unix_ms
                .min(step_start + window.step_ms)
                .saturating_sub(step_start);
            let capacity = site.cost_per_hour * elapsed_ms as f64 / 3_600_000.0;
            site.idle_cost[step] = (capacity - site.used.cost[step]).max(0.0);
        }
    }
    Usage {
        start_unix_ms: window.start_unix_ms,
        step_ms: window.step_ms,
        steps: window.steps,
        teams,
        sites,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: u64 = 3_600_000;

    fn nodes() -> BTreeMap<(String, String), NodeRates> {
        BTreeMap::from([
            (
                ("a1".into(), "n1".into()),
                NodeRates {
                    site: "onprem".into(),
                    cost_per_gpu_hour: 2.0,
                    cost_per_cpu_hour: 0.1,
                    gpus: 4,
                    cpu_millis: 8_000,
                },
            ),
            (
                ("a2".into(), "n1".into()),
                NodeRates {
                    site: "cloud".into(),
                    cost_per_gpu_hour: 3.0,
                    cost_per_cpu_hour: 0.0,
                    gpus: 1,
                    cpu_millis: 2_000,
                },
            ),
        ])
    }

    fn run<'a>(team: &'a str, agent: &'a str, gpus: u32, from: u64, until: Option<u64>) -> Run<'a> {
        Run {
            team,
            node: (agent, "n1"),
            gpus,
            cpu_millis: 1_000,
            started_at_unix_ms: from,
            ended_at_unix_ms: until,
        }
    }

    #[test]
    fn a_run_is_split_across_steps_by_its_overlap_and_priced_at_its_node() {
        let window = Window {
            start_unix_ms: 0,
            step_ms: HOUR,
            steps: 3,
        };
        // Two GPUs and a CPU from 0:30 to 2:00 on the on-prem node.
        let runs = [run("vision", "a1", 2, HOUR / 2, Some(2 * HOUR))];
        let report = usage(&runs, &nodes(), window, 3 * HOUR);
        let team = &report.teams["vision"];
        assert_eq!(team.gpu_seconds, vec![3600.0, 7200.0, 0.0]);
        assert_eq!(team.cpu_seconds, vec![1800.0, 3600.0, 0.0]);
        // Half an hour of 2 GPUs at 2.0 and a CPU at 0.1, then a whole hour.
        assert!(
            (team.cost[0] - (2.0 + 0.05)).abs() < 1e-9,
            "{:?}",
            team.cost
        );
        assert!((team.cost[1] - (4.0 + 0.1)).abs() < 1e-9, "{:?}", team.cost);
        let site = &report.sites["onprem"];
        assert_eq!(site.used, *team);
        assert_eq!(site.gpus, 4);
        assert!((site.cost_per_hour - 8.8).abs() < 1e-9);
        // The third hour everything stood idle: 4 GPUs at 2.0 and 8 CPUs at 0.1.
        assert!(
            (site.idle_cost[2] - 8.8).abs() < 1e-9,
            "{:?}",
            site.idle_cost
        );
        assert!((site.idle_cost[0] - (8.8 - 2.05)).abs() < 1e-9);
        // The cloud site ran nothing: all of it idle.
        assert!((report.sites["cloud"].idle_cost[1] - 3.0).abs() < 1e-9);
    }

    #[test]
    fn a_running_allocation_counts_until_now_and_runs_outside_the_window_do_not_count() {
        let now = 10 * HOUR + HOUR / 4;
        let window = Window::ending_at(now, 2 * HOUR, HOUR).unwrap();
        assert_eq!(window.start_unix_ms, now - 2 * HOUR);
        let runs = [
            run("a", "a2", 1, 9 * HOUR, None),
            run("b", "a2", 1, 0, Some(HOUR)),
        ];
        let report = usage(&runs, &nodes(), window, now);
        // Steps 8:15-9:15 and 9:15-10:15; running since 9:00: 15 min, then 60 min.
        assert_eq!(report.teams["a"].gpu_seconds, vec![900.0, 3600.0]);
        assert!((report.teams["a"].total_cost() - 3.0 * 1.25).abs() < 1e-9);
        assert!(!report.teams.contains_key("b"));
    }

    #[test]
    fn idle_cost_stops_at_now_and_unknown_nodes_are_free() {
        let window = Window {
            start_unix_ms: 0,
            step_ms: HOUR,
            steps: 2,
        };
        let runs = [run("t", "gone", 8, 0, None)];
        let report = usage(&runs, &nodes(), window, HOUR + HOUR / 2);
        assert_eq!(
            report.sites["unknown"].used.gpu_seconds,
            vec![28800.0, 14400.0]
        );
        assert_eq!(report.teams["t"].total_cost(), 0.0);
        assert!((report.sites["cloud"].idle_cost[1] - 1.5).abs() < 1e-9);
    }

    #[test]
    fn a_window_of_too_many_steps_or_a_zero_step_is_refused() {
        assert!(Window::ending_at(HOUR, HOUR, 0).is_err());
        let error = Window::ending_at(HOUR * 1000, HOUR * 1000, 1000).unwrap_err();
        assert!(error.contains("at most 1000"), "{error}");
        assert_eq!(Window::ending_at(HOUR, HOUR, HOUR).unwrap().steps, 1);
    }
}
