//! Delivery ledgers: which message ids a sink received, and which a sender had acknowledged.
//!
//! Ids are `(run id, seq)`. Seqs are dense (`0..M`), so a run's set is a bitset, stored in 64 Ki
//! pages so that a stray huge seq from a foreign or damaged message costs one page, not gigabytes.

use std::collections::HashMap;

use serde::Serialize;

const PAGE_BITS: u64 = 1 << 16;
const PAGE_WORDS: usize = (PAGE_BITS / 64) as usize;

/// A set of u64 as a paged bitset.
#[derive(Default, Clone)]
pub struct SeqSet {
    pages: HashMap<u64, Box<[u64; PAGE_WORDS]>>,
    len: u64,
}

impl std::fmt::Debug for SeqSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SeqSet({} members)", self.len)
    }
}

impl SeqSet {
    /// Adds `seq`; returns false if it was already present.
    pub fn insert(&mut self, seq: u64) -> bool {
        let page = self
            .pages
            .entry(seq / PAGE_BITS)
            .or_insert_with(|| Box::new([0; PAGE_WORDS]));
        let bit = seq % PAGE_BITS;
        let word = &mut page[(bit / 64) as usize];
        let mask = 1u64 << (bit % 64);
        if *word & mask != 0 {
            return false;
        }
        *word |= mask;
        self.len += 1;
        true
    }

    /// Whether `seq` is present.
    pub fn contains(&self, seq: u64) -> bool {
        self.pages.get(&(seq / PAGE_BITS)).is_some_and(|p| {
            let bit = seq % PAGE_BITS;
            p[(bit / 64) as usize] & (1 << (bit % 64)) != 0
        })
    }

    /// Number of distinct members.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Adds every member of `other`.
    pub fn union_with(&mut self, other: &SeqSet) {
        for (&k, page) in &other.pages {
            let mine = self
                .pages
                .entry(k)
                .or_insert_with(|| Box::new([0; PAGE_WORDS]));
            for (a, b) in mine.iter_mut().zip(page.iter()) {
                self.len += u64::from((b & !*a).count_ones());
                *a |= b;
            }
        }
    }

    /// How many members of `self` are missing from `other`.
    pub fn missing_from(&self, other: &SeqSet) -> u64 {
        self.pages
            .iter()
            .map(|(k, page)| match other.pages.get(k) {
                Some(o) => page
                    .iter()
                    .zip(o.iter())
                    .map(|(a, b)| u64::from((a & !b).count_ones()))
                    .sum::<u64>(),
                None => page.iter().map(|a| u64::from(a.count_ones())).sum(),
            })
            .sum()
    }
}

/// What the sink saw of one run.
#[derive(Default, Clone)]
pub struct RunLedger {
    /// Distinct seqs delivered (intact or not).
    pub seen: SeqSet,
    /// Deliveries of a seq already delivered.
    pub duplicated: u64,
    /// Deliveries whose body did not match the check header.
    pub corrupted: u64,
}

/// Per-run counters as reported.
#[derive(Serialize, Clone, Debug, PartialEq, Eq)]
pub struct RunSummary {
    pub run_id: String,
    pub distinct: u64,
    pub duplicated: u64,
    pub corrupted: u64,
}

/// The sink's ledger over all runs.
#[derive(Default)]
pub struct Ledger {
    runs: HashMap<Box<[u8]>, RunLedger>,
    /// Messages without a loadgen message id.
    pub foreign: u64,
}

impl Ledger {
    /// Records a delivery of `(run, seq)`; `intact` is false for a checksum mismatch.
    pub fn record(&mut self, run: &[u8], seq: u64, intact: bool) {
        let r = match self.runs.get_mut(run) {
            Some(r) => r,
            None => self.runs.entry(run.into()).or_default(),
        };
        if !r.seen.insert(seq) {
            r.duplicated += 1;
        }
        if !intact {
            r.corrupted += 1;
        }
    }

    /// One run's ledger, if any message of it arrived.
    pub fn run(&self, run_id: &str) -> Option<&RunLedger> {
        self.runs.get(run_id.as_bytes())
    }

    /// Summaries of all runs, sorted by run id.
    pub fn summaries(&self) -> Vec<RunSummary> {
        let mut v: Vec<RunSummary> = self
            .runs
            .iter()
            .map(|(k, r)| RunSummary {
                run_id: String::from_utf8_lossy(k).into_owned(),
                distinct: r.seen.len(),
                duplicated: r.duplicated,
                corrupted: r.corrupted,
            })
            .collect();
        v.sort_by(|a, b| a.run_id.cmp(&b.run_id));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seqset_counts_and_differences() {
        let mut a = SeqSet::default();
        assert!(a.insert(3) && a.insert(1 << 40) && !a.insert(3));
        assert_eq!(a.len(), 2);
        let mut b = SeqSet::default();
        b.insert(3);
        b.insert(70_000);
        assert_eq!(a.missing_from(&b), 1);
        a.union_with(&b);
        assert_eq!(a.len(), 3);
        assert!(a.contains(70_000) && !a.contains(4));
    }

    #[test]
    fn ledger_counts_duplicates_and_corruption() {
        let mut l = Ledger::default();
        l.record(b"r", 0, true);
        l.record(b"r", 0, true);
        l.record(b"r", 1, false);
        let s = l.summaries();
        assert_eq!(
            s,
            vec![RunSummary {
                run_id: "r".into(),
                distinct: 2,
                duplicated: 1,
                corrupted: 1
            }]
        );
    }
}
