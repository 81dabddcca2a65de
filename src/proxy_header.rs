//! The PROXY protocol header (haproxy's spec, versions 1 and 2): parsing the one a load
//! balancer puts in front of a client's bytes, and writing the one mailguard puts in front of
//! its own upstream connection.
//!
//! Owns only the wire format. It must not touch sockets, clocks or SMTP: the guard decides
//! what an address is used for, the engine decides when a header is written.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The 12 bytes every version 2 header starts with.
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// A version 1 header is at most this long, CRLF included.
const V1_MAX: usize = 107;
/// The most bytes a version 2 header (with its TLVs) may take here; the spec asks receivers
/// to accept at least this much, and nothing larger is needed for addresses.
pub const V2_MAX: usize = 536;

/// What a header says about the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The real client and the address it connected to; `None` for a v2 LOCAL command (a
    /// balancer's health check), v1 `UNKNOWN` or an address family other than TCP over IP:
    /// the socket's own addresses stand then.
    pub addresses: Option<(SocketAddr, SocketAddr)>,
}

/// Why bytes are not a PROXY header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("not a PROXY protocol header")]
    Signature,
    #[error("PROXY header longer than {V2_MAX} bytes")]
    TooLong,
    #[error("malformed PROXY v1 header")]
    V1,
    #[error("malformed PROXY v2 header")]
    V2,
}

/// Parses the header at the start of `buf`: `Ok(None)` while more bytes are needed, else the
/// header and how many bytes it took (what follows belongs to the client's dialogue).
pub fn parse(buf: &[u8]) -> Result<Option<(Header, usize)>, HeaderError> {
    if starts_like(buf, V2_SIGNATURE) {
        return if buf.len() < V2_SIGNATURE.len() {
            Ok(None)
        } else {
            parse_v2(buf)
        };
    }
    if starts_like(buf, b"PROXY ") {
        return if buf.len() < 6 {
            Ok(None)
        } else {
            parse_v1(buf)
        };
    }
    Err(HeaderError::Signature)
}

/// `buf` and `sig` agree on their common length.
fn starts_like(buf: &[u8], sig: &[u8]) -> bool {
    let n = buf.len().min(sig.len());
    buf[..n] == sig[..n]
}

fn parse_v1(buf: &[u8]) -> Result<Option<(Header, usize)>, HeaderError> {
    let Some(end) = memchr::memchr(b'\n', &buf[..buf.len().min(V1_MAX)]) else {
        return if buf.len() >= V1_MAX {
            Err(HeaderError::V1)
        } else {
            Ok(None)
        };
    };
    let line = buf[..end].strip_suffix(b"\r").ok_or(HeaderError::V1)?;
    let line = std::str::from_utf8(line).map_err(|_| HeaderError::V1)?;
    let fields: Vec<&str> = line.split(' ').collect();
    let addresses = match fields.as_slice() {
        ["PROXY", "UNKNOWN", ..] => None,
        ["PROXY", family @ ("TCP4" | "TCP6"), src, dst, sport, dport] => {
            let ip = |s: &str| -> Result<IpAddr, HeaderError> {
                let ip: IpAddr = s.parse().map_err(|_| HeaderError::V1)?;
                match (ip, *family) {
                    (IpAddr::V4(_), "TCP4") | (IpAddr::V6(_), "TCP6") => Ok(ip),
                    _ => Err(HeaderError::V1),
                }
            };
            let port = |s: &str| port_v1(s).ok_or(HeaderError::V1);
            Some((
                SocketAddr::new(ip(src)?, port(sport)?),
                SocketAddr::new(ip(dst)?, port(dport)?),
            ))
        }
        _ => return Err(HeaderError::V1),
    };
    Ok(Some((Header { addresses }, end + 1)))
}

/// A v1 port: decimal without a sign or leading zero.
fn port_v1(s: &str) -> Option<u16> {
    let ok =
        !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) && (s == "0" || !s.starts_with('0'));
    ok.then(|| s.parse().ok()).flatten()
}

fn parse_v2(buf: &[u8]) -> Result<Option<(Header, usize)>, HeaderError> {
    if buf.len() < 16 {
        return Ok(None);
    }
    let (version, command) = (buf[12] >> 4, buf[12] & 0x0f);
    if version != 2 || command > 1 {
        return Err(HeaderError::V2);
    }
    let len = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    let total = 16 + len;
    if total > V2_MAX {
        return Err(HeaderError::TooLong);
    }
    if buf.len() < total {
        return Ok(None);
    }
    let body = &buf[16..total];
    if command == 0 {
        // LOCAL: the spec says to ignore whatever address block follows.
        return Ok(Some((Header { addresses: None }, total)));
    }
    let addresses = match buf[13] {
        // TCP over IPv4, TCP over IPv6; TLVs may follow the addresses.
        0x11 if body.len() >= 12 => Some((
            v4(&body[0..4], &body[8..10]),
            v4(&body[4..8], &body[10..12]),
        )),
        0x21 if body.len() >= 36 => Some((
            v6(&body[0..16], &body[32..34]),
            v6(&body[16..32], &body[34..36]),
        )),
        0x11 | 0x21 => return Err(HeaderError::V2),
        _ => None,
    };
    Ok(Some((Header { addresses }, total)))
}

fn v4(ip: &[u8], port: &[u8]) -> SocketAddr {
    let ip = Ipv4Addr::new(ip[0], ip[1], ip[2], ip[3]);
    SocketAddr::new(IpAddr::V4(ip), u16::from_be_bytes([port[0], port[1]]))
}

fn v6(ip: &[u8], port: &[u8]) -> SocketAddr {
    let mut octets = [0u8; 16];
    octets.copy_from_slice(ip);
    let ip = Ipv6Addr::from(octets);
    SocketAddr::new(IpAddr::V6(ip), u16::from_be_bytes([port[0], port[1]]))
}

/// Both addresses in one family: an IPv4 address beside an IPv6 one becomes IPv4-mapped,
/// since a header carries a single family.
fn same_family(client: SocketAddr, local: SocketAddr) -> (SocketAddr, SocketAddr) {
    let mapped = |a: SocketAddr| match a.ip() {
        IpAddr::V4(v4) => SocketAddr::new(IpAddr::V6(v4.to_ipv6_mapped()), a.port()),
        IpAddr::V6(_) => a,
    };
    if client.is_ipv4() == local.is_ipv4() {
        (client, local)
    } else {
        (mapped(client), mapped(local))
    }
}

/// The version 1 header for a client connected from `client` to `local`.
pub fn v1(client: SocketAddr, local: SocketAddr) -> Vec<u8> {
    let (c, l) = same_family(client, local);
    let family = if c.is_ipv4() { "TCP4" } else { "TCP6" };
    format!(
        "PROXY {family} {} {} {} {}\r\n",
        c.ip(),
        l.ip(),
        c.port(),
        l.port()
    )
    .into_bytes()
}

/// The version 2 header (PROXY command, TCP) for a client connected from `client` to `local`.
pub fn v2(client: SocketAddr, local: SocketAddr) -> Vec<u8> {
    let (c, l) = same_family(client, local);
    let mut h = Vec::with_capacity(52);
    h.extend_from_slice(V2_SIGNATURE);
    h.push(0x21);
    match (c.ip(), l.ip()) {
        (IpAddr::V4(ci), IpAddr::V4(li)) => {
            h.push(0x11);
            h.extend_from_slice(&12u16.to_be_bytes());
            h.extend_from_slice(&ci.octets());
            h.extend_from_slice(&li.octets());
        }
        (ci, li) => {
            let six = |ip: IpAddr| match ip {
                IpAddr::V6(v6) => v6.octets(),
                IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
            };
            h.push(0x21);
            h.extend_from_slice(&36u16.to_be_bytes());
            h.extend_from_slice(&six(ci));
            h.extend_from_slice(&six(li));
        }
    }
    h.extend_from_slice(&c.port().to_be_bytes());
    h.extend_from_slice(&l.port().to_be_bytes());
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn v1_round_trip_and_rest() {
        let c = addr("192.0.2.7:40000");
        let l = addr("198.51.100.1:25");
        let mut bytes = v1(c, l);
        assert_eq!(bytes, b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 25\r\n");
        let n = bytes.len();
        bytes.extend_from_slice(b"EHLO x\r\n");
        let (h, used) = parse(&bytes).unwrap().unwrap();
        assert_eq!(used, n);
        assert_eq!(h.addresses, Some((c, l)));
    }

    #[test]
    fn v2_round_trip_v4_and_v6() {
        for (c, l) in [
            (addr("192.0.2.7:40000"), addr("198.51.100.1:25")),
            (addr("[2001:db8::7]:40000"), addr("[2001:db8::1]:25")),
        ] {
            let bytes = v2(c, l);
            let (h, used) = parse(&bytes).unwrap().unwrap();
            assert_eq!(used, bytes.len());
            assert_eq!(h.addresses, Some((c, l)));
        }
    }

    #[test]
    fn mixed_families_become_mapped_v6() {
        let bytes = v1(addr("192.0.2.7:1"), addr("[2001:db8::1]:25"));
        assert_eq!(
            bytes,
            b"PROXY TCP6 ::ffff:192.0.2.7 2001:db8::1 1 25\r\n".as_slice()
        );
    }

    #[test]
    fn partial_headers_ask_for_more() {
        let full = v2(addr("192.0.2.7:1"), addr("192.0.2.8:25"));
        for n in 0..full.len() {
            assert_eq!(parse(&full[..n]), Ok(None), "v2 prefix of {n}");
        }
        let full = v1(addr("192.0.2.7:1"), addr("192.0.2.8:25"));
        for n in 0..full.len() {
            assert_eq!(parse(&full[..n]), Ok(None), "v1 prefix of {n}");
        }
    }

    #[test]
    fn local_and_unknown_keep_the_socket_address() {
        let mut local = v2(addr("192.0.2.7:1"), addr("192.0.2.8:25"));
        local[12] = 0x20;
        assert_eq!(parse(&local).unwrap().unwrap().0.addresses, None);
        let unspec = b"\r\n\r\n\0\r\nQUIT\n\x20\x00\x00\x00";
        assert_eq!(parse(unspec), Ok(Some((Header { addresses: None }, 16))));
        let unknown = b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n";
        assert_eq!(parse(unknown).unwrap().unwrap().0.addresses, None);
    }

    #[test]
    fn local_ignores_its_address_block() {
        let local_tcp4_empty = b"\r\n\r\n\0\r\nQUIT\n\x20\x11\x00\x00";
        assert_eq!(
            parse(local_tcp4_empty),
            Ok(Some((Header { addresses: None }, 16)))
        );
    }

    proptest::proptest! {
        #[test]
        fn any_bytes_parse_without_panic_within_bounds(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..700),
            v2 in proptest::prelude::any::<bool>(),
        ) {
            let mut input = if v2 { V2_SIGNATURE.to_vec() } else { b"PROXY ".to_vec() };
            input.extend_from_slice(&bytes);
            if let Ok(Some((_, used))) = parse(&input) {
                proptest::prop_assert!(used <= input.len() && used <= V2_MAX);
            }
        }
    }

    #[test]
    fn garbage_is_refused() {
        assert_eq!(parse(b"EHLO x\r\n"), Err(HeaderError::Signature));
        assert_eq!(parse(b"GET / HTTP/1.0"), Err(HeaderError::Signature));
        assert_eq!(
            parse(b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n"),
            Err(HeaderError::V1)
        );
        assert_eq!(
            parse(b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n"),
            Err(HeaderError::V1)
        );
        assert_eq!(
            parse(b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n"),
            Err(HeaderError::V1)
        );
        assert_eq!(parse(&[b'P'; 1]), Ok(None));
        let long = [b"PROXY ".as_slice(), &[b'A'; 200]].concat();
        assert_eq!(parse(&long), Err(HeaderError::V1));
        let mut big = v2(addr("192.0.2.7:1"), addr("192.0.2.8:25"));
        big[14..16].copy_from_slice(&600u16.to_be_bytes());
        assert_eq!(parse(&big), Err(HeaderError::TooLong));
        let mut short = v2(addr("192.0.2.7:1"), addr("192.0.2.8:25"));
        short[15] = 4;
        assert_eq!(parse(&short[..20]), Err(HeaderError::V2));
        let mut v3 = v2(addr("192.0.2.7:1"), addr("192.0.2.8:25"));
        v3[12] = 0x31;
        assert_eq!(parse(&v3), Err(HeaderError::V2));
    }
}
