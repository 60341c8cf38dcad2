//! The tenant's request rate limit, shared by every division: at most `rate` requests in
//! any sliding window of one second (for a rate below 1, one request per `1 / rate`), so
//! the org's API allowance is spent at the pace the operator chose.
//!
//! The window is counted on the connector's side, at the moment a request is let go; it
//! is 25 ms longer than a second so that scheduling and network jitter cannot make
//! Salesforce see one request too many in a second.

use std::collections::VecDeque;
use std::time::Duration;
use tokio::sync::Mutex;
use tokio::time::Instant;

const JITTER_MARGIN: Duration = Duration::from_millis(25);

#[derive(Debug)]
pub struct RateLimiter {
    /// `None`: no limit.
    limit: Option<(usize, Duration)>,
    sent: Mutex<VecDeque<Instant>>,
}

impl RateLimiter {
    /// `per_second` of 0 means no limit.
    pub fn new(per_second: f64) -> RateLimiter {
        let limit = if per_second <= 0.0 {
            None
        } else if per_second >= 1.0 {
            Some((per_second.floor() as usize, Duration::from_secs(1) + JITTER_MARGIN))
        } else {
            Some((1, Duration::from_secs_f64(1.0 / per_second) + JITTER_MARGIN))
        };
        RateLimiter {
            limit,
            sent: Mutex::new(VecDeque::new()),
        }
    }

    /// Waits until one more request fits in the window, and counts it. Cancelling a
    /// waiting caller takes nothing from anyone.
    pub async fn acquire(&self) {
        let Some((max, window)) = self.limit else { return };
        loop {
            let wait_until = {
                let mut sent = self.sent.lock().await;
                let now = Instant::now();
                while sent.front().is_some_and(|t| now.duration_since(*t) >= window) {
                    sent.pop_front();
                }
                if sent.len() < max {
                    sent.push_back(now);
                    return;
                }
                // Full: the oldest leaves the window first.
                sent.front().map_or(now, |t| *t + window)
            };
            tokio::time::sleep_until(wait_until).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn at_most_rate_per_window() {
        let l = RateLimiter::new(5.0);
        let start = Instant::now();
        for _ in 0..5 {
            l.acquire().await;
        }
        assert!(
            Instant::now() - start < Duration::from_millis(50),
            "the first five go at once"
        );
        l.acquire().await;
        let took = Instant::now() - start;
        assert!(
            took >= Duration::from_secs(1) && took < Duration::from_millis(1500),
            "the sixth waits for the window: {took:?}"
        );
        let free = RateLimiter::new(0.0);
        let t = Instant::now();
        for _ in 0..1000 {
            free.acquire().await;
        }
        assert!(Instant::now() - t < Duration::from_millis(50));
    }
}
