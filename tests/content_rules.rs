//! Content rules (issue 7) through the real binary, with real MIME messages from real writers:
//! Python's `email` package (the committed fixtures of `tests/fixtures/mime/`, and messages
//! built on the spot by the inline script below) sent by Python's `smtplib`, and messages
//! built and sent by lettre; raw clients only where the bytes on the wire are the point (a
//! boundary line cut across packets, BDAT chunks, the `drop` action).
//!
//! For every rule: a message that breaks it gets the rule's `554 5.7.1 Message refused: ...`
//! after its end of data and the recording upstream completes no message (its transaction is
//! cut before the terminator); a message at the limit passes byte for byte. The `log` and
//! `drop` actions are checked on two rules each.

mod common;
mod smtplib_client;

use common::*;
use lettre::message::header::{ContentTransferEncoding, ContentType};
use lettre::message::{Attachment, Body, Mailbox, MultiPart, SinglePart};
use lettre::{Message, SmtpTransport, Transport};
use serde_json::{json, Value};
use smtplib_client::Sent;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

const FROM: &str = "sender@example.test";
const TO: &str = "rcpt@example.test";

const HEADER_SIZE: &str = "554 5.7.1 Message refused: header too large";
const HEADER_LINE: &str = "554 5.7.1 Message refused: header line too long";
const DENY_HEADER: &str = "554 5.7.1 Message refused: header not allowed";
const EXTENSION: &str = "554 5.7.1 Message refused: attachment type not allowed";
const NAME_LENGTH: &str = "554 5.7.1 Message refused: attachment name too long";
const ENCODING: &str = "554 5.7.1 Message refused: transfer encoding not allowed";
const BODY_LINE: &str = "554 5.7.1 Message refused: body line too long";
const POLICY_DROP: &str = "421 4.7.0 Policy violation, closing connection\r\n";

// ---------------------------------------------------------------------------------------------
// Python's smtplib (and email, to build messages)
// ---------------------------------------------------------------------------------------------

/// argv: port, sender, recipients (comma-separated), spec (JSON), dump path. The spec is
/// `{"file": path}` or a message for `email` to build. The bytes sent are written to the dump
/// path; one JSON object on stdout says what smtplib saw.
const SMTPLIB: &str = r#"
import json, smtplib, sys
from email import policy
from email.message import EmailMessage

port, sender, rcpts, spec, dump = sys.argv[1:6]
spec = json.loads(spec)
if "file" in spec:
    with open(spec["file"], "rb") as f:
        data = f.read()
else:
    msg = EmailMessage(policy=policy.SMTP.clone(max_line_length=spec.get("build_width", 78)))
    msg["From"] = "Alice <alice@example.org>"
    msg["To"] = "bob@example.net"
    msg["Subject"] = spec.get("subject", "content rules")
    msg["Message-ID"] = "<content-rules@example.org>"
    for name, value in spec.get("headers", []):
        msg[name] = value
    msg.set_content(spec.get("text", "Hello,\n.\nBye\n"), cte=spec.get("cte"))
    for name in spec.get("attachments", []):
        msg.add_attachment(bytes(range(256)), maintype="application",
                           subtype="octet-stream", filename=name)
    if spec.get("attachments"):
        msg.set_boundary("rules-b")
    data = msg.as_bytes(policy=policy.SMTP.clone(max_line_length=spec.get("write_width", 78)))
with open(dump, "wb") as f:
    f.write(data)

"#;

/// A spec, short enough for an assertion message.
fn label(spec: &Value) -> String {
    let s = spec.to_string();
    match s.char_indices().nth(160) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s,
    }
}

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/mime")
        .join(name)
}

fn file(name: &str) -> Value {
    json!({ "file": fixture(name).display().to_string() })
}

/// Sends one message with smtplib.
#[track_caller]
fn smtplib(addr: SocketAddr, spec: Value) -> Sent {
    smtplib_client::send(SMTPLIB, addr, FROM, TO, &spec, &label(&spec))
}

/// What the upstream must record for bytes smtplib sent: dot-stuffed, and a CRLF before `.`
/// if the message did not end with one.
fn smtplib_wire(data: &[u8]) -> Vec<u8> {
    let mut b = dot_stuff(data);
    if !b.ends_with(b"\r\n") {
        b.extend_from_slice(b"\r\n");
    }
    b
}

// ---------------------------------------------------------------------------------------------
// lettre
// ---------------------------------------------------------------------------------------------

fn mailbox(s: &str) -> Mailbox {
    s.parse().unwrap()
}

fn lettre_send(addr: SocketAddr, msg: &Message) -> Result<(), lettre::transport::smtp::Error> {
    SmtpTransport::builder_dangerous("127.0.0.1")
        .port(addr.port())
        .timeout(Some(Duration::from_secs(20)))
        .build()
        .send(msg)
        .map(|_| ())
}

/// lettre dot-stuffs the formatted message and then writes `\r\n.\r\n`.
fn lettre_wire(msg: &Message) -> Vec<u8> {
    let mut b = dot_stuff(&msg.formatted());
    b.extend_from_slice(b"\r\n");
    b
}

/// A lettre refusal must carry exactly `reply` (code and text).
#[track_caller]
fn assert_lettre_refused(res: Result<(), lettre::transport::smtp::Error>, reply: &str) {
    let e = match res {
        Ok(()) => panic!("lettre's message passed; expected `{reply}`"),
        Err(e) => e,
    };
    let code = e.status().map(|c| c.to_string()).unwrap_or_default();
    assert_eq!(code, reply[..3], "lettre error: {e}");
    assert!(
        e.to_string().contains(&reply[4..]),
        "lettre error {e} lacks `{}`",
        &reply[4..]
    );
}

fn builder(subject: &str) -> lettre::message::MessageBuilder {
    Message::builder()
        .from(mailbox(FROM))
        .to(mailbox(TO))
        .subject(subject)
        .date(SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_000_000))
}

/// A lettre message with a text part and one attachment named `name`.
fn lettre_attachment(name: &str) -> Message {
    builder("attachment")
        .multipart(
            MultiPart::mixed()
                .singlepart(SinglePart::plain(String::from(
                    "See the attached file.\r\n",
                )))
                .singlepart(Attachment::new(name.to_string()).body(
                    pseudo_random(3000, 7),
                    ContentType::parse("application/octet-stream").unwrap(),
                )),
        )
        .unwrap()
}

// ---------------------------------------------------------------------------------------------
// Checks on the upstream
// ---------------------------------------------------------------------------------------------

/// Messages completed and transactions cut before their end, so far.
#[derive(Clone, Copy, Debug)]
struct Tally {
    messages: usize,
    cut: usize,
}

fn tally(up: &Upstream) -> Tally {
    Tally {
        messages: up.messages().len(),
        cut: up
            .conns()
            .iter()
            .filter(|c| c.unfinished_data.is_some())
            .count(),
    }
}

/// After a refused DATA message: the upstream saw its transaction cut before the terminator
/// (bounded wait) and completed no message.
#[track_caller]
fn assert_not_delivered(up: &Upstream, before: Tally, what: &str) {
    assert!(
        up.wait_until(
            |conns, _| conns.iter().filter(|c| c.unfinished_data.is_some()).count() > before.cut
        ),
        "{what}: the upstream transaction was not cut"
    );
    let m = up.messages();
    assert_eq!(
        m.len(),
        before.messages,
        "{what}: the upstream completed a refused message: {}",
        m.last().map(|x| show(&x.body)).unwrap_or_default()
    );
}

/// The message number `n` (1-based) the upstream completed must be exactly `want`.
#[track_caller]
fn assert_relayed(up: &Upstream, n: usize, want: &[u8], what: &str) {
    let m = up.wait_messages(n);
    assert_eq!(m.len(), n, "{what}: expected message {n} at the upstream");
    let got = &m[n - 1].body;
    assert!(
        got == want,
        "{what}: body differs: got {} bytes, want {}, first difference at {:?}\ngot  {}\nwant {}",
        got.len(),
        want.len(),
        got.iter().zip(want).position(|(a, b)| a != b),
        show(got),
        show(want)
    );
}

/// smtplib's message is refused with `reply` and not delivered.
#[track_caller]
fn smtplib_refused(up: &Upstream, g: &Guard, spec: Value, reply: &str) -> Sent {
    let before = tally(up);
    let what = label(&spec);
    let s = smtplib(g.addr, spec);
    assert_eq!(
        (s.status.as_str(), s.reply()),
        ("data", reply.to_string()),
        "{what}"
    );
    assert_not_delivered(up, before, &what);
    s
}

/// smtplib's message passes and the upstream gets it byte for byte.
#[track_caller]
fn smtplib_passes(up: &Upstream, g: &Guard, spec: Value) -> Sent {
    let n = up.messages().len() + 1;
    let what = label(&spec);
    let s = smtplib(g.addr, spec);
    assert_eq!(s.status, "ok", "{what}: {s:?}");
    assert_relayed(up, n, &smtplib_wire(&s.data), &what);
    s
}

/// The top-level header block: its size (ending empty line included) and its longest line.
fn header_metrics(msg: &[u8]) -> (usize, usize) {
    let end = find(msg, b"\r\n\r\n").expect("a header block") + 4;
    let longest = msg[..end - 4]
        .split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l).len())
        .max()
        .unwrap_or(0);
    (end, longest)
}

/// The longest line after the header block (without its line ending).
fn longest_body_line(msg: &[u8]) -> usize {
    let start = find(msg, b"\r\n\r\n").expect("a header block") + 4;
    msg[start..]
        .split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l).len())
        .max()
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// One rule at a time
// ---------------------------------------------------------------------------------------------

#[test]
fn max_header_size_refuses_one_byte_over_and_passes_the_limit() {
    let at_limit = builder("header size exactly at the limit")
        .header(ContentType::TEXT_PLAIN)
        .body(String::from("Hello.\r\n"))
        .unwrap();
    let over = builder("header size exactly at the limit!")
        .header(ContentType::TEXT_PLAIN)
        .body(String::from("Hello.\r\n"))
        .unwrap();
    let (limit, _) = header_metrics(&at_limit.formatted());
    assert_eq!(header_metrics(&over.formatted()).0, limit + 1);
    let up = Upstream::start();
    let g = Guard::start(up.addr, Some(&format!("max_header_size = {limit}\n")));

    lettre_send(g.addr, &at_limit).expect("a header block of exactly the limit passes");
    assert_relayed(&up, 1, &lettre_wire(&at_limit), "lettre at the limit");

    let before = tally(&up);
    assert_lettre_refused(lettre_send(g.addr, &over), HEADER_SIZE);
    assert_not_delivered(&up, before, "lettre one byte over");

    smtplib_refused(&up, &g, file("long_header.eml"), HEADER_SIZE);
}

#[test]
fn max_header_line_length_counts_physical_lines() {
    let up = Upstream::start();
    let g = Guard::start(up.addr, Some("max_header_line_length = 1000\n"));
    // Python writes the header unfolded (max_line_length=None): one 1000-byte line.
    let flat = |len: usize| {
        json!({
            "headers": [["X-Long", "x".repeat(len - "X-Long: ".len())]],
            "write_width": null,
        })
    };
    let s = smtplib_passes(&up, &g, flat(1000));
    assert_eq!(header_metrics(&s.data).1, 1000);
    let s = smtplib_refused(&up, &g, flat(1001), HEADER_LINE);
    assert_eq!(header_metrics(&s.data).1, 1001);
    smtplib_refused(&up, &g, file("long_header.eml"), HEADER_LINE);
    // A 3000-byte Subject that the writer folds: every physical line is short, so it passes.
    let words = "folded ".repeat(430);
    let s = smtplib_passes(&up, &g, json!({ "subject": words.trim_end() }));
    assert!(s.data.len() > 3000 && header_metrics(&s.data).1 <= 78);
    // Real fixtures with folded Content-Type fields pass untouched.
    smtplib_passes(&up, &g, file("folded_ct.eml"));
    smtplib_passes(&up, &g, file("folded_ct_2231.eml"));
}

#[test]
fn deny_headers_matches_whole_top_level_field_names_in_any_case() {
    let up = Upstream::start();
    let g = Guard::start(
        up.addr,
        Some("deny_headers = [\"X-Link2State\", \"X-Evil-Mailer\"]\n"),
    );
    smtplib_refused(&up, &g, file("denied_header.eml"), DENY_HEADER);
    smtplib_refused(
        &up,
        &g,
        json!({ "headers": [["x-evil-mailer", "1.0"]] }),
        DENY_HEADER,
    );
    // Near misses: a longer field name, and the name in the body, not in the header block.
    smtplib_passes(
        &up,
        &g,
        json!({ "headers": [["X-Link2State-Info", "route"]] }),
    );
    smtplib_passes(
        &up,
        &g,
        json!({ "text": "Quoted header:\nX-Link2State: route\n" }),
    );
}

#[test]
fn deny_filename_extensions_decodes_every_writers_file_names() {
    let up = Upstream::start();
    let g = Guard::start(
        up.addr,
        Some("deny_filename_extensions = [\"exe\", \"js\", \"vbs\", \".scr\"]\n"),
    );
    // Python's writers: nested multiparts, RFC 2231 (continued), encoded-words (B and Q),
    // folded Content-Type, a forwarded message's own attachment.
    for name in [
        "nested_exe.eml",
        "rfc2231.eml",
        "rfc2231_continued.eml",
        "encoded_word_b.eml",
        "encoded_word_q.eml",
        "folded_ct.eml",
        "folded_ct_2231.eml",
        "forwarded.eml",
    ] {
        smtplib_refused(&up, &g, file(name), EXTENSION);
    }
    smtplib_refused(
        &up,
        &g,
        json!({ "attachments": ["report.pdf", "Setup.EXE"] }),
        EXTENSION,
    );
    // Near misses pass byte for byte.
    smtplib_passes(&up, &g, file("nested.eml"));
    smtplib_passes(&up, &g, file("binary_cte.eml"));
    smtplib_passes(
        &up,
        &g,
        json!({ "attachments": ["setup.exe.txt", "js.pdf", "notes.exes"] }),
    );
    // lettre's writer (RFC 2231 for the non-ASCII name).
    for name in ["invoice.exe", "naïve résumé.Vbs"] {
        let before = tally(&up);
        assert_lettre_refused(lettre_send(g.addr, &lettre_attachment(name)), EXTENSION);
        assert_not_delivered(&up, before, name);
    }
    let n = up.messages().len() + 1;
    let ok = lettre_attachment("invoice.exe.pdf");
    lettre_send(g.addr, &ok).expect("invoice.exe.pdf passes");
    assert_relayed(&up, n, &lettre_wire(&ok), "lettre invoice.exe.pdf");
}

#[test]
fn max_filename_length_counts_decoded_characters() {
    // rfc2231_continued.eml's name is 62 characters (65 bytes in UTF-8).
    let up = Upstream::start();
    let g = Guard::start(up.addr, Some("max_filename_length = 61\n"));
    smtplib_refused(&up, &g, file("rfc2231_continued.eml"), NAME_LENGTH);
    // 61 characters, 10 of them two bytes long: passes only if characters are counted.
    let at_limit = format!("{}{}.pdf", "é".repeat(10), "n".repeat(47));
    assert_eq!(at_limit.chars().count(), 61);
    let ok = lettre_attachment(&at_limit);
    lettre_send(g.addr, &ok).expect("a 61-character name passes");
    assert_relayed(&up, 1, &lettre_wire(&ok), "lettre 61 characters");
    let s = smtplib_passes(&up, &g, json!({ "attachments": [at_limit] }));
    assert!(contains(&s.data, b"filename*"), "python used RFC 2231");
    let over = format!("{}{}.pdf", "é".repeat(10), "n".repeat(48));
    let before = tally(&up);
    assert_lettre_refused(lettre_send(g.addr, &lettre_attachment(&over)), NAME_LENGTH);
    assert_not_delivered(&up, before, "lettre 62 characters");
    smtplib_refused(&up, &g, json!({ "attachments": [over] }), NAME_LENGTH);
}

#[test]
fn deny_encodings_checks_every_part() {
    let up = Upstream::start();
    let g = Guard::start(
        up.addr,
        Some("deny_encodings = [\"binary\", \"Quoted-Printable\"]\n"),
    );
    smtplib_refused(&up, &g, file("binary_cte.eml"), ENCODING);
    let qp = builder("quoted-printable part")
        .multipart(
            MultiPart::mixed()
                .singlepart(SinglePart::plain(String::from("Plain part.\r\n")))
                .singlepart(
                    SinglePart::builder().header(ContentType::TEXT_PLAIN).body(
                        Body::new_with_encoding(
                            String::from("Gr\u{fc}\u{df}e = caf\u{e9}\r\n"),
                            ContentTransferEncoding::QuotedPrintable,
                        )
                        .unwrap(),
                    ),
                ),
        )
        .unwrap();
    let before = tally(&up);
    assert_lettre_refused(lettre_send(g.addr, &qp), ENCODING);
    assert_not_delivered(&up, before, "lettre quoted-printable part");
    // 7bit, 8bit and base64 parts pass.
    smtplib_passes(&up, &g, file("rfc2231.eml"));
    let eight = builder("8bit")
        .header(ContentType::TEXT_PLAIN)
        .body(
            Body::new_with_encoding(
                String::from("Gr\u{fc}\u{df}e aus K\u{f6}ln\r\n"),
                ContentTransferEncoding::EightBit,
            )
            .unwrap(),
        )
        .unwrap();
    lettre_send(g.addr, &eight).expect("8bit passes");
    assert_relayed(&up, 2, &lettre_wire(&eight), "lettre 8bit");
}

#[test]
fn max_body_line_length_does_not_count_dot_stuffing() {
    let up = Upstream::start();
    let g = Guard::start(up.addr, Some("max_body_line_length = 998\n"));
    // The long line starts with a dot: 999 bytes on the wire, 998 in the message.
    let line = |len: usize| {
        json!({
            "text": format!("Hello,\n.{}\nBye\n", "y".repeat(len - 1)),
            "cte": "7bit",
            "build_width": 100000,
            "write_width": 100000,
        })
    };
    let s = smtplib_passes(&up, &g, line(998));
    assert_eq!(longest_body_line(&s.data), 998);
    let s = smtplib_refused(&up, &g, line(999), BODY_LINE);
    assert_eq!(longest_body_line(&s.data), 999);
    // The 1200-byte line of long_header.eml is a header line, not a body line.
    smtplib_passes(&up, &g, file("long_header.eml"));
}

// ---------------------------------------------------------------------------------------------
// Actions
// ---------------------------------------------------------------------------------------------

#[test]
fn log_action_passes_the_message_and_counts_it() {
    let up = Upstream::start();
    // Header and body line lengths are `log` by default (998).
    let g = Guard::start(
        up.addr,
        Some(concat!(
            "deny_filename_extensions = { value = [\"exe\"], action = \"log\" }\n",
            "deny_headers = { value = [\"X-Link2State\"], action = \"log\" }\n",
        )),
    );
    smtplib_passes(&up, &g, file("nested_exe.eml"));
    smtplib_passes(&up, &g, file("denied_header.eml"));
    smtplib_passes(&up, &g, file("long_header.eml"));
    smtplib_passes(
        &up,
        &g,
        json!({
            "text": format!("{}\n", "z".repeat(2000)),
            "cte": "7bit",
            "build_width": 100000,
            "write_width": 100000,
        }),
    );
    let msg = lettre_attachment("invoice.exe");
    lettre_send(g.addr, &msg).expect("logged only");
    assert_relayed(&up, 5, &lettre_wire(&msg), "lettre invoice.exe");
    // Counted and logged: the session lines name the rules.
    let logged = wait_for(WAIT, || {
        let e = g.stderr();
        [
            "filename_extension=1",
            "deny_header=1",
            "header_line_length=1",
        ]
        .iter()
        .all(|w| e.contains(w))
    });
    assert!(logged, "decisions not logged: {}", g.stderr());
}

/// Sends a message by DATA on a raw client, tolerating the guard closing mid-way; returns
/// what the guard answered after the DATA's 354.
fn raw_data(g: &Guard, body: &[u8]) -> Client {
    let mut c = g.client();
    c.ehlo();
    c.start_data(FROM, TO);
    let _ = c.try_send(&dot_stuff(body));
    let _ = c.try_send(b".\r\n");
    c
}

#[test]
fn drop_action_closes_the_connection() {
    let up = Upstream::start();
    let g = Guard::start(
        up.addr,
        Some(concat!(
            "deny_filename_extensions = { value = [\"exe\"], action = \"drop\" }\n",
            "deny_headers = { value = [\"X-Link2State\"], action = \"drop\" }\n",
        )),
    );
    for name in ["nested_exe.eml", "denied_header.eml"] {
        let before = tally(&up);
        let mut c = raw_data(&g, &std::fs::read(fixture(name)).unwrap());
        c.read_reply().expect_raw(POLICY_DROP);
        c.expect_closed();
        assert_not_delivered(&up, before, name);
    }
    // A clean message still passes.
    let clean = std::fs::read(fixture("nested.eml")).unwrap();
    let mut c = raw_data(&g, &clean);
    c.read_reply().expect(250, "2.0.0");
    assert_relayed(&up, 1, &dot_stuff(&clean), "nested.eml");
}

// ---------------------------------------------------------------------------------------------
// The wire: packets and chunks
// ---------------------------------------------------------------------------------------------

/// Cut points: the middle of every `--` line, between the CR and LF of the last boundary line,
/// and inside `needle`.
fn cuts(wire: &[u8], needle: &[u8]) -> Vec<usize> {
    let mut points = Vec::new();
    let mut start = 0;
    let mut last_dash_end = 0;
    for line in wire.split_inclusive(|&b| b == b'\n') {
        if line.starts_with(b"--") && line.len() > 4 {
            points.push(start + line.len() / 2);
            last_dash_end = start + line.len() - 1;
        }
        start += line.len();
    }
    points.push(last_dash_end);
    if let Some(i) = find(wire, needle) {
        points.push(i + needle.len() / 2);
    }
    points
}

#[test]
fn a_boundary_split_across_packets_is_followed() {
    let up = Upstream::start();
    let g = Guard::start(up.addr, Some("deny_filename_extensions = [\"exe\"]\n"));
    let mut c = g.client();
    c.ehlo();
    let exe = dot_stuff(&std::fs::read(fixture("nested_exe.eml")).unwrap());
    let before = tally(&up);
    c.start_data(FROM, TO);
    let points = cuts(&exe, b"setup.exe");
    assert!(points.len() > 15, "{points:?}");
    c.send_split(&exe, &points, Duration::from_millis(10));
    // Nothing is answered before the end of data.
    c.set_timeout(Duration::from_millis(300));
    match c.try_read_reply() {
        Err(ReadError::Timeout(b)) if b.is_empty() => {}
        other => panic!("the guard answered before the end of data: {other:?}"),
    }
    c.set_timeout(WAIT);
    c.send(b".\r\n");
    c.read_reply().expect_raw(&format!("{EXTENSION}\r\n"));
    assert_not_delivered(&up, before, "nested_exe.eml in pieces");
    // The session goes on: the clean variant, cut the same way, passes byte for byte.
    let clean = dot_stuff(&std::fs::read(fixture("nested.eml")).unwrap());
    c.start_data(FROM, TO);
    c.send_split(
        &clean,
        &cuts(&clean, b"notes.txt"),
        Duration::from_millis(10),
    );
    c.send(b".\r\n");
    c.read_reply().expect(250, "2.0.0");
    assert_relayed(&up, 1, &clean, "nested.eml in pieces");
    c.cmd("QUIT").expect_code(221);
}

#[test]
fn bdat_messages_are_inspected_too() {
    let up = Upstream::start();
    let g = Guard::start(up.addr, Some("deny_filename_extensions = [\"exe\"]\n"));
    let mut c = g.client();
    let ehlo = c.ehlo();
    assert!(ehlo.text().contains("CHUNKING"), "{ehlo}");

    // One chunk, LAST.
    let msg = std::fs::read(fixture("rfc2231.eml")).unwrap();
    c.cmd(&format!("MAIL FROM:<{FROM}>")).expect_code(250);
    c.cmd(&format!("RCPT TO:<{TO}>")).expect_code(250);
    let mut b = format!("BDAT {} LAST\r\n", msg.len()).into_bytes();
    b.extend_from_slice(&msg);
    c.send(&b);
    c.read_reply().expect_raw(&format!("{EXTENSION}\r\n"));

    // Two chunks, cut in the middle of the file name: the first one is relayed (250 from the
    // upstream), the second gets the refusal.
    let msg = std::fs::read(fixture("nested_exe.eml")).unwrap();
    let cut = find(&msg, b"setup.exe").unwrap() + 4;
    c.cmd(&format!("MAIL FROM:<{FROM}>")).expect_code(250);
    c.cmd(&format!("RCPT TO:<{TO}>")).expect_code(250);
    let mut b = format!("BDAT {}\r\n", cut).into_bytes();
    b.extend_from_slice(&msg[..cut]);
    c.send(&b);
    c.read_reply().expect(250, "2.0.0");
    let mut b = format!("BDAT {} LAST\r\n", msg.len() - cut).into_bytes();
    b.extend_from_slice(&msg[cut..]);
    c.send(&b);
    c.read_reply().expect_raw(&format!("{EXTENSION}\r\n"));
    // Both refused transactions were cut: their upstream connections are gone, no message.
    assert!(
        up.wait_until(|conns, _| conns.iter().filter(|c| c.closed).count() >= 2),
        "the refused BDAT transactions were not cut"
    );
    assert!(
        up.messages().is_empty(),
        "a refused BDAT message was completed"
    );

    // The session goes on and a clean BDAT message arrives intact.
    let clean = std::fs::read(fixture("nested.eml")).unwrap();
    c.cmd(&format!("MAIL FROM:<{FROM}>")).expect_code(250);
    c.cmd(&format!("RCPT TO:<{TO}>")).expect_code(250);
    let mut b = format!("BDAT {} LAST\r\n", clean.len()).into_bytes();
    b.extend_from_slice(&clean);
    c.send(&b);
    c.read_reply().expect(250, "2.0.0");
    let m = up.wait_messages(1);
    assert_eq!(m.len(), 1, "exactly the clean message");
    assert_eq!(m[0].via, Via::Bdat);
    assert!(
        m[0].body == clean,
        "BDAT body differs: {}",
        show(&m[0].body)
    );
    c.cmd("QUIT").expect_code(221);
}
