//! `wasmesh top`: the service edges, from the counters proxies report on
//! their discovery streams. Each proxy reports its counters cumulative
//! since it started; control keeps a minute of its reports and takes rates
//! and percentiles from the difference between the latest report and the
//! one at the window's start (or the proxy's start, counters at zero).
//!
//! An edge is counted by the caller's sidecar where it has one (reporter
//! `source`): the callee's sidecar sees the same requests, and counting
//! both would double them. Edges no caller's sidecar reports (callers
//! outside the mesh) come from the callee's side.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use wasmesh_api::edges;
use wasmesh_api::proto;

use super::{Mesh, ProxyHandle};

/// The longest window `Top` takes.
pub const MAX_WINDOW: Duration = Duration::from_secs(60);
/// The window when none is asked for.
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(10);
/// Most edges one report may carry (a proxy keeps at most 10,000 label
/// sets, several per edge).
const MAX_EDGES: usize = 10_000;

/// One report, as received.
struct Report {
    at: Instant,
    edges: BTreeMap<EdgeId, Counts>,
}

/// (reporter, source, destination, subset).
type EdgeId = (String, String, String, String);

#[derive(Clone, Default)]
struct Counts {
    requests: u64,
    errors: u64,
    buckets: Vec<u64>,
}

/// A proxy's recent reports, oldest first: enough to reach back one
/// [`MAX_WINDOW`].
#[derive(Default)]
pub(super) struct Reports(VecDeque<Report>);

impl Reports {
    /// Take a report, or say why not.
    fn take(&mut self, r: proto::EdgeReport) -> Result<(), String> {
        if r.bounds_ms != edges::bounds_ms() {
            return Err(format!(
                "its duration buckets ({} bounds) are not this control's ({}): a proxy of another version",
                r.bounds_ms.len(),
                edges::bounds_ms().len()
            ));
        }
        if r.edges.len() > MAX_EDGES {
            return Err(format!(
                "{} edges, over the {MAX_EDGES} a proxy keeps",
                r.edges.len()
            ));
        }
        let mut out = BTreeMap::new();
        for e in r.edges {
            if e.buckets.len() != edges::bounds_ms().len() + 1
                || e.errors > e.requests
                || e.buckets.iter().sum::<u64>() != e.requests
            {
                return Err(format!(
                    "edge {} -> {}: its counts do not add up",
                    e.source, e.destination
                ));
            }
            out.insert(
                (e.reporter, e.source, e.destination, e.subset),
                Counts {
                    requests: e.requests,
                    errors: e.errors,
                    buckets: e.buckets,
                },
            );
        }
        let now = Instant::now();
        if self.0.is_empty() {
            // The counters were all zero when the proxy started.
            let started = now.checked_sub(Duration::from_millis(r.uptime_ms));
            self.0.push_back(Report {
                at: started.unwrap_or(now),
                edges: BTreeMap::new(),
            });
        }
        self.0.push_back(Report {
            at: now,
            edges: out,
        });
        // Keep one report at or before the longest window's start.
        while self
            .0
            .get(1)
            .is_some_and(|r| now.duration_since(r.at) >= MAX_WINDOW)
        {
            self.0.pop_front();
        }
        Ok(())
    }

    /// Add this proxy's edges to `into`: totals from its latest report,
    /// the window from the difference with the report at its start.
    fn add_to(&self, now: Instant, window: Duration, into: &mut BTreeMap<EdgeId, Sum>) {
        let (Some(first), Some(latest)) = (self.0.front(), self.0.back()) else {
            return;
        };
        let base = self
            .0
            .iter()
            .rev()
            .find(|r| now.duration_since(r.at) >= window)
            .unwrap_or(first);
        let span = now.duration_since(base.at).as_secs_f64().max(1e-3);
        for (id, c) in &latest.edges {
            let before = base.edges.get(id).cloned().unwrap_or_default();
            let s = into.entry(id.clone()).or_default();
            s.requests += c.requests;
            s.errors += c.errors;
            let delta = c.requests.saturating_sub(before.requests);
            s.window_requests += delta;
            s.window_errors += c.errors.saturating_sub(before.errors);
            s.rps += delta as f64 / span;
            if s.buckets.is_empty() {
                s.buckets = vec![0; c.buckets.len()];
            }
            for (i, n) in c.buckets.iter().enumerate() {
                s.buckets[i] += n.saturating_sub(before.buckets.get(i).copied().unwrap_or(0));
            }
        }
    }
}

/// Counts summed over proxies.
#[derive(Clone, Default)]
struct Sum {
    requests: u64,
    errors: u64,
    window_requests: u64,
    window_errors: u64,
    rps: f64,
    /// Window requests per duration bucket.
    buckets: Vec<u64>,
}

impl Sum {
    fn add(&mut self, o: &Sum) {
        self.requests += o.requests;
        self.errors += o.errors;
        self.window_requests += o.window_requests;
        self.window_errors += o.window_errors;
        self.rps += o.rps;
        if self.buckets.is_empty() {
            self.buckets = vec![0; o.buckets.len()];
        }
        for (a, b) in self.buckets.iter_mut().zip(&o.buckets) {
            *a += b;
        }
    }

    fn window(&self) -> proto::EdgeWindow {
        proto::EdgeWindow {
            requests: self.window_requests,
            errors: self.window_errors,
            rps: self.rps,
            error_ratio: if self.window_requests == 0 {
                0.0
            } else {
                self.window_errors as f64 / self.window_requests as f64
            },
            p50_ms: edges::quantile(&self.buckets, 0.5),
            p99_ms: edges::quantile(&self.buckets, 0.99),
        }
    }
}

impl Mesh {
    /// A proxy reported its edge counters.
    pub fn edges(&self, h: &ProxyHandle, report: proto::EdgeReport) {
        let mut inner = self.inner.lock().unwrap();
        let Some(e) = inner.proxies.owned(h) else {
            return;
        };
        if let Err(why) = e.reports.take(report) {
            tracing::warn!(
                service = %h.key.0,
                instance = %h.key.1,
                "edge counters ignored: {why}"
            );
        }
    }

    /// The service edges over `window` (0: the default), from the
    /// connected proxies.
    pub fn top(&self, window: Duration) -> proto::TopResponse {
        let window = match window {
            Duration::ZERO => DEFAULT_WINDOW,
            w => w.min(MAX_WINDOW),
        };
        let now = Instant::now();
        let mut by_id = BTreeMap::new();
        {
            let inner = self.inner.lock().unwrap();
            for e in inner.proxies.live() {
                e.reports.add_to(now, window, &mut by_id);
            }
        }
        // (source, destination) -> reporter -> subset -> counts.
        let mut edges: BTreeMap<(String, String), BTreeMap<String, BTreeMap<String, Sum>>> =
            BTreeMap::new();
        for ((reporter, source, destination, subset), sum) in by_id {
            edges
                .entry((source, destination))
                .or_default()
                .entry(reporter)
                .or_default()
                .entry(subset)
                .or_default()
                .add(&sum);
        }
        let edges = edges
            .into_iter()
            .filter_map(|((source, destination), mut sides)| {
                let (reporter, subsets) = match sides.remove("source") {
                    Some(s) => ("source".to_string(), s),
                    None => sides.pop_first()?,
                };
                let mut total = Sum::default();
                for s in subsets.values() {
                    total.add(s);
                }
                let subsets = subsets
                    .into_iter()
                    .map(|(name, s)| proto::EdgeSubset {
                        name,
                        requests: s.requests,
                        errors: s.errors,
                        share: match (total.window_requests, total.requests) {
                            (0, 0) => 0.0,
                            (0, all) => s.requests as f64 / all as f64,
                            (all, _) => s.window_requests as f64 / all as f64,
                        },
                        window: Some(s.window()),
                    })
                    .collect();
                Some(proto::Edge {
                    source,
                    destination,
                    reporter,
                    requests: total.requests,
                    errors: total.errors,
                    window: Some(total.window()),
                    subsets,
                })
            })
            .collect();
        proto::TopResponse {
            window_ms: window.as_millis() as u64,
            edges,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counters(subset: &str, requests: u64, errors: u64, bucket: usize) -> proto::EdgeCounters {
        let mut buckets = vec![0; edges::bounds_ms().len() + 1];
        buckets[bucket] = requests;
        proto::EdgeCounters {
            reporter: "source".into(),
            source: "front".into(),
            destination: "back".into(),
            subset: subset.into(),
            requests,
            errors,
            buckets,
        }
    }

    fn report(edges: Vec<proto::EdgeCounters>) -> proto::EdgeReport {
        proto::EdgeReport {
            uptime_ms: 5,
            bounds_ms: edges::bounds_ms().to_vec(),
            edges,
        }
    }

    #[test]
    fn a_report_that_does_not_add_up_is_refused_and_changes_nothing() {
        let mut r = Reports::default();
        let mut bad = counters("v1", 10, 0, 3);
        bad.requests = 11;
        assert!(r.take(report(vec![bad])).is_err());
        let mut other = report(vec![counters("v1", 1, 0, 3)]);
        other.bounds_ms.pop();
        let why = r.take(other).unwrap_err();
        assert!(why.contains("another version"), "{why}");
        assert!(r.0.is_empty());
    }

    #[test]
    fn the_window_counts_what_changed_since_the_proxy_started() {
        let mut r = Reports::default();
        r.take(report(vec![
            counters("v1", 30, 0, 10),
            counters("v2", 10, 4, 20),
        ]))
        .unwrap();
        let mut sums = BTreeMap::new();
        r.add_to(Instant::now(), DEFAULT_WINDOW, &mut sums);
        let v2 = &sums[&("source".into(), "front".into(), "back".into(), "v2".into())];
        assert_eq!((v2.requests, v2.errors), (10, 4));
        assert_eq!((v2.window_requests, v2.window_errors), (10, 4));
        assert_eq!(v2.buckets[20], 10);
        let p50 = edges::quantile(&v2.buckets, 0.5).unwrap();
        assert!(p50 > edges::bounds_ms()[19] && p50 <= edges::bounds_ms()[20]);
    }
}
