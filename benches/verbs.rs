//! Verb lookup at command rate, for `tuning.md`: the engine's `u64` token
//! (`proto::Verb::of_line`) against an anchored aho-corasick automaton over the 22 verb names.
//! Both answer "which known verb starts this command line", and must agree.

use std::hint::black_box;

use aho_corasick::{AhoCorasick, Anchored, Input, MatchKind, StartKind};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use mailguard::proto::Verb;

/// The verbs the engine knows, in the automaton's pattern order.
const VERBS: [Verb; Verb::INDEXED] = Verb::KNOWN;

/// A realistic mix of command lines (without their CRLF), one session's worth: most are
/// MAIL/RCPT, a few of everything else, an unknown verb, lower case, and near misses.
const COMMANDS: &[&[u8]] = &[
    b"EHLO mail.example.org",
    b"MAIL FROM:<alice@example.org> SIZE=48213 BODY=8BITMIME",
    b"RCPT TO:<bob@example.net>",
    b"RCPT TO:<carol@example.net> NOTIFY=FAILURE",
    b"RCPT TO:<dave.long-name+tag@sub.example.net>",
    b"DATA",
    b"MAIL FROM:<>",
    b"RCPT TO:<postmaster@example.net>",
    b"DATA",
    b"NOOP",
    b"RSET",
    b"mail from:<lower@example.org>",
    b"rcpt to:<lower@example.net>",
    b"XYZZY plugh",
    b"MAILX FROM:<near@miss>",
    b"STARTTLS",
    b"ehlo x",
    b"QUIT",
];

/// The engine's path: pack the first token into a `u64`, then keep it only if known.
fn by_token(line: &[u8]) -> Option<Verb> {
    let (verb, _) = Verb::of_line(line)?;
    is_known(verb).then_some(verb)
}

fn is_known(verb: Verb) -> bool {
    matches!(
        verb,
        Verb::HELO
            | Verb::EHLO
            | Verb::MAIL
            | Verb::RCPT
            | Verb::DATA
            | Verb::BDAT
            | Verb::RSET
            | Verb::NOOP
            | Verb::QUIT
            | Verb::AUTH
            | Verb::STARTTLS
            | Verb::HELP
            | Verb::VRFY
            | Verb::EXPN
            | Verb::ETRN
            | Verb::TURN
            | Verb::ATRN
            | Verb::SAML
            | Verb::SEND
            | Verb::SOML
            | Verb::XCLIENT
            | Verb::XFORWARD
    )
}

fn automaton() -> AhoCorasick {
    let names: Vec<String> = VERBS.iter().map(|v| v.name()).collect();
    AhoCorasick::builder()
        .match_kind(MatchKind::LeftmostLongest)
        .ascii_case_insensitive(true)
        .start_kind(StartKind::Anchored)
        .build(names)
        .expect("22 short patterns always build")
}

/// The automaton's path: the longest verb name at the start, if it ends the first token.
fn by_automaton(ac: &AhoCorasick, line: &[u8]) -> Option<Verb> {
    let found = ac.find(Input::new(line).anchored(Anchored::Yes))?;
    let ends_token = matches!(line.get(found.end()), None | Some(b' '));
    ends_token.then(|| VERBS[found.pattern().as_usize()])
}

fn verbs(c: &mut Criterion) {
    let ac = automaton();
    for line in COMMANDS {
        assert_eq!(by_token(line), by_automaton(&ac, line), "{line:?}");
    }
    let mut group = c.benchmark_group("verbs");
    group.throughput(Throughput::Elements(COMMANDS.len() as u64));
    group.bench_function("u64_token", |b| {
        b.iter(|| {
            for line in black_box(COMMANDS) {
                black_box(by_token(line));
            }
        })
    });
    group.bench_function("aho_corasick_anchored", |b| {
        b.iter(|| {
            for line in black_box(COMMANDS) {
                black_box(by_automaton(&ac, line));
            }
        })
    });
    group.finish();
}

criterion_group!(benches, verbs);
criterion_main!(benches);
