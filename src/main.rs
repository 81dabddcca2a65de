//! The `mailguard` binary: reads the command line and the policy, binds the listener, starts
//! the workers and becomes the control thread (signals). Every startup error is one line on
//! stderr and a non-zero exit.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use mailguard::config::Policy;
use mailguard::guard::{Connections, LivePolicy, SessionFactory};
use mailguard::io::{self, RingConfig};

/// An SMTP inspection proxy: relays each client's SMTP dialogue to the upstream MTA and
/// enforces a policy on it.
#[derive(Debug, Parser)]
#[command(name = "mailguard", version)]
struct Cli {
    /// Address to accept SMTP clients on: host:port or [v6]:port.
    #[arg(long, value_name = "ADDR", value_parser = parse_addr)]
    listen: SocketAddr,
    /// The mail server to relay to: host:port or [v6]:port.
    #[arg(long, value_name = "ADDR", value_parser = parse_addr)]
    upstream: SocketAddr,
    /// Policy file (TOML). Without it the built-in defaults apply.
    #[arg(long, value_name = "FILE")]
    policy: Option<PathBuf>,
    /// Worker threads, each with its own io_uring ring [default: available cores].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=1024))]
    threads: Option<u16>,
}

fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    let mut addrs = s
        .to_socket_addrs()
        .map_err(|e| format!("expected host:port or [v6]:port ({e})"))?;
    addrs
        .next()
        .ok_or_else(|| "the name resolves to no address".to_string())
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
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("mailguard: {message}");
            ExitCode::FAILURE
        }
    }
}

fn load_policy(path: Option<&PathBuf>) -> Result<Policy, String> {
    match path {
        Some(p) => Policy::load(p).map_err(|e| e.to_string()),
        None => Ok(Policy::default()),
    }
}

fn run(cli: Cli) -> Result<(), String> {
    let policy = load_policy(cli.policy.as_ref())?;
    io::probe().map_err(|e| e.to_string())?;
    let listener = io::bind(cli.listen).map_err(|e| e.to_string())?;
    let threads = cli.threads.map_or_else(
        || std::thread::available_parallelism().map_or(1, |n| n.get()),
        usize::from,
    );
    let live = LivePolicy::new(policy);
    let signals = Signals::new([SIGHUP, SIGINT, SIGTERM])
        .map_err(|e| format!("cannot watch signals: {e}"))?;
    let config = RingConfig::new(threads, cli.upstream);
    let factory_policy = Arc::clone(&live);
    let connections = Arc::new(Connections::default());
    let server = io::serve(listener, config, move |_| {
        SessionFactory::new(Arc::clone(&factory_policy), Arc::clone(&connections))
    })
    .map_err(|e| e.to_string())?;
    eprintln!(
        "mailguard: listening on {}, upstream {}, {threads} worker(s), policy generation {}",
        cli.listen,
        cli.upstream,
        live.generation()
    );
    control(signals, &live, cli.policy.as_ref());
    server.stop();
    server.join().map_err(|e| e.to_string())
}

/// The control thread: reloads the policy on SIGHUP, returns on SIGINT or SIGTERM.
fn control(mut signals: Signals, live: &LivePolicy, path: Option<&PathBuf>) {
    for signal in signals.forever() {
        match signal {
            SIGHUP => match load_policy(path) {
                Ok(policy) => {
                    let generation = live.replace(policy);
                    eprintln!("mailguard: policy reloaded, generation {generation} now live");
                }
                Err(message) => eprintln!("mailguard: reload refused, old policy stays: {message}"),
            },
            _ => return,
        }
    }
}
