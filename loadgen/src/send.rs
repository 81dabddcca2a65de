//! `loadgen send`: N concurrent SMTP sessions deliver M messages (or run for S seconds).
//!
//! Each session is one tokio task that loops: claim the next sequence number from a shared
//! atomic counter, open a connection if it has none (connect, banner, EHLO), run one
//! transaction, and QUIT after `--per-session` messages. Messages are claimed one at a time, so
//! the run delivers exactly M messages however the sessions interleave.
//!
//! * Closed loop (default): a session starts its next message as soon as the previous one's
//!   final reply arrived.
//! * Open loop (`--rate R`): message `i` is *intended* to start at `start + i/R`. A session that
//!   is free sleeps until that time; one that is late starts at once. Latency is reported twice:
//!   the service time (MAIL to final reply) and the corrected latency from the intended start to
//!   the final reply, which includes the time the message waited because every session was busy
//!   (the wrk2 correction for coordinated omission). tokio's timer has 1 ms granularity, so the
//!   corrected figure includes up to ~1 ms of timer slack at low load.
//! * `--pipelining` (RFC 2920), when the server offers PIPELINING: MAIL, every RCPT and DATA go
//!   out in one write; after the 354, the body, the end-of-data dot and whatever follows (the
//!   next message's MAIL/RCPT/DATA group in a closed loop, or QUIT after the last message on the
//!   connection) go out in one write too, as RFC 2920 3.1 allows ("the actual transfer of
//!   message content is explicitly allowed to be the first command in a group"). Without it,
//!   every command waits for its reply, like Postfix's smtp-source.
//!
//! Latencies go into per-thread HDR histograms behind an uncontended mutex (all sessions of a
//! thread run on that thread); live counters for the progress line are relaxed atomics in
//! cache-line-aligned per-thread blocks. The body template is built once per run and a message
//! is assembled into the session's reusable buffer, so the steady state allocates nothing per
//! message.
//!
//! Every run is bounded: by the message count or duration, and by `--timeout`, after which all
//! sessions are dropped and the report says `timed_out`.

use std::collections::{BTreeMap, HashMap};
use std::io::{self, IsTerminal, Write as _};
use std::net::SocketAddr;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::task::JoinSet;

use crate::ledger::SeqSet;
use crate::message::Template;
use crate::reply::ReplyBuf;
use crate::stats::{self, Latency};
use crate::workers::{self, Flavor};

/// How long a run goes on.
#[derive(Clone, Copy, Debug)]
pub enum Limit {
    /// Exactly this many messages.
    Count(u64),
    /// Claim new messages for this long.
    Duration(Duration),
}

/// Everything `send` needs.
#[derive(Clone, Debug)]
pub struct SendConfig {
    pub target: SocketAddr,
    pub sessions: u32,
    pub limit: Limit,
    pub size: usize,
    pub recipients: u32,
    pub per_session: u64,
    pub pipelining: bool,
    pub rate: Option<f64>,
    pub timeout: Duration,
    pub threads: usize,
    pub flavor: Flavor,
    pub run_id: String,
    pub from: String,
    pub to: String,
    pub helo: String,
    /// Show the live progress line (only honoured when stderr is a terminal).
    pub progress: bool,
}

/// Latency distributions of a run.
#[derive(Serialize, Clone, Debug, Default)]
pub struct Latencies {
    /// From the start of `connect` to the complete 220 banner.
    pub connect_to_banner: Latency,
    /// From sending MAIL to the final reply after the body (service time).
    pub mail_to_final: Latency,
    /// `--rate` only: from the intended start to the final reply (corrected for coordinated
    /// omission).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub intended_to_final: Option<Latency>,
}

/// The summary of a run (`--json` prints it).
#[derive(Serialize, Clone, Debug)]
pub struct SendReport {
    pub run_id: String,
    pub target: String,
    pub sessions: u32,
    pub per_session: u64,
    pub pipelining: bool,
    pub rate: Option<f64>,
    /// Unstuffed body bytes per message.
    pub body_bytes: usize,
    pub recipients: u32,
    pub elapsed_s: f64,
    /// Messages a session started.
    pub attempted: u64,
    /// Messages whose final reply was 2xx.
    pub acknowledged: u64,
    /// Messages that got an error reply or an IO error.
    pub failed: u64,
    /// Messages still in flight when `--timeout` stopped the run.
    pub aborted: u64,
    pub timed_out: bool,
    pub messages_per_s: f64,
    /// Message bytes (headers + body, unstuffed) of acknowledged messages.
    pub bytes: u64,
    pub bytes_per_s: f64,
    /// Connections that got through banner and EHLO.
    pub sessions_opened: u64,
    pub sessions_per_s: f64,
    pub latency: Latencies,
    /// Error replies by code (`"550"`), IO errors by phase and cause (`"connect: connection
    /// refused"`).
    pub errors: BTreeMap<String, u64>,
    /// Set when the run could not work at all (e.g. nothing listens on the target).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fatal: Option<String>,
    /// Sequence numbers acknowledged (for `bench`, which compares them with the sink).
    #[serde(skip)]
    pub acked: SeqSet,
}

impl SendReport {
    /// Whether every attempted message was acknowledged, within the time cap.
    pub fn clean(&self) -> bool {
        self.fatal.is_none() && !self.timed_out && self.failed == 0 && self.aborted == 0
    }
}

/// A claimed message.
#[derive(Clone, Copy, Debug)]
struct Claim {
    seq: u64,
    intended: Option<Instant>,
}

/// State shared by all sessions of a run.
struct Shared {
    target: SocketAddr,
    per_session: u64,
    pipelining: bool,
    rate: Option<f64>,
    count: Option<u64>,
    deadline: Option<Instant>,
    start: Instant,
    template: Template,
    ehlo: Vec<u8>,
    helo: Vec<u8>,
    /// `MAIL FROM`, every `RCPT TO` and `DATA`, back to back (the pipelined group).
    envelope: Vec<u8>,
    /// Each command's range in `envelope`, and the reply class it expects (2 or 3).
    commands: Vec<(Range<usize>, u16)>,
    next: AtomicU64,
    stop: AtomicBool,
    any_connected: AtomicBool,
    timed_out: AtomicBool,
    fatal: Mutex<Option<String>>,
}

impl Shared {
    fn claim(&self) -> Option<Claim> {
        if self.stop.load(Relaxed) {
            return None;
        }
        let seq = self.next.fetch_add(1, Relaxed);
        if self.count.is_some_and(|m| seq >= m) {
            return None;
        }
        let intended = self
            .rate
            .map(|r| self.start + Duration::from_secs_f64(seq as f64 / r));
        if let Some(d) = self.deadline {
            if intended.unwrap_or_else(Instant::now) >= d {
                return None;
            }
        }
        Some(Claim { seq, intended })
    }

    fn set_fatal(&self, msg: String) {
        let mut f = self.fatal.lock().unwrap_or_else(|e| e.into_inner());
        f.get_or_insert(msg);
        self.stop.store(true, Relaxed);
    }
}

/// Live counters of one worker, read by the progress line.
#[derive(Default)]
#[repr(align(128))]
struct Live {
    attempted: AtomicU64,
    acked: AtomicU64,
    failed: AtomicU64,
}

/// What one worker thread collects.
struct Data {
    connect: Histogram<u64>,
    mail: Histogram<u64>,
    intended: Histogram<u64>,
    errors: HashMap<String, u64>,
    acked: SeqSet,
    bytes: u64,
    sessions: u64,
}

struct Worker {
    live: Live,
    data: Mutex<Data>,
}

impl Worker {
    fn new() -> Worker {
        Worker {
            live: Live::default(),
            data: Mutex::new(Data {
                connect: stats::histogram(),
                mail: stats::histogram(),
                intended: stats::histogram(),
                errors: HashMap::new(),
                acked: SeqSet::default(),
                bytes: 0,
                sessions: 0,
            }),
        }
    }

    fn data(&self) -> std::sync::MutexGuard<'_, Data> {
        // A panic while holding it would leave plain counters behind: still usable.
        self.data.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn error(&self, key: String) {
        *self.data().errors.entry(key).or_insert(0) += 1;
    }

    fn failed(&self) {
        self.live.failed.fetch_add(1, Relaxed);
    }
}

/// Short, stable description of an IO error for the error table.
fn describe(e: &io::Error) -> String {
    use io::ErrorKind::*;
    match e.kind() {
        ConnectionRefused => "connection refused".into(),
        ConnectionReset => "connection reset".into(),
        ConnectionAborted => "connection aborted".into(),
        BrokenPipe => "broken pipe".into(),
        TimedOut => "timed out".into(),
        AddrNotAvailable => "address not available".into(),
        _ => e.to_string(),
    }
}

/// An open SMTP connection.
struct Conn {
    stream: TcpStream,
    /// The server offered PIPELINING.
    pipelining: bool,
    /// Messages attempted on this connection.
    used: u64,
}

/// Why opening a connection failed.
enum OpenError {
    Io(&'static str, io::Error),
    Reply(u16),
}

struct Session {
    sh: Arc<Shared>,
    w: Arc<Worker>,
    conn: Option<Conn>,
    rbuf: ReplyBuf,
    msg: Vec<u8>,
    /// A message whose envelope went out piggybacked on the previous body.
    piggy: Option<Claim>,
    /// What the session is doing, for IO error keys.
    phase: &'static str,
}

/// What to do after a transaction.
type Pending = Option<(Claim, Option<Instant>)>;

impl Session {
    async fn run(mut self) {
        let mut pending: Pending = None;
        loop {
            let (claim, premailed) = match pending.take() {
                Some(p) => p,
                None => match self.sh.claim() {
                    Some(c) => (c, None),
                    None => break,
                },
            };
            if premailed.is_none() {
                if let Some(t) = claim.intended {
                    tokio::time::sleep_until(t.into()).await;
                }
            }
            self.w.live.attempted.fetch_add(1, Relaxed);
            if self.conn.is_none() {
                match self.open().await {
                    Ok(c) => self.conn = Some(c),
                    Err(e) => {
                        self.open_failed(e);
                        self.w.failed();
                        // Do not hammer a server that refuses; also bounds a duration run's
                        // spin rate against a dead target.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                }
            }
            match self.transact(claim, premailed).await {
                Ok(p) => pending = p,
                Err(e) => {
                    self.w.error(format!("{}: {}", self.phase, describe(&e)));
                    self.w.failed();
                    self.conn = None;
                    // A piggybacked envelope died with the connection: send it again.
                    pending = self.piggy.take().map(|c| (c, None));
                }
            }
            if self
                .conn
                .as_ref()
                .is_some_and(|c| c.used >= self.sh.per_session)
            {
                self.quit().await;
            }
        }
        self.quit().await;
    }

    fn open_failed(&mut self, e: OpenError) {
        match e {
            OpenError::Io(phase, e) => {
                if e.kind() == io::ErrorKind::ConnectionRefused
                    && !self.sh.any_connected.load(Relaxed)
                {
                    self.sh
                        .set_fatal(format!("cannot connect to {}: {}", self.sh.target, e));
                }
                self.w.error(format!("{phase}: {}", describe(&e)));
            }
            OpenError::Reply(code) => self.w.error(code.to_string()),
        }
    }

    /// Connect, read the banner, EHLO (HELO if EHLO is refused).
    async fn open(&mut self) -> Result<Conn, OpenError> {
        let t0 = Instant::now();
        let mut stream = TcpStream::connect(self.sh.target)
            .await
            .map_err(|e| OpenError::Io("connect", e))?;
        // Commands are small writes that must leave at once.
        let _ = stream.set_nodelay(true);
        self.rbuf.clear();
        let at = |phase: &'static str| move |e: io::Error| OpenError::Io(phase, e);
        let banner = self.rbuf.next(&mut stream).await.map_err(at("banner"))?;
        if banner.code != 220 {
            return Err(OpenError::Reply(banner.code));
        }
        let banner_at = Instant::now();
        stream.write_all(&self.sh.ehlo).await.map_err(at("ehlo"))?;
        let mut ehlo = self.rbuf.next(&mut stream).await.map_err(at("ehlo"))?;
        if ehlo.code != 250 {
            self.w.error(ehlo.code.to_string());
            stream.write_all(&self.sh.helo).await.map_err(at("helo"))?;
            ehlo = self.rbuf.next(&mut stream).await.map_err(at("helo"))?;
            ehlo.pipelining = false;
            if ehlo.code != 250 {
                return Err(OpenError::Reply(ehlo.code));
            }
        }
        self.sh.any_connected.store(true, Relaxed);
        {
            let mut d = self.w.data();
            stats::record(&mut d.connect, banner_at - t0);
            d.sessions += 1;
        }
        Ok(Conn {
            stream,
            pipelining: ehlo.pipelining,
            used: 0,
        })
    }

    /// One message on the open connection.
    async fn transact(&mut self, claim: Claim, premailed: Option<Instant>) -> io::Result<Pending> {
        let sh = Arc::clone(&self.sh);
        let Some(conn) = self.conn.as_mut() else {
            return Err(io::Error::other("no connection"));
        };
        let rbuf = &mut self.rbuf;
        let pipe = sh.pipelining && conn.pipelining;
        let mail_at = premailed.unwrap_or_else(Instant::now);
        // `bad`: some envelope reply was an error. `in_data`: DATA got its 354 anyway (with
        // pipelining, after a refused RCPT when another was accepted): the body must follow to
        // keep the dialogue in step, but the message counts as failed.
        let mut bad = false;
        let mut in_data = false;
        self.phase = "envelope";
        if pipe {
            if premailed.is_none() {
                conn.stream.write_all(&sh.envelope).await?;
            }
            for (_, class) in &sh.commands {
                let r = rbuf.next(&mut conn.stream).await?;
                in_data = r.code == 354;
                if r.code / 100 != *class {
                    self.w.error(r.code.to_string());
                    bad = true;
                }
            }
        } else {
            for (range, class) in &sh.commands {
                conn.stream.write_all(&sh.envelope[range.clone()]).await?;
                let r = rbuf.next(&mut conn.stream).await?;
                in_data = r.code == 354;
                if r.code / 100 != *class {
                    self.w.error(r.code.to_string());
                    bad = true;
                    break;
                }
            }
        }
        conn.used += 1;
        if !in_data {
            // Reset the transaction so the connection can carry the next message.
            self.phase = "rset";
            self.w.failed();
            conn.stream.write_all(b"RSET\r\n").await?;
            let r = rbuf.next(&mut conn.stream).await?;
            if r.code != 250 {
                self.w.error(r.code.to_string());
                self.conn = None;
            }
            return Ok(None);
        }

        self.phase = "body";
        let last = conn.used >= sh.per_session;
        let msg = &mut self.msg;
        msg.clear();
        let content = sh.template.write_message(claim.seq, msg);
        msg.extend_from_slice(b".\r\n");
        let mut quit = false;
        if pipe {
            if last {
                quit = true;
            } else if sh.rate.is_none() {
                // Closed loop: the next message's envelope rides along with this body.
                match sh.claim() {
                    Some(c) => {
                        msg.extend_from_slice(&sh.envelope);
                        self.piggy = Some(c);
                    }
                    None => quit = true,
                }
            }
            if quit {
                msg.extend_from_slice(b"QUIT\r\n");
            }
        }
        let body_at = Instant::now();
        conn.stream.write_all(msg).await?;
        let r = rbuf.next(&mut conn.stream).await?;
        let done = Instant::now();
        if r.code / 100 == 2 && !bad {
            self.w.live.acked.fetch_add(1, Relaxed);
            let mut d = self.w.data();
            stats::record(&mut d.mail, done - mail_at);
            if let Some(t) = claim.intended {
                stats::record(&mut d.intended, done.saturating_duration_since(t));
            }
            d.acked.insert(claim.seq);
            d.bytes += content as u64;
        } else {
            if r.code / 100 != 2 {
                self.w.error(r.code.to_string());
            }
            self.w.failed();
        }
        if quit {
            self.phase = "quit";
            // The 221 is a courtesy; the message is already acknowledged.
            let _ = rbuf.next(&mut conn.stream).await;
            self.conn = None;
        }
        Ok(self.piggy.take().map(|c| (c, Some(body_at))))
    }

    async fn quit(&mut self) {
        if let Some(mut c) = self.conn.take() {
            if c.stream.write_all(b"QUIT\r\n").await.is_ok() {
                let _ = self.rbuf.next(&mut c.stream).await;
            }
        }
    }
}

/// Runs `sessions` on the current runtime until they finish or `cap` passes.
async fn drive(sessions: Vec<Session>, cap: Instant, sh: Arc<Shared>) {
    let mut set = JoinSet::new();
    for s in sessions {
        set.spawn(s.run());
    }
    tokio::select! {
        _ = async { while set.join_next().await.is_some() {} } => {}
        _ = tokio::time::sleep_until(cap.into()) => {
            sh.timed_out.store(true, Relaxed);
            set.abort_all();
        }
    }
}

/// Runs a send and returns its report. Errors are setup failures (threads, runtimes).
pub fn run(cfg: &SendConfig) -> io::Result<SendReport> {
    let template = Template::new(&cfg.run_id, cfg.size, &cfg.from, &cfg.to);
    let mut envelope = Vec::new();
    let mut commands = Vec::new();
    let mut push = |cmd: String, class: u16| {
        let s = envelope.len();
        envelope.extend_from_slice(cmd.as_bytes());
        commands.push((s..envelope.len(), class));
    };
    push(format!("MAIL FROM:<{}>\r\n", cfg.from), 2);
    for i in 0..cfg.recipients {
        push(
            format!("RCPT TO:<{}>\r\n", recipient(&cfg.to, i, cfg.recipients)),
            2,
        );
    }
    push("DATA\r\n".into(), 3);

    let threads = cfg.threads.max(1);
    let start = Instant::now();
    let cap = start + cfg.timeout;
    let sh = Arc::new(Shared {
        target: cfg.target,
        per_session: cfg.per_session.max(1),
        pipelining: cfg.pipelining,
        rate: cfg.rate,
        count: match cfg.limit {
            Limit::Count(m) => Some(m),
            Limit::Duration(_) => None,
        },
        deadline: match cfg.limit {
            Limit::Count(_) => None,
            Limit::Duration(d) => Some(start + d),
        },
        start,
        template,
        ehlo: format!("EHLO {}\r\n", cfg.helo).into_bytes(),
        helo: format!("HELO {}\r\n", cfg.helo).into_bytes(),
        envelope,
        commands,
        next: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        any_connected: AtomicBool::new(false),
        timed_out: AtomicBool::new(false),
        fatal: Mutex::new(None),
    });
    let workers: Vec<Arc<Worker>> = (0..threads).map(|_| Arc::new(Worker::new())).collect();
    let mut per_thread: Vec<Vec<Session>> = (0..threads).map(|_| Vec::new()).collect();
    for i in 0..cfg.sessions as usize {
        per_thread[i % threads].push(Session {
            sh: Arc::clone(&sh),
            w: Arc::clone(&workers[i % threads]),
            conn: None,
            rbuf: ReplyBuf::new(),
            msg: Vec::with_capacity(cfg.size + cfg.size / 32 + 1024),
            piggy: None,
            phase: "connect",
        });
    }

    let (done_tx, done_rx) = mpsc::channel::<()>();
    let mut handles = Vec::new();
    let expected_done = match cfg.flavor {
        Flavor::Current => {
            for (i, sessions) in per_thread.into_iter().enumerate() {
                let (sh, tx) = (Arc::clone(&sh), done_tx.clone());
                handles.push(workers::spawn_current(
                    format!("send-{i}"),
                    move || async move {
                        drive(sessions, cap, sh).await;
                        let _ = tx.send(());
                    },
                )?);
            }
            threads
        }
        Flavor::Multi => {
            let rt = workers::multi_thread(threads)?;
            let (sh2, tx) = (Arc::clone(&sh), done_tx.clone());
            let sessions: Vec<Session> = per_thread.into_iter().flatten().collect();
            handles.push(
                std::thread::Builder::new()
                    .name("send".into())
                    .spawn(move || {
                        rt.block_on(drive(sessions, cap, sh2));
                        let _ = tx.send(());
                    })?,
            );
            1
        }
    };
    drop(done_tx);

    let show = cfg.progress && io::stderr().is_terminal();
    let mut done = 0;
    let mut last = (Instant::now(), 0u64);
    while done < expected_done {
        match done_rx.recv_timeout(Duration::from_secs(1)) {
            Ok(()) => done += 1,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if show {
                    let sum = |f: fn(&Live) -> &AtomicU64| -> u64 {
                        workers.iter().map(|w| f(&w.live).load(Relaxed)).sum()
                    };
                    let (acked, failed) = (sum(|l| &l.acked), sum(|l| &l.failed));
                    let now = Instant::now();
                    let rate = (acked - last.1) as f64 / (now - last.0).as_secs_f64();
                    last = (now, acked);
                    eprint!(
                        "\r\x1b[K  {:6.1} s  {acked} acknowledged  {failed} failed  {rate:.0} msgs/s",
                        (now - start).as_secs_f64()
                    );
                    let _ = io::stderr().flush();
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    if show {
        eprint!("\r\x1b[K");
    }
    for h in handles {
        let _ = h.join();
    }

    // Merge the workers.
    let mut connect = stats::histogram();
    let mut mail = stats::histogram();
    let mut intended = stats::histogram();
    let mut errors = BTreeMap::new();
    let mut acked = SeqSet::default();
    let (mut bytes, mut sessions_opened) = (0, 0);
    let (mut attempted, mut nacked, mut failed) = (0, 0, 0);
    for w in &workers {
        attempted += w.live.attempted.load(Relaxed);
        nacked += w.live.acked.load(Relaxed);
        failed += w.live.failed.load(Relaxed);
        let d = w.data();
        // Same bounds everywhere, so adding cannot fail.
        let _ = connect.add(&d.connect);
        let _ = mail.add(&d.mail);
        let _ = intended.add(&d.intended);
        for (k, v) in &d.errors {
            *errors.entry(k.clone()).or_insert(0) += v;
        }
        acked.union_with(&d.acked);
        bytes += d.bytes;
        sessions_opened += d.sessions;
    }
    let fatal = sh.fatal.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let per_s = |n: u64| stats::round1(n as f64 / elapsed.max(1e-9));
    Ok(SendReport {
        run_id: cfg.run_id.clone(),
        target: cfg.target.to_string(),
        sessions: cfg.sessions,
        per_session: cfg.per_session,
        pipelining: cfg.pipelining,
        rate: cfg.rate,
        body_bytes: sh.template.body_len(),
        recipients: cfg.recipients,
        elapsed_s: (elapsed * 1000.0).round() / 1000.0,
        attempted,
        acknowledged: nacked,
        failed,
        aborted: attempted.saturating_sub(nacked + failed),
        timed_out: sh.timed_out.load(Relaxed),
        messages_per_s: per_s(nacked),
        bytes,
        bytes_per_s: per_s(bytes),
        sessions_opened,
        sessions_per_s: per_s(sessions_opened),
        latency: Latencies {
            connect_to_banner: Latency::of(&connect),
            mail_to_final: Latency::of(&mail),
            intended_to_final: cfg.rate.map(|_| Latency::of(&intended)),
        },
        errors,
        fatal,
        acked,
    })
}

/// The i-th of n recipients: `to` itself for one, `local+i@domain` for several.
fn recipient(to: &str, i: u32, n: u32) -> String {
    if n == 1 {
        return to.to_string();
    }
    match to.rsplit_once('@') {
        Some((local, domain)) => format!("{local}+{i}@{domain}"),
        None => format!("{to}+{i}"),
    }
}

/// The human-readable report.
pub fn print_human(r: &SendReport, out: &mut impl io::Write) -> io::Result<()> {
    let mode = match r.rate {
        Some(rate) => format!("open loop at {rate} msgs/s"),
        None => "closed loop".into(),
    };
    writeln!(
        out,
        "loadgen send: {} run {}: {} sessions, {} per session, {} B bodies, {} rcpt, {}, {}",
        r.target,
        r.run_id,
        r.sessions,
        r.per_session,
        r.body_bytes,
        r.recipients,
        if r.pipelining {
            "pipelining"
        } else {
            "lock-step"
        },
        mode
    )?;
    if let Some(f) = &r.fatal {
        writeln!(out, "  FATAL: {f}")?;
    }
    writeln!(
        out,
        "  messages    {} acknowledged, {} failed, {} aborted, in {:.3} s{}",
        r.acknowledged,
        r.failed,
        r.aborted,
        r.elapsed_s,
        if r.timed_out {
            " (stopped by --timeout)"
        } else {
            ""
        }
    )?;
    writeln!(
        out,
        "  throughput  {:.1} msgs/s   {:.2} MB/s   {:.1} sessions/s ({} sessions)",
        r.messages_per_s,
        r.bytes_per_s / 1e6,
        r.sessions_per_s,
        r.sessions_opened
    )?;
    writeln!(
        out,
        "  latency ms                   p50       p90       p99     p99.9       max"
    )?;
    let l = &r.latency;
    writeln!(out, "{}", l.connect_to_banner.row("connect -> banner"))?;
    writeln!(out, "{}", l.mail_to_final.row("MAIL -> final reply"))?;
    if let Some(i) = &l.intended_to_final {
        writeln!(out, "{}", i.row("intended -> final"))?;
    }
    if r.errors.is_empty() {
        writeln!(out, "  errors      none")?;
    } else {
        let list: Vec<String> = r.errors.iter().map(|(k, v)| format!("{k}: {v}")).collect();
        writeln!(out, "  errors      {}", list.join(", "))?;
    }
    Ok(())
}
