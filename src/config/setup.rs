//! The config file: one TOML file holding the whole setup of a mailguard process (addresses,
//! threads, metrics, logging, drain timeout) and its policy, inline as a `[policy]` table or
//! as the path of a policy file.
//!
//! Owns parsing and validation of that file, with errors in the policy's style
//! (`file:line:column: message`, one line). It must not apply anything: the binary merges the
//! result with its command line (flags win) and starts or reloads from it.

use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;

use super::policy::{line_column, PolicyTable};
use super::{Policy, PolicyError};

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One readable line per event: time, level, message, `key=value` fields.
    Human,
    /// One JSON object per line, for log shippers.
    Json,
}

/// The most detailed log level written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    /// Adds one line per policy decision.
    Debug,
    Trace,
}

impl FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "human" => Ok(LogFormat::Human),
            "json" => Ok(LogFormat::Json),
            _ => Err(format!("`{s}` is not a log format (human, json)")),
        }
    }
}

impl FromStr for LogLevel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "error" => Ok(LogLevel::Error),
            "warn" => Ok(LogLevel::Warn),
            "info" => Ok(LogLevel::Info),
            "debug" => Ok(LogLevel::Debug),
            "trace" => Ok(LogLevel::Trace),
            _ => Err(format!(
                "`{s}` is not a log level (error, warn, info, debug, trace)"
            )),
        }
    }
}

impl fmt::Display for LogFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LogFormat::Human => "human",
            LogFormat::Json => "json",
        })
    }
}

impl fmt::Display for LogLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LogLevel::Error => "error",
            LogLevel::Warn => "warn",
            LogLevel::Info => "info",
            LogLevel::Debug => "debug",
            LogLevel::Trace => "trace",
        })
    }
}

/// Where the policy comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum PolicySource {
    /// No policy given: every key has its default.
    Default,
    /// A policy file (re-read on reload).
    File(PathBuf),
    /// A `[policy]` table of the config file (re-read with it on reload).
    Inline(Box<Policy>),
}

impl PolicySource {
    /// Reads the policy this source names.
    pub fn load(&self) -> Result<Policy, PolicyError> {
        match self {
            PolicySource::Default => Ok(Policy::default()),
            PolicySource::File(path) => Policy::load(path),
            PolicySource::Inline(policy) => Ok((**policy).clone()),
        }
    }

    /// A short description for logs and `mailguard check`.
    pub fn describe(&self) -> String {
        match self {
            PolicySource::Default => "built-in defaults".to_string(),
            PolicySource::File(path) => path.display().to_string(),
            PolicySource::Inline(_) => "the [policy] table of the config file".to_string(),
        }
    }
}

/// The longest drain the config accepts: a day.
pub const MAX_DRAIN_SECS: u64 = 86_400;

/// A config file as read: every key optional (command-line flags fill or override them).
#[derive(Debug, Clone, PartialEq)]
pub struct Setup {
    pub listen: Option<SocketAddr>,
    /// The listener reads a PROXY protocol header (v1 or v2) before each client's bytes.
    pub proxy_protocol: Option<bool>,
    pub upstream: Option<SocketAddr>,
    pub threads: Option<u16>,
    pub metrics: Option<SocketAddr>,
    pub log_format: Option<LogFormat>,
    pub log_level: Option<LogLevel>,
    pub drain_timeout: Option<Duration>,
    pub policy: PolicySource,
    pub ring: RingTuning,
}

/// The `[ring]` table: the io_uring sizes of each worker (unset keys keep the built-in
/// defaults; see tuning.md for what each costs and buys).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RingTuning {
    /// Submission queue entries (the completion queue gets four times as many).
    pub entries: Option<u32>,
    /// Receive buffers in each worker's provided-buffer ring (a power of two).
    pub buffers: Option<u16>,
    /// Bytes per receive buffer.
    pub buffer_size: Option<u32>,
}

/// A config file could not be used. `Display` is one line, ready for stderr.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// The file could not be read.
    #[error("{path}: cannot read config: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// A certificate, key or CA file named by its `[policy]` table cannot be used.
    #[error("{path}: {source}")]
    Tls {
        path: String,
        #[source]
        source: crate::tls::TlsError,
    },
    /// The file is not a valid config (its `[policy]` table included).
    #[error("{path}:{line}:{column}: {message}")]
    Invalid {
        path: String,
        line: usize,
        column: usize,
        message: String,
    },
}

/// A `[policy]` table that parses but does not validate (a bad address pattern, say) is
/// reported like any other error of the config file.
impl From<PolicyError> for SetupError {
    fn from(e: PolicyError) -> SetupError {
        match e {
            PolicyError::Read { path, source } => SetupError::Read { path, source },
            PolicyError::Tls { path, source } => SetupError::Tls { path, source },
            PolicyError::Invalid {
                path,
                line,
                column,
                message,
            } => SetupError::Invalid {
                path,
                line,
                column,
                message,
            },
        }
    }
}

impl Setup {
    /// Reads and validates a config file. A relative policy path is taken relative to the
    /// directory of the config file.
    pub fn load(path: &Path) -> Result<Setup, SetupError> {
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| SetupError::Read {
            path: origin.clone(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Setup::parse(&text, &origin, base)
    }

    /// Parses config text; `origin` names it in errors, `base` anchors a relative policy path.
    pub fn parse(text: &str, origin: &str, base: &Path) -> Result<Setup, SetupError> {
        let file: File = toml::from_str(text).map_err(|e| {
            let offset = e.span().map(|s| s.start).unwrap_or(0);
            let (line, column) = line_column(text, offset);
            SetupError::Invalid {
                path: origin.to_string(),
                line,
                column,
                message: e.message().trim().replace('\n', " "),
            }
        })?;
        let policy = match file.policy {
            None => PolicySource::Default,
            Some(PolicyField::Path(p)) if p.is_relative() => PolicySource::File(base.join(p)),
            Some(PolicyField::Path(p)) => PolicySource::File(p),
            Some(PolicyField::Inline(table)) => {
                let policy = table.compile(text, origin).map_err(SetupError::from)?;
                PolicySource::Inline(Box::new(policy))
            }
        };
        Ok(Setup {
            listen: file.listen,
            proxy_protocol: file.proxy_protocol,
            upstream: file.upstream,
            threads: file.threads,
            metrics: file.metrics,
            log_format: file.log_format,
            log_level: file.log_level,
            drain_timeout: file.drain_timeout.map(Duration::from_secs),
            policy,
            ring: file.ring.unwrap_or_default(),
        })
    }
}

/// The file as written: every key optional, unknown keys refused.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default, deserialize_with = "address")]
    listen: Option<SocketAddr>,
    proxy_protocol: Option<bool>,
    #[serde(default, deserialize_with = "address")]
    upstream: Option<SocketAddr>,
    #[serde(default, deserialize_with = "threads")]
    threads: Option<u16>,
    #[serde(default, deserialize_with = "address")]
    metrics: Option<SocketAddr>,
    log_format: Option<LogFormat>,
    log_level: Option<LogLevel>,
    #[serde(default, deserialize_with = "drain_secs")]
    drain_timeout: Option<u64>,
    policy: Option<PolicyField>,
    ring: Option<RingTuning>,
}

/// `policy = "path"` or a `[policy]` table.
#[derive(Debug)]
enum PolicyField {
    Path(PathBuf),
    Inline(Box<PolicyTable>),
}

impl<'de> Deserialize<'de> for PolicyField {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct PolicyVisitor;
        impl<'de> Visitor<'de> for PolicyVisitor {
            type Value = PolicyField;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("the path of a policy file or a [policy] table")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<PolicyField, E> {
                if s.is_empty() {
                    return Err(E::custom("the policy path is empty"));
                }
                Ok(PolicyField::Path(PathBuf::from(s)))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<PolicyField, A::Error> {
                let d = de::value::MapAccessDeserializer::new(map);
                PolicyTable::deserialize(d).map(|t| PolicyField::Inline(Box::new(t)))
            }
        }
        d.deserialize_any(PolicyVisitor)
    }
}

/// Resolves `host:port` or `[v6]:port` (the first address a name resolves to).
pub fn resolve(s: &str) -> Result<SocketAddr, String> {
    let mut addrs = s
        .to_socket_addrs()
        .map_err(|e| format!("`{s}`: expected host:port or [v6]:port ({e})"))?;
    addrs
        .next()
        .ok_or_else(|| format!("`{s}` resolves to no address"))
}

fn address<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
    let s = String::deserialize(d)?;
    resolve(&s).map(Some).map_err(de::Error::custom)
}

fn threads<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u16>, D::Error> {
    let n = u64::deserialize(d)?;
    match u16::try_from(n) {
        Ok(n @ 1..=1024) => Ok(Some(n)),
        _ => Err(de::Error::custom(format!(
            "threads must be between 1 and 1024, not {n}"
        ))),
    }
}

fn drain_secs<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    let n = u64::deserialize(d)?;
    if n > MAX_DRAIN_SECS {
        return Err(de::Error::custom(format!(
            "drain_timeout is 0 to {MAX_DRAIN_SECS} seconds, not {n}"
        )));
    }
    Ok(Some(n))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Setup, String> {
        Setup::parse(text, "c.toml", Path::new("/etc/mailguard")).map_err(|e| e.to_string())
    }

    #[test]
    fn every_key_and_an_inline_policy() {
        let s = parse(
            r#"
listen = "127.0.0.1:2525"
proxy_protocol = true
upstream = "[::1]:25"
threads = 3
metrics = "127.0.0.1:9425"
log_format = "json"
log_level = "debug"
drain_timeout = 5

[policy]
max_recipients = 9
"#,
        )
        .expect("valid");
        assert_eq!(s.listen, Some("127.0.0.1:2525".parse().unwrap()));
        assert_eq!(s.proxy_protocol, Some(true));
        assert_eq!(s.upstream, Some("[::1]:25".parse().unwrap()));
        assert_eq!(s.threads, Some(3));
        assert_eq!(s.metrics, Some("127.0.0.1:9425".parse().unwrap()));
        assert_eq!(s.log_format, Some(LogFormat::Json));
        assert_eq!(s.log_level, Some(LogLevel::Debug));
        assert_eq!(s.drain_timeout, Some(Duration::from_secs(5)));
        let p = s.policy.load().expect("inline policy");
        assert_eq!(p.max_recipients, 9);
    }

    #[test]
    fn empty_file_sets_nothing_and_relative_policy_paths_follow_the_file() {
        let s = parse("").expect("valid");
        assert_eq!(
            (s.listen, s.threads, s.policy),
            (None, None, PolicySource::Default)
        );
        let s = parse("policy = \"policy.toml\"").expect("valid");
        assert_eq!(
            s.policy,
            PolicySource::File(PathBuf::from("/etc/mailguard/policy.toml"))
        );
        let s = parse("policy = \"/srv/p.toml\"").expect("valid");
        assert_eq!(s.policy, PolicySource::File(PathBuf::from("/srv/p.toml")));
    }

    #[test]
    fn errors_name_line_and_column_of_the_config_file() {
        let e = parse("listen = \"127.0.0.1:25\"\nbogus = 1\n").unwrap_err();
        assert!(e.starts_with("c.toml:2:1: unknown field `bogus`"), "{e}");
        let e = parse("listen = \"nonsense\"").unwrap_err();
        assert!(
            e.starts_with("c.toml:1:10: `nonsense`: expected host:port"),
            "{e}"
        );
        let e = parse("threads = 0").unwrap_err();
        assert!(e.starts_with("c.toml:1:11: threads must be"), "{e}");
        let e = parse("drain_timeout = 100000").unwrap_err();
        assert!(e.starts_with("c.toml:1:17: drain_timeout is 0 to"), "{e}");
        let e = parse("log_format = \"xml\"").unwrap_err();
        assert!(e.starts_with("c.toml:1:14: unknown variant `xml`"), "{e}");
        let e = parse("policy = 3").unwrap_err();
        assert!(e.starts_with("c.toml:1:10: invalid type"), "{e}");
        assert!(!e.contains('\n'));
    }

    #[test]
    fn errors_inside_the_policy_table_point_into_the_config_file() {
        let e = parse("threads = 2\n\n[policy]\nmode = \"modern\"\nmax_recipients = \"x\"\n")
            .unwrap_err();
        assert!(e.starts_with("c.toml:5:18: invalid type"), "{e}");
        let e = parse("[policy]\nbogus_key = 1\n").unwrap_err();
        assert!(
            e.starts_with("c.toml:2:1: unknown field `bogus_key`"),
            "{e}"
        );
        let e = parse("[policy]\nmode = \"pix\"\n").unwrap_err();
        assert!(e.starts_with("c.toml:2:8: unknown variant `pix`"), "{e}");
        let e = parse("log_level = \"info\"\n[policy]\nsender_deny = [\"not a pattern\"]\n")
            .unwrap_err();
        assert!(e.starts_with("c.toml:3:"), "{e}");
        assert!(e.contains("not a pattern"), "{e}");
    }

    #[test]
    fn ring_table_sets_the_ring_sizes() {
        let s = Setup::parse(
            "[ring]\nentries = 256\nbuffers = 1024\nbuffer_size = 8192\n",
            "c.toml",
            Path::new("."),
        )
        .unwrap();
        assert_eq!(
            s.ring,
            RingTuning {
                entries: Some(256),
                buffers: Some(1024),
                buffer_size: Some(8192)
            }
        );
        let e = Setup::parse("[ring]\nqueue = 1\n", "c.toml", Path::new(".")).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("c.toml:2:1: unknown field `queue`"),
            "{e}"
        );
    }

    #[test]
    fn flag_values_parse() {
        assert_eq!("json".parse::<LogFormat>(), Ok(LogFormat::Json));
        assert!("xml".parse::<LogFormat>().is_err());
        assert_eq!("warn".parse::<LogLevel>(), Ok(LogLevel::Warn));
        assert_eq!(LogLevel::Debug.to_string(), "debug");
    }
}
