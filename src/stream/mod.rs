//! The backup stream: a snapshot leaves the node as a full or incremental stream of its
//! blocks (`snapblk export`) and comes back as a new volume (`snapblk import`).
//!
//! The format (docs/stream-format.md) is versioned; every record carries a checksum and
//! the trailer one over the whole stream, so an import refuses any damaged, truncated or
//! out-of-order stream before the new volume is committed.
//!
//! - [`format`]: the byte layout, pure encode/decode;
//! - [`plan`]: which extents an export sends as data and which as zeros;
//! - [`writer`] / [`reader`]: a stream record by record over any `Write` / `Read`;
//! - [`export`]: a snapshot view to a stream (usable by the daemon on a served volume);
//! - [`relay`]: a stream passed on (from the daemon to a file) and checked on the way;
//! - [`chain`]: which streams may follow which;
//! - [`import`]: streams to a new volume, built in a [`staging`] folder;
//! - [`sink`]: an output file that appears whole or not at all;
//! - [`progress`]: progress reporting without terminal code.

pub mod chain;
mod error;
pub mod export;
pub mod format;
pub mod import;
pub mod plan;
pub mod progress;
pub mod reader;
pub mod relay;
pub mod sink;
pub mod staging;
pub mod writer;

pub use error::{Result, StreamError};
pub use export::{export_snapshot, write_stream, ExportSummary, PreparedExport};
pub use format::{SnapshotRef, StreamHeader, StreamSource, Totals, Trailer};
pub use import::{import_streams, ImportSummary, StreamInput};
pub use plan::ExportPlan;
pub use progress::{NoProgress, Progress};
pub use reader::{Record, StreamReader};
pub use relay::relay_stream;
pub use writer::StreamWriter;
