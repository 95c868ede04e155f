//! The objects the Kubernetes runtime creates for a unit, as JSON: one workload per allocation
//! (a Pod for a training worker, a `batch/v1` Job for a batch shard, a Deployment for a serving
//! replica) and one Service per job for training (headless, the rank-0 rendezvous) and serving.
//! Pure: [`render`] is what `start` sends, byte for byte.

use crate::runtime::UnitSpec;
use gantry_protocol::jobspec::JobKind;
use serde_json::{json, Value};
use std::collections::BTreeMap;

pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY: &str = "gantry";
pub const LABEL_JOB: &str = "gantry.job";
pub const LABEL_ALLOCATION: &str = "gantry.allocation";
/// On training workers: the rank, so the rendezvous Service can select rank 0.
pub const LABEL_RANK: &str = "gantry.rank";
/// The label selector for everything this runtime creates.
pub const MANAGED_SELECTOR: &str = "app.kubernetes.io/managed-by=gantry";
pub const CONTAINER_NAME: &str = "main";
pub const SERVING_PORT_NAME: &str = "serve";
pub const GPU_RESOURCE: &str = "nvidia.com/gpu";
/// torchrun's default, used when the unit's env names no `MASTER_PORT`.
const MASTER_PORT_DEFAULT: u16 = 29_500;
/// Kubernetes names that are DNS labels (Services, Jobs) may have at most this many characters.
const DNS_LABEL_CHARS_MAX: usize = 63;
const LABEL_VALUE_CHARS_MAX: usize = 63;

/// The object that runs an allocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Workload {
    /// A training worker: a bare Pod, so that a worker's failure is the gang's to handle.
    Pod,
    /// A batch shard: a `batch/v1` Job of one completion and no retries.
    Job,
    /// A serving replica: a Deployment of one replica behind the job's Service.
    Deployment,
}

impl Workload {
    pub fn of(kind: JobKind) -> Self {
        match kind {
            JobKind::Training => Workload::Pod,
            JobKind::Batch => Workload::Job,
            JobKind::Serving => Workload::Deployment,
        }
    }

    pub fn kind(self) -> &'static str {
        match self {
            Workload::Pod => "Pod",
            Workload::Job => "Job",
            Workload::Deployment => "Deployment",
        }
    }
}

/// The name of the allocation's workload object.
pub fn workload_name(allocation_id: &str) -> String {
    dns_label(&format!("gantry-{allocation_id}"))
}

/// The name of the job's Service (training: headless rendezvous; serving: the replicas).
pub fn job_service_name(job_id: &str) -> String {
    dns_label(&format!("gantry-{job_id}"))
}

/// What training workers get as `MASTER_ADDR`: the rendezvous Service's DNS name. Written
/// without the cluster domain (`cluster.local` is only the default); the pods' DNS search path
/// completes it.
pub fn rendezvous_address(job_id: &str, namespace: &str) -> String {
    format!("{}.{namespace}.svc", job_service_name(job_id))
}

/// Refusals that depend on the unit alone.
pub fn check(unit: &UnitSpec) -> Result<(), String> {
    if unit.image.is_none() {
        return Err("the unit names no image (Kubernetes runs containers only)".into());
    }
    for (what, value) in [
        ("allocation id", &unit.allocation_id),
        ("job id", &unit.job_id),
    ] {
        if !is_label_value(value) || value.is_empty() {
            return Err(format!(
                "the {what} {value:?} is not a valid Kubernetes label value (1 to 63 of [A-Za-z0-9._-], starting and ending alphanumeric)"
            ));
        }
    }
    Ok(())
}

/// The manifests `start` creates, in order: the job's Service (training and serving), then the
/// allocation's workload. See the module documentation.
pub fn render(unit: &UnitSpec, namespace: &str) -> Vec<Value> {
    let workload = Workload::of(unit.job.kind);
    let mut manifests = Vec::new();
    match workload {
        Workload::Pod => manifests.push(rendezvous_service(unit, namespace)),
        Workload::Deployment => manifests.push(serving_service(unit, namespace)),
        Workload::Job => {}
    }
    manifests.push(workload_manifest(unit, namespace, workload));
    manifests
}

fn labels(unit: &UnitSpec) -> BTreeMap<&'static str, String> {
    let mut labels = BTreeMap::from([
        (LABEL_MANAGED_BY, MANAGED_BY.to_string()),
        (LABEL_JOB, unit.job_id.clone()),
        (LABEL_ALLOCATION, unit.allocation_id.clone()),
    ]);
    if unit.job.kind == JobKind::Training {
        if let Some(rank) = unit.env.get("RANK") {
            labels.insert(LABEL_RANK, rank.clone());
        }
    }
    labels
}

fn job_labels(unit: &UnitSpec) -> Value {
    json!({ LABEL_MANAGED_BY: MANAGED_BY, LABEL_JOB: unit.job_id })
}

fn master_port(unit: &UnitSpec) -> u16 {
    unit.env
        .get("MASTER_PORT")
        .and_then(|port| port.parse().ok())
        .unwrap_or(MASTER_PORT_DEFAULT)
}

fn serving_port(unit: &UnitSpec) -> u16 {
    unit.port
        .or_else(|| unit.job.serving.as_ref().map(|serving| serving.port))
        .unwrap_or(8080)
}

fn rendezvous_service(unit: &UnitSpec, namespace: &str) -> Value {
    let port = master_port(unit);
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": job_service_name(&unit.job_id),
            "namespace": namespace,
            "labels": job_labels(unit),
        },
        "spec": {
            "clusterIP": "None",
            // Workers resolve the name before rank 0 is ready (it has no readiness probe, but
            // the name must resolve as soon as the pod has an address).
            "publishNotReadyAddresses": true,
            "selector": { LABEL_JOB: unit.job_id, LABEL_RANK: "0" },
            "ports": [{ "name": "rendezvous", "port": port, "targetPort": port, "protocol": "TCP" }],
        },
    })
}

fn serving_service(unit: &UnitSpec, namespace: &str) -> Value {
    let port = unit
        .job
        .serving
        .as_ref()
        .map_or_else(|| serving_port(unit), |serving| serving.port);
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": job_service_name(&unit.job_id),
            "namespace": namespace,
            "labels": job_labels(unit),
        },
        "spec": {
            "selector": { LABEL_JOB: unit.job_id },
            "ports": [{ "name": SERVING_PORT_NAME, "port": port, "targetPort": SERVING_PORT_NAME, "protocol": "TCP" }],
        },
    })
}

fn workload_manifest(unit: &UnitSpec, namespace: &str, workload: Workload) -> Value {
    let labels = labels(unit);
    let metadata = json!({
        "name": workload_name(&unit.allocation_id),
        "namespace": namespace,
        "labels": labels,
    });
    match workload {
        Workload::Pod => json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": metadata,
            "spec": pod_spec(unit, namespace, "Never"),
        }),
        Workload::Job => json!({
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": metadata,
            "spec": {
                // Gantry retries shards itself, with backoff, and counts the tries.
                "backoffLimit": 0,
                "completions": 1,
                "parallelism": 1,
                "template": {
                    "metadata": { "labels": labels },
                    "spec": pod_spec(unit, namespace, "Never"),
                },
            },
        }),
        Workload::Deployment => json!({
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": metadata,
            "spec": {
                "replicas": 1,
                "selector": { "matchLabels": { LABEL_ALLOCATION: unit.allocation_id } },
                // Never two pods of one replica: the old one goes before a new one starts.
                "strategy": { "type": "Recreate" },
                "template": {
                    "metadata": { "labels": labels },
                    // Deployments require Always; a restart is reported as the replica's end.
                    "spec": pod_spec(unit, namespace, "Always"),
                },
            },
        }),
    }
}

fn pod_spec(unit: &UnitSpec, namespace: &str, restart_policy: &str) -> Value {
    let mut env = unit.env.clone();
    if unit.job.kind == JobKind::Training {
        env.insert(
            "MASTER_ADDR".into(),
            rendezvous_address(&unit.job_id, namespace),
        );
    }
    env.insert("GANTRY_ALLOCATION_ID".into(), unit.allocation_id.clone());
    env.insert("GANTRY_JOB_ID".into(), unit.job_id.clone());
    let env: Vec<Value> = env
        .iter()
        .map(|(name, value)| json!({ "name": name, "value": value }))
        .collect();
    let mut resources = serde_json::Map::new();
    resources.insert("cpu".into(), json!(format!("{}m", unit.cpu_millis)));
    resources.insert("memory".into(), json!(unit.memory_bytes.to_string()));
    if !unit.gpus.is_empty() {
        resources.insert(GPU_RESOURCE.into(), json!(unit.gpus.len().to_string()));
    }
    let mut container = json!({
        "name": CONTAINER_NAME,
        "image": unit.image.clone().unwrap_or_default(),
        // Offline first: an image is pulled only when the job or the agent allows it.
        "imagePullPolicy": if unit.pull { "IfNotPresent" } else { "Never" },
        "env": env,
        // Requests equal to limits: the Guaranteed QoS class, as the scheduler promised.
        "resources": { "requests": resources, "limits": resources },
    });
    if !unit.command.is_empty() {
        container["command"] = json!(unit.command);
    }
    if let Some(serving) = &unit.job.serving {
        let port = serving_port(unit);
        container["ports"] =
            json!([{ "name": SERVING_PORT_NAME, "containerPort": port, "protocol": "TCP" }]);
        container["readinessProbe"] = json!({
            "httpGet": { "path": serving.health_path, "port": port },
            "periodSeconds": 2,
            "timeoutSeconds": 2,
            "failureThreshold": 3,
        });
    }
    json!({
        "restartPolicy": restart_policy,
        // Pinned to the node Gantry chose, through the scheduler (as DaemonSets are), so that
        // a node that cannot take the pod says why instead of the kubelet refusing it.
        "affinity": { "nodeAffinity": { "requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{ "matchFields": [
                { "key": "metadata.name", "operator": "In", "values": [unit.node] }
            ] }],
        } } },
        // GPU nodes are commonly tainted to keep other work off; Gantry chose this node.
        "tolerations": [{ "key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule" }],
        // Work needs no API token, and no variables for every Service in the namespace.
        "automountServiceAccountToken": false,
        "enableServiceLinks": false,
        "containers": [container],
    })
}

/// A valid label value: at most 63 of `[A-Za-z0-9._-]`, starting and ending alphanumeric.
pub fn is_label_value(value: &str) -> bool {
    value.len() <= LABEL_VALUE_CHARS_MAX
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && value
            .bytes()
            .next()
            .is_none_or(|b| b.is_ascii_alphanumeric())
        && value
            .bytes()
            .last()
            .is_none_or(|b| b.is_ascii_alphanumeric())
}

/// `name` made a DNS label: lower case, `[a-z0-9-]`, at most 63 characters. A name that had to
/// change ends in a hash of the original, so two ids never map to one name.
fn dns_label(name: &str) -> String {
    let mapped: String = name
        .chars()
        .map(|c| c.to_ascii_lowercase())
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    let trimmed = mapped.trim_matches('-');
    if trimmed == name && name.len() <= DNS_LABEL_CHARS_MAX {
        return name.to_string();
    }
    let hash = format!("{:08x}", fnv1a(name.as_bytes()));
    let keep = DNS_LABEL_CHARS_MAX - hash.len() - 1;
    let head = trimmed[..trimmed.len().min(keep)].trim_end_matches('-');
    format!("{head}-{hash}")
}

fn fnv1a(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5u32, |hash, &b| {
        (hash ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::GpuAssignment;

    /// A unit of `spec`, assigned to `node-a` with Gantry's env for the unit.
    fn unit(
        allocation_id: &str,
        spec: Value,
        added_env: &[(&str, &str)],
        n_gpus: u32,
        pull: bool,
    ) -> UnitSpec {
        let job = gantry_protocol::jobspec::from_json_value(spec).expect("a valid spec");
        let added_env: BTreeMap<String, String> = added_env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let gpus = (0..n_gpus)
            .map(|index| GpuAssignment {
                index,
                uuid: None,
                declared: false,
            })
            .collect();
        UnitSpec::new(allocation_id, "j-1", job, "node-a", &added_env, gpus, pull)
    }

    fn check(unit: &UnitSpec, expected: Value) {
        let rendered = Value::Array(render(unit, "gantry"));
        assert_eq!(
            rendered,
            expected,
            "rendered:\n{}",
            serde_json::to_string_pretty(&rendered).unwrap()
        );
    }

    fn pinned_to_node_a() -> Value {
        json!({ "nodeAffinity": { "requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{ "matchFields": [
                { "key": "metadata.name", "operator": "In", "values": ["node-a"] }
            ] }]
        } } })
    }

    fn gpu_toleration() -> Value {
        json!([{ "key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule" }])
    }

    #[test]
    fn a_batch_shard_is_a_job_of_one_completion_without_retries() {
        let shard = unit(
            "j-1-2-1",
            json!({
                "name": "infer", "kind": "batch", "image": "registry.local/infer:1",
                "command": ["python", "infer.py"], "env": { "MODEL": "m" },
                "resources": { "gpus": 1, "cpus": 2, "memory": "4GiB" },
                "batch": { "shards": 4 },
            }),
            &[("SHARD_INDEX", "2"), ("SHARD_COUNT", "4")],
            1,
            false,
        );
        let labels = json!({
            "app.kubernetes.io/managed-by": "gantry", "gantry.job": "j-1", "gantry.allocation": "j-1-2-1",
        });
        let resources = json!({ "cpu": "2000m", "memory": "4294967296", "nvidia.com/gpu": "1" });
        check(
            &shard,
            json!([{
                "apiVersion": "batch/v1",
                "kind": "Job",
                "metadata": { "name": "gantry-j-1-2-1", "namespace": "gantry", "labels": labels },
                "spec": {
                    "backoffLimit": 0, "completions": 1, "parallelism": 1,
                    "template": {
                        "metadata": { "labels": labels },
                        "spec": {
                            "restartPolicy": "Never",
                            "affinity": pinned_to_node_a(),
                            "tolerations": gpu_toleration(),
                            "automountServiceAccountToken": false,
                            "enableServiceLinks": false,
                            "containers": [{
                                "name": "main",
                                "image": "registry.local/infer:1",
                                "imagePullPolicy": "Never",
                                "command": ["python", "infer.py"],
                                "env": [
                                    { "name": "GANTRY_ALLOCATION_ID", "value": "j-1-2-1" },
                                    { "name": "GANTRY_JOB_ID", "value": "j-1" },
                                    { "name": "MODEL", "value": "m" },
                                    { "name": "SHARD_COUNT", "value": "4" },
                                    { "name": "SHARD_INDEX", "value": "2" },
                                ],
                                "resources": { "requests": resources, "limits": resources },
                            }],
                        },
                    },
                },
            }]),
        );
    }

    #[test]
    fn a_training_worker_is_a_pod_with_a_rendezvous_service_for_its_job() {
        let worker = unit(
            "j-1-1-1",
            json!({
                "name": "train", "kind": "training", "image": "train:2", "pull": true,
                "resources": { "cpus": 0.5, "memory": "1GiB" }, "training": { "workers": 2 },
            }),
            &[
                ("RANK", "1"),
                ("WORLD_SIZE", "2"),
                ("LOCAL_RANK", "0"),
                ("NODE_RANK", "1"),
                ("MASTER_ADDR", "node-b.example"),
                ("MASTER_PORT", "29500"),
            ],
            0,
            false,
        );
        let resources = json!({ "cpu": "500m", "memory": "1073741824" });
        check(
            &worker,
            json!([
                {
                    "apiVersion": "v1",
                    "kind": "Service",
                    "metadata": {
                        "name": "gantry-j-1", "namespace": "gantry",
                        "labels": { "app.kubernetes.io/managed-by": "gantry", "gantry.job": "j-1" },
                    },
                    "spec": {
                        "clusterIP": "None",
                        "publishNotReadyAddresses": true,
                        "selector": { "gantry.job": "j-1", "gantry.rank": "0" },
                        "ports": [{ "name": "rendezvous", "port": 29500, "targetPort": 29500, "protocol": "TCP" }],
                    },
                },
                {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "metadata": {
                        "name": "gantry-j-1-1-1", "namespace": "gantry",
                        "labels": {
                            "app.kubernetes.io/managed-by": "gantry", "gantry.job": "j-1",
                            "gantry.allocation": "j-1-1-1", "gantry.rank": "1",
                        },
                    },
                    "spec": {
                        "restartPolicy": "Never",
                        "affinity": pinned_to_node_a(),
                        "tolerations": gpu_toleration(),
                        "automountServiceAccountToken": false,
                        "enableServiceLinks": false,
                        "containers": [{
                            "name": "main",
                            "image": "train:2",
                            "imagePullPolicy": "IfNotPresent",
                            "env": [
                                { "name": "GANTRY_ALLOCATION_ID", "value": "j-1-1-1" },
                                { "name": "GANTRY_JOB_ID", "value": "j-1" },
                                { "name": "LOCAL_RANK", "value": "0" },
                                { "name": "MASTER_ADDR", "value": "gantry-j-1.gantry.svc" },
                                { "name": "MASTER_PORT", "value": "29500" },
                                { "name": "NODE_RANK", "value": "1" },
                                { "name": "RANK", "value": "1" },
                                { "name": "WORLD_SIZE", "value": "2" },
                            ],
                            "resources": { "requests": resources, "limits": resources },
                        }],
                    },
                },
            ]),
        );
    }

    #[test]
    fn a_serving_replica_is_a_deployment_behind_its_jobs_service() {
        let replica = unit(
            "j-1-0-3",
            json!({
                "name": "serve", "kind": "serving", "image": "serve:3", "command": ["serve"],
                "resources": { "cpus": 1, "memory": "512MiB" },
                "serving": { "replicas": 2, "port": 80, "health": "/healthz" },
            }),
            &[("PORT", "31002"), ("REPLICA_INDEX", "0")],
            0,
            true,
        );
        let labels = json!({
            "app.kubernetes.io/managed-by": "gantry", "gantry.job": "j-1", "gantry.allocation": "j-1-0-3",
        });
        let resources = json!({ "cpu": "1000m", "memory": "536870912" });
        check(
            &replica,
            json!([
                {
                    "apiVersion": "v1",
                    "kind": "Service",
                    "metadata": {
                        "name": "gantry-j-1", "namespace": "gantry",
                        "labels": { "app.kubernetes.io/managed-by": "gantry", "gantry.job": "j-1" },
                    },
                    "spec": {
                        "selector": { "gantry.job": "j-1" },
                        "ports": [{ "name": "serve", "port": 80, "targetPort": "serve", "protocol": "TCP" }],
                    },
                },
                {
                    "apiVersion": "apps/v1",
                    "kind": "Deployment",
                    "metadata": { "name": "gantry-j-1-0-3", "namespace": "gantry", "labels": labels },
                    "spec": {
                        "replicas": 1,
                        "selector": { "matchLabels": { "gantry.allocation": "j-1-0-3" } },
                        "strategy": { "type": "Recreate" },
                        "template": {
                            "metadata": { "labels": labels },
                            "spec": {
                                "restartPolicy": "Always",
                                "affinity": pinned_to_node_a(),
                                "tolerations": gpu_toleration(),
                                "automountServiceAccountToken": false,
                                "enableServiceLinks": false,
                                "containers": [{
                                    "name": "main",
                                    "image": "serve:3",
                                    "imagePullPolicy": "IfNotPresent",
                                    "command": ["serve"],
                                    "env": [
                                        { "name": "GANTRY_ALLOCATION_ID", "value": "j-1-0-3" },
                                        { "name": "GANTRY_JOB_ID", "value": "j-1" },
                                        { "name": "PORT", "value": "31002" },
                                        { "name": "REPLICA_INDEX", "value": "0" },
                                    ],
                                    "resources": { "requests": resources, "limits": resources },
                                    "ports": [{ "name": "serve", "containerPort": 31002, "protocol": "TCP" }],
                                    "readinessProbe": {
                                        "httpGet": { "path": "/healthz", "port": 31002 },
                                        "periodSeconds": 2, "timeoutSeconds": 2, "failureThreshold": 3,
                                    },
                                }],
                            },
                        },
                    },
                },
            ]),
        );
    }

    #[test]
    fn names_are_dns_labels_and_ids_must_be_label_values() {
        assert_eq!(workload_name("j-0123-1-2"), "gantry-j-0123-1-2");
        let long = workload_name(&"a".repeat(80));
        assert_eq!(long.len(), 63, "{long}");
        assert!(long.starts_with("gantry-aaa"), "{long}");
        assert_ne!(
            long,
            workload_name(&"a".repeat(81)),
            "different ids, different names"
        );
        let odd = job_service_name("Job_1");
        assert!(odd.starts_with("gantry-job-1-"), "{odd}");
        assert!(odd
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'));

        let spec = json!({ "name": "x", "kind": "batch", "image": "i", "command": ["true"] });
        assert!(super::check(&unit("j-1-0-1", spec.clone(), &[], 0, false)).is_ok());
        let bad = super::check(&unit("-bad", spec.clone(), &[], 0, false)).unwrap_err();
        assert!(bad.contains("allocation id"), "{bad}");
        let mut no_image = unit("j-1-0-1", spec, &[], 0, false);
        no_image.image = None;
        assert!(super::check(&no_image).unwrap_err().contains("no image"));
    }
}
