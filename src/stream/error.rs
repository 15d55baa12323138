//! Errors of the backup stream. Every refusal names the stream (a file name, or `stdin`)
//! and the byte offset in it where the problem was found, so an operator can tell a
//! damaged file from a wrong order of files without reading code.

use std::io;
use std::path::PathBuf;

use crate::engine::EngineError;

/// Everything exporting or importing a stream can refuse or fail at.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// Reading or writing the stream itself failed (disk full, broken pipe...).
    #[error("{stream}: at byte {offset}: {err}")]
    Io {
        stream: String,
        offset: u64,
        err: io::Error,
    },
    /// The stream ended before its trailer: an interrupted transfer or a cut file.
    #[error("{stream}: truncated at byte {offset}: the stream ends where {expected} was expected")]
    Truncated {
        stream: String,
        offset: u64,
        expected: &'static str,
    },
    /// Bytes that do not hold what the format says: a flipped bit, a damaged file, or not
    /// a snapblk stream at all.
    #[error("{stream}: corrupt at byte {offset}: {reason}")]
    Corrupt {
        stream: String,
        offset: u64,
        reason: String,
    },
    /// A well-formed stream written by a format this build does not know.
    #[error("{stream}: at byte {offset}: stream format version {found} is not supported (this build reads version {supported})")]
    UnsupportedVersion {
        stream: String,
        offset: u64,
        found: u32,
        supported: u32,
    },
    /// Bytes after a complete stream: two streams glued together, or garbage appended.
    #[error("{stream}: unexpected data at byte {offset}, after the stream's trailer")]
    TrailingData { stream: String, offset: u64 },
    /// A stream that is sound on its own but does not follow the previous one (wrong
    /// order, wrong base snapshot, another volume...).
    #[error("{stream}: at byte {offset}: {reason}")]
    Chain {
        stream: String,
        offset: u64,
        reason: String,
    },
    /// The volume engine refused or failed while reading the source or building the copy.
    #[error("{stream}: at byte {offset}: {context}: {err}")]
    Engine {
        stream: String,
        offset: u64,
        context: String,
        #[source]
        err: EngineError,
    },
    /// The volume engine refused a request before any stream byte was involved (no such
    /// snapshot, base not older than the snapshot, volume in use...).
    #[error("{context}: {err}")]
    Volume {
        context: String,
        #[source]
        err: EngineError,
    },
    /// The folder an import would create exists already.
    #[error("{}: already exists (an import makes a new volume)", path.display())]
    TargetExists { path: PathBuf },
    /// The temporary folder an import builds the volume in could not be made or moved.
    #[error("{}: {err}", path.display())]
    Staging { path: PathBuf, err: io::Error },
    /// A request that can never be carried out (bad arguments).
    #[error("{0}")]
    Invalid(String),
}

/// Result type of the stream module.
pub type Result<T> = std::result::Result<T, StreamError>;
