//! The standard HdrHistogram `.hgrm` percentile-distribution text, with no I/O.
//!
//! The layout matches Java HdrHistogram's `outputPercentileDistribution`
//! with an output unit of milliseconds (values are recorded in microseconds
//! and divided by 1000), as wrk2 writes it, so the file loads into the usual
//! HdrHistogram plotters.

use std::fmt::Write;

use hdrhistogram::Histogram;

const TICKS_PER_HALF_DISTANCE: u32 = 5;
const SCALE: f64 = 1000.0;

/// Renders `h` (microseconds) as `.hgrm` text in milliseconds.
pub fn render(h: &Histogram<u64>) -> String {
    let mut s = String::new();
    let _ =
        writeln!(s, "{:>12} {:>14} {:>10} {:>14}\n", "Value", "Percentile", "TotalCount", "1/(1-Percentile)");
    let mut total = 0u64;
    if !h.is_empty() {
        for v in h.iter_quantiles(TICKS_PER_HALF_DISTANCE) {
            total += v.count_since_last_iteration();
            let value = h.highest_equivalent(v.value_iterated_to()) as f64 / SCALE;
            let q = v.quantile_iterated_to();
            if q < 1.0 {
                let _ = writeln!(s, "{value:12.3} {q:2.12} {total:10} {:14.2}", 1.0 / (1.0 - q));
            } else {
                let _ = writeln!(s, "{value:12.3} {q:2.12} {total:10}");
            }
        }
    }
    let (mean, stdev, max) = if h.is_empty() {
        (0.0, 0.0, 0.0)
    } else {
        (h.mean() / SCALE, h.stdev() / SCALE, h.max() as f64 / SCALE)
    };
    let _ = writeln!(s, "#[Mean    = {mean:12.3}, StdDeviation   = {stdev:12.3}]");
    let _ = writeln!(s, "#[Max     = {max:12.3}, Total count    = {:12}]", h.len());
    let _ = writeln!(s, "#[Buckets = {:12}, SubBuckets     = {:12}]", h.buckets(), h.distinct_values());
    s
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::report::new_histogram;

    #[test]
    fn hgrm_lists_rising_percentiles_and_ends_with_the_max_and_the_footer() {
        let mut h = new_histogram();
        for v in 1..=1000u64 {
            h.record(v * 10).unwrap();
        }
        let text = render(&h);
        let rows: Vec<Vec<f64>> = text
            .lines()
            .skip(2)
            .take_while(|l| !l.starts_with('#'))
            .map(|l| l.split_whitespace().map(|x| x.parse().unwrap()).collect())
            .collect();
        assert!(rows.len() > 20);
        assert!(rows.windows(2).all(|w| w[0][1] <= w[1][1] && w[0][2] <= w[1][2]));
        let last = rows.last().unwrap();
        assert_eq!(last.len(), 3, "the 100% row has no 1/(1-p) column");
        assert_eq!(last[1], 1.0);
        assert_eq!(last[2], 1000.0);
        assert!((last[0] - 10.0).abs() < 0.02, "{}", last[0]);
        assert!(text.contains("Total count    =         1000]"));
    }

    #[test]
    fn an_empty_histogram_still_renders_a_header_and_footer() {
        let text = render(&new_histogram());
        assert!(text.starts_with("       Value"));
        assert!(text.contains("#[Max     =        0.000"));
    }
}
