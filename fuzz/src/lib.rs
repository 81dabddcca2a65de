//! The bodies of the fuzz targets, as plain functions: `cargo fuzz` runs them under libFuzzer
//! (`fuzz_targets/*.rs`), and the stable test `tests/fuzz_replay.rs` replays every corpus file
//! through the very same code (it includes this file by path), so CI checks the invariants on
//! the committed corpus without a nightly toolchain.
//!
//! Two targets:
//! - [`engine`]: drives [`mailguard::proto::Session`] through the [`Proxy`] trait with a
//!   script decoded from the input: client bytes (raw, from a dictionary of SMTP phrases,
//!   repeated, split), a model upstream whose replies are delivered whole or in pieces,
//!   injected upstream garbage, connection failures and closes on both sides, the clock, and
//!   shutdown. The invariants are asserted inside (see [`Harness`]).
//! - [`scanner`]: [`DataScanner`] over an input cut at arbitrary points, against a naive
//!   byte-at-a-time oracle written from the module's documentation ([`oracle`]), plus a strict
//!   and a lenient reader of its output.
//!
//! Every failed invariant panics with a message naming it, which libFuzzer reports as a crash.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mailguard::config::Policy;
use mailguard::proto::data::{Bare, DataScanner, Piece};
use mailguard::proto::Session;
use mailguard::relay::{Action, Proxy, Side};

// ---------------------------------------------------------------------------------------------
// Input reader
// ---------------------------------------------------------------------------------------------

/// Reads a fuzz input front to back; past the end every read is zero/empty.
struct Input<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Input<'a> {
    fn new(data: &'a [u8]) -> Self {
        Input { data, pos: 0 }
    }
    fn done(&self) -> bool {
        self.pos >= self.data.len()
    }
    fn u8(&mut self) -> u8 {
        let b = self.data.get(self.pos).copied().unwrap_or(0);
        self.pos += 1;
        b
    }
    fn u16(&mut self) -> u16 {
        u16::from(self.u8()) | (u16::from(self.u8()) << 8)
    }
    fn bytes(&mut self, n: usize) -> &'a [u8] {
        let start = self.pos.min(self.data.len());
        let end = (start + n).min(self.data.len());
        self.pos = start + n;
        &self.data[start..end]
    }
}

// ---------------------------------------------------------------------------------------------
// Engine target
// ---------------------------------------------------------------------------------------------

/// Client phrases the script can name by index (so the fuzzer reaches deep states quickly).
pub const PHRASES: &[&[u8]] = &[
    b"EHLO c.test\r\n",
    b"HELO c.test\r\n",
    b"MAIL FROM:<a@b.test>\r\n",
    b"RCPT TO:<c@d.test>\r\n",
    b"DATA\r\n",
    b"Subject: x\r\n\r\nbody\r\n",
    b".\r\n",
    b"\r\n.\r\n",
    b"\n.\n",
    b"\n.\r\n",
    b"\r.\r",
    b"..\r\n",
    b"BDAT 5\r\n",
    b"BDAT 5 LAST\r\n",
    b"BDAT 0 LAST\r\n",
    b"12345",
    b"RSET\r\n",
    b"NOOP\r\n",
    b"QUIT\r\n",
    b"AUTH PLAIN\r\n",
    b"AUTH LOGIN dXNlcg==\r\n",
    b"dXNlcg==\r\n",
    b"*\r\n",
    b"STARTTLS\r\n",
    b"VRFY x\r\n",
    b"GET / HTTP/1.1\r\n",
    b"\x16\x03\x01\x00\x05hello",
    b"MAIL FROM:<a|b@c.test>\r\n",
    b"MAIL FROM:<a@b.test> SIZE=99999999\r\n",
    b"\x00",
    b"\r",
    b"\n",
    b"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
    b"RCPT TO:<e@f.test>\r\nRCPT TO:<g@h.test>\r\n",
    b"\r\n\x00.\r\n",
    b"\r\n. \r\n",
    b"MAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nDATA\r\n",
    b"BDAT 3\r\nabcBDAT 2 LAST\r\nde",
    b"From: x\r\nTo: y\r\nContent-Type: text/plain\r\n\r\n",
    b"\xc3\xa9\xff\xfe",
];

/// Upstream replies the script can inject out of turn (a misbehaving upstream).
pub const INJECT: &[&[u8]] = &[
    b"421 4.3.2 going away\r\n",
    b"250 ok\r\n",
    b"354 go ahead\r\n",
    b"334 \r\n",
    b"220 hello again\r\n",
    b"250-partial\r\n",
    b"\r\n",
    b"500 nope\r\n",
    b"999 bad\r\n",
    b"250 ok\n",
    b"235 2.7.0 ok\r\n",
    b"221 bye\r\n",
    b"452 4.5.3 full\r\n",
    b"550-a\r\n550 b\r\n",
];

/// Patterns the script can repeat many times (floods, long lines, big bodies).
pub const REPEAT: &[&[u8]] = &[
    b"NOOP\r\n",
    b"x",
    b"RCPT TO:<r@d.test>\r\n",
    b"line of body\r\n",
    b"\n",
    b"\r\n.\r\n",
    b"VRFY x\r\n",
    b"a\nb\r",
];

/// Most client bytes one input may produce with the repeat op.
const MAX_REPEAT: usize = 320 * 1024;

/// Bytes one engine may hold, measured as the length of its `Debug` output (which prints every
/// buffered byte): the 256 KiB of held client input, a line, the reply parser, the pending
/// replies, printed at up to five characters a byte, with room to spare.
pub const MAX_DEBUG_LEN: usize = 4 << 20;

/// The policy a script starts with, from its first two bytes.
pub fn policy_text(bits: u8, timeouts: u8) -> String {
    let mut p = String::new();
    p.push_str(if bits & 1 != 0 {
        "bare_lf = \"reject\"\n"
    } else {
        "bare_lf = \"normalize\"\n"
    });
    if bits & 2 != 0 {
        p.push_str(
            "max_line_length = 64\nmax_recipients = 2\nmax_message_size = 100\nhard_error_limit = 5\n",
        );
    }
    if bits & 4 != 0 {
        p.push_str("blocked_reply = \"ok\"\n");
    }
    if bits & 8 != 0 {
        p.push_str("starttls = \"strip\"\n");
    }
    if bits & 16 != 0 {
        p.push_str("mode = \"rfc821\"\n");
    }
    if bits & 32 != 0 {
        p.push_str("check_addresses = true\n");
    }
    if bits & 64 != 0 {
        p.push_str("mask_banner = true\n");
    }
    p.push_str(if bits & 128 != 0 {
        "min_data_rate = 0\n"
    } else {
        "min_data_rate = 10\n"
    });
    let t = |shift: u8| 1 + u64::from((timeouts >> shift) & 3);
    p.push_str(&format!(
        "greeting_timeout = {}\ncommand_timeout = {}\ndata_timeout = {}\nfinal_timeout = {}\n",
        t(0),
        t(2),
        t(4),
        t(6)
    ));
    p
}

thread_local! {
    static POLICIES: std::cell::RefCell<std::collections::HashMap<(u8, u8), Arc<Policy>>> =
        std::cell::RefCell::new(std::collections::HashMap::new());
}

/// The parsed policy for the two header bytes (parsed once per thread and reused).
fn policy_for(bits: u8, timeouts: u8) -> Arc<Policy> {
    POLICIES.with(|cache| {
        cache
            .borrow_mut()
            .entry((bits, timeouts))
            .or_insert_with(|| {
                let text = policy_text(bits, timeouts);
                Arc::new(Policy::parse(&text, "fuzz").expect("the fuzz policies are valid"))
            })
            .clone()
    })
}

/// The upstream's state, as far as the model understands the dialogue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ModelMode {
    Command,
    Data,
    Bdat {
        remaining: usize,
        last: bool,
    },
    /// Awaiting an AUTH continuation line.
    Sasl,
    /// After its 220 to STARTTLS: swallows everything.
    Tls,
}

/// A well-behaved upstream MTA, one connection at a time: it parses what the engine sends
/// and queues strict, unique replies. Its end-of-data reply names a token (`queued as Q<n>`)
/// that lets the harness check the client saw each acceptance only after the upstream sent it.
#[derive(Debug)]
struct Model {
    mode: ModelMode,
    /// Bytes received and not yet parsed (a partial line).
    line: Vec<u8>,
    /// The last bytes of the DATA phase, to find the strict end.
    tail: Vec<u8>,
    /// Body bytes received in this DATA phase.
    data_len: usize,
    /// The previous DATA byte (for bare CR / LF detection).
    prev: Option<u8>,
    mail: bool,
    rcpt: bool,
    /// Replies not yet delivered to the engine.
    replies: Vec<u8>,
    /// Close the connection once `replies` is delivered (after 221).
    close_after: bool,
    /// The whole greeting reached the engine (it may speak now).
    greeted: bool,
    /// The last reply byte delivered to the engine.
    last_delivered: Option<u8>,
    /// Reply bytes queued so far and delivered so far, on this connection.
    queued_total: usize,
    delivered_total: usize,
    /// Acceptance tokens not yet delivered whole: (queued offset just past the token's
    /// last digit and the byte after it, token).
    tokens: Vec<(usize, u64)>,
}

const GREETING: &[u8] = b"220 model.test ESMTP\r\n";

impl Model {
    fn new() -> Model {
        Model {
            mode: ModelMode::Command,
            line: Vec::new(),
            tail: Vec::new(),
            data_len: 0,
            prev: None,
            mail: false,
            rcpt: false,
            replies: GREETING.to_vec(),
            close_after: false,
            greeted: false,
            last_delivered: None,
            queued_total: GREETING.len(),
            delivered_total: 0,
            tokens: Vec::new(),
        }
    }
}

/// The state of the harness's upstream connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    None,
    Connecting,
    Open,
}

/// One engine session between a scripted client and a [`Model`] upstream, with the invariant
/// checks. Each check panics with `invariant: ...`.
pub struct Harness {
    session: Session,
    t0: Instant,
    now: Instant,
    bare: Bare,
    link: Link,
    model: Model,
    /// The model may no longer match the engine's view (an injected reply, a fault).
    desynced: bool,
    /// Sessions this harness saw STARTTLS succeed in (the client bytes become opaque).
    opaque: bool,
    closed: bool,
    client_closed: bool,
    /// Every byte the engine sent the client.
    to_client: Vec<u8>,
    /// Where the scan for acceptance tokens in `to_client` resumes.
    to_client_scanned: usize,
    /// Tokens the model queued and the engine received.
    delivered_tokens: HashSet<u64>,
    seen_tokens: HashSet<u64>,
    next_token: u64,
    /// Messages the model accepted; frozen once the client is gone.
    accepted: u64,
    accepted_at_client_close: Option<u64>,
    auto: bool,
    ops: usize,
    /// Garbage was injected into the middle of one of the model's replies, so a token the
    /// client sees may be half the model's and half the garbage's: stop checking tokens.
    tokens_unreliable: bool,
}

impl Harness {
    fn new(policy: Arc<Policy>) -> Harness {
        let bare = match policy.bare_lf {
            mailguard::config::BareLf::Reject => Bare::Reject,
            mailguard::config::BareLf::Normalize => Bare::Normalize,
        };
        let t0 = Instant::now();
        Harness {
            session: Session::new(policy, t0),
            t0,
            now: t0,
            bare,
            link: Link::None,
            model: Model::new(),
            desynced: false,
            opaque: false,
            closed: false,
            client_closed: false,
            to_client: Vec::new(),
            to_client_scanned: 0,
            delivered_tokens: HashSet::new(),
            seen_tokens: HashSet::new(),
            next_token: 1,
            accepted: 0,
            accepted_at_client_close: None,
            auto: true,
            ops: 0,
            tokens_unreliable: false,
        }
    }

    /// Runs one engine call and applies its actions.
    fn call(&mut self, input: &[u8], f: impl FnOnce(&mut Session, &mut Vec<Action>)) {
        let mut out = Vec::new();
        f(&mut self.session, &mut out);
        if self.closed {
            assert!(
                out.is_empty(),
                "invariant: actions after Close: {:?}",
                out.first()
            );
            return;
        }
        let mut closed_at = None;
        for (i, a) in out.iter().enumerate() {
            if let Some(c) = closed_at {
                panic!("invariant: action {a:?} after Close (at {c}) in one call");
            }
            match a {
                Action::Connect => {
                    assert!(
                        self.link == Link::None,
                        "invariant: Connect while the upstream link is {:?}",
                        self.link
                    );
                    self.link = Link::Connecting;
                    self.model = Model::new();
                    if self.desynced {
                        // Start the line checks afresh on a connection the model understands.
                        self.to_client.clear();
                        self.to_client_scanned = 0;
                        self.desynced = false;
                    }
                }
                Action::Send(Side::Client, c) => {
                    let bytes = c.bytes(input).to_vec();
                    self.to_client.extend_from_slice(&bytes);
                }
                Action::Send(Side::Upstream, c) => {
                    assert!(
                        self.link == Link::Open && self.model.greeted,
                        "invariant: bytes for the upstream while the link is {:?} (greeted: {}): {:?}",
                        self.link,
                        self.model.greeted,
                        String::from_utf8_lossy(c.bytes(input))
                    );
                    let bytes = c.bytes(input).to_vec();
                    self.model_receive(&bytes);
                }
                Action::CloseUpstream => {
                    self.link = Link::None;
                }
                Action::Close => {
                    closed_at = Some(i);
                    self.closed = true;
                    self.link = Link::None;
                }
            }
        }
        self.check_client_stream();
    }

    /// Every acceptance the client sees was sent by the upstream first, and only once.
    fn check_client_stream(&mut self) {
        const NEEDLE: &[u8] = b"queued as Q";
        let hay = &self.to_client[self.to_client_scanned.saturating_sub(NEEDLE.len() + 20)..];
        let mut i = 0;
        let mut found = Vec::new();
        while let Some(p) = find(&hay[i..], NEEDLE) {
            let start = i + p + NEEDLE.len();
            let digits: Vec<u8> = hay[start..]
                .iter()
                .copied()
                .take_while(u8::is_ascii_digit)
                .collect();
            // A token is complete once a non-digit follows it.
            if start + digits.len() < hay.len() {
                if let Ok(n) = std::str::from_utf8(&digits).unwrap_or("").parse::<u64>() {
                    found.push(n);
                }
            }
            i = start;
        }
        for n in found {
            if self.seen_tokens.contains(&n) {
                continue; // the overlap of the rescanned window
            }
            assert!(
                self.tokens_unreliable || self.delivered_tokens.contains(&n),
                "invariant: the client saw `queued as Q{n}` the upstream never sent"
            );
            self.seen_tokens.insert(n);
        }
        self.to_client_scanned = self.to_client.len();
        if !self.desynced && !self.opaque {
            // Replies to the client are whole lines: `ddd ` or `ddd-` ... CRLF.
            for line in self.to_client.split(|&b| b == b'\n') {
                if line.is_empty() {
                    continue;
                }
                let ok = line.len() >= 4
                    && line[..3].iter().all(u8::is_ascii_digit)
                    && matches!(line[3], b' ' | b'-');
                assert!(
                    ok || !line.ends_with(b"\r"),
                    "invariant: malformed reply line to the client: {:?}",
                    String::from_utf8_lossy(line)
                );
            }
            let keep = self.to_client.iter().rposition(|&b| b == b'\n');
            if let Some(k) = keep {
                self.to_client.drain(..=k);
                self.to_client_scanned = self.to_client.len();
            }
        } else if self.to_client.len() > 64 {
            // Not checked line by line; keep a tail for tokens split across calls.
            let cut = self.to_client.len() - 64;
            self.to_client.drain(..cut);
            self.to_client_scanned = self.to_client.len();
        }
    }

    fn queue_reply(&mut self, r: &[u8]) {
        self.model.replies.extend_from_slice(r);
        self.model.queued_total += r.len();
    }

    fn accept_message(&mut self) {
        let n = self.next_token;
        self.next_token += 1;
        self.accepted += 1;
        if let Some(frozen) = self.accepted_at_client_close {
            assert!(
                self.desynced || self.accepted == frozen,
                "invariant: a message was completed upstream after the client had gone"
            );
        }
        self.model.mail = false;
        self.model.rcpt = false;
        let reply = format!("250 2.0.0 queued as Q{n}\r\n");
        // Delivered once everything up to the `\r` after the digits went to the engine.
        let at = self.model.queued_total + reply.len() - 1;
        self.model.tokens.push((at, n));
        self.queue_reply(reply.as_bytes());
    }

    /// The model reads bytes the engine sent upstream.
    fn model_receive(&mut self, bytes: &[u8]) {
        let mut i = 0;
        while i < bytes.len() {
            match self.model.mode {
                ModelMode::Tls => return,
                ModelMode::Data => {
                    let b = bytes[i];
                    i += 1;
                    if !self.desynced && self.bare == Bare::Normalize {
                        let bare_lf = b == b'\n' && self.model.prev != Some(b'\r');
                        let bare_cr = self.model.prev == Some(b'\r') && b != b'\n';
                        assert!(
                            !bare_lf && !bare_cr,
                            "invariant: a bare {} reached the upstream in DATA (normalize)",
                            if bare_lf { "LF" } else { "CR" }
                        );
                    }
                    self.model.prev = Some(b);
                    // The last five bytes of the body (`tail` is at most 5 long).
                    if self.model.tail.len() == 5 {
                        self.model.tail.remove(0);
                    }
                    self.model.tail.push(b);
                    self.model.data_len += 1;
                    let t = &self.model.tail;
                    let end = b == b'\n'
                        && (t == b"\r\n.\r\n" || (self.model.data_len == 3 && t == b".\r\n"));
                    if end {
                        self.model.mode = ModelMode::Command;
                        self.model.tail.clear();
                        self.model.prev = None;
                        self.accept_message();
                    }
                }
                ModelMode::Bdat { remaining, last } => {
                    let n = remaining.min(bytes.len() - i);
                    i += n;
                    let left = remaining - n;
                    if left == 0 {
                        self.model.mode = ModelMode::Command;
                        if last {
                            if self.model.mail && self.model.rcpt {
                                self.accept_message();
                            } else {
                                self.queue_reply(b"503 5.5.1 need RCPT\r\n");
                            }
                        } else {
                            self.queue_reply(b"250 2.0.0 chunk ok\r\n");
                        }
                    } else {
                        self.model.mode = ModelMode::Bdat {
                            remaining: left,
                            last,
                        };
                    }
                }
                ModelMode::Command | ModelMode::Sasl => {
                    let b = bytes[i];
                    i += 1;
                    self.model.line.push(b);
                    if b == b'\n' {
                        let line = std::mem::take(&mut self.model.line);
                        self.model_line(&line);
                    }
                }
            }
        }
    }

    fn model_line(&mut self, raw: &[u8]) {
        if !self.desynced {
            assert!(
                raw.ends_with(b"\r\n"),
                "invariant: a command line reached the upstream without CRLF: {:?}",
                String::from_utf8_lossy(raw)
            );
        }
        let line = raw.strip_suffix(b"\n").unwrap_or(raw);
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if self.model.mode == ModelMode::Sasl {
            self.model.mode = ModelMode::Command;
            if line == b"*" {
                self.queue_reply(b"501 5.7.0 cancelled\r\n");
            } else {
                self.queue_reply(b"235 2.7.0 ok\r\n");
            }
            return;
        }
        let text = String::from_utf8_lossy(line).to_ascii_uppercase();
        let verb = text.split(' ').next().unwrap_or("");
        match verb {
            "EHLO" => {
                self.model.mail = false;
                self.model.rcpt = false;
                self.queue_reply(
                    b"250-model.test\r\n250-PIPELINING\r\n250-SIZE 1000000\r\n250-8BITMIME\r\n\
                      250-CHUNKING\r\n250-AUTH PLAIN LOGIN\r\n250-STARTTLS\r\n250 SMTPUTF8\r\n",
                );
            }
            "HELO" => self.queue_reply(b"250 model.test\r\n"),
            "MAIL" => {
                self.model.mail = true;
                self.model.rcpt = false;
                self.queue_reply(b"250 2.1.0 ok\r\n");
            }
            "RCPT" if self.model.mail => {
                self.model.rcpt = true;
                self.queue_reply(b"250 2.1.5 ok\r\n");
            }
            "DATA" if self.model.mail && self.model.rcpt => {
                // The body starts here: `.\r\n` right away is an empty message.
                self.model.mode = ModelMode::Data;
                self.model.prev = None;
                self.model.tail.clear();
                self.model.data_len = 0;
                self.queue_reply(b"354 go\r\n");
            }
            "BDAT" => {
                let mut it = text.split_whitespace().skip(1);
                let n = it.next().and_then(|s| s.parse::<usize>().ok());
                let last = it.next() == Some("LAST");
                match n {
                    Some(n) => {
                        self.model.mode = ModelMode::Bdat { remaining: n, last };
                        if n == 0 {
                            self.model.mode = ModelMode::Command;
                            if last && self.model.mail && self.model.rcpt {
                                self.accept_message();
                            } else if last {
                                self.queue_reply(b"503 5.5.1 need RCPT\r\n");
                            } else {
                                self.queue_reply(b"250 2.0.0 chunk ok\r\n");
                            }
                        }
                    }
                    None => self.queue_reply(b"501 5.5.4 bad BDAT\r\n"),
                }
            }
            "RSET" => {
                self.model.mail = false;
                self.model.rcpt = false;
                self.queue_reply(b"250 2.0.0 ok\r\n");
            }
            "NOOP" | "VRFY" | "HELP" => self.queue_reply(b"250 2.0.0 ok\r\n"),
            "AUTH" => {
                if text.split_whitespace().nth(2).is_some() {
                    self.queue_reply(b"235 2.7.0 ok\r\n");
                } else {
                    self.model.mode = ModelMode::Sasl;
                    self.queue_reply(b"334 \r\n");
                }
            }
            "STARTTLS" => {
                self.model.mode = ModelMode::Tls;
                self.queue_reply(b"220 2.0.0 go\r\n");
            }
            "QUIT" => {
                self.queue_reply(b"221 2.0.0 bye\r\n");
                self.model.close_after = true;
            }
            _ => self.queue_reply(b"502 5.5.2 what\r\n"),
        }
    }

    fn advance(&mut self, d: Duration) {
        self.now += d;
    }

    fn client(&mut self, bytes: &[u8]) {
        if self.client_closed {
            return;
        }
        let now = self.now;
        self.call(bytes, |s, out| s.on_client(bytes, now, out));
    }

    /// Delivers up to `n` bytes of the model's queued replies (all with `None`).
    fn deliver(&mut self, n: Option<usize>) {
        if self.link != Link::Open || self.model.replies.is_empty() {
            return;
        }
        let n = n.unwrap_or(usize::MAX).min(self.model.replies.len());
        let chunk: Vec<u8> = self.model.replies.drain(..n).collect();
        self.model.delivered_total += n;
        self.model.last_delivered = chunk.last().copied();
        let delivered = self.model.delivered_total;
        let tokens = &mut self.model.tokens;
        for &(at, t) in tokens.iter().filter(|(at, _)| *at <= delivered) {
            let _ = at;
            self.delivered_tokens.insert(t);
        }
        tokens.retain(|(at, _)| *at > delivered);
        if delivered >= GREETING.len() {
            self.model.greeted = true;
        }
        let now = self.now;
        if !self.desynced
            && self.model.mode == ModelMode::Tls
            && find(&chunk, b"220 2.0.0 go").is_some()
        {
            self.opaque = true;
        }
        self.call(&chunk, |s, out| s.on_upstream(&chunk, now, out));
        if self.model.replies.is_empty() && self.model.close_after && self.link == Link::Open {
            self.upstream_closed();
        }
    }

    fn inject(&mut self, bytes: &[u8]) {
        if self.link != Link::Open {
            return;
        }
        self.desynced = true;
        // Delivered up to the middle of a reply line: the garbage continues that line.
        if self.model.last_delivered.is_some_and(|b| b != b'\n') {
            self.tokens_unreliable = true;
        }
        let clean: Vec<u8> = bytes
            .iter()
            .map(|&b| if b == b'Q' { b'q' } else { b })
            .collect();
        self.model.greeted = true;
        let now = self.now;
        self.call(&clean, |s, out| s.on_upstream(&clean, now, out));
    }

    fn connect_ok(&mut self) {
        if self.link != Link::Connecting {
            return;
        }
        self.link = Link::Open;
        let now = self.now;
        self.call(&[], |s, out| s.on_upstream_connected(now, out));
    }

    fn connect_fail(&mut self) {
        if self.link != Link::Connecting {
            return;
        }
        self.link = Link::None;
        let now = self.now;
        self.call(&[], |s, out| s.on_upstream_failed(now, out));
    }

    fn upstream_closed(&mut self) {
        if self.link != Link::Open {
            return;
        }
        self.link = Link::None;
        self.desynced = true;
        let now = self.now;
        self.call(&[], |s, out| s.on_upstream_closed(now, out));
    }

    fn client_close(&mut self) {
        if self.client_closed {
            return;
        }
        self.client_closed = true;
        self.accepted_at_client_close = Some(self.accepted);
        let now = self.now;
        self.call(&[], |s, out| s.on_client_closed(now, out));
    }

    fn shutdown(&mut self, force: bool) {
        let now = self.now;
        self.call(&[], |s, out| s.on_shutdown(force, now, out));
    }

    /// Fires the timer if it is due, as the ring's sweep would; checks the deadline moved.
    fn tick(&mut self) {
        if self.closed {
            return;
        }
        let Some(d) = self.session.deadline() else {
            panic!("invariant: an open session without a deadline could live forever");
        };
        if d <= self.now {
            let now = self.now;
            self.call(&[], |s, out| s.on_timeout(now, out));
            if !self.closed {
                let next = self.session.deadline();
                assert!(
                    next.is_some_and(|n| n > now),
                    "invariant: the deadline did not move after on_timeout ({:?} after {:?})",
                    next.map(|n| n - self.t0),
                    now - self.t0
                );
            }
        }
    }

    /// Lets a well-behaved network run: connects succeed and replies are delivered.
    fn settle(&mut self) {
        for _ in 0..64 {
            let before = (self.link, self.model.replies.len(), self.closed);
            self.connect_ok();
            self.deliver(None);
            if (self.link, self.model.replies.len(), self.closed) == before {
                break;
            }
        }
    }

    fn check_memory(&self) {
        let len = format!("{:?}", self.session).len();
        assert!(
            len <= MAX_DEBUG_LEN,
            "invariant: the engine holds too much ({len} bytes of Debug output)"
        );
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || hay.len() < needle.len() {
        return None;
    }
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The engine target: decodes `data` as a script and runs it (see the module docs).
pub fn engine(data: &[u8]) {
    let mut input = Input::new(data);
    let policy = policy_for(input.u8(), input.u8());
    let mut h = Harness::new(policy);
    let now = h.now;
    h.call(&[], |s, out| s.start(now, out));
    let mut repeated = 0usize;
    while !input.done() && h.ops < 4096 {
        h.ops += 1;
        let op = input.u8();
        match op % 16 {
            0 => {
                let n = usize::from(input.u8());
                let b = input.bytes(n).to_vec();
                h.client(&b);
            }
            1 => {
                let p = PHRASES[usize::from(input.u8()) % PHRASES.len()];
                h.client(p);
            }
            2 => {
                let p = PHRASES[usize::from(input.u8()) % PHRASES.len()];
                let k = 1 + usize::from(input.u8() % 32);
                h.client(&p.repeat(k));
            }
            3 => {
                let n = usize::from(input.u8());
                h.deliver(if n == 0 { None } else { Some(n) });
            }
            4 => h.connect_ok(),
            5 => h.connect_fail(),
            6 => h.upstream_closed(),
            7 => h.client_close(),
            8 => {
                let secs = u64::from(input.u8() % 64);
                h.advance(Duration::from_millis(secs * 250));
                h.tick();
            }
            9 => {
                let r = INJECT[usize::from(input.u8()) % INJECT.len()];
                h.inject(r);
            }
            10 => {
                let n = usize::from(input.u8() % 64);
                let b = input.bytes(n).to_vec();
                h.inject(&b);
            }
            11 => {
                let force = input.u8() & 1 == 1;
                h.shutdown(force);
            }
            12 => {
                let p = REPEAT[usize::from(input.u8()) % REPEAT.len()];
                // Enough to overflow the 256 KiB the engine may hold, not much more.
                let count = usize::from(input.u16()).min(MAX_REPEAT / p.len());
                let per_call = 64 * (1 + usize::from(input.u8()));
                if repeated + count * p.len() <= MAX_REPEAT {
                    repeated += count * p.len();
                    let all = p.repeat(count);
                    for piece in all.chunks(per_call) {
                        h.client(piece);
                        if h.auto {
                            h.settle();
                        }
                    }
                    h.check_memory();
                }
            }
            13 => {
                let n = usize::from(input.u8());
                let split = 1 + usize::from(input.u8() % 8);
                let b = input.bytes(n).to_vec();
                for piece in b.chunks(split) {
                    h.client(piece);
                }
            }
            14 => h.auto = !h.auto,
            _ => {
                h.advance(Duration::from_millis(100));
                h.tick();
            }
        }
        if h.auto {
            h.settle();
        }
        if h.ops % 256 == 0 {
            h.check_memory();
        }
        if !h.closed {
            assert!(
                h.session.deadline().is_some(),
                "invariant: an open session without a deadline"
            );
        }
    }
    h.settle();
    h.check_memory();
    // Time runs out: the session must end (every wait is bounded).
    for _ in 0..64 {
        if h.closed {
            break;
        }
        h.advance(Duration::from_secs(30));
        h.tick();
        h.settle();
    }
    assert!(
        h.closed,
        "invariant: the session outlived 30 minutes of silence"
    );
}

// ---------------------------------------------------------------------------------------------
// Scanner target
// ---------------------------------------------------------------------------------------------

/// What scanning a stream produced, in any split.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scan {
    pub out: Vec<u8>,
    /// Offset just past the end-of-data line, if the stream held one.
    pub end: Option<usize>,
    pub bare_lf: bool,
    pub bare_cr: bool,
    pub nul: bool,
    pub unstuffed_dot: bool,
    pub body_len: u64,
}

/// Runs the real scanner over `data` cut at `cuts` (offsets, any order, clamped).
pub fn scan_chunks(data: &[u8], cuts: &[usize], bare: Bare) -> Scan {
    let mut cuts: Vec<usize> = cuts.iter().map(|&c| c.min(data.len())).collect();
    cuts.sort_unstable();
    cuts.push(data.len());
    let mut s = DataScanner::new(bare);
    let mut out = Vec::new();
    let mut end = None;
    let mut from = 0;
    for &to in &cuts {
        if to < from {
            continue;
        }
        let chunk = &data[from..to];
        let scanned = s.scan(chunk, &mut |p| match p {
            Piece::Input(r) => {
                assert!(r.start < r.end, "invariant: empty piece {r:?}");
                out.extend_from_slice(&chunk[r]);
            }
            Piece::Static(b) => out.extend_from_slice(b),
        });
        if scanned.done {
            end = Some(from + scanned.consumed);
            break;
        }
        assert_eq!(
            scanned.consumed,
            chunk.len(),
            "invariant: a chunk without the end must be consumed whole"
        );
        from = to;
    }
    let f = s.flags();
    Scan {
        out,
        end,
        bare_lf: f.bare_lf,
        bare_cr: f.bare_cr,
        nul: f.nul,
        unstuffed_dot: f.unstuffed_dot,
        body_len: s.body_len(),
    }
}

/// The naive oracle: the scanner's documented rules applied one byte at a time to the whole
/// stream, with lookahead.
///
/// - The end is `.\r\n` at an eligible line start: the body start, or right after a real CRLF.
/// - A bare CR or LF (not part of CRLF) is flagged; with `Normalize` it becomes CRLF. The line
///   after it starts "after bare": a dot there is stuffed, but it is never the end.
/// - A dot at any line start that is not the end and not already stuffed (`..`) gets another
///   dot (flagged as unstuffed).
/// - Bytes whose meaning depends on what follows (a trailing `\r`, a dot at a line start, `.\r`
///   at an eligible line start) are not output yet; `.` and `.\r` held at an eligible line
///   start do not count in the body length yet.
/// - NUL anywhere in the body is flagged.
pub fn oracle(d: &[u8], bare: Bare) -> Scan {
    #[derive(PartialEq, Clone, Copy)]
    enum St {
        Eligible,
        AfterBare,
        Mid,
    }
    let norm = bare == Bare::Normalize;
    let mut s = Scan {
        out: Vec::new(),
        end: None,
        bare_lf: false,
        bare_cr: false,
        nul: false,
        unstuffed_dot: false,
        body_len: 0,
    };
    let mut st = St::Eligible;
    let mut i = 0;
    let mut held_not_body = 0u64;
    while i < d.len() {
        if st != St::Mid && d[i] == b'.' {
            let eligible = st == St::Eligible;
            match (d.get(i + 1), d.get(i + 2)) {
                (None, _) => {
                    if eligible {
                        held_not_body = 1;
                    }
                    break;
                }
                (Some(b'.'), _) => {
                    s.out.extend_from_slice(b"..");
                    i += 2;
                    st = St::Mid;
                    continue;
                }
                (Some(b'\r'), None) if eligible => {
                    held_not_body = 2;
                    break;
                }
                (Some(b'\r'), Some(b'\n')) if eligible => {
                    s.out.extend_from_slice(b".\r\n");
                    s.end = Some(i + 3);
                    break;
                }
                _ => {
                    s.unstuffed_dot = true;
                    s.out.extend_from_slice(b"..");
                    i += 1;
                    st = St::Mid;
                    continue;
                }
            }
        }
        match d[i] {
            b'\r' => match d.get(i + 1) {
                None => break,
                Some(b'\n') => {
                    s.out.extend_from_slice(b"\r\n");
                    i += 2;
                    st = St::Eligible;
                }
                Some(_) => {
                    s.bare_cr = true;
                    s.out.extend_from_slice(if norm { b"\r\n" } else { b"\r" });
                    i += 1;
                    st = St::AfterBare;
                }
            },
            b'\n' => {
                s.bare_lf = true;
                s.out.extend_from_slice(if norm { b"\r\n" } else { b"\n" });
                i += 1;
                st = St::AfterBare;
            }
            b => {
                s.out.push(b);
                i += 1;
                st = St::Mid;
            }
        }
    }
    let body_end = s.end.map_or(d.len(), |e| e - 3);
    s.nul = d[..body_end].contains(&0);
    s.body_len = match s.end {
        Some(e) => (e - 3) as u64,
        None => d.len() as u64 - held_not_body,
    };
    s
}

/// Where a reader of `out` finds the end of data: strict (only CRLF ends a line) or lenient
/// (a bare CR or LF ends a line too, and spaces, tabs and NULs after the dot are ignored).
pub fn reader_end(out: &[u8], lenient: bool) -> Option<usize> {
    let mut pos = 0;
    while pos < out.len() {
        let rest = &out[pos..];
        let mut line_len = None;
        for (i, &b) in rest.iter().enumerate() {
            if b == b'\r' && rest.get(i + 1) == Some(&b'\n') {
                line_len = Some((i, 2));
                break;
            }
            if lenient && (b == b'\r' || b == b'\n') {
                line_len = Some((i, 1));
                break;
            }
        }
        let (len, ending) = line_len?;
        let line = &rest[..len];
        let trimmed = if lenient {
            let keep = line.iter().rposition(|b| !matches!(b, b' ' | b'\t' | 0));
            &line[..keep.map_or(0, |k| k + 1)]
        } else {
            line
        };
        pos += len + ending;
        if trimmed == b"." {
            return Some(pos);
        }
    }
    None
}

/// The scanner target: byte 0 picks the mode, byte 1 the number of cuts, then one byte per cut
/// (the gap to the previous cut), then the stream.
pub fn scanner(data: &[u8]) {
    let mut input = Input::new(data);
    let bare = if input.u8() & 1 == 0 {
        Bare::Normalize
    } else {
        Bare::Reject
    };
    let ncuts = usize::from(input.u8() % 17);
    let mut cuts = Vec::with_capacity(ncuts);
    let mut at = 0usize;
    for _ in 0..ncuts {
        at += usize::from(input.u8());
        cuts.push(at);
    }
    let stream = input.bytes(usize::MAX / 2);
    let model = oracle(stream, bare);
    let got = scan_chunks(stream, &cuts, bare);
    assert_eq!(
        got,
        model,
        "invariant: scanner (cuts {cuts:?}) differs from the oracle on {:?}",
        String::from_utf8_lossy(stream)
    );
    if stream.len() <= 512 {
        let every: Vec<usize> = (1..stream.len()).collect();
        assert_eq!(
            scan_chunks(stream, &every, bare),
            model,
            "invariant: byte-at-a-time differs"
        );
    }
    let out = &model.out;
    if bare == Bare::Normalize {
        for (i, &b) in out.iter().enumerate() {
            let bad = (b == b'\n' && (i == 0 || out[i - 1] != b'\r'))
                || (b == b'\r' && out.get(i + 1) != Some(&b'\n'));
            assert!(!bad, "invariant: bare CR/LF in normalized output at {i}");
        }
    }
    let want = model.end.map(|_| out.len());
    assert_eq!(
        reader_end(out, false),
        want,
        "invariant: a strict reader ends elsewhere"
    );
    assert_eq!(
        reader_end(out, true),
        want,
        "invariant: a lenient reader ends elsewhere"
    );
}
