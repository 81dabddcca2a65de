//! The configuration: the policy (what the guard allows, rewrites and limits) and the config
//! file around it (addresses, threads, metrics, logging, drain), both read from TOML.
//!
//! This module owns parsing and validation (every error carries the file, line and column),
//! the derived tables the engine consults (the effective verb allow-list, the EHLO keyword
//! filter) and the operator's view of a policy (`describe`). It must not touch sockets,
//! threads or the engine's state: a [`Policy`] is an immutable value shared by `Arc` between
//! the sessions that were accepted under it, and a [`Setup`] is applied by the binary.

pub mod describe;
mod policy;
mod setup;
mod tls;

pub use policy::AUTH_LINE_LENGTH;

pub use policy::{
    BareLf, BlockedReply, Mode, Policy, PolicyError, RatePerIp, RuleAction, Ruled, StartTls,
    UpstreamIdentity,
};
pub use setup::{
    resolve, LogFormat, LogLevel, PolicySource, RingTuning, Setup, SetupError, MAX_DRAIN_SECS,
};
pub use tls::{TlsPolicy, UpstreamTls};
