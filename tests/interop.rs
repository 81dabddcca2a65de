//! The interoperability matrix (README, "Interoperability"): real clients send through the
//! guard in `mode = "modern"` to real upstreams, and every message must arrive exactly once,
//! with its header block intact and a byte-identical body, after the client saw 250.
//!
//! Clients: lettre, Python smtplib, swaks, Postfix's own SMTP client (a second private Postfix
//! whose relayhost is the guard), a character-mode "telnet" client (one byte per write) and a
//! raw BDAT client. Upstreams: a private Postfix (`tests/postfix_common`, read back from its
//! hold queue) and aiosmtpd (`tests/aiosmtpd_common`). Each test is one client against one
//! upstream (`starttls_to_*`: swaks, smtplib, lettre and Postfix's client over TLS terminated
//! by the guard, `starttls = "terminate"`); the upstream and the guard are started once per
//! test, not per message. Both upstreams offer AUTH PLAIN and LOGIN for one account (Postfix
//! through Cyrus SASL), and every cell checks which messages arrived authenticated.
//!
//! What "arrived intact" means, precisely ([`assert_delivered`]):
//! - the message as the client put it on the wire, with dot-stuffing undone (RFC 5321 4.5.2:
//!   every receiver undoes it), is the reference;
//! - aiosmtpd stores those bytes exactly;
//! - Postfix stores each line without its line ending and `postcat` ends each with LF, so LF is
//!   turned back into CRLF; this is exact because no message here holds a bare CR or LF (checked
//!   on the reference);
//! - an MTA puts its own `Received:` field in front of the header block (Postfix as upstream:
//!   one; Postfix as the relaying client: one more, at pickup); exactly that many are allowed
//!   in front, and the rest of the header block must equal the client's, byte for byte;
//! - the body (after the first empty line) must hash the same.

mod aiosmtpd_common;
mod common;
mod postfix_common;
mod smtplib_client;
mod tls_common;

use aiosmtpd_common::{Aiosmtpd, AUTH_PASSWORD, AUTH_USER};
use common::*;
use lettre::message::header::{ContentTransferEncoding, ContentType};
use lettre::message::{Attachment, Body, MultiPart, SinglePart};
use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::{Certificate, CertificateStore, Tls, TlsParameters};
use lettre::transport::smtp::extension::ClientId;
use lettre::{Message, SmtpTransport, Transport};
use postfix_common::{Postfix, PostfixBuilder};
use serde_json::json;
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;
use tls_common::Pki;

const POLICY: &str = "mode = \"modern\"\n";
const RCPT: &str = "rcpt@example.test";
/// How long a relaying Postfix gets to hand its queue to the guard.
const RELAY_WAIT: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------------
// The upstreams
// ---------------------------------------------------------------------------------------------

/// One message an upstream received, in wire form (CRLF lines, not dot-stuffed).
#[derive(Debug, Clone)]
struct Received {
    sender: String,
    rcpts: Vec<String>,
    message: Vec<u8>,
    /// MAIL parameters: only aiosmtpd reports them.
    mail_options: Vec<String>,
    smtputf8: bool,
    /// The AUTH login the upstream accepted for the session (Postfix: its log's
    /// `sasl_username=`).
    auth: Option<String>,
}

enum Mta {
    Postfix(Postfix),
    Aiosmtpd(Aiosmtpd),
}

impl Mta {
    /// A Postfix that offers AUTH (Cyrus SASL with its own sasldb) for the account every
    /// client here logs in with, as aiosmtpd does.
    fn postfix() -> Mta {
        Mta::Postfix(PostfixBuilder::new().sasl(AUTH_USER, AUTH_PASSWORD).start())
    }

    fn aiosmtpd() -> Mta {
        Mta::Aiosmtpd(Aiosmtpd::start())
    }

    fn addr(&self) -> SocketAddr {
        match self {
            Mta::Postfix(p) => p.addr(),
            Mta::Aiosmtpd(a) => a.addr,
        }
    }

    /// `Received:` fields this MTA itself puts in front of a message.
    fn own_received_fields(&self) -> usize {
        match self {
            Mta::Postfix(_) => 1,
            Mta::Aiosmtpd(_) => 0,
        }
    }

    fn received(&self) -> Vec<Received> {
        match self {
            Mta::Postfix(p) => p
                .queue()
                .into_iter()
                .map(|q| Received {
                    message: lf_to_crlf(&p.message(&q.id)),
                    auth: p.sasl_username(&q.id),
                    sender: q.sender,
                    rcpts: q.recipients,
                    mail_options: Vec::new(),
                    smtputf8: false,
                })
                .collect(),
            Mta::Aiosmtpd(a) => a
                .messages()
                .into_iter()
                .map(|m| Received {
                    sender: m.mail_from,
                    rcpts: m.rcpt_tos,
                    message: m.data,
                    mail_options: m.mail_options,
                    smtputf8: m.smtputf8,
                    auth: m.auth,
                })
                .collect(),
        }
    }
}

/// Postcat's LF line ends back into CRLF (exact for messages without a bare CR or LF).
fn lf_to_crlf(b: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(b.len() + b.len() / 32);
    for &c in b {
        if c == b'\n' {
            out.push(b'\r');
        }
        out.push(c);
    }
    out
}

fn guard(mta: &Mta) -> Guard {
    Guard::start(mta.addr(), Some(POLICY))
}

// ---------------------------------------------------------------------------------------------
// The check of every cell
// ---------------------------------------------------------------------------------------------

fn hash(b: &[u8]) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    b.hash(&mut h);
    h.finish()
}

/// (header block with its last CRLF, body after the empty line).
fn split_message(m: &[u8]) -> (&[u8], &[u8]) {
    match find(m, b"\r\n\r\n") {
        Some(at) => (&m[..at + 2], &m[at + 4..]),
        None => (m, &[]),
    }
}

/// Drops `n` leading `Received:` fields (with their folded lines) from a header block;
/// `None` if it does not start with that many.
fn strip_received(mut head: &[u8], n: usize) -> Option<&[u8]> {
    for _ in 0..n {
        if !head.to_ascii_lowercase().starts_with(b"received:") {
            return None;
        }
        let mut end = find(head, b"\r\n")? + 2;
        while matches!(head.get(end), Some(b' ' | b'\t')) {
            end += find(&head[end..], b"\r\n")? + 2;
        }
        head = &head[end..];
    }
    Some(head)
}

/// The message from `sender` arrived exactly once; its header block is the client's behind
/// `extra_received` + the MTA's own `Received:` fields; its body hashes as the client's.
#[track_caller]
fn assert_delivered(
    mta: &Mta,
    got: &[Received],
    sender: &str,
    sent: &[u8],
    extra_received: usize,
) -> Received {
    assert!(
        !has_bare_cr_or_lf(sent),
        "test bug: the reference holds a bare CR or LF"
    );
    let copies: Vec<&Received> = got.iter().filter(|r| r.sender == sender).collect();
    assert_eq!(
        copies.len(),
        1,
        "{sender}: want exactly one copy, the upstream has {} (senders: {:?})",
        copies.len(),
        got.iter().map(|r| &r.sender).collect::<Vec<_>>()
    );
    let r = copies[0].clone();
    assert!(r.rcpts.iter().any(|a| a == RCPT), "{sender}: {:?}", r.rcpts);
    let (want_head, want_body) = split_message(sent);
    let (got_head, got_body) = split_message(&r.message);
    let fields = mta.own_received_fields() + extra_received;
    let head = strip_received(got_head, fields).unwrap_or_else(|| {
        panic!(
            "{sender}: not {fields} Received fields first: {}",
            show(got_head)
        )
    });
    assert!(
        head == want_head,
        "{sender}: header block differs\ngot  {}\nwant {}",
        show(head),
        show(want_head)
    );
    assert!(
        hash(got_body) == hash(want_body),
        "{sender}: body differs (hash {:x} vs {:x}; {} vs {} bytes; first difference at {:?})",
        hash(got_body),
        hash(want_body),
        got_body.len(),
        want_body.len(),
        got_body.iter().zip(want_body).position(|(a, b)| a != b)
    );
    r
}

// ---------------------------------------------------------------------------------------------
// The messages
// ---------------------------------------------------------------------------------------------

/// 8-bit UTF-8 text (with lines that start with a dot, so dot-stuffing is exercised) and a
/// binary attachment of `attachment_len` bytes, built by lettre.
fn mime_message(from: &str, tag: &str, attachment_len: usize) -> Message {
    let text = format!(
        "Grüße aus Köln, {tag} — 日本語 ✓\r\n.a line that starts with a dot\r\n..two dots\r\n\
         .\r\nΕλληνικά, end of text\r\n"
    );
    let binary = pseudo_random(attachment_len, hash(tag.as_bytes()));
    Message::builder()
        .from(from.parse().expect("a valid From"))
        .to(RCPT.parse().expect("a valid To"))
        .subject(format!("interop {tag} ü"))
        .message_id(Some(format!("<{tag}@interop.test>")))
        .multipart(
            MultiPart::mixed()
                .singlepart(
                    SinglePart::builder().header(ContentType::TEXT_PLAIN).body(
                        Body::new_with_encoding(text, ContentTransferEncoding::EightBit)
                            .expect("8-bit text"),
                    ),
                )
                .singlepart(Attachment::new(format!("{tag}.bin")).body(
                    binary,
                    ContentType::parse("application/octet-stream").expect("a content type"),
                )),
        )
        .expect("a valid message")
}

/// The message as every client here puts it on the wire before dot-stuffing: lettre's bytes
/// and the CRLF lettre itself adds before the final dot.
fn wire(msg: &Message) -> Vec<u8> {
    let mut b = msg.formatted();
    b.extend_from_slice(b"\r\n");
    b
}

/// The decoded bytes of the message's last base64 part.
fn last_base64_part(m: &[u8]) -> Vec<u8> {
    let lower = m.to_ascii_lowercase();
    let marker = b"content-transfer-encoding: base64\r\n";
    let at = lower
        .windows(marker.len())
        .rposition(|w| w == marker)
        .expect("a base64 part");
    let start = at + find(&m[at..], b"\r\n\r\n").expect("the part's body") + 4;
    let text: Vec<u8> = m[start..]
        .split(|&c| c == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
        .take_while(|l| !l.starts_with(b"--"))
        .flatten()
        .copied()
        .collect();
    base64_decode(&text)
}

fn base64_decode(text: &[u8]) -> Vec<u8> {
    let value = |c: u8| -> Option<u32> {
        match c {
            b'A'..=b'Z' => Some(u32::from(c - b'A')),
            b'a'..=b'z' => Some(u32::from(c - b'a') + 26),
            b'0'..=b'9' => Some(u32::from(c - b'0') + 52),
            b'+' => Some(62),
            b'/' => Some(63),
            _ => None,
        }
    };
    let digits: Vec<u32> = text.iter().filter_map(|&c| value(c)).collect();
    let mut out = Vec::with_capacity(digits.len() * 3 / 4);
    for group in digits.chunks(4) {
        let n = group
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, d)| acc | d << (18 - 6 * i));
        let bytes = n.to_be_bytes();
        out.extend_from_slice(&bytes[1..group.len()]);
    }
    out
}

// ---------------------------------------------------------------------------------------------
// lettre
// ---------------------------------------------------------------------------------------------

/// Sends `msg` with lettre through the guard, logging in with `auth`, over STARTTLS with `tls`
/// (`Tls::Required`: lettre gives up rather than send in clear).
#[track_caller]
fn lettre_send(g: &Guard, msg: &Message, auth: Option<Mechanism>, tls: Option<TlsParameters>) {
    let mut b = SmtpTransport::builder_dangerous("127.0.0.1")
        .port(g.addr.port())
        .hello_name(ClientId::Domain(CLIENT_NAME.to_string()))
        .timeout(Some(Duration::from_secs(30)));
    if let Some(t) = tls {
        b = b.tls(Tls::Required(t));
    }
    if let Some(m) = auth {
        b = b
            .credentials(Credentials::new(AUTH_USER.into(), AUTH_PASSWORD.into()))
            .authentication(vec![m]);
    }
    let resp = b
        .build()
        .send(msg)
        .unwrap_or_else(|e| panic!("lettre through the guard: {e}"));
    assert_eq!(resp.code().to_string(), "250", "{resp:?}");
}

/// lettre: 8-bit text with a binary attachment, an SMTPUTF8 sender, AUTH PLAIN and LOGIN.
fn lettre_cell(mta: &Mta) {
    let g = guard(mta);
    let sent = [
        ("lettre-8bit@x.test".to_string(), 0),
        ("jörg-lettre@x.test".to_string(), 0),
        ("lettre-plain@x.test".to_string(), 1),
        ("lettre-login@x.test".to_string(), 2),
    ];
    let msgs: Vec<Message> = sent
        .iter()
        .map(|(from, _)| mime_message(from, &format!("lettre-{}", from.len()), 20_000))
        .collect();
    for ((_, how), msg) in sent.iter().zip(&msgs) {
        let mech = [None, Some(Mechanism::Plain), Some(Mechanism::Login)][*how];
        lettre_send(&g, msg, mech, None);
    }
    let got = mta.received();
    for ((from, how), msg) in sent.iter().zip(&msgs) {
        let r = assert_delivered(mta, &got, from, &wire(msg), 0);
        assert_eq!(last_base64_part(&r.message), last_base64_part(&wire(msg)));
        assert_eq!(r.auth.as_deref(), (*how > 0).then_some(AUTH_USER), "{from}");
        if let Mta::Aiosmtpd(_) = mta {
            assert!(r.mail_options.iter().any(|o| o == "BODY=8BITMIME"), "{r:?}");
            assert_eq!(r.smtputf8, !from.is_ascii(), "{from}: SMTPUTF8");
        }
    }
    assert_eq!(got.len(), sent.len(), "no other message arrived");
}

#[test]
fn lettre_to_postfix() {
    lettre_cell(&Mta::postfix());
}

#[test]
fn lettre_to_aiosmtpd() {
    lettre_cell(&Mta::aiosmtpd());
}

// ---------------------------------------------------------------------------------------------
// Python smtplib
// ---------------------------------------------------------------------------------------------

/// argv as `smtplib_client` wants; the message is the file named in the spec.
const SMTPLIB: &str = r#"
import json, smtplib, sys
port, sender, rcpts, spec, dump = sys.argv[1:6]
spec = json.loads(spec)
with open(spec["file"], "rb") as f:
    data = f.read()
with open(dump, "wb") as f:
    f.write(data)
"#;

/// smtplib: 8-bit MIME with `BODY=8BITMIME`, an SMTPUTF8 sender, AUTH PLAIN and LOGIN.
fn smtplib_cell(mta: &Mta) {
    let g = guard(mta);
    let dir = TempDir::new();
    let mut cases = vec![
        (
            "smtplib-8bit@x.test",
            json!({"mail_options": ["BODY=8BITMIME"]}),
        ),
        (
            "jörg-smtplib@x.test",
            json!({"mail_options": ["BODY=8BITMIME", "SMTPUTF8"]}),
        ),
    ];
    for (from, mech) in [
        ("smtplib-plain@x.test", "PLAIN"),
        ("smtplib-login@x.test", "LOGIN"),
    ] {
        cases.push((
            from,
            json!({"mail_options": ["BODY=8BITMIME"],
                   "auth": [AUTH_USER, AUTH_PASSWORD, mech]}),
        ));
    }
    let mut sent = Vec::new();
    for (i, (from, mut spec)) in cases.into_iter().enumerate() {
        let bytes = wire(&mime_message(from, &format!("smtplib-{i}"), 20_000));
        let file = dir.write(&format!("{i}.eml"), &bytes);
        spec["file"] = json!(path_str(&file));
        let s = smtplib_client::send(SMTPLIB, g.addr, from, RCPT, &spec, from);
        assert_eq!(s.status, "ok", "{from}: {s:?}");
        assert!(s.refused.is_empty(), "{from}: {s:?}");
        sent.push((from, s.data, spec));
    }
    let got = mta.received();
    for (from, data, spec) in &sent {
        let r = assert_delivered(mta, &got, from, data, 0);
        assert_eq!(last_base64_part(&r.message), last_base64_part(data));
        let login = spec.get("auth").map(|_| AUTH_USER);
        assert_eq!(r.auth.as_deref(), login, "{from}: AUTH");
        if let Mta::Aiosmtpd(_) = mta {
            assert!(r.mail_options.iter().any(|o| o == "BODY=8BITMIME"), "{r:?}");
            assert_eq!(r.smtputf8, !from.is_ascii(), "{from}: SMTPUTF8");
        }
    }
    assert_eq!(got.len(), sent.len(), "no other message arrived");
}

#[test]
fn smtplib_to_postfix() {
    smtplib_cell(&Mta::postfix());
}

#[test]
fn smtplib_to_aiosmtpd() {
    smtplib_cell(&Mta::aiosmtpd());
}

// ---------------------------------------------------------------------------------------------
// swaks
// ---------------------------------------------------------------------------------------------

/// Runs swaks against the guard (its own 30 s timeout bounds it); returns its transcript.
#[track_caller]
fn swaks(g: &Guard, from: &str, args: &[&str]) -> String {
    let port = g.addr.port().to_string();
    let server = format!("127.0.0.1:{port}");
    let out = Command::new("swaks")
        .args([
            "--server",
            &server,
            "--helo",
            CLIENT_NAME,
            "--timeout",
            "30",
        ])
        .args(["--from", from, "--to", RCPT])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("swaks is needed (.ci/run installs it)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "swaks {args:?} failed ({}): {text}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// The message swaks sent, from its transcript: the ` -> ` (` ~> ` in TLS) lines after the 354,
/// up to the lone dot, dot-stuffing undone; and the reply after the dot must be 250.
#[track_caller]
fn swaks_sent(transcript: &str) -> Vec<u8> {
    let lines: Vec<&str> = transcript.lines().collect();
    let start = lines
        .iter()
        .position(|l| l.starts_with("<-  354") || l.starts_with("<~  354"))
        .unwrap_or_else(|| panic!("no 354 in the transcript: {transcript}"));
    let mut msg = Vec::new();
    let mut end = None;
    for (i, l) in lines.iter().enumerate().skip(start + 1) {
        // ` ~> ` once swaks speaks TLS.
        let Some(data) = l.strip_prefix(" -> ").or_else(|| l.strip_prefix(" ~> ")) else {
            continue;
        };
        if data == "." {
            end = Some(i);
            break;
        }
        msg.extend_from_slice(data.strip_prefix('.').unwrap_or(data).as_bytes());
        msg.extend_from_slice(b"\r\n");
    }
    let end = end.unwrap_or_else(|| panic!("no end of data in the transcript: {transcript}"));
    let reply = lines[end + 1..]
        .iter()
        .find(|l| l.starts_with("<-") || l.starts_with("<~") || l.starts_with("<**"))
        .unwrap_or_else(|| panic!("no reply to the end of data: {transcript}"));
    assert!(
        reply.starts_with("<-  250") || reply.starts_with("<~  250"),
        "{reply}\n{transcript}"
    );
    msg
}

/// swaks: a whole 8-bit MIME message (`--data`), a binary `--attach`, `--pipeline` when the
/// upstream offers PIPELINING (Postfix), AUTH PLAIN and LOGIN.
fn swaks_cell(mta: &Mta) {
    let g = guard(mta);
    let dir = TempDir::new();
    let postfix = matches!(mta, Mta::Postfix(_));
    let pipeline: &[&str] = if postfix { &["--pipeline"] } else { &[] };
    let mut sent = Vec::new();

    let from = "swaks-8bit@x.test";
    let file = dir.write("8bit.eml", &wire(&mime_message(from, "swaks-8bit", 20_000)));
    let data = format!("@{}", path_str(&file));
    let t = swaks(&g, from, &[&["--data", data.as_str()], pipeline].concat());
    if postfix {
        assert!(t.contains("<-  250-PIPELINING"), "{t}");
    }
    sent.push((from, swaks_sent(&t), None));

    let from = "swaks-attach@x.test";
    let binary = pseudo_random(30_000, 7);
    let bin = dir.write("data.bin", &binary);
    let attach = format!("@{}", path_str(&bin));
    let t = swaks(
        &g,
        from,
        &[
            &[
                "--header",
                "X-Interop: swaks attach",
                "--body",
                "See the attachment.",
                "--attach-type",
                "application/octet-stream",
                "--attach",
                attach.as_str(),
            ],
            pipeline,
        ]
        .concat(),
    );
    sent.push((from, swaks_sent(&t), Some(binary)));

    {
        for (from, mech) in [
            ("swaks-plain@x.test", "PLAIN"),
            ("swaks-login@x.test", "LOGIN"),
        ] {
            let t = swaks(
                &g,
                from,
                &[
                    "--auth",
                    mech,
                    "--auth-user",
                    AUTH_USER,
                    "--auth-password",
                    AUTH_PASSWORD,
                    "--data",
                    data.as_str(),
                ],
            );
            assert!(t.contains("<-  235"), "{t}");
            sent.push((from, swaks_sent(&t), None));
        }
    }
    let got = mta.received();
    for (from, msg, attachment) in &sent {
        let r = assert_delivered(mta, &got, from, msg, 0);
        if let Some(b) = attachment {
            assert!(last_base64_part(&r.message) == *b, "{from}: attachment");
        }
        let login = (from.contains("plain") || from.contains("login")).then_some(AUTH_USER);
        assert_eq!(r.auth.as_deref(), login, "{from}");
    }
    assert_eq!(got.len(), sent.len(), "no other message arrived");
}

#[test]
fn swaks_to_postfix() {
    swaks_cell(&Mta::postfix());
}

#[test]
fn swaks_to_aiosmtpd() {
    swaks_cell(&Mta::aiosmtpd());
}

// ---------------------------------------------------------------------------------------------
// Postfix's SMTP client
// ---------------------------------------------------------------------------------------------

/// A second private Postfix that relays everything through the guard. It must not greet with
/// the upstream Postfix's name, or its client would see a mail loop.
fn relay_client(g: &Guard, sasl: bool) -> PostfixBuilder {
    let mut b = PostfixBuilder::new()
        .relayhost(g.addr)
        .set("myhostname", "relay-client.test.invalid");
    if sasl {
        b = b
            .set("smtp_sasl_auth_enable", "yes")
            .set(
                "smtp_sasl_password_maps",
                &format!("static:{AUTH_USER}:{AUTH_PASSWORD}"),
            )
            .set("smtp_sasl_security_options", "noanonymous")
            .set("smtp_sasl_mechanism_filter", "plain");
    }
    b
}

/// Waits (bounded) until the relaying Postfix has handed `n` messages over and its queue is
/// empty; checks that its client saw 250 for each (it logs the upstream's reply to each end of
/// data). Returns everything the upstream received: both upstreams store a message before
/// their 250.
#[track_caller]
fn wait_relayed(client: &Postfix, mta: &Mta, n: usize) -> Vec<Received> {
    let sent = |log: &str| log.matches("status=sent (250").count();
    let done = wait_for(RELAY_WAIT, || {
        sent(&client.log()) >= n && client.queue().is_empty()
    });
    let log = client.log();
    assert!(
        done && sent(&log) == n,
        "the relaying Postfix did not deliver {n} through the guard; its queue {:?}\n{log}",
        client.queue()
    );
    mta.received()
}

/// Postfix's client: 8-bit MIME (`sendmail -B 8BITMIME`) and an SMTPUTF8 sender, pipelined
/// when the upstream offers PIPELINING (Postfix), logged in with SASL AUTH PLAIN.
fn postfix_client_cell(mta: &Mta) {
    let g = guard(mta);
    let aio = matches!(mta, Mta::Aiosmtpd(_));
    let client = relay_client(&g, true).start();
    if !aio {
        // Postfix's client pipelines whenever the server offers it; make sure it was offered.
        let ehlo = g.client().ehlo();
        assert!(ehlo.text().contains("PIPELINING"), "{ehlo}");
    }
    let cases = ["postfix-8bit@x.test", "jörg-postfix@x.test"];
    let mut sent = Vec::new();
    for (i, from) in cases.iter().enumerate() {
        let msg = wire(&mime_message(from, &format!("postfix-{i}"), 20_000));
        client.sendmail_with(&["-B", "8BITMIME"], from, &[RCPT], &msg);
        sent.push((from, msg));
    }
    let got = wait_relayed(&client, mta, sent.len());
    for (from, msg) in &sent {
        let r = assert_delivered(mta, &got, from, msg, 1);
        assert_eq!(last_base64_part(&r.message), last_base64_part(msg));
        assert_eq!(r.auth.as_deref(), Some(AUTH_USER), "{from}: AUTH");
        if aio {
            assert!(r.mail_options.iter().any(|o| o == "BODY=8BITMIME"), "{r:?}");
            assert_eq!(r.smtputf8, !from.is_ascii(), "{from}: SMTPUTF8");
        }
    }
    assert_eq!(got.len(), sent.len(), "no other message arrived");
}

#[test]
fn postfix_client_to_postfix() {
    postfix_client_cell(&Mta::postfix());
}

#[test]
fn postfix_client_to_aiosmtpd() {
    postfix_client_cell(&Mta::aiosmtpd());
}

// ---------------------------------------------------------------------------------------------
// Raw clients: character-mode telnet, BDAT
// ---------------------------------------------------------------------------------------------

/// One session typed one character per write (`Client::send_bytewise`: a short pause after
/// each byte), the message included; returns the reply to the end of data. Bounded: the
/// message is a few kilobytes and every read has the client's timeout.
fn telnet_session(addr: SocketAddr, from: &str, msg: &[u8]) -> Reply {
    let mut c = Client::greeted(addr);
    let typed = |c: &mut Client, line: &str| -> Reply {
        c.send_bytewise(format!("{line}\r\n").as_bytes());
        c.read_reply()
    };
    typed(&mut c, &format!("EHLO {CLIENT_NAME}")).expect_code(250);
    typed(&mut c, &format!("MAIL FROM:<{from}> BODY=8BITMIME")).expect_code(250);
    typed(&mut c, &format!("RCPT TO:<{RCPT}>")).expect_code(250);
    typed(&mut c, "DATA").expect_code(354);
    c.send_bytewise(&dot_stuff(msg));
    let r = typed(&mut c, ".");
    typed(&mut c, "QUIT").expect_code(221);
    r
}

fn telnet_cell(mta: &Mta) {
    let g = guard(mta);
    let from = "telnet@x.test";
    let msg = wire(&mime_message(from, "telnet", 600));
    telnet_session(g.addr, from, &msg).expect_code(250);
    let got = mta.received();
    let r = assert_delivered(mta, &got, from, &msg, 0);
    assert_eq!(last_base64_part(&r.message), last_base64_part(&msg));
    if let Mta::Aiosmtpd(_) = mta {
        assert!(r.mail_options.iter().any(|o| o == "BODY=8BITMIME"), "{r:?}");
    }
    assert_eq!(got.len(), 1, "no other message arrived");
}

#[test]
fn telnet_character_mode_to_postfix() {
    telnet_cell(&Mta::postfix());
}

#[test]
fn telnet_character_mode_to_aiosmtpd() {
    telnet_cell(&Mta::aiosmtpd());
}

/// BDAT (CHUNKING) in three chunks cut mid-line, one of them right before a line that starts
/// with a dot, which is data in BDAT. aiosmtpd has no CHUNKING, so Postfix only.
#[test]
fn bdat_raw_client_to_postfix() {
    let mta = Mta::postfix();
    let g = guard(&mta);
    let from = "bdat@x.test";
    let msg = wire(&mime_message(from, "bdat", 20_000));
    let dot = find(&msg, b"\r\n.a line").expect("a dot line") + 2;
    let cuts = [0, dot, dot + 1000, msg.len()];
    let mut c = g.client();
    let ehlo = c.ehlo();
    assert!(ehlo.text().contains("CHUNKING"), "{ehlo}");
    c.cmd(&format!("MAIL FROM:<{from}> BODY=8BITMIME"))
        .expect_code(250);
    c.cmd(&format!("RCPT TO:<{RCPT}>")).expect_code(250);
    for w in cuts.windows(2) {
        let chunk = &msg[w[0]..w[1]];
        let last = if w[1] == msg.len() { " LAST" } else { "" };
        let mut cmd = format!("BDAT {}{last}\r\n", chunk.len()).into_bytes();
        cmd.extend_from_slice(chunk);
        c.send(&cmd);
        c.read_reply().expect_code(250);
    }
    c.cmd("QUIT").expect_code(221);
    let got = mta.received();
    let r = assert_delivered(&mta, &got, from, &msg, 0);
    assert_eq!(last_base64_part(&r.message), last_base64_part(&msg));
    assert_eq!(got.len(), 1, "no other message arrived");
}

/// The decoder the attachment checks rely on.
#[test]
fn base64_decoder_round_trips_a_known_value() {
    assert_eq!(base64_decode(b"aGVsbG8gd29ybGQ="), b"hello world");
    assert_eq!(base64_decode(b"AAEC/w=="), [0, 1, 2, 255]);
}

// ---------------------------------------------------------------------------------------------
// STARTTLS
// ---------------------------------------------------------------------------------------------

/// STARTTLS terminated by the guard (`starttls = "terminate"`, the upstream leg in plain text):
/// swaks `--tls`, smtplib `starttls()` and lettre (`Tls::Required`, rustls), all verifying the
/// guard's certificate against the test CA alone, and Postfix's client with
/// `smtp_tls_security_level = encrypt` (it refuses to send in clear); each sends 8-bit MIME with
/// an attachment. smtplib and lettre also authenticate (AUTH PLAIN) inside TLS.
fn starttls_cell(mta: &Mta) {
    let pki = Pki::new();
    let g = Guard::start(mta.addr(), Some(&format!("{POLICY}{}", pki.policy(""))));
    let dir = TempDir::new();
    let ca = pki.ca();
    let mut sent = Vec::new();

    let from = "swaks-tls@x.test";
    let file = dir.write("swaks.eml", &wire(&mime_message(from, "swaks-tls", 20_000)));
    let data = format!("@{}", path_str(&file));
    let t = swaks(
        &g,
        from,
        &[
            "--tls",
            "--tls-verify",
            "--tls-ca-path",
            &ca,
            "--data",
            &data,
        ],
    );
    assert!(t.contains("<~  354"), "the message went in clear: {t}");
    sent.push((from, swaks_sent(&t), 0));

    let from = "smtplib-tls@x.test";
    let file = dir.write(
        "smtplib.eml",
        &wire(&mime_message(from, "smtplib-tls", 20_000)),
    );
    let spec = json!({"file": path_str(&file), "starttls": ca,
                      "mail_options": ["BODY=8BITMIME"],
                      "auth": [AUTH_USER, AUTH_PASSWORD, "PLAIN"]});
    let s = smtplib_client::send(SMTPLIB, g.addr, from, RCPT, &spec, from);
    assert_eq!(s.status, "ok", "{from}: {s:?}");
    sent.push((from, s.data, 0));

    let from = "lettre-tls@x.test";
    let msg = mime_message(from, "lettre-tls", 20_000);
    lettre_send(&g, &msg, Some(Mechanism::Plain), Some(lettre_tls(&pki)));
    sent.push((from, wire(&msg), 0));

    let client = relay_client(&g, false)
        .set("smtp_tls_security_level", "encrypt")
        .set("smtp_tls_loglevel", "1")
        .start();
    let from = "postfix-tls@x.test";
    let msg = wire(&mime_message(from, "postfix-tls", 20_000));
    client.sendmail_with(&["-B", "8BITMIME"], from, &[RCPT], &msg);
    sent.push((from, msg, 1));

    let got = wait_relayed(&client, mta, 1);
    let log = client.log();
    assert!(log.contains("TLS connection established to"), "{log}");
    for (from, msg, extra) in &sent {
        let r = assert_delivered(mta, &got, from, msg, *extra);
        assert_eq!(last_base64_part(&r.message), last_base64_part(msg));
        let login =
            (from.starts_with("smtplib") || from.starts_with("lettre")).then_some(AUTH_USER);
        assert_eq!(r.auth.as_deref(), login, "{from}: AUTH in TLS");
    }
    assert_eq!(got.len(), sent.len(), "no other message arrived");
}

/// lettre's TLS parameters for the guard's certificate: the test CA is the only root (no system
/// or bundled store), so a verification that passes proves the guard presented its own chain.
fn lettre_tls(pki: &Pki) -> TlsParameters {
    let pem = std::fs::read(pki.ca()).expect("read the test CA");
    TlsParameters::builder("127.0.0.1".to_string())
        .certificate_store(CertificateStore::None)
        .add_root_certificate(Certificate::from_pem(&pem).expect("the test CA parses"))
        .build()
        .expect("lettre TLS parameters")
}

#[test]
fn starttls_to_postfix() {
    starttls_cell(&Mta::postfix());
}

#[test]
fn starttls_to_aiosmtpd() {
    starttls_cell(&Mta::aiosmtpd());
}
