//! The dashboard at `/ui`, loaded in a real browser (headless Chromium, Debian's package) against
//! a live fleet: a coordinator and two agents, on two sites at different prices, as processes of
//! the real binary, that have run jobs of two teams, one of which failed. Each page is loaded and
//! the DOM the page's script built is checked for what the API says: the nodes and their GPUs,
//! the jobs and their states, a job's allocations and its output, the usage plots and cost
//! tables, and the coordinators. A wrong token gets the sign-in form back.
//!
//! `/v1/usage`, which the plots draw, is checked against the cost recomputed here from the
//! allocations' run times and the agents' prices.
//!
//! Needs `chromium` (`.ci/run` installs it).

mod common;

use common::*;
use gantry_coordinator::api::types::{JobView, NodeView};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const LAB: &str = "name = \"lab-1\"\nsite = \"lab\"\nkind = \"on-prem\"\ncost_per_gpu_hour = 2.0\ncost_per_cpu_hour = 0.05\nallow_process = true\n[[gpus]]\nmodel = \"A100\"\nmemory = \"80GiB\"\ncount = 2\n";
const CLOUD: &str = "name = \"cloud-1\"\nsite = \"cloud\"\nkind = \"cloud\"\ncost_per_cpu_hour = 0.25\nallow_process = true\n";

struct Fleet {
    dir: tempfile::TempDir,
    coordinator: CoordinatorProcess,
    _agents: Vec<ChildGuard>,
    http: reqwest::Client,
}

impl Fleet {
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let coordinator = CoordinatorProcess::start(dir.path()).await;
        let token = coordinator.join_token("agent").await;
        let agents = [("lab", LAB), ("cloud", CLOUD)]
            .iter()
            .map(|(name, config)| {
                let config_path = dir.path().join(format!("{name}.toml"));
                std::fs::write(&config_path, config).unwrap();
                let mut command = gantry();
                command
                    .args([
                        "agent",
                        "--coordinator",
                        &coordinator.quic,
                        "--join",
                        &token,
                    ])
                    .arg("--data-dir")
                    .arg(dir.path().join(name))
                    .arg("--config")
                    .arg(&config_path);
                spawn_logged(command, &dir.path().join(format!("{name}.log")))
            })
            .collect();
        let fleet = Self {
            dir,
            coordinator,
            _agents: agents,
            http: reqwest::Client::new(),
        };
        eventually("both agents ready", Duration::from_secs(30), || async {
            let nodes: Vec<NodeView> = fleet.get("/v1/nodes").await?;
            (nodes.len() == 2 && nodes.iter().all(|n| n.status == "ready")).then_some(())
        })
        .await;
        fleet
    }

    async fn get<T: serde::de::DeserializeOwned>(&self, path: &str) -> Option<T> {
        let response = self
            .http
            .get(format!("http://{}{path}", self.coordinator.http))
            .bearer_auth(&self.coordinator.token)
            .send()
            .await
            .ok()?;
        response.json().await.ok()
    }

    async fn submit(&self, spec: serde_json::Value) -> String {
        let answer: serde_json::Value = self
            .http
            .post(format!("http://{}/v1/jobs", self.coordinator.http))
            .bearer_auth(&self.coordinator.token)
            .json(&spec)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        answer["id"]
            .as_str()
            .unwrap_or_else(|| panic!("submit {spec}: {answer}"))
            .to_string()
    }

    async fn wait_done(&self, id: &str) -> JobView {
        eventually(
            &format!("job {id} to end"),
            Duration::from_secs(60),
            || async {
                let job: JobView = self.get(&format!("/v1/jobs/{id}")).await?;
                ["succeeded", "failed", "cancelled"]
                    .contains(&job.state.as_str())
                    .then_some(job)
            },
        )
        .await
    }

    /// The DOM of `/ui{page}` once its script has run, as headless Chromium built it, signed in
    /// with `token` through the address's fragment.
    fn page(&self, page: &str, token: Option<&str>) -> String {
        let fragment = token.map(|t| format!("#token={t}")).unwrap_or_default();
        let url = format!("http://{}/ui{page}{fragment}", self.coordinator.http);
        browse(self.dir.path(), &url)
    }
}

fn browse(dir: &Path, url: &str) -> String {
    let profile = tempfile::tempdir_in(dir).unwrap();
    let output = Command::new("timeout")
        .args([
            "60",
            "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
        ])
        .args([
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--virtual-time-budget=8000",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(["--dump-dom", url])
        .output()
        .expect("run chromium (apt-get install chromium)");
    let dom = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success() && dom.contains("</html>"),
        "chromium on {url} failed ({}): {}\n{dom}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    dom
}

/// The HTML of the element `tag` with `id` in `dom`, to its first closing tag.
fn element<'a>(dom: &'a str, tag: &str, id: &str) -> &'a str {
    let start = dom
        .match_indices(&format!("<{tag} "))
        .map(|(at, _)| at)
        .find(|&at| {
            let open = &dom[at..at + dom[at..].find('>').unwrap_or(0)];
            open.contains(&format!(" id=\"{id}\""))
        })
        .unwrap_or_else(|| panic!("no <{tag} id={id}> in the page:\n{dom}"));
    let end = dom[start..]
        .find(&format!("</{tag}>"))
        .map(|end| start + end)
        .unwrap_or(dom.len());
    &dom[start..end]
}

/// The text of each cell of the table row whose first cell is `first`.
fn row(table: &str, first: &str) -> Vec<String> {
    for row in table.split("<tr>").skip(1) {
        let cells: Vec<String> = row
            .split("<td")
            .skip(1)
            .map(|cell| {
                let inner = &cell[cell.find('>').unwrap() + 1..];
                let mut text = String::new();
                let mut in_tag = false;
                for c in inner.split("</td>").next().unwrap().chars() {
                    match c {
                        '<' => in_tag = true,
                        '>' => in_tag = false,
                        c if !in_tag => text.push(c),
                        _ => {}
                    }
                }
                text
            })
            .collect();
        if cells.first().map(String::as_str) == Some(first) {
            return cells;
        }
    }
    panic!("no row {first:?} in\n{table}");
}

fn ready(dom: &str) {
    assert!(
        dom.contains("<main id=\"main\" data-state=\"ready\">"),
        "the page did not finish loading:\n{dom}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn each_page_shows_the_live_fleet_in_a_browser() {
    let fleet = Fleet::start().await;
    let vision = fleet
        .submit(serde_json::json!({
            "name": "vision-train", "team": "vision", "kind": "batch",
            "command": ["sh", "-c", "echo vision shard $SHARD_INDEX says hello; sleep 2"],
            "resources": { "gpus": 1, "cpus": 1, "memory": "64MiB" },
            "placement": { "sites": ["lab"] },
            "batch": { "shards": 2, "parallelism": 2, "max_retries": 0 }
        }))
        .await;
    let nlp = fleet
        .submit(serde_json::json!({
            "name": "nlp-embed", "team": "nlp", "kind": "batch",
            "command": ["sh", "-c", "echo nlp; sleep 1"],
            "resources": { "cpus": 0.5, "memory": "64MiB" },
            "placement": { "sites": ["cloud"] },
            "batch": { "shards": 1, "max_retries": 0 }
        }))
        .await;
    let broken = fleet
        .submit(serde_json::json!({
            "name": "nlp-broken", "team": "nlp", "kind": "batch",
            "command": ["sh", "-c", "echo about to fail >&2; exit 3"],
            "resources": { "cpus": 0.5, "memory": "64MiB" },
            "placement": { "sites": ["cloud"] },
            "batch": { "shards": 1, "max_retries": 0 }
        }))
        .await;
    let vision_job = fleet.wait_done(&vision).await;
    assert_eq!(vision_job.state, "succeeded", "{vision_job:?}");
    assert_eq!(fleet.wait_done(&nlp).await.state, "succeeded");
    let broken_job = fleet.wait_done(&broken).await;
    assert_eq!(broken_job.state, "failed");

    // The usage the plots draw equals what the allocations' run times and prices give.
    let usage: serde_json::Value = fleet.get("/v1/usage?window=900").await.unwrap();
    let jobs: Vec<JobView> = fleet.get("/v1/jobs").await.unwrap();
    let nodes: Vec<NodeView> = fleet.get("/v1/nodes").await.unwrap();
    for team in ["vision", "nlp"] {
        let (mut gpu_s, mut cpu_s, mut cost) = (0.0, 0.0, 0.0);
        for job in jobs.iter().filter(|j| j.team == team) {
            let cpus = job.spec["resources"]["cpus"].as_f64().unwrap();
            for a in &job.allocations {
                let node = nodes.iter().find(|n| n.agent == a.agent).unwrap();
                let seconds =
                    (a.ended_at_unix_ms.unwrap() - a.started_at_unix_ms.unwrap()) as f64 / 1000.0;
                gpu_s += a.gpus.len() as f64 * seconds;
                cpu_s += cpus * seconds;
                cost += (a.gpus.len() as f64 * node.cost_per_gpu_hour
                    + cpus * node.cost_per_cpu_hour)
                    * seconds
                    / 3600.0;
            }
        }
        let sum = |field: &str| -> f64 {
            usage["teams"][team][field]
                .as_array()
                .unwrap_or_else(|| panic!("no {team}.{field} in {usage}"))
                .iter()
                .map(|v| v.as_f64().unwrap())
                .sum()
        };
        assert!((sum("gpu_seconds") - gpu_s).abs() < 1e-6, "{team}: {usage}");
        assert!((sum("cpu_seconds") - cpu_s).abs() < 1e-6, "{team}: {usage}");
        assert!((sum("cost") - cost).abs() < 1e-9, "{team}: {usage}");
        assert!(cpu_s > 0.0, "{team} ran: {usage}");
    }
    assert!(usage["teams"]["vision"]["gpu_seconds"]
        .as_array()
        .unwrap()
        .iter()
        .any(|v| v.as_f64().unwrap() >= 1.0));
    // The lab's two GPUs cost 4.0 an hour and its cores 0.05 each: idle, it still costs.
    let lab_cores = nodes.iter().find(|n| n.site == "lab").unwrap().cpu_cores as f64;
    let lab_rate = usage["sites"]["lab"]["cost_per_hour"].as_f64().unwrap();
    assert!(
        (lab_rate - (4.0 + 0.05 * lab_cores)).abs() < 1e-9,
        "{usage}"
    );
    let idle: f64 = usage["sites"]["lab"]["idle_cost"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .sum();
    assert!(idle > 0.0, "{usage}");

    let token = fleet.coordinator.token.clone();

    // Fleet: both sites and both nodes, the lab's GPUs.
    let dom = fleet.page("/", Some(&token));
    ready(&dom);
    let sites = element(&dom, "table", "sites");
    assert_eq!(
        row(sites, "lab")[1..5],
        ["on-prem", "1", "1", "2"],
        "{sites}"
    );
    assert_eq!(
        row(sites, "cloud")[1..5],
        ["cloud", "1", "1", "0"],
        "{sites}"
    );
    let table = element(&dom, "table", "nodes");
    let lab = row(table, "lab-1");
    assert_eq!(lab[1..3], ["lab", "ready"], "{table}");
    assert_eq!(lab[5], "2 x A100", "{table}");
    assert_eq!(row(table, "cloud-1")[8], "0.2500", "{table}");

    // Jobs: all three, with their teams and states; the filter narrows them.
    let dom = fleet.page("/jobs", Some(&token));
    ready(&dom);
    let table = element(&dom, "table", "jobs");
    assert_eq!(
        row(table, &vision)[1..5],
        ["vision-train", "vision", "batch", "succeeded"]
    );
    assert_eq!(row(table, &vision)[5], "2 / 2");
    assert_eq!(row(table, &broken)[4], "failed");
    assert!(table.contains(&nlp));
    let dom = fleet.page("/jobs?state=failed", Some(&token));
    let table = element(&dom, "table", "jobs");
    assert!(
        table.contains(&broken) && !table.contains(&vision),
        "{table}"
    );

    // A job: its allocations on the lab node with a GPU each, and each shard's output.
    let dom = fleet.page(&format!("/jobs/{vision}"), Some(&token));
    ready(&dom);
    let table = element(&dom, "table", "allocations");
    for a in &vision_job.allocations {
        let cells = row(table, &a.id);
        assert_eq!(
            cells[3..5],
            ["lab-1".to_string(), "succeeded".to_string()],
            "{table}"
        );
    }
    let logs = element(&dom, "pre", "logs");
    assert!(
        logs.contains("vision shard 0 says hello") && logs.contains("vision shard 1 says hello"),
        "{logs}"
    );
    // The failed one says why, and its error output is shown.
    let dom = fleet.page(&format!("/jobs/{broken}"), Some(&token));
    ready(&dom);
    assert!(element(&dom, "p", "failure").contains("Failed:"), "{dom}");
    let table = element(&dom, "table", "allocations");
    assert_eq!(row(table, &broken_job.allocations[0].id)[5], "3", "{table}");

    // Usage: a line per team and per site, and the totals the API gave.
    let dom = fleet.page("/usage?window=900", Some(&token));
    ready(&dom);
    let steps = usage["steps"].as_u64().unwrap() as usize;
    for (plot, series) in [
        ("plot-gpus-team", "vision"),
        ("plot-cpus-team", "nlp"),
        ("plot-cost-team", "vision"),
        ("plot-gpu-util-site", "lab"),
        ("plot-cost-site", "cloud idle"),
    ] {
        let figure = element(&dom, "figure", plot);
        let line = figure
            .split("<polyline")
            .find(|line| line.contains(&format!("data-series=\"{series}\"")))
            .unwrap_or_else(|| panic!("no line {series} in {plot}:\n{figure}"));
        let points = line
            .split("points=\"")
            .nth(1)
            .unwrap()
            .split('"')
            .next()
            .unwrap();
        assert_eq!(
            points.split(' ').count(),
            steps,
            "{plot} {series}: {points}"
        );
    }
    // The GPU plot of the cloud site, which has none, draws no line.
    assert!(!element(&dom, "figure", "plot-gpu-util-site").contains("data-series=\"cloud\""));
    let table = element(&dom, "table", "usage-teams");
    let vision_row = row(table, "vision");
    let gpu_hours: f64 = usage["teams"]["vision"]["gpu_seconds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .sum::<f64>()
        / 3600.0;
    assert_eq!(vision_row[1], format!("{gpu_hours:.3}"), "{table}");
    let table = element(&dom, "table", "usage-sites");
    assert_eq!(row(table, "lab")[1], "2", "{table}");

    // The coordinators.
    let dom = fleet.page("/cluster", Some(&token));
    ready(&dom);
    let table = element(&dom, "table", "members");
    assert!(
        table.contains("voter") && table.contains("leader"),
        "{table}"
    );

    // Without a token, or with a wrong one, the sign-in form and nothing else.
    let dom = fleet.page("/jobs", None);
    assert!(
        dom.contains("data-state=\"login\"") && !dom.contains(&vision),
        "{dom}"
    );
    let dom = fleet.page("/jobs", Some("not-the-token"));
    assert!(
        dom.contains("data-state=\"login\"") && dom.contains("That token was refused"),
        "{dom}"
    );
    assert!(!dom.contains(&vision));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_page_is_public_its_data_is_not_and_usage_parameters_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = CoordinatorProcess::start(dir.path()).await;
    let http = reqwest::Client::new();
    let url = |path: &str| format!("http://{}{path}", coordinator.http);
    eventually("the API to answer", Duration::from_secs(20), || async {
        http.get(url("/healthz")).send().await.ok()
    })
    .await;
    for (path, kind) in [
        ("/ui", "text/html"),
        ("/ui/jobs/anything", "text/html"),
        ("/ui/assets/app.js", "text/javascript"),
        ("/ui/assets/app.css", "text/css"),
    ] {
        let response = http.get(url(path)).send().await.unwrap();
        assert_eq!(response.status(), 200, "{path}");
        let content_type = response.headers()["content-type"]
            .to_str()
            .unwrap()
            .to_string();
        assert!(content_type.starts_with(kind), "{path}: {content_type}");
        let policy = response.headers()["content-security-policy"]
            .to_str()
            .unwrap()
            .to_string();
        assert!(policy.contains("default-src 'self'"), "{path}: {policy}");
    }
    // Nothing the page loads comes from elsewhere.
    let page = http
        .get(url("/ui"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        !page.contains("http://") && !page.contains("https://"),
        "{page}"
    );

    assert_eq!(
        http.get(url("/v1/usage")).send().await.unwrap().status(),
        401
    );
    for (query, field) in [
        ("window=0", "window"),
        ("window=60&step=0", "step"),
        ("window=86400&step=1", "step"),
    ] {
        let response = http
            .get(url(&format!("/v1/usage?{query}")))
            .bearer_auth(&coordinator.token)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "{query}");
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["error"]["field"], field, "{query}: {body}");
    }
    let usage: serde_json::Value = http
        .get(url("/v1/usage?window=600&step=60"))
        .bearer_auth(&coordinator.token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(usage["steps"], 10, "{usage}");
    assert_eq!(usage["step_ms"], 60_000, "{usage}");
}
