//! The DATA-body scanner: the security core of the SMTP-smuggling defence.
//!
//! It owns one decision: where a DATA body ends, and which bytes of it go to the upstream. The
//! end of data is only `.\r\n` at an EOD-eligible line start (the body start, or right after a
//! real `\r\n`), so the non-standard endings of the smuggling attacks (`\n.\r\n`, `\r.\r`,
//! `\r\n.\x00\r\n`, ...) stay data. It reports bare CR, bare LF, NUL and unstuffed dot lines,
//! turns bare line endings into `\r\n` on request, and dot-stuffs every dot line that a lenient
//! reader could take for the end, so that a strict and a lenient upstream read one and the same
//! message.
//!
//! It scans chunks in place, in any split, with a carried state of a few bytes: the output,
//! the flags, the body length and the end position do not depend on how the stream was cut.
//! It must not touch policy (the caller maps [`Flags`] to replies), sockets or buffers: it
//! neither copies nor allocates, it only names ranges of the input and constant fix-ups.
//!
//! ```
//! use mailguard::proto::data::{Bare, DataScanner, Piece};
//!
//! let mut scanner = DataScanner::new(Bare::Normalize);
//! let input = b"Hi\n.\r\n\r\n.\r\nQUIT\r\n";
//! let mut out = Vec::new();
//! let scanned = scanner.scan(input, &mut |piece| match piece {
//!     Piece::Input(range) => out.extend_from_slice(&input[range]),
//!     Piece::Static(bytes) => out.extend_from_slice(bytes),
//! });
//! assert!(scanned.done);
//! assert_eq!(scanned.consumed, 11); // QUIT is the next command, not body
//! assert_eq!(out, b"Hi\r\n..\r\n\r\n.\r\n");
//! assert!(scanner.flags().bare_lf && scanner.flags().unstuffed_dot);
//! ```

use std::ops::Range;

use memchr::{memchr, memchr2};

/// What to do with bare CR and bare LF. Mirrors `config::BareLf`; kept separate so that this
/// module stays free of policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bare {
    /// Forward bytes unchanged; the caller stops forwarding once a flag is set.
    Reject,
    /// Turn each bare CR or bare LF into `\r\n`.
    Normalize,
}

/// A piece of output, in order: a range of the chunk passed to [`DataScanner::scan`], or a
/// constant fix-up (an inserted dot, a normalized line ending, or held bytes of an earlier
/// chunk).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Piece {
    Input(Range<usize>),
    Static(&'static [u8]),
}

/// What a message contained so far. Every flag is sticky.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flags {
    pub bare_lf: bool,
    pub bare_cr: bool,
    pub nul: bool,
    pub unstuffed_dot: bool,
}

/// The result of one [`DataScanner::scan`] call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Scanned {
    /// Bytes of the chunk that belong to the body, the terminator line included.
    pub consumed: usize,
    /// The end-of-data line was the last consumed bytes.
    pub done: bool,
}

/// Finds the end of a DATA body in place, chunk by chunk, and says what to forward.
#[derive(Clone, Debug)]
pub struct DataScanner {
    bare: Bare,
    carry: Carry,
    flags: Flags,
    consumed: u64,
}

/// The kind of a line start: whether `.\r\n` there ends the data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Start {
    /// The body start, or right after a real `\r\n`.
    Eligible,
    /// Right after a bare CR or LF: a line start for a lenient reader (and for the upstream
    /// once normalized), so dot lines get stuffed, but never the end.
    AfterBare,
}

/// Where the previous chunk left off. The held bytes are consumed but not yet emitted,
/// because what they mean depends on the next chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Carry {
    LineStart(Start),
    MidLine,
    /// A held `\r`: a real line ending or a bare CR.
    Cr,
    /// A held `.` at a line start: stuffed, unstuffed, or (if eligible) the end.
    Dot(Start),
    /// A held `.\r` at an eligible line start: the end, or an unstuffed dot plus a bare CR.
    DotCr,
    Done,
}

/// Where the scan goes next inside the current chunk.
#[derive(Clone, Copy, Debug)]
enum At {
    Start(Start),
    Mid,
}

enum Step {
    Go(At, usize),
    /// The rest of the chunk is consumed; `Carry` says what is held.
    Hold(Carry),
    /// The end of data: the terminator is emitted and ends at this offset.
    End(usize),
}

const CRLF: &[u8] = b"\r\n";
const DOT: &[u8] = b".";

impl DataScanner {
    /// A scanner at the start of the body, which is an EOD-eligible line start.
    pub fn new(bare: Bare) -> Self {
        Self {
            bare,
            carry: Carry::LineStart(Start::Eligible),
            flags: Flags::default(),
            consumed: 0,
        }
    }

    /// Scans `input`, the next chunk of the client's DATA stream, and calls `out` with the
    /// pieces to forward, in order.
    ///
    /// Stops right after the end-of-data line if it is in this chunk: then `done` is true,
    /// `consumed` counts the bytes up to and including its final `\r\n`, and the rest of the
    /// chunk (the next pipelined command) is not looked at. Otherwise `consumed` is the whole
    /// chunk, and bytes whose meaning depends on the next chunk are held and emitted later as
    /// [`Piece::Static`]. Once done, further calls consume nothing.
    pub fn scan(&mut self, input: &[u8], out: &mut impl FnMut(Piece)) -> Scanned {
        if self.carry == Carry::Done || input.is_empty() {
            let done = self.carry == Carry::Done;
            return Scanned { consumed: 0, done };
        }
        let mut emit = Emit { out, run: 0 };
        let mut step = self.resume(input, &mut emit);
        // Every step either moves forward in `input` or stops, so this ends.
        loop {
            step = match step {
                Step::Go(At::Mid, pos) => self.mid_line(input, pos, &mut emit),
                Step::Go(At::Start(start), pos) => self.line_start(input, start, pos, &mut emit),
                Step::Hold(carry) => return self.finish(input, carry, input.len()),
                Step::End(end) => return self.finish(input, Carry::Done, end),
            };
        }
    }

    /// What was seen so far in this message.
    pub fn flags(&self) -> Flags {
        self.flags
    }

    /// Body bytes consumed so far, without the terminator line. Held bytes that may still
    /// turn out to be the terminator (a `.` or `.\r` at an eligible line start) are not
    /// counted until they are known to be body.
    pub fn body_len(&self) -> u64 {
        let terminator = match self.carry {
            Carry::Dot(Start::Eligible) => 1,
            Carry::DotCr => 2,
            Carry::Done => 3,
            _ => 0,
        };
        self.consumed - terminator
    }

    /// Settles the bytes held from the previous chunk against the first bytes of this one.
    fn resume(&mut self, input: &[u8], emit: &mut Emit<'_, impl FnMut(Piece)>) -> Step {
        let first = input.first().copied();
        match self.carry {
            Carry::LineStart(start) => Step::Go(At::Start(start), 0),
            Carry::MidLine => Step::Go(At::Mid, 0),
            Carry::Cr if first == Some(b'\n') => {
                emit.fix(0, CRLF, 1);
                Step::Go(At::Start(Start::Eligible), 1)
            }
            Carry::Cr => {
                self.flags.bare_cr = true;
                emit.fix(0, self.bare_cr_fix(), 0);
                Step::Go(At::Start(Start::AfterBare), 0)
            }
            Carry::Dot(start) => self.resume_dot(input, start, emit),
            Carry::DotCr => self.resume_dot_cr(first, emit),
            Carry::Done => Step::End(0),
        }
    }

    /// A held `.` at a line start; `input` is not empty.
    fn resume_dot(
        &mut self,
        input: &[u8],
        start: Start,
        emit: &mut Emit<'_, impl FnMut(Piece)>,
    ) -> Step {
        match (input.first(), input.get(1)) {
            (Some(b'.'), _) => {
                emit.fix(0, DOT, 0);
                Step::Go(At::Mid, 1)
            }
            (Some(b'\r'), None) if start == Start::Eligible => Step::Hold(Carry::DotCr),
            (Some(b'\r'), Some(b'\n')) if start == Start::Eligible => {
                emit.fix(0, DOT, 0);
                emit.flush(2);
                Step::End(2)
            }
            _ => {
                // The byte after the dot is looked at again as an ordinary byte.
                self.flags.unstuffed_dot = true;
                emit.fix(0, b"..", 0);
                Step::Go(At::Mid, 0)
            }
        }
    }

    /// A held `.\r` at an eligible line start; `first` is the next byte.
    fn resume_dot_cr(&mut self, first: Option<u8>, emit: &mut Emit<'_, impl FnMut(Piece)>) -> Step {
        if first == Some(b'\n') {
            emit.fix(0, b".\r\n", 1);
            return Step::End(1);
        }
        self.flags.unstuffed_dot = true;
        self.flags.bare_cr = true;
        let fixed: &'static [u8] = match self.bare {
            Bare::Normalize => b"..\r\n",
            Bare::Reject => b"..\r",
        };
        emit.fix(0, fixed, 0);
        Step::Go(At::Start(Start::AfterBare), 0)
    }

    /// At a line start: only a dot there needs a decision.
    fn line_start(
        &mut self,
        input: &[u8],
        start: Start,
        pos: usize,
        emit: &mut Emit<'_, impl FnMut(Piece)>,
    ) -> Step {
        match input.get(pos) {
            None => {
                emit.flush(pos);
                Step::Hold(Carry::LineStart(start))
            }
            Some(b'.') => self.dot_line(input, start, pos, emit),
            Some(_) => Step::Go(At::Mid, pos),
        }
    }

    /// `input[pos]` is a `.` at a line start.
    fn dot_line(
        &mut self,
        input: &[u8],
        start: Start,
        pos: usize,
        emit: &mut Emit<'_, impl FnMut(Piece)>,
    ) -> Step {
        let eligible = start == Start::Eligible;
        match (input.get(pos + 1), input.get(pos + 2)) {
            (None, _) => {
                emit.flush(pos);
                Step::Hold(Carry::Dot(start))
            }
            // Correctly stuffed: forwarded unchanged.
            (Some(b'.'), _) => Step::Go(At::Mid, pos + 2),
            (Some(b'\r'), None) if eligible => {
                emit.flush(pos);
                Step::Hold(Carry::DotCr)
            }
            (Some(b'\r'), Some(b'\n')) if eligible => {
                // The terminator gets a piece of its own, so the caller can tell it from the body.
                emit.flush(pos);
                emit.flush(pos + 3);
                Step::End(pos + 3)
            }
            _ => {
                // `. \r\n`, `.\x00`, `.\r` + non-LF, or any dot line after a bare ending: one
                // more dot, so that no reader, however lenient, can take it for the end.
                self.flags.unstuffed_dot = true;
                emit.fix(pos, DOT, pos);
                Step::Go(At::Mid, pos + 1)
            }
        }
    }

    /// Inside a line: jumps to the next CR or LF that needs a decision. (NUL is looked for
    /// once per chunk, in `finish`.)
    fn mid_line(
        &mut self,
        input: &[u8],
        pos: usize,
        emit: &mut Emit<'_, impl FnMut(Piece)>,
    ) -> Step {
        let Some(at) = next_line_end(input, pos) else {
            emit.flush(input.len());
            return Step::Hold(Carry::MidLine);
        };
        match input[at] {
            b'\r' => self.carriage_return(input, at, emit),
            _ => {
                self.flags.bare_lf = true;
                if self.bare == Bare::Normalize {
                    emit.fix(at, CRLF, at + 1);
                }
                Step::Go(At::Start(Start::AfterBare), at + 1)
            }
        }
    }

    /// `input[at]` is a `\r`.
    fn carriage_return(
        &mut self,
        input: &[u8],
        at: usize,
        emit: &mut Emit<'_, impl FnMut(Piece)>,
    ) -> Step {
        match input.get(at + 1) {
            Some(b'\n') => Step::Go(At::Start(Start::Eligible), at + 2),
            Some(_) => {
                self.flags.bare_cr = true;
                if self.bare == Bare::Normalize {
                    emit.fix(at, CRLF, at + 1);
                }
                Step::Go(At::Start(Start::AfterBare), at + 1)
            }
            None => {
                emit.flush(at);
                Step::Hold(Carry::Cr)
            }
        }
    }

    fn bare_cr_fix(&self) -> &'static [u8] {
        match self.bare {
            Bare::Normalize => CRLF,
            Bare::Reject => b"\r",
        }
    }

    fn finish(&mut self, input: &[u8], carry: Carry, consumed: usize) -> Scanned {
        debug_assert!(consumed <= input.len());
        // One more pass over the chunk is cheaper than a third needle in every jump between
        // line ends (memchr3 measured about 10% slower in benches/scanner.rs). Only the body
        // counts: the bytes after the end belong to the next command.
        let body = input.get(..consumed).unwrap_or(input);
        if !self.flags.nul && memchr(0, body).is_some() {
            self.flags.nul = true;
        }
        self.carry = carry;
        self.consumed += consumed as u64;
        Scanned {
            consumed,
            done: carry == Carry::Done,
        }
    }
}

/// The offset of the next CR or LF at or after `pos` that needs a decision. Lines that end in
/// a real CRLF and are followed by a line not starting with a dot (nearly all of them) are
/// skipped in this one tight loop.
fn next_line_end(input: &[u8], mut pos: usize) -> Option<usize> {
    loop {
        let at = pos + memchr2(b'\r', b'\n', input.get(pos..)?)?;
        let plain = match input.get(at..at + 3) {
            Some([b'\r', b'\n', next]) => *next != b'.',
            _ => false,
        };
        if !plain {
            return Some(at);
        }
        pos = at + 2;
    }
}

/// Hands out one [`Piece::Input`] per clean run of the chunk: `run` is where the run that is
/// not yet emitted starts.
struct Emit<'a, F: FnMut(Piece)> {
    out: &'a mut F,
    run: usize,
}

impl<F: FnMut(Piece)> Emit<'_, F> {
    /// Emits the pending run up to `end`.
    fn flush(&mut self, end: usize) {
        if end > self.run {
            (self.out)(Piece::Input(self.run..end));
        }
        self.run = end;
    }

    /// Emits the run up to `at`, then `fix`; the next run starts at `resume` (so `at..resume`
    /// is replaced by `fix`).
    fn fix(&mut self, at: usize, fix: &'static [u8], resume: usize) {
        self.flush(at);
        (self.out)(Piece::Static(fix));
        self.run = resume;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// What scanning a whole stream yields: the output bytes, the flags, the body length and
    /// the offset just past the terminator.
    #[derive(Debug, PartialEq, Eq)]
    struct Outcome {
        out: Vec<u8>,
        flags: Flags,
        body_len: u64,
        end: Option<usize>,
    }

    /// The oracle: one byte at a time over the whole stream, with unlimited lookahead. It
    /// stops where a decision needs bytes the stream does not have yet.
    fn oracle(input: &[u8], bare: Bare) -> Outcome {
        let norm = bare == Bare::Normalize;
        let mut out = Vec::new();
        let mut flags = Flags::default();
        // Some(eligible) at a line start, None inside a line.
        let mut line_start = Some(true);
        let mut i = 0;
        let mut body_len = input.len() as u64;
        while i < input.len() {
            let b = input[i];
            if let (Some(eligible), b'.') = (line_start, b) {
                match (input.get(i + 1), input.get(i + 2)) {
                    (None, _) if eligible => {
                        body_len = i as u64;
                        break;
                    }
                    (None, _) => break,
                    (Some(b'.'), _) => {}
                    (Some(b'\r'), None) if eligible => {
                        body_len = i as u64;
                        break;
                    }
                    (Some(b'\r'), Some(b'\n')) if eligible => {
                        out.extend_from_slice(b".\r\n");
                        return Outcome {
                            out,
                            flags,
                            body_len: i as u64,
                            end: Some(i + 3),
                        };
                    }
                    _ => {
                        flags.unstuffed_dot = true;
                        out.push(b'.');
                    }
                }
            }
            line_start = None;
            match b {
                b'\r' => match input.get(i + 1) {
                    None => break,
                    Some(b'\n') => {
                        out.extend_from_slice(b"\r\n");
                        line_start = Some(true);
                        i += 1;
                    }
                    Some(_) => {
                        flags.bare_cr = true;
                        out.extend_from_slice(if norm { b"\r\n" } else { b"\r" });
                        line_start = Some(false);
                    }
                },
                b'\n' => {
                    flags.bare_lf = true;
                    out.extend_from_slice(if norm { b"\r\n" } else { b"\n" });
                    line_start = Some(false);
                }
                0 => {
                    flags.nul = true;
                    out.push(0);
                }
                _ => out.push(b),
            }
            i += 1;
        }
        Outcome {
            out,
            flags,
            body_len,
            end: None,
        }
    }

    /// Scans `input` cut at `cuts` (sorted offsets), as the engine would feed it.
    fn scan_chunks(input: &[u8], cuts: &[usize], bare: Bare) -> Outcome {
        let mut scanner = DataScanner::new(bare);
        let mut out = Vec::new();
        let mut from = 0;
        let mut end = None;
        let bounds = cuts.iter().copied().chain(std::iter::once(input.len()));
        for to in bounds {
            let chunk = &input[from..to.max(from)];
            let scanned = scanner.scan(chunk, &mut |piece| match piece {
                Piece::Input(range) => {
                    assert!(range.start < range.end, "empty piece");
                    out.extend_from_slice(&chunk[range]);
                }
                Piece::Static(bytes) => out.extend_from_slice(bytes),
            });
            if scanned.done {
                end = Some(from + scanned.consumed);
                break;
            }
            assert_eq!(scanned.consumed, chunk.len());
            from = to.max(from);
        }
        Outcome {
            out,
            flags: scanner.flags(),
            body_len: scanner.body_len(),
            end,
        }
    }

    fn whole(input: &[u8], bare: Bare) -> Outcome {
        scan_chunks(input, &[], bare)
    }

    fn bytewise(input: &[u8], bare: Bare) -> Outcome {
        let cuts: Vec<usize> = (1..input.len()).collect();
        scan_chunks(input, &cuts, bare)
    }

    /// Reads `out` as an upstream would: returns the unstuffed lines and the offset just past
    /// the end of data. A strict reader ends lines only at `\r\n`; a lenient one also at a
    /// bare CR or LF, and ignores spaces, tabs and NULs after the dot.
    fn read(out: &[u8], lenient: bool) -> (Vec<Vec<u8>>, Option<usize>) {
        let mut lines = Vec::new();
        let mut pos = 0;
        while pos < out.len() {
            let (len, ending) = line_at(&out[pos..], lenient);
            let Some(ending) = ending else { break };
            let line = &out[pos..pos + len];
            let trimmed = if lenient {
                let keep = line.iter().rposition(|b| !matches!(b, b' ' | b'\t' | 0));
                &line[..keep.map_or(0, |k| k + 1)]
            } else {
                line
            };
            pos += len + ending;
            if trimmed == b"." {
                return (lines, Some(pos));
            }
            lines.push(line.strip_prefix(b".").unwrap_or(line).to_vec());
        }
        (lines, None)
    }

    /// The length of the line at the start of `rest` and of its ending, if it has one.
    fn line_at(rest: &[u8], lenient: bool) -> (usize, Option<usize>) {
        for (i, &b) in rest.iter().enumerate() {
            let crlf = b == b'\r' && rest.get(i + 1) == Some(&b'\n');
            if crlf {
                return (i, Some(2));
            }
            if lenient && (b == b'\r' || b == b'\n') {
                return (i, Some(1));
            }
        }
        (rest.len(), None)
    }

    fn has_bare(out: &[u8]) -> bool {
        out.iter().enumerate().any(|(i, &b)| {
            (b == b'\r' && out.get(i + 1) != Some(&b'\n'))
                || (b == b'\n' && (i == 0 || out[i - 1] != b'\r'))
        })
    }

    /// Checks what must hold for every stream, whatever the chunking.
    fn check_stream(input: &[u8], bare: Bare) {
        let model = oracle(input, bare);
        assert_eq!(whole(input, bare), model, "whole vs oracle on {input:?}");
        assert_eq!(bytewise(input, bare), model, "bytewise on {input:?}");
        check_readers(&model, bare);
    }

    /// Both readers find the end exactly where the scanner did, and (normalized) agree.
    fn check_readers(model: &Outcome, bare: Bare) {
        let out = &model.out;
        let (lenient_lines, lenient_end) = read(out, true);
        let (strict_lines, strict_end) = read(out, false);
        let expected = model.end.map(|_| out.len());
        assert_eq!(lenient_end, expected, "lenient reader on {out:?}");
        assert_eq!(strict_end, expected, "strict reader on {out:?}");
        if bare == Bare::Normalize {
            if model.end.is_some() {
                assert!(!has_bare(out), "bare ending in {out:?}");
            }
            assert_eq!(lenient_lines, strict_lines);
        }
    }

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
        b"\r\n\x00.\r",
        b"\r\n\x00.\n",
        b"\r\n.",
    ];

    /// A message smuggling a second one behind `variant`, then the real end and a command.
    fn smuggle(prefix: &[u8], variant: &[u8]) -> (Vec<u8>, usize) {
        let mut msg = prefix.to_vec();
        msg.extend_from_slice(variant);
        msg.extend_from_slice(b"MAIL FROM:<ceo@bank.example>\r\nRCPT TO:<v@x.example>\r\n");
        msg.extend_from_slice(b"DATA\r\nFrom: ceo@bank.example\r\n\r\nPay.\r\n.\r\n");
        let end = msg.len();
        msg.extend_from_slice(b"QUIT\r\n");
        (msg, end)
    }

    #[test]
    fn smuggling_variants_never_end_the_message() {
        let prefixes: [&[u8]; 3] = [b"", b"Subject: hi", b"Subject: hi\r\n\r\nBody"];
        for variant in VARIANTS {
            for prefix in prefixes {
                let (msg, end) = smuggle(prefix, variant);
                for bare in [Bare::Normalize, Bare::Reject] {
                    let model = oracle(&msg, bare);
                    assert_eq!(model.end, Some(end), "variant {variant:?}");
                    check_stream(&msg, bare);
                    for cut in 0..=msg.len() {
                        assert_eq!(scan_chunks(&msg, &[cut], bare), model, "cut {cut}");
                    }
                }
                let normalized = oracle(&msg, Bare::Normalize).out;
                let first = memchr::memmem::find(&normalized, b"\r\n.\r\n");
                assert_eq!(first, Some(normalized.len() - 5), "variant {variant:?}");
                assert!(!normalized.starts_with(b".\r\n"));
            }
        }
    }

    #[test]
    fn variants_are_fixed_up_as_specified() {
        let cases: [(&[u8], &[u8], Flags); 6] = [
            (
                b"a\n.\r\n",
                b"a\r\n..\r\n",
                Flags {
                    bare_lf: true,
                    unstuffed_dot: true,
                    ..Flags::default()
                },
            ),
            (
                b"a\r.\rb",
                b"a\r\n..\r\nb",
                Flags {
                    bare_cr: true,
                    unstuffed_dot: true,
                    ..Flags::default()
                },
            ),
            (
                b"a\r\n. \r\n",
                b"a\r\n.. \r\n",
                Flags {
                    unstuffed_dot: true,
                    ..Flags::default()
                },
            ),
            (
                b"a\r\n\x00.\r\n",
                b"a\r\n\x00.\r\n",
                Flags {
                    nul: true,
                    ..Flags::default()
                },
            ),
            (
                b"a\r\r\n.\r\r\nb",
                b"a\r\n\r\n..\r\n\r\nb",
                Flags {
                    bare_cr: true,
                    unstuffed_dot: true,
                    ..Flags::default()
                },
            ),
            (b"..\r\n..x\r\n", b"..\r\n..x\r\n", Flags::default()),
        ];
        for (input, expected, flags) in cases {
            let got = whole(input, Bare::Normalize);
            assert_eq!(got.out, expected, "{input:?}");
            assert_eq!(got.flags, flags, "{input:?}");
            assert_eq!(got.end, None);
        }
    }

    #[test]
    fn reject_mode_forwards_bytes_unchanged_but_stuffs_dots() {
        let got = whole(b"a\nb\rc\r\n. \r\nd\n.\r\n", Bare::Reject);
        assert_eq!(got.out, b"a\nb\rc\r\n.. \r\nd\n..\r\n");
        assert_eq!(got.end, None);
    }

    #[test]
    fn stops_exactly_after_the_terminator() {
        let input = b"\r\n.\r\nMAIL FROM:<x>\r\n";
        for bare in [Bare::Normalize, Bare::Reject] {
            let mut scanner = DataScanner::new(bare);
            let mut pieces = Vec::new();
            let scanned = scanner.scan(input, &mut |p| pieces.push(p));
            assert_eq!(
                scanned,
                Scanned {
                    consumed: 5,
                    done: true
                }
            );
            assert_eq!(pieces, [Piece::Input(0..2), Piece::Input(2..5)]);
            assert_eq!(scanner.body_len(), 2);
            let again = scanner.scan(b".\r\n", &mut |_| panic!("scanned after the end"));
            assert_eq!(
                again,
                Scanned {
                    consumed: 0,
                    done: true
                }
            );
        }
    }

    #[test]
    fn empty_body_ends_at_once() {
        let mut scanner = DataScanner::new(Bare::Normalize);
        let scanned = scanner.scan(b".\r\nQUIT\r\n", &mut |_| {});
        assert_eq!(
            scanned,
            Scanned {
                consumed: 3,
                done: true
            }
        );
        assert_eq!(scanner.body_len(), 0);
    }

    #[test]
    fn terminator_split_at_every_offset() {
        let body: &[u8] = b"Subject: x\r\n\r\nline one\r\n..stuffed\r\nend\r\n.\r\nRSET\r\n";
        let end = body.len() - 6;
        for bare in [Bare::Normalize, Bare::Reject] {
            let model = whole(body, bare);
            assert_eq!(model.end, Some(end));
            assert_eq!(model.out, &body[..end]);
            assert_eq!(model.body_len, end as u64 - 3);
            for a in 0..=body.len() {
                for b in a..=body.len() {
                    assert_eq!(scan_chunks(body, &[a, b], bare), model, "cuts {a} {b}");
                }
            }
        }
    }

    #[test]
    fn clean_chunk_is_one_piece() {
        let mut scanner = DataScanner::new(Bare::Normalize);
        let input = b"From: a@b\r\nSubject: x\r\n\r\nHello\r\n..\r\nBye\r\n";
        let mut pieces = Vec::new();
        scanner.scan(input, &mut |p| pieces.push(p));
        assert_eq!(pieces, [Piece::Input(0..input.len())]);
    }

    #[test]
    fn held_bytes_are_not_body_until_known() {
        let mut scanner = DataScanner::new(Bare::Normalize);
        let mut pieces = Vec::new();
        scanner.scan(b"ab\r\n.", &mut |p| pieces.push(p));
        assert_eq!(pieces, [Piece::Input(0..4)]);
        assert_eq!(scanner.body_len(), 4);
        scanner.scan(b"\r", &mut |p| pieces.push(p));
        assert_eq!(scanner.body_len(), 4);
        scanner.scan(b"x", &mut |p| pieces.push(p));
        assert_eq!(scanner.body_len(), 7);
        assert_eq!(pieces[1..], [Piece::Static(b"..\r\n"), Piece::Input(0..1)]);
    }

    /// Streams built from fragments that meet at interesting places.
    fn stream() -> impl Strategy<Value = Vec<u8>> {
        let fragment = prop::sample::select(vec![
            &b"\r"[..],
            b"\n",
            b"\r\n",
            b".",
            b"..",
            b"\0",
            b"x",
            b" ",
            b".\r\n",
            b"\r\n.\r\n",
            b"MAIL",
        ]);
        prop::collection::vec(fragment, 0..40).prop_map(|parts| parts.concat())
    }

    fn cuts(max: usize) -> impl Strategy<Value = Vec<usize>> {
        prop::collection::vec(0..=max, 0..8).prop_map(|mut cuts| {
            cuts.sort_unstable();
            cuts
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn fragments_match_oracle_in_any_split(input in stream(), cuts in cuts(200)) {
            for bare in [Bare::Normalize, Bare::Reject] {
                let model = oracle(&input, bare);
                let cuts: Vec<usize> = cuts.iter().map(|&c| c.min(input.len())).collect();
                prop_assert_eq!(&scan_chunks(&input, &cuts, bare), &model);
                prop_assert_eq!(&whole(&input, bare), &model);
                prop_assert_eq!(&bytewise(&input, bare), &model);
                check_readers(&model, bare);
            }
        }

        #[test]
        fn random_bytes_match_oracle(
            input in prop::collection::vec(
                prop::sample::select(vec![b'\r', b'\n', b'.', 0, b'x', b' ', 0xe9]),
                0..160,
            ),
            cuts in cuts(160),
        ) {
            for bare in [Bare::Normalize, Bare::Reject] {
                let model = oracle(&input, bare);
                let cuts: Vec<usize> = cuts.iter().map(|&c| c.min(input.len())).collect();
                prop_assert_eq!(&scan_chunks(&input, &cuts, bare), &model);
                prop_assert_eq!(&bytewise(&input, bare), &model);
                check_readers(&model, bare);
            }
        }
    }
}
