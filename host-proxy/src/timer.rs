//! Timers for the request path, kept off the worker runtime.
//!
//! The proxy serves requests on a worker runtime built with the I/O driver
//! only: a tokio runtime with timers reads the clock twice and scans its
//! timer wheel on every wake-up, whether a timer is due or not, and at a
//! light load that was ≈ 1 k instructions a request, a quarter of them on
//! the path from wake-up to write (`benches/RESULTS.md`, session 27). Every
//! timer is made on the control runtime's timer driver instead (its own
//! thread, where the control-plane client, identity renewal and the admin
//! server run): a worker task polls its sleep like any other, and the
//! control thread wakes that task when the sleep is due.
//!
//! So code that may run on a worker makes its timers here, never with
//! `tokio::time` directly (`host-proxy/clippy.toml` refuses those), and
//! gives hyper [`HyperTimer`]. Until [`install`] is called (tests, tools
//! that embed the proxy in one runtime), timers are made on the current
//! runtime, as `tokio::time` would.
#![allow(clippy::disallowed_methods)]

use std::future::IntoFuture;
use std::pin::Pin;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use hyper_util::rt::TokioTimer;
use tokio::runtime::{EnterGuard, Handle};
use tokio::time::{Interval, Sleep, Timeout};

static TIMERS: OnceLock<Handle> = OnceLock::new();

/// Make every later timer on `handle`'s runtime (which must have its time
/// driver enabled). Once per process; a second call is ignored.
pub fn install(handle: Handle) {
    let _ = TIMERS.set(handle);
}

/// Within the timer runtime's context, if one is installed.
fn enter() -> Option<EnterGuard<'static>> {
    TIMERS.get().map(Handle::enter)
}

/// [`tokio::time::sleep`] on the timer runtime.
pub fn sleep(duration: Duration) -> Sleep {
    let _timers = enter();
    tokio::time::sleep(duration)
}

/// [`tokio::time::timeout`] on the timer runtime.
pub fn timeout<F: IntoFuture>(duration: Duration, future: F) -> Timeout<F::IntoFuture> {
    let _timers = enter();
    tokio::time::timeout(duration, future)
}

/// [`tokio::time::timeout_at`] on the timer runtime.
pub fn timeout_at<F: IntoFuture>(deadline: Instant, future: F) -> Timeout<F::IntoFuture> {
    let _timers = enter();
    tokio::time::timeout_at(deadline.into(), future)
}

/// [`tokio::time::interval`] on the timer runtime.
pub fn interval(period: Duration) -> Interval {
    let _timers = enter();
    tokio::time::interval(period)
}

/// hyper's timer (header-read timeouts, HTTP/2 keep-alive, the client
/// pool's idle sweep), its sleeps made on the timer runtime.
#[derive(Clone, Copy, Debug, Default)]
pub struct HyperTimer;

impl hyper::rt::Timer for HyperTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        let _timers = enter();
        TokioTimer::new().sleep(duration)
    }

    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        let _timers = enter();
        TokioTimer::new().sleep_until(deadline)
    }

    fn reset(&self, sleep: &mut Pin<Box<dyn hyper::rt::Sleep>>, new_deadline: Instant) {
        let _timers = enter();
        TokioTimer::new().reset(sleep, new_deadline);
    }

    fn now(&self) -> Instant {
        TokioTimer::new().now()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sleep made here on a worker runtime without a time driver fires,
    /// driven by the timer runtime's thread.
    #[test]
    fn timers_made_here_run_on_the_installed_runtime() {
        let timers = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        install(timers.handle().clone());
        // Driven for the rest of the test process: other tests' timers may
        // be made on it now.
        std::thread::spawn(move || timers.block_on(std::future::pending::<()>()));
        let worker = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let (slept, timed_out) = worker.block_on(async {
            let started = Instant::now();
            sleep(Duration::from_millis(20)).await;
            let slept = started.elapsed();
            let timed_out = timeout(Duration::from_millis(10), std::future::pending::<()>())
                .await
                .is_err();
            (slept, timed_out)
        });
        assert!(slept >= Duration::from_millis(20), "slept {slept:?}");
        assert!(timed_out);
    }
}
