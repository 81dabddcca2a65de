//! Realistic mail text for the benches: a deterministic generator, a word list and the base64
//! alphabet, shared so every bench scans the same kind of bytes.

/// A tiny deterministic generator, so that every run scans the same bytes.
pub struct Lcg(pub u64);

impl Lcg {
    pub fn next(&mut self, below: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % below
    }
}

pub const WORDS: &[&str] = &[
    "the",
    "meeting",
    "is",
    "moved",
    "to",
    "Thursday",
    "and",
    "we",
    "will",
    "review",
    "the",
    "quarterly",
    "numbers",
    "please",
    "bring",
    "your",
    "notes",
    "regards",
    "invoice",
    "attached",
    "shipping",
    "confirmed",
    "order",
    "a",
    "of",
    "for",
    "with",
    "this",
    "message",
];

pub const BASE64: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
