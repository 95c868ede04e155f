//! The example config files shipped in deploy/ parse as the binary would read them.

#[test]
fn the_shipped_agent_config_parses() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/agent.toml");
    let config = gantry_agent::config::AgentConfig::load(std::path::Path::new(path)).unwrap();
    assert_eq!(config.coordinators.len(), 3);
    assert!(!config.allow_process);
}

#[test]
fn the_shipped_coordinator_config_starts_a_coordinator() {
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/coordinator.toml"
    ))
    .unwrap();
    let data_dir = dir.path().join("c");
    let local = text
        .replace(
            "/var/lib/gantry/coordinator",
            &data_dir.display().to_string(),
        )
        .replace("0.0.0.0:7443", "127.0.0.1:0")
        .replace("127.0.0.1:7080", "127.0.0.1:0");
    let path = dir.path().join("coordinator.toml");
    std::fs::write(&path, local).unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_gantry"))
        .args(["coordinator", "--init", "--config"])
        .arg(&path)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !data_dir.join("admin.token").exists() && child.try_wait().unwrap().is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "the coordinator never initialised its data dir"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let exited = child.try_wait().unwrap();
    let _ = child.kill();
    let output = child.wait_with_output().unwrap();
    assert!(
        exited.is_none(),
        "the coordinator exited: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}
