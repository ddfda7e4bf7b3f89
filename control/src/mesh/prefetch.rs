//! Prefetch: while control validates a push (it compiles the component, as
//! proxies do), the proxies running an earlier version of that plugin are
//! told to fetch and compile the new bytes too, so that the apply that
//! names them finds them compiled. The two compiles overlap instead of
//! following each other.
//!
//! The bytes are served from memory while the push is validated ("staged")
//! and from the store once it is accepted. A refused push leaves proxies
//! with a compiled component no snapshot will name: they never run it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::broadcast;
use wasmesh_api::proto;

/// A component being pushed, announced to the discovery streams.
#[derive(Clone, Debug)]
pub struct Announced {
    /// The plugin's name: proxies whose snapshot runs a plugin of this
    /// name (any version) are told.
    pub name: String,
    /// What they are told.
    pub message: proto::Prefetch,
}

impl Announced {
    /// Whether `snapshot` runs a version of this plugin (its entries'
    /// origins are `NAME@VERSION`).
    pub fn concerns(&self, snapshot: &proto::Snapshot) -> bool {
        snapshot
            .services
            .iter()
            .flat_map(|s| s.plugins.iter().chain(&s.inbound_plugins))
            .any(|e| {
                e.origin
                    .split_once('@')
                    .is_some_and(|(name, _)| name == self.name)
                    && e.source != format!("sha256:{}", self.message.sha256)
            })
    }
}

/// Pushes being validated, and the channel that announces them.
pub struct Staging {
    bytes: Mutex<HashMap<String, Arc<[u8]>>>,
    announce: broadcast::Sender<Arc<Announced>>,
}

impl Default for Staging {
    fn default() -> Self {
        Self {
            bytes: Mutex::default(),
            // A stream that falls this far behind misses announcements:
            // its proxy then compiles at apply, as without prefetch.
            announce: broadcast::channel(16).0,
        }
    }
}

impl Staging {
    /// Serve `bytes` under `sha256` until the guard drops, and announce
    /// them as a new build of plugin `name` pushed as `origin`.
    pub fn stage(&self, name: &str, origin: String, sha256: &str, bytes: &[u8]) -> Staged<'_> {
        self.bytes
            .lock()
            .unwrap()
            .insert(sha256.to_string(), bytes.into());
        // No stream listening is not an error.
        let _ = self.announce.send(Arc::new(Announced {
            name: name.to_string(),
            message: proto::Prefetch {
                sha256: sha256.to_string(),
                origin,
            },
        }));
        Staged {
            staging: self,
            sha256: sha256.to_string(),
        }
    }

    /// A staged component's bytes.
    pub fn get(&self, sha256: &str) -> Option<Arc<[u8]>> {
        self.bytes.lock().unwrap().get(sha256).cloned()
    }

    /// A receiver of every announcement from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Announced>> {
        self.announce.subscribe()
    }
}

/// A staged push: its bytes are served until this drops (by then the push
/// is stored, or refused).
pub struct Staged<'a> {
    staging: &'a Staging,
    sha256: String,
}

impl Drop for Staged<'_> {
    fn drop(&mut self) {
        self.staging.bytes.lock().unwrap().remove(&self.sha256);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(origins: &[(&str, &str)]) -> proto::Snapshot {
        proto::Snapshot {
            services: vec![proto::Service {
                plugins: origins
                    .iter()
                    .map(|(origin, sha)| proto::PluginEntry {
                        origin: origin.to_string(),
                        source: format!("sha256:{sha}"),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn an_announcement_concerns_snapshots_running_another_build_of_its_plugin() {
        let a = Announced {
            name: "tagger".into(),
            message: proto::Prefetch {
                sha256: "bb".into(),
                origin: "tagger@2".into(),
            },
        };
        assert!(a.concerns(&snapshot(&[("tagger@1", "aa")])));
        // Not another plugin whose name starts alike, nor these very bytes.
        assert!(!a.concerns(&snapshot(&[("tagger-2@1", "aa")])));
        assert!(!a.concerns(&snapshot(&[("tagger@2", "bb")])));
        assert!(!a.concerns(&snapshot(&[])));
    }

    #[test]
    fn staged_bytes_are_served_until_the_push_ends() {
        let staging = Staging::default();
        let mut rx = staging.subscribe();
        {
            let _staged = staging.stage("tagger", "tagger@2".into(), "bb", b"wasm");
            assert_eq!(staging.get("bb").as_deref(), Some(&b"wasm"[..]));
            assert_eq!(rx.try_recv().unwrap().message.origin, "tagger@2");
        }
        assert!(staging.get("bb").is_none());
    }
}
