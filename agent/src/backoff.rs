//! Capped exponential backoff with jitter for every reconnect loop (MQTT, AMQP, serial).
//!
//! The schedule comes from `backon`; this wrapper adds the two things each loop needs: an
//! endless sequence (gateways retry forever, operators watch the metrics) and a reset once
//! a connection has worked again.

use backon::{BackoffBuilder, ExponentialBuilder};
use std::time::Duration;

#[derive(Debug)]
pub struct Backoff {
    builder: ExponentialBuilder,
    current: backon::ExponentialBackoff,
    max: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Backoff {
        let builder = ExponentialBuilder::default()
            .with_min_delay(min)
            .with_max_delay(max)
            .with_factor(2.0)
            .with_jitter()
            .without_max_times();
        Backoff {
            current: builder.build(),
            builder,
            max,
        }
    }

    /// The next delay: doubling from `min`, capped at `max`, with jitter.
    pub fn next_delay(&mut self) -> Duration {
        // Jitter adds up to one more delay; keep the cap a cap.
        self.current.next().unwrap_or(self.max).min(self.max)
    }

    /// Call after a success: the next failure starts from `min` again.
    pub fn reset(&mut self) {
        self.current = self.builder.build();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_to_the_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(10), Duration::from_millis(100));
        let delays: Vec<Duration> = (0..10).map(|_| b.next_delay()).collect();
        assert!(
            delays[0] >= Duration::from_millis(10) && delays[0] <= Duration::from_millis(20),
            "{delays:?}"
        );
        assert!(delays.iter().all(|d| *d <= Duration::from_millis(100)), "{delays:?}");
        assert!(delays[9] >= Duration::from_millis(50), "{delays:?}");
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(20));
    }
}
