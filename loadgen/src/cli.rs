//! Command line: `loadgen send | sink | bench`.
//!
//! Usage errors are one line on stderr and exit status 2; runtime failures (nothing listens on
//! the target, port in use, mailguard missing) are one line and status 1. `--help` and
//! `--version` print normally and exit 0.

use std::io::{self, Write as _};
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use clap::error::ErrorKind;
use clap::{Args, Parser, Subcommand};

use crate::bench::{self, BenchConfig};
use crate::message::{new_run_id, valid_run_id};
use crate::send::{self, Limit, SendConfig};
use crate::sink::{self, Sink, SinkConfig};
use crate::workers::Flavor;

#[derive(Parser, Debug)]
#[command(
    name = "loadgen",
    version,
    about = "SMTP load generator and verifying sink, bundled with mailguard",
    subcommand_required = true
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Deliver messages to an SMTP server and report throughput and latency.
    Send(SendArgs),
    /// Run an SMTP sink that accepts (and with --verify, checks) every message.
    Sink(SinkArgs),
    /// Compare the workload direct to a sink and through mailguard.
    Bench(BenchArgs),
    /// Plain TCP relay with mailguard's command line (for tests).
    #[command(hide = true)]
    Relay(RelayArgs),
}

#[derive(Args, Debug)]
struct SendArgs {
    /// Server to deliver to (host:port).
    #[arg(long, value_name = "ADDR", value_parser = parse_addr)]
    target: SocketAddr,
    /// Concurrent sessions.
    #[arg(long, value_name = "N", default_value_t = 10,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    sessions: u32,
    /// Messages in all [default: 1000 unless --duration].
    #[arg(long, value_name = "M", conflicts_with = "duration",
          value_parser = clap::value_parser!(u64).range(1..))]
    messages: Option<u64>,
    /// Keep starting messages for this many seconds instead of a count.
    #[arg(long, value_name = "S", value_parser = parse_seconds)]
    duration: Option<f64>,
    /// Body size in bytes (text lines; at least one ~50-byte trailer line).
    #[arg(long, value_name = "BYTES", default_value_t = 1024,
          value_parser = clap::value_parser!(u64).range(0..=(256 << 20)))]
    size: u64,
    /// Recipients per message.
    #[arg(long, value_name = "R", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    recipients: u32,
    /// Messages per connection before QUIT (1 = a new connection per message).
    #[arg(long, value_name = "K", default_value_t = 1,
          value_parser = clap::value_parser!(u64).range(1..))]
    per_session: u64,
    /// Send MAIL, RCPT and DATA in one write when the server offers PIPELINING (RFC 2920).
    #[arg(long)]
    pipelining: bool,
    /// Open loop: start messages at this fixed rate (latency corrected for coordinated omission).
    #[arg(long, value_name = "MSGS_PER_S", value_parser = parse_positive)]
    rate: Option<f64>,
    /// Print one JSON summary on stdout instead of the text report.
    #[arg(long)]
    json: bool,
    /// Stop and report after this many seconds, whatever is still running.
    #[arg(long, value_name = "S", default_value_t = 300.0, value_parser = parse_seconds)]
    timeout: f64,
    /// Sender threads (each runs a share of the sessions on its own runtime).
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u16).range(1..=256))]
    threads: u16,
    /// Envelope sender and From: address.
    #[arg(long, value_name = "ADDR", default_value = "sender@loadgen.example")]
    from: String,
    /// Envelope recipient and To: address (local+i@domain for several recipients).
    #[arg(long, value_name = "ADDR", default_value = "rcpt@loadgen.example")]
    to: String,
    /// EHLO name.
    #[arg(long, value_name = "NAME", default_value = "loadgen.example")]
    helo: String,
    /// Run id stamped into message ids ([0-9a-z]{1,32}; default: random).
    #[arg(long, value_name = "ID", value_parser = parse_run_id)]
    run_id: Option<String>,
    #[arg(long, hide = true, value_enum, default_value_t = Flavor::Current)]
    runtime: Flavor,
}

#[derive(Args, Debug)]
struct SinkArgs {
    /// Address to listen on (host:port; port 0 picks a free port, printed on stderr).
    #[arg(long, value_name = "ADDR", value_parser = parse_addr)]
    listen: SocketAddr,
    /// Worker threads (one runtime and one SO_REUSEPORT listener each).
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u16).range(1..=256))]
    threads: u16,
    /// Check each message's id and checksum; report duplicated, corrupted (and lost with --expect).
    #[arg(long)]
    verify: bool,
    /// Number of messages the sender will deliver: lost = expected - distinct delivered.
    #[arg(long, value_name = "N", requires = "verify")]
    expect: Option<u64>,
    /// Delay every flush of replies by this many milliseconds (a slow upstream).
    #[arg(long, value_name = "MS", default_value_t = 0,
          value_parser = clap::value_parser!(u64).range(0..=600_000))]
    delay_ms: u64,
    /// Print the counters as JSON (on SIGUSR1 and at exit).
    #[arg(long)]
    json: bool,
    /// Exit (printing the counters) after this many seconds; default: run until SIGTERM/SIGINT.
    #[arg(long, value_name = "S", value_parser = parse_seconds)]
    timeout: Option<f64>,
    /// Host name in the banner and EHLO reply.
    #[arg(long, value_name = "NAME", default_value = "loadgen-sink")]
    hostname: String,
    #[arg(long, hide = true, value_enum, default_value_t = Flavor::Current)]
    runtime: Flavor,
}

#[derive(Args, Debug)]
struct BenchArgs {
    /// mailguard binary [default: `mailguard` next to the loadgen executable].
    #[arg(long, value_name = "PATH")]
    mailguard: Option<PathBuf>,
    /// Messages per measured run.
    #[arg(long, value_name = "M", default_value_t = 5000,
          value_parser = clap::value_parser!(u64).range(1..))]
    messages: u64,
    /// Concurrent sessions.
    #[arg(long, value_name = "N", default_value_t = 10,
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    sessions: u32,
    /// Body size in bytes.
    #[arg(long, value_name = "BYTES", default_value_t = 1024,
          value_parser = clap::value_parser!(u64).range(0..=(64 << 20)))]
    size: u64,
    /// Messages per connection in the persistent-session workload.
    #[arg(long, value_name = "K", default_value_t = 100,
          value_parser = clap::value_parser!(u64).range(1..))]
    per_session: u64,
    /// Pipeline commands (RFC 2920) in every run.
    #[arg(long)]
    pipelining: bool,
    /// Time cap per run, in seconds.
    #[arg(long, value_name = "S", default_value_t = 120.0, value_parser = parse_seconds)]
    timeout: f64,
    /// Print one JSON document on stdout instead of the table.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct RelayArgs {
    #[arg(long, value_parser = parse_addr)]
    listen: SocketAddr,
    #[arg(long, value_parser = parse_addr)]
    upstream: SocketAddr,
}

fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    match s.to_socket_addrs() {
        Ok(mut it) => it
            .next()
            .ok_or_else(|| format!("'{s}' resolves to no address")),
        Err(e) => Err(format!("'{s}' is not host:port ({e})")),
    }
}

fn parse_positive(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(x) if x.is_finite() && x > 0.0 => Ok(x),
        _ => Err(format!("'{s}' is not a positive number")),
    }
}

fn parse_seconds(s: &str) -> Result<f64, String> {
    match parse_positive(s) {
        Ok(x) if x <= 7.0 * 86_400.0 => Ok(x),
        _ => Err(format!(
            "'{s}' is not a number of seconds between 0 and 604800"
        )),
    }
}

fn parse_run_id(s: &str) -> Result<String, String> {
    if valid_run_id(s) {
        Ok(s.to_string())
    } else {
        Err(format!("'{s}' is not 1 to 32 characters of [0-9a-z]"))
    }
}

/// Parses the command line and runs it; returns the exit status.
pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            return match e.kind() {
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
                    let _ = e.print();
                    0
                }
                _ => {
                    let text = e.render().to_string();
                    let first = text.lines().next().unwrap_or("invalid command line");
                    let first = first.strip_prefix("error: ").unwrap_or(first);
                    eprintln!("loadgen: {first} (see 'loadgen --help')");
                    2
                }
            };
        }
    };
    match cli.cmd {
        Cmd::Send(a) => send_main(a),
        Cmd::Sink(a) => sink_main(a),
        Cmd::Bench(a) => bench_main(a),
        Cmd::Relay(a) => match crate::relay::run(a.listen, a.upstream) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!(
                    "loadgen relay: cannot relay {} to {}: {e}",
                    a.listen, a.upstream
                );
                1
            }
        },
    }
}

fn send_main(a: SendArgs) -> i32 {
    let limit = match (a.messages, a.duration) {
        (_, Some(d)) => Limit::Duration(Duration::from_secs_f64(d)),
        (Some(m), None) => Limit::Count(m),
        (None, None) => Limit::Count(1000),
    };
    let cfg = SendConfig {
        target: a.target,
        sessions: a.sessions,
        limit,
        size: a.size as usize,
        recipients: a.recipients,
        per_session: a.per_session,
        pipelining: a.pipelining,
        rate: a.rate,
        timeout: Duration::from_secs_f64(a.timeout),
        threads: usize::from(a.threads),
        flavor: a.runtime,
        run_id: a.run_id.unwrap_or_else(new_run_id),
        from: a.from,
        to: a.to,
        helo: a.helo,
        progress: true,
    };
    let report = match send::run(&cfg) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("loadgen send: cannot start: {e}");
            return 1;
        }
    };
    let mut out = io::stdout().lock();
    let printed = if a.json {
        serde_json::to_writer(&mut out, &report)
            .map_err(io::Error::from)
            .and_then(|()| writeln!(out))
    } else {
        send::print_human(&report, &mut out)
    };
    drop(out);
    if let Err(e) = printed {
        eprintln!("loadgen send: cannot write the report: {e}");
        return 1;
    }
    if let Some(f) = &report.fatal {
        eprintln!("loadgen send: {f}");
        return 1;
    }
    if report.clean() {
        0
    } else {
        1
    }
}

fn print_sink(r: &sink::SinkReport, json: bool) {
    let mut out = io::stdout().lock();
    let _ = if json {
        serde_json::to_writer(&mut out, r)
            .map_err(io::Error::from)
            .and_then(|()| writeln!(out))
    } else {
        sink::print_human(r, &mut out)
    };
    let _ = out.flush();
}

fn sink_main(a: SinkArgs) -> i32 {
    let cfg = SinkConfig {
        listen: a.listen,
        threads: usize::from(a.threads),
        verify: a.verify,
        delay: Duration::from_millis(a.delay_ms),
        hostname: a.hostname,
        flavor: a.runtime,
        expect: a.expect,
    };
    let rt = match crate::workers::current_thread() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("loadgen sink: cannot start a runtime: {e}");
            return 1;
        }
    };
    let json = a.json;
    let timeout = a.timeout;
    rt.block_on(async move {
        use tokio::signal::unix::{signal, SignalKind};
        // Handlers first: a SIGTERM right after "listening" must not kill us unreported.
        let sigs = (
            signal(SignalKind::user_defined1()),
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        );
        let (Ok(mut usr1), Ok(mut term), Ok(mut int)) = sigs else {
            eprintln!("loadgen sink: cannot install signal handlers");
            return 1;
        };
        let sink = match Sink::start(cfg.clone()) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("loadgen sink: cannot listen on {}: {e}", cfg.listen);
                return 1;
            }
        };
        eprintln!(
            "loadgen sink: listening on {} ({} thread{}, verify {})",
            sink.addr(),
            cfg.threads,
            if cfg.threads == 1 { "" } else { "s" },
            if cfg.verify { "on" } else { "off" }
        );
        let cap = tokio::time::sleep(
            timeout.map_or(Duration::from_secs(86_400 * 365), Duration::from_secs_f64),
        );
        tokio::pin!(cap);
        loop {
            tokio::select! {
                _ = usr1.recv() => print_sink(&sink.report(), json),
                _ = term.recv() => break,
                _ = int.recv() => break,
                _ = &mut cap => break,
            }
        }
        print_sink(&sink.report(), json);
        0
    })
}

fn bench_main(a: BenchArgs) -> i32 {
    let cfg = BenchConfig {
        mailguard: a.mailguard,
        messages: a.messages,
        sessions: a.sessions,
        size: a.size as usize,
        per_session: a.per_session,
        pipelining: a.pipelining,
        timeout: Duration::from_secs_f64(a.timeout),
        json: a.json,
    };
    let report = match bench::run(&cfg) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("loadgen bench: {e}");
            return 1;
        }
    };
    let mut out = io::stdout().lock();
    let _ = if cfg.json {
        serde_json::to_writer(&mut out, &report)
            .map_err(io::Error::from)
            .and_then(|()| writeln!(out))
    } else {
        bench::print_table(&report, &mut out)
    };
    if report.verified {
        0
    } else {
        1
    }
}
