//! SMTP reply parsing for the sender, and its read buffer.

use std::io;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// One complete reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reply {
    /// The three-digit code.
    pub code: u16,
    /// Some line of the reply is the `PIPELINING` keyword (meaningful for EHLO replies).
    pub pipelining: bool,
    /// Bytes the reply takes in the buffer.
    pub len: usize,
}

/// Longest reply accepted (a reply that does not end within it is a protocol error).
pub const MAX_REPLY: usize = 64 * 1024;

/// Parses the first reply in `buf`: `Ok(None)` if it is not complete yet.
pub fn parse(buf: &[u8]) -> io::Result<Option<Reply>> {
    let mut pos = 0;
    let mut pipelining = false;
    loop {
        let Some(nl) = memchr::memchr(b'\n', &buf[pos..]) else {
            return Ok(None);
        };
        let line = &buf[pos..pos + nl];
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        pos += nl + 1;
        let code = match line {
            [a @ b'1'..=b'5', b @ b'0'..=b'9', c @ b'0'..=b'9', ..] => {
                u16::from(a - b'0') * 100 + u16::from(b - b'0') * 10 + u16::from(c - b'0')
            }
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "malformed reply",
                ))
            }
        };
        let text = line.get(4..).unwrap_or(b"");
        let keyword = text.split(|&b| b == b' ').next().unwrap_or(b"");
        pipelining |= keyword.eq_ignore_ascii_case(b"PIPELINING");
        match line.get(3) {
            Some(b'-') => continue,
            None | Some(b' ') => {
                return Ok(Some(Reply {
                    code,
                    pipelining,
                    len: pos,
                }))
            }
            Some(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "malformed reply",
                ))
            }
        }
    }
}

/// A session's receive buffer: replies are parsed in place, the buffer is reused.
pub struct ReplyBuf {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl Default for ReplyBuf {
    fn default() -> Self {
        Self::new()
    }
}

impl ReplyBuf {
    /// A 4 KiB buffer (grows up to [`MAX_REPLY`] for huge multi-line replies).
    pub fn new() -> ReplyBuf {
        ReplyBuf {
            buf: vec![0; 4096],
            start: 0,
            end: 0,
        }
    }

    /// Forgets buffered bytes (new connection).
    pub fn clear(&mut self) {
        self.start = 0;
        self.end = 0;
    }

    /// Reads the next reply from `stream`.
    pub async fn next(&mut self, stream: &mut TcpStream) -> io::Result<Reply> {
        loop {
            if let Some(r) = parse(&self.buf[self.start..self.end])? {
                self.start += r.len;
                if self.start == self.end {
                    self.start = 0;
                    self.end = 0;
                }
                return Ok(r);
            }
            if self.end == self.buf.len() {
                if self.start > 0 {
                    self.buf.copy_within(self.start..self.end, 0);
                    self.end -= self.start;
                    self.start = 0;
                } else if self.buf.len() < MAX_REPLY {
                    self.buf.resize(MAX_REPLY, 0);
                } else {
                    return Err(io::Error::new(io::ErrorKind::InvalidData, "reply too long"));
                }
            }
            let n = stream.read(&mut self.buf[self.end..]).await?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "server closed the connection",
                ));
            }
            self.end += n;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_single_multi_and_partial_replies() {
        assert_eq!(
            parse(b"220 hi\r\n").unwrap(),
            Some(Reply {
                code: 220,
                pipelining: false,
                len: 8
            })
        );
        assert_eq!(
            parse(b"250\r\nx").unwrap(),
            Some(Reply {
                code: 250,
                pipelining: false,
                len: 5
            })
        );
        let ehlo = b"250-host\r\n250-PIPELINING\r\n250 SIZE 10\r\n354 go\r\n";
        let r = parse(ehlo).unwrap().unwrap();
        assert_eq!((r.code, r.pipelining, r.len), (250, true, ehlo.len() - 8));
        assert_eq!(parse(b"250-host\r\n250 SI").unwrap(), None);
        assert!(parse(b"hello\r\n").is_err());
        assert!(parse(b"250x\r\n").is_err());
    }
}
