//! Certificates for the STARTTLS tests, made per test with `openssl req` in a TempDir: a test
//! CA, a server certificate for 127.0.0.1 (and `localhost`) signed by it, and a second,
//! unrelated CA; and the policy that makes the guard terminate TLS with them. Needs `openssl`
//! (`.ci/run` installs it). This module knows nothing of SMTP.

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Command, Stdio};

use crate::common::TempDir;

/// A test CA, a server certificate and key for 127.0.0.1 signed by it, and another CA.
pub struct Pki {
    dir: TempDir,
}

impl Pki {
    pub fn new() -> Pki {
        let dir = TempDir::new();
        let ext = dir.write(
            "server.ext",
            b"basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n\
              subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n\
              subjectAltName=IP:127.0.0.1,DNS:localhost\n",
        );
        let pki = Pki { dir };
        pki.openssl(
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
            ]
            .iter()
            .chain(&["-nodes", "-days", "2", "-subj", "/CN=mailguard test CA"])
            .chain(&["-keyout", "ca.key", "-out", "ca.pem"])
            .copied()
            .collect::<Vec<_>>(),
        );
        pki.openssl(
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
            ]
            .iter()
            .chain(&["-nodes", "-days", "2", "-subj", "/CN=other CA"])
            .chain(&["-keyout", "other.key", "-out", "other.pem"])
            .copied()
            .collect::<Vec<_>>(),
        );
        pki.openssl(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-keyout",
            "key.pem",
            "-out",
            "server.csr",
        ]);
        pki.openssl(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-out",
            "cert.pem",
            "-extfile",
            &ext.display().to_string(),
        ]);
        pki
    }

    #[track_caller]
    pub fn openssl(&self, args: &[&str]) {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(&self.dir.path)
            .stdin(Stdio::null())
            .output()
            .expect("openssl is needed by this test");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path.join(name)
    }

    pub fn ca(&self) -> String {
        self.path("ca.pem").display().to_string()
    }

    pub fn other_ca(&self) -> String {
        self.path("other.pem").display().to_string()
    }

    /// A policy terminating STARTTLS with this certificate, plus `extra` keys.
    pub fn policy(&self, extra: &str) -> String {
        format!(
            "starttls = \"terminate\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\n{extra}\n",
            self.path("cert.pem").display(),
            self.path("key.pem").display()
        )
    }
}
