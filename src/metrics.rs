//! The Prometheus endpoint: a snapshot of every worker's published counters, summed at scrape
//! time and written in the text exposition format (0.0.4), served by a tiny HTTP responder on
//! its own thread.
//!
//! Owns the metric names, their help texts and the HTTP exchange (one request per connection,
//! bounded read, bounded time; `/metrics` or 404). It reads only what workers publish once per
//! second (ring stats, engine totals) and the live policy's generation: it must never reach
//! into a worker or add anything to the hot path.

use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;

use crate::guard::{Connections, LivePolicy};
use crate::io::{ServerHandle, StatsHandle, WorkerStats, CONNECT_BUCKETS_MICROS};
use crate::pool::{BackendState, Pool};
use crate::tally::{blocked_verb_name, End, EngineTotals, RULES};

/// Longest request head read; anything longer gets 431 and the connection is closed.
const MAX_REQUEST: usize = 8 * 1024;
/// How long one scrape may take to send its request or read its answer.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the numbers come from. Cloneable and `Send`: the metrics thread and the control
/// thread (SIGUSR1) each hold one.
#[derive(Clone)]
pub struct Sources {
    pub ring: StatsHandle,
    pub engine: Vec<Arc<Mutex<EngineTotals>>>,
    pub live: Arc<LivePolicy>,
    pub connections: Arc<Connections>,
    /// The upstream backends (their open sessions and up/down state are read at scrape).
    pub pool: Option<Arc<Pool>>,
    pub server: ServerHandle,
    pub started: SystemTime,
}

/// Every number of one scrape.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    pub ring: Vec<WorkerStats>,
    pub ring_total: WorkerStats,
    pub engine: EngineTotals,
    pub generation: u64,
    pub reloads_refused: u64,
    pub draining: bool,
    pub start_time: f64,
    pub backends: Vec<BackendState>,
}

impl Sources {
    /// Reads every worker's last publication and sums it.
    pub fn snapshot(&self) -> Snapshot {
        let ring = self.ring.snapshot();
        let mut ring_total = WorkerStats::default();
        for w in &ring {
            ring_total.add(w);
        }
        let mut engine = EngineTotals::default();
        for worker in &self.engine {
            engine.add(&worker.lock());
        }
        Snapshot {
            ring,
            ring_total,
            engine,
            generation: self.live.generation(),
            reloads_refused: self.live.reloads_refused(),
            draining: self.server.draining(),
            start_time: self
                .started
                .duration_since(UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
            backends: self.pool.as_ref().map_or_else(Vec::new, |p| p.states()),
        }
    }
}

/// Writes metric families: `# HELP`, `# TYPE`, then samples.
struct Exposition {
    out: String,
}

impl Exposition {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        self.out.push_str(name);
        if !labels.is_empty() {
            let parts: Vec<String> = labels
                .iter()
                .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
                .collect();
            let _ = write!(self.out, "{{{}}}", parts.join(","));
        }
        let _ = writeln!(self.out, " {value}");
    }

    fn single(&mut self, name: &str, kind: &str, help: &str, value: impl std::fmt::Display) {
        self.family(name, kind, help);
        self.sample(name, &[], value);
    }

    fn per_worker(
        &mut self,
        name: &str,
        kind: &str,
        help: &str,
        s: &Snapshot,
        f: fn(&WorkerStats) -> u64,
    ) {
        self.family(name, kind, help);
        for (index, worker) in s.ring.iter().enumerate() {
            self.sample(name, &[("worker", &index.to_string())], f(worker));
        }
    }
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The whole exposition of one snapshot.
pub fn render(s: &Snapshot) -> String {
    let mut e = Exposition { out: String::new() };
    process(&mut e, s);
    sessions(&mut e, s);
    decisions(&mut e, s);
    upstream(&mut e, s);
    ring(&mut e, s);
    e.out
}

fn process(e: &mut Exposition, s: &Snapshot) {
    e.family(
        "mailguard_build_info",
        "gauge",
        "Always 1; the version is a label.",
    );
    e.sample(
        "mailguard_build_info",
        &[("version", env!("CARGO_PKG_VERSION"))],
        1,
    );
    e.single(
        "mailguard_start_time_seconds",
        "gauge",
        "When the process started, in seconds since the Unix epoch.",
        s.start_time,
    );
    e.single(
        "mailguard_draining",
        "gauge",
        "1 once a graceful shutdown began.",
        u8::from(s.draining),
    );
    e.single(
        "mailguard_policy_generation",
        "gauge",
        "Generation of the policy new sessions get (1 at start, +1 per accepted reload).",
        s.generation,
    );
    e.family(
        "mailguard_policy_reloads_total",
        "counter",
        "Policy reloads (SIGHUP) by result.",
    );
    let applied = s.generation.saturating_sub(1).to_string();
    e.sample(
        "mailguard_policy_reloads_total",
        &[("result", "applied")],
        applied,
    );
    e.sample(
        "mailguard_policy_reloads_total",
        &[("result", "refused")],
        s.reloads_refused,
    );
    e.single(
        "mailguard_workers",
        "gauge",
        "Worker threads (one io_uring each).",
        s.ring.len(),
    );
}

fn sessions(e: &mut Exposition, s: &Snapshot) {
    let (r, g) = (&s.ring_total, &s.engine);
    e.single(
        "mailguard_sessions_open",
        "gauge",
        "Sessions open now.",
        r.sessions_open,
    );
    e.single(
        "mailguard_sessions_total",
        "counter",
        "Client connections accepted.",
        r.sessions_total,
    );
    e.family(
        "mailguard_sessions_ended_total",
        "counter",
        "Sessions ended, by how they ended.",
    );
    for end in End::ALL {
        e.sample(
            "mailguard_sessions_ended_total",
            &[("result", end.name())],
            g.ended(end),
        );
    }
    e.single(
        "mailguard_commands_total",
        "counter",
        "Command lines read from clients (counted when their session ends).",
        g.commands,
    );
    e.family(
        "mailguard_messages_total",
        "counter",
        "Messages by outcome at the upstream: relayed (accepted) or rejected after the end of data.",
    );
    e.sample(
        "mailguard_messages_total",
        &[("outcome", "relayed")],
        g.messages_accepted,
    );
    e.sample(
        "mailguard_messages_total",
        &[("outcome", "rejected")],
        g.messages_refused_upstream,
    );
    e.family(
        "mailguard_replies_total",
        "counter",
        "Replies sent to clients, by class.",
    );
    for (class, n) in ["2xx", "3xx", "4xx", "5xx"].iter().zip(g.replies) {
        e.sample("mailguard_replies_total", &[("class", class)], n);
    }
    e.family(
        "mailguard_received_bytes_total",
        "counter",
        "Bytes received, by the side they came from.",
    );
    e.sample(
        "mailguard_received_bytes_total",
        &[("side", "client")],
        r.client_bytes_received,
    );
    e.sample(
        "mailguard_received_bytes_total",
        &[("side", "upstream")],
        r.upstream_bytes_received,
    );
    e.family(
        "mailguard_sent_bytes_total",
        "counter",
        "Bytes sent, by the side they went to.",
    );
    e.sample(
        "mailguard_sent_bytes_total",
        &[("side", "client")],
        r.client_bytes_sent,
    );
    e.sample(
        "mailguard_sent_bytes_total",
        &[("side", "upstream")],
        r.upstream_bytes_sent,
    );
}

fn decisions(e: &mut Exposition, s: &Snapshot) {
    let name = "mailguard_policy_decisions_total";
    e.family(
        name,
        "counter",
        "Policy decisions by rule (blocked verbs also by verb), counted when their session ends.",
    );
    for (slot, n) in s.engine.blocked.iter().enumerate() {
        let verb = blocked_verb_name(slot);
        e.sample(name, &[("rule", "blocked_verb"), ("verb", &verb)], n);
    }
    for (rule, n) in RULES.iter().zip(s.engine.rules) {
        e.sample(name, &[("rule", rule)], n);
    }
}

fn upstream(e: &mut Exposition, s: &Snapshot) {
    let r = &s.ring_total;
    e.single(
        "mailguard_upstream_connects_total",
        "counter",
        "Upstream connections established.",
        r.upstream_connects,
    );
    e.single(
        "mailguard_upstream_connect_failures_total",
        "counter",
        "Upstream connections that could not be established.",
        r.upstream_connect_failures,
    );
    e.single(
        "mailguard_upstream_failures_total",
        "counter",
        "Upstream connections that failed or ended unexpectedly (counted when their session ends).",
        s.engine.upstream_failures,
    );
    let name = "mailguard_upstream_connect_seconds";
    e.family(
        name,
        "histogram",
        "Time from submitting an upstream connect to its completion.",
    );
    let h = &r.connect_latency;
    let mut cumulative = 0;
    let bucket = format!("{name}_bucket");
    for (bound, n) in CONNECT_BUCKETS_MICROS.iter().zip(h.counts.iter()) {
        cumulative += n;
        let le = format!("{}", *bound as f64 / 1e6);
        e.sample(&bucket, &[("le", &le)], cumulative);
    }
    e.sample(&bucket, &[("le", "+Inf")], h.count());
    e.sample(&format!("{name}_sum"), &[], h.sum_micros as f64 / 1e6);
    e.sample(&format!("{name}_count"), &[], h.count());
    backends(e, s);
}

fn backends(e: &mut Exposition, s: &Snapshot) {
    let name = "mailguard_upstream_backend_sessions";
    e.family(
        name,
        "gauge",
        "Upstream connections open (or being opened) to each backend.",
    );
    for b in &s.backends {
        e.sample(name, &[("backend", &b.addr.to_string())], b.sessions);
    }
    let name = "mailguard_upstream_backend_up";
    e.family(
        name,
        "gauge",
        "1 while a backend is in rotation, 0 while a failed connect or check marks it down.",
    );
    for b in &s.backends {
        e.sample(name, &[("backend", &b.addr.to_string())], u8::from(b.up));
    }
}

fn ring(e: &mut Exposition, s: &Snapshot) {
    e.per_worker(
        "mailguard_ring_submissions_total",
        "counter",
        "Submission queue entries consumed by the kernel.",
        s,
        |w| w.submissions,
    );
    e.per_worker(
        "mailguard_ring_completions_total",
        "counter",
        "Completion queue entries handled.",
        s,
        |w| w.completions,
    );
    e.per_worker(
        "mailguard_ring_cq_overflow_total",
        "counter",
        "Completions the kernel could not post (CQ overflow).",
        s,
        |w| w.cq_overflow,
    );
    e.per_worker(
        "mailguard_ring_buffers_free",
        "gauge",
        "Receive buffers available to the kernel.",
        s,
        |w| w.buffers_free,
    );
    e.per_worker(
        "mailguard_ring_buffers",
        "gauge",
        "Receive buffers of the worker's pool.",
        s,
        |w| w.buffers_total,
    );
    e.per_worker(
        "mailguard_ring_recv_throttled_total",
        "counter",
        "Times reading a socket paused because its peer's send queue was over the high-water mark.",
        s,
        |w| w.recv_throttled,
    );
    e.per_worker(
        "mailguard_ring_recv_enobufs_total",
        "counter",
        "Receives ended because the buffer pool ran dry.",
        s,
        |w| w.recv_enobufs,
    );
}

/// Serves `/metrics` on `listener` from a thread of its own, one connection at a time.
pub fn spawn(listener: TcpListener, sources: Sources) -> io::Result<JoinHandle<()>> {
    thread::Builder::new()
        .name("mailguard-metrics".to_string())
        .spawn(move || {
            for stream in listener.incoming() {
                match stream {
                    Ok(stream) => {
                        if let Err(e) = answer(stream, &sources) {
                            tracing::debug!(error = %e, "metrics request failed");
                        }
                    }
                    // Out of fds, say: do not spin.
                    Err(_) => thread::sleep(Duration::from_millis(100)),
                }
            }
        })
}

/// What a request head asks for.
#[derive(Debug, PartialEq, Eq)]
enum Request {
    Metrics { head: bool },
    NotFound,
    BadMethod,
    Bad,
}

fn parse_request(head: &[u8]) -> Request {
    let Some(line) = head.split(|&b| b == b'\n').next() else {
        return Request::Bad;
    };
    let line = String::from_utf8_lossy(line);
    let mut parts = line.trim_end_matches('\r').split(' ');
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return Request::Bad;
    };
    if !version.starts_with("HTTP/1.") || parts.next().is_some() {
        return Request::Bad;
    }
    let head = match method {
        "GET" => false,
        "HEAD" => true,
        _ => return Request::BadMethod,
    };
    let path = target.split('?').next().unwrap_or(target);
    if path == "/metrics" {
        Request::Metrics { head }
    } else {
        Request::NotFound
    }
}

/// Reads the request head (bounded in size and time), answers, closes.
fn answer(mut stream: TcpStream, sources: &Sources) -> io::Result<()> {
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    let complete = loop {
        if head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n") {
            break true;
        }
        if head.len() >= MAX_REQUEST {
            break false;
        }
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break !head.is_empty();
        }
        head.extend_from_slice(&buf[..n]);
    };
    let (status, body, head_only) = if !complete {
        ("431 Request Header Fields Too Large", String::new(), false)
    } else {
        match parse_request(&head) {
            Request::Metrics { head } => ("200 OK", render(&sources.snapshot()), head),
            Request::NotFound => (
                "404 Not Found",
                "not found: try /metrics\n".to_string(),
                false,
            ),
            Request::BadMethod => ("405 Method Not Allowed", String::new(), false),
            Request::Bad => ("400 Bad Request", String::new(), false),
        }
    };
    let content_type = "text/plain; version=0.0.4; charset=utf-8";
    let mut response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    if !head_only {
        response.push_str(&body);
    }
    stream.write_all(response.as_bytes())?;
    stream.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot() -> Snapshot {
        let mut w = WorkerStats {
            sessions_open: 2,
            sessions_total: 5,
            ..WorkerStats::default()
        };
        w.connect_latency.record(Duration::from_micros(300));
        w.connect_latency.record(Duration::from_secs(20));
        let mut engine = EngineTotals {
            messages_accepted: 3,
            ..EngineTotals::default()
        };
        engine.blocked[crate::proto::Verb::VRFY.index().unwrap()] = 4;
        Snapshot {
            ring: vec![w, w],
            ring_total: {
                let mut t = w;
                t.add(&w);
                t
            },
            engine,
            generation: 3,
            reloads_refused: 1,
            draining: false,
            start_time: 1.5,
            backends: vec![BackendState {
                addr: "127.0.0.1:25".parse().unwrap(),
                sessions: 2,
                up: false,
            }],
        }
    }

    #[test]
    fn every_sample_belongs_to_a_declared_family() {
        let text = render(&snapshot());
        let mut declared: Vec<String> = Vec::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                declared.push(rest.split(' ').next().unwrap().to_string());
                continue;
            }
            if line.starts_with("# HELP ") {
                continue;
            }
            let name = line.split(['{', ' ']).next().unwrap();
            let family = declared.last().expect("a sample before any TYPE");
            let ok = name == family
                || ["_bucket", "_sum", "_count"]
                    .iter()
                    .any(|s| name.strip_suffix(s) == Some(family.as_str()));
            assert!(ok, "{line} is not in family {family}");
            let value = line.rsplit(' ').next().unwrap();
            assert!(value.parse::<f64>().is_ok(), "{line}");
        }
        assert!(text.contains("mailguard_sessions_open 4\n"));
        assert!(text.contains("mailguard_messages_total{outcome=\"relayed\"} 3\n"));
        assert!(text
            .contains("mailguard_policy_decisions_total{rule=\"blocked_verb\",verb=\"VRFY\"} 4\n"));
        assert!(text.contains("mailguard_policy_reloads_total{result=\"applied\"} 2\n"));
        assert!(text.contains("mailguard_upstream_connect_seconds_bucket{le=\"0.0005\"} 2\n"));
        assert!(text.contains("mailguard_upstream_connect_seconds_bucket{le=\"10\"} 2\n"));
        assert!(text.contains("mailguard_upstream_connect_seconds_bucket{le=\"+Inf\"} 4\n"));
        assert!(text.contains("mailguard_ring_submissions_total{worker=\"1\"} 0\n"));
    }

    #[test]
    fn requests_are_routed() {
        assert_eq!(
            parse_request(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Request::Metrics { head: false }
        );
        assert_eq!(
            parse_request(b"GET /metrics?x=1 HTTP/1.0\r\n\r\n"),
            Request::Metrics { head: false }
        );
        assert_eq!(parse_request(b"GET / HTTP/1.1\r\n\r\n"), Request::NotFound);
        assert_eq!(
            parse_request(b"POST /metrics HTTP/1.1\r\n\r\n"),
            Request::BadMethod
        );
        assert_eq!(parse_request(b"hello\r\n\r\n"), Request::Bad);
    }
}
