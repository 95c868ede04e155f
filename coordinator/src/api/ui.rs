//! The dashboard at `/ui`, and the usage series it plots (`/v1/usage`).
//!
//! The page, its script and its style sheet are compiled into the binary (`coordinator/ui/`):
//! no CDN, nothing fetched from anywhere but this coordinator, so it works on an air-gapped
//! site. The page itself is public, as static files are; everything it shows it reads from the
//! API with the token the user signs in with, which the browser keeps in session storage.

use super::{read, ApiError, ApiState, ReadParams};
use crate::core::usage::{self, NodeRates, Run, Window};
use crate::server::{Answer, Query};
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use std::collections::BTreeMap;
use std::sync::Arc;

const INDEX_HTML: &str = include_str!("../../ui/index.html");
const APP_JS: &str = include_str!("../../ui/app.js");
const APP_CSS: &str = include_str!("../../ui/app.css");

/// Every path under `/ui` but the assets answers the page, which routes itself by path.
pub fn routes() -> Router<Arc<ApiState>> {
    Router::new()
        .route("/ui", get(index))
        .route("/ui/", get(index))
        .route("/ui/assets/app.js", get(script))
        .route("/ui/assets/app.css", get(style))
        .route("/ui/{*page}", get(index))
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
            // The page loads only what this coordinator serves.
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'",
            ),
        ],
        body,
    )
        .into_response()
}

async fn index() -> Response {
    asset("text/html; charset=utf-8", INDEX_HTML)
}

async fn script() -> Response {
    asset("text/javascript; charset=utf-8", APP_JS)
}

async fn style() -> Response {
    asset("text/css; charset=utf-8", APP_CSS)
}

#[derive(Debug, serde::Deserialize)]
pub(super) struct UsageParams {
    /// How far back, in seconds.
    window: Option<u64>,
    /// Seconds per step.
    step: Option<u64>,
    #[serde(default)]
    stale: bool,
}

const WINDOW_SECONDS_DEFAULT: u64 = 3600;
const WINDOW_SECONDS_MAX: u64 = 31 * 24 * 3600;

/// `GET /v1/usage?window=SECONDS&step=SECONDS`: GPU- and CPU-seconds and cost per step, per team
/// and per site, over the window ending now, with each site's idle cost and capacity.
pub(super) async fn usage_report(
    State(state): State<Arc<ApiState>>,
    axum::extract::Query(params): axum::extract::Query<UsageParams>,
) -> Result<Json<super::types::UsageView>, ApiError> {
    let window_s = params.window.unwrap_or(WINDOW_SECONDS_DEFAULT);
    if window_s == 0 || window_s > WINDOW_SECONDS_MAX {
        return Err(ApiError::invalid_field(
            "window",
            format!("must be 1 to {WINDOW_SECONDS_MAX} seconds, not {window_s}"),
        ));
    }
    let step_s = params.step.unwrap_or_else(|| window_s.div_ceil(60).max(1));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let window = Window::ending_at(now, window_s * 1000, step_s.saturating_mul(1000))
        .map_err(|reason| ApiError::invalid_field("step", reason))?;
    let read_params = ReadParams {
        stale: params.stale,
    };
    let Answer::Agents(agents) = read(&state, Query::Agents, &read_params).await? else {
        unreachable!("an agents query answers agents")
    };
    let Answer::Jobs(jobs) = read(&state, Query::Jobs, &read_params).await? else {
        unreachable!("a jobs query answers jobs")
    };
    let nodes: BTreeMap<(String, String), NodeRates> = agents
        .iter()
        .flat_map(|agent| &agent.nodes)
        .map(|node| {
            (
                (node.agent.clone(), node.node.clone()),
                NodeRates {
                    site: node.site.clone(),
                    cost_per_gpu_hour: node.cost_per_gpu_hour,
                    cost_per_cpu_hour: node.cost_per_cpu_hour,
                    gpus: node.gpus.len() as u32,
                    cpu_millis: u64::from(node.cpu_cores) * 1000,
                },
            )
        })
        .collect();
    let teams: Vec<String> = jobs
        .iter()
        .map(|(job, _)| {
            serde_json::from_str::<serde_json::Value>(&job.spec_json)
                .ok()
                .and_then(|spec| spec.get("team")?.as_str().map(str::to_string))
                .unwrap_or_default()
        })
        .collect();
    let runs: Vec<Run<'_>> = jobs
        .iter()
        .zip(&teams)
        .flat_map(|((_, allocations), team)| {
            allocations.iter().filter_map(move |a| {
                Some(Run {
                    team,
                    node: (&a.agent_id, &a.node),
                    gpus: a.gpus.len() as u32,
                    cpu_millis: a.cpu_millis,
                    started_at_unix_ms: a.started_at_unix_ms?,
                    ended_at_unix_ms: a.ended_at_unix_ms,
                })
            })
        })
        .collect();
    Ok(Json(usage::usage(&runs, &nodes, window, now).into()))
}
