//! When the agent acts: the renewal point of a certificate (half-life with
//! jitter) and exponential back-off with jitter; the time itself comes
//! from the `clock`. Depends on nothing in the crate.

use std::time::Duration;

use ring::rand::{SecureRandom, SystemRandom};

/// The server backdates NotBefore by this much for clock skew; lifetimes
/// for renewal are counted from issuance, not from the backdated NotBefore.
pub const BACKDATE_SECS: i64 = 10;

/// A uniformly random factor in `[1 - spread, 1 + spread]`.
pub fn jitter(spread: f64) -> f64 {
    let mut bytes = [0u8; 4];
    // Without randomness, no jitter: renewal still happens on time.
    if SystemRandom::new().fill(&mut bytes).is_err() {
        return 1.0;
    }
    let unit = f64::from(u32::from_be_bytes(bytes)) / f64::from(u32::MAX);
    1.0 - spread + 2.0 * spread * unit
}

/// When to renew a certificate valid from `not_before` to `not_after`:
/// half its lifetime, ± 10 %.
pub fn renew_point(not_before: i64, not_after: i64) -> i64 {
    let not_before = not_before.min(not_after - 1);
    let lifetime = (not_after - not_before).max(1) as f64;
    (not_before + (lifetime * 0.5 * jitter(0.1)).round() as i64).min(not_after - 1)
}

/// Exponential backoff with jitter.
#[derive(Debug)]
pub struct Backoff {
    next: Duration,
    min: Duration,
    max: Duration,
}

impl Backoff {
    /// Starts at `min`, doubles to `max`.
    pub fn new(min: Duration, max: Duration) -> Self {
        Self { next: min, min, max }
    }

    /// The next wait.
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.next.mul_f64(jitter(0.2));
        self.next = (self.next * 2).min(self.max);
        delay
    }

    /// Back to `min` after a success.
    pub fn reset(&mut self) {
        self.next = self.min;
    }
}
