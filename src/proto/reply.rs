//! Upstream replies: assembling them from a byte stream split anywhere, and the two rewrites
//! the policy asks for (banner masking, EHLO keyword filtering).
//!
//! Owns only reply syntax. Which reply answers which command is the session's business.

use std::ops::Range;

/// Longest upstream reply line accepted (RFC 5321 asks for 512; real servers stay far below).
const MAX_LINE: usize = 4096;
/// Most lines in one reply (an EHLO reply has a dozen or two).
const MAX_LINES: usize = 128;

/// One complete reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The three-digit code.
    pub code: u16,
    /// Where its bytes are.
    pub bytes: ReplyBytes,
}

/// The bytes of a reply: inside the input of the current call when it arrived whole,
/// otherwise reassembled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplyBytes {
    /// A range of the input of the current call.
    Input(Range<usize>),
    /// Reassembled from several inputs.
    Owned(Vec<u8>),
}

impl Reply {
    /// The reply's bytes, given the input of the current call.
    pub fn bytes<'a>(&'a self, input: &'a [u8]) -> &'a [u8] {
        match &self.bytes {
            ReplyBytes::Input(r) => &input[r.clone()],
            ReplyBytes::Owned(v) => v,
        }
    }

    /// The reply's class: 2 for 2xx and so on.
    pub fn class(&self) -> u16 {
        self.code / 100
    }
}

/// The upstream broke the reply syntax; the session cannot go on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    #[error("upstream reply line is not `NNN text`")]
    Syntax,
    #[error("upstream reply continuation has a different code")]
    CodeChanged,
    #[error("upstream reply too long")]
    TooLong,
}

/// Assembles replies from upstream bytes; carries a partial reply between calls.
#[derive(Debug, Default)]
pub struct ReplyParser {
    /// The partial reply carried over from earlier inputs.
    carried: Vec<u8>,
    /// Code of the reply being assembled, once its first line is complete.
    code: Option<u16>,
    lines: usize,
}

impl ReplyParser {
    /// Reads the next complete reply from `input[*pos..]`, advancing `pos`. `Ok(None)` means
    /// the rest of the input was carried over and more bytes are needed.
    pub fn next(&mut self, input: &[u8], pos: &mut usize) -> Result<Option<Reply>, ReplyError> {
        let start = *pos;
        while *pos < input.len() {
            let Some(lf) = memchr::memchr(b'\n', &input[*pos..]) else {
                self.carry(&input[start..])?;
                *pos = input.len();
                return Ok(None);
            };
            let line_end = *pos + lf + 1;
            let last = if self.carried.is_empty() || *pos > start {
                self.check_line(&input[*pos..line_end])?
            } else {
                // The line began in an earlier input: check it whole.
                let begun = self.carried.len() - self.partial_line_len();
                let mut line = self.carried[begun..].to_vec();
                line.extend_from_slice(&input[*pos..line_end]);
                self.check_line(&line)?
            };
            *pos = line_end;
            if last {
                return Ok(Some(self.finish(input, start..line_end)));
            }
        }
        self.carry(&input[start..])?;
        Ok(None)
    }

    /// Whether a reply is partly assembled.
    pub fn is_mid_reply(&self) -> bool {
        !self.carried.is_empty() || self.code.is_some()
    }

    fn carry(&mut self, bytes: &[u8]) -> Result<(), ReplyError> {
        self.carried.extend_from_slice(bytes);
        if self.partial_line_len() > MAX_LINE {
            return Err(ReplyError::TooLong);
        }
        Ok(())
    }

    /// Length of the unterminated last line in `carried`.
    fn partial_line_len(&self) -> usize {
        match memchr::memrchr(b'\n', &self.carried) {
            Some(i) => self.carried.len() - i - 1,
            None => self.carried.len(),
        }
    }

    /// Validates one whole line; returns whether it ends the reply.
    fn check_line(&mut self, line: &[u8]) -> Result<bool, ReplyError> {
        if line.len() > MAX_LINE + 2 {
            return Err(ReplyError::TooLong);
        }
        let code = parse_code(line).ok_or(ReplyError::Syntax)?;
        if *self.code.get_or_insert(code) != code {
            return Err(ReplyError::CodeChanged);
        }
        self.lines += 1;
        if self.lines > MAX_LINES {
            return Err(ReplyError::TooLong);
        }
        Ok(line.get(3) != Some(&b'-'))
    }

    fn finish(&mut self, input: &[u8], range: Range<usize>) -> Reply {
        let code = self.code.take().unwrap_or(0);
        self.lines = 0;
        let bytes = if self.carried.is_empty() {
            ReplyBytes::Input(range)
        } else {
            let mut owned = std::mem::take(&mut self.carried);
            owned.extend_from_slice(&input[range]);
            ReplyBytes::Owned(owned)
        };
        Reply { code, bytes }
    }
}

/// The code of a reply line: three digits, then a space, a hyphen or the line end.
fn parse_code(line: &[u8]) -> Option<u16> {
    let digits = line.get(..3)?;
    if !digits.iter().all(u8::is_ascii_digit) || !(b'2'..=b'5').contains(&digits[0]) {
        return None;
    }
    match line.get(3) {
        Some(b' ' | b'-' | b'\r' | b'\n') => {}
        _ => return None,
    }
    Some(
        digits
            .iter()
            .fold(0u16, |n, d| n * 10 + u16::from(d - b'0')),
    )
}

/// The lines of a reply, each without its line ending.
pub fn lines(reply: &[u8]) -> impl Iterator<Item = &[u8]> {
    reply
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
}

/// The text of a reply line: what follows `NNN-` or `NNN `.
fn text(line: &[u8]) -> &[u8] {
    line.get(4..).unwrap_or(&[])
}

/// Replaces the text of every line by as many `*`, keeping the code and line structure
/// (the ASA `mask-banner` behaviour, without its quirks).
pub fn mask(reply: &[u8]) -> Vec<u8> {
    let all: Vec<&[u8]> = lines(reply).collect();
    let mut out = Vec::with_capacity(reply.len() + 2);
    for (i, line) in all.iter().enumerate() {
        let stars = text(line).len();
        push_line(&mut out, &line[..3], i + 1 == all.len(), &vec![b'*'; stars]);
    }
    out
}

/// Rebuilds a 250 EHLO reply keeping the first line and the keyword lines `keep` accepts;
/// continuation markers are renumbered so the last kept line ends the reply.
pub fn filter_ehlo(reply: &[u8], keep: impl Fn(&[u8]) -> bool) -> Vec<u8> {
    let mut kept: Vec<&[u8]> = Vec::new();
    for (i, line) in lines(reply).enumerate() {
        let t = text(line);
        if i == 0 || keep(keyword(t)) {
            kept.push(line);
        }
    }
    let mut out = Vec::with_capacity(reply.len());
    for (i, line) in kept.iter().enumerate() {
        push_line(&mut out, &line[..3], i + 1 == kept.len(), text(line));
    }
    out
}

/// The keyword of an EHLO line: up to the first space or `=` (the old `AUTH=LOGIN` form).
pub fn keyword(text: &[u8]) -> &[u8] {
    let end = text
        .iter()
        .position(|&b| b == b' ' || b == b'=')
        .unwrap_or(text.len());
    &text[..end]
}

fn push_line(out: &mut Vec<u8>, code: &[u8], last: bool, text: &[u8]) {
    out.extend_from_slice(code);
    out.push(if last { b' ' } else { b'-' });
    out.extend_from_slice(text);
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_all(chunks: &[&[u8]]) -> Result<Vec<(u16, Vec<u8>)>, ReplyError> {
        let mut p = ReplyParser::default();
        let mut got = Vec::new();
        for chunk in chunks {
            let mut pos = 0;
            while let Some(r) = p.next(chunk, &mut pos)? {
                got.push((r.code, r.bytes(chunk).to_vec()));
            }
        }
        Ok(got)
    }

    #[test]
    fn multi_line_reply_split_anywhere() {
        let whole: &[u8] = b"250-mx.test\r\n250-PIPELINING\r\n250 SIZE 10\r\n354 go\r\n";
        let expect = parse_all(&[whole]).unwrap();
        assert_eq!(expect.len(), 2);
        assert_eq!(expect[0].0, 250);
        assert_eq!(expect[1], (354, b"354 go\r\n".to_vec()));
        for cut in 0..whole.len() {
            for cut2 in cut..whole.len() {
                let got = parse_all(&[&whole[..cut], &whole[cut..cut2], &whole[cut2..]]).unwrap();
                assert_eq!(got, expect, "cuts {cut} {cut2}");
            }
        }
    }

    #[test]
    fn rejects_bad_syntax() {
        assert_eq!(parse_all(&[b"hello\r\n"]), Err(ReplyError::Syntax));
        assert_eq!(
            parse_all(&[b"250-a\r\n251 b\r\n"]),
            Err(ReplyError::CodeChanged)
        );
        assert_eq!(parse_all(&[b"2500 x\r\n"]), Err(ReplyError::Syntax));
        assert_eq!(parse_all(&[&[b'2'; 5000][..]]), Err(ReplyError::TooLong));
        assert_eq!(parse_all(&[b"250\r\n"]).unwrap().len(), 1);
    }

    #[test]
    fn masks_text_keeps_structure() {
        assert_eq!(
            mask(b"220-mx.example.com ESMTP\r\n220 hi\r\n"),
            b"220-********************\r\n220 **\r\n"
        );
    }

    #[test]
    fn filters_ehlo_and_fixes_continuations() {
        let r = b"250-mx\r\n250-PIPELINING\r\n250-STARTTLS\r\n250-AUTH=LOGIN\r\n250 CHUNKING\r\n";
        let out = filter_ehlo(r, |k| k == b"PIPELINING");
        assert_eq!(out, b"250-mx\r\n250 PIPELINING\r\n");
        let out = filter_ehlo(r, |_| false);
        assert_eq!(out, b"250 mx\r\n");
        assert_eq!(keyword(b"AUTH=LOGIN"), b"AUTH");
        assert_eq!(keyword(b"SIZE 100"), b"SIZE");
    }
}
