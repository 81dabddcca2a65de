//! SIGHUP: a valid policy becomes the one new sessions get while open sessions keep theirs,
//! an invalid one is refused with one line, the config file (and its `[policy]` table) is
//! re-read too, and none of it drops a session, even under load.

mod ops_common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use ops_common::*;

/// The EHLO keyword lines (after the domain line) of a reply.
fn keywords(r: &Reply) -> Vec<String> {
    r.lines.iter().skip(1).map(|l| l[4..].to_string()).collect()
}

/// Sends `n` RCPTs in one transaction; returns their codes.
fn rcpt_codes(c: &mut Smtp, n: usize) -> Vec<u16> {
    c.expect("MAIL FROM:<a@example.test>", 250);
    let codes = (0..n)
        .map(|i| {
            c.cmd(&format!("RCPT TO:<r{i}@example.test>"))
                .expect("rcpt")
                .code
        })
        .collect();
    c.expect("RSET", 250);
    codes
}

/// Replaces `path` atomically (a reload never sees a half-written file).
fn replace(dir: &Dir, name: &str, text: &str) {
    let tmp = dir.write(&format!("{name}.new"), text);
    std::fs::rename(tmp, dir.path.join(name)).expect("rename");
}

#[test]
fn new_sessions_get_the_new_policy_and_open_ones_keep_theirs() {
    let sink = Sink::start();
    let dir = Dir::new();
    let policy = dir.write("policy.toml", "");
    let (addr, args) = base_args(sink.addr, &["--policy", &arg(&policy)]);
    let p = Proc::start(addr, &args, &[]);
    let mut old = Smtp::greeted(addr);
    let all = keywords(&old.expect("EHLO old.test", 250));
    assert!(all.contains(&"STARTTLS".to_string()), "{all:?}");

    replace(
        &dir,
        "policy.toml",
        "extensions = [\"PIPELINING\", \"8BITMIME\"]\nmax_recipients = 2\n",
    );
    p.signal("HUP");
    assert!(p.wait_log("generation 2 is live", 1), "{}", p.log());
    let line = p.log_lines("generation 2 is live").remove(0);
    assert!(
        line.contains("extensions unset -> [\"PIPELINING\", \"8BITMIME\"]"),
        "{line}"
    );
    assert!(line.contains("max_recipients 1000 -> 2"), "{line}");

    let mut new = Smtp::greeted(addr);
    assert_eq!(
        keywords(&new.expect("EHLO new.test", 250)),
        ["PIPELINING", "8BITMIME"]
    );
    assert_eq!(rcpt_codes(&mut new, 3), [250, 250, 452]);
    // The session opened before the reload still runs under generation 1.
    assert_eq!(keywords(&old.expect("EHLO old.test", 250)), all);
    assert_eq!(rcpt_codes(&mut old, 3), [250, 250, 250]);
}

#[test]
fn an_invalid_policy_is_refused_with_one_line_and_the_old_one_stays() {
    let sink = Sink::start();
    let dir = Dir::new();
    let policy = dir.write("policy.toml", "max_recipients = 2\n");
    let (addr, args) = base_args(sink.addr, &["--policy", &arg(&policy)]);
    let p = Proc::start(addr, &args, &[]);
    replace(&dir, "policy.toml", "max_recipients = 5\nbogus_key = 1\n");
    p.signal("HUP");
    assert!(p.wait_log("reload refused", 1), "{}", p.log());
    let refused = p.log_lines("reload refused");
    assert_eq!(refused.len(), 1, "{refused:?}");
    let want = format!("{}:2:1: unknown field `bogus_key`", arg(&policy));
    assert!(refused[0].contains(&want), "{refused:?} should name {want}");
    let mut c = Smtp::greeted(addr);
    c.expect("EHLO c.test", 250);
    assert_eq!(rcpt_codes(&mut c, 3), [250, 250, 452], "generation 1 stays");
    // Fixed, the next SIGHUP applies it.
    replace(&dir, "policy.toml", "max_recipients = 5\n");
    p.signal("HUP");
    assert!(p.wait_log("generation 2 is live", 1), "{}", p.log());
    let mut c = Smtp::greeted(addr);
    c.expect("EHLO c.test", 250);
    assert_eq!(rcpt_codes(&mut c, 3), [250, 250, 250]);
}

#[test]
fn the_config_file_and_its_policy_table_are_reloaded() {
    let sink = Sink::start();
    let dir = Dir::new();
    let listen = format!("127.0.0.1:{}", free_port());
    let config = |recipients: u32, threads: u32| {
        format!(
            "listen = \"{listen}\"\nupstream = \"{}\"\nthreads = {threads}\n\n[policy]\nmax_recipients = {recipients}\n",
            sink.addr
        )
    };
    let path = dir.write("mailguard.toml", &config(1, 2));
    let p = Proc::start(
        listen.parse().expect("addr"),
        &["--config".to_string(), arg(&path)],
        &[],
    );
    let mut c = Smtp::greeted(p.addr);
    c.expect("EHLO c.test", 250);
    assert_eq!(rcpt_codes(&mut c, 2), [250, 452]);
    replace(&dir, "mailguard.toml", &config(2, 1));
    p.signal("HUP");
    assert!(p.wait_log("generation 2 is live", 1), "{}", p.log());
    assert_eq!(p.log_lines("`threads` changed").len(), 1, "{}", p.log());
    let mut c = Smtp::greeted(p.addr);
    c.expect("EHLO c.test", 250);
    assert_eq!(rcpt_codes(&mut c, 3), [250, 250, 452]);
    // A broken [policy] table is refused, naming the config file's line and column.
    replace(
        &dir,
        "mailguard.toml",
        &format!("{}mode = \"pix\"\n", config(3, 1)),
    );
    p.signal("HUP");
    assert!(p.wait_log("reload refused", 1), "{}", p.log());
    let line = p.log_lines("reload refused").remove(0);
    assert!(line.contains(&format!("{}:7:8:", arg(&path))), "{line}");
}

/// How many idle sessions stay open through the reloads.
const IDLE: usize = 2000;
/// How long SIGHUP keeps coming, every 100 ms.
const RELOADING: Duration = Duration::from_secs(3);

/// Writes `line` to every stream, then reads one reply line from each; returns how many
/// were answered with `code`.
fn round(streams: &mut [BufReader<TcpStream>], line: &[u8], code: &str) -> usize {
    for s in streams.iter_mut() {
        let _ = s.get_mut().write_all(line);
    }
    streams
        .iter_mut()
        .map(|s| ok_reply(s, code))
        .filter(|&ok| ok)
        .count()
}

/// Reads one reply (up to its last line); whether it has `code`.
fn ok_reply(s: &mut BufReader<TcpStream>, code: &str) -> bool {
    let mut reply = String::new();
    loop {
        reply.clear();
        if s.read_line(&mut reply).unwrap_or(0) == 0 {
            return false;
        }
        if reply.as_bytes().get(3) != Some(&b'-') {
            return reply.starts_with(code);
        }
    }
}

#[test]
fn reloading_every_100ms_under_load_drops_no_session_and_no_message() {
    let _ = mailguard::io::raise_nofile_limit();
    let sink = Sink::start();
    let dir = Dir::new();
    let policy = dir.write("policy.toml", "max_recipients = 100\n");
    let (addr, args) = base_args(sink.addr, &["--policy", &arg(&policy)]);
    let p = Proc::start(addr, &args, &[]);

    // Thousands of idle-ish sessions: connected, greeted, EHLO done; opened in batches so
    // no listen backlog overflows on the way.
    let mut idle: Vec<BufReader<TcpStream>> = Vec::with_capacity(IDLE);
    while idle.len() < IDLE {
        let mut batch: Vec<BufReader<TcpStream>> = (0..250)
            .map(|_| {
                let s = TcpStream::connect_timeout(&addr, WAIT).expect("connect an idle session");
                s.set_read_timeout(Some(WAIT)).expect("timeout");
                BufReader::new(s)
            })
            .collect();
        assert_eq!(round(&mut batch, b"", "220"), batch.len(), "greetings");
        assert_eq!(
            round(&mut batch, b"EHLO idle.test\r\n", "250"),
            batch.len(),
            "EHLO"
        );
        idle.append(&mut batch);
    }

    // A message stream on its own thread, one session per message.
    let stop = Arc::new(AtomicBool::new(false));
    let (sent, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let stream = {
        let (stop, sent, failed) = (Arc::clone(&stop), Arc::clone(&sent), Arc::clone(&failed));
        thread::spawn(move || {
            let mut n = 0;
            while !stop.load(Ordering::SeqCst) && n < 100_000 {
                n += 1;
                let ok = Smtp::connect(addr).and_then(|mut c| {
                    let greeting = c.reply()?;
                    let ehlo = c.cmd("EHLO stream.test")?;
                    let done =
                        c.message("s@example.test", "r@example.test", &format!("n {n}\r\n"))?;
                    let quit = c.cmd("QUIT")?;
                    Ok([greeting.code, ehlo.code, done.code, quit.code] == [220, 250, 250, 221])
                });
                match ok {
                    Ok(true) => sent.fetch_add(1, Ordering::SeqCst),
                    _ => failed.fetch_add(1, Ordering::SeqCst),
                };
            }
        })
    };

    // SIGHUP every 100 ms for a bounded time, alternating two valid policies.
    let started = Instant::now();
    let mut reloads = 0;
    while started.elapsed() < RELOADING {
        reloads += 1;
        let text = if reloads % 2 == 0 {
            "max_recipients = 100\n"
        } else {
            "max_recipients = 50\nmask_banner = true\n"
        };
        replace(&dir, "policy.toml", text);
        p.signal("HUP");
        thread::sleep(Duration::from_millis(100));
    }
    stop.store(true, Ordering::SeqCst);
    stream.join().expect("message stream");

    let last = format!("generation {} is live", reloads + 1);
    assert!(
        p.wait_log(&last, 1),
        "the last reload never applied: {}",
        p.log()
    );
    assert_eq!(p.log_lines("is live").len(), reloads, "one line per reload");
    assert!(p.log_lines("reload refused").is_empty(), "{}", p.log());
    assert_eq!(failed.load(Ordering::SeqCst), 0, "failed messages");
    let sent = sent.load(Ordering::SeqCst);
    assert!(sent > 0, "the message stream sent nothing");
    assert!(
        wait_for(WAIT, || sink.message_count() == sent),
        "{sent} acknowledged, {} delivered",
        sink.message_count()
    );
    assert_eq!(
        round(&mut idle, b"NOOP\r\n", "250"),
        IDLE,
        "idle sessions dropped"
    );
    eprintln!("{reloads} reloads, {sent} messages relayed, {IDLE} idle sessions kept");
}
