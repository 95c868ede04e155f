//! `gantry demo`, the real binary, from the outside. With `--json` it runs its whole story and
//! exits 0 with a summary on stdout, which must hold up: training and batch inference
//! succeeded and serving ran until the demo stopped it; the served model's prediction is the one
//! `predict()` computes from the model artifact; the agent killed mid-batch lost its shards and
//! every one of them succeeded on another agent; every job's GPU-hours and cost add up from its
//! allocations' run times and the configured prices. With `--keep` the fleet stays up for the
//! CLI, as the printed exports say, until Ctrl-C.
//!
//! `--runtime docker` must hold up the same way, with every allocation run from the demo's image
//! and no container of the demo left behind; it runs where `docker version` answers (always in
//! CI, whose script requires a daemon) and says it skipped elsewhere.

mod common;

use common::*;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

/// The demo must finish well within this, even as a debug build on a busy machine.
const DEMO_TIMEOUT: Duration = Duration::from_secs(240);

/// One demo at a time: two at once would share two cores and each other's timing.
static ONE_DEMO: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// Runs `gantry demo ARGS` until it exits (killed at the timeout); its status, stdout, stderr.
fn run_demo(args: &[&str]) -> (std::process::ExitStatus, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let (stdout, stderr) = (dir.path().join("stdout"), dir.path().join("stderr"));
    let mut child = ChildGuard(
        gantry()
            .arg("demo")
            .args(args)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&stdout).unwrap())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + DEMO_TIMEOUT;
    let status = loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the demo did not finish in {DEMO_TIMEOUT:?}:\n{}",
            read(&stderr)
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    (status, read(&stdout), read(&stderr))
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-12 + 1e-9 * a.abs().max(b.abs())
}

fn f(value: &Value) -> f64 {
    value
        .as_f64()
        .unwrap_or_else(|| panic!("not a number: {value}"))
}

#[test]
fn the_demo_runs_the_platform_and_its_figures_add_up() {
    let _one = ONE_DEMO.lock().unwrap_or_else(|e| e.into_inner());
    let (status, stdout, stderr) = run_demo(&["--json"]);
    assert!(status.success(), "{status}\n{stderr}");
    let report = check_report(&stdout, &stderr);
    assert_eq!(report["runtime"], "process");
    for job in report["jobs"].as_array().unwrap() {
        for allocation in job["allocations"].as_array().unwrap() {
            assert!(allocation.get("image").is_none(), "{allocation}");
        }
    }
}

#[test]
fn with_docker_the_same_story_runs_in_containers_of_the_demo_image() {
    let answers = std::process::Command::new("docker")
        .arg("version")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    if !answers {
        eprintln!("skipped: `docker version` does not answer here (CI requires a daemon)");
        return;
    }
    let _one = ONE_DEMO.lock().unwrap_or_else(|e| e.into_inner());
    let (status, stdout, stderr) = run_demo(&["--runtime", "docker", "--json"]);
    assert!(status.success(), "{status}\n{stderr}");
    let report = check_report(&stdout, &stderr);
    assert_eq!(report["runtime"], "docker");
    let image = report["image"].as_str().unwrap();
    assert!(image.starts_with("gantry-demo:"), "{image}");
    assert!(stderr.contains("its containers force-removed"), "{stderr}");

    // Every allocation that started ran from the imported image: the agent reports its id (an
    // imported image has no repo digest), the same one for all.
    let image_id = common::images::docker(&["image", "inspect", "--format", "{{.Id}}", image])
        .trim()
        .to_string();
    let mut n_started = 0;
    for job in report["jobs"].as_array().unwrap() {
        for allocation in job["allocations"].as_array().unwrap() {
            if f(&allocation["run_seconds"]) > 0.0 {
                n_started += 1;
                assert_eq!(allocation["image"], image_id.as_str(), "{allocation}");
            }
        }
    }
    assert!(n_started >= 12, "{report:#}");

    // No container of the demo's agents is left: the data dir's path names its agents' roots.
    let data_dir = stderr
        .split("new CA in ")
        .nth(1)
        .and_then(|rest| rest.split(')').next())
        .expect("the story names the data dir");
    let roots = common::images::docker(&[
        "ps",
        "-a",
        "--filter",
        "label=gantry.agent-root",
        "--format",
        "{{.Label \"gantry.agent-root\"}}",
    ]);
    assert!(
        !roots.lines().any(|root| root.starts_with(data_dir)),
        "containers left under {data_dir}:\n{roots}"
    );
}

/// The checks every runtime's summary must pass; the summary.
fn check_report(stdout: &str, stderr: &str) -> Value {
    let report: Value = serde_json::from_str(stdout)
        .unwrap_or_else(|e| panic!("stdout is not the JSON summary ({e}):\n{stdout}"));
    let context = || format!("{stderr}\n{report:#}");

    // The story went to stderr, so that stdout is the document alone.
    for needle in [
        "3 coordinators formed one Raft group",
        "three agents joined",
        "killed onprem-gpu",
        "declared onprem-gpu down",
        "served:",
        "predict():",
        "GPU-HOURS",
    ] {
        assert!(
            stderr.contains(needle),
            "stderr lacks {needle:?}:\n{stderr}"
        );
    }
    assert_eq!(report["coordinators"].as_array().unwrap().len(), 3);
    assert!(f(&report["wall_seconds"]) < DEMO_TIMEOUT.as_secs_f64());

    // Every job reached the end it should: training and batch succeeded, serving served until
    // the demo cancelled it and its replicas were stopped, none failing on its own.
    let jobs: BTreeMap<String, &Value> = report["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|job| (job["kind"].as_str().unwrap().to_string(), job))
        .collect();
    assert_eq!(jobs.len(), 3, "{}", context());
    assert_eq!(jobs["training"]["state"], "succeeded", "{}", context());
    assert_eq!(jobs["batch"]["state"], "succeeded", "{}", context());
    assert_eq!(jobs["serving"]["state"], "cancelled", "{}", context());
    for allocation in jobs["serving"]["allocations"].as_array().unwrap() {
        assert_eq!(allocation["state"], "stopped", "{}", context());
    }
    assert_eq!(report["rows_scored"], 10_000);

    // The served model answers what the model artifact says.
    let prediction = &report["prediction"];
    assert!(
        (f(&prediction["served_probability"]) - f(&prediction["direct_probability"])).abs() < 1e-9,
        "{prediction}"
    );
    assert_eq!(prediction["served_label"], prediction["direct_label"]);
    assert_eq!(
        prediction["via"], "gateway",
        "asked through /serve/NAME/: {prediction}"
    );
    assert!(
        prediction["url"].as_str().unwrap().contains("/serve/"),
        "{prediction}"
    );
    assert_eq!(prediction["features"].as_array().unwrap().len(), 8);

    // The fleet as configured: GPUs cheaper on-prem than in the cloud, none on the third site.
    let fleet: BTreeMap<String, &Value> = report["fleet"]
        .as_array()
        .unwrap()
        .iter()
        .map(|agent| (agent["agent"].as_str().unwrap().to_string(), agent))
        .collect();
    let price = |name: &str, field: &str| {
        let agent = fleet.values().find(|a| a["name"] == name).unwrap();
        f(&agent[field])
    };
    assert!(price("onprem-gpu", "cost_per_gpu_hour") < price("cloud-gpu", "cost_per_gpu_hour"));
    assert_eq!(price("cpu-only", "cost_per_gpu_hour"), 0.0);

    // Training asked for GPUs at the cheapest price: it ran on the on-prem GPUs only.
    for allocation in jobs["training"]["allocations"].as_array().unwrap() {
        assert_eq!(allocation["agent_name"], "onprem-gpu", "{}", context());
        assert_eq!(allocation["n_gpus"], 1);
    }

    // The killed agent's shards were lost with it and each succeeded on another agent.
    let killed = &report["killed"];
    let killed_agent = killed["agent"].as_str().expect("an agent was killed");
    let batch = jobs["batch"]["allocations"].as_array().unwrap();
    let lost = killed["lost_allocations"].as_array().unwrap();
    assert!(!lost.is_empty(), "{}", context());
    for lost_id in lost {
        let lost = batch.iter().find(|a| a["id"] == *lost_id).unwrap();
        assert_eq!(lost["agent"], killed_agent);
        assert_eq!(lost["state"], "lost");
        let elsewhere = batch.iter().find(|a| {
            a["unit"] == lost["unit"] && a["state"] == "succeeded" && a["agent"] != killed_agent
        });
        assert!(
            elsewhere.is_some(),
            "shard {} never succeeded elsewhere:\n{}",
            lost["unit"],
            context()
        );
        let moved = killed["moved"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["lost_allocation"] == lost["id"])
            .unwrap_or_else(|| panic!("{lost_id} is not listed as moved"));
        assert_eq!(moved["succeeded_allocation"], elsewhere.unwrap()["id"]);
    }
    let noticed = f(&killed["noticed_after_seconds"]);
    assert!(
        (1.0..30.0).contains(&noticed),
        "noticed after the TTL: {noticed}"
    );

    // The figures add up: per allocation from its run time and its agent's configured prices,
    // per job from its allocations, in total from the jobs.
    let (mut total_cost, mut total_gpu_hours) = (0.0, 0.0);
    for job in jobs.values() {
        let (mut cost, mut gpu_hours, mut cpu_hours) = (0.0, 0.0, 0.0);
        let mut longest_run = 0.0f64;
        for allocation in job["allocations"].as_array().unwrap() {
            let agent = fleet[allocation["agent"].as_str().unwrap()];
            let hours = f(&allocation["run_seconds"]) / 3600.0;
            let expected_gpu_hours = f(&allocation["n_gpus"]) * hours;
            let expected_cpu_hours = f(&allocation["cpus"]) * hours;
            let expected_cost = expected_gpu_hours * f(&agent["cost_per_gpu_hour"])
                + expected_cpu_hours * f(&agent["cost_per_cpu_hour"]);
            assert!(
                close(f(&allocation["gpu_hours"]), expected_gpu_hours),
                "{allocation}"
            );
            assert!(
                close(f(&allocation["cpu_hours"]), expected_cpu_hours),
                "{allocation}"
            );
            assert!(close(f(&allocation["cost"]), expected_cost), "{allocation}");
            cost += expected_cost;
            gpu_hours += expected_gpu_hours;
            cpu_hours += expected_cpu_hours;
            longest_run = longest_run.max(f(&allocation["run_seconds"]));
        }
        assert!(close(f(&job["cost"]), cost), "{job}");
        assert!(close(f(&job["gpu_hours"]), gpu_hours), "{job}");
        assert!(close(f(&job["cpu_hours"]), cpu_hours), "{job}");
        assert!(f(&job["duration_seconds"]) + 1e-9 >= longest_run, "{job}");
        assert!(cost > 0.0, "{job}");
        total_cost += cost;
        total_gpu_hours += gpu_hours;
    }
    assert!(close(f(&report["cost"]), total_cost));
    assert!(close(f(&report["gpu_hours"]), total_gpu_hours));
    assert!(f(&jobs["batch"]["gpu_hours"]) > 0.0 && f(&jobs["serving"]["gpu_hours"]) == 0.0);
    report
}

#[test]
fn with_keep_the_fleet_stays_up_for_the_cli_until_interrupted() {
    let _one = ONE_DEMO.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let stderr_path = dir.path().join("stderr");
    let mut child = ChildGuard(
        gantry()
            .args(["demo", "--keep", "-o", "json"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr_path).unwrap())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + DEMO_TIMEOUT;
    let exports: BTreeMap<String, String> = loop {
        let stderr = read(&stderr_path);
        let exports: BTreeMap<String, String> = stderr
            .lines()
            .filter_map(|line| line.trim().strip_prefix("export "))
            .filter_map(|line| line.split_once('='))
            .map(|(key, value)| (key.to_string(), value.to_string()))
            .collect();
        if exports.contains_key("GANTRY_TOKEN") {
            break exports;
        }
        assert!(child.0.try_wait().unwrap().is_none(), "exited:\n{stderr}");
        assert!(Instant::now() < deadline, "no exports printed:\n{stderr}");
        std::thread::sleep(Duration::from_millis(200));
    };
    let cli = |args: &[&str]| -> Value {
        let output = gantry()
            .args(args)
            .args(["-o", "json"])
            .env("GANTRY_API", &exports["GANTRY_API"])
            .env("GANTRY_TOKEN", &exports["GANTRY_TOKEN"])
            .output()
            .unwrap();
        assert!(output.status.success(), "{args:?}: {output:?}");
        serde_json::from_slice(&output.stdout).unwrap()
    };
    let nodes = cli(&["nodes"]);
    assert_eq!(nodes.as_array().unwrap().len(), 3, "{nodes}");
    let cluster = cli(&["cluster", "status"]);
    assert_eq!(cluster["members"].as_array().unwrap().len(), 3, "{cluster}");
    let jobs = cli(&["jobs"]);
    let serving = jobs
        .as_array()
        .unwrap()
        .iter()
        .find(|job| job["kind"] == "serving")
        .unwrap();
    assert_eq!(serving["state"], "running", "kept serving: {serving}");

    // Ctrl-C stops it, cleanly.
    let interrupted = std::process::Command::new("kill")
        .args(["-INT", &child.0.id().to_string()])
        .status()
        .unwrap();
    assert!(interrupted.success());
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "still running after Ctrl-C");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "{status}\n{}", read(&stderr_path));
}
