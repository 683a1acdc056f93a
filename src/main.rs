//! The `ringport` command: parse the command line, start logging, and hand
//! over to `run`, `check`, `demo`, `status`, `cleanup`, or print shell
//! completions or the man page.

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, CommandFactory, Parser, Subcommand};
use ipnet::IpNet;
use ringport::balance::eligible::Locality;
use ringport::balance::health::HealthPolicy;
use ringport::balance::{BalanceOptions, MAX_ATTEMPTS};
use ringport::dataplane::{RelayMode, WorkerConfig};
use ringport::handover::HandoverOptions;
use ringport::listen::{ListenOptions, ProxyPortMode};
use ringport::metrics::PortDetail;
use ringport::model::Scheduler;
use ringport::redirect::RedirectMode;
use ringport::run::{Handles, RunOptions, SourceChoice};
use ringport::source::kube::KubeOptions;
use ringport::source_ip::SourceOptions;

#[path = "main/flags.rs"]
mod flags;
use flags::{parse_mark, parse_port_range};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "ringport",
    version = ringport::version::LONG,
    about = "A thread-per-core io_uring L4 service proxy for Kubernetes Services"
)]
struct Cli {
    /// Same as `ringport cleanup` (kube-proxy's spelling).
    #[arg(long, exclusive = true)]
    cleanup: bool,
    #[command(flatten)]
    log: LogArgs,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Args)]
struct LogArgs {
    /// Log lines as text or as one JSON object each.
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: LogFormat,
    /// More logging: -v debug, -vv trace.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    /// The log filter: a level (error, warn, info, debug, trace) or
    /// tracing directives such as `info,ringport::redirect=debug`
    /// (default: $RUST_LOG, else info).
    #[arg(long, global = true, conflicts_with = "verbose")]
    log_level: Option<String>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// `status -o`.
#[derive(Clone, Copy, clap::ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the services declared in manifests, reloading them on change.
    Run(RunArgs),
    /// Validate manifests and print the service-port table.
    Check {
        #[command(flatten)]
        source: SourceArgs,
        #[command(flatten)]
        listen: ListenArgs,
        /// The workers `run` would start, for the fd budget (default: one
        /// per CPU).
        #[arg(long)]
        workers: Option<usize>,
    },
    /// Start three demo backends and the proxy in front of them, on loopback
    /// only (the listen-address flags are overridden to 127.0.0.1).
    Demo(RunArgs),
    /// Remove every redirect rule, chain and table ringport made (nft and
    /// iptables, IPv4 and IPv6), then its proxy address and route on lo,
    /// and exit. Nothing to remove is a success; a failed step is reported
    /// after the others ran, with exit status 1.
    Cleanup,
    /// Show what a running ringport serves: each service port, its VIPs,
    /// proxy port and listeners, and each endpoint's state, active
    /// connections and ejections.
    Status {
        /// The running ringport's --metrics-bind-address.
        #[arg(long, default_value = DEFAULT_METRICS_ADDRESS)]
        metrics_bind_address: SocketAddr,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions { shell: clap_complete::Shell },
    /// Print the man page (roff) on standard output.
    Man,
}

const DEFAULT_METRICS_ADDRESS: &str = "127.0.0.1:10249";

#[derive(Args)]
struct SourceArgs {
    /// A manifest file or a directory of them (multi-document YAML, as
    /// `kubectl apply` takes).
    #[arg(long, default_value = "examples/edge.yaml")]
    config: PathBuf,
}

/// Where `run` gets its services.
#[derive(Clone, Copy, clap::ValueEnum)]
enum SourceKind {
    /// Manifest files at --config.
    File,
    /// The Kubernetes API (Services and EndpointSlices of every namespace).
    Kube,
}

#[derive(Args)]
struct KubeArgs {
    /// Where the services come from.
    #[arg(long = "source", value_enum, default_value = "file")]
    kind: SourceKind,
    /// The kubeconfig for --source kube (default: the in-cluster
    /// configuration, or $KUBECONFIG).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// The API server's address for --source kube, overriding the
    /// kubeconfig's server (or the in-cluster one), as kube-proxy's flag.
    /// Give the real address: the `kubernetes` Service's cluster IP only
    /// works once ringport's own rules are in place.
    #[arg(long)]
    master: Option<String>,
    /// Serve Services labelled service.kubernetes.io/service-proxy-name
    /// with this value (without it, every labelled Service is skipped).
    #[arg(long)]
    service_proxy_name: Option<String>,
}

#[derive(Args)]
struct ListenArgs {
    /// The address proxy ports listen on.
    #[arg(long, default_value_t = IpAddr::V4(Ipv4Addr::UNSPECIFIED))]
    bind_address: IpAddr,
    /// Ports to allocate proxy ports from, e.g. 20000-20999 (default: the
    /// kernel chooses).
    #[arg(long, value_parser = parse_port_range)]
    proxy_port_range: Option<RangeInclusive<u16>>,
    /// CIDRs of the node addresses NodePorts listen on, comma separated
    /// (default: every address).
    #[arg(long, value_delimiter = ',')]
    nodeport_addresses: Vec<IpNet>,
    /// With redirect rules and the wildcard --bind-address: the address,
    /// put on `lo`, that proxy ports listen on and the rules DNAT to.
    #[arg(long, default_value_t = ringport::redirect::DEFAULT_PROXY_ADDRESS)]
    proxy_address: Ipv4Addr,
    /// The same for IPv6: made local by a `local` /128 route on `lo` (no
    /// address, so the node never uses it as a source) and bound with
    /// IPV6_FREEBIND; not added where IPv6 is off.
    #[arg(long, default_value_t = ringport::redirect::DEFAULT_PROXY_ADDRESS6)]
    proxy_address6: Ipv6Addr,
    /// per-service: a proxy port per service port. shared (needs rules):
    /// one per family for every TCP service port, each connection routed by
    /// its original destination (docs/architecture.md, "Proxy port modes").
    #[arg(long, value_enum, default_value_t = ProxyPortMode::PerService)]
    proxy_port_mode: ProxyPortMode,
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    source: SourceArgs,
    #[command(flatten)]
    kube: KubeArgs,
    #[command(flatten)]
    listen: ListenArgs,
    /// Worker threads, each pinned to a core with its own io_uring
    /// (default: one per CPU).
    #[arg(long)]
    workers: Option<usize>,
    /// Do not pin workers to cores.
    #[arg(long)]
    no_pin: bool,
    /// How bytes move: splice (zero-copy, through pooled pipes), copy
    /// (read/send), ring (multishot receive into provided buffers and send
    /// from them, no syscall per message) or auto (each direction on the
    /// ring while its messages are small, on splice for bulk).
    #[arg(long, value_enum, default_value_t = RelayMode::Auto)]
    relay: RelayMode,
    /// Dial timeout of each connect attempt, comma separated; the number of
    /// attempts is bounded by the endpoints available (at most 8).
    #[arg(long, value_delimiter = ',', value_parser = humantime::parse_duration, default_value = "250ms,500ms,1s,2s")]
    connect_timeouts: Vec<Duration>,
    /// How a service port picks endpoints when it has no
    /// `ringport.io/scheduler` annotation: rr, random, lc, p2c, sh, maglev.
    #[arg(long, default_value_t = Scheduler::Rr)]
    scheduler: Scheduler,
    /// This node's name, for `Local` traffic policies and topology
    /// (default: the hostname).
    #[arg(long, env = "NODE_NAME", alias = "hostname-override")]
    node_name: Option<String>,
    /// This node's zone, for `PreferSameZone` and zone hints (default,
    /// with --source kube: the Node's topology.kubernetes.io/zone label,
    /// followed live).
    #[arg(long)]
    zone: Option<String>,
    /// Consecutive connect failures that eject an endpoint for a while
    /// (0: never eject).
    #[arg(long, default_value_t = 3)]
    eject_after: u32,
    /// The first ejection's length; each further one doubles it, up to
    /// --eject-max.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "1s")]
    eject_backoff: Duration,
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30s")]
    eject_max: Duration,
    /// A UDP flow idle this long in both directions is closed (see
    /// docs/udp.md for the choice of default).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30s")]
    udp_timeout: Duration,
    /// Most UDP flows at once, over all workers; at the cap the least
    /// recently active flow is closed first.
    #[arg(long, default_value_t = 8192)]
    udp_max_flows: usize,
    /// How long open connections may finish after SIGTERM or SIGINT; those
    /// still open then are reset (RST), so a cut-off transfer never looks
    /// complete.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    drain_timeout: Duration,
    /// A TCP connection that moves no byte either way this long is reset
    /// (0: never). See docs/architecture.md for the choice of default.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "1h")]
    tcp_idle_timeout: Duration,
    /// Most TCP connections open at once, over all workers (0: no cap),
    /// split evenly among them; a worker at its share stops accepting, so
    /// new clients wait in the kernel's backlog and are served as others
    /// close. Must be at least --workers.
    #[arg(long, default_value_t = 0)]
    max_connections: usize,
    /// CIDRs of the load balancers that may send a PROXY header to ports
    /// with `ringport.io/accept-proxy-protocol`, comma separated; a
    /// connection from any other peer is reset unread. Unset: any peer
    /// may, and so can name any client (see docs/proxy-protocol.md).
    #[arg(long, value_delimiter = ',')]
    proxy_protocol_trusted_cidrs: Vec<IpNet>,
    /// Fault injection for tests: each worker fails once it has accepted
    /// this many connections.
    #[arg(long, hide = true)]
    fail_worker_after_accepts: Option<u64>,
    /// Where /healthz and /livez are served.
    #[arg(long, default_value = "0.0.0.0:10256")]
    healthz_bind_address: SocketAddr,
    /// Where /readyz, /metrics and /debug/snapshot are served.
    #[arg(long, default_value = DEFAULT_METRICS_ADDRESS)]
    metrics_bind_address: SocketAddr,
    /// How cluster-IP traffic reaches the proxy ports: nft, iptables, none
    /// (the edge proxy), or auto (nft if it works, else iptables, else
    /// none). Default: none for --source file, auto for --source kube.
    #[arg(long, value_enum)]
    redirect: Option<RedirectMode>,
    /// Per-service-port series on /metrics: full (about 26 per TCP port,
    /// 11 per UDP port), summary (4 per TCP port: connections and bytes; 5
    /// per UDP port: bytes, flows and datagrams; the rest summed) or off
    /// (everything summed over all service ports).
    #[arg(long, value_enum, default_value = "full")]
    per_service_metrics: PortDetail,
    /// Connect to endpoints on this node from the client's own address
    /// (IP_TRANSPARENT and policy routing; docs/source-ip.md). A Service
    /// opts out with `ringport.io/source-ip: proxy`.
    #[arg(long)]
    transparent: bool,
    /// The packet mark that hands endpoints' replies to transparent
    /// sockets (and the ip rule's fwmark); default 0x1000.
    #[arg(long, value_parser = parse_mark, hide_default_value = true,
          default_value_t = ringport::redirect::transparent::DEFAULT_MARK)]
    transparent_mark: u32,
    /// Unix socket through which a running ringport hands its listening
    /// sockets to one started later with the same path, then drains and
    /// exits: an upgrade refuses no connection (see docs/node-agent.md).
    /// `none`: bind afresh, hand nothing over. Default:
    /// /run/ringport/handover-<network namespace>-<health port>.sock.
    #[arg(long)]
    handover_socket: Option<PathBuf>,
    /// How long a new instance waits for each answer of the old one before
    /// it binds afresh.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5s")]
    handover_timeout: Duration,
    /// Once handed over and drained, wait for SIGTERM instead of exiting
    /// (for a DaemonSet: a container that exits is restarted, and would
    /// take the sockets back).
    #[arg(long)]
    wait_after_handover: bool,
}

fn main() -> ExitCode {
    // Before the first large allocation.
    ringport::memory::no_huge_pages();
    // Before clap: a kube-proxy flag gets its ringport equivalent, not
    // clap's bare "unexpected argument".
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if let Err(e) = ringport::compat::check_args(&args) {
        eprintln!("ringport: {e}");
        return ExitCode::from(2);
    }
    let cli = Cli::parse_from(args);
    init_logging(&cli.log, matches!(cli.command, Some(Command::Check { .. })));
    match main_inner(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ringport: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Logs go to stderr, as text (coloured on a terminal) or JSON lines.
/// `check` prints its findings itself, so the manifest loader's warnings
/// are not logged a second time there.
fn init_logging(log: &LogArgs, check: bool) {
    let mut filter = match (&log.log_level, log.verbose) {
        (Some(level), _) => level.clone(),
        (None, 1) => "debug".into(),
        (None, 2..) => "trace".into(),
        (None, 0) => std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
    };
    if check {
        filter.push_str(",ringport::config=error");
    }
    let filter = tracing_subscriber::EnvFilter::try_new(&filter).unwrap_or_else(|e| {
        eprintln!("ringport: ignoring the log filter {filter:?} ({e}); logging at info");
        tracing_subscriber::EnvFilter::new("info")
    });
    let fmt = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match log.log_format {
        LogFormat::Json => fmt.json().init(),
        LogFormat::Text => fmt.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())).init(),
    }
}

fn main_inner(cli: Cli) -> anyhow::Result<ExitCode> {
    let command = match (cli.cleanup, cli.command) {
        (true, _) => Command::Cleanup,
        (false, Some(c)) => c,
        (false, None) => anyhow::bail!("no command given; see `ringport --help`"),
    };
    match command {
        Command::Run(args) => {
            let opts = args.options()?;
            let handles = Handles::new(opts.workers.workers);
            handles.metrics.set_detail(args.per_service_metrics);
            ringport::run::run(opts, handles)?;
        }
        Command::Demo(args) => {
            let mut opts = args.options()?;
            anyhow::ensure!(matches!(opts.source, SourceChoice::File), "demo serves its own manifests");
            opts.config = ringport::demo::example_path(&opts.config)?;
            // The demo is for this machine only: listen on loopback alone.
            let loopback = IpAddr::V4(Ipv4Addr::LOCALHOST);
            opts.listen.bind_address = loopback;
            opts.listen.nodeport_addresses = vec![IpNet::new(loopback, 8)?];
            opts.healthz_bind_address.set_ip(loopback);
            opts.metrics_bind_address.set_ip(loopback);
            opts.redirect = RedirectMode::None;
            opts.handover = None;
            ringport::demo::demo(opts)?;
        }
        Command::Check { source, listen, workers } => {
            let workers =
                workers.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
            return check(&source.config, &listen.check_options(workers.max(1)));
        }
        Command::Status { metrics_bind_address, output } => {
            let status = match ringport::status::fetch(metrics_bind_address, Duration::from_secs(3)) {
                Ok(s) => s,
                Err(e) => {
                    // One line: what failed and why.
                    eprintln!("ringport: {:#}", anyhow::Error::from(e));
                    return Ok(ExitCode::FAILURE);
                }
            };
            match output {
                Output::Table => stdout(|w| w.write_all(ringport::status::render(&status).as_bytes()))?,
                Output::Json => {
                    let json = serde_json::to_string_pretty(&status)?;
                    stdout(|w| writeln!(w, "{json}"))?
                }
            }
        }
        Command::Completions { shell } => {
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "ringport", &mut script);
            stdout(|w| w.write_all(&script))?;
        }
        Command::Man => stdout(|w| clap_mangen::Man::new(Cli::command()).render(w))?,
        Command::Cleanup => {
            let cleaned = ringport::redirect::cleanup();
            if cleaned.nft_table {
                println!("removed nft table inet ringport");
            }
            if cleaned.iptables_chains {
                println!("removed RINGPORT-* iptables chains and their jumps");
            }
            for addr in &cleaned.proxy_addresses {
                println!("removed the proxy address {addr} from lo");
            }
            for addr in &cleaned.proxy_routes {
                println!("removed the local route of the proxy address {addr} from lo");
            }
            if cleaned.transparent_routing {
                println!("removed the transparent-mode ip rule and route table");
            }
            if cleaned.is_empty() && cleaned.errors.is_empty() {
                println!("nothing to remove");
            }
            if !cleaned.errors.is_empty() {
                for e in cleaned.errors {
                    eprintln!("ringport cleanup: {:#}", anyhow::Error::from(e));
                }
                return Ok(ExitCode::FAILURE);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Write to stdout; a reader that went away (`ringport man | head`) is not
/// an error, and never a panic.
fn stdout(write: impl FnOnce(&mut dyn Write) -> std::io::Result<()>) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    match write(&mut out).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other,
    }
}

fn check(path: &std::path::Path, listen: &ListenOptions) -> anyhow::Result<ExitCode> {
    ringport::compat::check_config(path)?;
    let udp_max_flows = WorkerConfig::default().udp_max_flows;
    let budget = ringport::budget::Budget::of_this_process(listen.workers, udp_max_flows);
    let report = ringport::check::check_path(path, listen, &budget);
    for w in &report.warnings {
        eprintln!("warning: {w}");
    }
    for e in &report.errors {
        eprintln!("{e}");
    }
    if !report.ok() {
        return Ok(ExitCode::FAILURE);
    }
    print!("{}", report.table);
    println!("{} service ports OK in {}", report.service_ports, path.display());
    Ok(ExitCode::SUCCESS)
}
