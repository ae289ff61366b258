//! `GET /metrics`: counters, gauges and histograms in the Prometheus text format (version 0.0.4).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// A histogram with fixed upper bounds (seconds).
pub struct Histogram {
    bounds: &'static [f64],
    /// Per bucket (cumulative at rendering), then the sum in microseconds and the count.
    counts: Vec<AtomicU64>,
    sum_us: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            sum_us: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, secs: f64) {
        if let Some(i) = self.bounds.iter().position(|&b| secs <= b) {
            self.counts[i].fetch_add(1, Ordering::Relaxed);
        }
        self.sum_us
            .fetch_add((secs * 1e6) as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut acc = 0;
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            acc += c.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {acc}");
        }
        let n = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {n}");
        let _ = writeln!(
            out,
            "{name}_sum {}",
            self.sum_us.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count {n}");
    }
}

const TTFT: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
const ITL: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// The server's metrics.
pub struct Metrics {
    /// Finished requests by HTTP status.
    by_status: Mutex<BTreeMap<u16, u64>>,
    pub running: AtomicU64,
    pub waiting: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub generation_tokens: AtomicU64,
    /// Requests removed from the batch because their client went away or their deadline passed.
    pub cancelled: AtomicU64,
    pub kv_bytes: AtomicU64,
    pub kv_budget_bytes: AtomicU64,
    /// Sequences in the decode batch after the last step.
    pub batch_rows: AtomicU64,
    pub ttft: Histogram,
    pub itl: Histogram,
}

impl Metrics {
    pub fn new(kv_budget_bytes: u64) -> Self {
        Metrics {
            by_status: Mutex::new(BTreeMap::new()),
            running: AtomicU64::new(0),
            waiting: AtomicU64::new(0),
            prompt_tokens: AtomicU64::new(0),
            generation_tokens: AtomicU64::new(0),
            cancelled: AtomicU64::new(0),
            kv_bytes: AtomicU64::new(0),
            kv_budget_bytes: AtomicU64::new(kv_budget_bytes),
            batch_rows: AtomicU64::new(0),
            ttft: Histogram::new(TTFT),
            itl: Histogram::new(ITL),
        }
    }

    pub fn request_done(&self, status: u16) {
        if let Ok(mut m) = self.by_status.lock() {
            *m.entry(status).or_default() += 1;
        }
    }

    pub fn render(&self) -> String {
        let mut o = String::new();
        let g = |o: &mut String, name: &str, kind: &str, help: &str, v: u64| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
        };
        let _ = writeln!(
            o,
            "# HELP qoq_requests_total Chat-completion requests answered, by HTTP status.\n# TYPE qoq_requests_total counter"
        );
        if let Ok(m) = self.by_status.lock() {
            for (s, n) in m.iter() {
                let _ = writeln!(o, "qoq_requests_total{{status=\"{s}\"}} {n}");
            }
        }
        let ld = |a: &AtomicU64| a.load(Ordering::Relaxed);
        g(
            &mut o,
            "qoq_requests_running",
            "gauge",
            "Requests in the running batch.",
            ld(&self.running),
        );
        g(
            &mut o,
            "qoq_requests_waiting",
            "gauge",
            "Requests waiting for admission to the batch.",
            ld(&self.waiting),
        );
        g(
            &mut o,
            "qoq_requests_cancelled_total",
            "counter",
            "Requests removed from the batch (client gone or deadline passed).",
            ld(&self.cancelled),
        );
        g(
            &mut o,
            "qoq_prompt_tokens_total",
            "counter",
            "Prompt tokens admitted.",
            ld(&self.prompt_tokens),
        );
        g(
            &mut o,
            "qoq_generation_tokens_total",
            "counter",
            "Tokens generated.",
            ld(&self.generation_tokens),
        );
        g(
            &mut o,
            "qoq_kv_cache_bytes",
            "gauge",
            "Bytes of keys and values held by the engine.",
            ld(&self.kv_bytes),
        );
        g(
            &mut o,
            "qoq_kv_cache_budget_bytes",
            "gauge",
            "The key/value budget admission keeps the batch within.",
            ld(&self.kv_budget_bytes),
        );
        g(
            &mut o,
            "qoq_batch_rows",
            "gauge",
            "Sequences in the decode batch.",
            ld(&self.batch_rows),
        );
        self.ttft.render(
            &mut o,
            "qoq_time_to_first_token_seconds",
            "Time from a request's arrival to its first token.",
        );
        self.itl.render(
            &mut o,
            "qoq_inter_token_latency_seconds",
            "Time between consecutive tokens of a choice.",
        );
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let m = Metrics::new(100);
        m.ttft.observe(0.003);
        m.ttft.observe(0.2);
        m.ttft.observe(100.0);
        m.request_done(200);
        m.request_done(429);
        m.request_done(200);
        let t = m.render();
        assert!(
            t.contains("qoq_time_to_first_token_seconds_bucket{le=\"0.005\"} 1\n"),
            "{t}"
        );
        assert!(
            t.contains("qoq_time_to_first_token_seconds_bucket{le=\"0.25\"} 2\n"),
            "{t}"
        );
        assert!(
            t.contains("qoq_time_to_first_token_seconds_bucket{le=\"+Inf\"} 3\n"),
            "{t}"
        );
        assert!(
            t.contains("qoq_time_to_first_token_seconds_count 3\n"),
            "{t}"
        );
        assert!(t.contains("qoq_requests_total{status=\"200\"} 2\n"), "{t}");
        assert!(t.contains("qoq_requests_total{status=\"429\"} 1\n"), "{t}");
        assert!(t.contains("qoq_kv_cache_budget_bytes 100\n"), "{t}");
    }
}
