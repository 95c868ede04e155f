//! The Kubernetes runtime against a fake API server (`common/fake_kube.rs`) that the tests
//! drive as the cluster would: the exact manifests sent, lifecycle events for each kind of
//! work, failures with their reasons (image, scheduling, memory, eviction), nodes and pods that
//! go away, node capacity as other work comes and goes, stop, recover, and a watch that must
//! list again. End to end: a coordinator and an agent, as processes of the real binary, with
//! the agent's `KUBECONFIG` naming the fake: the agent registers the cluster's nodes and a
//! batch job runs through Jobs in the fake.
//!
//! The scenarios that a real kubelet can play run against a real cluster too when
//! `GANTRY_TEST_KUBECONFIG` names a kubeconfig (see README.md); without it that test says it is
//! skipped and passes.

mod common;
#[path = "common/fake_kube.rs"]
mod fake_kube;

use common::*;
use fake_kube::{node, FakeKube, Kind};
use gantry_agent::runtime::kubernetes::{render, KubernetesOptions, KubernetesRuntime};
use gantry_agent::runtime::{Exit, Recovered, Runtime, RuntimeConfig, RuntimeEvent, UnitSpec};
use gantry_protocol::NodeCapacity;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use serde_json::{json, Value};
use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;
use tokio::sync::{mpsc, watch};

const NS: &str = "gantry";
/// Every wait on an event or a state of the fake is bounded by this.
const WAIT: Duration = Duration::from_secs(20);
const IMAGE_ID: &str = "registry.local/work@sha256:0123";

fn fast_options() -> KubernetesOptions {
    KubernetesOptions {
        unschedulable_timeout: Duration::from_secs(1),
        pod_appear_timeout: Duration::from_secs(10),
        unready_timeout: Duration::from_secs(30),
        ended_retention: Duration::from_secs(2),
        service_linger: Duration::ZERO,
        tick: Duration::from_millis(50),
        stop_margin: Duration::from_secs(3),
    }
}

/// The runtime's events, taken one allocation at a time.
struct Events {
    receiver: mpsc::UnboundedReceiver<RuntimeEvent>,
    others: VecDeque<RuntimeEvent>,
}

fn allocation_of(event: &RuntimeEvent) -> &str {
    match event {
        RuntimeEvent::Started { allocation_id, .. }
        | RuntimeEvent::Health { allocation_id, .. }
        | RuntimeEvent::Exited { allocation_id, .. } => allocation_id,
    }
}

impl Events {
    /// The next event about `allocation_id`.
    async fn next(&mut self, allocation_id: &str) -> RuntimeEvent {
        if let Some(at) = self
            .others
            .iter()
            .position(|e| allocation_of(e) == allocation_id)
        {
            return self.others.remove(at).unwrap();
        }
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let event = tokio::time::timeout_at(deadline, self.receiver.recv())
                .await
                .unwrap_or_else(|_| panic!("no event for {allocation_id} within {WAIT:?}"))
                .expect("the runtime holds the sender");
            if allocation_of(&event) == allocation_id {
                return event;
            }
            self.others.push_back(event);
        }
    }

    async fn started(&mut self, allocation_id: &str) -> Option<String> {
        match self.next(allocation_id).await {
            RuntimeEvent::Started { image, .. } => image,
            other => panic!("expected {allocation_id} to start, got {other:?}"),
        }
    }

    async fn exited(&mut self, allocation_id: &str) -> Exit {
        match self.next(allocation_id).await {
            RuntimeEvent::Exited { exit, .. } => exit,
            other => panic!("expected {allocation_id} to exit, got {other:?}"),
        }
    }

    async fn health(&mut self, allocation_id: &str) -> bool {
        match self.next(allocation_id).await {
            RuntimeEvent::Health { healthy, .. } => healthy,
            other => panic!("expected {allocation_id}'s health, got {other:?}"),
        }
    }

    /// Nothing more about `allocation_id` for a little while.
    async fn quiet(&mut self, allocation_id: &str) {
        tokio::time::sleep(Duration::from_millis(300)).await;
        while let Ok(event) = self.receiver.try_recv() {
            self.others.push_back(event);
        }
        let about: Vec<_> = self
            .others
            .iter()
            .filter(|e| allocation_of(e) == allocation_id)
            .collect();
        assert!(about.is_empty(), "unexpected {about:?}");
    }
}

/// The unit of an allocation of job `job_id` with this spec, placed on `node`.
fn unit(
    allocation_id: &str,
    job_id: &str,
    node: &str,
    spec: Value,
    env: &[(&str, &str)],
) -> UnitSpec {
    let job = gantry_protocol::jobspec::from_json_value(spec).expect("a valid spec");
    let env: BTreeMap<String, String> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    UnitSpec::new(allocation_id, job_id, job, node, &env, Vec::new(), false)
}

fn batch_spec(image: &str, command: &str) -> Value {
    json!({
        "name": "shard", "kind": "batch", "image": image, "command": ["sh", "-c", command],
        "resources": { "cpus": 0.1, "memory": "64MiB" }, "batch": { "shards": 1 },
    })
}

/// The cluster the scenarios run against: the fake, which the test plays the kubelet and the
/// scheduler of, or a real one, whose kubelet plays itself.
struct Cluster {
    fake: Option<FakeKube>,
    client: kube::Client,
    namespace: String,
    /// The node units are placed on.
    node: String,
    image: String,
    /// Whether images may be pulled (a real cluster may not have the image yet).
    pull: bool,
}

impl Cluster {
    async fn runtime(
        &self,
        options: KubernetesOptions,
    ) -> (
        KubernetesRuntime,
        Events,
        watch::Receiver<Vec<NodeCapacity>>,
    ) {
        let (events_tx, receiver) = mpsc::unbounded_channel();
        let config = RuntimeConfig {
            work_root: std::env::temp_dir(),
            log_bytes_max: 1 << 20,
        };
        let (runtime, nodes) = KubernetesRuntime::with_options(
            self.client.clone(),
            self.namespace.clone(),
            config,
            options,
            events_tx,
        )
        .await
        .expect("the runtime starts");
        (
            runtime,
            Events {
                receiver,
                others: VecDeque::new(),
            },
            nodes,
        )
    }

    fn unit(
        &self,
        allocation_id: &str,
        job_id: &str,
        spec: Value,
        env: &[(&str, &str)],
    ) -> UnitSpec {
        let mut unit = unit(allocation_id, job_id, &self.node, spec, env);
        unit.pull = self.pull;
        unit
    }

    /// The name of the allocation's pod, once there is one.
    async fn pod_of(&self, allocation_id: &str) -> String {
        let pods: kube::Api<Pod> = kube::Api::namespaced(self.client.clone(), &self.namespace);
        let selector = format!("gantry.allocation={allocation_id}");
        eventually(&format!("a pod for {allocation_id}"), WAIT, || {
            let pods = pods.clone();
            let selector = selector.clone();
            async move {
                let list = pods
                    .list(&kube::api::ListParams::default().labels(&selector))
                    .await
                    .ok()?;
                list.items.first().and_then(|pod| pod.metadata.name.clone())
            }
        })
        .await
    }

    /// Whether nothing of the allocation's is left: no workload, no pod.
    async fn gone(&self, allocation_id: &str) {
        let selector = format!("gantry.allocation={allocation_id}");
        let client = self.client.clone();
        let namespace = self.namespace.clone();
        eventually(&format!("{allocation_id}'s objects to go"), WAIT, || {
            if let Some(fake) = &self.fake {
                // The kubelet confirms the deletions asked for.
                for pod in fake.list(Kind::Pod, Some(&self.namespace), &selector) {
                    if pod["metadata"]["deletionTimestamp"].is_string() {
                        fake.finish_pod_deletion(
                            &self.namespace,
                            pod["metadata"]["name"].as_str().unwrap(),
                        );
                    }
                }
            }
            let client = client.clone();
            let namespace = namespace.clone();
            let selector = selector.clone();
            async move {
                let params = kube::api::ListParams::default().labels(&selector);
                let pods: kube::Api<Pod> = kube::Api::namespaced(client.clone(), &namespace);
                let left = pods.list(&params).await.ok()?.items.len()
                    + kube::Api::<Job>::namespaced(client.clone(), &namespace)
                        .list(&params)
                        .await
                        .ok()?
                        .items
                        .len()
                    + kube::Api::<Deployment>::namespaced(client, &namespace)
                        .list(&params)
                        .await
                        .ok()?
                        .items
                        .len();
                (left == 0).then_some(())
            }
        })
        .await
    }

    async fn service_gone(&self, job_id: &str) {
        let services: kube::Api<Service> =
            kube::Api::namespaced(self.client.clone(), &self.namespace);
        let name = format!("gantry-{job_id}");
        eventually(&format!("the Service of {job_id} to go"), WAIT, || {
            let services = services.clone();
            let name = name.clone();
            async move { services.get_opt(&name).await.ok()?.is_none().then_some(()) }
        })
        .await
    }

    // The kubelet's part: on the fake, the test plays it; a real kubelet plays itself.

    async fn kubelet_runs(&self, allocation_id: &str, ready: bool) {
        if let Some(fake) = &self.fake {
            let pod = self.pod_of(allocation_id).await;
            fake.run_pod(&self.namespace, &pod, IMAGE_ID, ready);
        }
    }

    async fn kubelet_exits(&self, allocation_id: &str, exit_code: i32, output: &str) {
        if let Some(fake) = &self.fake {
            let pod = self.pod_of(allocation_id).await;
            fake.set_log(&self.namespace, &pod, output);
            fake.end_pod(
                &self.namespace,
                &pod,
                exit_code,
                if exit_code == 0 { "Completed" } else { "Error" },
            );
        }
    }

    async fn kubelet_image_missing(&self, allocation_id: &str, image: &str) {
        if let Some(fake) = &self.fake {
            let pod = self.pod_of(allocation_id).await;
            let message =
                format!("Container image \"{image}\" is not present with pull policy of Never");
            fake.image_fails(&self.namespace, &pod, "ErrImageNeverPull", &message);
        }
    }

    async fn scheduler_cannot_place(&self, allocation_id: &str) {
        if let Some(fake) = &self.fake {
            let pod = self.pod_of(allocation_id).await;
            fake.unschedulable_pod(&self.namespace, &pod, "0/2 nodes are available: 1 Insufficient cpu, 1 node(s) didn't match Pod's node affinity/selector.");
        }
    }

    async fn kubelet_oom_kills(&self, allocation_id: &str) {
        if let Some(fake) = &self.fake {
            let pod = self.pod_of(allocation_id).await;
            fake.oom_kill_pod(&self.namespace, &pod);
        }
    }

    /// On the fake, pods go once the kubelet confirms, and until then the unit is not reported
    /// stopped; a real kubelet confirms by itself.
    async fn kubelet_confirms_deletion(&self, allocation_id: &str, events: &mut Events) {
        if let Some(fake) = &self.fake {
            let pod = self.pod_of(allocation_id).await;
            eventually("the pod to be marked for deletion", WAIT, || async {
                fake.get(Kind::Pod, &self.namespace, &pod)
                    .filter(|p| p["metadata"]["deletionTimestamp"].is_string())
            })
            .await;
            events.quiet(allocation_id).await;
            fake.finish_pod_deletion(&self.namespace, &pod);
        }
    }
}

// --- scenarios a real cluster can play too ---

async fn batch_runs_to_success_and_its_log_is_read(
    cluster: &Cluster,
    runtime: &KubernetesRuntime,
    events: &mut Events,
) {
    let unit = cluster.unit(
        "j-batch-0-1",
        "j-batch",
        batch_spec(&cluster.image, "echo first; echo shard=$SHARD_INDEX"),
        &[("SHARD_INDEX", "0"), ("SHARD_COUNT", "1")],
    );
    runtime.start(unit.clone()).await.unwrap();
    runtime
        .start(unit.clone())
        .await
        .expect("a second start is a no-op");
    cluster.kubelet_runs("j-batch-0-1", false).await;
    let image = events.started("j-batch-0-1").await;
    assert!(
        image.as_deref().is_some_and(|id| id.contains("sha256:")),
        "{image:?}"
    );
    cluster
        .kubelet_exits("j-batch-0-1", 0, "first\nshard=0\n")
        .await;
    assert_eq!(events.exited("j-batch-0-1").await, Exit::Code(0));
    let log = runtime
        .logs("j-batch-0-1", false, 8)
        .await
        .expect("the log, kept after the end");
    assert_eq!(
        String::from_utf8_lossy(&log),
        "shard=0\n",
        "the last 8 bytes"
    );
    let refused = runtime.logs("j-batch-0-1", true, 8).await.unwrap_err();
    assert!(refused.to_string().contains("merges"), "{refused}");
    assert!(runtime.running().await.is_empty());
    cluster.gone("j-batch-0-1").await;
}

async fn a_failing_shard_reports_its_exit_code(
    cluster: &Cluster,
    runtime: &KubernetesRuntime,
    events: &mut Events,
) {
    let unit = cluster.unit(
        "j-fail-0-1",
        "j-fail",
        batch_spec(&cluster.image, "exit 3"),
        &[],
    );
    runtime.start(unit).await.unwrap();
    cluster.kubelet_runs("j-fail-0-1", false).await;
    cluster.kubelet_exits("j-fail-0-1", 3, "").await;
    // A real pod may end before it is ever seen running: Started comes first either way.
    events.started("j-fail-0-1").await;
    assert_eq!(events.exited("j-fail-0-1").await, Exit::Code(3));
}

async fn a_missing_image_fails_naming_it(
    cluster: &Cluster,
    runtime: &KubernetesRuntime,
    events: &mut Events,
) {
    let image = "gantry.invalid/missing:1";
    let mut unit = cluster.unit("j-image-0-1", "j-image", batch_spec(image, "true"), &[]);
    unit.pull = false;
    runtime.start(unit).await.unwrap();
    cluster.kubelet_image_missing("j-image-0-1", image).await;
    match events.exited("j-image-0-1").await {
        Exit::Failed {
            exit_code: None,
            reason,
        } => {
            assert!(
                reason.contains(image) && reason.contains("ErrImageNeverPull"),
                "{reason}"
            )
        }
        other => panic!("{other:?}"),
    }
    cluster.gone("j-image-0-1").await;
}

async fn an_unschedulable_pod_fails_with_the_schedulers_message(
    cluster: &Cluster,
    runtime: &KubernetesRuntime,
    events: &mut Events,
) {
    let mut spec = batch_spec(&cluster.image, "true");
    spec["resources"]["cpus"] = json!(1000);
    let unit = cluster.unit("j-big-0-1", "j-big", spec, &[]);
    runtime.start(unit).await.unwrap();
    cluster.scheduler_cannot_place("j-big-0-1").await;
    match events.exited("j-big-0-1").await {
        Exit::Failed {
            exit_code: None,
            reason,
        } => assert!(
            reason.contains("cannot schedule it on node") && reason.contains("Insufficient cpu"),
            "{reason}"
        ),
        other => panic!("{other:?}"),
    }
    cluster.gone("j-big-0-1").await;
}

async fn a_unit_over_its_memory_is_reported_oom_killed(
    cluster: &Cluster,
    runtime: &KubernetesRuntime,
    events: &mut Events,
) {
    let mut spec = batch_spec(
        &cluster.image,
        "x=$(head -c 200000000 /dev/zero | tr '\\0' a); echo ${#x}",
    );
    spec["resources"]["memory"] = json!("16MiB");
    let unit = cluster.unit("j-oom-0-1", "j-oom", spec, &[]);
    runtime.start(unit).await.unwrap();
    cluster.kubelet_runs("j-oom-0-1", false).await;
    cluster.kubelet_oom_kills("j-oom-0-1").await;
    events.started("j-oom-0-1").await;
    match events.exited("j-oom-0-1").await {
        Exit::Failed {
            exit_code: Some(137),
            reason,
        } => assert!(reason.contains("OOMKilled"), "{reason}"),
        other => panic!("{other:?}"),
    }
}

async fn a_replica_becomes_ready_and_stops_when_asked(
    cluster: &Cluster,
    runtime: &KubernetesRuntime,
    events: &mut Events,
) {
    let spec = json!({
        "name": "web", "kind": "serving", "image": cluster.image,
        "command": ["sh", "-c", "mkdir -p /tmp/www && echo ok > /tmp/www/index.html && exec httpd -f -p $PORT -h /tmp/www"],
        "resources": { "cpus": 0.1, "memory": "32MiB" },
        "serving": { "replicas": 1, "port": 80, "health": "/" },
    });
    let unit = cluster.unit(
        "j-web-0-1",
        "j-web",
        spec,
        &[("PORT", "8080"), ("REPLICA_INDEX", "0")],
    );
    runtime.start(unit).await.unwrap();
    cluster.kubelet_runs("j-web-0-1", false).await;
    events.started("j-web-0-1").await;
    cluster.kubelet_runs("j-web-0-1", true).await;
    assert!(events.health("j-web-0-1").await, "ready");
    let stop = runtime.stop("j-web-0-1", Duration::from_secs(2));
    let confirm = cluster.kubelet_confirms_deletion("j-web-0-1", events);
    tokio::join!(stop, confirm);
    assert_eq!(events.exited("j-web-0-1").await, Exit::Stopped);
    cluster.gone("j-web-0-1").await;
    cluster.service_gone("j-web").await;
}

async fn stop_deletes_a_workers_pod_and_its_rendezvous(
    cluster: &Cluster,
    runtime: &KubernetesRuntime,
    events: &mut Events,
) {
    let spec = json!({
        "name": "train", "kind": "training", "image": cluster.image, "command": ["sh", "-c", "echo $MASTER_ADDR; sleep 3600"],
        "resources": { "cpus": 0.1, "memory": "32MiB" }, "training": { "workers": 1 },
    });
    let env = [
        ("RANK", "0"),
        ("WORLD_SIZE", "1"),
        ("MASTER_ADDR", "elsewhere"),
        ("MASTER_PORT", "29500"),
    ];
    runtime
        .start(cluster.unit("j-train-0-1", "j-train", spec, &env))
        .await
        .unwrap();
    cluster.kubelet_runs("j-train-0-1", true).await;
    events.started("j-train-0-1").await;
    assert_eq!(runtime.running().await, ["j-train-0-1"]);
    let stop = runtime.stop("j-train-0-1", Duration::from_secs(1));
    let confirm = cluster.kubelet_confirms_deletion("j-train-0-1", events);
    tokio::join!(stop, confirm);
    assert_eq!(events.exited("j-train-0-1").await, Exit::Stopped);
    runtime.stop("j-train-0-1", Duration::from_secs(1)).await; // a second stop is a no-op
    events.quiet("j-train-0-1").await;
    cluster.gone("j-train-0-1").await;
    cluster.service_gone("j-train").await;
}

/// A second runtime (the agent restarted) adopts what still runs and reports what ended.
async fn a_restarted_runtime_adopts_what_runs(cluster: &Cluster, options: KubernetesOptions) {
    // The ended shard is kept for its logs a while; the restarted runtime reports and deletes it.
    let options = KubernetesOptions {
        ended_retention: Duration::from_secs(600),
        ..options
    };
    let (runtime, mut events, _nodes) = cluster.runtime(options.clone()).await;
    runtime
        .start(cluster.unit(
            "j-keep-0-1",
            "j-keep",
            batch_spec(&cluster.image, "sleep 3600"),
            &[],
        ))
        .await
        .unwrap();
    runtime
        .start(cluster.unit(
            "j-done-0-1",
            "j-done",
            batch_spec(&cluster.image, "true"),
            &[],
        ))
        .await
        .unwrap();
    cluster.kubelet_runs("j-keep-0-1", false).await;
    cluster.kubelet_exits("j-done-0-1", 0, "").await;
    events.started("j-keep-0-1").await;
    events.started("j-done-0-1").await;
    assert_eq!(events.exited("j-done-0-1").await, Exit::Code(0));
    runtime.shutdown(Duration::from_secs(1)).await;
    drop(runtime);
    let (runtime, mut events, _nodes) = cluster.runtime(options).await;
    let mut recovered = runtime.recover().await;
    // Earlier scenarios' ended units, still kept for their logs, are reported ended too.
    assert!(
        recovered
            .iter()
            .all(|(id, r)| matches!(r, Recovered::Ended(_)) || id == "j-keep-0-1"),
        "{recovered:?}"
    );
    recovered.retain(|(id, _)| id == "j-keep-0-1" || id == "j-done-0-1");
    recovered.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(recovered.len(), 2, "{recovered:?}");
    assert_eq!(
        recovered[0],
        ("j-done-0-1".to_string(), Recovered::Ended(Exit::Code(0)))
    );
    assert_eq!(recovered[1].0, "j-keep-0-1");
    assert!(
        matches!(&recovered[1].1, Recovered::Running { image: Some(_) }),
        "{recovered:?}"
    );
    cluster.gone("j-done-0-1").await;
    assert_eq!(runtime.running().await, ["j-keep-0-1"]);
    let stop = runtime.stop("j-keep-0-1", Duration::from_secs(1));
    let confirm = cluster.kubelet_confirms_deletion("j-keep-0-1", &mut events);
    tokio::join!(stop, confirm);
    assert_eq!(events.exited("j-keep-0-1").await, Exit::Stopped);
    cluster.gone("j-keep-0-1").await;
}

// --- the fake ---

/// A fake cluster of two nodes: `node-a` with two A100s (GPU feature discovery labels), and
/// `node-b`.
async fn fake_cluster() -> Cluster {
    let fake = FakeKube::start().await;
    fake.add_node(node(
        "node-a",
        "16",
        "64Gi",
        2,
        json!({ "nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB", "nvidia.com/gpu.memory": "81920" }),
    ));
    fake.add_node(node("node-b", "4", "16Gi", 0, json!({})));
    let client = fake.client();
    Cluster {
        fake: Some(fake),
        client,
        namespace: NS.into(),
        node: "node-a".into(),
        image: "registry.local/work:1".into(),
        pull: false,
    }
}

fn fake(cluster: &Cluster) -> &FakeKube {
    cluster.fake.as_ref().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scenarios_against_the_fake_cluster() {
    let cluster = fake_cluster().await;
    fake(&cluster).linger_pod_deletes(true);
    let (runtime, mut events, _nodes) = cluster.runtime(fast_options()).await;
    assert!(
        fake(&cluster).get(Kind::Namespace, "", NS).is_some(),
        "the runtime made its namespace"
    );
    batch_runs_to_success_and_its_log_is_read(&cluster, &runtime, &mut events).await;
    a_failing_shard_reports_its_exit_code(&cluster, &runtime, &mut events).await;
    a_missing_image_fails_naming_it(&cluster, &runtime, &mut events).await;
    an_unschedulable_pod_fails_with_the_schedulers_message(&cluster, &runtime, &mut events).await;
    a_unit_over_its_memory_is_reported_oom_killed(&cluster, &runtime, &mut events).await;
    a_replica_becomes_ready_and_stops_when_asked(&cluster, &runtime, &mut events).await;
    stop_deletes_a_workers_pod_and_its_rendezvous(&cluster, &runtime, &mut events).await;
    drop(runtime);
    a_restarted_runtime_adopts_what_runs(&cluster, fast_options()).await;

    // A stop deletes with the grace asked for: the workload, and its pods by label (the garbage
    // collector would give them their own grace).
    let deletes: Vec<fake_kube::Recorded> = fake(&cluster)
        .requests()
        .into_iter()
        .filter(|r| r.method == "DELETE")
        .collect();
    let deployment = deletes
        .iter()
        .find(|r| r.path == "/apis/apps/v1/namespaces/gantry/deployments/gantry-j-web-0-1")
        .and_then(|r| r.body.clone())
        .expect("the Deployment was deleted");
    assert_eq!(deployment["gracePeriodSeconds"], 2, "{deletes:?}");
    assert_eq!(deployment["propagationPolicy"], "Background");
    let pods = deletes
        .iter()
        .find(|r| {
            r.path == "/api/v1/namespaces/gantry/pods"
                && r.query
                    .contains(&("labelSelector".into(), "gantry.allocation=j-web-0-1".into()))
        })
        .and_then(|r| r.body.clone())
        .expect("the replica's pods were deleted by label");
    assert_eq!(pods["gracePeriodSeconds"], 2);
}

/// What `start` sent, object by object, is what `render` makes; and the JSON literals of
/// `render`'s own tests pin what that is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_sends_exactly_the_rendered_manifests() {
    let cluster = fake_cluster().await;
    let (runtime, _events, _nodes) = cluster.runtime(fast_options()).await;
    let mut units = vec![
        cluster.unit("j-t-0-1", "j-t", json!({
            "name": "t", "kind": "training", "image": "train:1", "resources": { "gpus": 2, "cpus": 1, "memory": "1GiB" },
            "training": { "workers": 2 },
        }), &[("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "node-a"), ("MASTER_PORT", "29500")]),
        cluster.unit("j-t-1-1", "j-t", json!({
            "name": "t", "kind": "training", "image": "train:1", "resources": { "gpus": 2, "cpus": 1, "memory": "1GiB" },
            "training": { "workers": 2 },
        }), &[("RANK", "1"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "node-a"), ("MASTER_PORT", "29500")]),
        cluster.unit("j-b-3-1", "j-b", batch_spec("infer:1", "run"), &[("SHARD_INDEX", "3"), ("SHARD_COUNT", "4")]),
        cluster.unit("j-s-0-1", "j-s", json!({
            "name": "s", "kind": "serving", "image": "serve:1", "serving": { "replicas": 1, "port": 80, "health": "/ready" },
        }), &[("PORT", "31000"), ("REPLICA_INDEX", "0")]),
    ];
    units[0].gpus = vec![
        gantry_agent::runtime::GpuAssignment {
            index: 0,
            uuid: None,
            declared: false,
        },
        gantry_agent::runtime::GpuAssignment {
            index: 1,
            uuid: None,
            declared: false,
        },
    ];
    units[1].gpus = units[0].gpus.clone();
    let mut expected = Vec::new();
    for unit in &units {
        runtime.start(unit.clone()).await.unwrap();
        expected.extend(render(unit, NS));
    }
    assert_eq!(fake(&cluster).created(), expected);
    // The second worker's Service already existed (409) and was left as it was.
    let services = fake(&cluster).names(Kind::Service, NS, "gantry.job=j-t");
    assert_eq!(services, ["gantry-j-t"]);
    let worker = fake(&cluster).get(Kind::Pod, NS, "gantry-j-t-1-1").unwrap();
    let env = worker["spec"]["containers"][0]["env"].as_array().unwrap();
    assert!(
        env.contains(&json!({ "name": "MASTER_ADDR", "value": "gantry-j-t.gantry.svc" })),
        "{env:?}"
    );
    assert_eq!(
        worker["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"],
        "2"
    );
    assert_eq!(
        worker["spec"]["nodeName"], "node-a",
        "the fake's scheduler bound it"
    );
    // The Job's and the Deployment's pods came from their templates.
    assert_eq!(
        fake(&cluster)
            .names(Kind::Pod, NS, "gantry.allocation=j-b-3-1")
            .len(),
        1
    );
    assert_eq!(
        fake(&cluster)
            .names(Kind::Pod, NS, "gantry.allocation=j-s-0-1")
            .len(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evictions_and_pods_or_nodes_gone_are_reported() {
    let cluster = fake_cluster().await;
    let fake = fake(&cluster);
    let (runtime, mut events, mut nodes) = cluster.runtime(fast_options()).await;
    let on_b = unit(
        "j-b-0-1",
        "j-b",
        "node-b",
        batch_spec("work:1", "sleep 60"),
        &[],
    );
    let on_a = cluster.unit("j-a-0-1", "j-a", batch_spec("work:1", "sleep 60"), &[]);
    let evicted = cluster.unit("j-e-0-1", "j-e", batch_spec("work:1", "sleep 60"), &[]);
    let removed = cluster.unit("j-r-0-1", "j-r", batch_spec("work:1", "sleep 60"), &[]);
    for unit in [&on_b, &on_a, &evicted, &removed] {
        runtime.start(unit.clone()).await.unwrap();
        cluster.kubelet_runs(&unit.allocation_id, false).await;
        events.started(&unit.allocation_id).await;
    }

    // The kubelet evicts one.
    let pod = cluster.pod_of("j-e-0-1").await;
    fake.evict_pod(NS, &pod, "The node was low on resource: memory.");
    assert_eq!(
        events.exited("j-e-0-1").await,
        Exit::Failed {
            exit_code: None,
            reason: "evicted by Kubernetes: The node was low on resource: memory.".into()
        }
    );

    // Someone deletes a pod by hand.
    let pod = cluster.pod_of("j-r-0-1").await;
    fake.remove(Kind::Pod, NS, &pod);
    assert_eq!(
        events.exited("j-r-0-1").await,
        Exit::Lost(format!("its pod {pod} was deleted, and not by Gantry"))
    );
    cluster.gone("j-r-0-1").await;

    // node-b leaves the cluster: its unit is lost, the node list loses it, node-a's is left.
    let names = |nodes: &[NodeCapacity]| nodes.iter().map(|n| n.name.clone()).collect::<Vec<_>>();
    assert_eq!(names(&nodes.borrow_and_update()), ["node-a", "node-b"]);
    fake.remove(Kind::Node, "", "node-b");
    assert_eq!(
        events.exited("j-b-0-1").await,
        Exit::Lost("node node-b left the cluster".into())
    );
    tokio::time::timeout(WAIT, nodes.changed())
        .await
        .expect("the node list changes")
        .unwrap();
    assert_eq!(names(&nodes.borrow_and_update()), ["node-a"]);
    cluster.gone("j-b-0-1").await;
    events.quiet("j-a-0-1").await;
    assert_eq!(runtime.running().await, ["j-a-0-1"]);

    // The watches lose their history while node-a's pod is deleted: the runtime lists again and
    // finds it gone.
    let pod = cluster.pod_of("j-a-0-1").await;
    let lists_before = pod_lists(fake);
    fake.behind_the_watches(|fake| {
        fake.remove(Kind::Pod, NS, &pod);
    });
    assert_eq!(
        events.exited("j-a-0-1").await,
        Exit::Lost(format!("its pod {pod} was deleted, and not by Gantry"))
    );
    assert!(pod_lists(fake) > lists_before, "the pods were listed again");
}

/// How many times the cluster's pods were listed (not watched).
fn pod_lists(fake: &FakeKube) -> usize {
    fake.requests()
        .iter()
        .filter(|r| {
            r.method == "GET"
                && r.path == "/api/v1/pods"
                && !r.query.iter().any(|(k, _)| k == "watch")
        })
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_capacity_is_what_other_work_leaves_free() {
    let cluster = fake_cluster().await;
    let fake = fake(&cluster);
    // Other work on node-a before the runtime starts, and a DaemonSet-like pod in kube-system.
    fake.create(Kind::Pod, "default", json!({
        "metadata": { "name": "notebook", "labels": { "app": "notebook" } },
        "spec": { "nodeName": "node-a", "containers": [{ "name": "c", "image": "jupyter", "resources": {
            "requests": { "cpu": "2500m", "memory": "8Gi", "nvidia.com/gpu": "1" },
        } }] },
        "status": { "phase": "Running" },
    }));
    fake.create(Kind::Pod, "kube-system", json!({
        "metadata": { "name": "proxy" },
        "spec": { "nodeName": "node-b", "containers": [{ "name": "c", "image": "proxy", "resources": { "requests": { "cpu": "1", "memory": "1Gi" } } }] },
        "status": { "phase": "Running" },
    }));
    let (runtime, mut events, mut nodes) = cluster.runtime(fast_options()).await;
    let first = nodes.borrow_and_update().clone();
    let summary = |nodes: &[NodeCapacity]| -> Vec<(String, u32, u64, usize)> {
        nodes
            .iter()
            .map(|n| {
                (
                    n.name.clone(),
                    n.cpu_cores,
                    n.memory_bytes >> 30,
                    n.gpus.len(),
                )
            })
            .collect()
    };
    assert_eq!(
        summary(&first),
        [("node-a".into(), 13, 56, 1), ("node-b".into(), 3, 15, 0)]
    );
    let a = &first[0];
    assert_eq!(
        (a.gpus[0].model.as_str(), a.gpus[0].memory_bytes),
        ("NVIDIA-A100-SXM4-80GB", 80 << 30)
    );
    assert_eq!(
        (a.hostname.as_str(), a.os.as_str(), a.arch.as_str()),
        ("node-a", "linux", "amd64")
    );

    // Gantry's own pods are the coordinator's to count.
    let mut gpu_unit = cluster.unit("j-g-0-1", "j-g", batch_spec("work:1", "true"), &[]);
    gpu_unit.gpus = vec![gantry_agent::runtime::GpuAssignment {
        index: 0,
        uuid: None,
        declared: false,
    }];
    runtime.start(gpu_unit).await.unwrap();
    cluster.kubelet_runs("j-g-0-1", false).await;
    events.started("j-g-0-1").await;

    // The notebook ends: its room comes back, and a new node joins.
    fake.update(Kind::Pod, "default", "notebook", |pod| {
        pod["status"]["phase"] = json!("Succeeded")
    });
    fake.add_node(node("node-c", "2", "4Gi", 0, json!({})));
    let want = [
        ("node-a".into(), 16, 64, 2),
        ("node-b".into(), 3, 15, 0),
        ("node-c".into(), 2, 4, 0),
    ];
    eventually("the node list to follow the cluster", WAIT, || {
        let done = summary(&nodes.borrow_and_update()) == want;
        async move { done.then_some(()) }
    })
    .await;

    // Cordoned or not Ready, a node is not offered.
    fake.update(Kind::Node, "", "node-c", |n| {
        n["spec"]["unschedulable"] = json!(true)
    });
    fake.update(
        Kind::Node,
        "",
        "node-b",
        |n| {
            n["status"]["conditions"] =
                json!([{ "type": "Ready", "status": "Unknown", "reason": "NodeStatusUnknown" }])
        },
    );
    eventually("cordoned and unready nodes to leave the list", WAIT, || {
        let current = summary(&nodes.borrow_and_update());
        async move { (current.len() == 1 && current[0].0 == "node-a").then_some(()) }
    })
    .await;
    // Nothing changes, nothing is sent.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!nodes.has_changed().unwrap());
}

/// Scenarios that a real kubelet can play, against the cluster `GANTRY_TEST_KUBECONFIG`
/// names, in a namespace of their own that is deleted afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scenarios_against_a_real_cluster() {
    let Ok(path) = std::env::var("GANTRY_TEST_KUBECONFIG") else {
        println!("skipped: set GANTRY_TEST_KUBECONFIG to a kubeconfig to run the Kubernetes scenarios against a real cluster");
        return;
    };
    let kubeconfig =
        kube::config::Kubeconfig::read_from(&path).expect("read GANTRY_TEST_KUBECONFIG");
    let config = kube::Config::from_custom_kubeconfig(
        kubeconfig,
        &kube::config::KubeConfigOptions::default(),
    )
    .await
    .expect("a usable kubeconfig");
    let client = kube::Client::try_from(config).unwrap();
    let namespace = format!("gantry-test-{:08x}", rand_u32());
    let image = std::env::var("GANTRY_TEST_IMAGE").unwrap_or_else(|_| "busybox:1.36".into());
    let mut cluster = Cluster {
        fake: None,
        client: client.clone(),
        namespace: namespace.clone(),
        node: String::new(),
        image,
        pull: true,
    };
    let options = KubernetesOptions {
        unschedulable_timeout: Duration::from_secs(5),
        pod_appear_timeout: Duration::from_secs(60),
        ..fast_options()
    };
    let (runtime, mut events, nodes) = cluster.runtime(options.clone()).await;
    cluster.node = nodes
        .borrow()
        .first()
        .expect("a schedulable node")
        .name
        .clone();
    println!("running in namespace {namespace} on node {}", cluster.node);
    batch_runs_to_success_and_its_log_is_read(&cluster, &runtime, &mut events).await;
    a_failing_shard_reports_its_exit_code(&cluster, &runtime, &mut events).await;
    a_missing_image_fails_naming_it(&cluster, &runtime, &mut events).await;
    an_unschedulable_pod_fails_with_the_schedulers_message(&cluster, &runtime, &mut events).await;
    a_unit_over_its_memory_is_reported_oom_killed(&cluster, &runtime, &mut events).await;
    a_replica_becomes_ready_and_stops_when_asked(&cluster, &runtime, &mut events).await;
    stop_deletes_a_workers_pod_and_its_rendezvous(&cluster, &runtime, &mut events).await;
    drop(runtime);
    a_restarted_runtime_adopts_what_runs(&cluster, options).await;
    let namespaces: kube::Api<Namespace> = kube::Api::all(client);
    let _ = namespaces.delete(&namespace, &Default::default()).await;
}

fn rand_u32() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos()
        ^ std::process::id()
}

// --- end to end ---

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kubernetes_agent_registers_the_clusters_nodes_and_runs_a_batch_job() {
    let cluster = fake_cluster().await;
    let fake = fake(&cluster);
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    fake.write_kubeconfig(&kubeconfig);

    let coordinator = CoordinatorProcess::start(dir.path()).await;
    let (quic, http, token) = (
        coordinator.quic.clone(),
        coordinator.http.clone(),
        coordinator.token.clone(),
    );
    let api = Api::new(http.parse().unwrap(), token.clone());
    let join = coordinator.join_token("agent").await;
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        "name = \"cluster\"\nruntime = \"kubernetes\"\nkubernetes_namespace = \"gantry\"\n",
    )
    .unwrap();
    let mut command = gantry();
    command
        .args(["agent", "--coordinator", &quic, "--join", &join])
        .arg("--data-dir")
        .arg(dir.path().join("agent"))
        .arg("--config")
        .arg(&config)
        .env("KUBECONFIG", &kubeconfig)
        .env("HOME", dir.path());
    let _agent = spawn_logged(command, &dir.path().join("agent.log"));

    let log = || std::fs::read_to_string(dir.path().join("agent.log")).unwrap_or_default();
    let nodes = eventually(
        "the agent to register the cluster's two nodes",
        Duration::from_secs(30),
        || async {
            let nodes = api.nodes().await;
            (nodes.len() == 2 && nodes.iter().all(|n| n.status == "ready")).then_some(nodes)
        },
    )
    .await;
    let names: Vec<&str> = nodes.iter().map(|n| n.node.as_str()).collect();
    assert_eq!(names, ["node-a", "node-b"], "{}", log());
    assert!(
        nodes.iter().all(|n| n.runtimes == ["kubernetes"]),
        "{nodes:?}"
    );
    assert_eq!(nodes[0].gpus.len(), 2);

    let output = gantry()
        .args(["nodes", "--api", &http])
        .env("GANTRY_TOKEN", &token)
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{table}");
    for wanted in [
        "/node-a",
        "/node-b",
        "kubernetes",
        "2x NVIDIA-A100-SXM4-80GB",
    ] {
        assert!(table.contains(wanted), "{wanted} in:\n{table}");
    }

    let response = reqwest::Client::new()
        .post(format!("{}/v1/jobs", api.base))
        .bearer_auth(&token)
        .json(&json!({
            "name": "infer", "kind": "batch", "image": "registry.local/infer:1",
            "command": ["sh", "-c", "echo $SHARD_INDEX"],
            "resources": { "cpus": 1, "memory": "256MiB" }, "batch": { "shards": 2 },
        }))
        .send()
        .await
        .unwrap();
    let job: Value = response.json().await.unwrap();
    let job_id = job["id"]
        .as_str()
        .unwrap_or_else(|| panic!("{job}"))
        .to_string();
    let selector = format!("gantry.job={job_id}");
    let pods = eventually(
        "a pod per shard in the fake cluster",
        Duration::from_secs(30),
        || {
            let pods = fake.names(Kind::Pod, NS, &selector);
            async move { (pods.len() == 2).then_some(pods) }
        },
    )
    .await;
    let jobs = fake.list(Kind::Job, Some(NS), &selector);
    assert_eq!(jobs.len(), 2);
    let mut shards: Vec<String> = jobs
        .iter()
        .map(|j| {
            assert_eq!(j["spec"]["backoffLimit"], 0);
            let env = j["spec"]["template"]["spec"]["containers"][0]["env"]
                .as_array()
                .unwrap()
                .clone();
            env.iter().find(|e| e["name"] == "SHARD_INDEX").unwrap()["value"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    shards.sort();
    assert_eq!(shards, ["0", "1"]);
    for pod in &pods {
        fake.run_pod(NS, pod, IMAGE_ID, false);
    }
    for pod in &pods {
        fake.end_pod(NS, pod, 0, "Completed");
    }
    let state = eventually("the job to succeed", Duration::from_secs(30), || async {
        let job: Value = reqwest::Client::new()
            .get(format!("{}/v1/jobs/{job_id}", api.base))
            .bearer_auth(&token)
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        let state = job["state"].as_str()?.to_string();
        assert!(state != "failed", "{job}\n{}", log());
        (state == "succeeded").then_some(job)
    })
    .await;
    let allocations = state["allocations"].as_array().unwrap();
    assert!(
        allocations.iter().all(|a| a["state"] == "succeeded"),
        "{state}"
    );
}
