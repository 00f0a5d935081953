//! The one token bucket every rate limit uses (the server's attestation
//! and signing budgets, the agent's per-uid Workload API budget): `burst`
//! tokens, refilled at `rate` per second, read against the injected clock
//! in milliseconds.

/// A token bucket.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TokenBucket {
    tokens: f64,
    at_ms: i64,
}

impl TokenBucket {
    /// A full bucket of `burst` tokens at `now_ms`.
    pub fn full(burst: u32, now_ms: i64) -> Self {
        Self { tokens: f64::from(burst), at_ms: now_ms }
    }

    /// Refills for the time since the last look (never past `burst`; a
    /// clock that went back refills nothing).
    fn refill(&mut self, rate: f64, burst: u32, now_ms: i64) {
        let elapsed = (now_ms - self.at_ms).max(0) as f64 / 1000.0;
        self.tokens = (self.tokens + elapsed * rate).min(f64::from(burst));
        self.at_ms = self.at_ms.max(now_ms);
    }

    /// Takes `n` tokens if there are that many: true; else takes nothing.
    pub fn take(&mut self, n: f64, rate: f64, burst: u32, now_ms: i64) -> bool {
        self.refill(rate, burst, now_ms);
        if self.tokens < n {
            return false;
        }
        self.tokens -= n;
        true
    }

    /// Takes one token whether or not there is one (a refusal spends the
    /// budget it is measured against); the level never goes below zero.
    pub fn spend(&mut self, rate: f64, burst: u32, now_ms: i64) {
        self.refill(rate, burst, now_ms);
        self.tokens = (self.tokens - 1.0).max(0.0);
    }

    /// Whether at least one token is left, after refilling.
    pub fn has_token(&mut self, rate: f64, burst: u32, now_ms: i64) -> bool {
        self.refill(rate, burst, now_ms);
        self.tokens >= 1.0
    }

    /// Whether, refilled to `now_ms`, the bucket is full (a full bucket is
    /// the same as none: it need not be kept).
    pub fn full_at(&mut self, rate: f64, burst: u32, now_ms: i64) -> bool {
        self.refill(rate, burst, now_ms);
        self.is_full(burst)
    }

    /// Whether the bucket is full (a full bucket need not be kept).
    pub fn is_full(&self, burst: u32) -> bool {
        self.tokens >= f64::from(burst)
    }

    /// Seconds until one token is back, at `rate` (at least 1).
    pub fn secs_to_next(&self, rate: f64) -> f64 {
        if rate <= 0.0 {
            return f64::INFINITY;
        }
        ((1.0 - self.tokens) / rate).ceil().max(1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_gives_its_burst_then_refills_at_its_rate() {
        let mut b = TokenBucket::full(3, 0);
        assert!(b.take(3.0, 2.0, 3, 0));
        assert!(!b.take(1.0, 2.0, 3, 0), "empty after the burst");
        assert!(!b.take(1.0, 2.0, 3, 400), "0.8 of a token after 400 ms at 2/s");
        assert!(b.take(1.0, 2.0, 3, 500));
        assert!(b.take(2.0, 2.0, 3, 60_000) && !b.is_full(3), "never more than the burst");
    }

    #[test]
    fn a_clock_that_goes_back_refills_nothing() {
        let mut b = TokenBucket::full(1, 10_000);
        assert!(b.take(1.0, 1.0, 1, 10_000));
        assert!(!b.has_token(1.0, 1, 0));
        assert!(!b.has_token(1.0, 1, 10_500), "the time went back: no refill for it");
        assert!(b.has_token(1.0, 1, 11_000));
    }

    #[test]
    fn spending_never_goes_below_zero() {
        let mut b = TokenBucket::full(1, 0);
        for _ in 0..5 {
            b.spend(1.0, 1, 0);
        }
        assert!(b.has_token(1.0, 1, 1_000), "one second refills one token from zero");
    }
}
