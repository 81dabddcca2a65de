//! What sessions decided, summed per worker, and the log lines that tell about one session.
//!
//! Owns the names operators see (how a session ended, the policy rule behind each decision),
//! the per-worker [`EngineTotals`] that a metrics endpoint sums, and the session-end and
//! per-decision log lines. It must not touch sockets or take locks per event: totals are plain
//! integers owned by one worker, copied out once per second by the factory. Never logs message
//! bodies, command arguments or AUTH payloads: only counts, names and addresses.

use std::net::SocketAddr;
use std::time::Duration;

use crate::proto::{Counters, Verb};

/// How a session ended, as the session-end log line and the metrics label `result` say it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The dialogue ended normally (the upstream answered QUIT, or hung up with a reply).
    Completed,
    /// The client closed its connection.
    ClientClosed,
    /// The client or the upstream was too slow.
    Timeout,
    /// Ended by a drain (`421 4.3.2`).
    Shutdown,
    /// The upstream could not be reached.
    UpstreamUnavailable,
    /// The upstream closed the connection unexpectedly.
    UpstreamLost,
    /// The upstream broke the protocol.
    UpstreamError,
    /// `hard_error_limit` was reached.
    TooManyErrors,
    /// TLS or HTTP on the plain port, a pipelining flood, an early talker.
    ProtocolError,
    /// Another guard decision closed it (a rule with action `drop`, for instance).
    ClosedByGuard,
    /// Refused before any banner (connection limits or rates).
    Refused,
    /// A PROXY listener got no valid PROXY protocol header (closed without an SMTP reply).
    ProxyHeader,
    /// The ring ended it without the session closing (a forced stop).
    Aborted,
}

impl End {
    /// Every variant, in label order.
    pub const ALL: [End; 13] = [
        End::Completed,
        End::ClientClosed,
        End::Timeout,
        End::Shutdown,
        End::UpstreamUnavailable,
        End::UpstreamLost,
        End::UpstreamError,
        End::TooManyErrors,
        End::ProtocolError,
        End::ClosedByGuard,
        End::Refused,
        End::ProxyHeader,
        End::Aborted,
    ];

    /// The label value.
    pub fn name(self) -> &'static str {
        match self {
            End::Completed => "completed",
            End::ClientClosed => "client_closed",
            End::Timeout => "timeout",
            End::Shutdown => "shutdown",
            End::UpstreamUnavailable => "upstream_unavailable",
            End::UpstreamLost => "upstream_lost",
            End::UpstreamError => "upstream_error",
            End::TooManyErrors => "too_many_errors",
            End::ProtocolError => "protocol_error",
            End::ClosedByGuard => "closed_by_guard",
            End::Refused => "refused",
            End::ProxyHeader => "proxy_header",
            End::Aborted => "aborted",
        }
    }

    fn index(self) -> usize {
        End::ALL.iter().position(|&e| e == self).unwrap_or(0)
    }
}

/// What the session was told when it closed, for [`End`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    Start,
    Client,
    Upstream,
    UpstreamFailed,
    ClientClosed,
    UpstreamClosed,
    Timeout,
    Shutdown,
}

/// The few counters that tell why a session closed, read before and after each call.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Watch {
    protocol_errors: u32,
    error_limit_reached: u32,
    early_talkers: u32,
}

impl Watch {
    pub fn of(c: &Counters) -> Watch {
        Watch {
            protocol_errors: c.protocol_errors,
            error_limit_reached: c.error_limit_reached,
            early_talkers: c.early_talkers,
        }
    }
}

/// How a session ended, from the call that closed it and what that call counted. `draining`:
/// the session was asked to end, so a quiet close is the drain's doing.
pub fn classify(event: Event, before: Watch, after: Watch, draining: bool) -> End {
    match plain_end(event, before, after) {
        End::Completed | End::ClosedByGuard if draining => End::Shutdown,
        end => end,
    }
}

fn plain_end(event: Event, before: Watch, after: Watch) -> End {
    let errors = after.error_limit_reached > before.error_limit_reached;
    let protocol = after.protocol_errors > before.protocol_errors
        || after.early_talkers > before.early_talkers;
    match event {
        Event::Start => End::Refused,
        Event::Client if errors => End::TooManyErrors,
        Event::Client if protocol => End::ProtocolError,
        Event::Client => End::ClosedByGuard,
        Event::Upstream if protocol => End::UpstreamError,
        Event::Upstream => End::Completed,
        Event::UpstreamFailed => End::UpstreamUnavailable,
        Event::ClientClosed => End::ClientClosed,
        Event::UpstreamClosed => End::UpstreamLost,
        Event::Timeout => End::Timeout,
        Event::Shutdown => End::Shutdown,
    }
}

/// Policy decisions other than blocked verbs, by the `rule` label they carry.
pub const RULES: [&str; 30] = [
    "banner_masked",
    "extension_removed",
    "recipients_over_limit",
    "size",
    "bare_line_end_normalized",
    "bare_line_end_refused",
    "nul",
    "address_check",
    "line_too_long",
    "syntax_error",
    "protocol_error",
    "error_limit",
    "timeout",
    "sender_too_long",
    "sender_denied",
    "relay_denied",
    "invalid_recipients_limit",
    "rate_limited",
    "early_talker",
    "identity_unsent",
    "tls_terminated",
    "upstream_tls",
    "header_size",
    "header_line_length",
    "deny_header",
    "filename_extension",
    "filename_length",
    "encoding",
    "body_line_length",
    "mime_structure",
];

/// The counts of [`RULES`], in that order.
pub fn rule_counts(c: &Counters) -> [u32; RULES.len()] {
    [
        c.banner_masked,
        c.keywords_removed,
        c.recipients_over_limit,
        c.size_refused,
        c.bare_line_ends_normalized,
        c.bare_line_ends_refused,
        c.nul_refused,
        c.address_refused,
        c.lines_too_long,
        c.syntax_errors,
        c.protocol_errors,
        c.error_limit_reached,
        c.timeouts,
        c.sender_too_long,
        c.sender_denied,
        c.relay_denied,
        c.invalid_recipients_limit,
        c.rate_limited,
        c.early_talkers,
        c.identity_unsent,
        c.tls_terminated,
        c.upstream_tls,
        c.content[0],
        c.content[1],
        c.content[2],
        c.content[3],
        c.content[4],
        c.content[5],
        c.content[6],
        c.content[7],
    ]
}

/// The `verb` label of a slot of [`Counters::blocked`]: the verb, or `other` for the last
/// slot (tokens that are no known verb).
pub fn blocked_verb_name(slot: usize) -> String {
    Verb::KNOWN
        .get(slot)
        .map_or_else(|| "other".to_string(), |v| v.name())
}

/// Slots of [`Counters::blocked`].
pub const BLOCKED_SLOTS: usize = Verb::INDEXED + 1;

/// The sum of what the sessions of one worker decided, counted when each session ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineTotals {
    /// Sessions ended, by [`End`] (in [`End::ALL`] order).
    pub sessions: [u64; End::ALL.len()],
    pub commands: u64,
    /// Blocked verbs by slot (see [`blocked_verb_name`]).
    pub blocked: [u64; BLOCKED_SLOTS],
    /// Decisions by [`RULES`] slot.
    pub rules: [u64; RULES.len()],
    pub messages_accepted: u64,
    pub messages_refused_upstream: u64,
    pub upstream_failures: u64,
    /// Replies to clients by class: 2xx, 3xx, 4xx, 5xx.
    pub replies: [u64; 4],
}

impl Default for EngineTotals {
    fn default() -> Self {
        EngineTotals {
            sessions: [0; End::ALL.len()],
            commands: 0,
            blocked: [0; BLOCKED_SLOTS],
            rules: [0; RULES.len()],
            messages_accepted: 0,
            messages_refused_upstream: 0,
            upstream_failures: 0,
            replies: [0; 4],
        }
    }
}

impl EngineTotals {
    /// Counts one ended session.
    pub fn count(&mut self, c: &Counters, end: End) {
        self.sessions[end.index()] += 1;
        self.commands += u64::from(c.commands);
        add_all(&mut self.blocked, &c.blocked);
        add_all(&mut self.rules, &rule_counts(c));
        self.messages_accepted += u64::from(c.messages_accepted);
        self.messages_refused_upstream += u64::from(c.messages_refused_upstream);
        self.upstream_failures += u64::from(c.upstream_failures);
        add_all(&mut self.replies, &c.replies);
    }

    /// Adds `other` into `self` (for whole-process totals).
    pub fn add(&mut self, other: &EngineTotals) {
        sum_into(&mut self.sessions, &other.sessions);
        self.commands += other.commands;
        sum_into(&mut self.blocked, &other.blocked);
        sum_into(&mut self.rules, &other.rules);
        self.messages_accepted += other.messages_accepted;
        self.messages_refused_upstream += other.messages_refused_upstream;
        self.upstream_failures += other.upstream_failures;
        sum_into(&mut self.replies, &other.replies);
    }

    /// Sessions ended, whatever the reason.
    pub fn sessions_ended(&self) -> u64 {
        self.sessions.iter().sum()
    }

    /// Sessions that ended with `end`.
    pub fn ended(&self, end: End) -> u64 {
        self.sessions[end.index()]
    }
}

fn add_all(totals: &mut [u64], counts: &[u32]) {
    for (t, c) in totals.iter_mut().zip(counts) {
        *t += u64::from(*c);
    }
}

fn sum_into(totals: &mut [u64], other: &[u64]) {
    for (t, o) in totals.iter_mut().zip(other) {
        *t += o;
    }
}

/// The non-zero decisions of a session as `rule=n` words (`blocked_verb:VRFY=1 size=1`),
/// or `none`.
pub fn decisions(c: &Counters) -> String {
    let mut words = Vec::new();
    for (slot, &n) in c.blocked.iter().enumerate() {
        if n > 0 {
            words.push(format!("blocked_verb:{}={n}", blocked_verb_name(slot)));
        }
    }
    for (rule, n) in RULES.iter().zip(rule_counts(c)) {
        if n > 0 {
            words.push(format!("{rule}={n}"));
        }
    }
    if words.is_empty() {
        return "none".to_string();
    }
    words.join(" ")
}

/// Everything the session-end line says.
#[derive(Debug)]
pub struct SessionReport<'a> {
    pub client: SocketAddr,
    pub upstream: Option<SocketAddr>,
    pub duration: Duration,
    pub generation: u64,
    pub counters: &'a Counters,
    pub end: End,
    pub client_bytes: u64,
    pub upstream_bytes: u64,
}

/// One line per session at its end: info, except refusals (debug: a flood of refused
/// connections must not flood the journal).
pub fn log_session_end(r: &SessionReport<'_>) {
    macro_rules! session_line {
        ($level:expr) => {
            tracing::event!(
                target: "mailguard::session",
                $level,
                client = %r.client,
                upstream = %r.upstream.map_or_else(|| "-".to_string(), |u| u.to_string()),
                duration_ms = r.duration.as_millis() as u64,
                policy_generation = r.generation,
                messages = r.counters.messages_accepted,
                messages_refused = r.counters.messages_refused_upstream,
                commands = r.counters.commands,
                bytes_from_client = r.client_bytes,
                bytes_from_upstream = r.upstream_bytes,
                decisions = %decisions(r.counters),
                result = %r.end.name(),
                "session ended"
            )
        };
    }
    if r.end == End::Refused {
        session_line!(tracing::Level::DEBUG);
    } else {
        session_line!(tracing::Level::INFO);
    }
}

/// One debug line per decision a call made (the counters it raised).
pub fn log_decisions(client: SocketAddr, before: &Counters, after: &Counters) {
    for (slot, (b, a)) in before.blocked.iter().zip(after.blocked.iter()).enumerate() {
        if a > b {
            tracing::debug!(
                target: "mailguard::decision",
                client = %client,
                rule = "blocked_verb",
                verb = %blocked_verb_name(slot),
                count = a - b,
                "policy decision"
            );
        }
    }
    let (b, a) = (rule_counts(before), rule_counts(after));
    for ((rule, before), after) in RULES.iter().zip(b).zip(a) {
        if after > before {
            tracing::debug!(
                target: "mailguard::decision",
                client = %client,
                rule = *rule,
                count = after - before,
                "policy decision"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counters that are not policy decisions (they have their own metrics).
    const NOT_RULES: [&str; 7] = [
        "content",
        "commands",
        "blocked",
        "messages_accepted",
        "messages_refused_upstream",
        "upstream_failures",
        "replies",
    ];

    fn mailguard_content_rules() -> usize {
        let names: Vec<String> = crate::proto::content::Rule::ALL
            .iter()
            .map(|r| r.name().replace('-', "_"))
            .collect();
        assert_eq!(&RULES[RULES.len() - names.len()..], names.as_slice());
        names.len()
    }

    #[test]
    fn every_engine_counter_has_a_rule_or_a_metric() {
        // Field names from the derived Debug output, so a counter added to the engine fails
        // here until it is given a rule name (and so a metric and a log word).
        let debug = format!("{:?}", Counters::default());
        let body = debug.trim_start_matches("Counters {").trim_end_matches('}');
        let mut c = Counters::default();
        let fields: Vec<&str> = body
            .split(", ")
            .filter_map(|kv| kv.split(':').next())
            .map(str::trim)
            .filter(|name| {
                !name.is_empty() && name.chars().all(|ch| ch.is_ascii_lowercase() || ch == '_')
            })
            .collect();
        let decision_fields: Vec<&&str> =
            fields.iter().filter(|f| !NOT_RULES.contains(f)).collect();
        // `content` is one array with a rule per content::Rule.
        assert_eq!(
            decision_fields.len() + mailguard_content_rules(),
            RULES.len(),
            "engine counters {decision_fields:?} vs rules {RULES:?}: add the new counter to RULES and rule_counts"
        );
        c.sender_denied = 2;
        c.blocked[Verb::INDEXED] = 1;
        assert_eq!(decisions(&c), "blocked_verb:other=1 sender_denied=2");
        assert_eq!(decisions(&Counters::default()), "none");
    }

    #[test]
    fn totals_sum_sessions_and_workers() {
        let mut c = Counters {
            messages_accepted: 2,
            ..Counters::default()
        };
        c.blocked[Verb::VRFY.index().unwrap()] = 3;
        c.replies = [1, 2, 3, 4];
        let mut w = EngineTotals::default();
        w.count(&c, End::Completed);
        w.count(&c, End::Timeout);
        let mut all = EngineTotals::default();
        all.add(&w);
        all.add(&w);
        assert_eq!(all.sessions_ended(), 4);
        assert_eq!(all.ended(End::Timeout), 2);
        assert_eq!(all.messages_accepted, 8);
        assert_eq!(all.blocked[Verb::VRFY.index().unwrap()], 12);
        assert_eq!(blocked_verb_name(Verb::VRFY.index().unwrap()), "VRFY");
        assert_eq!(all.replies, [4, 8, 12, 16]);
    }

    #[test]
    fn closing_call_names_the_end() {
        let calm = Watch::default();
        let errors = Watch {
            error_limit_reached: 1,
            ..calm
        };
        let protocol = Watch {
            protocol_errors: 1,
            ..calm
        };
        assert_eq!(
            classify(Event::Client, calm, errors, false),
            End::TooManyErrors
        );
        assert_eq!(
            classify(Event::Client, calm, protocol, false),
            End::ProtocolError
        );
        assert_eq!(classify(Event::Upstream, calm, calm, false), End::Completed);
        assert_eq!(
            classify(Event::Upstream, calm, protocol, true),
            End::UpstreamError
        );
        assert_eq!(classify(Event::Upstream, calm, calm, true), End::Shutdown);
        let names: Vec<&str> = End::ALL.iter().map(|e| e.name()).collect();
        let mut unique = names.clone();
        unique.dedup();
        assert_eq!(names.len(), unique.len());
    }
}
