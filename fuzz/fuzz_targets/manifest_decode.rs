//! A manifest (`volume.json`) of arbitrary bytes, as found and with its checksum repaired.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    snapblk::engine::fuzzing::manifest_decode(data);
    snapblk::engine::fuzzing::manifest_decode(&snapblk_fuzz::repair_manifest(data));
});
