//! A fake Kubernetes API server on loopback, faithful in the parts the Kubernetes runtime uses:
//! list and watch (JSON lines of `{"type","object"}` from a resourceVersion, `410 Gone` as an
//! `ERROR` event once history was compacted), get, create (uid, resourceVersion,
//! creationTimestamp filled in; `409 AlreadyExists`), delete by name and by label selector
//! (grace periods, propagation: a Job's pods are orphaned unless asked otherwise, as in
//! Kubernetes), `/status`, `pods/{name}/log` (`tailLines`, `limitBytes`), for namespaces,
//! nodes, pods, services, deployments and jobs. It plays the controllers and the scheduler
//! just enough: a Job or Deployment gets its pod, a pod pinned to an existing node is bound to
//! it. Tests play the kubelet with the `*_pod` methods, and read every request it answered.
#![allow(dead_code)]

use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use tokio::sync::broadcast;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Namespace,
    Node,
    Pod,
    Service,
    Job,
    Deployment,
}

impl Kind {
    const ALL: [Kind; 6] = [
        Kind::Namespace,
        Kind::Node,
        Kind::Pod,
        Kind::Service,
        Kind::Job,
        Kind::Deployment,
    ];

    fn api_version(self) -> &'static str {
        match self {
            Kind::Namespace | Kind::Node | Kind::Pod | Kind::Service => "v1",
            Kind::Job => "batch/v1",
            Kind::Deployment => "apps/v1",
        }
    }

    fn kind(self) -> &'static str {
        match self {
            Kind::Namespace => "Namespace",
            Kind::Node => "Node",
            Kind::Pod => "Pod",
            Kind::Service => "Service",
            Kind::Job => "Job",
            Kind::Deployment => "Deployment",
        }
    }

    fn plural(self) -> &'static str {
        match self {
            Kind::Namespace => "namespaces",
            Kind::Node => "nodes",
            Kind::Pod => "pods",
            Kind::Service => "services",
            Kind::Job => "jobs",
            Kind::Deployment => "deployments",
        }
    }

    fn namespaced(self) -> bool {
        !matches!(self, Kind::Namespace | Kind::Node)
    }

    fn from_path(api_version: &str, plural: &str) -> Option<Kind> {
        Kind::ALL
            .into_iter()
            .find(|k| k.api_version() == api_version && k.plural() == plural)
    }
}

/// One request the fake answered.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub query: Vec<(String, String)>,
    pub body: Option<Value>,
}

#[derive(Debug)]
struct Event {
    resource_version: u64,
    kind: Kind,
    namespace: String,
    kind_of_change: &'static str,
    object: Value,
}

#[derive(Debug, Clone)]
enum Broadcast {
    Event(Arc<Event>),
    /// Every watch ends (as when the API server restarts).
    Disconnect,
}

type Key = (Kind, String, String);

struct Store {
    resource_version: u64,
    objects: BTreeMap<Key, Value>,
    history: Vec<Arc<Event>>,
    /// Watches from this version or older are answered 410 Gone.
    compacted: u64,
    requests: Vec<Recorded>,
    logs: BTreeMap<(String, String), String>,
    counter: u64,
    /// Pods deleted with a grace period stay, marked, until `finish_pod_deletion`.
    linger_pod_deletes: bool,
    /// Pods made for a Job or Deployment, by their owner.
    dependents: BTreeMap<Key, Vec<(String, String)>>,
    /// When false, events change the store without reaching the watches or history.
    broadcasting: bool,
    events: broadcast::Sender<Broadcast>,
}

pub struct FakeKube {
    pub addr: SocketAddr,
    store: Arc<Mutex<Store>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeKube {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A request the fake refuses, as the API server's `Status`.
#[derive(Debug)]
struct Refusal {
    code: u16,
    reason: &'static str,
    message: String,
}

impl Refusal {
    fn response(self) -> Response {
        status(self.code, self.reason, self.message)
    }
}

fn status(code: u16, reason: &str, message: String) -> Response {
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code,
    });
    (
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        axum::Json(body),
    )
        .into_response()
}

fn labels_of(object: &Value) -> BTreeMap<String, String> {
    object["metadata"]["labels"]
        .as_object()
        .map(|labels| {
            labels
                .iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                .collect()
        })
        .unwrap_or_default()
}

/// Equality-based label selectors: `a=b`, `a==b`, `a!=b`, `a`, `!a`, comma-separated.
pub fn selector_matches(selector: &str, object: &Value) -> bool {
    let labels = labels_of(object);
    selector
        .split(',')
        .map(str::trim)
        .filter(|term| !term.is_empty())
        .all(|term| {
            if let Some((key, value)) = term.split_once("!=") {
                labels.get(key.trim()).map(String::as_str) != Some(value.trim())
            } else if let Some((key, value)) =
                term.split_once("==").or_else(|| term.split_once('='))
            {
                labels.get(key.trim()).map(String::as_str) == Some(value.trim())
            } else if let Some(key) = term.strip_prefix('!') {
                !labels.contains_key(key.trim())
            } else {
                labels.contains_key(term)
            }
        })
}

fn timestamp(counter: u64) -> String {
    format!(
        "2025-01-01T{:02}:{:02}:{:02}Z",
        (counter / 3600) % 24,
        (counter / 60) % 60,
        counter % 60
    )
}

impl Store {
    fn next_version(&mut self) -> u64 {
        self.resource_version += 1;
        self.resource_version
    }

    fn record(&mut self, kind: Kind, kind_of_change: &'static str, object: &Value) {
        if !self.broadcasting {
            return;
        }
        let event = Arc::new(Event {
            resource_version: self.resource_version,
            kind,
            namespace: object["metadata"]["namespace"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            kind_of_change,
            object: object.clone(),
        });
        self.history.push(event.clone());
        let _ = self.events.send(Broadcast::Event(event));
    }

    fn key(kind: Kind, namespace: &str, name: &str) -> Key {
        let namespace = if kind.namespaced() { namespace } else { "" };
        (kind, namespace.to_string(), name.to_string())
    }

    /// Stores a new object as the API server would: metadata filled, ADDED sent.
    fn insert(&mut self, kind: Kind, namespace: &str, mut object: Value) -> Result<Value, Refusal> {
        let name = object["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        if name.is_empty() {
            return Err(Refusal {
                code: 422,
                reason: "Invalid",
                message: format!("{}: metadata.name: Required value", kind.plural()),
            });
        }
        if kind.namespaced()
            && !self
                .objects
                .contains_key(&Store::key(Kind::Namespace, "", namespace))
        {
            return Err(Refusal {
                code: 404,
                reason: "NotFound",
                message: format!("namespaces \"{namespace}\" not found"),
            });
        }
        let key = Store::key(kind, namespace, &name);
        if self.objects.contains_key(&key) {
            return Err(Refusal {
                code: 409,
                reason: "AlreadyExists",
                message: format!("{} \"{name}\" already exists", kind.plural()),
            });
        }
        self.counter += 1;
        let version = self.next_version();
        object["apiVersion"] = json!(kind.api_version());
        object["kind"] = json!(kind.kind());
        let metadata = &mut object["metadata"];
        if kind.namespaced() {
            metadata["namespace"] = json!(namespace);
        }
        metadata["uid"] = json!(format!("00000000-0000-4000-8000-{:012x}", self.counter));
        metadata["resourceVersion"] = json!(version.to_string());
        metadata["creationTimestamp"] = json!(timestamp(self.counter));
        if matches!(kind, Kind::Job | Kind::Deployment) {
            metadata["generation"] = json!(1);
        }
        if object.get("status").is_none() {
            object["status"] = match kind {
                Kind::Pod => json!({ "phase": "Pending" }),
                Kind::Namespace => json!({ "phase": "Active" }),
                _ => json!({}),
            };
        }
        if kind == Kind::Pod {
            self.schedule(&mut object);
        }
        self.objects.insert(key.clone(), object.clone());
        self.record(kind, "ADDED", &object);
        match kind {
            Kind::Job => self.make_pod_for(&key, &object, "Job", None),
            Kind::Deployment => {
                let hash = format!("{:010x}", self.counter * 7919);
                self.make_pod_for(&key, &object, "ReplicaSet", Some(hash))
            }
            _ => {}
        }
        Ok(object)
    }

    /// The scheduler, for a pod pinned to a node by name: bound when the node exists.
    fn schedule(&self, pod: &mut Value) {
        let node = pod["spec"]["affinity"]["nodeAffinity"]
            ["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"][0]
            ["matchFields"][0]["values"][0]
            .as_str()
            .map(str::to_string);
        let Some(node) = node else {
            return;
        };
        if self
            .objects
            .contains_key(&Store::key(Kind::Node, "", &node))
        {
            pod["spec"]["nodeName"] = json!(node);
            pod["status"]["conditions"] = json!([{ "type": "PodScheduled", "status": "True" }]);
        }
    }

    /// The Job or ReplicaSet controller: one pod from the template.
    fn make_pod_for(
        &mut self,
        owner_key: &Key,
        owner: &Value,
        owner_kind: &str,
        hash: Option<String>,
    ) {
        let name = owner["metadata"]["name"].as_str().unwrap_or_default();
        let namespace = owner_key.1.clone();
        let uid = owner["metadata"]["uid"].clone();
        let suffix = format!("{:05x}", self.counter * 104_729 % 0xfffff);
        let mut labels = owner["spec"]["template"]["metadata"]["labels"].clone();
        if !labels.is_object() {
            labels = json!({});
        }
        let (pod_name, owner_name) = match &hash {
            Some(hash) => {
                labels["pod-template-hash"] = json!(hash);
                (format!("{name}-{hash}-{suffix}"), format!("{name}-{hash}"))
            }
            None => {
                labels["job-name"] = json!(name);
                labels["batch.kubernetes.io/job-name"] = json!(name);
                labels["controller-uid"] = uid.clone();
                labels["batch.kubernetes.io/controller-uid"] = uid.clone();
                (format!("{name}-{suffix}"), name.to_string())
            }
        };
        let api_version = if owner_kind == "Job" {
            "batch/v1"
        } else {
            "apps/v1"
        };
        let pod = json!({
            "metadata": {
                "name": pod_name,
                "labels": labels,
                "ownerReferences": [{
                    "apiVersion": api_version, "kind": owner_kind, "name": owner_name,
                    "uid": uid, "controller": true, "blockOwnerDeletion": true,
                }],
            },
            "spec": owner["spec"]["template"]["spec"].clone(),
        });
        if self.insert(Kind::Pod, &namespace, pod).is_ok() {
            self.dependents
                .entry(owner_key.clone())
                .or_default()
                .push((namespace, pod_name));
        }
    }

    fn modify(&mut self, key: &Key, change: impl FnOnce(&mut Value)) -> Option<Value> {
        let version = self.resource_version + 1;
        let object = self.objects.get_mut(key)?;
        change(object);
        object["metadata"]["resourceVersion"] = json!(version.to_string());
        let object = object.clone();
        self.resource_version = version;
        self.record(key.0, "MODIFIED", &object);
        Some(object)
    }

    fn remove(&mut self, key: &Key) -> Option<Value> {
        let mut object = self.objects.remove(key)?;
        let version = self.next_version();
        object["metadata"]["resourceVersion"] = json!(version.to_string());
        self.record(key.0, "DELETED", &object);
        Some(object)
    }

    /// Deletes as the API server does: a pod with a grace period is marked first (when the
    /// fake is told to keep pods until the kubelet confirms), owners take their pods along
    /// unless orphaning.
    fn delete(
        &mut self,
        key: &Key,
        grace_s: Option<i64>,
        propagation: Option<&str>,
    ) -> Option<Value> {
        if key.0 == Kind::Pod && self.linger_pod_deletes && grace_s != Some(0) {
            let grace = grace_s.unwrap_or(30);
            let already = self.objects.get(key)?["metadata"]["deletionTimestamp"].is_string();
            if already {
                return self.objects.get(key).cloned();
            }
            let at = timestamp(self.counter + 1);
            return self.modify(key, |pod| {
                pod["metadata"]["deletionTimestamp"] = json!(at);
                pod["metadata"]["deletionGracePeriodSeconds"] = json!(grace);
            });
        }
        let object = self.remove(key)?;
        let default_propagation = if key.0 == Kind::Job {
            "Orphan"
        } else {
            "Background"
        };
        if propagation.unwrap_or(default_propagation) != "Orphan" {
            for (namespace, name) in self.dependents.remove(key).unwrap_or_default() {
                // The garbage collector deletes dependents with their own grace.
                self.delete(&Store::key(Kind::Pod, &namespace, &name), None, None);
            }
        }
        Some(object)
    }

    fn list(&self, kind: Kind, namespace: Option<&str>, selector: &str) -> Vec<Value> {
        self.objects
            .iter()
            .filter(|((k, ns, _), object)| {
                *k == kind
                    && namespace.is_none_or(|wanted| wanted == ns)
                    && selector_matches(selector, object)
            })
            .map(|(_, object)| object.clone())
            .collect()
    }
}

/// What a request addresses.
struct Target {
    kind: Kind,
    namespace: Option<String>,
    name: Option<String>,
    subresource: Option<String>,
}

fn parse_path(path: &str) -> Option<Target> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (api_version, rest) = match segments.as_slice() {
        ["api", "v1", rest @ ..] => ("v1".to_string(), rest),
        ["apis", group, version, rest @ ..] => (format!("{group}/{version}"), rest),
        _ => return None,
    };
    let target = |kind, namespace: Option<&str>, name: Option<&str>, sub: Option<&str>| Target {
        kind,
        namespace: namespace.map(str::to_string),
        name: name.map(str::to_string),
        subresource: sub.map(str::to_string),
    };
    match rest {
        ["namespaces"] => Some(target(Kind::Namespace, None, None, None)),
        ["namespaces", name] => Some(target(Kind::Namespace, None, Some(name), None)),
        ["namespaces", namespace, plural, more @ ..] => {
            let kind = Kind::from_path(&api_version, plural)?;
            match more {
                [] => Some(target(kind, Some(namespace), None, None)),
                [name] => Some(target(kind, Some(namespace), Some(name), None)),
                [name, sub] => Some(target(kind, Some(namespace), Some(name), Some(sub))),
                _ => None,
            }
        }
        [plural, more @ ..] => {
            let kind = Kind::from_path(&api_version, plural)?;
            match more {
                [] => Some(target(kind, None, None, None)),
                [name] => Some(target(kind, None, Some(name), None)),
                [name, sub] => Some(target(kind, None, Some(name), Some(sub))),
                _ => None,
            }
        }
        _ => None,
    }
}

fn query_value<'q>(query: &'q [(String, String)], key: &str) -> Option<&'q str> {
    query
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

async fn handle(
    State(store): State<Arc<Mutex<Store>>>,
    method: Method,
    uri: Uri,
    Query(query): Query<Vec<(String, String)>>,
    body: Bytes,
) -> Response {
    let body_json: Option<Value> = serde_json::from_slice(&body).ok();
    let path = uri.path().to_string();
    store.lock().unwrap().requests.push(Recorded {
        method: method.to_string(),
        path: path.clone(),
        query: query.clone(),
        body: body_json.clone(),
    });
    if path == "/version" {
        return axum::Json(json!({
            "major": "1", "minor": "33", "gitVersion": "v1.33.0-fake", "gitCommit": "fake",
            "gitTreeState": "clean", "buildDate": "2025-01-01T00:00:00Z", "goVersion": "go1.24",
            "compiler": "gc", "platform": "linux/amd64",
        }))
        .into_response();
    }
    let Some(target) = parse_path(&path) else {
        return status(
            404,
            "NotFound",
            format!("the server could not find the requested resource {path}"),
        );
    };
    let namespace = target.namespace.clone().unwrap_or_default();
    let selector = query_value(&query, "labelSelector")
        .unwrap_or_default()
        .to_string();
    match (&method, &target.name) {
        (&Method::GET, None) if query_value(&query, "watch") == Some("true") => {
            watch(&store, &target, &query, &selector)
        }
        (&Method::GET, None) => {
            let store = store.lock().unwrap();
            let items = store.list(target.kind, target.namespace.as_deref(), &selector);
            axum::Json(json!({
                "apiVersion": target.kind.api_version(),
                "kind": format!("{}List", target.kind.kind()),
                "metadata": { "resourceVersion": store.resource_version.to_string() },
                "items": items,
            }))
            .into_response()
        }
        (&Method::GET, Some(name)) => {
            let store = store.lock().unwrap();
            let key = Store::key(target.kind, &namespace, name);
            let Some(object) = store.objects.get(&key) else {
                return status(
                    404,
                    "NotFound",
                    format!("{} \"{name}\" not found", target.kind.plural()),
                );
            };
            if target.subresource.as_deref() == Some("log") {
                return log(&store, object, &namespace, name, &query);
            }
            axum::Json(object.clone()).into_response()
        }
        (&Method::POST, None) => {
            let Some(object) = body_json else {
                return status(400, "BadRequest", "the body is not JSON".into());
            };
            let mut store = store.lock().unwrap();
            match store.insert(target.kind, &namespace, object) {
                Ok(created) => (StatusCode::CREATED, axum::Json(created)).into_response(),
                Err(refusal) => refusal.response(),
            }
        }
        (&Method::DELETE, name) => {
            let options = body_json.unwrap_or(Value::Null);
            let grace = options["gracePeriodSeconds"]
                .as_i64()
                .or_else(|| query_value(&query, "gracePeriodSeconds").and_then(|g| g.parse().ok()));
            let propagation = options["propagationPolicy"].as_str().map(str::to_string);
            let mut store = store.lock().unwrap();
            match name {
                Some(name) => {
                    let key = Store::key(target.kind, &namespace, name);
                    match store.delete(&key, grace, propagation.as_deref()) {
                        Some(object) => axum::Json(object).into_response(),
                        None => status(
                            404,
                            "NotFound",
                            format!("{} \"{name}\" not found", target.kind.plural()),
                        ),
                    }
                }
                None => {
                    let matching = store.list(target.kind, target.namespace.as_deref(), &selector);
                    let mut deleted = Vec::new();
                    for object in matching {
                        let name = object["metadata"]["name"]
                            .as_str()
                            .unwrap_or_default()
                            .to_string();
                        let key = Store::key(target.kind, &namespace, &name);
                        deleted.extend(store.delete(&key, grace, propagation.as_deref()));
                    }
                    axum::Json(json!({
                        "apiVersion": target.kind.api_version(),
                        "kind": format!("{}List", target.kind.kind()),
                        "metadata": { "resourceVersion": store.resource_version.to_string() },
                        "items": deleted,
                    }))
                    .into_response()
                }
            }
        }
        _ => status(
            405,
            "MethodNotAllowed",
            format!("{method} {path} is not supported by the fake"),
        ),
    }
}

fn log(
    store: &Store,
    pod: &Value,
    namespace: &str,
    name: &str,
    query: &[(String, String)],
) -> Response {
    let started = pod["status"]["containerStatuses"][0]["state"]
        .as_object()
        .is_some_and(|state| state.contains_key("running") || state.contains_key("terminated"));
    let Some(text) = store.logs.get(&(namespace.to_string(), name.to_string())) else {
        if !started {
            return status(
                400,
                "BadRequest",
                format!(
                    "container \"main\" in pod \"{name}\" is waiting to start: ContainerCreating"
                ),
            );
        }
        return String::new().into_response();
    };
    let mut lines: Vec<&str> = text.split_inclusive('\n').collect();
    if let Some(tail) = query_value(query, "tailLines").and_then(|t| t.parse::<usize>().ok()) {
        lines = lines.split_off(lines.len().saturating_sub(tail));
    }
    let mut out = lines.concat().into_bytes();
    if let Some(limit) = query_value(query, "limitBytes").and_then(|l| l.parse::<usize>().ok()) {
        out.truncate(limit);
    }
    out.into_response()
}

fn watch(
    store: &Arc<Mutex<Store>>,
    target: &Target,
    query: &[(String, String)],
    selector: &str,
) -> Response {
    let from = query_value(query, "resourceVersion")
        .unwrap_or_default()
        .to_string();
    let kind = target.kind;
    let namespace = target.namespace.clone();
    let selector = selector.to_string();
    let wanted = move |event_kind: Kind, event_namespace: &str, object: &Value| {
        event_kind == kind
            && namespace.as_deref().is_none_or(|ns| ns == event_namespace)
            && selector_matches(&selector, object)
    };
    let line = |kind_of_change: &str, object: &Value| {
        let mut line =
            serde_json::to_vec(&json!({ "type": kind_of_change, "object": object })).unwrap();
        line.push(b'\n');
        Bytes::from(line)
    };
    let (backlog, receiver) = {
        let store = store.lock().unwrap();
        let receiver = store.events.subscribe();
        let backlog: Vec<Bytes> = match from.parse::<u64>() {
            Ok(version) if version != 0 && version <= store.compacted => {
                let gone = json!({
                    "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                    "message": format!("too old resource version: {version} ({})", store.compacted + 1),
                    "reason": "Expired", "code": 410,
                });
                let body = line("ERROR", &gone);
                return Response::new(Body::from(body));
            }
            Ok(version) if version != 0 => store
                .history
                .iter()
                .filter(|e| e.resource_version > version && wanted(e.kind, &e.namespace, &e.object))
                .map(|e| line(e.kind_of_change, &e.object))
                .collect(),
            // No version, or 0: the current objects as ADDED, then what changes.
            _ => store
                .objects
                .iter()
                .filter(|((k, ns, _), object)| wanted(*k, ns, object))
                .map(|(_, object)| line("ADDED", object))
                .collect(),
        };
        (backlog, receiver)
    };
    let live = futures::stream::unfold(receiver, move |mut receiver| {
        let wanted = wanted.clone();
        async move {
            loop {
                match receiver.recv().await {
                    Ok(Broadcast::Event(event)) => {
                        if wanted(event.kind, &event.namespace, &event.object) {
                            let body = line(event.kind_of_change, &event.object);
                            return Some((body, receiver));
                        }
                    }
                    Ok(Broadcast::Disconnect) | Err(_) => return None,
                }
            }
        }
    });
    let stream = futures::StreamExt::map(
        futures::StreamExt::chain(futures::stream::iter(backlog), live),
        Ok::<Bytes, std::convert::Infallible>,
    );
    Response::builder()
        .header("content-type", "application/json")
        .body(Body::from_stream(stream))
        .unwrap()
}

impl FakeKube {
    /// Serves on a loopback port, with the namespaces `default` and `kube-system`.
    pub async fn start() -> Self {
        let (events, _) = broadcast::channel(16_384);
        let store = Arc::new(Mutex::new(Store {
            resource_version: 0,
            objects: BTreeMap::new(),
            history: Vec::new(),
            compacted: 0,
            requests: Vec::new(),
            logs: BTreeMap::new(),
            counter: 0,
            linger_pod_deletes: false,
            dependents: BTreeMap::new(),
            broadcasting: true,
            events,
        }));
        {
            let mut store = store.lock().unwrap();
            for namespace in ["default", "kube-system"] {
                store
                    .insert(
                        Kind::Namespace,
                        "",
                        json!({ "metadata": { "name": namespace } }),
                    )
                    .unwrap();
            }
        }
        let router = axum::Router::new()
            .fallback(handle)
            .with_state(store.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        Self { addr, store, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A client as the runtime would build one.
    pub fn client(&self) -> kube::Client {
        let config = kube::Config::new(self.url().parse().unwrap());
        kube::Client::try_from(config).unwrap()
    }

    /// A kubeconfig naming this server, for `KUBECONFIG`.
    pub fn write_kubeconfig(&self, path: &Path) {
        let kubeconfig = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\nusers:\n- name: fake\n  user: {{}}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\ncurrent-context: fake\n",
            self.url()
        );
        std::fs::write(path, kubeconfig).unwrap();
    }

    // --- the test's view ---

    pub fn requests(&self) -> Vec<Recorded> {
        self.store.lock().unwrap().requests.clone()
    }

    /// Bodies of the objects created through the API, in order (namespaces left out).
    pub fn created(&self) -> Vec<Value> {
        self.requests()
            .into_iter()
            .filter(|r| r.method == "POST" && !r.path.ends_with("/namespaces"))
            .filter_map(|r| r.body)
            .collect()
    }

    pub fn get(&self, kind: Kind, namespace: &str, name: &str) -> Option<Value> {
        let store = self.store.lock().unwrap();
        store
            .objects
            .get(&Store::key(kind, namespace, name))
            .cloned()
    }

    pub fn list(&self, kind: Kind, namespace: Option<&str>, selector: &str) -> Vec<Value> {
        self.store.lock().unwrap().list(kind, namespace, selector)
    }

    /// Names of the objects of `kind` matching `selector` in `namespace`.
    pub fn names(&self, kind: Kind, namespace: &str, selector: &str) -> Vec<String> {
        self.list(kind, Some(namespace), selector)
            .iter()
            .map(|o| {
                o["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string()
            })
            .collect()
    }

    // --- the test as the cluster ---

    pub fn create(&self, kind: Kind, namespace: &str, object: Value) -> Value {
        self.store
            .lock()
            .unwrap()
            .insert(kind, namespace, object)
            .unwrap_or_else(|_| panic!("create a {kind:?}"))
    }

    pub fn add_node(&self, node: Value) {
        self.create(Kind::Node, "", node);
    }

    /// Changes an object and sends MODIFIED; false when there is no such object.
    pub fn update(
        &self,
        kind: Kind,
        namespace: &str,
        name: &str,
        change: impl FnOnce(&mut Value),
    ) -> bool {
        let mut store = self.store.lock().unwrap();
        store
            .modify(&Store::key(kind, namespace, name), change)
            .is_some()
    }

    /// Removes an object at once and sends DELETED (a node leaving, a pod removed by hand).
    pub fn remove(&self, kind: Kind, namespace: &str, name: &str) -> bool {
        let mut store = self.store.lock().unwrap();
        store.remove(&Store::key(kind, namespace, name)).is_some()
    }

    /// Pods deleted with a grace period stay, marked, until [`finish_pod_deletion`].
    pub fn linger_pod_deletes(&self, linger: bool) {
        self.store.lock().unwrap().linger_pod_deletes = linger;
    }

    /// The kubelet confirms a pod's deletion.
    pub fn finish_pod_deletion(&self, namespace: &str, name: &str) -> bool {
        self.remove(Kind::Pod, namespace, name)
    }

    pub fn set_log(&self, namespace: &str, pod: &str, text: &str) {
        let mut store = self.store.lock().unwrap();
        store
            .logs
            .insert((namespace.to_string(), pod.to_string()), text.to_string());
    }

    /// Changes made by `change` reach no watch; history up to now is compacted and every watch
    /// is ended, so clients must list again (as after an API server restart or a long outage).
    pub fn behind_the_watches(&self, change: impl FnOnce(&FakeKube)) {
        self.store.lock().unwrap().broadcasting = false;
        change(self);
        let mut store = self.store.lock().unwrap();
        store.broadcasting = true;
        store.compacted = store.resource_version;
        // The next list names a version newer than the compacted ones.
        store.resource_version += 1;
        let _ = store.events.send(Broadcast::Disconnect);
    }

    // --- the test as the kubelet ---

    fn pod_status(&self, namespace: &str, name: &str, status: Value) {
        assert!(
            self.update(Kind::Pod, namespace, name, |pod| pod["status"] = status),
            "no pod {namespace}/{name}"
        );
    }

    /// The container runs; `ready` is the Ready condition.
    pub fn run_pod(&self, namespace: &str, name: &str, image_id: &str, ready: bool) {
        let image = self.pod_image(namespace, name);
        self.pod_status(
            namespace,
            name,
            json!({
                "phase": "Running",
                "conditions": [
                    { "type": "PodScheduled", "status": "True" },
                    { "type": "Ready", "status": if ready { "True" } else { "False" } },
                ],
                "containerStatuses": [{
                    "name": "main", "image": image, "imageID": image_id, "ready": ready,
                    "restartCount": 0, "state": { "running": { "startedAt": "2025-01-01T00:00:00Z" } },
                }],
            }),
        );
    }

    /// The container exited with `exit_code` (`reason` as the kubelet names it).
    pub fn end_pod(&self, namespace: &str, name: &str, exit_code: i32, reason: &str) {
        let image = self.pod_image(namespace, name);
        let phase = if exit_code == 0 {
            "Succeeded"
        } else {
            "Failed"
        };
        self.pod_status(
            namespace,
            name,
            json!({
                "phase": phase,
                "conditions": [{ "type": "Ready", "status": "False", "reason": "PodCompleted" }],
                "containerStatuses": [{
                    "name": "main", "image": image, "imageID": format!("{image}@sha256:fake"), "ready": false,
                    "restartCount": 0,
                    "state": { "terminated": { "exitCode": exit_code, "reason": reason } },
                }],
            }),
        );
    }

    pub fn oom_kill_pod(&self, namespace: &str, name: &str) {
        self.end_pod(namespace, name, 137, "OOMKilled");
    }

    pub fn evict_pod(&self, namespace: &str, name: &str, message: &str) {
        self.pod_status(
            namespace,
            name,
            json!({ "phase": "Failed", "reason": "Evicted", "message": message }),
        );
    }

    /// The container cannot start: `reason` such as ErrImagePull or ErrImageNeverPull.
    pub fn image_fails(&self, namespace: &str, name: &str, reason: &str, message: &str) {
        let image = self.pod_image(namespace, name);
        self.pod_status(
            namespace,
            name,
            json!({
                "phase": "Pending",
                "containerStatuses": [{
                    "name": "main", "image": image, "imageID": "", "ready": false, "restartCount": 0,
                    "state": { "waiting": { "reason": reason, "message": message } },
                }],
            }),
        );
    }

    /// The scheduler cannot place the pod (it is unbound again).
    pub fn unschedulable_pod(&self, namespace: &str, name: &str, message: &str) {
        assert!(self.update(Kind::Pod, namespace, name, |pod| {
            if let Some(spec) = pod["spec"].as_object_mut() {
                spec.remove("nodeName");
            }
            pod["status"] = json!({
                "phase": "Pending",
                "conditions": [{ "type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": message }],
            });
        }));
    }

    fn pod_image(&self, namespace: &str, name: &str) -> String {
        self.get(Kind::Pod, namespace, name)
            .and_then(|pod| {
                pod["spec"]["containers"][0]["image"]
                    .as_str()
                    .map(str::to_string)
            })
            .unwrap_or_default()
    }
}

/// A Ready node with `cpu`, `memory` and `gpus` allocatable and these labels.
pub fn node(name: &str, cpu: &str, memory: &str, gpus: u32, labels: Value) -> Value {
    let mut allocatable =
        json!({ "cpu": cpu, "memory": memory, "ephemeral-storage": "100Gi", "pods": "110" });
    if gpus > 0 {
        allocatable["nvidia.com/gpu"] = json!(gpus.to_string());
    }
    let mut all_labels = json!({
        "kubernetes.io/hostname": name, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64",
    });
    if let (Some(all), Some(extra)) = (all_labels.as_object_mut(), labels.as_object()) {
        all.extend(extra.clone());
    }
    json!({
        "metadata": { "name": name, "labels": all_labels },
        "spec": {},
        "status": {
            "capacity": allocatable,
            "allocatable": allocatable,
            "conditions": [{ "type": "Ready", "status": "True", "reason": "KubeletReady" }],
            "addresses": [{ "type": "Hostname", "address": name }],
            "nodeInfo": {
                "operatingSystem": "linux", "architecture": "amd64", "kubeletVersion": "v1.33.0",
                "osImage": "Fake Linux", "containerRuntimeVersion": "containerd://2.0.0",
                "kernelVersion": "6.8.0", "kubeProxyVersion": "v1.33.0", "machineID": name,
                "systemUUID": name, "bootID": name,
            },
        },
    })
}
