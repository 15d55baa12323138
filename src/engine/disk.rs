//! What the volume knows of the file system under its folder: whether it ran full, how
//! many requests its errors refused, and its free space, for `status`.
//!
//! Thin volumes overcommit: the file system can fill while the consumer still sees free
//! blocks. Writes then fail with ENOSPC (never acknowledged). The state below says so
//! until the file system has room again: more free space than it had at the last ENOSPC.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;

use super::error::EngineError;

/// Free space the file system must have gained over what it had at the last ENOSPC before the
/// volume stops reporting it full.
const ROOM_AGAIN: u64 = 1 << 20;

/// The file system under the volume's folder, as `status` reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DiskStatus {
    /// Bytes an unprivileged writer can still allocate (`statvfs` `f_bavail`).
    pub free_bytes: u64,
    /// Size of the file system in bytes.
    pub total_bytes: u64,
    /// Set while the file system is full: since when, and how many requests it refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub full: Option<DiskFull>,
    /// Requests and operations that failed with an I/O error (EIO and the like) since the
    /// volume was opened.
    #[serde(default)]
    pub io_errors: u64,
    /// The last such error, with its time (Unix ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error_unix_ms: Option<u64>,
}

/// The file system under the folder ran out of space.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DiskFull {
    /// First ENOSPC of this episode (Unix ms).
    pub since_unix_ms: u64,
    /// Writes, flushes and metadata changes refused with ENOSPC since.
    pub refused: u64,
}

struct Full {
    since_unix_ms: u64,
    refused: u64,
    /// Free bytes right after the last ENOSPC.
    free_at_last: u64,
}

/// Error counters of one open volume.
#[derive(Default)]
pub(crate) struct DiskState {
    full: Mutex<Option<Full>>,
    io_errors: AtomicU64,
    last_error: Mutex<Option<(u64, String)>>,
}

/// Free and total bytes of the file system holding `dir`.
pub(crate) fn space(dir: &Path) -> Option<(u64, u64)> {
    let st = nix::sys::statvfs::statvfs(dir).ok()?;
    let frsize = st.fragment_size() as u64;
    Some((
        (st.blocks_available() as u64).saturating_mul(frsize),
        (st.blocks() as u64).saturating_mul(frsize),
    ))
}

impl DiskState {
    /// Counts a failure with positive `errno` of something done on `dir`'s file system;
    /// `what` says what failed.
    pub fn note(&self, dir: &Path, errno: i32, what: &str) {
        match errno {
            libc::ENOSPC | libc::EDQUOT => {
                let free = space(dir).map_or(0, |(f, _)| f);
                let mut full = self.full.lock();
                match full.as_mut() {
                    Some(f) => {
                        f.refused += 1;
                        f.free_at_last = free;
                    }
                    None => {
                        tracing::error!(folder = %dir.display(), free_bytes = free, "the file system under the volume is full: writes that need space fail with ENOSPC until space is freed");
                        *full = Some(Full {
                            since_unix_ms: super::volume::now_ms(),
                            refused: 1,
                            free_at_last: free,
                        });
                    }
                }
            }
            libc::EIO | libc::EROFS | libc::ENXIO | libc::ENODEV => {
                self.io_errors.fetch_add(1, Ordering::Relaxed);
                *self.last_error.lock() = Some((super::volume::now_ms(), what.to_string()));
            }
            _ => {}
        }
    }

    /// Counts `e` if it is a disk error.
    pub fn note_error(&self, dir: &Path, e: &EngineError) {
        if e.is_injected_crash() {
            return;
        }
        self.note(dir, e.errno(), &e.to_string());
    }

    /// The state for `status`; ends a full episode once the file system has room again.
    pub fn status(&self, dir: &Path) -> DiskStatus {
        let (free, total) = space(dir).unwrap_or((0, 0));
        let full = {
            let mut g = self.full.lock();
            if g.as_ref()
                .is_some_and(|f| free >= f.free_at_last.saturating_add(ROOM_AGAIN))
            {
                tracing::info!(folder = %dir.display(), free_bytes = free, "the file system under the volume has room again");
                *g = None;
            }
            g.as_ref().map(|f| DiskFull {
                since_unix_ms: f.since_unix_ms,
                refused: f.refused,
            })
        };
        let last = self.last_error.lock().clone();
        DiskStatus {
            free_bytes: free,
            total_bytes: total,
            full,
            io_errors: self.io_errors.load(Ordering::Relaxed),
            last_error_unix_ms: last.as_ref().map(|l| l.0),
            last_error: last.map(|l| l.1),
        }
    }
}
