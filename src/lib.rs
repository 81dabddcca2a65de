//! mailguard: an SMTP inspection proxy.
//!
//! `proto` is the sans-IO SMTP engine, `io` the thread-per-core io_uring ring that drives it,
//! `config` the policy and the config file, and `relay` the vocabulary the engine and the ring
//! share. Around them: `guard` (live policy, session factory, PROXY listeners), `proxy_header`
//! (the PROXY protocol wire format), `tally` (what sessions decided, per worker), and the
//! operations side: `control` (signals), `metrics` (Prometheus) and `logging` (tracing to
//! stderr).

pub mod config;
pub mod control;
pub mod guard;
pub mod io;
pub mod logging;
pub mod metrics;
pub mod proto;
pub mod proxy_header;
pub mod relay;
pub mod tally;
pub mod tls;
