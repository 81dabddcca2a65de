//! Latency histograms and their summaries.
//!
//! Latencies are recorded in nanoseconds into HDR histograms (3 significant digits, so p99.9 of
//! a 200 µs distribution is exact to 0.1 µs) and reported in microseconds.

use hdrhistogram::Histogram;
use serde::Serialize;
use std::time::Duration;

/// Largest latency a histogram holds (longer ones saturate): well above any `--timeout`.
const MAX_NS: u64 = 3_600 * 1_000_000_000;

/// A new latency histogram.
pub fn histogram() -> Histogram<u64> {
    // The bounds are constants that hdrhistogram accepts; failure would be a programming error.
    Histogram::new_with_bounds(1, MAX_NS, 3).expect("valid histogram bounds")
}

/// Records `d` into `h`, saturating at the histogram's maximum.
pub fn record(h: &mut Histogram<u64>, d: Duration) {
    h.saturating_record((d.as_nanos() as u64).max(1));
}

/// Percentiles of one latency distribution, in microseconds.
#[derive(Serialize, Clone, Debug, Default)]
pub struct Latency {
    pub count: u64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
    pub mean_us: f64,
}

impl Latency {
    /// Summarises `h` (values in ns).
    pub fn of(h: &Histogram<u64>) -> Latency {
        if h.is_empty() {
            return Latency::default();
        }
        let us = |ns: u64| (ns as f64 / 1000.0 * 10.0).round() / 10.0;
        Latency {
            count: h.len(),
            p50_us: us(h.value_at_quantile(0.5)),
            p90_us: us(h.value_at_quantile(0.9)),
            p99_us: us(h.value_at_quantile(0.99)),
            p999_us: us(h.value_at_quantile(0.999)),
            max_us: us(h.max()),
            mean_us: (h.mean() / 100.0).round() / 10.0,
        }
    }

    /// One table row: `label  p50 p90 p99 p99.9 max` in milliseconds.
    pub fn row(&self, label: &str) -> String {
        let ms = |us: f64| us / 1000.0;
        format!(
            "    {label:<22} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3}   (n={})",
            ms(self.p50_us),
            ms(self.p90_us),
            ms(self.p99_us),
            ms(self.p999_us),
            ms(self.max_us),
            self.count
        )
    }
}

/// Rounds to one decimal for reports.
pub fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}
