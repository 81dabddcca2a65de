//! Faults and bad input: the upstream refusing, closing, dying mid-session or mid-DATA; the
//! client vanishing mid-DATA; TLS and HTTP on the plain port; NUL, 8-bit and binary garbage
//! in commands; too many errors; and one bad session next to a good one.

mod common;

use common::*;
use std::thread;
use std::time::Duration;

/// Reads what comes next: `Ok(Some(reply))`, `Ok(None)` on a clean close, `Err` otherwise.
fn next_reply_or_close(c: &mut Client) -> Result<Option<Reply>, String> {
    match c.try_read_reply() {
        Ok(r) => Ok(Some(r)),
        Err(ReadError::Closed(b)) if b.is_empty() => Ok(None),
        Err(e) => Err(format!("{e:?}")),
    }
}

/// Asserts that bad input was answered by a 4xx/5xx reply with an enhanced status code, or by
/// a clean close; after a 421 the connection must close.
#[track_caller]
fn assert_refused_or_closed(c: &mut Client, what: &str) {
    match next_reply_or_close(c) {
        Ok(None) => {}
        Ok(Some(r)) => {
            assert!(
                (400..600).contains(&r.code) && r.enhanced().is_some(),
                "{what}: expected a 4xx/5xx reply with an enhanced code, got {r}"
            );
            if r.code == 421 {
                c.expect_closed();
            }
        }
        Err(e) => panic!("{what}: neither a reply nor a clean close: {e}"),
    }
}

#[test]
fn upstream_refusing_gives_421_and_close() {
    let g = Guard::start(Upstream::refused_addr(), None);
    let mut c = Client::connect(g.addr);
    c.read_reply().expect(421, "4.3.0");
    c.expect_closed();
    // The guard itself keeps running.
    let mut c = Client::connect(g.addr);
    c.read_reply().expect(421, "4.3.0");
}

#[test]
fn upstream_closing_at_once_gives_421_and_close() {
    let up = Upstream::with(UpstreamOptions {
        close_on_accept: true,
        ..UpstreamOptions::default()
    });
    let g = Guard::start(up.addr, None);
    let mut c = Client::connect(g.addr);
    c.read_reply().expect(421, "4.3.0");
    c.expect_closed();
}

#[test]
fn upstream_gone_in_command_phase_gives_421_and_close() {
    let up = Upstream::with(UpstreamOptions {
        close_on_command: Some("NOOP die".into()),
        ..UpstreamOptions::default()
    });
    let g = Guard::start(up.addr, None);
    let mut c = g.client();
    c.ehlo();
    c.cmd("MAIL FROM:<a@example.test>").expect_code(250);
    c.cmd("NOOP die").expect(421, "4.3.0");
    c.expect_closed();
}

#[test]
fn upstream_gone_mid_data_gives_451_and_nothing_is_delivered() {
    let up = Upstream::with(UpstreamOptions {
        close_in_data_after: Some(10),
        ..UpstreamOptions::default()
    });
    let g = Guard::start(up.addr, None);
    let mut c = g.client();
    c.ehlo();
    c.start_data("a@example.test", "b@example.test");
    let _ = c.try_send(b"Subject: cut\r\n\r\nthe upstream goes away while this arrives\r\n");
    assert!(
        up.wait_all_closed(),
        "the upstream did not cut the connection"
    );
    for _ in 0..20 {
        let _ = c.try_send(b"more body text that nobody will ever read\r\n");
    }
    let _ = c.try_send(b".\r\n");
    c.read_reply().expect(451, "4.3.0");
    c.expect_closed();
    assert!(up.messages().is_empty(), "{:?}", up.messages());
}

#[test]
fn upstream_gone_after_end_of_data_gives_451() {
    let up = Upstream::with(UpstreamOptions {
        end_of_data: EndOfData::Close,
        ..UpstreamOptions::default()
    });
    let g = Guard::start(up.addr, None);
    let mut c = g.client();
    c.ehlo();
    let r = c.send_message(
        "a@example.test",
        "b@example.test",
        b"Subject: x\r\n\r\nunacked\r\n",
    );
    r.expect(451, "4.3.0");
    c.expect_closed();
    assert!(up.messages().is_empty());
}

#[test]
fn client_gone_mid_data_never_ends_the_upstream_message() {
    for tail in [
        &b"partial body\r\n"[..],
        b"partial body\r\n.",
        b"partial body\r\n.\r",
    ] {
        let up = Upstream::start();
        let g = Guard::start(up.addr, None);
        let mut c = g.client();
        c.ehlo();
        c.start_data("a@example.test", "b@example.test");
        c.send(b"Subject: gone\r\n\r\n");
        c.send(tail);
        thread::sleep(Duration::from_millis(100));
        drop(c);
        // Give the guard the chance to do the wrong thing, then look.
        let closed = up.wait_all_closed();
        thread::sleep(Duration::from_millis(300));
        assert!(
            up.messages().is_empty(),
            "tail {}: the upstream got a message: {:?}",
            show(tail),
            up.messages()
        );
        for k in up.conns() {
            let after_data = find(&k.raw, b"DATA\r\n")
                .map(|i| &k.raw[i + 6..])
                .unwrap_or(&[]);
            assert!(
                !contains(after_data, b"\r\n.\r\n") && !after_data.starts_with(b".\r\n"),
                "tail {}: the upstream got an end of data: {}",
                show(tail),
                show(&k.raw)
            );
        }
        if !closed {
            eprintln!("note: upstream connection still open after the client left");
        }
    }
}

#[test]
fn tls_client_hello_on_the_plain_port() {
    let up = Upstream::start();
    let g = Guard::start(up.addr, None);
    let mut c = g.client();
    c.send(&tls_client_hello());
    assert_refused_or_closed(&mut c, "TLS ClientHello");
    assert!(
        !up.commands().iter().any(|l| l.contains(&0x16)),
        "TLS bytes reached the upstream: {}",
        show_lines(&up.commands())
    );
    // Another session is fine.
    let mut c = g.client();
    c.ehlo();
    c.send_message("a@example.test", "b@example.test", b"ok\r\n")
        .expect(250, "2.0.0");
}

#[test]
fn tls_client_hello_before_the_greeting() {
    let up = Upstream::start();
    let g = Guard::start(up.addr, None);
    let mut c = Client::connect(g.addr);
    c.send(&tls_client_hello());
    // A greeting may come first; then the refusal or the close.
    match next_reply_or_close(&mut c) {
        Ok(None) => {}
        Ok(Some(r)) if r.code == 220 => assert_refused_or_closed(&mut c, "early ClientHello"),
        Ok(Some(r)) => assert!(
            (400..600).contains(&r.code) && r.enhanced().is_some(),
            "got {r}"
        ),
        Err(e) => panic!("neither a reply nor a clean close: {e}"),
    }
    assert!(!up.commands().iter().any(|l| l.contains(&0x16)));
}

#[test]
fn http_request_on_the_smtp_port() {
    let up = Upstream::start();
    let g = Guard::start(up.addr, None);
    let mut c = g.client();
    c.send(b"GET / HTTP/1.1\r\nHost: mx.example.test\r\n\r\n");
    assert_refused_or_closed(&mut c, "HTTP request");
    assert!(!up.saw_command_containing(b"GET"));
    assert!(!up.saw_command_containing(b"Host:"));
}

#[test]
fn nul_and_8bit_garbage_in_commands_get_syntax_errors() {
    let up = Upstream::start();
    let g = Guard::start(up.addr, None);
    let mut c = g.client();
    c.ehlo();
    let bad: [&[u8]; 6] = [
        b"NO\x00OP",
        b"MAIL FROM:<a\x00b@example.test>",
        b"\xff\xfe\xfd\x80garbage",
        b"NOOP \xc3\x28 invalid utf8",
        b"",
        b"NOOP\rRSET",
    ];
    for line in bad {
        c.cmd_bytes(line).expect(500, "5.5.2");
    }
    c.cmd("NOOP after").expect_raw("250 2.0.0 Ok after\r\n");
    let cmds = up.commands();
    assert_eq!(
        cmds,
        vec![b"EHLO client.test".to_vec(), b"NOOP after".to_vec()],
        "garbage reached the upstream: {}",
        show_lines(&cmds)
    );
}

#[test]
fn binary_junk_gets_replies_and_the_session_goes_on() {
    let up = Upstream::start();
    let g = Guard::start(up.addr, None);
    let mut c = g.client();
    c.ehlo();
    let mut junk: Vec<u8> = pseudo_random(64 * 1024, 99)
        .into_iter()
        .filter(|&b| b != b'\r' && b != b'\n')
        .collect();
    junk.insert(0, b'X');
    junk.extend_from_slice(b"\r\nNOOP after\r\n");
    c.send(&junk);
    let mut seen = Vec::new();
    loop {
        let r = c.read_reply();
        if r.raw == b"250 2.0.0 Ok after\r\n" {
            break;
        }
        assert!(
            r.code >= 500 && r.enhanced().is_some(),
            "junk answered with {r} (after {seen:?})"
        );
        seen.push(r);
        assert!(
            seen.len() <= 3,
            "too many replies to one junk line: {seen:?}"
        );
    }
    assert!(!seen.is_empty(), "the junk line got no reply");
    assert_eq!(
        up.commands(),
        vec![b"EHLO client.test".to_vec(), b"NOOP after".to_vec()]
    );
}

#[test]
fn over_long_line_then_a_message() {
    let up = Upstream::start();
    let g = Guard::start(up.addr, None);
    let mut c = g.client();
    c.ehlo();
    let long = format!("MAIL FROM:<{}@example.test>", "q".repeat(10_000));
    c.cmd(&long).expect_raw("500 5.5.2 Line too long\r\n");
    c.send_message("a@example.test", "b@example.test", b"after\r\n")
        .expect(250, "2.0.0");
    assert_never_forwarded(&up, b"qqqq");
}

/// Sends blocked verbs one by one until the guard gives up; returns how many 500 replies came
/// before the 421.
fn errors_until_421(c: &mut Client, max: usize) -> usize {
    for errors in 0..max {
        let _ = c.try_send(b"VRFY root\r\n");
        let r = c.read_reply();
        if r.code == 421 {
            r.expect(421, "4.7.0");
            c.expect_closed();
            return errors;
        }
        r.expect(500, "5.5.1");
    }
    panic!("no 421 after {max} errors");
}

#[test]
fn hard_error_limit_closes_the_session() {
    let up = Upstream::start();
    let g = Guard::start(up.addr, Some("hard_error_limit = 3\n"));
    let mut c = g.client();
    c.ehlo();
    let n = errors_until_421(&mut c, 10);
    assert!((2..=3).contains(&n), "421 after {n} errors, limit 3");
}

#[test]
fn hard_error_limit_defaults_to_20() {
    let up = Upstream::start();
    let g = Guard::start(up.addr, None);
    let mut c = g.client();
    c.ehlo();
    let n = errors_until_421(&mut c, 40);
    assert!(
        (19..=20).contains(&n),
        "421 after {n} errors, default limit 20"
    );
}

#[test]
fn hard_error_limit_counts_syntax_errors_too() {
    let up = Upstream::start();
    let g = Guard::start(up.addr, Some("hard_error_limit = 4\n"));
    let mut c = g.client();
    c.ehlo();
    let mut got_421 = false;
    for i in 0..8 {
        let _ = c.try_send(b"\x00\x00\r\n");
        match next_reply_or_close(&mut c) {
            Ok(Some(r)) if r.code == 421 => {
                r.expect(421, "4.7.0");
                assert!((3..=4).contains(&i), "421 after {i} errors, limit 4");
                got_421 = true;
                break;
            }
            Ok(Some(r)) => {
                r.expect(500, "5.5.2");
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(
        got_421,
        "no 421 after 8 syntax errors with hard_error_limit = 4"
    );
    c.expect_closed();
}

#[test]
fn a_bad_session_does_not_harm_a_good_one() {
    let up = Upstream::start();
    let g = Guard::start(up.addr, Some("hard_error_limit = 5\n"));
    // The bad one sits in DATA with a partial body.
    let mut bad = g.client();
    bad.ehlo();
    bad.start_data("bad@example.test", "x@example.test");
    bad.send(b"Subject: bad\r\n\r\npartial");
    // Another bad one in a thread: junk, NULs, long lines, errors, a ClientHello.
    let addr = g.addr;
    let noisy = thread::spawn(move || {
        let mut n = Client::connect(addr);
        n.set_timeout(Duration::from_secs(5));
        let _ = n.try_read_reply();
        for i in 0..50u64 {
            let mut junk = pseudo_random(3000, i + 1);
            junk.extend_from_slice(b"\r\n\x00\x00\r\nVRFY x\r\n");
            if n.try_send(&junk).is_err() {
                break;
            }
            thread::sleep(Duration::from_millis(5));
        }
        let _ = n.try_send(&tls_client_hello());
        let _ = n.wait_closed();
    });
    let mut good = g.client();
    good.ehlo();
    let body1 = b"Subject: good 1\r\n\r\nfine\r\n";
    good.send_message("g@example.test", "h@example.test", body1)
        .expect(250, "2.0.0");
    // The bad one now sends garbage inside its DATA, then a 16 KiB binary blob as commands.
    bad.send(&pseudo_random(100_000, 5));
    let _ = bad.try_send(b"\r\n.\r\n");
    let _ = bad.try_send(&pseudo_random(16 * 1024, 6));
    let body2 = "Subject: good 2\r\n\r\nstill fine, ü\r\n".as_bytes();
    good.send_message("g@example.test", "h@example.test", body2)
        .expect(250, "2.0.0");
    good.cmd("QUIT").expect_code(221);
    noisy.join().expect("noisy client thread");
    drop(bad);
    let m = up.wait_messages(2);
    let goods: Vec<&Message> = m
        .iter()
        .filter(|x| x.mail_from == b"MAIL FROM:<g@example.test>")
        .collect();
    assert_eq!(goods.len(), 2, "{m:?}");
    assert_eq!(goods[0].body, body1.to_vec());
    assert_eq!(goods[1].body, body2.to_vec());
    // And the guard still serves new sessions.
    let mut again = g.client();
    again.ehlo();
    again.cmd("QUIT").expect_code(221);
}

#[test]
fn many_sessions_at_once_each_deliver() {
    let up = Upstream::start();
    let g = Guard::start(up.addr, None);
    let addr = g.addr;
    let handles: Vec<_> = (0..8)
        .map(|i| {
            thread::spawn(move || {
                let mut c = Client::greeted(addr);
                c.ehlo();
                for j in 0..3 {
                    let body = format!("Subject: s{i} m{j}\r\n\r\nbody {i} {j}\r\n");
                    c.send_message(
                        &format!("s{i}@example.test"),
                        "r@example.test",
                        body.as_bytes(),
                    )
                    .expect(250, "2.0.0");
                }
                c.cmd("QUIT").expect_code(221);
            })
        })
        .collect();
    for h in handles {
        h.join().expect("session thread");
    }
    let m = up.wait_messages(24);
    assert_eq!(m.len(), 24);
    for i in 0..8 {
        let from = format!("MAIL FROM:<s{i}@example.test>");
        let bodies: Vec<Vec<u8>> = m
            .iter()
            .filter(|x| x.mail_from == from.as_bytes())
            .map(|x| x.body.clone())
            .collect();
        let want: Vec<Vec<u8>> = (0..3)
            .map(|j| format!("Subject: s{i} m{j}\r\n\r\nbody {i} {j}\r\n").into_bytes())
            .collect();
        assert_eq!(bodies, want, "session {i}");
    }
}

#[test]
fn the_guard_survives_clients_that_connect_and_leave() {
    let up = Upstream::start();
    let g = Guard::start(up.addr, None);
    for i in 0..20 {
        let mut c = Client::connect(g.addr);
        match i % 4 {
            0 => {}
            1 => {
                let _ = c.try_send(b"EHL");
            }
            2 => {
                let _ = c.try_read_reply();
                let _ = c.try_send(
                    b"MAIL FROM:<a@example.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\nhalf",
                );
            }
            _ => {
                let _ = c.stream.shutdown(std::net::Shutdown::Write);
            }
        }
    }
    let mut c = g.client();
    c.ehlo();
    c.send_message("a@example.test", "b@example.test", b"survived\r\n")
        .expect(250, "2.0.0");
    let m = up.wait_messages(1);
    assert_eq!(m.len(), 1, "{m:?}");
    assert_eq!(m[0].body, b"survived\r\n");
}
