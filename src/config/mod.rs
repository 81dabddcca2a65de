//! The policy: what the guard allows, rewrites and limits, read from a TOML file.
//!
//! This module owns parsing and validation (every error carries the file, line and column) and
//! the derived tables the engine consults (the effective verb allow-list, the EHLO keyword
//! filter). It must not touch sockets, threads or the engine's state: a [`Policy`] is an
//! immutable value shared by `Arc` between the sessions that were accepted under it.

mod policy;

pub use policy::AUTH_LINE_LENGTH;

pub use policy::{
    BareLf, BlockedReply, Mode, Policy, PolicyError, RatePerIp, RuleAction, Ruled, StartTls,
};
