//! Per-edge request counters, as proxies report them to control for
//! `wasmesh top`: the duration buckets both sides agree on, and the
//! percentile estimate read from them.

use std::sync::LazyLock;

/// Upper bounds of the duration buckets, ms: 50 µs doubling every second
/// step (×√2) up to ≈ 84 s — 42 buckets, each within ≈ 20% of its
/// neighbour, then +Inf.
pub fn bounds_ms() -> &'static [f64] {
    static BOUNDS: LazyLock<Vec<f64>> = LazyLock::new(|| {
        (0..42)
            .map(|i| 0.05 * std::f64::consts::SQRT_2.powi(i))
            .collect()
    });
    &BOUNDS
}

/// The bucket a duration falls in: the first whose bound is not below it,
/// or the last (+Inf).
pub fn bucket(ms: f64) -> usize {
    bounds_ms().partition_point(|b| *b < ms)
}

/// The `q` quantile (0..=1) of the durations counted in `buckets`
/// (`bounds_ms().len() + 1` counts, not cumulative), interpolated linearly
/// inside its bucket as Prometheus's `histogram_quantile` does; `None`
/// without any count. One in the +Inf bucket reads as the last bound.
pub fn quantile(buckets: &[u64], q: f64) -> Option<f64> {
    let total: u64 = buckets.iter().sum();
    if total == 0 {
        return None;
    }
    let bounds = bounds_ms();
    let rank = q.clamp(0.0, 1.0) * total as f64;
    let mut below = 0u64;
    for (i, &n) in buckets.iter().enumerate() {
        if n > 0 && (below + n) as f64 >= rank {
            let Some(&upper) = bounds.get(i) else {
                return bounds.last().copied();
            };
            let lower = if i == 0 { 0.0 } else { bounds[i - 1] };
            let within = (rank - below as f64) / n as f64;
            return Some(lower + (upper - lower) * within);
        }
        below += n;
    }
    bounds.last().copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_microseconds_to_a_minute() {
        let b = bounds_ms();
        assert_eq!(b.len(), 42);
        assert_eq!(b[0], 0.05);
        assert!((b[2] - 0.1).abs() < 1e-12);
        assert!(b[41] > 60_000.0, "{}", b[41]);
        assert_eq!(bucket(0.0), 0);
        assert_eq!(bucket(0.05), 0);
        assert_eq!(bucket(0.06), 1);
        assert_eq!(bucket(1e9), 42);
    }

    #[test]
    fn quantiles_interpolate_inside_the_bucket() {
        let mut counts = vec![0u64; bounds_ms().len() + 1];
        assert_eq!(quantile(&counts, 0.5), None);
        // 100 requests in (0.05, 0.0707] ms: the median halfway.
        counts[1] = 100;
        let p50 = quantile(&counts, 0.5).unwrap();
        let (lo, hi) = (bounds_ms()[0], bounds_ms()[1]);
        assert!((p50 - (lo + hi) / 2.0).abs() < 1e-9, "{p50}");
        // One slow request in 100: p99 stays in the fast bucket, the
        // maximum reads the slow one's.
        counts[1] = 99;
        counts[30] = 1;
        assert!(quantile(&counts, 0.99).unwrap() <= hi);
        assert_eq!(quantile(&counts, 1.0), Some(bounds_ms()[30]));
        counts[42] = 1000;
        assert_eq!(quantile(&counts, 0.99), bounds_ms().last().copied());
    }
}
