//! What control needs from the plugin runtime to judge what it is given:
//! compiling a pushed component the way proxies compile it, and running a
//! plugin's own `configure` against the config an apply gives it. The
//! binary supplies the proxy's runtime here, so control never links a
//! second copy of the contract and judges exactly as proxies will.

/// What a component is, once compiled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Inspected {
    /// The hooks it implements (`on-request`, `on-response`, `on-complete`).
    pub hooks: Vec<String>,
}

/// Judges components and plugin configurations.
pub trait Validator: Send + Sync + 'static {
    /// Compile `component` as a proxy would and ask for its hooks; the error
    /// says why it is not a plugin this mesh can run.
    fn inspect(&self, component: &[u8]) -> Result<Inspected, String>;

    /// Instantiate `component` under the proxies' limits, with an empty
    /// scratch state and `endpoints` (subset, `ip:port`) as its service's,
    /// and run its `configure` with `config_json`; the error is the
    /// plugin's refusal (or why it could not run).
    fn configure(
        &self,
        component: &[u8],
        service: &str,
        plugin: &str,
        config_json: &str,
        endpoints: &[(String, String)],
    ) -> Result<(), String>;

    /// The stock plugin `builtin:NAME`'s component, if there is one.
    fn builtin(&self, name: &str) -> Option<&'static [u8]>;

    /// The names of the stock plugins.
    fn builtins(&self) -> Vec<&'static str>;
}
