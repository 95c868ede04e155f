//! `gantry bundle` and the offline install from it, with the real programs: the static binary
//! built by `deploy/build-static.sh` writes the bundle; the bundle is unpacked and installed
//! inside a network namespace of its own that has no route anywhere (`unshare --net`), where
//! three coordinators and an agent start from what was installed and run a batch job; `strace`
//! records every address any of those processes tried to reach, and each must be loopback.
//! The bundle's image of the binary is loaded into the real Docker daemon and run there.
//!
//! Needs `unshare`, `ip` and `strace` (`.ci/run` installs strace), a Docker daemon, and the
//! musl target and musl-gcc, which `deploy/build-static.sh` installs where they are missing.
//! The first run builds the static binary (minutes); later runs only relink what changed.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

const VERSION: &str = env!("CARGO_PKG_VERSION");

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The static `gantry`, built once for all the tests here.
fn static_binary() -> &'static Path {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| {
        let output = Command::new("bash")
            .arg(repo().join("deploy/build-static.sh"))
            .args(["--dev", "--print-path"])
            .stderr(std::process::Stdio::inherit())
            .output()
            .expect("run deploy/build-static.sh");
        assert!(
            output.status.success(),
            "deploy/build-static.sh failed: {}",
            output.status
        );
        let path = PathBuf::from(String::from_utf8(output.stdout).unwrap().trim());
        assert!(
            path.is_file(),
            "build-static.sh printed {path:?}, not a file"
        );
        path
    })
}

fn run(command: &mut Command) -> Output {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("run {command:?}: {e}"));
    assert!(
        output.status.success(),
        "{command:?} failed ({}):\nstdout: {}\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

fn sha256_of(path: &Path) -> String {
    gantry_bundle_sha256(&std::fs::read(path).unwrap())
}

fn gantry_bundle_sha256(bytes: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, bytes))
}

/// Writes a bundle with the static binary (which ships itself) and unpacks it; the unpacked
/// bundle's directory.
fn bundle_into(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let tarball = dir.join(format!("{name}.tar.gz"));
    let output = run(Command::new(static_binary())
        .arg("bundle")
        .arg("-o")
        .arg(&tarball));
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        tarball.display().to_string(),
        "bundle prints the path it wrote"
    );
    let unpacked = dir.join(format!("{name}-unpacked"));
    std::fs::create_dir_all(&unpacked).unwrap();
    run(Command::new("tar")
        .arg("-xzf")
        .arg(&tarball)
        .arg("-C")
        .arg(&unpacked));
    let top = unpacked.join(format!("gantry-{VERSION}-{}-linux", std::env::consts::ARCH));
    assert!(top.is_dir(), "the bundle's top directory {top:?}");
    (tarball, top)
}

#[test]
fn a_dynamically_linked_binary_is_refused_with_the_way_to_build_a_static_one() {
    let dir = tempfile::tempdir().unwrap();
    let tarball = dir.path().join("out.tar.gz");
    let output = Command::new(env!("CARGO_BIN_EXE_gantry"))
        .arg("bundle")
        .arg("-o")
        .arg(&tarball)
        .output()
        .unwrap();
    assert!(!output.status.success(), "the glibc build bundled itself");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("linked dynamically") && stderr.contains("deploy/build-static.sh"),
        "{stderr}"
    );
    assert!(!tarball.exists(), "a refused bundle left {tarball:?}");
}

#[test]
fn the_bundle_holds_what_its_manifest_lists_and_is_reproducible() {
    let dir = tempfile::tempdir().unwrap();
    let (first, top) = bundle_into(dir.path(), "first");
    let (second, _) = bundle_into(dir.path(), "second");
    assert_eq!(
        sha256_of(&first),
        sha256_of(&second),
        "two bundles of the same binary differ"
    );

    let manifest = std::fs::read_to_string(top.join("MANIFEST")).unwrap();
    let listed: BTreeSet<&str> = manifest
        .lines()
        .map(|line| {
            let (sum, path) = line.split_once("  ").expect("SUM  PATH");
            assert_eq!(sum, sha256_of(&top.join(path)), "{path}'s sum");
            path
        })
        .collect();
    let image = format!("images/gantry-{VERSION}.tar");
    for path in [
        "bin/gantry",
        image.as_str(),
        "install.sh",
        "systemd/gantry-coordinator.service",
        "systemd/gantry-agent.service",
        "config/coordinator.toml",
        "config/agent.toml",
    ] {
        assert!(listed.contains(path), "MANIFEST lacks {path}: {manifest}");
    }
    assert_eq!(
        sha256_of(&top.join("bin/gantry")),
        sha256_of(static_binary()),
        "the bundle ships another binary"
    );
    let version = run(Command::new(top.join("bin/gantry")).arg("--version"));
    assert!(String::from_utf8_lossy(&version.stdout).contains(VERSION));

    // A damaged file stops the install before anything is written.
    std::fs::write(top.join("config/agent.toml"), "site = \"tampered\"\n").unwrap();
    let root = dir.path().join("root");
    let output = Command::new(top.join("install.sh"))
        .arg("--root")
        .arg(&root)
        .arg("--no-images")
        .output()
        .unwrap();
    assert!(
        !output.status.success(),
        "install.sh installed a damaged bundle"
    );
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("damaged"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(!root.exists(), "a refused install wrote {root:?}");
}

/// Every address in an strace record of connect, sendto, sendmsg and sendmmsg calls.
fn addresses_in_trace(trace: &str) -> Vec<String> {
    // Only destinations: a socket address's `sin_addr=inet_addr("A")` or
    // `inet_pton(AF_INET6, "A", &sin6_addr)`, not the source addresses of IP_PKTINFO control
    // messages (`ipi_addr=inet_addr("0.0.0.0")`).
    let mut addresses = Vec::new();
    for line in trace.lines() {
        for (marker, after) in [
            ("sin_addr=inet_addr(\"", "\""),
            ("inet_pton(AF_INET6, \"", "\", &sin6_addr"),
        ] {
            let mut rest = line;
            while let Some(at) = rest.find(marker) {
                rest = &rest[at + marker.len()..];
                let address = rest.split('"').next().unwrap_or_default();
                if rest[address.len()..].starts_with(after) {
                    addresses.push(address.to_string());
                }
            }
        }
    }
    addresses
}

fn is_loopback(address: &str) -> bool {
    match address.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(v4)) => v4.is_loopback(),
        Ok(std::net::IpAddr::V6(v6)) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
        Err(_) => false,
    }
}

#[test]
fn trace_addresses_are_read_from_each_kind_of_call() {
    let trace = r#"
12 connect(9, {sa_family=AF_INET, sin_port=htons(7443), sin_addr=inet_addr("127.0.0.1")}, 16) = 0
13 sendmsg(10, {msg_name={sa_family=AF_INET6, sin6_port=htons(7443), sin6_flowinfo=htonl(0), inet_pton(AF_INET6, "::1", &sin6_addr), sin6_scope_id=0}, msg_namelen=28}, 0) = 1200
14 connect(11, {sa_family=AF_INET, sin_port=htons(443), sin_addr=inet_addr("10.1.2.3")}, 16) = -1 ENETUNREACH (Network is unreachable)
15 connect(12, {sa_family=AF_UNIX, sun_path="/var/run/docker.sock"}, 23) = -1 ENOENT
16 sendmsg(9, {msg_name={sa_family=AF_INET, sin_port=htons(36043), sin_addr=inet_addr("127.0.0.1")}, msg_namelen=16, msg_control=[{cmsg_len=28, cmsg_level=SOL_IP, cmsg_type=IP_PKTINFO, cmsg_data={ipi_ifindex=0, ipi_spec_dst=inet_addr("127.0.0.1"), ipi_addr=inet_addr("0.0.0.0")}}], msg_flags=0}, 0) = 34
17 sendmsg(9, {msg_name={sa_family=AF_INET6, sin6_port=htons(1), inet_pton(AF_INET6, "::1", &sin6_addr)}, msg_control=[{cmsg_data={ipi6_addr=inet_pton(AF_INET6, "::"), ipi6_ifindex=0}}]}, 0) = 34
"#;
    let addresses = addresses_in_trace(trace);
    assert_eq!(
        addresses,
        ["127.0.0.1", "::1", "10.1.2.3", "127.0.0.1", "::1"]
    );
    let outbound: Vec<_> = addresses.iter().filter(|a| !is_loopback(a)).collect();
    assert_eq!(outbound, ["10.1.2.3"]);
    assert!(is_loopback("::ffff:127.0.0.1") && !is_loopback("0.0.0.0"));
}

#[test]
fn an_offline_site_installs_three_coordinators_and_an_agent_and_runs_a_job() {
    let dir = tempfile::tempdir().unwrap();
    let (_, top) = bundle_into(dir.path(), "offline");
    let root = dir.path().join("root");
    let trace = dir.path().join("trace");
    // Bounded: a process left running would keep strace, and this test, waiting.
    let output = Command::new("timeout")
        .args(["300", "unshare", "--user", "--map-root-user", "--net", "--"])
        .args([
            "strace",
            "-f",
            "-qq",
            "-e",
            "trace=connect,sendto,sendmsg,sendmmsg",
        ])
        .arg("-o")
        .arg(&trace)
        .arg("sh")
        .arg(repo().join("tests/bundle/offline.sh"))
        .arg(&top)
        .arg(&root)
        .env_remove("GANTRY_API")
        .env_remove("GANTRY_TOKEN")
        .output()
        .expect("run unshare and strace (apt-get install strace)");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the offline install failed ({}):\nstdout: {}\nstderr: {stderr}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
    );
    assert!(stderr.contains("succeeded offline"), "{stderr}");

    let trace = std::fs::read_to_string(&trace).unwrap();
    let addresses = addresses_in_trace(&trace);
    assert!(
        addresses.iter().any(|a| is_loopback(a)),
        "the trace saw no connection at all, so it proves nothing:\n{trace}"
    );
    let outbound: Vec<&str> = trace
        .lines()
        .filter(|line| addresses_in_trace(line).iter().any(|a| !is_loopback(a)))
        .collect();
    assert!(
        outbound.is_empty(),
        "processes of the offline install tried to reach beyond loopback:\n{}",
        outbound.join("\n")
    );
}

/// Removes an image from the local daemon when dropped.
struct RemoveImage(String);

impl Drop for RemoveImage {
    fn drop(&mut self) {
        let _ = Command::new("docker")
            .args(["image", "rm", "-f", &self.0])
            .output();
    }
}

#[test]
fn the_bundles_image_loads_into_docker_and_runs_the_binary() {
    let dir = tempfile::tempdir().unwrap();
    let (_, top) = bundle_into(dir.path(), "image");
    let image = format!("gantry:{VERSION}");
    let _remove = RemoveImage(image.clone());
    run(Command::new(top.join("bin/gantry"))
        .args(["images", "load"])
        .arg(top.join(format!("images/gantry-{VERSION}.tar"))));
    let output = run(Command::new("docker").args([
        "run",
        "--rm",
        "--network",
        "none",
        &image,
        "gantry",
        "--version",
    ]));
    assert!(
        String::from_utf8_lossy(&output.stdout).contains(VERSION),
        "{}",
        String::from_utf8_lossy(&output.stdout)
    );
    let label = run(Command::new("docker").args([
        "image",
        "inspect",
        "--format",
        "{{ index .Config.Labels \"gantry.binary-sha256\" }}",
        &image,
    ]));
    assert_eq!(
        String::from_utf8_lossy(&label.stdout).trim(),
        sha256_of(static_binary()),
        "the image's label names another binary"
    );
}
