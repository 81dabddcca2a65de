//! The engine target: see `mailguard_fuzz::engine`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| mailguard_fuzz::engine(data));
