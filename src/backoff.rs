//! The one backoff computation: capped exponential delay with jitter, from [`BackendRetry`].

use std::time::Duration;

use rand::Rng;

use crate::config::BackendRetry;

/// Restart and reconnect delays derived from a [`BackendRetry`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backoff {
    base: u32,
    factor_ms: u32,
    steps: u32,
    jitter_percent: u32,
}

impl Backoff {
    /// Fills `None` fields with the defaults (base 2, 50 ms, 6 steps, 20 % jitter).
    pub fn from_retry(retry: &BackendRetry) -> Self {
        Self {
            base: retry.exponent_base.unwrap_or(2).max(1),
            // At least 1 ms: a zero factor would restart a failing listener in a busy loop.
            factor_ms: retry.factor.unwrap_or(50).max(1),
            steps: retry.number_of_retries.unwrap_or(6),
            jitter_percent: retry.jitter_percent.unwrap_or(20).min(100),
        }
    }

    /// The delay before the given attempt (0 = the first retry), without jitter.
    pub fn nominal(&self, attempt: u32) -> Duration {
        let growth = (self.base as u64).saturating_pow(attempt.min(self.steps));
        Duration::from_millis((self.factor_ms as u64).saturating_mul(growth).min(3_600_000))
    }

    /// The longest delay this policy ever waits, without jitter.
    pub fn cap(&self) -> Duration {
        self.nominal(self.steps)
    }

    /// The delay before the given attempt, with jitter of up to `jitter_percent` either way.
    pub fn delay(&self, attempt: u32) -> Duration {
        let nominal = self.nominal(attempt).as_millis() as u64;
        let spread = nominal * self.jitter_percent as u64 / 100;
        if spread == 0 {
            return Duration::from_millis(nominal);
        }
        let jittered = rand::rng().random_range(nominal - spread..=nominal + spread);
        Duration::from_millis(jittered)
    }
}

impl BackendRetry {
    /// The longest delay its backoff ever waits between two attempts (before jitter): the cap
    /// of a listener's restarts and of a filter's catch-up retries.
    pub fn max_delay(&self) -> Duration {
        Backoff::from_retry(self).cap()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_then_stop_at_the_cap() {
        let b = Backoff::from_retry(&BackendRetry::new(2, 10, 3, 0));
        let delays: Vec<u64> = (0..6).map(|a| b.delay(a).as_millis() as u64).collect();
        assert_eq!(delays, vec![10, 20, 40, 80, 80, 80]);
        assert_eq!(b.cap(), Duration::from_millis(80));
    }

    #[test]
    fn jitter_stays_within_its_percentage() {
        let b = Backoff::from_retry(&BackendRetry::new(2, 100, 0, 20));
        for _ in 0..200 {
            let d = b.delay(5).as_millis();
            assert!((80..=120).contains(&d), "{d}");
        }
    }

    #[test]
    fn a_zero_factor_still_waits_a_millisecond_and_grows() {
        let b = Backoff::from_retry(&BackendRetry::new(2, 0, 3, 0));
        assert_eq!(b.delay(0), Duration::from_millis(1));
        assert_eq!(b.cap(), Duration::from_millis(8));
    }

    #[test]
    fn huge_attempts_do_not_overflow() {
        let b = Backoff::from_retry(&BackendRetry::new(u32::MAX, u32::MAX, u32::MAX, 0));
        assert_eq!(b.delay(u32::MAX), Duration::from_secs(3600));
    }
}
