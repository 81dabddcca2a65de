//! loadgen: the load generator and verifying sink bundled with mailguard.
//!
//! * `loadgen send` ([`send`]): N concurrent SMTP sessions deliver M messages (or run for S
//!   seconds), closed loop or at a fixed rate, and report throughput, HDR latency percentiles
//!   and errors by reply code.
//! * `loadgen sink` ([`sink`]): a fast SMTP sink that answers like a real MTA and, with
//!   `--verify`, proves delivery: every message carries a unique id and a body checksum
//!   ([`message`]), and the sink reports lost, duplicated and corrupted messages ([`ledger`]).
//! * `loadgen bench` ([`bench`]): the same workload direct to the sink and through mailguard,
//!   side by side, verified.
//!
//! Built on plain tokio (epoll), independent of mailguard's io_uring core and of its DATA
//! scanner: an oracle that shares no code with the system under test cannot share its bugs.

pub mod bench;
pub mod cli;
pub mod data;
pub mod ledger;
pub mod message;
pub mod relay;
pub mod reply;
pub mod send;
pub mod sink;
pub mod stats;
pub mod workers;
