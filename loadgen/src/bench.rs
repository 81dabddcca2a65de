//! `loadgen bench`: the same workloads straight to a sink and through mailguard, side by side.
//!
//! One verifying sink runs in-process on an ephemeral loopback port. mailguard is spawned as a
//! child (`PATH --listen 127.0.0.1:P --upstream 127.0.0.1:SINK`), and killed (SIGTERM, then
//! SIGKILL after 3 s) by its PID only, also on early exits. Each workload runs first direct,
//! then through mailguard, each after an unrecorded warm-up of a tenth of the messages. Every
//! run has its own run id, and its acknowledged ids are checked against what the sink received:
//! the table's verdict is "nothing lost" only if every acknowledged message reached the sink
//! exactly once and intact.

use std::io::{self, BufRead, BufReader, IsTerminal};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::message::new_run_id;
use crate::send::{self, Limit, SendConfig, SendReport};
use crate::sink::{RunCheck, Sink, SinkConfig};
use crate::workers::Flavor;

/// `bench` settings.
#[derive(Clone, Debug)]
pub struct BenchConfig {
    /// mailguard binary; `None` = next to the loadgen executable.
    pub mailguard: Option<PathBuf>,
    pub messages: u64,
    pub sessions: u32,
    pub size: usize,
    /// Messages per connection of the persistent workload.
    pub per_session: u64,
    pub pipelining: bool,
    pub timeout: Duration,
    pub json: bool,
}

/// One line of the table.
#[derive(Serialize, Clone, Debug)]
pub struct Row {
    pub workload: String,
    pub target: String,
    pub per_session: u64,
    pub messages_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// mailguard's messages/s divided by direct's.
    pub ratio: Option<f64>,
    pub acknowledged: u64,
    pub failed: u64,
    pub timed_out: bool,
    #[serde(flatten)]
    pub check: RunCheck,
    #[serde(skip)]
    pub errors: String,
}

impl Row {
    fn verified(&self) -> bool {
        self.check.lost == 0
            && self.check.duplicated == 0
            && self.check.corrupted == 0
            && self.check.delivered >= self.acknowledged
    }
}

/// The whole result (`--json`).
#[derive(Serialize, Debug)]
pub struct BenchReport {
    pub mailguard: String,
    pub messages: u64,
    pub sessions: u32,
    pub body_bytes: usize,
    pub rows: Vec<Row>,
    /// Messages that reached the sink without a loadgen id (should be 0).
    pub foreign: u64,
    /// Nothing lost, duplicated or corrupted, and every message acknowledged.
    pub verified: bool,
}

/// The mailguard child; killed by PID when dropped.
struct Guard {
    child: Child,
    listen: SocketAddr,
    stderr: Arc<Mutex<Vec<String>>>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        let pid = self.child.id() as libc::pid_t;
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: kill(2) on the PID of our own child, which has not been reaped yet (so
            // the PID cannot have been reused).
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
            let until = Instant::now() + Duration::from_secs(3);
            while Instant::now() < until {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// The default mailguard path: next to this executable.
fn default_mailguard() -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot locate loadgen itself: {e}"))?;
    Ok(exe
        .parent()
        .unwrap_or_else(|| Path::new("."))
        .join("mailguard"))
}

/// A loopback port that was free a moment ago.
fn free_port() -> io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn start_guard(path: &Path, upstream: SocketAddr) -> Result<Guard, String> {
    if !path.is_file() {
        return Err(format!(
            "mailguard not found at {} (build it with `cargo build --release`, or pass --mailguard PATH)",
            path.display()
        ));
    }
    let port = free_port().map_err(|e| format!("cannot find a free loopback port: {e}"))?;
    let listen: SocketAddr = ([127, 0, 0, 1], port).into();
    let child = Command::new(path)
        .arg("--listen")
        .arg(listen.to_string())
        .arg("--upstream")
        .arg(upstream.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", path.display()))?;
    let mut guard = Guard {
        child,
        listen,
        stderr: Arc::new(Mutex::new(Vec::new())),
    };
    // Drain stderr so a chatty child never blocks on a full pipe; keep the first lines for
    // error messages.
    if let Some(err) = guard.child.stderr.take() {
        let keep = Arc::clone(&guard.stderr);
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                let mut k = keep.lock().unwrap_or_else(|e| e.into_inner());
                if k.len() < 5 {
                    k.push(line);
                }
            }
        });
    }
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(Some(status)) = guard.child.try_wait() {
            std::thread::sleep(Duration::from_millis(50)); // let the stderr thread catch up
            let first = guard.first_stderr();
            return Err(format!(
                "{} exited ({status}) before listening on {listen}{first}",
                path.display()
            ));
        }
        if TcpStream::connect_timeout(&listen, Duration::from_millis(200)).is_ok() {
            return Ok(guard);
        }
        if Instant::now() > until {
            return Err(format!(
                "{} did not listen on {listen} within 10 s{}",
                path.display(),
                guard.first_stderr()
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Guard {
    fn first_stderr(&self) -> String {
        let k = self.stderr.lock().unwrap_or_else(|e| e.into_inner());
        k.first().map(|l| format!(": {l}")).unwrap_or_default()
    }
}

/// Runs the benchmark. `Err` is a one-line setup error (mailguard missing, sink cannot bind).
pub fn run(cfg: &BenchConfig) -> Result<BenchReport, String> {
    let path = match &cfg.mailguard {
        Some(p) => p.clone(),
        None => default_mailguard()?,
    };
    let sink = Sink::start(SinkConfig {
        listen: ([127, 0, 0, 1], 0).into(),
        threads: 1,
        verify: true,
        delay: Duration::ZERO,
        hostname: "loadgen-sink".into(),
        flavor: Flavor::Current,
        expect: None,
    })
    .map_err(|e| format!("cannot start the sink on 127.0.0.1: {e}"))?;
    let guard = start_guard(&path, sink.addr())?;
    if !cfg.json {
        println!(
            "loadgen bench: {} messages per run, {} sessions, {} B bodies{}; verifying sink on {}",
            cfg.messages,
            cfg.sessions,
            cfg.size,
            if cfg.pipelining { ", pipelining" } else { "" },
            sink.addr()
        );
        println!(
            "mailguard: {} (pid {}) on {}",
            path.display(),
            guard.child.id(),
            guard.listen
        );
    }

    let base = new_run_id();
    let workloads = [
        ("new connection per message".to_string(), 1),
        (
            format!("{} messages per connection", cfg.per_session),
            cfg.per_session,
        ),
    ];
    let mut rows = Vec::new();
    let mut n = 0;
    for (name, per_session) in &workloads {
        let mut direct_rate = None;
        for (target, addr) in [("direct", sink.addr()), ("mailguard", guard.listen)] {
            let mut one = |messages: u64| -> Result<SendReport, String> {
                n += 1;
                let run = send::run(&SendConfig {
                    target: addr,
                    sessions: cfg.sessions,
                    limit: Limit::Count(messages),
                    size: cfg.size,
                    recipients: 1,
                    per_session: *per_session,
                    pipelining: cfg.pipelining,
                    rate: None,
                    timeout: cfg.timeout,
                    threads: 1,
                    flavor: Flavor::Current,
                    run_id: format!("{base}r{n}"),
                    from: "sender@bench.example".into(),
                    to: "rcpt@bench.example".into(),
                    helo: "bench.example".into(),
                    progress: !cfg.json && io::stderr().is_terminal(),
                })
                .map_err(|e| format!("cannot run the sender: {e}"))?;
                match &run.fatal {
                    Some(f) => Err(format!("{target}: {f}")),
                    None => Ok(run),
                }
            };
            let warm = one((cfg.messages / 10).max(1))?;
            let r = one(cfg.messages)?;
            let check = sink.check_run(&r.run_id, &r.acked);
            let warm_check = sink.check_run(&warm.run_id, &warm.acked);
            let rate = r.messages_per_s;
            let ratio = direct_rate.map(|d: f64| if d > 0.0 { rate / d } else { 0.0 });
            direct_rate.get_or_insert(rate);
            let mut errors: Vec<String> =
                r.errors.iter().map(|(k, v)| format!("{k}: {v}")).collect();
            if warm_check.lost + warm_check.duplicated + warm_check.corrupted > 0 {
                errors.push(format!(
                    "warm-up: {} lost, {} duplicated, {} corrupted",
                    warm_check.lost, warm_check.duplicated, warm_check.corrupted
                ));
            }
            let mut check = check;
            check.lost += warm_check.lost;
            check.duplicated += warm_check.duplicated;
            check.corrupted += warm_check.corrupted;
            rows.push(Row {
                workload: name.clone(),
                target: target.into(),
                per_session: *per_session,
                messages_per_s: rate,
                p50_ms: r.latency.mail_to_final.p50_us / 1000.0,
                p99_ms: r.latency.mail_to_final.p99_us / 1000.0,
                ratio: ratio.map(|x| (x * 100.0).round() / 100.0),
                acknowledged: r.acknowledged,
                failed: r.failed + r.aborted,
                timed_out: r.timed_out,
                check,
                errors: errors.join(", "),
            });
        }
    }
    drop(guard);
    let foreign = sink.foreign();
    let verified = foreign == 0
        && rows.iter().all(|r| {
            r.verified() && r.failed == 0 && !r.timed_out && r.acknowledged == cfg.messages
        });
    Ok(BenchReport {
        mailguard: path.display().to_string(),
        messages: cfg.messages,
        sessions: cfg.sessions,
        body_bytes: cfg.size,
        rows,
        foreign,
        verified,
    })
}

/// The side-by-side table.
pub fn print_table(r: &BenchReport, out: &mut impl io::Write) -> io::Result<()> {
    writeln!(out)?;
    writeln!(
        out,
        "{:<30} {:<10} {:>9} {:>8} {:>8} {:>6} {:>7} {:>9} {:>5} {:>4} {:>7}",
        "workload",
        "target",
        "msgs/s",
        "p50 ms",
        "p99 ms",
        "ratio",
        "acked",
        "delivered",
        "lost",
        "dup",
        "corrupt"
    )?;
    let mut prev = "";
    for row in &r.rows {
        let name = if row.workload == prev {
            ""
        } else {
            &row.workload
        };
        prev = &row.workload;
        writeln!(
            out,
            "{:<30} {:<10} {:>9.1} {:>8.3} {:>8.3} {:>6} {:>7} {:>9} {:>5} {:>4} {:>7}",
            name,
            row.target,
            row.messages_per_s,
            row.p50_ms,
            row.p99_ms,
            row.ratio
                .map(|x| format!("{x:.2}"))
                .unwrap_or_else(|| "-".into()),
            row.acknowledged,
            row.check.delivered,
            row.check.lost,
            row.check.duplicated,
            row.check.corrupted
        )?;
    }
    writeln!(
        out,
        "(latency: MAIL to final reply; delivered: distinct ids the sink received)"
    )?;
    for row in &r.rows {
        if !row.errors.is_empty() || row.failed > 0 || row.timed_out {
            writeln!(
                out,
                "{} / {}: {} failed{}{}",
                row.workload,
                row.target,
                row.failed,
                if row.timed_out {
                    ", stopped by --timeout"
                } else {
                    ""
                },
                if row.errors.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", row.errors)
                }
            )?;
        }
    }
    if r.verified {
        writeln!(
            out,
            "verified: every acknowledged message reached the sink exactly once and intact \
             (delivered == acknowledged, no duplicates, no corruption)"
        )?;
    } else {
        writeln!(
            out,
            "FAILED verification: see lost/dup/corrupt and failed counts above{}",
            if r.foreign > 0 {
                format!("; {} foreign messages at the sink", r.foreign)
            } else {
                String::new()
            }
        )?;
    }
    Ok(())
}
