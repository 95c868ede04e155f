//! `gantry workload train|infer|serve`: small, real ML programs built into the binary, so that a
//! fleet — or a `FROM scratch` image holding only `gantry` — can run an end-to-end ML job with
//! no files from outside, no network and no Python: logistic regression on a generated, seeded
//! data set of two Gaussian classes.
//!
//! - `train` generates the training set, fits the model by full-batch gradient descent, prints
//!   loss and accuracy as it goes and writes `model.json`.
//! - `infer` scores its shard of a generated inference set and writes `predictions-<index>.jsonl`.
//! - `serve` answers `GET /healthz` and `POST /predict` over HTTP until SIGTERM.
//!
//! Where they read and write: `--model` defaults to `$GANTRY_INPUT_DIR/model.json`, `--out` to
//! `$GANTRY_OUTPUT_DIR`; either falls back to the current directory (a process-runtime unit's
//! own work directory) when its variable is unset. Flags override the variables.
//!
//! Deliberately absent: data parallelism. In a training gang every rank (`RANK` of
//! `WORLD_SIZE`) trains the same model on the same generated data, and only rank 0 writes it;
//! the ranks do not exchange gradients. What the gang shows is placement, ranks and restarts,
//! not a speed-up.
//!
//! The learning code is pure (data set, training, prediction, sharding); `run` is the shell that
//! reads flags and files and prints.

use anyhow::{bail, ensure, Context, Result};
use clap::{Args, Subcommand};
use gantry_coordinator::api::types::{ErrorBody, ErrorDetail};
use serde::{Deserialize, Serialize};
use std::future::Future;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Features per row of the generated data sets.
pub const N_FEATURES: usize = 8;
/// Half the distance between the two classes' means, per feature. Class 1 is centred on
/// `+CLASS_OFFSETS`, class 0 on `-CLASS_OFFSETS`, both with unit variance; the means are about 3.9
/// standard deviations apart, so the best possible accuracy is about 97.5%. Feature 3 carries
/// no signal at all: a trained model's weight for it stays near zero.
const CLASS_OFFSETS: [f64; N_FEATURES] = [1.2, -0.8, 0.6, 0.0, 0.9, -0.4, 0.3, 0.6];
/// Names the model file's format, so a reader can refuse another one.
pub const MODEL_FORMAT: &str = "gantry-logistic-regression/1";
pub const MODEL_FILE: &str = "model.json";
/// Rows of a generated data set, at most (bounds memory: 1M rows is 64 MiB of features).
const ROWS_MAX: usize = 1_000_000;
const EPOCHS_MAX: u32 = 100_000;
/// `serve` refuses bodies above this (a prediction request is a few hundred bytes).
const REQUEST_BYTES_MAX: usize = 64 * 1024;

#[derive(Args)]
pub struct WorkloadArgs {
    #[command(subcommand)]
    command: WorkloadCommand,
}

#[derive(Subcommand)]
enum WorkloadCommand {
    /// Train a logistic regression on a generated, seeded data set and write model.json.
    ///
    /// In a training job (WORLD_SIZE and RANK set) every rank trains the same model and only
    /// rank 0 writes it: the ranks exchange nothing.
    Train(TrainArgs),
    /// Score this shard's rows of a generated inference set; write predictions-<index>.jsonl.
    ///
    /// Row i belongs to shard i % SHARD_COUNT, so the shards of a batch job partition the set.
    Infer(InferArgs),
    /// Serve the model over HTTP: GET /healthz, POST /predict {"features": [...]}.
    Serve(ServeArgs),
}

#[derive(Args)]
struct TrainArgs {
    /// Directory for model.json [default: $GANTRY_OUTPUT_DIR, else the current directory].
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Seed of the generated training set.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Rows of the training set.
    #[arg(long, default_value_t = 4000, value_parser = clap::value_parser!(u64).range(1..=ROWS_MAX as u64))]
    rows: u64,
    /// Passes of gradient descent over the whole set.
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u32).range(1..=EPOCHS_MAX as i64))]
    epochs: u32,
    #[arg(long, default_value_t = 0.5)]
    learning_rate: f64,
    /// Print loss and accuracy every this many epochs (and after the last).
    #[arg(long, default_value_t = 25, value_parser = clap::value_parser!(u32).range(1..))]
    log_every: u32,
    /// This worker's rank; only rank 0 writes the model.
    #[arg(long, env = "RANK", default_value_t = 0)]
    rank: u32,
    /// Workers in the training gang.
    #[arg(long, env = "WORLD_SIZE", default_value_t = 1)]
    world_size: u32,
}

#[derive(Args)]
struct InferArgs {
    /// The model file [default: $GANTRY_INPUT_DIR/model.json, else ./model.json].
    #[arg(long, value_name = "PATH")]
    model: Option<PathBuf>,
    /// Directory for predictions-<index>.jsonl [default: $GANTRY_OUTPUT_DIR, else the current
    /// directory].
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Seed of the generated inference set (another set than the training one).
    #[arg(long, default_value_t = 2)]
    seed: u64,
    /// Rows of the whole inference set, over all shards.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=ROWS_MAX as u64))]
    rows: u64,
    /// This shard's index.
    #[arg(long, env = "SHARD_INDEX", default_value_t = 0)]
    shard_index: u32,
    /// Shards in the job.
    #[arg(long, env = "SHARD_COUNT", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    shard_count: u32,
    /// Score at most this many rows a second, as a stand-in for a heavier model: a shard then
    /// runs long enough to watch it, or to lose it (`gantry demo` uses it). Unpaced when absent.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    rows_per_second: Option<u32>,
}

#[derive(Args)]
struct ServeArgs {
    /// The model file [default: $GANTRY_INPUT_DIR/model.json, else ./model.json].
    #[arg(long, value_name = "PATH")]
    model: Option<PathBuf>,
    /// Port to listen on (a serving replica is given one in PORT).
    #[arg(long, env = "PORT", default_value_t = 8080)]
    port: u16,
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0")]
    host: std::net::IpAddr,
}

/// A trained logistic regression, as `model.json` holds it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Model {
    /// [`MODEL_FORMAT`].
    pub format: String,
    pub n_features: usize,
    pub weights: Vec<f64>,
    pub bias: f64,
    /// Accuracy on the training set after the last epoch.
    pub train_accuracy: f64,
    /// Mean log loss on the training set after the last epoch.
    pub train_loss: f64,
    /// Seed and size of the generated training set.
    pub seed: u64,
    pub n_rows: usize,
    pub epochs: u32,
}

impl Model {
    /// Parses `model.json`, refusing a file whose shape does not make a usable model.
    pub fn from_json(text: &str) -> Result<Self> {
        let model: Model = serde_json::from_str(text).context("parse the model")?;
        ensure!(
            model.format == MODEL_FORMAT,
            "field `format`: must be {MODEL_FORMAT:?}, got {:?}",
            model.format
        );
        ensure!(
            model.weights.len() == model.n_features && model.n_features > 0,
            "field `weights`: must have `n_features` ({}) entries, got {}",
            model.n_features,
            model.weights.len()
        );
        ensure!(
            model.weights.iter().all(|w| w.is_finite()) && model.bias.is_finite(),
            "fields `weights` and `bias` must be finite numbers"
        );
        Ok(model)
    }

    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("read the model {}", path.display()))?;
        Self::from_json(&text).with_context(|| format!("load the model {}", path.display()))
    }
}

/// The probability that `features` belong to class 1.
///
/// Panics when `features` does not have the model's `n_features` entries (callers check input).
pub fn predict(model: &Model, features: &[f64]) -> f64 {
    assert_eq!(
        features.len(),
        model.n_features,
        "predict needs one value per feature"
    );
    sigmoid(linear(&model.weights, model.bias, features))
}

fn linear(weights: &[f64], bias: f64, features: &[f64]) -> f64 {
    weights
        .iter()
        .zip(features)
        .map(|(w, x)| w * x)
        .sum::<f64>()
        + bias
}

/// The logistic function, written so that neither branch overflows.
fn sigmoid(z: f64) -> f64 {
    if z >= 0.0 {
        1.0 / (1.0 + (-z).exp())
    } else {
        let e = z.exp();
        e / (1.0 + e)
    }
}

/// SplitMix64: a tiny generator whose sequence is fixed by its definition, so a seed means the
/// same data set in every build (a library generator may change its algorithm between versions).
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1]: never 0, so its logarithm is finite.
    fn next_unit(&mut self) -> f64 {
        ((self.next_u64() >> 11) + 1) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal (Box–Muller; the second value of each pair is dropped for simplicity).
    fn next_gaussian(&mut self) -> f64 {
        let (u1, u2) = (self.next_unit(), self.next_unit());
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
}

/// A generated data set: rows of [`N_FEATURES`] features and their true class.
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    pub features: Vec<[f64; N_FEATURES]>,
    pub labels: Vec<u8>,
}

impl Dataset {
    /// `n_rows` rows, each of class 0 or 1 with equal chance, its features drawn around its
    /// class's mean. The same seed and size give the same rows.
    pub fn generate(seed: u64, n_rows: usize) -> Self {
        let mut rng = SplitMix64(seed);
        let mut features = Vec::with_capacity(n_rows);
        let mut labels = Vec::with_capacity(n_rows);
        for _ in 0..n_rows {
            let label = (rng.next_u64() >> 63) as u8;
            let sign = if label == 1 { 1.0 } else { -1.0 };
            features.push(CLASS_OFFSETS.map(|offset| sign * offset + rng.next_gaussian()));
            labels.push(label);
        }
        Self { features, labels }
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }
}

#[derive(Debug, Clone, Copy)]
pub struct TrainConfig {
    pub epochs: u32,
    pub learning_rate: f64,
}

/// Where training stands after an epoch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EpochReport {
    pub epoch: u32,
    pub loss: f64,
    pub accuracy: f64,
}

/// Full-batch gradient descent on the mean log loss, from zero weights. `on_epoch` sees each
/// epoch's loss and accuracy on the whole set, measured after that epoch's step.
pub fn train(
    data: &Dataset,
    seed: u64,
    config: TrainConfig,
    mut on_epoch: impl FnMut(EpochReport),
) -> Model {
    assert!(data.len() > 0, "training needs at least one row");
    let n_rows = data.len() as f64;
    let mut weights = [0.0; N_FEATURES];
    let mut bias = 0.0;
    let mut last = EpochReport {
        epoch: 0,
        loss: f64::NAN,
        accuracy: 0.0,
    };
    for epoch in 1..=config.epochs {
        let mut weight_gradient = [0.0; N_FEATURES];
        let mut bias_gradient = 0.0;
        for (row, &label) in data.features.iter().zip(&data.labels) {
            let error = sigmoid(linear(&weights, bias, row)) - f64::from(label);
            for (gradient, x) in weight_gradient.iter_mut().zip(row) {
                *gradient += error * x;
            }
            bias_gradient += error;
        }
        for (weight, gradient) in weights.iter_mut().zip(weight_gradient) {
            *weight -= config.learning_rate * gradient / n_rows;
        }
        bias -= config.learning_rate * bias_gradient / n_rows;
        let (loss, accuracy) = evaluate(&weights, bias, data);
        last = EpochReport {
            epoch,
            loss,
            accuracy,
        };
        on_epoch(last);
    }
    Model {
        format: MODEL_FORMAT.into(),
        n_features: N_FEATURES,
        weights: weights.to_vec(),
        bias,
        train_accuracy: last.accuracy,
        train_loss: last.loss,
        seed,
        n_rows: data.len(),
        epochs: config.epochs,
    }
}

/// Mean log loss and accuracy of a model on a data set.
fn evaluate(weights: &[f64], bias: f64, data: &Dataset) -> (f64, f64) {
    let mut loss = 0.0;
    let mut correct = 0usize;
    for (row, &label) in data.features.iter().zip(&data.labels) {
        let p = sigmoid(linear(weights, bias, row)).clamp(1e-12, 1.0 - 1e-12);
        loss -= if label == 1 { p.ln() } else { (1.0 - p).ln() };
        correct += usize::from(u8::from(p >= 0.5) == label);
    }
    let n_rows = data.len() as f64;
    (loss / n_rows, correct as f64 / n_rows)
}

/// The rows of shard `shard_idx` of `n_shards`: row i belongs to shard i % n_shards.
pub fn shard_rows(n_rows: usize, shard_idx: u32, n_shards: u32) -> impl Iterator<Item = usize> {
    assert!(
        n_shards > 0 && shard_idx < n_shards,
        "shard {shard_idx} of {n_shards}"
    );
    (shard_idx as usize..n_rows).step_by(n_shards as usize)
}

/// One line of `predictions-<index>.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Prediction {
    /// The row's index in the whole inference set.
    pub row: usize,
    pub probability: f64,
    pub label: u8,
}

pub async fn run(args: WorkloadArgs) -> Result<()> {
    match args.command {
        WorkloadCommand::Train(args) => run_train(args),
        WorkloadCommand::Infer(args) => run_infer(args),
        WorkloadCommand::Serve(args) => run_serve(args).await,
    }
}

/// `--out`, else `$GANTRY_OUTPUT_DIR`, else the current directory; created if missing.
fn output_dir(flag: Option<PathBuf>) -> Result<PathBuf> {
    let dir = flag
        .or_else(|| non_empty_env("GANTRY_OUTPUT_DIR").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("."));
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("create the output directory {}", dir.display()))?;
    Ok(dir)
}

/// `--model`, else `$GANTRY_INPUT_DIR/model.json`, else `./model.json`.
fn model_path(flag: Option<PathBuf>) -> PathBuf {
    flag.unwrap_or_else(|| {
        non_empty_env("GANTRY_INPUT_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("."))
            .join(MODEL_FILE)
    })
}

fn non_empty_env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|value| !value.is_empty())
}

/// Writes a file whole or not at all: what collects outputs never sees half of one.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let partial = path.with_extension("partial");
    std::fs::write(&partial, bytes).with_context(|| format!("write {}", partial.display()))?;
    std::fs::rename(&partial, path).with_context(|| format!("write {}", path.display()))
}

fn run_train(args: TrainArgs) -> Result<()> {
    ensure!(
        args.learning_rate.is_finite() && args.learning_rate > 0.0,
        "--learning-rate must be a positive number, got {}",
        args.learning_rate
    );
    ensure!(
        args.rank < args.world_size,
        "RANK ({}) must be less than WORLD_SIZE ({})",
        args.rank,
        args.world_size
    );
    // Rank 0 alone writes; check where before spending the time to train.
    let out = if args.rank == 0 {
        Some(output_dir(args.out)?)
    } else {
        None
    };
    let started = Instant::now();
    let data = Dataset::generate(args.seed, args.rows as usize);
    println!(
        "rank {} of {}: training logistic regression on {} generated rows ({N_FEATURES} features, seed {}), {} epochs",
        args.rank,
        args.world_size,
        data.len(),
        args.seed,
        args.epochs
    );
    let config = TrainConfig {
        epochs: args.epochs,
        learning_rate: args.learning_rate,
    };
    let model = train(&data, args.seed, config, |report| {
        if report.epoch % args.log_every == 0 || report.epoch == args.epochs {
            println!(
                "epoch {:>5}/{}  loss {:.4}  accuracy {:.4}",
                report.epoch, args.epochs, report.loss, report.accuracy
            );
        }
    });
    println!(
        "trained in {:.2} s: accuracy {:.4}, loss {:.4}",
        started.elapsed().as_secs_f64(),
        model.train_accuracy,
        model.train_loss
    );
    match out {
        Some(dir) => {
            let path = dir.join(MODEL_FILE);
            let mut json = serde_json::to_vec_pretty(&model).context("encode the model")?;
            json.push(b'\n');
            write_atomically(&path, &json)?;
            println!("wrote {}", path.display());
        }
        None => println!(
            "rank {} does not write the model: rank 0 does (every rank trained the same one)",
            args.rank
        ),
    }
    Ok(())
}

fn run_infer(args: InferArgs) -> Result<()> {
    if args.shard_index >= args.shard_count {
        bail!(
            "SHARD_INDEX ({}) must be less than SHARD_COUNT ({})",
            args.shard_index,
            args.shard_count
        );
    }
    let model = Model::load(&model_path(args.model))?;
    ensure!(
        model.n_features == N_FEATURES,
        "the model has {} features; the generated inference set has {N_FEATURES}",
        model.n_features
    );
    let out = output_dir(args.out)?;
    let data = Dataset::generate(args.seed, args.rows as usize);
    let mut lines = Vec::new();
    let (mut n_rows, mut n_positive, mut n_agree) = (0usize, 0usize, 0usize);
    let started = Instant::now();
    for row in shard_rows(data.len(), args.shard_index, args.shard_count) {
        if let Some(rate) = args.rows_per_second {
            let due = std::time::Duration::from_secs_f64(n_rows as f64 / f64::from(rate));
            if let Some(ahead) = due.checked_sub(started.elapsed()) {
                std::thread::sleep(ahead);
            }
        }
        let probability = predict(&model, &data.features[row]);
        let label = u8::from(probability >= 0.5);
        n_rows += 1;
        n_positive += usize::from(label);
        n_agree += usize::from(label == data.labels[row]);
        serde_json::to_writer(
            &mut lines,
            &Prediction {
                row,
                probability,
                label,
            },
        )
        .context("encode a prediction")?;
        lines.push(b'\n');
    }
    let path = out.join(format!("predictions-{}.jsonl", args.shard_index));
    write_atomically(&path, &lines)?;
    let rate = |count: usize| {
        if n_rows == 0 {
            0.0
        } else {
            count as f64 / n_rows as f64
        }
    };
    println!(
        "shard {} of {}: {n_rows} rows, positive rate {:.4}, agreement with the generated labels {:.4}; wrote {}",
        args.shard_index,
        args.shard_count,
        rate(n_positive),
        rate(n_agree),
        path.display()
    );
    Ok(())
}

async fn run_serve(args: ServeArgs) -> Result<()> {
    let path = model_path(args.model);
    let model = Model::load(&path)?;
    let addr = std::net::SocketAddr::new(args.host, args.port);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("listen on {addr}"))?;
    println!(
        "serving {} ({} features, training accuracy {:.4}) on http://{addr}: GET /healthz, POST /predict",
        path.display(),
        model.n_features,
        model.train_accuracy
    );
    serve(listener, model, crate::shutdown_signal()).await?;
    println!("stopped");
    Ok(())
}

/// Serves `model` on `listener` until `shutdown` completes, then finishes the requests in flight.
pub async fn serve(
    listener: tokio::net::TcpListener,
    model: Model,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    use axum::routing::{get, post};
    let model = std::sync::Arc::new(model);
    let router = axum::Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/predict",
            post(move |body: axum::body::Bytes| {
                let model = model.clone();
                async move { handle_predict(&model, &body) }
            }),
        )
        .layer(axum::extract::DefaultBodyLimit::max(REQUEST_BYTES_MAX))
        .layer(axum::middleware::from_fn(log_request));
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
        .context("serve HTTP")
}

/// One line per request on stdout: method, path, status, time taken.
async fn log_request(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let started = Instant::now();
    let (method, path) = (request.method().clone(), request.uri().path().to_string());
    let response = next.run(request).await;
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(
        stdout,
        "{method} {path} {} {:.2}ms",
        response.status().as_u16(),
        started.elapsed().as_secs_f64() * 1000.0
    );
    response
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct PredictResponse {
    pub probability: f64,
    pub label: u8,
}

fn handle_predict(model: &Model, body: &[u8]) -> axum::response::Response {
    use axum::http::StatusCode;
    use axum::response::IntoResponse;
    match parse_features(body, model.n_features) {
        Ok(features) => {
            let probability = predict(model, &features);
            axum::Json(PredictResponse {
                probability,
                label: u8::from(probability >= 0.5),
            })
            .into_response()
        }
        Err((field, message)) => (
            StatusCode::BAD_REQUEST,
            axum::Json(ErrorBody {
                error: ErrorDetail {
                    code: "invalid_request".into(),
                    message,
                    field,
                },
            }),
        )
            .into_response(),
    }
}

/// The features of a `{"features": [...]}` body, or the field at fault (if any) and why.
fn parse_features(body: &[u8], n_features: usize) -> Result<Vec<f64>, (Option<String>, String)> {
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| (None, format!("the body is not JSON: {e}")))?;
    let serde_json::Value::Object(fields) = value else {
        return Err((
            None,
            format!("the body must be a JSON object {{\"features\": [{n_features} numbers]}}"),
        ));
    };
    if let Some(unknown) = fields.keys().find(|key| *key != "features") {
        return Err((
            Some(unknown.clone()),
            "is not a known field; expected `features`".into(),
        ));
    }
    let field = || Some("features".to_string());
    let list = match fields.get("features") {
        None => return Err((field(), "is required".into())),
        Some(serde_json::Value::Array(list)) => list,
        Some(other) => {
            return Err((
                field(),
                format!("must be a list of {n_features} numbers, got {other}"),
            ))
        }
    };
    if list.len() != n_features {
        return Err((
            field(),
            format!(
                "must have {n_features} numbers (the model's features), got {}",
                list.len()
            ),
        ));
    }
    list.iter()
        .enumerate()
        .map(|(idx, value)| {
            value.as_f64().ok_or_else(|| {
                (
                    Some(format!("features[{idx}]")),
                    format!("must be a number, got {value}"),
                )
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trained() -> Model {
        let data = Dataset::generate(1, 4000);
        let config = TrainConfig {
            epochs: 300,
            learning_rate: 0.5,
        };
        train(&data, 1, config, |_| {})
    }

    #[test]
    fn training_separates_the_classes() {
        let model = trained();
        assert!(model.train_accuracy > 0.9, "{model:?}");
        // Held-out rows from another seed score about as well.
        let held_out = Dataset::generate(99, 2000);
        let correct = held_out
            .features
            .iter()
            .zip(&held_out.labels)
            .filter(|(row, &label)| u8::from(predict(&model, &row[..]) >= 0.5) == label)
            .count();
        assert!(correct as f64 / 2000.0 > 0.9, "{correct} of 2000");
        // The feature without signal gets a small weight next to the informative ones.
        assert!(
            model.weights[3].abs() < 0.2 * model.weights[0].abs(),
            "{model:?}"
        );
    }

    #[test]
    fn training_reports_falling_loss() {
        let data = Dataset::generate(1, 500);
        let mut reports = Vec::new();
        let config = TrainConfig {
            epochs: 50,
            learning_rate: 0.5,
        };
        let model = train(&data, 1, config, |report| reports.push(report));
        assert_eq!(reports.len(), 50);
        assert!(reports[49].loss < reports[0].loss, "{reports:?}");
        assert_eq!(reports[49].accuracy, model.train_accuracy);
        assert_eq!(reports[49].loss, model.train_loss);
    }

    #[test]
    fn the_same_seed_gives_the_same_model_bit_for_bit() {
        let (first, second) = (trained(), trained());
        let bits = |model: &Model| -> Vec<u64> {
            model
                .weights
                .iter()
                .chain([&model.bias])
                .map(|x| x.to_bits())
                .collect()
        };
        assert_eq!(bits(&first), bits(&second));
        assert_eq!(first, second);
        let other = train(
            &Dataset::generate(2, 4000),
            2,
            TrainConfig {
                epochs: 300,
                learning_rate: 0.5,
            },
            |_| {},
        );
        assert_ne!(bits(&first), bits(&other));
    }

    #[test]
    fn the_model_file_round_trips_exactly_and_bad_ones_are_refused() {
        let model = trained();
        let json = serde_json::to_string_pretty(&model).unwrap();
        assert_eq!(Model::from_json(&json).unwrap(), model);

        let mut value: serde_json::Value = serde_json::from_str(&json).unwrap();
        value["weights"] = serde_json::json!([1.0, 2.0]);
        let err = Model::from_json(&value.to_string()).unwrap_err();
        assert!(format!("{err:#}").contains("field `weights`"), "{err:#}");
        value["format"] = "something-else/2".into();
        let err = Model::from_json(&value.to_string()).unwrap_err();
        assert!(format!("{err:#}").contains("field `format`"), "{err:#}");
        assert!(Model::from_json("{}").is_err());
    }

    #[test]
    fn shards_partition_the_inference_rows() {
        for (n_rows, n_shards) in [(10_000, 1), (10_000, 4), (10_000, 7), (5, 8), (0, 3)] {
            let mut seen = vec![0u32; n_rows];
            for shard_idx in 0..n_shards {
                for row in shard_rows(n_rows, shard_idx, n_shards) {
                    assert_eq!(row % n_shards as usize, shard_idx as usize);
                    seen[row] += 1;
                }
            }
            assert!(
                seen.iter().all(|&count| count == 1),
                "{n_rows} rows in {n_shards} shards: every row exactly once"
            );
        }
    }

    #[test]
    fn predict_is_the_logistic_of_the_linear_score() {
        let model = Model {
            format: MODEL_FORMAT.into(),
            n_features: 2,
            weights: vec![2.0, -1.0],
            bias: 0.5,
            train_accuracy: 1.0,
            train_loss: 0.0,
            seed: 0,
            n_rows: 0,
            epochs: 0,
        };
        assert_eq!(predict(&model, &[0.0, 0.5]), 0.5);
        let p = predict(&model, &[1.0, 0.0]);
        assert!((p - 1.0 / (1.0 + (-2.5f64).exp())).abs() < 1e-15);
        // Far from the boundary neither overflows to NaN.
        assert_eq!(predict(&model, &[1e308, 0.0]), 1.0);
        assert_eq!(predict(&model, &[-1e308, 0.0]), 0.0);
    }

    async fn post(client: &reqwest::Client, base: &str, body: &str) -> (u16, serde_json::Value) {
        let response = client
            .post(format!("{base}/predict"))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap())
    }

    #[tokio::test]
    async fn serve_answers_health_and_predictions_and_names_bad_fields() {
        let model = trained();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, model.clone(), async {
            let _ = stopped.await;
        }));
        let client = reqwest::Client::new();

        let health = client.get(format!("{base}/healthz")).send().await.unwrap();
        assert_eq!(health.status(), 200);

        let features = Dataset::generate(7, 1).features[0];
        let (status, answer) = post(
            &client,
            &base,
            &serde_json::json!({ "features": features }).to_string(),
        )
        .await;
        assert_eq!(status, 200, "{answer}");
        let served: PredictResponse = serde_json::from_value(answer).unwrap();
        let direct = predict(&model, &features);
        // Through JSON and back, the probability may differ in its last bit at most.
        assert!(
            (served.probability - direct).abs() < 1e-12,
            "{served:?} vs {direct}"
        );
        assert_eq!(served.label, u8::from(direct >= 0.5));

        for (body, field, needle) in [
            (
                "{\"features\": [1, 2, 3]}",
                Some("features"),
                "must have 8 numbers",
            ),
            ("not json", None, "not JSON"),
            ("[1, 2]", None, "JSON object"),
            ("{}", Some("features"), "is required"),
            (
                "{\"features\": 3}",
                Some("features"),
                "must be a list of 8 numbers",
            ),
            (
                "{\"features\": [1, 2, 3, \"four\", 5, 6, 7, 8]}",
                Some("features[3]"),
                "must be a number",
            ),
            (
                "{\"features\": [1, 2, 3, 4, 5, 6, 7, 8], \"extra\": 1}",
                Some("extra"),
                "not a known field",
            ),
        ] {
            let (status, answer) = post(&client, &base, body).await;
            assert_eq!(status, 400, "{body}: {answer}");
            let error: ErrorBody = serde_json::from_value(answer.clone()).unwrap();
            assert_eq!(error.error.field.as_deref(), field, "{body}: {answer}");
            assert!(error.error.message.contains(needle), "{body}: {answer}");
        }

        let _ = stop.send(());
        tokio::time::timeout(std::time::Duration::from_secs(10), server)
            .await
            .expect("the server stops once asked")
            .unwrap()
            .unwrap();
    }
}
