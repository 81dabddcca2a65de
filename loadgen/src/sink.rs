//! `loadgen sink`: a fast SMTP sink that answers like a real MTA and, with `--verify`, proves
//! delivery.
//!
//! It offers PIPELINING, SIZE, 8BITMIME, CHUNKING and ENHANCEDSTATUSCODES; speaks HELO, EHLO,
//! MAIL, RCPT, DATA, BDAT, RSET, NOOP and QUIT with the usual sequencing errors (503 without
//! EHLO/MAIL/RCPT, 501 on syntax, 552 on an oversized SIZE=); ends DATA strictly at CRLF.CRLF
//! with dot-unstuffing ([`crate::data`]); and accepts every message.
//!
//! Each connection is one task with a read buffer taken from a per-thread pool. Commands are
//! answered into an output buffer that is flushed only when all buffered input has been
//! consumed, so a pipelined group gets its replies in one write (what Postfix's smtpd does).
//! A message is counted, and with `--verify` recorded in the ledger, *before* its 250 is
//! flushed: a sender (or proxy) that saw the 250 can rely on the sink having counted it.
//!
//! Verification: the message's `Message-ID` gives (run id, seq) and `X-Loadgen-Check` the body's
//! CRC-32 and length (see [`crate::message`]). The ledger counts, per run, distinct ids,
//! duplicates (an id delivered again) and corrupted messages (body does not match the check
//! header); messages without a loadgen id are `foreign`. Lost messages need to know what was
//! sent: `--expect N` reports `lost = N - distinct`, and `bench` compares the sink's set of ids
//! with the sender's set of acknowledged ids.
//!
//! Threads: `--threads N` current-thread runtimes, each with its own `SO_REUSEPORT` listener on
//! the same port (the kernel spreads connections; a connection never changes thread).

use std::cell::RefCell;
use std::io::{self, Write as _};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use socket2::{Domain, Socket, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::data::{DataScanner, Verdict, Verifier};
use crate::ledger::{Ledger, RunSummary, SeqSet};
use crate::stats;
use crate::workers::{self, Flavor};

/// Largest message the sink advertises (EHLO `SIZE`) and accepts in `MAIL ... SIZE=`.
pub const MAX_SIZE: u64 = 1 << 30;
/// Longest command line (RFC 5321 says 512; real MTAs allow more).
const MAX_LINE: usize = 4096;
/// Read buffer per connection.
const READ_BUF: usize = 32 * 1024;

/// Sink settings.
#[derive(Clone, Debug)]
pub struct SinkConfig {
    pub listen: SocketAddr,
    pub threads: usize,
    pub verify: bool,
    /// Delay before each flush of replies (a pipelined group is one flush).
    pub delay: Duration,
    pub hostname: String,
    pub flavor: Flavor,
    /// Messages the sender will deliver, for `lost`.
    pub expect: Option<u64>,
}

/// Counters of one worker thread; cache-line aligned so threads do not share lines.
#[derive(Default)]
#[repr(align(128))]
struct Counters {
    sessions: AtomicU64,
    messages: AtomicU64,
    bytes: AtomicU64,
    queue_ids: AtomicU64,
}

struct Shared {
    cfg: SinkConfig,
    banner: Vec<u8>,
    ehlo: Vec<u8>,
    helo: Vec<u8>,
    counters: Vec<Counters>,
    ledger: Mutex<Ledger>,
}

impl Shared {
    fn ledger(&self) -> std::sync::MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The sink's report (printed on SIGUSR1 and at exit; `--json` prints it as JSON).
#[derive(Serialize, Clone, Debug)]
pub struct SinkReport {
    pub listen: String,
    pub elapsed_s: f64,
    pub sessions: u64,
    pub messages: u64,
    /// Message bytes received (headers + body, after dot-unstuffing).
    pub bytes: u64,
    pub messages_per_s: f64,
    pub verify: bool,
    /// Distinct loadgen message ids, over all runs (`--verify`).
    pub distinct: Option<u64>,
    pub duplicated: Option<u64>,
    pub corrupted: Option<u64>,
    /// Messages without a loadgen id.
    pub foreign: Option<u64>,
    pub expected: Option<u64>,
    /// `expected - distinct` (`--expect`).
    pub lost: Option<u64>,
    pub runs: Vec<RunSummary>,
}

/// What the sink saw of one run, checked against the sender's acknowledged ids.
#[derive(Serialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct RunCheck {
    /// Distinct ids of the run delivered.
    pub delivered: u64,
    /// Acknowledged ids the sink never received.
    pub lost: u64,
    pub duplicated: u64,
    pub corrupted: u64,
}

/// A running sink. Its threads live as long as the process.
pub struct Sink {
    addr: SocketAddr,
    shared: Arc<Shared>,
    start: Instant,
}

/// Binds `addr` with a 1024 backlog (Rust's default of 128 drops SYNs under connection-per-
/// message load with many sessions).
fn bind(addr: SocketAddr, reuse_port: bool) -> io::Result<std::net::TcpListener> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    s.set_reuse_address(true)?;
    if reuse_port {
        s.set_reuse_port(true)?;
    }
    s.bind(&addr.into())?;
    s.listen(1024)?;
    s.set_nonblocking(true)?;
    Ok(s.into())
}

impl Sink {
    /// Binds and starts the worker threads.
    pub fn start(cfg: SinkConfig) -> io::Result<Sink> {
        let threads = cfg.threads.max(1);
        let per_thread_listeners = cfg.flavor == Flavor::Current && threads > 1;
        let first = bind(cfg.listen, per_thread_listeners)?;
        let addr = first.local_addr()?;
        let mut listeners = vec![first];
        if per_thread_listeners {
            for _ in 1..threads {
                listeners.push(bind(addr, true)?);
            }
        }
        let host = &cfg.hostname;
        let shared = Arc::new(Shared {
            banner: format!("220 {host} ESMTP loadgen sink\r\n").into_bytes(),
            ehlo: format!(
                "250-{host}\r\n250-PIPELINING\r\n250-SIZE {MAX_SIZE}\r\n250-8BITMIME\r\n\
                 250-CHUNKING\r\n250 ENHANCEDSTATUSCODES\r\n"
            )
            .into_bytes(),
            helo: format!("250 {host}\r\n").into_bytes(),
            counters: (0..threads).map(|_| Counters::default()).collect(),
            ledger: Mutex::new(Ledger::default()),
            cfg,
        });
        match shared.cfg.flavor {
            Flavor::Current => {
                for (i, l) in listeners.into_iter().enumerate() {
                    let sh = Arc::clone(&shared);
                    workers::spawn_current(format!("sink-{i}"), move || async move {
                        accept_loop(l, sh, i).await
                    })?;
                }
            }
            Flavor::Multi => {
                let rt = workers::multi_thread(threads)?;
                let sh = Arc::clone(&shared);
                let l = listeners.remove(0);
                std::thread::Builder::new()
                    .name("sink".into())
                    .spawn(move || rt.block_on(accept_loop(l, sh, 0)))?;
            }
        }
        Ok(Sink {
            addr,
            shared,
            start: Instant::now(),
        })
    }

    /// The address the sink listens on (the real port when bound to port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Current counters.
    pub fn report(&self) -> SinkReport {
        let sum = |f: fn(&Counters) -> &AtomicU64| -> u64 {
            self.shared
                .counters
                .iter()
                .map(|c| f(c).load(Relaxed))
                .sum()
        };
        let elapsed = self.start.elapsed().as_secs_f64();
        let messages = sum(|c| &c.messages);
        let verify = self.shared.cfg.verify;
        let expected = self.shared.cfg.expect;
        let ledger = self.shared.ledger();
        let runs = ledger.summaries();
        let distinct: u64 = runs.iter().map(|r| r.distinct).sum();
        let v = |x: u64| verify.then_some(x);
        SinkReport {
            listen: self.addr.to_string(),
            elapsed_s: (elapsed * 1000.0).round() / 1000.0,
            sessions: sum(|c| &c.sessions),
            messages,
            bytes: sum(|c| &c.bytes),
            messages_per_s: stats::round1(messages as f64 / elapsed.max(1e-9)),
            verify,
            distinct: v(distinct),
            duplicated: v(runs.iter().map(|r| r.duplicated).sum()),
            corrupted: v(runs.iter().map(|r| r.corrupted).sum()),
            foreign: v(ledger.foreign),
            expected,
            lost: expected.map(|n| n.saturating_sub(distinct)),
            runs,
        }
    }

    /// Compares run `run_id` with the ids the sender had acknowledged.
    pub fn check_run(&self, run_id: &str, acked: &SeqSet) -> RunCheck {
        let ledger = self.shared.ledger();
        match ledger.run(run_id) {
            Some(r) => RunCheck {
                delivered: r.seen.len(),
                lost: acked.missing_from(&r.seen),
                duplicated: r.duplicated,
                corrupted: r.corrupted,
            },
            None => RunCheck {
                lost: acked.len(),
                ..RunCheck::default()
            },
        }
    }

    /// Messages without a loadgen id so far.
    pub fn foreign(&self) -> u64 {
        self.shared.ledger().foreign
    }
}

/// The human-readable report.
pub fn print_human(r: &SinkReport, out: &mut impl io::Write) -> io::Result<()> {
    writeln!(
        out,
        "loadgen sink: {} after {:.3} s: {} sessions, {} messages, {} bytes ({:.1} msgs/s)",
        r.listen, r.elapsed_s, r.sessions, r.messages, r.bytes, r.messages_per_s
    )?;
    if r.verify {
        let lost = match (r.lost, r.expected) {
            (Some(l), Some(e)) => format!("{l} lost (expected {e})"),
            _ => "lost unknown (no --expect)".into(),
        };
        writeln!(
            out,
            "  verify: {} distinct, {} duplicated, {} corrupted, {} foreign, {}",
            r.distinct.unwrap_or(0),
            r.duplicated.unwrap_or(0),
            r.corrupted.unwrap_or(0),
            r.foreign.unwrap_or(0),
            lost
        )?;
        for run in &r.runs {
            writeln!(
                out,
                "    run {}: {} distinct, {} duplicated, {} corrupted",
                run.run_id, run.distinct, run.duplicated, run.corrupted
            )?;
        }
    }
    Ok(())
}

async fn accept_loop(listener: std::net::TcpListener, sh: Arc<Shared>, idx: usize) {
    let listener = match TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("loadgen sink: cannot register listener: {e}");
            std::process::exit(1);
        }
    };
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(serve(stream, Arc::clone(&sh), idx));
            }
            // Out of file descriptors and the like: back off instead of spinning.
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

/// A connection's read buffer, reply buffer and verifier.
type Buffers = (Vec<u8>, Vec<u8>, Verifier);

thread_local! {
    /// Buffers of finished connections, reused by the next ones on the same thread.
    static POOL: RefCell<Vec<Buffers>> = const { RefCell::new(Vec::new()) };
}

fn take_buffers() -> Buffers {
    POOL.with(|p| p.borrow_mut().pop())
        .unwrap_or_else(|| (vec![0; READ_BUF], Vec::with_capacity(1024), Verifier::new()))
}

fn give_buffers(b: Buffers) {
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        if p.len() < 256 {
            p.push(b);
        }
    });
}

async fn serve(mut stream: TcpStream, sh: Arc<Shared>, idx: usize) {
    let _ = stream.set_nodelay(true);
    let counters = &sh.counters[idx];
    counters.sessions.fetch_add(1, Relaxed);
    let (mut rbuf, mut out, verifier) = take_buffers();
    out.clear();
    let mut smtp = Smtp::new(verifier);
    out.extend_from_slice(&sh.banner);
    let (mut start, mut end) = (0, 0);
    loop {
        start += smtp.process(&rbuf[start..end], &mut out, &sh, counters);
        if start == end {
            start = 0;
            end = 0;
        }
        if !out.is_empty() {
            if !sh.cfg.delay.is_zero() {
                tokio::time::sleep(sh.cfg.delay).await;
            }
            if stream.write_all(&out).await.is_err() {
                break;
            }
            out.clear();
        }
        if smtp.closing {
            break;
        }
        if end == rbuf.len() {
            // Only a partial command line can be left over; make room for the rest of it.
            rbuf.copy_within(start..end, 0);
            end -= start;
            start = 0;
        }
        match stream.read(&mut rbuf[end..]).await {
            Ok(0) | Err(_) => break,
            Ok(n) => end += n,
        }
    }
    give_buffers((rbuf, out, smtp.verifier));
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Command,
    /// Skipping the rest of an over-long command line.
    Discard,
    Data,
    /// Reading a BDAT chunk: bytes left, LAST, and the error to answer instead of accepting.
    Bdat {
        left: u64,
        size: u64,
        last: bool,
        error: Option<&'static str>,
    },
}

/// One connection's SMTP state (no IO: bytes in, replies out).
struct Smtp {
    mode: Mode,
    greeted: bool,
    mail: bool,
    rcpts: u32,
    /// A BDAT transfer is under way (DATA is then out of sequence).
    bdat: bool,
    closing: bool,
    scanner: DataScanner,
    verifier: Verifier,
    msg_bytes: u64,
}

impl Smtp {
    fn new(mut verifier: Verifier) -> Smtp {
        verifier.reset();
        Smtp {
            mode: Mode::Command,
            greeted: false,
            mail: false,
            rcpts: 0,
            bdat: false,
            closing: false,
            scanner: DataScanner::new(),
            verifier,
            msg_bytes: 0,
        }
    }

    fn reset_transaction(&mut self) {
        self.mail = false;
        self.rcpts = 0;
        self.bdat = false;
        self.msg_bytes = 0;
        self.verifier.reset();
    }

    /// Consumes what it can of `input`, appending replies to `out`; returns bytes consumed.
    fn process(&mut self, input: &[u8], out: &mut Vec<u8>, sh: &Shared, c: &Counters) -> usize {
        let verify = sh.cfg.verify;
        let mut pos = 0;
        while pos < input.len() && !self.closing {
            match self.mode {
                Mode::Command => {
                    let rest = &input[pos..];
                    match memchr::memchr(b'\n', rest) {
                        Some(nl) => {
                            pos += nl + 1;
                            let line = &rest[..nl];
                            self.command(line.strip_suffix(b"\r").unwrap_or(line), out, sh, c);
                        }
                        None => {
                            if rest.len() >= MAX_LINE {
                                out.extend_from_slice(b"500 5.5.0 Error: line too long\r\n");
                                self.mode = Mode::Discard;
                                pos = input.len();
                            }
                            break;
                        }
                    }
                }
                Mode::Discard => match memchr::memchr(b'\n', &input[pos..]) {
                    Some(nl) => {
                        pos += nl + 1;
                        self.mode = Mode::Command;
                    }
                    None => pos = input.len(),
                },
                Mode::Data => {
                    let mut n = 0u64;
                    let v = &mut self.verifier;
                    let end = self.scanner.scan(&input[pos..], |b| {
                        n += b.len() as u64;
                        if verify {
                            v.feed(b);
                        }
                    });
                    self.msg_bytes += n;
                    match end {
                        Some(e) => {
                            pos += e;
                            self.mode = Mode::Command;
                            self.deliver(out, sh, c);
                        }
                        None => pos = input.len(),
                    }
                }
                Mode::Bdat {
                    left,
                    size,
                    last,
                    error,
                } => {
                    let take = left.min((input.len() - pos) as u64) as usize;
                    if error.is_none() {
                        let chunk = &input[pos..pos + take];
                        self.msg_bytes += take as u64;
                        if verify {
                            self.verifier.feed(chunk);
                        }
                    }
                    pos += take;
                    let left = left - take as u64;
                    self.mode = Mode::Bdat {
                        left,
                        size,
                        last,
                        error,
                    };
                    if left == 0 {
                        self.mode = Mode::Command;
                        match error {
                            Some(e) => out.extend_from_slice(e.as_bytes()),
                            None if last => self.deliver(out, sh, c),
                            None => {
                                let _ = write!(out, "250 2.0.0 {size} octets received\r\n");
                            }
                        }
                    }
                }
            }
        }
        pos
    }

    /// A complete message: count it, verify it, then answer 250.
    fn deliver(&mut self, out: &mut Vec<u8>, sh: &Shared, c: &Counters) {
        c.messages.fetch_add(1, Relaxed);
        c.bytes.fetch_add(self.msg_bytes, Relaxed);
        if sh.cfg.verify {
            let verdict = self.verifier.finish();
            let mut ledger = sh.ledger();
            match verdict {
                Verdict::Intact { run, seq } => ledger.record(run, seq, true),
                Verdict::Corrupt { run, seq } => ledger.record(run, seq, false),
                Verdict::Foreign => ledger.foreign += 1,
            }
        }
        let id = c.queue_ids.fetch_add(1, Relaxed);
        let _ = write!(out, "250 2.0.0 Ok: queued as {id:X}\r\n");
        self.reset_transaction();
    }

    fn command(&mut self, line: &[u8], out: &mut Vec<u8>, sh: &Shared, c: &Counters) {
        let verb: [u8; 4] = match line {
            [a, b, c, d] | [a, b, c, d, b' ', ..] => {
                [*a, *b, *c, *d].map(|x| x.to_ascii_uppercase())
            }
            _ => *b"????",
        };
        let arg = line.get(5..).unwrap_or(b"");
        let reply: &[u8] = match &verb {
            b"EHLO" | b"HELO" => {
                if arg.trim_ascii().is_empty() {
                    b"501 5.5.4 Syntax: EHLO hostname\r\n"
                } else {
                    self.reset_transaction();
                    self.greeted = true;
                    if &verb == b"EHLO" {
                        &sh.ehlo[..]
                    } else {
                        &sh.helo[..]
                    }
                }
            }
            b"MAIL" => {
                if !self.greeted {
                    b"503 5.5.1 Error: send HELO/EHLO first\r\n"
                } else if self.mail {
                    b"503 5.5.1 Error: nested MAIL command\r\n"
                } else if !starts_with_ci(arg, b"FROM:") {
                    b"501 5.5.4 Syntax: MAIL FROM:<address>\r\n"
                } else if size_param(arg).is_some_and(|s| s > MAX_SIZE) {
                    b"552 5.3.4 Message size exceeds fixed limit\r\n"
                } else {
                    self.mail = true;
                    b"250 2.1.0 Ok\r\n"
                }
            }
            b"RCPT" => {
                if !self.mail {
                    b"503 5.5.1 Error: need MAIL command\r\n"
                } else if !starts_with_ci(arg, b"TO:") {
                    b"501 5.5.4 Syntax: RCPT TO:<address>\r\n"
                } else if self.rcpts >= 10_000 {
                    b"452 4.5.3 Error: too many recipients\r\n"
                } else {
                    self.rcpts += 1;
                    b"250 2.1.5 Ok\r\n"
                }
            }
            b"DATA" => {
                if !arg.is_empty() {
                    b"501 5.5.4 Syntax: DATA\r\n"
                } else if !self.mail || self.bdat {
                    b"503 5.5.1 Error: need MAIL command\r\n"
                } else if self.rcpts == 0 {
                    b"554 5.5.1 Error: no valid recipients\r\n"
                } else {
                    self.mode = Mode::Data;
                    self.scanner = DataScanner::new();
                    self.verifier.reset();
                    self.msg_bytes = 0;
                    b"354 End data with <CR><LF>.<CR><LF>\r\n"
                }
            }
            b"BDAT" => {
                let mut words = arg.split(|&b| b == b' ').filter(|w| !w.is_empty());
                let size = words.next().and_then(crate::message::parse_u64);
                let last = words.next().map(|w| w.eq_ignore_ascii_case(b"LAST"));
                match (size, last, words.next()) {
                    (Some(size), None | Some(true), None) => {
                        let error = if !self.mail {
                            Some("503 5.5.1 Error: need MAIL command\r\n")
                        } else if self.rcpts == 0 {
                            Some("554 5.5.1 Error: no valid recipients\r\n")
                        } else {
                            if !self.bdat {
                                self.bdat = true;
                                self.verifier.reset();
                                self.msg_bytes = 0;
                            }
                            None
                        };
                        self.mode = Mode::Bdat {
                            left: size,
                            size,
                            last: last.is_some(),
                            error,
                        };
                        if size == 0 {
                            // Nothing to read: answer now (process() only runs with input).
                            self.mode = Mode::Command;
                            match error {
                                Some(e) => e.as_bytes(),
                                None if last.is_some() => {
                                    self.deliver(out, sh, c);
                                    return;
                                }
                                None => b"250 2.0.0 0 octets received\r\n",
                            }
                        } else {
                            return;
                        }
                    }
                    // A BDAT whose size cannot be parsed leaves the stream unsynchronised.
                    _ => {
                        self.closing = true;
                        b"501 5.5.4 Syntax: BDAT size [LAST]\r\n"
                    }
                }
            }
            b"RSET" => {
                self.reset_transaction();
                b"250 2.0.0 Ok\r\n"
            }
            b"NOOP" => b"250 2.0.0 Ok\r\n",
            b"QUIT" => {
                self.closing = true;
                b"221 2.0.0 Bye\r\n"
            }
            b"VRFY" => b"502 5.5.1 VRFY command is disabled\r\n",
            _ => b"502 5.5.2 Error: command not recognized\r\n",
        };
        out.extend_from_slice(reply);
    }
}

fn starts_with_ci(s: &[u8], prefix: &[u8]) -> bool {
    s.len() >= prefix.len() && s[..prefix.len()].eq_ignore_ascii_case(prefix)
}

/// The `SIZE=` parameter of a MAIL command, if present and numeric.
fn size_param(arg: &[u8]) -> Option<u64> {
    arg.split(|&b| b == b' ')
        .find(|w| starts_with_ci(w, b"SIZE="))
        .and_then(|w| crate::message::parse_u64(&w[5..]))
}
