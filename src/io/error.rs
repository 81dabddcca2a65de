//! The ring layer's error type. Every variant displays as one line that names the cause (and,
//! where there is one, the fix), because `main` prints it as the whole diagnostic.
//!
//! Owns only formatting; it must not decide policy such as exit codes.

use std::io;
use std::net::SocketAddr;

/// Errors of the io_uring layer.
#[derive(Debug, thiserror::Error)]
pub enum IoError {
    /// `io_uring_setup` itself is refused.
    #[error("io_uring is unavailable ({reason}): {hint}")]
    Unavailable {
        /// The system error, e.g. "operation not permitted".
        reason: String,
        /// Which mechanism most likely blocks it and how to lift it.
        hint: String,
    },
    /// The kernel has io_uring but lacks something the ring needs.
    #[error("io_uring on this kernel lacks {feature} (Linux 6.0 or newer is required)")]
    Unsupported {
        /// The missing opcode or feature.
        feature: &'static str,
    },
    /// The listening socket could not be set up.
    #[error("cannot listen on {addr}: {}", describe(.source))]
    Listen {
        /// The address asked for.
        addr: SocketAddr,
        /// The system error (e.g. `AddrInUse`).
        source: io::Error,
    },
    /// A [`crate::io::RingConfig`] value is out of range.
    #[error("invalid ring configuration: {0}")]
    Config(&'static str),
    /// A worker could not build its ring or buffers.
    #[error("io worker {worker} cannot {what}: {}", describe(.source))]
    Setup {
        /// Worker index.
        worker: usize,
        /// What it was doing.
        what: &'static str,
        /// The system error.
        source: io::Error,
    },
    /// `io_uring_enter` failed in a way the loop cannot recover from.
    #[error("io worker {worker}: io_uring_enter failed: {}", describe(.source))]
    Ring {
        /// Worker index.
        worker: usize,
        /// The system error.
        source: io::Error,
    },
    /// A worker thread could not be started.
    #[error("cannot start io worker thread {worker}: {}", describe(.source))]
    Spawn {
        /// Worker index.
        worker: usize,
        /// The system error.
        source: io::Error,
    },
    /// A worker thread panicked (a bug, most likely in a session).
    #[error("io worker {worker} panicked")]
    Panicked {
        /// Worker index.
        worker: usize,
    },
}

/// A system error as a lower-case phrase without the "(os error N)" suffix, so it reads well
/// after a colon: "address already in use".
pub(crate) fn describe(err: &io::Error) -> String {
    let text = err.to_string();
    let text = match text.rfind(" (os error ") {
        Some(cut) => &text[..cut],
        None => &text[..],
    };
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_error_is_one_clean_line() {
        let err = IoError::Listen {
            addr: "127.0.0.1:25".parse().expect("addr"),
            source: io::Error::from_raw_os_error(libc::EADDRINUSE),
        };
        assert_eq!(
            err.to_string(),
            "cannot listen on 127.0.0.1:25: address already in use"
        );
    }
}
