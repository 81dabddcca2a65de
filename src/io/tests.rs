//! End-to-end tests of the ring with a pass-through session, over real loopback sockets.
//!
//! Owns only test helpers: a minimal [`Proxy`], std-thread upstream servers and clients. Every
//! socket is on 127.0.0.1 with an ephemeral port; every wait is bounded by a read timeout or a
//! deadline, and every load loop by a count. No assertion depends on timing.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use super::{bind, serve, RingConfig, Server, WorkerStats};
use crate::relay::{Action, Chunk, Proxy, ProxyFactory, Side};

const IO_TIMEOUT: Duration = Duration::from_secs(30);
const WAIT_LIMIT: Duration = Duration::from_secs(20);

/// Forwards bytes both ways; closes when either side closes. With `reconnect_on` set, that
/// byte from the client makes it drop the upstream and connect a fresh one (to exercise epochs).
/// A `B` from the client makes it busy (it ignores a gentle shutdown), a `Q` quiet again.
struct Pass {
    failed: Arc<AtomicUsize>,
    deadline: Option<Instant>,
    reconnect_on: Option<u8>,
    busy: bool,
}

impl Proxy for Pass {
    fn start(&mut self, _now: Instant, out: &mut Vec<Action>) {
        out.push(Action::Connect);
    }

    fn on_client(&mut self, data: &[u8], _now: Instant, out: &mut Vec<Action>) {
        match data.iter().rev().find(|&&b| b == b'B' || b == b'Q') {
            Some(b'B') => self.busy = true,
            Some(_) => self.busy = false,
            None => {}
        }
        if self.reconnect_on.is_some_and(|b| data.contains(&b)) {
            out.push(Action::CloseUpstream);
            out.push(Action::Connect);
        }
        out.push(Action::Send(Side::Upstream, Chunk::Input(0..data.len())));
    }

    fn on_upstream(&mut self, data: &[u8], _now: Instant, out: &mut Vec<Action>) {
        out.push(Action::Send(Side::Client, Chunk::Input(0..data.len())));
    }

    fn on_upstream_connected(&mut self, _now: Instant, _out: &mut Vec<Action>) {}

    fn on_upstream_failed(&mut self, _now: Instant, out: &mut Vec<Action>) {
        self.failed.fetch_add(1, Ordering::SeqCst);
        out.push(Action::Send(
            Side::Client,
            Chunk::Static(b"ERR upstream\r\n"),
        ));
        out.push(Action::Close);
    }

    fn on_client_closed(&mut self, _now: Instant, out: &mut Vec<Action>) {
        out.push(Action::Close);
    }

    fn on_upstream_closed(&mut self, _now: Instant, out: &mut Vec<Action>) {
        out.push(Action::Close);
    }

    fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    fn on_timeout(&mut self, _now: Instant, out: &mut Vec<Action>) {
        out.push(Action::Send(
            Side::Client,
            Chunk::Owned(b"timeout\r\n".to_vec()),
        ));
        out.push(Action::Close);
    }

    fn on_shutdown(&mut self, force: bool, _now: Instant, out: &mut Vec<Action>) {
        if force || !self.busy {
            let word: &'static [u8] = if force { b"forced\r\n" } else { b"bye\r\n" };
            out.push(Action::Send(Side::Client, Chunk::Static(word)));
            out.push(Action::Close);
        }
    }
}

#[derive(Clone, Default)]
struct Options {
    idle_limit: Option<Duration>,
    reconnect_on: Option<u8>,
}

struct PassFactory {
    failed: Arc<AtomicUsize>,
    options: Options,
    ended: Arc<AtomicUsize>,
    ended_here: usize,
}

impl ProxyFactory for PassFactory {
    type Session = Pass;

    fn new_session(&mut self, peer: SocketAddr, _local: SocketAddr, now: Instant) -> Pass {
        assert!(peer.ip().is_loopback());
        Pass {
            failed: Arc::clone(&self.failed),
            deadline: self.options.idle_limit.map(|d| now + d),
            reconnect_on: self.options.reconnect_on,
            busy: false,
        }
    }

    fn session_ended(&mut self, _session: &Pass, _now: Instant) {
        self.ended_here += 1;
    }

    fn publish(&mut self) {
        self.ended.fetch_add(self.ended_here, Ordering::SeqCst);
        self.ended_here = 0;
    }
}

struct Proxied {
    server: Option<Server>,
    addr: SocketAddr,
    failed: Arc<AtomicUsize>,
    /// Sessions the factories reported ended (as of their last publication).
    ended: Arc<AtomicUsize>,
}

impl Proxied {
    fn start(upstream: SocketAddr, tune: impl FnOnce(&mut RingConfig)) -> Proxied {
        Proxied::start_with(upstream, Options::default(), tune)
    }

    fn start_with(
        upstream: SocketAddr,
        options: Options,
        tune: impl FnOnce(&mut RingConfig),
    ) -> Proxied {
        let listener = bind(loopback()).expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut cfg = RingConfig::new(2, upstream);
        cfg.ring_entries = 256;
        cfg.buf_count = 128;
        tune(&mut cfg);
        let failed = Arc::new(AtomicUsize::new(0));
        let ended = Arc::new(AtomicUsize::new(0));
        let (shared, ended_shared) = (Arc::clone(&failed), Arc::clone(&ended));
        let server = serve(listener, cfg, move |_| PassFactory {
            failed: Arc::clone(&shared),
            options: options.clone(),
            ended: Arc::clone(&ended_shared),
            ended_here: 0,
        })
        .expect("serve");
        Proxied {
            server: Some(server),
            addr,
            failed,
            ended,
        }
    }

    fn connect(&self) -> TcpStream {
        let stream = TcpStream::connect(self.addr).expect("connect to proxy");
        stream.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
        stream.set_write_timeout(Some(IO_TIMEOUT)).expect("timeout");
        stream
    }

    fn total(&self) -> WorkerStats {
        let mut total = WorkerStats::default();
        for worker in self.server.as_ref().expect("running").stats() {
            total.add(&worker);
        }
        total
    }

    /// Waits (bounded) until the published stats satisfy `cond`; returns the last totals.
    fn wait_stats(&self, cond: impl Fn(&WorkerStats) -> bool) -> WorkerStats {
        let end = Instant::now() + WAIT_LIMIT;
        loop {
            let total = self.total();
            if cond(&total) || Instant::now() >= end {
                return total;
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    fn drain(&self, timeout: Duration) {
        assert!(self.server.as_ref().expect("running").drain(timeout));
    }

    /// Waits for the workers to return by themselves (after a drain).
    fn join(mut self) {
        let server = self.server.take().expect("running");
        server.join().expect("workers end cleanly");
    }

    fn shutdown(mut self) {
        let server = self.server.take().expect("running");
        server.stop();
        server.join().expect("workers end cleanly");
    }
}

fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// Deterministic bytes that differ per stream, so reordering or mixing is caught.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Accepts `conns` connections and runs `handle` on each in its own thread.
fn upstream<H>(conns: usize, handle: H) -> (SocketAddr, thread::JoinHandle<()>)
where
    H: Fn(TcpStream) + Send + Sync + 'static,
{
    let listener = TcpListener::bind(loopback()).expect("upstream bind");
    let addr = listener.local_addr().expect("addr");
    let handle = Arc::new(handle);
    let acceptor = thread::spawn(move || {
        let mut workers = Vec::new();
        for _ in 0..conns {
            let Ok((stream, _)) = listener.accept() else {
                break;
            };
            stream.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
            stream.set_write_timeout(Some(IO_TIMEOUT)).expect("timeout");
            let handle = Arc::clone(&handle);
            workers.push(thread::spawn(move || handle(stream)));
        }
        for w in workers {
            let _ = w.join();
        }
    });
    (addr, acceptor)
}

fn echo(mut stream: TcpStream) {
    let mut buf = vec![0; 64 * 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if stream.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
}

fn drain_until_eof(stream: &mut TcpStream) -> usize {
    let mut buf = [0; 4096];
    let mut total = 0;
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return total,
            Ok(n) => total += n,
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return total,
            Err(e) => panic!("waiting for EOF: {e}"),
        }
    }
}

fn read_exact_checked(stream: &mut TcpStream, expected: &[u8], chunk: usize, pause: Duration) {
    let mut got = vec![0; chunk];
    let mut at = 0;
    while at < expected.len() {
        let want = chunk.min(expected.len() - at);
        let n = stream.read(&mut got[..want]).expect("read");
        assert!(n > 0, "EOF after {at} of {} bytes", expected.len());
        assert_eq!(
            &got[..n],
            &expected[at..at + n],
            "bytes differ at offset {at}"
        );
        at += n;
        if !pause.is_zero() {
            thread::sleep(pause);
        }
    }
}

/// `sessions` concurrent clients each send `size` bytes through the proxy to an echo upstream
/// and check they come back intact; returns the proxy's stats once every slot is free.
fn echo_sessions(sessions: usize, size: usize, tune: impl FnOnce(&mut RingConfig)) -> WorkerStats {
    let (up, up_thread) = upstream(sessions, echo);
    let proxy = Proxied::start(up, tune);
    thread::scope(|scope| {
        for i in 0..sessions {
            let proxy = &proxy;
            scope.spawn(move || {
                let data = pattern(i as u64 + 1, size);
                let mut stream = proxy.connect();
                let mut writer = stream.try_clone().expect("clone");
                let sent = data.clone();
                let w = thread::spawn(move || writer.write_all(&sent).expect("write"));
                read_exact_checked(&mut stream, &data, 16 * 1024, Duration::ZERO);
                w.join().expect("writer");
            });
        }
    });
    let total = sessions as u64;
    let stats = proxy.wait_stats(|s| s.sessions_open == 0 && s.sessions_total == total);
    assert_eq!((stats.sessions_total, stats.sessions_open), (total, 0));
    assert_eq!(proxy.failed.load(Ordering::SeqCst), 0);
    proxy.shutdown();
    up_thread.join().expect("upstream");
    stats
}

#[test]
fn many_sessions_carry_bytes_in_order_both_ways() {
    echo_sessions(200, 100 * 1024, |_| {});
}

#[test]
fn exhausted_buffer_ring_slows_readers_without_failing_sessions() {
    let stats = echo_sessions(40, 64 * 1024, |cfg| {
        cfg.buf_count = 4;
        cfg.buf_size = 1024;
    });
    eprintln!("tiny buffer ring: {stats:?}");
}

#[test]
fn slow_client_gets_4mib_in_order_under_backpressure() {
    const SIZE: usize = 4 << 20;
    let data = Arc::new(pattern(77, SIZE));
    let source = Arc::clone(&data);
    let (up, up_thread) = upstream(1, move |mut stream| {
        stream.write_all(&source).expect("upstream write");
        // Closing makes the session Close, which must still flush everything to the client.
    });
    let proxy = Proxied::start(up, |cfg| {
        cfg.high_water = 64 * 1024;
        cfg.low_water = 16 * 1024;
    });
    let mut client = proxy.connect();
    client.set_recv_buffer_size_for_test(64 * 1024);
    read_exact_checked(&mut client, &data, 16 * 1024, Duration::from_millis(1));
    assert_eq!(drain_until_eof(&mut client), 0);
    let stats = proxy.wait_stats(|s| s.sessions_total == 1 && s.sessions_open == 0);
    assert_eq!((stats.sessions_total, stats.sessions_open), (1, 0));
    assert!(
        stats.recv_throttled > 0,
        "backpressure never engaged: {stats:?}"
    );
    proxy.shutdown();
    up_thread.join().expect("upstream");
}

#[test]
fn slow_upstream_gets_4mib_in_order_under_backpressure() {
    const SIZE: usize = 4 << 20;
    let data = Arc::new(pattern(78, SIZE));
    let expected = Arc::clone(&data);
    let (up, up_thread) = upstream(1, move |mut stream| {
        stream.set_recv_buffer_size_for_test(64 * 1024);
        read_exact_checked(&mut stream, &expected, 16 * 1024, Duration::from_millis(1));
        let _ = stream.shutdown(Shutdown::Both);
    });
    let proxy = Proxied::start(up, |cfg| {
        cfg.high_water = 64 * 1024;
        cfg.low_water = 16 * 1024;
    });
    let mut client = proxy.connect();
    client.write_all(&data).expect("client write");
    assert_eq!(drain_until_eof(&mut client), 0);
    let stats = proxy.wait_stats(|s| s.sessions_total == 1 && s.sessions_open == 0);
    assert_eq!((stats.sessions_total, stats.sessions_open), (1, 0));
    assert!(
        stats.recv_throttled > 0,
        "backpressure never engaged: {stats:?}"
    );
    proxy.shutdown();
    up_thread.join().expect("upstream");
}

#[test]
fn refused_upstream_reports_failure() {
    let refused = {
        let probe = TcpListener::bind(loopback()).expect("bind");
        probe.local_addr().expect("addr")
    };
    let proxy = Proxied::start(refused, |_| {});
    for _ in 0..3 {
        let mut client = proxy.connect();
        let mut reply = Vec::new();
        client.read_to_end(&mut reply).expect("read");
        assert_eq!(reply, b"ERR upstream\r\n");
    }
    assert_eq!(proxy.failed.load(Ordering::SeqCst), 3);
    let stats = proxy.wait_stats(|s| s.upstream_connect_failures == 3 && s.sessions_open == 0);
    assert_eq!(stats.upstream_connect_failures, 3);
    assert_eq!(stats.sessions_open, 0);
    proxy.shutdown();
}

#[test]
fn client_closing_early_releases_the_slot() {
    const CLIENTS: usize = 20;
    let (up, up_thread) = upstream(CLIENTS, |mut stream| {
        // Reads (never answers) until the proxy tears the upstream down.
        let _ = drain_until_eof(&mut stream);
    });
    let proxy = Proxied::start(up, |_| {});
    for i in 0..CLIENTS {
        let mut client = proxy.connect();
        client.write_all(&pattern(i as u64, 1000)).expect("write");
        drop(client);
    }
    let stats = proxy.wait_stats(|s| s.sessions_total == CLIENTS as u64 && s.sessions_open == 0);
    assert_eq!(stats.sessions_total, CLIENTS as u64);
    assert_eq!(stats.sessions_open, 0);
    proxy.shutdown();
    up_thread.join().expect("upstream");
}

#[test]
fn reconnecting_upstream_keeps_the_session_working() {
    const ROUNDS: usize = 20;
    let (up, up_thread) = upstream(ROUNDS + 1, echo);
    let options = Options {
        reconnect_on: Some(b'!'),
        ..Options::default()
    };
    let proxy = Proxied::start_with(up, options, |_| {});
    let mut client = proxy.connect();
    for round in 0..ROUNDS {
        let msg = format!("round {round}!");
        client.write_all(msg.as_bytes()).expect("write");
        read_exact_checked(&mut client, msg.as_bytes(), 64, Duration::ZERO);
    }
    drop(client);
    let stats = proxy.wait_stats(|s| s.sessions_total == 1 && s.sessions_open == 0);
    assert_eq!((stats.sessions_total, stats.sessions_open), (1, 0));
    proxy.shutdown();
    // The upstream saw one connection per round plus the first: all of them ended.
    up_thread.join().expect("upstream");
}

#[test]
fn session_deadline_fires() {
    let (up, up_thread) = upstream(1, |mut stream| {
        let _ = drain_until_eof(&mut stream);
    });
    let options = Options {
        idle_limit: Some(Duration::from_millis(100)),
        ..Options::default()
    };
    let proxy = Proxied::start_with(up, options, |_| {});
    let mut client = proxy.connect();
    let mut reply = Vec::new();
    client.read_to_end(&mut reply).expect("read");
    assert_eq!(reply, b"timeout\r\n");
    proxy.shutdown();
    up_thread.join().expect("upstream");
}

#[test]
fn stop_ends_sessions_and_join_returns() {
    const CLIENTS: usize = 10;
    let (up, up_thread) = upstream(CLIENTS, |mut stream| {
        let _ = drain_until_eof(&mut stream);
    });
    let proxy = Proxied::start(up, |_| {});
    let mut clients: Vec<TcpStream> = (0..CLIENTS).map(|_| proxy.connect()).collect();
    let stats = proxy.wait_stats(|s| s.sessions_open == CLIENTS as u64);
    assert_eq!(stats.sessions_open, CLIENTS as u64);
    proxy.shutdown();
    for client in &mut clients {
        assert_eq!(drain_until_eof(client), 0);
    }
    up_thread.join().expect("upstream");
}

#[test]
fn port_in_use_is_a_clean_error() {
    let first = bind(loopback()).expect("bind");
    let addr = first.local_addr().expect("addr");
    let err = bind(addr).expect_err("second bind must fail");
    assert_eq!(
        err.to_string(),
        format!("cannot listen on {addr}: address already in use")
    );
}

/// Small receive buffers make the kernel hold little, so the proxy's own queue fills up.
trait SmallRecvBuffer {
    fn set_recv_buffer_size_for_test(&self, size: usize);
}

impl SmallRecvBuffer for TcpStream {
    fn set_recv_buffer_size_for_test(&self, size: usize) {
        socket2::SockRef::from(self)
            .set_recv_buffer_size(size)
            .expect("SO_RCVBUF");
    }
}

/// Sends `b` and reads it back through the echo upstream.
fn echo_round(stream: &mut TcpStream, b: &[u8]) {
    stream.write_all(b).expect("write");
    let mut got = vec![0; b.len()];
    stream.read_exact(&mut got).expect("echo");
    assert_eq!(got, b);
}

fn read_until_eof(stream: &mut TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    match stream.read_to_end(&mut got) {
        Ok(_) => got,
        Err(e) if e.kind() == ErrorKind::ConnectionReset => got,
        Err(e) => panic!("waiting for EOF after {got:?}: {e}"),
    }
}

#[test]
fn drain_refuses_new_connections_and_waits_for_busy_sessions() {
    let (up, up_thread) = upstream(2, echo);
    let proxy = Proxied::start(up, |_| {});
    let mut idle = proxy.connect();
    let mut busy = proxy.connect();
    echo_round(&mut idle, b"x");
    echo_round(&mut busy, b"B");
    proxy.drain(Duration::from_secs(60));
    assert_eq!(read_until_eof(&mut idle), b"bye\r\n");
    let refused = TcpStream::connect(proxy.addr)
        .map(|_| ())
        .map_err(|e| e.kind());
    assert_eq!(refused, Err(ErrorKind::ConnectionRefused));
    // The busy session still works, and once quiet it is ended by the next tick's request.
    echo_round(&mut busy, b"more");
    echo_round(&mut busy, b"Q");
    assert_eq!(read_until_eof(&mut busy), b"bye\r\n");
    let ended = Arc::clone(&proxy.ended);
    proxy.join();
    assert_eq!(
        ended.load(Ordering::SeqCst),
        2,
        "every session reported ended"
    );
    up_thread.join().expect("upstream");
}

#[test]
fn drain_forces_sessions_still_busy_at_the_deadline() {
    let (up, up_thread) = upstream(1, echo);
    let proxy = Proxied::start(up, |_| {});
    let mut busy = proxy.connect();
    echo_round(&mut busy, b"B");
    proxy.drain(Duration::from_millis(200));
    assert_eq!(read_until_eof(&mut busy), b"forced\r\n");
    proxy.join();
    up_thread.join().expect("upstream");
}

#[test]
fn stats_count_bytes_and_connect_latency() {
    let (up, up_thread) = upstream(1, echo);
    let proxy = Proxied::start(up, |_| {});
    let mut client = proxy.connect();
    echo_round(&mut client, b"hello");
    let stats = proxy.wait_stats(|s| s.upstream_bytes_sent >= 5 && s.client_bytes_sent >= 5);
    assert_eq!(stats.client_bytes_received, 5);
    assert_eq!(stats.upstream_bytes_sent, 5);
    assert_eq!(stats.upstream_bytes_received, 5);
    assert_eq!(stats.client_bytes_sent, 5);
    assert_eq!(stats.upstream_connects, 1);
    assert_eq!(stats.connect_latency.count(), 1);
    assert!(stats.buffers_total > 0 && stats.buffers_free <= stats.buffers_total);
    drop(client);
    proxy.shutdown();
    up_thread.join().expect("upstream");
}
