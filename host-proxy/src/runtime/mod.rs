//! The plugin runtime: one wasmtime engine per process, components compiled
//! once per sha256, and the stages a plugin goes through:
//! bytes → [`LoadedComponent`] (compiled, linked, hooks known) →
//! [`ConfiguredPlugin`] (its `configure` accepted the operator's config; a pool
//! of ready instances) → a hook call on one instance.
//!
//! Every hook call runs under an epoch deadline and every instance under a
//! memory cap. A trap, a deadline or a cap hit throws the instance away; the
//! next call gets a fresh one.
//!
//! Measured on the 2-core dev VM with `cargo bench --bench chain` (release,
//! deadlines and memory caps on, pooled instances): a hook call that does
//! nothing (the `nop` fixture) ≈ 0.66 µs p50 for on-request, ≈ 0.98 µs for
//! on-response; the 5 stock plugins as one chain (7 guest calls, a few host
//! calls each) ≈ 11.6 µs p50 against ≈ 1.1 µs for the same plugin code
//! compiled natively; a runaway loop under the 10 ms deadline is cut after
//! ≈ 10.9 ms (p50). Most of a call's cost is wasmtime's component-call path
//! (export lookup, lowering and lifting, handle tables, post-return);
//! compilation happens only while a snapshot is built, never on a request path.

mod artifacts;
mod bindings;
pub mod compiler;
mod convert;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
pub(crate) mod host;
pub mod memory;
#[cfg(feature = "native-chain")]
pub mod native;
pub mod state;
mod table;
pub mod types;
mod wasi_io;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use sha2::{Digest, Sha256};
use wasmtime::component::{Component, HasSelf, Linker, Resource};
use wasmtime::{Config, Engine, Store, StoreLimitsBuilder, Trap};

use self::bindings::{Plugin, PluginPre};
pub use self::compiler::Compiler;
pub use self::convert::{MAX_DECISION_HEADER_BYTES, MAX_HEADER_OPS, MAX_REPLY_BODY, MAX_WAIT};
use self::host::{HostState, RequestRes, ResponseRes};
pub use self::host::{PluginScope, RequestView};
pub use self::table::RequestTable;
use self::types::{
    Attempt, Completion, ReplyFlag, RequestDecision, ResponseDecision, ResponseView,
};
use crate::metrics::PluginMetrics;
pub use wasmesh_api::OnFailure;
/// Which hooks a component implements, or its configuration needs (the
/// SDK's own type).
pub use wasmesh_plugin_sdk::Hooks;
/// Which attempts a plugin's `on-response` is called for (the SDK's own
/// types, shared with its test harness).
pub use wasmesh_plugin_sdk::{Outcomes, gate::OutcomeGate};

/// How often the epoch advances while plugins run: the granularity of hook
/// deadlines.
pub const EPOCH_TICK: Duration = Duration::from_millis(1);

/// Default deadline of one hook call.
pub const DEFAULT_DEADLINE: Duration = Duration::from_millis(10);
/// Least deadline of `configure` (the hook deadline when that is longer).
pub const CONFIGURE_DEADLINE: Duration = Duration::from_secs(1);
/// Default linear-memory cap per instance.
pub const DEFAULT_MEMORY_LIMIT: usize = 16 << 20;
/// Largest component accepted, in bytes.
pub const MAX_COMPONENT_BYTES: usize = 16 << 20;
/// Largest `runtime.memory-limit` accepted.
pub const MAX_MEMORY_LIMIT: usize = 4 << 30;
/// Default bound on compiling one component (`runtime.compile-timeout`).
pub const DEFAULT_COMPILE_TIMEOUT: Duration = Duration::from_secs(30);

/// Compilations running at once, abandoned ones included; past it a new
/// component is refused until one ends.
const MAX_COMPILES: usize = 4;

/// Limits applied to every instance and call of a plugin.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Deadline of one hook call.
    pub deadline: Duration,
    /// Linear-memory cap, bytes.
    pub memory: usize,
    /// Ready instances kept.
    pub pool_size: usize,
    /// When a failing version is quarantined (off: never).
    pub quarantine: Option<Quarantine>,
}

/// After `traps` failures (trap, deadline, memory cap) within `window`, a
/// plugin version is quarantined until a new version replaces it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Quarantine {
    /// Failures that quarantine a version.
    pub traps: u32,
    /// The window they must fall in.
    pub window: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            deadline: DEFAULT_DEADLINE,
            memory: DEFAULT_MEMORY_LIMIT,
            pool_size: 8,
            quarantine: None,
        }
    }
}

impl Limits {
    /// The deadline is checked in two halves (see [`Deadline`]).
    fn half_ticks(&self) -> u64 {
        (self.deadline.as_nanos() / EPOCH_TICK.as_nanos() / 2).max(1) as u64
    }

    /// The first half's ticks: the rest of the deadline after the second
    /// half, plus one for the part of a tick already gone when the call
    /// starts, so that no call is cut before its deadline.
    fn first_half_ticks(&self) -> u64 {
        let total = self.deadline.as_nanos().div_ceil(EPOCH_TICK.as_nanos()) as u64;
        total.saturating_sub(self.half_ticks()).max(1) + 1
    }
}

/// Most times a call that was kept off the CPU gets its deadline extended.
const MAX_EXTENSIONS: u32 = 20;

/// Per-call deadline state. Epochs measure wall time, and on a busy machine a
/// worker can be preempted for longer than a hook's whole deadline; cutting
/// such a call would fail a well-behaved plugin. So the deadline is checked
/// in two halves: at the first half the thread's CPU time is noted; at the
/// second, a call that really ran (at least 40% of that half on the CPU) is
/// cut — a runaway plugin stops no sooner than its deadline, and about a
/// tick after it plus what the ticker's sleeps overran (11.8 ms p50 for
/// 10 ms, `cargo bench --bench chain`) — while one that was kept off the
/// CPU gets another half, up to [`MAX_EXTENSIONS`].
#[derive(Debug, Default)]
pub(crate) struct Deadline {
    half_ticks: u64,
    second_half: bool,
    cpu_mark: Duration,
    extensions: u32,
}

impl Deadline {
    fn arm(&mut self, limits: &Limits) {
        self.half_ticks = limits.half_ticks();
        self.second_half = false;
        self.extensions = 0;
    }

    fn on_epoch(&mut self) -> wasmtime::Result<wasmtime::UpdateDeadline> {
        let now = thread_cpu_time();
        if !self.second_half {
            self.second_half = true;
            self.cpu_mark = now;
            return Ok(wasmtime::UpdateDeadline::Continue(self.half_ticks));
        }
        let used = now.saturating_sub(self.cpu_mark);
        let window = EPOCH_TICK * self.half_ticks as u32;
        if used * 10 >= window * 4 || self.extensions >= MAX_EXTENSIONS {
            return Err(Trap::Interrupt.into());
        }
        self.extensions += 1;
        self.cpu_mark = now;
        Ok(wasmtime::UpdateDeadline::Continue(self.half_ticks))
    }
}

fn thread_cpu_time() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

impl From<bindings::HookSet> for Hooks {
    fn from(flags: bindings::HookSet) -> Self {
        Hooks {
            on_request: flags.contains(bindings::HookSet::ON_REQUEST),
            on_response: flags.contains(bindings::HookSet::ON_RESPONSE),
            on_complete: flags.contains(bindings::HookSet::ON_COMPLETE),
        }
    }
}

/// Why a component was refused.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// Over [`MAX_COMPONENT_BYTES`].
    #[error("{size} bytes is over the {MAX_COMPONENT_BYTES}-byte limit for a component")]
    TooLarge {
        /// Its size.
        size: usize,
    },
    /// Not a valid component (a core module, garbage, a compile failure).
    #[error("not a valid WebAssembly component: {0}")]
    Invalid(String),
    /// Compiling took longer than allowed; the compile was abandoned.
    #[error(
        "compiling it took longer than runtime.compile-timeout ({0:?}); the compile was abandoned. Raise runtime.compile-timeout or ship a smaller component"
    )]
    CompileTimeout(Duration),
    /// Too many compilations (some abandoned) still running.
    #[error(
        "{MAX_COMPILES} compilations are still running (abandoned ones included); try again when they end"
    )]
    CompilerBusy,
    /// The compiler process could not be run, or died without saying why:
    /// nothing is known about the component.
    #[error(
        "the compiler process failed ({0}); the component was not judged. The previous configuration keeps serving; check the proxy's executable and resources, then reload"
    )]
    Compiler(String),
    /// A component, but not a wasmesh plugin of a version this host serves.
    #[error(
        "not a wasmesh plugin this proxy can run (it must export `wasmesh:plugin/filter@0.1.x` and import nothing beyond `wasmesh:plugin/host` and WASI 0.2): {0}"
    )]
    Incompatible(String),
}

/// Why a hook call failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PluginFailure {
    /// The guest trapped (a panic, an unreachable, a stack overflow ...).
    #[error("trapped: {0}")]
    Trap(String),
    /// The call ran past its deadline.
    #[error("ran past its {0:?} deadline")]
    Timeout(Duration),
    /// The instance hit its memory cap.
    #[error("hit its memory cap of {0} bytes")]
    Memory(usize),
    /// The plugin returned an error.
    #[error("returned an error: {0}")]
    Error(String),
    /// The plugin returned more than the host accepts.
    #[error("returned too much: {0}")]
    TooLarge(String),
    /// The plugin returned something HTTP or the contract does not allow
    /// (a header value with a control character, a status out of range, a
    /// delay over the bound ...).
    #[error("returned an invalid decision: {0}")]
    Invalid(String),
    /// This version is quarantined and no earlier good version is loaded.
    #[error(
        "is quarantined after {0} failures within {1:?}, and no earlier good version is loaded; deploy a fixed version"
    )]
    Quarantined(u32, Duration),
}

impl PluginFailure {
    /// Short kind, for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            PluginFailure::Trap(_) => "trap",
            PluginFailure::Timeout(_) => "timeout",
            PluginFailure::Quarantined(..) => "quarantined",
            PluginFailure::TooLarge(_) => "too_large",
            PluginFailure::Invalid(_) => "invalid",
            PluginFailure::Memory(_) => "memory",
            PluginFailure::Error(_) => "error",
        }
    }
}

/// Keeps the epoch advancing while hook calls run, and sleeps otherwise, so an
/// idle proxy does not wake up every millisecond.
struct Ticker {
    /// Calls started since the ticker last looked.
    calls: AtomicU64,
    parked: AtomicBool,
    thread: thread::Thread,
}

impl Ticker {
    fn start(engine: Engine) -> Arc<Self> {
        let (tx, rx) = std::sync::mpsc::channel::<Arc<Ticker>>();
        let handle = thread::Builder::new()
            .name("wasmesh-epoch".into())
            .spawn(move || {
                let me: Arc<Ticker> = rx.recv().expect("ticker handle");
                let mut idle_ticks = 0u32;
                loop {
                    thread::sleep(EPOCH_TICK);
                    engine.increment_epoch();
                    if me.calls.swap(0, Ordering::AcqRel) > 0 {
                        idle_ticks = 0;
                        continue;
                    }
                    idle_ticks += 1;
                    // No call started for a while: sleep until one does.
                    // A call that started before `parked` is set will have
                    // bumped `calls`, so it is seen by the check below.
                    if idle_ticks >= 200 {
                        me.parked.store(true, Ordering::SeqCst);
                        if me.calls.load(Ordering::SeqCst) == 0 {
                            thread::park();
                        }
                        me.parked.store(false, Ordering::SeqCst);
                        idle_ticks = 0;
                    }
                }
            })
            .expect("spawning the epoch thread");
        let ticker = Arc::new(Ticker {
            calls: AtomicU64::new(0),
            parked: AtomicBool::new(false),
            thread: handle.thread().clone(),
        });
        tx.send(ticker.clone()).expect("ticker thread alive");
        ticker
    }

    /// Note a call starting; wake the ticker if it sleeps.
    fn call_started(&self) {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self.parked.load(Ordering::SeqCst) {
            self.thread.unpark();
        }
    }
}

/// A compiled plugin component, ready to instantiate.
pub struct LoadedComponent {
    /// Hex sha256 of its bytes.
    pub sha256: String,
    /// The hooks it implements.
    pub hooks: Hooks,
    pre: PluginPre<HostState>,
}

/// The process's plugin runtime.
pub struct Runtime {
    engine: Engine,
    linker: Linker<HostState>,
    cache: Mutex<HashMap<String, Arc<LoadedComponent>>>,
    /// One lock per component being loaded: a second load of the same
    /// bytes (a prefetch, then the apply naming them) waits for the first
    /// and takes its result instead of compiling again.
    loading: Mutex<HashMap<String, Arc<Mutex<()>>>>,
    ticker: Arc<Ticker>,
    /// Compilations running, abandoned ones included.
    compiling: Arc<std::sync::atomic::AtomicUsize>,
    /// Compiled components on disk (`--compile-cache`), if any.
    disk: Option<artifacts::ArtifactCache>,
    /// Where components are compiled.
    compiler: Compiler,
}

/// What a compile produced: the artifact bytes a compiler process sent, or
/// a component compiled in this process.
enum Compiled {
    Artifact(Vec<u8>),
    Component(Component),
}

impl Compiled {
    /// The component to run. With a compile cache it is written there and
    /// mapped back from the file, so only the code that runs is resident.
    fn load(
        self,
        engine: &Engine,
        sha256: &str,
        disk: Option<&artifacts::ArtifactCache>,
    ) -> Result<Component, LoadError> {
        let unusable =
            |e: wasmtime::Error| LoadError::Compiler(format!("its artifact is unusable: {e:#}"));
        if let Some(disk) = disk {
            let artifact = match &self {
                Compiled::Artifact(a) => std::borrow::Cow::Borrowed(a.as_slice()),
                Compiled::Component(c) => std::borrow::Cow::Owned(c.serialize().map_err(unusable)?),
            };
            disk.put(sha256, &artifact);
            if let Some(c) = disk.get(engine, sha256) {
                return Ok(c);
            }
        }
        match self {
            Compiled::Artifact(a) => artifacts::from_own_compiler(engine, &a).map_err(unusable),
            Compiled::Component(c) => Ok(c),
        }
    }
}

pub(crate) fn engine_config() -> Config {
    let mut config = Config::new();
    config.epoch_interruption(true);
    config.wasm_component_model(true);
    config.cranelift_opt_level(wasmtime::OptLevel::Speed);
    // `WASMESH_PERF_MAP=1`: write /tmp/perf-PID.map so `perf report` names
    // the plugins' compiled functions (profiling only).
    if std::env::var_os("WASMESH_PERF_MAP").is_some_and(|v| v == "1") {
        config.profiler(wasmtime::ProfilingStrategy::PerfMap);
    }
    config
}

impl Runtime {
    /// The engine, the linker with the host functions, the epoch ticker;
    /// compiling in process, with no compile cache.
    pub fn new() -> anyhow::Result<Arc<Self>> {
        Self::with_options(None, Compiler::InProcess)
    }

    /// [`Runtime::new`], keeping compiled components in `dir` across runs
    /// (if any) and compiling them with `compiler`.
    pub fn with_options(
        dir: Option<&std::path::Path>,
        compiler: Compiler,
    ) -> anyhow::Result<Arc<Self>> {
        let mut config = engine_config();
        // Compiling out of process, this process only loads artifacts: an
        // engine without Cranelift never maps the compiler's code.
        if matches!(compiler, Compiler::Subprocess(_)) {
            config.enable_compiler(false);
        } else if let Some(d) = dir {
            compiler::FunctionCache::enable(&mut config, d.join("functions"))?;
        }
        let engine = Engine::new(&config).map_err(|e| anyhow::anyhow!("{e:?}"))?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker).map_err(|e| anyhow::anyhow!("{e:?}"))?;
        wasi_io::add_to_linker(&mut linker).map_err(|e| anyhow::anyhow!("{e:?}"))?;
        Plugin::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s)
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        let disk = match dir {
            Some(d) => {
                Some(artifacts::ArtifactCache::open(d, &engine).map_err(|e| anyhow::anyhow!(e))?)
            }
            None => None,
        };
        let ticker = Ticker::start(engine.clone());
        Ok(Arc::new(Self {
            disk,
            compiler,
            engine,
            linker,
            cache: Mutex::default(),
            loading: Mutex::default(),
            ticker,
            compiling: Arc::default(),
        }))
    }

    /// Hex sha256 of some bytes.
    pub fn sha256(bytes: &[u8]) -> String {
        hex::encode(Sha256::digest(bytes))
    }

    /// Compile and link a component (or take it from the cache), and ask it
    /// which hooks it implements. Slow (milliseconds): never call on a
    /// request path.
    pub fn load(&self, bytes: &[u8]) -> Result<Arc<LoadedComponent>, LoadError> {
        self.load_within(bytes, DEFAULT_COMPILE_TIMEOUT)
    }

    /// [`Runtime::load`], abandoning a compile that takes longer than
    /// `timeout`. With [`Compiler::Subprocess`] the compiler process is
    /// killed then; in process the compile runs on its own thread, whose
    /// result is dropped when it comes too late (at most [`MAX_COMPILES`]
    /// compiles at once, abandoned threads included).
    pub fn load_within(
        &self,
        bytes: &[u8],
        timeout: Duration,
    ) -> Result<Arc<LoadedComponent>, LoadError> {
        if bytes.len() > MAX_COMPONENT_BYTES {
            return Err(LoadError::TooLarge { size: bytes.len() });
        }
        let sha256 = Self::sha256(bytes);
        if let Some(c) = self.cache.lock().unwrap().get(&sha256) {
            return Ok(c.clone());
        }
        let one = self
            .loading
            .lock()
            .unwrap()
            .entry(sha256.clone())
            .or_default()
            .clone();
        let loaded = {
            let _one = one.lock().unwrap_or_else(|e| e.into_inner());
            let done = self.cache.lock().unwrap().get(&sha256).cloned();
            match done {
                Some(c) => Ok(c),
                None => self.load_new(bytes, sha256.clone(), timeout),
            }
        };
        let mut loading = self.loading.lock().unwrap();
        if loading.get(&sha256).is_some_and(|l| Arc::ptr_eq(l, &one)) {
            loading.remove(&sha256);
        }
        loaded
    }

    /// Drop the loaded components nothing uses any more (no configured
    /// plugin, no load in progress): a proxy that went through many
    /// versions keeps only those it serves.
    pub fn forget_unused(&self) {
        self.cache
            .lock()
            .unwrap()
            .retain(|_, c| Arc::strong_count(c) > 1);
    }

    fn load_new(
        &self,
        bytes: &[u8],
        sha256: String,
        timeout: Duration,
    ) -> Result<Arc<LoadedComponent>, LoadError> {
        // Sidecars sharing the compile cache: one compiles, the others wait
        // and map its artifact.
        let _lock = self.disk.as_ref().and_then(|d| d.lock(&sha256, timeout));
        let cached = self
            .disk
            .as_ref()
            .and_then(|d| d.get(&self.engine, &sha256));
        let component = match cached {
            Some(c) => {
                tracing::info!(
                    sha256 = &sha256[..12],
                    "component read from the compile cache"
                );
                c
            }
            None => {
                let started = std::time::Instant::now();
                let c = self.compile(bytes, timeout)?.load(
                    &self.engine,
                    &sha256,
                    self.disk.as_ref(),
                )?;
                tracing::debug!(
                    sha256 = &sha256[..12],
                    ms = started.elapsed().as_millis() as u64,
                    "component compiled"
                );
                c
            }
        };
        let instance_pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(|e| LoadError::Incompatible(format!("{e:#}")))?;
        let pre =
            PluginPre::new(instance_pre).map_err(|e| LoadError::Incompatible(format!("{e:#}")))?;

        // Ask for its hooks on a throwaway instance.
        let scope = Arc::new(PluginScope {
            service: "".into(),
            plugin: "(loading)".into(),
            version: sha256[..12].into(),
            state: Arc::default(),
            cluster: Arc::default(),
            metrics: Arc::default(),
            log_budget: Default::default(),
        });
        // Probe under the largest cap any configuration may set: whether
        // this plugin fits its configured cap is judged when it is configured.
        let limits = Limits {
            memory: MAX_MEMORY_LIMIT,
            ..Limits::default()
        };
        let mut store = self.store(scope, &limits);
        self.ticker.call_started();
        let plugin = pre
            .instantiate(&mut store)
            .map_err(|e| LoadError::Incompatible(format!("instantiation failed: {e:#}")))?;
        let flags = plugin
            .wasmesh_plugin_filter()
            .call_hooks(&mut store)
            .map_err(|e| LoadError::Incompatible(format!("`hooks` failed: {e:#}")))?;
        let hooks = Hooks::from(flags);
        let loaded = Arc::new(LoadedComponent { sha256, hooks, pre });
        self.cache
            .lock()
            .unwrap()
            .insert(loaded.sha256.clone(), loaded.clone());
        Ok(loaded)
    }

    fn compile(&self, bytes: &[u8], timeout: Duration) -> Result<Compiled, LoadError> {
        if self.compiling.fetch_add(1, Ordering::AcqRel) >= MAX_COMPILES {
            self.compiling.fetch_sub(1, Ordering::AcqRel);
            return Err(LoadError::CompilerBusy);
        }
        if let Compiler::Subprocess(exe) = &self.compiler {
            let functions = self.disk.as_ref().map(|d| d.functions_dir());
            let r = compiler::compile_in_child(exe, bytes, timeout, functions.as_deref());
            self.compiling.fetch_sub(1, Ordering::AcqRel);
            return r.map(Compiled::Artifact);
        }
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let (engine, owned, compiling) =
            (self.engine.clone(), bytes.to_vec(), self.compiling.clone());
        let spawned = thread::Builder::new()
            .name("wasmesh-compile".into())
            .spawn(move || {
                let r = Component::new(&engine, &owned);
                compiling.fetch_sub(1, Ordering::AcqRel);
                let _ = tx.send(r);
            });
        if let Err(e) = spawned {
            self.compiling.fetch_sub(1, Ordering::AcqRel);
            return Err(LoadError::Invalid(format!(
                "cannot start a compile thread: {e}"
            )));
        }
        match rx.recv_timeout(timeout) {
            Ok(r) => r
                .map(Compiled::Component)
                .map_err(|e| LoadError::Invalid(format!("{e:#}"))),
            Err(_) => Err(LoadError::CompileTimeout(timeout)),
        }
    }

    fn store(&self, scope: Arc<PluginScope>, limits: &Limits) -> Store<HostState> {
        let store_limits = StoreLimitsBuilder::new()
            .memory_size(limits.memory)
            .table_elements(100_000)
            .instances(16)
            .tables(16)
            .memories(4)
            .trap_on_grow_failure(true)
            .build();
        let mut store = Store::new(&self.engine, HostState::new(scope, store_limits));
        store.limiter(host::limiter);
        store.epoch_deadline_callback(|mut cx| cx.data_mut().deadline.on_epoch());
        arm(&mut store, limits);
        store
    }
}

/// Arm the deadline for the next call into `store`.
fn arm(store: &mut Store<HostState>, limits: &Limits) {
    store.data_mut().deadline.arm(limits);
    store.set_epoch_deadline(limits.first_half_ticks());
}

/// One instance of a configured plugin.
struct Instance {
    store: Store<HostState>,
    plugin: Plugin,
}

/// A plugin whose `configure` accepted its config: what a chain runs.
pub struct ConfiguredPlugin {
    /// Name in the chain.
    pub name: Arc<str>,
    /// Where it came from (`builtin:x` or a path).
    pub source: String,
    /// What a failure does to the request.
    pub on_failure: OnFailure,
    /// The hooks the chain calls: those it implements that its
    /// configuration needs.
    pub hooks: Hooks,
    /// The attempts its `on-response` is called for (`on-response-for`).
    pub outcomes: OutcomeGate,
    /// What its `on-request` decides for every request, applied without a
    /// call (`on-request-fixed`).
    pub fixed: Option<FixedOnRequest>,
    /// The rules its `on-request` decides by, evaluated without a call
    /// (`on-request-table`).
    pub table: Option<RequestTable>,
    /// The configuration (JSON text) it was given.
    pub config_json: String,
    /// The limits it runs under.
    pub limits: Limits,
    component: Arc<LoadedComponent>,
    scope: Arc<PluginScope>,
    runtime: Arc<Runtime>,
    pool: Mutex<Vec<Instance>>,
    /// Its metrics (calls, durations, decisions, fail-open skips).
    pub metrics: PluginMetrics,
    /// Recent failures (trap, deadline, memory), when quarantine is on.
    failures: Mutex<std::collections::VecDeque<std::time::Instant>>,
    quarantined: AtomicBool,
    /// The last known-good version of this plugin, serving while this one
    /// is quarantined.
    fallback: arc_swap::ArcSwapOption<ConfiguredPlugin>,
    /// Benchmark builds only: the same plugin's logic, linked natively and
    /// called instead of the component.
    #[cfg(feature = "native-chain")]
    native: Option<native::NativePlugin>,
}

/// A plugin's `on-request-fixed`: the decision its `on-request` makes for
/// every request, and the counter held for each request first.
#[derive(Debug)]
pub struct FixedOnRequest {
    /// The decision, checked as one from `on-request` is.
    pub decision: Arc<RequestDecision>,
    /// The counter held (by 1) for each request, and the most it may reach:
    /// past it, `on-request` is called instead.
    pub hold: Option<(Arc<str>, Option<i64>)>,
}

/// An attempt as plugins get it, lowered once however many plugins'
/// `on-response` it is passed to.
pub struct LoweredAttempt(bindings::wit::Attempt);

impl LoweredAttempt {
    /// Lower `attempt`.
    pub fn new(attempt: &Attempt<'_>) -> Self {
        Self(convert::attempt(attempt))
    }
}

/// A hook's index into per-hook counters.
#[derive(Clone, Copy)]
enum Hook {
    Request = 0,
    Response = 1,
    Complete = 2,
}

impl Hook {
    fn name(self) -> &'static str {
        ["on_request", "on_response", "on_complete"][self as usize]
    }
}

impl ConfiguredPlugin {
    /// Instantiate the component and configure it; the instance becomes the
    /// first of the pool. An error is the plugin refusing its configuration
    /// (or failing while trying).
    #[allow(
        clippy::too_many_arguments,
        reason = "one constructor, called from one place"
    )]
    pub fn new(
        runtime: &Arc<Runtime>,
        component: Arc<LoadedComponent>,
        scope: Arc<PluginScope>,
        source: String,
        on_failure: OnFailure,
        config_json: String,
        limits: Limits,
    ) -> Result<Self, PluginFailure> {
        let metrics = scope
            .metrics
            .plugin(&scope.service, &scope.plugin, &scope.version);
        let mut plugin = Self {
            name: scope.plugin.clone(),
            source,
            on_failure,
            hooks: component.hooks,
            outcomes: OutcomeGate::new(Outcomes::ALL),
            fixed: None,
            table: None,
            config_json,
            limits,
            component,
            scope,
            runtime: runtime.clone(),
            pool: Mutex::default(),
            metrics,
            failures: Mutex::default(),
            quarantined: AtomicBool::new(false),
            fallback: arc_swap::ArcSwapOption::empty(),
            #[cfg(feature = "native-chain")]
            native: None,
        };
        let mut first = plugin.instantiate()?;
        // Configured, it may need fewer hooks than it implements (a fault
        // rule at 0% needs none): the chain calls only those.
        plugin.runtime.ticker.call_started();
        let needed = first
            .plugin
            .wasmesh_plugin_filter()
            .call_hooks(&mut first.store)
            .map_err(|e| plugin.classify(e))?;
        plugin.hooks = plugin.component.hooks.and(Hooks::from(needed));
        // And its `on-response` may be for some outcomes only.
        if let Some(wanted) = first.store.data_mut().outcomes.take() {
            if wanted.is_empty() {
                plugin.hooks.on_response = false;
            }
            plugin.outcomes = OutcomeGate::new(wanted);
        }
        // And what its `on-request` decides may not depend on the request.
        if let Some((decision, flag, hold)) = first.store.data_mut().fixed.take() {
            let refused = |why: String| {
                PluginFailure::Error(format!(
                    "on-request-fixed: {why} (the decision its configure gave for every request)"
                ))
            };
            let decision = convert::request_decision(decision, flag).map_err(|f| match f {
                PluginFailure::Invalid(why) => refused(why),
                f => refused(f.to_string()),
            })?;
            let hold = match hold {
                Some(h) if h.key.is_empty() || h.key.len() > state::KEY_LEN_CAP => {
                    return Err(refused(format!(
                        "hold key {:?}: expected 1 to 256 bytes, got {}",
                        h.key,
                        h.key.len()
                    )));
                }
                Some(h) => Some((Arc::from(h.key), h.limit)),
                None => None,
            };
            plugin.fixed = Some(FixedOnRequest {
                decision: Arc::new(decision),
                hold,
            });
        }
        // Or the table it decides by.
        if let Some((rules, otherwise, flag)) = first.store.data_mut().request_table.take() {
            if plugin.fixed.is_some() {
                return Err(PluginFailure::Error(
                    "on-request-table: its configure also gave on-request-fixed; give one of them"
                        .into(),
                ));
            }
            let table = RequestTable::new(rules, otherwise, flag).map_err(|why| {
                PluginFailure::Error(format!(
                    "on-request-table: {why} (the table its configure gave for on-request)"
                ))
            })?;
            plugin.table = Some(table);
        }
        plugin.pool.lock().unwrap().push(first);
        Ok(plugin)
    }

    /// Benchmark builds only: call `factory`'s native plugin, configured with
    /// this plugin's config, instead of the component.
    #[cfg(feature = "native-chain")]
    pub(crate) fn with_native(mut self, factory: native::Factory) -> Result<Self, PluginFailure> {
        self.native = Some(
            native::NativePlugin::new(factory, &self.config_json, self.scope.clone())
                .map_err(PluginFailure::Error)?,
        );
        Ok(self)
    }

    /// Whether this version is quarantined.
    pub fn is_quarantined(&self) -> bool {
        self.quarantined.load(Ordering::Acquire)
    }

    /// The version serving while this one is quarantined.
    pub fn fallback(&self) -> Option<Arc<ConfiguredPlugin>> {
        self.fallback.load_full()
    }

    /// Set (or clear) the last known-good version.
    pub fn set_fallback(&self, fallback: Option<Arc<ConfiguredPlugin>>) {
        self.fallback.store(fallback);
    }

    /// Count a failure toward quarantine.
    fn note_failure(&self) {
        let Some(q) = self.limits.quarantine else {
            return;
        };
        let now = std::time::Instant::now();
        let mut f = self.failures.lock().unwrap();
        while f.front().is_some_and(|t| now.duration_since(*t) > q.window) {
            f.pop_front();
        }
        f.push_back(now);
        if f.len() as u32 >= q.traps && !self.quarantined.swap(true, Ordering::AcqRel) {
            self.scope
                .metrics
                .plugin_quarantined
                .get_or_create(&vec![
                    ("service", self.scope.service.to_string()),
                    ("plugin", self.scope.plugin.to_string()),
                    ("version", self.scope.version.to_string()),
                ])
                .set(1);
            let serving = self.fallback().map(|p| p.version().to_string());
            tracing::error!(
                service = &*self.scope.service,
                plugin = &*self.scope.plugin,
                version = &*self.scope.version,
                "plugin quarantined after {} failures within {:?}; {}",
                q.traps,
                q.window,
                match &serving {
                    Some(v) => format!("version {v} serves instead"),
                    None => "no earlier good version: its on-failure applies".to_string(),
                }
            );
        }
    }

    /// Hex sha256 of the component.
    pub fn sha256(&self) -> &str {
        &self.component.sha256
    }

    /// The version shown in logs and metrics (a sha256 prefix).
    pub fn version(&self) -> &str {
        &self.scope.version
    }

    /// The same, shared (span attributes keep a count, not a copy).
    pub fn version_shared(&self) -> &Arc<str> {
        &self.scope.version
    }

    /// Whether this plugin is the same as `other` would be: same component,
    /// config, limits, failure policy and scope. Lets a new snapshot keep the
    /// warm instances of an unchanged plugin.
    pub fn same_as(
        &self,
        sha256: &str,
        config_json: &str,
        on_failure: OnFailure,
        limits: Limits,
        source: &str,
    ) -> bool {
        self.component.sha256 == sha256
            && self.config_json == config_json
            && self.on_failure == on_failure
            && self.limits == limits
            && self.source == source
    }

    fn instantiate(&self) -> Result<Instance, PluginFailure> {
        let mut store = self.runtime.store(self.scope.clone(), &self.limits);
        self.runtime.ticker.call_started();
        let plugin = self
            .component
            .pre
            .instantiate(&mut store)
            .map_err(|e| self.classify(e))?;
        // `configure` may do real work (compiling a router's regexes): it
        // gets at least CONFIGURE_DEADLINE, not the per-hook deadline.
        let configure = Limits {
            deadline: self.limits.deadline.max(CONFIGURE_DEADLINE),
            ..self.limits
        };
        arm(&mut store, &configure);
        plugin
            .wasmesh_plugin_filter()
            .call_configure(&mut store, &self.config_json)
            .map_err(|e| match self.classify(e) {
                PluginFailure::Timeout(_) => PluginFailure::Timeout(configure.deadline),
                f => f,
            })?
            .map_err(PluginFailure::Error)?;
        arm(&mut store, &self.limits);
        Ok(Instance { store, plugin })
    }

    fn classify(&self, e: wasmtime::Error) -> PluginFailure {
        if let Some(Trap::Interrupt) = e.downcast_ref::<Trap>() {
            return PluginFailure::Timeout(self.limits.deadline);
        }
        // The last error in the chain says what happened; the ones before it
        // carry the wasm backtrace, which goes to the debug log only.
        let cause = e.chain().last().map(|c| c.to_string()).unwrap_or_default();
        tracing::debug!(plugin = &*self.scope.plugin, "plugin trap detail: {e:?}");
        if cause.contains("growing memory")
            || cause.contains("memory minimum size")
            || cause.contains("resource limit exceeded")
        {
            return PluginFailure::Memory(self.limits.memory);
        }
        PluginFailure::Trap(cause)
    }

    fn fail(&self, f: PluginFailure, hook: Hook) -> PluginFailure {
        let hook = hook.name();
        self.scope
            .metrics
            .plugin_failures
            .get_or_create(&vec![
                ("service", self.scope.service.to_string()),
                ("plugin", self.scope.plugin.to_string()),
                ("version", self.scope.version.to_string()),
                ("kind", f.kind().to_string()),
            ])
            .inc();
        tracing::warn!(
            service = &*self.scope.service,
            plugin = &*self.scope.plugin,
            version = &*self.scope.version,
            hook,
            "plugin failure: {f}"
        );
        f
    }

    /// Run one hook call on a pooled (or fresh) instance. The request (and
    /// response) are moved into the store for the call and back out after.
    /// Returns what the call returned and the reply flag it set.
    fn call<R>(
        &self,
        hook: Hook,
        req: &mut Option<Box<RequestView>>,
        resp: Option<&mut Option<ResponseView>>,
        f: impl FnOnce(&Plugin, &mut Store<HostState>) -> wasmtime::Result<Result<R, String>>,
    ) -> Result<(R, ReplyFlag), PluginFailure> {
        if self.is_quarantined() {
            return match self.fallback() {
                Some(good) => good.call(hook, req, resp, f),
                None => {
                    let q = self
                        .limits
                        .quarantine
                        .expect("quarantined with quarantine on");
                    Err(self.fail(PluginFailure::Quarantined(q.traps, q.window), hook))
                }
            };
        }
        self.metrics.calls[hook as usize].inc();
        let pooled = self.pool.lock().unwrap().pop();
        let mut inst = match pooled {
            Some(i) => i,
            None => self.instantiate().map_err(|e| self.fail(e, hook))?,
        };
        let mut resp = resp;
        let data = inst.store.data_mut();
        data.req = req.take();
        data.reply_flag = ReplyFlag::LocalReply;
        if let Some(r) = resp.as_deref_mut() {
            data.resp = r.take();
        }
        // Timed from before the deadline is armed: a cut call's duration
        // is at least its deadline.
        let started = std::time::Instant::now();
        arm(&mut inst.store, &self.limits);
        self.runtime.ticker.call_started();
        let result = f(&inst.plugin, &mut inst.store);
        self.metrics.durations[hook as usize].observe(started.elapsed().as_secs_f64());
        let data = inst.store.data_mut();
        *req = data.req.take();
        let flag = data.reply_flag;
        if let Some(r) = resp {
            *r = data.resp.take();
        }
        match result {
            Ok(r) => {
                let mut pool = self.pool.lock().unwrap();
                if pool.len() < self.limits.pool_size {
                    pool.push(inst);
                }
                drop(pool);
                r.map(|r| (r, flag))
                    .map_err(|e| self.fail(PluginFailure::Error(e), hook))
            }
            Err(e) => {
                // A trapped instance is never entered again.
                let f = self.classify(e);
                self.note_failure();
                Err(self.fail(f, hook))
            }
        }
    }

    /// The decision of its `on-request-fixed` for `req`, taking its hold;
    /// `None` when `on-request` must be called instead (no fixed decision,
    /// or the hold would pass its limit). A quarantined plugin answers as
    /// the version serving for it.
    pub fn fixed_decision(&self, req: &mut RequestView) -> Option<Arc<RequestDecision>> {
        if self.is_quarantined() {
            return self.fallback()?.fixed_decision(req);
        }
        let fixed = self.fixed.as_ref()?;
        if let Some((key, limit)) = &fixed.hold {
            let state = &self.scope.state;
            let held = match *limit {
                Some(limit) => req.holds.hold_within(state, key.clone(), 1, limit),
                None => req.holds.hold(state, key.clone(), 1).map(Some),
            };
            let written = held.map(|n| state::Written {
                value: n,
                evicted: false,
            });
            if !matches!(self.scope.written(written), Ok(Some(_))) {
                return None;
            }
        }
        Some(fixed.decision.clone())
    }

    /// The decision its `on-request-table` gives `req`, its rule's counter
    /// counted; `None` when it has no table. A quarantined plugin answers
    /// as the version serving for it.
    pub fn table_decision(&self, req: &RequestView) -> Option<Arc<RequestDecision>> {
        if self.is_quarantined() {
            return self.fallback()?.table_decision(req);
        }
        let decided = self.table.as_ref()?.decide(req);
        let s = &self.scope;
        if let Some(name) = decided.count {
            s.metrics.plugin_custom_add(&s.service, &s.plugin, name, 1);
        }
        if let Some(template) = decided.log
            && tracing::enabled!(target: "wasmesh::plugin", tracing::Level::DEBUG)
        {
            let (service, plugin, version) = (&*s.service, &*s.plugin, &*s.version);
            let line = table::log_line(template, req);
            tracing::debug!(target: "wasmesh::plugin", service, plugin, version, "{line}");
        }
        Some(decided.decision.clone())
    }

    /// `on-request`: the plugin's decision, checked.
    pub fn on_request(
        &self,
        req: &mut Option<Box<RequestView>>,
    ) -> Result<RequestDecision, PluginFailure> {
        #[cfg(feature = "native-chain")]
        if let Some(n) = &self.native {
            self.metrics.calls[Hook::Request as usize].inc();
            let (d, flag) = n
                .on_request(req)
                .map_err(|e| self.fail(PluginFailure::Error(e), Hook::Request))?;
            return convert::request_decision(d, flag).map_err(|e| self.fail(e, Hook::Request));
        }
        let (d, flag) = self.call(Hook::Request, req, None, |p, store| {
            p.wasmesh_plugin_filter()
                .call_on_request(store, Resource::<RequestRes>::new_borrow(0))
        })?;
        convert::request_decision(d, flag).map_err(|e| self.fail(e, Hook::Request))
    }

    /// `on-response`: the plugin's decision, checked.
    pub fn on_response(
        &self,
        req: &mut Option<Box<RequestView>>,
        resp: &mut Option<ResponseView>,
        attempt: &LoweredAttempt,
    ) -> Result<ResponseDecision, PluginFailure> {
        let attempt = &attempt.0;
        #[cfg(feature = "native-chain")]
        if let Some(n) = &self.native {
            self.metrics.calls[Hook::Response as usize].inc();
            let (d, flag) = n
                .on_response(req, resp, attempt)
                .map_err(|e| self.fail(PluginFailure::Error(e), Hook::Response))?;
            return convert::response_decision(d, flag).map_err(|e| self.fail(e, Hook::Response));
        }
        let (d, flag) = self.call(Hook::Response, req, Some(resp), |p, store| {
            p.wasmesh_plugin_filter().call_on_response(
                store,
                Resource::<RequestRes>::new_borrow(0),
                Resource::<ResponseRes>::new_borrow(0),
                attempt,
            )
        })?;
        convert::response_decision(d, flag).map_err(|e| self.fail(e, Hook::Response))
    }

    /// `on-complete`.
    pub fn on_complete(
        &self,
        req: &mut Option<Box<RequestView>>,
        done: Completion,
    ) -> Result<(), PluginFailure> {
        let done = convert::completion(done);
        #[cfg(feature = "native-chain")]
        if let Some(n) = &self.native {
            self.metrics.calls[Hook::Complete as usize].inc();
            n.on_complete(req, done);
            return Ok(());
        }
        self.call(Hook::Complete, req, None, |p, store| {
            p.wasmesh_plugin_filter()
                .call_on_complete(store, Resource::<RequestRes>::new_borrow(0), done)
                .map(Ok)
        })
        .map(|((), _)| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_call_is_cut_before_its_deadline_nor_a_tick_after_it() {
        for ms in [1, 2, 3, 9, 10, 11, 250] {
            let limits = Limits {
                deadline: Duration::from_millis(ms),
                ..Limits::default()
            };
            // The first tick after the deadline is armed may come at once;
            // each later one comes a tick after the one before.
            let ticks = limits.first_half_ticks() - 1 + limits.half_ticks();
            let earliest_cut = EPOCH_TICK * ticks as u32;
            assert!(earliest_cut >= limits.deadline, "{ms} ms: {earliest_cut:?}");
            assert!(
                earliest_cut <= limits.deadline + EPOCH_TICK,
                "{ms} ms: {earliest_cut:?}"
            );
        }
    }
}
