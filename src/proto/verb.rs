//! SMTP verbs as packed `u64` tokens: up to eight ASCII letters, uppercased, one byte each.
//!
//! Comparing a verb is then one integer compare, and a set of allowed verbs is a short slice of
//! integers. A token longer than eight letters, or with anything but letters in it, is not a
//! verb at all (so it can never be allowed, whatever the policy says).

use std::fmt;

/// An SMTP verb: one to eight ASCII letters, case-folded to upper case.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Verb(u64);

impl Verb {
    pub const HELO: Verb = Verb::constant(b"HELO");
    pub const EHLO: Verb = Verb::constant(b"EHLO");
    pub const MAIL: Verb = Verb::constant(b"MAIL");
    pub const RCPT: Verb = Verb::constant(b"RCPT");
    pub const DATA: Verb = Verb::constant(b"DATA");
    pub const BDAT: Verb = Verb::constant(b"BDAT");
    pub const RSET: Verb = Verb::constant(b"RSET");
    pub const NOOP: Verb = Verb::constant(b"NOOP");
    pub const QUIT: Verb = Verb::constant(b"QUIT");
    pub const AUTH: Verb = Verb::constant(b"AUTH");
    pub const STARTTLS: Verb = Verb::constant(b"STARTTLS");
    pub const HELP: Verb = Verb::constant(b"HELP");
    pub const VRFY: Verb = Verb::constant(b"VRFY");
    pub const EXPN: Verb = Verb::constant(b"EXPN");
    pub const ETRN: Verb = Verb::constant(b"ETRN");
    pub const TURN: Verb = Verb::constant(b"TURN");
    pub const ATRN: Verb = Verb::constant(b"ATRN");
    pub const SAML: Verb = Verb::constant(b"SAML");
    pub const SEND: Verb = Verb::constant(b"SEND");
    pub const SOML: Verb = Verb::constant(b"SOML");
    pub const XCLIENT: Verb = Verb::constant(b"XCLIENT");
    pub const XFORWARD: Verb = Verb::constant(b"XFORWARD");

    /// Whether this is an HTTP method: a client speaking HTTP to port 25 is answered once and
    /// dropped instead of being fed error replies line by line.
    pub fn is_http_method(self) -> bool {
        const METHODS: [Verb; 6] = [
            Verb::constant(b"GET"),
            Verb::constant(b"POST"),
            Verb::constant(b"HEAD"),
            Verb::constant(b"PUT"),
            Verb::constant(b"CONNECT"),
            Verb::constant(b"OPTIONS"),
        ];
        METHODS.contains(&self)
    }

    /// How many verbs [`Verb::index`] numbers.
    pub const INDEXED: usize = 22;

    /// The known verbs, in index order.
    pub const KNOWN: [Verb; Verb::INDEXED] = [
        Verb::HELO,
        Verb::EHLO,
        Verb::MAIL,
        Verb::RCPT,
        Verb::DATA,
        Verb::BDAT,
        Verb::RSET,
        Verb::NOOP,
        Verb::QUIT,
        Verb::AUTH,
        Verb::STARTTLS,
        Verb::HELP,
        Verb::VRFY,
        Verb::EXPN,
        Verb::ETRN,
        Verb::TURN,
        Verb::ATRN,
        Verb::SAML,
        Verb::SEND,
        Verb::SOML,
        Verb::XCLIENT,
        Verb::XFORWARD,
    ];

    /// A small number for each known verb (for counters); `None` for other verbs.
    pub fn index(self) -> Option<usize> {
        Verb::KNOWN.iter().position(|&v| v == self)
    }

    /// Builds a verb from a literal; only for upper-case constants of 1..=8 letters.
    const fn constant(name: &[u8]) -> Verb {
        assert!(!name.is_empty() && name.len() <= 8);
        let mut token = 0u64;
        let mut i = 0;
        while i < name.len() {
            assert!(name[i].is_ascii_uppercase());
            token = (token << 8) | name[i] as u64;
            i += 1;
        }
        Verb(token)
    }

    /// Parses a whole token (no spaces). `None` unless it is 1..=8 ASCII letters.
    pub fn from_token(token: &[u8]) -> Option<Verb> {
        if token.is_empty() || token.len() > 8 {
            return None;
        }
        let mut packed = 0u64;
        for &b in token {
            if !b.is_ascii_alphabetic() {
                return None;
            }
            packed = (packed << 8) | u64::from(b.to_ascii_uppercase());
        }
        Some(Verb(packed))
    }

    /// Reads the verb at the start of a command line (without its line ending): the bytes up
    /// to the first space. Returns the verb and the length of its token.
    pub fn of_line(line: &[u8]) -> Option<(Verb, usize)> {
        let end = memchr::memchr(b' ', line).unwrap_or(line.len());
        Verb::from_token(&line[..end]).map(|v| (v, end))
    }

    /// The verb's name in upper case.
    pub fn name(self) -> String {
        let bytes = self.0.to_be_bytes();
        bytes
            .iter()
            .filter(|&&b| b != 0)
            .map(|&b| b as char)
            .collect()
    }
}

impl fmt::Debug for Verb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Verb({})", self.name())
    }
}

impl fmt::Display for Verb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_case_insensitively() {
        assert_eq!(Verb::of_line(b"mail FROM:<a@b>"), Some((Verb::MAIL, 4)));
        assert_eq!(Verb::of_line(b"StartTls"), Some((Verb::STARTTLS, 8)));
        assert_eq!(Verb::of_line(b"QUIT"), Some((Verb::QUIT, 4)));
    }

    #[test]
    fn rejects_non_verbs() {
        assert_eq!(Verb::of_line(b""), None);
        assert_eq!(Verb::of_line(b" MAIL"), None);
        assert_eq!(Verb::of_line(b"MAIL\0"), None);
        assert_eq!(Verb::of_line(b"TOOLONGVERB x"), None);
        assert_eq!(Verb::of_line(b"HE1O x"), None);
        assert_eq!(Verb::of_line("MÄIL x".as_bytes()), None);
    }

    #[test]
    fn names_round_trip() {
        assert_eq!(Verb::XFORWARD.name(), "XFORWARD");
        assert_eq!(Verb::from_token(b"vrfy"), Some(Verb::VRFY));
    }
}
