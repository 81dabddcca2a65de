//! End-to-end tests of the `loadgen` binary: send -> sink with verification, the sink's fault
//! detection (a raw-socket client injects a lost, a duplicated and a corrupted message), JSON
//! output, usage errors, and `bench`'s child-process plumbing (through `loadgen relay` as a
//! stand-in for mailguard).
//!
//! Loopback only; every process gets a `--timeout` and every wait a deadline; no assertion
//! depends on timing.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use loadgen::message::Template;
use serde_json::Value;

fn loadgen() -> Command {
    Command::new(env!("CARGO_BIN_EXE_loadgen"))
}

/// Runs loadgen with `args`, killing it if it outlives `limit`.
fn run(args: &[&str], limit: Duration) -> Output {
    let mut child = loadgen()
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn loadgen");
    let until = Instant::now() + limit;
    while child.try_wait().expect("try_wait").is_none() {
        if Instant::now() > until {
            let _ = child.kill();
            panic!("loadgen {args:?} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().expect("output")
}

fn json(bytes: &[u8]) -> Value {
    let text = String::from_utf8_lossy(bytes);
    let line = text.lines().last().unwrap_or("");
    serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// A `loadgen sink` child on an ephemeral port.
struct SinkProc {
    child: Child,
    addr: SocketAddr,
    lines: mpsc::Receiver<String>,
}

impl SinkProc {
    fn start(extra: &[&str]) -> SinkProc {
        let mut child = loadgen()
            .args(["sink", "--listen", "127.0.0.1:0", "--timeout", "60"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn sink");
        let mut err = BufReader::new(child.stderr.take().expect("stderr"));
        let mut first = String::new();
        err.read_line(&mut first).expect("sink stderr");
        let addr = first
            .split("listening on ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no address in {first:?}"));
        // Keep draining stderr so the sink never writes into a closed pipe.
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut err, &mut std::io::sink());
        });
        let (tx, lines) = mpsc::channel();
        let out = child.stdout.take().expect("stdout");
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        SinkProc { child, addr, lines }
    }

    fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill(2) on our own, not yet reaped, child.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, sig);
        }
    }

    fn next_line(&self) -> String {
        self.lines
            .recv_timeout(Duration::from_secs(20))
            .expect("a line from the sink")
    }

    /// SIGTERM, then the JSON summary (the last stdout line) and the exit status.
    fn stop(mut self) -> (Value, i32) {
        self.signal(libc::SIGTERM);
        let until = Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                break s;
            }
            if Instant::now() > until {
                let _ = self.child.kill();
                panic!("sink did not exit on SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let mut last = None;
        while let Ok(l) = self.lines.recv_timeout(Duration::from_secs(5)) {
            last = Some(l);
        }
        let last = last.expect("sink printed a summary");
        (
            serde_json::from_str(&last).unwrap_or_else(|e| panic!("{e}: {last}")),
            status.code().unwrap_or(-1),
        )
    }
}

impl Drop for SinkProc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[test]
fn send_to_verifying_sink_delivers_every_message() {
    let sink = SinkProc::start(&["--verify", "--expect", "300", "--json"]);
    let target = sink.addr.to_string();
    let out = run(
        &[
            "send",
            "--target",
            &target,
            "--messages",
            "300",
            "--sessions",
            "4",
            "--run-id",
            "t1",
            "--json",
            "--timeout",
            "60",
        ],
        Duration::from_secs(90),
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sent = json(&out.stdout);
    assert_eq!(sent["acknowledged"], 300);
    assert_eq!(sent["failed"], 0);
    assert_eq!(sent["timed_out"], false);
    assert_eq!(sent["sessions_opened"], 300);
    assert_eq!(sent["latency"]["mail_to_final"]["count"], 300);
    assert_eq!(sent["latency"]["connect_to_banner"]["count"], 300);
    assert!(sent["latency"]["mail_to_final"]["p99_us"].as_f64().unwrap() > 0.0);
    assert!(sent["messages_per_s"].as_f64().unwrap() > 0.0);
    assert!(sent["errors"].as_object().unwrap().is_empty());
    let (got, code) = sink.stop();
    assert_eq!(code, 0);
    assert_eq!(got["messages"], 300);
    assert_eq!(got["distinct"], 300);
    assert_eq!(got["lost"], 0);
    assert_eq!(got["duplicated"], 0);
    assert_eq!(got["corrupted"], 0);
    assert_eq!(got["foreign"], 0);
    // Both sides count unstuffed message bytes: they must agree to the byte.
    assert_eq!(got["bytes"], sent["bytes"]);
    assert_eq!(got["runs"][0]["run_id"], "t1");
}

#[test]
fn pipelined_persistent_multi_recipient_sessions_verify() {
    // A slow sink (1 ms per reply flush) keeps pipelined replies queued up.
    let sink = SinkProc::start(&["--verify", "--expect", "200", "--json", "--delay-ms", "1"]);
    let target = sink.addr.to_string();
    let out = run(
        &[
            "send",
            "--target",
            &target,
            "--messages",
            "200",
            "--sessions",
            "3",
            "--pipelining",
            "--per-session",
            "25",
            "--recipients",
            "3",
            "--size",
            "5000",
            "--json",
            "--threads",
            "2",
            "--timeout",
            "60",
        ],
        Duration::from_secs(90),
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sent = json(&out.stdout);
    assert_eq!(sent["acknowledged"], 200);
    assert_eq!(sent["pipelining"], true);
    assert!(sent["sessions_opened"].as_u64().unwrap() >= 8);
    let (got, _) = sink.stop();
    assert_eq!(
        (got["distinct"].as_u64(), got["lost"].as_u64()),
        (Some(200), Some(0))
    );
    assert_eq!(
        (got["duplicated"].as_u64(), got["corrupted"].as_u64()),
        (Some(0), Some(0))
    );
    assert_eq!(got["bytes"], sent["bytes"]);
}

#[test]
fn open_loop_and_duration_runs_are_bounded_and_verified() {
    let sink = SinkProc::start(&["--verify", "--json"]);
    let target = sink.addr.to_string();
    let out = run(
        &[
            "send",
            "--target",
            &target,
            "--messages",
            "40",
            "--rate",
            "400",
            "--sessions",
            "4",
            "--json",
            "--timeout",
            "60",
        ],
        Duration::from_secs(90),
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rate = json(&out.stdout);
    assert_eq!(rate["acknowledged"], 40);
    assert_eq!(rate["latency"]["intended_to_final"]["count"], 40);

    let out = run(
        &[
            "send",
            "--target",
            &target,
            "--duration",
            "0.3",
            "--sessions",
            "2",
            "--per-session",
            "10",
            "--json",
            "--timeout",
            "60",
        ],
        Duration::from_secs(90),
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dur = json(&out.stdout);
    let acked = dur["acknowledged"].as_u64().unwrap();
    assert!(acked > 0);
    let (got, _) = sink.stop();
    assert_eq!(got["distinct"].as_u64(), Some(40 + acked));
    assert_eq!(
        (got["duplicated"].as_u64(), got["corrupted"].as_u64()),
        (Some(0), Some(0))
    );
}

/// A line-oriented SMTP client for the raw tests.
struct Raw {
    s: TcpStream,
    r: BufReader<TcpStream>,
}

impl Raw {
    fn connect(addr: SocketAddr) -> Raw {
        let s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let r = BufReader::new(s.try_clone().unwrap());
        let mut raw = Raw { s, r };
        assert!(raw.reply().starts_with("220 "));
        raw
    }
    fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).expect("write");
    }
    /// One complete reply, all lines joined.
    fn reply(&mut self) -> String {
        let mut all = String::new();
        loop {
            let mut line = String::new();
            self.r.read_line(&mut line).expect("read reply");
            assert!(line.len() >= 4, "short reply line {line:?} after {all:?}");
            all.push_str(&line);
            if line.as_bytes()[3] == b' ' {
                return all;
            }
        }
    }
    fn cmd(&mut self, c: &str) -> String {
        self.send(format!("{c}\r\n").as_bytes());
        self.reply()
    }
    /// MAIL, RCPT, DATA, then `wire` (dot-stuffed content without the final dot line).
    fn data(&mut self, wire: &[u8]) -> String {
        assert!(self.cmd("MAIL FROM:<a@x>").starts_with("250"));
        assert!(self.cmd("RCPT TO:<b@y>").starts_with("250"));
        assert!(self.cmd("DATA").starts_with("354"));
        self.send(wire);
        self.send(b".\r\n");
        self.reply()
    }
}

fn message(t: &Template, seq: u64) -> Vec<u8> {
    let mut m = Vec::new();
    t.write_message(seq, &mut m);
    m
}

#[test]
fn sink_detects_lost_duplicated_corrupted_and_foreign_messages() {
    let sink = SinkProc::start(&["--verify", "--expect", "5", "--json"]);
    let t = Template::new("inj", 2000, "a@x", "b@y");
    let mut c = Raw::connect(sink.addr);
    assert!(c.cmd("EHLO test").starts_with("250"));
    for seq in [0, 1] {
        assert!(c.data(&message(&t, seq)).starts_with("250 2.0.0"));
    }
    // Seq 2 by BDAT, in two chunks (raw bytes: no dot-stuffing with BDAT).
    let m = message(&t, 2);
    let mut raw = Vec::new();
    for line in m.split_inclusive(|&b| b == b'\n') {
        raw.extend_from_slice(if line.starts_with(b"..") {
            &line[1..]
        } else {
            line
        });
    }
    assert!(c.cmd("MAIL FROM:<a@x>").starts_with("250"));
    assert!(c.cmd("RCPT TO:<b@y>").starts_with("250"));
    let (a, b) = raw.split_at(700);
    c.send(format!("BDAT {}\r\n", a.len()).as_bytes());
    c.send(a);
    assert!(c.reply().starts_with("250"));
    c.send(format!("BDAT {} LAST\r\n", b.len()).as_bytes());
    c.send(b);
    assert!(c.reply().starts_with("250 2.0.0"));
    // Seq 1 again: a duplicate.
    assert!(c.data(&message(&t, 1)).starts_with("250"));
    // Seq 3 with one body byte changed: corrupted.
    let mut bad = message(&t, 3);
    let i = bad.len() - 20;
    bad[i] = if bad[i] == b'a' { b'b' } else { b'a' };
    assert!(c.data(&bad).starts_with("250"));
    // Not a loadgen message at all.
    assert!(c.data(b"Subject: hello\r\n\r\nhi\r\n").starts_with("250"));
    assert!(c.cmd("QUIT").starts_with("221"));
    // Seq 4 never arrives: lost.
    let (got, code) = sink.stop();
    assert_eq!(code, 0);
    assert_eq!(got["messages"], 6);
    assert_eq!(got["distinct"], 4);
    assert_eq!(got["duplicated"], 1);
    assert_eq!(got["corrupted"], 1);
    assert_eq!(got["foreign"], 1);
    assert_eq!(got["lost"], 1);
}

#[test]
fn sink_speaks_smtp_and_ends_data_only_at_crlf_dot_crlf() {
    let sink = SinkProc::start(&["--json", "--verify"]);
    let mut c = Raw::connect(sink.addr);
    assert!(c.cmd("MAIL FROM:<a@x>").starts_with("503"));
    let ehlo = c.cmd("EHLO test");
    for ext in [
        "PIPELINING",
        "SIZE",
        "8BITMIME",
        "CHUNKING",
        "ENHANCEDSTATUSCODES",
    ] {
        assert!(ehlo.contains(ext), "{ext} missing from {ehlo:?}");
    }
    assert!(c.cmd("RCPT TO:<b@y>").starts_with("503"));
    assert!(c.cmd("DATA").starts_with("503"));
    assert!(c.cmd("NOOP").starts_with("250"));
    assert!(c.cmd("VRFY root").starts_with("502"));
    assert!(c.cmd("MAIL FROM:<a@x> SIZE=99999999999").starts_with("552"));
    // A pipelined group gets all its replies.
    c.send(b"MAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nRCPT TO:<c@y>\r\nDATA\r\n");
    for want in ["250", "250", "250", "354"] {
        assert!(c.reply().starts_with(want));
    }
    // Smuggling-style bare-LF dots are data; only CRLF.CRLF ends the message, which is then
    // followed by a pipelined RSET in the same write.
    c.send(b"Subject: x\r\n\r\nline\n.\nstill data\r\n.\nmore\r\n..dotted\r\n.\r\nRSET\r\n");
    assert!(c.reply().starts_with("250 2.0.0 Ok: queued"));
    assert!(c.reply().starts_with("250"));
    assert!(c.cmd("RSET").starts_with("250"));
    assert!(c.cmd("QUIT").starts_with("221"));
    let mut rest = Vec::new();
    let _ = c.r.read_to_end(&mut rest);
    assert!(rest.is_empty(), "data after 221: {rest:?}");
    let (got, _) = sink.stop();
    assert_eq!(got["messages"], 1);
    assert_eq!(got["foreign"], 1);
    // Unstuffed: "Subject: x\r\n\r\nline\n.\nstill data\r\n\nmore\r\n.dotted\r\n" (the CRLF-led
    // line ".\nmore" loses its dot like any other line that starts with one).
    assert_eq!(got["bytes"], 49);
}

#[test]
fn sink_prints_counters_on_sigusr1_and_keeps_running() {
    let sink = SinkProc::start(&["--json"]);
    let target = sink.addr.to_string();
    let out = run(
        &["send", "--target", &target, "--messages", "7", "--json"],
        Duration::from_secs(60),
    );
    assert_eq!(out.status.code(), Some(0));
    sink.signal(libc::SIGUSR1);
    let snap: Value = serde_json::from_str(&sink.next_line()).expect("json on SIGUSR1");
    assert_eq!(snap["messages"], 7);
    let out = run(
        &["send", "--target", &target, "--messages", "3", "--json"],
        Duration::from_secs(60),
    );
    assert_eq!(out.status.code(), Some(0));
    let (got, code) = sink.stop();
    assert_eq!((got["messages"].as_u64(), code), (Some(10), 0));
}

#[test]
fn human_reports_are_printed_without_json() {
    let sink = SinkProc::start(&[]);
    let target = sink.addr.to_string();
    let out = run(
        &["send", "--target", &target, "--messages", "5"],
        Duration::from_secs(60),
    );
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("5 acknowledged"), "{text}");
    assert!(text.contains("MAIL -> final reply"), "{text}");
    sink.signal(libc::SIGUSR1);
    assert!(sink.next_line().contains("5 messages"));
}

fn assert_usage_error(args: &[&str]) {
    let out = run(args, Duration::from_secs(30));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
    assert_eq!(err.lines().count(), 1, "{args:?}: not one line: {err:?}");
    assert!(err.starts_with("loadgen: "), "{err}");
    assert!(out.stdout.is_empty());
}

#[test]
fn bad_flags_are_one_line_and_exit_2() {
    assert_usage_error(&[]);
    assert_usage_error(&["frobnicate"]);
    assert_usage_error(&["send"]);
    assert_usage_error(&["send", "--target", "127.0.0.1:25", "--sessions", "abc"]);
    assert_usage_error(&["send", "--target", "127.0.0.1:25", "--sessions", "0"]);
    assert_usage_error(&["send", "--target", "nohostport"]);
    assert_usage_error(&[
        "send",
        "--target",
        "127.0.0.1:25",
        "--messages",
        "5",
        "--duration",
        "1",
    ]);
    assert_usage_error(&["send", "--target", "127.0.0.1:25", "--rate", "-3"]);
    assert_usage_error(&["send", "--target", "127.0.0.1:25", "--run-id", "Bad-Id"]);
    assert_usage_error(&["send", "--target", "127.0.0.1:25", "--bogus"]);
    assert_usage_error(&["sink"]);
    assert_usage_error(&["sink", "--listen", "127.0.0.1:0", "--expect", "3"]);
    assert_usage_error(&["bench", "--messages", "0"]);
    let help = run(&["--help"], Duration::from_secs(30));
    assert_eq!(help.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&help.stdout).contains("send"));
}

fn assert_runtime_error(out: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "not one line: {err:?}");
    assert!(err.contains(needle), "{err:?} lacks {needle:?}");
}

#[test]
fn port_in_use_and_nothing_listening_are_one_line_errors() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = run(
        &["sink", "--listen", &addr, "--timeout", "5"],
        Duration::from_secs(30),
    );
    assert_runtime_error(&out, "cannot listen on");

    let free = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let out = run(
        &["send", "--target", &free, "--messages", "20", "--json"],
        Duration::from_secs(60),
    );
    assert_runtime_error(&out, "cannot connect to");
}

#[test]
fn timeout_stops_a_run_against_a_silent_server() {
    // Accepts connections and never says anything.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap().to_string();
    let keep = std::thread::spawn(move || {
        let mut held = Vec::new();
        silent.set_nonblocking(true).unwrap();
        let until = Instant::now() + Duration::from_secs(20);
        while Instant::now() < until && held.len() < 2 {
            match silent.accept() {
                Ok((s, _)) => held.push(s),
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
        std::thread::sleep(Duration::from_secs(3));
    });
    let out = run(
        &[
            "send",
            "--target",
            &addr,
            "--messages",
            "5",
            "--sessions",
            "2",
            "--timeout",
            "1",
            "--json",
        ],
        Duration::from_secs(30),
    );
    assert_eq!(out.status.code(), Some(1));
    let r = json(&out.stdout);
    assert_eq!(r["timed_out"], true);
    assert_eq!(r["acknowledged"], 0);
    assert_eq!(r["aborted"], 2);
    let _ = keep.join();
}

#[test]
fn bench_runs_through_a_relay_and_verifies() {
    // bench spawns `PATH --listen A --upstream B`; a script maps that onto `loadgen relay`.
    let dir = std::env::temp_dir().join(format!("loadgen-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let script = dir.join("fake-mailguard");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nexec '{}' relay \"$@\"\n",
            env!("CARGO_BIN_EXE_loadgen")
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = run(
        &[
            "bench",
            "--mailguard",
            script.to_str().unwrap(),
            "--messages",
            "100",
            "--sessions",
            "4",
            "--per-session",
            "10",
            "--timeout",
            "60",
            "--json",
        ],
        Duration::from_secs(120),
    );
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = json(&out.stdout);
    assert_eq!(r["verified"], true);
    let rows = r["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 4);
    for row in rows {
        assert_eq!(row["acknowledged"], 100);
        assert_eq!(row["delivered"], 100);
        assert_eq!(row["lost"], 0);
    }
    assert!(rows[1]["ratio"].as_f64().is_some());

    let missing = run(
        &["bench", "--mailguard", "/nonexistent/mailguard"],
        Duration::from_secs(30),
    );
    assert_runtime_error(&missing, "mailguard not found at /nonexistent/mailguard");
    // A "mailguard" that exits at once (like a stub binary).
    let quits = run(
        &["bench", "--mailguard", "/bin/true"],
        Duration::from_secs(30),
    );
    assert_runtime_error(&quits, "exited (exit status: 0) before listening");
}

/// A scripted server for one connection that refuses every second RCPT of a transaction.
fn picky_server() -> (SocketAddr, std::thread::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let h = std::thread::spawn(move || {
        l.set_nonblocking(true).unwrap();
        let until = Instant::now() + Duration::from_secs(30);
        let mut served = 0;
        while served < 1 && Instant::now() < until {
            let Ok((s, _)) = l.accept() else {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            };
            served += 1;
            s.set_nonblocking(false).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            let mut w = s.try_clone().unwrap();
            let mut r = BufReader::new(s);
            w.write_all(b"220 picky\r\n").unwrap();
            let mut rcpts = 0;
            let mut line = String::new();
            while r.read_line(&mut line).unwrap_or(0) > 0 {
                let reply: &[u8] = match line.get(..4).unwrap_or("").to_ascii_uppercase().as_str() {
                    "EHLO" => b"250-picky\r\n250 PIPELINING\r\n",
                    "MAIL" => {
                        rcpts = 0;
                        b"250 ok\r\n"
                    }
                    "RCPT" => {
                        rcpts += 1;
                        if rcpts % 2 == 0 {
                            b"550 no such user\r\n"
                        } else {
                            b"250 ok\r\n"
                        }
                    }
                    "DATA" => {
                        w.write_all(b"354 go\r\n").unwrap();
                        let mut body = String::new();
                        loop {
                            body.clear();
                            if r.read_line(&mut body).unwrap_or(0) == 0 || body == ".\r\n" {
                                break;
                            }
                        }
                        b"250 queued\r\n"
                    }
                    "RSET" => b"250 ok\r\n",
                    "QUIT" => {
                        w.write_all(b"221 bye\r\n").unwrap();
                        break;
                    }
                    _ => b"502 what\r\n",
                };
                w.write_all(reply).unwrap();
                line.clear();
            }
        }
    });
    (addr, h)
}

#[test]
fn refused_recipients_fail_the_message_without_desynchronising() {
    for extra in [&["--pipelining"][..], &[][..]] {
        let (addr, server) = picky_server();
        let target = addr.to_string();
        let mut args = vec![
            "send",
            "--target",
            &target,
            "--messages",
            "3",
            "--sessions",
            "1",
            "--per-session",
            "3",
            "--recipients",
            "2",
            "--timeout",
            "20",
            "--json",
        ];
        args.extend_from_slice(extra);
        let out = run(&args, Duration::from_secs(60));
        assert_eq!(out.status.code(), Some(1), "{extra:?}");
        let r = json(&out.stdout);
        assert_eq!(r["timed_out"], false, "{extra:?}: {r}");
        assert_eq!(
            (r["acknowledged"].as_u64(), r["failed"].as_u64()),
            (Some(0), Some(3))
        );
        assert_eq!(r["errors"]["550"], 3, "{extra:?}: {r}");
        let _ = server.join();
    }
}
