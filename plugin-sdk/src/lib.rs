//! The wasmesh plugin SDK: write a mesh policy in ordinary Rust, test it
//! natively, build it into a WebAssembly component the proxy loads.
//!
//! A plugin is a type implementing [`Plugin`] with a serde `Config`, exported
//! with [`export!`], which also declares the hooks it implements (the proxy
//! calls only those):
//!
//! ```
//! use wasmesh_plugin_sdk::{export, Plugin, Request, RequestDecision, LocalReply};
//!
//! #[derive(serde::Deserialize)]
//! struct Config { prefix: String }
//!
//! struct DenyOne(Config);
//!
//! impl Plugin for DenyOne {
//!     type Config = Config;
//!     fn new(config: Config) -> Result<Self, String> { Ok(Self(config)) }
//!     fn on_request(&self, req: &Request<'_>) -> Result<RequestDecision, String> {
//!         if req.path().starts_with(&self.0.prefix) {
//!             return Ok(RequestDecision::reply(LocalReply::text(403, "denied")));
//!         }
//!         Ok(RequestDecision::proceed())
//!     }
//! }
//!
//! export!(DenyOne, hooks: [on_request]);
//! ```
//!
//! It sits between plugin crates and the contract in `wit/`: in a
//! `wasm32-wasip2` build it binds to the host through wit-bindgen; on any
//! other target the host functions act on [`testing::TestHost`], so
//! `cargo test` exercises the plugin's logic without wasm.

extern crate self as wasmesh_plugin_sdk;

// Public only for the `export!` macro's expansion (through `__private`).
#[cfg(target_arch = "wasm32")]
#[doc(hidden)]
pub mod bindings;
#[cfg(target_arch = "wasm32")]
mod guest;
pub mod host;
mod types;
mod view;

#[cfg(not(target_arch = "wasm32"))]
pub mod gate;
#[cfg(not(target_arch = "wasm32"))]
pub mod native;
#[cfg(not(target_arch = "wasm32"))]
pub mod testing;

pub use types::*;
pub use view::{Request, Response};
#[cfg(not(target_arch = "wasm32"))]
pub use view::{RequestSource, ResponseSource};

use serde::de::DeserializeOwned;

/// A mesh policy. Every hook has a default that decides nothing; implement
/// the ones the plugin needs and list them in [`export!`].
///
/// One value of this type serves one instance: it is built once by
/// [`Plugin::new`] and then called for many requests, one at a time. Keep
/// anything that must outlive the instance or be seen by other instances in
/// [`host::state`].
pub trait Plugin: Sized + 'static {
    /// The operator's configuration, deserialised from JSON.
    type Config: DeserializeOwned;

    /// Build the plugin from its configuration. An error refuses the
    /// configuration; name the field and what is expected.
    fn new(config: Self::Config) -> Result<Self, String>;

    /// Which of its declared hooks (`declared`, from [`export!`]) this
    /// configuration needs; the proxy calls only those. Default: all of
    /// them. Asked once, right after [`Plugin::new`]. Narrow it when a
    /// configuration makes a hook a no-op — a fault rule at 0%, a retry
    /// policy with no retry conditions — and the proxy saves the call on
    /// every request. A hook returned here that was not declared is not
    /// called.
    fn active_hooks(&self, declared: Hooks) -> Hooks {
        declared
    }

    /// Which attempt outcomes `on_response` is called for; the proxy calls
    /// it only for those. Default: all of them. Asked once, right after
    /// [`Plugin::new`]. Narrow it to what the plugin acts on — a retry
    /// policy to the failures it retries, a breaker counting consecutive
    /// errors to the errors plus [`Outcomes::NEXT_ON_ENDPOINT`] (to see the
    /// success that ends a run) — and a request that goes well costs the
    /// plugin no call. [`Outcomes::NONE`] is no `on_response` at all.
    fn response_outcomes(&self) -> Outcomes {
        Outcomes::ALL
    }

    /// What `on_request` decides for every request, when this
    /// configuration makes it not depend on the request (it reads nothing
    /// of it): the proxy applies the decision itself and does not call
    /// `on_request`, saving the call on every request. Default: `None`
    /// (called for every request). Asked once, right after [`Plugin::new`].
    ///
    /// A [`FixedRequest::holding`] counter is held for each request first,
    /// as [`host::state::counter_hold`]`(key, 1)` would; a request that
    /// would take it past its limit holds nothing and goes to `on_request`
    /// as usual, so write `on_request` to do the same hold and decide:
    /// the proxy's shortcut then changes nothing but the cost. The test
    /// [`testing::Harness`] applies it as the proxy does.
    fn fixed_on_request(&self) -> Option<FixedRequest> {
        None
    }

    /// The table `on_request` decides by, when this configuration makes it
    /// one (contract 0.1.5): the proxy evaluates it for each request and
    /// does not call `on_request`, saving the call on every request. The
    /// first [`TableRule`] whose `when` holds gives one of its decisions,
    /// drawn by weight; [`RequestTable::otherwise`] decides when none
    /// holds. `when` is a list of Istio `HTTPMatchRequest`s as JSON, read
    /// by the same matcher as a chain entry's `match` (the stock plugins'
    /// `wasmesh_istio`), against the request as it reaches the plugin. A
    /// router whose routes match paths, methods and headers and split by
    /// weight is such a table; one that rewrites a matched prefix or
    /// splits by a header's hash is not. Default: `None`. Asked once,
    /// right after [`Plugin::new`]; not with [`Plugin::fixed_on_request`]
    /// (the proxy refuses a configuration that gives both).
    ///
    /// Write `on_request` to decide the same as the table: the shortcut
    /// then changes nothing but the cost. The test [`testing::Harness`]
    /// cannot read Istio matches, so it keeps calling `on_request`; check
    /// the table against it in the plugin's own tests.
    fn table_on_request(&self) -> Option<RequestTable> {
        None
    }

    /// Runs before the upstream is called, in chain order, unless
    /// [`Plugin::fixed_on_request`] or [`Plugin::table_on_request`]
    /// decides instead. Default: proceed.
    /// An error counts as a plugin failure (the plugin's `on-failure` policy
    /// applies).
    fn on_request(&self, req: &Request<'_>) -> Result<RequestDecision, String> {
        let _ = req;
        Ok(RequestDecision::proceed())
    }

    /// Runs for every attempt's outcome, in reverse chain order. Default:
    /// proceed.
    fn on_response(
        &self,
        req: &Request<'_>,
        resp: &Response<'_>,
        attempt: &Attempt,
    ) -> Result<ResponseDecision, String> {
        let _ = (req, resp, attempt);
        Ok(ResponseDecision::proceed())
    }

    /// Runs once per request that reached this plugin, whatever happened.
    /// Default: nothing.
    fn on_complete(&self, req: &Request<'_>, done: &Completion) {
        let _ = (req, done);
    }
}

/// Which hooks a plugin declared in [`export!`]. Implemented by the macro.
pub trait Declared {
    /// The declared hooks.
    const HOOKS: Hooks;
}

/// Parse a plugin configuration from JSON text, with errors that name the
/// field (`http[0].route[1].weight: invalid type: ...`). `null` (no config
/// given) is read as `{}` when the type does not accept `null` itself.
pub fn parse_config<C: DeserializeOwned>(json: &str) -> Result<C, String> {
    fn parse<C: DeserializeOwned>(json: &str) -> Result<C, String> {
        let de = &mut serde_json::Deserializer::from_str(json);
        serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            // The JSON is the host's rendering of the operator's YAML: its
            // line and column mean nothing to them. The field path does.
            let inner = e.inner();
            let what = inner.to_string();
            let what = match what.rfind(" at line ") {
                Some(i) if inner.line() > 0 => what[..i].to_string(),
                _ => what,
            };
            if path == "." {
                format!("config: {what}")
            } else {
                format!("config.{path}: {what}")
            }
        })
    }
    if json.trim() == "null" {
        parse::<C>(json).or_else(|_| parse::<C>("{}"))
    } else {
        parse(json)
    }
}

#[doc(hidden)]
pub mod __private {
    #[cfg(target_arch = "wasm32")]
    pub use crate::guest::*;
    pub use wit_bindgen;

    #[cfg(target_arch = "wasm32")]
    pub use crate::bindings;
    #[cfg(target_arch = "wasm32")]
    pub use crate::bindings::export_filter;
}

#[doc(hidden)]
#[macro_export]
macro_rules! __hook_flag {
    ($h:ident, on_request) => {
        $h.on_request = true;
    };
    ($h:ident, on_response) => {
        $h.on_response = true;
    };
    ($h:ident, on_complete) => {
        $h.on_complete = true;
    };
    ($h:ident, $other:ident) => {
        compile_error!(concat!(
            "unknown hook `",
            stringify!($other),
            "`: expected on_request, on_response or on_complete"
        ));
    };
}

/// Export a [`Plugin`] as the component's `filter` and declare its hooks:
/// `export!(MyPlugin, hooks: [on_request, on_complete]);`
///
/// The proxy calls only the declared hooks, so declare exactly the ones the
/// plugin overrides (and, of those, only the ones its configuration needs:
/// see [`Plugin::active_hooks`]).
#[macro_export]
macro_rules! export {
    ($plugin:ty, hooks: [$($hook:ident),* $(,)?]) => {
        impl $crate::Declared for $plugin {
            const HOOKS: $crate::Hooks = {
                #[allow(unused_mut)]
                let mut h = $crate::Hooks { on_request: false, on_response: false, on_complete: false };
                $($crate::__hook_flag!(h, $hook);)*
                h
            };
        }

        #[cfg(target_arch = "wasm32")]
        const _: () = {
            use $crate::__private as __p;

            struct __WasmeshExport;

            ::std::thread_local! {
                static __PLUGIN: ::std::cell::OnceCell<$plugin> = const { ::std::cell::OnceCell::new() };
            }

            fn __with<R>(f: impl FnOnce(&$plugin) -> Result<R, String>) -> Result<R, String> {
                __PLUGIN.with(|cell| match cell.get() {
                    Some(p) => f(p),
                    None => Err("hook called before configure".to_string()),
                })
            }

            impl __p::Guest for __WasmeshExport {
                fn hooks() -> __p::WitHooks {
                    // Before `configure`: every declared hook; after it:
                    // the ones this configuration needs.
                    let declared = <$plugin as $crate::Declared>::HOOKS;
                    __p::hooks(__PLUGIN.with(|cell| match cell.get() {
                        Some(p) => declared.and(<$plugin as $crate::Plugin>::active_hooks(p, declared)),
                        None => declared,
                    }))
                }
                fn configure(config: String) -> Result<(), String> {
                    let plugin = __p::configure::<$plugin>(&config)?;
                    __PLUGIN.with(|cell| {
                        cell.set(plugin)
                            .map_err(|_| "configure called twice on one instance".to_string())
                    })
                }
                fn on_request(
                    req: &__p::WitRequest,
                ) -> Result<__p::WitRequestDecision, String> {
                    __with(|p| __p::on_request(p, req))
                }
                fn on_response(
                    req: &__p::WitRequest,
                    resp: &__p::WitResponse,
                    attempt: __p::WitAttempt,
                ) -> Result<__p::WitResponseDecision, String> {
                    __with(|p| __p::on_response(p, req, resp, attempt))
                }
                fn on_complete(req: &__p::WitRequest, done: __p::WitCompletion) {
                    let _ = __with(|p| {
                        __p::on_complete(p, req, done);
                        Ok(())
                    });
                }
            }

            __p::export_filter!(__WasmeshExport with_types_in __p::bindings);
        };
    };
}
