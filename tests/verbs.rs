//! Verb filtering: modes, `allow`, `blocked_reply`, `extensions`, `starttls`, the banner,
//! the EHLO rewrite, recipients, addresses, line lengths, AUTH, parameters, pipelining and a
//! client sending one byte per packet.

mod common;

use common::*;
use std::thread;
use std::time::Duration;

/// Checks that `blocked` lines are answered `500 5.5.1` without reaching the upstream, and
/// that `allowed` lines reach it byte for byte and get the upstream's own answer.
fn check_verbs(c: &mut Client, up: &Upstream, allowed: &[&str], blocked: &[&str]) {
    for line in blocked {
        let r = c.cmd(line);
        assert!(r.is_blocked_reject(), "{line:?} should be blocked, got {r}");
        assert_eq!(r.raw, b"500 5.5.1 Command unrecognized\r\n", "{line:?}");
    }
    for line in allowed {
        let r = c.cmd(line);
        assert!(
            !r.is_blocked_reject(),
            "{line:?} should pass, the guard blocked it: {r}"
        );
        assert_forwarded(up, line.as_bytes());
    }
    // The sentinel's answer comes from the upstream, after every line above was processed.
    c.cmd("NOOP sentinel")
        .expect_raw("250 2.0.0 Ok sentinel\r\n");
    for line in blocked {
        assert_never_forwarded(up, line.as_bytes());
    }
}

#[test]
fn modern_mode_is_the_default() {
    let up = Upstream::start();
    let g = Guard::start(up.addr, None);
    let mut c = g.client();
    let r = c.ehlo();
    assert_eq!(r.lines, ehlo_lines_without(&["ETRN", "XCLIENT"]));
    check_verbs(
        &mut c,
        &up,
        &[
            "HELP",
            "NOOP",
            "RSET",
            "HELO client.test",
            "EHLO client.test",
        ],
        &[
            "VRFY root",
            "EXPN staff",
            "ETRN example.test",
            "SAML FROM:<a@example.test>",
            "SEND FROM:<a@example.test>",
            "SOML FROM:<a@example.test>",
            "TURN",
            "ATRN example.test",
            "XCLIENT ADDR=192.0.2.1",
            "XFORWARD ADDR=192.0.2.1",
            "WIZ",
            "DEBUG",
            "FOOBAR x",
            "KLINGONS x",
        ],
    );
    let r = c.send_message(
        "a@example.test",
        "b@example.test",
        b"Subject: m\r\n\r\nhi\r\n",
    );
    r.expect(250, "2.0.0");
    c.cmd("AUTH PLAIN AGZvbwBiYXI=").expect(235, "2.7.0");
    c.cmd("QUIT").expect_code(221);
}

#[test]
fn modern_mode_explicitly() {
    let up = Upstream::start();
    let g = Guard::start(up.addr, Some("mode = \"modern\"\n"));
    let mut c = g.client();
    assert_eq!(c.ehlo().lines, ehlo_lines_without(&["ETRN", "XCLIENT"]));
    check_verbs(&mut c, &up, &["HELP"], &["VRFY root", "ETRN x"]);
}

#[test]
fn rfc821_mode_passes_only_the_seven_verbs() {
    let up = Upstream::start();
    let g = Guard::start(up.addr, Some("mode = \"rfc821\"\n"));
    let mut c = g.client();
    let r = c.cmd("EHLO client.test");
    r.expect(500, "5.5.1");
    c.helo();
    check_verbs(
        &mut c,
        &up,
        &["NOOP", "RSET", "HELO client.test"],
        &[
            "EHLO client.test",
            "AUTH PLAIN AGZvbwBiYXI=",
            "HELP",
            "VRFY root",
            "ETRN example.test",
            "STARTTLS",
            "SAML FROM:<a@example.test>",
            "XCLIENT ADDR=192.0.2.1",
        ],
    );
    let r = c.send_message(
        "a@example.test",
        "b@example.test",
        b"Subject: m\r\n\r\nhi\r\n",
    );
    r.expect(250, "2.0.0");
    assert_eq!(up.wait_messages(1).len(), 1);
    c.cmd("QUIT").expect_code(221);
    c.expect_closed();
}

#[test]
fn esmtp_mode_adds_the_eight_esmtp_verbs() {
    let up = Upstream::start();
    let g = Guard::start(up.addr, Some("mode = \"esmtp\"\n"));
    let mut c = g.client();
    let r = c.ehlo();
    assert_eq!(
        r.lines,
        ehlo_lines_without(&["CHUNKING", "BINARYMIME", "STARTTLS", "XCLIENT"])
    );
    check_verbs(
        &mut c,
        &up,
        &[
            "VRFY root",
            "ETRN example.test",
            "HELP",
            "SAML FROM:<a@example.test>",
            "SEND FROM:<a@example.test>",
            "SOML FROM:<a@example.test>",
            "RSET",
            "NOOP",
        ],
        &["STARTTLS", "EXPN staff", "TURN", "XCLIENT ADDR=192.0.2.1"],
    );
    c.cmd("AUTH PLAIN AGZvbwBiYXI=").expect(235, "2.7.0");
    let r = c.send_message(
        "a@example.test",
        "b@example.test",
        b"Subject: m\r\n\r\nhi\r\n",
    );
    r.expect(250, "2.0.0");
    c.cmd("QUIT").expect_code(221);
}

#[test]
fn allow_replaces_the_mode_list() {
    let up = Upstream::start();
    let policy = "mode = \"esmtp\"\nallow = [\"ehlo\", \"Mail\", \"RCPT\", \"DATA\", \"QUIT\", \"NOOP\", \"ETRN\"]\n";
    let g = Guard::start(up.addr, Some(policy));
    let mut c = g.client();
    let r = c.ehlo();
    // No AUTH, no STARTTLS, no BDAT (so no CHUNKING/BINARYMIME), no XCLIENT.
    assert_eq!(
        r.lines,
        ehlo_lines_without(&["CHUNKING", "BINARYMIME", "STARTTLS", "AUTH", "XCLIENT"])
    );
    check_verbs(
        &mut c,
        &up,
        &["ETRN example.test", "NOOP"],
        &[
            "HELO client.test",
            "VRFY root",
            "HELP",
            "RSET",
            "AUTH PLAIN AGZvbwBiYXI=",
            "SAML FROM:<a@example.test>",
        ],
    );
    let r = c.send_message(
        "a@example.test",
        "b@example.test",
        b"Subject: m\r\n\r\nhi\r\n",
    );
    r.expect(250, "2.0.0");
}

#[test]
fn verbs_are_case_insensitive_and_forwarded_byte_exact() {
    let up = Upstream::start();
    let g = Guard::start(up.addr, None);
    let mut c = g.client();
    c.cmd("ehlo client.test").expect_code(250);
    c.cmd("mail FROM:<A@Example.TEST>").expect_code(250);
    c.cmd("Rcpt To:<b@example.test>").expect_code(250);
    c.cmd("noop Mixed Case")
        .expect_raw("250 2.0.0 Ok Mixed Case\r\n");
    c.cmd("vrfy root").expect(500, "5.5.1");
    c.cmd("NOOP end").expect_code(250);
    let cmds = up.commands();
    assert_eq!(
        cmds,
        vec![
            b"ehlo client.test".to_vec(),
            b"mail FROM:<A@Example.TEST>".to_vec(),
            b"Rcpt To:<b@example.test>".to_vec(),
            b"noop Mixed Case".to_vec(),
            b"NOOP end".to_vec(),
        ],
        "upstream saw {}",
        show_lines(&cmds)
    );
}

#[test]
fn blocked_reply_ok_answers_250_ok_and_still_blocks() {
    let up = Upstream::start();
    let g = Guard::start(up.addr, Some("blocked_reply = \"ok\"\n"));
    let mut c = g.client();
    c.ehlo();
    for line in ["VRFY root", "ETRN example.test", "EXPN staff", "FOOBAR"] {
        c.cmd(line).expect_raw("250 OK\r\n");
    }
    c.cmd("NOOP after").expect_raw("250 2.0.0 Ok after\r\n");
    for line in ["VRFY", "ETRN", "EXPN", "FOOBAR"] {
        assert_never_forwarded(&up, line.as_bytes());
    }
}

#[test]
fn blocked_reply_reject_explicitly() {
    let up = Upstream::start();
    let g = Guard::start(up.addr, Some("blocked_reply = \"reject\"\n"));
    let mut c = g.client();
    c.ehlo();
    c.cmd("VRFY root")
        .expect_raw("500 5.5.1 Command unrecognized\r\n");
    c.cmd("NOOP after").expect_code(250);
    assert_never_forwarded(&up, b"VRFY");
}

#[test]
fn banner_is_relayed_verbatim_by_default() {
    let up = Upstream::with(UpstreamOptions {
        banner: vec!["custom.banner.test Sendmail 8.12.1 ready".into()],
        ..UpstreamOptions::default()
    });
    let g = Guard::start(up.addr, None);
    let c = g.client();
    c.greeting
        .as_ref()
        .unwrap()
        .expect_raw("220 custom.banner.test Sendmail 8.12.1 ready\r\n");
}

#[test]
fn mask_banner_replaces_each_character_by_a_star() {
    let up = Upstream::start();
    let g = Guard::start(up.addr, Some("mask_banner = true\n"));
    let mut c = g.client();
    let want = format!("220 {}\r\n", "*".repeat(BANNER.len()));
    c.greeting.as_ref().unwrap().expect_raw(&want);
    c.ehlo();
    c.cmd("QUIT").expect_code(221);
}

#[test]
fn mask_banner_keeps_the_line_structure_of_a_multiline_banner() {
    let up = Upstream::with(UpstreamOptions {
        banner: vec![
            "mx.upstream.test ESMTP Postfix (Debian)".into(),
            "second line".into(),
            "x".into(),
        ],
        ..UpstreamOptions::default()
    });
    let g = Guard::start(up.addr, Some("mask_banner = true\n"));
    let c = g.client();
    let want = format!(
        "220-{}\r\n220-{}\r\n220 {}\r\n",
        "*".repeat("mx.upstream.test ESMTP Postfix (Debian)".len()),
        "*".repeat("second line".len()),
        "*"
    );
    c.greeting.as_ref().unwrap().expect_raw(&want);
}

#[test]
fn mask_banner_false_keeps_a_multiline_banner() {
    let up = Upstream::with(UpstreamOptions {
        banner: vec!["a.test one".into(), "two".into()],
        ..UpstreamOptions::default()
    });
    let g = Guard::start(up.addr, Some("mask_banner = false\n"));
    let c = g.client();
    c.greeting
        .as_ref()
        .unwrap()
        .expect_raw("220-a.test one\r\n220 two\r\n");
}

#[test]
fn extensions_keep_only_listed_keywords_and_block_their_verbs() {
    let up = Upstream::start();
    let g = Guard::start(
        up.addr,
        Some("extensions = [\"PIPELINING\", \"size\", \"8BITMIME\"]\n"),
    );
    let mut c = g.client();
    let r = c.ehlo();
    let lines = vec![
        "upstream.test".to_string(),
        "PIPELINING".into(),
        "SIZE 52428800".into(),
        "8BITMIME".into(),
    ];
    assert_eq!(r.lines, lines);
    r.expect_raw(&ehlo_raw(&lines));
    check_verbs(
        &mut c,
        &up,
        &["NOOP"],
        &["STARTTLS", "AUTH PLAIN AGZvbwBiYXI=", "ETRN x", "VRFY root"],
    );
    // BDAT is blocked too (no CHUNKING); its chunk must be skipped, not executed.
    c.cmd("MAIL FROM:<a@example.test>").expect_code(250);
    c.cmd("RCPT TO:<b@example.test>").expect_code(250);
    let chunk = b"RSET\r\nMAIL FROM:<x@evil.test>\r\n";
    let mut w = format!("BDAT {} LAST\r\n", chunk.len()).into_bytes();
    w.extend_from_slice(chunk);
    w.extend_from_slice(b"NOOP after-bdat\r\n");
    c.send(&w);
    c.read_reply().expect(500, "5.5.1");
    c.read_reply().expect_raw("250 2.0.0 Ok after-bdat\r\n");
    assert_never_forwarded(&up, b"BDAT");
    assert_never_forwarded(&up, b"evil.test");
    assert!(
        !up.commands().iter().any(|l| l == b"RSET"),
        "chunk bytes were executed as commands: {}",
        show_lines(&up.commands())
    );
}

#[test]
fn extensions_with_starttls_and_chunking_keep_them() {
    let up = Upstream::start();
    let g = Guard::start(
        up.addr,
        Some("extensions = [\"PIPELINING\", \"CHUNKING\", \"STARTTLS\", \"DSN\"]\n"),
    );
    let mut c = g.client();
    let r = c.ehlo();
    assert_eq!(
        r.lines,
        vec!["upstream.test", "PIPELINING", "DSN", "CHUNKING", "STARTTLS"]
    );
    c.cmd("MAIL FROM:<a@example.test>").expect_code(250);
    c.cmd("RCPT TO:<b@example.test>").expect_code(250);
    c.send(b"BDAT 5 LAST\r\nhello");
    c.read_reply().expect(250, "2.0.0");
    let m = up.wait_messages(1);
    assert_eq!(m.len(), 1);
    assert_eq!(m[0].body, b"hello");
    assert_eq!(m[0].via, Via::Bdat);
    c.cmd("STARTTLS").expect(220, "2.0.0");
}

#[test]
fn ehlo_rewrite_fixes_continuations_when_the_last_line_is_removed() {
    let up = Upstream::with(UpstreamOptions {
        ehlo_keywords: vec!["PIPELINING".into(), "8BITMIME".into(), "VRFY".into()],
        ..UpstreamOptions::default()
    });
    let g = Guard::start(up.addr, None);
    let mut c = g.client();
    let r = c.ehlo();
    r.expect_raw("250-upstream.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n");
}

#[test]
fn ehlo_reply_with_every_keyword_removed_is_one_line() {
    let up = Upstream::with(UpstreamOptions {
        ehlo_keywords: vec!["STARTTLS".into(), "XCLIENT ADDR NAME".into()],
        ..UpstreamOptions::default()
    });
    let g = Guard::start(up.addr, Some("starttls = \"strip\"\n"));
    let mut c = g.client();
    c.ehlo().expect_raw("250 upstream.test\r\n");
}

#[test]
fn starttls_strip_removes_the_keyword_and_blocks_the_verb() {
    let up = Upstream::start();
    let g = Guard::start(up.addr, Some("starttls = \"strip\"\n"));
    let mut c = g.client();
    let r = c.ehlo();
    assert_eq!(
        r.lines,
        ehlo_lines_without(&["STARTTLS", "ETRN", "XCLIENT"])
    );
    c.cmd("STARTTLS").expect(500, "5.5.1");
    c.cmd("NOOP still-plain")
        .expect_raw("250 2.0.0 Ok still-plain\r\n");
    assert_never_forwarded(&up, b"STARTTLS");
    let r = c.send_message(
        "a@example.test",
        "b@example.test",
        b"Subject: m\r\n\r\nhi\r\n",
    );
    r.expect(250, "2.0.0");
}

#[test]
fn starttls_pass_turns_the_session_into_an_opaque_relay() {
    let server_bytes =
        b"\x16\x03\x03\x00\x31FAKE-SERVER-HELLO\r\n250 OK\r\n\x00\xff\x80 500 no\r\n".to_vec();
    let up = Upstream::with(UpstreamOptions {
        tls_reply: server_bytes.clone(),
        ..UpstreamOptions::default()
    });
    let g = Guard::start(up.addr, Some("starttls = \"pass\"\n"));
    let mut c = g.client();
    let r = c.ehlo();
    assert!(r.lines.iter().any(|l| l == "STARTTLS"), "{r}");
    c.cmd("STARTTLS")
        .expect_raw("220 2.0.0 Ready to start TLS\r\n");
    // Looks like TLS and holds things that would be blocked or parsed as SMTP.
    let mut hello = tls_client_hello();
    hello.extend_from_slice(b"VRFY root\r\nQUIT\r\n\x00\xff\r.\r\n");
    c.send(&hello);
    assert_eq!(c.read_exact_bytes(server_bytes.len()), server_bytes);
    let more = b"MAIL FROM:<x@evil.test>\r\nBDAT 3\r\n\r\n.\r\n".to_vec();
    c.send(&more);
    let mut all = hello.clone();
    all.extend_from_slice(&more);
    let done = up.wait_until(|conns, _| conns.iter().any(|k| k.after_starttls.len() >= all.len()));
    let conns = up.conns();
    let k = conns
        .iter()
        .find(|k| k.starttls)
        .expect("STARTTLS reached the upstream");
    assert!(
        done,
        "opaque bytes did not all arrive: {}",
        show(&k.after_starttls)
    );
    assert_eq!(k.after_starttls, all, "opaque bytes were altered");
    assert_eq!(
        k.commands,
        vec![b"EHLO client.test".to_vec(), b"STARTTLS".to_vec()]
    );
}

#[test]
fn starttls_pass_is_the_default() {
    let up = Upstream::with(UpstreamOptions {
        tls_reply: b"\x16\x03\x03\x00\x02hi".to_vec(),
        ..UpstreamOptions::default()
    });
    let g = Guard::start(up.addr, None);
    let mut c = g.client();
    c.ehlo();
    c.cmd("STARTTLS").expect(220, "2.0.0");
    c.send(&tls_client_hello());
    assert_eq!(c.read_exact_bytes(7), b"\x16\x03\x03\x00\x02hi");
}

#[test]
fn max_recipients_refuses_the_extra_ones_without_forwarding() {
    let up = Upstream::start();
    let g = Guard::start(up.addr, Some("max_recipients = 2\n"));
    let mut c = g.client();
    c.ehlo();
    c.cmd("MAIL FROM:<a@example.test>").expect_code(250);
    c.cmd("RCPT TO:<r1@example.test>").expect_code(250);
    c.cmd("RCPT TO:<r2@example.test>").expect_code(250);
    c.cmd("RCPT TO:<r3@example.test>").expect(452, "4.5.3");
    c.cmd("RCPT TO:<r4@example.test>").expect(452, "4.5.3");
    c.cmd("DATA").expect_code(354);
    c.send(b"Subject: r\r\n\r\nbody\r\n.\r\n");
    c.read_reply().expect(250, "2.0.0");
    let m = up.wait_messages(1);
    assert_eq!(
        m[0].rcpts,
        vec![
            b"RCPT TO:<r1@example.test>".to_vec(),
            b"RCPT TO:<r2@example.test>".to_vec()
        ]
    );
    assert_never_forwarded(&up, b"r3@");
    assert_never_forwarded(&up, b"r4@");
    // The count starts again with the next transaction.
    c.cmd("MAIL FROM:<a@example.test>").expect_code(250);
    c.cmd("RCPT TO:<r5@example.test>").expect_code(250);
    c.cmd("RCPT TO:<r6@example.test>").expect_code(250);
    c.cmd("RCPT TO:<r7@example.test>").expect(452, "4.5.3");
    c.cmd("RSET").expect_code(250);
    c.cmd("MAIL FROM:<a@example.test>").expect_code(250);
    c.cmd("RCPT TO:<r8@example.test>").expect_code(250);
    c.cmd("RCPT TO:<r9@example.test>").expect_code(250);
    assert_never_forwarded(&up, b"r7@");
}

#[test]
fn max_recipients_in_a_pipelined_group() {
    let up = Upstream::start();
    let g = Guard::start(up.addr, Some("max_recipients = 1\n"));
    let mut c = g.client();
    c.ehlo();
    c.send(b"MAIL FROM:<a@example.test>\r\nRCPT TO:<r1@example.test>\r\nRCPT TO:<r2@example.test>\r\nDATA\r\n");
    c.read_reply().expect_code(250);
    c.read_reply().expect_code(250);
    c.read_reply().expect(452, "4.5.3");
    c.read_reply().expect_code(354);
    c.send(b"x\r\n.\r\n");
    c.read_reply().expect(250, "2.0.0");
    assert_eq!(up.wait_messages(1)[0].rcpts.len(), 1);
    assert_never_forwarded(&up, b"r2@");
}

#[test]
fn check_addresses_refuses_dangerous_characters() {
    let up = Upstream::start();
    let g = Guard::start(up.addr, Some("check_addresses = true\n"));
    let mut c = g.client();
    c.ehlo();
    c.cmd("MAIL FROM:<a|b@example.test>").expect(553, "5.1.3");
    c.cmd("MAIL FROM:<`id`@example.test>").expect(553, "5.1.3");
    c.cmd_bytes(b"MAIL FROM:<a\x00b@example.test>")
        .expect(553, "5.1.3");
    c.cmd("MAIL FROM:<a@example.test").expect(501, "5.5.4");
    c.cmd("MAIL FROM:a@example.test>").expect(501, "5.5.4");
    c.cmd("MAIL FROM:<<a@example.test>").expect(501, "5.5.4");
    c.cmd("MAIL FROM:<good@example.test>").expect_code(250);
    c.cmd("RCPT TO:<|/bin/sh@example.test>")
        .expect(553, "5.1.3");
    c.cmd("RCPT TO:<x`touch /tmp/p`@example.test>")
        .expect(553, "5.1.3");
    c.cmd("RCPT TO:<b@example.test").expect(501, "5.5.4");
    c.cmd("RCPT TO:<ok@example.test>").expect_code(250);
    c.cmd("NOOP end").expect_code(250);
    let cmds = up.commands();
    for bad in [&b"|"[..], b"`", b"\x00", b"<a@example.test\x00"] {
        assert!(
            !cmds.iter().any(|l| contains(l, bad)),
            "{} reached the upstream: {}",
            show(bad),
            show_lines(&cmds)
        );
    }
    assert_eq!(
        cmds.iter()
            .filter(|l| l.starts_with(b"MAIL") || l.starts_with(b"RCPT"))
            .cloned()
            .collect::<Vec<_>>(),
        vec![
            b"MAIL FROM:<good@example.test>".to_vec(),
            b"RCPT TO:<ok@example.test>".to_vec()
        ]
    );
}

#[test]
fn check_addresses_off_forwards_odd_addresses_untouched() {
    let up = Upstream::start();
    let g = Guard::start(up.addr, None);
    let mut c = g.client();
    c.ehlo();
    c.cmd("MAIL FROM:<a|b@example.test>").expect_code(250);
    c.cmd("RCPT TO:<x`y`@example.test>").expect_code(250);
    assert_forwarded(&up, b"MAIL FROM:<a|b@example.test>");
    assert_forwarded(&up, b"RCPT TO:<x`y`@example.test>");
}

#[test]
fn max_line_length_refuses_longer_lines_and_goes_on() {
    let up = Upstream::start();
    let g = Guard::start(up.addr, Some("max_line_length = 100\n"));
    let mut c = g.client();
    c.ehlo();
    let long = format!("NOOP {}", "L".repeat(200));
    c.cmd(&long).expect_raw("500 5.5.2 Line too long\r\n");
    let fits = format!("NOOP {}", "s".repeat(60));
    c.cmd(&fits).expect_code(250);
    let long_mail = format!("MAIL FROM:<{}@example.test>", "m".repeat(300));
    c.cmd(&long_mail).expect(500, "5.5.2");
    c.cmd("MAIL FROM:<a@example.test>").expect_code(250);
    assert_never_forwarded(&up, b"LLLL");
    assert_never_forwarded(&up, b"mmmm");
    assert_forwarded(&up, fits.as_bytes());
}

#[test]
fn default_max_line_length_is_2048() {
    let up = Upstream::start();
    let g = Guard::start(up.addr, None);
    let mut c = g.client();
    c.ehlo();
    let ok = format!("NOOP {}", "a".repeat(1500));
    c.cmd(&ok).expect_code(250);
    let long = format!("NOOP {}", "b".repeat(3000));
    c.cmd(&long).expect(500, "5.5.2");
    c.cmd("NOOP after").expect_raw("250 2.0.0 Ok after\r\n");
    assert_forwarded(&up, ok.as_bytes());
    assert_never_forwarded(&up, b"bbbb");
}

#[test]
fn a_huge_line_gets_one_reply_and_the_session_goes_on() {
    let up = Upstream::start();
    let g = Guard::start(up.addr, None);
    let mut c = g.client();
    c.ehlo();
    let mut w = b"NOOP ".to_vec();
    w.extend(std::iter::repeat_n(b'z', 1 << 20));
    w.extend_from_slice(b"\r\nNOOP after\r\n");
    c.send(&w);
    c.read_reply().expect_raw("500 5.5.2 Line too long\r\n");
    c.read_reply().expect_raw("250 2.0.0 Ok after\r\n");
    assert_never_forwarded(&up, b"zzzz");
}

#[test]
fn parameters_pass_untouched() {
    let up = Upstream::start();
    let g = Guard::start(up.addr, None);
    let mut c = g.client();
    c.ehlo();
    let mail = "MAIL FROM:<a@example.test> SIZE=12345 BODY=8BITMIME RET=HDRS ENVID=QQ314159";
    let rcpt = "RCPT TO:<b@example.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;b@example.test";
    c.cmd(mail).expect_code(250);
    c.cmd(rcpt).expect_code(250);
    c.cmd("DATA").expect_code(354);
    c.send(b"Subject: p\r\n\r\nx\r\n.\r\n");
    c.read_reply().expect(250, "2.0.0");
    let utf8_mail = "MAIL FROM:<jörg@exämple.test> SMTPUTF8 BODY=8BITMIME";
    let utf8_rcpt = "RCPT TO:<δοκιμή@παράδειγμα.test>";
    c.cmd(utf8_mail).expect_code(250);
    c.cmd(utf8_rcpt).expect_code(250);
    c.cmd("DATA").expect_code(354);
    c.send("Subject: ü\r\n\r\nÄÖÜ\r\n.\r\n".as_bytes());
    c.read_reply().expect(250, "2.0.0");
    let m = up.wait_messages(2);
    assert_eq!(m[0].mail_from, mail.as_bytes());
    assert_eq!(m[0].rcpts, vec![rcpt.as_bytes().to_vec()]);
    assert_eq!(m[1].mail_from, utf8_mail.as_bytes());
    assert_eq!(m[1].rcpts, vec![utf8_rcpt.as_bytes().to_vec()]);
    assert_eq!(m[1].body, "Subject: ü\r\n\r\nÄÖÜ\r\n".as_bytes());
}

#[test]
fn mail_size_above_max_message_size_is_refused_at_mail() {
    let up = Upstream::start();
    let g = Guard::start(up.addr, Some("max_message_size = 2000\n"));
    let mut c = g.client();
    c.ehlo();
    c.cmd("MAIL FROM:<a@example.test> SIZE=5000")
        .expect(552, "5.3.4");
    c.cmd("NOOP after").expect_code(250);
    assert_never_forwarded(&up, b"SIZE=5000");
    c.cmd("MAIL FROM:<a@example.test> SIZE=100")
        .expect_code(250);
    c.cmd("RCPT TO:<b@example.test>").expect_code(250);
    c.cmd("DATA").expect_code(354);
    c.send(b"Subject: s\r\n\r\nsmall\r\n.\r\n");
    c.read_reply().expect(250, "2.0.0");
    let m = up.wait_messages(1);
    assert_eq!(m[0].mail_from, b"MAIL FROM:<a@example.test> SIZE=100");
}

#[test]
fn auth_plain_with_initial_response() {
    let up = Upstream::start();
    let g = Guard::start(up.addr, None);
    let mut c = g.client();
    c.ehlo();
    c.cmd("AUTH PLAIN AHVzZXIAcGFzcw==")
        .expect_raw("235 2.7.0 Authentication successful\r\n");
    c.cmd("MAIL FROM:<a@example.test>").expect_code(250);
    assert_forwarded(&up, b"AUTH PLAIN AHVzZXIAcGFzcw==");
}

#[test]
fn auth_plain_with_a_continuation_line() {
    let up = Upstream::start();
    let g = Guard::start(up.addr, None);
    let mut c = g.client();
    c.ehlo();
    c.cmd("AUTH PLAIN").expect_raw("334 \r\n");
    c.cmd("AHVzZXIAcGFzcw==").expect(235, "2.7.0");
    c.cmd("NOOP after").expect_raw("250 2.0.0 Ok after\r\n");
    let conns = up.conns();
    assert_eq!(conns[0].auth_responses, vec![b"AHVzZXIAcGFzcw==".to_vec()]);
}

#[test]
fn auth_login_with_two_continuations_that_look_like_verbs() {
    let up = Upstream::start();
    let g = Guard::start(up.addr, None);
    let mut c = g.client();
    c.ehlo();
    c.cmd("AUTH LOGIN").expect_raw("334 VXNlcm5hbWU6\r\n");
    // Valid base64 that also reads as blocked verbs: must be relayed as AUTH data.
    c.cmd("VRFY").expect_raw("334 UGFzc3dvcmQ6\r\n");
    c.cmd("ETRN").expect(235, "2.7.0");
    c.cmd("MAIL FROM:<a@example.test>").expect_code(250);
    let conns = up.conns();
    assert_eq!(
        conns[0].auth_responses,
        vec![b"VRFY".to_vec(), b"ETRN".to_vec()]
    );
}

#[test]
fn auth_login_with_initial_response() {
    let up = Upstream::start();
    let g = Guard::start(up.addr, None);
    let mut c = g.client();
    c.ehlo();
    c.cmd("AUTH LOGIN dXNlcg==")
        .expect_raw("334 UGFzc3dvcmQ6\r\n");
    c.cmd("cGFzcw==").expect(235, "2.7.0");
    assert_eq!(up.conns()[0].auth_responses, vec![b"cGFzcw==".to_vec()]);
}

#[test]
fn auth_lines_may_exceed_max_line_length() {
    let up = Upstream::start();
    let g = Guard::start(up.addr, None);
    let mut c = g.client();
    c.ehlo();
    let blob = "QUJD".repeat(1500); // 6000 bytes, over the 2048 default, under 12288
    c.cmd(&format!("AUTH PLAIN {blob}")).expect(235, "2.7.0");
    c.cmd("AUTH PLAIN").expect_code(334);
    c.cmd(&blob).expect(235, "2.7.0");
    assert_forwarded(&up, format!("AUTH PLAIN {blob}").as_bytes());
    assert_eq!(up.conns()[0].auth_responses, vec![blob.into_bytes()]);
}

#[test]
fn auth_is_blocked_in_rfc821_mode() {
    let up = Upstream::start();
    let g = Guard::start(up.addr, Some("mode = \"rfc821\"\n"));
    let mut c = g.client();
    c.helo();
    c.cmd("AUTH PLAIN AHVzZXIAcGFzcw==").expect(500, "5.5.1");
    c.cmd("AUTH LOGIN").expect(500, "5.5.1");
    c.cmd("NOOP after").expect_code(250);
    assert_never_forwarded(&up, b"AUTH");
}

#[test]
fn pipelined_group_with_a_blocked_verb_in_the_middle() {
    let up = Upstream::start();
    let g = Guard::start(up.addr, None);
    let mut c = g.client();
    c.ehlo();
    c.send(b"MAIL FROM:<a@example.test>\r\nNOOP one\r\nVRFY root\r\nRCPT TO:<b@example.test>\r\nETRN x\r\nNOOP two\r\nRCPT TO:<c@example.test>\r\nDATA\r\n");
    let r = c.read_replies(8);
    r[0].expect_raw("250 2.1.0 Sender ok\r\n");
    r[1].expect_raw("250 2.0.0 Ok one\r\n");
    r[2].expect_raw("500 5.5.1 Command unrecognized\r\n");
    r[3].expect_raw("250 2.1.5 Recipient ok\r\n");
    r[4].expect_raw("500 5.5.1 Command unrecognized\r\n");
    r[5].expect_raw("250 2.0.0 Ok two\r\n");
    r[6].expect_raw("250 2.1.5 Recipient ok\r\n");
    r[7].expect_code(354);
    c.send(b"Subject: pipe\r\n\r\nbody\r\n.\r\nNOOP three\r\nVRFY x\r\nQUIT\r\n");
    c.read_reply().expect(250, "2.0.0");
    c.read_reply().expect_raw("250 2.0.0 Ok three\r\n");
    c.read_reply().expect(500, "5.5.1");
    c.read_reply().expect_code(221);
    c.expect_closed();
    assert!(up.wait_all_closed());
    let cmds = up.commands();
    assert_eq!(
        cmds,
        vec![
            b"EHLO client.test".to_vec(),
            b"MAIL FROM:<a@example.test>".to_vec(),
            b"NOOP one".to_vec(),
            b"RCPT TO:<b@example.test>".to_vec(),
            b"NOOP two".to_vec(),
            b"RCPT TO:<c@example.test>".to_vec(),
            b"DATA".to_vec(),
            b"NOOP three".to_vec(),
            b"QUIT".to_vec(),
        ],
        "upstream saw {}",
        show_lines(&cmds)
    );
    assert_eq!(up.messages()[0].body, b"Subject: pipe\r\n\r\nbody\r\n");
}

#[test]
fn pipelined_group_starting_and_ending_with_blocked_verbs() {
    let up = Upstream::start();
    let g = Guard::start(up.addr, Some("blocked_reply = \"ok\"\n"));
    let mut c = g.client();
    c.ehlo();
    c.send(b"VRFY a\r\nNOOP 1\r\nEXPN b\r\nEXPN c\r\nNOOP 2\r\nETRN d\r\n");
    let r = c.read_replies(6);
    let raws: Vec<String> = r
        .iter()
        .map(|x| String::from_utf8_lossy(&x.raw).into_owned())
        .collect();
    assert_eq!(
        raws,
        vec![
            "250 OK\r\n",
            "250 2.0.0 Ok 1\r\n",
            "250 OK\r\n",
            "250 OK\r\n",
            "250 2.0.0 Ok 2\r\n",
            "250 OK\r\n"
        ]
    );
    c.cmd("NOOP end").expect_raw("250 2.0.0 Ok end\r\n");
}

#[test]
fn pipelining_with_a_slow_upstream_keeps_the_order() {
    let up = Upstream::with(UpstreamOptions {
        reply_delay: Duration::from_millis(60),
        ..UpstreamOptions::default()
    });
    let g = Guard::start(up.addr, None);
    let mut c = g.client();
    c.ehlo();
    c.send(b"NOOP 1\r\nVRFY x\r\nNOOP 2\r\nVRFY y\r\nVRFY z\r\nNOOP 3\r\n");
    let r = c.read_replies(6);
    r[0].expect_raw("250 2.0.0 Ok 1\r\n");
    r[1].expect(500, "5.5.1");
    r[2].expect_raw("250 2.0.0 Ok 2\r\n");
    r[3].expect(500, "5.5.1");
    r[4].expect(500, "5.5.1");
    r[5].expect_raw("250 2.0.0 Ok 3\r\n");
}

#[test]
fn a_whole_session_one_byte_per_packet() {
    let up = Upstream::start();
    let g = Guard::start(up.addr, None);
    let mut c = g.client();
    let steps: Vec<(&[u8], u16)> = vec![
        (b"EHLO client.test\r\n", 250),
        (b"VRFY root\r\n", 500),
        (b"MAIL FROM:<a@example.test> BODY=8BITMIME\r\n", 250),
        (b"RCPT TO:<b@example.test>\r\n", 250),
        (b"DATA\r\n", 354),
        (
            "Subject: bytes\r\n\r\nline one\r\n..dot\r\nß8bit\r\n.\r\n".as_bytes(),
            250,
        ),
        (b"MAIL FROM:<c@example.test>\r\n", 250),
        (b"RCPT TO:<d@example.test>\r\n", 250),
        (b"BDAT 13 LAST\r\nRSET\r\n.\r\nxx\r\n", 250),
        (b"QUIT\r\n", 221),
    ];
    for (bytes, code) in steps {
        c.send_bytewise(bytes);
        let r = c.read_reply();
        assert_eq!(r.code, code, "after {}: {r}", show(bytes));
    }
    c.expect_closed();
    let m = up.wait_messages(2);
    assert_eq!(m.len(), 2);
    assert_eq!(
        m[0].body,
        "Subject: bytes\r\n\r\nline one\r\n..dot\r\nß8bit\r\n".as_bytes()
    );
    assert_eq!(m[1].body, b"RSET\r\n.\r\nxx\r\n");
    assert_eq!(m[1].via, Via::Bdat);
    assert_never_forwarded(&up, b"VRFY");
    assert!(
        !up.commands().iter().any(|l| l == b"RSET"),
        "BDAT chunk executed"
    );
}

#[test]
fn pipelined_input_split_at_every_byte_boundary_of_a_line() {
    let up = Upstream::start();
    let g = Guard::start(up.addr, None);
    let mut c = g.client();
    c.ehlo();
    let line = b"NOOP split\r\n";
    for cut in 1..line.len() {
        c.send(&line[..cut]);
        thread::sleep(Duration::from_millis(5));
        c.send(&line[cut..]);
        c.read_reply().expect_raw("250 2.0.0 Ok split\r\n");
    }
}
