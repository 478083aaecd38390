//! Configuration of a completion tree, and the ranges its knobs are clamped to.

use std::time::Duration;

use super::ids::BackendId;
use crate::config::{
    BackendConfig, MAX_BATCH_SIZE, MAX_INTERVAL, MAX_SUBSCRIBER_BUFFER, MIN_INTERVAL, MIN_QUERY_INTERVAL,
};

/// Crash loops beyond `max_restarts` within `within` escalate to the parent.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RestartIntensity {
    /// Crashes tolerated in the window.
    pub max_restarts: u32,
    /// The window.
    pub within: Duration,
}

/// Configuration of a completion tree. Defaults: safety tick 1 s, held-back re-poll 20 ms,
/// 512 rows per read, 1024 events of subscriber buffer, no escalation, gauges every 5 s,
/// backends connected in the background (the tree starts while a backend is down).
///
/// Out-of-range values are clamped, never refused and never a panic: intervals to
/// [`MIN_INTERVAL`](SupervisorConfig::MIN_INTERVAL)`..=`[`MAX_INTERVAL`](SupervisorConfig::MAX_INTERVAL) (gauges from [`MIN_QUERY_INTERVAL`](SupervisorConfig::MIN_QUERY_INTERVAL)), rows per read to
/// `1..=`[`MAX_BATCH_SIZE`](SupervisorConfig::MAX_BATCH_SIZE), the subscriber buffer to `1..=`[`MAX_SUBSCRIBER_BUFFER`](SupervisorConfig::MAX_SUBSCRIBER_BUFFER). The
/// builders clamp as they set; the fields are public, so the tree clamps them again at spawn.
///
/// ```
/// use std::time::Duration;
/// use ff_completions::{BackendConfig, SupervisorConfig};
///
/// let config = SupervisorConfig::new()
///     .with_named_backend("orders", BackendConfig::from_url("postgres://app@db/orders")?)
///     .with_named_backend("cache", BackendConfig::from_url("valkey://cache:6379/0")?)
///     .with_subscriber_buffer(4096)
///     .with_restart_intensity(5, Duration::from_secs(60));
/// assert_eq!(config.backends.len(), 2);
/// # Ok::<(), ff_completions::Error>(())
/// ```
#[non_exhaustive]
#[derive(Clone, Debug)]
pub struct SupervisorConfig {
    /// Backends to listen to, by name.
    pub backends: Vec<(BackendId, BackendConfig)>,
    /// Read even without a wake-up this often.
    pub tick: Duration,
    /// How soon to read again when an open transaction holds rows back.
    pub held_back_repoll: Duration,
    /// Rows per read.
    pub batch_size: usize,
    /// Events buffered per channel subscriber before its filter starts catching up.
    pub subscriber_buffer: usize,
    /// When crash loops escalate; `None` never escalates.
    pub restart_intensity: Option<RestartIntensity>,
    /// How often backend health gauges are recorded.
    pub gauge_interval: Duration,
    /// Connect to every backend while spawning, and fail the spawn with the backend's own
    /// typed error (e.g. a transient [`crate::Error::Transport`]) when one cannot be
    /// reached. Default `false`: the tree starts at once, subscribers can subscribe, and each
    /// listener connects in the background (retrying with its backoff) until its backend is up.
    pub connect_at_start: bool,
    /// In-memory backends standing in for the configured ones, by name (the crate's own tests).
    #[cfg(test)]
    pub(crate) test_sources: TestSources,
}

/// In-memory backends by name, for the crate's own tests.
#[cfg(test)]
#[derive(Clone, Default)]
pub(crate) struct TestSources(pub Vec<(BackendId, std::sync::Arc<crate::backends::memory::MemorySource>)>);

#[cfg(test)]
impl std::fmt::Debug for TestSources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.0.iter().map(|(id, _)| id)).finish()
    }
}

impl Default for SupervisorConfig {
    fn default() -> Self {
        Self {
            backends: Vec::new(),
            tick: Duration::from_secs(1),
            held_back_repoll: Duration::from_millis(20),
            batch_size: 512,
            subscriber_buffer: 1024,
            restart_intensity: None,
            gauge_interval: Duration::from_secs(5),
            connect_at_start: false,
            #[cfg(test)]
            test_sources: TestSources::default(),
        }
    }
}

impl SupervisorConfig {
    /// The shortest interval (tick, re-poll) the tree accepts.
    pub const MIN_INTERVAL: Duration = MIN_INTERVAL;
    /// The longest interval the tree accepts.
    pub const MAX_INTERVAL: Duration = MAX_INTERVAL;
    /// The shortest interval of the periodic backend queries (gauges, retention).
    pub const MIN_QUERY_INTERVAL: Duration = MIN_QUERY_INTERVAL;
    /// The most rows per read.
    pub const MAX_BATCH_SIZE: usize = MAX_BATCH_SIZE;
    /// The largest subscriber buffer, in events.
    pub const MAX_SUBSCRIBER_BUFFER: usize = MAX_SUBSCRIBER_BUFFER;

    /// An empty configuration with the defaults.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a backend named after its kind (`postgres`, `valkey`, `sqlite`).
    #[must_use]
    pub fn with_backend(self, config: BackendConfig) -> Self {
        let name = config.kind().to_owned();
        self.with_named_backend(name, config)
    }

    /// Adds a backend under a name of your choice.
    #[must_use]
    pub fn with_named_backend(mut self, name: impl Into<BackendId>, config: BackendConfig) -> Self {
        self.backends.push((name.into(), config));
        self
    }

    /// Sets the safety tick, clamped to [`MIN_INTERVAL`](SupervisorConfig::MIN_INTERVAL)`..=`[`MAX_INTERVAL`](SupervisorConfig::MAX_INTERVAL)
    /// (`Duration::ZERO` becomes 1 ms).
    #[must_use]
    pub fn with_tick(mut self, tick: Duration) -> Self {
        self.tick = tick.clamp(MIN_INTERVAL, MAX_INTERVAL);
        self
    }

    /// Sets how soon to read again while an open transaction holds rows back, clamped to
    /// [`MIN_INTERVAL`](SupervisorConfig::MIN_INTERVAL)`..=`[`MAX_INTERVAL`](SupervisorConfig::MAX_INTERVAL).
    #[must_use]
    pub fn with_held_back_repoll(mut self, every: Duration) -> Self {
        self.held_back_repoll = every.clamp(MIN_INTERVAL, MAX_INTERVAL);
        self
    }

    /// Sets the subscriber buffer, clamped to `1..=`[`MAX_SUBSCRIBER_BUFFER`](SupervisorConfig::MAX_SUBSCRIBER_BUFFER).
    #[must_use]
    pub fn with_subscriber_buffer(mut self, events: usize) -> Self {
        self.subscriber_buffer = events.clamp(1, MAX_SUBSCRIBER_BUFFER);
        self
    }

    /// Sets rows per read, clamped to `1..=`[`MAX_BATCH_SIZE`](SupervisorConfig::MAX_BATCH_SIZE).
    #[must_use]
    pub fn with_batch_size(mut self, rows: usize) -> Self {
        self.batch_size = rows.clamp(1, MAX_BATCH_SIZE);
        self
    }

    /// Sets how often backend health gauges are recorded, clamped to
    /// [`MIN_QUERY_INTERVAL`](SupervisorConfig::MIN_QUERY_INTERVAL)`..=`[`MAX_INTERVAL`](SupervisorConfig::MAX_INTERVAL).
    #[must_use]
    pub fn with_gauge_interval(mut self, every: Duration) -> Self {
        self.gauge_interval = every.clamp(MIN_QUERY_INTERVAL, MAX_INTERVAL);
        self
    }

    /// Connect to every backend while spawning and fail fast with its typed error (see
    /// [`Self::connect_at_start`]).
    #[must_use]
    pub fn with_connect_at_start(mut self, connect: bool) -> Self {
        self.connect_at_start = connect;
        self
    }

    /// Sets the restart intensity.
    #[must_use]
    pub fn with_restart_intensity(mut self, max_restarts: u32, within: Duration) -> Self {
        self.restart_intensity = Some(RestartIntensity { max_restarts, within });
        self
    }

    /// The same configuration with every knob in its range (fields may have been set directly).
    #[must_use]
    pub(crate) fn clamped(self) -> Self {
        let (tick, repoll, gauges) = (self.tick, self.held_back_repoll, self.gauge_interval);
        let (rows, buffer) = (self.batch_size, self.subscriber_buffer);
        self.with_tick(tick)
            .with_held_back_repoll(repoll)
            .with_gauge_interval(gauges)
            .with_batch_size(rows)
            .with_subscriber_buffer(buffer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_and_huge_knobs_are_clamped_by_the_builders() {
        let c = SupervisorConfig::new()
            .with_tick(Duration::ZERO)
            .with_held_back_repoll(Duration::ZERO)
            .with_gauge_interval(Duration::ZERO)
            .with_batch_size(0)
            .with_subscriber_buffer(0);
        assert_eq!((c.tick, c.held_back_repoll, c.gauge_interval), (MIN_INTERVAL, MIN_INTERVAL, MIN_QUERY_INTERVAL));
        assert_eq!((c.batch_size, c.subscriber_buffer), (1, 1));
        let c = SupervisorConfig::new()
            .with_tick(Duration::MAX)
            .with_held_back_repoll(Duration::MAX)
            .with_gauge_interval(Duration::MAX)
            .with_batch_size(usize::MAX)
            .with_subscriber_buffer(usize::MAX);
        assert_eq!((c.tick, c.held_back_repoll, c.gauge_interval), (MAX_INTERVAL, MAX_INTERVAL, MAX_INTERVAL));
        assert_eq!((c.batch_size, c.subscriber_buffer), (MAX_BATCH_SIZE, MAX_SUBSCRIBER_BUFFER));
    }

    #[test]
    fn fields_set_directly_are_clamped_at_spawn_and_sane_values_kept() {
        let mut c = SupervisorConfig::new();
        (c.tick, c.held_back_repoll, c.gauge_interval) = (Duration::ZERO, Duration::ZERO, Duration::ZERO);
        (c.batch_size, c.subscriber_buffer) = (0, 0);
        let c = c.clamped();
        assert_eq!((c.tick, c.held_back_repoll, c.gauge_interval), (MIN_INTERVAL, MIN_INTERVAL, MIN_QUERY_INTERVAL));
        assert_eq!((c.batch_size, c.subscriber_buffer), (1, 1));
        let d = SupervisorConfig::new();
        let kept = d.clone().clamped();
        assert_eq!(
            (kept.tick, kept.held_back_repoll, kept.gauge_interval),
            (d.tick, d.held_back_repoll, d.gauge_interval)
        );
        assert_eq!((kept.batch_size, kept.subscriber_buffer), (d.batch_size, d.subscriber_buffer));
    }
}
