//! A private Postfix instance for the end-to-end tests: its own config and queue directory
//! under a temp dir, an smtpd on a free loopback port in 30000-39999, started with
//! `postfix -c DIR start` and stopped with `postfix -c DIR stop` (its master killed by the PID
//! in its own pid file if that fails). The system Postfix is never touched.
//!
//! Two roles, chosen with [`PostfixBuilder`]:
//! - a receiving upstream (the default): every message its smtpd accepts waits in the hold
//!   queue, so [`Postfix::queue`] lists exactly what it accepted and [`Postfix::message`] /
//!   [`Postfix::body`] read one back with `postcat`;
//! - a relaying client ([`PostfixBuilder::relayhost`]): mail handed to [`Postfix::sendmail`]
//!   goes out through Postfix's own SMTP client to that host.
//!
//! main.cf overrides ([`PostfixBuilder::set`]) replace the base setting of the same name (or are
//! added): `smtpd_authorized_xclient_hosts`, `smtpd_upstream_proxy_protocol`, TLS, etc.
//! [`PostfixBuilder::sasl`] makes the smtpd offer AUTH PLAIN and LOGIN through Cyrus SASL with a
//! sasldb file of its own (no saslauthd, nothing shared with the system).
//!
//! Needs the Debian package `postfix` (`.ci/run` installs it; `sasl2-bin` and
//! `libsasl2-modules` for SASL) and root (Postfix's master runs
//! as root). Without them a test fails and says so; it never passes silently. This module owns
//! no SMTP logic of its own and never touches the guard.

#![allow(dead_code)]

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::common::{wait_for, TempDir, WAIT};

pub const POSTFIX: &str = "/usr/sbin/postfix";
const HOW: &str = "install it as .ci/run does: apt-get install -y postfix";

/// One message in a Postfix queue.
#[derive(Debug, Clone)]
pub struct Queued {
    pub id: String,
    pub sender: String,
    pub recipients: Vec<String>,
}

/// Runs a command; (success, stdout then stderr as text).
pub fn run(cmd: &mut Command) -> (bool, String) {
    let (ok, out, err) = run_bytes(cmd);
    let mut s = String::from_utf8_lossy(&out).into_owned();
    s.push_str(&String::from_utf8_lossy(&err));
    (ok, s)
}

/// Runs a command; (success, stdout, stderr) as bytes.
fn run_bytes(cmd: &mut Command) -> (bool, Vec<u8>, Vec<u8>) {
    run_bounded(cmd, None)
}

/// Longest a Postfix command (postqueue, postcat, sendmail, postfix) may take.
const COMMAND_LIMIT: Duration = Duration::from_secs(60);

/// Runs a command with `stdin` (or none), killed by its PID after [`COMMAND_LIMIT`] (a wedged
/// instance must fail the test, not hang it); output goes through files, so a large one
/// cannot block the child. (success, stdout, stderr).
fn run_bounded(cmd: &mut Command, stdin: Option<&[u8]>) -> (bool, Vec<u8>, Vec<u8>) {
    use std::io::Write;
    let dir = TempDir::new();
    let (out, err) = (dir.path.join("stdout"), dir.path.join("stderr"));
    let files = std::fs::File::create(&out).and_then(|o| Ok((o, std::fs::File::create(&err)?)));
    let Ok((o, e)) = files else {
        return (false, Vec::new(), b"cannot create output files".to_vec());
    };
    let stdin_cfg = if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    };
    let mut child = match cmd.stdin(stdin_cfg).stdout(o).stderr(e).spawn() {
        Ok(c) => c,
        Err(e) => return (false, Vec::new(), e.to_string().into_bytes()),
    };
    if let (Some(bytes), Some(mut pipe)) = (stdin, child.stdin.take()) {
        let _ = pipe.write_all(bytes);
    }
    let mut status = None;
    wait_for(COMMAND_LIMIT, || {
        status = child.try_wait().ok().flatten();
        status.is_some()
    });
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let ok = status.is_some_and(|s| s.success());
    let mut stderr = std::fs::read(&err).unwrap_or_default();
    if status.is_none() {
        stderr.extend_from_slice(format!("killed after {COMMAND_LIMIT:?}").as_bytes());
    }
    (ok, std::fs::read(&out).unwrap_or_default(), stderr)
}

/// A port in 30000-39999 that was free a moment ago (away from the ephemeral range the other
/// tests' `free_port` draws from, so a Postfix port is not taken between check and bind).
pub fn free_port_in_range() -> u16 {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0) as usize
        + std::process::id() as usize * 7919;
    for i in 0..10_000 {
        let port = 30_000 + ((seed + i * 104_729) % 10_000) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in 30000-39999");
}

/// Whether this Postfix knows parameter `name`.
pub fn postconf_knows(name: &str) -> bool {
    let (ok, out) = run(Command::new("postconf").arg("-d").arg(name));
    ok && out.starts_with(name)
}

/// The one realm of [`PostfixBuilder::sasl`] accounts (`smtpd_sasl_local_domain`).
const SASL_REALM: &str = "sasl.test.invalid";

/// How to start a private instance.
#[derive(Default)]
pub struct PostfixBuilder {
    overrides: Vec<(String, String)>,
    relayhost: Option<SocketAddr>,
    sasl: Option<(String, String)>,
}

impl PostfixBuilder {
    pub fn new() -> PostfixBuilder {
        PostfixBuilder::default()
    }

    /// main.cf `param = value`, replacing the base setting of that name if there is one.
    pub fn set(mut self, param: &str, value: &str) -> PostfixBuilder {
        self.overrides.push((param.to_string(), value.to_string()));
        self
    }

    /// `set` only if this Postfix version knows `param` (newer hardening knobs).
    pub fn set_if_known(self, param: &str, value: &str) -> PostfixBuilder {
        if postconf_knows(param) {
            self.set(param, value)
        } else {
            self
        }
    }

    /// As lenient as this version goes: a bare LF ends a line (the pre-2024 behaviour that made
    /// Postfix an SMTP-smuggling receiver, CVE-2023-51764), and no pipelining check.
    pub fn lenient(self) -> PostfixBuilder {
        self.set_if_known("smtpd_forbid_bare_newline", "no")
            .set_if_known("smtpd_forbid_unauth_pipelining", "no")
    }

    /// Clients from these hosts may send XCLIENT (`smtpd_authorized_xclient_hosts`).
    pub fn xclient_hosts(self, hosts: &str) -> PostfixBuilder {
        self.set("smtpd_authorized_xclient_hosts", hosts)
    }

    /// The smtpd expects a PROXY header (`smtpd_upstream_proxy_protocol = haproxy`).
    pub fn proxy_protocol(self) -> PostfixBuilder {
        self.set("smtpd_upstream_proxy_protocol", "haproxy")
    }

    /// The smtpd offers STARTTLS with this certificate and key (PEM files).
    pub fn tls(self, cert: &Path, key: &Path) -> PostfixBuilder {
        self.set("smtpd_tls_cert_file", &cert.display().to_string())
            .set("smtpd_tls_key_file", &key.display().to_string())
            .set("smtpd_tls_security_level", "may")
    }

    /// The smtpd offers AUTH PLAIN and LOGIN, in clear too (loopback only), and knows one
    /// account; [`Postfix::sasl_username`] tells which account sent a message.
    pub fn sasl(mut self, user: &str, password: &str) -> PostfixBuilder {
        self.sasl = Some((user.to_string(), password.to_string()));
        self
    }

    /// A relaying client: mail from [`Postfix::sendmail`] goes to `host` with Postfix's SMTP
    /// client (`relayhost = [ip]:port`, no MX lookup).
    pub fn relayhost(mut self, host: SocketAddr) -> PostfixBuilder {
        self.relayhost = Some(host);
        self
    }

    #[track_caller]
    pub fn start(mut self) -> Postfix {
        assert_can_run();
        let dir = TempDir::new();
        let port = free_port_in_range();
        make_dirs(&dir);
        if let Some((user, password)) = self.sasl.take() {
            self = self.sasl_server(&dir, &user, &password);
        }
        dir.write("main.cf", self.main_cf(&dir.path).as_bytes());
        dir.write(
            "master.cf",
            master_cf(port, self.relayhost.is_some()).as_bytes(),
        );
        let mut pf = Postfix {
            dir,
            port,
            running: false,
        };
        let (ok, out) = run(Command::new(POSTFIX)
            .arg("-c")
            .arg(&pf.dir.path)
            .arg("start"));
        pf.running = true;
        let listening = wait_for(WAIT, || {
            TcpStream::connect_timeout(&pf.addr(), Duration::from_millis(200)).is_ok()
        });
        assert!(
            ok && listening,
            "private Postfix did not start (exit ok: {ok}): {out}\nlog: {}",
            pf.log()
        );
        pf
    }

    /// Cyrus SASL for the smtpd: `DIR/sasl/smtpd.conf` (the name Cyrus derives from
    /// `smtpd_sasl_path = smtpd`) checking passwords against `DIR/sasl/sasldb2` itself (auxprop),
    /// so no saslauthd runs. The smtpd is not chrooted here (master.cf), so the absolute path
    /// holds; it runs as `postfix`, which must read the file. Every account lives in one realm
    /// set on both sides, so nothing depends on how Cyrus would guess it from the host name.
    #[track_caller]
    fn sasl_server(self, dir: &TempDir, user: &str, password: &str) -> PostfixBuilder {
        let conf = dir.path.join("sasl");
        std::fs::create_dir_all(&conf).expect("create the SASL config directory");
        let db = conf.join("sasldb2");
        let (ok, out, err) = run_bounded(
            Command::new("saslpasswd2")
                .arg("-f")
                .arg(&db)
                .args(["-p", "-c", "-u", SASL_REALM, user]),
            Some(password.as_bytes()),
        );
        assert!(
            ok,
            "saslpasswd2 (install it as .ci/run does: apt-get install -y sasl2-bin \
             libsasl2-modules): {}{}",
            String::from_utf8_lossy(&out),
            String::from_utf8_lossy(&err)
        );
        let (ok, out) = run(Command::new("chown").arg("postfix").arg(&db));
        assert!(ok, "chown postfix {}: {out}", db.display());
        std::fs::write(
            conf.join("smtpd.conf"),
            format!(
                "pwcheck_method: auxprop\nauxprop_plugin: sasldb\nmech_list: PLAIN LOGIN\n\
                 sasldb_path: {}\n",
                db.display()
            ),
        )
        .expect("write smtpd.conf");
        self.set("smtpd_sasl_auth_enable", "yes")
            .set("smtpd_sasl_path", "smtpd")
            .set("smtpd_sasl_type", "cyrus")
            .set("cyrus_sasl_config_path", &conf.display().to_string())
            .set("smtpd_sasl_local_domain", SASL_REALM)
            .set("smtpd_sasl_security_options", "noanonymous")
            .set("smtpd_tls_auth_only", "no")
    }

    fn main_cf(&self, d: &Path) -> String {
        let mut main = format!(
            "compatibility_level = 3.6
queue_directory = {q}
data_directory = {data}
command_directory = /usr/sbin
daemon_directory = /usr/lib/postfix/sbin
shlib_directory = /usr/lib/postfix
meta_directory = /etc/postfix
mail_owner = postfix
setgid_group = postdrop
myhostname = postfix.test.invalid
mydomain = test.invalid
myorigin = $myhostname
mydestination =
inet_interfaces = loopback-only
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_banner = $myhostname ESMTP
maillog_file = {log}
maillog_file_prefixes = {tmp}
smtpd_peername_lookup = no
in_flow_delay = 0
smtpd_error_sleep_time = 0
smtpd_client_restrictions =
smtpd_recipient_restrictions = check_client_access static:HOLD, permit_mynetworks, reject
smtpd_relay_restrictions = permit_mynetworks, reject
local_header_rewrite_clients =
default_transport = discard
relay_transport = discard
alias_maps =
alias_database =
biff = no
",
            q = d.join("queue").display(),
            data = d.join("data").display(),
            log = d.join("maillog").display(),
            tmp = d.display(),
        );
        let mut params: Vec<(String, String)> = Vec::new();
        if let Some(host) = self.relayhost {
            params.push((
                "relayhost".into(),
                format!("[{}]:{}", host.ip(), host.port()),
            ));
            params.push(("default_transport".into(), "smtp".into()));
            params.push(("relay_transport".into(), "smtp".into()));
            params.push(("smtp_address_preference".into(), "ipv4".into()));
        }
        params.extend(self.overrides.iter().cloned());
        for (param, value) in &params {
            set_param(&mut main, param, value);
        }
        main
    }
}

/// Sets `param` in main.cf text: its line is replaced if there is one, else appended. Never a
/// second line for one parameter: every Postfix daemon warns about a duplicate when it reads
/// main.cf, postlogd included, and postlogd logging to itself while its datagram queue is full
/// (`net.unix.max_dgram_qlen` is 10 here) blocks it, and with it the whole instance.
fn set_param(main: &mut String, param: &str, value: &str) {
    let line = format!("{param} = {value}");
    let prefix = format!("{param} =");
    let mut found = false;
    let mut out: Vec<String> = main
        .lines()
        .map(|l| {
            if l.starts_with(&prefix) {
                found = true;
                line.clone()
            } else {
                l.to_string()
            }
        })
        .collect();
    if !found {
        out.push(line);
    }
    *main = out.join("\n") + "\n";
}

#[track_caller]
fn assert_can_run() {
    assert!(
        Path::new(POSTFIX).exists(),
        "Postfix is not installed ({POSTFIX} missing): {HOW}"
    );
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "a private Postfix instance needs root (its master binds and drops privileges)"
    );
}

fn make_dirs(dir: &TempDir) {
    let data = dir.path.join("data");
    std::fs::create_dir_all(dir.path.join("queue")).expect("create the queue directory");
    std::fs::create_dir_all(&data).expect("create the data directory");
    let (ok, out) = run(Command::new("chown").arg("postfix").arg(&data));
    assert!(ok, "chown postfix {}: {out}", data.display());
}

fn master_cf(port: u16, smtp_client: bool) -> String {
    let mut m = format!(
        "127.0.0.1:{port} inet n - n - - smtpd
pickup    unix  n - n 60 1 pickup
cleanup   unix  n - n - 0 cleanup
qmgr      unix  n - n 300 1 qmgr
rewrite   unix  - - n - - trivial-rewrite
bounce    unix  - - n - 0 bounce
defer     unix  - - n - 0 bounce
trace     unix  - - n - 0 bounce
verify    unix  - - n - 1 verify
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n - - proxymap
showq     unix  n - n - - showq
error     unix  - - n - - error
retry     unix  - - n - - error
discard   unix  - - n - - discard
anvil     unix  - - n - 1 anvil
scache    unix  - - n - 1 scache
postlog   unix-dgram n - n - 1 postlogd
tlsmgr    unix  - - n 1000? 1 tlsmgr
"
    );
    if smtp_client {
        m.push_str("smtp      unix  - - n - - smtp\nrelay     unix  - - n - - smtp\n");
    }
    m
}

/// A running private instance; stopped on drop.
pub struct Postfix {
    pub dir: TempDir,
    pub port: u16,
    running: bool,
}

impl Postfix {
    /// A receiving instance with the base settings.
    #[track_caller]
    pub fn start() -> Postfix {
        PostfixBuilder::new().start()
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path.join("maillog")).unwrap_or_default()
    }

    /// Every message in the queue (for a receiving instance: every message it accepted, all
    /// waiting in its hold queue).
    pub fn queue(&self) -> Vec<Queued> {
        let (ok, out) = run(Command::new("postqueue")
            .arg("-c")
            .arg(&self.dir.path)
            .arg("-j"));
        assert!(ok, "postqueue -j: {out}");
        out.lines()
            .filter(|l| l.starts_with('{'))
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l)
                    .unwrap_or_else(|e| panic!("postqueue -j line {l:?}: {e}"));
                let text = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_string();
                Queued {
                    id: text(&v["queue_id"]),
                    sender: text(&v["sender"]),
                    recipients: v["recipients"]
                        .as_array()
                        .map(|a| a.iter().map(|r| text(&r["address"])).collect())
                        .unwrap_or_default(),
                }
            })
            .collect()
    }

    /// The body of queued message `id`, as text (see [`Postfix::message`] for the bytes).
    pub fn body(&self, id: &str) -> String {
        String::from_utf8_lossy(&self.postcat("-bq", id)).into_owned()
    }

    /// Queued message `id` as `postcat -hbq` prints it: the header block (with Postfix's own
    /// Received line first), the empty line, the body. Postfix stores each line without its
    /// line ending and postcat ends each with LF, so the bytes are the message as received
    /// with CRLF turned into LF and dot-stuffing undone; nothing else changes.
    pub fn message(&self, id: &str) -> Vec<u8> {
        self.postcat("-hbq", id)
    }

    fn postcat(&self, flags: &str, id: &str) -> Vec<u8> {
        let (ok, out, err) = run_bytes(
            Command::new("postcat")
                .arg("-c")
                .arg(&self.dir.path)
                .arg(flags)
                .arg(id),
        );
        assert!(
            ok,
            "postcat {flags} {id}: {}",
            String::from_utf8_lossy(&err)
        );
        out
    }

    /// The SASL login the smtpd logged for queued message `id` (`sasl_username=` on its
    /// `client=` line, without the `@realm` the smtpd appends), `None` if that session did not
    /// authenticate. Waits (bounded) for the
    /// line, which postlogd may write a moment after the message was queued.
    pub fn sasl_username(&self, id: &str) -> Option<String> {
        let prefix = format!("{id}: client=");
        let mut line = None;
        wait_for(WAIT, || {
            line = self
                .log()
                .lines()
                .find(|l| l.contains(&prefix))
                .map(str::to_string);
            line.is_some()
        });
        let line = line.unwrap_or_else(|| panic!("no `{prefix}` line in\n{}", self.log()));
        let at = line.find("sasl_username=")? + "sasl_username=".len();
        let name = line[at..].split([',', ' ']).next().unwrap_or_default();
        let suffix = format!("@{SASL_REALM}");
        Some(name.strip_suffix(&suffix).unwrap_or(name).to_string())
    }

    /// Waits (bounded by `timeout`) until the queue holds `n` messages; returns them.
    pub fn wait_queue(&self, n: usize, timeout: Duration) -> Vec<Queued> {
        let mut q = Vec::new();
        wait_for(timeout, || {
            q = self.queue();
            q.len() >= n
        });
        q
    }

    /// Hands `message` (LF or CRLF lines) to this instance's `sendmail` for `to`, envelope
    /// sender `from`; `-i` so a lone dot line is data.
    #[track_caller]
    pub fn sendmail(&self, from: &str, to: &[&str], message: &[u8]) {
        self.sendmail_with(&[], from, to, message);
    }

    /// [`Postfix::sendmail`] with extra options, e.g. `-B 8BITMIME`.
    #[track_caller]
    pub fn sendmail_with(&self, options: &[&str], from: &str, to: &[&str], message: &[u8]) {
        let (ok, out, err) = run_bounded(
            Command::new("/usr/sbin/sendmail")
                .arg("-C")
                .arg(&self.dir.path)
                .arg("-i")
                .args(options)
                .arg("-f")
                .arg(from)
                .arg("--")
                .args(to),
            Some(message),
        );
        assert!(
            ok,
            "sendmail -C {}: {}{}",
            self.dir.path.display(),
            String::from_utf8_lossy(&out),
            String::from_utf8_lossy(&err)
        );
    }

    pub fn stop(&mut self) {
        if !self.running {
            return;
        }
        self.running = false;
        let (ok, _) = run(Command::new(POSTFIX)
            .arg("-c")
            .arg(&self.dir.path)
            .arg("stop"));
        let gone = ok
            && wait_for(WAIT, || {
                TcpStream::connect_timeout(&self.addr(), Duration::from_millis(100)).is_err()
            });
        if !gone {
            self.kill_master();
        }
    }

    /// Only this instance's master, by the PID in its own pid file.
    fn kill_master(&self) {
        let pid_file: PathBuf = self.dir.path.join("queue/pid/master.pid");
        if let Some(pid) = std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
        {
            // SAFETY: kill has no memory preconditions; the PID is our instance's master.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
        }
    }
}

impl Drop for Postfix {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Count of queued messages from `sender`.
pub fn count_sender(q: &[Queued], sender: &str) -> usize {
    q.iter().filter(|m| m.sender == sender).count()
}
