//! The `loadgen` command line: parses flags, runs `serve` or a load
//! scenario, and prints the result (a table, or one JSON object with
//! `--json`). All the work happens in the library modules.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};

use loadgen::runner::{self, RunConfig};
use loadgen::serve::{self, Mode};
use loadgen::worker::{Direction, Scenario};
use loadgen::{addrs, hgrm, plot};

#[derive(Parser)]
#[command(name = "loadgen", version, about = "io_uring load generator and test backend (loopback only)")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Backend: TCP echo/sink/source, HTTP/1.1 responder, UDP echo.
    Serve(ServeArgs),
    /// Short connections: connect, request, response, close.
    TcpCrr(Common),
    /// Persistent connections, request/response; open loop with --rate.
    TcpRr(Common),
    /// Bulk throughput over --concurrency connections.
    TcpStream(StreamArgs),
    /// Open and hold --concurrency connections for --duration.
    Idle(IdleArgs),
    /// Datagram request/response (--size up to 65507).
    UdpRr(Common),
}

#[derive(Args)]
struct ServeArgs {
    /// TCP echo listeners (comma list, repeatable; port 0 = any free port).
    #[arg(long)]
    tcp_echo: Vec<String>,
    /// TCP sink listeners (read and discard).
    #[arg(long)]
    tcp_sink: Vec<String>,
    /// TCP source listeners (write a byte pattern until the peer leaves).
    #[arg(long)]
    tcp_source: Vec<String>,
    /// HTTP/1.1 listeners (keep-alive; 200 naming the instance).
    #[arg(long)]
    http: Vec<String>,
    /// UDP echo listeners (an empty datagram is answered with the identity).
    #[arg(long)]
    udp_echo: Vec<String>,
    /// Instance name reported by every listener as "<id> <addr>".
    #[arg(long, default_value = "loadgen")]
    id: String,
    /// Send "<id> <addr>\n" on every accepted TCP connection first.
    #[arg(long)]
    greet: bool,
    /// Worker threads (default: one per core).
    #[arg(long)]
    workers: Option<usize>,
    /// Exit by itself after this long (safety bound), e.g. 30s, 5m.
    #[arg(long, value_parser = parse_duration, default_value = "1h")]
    duration: Duration,
}

#[derive(Args, Clone)]
struct Common {
    /// Target address(es), comma list or repeated; loopback only.
    #[arg(long, short = 't', required = true)]
    target: Vec<String>,
    /// Connections (spread over targets, sources and workers).
    #[arg(long, short = 'c', default_value_t = 1, alias = "connections")]
    concurrency: usize,
    /// Measurement time after the warmup, e.g. 10s, 500ms.
    #[arg(long, short = 'd', value_parser = parse_duration, default_value = "10s")]
    duration: Duration,
    /// Stop after this many counted transactions (duration still bounds).
    #[arg(long, short = 'n')]
    count: Option<u64>,
    /// Time before measuring starts (not counted).
    #[arg(long, value_parser = parse_duration, default_value = "0s")]
    warmup: Duration,
    /// Payload bytes per request (default 64; tcp-stream: 65536 per write).
    #[arg(long, short = 's')]
    size: Option<usize>,
    /// Requests per second over all connections: open loop with
    /// coordinated-omission correction. Closed loop without it.
    #[arg(long)]
    rate: Option<f64>,
    /// Worker threads (default: one per core).
    #[arg(long, short = 'w')]
    workers: Option<usize>,
    /// Source addresses to bind before connect, e.g. 127.0.0.2-127.0.0.50.
    #[arg(long)]
    source: Vec<String>,
    /// Connect and response timeout.
    #[arg(long, value_parser = parse_duration, default_value = "2s")]
    timeout: Duration,
    /// Print one JSON object on stdout instead of a table.
    #[arg(long)]
    json: bool,
    /// Write the latency distribution in HdrHistogram .hgrm format.
    #[arg(long)]
    hgrm: Option<PathBuf>,
    /// Draw the latency distribution as an SVG.
    #[arg(long)]
    plot: Option<PathBuf>,
}

#[derive(Args)]
struct StreamArgs {
    #[command(flatten)]
    common: Common,
    /// send: to a sink; recv: from a source; both: through an echo server.
    #[arg(long, value_enum, default_value = "send")]
    direction: Dir,
}

#[derive(Args)]
struct IdleArgs {
    #[command(flatten)]
    common: Common,
    /// Write "established=N attempted=M" here once every connect resolved.
    #[arg(long)]
    ready_file: Option<PathBuf>,
}

#[derive(Clone, Copy, ValueEnum)]
enum Dir {
    Send,
    Recv,
    Both,
}

/// Parses "1.5", "250ms", "10s", "2m" or "1h".
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s.find(|c: char| c.is_ascii_alphabetic()).map_or((s, "s"), |i| s.split_at(i));
    let v: f64 = num.trim().parse().map_err(|_| format!("`{s}` is not a duration"))?;
    let secs = match unit {
        "ms" => v / 1000.0,
        "s" => v,
        "m" => v * 60.0,
        "h" => v * 3600.0,
        _ => return Err(format!("`{s}`: unit must be ms, s, m or h")),
    };
    Duration::try_from_secs_f64(secs).map_err(|e| format!("`{s}`: {e}"))
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Serve(a) => serve_cmd(a),
        Cmd::TcpCrr(c) => load(Scenario::TcpCrr, "tcp-crr", c, None),
        Cmd::TcpRr(c) => load(Scenario::TcpRr, "tcp-rr", c, None),
        Cmd::UdpRr(c) => load(Scenario::UdpRr, "udp-rr", c, None),
        Cmd::TcpStream(s) => {
            let dir = match s.direction {
                Dir::Send => Direction::Send,
                Dir::Recv => Direction::Recv,
                Dir::Both => Direction::Both,
            };
            load(Scenario::TcpStream(dir), "tcp-stream", s.common, None)
        }
        Cmd::Idle(i) => load(Scenario::Idle, "idle", i.common, i.ready_file),
    }
}

fn serve_cmd(a: ServeArgs) -> Result<()> {
    let mut tcp = Vec::new();
    for (mode, specs) in [
        (Mode::Echo, &a.tcp_echo),
        (Mode::Sink, &a.tcp_sink),
        (Mode::Source, &a.tcp_source),
        (Mode::Http, &a.http),
    ] {
        tcp.extend(addrs::parse_listen(specs)?.into_iter().map(|addr| (mode, addr)));
    }
    let udp = addrs::parse_listen(&a.udp_echo)?;
    if tcp.is_empty() && udp.is_empty() {
        bail!("nothing to serve: give --tcp-echo, --tcp-sink, --tcp-source, --http or --udp-echo");
    }
    let listeners = serve::bind(&tcp, &udp, &a.id)?;
    // Handlers first: the "listening" line tells a supervisor it may signal us.
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, Arc::clone(&stop)).context("cannot install signal handler")?;
    }
    let line = serde_json::json!({ "id": a.id, "listening": listeners.bound });
    println!("{line}");
    serve::run(listeners, a.workers.unwrap_or_else(cores), a.greet, stop, Instant::now() + a.duration)?;
    Ok(())
}

fn load(scenario: Scenario, name: &'static str, c: Common, ready_file: Option<PathBuf>) -> Result<()> {
    let default_size = if matches!(scenario, Scenario::TcpStream(_)) { 65_536 } else { 64 };
    let size = c.size.unwrap_or(default_size);
    match scenario {
        Scenario::UdpRr if !(1..=65_507).contains(&size) => {
            bail!("udp-rr --size must be 1..=65507")
        }
        _ if size == 0 || size > 1 << 20 => bail!("--size must be 1..=1048576"),
        _ => {}
    }
    if c.concurrency == 0 {
        bail!("--concurrency must be at least 1");
    }
    if c.rate.is_some_and(|r| !(r > 0.0 && r.is_finite())) {
        bail!("--rate must be a positive number");
    }
    if c.rate.is_some() && !matches!(scenario, Scenario::TcpRr | Scenario::UdpRr) {
        bail!("--rate applies to tcp-rr and udp-rr only");
    }
    let cfg = RunConfig {
        scenario,
        name,
        targets: addrs::parse_targets(&c.target)?,
        sources: addrs::parse_sources(&c.source)?,
        concurrency: c.concurrency,
        workers: c.workers.unwrap_or_else(cores).max(1),
        size,
        rate: c.rate,
        count: c.count,
        warmup: c.warmup,
        duration: c.duration,
        timeout: c.timeout,
        ready_file,
    };
    let (report, hist) = runner::run(&cfg)?;
    if let Some(path) = &c.hgrm {
        std::fs::write(path, hgrm::render(&hist))
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    if let Some(path) = &c.plot {
        let title = format!("{name} latency, {} connections", cfg.concurrency);
        plot::write_svg(&hist, &title, path)?;
    }
    if c.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", report.table());
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn durations_accept_plain_seconds_and_units() {
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("3 days").is_err());
        assert!(parse_duration("-1").is_err());
    }
}
