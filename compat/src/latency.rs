//! A lock-free latency histogram: a request's time in one instance (its pre hook to its post
//! hook, the layers below included), in buckets of a quarter power of two of nanoseconds, so
//! percentiles are exact to within 19% and recording is one atomic add.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

const SUB: u32 = 4;
const BUCKETS: usize = 64 * SUB as usize;

pub struct LatencyHistogram {
    buckets: Box<[AtomicU64; BUCKETS]>,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram {
            buckets: Box::new(std::array::from_fn(|_| AtomicU64::new(0))),
        }
    }
}

impl std::fmt::Debug for LatencyHistogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LatencyHistogram")
            .field("count", &self.count())
            .finish()
    }
}

fn bucket(ns: u64) -> usize {
    if ns < u64::from(SUB) {
        return ns as usize;
    }
    let exp = 63 - ns.leading_zeros(); // >= 2
    let frac = (ns >> (exp - 2)) & u64::from(SUB - 1);
    (exp * SUB) as usize + frac as usize
}

/// The largest value that falls in bucket `b`.
fn upper(b: usize) -> u64 {
    if b < 2 * SUB as usize {
        // Values below SUB have a bucket each; buckets SUB..2*SUB are never used.
        return (b as u64).min(u64::from(SUB) - 1);
    }
    let (exp, frac) = (b as u32 / SUB, b as u64 % u64::from(SUB));
    let low = (1u64 << exp) | (frac << (exp - 2));
    low.saturating_add((1u64 << (exp - 2)) - 1)
}

impl LatencyHistogram {
    pub fn record(&self, ns: u64) {
        self.buckets[bucket(ns)].fetch_add(1, Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Relaxed)).sum()
    }

    /// The `q`-quantile (0 < q <= 1) in nanoseconds, as its bucket's upper bound; `None`
    /// before the first request.
    pub fn quantile(&self, q: f64) -> Option<u64> {
        let counts: Vec<u64> = self.buckets.iter().map(|b| b.load(Relaxed)).collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (b, c) in counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Some(upper(b));
            }
        }
        Some(upper(BUCKETS - 1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_bound_their_values() {
        for ns in [
            0u64,
            1,
            3,
            4,
            5,
            7,
            8,
            100,
            1000,
            123_456,
            10_000_000_000,
            u64::MAX / 2,
        ] {
            let b = bucket(ns);
            assert!(upper(b) >= ns, "{ns} above bucket {b}'s bound {}", upper(b));
            assert!(b == 0 || upper(b - 1) < ns, "{ns} belongs below bucket {b}");
            assert!(
                upper(b) as f64 <= ns as f64 * 1.25 + 1.0,
                "{ns}: bucket too wide"
            );
        }
    }

    #[test]
    fn quantiles_follow_the_recorded_values() {
        let h = LatencyHistogram::default();
        assert_eq!(h.quantile(0.5), None);
        for ns in 1..=1000u64 {
            h.record(ns * 1000);
        }
        let p50 = h.quantile(0.5).unwrap_or(0);
        let p99 = h.quantile(0.99).unwrap_or(0);
        assert!((500_000..=625_000).contains(&p50), "p50 {p50}");
        assert!((990_000..=1_250_000).contains(&p99), "p99 {p99}");
        assert_eq!(h.count(), 1000);
    }
}
