//! Runtime layout shared by `send` and `sink`.
//!
//! The default is one tokio current-thread runtime per OS thread: a session never moves between
//! threads, so there are no cross-thread wake-ups (expensive on this VM: a single SMTP session
//! runs ~8x faster when both peers share a CPU, see shared/design/machine-notes.md) and no
//! work-stealing bookkeeping. `--runtime multi` (hidden) runs the same futures on one
//! multi-thread runtime instead, for comparison; it was no faster (measurements in
//! loadgen/README.md).

use clap::ValueEnum;
use std::future::Future;
use std::io;

/// How worker futures are scheduled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Default)]
pub enum Flavor {
    /// One current-thread runtime per thread (default).
    #[default]
    Current,
    /// One multi-thread (work-stealing) runtime.
    Multi,
}

/// A current-thread runtime with IO and timers.
pub fn current_thread() -> io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

/// A multi-thread runtime with `threads` workers.
pub fn multi_thread(threads: usize) -> io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .enable_all()
        .build()
}

/// Spawns an OS thread named `name` that runs `fut` to completion on its own current-thread
/// runtime.
pub fn spawn_current<F, Fut>(name: String, make: F) -> io::Result<std::thread::JoinHandle<()>>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = ()>,
{
    let rt = current_thread()?;
    std::thread::Builder::new()
        .name(name)
        .spawn(move || rt.block_on(make()))
}
