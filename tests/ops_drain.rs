//! Graceful shutdown: SIGTERM/SIGINT stop accepting, let open transactions finish, end the
//! rest with `421 4.3.2`, exit 0; a second signal stops at once; systemd hears about it.

mod ops_common;

use std::io::ErrorKind;
use std::net::TcpStream;
use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use ops_common::*;

const SHUTTING_DOWN: &str = "421 4.3.2 Service shutting down";

/// A client in the middle of a DATA body: greeted, EHLO, MAIL, RCPT, DATA answered 354, and
/// the first half of the body sent.
fn mid_data(addr: std::net::SocketAddr) -> Smtp {
    let mut c = Smtp::greeted(addr);
    c.expect("EHLO mid.test", 250);
    c.expect("MAIL FROM:<a@example.test>", 250);
    c.expect("RCPT TO:<b@example.test>", 250);
    c.expect("DATA", 354);
    c.send(b"Subject: drain\r\n\r\nfirst half\r\n")
        .expect("send");
    c
}

/// Waits (bounded) until a connect to `addr` is refused.
fn refused(addr: std::net::SocketAddr) -> bool {
    wait_for(WAIT, || {
        matches!(
            TcpStream::connect_timeout(&addr, Duration::from_secs(2)),
            Err(e) if e.kind() == ErrorKind::ConnectionRefused
        )
    })
}

#[test]
fn sigterm_lets_a_message_in_flight_finish_and_closes_idle_sessions() {
    let sink = Sink::start();
    let (addr, args) = base_args(sink.addr, &["--drain-timeout", "30"]);
    let mut p = Proc::start(addr, &args, &[]);
    let mut sending = mid_data(addr);
    let mut idle = Smtp::greeted(addr);
    idle.expect("EHLO idle.test", 250);
    p.signal("TERM");
    // The idle session is told at once and closed.
    let bye = idle.reply().expect("a reply to the idle client");
    assert_eq!(bye.text(), SHUTTING_DOWN);
    assert!(idle.read_to_close().expect("closed").is_empty());
    // Nobody new gets in.
    assert!(refused(addr), "the listener still accepts after SIGTERM");
    // The message in flight completes and is delivered; then that session ends too.
    sending.send(b"second half\r\n.\r\n").expect("send");
    let done = sending.reply().expect("end-of-data reply");
    assert_eq!(done.code, 250, "{done:?}");
    let bye = sending.reply().expect("421 after the transaction");
    assert_eq!(bye.text(), SHUTTING_DOWN);
    assert_eq!(
        sink.messages(),
        vec![b"Subject: drain\r\n\r\nfirst half\r\nsecond half\r\n".to_vec()]
    );
    let status = p.wait_exit(WAIT).expect("exited after the drain");
    assert!(status.success(), "{status}; log: {}", p.log());
    assert_eq!(p.log_lines("draining").len(), 1, "{}", p.log());
    assert!(p.log().contains("result=shutdown"), "{}", p.log());
}

#[test]
fn drain_timeout_ends_open_transactions_without_delivering() {
    let sink = Sink::start();
    let (addr, args) = base_args(sink.addr, &["--drain-timeout", "1"]);
    let mut p = Proc::start(addr, &args, &[]);
    let mut stuck = mid_data(addr);
    let mut in_transaction = Smtp::greeted(addr);
    in_transaction.expect("EHLO txn.test", 250);
    in_transaction.expect("MAIL FROM:<c@example.test>", 250);
    p.signal("INT");
    for c in [&mut stuck, &mut in_transaction] {
        let bye = c.reply().expect("a reply at the drain deadline");
        assert_eq!(bye.text(), SHUTTING_DOWN);
        assert!(c.read_to_close().expect("closed").is_empty());
    }
    assert_eq!(sink.message_count(), 0, "a half-sent message was delivered");
    let status = p.wait_exit(WAIT).expect("exited after the deadline");
    assert!(status.success(), "{status}");
}

#[test]
fn a_second_sigint_stops_at_once() {
    let sink = Sink::start();
    let (addr, args) = base_args(sink.addr, &["--drain-timeout", "600"]);
    let mut p = Proc::start(addr, &args, &[]);
    let mut stuck = mid_data(addr);
    p.signal("INT");
    assert!(p.wait_log("draining", 1), "{}", p.log());
    p.signal("INT");
    let status = p.wait_exit(WAIT).expect("exited at the second SIGINT");
    assert!(status.success(), "{status}");
    // The client is cut off without a 250, and nothing was delivered.
    let rest = stuck.read_to_close().unwrap_or_default();
    assert!(!rest.contains("250"), "{rest:?}");
    assert_eq!(sink.message_count(), 0);
}

#[test]
fn systemd_is_told_ready_reloading_and_stopping() {
    let sink = Sink::start();
    let dir = Dir::new();
    let socket_path = dir.path.join("notify.sock");
    let notify = UnixDatagram::bind(&socket_path).expect("bind notify socket");
    notify.set_read_timeout(Some(WAIT)).expect("read timeout");
    let (addr, args) = base_args(sink.addr, &[]);
    let p = Proc::start(addr, &args, &[("NOTIFY_SOCKET", arg(&socket_path))]);
    let mut buf = [0u8; 256];
    let mut next = || {
        let n = notify.recv(&mut buf).expect("a notification");
        String::from_utf8_lossy(&buf[..n]).to_string()
    };
    assert_eq!(next(), "READY=1");
    p.signal("HUP");
    let reloading = next();
    let usec = reloading
        .strip_prefix("RELOADING=1\nMONOTONIC_USEC=")
        .unwrap_or_else(|| panic!("{reloading:?}"));
    assert!(usec.parse::<u64>().is_ok_and(|u| u > 0), "{reloading:?}");
    assert_eq!(next(), "READY=1");
    p.signal("TERM");
    assert_eq!(next(), "STOPPING=1");
}
