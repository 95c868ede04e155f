//! A container image for tests, built offline: a root file system of host binaries (`sh`,
//! `sleep`, `cat`, `echo`, `env`, `head` and the `gantry` binary under test) with every shared
//! library `ldd` lists, imported into the local Docker daemon under a tag unique to this test
//! process. Built once per test binary; removed with the containers made from it when the
//! process exits. Images left by test processes that died are removed first.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::OnceLock;

/// The repository of every test image; the tag is `<pid>-<nanos>` of the process that built it.
pub const TEST_REPOSITORY: &str = "gantry-test";
/// The image's default command (`CMD`), for units that give none.
pub const DEFAULT_COMMAND_OUTPUT: &str = "the image's default command ran";

const HOST_BINARIES: &[&str] = &["sh", "sleep", "cat", "echo", "env", "head"];

pub struct TestImage {
    /// `gantry-test:<pid>-<nanos>`.
    pub tag: String,
    /// `sha256:…`.
    pub id: String,
}

/// Runs `docker` with `args`; its stdout, or a panic naming the command and its stderr.
pub fn docker(args: &[&str]) -> String {
    let output = Command::new("docker")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run the docker CLI");
    assert!(
        output.status.success(),
        "docker {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("docker prints UTF-8")
}

/// `docker` that may fail: whether it succeeded.
fn docker_quietly(args: &[&str]) -> bool {
    Command::new("docker")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

/// Force-removes every container matching a `docker ps` filter (`label=…`, `ancestor=…`).
pub fn remove_containers(filter: &str) {
    let ids = docker(&["ps", "-aq", "--no-trunc", "--filter", filter]);
    let ids: Vec<&str> = ids.split_whitespace().collect();
    if !ids.is_empty() {
        let mut args = vec!["rm", "-f"];
        args.extend(ids);
        docker_quietly(&args);
    }
}

/// The image, built on first use by this process.
pub fn test_image() -> &'static TestImage {
    static IMAGE: OnceLock<TestImage> = OnceLock::new();
    IMAGE.get_or_init(|| {
        remove_images_of_dead_test_processes();
        let image = build();
        // SAFETY: registers a plain `extern "C"` function; it runs once, at process exit.
        unsafe { libc::atexit(remove_this_process_image) };
        image
    })
}

extern "C" fn remove_this_process_image() {
    if let Some(image) = IMAGE_ID_FOR_EXIT.get() {
        remove_image(image);
    }
}

static IMAGE_ID_FOR_EXIT: OnceLock<String> = OnceLock::new();

fn remove_image(id: &str) {
    // Containers first: an image in use cannot be removed cleanly.
    if let Ok(output) = Command::new("docker")
        .args([
            "ps",
            "-aq",
            "--no-trunc",
            "--filter",
            &format!("ancestor={id}"),
        ])
        .stderr(Stdio::null())
        .output()
    {
        let ids = String::from_utf8_lossy(&output.stdout).to_string();
        let ids: Vec<&str> = ids.split_whitespace().collect();
        if !ids.is_empty() {
            let mut args = vec!["rm", "-f"];
            args.extend(ids);
            docker_quietly(&args);
        }
    }
    docker_quietly(&["rmi", "-f", id]);
}

/// A test image is left alone this long even when its process seems gone: a test process in
/// another PID namespace sharing the daemon is not in this one's `/proc`.
const LEFTOVER_AGE_MIN: std::time::Duration = std::time::Duration::from_secs(15 * 60);

/// Images whose tag names a process that is gone (a run that crashed or was killed), made long
/// enough ago that no test run could still be using them.
fn remove_images_of_dead_test_processes() {
    let now_nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let listing = docker(&[
        "images",
        TEST_REPOSITORY,
        "--no-trunc",
        "--format",
        "{{.Tag}} {{.ID}}",
    ]);
    for line in listing.lines() {
        let Some((tag, id)) = line.split_once(' ') else {
            continue;
        };
        let Some((pid, nanos)) = tag
            .split_once('-')
            .and_then(|(pid, nanos)| Some((pid.parse::<u32>().ok()?, nanos.parse::<u128>().ok()?)))
        else {
            continue;
        };
        let old_enough = now_nanos.saturating_sub(nanos) > LEFTOVER_AGE_MIN.as_nanos();
        if old_enough && !Path::new(&format!("/proc/{pid}")).exists() {
            remove_image(id);
        }
    }
}

/// The host path of each shared library `binary` loads.
fn shared_libraries(binary: &Path) -> Vec<String> {
    let output = Command::new("ldd").arg(binary).output().expect("run ldd");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| {
            line.split_whitespace()
                .find(|word| word.starts_with('/'))
                .map(str::to_string)
        })
        .collect()
}

/// Copies `from` to the same absolute path under `root`, following links.
fn copy_into(root: &Path, from: &Path, to: &str) {
    let target = root.join(to.trim_start_matches('/'));
    std::fs::create_dir_all(target.parent().unwrap()).unwrap();
    std::fs::copy(from, &target).unwrap_or_else(|e| panic!("copy {}: {e}", from.display()));
}

fn build() -> TestImage {
    let staging = tempfile::tempdir().unwrap();
    let root = staging.path().join("root");
    std::fs::create_dir_all(root.join("tmp")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(root.join("tmp"), std::fs::Permissions::from_mode(0o1777)).unwrap();
    let mut binaries: Vec<(std::path::PathBuf, String)> = HOST_BINARIES
        .iter()
        .map(|name| {
            let path = which(name);
            (path, format!("/bin/{name}"))
        })
        .collect();
    // The gantry binary without its debug information: a tenth of the size to import.
    let gantry = staging.path().join("gantry");
    let stripped = Command::new("strip")
        .arg("-o")
        .arg(&gantry)
        .arg(env!("CARGO_BIN_EXE_gantry"))
        .status()
        .is_ok_and(|status| status.success());
    if !stripped {
        std::fs::copy(env!("CARGO_BIN_EXE_gantry"), &gantry).unwrap();
    }
    binaries.push((gantry, "/bin/gantry".into()));
    for (from, to) in &binaries {
        copy_into(&root, from, to);
        for library in shared_libraries(from) {
            copy_into(&root, Path::new(&library), &library);
        }
    }
    let tar = staging.path().join("root.tar");
    let archived = Command::new("tar")
        .arg("-C")
        .arg(&root)
        .arg("-cf")
        .arg(&tar)
        .arg(".")
        .status()
        .unwrap();
    assert!(archived.success(), "tar the test image's root file system");
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let tag = format!("{TEST_REPOSITORY}:{}-{nanos}", std::process::id());
    let cmd = format!(r#"CMD ["/bin/echo", "{DEFAULT_COMMAND_OUTPUT}"]"#);
    docker(&[
        "import",
        "--change",
        &cmd,
        "--change",
        "ENV PATH=/bin",
        tar.to_str().unwrap(),
        &tag,
    ]);
    let id = docker(&["image", "inspect", "--format", "{{.Id}}", &tag])
        .trim()
        .to_string();
    let _ = IMAGE_ID_FOR_EXIT.set(id.clone());
    TestImage { tag, id }
}

fn which(name: &str) -> std::path::PathBuf {
    for dir in ["/bin", "/usr/bin", "/usr/local/bin"] {
        let path = Path::new(dir).join(name);
        if path.exists() {
            return path;
        }
    }
    panic!("{name} is not on this host");
}
