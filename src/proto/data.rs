//! The DATA body scanner (being built).
