//! mailguard: an SMTP inspection proxy.
//!
//! `proto` is the sans-IO SMTP engine, `io` the thread-per-core io_uring ring that drives it,
//! `config` the policy, and `relay` the vocabulary the engine and the ring share.

pub mod config;
pub mod guard;
pub mod io;
pub mod proto;
pub mod relay;
