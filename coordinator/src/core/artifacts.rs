//! Admission rules checked when a job is accepted (the cluster policy, the job's inputs) and the
//! record of the artifacts units produce. Only checksums and sizes are replicated; the bytes live
//! in each coordinator's content-addressed store (`artifacts/<sha256>` under its data dir).

use super::state::{Outcome, State};
use gantry_protocol::jobspec::JobSpec;
use gantry_protocol::replicated::ArtifactMeta;
use gantry_protocol::ARTIFACTS_BYTES_PER_UNIT_MAX;
use serde::{Deserialize, Serialize};

/// One of a job's `inputs`, resolved when the job was accepted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResolvedInput {
    /// The name the unit sees in its input directory.
    pub name: String,
    /// The job that produced it.
    pub job_id: String,
    pub sha256: String,
    pub size_bytes: u64,
}

/// Whether an image reference is pinned: `name@sha256:<64 hex>` or an image id `sha256:<64 hex>`.
pub fn is_pinned_image(image: &str) -> bool {
    let digest = match image.rsplit_once('@') {
        Some((name, digest)) if !name.is_empty() => digest,
        Some(_) => return false,
        None => image,
    };
    digest
        .strip_prefix("sha256:")
        .is_some_and(|hex| hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
}

impl State {
    /// The policy and inputs check for a job about to be accepted: its resolved inputs, or the
    /// refusal naming the field.
    pub(crate) fn admit(&self, spec: &JobSpec) -> Result<Vec<ResolvedInput>, Outcome> {
        let refuse = |field: String, reason: String| Outcome::SubmitRefused { field, reason };
        if let Some(image) = &spec.image {
            if self.policy.require_digest && !is_pinned_image(image) {
                return Err(refuse(
                    "image".into(),
                    format!("{image:?} names a tag, and this cluster's policy requires images pinned by digest (name@sha256:...) or image id (sha256:...); resolve it with `docker inspect --format '{{{{index .RepoDigests 0}}}}' {image}` or `docker images --no-trunc`"),
                ));
            }
        }
        let mut resolved = Vec::new();
        for (i, (job, name)) in spec.input_refs().into_iter().enumerate() {
            let producer = match self.jobs.get(job) {
                Some(by_id) => Some(by_id),
                None => self
                    .jobs
                    .values()
                    .filter(|j| j.artifacts.contains_key(name))
                    .filter(|j| {
                        serde_json::from_str::<JobSpec>(&j.spec_json).is_ok_and(|s| s.name == job)
                    })
                    .max_by_key(|j| j.index),
            };
            let Some(producer) = producer else {
                return Err(refuse(
                    format!("inputs[{i}]"),
                    format!("no job has the id or name {job:?} with an artifact {name:?}"),
                ));
            };
            let Some(artifact) = producer.artifacts.get(name) else {
                let held: Vec<&String> = producer.artifacts.keys().collect();
                return Err(refuse(
                    format!("inputs[{i}]"),
                    format!(
                        "job {} ({}) holds no artifact {name:?}; it holds {held:?}",
                        producer.id,
                        producer.state.as_str()
                    ),
                ));
            };
            resolved.push(ResolvedInput {
                name: name.to_string(),
                job_id: producer.id.clone(),
                sha256: artifact.sha256.clone(),
                size_bytes: artifact.size_bytes,
            });
        }
        let total: u64 = resolved.iter().map(|r| r.size_bytes).sum();
        if total > ARTIFACTS_BYTES_PER_UNIT_MAX as u64 {
            return Err(refuse(
                "inputs".into(),
                format!(
                    "the inputs add up to {total} bytes, over the {ARTIFACTS_BYTES_PER_UNIT_MAX} an assignment carries"
                ),
            ));
        }
        Ok(resolved)
    }

    /// Outputs of a succeeded unit: recorded on its job (a name already recorded keeps its first
    /// bytes, so a retried shard cannot change what a consumer already read).
    pub(crate) fn record_artifacts(
        &mut self,
        allocation_id: &str,
        holder: u64,
        files: &[ArtifactMeta],
    ) {
        let Some(job_id) = self
            .allocations
            .get(allocation_id)
            .map(|a| a.job_id.clone())
        else {
            return;
        };
        let Some(job) = self.jobs.get_mut(&job_id) else {
            return;
        };
        for file in files {
            job.artifacts
                .entry(file.name.clone())
                .or_insert_with(|| file.clone());
            self.artifact_holders
                .entry(file.sha256.clone())
                .or_insert(holder);
        }
    }

    /// Every artifact checksum the cluster has recorded, with the member that first held it.
    pub fn artifact_checksums(&self) -> impl Iterator<Item = (&String, u64)> {
        self.artifact_holders
            .iter()
            .map(|(sha, holder)| (sha, *holder))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gantry_protocol::replicated::{Command, Op, Policy};

    fn command(op: Op) -> Command {
        Command {
            request_id: 0,
            at_unix_ms: 1,
            actor: "test".into(),
            op,
        }
    }

    fn submit(state: &mut State, index: u64, job_id: &str, spec: serde_json::Value) -> Outcome {
        let spec = gantry_protocol::jobspec::from_json_value(spec).expect("a valid spec");
        state.apply(
            index,
            &command(Op::SubmitJob {
                job_id: job_id.into(),
                idempotency_key: None,
                spec_json: spec.canonical_json(),
            }),
        )
    }

    fn holds(state: &mut State, job_id: &str, name: &str, sha: &str) {
        let meta = ArtifactMeta {
            name: name.into(),
            sha256: sha.into(),
            size_bytes: 10,
        };
        state
            .jobs
            .get_mut(job_id)
            .unwrap()
            .artifacts
            .insert(name.into(), meta);
    }

    #[test]
    fn the_digest_policy_refuses_tags_and_names_the_field() {
        let mut state = State::default();
        let tagged = serde_json::json!({ "name": "a", "kind": "batch", "image": "train:1" });
        assert!(matches!(
            submit(&mut state, 1, "j-1", tagged.clone()),
            Outcome::JobSubmitted { created: true, .. }
        ));
        state.apply(
            2,
            &command(Op::SetPolicy(Policy {
                require_digest: true,
            })),
        );
        match submit(&mut state, 3, "j-2", tagged) {
            Outcome::SubmitRefused { field, reason } => {
                assert_eq!(field, "image");
                assert!(reason.contains("pinned by digest"), "{reason}");
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        assert!(
            !state.jobs.contains_key("j-2"),
            "nothing of a refused job is kept"
        );
        let pinned = serde_json::json!({ "name": "a", "kind": "batch", "image": format!("train@sha256:{}", "b".repeat(64)) });
        assert!(matches!(
            submit(&mut state, 4, "j-3", pinned),
            Outcome::JobSubmitted { created: true, .. }
        ));
        let command_only = serde_json::json!({ "name": "a", "kind": "batch", "command": ["true"] });
        assert!(matches!(
            submit(&mut state, 5, "j-4", command_only),
            Outcome::JobSubmitted { created: true, .. }
        ));
    }

    #[test]
    fn inputs_resolve_to_the_newest_job_by_name_or_to_an_id() {
        let mut state = State::default();
        let train = serde_json::json!({ "name": "train", "kind": "training", "command": ["t"], "outputs": ["model.json"] });
        submit(&mut state, 1, "j-old", train.clone());
        submit(&mut state, 2, "j-new", train);
        holds(&mut state, "j-old", "model.json", &"1".repeat(64));
        holds(&mut state, "j-new", "model.json", &"2".repeat(64));
        let infer = |input: &str| serde_json::json!({ "name": "infer", "kind": "batch", "command": ["i"], "inputs": [input] });

        assert!(matches!(
            submit(&mut state, 3, "j-a", infer("train/model.json")),
            Outcome::JobSubmitted { created: true, .. }
        ));
        assert_eq!(
            state.jobs["j-a"].inputs[0].sha256,
            "2".repeat(64),
            "the newest job by that name"
        );
        assert_eq!(state.jobs["j-a"].inputs[0].job_id, "j-new");
        submit(&mut state, 4, "j-b", infer("j-old/model.json"));
        assert_eq!(
            state.jobs["j-b"].inputs[0].sha256,
            "1".repeat(64),
            "a job id pins that job"
        );

        for (index, input, needle) in [
            (
                5,
                "nobody/model.json",
                "no job has the id or name \"nobody\"",
            ),
            (6, "j-old/weights.bin", "holds no artifact \"weights.bin\""),
        ] {
            match submit(&mut state, index, "j-c", infer(input)) {
                Outcome::SubmitRefused { field, reason } => {
                    assert_eq!(field, "inputs[0]");
                    assert!(reason.contains(needle), "{reason}");
                }
                other => panic!("expected a refusal for {input}, got {other:?}"),
            }
        }
    }

    #[test]
    fn pinned_images_are_digests_or_ids() {
        let hex = "a".repeat(64);
        assert!(is_pinned_image(&format!(
            "registry.local/train@sha256:{hex}"
        )));
        assert!(is_pinned_image(&format!("sha256:{hex}")));
        assert!(!is_pinned_image("registry.local/train:1.2"));
        assert!(!is_pinned_image("train"));
        assert!(!is_pinned_image(&format!("@sha256:{hex}")));
        assert!(!is_pinned_image("train@sha256:abc"));
    }
}
