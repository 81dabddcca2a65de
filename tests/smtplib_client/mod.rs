//! Sending a message with Python's `smtplib`, a real SMTP client nobody here wrote, for the
//! end-to-end tests. Each test file supplies the head of the script (how the message is built:
//! it must set `port, sender, rcpts, spec, dump` from argv, put the bytes in `data` and write
//! them to `dump`); the send, the error handling and the JSON report are shared. Optional spec
//! keys for the send: `"starttls": "<CA file>"` (through `starttls()`, verifying against it),
//! `"auth": [user, password, mechanism]` (`PLAIN` or `LOGIN`, forced), `"mail_options": [...]`
//! (e.g. `BODY=8BITMIME`, `SMTPUTF8`).

#![allow(dead_code)]

use std::fs::File;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::TempDir;

/// The end of every script: send `data`, report what smtplib saw as one JSON line.
const SEND: &str = r#"
def text(b):
    return b.decode("utf-8", "replace") if isinstance(b, bytes) else str(b)

source = (spec["source"], 0) if spec.get("source") else None
try:
    with smtplib.SMTP("127.0.0.1", int(port), local_hostname="client.test", timeout=20,
                      source_address=source) as s:
        if spec.get("starttls"):
            import ssl
            s.starttls(context=ssl.create_default_context(cafile=spec["starttls"]))
        if spec.get("auth"):
            user, password, mechanism = spec["auth"]
            s.ehlo_or_helo_if_needed()
            s.user, s.password = user, password
            s.auth(mechanism, getattr(s, "auth_" + mechanism.lower()))
        refused = s.sendmail(sender, rcpts.split(","), data,
                             mail_options=spec.get("mail_options", []))
    out = {"status": "ok", "refused": {k: [c, text(m)] for k, (c, m) in refused.items()}}
except smtplib.SMTPDataError as e:
    out = {"status": "data", "code": e.smtp_code, "msg": text(e.smtp_error)}
except smtplib.SMTPSenderRefused as e:
    out = {"status": "sender", "code": e.smtp_code, "msg": text(e.smtp_error)}
except smtplib.SMTPRecipientsRefused as e:
    out = {"status": "rcpts", "refused": {k: [c, text(m)] for k, (c, m) in e.recipients.items()}}
except smtplib.SMTPResponseException as e:
    out = {"status": "response", "code": e.smtp_code, "msg": text(e.smtp_error)}
except (smtplib.SMTPException, OSError) as e:
    out = {"status": "disconnected", "msg": repr(e)}
print(json.dumps(out))
"#;

/// What one smtplib run did.
pub struct Sent {
    /// `ok`, `data`, `sender`, `rcpts`, `response` or `disconnected`.
    pub status: String,
    pub code: u16,
    pub msg: String,
    /// Recipients refused, as `address -> "code text"`, sorted.
    pub refused: Vec<(String, String)>,
    /// The exact message bytes smtplib was given.
    pub data: Vec<u8>,
}

impl std::fmt::Debug for Sent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "smtplib {} {} {:?} refused {:?} ({} bytes)",
            self.status,
            self.code,
            self.msg,
            self.refused,
            self.data.len()
        )
    }
}

impl Sent {
    /// The reply smtplib got, as `code text`.
    pub fn reply(&self) -> String {
        format!("{} {}", self.code, self.msg)
    }

    /// The reply as the guard wrote it, line ending included.
    pub fn reply_line(&self) -> String {
        format!("{}\r\n", self.reply())
    }
}

/// Runs `head` + the shared send with `python3` (bounded: smtplib's own 20 s timeout, and a
/// kill after 60 s). `label` names the run in failure messages.
#[track_caller]
pub fn send(
    head: &str,
    addr: SocketAddr,
    from: &str,
    rcpts: &str,
    spec: &Value,
    label: &str,
) -> Sent {
    let dir = TempDir::new();
    let dump = dir.path.join("sent.eml");
    let out_path = dir.path.join("stdout.json");
    let err_path = dir.path.join("stderr.txt");
    let mut child = Command::new("python3")
        .arg("-c")
        .arg(format!("{head}{SEND}"))
        .arg(addr.port().to_string())
        .arg(from)
        .arg(rcpts)
        .arg(spec.to_string())
        .arg(&dump)
        .stdin(Stdio::null())
        .stdout(File::create(&out_path).unwrap())
        .stderr(File::create(&err_path).unwrap())
        .spawn()
        .expect("python3 is needed by this test");
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for python3") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("python3 smtplib still running after 60 s ({label})");
        }
        thread::sleep(Duration::from_millis(10));
    };
    let stdout = std::fs::read_to_string(&out_path).unwrap_or_default();
    let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
    assert!(
        status.success(),
        "python3 failed ({status}) for {label}: {stderr}"
    );
    let v: Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("smtplib output {stdout:?}: {e}; stderr {stderr}"));
    let mut refused: Vec<(String, String)> = v["refused"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, r)| {
                    (
                        k.clone(),
                        format!("{} {}", r[0], r[1].as_str().unwrap_or("")),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    refused.sort();
    Sent {
        status: v["status"].as_str().unwrap_or_default().to_string(),
        code: v["code"].as_u64().unwrap_or(0) as u16,
        msg: v["msg"].as_str().unwrap_or_default().to_string(),
        refused,
        data: std::fs::read(&dump).expect("the bytes smtplib sent"),
    }
}
