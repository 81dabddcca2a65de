//! The command line: flags, policy files, startup failures (one line on stderr, non-zero
//! exit) and the address forms the guard listens on.

mod common;

use common::*;
use std::net::TcpListener;

fn upstream_arg() -> String {
    // Startup errors must not depend on the upstream: nothing needs to listen there.
    Upstream::refused_addr().to_string()
}

fn listen_arg() -> String {
    format!("127.0.0.1:{}", free_port())
}

#[test]
fn unknown_flag_is_one_line_and_nonzero() {
    let (l, u) = (listen_arg(), upstream_arg());
    let (status, err) = run_to_exit(&["--listen", &l, "--upstream", &u, "--bogus-flag"]);
    assert_one_line_failure(status, &err);
}

#[test]
fn missing_upstream_is_one_line_and_nonzero() {
    let l = listen_arg();
    let (status, err) = run_to_exit(&["--listen", &l]);
    assert_one_line_failure(status, &err);
}

#[test]
fn missing_listen_is_one_line_and_nonzero() {
    let u = upstream_arg();
    let (status, err) = run_to_exit(&["--upstream", &u]);
    assert_one_line_failure(status, &err);
}

#[test]
fn no_arguments_is_one_line_and_nonzero() {
    let (status, err) = run_to_exit(&[]);
    assert_one_line_failure(status, &err);
}

#[test]
fn bad_listen_address_is_one_line_and_nonzero() {
    let u = upstream_arg();
    for bad in ["nonsense", "127.0.0.1", "127.0.0.1:99999", "[::1:25"] {
        let (status, err) = run_to_exit(&["--listen", bad, "--upstream", &u]);
        assert_one_line_failure(status, &err);
    }
}

#[test]
fn bad_upstream_address_is_one_line_and_nonzero() {
    let l = listen_arg();
    let (status, err) = run_to_exit(&["--listen", &l, "--upstream", "no-port-here"]);
    assert_one_line_failure(status, &err);
}

#[test]
fn bad_thread_count_is_one_line_and_nonzero() {
    let (l, u) = (listen_arg(), upstream_arg());
    let (status, err) = run_to_exit(&["--listen", &l, "--upstream", &u, "--threads", "many"]);
    assert_one_line_failure(status, &err);
}

#[test]
fn unreadable_policy_is_one_line_naming_the_file() {
    let dir = TempDir::new();
    let missing = dir.path.join("does-not-exist.toml");
    let missing = path_str(&missing);
    let (l, u) = (listen_arg(), upstream_arg());
    let (status, err) = run_to_exit(&["--listen", &l, "--upstream", &u, "--policy", &missing]);
    assert_one_line_failure(status, &err);
    assert!(
        err.contains(&missing),
        "stderr should name {missing}: {err:?}"
    );
}

/// Runs the guard with a policy file holding `text`; expects a one-line failure naming
/// `file:line:column` (and `extra`, if given).
fn policy_failure(text: &str, line: usize, column: usize, extra: &str) {
    let dir = TempDir::new();
    let p = dir.write("bad-policy.toml", text.as_bytes());
    let p = path_str(&p);
    let (l, u) = (listen_arg(), upstream_arg());
    let (status, err) = run_to_exit(&["--listen", &l, "--upstream", &u, "--policy", &p]);
    assert_one_line_failure(status, &err);
    let want = format!("{p}:{line}:{column}");
    assert!(err.contains(&want), "stderr should name {want}: {err:?}");
    assert!(
        err.contains(extra),
        "stderr should mention {extra:?}: {err:?}"
    );
}

#[test]
fn unknown_policy_key_is_refused_with_line_and_column() {
    policy_failure("mode = \"modern\"\nbogus_key = 1\n", 2, 1, "bogus_key");
}

#[test]
fn invalid_policy_value_is_refused_with_line_and_column() {
    policy_failure("mode = \"pix\"\n", 1, 8, "pix");
    policy_failure("\nmax_recipients = \"ten\"\n", 2, 18, "");
    policy_failure("mask_banner = \"yes\"\n", 1, 15, "");
    policy_failure("bare_lf = \"keep\"\n", 1, 11, "keep");
    policy_failure("starttls = \"drop\"\n", 1, 12, "drop");
    policy_failure("blocked_reply = \"maybe\"\n", 1, 17, "maybe");
    policy_failure("allow = [\"MAIL\", \"X-1\"]\n", 1, 9, "X-1");
    policy_failure("max_line_length = 10\n", 1, 19, "");
    policy_failure("hard_error_limit = 0\n", 1, 20, "");
}

#[test]
fn invalid_policy_syntax_is_refused_with_line_and_column() {
    policy_failure("mode = \"modern\"\nmax_recipients = \n", 2, 18, "");
}

#[test]
fn port_in_use_is_one_line_and_nonzero() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let l = taken.local_addr().unwrap().to_string();
    let u = upstream_arg();
    let (status, err) = run_to_exit(&["--listen", &l, "--upstream", &u, "--threads", "2"]);
    assert_one_line_failure(status, &err);
    drop(taken);
}

#[test]
fn starts_without_policy_and_relays_the_banner() {
    let up = Upstream::start();
    let g = Guard::start(up.addr, None);
    let mut c = g.client();
    c.greeting
        .as_ref()
        .unwrap()
        .expect_raw(&format!("220 {BANNER}\r\n"));
    c.cmd("QUIT").expect_code(221);
}

#[test]
fn starts_with_every_policy_key_set() {
    let policy = r#"
mode = "modern"
allow = ["HELO", "EHLO", "MAIL", "RCPT", "DATA", "RSET", "NOOP", "QUIT"]
blocked_reply = "reject"
mask_banner = false
extensions = ["PIPELINING", "SIZE", "8BITMIME"]
max_recipients = 10
max_message_size = 1000000
max_line_length = 1000
bare_lf = "normalize"
starttls = "strip"
check_addresses = true
hard_error_limit = 5
greeting_timeout = 60
command_timeout = 60
data_timeout = 60
final_timeout = 60
"#;
    let up = Upstream::start();
    let g = Guard::start(up.addr, Some(policy));
    let mut c = g.client();
    let r = c.ehlo();
    assert_eq!(
        r.lines,
        vec!["upstream.test", "PIPELINING", "SIZE 52428800", "8BITMIME"]
    );
    c.cmd("QUIT").expect_code(221);
}

#[test]
fn empty_policy_file_means_defaults() {
    let up = Upstream::start();
    let g = Guard::start(up.addr, Some(""));
    let mut c = g.client();
    let r = c.ehlo();
    assert_eq!(r.lines, ehlo_lines_without(&["ETRN", "XCLIENT"]));
    c.cmd("QUIT").expect_code(221);
}

#[test]
fn listens_on_an_ipv6_loopback_address() {
    if TcpListener::bind("[::1]:0").is_err() {
        eprintln!("no IPv6 loopback here; skipping");
        return;
    }
    let port = {
        let l = TcpListener::bind("[::1]:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let up = Upstream::start();
    let listen = format!("[::1]:{port}");
    let g = Guard::spawn(&listen, &up.addr.to_string(), None, &["--threads", "2"])
        .unwrap_or_else(|e| panic!("mailguard did not start on {listen}: {e}"));
    let mut c = g.client();
    c.ehlo();
    c.cmd("QUIT").expect_code(221);
}

#[test]
fn one_thread_works() {
    let up = Upstream::start();
    let listen = format!("127.0.0.1:{}", free_port());
    let g = Guard::spawn(&listen, &up.addr.to_string(), None, &["--threads", "1"])
        .unwrap_or_else(|e| panic!("mailguard did not start: {e}"));
    let mut a = g.client();
    let mut b = g.client();
    a.ehlo();
    b.ehlo();
    a.cmd("QUIT").expect_code(221);
    b.cmd("QUIT").expect_code(221);
}
