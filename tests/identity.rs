//! Egress client identity (`upstream_identity`): the upstream learns the real client's
//! address from a PROXY header (v1, v2) that opens each upstream connection, or from a hidden
//! XCLIENT after mailguard's own EHLO. Checked byte for byte against the recording upstream,
//! and end to end against a real Postfix (`smtpd_upstream_proxy_protocol = haproxy`,
//! `smtpd_authorized_xclient_hosts = 127.0.0.0/8`) whose Received header must name the
//! client's own loopback address (127.0.0.2 or 127.0.0.3), never mailguard's 127.0.0.1.
//! The client must never see a reply of the hidden exchange.

mod common;
mod postfix_common;

use common::*;
use postfix_common::{Postfix, PostfixBuilder};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn identity_policy(mode: &str) -> String {
    format!("upstream_identity = \"{mode}\"\n")
}

/// A whole session from `from` through the guard; every reply is checked in order, so a
/// hidden reply leaking to the client (a second 220, the XCLIENT answer) fails here.
#[track_caller]
fn send_mail_from(from: IpAddr, guard: SocketAddr, sender: &str) {
    let mut c = Client::connect_from(from, guard);
    c.read_reply().expect_code(220);
    let ehlo = c.ehlo();
    assert!(
        !ehlo.text().contains("XCLIENT"),
        "the client is not offered XCLIENT: {ehlo}"
    );
    c.send_message(sender, "rcpt@example.com", b"Subject: id\r\n\r\nhello\r\n")
        .expect_code(250);
    c.cmd("QUIT").expect_code(221);
    c.expect_closed();
}

#[test]
fn proxy_headers_reach_the_upstream_exactly() {
    for (mode, version) in [("proxy-v1", 1), ("proxy-v2", 2)] {
        let up = Upstream::start();
        let guard = Guard::start(up.addr, Some(&identity_policy(mode)));
        let c = Client::connect_from(ip("127.0.0.2"), guard.addr);
        let client = c.stream.local_addr().unwrap();
        let expected = match version {
            1 => format!(
                "PROXY TCP4 127.0.0.2 127.0.0.1 {} {}\r\n",
                client.port(),
                guard.addr.port()
            )
            .into_bytes(),
            _ => {
                let mut h = b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c".to_vec();
                h.extend_from_slice(&[127, 0, 0, 2, 127, 0, 0, 1]);
                h.extend_from_slice(&client.port().to_be_bytes());
                h.extend_from_slice(&guard.addr.port().to_be_bytes());
                h
            }
        };
        let seen = up.wait_until(|conns, _| {
            conns
                .first()
                .is_some_and(|conn| conn.raw.len() >= expected.len())
        });
        let raw = up
            .conns()
            .first()
            .map(|c| c.raw.clone())
            .unwrap_or_default();
        assert!(seen, "{mode}: upstream got {}", show(&raw));
        assert_eq!(
            show(&raw[..expected.len()]),
            show(&expected),
            "{mode}: the header is the first thing on the connection"
        );
        drop(c);
    }
}

#[test]
fn a_wildcard_listener_names_the_address_the_client_chose() {
    let up = Upstream::start();
    let port = free_port();
    let guard = Guard::spawn(
        &format!("0.0.0.0:{port}"),
        &up.addr.to_string(),
        Some(&identity_policy("proxy-v1")),
        &["--threads", "1"],
    )
    .unwrap_or_else(|e| panic!("mailguard did not start: {e}"));
    let c = Client::connect_from(ip("127.0.0.2"), SocketAddr::from(([127, 0, 0, 9], port)));
    let client = c.stream.local_addr().unwrap();
    let expected = format!(
        "PROXY TCP4 127.0.0.2 127.0.0.9 {} {port}\r\n",
        client.port()
    );
    let seen = up.wait_until(|conns, _| {
        conns
            .first()
            .is_some_and(|conn| conn.raw.len() >= expected.len())
    });
    let raw = up
        .conns()
        .first()
        .map(|c| c.raw.clone())
        .unwrap_or_default();
    assert!(seen, "upstream got {}", show(&raw));
    assert_eq!(show(&raw[..expected.len()]), show(expected.as_bytes()));
    drop((c, guard));
}

#[test]
fn xclient_line_reaches_an_upstream_that_offers_it_and_its_reply_stays_hidden() {
    let up = Upstream::start();
    let guard = Guard::start(up.addr, Some(&identity_policy("xclient")));
    send_mail_from(ip("127.0.0.3"), guard.addr, "a@example.org");
    let commands: Vec<String> = up
        .commands()
        .iter()
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect();
    assert_eq!(
        commands.first().map(String::as_str),
        Some("EHLO mailguard"),
        "{commands:?}"
    );
    assert_eq!(
        commands.get(1).map(String::as_str),
        Some("XCLIENT ADDR=127.0.0.3 NAME=[UNAVAILABLE]"),
        "{commands:?}"
    );
    assert_eq!(
        commands.get(2).map(String::as_str),
        Some("EHLO client.test"),
        "{commands:?}"
    );
}

#[test]
fn xclient_not_offered_mail_still_flows_with_a_warning() {
    let opts = UpstreamOptions {
        ehlo_keywords: vec!["PIPELINING".to_string(), "8BITMIME".to_string()],
        ..UpstreamOptions::default()
    };
    let up = Upstream::with(opts);
    let guard = Guard::start(up.addr, Some(&identity_policy("xclient")));
    send_mail_from(ip("127.0.0.2"), guard.addr, "a@example.org");
    assert_eq!(up.wait_messages(1).len(), 1);
    assert!(!up.saw_command_containing(b"XCLIENT"));
    assert!(
        wait_for(WAIT, || guard.stderr().contains("did not accept XCLIENT")),
        "{}",
        guard.stderr()
    );
}

/// The Received line Postfix added to its only queued message.
#[track_caller]
fn received_by(postfix: &Postfix) -> String {
    let q = postfix.wait_queue(1, Duration::from_secs(20));
    assert_eq!(q.len(), 1, "Postfix queued {q:?}; log: {}", postfix.log());
    let message = String::from_utf8_lossy(&postfix.message(&q[0].id)).into_owned();
    message
        .split("\n\n")
        .next()
        .unwrap_or_default()
        .split("\nReceived:")
        .next()
        .unwrap_or_default()
        .replace("\n\t", " ")
        .replace("\n ", " ")
}

#[track_caller]
fn assert_names(received: &str, client: &str, postfix: &Postfix) {
    assert!(
        received.contains(&format!("[{client}]")),
        "Postfix's Received does not name {client}: {received}\nlog: {}",
        postfix.log()
    );
    assert!(
        !received.contains("[127.0.0.1]"),
        "Postfix saw mailguard, not the client: {received}"
    );
}

#[test]
fn postfix_behind_proxy_v1_records_the_real_client() {
    let postfix = PostfixBuilder::new().proxy_protocol().start();
    let guard = Guard::start(postfix.addr(), Some(&identity_policy("proxy-v1")));
    send_mail_from(ip("127.0.0.2"), guard.addr, "v1@example.org");
    assert_names(&received_by(&postfix), "127.0.0.2", &postfix);
}

#[test]
fn postfix_behind_proxy_v2_records_the_real_client() {
    let postfix = PostfixBuilder::new().proxy_protocol().start();
    let guard = Guard::start(postfix.addr(), Some(&identity_policy("proxy-v2")));
    send_mail_from(ip("127.0.0.3"), guard.addr, "v2@example.org");
    assert_names(&received_by(&postfix), "127.0.0.3", &postfix);
}

#[test]
fn postfix_with_xclient_records_the_real_client_and_its_helo() {
    let postfix = PostfixBuilder::new().xclient_hosts("127.0.0.0/8").start();
    let guard = Guard::start(postfix.addr(), Some(&identity_policy("xclient")));
    send_mail_from(ip("127.0.0.2"), guard.addr, "xclient@example.org");
    let received = received_by(&postfix);
    assert_names(&received, "127.0.0.2", &postfix);
    assert!(
        received.contains("from client.test"),
        "the client's own HELO name: {received}"
    );
    assert!(
        !guard.stderr().contains("did not accept XCLIENT"),
        "{}",
        guard.stderr()
    );
}

#[test]
fn postfix_with_xclient_after_an_aborted_message_the_replay_carries_the_identity() {
    let postfix = PostfixBuilder::new().xclient_hosts("127.0.0.0/8").start();
    let policy = format!("{}bare_lf = \"reject\"\n", identity_policy("xclient"));
    let guard = Guard::start(postfix.addr(), Some(&policy));
    let mut c = Client::connect_from(ip("127.0.0.3"), guard.addr);
    c.read_reply().expect_code(220);
    c.ehlo();
    // A bare LF: the guard drops that upstream connection before the end of data and opens a
    // new one, where XCLIENT (now with HELO and PROTO) goes before the EHLO replay.
    c.send_message("bad@example.org", "rcpt@example.com", b"a\nb\r\n")
        .expect(550, "5.6.11");
    c.send_message(
        "good@example.org",
        "rcpt@example.com",
        b"Subject: 2\r\n\r\nok\r\n",
    )
    .expect_code(250);
    c.cmd("QUIT").expect_code(221);
    c.expect_closed();
    let received = received_by(&postfix);
    assert_names(&received, "127.0.0.3", &postfix);
    assert!(received.contains("from client.test"), "{received}");
    assert!(
        !guard.stderr().contains("did not accept XCLIENT"),
        "{}",
        guard.stderr()
    );
}

#[test]
fn upstream_identity_is_reloaded_on_sighup() {
    let up = Upstream::start();
    let guard = Guard::start(up.addr, Some(&identity_policy("none")));
    send_mail_from(ip("127.0.0.2"), guard.addr, "a@example.org");
    assert!(!up.saw_command_containing(b"XCLIENT"));
    let path = guard.policy_path.clone().expect("policy file");
    std::fs::write(&path, identity_policy("xclient")).expect("rewrite policy");
    // SIGHUP to the guard this test started, by its PID.
    let status = std::process::Command::new("kill")
        .arg("-HUP")
        .arg(guard.pid().to_string())
        .status()
        .expect("kill(1)");
    assert!(status.success());
    assert!(
        wait_for(WAIT, || guard.stderr().contains("generation 2 is live")),
        "{}",
        guard.stderr()
    );
    send_mail_from(ip("127.0.0.2"), guard.addr, "b@example.org");
    assert!(up.wait_command(b"XCLIENT ADDR=127.0.0.2 NAME=[UNAVAILABLE]"));
}
