//! Runs a load scenario: splits connections and budget over worker threads,
//! watches their progress (progress bar, `idle` ready file), then merges
//! their counters and histograms into one [`Report`].
//!
//! Every run is bounded: workers stop starting work at `warmup + duration`
//! and give up on anything still in flight at `warmup + duration + timeout +
//! GRACE`, so a run never outlives its hard deadline by more than a moment.

use std::io::IsTerminal;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};

use crate::report::{Counts, LatencySummary, Report, new_histogram, rates};
use crate::worker::{self, Clock, Plan, Progress, Scenario, WorkerError};

/// Extra time after the last response deadline before a run is cut short.
pub const GRACE: Duration = Duration::from_millis(500);

/// Everything a run needs, already validated.
#[derive(Debug, Clone)]
pub struct RunConfig {
    pub scenario: Scenario,
    pub name: &'static str,
    pub targets: Vec<SocketAddr>,
    pub sources: Vec<IpAddr>,
    pub concurrency: usize,
    pub workers: usize,
    pub size: usize,
    pub rate: Option<f64>,
    pub count: Option<u64>,
    pub warmup: Duration,
    pub duration: Duration,
    pub timeout: Duration,
    pub ready_file: Option<PathBuf>,
}

/// A run that could not be carried out.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Worker(#[from] WorkerError),
    #[error("cannot start a worker thread")]
    Spawn(#[source] std::io::Error),
    #[error("a worker thread panicked")]
    Panicked,
    #[error("cannot write the ready file {path}")]
    ReadyFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Splits `total` into `parts` shares differing by at most one.
pub fn share(total: u64, parts: usize, i: usize) -> u64 {
    let parts = parts.max(1) as u64;
    total / parts + u64::from((i as u64) < total % parts)
}

/// Runs the scenario and returns its report and merged latency histogram.
pub fn run(cfg: &RunConfig) -> Result<(Report, Histogram<u64>), RunError> {
    let start = Instant::now();
    let measure_start = start + cfg.warmup;
    let measure_end = measure_start + cfg.duration;
    let clock = Clock { start, measure_start, measure_end, hard_deadline: measure_end + cfg.timeout + GRACE };
    let workers = cfg.workers.clamp(1, cfg.concurrency.max(1));
    let progress = Arc::new(Progress::default());
    let mut handles = Vec::with_capacity(workers);
    let mut first_conn = 0;
    for i in 0..workers {
        let conns = share(cfg.concurrency as u64, workers, i) as usize;
        let plan = Plan {
            scenario: cfg.scenario,
            targets: cfg.targets.clone(),
            sources: cfg.sources.clone(),
            first_conn,
            conns,
            total_conns: cfg.concurrency,
            size: cfg.size,
            rate: cfg.rate,
            budget: cfg.count.map(|c| share(c, workers, i)),
            timeout: cfg.timeout,
            clock,
        };
        first_conn += conns;
        let p = Arc::clone(&progress);
        let h = std::thread::Builder::new()
            .name(format!("loadgen-{i}"))
            .spawn(move || worker::run(plan, p))
            .map_err(RunError::Spawn)?;
        handles.push(h);
    }
    watch(cfg, &clock, &progress, &handles)?;
    let (mut counts, mut hist, mut last_done) = (Counts::default(), new_histogram(), None::<Instant>);
    for h in handles {
        let out = h.join().map_err(|_| RunError::Panicked)??;
        counts.merge(&out.counts);
        // Both histograms share the same bounds, so adding cannot fail.
        let _ = hist.add(&out.hist);
        last_done = last_done.max(out.last_done);
    }
    let measured_end = match (cfg.scenario, last_done) {
        (Scenario::TcpCrr | Scenario::TcpRr | Scenario::UdpRr, Some(t)) if cfg.count.is_some() => {
            t.min(measure_end)
        }
        _ => measure_end,
    };
    Ok((report(cfg, workers, &counts, &hist, measured_end - measure_start), hist))
}

/// Polls the workers' progress until they finish: draws the progress bar
/// (only on a terminal) and writes the `idle` ready file.
fn watch<T>(
    cfg: &RunConfig,
    clock: &Clock,
    progress: &Progress,
    handles: &[std::thread::JoinHandle<T>],
) -> Result<(), RunError> {
    let bar = std::io::stderr().is_terminal().then(|| {
        let total = (clock.hard_deadline - clock.start - cfg.timeout - GRACE).as_millis() as u64;
        let bar = ProgressBar::new(total);
        if let Ok(style) = ProgressStyle::with_template("{bar:40} {elapsed}/{duration} {msg}") {
            bar.set_style(style);
        }
        bar
    });
    let mut ready_written = cfg.ready_file.is_none();
    while !handles.iter().all(|h| h.is_finished()) {
        std::thread::sleep(Duration::from_millis(10));
        let resolved = progress.resolved.load(Ordering::Relaxed);
        if !ready_written && resolved >= cfg.concurrency as u64 {
            ready_written = true;
            let established = progress.established.load(Ordering::Relaxed);
            if let Some(path) = &cfg.ready_file {
                let line = format!("established={established} attempted={}\n", cfg.concurrency);
                std::fs::write(path, line)
                    .map_err(|source| RunError::ReadyFile { path: path.clone(), source })?;
            }
        }
        if let Some(bar) = &bar {
            bar.set_position(clock.start.elapsed().as_millis() as u64);
            bar.set_message(format!(
                "{} done, {} established",
                progress.completed.load(Ordering::Relaxed),
                progress.established.load(Ordering::Relaxed)
            ));
        }
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    Ok(())
}

fn report(cfg: &RunConfig, workers: usize, c: &Counts, hist: &Histogram<u64>, measured: Duration) -> Report {
    let (ops_per_s, gbit_per_s) = rates(c, measured);
    let long_lived = matches!(cfg.scenario, Scenario::Idle | Scenario::TcpStream(_));
    Report {
        scenario: cfg.name.to_string(),
        targets: cfg.targets.iter().map(|t| t.to_string()).collect(),
        sources: cfg.sources.len(),
        workers,
        concurrency: cfg.concurrency,
        size: cfg.size,
        mode: if cfg.rate.is_some() { "open" } else { "closed" },
        rate_target: cfg.rate,
        warmup_s: cfg.warmup.as_secs_f64(),
        duration_s: (measured.as_secs_f64() * 1e6).round() / 1e6,
        attempted: c.attempted,
        completed: c.completed,
        errors: c.errors,
        errors_total: c.errors.total(),
        bytes_sent: c.bytes_sent,
        bytes_received: c.bytes_received,
        ops_per_s,
        gbit_per_s,
        latency_us: LatencySummary::from_histogram(hist),
        established: long_lived.then_some(c.established),
        held: (cfg.scenario == Scenario::Idle).then_some(c.held),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn shares_add_up_and_differ_by_at_most_one() {
        for (total, parts) in [(10u64, 3usize), (64, 2), (1, 4), (0, 2)] {
            let v: Vec<u64> = (0..parts).map(|i| share(total, parts, i)).collect();
            assert_eq!(v.iter().sum::<u64>(), total);
            assert!(v.iter().max().unwrap() - v.iter().min().unwrap() <= 1);
        }
    }
}
