//! The Docker runtime against the real local daemon, with an image built offline from host
//! binaries (`common::images`): the runtime on its own (logs, env, labels and limits as
//! `render` says, exit codes, a missing image, OOM, stop and kill, adoption after a restart,
//! `docker load`), then the real `gantry` binary as a coordinator and an agent with
//! `runtime = "docker"` running batch and serving jobs in containers, cancelling them, and
//! adopting a container after the agent is killed with SIGKILL.
//!
//! Needs a running Docker daemon (`.ci/run` checks for one first).

mod common;

use bollard::Docker;
use common::images::{docker, remove_containers, test_image, DEFAULT_COMMAND_OUTPUT};
use common::*;
use gantry_agent::runtime::docker::{
    connect, load_image, render, DockerRuntime, LABEL_AGENT_ROOT, LABEL_ALLOCATION, LABEL_IMAGE,
};
use gantry_agent::runtime::{
    Exit, Recovered, Runtime, RuntimeConfig, RuntimeError, RuntimeEvent, UnitSpec,
};
use gantry_coordinator::api::types::JobView;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Every wait for an event is bounded by this.
const EVENT_WAIT: Duration = Duration::from_secs(30);
const LOG_BYTES_MAX: u64 = 1024 * 1024;

/// Removes the containers of one agent (by its work root label) when dropped, so a failing test
/// leaves none running.
struct ContainerCleanup(String);

impl Drop for ContainerCleanup {
    fn drop(&mut self) {
        remove_containers(&format!("label={LABEL_AGENT_ROOT}={}", self.0));
    }
}

struct Harness {
    runtime: DockerRuntime,
    events: mpsc::UnboundedReceiver<RuntimeEvent>,
    docker: Docker,
    work_root: PathBuf,
    _cleanup: ContainerCleanup,
    _dir: tempfile::TempDir,
}

async fn runtime_at(work_root: &Path) -> (DockerRuntime, mpsc::UnboundedReceiver<RuntimeEvent>) {
    let (events_tx, events) = mpsc::unbounded_channel();
    let runtime = DockerRuntime::new(
        connect().await.expect("a running Docker daemon"),
        RuntimeConfig {
            work_root: work_root.to_path_buf(),
            log_bytes_max: LOG_BYTES_MAX,
        },
        events_tx,
    );
    (runtime, events)
}

async fn harness() -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let work_root = dir.path().join("allocations");
    let (runtime, events) = runtime_at(&work_root).await;
    Harness {
        runtime,
        events,
        docker: connect().await.unwrap(),
        _cleanup: ContainerCleanup(work_root.display().to_string()),
        work_root,
        _dir: dir,
    }
}

/// A batch unit of the test image running `command`.
fn unit(allocation_id: &str, command: &[&str]) -> UnitSpec {
    let job = gantry_protocol::jobspec::from_json_value(serde_json::json!({
        "name": "job", "kind": "batch", "image": test_image().tag,
        "resources": { "cpus": 0.5, "memory": "64MiB" },
    }))
    .expect("a valid spec");
    let mut unit = UnitSpec::new(
        allocation_id,
        "job-1",
        job,
        "node",
        &BTreeMap::new(),
        Vec::new(),
        false,
    );
    unit.command = command.iter().map(|arg| arg.to_string()).collect();
    unit
}

fn sh(allocation_id: &str, script: &str) -> UnitSpec {
    unit(allocation_id, &["/bin/sh", "-c", script])
}

impl Harness {
    async fn next_event(&mut self) -> RuntimeEvent {
        next_event(&mut self.events).await
    }

    async fn expect_started(&mut self, allocation_id: &str) -> Option<String> {
        match self.next_event().await {
            RuntimeEvent::Started {
                allocation_id: id,
                image,
            } if id == allocation_id => image,
            other => panic!("expected {allocation_id} to start, got {other:?}"),
        }
    }

    async fn expect_exited(&mut self, allocation_id: &str) -> Exit {
        match self.next_event().await {
            RuntimeEvent::Exited {
                allocation_id: id,
                exit,
            } if id == allocation_id => exit,
            other => panic!("expected {allocation_id} to exit, got {other:?}"),
        }
    }

    async fn run_to_exit(&mut self, unit: UnitSpec) -> Exit {
        let allocation_id = unit.allocation_id.clone();
        self.runtime.start(unit).await.unwrap();
        self.expect_started(&allocation_id).await;
        self.expect_exited(&allocation_id).await
    }

    async fn stdout(&self, allocation_id: &str) -> String {
        let bytes = self
            .runtime
            .logs(allocation_id, false, 1 << 20)
            .await
            .unwrap();
        String::from_utf8(bytes).unwrap()
    }

    async fn wait_for_stdout(&self, allocation_id: &str, needle: &str) -> String {
        let deadline = Instant::now() + EVENT_WAIT;
        loop {
            let stdout = self.stdout(allocation_id).await;
            if stdout.contains(needle) {
                return stdout;
            }
            assert!(
                Instant::now() < deadline,
                "{needle:?} never appeared in {stdout:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn assert_no_more_events(&mut self) {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let extra = self.events.try_recv();
        assert!(extra.is_err(), "unexpected event {extra:?}");
    }
}

async fn next_event(events: &mut mpsc::UnboundedReceiver<RuntimeEvent>) -> RuntimeEvent {
    tokio::time::timeout(EVENT_WAIT, events.recv())
        .await
        .expect("an event within the wait")
        .expect("the runtime holds the sender")
}

/// The containers of one allocation (any state), by label: their ids.
fn containers_of(allocation_id: &str) -> Vec<String> {
    docker(&[
        "ps",
        "-aq",
        "--no-trunc",
        "--filter",
        &format!("label={LABEL_ALLOCATION}={allocation_id}"),
    ])
    .split_whitespace()
    .map(str::to_string)
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unit_runs_as_the_container_render_describes_and_its_logs_come_back() {
    let mut h = harness().await;
    let mut unit = sh(
        "env-1",
        "echo to-stdout; echo to-stderr >&2; env; echo written > \"$GANTRY_ALLOC_DIR/out.txt\"; echo ready; exec sleep 60",
    );
    unit.env = BTreeMap::from([("MY_SETTING".to_string(), "hello world".to_string())]);
    let rendered = render(&unit, &h.work_root);
    h.runtime.start(unit.clone()).await.unwrap();
    let image = h.expect_started("env-1").await;
    // An imported image has no repo digest: it resolves to its id.
    assert_eq!(image.as_deref(), Some(test_image().id.as_str()));
    let stdout = h.wait_for_stdout("env-1", "ready").await;

    let inspect = h
        .docker
        .inspect_container("gantry-env-1", None)
        .await
        .unwrap();
    let config = inspect.config.unwrap();
    let host = inspect.host_config.unwrap();
    let body = &rendered["body"];
    assert_eq!(rendered["name"], "gantry-env-1");
    assert_eq!(config.image.as_deref(), Some(test_image().id.as_str()));
    let env = config.env.unwrap();
    for variable in body["Env"].as_array().unwrap() {
        let variable = variable.as_str().unwrap();
        assert!(
            env.iter().any(|e| e == variable),
            "{variable} not in {env:?}"
        );
        assert!(
            stdout.lines().any(|line| line == variable),
            "{variable} not seen by the unit: {stdout}"
        );
    }
    for expected in [
        "MY_SETTING=hello world",
        "GANTRY_ALLOC_DIR=/gantry/alloc",
        "GANTRY_ALLOCATION_ID=env-1",
        "GANTRY_JOB_ID=job-1",
    ] {
        assert!(stdout.lines().any(|line| line == expected), "{expected}");
    }
    let labels = config.labels.unwrap();
    for (name, value) in body["Labels"].as_object().unwrap() {
        let expected = if name == LABEL_IMAGE {
            test_image().id.as_str()
        } else {
            value.as_str().unwrap()
        };
        assert_eq!(
            labels.get(name).map(String::as_str),
            Some(expected),
            "{name}"
        );
    }
    assert_eq!(serde_json::json!(host.memory), body["HostConfig"]["Memory"]);
    assert_eq!(host.memory, Some(64 << 20));
    assert_eq!(host.memory_swap, host.memory);
    assert_eq!(
        serde_json::json!(host.nano_cpus),
        body["HostConfig"]["NanoCpus"]
    );
    assert_eq!(host.nano_cpus, Some(500_000_000));
    let mount = &host.mounts.unwrap()[0];
    assert_eq!(mount.target.as_deref(), Some("/gantry/alloc"));
    assert_eq!(
        mount.source.as_deref(),
        body["HostConfig"]["Mounts"][0]["Source"].as_str()
    );
    assert_eq!(
        std::fs::read_to_string(h.work_root.join("env-1/out.txt")).unwrap(),
        "written\n"
    );
    assert!(stdout.starts_with("to-stdout\n"), "{stdout}");
    assert_eq!(
        h.runtime.logs("env-1", true, 1024).await.unwrap(),
        b"to-stderr\n"
    );
    assert_eq!(h.runtime.running().await, ["env-1"]);

    // Starting it again is a no-op.
    h.runtime.start(unit).await.unwrap();
    assert_eq!(containers_of("env-1").len(), 1);
    h.runtime.stop("env-1", Duration::from_secs(1)).await;
    assert_eq!(h.expect_exited("env-1").await, Exit::Stopped);
    assert!(containers_of("env-1").is_empty(), "removed after its exit");
    assert_eq!(
        h.runtime.logs("env-1", true, 1024).await.unwrap(),
        b"to-stderr\n",
        "logs outlive the container"
    );
    h.assert_no_more_events().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_codes_and_the_images_default_command() {
    let mut h = harness().await;
    let cases = [
        (unit("true", &["/bin/sh", "-c", "true"]), Exit::Code(0)),
        (sh("exit-3", "echo bye; exit 3"), Exit::Code(3)),
        (unit("default", &[]), Exit::Code(0)),
    ];
    let mut expected = BTreeMap::new();
    for (unit, exit) in cases {
        expected.insert(unit.allocation_id.clone(), exit);
        h.runtime.start(unit).await.unwrap();
    }
    let mut exits = BTreeMap::new();
    while exits.len() < expected.len() {
        if let RuntimeEvent::Exited {
            allocation_id,
            exit,
        } = h.next_event().await
        {
            exits.insert(allocation_id, exit);
        }
    }
    assert_eq!(exits, expected);
    assert_eq!(h.stdout("exit-3").await, "bye\n");
    assert_eq!(
        h.stdout("default").await,
        format!("{DEFAULT_COMMAND_OUTPUT}\n")
    );
    assert!(h.runtime.running().await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiet_containers_are_followed_past_the_clients_request_timeout() {
    // The daemon answers a wait or a log follow only when there is something to say; a client
    // whose requests time out after a second must still see this unit's late output and end.
    let dir = tempfile::tempdir().unwrap();
    let work_root = dir.path().join("allocations");
    let _cleanup = ContainerCleanup(work_root.display().to_string());
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let impatient = connect()
        .await
        .unwrap()
        .with_timeout(Duration::from_secs(1));
    let runtime = DockerRuntime::new(
        impatient,
        RuntimeConfig {
            work_root: work_root.clone(),
            log_bytes_max: LOG_BYTES_MAX,
        },
        events_tx,
    );
    runtime
        .start(sh("quiet", "sleep 3; echo late"))
        .await
        .unwrap();
    assert!(matches!(
        next_event(&mut events).await,
        RuntimeEvent::Started { .. }
    ));
    match next_event(&mut events).await {
        RuntimeEvent::Exited { exit, .. } => assert_eq!(exit, Exit::Code(0)),
        other => panic!("expected the exit, got {other:?}"),
    }
    assert_eq!(runtime.logs("quiet", false, 100).await.unwrap(), b"late\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_image_fails_the_start_and_says_how_to_fix_it() {
    let mut h = harness().await;
    let missing = format!("gantry-test-missing:{}", std::process::id());
    let mut offline = unit("missing", &["true"]);
    offline.image = Some(missing.clone());
    let Err(RuntimeError::Start { reason, .. }) = h.runtime.start(offline).await else {
        panic!("a missing image must fail the start");
    };
    for needle in [
        missing.as_str(),
        "gantry images load",
        "pull: true",
        "allow_pull = true",
    ] {
        assert!(reason.contains(needle), "{needle:?} missing from {reason}");
    }

    // Allowed to pull, it tries (from a registry that is not there) and says so.
    let mut pulling = unit("pulling", &["true"]);
    pulling.image = Some("127.0.0.1:9/gantry-test/missing:1".into());
    pulling.pull = true;
    let Err(RuntimeError::Start { reason, .. }) = h.runtime.start(pulling).await else {
        panic!("an image that cannot be pulled must fail the start");
    };
    assert!(reason.contains("pull the image"), "{reason}");
    assert!(containers_of("missing").is_empty() && containers_of("pulling").is_empty());
    h.assert_no_more_events().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_during_a_pull_wins_over_the_pull() {
    let mut h = harness().await;
    // A "registry" that accepts the daemon's connection and never answers: the pull hangs.
    let registry = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut pulling = unit("cancelled", &["true"]);
    pulling.image = Some(format!(
        "{}/gantry-test/never:1",
        registry.local_addr().unwrap()
    ));
    pulling.pull = true;
    let start = h.runtime.start(pulling);
    let stop_while_pulling = async {
        let (connection, _) = tokio::time::timeout(EVENT_WAIT, registry.accept())
            .await
            .expect("the daemon to connect to the registry")
            .unwrap();
        let begun = Instant::now();
        h.runtime.stop("cancelled", Duration::from_secs(10)).await;
        assert!(
            begun.elapsed() < Duration::from_secs(1),
            "{:?}",
            begun.elapsed()
        );
        // Now let the pull fail.
        drop(connection);
        drop(registry);
    };
    let (started, ()) = tokio::join!(tokio::time::timeout(EVENT_WAIT, start), stop_while_pulling);
    started
        .expect("the start to end once the pull fails")
        .unwrap();
    assert_eq!(h.expect_exited("cancelled").await, Exit::Stopped);
    assert!(containers_of("cancelled").is_empty());
    assert!(h.runtime.running().await.is_empty());
    h.assert_no_more_events().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unit_over_its_memory_limit_is_reported_killed_for_it() {
    let mut h = harness().await;
    let mut hungry = sh(
        "hungry",
        "x=$(head -c 200000000 /dev/urandom); echo survived ${#x}",
    );
    hungry.memory_bytes = 16 << 20;
    match h.run_to_exit(hungry).await {
        Exit::Failed { exit_code, reason } => {
            assert_eq!(exit_code, Some(137));
            assert_eq!(reason, "killed for exceeding its memory limit of 16MiB");
        }
        other => panic!("expected an OOM kill, got {other:?}"),
    }
    assert!(!h.stdout("hungry").await.contains("survived"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_is_polite_within_the_grace_and_kills_after_it() {
    let mut h = harness().await;
    h.runtime
        .start(sh(
            "polite",
            "trap 'exit 0' TERM; echo ready; sleep 60 & wait",
        ))
        .await
        .unwrap();
    h.runtime
        .start(sh("stubborn", "trap '' TERM; echo ready; sleep 60"))
        .await
        .unwrap();
    let mut started = [h.next_event().await, h.next_event().await].to_vec();
    started.sort_by_key(|event| format!("{event:?}"));
    assert!(
        started
            .iter()
            .all(|event| matches!(event, RuntimeEvent::Started { .. })),
        "{started:?}"
    );
    h.wait_for_stdout("polite", "ready").await;
    h.wait_for_stdout("stubborn", "ready").await;

    let begun = Instant::now();
    h.runtime.stop("polite", Duration::from_secs(20)).await;
    let took = begun.elapsed();
    assert!(took < Duration::from_secs(10), "took {took:?}");
    assert_eq!(h.expect_exited("polite").await, Exit::Stopped);

    let grace = Duration::from_secs(1);
    let begun = Instant::now();
    h.runtime.stop("stubborn", grace).await;
    let took = begun.elapsed();
    assert!(
        took >= grace && took < Duration::from_secs(15),
        "took {took:?}"
    );
    assert_eq!(h.expect_exited("stubborn").await, Exit::Stopped);

    // Stopping again, or what never ran, is a no-op.
    h.runtime.stop("polite", Duration::from_secs(1)).await;
    h.runtime.stop("never-ran", Duration::from_secs(1)).await;
    assert!(h.runtime.running().await.is_empty());
    assert!(containers_of("polite").is_empty() && containers_of("stubborn").is_empty());
    h.assert_no_more_events().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_runtime_adopts_what_runs_and_reports_what_ended() {
    let mut h = harness().await;
    h.runtime
        .start(sh(
            "long",
            "echo before; while [ ! -e \"$GANTRY_ALLOC_DIR/go\" ]; do sleep 0.1; done; echo after",
        ))
        .await
        .unwrap();
    h.runtime
        .start(sh("short", "echo short; sleep 1; exit 4"))
        .await
        .unwrap();
    h.expect_started("long").await;
    h.expect_started("short").await;
    h.wait_for_stdout("long", "before").await;
    let long_container = containers_of("long");
    assert_eq!(long_container.len(), 1);

    // The agent stops: the containers run on.
    h.runtime.shutdown(Duration::from_secs(1)).await;
    assert!(matches!(
        h.runtime.start(sh("late", "true")).await,
        Err(RuntimeError::Start { .. })
    ));
    let deadline = Instant::now() + EVENT_WAIT;
    while docker(&["inspect", "--format", "{{.State.Status}}", "gantry-short"]).trim() != "exited" {
        assert!(Instant::now() < deadline, "short never exited");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        docker(&["inspect", "--format", "{{.State.Status}}", "gantry-long"]).trim(),
        "running"
    );

    // Another agent on the same daemon finds none of them.
    let other_dir = tempfile::tempdir().unwrap();
    let (other, _other_events) = runtime_at(other_dir.path()).await;
    assert!(other.recover().await.is_empty());

    let (restarted, mut events) = runtime_at(&h.work_root).await;
    let recovered = restarted.recover().await;
    assert_eq!(
        recovered,
        [
            (
                "long".to_string(),
                Recovered::Running {
                    image: Some(test_image().id.clone())
                }
            ),
            ("short".to_string(), Recovered::Ended(Exit::Code(4))),
        ]
    );
    assert!(
        containers_of("short").is_empty(),
        "an ended container is removed"
    );
    assert_eq!(containers_of("long"), long_container, "the same container");
    assert_eq!(restarted.running().await, ["long"]);
    // Starting an adopted allocation is a no-op.
    restarted
        .start(sh("long", "echo a second container"))
        .await
        .unwrap();
    assert_eq!(containers_of("long"), long_container);

    std::fs::write(h.work_root.join("long/go"), b"").unwrap();
    match next_event(&mut events).await {
        RuntimeEvent::Exited {
            allocation_id,
            exit,
        } => assert_eq!((allocation_id.as_str(), exit), ("long", Exit::Code(0))),
        other => panic!("expected long to exit, got {other:?}"),
    }
    assert_eq!(
        h.stdout("long").await,
        "before\nafter\n",
        "output from before the restart is kept once, and what followed is appended"
    );
    eventually("the ended container to be removed", EVENT_WAIT, || async {
        containers_of("long").is_empty().then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_image_loads_what_docker_save_wrote() {
    let docker_client = connect().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let tag = format!("gantry-test-load:{}-{}", std::process::id(), rand_suffix());
    docker(&["tag", &test_image().tag, &tag]);
    let tar = dir.path().join("image.tar");
    docker(&["save", "-o", tar.to_str().unwrap(), &tag]);
    docker(&["rmi", &tag]);

    let loaded = load_image(&docker_client, &tar).await;
    let present = docker(&["images", "-q", &tag]);
    docker(&["rmi", &tag]);
    assert_eq!(loaded.unwrap(), [tag.as_str()]);
    assert!(!present.trim().is_empty(), "{tag} was not loaded");

    let missing = dir.path().join("missing.tar");
    let error = load_image(&docker_client, &missing).await.unwrap_err();
    assert!(
        error.contains("cannot open") && error.contains("missing.tar"),
        "{error}"
    );
    let bad = dir.path().join("bad.tar");
    std::fs::write(&bad, b"not a tarball").unwrap();
    let error = load_image(&docker_client, &bad).await.unwrap_err();
    assert!(error.contains("bad.tar"), "{error}");
}

fn rand_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// A coordinator and one agent with `runtime = "docker"`, as separate processes of the real
/// binary.
struct Fleet {
    dir: tempfile::TempDir,
    api: String,
    quic: String,
    token: String,
    _coordinator: ChildGuard,
    agent: Option<ChildGuard>,
    http: reqwest::Client,
    _cleanup: ContainerCleanup,
}

impl Fleet {
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        // A TTL long enough for an agent to be restarted before it is declared down.
        let started = CoordinatorProcess::start_with_ttl(dir.path(), "30s").await;
        let join = started.join_token("agent").await;
        let (quic, api, token) = (started.quic, started.http, started.token);
        let coordinator = started.process;
        let cleanup = ContainerCleanup(dir.path().join("agent/allocations").display().to_string());
        let mut fleet = Self {
            dir,
            api,
            quic,
            token,
            _coordinator: coordinator,
            agent: None,
            http: reqwest::Client::new(),
            _cleanup: cleanup,
        };
        fleet.agent = Some(fleet.start_agent(Some(&join)));
        eventually(
            "a ready agent offering Docker",
            Duration::from_secs(30),
            || async {
                let nodes = fleet
                    .request(reqwest::Method::GET, "/v1/nodes", None)
                    .await?;
                nodes
                    .as_array()?
                    .iter()
                    .any(|n| {
                        n["status"] == "ready"
                            && n["runtimes"]
                                .as_array()
                                .is_some_and(|r| r.iter().any(|r| r == "docker"))
                    })
                    .then_some(())
            },
        )
        .await;
        fleet
    }

    fn start_agent(&self, token: Option<&str>) -> ChildGuard {
        let config_path = self.dir.path().join("agent.toml");
        let base = free_tcp_port().min(65_000);
        std::fs::write(
            &config_path,
            format!(
                "name = \"docker-host\"\nruntime = \"docker\"\nserving_port_min = {base}\nserving_port_max = {}\n",
                base + 20
            ),
        )
        .unwrap();
        let mut command = gantry();
        command
            .args(["agent", "--coordinator", &self.quic])
            .arg("--data-dir")
            .arg(self.agent_dir())
            .arg("--config")
            .arg(&config_path);
        if let Some(token) = token {
            command.args(["--join", token]);
        }
        let log = self.dir.path().join("agent.log");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let child = command
            .stdin(std::process::Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap();
        ChildGuard(child)
    }

    fn agent_dir(&self) -> PathBuf {
        self.dir.path().join("agent")
    }

    fn stdout(&self, allocation_id: &str) -> String {
        std::fs::read_to_string(
            self.agent_dir()
                .join("allocations")
                .join(allocation_id)
                .join("stdout.log"),
        )
        .unwrap_or_default()
    }

    async fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Option<serde_json::Value> {
        let mut request = self
            .http
            .request(method, format!("http://{}{path}", self.api))
            .bearer_auth(&self.token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        request.send().await.ok()?.json().await.ok()
    }

    async fn submit(&self, spec: serde_json::Value) -> String {
        let answer = self
            .request(reqwest::Method::POST, "/v1/jobs", Some(spec.clone()))
            .await
            .expect("submit answers");
        answer["id"]
            .as_str()
            .unwrap_or_else(|| panic!("submit {spec}: {answer}"))
            .to_string()
    }

    async fn job(&self, id: &str) -> JobView {
        let value = self
            .request(reqwest::Method::GET, &format!("/v1/jobs/{id}"), None)
            .await
            .unwrap();
        serde_json::from_value(value).unwrap()
    }

    /// `gantry status JOB -o json`, through the CLI.
    fn status_json(&self, id: &str) -> JobView {
        let output = gantry()
            .args([
                "status",
                id,
                "-o",
                "json",
                "--api",
                &self.api,
                "--token",
                &self.token,
            ])
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "gantry status: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout).unwrap()
    }

    async fn wait_state(&self, id: &str, state: &str, timeout: Duration) -> JobView {
        eventually(&format!("job {id} to be {state}"), timeout, || async {
            let job = self.job(id).await;
            assert!(
                state == job.state
                    || !["succeeded", "failed", "cancelled"].contains(&job.state.as_str()),
                "job {id} ended {}: {job:?}\nagent log:\n{}",
                job.state,
                std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
            );
            (job.state == state).then_some(job)
        })
        .await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_and_serving_jobs_run_in_containers_and_cancel_stops_them() {
    let image = test_image();
    let fleet = Fleet::start().await;

    let batch = fleet
        .submit(serde_json::json!({
            "name": "infer", "kind": "batch", "image": image.tag,
            "command": ["sh", "-c", "echo shard=$SHARD_INDEX in=$GANTRY_ALLOC_DIR"],
            "resources": { "cpus": 0.1, "memory": "32MiB" },
            "batch": { "shards": 2 }
        }))
        .await;
    fleet
        .wait_state(&batch, "succeeded", Duration::from_secs(60))
        .await;
    let job = fleet.status_json(&batch);
    assert_eq!(job.allocations.len(), 2, "{job:?}");
    let mut shards: Vec<String> = job
        .allocations
        .iter()
        .map(|a| {
            assert_eq!(a.image.as_deref(), Some(image.id.as_str()), "{a:?}");
            fleet.stdout(&a.id)
        })
        .collect();
    shards.sort();
    for allocation in &job.allocations {
        eventually("the ended containers to be removed", EVENT_WAIT, || async {
            containers_of(&allocation.id).is_empty().then_some(())
        })
        .await;
    }
    assert_eq!(
        shards,
        ["shard=0 in=/gantry/alloc\n", "shard=1 in=/gantry/alloc\n"]
    );

    // A serving replica: the gantry binary's own HTTP API answers /healthz on PORT.
    let serving = fleet
        .submit(serde_json::json!({
            "name": "serve", "kind": "serving", "image": image.tag,
            "command": ["sh", "-c", "exec gantry coordinator --init --data-dir /tmp/c --listen 127.0.0.1:0 --http 0.0.0.0:$PORT --advertise-http 127.0.0.1:$PORT"],
            "resources": { "cpus": 0.2, "memory": "256MiB" },
            "serving": { "replicas": 1 }
        }))
        .await;
    let replica = eventually("a healthy replica", Duration::from_secs(60), || async {
        let job = fleet.job(&serving).await;
        job.allocations.into_iter().find(|a| a.state == "healthy")
    })
    .await;
    let port = replica.port.expect("a serving port");
    let answer = reqwest::get(format!("http://127.0.0.1:{port}/healthz"))
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    assert_eq!(containers_of(&replica.id).len(), 1);

    let cancelled = Instant::now();
    fleet
        .request(
            reqwest::Method::DELETE,
            &format!("/v1/jobs/{serving}"),
            None,
        )
        .await
        .unwrap();
    eventually(
        "the replica's container to be gone",
        Duration::from_secs(20),
        || async { containers_of(&replica.id).is_empty().then_some(()) },
    )
    .await;
    // Within the coordinator's stop grace (10 s), with room for a loaded host.
    assert!(
        cancelled.elapsed() < Duration::from_secs(15),
        "took {:?}",
        cancelled.elapsed()
    );
    eventually("the replica to end", Duration::from_secs(20), || async {
        let job = fleet.job(&serving).await;
        job.allocations
            .iter()
            .all(|a| ["succeeded", "failed", "lost"].contains(&a.state.as_str()))
            .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_agent_adopts_its_running_container_when_it_comes_back() {
    let image = test_image();
    let mut fleet = Fleet::start().await;
    let batch = fleet
        .submit(serde_json::json!({
            "name": "long", "kind": "batch", "image": image.tag,
            "command": ["sh", "-c", "echo start; while [ ! -e $GANTRY_ALLOC_DIR/go ]; do sleep 0.1; done; echo done"],
            "resources": { "cpus": 0.1, "memory": "32MiB" },
            "batch": { "shards": 1 }
        }))
        .await;
    let allocation = eventually("the shard running", Duration::from_secs(60), || async {
        let job = fleet.job(&batch).await;
        job.allocations
            .into_iter()
            .find(|a| a.state == "running" && fleet.stdout(&a.id).contains("start"))
    })
    .await;
    let container = containers_of(&allocation.id);
    assert_eq!(container.len(), 1);

    let mut agent = fleet.agent.take().unwrap();
    agent.0.kill().unwrap(); // SIGKILL: the container runs on
    agent.0.wait().unwrap();
    assert_eq!(
        docker(&["inspect", "--format", "{{.State.Status}}", &container[0]]).trim(),
        "running"
    );
    fleet.agent = Some(fleet.start_agent(None));
    eventually(
        "the restarted agent to adopt the container",
        Duration::from_secs(30),
        || async {
            std::fs::read_to_string(fleet.dir.path().join("agent.log"))
                .unwrap_or_default()
                .contains("adopting a container")
                .then_some(())
        },
    )
    .await;
    assert_eq!(
        containers_of(&allocation.id),
        container,
        "adopted, not duplicated"
    );

    std::fs::write(
        fleet
            .agent_dir()
            .join("allocations")
            .join(&allocation.id)
            .join("go"),
        b"",
    )
    .unwrap();
    let job = fleet
        .wait_state(&batch, "succeeded", Duration::from_secs(60))
        .await;
    assert_eq!(
        job.allocations.len(),
        1,
        "nothing was placed again: {job:?}"
    );
    assert_eq!(job.allocations[0].id, allocation.id);
    assert_eq!(job.allocations[0].image.as_deref(), Some(image.id.as_str()));
    assert_eq!(fleet.stdout(&allocation.id), "start\ndone\n");
    eventually("the ended container to be removed", EVENT_WAIT, || async {
        containers_of(&allocation.id).is_empty().then_some(())
    })
    .await;
}
