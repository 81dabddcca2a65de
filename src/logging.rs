//! Log output: `tracing` events written to stderr (journald reads it), one line each,
//! human-readable by default or JSON for log shippers.
//!
//! Owns only the subscriber setup. What is logged is decided where it happens (one line per
//! session end and per reload, debug lines per policy decision, nothing per completion); this
//! module must not add events of its own. Startup errors do not come through here: the binary
//! prints them as one plain line before any logging is set up.

use tracing::level_filters::LevelFilter;

use crate::config::{LogFormat, LogLevel};

fn filter(level: LogLevel) -> LevelFilter {
    match level {
        LogLevel::Error => LevelFilter::ERROR,
        LogLevel::Warn => LevelFilter::WARN,
        LogLevel::Info => LevelFilter::INFO,
        LogLevel::Debug => LevelFilter::DEBUG,
        LogLevel::Trace => LevelFilter::TRACE,
    }
}

/// Installs the process-wide subscriber. A second call (tests) leaves the first in place.
pub fn init(format: LogFormat, level: LogLevel) {
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_target(false)
        .with_max_level(filter(level));
    let _ = match format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .try_init(),
    };
}
