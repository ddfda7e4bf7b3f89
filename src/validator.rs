//! Control's judge of plugins: the proxy's own runtime. A pushed component
//! is compiled exactly as proxies compile it (out of process), and an
//! applied plugin configuration is run through the plugin's own `configure`
//! under the proxies' default limits, with a scratch shared state and the
//! endpoints the apply gives.

use std::sync::Arc;

use arc_swap::ArcSwap;
use wasmesh_control::validate::{Inspected, Validator};
use wasmesh_proxy::metrics::Metrics;
use wasmesh_proxy::runtime::state::Scope;
use wasmesh_proxy::runtime::{ConfiguredPlugin, Limits, OnFailure, PluginScope, Runtime};
use wasmesh_proxy::upstream::cluster::{ClusterView, Endpoint, EndpointTable};

/// The proxy's runtime, judging for control.
pub struct RuntimeValidator {
    runtime: Arc<Runtime>,
    builtins: &'static [(&'static str, &'static [u8])],
    metrics: Arc<Metrics>,
}

impl RuntimeValidator {
    /// A judge compiling with `compiler`, keeping what it compiled in
    /// `cache` (control's data directory: a restarted control does not
    /// compile again, and a new build of a plugin compiles only the
    /// functions that changed).
    pub fn new(
        compiler: wasmesh_proxy::runtime::Compiler,
        builtins: &'static [(&'static str, &'static [u8])],
        cache: Option<&std::path::Path>,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            runtime: Runtime::with_options(cache, compiler)?,
            builtins,
            metrics: Arc::new(Metrics::new()),
        })
    }
}

impl Validator for RuntimeValidator {
    fn inspect(&self, component: &[u8]) -> Result<Inspected, String> {
        let loaded = self.runtime.load(component).map_err(|e| e.to_string())?;
        let mut hooks = Vec::new();
        for (on, name) in [
            (loaded.hooks.on_request, "on-request"),
            (loaded.hooks.on_response, "on-response"),
            (loaded.hooks.on_complete, "on-complete"),
        ] {
            if on {
                hooks.push(name.to_string());
            }
        }
        Ok(Inspected { hooks })
    }

    fn configure(
        &self,
        component: &[u8],
        service: &str,
        plugin: &str,
        config_json: &str,
        endpoints: &[(String, String)],
    ) -> Result<(), String> {
        let loaded = self.runtime.load(component).map_err(|e| e.to_string())?;
        let table = Arc::new(EndpointTable::default());
        let eps: Vec<Endpoint> = endpoints
            .iter()
            .filter_map(|(subset, address)| {
                let socket = address.parse().ok()?;
                Some(Endpoint {
                    state: table.get(service, address),
                    authority: address.parse().ok()?,
                    address: address.as_str().into(),
                    socket,
                    subset: subset.as_str().into(),
                    identity: None,
                })
            })
            .collect();
        let mut view = ClusterView {
            table,
            ..ClusterView::default()
        };
        view.services.insert(service.to_string(), eps.into());
        let scope = Arc::new(PluginScope {
            service: service.into(),
            plugin: plugin.into(),
            version: loaded.sha256[..12].into(),
            state: Arc::new(Scope::default()),
            cluster: Arc::new(ArcSwap::from_pointee(view)),
            metrics: self.metrics.clone(),
            log_budget: Default::default(),
        });
        ConfiguredPlugin::new(
            &self.runtime,
            loaded,
            scope,
            "(control)".into(),
            OnFailure::Closed,
            config_json.to_string(),
            Limits::default(),
        )
        .map(drop)
        .map_err(|e| match e {
            wasmesh_proxy::runtime::PluginFailure::Error(e) => e,
            other => format!("it failed while being configured: {other}"),
        })
    }

    fn builtin(&self, name: &str) -> Option<&'static [u8]> {
        self.builtins
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, b)| *b)
    }

    fn builtins(&self) -> Vec<&'static str> {
        self.builtins.iter().map(|(n, _)| *n).collect()
    }
}
