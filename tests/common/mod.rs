//! Shared helpers of the end-to-end tests: a recording upstream SMTP server ([`Upstream`]),
//! the real binary under test ([`Guard`]) and a raw SMTP client ([`Client`]).
//!
//! Every read and every wait is bounded, so a broken binary fails a test instead of hanging
//! it. Everything listens on the loopback only. The only process ever killed is the child this
//! module spawned, by its PID.
#![allow(dead_code)]

use std::fmt;
use std::fs::File;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// How long a test waits for anything (a reply, a recorded message, the guard to listen).
pub const WAIT: Duration = Duration::from_secs(10);
/// How long the recording upstream waits for the next bytes before it gives up on a connection.
pub const UPSTREAM_IDLE: Duration = Duration::from_secs(30);
/// The client name every test uses.
pub const CLIENT_NAME: &str = "client.test";
/// The upstream's greeting text (after `220 `).
pub const BANNER: &str = "upstream.test ESMTP recorder";
/// The upstream's EHLO keywords, in the order it sends them.
pub const KEYWORDS: &[&str] = &[
    "PIPELINING",
    "SIZE 52428800",
    "8BITMIME",
    "SMTPUTF8",
    "DSN",
    "ENHANCEDSTATUSCODES",
    "CHUNKING",
    "BINARYMIME",
    "STARTTLS",
    "AUTH PLAIN LOGIN",
    "ETRN",
    "XCLIENT ADDR NAME",
];
const POLL: Duration = Duration::from_millis(10);
/// Longest line the upstream assembles; beyond, the bytes so far count as one line.
const UPSTREAM_MAX_LINE: usize = 4 << 20;

// ---------------------------------------------------------------------------------------------
// Byte helpers
// ---------------------------------------------------------------------------------------------

/// Position of `needle` in `hay`.
pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || hay.len() < needle.len() {
        return None;
    }
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Whether `needle` occurs in `hay`.
pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    find(hay, needle).is_some()
}

/// Whether `b` holds a LF not preceded by CR, or a CR not followed by LF.
pub fn has_bare_cr_or_lf(b: &[u8]) -> bool {
    b.iter().enumerate().any(|(i, &c)| match c {
        b'\n' => i == 0 || b[i - 1] != b'\r',
        b'\r' => b.get(i + 1) != Some(&b'\n'),
        _ => false,
    })
}

/// SMTP dot-stuffing of a body made of CRLF lines: every line starting with `.` gets another.
pub fn dot_stuff(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 16);
    let mut at_line_start = true;
    for &b in body {
        if at_line_start && b == b'.' {
            out.push(b'.');
        }
        out.push(b);
        at_line_start = b == b'\n';
    }
    out
}

/// Printable form of bytes for assertion messages (long values are cut).
pub fn show(b: &[u8]) -> String {
    const MAX: usize = 600;
    let s = format!("{:?}", String::from_utf8_lossy(&b[..b.len().min(MAX)]));
    if b.len() > MAX {
        format!("{s}... ({} bytes)", b.len())
    } else {
        s
    }
}

/// Lines for assertion messages.
pub fn show_lines(lines: &[Vec<u8>]) -> String {
    let v: Vec<String> = lines.iter().map(|l| show(l)).collect();
    format!("[{}]", v.join(", "))
}

/// Deterministic pseudo-random bytes (xorshift), for bodies and garbage.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Polls `f` every few milliseconds until it is true or `timeout` passed; returns its last value.
pub fn wait_for(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(POLL);
    }
}

// ---------------------------------------------------------------------------------------------
// Recording upstream
// ---------------------------------------------------------------------------------------------

/// How a recorded message ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    /// `DATA` and a strict `\r\n.\r\n`.
    Data,
    /// `BDAT n LAST`.
    Bdat,
}

/// A message the upstream accepted (it was about to answer 250 to it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// Index of the upstream connection it came on.
    pub conn: usize,
    /// The whole MAIL command line.
    pub mail_from: Vec<u8>,
    /// The whole RCPT command lines.
    pub rcpts: Vec<Vec<u8>>,
    /// For DATA: the raw bytes between the 354 and the terminator's `.\r\n` (so the last CRLF
    /// of the body is included and dot-stuffing is kept). For BDAT: the chunks concatenated.
    pub body: Vec<u8>,
    pub via: Via,
}

/// What one upstream connection received.
#[derive(Clone, Debug, Default)]
pub struct Conn {
    /// Every command line as received, without its CRLF (a line ended by a bare LF keeps it).
    pub commands: Vec<Vec<u8>>,
    /// The AUTH continuation lines (answers to 334), without CRLF.
    pub auth_responses: Vec<Vec<u8>>,
    /// Every byte received on the connection, in order.
    pub raw: Vec<u8>,
    /// DATA bytes received when the connection ended (or was cut) before the terminator.
    pub unfinished_data: Option<Vec<u8>>,
    /// A message that ended but was never acknowledged (see [`EndOfData::Close`]).
    pub unacknowledged: Option<Vec<u8>>,
    /// Whether STARTTLS was answered with 220.
    pub starttls: bool,
    /// The raw bytes received after the STARTTLS 220.
    pub after_starttls: Vec<u8>,
    /// The connection is over.
    pub closed: bool,
}

/// What the upstream does once a message ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EndOfData {
    /// Record it and answer `250 2.0.0 Ok: queued as <n>` (n counts per connection).
    Queue,
    /// Answer this reply line (no CRLF) and do not record the message.
    Reply(String),
    /// Close the connection without answering (the message goes to `unacknowledged`).
    Close,
}

/// Behaviour of the recording upstream.
#[derive(Clone, Debug)]
pub struct UpstreamOptions {
    /// Greeting lines (text after `220-`/`220 `).
    pub banner: Vec<String>,
    /// The greeting's reply code (220 unless a test wants a refusing server, e.g. 554).
    pub banner_code: u16,
    /// EHLO keyword lines after the domain line.
    pub ehlo_keywords: Vec<String>,
    /// Close every connection right after accepting it, without a banner.
    pub close_on_accept: bool,
    /// Sleep this long before every reply.
    pub reply_delay: Duration,
    /// Close the connection (without a reply) when a command starts with this (any case).
    pub close_on_command: Option<String>,
    /// Close the connection as soon as this many DATA bytes arrived (even if they hold the
    /// terminator: such a message is never recorded).
    pub close_in_data_after: Option<usize>,
    pub end_of_data: EndOfData,
    /// Before answering an end of data, wait (bounded) until [`Upstream::release`].
    pub hold_end_of_data: bool,
    /// After STARTTLS: sent once, when the first opaque bytes arrived.
    pub tls_reply: Vec<u8>,
    /// Accept connections but never send a byte (not even the greeting).
    pub silent: bool,
    /// Stop answering (keep reading, never reply) once a command starts with this (any case).
    pub hang_on_command: Option<String>,
    /// Record a message at its end of data, then never answer it (the reply is lost).
    pub hang_after_end_of_data: bool,
    /// Every close the upstream initiates is an abortive one (RST, `SO_LINGER` 0), not a FIN.
    pub reset: bool,
    /// Per-connection faults: connection `i` gets `schedule[i % len]` applied on top of these
    /// options. Empty: every connection behaves as configured.
    pub schedule: Vec<Fault>,
}

/// A fault the upstream plays on one connection (see [`UpstreamOptions::schedule`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Behave as configured.
    None,
    /// Close at once, without a greeting.
    Refuse,
    /// Accept and never answer anything.
    Silent,
    /// Reset the connection when a command starts with this.
    ResetOnCommand(String),
    /// Stop answering when a command starts with this.
    HangOnCommand(String),
    /// Reset the connection once this many DATA bytes arrived.
    ResetInData(usize),
    /// Close right after the end of data, before the reply (message recorded as unacknowledged).
    CloseAfterEndOfData,
    /// Record the message at its end of data, then never answer.
    HangAfterEndOfData,
    /// Sleep this long before every reply.
    Slow(Duration),
}

impl Fault {
    fn apply(&self, o: &mut UpstreamOptions) {
        match self {
            Fault::None => {}
            Fault::Refuse => o.close_on_accept = true,
            Fault::Silent => o.silent = true,
            Fault::ResetOnCommand(p) => {
                o.close_on_command = Some(p.clone());
                o.reset = true;
            }
            Fault::HangOnCommand(p) => o.hang_on_command = Some(p.clone()),
            Fault::ResetInData(n) => {
                o.close_in_data_after = Some(*n);
                o.reset = true;
            }
            Fault::CloseAfterEndOfData => o.end_of_data = EndOfData::Close,
            Fault::HangAfterEndOfData => o.hang_after_end_of_data = true,
            Fault::Slow(d) => o.reply_delay = *d,
        }
    }
}

impl Default for UpstreamOptions {
    fn default() -> Self {
        UpstreamOptions {
            banner: vec![BANNER.to_string()],
            banner_code: 220,
            ehlo_keywords: KEYWORDS.iter().map(|s| s.to_string()).collect(),
            close_on_accept: false,
            reply_delay: Duration::ZERO,
            close_on_command: None,
            close_in_data_after: None,
            end_of_data: EndOfData::Queue,
            hold_end_of_data: false,
            tls_reply: Vec::new(),
            silent: false,
            hang_on_command: None,
            hang_after_end_of_data: false,
            reset: false,
            schedule: Vec::new(),
        }
    }
}

#[derive(Default)]
struct State {
    conns: Vec<Conn>,
    messages: Vec<Message>,
}

struct Shared {
    state: Mutex<State>,
    stop: AtomicBool,
    release: AtomicBool,
    opts: UpstreamOptions,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A recording upstream SMTP server on 127.0.0.1, one thread per connection.
pub struct Upstream {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

/// Binds `addr` again (the port of a stopped listener), retrying briefly (bounded).
fn rebind(addr: SocketAddr) -> TcpListener {
    let deadline = Instant::now() + WAIT;
    loop {
        match TcpListener::bind(addr) {
            Ok(l) => return l,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("rebind upstream {addr}: {e}"),
        }
    }
}

impl Upstream {
    /// An upstream with the default behaviour.
    pub fn start() -> Upstream {
        Upstream::with(UpstreamOptions::default())
    }

    /// An upstream with the given behaviour.
    pub fn with(opts: UpstreamOptions) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind upstream");
        let addr = listener.local_addr().unwrap();
        listener.set_nonblocking(true).unwrap();
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            stop: AtomicBool::new(false),
            release: AtomicBool::new(false),
            opts,
        });
        let sh = shared.clone();
        let acceptor = thread::spawn(move || accept_loop(listener, sh));
        Upstream {
            addr,
            shared,
            acceptor: Some(acceptor),
        }
    }

    /// An address where nothing listens (the port of a dropped listener).
    pub fn refused_addr() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = l.local_addr().unwrap();
        drop(l);
        a
    }

    /// Stops the server like a process exit would: the listener goes (new connections are
    /// refused) and every open connection is closed (with RST when `reset` is set). What was
    /// recorded so far is kept. Returns once every connection thread has ended.
    pub fn stop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.acceptor.take() {
            let _ = h.join();
        }
    }

    /// Listens again on the same address after [`Upstream::stop`], with the same options and
    /// the same records (connection indices go on counting).
    pub fn restart(&mut self) {
        assert!(self.acceptor.is_none(), "restart without stop");
        let listener = rebind(self.addr);
        listener.set_nonblocking(true).unwrap();
        self.shared.stop.store(false, Ordering::SeqCst);
        let sh = self.shared.clone();
        self.acceptor = Some(thread::spawn(move || accept_loop(listener, sh)));
    }

    /// Lets a held end of data be answered.
    pub fn release(&self) {
        self.shared.release.store(true, Ordering::SeqCst);
    }

    /// Holds ends of data again (with `hold_end_of_data`) until the next [`Upstream::release`].
    pub fn hold_again(&self) {
        self.shared.release.store(false, Ordering::SeqCst);
    }

    /// Snapshot of all connections so far.
    pub fn conns(&self) -> Vec<Conn> {
        self.shared.lock().conns.clone()
    }

    /// Snapshot of the messages recorded so far.
    pub fn messages(&self) -> Vec<Message> {
        self.shared.lock().messages.clone()
    }

    /// Every command line of every connection, in connection order.
    pub fn commands(&self) -> Vec<Vec<u8>> {
        self.shared
            .lock()
            .conns
            .iter()
            .flat_map(|c| c.commands.iter().cloned())
            .collect()
    }

    /// Whether some recorded command line contains `needle`.
    pub fn saw_command_containing(&self, needle: &[u8]) -> bool {
        self.commands().iter().any(|c| contains(c, needle))
    }

    /// Waits (bounded) until at least `n` messages are recorded; returns the snapshot.
    pub fn wait_messages(&self, n: usize) -> Vec<Message> {
        wait_for(WAIT, || self.shared.lock().messages.len() >= n);
        self.messages()
    }

    /// Waits (bounded) until at least `n` connections were accepted; returns the snapshot.
    pub fn wait_conns(&self, n: usize) -> Vec<Conn> {
        wait_for(WAIT, || self.shared.lock().conns.len() >= n);
        self.conns()
    }

    /// Waits (bounded) until a command line equal to `line` was received.
    pub fn wait_command(&self, line: &[u8]) -> bool {
        wait_for(WAIT, || {
            self.shared
                .lock()
                .conns
                .iter()
                .any(|c| c.commands.iter().any(|l| l == line))
        })
    }

    /// Waits (bounded) until at least one connection was accepted and all are over.
    pub fn wait_all_closed(&self) -> bool {
        wait_for(WAIT, || {
            let st = self.shared.lock();
            !st.conns.is_empty() && st.conns.iter().all(|c| c.closed)
        })
    }

    /// Waits (bounded) until `f` holds for the state; returns whether it did.
    pub fn wait_until(&self, f: impl Fn(&[Conn], &[Message]) -> bool) -> bool {
        wait_for(WAIT, || {
            let st = self.shared.lock();
            f(&st.conns, &st.messages)
        })
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.release.store(true, Ordering::SeqCst);
        if let Some(h) = self.acceptor.take() {
            let _ = h.join();
        }
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let mut workers = Vec::new();
    while !shared.stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, _)) => {
                let idx = {
                    let mut st = shared.lock();
                    st.conns.push(Conn::default());
                    st.conns.len() - 1
                };
                let sh = shared.clone();
                workers.push(thread::spawn(move || serve(stream, idx, sh)));
            }
            Err(_) => thread::sleep(Duration::from_millis(5)),
        }
    }
    for w in workers {
        let _ = w.join();
    }
}

fn serve(stream: TcpStream, idx: usize, sh: Arc<Shared>) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_millis(100)));
    let _ = stream.set_write_timeout(Some(WAIT));
    let _ = stream.set_nodelay(true);
    let mut opts = sh.opts.clone();
    if !sh.opts.schedule.is_empty() {
        sh.opts.schedule[idx % sh.opts.schedule.len()].apply(&mut opts);
    }
    let mut peer = Peer {
        stream,
        buf: Vec::new(),
        idx,
        sh: sh.clone(),
        queued: 0,
        opts,
    };
    if peer.opts.silent {
        peer.swallow();
    } else if !peer.opts.close_on_accept {
        let _ = peer.session();
    }
    if peer.opts.reset {
        // SO_LINGER 0: the close sends RST, as a crashed or killed server's kernel would.
        let _ = socket2::SockRef::from(&peer.stream).set_linger(Some(Duration::ZERO));
    } else {
        let _ = peer.stream.shutdown(Shutdown::Both);
    }
    drop(peer.stream);
    sh.lock().conns[idx].closed = true;
}

struct Peer {
    stream: TcpStream,
    buf: Vec<u8>,
    idx: usize,
    sh: Arc<Shared>,
    queued: usize,
    /// This connection's behaviour (the options with its scheduled fault applied).
    opts: UpstreamOptions,
}

/// The state of one SMTP transaction on the upstream side.
#[derive(Default)]
struct Txn {
    mail: Option<Vec<u8>>,
    rcpts: Vec<Vec<u8>>,
    bdat: Vec<u8>,
}

impl Peer {
    fn record(&self, f: impl FnOnce(&mut Conn)) {
        f(&mut self.sh.lock().conns[self.idx]);
    }

    /// Reads more bytes into `buf`. `None` on EOF, error, idle timeout or stop.
    fn fill(&mut self) -> Option<()> {
        let deadline = Instant::now() + UPSTREAM_IDLE;
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            if self.sh.stop.load(Ordering::SeqCst) || Instant::now() >= deadline {
                return None;
            }
            match self.stream.read(&mut chunk) {
                Ok(0) => return None,
                Ok(n) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    self.record(|c| c.raw.extend_from_slice(&chunk[..n]));
                    return Some(());
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                    ) => {}
                Err(_) => return None,
            }
        }
    }

    /// One line without its CRLF (a bare LF ending is kept).
    fn line(&mut self) -> Option<Vec<u8>> {
        let mut scanned = 0;
        loop {
            if let Some(i) = self.buf[scanned..].iter().position(|&b| b == b'\n') {
                let end = scanned + i;
                let mut line: Vec<u8> = self.buf.drain(..=end).collect();
                if line.len() >= 2 && line[line.len() - 2] == b'\r' {
                    line.truncate(line.len() - 2);
                }
                return Some(line);
            }
            scanned = self.buf.len();
            if self.buf.len() >= UPSTREAM_MAX_LINE {
                return Some(std::mem::take(&mut self.buf));
            }
            self.fill()?;
        }
    }

    /// Reads (and records) everything until the peer closes or the server stops; answers nothing.
    fn swallow(&mut self) {
        self.buf.clear();
        while self.fill().is_some() {
            self.buf.clear();
        }
    }

    /// Exactly `n` bytes.
    fn take(&mut self, n: usize) -> Option<Vec<u8>> {
        while self.buf.len() < n {
            self.fill()?;
        }
        Some(self.buf.drain(..n).collect())
    }

    /// A DATA body up to a strict `\r\n.\r\n`. `Err(partial)` when the connection ended first
    /// or `close_in_data_after` cut it.
    fn data_body(&mut self) -> Result<Vec<u8>, Vec<u8>> {
        let mut scanned = 0;
        loop {
            if let Some(limit) = self.opts.close_in_data_after {
                if self.buf.len() >= limit {
                    return Err(std::mem::take(&mut self.buf));
                }
            }
            if self.buf.starts_with(b".\r\n") {
                self.buf.drain(..3);
                return Ok(Vec::new());
            }
            if let Some(i) = find(&self.buf[scanned..], b"\r\n.\r\n") {
                let pos = scanned + i;
                let body = self.buf[..pos + 2].to_vec();
                self.buf.drain(..pos + 5);
                return Ok(body);
            }
            scanned = self.buf.len().saturating_sub(4);
            if self.fill().is_none() {
                return Err(std::mem::take(&mut self.buf));
            }
        }
    }

    fn reply(&mut self, line: &str) -> Option<()> {
        let mut b = line.as_bytes().to_vec();
        b.extend_from_slice(b"\r\n");
        self.reply_raw(&b)
    }

    fn reply_raw(&mut self, b: &[u8]) -> Option<()> {
        if !self.opts.reply_delay.is_zero() {
            thread::sleep(self.opts.reply_delay);
        }
        self.stream.write_all(b).ok()?;
        self.stream.flush().ok()
    }

    /// A message ended: record, hold, answer as configured.
    fn finish(&mut self, txn: &mut Txn, body: Vec<u8>, via: Via) -> Option<()> {
        let taken = std::mem::take(txn);
        let end = self.opts.end_of_data.clone();
        if end == EndOfData::Queue {
            let msg = Message {
                conn: self.idx,
                mail_from: taken.mail.unwrap_or_default(),
                rcpts: taken.rcpts,
                body: body.clone(),
                via,
            };
            self.sh.lock().messages.push(msg);
        }
        if self.opts.hang_after_end_of_data {
            self.swallow();
            return None;
        }
        if self.opts.hold_end_of_data {
            let sh = self.sh.clone();
            wait_for(UPSTREAM_IDLE, || {
                sh.release.load(Ordering::SeqCst) || sh.stop.load(Ordering::SeqCst)
            });
        }
        match end {
            EndOfData::Queue => {
                self.queued += 1;
                let line = format!("250 2.0.0 Ok: queued as {}", self.queued);
                self.reply(&line)
            }
            EndOfData::Reply(line) => self.reply(&line),
            EndOfData::Close => {
                self.record(|c| c.unacknowledged = Some(body));
                None
            }
        }
    }

    fn session(&mut self) -> Option<()> {
        let opts = self.opts.clone();
        let mut banner = Vec::new();
        for (i, l) in opts.banner.iter().enumerate() {
            let sep = if i + 1 == opts.banner.len() { ' ' } else { '-' };
            let code = opts.banner_code;
            banner.extend_from_slice(format!("{code}{sep}{l}\r\n").as_bytes());
        }
        self.reply_raw(&banner)?;
        let mut txn = Txn::default();
        loop {
            let line = self.line()?;
            self.record(|c| c.commands.push(line.clone()));
            let text = String::from_utf8_lossy(&line)
                .trim_end_matches('\n')
                .to_string();
            let (verb, arg) = match text.find(' ') {
                Some(i) => (text[..i].to_ascii_uppercase(), text[i + 1..].to_string()),
                None => (text.to_ascii_uppercase(), String::new()),
            };
            if let Some(p) = &opts.close_on_command {
                if text
                    .to_ascii_uppercase()
                    .starts_with(&p.to_ascii_uppercase())
                {
                    return None;
                }
            }
            if let Some(p) = &opts.hang_on_command {
                if text
                    .to_ascii_uppercase()
                    .starts_with(&p.to_ascii_uppercase())
                {
                    self.swallow();
                    return None;
                }
            }
            match verb.as_str() {
                "EHLO" => {
                    txn = Txn::default();
                    let mut r = String::new();
                    let n = opts.ehlo_keywords.len();
                    r.push_str(if n == 0 {
                        "250 upstream.test\r\n"
                    } else {
                        "250-upstream.test\r\n"
                    });
                    for (i, k) in opts.ehlo_keywords.iter().enumerate() {
                        let sep = if i + 1 == n { ' ' } else { '-' };
                        r.push_str(&format!("250{sep}{k}\r\n"));
                    }
                    self.reply_raw(r.as_bytes())?;
                }
                "HELO" => {
                    txn = Txn::default();
                    self.reply("250 upstream.test")?;
                }
                "MAIL" | "SAML" | "SEND" | "SOML" => {
                    txn = Txn {
                        mail: Some(line.clone()),
                        ..Txn::default()
                    };
                    self.reply("250 2.1.0 Sender ok")?;
                }
                "RCPT" => {
                    if txn.mail.is_none() {
                        self.reply("503 5.5.1 Error: need MAIL command")?;
                    } else {
                        txn.rcpts.push(line.clone());
                        self.reply("250 2.1.5 Recipient ok")?;
                    }
                }
                "DATA" => {
                    if txn.mail.is_none() || txn.rcpts.is_empty() {
                        self.reply("503 5.5.1 Error: need RCPT command")?;
                        continue;
                    }
                    self.reply("354 End data with <CR><LF>.<CR><LF>")?;
                    match self.data_body() {
                        Ok(body) => self.finish(&mut txn, body, Via::Data)?,
                        Err(partial) => {
                            self.record(|c| c.unfinished_data = Some(partial));
                            return None;
                        }
                    }
                }
                "BDAT" => {
                    let mut it = arg.split_whitespace();
                    let n: Option<usize> = it.next().and_then(|s| s.parse().ok());
                    let last = it.next().is_some_and(|s| s.eq_ignore_ascii_case("LAST"));
                    let Some(n) = n else {
                        self.reply("501 5.5.4 Syntax: BDAT size [LAST]")?;
                        continue;
                    };
                    let chunk = self.take(n)?;
                    if txn.mail.is_none() || txn.rcpts.is_empty() {
                        txn.bdat.clear();
                        self.reply("503 5.5.1 Error: need RCPT command")?;
                        continue;
                    }
                    txn.bdat.extend_from_slice(&chunk);
                    if last {
                        let body = std::mem::take(&mut txn.bdat);
                        self.finish(&mut txn, body, Via::Bdat)?;
                    } else {
                        self.reply(&format!("250 2.0.0 {n} octets received"))?;
                    }
                }
                "RSET" => {
                    txn = Txn::default();
                    self.reply("250 2.0.0 Ok")?;
                }
                "NOOP" => {
                    if arg.is_empty() {
                        self.reply("250 2.0.0 Ok")?;
                    } else {
                        self.reply(&format!("250 2.0.0 Ok {arg}"))?;
                    }
                }
                "VRFY" => self.reply("252 2.0.0 Cannot VRFY user, but will accept message")?,
                "EXPN" => self.reply("250 2.1.5 list@upstream.test")?,
                "ETRN" => self.reply("250 Queuing started")?,
                "HELP" => self.reply("214 2.0.0 See https://upstream.test/help")?,
                "XCLIENT" => self.reply("220 upstream.test ESMTP recorder")?,
                "TURN" | "ATRN" => self.reply("502 5.5.1 Not implemented here")?,
                "AUTH" => self.auth(&arg)?,
                "STARTTLS" => {
                    self.reply("220 2.0.0 Ready to start TLS")?;
                    self.record(|c| c.starttls = true);
                    self.opaque(&opts.tls_reply);
                    return None;
                }
                "QUIT" => {
                    self.reply("221 2.0.0 Bye")?;
                    return None;
                }
                _ => self.reply("502 5.5.2 Error: command not recognized")?,
            }
        }
    }

    fn auth(&mut self, arg: &str) -> Option<()> {
        let mut it = arg.split_whitespace();
        let mech = it.next().unwrap_or("").to_ascii_uppercase();
        let initial = it.next();
        match mech.as_str() {
            "PLAIN" => {
                if initial.is_none() {
                    self.reply("334 ")?;
                    let r = self.line()?;
                    let cancelled = r == b"*";
                    self.record(|c| c.auth_responses.push(r));
                    if cancelled {
                        return self.reply("501 5.7.0 Authentication cancelled");
                    }
                }
                self.reply("235 2.7.0 Authentication successful")
            }
            "LOGIN" => {
                if initial.is_none() {
                    self.reply("334 VXNlcm5hbWU6")?;
                    let r = self.line()?;
                    self.record(|c| c.auth_responses.push(r));
                }
                self.reply("334 UGFzc3dvcmQ6")?;
                let r = self.line()?;
                self.record(|c| c.auth_responses.push(r));
                self.reply("235 2.7.0 Authentication successful")
            }
            _ => self.reply("504 5.5.4 Unrecognized authentication type"),
        }
    }

    /// After STARTTLS: record every byte, answer the first ones with `tls_reply`.
    fn opaque(&mut self, tls_reply: &[u8]) {
        let mut answered = false;
        loop {
            if !self.buf.is_empty() {
                let got = std::mem::take(&mut self.buf);
                self.record(|c| c.after_starttls.extend_from_slice(&got));
                if !answered && !tls_reply.is_empty() {
                    answered = true;
                    if self.stream.write_all(tls_reply).is_err() {
                        return;
                    }
                }
            }
            if self.fill().is_none() {
                return;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Temporary directory
// ---------------------------------------------------------------------------------------------

static UNIQUE: AtomicUsize = AtomicUsize::new(0);

/// A directory under the system temp dir, removed on drop.
pub struct TempDir {
    pub path: PathBuf,
}

impl TempDir {
    pub fn new() -> TempDir {
        let n = UNIQUE.fetch_add(1, Ordering::SeqCst);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let path = std::env::temp_dir().join(format!(
            "mailguard-e2e-{}-{}-{}",
            std::process::id(),
            n,
            nanos
        ));
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir { path }
    }

    /// Writes a file in the directory and returns its path.
    pub fn write(&self, name: &str, contents: &[u8]) -> PathBuf {
        let p = self.path.join(name);
        std::fs::write(&p, contents).expect("write temp file");
        p
    }
}

impl Default for TempDir {
    fn default() -> Self {
        TempDir::new()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

// ---------------------------------------------------------------------------------------------
// The guard process
// ---------------------------------------------------------------------------------------------

/// Path of the binary under test.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_mailguard")
}

/// The guard's metrics page, fetched with curl (bounded to 10 s).
#[allow(dead_code)]
pub fn scrape_metrics(metrics: SocketAddr) -> String {
    let out = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "10",
            &format!("http://{metrics}/metrics"),
        ])
        .output()
        .expect("run curl");
    assert!(out.status.success(), "curl /metrics: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The value of one sample (`name{labels}`, exactly as exposed) of a metrics page.
#[allow(dead_code)]
pub fn metric_value(page: &str, series: &str) -> Option<f64> {
    page.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// A port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind for a free port");
    l.local_addr().unwrap().port()
}

/// Whether something listens on `port` (from /proc/net/tcp{,6}); `None` if /proc is unreadable.
fn listening(port: u16) -> Option<bool> {
    let mut any_table = false;
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        any_table = true;
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.len() < 4 || cols[3] != "0A" {
                continue;
            }
            let Some((_, p)) = cols[1].rsplit_once(':') else {
                continue;
            };
            if u16::from_str_radix(p, 16) == Ok(port) {
                return Some(true);
            }
        }
    }
    any_table.then_some(false)
}

/// The running binary; killed (by its PID, via `Child::kill`) on drop.
pub struct Guard {
    child: Child,
    pub addr: SocketAddr,
    pub policy_path: Option<PathBuf>,
    pub dir: TempDir,
}

impl Guard {
    /// Starts the guard in front of `upstream` with an optional policy (TOML text), on a free
    /// port of 127.0.0.1 with two threads. Panics (with its stderr) if it does not listen.
    #[track_caller]
    pub fn start(upstream: SocketAddr, policy: Option<&str>) -> Guard {
        let listen = format!("127.0.0.1:{}", free_port());
        match Guard::spawn(&listen, &upstream.to_string(), policy, &["--threads", "2"]) {
            Ok(g) => g,
            Err(e) => panic!("mailguard did not start: {e}"),
        }
    }

    /// Starts the guard with explicit addresses and extra arguments; waits (bounded) until it
    /// listens. `Err` holds why it did not (with its stderr).
    pub fn spawn(
        listen: &str,
        upstream: &str,
        policy: Option<&str>,
        extra: &[&str],
    ) -> Result<Guard, String> {
        Guard::spawn_limited(listen, upstream, policy, extra, None)
    }

    /// Like [`Guard::spawn`]; with `fd_limit`, the binary runs under `ulimit -n fd_limit`
    /// (through `bash -c 'ulimit -n N; exec ...'`, so the PID is still the guard's).
    pub fn spawn_limited(
        listen: &str,
        upstream: &str,
        policy: Option<&str>,
        extra: &[&str],
        fd_limit: Option<u32>,
    ) -> Result<Guard, String> {
        let addr: SocketAddr = listen.parse().expect("listen address");
        let dir = TempDir::new();
        let policy_path = policy.map(|p| dir.write("policy.toml", p.as_bytes()));
        let stderr = File::create(dir.path.join("stderr.log")).unwrap();
        let mut cmd = match fd_limit {
            None => Command::new(bin()),
            Some(n) => {
                let mut c = Command::new("bash");
                c.arg("-c")
                    .arg(format!("ulimit -n {n} && exec \"$0\" \"$@\""))
                    .arg(bin());
                c
            }
        };
        cmd.arg("--listen")
            .arg(listen)
            .arg("--upstream")
            .arg(upstream);
        if let Some(p) = &policy_path {
            cmd.arg("--policy").arg(p);
        }
        cmd.args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(stderr));
        let child = cmd.spawn().map_err(|e| format!("spawn {}: {e}", bin()))?;
        let mut guard = Guard {
            child,
            addr,
            policy_path,
            dir,
        };
        let deadline = Instant::now() + WAIT;
        loop {
            if let Ok(Some(status)) = guard.child.try_wait() {
                return Err(format!(
                    "exited with {status} before listening; stderr: {:?}",
                    guard.stderr()
                ));
            }
            let ready = match listening(addr.port()) {
                Some(l) => l,
                None => TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok(),
            };
            if ready {
                return Ok(guard);
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "not listening on {listen} after {WAIT:?}; stderr: {:?}",
                    guard.stderr()
                ));
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// What the guard wrote on stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path.join("stderr.log")).unwrap_or_default()
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The guard's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Open file descriptors of the guard (entries of /proc/PID/fd).
    pub fn fd_count(&self) -> usize {
        proc_fd_count(self.pid())
    }

    /// Resident memory of the guard in KiB (VmRSS of /proc/PID/status).
    pub fn rss_kib(&self) -> u64 {
        proc_rss_kib(self.pid())
    }

    /// CPU time (user + system) the guard used so far, in clock ticks.
    pub fn cpu_ticks(&self) -> u64 {
        proc_cpu_ticks(self.pid())
    }

    /// Waits (bounded by `timeout`) until the guard holds at most `n` file descriptors;
    /// returns the last count seen.
    pub fn wait_fd_count_at_most(&self, n: usize, timeout: Duration) -> usize {
        let mut last = self.fd_count();
        wait_for(timeout, || {
            last = self.fd_count();
            last <= n
        });
        last
    }

    /// A client connected to this guard, its greeting read and checked to be a 220.
    #[track_caller]
    pub fn client(&self) -> Client {
        Client::greeted(self.addr)
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        // `Child::kill` signals exactly this child's PID.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Open file descriptors of process `pid` (0 if /proc is unreadable).
pub fn proc_fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// VmRSS of process `pid` in KiB (0 if unreadable).
pub fn proc_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// utime + stime of process `pid` (all threads) in clock ticks, from /proc/PID/stat.
pub fn proc_cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The command name (field 2) may hold spaces; the fields after its `)` are plain.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state): utime is field 14, stime field 15.
    let field = |n: usize| {
        f.get(n - 3)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    field(14) + field(15)
}

/// Clock ticks per second (`getconf CLK_TCK`; 100 on Linux).
pub fn clock_ticks_per_second() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as u64
    } else {
        100
    }
}

/// Samples the guard's RSS every few milliseconds while `f` runs; returns `f`'s result and
/// the highest RSS seen (KiB).
pub fn peak_rss_during<T>(pid: u32, f: impl FnOnce() -> T) -> (T, u64) {
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let sampler = thread::spawn(move || {
        let mut peak = proc_rss_kib(pid);
        while !s.load(Ordering::SeqCst) {
            peak = peak.max(proc_rss_kib(pid));
            thread::sleep(Duration::from_millis(5));
        }
        peak.max(proc_rss_kib(pid))
    });
    let out = f();
    stop.store(true, Ordering::SeqCst);
    let peak = sampler.join().unwrap_or(0);
    (out, peak)
}

/// Runs the binary with `args`, expecting it to exit on its own (bounded). Returns the exit
/// status and stderr. If it is still running after the wait, it is killed and this panics.
#[track_caller]
pub fn run_to_exit(args: &[&str]) -> (ExitStatus, String) {
    let dir = TempDir::new();
    let err_path = dir.path.join("stderr.log");
    let stderr = File::create(&err_path).unwrap();
    let mut child = Command::new(bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(stderr))
        .spawn()
        .expect("spawn mailguard");
    let deadline = Instant::now() + WAIT;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            let err = std::fs::read_to_string(&err_path).unwrap_or_default();
            return (status, err);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            let err = std::fs::read_to_string(&err_path).unwrap_or_default();
            panic!("mailguard {args:?} still running after {WAIT:?}; stderr: {err:?}");
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Asserts a failed start: non-zero exit and exactly one non-empty line on stderr.
#[track_caller]
pub fn assert_one_line_failure(status: ExitStatus, stderr: &str) {
    assert!(
        !status.success(),
        "expected a non-zero exit, got {status}; stderr: {stderr:?}"
    );
    let trimmed = stderr.strip_suffix('\n').unwrap_or(stderr);
    assert!(
        !trimmed.trim().is_empty(),
        "expected one line on stderr, got nothing"
    );
    assert!(
        !trimmed.contains('\n'),
        "expected ONE line on stderr, got {}: {stderr:?}",
        stderr.lines().count()
    );
}

// ---------------------------------------------------------------------------------------------
// Raw client
// ---------------------------------------------------------------------------------------------

/// One SMTP reply.
#[derive(Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    /// The text of each line (after `250-` / `250 `).
    pub lines: Vec<String>,
    /// The reply exactly as received, CRLFs included.
    pub raw: Vec<u8>,
}

impl Reply {
    /// The lines joined with `\n`.
    pub fn text(&self) -> String {
        self.lines.join("\n")
    }

    /// The enhanced status code at the start of the first line, if any (`5.5.1`).
    pub fn enhanced(&self) -> Option<&str> {
        let first = self.lines.first()?;
        let tok = first.split(' ').next()?;
        let parts: Vec<&str> = tok.split('.').collect();
        let ok = parts.len() == 3
            && parts
                .iter()
                .all(|p| !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()));
        ok.then_some(tok)
    }

    /// Asserts the code and the enhanced status code.
    #[track_caller]
    pub fn expect(&self, code: u16, enhanced: &str) -> &Reply {
        assert!(
            self.code == code && self.enhanced() == Some(enhanced),
            "expected `{code} {enhanced} ...`, got {self}"
        );
        self
    }

    /// Asserts the code only.
    #[track_caller]
    pub fn expect_code(&self, code: u16) -> &Reply {
        assert_eq!(self.code, code, "unexpected reply {self}");
        self
    }

    /// Asserts the raw reply is exactly `raw`.
    #[track_caller]
    pub fn expect_raw(&self, raw: &str) -> &Reply {
        assert_eq!(
            String::from_utf8_lossy(&self.raw),
            raw,
            "unexpected raw reply"
        );
        self
    }

    /// Whether this is exactly the guard's reply to a blocked verb (reject flavour).
    pub fn is_blocked_reject(&self) -> bool {
        self.code == 500 && self.enhanced() == Some("5.5.1")
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", show(&self.raw))
    }
}

impl fmt::Debug for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Reply({})", show(&self.raw))
    }
}

/// Why no reply could be read; each holds the bytes read so far.
#[derive(Debug)]
pub enum ReadError {
    Timeout(Vec<u8>),
    Closed(Vec<u8>),
    Malformed(Vec<u8>),
}

/// A raw SMTP client with bounded reads.
pub struct Client {
    pub stream: TcpStream,
    buf: Vec<u8>,
    timeout: Duration,
    /// The greeting, when made by [`Client::greeted`].
    pub greeting: Option<Reply>,
}

impl Client {
    /// Connects (bounded), with TCP_NODELAY.
    #[track_caller]
    pub fn connect(addr: SocketAddr) -> Client {
        let stream = TcpStream::connect_timeout(&addr, WAIT)
            .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
        let _ = stream.set_nodelay(true);
        let _ = stream.set_write_timeout(Some(WAIT * 3));
        Client {
            stream,
            buf: Vec::new(),
            timeout: WAIT,
            greeting: None,
        }
    }

    /// Connects from the local address `from` (for example 127.0.0.2, to look like another
    /// client host on the loopback), with TCP_NODELAY.
    #[track_caller]
    pub fn connect_from(from: std::net::IpAddr, addr: SocketAddr) -> Client {
        use socket2::{Domain, Socket, Type};
        let sock = Socket::new(Domain::for_address(addr), Type::STREAM, None).expect("socket");
        sock.bind(&SocketAddr::new(from, 0).into())
            .unwrap_or_else(|e| panic!("bind {from}: {e}"));
        sock.connect_timeout(&addr.into(), WAIT)
            .unwrap_or_else(|e| panic!("connect {from} -> {addr}: {e}"));
        let stream: TcpStream = sock.into();
        let _ = stream.set_nodelay(true);
        let _ = stream.set_write_timeout(Some(WAIT * 3));
        Client {
            stream,
            buf: Vec::new(),
            timeout: WAIT,
            greeting: None,
        }
    }

    /// Connects and reads the greeting, which must be a 220.
    #[track_caller]
    pub fn greeted(addr: SocketAddr) -> Client {
        let mut c = Client::connect(addr);
        let g = c.read_reply();
        assert_eq!(g.code, 220, "greeting: {g}");
        c.greeting = Some(g);
        c
    }

    /// Sets how long one reply may take.
    pub fn set_timeout(&mut self, d: Duration) {
        self.timeout = d;
    }

    #[track_caller]
    pub fn send(&mut self, b: &[u8]) {
        if let Err(e) = self.try_send(b) {
            panic!("send {}: {e}", show(b));
        }
    }

    pub fn try_send(&mut self, b: &[u8]) -> io::Result<()> {
        self.stream.write_all(b)?;
        self.stream.flush()
    }

    /// One byte per write (TCP_NODELAY, flushed, a short pause after each).
    #[track_caller]
    pub fn send_bytewise(&mut self, b: &[u8]) {
        self.stream.set_nodelay(true).unwrap();
        for &byte in b {
            self.send(&[byte]);
            thread::sleep(Duration::from_micros(500));
        }
    }

    /// Writes `b` in pieces cut at `points` (offsets into `b`), pausing between pieces.
    #[track_caller]
    pub fn send_split(&mut self, b: &[u8], points: &[usize], pause: Duration) {
        let mut cuts: Vec<usize> = points.iter().map(|&p| p.min(b.len())).collect();
        cuts.sort_unstable();
        cuts.dedup();
        let mut start = 0;
        for cut in cuts.into_iter().chain(std::iter::once(b.len())) {
            if cut > start {
                self.send(&b[start..cut]);
                thread::sleep(pause);
                start = cut;
            }
        }
    }

    /// Sends `line` + CRLF and reads one reply.
    #[track_caller]
    pub fn cmd(&mut self, line: &str) -> Reply {
        self.cmd_bytes(line.as_bytes())
    }

    /// Sends `line` + CRLF and reads one reply.
    #[track_caller]
    pub fn cmd_bytes(&mut self, line: &[u8]) -> Reply {
        let mut b = line.to_vec();
        b.extend_from_slice(b"\r\n");
        self.send(&b);
        self.read_reply()
    }

    fn fill(&mut self, deadline: Instant) -> Result<(), ReadError> {
        let now = Instant::now();
        if now >= deadline {
            return Err(ReadError::Timeout(self.buf.clone()));
        }
        self.stream
            .set_read_timeout(Some((deadline - now).max(Duration::from_millis(1))))
            .unwrap();
        let mut chunk = [0u8; 16 * 1024];
        match self.stream.read(&mut chunk) {
            Ok(0) => Err(ReadError::Closed(self.buf.clone())),
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Ok(())
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                Err(ReadError::Timeout(self.buf.clone()))
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => Ok(()),
            Err(_) => Err(ReadError::Closed(self.buf.clone())),
        }
    }

    fn read_line(&mut self, deadline: Instant) -> Result<Vec<u8>, ReadError> {
        loop {
            if let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
                return Ok(self.buf.drain(..=i).collect());
            }
            self.fill(deadline)?;
        }
    }

    /// Reads one complete (possibly multi-line) reply.
    pub fn try_read_reply(&mut self) -> Result<Reply, ReadError> {
        let deadline = Instant::now() + self.timeout;
        let mut raw = Vec::new();
        let mut lines = Vec::new();
        let mut code: Option<u16> = None;
        loop {
            let line = self.read_line(deadline).map_err(|e| match e {
                ReadError::Timeout(mut b) => {
                    raw.append(&mut b);
                    ReadError::Timeout(raw.clone())
                }
                ReadError::Closed(mut b) => {
                    raw.append(&mut b);
                    ReadError::Closed(raw.clone())
                }
                m => m,
            })?;
            raw.extend_from_slice(&line);
            let s = line
                .strip_suffix(b"\r\n")
                .or_else(|| line.strip_suffix(b"\n"))
                .unwrap_or(&line);
            if s.len() < 3 || !s[..3].iter().all(|b| b.is_ascii_digit()) {
                return Err(ReadError::Malformed(raw));
            }
            let c: u16 = std::str::from_utf8(&s[..3]).unwrap().parse().unwrap();
            if code.is_some_and(|old| old != c) {
                return Err(ReadError::Malformed(raw));
            }
            code = Some(c);
            lines.push(String::from_utf8_lossy(s.get(4..).unwrap_or(b"")).into_owned());
            match s.get(3) {
                None | Some(b' ') => {
                    return Ok(Reply {
                        code: c,
                        lines,
                        raw,
                    })
                }
                Some(b'-') => {}
                Some(_) => return Err(ReadError::Malformed(raw)),
            }
        }
    }

    /// Reads one reply; panics (naming what was read) on timeout, close or garbage.
    #[track_caller]
    pub fn read_reply(&mut self) -> Reply {
        match self.try_read_reply() {
            Ok(r) => r,
            Err(ReadError::Timeout(b)) => {
                panic!(
                    "no complete reply within {:?}; got {}",
                    self.timeout,
                    show(&b)
                )
            }
            Err(ReadError::Closed(b)) => {
                panic!(
                    "connection closed while waiting for a reply; got {}",
                    show(&b)
                )
            }
            Err(ReadError::Malformed(b)) => panic!("malformed reply {}", show(&b)),
        }
    }

    /// Reads `n` replies.
    #[track_caller]
    pub fn read_replies(&mut self, n: usize) -> Vec<Reply> {
        (0..n).map(|_| self.read_reply()).collect()
    }

    /// Reads exactly `n` raw bytes (bounded).
    #[track_caller]
    pub fn read_exact_bytes(&mut self, n: usize) -> Vec<u8> {
        let deadline = Instant::now() + self.timeout;
        while self.buf.len() < n {
            if let Err(e) = self.fill(deadline) {
                panic!("wanted {n} bytes, got {e:?}");
            }
        }
        self.buf.drain(..n).collect()
    }

    /// Waits (bounded) for the peer to close. `Ok(bytes read meanwhile)` if it closed,
    /// `Err(bytes)` if it did not within the timeout.
    pub fn wait_closed(&mut self) -> Result<Vec<u8>, Vec<u8>> {
        let deadline = Instant::now() + self.timeout;
        loop {
            match self.fill(deadline) {
                Ok(()) => {}
                Err(ReadError::Closed(_)) => return Ok(std::mem::take(&mut self.buf)),
                Err(ReadError::Timeout(b)) | Err(ReadError::Malformed(b)) => return Err(b),
            }
        }
    }

    /// Asserts the peer closes (bounded) without sending anything more.
    #[track_caller]
    pub fn expect_closed(&mut self) {
        match self.wait_closed() {
            Ok(rest) => assert!(
                rest.is_empty(),
                "expected a close, got more bytes first: {}",
                show(&rest)
            ),
            Err(b) => panic!(
                "connection still open after {:?} (read {})",
                self.timeout,
                show(&b)
            ),
        }
    }

    /// `EHLO client.test`, which must be answered 250.
    #[track_caller]
    pub fn ehlo(&mut self) -> Reply {
        let r = self.cmd(&format!("EHLO {CLIENT_NAME}"));
        assert_eq!(r.code, 250, "EHLO: {r}");
        r
    }

    /// `HELO client.test`, which must be answered 250.
    #[track_caller]
    pub fn helo(&mut self) -> Reply {
        let r = self.cmd(&format!("HELO {CLIENT_NAME}"));
        assert_eq!(r.code, 250, "HELO: {r}");
        r
    }

    /// MAIL, RCPT and DATA one by one, answered 250, 250, 354.
    #[track_caller]
    pub fn start_data(&mut self, from: &str, to: &str) {
        self.cmd(&format!("MAIL FROM:<{from}>")).expect_code(250);
        self.cmd(&format!("RCPT TO:<{to}>")).expect_code(250);
        self.cmd("DATA").expect_code(354);
    }

    /// A whole message by DATA: `wire_body` is sent as is (so it must already be dot-stuffed
    /// and end with CRLF), then `.\r\n`; returns the reply to the end of data.
    #[track_caller]
    pub fn send_message(&mut self, from: &str, to: &str, wire_body: &[u8]) -> Reply {
        self.start_data(from, to);
        self.send(wire_body);
        self.send(b".\r\n");
        self.read_reply()
    }
}

/// The EHLO lines (text after `250-`/`250 `) the upstream's reply holds, minus the keywords
/// whose first word is in `removed`.
pub fn ehlo_lines_without(removed: &[&str]) -> Vec<String> {
    let mut v = vec!["upstream.test".to_string()];
    for k in KEYWORDS {
        let word = k.split(' ').next().unwrap();
        if !removed.contains(&word) {
            v.push(k.to_string());
        }
    }
    v
}

/// The raw EHLO reply made of `lines`.
pub fn ehlo_raw(lines: &[String]) -> String {
    let mut s = String::new();
    for (i, l) in lines.iter().enumerate() {
        let sep = if i + 1 == lines.len() { ' ' } else { '-' };
        s.push_str(&format!("250{sep}{l}\r\n"));
    }
    s
}

/// A realistic TLS 1.2/1.3 ClientHello record, as a TLS client would send it first.
pub fn tls_client_hello() -> Vec<u8> {
    let mut hello = vec![0x03, 0x03]; // client_version
    hello.extend_from_slice(&pseudo_random(32, 7)); // random
    hello.push(0); // session id
    hello.extend_from_slice(&[0x00, 0x04, 0x13, 0x01, 0x13, 0x02]); // cipher suites
    hello.extend_from_slice(&[0x01, 0x00]); // compression: null
    let sni = b"mx.example.test";
    let mut ext = Vec::new();
    ext.extend_from_slice(&[0x00, 0x00]);
    let list_len = sni.len() + 3;
    ext.extend_from_slice(&((list_len + 2) as u16).to_be_bytes());
    ext.extend_from_slice(&(list_len as u16).to_be_bytes());
    ext.push(0);
    ext.extend_from_slice(&(sni.len() as u16).to_be_bytes());
    ext.extend_from_slice(sni);
    hello.extend_from_slice(&(ext.len() as u16).to_be_bytes());
    hello.extend_from_slice(&ext);
    let mut handshake = vec![0x01];
    handshake.extend_from_slice(&(hello.len() as u32).to_be_bytes()[1..]);
    handshake.extend_from_slice(&hello);
    let mut record = vec![0x16, 0x03, 0x01];
    record.extend_from_slice(&(handshake.len() as u16).to_be_bytes());
    record.extend_from_slice(&handshake);
    record
}

/// Asserts no upstream command line contains `needle`.
#[track_caller]
pub fn assert_never_forwarded(up: &Upstream, needle: &[u8]) {
    let cmds = up.commands();
    assert!(
        !cmds.iter().any(|c| contains(c, needle)),
        "{} reached the upstream: {}",
        show(needle),
        show_lines(&cmds)
    );
}

/// Asserts the upstream received the exact command line `line`.
#[track_caller]
pub fn assert_forwarded(up: &Upstream, line: &[u8]) {
    let cmds = up.commands();
    assert!(
        cmds.iter().any(|c| c == line),
        "{} did not reach the upstream: {}",
        show(line),
        show_lines(&cmds)
    );
}

/// Exact path string of a policy file for `file:line:column` checks.
pub fn path_str(p: &Path) -> String {
    p.display().to_string()
}
