//! `gantry bundle`: one tarball from which a site with no network installs Gantry. It holds the
//! static binary, an image of it for Docker hosts (written here in `docker save`'s format, so no
//! daemon or registry is needed to make it), any other images named, the systemd units, example
//! configs, an install script and a `MANIFEST` of SHA-256 sums that the script checks first.
//!
//! The bundle is reproducible: the same binary and images give the same bytes (entries in a fixed
//! order, owned by root, stamped at the epoch; gzip without a time stamp).

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::json;
use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

const VERSION: &str = env!("CARGO_PKG_VERSION");
/// Where the binary lies in the runtime image, and so the `PATH` it is found on.
const BINARY_IN_IMAGE: &str = "usr/local/bin/gantry";
const PATH_IN_IMAGE: &str = "/usr/local/bin:/usr/bin:/bin";
/// The runtime image's label naming the binary it holds.
const LABEL_BINARY_SHA256: &str = "gantry.binary-sha256";
const HASH_READ_CHUNK_BYTES: usize = 1024 * 1024;

const INSTALL_SCRIPT: &str = include_str!("../deploy/install.sh");
/// What the bundle holds besides the binary and the images: (path in the bundle, text, mode).
const TEXT_FILES: &[(&str, &str, u32)] = &[
    ("install.sh", INSTALL_SCRIPT, 0o755),
    (
        "systemd/gantry-coordinator.service",
        include_str!("../deploy/systemd/gantry-coordinator.service"),
        0o644,
    ),
    (
        "systemd/gantry-agent.service",
        include_str!("../deploy/systemd/gantry-agent.service"),
        0o644,
    ),
    (
        "config/coordinator.toml",
        include_str!("../deploy/coordinator.toml"),
        0o644,
    ),
    (
        "config/agent.toml",
        include_str!("../deploy/agent.toml"),
        0o644,
    ),
];

#[derive(Args)]
pub struct BundleArgs {
    /// The tarball to write [default: gantry-VERSION-ARCH-linux.tar.gz in the current directory].
    #[arg(short, long)]
    output: Option<PathBuf>,
    /// The binary to ship: it must be statically linked (`deploy/build-static.sh` builds one)
    /// [default: this binary].
    #[arg(long)]
    binary: Option<PathBuf>,
    /// Also ship this image of the local Docker daemon (repeatable), for jobs that name it.
    #[arg(long = "image", value_name = "IMAGE")]
    images: Vec<String>,
}

pub async fn run(args: BundleArgs) -> Result<()> {
    let binary = match args.binary {
        Some(binary) => binary,
        None => std::env::current_exe().context("find this binary")?,
    };
    match linkage(&binary)? {
        Linkage::Static => {}
        Linkage::Dynamic { interpreter } => bail!(
            "{} is linked dynamically (it needs the loader {interpreter}), so it would not run on a host with another C library; build the static binary with `deploy/build-static.sh` and pass it with --binary",
            binary.display()
        ),
    }
    let arch = std::env::consts::ARCH;
    let name = format!("gantry-{VERSION}-{arch}-linux");
    let output = args
        .output
        .unwrap_or_else(|| PathBuf::from(format!("{name}.tar.gz")));
    let staging = tempfile::Builder::new()
        .prefix("gantry-bundle-")
        .tempdir()
        .context("create a staging dir for the bundle")?;

    let mut images = Vec::new();
    let runtime_image = staging.path().join(format!("gantry-{VERSION}.tar"));
    {
        let (binary, runtime_image) = (binary.clone(), runtime_image.clone());
        tokio::task::spawn_blocking(move || write_runtime_image(&binary, &runtime_image, arch))
            .await
            .context("join the runtime image's writer")??;
    }
    images.push(runtime_image);
    if !args.images.is_empty() {
        let docker = gantry_agent::runtime::docker::connect()
            .await
            .map_err(anyhow::Error::msg)
            .context("connect to the local Docker daemon for --image")?;
        for image in &args.images {
            let path = staging
                .path()
                .join(format!("{}.tar", file_name_of_image(image)));
            export_image(&docker, image, &path)
                .await
                .with_context(|| format!("export --image {image}"))?;
            images.push(path);
        }
    }

    let written = {
        let output = output.clone();
        let name = name.clone();
        tokio::task::spawn_blocking(move || write_bundle(&output, &name, &binary, &images))
            .await
            .context("join the bundle's writer")??
    };
    eprintln!(
        "wrote {} ({:.1} MiB): install with `tar -xzf {} && {}/install.sh`",
        output.display(),
        written as f64 / (1024.0 * 1024.0),
        output.display(),
        name,
    );
    println!("{}", output.display());
    Ok(())
}

#[derive(Debug, PartialEq, Eq)]
pub enum Linkage {
    Static,
    Dynamic { interpreter: String },
}

/// Whether an ELF executable names a program interpreter (the dynamic loader), read from its
/// program headers.
pub fn linkage(path: &Path) -> Result<Linkage> {
    let mut file = File::open(path).with_context(|| format!("open {}", path.display()))?;
    let mut header = [0u8; 64];
    file.read_exact(&mut header)
        .with_context(|| format!("{} is too short to be an executable", path.display()))?;
    if &header[..4] != b"\x7fELF" || header[4] != 2 || header[5] != 1 {
        bail!(
            "{} is not a 64-bit little-endian ELF executable",
            path.display()
        );
    }
    let u16_at = |at: usize| u16::from_le_bytes([header[at], header[at + 1]]);
    let program_headers_at = u64::from_le_bytes(header[0x20..0x28].try_into().expect("8 bytes"));
    let (entry_bytes, n_entries) = (u16_at(0x36) as usize, u16_at(0x38) as usize);
    if entry_bytes < 56 {
        bail!("{} has malformed program headers", path.display());
    }
    let mut table = vec![0u8; entry_bytes * n_entries];
    file.seek(SeekFrom::Start(program_headers_at))
        .and_then(|_| file.read_exact(&mut table))
        .with_context(|| format!("read the program headers of {}", path.display()))?;
    const PT_INTERP: u32 = 3;
    for entry in table.chunks_exact(entry_bytes) {
        if u32::from_le_bytes(entry[..4].try_into().expect("4 bytes")) != PT_INTERP {
            continue;
        }
        let offset = u64::from_le_bytes(entry[8..16].try_into().expect("8 bytes"));
        let size = u64::from_le_bytes(entry[32..40].try_into().expect("8 bytes")).min(4096);
        let mut interpreter = vec![0u8; size as usize];
        file.seek(SeekFrom::Start(offset))
            .and_then(|_| file.read_exact(&mut interpreter))
            .with_context(|| format!("read the interpreter of {}", path.display()))?;
        let interpreter = String::from_utf8_lossy(&interpreter)
            .trim_end_matches('\0')
            .to_string();
        return Ok(Linkage::Dynamic { interpreter });
    }
    Ok(Linkage::Static)
}

/// `registry.local/team/train:1` -> `registry.local_team_train_1`: a file name for an image.
fn file_name_of_image(image: &str) -> String {
    image
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

async fn export_image(docker: &bollard::Docker, image: &str, path: &Path) -> Result<()> {
    use futures_util::StreamExt;
    let mut file = tokio::fs::File::create(path)
        .await
        .with_context(|| format!("create {}", path.display()))?;
    let mut chunks = std::pin::pin!(docker.export_image(image));
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk.context("the daemon could not export it (is it a local image?)")?;
        tokio::io::AsyncWriteExt::write_all(&mut file, &chunk)
            .await
            .with_context(|| format!("write {}", path.display()))?;
    }
    tokio::io::AsyncWriteExt::flush(&mut file).await?;
    Ok(())
}

/// A tar header for a file or directory owned by root, stamped at the epoch.
fn header(entry_type: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(entry_type);
    header.set_mode(mode);
    header.set_size(size);
    header.set_mtime(0);
    header.set_uid(0);
    header.set_gid(0);
    header
}

fn append_file<W: Write>(
    archive: &mut tar::Builder<W>,
    path: &str,
    mode: u32,
    source: &Path,
) -> Result<()> {
    let file = File::open(source).with_context(|| format!("open {}", source.display()))?;
    let size = file.metadata()?.len();
    let mut header = header(tar::EntryType::Regular, mode, size);
    archive
        .append_data(&mut header, path, file)
        .with_context(|| format!("archive {}", source.display()))
}

fn append_bytes<W: Write>(
    archive: &mut tar::Builder<W>,
    path: &str,
    mode: u32,
    bytes: &[u8],
) -> Result<()> {
    let mut header = header(tar::EntryType::Regular, mode, bytes.len() as u64);
    archive
        .append_data(&mut header, path, bytes)
        .with_context(|| format!("archive {path}"))
}

fn append_dir<W: Write>(archive: &mut tar::Builder<W>, path: &str, mode: u32) -> Result<()> {
    let mut header = header(tar::EntryType::Directory, mode, 0);
    archive
        .append_data(&mut header, path, std::io::empty())
        .with_context(|| format!("archive {path}"))
}

pub fn sha256_hex_of_file(path: &Path) -> Result<String> {
    let mut file = File::open(path).with_context(|| format!("open {}", path.display()))?;
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buffer = vec![0; HASH_READ_CHUNK_BYTES];
    loop {
        let n_bytes = file
            .read(&mut buffer)
            .with_context(|| format!("read {}", path.display()))?;
        if n_bytes == 0 {
            break;
        }
        context.update(&buffer[..n_bytes]);
    }
    Ok(hex::encode(context.finish()))
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, bytes))
}

/// Writes `gantry:VERSION` in the format `docker save` writes (and `docker load`, so
/// `gantry images load`, reads): one layer holding the binary and a writable `/tmp`, its
/// config, and a `manifest.json` naming both.
fn write_runtime_image(binary: &Path, path: &Path, arch: &str) -> Result<()> {
    let staging = path.with_extension("layer");
    {
        let mut layer = tar::Builder::new(BufWriter::new(
            File::create(&staging).with_context(|| format!("create {}", staging.display()))?,
        ));
        append_dir(&mut layer, "tmp/", 0o1777)?;
        for dir in ["usr/", "usr/local/", "usr/local/bin/"] {
            append_dir(&mut layer, dir, 0o755)?;
        }
        append_file(&mut layer, BINARY_IN_IMAGE, 0o755, binary)?;
        layer.into_inner()?.flush()?;
    }
    let layer_sha256 = sha256_hex_of_file(&staging)?;
    let config = json!({
        "architecture": docker_architecture(arch),
        "os": "linux",
        "created": "1970-01-01T00:00:00Z",
        "config": {
            "Env": [format!("PATH={PATH_IN_IMAGE}")],
            "Cmd": ["gantry", "--help"],
            "Labels": { LABEL_BINARY_SHA256: sha256_hex_of_file(binary)? },
        },
        "rootfs": { "type": "layers", "diff_ids": [format!("sha256:{layer_sha256}")] },
        "history": [{ "created": "1970-01-01T00:00:00Z", "created_by": "gantry bundle" }],
    });
    let config = serde_json::to_vec(&config)?;
    let config_name = format!("{}.json", sha256_hex(&config));
    let layer_name = format!("{layer_sha256}/layer.tar");
    let manifest = serde_json::to_vec(&json!([{
        "Config": config_name,
        "RepoTags": [format!("gantry:{VERSION}")],
        "Layers": [layer_name],
    }]))?;

    let mut image = tar::Builder::new(BufWriter::new(
        File::create(path).with_context(|| format!("create {}", path.display()))?,
    ));
    append_bytes(&mut image, &config_name, 0o644, &config)?;
    append_dir(&mut image, &format!("{layer_sha256}/"), 0o755)?;
    append_file(&mut image, &layer_name, 0o644, &staging)?;
    append_bytes(&mut image, "manifest.json", 0o644, &manifest)?;
    image.into_inner()?.flush()?;
    std::fs::remove_file(&staging).with_context(|| format!("remove {}", staging.display()))?;
    Ok(())
}

fn docker_architecture(arch: &str) -> &str {
    match arch {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// Writes the bundle under the top directory `name`; its size in bytes.
fn write_bundle(output: &Path, name: &str, binary: &Path, images: &[PathBuf]) -> Result<u64> {
    // (path in the bundle, SHA-256), for MANIFEST, in the order written.
    let mut sums = Vec::new();
    let file = File::create(output).with_context(|| format!("create {}", output.display()))?;
    let gzip = flate2::GzBuilder::new().write(BufWriter::new(file), flate2::Compression::default());
    let mut archive = tar::Builder::new(gzip);
    append_dir(&mut archive, &format!("{name}/"), 0o755)?;
    for dir in ["bin", "images", "systemd", "config"] {
        append_dir(&mut archive, &format!("{name}/{dir}/"), 0o755)?;
    }
    append_file(&mut archive, &format!("{name}/bin/gantry"), 0o755, binary)?;
    sums.push(("bin/gantry".to_string(), sha256_hex_of_file(binary)?));
    for image in images {
        let file_name = image
            .file_name()
            .and_then(|n| n.to_str())
            .context("an image file's name")?;
        let path = format!("images/{file_name}");
        append_file(&mut archive, &format!("{name}/{path}"), 0o644, image)?;
        sums.push((path, sha256_hex_of_file(image)?));
    }
    for (path, text, mode) in TEXT_FILES {
        append_bytes(
            &mut archive,
            &format!("{name}/{path}"),
            *mode,
            text.as_bytes(),
        )?;
        sums.push((path.to_string(), sha256_hex(text.as_bytes())));
    }
    let manifest: String = sums
        .iter()
        .map(|(path, sum)| format!("{sum}  {path}\n"))
        .collect();
    append_bytes(
        &mut archive,
        &format!("{name}/MANIFEST"),
        0o644,
        manifest.as_bytes(),
    )?;
    let mut writer = archive.into_inner()?.finish()?;
    writer.flush()?;
    let file = writer.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()
        .with_context(|| format!("sync {}", output.display()))?;
    Ok(file.metadata()?.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_names_become_file_names() {
        assert_eq!(
            file_name_of_image("registry.local/vision/train:1"),
            "registry.local_vision_train_1"
        );
        assert_eq!(file_name_of_image("gantry@sha256:ab"), "gantry_sha256_ab");
    }

    #[test]
    fn a_dynamically_linked_executable_names_its_loader() {
        // The test binary itself is linked like the rest of the build: dynamically on glibc.
        let exe = std::env::current_exe().unwrap();
        match linkage(&exe).unwrap() {
            Linkage::Dynamic { interpreter } => {
                assert!(interpreter.contains("ld-"), "interpreter {interpreter:?}")
            }
            Linkage::Static => {
                let musl = cfg!(target_env = "musl");
                assert!(musl, "a glibc test binary read as static")
            }
        }
    }

    #[test]
    fn a_file_that_is_not_elf_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("script.sh");
        std::fs::write(&path, "#!/bin/sh\necho not an executable of ours, but long enough to read a header from it ..........\n").unwrap();
        let error = linkage(&path).unwrap_err().to_string();
        assert!(
            error.contains("script.sh") && error.contains("ELF"),
            "{error}"
        );
    }
}
