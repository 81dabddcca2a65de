//! A real SMTP client (lettre, no TLS) through the guard: the upstream must receive exactly
//! the bytes lettre formatted (dot-stuffed, plus the CRLF lettre puts before `.`).

mod common;

use common::*;
use lettre::message::header::{ContentTransferEncoding, ContentType};
use lettre::message::{Attachment, Body, Mailbox, MultiPart, SinglePart};
use lettre::{Message, SmtpTransport, Transport};
use std::time::Duration;

fn transport(g: &Guard) -> SmtpTransport {
    SmtpTransport::builder_dangerous("127.0.0.1")
        .port(g.addr.port())
        .timeout(Some(Duration::from_secs(30)))
        .build()
}

/// What the upstream must record for a message lettre sends: lettre dot-stuffs the formatted
/// message and then writes `\r\n.\r\n`.
fn expected_wire_body(msg: &Message) -> Vec<u8> {
    let mut b = dot_stuff(&msg.formatted());
    b.extend_from_slice(b"\r\n");
    b
}

fn mailbox(s: &str) -> Mailbox {
    s.parse().unwrap()
}

#[track_caller]
fn send_and_check(policy: Option<&str>, msg: Message) -> Message {
    let up = Upstream::start();
    let g = Guard::start(up.addr, policy);
    let resp = transport(&g)
        .send(&msg)
        .unwrap_or_else(|e| panic!("lettre could not send through the guard: {e}"));
    assert!(resp.is_positive(), "{resp:?}");
    let m = up.wait_messages(1);
    assert_eq!(m.len(), 1);
    let want = expected_wire_body(&msg);
    assert!(
        m[0].body == want,
        "body differs: got {} bytes, want {} bytes, first difference at {:?}\ngot  {}\nwant {}",
        m[0].body.len(),
        want.len(),
        m[0].body.iter().zip(&want).position(|(a, b)| a != b),
        show(&m[0].body),
        show(&want)
    );
    assert_eq!(m[0].via, Via::Data);
    assert!(
        contains(&m[0].mail_from, b"<sender@example.test>"),
        "{}",
        show(&m[0].mail_from)
    );
    msg
}

#[test]
fn lettre_plain_message() {
    let msg = Message::builder()
        .from(mailbox("Sender <sender@example.test>"))
        .to(mailbox("Rcpt <rcpt@example.test>"))
        .subject("plain through the guard")
        .header(ContentType::TEXT_PLAIN)
        .body(String::from(
            "Hello,\r\n.a line starting with a dot\r\n..two dots\r\n.\r\nend\r\n",
        ))
        .unwrap();
    send_and_check(None, msg);
}

#[test]
fn lettre_in_rfc821_mode_gets_a_clean_refusal() {
    // In rfc821 mode EHLO is blocked and lettre has no HELO fallback: it must get a clean
    // SMTP error (not a hang, not a delivery).
    let up = Upstream::start();
    let g = Guard::start(up.addr, Some("mode = \"rfc821\"\n"));
    let msg = Message::builder()
        .from(mailbox("sender@example.test"))
        .to(mailbox("rcpt@example.test"))
        .subject("x")
        .body(String::from("x\r\n"))
        .unwrap();
    let res = transport(&g).send(&msg);
    assert!(res.is_err(), "lettre must see the EHLO refusal: {res:?}");
    assert!(up.messages().is_empty());
}

#[test]
fn lettre_8bit_body() {
    let text = "Grüße aus Köln — 日本語のテキスト ✓\r\nΕλληνικά\r\n";
    let msg = Message::builder()
        .from(mailbox("sender@example.test"))
        .to(mailbox("rcpt@example.test"))
        .subject("8-bit: ünïcödé")
        .header(ContentType::TEXT_PLAIN)
        .body(Body::new_with_encoding(text.to_string(), ContentTransferEncoding::EightBit).unwrap())
        .unwrap();
    let up = Upstream::start();
    let g = Guard::start(up.addr, None);
    transport(&g).send(&msg).expect("send 8-bit");
    let m = up.wait_messages(1);
    assert_eq!(m.len(), 1);
    assert_eq!(
        m[0].body,
        expected_wire_body(&msg),
        "got {}",
        show(&m[0].body)
    );
    assert!(
        contains(&m[0].mail_from, b"BODY=8BITMIME"),
        "lettre's BODY=8BITMIME must pass: {}",
        show(&m[0].mail_from)
    );
    assert!(contains(&m[0].body, "日本語".as_bytes()));
}

#[test]
fn lettre_5_mib_body() {
    let mut text = String::with_capacity(5 << 20);
    let mut i = 0u64;
    while text.len() < 5 << 20 {
        text.push_str(&format!(
            "{i:08} the quick brown fox jumps over the lazy dog 0123456789\r\n"
        ));
        if i % 1000 == 0 {
            text.push_str(".dot line\r\n");
        }
        i += 1;
    }
    let msg = Message::builder()
        .from(mailbox("sender@example.test"))
        .to(mailbox("rcpt@example.test"))
        .subject("five mebibytes")
        .header(ContentType::TEXT_PLAIN)
        .body(text)
        .unwrap();
    assert!(msg.formatted().len() > 5 << 20);
    send_and_check(None, msg);
}

#[test]
fn lettre_message_with_an_attachment() {
    let binary = pseudo_random(200_000, 42);
    let msg = Message::builder()
        .from(mailbox("sender@example.test"))
        .to(mailbox("rcpt@example.test"))
        .subject("with attachment")
        .multipart(
            MultiPart::mixed()
                .singlepart(SinglePart::plain(String::from(
                    "See the attached file.\r\n",
                )))
                .singlepart(Attachment::new(String::from("data.bin")).body(
                    binary,
                    ContentType::parse("application/octet-stream").unwrap(),
                )),
        )
        .unwrap();
    send_and_check(None, msg);
}

#[test]
fn lettre_two_recipients_and_a_strict_policy() {
    let policy = "mode = \"modern\"\ncheck_addresses = true\nbare_lf = \"reject\"\nmax_recipients = 5\nmax_message_size = 1000000\nstarttls = \"strip\"\n";
    let msg = Message::builder()
        .from(mailbox("sender@example.test"))
        .to(mailbox("one@example.test"))
        .cc(mailbox("two@example.test"))
        .subject("strict")
        .body(String::from("fine\r\n"))
        .unwrap();
    let up = Upstream::start();
    let g = Guard::start(up.addr, Some(policy));
    transport(&g).send(&msg).expect("send");
    let m = up.wait_messages(1);
    assert_eq!(m[0].rcpts.len(), 2);
    assert_eq!(m[0].body, expected_wire_body(&msg));
}
