//! The tenant's request rate limit, shared by every division: requests are spaced at
//! least `1 / rate` apart, so no second ever holds more than `rate` of them and the org's
//! API allowance is spent at the pace the operator chose.

use std::time::Duration;
use tokio::sync::Mutex;
use tokio::time::Instant;

#[derive(Debug)]
pub struct RateLimiter {
    interval: Option<Duration>,
    next: Mutex<Instant>,
}

impl RateLimiter {
    /// `per_second` of 0 means no limit.
    pub fn new(per_second: f64) -> RateLimiter {
        RateLimiter {
            interval: (per_second > 0.0).then(|| Duration::from_secs_f64(1.0 / per_second)),
            next: Mutex::new(Instant::now()),
        }
    }

    /// Waits for this request's slot. Cancel-safe in effect: a slot reserved by a
    /// cancelled caller is only a gap in the schedule.
    pub async fn acquire(&self) {
        let Some(interval) = self.interval else { return };
        let slot = {
            let mut next = self.next.lock().await;
            let now = Instant::now();
            let slot = (*next).max(now);
            *next = slot + interval;
            slot
        };
        tokio::time::sleep_until(slot).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn spaces_requests() {
        let l = RateLimiter::new(50.0);
        let start = Instant::now();
        for _ in 0..11 {
            l.acquire().await;
        }
        // Eleven slots 20 ms apart: the last at 200 ms.
        let took = Instant::now() - start;
        assert!(
            took >= Duration::from_millis(195) && took < Duration::from_millis(600),
            "{took:?}"
        );
        let free = RateLimiter::new(0.0);
        let t = Instant::now();
        for _ in 0..1000 {
            free.acquire().await;
        }
        assert!(Instant::now() - t < Duration::from_millis(50));
    }
}
