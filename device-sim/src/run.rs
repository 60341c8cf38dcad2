//! What every output shares: when to stop (count, duration, Ctrl-C) and when each device's
//! next reading is due.

use crate::model::Fleet;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::{Duration, Instant};

/// How much to send, and how fast.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plan {
    /// Readings per second, the whole fleet together: `None` keeps the devices' own
    /// intervals, `Some(0.0)` sends as fast as the output takes them (load mode).
    pub rate: Option<f64>,
    /// Stop after this many readings.
    pub count: Option<u64>,
    /// Stop after this long.
    pub duration: Option<Duration>,
}

impl Plan {
    pub fn done(&self, sent: u64, elapsed: Duration) -> bool {
        self.count.is_some_and(|c| sent >= c) || self.duration.is_some_and(|d| elapsed >= d)
    }

    /// Readings still allowed (for cutting the last tick short).
    pub fn room(&self, sent: u64) -> usize {
        self.count.map_or(usize::MAX, |c| c.saturating_sub(sent) as usize)
    }

    /// Applies the rate to the fleet; returns whether sending is paced.
    pub fn apply(&self, fleet: &mut Fleet) -> bool {
        match self.rate {
            Some(r) if r > 0.0 => {
                fleet.set_rate(r);
                true
            }
            Some(_) => false,
            None => true,
        }
    }
}

/// Which device is due next: each device's k-th tick is due at start + offset + k × interval,
/// offsets spreading the devices over one interval. Unpaced, devices take turns.
pub struct Schedule {
    heap: BinaryHeap<Reverse<(Instant, usize, u64)>>,
    offsets: Vec<Duration>,
    intervals: Vec<Duration>,
    start: Instant,
    paced: bool,
    turn: usize,
}

impl Schedule {
    pub fn new(fleet: &Fleet, paced: bool, start: Instant) -> Schedule {
        let n = fleet.len();
        let intervals: Vec<Duration> = (0..n).map(|i| fleet.interval(i)).collect();
        let offsets: Vec<Duration> = (0..n)
            .map(|i| intervals[i].mul_f64(i as f64 / n.max(1) as f64))
            .collect();
        let heap = (0..n).map(|i| Reverse((start + offsets[i], i, 0))).collect();
        Schedule {
            heap,
            offsets,
            intervals,
            start,
            paced,
            turn: 0,
        }
    }

    /// When the next tick is due (now, unpaced).
    pub fn next_due(&self) -> Option<Instant> {
        if !self.paced {
            return Some(Instant::now());
        }
        self.heap.peek().map(|Reverse((t, _, _))| *t)
    }

    /// A device whose tick is due at `now`, if any.
    pub fn pop_due(&mut self, now: Instant) -> Option<usize> {
        if !self.paced {
            if self.intervals.is_empty() {
                return None;
            }
            let i = self.turn % self.intervals.len();
            self.turn += 1;
            return Some(i);
        }
        let Reverse((due, i, k)) = *self.heap.peek()?;
        if due > now {
            return None;
        }
        self.heap.pop();
        let next = self.start + self.offsets[i] + self.intervals[i].mul_f64((k + 1) as f64);
        self.heap.push(Reverse((next, i, k + 1)));
        Some(i)
    }
}
