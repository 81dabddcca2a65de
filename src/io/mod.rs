//! The thread-per-core io_uring ring (being built).
