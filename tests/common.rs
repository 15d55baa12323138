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

/// A scratch folder for volumes whose volatile journals stay where a production daemon
/// keeps them: in /dev/shm, named as in production, but inside a folder of this test
/// process's own (`SNAPBLK_VLOG_DIR`), so parallel tests never collide and a sweep of the
/// folder sees exactly this process's journals. Returns the volumes' folder and the
/// journals' folder. Use it for every test of a binary (the setting is per process).
pub fn scratch_with_shm_journals() -> (tempfile::TempDir, &'static Path) {
    static JOURNALS: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    extern "C" fn remove_journals() {
        if let Some(d) = JOURNALS.get() {
            let _ = std::fs::remove_dir_all(d);
        }
    }
    let journals = JOURNALS.get_or_init(|| {
        let base = if Path::new("/dev/shm").is_dir() {
            std::path::PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let dir = tempfile::Builder::new()
            .prefix("snapblk-test-journals")
            .tempdir_in(base)
            .expect("a folder for volatile journals")
            .keep();
        // Statics are never dropped: remove the folder when the test process exits.
        // SAFETY: registers a function that takes no arguments and does not unwind.
        unsafe { libc::atexit(remove_journals) };
        dir
    });
    std::env::set_var("SNAPBLK_VLOG_DIR", journals);
    (scratch_dir(), journals.as_path())
}

/// The volatile journals in `dir`, sorted.
pub fn journals_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|e| {
            e.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".vlog"))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
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

/// Opens a volume this process has just closed. A child another test thread forks (mount,
/// the CLI) holds a copy of every descriptor until it execs, the volume's locked one
/// included, so the lock can outlive the handle by that long: retries on `Busy` for up to
/// 5 s; any other result is returned as it is.
pub fn open_after_close(dir: &Path) -> snapblk::engine::Result<snapblk::engine::Volume> {
    let t = std::time::Instant::now();
    loop {
        match snapblk::engine::Volume::open(dir) {
            Err(snapblk::engine::EngineError::Busy { .. })
                if t.elapsed() < std::time::Duration::from_secs(5) =>
            {
                std::thread::sleep(std::time::Duration::from_millis(10))
            }
            r => return r,
        }
    }
}
