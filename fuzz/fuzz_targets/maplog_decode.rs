//! A layer's map log of arbitrary bytes, as found and with its checksums repaired.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The layer id the header names, so the id check does not stop every input.
    let layer = data
        .get(16..24)
        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
        .unwrap_or(1);
    snapblk::engine::fuzzing::maplog_decode(data, layer);
    snapblk::engine::fuzzing::maplog_decode(&snapblk_fuzz::repair_maplog(data), layer);
});
