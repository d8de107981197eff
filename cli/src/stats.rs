//! Latency percentiles for the measuring commands (`bench`, `engine-bench`, `exchange-bench`).

use std::time::Duration;

/// Nearest-rank percentile of sorted samples: the smallest sample with at least `p`% of the samples
/// at or below it. `None` without samples.
pub fn percentile(sorted: &[Duration], p: f64) -> Option<Duration> {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.clamp(1, sorted.len().max(1)) - 1).copied()
}

/// [`percentile`] in milliseconds.
pub fn percentile_ms(sorted: &[Duration], p: f64) -> Option<f64> {
    percentile(sorted, p).map(|d| d.as_secs_f64() * 1e3)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let ms = |v: &[u64]| v.iter().map(|&x| Duration::from_millis(x)).collect::<Vec<_>>();
        let s = ms(&(1..=10).collect::<Vec<_>>());
        assert_eq!(percentile(&s, 50.0), Some(Duration::from_millis(5)));
        assert_eq!(percentile(&s, 90.0), Some(Duration::from_millis(9)));
        assert_eq!(percentile(&s, 99.0), Some(Duration::from_millis(10)));
        assert_eq!(percentile(&s, 100.0), Some(Duration::from_millis(10)));
        assert_eq!(percentile(&s, 0.0), Some(Duration::from_millis(1)));
        let hundred: Vec<Duration> = (1..=100).map(Duration::from_micros).collect();
        assert_eq!(percentile(&hundred, 99.0), Some(Duration::from_micros(99)));
        assert_eq!(percentile(&ms(&[7]), 50.0), Some(Duration::from_millis(7)));
        assert_eq!(percentile(&[], 50.0), None);
    }
}
