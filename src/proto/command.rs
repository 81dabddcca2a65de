//! Reading the arguments of the commands the guard inspects: MAIL/RCPT addresses and
//! parameters, BDAT chunk sizes. Pure functions over one command line (without its ending).

/// Why an address was refused by `check_addresses`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressFault {
    /// `|`, a backquote or NUL inside the address.
    SpecialCharacter,
    /// `<` and `>` do not pair up as the path delimiters.
    Unbalanced,
}

/// The argument of `MAIL FROM:` / `RCPT TO:`: the path and what follows it.
fn split_path(line: &[u8]) -> Option<(&[u8], &[u8])> {
    let colon = memchr::memchr(b':', line)?;
    let arg = trim_start(&line[colon + 1..]);
    let path_end = if arg.first() == Some(&b'<') {
        memchr::memchr(b'>', arg).map_or(arg.len(), |i| i + 1)
    } else {
        memchr::memchr(b' ', arg).unwrap_or(arg.len())
    };
    Some(arg.split_at(path_end))
}

fn trim_start(s: &[u8]) -> &[u8] {
    let n = s.iter().take_while(|&&b| b == b' ').count();
    &s[n..]
}

/// Checks the path of a MAIL or RCPT line for the ASA "special character" rule.
pub fn check_address(line: &[u8]) -> Result<(), AddressFault> {
    let Some((path, rest)) = split_path(line) else {
        return Err(AddressFault::Unbalanced);
    };
    if path.iter().any(|&b| matches!(b, b'|' | b'`' | 0)) {
        return Err(AddressFault::SpecialCharacter);
    }
    let opens = path.iter().filter(|&&b| b == b'<').count();
    let closes = path.iter().filter(|&&b| b == b'>').count();
    let delimited = path.first() == Some(&b'<') && path.last() == Some(&b'>');
    let balanced = (opens == 0 && closes == 0) || (opens == 1 && closes == 1 && delimited);
    if !balanced || rest.iter().any(|&b| b == b'<' || b == b'>') {
        return Err(AddressFault::Unbalanced);
    }
    Ok(())
}

/// The `SIZE=` parameter of a MAIL line, if present and numeric.
pub fn size_param(line: &[u8]) -> Option<u64> {
    let (_, rest) = split_path(line)?;
    rest.split(|&b| b == b' ')
        .filter_map(|p| {
            let (name, value) = p.split_at(p.iter().position(|&b| b == b'=')?);
            name.eq_ignore_ascii_case(b"SIZE")
                .then(|| parse_u64(&value[1..]))?
        })
        .next()
}

/// A BDAT command's arguments: `BDAT <size> [LAST]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bdat {
    pub size: u64,
    pub last: bool,
}

/// Parses `BDAT <size> [LAST]`; `None` when the arguments are malformed, in which case no
/// chunk follows (a server must then read what comes next as commands, as we do).
pub fn bdat_args(line: &[u8]) -> Option<Bdat> {
    let mut words = line.split(|&b| b == b' ').filter(|w| !w.is_empty()).skip(1);
    let size = parse_u64(words.next()?)?;
    let last = match words.next() {
        None => false,
        Some(w) if w.eq_ignore_ascii_case(b"LAST") => true,
        Some(_) => return None,
    };
    words.next().is_none().then_some(Bdat { size, last })
}

fn parse_u64(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(
        digits
            .iter()
            .fold(0u64, |n, d| n * 10 + u64::from(d - b'0')),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert_eq!(check_address(b"MAIL FROM:<a@b.c> SIZE=10"), Ok(()));
        assert_eq!(check_address(b"MAIL FROM:<>"), Ok(()));
        assert_eq!(check_address(b"RCPT TO: <a@b.c>"), Ok(()));
        assert_eq!(check_address(b"RCPT TO:a@b.c"), Ok(()));
        assert_eq!(
            check_address(b"RCPT TO:<a|b@c>"),
            Err(AddressFault::SpecialCharacter)
        );
        assert_eq!(
            check_address(b"RCPT TO:<a`b@c>"),
            Err(AddressFault::SpecialCharacter)
        );
        assert_eq!(
            check_address(b"RCPT TO:<a\0b@c>"),
            Err(AddressFault::SpecialCharacter)
        );
        assert_eq!(
            check_address(b"RCPT TO:<<a@c>"),
            Err(AddressFault::Unbalanced)
        );
        assert_eq!(
            check_address(b"RCPT TO:<a@c>>"),
            Err(AddressFault::Unbalanced)
        );
        assert_eq!(
            check_address(b"RCPT TO:<a@c"),
            Err(AddressFault::Unbalanced)
        );
        assert_eq!(
            check_address(b"RCPT TO:a@c>"),
            Err(AddressFault::Unbalanced)
        );
        assert_eq!(check_address(b"RCPT TO"), Err(AddressFault::Unbalanced));
    }

    #[test]
    fn size() {
        assert_eq!(
            size_param(b"MAIL FROM:<a@b> SIZE=1000 BODY=8BITMIME"),
            Some(1000)
        );
        assert_eq!(size_param(b"MAIL FROM:<a@b> body=8bitmime size=7"), Some(7));
        assert_eq!(size_param(b"MAIL FROM:<a@b>"), None);
        assert_eq!(size_param(b"MAIL FROM:<a@b> SIZE=x"), None);
    }

    #[test]
    fn bdat() {
        assert_eq!(
            bdat_args(b"BDAT 100"),
            Some(Bdat {
                size: 100,
                last: false
            })
        );
        assert_eq!(
            bdat_args(b"bdat 0 last"),
            Some(Bdat {
                size: 0,
                last: true
            })
        );
        assert_eq!(bdat_args(b"BDAT"), None);
        assert_eq!(bdat_args(b"BDAT -1"), None);
        assert_eq!(bdat_args(b"BDAT 10 LAST x"), None);
        assert_eq!(bdat_args(b"BDAT 99999999999999999999"), None);
    }
}
