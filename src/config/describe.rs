//! A policy as an operator reads it: every key with its value and its default (what
//! `mailguard check` prints), and the keys that differ between two policies (what a reload
//! logs).
//!
//! Owns only presentation: values are written the way a policy file writes them, so the
//! printed policy parses back to the same policy. It must not parse or validate (that is
//! `policy.rs`) and must not decide anything.

use std::fmt::Write as _;

use super::{BareLf, BlockedReply, Policy, RuleAction, Ruled, StartTls};

/// One policy key and its value as TOML, or `None` when an optional key is unset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Setting {
    pub key: &'static str,
    pub value: Option<String>,
}

/// One key whose value differs between two policies (`unset` for an unset optional key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub key: &'static str,
    pub old: String,
    pub new: String,
}

/// Every policy key, in the order of the reference table, with its value.
pub fn settings(p: &Policy) -> Vec<Setting> {
    let set = |key, value: String| Setting {
        key,
        value: Some(value),
    };
    let secs = |d: std::time::Duration| d.as_secs().to_string();
    vec![
        set("mode", quote(p.mode_name())),
        Setting {
            key: "allow",
            value: p
                .allow
                .as_ref()
                .map(|verbs| list(verbs.iter().map(|v| v.name()))),
        },
        set("blocked_reply", quote(blocked_reply(p.blocked_reply))),
        set("mask_banner", p.mask_banner.to_string()),
        Setting {
            key: "extensions",
            value: p.extensions.as_ref().map(|k| list(k.iter().cloned())),
        },
        set("max_recipients", p.max_recipients.to_string()),
        set("max_message_size", p.max_message_size.to_string()),
        set("max_line_length", p.max_line_length.to_string()),
        set("bare_lf", quote(bare_lf(p.bare_lf))),
        set("starttls", quote(starttls(p.starttls))),
        set("check_addresses", p.check_addresses.to_string()),
        set("hard_error_limit", p.hard_error_limit.to_string()),
        set("greeting_timeout", secs(p.greeting_timeout)),
        set("command_timeout", secs(p.command_timeout)),
        set("data_timeout", secs(p.data_timeout)),
        set("final_timeout", secs(p.final_timeout)),
        set("min_data_rate", p.min_data_rate.to_string()),
        set("max_connections", p.max_connections.to_string()),
        set(
            "max_connections_per_ip",
            p.max_connections_per_ip.to_string(),
        ),
        set("sender_max_length", ruled(&p.sender_max_length, number)),
        set(
            "sender_deny",
            ruled(&p.sender_deny, |v| strings(v.source())),
        ),
        Setting {
            key: "sender_allow",
            value: p
                .sender_allow
                .as_ref()
                .map(|r| ruled(r, |v| strings(v.source()))),
        },
        Setting {
            key: "relay_domains",
            value: p
                .relay_domains
                .as_ref()
                .map(|r| ruled(r, |v| strings(v.entries()))),
        },
        set(
            "max_invalid_recipients",
            p.max_invalid_recipients.to_string(),
        ),
        set("max_header_size", ruled(&p.max_header_size, number)),
        set(
            "max_header_line_length",
            ruled(&p.max_header_line_length, number),
        ),
        set("deny_headers", ruled(&p.deny_headers, |v| strings(v))),
        set(
            "deny_filename_extensions",
            ruled(&p.deny_filename_extensions, |v| strings(v)),
        ),
        set("max_filename_length", ruled(&p.max_filename_length, number)),
        set("deny_encodings", ruled(&p.deny_encodings, |v| strings(v))),
        set(
            "max_body_line_length",
            ruled(&p.max_body_line_length, number),
        ),
        set(
            "rate_per_ip",
            format!(
                "{{ connections = {}, messages = {} }}",
                p.rate_per_ip.connections, p.rate_per_ip.messages
            ),
        ),
        set("rate_per_sender", p.rate_per_sender.to_string()),
        set("pregreet_wait_ms", p.pregreet_wait.as_millis().to_string()),
        set(
            "reject_unauth_pipelining",
            p.reject_unauth_pipelining.to_string(),
        ),
        Setting {
            key: "tls_cert",
            value: p.tls.cert.as_ref().map(|c| quote(&c.display().to_string())),
        },
        Setting {
            key: "tls_key",
            value: p.tls.key.as_ref().map(|k| quote(&k.display().to_string())),
        },
        set("upstream_tls", quote(p.tls.upstream.name())),
        set("upstream_tls_verify", p.tls.upstream_verify.to_string()),
        Setting {
            key: "upstream_tls_ca",
            value: p
                .tls
                .upstream_ca
                .as_ref()
                .map(|c| quote(&c.display().to_string())),
        },
        set("upstream_identity", quote(p.upstream_identity.name())),
    ]
}

/// The keys whose values differ, in reference order.
pub fn changes(old: &Policy, new: &Policy) -> Vec<Change> {
    let mut changes: Vec<Change> = settings(old)
        .into_iter()
        .zip(settings(new))
        .filter(|(a, b)| a.value != b.value)
        .map(|(a, b)| Change {
            key: a.key,
            old: shown(&a.value),
            new: shown(&b.value),
        })
        .collect();
    let tls_key_changed = changes
        .iter()
        .any(|c| c.key.starts_with("tls_") || c.key.starts_with("upstream_tls"));
    if old.tls != new.tls && !tls_key_changed {
        // Same paths, new bytes: a renewed certificate is worth a line in the reload log.
        changes.push(Change {
            key: "tls_cert/tls_key/upstream_tls_ca",
            old: "(previous file contents)".to_string(),
            new: "(new file contents)".to_string(),
        });
    }
    changes
}

/// Changes as one log-friendly phrase: `max_recipients 1000 -> 50; mask_banner false -> true`.
pub fn summarize(changes: &[Change]) -> String {
    if changes.is_empty() {
        return "no key changed".to_string();
    }
    let parts: Vec<String> = changes
        .iter()
        .map(|c| format!("{} {} -> {}", c.key, c.old, c.new))
        .collect();
    parts.join("; ")
}

/// The effective policy as a policy file: every key with its value and, in a comment, its
/// default; unset optional keys as comments. Parsing the result gives the same policy.
pub fn render(p: &Policy) -> String {
    let defaults = settings(&Policy::default());
    let mut out = String::new();
    for (setting, default) in settings(p).iter().zip(defaults.iter()) {
        let default = shown(&default.value);
        let line = match &setting.value {
            Some(value) => format!("{} = {value}", setting.key),
            None => format!("# {} unset", setting.key),
        };
        let _ = writeln!(out, "{line:<40} # default: {default}");
    }
    let verbs: Vec<String> = p.allowed_verbs().iter().map(|v| v.name()).collect();
    let _ = writeln!(out, "# verbs that pass: {}", verbs.join(" "));
    out
}

fn shown(value: &Option<String>) -> String {
    value.clone().unwrap_or_else(|| "unset".to_string())
}

fn quote(s: &str) -> String {
    format!("\"{s}\"")
}

fn list(items: impl Iterator<Item = String>) -> String {
    let quoted: Vec<String> = items.map(|i| quote(&i)).collect();
    format!("[{}]", quoted.join(", "))
}

fn strings(items: &[String]) -> String {
    list(items.iter().cloned())
}

fn number(n: &usize) -> String {
    n.to_string()
}

/// A rule in its table form, which always parses whatever the value's type.
fn ruled<T>(r: &Ruled<T>, value: impl Fn(&T) -> String) -> String {
    format!(
        "{{ value = {}, action = {} }}",
        value(&r.value),
        quote(rule_action(r.action))
    )
}

fn rule_action(a: RuleAction) -> &'static str {
    match a {
        RuleAction::Reject => "reject",
        RuleAction::Drop => "drop",
        RuleAction::Log => "log",
    }
}

fn blocked_reply(b: BlockedReply) -> &'static str {
    match b {
        BlockedReply::Reject => "reject",
        BlockedReply::Ok => "ok",
    }
}

fn bare_lf(b: BareLf) -> &'static str {
    match b {
        BareLf::Reject => "reject",
        BareLf::Normalize => "normalize",
    }
}

fn starttls(s: StartTls) -> &'static str {
    match s {
        StartTls::Pass => "pass",
        StartTls::Strip => "strip",
        StartTls::Terminate => "terminate",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EVERY_KEY: &str = r#"
mode = "esmtp"
allow = ["HELO", "MAIL", "RCPT", "DATA", "QUIT", "VRFY"]
blocked_reply = "ok"
mask_banner = true
extensions = ["PIPELINING", "SIZE"]
max_recipients = 7
max_message_size = 1234
max_line_length = 999
bare_lf = "reject"
starttls = "strip"
check_addresses = true
hard_error_limit = 3
greeting_timeout = 11
command_timeout = 12
data_timeout = 13
final_timeout = 14
min_data_rate = 15
max_connections = 16
max_connections_per_ip = 17
sender_max_length = { value = 100, action = "drop" }
sender_deny = ["spam@example.com", "@bad.example", "*.worse.example"]
sender_allow = { value = ["@good.example"], action = "log" }
relay_domains = ["example.com", "*.example.org"]
max_invalid_recipients = 5
max_header_size = 65536
max_header_line_length = { value = 500, action = "reject" }
deny_headers = ["X-Link2State"]
deny_filename_extensions = { value = ["exe", "scr"], action = "drop" }
max_filename_length = 100
deny_encodings = ["uuencode"]
max_body_line_length = { value = 2000, action = "reject" }
rate_per_ip = { connections = 60, messages = 30 }
rate_per_sender = 20
pregreet_wait_ms = 1500
reject_unauth_pipelining = true
upstream_identity = "xclient"
"#;

    #[test]
    fn rendering_parses_back_to_the_same_policy() {
        for text in ["", EVERY_KEY] {
            let p = Policy::parse(text, "p").expect("valid");
            let rendered = render(&p);
            let back = Policy::parse(&rendered, "rendered").expect("rendered parses");
            assert_eq!(back, p, "{rendered}");
        }
    }

    #[test]
    fn every_key_of_the_file_is_described() {
        // The parser's own list of keys, from its unknown-key message.
        let err = Policy::parse("no_such_key = 1", "p")
            .unwrap_err()
            .to_string();
        let expected = err.split("expected one of ").nth(1).expect("key list");
        let keys: Vec<&str> = expected.split(", ").map(|k| k.trim_matches('`')).collect();
        let described: Vec<&str> = settings(&Policy::default()).iter().map(|s| s.key).collect();
        assert_eq!(described, keys);
    }

    #[test]
    fn changes_name_each_differing_key() {
        let old = Policy::default();
        let new = Policy::parse("max_recipients = 50\nextensions = [\"SIZE\"]", "p").unwrap();
        let c = changes(&old, &new);
        assert_eq!(
            summarize(&c),
            "extensions unset -> [\"SIZE\"]; max_recipients 1000 -> 50"
        );
        assert_eq!(summarize(&changes(&new, &new)), "no key changed");
    }

    #[test]
    fn render_shows_values_and_defaults() {
        let p = Policy::parse("max_recipients = 5", "p").unwrap();
        let r = render(&p);
        assert!(r.contains("max_recipients = 5"), "{r}");
        assert!(r.contains("# default: 1000"), "{r}");
        assert!(r.contains("# allow unset"), "{r}");
        assert!(r.contains("# verbs that pass: "), "{r}");
    }
}
