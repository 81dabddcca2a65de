//! One proxied SMTP session as a state machine: client bytes, upstream bytes, connection
//! events and the time go in; [`Action`]s come out.
//!
//! The session owns the SMTP dialogue between the two sides: which client commands are
//! forwarded and which it answers itself, pairing each upstream reply with the command it
//! answers (so pipelined replies stay in order), the DATA and BDAT phases, and the recovery
//! when a message has to be refused after it was partly relayed. It must not touch sockets,
//! clocks or threads.
//!
//! Three rules carry the guarantees:
//! - The client sees a reply to a message (`250`) only when the upstream sent it; the guard's
//!   own replies to a message are always refusals.
//! - At a synchronisation point (DATA, AUTH, STARTTLS awaiting their reply) the session stops
//!   reading client bytes and holds them, because what they are (body, SASL response, TLS
//!   or injected plaintext) depends on the reply.
//! - A message the guard refuses after relaying part of it is aborted by dropping the upstream
//!   connection before its end of data; a new connection is opened and the client's HELO/EHLO
//!   (and AUTH exchange) replayed, so the next message of the session works.

use std::collections::VecDeque;
use std::mem;
use std::sync::Arc;

use parking_lot::Mutex;
use std::time::{Duration, Instant};

use crate::config::{BareLf, BlockedReply, Policy, RuleAction, UpstreamIdentity, UpstreamTls};
use crate::relay::{Action, Chunk, Proxy, Side};

use super::command::{self, AddressFault};
use super::content::{ContentScanner, Finding, Framing, Rule};
use super::data::{Bare, DataScanner, Piece};
use super::preamble::{Greeted, Identity, Next, Preamble};
use super::rate::{self, RateKey, Rates};
use super::reply::{self, Reply, ReplyBytes, ReplyParser};
use super::rules;
use super::Verb;

/// The replies the guard writes itself.
mod text {
    pub const BLOCKED: &[u8] = b"500 5.5.1 Command unrecognized\r\n";
    pub const BLOCKED_OK: &[u8] = b"250 OK\r\n";
    pub const LINE_TOO_LONG: &[u8] = b"500 5.5.2 Line too long\r\n";
    pub const SYNTAX: &[u8] = b"500 5.5.2 Syntax error\r\n";
    pub const BAD_PARAMETERS: &[u8] = b"501 5.5.4 Syntax error in parameters\r\n";
    pub const TOO_MANY_RCPTS: &[u8] = b"452 4.5.3 Too many recipients\r\n";
    pub const TOO_BIG: &[u8] = b"552 5.3.4 Message size exceeds fixed maximum message size\r\n";
    pub const BARE_LF: &[u8] = b"550 5.6.11 Message contains bare CR or LF\r\n";
    pub const NUL: &[u8] = b"550 5.6.0 Message contains NUL bytes\r\n";
    pub const BAD_ADDRESS_CHAR: &[u8] = b"553 5.1.3 Invalid character in address\r\n";
    pub const BAD_ADDRESS_SYNTAX: &[u8] = b"501 5.5.4 Syntax error in address\r\n";
    pub const UNAVAILABLE: &[u8] = b"421 4.3.0 Service unavailable, try again later\r\n";
    pub const UPSTREAM_LOST: &[u8] = b"421 4.3.0 Upstream connection lost\r\n";
    pub const UPSTREAM_LOST_DATA: &[u8] =
        b"451 4.3.0 Upstream connection lost, message not delivered\r\n";
    pub const UPSTREAM_PROTOCOL: &[u8] = b"421 4.3.0 Upstream protocol error\r\n";
    pub const TOO_MANY_ERRORS: &[u8] = b"421 4.7.0 Too many errors, closing connection\r\n";
    pub const PROTOCOL: &[u8] = b"421 4.7.0 Protocol error, closing connection\r\n";
    pub const TIMEOUT: &[u8] = b"421 4.4.2 Timeout, closing connection\r\n";
    pub const UPSTREAM_TIMEOUT: &[u8] = b"421 4.4.2 Upstream timeout\r\n";
    pub const UPSTREAM_TIMEOUT_DATA: &[u8] = b"451 4.4.2 Upstream timeout\r\n";
    pub const TOO_MUCH_INPUT: &[u8] = b"421 4.7.0 Too much pipelined input, closing connection\r\n";
    pub const SHUTTING_DOWN: &[u8] = b"421 4.3.2 Service shutting down\r\n";
    pub const SENDER_TOO_LONG: &[u8] = b"501 5.1.7 Sender address too long\r\n";
    pub const SENDER_REJECTED: &[u8] = b"550 5.7.1 Sender rejected\r\n";
    pub const RELAY_DENIED: &[u8] = b"550 5.7.1 Relaying denied\r\n";
    pub const POLICY_DROP: &[u8] = b"421 4.7.0 Policy violation, closing connection\r\n";
    pub const TOO_MANY_INVALID_RCPTS: &[u8] =
        b"421 4.7.0 Too many invalid recipients, closing connection\r\n";
    pub const MESSAGE_RATE: &[u8] = b"451 4.7.1 Message rate limit exceeded, try again later\r\n";
    pub const CONNECTION_RATE: &[u8] = b"421 4.7.0 Connection rate limit exceeded\r\n";
    pub const EARLY_TALKER: &[u8] = b"554 5.5.1 Protocol error\r\n";

    /// The refusal for a message that broke a content rule.
    pub fn content(rule: super::Rule) -> &'static [u8] {
        use super::Rule;
        match rule {
            Rule::HeaderSize => b"554 5.7.1 Message refused: header too large\r\n",
            Rule::HeaderLineLength => b"554 5.7.1 Message refused: header line too long\r\n",
            Rule::DenyHeader => b"554 5.7.1 Message refused: header not allowed\r\n",
            Rule::FilenameExtension => {
                b"554 5.7.1 Message refused: attachment type not allowed\r\n"
            }
            Rule::FilenameLength => b"554 5.7.1 Message refused: attachment name too long\r\n",
            Rule::Encoding => b"554 5.7.1 Message refused: transfer encoding not allowed\r\n",
            Rule::BodyLineLength => b"554 5.7.1 Message refused: body line too long\r\n",
            Rule::MimeStructure => b"554 5.7.1 Message refused: MIME structure too complex\r\n",
        }
    }
    pub const TOO_MANY_CONNECTIONS: &[u8] = b"421 4.7.0 Too many connections\r\n";
}

/// Why a connection is refused before any banner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Over `max_connections` or `max_connections_per_ip`.
    TooManyConnections,
    /// Over `rate_per_ip.connections`.
    ConnectionRate,
}

/// What one session decided, for metrics. Plain counters: the owner sums them per worker.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counters {
    /// Command lines read from the client.
    pub commands: u32,
    /// Blocked verbs, by [`Verb::index`] (the last slot counts tokens that are no verb).
    pub blocked: [u32; Verb::INDEXED + 1],
    pub banner_masked: u32,
    /// EHLO keywords removed from the upstream's reply.
    pub keywords_removed: u32,
    pub recipients_over_limit: u32,
    pub size_refused: u32,
    /// Messages in which a bare CR or LF was turned into CRLF.
    pub bare_line_ends_normalized: u32,
    pub bare_line_ends_refused: u32,
    pub nul_refused: u32,
    pub address_refused: u32,
    pub lines_too_long: u32,
    pub syntax_errors: u32,
    /// TLS or HTTP on the plain port, upstream protocol errors, pipelining floods.
    pub protocol_errors: u32,
    pub error_limit_reached: u32,
    pub timeouts: u32,
    /// Messages the upstream accepted (its 2xx after the end of data, or after BDAT LAST).
    pub messages_accepted: u32,
    /// Messages the upstream refused after the end of data.
    pub messages_refused_upstream: u32,
    /// Upstream connections that failed or ended unexpectedly.
    pub upstream_failures: u32,
    /// Replies sent to the client, by class: 2xx, 3xx, 4xx, 5xx.
    pub replies: [u32; 4],
    /// Envelope rules that matched (whatever their action).
    pub sender_too_long: u32,
    pub sender_denied: u32,
    pub relay_denied: u32,
    pub invalid_recipients_limit: u32,
    /// MAIL refused by `rate_per_ip.messages` or `rate_per_sender`.
    pub rate_limited: u32,
    /// Clients that talked before the banner or pipelined without PIPELINING.
    pub early_talkers: u32,
    /// Content findings, by [`Rule`] (in [`Rule::ALL`] order), whatever their action.
    pub content: [u32; Rule::ALL.len()],
    /// Sessions whose upstream could not be told the client's identity (XCLIENT not offered
    /// or refused); at most one per session.
    pub identity_unsent: u32,
    /// Client TLS handshakes completed under `starttls = "terminate"`.
    pub tls_terminated: u32,
    /// Upstream TLS handshakes completed under `upstream_tls = "starttls"`.
    pub upstream_tls: u32,
}

impl Counters {
    fn reply(&mut self, bytes: &[u8]) {
        if let Some(class @ b'2'..=b'5') = bytes.first() {
            self.replies[usize::from(class - b'2')] += 1;
        }
    }
}

/// Most client bytes held at a synchronisation point. A client that pipelines this much
/// without waiting for replies is not an SMTP client.
const MAX_HELD: usize = 256 * 1024;
/// Most DATA bytes scanned in one step.
const DATA_SLICE: usize = 16 * 1024;
/// Scratch pieces kept between DATA chunks (a clean chunk makes one or two).
const MAX_KEPT_PIECES: usize = 64;
/// Most commands awaiting their reply; past it, client input is held until replies drain.
const MAX_PENDING: usize = 1024;

/// The state of the upstream connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Up {
    /// Connect asked for; `replay` marks a reconnect after an aborted message.
    Connecting { replay: bool },
    /// Connected, awaiting the greeting.
    Greeting { replay: bool },
    /// Greeted; the hidden preamble (see `preamble.rs`) is running.
    Preamble { replay: bool },
    /// Reconnected: `sent` lines of the HELO/AUTH replay are out, the last awaits its reply.
    Replaying { sent: usize },
    /// Greeted; commands flow.
    Ready,
    /// Gone for good; the session ends once the client has had its answer.
    Gone,
}

/// What the client's bytes are, at the current point of the dialogue.
#[derive(Debug)]
enum ClientMode {
    /// Command lines.
    Command,
    /// The next line is a SASL response (the upstream answered 334).
    Sasl,
    /// A DATA body.
    Data(Box<DataState>),
    /// `remaining` bytes of a BDAT chunk, forwarded or skipped.
    Bdat { remaining: u64, forward: bool },
    /// After STARTTLS in `pass` mode: bytes are relayed blind both ways.
    Opaque,
}

#[derive(Debug)]
struct DataState {
    scanner: DataScanner,
    /// The header/MIME/body inspector, when the policy has content rules.
    content: Option<ContentScanner>,
    /// Why the message will be refused, once known; nothing more is forwarded then.
    fail: Option<Fail>,
}

/// Why a message being relayed is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fail {
    Size,
    Content(Rule),
    BareLineEnd,
    Nul,
    UpstreamLost,
}

impl Fail {
    fn reply(self) -> &'static [u8] {
        match self {
            Fail::Size => text::TOO_BIG,
            Fail::Content(rule) => text::content(rule),
            Fail::BareLineEnd => text::BARE_LF,
            Fail::Nul => text::NUL,
            Fail::UpstreamLost => text::UPSTREAM_LOST_DATA,
        }
    }
}

/// A reply the client is owed, in command order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pending {
    /// The upstream will answer a forwarded command.
    Upstream(Expect),
    /// The guard answers, once every earlier reply has gone out.
    Local { reply: &'static [u8], close: bool },
    /// The guard's own `220` to STARTTLS, and the switch to TLS right after it.
    StartTls,
}

/// The forwarded command an upstream reply answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Ehlo,
    Mail,
    Rcpt,
    Data,
    DataEnd,
    Bdat { last: bool },
    Auth,
    StartTls,
    Quit,
    Other,
}

/// Whether client bytes being processed are the input of the current call (and can be
/// forwarded by range) or bytes the session held from earlier calls (and must be copied).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Src {
    Input,
    Held,
}

/// A command line as received, for forwarding: `at` is its offset in the call's input when it
/// lies there whole and ends in CRLF, so it can be forwarded by range.
struct Line<'a> {
    raw: &'a [u8],
    at: Option<usize>,
}

impl Line<'_> {
    /// The line without its ending.
    fn content(&self) -> &[u8] {
        let l = self.raw.strip_suffix(b"\n").unwrap_or(self.raw);
        l.strip_suffix(b"\r").unwrap_or(l)
    }

    /// The line to forward: as received when it ended in CRLF, else with CRLF put right.
    fn chunk(&self) -> Chunk {
        match self.at {
            Some(at) => Chunk::Input(at..at + self.raw.len()),
            None => Chunk::Owned(self.owned()),
        }
    }

    fn owned(&self) -> Vec<u8> {
        let content = self.content();
        let mut v = Vec::with_capacity(content.len() + 2);
        v.extend_from_slice(content);
        v.extend_from_slice(b"\r\n");
        v
    }
}

/// One SMTP session between a client and the upstream.
#[derive(Debug)]
pub struct Session {
    policy: Arc<Policy>,
    up: Up,
    mode: ClientMode,
    parser: ReplyParser,
    pending: VecDeque<Pending>,
    /// A command line split across inputs.
    line: Vec<u8>,
    /// An over-long line is being skipped up to its LF.
    discarding: bool,
    /// Client bytes waiting for a synchronisation point to resolve.
    held: Vec<u8>,
    /// QUIT was forwarded or the guard decided to close: client bytes are ignored.
    stop_reading: bool,
    client_eof: bool,
    closed: bool,
    /// Recipients forwarded in this transaction.
    rcpts: u32,
    /// Bytes announced by BDAT in this transaction.
    bdat_total: u64,
    /// Set when the guard refused a BDAT transaction midway: later chunks get this reply.
    bdat_refused: Option<&'static [u8]>,
    /// The content inspector of the BDAT transaction in progress.
    bdat_content: Option<ContentScanner>,
    /// The chunk being read is the last of its message.
    bdat_last: bool,
    errors: u32,
    /// The client's last HELO/EHLO line and its completed AUTH exchange, for a replay.
    helo: Option<Vec<u8>>,
    auth: Vec<Vec<u8>>,
    auth_in_progress: Vec<Vec<u8>>,
    /// Scratch for the scanner's output, kept to avoid an allocation per DATA chunk.
    pieces: Vec<Piece>,
    /// A MAIL was forwarded and its transaction has not ended.
    in_transaction: bool,
    /// The server is shutting down: end at the next quiet point.
    draining: bool,
    /// Set for a connection refused before any banner.
    refusal: Option<Refusal>,
    /// Start and byte count of the current DATA or BDAT phase, for `min_data_rate`.
    data_started: Instant,
    data_bytes: u64,
    counters: Counters,
    /// The worker's rate table and this client's key in it, when rates are limited.
    rates: Option<(Arc<Mutex<Rates>>, u128)>,
    /// The banner has gone to the client (it is held back during `pregreet_wait`).
    banner_sent: bool,
    held_banner: Option<Vec<u8>>,
    accepted_at: Instant,
    /// The EHLO reply the client saw offered PIPELINING.
    pipelining_offered: bool,
    /// Upstream 5xx replies to RCPT in this session.
    invalid_rcpts: u32,
    now: Instant,
    client_since: Instant,
    upstream_since: Instant,
    /// TLS terminated by the guard, and where in the last call's actions it began.
    tls: starttls::Phase,
    tls_switch: Option<usize>,
    /// The real client, for the upstream preamble.
    identity: Option<Identity>,
    /// The hidden exchange of the current upstream connection.
    preamble: Preamble,
    /// The upstream's greeting, kept from the client until the preamble is over.
    greeting: Option<Vec<u8>>,
    /// Where in the last call's actions the upstream connection became TLS.
    upstream_tls_switch: Option<usize>,
}

impl Session {
    /// A session for a client just accepted, under `policy`.
    pub fn new(policy: Arc<Policy>, now: Instant) -> Session {
        let mut s = Session {
            policy,
            up: Up::Connecting { replay: false },
            mode: ClientMode::Command,
            parser: ReplyParser::default(),
            pending: VecDeque::new(),
            line: Vec::new(),
            discarding: false,
            held: Vec::new(),
            stop_reading: false,
            client_eof: false,
            closed: false,
            rcpts: 0,
            bdat_total: 0,
            bdat_refused: None,
            bdat_content: None,
            bdat_last: false,
            errors: 0,
            helo: None,
            auth: Vec::new(),
            auth_in_progress: Vec::new(),
            pieces: Vec::new(),
            in_transaction: false,
            draining: false,
            refusal: None,
            data_started: now,
            data_bytes: 0,
            counters: Counters::default(),
            rates: None,
            banner_sent: false,
            held_banner: None,
            accepted_at: now,
            pipelining_offered: false,
            invalid_rcpts: 0,
            now,
            client_since: now,
            upstream_since: now,
            tls: starttls::Phase::Plain,
            tls_switch: None,
            identity: None,
            preamble: Preamble::plan(UpstreamIdentity::None, None, None),
            greeting: None,
            upstream_tls_switch: None,
        };
        s.preamble = s.plan_preamble();
        s
    }

    /// Tells the upstream who the client is, as the policy's `upstream_identity` says.
    pub fn with_identity(mut self, identity: Identity) -> Session {
        self.identity = Some(identity);
        self.preamble = self.plan_preamble();
        self
    }

    fn plan_preamble(&self) -> Preamble {
        let greeted = self.helo.as_deref().and_then(greeted);
        let plan = Preamble::plan(
            self.policy.upstream_identity,
            self.identity,
            greeted.as_ref(),
        );
        if self.policy.tls.upstream == UpstreamTls::Starttls {
            plan.with_starttls()
        } else {
            plan
        }
    }

    /// A session that refuses the client before any banner and never contacts the upstream.
    pub fn refused(policy: Arc<Policy>, now: Instant, why: Refusal) -> Session {
        let mut s = Session::new(policy, now);
        s.refusal = Some(why);
        s
    }

    /// Counts this session's messages in the worker's rate table, under `client`'s key.
    pub fn with_rates(mut self, rates: Arc<Mutex<Rates>>, client: u128) -> Session {
        self.rates = Some((rates, client));
        self
    }

    /// Whether the session has ended.
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// What the session decided so far.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    // ----- client side -------------------------------------------------------------------

    /// Client bytes that cannot be read now: a reply decides what they are, the upstream is
    /// not ready, or too many replies are outstanding.
    fn must_hold(&self) -> bool {
        match self.mode {
            ClientMode::Command | ClientMode::Sasl => {
                self.tls == starttls::Phase::Handshaking
                    || self.at_sync_point()
                    || !matches!(self.up, Up::Ready)
                    || self.pending.len() >= MAX_PENDING
            }
            ClientMode::Data(_) | ClientMode::Bdat { .. } | ClientMode::Opaque => false,
        }
    }

    /// The last forwarded command is one whose reply decides what the next client bytes are.
    /// Processing stops right after such a command, so it is always the last pending entry.
    fn at_sync_point(&self) -> bool {
        matches!(
            self.pending.back(),
            Some(
                Pending::Upstream(Expect::Data | Expect::Auth | Expect::StartTls)
                    | Pending::StartTls
            )
        )
    }

    /// Processes client bytes until they run out or must be held; returns how many were used.
    fn feed(&mut self, bytes: &[u8], src: Src, out: &mut Vec<Action>) -> usize {
        let mut pos = 0;
        while pos < bytes.len() && !self.stop_reading && !self.must_hold() {
            pos += match self.mode {
                ClientMode::Command | ClientMode::Sasl => self.feed_line(bytes, pos, src, out),
                ClientMode::Data(_) => self.feed_data(bytes, pos, src, out),
                ClientMode::Bdat { .. } => self.feed_bdat(bytes, pos, src, out),
                ClientMode::Opaque => {
                    send(out, Side::Upstream, chunk(bytes, pos..bytes.len(), src));
                    bytes.len() - pos
                }
            };
        }
        if self.stop_reading {
            return bytes.len();
        }
        pos
    }

    fn hold(&mut self, rest: &[u8], out: &mut Vec<Action>) {
        // Bytes after STARTTLS that came before the 220 are injected plaintext: dropped.
        if rest.is_empty() || self.stop_reading || self.tls == starttls::Phase::Handshaking {
            return;
        }
        if self.held.len() + rest.len() > MAX_HELD {
            self.counters.protocol_errors += 1;
            self.fail_close(text::TOO_MUCH_INPUT, out);
            return;
        }
        self.held.extend_from_slice(rest);
    }

    /// Goes on with held client bytes once nothing stops them any more.
    fn resume(&mut self, out: &mut Vec<Action>) {
        if self.held.is_empty() || self.must_hold() || self.closed {
            return;
        }
        let mut held = mem::take(&mut self.held);
        let used = self.feed(&held, Src::Held, out);
        held.drain(..used);
        if held.is_empty() {
            // An idle session should not keep a large buffer alive.
            held = Vec::new();
        }
        self.held = held;
    }

    /// Reads command-line bytes from `bytes[pos..]`: completes at most one line.
    fn feed_line(&mut self, bytes: &[u8], pos: usize, src: Src, out: &mut Vec<Action>) -> usize {
        let rest = &bytes[pos..];
        let fresh_line = self.line.is_empty() && !self.discarding;
        if fresh_line && matches!(self.mode, ClientMode::Command) && is_binary_handshake(rest[0]) {
            // A TLS ClientHello (or SSLv2 hello) on the plain port: it will never send LF.
            self.counters.protocol_errors += 1;
            self.fail_close(text::PROTOCOL, out);
            return rest.len();
        }
        let limit = self.line_limit(if self.line.is_empty() {
            rest
        } else {
            &self.line
        });
        let Some(lf) = memchr::memchr(b'\n', rest) else {
            if !self.discarding {
                if self.line.len() + rest.len() > limit + 1 {
                    self.discarding = true;
                    self.line = Vec::new();
                } else {
                    self.line.extend_from_slice(rest);
                }
            }
            return rest.len();
        };
        let used = lf + 1;
        if self.discarding {
            self.discarding = false;
            self.counters.lines_too_long += 1;
            self.local_error(text::LINE_TOO_LONG, out);
        } else if self.line.is_empty() {
            let at = (src == Src::Input && rest[..used].ends_with(b"\r\n")).then_some(pos);
            let line = Line {
                raw: &rest[..used],
                at,
            };
            self.on_line(&line, limit, out);
        } else {
            let mut joined = mem::take(&mut self.line);
            joined.extend_from_slice(&rest[..used]);
            self.on_line(
                &Line {
                    raw: &joined,
                    at: None,
                },
                limit,
                out,
            );
        }
        used
    }

    /// The longest line accepted: AUTH exchanges get the RFC 4954 allowance.
    fn line_limit(&self, head: &[u8]) -> usize {
        let auth = matches!(self.mode, ClientMode::Sasl)
            || head
                .get(..5)
                .is_some_and(|h| h.eq_ignore_ascii_case(b"AUTH "));
        if auth {
            self.policy
                .max_line_length
                .max(crate::config::AUTH_LINE_LENGTH)
        } else {
            self.policy.max_line_length
        }
    }

    fn on_line(&mut self, line: &Line<'_>, limit: usize, out: &mut Vec<Action>) {
        if line.content().len() > limit {
            self.counters.lines_too_long += 1;
            self.local_error(text::LINE_TOO_LONG, out);
            return;
        }
        if matches!(self.mode, ClientMode::Sasl) {
            self.mode = ClientMode::Command;
            self.auth_in_progress.push(line.owned());
            self.forward(line.chunk(), Expect::Auth, out);
            return;
        }
        self.on_command(line, out);
    }

    fn on_command(&mut self, line: &Line<'_>, out: &mut Vec<Action>) {
        self.counters.commands += 1;
        if self.policy.reject_unauth_pipelining
            && !self.pipelining_offered
            && !self.pending.is_empty()
        {
            // Postfix's reject_unauth_pipelining: a command sent before the last reply came.
            self.counters.early_talkers += 1;
            self.fail_close(text::EARLY_TALKER, out);
            return;
        }
        let content = line.content();
        let Some((verb, _)) = Verb::of_line(content) else {
            let reply = if content.is_empty() || !is_clean(content) {
                self.counters.syntax_errors += 1;
                text::SYNTAX
            } else {
                self.counters.blocked[Verb::INDEXED] += 1;
                self.blocked_reply()
            };
            self.local_error(reply, out);
            return;
        };
        if verb.is_http_method() && !self.policy.allows(verb) {
            self.counters.protocol_errors += 1;
            self.fail_close(text::PROTOCOL, out);
            return;
        }
        if (verb == Verb::MAIL || verb == Verb::RCPT) && self.policy.check_addresses {
            if let Err(fault) = command::check_address(content) {
                self.counters.address_refused += 1;
                let reply = match fault {
                    AddressFault::SpecialCharacter => text::BAD_ADDRESS_CHAR,
                    AddressFault::Unbalanced => text::BAD_ADDRESS_SYNTAX,
                };
                self.local_error(reply, out);
                return;
            }
        }
        if !is_clean(content) {
            self.counters.syntax_errors += 1;
            self.local_error(text::SYNTAX, out);
            return;
        }
        if !self.policy.allows(verb) {
            if verb == Verb::BDAT {
                // The chunk still follows by length and must not be read as commands.
                if let Some(b) = command::bdat_args(content) {
                    self.mode = ClientMode::Bdat {
                        remaining: b.size,
                        forward: false,
                    };
                }
            }
            self.counters.blocked[verb.index().unwrap_or(Verb::INDEXED)] += 1;
            let reply = self.blocked_reply();
            self.local_error(reply, out);
            return;
        }
        self.on_allowed(verb, line, out);
    }

    fn blocked_reply(&self) -> &'static [u8] {
        match self.policy.blocked_reply {
            BlockedReply::Reject => text::BLOCKED,
            BlockedReply::Ok => text::BLOCKED_OK,
        }
    }

    fn on_allowed(&mut self, verb: Verb, line: &Line<'_>, out: &mut Vec<Action>) {
        let content = line.content();
        match verb {
            Verb::EHLO | Verb::HELO => {
                self.reset_transaction();
                self.helo = Some(line.owned());
                let expect = if verb == Verb::EHLO {
                    Expect::Ehlo
                } else {
                    Expect::Other
                };
                self.forward(line.chunk(), expect, out);
            }
            Verb::MAIL | Verb::RCPT | Verb::DATA | Verb::BDAT if self.needs_ehlo_again() => {
                self.refuse_before_ehlo(verb, content, out);
            }
            Verb::MAIL => {
                let max = self.policy.max_message_size;
                if max > 0 && command::size_param(content).is_some_and(|size| size > max) {
                    self.counters.size_refused += 1;
                    self.local(text::TOO_BIG, false, out);
                    return;
                }
                if self.sender_refused(rules::path_address(content), out)
                    || self.over_rate(content, out)
                {
                    return;
                }
                self.reset_transaction();
                self.in_transaction = true;
                self.forward(line.chunk(), Expect::Mail, out);
            }
            Verb::RCPT => {
                if self.rcpts >= self.policy.max_recipients {
                    self.counters.recipients_over_limit += 1;
                    self.local(text::TOO_MANY_RCPTS, false, out);
                    return;
                }
                let policy = Arc::clone(&self.policy);
                if let Some(relay) = &policy.relay_domains {
                    if !relay.value.accepts(rules::path_address(content)) {
                        self.counters.relay_denied += 1;
                        if self.apply(relay.action, text::RELAY_DENIED, out) {
                            return;
                        }
                    }
                }
                self.rcpts += 1;
                self.forward(line.chunk(), Expect::Rcpt, out);
            }
            Verb::RSET => {
                self.reset_transaction();
                self.forward(line.chunk(), Expect::Other, out);
            }
            Verb::DATA => self.forward(line.chunk(), Expect::Data, out),
            Verb::BDAT => self.on_bdat(line, out),
            Verb::AUTH => {
                self.auth_in_progress = vec![line.owned()];
                self.forward(line.chunk(), Expect::Auth, out);
            }
            Verb::STARTTLS if self.terminates_tls() => self.on_starttls(line, out),
            Verb::STARTTLS => self.forward(line.chunk(), Expect::StartTls, out),
            Verb::QUIT => {
                self.stop_reading = true;
                self.forward(line.chunk(), Expect::Quit, out);
            }
            _ => self.forward(line.chunk(), Expect::Other, out),
        }
    }

    /// The sender rules: length, allow-list, deny-list. Returns whether MAIL was answered.
    fn sender_refused(&mut self, sender: &[u8], out: &mut Vec<Action>) -> bool {
        let policy = Arc::clone(&self.policy);
        let max = policy.sender_max_length.value;
        if max > 0 && sender.len() > max {
            self.counters.sender_too_long += 1;
            if self.apply(policy.sender_max_length.action, text::SENDER_TOO_LONG, out) {
                return true;
            }
        }
        // The null sender carries bounces, which an MX must accept whatever the lists say.
        if sender.is_empty() {
            return false;
        }
        let not_allowed = policy
            .sender_allow
            .as_ref()
            .filter(|allow| !allow.value.matches(sender));
        if let Some(allow) = not_allowed {
            self.counters.sender_denied += 1;
            if self.apply(allow.action, text::SENDER_REJECTED, out) {
                return true;
            }
        }
        if policy.sender_deny.value.matches(sender) {
            self.counters.sender_denied += 1;
            return self.apply(policy.sender_deny.action, text::SENDER_REJECTED, out);
        }
        false
    }

    /// `rate_per_ip.messages` and `rate_per_sender`, counted at MAIL.
    fn over_rate(&mut self, line: &[u8], out: &mut Vec<Action>) -> bool {
        let Some((rates, client)) = &self.rates else {
            return false;
        };
        let p = &self.policy;
        if p.rate_per_ip.messages == 0 && p.rate_per_sender == 0 {
            return false;
        }
        let now = self.now;
        let admitted = {
            let mut table = rates.lock();
            table.admit(RateKey::Messages(*client), p.rate_per_ip.messages, now)
                && table.admit(
                    RateKey::Sender(rate::address_key(rules::path_address(line))),
                    p.rate_per_sender,
                    now,
                )
        };
        if !admitted {
            self.counters.rate_limited += 1;
            self.local(text::MESSAGE_RATE, false, out);
        }
        !admitted
    }

    /// Carries out a rule's action; returns whether the command was answered (not forwarded).
    fn apply(&mut self, action: RuleAction, reply: &'static [u8], out: &mut Vec<Action>) -> bool {
        match action {
            RuleAction::Reject => {
                self.local(reply, false, out);
                true
            }
            RuleAction::Drop => {
                self.local(text::POLICY_DROP, true, out);
                true
            }
            RuleAction::Log => false,
        }
    }

    fn on_bdat(&mut self, line: &Line<'_>, out: &mut Vec<Action>) {
        let Some(b) = command::bdat_args(line.content()) else {
            self.local_error(text::BAD_PARAMETERS, out);
            return;
        };
        if let Some(reply) = self.bdat_refused {
            self.mode = ClientMode::Bdat {
                remaining: b.size,
                forward: false,
            };
            if b.last {
                self.reset_transaction();
            }
            self.local(reply, false, out);
            return;
        }
        self.bdat_total = self.bdat_total.saturating_add(b.size);
        let max = self.policy.max_message_size;
        if max > 0 && self.bdat_total > max {
            self.counters.size_refused += 1;
            self.mode = ClientMode::Bdat {
                remaining: b.size,
                forward: false,
            };
            self.abort_upstream(text::TOO_BIG, out);
            if b.last {
                self.reset_transaction();
            } else {
                self.bdat_refused = Some(text::TOO_BIG);
            }
            self.local(text::TOO_BIG, false, out);
            return;
        }
        self.forward(line.chunk(), Expect::Bdat { last: b.last }, out);
        if self.bdat_content.is_none() {
            self.bdat_content = self.content_scanner(Framing::Bdat);
        }
        self.bdat_last = b.last;
        self.mode = ClientMode::Bdat {
            remaining: b.size,
            forward: true,
        };
        if b.size == 0 {
            // No chunk bytes will come to finish it.
            self.feed_bdat(&[], 0, Src::Input, out);
        }
        self.start_data_phase();
    }

    /// Bytes left in the BDAT chunk being read.
    fn bdat_remaining(&self) -> u64 {
        match self.mode {
            ClientMode::Bdat { remaining, .. } => remaining,
            _ => 0,
        }
    }

    /// A content inspector for a new message, if the policy has content rules.
    fn content_scanner(&self, framing: Framing) -> Option<ContentScanner> {
        let rules = self.policy.content.0.as_ref()?;
        Some(ContentScanner::new(Arc::clone(rules), framing))
    }

    fn reset_transaction(&mut self) {
        self.in_transaction = false;
        self.rcpts = 0;
        self.bdat_total = 0;
        self.bdat_refused = None;
        self.bdat_content = None;
    }

    fn feed_bdat(&mut self, bytes: &[u8], pos: usize, src: Src, out: &mut Vec<Action>) -> usize {
        let ClientMode::Bdat { remaining, forward } = &mut self.mode else {
            return 0;
        };
        let n = (bytes.len() - pos).min(usize::try_from(*remaining).unwrap_or(usize::MAX));
        *remaining -= n as u64;
        let (forward, finished) = (*forward, *remaining == 0);
        self.data_bytes += n as u64;
        let verdict = match &mut self.bdat_content {
            Some(content) if forward => inspect(
                content,
                std::iter::once(&bytes[pos..pos + n]),
                finished && self.bdat_last,
                &self.policy,
                &mut self.counters,
            ),
            _ => None,
        };
        if let Some((rule, action)) = verdict {
            // Refused like an oversized BDAT message: this chunk and the rest of the
            // transaction get the rule's reply, and the upstream never sees the end.
            let reply = text::content(rule);
            self.mode = ClientMode::Bdat {
                remaining: self.bdat_remaining(),
                forward: false,
            };
            self.abort_upstream(reply, out);
            if action == RuleAction::Drop {
                self.fail_close(text::POLICY_DROP, out);
                return bytes.len() - pos;
            }
            self.bdat_refused = (!self.bdat_last).then_some(reply);
        } else if forward && n > 0 {
            send(out, Side::Upstream, chunk(bytes, pos..pos + n, src));
        }
        if finished {
            self.mode = ClientMode::Command;
            if self.bdat_last {
                self.reset_transaction();
            }
        }
        n
    }

    fn feed_data(&mut self, bytes: &[u8], pos: usize, src: Src, out: &mut Vec<Action>) -> usize {
        let ClientMode::Data(state) = &mut self.mode else {
            return 0;
        };
        let mut pieces = mem::take(&mut self.pieces);
        pieces.clear();
        // Bounded slices keep the scratch and any joined copy small (held input can be 256 KiB).
        let end = bytes.len().min(pos + DATA_SLICE);
        let scanned = state
            .scanner
            .scan(&bytes[pos..end], &mut |p| pieces.push(p));
        self.data_bytes += scanned.consumed as u64;
        let mut content_drop = false;
        let failed_before = state.fail.is_some();
        if state.fail.is_none() {
            if let Some(content) = &mut state.content {
                let verdict = inspect(
                    content,
                    pieces.iter().map(|p| match p {
                        Piece::Input(r) => &bytes[pos + r.start..pos + r.end],
                        Piece::Static(s) => s,
                    }),
                    scanned.done,
                    &self.policy,
                    &mut self.counters,
                );
                match verdict {
                    Some((rule, RuleAction::Drop)) => {
                        content_drop = true;
                        state.fail = Some(Fail::Content(rule));
                    }
                    Some((rule, _)) => state.fail = Some(Fail::Content(rule)),
                    None => {}
                }
            }
        }
        if state.fail.is_none() {
            state.fail = violation(&state.scanner, &self.policy);
        }
        let newly_failed = !failed_before && state.fail.is_some();
        let forwarding = state.fail.is_none();
        if forwarding && pieces.len() > MAX_KEPT_PIECES {
            // Many fix-ups (a flood of bare line ends): one copy beats one action per line.
            let mut joined = Vec::with_capacity(scanned.consumed + pieces.len());
            for piece in &pieces {
                joined.extend_from_slice(match piece {
                    Piece::Input(r) => &bytes[pos + r.start..pos + r.end],
                    Piece::Static(s) => s,
                });
            }
            send(out, Side::Upstream, Chunk::Owned(joined));
        } else if forwarding {
            for piece in pieces.drain(..) {
                let c = match piece {
                    Piece::Input(r) => chunk(bytes, pos + r.start..pos + r.end, src),
                    Piece::Static(s) => Chunk::Static(s),
                };
                send(out, Side::Upstream, c);
            }
        }
        // A chunk full of bare line ends makes many pieces; an idle session must not keep them.
        pieces.clear();
        if pieces.capacity() > MAX_KEPT_PIECES {
            pieces = Vec::new();
        }
        self.pieces = pieces;
        if newly_failed {
            self.abort_upstream(text::UPSTREAM_LOST_DATA, out);
        }
        if content_drop {
            // ASA's drop-connection: no reply to the message, the connection goes.
            self.fail_close(text::POLICY_DROP, out);
            return bytes.len() - pos;
        }
        if scanned.done {
            self.end_of_data(out);
        }
        scanned.consumed
    }

    fn end_of_data(&mut self, out: &mut Vec<Action>) {
        let ClientMode::Data(state) = mem::replace(&mut self.mode, ClientMode::Command) else {
            return;
        };
        self.reset_transaction();
        let flags = state.scanner.flags();
        if state.fail.is_none() && (flags.bare_lf || flags.bare_cr) {
            self.counters.bare_line_ends_normalized += 1;
        }
        match state.fail {
            None => {
                self.in_transaction = true;
                self.expect(Expect::DataEnd);
            }
            Some(fail) => {
                match fail {
                    Fail::Size => self.counters.size_refused += 1,
                    Fail::Content(_) => {}
                    Fail::BareLineEnd => self.counters.bare_line_ends_refused += 1,
                    Fail::Nul => self.counters.nul_refused += 1,
                    Fail::UpstreamLost => {}
                }
                let close = fail == Fail::UpstreamLost || self.up == Up::Gone;
                self.local(fail.reply(), close, out);
            }
        }
    }

    // ----- upstream side -----------------------------------------------------------------

    /// Sends a command upstream and notes the reply it is owed.
    fn forward(&mut self, c: Chunk, expect: Expect, out: &mut Vec<Action>) {
        send(out, Side::Upstream, c);
        self.expect(expect);
    }

    fn expect(&mut self, expect: Expect) {
        if !self.awaiting_upstream() {
            self.upstream_since = self.now;
        }
        self.pending.push_back(Pending::Upstream(expect));
    }

    fn awaiting_upstream(&self) -> bool {
        matches!(self.pending.front(), Some(Pending::Upstream(_)))
    }

    fn on_reply(&mut self, reply: Reply, input: &[u8], out: &mut Vec<Action>) {
        self.upstream_since = self.now;
        match self.up {
            Up::Connecting { replay } | Up::Greeting { replay } => {
                self.on_greeting(reply, replay, input, out)
            }
            Up::Preamble { replay } => {
                let next = self.preamble.on_reply(reply.code, reply.bytes(input));
                self.preamble_next(next, replay, out);
            }
            Up::Replaying { sent } => self.on_replay_reply(&reply, sent, out),
            Up::Ready => self.on_answer(reply, input, out),
            Up::Gone => {}
        }
    }

    fn on_greeting(&mut self, reply: Reply, replay: bool, input: &[u8], out: &mut Vec<Action>) {
        if reply.class() == 2 && self.preamble.has_steps() {
            if !replay {
                self.greeting = Some(reply.bytes(input).to_vec());
            }
            self.up = Up::Preamble { replay };
            let next = self.preamble.begin();
            self.preamble_next(next, replay, out);
            return;
        }
        if replay {
            if reply.class() == 2 {
                self.replay_next(0, out);
            } else {
                self.fail_close(text::UPSTREAM_LOST, out);
            }
            return;
        }
        let bytes = reply.bytes(input);
        let chunk = reply_chunk(reply.bytes.clone());
        self.relay_banner(reply.code, bytes, chunk, input, out);
    }

    /// The upstream's greeting goes to the client: `bytes` are its text, `chunk` the way to
    /// send it unchanged (a range of `input` or owned).
    fn relay_banner(
        &mut self,
        code: u16,
        bytes: &[u8],
        chunk: Chunk,
        input: &[u8],
        out: &mut Vec<Action>,
    ) {
        self.counters.reply(bytes);
        let banner = if self.policy.mask_banner {
            self.counters.banner_masked += 1;
            Chunk::Owned(reply::mask(bytes))
        } else {
            chunk
        };
        self.up = Up::Ready;
        if self.now < self.pregreet_release() && code != 421 {
            // postscreen's pregreet test: hold the banner and see whether the client talks.
            self.held_banner = Some(banner.bytes(input).to_vec());
            return;
        }
        self.send_banner(banner, code == 421, out);
    }

    /// Sends the preamble's next line, or once it is over lets the client's dialogue (or its
    /// replay) have the connection.
    fn preamble_next(&mut self, next: Next, replay: bool, out: &mut Vec<Action>) {
        match next {
            Next::Send(line) => send(out, Side::Upstream, Chunk::Owned(line)),
            Next::StartTls => self.upstream_tls_switch = Some(out.len()),
            Next::Refused => {
                // The policy asks for TLS to the upstream: no mail goes there in plain text.
                self.counters.upstream_failures += 1;
                self.fail_close(
                    if replay {
                        text::UPSTREAM_LOST
                    } else {
                        text::UNAVAILABLE
                    },
                    out,
                );
            }
            Next::Done => {
                if self.preamble.shortfall().is_some() {
                    self.counters.identity_unsent = 1;
                }
                if replay {
                    self.replay_next(0, out);
                } else {
                    let greeting = self.greeting.take().unwrap_or_default();
                    let code = reply_code(&greeting);
                    let chunk = Chunk::Owned(greeting.clone());
                    self.relay_banner(code, &greeting, chunk, &[], out);
                }
            }
        }
    }

    /// When a banner held for `pregreet_wait` may go out.
    fn pregreet_release(&self) -> Instant {
        self.accepted_at + self.policy.pregreet_wait
    }

    fn send_banner(&mut self, banner: Chunk, refuse: bool, out: &mut Vec<Action>) {
        send(out, Side::Client, banner);
        self.banner_sent = true;
        if refuse {
            self.close(out);
            return;
        }
        self.resume(out);
    }

    /// The replay script: the client's HELO/EHLO line, then its AUTH exchange.
    fn replay_line(&self, i: usize) -> Option<&[u8]> {
        let helo = self.helo.iter().map(Vec::as_slice);
        helo.chain(self.auth.iter().map(Vec::as_slice)).nth(i)
    }

    fn replay_next(&mut self, sent: usize, out: &mut Vec<Action>) {
        match self.replay_line(sent) {
            Some(line) => {
                send(out, Side::Upstream, Chunk::Owned(line.to_vec()));
                self.up = Up::Replaying { sent: sent + 1 };
            }
            None => {
                self.up = Up::Ready;
                self.resume(out);
            }
        }
    }

    fn on_replay_reply(&mut self, reply: &Reply, sent: usize, out: &mut Vec<Action>) {
        if reply.class() == 2 || reply.code == 334 {
            self.replay_next(sent, out);
        } else {
            self.fail_close(text::UPSTREAM_LOST, out);
        }
    }

    /// An upstream reply while commands flow: it answers the oldest pending command.
    fn on_answer(&mut self, reply: Reply, input: &[u8], out: &mut Vec<Action>) {
        let Some(Pending::Upstream(expect)) = self.pending.pop_front() else {
            // Unsolicited (typically 421 before the upstream hangs up): pass it on and end.
            send(out, Side::Client, reply_chunk(reply.bytes));
            self.close(out);
            return;
        };
        self.counters.reply(reply.bytes(input));
        match expect {
            Expect::Ehlo if reply.code == 250 => {
                let policy = &self.policy;
                let bytes = reply.bytes(input);
                let filtered = reply::filter_ehlo(bytes, |k| policy.keeps_keyword(k));
                let removed = reply::lines(bytes).count() - reply::lines(&filtered).count();
                self.counters.keywords_removed += removed as u32;
                self.pipelining_offered = reply::lines(&filtered).skip(1).any(|l| {
                    reply::keyword(l.get(4..).unwrap_or(&[])).eq_ignore_ascii_case(b"PIPELINING")
                });
                let filtered = self.announce_starttls(filtered);
                send(out, Side::Client, Chunk::Owned(filtered));
            }
            Expect::Mail => {
                self.in_transaction = reply.class() == 2;
                send(out, Side::Client, reply_chunk(reply.bytes));
            }
            Expect::Rcpt => {
                let invalid = reply.class() == 5;
                send(out, Side::Client, reply_chunk(reply.bytes));
                let max = self.policy.max_invalid_recipients;
                if invalid {
                    self.invalid_rcpts += 1;
                    if max > 0 && self.invalid_rcpts > max {
                        // The directory-harvest defence: the rest of the pipeline is dropped.
                        self.counters.invalid_recipients_limit += 1;
                        self.fail_close(text::TOO_MANY_INVALID_RCPTS, out);
                        return;
                    }
                }
            }
            Expect::DataEnd | Expect::Bdat { last: true } => {
                self.in_transaction = false;
                if reply.class() == 2 {
                    self.counters.messages_accepted += 1;
                } else {
                    self.counters.messages_refused_upstream += 1;
                }
                send(out, Side::Client, reply_chunk(reply.bytes));
            }
            Expect::Data if reply.code == 354 => {
                send(out, Side::Client, reply_chunk(reply.bytes));
                self.start_data_phase();
                self.mode = ClientMode::Data(Box::new(DataState {
                    scanner: DataScanner::new(match self.policy.bare_lf {
                        BareLf::Reject => Bare::Reject,
                        BareLf::Normalize => Bare::Normalize,
                    }),
                    content: self.content_scanner(Framing::Data),
                    fail: None,
                }));
            }
            Expect::Auth => {
                let class = reply.class();
                let code = reply.code;
                send(out, Side::Client, reply_chunk(reply.bytes));
                if code == 334 {
                    self.mode = ClientMode::Sasl;
                } else if class == 2 {
                    self.auth = mem::take(&mut self.auth_in_progress);
                } else {
                    self.auth_in_progress.clear();
                }
            }
            Expect::StartTls if reply.code == 220 => {
                send(out, Side::Client, reply_chunk(reply.bytes));
                // Anything the client sent before seeing this 220 was plaintext injected
                // ahead of the handshake: it must never be executed.
                self.held = Vec::new();
                self.line = Vec::new();
                self.mode = ClientMode::Opaque;
                return;
            }
            Expect::Quit => {
                send(out, Side::Client, reply_chunk(reply.bytes));
                self.close(out);
                return;
            }
            _ => send(out, Side::Client, reply_chunk(reply.bytes)),
        }
        self.flush_locals(out);
        if self.client_eof && !self.awaiting_upstream() {
            self.close(out);
            return;
        }
        self.resume(out);
        self.drain_if_idle(out);
    }

    fn start_data_phase(&mut self) {
        self.data_started = self.now;
        self.data_bytes = 0;
    }

    /// While draining, ends the session once no transaction is open and nothing is owed.
    fn drain_if_idle(&mut self, out: &mut Vec<Action>) {
        let quiet = !self.in_transaction
            && self.pending.is_empty()
            && self.held.is_empty()
            && matches!(self.mode, ClientMode::Command)
            && matches!(self.up, Up::Ready | Up::Gone);
        if self.draining && quiet && !self.closed {
            self.fail_close(text::SHUTTING_DOWN, out);
        }
    }

    /// Drops the upstream connection mid-transaction so nothing is delivered, answers every
    /// command it still owed a reply with `reply`, and reconnects for what follows.
    fn abort_upstream(&mut self, reply: &'static [u8], out: &mut Vec<Action>) {
        if self.up == Up::Gone {
            return;
        }
        out.push(Action::CloseUpstream);
        for p in self.pending.iter_mut() {
            if let Pending::Upstream(_) = p {
                *p = Pending::Local {
                    reply,
                    close: false,
                };
            }
        }
        self.flush_locals(out);
        self.parser = ReplyParser::default();
        self.up = Up::Connecting { replay: true };
        self.upstream_since = self.now;
        self.preamble = self.plan_preamble();
        out.push(Action::Connect);
    }

    // ----- replies to the client ---------------------------------------------------------

    /// Answers the client from the guard, in its place among the replies still owed.
    fn local(&mut self, reply: &'static [u8], close: bool, out: &mut Vec<Action>) {
        if close {
            self.stop_reading = true;
        }
        if self.pending.is_empty() {
            self.counters.reply(reply);
            send(out, Side::Client, Chunk::Static(reply));
            if close {
                self.close(out);
            }
        } else {
            self.pending.push_back(Pending::Local { reply, close });
        }
    }

    /// A local error reply that counts towards `hard_error_limit`.
    fn local_error(&mut self, reply: &'static [u8], out: &mut Vec<Action>) {
        self.errors += 1;
        if self.errors >= self.policy.hard_error_limit {
            self.counters.error_limit_reached += 1;
            self.local(text::TOO_MANY_ERRORS, true, out);
        } else {
            self.local(reply, false, out);
        }
    }

    fn flush_locals(&mut self, out: &mut Vec<Action>) {
        loop {
            let (reply, close) = match self.pending.front() {
                Some(&Pending::Local { reply, close }) => (reply, close),
                Some(Pending::StartTls) => {
                    self.pending.pop_front();
                    self.switch_to_tls(out);
                    return;
                }
                _ => return,
            };
            self.pending.pop_front();
            self.counters.reply(reply);
            send(out, Side::Client, Chunk::Static(reply));
            if close {
                self.close(out);
                return;
            }
        }
    }

    /// Ends the session with `reply`, after the guard's own replies already owed; replies
    /// the upstream still owed are replaced by this one.
    fn fail_close(&mut self, reply: &'static [u8], out: &mut Vec<Action>) {
        if self.closed {
            return;
        }
        while let Some(&Pending::Local { reply: r, .. }) = self.pending.front() {
            self.pending.pop_front();
            self.counters.reply(r);
            send(out, Side::Client, Chunk::Static(r));
        }
        self.pending.clear();
        self.counters.reply(reply);
        send(out, Side::Client, Chunk::Static(reply));
        self.close(out);
    }

    fn close(&mut self, out: &mut Vec<Action>) {
        if !self.closed {
            self.closed = true;
            self.stop_reading = true;
            out.push(Action::Close);
        }
    }

    /// A reply owed for a message in flight (end of data or last BDAT sent).
    fn message_in_flight(&self) -> bool {
        self.pending
            .iter()
            .any(|p| matches!(p, Pending::Upstream(Expect::DataEnd | Expect::Bdat { .. })))
    }
}

/// The reason to refuse the message, from what the scanner has seen so far.
fn violation(scanner: &DataScanner, policy: &Policy) -> Option<Fail> {
    let flags = scanner.flags();
    if flags.nul {
        Some(Fail::Nul)
    } else if policy.bare_lf == BareLf::Reject && (flags.bare_lf || flags.bare_cr) {
        Some(Fail::BareLineEnd)
    } else if policy.max_message_size > 0 && scanner.body_len() > policy.max_message_size {
        Some(Fail::Size)
    } else {
        None
    }
}

/// Feeds message bytes to the content inspector; counts every finding and returns the first
/// whose action is not `log`.
fn inspect<'a>(
    content: &mut ContentScanner,
    parts: impl Iterator<Item = &'a [u8]>,
    finished: bool,
    policy: &Policy,
    counters: &mut Counters,
) -> Option<(Rule, RuleAction)> {
    let mut first = None;
    let mut on_finding = |f: Finding| {
        counters.content[f.rule as usize] += 1;
        let action = policy.content_action(f.rule);
        if action != RuleAction::Log && first.is_none() {
            first = Some((f.rule, action));
        }
    };
    for part in parts {
        if !content.needs_input() {
            break;
        }
        content.feed(part, &mut on_finding);
    }
    if finished {
        content.finish(&mut on_finding);
    }
    first
}

/// A command line is clean when it has no NUL, no bare CR and is valid UTF-8 (SMTPUTF8).
/// The code of a whole reply (a greeting kept as bytes); 0 if it has none.
fn reply_code(bytes: &[u8]) -> u16 {
    bytes
        .get(..3)
        .and_then(|c| std::str::from_utf8(c).ok())
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

/// The client's HELO/EHLO line as the preamble needs it.
fn greeted(line: &[u8]) -> Option<Greeted> {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let verb = line.get(..4)?;
    let name = line.get(4..).unwrap_or(&[]).trim_ascii();
    Some(Greeted {
        name: name.to_vec(),
        extended: verb.eq_ignore_ascii_case(b"EHLO"),
    })
}

fn is_clean(content: &[u8]) -> bool {
    memchr::memchr2(0, b'\r', content).is_none() && std::str::from_utf8(content).is_ok()
}

/// First bytes of a TLS record (handshake) or an SSLv2 hello.
fn is_binary_handshake(first: u8) -> bool {
    first == 0x16 || first == 0x80
}

fn chunk(bytes: &[u8], range: std::ops::Range<usize>, src: Src) -> Chunk {
    match src {
        Src::Input => Chunk::Input(range),
        Src::Held => Chunk::Owned(bytes[range].to_vec()),
    }
}

fn reply_chunk(bytes: ReplyBytes) -> Chunk {
    match bytes {
        ReplyBytes::Input(r) => Chunk::Input(r),
        ReplyBytes::Owned(v) => Chunk::Owned(v),
    }
}

/// Queues bytes, merging adjacent ranges of the same input so pipelined lines leave as one.
fn send(out: &mut Vec<Action>, side: Side, c: Chunk) {
    if let (Some(Action::Send(s, Chunk::Input(prev))), Chunk::Input(next)) = (out.last_mut(), &c) {
        if *s == side && prev.end == next.start {
            prev.end = next.end;
            return;
        }
    }
    out.push(Action::Send(side, c));
}

impl Proxy for Session {
    fn start(&mut self, now: Instant, out: &mut Vec<Action>) {
        self.now = now;
        self.accepted_at = now;
        self.client_since = now;
        self.upstream_since = now;
        match self.refusal {
            Some(Refusal::TooManyConnections) => {
                self.fail_close(text::TOO_MANY_CONNECTIONS, out);
            }
            Some(Refusal::ConnectionRate) => {
                self.counters.rate_limited += 1;
                self.fail_close(text::CONNECTION_RATE, out);
            }
            None => out.push(Action::Connect),
        }
    }

    fn on_client(&mut self, data: &[u8], now: Instant, out: &mut Vec<Action>) {
        if self.closed || self.stop_reading {
            return;
        }
        self.now = now;
        self.client_since = now;
        let p = &self.policy;
        if !self.banner_sent && (!p.pregreet_wait.is_zero() || p.reject_unauth_pipelining) {
            self.counters.early_talkers += 1;
            self.fail_close(text::EARLY_TALKER, out);
            return;
        }
        let used = if self.held.is_empty() {
            self.feed(data, Src::Input, out)
        } else {
            0
        };
        self.hold(&data[used..], out);
    }

    fn on_upstream(&mut self, data: &[u8], now: Instant, out: &mut Vec<Action>) {
        if self.closed {
            return;
        }
        self.now = now;
        let mut pos = 0;
        while pos < data.len() && !self.closed {
            if let ClientMode::Opaque = self.mode {
                send(out, Side::Client, Chunk::Input(pos..data.len()));
                return;
            }
            match self.parser.next(data, &mut pos) {
                Ok(Some(reply)) => self.on_reply(reply, data, out),
                Ok(None) => break,
                Err(_) => {
                    self.counters.protocol_errors += 1;
                    self.counters.upstream_failures += 1;
                    let reply = if self.message_in_flight() {
                        text::UPSTREAM_LOST_DATA
                    } else {
                        text::UPSTREAM_PROTOCOL
                    };
                    self.fail_close(reply, out);
                }
            }
        }
    }

    fn on_upstream_connected(&mut self, now: Instant, out: &mut Vec<Action>) {
        if let Some(header) = self.preamble.header() {
            send(out, Side::Upstream, Chunk::Owned(header.to_vec()));
        }
        self.now = now;
        self.upstream_since = now;
        if let Up::Connecting { replay } = self.up {
            self.up = Up::Greeting { replay };
        }
    }

    fn on_upstream_failed(&mut self, now: Instant, out: &mut Vec<Action>) {
        self.now = now;
        let first = self.up == Up::Connecting { replay: false };
        self.on_upstream_gone(
            if first {
                text::UNAVAILABLE
            } else {
                text::UPSTREAM_LOST
            },
            out,
        );
    }

    fn on_client_closed(&mut self, now: Instant, out: &mut Vec<Action>) {
        if self.closed {
            return;
        }
        self.now = now;
        self.client_eof = true;
        self.stop_reading = true;
        let mid_message = matches!(self.mode, ClientMode::Data(_) | ClientMode::Bdat { .. });
        // Mid-message or at a synchronisation point, closing now (without an end of data)
        // is what guarantees nothing half-sent is delivered.
        if mid_message || self.at_sync_point() || !self.awaiting_upstream() {
            self.close(out);
        }
    }

    fn on_upstream_closed(&mut self, now: Instant, out: &mut Vec<Action>) {
        if self.closed {
            return;
        }
        self.now = now;
        let first = matches!(
            self.up,
            Up::Connecting { replay: false }
                | Up::Greeting { replay: false }
                | Up::Preamble { replay: false }
        );
        self.on_upstream_gone(
            if first {
                text::UNAVAILABLE
            } else {
                text::UPSTREAM_LOST
            },
            out,
        );
    }

    fn deadline(&self) -> Option<Instant> {
        if self.closed {
            return None;
        }
        let p = &self.policy;
        if self.held_banner.is_some() {
            return Some(self.pregreet_release());
        }
        if let ClientMode::Opaque = self.mode {
            return Some(self.client_since.max(self.upstream_since) + p.command_timeout);
        }
        match (self.upstream_deadline(), self.client_deadline()) {
            (Some(u), Some(c)) => Some(u.min(c)),
            (u, c) => u.or(c),
        }
    }

    fn on_timeout(&mut self, now: Instant, out: &mut Vec<Action>) {
        self.now = now;
        match self.deadline() {
            Some(d) if d <= now => {}
            _ => return,
        }
        if let Some(banner) = self.held_banner.take() {
            self.send_banner(Chunk::Owned(banner), false, out);
            return;
        }
        self.counters.timeouts += 1;
        let client_late = self.client_deadline().is_some_and(|d| d <= now);
        let reply = if client_late {
            text::TIMEOUT
        } else if self.message_in_flight() {
            text::UPSTREAM_TIMEOUT_DATA
        } else {
            text::UPSTREAM_TIMEOUT
        };
        self.fail_close(reply, out);
    }

    fn on_shutdown(&mut self, force: bool, now: Instant, out: &mut Vec<Action>) {
        self.now = now;
        self.draining = true;
        if force {
            // Mid-message this closes the upstream without an end of data: nothing half-sent
            // is delivered, and the client was never told 250.
            self.fail_close(text::SHUTTING_DOWN, out);
        } else {
            self.drain_if_idle(out);
        }
    }
}

impl Session {
    /// When the upstream must have answered what it owes, if it owes anything.
    fn upstream_deadline(&self) -> Option<Instant> {
        let p = &self.policy;
        let wait = match self.up {
            Up::Connecting { .. }
            | Up::Greeting { .. }
            | Up::Preamble { .. }
            | Up::Replaying { .. } => p.greeting_timeout,
            Up::Ready if self.awaiting_upstream() => {
                if self.message_in_flight() {
                    p.final_timeout
                } else {
                    p.command_timeout
                }
            }
            _ => return None,
        };
        Some(self.upstream_since + wait)
    }

    /// When the client must have sent more, if it is the one expected to speak: in a DATA or
    /// BDAT phase always (the upstream may owe a reply to an earlier chunk meanwhile), in the
    /// command phase only when nothing is owed to it.
    fn client_deadline(&self) -> Option<Instant> {
        let p = &self.policy;
        match self.mode {
            ClientMode::Data(_) | ClientMode::Bdat { .. } => {
                let idle = self.client_since + p.data_timeout;
                if p.min_data_rate == 0 {
                    return Some(idle);
                }
                // Postfix's smtpd_min_data_rate: every byte buys 1/rate more seconds.
                let earned =
                    Duration::from_secs_f64(self.data_bytes as f64 / p.min_data_rate as f64);
                Some(idle.min(self.data_started + p.data_timeout + earned))
            }
            _ if self.pending.is_empty() && self.up == Up::Ready => {
                Some(self.client_since + p.command_timeout)
            }
            _ => None,
        }
    }

    /// The upstream connection ended or could not be made.
    fn on_upstream_gone(&mut self, reply: &'static [u8], out: &mut Vec<Action>) {
        self.up = Up::Gone;
        self.counters.upstream_failures += 1;
        if let ClientMode::Data(state) = &mut self.mode {
            // The client is still sending the body: refuse it once it has finished.
            state.fail.get_or_insert(Fail::UpstreamLost);
            return;
        }
        let reply = if self.message_in_flight() || matches!(self.mode, ClientMode::Bdat { .. }) {
            text::UPSTREAM_LOST_DATA
        } else {
            reply
        };
        self.fail_close(reply, out);
    }
}

mod starttls;
mod upstream_tls;

#[cfg(test)]
mod tests;
