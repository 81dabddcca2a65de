//! The operator's command line: `mailguard check`, the config file (flags win over it), its
//! one-line startup errors, and the files in contrib/ (the example policy and config, the
//! systemd unit).

mod ops_common;

use std::net::TcpListener;
use std::path::Path;
use std::process::Command;

use mailguard::config::{describe, Policy};
use ops_common::*;

fn contrib(name: &str) -> String {
    format!("{}/contrib/{name}", env!("CARGO_MANIFEST_DIR"))
}

#[track_caller]
fn assert_one_line(stderr: &str) {
    let trimmed = stderr.strip_suffix('\n').unwrap_or(stderr);
    assert!(!trimmed.is_empty() && !trimmed.contains('\n'), "{stderr:?}");
}

#[test]
fn check_prints_every_key_of_the_effective_policy() {
    let dir = Dir::new();
    let text = "max_recipients = 7\nrelay_domains = [\"example.com\", \"*.example.org\"]\n";
    let path = dir.write("policy.toml", text);
    let (status, out, err) = run_to_exit(&["check".into(), "--policy".into(), arg(&path)]);
    assert!(status.success(), "{status}: {err}");
    assert!(err.is_empty(), "{err}");
    // Every key, with its value or as unset, and its default.
    for s in describe::settings(&Policy::default()) {
        let shown = out.lines().any(|l| {
            (l.starts_with(&format!("{} = ", s.key))
                || l.starts_with(&format!("# {} unset", s.key)))
                && l.contains("# default: ")
        });
        assert!(shown, "{} missing from:\n{out}", s.key);
    }
    assert!(out.contains("max_recipients = 7 "), "{out}");
    // The output is itself the same policy.
    let again = Policy::parse(&out, "check output").expect("check output parses");
    assert_eq!(again, Policy::load(&path).expect("policy"));
}

#[test]
fn check_refuses_an_invalid_policy_in_one_line() {
    let dir = Dir::new();
    let path = dir.write("policy.toml", "mode = \"modern\"\nbogus_key = 1\n");
    let (status, out, err) = run_to_exit(&["check".into(), "--policy".into(), arg(&path)]);
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(out.is_empty(), "{out}");
    assert_one_line(&err);
    assert!(
        err.contains(&format!("{}:2:1: unknown field `bogus_key`", arg(&path))),
        "{err}"
    );
}

#[test]
fn check_validates_a_config_file_and_its_policy_table() {
    let dir = Dir::new();
    let good = dir.write(
        "good.toml",
        "listen = \"127.0.0.1:25\"\nupstream = \"127.0.0.1:2525\"\ndrain_timeout = 5\n[policy]\nmax_recipients = 3\n",
    );
    let (status, out, err) = run_to_exit(&["check".into(), "--config".into(), arg(&good)]);
    assert!(status.success(), "{err}");
    assert!(out.contains("#   drain_timeout = 5"), "{out}");
    assert!(out.contains("max_recipients = 3 "), "{out}");
    let bad = dir.write(
        "bad.toml",
        "listen = \"127.0.0.1:25\"\n[policy]\nmax_recipients = \"x\"\n",
    );
    let (status, _, err) = run_to_exit(&["check".into(), "--config".into(), arg(&bad)]);
    assert_eq!(status.code(), Some(1));
    assert_one_line(&err);
    assert!(err.contains(&format!("{}:3:18:", arg(&bad))), "{err}");
}

#[test]
fn the_example_files_in_contrib_are_valid() {
    let (status, out, err) =
        run_to_exit(&["check".into(), "--config".into(), contrib("mailguard.toml")]);
    assert!(status.success(), "{err}");
    assert!(out.contains("contrib/policy.toml is valid"), "{out}");
    // Every key is in the example policy, commented; uncommented, they make a valid policy.
    let text = std::fs::read_to_string(contrib("policy.toml")).expect("contrib/policy.toml");
    let uncommented: String = text
        .lines()
        .filter_map(|l| l.strip_prefix('#'))
        .filter(|l| l.contains(" = ") && !l.starts_with(' '))
        .map(|l| format!("{l}\n"))
        .collect();
    let p = Policy::parse(&uncommented, "contrib/policy.toml uncommented").expect("valid");
    let keys: Vec<&str> = uncommented
        .lines()
        .filter_map(|l| l.split(" = ").next())
        .collect();
    for s in describe::settings(&p) {
        assert!(keys.contains(&s.key), "contrib/policy.toml lacks {}", s.key);
    }
}

#[test]
fn a_config_file_runs_the_proxy_and_flags_override_it() {
    let sink = Sink::start();
    let dir = Dir::new();
    let unused = format!("127.0.0.1:{}", free_port());
    let config = dir.write(
        "mailguard.toml",
        &format!(
            "listen = \"{unused}\"\nupstream = \"{}\"\nthreads = 1\n[policy]\nmax_recipients = 1\n",
            sink.addr
        ),
    );
    let listen = format!("127.0.0.1:{}", free_port());
    let p = Proc::start(
        listen.parse().expect("addr"),
        &[
            "--config".into(),
            arg(&config),
            "--listen".into(),
            listen.clone(),
        ],
        &[],
    );
    assert!(p.log().contains("workers=1"), "{}", p.log());
    let mut c = Smtp::greeted(p.addr);
    c.expect("EHLO cfg.test", 250);
    c.expect("MAIL FROM:<a@example.test>", 250);
    c.expect("RCPT TO:<b@example.test>", 250);
    c.expect("RCPT TO:<c@example.test>", 452);
}

#[test]
fn startup_errors_of_the_config_file_are_one_line() {
    let dir = Dir::new();
    let bad = dir.write("bad.toml", "listen = \"127.0.0.1:25\"\nthreads = 0\n");
    let (status, _, err) = run_to_exit(&["--config".into(), arg(&bad)]);
    assert_eq!(status.code(), Some(1));
    assert_one_line(&err);
    assert!(
        err.contains(&format!("{}:2:11: threads must be", arg(&bad))),
        "{err}"
    );
    let missing = dir.path.join("missing.toml");
    let (status, _, err) = run_to_exit(&["--config".into(), arg(&missing)]);
    assert_eq!(status.code(), Some(1));
    assert_one_line(&err);
    assert!(err.contains(&arg(&missing)), "{err}");
    let partial = dir.write("partial.toml", "upstream = \"127.0.0.1:2525\"\n");
    let (status, _, err) = run_to_exit(&["--config".into(), arg(&partial)]);
    assert_eq!(status.code(), Some(2));
    assert_one_line(&err);
    assert!(err.contains("--listen"), "{err}");
}

#[test]
fn a_metrics_port_in_use_is_one_line() {
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
    let metrics = taken.local_addr().expect("addr").to_string();
    let sink = Sink::start();
    let (_, args) = base_args(sink.addr, &["--metrics", &metrics]);
    let (status, _, err) = run_to_exit(&args);
    assert_eq!(status.code(), Some(1));
    assert_one_line(&err);
    assert!(
        err.contains(&format!("cannot serve metrics on {metrics}")),
        "{err}"
    );
}

#[test]
fn the_systemd_unit_passes_systemd_analyze_verify() {
    let Ok(version) = Command::new("systemd-analyze").arg("--version").output() else {
        eprintln!("systemd-analyze not installed (apt-get install systemd); skipping");
        return;
    };
    assert!(version.status.success());
    let unit = std::fs::read_to_string(contrib("mailguard.service")).expect("unit");
    // verify checks that ExecStart's binary exists: point it at the one under test.
    let unit = unit.replace("/usr/local/bin/mailguard", bin());
    let dir = Dir::new();
    let path = dir.write("mailguard.service", &unit);
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze verify");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{said}");
    // Unknown keys and bad values are only warnings: there must be none.
    let ours: Vec<&str> = said
        .lines()
        .filter(|l| l.contains(Path::new(&path).to_str().unwrap_or("mailguard.service")))
        .collect();
    assert!(ours.is_empty(), "{said}");
    for key in [
        "Type=notify",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "LimitNOFILE=",
        "LimitMEMLOCK=",
        "AmbientCapabilities=CAP_NET_BIND_SERVICE",
    ] {
        assert!(unit.contains(key), "the unit lacks {key}");
    }
}
