//! The HTTP API (axum): deny by default, a bearer token on everything but `/healthz`, the
//! OpenAPI document, the dashboard's static page (`/ui`, see [`ui`]) and the serving gateway
//! (`/serve/...`, see [`gateway`]). Writes go through Raft on the leader (a follower forwards them
//! there); reads are linearizable through ReadIndex unless `?stale=true`; job logs are read from
//! the agents by the leader ([`logs`]).

pub mod gateway;
pub mod logs;
pub mod openapi;
pub mod types;
pub mod ui;

use crate::core::serving::ServingRoutes;
use crate::core::state::Outcome;
use crate::data_dir::ClusterFiles;
use crate::server::{Answer, Event, Handle, Query, Unavailable};
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, delete, get, post};
use axum::{Json, Router};
use gantry_protocol::jobspec::{self, JobSpec};
use gantry_protocol::replicated::Op;
use gantry_protocol::token::JoinToken;
use gantry_protocol::Role;
use ring::digest::{digest, SHA256};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{oneshot, watch};
use types::*;

/// Request bodies larger than this are refused with 413.
pub const REQUEST_BODY_BYTES_MAX: usize = 1024 * 1024;
/// Join tokens live at most this long.
pub const TOKEN_TTL_SECONDS_MAX: u64 = 30 * 24 * 3600;
const TOKEN_TTL_SECONDS_DEFAULT: u64 = 3600;
/// Idempotency keys are at most this long.
pub const IDEMPOTENCY_KEY_BYTES_MAX: usize = 128;
/// Marks a request a follower forwarded, so that it is forwarded at most once.
const FORWARDED_HEADER: &str = "x-gantry-forwarded";

pub struct ApiState {
    pub handle: Handle,
    pub admin_token_sha256: Vec<u8>,
    pub cluster_key: Vec<u8>,
    pub ca_sha256_hex: String,
    http: reqwest::Client,
    artifacts: crate::artifacts::ArtifactStore,
    /// For answers that stream (log streams relayed from the leader, the gateway): no overall
    /// timeout, no redirects followed.
    stream_http: reqwest::Client,
    /// For the gateway: as `stream_http`, and a new connection per request (as nginx does by
    /// default), so that no request goes out on a kept connection to a replica that has died.
    gateway_http: reqwest::Client,
    /// The serving routes of this coordinator's applied state.
    routes: watch::Receiver<Arc<ServingRoutes>>,
    /// The gateway's round-robin position per serving job.
    gateway_cursors: Mutex<BTreeMap<String, u64>>,
    gateway_requests: Arc<tokio::sync::Semaphore>,
    /// Bytes of request bodies the gateway may hold at once.
    gateway_buffered: Arc<tokio::sync::Semaphore>,
    log_streams: Arc<tokio::sync::Semaphore>,
}

impl ApiState {
    pub fn new(
        files: &ClusterFiles,
        handle: Handle,
        artifacts: crate::artifacts::ArtifactStore,
        routes: watch::Receiver<Arc<ServingRoutes>>,
    ) -> Self {
        Self {
            artifacts,
            handle,
            admin_token_sha256: digest(&SHA256, files.admin_token.as_bytes())
                .as_ref()
                .to_vec(),
            cluster_key: files.cluster_key.clone(),
            ca_sha256_hex: files.ca.sha256_hex(),
            http: reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(2))
                .timeout(Duration::from_secs(15))
                .build()
                .expect("an HTTP client with default TLS builds"),
            stream_http: reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(2))
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .expect("an HTTP client with default TLS builds"),
            gateway_http: reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(2))
                .redirect(reqwest::redirect::Policy::none())
                .pool_max_idle_per_host(0)
                .build()
                .expect("an HTTP client with default TLS builds"),
            routes,
            gateway_cursors: Mutex::new(BTreeMap::new()),
            gateway_requests: Arc::new(tokio::sync::Semaphore::new(gateway::GATEWAY_REQUESTS_MAX)),
            gateway_buffered: Arc::new(tokio::sync::Semaphore::new(
                gateway::GATEWAY_BUFFERED_BYTES_MAX,
            )),
            log_streams: Arc::new(tokio::sync::Semaphore::new(logs::LOG_STREAMS_MAX)),
        }
    }
}

#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    detail: ErrorDetail,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &str, message: impl Into<String>) -> Self {
        Self {
            status,
            detail: ErrorDetail {
                code: code.into(),
                message: message.into(),
                field: None,
            },
        }
    }

    pub fn invalid_field(field: &str, message: impl Into<String>) -> Self {
        let mut error = Self::new(StatusCode::BAD_REQUEST, "invalid_request", message);
        error.detail.field = Some(field.into());
        error
    }

    pub(crate) fn no_job(job_id: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no job {job_id}"),
        )
    }

    /// The state machine answered a write with an outcome this endpoint never expects: a bug.
    fn unexpected(outcome: &Outcome) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("unexpected outcome {outcome:?}"),
        )
    }

    pub(crate) fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(ErrorBody { error: self.detail })).into_response()
    }
}

impl From<Unavailable> for ApiError {
    fn from(reason: Unavailable) -> Self {
        match reason {
            Unavailable::NotLeader { leader: None } => ApiError::unavailable(
                "no coordinator leads right now: an election is in progress or a majority of the members is unreachable; retry",
            ),
            Unavailable::NotLeader { leader: Some(leader) } => {
                ApiError::unavailable(format!("the leader at {} did not take the request; retry", leader.http_addr))
            }
            Unavailable::Timeout => ApiError::unavailable(
                "not committed in time; the outcome is unknown: retry with the same Idempotency-Key",
            ),
            Unavailable::Overloaded => ApiError::unavailable("too many requests waiting for commit; retry later"),
            Unavailable::ShuttingDown => ApiError::unavailable("the coordinator is shutting down"),
            Unavailable::MembershipChanging => ApiError::unavailable(
                "another membership change is still in progress; retry once it completes",
            ),
        }
    }
}

pub fn router(state: Arc<ApiState>) -> Router {
    let protected = Router::new()
        .route("/v1/agents", get(list_agents))
        .route("/v1/nodes", get(list_nodes))
        .route("/v1/tokens", post(create_token))
        .route("/v1/jobs", post(submit_job).get(list_jobs))
        .route(
            "/v1/jobs/{id}",
            get(get_job).delete(cancel_job).put(update_job),
        )
        .route("/v1/jobs/{id}/explain", get(explain_job))
        .route("/v1/jobs/{id}/artifacts/{name}", get(get_job_artifact))
        .route("/v1/artifacts/{sha256}", get(get_artifact))
        .route("/v1/policy", get(get_policy).put(set_policy))
        .route("/v1/jobs/{id}/logs", get(logs::job_logs))
        .route("/v1/endpoints", get(list_endpoints))
        .route("/v1/quotas", get(list_quotas))
        .route("/v1/quotas/{team}", axum::routing::put(set_quota))
        .route("/v1/cluster", get(cluster_status))
        .route("/v1/cluster/members/{id}", delete(remove_member))
        .route("/v1/usage", get(ui::usage_report))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .route("/healthz", get(healthz))
        .route("/v1/openapi.json", get(openapi::document))
        .route("/serve/{name}", any(gateway::serve))
        .route("/serve/{name}/", any(gateway::serve))
        .route("/serve/{name}/{*rest}", any(gateway::serve))
        .merge(ui::routes())
        .merge(protected)
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(REQUEST_BODY_BYTES_MAX))
        .with_state(state)
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
}

async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok" }))
}

async fn require_token(
    State(state): State<Arc<ApiState>>,
    request: Request,
    next: Next,
) -> Response {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "));
    let Some(presented) = presented else {
        return ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing bearer token: send 'Authorization: Bearer TOKEN' (the admin token is in the coordinator's DATA_DIR/admin.token)",
        )
        .into_response();
    };
    // Comparing digests keeps the comparison's timing independent of the secret.
    if digest(&SHA256, presented.trim().as_bytes()).as_ref() != state.admin_token_sha256.as_slice()
    {
        return ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "bearer token is not valid for this cluster",
        )
        .into_response();
    }
    next.run(request).await
}

async fn ask<T>(
    state: &ApiState,
    make: impl FnOnce(oneshot::Sender<Result<T, Unavailable>>) -> Event,
) -> Result<T, Unavailable> {
    let (reply, answer) = oneshot::channel();
    state
        .handle
        .send(make(reply))
        .await
        .map_err(|_| Unavailable::ShuttingDown)?;
    answer.await.map_err(|_| Unavailable::ShuttingDown)?
}

#[derive(Debug, serde::Deserialize)]
struct ReadParams {
    #[serde(default)]
    stale: bool,
}

async fn read(state: &ApiState, query: Query, params: &ReadParams) -> Result<Answer, ApiError> {
    Ok(ask(state, |reply| Event::Read {
        query,
        stale: params.stale,
        reply,
    })
    .await?)
}

/// Sends a write to the leader when this node does not lead, once.
async fn forward(
    state: &ApiState,
    leader_http: &str,
    method: Method,
    path: &str,
    headers: &HeaderMap,
    body: Bytes,
) -> Response {
    if headers.contains_key(FORWARDED_HEADER) {
        return ApiError::unavailable("leadership is changing; retry").into_response();
    }
    let mut request = state
        .http
        .request(method, format!("http://{leader_http}{path}"))
        .header(FORWARDED_HEADER, "1")
        .body(body);
    for name in [header::AUTHORIZATION, header::CONTENT_TYPE] {
        if let Some(value) = headers.get(&name) {
            request = request.header(name, value);
        }
    }
    if let Some(value) = headers.get("idempotency-key") {
        request = request.header("idempotency-key", value);
    }
    match request.send().await {
        Ok(response) => {
            let status =
                StatusCode::from_u16(response.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
            match response.bytes().await {
                Ok(bytes) => {
                    (status, [(header::CONTENT_TYPE, "application/json")], bytes).into_response()
                }
                Err(e) => ApiError::unavailable(format!("the leader's answer broke off: {e}"))
                    .into_response(),
            }
        }
        Err(e) => ApiError::unavailable(format!(
            "could not reach the leader at {leader_http}: {e}; retry"
        ))
        .into_response(),
    }
}

/// Sends a request to the leader when this node does not lead, once, and relays the answer as
/// it comes (a log stream).
async fn forward_stream<G: Send + 'static>(
    state: &ApiState,
    leader_http: &str,
    method: Method,
    path: &str,
    headers: &HeaderMap,
    guard: G,
) -> Response {
    if headers.contains_key(FORWARDED_HEADER) {
        return ApiError::unavailable("leadership is changing; retry").into_response();
    }
    let mut request = state
        .stream_http
        .request(method, format!("http://{leader_http}{path}"))
        .header(FORWARDED_HEADER, "1");
    if let Some(value) = headers.get(header::AUTHORIZATION) {
        request = request.header(header::AUTHORIZATION, value);
    }
    let answer = match tokio::time::timeout(REQUEST_TIMEOUT_FORWARDED, request.send()).await {
        Ok(Ok(answer)) => answer,
        Ok(Err(e)) => {
            return ApiError::unavailable(format!(
                "could not reach the leader at {leader_http}: {e}; retry"
            ))
            .into_response()
        }
        Err(_) => {
            return ApiError::unavailable(format!(
                "the leader at {leader_http} did not answer in time; retry"
            ))
            .into_response()
        }
    };
    let status = StatusCode::from_u16(answer.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    let mut response_headers = HeaderMap::new();
    for (name, value) in answer.headers() {
        if name == header::CONTENT_TYPE || name.as_str().starts_with("x-gantry-") {
            response_headers.insert(name.clone(), value.clone());
        }
    }
    (status, response_headers, gateway::relay(answer, guard)).into_response()
}

/// How long a forwarded request waits for the leader's answer to begin.
const REQUEST_TIMEOUT_FORWARDED: Duration = Duration::from_secs(15);

/// Proposes `op`; on a follower, forwards the request that asked for it to the leader.
async fn write(
    state: &ApiState,
    op: Op,
    forward_as: (Method, &str, &HeaderMap, Bytes),
    respond: impl FnOnce(Outcome) -> Response,
) -> Response {
    match ask(state, |reply| Event::Propose {
        actor: "admin".into(),
        op,
        reply,
    })
    .await
    {
        Ok(outcome) => respond(outcome),
        Err(Unavailable::NotLeader {
            leader: Some(leader),
        }) => {
            let (method, path, headers, body) = forward_as;
            forward(state, &leader.http_addr, method, path, headers, body).await
        }
        Err(reason) => ApiError::from(reason).into_response(),
    }
}

fn job_view((job, allocations): &crate::server::JobWithAllocations) -> JobView {
    let spec: serde_json::Value =
        serde_json::from_str(&job.spec_json).unwrap_or(serde_json::Value::Null);
    let text = |key: &str| {
        spec.get(key)
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_string()
    };
    let total = serde_json::from_str::<JobSpec>(&job.spec_json)
        .map(|s| s.units())
        .unwrap_or(0);
    let allocations = allocations
        .iter()
        .map(|a| {
            let (exit_code, reason) = match &a.phase {
                gantry_protocol::AllocationPhase::Failed { exit_code, reason } => {
                    (*exit_code, Some(reason.clone()))
                }
                gantry_protocol::AllocationPhase::Lost { reason } => (None, Some(reason.clone())),
                gantry_protocol::AllocationPhase::Succeeded => (Some(0), None),
                _ => (None, None),
            };
            AllocationView {
                id: a.id.clone(),
                unit: a.unit,
                attempt: a.attempt,
                agent: a.agent_id.clone(),
                node: a.node.clone(),
                state: a.state_name().into(),
                exit_code,
                reason,
                gpus: a.gpus.clone(),
                port: a.port,
                restarts: job
                    .retries
                    .get(&a.unit)
                    .copied()
                    .unwrap_or(0)
                    .max(job.restarts),
                stop_requested: a.stop_requested,
                generation: a.generation,
                image: a.image.clone(),
                started_at_unix_ms: a.started_at_unix_ms,
                ended_at_unix_ms: a.ended_at_unix_ms,
            }
        })
        .collect();
    JobView {
        id: job.id.clone(),
        name: text("name"),
        team: text("team"),
        kind: text("kind"),
        state: job.state.as_str().into(),
        submitted_by: job.submitted_by.clone(),
        submitted_at_unix_ms: job.submitted_at_unix_ms,
        updated_at_unix_ms: job.updated_at_unix_ms,
        idempotency_key: job.idempotency_key.clone(),
        progress: Progress {
            succeeded: job.succeeded_units.len() as u32,
            total,
        },
        restarts: job.restarts,
        generation: job.generation,
        failure: job.failure.clone(),
        allocations,
        spec,
        inputs: job
            .inputs
            .iter()
            .map(|i| InputView {
                name: i.name.clone(),
                job: i.job_id.clone(),
                sha256: i.sha256.clone(),
                size_bytes: i.size_bytes,
            })
            .collect(),
        artifacts: job
            .artifacts
            .values()
            .map(|a| ArtifactView {
                name: a.name.clone(),
                sha256: a.sha256.clone(),
                size_bytes: a.size_bytes,
            })
            .collect(),
    }
}

async fn get_policy(
    State(state): State<Arc<ApiState>>,
    axum::extract::Query(params): axum::extract::Query<ReadParams>,
) -> Result<Json<PolicyView>, ApiError> {
    match read(&state, Query::Policy, &params).await? {
        Answer::Policy(policy) => Ok(Json(PolicyView {
            require_digest: policy.require_digest,
        })),
        _ => unreachable!("a policy query answers the policy"),
    }
}

async fn set_policy(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let request: PolicyView = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(e) => {
            return ApiError::invalid_field(
                "require_digest",
                format!("expected {{\"require_digest\": true|false}}: {e}"),
            )
            .into_response()
        }
    };
    let op = Op::SetPolicy(gantry_protocol::replicated::Policy {
        require_digest: request.require_digest,
    });
    write(
        &state,
        op,
        (Method::PUT, "/v1/policy", &headers, body),
        |outcome| match outcome {
            Outcome::PolicySet => Json(request).into_response(),
            other => ApiError::unexpected(&other).into_response(),
        },
    )
    .await
}

/// An artifact's bytes from this member's store (members copy from one another with this).
async fn get_artifact(State(state): State<Arc<ApiState>>, Path(sha256): Path<String>) -> Response {
    match state.artifacts.get(&sha256) {
        Ok(Some(data)) => {
            ([(header::CONTENT_TYPE, "application/octet-stream")], data).into_response()
        }
        Ok(None) => ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("this member holds no artifact {sha256}"),
        )
        .into_response(),
        Err(e) => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e).into_response(),
    }
}

/// A job's artifact by name: from this member's store, else copied from another member.
async fn get_job_artifact(
    State(state): State<Arc<ApiState>>,
    Path((id, name)): Path<(String, String)>,
    headers: HeaderMap,
    axum::extract::Query(params): axum::extract::Query<ReadParams>,
) -> Result<Response, ApiError> {
    let job = match read(&state, Query::Job(id.clone()), &params).await? {
        Answer::Job(Some((job, _))) => job,
        Answer::Job(None) => return Err(ApiError::no_job(&id)),
        _ => unreachable!("a job query answers a job"),
    };
    let Some(artifact) = job.artifacts.get(&name) else {
        let held: Vec<&String> = job.artifacts.keys().collect();
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("job {id} has no artifact {name:?}; it has {held:?}"),
        ));
    };
    let data = match state
        .artifacts
        .get(&artifact.sha256)
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e))?
    {
        Some(data) => data,
        None => {
            let members = match read(&state, Query::Cluster, &params).await? {
                Answer::Cluster(cluster) => cluster
                    .members
                    .into_iter()
                    .filter(|m| m.id != cluster.node)
                    .map(|m| m.http_addr)
                    .collect::<Vec<_>>(),
                _ => unreachable!("a cluster query answers the cluster"),
            };
            let token = headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .unwrap_or_default()
                .to_string();
            state
                .artifacts
                .fetch(&artifact.sha256, &members, &token)
                .await
                .map_err(ApiError::unavailable)?
        }
    };
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], data).into_response())
}

/// `j-`, this node's clock in milliseconds (12 hex digits), then 64 random bits (16 hex digits).
///
/// Ids sort by submission time, give or take the clocks of the nodes, so a new job's key lands
/// at the right edge of the state's ordered maps, a path that stays in cache. With wholly random
/// ids, each of the forty or so key comparisons of a lookup among a few hundred thousand jobs
/// missed the cache: at 512 clients, `memcmp` under `State::apply` took nearly half of a
/// follower's CPU. The random part alone keeps ids unique.
fn new_job_id() -> String {
    let mut random = [0u8; 8];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut random)
        .expect("the system random source works");
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_millis() as u64);
    job_id(now_ms, random)
}

fn job_id(now_ms: u64, random: [u8; 8]) -> String {
    format!(
        "j-{:012x}{}",
        now_ms & 0xffff_ffff_ffff,
        hex::encode(random)
    )
}

/// A job spec from a request body, or a 400 naming the field at fault.
fn parse_spec_body(body: &[u8]) -> Result<JobSpec, ApiError> {
    let value: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid_field("body", format!("the body is not JSON: {e}")))?;
    jobspec::from_json_value(value).map_err(|e| {
        let field = if e.field.is_empty() {
            "body"
        } else {
            e.field.as_str()
        };
        ApiError::invalid_field(field, e.to_string())
    })
}

async fn submit_job(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let spec = match parse_spec_body(&body) {
        Ok(spec) => spec,
        Err(error) => return error.into_response(),
    };
    let idempotency_key = match headers.get("idempotency-key") {
        None => None,
        Some(value) => match value.to_str() {
            Ok(key) if !key.is_empty() && key.len() <= IDEMPOTENCY_KEY_BYTES_MAX => {
                Some(key.to_string())
            }
            _ => {
                return ApiError::invalid_field(
                    "Idempotency-Key",
                    format!("must be 1 to {IDEMPOTENCY_KEY_BYTES_MAX} visible ASCII characters"),
                )
                .into_response()
            }
        },
    };
    let op = Op::SubmitJob {
        job_id: new_job_id(),
        idempotency_key,
        spec_json: spec.canonical_json(),
    };
    write(
        &state,
        op,
        (Method::POST, "/v1/jobs", &headers, body),
        |outcome| match outcome {
            Outcome::JobSubmitted { job_id, created } => {
                let status = if created {
                    StatusCode::CREATED
                } else {
                    StatusCode::OK
                };
                (
                    status,
                    Json(SubmitJobResponse {
                        id: job_id,
                        created,
                    }),
                )
                    .into_response()
            }
            Outcome::IdempotencyConflict { key, job_id } => ApiError::new(
                StatusCode::CONFLICT,
                "conflict",
                format!("Idempotency-Key {key:?} was used for job {job_id} with a different spec"),
            )
            .into_response(),
            Outcome::SubmitRefused { field, reason } => {
                ApiError::invalid_field(&field, format!("{field}: {reason}")).into_response()
            }
            other => ApiError::unexpected(&other).into_response(),
        },
    )
    .await
}

async fn list_jobs(
    State(state): State<Arc<ApiState>>,
    axum::extract::Query(params): axum::extract::Query<ReadParams>,
) -> Result<Json<Vec<JobView>>, ApiError> {
    match read(&state, Query::Jobs, &params).await? {
        Answer::Jobs(jobs) => Ok(Json(jobs.iter().map(job_view).collect())),
        _ => unreachable!("a jobs query answers jobs"),
    }
}

async fn get_job(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
    axum::extract::Query(params): axum::extract::Query<ReadParams>,
) -> Result<Json<JobView>, ApiError> {
    match read(&state, Query::Job(id.clone()), &params).await? {
        Answer::Job(Some(job)) => Ok(Json(job_view(&job))),
        Answer::Job(None) => Err(ApiError::no_job(&id)),
        _ => unreachable!("a job query answers a job"),
    }
}

async fn cancel_job(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let path = format!("/v1/jobs/{id}");
    let op = Op::CancelJob { job_id: id.clone() };
    write(
        &state,
        op,
        (Method::DELETE, &path, &headers, Bytes::new()),
        |outcome| match outcome {
            Outcome::JobCancelled { job_id } => {
                Json(serde_json::json!({ "id": job_id, "state": "cancelled" })).into_response()
            }
            Outcome::JobNotFound { job_id } => ApiError::no_job(&job_id).into_response(),
            Outcome::JobAlreadyFinal { job_id, state } => ApiError::new(
                StatusCode::CONFLICT,
                "conflict",
                format!("job {job_id} already ended: {}", state.as_str()),
            )
            .into_response(),
            other => ApiError::unexpected(&other).into_response(),
        },
    )
    .await
}

async fn cluster_status(
    State(state): State<Arc<ApiState>>,
    axum::extract::Query(params): axum::extract::Query<ReadParams>,
) -> Result<Json<ClusterView>, ApiError> {
    // Membership as this node sees it; `stale` skips the leader round trip.
    let answer = ask(&state, |reply| Event::Read {
        query: Query::Cluster,
        stale: params.stale,
        reply,
    })
    .await;
    match answer {
        Ok(Answer::Cluster(view)) => Ok(Json(view)),
        Ok(_) => unreachable!("a cluster query answers the cluster"),
        Err(reason) => Err(reason.into()),
    }
}

async fn remove_member(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let Ok(node_id) = id.parse::<u64>() else {
        return ApiError::invalid_field(
            "id",
            format!("{id:?} is not a node id (a number from `gantry cluster status`)"),
        )
        .into_response();
    };
    match ask(&state, |reply| Event::RemoveMember { node_id, reply }).await {
        Ok(_) => Json(serde_json::json!({ "removed": node_id })).into_response(),
        Err(Unavailable::NotLeader {
            leader: Some(leader),
        }) => {
            forward(
                &state,
                &leader.http_addr,
                Method::DELETE,
                &format!("/v1/cluster/members/{id}"),
                &headers,
                Bytes::new(),
            )
            .await
        }
        Err(reason) => ApiError::from(reason).into_response(),
    }
}

async fn list_agents(
    State(state): State<Arc<ApiState>>,
    axum::extract::Query(params): axum::extract::Query<ReadParams>,
) -> Result<Json<Vec<AgentView>>, ApiError> {
    match read(&state, Query::Agents, &params).await? {
        Answer::Agents(agents) => Ok(Json(agents)),
        _ => unreachable!("an agents query answers agents"),
    }
}

async fn list_nodes(
    State(state): State<Arc<ApiState>>,
    axum::extract::Query(params): axum::extract::Query<ReadParams>,
) -> Result<Json<Vec<NodeView>>, ApiError> {
    match read(&state, Query::Agents, &params).await? {
        Answer::Agents(agents) => Ok(Json(
            agents.into_iter().flat_map(|agent| agent.nodes).collect(),
        )),
        _ => unreachable!("an agents query answers agents"),
    }
}

async fn create_token(
    State(state): State<Arc<ApiState>>,
    body: Result<Json<CreateTokenRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<(StatusCode, Json<CreateTokenResponse>), ApiError> {
    let Json(request) = body.map_err(|rejection| {
        ApiError::new(rejection.status(), "invalid_request", rejection.body_text())
    })?;
    let role: Role = request
        .role
        .parse()
        .map_err(|e: String| ApiError::invalid_field("role", e))?;
    let ttl_seconds = request.ttl_seconds.unwrap_or(TOKEN_TTL_SECONDS_DEFAULT);
    if ttl_seconds == 0 || ttl_seconds > TOKEN_TTL_SECONDS_MAX {
        return Err(ApiError::invalid_field(
            "ttl_seconds",
            format!("must be between 1 and {TOKEN_TTL_SECONDS_MAX} (30 days), got {ttl_seconds}"),
        ));
    }
    let now_unix_s = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let expires_at_unix_s = now_unix_s + ttl_seconds;
    let token = JoinToken::mint(
        &state.cluster_key,
        &state.ca_sha256_hex,
        role,
        expires_at_unix_s,
    );
    tracing::info!(%role, ttl_seconds, "join token created");
    Ok((
        StatusCode::CREATED,
        Json(CreateTokenResponse {
            token: token.to_string(),
            role: role.to_string(),
            expires_at_unix_s,
        }),
    ))
}

async fn explain_job(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
    axum::extract::Query(params): axum::extract::Query<ReadParams>,
) -> Result<Json<ExplainView>, ApiError> {
    match read(&state, Query::Explain(id.clone()), &params).await? {
        Answer::Explain(Some(job), unplaced) => Ok(Json(ExplainView {
            job: job.id,
            state: job.state.as_str().into(),
            units: unplaced
                .into_iter()
                .map(|u| UnplacedView {
                    unit: u.unit,
                    reason: u.explanation.reason,
                    nodes_total: u.explanation.nodes_total,
                    filtered: u
                        .explanation
                        .filtered
                        .into_iter()
                        .map(|(filter, nodes)| FilterCount { filter, nodes })
                        .collect(),
                    candidates: u
                        .explanation
                        .candidates
                        .into_iter()
                        .map(|(node, score)| CandidateView {
                            node: format!("{}/{}", node.agent_id, node.node),
                            score,
                        })
                        .collect(),
                })
                .collect(),
        })),
        Answer::Explain(None, _) => Err(ApiError::no_job(&id)),
        _ => unreachable!("an explain query answers an explanation"),
    }
}

/// The serving jobs as this coordinator's gateway routes them (its applied state: no leader
/// round trip, as stale as the gateway itself).
async fn list_endpoints(State(state): State<Arc<ApiState>>) -> Json<Vec<EndpointView>> {
    let routes = state.routes.borrow().clone();
    Json(
        routes
            .jobs
            .iter()
            .map(|job| EndpointView {
                name: job.name.clone(),
                job: job.job_id.clone(),
                path: format!("/serve/{}/", job.name),
                routed: job.routed,
                replicas: job
                    .replicas
                    .iter()
                    .map(|r| ReplicaView {
                        allocation: r.allocation_id.clone(),
                        unit: r.unit,
                        agent: r.agent_id.clone(),
                        address: r.address.clone(),
                        state: r.state.into(),
                        healthy: r.healthy,
                    })
                    .collect(),
            })
            .collect(),
    )
}

async fn list_quotas(
    State(state): State<Arc<ApiState>>,
    axum::extract::Query(params): axum::extract::Query<ReadParams>,
) -> Result<Json<std::collections::BTreeMap<String, u32>>, ApiError> {
    match read(&state, Query::Quotas, &params).await? {
        Answer::Quotas(quotas) => Ok(Json(quotas)),
        _ => unreachable!("a quotas query answers quotas"),
    }
}

async fn set_quota(
    State(state): State<Arc<ApiState>>,
    Path(team): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let request: SetQuotaRequest = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(e) => {
            return ApiError::invalid_field(
                "gpus",
                format!("expected {{\"gpus\": N}} or {{\"gpus\": null}}: {e}"),
            )
            .into_response()
        }
    };
    if team.is_empty()
        || team.len() > 63
        || !team
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    {
        return ApiError::invalid_field("team", "must be 1 to 63 lowercase letters, digits or '-'")
            .into_response();
    }
    let path = format!("/v1/quotas/{team}");
    let op = Op::SetQuota {
        team: team.clone(),
        gpus: request.gpus,
    };
    write(&state, op, (Method::PUT, &path, &headers, body), |_| {
        Json(serde_json::json!({ "team": team, "gpus": request.gpus })).into_response()
    })
    .await
}

async fn update_job(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let spec = match parse_spec_body(&body) {
        Ok(spec) => spec,
        Err(error) => return error.into_response(),
    };
    let path = format!("/v1/jobs/{id}");
    let op = Op::UpdateJob {
        job_id: id.clone(),
        spec_json: spec.canonical_json(),
    };
    write(
        &state,
        op,
        (Method::PUT, &path, &headers, body),
        |outcome| match outcome {
            Outcome::JobUpdated { job_id, generation } => {
                Json(serde_json::json!({ "id": job_id, "generation": generation })).into_response()
            }
            Outcome::JobNotFound { job_id } => ApiError::no_job(&job_id).into_response(),
            Outcome::UpdateRefused { job_id, reason } => ApiError::new(
                StatusCode::CONFLICT,
                "conflict",
                format!("job {job_id} cannot take this spec: {reason}"),
            )
            .into_response(),
            Outcome::SubmitRefused { field, reason } => {
                ApiError::invalid_field(&field, format!("{field}: {reason}")).into_response()
            }
            other => ApiError::unexpected(&other).into_response(),
        },
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::{job_id, new_job_id};
    use std::collections::BTreeSet;

    #[test]
    fn job_ids_are_unique_and_sort_by_the_time_they_were_made() {
        let batch: Vec<String> = (0..10_000).map(|_| new_job_id()).collect();
        let distinct: BTreeSet<&String> = batch.iter().collect();
        assert_eq!(distinct.len(), batch.len());
        // The clock decides the order, whatever the random part: 2026-11-27 against a
        // millisecond later, and against 2100.
        let first = job_id(1_795_737_600_000, [0xff; 8]);
        let later = job_id(1_795_737_600_001, [0; 8]);
        let last = job_id(4_102_444_800_000, [0; 8]);
        assert!(first < later && later < last, "{first} {later} {last}");
        for id in batch.iter().chain([&first, &last]) {
            assert_eq!(id.len(), 2 + 12 + 16, "{id}");
            assert!(id.starts_with("j-"), "{id}");
            assert!(
                id[2..]
                    .bytes()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()),
                "{id}"
            );
        }
        assert!(batch.iter().all(|id| &first < id && id < &last));
    }
}
