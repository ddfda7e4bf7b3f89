//! A plugin's logic run natively inside a host other than the test harness.
//!
//! This exists for one purpose: measuring what the WebAssembly boundary
//! costs, by running the very same plugin code in the proxy without it (the
//! `native-chain` benchmark build). Production proxies only load components.
//!
//! The host provides the request and response views ([`RequestSource`],
//! [`ResponseSource`]) and the host functions ([`NativeHost`]); [`filter`]
//! turns a plugin type and its JSON configuration into a [`NativeFilter`] the
//! host calls like a component.

use std::cell::RefCell;
use std::sync::Arc;

use crate::types::*;
use crate::view::{Request, RequestSource, Response, ResponseSource};
use crate::{Declared, Plugin, parse_config};

/// The host functions of [`crate::host`], served by a native host.
#[allow(
    missing_docs,
    reason = "each mirrors the `crate::host` function of its name"
)]
pub trait NativeHost {
    fn log(&self, level: Level, message: &str);
    fn now_ms(&self) -> u64;
    fn monotonic_ns(&self) -> u64;
    fn random_u64(&self) -> u64;
    fn state_get(&self, key: &str) -> Option<StateEntry>;
    fn state_set(&self, key: &str, value: &[u8], expected: Option<u64>) -> Result<u64, StateError>;
    fn state_set_with(
        &self,
        key: &str,
        value: &[u8],
        expected: Option<u64>,
        options: WriteOptions,
    ) -> Result<u64, StateError>;
    fn state_delete(&self, key: &str) -> bool;
    fn state_delete_if(&self, key: &str, version: u64) -> Result<(), StateError>;
    fn counter_add(&self, key: &str, delta: i64) -> Result<i64, StateError>;
    fn counter_add_with(
        &self,
        key: &str,
        delta: i64,
        options: WriteOptions,
    ) -> Result<i64, StateError>;
    fn counter_get(&self, key: &str) -> i64;
    fn counter_hold(&self, key: &str, delta: i64) -> Result<i64, StateError>;
    fn counter_hold_within(
        &self,
        key: &str,
        delta: i64,
        limit: i64,
    ) -> Result<Option<i64>, StateError>;
    fn endpoints(&self, service: Option<&str>) -> Vec<Endpoint>;
    fn eject(&self, endpoint: &str, duration_ms: u32) -> bool;
    fn metric_add(&self, name: &str, delta: u64);
}

thread_local! {
    static HOST: RefCell<Option<Arc<dyn NativeHost + Send + Sync>>> = const { RefCell::new(None) };
}

/// Run `f` with `host` serving this thread's host functions (instead of the
/// test harness's fake host).
pub fn with_host<R>(host: &Arc<dyn NativeHost + Send + Sync>, f: impl FnOnce() -> R) -> R {
    struct Restore(Option<Arc<dyn NativeHost + Send + Sync>>);
    impl Drop for Restore {
        fn drop(&mut self) {
            let prev = self.0.take();
            HOST.with(|h| *h.borrow_mut() = prev);
        }
    }
    let _restore = Restore(HOST.with(|h| h.borrow_mut().replace(host.clone())));
    f()
}

/// Run `f` with the native host serving this thread's host functions, if
/// one is set (borrowed: a host call costs no reference count).
pub(crate) fn with_current<R>(f: impl FnOnce(Option<&dyn NativeHost>) -> R) -> R {
    HOST.with(|h| f(h.borrow().as_deref().map(|h| h as &dyn NativeHost)))
}

/// A configured plugin as a native host calls it. Undeclared hooks (and
/// those its configuration does not need) return the default decision
/// without calling the plugin, as the proxy does.
#[allow(missing_docs, reason = "each mirrors the `Plugin` hook of its name")]
pub trait NativeFilter: Send + Sync {
    fn hooks(&self) -> Hooks;
    fn on_request(&self, req: &dyn RequestSource) -> Result<RequestDecision, String>;
    fn on_response(
        &self,
        req: &dyn RequestSource,
        resp: &dyn ResponseSource,
        attempt: &Attempt,
    ) -> Result<ResponseDecision, String>;
    fn on_complete(&self, req: &dyn RequestSource, done: &Completion);
}

struct Native<P>(P);

impl<P: Plugin + Declared + Send + Sync> NativeFilter for Native<P> {
    fn hooks(&self) -> Hooks {
        P::HOOKS.and(self.0.active_hooks(P::HOOKS))
    }
    fn on_request(&self, req: &dyn RequestSource) -> Result<RequestDecision, String> {
        self.0.on_request(&Request { inner: req })
    }
    fn on_response(
        &self,
        req: &dyn RequestSource,
        resp: &dyn ResponseSource,
        attempt: &Attempt,
    ) -> Result<ResponseDecision, String> {
        self.0
            .on_response(&Request { inner: req }, &Response { inner: resp }, attempt)
    }
    fn on_complete(&self, req: &dyn RequestSource, done: &Completion) {
        self.0.on_complete(&Request { inner: req }, done)
    }
}

/// Configure plugin type `P` from JSON text, as the proxy configures a
/// component.
pub fn filter<P: Plugin + Declared + Send + Sync>(
    config_json: &str,
) -> Result<Box<dyn NativeFilter>, String> {
    Ok(Box::new(Native(P::new(parse_config(config_json)?)?)))
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::host;

    /// A host that serves one counter and records what it was asked.
    #[derive(Default)]
    struct Recording {
        calls: Mutex<Vec<String>>,
    }

    #[allow(unused_variables)]
    impl NativeHost for Recording {
        fn log(&self, level: Level, message: &str) {
            self.calls.lock().unwrap().push(format!("log {message}"));
        }
        fn now_ms(&self) -> u64 {
            7
        }
        fn monotonic_ns(&self) -> u64 {
            0
        }
        fn random_u64(&self) -> u64 {
            0
        }
        fn state_get(&self, key: &str) -> Option<StateEntry> {
            None
        }
        fn state_set(
            &self,
            key: &str,
            value: &[u8],
            expected: Option<u64>,
        ) -> Result<u64, StateError> {
            Err(StateError::BadKey)
        }
        fn state_set_with(
            &self,
            key: &str,
            value: &[u8],
            expected: Option<u64>,
            options: WriteOptions,
        ) -> Result<u64, StateError> {
            Err(StateError::BadKey)
        }
        fn state_delete(&self, key: &str) -> bool {
            false
        }
        fn state_delete_if(&self, key: &str, version: u64) -> Result<(), StateError> {
            Err(StateError::Conflict(0))
        }
        fn counter_add(&self, key: &str, delta: i64) -> Result<i64, StateError> {
            Ok(delta)
        }
        fn counter_add_with(
            &self,
            key: &str,
            delta: i64,
            options: WriteOptions,
        ) -> Result<i64, StateError> {
            Ok(delta)
        }
        fn counter_get(&self, key: &str) -> i64 {
            0
        }
        fn counter_hold(&self, key: &str, delta: i64) -> Result<i64, StateError> {
            self.calls
                .lock()
                .unwrap()
                .push(format!("hold {key} {delta}"));
            Ok(41 + delta)
        }
        fn counter_hold_within(
            &self,
            key: &str,
            delta: i64,
            limit: i64,
        ) -> Result<Option<i64>, StateError> {
            Ok(None)
        }
        fn endpoints(&self, service: Option<&str>) -> Vec<Endpoint> {
            Vec::new()
        }
        fn eject(&self, endpoint: &str, duration_ms: u32) -> bool {
            false
        }
        fn metric_add(&self, name: &str, delta: u64) {}
    }

    #[derive(serde::Deserialize)]
    struct Config {
        header: String,
    }

    /// Holds a counter, logs the clock, and echoes a request header.
    struct Probe(Config);

    impl Plugin for Probe {
        type Config = Config;
        fn new(c: Config) -> Result<Self, String> {
            Ok(Self(c))
        }
        fn on_request(&self, req: &Request<'_>) -> Result<RequestDecision, String> {
            let n = host::state::counter_hold("in-flight", 1).map_err(|e| e.to_string())?;
            host::log(Level::Info, &format!("now {}", host::now_ms()));
            let v = req.header(&self.0.header).unwrap_or_default();
            Ok(RequestDecision::proceed().set_request_header("x-echo", format!("{v}/{n}")))
        }
    }

    crate::export!(Probe, hooks: [on_request]);

    #[test]
    fn a_native_host_serves_the_host_functions_and_views_during_its_scope() {
        let filter = filter::<Probe>(r#"{"header":"end-user"}"#).unwrap();
        assert!(filter.hooks().on_request && !filter.hooks().on_response);
        let recording = Arc::new(Recording::default());
        let host: Arc<dyn NativeHost + Send + Sync> = recording.clone();
        let req = crate::testing::TestRequest::get("/").header("end-user", "jason");

        let d = with_host(&host, || filter.on_request(&req)).unwrap();
        assert_eq!(
            d.request_headers,
            vec![HeaderOp::Set(Header::new("x-echo", "jason/42"))]
        );
        assert_eq!(
            *recording.calls.lock().unwrap(),
            vec!["hold in-flight 1".to_string(), "log now 7".to_string()]
        );

        // Outside the scope, the test harness's fake host serves again: it
        // refuses a hold outside a request.
        let err = filter.on_request(&req).unwrap_err();
        assert!(err.contains("request"), "{err}");
        assert_eq!(recording.calls.lock().unwrap().len(), 2);
    }

    #[test]
    fn a_bad_config_is_refused_naming_the_field() {
        let err = filter::<Probe>(r#"{"header":3}"#).err().unwrap();
        assert!(err.starts_with("config.header"), "{err}");
    }
}
