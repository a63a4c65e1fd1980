//! A lock-free latency histogram with fixed bounds, rendered in Prometheus
//! text format: shared by every crate that times something an operator
//! watches.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// A histogram with fixed upper bounds in seconds.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    buckets: Vec<AtomicU64>,
    count: AtomicU64,
    /// Sum in microseconds.
    sum_us: AtomicU64,
}

const LATENCY_BOUNDS: &[f64] = &[
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

impl Default for Histogram {
    fn default() -> Self {
        Histogram::latency()
    }
}

impl Histogram {
    /// Bounds from 0.5 ms to 10 s.
    pub fn latency() -> Self {
        Histogram {
            bounds: LATENCY_BOUNDS,
            buckets: LATENCY_BOUNDS.iter().map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_us: AtomicU64::new(0),
        }
    }

    pub fn observe_us(&self, us: u64) {
        let s = us as f64 / 1e6;
        if let Some(i) = self.bounds.iter().position(|&b| s <= b) {
            self.buckets[i].fetch_add(1, Relaxed);
        }
        self.count.fetch_add(1, Relaxed);
        self.sum_us.fetch_add(us, Relaxed);
    }

    pub fn observe_ms(&self, ms: u64) {
        self.observe_us(ms.saturating_mul(1000));
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.count.load(Relaxed)
    }

    /// Appends the histogram as Prometheus text.
    pub fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cum = 0;
        for (b, c) in self.bounds.iter().zip(&self.buckets) {
            cum += c.load(Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cum}");
        }
        let n = self.count.load(Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {n}");
        let _ = writeln!(out, "{name}_sum {}", self.sum_us.load(Relaxed) as f64 / 1e6);
        let _ = writeln!(out, "{name}_count {n}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_cumulative_and_the_sum_in_seconds() {
        let h = Histogram::latency();
        h.observe_us(300); // ≤ 0.5 ms
        h.observe_ms(30); // ≤ 50 ms
        h.observe_ms(60_000); // past every bound: +Inf only
        let mut s = String::new();
        h.render(&mut s, "x_seconds", "help");
        assert!(s.contains("x_seconds_bucket{le=\"0.0005\"} 1\n"), "{s}");
        assert!(s.contains("x_seconds_bucket{le=\"0.025\"} 1\n"), "{s}");
        assert!(s.contains("x_seconds_bucket{le=\"0.05\"} 2\n"), "{s}");
        assert!(s.contains("x_seconds_bucket{le=\"10\"} 2\n"), "{s}");
        assert!(s.contains("x_seconds_bucket{le=\"+Inf\"} 3\n"), "{s}");
        assert!(s.contains("x_seconds_sum 60.0303\n"), "{s}");
        assert!(s.contains("x_seconds_count 3\n"), "{s}");
        assert_eq!(h.count(), 3);
    }
}
