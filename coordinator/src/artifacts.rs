//! The coordinator's content-addressed artifact store: `artifacts/<sha256>` files under the data
//! dir, written once (temporary file, fsync, rename) and checked against their name when read.
//! The Raft log records only which checksums exist (`Op::RecordArtifacts`); each coordinator
//! copies missing files from a member that has them (`GET /v1/artifacts/{sha256}`), so the bytes
//! end up on every member without passing through the log or its snapshots.

use ring::digest::{digest, SHA256};
use std::collections::BTreeSet;
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(digest(&SHA256, data).as_ref())
}

fn is_sha256_hex(name: &str) -> bool {
    name.len() == 64
        && name
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[derive(Clone)]
pub struct ArtifactStore {
    dir: PathBuf,
    /// Checksums being copied from another member now.
    fetching: Arc<Mutex<BTreeSet<String>>>,
}

impl ArtifactStore {
    pub fn open(data_dir: &std::path::Path) -> std::io::Result<Self> {
        let dir = data_dir.join("artifacts");
        std::fs::create_dir_all(&dir)?;
        Ok(Self {
            dir,
            fetching: Arc::default(),
        })
    }

    pub fn has(&self, sha256: &str) -> bool {
        is_sha256_hex(sha256) && self.dir.join(sha256).is_file()
    }

    /// Stores `data` under its checksum, which must be `sha256`.
    pub fn put(&self, sha256: &str, data: &[u8]) -> Result<(), String> {
        if !is_sha256_hex(sha256) || sha256_hex(data) != sha256 {
            return Err(format!("the bytes do not match their checksum {sha256:?}"));
        }
        if self.has(sha256) {
            return Ok(());
        }
        let path = self.dir.join(sha256);
        let tmp = self.dir.join(format!(".{sha256}.tmp"));
        let written = (|| {
            let mut file = std::fs::File::create(&tmp)?;
            file.write_all(data)?;
            file.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            std::fs::File::open(&self.dir)?.sync_all()
        })();
        written.map_err(|e| format!("store artifact {sha256} in {}: {e}", self.dir.display()))
    }

    /// The bytes stored under `sha256`, checked; `None` when this member does not hold them.
    pub fn get(&self, sha256: &str) -> Result<Option<Vec<u8>>, String> {
        if !is_sha256_hex(sha256) {
            return Ok(None);
        }
        match std::fs::read(self.dir.join(sha256)) {
            Ok(data) if sha256_hex(&data) == sha256 => Ok(Some(data)),
            Ok(_) => Err(format!(
                "artifact {sha256} is corrupt on this member's disk"
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("read artifact {sha256}: {e}")),
        }
    }

    /// Copies `sha256` from the first of `sources` (HTTP addresses of members) that has it, in
    /// the background; at most one copy of each checksum at a time.
    pub fn fetch_in_background(&self, sha256: String, sources: Vec<String>, token: String) {
        if self.has(&sha256)
            || !self
                .fetching
                .lock()
                .expect("not poisoned")
                .insert(sha256.clone())
        {
            return;
        }
        let store = self.clone();
        tokio::spawn(async move {
            if let Err(e) = store.fetch(&sha256, &sources, &token).await {
                tracing::debug!(artifact = %sha256, "copy not done yet: {e}");
            }
            store.fetching.lock().expect("not poisoned").remove(&sha256);
        });
    }

    /// Copies `sha256` from the first of `sources` that has it and returns the bytes.
    pub async fn fetch(
        &self,
        sha256: &str,
        sources: &[String],
        token: &str,
    ) -> Result<Vec<u8>, String> {
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| e.to_string())?;
        let mut reasons = Vec::new();
        for source in sources {
            let url = format!("http://{source}/v1/artifacts/{sha256}");
            let answer = client.get(&url).bearer_auth(token).send().await;
            let response = match answer {
                Ok(response) if response.status().is_success() => response,
                Ok(response) => {
                    reasons.push(format!("{source}: {}", response.status()));
                    continue;
                }
                Err(e) => {
                    reasons.push(format!("{source}: {e}"));
                    continue;
                }
            };
            match response.bytes().await {
                Ok(bytes) => match self.put(sha256, &bytes) {
                    Ok(()) => return Ok(bytes.to_vec()),
                    Err(e) => reasons.push(format!("{source}: {e}")),
                },
                Err(e) => reasons.push(format!("{source}: {e}")),
            }
        }
        Err(format!(
            "no member gave artifact {sha256}: {}",
            reasons.join("; ")
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stores_by_checksum_and_refuses_bytes_that_do_not_match() {
        let dir = tempfile::tempdir().unwrap();
        let store = ArtifactStore::open(dir.path()).unwrap();
        let data = b"{\"weights\":[1,2]}";
        let sha = sha256_hex(data);
        assert_eq!(store.get(&sha).unwrap(), None);
        store.put(&sha, data).unwrap();
        assert!(store.has(&sha));
        assert_eq!(store.get(&sha).unwrap().unwrap(), data);
        let err = store.put(&sha256_hex(b"other"), data).unwrap_err();
        assert!(err.contains("do not match"), "{err}");
        assert!(store.put("../../etc/passwd", data).is_err());
        assert_eq!(store.get("../x").unwrap(), None);
        std::fs::write(dir.path().join("artifacts").join(&sha), b"tampered").unwrap();
        assert!(store.get(&sha).unwrap_err().contains("corrupt"));
    }
}
