//! A token bucket that may go into debt: a request starts when the bucket holds its cost
//! (or, for a request larger than the burst, when the bucket is full), and takes its whole
//! cost then (so a request larger than the burst still passes, and the ones after it wait
//! it off). Refilled at `rate` per second up to `burst`.

use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
pub struct Bucket {
    /// Tokens per second.
    rate: f64,
    /// The most tokens it holds.
    burst: f64,
    level: f64,
    last: Instant,
}

impl Bucket {
    /// A full bucket of `burst` tokens refilled at `rate` a second (both at least 1).
    pub fn new(rate: u64, burst: u64, now: Instant) -> Bucket {
        let burst = burst.max(1) as f64;
        Bucket {
            rate: rate.max(1) as f64,
            burst,
            level: burst,
            last: now,
        }
    }

    /// New limits from now on; what the bucket holds (or owes) carries over, up to the new
    /// burst.
    pub fn set(&mut self, rate: u64, burst: u64, now: Instant) {
        self.refill(now);
        self.rate = rate.max(1) as f64;
        self.burst = burst.max(1) as f64;
        self.level = self.level.min(self.burst);
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.level = (self.level + dt * self.rate).min(self.burst);
        self.last = now;
    }

    /// How long until a request of `cost` may start (zero: now).
    pub fn wait(&mut self, cost: u64, now: Instant) -> Duration {
        self.refill(now);
        let need = (cost as f64).min(self.burst);
        if self.level >= need {
            Duration::ZERO
        } else {
            Duration::from_secs_f64((need - self.level) / self.rate)
        }
    }

    /// A request of `cost` tokens starts.
    pub fn take(&mut self, cost: u64, now: Instant) {
        self.refill(now);
        self.level -= cost as f64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_bucket_lets_its_burst_through_then_the_rate() {
        let t = Instant::now();
        let mut b = Bucket::new(100, 10, t);
        for _ in 0..10 {
            assert_eq!(b.wait(1, t), Duration::ZERO);
            b.take(1, t);
        }
        // The burst is spent: the next waits one token, 10 ms at 100 a second.
        assert_eq!(b.wait(1, t), Duration::from_millis(10));
        assert_eq!(b.wait(1, t + Duration::from_millis(10)), Duration::ZERO);
        // It never holds more than its burst, however long it waits.
        let later = t + Duration::from_secs(3600);
        b.wait(1, later);
        b.take(11, later);
        assert!(b.wait(1, later) > Duration::ZERO);
    }

    #[test]
    fn a_request_larger_than_the_burst_passes_and_the_next_waits_it_off() {
        let t = Instant::now();
        let mut b = Bucket::new(1 << 20, 1 << 16, t);
        assert_eq!(
            b.wait(4 << 20, t),
            Duration::ZERO,
            "a full bucket lets it in"
        );
        b.take(4 << 20, t);
        // 4 MiB less the 64 KiB burst in debt, then 4 KiB to hold: about 3.94 s at 1 MiB/s.
        let w = b.wait(4096, t);
        assert!(
            w > Duration::from_millis(3900) && w < Duration::from_millis(4000),
            "{w:?}"
        );
    }
}
