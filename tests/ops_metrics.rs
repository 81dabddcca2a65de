//! `/metrics`, scraped by a real HTTP client (curl) and parsed strictly as the Prometheus text
//! format; SIGUSR1's counter dump; structured logs (JSON lines, the session-end line, debug
//! decision lines, and never a message body or an AUTH payload).

mod ops_common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;

use ops_common::*;

/// Labels in the order written.
type Labels = Vec<(String, String)>;
/// A series: metric name and its labels.
type Series = (String, Labels);

/// Fetches `path` with curl: (status code, headers, body). Falls back to a plain HTTP/1.0
/// request over a socket if curl is not installed.
fn http_get(addr: SocketAddr, path: &str) -> (u16, String, String) {
    let url = format!("http://{addr}{path}");
    let curl = Command::new("curl")
        .args(["-sS", "-i", "--max-time", "10", &url])
        .output();
    let raw = match curl {
        Ok(out) => {
            assert!(
                out.status.success() || !out.stdout.is_empty(),
                "curl {url}: {out:?}"
            );
            String::from_utf8(out.stdout).expect("UTF-8 response")
        }
        Err(_) => {
            eprintln!("curl not found; fetching {url} with a raw HTTP/1.0 request");
            let mut s = TcpStream::connect(addr).expect("connect metrics");
            s.set_read_timeout(Some(WAIT)).expect("timeout");
            write!(s, "GET {path} HTTP/1.0\r\nHost: test\r\n\r\n").expect("request");
            let mut raw = String::new();
            s.read_to_string(&mut raw).expect("response");
            raw
        }
    };
    let (head, body) = raw.split_once("\r\n\r\n").expect("a header/body split");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("a status code");
    (status, head.to_string(), body.to_string())
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// Parses `{a="x",b="y"}` (escapes `\\`, `\"`, `\n`); returns the labels and the rest.
fn parse_labels(s: &str) -> Result<(Labels, &str), String> {
    let mut labels = Vec::new();
    let mut rest = s.strip_prefix('{').ok_or("no {")?;
    loop {
        if let Some(after) = rest.strip_prefix('}') {
            return Ok((labels, after));
        }
        let eq = rest.find('=').ok_or("label without =")?;
        let name = &rest[..eq];
        if !valid_name(name) || name.contains(':') {
            return Err(format!("bad label name {name:?}"));
        }
        rest = rest[eq + 1..]
            .strip_prefix('"')
            .ok_or("unquoted label value")?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next() {
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, c @ ('\\' | '"'))) => value.push(c),
                    other => return Err(format!("bad escape {other:?}")),
                },
                Some((_, c)) => value.push(c),
                None => return Err("unterminated label value".to_string()),
            }
        };
        labels.push((name.to_string(), value));
        rest = &rest[end + 1..];
        rest = rest.strip_prefix(',').unwrap_or(rest);
    }
}

fn parse_value(v: &str) -> Result<f64, String> {
    match v {
        "+Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ => v.parse().map_err(|_| format!("bad value {v:?}")),
    }
}

/// A strict reader of the text exposition format: every line is `# HELP`, `# TYPE` or a
/// sample of a declared family; no series twice; histogram buckets cumulative and ending in
/// `+Inf` = `_count`. Returns every sample.
fn parse_exposition(text: &str) -> BTreeMap<Series, f64> {
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    let mut helped: Vec<String> = Vec::new();
    let mut samples = BTreeMap::new();
    assert!(
        text.ends_with('\n'),
        "the exposition must end with a newline"
    );
    for (n, line) in text.lines().enumerate() {
        let fail = |why: &str| -> ! { panic!("line {}: {why}: {line:?}", n + 1) };
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let name = rest.split(' ').next().unwrap_or("");
            if !valid_name(name) || helped.contains(&name.to_string()) {
                fail("bad or repeated HELP");
            }
            helped.push(name.to_string());
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split(' ');
            let (Some(name), Some(kind), None) = (parts.next(), parts.next(), parts.next()) else {
                fail("TYPE needs a name and a type");
            };
            let known = ["counter", "gauge", "histogram", "summary", "untyped"];
            if !valid_name(name) || !known.contains(&kind) || types.contains_key(name) {
                fail("bad or repeated TYPE");
            }
            types.insert(name.to_string(), kind.to_string());
            continue;
        }
        if line.starts_with('#') || line.trim().is_empty() {
            fail("unexpected comment or blank line");
        }
        let name_end = line.find(['{', ' ']).unwrap_or_else(|| fail("no value"));
        let name = &line[..name_end];
        let (labels, rest) = if line[name_end..].starts_with('{') {
            parse_labels(&line[name_end..]).unwrap_or_else(|e| fail(&e))
        } else {
            (Vec::new(), &line[name_end..])
        };
        let value = rest
            .strip_prefix(' ')
            .unwrap_or_else(|| fail("no space before the value"));
        let value = parse_value(value).unwrap_or_else(|e| fail(&e));
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .filter_map(|s| name.strip_suffix(s))
            .find(|f| types.get(*f).is_some_and(|t| t == "histogram"))
            .unwrap_or(name);
        if !types.contains_key(family) || !helped.iter().any(|h| h == family) {
            fail("sample of an undeclared family");
        }
        if types[family] == "counter" && !family.ends_with("_total") {
            fail("counter without _total");
        }
        if samples.insert((name.to_string(), labels), value).is_some() {
            fail("series repeated");
        }
    }
    check_histograms(&types, &samples);
    samples
}

fn check_histograms(types: &BTreeMap<String, String>, samples: &BTreeMap<Series, f64>) {
    for (family, _) in types.iter().filter(|(_, t)| *t == "histogram") {
        let bucket = format!("{family}_bucket");
        let mut buckets: Vec<(f64, f64)> = samples
            .iter()
            .filter(|((n, _), _)| *n == bucket)
            .map(|((_, labels), v)| {
                let le = labels.iter().find(|(k, _)| k == "le").expect("le label");
                (parse_value(&le.1).expect("le value"), *v)
            })
            .collect();
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        assert!(
            buckets.windows(2).all(|w| w[0].1 <= w[1].1),
            "{family} not cumulative"
        );
        let inf = buckets.last().expect("buckets");
        assert!(inf.0.is_infinite(), "{family} lacks +Inf");
        let count = samples[&(format!("{family}_count"), vec![])];
        assert_eq!(inf.1, count, "{family}: +Inf bucket vs _count");
    }
}

fn get(samples: &BTreeMap<Series, f64>, name: &str, labels: &[(&str, &str)]) -> f64 {
    let key = (
        name.to_string(),
        labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    );
    *samples
        .get(&key)
        .unwrap_or_else(|| panic!("no series {key:?}"))
}

fn scrape(addr: SocketAddr) -> BTreeMap<Series, f64> {
    let (status, head, body) = http_get(addr, "/metrics");
    assert_eq!(status, 200, "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    parse_exposition(&body)
}

/// One session that exercises a blocked verb, a masked banner and a relayed message.
fn one_session(addr: SocketAddr) {
    let mut c = Smtp::greeted(addr);
    c.expect("EHLO metrics.test", 250);
    c.expect("VRFY postmaster", 500);
    let done = c
        .message(
            "a@example.test",
            "b@example.test",
            "Subject: m\r\n\r\nhello\r\n",
        )
        .expect("message");
    assert_eq!(done.code, 250, "{done:?}");
    c.expect("QUIT", 221);
}

#[test]
fn metrics_are_scraped_with_curl_and_parse_as_prometheus_text() {
    let sink = Sink::start();
    let dir = Dir::new();
    let policy = dir.write("policy.toml", "mask_banner = true\n");
    let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let (addr, args) = base_args(
        sink.addr,
        &["--policy", &arg(&policy), "--metrics", &metrics.to_string()],
    );
    let p = Proc::start(addr, &args, &[]);
    one_session(addr);
    // Engine counters are published once per second, when the session has ended.
    let relayed = ("mailguard_messages_total", [("outcome", "relayed")]);
    assert!(
        wait_for(WAIT, || get(&scrape(metrics), relayed.0, &relayed.1) == 1.0),
        "the relayed message never showed"
    );
    let m = scrape(metrics);
    let blocked = [("rule", "blocked_verb"), ("verb", "VRFY")];
    assert_eq!(get(&m, "mailguard_policy_decisions_total", &blocked), 1.0);
    let masked = [("rule", "banner_masked")];
    assert_eq!(get(&m, "mailguard_policy_decisions_total", &masked), 1.0);
    assert_eq!(get(&m, "mailguard_sessions_total", &[]), 1.0);
    assert_eq!(get(&m, "mailguard_sessions_open", &[]), 0.0);
    let completed = [("result", "completed")];
    assert_eq!(get(&m, "mailguard_sessions_ended_total", &completed), 1.0);
    assert_eq!(get(&m, "mailguard_replies_total", &[("class", "5xx")]), 1.0);
    assert!(get(&m, "mailguard_replies_total", &[("class", "2xx")]) >= 5.0);
    assert!(get(&m, "mailguard_received_bytes_total", &[("side", "client")]) > 0.0);
    assert!(get(&m, "mailguard_sent_bytes_total", &[("side", "upstream")]) > 0.0);
    assert_eq!(get(&m, "mailguard_upstream_connects_total", &[]), 1.0);
    assert_eq!(
        get(&m, "mailguard_upstream_connect_failures_total", &[]),
        0.0
    );
    assert_eq!(
        get(&m, "mailguard_upstream_connect_seconds_count", &[]),
        1.0
    );
    assert_eq!(get(&m, "mailguard_policy_generation", &[]), 1.0);
    assert_eq!(get(&m, "mailguard_workers", &[]), 2.0);
    assert!(get(&m, "mailguard_ring_buffers", &[("worker", "1")]) > 0.0);
    assert!(
        get(&m, "mailguard_ring_completions_total", &[("worker", "0")]) > 0.0
            || get(&m, "mailguard_ring_completions_total", &[("worker", "1")]) > 0.0
    );

    let (status, _, _) = http_get(metrics, "/nothing-here");
    assert_eq!(status, 404);

    // SIGUSR1 writes the same numbers to the log.
    p.signal("USR1");
    assert!(p.wait_log("messages_relayed=1", 1), "{}", p.log());
    let dump = p.log_lines("messages_relayed=1").remove(0);
    assert!(dump.contains("blocked_verb:VRFY=1"), "{dump}");
}

#[test]
fn a_request_without_end_is_cut_off_at_its_bound() {
    let sink = Sink::start();
    let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let (addr, args) = base_args(sink.addr, &["--metrics", &metrics.to_string()]);
    let _p = Proc::start(addr, &args, &[]);
    let mut s = TcpStream::connect(metrics).expect("connect");
    s.set_read_timeout(Some(WAIT)).expect("timeout");
    let header = format!("GET /metrics HTTP/1.1\r\nX-Fill: {}", "a".repeat(16 * 1024));
    // The responder may close before reading it all; that is the point.
    let _ = s.write_all(header.as_bytes());
    let mut reply = String::new();
    let _ = s.read_to_string(&mut reply);
    assert!(reply.starts_with("HTTP/1.1 431 "), "{reply:?}");
    // And it still serves the next scrape.
    let (status, _, _) = http_get(metrics, "/metrics");
    assert_eq!(status, 200);
}

#[test]
fn json_logs_carry_the_session_and_its_decisions_but_no_content() {
    const BODY_MARKER: &str = "body-marker-7f3a91";
    // AUTH PLAIN of "\0user\0secret-password-99".
    const AUTH_PAYLOAD: &str = "AHVzZXIAc2VjcmV0LXBhc3N3b3JkLTk5";
    let sink = Sink::start();
    let (addr, args) = base_args(sink.addr, &["--log-format", "json", "--log-level", "debug"]);
    let p = Proc::start(addr, &args, &[]);
    let mut c = Smtp::greeted(addr);
    c.expect("EHLO json.test", 250);
    c.expect("VRFY postmaster", 500);
    c.expect(&format!("AUTH PLAIN {AUTH_PAYLOAD}"), 235);
    let body = format!("Subject: secret\r\n\r\n{BODY_MARKER}\r\n");
    let done = c
        .message("a@example.test", "b@example.test", &body)
        .expect("message");
    assert_eq!(done.code, 250);
    c.expect("QUIT", 221);
    assert!(p.wait_log("session ended", 1), "{}", p.log());
    let log = p.log();
    assert!(!log.contains(BODY_MARKER), "a message body reached the log");
    assert!(
        !log.contains(AUTH_PAYLOAD),
        "an AUTH payload reached the log"
    );
    assert!(
        !log.contains("secret-password"),
        "a password reached the log"
    );
    let events: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let ended = events
        .iter()
        .find(|e| e["message"] == "session ended")
        .expect("a session-end event");
    assert_eq!(ended["level"], "INFO");
    assert_eq!(ended["result"], "completed");
    assert_eq!(ended["messages"], 1);
    assert_eq!(ended["upstream"], sink.addr.to_string());
    assert!(ended["client"]
        .as_str()
        .is_some_and(|c| c.starts_with("127.0.0.1:")));
    assert!(ended["duration_ms"].is_u64());
    assert!(ended["bytes_from_client"].as_u64().is_some_and(|b| b > 0));
    assert!(ended["decisions"]
        .as_str()
        .is_some_and(|d| d.contains("blocked_verb:VRFY=1")));
    let decision = events
        .iter()
        .find(|e| e["message"] == "policy decision" && e["rule"] == "blocked_verb")
        .expect("a debug line for the blocked verb");
    assert_eq!(decision["level"], "DEBUG");
    assert_eq!(decision["verb"], "VRFY");
}
