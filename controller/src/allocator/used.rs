//! Sets of numbers stored as sorted, merged runs, so that a fully used /8
//! or a sparse IPv6 /64 costs memory in proportion to the runs, never to
//! the size of the pool.

use std::collections::BTreeMap;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunSet {
    /// start -> end (inclusive); runs never touch or overlap.
    runs: BTreeMap<u128, u128>,
    len: u128,
}

impl RunSet {
    pub fn contains(&self, v: u128) -> bool {
        self.run_containing(v).is_some()
    }

    /// The run holding `v`, as (start, end).
    pub fn run_containing(&self, v: u128) -> Option<(u128, u128)> {
        self.runs
            .range(..=v)
            .next_back()
            .filter(|(_, end)| **end >= v)
            .map(|(s, e)| (*s, *e))
    }

    /// Number of members.
    pub fn len(&self) -> u128 {
        self.len
    }

    pub fn insert(&mut self, v: u128) -> bool {
        if self.contains(v) {
            return false;
        }
        let mut start = v;
        let mut end = v;
        // Merge with the run ending right before v ...
        if let Some(prev) = v.checked_sub(1).and_then(|p| self.run_containing(p)) {
            self.runs.remove(&prev.0);
            start = prev.0;
        }
        // ... and with the run starting right after it.
        if let Some(next_start) = v.checked_add(1)
            && let Some(next_end) = self.runs.remove(&next_start)
        {
            end = next_end;
        }
        self.runs.insert(start, end);
        self.len += 1;
        true
    }

    pub fn remove(&mut self, v: u128) -> bool {
        let Some((start, end)) = self.run_containing(v) else {
            return false;
        };
        self.runs.remove(&start);
        if start < v {
            self.runs.insert(start, v - 1);
        }
        if v < end {
            self.runs.insert(v + 1, end);
        }
        self.len -= 1;
        true
    }

    /// The parts of runs that lie inside `[start, end]`, in order.
    pub fn runs_within(&self, start: u128, end: u128) -> impl Iterator<Item = (u128, u128)> + '_ {
        let first = self.run_containing(start).map(|(s, _)| s).unwrap_or(start);
        self.runs
            .range(first..=end)
            .map(move |(s, e)| ((*s).max(start), (*e).min(end)))
            .filter(|(s, e)| s <= e)
    }

    /// Number of runs, a measure of memory use.
    pub fn runs(&self) -> usize {
        self.runs.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    #[test]
    fn merges_and_splits() {
        let mut s = RunSet::default();
        for v in [1, 3, 2, 5] {
            assert!(s.insert(v));
        }
        assert!(!s.insert(2));
        assert_eq!(s.runs(), 2);
        assert_eq!(s.run_containing(2), Some((1, 3)));
        assert!(s.remove(2));
        assert_eq!(s.runs(), 3);
        assert_eq!(s.len(), 3);
        assert!(s.insert(u128::MAX) && s.insert(0));
        assert_eq!(s.run_containing(1), Some((0, 1)));
    }

    proptest! {
        #[test]
        fn behaves_like_a_set(ops in proptest::collection::vec((any::<bool>(), 0u128..64), 0..200)) {
            let mut runs = RunSet::default();
            let mut model = BTreeSet::new();
            for (insert, v) in ops {
                if insert {
                    prop_assert_eq!(runs.insert(v), model.insert(v));
                } else {
                    prop_assert_eq!(runs.remove(v), model.remove(&v));
                }
            }
            prop_assert_eq!(runs.len(), model.len() as u128);
            let inside: u128 = runs.runs_within(10, 40).map(|(s, e)| e - s + 1).sum();
            prop_assert_eq!(inside, model.range(10..=40).count() as u128);
            for v in 0..64u128 {
                prop_assert_eq!(runs.contains(v), model.contains(&v));
            }
        }
    }
}
