//! The Kubernetes runtime: the agent stands for a whole cluster. It reports one node per
//! schedulable cluster node, with what other work leaves free, and runs each allocation as
//! Kubernetes objects in one namespace: a Pod per training worker (with a headless Service per
//! job for the rank-0 rendezvous), a `batch/v1` Job per batch shard, a Deployment per serving
//! replica (with a Service per job). See [`manifests`] for the objects and [`tracker`] for how
//! what the cluster shows becomes events.
//!
//! The shell: one task owns the [`tracker::Tracker`] and takes every input in one `match`
//! ([`Input`]): the node and pod watches (list, then watch from the list's resourceVersion,
//! listing again when the server says the version is gone), a tick for timeouts, and the
//! `Runtime` calls that need the tracker. API calls run in the callers' futures or in spawned
//! tasks; the loop never waits on the API server.
//!
//! Work outlives the agent: [`Runtime::shutdown`] stops watching and leaves the objects, and a
//! restarted agent adopts them through [`Runtime::recover`] (the coordinator stops what it no
//! longer wants). Logs: Kubernetes merges a container's stdout and stderr into one log, which
//! `logs` returns as stdout; stderr is refused. GPUs are the device plugin's to choose:
//! `nvidia.com/gpu` is requested by count and the plugin sets the visible devices, so Gantry's
//! GPU indexes are not passed on.

pub mod manifests;
pub mod quantity;
pub mod tracker;

pub use manifests::render;

use super::{BoxFuture, Recovered, Runtime, RuntimeConfig, RuntimeError, RuntimeEvent, UnitSpec};
use futures::StreamExt;
use gantry_protocol::{NodeCapacity, RuntimeKind};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, PodSpec, PodTemplateSpec, Service};
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, ListParams, LogParams, PostParams,
    PropagationPolicy, WatchEvent, WatchParams,
};
use kube::{Resource, ResourceExt};
use manifests::{
    job_service_name, workload_name, Workload, LABEL_ALLOCATION, LABEL_JOB, MANAGED_BY,
    MANAGED_SELECTOR,
};
use serde::de::DeserializeOwned;
use std::collections::BTreeMap;
use std::fmt::Debug;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tracker::{Action, Found, Tracker, TrackerConfig, UnitInfo};

/// Inputs waiting for the runtime's loop; the watches wait when it is full.
const INPUT_QUEUE: usize = 1024;
/// Objects per page when listing.
const LIST_PAGE: u32 = 500;
/// Pages per list: a bound on a list that never ends (500,000 objects).
const LIST_PAGES_MAX: usize = 1000;
/// Watch reconnects back off up to this.
const WATCH_BACKOFF_MAX: Duration = Duration::from_secs(10);
/// After deleting a stopped unit's pods without grace, how long to wait for them to go.
const FORCE_DELETE_WAIT: Duration = Duration::from_secs(10);
/// Requests for a log tail grow by this factor until they hold enough bytes, at most
/// `LOG_TRIES_MAX` times.
const LOG_TAIL_GROWTH: i64 = 4;
const LOG_TRIES_MAX: usize = 6;
/// A first guess at the bytes per log line, to turn a byte count into `tailLines`.
const LOG_LINE_BYTES_GUESS: u64 = 64;

/// Timing of the Kubernetes runtime; the defaults suit a real cluster, tests shorten them.
#[derive(Debug, Clone)]
pub struct KubernetesOptions {
    /// A pod the scheduler cannot place this long is reported failed with its message.
    pub unschedulable_timeout: Duration,
    /// A Job or Deployment that has no pod this long is reported failed.
    pub pod_appear_timeout: Duration,
    /// A serving replica running but not ready this long is reported failed.
    pub unready_timeout: Duration,
    /// Pods and Jobs that ended by themselves are kept this long for their logs.
    pub ended_retention: Duration,
    /// A job's Service outlives its last unit here by this much.
    pub service_linger: Duration,
    /// How often timeouts are checked and the node capacity is sent when it changed.
    pub tick: Duration,
    /// After the grace, how long `stop` waits for pods to go before deleting them without grace.
    pub stop_margin: Duration,
}

impl Default for KubernetesOptions {
    fn default() -> Self {
        Self {
            unschedulable_timeout: Duration::from_secs(30),
            pod_appear_timeout: Duration::from_secs(60),
            unready_timeout: crate::supervisor::HEALTH_STARTUP_TIMEOUT,
            ended_retention: Duration::from_secs(600),
            service_linger: Duration::from_secs(60),
            tick: Duration::from_millis(500),
            stop_margin: Duration::from_secs(30),
        }
    }
}

/// Why the runtime could not start.
#[derive(Debug, thiserror::Error)]
pub enum KubernetesError {
    #[error("{action}: {reason}")]
    Api { action: String, reason: String },
}

/// Runs allocations as Kubernetes objects. See the module documentation.
pub struct KubernetesRuntime {
    client: kube::Client,
    namespace: String,
    options: KubernetesOptions,
    log_bytes_max: u64,
    inputs: mpsc::Sender<Input>,
    tasks: Vec<JoinHandle<()>>,
}

/// One change a watch saw.
#[derive(Debug)]
enum Change<K> {
    /// Everything there is (a list at start, or after the watch had to start over).
    Listed(Vec<K>),
    Applied(Box<K>),
    Deleted(Box<K>),
}

/// Everything the runtime's loop reacts to.
enum Input {
    Nodes(Change<Node>),
    Pods(Change<Pod>),
    Register {
        info: UnitInfo,
        reply: oneshot::Sender<bool>,
    },
    /// Whether a unit just created is still wanted.
    IsWanted {
        allocation_id: String,
        reply: oneshot::Sender<bool>,
    },
    Unregister {
        allocation_id: String,
    },
    BeginStop {
        allocation_id: String,
        reply: oneshot::Sender<Option<tracker::StopPlan>>,
    },
    WaitGone {
        allocation_id: String,
        reply: oneshot::Sender<()>,
    },
    FinishStop {
        allocation_id: String,
    },
    Running {
        reply: oneshot::Sender<Vec<String>>,
    },
    Adopt {
        found: Vec<Found>,
        service_jobs: Vec<String>,
        reply: oneshot::Sender<Vec<(String, Recovered)>>,
    },
}

fn describe(error: &kube::Error) -> String {
    match error {
        kube::Error::Api(status) => {
            let reason = if status.reason.is_empty() {
                String::new()
            } else {
                format!(" ({})", status.reason)
            };
            format!("{}{reason}", status.message)
        }
        other => other.to_string(),
    }
}

fn status_code(error: &kube::Error) -> Option<u16> {
    match error {
        kube::Error::Api(status) => Some(status.code),
        _ => None,
    }
}

fn api_error(action: impl Into<String>, error: &kube::Error) -> KubernetesError {
    KubernetesError::Api {
        action: action.into(),
        reason: describe(error),
    }
}

impl KubernetesRuntime {
    /// Lists the cluster's nodes and pods (so the first value of the returned channel is the
    /// cluster as it is), makes sure the namespace exists, and starts watching. Fails when the
    /// API server refuses (RBAC) or does not answer.
    pub async fn new(
        client: kube::Client,
        namespace: String,
        config: RuntimeConfig,
        events: mpsc::UnboundedSender<RuntimeEvent>,
    ) -> Result<(Self, watch::Receiver<Vec<NodeCapacity>>), KubernetesError> {
        Self::with_options(
            client,
            namespace,
            config,
            KubernetesOptions::default(),
            events,
        )
        .await
    }

    pub async fn with_options(
        client: kube::Client,
        namespace: String,
        config: RuntimeConfig,
        options: KubernetesOptions,
        events: mpsc::UnboundedSender<RuntimeEvent>,
    ) -> Result<(Self, watch::Receiver<Vec<NodeCapacity>>), KubernetesError> {
        ensure_namespace(&client, &namespace).await?;
        let nodes_api: Api<Node> = Api::all(client.clone());
        let pods_api: Api<Pod> = Api::all(client.clone());
        let (nodes, nodes_version) = list_all(&nodes_api, &ListParams::default())
            .await
            .map_err(|e| api_error("list the cluster's nodes", &e))?;
        let (pods, pods_version) = list_all(&pods_api, &ListParams::default())
            .await
            .map_err(|e| api_error("list the cluster's pods", &e))?;
        let mut tracker = Tracker::new(TrackerConfig {
            namespace: namespace.clone(),
            unschedulable_timeout_ms: millis(options.unschedulable_timeout),
            pod_appear_timeout_ms: millis(options.pod_appear_timeout),
            unready_timeout_ms: millis(options.unready_timeout),
            ended_retention_ms: millis(options.ended_retention),
            service_linger_ms: millis(options.service_linger),
        });
        // No unit is registered yet: the lists only fill the picture.
        let clock = Instant::now();
        let _ = tracker.handle_nodes_listed(nodes, 0);
        let _ = tracker.handle_pods_listed(pods, 0);
        let capacities = tracker.capacities();
        tracing::info!(
            nodes = capacities.len(),
            namespace = %namespace,
            "Kubernetes runtime watching the cluster"
        );
        let (nodes_tx, nodes_rx) = watch::channel(capacities);
        let (inputs_tx, inputs_rx) = mpsc::channel(INPUT_QUEUE);
        let driver = Driver {
            tracker,
            clock,
            events,
            nodes_tx,
            client: client.clone(),
            namespace: namespace.clone(),
            stop_waiters: BTreeMap::new(),
            capacity_dirty: false,
            nodes_left_out_warned: false,
        };
        let tasks = vec![
            tokio::spawn(driver.run(inputs_rx, options.tick)),
            tokio::spawn(watch_loop(
                nodes_api,
                nodes_version,
                inputs_tx.clone(),
                Input::Nodes,
                "nodes",
            )),
            tokio::spawn(watch_loop(
                pods_api,
                pods_version,
                inputs_tx.clone(),
                Input::Pods,
                "pods",
            )),
        ];
        let runtime = Self {
            client,
            namespace,
            options,
            log_bytes_max: config.log_bytes_max,
            inputs: inputs_tx,
            tasks,
        };
        Ok((runtime, nodes_rx))
    }

    /// Asks the loop and waits for its answer; `None` when the loop is gone (shut down).
    async fn ask<T>(&self, input: impl FnOnce(oneshot::Sender<T>) -> Input) -> Option<T> {
        let (reply, answer) = oneshot::channel();
        self.inputs.send(input(reply)).await.ok()?;
        answer.await.ok()
    }

    async fn create(&self, manifest: &serde_json::Value) -> Result<(), kube::Error> {
        let resource = match manifest["kind"].as_str() {
            Some("Pod") => ApiResource::erase::<Pod>(&()),
            Some("Service") => ApiResource::erase::<Service>(&()),
            Some("Job") => ApiResource::erase::<Job>(&()),
            Some("Deployment") => ApiResource::erase::<Deployment>(&()),
            other => unreachable!("render makes no {other:?}"),
        };
        let object: DynamicObject =
            serde_json::from_value(manifest.clone()).map_err(kube::Error::SerdeError)?;
        let api: Api<DynamicObject> =
            Api::namespaced_with(self.client.clone(), &self.namespace, &resource);
        api.create(&PostParams::default(), &object).await?;
        Ok(())
    }

    async fn start_unit(&self, unit: UnitSpec) -> Result<(), RuntimeError> {
        if unit.image.is_none() {
            return Err(RuntimeError::Unsupported {
                runtime: "kubernetes",
                reason: "the unit names no image, and Kubernetes runs containers only".into(),
            });
        }
        let start_error = |reason: String| RuntimeError::Start {
            allocation_id: unit.allocation_id.clone(),
            reason,
        };
        manifests::check(&unit).map_err(start_error)?;
        let info = UnitInfo {
            allocation_id: unit.allocation_id.clone(),
            job_id: unit.job_id.clone(),
            node: unit.node.clone(),
            workload: Workload::of(unit.job.kind),
        };
        // Registered before anything is created, so that the first pod events find it.
        match self.ask(|reply| Input::Register { info, reply }).await {
            Some(true) => {}
            Some(false) => {
                tracing::debug!(allocation = %unit.allocation_id, "already known; start ignored");
                return Ok(());
            }
            None => {
                return Err(start_error(
                    "the Kubernetes runtime is shutting down".into(),
                ))
            }
        }
        for manifest in render(&unit, &self.namespace) {
            let kind = manifest["kind"].as_str().unwrap_or_default().to_string();
            let name = manifest["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            match self.create(&manifest).await {
                Ok(()) => {}
                // The job's Service, made for another unit; or the workload, made by a start
                // that an agent restart cut short.
                Err(e) if status_code(&e) == Some(409) => {
                    tracing::debug!(allocation = %unit.allocation_id, %kind, %name, "exists already")
                }
                Err(e) => {
                    let _ = self
                        .inputs
                        .send(Input::Unregister {
                            allocation_id: unit.allocation_id.clone(),
                        })
                        .await;
                    return Err(start_error(format!(
                        "create {kind} {name} in namespace {}: {}",
                        self.namespace,
                        describe(&e)
                    )));
                }
            }
        }
        let allocation_id = unit.allocation_id.clone();
        let wanted = self
            .ask(|reply| Input::IsWanted {
                allocation_id,
                reply,
            })
            .await;
        if wanted != Some(true) {
            // A stop came while the objects were being created, and found nothing to delete.
            tracing::info!(allocation = %unit.allocation_id, "stopped while starting; deleting what was created");
            let workload = Workload::of(unit.job.kind);
            if let Err(e) = delete_workload(
                &self.client,
                &self.namespace,
                &unit.allocation_id,
                workload,
                Some(0),
            )
            .await
            {
                tracing::warn!(allocation = %unit.allocation_id, "could not delete its {}: {}", workload.kind(), describe(&e));
            }
            return Ok(());
        }
        tracing::info!(allocation = %unit.allocation_id, job = %unit.job_id, node = %unit.node, "created in Kubernetes");
        Ok(())
    }

    async fn stop_unit(&self, allocation_id: String, grace: Duration) {
        let allocation_id_for_stop = allocation_id.clone();
        let Some(Some(plan)) = self
            .ask(|reply| Input::BeginStop {
                allocation_id: allocation_id_for_stop,
                reply,
            })
            .await
        else {
            return;
        };
        let grace_s = u32::try_from(grace.as_millis().div_ceil(1000)).unwrap_or(u32::MAX);
        if let Err(e) = delete_workload(
            &self.client,
            &self.namespace,
            &allocation_id,
            plan.workload,
            Some(grace_s),
        )
        .await
        {
            tracing::warn!(allocation = %allocation_id, "could not delete its {}: {}", plan.workload.kind(), describe(&e));
        }
        if plan.workload != Workload::Pod {
            // The garbage collector deletes a Job's or Deployment's pods with their own grace
            // period, not the one asked for here.
            self.delete_pods(&allocation_id, grace_s).await;
        }
        if !self
            .wait_gone(&allocation_id, grace + self.options.stop_margin)
            .await
        {
            tracing::warn!(allocation = %allocation_id, "its pods outlived the grace; deleting them without grace");
            self.delete_pods(&allocation_id, 0).await;
            if !self.wait_gone(&allocation_id, FORCE_DELETE_WAIT).await {
                tracing::warn!(allocation = %allocation_id, "its pods are still there (is their node down?); reporting it stopped anyway");
            }
        }
        let _ = self.inputs.send(Input::FinishStop { allocation_id }).await;
    }

    /// Whether the unit's pods went within `timeout`.
    async fn wait_gone(&self, allocation_id: &str, timeout: Duration) -> bool {
        let allocation_id = allocation_id.to_string();
        let wait = self.ask(|reply| Input::WaitGone {
            allocation_id,
            reply,
        });
        matches!(tokio::time::timeout(timeout, wait).await, Ok(Some(())))
    }

    /// Deletes the allocation's pods, by label.
    async fn delete_pods(&self, allocation_id: &str, grace_s: u32) {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.namespace);
        let selector = format!("{LABEL_ALLOCATION}={allocation_id}");
        let params = DeleteParams {
            grace_period_seconds: Some(grace_s),
            ..DeleteParams::default()
        };
        if let Err(e) = pods
            .delete_collection(&params, &ListParams::default().labels(&selector))
            .await
        {
            tracing::warn!(allocation = %allocation_id, "could not delete its pods: {}", describe(&e));
        }
    }

    async fn recover_units(&self) -> Vec<(String, Recovered)> {
        let params = ListParams::default().labels(MANAGED_SELECTOR);
        let client = &self.client;
        let namespace = &self.namespace;
        let jobs = Api::<Job>::namespaced(client.clone(), namespace)
            .list(&params)
            .await;
        let deployments = Api::<Deployment>::namespaced(client.clone(), namespace)
            .list(&params)
            .await;
        let pods = Api::<Pod>::namespaced(client.clone(), namespace)
            .list(&params)
            .await;
        let services = Api::<Service>::namespaced(client.clone(), namespace)
            .list(&params)
            .await;
        let (jobs, deployments, pods, services) = match (jobs, deployments, pods, services) {
            (Ok(jobs), Ok(deployments), Ok(pods), Ok(services)) => {
                (jobs.items, deployments.items, pods.items, services.items)
            }
            (jobs, deployments, pods, services) => {
                let error = [jobs.err(), deployments.err(), pods.err(), services.err()]
                    .into_iter()
                    .flatten()
                    .next()
                    .map(|e| describe(&e))
                    .unwrap_or_default();
                tracing::error!(namespace = %namespace, "cannot list what an earlier run left, so none of it is adopted: {error}");
                return Vec::new();
            }
        };
        let mut found = Vec::new();
        for job in &jobs {
            if let Some(info) = unit_info(
                job,
                Workload::Job,
                template_node(job.spec.as_ref().map(|s| &s.template)),
            ) {
                found.push(Found {
                    info,
                    job_outcome: job_outcome(job),
                });
            }
        }
        for deployment in &deployments {
            let node = template_node(Some(&deployment.spec.template));
            if let Some(info) = unit_info(deployment, Workload::Deployment, node) {
                found.push(Found {
                    info,
                    job_outcome: None,
                });
            }
        }
        // Bare pods are training workers; the others belong to a Job or a ReplicaSet.
        for pod in pods.iter().filter(|p| p.owner_references().is_empty()) {
            let node = pod.spec.as_ref().and_then(pod_node);
            if let Some(info) = unit_info(pod, Workload::Pod, node) {
                found.push(Found {
                    info,
                    job_outcome: None,
                });
            }
        }
        let service_jobs: Vec<String> = services
            .iter()
            .filter_map(|service| service.labels().get(LABEL_JOB).cloned())
            .collect();
        self.ask(|reply| Input::Adopt {
            found,
            service_jobs,
            reply,
        })
        .await
        .unwrap_or_default()
    }

    async fn read_logs(&self, allocation_id: &str, bytes: u64) -> Result<Vec<u8>, RuntimeError> {
        let not_found = |what: String| {
            RuntimeError::Io(std::io::Error::new(std::io::ErrorKind::NotFound, what))
        };
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.namespace);
        let selector = format!("{LABEL_ALLOCATION}={allocation_id}");
        let list = pods
            .list(&ListParams::default().labels(&selector))
            .await
            .map_err(|e| {
                not_found(format!(
                    "list the pods of {allocation_id}: {}",
                    describe(&e)
                ))
            })?;
        let newest = list
            .items
            .into_iter()
            .max_by(|a, b| {
                a.creation_timestamp()
                    .cmp(&b.creation_timestamp())
                    .then_with(|| a.name_any().cmp(&b.name_any()))
            })
            .ok_or_else(|| not_found(format!("no pod of allocation {allocation_id}")))?;
        let name = newest.name_any();
        let bytes_max = bytes.min(self.log_bytes_max);
        // `limitBytes` keeps the oldest bytes, so the tail is asked for in lines, more of
        // them until they hold enough.
        let mut tail_lines =
            i64::try_from(bytes_max / LOG_LINE_BYTES_GUESS + 1).unwrap_or(i64::MAX);
        let mut log = Vec::new();
        for _ in 0..LOG_TRIES_MAX {
            let params = LogParams {
                container: Some(manifests::CONTAINER_NAME.into()),
                tail_lines: Some(tail_lines),
                limit_bytes: Some(i64::try_from(self.log_bytes_max).unwrap_or(i64::MAX)),
                ..LogParams::default()
            };
            let reader = pods
                .log_stream(&name, &params)
                .await
                .map_err(|e| not_found(format!("read the log of pod {name}: {}", describe(&e))))?;
            log.clear();
            futures::AsyncReadExt::read_to_end(
                &mut futures::AsyncReadExt::take(reader, self.log_bytes_max),
                &mut log,
            )
            .await?;
            let lines = log.iter().filter(|&&b| b == b'\n').count();
            let whole_log = i64::try_from(lines).unwrap_or(i64::MAX) < tail_lines;
            if whole_log || log.len() as u64 >= bytes_max || log.len() as u64 >= self.log_bytes_max
            {
                break;
            }
            tail_lines = tail_lines.saturating_mul(LOG_TAIL_GROWTH);
        }
        let keep = log
            .len()
            .min(usize::try_from(bytes_max).unwrap_or(usize::MAX));
        Ok(log.split_off(log.len() - keep))
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// The allocation an object of Gantry's belongs to, from its labels.
fn unit_info<K: Resource>(
    object: &K,
    workload: Workload,
    node: Option<String>,
) -> Option<UnitInfo> {
    let labels = object.meta().labels.as_ref()?;
    Some(UnitInfo {
        allocation_id: labels.get(LABEL_ALLOCATION)?.clone(),
        job_id: labels.get(LABEL_JOB)?.clone(),
        node: node.unwrap_or_default(),
        workload,
    })
}

fn template_node(template: Option<&PodTemplateSpec>) -> Option<String> {
    template.and_then(|t| t.spec.as_ref()).and_then(pod_node)
}

/// The node a pod spec is pinned to: the name in its node affinity, else where it runs.
fn pod_node(spec: &PodSpec) -> Option<String> {
    spec.affinity
        .as_ref()
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|a| {
            a.required_during_scheduling_ignored_during_execution
                .as_ref()
        })
        .and_then(|selector| selector.node_selector_terms.first())
        .and_then(|term| term.match_fields.as_ref())
        .and_then(|fields| fields.iter().find(|f| f.key == "metadata.name"))
        .and_then(|field| field.values.as_ref()?.first().cloned())
        .or_else(|| spec.node_name.clone())
}

/// How a Job ended, from its conditions; `None` while it has not.
fn job_outcome(job: &Job) -> Option<super::Exit> {
    let conditions = job.status.as_ref()?.conditions.as_ref()?;
    let holds = |kind: &str| {
        conditions
            .iter()
            .find(|c| c.type_ == kind && c.status == "True")
    };
    if holds("Complete").is_some() {
        return Some(super::Exit::Code(0));
    }
    holds("Failed").map(|c| super::Exit::Failed {
        exit_code: None,
        reason: format!(
            "the Job failed ({}): {}",
            c.reason.as_deref().unwrap_or("no reason given"),
            c.message.as_deref().unwrap_or("no message")
        ),
    })
}

async fn ensure_namespace(client: &kube::Client, namespace: &str) -> Result<(), KubernetesError> {
    let api: Api<Namespace> = Api::all(client.clone());
    match api.get(namespace).await {
        Ok(_) => Ok(()),
        Err(e) if status_code(&e) == Some(404) => {
            let object: Namespace = serde_json::from_value(serde_json::json!({
                "metadata": { "name": namespace, "labels": { manifests::LABEL_MANAGED_BY: MANAGED_BY } },
            }))
            .expect("a namespace manifest");
            match api.create(&PostParams::default(), &object).await {
                Ok(_) => {
                    tracing::info!(namespace, "created the namespace");
                    Ok(())
                }
                Err(e) if status_code(&e) == Some(409) => Ok(()),
                Err(e) => Err(api_error(
                    format!("the namespace {namespace} does not exist and could not be created"),
                    &e,
                )),
            }
        }
        // Agents may be allowed into their namespace without reading namespaces.
        Err(e) if status_code(&e) == Some(403) => {
            tracing::warn!(
                namespace,
                "cannot check that the namespace exists: {}",
                describe(&e)
            );
            Ok(())
        }
        Err(e) => Err(api_error(format!("read the namespace {namespace}"), &e)),
    }
}

async fn delete_workload(
    client: &kube::Client,
    namespace: &str,
    allocation_id: &str,
    workload: Workload,
    grace_s: Option<u32>,
) -> Result<(), kube::Error> {
    let name = workload_name(allocation_id);
    let params = DeleteParams {
        grace_period_seconds: grace_s,
        // Jobs default to orphaning their pods.
        propagation_policy: Some(PropagationPolicy::Background),
        ..DeleteParams::default()
    };
    let deleted = match workload {
        Workload::Pod => Api::<Pod>::namespaced(client.clone(), namespace)
            .delete(&name, &params)
            .await
            .map(drop),
        Workload::Job => Api::<Job>::namespaced(client.clone(), namespace)
            .delete(&name, &params)
            .await
            .map(drop),
        Workload::Deployment => Api::<Deployment>::namespaced(client.clone(), namespace)
            .delete(&name, &params)
            .await
            .map(drop),
    };
    match deleted {
        Err(e) if status_code(&e) == Some(404) => Ok(()),
        other => other,
    }
}

async fn delete_job_service(
    client: &kube::Client,
    namespace: &str,
    job_id: &str,
) -> Result<(), kube::Error> {
    let api: Api<Service> = Api::namespaced(client.clone(), namespace);
    match api
        .delete(&job_service_name(job_id), &DeleteParams::default())
        .await
    {
        Err(e) if status_code(&e) == Some(404) => Ok(()),
        other => other.map(drop),
    }
}

/// Every object `api` lists, page by page, and the list's resourceVersion to watch from.
async fn list_all<K>(api: &Api<K>, params: &ListParams) -> Result<(Vec<K>, String), kube::Error>
where
    K: Clone + DeserializeOwned + Debug + Resource,
{
    let mut items = Vec::new();
    let mut params = params.clone().limit(LIST_PAGE);
    for _ in 0..LIST_PAGES_MAX {
        let page = api.list(&params).await?;
        items.extend(page.items);
        match page.metadata.continue_.filter(|token| !token.is_empty()) {
            Some(token) => params = params.continue_token(&token),
            None => return Ok((items, page.metadata.resource_version.unwrap_or_default())),
        }
    }
    tracing::warn!("a list ran past {LIST_PAGES_MAX} pages; using what it gave");
    Ok((items, String::new()))
}

/// Watches `api` from `version` for as long as the runtime's loop takes inputs: on a dropped
/// connection it watches again from the last version seen, and when the server no longer has
/// that version (410 Gone) it lists everything again.
async fn watch_loop<K>(
    api: Api<K>,
    mut version: String,
    inputs: mpsc::Sender<Input>,
    wrap: fn(Change<K>) -> Input,
    what: &'static str,
) where
    K: Clone + DeserializeOwned + Debug + Resource + Send + 'static,
{
    let mut backoff = Duration::from_millis(200);
    let mut relist = version.is_empty();
    loop {
        if relist {
            match list_all(&api, &ListParams::default()).await {
                Ok((items, listed_version)) => {
                    version = listed_version;
                    relist = false;
                    if inputs.send(wrap(Change::Listed(items))).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    tracing::warn!("cannot list {what}: {}", describe(&e));
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(WATCH_BACKOFF_MAX);
                    continue;
                }
            }
        }
        let stream = match api.watch(&WatchParams::default(), &version).await {
            Ok(stream) => stream,
            Err(e) => {
                if status_code(&e) == Some(410) {
                    relist = true;
                } else {
                    tracing::warn!("cannot watch {what}: {}", describe(&e));
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(WATCH_BACKOFF_MAX);
                }
                continue;
            }
        };
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            let change = match event {
                Ok(WatchEvent::Added(object)) | Ok(WatchEvent::Modified(object)) => {
                    Change::Applied(Box::new(object))
                }
                Ok(WatchEvent::Deleted(object)) => Change::Deleted(Box::new(object)),
                Ok(WatchEvent::Bookmark(bookmark)) => {
                    version = bookmark.metadata.resource_version;
                    continue;
                }
                Ok(WatchEvent::Error(status)) => {
                    if status.code == 410 {
                        relist = true;
                    } else {
                        tracing::warn!("the {what} watch reported: {}", status.message);
                    }
                    break;
                }
                Err(e) => {
                    tracing::debug!("the {what} watch ended: {}", describe(&e));
                    break;
                }
            };
            backoff = Duration::from_millis(200);
            if let Change::Applied(object) | Change::Deleted(object) = &change {
                if let Some(seen) = object.resource_version() {
                    version = seen;
                }
            }
            if inputs.send(wrap(change)).await.is_err() {
                return;
            }
        }
        // A watch ends after its timeout as a matter of course; do not spin on a server that
        // ends them at once.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The runtime's loop: owns the tracker and carries out its actions.
struct Driver {
    tracker: Tracker,
    clock: Instant,
    events: mpsc::UnboundedSender<RuntimeEvent>,
    nodes_tx: watch::Sender<Vec<NodeCapacity>>,
    client: kube::Client,
    namespace: String,
    stop_waiters: BTreeMap<String, Vec<oneshot::Sender<()>>>,
    capacity_dirty: bool,
    nodes_left_out_warned: bool,
}

impl Driver {
    fn now_ms(&self) -> u64 {
        millis(self.clock.elapsed())
    }

    async fn run(mut self, mut inputs: mpsc::Receiver<Input>, tick: Duration) {
        let mut ticker = tokio::time::interval(tick);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                input = inputs.recv() => match input {
                    Some(input) => self.handle(input),
                    None => return,
                },
                _ = ticker.tick() => {
                    let actions = self.tracker.poll(self.now_ms());
                    self.perform(actions);
                    self.publish_capacity();
                }
            }
        }
    }

    fn handle(&mut self, input: Input) {
        let now_ms = self.now_ms();
        let actions = match input {
            Input::Nodes(change) => {
                self.capacity_dirty = true;
                match change {
                    Change::Listed(nodes) => self.tracker.handle_nodes_listed(nodes, now_ms),
                    Change::Applied(node) => self.tracker.handle_node(*node, now_ms),
                    Change::Deleted(node) => {
                        self.tracker.handle_node_deleted(&node.name_any(), now_ms)
                    }
                }
            }
            Input::Pods(change) => {
                self.capacity_dirty = true;
                let actions = match change {
                    Change::Listed(pods) => self.tracker.handle_pods_listed(pods, now_ms),
                    Change::Applied(pod) => self.tracker.handle_pod(*pod, now_ms),
                    Change::Deleted(pod) => self.tracker.handle_pod_deleted(*pod, now_ms),
                };
                self.wake_stoppers();
                actions
            }
            Input::Register { info, reply } => {
                let (registered, actions) = self.tracker.register(info, now_ms);
                let _ = reply.send(registered);
                actions
            }
            Input::IsWanted {
                allocation_id,
                reply,
            } => {
                let _ = reply.send(self.tracker.is_wanted(&allocation_id));
                Vec::new()
            }
            Input::Unregister { allocation_id } => {
                self.tracker.unregister(&allocation_id, now_ms);
                Vec::new()
            }
            Input::BeginStop {
                allocation_id,
                reply,
            } => {
                let _ = reply.send(self.tracker.begin_stop(&allocation_id));
                Vec::new()
            }
            Input::WaitGone {
                allocation_id,
                reply,
            } => {
                if self.tracker.is_gone(&allocation_id) {
                    let _ = reply.send(());
                } else {
                    self.stop_waiters
                        .entry(allocation_id)
                        .or_default()
                        .push(reply);
                }
                Vec::new()
            }
            Input::FinishStop { allocation_id } => {
                self.stop_waiters.remove(&allocation_id);
                self.tracker.finish_stop(&allocation_id, now_ms)
            }
            Input::Running { reply } => {
                let _ = reply.send(self.tracker.running());
                Vec::new()
            }
            Input::Adopt {
                found,
                service_jobs,
                reply,
            } => {
                let (recovered, actions) = self.tracker.adopt(found, service_jobs, now_ms);
                let _ = reply.send(recovered);
                actions
            }
        };
        self.perform(actions);
    }

    fn wake_stoppers(&mut self) {
        let gone: Vec<String> = self
            .stop_waiters
            .keys()
            .filter(|id| self.tracker.is_gone(id))
            .cloned()
            .collect();
        for allocation_id in gone {
            for waiter in self.stop_waiters.remove(&allocation_id).unwrap_or_default() {
                let _ = waiter.send(());
            }
        }
    }

    fn perform(&mut self, actions: Vec<Action>) {
        for action in actions {
            match action {
                Action::Emit(event) => {
                    if let RuntimeEvent::Exited {
                        allocation_id,
                        exit,
                    } = &event
                    {
                        tracing::info!(allocation = %allocation_id, ?exit, "unit ended");
                    }
                    let _ = self.events.send(event);
                }
                Action::DeleteWorkload {
                    allocation_id,
                    workload,
                } => {
                    let client = self.client.clone();
                    let namespace = self.namespace.clone();
                    tokio::spawn(async move {
                        if let Err(e) =
                            delete_workload(&client, &namespace, &allocation_id, workload, None)
                                .await
                        {
                            tracing::warn!(allocation = %allocation_id, "could not delete its {}: {}", workload.kind(), describe(&e));
                        }
                    });
                }
                Action::DeleteJobService { job_id } => {
                    let client = self.client.clone();
                    let namespace = self.namespace.clone();
                    tokio::spawn(async move {
                        if let Err(e) = delete_job_service(&client, &namespace, &job_id).await {
                            tracing::warn!(job = %job_id, "could not delete its Service: {}", describe(&e));
                        }
                    });
                }
            }
        }
    }

    fn publish_capacity(&mut self) {
        if !std::mem::take(&mut self.capacity_dirty) {
            return;
        }
        let left_out = self.tracker.nodes_left_out();
        if left_out > 0 && !self.nodes_left_out_warned {
            self.nodes_left_out_warned = true;
            tracing::warn!(
                left_out,
                "the cluster has more schedulable nodes than a registration carries ({})",
                tracker::NODES_MAX
            );
        }
        let capacities = self.tracker.capacities();
        self.nodes_tx.send_if_modified(|current| {
            if *current == capacities {
                return false;
            }
            *current = capacities;
            true
        });
    }
}

impl Runtime for KubernetesRuntime {
    fn kind(&self) -> RuntimeKind {
        RuntimeKind::Kubernetes
    }

    fn recover(&self) -> BoxFuture<'_, Vec<(String, Recovered)>> {
        Box::pin(self.recover_units())
    }

    fn checks_health(&self) -> bool {
        true
    }

    fn start(&self, unit: UnitSpec) -> BoxFuture<'_, Result<(), RuntimeError>> {
        Box::pin(self.start_unit(unit))
    }

    fn stop(&self, allocation_id: &str, grace: Duration) -> BoxFuture<'_, ()> {
        Box::pin(self.stop_unit(allocation_id.to_string(), grace))
    }

    /// Sorted. A unit is listed until its end is reported.
    fn running(&self) -> BoxFuture<'_, Vec<String>> {
        Box::pin(async move {
            self.ask(|reply| Input::Running { reply })
                .await
                .unwrap_or_default()
        })
    }

    fn logs(
        &self,
        allocation_id: &str,
        stderr: bool,
        bytes: u64,
    ) -> BoxFuture<'_, Result<Vec<u8>, RuntimeError>> {
        let allocation_id = allocation_id.to_string();
        Box::pin(async move {
            if stderr {
                return Err(RuntimeError::Unsupported {
                    runtime: "kubernetes",
                    reason: "Kubernetes merges a container's stderr into its one log; read stdout"
                        .into(),
                });
            }
            self.read_logs(&allocation_id, bytes).await
        })
    }

    /// Stops watching. The work goes on in the cluster, for a restarted agent to adopt.
    fn shutdown(&self, _grace: Duration) -> BoxFuture<'_, ()> {
        for task in &self.tasks {
            task.abort();
        }
        Box::pin(async {})
    }
}

impl Drop for KubernetesRuntime {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// The cluster's schedulable nodes as the runtime would report them, listed once (for
/// `gantry agent fingerprint`).
pub async fn list_capacities(
    client: &kube::Client,
    namespace: &str,
) -> Result<Vec<NodeCapacity>, KubernetesError> {
    let (nodes, _) = list_all(&Api::<Node>::all(client.clone()), &ListParams::default())
        .await
        .map_err(|e| api_error("list the cluster's nodes", &e))?;
    let (pods, _) = list_all(&Api::<Pod>::all(client.clone()), &ListParams::default())
        .await
        .map_err(|e| api_error("list the cluster's pods", &e))?;
    let mut tracker = Tracker::new(TrackerConfig {
        namespace: namespace.to_string(),
        unschedulable_timeout_ms: 0,
        pod_appear_timeout_ms: 0,
        unready_timeout_ms: 0,
        ended_retention_ms: 0,
        service_linger_ms: 0,
    });
    let _ = tracker.handle_nodes_listed(nodes, 0);
    let _ = tracker.handle_pods_listed(pods, 0);
    Ok(tracker.capacities())
}

/// A client for the cluster `kube::Config::infer` finds (in-cluster, or `KUBECONFIG`).
pub async fn infer_client() -> Result<kube::Client, KubernetesError> {
    let config = kube::Config::infer()
        .await
        .map_err(|e| KubernetesError::Api {
            action: "find the cluster".into(),
            reason: e.to_string(),
        })?;
    kube::Client::try_from(config).map_err(|e| api_error("make a client for the cluster", &e))
}
