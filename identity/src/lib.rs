//! wasmesh's mesh identity, shared by control and the proxies:
//!
//! - [`spiffe`]: SPIFFE IDs and trust domains (data, from `wasmesh-api`);
//! - [`ca`]: the mesh CA control runs, which signs proxies' CSRs;
//! - [`token`]: join tokens, with which a new proxy proves the service it
//!   may speak for and pins the mesh CA;
//! - [`cert`]: reading certificates (x509-parser) and PEM;
//! - [`tls`]: the credentials a process holds and the rustls
//!   configurations of mesh mTLS.
//!
//! Everything cryptographic is rustls (with ring, the tree's one crypto
//! provider), rcgen and x509-parser; nothing here implements crypto.

pub mod ca;
pub mod cert;
pub mod tls;
pub mod token;

#[cfg(test)]
mod tests;

pub use wasmesh_api::spiffe;
pub use wasmesh_api::spiffe::{SpiffeId, TrustDomain};

use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

/// A fresh key pair (ECDSA P-256) and a CSR for it: the key stays with
/// the caller; the CSR goes to the CA, which takes only its public key.
pub struct KeyAndCsr {
    /// The private key, PKCS#8 DER.
    pub key: PrivateKeyDer<'static>,
    /// The CSR, DER.
    pub csr: Vec<u8>,
}

impl KeyAndCsr {
    /// Generate.
    pub fn generate() -> Result<Self, rcgen::Error> {
        let key = rcgen::KeyPair::generate()?;
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        let csr = params.serialize_request(&key)?;
        Ok(Self {
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            csr: csr.der().to_vec(),
        })
    }

    /// The key as PEM (to keep on the proxy's own disk, mode 600).
    pub fn key_pem(&self) -> String {
        cert::pem_block("PRIVATE KEY", self.key.secret_der())
    }
}
