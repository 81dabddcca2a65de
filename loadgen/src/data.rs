//! The sink's DATA scanner and message verifier.
//!
//! This is deliberately an implementation independent of mailguard's own `proto::data`
//! scanner: the sink is the oracle mailguard is measured against, and a shared scanner would
//! share its bugs (an end of data found in the wrong place is exactly the kind of bug the oracle
//! must catch, SMTP smuggling being the famous case).
//!
//! Rules (RFC 5321 4.5.2, strict):
//! * data ends only at `CRLF . CRLF`; the CRLF of the `DATA` command line counts as the first
//!   CRLF, so a message may be empty. `LF . LF`, `LF . CRLF`, `CRLF . LF` and friends are data.
//! * a line is what lies between two CRLFs; a line that starts with `.` and is not the end
//!   loses that dot (dot-unstuffing). Bare LF and bare CR are ordinary data bytes.
//!
//! The scanner is a five-state machine that survives any split of the input into reads; inside
//! a line it jumps to the next CR with `memchr`, so a body line costs one `memchr` call and a
//! handful of state steps.

use crate::message::{parse_check, parse_message_id};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Just after CRLF (or at the very start of the data).
    LineStart,
    /// A `.` at line start, dropped from the content.
    Dot,
    /// `.` CR at line start: end of data if LF follows.
    DotCr,
    /// Inside a line.
    Mid,
    /// A CR inside a line: a line break if LF follows.
    Cr,
}

/// Finds the end of a DATA body and yields its content, dot-unstuffed.
#[derive(Debug)]
pub struct DataScanner {
    state: State,
}

impl Default for DataScanner {
    fn default() -> Self {
        Self::new()
    }
}

impl DataScanner {
    /// A scanner positioned at the start of a message (just after `DATA` CRLF).
    pub fn new() -> DataScanner {
        DataScanner {
            state: State::LineStart,
        }
    }

    /// Scans `input`, calling `emit` with runs of content bytes in order. Returns
    /// `Some(n)` when the end-of-data line ends at `input[n - 1]` (the bytes after `n` are the
    /// next commands), `None` when all of `input` is message data and more is needed.
    pub fn scan(&mut self, input: &[u8], mut emit: impl FnMut(&[u8])) -> Option<usize> {
        let len = input.len();
        let mut i = 0;
        // Start of the content run not yet emitted.
        let mut run = 0;
        while i < len {
            match self.state {
                State::LineStart => {
                    if input[i] == b'.' {
                        if i > run {
                            emit(&input[run..i]);
                        }
                        i += 1;
                        run = i;
                        self.state = State::Dot;
                    } else {
                        self.state = State::Mid;
                    }
                }
                State::Dot => {
                    if input[i] == b'\r' {
                        // Held back: part of the terminator if LF follows.
                        i += 1;
                        run = i;
                        self.state = State::DotCr;
                    } else {
                        self.state = State::Mid;
                    }
                }
                State::DotCr => {
                    if input[i] == b'\n' {
                        self.state = State::LineStart;
                        return Some(i + 1);
                    }
                    // Not the end: the held-back CR is content (the dot stays dropped).
                    emit(b"\r");
                    self.state = State::Cr;
                }
                State::Mid => match memchr::memchr(b'\r', &input[i..]) {
                    Some(p) => {
                        i += p + 1;
                        self.state = State::Cr;
                    }
                    None => i = len,
                },
                State::Cr => {
                    self.state = match input[i] {
                        b'\n' => State::LineStart,
                        b'\r' => State::Cr,
                        _ => State::Mid,
                    };
                    i += 1;
                }
            }
        }
        if len > run {
            emit(&input[run..len]);
        }
        None
    }
}

/// Largest header block the verifier keeps; a message whose headers do not end within it cannot
/// be a loadgen message and is reported as corrupted or foreign.
const MAX_HEADER: usize = 64 * 1024;

/// What a finished message turned out to be.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict<'a> {
    /// A loadgen message whose body matches its check header.
    Intact { run: &'a [u8], seq: u64 },
    /// A loadgen message id, but the check header is missing, malformed or does not match.
    Corrupt { run: &'a [u8], seq: u64 },
    /// No loadgen message id: not a loadgen message, or its headers were damaged.
    Foreign,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Header,
    Body,
    /// Header block too large: ignore the rest.
    Overflow,
}

/// Collects one message's headers and checksums its body as content arrives.
pub struct Verifier {
    phase: Phase,
    header: Vec<u8>,
    crc: crc32fast::Hasher,
    body_len: u64,
}

impl Default for Verifier {
    fn default() -> Self {
        Self::new()
    }
}

impl Verifier {
    /// An empty verifier.
    pub fn new() -> Verifier {
        Verifier {
            phase: Phase::Header,
            header: Vec::new(),
            crc: crc32fast::Hasher::new(),
            body_len: 0,
        }
    }

    /// Starts a new message, keeping the header buffer's allocation.
    pub fn reset(&mut self) {
        self.phase = Phase::Header;
        self.header.clear();
        self.crc = crc32fast::Hasher::new();
        self.body_len = 0;
    }

    /// Feeds message content (unstuffed DATA content, or BDAT chunk bytes).
    pub fn feed(&mut self, bytes: &[u8]) {
        match self.phase {
            Phase::Body => {
                self.crc.update(bytes);
                self.body_len += bytes.len() as u64;
            }
            Phase::Overflow => {}
            Phase::Header => {
                let old = self.header.len();
                self.header.extend_from_slice(bytes);
                // The blank line ends the headers; it may straddle two feeds. A message that
                // starts with CRLF has no headers at all.
                let end = if self.header.starts_with(b"\r\n") {
                    Some(0)
                } else {
                    let from = old.saturating_sub(3);
                    memchr::memmem::find(&self.header[from..], b"\r\n\r\n").map(|p| from + p + 2)
                };
                match end {
                    Some(e) => {
                        let body = &self.header[e + 2..];
                        self.crc.update(body);
                        self.body_len += body.len() as u64;
                        self.header.truncate(e);
                        self.phase = Phase::Body;
                    }
                    None if self.header.len() > MAX_HEADER => {
                        self.header.truncate(MAX_HEADER);
                        self.phase = Phase::Overflow;
                    }
                    None => {}
                }
            }
        }
    }

    /// Judges the message fed since the last reset.
    pub fn finish(&mut self) -> Verdict<'_> {
        let mut id = None;
        let mut check = None;
        for line in self.header.split(|&b| b == b'\n') {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if let Some(v) = strip_name(line, b"message-id:") {
                id = parse_message_id(v);
            } else if let Some(v) = strip_name(line, b"x-loadgen-check:") {
                check = parse_check(v);
            }
        }
        let Some((run, seq)) = id else {
            return Verdict::Foreign;
        };
        let intact = self.phase == Phase::Body
            && check.is_some_and(|(crc, len)| {
                len == self.body_len && crc == self.crc.clone().finalize()
            });
        if intact {
            Verdict::Intact { run, seq }
        } else {
            Verdict::Corrupt { run, seq }
        }
    }
}

/// The value of a header line if its name (with colon, lower case) is `name`.
fn strip_name<'a>(line: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
    (line.len() >= name.len() && line[..name.len()].eq_ignore_ascii_case(name))
        .then(|| &line[name.len()..])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Template;

    /// The reference: split into CRLF lines, stop at ".", unstuff the others.
    fn reference(input: &[u8]) -> (Vec<u8>, Option<usize>) {
        let mut out = Vec::new();
        let mut pos = 0;
        // Lines are delimited by CRLF only; a trailing partial line is content.
        while pos < input.len() {
            let rest = &input[pos..];
            match memchr::memmem::find(rest, b"\r\n") {
                Some(e) => {
                    let line = &rest[..e + 2];
                    if line == b".\r\n" {
                        return (out, Some(pos + 3));
                    }
                    out.extend_from_slice(line.strip_prefix(b".").unwrap_or(line));
                    pos += e + 2;
                }
                None => {
                    // Incomplete last line: the dot is dropped only if it starts the line and
                    // more follows (a lone "." might still become the end).
                    out.extend_from_slice(rest.strip_prefix(b".").unwrap_or(rest));
                    break;
                }
            }
        }
        (out, None)
    }

    /// Scans `input` split at `cuts`, returning content and end offset.
    fn scan_split(input: &[u8], cuts: &[usize]) -> (Vec<u8>, Option<usize>) {
        let mut s = DataScanner::new();
        let mut out = Vec::new();
        let mut prev = 0;
        for &c in cuts.iter().chain(std::iter::once(&input.len())) {
            if c < prev {
                continue;
            }
            if let Some(n) = s.scan(&input[prev..c], |b| out.extend_from_slice(b)) {
                return (out, Some(prev + n));
            }
            prev = c;
        }
        (out, None)
    }

    const CASES: &[&[u8]] = &[
        b".\r\n",
        b"a\r\n.\r\nMAIL",
        b"..\r\n.\r\n",
        b".x\r\n..y\r\n.\r\n",
        b"a\n.\nb\r\n.\r\n",
        b"a\r\n.\nb\r\n.\r\n",
        b"a\n.\r\nb\r\n.\r\n",
        b"a\r.\r\nb\r\n.\r\n",
        b".\r.\r\n.\r\r\n.\r\n",
        b"x\r\r\n.\r\n",
        b"\r\n\r\n.\r\n",
        b"no end\r\n.",
        b"no end\r\n.\r",
        b"line\r\n.. \r\n",
    ];

    #[test]
    fn matches_reference_under_every_two_way_split() {
        for case in CASES {
            let want = reference(case);
            for cut in 0..=case.len() {
                let got = scan_split(case, &[cut]);
                if want.1.is_some() {
                    assert_eq!(
                        got,
                        want,
                        "case {:?} cut {cut}",
                        String::from_utf8_lossy(case)
                    );
                } else {
                    // Unterminated: the scanner may still hold back a trailing "." / ".\r".
                    assert_eq!(got.1, None);
                    assert!(want.0.starts_with(&got.0));
                }
            }
        }
    }

    #[test]
    fn one_byte_at_a_time_equals_whole() {
        let t = Template::new("z", 20_000, "a@x", "b@y");
        let mut msg = Vec::new();
        t.write_message(3, &mut msg);
        msg.extend_from_slice(b".\r\nQUIT\r\n");
        let whole = scan_split(&msg, &[]);
        let cuts: Vec<usize> = (1..msg.len()).collect();
        assert_eq!(scan_split(&msg, &cuts), whole);
        assert_eq!(whole.1, Some(msg.len() - 6));
        assert_eq!(whole, reference(&msg));
    }

    #[test]
    fn verifier_accepts_template_and_catches_a_flipped_byte() {
        let t = Template::new("run1", 3000, "a@x", "b@y");
        let mut msg = Vec::new();
        t.write_message(42, &mut msg);
        msg.extend_from_slice(b".\r\n");
        let mut v = Verifier::new();
        // Wire bytes in small reads, unstuffed through the scanner.
        let mut s = DataScanner::new();
        for chunk in msg.chunks(7) {
            s.scan(chunk, |b| v.feed(b));
        }
        assert_eq!(
            v.finish(),
            Verdict::Intact {
                run: b"run1",
                seq: 42
            }
        );

        let last = msg.len() - 10;
        msg[last] ^= 1;
        v.reset();
        let mut s = DataScanner::new();
        s.scan(&msg, |b| v.feed(b));
        assert_eq!(
            v.finish(),
            Verdict::Corrupt {
                run: b"run1",
                seq: 42
            }
        );

        v.reset();
        v.feed(b"Subject: hi\r\n\r\nbody\r\n");
        assert_eq!(v.finish(), Verdict::Foreign);
    }
}
