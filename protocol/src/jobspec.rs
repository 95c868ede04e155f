//! The job spec: what a user submits (as YAML, TOML or JSON), its validation with errors that name
//! the field, and its canonical form.
//!
//! ```yaml
//! name: resnet50
//! team: vision
//! kind: training                       # or batch, serving
//! image: registry.local/vision/train@sha256:4f1c...
//! command: ["torchrun", "train.py", "--epochs", "90"]
//! resources: { gpus: 4, cpus: 16, memory: 64GiB }    # for each worker, shard or replica
//! training: { workers: 2, max_restarts: 3 }
//! placement: { prefer: cheapest, sites: [onprem-a, aws-us-east-1] }
//! ```
//!
//! A job's kind has its own section (`training`, `batch` or `serving`); only the one matching
//! `kind` may be given, and when it is absent its defaults apply.
//!
//! [`parse_spec`] parses and validates. A validated spec is canonical: every default is written
//! out, the kind's section is present, sizes are printed one way. Two submissions that mean the
//! same job therefore serialize to the same JSON ([`JobSpec::canonical_json`]), which is what an
//! idempotent submission compares.

use crate::units::{format_bytes, parse_bytes};
use serde::de::{self, Unexpected};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::collections::BTreeMap;
use std::fmt;
use std::ops::RangeInclusive;
use std::path::Path;

/// A spec document may not be larger than this (the HTTP API's body limit is 1 MiB as well).
pub const SPEC_BYTES_MAX: usize = 1 << 20;
/// Job and team names are DNS labels, so that they can name containers and Kubernetes objects.
pub const NAME_CHARS_MAX: usize = 63;
pub const ENV_VARS_MAX: usize = 256;
pub const COMMAND_ARGS_MAX: usize = 4096;
pub const SITES_MAX: usize = 64;
/// Per worker, shard or replica.
pub const GPUS_PER_UNIT_MAX: u32 = 64;
/// Per worker, shard or replica: 1024 CPUs.
pub const CPU_MILLIS_PER_UNIT_MAX: u32 = 1_024_000;
/// Per worker, shard or replica: 64 TiB, far above any single machine today (a bound on typos).
pub const MEMORY_BYTES_PER_UNIT_MAX: u64 = 64 << 40;
pub const PRIORITY_RANGE: RangeInclusive<i32> = -1000..=1000;
pub const WORKERS_MAX: u32 = 1024;
pub const SHARDS_MAX: u32 = 100_000;
pub const REPLICAS_MAX: u32 = 1000;
/// Bounds `training.max_restarts` and `batch.max_retries`.
pub const RETRIES_MAX: u32 = 1000;

/// A job spec as submitted, with defaults filled in. Call [`JobSpec::validate`] (or use
/// [`parse_spec`]) before trusting it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a job spec (a mapping of fields)")]
pub struct JobSpec {
    pub name: String,
    #[serde(default = "default_team")]
    pub team: String,
    pub kind: JobKind,
    /// A container image; without one the job runs `command` as a plain process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default)]
    pub command: Vec<String>,
    #[serde(default, deserialize_with = "env_without_duplicates")]
    pub env: BTreeMap<String, String>,
    /// What each worker, shard or replica needs.
    #[serde(default)]
    pub resources: Resources,
    #[serde(default)]
    pub placement: Placement,
    #[serde(default)]
    pub priority: i32,
    #[serde(default)]
    pub preemptible: bool,
    /// The agent may pull `image` from its registry when the image is not present on the node.
    /// Off by default: Gantry is offline first, and an image is loaded on the agent host
    /// (`gantry images load`) or already there. An agent's `allow_pull` allows it for every job.
    #[serde(default, skip_serializing_if = "is_false")]
    pub pull: bool,
    /// Files each unit leaves in `$GANTRY_OUTPUT_DIR` that become the job's artifacts when the
    /// unit succeeds: names, or patterns with one `*` (`predictions-*.jsonl`, for shards). A
    /// name without `*` that a succeeded unit did not write fails that unit. In a training gang
    /// only rank 0 leaves them (the other ranks' directories are not collected).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub outputs: Vec<String>,
    /// Artifacts of earlier jobs placed in `$GANTRY_INPUT_DIR` before each unit starts, as
    /// `JOB/NAME`: JOB is a job id, or the name of the newest job by that name that holds the
    /// artifact. Resolved to a checksum when the job is accepted, so a rerun sees the same bytes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inputs: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub training: Option<Training>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch: Option<Batch>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serving: Option<Serving>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum JobKind {
    /// Workers that run together until the job finishes (distributed training).
    Training,
    /// Independent shards, each run to completion.
    Batch,
    /// Replicas kept running behind a port.
    Serving,
}

impl JobKind {
    pub const NAMES: &'static [&'static str] = &["training", "batch", "serving"];

    /// Also the name of the kind's section in a spec.
    pub fn as_str(self) -> &'static str {
        match self {
            JobKind::Training => "training",
            JobKind::Batch => "batch",
            JobKind::Serving => "serving",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        [JobKind::Training, JobKind::Batch, JobKind::Serving]
            .into_iter()
            .find(|kind| kind.as_str() == name)
    }
}

impl<'de> Deserialize<'de> for JobKind {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserialize_name(deserializer, Self::NAMES, Self::from_name)
    }
}

/// Outputs and inputs a job may declare, each.
pub const ARTIFACTS_DECLARED_MAX: usize = 16;

/// An artifact's name: a file name of `[A-Za-z0-9._-]`, at most 128 bytes, not `.` or `..`.
pub fn is_artifact_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Whether `name` matches an `outputs` entry (a name, or a pattern with one `*`).
pub fn output_matches(pattern: &str, name: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == name,
        Some((prefix, suffix)) => {
            name.len() >= prefix.len() + suffix.len()
                && name.starts_with(prefix)
                && name.ends_with(suffix)
        }
    }
}

fn validate_artifacts(outputs: &[String], inputs: &[String]) -> Result<(), SpecError> {
    for (field, list) in [("outputs", outputs), ("inputs", inputs)] {
        if list.len() > ARTIFACTS_DECLARED_MAX {
            return Err(SpecError::new(
                field,
                format!(
                    "must have at most {ARTIFACTS_DECLARED_MAX} entries, got {}",
                    list.len()
                ),
            ));
        }
    }
    for (i, output) in outputs.iter().enumerate() {
        let stars = output.matches('*').count();
        if stars > 1 || !is_artifact_name(&output.replace('*', "x")) {
            return Err(SpecError::new(
                format!("outputs[{i}]"),
                format!("must be a file name of letters, digits, '.', '_' and '-' (at most 128), with at most one '*', got {output:?}"),
            ));
        }
        if outputs[..i].contains(output) {
            return Err(SpecError::new(
                format!("outputs[{i}]"),
                format!("{output:?} is given twice"),
            ));
        }
    }
    for (i, input) in inputs.iter().enumerate() {
        let valid = input.split_once('/').is_some_and(|(job, name)| {
            !job.is_empty() && !job.contains('/') && is_artifact_name(name)
        });
        if !valid {
            return Err(SpecError::new(
                format!("inputs[{i}]"),
                format!("must be JOB/NAME (a job id or name, and an artifact's file name), got {input:?}"),
            ));
        }
        let name = &input[input.find('/').map_or(0, |i| i + 1)..];
        if inputs[..i]
            .iter()
            .any(|other| other.ends_with(&format!("/{name}")))
        {
            return Err(SpecError::new(
                format!("inputs[{i}]"),
                format!("another input is also named {name:?}: inputs share one directory"),
            ));
        }
    }
    Ok(())
}

fn is_false(value: &bool) -> bool {
    !value
}

/// What one worker, shard or replica needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a mapping of `gpus`, `gpu_model`, `cpus`, `memory`"
)]
pub struct Resources {
    #[serde(rename = "gpus", default)]
    pub n_gpus: u32,
    /// Such as "A100"; any model when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_model: Option<String>,
    /// Thousandths of a CPU; written as a number of CPUs (`cpus: 0.5` is 500).
    #[serde(
        rename = "cpus",
        default = "default_cpu_millis",
        with = "cpus_as_number"
    )]
    pub cpu_millis: u32,
    /// Written as a size ("64GiB") or a whole number of bytes.
    #[serde(
        rename = "memory",
        default = "default_memory_bytes",
        with = "memory_as_size"
    )]
    pub memory_bytes: u64,
}

impl Default for Resources {
    fn default() -> Self {
        Self {
            n_gpus: 0,
            gpu_model: None,
            cpu_millis: default_cpu_millis(),
            memory_bytes: default_memory_bytes(),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PlacementPreference {
    #[default]
    Cheapest,
    OnPremFirst,
    Fastest,
}

impl PlacementPreference {
    pub const NAMES: &'static [&'static str] = &["cheapest", "on-prem-first", "fastest"];

    pub fn as_str(self) -> &'static str {
        match self {
            PlacementPreference::Cheapest => "cheapest",
            PlacementPreference::OnPremFirst => "on-prem-first",
            PlacementPreference::Fastest => "fastest",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        [
            PlacementPreference::Cheapest,
            PlacementPreference::OnPremFirst,
            PlacementPreference::Fastest,
        ]
        .into_iter()
        .find(|preference| preference.as_str() == name)
    }
}

impl<'de> Deserialize<'de> for PlacementPreference {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserialize_name(deserializer, Self::NAMES, Self::from_name)
    }
}

/// Reads one of `names` as a string. By hand rather than derived, so that a value of the wrong type
/// (`kind: 5` in JSON) is reported as such, not as serde_json's bare "expected value".
fn deserialize_name<'de, D: Deserializer<'de>, T>(
    deserializer: D,
    names: &'static [&'static str],
    from_name: fn(&str) -> Option<T>,
) -> Result<T, D::Error> {
    struct NameVisitor<T> {
        names: &'static [&'static str],
        from_name: fn(&str) -> Option<T>,
    }

    impl<T> de::Visitor<'_> for NameVisitor<T> {
        type Value = T;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            let quoted: Vec<String> = self.names.iter().map(|name| format!("`{name}`")).collect();
            write!(f, "one of {}", quoted.join(", "))
        }

        fn visit_str<E: de::Error>(self, name: &str) -> Result<T, E> {
            (self.from_name)(name).ok_or_else(|| E::unknown_variant(name, self.names))
        }
    }

    deserializer.deserialize_str(NameVisitor { names, from_name })
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a mapping of `sites`, `prefer`, `max_cost_per_hour`"
)]
pub struct Placement {
    /// Sites the job may run in; empty means anywhere.
    #[serde(default)]
    pub sites: Vec<String>,
    #[serde(default)]
    pub prefer: PlacementPreference,
    /// For the whole job, in the currency of the sites' cost settings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_cost_per_hour: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a mapping of `workers`, `max_restarts`"
)]
pub struct Training {
    #[serde(rename = "workers", default = "one")]
    pub n_workers: u32,
    /// Restarts of the whole job after a worker fails, before the job fails.
    #[serde(default = "three")]
    pub max_restarts: u32,
}

impl Default for Training {
    fn default() -> Self {
        Self {
            n_workers: one(),
            max_restarts: three(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a mapping of `shards`, `parallelism`, `max_retries`"
)]
pub struct Batch {
    #[serde(rename = "shards", default = "one")]
    pub n_shards: u32,
    /// Shards run at once; all of them when absent (validation writes that out).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parallelism: Option<u32>,
    /// Retries of each shard.
    #[serde(default = "three")]
    pub max_retries: u32,
}

impl Default for Batch {
    fn default() -> Self {
        Self {
            n_shards: one(),
            parallelism: None,
            max_retries: three(),
        }
    }
}

impl Batch {
    /// Shards run at once.
    pub fn parallelism(&self) -> u32 {
        self.parallelism.unwrap_or(self.n_shards)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a mapping of `replicas`, `port`, `health`, `max_surge`, `max_unavailable`"
)]
pub struct Serving {
    #[serde(rename = "replicas", default = "one")]
    pub n_replicas: u32,
    #[serde(default = "default_port")]
    pub port: u16,
    /// HTTP path answered with 2xx when a replica is healthy.
    #[serde(rename = "health", default = "default_health_path")]
    pub health_path: String,
    /// Replicas a rollout may add above `replicas`.
    #[serde(default = "one")]
    pub max_surge: u32,
    /// Replicas a rollout may take down below `replicas`.
    #[serde(default)]
    pub max_unavailable: u32,
}

impl Default for Serving {
    fn default() -> Self {
        Self {
            n_replicas: one(),
            port: default_port(),
            health_path: default_health_path(),
            max_surge: one(),
            max_unavailable: 0,
        }
    }
}

fn default_team() -> String {
    "default".into()
}

fn default_cpu_millis() -> u32 {
    1000
}

fn default_memory_bytes() -> u64 {
    1 << 30
}

fn default_port() -> u16 {
    8080
}

fn default_health_path() -> String {
    "/healthz".into()
}

fn one() -> u32 {
    1
}

fn three() -> u32 {
    3
}

/// A refusal of a spec, naming the field (`resources.gpus`, `env.PATH`, `command[0]`); `field` is
/// empty when the document as a whole is at fault (a syntax error, an empty document).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecError {
    pub field: String,
    pub reason: String,
}

impl SpecError {
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            f.write_str(&self.reason)
        } else {
            write!(f, "field `{}`: {}", self.field, self.reason)
        }
    }
}

impl std::error::Error for SpecError {}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SpecFormat {
    Yaml,
    Toml,
    Json,
}

impl SpecFormat {
    /// By extension: `.yaml`/`.yml`, `.toml`, `.json` (any case).
    pub fn from_path(path: &Path) -> Option<Self> {
        let extension = path.extension()?.to_str()?.to_ascii_lowercase();
        match extension.as_str() {
            "yaml" | "yml" => Some(SpecFormat::Yaml),
            "toml" => Some(SpecFormat::Toml),
            "json" => Some(SpecFormat::Json),
            _ => None,
        }
    }
}

/// Parses and validates a spec; the result is canonical (see [`JobSpec::validate`]).
pub fn parse_spec(text: &str, format: SpecFormat) -> Result<JobSpec, SpecError> {
    if text.len() > SPEC_BYTES_MAX {
        return Err(SpecError::new(
            "",
            format!(
                "the spec is {} bytes; at most {SPEC_BYTES_MAX} are allowed",
                text.len()
            ),
        ));
    }
    if text.trim().is_empty() {
        return Err(SpecError::new("", "the spec is empty"));
    }
    let mut spec = match format {
        SpecFormat::Yaml => deserialize_yaml(text)?,
        SpecFormat::Toml => deserialize_toml(text)?,
        SpecFormat::Json => deserialize_json(text)?,
    };
    spec.validate()?;
    Ok(spec)
}

/// Parses and validates a spec already decoded as JSON (an HTTP request body).
pub fn from_json_value(value: serde_json::Value) -> Result<JobSpec, SpecError> {
    let found = match &value {
        serde_json::Value::Object(_) => None,
        serde_json::Value::Array(_) => Some("a list"),
        serde_json::Value::String(_) => Some("a string"),
        serde_json::Value::Number(_) => Some("a number"),
        serde_json::Value::Bool(_) => Some("a boolean"),
        serde_json::Value::Null => Some("null"),
    };
    if let Some(found) = found {
        return Err(SpecError::new(
            "",
            format!("must be a job spec (a JSON object of fields), got {found}"),
        ));
    }
    let mut spec: JobSpec = serde_path_to_error::deserialize(value)
        .map_err(|err| serde_error(&err.path().to_string(), &err.inner().to_string(), None))?;
    spec.validate()?;
    Ok(spec)
}

fn deserialize_yaml(text: &str) -> Result<JobSpec, SpecError> {
    let deserializer = serde_yaml_ng::Deserializer::from_str(text);
    serde_path_to_error::deserialize(deserializer).map_err(|err| {
        let path = err.path().to_string();
        let inner = err.into_inner();
        let location = inner.location().map(|l| (l.line(), l.column()));
        let mut message = inner.to_string();
        // serde_yaml_ng writes the location after the message and, for its own errors, the path
        // before it; both are reported separately here.
        if let Some((line, column)) = location {
            message = message.replacen(&format!(" at line {line} column {column}"), "", 1);
        }
        // Its path is the mapping for an unknown field, the value otherwise.
        let ancestors = std::iter::successors(Some(path.as_str()), |p| {
            p.rfind(['.', '[']).map(|end| &p[..end])
        });
        for prefix in ancestors {
            if let Some(rest) = message.strip_prefix(&format!("{prefix}: ")) {
                message = rest.to_string();
                break;
            }
        }
        serde_error(&path, &message, location)
    })
}

fn deserialize_toml(text: &str) -> Result<JobSpec, SpecError> {
    let describe = |err: &toml::de::Error| {
        // TOML syntax errors span several lines ("unexpected `a`", "expected `digit`").
        let message = err
            .message()
            .lines()
            .map(str::trim)
            .filter(|line| !line.is_empty())
            .collect::<Vec<_>>()
            .join("; ");
        let location = err.span().map(|span| line_and_column(text, span.start));
        (message, location)
    };
    let deserializer = toml::Deserializer::parse(text).map_err(|err| {
        let (message, location) = describe(&err);
        serde_error(".", &message, location)
    })?;
    serde_path_to_error::deserialize(deserializer).map_err(|err| {
        let (message, location) = describe(err.inner());
        serde_error(&err.path().to_string(), &message, location)
    })
}

fn deserialize_json(text: &str) -> Result<JobSpec, SpecError> {
    // Serde also reads a struct from an array of its fields in order, which no one means here.
    if !text.trim_start().starts_with('{') {
        return Err(SpecError::new(
            "",
            "must be a job spec (a JSON object of fields)",
        ));
    }
    let describe = |err: &serde_json::Error| {
        let mut message = err.to_string();
        if err.line() == 0 {
            return (message, None);
        }
        let suffix = format!(" at line {} column {}", err.line(), err.column());
        if let Some(rest) = message.strip_suffix(&suffix) {
            message = rest.to_string();
        }
        (message, Some((err.line(), err.column())))
    };
    let mut deserializer = serde_json::Deserializer::from_str(text);
    let spec = serde_path_to_error::deserialize(&mut deserializer).map_err(|err| {
        let (message, location) = describe(err.inner());
        serde_error(&err.path().to_string(), &message, location)
    })?;
    deserializer.end().map_err(|err| {
        let (message, location) = describe(&err);
        serde_error(".", &message, location)
    })?;
    Ok(spec)
}

/// 1-based line and column (in characters) of a byte offset.
fn line_and_column(text: &str, offset: usize) -> (usize, usize) {
    let (mut line, mut column) = (1, 1);
    for (_, c) in text.char_indices().take_while(|(idx, _)| *idx < offset) {
        if c == '\n' {
            line += 1;
            column = 1;
        } else {
            column += 1;
        }
    }
    (line, column)
}

/// Turns a serde message at a path into a [`SpecError`] that reads as the validation errors do
/// ("must be …, got …").
fn serde_error(path: &str, message: &str, location: Option<(usize, usize)>) -> SpecError {
    // `?` stands for a key that could not be read (a syntax error inside a mapping).
    let mut field = path.to_string();
    while field == "." || field == "?" || field.ends_with(".?") {
        field.truncate(field.len().saturating_sub(2));
    }
    let mut location = location;
    let reason = if let Some(name) = message
        .strip_prefix("missing field `")
        .and_then(|rest| rest.strip_suffix('`'))
    {
        field = join_field(&field, name);
        // Serde reports a missing field at the end of its mapping, which points nowhere useful.
        location = None;
        "is required".to_string()
    } else if let Some(name) = message
        .strip_prefix("duplicate field `")
        .and_then(|rest| rest.strip_suffix('`'))
    {
        field = join_field(&field, name);
        "is given twice".to_string()
    } else if let Some((name, expected)) = message
        .strip_prefix("unknown field `")
        .and_then(|rest| rest.split_once("`, "))
    {
        if field.rsplit('.').next() != Some(name) {
            field = join_field(&field, name);
        }
        format!("is not a known field; {expected}")
    } else if let Some((variant, expected)) = message
        .strip_prefix("unknown variant `")
        .and_then(|rest| rest.split_once("`, expected "))
    {
        format!("must be {expected}, got `{variant}`")
    } else if let Some((found, expected)) = message
        .strip_prefix("invalid type: ")
        .or_else(|| message.strip_prefix("invalid value: "))
        .and_then(|rest| rest.rsplit_once(", expected "))
    {
        format!(
            "must be {}, got {}",
            expected_in_words(expected),
            found_in_words(found)
        )
    } else {
        message.to_string()
    };
    let reason = match location {
        Some((line, column)) => format!("{reason} (line {line}, column {column})"),
        None => reason,
    };
    SpecError { field, reason }
}

fn join_field(parent: &str, name: &str) -> String {
    if parent.is_empty() {
        name.to_string()
    } else {
        format!("{parent}.{name}")
    }
}

fn expected_in_words(expected: &str) -> &str {
    match expected {
        "u16" => "a whole number from 0 to 65535",
        "u32" => "a whole number from 0 to 4294967295",
        "i32" => "a whole number",
        "f64" => "a number",
        "a boolean" => "true or false",
        "a sequence" => "a list",
        "a map" => "a mapping",
        other => other,
    }
}

fn found_in_words(found: &str) -> &str {
    match found {
        "map" => "a mapping",
        "sequence" => "a list",
        "unit value" | "null" => "null",
        other => other,
    }
}

/// `cpus` is a number of CPUs in the spec and thousandths of a CPU in memory.
mod cpus_as_number {
    use super::*;

    pub fn serialize<S: Serializer>(cpu_millis: &u32, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_f64(f64::from(*cpu_millis) / 1000.0)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u32, D::Error> {
        let cpus = f64::deserialize(deserializer)?;
        cpu_millis_from_cpus(cpus).map_err(de::Error::custom)
    }
}

fn cpu_millis_from_cpus(cpus: f64) -> Result<u32, String> {
    let cpus_max = f64::from(CPU_MILLIS_PER_UNIT_MAX) / 1000.0;
    if !cpus.is_finite() || cpus <= 0.0 {
        return Err(format!("must be greater than 0, got {cpus}"));
    }
    if cpus > cpus_max {
        return Err(format!("must be at most {cpus_max}, got {cpus}"));
    }
    let millis = (cpus * 1000.0).round();
    if (cpus * 1000.0 - millis).abs() > 1e-6 || millis == 0.0 {
        return Err(format!("must be a multiple of 0.001, got {cpus}"));
    }
    // In range: 1 ..= CPU_MILLIS_PER_UNIT_MAX.
    Ok(millis as u32)
}

/// `memory` is a size ("64GiB") or a whole number of bytes in the spec, bytes in memory, and
/// printed in its largest exact binary unit.
mod memory_as_size {
    use super::*;

    pub fn serialize<S: Serializer>(bytes: &u64, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&format_bytes(*bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
        deserializer.deserialize_any(SizeVisitor)
    }

    struct SizeVisitor;

    impl de::Visitor<'_> for SizeVisitor {
        type Value = u64;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a size such as \"16GiB\" or a whole number of bytes")
        }

        fn visit_u64<E: de::Error>(self, bytes: u64) -> Result<u64, E> {
            Ok(bytes)
        }

        fn visit_i64<E: de::Error>(self, bytes: i64) -> Result<u64, E> {
            u64::try_from(bytes).map_err(|_| E::invalid_value(Unexpected::Signed(bytes), &self))
        }

        fn visit_str<E: de::Error>(self, text: &str) -> Result<u64, E> {
            parse_bytes(text).map_err(E::custom)
        }
    }
}

/// A map deserializes with the last of two equal keys winning; for `env` that hides a mistake.
fn env_without_duplicates<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<BTreeMap<String, String>, D::Error> {
    struct EnvVisitor;

    impl<'de> de::Visitor<'de> for EnvVisitor {
        type Value = BTreeMap<String, String>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a mapping of variable names to strings")
        }

        fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut env = BTreeMap::new();
            while let Some((key, value)) = map.next_entry::<String, String>()? {
                if env.contains_key(&key) {
                    return Err(de::Error::custom(format!("`{key}` is given twice")));
                }
                env.insert(key, value);
            }
            Ok(env)
        }
    }

    deserializer.deserialize_map(EnvVisitor)
}

impl JobSpec {
    /// Checks every field and puts the spec in canonical form: the section of its kind present
    /// with its defaults written out (a batch job's `parallelism` included). Idempotent.
    pub fn validate(&mut self) -> Result<(), SpecError> {
        check_label("name", &self.name)?;
        check_label("team", &self.team)?;
        self.validate_program()?;
        validate_env(&self.env)?;
        validate_resources(&self.resources)?;
        validate_placement(&self.placement)?;
        check_range("priority", self.priority, PRIORITY_RANGE)?;
        validate_artifacts(&self.outputs, &self.inputs)?;
        self.validate_kind_section()
    }

    /// `(job, name)` of each of `inputs`; call on a validated spec.
    pub fn input_refs(&self) -> Vec<(&str, &str)> {
        self.inputs
            .iter()
            .filter_map(|input| input.split_once('/'))
            .collect()
    }

    /// Workers (training), shards (batch) or replicas (serving).
    pub fn units(&self) -> u32 {
        match self.kind {
            JobKind::Training => self.training.as_ref().map_or(one(), |t| t.n_workers),
            JobKind::Batch => self.batch.as_ref().map_or(one(), |b| b.n_shards),
            JobKind::Serving => self.serving.as_ref().map_or(one(), |s| s.n_replicas),
        }
    }

    /// Units that run at the same time: all of them, except for a batch job's `parallelism`.
    pub fn concurrent_units(&self) -> u32 {
        match (self.kind, &self.batch) {
            (JobKind::Batch, Some(batch)) => batch.parallelism(),
            _ => self.units(),
        }
    }

    /// The spec as compact JSON. For a validated spec this is its canonical document: two specs
    /// that mean the same job give the same string.
    pub fn canonical_json(&self) -> String {
        serde_json::to_string(self).expect("a job spec has string keys only, so it serializes")
    }

    fn validate_program(&self) -> Result<(), SpecError> {
        if let Some(image) = &self.image {
            if image.is_empty() {
                return Err(SpecError::new("image", "must not be empty when given"));
            }
            if image.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(SpecError::new(
                    "image",
                    format!("must not contain spaces or control characters, got {image:?}"),
                ));
            }
        }
        if self.command.len() > COMMAND_ARGS_MAX {
            return Err(SpecError::new(
                "command",
                format!(
                    "must have at most {COMMAND_ARGS_MAX} entries, got {}",
                    self.command.len()
                ),
            ));
        }
        match self.command.first() {
            None if self.image.is_none() => return Err(SpecError::new(
                "image",
                "is required when there is no `command`: a job needs an image, a command or both",
            )),
            Some(program) if program.is_empty() => {
                return Err(SpecError::new(
                    "command[0]",
                    "must name the program to run, got \"\"",
                ))
            }
            _ => {}
        }
        for (arg_idx, arg) in self.command.iter().enumerate() {
            if arg.contains('\0') {
                return Err(SpecError::new(
                    format!("command[{arg_idx}]"),
                    "must not contain a NUL character",
                ));
            }
        }
        Ok(())
    }

    fn validate_kind_section(&mut self) -> Result<(), SpecError> {
        let kind = self.kind.as_str();
        for (section, present) in [
            ("training", self.training.is_some()),
            ("batch", self.batch.is_some()),
            ("serving", self.serving.is_some()),
        ] {
            if present && section != kind {
                return Err(SpecError::new(
                    section,
                    format!("does not apply to a {kind} job, whose section is `{kind}`"),
                ));
            }
        }
        match self.kind {
            JobKind::Training => {
                let training = self.training.get_or_insert_with(Training::default);
                check_range("training.workers", training.n_workers, 1..=WORKERS_MAX)?;
                check_range(
                    "training.max_restarts",
                    training.max_restarts,
                    0..=RETRIES_MAX,
                )?;
            }
            JobKind::Batch => {
                let batch = self.batch.get_or_insert_with(Batch::default);
                check_range("batch.shards", batch.n_shards, 1..=SHARDS_MAX)?;
                let parallelism = *batch.parallelism.get_or_insert(batch.n_shards);
                if parallelism == 0 || parallelism > batch.n_shards {
                    return Err(SpecError::new(
                        "batch.parallelism",
                        format!(
                            "must be between 1 and `shards` ({}), got {parallelism}",
                            batch.n_shards
                        ),
                    ));
                }
                check_range("batch.max_retries", batch.max_retries, 0..=RETRIES_MAX)?;
            }
            JobKind::Serving => {
                let serving = self.serving.get_or_insert_with(Serving::default);
                check_range("serving.replicas", serving.n_replicas, 1..=REPLICAS_MAX)?;
                check_range("serving.port", serving.port, 1..=u16::MAX)?;
                let path = &serving.health_path;
                if !path.starts_with('/')
                    || path.chars().any(|c| c.is_whitespace() || c.is_control())
                {
                    return Err(SpecError::new(
                        "serving.health",
                        format!(
                            "must be a path starting with '/' and without spaces, got {path:?}"
                        ),
                    ));
                }
                check_range("serving.max_surge", serving.max_surge, 0..=REPLICAS_MAX)?;
                check_range(
                    "serving.max_unavailable",
                    serving.max_unavailable,
                    0..=serving.n_replicas,
                )?;
                if serving.max_surge == 0 && serving.max_unavailable == 0 {
                    return Err(SpecError::new(
                        "serving.max_surge",
                        "must be at least 1 when `max_unavailable` is 0, \
                         or a rollout could never replace a replica",
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Lowercase letters, digits and '-', starting with a letter and not ending with '-' (a DNS
/// label, as Kubernetes object names must be).
fn check_label(field: &str, value: &str) -> Result<(), SpecError> {
    let reason = if value.is_empty() {
        "must not be empty".to_string()
    } else if value.chars().count() > NAME_CHARS_MAX {
        format!(
            "must be at most {NAME_CHARS_MAX} characters, got {}",
            value.chars().count()
        )
    } else if !value.starts_with(|c: char| c.is_ascii_lowercase()) {
        format!("must start with a lowercase letter, got {value:?}")
    } else if !value
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    {
        format!("may contain only lowercase letters, digits and '-', got {value:?}")
    } else if value.ends_with('-') {
        format!("must not end with '-', got {value:?}")
    } else {
        return Ok(());
    };
    Err(SpecError::new(field, reason))
}

fn check_range<T: PartialOrd + fmt::Display>(
    field: &str,
    value: T,
    range: RangeInclusive<T>,
) -> Result<(), SpecError> {
    if value < *range.start() {
        Err(SpecError::new(
            field,
            format!("must be at least {}, got {value}", range.start()),
        ))
    } else if value > *range.end() {
        Err(SpecError::new(
            field,
            format!("must be at most {}, got {value}", range.end()),
        ))
    } else {
        Ok(())
    }
}

fn validate_env(env: &BTreeMap<String, String>) -> Result<(), SpecError> {
    if env.len() > ENV_VARS_MAX {
        return Err(SpecError::new(
            "env",
            format!(
                "must have at most {ENV_VARS_MAX} entries, got {}",
                env.len()
            ),
        ));
    }
    for (key, value) in env {
        let valid_key = key.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
            && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid_key {
            return Err(SpecError::new(
                format!("env.{key}"),
                "is not a variable name: use letters, digits and '_', not starting with a digit",
            ));
        }
        if value.contains('\0') {
            return Err(SpecError::new(
                format!("env.{key}"),
                "must not contain a NUL character",
            ));
        }
    }
    Ok(())
}

fn validate_resources(resources: &Resources) -> Result<(), SpecError> {
    check_range("resources.gpus", resources.n_gpus, 0..=GPUS_PER_UNIT_MAX)?;
    if let Some(model) = &resources.gpu_model {
        if model.trim().is_empty() {
            return Err(SpecError::new(
                "resources.gpu_model",
                "must not be empty when given",
            ));
        }
        if resources.n_gpus == 0 {
            return Err(SpecError::new(
                "resources.gpu_model",
                format!("asks for {model:?} GPUs but `gpus` is 0"),
            ));
        }
    }
    if resources.cpu_millis == 0 || resources.cpu_millis > CPU_MILLIS_PER_UNIT_MAX {
        return Err(SpecError::new(
            "resources.cpus",
            format!(
                "must be greater than 0 and at most {}, got {}",
                CPU_MILLIS_PER_UNIT_MAX / 1000,
                f64::from(resources.cpu_millis) / 1000.0
            ),
        ));
    }
    if resources.memory_bytes == 0 {
        return Err(SpecError::new(
            "resources.memory",
            "must be more than 0 bytes",
        ));
    }
    if resources.memory_bytes > MEMORY_BYTES_PER_UNIT_MAX {
        return Err(SpecError::new(
            "resources.memory",
            format!(
                "must be at most {}, got {}",
                format_bytes(MEMORY_BYTES_PER_UNIT_MAX),
                format_bytes(resources.memory_bytes)
            ),
        ));
    }
    Ok(())
}

fn validate_placement(placement: &Placement) -> Result<(), SpecError> {
    if placement.sites.len() > SITES_MAX {
        return Err(SpecError::new(
            "placement.sites",
            format!(
                "must have at most {SITES_MAX} entries, got {}",
                placement.sites.len()
            ),
        ));
    }
    for (site_idx, site) in placement.sites.iter().enumerate() {
        let field = || format!("placement.sites[{site_idx}]");
        if site.trim().is_empty() {
            return Err(SpecError::new(field(), "must not be empty"));
        }
        if placement.sites[..site_idx].contains(site) {
            return Err(SpecError::new(field(), format!("repeats {site:?}")));
        }
    }
    if let Some(cost) = placement.max_cost_per_hour {
        if !cost.is_finite() || cost < 0.0 {
            return Err(SpecError::new(
                "placement.max_cost_per_hour",
                format!("must be a non-negative number, got {cost}"),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod artifact_tests {
    use super::output_matches;

    #[test]
    fn output_patterns_match_names_and_one_star() {
        assert!(output_matches("model.json", "model.json"));
        assert!(!output_matches("model.json", "model.jsonl"));
        assert!(output_matches("predictions-*.jsonl", "predictions-3.jsonl"));
        assert!(output_matches("predictions-*.jsonl", "predictions-.jsonl"));
        assert!(!output_matches("predictions-*.jsonl", "predictions-3.json"));
        assert!(
            !output_matches("ab*ba", "aba"),
            "prefix and suffix may not overlap"
        );
        assert!(output_matches("*", "anything"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use SpecFormat::{Json, Toml, Yaml};

    const MINIMAL_YAML: &str = r#"
name: resnet50
team: vision
kind: training
image: registry.local/vision/train@sha256:4f1c
command: ["torchrun", "train.py", "--epochs", "90"]
resources: { gpus: 4, cpus: 16, memory: 64GiB }
training: { workers: 2, max_restarts: 3 }
placement: { prefer: cheapest, sites: [onprem-a, aws-us-east-1] }
"#;

    const MINIMAL_TOML: &str = r#"
name = "resnet50"
team = "vision"
kind = "training"
image = "registry.local/vision/train@sha256:4f1c"
command = ["torchrun", "train.py", "--epochs", "90"]

[resources]
gpus = 4
cpus = 16
memory = "64GiB"

[training]
workers = 2
max_restarts = 3

[placement]
prefer = "cheapest"
sites = ["onprem-a", "aws-us-east-1"]
"#;

    const MINIMAL_JSON: &str = r#"{
  "name": "resnet50",
  "team": "vision",
  "kind": "training",
  "image": "registry.local/vision/train@sha256:4f1c",
  "command": ["torchrun", "train.py", "--epochs", "90"],
  "resources": {"gpus": 4, "cpus": 16, "memory": "64GiB"},
  "training": {"workers": 2, "max_restarts": 3},
  "placement": {"prefer": "cheapest", "sites": ["onprem-a", "aws-us-east-1"]}
}"#;

    /// A YAML training job with `name`, `kind` and `image` given, plus the lines passed.
    macro_rules! training {
        ($($line:literal),* $(,)?) => {
            concat!("name: demo\nkind: training\nimage: img\n", $($line, "\n"),*)
        };
    }

    macro_rules! batch {
        ($($line:literal),* $(,)?) => {
            concat!("name: demo\nkind: batch\nimage: img\n", $($line, "\n"),*)
        };
    }

    macro_rules! serving {
        ($($line:literal),* $(,)?) => {
            concat!("name: demo\nkind: serving\nimage: img\n", $($line, "\n"),*)
        };
    }

    enum Expect {
        /// Parses, and the spec passes the check.
        Valid(fn(&JobSpec) -> bool),
        /// Refused, naming the field, with a reason containing the text.
        Invalid(&'static str, &'static str),
    }
    use Expect::{Invalid, Valid};

    fn check(text: &str, format: SpecFormat, expect: &Expect) {
        if let Err(failure) = try_check(text, format, expect) {
            panic!("{failure}");
        }
    }

    fn try_check(text: &str, format: SpecFormat, expect: &Expect) -> Result<(), String> {
        match (expect, parse_spec(text, format)) {
            (Valid(ok), Ok(spec)) if !ok(&spec) => {
                Err(format!("{format:?} {text:?} gave {spec:?}"))
            }
            (Valid(_), Err(err)) => Err(format!("{format:?} {text:?} was refused: {err}")),
            (Invalid(field, reason), Err(err)) => {
                let shown = err.to_string();
                let display_ok =
                    field.is_empty() || shown.starts_with(&format!("field `{field}`: "));
                if err.field != *field || !err.reason.contains(reason) || !display_ok {
                    return Err(format!(
                        "{format:?} {text:?} gave {shown:?}, not field {field:?} with {reason:?}"
                    ));
                }
                Ok(())
            }
            (Invalid(field, _), Ok(spec)) => Err(format!(
                "{format:?} {text:?} was accepted ({field} expected): {spec:?}"
            )),
            (Valid(_), Ok(_)) => Ok(()),
        }
    }

    fn minimal_spec() -> JobSpec {
        JobSpec {
            name: "resnet50".into(),
            team: "vision".into(),
            kind: JobKind::Training,
            image: Some("registry.local/vision/train@sha256:4f1c".into()),
            command: ["torchrun", "train.py", "--epochs", "90"]
                .map(String::from)
                .to_vec(),
            env: BTreeMap::new(),
            resources: Resources {
                n_gpus: 4,
                gpu_model: None,
                cpu_millis: 16_000,
                memory_bytes: 64 << 30,
            },
            placement: Placement {
                sites: vec!["onprem-a".into(), "aws-us-east-1".into()],
                prefer: PlacementPreference::Cheapest,
                max_cost_per_hour: None,
            },
            priority: 0,
            preemptible: false,
            pull: false,
            outputs: Vec::new(),
            inputs: Vec::new(),
            training: Some(Training {
                n_workers: 2,
                max_restarts: 3,
            }),
            batch: None,
            serving: None,
        }
    }

    #[test]
    fn the_minimal_spec_reads_the_same_in_every_format() {
        for (text, format) in [
            (MINIMAL_YAML, Yaml),
            (MINIMAL_TOML, Toml),
            (MINIMAL_JSON, Json),
        ] {
            let spec = parse_spec(text, format).unwrap_or_else(|err| panic!("{format:?}: {err}"));
            assert_eq!(spec, minimal_spec(), "{format:?}");
            assert_eq!(spec.units(), 2);
        }
        let value: serde_json::Value = serde_json::from_str(MINIMAL_JSON).unwrap();
        assert_eq!(from_json_value(value), Ok(minimal_spec()));
        let err = from_json_value(serde_json::json!(["resnet50"])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "must be a job spec (a JSON object of fields), got a list"
        );
    }

    #[test]
    fn fields_are_checked() {
        let cases: &[(&str, SpecFormat, Expect)] = &[
            // Defaults.
            (
                "name: demo\nkind: training\ncommand: [python, train.py]",
                Yaml,
                Valid(|s| {
                    s.team == "default"
                        && s.image.is_none()
                        && s.resources == Resources::default()
                        && s.resources.cpu_millis == 1000
                        && s.resources.memory_bytes == 1 << 30
                        && s.placement == Placement::default()
                        && s.priority == 0
                        && !s.preemptible
                        && s.training == Some(Training::default())
                        && s.units() == 1
                }),
            ),
            // name and team.
            ("kind: training\nimage: img", Yaml, Invalid("name", "is required")),
            ("name: \"\"\nkind: batch\nimage: i", Yaml, Invalid("name", "must not be empty")),
            ("name: ResNet\nkind: batch\nimage: i", Yaml, Invalid("name", "lowercase")),
            ("name: 1net\nkind: batch\nimage: i", Yaml, Invalid("name", "start with")),
            ("name: res_net\nkind: batch\nimage: i", Yaml, Invalid("name", "only lowercase")),
            ("name: resnet-\nkind: batch\nimage: i", Yaml, Invalid("name", "end with '-'")),
            (
                "name: a23456789-123456789-123456789-123456789-123456789-123456789-123\nkind: batch\nimage: i",
                Yaml,
                Valid(|s| s.name.len() == 63),
            ),
            (
                "name: a23456789-123456789-123456789-123456789-123456789-123456789-1234\nkind: batch\nimage: i",
                Yaml,
                Invalid("name", "at most 63 characters, got 64"),
            ),
            (training!("team: Vision"), Yaml, Invalid("team", "lowercase")),
            (training!("team: vision-2"), Yaml, Valid(|s| s.team == "vision-2")),
            // kind.
            ("name: demo\nimage: img", Yaml, Invalid("kind", "is required")),
            (
                "name: demo\nimage: img\nkind: edge",
                Yaml,
                Invalid("kind", "must be one of `training`, `batch`, `serving`, got `edge`"),
            ),
            (r#"{"name": "demo", "image": "i", "kind": 5}"#, Json, Invalid("kind", "one of `training`")),
            // image and command.
            ("name: demo\nkind: batch", Yaml, Invalid("image", "a job needs an image, a command or both")),
            ("name: demo\nkind: batch\ncommand: []", Yaml, Invalid("image", "is required")),
            ("name: demo\nkind: batch\ncommand: [\"\"]", Yaml, Invalid("command[0]", "program")),
            ("name: demo\nkind: batch\ncommand: [./run.sh]", Yaml, Valid(|s| s.image.is_none())),
            ("name: demo\nkind: batch\nimage: \"\"", Yaml, Invalid("image", "must not be empty")),
            ("name: demo\nkind: batch\nimage: a b", Yaml, Invalid("image", "spaces")),
            (training!("command: python train.py"), Yaml, Invalid("command", "must be a list, got string")),
            (training!("command: [python, [x]]"), Yaml, Invalid("command[1]", "must be a string")),
            (training!("command: [python, \"a\\0b\"]"), Yaml, Invalid("command[1]", "NUL")),
            // env.
            (
                training!("env: { HF_HOME: /cache, _X1: \"1\" }"),
                Yaml,
                Valid(|s| s.env["HF_HOME"] == "/cache" && s.env["_X1"] == "1"),
            ),
            (training!("env: { 1BAD: x }"), Yaml, Invalid("env.1BAD", "not a variable name")),
            (training!("env: { BAD-NAME: x }"), Yaml, Invalid("env.BAD-NAME", "not a variable name")),
            (training!("env: { \"\": x }"), Yaml, Invalid("env.", "not a variable name")),
            (training!("env: [A]"), Yaml, Invalid("env", "must be a mapping of variable names")),
            (
                r#"{"name": "demo", "kind": "batch", "image": "i", "env": {"A": "1", "A": "2"}}"#,
                Json,
                Invalid("env", "`A` is given twice"),
            ),
            // resources.gpus and gpu_model.
            (training!("resources: { gpus: 64 }"), Yaml, Valid(|s| s.resources.n_gpus == 64)),
            (training!("resources: { gpus: 65 }"), Yaml, Invalid("resources.gpus", "must be at most 64, got 65")),
            (training!("resources: { gpus: -1 }"), Yaml, Invalid("resources.gpus", "must be a whole number")),
            (training!("resources: { gpus: 1.5 }"), Yaml, Invalid("resources.gpus", "got floating point `1.5`")),
            (training!("resources: { gpus: four }"), Yaml, Invalid("resources.gpus", "got string \"four\"")),
            (
                training!("resources: { gpus: 2, gpu_model: A100 }"),
                Yaml,
                Valid(|s| s.resources.gpu_model.as_deref() == Some("A100")),
            ),
            (training!("resources: { gpu_model: A100 }"), Yaml, Invalid("resources.gpu_model", "`gpus` is 0")),
            (training!("resources: { gpus: 1, gpu_model: \"\" }"), Yaml, Invalid("resources.gpu_model", "empty")),
            // resources.cpus.
            (training!("resources: { cpus: 0.5 }"), Yaml, Valid(|s| s.resources.cpu_millis == 500)),
            (training!("resources: { cpus: 0.001 }"), Yaml, Valid(|s| s.resources.cpu_millis == 1)),
            (training!("resources: { cpus: 1024 }"), Yaml, Valid(|s| s.resources.cpu_millis == 1_024_000)),
            (training!("resources: { cpus: 1024.5 }"), Yaml, Invalid("resources.cpus", "at most 1024, got 1024.5")),
            (training!("resources: { cpus: 0 }"), Yaml, Invalid("resources.cpus", "greater than 0, got 0")),
            (training!("resources: { cpus: -2 }"), Yaml, Invalid("resources.cpus", "greater than 0, got -2")),
            (training!("resources: { cpus: 0.0001 }"), Yaml, Invalid("resources.cpus", "multiple of 0.001")),
            (training!("resources: { cpus: .nan }"), Yaml, Invalid("resources.cpus", "greater than 0")),
            (training!("resources: { cpus: \"2\" }"), Yaml, Invalid("resources.cpus", "must be a number, got string")),
            ("name = \"demo\"\nkind = \"batch\"\nimage = \"i\"\nresources = { cpus = 2 }", Toml, Valid(|s| s.resources.cpu_millis == 2000)),
            ("name = \"demo\"\nkind = \"batch\"\nimage = \"i\"\nresources = { cpus = 0.25 }", Toml, Valid(|s| s.resources.cpu_millis == 250)),
            // resources.memory.
            (training!("resources: { memory: 16GiB }"), Yaml, Valid(|s| s.resources.memory_bytes == 16 << 30)),
            (training!("resources: { memory: 512MiB }"), Yaml, Valid(|s| s.resources.memory_bytes == 512 << 20)),
            (training!("resources: { memory: 1.5GiB }"), Yaml, Valid(|s| s.resources.memory_bytes == 3 << 29)),
            (training!("resources: { memory: 16GB }"), Yaml, Valid(|s| s.resources.memory_bytes == 16_000_000_000)),
            (training!("resources: { memory: 1073741824 }"), Yaml, Valid(|s| s.resources.memory_bytes == 1 << 30)),
            (training!("resources: { memory: 64TiB }"), Yaml, Valid(|s| s.resources.memory_bytes == 64 << 40)),
            (training!("resources: { memory: 65TiB }"), Yaml, Invalid("resources.memory", "at most 64TiB, got 65TiB")),
            (training!("resources: { memory: 80 parsecs }"), Yaml, Invalid("resources.memory", "unknown unit \"parsecs\"")),
            (training!("resources: { memory: 0GiB }"), Yaml, Invalid("resources.memory", "not a positive size")),
            (training!("resources: { memory: 0 }"), Yaml, Invalid("resources.memory", "more than 0 bytes")),
            (training!("resources: { memory: -5 }"), Yaml, Invalid("resources.memory", "got integer `-5`")),
            (training!("resources: { memory: 1.5 }"), Yaml, Invalid("resources.memory", "must be a size such as \"16GiB\" or a whole number of bytes")),
            ("name = \"demo\"\nkind = \"batch\"\nimage = \"i\"\nresources = { memory = 2048 }", Toml, Valid(|s| s.resources.memory_bytes == 2048)),
            (r#"{"name": "demo", "kind": "batch", "image": "i", "resources": {"memory": 4096}}"#, Json, Valid(|s| s.resources.memory_bytes == 4096)),
            // placement.
            (
                training!("placement: { prefer: on-prem-first, max_cost_per_hour: 2.5 }"),
                Yaml,
                Valid(|s| s.placement.prefer == PlacementPreference::OnPremFirst && s.placement.max_cost_per_hour == Some(2.5)),
            ),
            (training!("placement: { prefer: fastest }"), Yaml, Valid(|s| s.placement.prefer == PlacementPreference::Fastest)),
            (training!("placement: { prefer: closest }"), Yaml, Invalid("placement.prefer", "must be one of `cheapest`, `on-prem-first`, `fastest`, got `closest`")),
            (training!("placement: { max_cost_per_hour: 0 }"), Yaml, Valid(|s| s.placement.max_cost_per_hour == Some(0.0))),
            (training!("placement: { max_cost_per_hour: -1 }"), Yaml, Invalid("placement.max_cost_per_hour", "non-negative number, got -1")),
            (training!("placement: { sites: [a, b, a] }"), Yaml, Invalid("placement.sites[2]", "repeats \"a\"")),
            (training!("placement: { sites: [\"\"] }"), Yaml, Invalid("placement.sites[0]", "must not be empty")),
            (training!("placement: { sites: a }"), Yaml, Invalid("placement.sites", "must be a list")),
            // priority and preemptible.
            (training!("priority: -1000"), Yaml, Valid(|s| s.priority == -1000)),
            (training!("priority: 1000"), Yaml, Valid(|s| s.priority == 1000)),
            (training!("priority: 1001"), Yaml, Invalid("priority", "must be at most 1000, got 1001")),
            (training!("priority: -1001"), Yaml, Invalid("priority", "must be at least -1000, got -1001")),
            (training!("preemptible: true"), Yaml, Valid(|s| s.preemptible)),
            // outputs and inputs.
            (training!("outputs: [model.json, \"shard-*.jsonl\"]"), Yaml, Valid(|s| s.outputs.len() == 2)),
            (training!("outputs: [\"a*b*\"]"), Yaml, Invalid("outputs[0]", "at most one '*'")),
            (training!("outputs: [../etc]"), Yaml, Invalid("outputs[0]", "file name")),
            (training!("outputs: [m.json, m.json]"), Yaml, Invalid("outputs[1]", "given twice")),
            (training!("inputs: [train/model.json]"), Yaml, Valid(|s| s.input_refs() == [("train", "model.json")])),
            (training!("inputs: [model.json]"), Yaml, Invalid("inputs[0]", "must be JOB/NAME")),
            (training!("inputs: [a/b/c]"), Yaml, Invalid("inputs[0]", "must be JOB/NAME")),
            (training!("inputs: [a/m.json, b/m.json]"), Yaml, Invalid("inputs[1]", "also named \"m.json\"")),
            (training!("preemptible: yes"), Yaml, Invalid("preemptible", "must be true or false, got string \"yes\"")),
            // training.
            (training!("training: { workers: 1024 }"), Yaml, Valid(|s| s.units() == 1024 && s.training.as_ref().unwrap().max_restarts == 3)),
            (training!("training: { workers: 0 }"), Yaml, Invalid("training.workers", "at least 1, got 0")),
            (training!("training: { workers: 1025 }"), Yaml, Invalid("training.workers", "at most 1024, got 1025")),
            (training!("training: { max_restarts: 1001 }"), Yaml, Invalid("training.max_restarts", "at most 1000")),
            (training!("training: { max_restarts: 0 }"), Yaml, Valid(|s| s.training.as_ref().unwrap().max_restarts == 0)),
            // batch.
            (
                batch!("batch: { shards: 100, parallelism: 20, max_retries: 3 }"),
                Yaml,
                Valid(|s| s.units() == 100 && s.concurrent_units() == 20 && s.batch.as_ref().unwrap().parallelism() == 20),
            ),
            (batch!("batch: { shards: 100 }"), Yaml, Valid(|s| s.batch.as_ref().unwrap().parallelism == Some(100))),
            (batch!(), Yaml, Valid(|s| s.batch == Some(Batch { n_shards: 1, parallelism: Some(1), max_retries: 3 }))),
            (batch!("batch: { shards: 100000 }"), Yaml, Valid(|s| s.units() == 100_000)),
            (batch!("batch: { shards: 100001 }"), Yaml, Invalid("batch.shards", "at most 100000")),
            (batch!("batch: { shards: 0 }"), Yaml, Invalid("batch.shards", "at least 1")),
            (batch!("batch: { shards: 10, parallelism: 11 }"), Yaml, Invalid("batch.parallelism", "between 1 and `shards` (10), got 11")),
            (batch!("batch: { shards: 10, parallelism: 0 }"), Yaml, Invalid("batch.parallelism", "got 0")),
            (batch!("batch: { max_retries: 1001 }"), Yaml, Invalid("batch.max_retries", "at most 1000")),
            // serving.
            (
                serving!("serving: { replicas: 3, port: 8080, health: /healthz, max_surge: 1, max_unavailable: 0 }"),
                Yaml,
                Valid(|s| s.units() == 3 && s.serving.as_ref().unwrap().port == 8080),
            ),
            (serving!(), Yaml, Valid(|s| s.serving == Some(Serving::default()) && s.units() == 1)),
            (serving!("serving: { replicas: 1000 }"), Yaml, Valid(|s| s.units() == 1000)),
            (serving!("serving: { replicas: 1001 }"), Yaml, Invalid("serving.replicas", "at most 1000")),
            (serving!("serving: { replicas: 0 }"), Yaml, Invalid("serving.replicas", "at least 1")),
            (serving!("serving: { port: 0 }"), Yaml, Invalid("serving.port", "at least 1, got 0")),
            (serving!("serving: { port: 65536 }"), Yaml, Invalid("serving.port", "from 0 to 65535, got integer `65536`")),
            (serving!("serving: { health: healthz }"), Yaml, Invalid("serving.health", "starting with '/'")),
            (serving!("serving: { max_surge: 0 }"), Yaml, Invalid("serving.max_surge", "at least 1 when `max_unavailable` is 0")),
            (serving!("serving: { max_surge: 0, max_unavailable: 1 }"), Yaml, Valid(|s| s.serving.as_ref().unwrap().max_surge == 0)),
            (serving!("serving: { replicas: 2, max_unavailable: 3 }"), Yaml, Invalid("serving.max_unavailable", "at most 2, got 3")),
            (serving!("serving: { max_surge: 1001 }"), Yaml, Invalid("serving.max_surge", "at most 1000")),
            // Only the section of the job's kind.
            (training!("batch: { shards: 2 }"), Yaml, Invalid("batch", "does not apply to a training job, whose section is `training`")),
            (serving!("training: { workers: 2 }"), Yaml, Invalid("training", "does not apply to a serving job")),
            (batch!("serving: {}"), Yaml, Invalid("serving", "does not apply to a batch job")),
            // Unknown fields, at every level.
            (training!("gpus: 4"), Yaml, Invalid("gpus", "is not a known field; expected one of `name`")),
            (training!("resources: { gpu: 4 }"), Yaml, Invalid("resources.gpu", "is not a known field; expected one of `gpus`, `gpu_model`, `cpus`, `memory`")),
            (training!("training: { worker: 4 }"), Yaml, Invalid("training.worker", "is not a known field")),
            (training!("placement: { site: [a] }"), Yaml, Invalid("placement.site", "is not a known field")),
            (serving!("serving: { healthz: /h }"), Yaml, Invalid("serving.healthz", "is not a known field")),
            // Wrong types of sections.
            (training!("resources: big"), Yaml, Invalid("resources", "must be a mapping of `gpus`")),
            (training!("training: 4"), Yaml, Invalid("training", "must be a mapping of `workers`")),
            ("- name: demo", Yaml, Invalid("", "must be a job spec (a mapping of fields), got a list")),
            // The same refusals through TOML and JSON name the same fields.
            ("name = \"demo\"\nkind = \"batch\"\nimage = \"i\"\n[resources]\ngpus = 65", Toml, Invalid("resources.gpus", "at most 64, got 65")),
            ("name = \"demo\"\nkind = \"batch\"\nimage = \"i\"\n[resources]\ngpus = \"four\"", Toml, Invalid("resources.gpus", "must be a whole number from 0 to 4294967295, got string \"four\" (line 5")),
            ("name = \"demo\"\nkind = \"batch\"\nimage = \"i\"\n[resources]\ngpu = 4", Toml, Invalid("resources.gpu", "is not a known field")),
            ("name = \"demo\"\nkind = \"batch\"\nimage = \"i\"\n[training]\nworkers = 2", Toml, Invalid("training", "does not apply to a batch job")),
            ("name = \"demo\"\nimage = \"i\"", Toml, Invalid("kind", "is required")),
            (r#"{"name": "demo", "kind": "batch", "image": "i", "resources": {"gpus": "4"}}"#, Json, Invalid("resources.gpus", "got string \"4\" (line 1, column")),
            (r#"{"name": "demo", "kind": "batch", "image": "i", "resources": {"gpus": 4, "cores": 4}}"#, Json, Invalid("resources.cores", "is not a known field")),
            (r#"{"name": "demo", "kind": "batch", "image": "i", "command": "run"}"#, Json, Invalid("command", "must be a list")),
            (r#"{"name": "demo", "kind": "batch", "image": null}"#, Json, Invalid("image", "is required")),
            (r#"{"name": "demo", "kind": "batch", "image": "i", "name": "again"}"#, Json, Invalid("name", "is given twice")),
            // Syntax errors: the document as a whole, with a location.
            ("name: demo\n  kind: batch\n", Yaml, Invalid("", "line 2")),
            ("name = \"demo\"\nkind = ", Toml, Invalid("", "(line 2, column")),
            (r#"{"name": "demo",}"#, Json, Invalid("", "(line 1, column")),
            (r#"{"name": "demo", "kind": "batch", "image": "i"} x"#, Json, Invalid("", "trailing characters")),
            ("[\"demo\", \"default\", \"batch\"]", Json, Invalid("", "JSON object")),
            ("", Yaml, Invalid("", "the spec is empty")),
            ("  \n", Json, Invalid("", "the spec is empty")),
        ];
        let failures: Vec<String> = cases
            .iter()
            .filter_map(|(text, format, expect)| try_check(text, *format, expect).err())
            .collect();
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    #[test]
    fn env_has_at_most_256_entries() {
        let env = |n: usize| {
            let vars: Vec<String> = (0..n).map(|i| format!("\"V{i}\": \"x\"")).collect();
            format!(
                r#"{{"name": "demo", "kind": "batch", "image": "i", "env": {{{}}}}}"#,
                vars.join(", ")
            )
        };
        check(&env(256), Json, &Valid(|s| s.env.len() == 256));
        check(
            &env(257),
            Json,
            &Invalid("env", "at most 256 entries, got 257"),
        );
    }

    #[test]
    fn a_spec_larger_than_the_limit_is_refused_before_parsing() {
        let text = format!(
            "name: demo\nkind: batch\nimage: i\n#{}",
            "x".repeat(SPEC_BYTES_MAX)
        );
        check(&text, Yaml, &Invalid("", "at most 1048576"));
    }

    #[test]
    fn errors_read_as_field_then_reason() {
        let err = parse_spec(training!("resources: { gpus: 65 }"), Yaml).unwrap_err();
        assert_eq!(
            err.to_string(),
            "field `resources.gpus`: must be at most 64, got 65"
        );
        let err = parse_spec(training!("resources: { gpus: four }"), Yaml).unwrap_err();
        assert_eq!(
            err.to_string(),
            "field `resources.gpus`: must be a whole number from 0 to 4294967295, \
             got string \"four\" (line 4, column 20)"
        );
        let err = parse_spec("", Json).unwrap_err();
        assert_eq!(err.to_string(), "the spec is empty");
    }

    #[test]
    fn equivalent_specs_have_the_same_canonical_json() {
        // Everything written out, in another order, with other spellings of the same values.
        let explicit = r#"{
            "placement": {"sites": ["onprem-a", "aws-us-east-1"], "prefer": "cheapest"},
            "training": {"max_restarts": 3, "workers": 2},
            "preemptible": false,
            "priority": 0,
            "env": {},
            "resources": {"memory": 68719476736, "cpus": 16.0, "gpus": 4},
            "command": ["torchrun", "train.py", "--epochs", "90"],
            "image": "registry.local/vision/train@sha256:4f1c",
            "kind": "training",
            "team": "vision",
            "name": "resnet50"
        }"#;
        let canonical = minimal_spec().canonical_json();
        for (text, format) in [(MINIMAL_YAML, Yaml), (MINIMAL_TOML, Toml), (explicit, Json)] {
            let spec = parse_spec(text, format).unwrap();
            assert_eq!(spec.canonical_json(), canonical, "{format:?}");
        }
        assert_eq!(
            canonical,
            r#"{"name":"resnet50","team":"vision","kind":"training","image":"registry.local/vision/train@sha256:4f1c","command":["torchrun","train.py","--epochs","90"],"env":{},"resources":{"gpus":4,"cpus":16.0,"memory":"64GiB"},"placement":{"sites":["onprem-a","aws-us-east-1"],"prefer":"cheapest"},"priority":0,"preemptible":false,"training":{"workers":2,"max_restarts":3}}"#
        );

        // A spec that differs in one default does not.
        let other = parse_spec(
            &MINIMAL_YAML.replace("max_restarts: 3", "max_restarts: 4"),
            Yaml,
        );
        assert_ne!(other.unwrap().canonical_json(), canonical);
    }

    #[test]
    fn the_canonical_form_parses_back_to_itself() {
        for text in [
            MINIMAL_YAML,
            batch!(
                "batch: { shards: 100 }",
                "resources: { cpus: 0.1, memory: 1536 }"
            ),
            serving!(
                "env: { B: \"2\", A: \"1\" }",
                "placement: { max_cost_per_hour: 0.5 }"
            ),
        ] {
            let spec = parse_spec(text, Yaml).unwrap();
            let canonical = spec.canonical_json();
            let again = parse_spec(&canonical, Json).unwrap();
            assert_eq!(again, spec, "{canonical}");
            assert_eq!(again.canonical_json(), canonical);
        }
    }

    #[test]
    fn formats_come_from_the_extension() {
        for (path, format) in [
            ("job.yaml", Some(Yaml)),
            ("dir.d/job.YML", Some(Yaml)),
            ("job.toml", Some(Toml)),
            ("job.json", Some(Json)),
            ("job.txt", None),
            ("job", None),
        ] {
            assert_eq!(SpecFormat::from_path(Path::new(path)), format, "{path}");
        }
    }
}
