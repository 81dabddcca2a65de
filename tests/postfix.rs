//! SMTP smuggling against a real, deliberately lenient Postfix.
//!
//! Each test starts a private Postfix instance (`tests/postfix_common`) that holds every
//! message it accepts in its hold queue, so `postqueue -c DIR -j` counts exactly what it
//! accepted, by envelope sender. It is made as lenient as it goes (`smtpd_forbid_bare_newline
//! = no`), so a smuggled end of data would work against it directly, which the control run
//! shows. Then every end-of-data variant (in the body and in the headers, with a spoofed
//! second transaction behind it) goes through mailguard in front of that Postfix: Postfix must
//! never accept a second message. The same payloads go through mailguard in front of the
//! bundled sink (`loadgen sink`). Postfix is stopped with `postfix -c DIR stop` (and its
//! master killed by the PID in its own pid file if that fails); the system Postfix is never
//! touched.
//!
//! Needs the Debian package `postfix` (`.ci/run` installs it) and root (Postfix's master
//! runs as root). Without them these tests fail and say so; they never pass silently.

mod common;
mod postfix_common;

use common::*;
use postfix_common::{count_sender, Postfix, PostfixBuilder};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// The lenient private Postfix every test here runs against.
fn lenient_postfix() -> Postfix {
    PostfixBuilder::new().lenient().start()
}

/// The end-of-data variants (design/anchors.md section 4).
const VARIANTS: &[(&str, &[u8])] = &[
    ("LF.LF", b"\n.\n"),
    ("LF.CRLF", b"\n.\r\n"),
    ("CR.CR", b"\r.\r"),
    ("CR.LF", b"\r.\n"),
    ("LF.CR", b"\n.\r"),
    ("CR.CRLF", b"\r.\r\n"),
    ("CRLF.LF", b"\r\n.\n"),
    ("CRLF.CR", b"\r\n.\r"),
    ("CRLF NUL.CRLF", b"\r\n\x00.\r\n"),
    ("CRLF.NUL CRLF", b"\r\n.\x00\r\n"),
    ("CRLF.CR CRLF", b"\r\n.\r\r\n"),
    ("CR CRLF.CR CRLF", b"\r\r\n.\r\r\n"),
    ("LF LF.CRLF", b"\n\n.\r\n"),
    ("CRLF.SP CRLF", b"\r\n. \r\n"),
];

// ---------------------------------------------------------------------------------------------
// The payloads
// ---------------------------------------------------------------------------------------------

/// A message whose body (or header block) hides `variant` followed by a whole spoofed second
/// transaction from `spoof`, then the real end of data.
fn smuggling_body(variant: &[u8], in_header: bool, spoof: &str) -> Vec<u8> {
    let mut b = if in_header {
        b"From: user@x.test\r\nSubject: smuggle".to_vec()
    } else {
        b"From: user@x.test\r\nSubject: smuggle\r\n\r\nHello".to_vec()
    };
    b.extend_from_slice(variant);
    b.extend_from_slice(
        format!(
            "MAIL FROM:<{spoof}>\r\nRCPT TO:<victim@example.test>\r\nDATA\r\n\
             From: {spoof}\r\nSubject: spoofed\r\n\r\nPay now.\r\n"
        )
        .as_bytes(),
    );
    b.extend_from_slice(b".\r\n");
    b
}

/// One session: EHLO, MAIL from `sender`, RCPT, DATA step by step, then `body` in one write
/// (it ends with the real end of data). Returns the reply to the end of data.
fn smuggle_session(addr: SocketAddr, sender: &str, body: &[u8]) -> Reply {
    let mut c = Client::greeted(addr);
    c.cmd("EHLO client.test").expect_code(250);
    c.cmd(&format!("MAIL FROM:<{sender}>")).expect_code(250);
    c.cmd("RCPT TO:<rcpt@example.test>").expect_code(250);
    c.cmd("DATA").expect_code(354);
    c.send(body);
    let r = c.read_reply();
    // Replies to smuggled commands (if the server ran any) come before the one to QUIT, which
    // the server sends only once it has processed everything before it.
    let _ = c.try_send(b"QUIT\r\n");
    for _ in 0..16 {
        match c.try_read_reply() {
            Ok(q) if q.code == 221 => break,
            Ok(_) => {}
            Err(_) => break,
        }
    }
    r
}

/// A case: its name, the sender of the real message and of the spoofed one, the payload.
struct Case {
    name: String,
    sender: String,
    spoof: String,
    body: Vec<u8>,
}

fn cases(tag: &str) -> Vec<Case> {
    let mut v = Vec::new();
    for (i, (name, variant)) in VARIANTS.iter().enumerate() {
        for in_header in [false, true] {
            let where_ = if in_header { "hdr" } else { "body" };
            let spoof = format!("ceo-{tag}-{i}-{where_}@bank.example");
            v.push(Case {
                name: format!("{name} in the {where_}"),
                sender: format!("user-{tag}-{i}-{where_}@x.test"),
                body: smuggling_body(variant, in_header, &spoof),
                spoof,
            });
        }
    }
    v
}

/// Runs every case against `addr`; returns (case, reply).
fn run_cases(addr: SocketAddr, cases: &[Case]) -> Vec<Reply> {
    cases
        .iter()
        .map(|c| smuggle_session(addr, &c.sender, &c.body))
        .collect()
}

/// The checks through the guard: the upstream holds exactly the messages the client saw 250
/// for, each from the real sender, and never one from a spoofed sender.
#[track_caller]
fn assert_no_second_message(
    what: &str,
    cases: &[Case],
    replies: &[Reply],
    count: impl Fn(&str) -> usize,
) {
    for (c, r) in cases.iter().zip(replies) {
        assert!(
            r.code == 250 || (r.code == 550 && r.enhanced().is_some()),
            "{what}, {}: unexpected reply {r}",
            c.name
        );
        let want = usize::from(r.code == 250);
        assert_eq!(
            count(&c.sender),
            want,
            "{what}, {}: the client saw {r} but the upstream has {} message(s) from {}",
            c.name,
            count(&c.sender),
            c.sender
        );
        assert_eq!(
            count(&c.spoof),
            0,
            "{what}, {}: SMUGGLED, the upstream accepted a second message from {}",
            c.name,
            c.spoof
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

/// The control run, without the guard: which variants smuggle a second message into this
/// lenient Postfix. `LF.CRLF` (CVE-2023-51764) must: that is what makes the guarded run mean
/// something.
#[test]
fn postfix_control_run_without_the_guard_is_smuggled_into() {
    let pf = lenient_postfix();
    let cases: Vec<Case> = cases("ctl")
        .into_iter()
        .filter(|c| c.name.ends_with("body"))
        .collect();
    let replies = run_cases(pf.addr(), &cases);
    let q = pf.queue();
    let mut smuggled = Vec::new();
    for (c, r) in cases.iter().zip(&replies) {
        r.expect_code(250);
        if count_sender(&q, &c.spoof) > 0 {
            smuggled.push(c.name.trim_end_matches(" in the body").to_string());
        }
    }
    eprintln!(
        "control, lenient Postfix without mailguard: {} of {} variants smuggle a second message: {}",
        smuggled.len(),
        cases.len(),
        smuggled.join(", ")
    );
    assert!(
        smuggled.iter().any(|s| s == "LF.CRLF"),
        "LF.CRLF did not smuggle into the lenient Postfix; the control is not lenient: {smuggled:?}"
    );
}

/// Every variant, in the body and in the headers, through mailguard (normalize and reject) in
/// front of the lenient Postfix: never a second message.
#[test]
fn postfix_behind_the_guard_never_accepts_a_smuggled_message() {
    let pf = lenient_postfix();
    let up = pf.addr();
    let normalize = Guard::start(up, Some("bare_lf = \"normalize\"\n"));
    let reject = Guard::start(up, Some("bare_lf = \"reject\"\n"));
    let norm_cases = cases("norm");
    let rej_cases = cases("rej");
    let norm_replies = run_cases(normalize.addr, &norm_cases);
    let rej_replies = run_cases(reject.addr, &rej_cases);
    let q = pf.queue();
    assert_no_second_message("normalize", &norm_cases, &norm_replies, |s| {
        count_sender(&q, s)
    });
    assert_no_second_message("reject", &rej_cases, &rej_replies, |s| count_sender(&q, s));
    // In normalize mode the message arrives whole: the would-be commands are body text.
    let lfcrlf = &norm_cases[2];
    assert!(lfcrlf.name.starts_with("LF.CRLF in the body"));
    let id = q
        .iter()
        .find(|m| m.sender == lfcrlf.sender)
        .expect("the LF.CRLF message")
        .id
        .clone();
    let body = pf.body(&id);
    assert!(
        body.contains(&format!("MAIL FROM:<{}>", lfcrlf.spoof)) && body.contains("Pay now."),
        "the smuggled commands should be body text of the one message: {body:?}"
    );
    let accepted = norm_replies.iter().filter(|r| r.code == 250).count();
    let refused = rej_replies.iter().filter(|r| r.code == 550).count();
    eprintln!(
        "through mailguard: normalize {accepted}/{} delivered as one message each, reject \
         refused {refused}/{}; no spoofed message in Postfix's queue ({} messages in all)",
        norm_cases.len(),
        rej_cases.len(),
        q.len()
    );
}

/// Pipelining straight after a real end of data, and BDAT (a chunk holding `\r\n.\r\n` and a
/// whole spoofed transaction; a `BDAT n LAST` whose length lies short), through the guard in
/// front of the lenient Postfix (which offers CHUNKING).
#[test]
fn postfix_behind_the_guard_pipelining_and_bdat() {
    let pf = lenient_postfix();
    let g = Guard::start(pf.addr(), None);
    let mut c = g.client();
    let ehlo = c.cmd("EHLO client.test");
    assert!(ehlo.text().contains("CHUNKING"), "{ehlo}");
    // Real end of data with the next transaction pipelined behind it in the same write.
    c.cmd("MAIL FROM:<pipe-1@x.test>").expect_code(250);
    c.cmd("RCPT TO:<rcpt@example.test>").expect_code(250);
    c.cmd("DATA").expect_code(354);
    c.send(
        b"Subject: one\r\n\r\nfirst\r\n.\r\nMAIL FROM:<pipe-2@x.test>\r\n\
          RCPT TO:<rcpt@example.test>\r\nDATA\r\n",
    );
    c.read_reply().expect(250, "2.0.0");
    c.read_reply().expect_code(250);
    c.read_reply().expect_code(250);
    c.read_reply().expect_code(354);
    c.send(b"Subject: two\r\n\r\nsecond\r\n.\r\n");
    c.read_reply().expect(250, "2.0.0");
    // BDAT: the chunk holds an end of data and a spoofed transaction; it is all data.
    let chunk = smuggling_body(b"\r\n.\r\n", false, "ceo-bdat@bank.example");
    c.cmd("MAIL FROM:<bdat-1@x.test>").expect_code(250);
    c.cmd("RCPT TO:<rcpt@example.test>").expect_code(250);
    let mut cmd = format!("BDAT {} LAST\r\n", chunk.len()).into_bytes();
    cmd.extend_from_slice(&chunk);
    c.send(&cmd);
    c.read_reply().expect(250, "2.0.0");
    // BDAT whose length lies short: the rest is commands, for the guard as for Postfix; the
    // transaction is over, so no second message can come of it.
    c.cmd("MAIL FROM:<bdat-2@x.test>").expect_code(250);
    c.cmd("RCPT TO:<rcpt@example.test>").expect_code(250);
    c.send(b"BDAT 5 LAST\r\nhello\r\n.\r\nRCPT TO:<victim@example.test>\r\nDATA\r\n");
    c.read_reply().expect(250, "2.0.0");
    let rest = c.read_replies(4);
    assert!(
        rest.iter().all(|r| r.code >= 500),
        "the lying chunk's tail: {rest:?}"
    );
    c.cmd("QUIT").expect_code(221);
    let q = pf.queue();
    for sender in [
        "pipe-1@x.test",
        "pipe-2@x.test",
        "bdat-1@x.test",
        "bdat-2@x.test",
    ] {
        assert_eq!(count_sender(&q, sender), 1, "{sender}: {q:?}");
    }
    assert_eq!(count_sender(&q, "ceo-bdat@bank.example"), 0, "{q:?}");
    assert_eq!(q.len(), 4, "{q:?}");
    let bdat1 = q.iter().find(|m| m.sender == "bdat-1@x.test").unwrap();
    assert!(pf
        .body(&bdat1.id)
        .contains("MAIL FROM:<ceo-bdat@bank.example>"));
}

// ---------------------------------------------------------------------------------------------
// The bundled sink
// ---------------------------------------------------------------------------------------------

/// The workspace's `loadgen` binary next to this test binary, if it was built.
fn loadgen_bin() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?.parent()?;
    let p = dir.join("loadgen");
    p.exists().then_some(p)
}

/// A running `loadgen sink`; its counters are read at the end (SIGTERM makes it print them).
struct Sink {
    child: std::process::Child,
    addr: SocketAddr,
    out: PathBuf,
    _dir: TempDir,
}

impl Sink {
    fn start(bin: &Path) -> Sink {
        let dir = TempDir::new();
        let port = free_port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let out = dir.path.join("sink.json");
        let child = Command::new(bin)
            .args([
                "sink",
                "--listen",
                &addr.to_string(),
                "--json",
                "--timeout",
                "120",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::from(std::fs::File::create(&out).unwrap()))
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn loadgen sink");
        assert!(
            wait_for(WAIT, || std::net::TcpStream::connect(addr).is_ok()),
            "loadgen sink did not listen"
        );
        Sink {
            child,
            addr,
            out,
            _dir: dir,
        }
    }

    /// Stops it (SIGTERM to its PID) and returns the number of messages it accepted.
    fn finish(mut self) -> u64 {
        // SAFETY: kill on our own child's PID.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let text = std::fs::read_to_string(&self.out).unwrap_or_default();
        let line = text.lines().rev().find(|l| l.contains("\"messages\""));
        let line = line.unwrap_or_else(|| panic!("no counters from the sink: {text:?}"));
        let at = line.find("\"messages\":").unwrap() + "\"messages\":".len();
        line[at..]
            .trim_start()
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("unreadable counters: {line}"))
    }
}

/// The same payloads through the guard in front of the bundled sink: it counts exactly one
/// message per 250 the client saw. Without a built `loadgen` (e.g. `cargo test -p mailguard`)
/// the recording upstream stands in, and this says so.
#[test]
fn bundled_sink_behind_the_guard_counts_one_message_per_250() {
    let cases = cases("sink");
    match loadgen_bin() {
        Some(bin) => {
            let sink = Sink::start(&bin);
            let g = Guard::start(sink.addr, None);
            let replies = run_cases(g.addr, &cases);
            drop(g);
            let acked = replies.iter().filter(|r| r.code == 250).count() as u64;
            let got = sink.finish();
            eprintln!(
                "loadgen sink behind mailguard: {acked} acknowledged, {got} received, {} variants",
                cases.len()
            );
            assert_eq!(
                got, acked,
                "the sink received {got} messages, the client saw {acked} 250s"
            );
            assert!(replies.iter().all(|r| r.code == 250 || r.code == 550));
        }
        None => {
            eprintln!("note: loadgen is not built next to this test; using the recording upstream");
            let up = Upstream::start();
            let g = Guard::start(up.addr, None);
            let replies = run_cases(g.addr, &cases);
            let m = up.messages();
            assert_no_second_message("recording upstream", &cases, &replies, |s| {
                let line = format!("MAIL FROM:<{s}>");
                m.iter().filter(|x| x.mail_from == line.as_bytes()).count()
            });
        }
    }
}
