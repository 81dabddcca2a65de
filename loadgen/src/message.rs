//! The message format shared by the sender and the verifying sink.
//!
//! Every message `loadgen send` delivers carries two headers that let the sink prove delivery:
//!
//! ```text
//! Message-ID: <loadgen-RUNID-SEQ@loadgen>
//! X-Loadgen-Check: crc32=XXXXXXXX; len=N
//! ```
//!
//! * `RUNID` is 1 to 32 characters of `[0-9a-z]`, unique per run (the sink keeps one ledger per
//!   run id, so several runs can share one sink); `SEQ` is the decimal sequence number of the
//!   message in its run, `0..M`.
//! * `crc32` (IEEE, lower-case hex) and `len` cover the *body*: the bytes after the blank line
//!   that ends the headers, up to and including the CRLF before the terminating `.`, after
//!   dot-unstuffing: exactly what a receiving MTA stores. Headers are not covered, so a proxy or
//!   MTA may add `Received:` lines without breaking verification.
//!
//! The body is `--size` bytes of text lines (at most 78 characters plus CRLF). Some lines start
//! with `.` and some are a lone `.`, so every message exercises dot-stuffing on the way out and
//! dot-unstuffing on the way in. The body's last line (the trailer) names the run id and the
//! sequence number again: bodies of different messages always differ, so a relay that mixed up
//! bodies between sessions fails the checksum instead of passing unnoticed.
//!
//! Building a message costs no hashing of the body: the constant part of the body (the prefix)
//! is generated, dot-stuffed and hashed once per run; a message clones the prefix's CRC state and
//! adds only the trailer.

use std::io::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

/// Longest run id accepted (sender and sink agree on this).
pub const MAX_RUN_ID: usize = 32;

/// A message template: everything that is the same for every message of a run.
pub struct Template {
    run_id: String,
    from: String,
    to: String,
    date: String,
    /// Body prefix as sent on the wire (dot-stuffed).
    prefix_wire: Vec<u8>,
    /// Unstuffed length of the prefix.
    prefix_len: usize,
    /// CRC state after the unstuffed prefix.
    prefix_crc: crc32fast::Hasher,
    /// Unstuffed body length (prefix + trailer).
    body_len: usize,
}

impl Template {
    /// A template for bodies of `size` bytes (at least one trailer line, about 50 bytes).
    pub fn new(run_id: &str, size: usize, from: &str, to: &str) -> Template {
        let trailer_len = trailer(run_id, 0).len();
        let mut prefix_len = size.saturating_sub(trailer_len);
        // A body is whole CRLF lines; a single leftover byte cannot be one.
        if prefix_len == 1 {
            prefix_len = 2;
        }
        let lines = body_lines(prefix_len, seed_of(run_id));
        let mut prefix_wire = Vec::with_capacity(prefix_len + prefix_len / 40);
        let mut prefix_crc = crc32fast::Hasher::new();
        for line in &lines {
            prefix_crc.update(line);
            if line.first() == Some(&b'.') {
                prefix_wire.push(b'.');
            }
            prefix_wire.extend_from_slice(line);
        }
        Template {
            run_id: run_id.to_string(),
            from: from.to_string(),
            to: to.to_string(),
            date: rfc5322_date(SystemTime::now()),
            prefix_wire,
            prefix_len,
            prefix_crc,
            body_len: prefix_len + trailer_len,
        }
    }

    /// The run id this template stamps into its messages.
    pub fn run_id(&self) -> &str {
        &self.run_id
    }

    /// Unstuffed body length of every message.
    pub fn body_len(&self) -> usize {
        self.body_len
    }

    /// Appends message `seq` (headers and dot-stuffed body, without the final `.` line) to
    /// `out`. Returns the message's unstuffed length (headers + body), i.e. what the sink counts.
    pub fn write_message(&self, seq: u64, out: &mut Vec<u8>) -> usize {
        let trailer = trailer(&self.run_id, seq);
        let mut crc = self.prefix_crc.clone();
        crc.update(trailer.as_bytes());
        let crc = crc.finalize();
        let start = out.len();
        // Writing into a Vec cannot fail.
        let _ = write!(
            out,
            "From: <{from}>\r\nTo: <{to}>\r\nSubject: loadgen {run} message {seq}\r\n\
             Date: {date}\r\nMessage-ID: <loadgen-{run}-{seq}@loadgen>\r\n\
             X-Loadgen-Check: crc32={crc:08x}; len={len}\r\nMIME-Version: 1.0\r\n\
             Content-Type: text/plain; charset=us-ascii\r\n\r\n",
            from = self.from,
            to = self.to,
            run = self.run_id,
            date = self.date,
            len = self.body_len,
        );
        let headers = out.len() - start;
        out.extend_from_slice(&self.prefix_wire);
        out.extend_from_slice(trailer.as_bytes());
        headers + self.prefix_len + trailer.len()
    }
}

/// The body's last line. Fixed width for a given run id so every body has the same length.
fn trailer(run_id: &str, seq: u64) -> String {
    format!("loadgen trailer {run_id} {seq:020}\r\n")
}

/// A deterministic seed from the run id, so a run's bodies are reproducible.
fn seed_of(run_id: &str) -> u64 {
    run_id.bytes().fold(0x9e37_79b9_7f4a_7c15, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

/// xorshift64*: a tiny deterministic generator; body text needs no better.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

const WORDS: &[&str] = &[
    "the",
    "message",
    "relay",
    "server",
    "queue",
    "delivery",
    "mail",
    "of",
    "and",
    "to",
    "a",
    "policy",
    "inspection",
    "proxy",
    "session",
    "client",
    "upstream",
    "report",
    "status",
    "is",
    "for",
    "with",
    "on",
    "this",
    "that",
    "will",
    "be",
    "meeting",
    "tomorrow",
    "please",
    "find",
    "attached",
    "invoice",
    "regards",
    "thanks",
    "update",
    "schedule",
    "project",
    "review",
    "team",
    "budget",
    "quarter",
    "results",
    "agenda",
    "notes",
    "question",
    "answer",
    "system",
    "load",
    "test",
    "number",
    "line",
    "text",
    "body",
    "header",
    "network",
    "latency",
    "throughput",
];

/// Unstuffed body lines (each ends in CRLF) totalling exactly `len` bytes (`len` != 1).
fn body_lines(len: usize, seed: u64) -> Vec<Vec<u8>> {
    let mut rng = Rng(seed | 1);
    let mut lines = Vec::new();
    let mut rem = len;
    while rem > 0 {
        // Line length including CRLF: 2..=80. Keep the remainder splittable into lines.
        let total = if rem <= 80 {
            rem
        } else if rem <= 160 {
            rem / 2
        } else if rng.below(48) == 0 {
            3 // a lone "." line
        } else {
            42 + rng.below(39) as usize
        };
        let mut line = Vec::with_capacity(total);
        text_line(&mut rng, total - 2, &mut line);
        line.extend_from_slice(b"\r\n");
        rem -= total;
        lines.push(line);
    }
    lines
}

/// Exactly `n` (<= 78) characters of word text; one line in sixteen starts with a dot.
fn text_line(rng: &mut Rng, n: usize, out: &mut Vec<u8>) {
    let start = out.len();
    if n == 1 {
        out.push(b'.');
        return;
    }
    if n > 0 && rng.below(16) == 0 {
        out.push(b'.');
    }
    while out.len() - start < n {
        let room = n - (out.len() - start);
        let word = WORDS[rng.below(WORDS.len() as u64) as usize].as_bytes();
        let sep = usize::from(out.len() > start && out[out.len() - 1] != b'.');
        if word.len() + sep <= room {
            if sep == 1 {
                out.push(b' ');
            }
            out.extend_from_slice(word);
        } else {
            // Pad the end of the line with letters so the length is exact.
            out.extend(std::iter::repeat_n(b'x', room));
        }
    }
}

/// `Date:` header value for `t` (UTC), without a calendar crate.
fn rfc5322_date(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    const WD: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MON: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    format!(
        "{}, {} {} {} {:02}:{:02}:{:02} +0000",
        WD[days.rem_euclid(7) as usize],
        day,
        MON[(month - 1) as usize],
        year,
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// A fresh run id: 12 base-36 characters from the clock and the process id.
pub fn new_run_id() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let mut x = nanos ^ (u64::from(std::process::id()) << 40);
    let mut rng = Rng(x | 1);
    x = rng.next();
    const DIGITS: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    (0..12)
        .map(|_| {
            let d = DIGITS[(x % 36) as usize] as char;
            x /= 36;
            d
        })
        .collect()
}

/// Whether `id` is a valid run id (`[0-9a-z]{1,32}`).
pub fn valid_run_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_RUN_ID
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase())
}

/// Parses a `Message-ID` header value `<loadgen-RUNID-SEQ@loadgen>` into (run id, seq).
pub fn parse_message_id(value: &[u8]) -> Option<(&[u8], u64)> {
    let v = value.trim_ascii();
    let v = v.strip_prefix(b"<loadgen-")?.strip_suffix(b"@loadgen>")?;
    let dash = v.iter().position(|&b| b == b'-')?;
    let (run, seq) = (&v[..dash], &v[dash + 1..]);
    if run.is_empty()
        || run.len() > MAX_RUN_ID
        || !run
            .iter()
            .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase())
    {
        return None;
    }
    Some((run, parse_u64(seq)?))
}

/// Parses an `X-Loadgen-Check` header value `crc32=XXXXXXXX; len=N` into (crc, len).
pub fn parse_check(value: &[u8]) -> Option<(u32, u64)> {
    let v = value.trim_ascii();
    let v = v.strip_prefix(b"crc32=")?;
    if v.len() < 8 || !v[..8].iter().all(u8::is_ascii_hexdigit) {
        return None;
    }
    let crc = u32::from_str_radix(std::str::from_utf8(&v[..8]).ok()?, 16).ok()?;
    let len = v[8..].strip_prefix(b"; len=")?;
    Some((crc, parse_u64(len)?))
}

/// Strict decimal u64 (no sign, no spaces, no overflow).
pub fn parse_u64(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 20 {
        return None;
    }
    s.iter().try_fold(0u64, |acc, &b| {
        if b.is_ascii_digit() {
            acc.checked_mul(10)?.checked_add(u64::from(b - b'0'))
        } else {
            None
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Unstuffs a wire body the naive way: split at CRLF, drop one leading dot per line.
    fn unstuff(wire: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        for line in wire.split_inclusive(|&b| b == b'\n') {
            out.extend_from_slice(line.strip_prefix(b".").unwrap_or(line));
        }
        out
    }

    #[test]
    fn body_has_exact_size_short_lines_and_valid_check() {
        for size in [0, 1, 2, 3, 50, 51, 52, 100, 1024, 4096, 102_400] {
            let t = Template::new("abc123", size, "a@x", "b@y");
            let mut out = Vec::new();
            let content = t.write_message(7, &mut out);
            let split = out.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
            let body = unstuff(&out[split..]);
            assert_eq!(content, split + body.len());
            assert_eq!(body.len(), t.body_len());
            assert!(
                size < 60 || body.len() == size,
                "size {size}: {}",
                body.len()
            );
            assert!(body.ends_with(b"\r\n"));
            for line in out.split(|&b| b == b'\n') {
                assert!(
                    line.len() <= 80,
                    "line too long: {:?}",
                    String::from_utf8_lossy(line)
                );
            }
            let headers = &out[..split];
            let find = |name: &str| {
                headers
                    .split(|&b| b == b'\n')
                    .find_map(|l| l.strip_prefix(name.as_bytes()))
                    .map(|v| v.trim_ascii().to_vec())
                    .unwrap()
            };
            let (run, seq) = parse_message_id(&find("Message-ID:"))
                .map(|(r, s)| (r.to_vec(), s))
                .unwrap();
            assert_eq!((run.as_slice(), seq), (&b"abc123"[..], 7));
            let (crc, len) = parse_check(&find("X-Loadgen-Check:")).unwrap();
            assert_eq!(crc, crc32fast::hash(&body));
            assert_eq!(len as usize, body.len());
        }
    }

    #[test]
    fn bodies_exercise_dot_stuffing_and_differ_per_message() {
        let t = Template::new("r", 8192, "a@x", "b@y");
        let (mut a, mut b) = (Vec::new(), Vec::new());
        t.write_message(1, &mut a);
        t.write_message(2, &mut b);
        assert!(a.windows(3).any(|w| w == b"\n.."), "no stuffed line");
        assert_ne!(a, b);
    }

    #[test]
    fn id_and_check_parsers_reject_garbage() {
        assert_eq!(
            parse_message_id(b" <loadgen-ab-12@loadgen> "),
            Some((&b"ab"[..], 12))
        );
        for bad in [
            &b"<loadgen--1@loadgen>"[..],
            b"<loadgen-AB-1@loadgen>",
            b"<loadgen-ab-@loadgen>",
            b"<loadgen-ab-1x@loadgen>",
            b"<x-ab-1@loadgen>",
            b"<loadgen-ab-99999999999999999999999@loadgen>",
        ] {
            assert_eq!(
                parse_message_id(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        assert_eq!(parse_check(b"crc32=0000000f; len=3"), Some((15, 3)));
        assert_eq!(parse_check(b"crc32=0000000g; len=3"), None);
        assert_eq!(parse_check(b"crc32=0000000f len=3"), None);
        assert!(valid_run_id(&new_run_id()));
    }

    #[test]
    fn date_is_rfc5322() {
        let t = UNIX_EPOCH + std::time::Duration::from_secs(1_795_000_000);
        assert_eq!(rfc5322_date(t), "Wed, 18 Nov 2026 11:06:40 +0000");
    }
}
