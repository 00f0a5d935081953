//! Time, injected. The agent's decisions that depend on the time read it
//! from a [`Clock`]: when to renew its own SVID and the workloads' (at
//! half-life), when an SVID has expired, what a workload is served, how
//! long to back off. Tests move a manual clock instead of waiting. Short
//! timeouts of a single call or stream (first response, connect, waiting
//! for a renewal's answer) and pacing (event pushes, fsyncs) stay on
//! tokio's timer. Depends on nothing in the crate.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A wait on a [`Clock`].
pub type Sleep = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// A source of the time, and waits measured by it.
pub trait Clock: Send + Sync + fmt::Debug + 'static {
    /// Seconds since the Unix epoch.
    fn now_unix(&self) -> i64;

    /// Resolves once the clock reads `unix` (Unix seconds) or later.
    fn sleep_until(&self, unix: i64) -> Sleep;

    /// Resolves after `duration` on this clock.
    fn sleep(&self, duration: Duration) -> Sleep;
}

/// The system's wall clock, waits on tokio's timer.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_unix(&self) -> i64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
            .unwrap_or(0)
    }

    fn sleep_until(&self, unix: i64) -> Sleep {
        let wait = u64::try_from(unix - self.now_unix()).unwrap_or(0);
        self.sleep(Duration::from_secs(wait))
    }

    fn sleep(&self, duration: Duration) -> Sleep {
        Box::pin(tokio::time::sleep(duration))
    }
}

#[cfg(test)]
pub use manual::ManualClock;

#[cfg(test)]
mod manual {
    use super::*;
    use tokio::sync::watch;

    /// A clock that moves only when told to ([`ManualClock::advance`]);
    /// its waits end when it has moved far enough.
    #[derive(Debug, Clone)]
    pub struct ManualClock {
        /// Unix milliseconds.
        now_ms: watch::Sender<i64>,
    }

    impl ManualClock {
        /// A clock reading `unix` seconds.
        pub fn at(unix: i64) -> Self {
            Self { now_ms: watch::Sender::new(unix * 1000) }
        }

        /// Moves the clock forward by `by`.
        pub fn advance(&self, by: Duration) {
            let by = i64::try_from(by.as_millis()).unwrap_or(i64::MAX);
            self.now_ms.send_modify(|now| *now = now.saturating_add(by));
        }

        fn until_ms(&self, deadline: i64) -> Sleep {
            let mut now = self.now_ms.subscribe();
            Box::pin(async move {
                let _ = now.wait_for(|now| *now >= deadline).await;
            })
        }
    }

    impl Clock for ManualClock {
        fn now_unix(&self) -> i64 {
            self.now_ms.borrow().div_euclid(1000)
        }

        fn sleep_until(&self, unix: i64) -> Sleep {
            self.until_ms(unix.saturating_mul(1000))
        }

        fn sleep(&self, duration: Duration) -> Sleep {
            let by = i64::try_from(duration.as_millis()).unwrap_or(i64::MAX);
            self.until_ms(self.now_ms.borrow().saturating_add(by))
        }
    }

    #[tokio::test]
    async fn a_manual_clock_ends_its_waits_when_moved_far_enough() {
        let clock = ManualClock::at(1_000);
        let (until, after) = (clock.sleep_until(1_010), clock.sleep(Duration::from_millis(2_500)));
        let (until, after) = (tokio::spawn(until), tokio::spawn(after));
        clock.advance(Duration::from_secs(2));
        tokio::task::yield_now().await;
        assert!(!after.is_finished() && !until.is_finished());
        clock.advance(Duration::from_millis(500));
        tokio::time::timeout(Duration::from_secs(1), after).await.unwrap().unwrap();
        assert_eq!(clock.now_unix(), 1_002);
        assert!(!until.is_finished());
        clock.advance(Duration::from_secs(8));
        tokio::time::timeout(Duration::from_secs(1), until).await.unwrap().unwrap();
    }
}
