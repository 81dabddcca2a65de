//! Scripted sessions: a client and an upstream driving a [`Session`] directly, no sockets.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;
use crate::config::Policy;

const BANNER: &[u8] = b"220 mx.upstream.test ESMTP\r\n";
const EHLO_REPLY: &[u8] = b"250-mx.upstream.test\r\n250-PIPELINING\r\n250-SIZE 1000000\r\n250-8BITMIME\r\n250-CHUNKING\r\n250-STARTTLS\r\n250-AUTH PLAIN LOGIN\r\n250-ETRN\r\n250 XCLIENT NAME ADDR\r\n";

/// Runs a session and collects what each side received.
struct Pair {
    s: Session,
    now: Instant,
    to_up: Vec<u8>,
    to_client: Vec<u8>,
    connects: usize,
    upstream_closes: usize,
    closed: bool,
}

impl Pair {
    fn new(policy: &str) -> Pair {
        Pair::with_policy(Policy::parse(policy, "test").unwrap())
    }

    fn with_policy(policy: Policy) -> Pair {
        let policy = Arc::new(policy);
        let now = Instant::now();
        let mut p = Pair {
            s: Session::new(policy, now),
            now,
            to_up: Vec::new(),
            to_client: Vec::new(),
            connects: 0,
            upstream_closes: 0,
            closed: false,
        };
        let mut out = Vec::new();
        p.s.start(now, &mut out);
        p.apply(&[], out);
        p
    }

    /// A session already greeted.
    fn greeted(policy: &str) -> Pair {
        let mut p = Pair::new(policy);
        p.connected();
        p.upstream(BANNER);
        assert_eq!(p.take_client(), BANNER);
        p
    }

    fn apply(&mut self, input: &[u8], out: Vec<Action>) {
        for a in out {
            assert!(!self.closed, "action after close: {a:?}");
            match a {
                Action::Connect => self.connects += 1,
                Action::Send(Side::Upstream, c) => self.to_up.extend_from_slice(c.bytes(input)),
                Action::Send(Side::Client, c) => self.to_client.extend_from_slice(c.bytes(input)),
                Action::CloseUpstream => self.upstream_closes += 1,
                Action::Close => self.closed = true,
            }
        }
    }

    fn connected(&mut self) {
        let mut out = Vec::new();
        self.s.on_upstream_connected(self.now, &mut out);
        self.apply(&[], out);
    }

    fn client(&mut self, data: &[u8]) {
        let mut out = Vec::new();
        self.s.on_client(data, self.now, &mut out);
        self.apply(data, out);
    }

    fn upstream(&mut self, data: &[u8]) {
        let mut out = Vec::new();
        self.s.on_upstream(data, self.now, &mut out);
        self.apply(data, out);
    }

    fn upstream_closed(&mut self) {
        let mut out = Vec::new();
        self.s.on_upstream_closed(self.now, &mut out);
        self.apply(&[], out);
    }

    fn client_closed(&mut self) {
        let mut out = Vec::new();
        self.s.on_client_closed(self.now, &mut out);
        self.apply(&[], out);
    }

    fn advance(&mut self, by: Duration) {
        self.now += by;
        let mut out = Vec::new();
        self.s.on_timeout(self.now, &mut out);
        self.apply(&[], out);
    }

    fn take_up(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.to_up)
    }

    fn take_client(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.to_client)
    }

    fn client_text(&mut self) -> String {
        String::from_utf8_lossy(&self.take_client()).into_owned()
    }
}

#[test]
fn relays_a_plain_session() {
    let mut p = Pair::new("");
    assert_eq!(p.connects, 1);
    p.client(b"EHLO client.test\r\n");
    assert!(p.take_up().is_empty(), "held until the banner");
    p.connected();
    p.upstream(BANNER);
    assert_eq!(p.take_client(), BANNER);
    assert_eq!(p.take_up(), b"EHLO client.test\r\n");
    p.upstream(EHLO_REPLY);
    let ehlo = p.client_text();
    assert!(ehlo.contains("250-CHUNKING") && ehlo.contains("STARTTLS") && ehlo.contains("AUTH"));
    assert!(
        !ehlo.contains("ETRN") && !ehlo.contains("XCLIENT"),
        "{ehlo}"
    );
    assert!(ehlo.ends_with("250 AUTH PLAIN LOGIN\r\n"), "{ehlo}");
    p.client(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nDATA\r\n");
    assert_eq!(
        p.take_up(),
        b"MAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nDATA\r\n"
    );
    p.upstream(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 go\r\n");
    assert_eq!(
        p.client_text(),
        "250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 go\r\n"
    );
    p.client(b"Subject: x\r\n\r\nhello\r\n.\r\nQUIT\r\n");
    assert_eq!(p.take_up(), b"Subject: x\r\n\r\nhello\r\n.\r\nQUIT\r\n");
    assert!(p.take_client().is_empty(), "no 250 before the upstream's");
    p.upstream(b"250 2.0.0 queued\r\n221 bye\r\n");
    assert_eq!(p.client_text(), "250 2.0.0 queued\r\n221 bye\r\n");
    assert!(p.closed);
}

#[test]
fn blocked_verbs_answered_in_order() {
    let mut p = Pair::greeted("");
    p.client(b"NOOP\r\nVRFY root\r\nNOOP\r\n");
    assert_eq!(p.take_up(), b"NOOP\r\nNOOP\r\n");
    assert!(p.take_client().is_empty());
    p.upstream(b"250 one\r\n");
    assert_eq!(
        p.client_text(),
        "250 one\r\n500 5.5.1 Command unrecognized\r\n"
    );
    p.upstream(b"250 two\r\n");
    assert_eq!(p.client_text(), "250 two\r\n");
    let mut p = Pair::greeted("blocked_reply = \"ok\"\nmode = \"rfc821\"");
    p.client(b"EHLO x\r\n");
    assert_eq!(p.client_text(), "250 OK\r\n");
    assert!(p.take_up().is_empty());
}

#[test]
fn one_byte_at_a_time() {
    let mut p = Pair::greeted("");
    let session = b"HELO x\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n";
    for b in session {
        p.client(&[*b]);
    }
    assert_eq!(p.take_up(), session);
    p.upstream(b"250 a\r\n250 b\r\n250 c\r\n354 d\r\n");
    let body = b"line\r\n..dot\r\n.\r\n";
    for b in body {
        p.client(&[*b]);
    }
    assert_eq!(p.take_up(), body);
}

#[test]
fn data_held_until_354_and_commands_if_refused() {
    let mut p = Pair::greeted("");
    p.client(b"DATA\r\nNOOP\r\n");
    assert_eq!(p.take_up(), b"DATA\r\n");
    p.upstream(b"554 5.5.1 no recipients\r\n");
    assert_eq!(
        p.take_up(),
        b"NOOP\r\n",
        "after a refused DATA the bytes are commands"
    );
}

#[test]
fn smuggling_variants_never_end_data() {
    for variant in [
        &b"\n.\n"[..],
        b"\n.\r\n",
        b"\r.\r",
        b"\r.\n",
        b"\r\n.\n",
        b"\r\n.\r",
        b"\r\n\x00.\r\n",
        b"\n.\r",
        b"\r.\r\n",
        b"\r\n.\x00\r\n",
        b"\r\n.\r\r\n",
        b"\r\r\n.\r\r\n",
        b"\n\n.\r\n",
        b"\r\n. \r\n",
    ] {
        let mut p = Pair::greeted("");
        p.client(b"DATA\r\n");
        p.upstream(b"354 go\r\n");
        p.take_up();
        p.take_client();
        let mut body = b"Subject: s\r\n\r\nhi".to_vec();
        body.extend_from_slice(variant);
        body.extend_from_slice(b"MAIL FROM:<evil@x>\r\nRCPT TO:<v@y>\r\nDATA\r\nspoof\r\n.\r\n");
        p.client(&body);
        let up = p.take_up();
        if variant.contains(&0) {
            // NUL refuses the message: the chunk is withheld and the upstream aborted.
            assert!(up.is_empty(), "{variant:?}: {up:?}");
            assert_eq!(p.upstream_closes, 1, "{variant:?}");
            assert_eq!(p.client_text(), "550 5.6.0 Message contains NUL bytes\r\n");
        } else {
            let first_end = up.windows(5).position(|w| w == b"\r\n.\r\n");
            assert_eq!(first_end, Some(up.len() - 5), "variant {variant:?}: {up:?}");
            for (i, &b) in up.iter().enumerate() {
                if b == b'\n' {
                    assert_eq!(up[i - 1], b'\r', "bare LF forwarded for {variant:?}");
                }
                if b == b'\r' {
                    assert_eq!(
                        up.get(i + 1),
                        Some(&b'\n'),
                        "bare CR forwarded for {variant:?}"
                    );
                }
            }
        }
    }
}

#[test]
fn bare_lf_reject_aborts_and_replays() {
    let mut p = Pair::greeted("bare_lf = \"reject\"");
    p.client(b"EHLO c\r\n");
    p.upstream(EHLO_REPLY);
    p.client(b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n");
    p.upstream(b"250 a\r\n250 b\r\n354 c\r\n");
    p.take_client();
    p.take_up();
    p.client(b"ok line\r\nbad\nline\r\n");
    assert_eq!(p.upstream_closes, 1);
    assert_eq!(p.connects, 2);
    let up = p.take_up();
    assert!(!up.contains(&b'\n') || up == b"ok line\r\n", "{up:?}");
    p.client(b".\r\nMAIL FROM:<a@b>\r\n");
    assert_eq!(
        p.client_text(),
        "550 5.6.11 Message contains bare CR or LF\r\n"
    );
    // The new connection: greeting, then the EHLO replay, with replies kept from the client.
    p.connected();
    p.upstream(BANNER);
    assert_eq!(p.take_up(), b"EHLO c\r\n");
    p.upstream(EHLO_REPLY);
    assert!(p.take_client().is_empty());
    assert_eq!(p.take_up(), b"MAIL FROM:<a@b>\r\n");
    p.upstream(b"250 ok\r\n");
    assert_eq!(p.client_text(), "250 ok\r\n");
}

#[test]
fn size_limits() {
    let mut p = Pair::greeted("max_message_size = 100");
    p.client(b"MAIL FROM:<a@b> SIZE=101\r\n");
    assert_eq!(
        p.client_text(),
        "552 5.3.4 Message size exceeds fixed maximum message size\r\n"
    );
    assert!(p.take_up().is_empty());
    p.client(b"MAIL FROM:<a@b> SIZE=50\r\nDATA\r\n");
    p.upstream(b"250 ok\r\n354 go\r\n");
    p.take_client();
    p.take_up();
    p.client(&[b'x'; 150]);
    assert_eq!(p.upstream_closes, 1);
    assert!(
        p.take_up().is_empty(),
        "nothing past the limit reaches the upstream"
    );
    p.client(b"\r\n.\r\n");
    assert_eq!(
        p.client_text(),
        "552 5.3.4 Message size exceeds fixed maximum message size\r\n"
    );
}

#[test]
fn recipient_limit() {
    let mut p = Pair::greeted("max_recipients = 1");
    p.client(b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nRCPT TO:<e@f>\r\n");
    assert_eq!(p.take_up(), b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\n");
    p.upstream(b"250 a\r\n250 b\r\n");
    assert_eq!(
        p.client_text(),
        "250 a\r\n250 b\r\n452 4.5.3 Too many recipients\r\n"
    );
}

#[test]
fn bdat_chunks_never_read_as_commands() {
    let mut p = Pair::greeted("");
    p.client(b"BDAT 12\r\nRSET\r\nQUIT\r\nBDAT 0 LAST\r\n");
    assert_eq!(p.take_up(), b"BDAT 12\r\nRSET\r\nQUIT\r\nBDAT 0 LAST\r\n");
    p.upstream(b"250 a\r\n250 b\r\n");
    assert_eq!(p.client_text(), "250 a\r\n250 b\r\n");
    assert!(!p.closed);
    let mut p = Pair::greeted("extensions = [\"PIPELINING\"]");
    p.client(b"BDAT 12 LAST\r\nRSET\r\nQUIT\r\nNOOP\r\n");
    assert_eq!(p.take_up(), b"NOOP\r\n");
    assert_eq!(p.client_text(), "500 5.5.1 Command unrecognized\r\n");
}

#[test]
fn auth_login_continuations_pass() {
    let mut p = Pair::greeted("");
    p.client(b"AUTH LOGIN\r\n");
    assert_eq!(p.take_up(), b"AUTH LOGIN\r\n");
    p.client(b"dXNlcg==\r\n");
    assert!(p.take_up().is_empty(), "held until the 334");
    p.upstream(b"334 VXNlcm5hbWU6\r\n");
    assert_eq!(p.take_up(), b"dXNlcg==\r\n");
    p.upstream(b"334 UGFzc3dvcmQ6\r\n");
    p.client(b"cGFzcw==\r\n");
    assert_eq!(p.take_up(), b"cGFzcw==\r\n");
    p.upstream(b"235 2.7.0 ok\r\n");
    assert!(p.client_text().ends_with("235 2.7.0 ok\r\n"));
    assert_eq!(p.s.auth.len(), 3);
}

#[test]
fn starttls_pass_discards_injected_commands() {
    let mut p = Pair::greeted("");
    p.client(b"STARTTLS\r\nMAIL FROM:<injected@x>\r\n");
    assert_eq!(p.take_up(), b"STARTTLS\r\n");
    p.upstream(b"220 go ahead\r\n");
    assert_eq!(p.client_text(), "220 go ahead\r\n");
    p.client(b"\x16\x03\x01binary");
    assert_eq!(
        p.take_up(),
        b"\x16\x03\x01binary",
        "opaque relay, no injected MAIL"
    );
    p.upstream(b"\x16\x03\x03server");
    assert_eq!(p.take_client(), b"\x16\x03\x03server");
}

#[test]
fn banner_masked_and_upstream_failures() {
    let mut p = Pair::new("mask_banner = true");
    p.connected();
    p.upstream(b"220-mx ESMTP\r\n220 hi\r\n");
    assert_eq!(p.client_text(), "220-********\r\n220 **\r\n");
    let mut p = Pair::new("");
    let mut out = Vec::new();
    p.s.on_upstream_failed(p.now, &mut out);
    p.apply(&[], out);
    assert_eq!(
        p.client_text(),
        "421 4.3.0 Service unavailable, try again later\r\n"
    );
    assert!(p.closed);
    let mut p = Pair::greeted("");
    p.client(b"NOOP\r\n");
    p.upstream_closed();
    assert_eq!(p.client_text(), "421 4.3.0 Upstream connection lost\r\n");
    let mut p = Pair::greeted("");
    p.client(b"DATA\r\n");
    p.upstream(b"354 go\r\n");
    p.take_client();
    p.client(b"part of a body\r\n");
    p.upstream_closed();
    assert!(!p.closed);
    p.client(b".\r\n");
    assert_eq!(
        p.client_text(),
        "451 4.3.0 Upstream connection lost, message not delivered\r\n"
    );
    assert!(p.closed);
}

#[test]
fn client_gone_mid_data_sends_no_end() {
    let mut p = Pair::greeted("");
    p.client(b"DATA\r\n");
    p.upstream(b"354 go\r\n");
    p.take_up();
    p.client(b"body\r\n.");
    p.client_closed();
    assert!(p.closed);
    assert_eq!(p.take_up(), b"body\r\n", "the held dot never leaves");
}

#[test]
fn bad_input() {
    let mut p = Pair::greeted("max_line_length = 64");
    p.client(&[b'A'; 100]);
    p.client(b"\r\nNOOP\r\n");
    assert_eq!(p.take_up(), b"NOOP\r\n");
    assert_eq!(p.client_text(), "500 5.5.2 Line too long\r\n");
    p.upstream(b"250 ok\r\n");
    p.client(b"NO\0OP\r\n\xff\xfe\r\n\r\n");
    assert_eq!(
        p.client_text(),
        "250 ok\r\n500 5.5.2 Syntax error\r\n500 5.5.2 Syntax error\r\n500 5.5.2 Syntax error\r\n"
    );
    let mut p = Pair::greeted("");
    p.client(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03");
    assert_eq!(
        p.client_text(),
        "421 4.7.0 Protocol error, closing connection\r\n"
    );
    assert!(p.closed);
    let mut p = Pair::greeted("hard_error_limit = 3");
    p.client(b"X\r\nX\r\nX\r\nX\r\n");
    assert_eq!(p.client_text(), "500 5.5.1 Command unrecognized\r\n500 5.5.1 Command unrecognized\r\n421 4.7.0 Too many errors, closing connection\r\n");
    assert!(p.closed);
}

#[test]
fn timeouts() {
    let mut p = Pair::greeted("command_timeout = 10");
    p.advance(Duration::from_secs(9));
    assert!(!p.closed);
    p.advance(Duration::from_secs(2));
    assert_eq!(p.client_text(), "421 4.4.2 Timeout, closing connection\r\n");
    let mut p = Pair::greeted("final_timeout = 20");
    p.client(b"DATA\r\n");
    p.upstream(b"354 go\r\n");
    p.client(b".\r\n");
    p.take_client();
    p.advance(Duration::from_secs(21));
    assert_eq!(p.client_text(), "451 4.4.2 Upstream timeout\r\n");
}

#[test]
fn check_addresses() {
    let mut p = Pair::greeted("check_addresses = true");
    p.client(b"MAIL FROM:<a|b@c>\r\nRCPT TO:<<x@y>\r\n");
    assert_eq!(
        p.client_text(),
        "553 5.1.3 Invalid character in address\r\n501 5.5.4 Syntax error in address\r\n"
    );
    assert!(p.take_up().is_empty());
}

/// The whole client side of a pipelined session with the hard cases in it.
const CLIENT_SCRIPT: &[u8] = b"EHLO client.test\r\nMAIL FROM:<a@b.test> SIZE=100 BODY=8BITMIME\r\nRCPT TO:<c@d.test>\r\nVRFY x\r\nDATA\r\nSubject: \xc3\xa9t\xc3\xa9\r\n\r\nbody\n.\r\n..stuffed\r\n.\r\nBDAT 12\r\nRSET\r\nQUIT\r\nBDAT 0 LAST\r\nAUTH LOGIN\r\ndXNlcg==\r\nQUIT\r\n";
/// The upstream's replies to it, in order.
const UPSTREAM_SCRIPT: &[u8] = b"220 mx ESMTP\r\n250-mx\r\n250-PIPELINING\r\n250 CHUNKING\r\n250 ok\r\n250 ok\r\n354 go\r\n250 queued\r\n250 chunk\r\n250 queued\r\n334 VXNlcm5hbWU6\r\n235 ok\r\n221 bye\r\n";

/// Feeds both scripts, each cut at the given points, and returns what each side got.
fn run_split(client_cuts: &[usize], upstream_cuts: &[usize]) -> (Vec<u8>, Vec<u8>) {
    let mut p = Pair::new("");
    p.connected();
    for piece in split(CLIENT_SCRIPT, client_cuts) {
        p.client(piece);
    }
    for piece in split(UPSTREAM_SCRIPT, upstream_cuts) {
        p.upstream(piece);
    }
    assert!(p.closed, "the session ends with QUIT");
    (p.take_up(), p.take_client())
}

fn split<'a>(bytes: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
    let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
    cuts.sort_unstable();
    let mut pieces = Vec::new();
    let mut start = 0;
    for c in cuts.into_iter().chain([bytes.len()]) {
        pieces.push(&bytes[start..c]);
        start = c;
    }
    pieces
}

#[test]
fn scripted_session_whole() {
    let (up, client) = run_split(&[], &[]);
    let up = String::from_utf8_lossy(&up);
    assert!(
        up.contains("body\r\n..\r\n..stuffed\r\n.\r\nBDAT 12\r\nRSET\r\nQUIT\r\nBDAT 0 LAST\r\n"),
        "{up}"
    );
    let client = String::from_utf8_lossy(&client);
    assert!(
        client.contains("250 ok\r\n250 ok\r\n500 5.5.1 Command unrecognized\r\n354 go\r\n"),
        "{client}"
    );
    assert!(client.ends_with("235 ok\r\n221 bye\r\n"), "{client}");
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]
    #[test]
    fn any_split_gives_the_same_bytes(
        client_cuts in proptest::collection::vec(0usize..1000, 0..40),
        upstream_cuts in proptest::collection::vec(0usize..1000, 0..20),
    ) {
        let whole = run_split(&[], &[]);
        proptest::prop_assert_eq!(run_split(&client_cuts, &upstream_cuts), whole);
    }
}

#[test]
fn every_single_byte_split_gives_the_same_bytes() {
    let whole = run_split(&[], &[]);
    let every: Vec<usize> = (0..CLIENT_SCRIPT.len()).collect();
    let every_up: Vec<usize> = (0..UPSTREAM_SCRIPT.len()).collect();
    assert_eq!(run_split(&every, &every_up), whole);
}

#[test]
fn refused_session_never_connects() {
    let policy = Arc::new(Policy::default());
    let now = Instant::now();
    let mut s = Session::refused(policy, now, Refusal::TooManyConnections);
    let mut out = Vec::new();
    s.start(now, &mut out);
    assert_eq!(
        out,
        vec![
            Action::Send(
                Side::Client,
                Chunk::Static(b"421 4.7.0 Too many connections\r\n")
            ),
            Action::Close
        ]
    );
}

#[test]
fn drain_waits_for_the_open_transaction() {
    let mut p = Pair::greeted("");
    p.client(b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n");
    p.upstream(b"250 a\r\n250 b\r\n354 c\r\n");
    p.take_client();
    let mut out = Vec::new();
    p.s.on_shutdown(false, p.now, &mut out);
    p.apply(&[], out);
    assert!(!p.closed, "mid-transaction: the message may finish");
    p.client(b"body\r\n.\r\n");
    p.upstream(b"250 queued\r\n");
    assert_eq!(
        p.client_text(),
        "250 queued\r\n421 4.3.2 Service shutting down\r\n"
    );
    assert!(p.closed);
    let mut p = Pair::greeted("");
    let mut out = Vec::new();
    p.s.on_shutdown(false, p.now, &mut out);
    p.apply(&[], out);
    assert_eq!(p.client_text(), "421 4.3.2 Service shutting down\r\n");
}

#[test]
fn forced_shutdown_mid_data_delivers_nothing() {
    let mut p = Pair::greeted("");
    p.client(b"DATA\r\n");
    p.upstream(b"354 c\r\n");
    p.take_up();
    p.client(b"half a body\r\n");
    let mut out = Vec::new();
    p.s.on_shutdown(true, p.now, &mut out);
    p.apply(&[], out);
    assert!(p.closed);
    assert!(!p.take_up().ends_with(b"\r\n.\r\n"));
}

#[test]
fn trickling_client_is_cut_by_min_data_rate() {
    let mut p = Pair::greeted("data_timeout = 10\nmin_data_rate = 100");
    p.client(b"DATA\r\n");
    p.upstream(b"354 c\r\n");
    p.take_client();
    // 1 byte per second: never idle for data_timeout, but far below 100 bytes/s.
    for _ in 0..10 {
        p.now += Duration::from_secs(1);
        p.client(b"x");
        p.advance(Duration::ZERO);
    }
    assert!(!p.closed, "the first data_timeout seconds are free");
    for _ in 0..5 {
        p.now += Duration::from_secs(1);
        p.client(b"x");
        p.advance(Duration::ZERO);
    }
    assert_eq!(p.client_text(), "421 4.4.2 Timeout, closing connection\r\n");
}

#[test]
fn counters_follow_decisions() {
    let mut p = Pair::greeted("max_recipients = 1");
    p.client(b"EHLO c\r\nVRFY x\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nRCPT TO:<e@f>\r\nDATA\r\n");
    p.upstream(EHLO_REPLY);
    p.upstream(b"250 a\r\n250 b\r\n354 c\r\n");
    p.client(b"x\ny\r\n.\r\n");
    p.upstream(b"250 queued\r\n");
    let c = *p.s.counters();
    assert_eq!(c.commands, 6);
    assert_eq!(c.blocked[Verb::VRFY.index().unwrap()], 1);
    assert_eq!(c.keywords_removed, 2, "ETRN and XCLIENT");
    assert_eq!(c.recipients_over_limit, 1);
    assert_eq!(c.bare_line_ends_normalized, 1);
    assert_eq!(c.messages_accepted, 1);
    assert_eq!(c.replies, [5, 1, 1, 1]);
}

#[test]
fn sender_rules() {
    let mut p = Pair::greeted(
        "sender_max_length = 20\nsender_deny = [\"@spam.test\"]\nsender_allow = { value = [\"@ok.test\", \"@spam.test\"], action = \"reject\" }",
    );
    p.client(b"MAIL FROM:<averyveryverylongname@ok.test>\r\n");
    assert_eq!(p.client_text(), "501 5.1.7 Sender address too long\r\n");
    p.client(b"MAIL FROM:<x@spam.test>\r\nMAIL FROM:<x@other.test>\r\n");
    assert_eq!(
        p.client_text(),
        "550 5.7.1 Sender rejected\r\n550 5.7.1 Sender rejected\r\n"
    );
    assert!(p.take_up().is_empty());
    p.client(b"MAIL FROM:<>\r\nMAIL FROM:<a@ok.test>\r\n");
    assert_eq!(p.take_up(), b"MAIL FROM:<>\r\nMAIL FROM:<a@ok.test>\r\n");
    let c = *p.s.counters();
    assert_eq!((c.sender_too_long, c.sender_denied), (1, 2));
    // log only: counted, forwarded
    let mut p = Pair::greeted("sender_deny = { value = [\"@spam.test\"], action = \"log\" }");
    p.client(b"MAIL FROM:<x@spam.test>\r\n");
    assert_eq!(p.take_up(), b"MAIL FROM:<x@spam.test>\r\n");
    assert_eq!(p.s.counters().sender_denied, 1);
    // drop: 421 and close
    let mut p = Pair::greeted("sender_deny = { value = [\"@spam.test\"], action = \"drop\" }");
    p.client(b"MAIL FROM:<x@spam.test>\r\n");
    assert_eq!(
        p.client_text(),
        "421 4.7.0 Policy violation, closing connection\r\n"
    );
    assert!(p.closed);
}

#[test]
fn relay_domains_and_invalid_recipients() {
    let mut p = Pair::greeted("relay_domains = [\"example.test\"]\nmax_invalid_recipients = 1");
    p.client(b"RCPT TO:<a@elsewhere.test>\r\nRCPT TO:<postmaster>\r\nRCPT TO:<b@example.test>\r\nRCPT TO:<c@example.test>\r\nRCPT TO:<d@example.test>\r\n");
    assert_eq!(
        p.take_up(),
        b"RCPT TO:<postmaster>\r\nRCPT TO:<b@example.test>\r\nRCPT TO:<c@example.test>\r\nRCPT TO:<d@example.test>\r\n"
    );
    assert_eq!(p.client_text(), "550 5.7.1 Relaying denied\r\n");
    p.upstream(b"250 ok\r\n550 5.1.1 no such user\r\n");
    assert!(!p.closed, "one invalid recipient is tolerated");
    p.upstream(b"550 5.1.1 no such user\r\n");
    assert_eq!(
        p.client_text(),
        "250 ok\r\n550 5.1.1 no such user\r\n550 5.1.1 no such user\r\n421 4.7.0 Too many invalid recipients, closing connection\r\n"
    );
    assert!(p.closed);
}

#[test]
fn message_rates_per_client_and_sender() {
    let rates = Arc::new(parking_lot::Mutex::new(Rates::new(100)));
    let policy = Arc::new(Policy::parse("rate_per_sender = 2", "t").unwrap());
    let now = Instant::now();
    let mut p = Pair::greeted("");
    p.s = Session::new(policy, now).with_rates(Arc::clone(&rates), 7);
    let mut out = Vec::new();
    p.s.start(now, &mut out);
    p.s.on_upstream_connected(now, &mut out);
    p.apply(&[], out);
    p.upstream(BANNER);
    p.take_client();
    for _ in 0..2 {
        p.client(b"MAIL FROM:<a@b.test>\r\n");
        p.upstream(b"250 ok\r\n");
        p.client(b"RSET\r\n");
        p.upstream(b"250 ok\r\n");
    }
    p.take_client();
    p.client(b"MAIL FROM:<A@B.test>\r\n");
    assert_eq!(
        p.client_text(),
        "451 4.7.1 Message rate limit exceeded, try again later\r\n"
    );
    p.client(b"MAIL FROM:<other@b.test>\r\n");
    p.upstream(b"250 ok\r\n");
    assert_eq!(p.client_text(), "250 ok\r\n");
}

#[test]
fn pregreet_holds_the_banner_and_catches_early_talkers() {
    let mut p = Pair::new("pregreet_wait_ms = 3000");
    p.connected();
    p.upstream(BANNER);
    assert!(p.take_client().is_empty(), "banner held");
    p.advance(Duration::from_secs(3));
    assert_eq!(p.take_client(), BANNER);
    p.client(b"EHLO x\r\n");
    assert_eq!(p.take_up(), b"EHLO x\r\n");
    let mut p = Pair::new("pregreet_wait_ms = 3000");
    p.connected();
    p.upstream(BANNER);
    p.client(b"EHLO too-early\r\n");
    assert_eq!(p.client_text(), "554 5.5.1 Protocol error\r\n");
    assert!(p.closed);
    assert!(p.take_up().is_empty());
}

#[test]
fn unauthorised_pipelining_is_refused() {
    let mut p = Pair::greeted("reject_unauth_pipelining = true\nextensions = [\"SIZE\"]");
    p.client(b"EHLO c\r\n");
    p.upstream(EHLO_REPLY);
    assert!(!p.client_text().contains("PIPELINING"));
    p.take_up();
    p.client(b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\n");
    assert_eq!(p.take_up(), b"MAIL FROM:<a@b>\r\n");
    assert_eq!(p.client_text(), "554 5.5.1 Protocol error\r\n");
    assert!(p.closed);
    // With PIPELINING offered, the same bytes are fine.
    let mut p = Pair::greeted("reject_unauth_pipelining = true");
    p.client(b"EHLO c\r\n");
    p.upstream(EHLO_REPLY);
    p.take_up();
    p.client(b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\n");
    assert_eq!(p.take_up(), b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\n");
}

#[test]
fn trickling_bdat_is_cut_while_the_upstream_owes_a_reply() {
    let mut p = Pair::greeted("data_timeout = 10\nmin_data_rate = 100");
    p.client(b"BDAT 100000 LAST\r\n");
    for _ in 0..15 {
        p.now += Duration::from_secs(1);
        p.client(b"y");
        p.advance(Duration::ZERO);
    }
    assert_eq!(p.client_text(), "421 4.4.2 Timeout, closing connection\r\n");
}

const ATTACHMENT: &[u8] = b"Subject: s\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b1\"\r\n\r\n--b1\r\nContent-Type: text/plain\r\n\r\nhi\r\n--b1\r\nContent-Type: application/octet-stream\r\nContent-Disposition: attachment; filename=\"run.EXE\"\r\nContent-Transfer-Encoding: base64\r\n\r\nTVqQAAMAAAAEAAAA\r\n--b1--\r\n";

fn data_session(policy: &str) -> Pair {
    let mut p = Pair::greeted(policy);
    p.client(b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n");
    p.upstream(b"250 a\r\n250 b\r\n354 c\r\n");
    p.take_client();
    p.take_up();
    p
}

#[test]
fn denied_attachment_is_refused_after_the_end_of_data() {
    let mut p = data_session("deny_filename_extensions = [\"exe\", \"js\"]");
    // Split across packets, boundary and file name included.
    for piece in ATTACHMENT.chunks(7) {
        p.client(piece);
    }
    assert_eq!(p.upstream_closes, 1, "upstream transaction aborted");
    assert!(!p.take_up().ends_with(b"\r\n.\r\n"));
    p.client(b".\r\n");
    assert_eq!(
        p.client_text(),
        "554 5.7.1 Message refused: attachment type not allowed\r\n"
    );
    assert_eq!(p.s.counters().content[Rule::FilenameExtension as usize], 1);
    assert!(!p.closed);
}

#[test]
fn content_rules_log_or_drop() {
    let mut p = data_session("deny_filename_extensions = { value = [\"exe\"], action = \"log\" }");
    p.client(ATTACHMENT);
    p.client(b".\r\n");
    assert!(
        p.take_up().ends_with(b"--b1--\r\n.\r\n"),
        "logged, delivered"
    );
    assert_eq!(p.upstream_closes, 0);
    assert_eq!(p.s.counters().content[Rule::FilenameExtension as usize], 1);
    let mut p = data_session("deny_filename_extensions = { value = [\"exe\"], action = \"drop\" }");
    p.client(ATTACHMENT);
    assert_eq!(
        p.client_text(),
        "421 4.7.0 Policy violation, closing connection\r\n"
    );
    assert!(p.closed);
}

#[test]
fn bdat_message_with_a_denied_header_is_refused() {
    let mut p = Pair::greeted("deny_headers = [\"X-Link2State\"]");
    let body = b"Subject: s\r\nX-Link2State: 1\r\n\r\nhi\r\n";
    let mut cmd = format!("BDAT {} LAST\r\n", body.len()).into_bytes();
    cmd.extend_from_slice(body);
    cmd.extend_from_slice(b"NOOP\r\n");
    p.client(&cmd);
    assert_eq!(p.upstream_closes, 1);
    assert!(
        !p.take_up().ends_with(b"hi\r\n"),
        "the chunk never reached the upstream whole"
    );
    assert_eq!(
        p.client_text(),
        "554 5.7.1 Message refused: header not allowed\r\n"
    );
    // The NOOP waits for the new upstream connection.
    p.connected();
    p.upstream(BANNER);
    assert_eq!(p.take_up(), b"NOOP\r\n");
}

/// A greeted session under `starttls = "terminate"` (the certificate is the guard layer's
/// business, so the engine runs without one).
fn terminating() -> Pair {
    let mut policy = Policy::default();
    policy.starttls = crate::config::StartTls::Terminate;
    let mut p = Pair::with_policy(policy);
    p.connected();
    p.upstream(BANNER);
    p.take_client();
    p
}

fn with_identity(policy: &str) -> Pair {
    let mut p = Pair::new(policy);
    let id = Identity {
        client: "192.0.2.7:40000".parse().unwrap(),
        local: "198.51.100.1:25".parse().unwrap(),
    };
    let s = std::mem::replace(&mut p.s, Session::new(Arc::new(Policy::default()), p.now));
    p.s = s.with_identity(id);
    p
}

#[test]
fn terminate_answers_starttls_after_pipelined_replies_and_drops_what_followed() {
    let mut p = terminating();
    p.client(b"EHLO c.test\r\nSTARTTLS\r\nMAIL FROM:<injected@x>\r\n");
    assert_eq!(
        p.take_up(),
        b"EHLO c.test\r\n",
        "STARTTLS and MAIL stay here"
    );
    assert_eq!(p.s.take_tls_switch(), None, "not before the EHLO reply");
    let mut out = Vec::new();
    p.s.on_upstream(EHLO_REPLY, p.now, &mut out);
    let switch = p.s.take_tls_switch().expect("switched after the 220");
    assert_eq!(switch, out.len(), "nothing follows the 220 in plain text");
    p.apply(EHLO_REPLY, out);
    let to_client = String::from_utf8(p.take_client()).unwrap();
    let (ehlo, ready) = to_client.split_at(to_client.find("220 ").unwrap());
    assert_eq!(ehlo.matches("STARTTLS").count(), 1, "{ehlo}");
    assert!(ehlo.ends_with("250 STARTTLS\r\n"), "ours, last: {ehlo}");
    assert_eq!(ready, "220 2.0.0 Ready to start TLS\r\n");
    p.s.tls_established(p.now);
    p.client(b"MAIL FROM:<a@b.test>\r\n");
    assert_eq!(p.take_client(), b"503 5.5.1 Send EHLO first\r\n");
    // A BDAT chunk before the new EHLO is skipped by its length, not read as commands.
    p.client(b"BDAT 25 LAST\r\nRCPT TO:<hidden@x.test>\r\n");
    assert_eq!(p.take_client(), b"503 5.5.1 Send EHLO first\r\n");
    assert!(p.take_up().is_empty(), "the injected MAIL never went out");
    p.client(b"EHLO c.test\r\n");
    p.upstream(EHLO_REPLY);
    let again = String::from_utf8(p.take_client()).unwrap();
    assert!(
        !again.contains("STARTTLS"),
        "not offered inside TLS: {again}"
    );
    p.client(b"STARTTLS\r\n");
    assert_eq!(p.take_client(), b"503 5.5.1 TLS already active\r\n");
}

#[test]
fn xclient_preamble_is_hidden_and_replayed_on_reconnect() {
    let mut p = with_identity("upstream_identity = \"xclient\"\nbare_lf = \"reject\"");
    p.client(b"EHLO c\r\n");
    p.connected();
    p.upstream(BANNER);
    assert!(
        p.take_client().is_empty(),
        "banner held during the preamble"
    );
    assert_eq!(p.take_up(), b"EHLO mailguard\r\n");
    p.upstream(EHLO_REPLY);
    assert_eq!(
        p.take_up(),
        b"XCLIENT ADDR=192.0.2.7 NAME=[UNAVAILABLE]\r\n".as_slice()
    );
    assert!(p.take_client().is_empty());
    p.upstream(b"220 mx.upstream.test ESMTP again\r\n");
    assert_eq!(p.take_client(), BANNER, "the first banner, once");
    assert_eq!(p.take_up(), b"EHLO c\r\n");
    p.upstream(EHLO_REPLY);
    assert!(p.client_text().starts_with("250-mx.upstream.test"));
    p.client(b"MAIL FROM:<a@b>\r\nDATA\r\n");
    p.upstream(b"250 a\r\n354 c\r\n");
    p.take_client();
    p.take_up();
    p.client(b"bad\nline\r\n.\r\n");
    assert_eq!(p.connects, 2);
    p.take_client();
    p.connected();
    p.upstream(BANNER);
    assert_eq!(p.take_up(), b"EHLO mailguard\r\n");
    p.upstream(EHLO_REPLY);
    assert_eq!(
        p.take_up(),
        b"XCLIENT ADDR=192.0.2.7 NAME=[UNAVAILABLE] HELO=c PROTO=ESMTP\r\n".as_slice()
    );
    p.upstream(b"220 again\r\n");
    assert_eq!(p.take_up(), b"EHLO c\r\n", "then the client's own replay");
    p.upstream(EHLO_REPLY);
    assert!(p.take_client().is_empty());
    assert_eq!(p.s.counters().identity_unsent, 0);
}

#[test]
fn xclient_not_offered_still_relays_and_counts_once() {
    let mut p = with_identity("upstream_identity = \"xclient\"");
    p.connected();
    p.upstream(BANNER);
    assert_eq!(p.take_up(), b"EHLO mailguard\r\n");
    p.upstream(b"250-mx\r\n250 SIZE 10\r\n");
    assert_eq!(p.take_client(), BANNER);
    assert!(p.take_up().is_empty());
    p.client(b"HELO c\r\n");
    assert_eq!(p.take_up(), b"HELO c\r\n");
    assert_eq!(p.s.counters().identity_unsent, 1);
}

#[test]
fn proxy_header_opens_every_upstream_connection() {
    for (mode, header) in [
        (
            "proxy-v1",
            proxy_header_v1("192.0.2.7:40000", "198.51.100.1:25"),
        ),
        (
            "proxy-v2",
            crate::proxy_header::v2(
                "192.0.2.7:40000".parse().unwrap(),
                "198.51.100.1:25".parse().unwrap(),
            ),
        ),
    ] {
        let mut p = with_identity(&format!(
            "upstream_identity = \"{mode}\"\nbare_lf = \"reject\""
        ));
        p.connected();
        assert_eq!(p.take_up(), header, "{mode}");
        p.upstream(BANNER);
        assert_eq!(p.take_client(), BANNER);
        p.client(b"EHLO c\r\nMAIL FROM:<a@b>\r\nDATA\r\n");
        p.upstream(EHLO_REPLY);
        p.upstream(b"250 a\r\n354 c\r\n");
        p.take_up();
        p.client(b"bad\nline\r\n");
        assert_eq!(p.connects, 2);
        p.connected();
        assert_eq!(p.take_up(), header, "{mode} on the reconnect");
    }
}

fn proxy_header_v1(client: &str, local: &str) -> Vec<u8> {
    crate::proxy_header::v1(client.parse().unwrap(), local.parse().unwrap())
}

#[test]
fn upstream_starttls_runs_hidden_and_a_refusal_closes_before_any_banner() {
    const POLICY: &str = "upstream_tls = \"starttls\"\nupstream_tls_verify = false";
    let mut p = Pair::new(POLICY);
    p.connected();
    p.upstream(BANNER);
    assert!(
        p.take_client().is_empty(),
        "banner held during the preamble"
    );
    assert_eq!(p.take_up(), b"EHLO mailguard\r\n");
    p.upstream(EHLO_REPLY);
    assert_eq!(p.take_up(), b"STARTTLS\r\n");
    let mut out = Vec::new();
    p.s.on_upstream(b"220 2.0.0 go ahead\r\n", p.now, &mut out);
    assert_eq!(p.s.take_upstream_tls_switch(), Some(out.len()));
    p.apply(&[], out);
    assert!(p.take_up().is_empty(), "nothing more until the handshake");
    let mut out = Vec::new();
    p.s.upstream_tls_established(p.now, &mut out);
    p.apply(&[], out);
    assert_eq!(p.take_up(), b"EHLO mailguard\r\n", "EHLO again, inside TLS");
    p.upstream(EHLO_REPLY);
    assert_eq!(
        p.take_client(),
        BANNER,
        "the banner once the preamble is over"
    );

    let mut refused = Pair::new(POLICY);
    refused.connected();
    refused.upstream(BANNER);
    refused.upstream(EHLO_REPLY);
    refused.upstream(b"454 4.7.0 TLS not available\r\n");
    assert_eq!(
        refused.take_client(),
        b"421 4.3.0 Service unavailable, try again later\r\n"
    );
    assert!(refused.closed);
}
