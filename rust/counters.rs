//! The indexer's monotonic counters, read by the service at scrape time. One relaxed atomic
//! per counter: they are statistics, never used to order memory.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

macro_rules! counters {
    ($($name:ident),* $(,)?) => {
        /// One counter; its name is the Python-visible key.
        #[allow(non_camel_case_types)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum C { $($name),* }
        pub const COUNTER_NAMES: &[&str] = &[$(stringify!($name)),*];
    };
}

counters!(
    batches_applied,
    batch_decode_errors,
    batches_with_trailing_bytes,
    events_block_stored,
    events_block_removed,
    events_all_blocks_cleared,
    events_unknown_type,
    event_decode_errors,
    blocks_stored,
    blocks_removed,
    unknown_parents,
    root_zero_parent,
    unplaced_blocks,
    block_size_mismatches,
    hash_matches,
    hash_mismatches,
    bridge_full,
    queue_pushbacks,
    batches_queued,
    pods_cleared,
    tiers_refused,
);

#[derive(Default)]
pub struct Counters([AtomicU64; COUNTER_NAMES.len()]);

impl Counters {
    pub fn add(&self, c: C, n: u64) {
        if n > 0 {
            self.0[c as usize].fetch_add(n, Relaxed);
        }
    }
    pub fn get(&self, c: C) -> u64 {
        self.0[c as usize].load(Relaxed)
    }
    /// `(name, value)` for every counter, in declaration order.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        COUNTER_NAMES.iter().zip(self.0.iter()).map(|(n, v)| (*n, v.load(Relaxed))).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_enum() {
        let c = Counters::default();
        c.add(C::bridge_full, 2);
        c.add(C::bridge_full, 0);
        assert_eq!(c.get(C::bridge_full), 2);
        let snap = c.snapshot();
        assert_eq!(snap.len(), COUNTER_NAMES.len());
        assert_eq!(snap[C::bridge_full as usize], ("bridge_full", 2));
    }
}
