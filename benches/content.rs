//! Content inspection cost on top of the DATA scanner, for `tuning.md`.
//!
//! The engine runs `proto::data` on every DATA chunk and feeds what it forwards to
//! `proto::content`. The target (the issue's) is data + content at most 1.5x data alone, on a
//! 100 KiB message with three base64 attachments and every content rule on.
//!
//! - `data`: `DataScanner` alone;
//! - `data+content`: `DataScanner`, its pieces fed to a `ContentScanner`;
//! - `content`: `ContentScanner` alone on the stuffed body.
//!
//! Each in one call (`whole`) and in 16 KiB reads (`16KiB`), as a socket would hand them.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use mailguard::proto::content::{CompiledRules, ContentRules, ContentScanner, Framing};
use mailguard::proto::data::{Bare, DataScanner, Piece};

mod mail;
use mail::{Lcg, BASE64, WORDS};

fn text(rng: &mut Lcg, bytes: usize, out: &mut Vec<u8>) {
    let end = out.len() + bytes;
    while out.len() < end {
        let start = out.len();
        // Every 40th line starts with a dot, so the DATA body has stuffed lines.
        if rng.next(40) == 0 {
            out.push(b'.');
        }
        let len = 60 + rng.next(19) as usize;
        while out.len() - start < len {
            out.extend_from_slice(WORDS[rng.next(WORDS.len() as u64) as usize].as_bytes());
            out.push(b' ');
        }
        out.truncate(start + len);
        out.extend_from_slice(b"\r\n");
    }
}

fn attachment(rng: &mut Lcg, name: &str, kind: &str, bytes: usize, out: &mut Vec<u8>) {
    out.extend_from_slice(
        format!(
            "--=_mix_7f3a\r\nContent-Type: {kind}; name=\"{name}\"\r\n\
             Content-Transfer-Encoding: base64\r\n\
             Content-Disposition: attachment;\r\n filename=\"{name}\"; size={bytes}\r\n\r\n"
        )
        .as_bytes(),
    );
    for _ in 0..bytes / 78 {
        for _ in 0..76 {
            out.push(BASE64[rng.next(64) as usize]);
        }
        out.extend_from_slice(b"\r\n");
    }
}

/// A 100 KiB message: real-looking headers, a text and HTML alternative, three base64
/// attachments; returned dot-stuffed and terminated, as a DATA body.
fn message() -> Vec<u8> {
    let mut rng = Lcg(100);
    let mut msg = Vec::with_capacity(110 << 10);
    msg.extend_from_slice(
        b"Received: from mail.example.org (mail.example.org [192.0.2.10])\r\n\
          \tby mx.example.net with ESMTPS id 4Xy2k1; Sun, 22 Nov 2026 10:00:00 +0000\r\n\
          Received: from [10.0.0.5] by mail.example.org; Sun, 22 Nov 2026 09:59:58 +0000\r\n\
          DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=example.org; s=s1;\r\n\
          \th=from:to:subject:date:message-id; bh=47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=;\r\n\
          \tb=dzdVyOfAKCdLXdJOc9G2q8LoXSlEniSbav+yuU4zGeeruD00lszZVoG4ZHRNiYzR\r\n\
          From: Alice Example <alice@example.org>\r\nTo: Bob <bob@example.net>\r\n\
          Subject: Quarterly numbers and the files for Thursday\r\n\
          Date: Sun, 22 Nov 2026 09:59:58 +0000\r\n\
          Message-ID: <20261122095958.4242@mail.example.org>\r\nMIME-Version: 1.0\r\n\
          Content-Type: multipart/mixed;\r\n boundary=\"=_mix_7f3a\"\r\n\r\n\
          This is a multi-part message in MIME format.\r\n\r\n\
          --=_mix_7f3a\r\nContent-Type: multipart/alternative; boundary=\"=_alt_9c1e\"\r\n\r\n\
          --=_alt_9c1e\r\nContent-Type: text/plain; charset=utf-8\r\n\
          Content-Transfer-Encoding: 8bit\r\n\r\n",
    );
    text(&mut rng, 8 << 10, &mut msg);
    msg.extend_from_slice(
        b"--=_alt_9c1e\r\nContent-Type: text/html; charset=utf-8\r\n\
          Content-Transfer-Encoding: 8bit\r\n\r\n",
    );
    text(&mut rng, 8 << 10, &mut msg);
    msg.extend_from_slice(b"--=_alt_9c1e--\r\n\r\n");
    attachment(
        &mut rng,
        "report.pdf",
        "application/pdf",
        28 << 10,
        &mut msg,
    );
    attachment(&mut rng, "photo.jpg", "image/jpeg", 28 << 10, &mut msg);
    attachment(
        &mut rng,
        "numbers.xlsx",
        "application/vnd.ms-excel",
        28 << 10,
        &mut msg,
    );
    msg.extend_from_slice(b"--=_mix_7f3a--\r\n");
    let mut data = Vec::with_capacity(msg.len() + 1024);
    let mut line_start = true;
    for &b in &msg {
        if line_start && b == b'.' {
            data.push(b'.');
        }
        data.push(b);
        line_start = b == b'\n';
    }
    data.extend_from_slice(b".\r\n");
    data
}

fn rules() -> Arc<CompiledRules> {
    let rules = ContentRules {
        max_header_size: 64 << 10,
        max_header_line_length: 998,
        deny_headers: vec!["X-Link2State".into()],
        deny_filename_extensions: ["exe", "js", "vbs", "scr", "iso", "bat", "cmd", "msi"]
            .map(String::from)
            .to_vec(),
        max_filename_length: 255,
        deny_encodings: vec!["binary".into(), "uuencode".into()],
        max_body_line_length: 998,
        max_mime_depth: 16,
    };
    Arc::new(rules.compile().expect("rules compile"))
}

fn data_only(body: &[u8], chunk: usize) -> usize {
    let mut scanner = DataScanner::new(Bare::Normalize);
    let mut pieces = 0usize;
    for part in body.chunks(chunk) {
        scanner.scan(part, &mut |piece: Piece| {
            black_box(&piece);
            pieces += 1;
        });
    }
    pieces
}

fn data_and_content(body: &[u8], chunk: usize, rules: &Arc<CompiledRules>) -> usize {
    let mut scanner = DataScanner::new(Bare::Normalize);
    let mut content = ContentScanner::new(Arc::clone(rules), Framing::Data);
    let mut findings = 0usize;
    for part in body.chunks(chunk) {
        scanner.scan(part, &mut |piece: Piece| {
            let bytes = match piece {
                Piece::Input(range) => &part[range],
                Piece::Static(bytes) => bytes,
            };
            content.feed(bytes, &mut |_| findings += 1);
        });
    }
    content.finish(&mut |_| findings += 1);
    findings
}

fn content_only(body: &[u8], chunk: usize, rules: &Arc<CompiledRules>) -> usize {
    let mut content = ContentScanner::new(Arc::clone(rules), Framing::Data);
    let mut findings = 0usize;
    for part in body.chunks(chunk) {
        content.feed(part, &mut |_| findings += 1);
    }
    content.finish(&mut |_| findings += 1);
    findings
}

fn content(c: &mut Criterion) {
    let body = message();
    let rules = rules();
    assert_eq!(
        data_and_content(&body, body.len(), &rules),
        0,
        "a clean message"
    );
    let mut group = c.benchmark_group("content");
    group.throughput(Throughput::Bytes(body.len() as u64));
    for (chunk, name) in [(body.len(), "whole"), (16 << 10, "16KiB")] {
        group.bench_with_input(BenchmarkId::new("data", name), &body, |b, body| {
            b.iter(|| data_only(black_box(body), chunk))
        });
        group.bench_with_input(BenchmarkId::new("data+content", name), &body, |b, body| {
            b.iter(|| data_and_content(black_box(body), chunk, &rules))
        });
        group.bench_with_input(BenchmarkId::new("content", name), &body, |b, body| {
            b.iter(|| content_only(black_box(body), chunk, &rules))
        });
    }
    group.finish();
}

criterion_group!(benches, content);
criterion_main!(benches);
