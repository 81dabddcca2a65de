use std::path::Path;
use std::time::Duration;

use serde::de::{self, Deserializer};
use serde::Deserialize;
use toml::Spanned;

use std::sync::Arc;

use crate::proto::content::{CompiledRules, ContentRules, Rule};
use crate::proto::rules::{AddressPatterns, Domains};
use crate::proto::Verb;

use super::tls::{Missing, TlsKeys, TlsPolicy, UpstreamTls};

/// Which verbs pass when no explicit `allow` list is given.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Classic PIX Mailguard: the seven RFC 821 verbs.
    Rfc821,
    /// ASA `inspect esmtp`: the RFC 821 verbs plus eight ESMTP verbs.
    Esmtp,
    /// What mail needs today (the default).
    Modern,
}

impl Mode {
    /// The verbs this mode lets through.
    pub fn verbs(self) -> &'static [Verb] {
        const RFC821: &[Verb] = &[
            Verb::HELO,
            Verb::MAIL,
            Verb::RCPT,
            Verb::DATA,
            Verb::RSET,
            Verb::NOOP,
            Verb::QUIT,
        ];
        const ESMTP: &[Verb] = &[
            Verb::HELO,
            Verb::MAIL,
            Verb::RCPT,
            Verb::DATA,
            Verb::RSET,
            Verb::NOOP,
            Verb::QUIT,
            Verb::AUTH,
            Verb::EHLO,
            Verb::ETRN,
            Verb::HELP,
            Verb::SAML,
            Verb::SEND,
            Verb::SOML,
            Verb::VRFY,
        ];
        const MODERN: &[Verb] = &[
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
        ];
        match self {
            Mode::Rfc821 => RFC821,
            Mode::Esmtp => ESMTP,
            Mode::Modern => MODERN,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Mode::Rfc821 => "rfc821",
            Mode::Esmtp => "esmtp",
            Mode::Modern => "modern",
        }
    }
}

/// How a blocked verb is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BlockedReply {
    /// `500 5.5.1 Command unrecognized`.
    Reject,
    /// `250 OK`, the deceptive legacy behaviour.
    Ok,
}

/// What happens to a bare LF or bare CR inside DATA.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BareLf {
    /// The message is refused with `550 5.6.11` and not delivered.
    Reject,
    /// The bare line ending becomes CRLF; a dot line after it stays data.
    Normalize,
}

/// What happens to STARTTLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StartTls {
    /// After the upstream's 220 the session becomes an opaque relay.
    Pass,
    /// STARTTLS is removed from the EHLO reply and blocked.
    Strip,
    /// mailguard offers STARTTLS itself (`tls_cert`, `tls_key`), terminates the client's TLS
    /// and goes on inspecting the plaintext.
    Terminate,
}

/// How the upstream learns who the real client is (`upstream_identity`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum UpstreamIdentity {
    /// It does not: the upstream sees mailguard's address.
    #[serde(rename = "none")]
    None,
    /// A PROXY protocol v1 header opens every upstream connection.
    #[serde(rename = "proxy-v1")]
    ProxyV1,
    /// A PROXY protocol v2 header opens every upstream connection.
    #[serde(rename = "proxy-v2")]
    ProxyV2,
    /// Postfix's XCLIENT command, hidden from the client, when the upstream offers it.
    #[serde(rename = "xclient")]
    Xclient,
}

impl UpstreamIdentity {
    /// The value as a policy file writes it.
    pub fn name(self) -> &'static str {
        match self {
            UpstreamIdentity::None => "none",
            UpstreamIdentity::ProxyV1 => "proxy-v1",
            UpstreamIdentity::ProxyV2 => "proxy-v2",
            UpstreamIdentity::Xclient => "xclient",
        }
    }
}

/// What a content or envelope rule does when it matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RuleAction {
    /// Refuse the command or message with the rule's reply; the session goes on.
    Reject,
    /// `421 4.7.0` and close the connection (ASA's drop-connection).
    Drop,
    /// Count and log only.
    Log,
}

/// A rule's value and its action.
#[derive(Debug, Clone, PartialEq)]
pub struct Ruled<T> {
    pub value: T,
    pub action: RuleAction,
}

/// `rate_per_ip`: per client address (IPv6: per /64), per minute; 0 is no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RatePerIp {
    #[serde(default)]
    pub connections: u32,
    #[serde(default)]
    pub messages: u32,
}

/// The compiled content rules (`None` when every header, MIME and body rule is off). Equal
/// whenever the rule keys are, so it takes no part in comparing policies.
#[derive(Debug, Clone)]
pub struct ContentCheck(pub Option<Arc<CompiledRules>>);

impl PartialEq for ContentCheck {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

/// A policy file could not be used. `Display` is one line, ready for stderr.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The file could not be read.
    #[error("{path}: cannot read policy: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// A certificate, key or CA file the policy names cannot be used.
    #[error("{path}: {source}")]
    Tls {
        path: String,
        #[source]
        source: crate::tls::TlsError,
    },
    /// The file is not a valid policy.
    #[error("{path}:{line}:{column}: {message}")]
    Invalid {
        path: String,
        line: usize,
        column: usize,
        message: String,
    },
}

/// An immutable, validated policy plus the tables derived from it.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub mode: Mode,
    /// The `allow` key as written, if present.
    pub allow: Option<Vec<Verb>>,
    pub blocked_reply: BlockedReply,
    pub mask_banner: bool,
    /// The `extensions` key as written (upper case), if present.
    pub extensions: Option<Vec<String>>,
    pub max_recipients: u32,
    /// Bytes; 0 means no limit of the guard's own.
    pub max_message_size: u64,
    pub max_line_length: usize,
    pub bare_lf: BareLf,
    pub starttls: StartTls,
    pub check_addresses: bool,
    pub hard_error_limit: u32,
    pub greeting_timeout: Duration,
    pub command_timeout: Duration,
    pub data_timeout: Duration,
    pub final_timeout: Duration,
    /// Bytes/s a DATA or BDAT phase must average once `data_timeout` is used up; 0 is off.
    pub min_data_rate: u64,
    /// Sessions open at once, over all clients; 0 is no limit.
    pub max_connections: u32,
    /// Sessions open at once from one address (IPv6: one /64); 0 is no limit.
    pub max_connections_per_ip: u32,
    /// Longest MAIL FROM address; 0 is no limit.
    pub sender_max_length: Ruled<usize>,
    pub sender_deny: Ruled<AddressPatterns>,
    /// When set, only senders matching it pass (the null sender always passes).
    pub sender_allow: Option<Ruled<AddressPatterns>>,
    /// When set, RCPT to a domain outside it is refused.
    pub relay_domains: Option<Ruled<Domains>>,
    /// Upstream 5xx replies to RCPT tolerated per session; 0 is no limit.
    pub max_invalid_recipients: u32,
    pub max_header_size: Ruled<usize>,
    pub max_header_line_length: Ruled<usize>,
    pub deny_headers: Ruled<Vec<String>>,
    pub deny_filename_extensions: Ruled<Vec<String>>,
    pub max_filename_length: Ruled<usize>,
    pub deny_encodings: Ruled<Vec<String>>,
    pub max_body_line_length: Ruled<usize>,
    pub rate_per_ip: RatePerIp,
    /// Messages per minute per MAIL FROM address; 0 is no limit.
    pub rate_per_sender: u32,
    /// How long the banner is held back to catch clients that talk first; zero is off.
    pub pregreet_wait: Duration,
    pub reject_unauth_pipelining: bool,
    pub upstream_identity: UpstreamIdentity,
    /// The header, MIME and body rules compiled once for every message under this policy.
    pub content: ContentCheck,
    /// The certificate for `starttls = "terminate"` and the upstream TLS settings.
    pub tls: TlsPolicy,
    /// The verbs that pass: the mode's (or `allow`'s) minus those of removed extensions.
    allowed: Vec<Verb>,
}

/// The longest line accepted during an AUTH exchange, whatever `max_line_length` says: RFC 4954
/// asks servers to take at least 12288 octets there.
pub const AUTH_LINE_LENGTH: usize = 12288;

/// EHLO keywords that announce a verb; removing the keyword blocks the verb.
const KEYWORD_VERBS: &[(&str, Verb)] = &[
    ("STARTTLS", Verb::STARTTLS),
    ("CHUNKING", Verb::BDAT),
    ("AUTH", Verb::AUTH),
    ("ETRN", Verb::ETRN),
    ("ATRN", Verb::ATRN),
    ("XCLIENT", Verb::XCLIENT),
    ("XFORWARD", Verb::XFORWARD),
    ("VRFY", Verb::VRFY),
    ("EXPN", Verb::EXPN),
    ("HELP", Verb::HELP),
    ("TURN", Verb::TURN),
    ("SAML", Verb::SAML),
    ("SOML", Verb::SOML),
    ("SEND", Verb::SEND),
];

impl Default for Policy {
    fn default() -> Self {
        // Every list is empty in the default file, so nothing can fail to compile.
        Policy::from_file(File::default(), "", "default").expect("the default policy compiles")
    }
}

impl Policy {
    /// Reads and validates a policy file.
    pub fn load(path: &Path) -> Result<Policy, PolicyError> {
        let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Policy::parse(&text, &path.display().to_string())
    }

    /// Parses policy text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Policy, PolicyError> {
        let file: File = toml::from_str(text).map_err(|e| {
            let offset = e.span().map(|s| s.start).unwrap_or(0);
            invalid(text, origin, offset, e.message())
        })?;
        Policy::from_file(file, text, origin)
    }

    fn from_file(file: File, text: &str, origin: &str) -> Result<Policy, PolicyError> {
        let starttls_at = file.starttls.as_ref().map_or(0, |s| s.span().start);
        let starttls = file
            .starttls
            .as_ref()
            .map_or(StartTls::Pass, |s| *s.get_ref());
        let tls = tls_policy(&file, starttls, text, origin, starttls_at)?;
        let patterns = |list: Option<Spanned<Ruled<Vec<String>>>>| -> Result<Option<Ruled<AddressPatterns>>, PolicyError> {
            list.map(|spanned| {
                let start = spanned.span().start;
                let r = spanned.into_inner();
                AddressPatterns::new(&r.value)
                    .map(|value| Ruled { value, action: r.action })
                    .map_err(|e| invalid(text, origin, start, &e.to_string()))
            })
            .transpose()
        };
        let sender_deny = patterns(file.sender_deny)?;
        let sender_allow = patterns(file.sender_allow)?;
        let relay_domains = file
            .relay_domains
            .map(|spanned| {
                let start = spanned.span().start;
                let r = spanned.into_inner();
                Domains::new(&r.value)
                    .map(|value| Ruled {
                        value,
                        action: r.action,
                    })
                    .map_err(|e| invalid(text, origin, start, &e.to_string()))
            })
            .transpose()?;
        let empty =
            AddressPatterns::new(&[]).map_err(|e| invalid(text, origin, 0, &e.to_string()))?;
        let allow: Option<Vec<Verb>> = file
            .allow
            .map(|list| list.into_iter().map(|v| v.0).collect());
        let extensions: Option<Vec<String>> = file
            .extensions
            .map(|list| list.into_iter().map(|k| k.0).collect());
        let mode = file.mode.unwrap_or(Mode::Modern);
        let base: &[Verb] = allow.as_deref().unwrap_or(mode.verbs());
        let mut allowed: Vec<Verb> = base
            .iter()
            .copied()
            .filter(|&verb| {
                if verb == Verb::STARTTLS && starttls == StartTls::Strip {
                    return false;
                }
                match &extensions {
                    None => true,
                    Some(keep) => KEYWORD_VERBS
                        .iter()
                        .filter(|(_, v)| *v == verb)
                        .all(|(kw, _)| keep.iter().any(|k| k == kw)),
                }
            })
            .collect();
        allowed.sort();
        allowed.dedup();
        if starttls == StartTls::Terminate && !allowed.contains(&Verb::STARTTLS) {
            // Certificates would be loaded for a verb no client could ever send.
            return Err(invalid(
                text,
                origin,
                starttls_at,
                "starttls = \"terminate\" needs the STARTTLS verb allowed: mode = \"modern\", or STARTTLS in `allow` (and in `extensions`, if set)",
            ));
        }
        let lower = |r: Option<Ruled<Vec<String>>>| {
            let r = r.unwrap_or(Ruled {
                value: Vec::new(),
                action: RuleAction::Reject,
            });
            Ruled {
                value: r.value.iter().map(|s| s.to_ascii_lowercase()).collect(),
                action: r.action,
            }
        };
        let size = |r: Option<Ruled<u32>>, default: usize, action: RuleAction| match r {
            Some(r) => Ruled {
                value: r.value as usize,
                action: r.action,
            },
            None => Ruled {
                value: default,
                action,
            },
        };
        let mut policy = Policy {
            mode,
            allow,
            blocked_reply: file.blocked_reply.unwrap_or(BlockedReply::Reject),
            mask_banner: file.mask_banner.unwrap_or(false),
            upstream_identity: file.upstream_identity.unwrap_or(UpstreamIdentity::None),
            extensions,
            max_recipients: file.max_recipients.unwrap_or(1000),
            max_message_size: file.max_message_size.unwrap_or(0),
            max_line_length: file.max_line_length.map_or(2048, |n| n as usize),
            bare_lf: file.bare_lf.unwrap_or(BareLf::Normalize),
            starttls,
            check_addresses: file.check_addresses.unwrap_or(false),
            hard_error_limit: file.hard_error_limit.unwrap_or(20),
            greeting_timeout: Duration::from_secs(file.greeting_timeout.unwrap_or(300)),
            command_timeout: Duration::from_secs(file.command_timeout.unwrap_or(300)),
            data_timeout: Duration::from_secs(file.data_timeout.unwrap_or(180)),
            final_timeout: Duration::from_secs(file.final_timeout.unwrap_or(600)),
            min_data_rate: file.min_data_rate.unwrap_or(500),
            max_connections: file.max_connections.unwrap_or(0),
            max_connections_per_ip: file.max_connections_per_ip.unwrap_or(0),
            sender_max_length: size(file.sender_max_length, 320, RuleAction::Reject),
            sender_deny: sender_deny.unwrap_or(Ruled {
                value: empty,
                action: RuleAction::Reject,
            }),
            sender_allow,
            relay_domains,
            max_invalid_recipients: file.max_invalid_recipients.unwrap_or(0),
            max_header_size: size(file.max_header_size, 0, RuleAction::Reject),
            max_header_line_length: size(file.max_header_line_length, 998, RuleAction::Log),
            deny_headers: lower(file.deny_headers),
            deny_filename_extensions: lower(file.deny_filename_extensions),
            max_filename_length: size(file.max_filename_length, 255, RuleAction::Reject),
            deny_encodings: lower(file.deny_encodings),
            max_body_line_length: size(file.max_body_line_length, 998, RuleAction::Log),
            rate_per_ip: file.rate_per_ip.unwrap_or_default(),
            rate_per_sender: file.rate_per_sender.unwrap_or(0),
            pregreet_wait: Duration::from_millis(file.pregreet_wait_ms.unwrap_or(0)),
            reject_unauth_pipelining: file.reject_unauth_pipelining.unwrap_or(false),
            content: ContentCheck(None),
            tls,
            allowed,
        };
        let rules = policy.content_rules();
        let compiled = rules
            .compile()
            .map_err(|e| invalid(text, origin, 0, &e.to_string()))?;
        policy.content = ContentCheck(compiled.any_enabled().then(|| Arc::new(compiled)));
        Ok(policy)
    }

    /// The content rules of this policy, as the streaming inspector takes them.
    fn content_rules(&self) -> ContentRules {
        ContentRules {
            max_header_size: self.max_header_size.value,
            max_header_line_length: self.max_header_line_length.value,
            deny_headers: self.deny_headers.value.clone(),
            deny_filename_extensions: self.deny_filename_extensions.value.clone(),
            max_filename_length: self.max_filename_length.value,
            deny_encodings: self.deny_encodings.value.clone(),
            max_body_line_length: self.max_body_line_length.value,
            max_mime_depth: crate::proto::content::MAX_MIME_DEPTH,
        }
    }

    /// What a content finding does. A MIME structure the inspector cannot follow hides file
    /// names, so it is refused like a denied file name when file-name rules are on.
    pub fn content_action(&self, rule: Rule) -> RuleAction {
        match rule {
            Rule::HeaderSize => self.max_header_size.action,
            Rule::HeaderLineLength => self.max_header_line_length.action,
            Rule::DenyHeader => self.deny_headers.action,
            Rule::FilenameExtension => self.deny_filename_extensions.action,
            Rule::FilenameLength => self.max_filename_length.action,
            Rule::Encoding => self.deny_encodings.action,
            Rule::BodyLineLength => self.max_body_line_length.action,
            Rule::MimeStructure if !self.deny_filename_extensions.value.is_empty() => {
                self.deny_filename_extensions.action
            }
            Rule::MimeStructure if self.max_filename_length.value > 0 => {
                self.max_filename_length.action
            }
            Rule::MimeStructure => RuleAction::Log,
        }
    }

    /// Whether the verb may be forwarded to the upstream.
    pub fn allows(&self, verb: Verb) -> bool {
        self.allowed.contains(&verb)
    }

    /// The effective allow-list, sorted.
    pub fn allowed_verbs(&self) -> &[Verb] {
        &self.allowed
    }

    /// Whether an EHLO keyword of the upstream's reply is passed on to the client. A keyword
    /// is kept when the `extensions` list (if any) names it and the verbs it announces are
    /// allowed, so the client is never offered what the guard would then refuse.
    pub fn keeps_keyword(&self, keyword: &[u8]) -> bool {
        let listed = match &self.extensions {
            None => true,
            Some(keep) => keep
                .iter()
                .any(|k| k.as_bytes().eq_ignore_ascii_case(keyword)),
        };
        if !listed {
            return false;
        }
        if self.starttls == StartTls::Terminate && keyword.eq_ignore_ascii_case(b"STARTTLS") {
            // mailguard announces its own STARTTLS; the upstream's is not the client's to use.
            return false;
        }
        let verb_ok = KEYWORD_VERBS
            .iter()
            .filter(|(kw, _)| kw.as_bytes().eq_ignore_ascii_case(keyword))
            .all(|(_, verb)| self.allows(*verb));
        // BINARYMIME bodies can only travel by BDAT.
        let binary_ok = !keyword.eq_ignore_ascii_case(b"BINARYMIME") || self.allows(Verb::BDAT);
        verb_ok && binary_ok
    }

    /// The mode's name as written in a policy file.
    pub fn mode_name(&self) -> &'static str {
        self.mode.name()
    }
}

/// A policy read as a table of a larger TOML document (the `[policy]` table of a config
/// file): same keys, defaults and validation as a policy file.
#[derive(Debug, Deserialize)]
#[serde(transparent)]
pub(crate) struct PolicyTable(File);

impl PolicyTable {
    /// Validates the table; `text` is the whole document it was read from (spans point there).
    pub(crate) fn compile(self, text: &str, origin: &str) -> Result<Policy, PolicyError> {
        Policy::from_file(self.0, text, origin)
    }
}

/// The file as written: every key optional, unknown keys refused.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    mode: Option<Mode>,
    allow: Option<Vec<VerbName>>,
    blocked_reply: Option<BlockedReply>,
    mask_banner: Option<bool>,
    extensions: Option<Vec<Keyword>>,
    max_recipients: Option<u32>,
    max_message_size: Option<u64>,
    #[serde(default, deserialize_with = "line_length")]
    max_line_length: Option<u32>,
    bare_lf: Option<BareLf>,
    starttls: Option<Spanned<StartTls>>,
    check_addresses: Option<bool>,
    #[serde(default, deserialize_with = "at_least_one")]
    hard_error_limit: Option<u32>,
    #[serde(default, deserialize_with = "seconds")]
    greeting_timeout: Option<u64>,
    #[serde(default, deserialize_with = "seconds")]
    command_timeout: Option<u64>,
    #[serde(default, deserialize_with = "seconds")]
    data_timeout: Option<u64>,
    #[serde(default, deserialize_with = "seconds")]
    final_timeout: Option<u64>,
    min_data_rate: Option<u64>,
    max_connections: Option<u32>,
    max_connections_per_ip: Option<u32>,
    sender_max_length: Option<Ruled<u32>>,
    sender_deny: Option<Spanned<Ruled<Vec<String>>>>,
    sender_allow: Option<Spanned<Ruled<Vec<String>>>>,
    relay_domains: Option<Spanned<Ruled<Vec<String>>>>,
    max_invalid_recipients: Option<u32>,
    max_header_size: Option<Ruled<u32>>,
    max_header_line_length: Option<Ruled<u32>>,
    deny_headers: Option<Ruled<Vec<String>>>,
    deny_filename_extensions: Option<Ruled<Vec<String>>>,
    max_filename_length: Option<Ruled<u32>>,
    deny_encodings: Option<Ruled<Vec<String>>>,
    max_body_line_length: Option<Ruled<u32>>,
    rate_per_ip: Option<RatePerIp>,
    rate_per_sender: Option<u32>,
    #[serde(default, deserialize_with = "milliseconds")]
    pregreet_wait_ms: Option<u64>,
    reject_unauth_pipelining: Option<bool>,
    tls_cert: Option<String>,
    tls_key: Option<String>,
    upstream_tls: Option<Spanned<UpstreamTls>>,
    upstream_tls_verify: Option<bool>,
    upstream_tls_ca: Option<String>,
    upstream_identity: Option<UpstreamIdentity>,
}

/// A relative path in a policy read from a file is taken relative to that file's directory
/// (as the config file's `policy` path is), so a policy and its certificates move together.
fn beside(origin: &str, path: &str) -> String {
    let origin = Path::new(origin);
    match origin.parent() {
        Some(dir) if Path::new(path).is_relative() && origin.is_file() => {
            dir.join(path).display().to_string()
        }
        _ => path.to_string(),
    }
}

/// Validates the TLS keys and loads the files they name.
fn tls_policy(
    file: &File,
    starttls: StartTls,
    text: &str,
    origin: &str,
    starttls_at: usize,
) -> Result<TlsPolicy, PolicyError> {
    let near = |p: &Option<String>| p.as_deref().map(|p| beside(origin, p));
    let keys = TlsKeys {
        terminate: starttls == StartTls::Terminate,
        cert: near(&file.tls_cert),
        key: near(&file.tls_key),
        upstream: file.upstream_tls.as_ref().map(|u| *u.get_ref()),
        upstream_verify: file.upstream_tls_verify,
        upstream_ca: near(&file.upstream_tls_ca),
    };
    keys.check().map_err(|missing| {
        let at = match missing {
            Missing::CertOrKey => starttls_at,
            Missing::UpstreamCa => file.upstream_tls.as_ref().map_or(0, |u| u.span().start),
        };
        invalid(text, origin, at, missing.message())
    })?;
    keys.load().map_err(|source| PolicyError::Tls {
        path: origin.to_string(),
        source,
    })
}

/// A rule is written as its value alone (default action) or as `{ value = …, action = … }`.
impl<'de, T: serde::de::DeserializeOwned> Deserialize<'de> for Ruled<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = toml::Value::deserialize(d)?;
        let (value, action) = match raw {
            toml::Value::Table(mut table) => {
                let value = table
                    .remove("value")
                    .ok_or_else(|| de::Error::custom("a rule table needs `value`"))?;
                let action = match table.remove("action") {
                    Some(a) => RuleAction::deserialize(a).map_err(de::Error::custom)?,
                    None => RuleAction::Reject,
                };
                if let Some(key) = table.keys().next() {
                    return Err(de::Error::custom(format!(
                        "unknown field `{key}` in a rule, expected `value` or `action`"
                    )));
                }
                (value, action)
            }
            other => (other, RuleAction::Reject),
        };
        let value = T::deserialize(value).map_err(de::Error::custom)?;
        Ok(Ruled { value, action })
    }
}

fn milliseconds<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    let n = u64::deserialize(d)?;
    if n > 60_000 {
        return Err(de::Error::custom(format!(
            "pregreet_wait_ms is 0 to 60000, not {n}"
        )));
    }
    Ok(Some(n))
}

fn invalid(text: &str, origin: &str, offset: usize, message: &str) -> PolicyError {
    let (line, column) = line_column(text, offset);
    PolicyError::Invalid {
        path: origin.to_string(),
        line,
        column,
        message: message.trim().replace('\n', " "),
    }
}

/// A verb named in `allow`.
#[derive(Debug)]
struct VerbName(Verb);

impl<'de> Deserialize<'de> for VerbName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Verb::from_token(s.as_bytes())
            .map(VerbName)
            .ok_or_else(|| de::Error::custom(format!("`{s}` is not an SMTP verb (1 to 8 letters)")))
    }
}

/// An EHLO keyword named in `extensions`.
#[derive(Debug)]
struct Keyword(String);

impl<'de> Deserialize<'de> for Keyword {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let valid = !s.is_empty()
            && s.as_bytes()[0].is_ascii_alphanumeric()
            && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
        if valid {
            Ok(Keyword(s.to_ascii_uppercase()))
        } else {
            Err(de::Error::custom(format!(
                "`{s}` is not an EHLO keyword (letters, digits and '-')"
            )))
        }
    }
}

fn line_length<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    let n = u32::deserialize(d)?;
    if !(64..=1 << 20).contains(&n) {
        return Err(de::Error::custom(format!(
            "max_line_length must be between 64 and 1048576, not {n}"
        )));
    }
    Ok(Some(n))
}

fn at_least_one<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    let n = u32::deserialize(d)?;
    if n == 0 {
        return Err(de::Error::custom("must be at least 1"));
    }
    Ok(Some(n))
}

fn seconds<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    let n = u64::deserialize(d)?;
    if !(1..=86_400).contains(&n) {
        return Err(de::Error::custom(format!(
            "a timeout is 1 to 86400 seconds, not {n}"
        )));
    }
    Ok(Some(n))
}

/// 1-based line and column (in characters) of a byte offset.
pub(crate) fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        Policy::parse(text, "p.toml").unwrap_err().to_string()
    }

    #[test]
    fn defaults_are_modern_and_lenient() {
        let p = Policy::parse("", "p.toml").unwrap();
        assert_eq!(p, Policy::default());
        assert_eq!(p.mode, Mode::Modern);
        assert!(p.allows(Verb::BDAT) && p.allows(Verb::STARTTLS) && p.allows(Verb::AUTH));
        assert!(!p.allows(Verb::VRFY) && !p.allows(Verb::ETRN));
        assert!(p.keeps_keyword(b"PIPELINING") && p.keeps_keyword(b"chunking"));
        assert!(!p.keeps_keyword(b"ETRN") && !p.keeps_keyword(b"XCLIENT"));
    }

    #[test]
    fn modes_have_their_verbs() {
        let p = Policy::parse("mode = \"rfc821\"", "p").unwrap();
        assert_eq!(p.allowed_verbs().len(), 7);
        assert!(!p.allows(Verb::EHLO));
        let p = Policy::parse("mode = \"esmtp\"", "p").unwrap();
        assert_eq!(p.allowed_verbs().len(), 15);
        assert!(p.allows(Verb::VRFY) && !p.allows(Verb::BDAT) && !p.allows(Verb::STARTTLS));
        assert!(!p.keeps_keyword(b"CHUNKING") && !p.keeps_keyword(b"BINARYMIME"));
    }

    #[test]
    fn allow_overrides_mode() {
        let p = Policy::parse("mode = \"rfc821\"\nallow = [\"ehlo\", \"QUIT\"]", "p").unwrap();
        assert_eq!(p.allowed_verbs(), &[Verb::EHLO, Verb::QUIT][..]);
    }

    #[test]
    fn removed_extension_blocks_its_verb() {
        let p =
            Policy::parse("extensions = [\"PIPELINING\", \"SIZE\", \"8bitmime\"]", "p").unwrap();
        assert!(!p.allows(Verb::BDAT) && !p.allows(Verb::STARTTLS) && !p.allows(Verb::AUTH));
        assert!(p.allows(Verb::MAIL));
        assert!(p.keeps_keyword(b"8BITMIME") && !p.keeps_keyword(b"DSN"));
        let p = Policy::parse("starttls = \"strip\"", "p").unwrap();
        assert!(!p.allows(Verb::STARTTLS) && !p.keeps_keyword(b"STARTTLS"));
    }

    #[test]
    fn rules_take_a_value_or_a_table() {
        let p = Policy::parse(
            "max_body_line_length = { value = 2000, action = \"reject\" }\nsender_max_length = 100\nsender_deny = { value = [\"@spam.test\"], action = \"drop\" }\nrelay_domains = [\"example.com\"]\nrate_per_ip = { messages = 5 }",
            "p",
        )
        .unwrap();
        assert_eq!(
            p.max_body_line_length,
            Ruled {
                value: 2000,
                action: RuleAction::Reject
            }
        );
        assert_eq!(
            p.sender_max_length,
            Ruled {
                value: 100,
                action: RuleAction::Reject
            }
        );
        assert_eq!(p.sender_deny.action, RuleAction::Drop);
        assert!(p.sender_deny.value.matches(b"x@spam.test"));
        assert!(p
            .relay_domains
            .as_ref()
            .unwrap()
            .value
            .accepts(b"a@example.com"));
        assert_eq!(
            p.rate_per_ip,
            RatePerIp {
                connections: 0,
                messages: 5
            }
        );
        let d = Policy::default();
        assert_eq!(
            d.max_header_line_length,
            Ruled {
                value: 998,
                action: RuleAction::Log
            }
        );
        assert_eq!(d.max_filename_length.value, 255);
        let e = err("sender_deny = [\"@ok.test\", \"not a pattern\"]");
        assert!(
            e.starts_with("p.toml:1:15: `not a pattern` is not an address pattern"),
            "{e}"
        );
        let e = err("max_header_size = { value = 1, action = \"shout\" }");
        assert!(e.starts_with("p.toml:1:19: unknown variant `shout`"), "{e}");
        let e = err("max_header_size = { value = 1, colour = 2 }");
        assert!(e.contains("unknown field `colour` in a rule"), "{e}");
    }

    #[test]
    fn errors_name_line_and_column() {
        let e = err("mode = \"modern\"\nbogus = 1\n");
        assert!(
            e.starts_with("p.toml:2:1: unknown field `bogus`, expected one of `mode`"),
            "{e}"
        );
        let e = err("mode = \"pix\"");
        assert!(e.starts_with("p.toml:1:8: unknown variant `pix`"), "{e}");
        let e = err("allow = [\"MAIL\", \"X-1\"]");
        assert!(
            e.starts_with("p.toml:1:9: `X-1` is not an SMTP verb"),
            "{e}"
        );
        let e = err("max_line_length = 10");
        assert!(e.starts_with("p.toml:1:19: max_line_length must be"), "{e}");
        let e = err("mask_banner = \"yes\"");
        assert!(e.starts_with("p.toml:1:15: invalid type"), "{e}");
        assert!(!e.contains('\n'));
        let e = err("mode = ");
        assert!(e.starts_with("p.toml:1:8:"), "{e}");
    }
}
