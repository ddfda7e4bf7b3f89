//! Components a control-plane sidecar fetched, by sha256: in memory, and,
//! with `--compile-cache`, on disk beside the compiled artifacts, so that a
//! proxy restarted while control is away can rebuild its last snapshot.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};

/// Components by hex sha256.
#[derive(Default)]
pub struct Components {
    map: Mutex<HashMap<String, Arc<[u8]>>>,
    /// Where they are kept across restarts, if anywhere.
    dir: Option<PathBuf>,
}

impl Components {
    /// Components kept in `dir` (none: in memory only).
    pub fn new(dir: Option<PathBuf>) -> Self {
        Self {
            map: Mutex::default(),
            dir,
        }
    }

    /// A component's bytes, from memory or the disk (checked against its
    /// digest).
    pub fn get(&self, sha256: &str) -> Option<Arc<[u8]>> {
        if let Some(b) = self.map.lock().unwrap().get(sha256) {
            return Some(b.clone());
        }
        let bytes = std::fs::read(self.dir.as_ref()?.join(format!("{sha256}.wasm"))).ok()?;
        if hex::encode(Sha256::digest(&bytes)) != sha256 {
            return None;
        }
        let bytes: Arc<[u8]> = bytes.into();
        self.map
            .lock()
            .unwrap()
            .insert(sha256.to_string(), bytes.clone());
        Some(bytes)
    }

    /// Whether the component is here.
    pub fn has(&self, sha256: &str) -> bool {
        self.get(sha256).is_some()
    }

    /// Keep in memory only the components `keep` names (the others stay on
    /// disk, where there is a disk).
    pub fn retain(&self, keep: impl Fn(&str) -> bool) {
        self.map.lock().unwrap().retain(|sha, _| keep(sha));
    }

    /// Keep a component; refused unless `bytes` has `sha256`.
    pub fn insert(&self, sha256: &str, bytes: Vec<u8>) -> Result<(), String> {
        let actual = hex::encode(Sha256::digest(&bytes));
        if actual != sha256 {
            return Err(format!(
                "the component fetched for sha256 {sha256} has sha256 {actual}"
            ));
        }
        if let Some(dir) = &self.dir {
            let path = dir.join(format!("{sha256}.wasm"));
            // Sidecars sharing the directory may write the same component
            // at once: each through its own temporary file.
            let tmp = dir.join(format!(".{sha256}.wasm.tmp{}", std::process::id()));
            let written = std::fs::create_dir_all(dir)
                .and_then(|()| std::fs::write(&tmp, &bytes))
                .and_then(|()| std::fs::rename(&tmp, &path));
            if let Err(e) = written {
                tracing::warn!(dir = %dir.display(), "could not keep a component on disk: {e}");
            }
        }
        self.map
            .lock()
            .unwrap()
            .insert(sha256.to_string(), bytes.into());
        Ok(())
    }
}
