//! The DATA scanner against a naive oracle: see `mailguard_fuzz::scanner`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| mailguard_fuzz::scanner(data));
