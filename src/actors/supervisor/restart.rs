//! The restart policy of one child (a listener or a filter): pure logic, no actor, no clock of
//! its own (the caller passes `now`).
//!
//! - A child that had become live (a listener connected, a filter delivering) and then exits
//!   restarts at once: its life was healthy, so nothing says waiting would help.
//! - A child that exits before becoming live again waits a delay that grows over consecutive
//!   such failures (capped, with jitter, from the backend's [`crate::BackendRetry`]); the count
//!   resets the next time it is live.
//! - Crashes (panics and errors that are not connection trouble) are counted in a sliding
//!   window; more than the configured intensity escalates to the supervisor's parent.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::actors::supervisor_config::RestartIntensity;
use crate::backoff::Backoff;

/// What to do with a child that exited.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Start it again after this delay (zero: at once).
    Restart(Duration),
    /// Too many crashes within the window: fail the supervisor with this reason.
    Escalate(String),
}

/// How a child's exit is judged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Exit {
    /// The child became live since it was last started.
    pub was_live: bool,
    /// The exit was a crash (a panic or an error that is not connection trouble).
    pub crash: bool,
}

/// One child's restart bookkeeping.
#[derive(Debug)]
pub(crate) struct RestartPolicy {
    backoff: Backoff,
    intensity: Option<RestartIntensity>,
    /// Consecutive exits without becoming live.
    failures: u32,
    crashes: VecDeque<Instant>,
}

impl RestartPolicy {
    pub(crate) fn new(backoff: Backoff, intensity: Option<RestartIntensity>) -> Self {
        Self { backoff, intensity, failures: 0, crashes: VecDeque::new() }
    }

    /// Consecutive exits without becoming live (the next backoff attempt).
    pub(crate) fn failures(&self) -> u32 {
        self.failures
    }

    /// Judges one exit at `now`.
    pub(crate) fn on_exit(&mut self, exit: Exit, now: Instant) -> Verdict {
        if exit.crash
            && let Some(limit) = self.intensity
        {
            self.crashes.push_back(now);
            while self.crashes.front().is_some_and(|t| now.saturating_duration_since(*t) > limit.within) {
                self.crashes.pop_front();
            }
            if self.crashes.len() > limit.max_restarts as usize {
                return Verdict::Escalate(format!("crashed {} times within {:?}", self.crashes.len(), limit.within));
            }
        }
        if exit.was_live {
            self.failures = 0;
            return Verdict::Restart(Duration::ZERO);
        }
        let delay = self.backoff.delay(self.failures);
        self.failures = self.failures.saturating_add(1);
        Verdict::Restart(delay)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::BackendRetry;

    const HEALTHY: Exit = Exit { was_live: true, crash: false };
    const NEVER_LIVE: Exit = Exit { was_live: false, crash: false };

    fn policy(intensity: Option<RestartIntensity>) -> RestartPolicy {
        // 10 ms doubling, capped after 3 steps at 80 ms, no jitter.
        RestartPolicy::new(Backoff::from_retry(&BackendRetry::new(2, 10, 3, 0)), intensity)
    }

    fn delay(v: Verdict) -> u64 {
        match v {
            Verdict::Restart(d) => d.as_millis() as u64,
            Verdict::Escalate(why) => panic!("escalated: {why}"),
        }
    }

    #[test]
    fn a_child_killed_after_a_healthy_life_restarts_at_once_every_time() {
        let mut p = policy(None);
        let now = Instant::now();
        let delays: Vec<u64> = (0..20).map(|_| delay(p.on_exit(HEALTHY, now))).collect();
        assert_eq!(delays, vec![0; 20]);
        assert_eq!(p.failures(), 0);
    }

    #[test]
    fn failures_to_become_live_back_off_up_to_the_cap() {
        let mut p = policy(None);
        let now = Instant::now();
        let delays: Vec<u64> = (0..6).map(|_| delay(p.on_exit(NEVER_LIVE, now))).collect();
        assert_eq!(delays, vec![10, 20, 40, 80, 80, 80]);
    }

    #[test]
    fn becoming_live_resets_the_backoff() {
        let mut p = policy(None);
        let now = Instant::now();
        for _ in 0..4 {
            p.on_exit(NEVER_LIVE, now);
        }
        assert_eq!(delay(p.on_exit(HEALTHY, now)), 0);
        assert_eq!(delay(p.on_exit(NEVER_LIVE, now)), 10, "the next outage starts from the first step");
    }

    #[test]
    fn jittered_delays_stay_within_the_cap_and_its_jitter() {
        let mut p = RestartPolicy::new(Backoff::from_retry(&BackendRetry::new(2, 100, 2, 20)), None);
        let now = Instant::now();
        for _ in 0..50 {
            let d = delay(p.on_exit(NEVER_LIVE, now));
            assert!((80..=480).contains(&d), "{d}");
        }
    }

    #[test]
    fn crashes_beyond_the_intensity_escalate_even_after_a_healthy_life() {
        let limit = RestartIntensity { max_restarts: 3, within: Duration::from_secs(10) };
        let mut p = policy(Some(limit));
        let now = Instant::now();
        let crash = Exit { was_live: true, crash: true };
        for _ in 0..3 {
            assert_eq!(p.on_exit(crash, now), Verdict::Restart(Duration::ZERO));
        }
        assert!(matches!(p.on_exit(crash, now), Verdict::Escalate(_)));
    }

    #[test]
    fn crashes_outside_the_window_are_forgotten() {
        let limit = RestartIntensity { max_restarts: 1, within: Duration::from_secs(1) };
        let mut p = policy(Some(limit));
        let start = Instant::now();
        let crash = Exit { was_live: false, crash: true };
        for i in 0..10 {
            let at = start + Duration::from_secs(2 * i);
            assert!(matches!(p.on_exit(crash, at), Verdict::Restart(_)), "crash {i} is alone in its window");
        }
    }

    #[test]
    fn connection_trouble_never_escalates() {
        let limit = RestartIntensity { max_restarts: 0, within: Duration::from_secs(60) };
        let mut p = policy(Some(limit));
        let now = Instant::now();
        for _ in 0..100 {
            assert!(matches!(p.on_exit(NEVER_LIVE, now), Verdict::Restart(_)));
        }
    }
}
