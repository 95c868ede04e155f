//! The CLI's HTTP client: tries each coordinator in `GANTRY_API` in turn, sends the bearer token,
//! and turns the API's error bodies into messages.

use anyhow::{anyhow, bail, Context, Result};
use gantry_coordinator::api::types::ErrorBody;
use serde::{de::DeserializeOwned, Serialize};
use std::time::Duration;

pub struct ApiClient {
    bases: Vec<String>,
    token: Option<String>,
    http: reqwest::Client,
    /// For answers that stream for as long as they last (`gantry logs --follow`).
    stream_http: reqwest::Client,
}

impl ApiClient {
    pub fn new(api: &str, token: Option<String>) -> Result<Self> {
        let bases: Vec<String> = api
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| {
                let s = s.trim_end_matches('/');
                if s.starts_with("http://") || s.starts_with("https://") {
                    s.to_string()
                } else {
                    format!("http://{s}")
                }
            })
            .collect();
        if bases.is_empty() {
            bail!(
                "no coordinator API address: set GANTRY_API or pass --api (such as 127.0.0.1:7080)"
            );
        }
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(3))
            .timeout(Duration::from_secs(30))
            .build()
            .context("build the HTTP client")?;
        let stream_http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(3))
            .build()
            .context("build the HTTP client")?;
        Ok(Self {
            bases,
            token,
            http,
            stream_http,
        })
    }

    /// A GET whose answer is read as it streams: the first coordinator that answers 2xx, or the
    /// error of the last. No overall timeout.
    pub async fn get_stream(&self, path: &str) -> Result<reqwest::Response> {
        let mut failures = Vec::new();
        for base in &self.bases {
            let mut request = self.stream_http.get(format!("{base}{path}"));
            if let Some(token) = &self.token {
                request = request.bearer_auth(token.trim());
            }
            let response = match request.send().await {
                Ok(response) => response,
                Err(e) if e.is_connect() || e.is_timeout() => {
                    failures.push(format!("{base}: {e}"));
                    continue;
                }
                Err(e) => return Err(anyhow!("GET {base}{path}: {e}")),
            };
            let status = response.status();
            if status.is_success() {
                return Ok(response);
            }
            let bytes = response
                .bytes()
                .await
                .with_context(|| format!("read the answer from {base}"))?;
            let message = error_message(&bytes);
            if status == reqwest::StatusCode::SERVICE_UNAVAILABLE && self.bases.len() > 1 {
                failures.push(format!("{base}: {message}"));
                continue;
            }
            if status == reqwest::StatusCode::UNAUTHORIZED && self.token.is_none() {
                bail!("{message}\nset GANTRY_TOKEN or pass --token");
            }
            bail!("{status}: {message}");
        }
        bail!("no coordinator answered: {}", failures.join("; "))
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.send(reqwest::Method::GET, path, None::<&()>, None)
            .await
    }

    pub async fn post<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<T> {
        self.send(reqwest::Method::POST, path, Some(body), None)
            .await
    }

    /// A POST that is safe to send to the next coordinator if one fails mid-request.
    pub async fn post_idempotent<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
        key: &str,
    ) -> Result<T> {
        self.send(reqwest::Method::POST, path, Some(body), Some(key))
            .await
    }

    pub async fn put<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<T> {
        self.send(reqwest::Method::PUT, path, Some(body), None)
            .await
    }

    pub async fn delete<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.send(reqwest::Method::DELETE, path, None::<&()>, None)
            .await
    }

    /// The raw body of a GET (an artifact's bytes).
    pub async fn get_bytes(&self, path: &str) -> Result<Vec<u8>> {
        let (_, bytes) = self
            .send_raw(reqwest::Method::GET, path, None::<&()>, None)
            .await?;
        Ok(bytes)
    }

    async fn send<B: Serialize, T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&B>,
        idempotency_key: Option<&str>,
    ) -> Result<T> {
        let (base, bytes) = self.send_raw(method, path, body, idempotency_key).await?;
        serde_json::from_slice(&bytes)
            .with_context(|| format!("parse the answer from {base}{path}"))
    }

    /// Sends to each coordinator in turn until one answers; the answering base and the body of a
    /// success, or the error the API gave.
    async fn send_raw<B: Serialize>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&B>,
        idempotency_key: Option<&str>,
    ) -> Result<(String, Vec<u8>)> {
        let mut failures = Vec::new();
        for base in &self.bases {
            let mut request = self.http.request(method.clone(), format!("{base}{path}"));
            if let Some(token) = &self.token {
                request = request.bearer_auth(token.trim());
            }
            if let Some(body) = body {
                request = request.json(body);
            }
            if let Some(key) = idempotency_key {
                request = request.header("Idempotency-Key", key);
            }
            let response = match request.send().await {
                Ok(response) => response,
                // A connection refused never reached the server; a timeout may have, so only
                // requests that are safe to repeat move on after one.
                Err(e)
                    if e.is_connect()
                        || (e.is_timeout()
                            && (method == reqwest::Method::GET || idempotency_key.is_some())) =>
                {
                    failures.push(format!("{base}: {e}"));
                    continue;
                }
                Err(e) => return Err(anyhow!("{method} {base}{path}: {e}")),
            };
            let status = response.status();
            let bytes = response
                .bytes()
                .await
                .with_context(|| format!("read the answer from {base}"))?;
            if status.is_success() {
                return Ok((base.clone(), bytes.to_vec()));
            }
            let message = error_message(&bytes);
            if status == reqwest::StatusCode::SERVICE_UNAVAILABLE
                && self.bases.len() > 1
                && (method == reqwest::Method::GET || idempotency_key.is_some())
            {
                failures.push(format!("{base}: {message}"));
                continue;
            }
            if status == reqwest::StatusCode::UNAUTHORIZED && self.token.is_none() {
                bail!("{message}\nset GANTRY_TOKEN or pass --token");
            }
            return Err(ApiError {
                status: status.as_u16(),
                message: format!("{status}: {message}"),
            }
            .into());
        }
        Err(Unreachable(failures.join("; ")).into())
    }
}

/// The API answered with an error status; the CLI's exit code follows `status`.
#[derive(Debug)]
pub struct ApiError {
    pub status: u16,
    /// The status and the API's message, as shown to the user.
    pub message: String,
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ApiError {}

/// No coordinator answered (or each answered 503): worth retrying later.
#[derive(Debug)]
pub struct Unreachable(pub String);

impl std::fmt::Display for Unreachable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "no coordinator answered: {}", self.0)
    }
}

impl std::error::Error for Unreachable {}
/// The message of an API error body, with the field at fault; the body itself otherwise.
fn error_message(bytes: &[u8]) -> String {
    match serde_json::from_slice::<ErrorBody>(bytes) {
        Ok(body) => match body.error.field {
            Some(field) => format!("{} (field `{field}`)", body.error.message),
            None => body.error.message,
        },
        Err(_) => String::from_utf8_lossy(bytes).into_owned(),
    }
}
