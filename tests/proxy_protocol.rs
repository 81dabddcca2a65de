//! Ingress PROXY protocol: a real haproxy (`mode tcp`, `send-proxy` / `send-proxy-v2`) in
//! front of mailguard with `proxy_protocol = true`. Clients reach haproxy from their own
//! loopback address (127.0.0.2, 127.0.0.3); mailguard only ever sees haproxy's 127.0.0.1 on
//! the socket, so its session log line and `max_connections_per_ip` can only name the client
//! if they read the header. Without a valid header (direct clients, garbage, silence) the
//! connection is closed without a word of SMTP.
//!
//! haproxy is started by each test with a private config in a temp dir (`haproxy -db -f`)
//! and killed by its PID on drop. `.ci/run` installs it; without it these tests fail.

mod common;

use common::*;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const HAPROXY: &str = "/usr/sbin/haproxy";

/// A private haproxy relaying 127.0.0.1:port to mailguard with a PROXY header.
struct Haproxy {
    child: Child,
    addr: SocketAddr,
    _dir: TempDir,
}

impl Haproxy {
    /// `send` is the server option: `send-proxy` (v1) or `send-proxy-v2`.
    #[track_caller]
    fn start(guard: SocketAddr, send: &str) -> Haproxy {
        assert!(
            std::path::Path::new(HAPROXY).exists(),
            "{HAPROXY} is missing: apt-get install -y haproxy (as .ci/run does)"
        );
        let dir = TempDir::new();
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let cfg = format!(
            "global\n  maxconn 100\n\
             defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n\
             frontend smtp\n  bind {addr}\n  default_backend guard\n\
             backend guard\n  server mailguard {guard} {send}\n"
        );
        let path = dir.write("haproxy.cfg", cfg.as_bytes());
        let log = std::fs::File::create(dir.path.join("haproxy.log")).expect("log file");
        let child = Command::new(HAPROXY)
            .arg("-db")
            .arg("-f")
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn haproxy");
        let mut h = Haproxy {
            child,
            addr,
            _dir: dir,
        };
        let up = wait_for(WAIT, || {
            TcpStream::connect_timeout(&h.addr, Duration::from_millis(200)).is_ok()
        });
        let log = std::fs::read_to_string(h._dir.path.join("haproxy.log")).unwrap_or_default();
        assert!(up, "haproxy did not listen on {addr}: {log}");
        assert!(
            matches!(h.child.try_wait(), Ok(None)),
            "haproxy exited: {log}"
        );
        h
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        // Only the child this test started, by its PID.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// A guard in front of `upstream` reading PROXY headers, with `policy`.
#[track_caller]
fn proxy_guard(upstream: SocketAddr, policy: Option<&str>) -> Guard {
    let listen = format!("127.0.0.1:{}", free_port());
    Guard::spawn(
        &listen,
        &upstream.to_string(),
        policy,
        &["--threads", "1", "--proxy-protocol"],
    )
    .unwrap_or_else(|e| panic!("mailguard did not start: {e}"))
}

/// Waits (bounded) for a session-end line naming `client` (an address with its port).
fn session_logged(guard: &Guard, client: &str) -> bool {
    let needle = format!("client={client} ");
    wait_for(WAIT, || {
        guard
            .stderr()
            .lines()
            .any(|l| l.contains("session ended") && l.contains(&needle))
    })
}

#[track_caller]
fn relay_one_message(c: &mut Client, up: &Upstream) {
    c.ehlo();
    c.send_message(
        "<a@example.org>",
        "<b@example.com>",
        b"Subject: x\r\n\r\nhi\r\n",
    )
    .expect(250, "2.0.0");
    c.cmd("QUIT").expect_code(221);
    assert_eq!(up.wait_messages(1).len(), 1);
}

#[test]
fn haproxy_send_proxy_v1_the_guard_logs_the_real_client() {
    let up = Upstream::start();
    let guard = proxy_guard(up.addr, None);
    let haproxy = Haproxy::start(guard.addr, "send-proxy");
    let mut c = Client::connect_from(ip("127.0.0.2"), haproxy.addr);
    let from = c.stream.local_addr().unwrap();
    c.read_reply().expect_code(220);
    relay_one_message(&mut c, &up);
    drop(c);
    assert!(
        session_logged(&guard, &from.to_string()),
        "no session line for {from}: {}",
        guard.stderr()
    );
}

#[test]
fn haproxy_send_proxy_v2_config_key_and_per_ip_limit_use_the_real_client() {
    let up = Upstream::start();
    let dir = TempDir::new();
    let config = dir.write(
        "mailguard.toml",
        b"proxy_protocol = true\n[policy]\nmax_connections_per_ip = 1\n",
    );
    let listen = format!("127.0.0.1:{}", free_port());
    let guard = Guard::spawn(
        &listen,
        &up.addr.to_string(),
        None,
        &["--threads", "1", "--config", &path_str(&config)],
    )
    .unwrap_or_else(|e| panic!("mailguard did not start: {e}"));
    let haproxy = Haproxy::start(guard.addr, "send-proxy-v2");
    let mut first = Client::connect_from(ip("127.0.0.2"), haproxy.addr);
    first.read_reply().expect_code(220);
    // Every connection reaches the guard from haproxy's 127.0.0.1: only the header tells the
    // second 127.0.0.2 client (over the limit) from the 127.0.0.3 one (not).
    let mut second = Client::connect_from(ip("127.0.0.2"), haproxy.addr);
    second.read_reply().expect(421, "4.7.0");
    let mut other = Client::connect_from(ip("127.0.0.3"), haproxy.addr);
    let from = other.stream.local_addr().unwrap();
    other.read_reply().expect_code(220);
    relay_one_message(&mut other, &up);
    drop(other);
    assert!(
        session_logged(&guard, &from.to_string()),
        "no session line for {from}: {}",
        guard.stderr()
    );
    first.ehlo();
}

#[test]
fn without_a_valid_header_the_connection_is_closed_without_smtp() {
    let up = Upstream::start();
    let metrics = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let guard = Guard::spawn(
        &format!("127.0.0.1:{}", free_port()),
        &up.addr.to_string(),
        Some("greeting_timeout = 1\n"),
        &[
            "--threads",
            "1",
            "--proxy-protocol",
            "--metrics",
            &metrics.to_string(),
        ],
    )
    .unwrap_or_else(|e| panic!("mailguard did not start: {e}"));
    // A direct client speaking SMTP first.
    let mut direct = Client::connect(guard.addr);
    direct.send(b"EHLO client.test\r\n");
    direct.expect_closed();
    // Garbage where the header belongs.
    let mut garbage = Client::connect(guard.addr);
    garbage.send(b"PROXY TCP4 not-an-address 127.0.0.1 1 25\r\n");
    garbage.expect_closed();
    // A v2 signature with an impossible length (over 536 bytes).
    let mut long = Client::connect(guard.addr);
    long.send(b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x04\x00");
    long.expect_closed();
    // Nothing at all: closed when greeting_timeout runs out.
    let mut silent = Client::connect(guard.addr);
    silent.expect_closed();
    let refused = |g: &Guard| g.stderr().matches("PROXY protocol header refused").count();
    assert!(
        wait_for(WAIT, || refused(&guard) >= 4),
        "{}",
        guard.stderr()
    );
    assert!(
        up.conns().is_empty(),
        "no upstream connection for a client without a header"
    );
    let counted = "mailguard_sessions_ended_total{result=\"proxy_header\"} 4";
    let mut page = String::new();
    assert!(
        wait_for(WAIT, || {
            page = scrape_metrics(metrics);
            page.contains(counted)
        }),
        "{page}"
    );
}

#[test]
fn v2_local_command_keeps_the_socket_address() {
    let up = Upstream::start();
    let guard = proxy_guard(up.addr, None);
    // What a balancer's health check sends: LOCAL, no addresses.
    let mut c = Client::connect_from(ip("127.0.0.4"), guard.addr);
    let from = c.stream.local_addr().unwrap();
    c.send(b"\r\n\r\n\0\r\nQUIT\n\x20\x00\x00\x00");
    c.read_reply().expect_code(220);
    relay_one_message(&mut c, &up);
    drop(c);
    assert!(
        session_logged(&guard, &from.to_string()),
        "{}",
        guard.stderr()
    );
}
