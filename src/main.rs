//! The `mailguard` binary: reads the command line, the config file and the policy, binds the
//! listener (and the metrics port), starts the workers, hands signals to a control thread and
//! waits for the workers to finish. `mailguard check` validates and prints instead.
//!
//! Every startup error is one line on stderr and a non-zero exit (2 for usage, 1 otherwise);
//! logging starts only once startup succeeded, so nothing else is printed before.

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use clap::{Args, Parser, Subcommand};
use parking_lot::Mutex;

use mailguard::config::{self, describe, LogFormat, LogLevel, PolicySource, RingTuning, Setup};
use mailguard::control::{self, Control, Notifier, Reloader};
use mailguard::guard::{Connections, LivePolicy, SessionFactory};
use mailguard::io::{self, RingConfig};
use mailguard::metrics::{self, Sources};
use mailguard::tally::EngineTotals;

/// Drain timeout without `--drain-timeout` or `drain_timeout`.
const DEFAULT_DRAIN: Duration = Duration::from_secs(30);

/// An SMTP inspection proxy: relays each client's SMTP dialogue to the upstream MTA and
/// enforces a policy on it.
#[derive(Debug, Parser)]
#[command(name = "mailguard", version, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Validate a config or policy file without starting; print the effective settings and
    /// policy (every key with its value and default). Exit 0 if valid, 1 if not.
    Check(CheckArgs),
}

#[derive(Debug, Args)]
struct CheckArgs {
    /// Config file (TOML) to validate, with its policy.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Policy file (TOML) to validate; wins over the config file's policy.
    #[arg(long, value_name = "FILE")]
    policy: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct RunArgs {
    /// Config file (TOML) with any of the settings below and the policy; flags win over it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Address to accept SMTP clients on: host:port or [v6]:port.
    #[arg(long, value_name = "ADDR", value_parser = config::resolve)]
    listen: Option<SocketAddr>,
    /// Expect a PROXY protocol header (v1 or v2, from haproxy or a load balancer) at the
    /// start of every connection, and take the client's address from it.
    #[arg(long)]
    proxy_protocol: bool,
    /// The mail server to relay to: host:port or [v6]:port.
    #[arg(long, value_name = "ADDR", value_parser = config::resolve)]
    upstream: Option<SocketAddr>,
    /// Policy file (TOML). Without it (and without a policy in the config) defaults apply.
    #[arg(long, value_name = "FILE")]
    policy: Option<PathBuf>,
    /// Worker threads, each with its own io_uring ring [default: available cores].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=1024))]
    threads: Option<u16>,
    /// Serve Prometheus metrics at http://ADDR/metrics [default: off].
    #[arg(long, value_name = "ADDR", value_parser = config::resolve)]
    metrics: Option<SocketAddr>,
    /// Log format: human or json [default: human].
    #[arg(long, value_name = "FORMAT")]
    log_format: Option<LogFormat>,
    /// Most detailed log level: error, warn, info, debug (adds one line per policy decision)
    /// or trace [default: info].
    #[arg(long, value_name = "LEVEL")]
    log_level: Option<LogLevel>,
    /// Seconds open sessions get to finish after SIGTERM/SIGINT [default: 30].
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(0..=config::MAX_DRAIN_SECS))]
    drain_timeout: Option<u64>,
}

/// Why the process exits non-zero.
enum Failure {
    /// Bad or missing arguments: exit 2.
    Usage(String),
    /// Anything else: exit 1.
    Error(String),
}

impl<E: std::fmt::Display> From<E> for Failure {
    fn from(e: E) -> Failure {
        Failure::Error(e.to_string())
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help and --version
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            let rendered = e.to_string();
            let first = rendered.lines().next().unwrap_or("invalid arguments");
            eprintln!("mailguard: {}", first.trim_start_matches("error: "));
            return ExitCode::from(2);
        }
    };
    let outcome = match cli.command {
        Some(Command::Check(args)) => check(args),
        None => run(cli.run),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(message)) => {
            eprintln!("mailguard: {message}");
            ExitCode::from(2)
        }
        Err(Failure::Error(message)) => {
            eprintln!("mailguard: {message}");
            ExitCode::FAILURE
        }
    }
}

/// `mailguard check`: validates, prints the effective settings (as comments) and the
/// effective policy (as a policy file), so the output itself parses as a policy.
fn check(args: CheckArgs) -> Result<(), Failure> {
    let setup = args.config.as_deref().map(Setup::load).transpose()?;
    let source = Reloader::source(args.policy.as_ref(), setup.as_ref());
    let policy = source.load()?;
    let mut out = String::new();
    if let (Some(path), Some(s)) = (&args.config, &setup) {
        out.push_str(&format!("# config {} is valid\n", path.display()));
        out.push_str(&describe_setup(s));
    }
    out.push_str(&format!("# policy from {} is valid\n", source.describe()));
    out.push_str(&describe::render(&policy));
    print!("{out}");
    Ok(())
}

fn describe_setup(s: &Setup) -> String {
    let addr = |a: Option<SocketAddr>, default: &str| {
        a.map_or_else(|| default.to_string(), |a| format!("\"{a}\""))
    };
    let lines = [
        format!("listen = {}", addr(s.listen, "unset (--listen required)")),
        format!("proxy_protocol = {}", s.proxy_protocol.unwrap_or(false)),
        format!(
            "upstream = {}",
            addr(s.upstream, "unset (--upstream required)")
        ),
        format!(
            "threads = {}",
            s.threads
                .map_or_else(|| "unset (available cores)".to_string(), |t| t.to_string())
        ),
        format!("metrics = {}", addr(s.metrics, "unset (off)")),
        format!(
            "log_format = \"{}\"",
            s.log_format.unwrap_or(LogFormat::Human)
        ),
        format!("log_level = \"{}\"", s.log_level.unwrap_or(LogLevel::Info)),
        format!(
            "drain_timeout = {}",
            s.drain_timeout.unwrap_or(DEFAULT_DRAIN).as_secs()
        ),
    ];
    lines.iter().map(|l| format!("#   {l}\n")).collect()
}

/// The settings in force: flags over the config file over defaults.
struct Effective {
    listen: SocketAddr,
    proxy_protocol: bool,
    upstream: SocketAddr,
    threads: usize,
    metrics: Option<SocketAddr>,
    log_format: LogFormat,
    log_level: LogLevel,
    drain_timeout: Duration,
    source: PolicySource,
    ring: RingTuning,
}

fn effective(args: &RunArgs, setup: Option<&Setup>) -> Result<Effective, Failure> {
    let missing = |flag: &str, key: &str| {
        Failure::Usage(format!(
            "no {key} address: give --{flag} ADDR or `{key}` in the config file"
        ))
    };
    let listen = args
        .listen
        .or(setup.and_then(|s| s.listen))
        .ok_or_else(|| missing("listen", "listen"))?;
    let upstream = args
        .upstream
        .or(setup.and_then(|s| s.upstream))
        .ok_or_else(|| missing("upstream", "upstream"))?;
    let threads = args.threads.or(setup.and_then(|s| s.threads)).map_or_else(
        || std::thread::available_parallelism().map_or(1, |n| n.get()),
        usize::from,
    );
    Ok(Effective {
        listen,
        proxy_protocol: args.proxy_protocol
            || setup.and_then(|s| s.proxy_protocol).unwrap_or(false),
        upstream,
        threads,
        metrics: args.metrics.or(setup.and_then(|s| s.metrics)),
        log_format: args
            .log_format
            .or(setup.and_then(|s| s.log_format))
            .unwrap_or(LogFormat::Human),
        log_level: args
            .log_level
            .or(setup.and_then(|s| s.log_level))
            .unwrap_or(LogLevel::Info),
        drain_timeout: args
            .drain_timeout
            .map(Duration::from_secs)
            .or(setup.and_then(|s| s.drain_timeout))
            .unwrap_or(DEFAULT_DRAIN),
        source: Reloader::source(args.policy.as_ref(), setup),
        ring: setup.map(|s| s.ring).unwrap_or_default(),
    })
}

/// The ring sizes: built-in defaults, overridden by the config file's `[ring]` table.
fn ring_config(eff: &Effective) -> RingConfig {
    let mut config = RingConfig::new(eff.threads, eff.upstream);
    config.ring_entries = eff.ring.entries.unwrap_or(config.ring_entries);
    config.buf_count = eff.ring.buffers.unwrap_or(config.buf_count);
    config.buf_size = eff.ring.buffer_size.unwrap_or(config.buf_size);
    config
}

fn bind_metrics(addr: Option<SocketAddr>) -> Result<Option<TcpListener>, Failure> {
    addr.map(|a| {
        TcpListener::bind(a).map_err(|e| {
            let reason = e.to_string();
            let reason = reason.split(" (os error").next().unwrap_or(&reason);
            Failure::Error(format!("cannot serve metrics on {a}: {reason}"))
        })
    })
    .transpose()
}

fn run(args: RunArgs) -> Result<(), Failure> {
    let setup = args.config.as_deref().map(Setup::load).transpose()?;
    let eff = effective(&args, setup.as_ref())?;
    let policy = eff.source.load()?;
    io::probe()?;
    // Best effort: the hard limit (systemd's LimitNOFILE) is what counts.
    let nofile = io::raise_nofile_limit();
    let listener = io::bind(eff.listen)?;
    let metrics_listener = bind_metrics(eff.metrics)?;
    let (signals, signal_handle) =
        control::signals().map_err(|e| format!("cannot watch signals: {e}"))?;
    logging_init(&eff);
    let live = LivePolicy::new(policy);
    let connections = Arc::new(Connections::default());
    let totals: Vec<Arc<Mutex<EngineTotals>>> = (0..eff.threads)
        .map(|_| Arc::new(Mutex::new(EngineTotals::default())))
        .collect();
    let (factory_live, factory_totals, upstream) =
        (Arc::clone(&live), totals.clone(), eff.upstream);
    let factory_connections = Arc::clone(&connections);
    let proxy_protocol = eff.proxy_protocol;
    let server = io::serve(listener, ring_config(&eff), move |i| {
        SessionFactory::new(Arc::clone(&factory_live), Arc::clone(&factory_connections))
            .with_upstream(upstream)
            .with_proxy_protocol(proxy_protocol)
            .with_totals(Arc::clone(&factory_totals[i]))
    })?;
    let sources = Sources {
        ring: server.stats_handle(),
        engine: totals,
        live: Arc::clone(&live),
        connections,
        server: server.handle(),
        started: SystemTime::now(),
    };
    if let Some(l) = metrics_listener {
        metrics::spawn(l, sources.clone()).map_err(|e| format!("cannot start metrics: {e}"))?;
    }
    tracing::info!(
        listen = %eff.listen,
        proxy_protocol = eff.proxy_protocol,
        upstream = %eff.upstream,
        workers = eff.threads,
        metrics = %eff.metrics.map_or_else(|| "off".to_string(), |m| m.to_string()),
        policy = %eff.source.describe(),
        policy_generation = live.generation(),
        open_files_limit = nofile.map_or(0, |n| n),
        "mailguard {} listening on {}",
        env!("CARGO_PKG_VERSION"),
        eff.listen
    );
    let notifier = Notifier::from_env();
    notifier.notify("READY=1");
    let control = Control {
        signals,
        server: server.handle(),
        reloader: Reloader::new(args.config.clone(), args.policy.clone(), setup, live),
        drain_timeout: eff.drain_timeout,
        sources,
        notifier,
    };
    let control_thread = std::thread::Builder::new()
        .name("mailguard-control".to_string())
        .spawn(move || control.run())
        .map_err(|e| format!("cannot start the control thread: {e}"))?;
    let result = server.join();
    signal_handle.close();
    let _ = control_thread.join();
    match result {
        Ok(()) => {
            tracing::info!("all sessions ended, exiting");
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

fn logging_init(eff: &Effective) {
    mailguard::logging::init(eff.log_format, eff.log_level);
}
