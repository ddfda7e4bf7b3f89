//! `ratelimit`: a token bucket per client, shared by every instance of the
//! plugin in a proxy — the SDK's model of a stateful plugin.
//!
//! Each client (a header's value, the caller's verified principal, or its
//! IP) has a bucket of `burst` tokens refilled at `requestsPerSecond`; a
//! request takes one token or is answered `429` with `retry-after`. The
//! bucket lives in shared state, written with a compare-and-set
//! (`state::update`) so that concurrent requests on other workers never
//! spend a token twice, with a time to live of one full refill (a bucket
//! left alone that long is full again, the same as no bucket) and, at the
//! scope's key cap, evicting the least recently used bucket. See this
//! crate's README for the schema.

use serde::{Deserialize, Serialize};
use wasmesh_istio::{Condition, MatchRequest};
use wasmesh_plugin_sdk::host::state::{self, UpdateError};
use wasmesh_plugin_sdk::{
    Level, LocalReply, Plugin, ReplyFlag, Request, RequestDecision, WriteOptions, export, host,
};

/// The plugin's configuration.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Config {
    /// Tokens added per second.
    pub requests_per_second: f64,
    /// Bucket size: the most requests let through at once (default: one
    /// second's worth, at least 1).
    pub burst: Option<u32>,
    /// What a client is (default: its IP).
    pub key: Option<KeyForm>,
    /// Only requests matching one of these are limited (default: all).
    #[serde(rename = "match", default)]
    pub matches: Vec<MatchRequest>,
    /// Count what would be limited; limit nothing.
    #[serde(default)]
    pub dry_run: bool,
}

/// Who a bucket belongs to.
#[derive(Debug, Default, PartialEq, Eq)]
pub enum Key {
    /// The caller's IP address (without its port).
    #[default]
    Ip,
    /// The value of this request header; the IP when it is absent.
    Header(String),
    /// The caller's verified SPIFFE ID (mesh mTLS); the IP without one.
    Principal,
}

impl<'de> Deserialize<'de> for KeyForm {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Empty {}
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Form {
            header: Option<String>,
            principal: Option<Empty>,
            ip: Option<Empty>,
        }
        let f = Form::deserialize(d)?;
        match (f.header, f.principal, f.ip) {
            (Some(h), None, None) => Ok(KeyForm(Key::Header(h))),
            (None, Some(_), None) => Ok(KeyForm(Key::Principal)),
            (None, None, Some(_)) => Ok(KeyForm(Key::Ip)),
            _ => Err(serde::de::Error::custom(
                "give one of { header: NAME }, { principal: {} }, { ip: {} }",
            )),
        }
    }
}

/// `key` as written: `{ header: x-user }`, `{ principal: {} }`, `{ ip: {} }`.
#[derive(Debug)]
pub struct KeyForm(pub Key);

/// One client's bucket, as kept in shared state.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Bucket {
    /// Tokens left (fractions accrue between requests).
    pub tokens: f64,
    /// When `tokens` was computed: the proxy's monotonic clock, ms.
    pub at_ms: f64,
}

impl Bucket {
    /// This bucket refilled at `rate` tokens a second up to `burst`, as of
    /// `now` (a bucket not seen before is full).
    pub fn refilled(old: Option<Bucket>, rate: f64, burst: f64, now: f64) -> Bucket {
        match old {
            None => Bucket {
                tokens: burst,
                at_ms: now,
            },
            Some(b) => {
                let elapsed = (now - b.at_ms).max(0.0);
                Bucket {
                    tokens: (b.tokens + elapsed * rate / 1000.0).min(burst),
                    at_ms: now.max(b.at_ms),
                }
            }
        }
    }
}

/// The plugin.
pub struct RateLimit {
    rate: f64,
    burst: f64,
    key: Key,
    conditions: Vec<Condition>,
    dry_run: bool,
    /// How long a bucket takes to refill from empty, ms: its time to live.
    refill_ms: u64,
}

/// Longest state key kept as it is; longer ones are hashed.
const KEY_TEXT_CAP: usize = 200;

impl RateLimit {
    /// The state key of this request's client.
    fn client(&self, req: &Request<'_>) -> String {
        // The peer is asked for only when the key needs it: each host call
        // is a crossing the request pays for.
        let ip = |source: wasmesh_plugin_sdk::Peer| {
            source.ip().map_or(source.address, |ip| ip.to_string())
        };
        let (kind, id) = match &self.key {
            Key::Ip => ("ip", ip(req.source())),
            Key::Header(name) => match req.header(name) {
                Some(v) => ("h", v),
                None => ("ip", ip(req.source())),
            },
            Key::Principal => {
                let source = req.source();
                match source.principal.clone() {
                    Some(p) => ("p", p),
                    None => ("ip", ip(source)),
                }
            }
        };
        if id.len() <= KEY_TEXT_CAP {
            format!("{kind}:{id}")
        } else {
            format!("{kind}#{:016x}", fnv1a(id.as_bytes()))
        }
    }

    /// The `ratelimit-*` headers for a bucket after this request.
    fn headers(&self, b: &Bucket) -> [(&'static str, String); 3] {
        let missing = (self.burst - b.tokens).max(0.0);
        let reset = (missing / self.rate).ceil() as u64;
        [
            ("ratelimit-limit", format!("{}", self.burst as u64)),
            (
                "ratelimit-remaining",
                format!("{}", b.tokens.floor() as u64),
            ),
            ("ratelimit-reset", reset.to_string()),
        ]
    }
}

/// FNV-1a, 64 bits: a stable short name for a long client id.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

impl Plugin for RateLimit {
    type Config = Config;

    fn new(c: Config) -> Result<Self, String> {
        let rate = c.requests_per_second;
        if !(rate.is_finite() && rate > 0.0 && rate <= 1e6) {
            return Err(format!(
                "config.requestsPerSecond: {rate} is not a rate above 0 and at most 1000000"
            ));
        }
        let burst = c.burst.unwrap_or(rate.ceil() as u32).max(1);
        if c.burst == Some(0) {
            return Err("config.burst: 0 lets nothing through; give at least 1".into());
        }
        if let Some(KeyForm(Key::Header(h))) = &c.key
            && (h.is_empty() || h.bytes().any(|b| b.is_ascii_uppercase() || b == b' '))
        {
            return Err(format!(
                "config.key.header: {h:?} is not a lowercase header name"
            ));
        }
        let burst = f64::from(burst);
        Ok(Self {
            rate,
            burst,
            key: c.key.map(|k| k.0).unwrap_or_default(),
            conditions: wasmesh_istio::conditions(&c.matches, "config.match")?,
            dry_run: c.dry_run,
            refill_ms: ((burst / rate) * 1000.0).ceil().max(1.0) as u64,
        })
    }

    fn on_request(&self, req: &Request<'_>) -> Result<RequestDecision, String> {
        if !wasmesh_istio::in_scope(&self.conditions, req) {
            return Ok(RequestDecision::proceed());
        }
        let client = self.client(req);
        let now = host::monotonic_ns() as f64 / 1e6;
        let options = WriteOptions::ttl_ms(self.refill_ms).evicting();
        let taken = state::update(&client, options, |old: Option<Bucket>| {
            let mut b = Bucket::refilled(old, self.rate, self.burst, now);
            let allowed = b.tokens >= 1.0;
            if allowed {
                b.tokens -= 1.0;
            }
            (b, allowed)
        });
        let (bucket, allowed) = match taken {
            Ok(t) => t,
            // Other workers spent this client's bucket 8 times in a row
            // while we tried: it is as hot as a client gets. Limited.
            Err(UpdateError::Contention { .. }) => {
                host::metric_add("contention", 1);
                (Bucket::refilled(None, self.rate, 0.0, now), false)
            }
            Err(e) => return Err(format!("bucket {client}: {e}")),
        };
        if self.dry_run {
            if !allowed {
                host::metric_add("dry_run_limited", 1);
                host::log(Level::Debug, &format!("dry run: would limit {client}"));
            }
            return Ok(RequestDecision::proceed());
        }
        let headers = self.headers(&bucket);
        if allowed {
            let mut d = RequestDecision::proceed();
            for (name, value) in headers {
                d = d.set_response_header(name, value);
            }
            return Ok(d);
        }
        host::metric_add("limited", 1);
        let wait_s = ((1.0 - bucket.tokens) / self.rate).ceil().max(1.0) as u64;
        let mut reply = LocalReply::text(429, "rate limited\n")
            .flagged(ReplyFlag::RateLimited)
            .with_header("retry-after", wait_s.to_string());
        for (name, value) in headers {
            reply = reply.with_header(name, value);
        }
        Ok(RequestDecision::reply(reply))
    }
}

export!(RateLimit, hooks: [on_request]);

#[cfg(test)]
mod tests;
