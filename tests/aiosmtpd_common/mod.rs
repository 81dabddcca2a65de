//! aiosmtpd (Python) as a real upstream for the end-to-end tests: a small controller script,
//! started by the test on a free loopback port and killed by its PID on drop, that writes each
//! message it accepts to `NNNN.eml` (the exact bytes aiosmtpd received: dot-stuffing undone,
//! CRLF line endings kept, nothing added) and then `NNNN.json` (envelope: sender, recipients,
//! MAIL parameters, SMTPUTF8, the AUTH login), both before it answers 250. It offers SMTPUTF8,
//! 8BITMIME and AUTH PLAIN/LOGIN without TLS (user `user`, password `secret`); aiosmtpd has no
//! PIPELINING or CHUNKING.
//!
//! Needs `python3` with `aiosmtpd` (`.ci/run` installs it); without it a test fails and says
//! so. This module knows nothing of the guard.

#![allow(dead_code)]

use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::common::{free_port, wait_for, TempDir, WAIT};

pub const AUTH_USER: &str = "user";
pub const AUTH_PASSWORD: &str = "secret";

/// argv: port, output directory. Files are renamed into place so a reader never sees half.
const SCRIPT: &str = r#"
import json, os, signal, sys
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult

port, outdir = int(sys.argv[1]), sys.argv[2]
count = 0

def put(name, data):
    with open(os.path.join(outdir, name + ".tmp"), "wb") as f:
        f.write(data)
    os.rename(os.path.join(outdir, name + ".tmp"), os.path.join(outdir, name))

class Handler:
    async def handle_DATA(self, server, session, envelope):
        global count
        count += 1
        login = session.auth_data.login.decode() if session.authenticated else None
        meta = {"mail_from": envelope.mail_from, "rcpt_tos": envelope.rcpt_tos,
                "mail_options": envelope.mail_options, "smtputf8": envelope.smtp_utf8,
                "auth": login}
        put("%04d.eml" % count, envelope.original_content)
        put("%04d.json" % count, json.dumps(meta).encode())
        return "250 2.0.0 OK queued as %d" % count

def authenticator(server, session, envelope, mechanism, auth_data):
    ok = auth_data.login == b"user" and auth_data.password == b"secret"
    return AuthResult(success=ok, handled=False, auth_data=auth_data)

controller = Controller(Handler(), hostname="127.0.0.1", port=port, enable_SMTPUTF8=True,
                        auth_require_tls=False, authenticator=authenticator,
                        decode_data=False, server_hostname="aiosmtpd.test")
controller.start()
signal.sigwait([signal.SIGTERM, signal.SIGINT])
controller.stop()
"#;

/// One message aiosmtpd accepted.
#[derive(Debug, Clone)]
pub struct AioMessage {
    pub mail_from: String,
    pub rcpt_tos: Vec<String>,
    pub mail_options: Vec<String>,
    pub smtputf8: bool,
    /// The login of the session's successful AUTH, if any.
    pub auth: Option<String>,
    /// The exact bytes received.
    pub data: Vec<u8>,
}

/// The running controller script.
pub struct Aiosmtpd {
    child: Child,
    dir: TempDir,
    pub addr: SocketAddr,
}

impl Aiosmtpd {
    #[track_caller]
    pub fn start() -> Aiosmtpd {
        let dir = TempDir::new();
        let out = dir.path.join("out");
        std::fs::create_dir_all(&out).expect("create the aiosmtpd output directory");
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let child = Command::new("python3")
            .arg("-c")
            .arg(SCRIPT)
            .arg(addr.port().to_string())
            .arg(&out)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::File::create(dir.path.join("stderr")).expect("aiosmtpd stderr file"),
            ))
            .spawn()
            .expect("python3 is needed for aiosmtpd (.ci/run installs it)");
        let mut a = Aiosmtpd { child, dir, addr };
        let up = wait_for(WAIT, || {
            TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
        });
        let exited = a.child.try_wait().ok().flatten();
        assert!(
            up && exited.is_none(),
            "aiosmtpd did not start (install it as .ci/run does: pip install aiosmtpd): {}",
            a.stderr()
        );
        a
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path.join("stderr")).unwrap_or_default()
    }

    /// Every message accepted so far, in order.
    pub fn messages(&self) -> Vec<AioMessage> {
        let out = self.dir.path.join("out");
        let mut names: Vec<String> = std::fs::read_dir(&out)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.ends_with(".json"))
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names.iter().map(|n| read_message(&out.join(n))).collect()
    }
}

fn read_message(json: &std::path::Path) -> AioMessage {
    let text = std::fs::read_to_string(json).expect("read an aiosmtpd envelope file");
    let v: Value = serde_json::from_str(&text).expect("aiosmtpd envelope JSON");
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    };
    AioMessage {
        mail_from: v["mail_from"].as_str().unwrap_or_default().to_string(),
        rcpt_tos: strings(&v["rcpt_tos"]),
        mail_options: strings(&v["mail_options"]),
        smtputf8: v["smtputf8"].as_bool().unwrap_or(false),
        auth: v["auth"].as_str().map(String::from),
        data: std::fs::read(json.with_extension("eml")).expect("read an aiosmtpd message"),
    }
}

impl Drop for Aiosmtpd {
    fn drop(&mut self) {
        // Our own child, by its PID.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
