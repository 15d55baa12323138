//! The volume engine: a volume is a stack of layers (frozen ones below, one writable head on
//! top), each a sparse data file plus a roaring map of the blocks it holds or zeroes.
//!
//! - A write goes to the head at the same offset and sets bits in its map: nothing old is
//!   ever read or copied, so a snapshot (seal the head, push a new one) copies no data.
//! - A read takes each block from the topmost layer whose map names it, or zeros.
//! - Durability follows block-device rules: after `flush` (or a FUA write) every write
//!   acknowledged before it survives a crash; metadata changes are atomic renames.
//!
//! The engine knows nothing of ublk: it is plain files, tested on any machine.

mod aligned;
mod catalog;
mod cbt;
mod clone;
mod disk;
mod error;
mod extent;
#[cfg(any(test, feature = "fault-injection"))]
pub mod faults;
#[cfg(not(any(test, feature = "fault-injection")))]
mod faults;
mod fsutil;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
mod layer;
mod layermap;
mod maintain;
mod manifest;
mod maplog;
mod plan;
mod prepare;
mod slots;
mod snapshot;
mod stack;
mod vlog;
mod volume;

pub use aligned::AlignedBuf;
pub use catalog::{destroy, summary, SnapshotSummary, VolumeSummary};
pub use cbt::{allocated_runs, changed_runs, BlockRuns};
pub use disk::{DiskFull, DiskStatus};
pub use error::{EngineError, Result};
pub use extent::Extent;
pub use manifest::MAX_BLOCKS;
pub use plan::{ReadPlan, ReadSegment, ReadSource};
pub use prepare::{reserve_for as head_reserve_for, LAYOUT_ENV, RESERVE_ENV};
pub use snapshot::{
    validate_snapshot_name, CutReport, PendingSeal, PreparedCut, SnapshotInfo, SnapshotView,
};
pub use volume::{CreateOptions, Volume, VolumeOpenOptions, VolumeStatus, WriteTicket};
