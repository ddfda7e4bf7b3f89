//! SPIFFE IDs: `spiffe://<trust-domain>/<path>`, and the workload shape the
//! mesh issues, `spiffe://<trust-domain>/ns/<namespace>/sa/<service>` (the
//! shape Istio uses, so its operators read it at a glance).

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

/// Why a trust domain or SPIFFE ID was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// Not `spiffe://…`.
    #[error("{0:?} is not a SPIFFE ID: it must start with spiffe://")]
    Scheme(String),
    /// A trust domain outside the SPIFFE grammar.
    #[error(
        "{0:?} is not a trust domain: use lowercase letters, digits, '.', '-' and '_' (at most 255), e.g. cluster.local"
    )]
    TrustDomain(String),
    /// A path segment outside the SPIFFE grammar.
    #[error(
        "{id:?}: path segment {segment:?} is not allowed: segments use letters, digits, '.', '-' and '_', and are never empty, '.' or '..'"
    )]
    Segment {
        /// The whole ID.
        id: String,
        /// The bad segment.
        segment: String,
    },
    /// A name (namespace or service) that cannot be a path segment.
    #[error("{what} {name:?} cannot be part of a SPIFFE ID: use letters, digits, '.', '-' and '_'")]
    Name {
        /// `namespace` or `service`.
        what: &'static str,
        /// The name.
        name: String,
    },
}

/// A SPIFFE trust domain, e.g. `cluster.local`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(Arc<str>);

/// The trust domain control uses unless told otherwise, as Istio's.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

impl TrustDomain {
    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for TrustDomain {
    fn default() -> Self {
        Self(DEFAULT_TRUST_DOMAIN.into())
    }
}

impl FromStr for TrustDomain {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        let ok = !s.is_empty()
            && s.len() <= 255
            && s.bytes().all(|b| {
                b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
            });
        if ok {
            Ok(Self(s.into()))
        } else {
            Err(IdError::TrustDomain(s.to_string()))
        }
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn segment_ok(s: &str) -> bool {
    !s.is_empty()
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
}

/// A SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Deserialize)]
#[serde(try_from = "String")]
pub struct SpiffeId {
    trust_domain: TrustDomain,
    /// The path, with its leading `/` ("" for the trust domain itself).
    path: Arc<str>,
}

impl SpiffeId {
    /// `spiffe://TD/ns/NAMESPACE/sa/SERVICE`: a workload of the mesh.
    pub fn workload(td: &TrustDomain, namespace: &str, service: &str) -> Result<Self, IdError> {
        for (what, name) in [("namespace", namespace), ("service", service)] {
            if !segment_ok(name) {
                return Err(IdError::Name {
                    what,
                    name: name.to_string(),
                });
            }
        }
        Ok(Self {
            trust_domain: td.clone(),
            path: format!("/ns/{namespace}/sa/{service}").into(),
        })
    }

    /// `spiffe://TD/wasmesh/control`: control's own ID. Not workload-shaped,
    /// so no join token can ever be good for it.
    pub fn control(td: &TrustDomain) -> Self {
        Self {
            trust_domain: td.clone(),
            path: "/wasmesh/control".into(),
        }
    }

    /// Its trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// Its path, with the leading `/`.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// (namespace, service) of a workload ID.
    pub fn workload_parts(&self) -> Option<(&str, &str)> {
        let mut it = self.path.strip_prefix('/')?.split('/');
        match (it.next(), it.next(), it.next(), it.next(), it.next()) {
            (Some("ns"), Some(ns), Some("sa"), Some(sa), None) => Some((ns, sa)),
            _ => None,
        }
    }

    /// Its namespace, for a workload ID.
    pub fn namespace(&self) -> Option<&str> {
        self.workload_parts().map(|(ns, _)| ns)
    }

    /// Its service (service account), for a workload ID.
    pub fn service(&self) -> Option<&str> {
        self.workload_parts().map(|(_, sa)| sa)
    }
}

impl FromStr for SpiffeId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        let rest = s
            .strip_prefix("spiffe://")
            .ok_or_else(|| IdError::Scheme(s.to_string()))?;
        let (td, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        let trust_domain: TrustDomain = td.parse()?;
        if !path.is_empty() {
            for segment in path[1..].split('/') {
                if !segment_ok(segment) {
                    return Err(IdError::Segment {
                        id: s.to_string(),
                        segment: segment.to_string(),
                    });
                }
            }
        }
        Ok(Self {
            trust_domain,
            path: path.into(),
        })
    }
}

impl TryFrom<String> for SpiffeId {
    type Error = IdError;
    fn try_from(s: String) -> Result<Self, IdError> {
        s.parse()
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "spiffe://{}{}", self.trust_domain, self.path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workload_ids_round_trip() {
        let td: TrustDomain = "cluster.local".parse().unwrap();
        let id = SpiffeId::workload(&td, "default", "reviews").unwrap();
        assert_eq!(
            id.to_string(),
            "spiffe://cluster.local/ns/default/sa/reviews"
        );
        let back: SpiffeId = id.to_string().parse().unwrap();
        assert_eq!(back, id);
        assert_eq!(back.workload_parts(), Some(("default", "reviews")));
        assert_eq!(SpiffeId::control(&td).workload_parts(), None);
    }

    #[test]
    fn bad_ids_are_refused_with_the_reason() {
        for bad in [
            "http://cluster.local/ns/a/sa/b",
            "spiffe://Cluster.local/ns/a/sa/b",
            "spiffe:///ns/a",
            "spiffe://td/ns//sa/b",
            "spiffe://td/ns/../sa/b",
            "spiffe://td/ns/a/sa/b/",
            "spiffe://td/ns/a b/sa/c",
        ] {
            assert!(bad.parse::<SpiffeId>().is_err(), "{bad} parsed");
        }
        let td = TrustDomain::default();
        let e = SpiffeId::workload(&td, "a/b", "c").unwrap_err();
        assert!(e.to_string().contains("namespace \"a/b\""), "{e}");
    }
}
