//! Envelope address rules: the sender patterns (`sender_deny`, `sender_allow`) and the relay
//! domain list, compiled once per policy and matched per MAIL/RCPT without allocating.
//!
//! Owns pattern syntax and matching only; which reply a match earns is the session's business.

use aho_corasick::{AhoCorasick, AhoCorasickBuilder, MatchKind};

/// What kind of pattern an entry of a sender list is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// `user@example.com`: that address exactly.
    Exact,
    /// `@example.com`: any address at exactly that domain.
    Domain,
    /// `*.example.com`: any address at a subdomain of that domain (not the domain itself).
    Subdomains,
}

/// A compiled list of address patterns, matched case-insensitively with one automaton.
#[derive(Debug, Clone)]
pub struct AddressPatterns {
    source: Vec<String>,
    kinds: Vec<Kind>,
    automaton: Option<AhoCorasick>,
}

impl PartialEq for AddressPatterns {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}

/// A pattern that is not one of the three forms.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not an address pattern (user@domain, @domain or *.domain)")]
pub struct PatternError(pub String);

impl AddressPatterns {
    /// Compiles `patterns`; each is `user@domain`, `@domain` or `*.domain`.
    pub fn new(patterns: &[String]) -> Result<AddressPatterns, PatternError> {
        let mut kinds = Vec::with_capacity(patterns.len());
        let mut needles = Vec::with_capacity(patterns.len());
        for p in patterns {
            let (kind, needle) = parse_pattern(p).ok_or_else(|| PatternError(p.clone()))?;
            kinds.push(kind);
            needles.push(needle);
        }
        let automaton = if needles.is_empty() {
            None
        } else {
            let built = AhoCorasickBuilder::new()
                .ascii_case_insensitive(true)
                .match_kind(MatchKind::Standard)
                .build(&needles)
                .map_err(|_| PatternError(patterns.join(", ")))?;
            Some(built)
        };
        Ok(AddressPatterns {
            source: patterns.to_vec(),
            kinds,
            automaton,
        })
    }

    /// The patterns as written.
    pub fn source(&self) -> &[String] {
        &self.source
    }

    /// Whether `address` (the path without `<>`) matches any pattern.
    pub fn matches(&self, address: &[u8]) -> bool {
        let Some(ac) = &self.automaton else {
            return false;
        };
        let at = memchr::memrchr(b'@', address);
        ac.find_overlapping_iter(address).any(|m| {
            let ends = m.end() == address.len();
            match self.kinds[m.pattern().as_usize()] {
                Kind::Exact => m.start() == 0 && ends,
                Kind::Domain => ends && Some(m.start()) == at,
                Kind::Subdomains => ends && at.is_some_and(|at| m.start() > at),
            }
        })
    }
}

fn parse_pattern(p: &str) -> Option<(Kind, String)> {
    let valid_domain = |d: &str| {
        !d.is_empty()
            && d.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
    };
    if let Some(domain) = p.strip_prefix("*.") {
        // The needle keeps the dot so that `*.example.com` cannot match `badexample.com`.
        return valid_domain(domain).then(|| (Kind::Subdomains, format!(".{domain}")));
    }
    if let Some(domain) = p.strip_prefix('@') {
        return valid_domain(domain).then(|| (Kind::Domain, p.to_string()));
    }
    let (local, domain) = p.rsplit_once('@')?;
    (!local.is_empty() && valid_domain(domain)).then(|| (Kind::Exact, p.to_string()))
}

/// The relay domain list: the domains this MX accepts mail for.
#[derive(Debug, Clone, PartialEq)]
pub struct Domains {
    /// Lower case; a leading `.` means "this domain's subdomains".
    entries: Vec<String>,
}

impl Domains {
    /// Builds the list; `*.example.com` or `.example.com` stand for the subdomains.
    pub fn new(domains: &[String]) -> Result<Domains, PatternError> {
        let entries = domains
            .iter()
            .map(|d| {
                let lower = d.to_ascii_lowercase();
                let (prefix, bare) = match lower.strip_prefix("*.").or(lower.strip_prefix('.')) {
                    Some(rest) => (".", rest.to_string()),
                    None => ("", lower.clone()),
                };
                let ok = !bare.is_empty()
                    && bare
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
                ok.then(|| format!("{prefix}{bare}"))
                    .ok_or_else(|| PatternError(d.clone()))
            })
            .collect::<Result<_, _>>()?;
        Ok(Domains { entries })
    }

    /// The entries: lower case, a leading `.` for "the subdomains of" (`Domains::new` takes
    /// them back unchanged).
    pub fn entries(&self) -> &[String] {
        &self.entries
    }

    /// Whether the domain of `address` is on the list. An address without a domain
    /// (`postmaster`) is always accepted, as RFC 5321 requires.
    pub fn accepts(&self, address: &[u8]) -> bool {
        let Some(at) = memchr::memrchr(b'@', address) else {
            return true;
        };
        let domain = &address[at + 1..];
        self.entries.iter().any(|e| match e.strip_prefix('.') {
            Some(parent) => {
                domain.len() > parent.len() + 1
                    && domain[domain.len() - parent.len()..].eq_ignore_ascii_case(parent.as_bytes())
                    && domain[domain.len() - parent.len() - 1] == b'.'
            }
            None => domain.eq_ignore_ascii_case(e.as_bytes()),
        })
    }
}

/// The address inside `MAIL FROM:<…>` / `RCPT TO:<…>`, without the brackets; empty for `<>`.
pub fn path_address(line: &[u8]) -> &[u8] {
    let Some(colon) = memchr::memchr(b':', line) else {
        return &[];
    };
    let arg = &line[colon + 1..];
    let arg = &arg[arg.iter().take_while(|&&b| b == b' ').count()..];
    let path = match arg.first() {
        Some(b'<') => {
            let end = memchr::memchr(b'>', arg).unwrap_or(arg.len());
            &arg[1..end]
        }
        _ => &arg[..memchr::memchr(b' ', arg).unwrap_or(arg.len())],
    };
    // A source route (`@a,@b:user@host`) is obsolete; the mailbox follows the colon.
    match memchr::memrchr(b':', path) {
        Some(i) => &path[i + 1..],
        None => path,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn patterns(list: &[&str]) -> AddressPatterns {
        AddressPatterns::new(&list.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn sender_patterns() {
        let p = patterns(&["boss@corp.example", "@spam.example", "*.bad.example"]);
        assert!(p.matches(b"BOSS@Corp.Example"));
        assert!(!p.matches(b"xboss@corp.example"));
        assert!(p.matches(b"anyone@spam.example"));
        assert!(!p.matches(b"anyone@notspam.example"));
        assert!(!p.matches(b"anyone@sub.spam.example"));
        assert!(p.matches(b"a@mx.bad.example"));
        assert!(!p.matches(b"a@bad.example"));
        assert!(!p.matches(b"a@verybad.example"));
        assert!(!p.matches(b""));
        assert!(AddressPatterns::new(&["nodomain".to_string()]).is_err());
        assert!(AddressPatterns::new(&["*.".to_string()]).is_err());
    }

    #[test]
    fn relay_domains() {
        let d = Domains::new(&["example.com".into(), "*.example.org".into()]).unwrap();
        assert!(d.accepts(b"a@EXAMPLE.com"));
        assert!(!d.accepts(b"a@sub.example.com"));
        assert!(d.accepts(b"a@mx.example.org"));
        assert!(!d.accepts(b"a@example.org"));
        assert!(!d.accepts(b"a@badexample.org"));
        assert!(d.accepts(b"postmaster"));
        assert!(!d.accepts(b"a@elsewhere.test"));
    }

    #[test]
    fn paths() {
        assert_eq!(path_address(b"MAIL FROM:<a@b> SIZE=1"), b"a@b");
        assert_eq!(path_address(b"MAIL FROM:<>"), b"");
        assert_eq!(path_address(b"RCPT TO: <c@d>"), b"c@d");
        assert_eq!(path_address(b"RCPT TO:c@d NOTIFY=NEVER"), b"c@d");
        assert_eq!(path_address(b"RCPT TO:<@relay.test:c@d>"), b"c@d");
    }
}
