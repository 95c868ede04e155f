//! `gantry new training|batch|serving`: commented YAML starters for each kind of job. The job
//! itself is a few lines; every default is written out as a commented `#key: value` line with its
//! meaning, so a user sees what they get without reading the spec's source.
//!
//! The templates live in `src/templates/*.yaml`. Their tests hold them to the spec: each parses
//! and validates, and with its `#key:` lines uncommented it means exactly the same job and names
//! every field of the canonical spec.

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use std::io::Write;
use std::path::PathBuf;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum TemplateKind {
    /// Workers started together as a gang (distributed training).
    Training,
    /// Independent shards, each run to completion (batch inference, preprocessing).
    Batch,
    /// Replicas kept running behind a health check (model servers).
    Serving,
}

#[derive(Args)]
pub struct NewArgs {
    /// The kind of job.
    kind: TemplateKind,
    /// Write to this file instead of stdout.
    #[arg(short, long, value_name = "FILE")]
    output: Option<PathBuf>,
    /// Replace FILE if it exists.
    #[arg(long, requires = "output")]
    force: bool,
}

/// Refusing to overwrite a file the user did not ask to replace (exit code 4, a conflict).
#[derive(Debug)]
pub struct FileExists(pub PathBuf);

impl std::fmt::Display for FileExists {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} already exists; pass --force to replace it",
            self.0.display()
        )
    }
}

impl std::error::Error for FileExists {}

pub fn template(kind: TemplateKind) -> &'static str {
    match kind {
        TemplateKind::Training => include_str!("templates/training.yaml"),
        TemplateKind::Batch => include_str!("templates/batch.yaml"),
        TemplateKind::Serving => include_str!("templates/serving.yaml"),
    }
}

pub fn run(args: NewArgs) -> Result<()> {
    let text = template(args.kind);
    let Some(path) = args.output else {
        print!("{text}");
        return Ok(());
    };
    let mut options = std::fs::OpenOptions::new();
    options.write(true);
    if args.force {
        options.create(true).truncate(true);
    } else {
        // Checked and created in one step, so a file appearing in between is not clobbered.
        options.create_new(true);
    }
    let mut file = match options.open(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return Err(FileExists(path).into())
        }
        other => other.with_context(|| format!("create {}", path.display()))?,
    };
    file.write_all(text.as_bytes())
        .with_context(|| format!("write {}", path.display()))?;
    eprintln!(
        "wrote {}; submit it with `gantry submit {}`",
        path.display(),
        path.display()
    );
    Ok(())
}

/// The template with its commented defaults (`#key: value`, no space after the `#`) made live.
#[cfg(test)]
fn uncomment_defaults(text: &str) -> String {
    text.lines()
        .map(|line| {
            let body = line.trim_start();
            let indent = &line[..line.len() - body.len()];
            match body.strip_prefix('#') {
                Some(rest) if rest.starts_with(|c: char| c.is_ascii_alphabetic()) => {
                    format!("{indent}{rest}")
                }
                _ => line.to_string(),
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use gantry_protocol::jobspec::{parse_spec, JobKind, SpecFormat};

    const KINDS: [(TemplateKind, JobKind); 3] = [
        (TemplateKind::Training, JobKind::Training),
        (TemplateKind::Batch, JobKind::Batch),
        (TemplateKind::Serving, JobKind::Serving),
    ];

    /// Every key path in a JSON value: `resources.gpus`, `training.workers`, ...
    fn key_paths(value: &serde_json::Value, prefix: &str, paths: &mut Vec<String>) {
        if let serde_json::Value::Object(map) = value {
            for (key, child) in map {
                let path = if prefix.is_empty() {
                    key.clone()
                } else {
                    format!("{prefix}.{key}")
                };
                key_paths(child, &path, paths);
                paths.push(path);
            }
        }
    }

    #[test]
    fn each_template_is_a_valid_job_of_its_kind() {
        for (template_kind, job_kind) in KINDS {
            let spec = parse_spec(template(template_kind), SpecFormat::Yaml)
                .unwrap_or_else(|e| panic!("{template_kind:?}: {e}"));
            assert_eq!(spec.kind, job_kind);
            assert_eq!(spec.command[..2], ["gantry", "workload"]);
        }
    }

    #[test]
    fn the_commented_defaults_are_the_specs_defaults() {
        for (kind, _) in KINDS {
            let text = template(kind);
            let minimal = parse_spec(text, SpecFormat::Yaml).unwrap();
            let uncommented = uncomment_defaults(text);
            let written_out = parse_spec(&uncommented, SpecFormat::Yaml)
                .unwrap_or_else(|e| panic!("{kind:?} with its defaults uncommented: {e}"));
            assert_eq!(
                written_out, minimal,
                "{kind:?}: a commented default differs from the spec's"
            );

            // And every field of the canonical spec is shown, so none is left undocumented.
            let documented: serde_json::Value = serde_yaml_ng::from_str(&uncommented).unwrap();
            let mut documented_paths = Vec::new();
            key_paths(&documented, "", &mut documented_paths);
            let canonical: serde_json::Value =
                serde_json::from_str(&minimal.canonical_json()).unwrap();
            let mut canonical_paths = Vec::new();
            key_paths(&canonical, "", &mut canonical_paths);
            let missing: Vec<&String> = canonical_paths
                .iter()
                .filter(|path| !documented_paths.contains(path))
                .collect();
            assert!(missing.is_empty(), "{kind:?} does not show {missing:?}");
        }
    }

    #[test]
    fn uncommenting_touches_only_default_lines() {
        let text = "# prose: not a default\n#team: default\n  #gpus: 0   # per worker\n  # gpu_model: H100\n#\n";
        assert_eq!(
            uncomment_defaults(text),
            "# prose: not a default\nteam: default\n  gpus: 0   # per worker\n  # gpu_model: H100\n#"
        );
    }
}
