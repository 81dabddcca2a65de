//! What the ring counts: per-worker plain integers, published about once per second.
//!
//! Owns the counter types and their summing. Each worker bumps its own private copy on its own
//! thread (no atomics, no sharing on the hot path) and copies it into a mutex once per tick;
//! readers (a metrics endpoint, a signal handler's dump) sum the published copies. It must not
//! know what a session is about: these are socket and ring facts only.

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use crate::relay::Side;

/// Upper bounds, in microseconds, of the upstream connect latency buckets (100 µs to 10 s).
pub const CONNECT_BUCKETS_MICROS: [u64; 16] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000, 5_000_000, 10_000_000,
];

/// How long upstream connects took (from submission to completion), as a histogram: one count
/// per bucket of [`CONNECT_BUCKETS_MICROS`] plus one for slower connects.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConnectLatency {
    /// Connects per bucket (not cumulative); the last slot holds those above every bound.
    pub counts: [u64; CONNECT_BUCKETS_MICROS.len() + 1],
    /// Sum of all recorded latencies, in microseconds.
    pub sum_micros: u64,
}

impl ConnectLatency {
    /// Records one connect that took `took`.
    pub fn record(&mut self, took: Duration) {
        let micros = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        let bucket = CONNECT_BUCKETS_MICROS.partition_point(|&bound| bound < micros);
        self.counts[bucket] += 1;
        self.sum_micros = self.sum_micros.saturating_add(micros);
    }

    /// Connects recorded.
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// Adds `other` into `self`.
    pub fn add(&mut self, other: &ConnectLatency) {
        for (mine, theirs) in self.counts.iter_mut().zip(other.counts.iter()) {
            *mine += theirs;
        }
        self.sum_micros = self.sum_micros.saturating_add(other.sum_micros);
    }
}

/// Per-worker counters. Each worker keeps its own copy as plain integers and publishes it
/// about once per second; read them with [`crate::io::Server::stats`] or a [`StatsHandle`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WorkerStats {
    /// Sessions whose slot is still held.
    pub sessions_open: u64,
    /// Sessions accepted since start.
    pub sessions_total: u64,
    /// Submission queue entries consumed by the kernel.
    pub submissions: u64,
    /// Completion queue entries handled.
    pub completions: u64,
    /// Completions the kernel could not post (as reported by the ring).
    pub cq_overflow: u64,
    /// Receive buffers currently available to the kernel.
    pub buffers_free: u64,
    /// Receive buffers the worker owns in all.
    pub buffers_total: u64,
    /// Upstream connects that succeeded.
    pub upstream_connects: u64,
    /// Upstream connects that failed.
    pub upstream_connect_failures: u64,
    /// Latency of the upstream connects that succeeded.
    pub connect_latency: ConnectLatency,
    /// Times a socket stopped being read because its peer's queue was over the high-water mark.
    pub recv_throttled: u64,
    /// Multishot receives ended by an empty buffer ring (re-armed after buffers came back).
    pub recv_enobufs: u64,
    /// Bytes received from clients.
    pub client_bytes_received: u64,
    /// Bytes received from upstream servers.
    pub upstream_bytes_received: u64,
    /// Bytes sent to clients.
    pub client_bytes_sent: u64,
    /// Bytes sent to upstream servers.
    pub upstream_bytes_sent: u64,
}

impl WorkerStats {
    /// Adds `other` into `self` (for whole-process totals).
    pub fn add(&mut self, other: &WorkerStats) {
        self.sessions_open += other.sessions_open;
        self.sessions_total += other.sessions_total;
        self.submissions += other.submissions;
        self.completions += other.completions;
        self.cq_overflow += other.cq_overflow;
        self.buffers_free += other.buffers_free;
        self.buffers_total += other.buffers_total;
        self.upstream_connects += other.upstream_connects;
        self.upstream_connect_failures += other.upstream_connect_failures;
        self.connect_latency.add(&other.connect_latency);
        self.recv_throttled += other.recv_throttled;
        self.recv_enobufs += other.recv_enobufs;
        self.client_bytes_received += other.client_bytes_received;
        self.upstream_bytes_received += other.upstream_bytes_received;
        self.client_bytes_sent += other.client_bytes_sent;
        self.upstream_bytes_sent += other.upstream_bytes_sent;
    }

    pub(crate) fn received(&mut self, side: Side, bytes: usize) {
        match side {
            Side::Client => self.client_bytes_received += bytes as u64,
            Side::Upstream => self.upstream_bytes_received += bytes as u64,
        }
    }

    pub(crate) fn sent(&mut self, side: Side, bytes: usize) {
        match side {
            Side::Client => self.client_bytes_sent += bytes as u64,
            Side::Upstream => self.upstream_bytes_sent += bytes as u64,
        }
    }
}

/// A cloneable, `Send` view of every worker's published stats (for a metrics endpoint).
#[derive(Debug, Clone)]
pub struct StatsHandle(pub(crate) Vec<Arc<Mutex<WorkerStats>>>);

impl StatsHandle {
    /// The last published stats of each worker, by worker index.
    pub fn snapshot(&self) -> Vec<WorkerStats> {
        self.0.iter().map(|s| *s.lock()).collect()
    }

    /// Sum over all workers.
    pub fn total(&self) -> WorkerStats {
        let mut total = WorkerStats::default();
        for worker in self.snapshot() {
            total.add(&worker);
        }
        total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_lands_in_the_first_bucket_that_holds_it() {
        let mut h = ConnectLatency::default();
        h.record(Duration::from_micros(100));
        h.record(Duration::from_micros(101));
        h.record(Duration::from_secs(60));
        assert_eq!(h.counts[0], 1, "le=100us holds 100us");
        assert_eq!(h.counts[1], 1, "101us goes to le=250us");
        assert_eq!(h.counts[CONNECT_BUCKETS_MICROS.len()], 1, "+Inf");
        assert_eq!(h.count(), 3);
        assert_eq!(h.sum_micros, 100 + 101 + 60_000_000);
        let mut sum = ConnectLatency::default();
        sum.add(&h);
        sum.add(&h);
        assert_eq!(sum.count(), 6);
    }
}
