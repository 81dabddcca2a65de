//! Slow and idle clients: `command_timeout`, `data_timeout` and `min_data_rate` close a
//! slowloris with `421 4.4.2`, and it costs nothing else: another session works meanwhile, and
//! the guard's file descriptors come back.
//!
//! The ring checks deadlines once per second, so every wait allows the timeout plus a few
//! seconds; nothing asserts how long anything took.

mod common;

use common::*;
use std::thread;
use std::time::{Duration, Instant};

/// Longest a 1-3 s timeout may take to fire: the timeout, the 1 s sweep, and slack.
const FIRE: Duration = Duration::from_secs(8);

/// A whole message through `g`, answered 250.
#[track_caller]
fn deliver_one(g: &Guard, tag: &str) {
    let mut c = g.client();
    c.ehlo();
    let body = format!("Subject: {tag}\r\n\r\n{tag}\r\n");
    c.send_message("ok@example.test", "r@example.test", body.as_bytes())
        .expect(250, "2.0.0");
    c.cmd("QUIT").expect_code(221);
}

/// Reads until the guard's 421 4.4.2 and the close (bounded by [`FIRE`]).
#[track_caller]
fn expect_timeout_close(c: &mut Client, what: &str) {
    c.set_timeout(FIRE);
    match c.try_read_reply() {
        Ok(r) => {
            assert!(
                r.code == 421 && r.enhanced() == Some("4.4.2"),
                "{what}: expected 421 4.4.2, got {r}"
            );
            assert!(r.text().contains("Timeout"), "{what}: {r}");
        }
        Err(e) => panic!("{what}: no 421 4.4.2 within {FIRE:?}: {e:?}"),
    }
    c.expect_closed();
}

/// Sends `bytes` one byte per `gap` until the guard closes the connection or `limit` passed.
/// Returns whether the connection was closed (and what it said first).
fn trickle(c: &mut Client, bytes: &[u8], gap: Duration, limit: Duration) -> Option<Vec<u8>> {
    let deadline = Instant::now() + limit;
    c.stream
        .set_read_timeout(Some(Duration::from_millis(1)))
        .unwrap();
    let mut got = Vec::new();
    for &b in bytes.iter().cycle() {
        if Instant::now() >= deadline {
            return None;
        }
        let mut buf = [0u8; 512];
        match std::io::Read::read(&mut c.stream, &mut buf) {
            Ok(0) => return Some(got),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Some(got),
            Err(_) => {}
        }
        if c.try_send(&[b]).is_err() {
            return Some(got);
        }
        thread::sleep(gap);
    }
    None
}

#[test]
fn idle_client_after_the_banner_gets_421_4_4_2_and_others_are_served() {
    let up = Upstream::start();
    let g = Guard::start(up.addr, Some("command_timeout = 2\n"));
    let base = g.fd_count();
    let mut idle = g.client();
    let mut idle_ehlo = g.client();
    idle_ehlo.ehlo();
    deliver_one(&g, "meanwhile");
    expect_timeout_close(&mut idle, "idle after the banner");
    expect_timeout_close(&mut idle_ehlo, "idle after EHLO");
    assert!(
        g.wait_fd_count_at_most(base, WAIT) <= base,
        "fds not released"
    );
    assert_eq!(up.messages().len(), 1);
}

#[test]
fn idle_client_in_data_gets_421_4_4_2_and_nothing_is_delivered() {
    let up = Upstream::start();
    let g = Guard::start(up.addr, Some("data_timeout = 2\n"));
    let mut c = g.client();
    c.ehlo();
    c.start_data("slow@example.test", "r@example.test");
    c.send(b"Subject: idle\r\n\r\nhalf a body");
    deliver_one(&g, "meanwhile");
    expect_timeout_close(&mut c, "idle in DATA");
    assert!(up.wait_all_closed());
    let m = up.messages();
    assert!(
        m.iter()
            .all(|m| m.mail_from != b"MAIL FROM:<slow@example.test>"),
        "{m:?}"
    );
}

/// 1 byte every 0.4 s keeps resetting `data_timeout` (2 s), so only `min_data_rate` can end
/// it: at 100 bytes/s the phase may last 2 s plus a few hundredths.
#[test]
fn trickling_data_is_closed_by_min_data_rate() {
    let up = Upstream::start();
    let g = Guard::start(up.addr, Some("data_timeout = 2\nmin_data_rate = 100\n"));
    let mut c = g.client();
    c.ehlo();
    c.start_data("trickle@example.test", "r@example.test");
    let addr = g.addr;
    let other = thread::spawn(move || {
        let mut o = Client::greeted(addr);
        o.ehlo();
        o.send_message("ok@example.test", "r@example.test", b"meanwhile\r\n")
            .expect(250, "2.0.0");
    });
    let closed = trickle(&mut c, b"x", Duration::from_millis(400), FIRE + FIRE);
    other.join().expect("the other session");
    let said = closed.expect("a 1 byte per 0.4 s DATA phase was never closed");
    assert_eq!(
        String::from_utf8_lossy(&said),
        "421 4.4.2 Timeout, closing connection\r\n"
    );
    let m = up.wait_messages(1);
    assert_eq!(m.len(), 1, "{m:?}");
}

/// The control: with `min_data_rate = 0` the same trickle lives on (each byte resets
/// `data_timeout`), and its message is delivered when it finally ends.
#[test]
fn trickling_data_lives_on_with_min_data_rate_off() {
    let up = Upstream::start();
    let g = Guard::start(up.addr, Some("data_timeout = 2\nmin_data_rate = 0\n"));
    let mut c = g.client();
    c.ehlo();
    c.start_data("trickle@example.test", "r@example.test");
    let closed = trickle(
        &mut c,
        b"x",
        Duration::from_millis(400),
        Duration::from_secs(5),
    );
    assert!(
        closed.is_none(),
        "closed although min_data_rate is off: {closed:?}"
    );
    c.set_timeout(WAIT);
    c.send(b"\r\n.\r\n");
    c.read_reply().expect(250, "2.0.0");
}

#[test]
fn trickling_a_bdat_chunk_is_closed_by_min_data_rate() {
    let up = Upstream::start();
    let g = Guard::start(up.addr, Some("data_timeout = 2\nmin_data_rate = 100\n"));
    let base = g.fd_count();
    let mut c = g.client();
    c.ehlo();
    c.cmd("MAIL FROM:<trickle@example.test>").expect_code(250);
    c.cmd("RCPT TO:<r@example.test>").expect_code(250);
    c.send(b"BDAT 100000 LAST\r\n");
    let closed = trickle(&mut c, b"y", Duration::from_millis(400), FIRE + FIRE);
    let said = closed.expect("a trickled BDAT chunk was never closed");
    assert!(
        said.starts_with(b"421 4.4.2"),
        "expected 421 4.4.2, got {}",
        show(&said)
    );
    deliver_one(&g, "after");
    assert!(up.messages().iter().all(|m| m.via != Via::Bdat));
    assert!(g.wait_fd_count_at_most(base, WAIT) <= base);
}

/// Many slowloris sessions at once (idle and trickling) while a steady stream of messages
/// flows: every message is delivered, every slowloris is closed, the fds come back.
#[test]
fn a_crowd_of_slowloris_costs_nothing_else() {
    let up = Upstream::start();
    let g = Guard::start(
        up.addr,
        Some("command_timeout = 2\ndata_timeout = 2\nmin_data_rate = 100\n"),
    );
    let base = g.fd_count();
    let addr = g.addr;
    let lorises: Vec<_> = (0..20)
        .map(|i| {
            thread::spawn(move || {
                let mut c = Client::greeted(addr);
                if i % 2 == 0 {
                    expect_timeout_close(&mut c, "idle");
                } else {
                    c.ehlo();
                    c.start_data("slow@example.test", "r@example.test");
                    let closed = trickle(&mut c, b"z", Duration::from_millis(300), FIRE + FIRE);
                    assert!(closed.is_some(), "trickler {i} never closed");
                }
            })
        })
        .collect();
    for i in 0..10 {
        deliver_one(&g, &format!("steady {i}"));
    }
    for l in lorises {
        l.join().expect("slowloris thread");
    }
    let m = up.messages();
    assert_eq!(m.len(), 10, "{m:?}");
    let left = g.wait_fd_count_at_most(base, WAIT);
    assert!(left <= base, "{left} fds left, {base} idle");
}
