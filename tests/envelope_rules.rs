//! Envelope rules, rates and early talkers (issue 7) through the real binary, with raw clients
//! and Python's `smtplib`: `sender_max_length`, `sender_deny`, `sender_allow`,
//! `relay_domains`, `max_invalid_recipients`, `rate_per_ip`, `rate_per_sender`,
//! `pregreet_wait_ms` and `reject_unauth_pipelining`.
//!
//! A refused MAIL or RCPT is answered by the guard and never reaches the upstream. Rate tables
//! are per worker thread, so the rate tests run the guard with one thread.

mod common;
mod smtplib_client;

use common::*;
use serde_json::{json, Value};
use smtplib_client::Sent;
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

const FROM: &str = "sender@example.test";
const TO: &str = "rcpt@example.test";
const OTHER_HOST: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));

const SENDER_TOO_LONG: &str = "501 5.1.7 Sender address too long\r\n";
const SENDER_REJECTED: &str = "550 5.7.1 Sender rejected\r\n";
const RELAY_DENIED: &str = "550 5.7.1 Relaying denied\r\n";
const TOO_MANY_INVALID: &str = "421 4.7.0 Too many invalid recipients, closing connection\r\n";
const CONNECTION_RATE: &str = "421 4.7.0 Connection rate limit exceeded\r\n";
const MESSAGE_RATE: &str = "451 4.7.1 Message rate limit exceeded, try again later\r\n";
const PROTOCOL_ERROR: &str = "554 5.5.1 Protocol error\r\n";

// ---------------------------------------------------------------------------------------------
// Python's smtplib
// ---------------------------------------------------------------------------------------------

/// argv: port, sender, recipients (comma-separated), spec (JSON: `source` address to connect
/// from, `subject`), dump path. The message is built by `email`; its bytes are written to the
/// dump path; one JSON object on stdout says what smtplib saw.
const SMTPLIB: &str = r#"
import json, smtplib, sys
from email import policy
from email.message import EmailMessage

port, sender, rcpts, spec, dump = sys.argv[1:6]
spec = json.loads(spec)
msg = EmailMessage(policy=policy.SMTP)
msg["From"] = "Alice <alice@example.org>"
msg["To"] = "bob@example.net"
msg["Subject"] = spec.get("subject", "envelope rules")
msg["Message-ID"] = "<envelope-rules@example.org>"
msg.set_content("Hello,\n.\nBye\n")
data = msg.as_bytes()
with open(dump, "wb") as f:
    f.write(data)

"#;

/// Sends one message with smtplib.
#[track_caller]
fn smtplib(addr: SocketAddr, from: &str, rcpts: &[&str], spec: Value) -> Sent {
    smtplib_client::send(
        SMTPLIB,
        addr,
        from,
        &rcpts.join(","),
        &spec,
        "envelope rules",
    )
}

/// smtplib's message passed and is the upstream's message number `n` (1-based), intact.
#[track_caller]
fn assert_smtplib_delivered(up: &Upstream, n: usize, s: &Sent) -> Message {
    assert_eq!(s.status, "ok", "{s:?}");
    let m = up.wait_messages(n);
    assert_eq!(m.len(), n, "expected message {n} at the upstream");
    assert!(
        m[n - 1].body == dot_stuff(&s.data),
        "body differs: {}",
        show(&m[n - 1].body)
    );
    m[n - 1].clone()
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// Starts the guard with one worker thread (rate tables are per worker).
#[track_caller]
fn one_thread_guard(up: &Upstream, policy: &str) -> Guard {
    let listen = format!("127.0.0.1:{}", free_port());
    Guard::spawn(
        &listen,
        &up.addr.to_string(),
        Some(policy),
        &["--threads", "1"],
    )
    .unwrap_or_else(|e| panic!("mailguard did not start: {e}"))
}

/// `MAIL FROM:<from>`; on a 250 the transaction is reset again. Returns the reply.
#[track_caller]
fn try_mail(c: &mut Client, from: &str) -> Reply {
    let r = c.cmd(&format!("MAIL FROM:<{from}>"));
    if r.code == 250 {
        c.cmd("RSET").expect_code(250);
    }
    r
}

/// Upstream command lines starting with `MAIL` (any case).
fn mail_commands(up: &Upstream) -> usize {
    up.commands()
        .iter()
        .filter(|c| c.len() >= 4 && c[..4].eq_ignore_ascii_case(b"MAIL"))
        .count()
}

/// Reads replies until the guard closes; panics on a timeout.
#[track_caller]
fn replies_until_closed(c: &mut Client) -> Vec<Reply> {
    let mut out = Vec::new();
    loop {
        match c.try_read_reply() {
            Ok(r) => out.push(r),
            Err(ReadError::Closed(rest)) if rest.is_empty() => return out,
            Err(e) => panic!("after {out:?}: {e:?}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Sender rules
// ---------------------------------------------------------------------------------------------

/// An address of exactly `len` bytes.
fn address_of_len(len: usize) -> String {
    let domain = "@example.test";
    format!("{}{domain}", "a".repeat(len - domain.len()))
}

#[test]
fn sender_max_length_refuses_one_byte_over() {
    let up = Upstream::start();
    let g = Guard::start(up.addr, Some("sender_max_length = 64\n"));
    let at = address_of_len(64);
    let over = address_of_len(65);
    let mut c = g.client();
    c.ehlo();
    try_mail(&mut c, &at).expect_code(250);
    c.cmd(&format!("MAIL FROM:<{over}> SIZE=100"))
        .expect_raw(SENDER_TOO_LONG);
    // The session goes on.
    c.send_message(&at, TO, b"at the limit\r\n")
        .expect(250, "2.0.0");
    c.cmd("QUIT").expect_code(221);

    let s = smtplib(g.addr, &over, &[TO], json!({}));
    assert_eq!(
        (s.status.as_str(), s.reply_line()),
        ("sender", SENDER_TOO_LONG.into())
    );
    let s = smtplib(g.addr, &at, &[TO], json!({}));
    let m = assert_smtplib_delivered(&up, 2, &s);
    assert!(contains(&m.mail_from, format!("<{at}>").as_bytes()));
    assert_never_forwarded(&up, over.as_bytes());
}

#[test]
fn sender_deny_matches_exact_domain_and_subdomain_patterns() {
    let up = Upstream::start();
    let g = Guard::start(
        up.addr,
        Some("sender_deny = [\"boss@corp.test\", \"@spam.test\", \"*.bad.test\"]\n"),
    );
    let mut c = g.client();
    c.ehlo();
    for denied in [
        "boss@corp.test",
        "BOSS@Corp.Test",
        "anyone@spam.test",
        "Anyone@SPAM.TEST",
        "a@mx.bad.test",
        "a@deep.mx.bad.test",
    ] {
        let r = try_mail(&mut c, denied);
        assert_eq!(String::from_utf8_lossy(&r.raw), SENDER_REJECTED, "{denied}");
        assert_never_forwarded(&up, denied.as_bytes());
    }
    for allowed in [
        "xboss@corp.test",
        "boss@corp.test.example",
        "anyone@notspam.test",
        "anyone@sub.spam.test",
        "a@bad.test",
        "a@verybad.test",
        "",
    ] {
        let r = try_mail(&mut c, allowed);
        assert_eq!(r.code, 250, "{allowed:?}: {r}");
        assert_forwarded(&up, format!("MAIL FROM:<{allowed}>").as_bytes());
    }
    c.cmd("QUIT").expect_code(221);

    let s = smtplib(g.addr, "someone@spam.test", &[TO], json!({}));
    assert_eq!(
        (s.status.as_str(), s.reply_line()),
        ("sender", SENDER_REJECTED.into())
    );
    assert!(up.messages().is_empty());
}

#[test]
fn sender_allow_lets_bounces_through() {
    let up = Upstream::start();
    let g = Guard::start(
        up.addr,
        Some(concat!(
            "sender_allow = [\"@good.test\", \"*.good.test\"]\n",
            "sender_deny = [\"spammer@good.test\"]\n",
        )),
    );
    let mut c = g.client();
    c.ehlo();
    for allowed in ["a@good.test", "A@GOOD.test", "a@mx.good.test"] {
        try_mail(&mut c, allowed).expect_code(250);
    }
    for refused in ["a@other.test", "a@notgood.test", "spammer@good.test"] {
        let r = try_mail(&mut c, refused);
        assert_eq!(
            String::from_utf8_lossy(&r.raw),
            SENDER_REJECTED,
            "{refused}"
        );
        assert_never_forwarded(&up, refused.as_bytes());
    }
    // The null sender (a bounce) passes the allow-list.
    c.send_message("", TO, b"a bounce\r\n").expect(250, "2.0.0");
    c.cmd("QUIT").expect_code(221);

    let s = smtplib(g.addr, "", &[TO], json!({ "subject": "bounce" }));
    let m = assert_smtplib_delivered(&up, 2, &s);
    assert!(contains(&m.mail_from, b"FROM:<>"), "{}", show(&m.mail_from));
    let s = smtplib(g.addr, "x@other.test", &[TO], json!({}));
    assert_eq!(
        (s.status.as_str(), s.reply_line()),
        ("sender", SENDER_REJECTED.into())
    );
    assert_eq!(up.messages().len(), 2);
}

// ---------------------------------------------------------------------------------------------
// Recipient rules
// ---------------------------------------------------------------------------------------------

#[test]
fn relay_domains_refuses_other_domains_but_not_postmaster() {
    let up = Upstream::start();
    let g = Guard::start(
        up.addr,
        Some("relay_domains = [\"example.com\", \"*.example.org\"]\n"),
    );
    let mut c = g.client();
    c.ehlo();
    c.cmd(&format!("MAIL FROM:<{FROM}>")).expect_code(250);
    let accepted = [
        "a@example.com",
        "B@EXAMPLE.COM",
        "c@mx.example.org",
        "postmaster",
    ];
    for to in accepted {
        c.cmd(&format!("RCPT TO:<{to}>")).expect_code(250);
    }
    for to in [
        "a@example.org",
        "a@sub.example.com",
        "a@elsewhere.test",
        "a@notexample.com",
    ] {
        let r = c.cmd(&format!("RCPT TO:<{to}>"));
        assert_eq!(String::from_utf8_lossy(&r.raw), RELAY_DENIED, "{to}");
        assert_never_forwarded(&up, to.as_bytes());
    }
    c.cmd("DATA").expect_code(354);
    c.send(b"relayed\r\n.\r\n");
    c.read_reply().expect(250, "2.0.0");
    let m = up.wait_messages(1);
    let want: Vec<Vec<u8>> = accepted
        .iter()
        .map(|to| format!("RCPT TO:<{to}>").into_bytes())
        .collect();
    assert_eq!(m[0].rcpts, want, "{}", show_lines(&m[0].rcpts));
    c.cmd("QUIT").expect_code(221);

    let s = smtplib(
        g.addr,
        FROM,
        &["ok@example.com", "x@elsewhere.test"],
        json!({}),
    );
    assert_eq!(
        s.refused,
        vec![(
            "x@elsewhere.test".to_string(),
            RELAY_DENIED.trim_end().to_string()
        )],
        "{s:?}"
    );
    let m = assert_smtplib_delivered(&up, 2, &s);
    assert_eq!(m.rcpts.len(), 1, "{}", show_lines(&m.rcpts));
    assert!(contains(&m.rcpts[0], b"<ok@example.com>"));
}

/// A small upstream that answers `550 5.1.1` to recipients whose address starts with
/// `nobody` (the recording upstream accepts every recipient).
struct Picky {
    addr: SocketAddr,
    log: Arc<PickyLog>,
    stop: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
}

impl Picky {
    fn start() -> Picky {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let log = Arc::new(Mutex::new((Vec::new(), Vec::new())));
        let stop = Arc::new(AtomicBool::new(false));
        let (l, s) = (log.clone(), stop.clone());
        let acceptor = thread::spawn(move || {
            let mut workers = Vec::new();
            while !s.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let (l, s) = (l.clone(), s.clone());
                        workers.push(thread::spawn(move || picky_session(stream, &l, &s)));
                    }
                    Err(_) => thread::sleep(Duration::from_millis(5)),
                }
            }
            for w in workers {
                let _ = w.join();
            }
        });
        Picky {
            addr,
            log,
            stop,
            acceptor: Some(acceptor),
        }
    }

    fn commands(&self) -> Vec<String> {
        self.log.lock().unwrap().0.clone()
    }

    fn wait_messages(&self, n: usize) -> Vec<PickyMessage> {
        wait_for(WAIT, || self.log.lock().unwrap().1.len() >= n);
        self.log.lock().unwrap().1.clone()
    }
}

impl Drop for Picky {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.acceptor.take() {
            let _ = h.join();
        }
    }
}

/// A message the picky upstream accepted: its accepted RCPT lines and its body.
type PickyMessage = (Vec<String>, Vec<u8>);
/// Every command line received, and the messages.
type PickyLog = Mutex<(Vec<String>, Vec<PickyMessage>)>;

fn picky_session(mut stream: TcpStream, log: &PickyLog, stop: &AtomicBool) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_millis(100)));
    let mut buf: Vec<u8> = Vec::new();
    let mut rcpts: Vec<String> = Vec::new();
    let idle = Duration::from_secs(30);
    let mut last = Instant::now();
    let mut in_data = false;
    if stream.write_all(b"220 picky.test ESMTP\r\n").is_err() {
        return;
    }
    let mut chunk = [0u8; 16 * 1024];
    loop {
        if in_data {
            if let Some(i) = find(&buf, b"\r\n.\r\n") {
                let body = buf[..i + 2].to_vec();
                buf.drain(..i + 5);
                log.lock()
                    .unwrap()
                    .1
                    .push((std::mem::take(&mut rcpts), body));
                in_data = false;
                if stream.write_all(b"250 2.0.0 Ok: queued\r\n").is_err() {
                    return;
                }
                continue;
            }
        } else if let Some(i) = buf.iter().position(|&b| b == b'\n') {
            let raw: Vec<u8> = buf.drain(..=i).collect();
            let line = String::from_utf8_lossy(&raw).trim_end().to_string();
            log.lock().unwrap().0.push(line.clone());
            let upper = line.to_ascii_uppercase();
            let reply: &[u8] = if upper.starts_with("EHLO") {
                b"250-picky.test\r\n250-PIPELINING\r\n250 ENHANCEDSTATUSCODES\r\n"
            } else if upper.starts_with("RCPT") {
                if upper.contains("<NOBODY") {
                    b"550 5.1.1 Recipient address rejected: User unknown\r\n"
                } else {
                    rcpts.push(line.clone());
                    b"250 2.1.5 Ok\r\n"
                }
            } else if upper == "DATA" {
                in_data = true;
                b"354 End data with <CR><LF>.<CR><LF>\r\n"
            } else if upper.starts_with("MAIL") || upper == "RSET" {
                rcpts.clear();
                b"250 2.0.0 Ok\r\n"
            } else if upper.starts_with("HELO") || upper == "NOOP" {
                b"250 2.0.0 Ok\r\n"
            } else if upper == "QUIT" {
                let _ = stream.write_all(b"221 2.0.0 Bye\r\n");
                break;
            } else {
                b"502 5.5.2 Error: command not recognized\r\n"
            };
            if stream.write_all(reply).is_err() {
                return;
            }
            continue;
        }
        if stop.load(Ordering::SeqCst) || last.elapsed() > idle {
            break;
        }
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                last = Instant::now();
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => break,
        }
    }
    let _ = stream.shutdown(Shutdown::Both);
}

#[test]
fn max_invalid_recipients_closes_after_one_too_many() {
    let up = Picky::start();
    let g = Guard::start(up.addr, Some("max_invalid_recipients = 2\n"));
    let mut c = g.client();
    c.ehlo();
    c.cmd(&format!("MAIL FROM:<{FROM}>")).expect_code(250);
    c.cmd("RCPT TO:<ok1@example.test>").expect_code(250);
    c.cmd("RCPT TO:<nobody1@example.test>").expect(550, "5.1.1");
    c.cmd("RCPT TO:<nobody2@example.test>").expect(550, "5.1.1");
    c.cmd("RCPT TO:<ok2@example.test>").expect_code(250);
    // The third 5xx is passed on, then the guard closes.
    c.cmd("RCPT TO:<nobody3@example.test>").expect(550, "5.1.1");
    c.read_reply().expect_raw(TOO_MANY_INVALID);
    c.expect_closed();

    // The count is per session: a new one starts from zero.
    let mut c = g.client();
    c.ehlo();
    c.cmd(&format!("MAIL FROM:<{FROM}>")).expect_code(250);
    c.cmd("RCPT TO:<nobody4@example.test>").expect(550, "5.1.1");
    c.cmd("RCPT TO:<ok3@example.test>").expect_code(250);
    c.cmd("DATA").expect_code(354);
    c.send(b"after one invalid recipient\r\n.\r\n");
    c.read_reply().expect(250, "2.0.0");
    c.cmd("QUIT").expect_code(221);
    let m = up.wait_messages(1);
    assert_eq!(m.len(), 1);
    assert_eq!(m[0].0, vec!["RCPT TO:<ok3@example.test>".to_string()]);

    // Two invalid recipients are tolerated for smtplib too.
    let s = smtplib(
        g.addr,
        FROM,
        &[
            "ok4@example.test",
            "nobody5@example.test",
            "nobody6@example.test",
        ],
        json!({}),
    );
    assert_eq!(s.status, "ok", "{s:?}");
    assert_eq!(s.refused.len(), 2, "{s:?}");
    assert!(s.refused.iter().all(|(_, r)| r.starts_with("550 5.1.1")));
    let m = up.wait_messages(2);
    assert_eq!(m.len(), 2);
    assert_eq!(m[1].1, dot_stuff(&s.data));
    assert_eq!(m[1].0.len(), 1);
    assert!(up.commands().iter().any(|l| l.contains("nobody6")));
}

// ---------------------------------------------------------------------------------------------
// Rates
// ---------------------------------------------------------------------------------------------

#[test]
fn rate_per_ip_connections_refuses_before_the_banner() {
    let up = Upstream::start();
    let g = one_thread_guard(&up, "rate_per_ip = { connections = 3 }\n");
    for _ in 0..3 {
        let mut c = g.client();
        c.cmd("QUIT").expect_code(221);
    }
    let mut c = Client::connect(g.addr);
    c.read_reply().expect_raw(CONNECTION_RATE);
    c.expect_closed();
    // A real client sees it as the greeting.
    let s = smtplib(g.addr, FROM, &[TO], json!({}));
    assert_eq!(
        (s.status.as_str(), s.reply_line()),
        ("response", CONNECTION_RATE.into())
    );
    assert_eq!(
        up.conns().len(),
        3,
        "the upstream was contacted for a refused client"
    );
    // Another client address has its own count.
    let mut c = Client::connect_from(OTHER_HOST, g.addr);
    assert_eq!(c.read_reply().code, 220);
    c.ehlo();
    c.send_message(FROM, TO, b"from another host\r\n")
        .expect(250, "2.0.0");
    c.cmd("QUIT").expect_code(221);
    assert_eq!(up.wait_messages(1).len(), 1);
}

#[test]
fn rate_per_ip_messages_counts_mail_commands() {
    let up = Upstream::start();
    let g = one_thread_guard(&up, "rate_per_ip = { messages = 2 }\n");
    let mut c = g.client();
    c.ehlo();
    for i in 0..2 {
        c.send_message(FROM, TO, format!("message {i}\r\n").as_bytes())
            .expect(250, "2.0.0");
    }
    c.cmd(&format!("MAIL FROM:<{FROM}>"))
        .expect_raw(MESSAGE_RATE);
    c.cmd("QUIT").expect_code(221);
    // The count is per client address, over its connections.
    let s = smtplib(g.addr, FROM, &[TO], json!({}));
    assert_eq!(
        (s.status.as_str(), s.reply_line()),
        ("sender", MESSAGE_RATE.into())
    );
    let s = smtplib(g.addr, FROM, &[TO], json!({ "source": "127.0.0.2" }));
    assert_smtplib_delivered(&up, 3, &s);
    assert_eq!(mail_commands(&up), 3, "{}", show_lines(&up.commands()));
}

#[test]
fn rate_per_sender_counts_each_address_from_any_host() {
    let up = Upstream::start();
    let g = one_thread_guard(&up, "rate_per_sender = 2\n");
    let mut c = g.client();
    c.ehlo();
    try_mail(&mut c, "a@x.test").expect_code(250);
    try_mail(&mut c, "A@X.TEST").expect_code(250);
    try_mail(&mut c, "a@x.test").expect_raw(MESSAGE_RATE);
    try_mail(&mut c, "b@x.test").expect_code(250);
    c.cmd("QUIT").expect_code(221);
    let mut c = Client::connect_from(OTHER_HOST, g.addr);
    assert_eq!(c.read_reply().code, 220);
    c.ehlo();
    try_mail(&mut c, "a@x.test").expect_raw(MESSAGE_RATE);
    c.cmd("QUIT").expect_code(221);

    let s = smtplib(g.addr, "b@x.test", &[TO], json!({}));
    assert_smtplib_delivered(&up, 1, &s);
    let s = smtplib(g.addr, "b@x.test", &[TO], json!({}));
    assert_eq!(
        (s.status.as_str(), s.reply_line()),
        ("sender", MESSAGE_RATE.into())
    );
    assert_eq!(mail_commands(&up), 4, "{}", show_lines(&up.commands()));
}

// ---------------------------------------------------------------------------------------------
// Early talkers
// ---------------------------------------------------------------------------------------------

#[test]
fn pregreet_wait_refuses_early_talkers_and_greets_patient_clients() {
    let up = Upstream::start();
    let g = Guard::start(up.addr, Some("pregreet_wait_ms = 1500\n"));
    // A real client, waiting for the banner as it should, in parallel.
    let addr = g.addr;
    let patient = thread::spawn(move || smtplib(addr, FROM, &[TO], json!({})));

    let mut early = Client::connect(g.addr);
    early.send(b"EHLO early.test\r\n");
    early.read_reply().expect_raw(PROTOCOL_ERROR);
    early.expect_closed();

    let mut c = Client::connect(g.addr);
    c.set_timeout(Duration::from_millis(400));
    match c.try_read_reply() {
        Err(ReadError::Timeout(b)) if b.is_empty() => {}
        other => panic!("the banner was not held back: {other:?}"),
    }
    c.set_timeout(WAIT);
    let banner = c.read_reply();
    assert_eq!(banner.code, 220, "{banner}");
    assert_eq!(banner.lines, vec![BANNER.to_string()]);
    c.ehlo();
    c.send_message(FROM, TO, b"patient\r\n")
        .expect(250, "2.0.0");
    c.cmd("QUIT").expect_code(221);

    let s = patient.join().unwrap();
    assert_eq!(s.status, "ok", "{s:?}");
    assert_eq!(up.wait_messages(2).len(), 2);
    assert_never_forwarded(&up, b"early.test");
}

#[test]
fn reject_unauth_pipelining_when_pipelining_is_not_offered() {
    let up = Upstream::start();
    let g = Guard::start(
        up.addr,
        Some(concat!(
            "reject_unauth_pipelining = true\n",
            "extensions = [\"SIZE\", \"8BITMIME\", \"ENHANCEDSTATUSCODES\"]\n",
        )),
    );
    // A client that waits for each reply (smtplib does) is fine.
    let s = smtplib(g.addr, FROM, &[TO], json!({}));
    assert_smtplib_delivered(&up, 1, &s);

    let mut c = g.client();
    let ehlo = c.ehlo();
    assert!(!ehlo.text().contains("PIPELINING"), "{ehlo}");
    c.cmd(&format!("MAIL FROM:<{FROM}>")).expect_code(250);
    c.send(b"RCPT TO:<one@example.test>\r\nRCPT TO:<two@example.test>\r\n");
    let replies = replies_until_closed(&mut c);
    let last = replies.last().expect("a reply");
    assert_eq!(
        String::from_utf8_lossy(&last.raw),
        PROTOCOL_ERROR,
        "{replies:?}"
    );
    assert!(
        replies[..replies.len() - 1].iter().all(|r| r.code == 250),
        "{replies:?}"
    );
    assert_never_forwarded(&up, b"two@example.test");
    assert_eq!(up.messages().len(), 1);
}

#[test]
fn reject_unauth_pipelining_before_the_banner() {
    // A slow upstream greeting keeps the banner back long enough for the client to talk first.
    let up = Upstream::with(UpstreamOptions {
        reply_delay: Duration::from_millis(800),
        ..UpstreamOptions::default()
    });
    let g = Guard::start(up.addr, Some("reject_unauth_pipelining = true\n"));
    let mut c = Client::connect(g.addr);
    c.send(b"EHLO early.test\r\n");
    c.read_reply().expect_raw(PROTOCOL_ERROR);
    c.expect_closed();
    assert_never_forwarded(&up, b"early.test");
}

#[test]
fn reject_unauth_pipelining_allows_pipelining_when_offered() {
    let up = Upstream::start();
    let g = Guard::start(up.addr, Some("reject_unauth_pipelining = true\n"));
    let mut c = g.client();
    let ehlo = c.ehlo();
    assert!(ehlo.text().contains("PIPELINING"), "{ehlo}");
    c.send(
        format!("MAIL FROM:<{FROM}>\r\nRCPT TO:<{TO}>\r\nRCPT TO:<two@example.test>\r\nDATA\r\n")
            .as_bytes(),
    );
    let r = c.read_replies(4);
    let codes: Vec<u16> = r.iter().map(|r| r.code).collect();
    assert_eq!(codes, vec![250, 250, 250, 354], "{r:?}");
    c.send(b"pipelined\r\n.\r\n");
    c.read_reply().expect(250, "2.0.0");
    c.cmd("QUIT").expect_code(221);
    let m = up.wait_messages(1);
    assert_eq!(m[0].rcpts.len(), 2);
    assert_eq!(m[0].body, b"pipelined\r\n");
}
