//! Helpers of the operations tests (`tests/ops_*.rs`): the real binary as a process we can
//! signal ([`Proc`]), a light SMTP sink upstream that records messages ([`Sink`]), and a small
//! bounded SMTP client ([`Smtp`]).
//!
//! Everything listens on 127.0.0.1; every read and wait is bounded; the only process ever
//! signalled or killed is the child spawned here, by its PID.
#![allow(dead_code)]

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// How long a test waits for anything.
pub const WAIT: Duration = Duration::from_secs(15);

/// Path of the binary under test.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_mailguard")
}

/// Polls `f` until it is true or `timeout` passed; returns its last value.
pub fn wait_for(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// A port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

static UNIQUE: AtomicUsize = AtomicUsize::new(0);

/// A directory removed on drop.
pub struct Dir {
    pub path: PathBuf,
}

impl Dir {
    pub fn new() -> Dir {
        let n = UNIQUE.fetch_add(1, Ordering::SeqCst);
        let path = std::env::temp_dir().join(format!("mailguard-ops-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("temp dir");
        Dir { path }
    }

    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.path.join(name);
        std::fs::write(&p, text).expect("write temp file");
        p
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Path as a string argument.
pub fn arg(p: &Path) -> String {
    p.display().to_string()
}

// ---------------------------------------------------------------------------------------------
// The process
// ---------------------------------------------------------------------------------------------

/// The running binary; killed (by its PID) on drop if still running.
pub struct Proc {
    child: Child,
    pub addr: SocketAddr,
    pub dir: Dir,
    exited: Option<ExitStatus>,
}

impl Proc {
    /// Starts `mailguard ARGS` (with `env` added) and waits (bounded) until it accepts on
    /// `addr`. Panics with its stderr if it does not.
    #[track_caller]
    pub fn start(addr: SocketAddr, args: &[String], env: &[(&str, String)]) -> Proc {
        let dir = Dir::new();
        let stderr = File::create(dir.path.join("stderr.log")).expect("stderr file");
        let mut cmd = Command::new(bin());
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(stderr));
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn mailguard");
        let mut p = Proc {
            child,
            addr,
            dir,
            exited: None,
        };
        let up = wait_for(WAIT, || {
            p.exit_status().is_some() || p.log().contains(" listening on ")
        });
        if !up || p.exit_status().is_some() {
            panic!("mailguard did not start; stderr: {}", p.log());
        }
        p
    }

    /// Everything it logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path.join("stderr.log")).unwrap_or_default()
    }

    /// Log lines containing `needle`.
    pub fn log_lines(&self, needle: &str) -> Vec<String> {
        self.log()
            .lines()
            .filter(|l| l.contains(needle))
            .map(str::to_string)
            .collect()
    }

    /// Waits (bounded) until at least `n` log lines contain `needle`.
    pub fn wait_log(&self, needle: &str, n: usize) -> bool {
        wait_for(WAIT, || self.log_lines(needle).len() >= n)
    }

    /// Sends `signal` (a name: HUP, TERM, INT, USR1) to this child, by its PID, with
    /// kill(1).
    #[track_caller]
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("run kill(1)");
        assert!(
            status.success(),
            "kill -{signal} {} failed",
            self.child.id()
        );
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status, if it exited.
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            if let Ok(Some(status)) = self.child.try_wait() {
                self.exited = Some(status);
            }
        }
        self.exited
    }

    /// Waits (bounded by `timeout`) for it to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        wait_for(timeout, || self.exit_status().is_some());
        self.exit_status()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.exit_status().is_none() {
            // `Child::kill` signals exactly this child's PID.
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `--listen 127.0.0.1:PORT --upstream UP --threads 2` plus `extra`; returns the listen
/// address and the arguments.
pub fn base_args(upstream: SocketAddr, extra: &[&str]) -> (SocketAddr, Vec<String>) {
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let mut args = vec![
        "--listen".to_string(),
        listen.to_string(),
        "--upstream".to_string(),
        upstream.to_string(),
        "--threads".to_string(),
        "2".to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    (listen, args)
}

/// Runs the binary to its exit (bounded); returns status, stdout and stderr.
#[track_caller]
pub fn run_to_exit(args: &[String]) -> (ExitStatus, String, String) {
    let mut child = Command::new(bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn mailguard");
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let out_reader = thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_reader = thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Ok(Some(status)) = child.try_wait() {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("mailguard {args:?} did not exit within {WAIT:?}");
        }
        thread::sleep(Duration::from_millis(20));
    };
    let out = out_reader.join().unwrap_or_default();
    let err = err_reader.join().unwrap_or_default();
    (status, out, err)
}

// ---------------------------------------------------------------------------------------------
// Sink upstream
// ---------------------------------------------------------------------------------------------

/// The sink's EHLO keywords.
pub const SINK_KEYWORDS: &[&str] = &["PIPELINING", "SIZE 10000000", "8BITMIME", "STARTTLS"];

#[derive(Default)]
struct SinkState {
    messages: Mutex<Vec<Vec<u8>>>,
    connections: AtomicUsize,
}

/// A light SMTP server on 127.0.0.1 that accepts every message: one small-stack thread per
/// connection, blocking I/O, no polling. Connection threads end when the guard closes.
pub struct Sink {
    pub addr: SocketAddr,
    state: Arc<SinkState>,
}

impl Sink {
    pub fn start() -> Sink {
        // A deep backlog: the guard opens thousands of upstream connections in a burst, and
        // std's 128 would make the kernel drop SYNs (retried only after a second or more).
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("sink socket");
        let any: SocketAddr = "127.0.0.1:0".parse().expect("addr");
        socket.bind(&any.into()).expect("bind sink");
        socket.listen(4096).expect("listen sink");
        let listener: TcpListener = socket.into();
        let addr = listener.local_addr().expect("addr");
        let state = Arc::new(SinkState::default());
        let st = Arc::clone(&state);
        thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                st.connections.fetch_add(1, Ordering::SeqCst);
                let st = Arc::clone(&st);
                let _ = thread::Builder::new()
                    .stack_size(128 * 1024)
                    .spawn(move || {
                        let _ = serve(stream, &st);
                    });
            }
        });
        Sink { addr, state }
    }

    /// Message bodies received so far (up to, not including, the final `.` line).
    pub fn messages(&self) -> Vec<Vec<u8>> {
        self.state
            .messages
            .lock()
            .map(|m| m.clone())
            .unwrap_or_default()
    }

    pub fn message_count(&self) -> usize {
        self.state.messages.lock().map(|m| m.len()).unwrap_or(0)
    }

    pub fn connections(&self) -> usize {
        self.state.connections.load(Ordering::SeqCst)
    }
}

fn serve(stream: TcpStream, st: &SinkState) -> io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(120)))?;
    let _ = stream.set_nodelay(true);
    let mut w = stream.try_clone()?;
    let mut r = BufReader::new(stream);
    w.write_all(b"220 sink.test ESMTP\r\n")?;
    let mut line = Vec::new();
    loop {
        line.clear();
        if r.read_until(b'\n', &mut line)? == 0 {
            return Ok(());
        }
        let verb = String::from_utf8_lossy(&line)
            .split_whitespace()
            .next()
            .unwrap_or("")
            .to_ascii_uppercase();
        match verb.as_str() {
            "EHLO" => {
                let mut reply = String::from("250-sink.test\r\n");
                for (i, k) in SINK_KEYWORDS.iter().enumerate() {
                    let sep = if i + 1 == SINK_KEYWORDS.len() {
                        ' '
                    } else {
                        '-'
                    };
                    reply.push_str(&format!("250{sep}{k}\r\n"));
                }
                w.write_all(reply.as_bytes())?;
            }
            "DATA" => {
                w.write_all(b"354 go ahead\r\n")?;
                let mut body = Vec::new();
                loop {
                    line.clear();
                    if r.read_until(b'\n', &mut line)? == 0 {
                        return Ok(());
                    }
                    if line == b".\r\n" {
                        break;
                    }
                    body.extend_from_slice(&line);
                }
                if let Ok(mut m) = st.messages.lock() {
                    m.push(body);
                }
                w.write_all(b"250 2.0.0 queued\r\n")?;
            }
            "QUIT" => {
                w.write_all(b"221 2.0.0 bye\r\n")?;
                return Ok(());
            }
            "AUTH" => w.write_all(b"235 2.7.0 ok\r\n")?,
            _ => w.write_all(b"250 2.0.0 ok\r\n")?,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Client
// ---------------------------------------------------------------------------------------------

/// One reply: its code and its raw lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub lines: Vec<String>,
}

impl Reply {
    pub fn text(&self) -> String {
        self.lines.join("\n")
    }
}

/// A bounded SMTP client.
pub struct Smtp {
    pub stream: TcpStream,
    reader: BufReader<TcpStream>,
}

impl Smtp {
    /// Connects; does not read the greeting.
    pub fn connect(addr: SocketAddr) -> io::Result<Smtp> {
        let stream = TcpStream::connect_timeout(&addr, WAIT)?;
        stream.set_read_timeout(Some(WAIT))?;
        stream.set_write_timeout(Some(WAIT))?;
        let _ = stream.set_nodelay(true);
        let reader = BufReader::new(stream.try_clone()?);
        Ok(Smtp { stream, reader })
    }

    /// Connects and reads a 220 greeting.
    #[track_caller]
    pub fn greeted(addr: SocketAddr) -> Smtp {
        let mut c = Smtp::connect(addr).expect("connect");
        let g = c.reply().expect("greeting");
        assert_eq!(g.code, 220, "greeting {g:?}");
        c
    }

    pub fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// Reads one (possibly multi-line) reply.
    pub fn reply(&mut self) -> io::Result<Reply> {
        let mut lines = Vec::new();
        loop {
            let mut line = String::new();
            if self.reader.read_line(&mut line)? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("closed after {lines:?}"),
                ));
            }
            let line = line.trim_end().to_string();
            let code = line.get(..3).and_then(|c| c.parse::<u16>().ok());
            let last = line.as_bytes().get(3) != Some(&b'-');
            lines.push(line);
            if last {
                let Some(code) = code else {
                    return Err(io::Error::new(io::ErrorKind::InvalidData, lines.join("|")));
                };
                return Ok(Reply { code, lines });
            }
        }
    }

    /// Sends a command line and reads its reply.
    pub fn cmd(&mut self, line: &str) -> io::Result<Reply> {
        self.send(format!("{line}\r\n").as_bytes())?;
        self.reply()
    }

    /// Sends a command and expects `code`.
    #[track_caller]
    pub fn expect(&mut self, line: &str, code: u16) -> Reply {
        match self.cmd(line) {
            Ok(r) if r.code == code => r,
            other => panic!("{line}: wanted {code}, got {other:?}"),
        }
    }

    /// Reads until the peer closes; returns what came (bounded by the read timeout).
    pub fn read_to_close(&mut self) -> io::Result<String> {
        let mut rest = String::new();
        self.reader.read_to_string(&mut rest)?;
        Ok(rest)
    }

    /// A whole message: MAIL, RCPT, DATA, `body` (CRLF lines, not dot-stuffed), end of data.
    pub fn message(&mut self, from: &str, to: &str, body: &str) -> io::Result<Reply> {
        for (line, code) in [
            (format!("MAIL FROM:<{from}>"), 250),
            (format!("RCPT TO:<{to}>"), 250),
            ("DATA".to_string(), 354),
        ] {
            let r = self.cmd(&line)?;
            if r.code != code {
                return Ok(r);
            }
        }
        self.send(format!("{body}.\r\n").as_bytes())?;
        self.reply()
    }
}
