//! Rate limits. Kept in memory only, and never keyed by IP address.

use std::time::Instant;

/// A token bucket: `rate` tokens a second, holding at most `capacity`.
#[derive(Debug)]
pub(crate) struct TokenBucket {
    capacity: f64,
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub(crate) fn new(rate_per_second: f64, capacity: f64, now: Instant) -> Self {
        Self {
            capacity,
            rate: rate_per_second,
            tokens: capacity,
            last: now,
        }
    }

    /// The tokens the bucket holds at `now`.
    fn refilled(&self, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        (self.tokens + elapsed * self.rate).min(self.capacity)
    }

    /// True when the bucket would be full at `now`: forgetting it changes nothing.
    pub(crate) fn is_full(&self, now: Instant) -> bool {
        self.refilled(now) >= self.capacity
    }

    /// Takes one token if there is one.
    pub(crate) fn try_take(&mut self, now: Instant) -> bool {
        self.tokens = self.refilled(now);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn refuses_past_capacity_and_refills_with_time() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(1.0, 2.0, start);
        assert!(bucket.try_take(start));
        assert!(bucket.try_take(start));
        assert!(!bucket.try_take(start));
        assert!(bucket.try_take(start + Duration::from_secs(1)));
        assert!(!bucket.try_take(start + Duration::from_secs(1)));
    }
}
