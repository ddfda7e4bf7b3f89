//! The on-disk cache of compiled components (`--compile-cache DIR`), so a
//! restarted sidecar does not compile its plugins again.
//!
//! Loading a compiled artifact is `unsafe` in wasmtime: it is native code,
//! trusted as is. This is the one module of the crate allowed `unsafe`, and
//! it only ever loads artifacts this proxy's own executable produced: those
//! its compiler process just handed over a pipe ([`from_own_compiler`]), and
//! those it wrote to the cache itself:
//! - the directory must belong to this user and be closed to everyone else
//!   (mode `0700`; created so when missing), or the cache is refused;
//! - an artifact's file name carries the component's sha256 and the engine's
//!   compatibility fingerprint (wasmtime version, target, every codegen
//!   setting), so an artifact built by another engine is never even opened;
//! - each file starts with the sha256 of the artifact bytes that follow; a
//!   file that does not match (truncated, corrupted) is removed and the
//!   component compiled again.
#![allow(unsafe_code)]

use std::fs;
use std::hash::{Hash, Hasher};
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use wasmtime::Engine;
use wasmtime::component::Component;

/// Load the artifact the compiler process (this same executable, see
/// `compiler.rs`) just produced for `engine`'s configuration.
pub fn from_own_compiler(engine: &Engine, artifact: &[u8]) -> wasmtime::Result<Component> {
    // SAFETY: the bytes come straight from a child process running this
    // very executable, over a pipe no one else holds, compiled by an engine
    // built from the same `engine_config()`; wasmtime also checks the
    // artifact's header against this engine's compatibility settings and
    // refuses a mismatch (e.g. the executable replaced on disk meanwhile).
    unsafe { Component::deserialize(engine, artifact) }
}

/// A compile cache directory.
pub struct ArtifactCache {
    dir: PathBuf,
    fingerprint: String,
}

impl ArtifactCache {
    /// Open (or create) `dir` for `engine`'s artifacts. Refused when the
    /// directory is not this user's alone.
    pub fn open(dir: &Path, engine: &Engine) -> Result<Self, String> {
        if !dir.exists() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| format!("cannot create the compile cache {}: {e}", dir.display()))?;
        }
        let meta = fs::metadata(dir)
            .map_err(|e| format!("cannot read the compile cache {}: {e}", dir.display()))?;
        if !meta.is_dir() {
            return Err(format!(
                "the compile cache {} is not a directory",
                dir.display()
            ));
        }
        if meta.uid() != rustix::process::geteuid().as_raw()
            || meta.permissions().mode() & 0o077 != 0
        {
            return Err(format!(
                "the compile cache {} must belong to this user and be closed to others (chmod 700): the proxy runs the native code it finds there",
                dir.display()
            ));
        }
        let mut h = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut h);
        Ok(Self {
            dir: dir.to_path_buf(),
            fingerprint: format!("{:016x}", h.finish()),
        })
    }

    fn path(&self, sha256: &str) -> PathBuf {
        self.dir
            .join(format!("{sha256}-{}.cwasm", self.fingerprint))
    }

    /// The component compiled earlier from bytes with this sha256, if the
    /// cache holds an intact one.
    pub fn get(&self, engine: &Engine, sha256: &str) -> Option<Component> {
        let path = self.path(sha256);
        let data = fs::read(&path).ok()?;
        let intact = data.len() > 32 && Sha256::digest(&data[32..]).as_slice() == &data[..32];
        if !intact {
            tracing::warn!(file = %path.display(), "compile cache entry corrupt; compiling again");
            let _ = fs::remove_file(&path);
            return None;
        }
        // SAFETY: these bytes are an artifact `Component::serialize` produced
        // for an engine with this very compatibility fingerprint (it is in
        // the file name), written by this proxy into a directory no other
        // user can write, and verified intact against the digest written
        // with it. wasmtime checks the artifact's header against the engine
        // as well.
        match unsafe { Component::deserialize(engine, &data[32..]) } {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::warn!(file = %path.display(), "compile cache entry unusable ({e}); compiling again");
                let _ = fs::remove_file(&path);
                None
            }
        }
    }

    /// Store a freshly compiled component. Failures are logged, never fatal.
    pub fn put(&self, sha256: &str, component: &Component) {
        let write = || -> Result<(), String> {
            let bytes = component.serialize().map_err(|e| e.to_string())?;
            let path = self.path(sha256);
            let tmp = path.with_extension(format!("tmp{}", std::process::id()));
            let mut f = fs::File::create(&tmp).map_err(|e| e.to_string())?;
            f.write_all(&Sha256::digest(&bytes))
                .map_err(|e| e.to_string())?;
            f.write_all(&bytes).map_err(|e| e.to_string())?;
            f.sync_all().map_err(|e| e.to_string())?;
            fs::rename(&tmp, &path).map_err(|e| e.to_string())
        };
        if let Err(e) = write() {
            tracing::warn!(dir = %self.dir.display(), "could not write to the compile cache: {e}");
        }
    }
}
