//! Self-tests of the test harness (no mailguard involved): the recording upstream and the raw
//! client talk to each other directly, so a failure here is a harness bug, not a guard bug.

mod common;

use common::*;
use std::time::Duration;

#[test]
fn upstream_records_a_data_session_exactly() {
    let up = Upstream::start();
    let mut c = Client::greeted(up.addr);
    c.greeting
        .as_ref()
        .unwrap()
        .expect_raw(&format!("220 {BANNER}\r\n"));
    let r = c.ehlo();
    assert_eq!(r.lines, ehlo_lines_without(&[]));
    let lines: Vec<String> = ehlo_lines_without(&[]);
    r.expect_raw(&ehlo_raw(&lines));
    let body = b"Subject: s\r\n\r\n..dot\r\nline\r\n";
    c.send_message("a@example.test", "b@example.test", body)
        .expect_raw("250 2.0.0 Ok: queued as 1\r\n");
    c.send_message("a@example.test", "b@example.test", b"")
        .expect_raw("250 2.0.0 Ok: queued as 2\r\n");
    c.cmd("NOOP x").expect_raw("250 2.0.0 Ok x\r\n");
    c.cmd("QUIT").expect_code(221);
    c.expect_closed();
    assert!(up.wait_all_closed());
    let m = up.messages();
    assert_eq!(m.len(), 2);
    assert_eq!(m[0].body, body.to_vec());
    assert_eq!(m[1].body, b"");
    assert_eq!(m[0].mail_from, b"MAIL FROM:<a@example.test>");
    assert_eq!(m[0].rcpts, vec![b"RCPT TO:<b@example.test>".to_vec()]);
    assert_eq!(up.commands()[0], b"EHLO client.test");
}

#[test]
fn upstream_handles_bdat_auth_and_pipelining() {
    let up = Upstream::start();
    let mut c = Client::greeted(up.addr);
    c.ehlo();
    c.send(b"MAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nBDAT 5\r\n\r\n.\r\nBDAT 3 LAST\r\nabcNOOP z\r\n");
    let r = c.read_replies(5);
    assert_eq!(r[2].code, 250);
    r[3].expect(250, "2.0.0");
    r[4].expect_raw("250 2.0.0 Ok z\r\n");
    c.cmd("AUTH LOGIN").expect_raw("334 VXNlcm5hbWU6\r\n");
    c.cmd("dQ==").expect_code(334);
    c.cmd("cA==").expect(235, "2.7.0");
    c.cmd("AUTH PLAIN").expect_raw("334 \r\n");
    c.cmd("AHUAcA==").expect(235, "2.7.0");
    let m = up.wait_messages(1);
    assert_eq!(m[0].body, b"\r\n.\r\nabc");
    assert_eq!(m[0].via, Via::Bdat);
    assert_eq!(
        up.conns()[0].auth_responses,
        vec![b"dQ==".to_vec(), b"cA==".to_vec(), b"AHUAcA==".to_vec()]
    );
}

#[test]
fn upstream_fault_options_work() {
    let up = Upstream::with(UpstreamOptions {
        close_in_data_after: Some(4),
        ..UpstreamOptions::default()
    });
    let mut c = Client::greeted(up.addr);
    c.start_data("a@x", "b@y");
    c.send(b"0123456789\r\n.\r\n");
    assert!(up.wait_all_closed());
    assert!(up.messages().is_empty());
    assert!(up.conns()[0].unfinished_data.is_some());

    let up = Upstream::with(UpstreamOptions {
        close_on_accept: true,
        ..UpstreamOptions::default()
    });
    let mut c = Client::connect(up.addr);
    c.expect_closed();

    let up = Upstream::with(UpstreamOptions {
        hold_end_of_data: true,
        tls_reply: b"TLS".to_vec(),
        ..UpstreamOptions::default()
    });
    let mut c = Client::greeted(up.addr);
    c.start_data("a@x", "b@y");
    c.send(b"x\r\n.\r\n");
    c.set_timeout(Duration::from_millis(300));
    assert!(matches!(c.try_read_reply(), Err(ReadError::Timeout(_))));
    up.release();
    c.set_timeout(WAIT);
    c.read_reply().expect(250, "2.0.0");
    c.cmd("STARTTLS").expect(220, "2.0.0");
    c.send(b"\x16\x03\x01hello");
    assert_eq!(c.read_exact_bytes(3), b"TLS");
    assert!(up.wait_until(|k, _| k[0].after_starttls == b"\x16\x03\x01hello"));
}

#[test]
fn helpers_detect_bare_line_endings_and_stuff_dots() {
    assert!(has_bare_cr_or_lf(b"a\nb"));
    assert!(has_bare_cr_or_lf(b"a\rb"));
    assert!(has_bare_cr_or_lf(b"a\r"));
    assert!(!has_bare_cr_or_lf(b"a\r\nb\r\n"));
    assert_eq!(dot_stuff(b".a\r\nb\r\n..c\r\n"), b"..a\r\nb\r\n...c\r\n");
    let hello = tls_client_hello();
    assert_eq!(hello[0], 0x16);
    assert_eq!(
        u16::from_be_bytes([hello[3], hello[4]]) as usize,
        hello.len() - 5
    );
}
