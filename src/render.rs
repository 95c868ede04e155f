//! `gantry render JOB_FILE --runtime docker|kubernetes`: what the runtime would create for each
//! of the job's units, for a platform engineer to review before anything runs. The documents are
//! made by the same functions the runtimes send (`docker::render`, `kubernetes::render`), for
//! units as the scheduler would describe them if each were placed on its own node (`node-0`,
//! `node-1`, ...; serving ports from 31000), since the real nodes are known only at placement.

use anyhow::Result;
use gantry_agent::runtime::{docker, kubernetes, UnitSpec};
use gantry_protocol::jobspec::{JobKind, JobSpec};
use std::collections::BTreeMap;
use std::path::Path;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Target {
    Docker,
    Kubernetes,
}

/// The env Gantry adds to unit `unit` of `spec`, with each unit on its own node.
fn placed_env(spec: &JobSpec, unit: u32) -> BTreeMap<String, String> {
    let units = spec.units().to_string();
    let pairs: Vec<(&str, String)> = match spec.kind {
        JobKind::Training => vec![
            ("RANK", unit.to_string()),
            ("WORLD_SIZE", units),
            ("LOCAL_RANK", "0".into()),
            ("NODE_RANK", unit.to_string()),
            ("MASTER_ADDR", "node-0".into()),
            ("MASTER_PORT", "29500".into()),
        ],
        JobKind::Batch => vec![("SHARD_INDEX", unit.to_string()), ("SHARD_COUNT", units)],
        JobKind::Serving => vec![
            ("PORT", (31_000 + unit).to_string()),
            ("REPLICA_INDEX", unit.to_string()),
        ],
    };
    pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}

/// One document per object, in unit order; objects shared by a job's units (a Kubernetes
/// Service) once.
pub fn render(
    spec: &JobSpec,
    target: Target,
    namespace: &str,
    work_root: &Path,
) -> Result<Vec<serde_json::Value>> {
    if target == Target::Docker && spec.image.is_none() {
        anyhow::bail!(
            "image: the job names no image, so it runs as a plain process, not in a container"
        );
    }
    if target == Target::Kubernetes && spec.image.is_none() {
        anyhow::bail!("image: a Kubernetes pod needs an image, and the job names none");
    }
    let mut documents: Vec<serde_json::Value> = Vec::new();
    for unit in 0..spec.units() {
        let gpus = (0..spec.resources.n_gpus)
            .map(|index| gantry_agent::runtime::GpuAssignment {
                index,
                uuid: None,
                declared: false,
            })
            .collect();
        let unit_spec = UnitSpec::new(
            format!("{}-{unit}-1", spec.name),
            spec.name.clone(),
            spec.clone(),
            format!("node-{unit}"),
            &placed_env(spec, unit),
            gpus,
            false,
        );
        match target {
            Target::Docker => documents.push(docker::render(&unit_spec, work_root)),
            Target::Kubernetes => {
                for object in kubernetes::render(&unit_spec, namespace) {
                    if !documents.contains(&object) {
                        documents.push(object);
                    }
                }
            }
        }
    }
    Ok(documents)
}

#[cfg(test)]
mod tests {
    use super::*;
    use gantry_protocol::jobspec::from_json_value;

    fn spec(value: serde_json::Value) -> JobSpec {
        from_json_value(value).unwrap()
    }

    #[test]
    fn one_container_per_unit_with_the_env_gantry_adds() {
        let batch = spec(serde_json::json!({
            "name": "score", "kind": "batch", "image": "registry.local/score:1",
            "command": ["score"], "batch": { "shards": 3 },
        }));
        let documents = render(
            &batch,
            Target::Docker,
            "gantry",
            Path::new("/var/lib/gantry/allocations"),
        )
        .unwrap();
        assert_eq!(documents.len(), 3);
        let env = documents[2]["body"]["Env"].as_array().unwrap();
        for expected in ["SHARD_INDEX=2", "SHARD_COUNT=3", "GANTRY_JOB_ID=score"] {
            assert!(
                env.iter().any(|e| e == expected),
                "{expected} missing from {env:?}"
            );
        }
        assert_eq!(documents[0]["name"], "gantry-score-0-1");
    }

    #[test]
    fn kubernetes_objects_shared_by_units_appear_once() {
        let serving = spec(serde_json::json!({
            "name": "web", "kind": "serving", "image": "registry.local/web:1",
            "serving": { "replicas": 2 },
        }));
        let documents = render(&serving, Target::Kubernetes, "ml", Path::new("/x")).unwrap();
        let kinds: Vec<&str> = documents
            .iter()
            .map(|d| d["kind"].as_str().unwrap())
            .collect();
        assert_eq!(
            kinds.iter().filter(|k| **k == "Deployment").count(),
            2,
            "{kinds:?}"
        );
        assert_eq!(
            kinds.iter().filter(|k| **k == "Service").count(),
            1,
            "{kinds:?}"
        );
        assert!(documents.iter().all(|d| d["metadata"]["namespace"] == "ml"));
    }

    #[test]
    fn a_job_without_an_image_has_no_container_to_render() {
        let command =
            spec(serde_json::json!({ "name": "c", "kind": "batch", "command": ["true"] }));
        let err = render(&command, Target::Docker, "gantry", Path::new("/x"))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("image:"), "{err}");
    }
}
