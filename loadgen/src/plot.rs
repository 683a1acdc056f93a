//! Draws a latency distribution as an SVG percentile plot with `plotters`.
//!
//! The x axis is the percentile on the usual HdrHistogram log scale
//! (`log10(1 / (1 - p))`, so 90%, 99%, 99.9% are evenly spaced) and the y
//! axis is latency in milliseconds.

use std::path::Path;

use hdrhistogram::Histogram;
use plotters::prelude::*;

/// A plot that could not be drawn or written.
#[derive(Debug, thiserror::Error)]
#[error("cannot draw {path}: {message}")]
pub struct PlotError {
    path: String,
    message: String,
}

/// Points (x = log10(1/(1-p)), y = ms) of the distribution, capped at 99.9999%.
pub fn points(h: &Histogram<u64>) -> Vec<(f64, f64)> {
    if h.is_empty() {
        return Vec::new();
    }
    h.iter_quantiles(10)
        .map(|v| {
            let q = v.quantile_iterated_to().min(0.999_999);
            (-(1.0 - q).log10(), h.highest_equivalent(v.value_iterated_to()) as f64 / 1000.0)
        })
        .collect()
}

/// Writes the SVG plot of `h` (microseconds) to `path`.
pub fn write_svg(h: &Histogram<u64>, title: &str, path: &Path) -> Result<(), PlotError> {
    let err =
        |e: &dyn std::fmt::Display| PlotError { path: path.display().to_string(), message: e.to_string() };
    let pts = points(h);
    let x_max = pts.iter().map(|p| p.0).fold(1.0_f64, f64::max).ceil();
    let y_max = pts.iter().map(|p| p.1).fold(0.001_f64, f64::max) * 1.1;
    let root = SVGBackend::new(path, (900, 540)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..x_max, 0.0..y_max)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("latency (ms)")
        .x_labels(x_max as usize + 1)
        .x_label_formatter(&|x| format!("{}%", 100.0 - 100.0 / 10f64.powf(*x)))
        .draw()
        .map_err(|e| err(&e))?;
    chart.draw_series(LineSeries::new(pts, BLUE.stroke_width(2))).map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::report::new_histogram;

    #[test]
    fn plot_points_rise_with_the_percentile() {
        let mut h = new_histogram();
        for v in 1..=10_000u64 {
            h.record(v).unwrap();
        }
        let p = points(&h);
        assert!(p.windows(2).all(|w| w[0].0 <= w[1].0 && w[0].1 <= w[1].1));
        assert!((p.last().unwrap().1 - 10.0).abs() < 0.02);
    }

    #[test]
    fn svg_file_is_written() {
        let mut h = new_histogram();
        for v in 1..=100u64 {
            h.record(v * 100).unwrap();
        }
        let path = std::env::temp_dir().join(format!("loadgen-plot-{}.svg", std::process::id()));
        write_svg(&h, "test", &path).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        assert!(svg.starts_with("<svg") && svg.contains("polyline"));
    }
}
