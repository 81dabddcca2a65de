//! Replays every committed fuzz corpus file (fuzz/corpus/engine, fuzz/corpus/scanner) through
//! the fuzz targets' own bodies, on stable, so CI checks the same invariants the fuzzers do:
//! no bare CR/LF forwarded in DATA (normalize), nothing after a Close, a 250 for a message
//! only after the upstream's, bounded buffers and deadlines, and the scanner against its oracle.
//!
//! `cargo fuzz run engine -- -max_total_time=60` (in fuzz/) explores further; crashes it finds
//! go into the corpus directories so this test keeps them fixed.

#[path = "../fuzz/src/lib.rs"]
mod fuzz_bodies;

use std::path::{Path, PathBuf};

fn corpus(target: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

fn replay(target: &str, body: fn(&[u8])) {
    let files = corpus(target);
    assert!(
        files.len() >= 10,
        "the {target} corpus has only {} files",
        files.len()
    );
    for f in &files {
        let data = std::fs::read(f).unwrap();
        let r = std::panic::catch_unwind(|| body(&data));
        if let Err(e) = r {
            let msg = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            panic!("{target} corpus file {} fails: {msg}", f.display());
        }
    }
}

#[test]
fn engine_corpus_replays_clean() {
    replay("engine", fuzz_bodies::engine);
}

#[test]
fn scanner_corpus_replays_clean() {
    replay("scanner", fuzz_bodies::scanner);
}

/// The oracle itself on the smuggling variants: none of them ends the message, and the
/// scanner agrees in every two-piece split.
#[test]
fn scanner_oracle_on_the_smuggling_variants() {
    use mailguard::proto::data::Bare;
    const VARIANTS: &[&[u8]] = &[
        b"\n.\n",
        b"\n.\r\n",
        b"\r.\r",
        b"\r.\n",
        b"\n.\r",
        b"\r.\r\n",
        b"\r\n.\n",
        b"\r\n.\r",
        b"\r\n\x00.\r\n",
        b"\r\n.\x00\r\n",
        b"\r\n.\r\r\n",
        b"\r\r\n.\r\r\n",
        b"\n\n.\r\n",
        b"\r\n. \r\n",
    ];
    for v in VARIANTS {
        let mut msg = b"Subject: x\r\n\r\nhi".to_vec();
        msg.extend_from_slice(v);
        msg.extend_from_slice(b"MAIL FROM:<ceo@bank.example>\r\n");
        let real_end = msg.len() + 5;
        msg.extend_from_slice(b"\r\n.\r\nQUIT\r\n");
        for bare in [Bare::Normalize, Bare::Reject] {
            let model = fuzz_bodies::oracle(&msg, bare);
            assert_eq!(model.end, Some(real_end), "{v:?} {bare:?}");
            for cut in 0..=msg.len() {
                assert_eq!(
                    fuzz_bodies::scan_chunks(&msg, &[cut], bare),
                    model,
                    "{v:?} cut {cut}"
                );
            }
        }
    }
}

/// Writes the hand-made seed corpus (run once with `--ignored`; the files are committed).
#[test]
#[ignore]
fn write_seed_corpus() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    for (target, seeds) in [("engine", engine_seeds()), ("scanner", scanner_seeds())] {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir).unwrap();
        for (name, data) in seeds {
            std::fs::write(dir.join(format!("seed-{name}")), data).unwrap();
        }
    }
}

/// Script builder for the engine target (see `fuzz_bodies::engine` for the opcodes).
struct Script(Vec<u8>);

impl Script {
    fn new(policy_bits: u8, timeouts: u8) -> Script {
        Script(vec![policy_bits, timeouts])
    }
    fn phrase(mut self, text: &[u8]) -> Script {
        let i = fuzz_bodies::PHRASES
            .iter()
            .position(|p| *p == text)
            .unwrap_or_else(|| panic!("no phrase {text:?}"));
        self.0.extend_from_slice(&[1, i as u8]);
        self
    }
    fn raw(mut self, bytes: &[u8]) -> Script {
        for c in bytes.chunks(255) {
            self.0.extend_from_slice(&[0, c.len() as u8]);
            self.0.extend_from_slice(c);
        }
        self
    }
    fn split(mut self, bytes: &[u8], size: u8) -> Script {
        self.0.extend_from_slice(&[13, bytes.len() as u8, size]);
        self.0.extend_from_slice(bytes);
        self
    }
    fn op(mut self, op: u8, arg: u8) -> Script {
        self.0.extend_from_slice(&[op, arg]);
        self
    }
    fn inject_raw(mut self, bytes: &[u8]) -> Script {
        self.0.extend_from_slice(&[10, bytes.len() as u8]);
        self.0.extend_from_slice(bytes);
        self
    }
    fn manual(mut self) -> Script {
        self.0.push(14);
        self
    }
    fn repeat(mut self, pattern: u8, count: u16, per_call: u8) -> Script {
        self.0.push(12);
        self.0.push(pattern);
        self.0.extend_from_slice(&count.to_le_bytes());
        self.0.push(per_call);
        self
    }
    fn done(self) -> Vec<u8> {
        self.0
    }
}

fn engine_seeds() -> Vec<(String, Vec<u8>)> {
    let hello = |p: u8| {
        Script::new(p, 0)
            .phrase(b"EHLO c.test\r\n")
            .phrase(b"MAIL FROM:<a@b.test>\r\n")
            .phrase(b"RCPT TO:<c@d.test>\r\n")
            .phrase(b"DATA\r\n")
    };
    let mut v: Vec<(String, Vec<u8>)> = Vec::new();
    v.push((
        "plain-message".into(),
        hello(0)
            .phrase(b"Subject: x\r\n\r\nbody\r\n")
            .phrase(b".\r\n")
            .phrase(b"QUIT\r\n")
            .done(),
    ));
    let variants: [&[u8]; 8] = [
        b"\n.\n",
        b"\n.\r\n",
        b"\r.\r",
        b"\r\n.\r\r\n",
        b"\r\n\x00.\r\n",
        b"\r\n. \r\n",
        b"\n\n.\r\n",
        b"\r\r\n.\r\r\n",
    ];
    for (i, var) in variants.iter().enumerate() {
        let mut body = b"Subject: s\r\n\r\nhi".to_vec();
        body.extend_from_slice(var);
        body.extend_from_slice(
            b"MAIL FROM:<ceo@x.test>\r\nRCPT TO:<v@x.test>\r\nDATA\r\nPay\r\n.\r\n",
        );
        for p in [0u8, 1] {
            v.push((
                format!("smuggle-{i}-mode{p}"),
                hello(p).split(&body, 1 + i as u8 % 4).op(3, 0).done(),
            ));
        }
    }
    v.push((
        "bdat".into(),
        Script::new(0, 0)
            .phrase(b"EHLO c.test\r\n")
            .phrase(b"MAIL FROM:<a@b.test>\r\n")
            .phrase(b"RCPT TO:<c@d.test>\r\n")
            .phrase(b"BDAT 3\r\nabcBDAT 2 LAST\r\nde")
            .phrase(b"QUIT\r\n")
            .done(),
    ));
    v.push((
        "bdat-lying".into(),
        Script::new(0, 0)
            .phrase(b"EHLO c.test\r\n")
            .phrase(b"MAIL FROM:<a@b.test>\r\n")
            .phrase(b"RCPT TO:<c@d.test>\r\n")
            .raw(b"BDAT 5 LAST\r\nhello\r\n.\r\nMAIL FROM:<x@y.test>\r\n")
            .done(),
    ));
    v.push((
        "pipelined-group-manual".into(),
        Script::new(0, 0)
            .manual()
            .op(4, 0)
            .op(3, 5)
            .op(3, 0)
            .phrase(b"EHLO c.test\r\n")
            .op(3, 7)
            .op(3, 0)
            .phrase(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nDATA\r\n")
            .op(3, 0)
            .phrase(b"Subject: x\r\n\r\nbody\r\n")
            .phrase(b".\r\n")
            .op(3, 3)
            .op(3, 0)
            .done(),
    ));
    v.push((
        "upstream-dies-mid-data".into(),
        hello(0)
            .phrase(b"Subject: x\r\n\r\nbody\r\n")
            .op(6, 0)
            .phrase(b".\r\n")
            .done(),
    ));
    v.push((
        "client-leaves-mid-data".into(),
        hello(0).raw(b"Subject: x\r\n\r\nhalf\r\n.").op(7, 0).done(),
    ));
    v.push((
        "client-leaves-before-reply".into(),
        hello(0)
            .manual()
            .phrase(b"Subject: x\r\n\r\nbody\r\n")
            .phrase(b".\r\n")
            .op(7, 0)
            .op(3, 0)
            .done(),
    ));
    v.push((
        "connect-fails".into(),
        Script::new(0, 0)
            .manual()
            .op(5, 0)
            .phrase(b"EHLO c.test\r\n")
            .done(),
    ));
    v.push((
        "greeting-timeout".into(),
        Script::new(0, 0).manual().op(4, 0).op(8, 40).done(),
    ));
    v.push((
        "data-trickle".into(),
        hello(0)
            .raw(b"x")
            .op(8, 2)
            .raw(b"x")
            .op(8, 2)
            .raw(b"x")
            .op(8, 2)
            .raw(b"x")
            .op(8, 30)
            .done(),
    ));
    v.push((
        "auth-login".into(),
        Script::new(0, 0)
            .phrase(b"EHLO c.test\r\n")
            .phrase(b"AUTH LOGIN dXNlcg==\r\n")
            .phrase(b"dXNlcg==\r\n")
            .phrase(b"NOOP\r\n")
            .done(),
    ));
    v.push((
        "auth-cancel".into(),
        Script::new(0, 0)
            .phrase(b"EHLO c.test\r\n")
            .phrase(b"AUTH PLAIN\r\n")
            .phrase(b"*\r\n")
            .done(),
    ));
    v.push((
        "starttls-with-injection".into(),
        Script::new(0, 0)
            .phrase(b"EHLO c.test\r\n")
            .raw(b"STARTTLS\r\nMAIL FROM:<inject@x.test>\r\n")
            .raw(b"\x16\x03\x01\x00\x05hello")
            .done(),
    ));
    v.push((
        "starttls-strip".into(),
        Script::new(8, 0)
            .phrase(b"EHLO c.test\r\n")
            .phrase(b"STARTTLS\r\n")
            .done(),
    ));
    v.push((
        "tls-hello".into(),
        Script::new(0, 0)
            .phrase(b"\x16\x03\x01\x00\x05hello")
            .done(),
    ));
    v.push((
        "http".into(),
        Script::new(0, 0).phrase(b"GET / HTTP/1.1\r\n").done(),
    ));
    v.push((
        "noop-flood".into(),
        Script::new(0, 0)
            .phrase(b"EHLO c.test\r\n")
            .repeat(0, 5000, 200)
            .done(),
    ));
    v.push((
        "noop-flood-manual".into(),
        Script::new(0, 0)
            .phrase(b"EHLO c.test\r\n")
            .manual()
            .repeat(0, 60000, 255)
            .done(),
    ));
    v.push((
        "long-line".into(),
        Script::new(2, 0)
            .phrase(b"EHLO c.test\r\n")
            .repeat(1, 50000, 100)
            .raw(b"\r\n")
            .done(),
    ));
    v.push((
        "rcpt-flood-small-limits".into(),
        Script::new(2, 0)
            .phrase(b"EHLO c.test\r\n")
            .phrase(b"MAIL FROM:<a@b.test>\r\n")
            .repeat(2, 100, 10)
            .done(),
    ));
    v.push((
        "size-limit-replay".into(),
        hello(2)
            .repeat(3, 50, 3)
            .phrase(b".\r\n")
            .phrase(b"MAIL FROM:<a@b.test>\r\n")
            .done(),
    ));
    v.push((
        "injected-replies".into(),
        hello(0)
            .op(9, 0)
            .op(9, 2)
            .inject_raw(b"250")
            .phrase(b".\r\n")
            .done(),
    ));
    v.push((
        "shutdown-graceful".into(),
        hello(0)
            .op(11, 0)
            .phrase(b"Subject: x\r\n\r\nbody\r\n")
            .phrase(b".\r\n")
            .done(),
    ));
    v.push((
        "shutdown-forced".into(),
        hello(0)
            .phrase(b"Subject: x\r\n\r\nbody\r\n")
            .op(11, 1)
            .done(),
    ));
    v.push((
        "rfc821-blocked".into(),
        Script::new(16 | 4, 0)
            .phrase(b"EHLO c.test\r\n")
            .phrase(b"VRFY x\r\n")
            .phrase(b"BDAT 5 LAST\r\n")
            .phrase(b"12345")
            .done(),
    ));
    v.push((
        "check-addresses".into(),
        Script::new(32, 0)
            .phrase(b"EHLO c.test\r\n")
            .phrase(b"MAIL FROM:<a|b@c.test>\r\n")
            .phrase(b"MAIL FROM:<a@b.test> SIZE=99999999\r\n")
            .done(),
    ));
    v
}

fn scanner_seeds() -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = Vec::new();
    let streams: [&[u8]; 16] = [
        b"Subject: x\r\n\r\nbody\r\n.\r\nQUIT\r\n",
        b".\r\n",
        b"a\n.\r\nb\r\n.\r\n",
        b"a\r.\rb\r\n.\r\n",
        b"a\r\n.\x00\r\n\r\n.\r\n",
        b"a\r\n\x00.\r\n.\r\n",
        b"a\r\n. \r\n.\r\n",
        b"..\r\n..x\r\n.\r\n",
        b"a\r\r\n.\r\r\n.\r\n",
        b"a\n\n.\r\n.\r\n",
        b"a\r\n.\r",
        b"a\r\n.",
        b"x\r",
        b"\n.\n\r.\n\n.\r\r.\r\n\r\n.\n\r\n.\r",
        b"\r\n.\rx",
        b"line\r\n.\r\n",
    ];
    for (i, s) in streams.iter().enumerate() {
        for mode in [0u8, 1] {
            let mut d = vec![mode, 3, 1, 2, 3];
            d.extend_from_slice(s);
            v.push((format!("stream-{i}-mode{mode}"), d));
        }
    }
    v
}
