//! DATA-body scanning throughput, for `tuning.md`.
//!
//! `scan` is the real scanner (`proto::data`); `naive` is the same contract one byte at a
//! time; `memmem_eod` only looks for `\r\n.\r\n` (the ceiling for an end-only search, which
//! misses bare CR/LF); `memchr_lf` counts LFs (the memory-bandwidth reference at mail line
//! density). Bodies are realistic mail text: headers, 60-78-byte lines, some 998-byte lines
//! and a base64 attachment with 76-byte lines, with and without dot-stuffed (`..`) lines.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use mailguard::proto::data::{Bare, DataScanner, Piece};
use memchr::memmem::Finder;

mod mail;
use mail::{Lcg, BASE64, WORDS};

const SIZES: [(usize, &str); 3] = [(1 << 10, "1KiB"), (64 << 10, "64KiB"), (1 << 20, "1MiB")];

/// A text line of `len` bytes (without CRLF); `stuffed` lines start with `..`.
fn text_line(rng: &mut Lcg, len: usize, stuffed: bool, body: &mut Vec<u8>) {
    let start = body.len();
    if stuffed {
        body.extend_from_slice(b"..");
    }
    while body.len() - start < len {
        let word = WORDS[rng.next(WORDS.len() as u64) as usize];
        body.extend_from_slice(word.as_bytes());
        body.push(b' ');
    }
    body.truncate(start + len);
    body.extend_from_slice(b"\r\n");
}

fn base64_section(rng: &mut Lcg, lines: usize, body: &mut Vec<u8>) {
    body.extend_from_slice(b"\r\n--b1\r\nContent-Type: application/pdf\r\n");
    body.extend_from_slice(b"Content-Transfer-Encoding: base64\r\n\r\n");
    for _ in 0..lines {
        for _ in 0..76 {
            body.push(BASE64[rng.next(64) as usize]);
        }
        body.extend_from_slice(b"\r\n");
    }
}

/// About `size` bytes of mail body ending in CRLF, then the `.\r\n` terminator.
fn body(size: usize, stuffed: bool) -> Vec<u8> {
    let mut rng = Lcg(size as u64);
    let mut body = Vec::with_capacity(size + 1024);
    body.extend_from_slice(b"From: Alice <alice@example.org>\r\nTo: bob@example.net\r\n");
    body.extend_from_slice(b"Subject: Quarterly numbers\r\nMIME-Version: 1.0\r\n");
    body.extend_from_slice(b"Content-Type: multipart/mixed; boundary=b1\r\n\r\n--b1\r\n\r\n");
    let mut line = 0u64;
    while body.len() < size {
        line += 1;
        match rng.next(100) {
            0 => text_line(&mut rng, 998, false, &mut body),
            1 if size > 4096 => base64_section(&mut rng, 200, &mut body),
            _ => {
                let len = 60 + rng.next(19) as usize;
                text_line(&mut rng, len, stuffed && line % 40 == 0, &mut body);
            }
        }
    }
    let cut = memchr::memmem::rfind(&body[..size.min(body.len())], b"\r\n").map_or(0, |i| i + 2);
    body.truncate(cut);
    body.extend_from_slice(b".\r\n");
    body
}

fn scan(body: &[u8]) -> usize {
    let mut scanner = DataScanner::new(Bare::Normalize);
    let mut pieces = 0usize;
    let scanned = scanner.scan(body, &mut |piece: Piece| {
        black_box(&piece);
        pieces += 1;
    });
    assert!(scanned.done);
    pieces
}

/// The contract one byte at a time: EOD only at an eligible line start, bare CR/LF turned
/// into CRLF, unstuffed dot lines stuffed. Counts output bytes.
fn naive(body: &[u8]) -> usize {
    let mut out = 0usize;
    // 0: mid-line, 1: eligible line start, 2: line start after a bare ending.
    let mut line_start = 1u8;
    let mut flags = 0u8;
    let mut i = 0;
    while i < body.len() {
        let b = body[i];
        if line_start != 0 && b == b'.' {
            let (b1, b2) = (body.get(i + 1).copied(), body.get(i + 2).copied());
            if line_start == 1 && b1 == Some(b'\r') && b2 == Some(b'\n') {
                return out + 3;
            }
            if b1 != Some(b'.') {
                flags |= 8;
                out += 1;
            }
        }
        line_start = 0;
        match b {
            b'\r' if body.get(i + 1) == Some(&b'\n') => {
                out += 2;
                line_start = 1;
                i += 1;
            }
            b'\r' | b'\n' => {
                flags |= if b == b'\r' { 1 } else { 2 };
                out += 2;
                line_start = 2;
            }
            0 => {
                flags |= 4;
                out += 1;
            }
            _ => out += 1,
        }
        i += 1;
    }
    out + usize::from(flags)
}

/// One `memchr` call per line, as a line-jumping scanner makes them. (`memchr_iter().count()`
/// would not do: memchr counts without stopping at each match.)
fn count_lf(body: &[u8]) -> usize {
    let mut lines = 0;
    let mut pos = 0;
    while let Some(found) = memchr::memchr(b'\n', &body[pos..]) {
        lines += 1;
        pos += found + 1;
    }
    lines
}

fn scanner(c: &mut Criterion) {
    let eod = Finder::new(b"\r\n.\r\n");
    let mut group = c.benchmark_group("scanner");
    for (size, size_name) in SIZES {
        for (stuffed, kind) in [(false, "plain"), (true, "stuffed")] {
            let body = body(size, stuffed);
            let id = format!("{size_name}/{kind}");
            group.throughput(Throughput::Bytes(body.len() as u64));
            group.bench_with_input(BenchmarkId::new("scan", &id), &body, |b, body| {
                b.iter(|| scan(black_box(body)))
            });
            group.bench_with_input(BenchmarkId::new("naive", &id), &body, |b, body| {
                b.iter(|| naive(black_box(body)))
            });
            group.bench_with_input(BenchmarkId::new("memmem_eod", &id), &body, |b, body| {
                b.iter(|| eod.find_iter(black_box(body)).count())
            });
            group.bench_with_input(BenchmarkId::new("memchr_lf", &id), &body, |b, body| {
                b.iter(|| count_lf(black_box(body)))
            });
        }
    }
    group.finish();
}

criterion_group!(benches, scanner);
criterion_main!(benches);
