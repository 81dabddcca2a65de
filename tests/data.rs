//! Message bodies: DATA and BDAT byte-exactness, dot-stuffing, the end-of-data variants that
//! must never end a message (`bare_lf` normalize and reject), `max_message_size`, NUL bytes,
//! 8-bit and 5 MiB bodies, and "250 only after the upstream's 250".

mod common;

use common::*;
use std::thread;
use std::time::Duration;

const EVIL: &[u8] =
    b"MAIL FROM:<evil@attacker.test>\r\nRCPT TO:<victim@example.test>\r\nDATA\r\nsmuggled\r\n";

#[test]
fn a_plain_message_arrives_byte_exact() {
    let up = Upstream::start();
    let g = Guard::start(up.addr, None);
    let mut c = g.client();
    c.ehlo();
    let body = b"From: a@example.test\r\nTo: b@example.test\r\nSubject: hello\r\n\r\nHello, world.\r\n\r\n-- \r\nsig\r\n";
    let r = c.send_message("a@example.test", "b@example.test", body);
    r.expect(250, "2.0.0");
    let m = up.wait_messages(1);
    assert_eq!(m.len(), 1);
    assert_eq!(m[0].body, body.to_vec(), "got {}", show(&m[0].body));
    assert_eq!(m[0].via, Via::Data);
    assert_eq!(m[0].mail_from, b"MAIL FROM:<a@example.test>");
    assert_eq!(m[0].rcpts, vec![b"RCPT TO:<b@example.test>".to_vec()]);
    c.cmd("QUIT").expect_code(221);
    c.expect_closed();
}

#[test]
fn the_reply_to_end_of_data_is_the_upstreams() {
    let up = Upstream::start();
    let g = Guard::start(up.addr, None);
    let mut c = g.client();
    c.ehlo();
    let r = c.send_message("a@example.test", "b@example.test", b"x\r\n");
    r.expect_raw("250 2.0.0 Ok: queued as 1\r\n");
    let r = c.send_message("a@example.test", "b@example.test", b"y\r\n");
    r.expect_raw("250 2.0.0 Ok: queued as 2\r\n");
}

#[test]
fn an_upstream_rejection_is_relayed_not_turned_into_250() {
    let up = Upstream::with(UpstreamOptions {
        end_of_data: EndOfData::Reply("554 5.7.1 Rejected by upstream policy".into()),
        ..UpstreamOptions::default()
    });
    let g = Guard::start(up.addr, None);
    let mut c = g.client();
    c.ehlo();
    let r = c.send_message(
        "a@example.test",
        "b@example.test",
        b"Subject: x\r\n\r\nspam\r\n",
    );
    r.expect_raw("554 5.7.1 Rejected by upstream policy\r\n");
}

#[test]
fn the_client_sees_250_only_after_the_upstream_sent_it() {
    let up = Upstream::with(UpstreamOptions {
        hold_end_of_data: true,
        ..UpstreamOptions::default()
    });
    let g = Guard::start(up.addr, None);
    let mut c = g.client();
    c.ehlo();
    c.start_data("a@example.test", "b@example.test");
    c.send(b"Subject: held\r\n\r\nwait for it\r\n.\r\n");
    // The upstream has the whole message but has not answered yet.
    assert_eq!(
        up.wait_messages(1).len(),
        1,
        "end of data never reached the upstream"
    );
    c.set_timeout(Duration::from_millis(1500));
    match c.try_read_reply() {
        Err(ReadError::Timeout(b)) => assert!(b.is_empty(), "partial reply {}", show(&b)),
        other => panic!("the guard answered before the upstream did: {other:?}"),
    }
    up.release();
    c.set_timeout(WAIT);
    c.read_reply().expect_raw("250 2.0.0 Ok: queued as 1\r\n");
}

#[test]
fn dot_stuffing_is_kept_and_unstuffed_dot_lines_are_stuffed() {
    let up = Upstream::start();
    let g = Guard::start(up.addr, None);
    let mut c = g.client();
    c.ehlo();
    // `..x` is a stuffed `.x`; `. ` and `.x` at a line start are not stuffed by this client.
    let wire = b"Subject: dots\r\n\r\n..stuffed\r\n. not stuffed\r\n.x\r\n...\r\n..\r\nend\r\n";
    let r = c.send_message("a@example.test", "b@example.test", wire);
    r.expect(250, "2.0.0");
    let m = up.wait_messages(1);
    assert_eq!(
        m[0].body,
        b"Subject: dots\r\n\r\n..stuffed\r\n.. not stuffed\r\n..x\r\n...\r\n..\r\nend\r\n".to_vec(),
        "got {}",
        show(&m[0].body)
    );
}

#[test]
fn an_empty_body_is_delivered() {
    let up = Upstream::start();
    let g = Guard::start(up.addr, None);
    let mut c = g.client();
    c.ehlo();
    let r = c.send_message("a@example.test", "b@example.test", b"");
    r.expect(250, "2.0.0");
    assert_eq!(up.wait_messages(1)[0].body, b"");
}

#[test]
fn an_8bit_body_arrives_byte_exact() {
    let up = Upstream::start();
    let g = Guard::start(up.addr, None);
    let mut c = g.client();
    c.ehlo();
    let mut body = "Subject: 8bit\r\nContent-Transfer-Encoding: 8bit\r\n\r\nGrüße, 日本語, ✓\r\n"
        .as_bytes()
        .to_vec();
    // Every non-ASCII byte value (no CR, LF or NUL), in lines of 64.
    let high: Vec<u8> = (0x80..=0xffu8).collect();
    for line in high.chunks(64) {
        body.extend_from_slice(line);
        body.extend_from_slice(b"\r\n");
    }
    c.cmd("MAIL FROM:<a@example.test> BODY=8BITMIME")
        .expect_code(250);
    c.cmd("RCPT TO:<b@example.test>").expect_code(250);
    c.cmd("DATA").expect_code(354);
    c.send(&body);
    c.send(b".\r\n");
    c.read_reply().expect(250, "2.0.0");
    let m = up.wait_messages(1);
    assert_eq!(m[0].body, body, "got {}", show(&m[0].body));
}

#[test]
fn a_5_mib_body_arrives_byte_exact() {
    let up = Upstream::start();
    let g = Guard::start(up.addr, None);
    let mut c = g.client();
    c.set_timeout(Duration::from_secs(60));
    c.ehlo();
    let mut body = b"Subject: big\r\n\r\n".to_vec();
    let mut i = 0u64;
    while body.len() < 5 << 20 {
        // Lines of mixed content, some starting with a (stuffed) dot.
        let mut line = pseudo_random(70, i + 1)
            .into_iter()
            .map(|b| b'!' + b % 90)
            .collect::<Vec<u8>>();
        line[0] = b'L';
        if i % 17 == 0 {
            line.insert(0, b'.');
            line.insert(0, b'.');
        }
        body.extend_from_slice(&line);
        body.extend_from_slice(b"\r\n");
        i += 1;
    }
    c.start_data("a@example.test", "b@example.test");
    for piece in body.chunks(256 * 1024) {
        c.send(piece);
    }
    c.send(b".\r\n");
    c.read_reply().expect(250, "2.0.0");
    let m = up.wait_messages(1);
    assert_eq!(m.len(), 1);
    assert!(
        m[0].body == body,
        "5 MiB body differs: got {} bytes, sent {} bytes, first difference at {:?}",
        m[0].body.len(),
        body.len(),
        m[0].body.iter().zip(&body).position(|(a, b)| a != b)
    );
}

#[test]
fn pipelined_message_then_next_transaction() {
    let up = Upstream::start();
    let g = Guard::start(up.addr, None);
    let mut c = g.client();
    c.ehlo();
    c.send(b"MAIL FROM:<a@example.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n");
    c.read_reply().expect_code(250);
    c.read_reply().expect_code(250);
    c.read_reply().expect_code(354);
    c.send(b"first\r\n.\r\nMAIL FROM:<c@example.test>\r\nRCPT TO:<d@example.test>\r\nDATA\r\n");
    c.read_reply().expect(250, "2.0.0");
    c.read_reply().expect_code(250);
    c.read_reply().expect_code(250);
    c.read_reply().expect_code(354);
    c.send(b"second\r\n.\r\nQUIT\r\n");
    c.read_reply().expect(250, "2.0.0");
    c.read_reply().expect_code(221);
    let m = up.wait_messages(2);
    assert_eq!(m.len(), 2);
    assert_eq!(m[0].body, b"first\r\n");
    assert_eq!(m[1].body, b"second\r\n");
    assert_eq!(m[1].mail_from, b"MAIL FROM:<c@example.test>");
}

// ----- end-of-data variants ------------------------------------------------------------------

/// Sends a body holding `variant` followed by a pipelined second transaction, then the real
/// end of data. Returns the reply to it, after checking that nothing else was answered
/// (the sentinel NOOP gets the next reply) and that the smuggled transaction never became
/// commands.
fn smuggle(c: &mut Client, up: &Upstream, variant: &[u8]) -> Reply {
    c.start_data("a@example.test", "b@example.test");
    let mut body = b"Subject: t\r\n\r\nline1".to_vec();
    body.extend_from_slice(variant);
    body.extend_from_slice(EVIL);
    c.send(&body);
    c.send(b".\r\n");
    let r = c.read_reply();
    c.cmd("NOOP sentinel")
        .expect_raw("250 2.0.0 Ok sentinel\r\n");
    assert_never_forwarded(up, b"evil@attacker.test");
    assert_never_forwarded(up, b"victim@example.test");
    assert_never_forwarded(up, b"smuggled");
    r
}

fn variant_normalize(variant: &[u8]) {
    let up = Upstream::start();
    let g = Guard::start(up.addr, Some("bare_lf = \"normalize\"\n"));
    let mut c = g.client();
    c.ehlo();
    let r = smuggle(&mut c, &up, variant);
    r.expect(250, "2.0.0");
    c.cmd("QUIT").expect_code(221);
    assert!(up.wait_all_closed());
    let m = up.messages();
    assert_eq!(m.len(), 1, "the upstream must record exactly one message");
    let body = &m[0].body;
    assert!(
        !has_bare_cr_or_lf(body),
        "bare CR/LF reached the upstream: {}",
        show(body)
    );
    let mut stream = body.clone();
    stream.extend_from_slice(b".\r\n");
    assert_eq!(
        find(&stream, b"\r\n.\r\n"),
        Some(stream.len() - 5),
        "an end of data before the real one: {}",
        show(body)
    );
    let mut want = b"Subject: t\r\n\r\nline1\r\n..\r\n".to_vec();
    want.extend_from_slice(EVIL);
    assert_eq!(body, &want, "got {}", show(body));
    let mails: Vec<_> = up
        .commands()
        .into_iter()
        .filter(|l| l.starts_with(b"MAIL"))
        .collect();
    assert_eq!(mails, vec![b"MAIL FROM:<a@example.test>".to_vec()]);
}

fn variant_reject(variant: &[u8]) {
    let up = Upstream::start();
    let g = Guard::start(up.addr, Some("bare_lf = \"reject\"\n"));
    let mut c = g.client();
    c.ehlo();
    let r = smuggle(&mut c, &up, variant);
    r.expect(550, "5.6.11");
    // The next message of the same session is delivered.
    let r = c.send_message(
        "a@example.test",
        "b@example.test",
        b"Subject: next\r\n\r\nclean\r\n",
    );
    r.expect(250, "2.0.0");
    c.cmd("QUIT").expect_code(221);
    assert!(up.wait_all_closed());
    let m = up.messages();
    assert_eq!(m.len(), 1, "only the clean message may be delivered: {m:?}");
    assert_eq!(m[0].body, b"Subject: next\r\n\r\nclean\r\n");
}

#[test]
fn variant_lf_dot_lf_normalize() {
    variant_normalize(b"\n.\n");
}

#[test]
fn variant_lf_dot_crlf_normalize() {
    variant_normalize(b"\n.\r\n");
}

#[test]
fn variant_cr_dot_cr_normalize() {
    variant_normalize(b"\r.\r");
}

#[test]
fn variant_cr_dot_lf_normalize() {
    variant_normalize(b"\r.\n");
}

#[test]
fn variant_crlf_dot_lf_normalize() {
    variant_normalize(b"\r\n.\n");
}

#[test]
fn variant_crlf_dot_cr_normalize() {
    variant_normalize(b"\r\n.\r");
}

#[test]
fn variant_lf_dot_lf_reject() {
    variant_reject(b"\n.\n");
}

#[test]
fn variant_lf_dot_crlf_reject() {
    variant_reject(b"\n.\r\n");
}

#[test]
fn variant_cr_dot_cr_reject() {
    variant_reject(b"\r.\r");
}

#[test]
fn variant_cr_dot_lf_reject() {
    variant_reject(b"\r.\n");
}

#[test]
fn variant_crlf_dot_lf_reject() {
    variant_reject(b"\r\n.\n");
}

#[test]
fn variant_crlf_dot_cr_reject() {
    variant_reject(b"\r\n.\r");
}

/// `\r\n\x00.\r\n` never ends the message; the NUL makes the guard refuse it (550 5.6.0,
/// notes/replies.md) in either bare_lf mode, and nothing reaches the upstream as a message.
fn variant_nul(mode: &str) {
    let up = Upstream::start();
    let g = Guard::start(up.addr, Some(&format!("bare_lf = \"{mode}\"\n")));
    let mut c = g.client();
    c.ehlo();
    let r = smuggle(&mut c, &up, b"\r\n\x00.\r\n");
    r.expect(550, "5.6.0");
    let r = c.send_message(
        "a@example.test",
        "b@example.test",
        b"Subject: next\r\n\r\nclean\r\n",
    );
    r.expect(250, "2.0.0");
    c.cmd("QUIT").expect_code(221);
    assert!(up.wait_all_closed());
    let m = up.messages();
    assert_eq!(m.len(), 1, "only the clean message may be delivered: {m:?}");
    assert_eq!(m[0].body, b"Subject: next\r\n\r\nclean\r\n");
}

#[test]
fn variant_crlf_nul_dot_crlf_normalize() {
    variant_nul("normalize");
}

#[test]
fn variant_crlf_nul_dot_crlf_reject() {
    variant_nul("reject");
}

const VARIANTS: [&[u8]; 6] = [
    b"\n.\n", b"\n.\r\n", b"\r.\r", b"\r.\n", b"\r\n.\n", b"\r\n.\r",
];

/// Every variant with a packet boundary at every position in and around it: the guard must
/// decide the same way when the bytes of a variant arrive in separate reads.
fn variants_split(mode: &str) {
    let up = Upstream::start();
    let g = Guard::start(up.addr, Some(&format!("bare_lf = \"{mode}\"\n")));
    let mut c = g.client();
    c.ehlo();
    let mut want = b"Subject: t\r\n\r\nline1\r\n..\r\n".to_vec();
    want.extend_from_slice(EVIL);
    let mut delivered = 0;
    for v in VARIANTS {
        let mut body = b"Subject: t\r\n\r\nline1".to_vec();
        let start = body.len();
        body.extend_from_slice(v);
        body.extend_from_slice(EVIL);
        for cut in start..=start + v.len() + 1 {
            c.start_data("a@example.test", "b@example.test");
            c.send_split(&body, &[cut], Duration::from_millis(20));
            c.send(b".\r\n");
            let r = c.read_reply();
            let what = format!("variant {} cut at {}", show(v), cut - start);
            if mode == "normalize" {
                assert!(r.code == 250, "{what}: {r}");
                delivered += 1;
                let m = up.wait_messages(delivered);
                assert_eq!(m.len(), delivered, "{what}: {m:?}");
                assert!(
                    m[delivered - 1].body == want,
                    "{what}: got {}",
                    show(&m[delivered - 1].body)
                );
            } else {
                assert!(
                    r.code == 550 && r.enhanced() == Some("5.6.11"),
                    "{what}: {r}"
                );
            }
        }
    }
    c.cmd("NOOP sentinel")
        .expect_raw("250 2.0.0 Ok sentinel\r\n");
    assert_never_forwarded(&up, b"evil@attacker.test");
    assert_never_forwarded(&up, b"smuggled");
    if mode == "reject" {
        assert!(up.messages().is_empty(), "{:?}", up.messages());
    }
}

#[test]
fn variants_split_at_every_position_normalize() {
    variants_split("normalize");
}

#[test]
fn variants_split_at_every_position_reject() {
    variants_split("reject");
}

#[test]
fn all_variants_in_one_pipelined_body_normalize() {
    let up = Upstream::start();
    let g = Guard::start(up.addr, None);
    let mut c = g.client();
    c.ehlo();
    c.start_data("a@example.test", "b@example.test");
    let variants = VARIANTS;
    let mut body = b"Subject: all\r\n\r\nstart".to_vec();
    for v in variants {
        body.extend_from_slice(v);
        body.extend_from_slice(b"QUIT\r\nx");
    }
    body.extend_from_slice(b"\r\n.\r\nNOOP after\r\n");
    c.send(&body);
    c.read_reply().expect(250, "2.0.0");
    c.read_reply().expect_raw("250 2.0.0 Ok after\r\n");
    let m = up.wait_messages(1);
    assert_eq!(m.len(), 1);
    let mut want = b"Subject: all\r\n\r\nstart".to_vec();
    for _ in variants {
        want.extend_from_slice(b"\r\n..\r\nQUIT\r\nx");
    }
    want.extend_from_slice(b"\r\n");
    assert_eq!(m[0].body, want, "got {}", show(&m[0].body));
    assert!(!up.commands().iter().any(|l| l == b"QUIT"));
}

#[test]
fn bare_lf_normalize_is_the_default_and_fixes_line_endings() {
    let up = Upstream::start();
    let g = Guard::start(up.addr, None);
    let mut c = g.client();
    c.ehlo();
    let r = c.send_message(
        "a@example.test",
        "b@example.test",
        b"Subject: n\r\n\r\na\nb\rc\r\n\n\rd\r\n",
    );
    r.expect(250, "2.0.0");
    let m = up.wait_messages(1);
    assert_eq!(m[0].body, b"Subject: n\r\n\r\na\r\nb\r\nc\r\n\r\n\r\nd\r\n");
}

#[test]
fn bare_lf_reject_refuses_a_message_with_a_lone_lf() {
    let up = Upstream::start();
    let g = Guard::start(up.addr, Some("bare_lf = \"reject\"\n"));
    let mut c = g.client();
    c.ehlo();
    let r = c.send_message(
        "a@example.test",
        "b@example.test",
        b"Subject: r\r\n\r\nbad\nline\r\n",
    );
    r.expect_raw("550 5.6.11 Message contains bare CR or LF\r\n");
    let r = c.send_message(
        "a@example.test",
        "b@example.test",
        b"Subject: r\r\n\r\ngood\r\n",
    );
    r.expect(250, "2.0.0");
    c.cmd("QUIT").expect_code(221);
    assert!(up.wait_all_closed());
    let m = up.messages();
    assert_eq!(m.len(), 1);
    assert_eq!(m[0].body, b"Subject: r\r\n\r\ngood\r\n");
}

#[test]
fn a_refused_message_aborts_the_upstream_and_replays_ehlo() {
    let up = Upstream::start();
    let g = Guard::start(up.addr, Some("bare_lf = \"reject\"\n"));
    let mut c = g.client();
    c.ehlo();
    let r = c.send_message("a@example.test", "b@example.test", b"bad\rline\r\n");
    r.expect(550, "5.6.11");
    let r = c.send_message("c@example.test", "d@example.test", b"good\r\n");
    r.expect(250, "2.0.0");
    let m = up.wait_messages(1);
    let conns = up.conns();
    assert!(conns.len() >= 2, "the upstream connection was not replaced");
    let k = &conns[m[0].conn];
    assert_eq!(
        k.commands.first().map(|l| l.as_slice()),
        Some(&b"EHLO client.test"[..]),
        "the new upstream connection must start with the client's EHLO: {}",
        show_lines(&k.commands)
    );
    assert_eq!(m[0].mail_from, b"MAIL FROM:<c@example.test>");
    c.cmd("QUIT").expect_code(221);
    assert!(up.wait_all_closed());
    assert_eq!(up.messages().len(), 1, "the refused message was delivered");
}

#[test]
fn a_refused_message_replays_helo() {
    let up = Upstream::start();
    let g = Guard::start(up.addr, Some("bare_lf = \"reject\"\n"));
    let mut c = g.client();
    c.helo();
    c.send_message("a@example.test", "b@example.test", b"bad\nline\r\n")
        .expect(550, "5.6.11");
    c.send_message("a@example.test", "b@example.test", b"good\r\n")
        .expect(250, "2.0.0");
    let m = up.wait_messages(1);
    let conns = up.conns();
    assert_eq!(
        conns[m[0].conn].commands.first().map(|l| l.as_slice()),
        Some(&b"HELO client.test"[..]),
        "{}",
        show_lines(&conns[m[0].conn].commands)
    );
}

#[test]
fn nul_in_data_is_refused_and_not_delivered() {
    let up = Upstream::start();
    let g = Guard::start(up.addr, None);
    let mut c = g.client();
    c.ehlo();
    let r = c.send_message(
        "a@example.test",
        "b@example.test",
        b"Subject: z\r\n\r\na\x00b\r\n",
    );
    r.expect_raw("550 5.6.0 Message contains NUL bytes\r\n");
    c.send_message("a@example.test", "b@example.test", b"fine\r\n")
        .expect(250, "2.0.0");
    c.cmd("QUIT").expect_code(221);
    assert!(up.wait_all_closed());
    let m = up.messages();
    assert_eq!(m.len(), 1);
    assert_eq!(m[0].body, b"fine\r\n");
}

// ----- max_message_size ----------------------------------------------------------------------

#[test]
fn a_body_over_max_message_size_is_refused_after_end_of_data() {
    let up = Upstream::start();
    let g = Guard::start(up.addr, Some("max_message_size = 2000\n"));
    let mut c = g.client();
    c.ehlo();
    let mut big = b"Subject: big\r\n\r\n".to_vec();
    while big.len() < 6000 {
        big.extend_from_slice(b"0123456789012345678901234567890123456789\r\n");
    }
    c.start_data("a@example.test", "b@example.test");
    c.send(&big);
    c.send(b".\r\n");
    c.read_reply()
        .expect_raw("552 5.3.4 Message size exceeds fixed maximum message size\r\n");
    // Same session, a message under the limit.
    let small = b"Subject: small\r\n\r\nfits\r\n";
    c.send_message("a@example.test", "b@example.test", small)
        .expect(250, "2.0.0");
    c.cmd("QUIT").expect_code(221);
    assert!(up.wait_all_closed());
    let m = up.messages();
    assert_eq!(m.len(), 1, "the big message must not be delivered");
    assert_eq!(m[0].body, small.to_vec());
    let first = &up.conns()[m[0].conn].commands;
    assert_eq!(
        first.first().map(|l| l.as_slice()),
        Some(&b"EHLO client.test"[..])
    );
}

#[test]
fn a_body_under_max_message_size_passes() {
    let up = Upstream::start();
    let g = Guard::start(up.addr, Some("max_message_size = 100000\n"));
    let mut c = g.client();
    c.ehlo();
    let mut body = b"Subject: mid\r\n\r\n".to_vec();
    while body.len() < 50_000 {
        body.extend_from_slice(b"abcdefghijklmnopqrstuvwxyz\r\n");
    }
    c.send_message("a@example.test", "b@example.test", &body)
        .expect(250, "2.0.0");
    assert_eq!(up.wait_messages(1)[0].body, body);
}

#[test]
fn size_parameter_and_body_limit_in_one_session() {
    let up = Upstream::start();
    let g = Guard::start(up.addr, Some("max_message_size = 1000\n"));
    let mut c = g.client();
    c.ehlo();
    c.cmd("MAIL FROM:<a@example.test> SIZE=999999")
        .expect(552, "5.3.4");
    c.cmd("MAIL FROM:<a@example.test> SIZE=10").expect_code(250);
    c.cmd("RCPT TO:<b@example.test>").expect_code(250);
    c.cmd("DATA").expect_code(354);
    // Lied about SIZE: the body is still measured.
    let mut line = vec![b'x'; 98];
    line.extend_from_slice(b"\r\n");
    c.send(&line.repeat(30));
    c.send(b".\r\n");
    c.read_reply().expect(552, "5.3.4");
    c.send_message("a@example.test", "b@example.test", b"ok\r\n")
        .expect(250, "2.0.0");
    let m = up.wait_messages(1);
    thread::sleep(Duration::from_millis(200));
    assert_eq!(up.messages().len(), 1);
    assert_eq!(m[0].body, b"ok\r\n");
}

// ----- BDAT ----------------------------------------------------------------------------------

#[test]
fn bdat_chunks_are_relayed_by_length() {
    let up = Upstream::start();
    let g = Guard::start(up.addr, None);
    let mut c = g.client();
    c.ehlo();
    let chunk1: &[u8] = b"Subject: bdat\r\n\r\n.\r\nQUIT\r\nRSET\r\n\r\n.\r\n";
    let chunk2: &[u8] = b"\xff\x80 8-bit bytes\r\n";
    let mut w =
        b"MAIL FROM:<a@example.test> BODY=BINARYMIME\r\nRCPT TO:<b@example.test>\r\n".to_vec();
    w.extend_from_slice(format!("BDAT {}\r\n", chunk1.len()).as_bytes());
    w.extend_from_slice(chunk1);
    w.extend_from_slice(format!("BDAT {} LAST\r\n", chunk2.len()).as_bytes());
    w.extend_from_slice(chunk2);
    w.extend_from_slice(b"NOOP after\r\n");
    c.send(&w);
    c.read_reply().expect_code(250);
    c.read_reply().expect_code(250);
    c.read_reply().expect_code(250);
    c.read_reply().expect(250, "2.0.0");
    c.read_reply().expect_raw("250 2.0.0 Ok after\r\n");
    let m = up.wait_messages(1);
    let mut want = chunk1.to_vec();
    want.extend_from_slice(chunk2);
    assert_eq!(m[0].body, want, "got {}", show(&m[0].body));
    assert_eq!(m[0].via, Via::Bdat);
    assert_eq!(
        m[0].mail_from,
        b"MAIL FROM:<a@example.test> BODY=BINARYMIME"
    );
    let cmds = up.commands();
    assert!(
        !cmds.iter().any(|l| l == b"QUIT" || l == b"RSET"),
        "{}",
        show_lines(&cmds)
    );
}

#[test]
fn bdat_zero_last_ends_a_message() {
    let up = Upstream::start();
    let g = Guard::start(up.addr, None);
    let mut c = g.client();
    c.ehlo();
    c.cmd("MAIL FROM:<a@example.test>").expect_code(250);
    c.cmd("RCPT TO:<b@example.test>").expect_code(250);
    c.send(b"BDAT 7\r\nhello\r\n");
    c.read_reply().expect_code(250);
    c.cmd("BDAT 0 LAST").expect(250, "2.0.0");
    assert_eq!(up.wait_messages(1)[0].body, b"hello\r\n");
}

/// A blocked BDAT's chunk is skipped by its length, whether it came with the command or in
/// a later packet.
fn blocked_bdat(policy: &str, greet_ehlo: bool, blocked: &str) {
    let up = Upstream::start();
    let g = Guard::start(up.addr, Some(policy));
    let mut c = g.client();
    if greet_ehlo {
        c.ehlo();
    } else {
        c.helo();
    }
    c.cmd("MAIL FROM:<a@example.test>").expect_code(250);
    c.cmd("RCPT TO:<b@example.test>").expect_code(250);
    let chunk: &[u8] = b"RSET\r\nMAIL FROM:<x@evil.test>\r\nQUIT\r\n";
    let mut w = format!("BDAT {} LAST\r\n", chunk.len()).into_bytes();
    w.extend_from_slice(chunk);
    w.extend_from_slice(b"NOOP one\r\n");
    c.send(&w);
    c.read_reply().expect_raw(blocked);
    c.read_reply().expect_raw("250 2.0.0 Ok one\r\n");
    // Command and chunk in separate packets.
    let chunk2: &[u8] = b"MAIL FROM:<evil@x>\r\n";
    c.send(format!("BDAT {}\r\n", chunk2.len()).as_bytes());
    thread::sleep(Duration::from_millis(150));
    c.send(chunk2);
    thread::sleep(Duration::from_millis(150));
    c.send(b"NOOP two\r\n");
    c.read_reply().expect_raw(blocked);
    c.read_reply().expect_raw("250 2.0.0 Ok two\r\n");
    // The transaction is intact: DATA still works.
    c.cmd("DATA").expect_code(354);
    c.send(b"by data\r\n.\r\n");
    c.read_reply().expect(250, "2.0.0");
    let m = up.wait_messages(1);
    assert_eq!(m[0].body, b"by data\r\n");
    let cmds = up.commands();
    for bad in [&b"BDAT"[..], b"evil", b"RSET", b"QUIT"] {
        assert!(
            !cmds.iter().any(|l| contains(l, bad)),
            "{} reached the upstream: {}",
            show(bad),
            show_lines(&cmds)
        );
    }
}

#[test]
fn blocked_bdat_chunk_is_skipped_rfc821() {
    blocked_bdat(
        "mode = \"rfc821\"\n",
        false,
        "500 5.5.1 Command unrecognized\r\n",
    );
}

#[test]
fn blocked_bdat_chunk_is_skipped_esmtp_blocked_reply_ok() {
    blocked_bdat(
        "mode = \"esmtp\"\nblocked_reply = \"ok\"\n",
        true,
        "250 OK\r\n",
    );
}

#[test]
fn blocked_bdat_chunk_is_skipped_without_chunking_extension() {
    blocked_bdat(
        "extensions = [\"PIPELINING\", \"8BITMIME\"]\n",
        true,
        "500 5.5.1 Command unrecognized\r\n",
    );
}

#[test]
fn bdat_body_over_max_message_size_is_refused() {
    let up = Upstream::start();
    let g = Guard::start(up.addr, Some("max_message_size = 1000\n"));
    let mut c = g.client();
    c.ehlo();
    c.cmd("MAIL FROM:<a@example.test>").expect_code(250);
    c.cmd("RCPT TO:<b@example.test>").expect_code(250);
    let chunk = vec![b'y'; 800];
    let mut w = format!("BDAT {}\r\n", chunk.len()).into_bytes();
    w.extend_from_slice(&chunk);
    w.extend_from_slice(format!("BDAT {} LAST\r\n", chunk.len()).as_bytes());
    w.extend_from_slice(&chunk);
    c.send(&w);
    // Each BDAT gets a reply. The first chunk fits (250), unless the guard already knows the
    // message is too big (552); the message as a whole does not fit.
    let first = c.read_reply();
    assert!(
        first.code == 250 || (first.code == 552 && first.enhanced() == Some("5.3.4")),
        "first chunk: {first}"
    );
    c.read_reply().expect(552, "5.3.4");
    c.cmd("RSET").expect_code(250);
    c.cmd("MAIL FROM:<a@example.test>").expect_code(250);
    c.cmd("RCPT TO:<b@example.test>").expect_code(250);
    c.send(b"BDAT 4 LAST\r\nsmol");
    c.read_reply().expect(250, "2.0.0");
    let m = up.wait_messages(1);
    thread::sleep(Duration::from_millis(200));
    assert_eq!(up.messages().len(), 1);
    assert_eq!(m[0].body, b"smol");
}
