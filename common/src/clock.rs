//! Time, injected so that tests can move it instead of sleeping: every
//! decision about validity, expiry, renewal and rate limits reads the
//! [`Clock`] it was given, never the system time directly.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;

/// A future that ends when the clock reaches a time (it borrows nothing,
/// so it can be spawned or kept).
pub type Sleep = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// A source of the current time.
pub trait Clock: Send + Sync + fmt::Debug + 'static {
    /// Milliseconds since the Unix epoch.
    fn now_ms(&self) -> i64;

    /// Seconds since the Unix epoch.
    fn now(&self) -> i64 {
        self.now_ms().div_euclid(1000)
    }

    /// Ends once the clock reads `unix_ms` or later.
    fn sleep_until(&self, unix_ms: i64) -> Sleep;

    /// Ends once `duration` has passed on this clock.
    fn sleep(&self, duration: Duration) -> Sleep {
        let ms = i64::try_from(duration.as_millis()).unwrap_or(i64::MAX);
        self.sleep_until(self.now_ms().saturating_add(ms))
    }
}

/// The system's wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
            .unwrap_or(0)
    }

    fn sleep_until(&self, unix_ms: i64) -> Sleep {
        let wait = unix_ms.saturating_sub(self.now_ms()).max(0);
        Box::pin(tokio::time::sleep(Duration::from_millis(wait.unsigned_abs())))
    }
}

/// A clock that only moves when told to; for tests. Sleepers wake when
/// [`ManualClock::advance`] moves it past their time.
#[derive(Debug, Clone)]
pub struct ManualClock {
    now_ms: Arc<watch::Sender<i64>>,
}

impl ManualClock {
    /// A clock reading the system time now, then frozen.
    pub fn starting_now() -> Self {
        Self::at_ms(SystemClock.now_ms())
    }

    /// A clock frozen at `unix_ms`.
    pub fn at_ms(unix_ms: i64) -> Self {
        Self { now_ms: Arc::new(watch::channel(unix_ms).0) }
    }

    /// Moves the clock forward by `secs` seconds.
    pub fn advance(&self, secs: i64) {
        self.advance_ms(secs.saturating_mul(1000));
    }

    /// Moves the clock forward by `ms` milliseconds.
    pub fn advance_ms(&self, ms: i64) {
        self.now_ms.send_modify(|now| *now = now.saturating_add(ms));
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> i64 {
        *self.now_ms.borrow()
    }

    fn sleep_until(&self, unix_ms: i64) -> Sleep {
        let mut moved = self.now_ms.subscribe();
        Box::pin(async move {
            // The sender lives as long as `self`: `wait_for` ends only when
            // the time is reached.
            let _ = moved.wait_for(|now| *now >= unix_ms).await;
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_manual_sleeper_wakes_only_when_the_clock_passes_its_time() {
        let clock = ManualClock::at_ms(1_000);
        let sleeper = clock.clone();
        let woke = tokio::spawn(async move { sleeper.sleep_until(3_000).await });
        clock.advance_ms(1_500);
        tokio::task::yield_now().await;
        assert!(!woke.is_finished(), "woke before its time");
        clock.advance(1);
        tokio::time::timeout(Duration::from_secs(5), woke)
            .await
            .expect("the sleeper wakes once the time is reached")
            .expect("sleeper task");
        assert_eq!(clock.now(), 3);
    }

    #[test]
    fn seconds_round_down_from_milliseconds() {
        assert_eq!(ManualClock::at_ms(-1).now(), -1);
        assert_eq!(ManualClock::at_ms(1_999).now(), 1);
    }
}
