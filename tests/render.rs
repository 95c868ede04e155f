//! `gantry render`: every example with an image renders for both runtimes, as YAML documents or a
//! JSON array, and a job without an image is refused naming the field.

mod common;

use common::gantry;

#[test]
fn examples_render_for_docker_and_kubernetes() {
    let examples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut rendered = 0;
    for entry in std::fs::read_dir(&examples).unwrap() {
        let path = entry.unwrap().path();
        if !matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "toml")
        ) {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let has_image = text.lines().any(|l| l.starts_with("image"));
        for runtime in ["docker", "kubernetes"] {
            let output = gantry()
                .args([
                    "render",
                    path.to_str().unwrap(),
                    "--runtime",
                    runtime,
                    "-o",
                    "json",
                ])
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&output.stderr);
            if !has_image {
                assert!(
                    !output.status.success(),
                    "{}: rendered without an image",
                    path.display()
                );
                assert!(stderr.contains("image:"), "{stderr}");
                continue;
            }
            assert!(
                output.status.success(),
                "{} {runtime}: {stderr}",
                path.display()
            );
            let documents: Vec<serde_json::Value> = serde_json::from_slice(&output.stdout).unwrap();
            assert!(!documents.is_empty());
            if runtime == "kubernetes" {
                assert!(documents
                    .iter()
                    .all(|d| d["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "gantry"));
            } else {
                assert!(documents
                    .iter()
                    .all(|d| d["body"]["Labels"]["gantry.job"].is_string()));
            }
            rendered += 1;
        }
    }
    assert!(rendered >= 4, "only {rendered} renders");
    let yaml = gantry()
        .args([
            "render",
            examples.join("vllm-serving.yaml").to_str().unwrap(),
            "--runtime",
            "kubernetes",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8(yaml.stdout).unwrap();
    assert!(
        text.starts_with("---\n")
            && text.contains("kind: Deployment")
            && text.contains("kind: Service"),
        "{text}"
    );
}
