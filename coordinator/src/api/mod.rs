//! The HTTP API (axum): deny by default, a bearer token on everything but `/healthz`.

pub mod types;

use crate::server::{Event, Handle};
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use gantry_protocol::token::JoinToken;
use gantry_protocol::Role;
use ring::digest::{digest, SHA256};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::sync::oneshot;
use types::*;

/// Request bodies larger than this are refused with 413.
pub const REQUEST_BODY_BYTES_MAX: usize = 1024 * 1024;
/// Join tokens live at most this long.
pub const TOKEN_TTL_SECONDS_MAX: u64 = 30 * 24 * 3600;
const TOKEN_TTL_SECONDS_DEFAULT: u64 = 3600;

pub struct ApiState {
    pub handle: Handle,
    pub admin_token_sha256: Vec<u8>,
    pub cluster_key: Vec<u8>,
    pub ca_sha256_hex: String,
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

    fn unavailable() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "the coordinator is shutting down",
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(ErrorBody { error: self.detail })).into_response()
    }
}

pub fn router(state: Arc<ApiState>) -> Router {
    let protected = Router::new()
        .route("/v1/agents", get(list_agents))
        .route("/v1/nodes", get(list_nodes))
        .route("/v1/tokens", post(create_token))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .route("/healthz", get(healthz))
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

async fn query<T>(
    state: &ApiState,
    make: impl FnOnce(oneshot::Sender<T>) -> Event,
) -> Result<T, ApiError> {
    let (reply, answer) = oneshot::channel();
    state
        .handle
        .send(make(reply))
        .await
        .map_err(|_| ApiError::unavailable())?;
    answer.await.map_err(|_| ApiError::unavailable())
}

async fn list_agents(State(state): State<Arc<ApiState>>) -> Result<Json<Vec<AgentView>>, ApiError> {
    Ok(Json(
        query(&state, |reply| Event::ListAgents { reply }).await?,
    ))
}

async fn list_nodes(State(state): State<Arc<ApiState>>) -> Result<Json<Vec<NodeView>>, ApiError> {
    let agents = query(&state, |reply| Event::ListAgents { reply }).await?;
    Ok(Json(
        agents.into_iter().flat_map(|agent| agent.nodes).collect(),
    ))
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
