//! Committed rows handed from the buffer's writer to the publisher in memory.
//!
//! Why: the writer has every row it just committed in hand, and the publisher wants exactly
//! those rows next. Reading them back from SQLite cost the publisher a query, a copy of
//! every column and a blocking section per chunk: 5 % of the agent's CPU in a profile under
//! load, and at 1,000 readings/s the agent used about a quarter less CPU without it (see
//! the README's Performance section). So after each commit the writer moves the rows here, and
//! [`Buffer::load_after`](super::Buffer::load_after) serves them from here when it can.
//! SQLite stays the truth: whatever this does not hold is read from the database, and the
//! rows are still deleted only by a release after the broker's confirm.
//!
//! What it holds: every committed, unpublished row with an id above `base`, in id order,
//! as long as `complete` is true. It is bounded (rows and bytes); when full it stops taking
//! rows (`complete` false) and the reader goes to the database once it has taken the rows
//! held, until the writer starts afresh on an empty hand-over.
//!
//! A reader that asks again from an earlier id (the publisher reconnected and starts from
//! the oldest pending row) may already have published, and released, rows still held here;
//! so a step back empties the hand-over, and rows committed from then on are handed over.

use super::StoredRecord;
use std::collections::VecDeque;

/// Rows and bytes held at most: enough for the publisher's window (`amqp.max_in_flight`,
/// 2,048 by default) to refill from memory, small beside the agent's memory goal.
pub const MAX_ROWS: usize = 4096;
pub const MAX_BYTES: usize = 1024 * 1024;

pub struct Handover {
    rows: VecDeque<StoredRecord>,
    /// Every committed, unpublished row with an id above this is in `rows` (if `complete`).
    base: i64,
    /// Highest id committed so far.
    high: i64,
    /// False once a row was left out for lack of room.
    complete: bool,
    /// Highest id the reader has been given (from here or from the database).
    served: i64,
    bytes: usize,
    max_rows: usize,
    max_bytes: usize,
}

impl Handover {
    /// `last_id`: the highest id in the database at start; those rows are read from it.
    pub fn new(last_id: i64, max_rows: usize, max_bytes: usize) -> Handover {
        Handover {
            rows: VecDeque::new(),
            base: last_id,
            high: last_id,
            complete: true,
            served: 0,
            bytes: 0,
            max_rows,
            max_bytes,
        }
    }

    /// The writer, after a commit: the rows it stored, in id order. `deleted_others`: the
    /// transaction also deleted unpublished rows (drop-oldest), which may be held here.
    pub fn committed(&mut self, rows: impl IntoIterator<Item = StoredRecord>, deleted_others: bool) {
        if deleted_others {
            self.forget();
        }
        for row in rows {
            let id = row.id;
            if !self.complete && self.rows.is_empty() {
                // The reader has taken all it could from here: start again from this row.
                self.forget();
            }
            if self.complete {
                let size = cost(&row);
                if self.rows.len() < self.max_rows && self.bytes + size <= self.max_bytes {
                    self.bytes += size;
                    self.rows.push_back(row);
                } else {
                    self.complete = false;
                }
            }
            self.high = self.high.max(id);
        }
    }

    /// Rows up to id `up_to` were committed by someone else (`edgecase buffer replay`):
    /// they are only in the database, so the reader goes there for everything up to them.
    pub fn rows_added_elsewhere(&mut self, up_to: i64) {
        self.high = self.high.max(up_to);
        self.forget();
    }

    /// Up to `limit` unpublished rows with an id above `after`, oldest first; `None` when
    /// the database must answer.
    pub fn take(&mut self, after: i64, limit: usize) -> Option<Vec<StoredRecord>> {
        if after < self.served {
            self.forget();
        }
        self.served = after;
        if after < self.base {
            return None;
        }
        while self.rows.front().is_some_and(|r| r.id <= after) {
            self.pop();
        }
        self.base = self.base.max(after);
        if self.rows.is_empty() && !self.complete {
            return None;
        }
        let n = limit.min(self.rows.len());
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            if let Some(row) = self.pop() {
                out.push(row);
            }
        }
        if let Some(last) = out.last() {
            self.base = last.id;
            self.served = last.id;
        }
        Some(out)
    }

    /// The reader was given rows up to `last` from the database.
    pub fn served_from_database(&mut self, last: i64) {
        self.served = self.served.max(last);
    }

    /// Rows held now.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    fn pop(&mut self) -> Option<StoredRecord> {
        let row = self.rows.pop_front()?;
        self.bytes = self.bytes.saturating_sub(cost(&row));
        Some(row)
    }

    /// Holds nothing, and everything committed so far is read from the database.
    fn forget(&mut self) {
        self.rows.clear();
        self.bytes = 0;
        self.base = self.high;
        self.complete = true;
    }
}

/// Memory a held row costs, roughly.
fn cost(r: &StoredRecord) -> usize {
    std::mem::size_of::<StoredRecord>()
        + r.payload.len()
        + r.message_id.len()
        + r.exchange.len()
        + r.routing_key.len()
        + r.device_id.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: i64) -> StoredRecord {
        StoredRecord {
            id,
            message_id: format!("m{id}"),
            exchange: "x".into(),
            routing_key: "r".into(),
            device_id: "d".into(),
            payload: vec![b'p'; 100],
            created_ms: 0,
        }
    }

    fn rows(ids: std::ops::RangeInclusive<i64>) -> Vec<StoredRecord> {
        ids.map(row).collect()
    }

    fn ids(rows: Option<Vec<StoredRecord>>) -> Option<Vec<i64>> {
        rows.map(|r| r.into_iter().map(|r| r.id).collect())
    }

    #[test]
    fn rows_from_before_the_start_come_from_the_database() {
        let mut h = Handover::new(10, 100, 1 << 20);
        h.committed(rows(11..=12), false);
        assert_eq!(ids(h.take(0, 50)), None);
        h.served_from_database(10);
        assert_eq!(ids(h.take(10, 50)), Some(vec![11, 12]));
        assert_eq!(ids(h.take(12, 50)), Some(vec![]));
    }

    #[test]
    fn rows_added_elsewhere_are_read_from_the_database_first() {
        let mut h = Handover::new(0, 100, 1 << 20);
        h.committed(rows(1..=2), false);
        assert_eq!(ids(h.take(0, 50)), Some(vec![1, 2]));
        // Rows 3-4 were inserted by another process; the writer then stores 5.
        h.rows_added_elsewhere(4);
        h.committed(rows(5..=5), false);
        assert_eq!(ids(h.take(2, 50)), None, "3 and 4 are only in the database");
        h.served_from_database(5);
        assert_eq!(ids(h.take(5, 50)), Some(vec![]));
        h.committed(rows(6..=6), false);
        assert_eq!(ids(h.take(5, 50)), Some(vec![6]));
    }

    #[test]
    fn takes_in_order_and_within_the_limit() {
        let mut h = Handover::new(0, 100, 1 << 20);
        h.committed(rows(1..=5), false);
        assert_eq!(ids(h.take(0, 2)), Some(vec![1, 2]));
        assert_eq!(ids(h.take(2, 10)), Some(vec![3, 4, 5]));
        h.committed(rows(6..=6), false);
        assert_eq!(ids(h.take(5, 10)), Some(vec![6]));
        assert_eq!(h.len(), 0);
    }

    #[test]
    fn when_full_the_rest_is_read_from_the_database_then_handing_over_resumes() {
        let mut h = Handover::new(0, 3, 1 << 20);
        h.committed(rows(1..=5), false);
        assert_eq!(h.len(), 3);
        assert_eq!(ids(h.take(0, 10)), Some(vec![1, 2, 3]));
        // 4 and 5 were left out: the database answers, while the writer goes on.
        assert_eq!(ids(h.take(3, 10)), None);
        h.committed(rows(6..=7), false);
        assert_eq!(ids(h.take(3, 10)), None);
        h.served_from_database(5);
        // 6 and 7 came after the hand-over started again from 5.
        assert_eq!(ids(h.take(5, 10)), Some(vec![6, 7]));
    }

    #[test]
    fn the_byte_cap_applies_too() {
        let one = cost(&row(1));
        let mut h = Handover::new(0, 100, 2 * one);
        h.committed(rows(1..=3), false);
        assert_eq!(h.len(), 2);
    }

    #[test]
    fn rows_the_reader_got_from_the_database_are_not_given_again() {
        let mut h = Handover::new(0, 3, 1 << 20);
        h.committed(rows(1..=4), false);
        assert_eq!(ids(h.take(0, 3)), Some(vec![1, 2, 3]));
        assert_eq!(ids(h.take(3, 10)), None);
        // The database gave 4..=6 (5 and 6 were committed meanwhile and handed over).
        h.committed(rows(5..=6), false);
        h.served_from_database(6);
        h.committed(rows(7..=7), false);
        assert_eq!(ids(h.take(6, 10)), Some(vec![7]));
    }

    #[test]
    fn a_step_back_empties_it() {
        let mut h = Handover::new(0, 100, 1 << 20);
        h.committed(rows(1..=4), false);
        assert_eq!(ids(h.take(0, 2)), Some(vec![1, 2]));
        // A new session starts from the oldest pending row: 3 and 4 may have been
        // published (and released) meanwhile, so the database answers for them.
        assert_eq!(ids(h.take(0, 10)), None);
        assert_eq!(h.len(), 0);
        h.served_from_database(4);
        h.committed(rows(5..=5), false);
        assert_eq!(ids(h.take(4, 10)), Some(vec![5]));
    }

    #[test]
    fn rows_deleted_by_the_overflow_policy_are_not_handed_over() {
        let mut h = Handover::new(0, 100, 1 << 20);
        h.committed(rows(1..=3), false);
        // The next transaction dropped the oldest rows, then stored 4.
        h.committed(rows(4..=4), true);
        assert_eq!(ids(h.take(0, 10)), None);
        h.served_from_database(3);
        assert_eq!(ids(h.take(3, 10)), Some(vec![4]));
    }
}
