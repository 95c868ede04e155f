//! The serving gateway: `/serve/{name}/{rest}` on any coordinator goes to `/{rest}` (query
//! kept) on one of the healthy replicas of the serving job named `name`, round robin.
//!
//! Routes come from this coordinator's applied state ([`crate::core::serving`]), published by
//! the event loop after each apply: no request waits on the loop or the leader, and a route is
//! at most as stale as this coordinator's state (a replica that just turned healthy or unhealthy
//! elsewhere may be seen a commit late; a refused connection then moves on to the next replica).
//!
//! Request bodies are read whole first, up to [`GATEWAY_BODY_BYTES_MAX`], so that a request can
//! be sent again to the next replica when a connection is refused; responses are streamed back as
//! they come, without a size limit (token streams, server-sent events). The gateway is outside the
//! bearer-token check, as the replicas' own ports are: it passes requests through, and drops an
//! `Authorization` header only when it carries the cluster's admin token.

use super::{ApiError, ApiState};
use crate::core::serving::attempt_order;
use axum::body::{Body, Bytes, HttpBody};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use ring::digest::{digest, SHA256};
use std::sync::Arc;
use std::time::Duration;

/// Request bodies over this are refused with 413.
pub const GATEWAY_BODY_BYTES_MAX: usize = 8 * 1024 * 1024;
/// Replicas one request tries when connections are refused.
pub const GATEWAY_ATTEMPTS_MAX: usize = 3;
/// A replica gets this long to start its answer (the body then streams without a limit).
pub const GATEWAY_RESPONSE_TIMEOUT: Duration = Duration::from_secs(300);
/// Added to answers: the allocation that served the request.
pub const REPLICA_HEADER: &str = "x-gantry-allocation";
/// Requests through the gateway at once (held until the answer's body ends); more get 503.
pub const GATEWAY_REQUESTS_MAX: usize = 1024;
/// Request bodies buffered at once, in all; a request that would go over gets 503.
pub const GATEWAY_BUFFERED_BYTES_MAX: usize = 64 * 1024 * 1024;
/// Round-robin counters kept at most (one per serving job asked for).
const CURSORS_MAX: usize = 4096;

/// Headers that describe one connection, not the request: never passed on (RFC 9110 7.6.1).
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// `/serve/{name}/{rest}` split into the name and the path the replica sees (`/{rest}`).
pub fn split_path(path: &str) -> Option<(&str, String)> {
    let after = path.strip_prefix("/serve/")?;
    let (name, rest) = match after.find('/') {
        Some(slash) => (&after[..slash], &after[slash..]),
        None => (after, "/"),
    };
    if name.is_empty() {
        return None;
    }
    Some((name, rest.to_string()))
}

/// The path and query the replica is asked for.
pub fn upstream_target(rest: &str, query: Option<&str>) -> String {
    match query {
        Some(query) => format!("{rest}?{query}"),
        None => rest.to_string(),
    }
}

/// The request's headers as the replica gets them: without hop-by-hop headers (and those the
/// `Connection` header names), `Host` and `Content-Length` (set for the new connection), and the
/// cluster's admin token.
pub fn upstream_headers(headers: &HeaderMap, admin_token_sha256: &[u8], prefix: &str) -> HeaderMap {
    let named: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|name| name.trim().to_ascii_lowercase())
        .collect();
    let mut out = HeaderMap::new();
    for (name, value) in headers {
        let lower = name.as_str();
        if HOP_BY_HOP.contains(&lower)
            || named.iter().any(|n| n == lower)
            || name == header::HOST
            || name == header::CONTENT_LENGTH
        {
            continue;
        }
        if name == header::AUTHORIZATION && is_admin_token(value, admin_token_sha256) {
            continue;
        }
        out.append(name.clone(), value.clone());
    }
    if let Some(host) = headers.get(header::HOST) {
        out.insert(HeaderName::from_static("x-forwarded-host"), host.clone());
    }
    if let Ok(prefix) = HeaderValue::from_str(prefix) {
        out.insert(HeaderName::from_static("x-forwarded-prefix"), prefix);
    }
    out
}

fn is_admin_token(value: &HeaderValue, admin_token_sha256: &[u8]) -> bool {
    value
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|token| {
            digest(&SHA256, token.trim().as_bytes()).as_ref() == admin_token_sha256
        })
}

/// The replica's answer headers as the client gets them (`Content-Length` stays: the body is
/// relayed byte for byte).
fn downstream_headers(headers: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::new();
    for (name, value) in headers {
        if !HOP_BY_HOP.contains(&name.as_str()) {
            out.append(name.clone(), value.clone());
        }
    }
    out
}

impl ApiState {
    /// The next round-robin position for a serving job.
    fn next_cursor(&self, job_id: &str) -> u64 {
        let mut cursors = self
            .gateway_cursors
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if cursors.len() >= CURSORS_MAX && !cursors.contains_key(job_id) {
            cursors.clear();
        }
        let cursor = cursors.entry(job_id.to_string()).or_insert(0);
        *cursor = cursor.wrapping_add(1);
        *cursor - 1
    }
}

fn gateway_error(status: StatusCode, message: String) -> Response {
    let code = match status {
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::PAYLOAD_TOO_LARGE => "too_large",
        StatusCode::GATEWAY_TIMEOUT => "timeout",
        StatusCode::BAD_GATEWAY => "bad_gateway",
        _ => "unavailable",
    };
    ApiError::new(status, code, message).into_response()
}

pub async fn serve(State(state): State<Arc<ApiState>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let Some((name, rest)) = split_path(parts.uri.path()) else {
        return gateway_error(
            StatusCode::NOT_FOUND,
            "the gateway serves /serve/{name}/...".into(),
        );
    };
    let routes = state.routes.borrow().clone();
    let Some(job) = routes.route(name) else {
        return gateway_error(
            StatusCode::NOT_FOUND,
            format!("no serving job named {name:?} is running (see GET /v1/endpoints)"),
        );
    };
    let healthy = job.healthy_replicas();
    if healthy.is_empty() {
        let states: Vec<String> = job
            .replicas
            .iter()
            .map(|r| format!("{} {}", r.allocation_id, r.state))
            .collect();
        return gateway_error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "serving job {name} ({}) has no healthy replica right now ({}); retry",
                job.job_id,
                if states.is_empty() {
                    "none is placed".to_string()
                } else {
                    states.join(", ")
                }
            ),
        );
    }
    let Ok(in_flight) = state.gateway_requests.clone().try_acquire_owned() else {
        return gateway_error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the gateway already carries {GATEWAY_REQUESTS_MAX} requests; retry"),
        );
    };
    // Room for the body before reading it: its length when known (0 for a request without
    // one), else the most it may be.
    let hint = HttpBody::size_hint(&body);
    let declared = hint.exact().map(|n| n as usize);
    if hint.lower() > GATEWAY_BODY_BYTES_MAX as u64 {
        return gateway_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the request body is over {GATEWAY_BODY_BYTES_MAX} bytes"),
        );
    }
    let room = declared.unwrap_or(GATEWAY_BODY_BYTES_MAX) as u32;
    let Ok(buffered) = state.gateway_buffered.clone().try_acquire_many_owned(room) else {
        return gateway_error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the gateway already holds {GATEWAY_BUFFERED_BYTES_MAX} bytes of request bodies; retry"),
        );
    };
    let body = match axum::body::to_bytes(body, declared.unwrap_or(GATEWAY_BODY_BYTES_MAX)).await {
        Ok(body) => body,
        Err(e) => {
            return gateway_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the request body could not be read whole (at most {GATEWAY_BODY_BYTES_MAX} bytes): {e}"),
            )
        }
    };
    let target = upstream_target(&rest, parts.uri.query());
    let headers = upstream_headers(
        &parts.headers,
        &state.admin_token_sha256,
        &format!("/serve/{name}"),
    );
    let method = parts.method;
    let mut refused = Vec::new();
    for index in attempt_order(
        healthy.len(),
        state.next_cursor(&job.job_id),
        GATEWAY_ATTEMPTS_MAX,
    ) {
        let replica = healthy[index];
        let address = replica
            .address
            .as_deref()
            .expect("healthy replicas have an address");
        let request = state
            .gateway_http
            .request(method.clone(), format!("http://{address}{target}"))
            .headers(headers.clone())
            .body(Bytes::clone(&body));
        let answer = match tokio::time::timeout(GATEWAY_RESPONSE_TIMEOUT, request.send()).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(e)) if e.is_connect() => {
                tracing::debug!(replica = %replica.allocation_id, %address, "gateway: connection refused; trying the next replica: {e}");
                refused.push(format!("{} at {address}", replica.allocation_id));
                continue;
            }
            Ok(Err(e)) => {
                return gateway_error(
                    StatusCode::BAD_GATEWAY,
                    format!(
                        "replica {} at {address} of {name} failed to answer: {e}",
                        replica.allocation_id
                    ),
                )
            }
            Err(_) => {
                return gateway_error(
                    StatusCode::GATEWAY_TIMEOUT,
                    format!(
                        "replica {} at {address} of {name} did not answer within {GATEWAY_RESPONSE_TIMEOUT:?}",
                        replica.allocation_id
                    ),
                )
            }
        };
        let mut response_headers = downstream_headers(answer.headers());
        if let Ok(value) = HeaderValue::from_str(&replica.allocation_id) {
            response_headers.insert(HeaderName::from_static(REPLICA_HEADER), value);
        }
        let status = answer.status();
        drop(buffered);
        return (status, response_headers, relay(answer, in_flight)).into_response();
    }
    gateway_error(
        StatusCode::SERVICE_UNAVAILABLE,
        format!(
            "no replica of {name} accepted the connection ({}); retry",
            refused.join(", ")
        ),
    )
}

/// A response's body as it arrives, as a body for the client; `guard` (a permit) is held until
/// the body ends or the client goes away.
pub fn relay<G: Send + 'static>(response: reqwest::Response, guard: G) -> Body {
    let chunks = futures_util::stream::unfold(Some((response, guard)), |state| async move {
        let (mut response, guard) = state?;
        match response.chunk().await {
            Ok(Some(chunk)) => Some((Ok(chunk), Some((response, guard)))),
            Ok(None) => None,
            Err(e) => Some((Err(std::io::Error::other(e)), None)),
        }
    });
    Body::from_stream(chunks)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_rewritten_below_the_name() {
        // (request path, query) -> (name, replica's target)
        for (path, query, name, target) in [
            ("/serve/llm", None, "llm", "/"),
            ("/serve/llm/", None, "llm", "/"),
            ("/serve/llm/v1/chat", None, "llm", "/v1/chat"),
            (
                "/serve/llm/v1/chat/",
                Some("stream=1&x=%20"),
                "llm",
                "/v1/chat/?stream=1&x=%20",
            ),
            ("/serve/llm//double", None, "llm", "//double"),
            ("/serve/llm/a%2Fb", None, "llm", "/a%2Fb"),
        ] {
            let (got_name, rest) = split_path(path).unwrap();
            assert_eq!(got_name, name, "{path}");
            assert_eq!(upstream_target(&rest, query), target, "{path}");
        }
        for path in ["/serve/", "/serve//x", "/v1/jobs", "/serve"] {
            assert!(split_path(path).is_none(), "{path}");
        }
    }

    #[test]
    fn hop_by_hop_headers_and_the_admin_token_stay_behind() {
        let admin = digest(&SHA256, b"admin-secret").as_ref().to_vec();
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("host", "coordinator:7080"),
            ("connection", "keep-alive, x-private"),
            ("x-private", "1"),
            ("keep-alive", "timeout=5"),
            ("transfer-encoding", "chunked"),
            ("content-length", "12"),
            ("content-type", "application/json"),
            ("accept", "text/event-stream"),
        ] {
            headers.insert(
                HeaderName::from_static(name),
                HeaderValue::from_static(value),
            );
        }
        let check = |authorization: &'static str, kept: bool| {
            let mut headers = headers.clone();
            headers.insert(
                header::AUTHORIZATION,
                HeaderValue::from_static(authorization),
            );
            let out = upstream_headers(&headers, &admin, "/serve/llm");
            let mut names: Vec<&str> = out.keys().map(|k| k.as_str()).collect();
            names.sort();
            let mut expected = vec![
                "accept",
                "content-type",
                "x-forwarded-host",
                "x-forwarded-prefix",
            ];
            if kept {
                expected.insert(1, "authorization");
            }
            assert_eq!(names, expected, "{authorization}");
            assert_eq!(out["x-forwarded-host"], "coordinator:7080");
            assert_eq!(out["x-forwarded-prefix"], "/serve/llm");
        };
        check("Bearer admin-secret", false);
        check("Bearer the-model's-own-key", true);
    }
}
