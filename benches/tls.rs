//! The TLS layer of `starttls = "terminate"` in memory, against a rustls client: handshakes/s
//! (a fresh `Endpoint::server` and a full TLS 1.3 handshake each time, ECDSA P-256 certificate) and
//! encrypted MB/s (16 KiB of a mail body encrypted by the client and decrypted by
//! `Endpoint::receive`, so the figure is both ends together). No sockets: this is the CPU
//! cost the ring's worker pays per session and per byte.
//!
//! A CA and a leaf certificate are made with `openssl` in a temporary directory at start.

use std::hint::black_box;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use mailguard::tls::{self, Endpoint};
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig};

struct Keys {
    dir: PathBuf,
}

impl Keys {
    fn make() -> Keys {
        let dir = std::env::temp_dir().join(format!("mailguard-tls-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let ext = dir.join("leaf.ext");
        std::fs::write(
            &ext,
            "basicConstraints=CA:FALSE\nsubjectAltName=DNS:localhost\n",
        )
        .expect("extensions file");
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
        ];
        openssl(
            &dir,
            &["req", "-x509", "-days", "2", "-subj", "/CN=bench CA"],
            &ec,
            &["-keyout", "ca.key", "-out", "ca.pem"],
        );
        openssl(
            &dir,
            &["req", "-subj", "/CN=localhost"],
            &ec,
            &["-keyout", "key.pem", "-out", "leaf.csr"],
        );
        openssl(
            &dir,
            &[
                "x509", "-req", "-in", "leaf.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            ],
            &["-CAcreateserial", "-days", "2", "-extfile", "leaf.ext"],
            &["-out", "cert.pem"],
        );
        Keys { dir }
    }

    fn server(&self) -> Arc<ServerConfig> {
        tls::load_server_config(&self.dir.join("cert.pem"), &self.dir.join("key.pem"))
            .expect("server config")
    }

    fn client(&self) -> Arc<ClientConfig> {
        let ca = self.dir.join("ca.pem");
        let pem = tls::read(&ca).expect("CA");
        let mut roots = RootCertStore::empty();
        for cert in tls::certificates(&ca, &pem).expect("certs") {
            roots.add(cert).expect("root");
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        Arc::new(
            ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .expect("versions")
                .with_root_certificates(roots)
                .with_no_client_auth(),
        )
    }
}

fn openssl(dir: &Path, a: &[&str], b: &[&str], c: &[&str]) {
    let out = Command::new("openssl")
        .args(a)
        .args(b)
        .args(c)
        .current_dir(dir)
        .output()
        .expect("openssl is needed by this bench");
    assert!(out.status.success(), "{out:?}");
}

impl Drop for Keys {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs a handshake to its end in memory; returns both sides.
fn handshake(
    server: &Arc<ServerConfig>,
    client: &Arc<ClientConfig>,
) -> (Endpoint, ClientConnection) {
    let name = ServerName::try_from("localhost").expect("name");
    let mut c = ClientConnection::new(Arc::clone(client), name).expect("client");
    let mut s = Endpoint::server(Arc::clone(server)).expect("server");
    let mut plain = Vec::new();
    for _ in 0..16 {
        if !c.is_handshaking() && !s.is_handshaking() {
            break;
        }
        let mut to_server = Vec::new();
        while c.wants_write() {
            c.write_tls(&mut to_server).expect("client write");
        }
        let mut to_client = Vec::new();
        assert!(
            s.receive(&to_server, &mut plain, &mut to_client),
            "handshake failed"
        );
        let mut rd = &to_client[..];
        while !rd.is_empty() {
            c.read_tls(&mut rd).expect("client read");
            c.process_new_packets().expect("client process");
        }
    }
    assert!(!c.is_handshaking() && !s.is_handshaking());
    (s, c)
}

fn handshakes(c: &mut Criterion) {
    let keys = Keys::make();
    let (server, client) = (keys.server(), keys.client());
    let mut g = c.benchmark_group("tls");
    g.throughput(Throughput::Elements(1));
    g.bench_function("handshake", |b| {
        b.iter(|| black_box(handshake(&server, &client)))
    });
    g.finish();
}

fn decrypt(c: &mut Criterion) {
    let keys = Keys::make();
    let (server, client) = (keys.server(), keys.client());
    let (mut s, mut cl) = handshake(&server, &client);
    let body: Vec<u8> = b"Lorem ipsum dolor sit amet, consectetur adipiscing elit.\r\n"
        .iter()
        .copied()
        .cycle()
        .take(16 * 1024)
        .collect();
    let mut plain = Vec::with_capacity(64 * 1024);
    let mut wire = Vec::new();
    let mut g = c.benchmark_group("tls");
    g.throughput(Throughput::Bytes(body.len() as u64));
    g.bench_function("encrypt_decrypt_16k", |b| {
        b.iter(|| {
            cl.writer().write_all(&body).expect("client write");
            let mut records = Vec::with_capacity(body.len() + 256);
            while cl.wants_write() {
                cl.write_tls(&mut records).expect("client records");
            }
            plain.clear();
            assert!(s.receive(black_box(&records), &mut plain, &mut wire));
            assert_eq!(plain.len(), body.len());
        })
    });
    g.finish();
}

criterion_group!(benches, handshakes, decrypt);
criterion_main!(benches);
