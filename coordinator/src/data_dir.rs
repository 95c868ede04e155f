//! The coordinator's data dir: the cluster CA, the cluster key that signs join tokens, this
//! node's own certificate and the admin API token.
//!
//! Layout (secrets are written mode 0600):
//! - `ca.crt`, `ca.key`: the cluster CA;
//! - `cluster.key`: 32 random bytes, hex; keys the HMAC of join tokens;
//! - `node.crt`, `node.key`: this coordinator's certificate (role coordinator) and key;
//! - `admin.token`: the bearer token with every right on the HTTP API;
//! - `node.id`: this coordinator's Raft node id;
//! - `raft.redb`: the Raft log, hard state and the snapshot's metadata; `raft.wal`: the
//!   write-ahead file in front of it; `raft.snap-INDEX-TERM`: the snapshot's bytes (see
//!   `replica::disk`).

use anyhow::{bail, Context, Result};
use gantry_protocol::pki::{self, write_file_atomic, ClusterCa};
use gantry_protocol::tls::NodeCredentials;
use gantry_protocol::Role;
use rustls::pki_types::CertificateDer;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// A coordinator's own certificate lives long; it is re-issued at start when it nears expiry.
const NODE_CERT_TTL: Duration = Duration::from_secs(365 * 24 * 3600);

pub struct ClusterFiles {
    pub ca: ClusterCa,
    pub cluster_key: Vec<u8>,
    /// This coordinator's Raft node id (random, non-zero, chosen at init or join).
    pub node_id: u64,
    pub credentials: NodeCredentials,
    pub admin_token: String,
    /// For a node that joined: the members it was told of, until the leader's snapshot arrives.
    pub join_members: Vec<(u64, String, String)>,
}

fn path(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}

/// The name in a coordinator's certificate.
pub fn coordinator_identity(node_id: u64) -> String {
    format!("coordinator-{node_id:016x}")
}

pub fn raft_db_path(dir: &Path) -> PathBuf {
    dir.join("raft.redb")
}

/// A random non-zero node id.
pub fn new_node_id() -> u64 {
    let mut bytes = [0u8; 8];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .expect("the system random source works");
    // 52 bits: the id stays exact in JSON read by JavaScript.
    (u64::from_be_bytes(bytes) >> 12).max(1)
}

fn random_hex(n_bytes: usize) -> String {
    let mut bytes = vec![0u8; n_bytes];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .expect("the system random source works");
    hex::encode(bytes)
}

pub fn is_initialized(dir: &Path) -> bool {
    path(dir, "ca.crt").exists()
}

/// Creates a new cluster in an empty data dir.
pub fn init(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("create data dir {}", dir.display()))?;
    if is_initialized(dir) {
        bail!("data dir {} already holds a cluster", dir.display());
    }
    let now = SystemTime::now();
    let cluster_name = random_hex(4);
    let ca = ClusterCa::generate(&cluster_name, now)?;
    write_file_atomic(&path(dir, "ca.key"), ca.key_pem().as_bytes(), true)?;
    write_file_atomic(&path(dir, "cluster.key"), random_hex(32).as_bytes(), true)?;
    write_file_atomic(&path(dir, "admin.token"), random_hex(32).as_bytes(), true)?;
    let node_id = new_node_id();
    write_file_atomic(&path(dir, "node.id"), node_id.to_string().as_bytes(), false)?;
    issue_node_certificate(dir, &ca, node_id, now)?;
    // The CA certificate is written last: its presence marks a complete initialisation.
    write_file_atomic(&path(dir, "ca.crt"), ca.cert_pem().as_bytes(), false)?;
    Ok(())
}

/// Writes what a coordinator receives when it joins an existing cluster. The CA certificate is
/// written last, as in [`init`].
pub fn write_joined(
    dir: &Path,
    node_id: u64,
    grant: &gantry_protocol::CoordinatorGrant,
    key_pem: &str,
) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("create data dir {}", dir.display()))?;
    let secret = |name: &str, contents: &[u8]| write_file_atomic(&path(dir, name), contents, true);
    secret("ca.key", grant.ca_key_pem.as_bytes())?;
    secret("cluster.key", hex::encode(&grant.cluster_key).as_bytes())?;
    secret("admin.token", grant.admin_token.as_bytes())?;
    secret("node.key", key_pem.as_bytes())?;
    write_file_atomic(&path(dir, "node.id"), node_id.to_string().as_bytes(), false)?;
    let cert_pem = pki::der_to_pem(&grant.cert_der, "CERTIFICATE");
    write_file_atomic(&path(dir, "node.crt"), cert_pem.as_bytes(), false)?;
    let members = serde_json::to_vec(
        &grant
            .members
            .iter()
            .map(|m| (m.node_id, &m.quic_addr, &m.http_addr))
            .collect::<Vec<_>>(),
    )?;
    write_file_atomic(&path(dir, "join-members.json"), &members, false)?;
    let ca_pem = pki::der_to_pem(&grant.ca_der, "CERTIFICATE");
    write_file_atomic(&path(dir, "ca.crt"), ca_pem.as_bytes(), false)?;
    Ok(())
}

fn issue_node_certificate(dir: &Path, ca: &ClusterCa, node_id: u64, now: SystemTime) -> Result<()> {
    let identity = coordinator_identity(node_id);
    let (key, csr) = pki::generate_key_and_csr(&identity)?;
    let cert = ca.issue(&csr, Role::Coordinator, &identity, now, NODE_CERT_TTL)?;
    write_file_atomic(&path(dir, "node.key"), key.serialize_pem().as_bytes(), true)?;
    write_file_atomic(
        &path(dir, "node.crt"),
        pki::der_to_pem(&cert, "CERTIFICATE").as_bytes(),
        false,
    )?;
    Ok(())
}

fn read(dir: &Path, name: &str) -> Result<String> {
    let file = path(dir, name);
    fs::read_to_string(&file).with_context(|| format!("read {}", file.display()))
}

/// Loads an initialised data dir, renewing this node's certificate if it expires within a month.
pub fn load(dir: &Path) -> Result<ClusterFiles> {
    if !is_initialized(dir) {
        bail!(
            "data dir {} holds no cluster: start with --init to create one",
            dir.display()
        );
    }
    let ca = ClusterCa::from_pem(&read(dir, "ca.crt")?, &read(dir, "ca.key")?)
        .context("load the cluster CA")?;
    let cluster_key = hex::decode(read(dir, "cluster.key")?.trim()).context("parse cluster.key")?;
    let node_id: u64 = read(dir, "node.id")?
        .trim()
        .parse()
        .context("parse node.id")?;
    let mut cert_der = pki::pem_to_der(&read(dir, "node.crt")?, "CERTIFICATE")?;
    let now = SystemTime::now();
    let not_after = pki::parse_certificate(&cert_der)?.not_after_unix;
    let now_unix = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs() as i64;
    if not_after - now_unix < 30 * 24 * 3600 {
        issue_node_certificate(dir, &ca, node_id, now)?;
        cert_der = pki::pem_to_der(&read(dir, "node.crt")?, "CERTIFICATE")?;
    }
    let key = pki::key_from_pem(&read(dir, "node.key")?)?;
    let credentials = NodeCredentials {
        ca_der: ca.cert_der().clone(),
        cert_der: CertificateDer::from(cert_der),
        key_der: pki::private_key_der(&key),
    };
    let admin_token = read(dir, "admin.token")?.trim().to_string();
    let join_members = match fs::read(path(dir, "join-members.json")) {
        Ok(bytes) => serde_json::from_slice(&bytes).context("parse join-members.json")?,
        Err(_) => Vec::new(),
    };
    Ok(ClusterFiles {
        ca,
        cluster_key,
        node_id,
        credentials,
        admin_token,
        join_members,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_then_load_gives_the_same_cluster() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path()).unwrap();
        let first = load(dir.path()).unwrap();
        let second = load(dir.path()).unwrap();
        assert_eq!(first.ca.sha256_hex(), second.ca.sha256_hex());
        assert_eq!(first.admin_token, second.admin_token);
        assert_eq!(first.admin_token.len(), 64);
        assert!(
            init(dir.path()).is_err(),
            "a second init must not replace the CA"
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(dir.path().join("admin.token"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn loading_an_empty_dir_says_to_init() {
        let dir = tempfile::tempdir().unwrap();
        let err = load(dir.path()).err().unwrap().to_string();
        assert!(err.contains("--init"), "{err}");
    }
}
