//! Packet boundaries must not matter: one fixed pipelined session (EHLO, a group with a
//! blocked verb and BDAT chunks holding command-like text, then DATA with dot-stuffing and
//! 8-bit text) is sent split at random points into separate writes. The upstream must see the
//! same bytes and the client the same replies as in the unsplit run.

mod common;

use common::*;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use std::time::Duration;

const CHUNK1: &[u8] = b"Subject: c\r\n\r\n.\r\nQUIT\r\n";
const CHUNK2: &[u8] = b"RSET\r\n\xc3\xa9";

/// The three phases of the session: each is written (possibly split), then its replies read.
fn phases() -> [Vec<u8>; 3] {
    let ehlo = b"EHLO client.test\r\n".to_vec();
    let mut group = b"MAIL FROM:<a@example.test> BODY=8BITMIME\r\nRCPT TO:<b@example.test>\r\nVRFY root\r\nRCPT TO:<c@example.test>\r\n".to_vec();
    group.extend_from_slice(format!("BDAT {}\r\n", CHUNK1.len()).as_bytes());
    group.extend_from_slice(CHUNK1);
    group.extend_from_slice(format!("BDAT {} LAST\r\n", CHUNK2.len()).as_bytes());
    group.extend_from_slice(CHUNK2);
    group.extend_from_slice(
        b"RSET\r\nNOOP one\r\nMAIL FROM:<d@example.test>\r\nRCPT TO:<e@example.test>\r\nDATA\r\n",
    );
    let data = "Line one\r\n..dotted\r\nété\r\n\r\n.\r\nNOOP two\r\nQUIT\r\n"
        .as_bytes()
        .to_vec();
    [ehlo, group, data]
}

/// Replies expected per phase.
const REPLIES: [usize; 3] = [1, 11, 3];

/// MAIL line, RCPT lines, body, how it ended.
type Recorded = (Vec<u8>, Vec<Vec<u8>>, Vec<u8>, Via);

#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    replies: Vec<Vec<u8>>,
    upstream_raw: Vec<u8>,
    messages: Vec<Recorded>,
}

fn run(up: &Upstream, g: &Guard, splits: &[Vec<usize>; 3]) -> Result<Outcome, String> {
    let before = up.conns().len();
    let mut c = Client::greeted(g.addr);
    c.set_timeout(Duration::from_secs(5));
    let mut replies = Vec::new();
    for (i, bytes) in phases().iter().enumerate() {
        c.send_split(bytes, &splits[i], Duration::from_millis(3));
        for _ in 0..REPLIES[i] {
            match c.try_read_reply() {
                Ok(r) => replies.push(r.raw),
                Err(e) => return Err(format!("phase {i}: {e:?} after {replies:?}")),
            }
        }
    }
    if c.wait_closed().is_err() {
        return Err("not closed after QUIT".into());
    }
    if !up.wait_until(|conns, _| conns.len() > before && conns[before..].iter().all(|k| k.closed)) {
        return Err("upstream connection not closed".into());
    }
    let conns = up.conns();
    if conns.len() != before + 1 {
        return Err(format!(
            "{} upstream connections for one session",
            conns.len() - before
        ));
    }
    let messages = up
        .messages()
        .into_iter()
        .filter(|m| m.conn == before)
        .map(|m| (m.mail_from, m.rcpts, m.body, m.via))
        .collect();
    Ok(Outcome {
        replies,
        upstream_raw: conns[before].raw.clone(),
        messages,
    })
}

#[test]
fn random_packet_boundaries_change_nothing() {
    let up = Upstream::start();
    let g = Guard::start(up.addr, None);
    let none: [Vec<usize>; 3] = Default::default();
    let baseline = run(&up, &g, &none).unwrap_or_else(|e| panic!("unsplit run: {e}"));

    // The unsplit run itself must be right, or comparing with it proves nothing.
    let codes: Vec<String> = baseline
        .replies
        .iter()
        .map(|r| String::from_utf8_lossy(&r[..3]).into_owned())
        .collect();
    assert_eq!(
        codes,
        vec![
            "250", "250", "250", "500", "250", "250", "250", "250", "250", "250", "250", "354",
            "250", "250", "221"
        ],
        "replies {:?}",
        baseline.replies.iter().map(|r| show(r)).collect::<Vec<_>>()
    );
    assert_eq!(baseline.messages.len(), 2, "{:?}", baseline.messages);
    let mut bdat_body = CHUNK1.to_vec();
    bdat_body.extend_from_slice(CHUNK2);
    assert_eq!(baseline.messages[0].2, bdat_body);
    assert_eq!(baseline.messages[0].3, Via::Bdat);
    assert_eq!(
        baseline.messages[1].2,
        "Line one\r\n..dotted\r\nété\r\n\r\n".as_bytes()
    );
    assert!(!contains(&baseline.upstream_raw, b"VRFY"));

    let lens = phases().map(|p| p.len());
    let strategy = (
        proptest::collection::vec(1..lens[0], 0..4),
        proptest::collection::vec(1..lens[1], 1..8),
        proptest::collection::vec(1..lens[2], 1..6),
    );
    let mut runner = TestRunner::new(Config {
        cases: 16,
        failure_persistence: None,
        max_shrink_iters: 8,
        ..Config::default()
    });
    let result = runner.run(&strategy, |(a, b, c)| {
        let out = run(&up, &g, &[a, b, c]).map_err(TestCaseError::fail)?;
        prop_assert_eq!(&out.replies, &baseline.replies);
        prop_assert_eq!(&out.messages, &baseline.messages);
        prop_assert!(
            out.upstream_raw == baseline.upstream_raw,
            "upstream bytes differ: {} vs {}",
            show(&out.upstream_raw),
            show(&baseline.upstream_raw)
        );
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}
