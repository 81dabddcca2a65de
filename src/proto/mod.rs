//! The sans-IO SMTP inspection engine: bytes and time in, [`crate::relay::Action`]s out.
//!
//! It owns every SMTP and policy decision. It must not touch sockets, threads, clocks or
//! io_uring: the caller hands it bytes, events and the current time.

mod command;
pub mod content;
pub mod data;
pub mod preamble;
pub mod rate;
pub mod reply;
pub mod rules;
mod session;
mod verb;

pub use preamble::Identity;
pub use session::{Counters, Refusal, Session};
pub use verb::Verb;
