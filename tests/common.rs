//! Helpers shared by the engine's integration tests.
#![allow(dead_code)]

use std::path::Path;

/// A scratch folder, on tmpfs when the machine has one (these tests fsync a lot). The
/// engine's volatile journals go there too, so they are removed with it.
pub fn scratch() -> tempfile::TempDir {
    // Volatile journals in each volume's own folder (not /dev/shm), removed with it.
    std::env::set_var("SNAPBLK_VLOG_DIR", "");
    scratch_dir()
}

fn scratch_dir() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(d) = tempfile::Builder::new()
            .prefix("snapblk-test")
            .tempdir_in(shm)
        {
            return d;
        }
    }
    tempfile::Builder::new()
        .prefix("snapblk-test")
        .tempdir()
        .expect("a temporary folder")
}

/// The content of one block written with version `v` (0 means zeros): each 8 bytes hold
/// `v`, so any read can be mapped back to the version it shows.
pub fn block_data(v: u64, bs: usize) -> Vec<u8> {
    if v == 0 {
        return vec![0; bs];
    }
    v.to_le_bytes().iter().copied().cycle().take(bs).collect()
}

/// The version a block's bytes show, or None if they are not one uniform version.
pub fn version_of(bytes: &[u8]) -> Option<u64> {
    let mut first = [0u8; 8];
    first.copy_from_slice(&bytes[..8]);
    let v = u64::from_le_bytes(first);
    bytes.chunks(8).all(|c| c == first).then_some(v)
}

/// Versions of `n` blocks read from `buf`.
pub fn versions(buf: &[u8], bs: usize) -> Vec<Option<u64>> {
    buf.chunks(bs).map(version_of).collect()
}
