//! The engine without I/O: commands/s on the command path (verb lookup, allow-list, reply
//! pairing) and whole sessions/s (banner, EHLO filter, MAIL, RCPT, DATA with a 1 KiB body, QUIT).

use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use mailguard::config::Policy;
use mailguard::proto::Session;
use mailguard::relay::{Action, Proxy};

const BANNER: &[u8] = b"220 mx.test ESMTP\r\n";
const EHLO: &[u8] = b"250-mx.test\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n250-8BITMIME\r\n250-CHUNKING\r\n250-STARTTLS\r\n250-ENHANCEDSTATUSCODES\r\n250 AUTH PLAIN LOGIN\r\n";

fn greeted(policy: &Arc<Policy>, now: Instant, out: &mut Vec<Action>) -> Session {
    let mut s = Session::new(Arc::clone(policy), now);
    s.start(now, out);
    s.on_upstream_connected(now, out);
    s.on_upstream(BANNER, now, out);
    out.clear();
    s
}

fn command_path(c: &mut Criterion) {
    let policy = Arc::new(Policy::default());
    let now = Instant::now();
    let mut out = Vec::with_capacity(16);
    let mut s = greeted(&policy, now, &mut out);
    let commands: [&[u8]; 4] = [
        b"RCPT TO:<someone@example.test>\r\n",
        b"NOOP\r\n",
        b"HELP\r\n",
        b"RSET\r\n",
    ];
    let replies: [&[u8]; 4] = [
        b"250 2.1.5 Ok\r\n",
        b"250 2.0.0 Ok\r\n",
        b"214 2.0.0 See RFC 5321\r\n",
        b"250 2.0.0 Ok\r\n",
    ];
    let mut g = c.benchmark_group("engine");
    g.throughput(Throughput::Elements(commands.len() as u64));
    g.bench_function("commands", |b| {
        b.iter(|| {
            for (cmd, reply) in commands.iter().zip(replies) {
                s.on_client(black_box(cmd), now, &mut out);
                s.on_upstream(black_box(reply), now, &mut out);
                out.clear();
            }
            assert!(!s.is_closed());
        })
    });
    g.finish();
}

fn whole_session(c: &mut Criterion) {
    let policy = Arc::new(Policy::default());
    let now = Instant::now();
    let mut body = Vec::new();
    while body.len() < 1024 {
        body.extend_from_slice(
            b"The quick brown fox jumps over the lazy dog, again and again.\r\n",
        );
    }
    body.extend_from_slice(b".\r\n");
    let mut out = Vec::with_capacity(16);
    let mut g = c.benchmark_group("engine");
    g.throughput(Throughput::Elements(1));
    g.bench_function("session_1k_message", |b| {
        b.iter(|| {
            let mut s = greeted(&policy, now, &mut out);
            s.on_client(b"EHLO client.test\r\n", now, &mut out);
            s.on_upstream(EHLO, now, &mut out);
            s.on_client(b"MAIL FROM:<a@example.test>\r\n", now, &mut out);
            s.on_upstream(b"250 2.1.0 Ok\r\n", now, &mut out);
            s.on_client(b"RCPT TO:<b@example.test>\r\n", now, &mut out);
            s.on_upstream(b"250 2.1.5 Ok\r\n", now, &mut out);
            s.on_client(b"DATA\r\n", now, &mut out);
            s.on_upstream(b"354 End data with <CR><LF>.<CR><LF>\r\n", now, &mut out);
            s.on_client(black_box(&body), now, &mut out);
            s.on_upstream(b"250 2.0.0 Ok: queued\r\n", now, &mut out);
            s.on_client(b"QUIT\r\n", now, &mut out);
            s.on_upstream(b"221 2.0.0 Bye\r\n", now, &mut out);
            black_box(out.len());
            out.clear();
        })
    });
    g.finish();
}

criterion_group!(benches, command_path, whole_session);
criterion_main!(benches);
