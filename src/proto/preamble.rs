//! The hidden part of every upstream connection: what mailguard itself says to the upstream
//! before the client's commands flow there (or are replayed there after a reconnect).
//!
//! The preamble is an ordered list of [`Step`]s planned once per upstream connection: an
//! optional PROXY header written on connect, then command steps, each one line sent after the
//! upstream's greeting (or the previous step's reply) and one reply consumed. The client sees
//! none of it. With `upstream_tls = "starttls"` the steps begin with EHLO, STARTTLS (the
//! session then has the guard layer make the connection TLS) and EHLO again
//! ([`Preamble::with_starttls`]). To add a step, add a [`Step`] variant, put it in
//! [`Preamble::plan`] at its place in the order, and give it a line in [`Preamble::line`] and
//! a reply handling in [`Preamble::on_reply`].
//!
//! Owns the steps, their lines and what their replies mean. It must not touch sockets, clocks,
//! client bytes or the client's replies: the session drives it and keeps the banner.

use std::net::{IpAddr, SocketAddr};

use crate::config::UpstreamIdentity;
use crate::proxy_header;

use super::reply;

/// The name mailguard gives in its own EHLO to the upstream.
const EHLO: &[u8] = b"EHLO mailguard\r\n";

/// Who the client really is: the address it connected from and the one it connected to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    pub client: SocketAddr,
    pub local: SocketAddr,
}

/// The client's HELO or EHLO, when the session has seen one (on a reconnect).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Greeted {
    /// The name the client gave.
    pub name: Vec<u8>,
    /// It said EHLO (ESMTP) rather than HELO (SMTP).
    pub extended: bool,
}

/// One command step of the hidden exchange, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// mailguard's own EHLO, to learn what the upstream offers.
    Ehlo,
    /// Postfix's XCLIENT with the real client's attributes, if the EHLO reply offers it.
    Xclient,
    /// STARTTLS (`upstream_tls = "starttls"`): on its 220 the connection becomes TLS.
    StartTls,
}

/// What the session does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Send this line upstream and hand its reply to [`Preamble::on_reply`].
    Send(Vec<u8>),
    /// The preamble is over: the client's dialogue may use the connection.
    Done,
    /// The upstream answered STARTTLS with 220: the connection must become TLS before
    /// [`Preamble::resume`] gives the next step.
    StartTls,
    /// The upstream refused STARTTLS, which the policy requires: nothing may be relayed on
    /// this connection.
    Refused,
}

/// Why the upstream did not learn the client's identity (mail still flows).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shortfall {
    /// The EHLO reply did not offer XCLIENT (or EHLO was refused).
    XclientNotOffered,
    /// XCLIENT was answered with this code.
    XclientRefused(u16),
}

/// The hidden exchange of one upstream connection.
#[derive(Debug)]
pub struct Preamble {
    header: Option<Vec<u8>>,
    steps: Vec<Step>,
    /// The step whose reply is awaited (an index into `steps`; `steps.len()` when done).
    at: usize,
    xclient: Option<Vec<u8>>,
    xclient_offered: bool,
    shortfall: Option<Shortfall>,
}

impl Preamble {
    /// Plans the preamble for one upstream connection. Without an identity (a session built
    /// without addresses) the identity steps are left out.
    pub fn plan(
        mode: UpstreamIdentity,
        identity: Option<Identity>,
        greeted: Option<&Greeted>,
    ) -> Preamble {
        let mut p = Preamble {
            header: None,
            steps: Vec::new(),
            at: 0,
            xclient: None,
            xclient_offered: false,
            shortfall: None,
        };
        let Some(id) = identity else { return p };
        match mode {
            UpstreamIdentity::None => {}
            UpstreamIdentity::ProxyV1 => p.header = Some(proxy_header::v1(id.client, id.local)),
            UpstreamIdentity::ProxyV2 => p.header = Some(proxy_header::v2(id.client, id.local)),
            UpstreamIdentity::Xclient => {
                p.steps = vec![Step::Ehlo, Step::Xclient];
                p.xclient = Some(xclient_line(id.client, greeted));
            }
        }
        p
    }

    /// Adds the upstream STARTTLS: mailguard's EHLO, STARTTLS and, once TLS is up, EHLO again,
    /// all before the identity steps (XCLIENT must travel inside TLS).
    pub fn with_starttls(mut self) -> Preamble {
        let mut steps = vec![Step::Ehlo, Step::StartTls, Step::Ehlo];
        steps.extend(self.steps.iter().copied().filter(|s| *s != Step::Ehlo));
        self.steps = steps;
        self
    }

    /// Goes on after the TLS handshake that [`Next::StartTls`] asked for.
    pub fn resume(&mut self) -> Next {
        self.advance()
    }

    /// The bytes to write first on the new connection, before anything is read from it.
    pub fn header(&self) -> Option<&[u8]> {
        self.header.as_deref()
    }

    /// Whether any command step runs after the greeting.
    pub fn has_steps(&self) -> bool {
        !self.steps.is_empty()
    }

    /// Starts the command steps once the upstream greeted with a 2xx.
    pub fn begin(&mut self) -> Next {
        self.at = 0;
        self.advance()
    }

    /// The reply to the step in progress; returns what comes next.
    pub fn on_reply(&mut self, code: u16, bytes: &[u8]) -> Next {
        let Some(&step) = self.steps.get(self.at) else {
            return Next::Done;
        };
        match step {
            Step::Ehlo => {
                self.xclient_offered = code == 250 && offers(bytes, b"XCLIENT");
            }
            Step::StartTls => {
                self.at += 1;
                return if code == 220 {
                    Next::StartTls
                } else {
                    Next::Refused
                };
            }
            Step::Xclient => {
                // Postfix answers a successful XCLIENT with a fresh 220 greeting.
                if code / 100 != 2 {
                    self.shortfall = Some(Shortfall::XclientRefused(code));
                }
            }
        }
        self.at += 1;
        self.advance()
    }

    /// Why the upstream did not learn who the client is, if it did not.
    pub fn shortfall(&self) -> Option<Shortfall> {
        self.shortfall
    }

    /// Sends the line of the next step that applies, skipping those that do not.
    fn advance(&mut self) -> Next {
        while let Some(&step) = self.steps.get(self.at) {
            if let Some(line) = self.line(step) {
                return Next::Send(line);
            }
            self.at += 1;
        }
        Next::Done
    }

    /// The line of `step`, or `None` when it does not apply to this upstream.
    fn line(&mut self, step: Step) -> Option<Vec<u8>> {
        match step {
            Step::Ehlo => Some(EHLO.to_vec()),
            Step::StartTls => Some(b"STARTTLS\r\n".to_vec()),
            Step::Xclient if self.xclient_offered => self.xclient.clone(),
            Step::Xclient => {
                self.shortfall = Some(Shortfall::XclientNotOffered);
                None
            }
        }
    }
}

/// Whether an EHLO reply announces `keyword`.
fn offers(ehlo_reply: &[u8], keyword: &[u8]) -> bool {
    reply::lines(ehlo_reply)
        .skip(1)
        .any(|l| reply::keyword(l.get(4..).unwrap_or(&[])).eq_ignore_ascii_case(keyword))
}

/// `XCLIENT ADDR=… NAME=[UNAVAILABLE]`, plus `HELO=… PROTO=…` when the client's greeting is
/// known (on a reconnect; on the first connection the client's own EHLO follows and sets them).
fn xclient_line(client: SocketAddr, greeted: Option<&Greeted>) -> Vec<u8> {
    let mut line = b"XCLIENT ADDR=".to_vec();
    match canonical(client.ip()) {
        IpAddr::V4(v4) => line.extend_from_slice(v4.to_string().as_bytes()),
        IpAddr::V6(v6) => line.extend_from_slice(format!("IPV6:{v6}").as_bytes()),
    }
    // No DNS lookups here: Postfix then treats the name as unknown, as it would itself.
    line.extend_from_slice(b" NAME=[UNAVAILABLE]");
    if let Some(g) = greeted {
        line.extend_from_slice(b" HELO=");
        xtext(&g.name, &mut line);
        let proto: &[u8] = if g.extended { b"ESMTP" } else { b"SMTP" };
        line.extend_from_slice(b" PROTO=");
        line.extend_from_slice(proto);
    }
    line.extend_from_slice(b"\r\n");
    line
}

/// IPv4-mapped IPv6 (a dual-stack listener) is the IPv4 client it stands for.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// RFC 3461 xtext: the client's HELO name is untrusted input and must not break the line.
fn xtext(value: &[u8], out: &mut Vec<u8>) {
    for &b in value {
        if (b'!'..=b'~').contains(&b) && b != b'+' && b != b'=' {
            out.push(b);
        } else {
            out.extend_from_slice(format!("+{b:02X}").as_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(client: &str) -> Option<Identity> {
        Some(Identity {
            client: client.parse().unwrap(),
            local: "192.0.2.1:25".parse().unwrap(),
        })
    }

    const OFFERS: &[u8] = b"250-pf\r\n250-PIPELINING\r\n250 XCLIENT ADDR NAME HELO PROTO\r\n";

    #[test]
    fn xclient_after_ehlo_when_offered() {
        let mut p = Preamble::plan(UpstreamIdentity::Xclient, id("192.0.2.7:1"), None);
        assert!(p.header().is_none());
        assert_eq!(p.begin(), Next::Send(EHLO.to_vec()));
        assert_eq!(
            p.on_reply(250, OFFERS),
            Next::Send(b"XCLIENT ADDR=192.0.2.7 NAME=[UNAVAILABLE]\r\n".to_vec())
        );
        assert_eq!(p.on_reply(220, b"220 pf ESMTP\r\n"), Next::Done);
        assert_eq!(p.shortfall(), None);
    }

    #[test]
    fn not_offered_or_refused_is_a_shortfall_not_a_failure() {
        let mut p = Preamble::plan(UpstreamIdentity::Xclient, id("192.0.2.7:1"), None);
        p.begin();
        assert_eq!(p.on_reply(250, b"250-x\r\n250 SIZE\r\n"), Next::Done);
        assert_eq!(p.shortfall(), Some(Shortfall::XclientNotOffered));
        let mut p = Preamble::plan(UpstreamIdentity::Xclient, id("192.0.2.7:1"), None);
        p.begin();
        p.on_reply(250, OFFERS);
        assert_eq!(p.on_reply(550, b"550 no\r\n"), Next::Done);
        assert_eq!(p.shortfall(), Some(Shortfall::XclientRefused(550)));
    }

    #[test]
    fn replay_carries_helo_and_proto_xtext_encoded_and_v6() {
        let g = Greeted {
            name: b"a+b=c d".to_vec(),
            extended: false,
        };
        let mut p = Preamble::plan(UpstreamIdentity::Xclient, id("[2001:db8::7]:1"), Some(&g));
        p.begin();
        assert_eq!(
            p.on_reply(250, OFFERS),
            Next::Send(
                b"XCLIENT ADDR=IPV6:2001:db8::7 NAME=[UNAVAILABLE] HELO=a+2Bb+3Dc+20d PROTO=SMTP\r\n"
                    .to_vec()
            )
        );
        let mapped = Preamble::plan(UpstreamIdentity::Xclient, id("[::ffff:192.0.2.9]:1"), None);
        assert_eq!(
            mapped.xclient.as_deref(),
            Some(b"XCLIENT ADDR=192.0.2.9 NAME=[UNAVAILABLE]\r\n".as_slice())
        );
    }

    #[test]
    fn starttls_comes_first_and_xclient_travels_inside_tls() {
        let mut p =
            Preamble::plan(UpstreamIdentity::Xclient, id("192.0.2.7:1"), None).with_starttls();
        assert_eq!(p.begin(), Next::Send(EHLO.to_vec()));
        assert_eq!(
            p.on_reply(250, b"250-pf\r\n250 STARTTLS\r\n"),
            Next::Send(b"STARTTLS\r\n".to_vec())
        );
        assert_eq!(p.on_reply(220, b"220 go ahead\r\n"), Next::StartTls);
        assert_eq!(p.resume(), Next::Send(EHLO.to_vec()));
        assert_eq!(
            p.on_reply(250, OFFERS),
            Next::Send(b"XCLIENT ADDR=192.0.2.7 NAME=[UNAVAILABLE]\r\n".to_vec())
        );
        let mut plain = Preamble::plan(UpstreamIdentity::None, None, None).with_starttls();
        plain.begin();
        plain.on_reply(250, b"250 pf\r\n");
        assert_eq!(plain.on_reply(454, b"454 4.7.0 no TLS\r\n"), Next::Refused);
    }

    #[test]
    fn proxy_modes_write_a_header_and_have_no_steps() {
        let p = Preamble::plan(UpstreamIdentity::ProxyV1, id("192.0.2.7:4000"), None);
        assert_eq!(
            p.header(),
            Some(b"PROXY TCP4 192.0.2.7 192.0.2.1 4000 25\r\n".as_slice())
        );
        assert!(!p.has_steps());
        let mut none = Preamble::plan(UpstreamIdentity::None, id("192.0.2.7:1"), None);
        assert!(none.header().is_none() && !none.has_steps());
        assert_eq!(none.begin(), Next::Done);
    }
}
