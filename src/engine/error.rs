//! Errors of the volume engine, each mapped to one errno for the block-device edge.

use std::io;
use std::path::PathBuf;

/// Everything the engine can refuse or fail at; messages name the file or the request.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A request reaching past the end of the volume.
    #[error(
        "{op} at offset {offset} length {len} reaches past the end of the volume ({size} bytes)"
    )]
    OutOfRange {
        op: &'static str,
        offset: u64,
        len: u64,
        size: u64,
    },
    /// A request not aligned to the logical block size.
    #[error("{op} at offset {offset} length {len} is not aligned to the block size {block_size}")]
    Unaligned {
        op: &'static str,
        offset: u64,
        len: u64,
        block_size: u32,
    },
    /// An argument that can never be valid (bad size, bad path...).
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// A snapshot name that is not allowed (the message says what is).
    #[error("invalid argument: {0}")]
    InvalidName(String),
    /// An I/O error on one of the volume's files.
    #[error("{}: {err}", path.display())]
    Io { path: PathBuf, err: io::Error },
    /// A file of the volume that does not hold what it must.
    #[error("{}: corrupt: {reason}", path.display())]
    Corrupt { path: PathBuf, reason: String },
    /// A file written by a newer (or unknown) format.
    #[error("{}: format version {found} is not supported (this build reads version {supported})", path.display())]
    UnsupportedVersion {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    /// No volume at the given folder.
    #[error("{}: not a snapblk volume (no {file} in it)", path.display())]
    NotAVolume { path: PathBuf, file: &'static str },
    /// Creating something that is already there.
    #[error("{}: already exists", path.display())]
    AlreadyExists { path: PathBuf },
    /// Another process has the volume open.
    #[error("{}: the volume is in use by another process", path.display())]
    Busy { path: PathBuf },
    /// No snapshot of that name.
    #[error("no snapshot named {0:?}")]
    SnapshotNotFound(String),
    /// No snapshot with that id.
    #[error("no snapshot with id {0}")]
    SnapshotIdNotFound(u64),
    /// Two snapshots of which neither descends from the other: no changed blocks between
    /// them can be known.
    #[error("{0}")]
    Unrelated(String),
    /// A snapshot of that name exists already.
    #[error("a snapshot named {0:?} already exists")]
    SnapshotExists(String),
    /// A crash simulated by the test hooks in `crate::engine::faults` (test builds only).
    #[cfg(any(test, feature = "fault-injection"))]
    #[error("simulated crash at {0}")]
    InjectedCrash(&'static str),
}

impl EngineError {
    /// The positive errno that a block device reports for this error.
    pub fn errno(&self) -> i32 {
        match self {
            EngineError::OutOfRange { .. }
            | EngineError::Unaligned { .. }
            | EngineError::Invalid(_)
            | EngineError::InvalidName(_)
            | EngineError::Unrelated(_) => libc::EINVAL,
            EngineError::Io { err, .. } => err.raw_os_error().unwrap_or(libc::EIO),
            EngineError::Corrupt { .. } | EngineError::UnsupportedVersion { .. } => libc::EIO,
            #[cfg(any(test, feature = "fault-injection"))]
            EngineError::InjectedCrash(_) => libc::EIO,
            EngineError::NotAVolume { .. }
            | EngineError::SnapshotNotFound(_)
            | EngineError::SnapshotIdNotFound(_) => libc::ENOENT,
            EngineError::AlreadyExists { .. } | EngineError::SnapshotExists(_) => libc::EEXIST,
            EngineError::Busy { .. } => libc::EBUSY,
        }
    }

    /// True for a crash simulated by the test hooks: a test's way of stopping the process,
    /// not a disk error (always false in a production build).
    pub(crate) fn is_injected_crash(&self) -> bool {
        #[cfg(any(test, feature = "fault-injection"))]
        if matches!(self, EngineError::InjectedCrash(_)) {
            return true;
        }
        false
    }

    /// Wraps an I/O error with the path it happened on.
    pub(crate) fn io(path: impl Into<PathBuf>, err: io::Error) -> Self {
        EngineError::Io {
            path: path.into(),
            err,
        }
    }

    /// A corruption report for `path`.
    pub(crate) fn corrupt(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        EngineError::Corrupt {
            path: path.into(),
            reason: reason.into(),
        }
    }
}

/// Result type of the engine.
pub type Result<T> = std::result::Result<T, EngineError>;
