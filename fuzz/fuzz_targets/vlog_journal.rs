//! A volatile journal of arbitrary bytes (made to look like this boot's and this layer's):
//! opening it must replay it or discard it, never panic or touch memory past the file.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = snapblk_fuzz::scratch();
    let path = dir.path().join("1.vlog");
    let _ = snapblk::engine::fuzzing::vlog_open(&path, data, 1 << 20);
});
