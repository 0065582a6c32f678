//! Latency summaries: nearest-rank percentiles over recorded samples.

use std::time::Duration;

use serde::Serialize;

/// A latency distribution, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub(crate) struct Percentiles {
    pub(crate) count: usize,
    pub(crate) mean_ms: f64,
    pub(crate) p50_ms: f64,
    pub(crate) p90_ms: f64,
    pub(crate) p99_ms: f64,
    pub(crate) max_ms: f64,
}

impl Percentiles {
    /// Summarises samples given in nanoseconds; `None` when there are none.
    pub(crate) fn of_nanos(mut samples: Vec<u64>) -> Option<Self> {
        if samples.is_empty() {
            return None;
        }
        samples.sort_unstable();
        let count = samples.len();
        let total: u128 = samples.iter().map(|&nanos| u128::from(nanos)).sum();
        let mean = total as f64 / count as f64;
        Some(Self {
            count,
            mean_ms: mean / 1e6,
            p50_ms: millis(nearest_rank(&samples, 50.0)),
            p90_ms: millis(nearest_rank(&samples, 90.0)),
            p99_ms: millis(nearest_rank(&samples, 99.0)),
            max_ms: millis(samples[count - 1]),
        })
    }
}

impl std::fmt::Display for Percentiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "p50 {:.2} ms  p90 {:.2} ms  p99 {:.2} ms  max {:.2} ms  (mean {:.2} ms, {} samples)",
            self.p50_ms, self.p90_ms, self.p99_ms, self.max_ms, self.mean_ms, self.count
        )
    }
}

/// The smallest sample such that at least `percent` of all samples are at or below it.
fn nearest_rank(sorted: &[u64], percent: f64) -> u64 {
    let rank = (percent / 100.0 * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn millis(nanos: u64) -> f64 {
    nanos as f64 / 1e6
}

/// Nanoseconds in a duration, saturating (a benchmark never runs for 584 years).
pub(crate) fn nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

/// Events per second, or 0 when no time passed.
pub(crate) fn per_second(events: u64, elapsed: Duration) -> f64 {
    let seconds = elapsed.as_secs_f64();
    if seconds > 0.0 {
        events as f64 / seconds
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_the_nearest_rank() {
        // 1..=100 ms: the p-th percentile is exactly p ms.
        let samples = (1..=100).map(|ms| ms * 1_000_000).rev().collect();
        let summary = Percentiles::of_nanos(samples).unwrap();
        assert_eq!(summary.count, 100);
        assert_eq!(summary.p50_ms, 50.0);
        assert_eq!(summary.p90_ms, 90.0);
        assert_eq!(summary.p99_ms, 99.0);
        assert_eq!(summary.max_ms, 100.0);
        assert_eq!(summary.mean_ms, 50.5);
    }

    #[test]
    fn a_single_sample_is_every_percentile_and_none_is_nothing() {
        let summary = Percentiles::of_nanos(vec![2_500_000]).unwrap();
        assert_eq!(
            (summary.p50_ms, summary.p99_ms, summary.max_ms),
            (2.5, 2.5, 2.5)
        );
        assert_eq!(Percentiles::of_nanos(Vec::new()), None);
    }

    #[test]
    fn rates_survive_zero_time() {
        assert_eq!(per_second(10, Duration::ZERO), 0.0);
        assert_eq!(per_second(10, Duration::from_millis(500)), 20.0);
    }
}
