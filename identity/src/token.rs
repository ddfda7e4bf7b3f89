//! Join tokens: how a new proxy proves which service it may speak for, and
//! how it knows it is talking to the real control before it sends anything.
//!
//! A token reads `wmt1.<id>.<secret>.<pin>`: a public id (control's key for
//! the grant: service, namespace, expiry, uses left), a secret (control
//! keeps only its sha256), and the sha256 of the mesh root's public key
//! (SubjectPublicKeyInfo), as kubeadm's `--discovery-token-ca-cert-hash`:
//! the proxy accepts control's TLS certificate only if it chains to a root
//! with that key.

use std::fmt;
use std::str::FromStr;

use sha2::{Digest, Sha256};

/// The token prefix (its format's version).
const PREFIX: &str = "wmt1";

/// Why a token could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the join token is malformed: {0}; a token reads wmt1.<id>.<secret>.<ca-hash>, as `wasmesh token create` prints it"
)]
pub struct TokenFormatError(&'static str);

/// A join token.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    /// Its public id (12 hex digits).
    pub id: String,
    secret: String,
    /// sha256 of the mesh root's SubjectPublicKeyInfo.
    pub pin: [u8; 32],
}

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the secret.
        f.debug_struct("JoinToken")
            .field("id", &self.id)
            .field("pin", &hex::encode(self.pin))
            .finish_non_exhaustive()
    }
}

fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b)
        .expect("the system's random source works");
    hex::encode(b)
}

impl JoinToken {
    /// A fresh token pinning `pin`: a 48-bit id and a 128-bit secret.
    pub fn generate(pin: [u8; 32]) -> Self {
        Self {
            id: random_hex(6),
            secret: random_hex(16),
            pin,
        }
    }

    /// The hex sha256 of its secret: all control keeps.
    pub fn secret_hash(&self) -> String {
        hex::encode(Sha256::digest(self.secret.as_bytes()))
    }

    /// The whole token, to print once.
    pub fn reveal(&self) -> String {
        format!(
            "{PREFIX}.{}.{}.{}",
            self.id,
            self.secret,
            hex::encode(self.pin)
        )
    }
}

fn hex_of_len(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit())
}

impl FromStr for JoinToken {
    type Err = TokenFormatError;
    fn from_str(s: &str) -> Result<Self, TokenFormatError> {
        let mut parts = s.trim().split('.');
        if parts.next() != Some(PREFIX) {
            return Err(TokenFormatError("it does not start with wmt1."));
        }
        let (Some(id), Some(secret), Some(pin), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenFormatError(
                "it does not have four dot-separated parts",
            ));
        };
        if !hex_of_len(id, 12) {
            return Err(TokenFormatError("its id is not 12 hex digits"));
        }
        if !hex_of_len(secret, 32) {
            return Err(TokenFormatError("its secret is not 32 hex digits"));
        }
        let mut p = [0u8; 32];
        hex::decode_to_slice(pin, &mut p)
            .map_err(|_| TokenFormatError("its CA hash is not 64 hex digits"))?;
        Ok(Self {
            id: id.to_ascii_lowercase(),
            secret: secret.to_ascii_lowercase(),
            pin: p,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_hide_their_secret() {
        let t = JoinToken::generate([7; 32]);
        let text = t.reveal();
        let back: JoinToken = format!("  {text}\n").parse().unwrap();
        assert_eq!(back, t);
        assert_eq!(back.secret_hash(), t.secret_hash());
        assert!(!format!("{t:?}").contains(&t.secret));
        assert!(text.starts_with("wmt1."));
    }

    #[test]
    fn malformed_tokens_say_what_is_wrong() {
        let good = JoinToken::generate([1; 32]).reveal();
        let cases = [
            ("abc", "wmt1."),
            ("wmt1.a.b", "four"),
            (&good.replacen("wmt1.", "wmt1.zz", 1), "id"),
            (&good[..good.len() - 2], "CA hash"),
        ];
        for (token, says) in cases {
            let e = token.parse::<JoinToken>().unwrap_err().to_string();
            assert!(e.contains(says), "{token}: {e}");
        }
    }
}
