//! The image `gantry demo --runtime docker` runs its jobs from, built offline from this very
//! binary: a root file system holding `/usr/local/bin/gantry` (stripped of debug information
//! where `strip` is installed), every shared library `ldd` lists for it and a writable `/tmp`,
//! imported into the local daemon as `gantry-demo:<version>` (`docker import`). Nothing is
//! pulled and no registry is involved.
//!
//! The image carries the SHA-256 of the binary it was built from as a label, and is reused while
//! that matches: only a new build imports again. The demo keeps it for the next run.

use anyhow::{bail, Context, Result};
use bollard::Docker;
use gantry_agent::runtime::docker;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

pub const REPOSITORY: &str = "gantry-demo";
/// The image's label naming the binary it holds.
pub const LABEL_BINARY_SHA256: &str = "gantry.demo.binary-sha256";
/// Where the binary lies in the image, and so the `PATH` it is found on.
const BINARY_IN_IMAGE: &str = "/usr/local/bin/gantry";
const PATH_IN_IMAGE: &str = "/usr/local/bin:/usr/bin:/bin";

/// The demo's image in the local daemon.
pub struct DemoImage {
    /// `gantry-demo:<version>`: what the jobs name.
    pub reference: String,
    /// `sha256:…`.
    pub id: String,
    /// Found already built from this binary, rather than imported now.
    pub reused: bool,
}

/// `gantry-demo:<version>` built from this binary, reusing the local image when it holds the
/// same binary.
pub async fn ensure(docker: &Docker) -> Result<DemoImage> {
    let reference = format!("{REPOSITORY}:{}", env!("CARGO_PKG_VERSION"));
    let exe = std::env::current_exe().context("find this binary")?;
    let binary_sha256 = {
        let exe = exe.clone();
        tokio::task::spawn_blocking(move || crate::bundle::sha256_hex_of_file(&exe))
            .await
            .context("join the binary's checksum")??
    };
    let previous = docker::local_image(docker, &reference)
        .await
        .map_err(anyhow::Error::msg)?;
    if let Some((id, labels)) = &previous {
        if labels.get(LABEL_BINARY_SHA256) == Some(&binary_sha256) {
            return Ok(DemoImage {
                reference,
                id: id.clone(),
                reused: true,
            });
        }
    }
    let staging = tempfile::Builder::new()
        .prefix("gantry-demo-image-")
        .tempdir()
        .context("create a staging dir for the image")?;
    let tar = {
        let staging = staging.path().to_path_buf();
        tokio::task::spawn_blocking(move || root_filesystem_tar(&exe, &staging))
            .await
            .context("join the image's root file system")??
    };
    let changes = vec![
        format!("ENV PATH={PATH_IN_IMAGE}"),
        format!("LABEL {LABEL_BINARY_SHA256}={binary_sha256}"),
        format!(r#"CMD ["{BINARY_IN_IMAGE}", "--help"]"#),
    ];
    let id = docker::import_root_filesystem(docker, &tar, &reference, changes)
        .await
        .map_err(anyhow::Error::msg)?;
    // The image of an older build lost its tag to this one: removed rather than left dangling
    // with every rebuild. Kept if a container still uses it.
    if let Some((previous_id, _)) = previous.filter(|(previous_id, _)| *previous_id != id) {
        let kept = docker
            .remove_image(
                &previous_id,
                None::<bollard::query_parameters::RemoveImageOptions>,
                None,
            )
            .await;
        if let Err(e) = kept {
            tracing::debug!(image = %previous_id, "kept the previous demo image: {e}");
        }
    }
    Ok(DemoImage {
        reference,
        id,
        reused: false,
    })
}

/// Writes the image's root file system under `staging` and archives it; the archive's path.
fn root_filesystem_tar(exe: &Path, staging: &Path) -> Result<PathBuf> {
    let root = staging.join("root");
    let tmp = root.join("tmp");
    std::fs::create_dir_all(&tmp).context("create the image's /tmp")?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o1777))
        .context("make the image's /tmp writable by all")?;

    // Without its debug information a debug build is a tenth of the size to import.
    let binary = root.join(BINARY_IN_IMAGE.trim_start_matches('/'));
    std::fs::create_dir_all(binary.parent().context("the binary's directory")?)
        .context("create the image's /usr/local/bin")?;
    let stripped = Command::new("strip")
        .arg("-o")
        .arg(&binary)
        .arg(exe)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    if !stripped {
        std::fs::copy(exe, &binary).with_context(|| format!("copy {}", exe.display()))?;
    }

    for library in shared_libraries(exe)? {
        let target = root.join(library.trim_start_matches('/'));
        std::fs::create_dir_all(target.parent().context("a library's directory")?)
            .with_context(|| format!("create the directory of {library}"))?;
        // `copy` follows links: the image holds the file under the name the loader asks for.
        std::fs::copy(&library, &target).with_context(|| format!("copy {library}"))?;
    }

    let tar = staging.join("root.tar");
    let archived = Command::new("tar")
        .arg("-C")
        .arg(&root)
        .arg("-cf")
        .arg(&tar)
        .arg(".")
        .stdin(Stdio::null())
        .status()
        .context("run tar")?;
    if !archived.success() {
        bail!("tar could not archive the image's root file system ({archived})");
    }
    Ok(tar)
}

/// The host path of each shared library `binary` loads, the dynamic loader included.
fn shared_libraries(binary: &Path) -> Result<Vec<String>> {
    let output = Command::new("ldd")
        .arg(binary)
        .stdin(Stdio::null())
        .output()
        .context("run ldd to list this binary's shared libraries")?;
    let text = String::from_utf8_lossy(&output.stdout);
    // A static binary: `ldd` says so and fails; it needs no libraries.
    if !output.status.success() {
        return Ok(Vec::new());
    }
    Ok(parse_ldd(&text))
}

/// `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)` and `/lib64/ld-linux-x86-64.so.2 (0x…)`
/// give their paths; `linux-vdso.so.1 (0x…)` is the kernel's and gives none.
fn parse_ldd(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|line| {
            line.split_whitespace()
                .find(|word| word.starts_with('/'))
                .map(str::to_string)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_lines_give_the_paths_of_loaded_libraries() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f)\n\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n\t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n";
        assert_eq!(
            parse_ldd(text),
            [
                "/lib/x86_64-linux-gnu/libgcc_s.so.1",
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib64/ld-linux-x86-64.so.2"
            ]
        );
    }
}
