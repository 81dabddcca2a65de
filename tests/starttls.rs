//! `starttls = "terminate"` (issue 6) through the real binary: mailguard answers STARTTLS
//! itself with the policy's certificate, terminates TLS from swaks, Python's smtplib, openssl
//! s_client and a rustls client, and keeps inspecting the plaintext, which is what reaches the
//! recording upstream.
//!
//! `upstream_tls = "starttls"` runs against a private Postfix offering STARTTLS, whose Received
//! header must say the hop from mailguard was TLS.
//!
//! Certificates are made per test with `openssl req` in a TempDir: a test CA, a server
//! certificate for 127.0.0.1 signed by it, and a second, unrelated CA.

mod common;
mod postfix_common;
mod smtplib_client;
mod tls_common;

use common::*;
use serde_json::json;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};
use tls_common::Pki;

use postfix_common::{Postfix, PostfixBuilder};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};

const FROM: &str = "sender@example.test";
const TO: &str = "rcpt@example.test";
const READY: &str = "220 2.0.0 Ready to start TLS\r\n";

/// A rustls client trusting `ca`, over an SMTP connection that just got its 220 to STARTTLS.
struct TlsClient {
    stream: StreamOwned<ClientConnection, TcpStream>,
    buf: Vec<u8>,
}

impl TlsClient {
    #[track_caller]
    fn handshake(plain: &Client, ca: &Path) -> TlsClient {
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(ca).expect("CA file") {
            roots.add(cert.expect("CA certificate")).expect("CA added");
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        let name = ServerName::try_from("127.0.0.1").expect("server name");
        let conn = ClientConnection::new(Arc::new(config), name).expect("client connection");
        let tcp = plain.stream.try_clone().expect("clone the socket");
        tcp.set_read_timeout(Some(WAIT)).unwrap();
        let mut stream = StreamOwned::new(conn, tcp);
        while stream.conn.is_handshaking() {
            stream
                .conn
                .complete_io(&mut stream.sock)
                .expect("TLS handshake with mailguard");
        }
        TlsClient {
            stream,
            buf: Vec::new(),
        }
    }

    fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("write over TLS");
        self.stream.flush().expect("flush over TLS");
    }

    /// One whole reply (every line up to the one with a space after the code).
    #[track_caller]
    fn reply(&mut self) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(end) = reply_end(&self.buf) {
                let reply: Vec<u8> = self.buf.drain(..end).collect();
                return String::from_utf8_lossy(&reply).into_owned();
            }
            assert!(
                Instant::now() < deadline,
                "no reply over TLS: {:?}",
                self.buf
            );
            let mut chunk = [0u8; 4096];
            match self.stream.read(&mut chunk) {
                Ok(0) => panic!("closed while reading a reply: {:?}", self.buf),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) => panic!("read over TLS: {e}; so far {:?}", self.buf),
            }
        }
    }

    #[track_caller]
    fn cmd(&mut self, line: &str) -> String {
        self.send(format!("{line}\r\n").as_bytes());
        self.reply()
    }
}

/// The length of the first complete reply in `buf`, if there is one.
fn reply_end(buf: &[u8]) -> Option<usize> {
    let mut start = 0;
    while let Some(lf) = buf[start..].iter().position(|&b| b == b'\n') {
        let line = &buf[start..start + lf + 1];
        start += lf + 1;
        if line.get(3) != Some(&b'-') {
            return Some(start);
        }
    }
    None
}

/// EHLO, STARTTLS and its 220 in plain text, then the handshake.
#[track_caller]
fn tls_session(guard: &Guard, pki: &Pki) -> TlsClient {
    let mut c = guard.client();
    c.ehlo();
    c.cmd("STARTTLS").expect_raw(READY);
    TlsClient::handshake(&c, &pki.path("ca.pem"))
}

fn count_lines(reply: &str, keyword: &str) -> usize {
    reply
        .lines()
        .filter(|l| l.get(4..).is_some_and(|k| k.eq_ignore_ascii_case(keyword)))
        .count()
}

/// Runs `cmd` to its end (bounded), feeding `stdin`; returns (success, stdout + stderr).
fn run(mut cmd: Command, stdin: &[u8], label: &str) -> (bool, String) {
    let dir = TempDir::new();
    let out_path = dir.path.join("out.txt");
    let out = std::fs::File::create(&out_path).unwrap();
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap_or_else(|e| panic!("{label} is needed by this test: {e}"));
    if let Some(mut input) = child.stdin.take() {
        input.write_all(stdin).expect("write stdin");
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{label} still running after 60 s");
        }
        thread::sleep(Duration::from_millis(10));
    };
    let text = std::fs::read_to_string(&out_path).unwrap_or_default();
    (status.success(), text)
}

fn swaks(addr: SocketAddr, ca: &str, body: &str) -> (bool, String) {
    let mut cmd = Command::new("swaks");
    cmd.args([
        "--server",
        &addr.to_string(),
        "--tls",
        "--tls-verify",
        "--tls-ca-path",
        ca,
    ])
    .args(["--from", FROM, "--to", TO, "--helo", CLIENT_NAME])
    .args(["--header", "Subject: over TLS", "--body", body]);
    run(cmd, b"", "swaks")
}

#[test]
fn swaks_delivers_through_terminated_tls() {
    let pki = Pki::new();
    let up = Upstream::start();
    let g = Guard::start(up.addr, Some(&pki.policy("")));
    let (ok, out) = swaks(g.addr, &pki.ca(), "swaks-tls-marker");
    assert!(ok, "swaks failed: {out}");
    assert!(out.contains("220 2.0.0 Ready to start TLS"), "{out}");
    let msgs = up.wait_messages(1);
    assert_eq!(msgs.len(), 1);
    assert!(
        contains(&msgs[0].body, b"swaks-tls-marker"),
        "{}",
        show(&msgs[0].body)
    );
    assert!(contains(&msgs[0].body, b"Subject: over TLS"));
    // The upstream spoke plain text and never saw the client's STARTTLS.
    assert!(!up.saw_command_containing(b"STARTTLS"));
    assert!(up.conns().iter().all(|c| !c.starttls));
    // The session's log line counts the terminated TLS (and so does the metric).
    assert!(
        wait_for(WAIT, || g.stderr().contains("tls_terminated=1")),
        "{}",
        g.stderr()
    );
}

#[test]
fn smtplib_starttls_delivers_the_message_intact() {
    let pki = Pki::new();
    let up = Upstream::start();
    let g = Guard::start(up.addr, Some(&pki.policy("")));
    let spec = json!({ "starttls": pki.ca(), "text": "Hello over TLS\n" });
    let sent = smtplib_client::send(HEAD, g.addr, FROM, TO, &spec, "smtplib starttls");
    assert_eq!(sent.status, "ok", "{sent:?}");
    let msgs = up.wait_messages(1);
    assert_eq!(msgs.len(), 1);
    assert_eq!(
        msgs[0].body,
        dot_stuff(&sent.data),
        "{}",
        show(&msgs[0].body)
    );
    assert!(contains(&msgs[0].mail_from, format!("<{FROM}>").as_bytes()));
    // A large body (many TLS records, many ring reads) arrives byte-exact too, dots included.
    let line = ".a line of a large message sent over TLS, with a leading dot 0123456789\n";
    let spec = json!({ "starttls": pki.ca(), "text": line, "repeat": 8000 });
    let big = smtplib_client::send(HEAD, g.addr, FROM, TO, &spec, "smtplib large");
    assert_eq!(big.status, "ok", "{big:?}");
    assert!(big.data.len() > 500_000);
    let msgs = up.wait_messages(2);
    assert_eq!(msgs.len(), 2);
    assert!(
        msgs[1].body == dot_stuff(&big.data),
        "the large body differs"
    );
}

/// Builds the message for smtplib (see tests/smtplib_client).
const HEAD: &str = r#"
import json, smtplib, sys
from email import policy
from email.message import EmailMessage

port, sender, rcpts, spec, dump = sys.argv[1:6]
spec = json.loads(spec)
msg = EmailMessage()
msg["From"] = sender
msg["To"] = rcpts
msg["Subject"] = "starttls"
msg.set_content(spec["text"] * spec.get("repeat", 1))
data = msg.as_bytes(policy=policy.SMTP)
with open(dump, "wb") as f:
    f.write(data)
"#;

#[test]
fn a_client_verifying_against_another_ca_delivers_nothing() {
    let pki = Pki::new();
    let up = Upstream::start();
    let g = Guard::start(up.addr, Some(&pki.policy("")));
    let spec = json!({ "starttls": pki.other_ca(), "text": "must not arrive\n" });
    let sent = smtplib_client::send(HEAD, g.addr, FROM, TO, &spec, "smtplib wrong CA");
    assert_eq!(sent.status, "disconnected", "{sent:?}");
    assert!(sent.msg.contains("CERTIFICATE_VERIFY_FAILED"), "{sent:?}");
    let (ok, out) = swaks(g.addr, &pki.other_ca(), "must not arrive either");
    assert!(!ok, "swaks verified a certificate of another CA: {out}");
    // The guard is still serving: a good client gets through afterwards.
    let spec = json!({ "starttls": pki.ca(), "text": "this one arrives\n" });
    let good = smtplib_client::send(HEAD, g.addr, FROM, TO, &spec, "smtplib after");
    assert_eq!(good.status, "ok", "{good:?}");
    let msgs = up.wait_messages(1);
    assert_eq!(msgs.len(), 1, "only the verified client's message");
    assert!(contains(&msgs[0].body, b"this one arrives"));
    assert!(!up.saw_command_containing(b"must not"));
}

#[test]
fn openssl_s_client_delivers_a_message() {
    let pki = Pki::new();
    let up = Upstream::start();
    let g = Guard::start(up.addr, Some(&pki.policy("")));
    let mut cmd = Command::new("openssl");
    cmd.args([
        "s_client",
        "-starttls",
        "smtp",
        "-quiet",
        "-crlf",
        "-verify_return_error",
    ])
    .args(["-CAfile", &pki.ca(), "-connect", &g.addr.to_string()]);
    let script = format!(
        "EHLO {CLIENT_NAME}\nMAIL FROM:<{FROM}>\nRCPT TO:<{TO}>\nDATA\n\
         Subject: s_client\n\nopenssl-tls-marker\n.\nQUIT\n"
    );
    let (_, out) = run(cmd, script.as_bytes(), "openssl s_client");
    assert!(out.contains("221"), "no 221 to QUIT: {out}");
    let msgs = up.wait_messages(1);
    assert_eq!(msgs.len(), 1, "{out}");
    assert_eq!(
        msgs[0].body,
        b"Subject: s_client\r\n\r\nopenssl-tls-marker\r\n".to_vec()
    );
}

#[test]
fn commands_pipelined_with_starttls_are_discarded() {
    let pki = Pki::new();
    let up = Upstream::start();
    let g = Guard::start(up.addr, Some(&pki.policy("")));
    let mut c = g.client();
    c.ehlo();
    c.send(b"STARTTLS\r\nMAIL FROM:<injected@evil.test>\r\nRCPT TO:<victim@example.test>\r\n");
    c.read_reply().expect_raw(READY);
    let mut t = TlsClient::handshake(&c, &pki.path("ca.pem"));
    // The first reply inside TLS answers this EHLO: nothing was owed for the injected lines.
    let ehlo = t.cmd(&format!("EHLO {CLIENT_NAME}"));
    assert!(ehlo.starts_with("250-"), "{ehlo}");
    assert_eq!(
        count_lines(&ehlo, "STARTTLS"),
        0,
        "offered again inside TLS: {ehlo}"
    );
    assert!(t.cmd(&format!("MAIL FROM:<{FROM}>")).starts_with("250"));
    assert!(t.cmd(&format!("RCPT TO:<{TO}>")).starts_with("250"));
    assert!(t.cmd("DATA").starts_with("354"));
    assert!(t.cmd("Subject: after\r\n\r\nclean\r\n.").starts_with("250"));
    assert!(t.cmd("QUIT").starts_with("221"));
    let msgs = up.wait_messages(1);
    assert_eq!(msgs.len(), 1);
    assert_eq!(
        msgs[0].mail_from,
        format!("MAIL FROM:<{FROM}>").into_bytes()
    );
    assert!(!up.saw_command_containing(b"injected"));
    assert!(!up.saw_command_containing(b"victim"));
}

#[test]
fn ehlo_offers_starttls_once_and_the_client_must_ehlo_again() {
    let pki = Pki::new();
    let up = Upstream::start();
    let g = Guard::start(up.addr, Some(&pki.policy("")));
    let mut c = g.client();
    let ehlo = String::from_utf8_lossy(&c.ehlo().raw).into_owned();
    assert_eq!(count_lines(&ehlo, "STARTTLS"), 1, "{ehlo}");
    c.cmd("STARTTLS now").expect(501, "5.5.4");
    c.cmd("STARTTLS").expect_raw(READY);
    let mut t = TlsClient::handshake(&c, &pki.path("ca.pem"));
    let mail = t.cmd(&format!("MAIL FROM:<{FROM}>"));
    assert!(
        mail.starts_with("503 5.5.1"),
        "MAIL before the new EHLO: {mail}"
    );
    t.cmd(&format!("EHLO {CLIENT_NAME}"));
    let again = t.cmd("STARTTLS");
    assert!(
        again.starts_with("503 5.5.1"),
        "STARTTLS inside TLS: {again}"
    );
    assert!(t.cmd(&format!("MAIL FROM:<{FROM}>")).starts_with("250"));
    assert!(t.cmd("QUIT").starts_with("221"));
}

#[test]
fn bare_lf_smuggling_is_refused_inside_tls_as_in_plain_text() {
    let pki = Pki::new();
    let up = Upstream::start();
    let g = Guard::start(up.addr, Some(&pki.policy("bare_lf = \"reject\"")));
    let mut t = tls_session(&g, &pki);
    t.cmd(&format!("EHLO {CLIENT_NAME}"));
    assert!(t.cmd(&format!("MAIL FROM:<{FROM}>")).starts_with("250"));
    assert!(t.cmd(&format!("RCPT TO:<{TO}>")).starts_with("250"));
    assert!(t.cmd("DATA").starts_with("354"));
    t.send(b"Subject: smuggle\r\n\r\nhello\n.\nMAIL FROM:<smuggled@evil.test>\r\n.\r\n");
    let reply = t.reply();
    assert!(reply.starts_with("550 5.6.11"), "{reply}");
    assert!(up.messages().is_empty());
    assert!(!up.saw_command_containing(b"smuggled"));
}

#[test]
fn a_handshake_that_never_finishes_is_closed_at_the_command_timeout() {
    let pki = Pki::new();
    let up = Upstream::start();
    let g = Guard::start(up.addr, Some(&pki.policy("command_timeout = 1")));
    let mut c = g.client();
    c.ehlo();
    c.cmd("STARTTLS").expect_raw(READY);
    // Half a ClientHello record header, then silence.
    c.send(&[0x16, 0x03, 0x01]);
    c.expect_closed();
    // A client sending garbage instead of a ClientHello is closed too, without a reply.
    let mut c = g.client();
    c.ehlo();
    c.cmd("STARTTLS").expect_raw(READY);
    c.send(b"MAIL FROM:<plain@evil.test>\r\n");
    // rustls answers with a fatal alert record, never with an SMTP reply.
    let rest = c.wait_closed().expect("closed after a broken handshake");
    assert!(rest.is_empty() || rest[0] == 0x15, "{}", show(&rest));
    assert!(!up.saw_command_containing(b"plain@evil"));
}

#[test]
fn terminate_without_a_certificate_is_refused_with_file_line_column() {
    let dir = TempDir::new();
    let p = dir.write(
        "policy.toml",
        b"mode = \"modern\"\nstarttls = \"terminate\"\n",
    );
    let (status, err) = run_to_exit(&["check", "--policy", &p.display().to_string()]);
    assert_one_line_failure(status, &err);
    assert!(err.contains("policy.toml:2:12:"), "{err}");
    assert!(err.contains("tls_cert and tls_key"), "{err}");

    let pki = Pki::new();
    let bad = dir.write("bad.pem", b"not a certificate\n");
    let text = format!(
        "starttls = \"terminate\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\n",
        bad.display(),
        pki.path("key.pem").display()
    );
    let p = dir.write("policy2.toml", text.as_bytes());
    let (status, err) = run_to_exit(&["check", "--policy", &p.display().to_string()]);
    assert_one_line_failure(status, &err);
    assert!(err.contains("bad.pem"), "names the file: {err}");

    // Relative paths are taken beside the policy file.
    std::fs::copy(pki.path("cert.pem"), dir.path.join("cert.pem")).unwrap();
    std::fs::copy(pki.path("key.pem"), dir.path.join("key.pem")).unwrap();
    let text = "starttls = \"terminate\"\ntls_cert = \"cert.pem\"\ntls_key = \"key.pem\"\n";
    let p = dir.write("relative.toml", text.as_bytes());
    let (status, err) = run_to_exit(&["check", "--policy", &p.display().to_string()]);
    assert!(status.success(), "{err}");

    // A mode without STARTTLS could never use the certificate: refused, not silently idle.
    let text = "mode = \"esmtp\"\nstarttls = \"terminate\"\ntls_cert = \"cert.pem\"\ntls_key = \"key.pem\"\n";
    let p = dir.write("esmtp.toml", text.as_bytes());
    let (status, err) = run_to_exit(&["check", "--policy", &p.display().to_string()]);
    assert_one_line_failure(status, &err);
    assert!(err.contains("esmtp.toml:2:12:"), "{err}");
    assert!(err.contains("needs the STARTTLS verb"), "{err}");

    let text = "upstream_tls = \"starttls\"\n";
    let p = dir.write("policy3.toml", text.as_bytes());
    let (status, err) = run_to_exit(&["check", "--policy", &p.display().to_string()]);
    assert_one_line_failure(status, &err);
    assert!(err.contains("policy3.toml:1:16:"), "{err}");
    assert!(err.contains("upstream_tls_ca"), "{err}");
}

/// Sends SIGHUP to the guard this test started (by its PID) and waits for the outcome line.
#[track_caller]
fn reload(g: &Guard, expect: &str, n: usize) {
    let status = Command::new("kill")
        .args(["-HUP", &g.pid().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    assert!(
        wait_for(WAIT, || g.stderr().matches(expect).count() >= n),
        "no {expect:?} after SIGHUP: {}",
        g.stderr()
    );
}

#[test]
fn sighup_reloads_the_certificate_and_a_broken_one_keeps_the_old() {
    let pki = Pki::new();
    let up = Upstream::start();
    let g = Guard::start(up.addr, Some(&pki.policy("")));
    let cert = pki.path("cert.pem");
    let good = std::fs::read(&cert).unwrap();

    std::fs::write(&cert, b"-----BEGIN CERTIFICATE-----\nnot base64\n").unwrap();
    reload(&g, "reload refused, the old policy stays", 1);
    assert!(
        g.stderr().contains("cert.pem"),
        "names the file: {}",
        g.stderr()
    );
    let mut t = tls_session(&g, &pki);
    assert!(
        t.cmd("QUIT").starts_with("221"),
        "the old certificate still serves"
    );

    // A certificate from the other CA: clients trusting only the first one now fail.
    pki.openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "other.pem",
        "-CAkey",
        "other.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-out",
        "cert.pem",
        "-extfile",
        "server.ext",
    ]);
    assert_ne!(std::fs::read(&cert).unwrap(), good);
    reload(&g, "generation 2 is live", 1);
    assert!(g.stderr().contains("(new file contents)"), "{}", g.stderr());
    let spec = json!({ "starttls": pki.other_ca(), "text": "after the reload\n" });
    let sent = smtplib_client::send(HEAD, g.addr, FROM, TO, &spec, "smtplib new cert");
    assert_eq!(sent.status, "ok", "{sent:?}");
    let spec = json!({ "starttls": pki.ca(), "text": "old CA\n" });
    let sent = smtplib_client::send(HEAD, g.addr, FROM, TO, &spec, "smtplib old CA");
    assert_eq!(sent.status, "disconnected", "{sent:?}");
    assert_eq!(up.wait_messages(1).len(), 1);
}

/// A private Postfix offering STARTTLS with `pki`'s certificate (for 127.0.0.1) and saying in
/// its Received header whether the hop was TLS; it also takes XCLIENT from loopback.
fn tls_postfix(pki: &Pki) -> Postfix {
    PostfixBuilder::new()
        .tls(&pki.path("cert.pem"), &pki.path("key.pem"))
        .set("smtpd_tls_received_header", "yes")
        .xclient_hosts("127.0.0.0/8")
        .start()
}

/// The Received line Postfix added to its only queued message, unfolded.
#[track_caller]
fn received_by(postfix: &Postfix) -> String {
    let q = postfix.wait_queue(1, Duration::from_secs(20));
    assert_eq!(q.len(), 1, "Postfix queued {q:?}; log: {}", postfix.log());
    let message = String::from_utf8_lossy(&postfix.message(&q[0].id)).into_owned();
    let head = message.split("\n\n").next().unwrap_or_default().to_string();
    head.split("\nReceived:")
        .next()
        .unwrap_or_default()
        .replace("\n\t", " ")
        .replace("\n ", " ")
}

/// A plain-text session from `from` delivering one message.
#[track_caller]
fn deliver_plain(from: IpAddr, guard: SocketAddr, sender: &str) {
    let mut c = Client::connect_from(from, guard);
    c.read_reply().expect_code(220);
    let ehlo = c.ehlo();
    assert!(!ehlo.text().contains("XCLIENT"), "{ehlo}");
    c.send_message(sender, "rcpt@example.com", b"Subject: up\r\n\r\nhello\r\n")
        .expect_code(250);
    c.cmd("QUIT").expect_code(221);
    c.expect_closed();
}

#[test]
fn upstream_starttls_to_postfix_verified_and_both_hops_encrypted() {
    let pki = Pki::new();
    let postfix = tls_postfix(&pki);
    let policy = pki.policy(&format!(
        "upstream_tls = \"starttls\"\nupstream_tls_ca = \"{}\"",
        pki.ca()
    ));
    let g = Guard::start(postfix.addr(), Some(&policy));
    let line = "TLS on both hops, a line repeated to make many records\n";
    let spec = json!({ "starttls": pki.ca(), "text": line, "repeat": 4000 });
    let sent = smtplib_client::send(HEAD, g.addr, FROM, TO, &spec, "smtplib both hops");
    assert_eq!(
        sent.status,
        "ok",
        "{sent:?}; guard: {}\npostfix: {}",
        g.stderr(),
        postfix.log()
    );
    let received = received_by(&postfix);
    assert!(
        received.contains("using TLS"),
        "the hop from mailguard was not TLS: {received}\nlog: {}",
        postfix.log()
    );
    assert!(
        wait_for(WAIT, || g
            .stderr()
            .contains("tls_terminated=1 upstream_tls=1")),
        "{}",
        g.stderr()
    );
    let id = &postfix.queue()[0].id;
    assert_eq!(postfix.body(id).matches("TLS on both hops").count(), 4000);
}

#[test]
fn upstream_starttls_with_xclient_names_the_client_inside_tls_also_after_a_reconnect() {
    let pki = Pki::new();
    let postfix = tls_postfix(&pki);
    let policy = format!(
        "upstream_tls = \"starttls\"\nupstream_tls_ca = \"{}\"\nupstream_identity = \"xclient\"\n",
        pki.ca()
    );
    let policy = format!("{policy}bare_lf = \"reject\"\n");
    let g = Guard::start(postfix.addr(), Some(&policy));
    let mut c = Client::connect_from("127.0.0.2".parse().unwrap(), g.addr);
    c.read_reply().expect_code(220);
    assert!(!c.ehlo().text().contains("XCLIENT"));
    // A bare LF aborts that upstream connection; the new one does STARTTLS and XCLIENT again
    // before the client's EHLO is replayed, and the next message goes through it.
    c.send_message("bad@example.org", "rcpt@example.com", b"a\nb\r\n")
        .expect(550, "5.6.11");
    c.send_message(
        "xclient-tls@example.org",
        "rcpt@example.com",
        b"Subject: after the reconnect\r\n\r\nok\r\n",
    )
    .expect_code(250);
    c.cmd("QUIT").expect_code(221);
    c.expect_closed();
    let received = received_by(&postfix);
    assert!(received.contains("[127.0.0.2]"), "{received}");
    assert!(received.contains("using TLS"), "{received}");
    let log = postfix.log();
    assert_eq!(
        log.matches(" starttls=1 ").count(),
        2,
        "two TLS connections: {log}"
    );
}

#[test]
fn upstream_certificate_of_another_ca_is_refused_unless_verify_is_off() {
    let pki = Pki::new();
    let postfix = tls_postfix(&pki);
    let policy = format!(
        "upstream_tls = \"starttls\"\nupstream_tls_ca = \"{}\"\n",
        pki.other_ca()
    );
    let g = Guard::start(postfix.addr(), Some(&policy));
    let mut c = Client::connect(g.addr);
    // The banner waits for the preamble; the failed verification answers instead of it.
    c.read_reply().expect(421, "4.3.0");
    c.expect_closed();
    assert!(postfix.queue().is_empty());
    drop(g);

    let policy = "upstream_tls = \"starttls\"\nupstream_tls_verify = false\n";
    let g = Guard::start(postfix.addr(), Some(policy));
    deliver_plain("127.0.0.1".parse().unwrap(), g.addr, "noverify@example.org");
    assert!(received_by(&postfix).contains("using TLS"));
}

#[test]
fn upstream_starttls_failing_sends_nothing_in_plain_text() {
    // The recording upstream answers STARTTLS with 220, then plain text instead of TLS: the
    // handshake fails and the client is told the service is unavailable.
    let up = Upstream::with(UpstreamOptions {
        tls_reply: b"250 this is not TLS\r\n".to_vec(),
        ..UpstreamOptions::default()
    });
    let policy = "upstream_tls = \"starttls\"\nupstream_tls_verify = false\n";
    let g = Guard::start(up.addr, Some(policy));
    let mut c = Client::connect(g.addr);
    c.read_reply().expect(421, "4.3.0");
    c.expect_closed();
    let conns = up.wait_conns(1);
    assert!(conns[0].starttls, "mailguard asked for STARTTLS");
    assert!(
        conns[0].after_starttls.first() == Some(&0x16),
        "a TLS handshake record followed: {}",
        show(&conns[0].after_starttls)
    );
    assert!(!up.saw_command_containing(b"MAIL"));
}
