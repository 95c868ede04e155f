//! `GET /v1/jobs/{id}/logs`: a job's output, read from the agents that ran it.
//!
//! The leader asks the allocation's agent over its session for one slice at a time
//! ([`LOG_FETCH_BYTES`]); a follower forwards the whole request to the leader and relays the
//! stream. The body is streamed (chunked) as slices arrive: to the end of what the agent holds
//! when the request came, or, with `follow=true`, until the allocation has ended and its last
//! byte is sent, or the client goes away.
//!
//! With `allocation`, the body is that allocation's raw bytes from `offset`; the headers say where
//! the first byte is (`x-gantry-log-offset`: later than asked when older output was rotated
//! away). Without it, every allocation of the job in unit order, then attempt order (and, when
//! following, those placed later), each preceded by a line `==> ALLOCATION (unit U, attempt A)
//! <==`; a following stream ends once the job has ended and each of its allocations has.

use super::{forward_stream, ApiError, ApiState};
use crate::server::{
    Event, LogAnswer, LogTarget, LogTargets, LogsRefusal, Unavailable, LOG_FETCH_TIMEOUT,
};
use axum::body::{Body, Bytes};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use gantry_protocol::LogStream;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// Bytes asked of an agent per slice; the reply is well under the 4 MiB frame.
pub const LOG_FETCH_BYTES: u32 = 256 * 1024;
/// A following stream with nothing new asks again after this.
pub const FOLLOW_POLL_INTERVAL: Duration = Duration::from_millis(250);
/// Log streams served by one coordinator at once; more are refused with 503.
pub const LOG_STREAMS_MAX: usize = 64;
/// Slices queued for a slow client before the stream waits for it.
const BODY_QUEUE_LEN_MAX: usize = 4;
pub const OFFSET_HEADER: &str = "x-gantry-log-offset";
pub const ALLOCATION_HEADER: &str = "x-gantry-log-allocation";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogParams {
    pub allocation: Option<String>,
    pub stream: LogStream,
    pub offset: u64,
    pub follow: bool,
}

/// The query's parameters, or a 400 naming the one at fault.
pub fn parse_params(pairs: Vec<(String, String)>) -> Result<LogParams, ApiError> {
    let mut params = LogParams {
        allocation: None,
        stream: LogStream::Stdout,
        offset: 0,
        follow: false,
    };
    for (name, value) in pairs {
        match name.as_str() {
            "allocation" if !value.is_empty() => params.allocation = Some(value),
            "stream" => {
                params.stream = match value.as_str() {
                    "stdout" => LogStream::Stdout,
                    "stderr" => LogStream::Stderr,
                    _ => {
                        return Err(ApiError::invalid_field(
                            "stream",
                            format!("must be stdout or stderr, got {value:?}"),
                        ))
                    }
                }
            }
            "offset" => {
                params.offset = value.parse().map_err(|_| {
                    ApiError::invalid_field(
                        "offset",
                        format!("must be a byte offset (a whole number), got {value:?}"),
                    )
                })?
            }
            "follow" => {
                params.follow = match value.as_str() {
                    "true" | "1" => true,
                    "false" | "0" => false,
                    _ => {
                        return Err(ApiError::invalid_field(
                            "follow",
                            format!("must be true or false, got {value:?}"),
                        ))
                    }
                }
            }
            "allocation" => {}
            other => {
                return Err(ApiError::invalid_field(
                    other,
                    "unknown parameter: expected allocation, stream, offset or follow",
                ))
            }
        }
    }
    if params.allocation.is_none() && params.offset != 0 {
        return Err(ApiError::invalid_field(
            "offset",
            "an offset is within one allocation's output: name the allocation too",
        ));
    }
    Ok(params)
}

fn refusal_error(refusal: LogsRefusal) -> ApiError {
    match refusal {
        LogsRefusal::Unavailable(reason) => reason.into(),
        LogsRefusal::NoJob { job_id } => ApiError::no_job(&job_id),
        LogsRefusal::NoAllocation {
            job_id,
            allocation_id,
        } => {
            let mut error = ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("job {job_id} has no allocation {allocation_id}"),
            );
            error.detail.field = Some("allocation".into());
            error
        }
        LogsRefusal::Agent { message, .. } => ApiError::unavailable(message),
        LogsRefusal::NoLogs { message, .. } => {
            ApiError::new(StatusCode::NOT_FOUND, "not_found", message)
        }
        LogsRefusal::Failed(message) => {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
        }
    }
}

/// Who the stream asks, and how: the leader's event loop.
#[derive(Clone)]
struct Reader {
    state: Arc<ApiState>,
    stream: LogStream,
}

impl Reader {
    async fn targets(&self, job_id: &str) -> Result<LogTargets, LogsRefusal> {
        let job_id = job_id.to_string();
        ask_logs(&self.state, |reply| Event::LogTargets {
            job_id,
            allocation_id: None,
            reply,
        })
        .await
    }

    async fn fetch(&self, allocation_id: &str, offset: u64) -> Result<LogAnswer, LogsRefusal> {
        let allocation_id = allocation_id.to_string();
        let stream = self.stream;
        let answer = ask_logs(&self.state, |reply| Event::FetchLogs {
            allocation_id,
            stream,
            offset,
            max_bytes: LOG_FETCH_BYTES,
            reply,
        });
        // The loop answers within its own timeout; this bounds a loop that is gone.
        match tokio::time::timeout(LOG_FETCH_TIMEOUT * 2, answer).await {
            Ok(answer) => answer,
            Err(_) => Err(LogsRefusal::Unavailable(Unavailable::Timeout)),
        }
    }
}

async fn ask_logs<T>(
    state: &ApiState,
    make: impl FnOnce(tokio::sync::oneshot::Sender<Result<T, LogsRefusal>>) -> Event,
) -> Result<T, LogsRefusal> {
    let (reply, answer) = tokio::sync::oneshot::channel();
    if state.handle.send(make(reply)).await.is_err() {
        return Err(LogsRefusal::Unavailable(Unavailable::ShuttingDown));
    }
    answer
        .await
        .unwrap_or(Err(LogsRefusal::Unavailable(Unavailable::ShuttingDown)))
}

type BodySender = mpsc::Sender<Result<Bytes, std::io::Error>>;

/// The client went away: stop.
struct Gone;

/// The body being streamed, and whether what was sent last ended a line.
struct Output {
    body: BodySender,
    ends_with_newline: bool,
}

impl Output {
    async fn send(&mut self, bytes: Vec<u8>) -> Result<(), Gone> {
        let Some(&last) = bytes.last() else {
            return Ok(());
        };
        self.ends_with_newline = last == b'\n';
        self.body
            .send(Ok(Bytes::from(bytes)))
            .await
            .map_err(|_| Gone)
    }

    /// Sends a line of its own, after a newline if the output is mid-line.
    async fn send_line(&mut self, line: String) -> Result<(), Gone> {
        let text = if self.ends_with_newline {
            line
        } else {
            format!("\n{line}")
        };
        self.send(text.into_bytes()).await
    }

    /// Waits before asking again; returns early when the client went away.
    async fn pause(&self) -> Result<(), Gone> {
        tokio::select! {
            _ = tokio::time::sleep(FOLLOW_POLL_INTERVAL) => Ok(()),
            _ = self.body.closed() => Err(Gone),
        }
    }

    /// Breaks the body off, so the client sees an incomplete stream rather than a clean end.
    async fn break_off(&self, refusal: LogsRefusal) {
        let message = refusal_error(refusal).detail.message;
        let _ = self.body.send(Err(std::io::Error::other(message))).await;
    }
}

pub async fn job_logs(
    State(state): State<Arc<ApiState>>,
    Path(job_id): Path<String>,
    RawQuery(query): RawQuery,
    pairs: Result<Query<Vec<(String, String)>>, QueryRejection>,
    headers: HeaderMap,
) -> Response {
    let parsed = pairs
        .map_err(|e| ApiError::invalid_field("query", e.body_text()))
        .and_then(|Query(pairs)| parse_params(pairs));
    let params = match parsed {
        Ok(params) => params,
        Err(error) => return error.into_response(),
    };
    let Ok(permit) = state.log_streams.clone().try_acquire_owned() else {
        return ApiError::unavailable(format!(
            "this coordinator already serves {LOG_STREAMS_MAX} log streams; retry later"
        ))
        .into_response();
    };
    let targets = ask_logs(&state, |reply| Event::LogTargets {
        job_id: job_id.clone(),
        allocation_id: params.allocation.clone(),
        reply,
    })
    .await;
    let targets = match targets {
        Ok(targets) => targets,
        Err(LogsRefusal::Unavailable(Unavailable::NotLeader {
            leader: Some(leader),
        })) => {
            let path = match &query {
                Some(query) => format!("/v1/jobs/{job_id}/logs?{query}"),
                None => format!("/v1/jobs/{job_id}/logs"),
            };
            return forward_stream(
                &state,
                &leader.http_addr,
                Method::GET,
                &path,
                &headers,
                permit,
            )
            .await;
        }
        Err(refusal) => return refusal_error(refusal).into_response(),
    };
    let reader = Reader {
        state: state.clone(),
        stream: params.stream,
    };
    let (body_tx, mut body_rx) = mpsc::channel(BODY_QUEUE_LEN_MAX);
    let mut response_headers = HeaderMap::new();
    match &params.allocation {
        Some(_) => {
            let target = targets.targets[0].clone();
            // The first slice before the answer, so that a refusal gets its own status.
            let first = match reader.fetch(&target.allocation_id, params.offset).await {
                Ok(answer) => Some(answer),
                Err(LogsRefusal::NoLogs {
                    allocation_final: false,
                    ..
                }) if params.follow => None,
                Err(refusal) => return refusal_error(refusal).into_response(),
            };
            let offset = first.as_ref().map_or(params.offset, |a| a.slice.offset);
            response_headers.insert(OFFSET_HEADER, HeaderValue::from(offset));
            if let Ok(value) = HeaderValue::from_str(&target.allocation_id) {
                response_headers.insert(ALLOCATION_HEADER, value);
            }
            tokio::spawn(async move {
                let _permit = permit;
                let mut output = Output {
                    body: body_tx,
                    ends_with_newline: true,
                };
                let copied = copy_allocation(
                    &reader,
                    &mut output,
                    &target,
                    params.offset,
                    first,
                    params.follow,
                )
                .await;
                match copied {
                    Ok(Ok(())) => {}
                    Ok(Err(refusal)) => {
                        tracing::debug!(allocation = %target.allocation_id, ?refusal, "log stream broke off");
                        output.break_off(refusal).await;
                    }
                    Err(Gone) => {
                        tracing::debug!(allocation = %target.allocation_id, "log stream's client went away")
                    }
                }
            });
        }
        None => {
            tokio::spawn(async move {
                let _permit = permit;
                let mut output = Output {
                    body: body_tx,
                    ends_with_newline: true,
                };
                if let Err(Gone) =
                    copy_job(&reader, &mut output, &job_id, targets, params.follow).await
                {
                    tracing::debug!(job = %job_id, "log stream's client went away");
                }
            });
        }
    }
    let body = Body::from_stream(futures_util::stream::poll_fn(move |cx| {
        body_rx.poll_recv(cx)
    }));
    response_headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    (StatusCode::OK, response_headers, body).into_response()
}

/// Copies one allocation's output from `offset` (starting with `first` when already read). A
/// refusal after the first slice is returned for the caller to report.
async fn copy_allocation(
    reader: &Reader,
    output: &mut Output,
    target: &LogTarget,
    offset: u64,
    first: Option<LogAnswer>,
    follow: bool,
) -> Result<Result<(), LogsRefusal>, Gone> {
    let mut next = offset;
    let mut pending = first;
    // Without follow, the end is where the stream was when the request came.
    let mut end_of_request: Option<u64> = None;
    loop {
        let answer = match pending.take() {
            Some(answer) => answer,
            None => match reader.fetch(&target.allocation_id, next).await {
                Ok(answer) => answer,
                // Not started yet: its output comes once it runs.
                Err(LogsRefusal::NoLogs {
                    allocation_final: false,
                    ..
                }) if follow => {
                    output.pause().await?;
                    continue;
                }
                Err(LogsRefusal::NoLogs { .. }) if follow => return Ok(Ok(())),
                Err(refusal) => return Ok(Err(refusal)),
            },
        };
        let n_bytes = answer.slice.data.len() as u64;
        next = answer.slice.offset + n_bytes;
        let end = *end_of_request.get_or_insert(answer.slice.end_offset);
        output.send(answer.slice.data).await?;
        if follow {
            if answer.slice.ended && answer.allocation_final {
                return Ok(Ok(()));
            }
        } else if next >= end || n_bytes == 0 {
            return Ok(Ok(()));
        }
        if n_bytes == 0 {
            output.pause().await?;
        }
    }
}

/// Copies every allocation of a job in turn, each after its header line. Refusals for one
/// allocation are written in its header line, and the next follows.
async fn copy_job(
    reader: &Reader,
    output: &mut Output,
    job_id: &str,
    mut targets: LogTargets,
    follow: bool,
) -> Result<(), Gone> {
    let mut done: BTreeSet<String> = BTreeSet::new();
    loop {
        let next = targets
            .targets
            .iter()
            .find(|t| !done.contains(&t.allocation_id))
            .cloned();
        let Some(target) = next else {
            if !follow || targets.job_final {
                return Ok(());
            }
            output.pause().await?;
            targets = match reader.targets(job_id).await {
                Ok(targets) => targets,
                Err(refusal) => {
                    output.break_off(refusal).await;
                    return Ok(());
                }
            };
            continue;
        };
        done.insert(target.allocation_id.clone());
        let first = match reader.fetch(&target.allocation_id, 0).await {
            Ok(answer) => {
                let note = (answer.slice.offset > 0)
                    .then(|| format!("the first {} bytes were rotated away", answer.slice.offset));
                output
                    .send_line(header_line(&target, note.as_deref()))
                    .await?;
                Some(answer)
            }
            Err(LogsRefusal::NoLogs {
                allocation_final: false,
                ..
            }) if follow => {
                output.send_line(header_line(&target, None)).await?;
                None
            }
            Err(refusal) => {
                let note = format!(
                    "output unavailable: {}",
                    refusal_error(refusal).detail.message
                );
                output.send_line(header_line(&target, Some(&note))).await?;
                continue;
            }
        };
        if let Err(refusal) = copy_allocation(reader, output, &target, 0, first, follow).await? {
            let line = format!(
                "==> {}: output broke off: {} <==\n",
                target.allocation_id,
                refusal_error(refusal).detail.message
            );
            output.send_line(line).await?;
        }
    }
}

/// The line before each allocation's output when a request names no allocation.
pub fn header_line(target: &LogTarget, note: Option<&str>) -> String {
    match note {
        Some(note) => format!(
            "==> {} (unit {}, attempt {}): {note} <==\n",
            target.allocation_id, target.unit, target.attempt
        ),
        None => format!(
            "==> {} (unit {}, attempt {}) <==\n",
            target.allocation_id, target.unit, target.attempt
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(query: &[(&str, &str)]) -> Result<LogParams, (Option<String>, String)> {
        let pairs = query
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        parse_params(pairs).map_err(|e| (e.detail.field, e.detail.message))
    }

    #[test]
    fn parameters_have_defaults_and_errors_name_the_parameter() {
        assert_eq!(
            params(&[]).unwrap(),
            LogParams {
                allocation: None,
                stream: LogStream::Stdout,
                offset: 0,
                follow: false
            }
        );
        assert_eq!(
            params(&[
                ("allocation", "j-1-0-0"),
                ("stream", "stderr"),
                ("offset", "4096"),
                ("follow", "true")
            ])
            .unwrap(),
            LogParams {
                allocation: Some("j-1-0-0".into()),
                stream: LogStream::Stderr,
                offset: 4096,
                follow: true
            }
        );
        for (query, field) in [
            (vec![("stream", "both")], "stream"),
            (vec![("allocation", "a"), ("offset", "-1")], "offset"),
            (vec![("follow", "yes")], "follow"),
            (vec![("tail", "10")], "tail"),
            (vec![("offset", "10")], "offset"),
        ] {
            let (got, message) = params(&query).unwrap_err();
            assert_eq!(got.as_deref(), Some(field), "{query:?}: {message}");
        }
    }

    #[test]
    fn each_allocation_of_a_job_starts_on_a_line_of_its_own() {
        let target = LogTarget {
            allocation_id: "j-1-2-1".into(),
            unit: 2,
            attempt: 1,
            agent_id: "agent-1".into(),
        };
        assert_eq!(
            header_line(&target, None),
            "==> j-1-2-1 (unit 2, attempt 1) <==\n"
        );
        assert_eq!(
            header_line(&target, Some("the first 10 bytes were rotated away")),
            "==> j-1-2-1 (unit 2, attempt 1): the first 10 bytes were rotated away <==\n"
        );
    }

    #[tokio::test]
    async fn a_header_after_a_partial_line_starts_a_new_line() {
        let (body, mut sent) = mpsc::channel(8);
        let mut output = Output {
            body,
            ends_with_newline: true,
        };
        let mut chunks = Vec::new();
        output.send_line("==> a <==\n".into()).await.ok().unwrap();
        output.send(b"no newline".to_vec()).await.ok().unwrap();
        output.send(Vec::new()).await.ok().unwrap();
        output.send_line("==> b <==\n".into()).await.ok().unwrap();
        drop(output);
        while let Some(chunk) = sent.recv().await {
            chunks.extend_from_slice(&chunk.unwrap());
        }
        assert_eq!(chunks, b"==> a <==\nno newline\n==> b <==\n");
    }
}
