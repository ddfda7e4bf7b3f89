//! Reading certificates: PEM in and out, the SPIFFE ID and validity of a
//! leaf, and the public-key hash a join token pins (x509-parser; nothing
//! here parses DER by hand).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::spiffe::SpiffeId;

/// Why a certificate or key could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CertError {
    /// Not parseable.
    #[error("{what} is not valid: {reason}")]
    Malformed {
        /// What it was meant to be.
        what: &'static str,
        /// The parser's words.
        reason: String,
    },
    /// No or several SPIFFE IDs.
    #[error(
        "the certificate carries {0} SPIFFE IDs (URI SANs); a mesh certificate carries exactly one"
    )]
    SpiffeIds(usize),
    /// A URI SAN that is no SPIFFE ID.
    #[error("the certificate's URI SAN is not a SPIFFE ID: {0}")]
    BadId(String),
}

/// What the mesh reads of a certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// Its SPIFFE ID (its one URI SAN), if it has one.
    pub id: Option<SpiffeId>,
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
    /// Whether it is a CA (basic constraints).
    pub is_ca: bool,
    /// sha256 of its SubjectPublicKeyInfo.
    pub spki_sha256: [u8; 32],
}

impl CertInfo {
    /// Time left until expiry (zero once expired).
    pub fn expires_in(&self, now: SystemTime) -> Duration {
        self.not_after.duration_since(now).unwrap_or_default()
    }

    /// The whole validity period.
    pub fn lifetime(&self) -> Duration {
        self.not_after
            .duration_since(self.not_before)
            .unwrap_or_default()
    }
}

fn parse(der: &[u8]) -> Result<X509Certificate<'_>, CertError> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| CertError::Malformed {
        what: "the certificate",
        reason: e.to_string(),
    })?;
    Ok(cert)
}

fn system_time(t: x509_parser::time::ASN1Time) -> SystemTime {
    let secs = t.timestamp();
    if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs as u64)
    } else {
        UNIX_EPOCH
    }
}

/// Read a certificate.
pub fn info(der: &[u8]) -> Result<CertInfo, CertError> {
    let cert = parse(der)?;
    let uris: Vec<&str> = match cert.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                GeneralName::URI(u) => Some(*u),
                _ => None,
            })
            .collect(),
        Ok(None) => Vec::new(),
        Err(e) => {
            return Err(CertError::Malformed {
                what: "the certificate's subject alternative names",
                reason: e.to_string(),
            });
        }
    };
    let spiffe: Vec<&str> = uris
        .iter()
        .copied()
        .filter(|u| u.starts_with("spiffe://"))
        .collect();
    let id = match spiffe.as_slice() {
        [] => None,
        [one] => Some(
            one.parse::<SpiffeId>()
                .map_err(|e| CertError::BadId(e.to_string()))?,
        ),
        many => return Err(CertError::SpiffeIds(many.len())),
    };
    Ok(CertInfo {
        id,
        not_before: system_time(cert.validity().not_before),
        not_after: system_time(cert.validity().not_after),
        is_ca: cert.is_ca(),
        spki_sha256: Sha256::digest(cert.public_key().raw).into(),
    })
}

/// The SPIFFE ID of a leaf certificate: exactly one.
pub fn spiffe_id(der: &[u8]) -> Result<SpiffeId, CertError> {
    info(der)?.id.ok_or(CertError::SpiffeIds(0))
}

/// Whether `child` is signed by `issuer`'s key.
pub fn signed_by(child: &[u8], issuer: &[u8]) -> Result<bool, CertError> {
    let (child, issuer) = (parse(child)?, parse(issuer)?);
    Ok(child.verify_signature(Some(issuer.public_key())).is_ok())
}

/// Whether `der`'s public key is `public_key` (the raw key bits).
pub fn has_public_key(der: &[u8], public_key: &[u8]) -> Result<bool, CertError> {
    Ok(parse(der)?.public_key().subject_public_key.data.as_ref() == public_key)
}

/// Every certificate in a PEM text, in order.
pub fn certs_from_pem(
    pem: &str,
    what: &'static str,
) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CertError::Malformed {
            what,
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(CertError::Malformed {
            what,
            reason: "no CERTIFICATE block in it".into(),
        });
    }
    Ok(certs)
}

/// A private key from PEM (PKCS#8, SEC1 or PKCS#1).
pub fn key_from_pem(pem: &str, what: &'static str) -> Result<PrivateKeyDer<'static>, CertError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| CertError::Malformed {
        what,
        reason: e.to_string(),
    })
}

/// Certificates as PEM.
pub fn certs_to_pem(certs: &[CertificateDer<'_>]) -> String {
    certs
        .iter()
        .map(|c| pem_block("CERTIFICATE", c))
        .collect::<String>()
}

/// One PEM block.
pub fn pem_block(label: &str, der: &[u8]) -> String {
    pem::encode(&pem::Pem::new(label, der.to_vec()))
}
