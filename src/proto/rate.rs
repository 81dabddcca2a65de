//! Per-minute rate limits over a bounded table: connections and messages per client, messages
//! per sender. One table per worker thread (limits are per host and, strictly, per worker:
//! see README), fed the time by the caller.
//!
//! Owns only counting. It must not know what is counted or what the answer to "too fast" is.

use std::collections::HashMap;
use std::time::{Duration, Instant};

const WINDOW: Duration = Duration::from_secs(60);

/// What a rate is counted for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RateKey {
    /// Connections from a client (an IPv4 address or an IPv6 /64, packed).
    Connections(u128),
    /// Messages (MAIL commands) from a client.
    Messages(u128),
    /// Messages from a sender address (a hash of it in lower case).
    Sender(u64),
}

/// Counts in the current and the previous minute; the rate is their blend (the sliding-window
/// estimate nginx and Cloudflare use), which needs two integers per key instead of a log.
#[derive(Debug, Clone, Copy)]
struct Window {
    start: Instant,
    current: u32,
    previous: u32,
}

impl Window {
    fn roll(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.start);
        if elapsed >= WINDOW * 2 {
            *self = Window {
                start: now,
                current: 0,
                previous: 0,
            };
        } else if elapsed >= WINDOW {
            self.previous = self.current;
            self.current = 0;
            self.start += WINDOW;
        }
    }

    fn estimate(&self, now: Instant) -> f64 {
        let into = now.saturating_duration_since(self.start).as_secs_f64() / WINDOW.as_secs_f64();
        f64::from(self.previous) * (1.0 - into.min(1.0)) + f64::from(self.current)
    }
}

/// A bounded table of rate windows.
#[derive(Debug)]
pub struct Rates {
    windows: HashMap<RateKey, Window>,
    capacity: usize,
}

impl Rates {
    /// A table holding at most `capacity` keys.
    pub fn new(capacity: usize) -> Rates {
        Rates {
            windows: HashMap::new(),
            capacity: capacity.max(1),
        }
    }

    /// Counts one event for `key` if it stays within `per_minute`; returns whether it did.
    /// A limit of 0 means no limit (and nothing is stored).
    pub fn admit(&mut self, key: RateKey, per_minute: u32, now: Instant) -> bool {
        if per_minute == 0 {
            return true;
        }
        if !self.windows.contains_key(&key) && self.windows.len() >= self.capacity {
            self.evict(now);
        }
        if !self.windows.contains_key(&key) && self.windows.len() >= self.capacity {
            // Full of keys that are all busy: a flood of distinct clients. Failing open keeps
            // mail flowing; the connection limits still bound what each one can hold.
            return true;
        }
        let w = self.windows.entry(key).or_insert(Window {
            start: now,
            current: 0,
            previous: 0,
        });
        w.roll(now);
        if w.estimate(now) + 1.0 > f64::from(per_minute) {
            return false;
        }
        w.current += 1;
        true
    }

    /// Drops windows with nothing in the last two minutes.
    fn evict(&mut self, now: Instant) {
        self.windows
            .retain(|_, w| now.saturating_duration_since(w.start) < WINDOW * 2);
    }

    /// Keys held now.
    pub fn len(&self) -> usize {
        self.windows.len()
    }

    /// Whether no key is held.
    pub fn is_empty(&self) -> bool {
        self.windows.is_empty()
    }
}

/// A stable 64-bit hash of an address in lower case (FNV-1a: no allocation, no seed, so the
/// same sender maps to the same key on every call).
pub fn address_key(address: &[u8]) -> u64 {
    address.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b.to_ascii_lowercase())).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_per_minute_and_recovers() {
        let mut r = Rates::new(10);
        let t0 = Instant::now();
        let key = RateKey::Messages(1);
        for _ in 0..3 {
            assert!(r.admit(key, 3, t0));
        }
        assert!(!r.admit(key, 3, t0));
        assert!(
            r.admit(RateKey::Messages(2), 3, t0),
            "other keys unaffected"
        );
        // Two minutes later the old minute no longer counts.
        assert!(r.admit(key, 3, t0 + Duration::from_secs(121)));
        assert!(r.admit(key, 0, t0), "0 is no limit");
    }

    #[test]
    fn sliding_estimate_blends_the_previous_minute() {
        let mut r = Rates::new(10);
        let t0 = Instant::now();
        let key = RateKey::Sender(address_key(b"A@B"));
        assert_eq!(key, RateKey::Sender(address_key(b"a@b")));
        for _ in 0..10 {
            assert!(r.admit(key, 10, t0));
        }
        // Halfway through the next minute, about half of the last minute still counts.
        let half = t0 + Duration::from_secs(90);
        let admitted = (0..10).filter(|_| r.admit(key, 10, half)).count();
        assert!((4..=6).contains(&admitted), "{admitted}");
    }

    #[test]
    fn table_is_bounded() {
        let mut r = Rates::new(4);
        let t0 = Instant::now();
        for i in 0..100 {
            r.admit(RateKey::Connections(i), 5, t0);
        }
        assert!(r.len() <= 4);
        let later = t0 + Duration::from_secs(200);
        assert!(r.admit(RateKey::Connections(1000), 5, later));
        assert_eq!(r.len(), 1, "stale keys were evicted");
    }
}
