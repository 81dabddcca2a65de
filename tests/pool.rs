//! Several upstreams (`upstream = [...]`, `--upstream` repeated): round robin spreads sessions,
//! least-sessions prefers the idle backend, a backend that refuses is skipped without the
//! client noticing and is marked down, a backend killed mid-run loses no acknowledged message,
//! and the active check (banner, EHLO, QUIT) takes a backend that greets with 554 out of
//! rotation, having sent QUIT.
//!
//! The backends are recording upstreams on loopback; `/metrics` is read with curl.

mod common;
mod ops_common;

use common::*;
use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// A guard in front of `backends` (flags, in order) with `config` (config-file text) and
/// metrics on a free port; returns it and the metrics address.
#[track_caller]
fn guard(backends: &[SocketAddr], config: &str) -> (Guard, SocketAddr) {
    let dir = TempDir::new();
    let config_path = dir.write("mailguard.toml", config.as_bytes());
    let metrics = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let listen = format!("127.0.0.1:{}", free_port());
    let mut extra: Vec<String> = vec!["--threads".into(), "2".into()];
    for b in &backends[1..] {
        extra.extend(["--upstream".to_string(), b.to_string()]);
    }
    extra.extend([
        "--config".to_string(),
        path_str(&config_path),
        "--metrics".to_string(),
        metrics.to_string(),
    ]);
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let g = Guard::spawn(&listen, &backends[0].to_string(), None, &extra)
        .unwrap_or_else(|e| panic!("mailguard did not start: {e}"));
    // The guard read its config at start; a reload is not part of these tests.
    drop(dir);
    (g, metrics)
}

/// The value of one sample of `/metrics`, if present.
fn metric(metrics: SocketAddr, series: &str) -> Option<f64> {
    metric_value(&scrape_metrics(metrics), series)
}

/// `mailguard_upstream_backend_up` of `backend`.
fn backend_up(metrics: SocketAddr, backend: SocketAddr) -> Option<f64> {
    metric(
        metrics,
        &format!("mailguard_upstream_backend_up{{backend=\"{backend}\"}}"),
    )
}

/// One whole session through the guard: greeting, EHLO, one message, QUIT (panics on any
/// unexpected reply).
#[track_caller]
fn one_message(guard: &Guard, from: &str) {
    let mut c = guard.client();
    c.ehlo().expect_code(250);
    c.send_message(from, "rcpt@example.test", b"Subject: pool\r\n\r\nhello\r\n")
        .expect_code(250);
    c.cmd("QUIT").expect_code(221);
}

#[test]
fn round_robin_spreads_sessions_over_the_backends() {
    let (a, b) = (Upstream::start(), Upstream::start());
    let (g, _) = guard(&[a.addr, b.addr], "upstream_balance = \"round-robin\"\n");
    for i in 0..6 {
        one_message(&g, &format!("rr{i}@example.test"));
    }
    assert_eq!(
        (a.conns().len(), b.conns().len()),
        (3, 3),
        "six sessions one after the other take turns"
    );
    assert_eq!(a.messages().len() + b.messages().len(), 6);
}

#[test]
fn least_sessions_prefers_the_idle_backend() {
    let (a, b) = (Upstream::start(), Upstream::start());
    let (g, metrics) = guard(&[a.addr, b.addr], "upstream_balance = \"least-sessions\"\n");
    let mut held = g.client();
    held.ehlo().expect_code(250);
    let (busy, idle) = if a.conns().len() == 1 {
        (&a, &b)
    } else {
        (&b, &a)
    };
    assert_eq!(busy.conns().len(), 1, "the held session has a backend");
    let gauge = format!(
        "mailguard_upstream_backend_sessions{{backend=\"{}\"}}",
        busy.addr
    );
    assert_eq!(metric(metrics, &gauge), Some(1.0));
    for i in 0..4 {
        one_message(&g, &format!("ls{i}@example.test"));
    }
    assert_eq!(
        busy.conns().len(),
        1,
        "nothing more went to the busy backend"
    );
    assert_eq!(
        idle.conns().len(),
        4,
        "every new session went to the idle one"
    );
    held.cmd("QUIT").expect_code(221);
}

#[test]
fn a_refusing_backend_is_skipped_unnoticed_and_marked_down() {
    // One backend refuses the TCP connect, another accepts and closes before its banner.
    let refused = Upstream::refused_addr();
    let closes = Upstream::with(UpstreamOptions {
        close_on_accept: true,
        ..UpstreamOptions::default()
    });
    let live = Upstream::start();
    let (g, metrics) = guard(
        &[refused, closes.addr, live.addr],
        "upstream_fail_timeout = 600\n",
    );
    // Round robin reaches each dead backend within the first three sessions.
    for i in 0..3 {
        one_message(&g, &format!("skip{i}@example.test"));
    }
    assert_eq!(
        closes.conns().len(),
        1,
        "the pre-banner close was tried once"
    );
    assert_eq!(backend_up(metrics, refused), Some(0.0));
    assert_eq!(backend_up(metrics, closes.addr), Some(0.0));
    assert_eq!(backend_up(metrics, live.addr), Some(1.0));
    for i in 3..9 {
        one_message(&g, &format!("skip{i}@example.test"));
    }
    assert_eq!(
        closes.conns().len(),
        1,
        "a backend marked down is not tried again"
    );
    assert_eq!(
        live.messages().len(),
        9,
        "every message reached the live one"
    );
    // Ring counters are published about once per second.
    assert!(
        wait_for(WAIT, || metric(
            metrics,
            "mailguard_upstream_connect_failures_total"
        )
        .is_some_and(|n| n >= 1.0)),
        "the refused connect was not counted"
    );
}

#[test]
fn check_prints_the_pool_keys_and_bad_lists_are_one_line_errors() {
    let dir = TempDir::new();
    let good = dir.write(
        "good.toml",
        b"upstream = [\"127.0.0.1:25\", \"[::1]:26\"]\nupstream_balance = \"least-sessions\"\n\
          upstream_check_interval = 3\n",
    );
    let (status, out, err) =
        ops_common::run_to_exit(&["check".into(), "--config".into(), path_str(&good)]);
    assert!(status.success(), "{err}");
    for line in [
        "#   upstream = [\"127.0.0.1:25\", \"[::1]:26\"]",
        "#   upstream_balance = \"least-sessions\"",
        "#   upstream_fail_timeout = 10",
        "#   upstream_check_interval = 3",
    ] {
        assert!(out.lines().any(|l| l == line), "no `{line}` in {out}");
    }
    let bad = dir.write("bad.toml", b"upstream_balance = \"random\"\n");
    let (status, err) = run_to_exit(&["check", "--config", &path_str(&bad)]);
    assert_one_line_failure(status, &err);
    assert!(
        err.contains("bad.toml:1:20: `random` is not an upstream balance"),
        "{err}"
    );
    let (status, err) = run_to_exit(&[
        "--listen",
        "127.0.0.1:1",
        "--upstream",
        "127.0.0.1:25",
        "--upstream",
        "127.0.0.1:25",
    ]);
    assert_eq!(status.code(), Some(2), "{err}");
    assert_one_line_failure(status, &err);
    assert!(
        err.contains("upstream 127.0.0.1:25 is listed twice"),
        "{err}"
    );
}

/// What one client session of the mid-run test did.
struct Outcome {
    /// Its place in the order sessions started.
    started: usize,
    id: String,
    /// The client saw 250 for its message.
    acked: bool,
    /// Why not, if not.
    error: Option<String>,
}

/// A session that tolerates the upstream dying under it: greeting, EHLO, one message, QUIT.
fn tolerant_session(addr: SocketAddr, started: usize, id: String) -> Outcome {
    let mut outcome = Outcome {
        started,
        id,
        acked: false,
        error: None,
    };
    let steps = |c: &mut Client, id: &str| -> Result<(), String> {
        let expect = |c: &mut Client, line: Option<&str>, code: u16| {
            if let Some(line) = line {
                c.try_send(format!("{line}\r\n").as_bytes())
                    .map_err(|e| format!("send {line}: {e}"))?;
            }
            match c.try_read_reply() {
                Ok(r) if r.code == code => Ok(()),
                Ok(r) => Err(format!("{line:?}: {r}")),
                Err(e) => Err(format!("{line:?}: {e:?}")),
            }
        };
        expect(c, None, 220)?;
        expect(c, Some("EHLO client.test"), 250)?;
        expect(c, Some(&format!("MAIL FROM:<{id}>")), 250)?;
        expect(c, Some("RCPT TO:<rcpt@example.test>"), 250)?;
        expect(c, Some("DATA"), 354)?;
        expect(c, Some("Subject: failover\r\n\r\nbody\r\n."), 250)?;
        // Acknowledged: whatever QUIT gets, the message counts as accepted.
        let _ = expect(c, Some("QUIT"), 221);
        Ok(())
    };
    let mut c = Client::connect(addr);
    match steps(&mut c, &outcome.id) {
        Ok(()) => outcome.acked = true,
        Err(e) => outcome.error = Some(e),
    }
    outcome
}

#[test]
fn a_backend_killed_mid_run_loses_no_acknowledged_message() {
    const CLIENTS: usize = 4;
    const SESSIONS: usize = 80;
    const KILL_AFTER: usize = 30;
    // Slow enough replies that the kill finds sessions in the middle of their dialogue.
    let slow = || {
        Upstream::with(UpstreamOptions {
            reply_delay: Duration::from_millis(10),
            ..UpstreamOptions::default()
        })
    };
    let (mut a, b) = (slow(), slow());
    let (g, metrics) = guard(&[a.addr, b.addr], "upstream_fail_timeout = 600\n");
    let next = Arc::new(AtomicUsize::new(0));
    let finished = Arc::new(AtomicUsize::new(0));
    let outcomes = Arc::new(Mutex::new(Vec::new()));
    let deadline = Instant::now() + Duration::from_secs(120);
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (next, finished, outcomes, addr) =
                (next.clone(), finished.clone(), outcomes.clone(), g.addr);
            thread::spawn(move || loop {
                let started = next.fetch_add(1, Ordering::SeqCst);
                if started >= SESSIONS || Instant::now() > deadline {
                    return;
                }
                let id = format!("s{started}@example.test");
                let o = tolerant_session(addr, started, id);
                outcomes.lock().unwrap().push(o);
                finished.fetch_add(1, Ordering::SeqCst);
            })
        })
        .collect();
    assert!(
        wait_for(WAIT * 3, || finished.load(Ordering::SeqCst) >= KILL_AFTER),
        "the run did not get going"
    );
    // Like a process exit: the listener goes and every open connection is closed.
    a.stop();
    let killed_at = next.load(Ordering::SeqCst);
    for c in clients {
        c.join().expect("client thread");
    }
    let outcomes = outcomes.lock().unwrap();
    assert_eq!(
        outcomes.len(),
        SESSIONS,
        "every session ran within the bound"
    );
    let got: HashSet<Vec<u8>> = a
        .messages()
        .into_iter()
        .chain(b.messages())
        .map(|m| m.mail_from)
        .collect();
    let acked: Vec<&Outcome> = outcomes.iter().filter(|o| o.acked).collect();
    for o in &acked {
        let line = format!("MAIL FROM:<{}>", o.id);
        assert!(
            got.contains(line.as_bytes()),
            "{} was acknowledged but neither backend has it",
            o.id
        );
    }
    let after: Vec<&Outcome> = outcomes.iter().filter(|o| o.started >= killed_at).collect();
    assert!(
        after.len() >= 10,
        "only {} sessions started after the kill",
        after.len()
    );
    for o in &after {
        assert!(
            o.acked,
            "session {} after the kill failed: {:?}",
            o.started, o.error
        );
    }
    let on_b_after = b
        .messages()
        .iter()
        .filter(|m| {
            after
                .iter()
                .any(|o| m.mail_from == format!("MAIL FROM:<{}>", o.id).as_bytes())
        })
        .count();
    assert_eq!(
        on_b_after,
        after.len(),
        "every session after the kill went to the live one"
    );
    assert_eq!(
        backend_up(metrics, a.addr),
        Some(0.0),
        "the dead one is marked down"
    );
    let lost = outcomes.iter().filter(|o| !o.acked).count();
    eprintln!(
        "{} sessions, {} acknowledged, {lost} not acknowledged (in flight on the killed backend: 4xx, never 250), \
         {} after the kill, backend a kept {} messages, b {}",
        outcomes.len(),
        acked.len(),
        after.len(),
        a.messages().len(),
        b.messages().len()
    );
}

#[test]
fn active_check_takes_a_554_backend_out_and_says_quit() {
    let refusing = Upstream::with(UpstreamOptions {
        banner_code: 554,
        banner: vec!["not now".to_string()],
        ..UpstreamOptions::default()
    });
    let healthy = Upstream::start();
    let (mut g, metrics) = guard(
        &[refusing.addr, healthy.addr],
        "upstream_check_interval = 1\n",
    );
    assert!(
        wait_for(WAIT, || backend_up(metrics, refusing.addr) == Some(0.0)),
        "the check did not mark the 554 backend down"
    );
    assert!(refusing.wait_command(b"QUIT"), "the check sent no QUIT");
    assert!(
        !refusing.saw_command_containing(b"EHLO"),
        "no EHLO after a 554 greeting"
    );
    assert!(
        wait_for(WAIT, || healthy
            .commands()
            .windows(2)
            .any(|w| w[0].starts_with(b"EHLO ") && w[1] == b"QUIT")),
        "the healthy backend got no EHLO + QUIT check: {}",
        show_lines(&healthy.commands())
    );
    assert_eq!(backend_up(metrics, healthy.addr), Some(1.0));
    for i in 0..4 {
        one_message(&g, &format!("chk{i}@example.test"));
    }
    assert!(
        !refusing.saw_command_containing(CLIENT_NAME.as_bytes()),
        "no client session went to the backend that failed its check"
    );
    assert_eq!(healthy.messages().len(), 4);
    // The check thread does not keep the process alive: a drain exits.
    // SAFETY: kill(2) on the PID of the guard this test started.
    unsafe {
        libc::kill(g.pid() as i32, libc::SIGTERM);
    }
    assert!(
        wait_for(WAIT, || !g.running()),
        "the guard did not exit after SIGTERM"
    );
}
