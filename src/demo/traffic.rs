//! The demo's users: an open-loop generator asking for `/productpage` at a
//! steady rate through the `loadgen` sidecar (as an ingress would), every
//! fifth request as the user `jason`. Each answer is kept as a [`Sample`];
//! a step reads the samples of its window as [`Stats`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::Request;

use super::apps::{HttpClient, client};

/// The user bookinfo's rules single out.
pub const JASON: &str = "jason";

/// Requests in flight at most; past it a tick is skipped (and counted).
const MAX_IN_FLIGHT: usize = 64;

/// Samples kept at most; past it the older half goes (at 100 pages a
/// second, 16 minutes: far more than a step looks back).
const MAX_SAMPLES: usize = 100_000;

/// One answered (or failed) page.
#[derive(Clone, Debug)]
pub struct Sample {
    /// When it was sent.
    pub sent: Instant,
    /// When it ended.
    pub done: Instant,
    /// The status; 0 when no response came.
    pub status: u16,
    /// Sent as jason.
    pub jason: bool,
    /// The reviews version on the page.
    pub reviews: Option<String>,
    /// The page showed stars (`Some(false)`: the ratings were unavailable;
    /// `None`: that reviews version shows none).
    pub stars: Option<bool>,
    /// Response headers the demo's custom plugin sets.
    pub greeter_version: Option<String>,
    /// The custom plugin's visit count.
    pub visits: Option<u64>,
}

impl Sample {
    /// Not a complete page.
    pub fn failed(&self) -> bool {
        !(200..300).contains(&self.status)
    }
}

/// The generator, running.
pub struct Traffic {
    samples: Arc<Mutex<Vec<Sample>>>,
    skipped: Arc<AtomicUsize>,
    /// When each request in flight was sent, by its number.
    in_flight: Arc<Mutex<BTreeMap<u64, Instant>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Traffic {
    /// Send `rate` requests a second to `ingress` (a sidecar's outbound
    /// listener), `Host: productpage`.
    pub fn start(ingress: SocketAddr, rate: u32) -> Traffic {
        let samples = Arc::new(Mutex::new(Vec::new()));
        let skipped = Arc::new(AtomicUsize::new(0));
        let in_flight = Arc::new(Mutex::new(BTreeMap::new()));
        let (s, k, f) = (samples.clone(), skipped.clone(), in_flight.clone());
        let task = tokio::spawn(async move {
            let client = client();
            let mut tick = tokio::time::interval(Duration::from_secs(1) / rate.max(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            for n in 0u64.. {
                tick.tick().await;
                {
                    let mut flying = f.lock().unwrap();
                    if flying.len() >= MAX_IN_FLIGHT {
                        k.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    flying.insert(n, Instant::now());
                }
                let (client, samples, flying) = (client.clone(), s.clone(), f.clone());
                tokio::spawn(async move {
                    let sample = page(&client, ingress, n).await;
                    {
                        let mut kept = samples.lock().unwrap();
                        if kept.len() >= MAX_SAMPLES {
                            kept.drain(..MAX_SAMPLES / 2);
                        }
                        kept.push(sample);
                    }
                    flying.lock().unwrap().remove(&n);
                });
            }
        });
        Traffic {
            samples,
            skipped,
            in_flight,
            task,
        }
    }

    /// Wait until every request sent before `end` has ended (each gives up
    /// after 10 s).
    pub async fn settled(&self, end: Instant) {
        loop {
            let oldest = self.in_flight.lock().unwrap().values().min().copied();
            if oldest.is_none_or(|t| t >= end) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The samples of requests sent at or after `from` and ended by now.
    pub fn since(&self, from: Instant) -> Vec<Sample> {
        self.samples
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.sent >= from)
            .cloned()
            .collect()
    }

    /// Ticks skipped because too many requests were in flight.
    pub fn skipped(&self) -> usize {
        self.skipped.load(Ordering::Relaxed)
    }
}

async fn page(client: &HttpClient, ingress: SocketAddr, n: u64) -> Sample {
    let jason = n.is_multiple_of(5);
    let user = if jason {
        JASON.to_string()
    } else {
        format!("user-{}", n % 50)
    };
    let sent = Instant::now();
    let req = Request::get(format!("http://{ingress}/productpage"))
        .header("host", "productpage")
        .header("end-user", user)
        .body(Full::<Bytes>::default())
        .expect("a valid request");
    let mut sample = Sample {
        sent,
        done: sent,
        status: 0,
        jason,
        reviews: None,
        stars: None,
        greeter_version: None,
        visits: None,
    };
    let answer = tokio::time::timeout(Duration::from_secs(10), async {
        let resp = client.request(req).await.ok()?;
        let status = resp.status().as_u16();
        let header = |name: &str| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let (greeter, visits) = (header("x-greeter-version"), header("x-visits"));
        let body = resp.into_body().collect().await.ok()?.to_bytes();
        Some((status, greeter, visits, body))
    })
    .await;
    sample.done = Instant::now();
    if let Ok(Some((status, greeter, visits, body))) = answer {
        sample.status = status;
        sample.greeter_version = greeter;
        sample.visits = visits.and_then(|v| v.parse().ok());
        let page: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        let reviews = &page["reviews"];
        sample.reviews = reviews["version"].as_str().map(str::to_string);
        if reviews["stars"].is_number() {
            sample.stars = Some(true);
        } else if reviews["ratings"].is_string() {
            sample.stars = Some(false);
        }
    }
    sample
}

/// What a window of samples shows.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    /// Pages asked for.
    pub requests: usize,
    /// Pages that failed.
    pub failed: usize,
    /// Median latency.
    pub p50: Duration,
    /// 99th percentile latency.
    pub p99: Duration,
    /// Complete pages by reviews version.
    pub versions: BTreeMap<String, usize>,
    /// jason's pages that showed ratings, and those that could not.
    pub jason_stars: (usize, usize),
    /// Everyone else's, likewise.
    pub others_stars: (usize, usize),
    /// Pages by the custom plugin's version header (`-` for none).
    pub greeter: BTreeMap<String, usize>,
}

impl Stats {
    /// Summarise `samples`.
    pub fn of(samples: &[Sample]) -> Stats {
        let mut s = Stats {
            requests: samples.len(),
            ..Stats::default()
        };
        let mut latencies: Vec<Duration> = samples.iter().map(|x| x.done - x.sent).collect();
        latencies.sort();
        let at = |q: f64| {
            latencies
                .get(((latencies.len() as f64 * q).ceil() as usize).saturating_sub(1))
                .copied()
                .unwrap_or_default()
        };
        (s.p50, s.p99) = (at(0.5), at(0.99));
        for x in samples {
            if x.failed() {
                s.failed += 1;
                continue;
            }
            if let Some(v) = &x.reviews {
                *s.versions.entry(v.clone()).or_default() += 1;
            }
            let stars = if x.jason {
                &mut s.jason_stars
            } else {
                &mut s.others_stars
            };
            match x.stars {
                Some(true) => stars.0 += 1,
                Some(false) => stars.1 += 1,
                None => {}
            }
            let g = x.greeter_version.clone().unwrap_or_else(|| "-".into());
            *s.greeter.entry(g).or_default() += 1;
        }
        s
    }

    /// Complete pages.
    pub fn served(&self) -> usize {
        self.requests - self.failed
    }

    /// The share of complete pages showing reviews `version`, in percent.
    pub fn version_pct(&self, version: &str) -> f64 {
        pct(
            self.versions.get(version).copied().unwrap_or(0),
            self.served(),
        )
    }

    /// Failed pages, in percent.
    pub fn failed_pct(&self) -> f64 {
        pct(self.failed, self.requests)
    }

    /// One line: requests, failures, latency, the split.
    pub fn line(&self) -> String {
        let split: Vec<String> = self
            .versions
            .keys()
            .map(|v| format!("{v} {:.1}%", self.version_pct(v)))
            .collect();
        format!(
            "{} pages, {} failed ({:.1}%), p50 {}, p99 {}; reviews: {}",
            self.requests,
            self.failed,
            self.failed_pct(),
            millis(self.p50),
            millis(self.p99),
            if split.is_empty() {
                "-".to_string()
            } else {
                split.join(", ")
            }
        )
    }
}

/// `part` of `whole` in percent (0 when there is no whole).
pub fn pct(part: usize, whole: usize) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 * 100.0 / whole as f64
    }
}

/// A latency for a person: `3.1 ms`.
pub fn millis(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}
