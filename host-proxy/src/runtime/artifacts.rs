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
//! - beside each artifact `X.cwasm` lies `X.sha256`, the digest of its bytes;
//!   an artifact that does not match it (truncated, corrupted, or missing its
//!   digest) is removed and the component compiled again.
//!
//! Artifacts are mapped from their file, not copied into the heap: only the
//! pages of compiled code that requests actually run become resident, the
//! rest stay on disk (clean page cache the kernel can drop), and sidecars
//! that share a cache directory share those pages. Entries are only ever
//! replaced by rename, never rewritten in place, so a running proxy's
//! mapping never changes under it.
#![allow(unsafe_code)]

use std::fs;
use std::hash::{Hash, Hasher};
use std::io::{Read as _, Write as _};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
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

    /// Where compiled functions are kept ([`super::compiler::FunctionCache`]).
    pub fn functions_dir(&self) -> PathBuf {
        self.dir.join("functions")
    }

    fn path(&self, sha256: &str) -> PathBuf {
        self.dir
            .join(format!("{sha256}-{}.cwasm", self.fingerprint))
    }

    /// The component compiled earlier from bytes with this sha256, if the
    /// cache holds an intact one, mapped from its file.
    pub fn get(&self, engine: &Engine, sha256: &str) -> Option<Component> {
        let path = self.path(sha256);
        if !path.exists() {
            return None;
        }
        let digest = path.with_extension("sha256");
        let file = fs::File::open(&path);
        let intact = match (fs::read_to_string(&digest), &file) {
            (Ok(expected), Ok(f)) => file_sha256(f).is_ok_and(|a| expected.trim() == a),
            _ => false,
        };
        if !intact {
            tracing::warn!(file = %path.display(), "compile cache entry corrupt; compiling again");
            let _ = fs::remove_file(&path);
            let _ = fs::remove_file(&digest);
            return None;
        }
        if let Ok(f) = &file {
            drop_cached_pages(f);
        }
        // SAFETY: this file is an artifact `precompile_component` or
        // `Component::serialize` produced for an engine with this very
        // compatibility fingerprint (it is in the file name), written by this
        // proxy into a directory no other user can write, verified intact
        // against the digest written with it, and only ever replaced by
        // rename (see the module docs), so the mapping stays as verified.
        // wasmtime checks the artifact's header against the engine as well.
        match unsafe { Component::deserialize_file(engine, &path) } {
            Ok(c) => {
                read_on_demand(&c);
                Some(c)
            }
            Err(e) => {
                tracing::warn!(file = %path.display(), "compile cache entry unusable ({e}); compiling again");
                let _ = fs::remove_file(&path);
                let _ = fs::remove_file(&digest);
                None
            }
        }
    }

    /// Take the cache's lock on one component, waiting up to `patience`
    /// for another process that holds it (a sidecar compiling the same
    /// component): sidecars sharing a cache compile each component once,
    /// and the others map what the first one wrote. `None` (no lock, go on
    /// alone) when the lock file cannot be made or the wait runs out.
    pub fn lock(&self, sha256: &str, patience: std::time::Duration) -> Option<CompileLock> {
        let path = self.path(sha256).with_extension("lock");
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .ok()?;
        let deadline = std::time::Instant::now() + patience;
        loop {
            match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
                Ok(()) => return Some(CompileLock(file)),
                Err(rustix::io::Errno::WOULDBLOCK) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(2));
                }
                Err(_) => return None,
            }
        }
    }

    /// Store a freshly compiled artifact. Failures are logged, never fatal.
    pub fn put(&self, sha256: &str, artifact: &[u8]) {
        let path = self.path(sha256);
        let write = |to: &Path, bytes: &[u8]| -> Result<PathBuf, String> {
            let tmp = to.with_extension(format!(
                "{}.tmp{}",
                to.extension().unwrap_or_default().to_string_lossy(),
                std::process::id()
            ));
            // No fsync: a cache entry a crash tore is caught by the digest
            // check on its next read and compiled again, so durability is
            // not worth the milliseconds on a rollout's path.
            let mut f = fs::File::create(&tmp).map_err(|e| e.to_string())?;
            f.write_all(bytes).map_err(|e| e.to_string())?;
            Ok(tmp)
        };
        let store = || -> Result<(), String> {
            let digest = path.with_extension("sha256");
            let tmp_artifact = write(&path, artifact)?;
            let tmp_digest = write(&digest, hex::encode(Sha256::digest(artifact)).as_bytes())?;
            // The digest first: an artifact never sits beside a digest that
            // is not its own for longer than a crash between two renames,
            // which `get` then reads as corrupt.
            fs::rename(&tmp_digest, &digest).map_err(|e| e.to_string())?;
            fs::rename(&tmp_artifact, &path).map_err(|e| e.to_string())
        };
        if let Err(e) = store() {
            tracing::warn!(dir = %self.dir.display(), "could not write to the compile cache: {e}");
        }
    }
}

/// A compile-cache lock on one component, released when dropped (or when
/// the process ends, however it ends: the kernel drops a `flock` with its
/// file).
pub struct CompileLock(#[allow(dead_code, reason = "held for its flock")] fs::File);

/// Drop the page cache the digest check (or the write in `put`) left for
/// `file`. Reading a file in sequence leaves it cached in large folios, and
/// touching one byte of a mapped folio maps all of it: a proxy that runs a
/// few functions of a plugin would hold every page of its code. Read back
/// page by page instead (see [`read_on_demand`]), only what runs is resident.
/// Pages another sidecar has mapped stay cached.
fn drop_cached_pages(file: &fs::File) {
    let _ = rustix::fs::fadvise(file, 0, None, rustix::fs::Advice::DontNeed);
}

/// No read-around for the mapped artifact: a fault reads its own page only.
fn read_on_demand(component: &Component) {
    let image = component.image_range();
    // SAFETY: MADV_RANDOM changes no memory contents, only how the kernel
    // reads this file-backed range in on a fault; the range is the
    // component's own mapping, alive as long as `component`.
    let _ = unsafe {
        rustix::mm::madvise(
            image.start as *mut std::ffi::c_void,
            image.end as usize - image.start as usize,
            rustix::mm::Advice::Random,
        )
    };
}

/// Hex sha256 of a file, read in pieces (an artifact is megabytes; the
/// heap stays as it was).
fn file_sha256(mut f: &fs::File) -> std::io::Result<String> {
    let mut hasher = Sha256::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(hex::encode(hasher.finalize()));
        }
        hasher.update(&buf[..n]);
    }
}
