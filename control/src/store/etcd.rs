//! The replicated store: etcd's v3 API (as etcd 3.4 has it), so that
//! several control replicas share one state. Everything lives under a
//! prefix (default `/wasmesh`):
//!
//! ```text
//! PREFIX/meta/revision            the config revision (decimal)
//! PREFIX/services/NAME            ServiceRecord (JSON)
//! PREFIX/plugins/NAME@VERSION     PluginMeta (JSON)
//! PREFIX/components/SHA256/NNNN   the component's bytes, 1 MiB chunks
//! PREFIX/endpoints/SERVICE/INST   EndpointRecord (JSON)        } on the
//! PREFIX/status/SERVICE/INST      a proxy's status (protobuf)  } replica's lease
//! PREFIX/ca                       CaRecord (JSON; the key sealed, below)
//! PREFIX/tokens/ID                TokenRecord (JSON)
//! PREFIX/leader                   the leading replica's id, on its lease
//! ```
//!
//! What a replica's proxies registered and how they are (endpoints, status)
//! lives on that replica's lease (10 s, renewed every 3 s): if the replica
//! dies, its entries go with it, while its proxies register again on the
//! replica they move to. A lease lost (etcd away longer than its TTL) is
//! replaced and the replica's entries written again.
//!
//! A component is written first as immutable, content-addressed chunks
//! (each well under etcd's 1.5 MiB request limit), then one small
//! transaction makes it visible — and that transaction checks its chunks
//! are all there, so a concurrent delete of the same bytes cannot leave a
//! registry entry naming missing chunks. Config changes compare the
//! revision key, so two replicas applying at once never interleave: one
//! lands, the other gets [`StoreError::Conflict`]. A transaction holds at
//! most 128 operations (etcd's default).
//!
//! The CA's private key is sealed (AES-256-GCM) with a key that is not in
//! etcd — a file each replica is given — so whoever reads etcd or its
//! backups cannot sign for the mesh.
//!
//! [`Store`] is a blocking interface (the embedded store is a file); this
//! one runs its requests on a small runtime of its own and waits for them,
//! each with a deadline: with etcd unreachable a call fails with a clear
//! error instead of hanging.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, KeyValue, Txn, TxnOp, TxnOpResponse,
};
use ring::aead;
use sha2::{Digest, Sha256};

use super::{
    CaRecord, EndpointRecord, PluginMeta, Pushed, ServiceRecord, State, Store, StoreError,
    TokenRecord, TokenRefusal,
};

/// Component bytes per key.
const CHUNK: usize = 1 << 20;
/// Operations in one transaction at most (etcd's `--max-txn-ops` default).
const MAX_TXN_OPS: usize = 128;
/// How long one request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// The sealed key's marker in a stored [`CaRecord`].
const SEALED: &str = "sealed:aes-256-gcm:";

/// Where the store is: `etcd://HOST:PORT[,HOST:PORT…][/PREFIX]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EtcdUrl {
    /// The members' client addresses, `http://HOST:PORT`.
    pub endpoints: Vec<String>,
    /// The key prefix, without a trailing `/`.
    pub prefix: String,
}

impl std::str::FromStr for EtcdUrl {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let rest = s
            .strip_prefix("etcd://")
            .ok_or_else(|| format!("{s:?}: give etcd://HOST:PORT[,HOST:PORT…][/PREFIX]"))?;
        let (hosts, prefix) = match rest.split_once('/') {
            Some((h, p)) => (h, format!("/{}", p.trim_end_matches('/'))),
            None => (rest, "/wasmesh".to_string()),
        };
        if prefix == "/" {
            return Err(format!("{s:?}: the prefix must not be empty"));
        }
        let endpoints: Vec<String> = hosts
            .split(',')
            .filter(|h| !h.is_empty())
            .map(|h| format!("http://{h}"))
            .collect();
        if endpoints.is_empty() {
            return Err(format!("{s:?}: name at least one etcd member, HOST:PORT"));
        }
        for h in hosts.split(',') {
            let port = h.rsplit_once(':').map(|(_, p)| p);
            if port.is_none_or(|p| p.parse::<u16>().is_err()) {
                return Err(format!("{s:?}: {h:?} is not HOST:PORT"));
            }
        }
        Ok(Self { endpoints, prefix })
    }
}

/// How to reach etcd beyond its address: TLS and a user, as etcd's
/// clients have them.
#[derive(Clone, Debug, Default)]
pub struct Access {
    /// The CA that signed the members' certificates (PEM): TLS to them.
    pub ca_pem: Option<Vec<u8>>,
    /// A client certificate and its key (PEM), for members that ask for one.
    pub identity_pem: Option<(Vec<u8>, Vec<u8>)>,
    /// A user and password, for a cluster with authentication on.
    pub user: Option<(String, String)>,
}

/// The key sealing the CA's private key: 32 bytes from a file.
pub struct SealingKey(aead::LessSafeKey);

impl SealingKey {
    /// Read the key from `file` (64 hex digits), creating it (mode 600)
    /// with a random key when it does not exist.
    pub fn load_or_create(file: &std::path::Path) -> Result<Self, StoreError> {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let hex_key = match std::fs::read_to_string(file) {
            Ok(text) => text.trim().to_string(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut bytes = [0u8; 32];
                ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
                    .map_err(|_| StoreError::Backend("no randomness for a sealing key".into()))?;
                let text = hex::encode(bytes);
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(file)
                    .map_err(|e| {
                        StoreError::Backend(format!("creating {}: {e}", file.display()))
                    })?;
                f.write_all(text.as_bytes())
                    .and_then(|()| f.sync_all())
                    .map_err(|e| StoreError::Backend(format!("writing {}: {e}", file.display())))?;
                text
            }
            Err(e) => {
                return Err(StoreError::Backend(format!(
                    "reading {}: {e}",
                    file.display()
                )));
            }
        };
        let bytes = hex::decode(&hex_key)
            .ok()
            .filter(|b| b.len() == 32)
            .ok_or_else(|| {
                StoreError::Backend(format!(
                    "{} does not hold a sealing key (64 hex digits)",
                    file.display()
                ))
            })?;
        let key = aead::UnboundKey::new(&aead::AES_256_GCM, &bytes)
            .map_err(|_| StoreError::Backend("a bad sealing key".into()))?;
        Ok(Self(aead::LessSafeKey::new(key)))
    }

    /// Seal `secret`, bound to `context`: `sealed:aes-256-gcm:HEX`.
    fn seal(&self, secret: &str, context: &str) -> Result<String, StoreError> {
        let mut nonce = [0u8; 12];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut nonce)
            .map_err(|_| StoreError::Backend("no randomness for a nonce".into()))?;
        let mut data = secret.as_bytes().to_vec();
        self.0
            .seal_in_place_append_tag(
                aead::Nonce::assume_unique_for_key(nonce),
                aead::Aad::from(context.as_bytes()),
                &mut data,
            )
            .map_err(|_| StoreError::Backend("sealing the CA key failed".into()))?;
        Ok(format!(
            "{SEALED}{}{}",
            hex::encode(nonce),
            hex::encode(data)
        ))
    }

    /// Open what [`SealingKey::seal`] sealed.
    fn open(&self, sealed: &str, context: &str) -> Result<String, StoreError> {
        let refused = || {
            StoreError::Backend(
                "the CA key in etcd does not open with this sealing key: give every replica the same --store-key-file".into(),
            )
        };
        let hex_text = sealed.strip_prefix(SEALED).ok_or_else(refused)?;
        let bytes = hex::decode(hex_text).map_err(|_| refused())?;
        if bytes.len() < 12 {
            return Err(refused());
        }
        let (nonce, data) = bytes.split_at(12);
        let mut data = data.to_vec();
        let nonce = aead::Nonce::try_assume_unique_for_key(nonce).map_err(|_| refused())?;
        let plain = self
            .0
            .open_in_place(nonce, aead::Aad::from(context.as_bytes()), &mut data)
            .map_err(|_| refused())?;
        String::from_utf8(plain.to_vec()).map_err(|_| refused())
    }
}

/// The store in etcd.
pub struct Etcd {
    client: Client,
    prefix: String,
    sealing: SealingKey,
    runtime: Background,
    /// Moves on every change under the prefix (see [`watch_changes`]).
    changes: tokio::sync::watch::Sender<u64>,
    /// This replica's entries on its lease, and the lease.
    leased: Arc<Leased>,
    /// This replica's id, as `PREFIX/leader` names the leader.
    id: String,
    /// Components without a plugin entry at the last garbage collection:
    /// removed if they still have none at the next.
    suspects: std::sync::Mutex<std::collections::BTreeSet<String>>,
}

/// Keys this replica wrote on its lease (to write again on a new lease).
#[derive(Default)]
struct Leased {
    lease: std::sync::atomic::AtomicI64,
    keys: std::sync::Mutex<std::collections::BTreeMap<String, Vec<u8>>>,
}

/// TTL of a replica's lease, seconds.
const LEASE_TTL: i64 = 10;

/// The store's own runtime, shut down without waiting when dropped (it is
/// dropped from async code too, where a runtime must not block).
struct Background(Option<tokio::runtime::Runtime>);

impl Background {
    fn get(&self) -> &tokio::runtime::Runtime {
        self.0.as_ref().expect("the runtime lives until drop")
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        // A replica that stops lets go of its lease at once: its entries
        // (and its lead) go now, not in 10 s.
        let lease = self.leased.lease.load(Ordering::Relaxed);
        let mut c = self.client.clone();
        let _ = run(self.runtime.get(), async move {
            let _ = tokio::time::timeout(Duration::from_secs(1), c.lease_revoke(lease)).await;
        });
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// How tonic says a request never left: its connection failed.
const UNREACHED: &str = "tcp connect error";

/// How long a starting control waits for etcd to answer.
const CONNECT_PATIENCE: Duration = Duration::from_secs(15);

fn backend(e: impl std::fmt::Display) -> StoreError {
    let e = e.to_string();
    let hint = if e.contains("user name is empty") {
        "; etcd has authentication on: give --etcd-user and --etcd-password-file"
    } else if e.contains("authentication failed") {
        "; check --etcd-user and the password in --etcd-password-file"
    } else if e.contains("permission denied") {
        "; the etcd user needs read and write on the store's prefix"
    } else {
        ""
    };
    StoreError::Backend(format!("etcd: {e}{hint}"))
}

fn json<T: serde::Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("store records serialize")
}

fn parse<T: serde::de::DeserializeOwned>(kv: &KeyValue) -> Result<T, StoreError> {
    serde_json::from_slice(kv.value()).map_err(|e| {
        backend(format!(
            "{} does not hold a record: {e}",
            String::from_utf8_lossy(kv.key())
        ))
    })
}

/// The key-values a transaction's `n`-th operation read.
fn read(ops: &[TxnOpResponse], n: usize) -> &[KeyValue] {
    match ops.get(n) {
        Some(TxnOpResponse::Get(r)) => r.kvs(),
        _ => &[],
    }
}

fn prefixed() -> Option<GetOptions> {
    Some(GetOptions::new().with_prefix())
}

impl Etcd {
    /// Connect to `url`'s members (waiting up to a few seconds for one to
    /// answer), sealing the CA key with `sealing`.
    pub fn connect(
        url: &EtcdUrl,
        access: &Access,
        sealing: SealingKey,
    ) -> Result<Self, StoreError> {
        let runtime = Background(Some(
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("etcd-store")
                .enable_all()
                .build()
                .map_err(backend)?,
        ));
        let tls = access.ca_pem.is_some() || access.identity_pem.is_some();
        let endpoints: Vec<String> = url
            .endpoints
            .iter()
            .map(|e| {
                if tls {
                    e.replacen("http://", "https://", 1)
                } else {
                    e.clone()
                }
            })
            .collect();
        let access = access.clone();
        // A cluster just started may still be electing its leader: try for
        // a while before giving up.
        let (client, lease) = run(runtime.get(), async move {
            let deadline = tokio::time::Instant::now() + CONNECT_PATIENCE;
            loop {
                let attempt = async {
                    let mut options = ConnectOptions::new()
                        .with_connect_timeout(Duration::from_secs(3))
                        .with_timeout(REQUEST_TIMEOUT)
                        .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5));
                    if tls {
                        let mut t = etcd_client::TlsOptions::new();
                        if let Some(ca) = &access.ca_pem {
                            t = t.ca_certificate(etcd_client::Certificate::from_pem(ca));
                        }
                        if let Some((cert, key)) = &access.identity_pem {
                            t = t.identity(etcd_client::Identity::from_pem(cert, key));
                        }
                        options = options.with_tls(t);
                    }
                    if let Some((user, password)) = &access.user {
                        options = options.with_user(user.clone(), password.clone());
                    }
                    let mut client = Client::connect(&endpoints, Some(options))
                        .await
                        .map_err(|e| format!("connecting to {}: {e}", endpoints.join(",")))?;
                    let lease = client
                        .lease_grant(LEASE_TTL, None)
                        .await
                        .map_err(|e| {
                            format!(
                                "granting this replica's lease at {}: {e}",
                                endpoints.join(",")
                            )
                        })?
                        .id();
                    Ok::<_, String>((client, lease))
                };
                match attempt.await {
                    Ok(done) => return Ok(done),
                    Err(e) if tokio::time::Instant::now() >= deadline => {
                        return Err(backend(format!("{e}; {}", hint(&access))));
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            }
        })??;
        let leased = Arc::new(Leased::default());
        leased.lease.store(lease, Ordering::Relaxed);
        runtime
            .get()
            .spawn(keep_lease(client.clone(), leased.clone()));
        let changes = tokio::sync::watch::Sender::new(0);
        runtime.get().spawn(watch_changes(
            client.clone(),
            format!("{}/", url.prefix),
            changes.clone(),
        ));
        Ok(Self {
            client,
            prefix: url.prefix.clone(),
            sealing,
            runtime,
            changes,
            leased,
            id: hex::encode(fastrand::u64(..).to_be_bytes()),
            suspects: Default::default(),
        })
    }

    /// Put or delete keys on this replica's lease, in transactions of at
    /// most etcd's 128 operations.
    fn commit_leased(
        &self,
        upserts: Vec<(String, Vec<u8>)>,
        deletes: Vec<String>,
    ) -> Result<(), StoreError> {
        {
            let mut keys = self.leased.keys.lock().unwrap();
            for (k, v) in &upserts {
                keys.insert(k.clone(), v.clone());
            }
            for k in &deletes {
                keys.remove(k);
            }
        }
        let lease = self.leased.lease.load(Ordering::Relaxed);
        let mut ops: Vec<TxnOp> = upserts
            .into_iter()
            .map(|(k, v)| TxnOp::put(k, v, Some(etcd_client::PutOptions::new().with_lease(lease))))
            .collect();
        ops.extend(deletes.into_iter().map(|k| TxnOp::delete(k, None)));
        self.call(move |mut c| {
            let mut ops = ops.clone();
            async move {
                while !ops.is_empty() {
                    let rest = ops.split_off(ops.len().min(MAX_TXN_OPS));
                    c.txn(Txn::new().and_then(std::mem::replace(&mut ops, rest)))
                        .await
                        .map_err(backend)?;
                }
                Ok(())
            }
        })
    }

    fn key(&self, rest: &str) -> String {
        format!("{}/{rest}", self.prefix)
    }

    /// Run `f` with a client on the store's runtime and wait for it — again
    /// (a few times) when it could not reach the etcd member it was sent
    /// to: with a member down, requests balanced onto it fail to connect
    /// and never reach etcd, so another member may take them.
    fn call<T, F>(&self, f: impl Fn(Client) -> F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: std::future::Future<Output = Result<T, StoreError>> + Send + 'static,
    {
        let mut tries = 0;
        loop {
            match run(self.runtime.get(), f(self.client.clone()))? {
                Err(StoreError::Backend(m)) if m.contains(UNREACHED) && tries < 8 => {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(25));
                }
                r => return r,
            }
        }
    }

    /// Every key-value under `prefix`, in key order.
    fn range(&self, prefix: String) -> Result<Vec<KeyValue>, StoreError> {
        self.call(move |mut c| {
            let prefix = prefix.clone();
            async move {
                let mut r = c.get(prefix, prefixed()).await.map_err(backend)?;
                Ok(r.take_kvs())
            }
        })
    }

    fn chunk_key(&self, sha256: &str, i: usize) -> String {
        self.key(&format!("components/{sha256}/{i:04}"))
    }

    /// The existing entry of a plugin: whether it is `meta`'s bytes.
    fn pushed_before(existing: &PluginMeta, meta: &PluginMeta) -> Result<Pushed, StoreError> {
        if existing.sha256 == meta.sha256 {
            Ok(Pushed::Unchanged)
        } else {
            Err(StoreError::Immutable {
                key: meta.key(),
                existing: existing.sha256.clone(),
            })
        }
    }
}

/// Keep this replica's lease alive (every third of its TTL) for the life of
/// the store; when it is lost, take a new one and write the replica's keys
/// again on it.
async fn keep_lease(client: Client, leased: Arc<Leased>) {
    let mut c = client;
    loop {
        let id = leased.lease.load(Ordering::Relaxed);
        if let Ok((mut keeper, mut responses)) = c.lease_keep_alive(id).await {
            loop {
                tokio::time::sleep(Duration::from_secs(LEASE_TTL as u64 / 3)).await;
                if keeper.keep_alive().await.is_err() {
                    break;
                }
                match responses.message().await {
                    Ok(Some(r)) if r.ttl() > 0 => {}
                    _ => break,
                }
            }
        }
        // Still ours? Otherwise a new lease, and everything on it again.
        let alive = c
            .lease_time_to_live(id, None)
            .await
            .is_ok_and(|r| r.ttl() > 0);
        if alive {
            continue;
        }
        let Ok(granted) = c.lease_grant(LEASE_TTL, None).await else {
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        };
        let lease = granted.id();
        leased.lease.store(lease, Ordering::Relaxed);
        let keys: Vec<(String, Vec<u8>)> = leased
            .keys
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for chunk in keys.chunks(MAX_TXN_OPS) {
            let ops: Vec<TxnOp> = chunk
                .iter()
                .map(|(k, v)| {
                    TxnOp::put(
                        k.clone(),
                        v.clone(),
                        Some(etcd_client::PutOptions::new().with_lease(lease)),
                    )
                })
                .collect();
            if let Err(e) = c.txn(Txn::new().and_then(ops)).await {
                tracing::warn!("writing this replica's entries on its new lease: {e}");
            }
        }
        tracing::warn!(
            lease,
            "this replica's etcd lease was lost; its entries are written again on a new one"
        );
    }
}

/// Watch everything under `prefix` for the life of the store, moving
/// `changes` on every event (components' chunks aside: their plugin entry
/// follows them). A broken watch is opened again after a second, and moves
/// `changes` too: events may have been missed meanwhile.
async fn watch_changes(client: Client, prefix: String, changes: tokio::sync::watch::Sender<u64>) {
    let chunks = format!("{prefix}components/");
    loop {
        let mut c = client.clone();
        let opened = c
            .watch(
                prefix.clone(),
                Some(etcd_client::WatchOptions::new().with_prefix()),
            )
            .await;
        if let Ok(mut stream) = opened {
            changes.send_modify(|n| *n += 1);
            while let Ok(Some(r)) = stream.message().await {
                let relevant = r.events().iter().any(|e| {
                    e.kv()
                        .is_none_or(|kv| !kv.key().starts_with(chunks.as_bytes()))
                });
                if relevant {
                    changes.send_modify(|n| *n += 1);
                }
            }
        }
        if changes.is_closed() {
            return;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// What to check when etcd cannot be reached, given how it was tried.
fn hint(access: &Access) -> &'static str {
    match (&access.ca_pem, &access.identity_pem) {
        (None, None) => {
            "is etcd listening there (plaintext; for TLS give --etcd-ca, and --etcd-cert and --etcd-key if it asks for client certificates)?"
        }
        (_, None) => {
            "over TLS: if etcd asks for client certificates (--client-cert-auth), give --etcd-cert and --etcd-key"
        }
        _ => {
            "over TLS with a client certificate: are --etcd-ca, --etcd-cert and --etcd-key etcd's?"
        }
    }
}

/// Run `fut` on `rt` from any thread (async code included) and wait.
fn run<T: Send + 'static>(
    rt: &tokio::runtime::Runtime,
    fut: impl std::future::Future<Output = T> + Send + 'static,
) -> Result<T, StoreError> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    rt.spawn(async move {
        let _ = tx.send(fut.await);
    });
    rx.recv()
        .map_err(|_| backend("the store's runtime stopped"))
}

impl Store for Etcd {
    fn watch(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        Some(self.changes.subscribe())
    }

    fn load(&self) -> Result<State, StoreError> {
        let keys = [
            self.key("meta/revision"),
            self.key("services/"),
            self.key("plugins/"),
            self.key("endpoints/"),
        ];
        let ops = self.call(move |mut c| {
            let keys = keys.clone();
            async move {
                // One transaction: one consistent snapshot of the four.
                let txn = Txn::new().and_then([
                    TxnOp::get(keys[0].clone(), None),
                    TxnOp::get(keys[1].clone(), prefixed()),
                    TxnOp::get(keys[2].clone(), prefixed()),
                    TxnOp::get(keys[3].clone(), prefixed()),
                ]);
                c.txn(txn).await.map(|r| r.op_responses()).map_err(backend)
            }
        })?;
        let mut state = State {
            revision: match read(&ops, 0).first() {
                Some(kv) => kv
                    .value_str()
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .ok_or_else(|| backend("meta/revision is not a number"))?,
                None => 0,
            },
            ..State::default()
        };
        for kv in read(&ops, 1) {
            let r: ServiceRecord = parse(kv)?;
            state.services.insert(r.name.clone(), r);
        }
        for kv in read(&ops, 2) {
            let m: PluginMeta = parse(kv)?;
            state.plugins.insert(m.key(), m);
        }
        for kv in read(&ops, 3) {
            let r: EndpointRecord = parse(kv)?;
            state.endpoints.insert(r.key(), r);
        }
        Ok(state)
    }

    fn put_plugin(&self, meta: &PluginMeta, component: &[u8]) -> Result<Pushed, StoreError> {
        let entry = self.key(&format!("plugins/{}", meta.key()));
        let chunks: Vec<(String, Vec<u8>)> = component
            .chunks(CHUNK)
            .enumerate()
            .map(|(i, c)| (self.chunk_key(&meta.sha256, i), c.to_vec()))
            .collect();
        if chunks.len() + 1 > MAX_TXN_OPS {
            return Err(backend(format!(
                "a component of {} bytes is more chunks than one transaction checks",
                component.len()
            )));
        }
        let (meta, value) = (meta.clone(), json(meta));
        let existing = self.call(move |mut c| {
            let (entry, chunks, value) = (entry.clone(), chunks.clone(), value.clone());
            async move {
                let got = c.get(entry.clone(), None).await.map_err(backend)?;
                if let Some(kv) = got.kvs().first() {
                    return Ok(Some(parse::<PluginMeta>(kv)?));
                }
                // Content-addressed chunks, written before anything names them
                // (writing them again is harmless).
                for (k, v) in &chunks {
                    c.put(k.clone(), v.clone(), None).await.map_err(backend)?;
                }
                // Visible only if it is still absent and every chunk is there.
                let mut when = vec![Compare::version(entry.clone(), CompareOp::Equal, 0)];
                when.extend(
                    chunks
                        .iter()
                        .map(|(k, _)| Compare::version(k.clone(), CompareOp::Greater, 0)),
                );
                let r = c
                    .txn(
                        Txn::new()
                            .when(when)
                            .and_then([TxnOp::put(entry.clone(), value, None)])
                            .or_else([TxnOp::get(entry.clone(), None)]),
                    )
                    .await
                    .map_err(backend)?;
                if r.succeeded() {
                    return Ok(None);
                }
                match read(&r.op_responses(), 0).first() {
                    Some(kv) => Ok(Some(parse::<PluginMeta>(kv)?)),
                    None => Err(backend(
                        "its chunks were removed while it was pushed; push it again",
                    )),
                }
            }
        })?;
        match existing {
            None => Ok(Pushed::Created),
            Some(e) => Self::pushed_before(&e, &meta),
        }
    }

    fn component(&self, sha256: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let kvs = self.range(self.key(&format!("components/{sha256}/")))?;
        if kvs.is_empty() {
            return Ok(None);
        }
        // Keys sort as their chunk numbers (zero-padded).
        let mut bytes = Vec::new();
        for kv in &kvs {
            bytes.extend_from_slice(kv.value());
        }
        if hex::encode(Sha256::digest(&bytes)) != sha256 {
            return Err(backend(format!(
                "the component {sha256}'s chunks do not hash to it"
            )));
        }
        Ok(Some(bytes))
    }

    fn delete_plugin(&self, key: &str) -> Result<bool, StoreError> {
        let entry = self.key(&format!("plugins/{key}"));
        let plugins = self.key("plugins/");
        let components = self.key("components/");
        self.call(move |mut c| {
            let (entry, plugins, components) = (entry.clone(), plugins.clone(), components.clone());
            async move {
                loop {
                    let r = c.get(plugins.clone(), prefixed()).await.map_err(backend)?;
                    let at = r.header().map_or(0, |h| h.revision());
                    let mut removed = None;
                    let mut others = Vec::new();
                    for kv in r.kvs() {
                        let m: PluginMeta = parse(kv)?;
                        if kv.key() == entry.as_bytes() {
                            removed = Some(m);
                        } else {
                            others.push(m.sha256);
                        }
                    }
                    let Some(removed) = removed else {
                        return Ok(false);
                    };
                    let mut ops = vec![TxnOp::delete(entry.clone(), None)];
                    // Its bytes go too unless another version has them; a push
                    // of the same bytes meanwhile changes the plugins' range,
                    // and this transaction then does nothing and looks again.
                    if !others.contains(&removed.sha256) {
                        ops.push(TxnOp::delete(
                            format!("{components}{}/", removed.sha256),
                            Some(etcd_client::DeleteOptions::new().with_prefix()),
                        ));
                    }
                    let unchanged = Compare::mod_revision(plugins.clone(), CompareOp::Less, at + 1)
                        .with_prefix();
                    let r = c
                        .txn(Txn::new().when([unchanged]).and_then(ops))
                        .await
                        .map_err(backend)?;
                    if r.succeeded() {
                        return Ok(true);
                    }
                }
            }
        })
    }

    fn commit_services(
        &self,
        expected: u64,
        upserts: &[ServiceRecord],
        deletes: &[String],
    ) -> Result<u64, StoreError> {
        if upserts.len() + deletes.len() + 1 > MAX_TXN_OPS {
            return Err(backend(format!(
                "one apply may change at most {} services on etcd (one transaction); this one changes {}: apply them in smaller groups",
                MAX_TXN_OPS - 1,
                upserts.len() + deletes.len()
            )));
        }
        let revision = expected + 1;
        let revision_key = self.key("meta/revision");
        let mut ops = vec![TxnOp::put(revision_key.clone(), revision.to_string(), None)];
        for r in upserts {
            let r = ServiceRecord {
                revision,
                ..r.clone()
            };
            ops.push(TxnOp::put(
                self.key(&format!("services/{}", r.name)),
                json(&r),
                None,
            ));
        }
        for name in deletes {
            ops.push(TxnOp::delete(self.key(&format!("services/{name}")), None));
        }
        let when = if expected == 0 {
            Compare::version(revision_key.clone(), CompareOp::Equal, 0)
        } else {
            Compare::value(revision_key.clone(), CompareOp::Equal, expected.to_string())
        };
        let actual = self.call(move |mut c| {
            let (when, ops, revision_key) = (when.clone(), ops.clone(), revision_key.clone());
            async move {
                let r = c
                    .txn(
                        Txn::new()
                            .when([when])
                            .and_then(ops)
                            .or_else([TxnOp::get(revision_key, None)]),
                    )
                    .await
                    .map_err(backend)?;
                if r.succeeded() {
                    return Ok(None);
                }
                let ops = r.op_responses();
                Ok(Some(
                    read(&ops, 0)
                        .first()
                        .and_then(|kv| kv.value_str().ok()?.parse::<u64>().ok())
                        .unwrap_or(0),
                ))
            }
        })?;
        match actual {
            None => Ok(revision),
            Some(actual) => Err(StoreError::Conflict { expected, actual }),
        }
    }

    fn commit_endpoints(
        &self,
        upserts: &[EndpointRecord],
        deletes: &[String],
    ) -> Result<(), StoreError> {
        // Live registrations, not config: on this replica's lease.
        self.commit_leased(
            upserts
                .iter()
                .map(|r| (self.key(&format!("endpoints/{}", r.key())), json(r)))
                .collect(),
            deletes
                .iter()
                .map(|k| self.key(&format!("endpoints/{k}")))
                .collect(),
        )
    }

    fn commit_statuses(
        &self,
        upserts: &[(String, Vec<u8>)],
        deletes: &[String],
    ) -> Result<(), StoreError> {
        self.commit_leased(
            upserts
                .iter()
                .map(|(k, v)| (self.key(&format!("status/{k}")), v.clone()))
                .collect(),
            deletes
                .iter()
                .map(|k| self.key(&format!("status/{k}")))
                .collect(),
        )
    }

    fn statuses(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let kvs = self.range(self.key("status/"))?;
        let strip = self.key("status/");
        Ok(kvs
            .into_iter()
            .map(|kv| {
                let (k, v) = kv.into_key_value();
                let k = String::from_utf8_lossy(&k);
                (k.strip_prefix(&strip).unwrap_or(&k).to_string(), v)
            })
            .collect())
    }

    fn ca(&self) -> Result<Option<CaRecord>, StoreError> {
        let key = self.key("ca");
        let kvs = self.call(move |mut c| {
            let key = key.clone();
            async move {
                let mut r = c.get(key, None).await.map_err(backend)?;
                Ok(r.take_kvs())
            }
        })?;
        kvs.first().map(|kv| self.unseal(parse(kv)?)).transpose()
    }

    fn init_ca(&self, ca: &CaRecord) -> Result<CaRecord, StoreError> {
        let key = self.key("ca");
        let sealed = CaRecord {
            key_pem: self.sealing.seal(&ca.key_pem, &ca.trust_domain)?,
            ..ca.clone()
        };
        let value = json(&sealed);
        let stored = self.call(move |mut c| {
            let (key, value) = (key.clone(), value.clone());
            async move {
                let r = c
                    .txn(
                        Txn::new()
                            .when([Compare::version(key.clone(), CompareOp::Equal, 0)])
                            .and_then([TxnOp::put(key.clone(), value, None)])
                            .or_else([TxnOp::get(key, None)]),
                    )
                    .await
                    .map_err(backend)?;
                if r.succeeded() {
                    return Ok(None);
                }
                read(&r.op_responses(), 0)
                    .first()
                    .map(parse::<CaRecord>)
                    .transpose()
            }
        })?;
        match stored {
            None => Ok(ca.clone()),
            Some(s) => self.unseal(s),
        }
    }

    fn lead(&self) -> Result<bool, StoreError> {
        let key = self.key("leader");
        let (id, lease) = (self.id.clone(), self.leased.lease.load(Ordering::Relaxed));
        self.call(move |mut c| {
            let (key, id) = (key.clone(), id.clone());
            async move {
                // Take it if nobody holds it; keep it if we do.
                let take = c
                    .txn(
                        Txn::new()
                            .when([Compare::version(key.clone(), CompareOp::Equal, 0)])
                            .and_then([TxnOp::put(
                                key.clone(),
                                id.clone(),
                                Some(etcd_client::PutOptions::new().with_lease(lease)),
                            )])
                            .or_else([TxnOp::get(key, None)]),
                    )
                    .await
                    .map_err(backend)?;
                if take.succeeded() {
                    return Ok(true);
                }
                Ok(read(&take.op_responses(), 0)
                    .first()
                    .is_some_and(|kv| kv.value() == id.as_bytes()))
            }
        })
    }

    fn collect_garbage(&self) -> Result<usize, StoreError> {
        let (plugins, components) = (self.key("plugins/"), self.key("components/"));
        let found = self.call(move |mut c| {
            let (plugins, components) = (plugins.clone(), components.clone());
            async move {
                let named = c.get(plugins.clone(), prefixed()).await.map_err(backend)?;
                let at = named.header().map_or(0, |h| h.revision());
                let mut names = std::collections::BTreeSet::new();
                for kv in named.kvs() {
                    names.insert(parse::<PluginMeta>(kv)?.sha256);
                }
                let chunks = c
                    .get(
                        components.clone(),
                        Some(GetOptions::new().with_prefix().with_keys_only()),
                    )
                    .await
                    .map_err(backend)?;
                let stored: std::collections::BTreeSet<String> = chunks
                    .kvs()
                    .iter()
                    .filter_map(|kv| {
                        let k = String::from_utf8_lossy(kv.key());
                        Some(k.strip_prefix(&components)?.split('/').next()?.to_string())
                    })
                    .collect();
                Ok((at, &stored - &names))
            }
        })?;
        let (at, orphans) = found;
        // Only what was already an orphan last time: a push in progress
        // names its bytes long before then.
        let doomed: Vec<String> = {
            let mut suspects = self.suspects.lock().unwrap();
            let doomed = suspects.intersection(&orphans).cloned().collect();
            *suspects = orphans;
            doomed
        };
        if doomed.is_empty() {
            return Ok(0);
        }
        let (plugins, components) = (self.key("plugins/"), self.key("components/"));
        let n = doomed.len().min(MAX_TXN_OPS - 1);
        let removed = self.call(move |mut c| {
            let (plugins, components, doomed) =
                (plugins.clone(), components.clone(), doomed.clone());
            async move {
                // Unless a plugin entry was written meanwhile (it might name
                // them): then nothing, and the next round looks again.
                let ops: Vec<TxnOp> = doomed
                    .iter()
                    .take(MAX_TXN_OPS - 1)
                    .map(|sha| {
                        TxnOp::delete(
                            format!("{components}{sha}/"),
                            Some(etcd_client::DeleteOptions::new().with_prefix()),
                        )
                    })
                    .collect();
                let unchanged =
                    Compare::mod_revision(plugins, CompareOp::Less, at + 1).with_prefix();
                let r = c
                    .txn(Txn::new().when([unchanged]).and_then(ops))
                    .await
                    .map_err(backend)?;
                Ok(r.succeeded())
            }
        })?;
        Ok(if removed { n } else { 0 })
    }

    fn put_token(&self, token: &TokenRecord) -> Result<(), StoreError> {
        let (key, value) = (self.key(&format!("tokens/{}", token.id)), json(token));
        self.call(move |mut c| {
            let (key, value) = (key.clone(), value.clone());
            async move {
                c.put(key, value, None).await.map_err(backend)?;
                Ok(())
            }
        })
    }

    fn redeem_token(
        &self,
        id: &str,
        secret_sha256: &str,
        service: &str,
        namespace: Option<&str>,
        now_ms: i64,
    ) -> Result<Result<TokenRecord, TokenRefusal>, StoreError> {
        let key = self.key(&format!("tokens/{id}"));
        let (secret, service, namespace) = (
            secret_sha256.to_string(),
            service.to_string(),
            namespace.map(str::to_string),
        );
        self.call(move |mut c| {
            let (key, secret, service, namespace) = (
                key.clone(),
                secret.clone(),
                service.clone(),
                namespace.clone(),
            );
            async move {
                // Read, admit, take one use if nobody else wrote it meanwhile.
                loop {
                    let r = c.get(key.clone(), None).await.map_err(backend)?;
                    let Some(kv) = r.kvs().first() else {
                        return Ok(Err(TokenRefusal::Unknown));
                    };
                    let mut record: TokenRecord = parse(kv)?;
                    if let Err(refusal) =
                        record.admit(&secret, &service, namespace.as_deref(), now_ms)
                    {
                        return Ok(Err(refusal));
                    }
                    record.uses_left -= 1;
                    let taken = c
                        .txn(
                            Txn::new()
                                .when([Compare::mod_revision(
                                    key.clone(),
                                    CompareOp::Equal,
                                    kv.mod_revision(),
                                )])
                                .and_then([TxnOp::put(key.clone(), json(&record), None)]),
                        )
                        .await
                        .map_err(backend)?;
                    if taken.succeeded() {
                        return Ok(Ok(record));
                    }
                }
            }
        })
    }
}

impl Etcd {
    fn unseal(&self, stored: CaRecord) -> Result<CaRecord, StoreError> {
        Ok(CaRecord {
            key_pem: self.sealing.open(&stored.key_pem, &stored.trust_domain)?,
            ..stored
        })
    }
}
