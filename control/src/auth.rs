//! The admin credential: a random token control writes at first start
//! (`admin.token` in its data directory, mode 0600, or the file given),
//! which the CLI sends as `authorization: Bearer TOKEN`. Changing
//! operations always need it; reads need it too when control listens
//! beyond loopback, and on the TLS listener from a client without a mesh
//! certificate.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use tonic::{Request, Status};

use crate::tls::Transport;

/// What an operation does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Reads state.
    Read,
    /// Changes state.
    Write,
}

/// Checks the admin credential.
pub struct Auth {
    token: String,
    /// Reads need the token too (control is not on loopback only).
    reads_need_token: bool,
}

impl Auth {
    /// Read the token from `file`, or create it with a fresh random token.
    pub fn load_or_create(file: &Path, reads_need_token: bool) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        let token = match std::fs::read_to_string(file) {
            Ok(t) => t.trim().to_string(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut bytes = [0u8; 32];
                ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
                    .map_err(|_| anyhow::anyhow!("the system's random source failed"))?;
                let token = hex::encode(bytes);
                if let Some(dir) = file.parent() {
                    std::fs::create_dir_all(dir)
                        .with_context(|| format!("creating {}", dir.display()))?;
                }
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(file)
                    .with_context(|| format!("creating the admin token file {}", file.display()))?;
                writeln!(f, "{token}").context("writing the admin token")?;
                f.sync_all().context("writing the admin token")?;
                tracing::info!(file = %file.display(), "wrote a new admin token");
                token
            }
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("reading the admin token {}", file.display()));
            }
        };
        anyhow::ensure!(
            token.len() >= 16,
            "the admin token in {} is too short (at least 16 characters)",
            file.display()
        );
        Ok(Self {
            token,
            reads_need_token,
        })
    }

    /// Check a request's credential for `access`.
    pub fn check<T>(&self, req: &Request<T>, access: Access) -> Result<(), Status> {
        if access == Access::Read {
            match Transport::of(req) {
                Transport::Plain if !self.reads_need_token => return Ok(()),
                // A proxy of the mesh, verified by its certificate.
                Transport::Tls(info) if info.peer.is_some() => return Ok(()),
                _ => {}
            }
        }
        let given = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        match given {
            Some(t) if constant_time_eq(t.as_bytes(), self.token.as_bytes()) => Ok(()),
            Some(_) => Err(Status::unauthenticated(
                "the admin token is wrong; use the one in control's data directory (admin.token) via --admin-token-file or WASMESH_ADMIN_TOKEN_FILE",
            )),
            None => Err(Status::unauthenticated(
                "this needs the admin credential: pass --admin-token-file (or set WASMESH_ADMIN_TOKEN_FILE) to the file control wrote, admin.token in its data directory",
            )),
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
