//! Export: a snapshot (or what changed in it since a base snapshot) written as a stream.
//!
//! [`write_stream`] takes an open [`SnapshotView`] and any `Write`, so the daemon can
//! export a volume it serves to a socket; [`export_snapshot`] is the convenience that
//! works out the extents from a [`Volume`]. Data is read and written in records of at
//! most 1 MiB: memory does not grow with the volume.

use std::io::Write;
use std::time::{Duration, Instant};

use crate::engine::{EngineError, Extent, SnapshotInfo, SnapshotView, Volume};

use super::error::{Result, StreamError};
use super::format::{SnapshotRef, StreamHeader, StreamSource, Totals, Trailer, MAX_DATA_LEN};
use super::plan::{ExportPlan, Piece};
use super::progress::Progress;
use super::writer::StreamWriter;

/// What an export wrote, for the summary line and for callers that log it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ExportSummary {
    /// What the stream is a copy of, as its header says.
    pub source: StreamSource,
    /// Records and bytes written, and the stream's checksum.
    pub trailer: Trailer,
    /// Size of the stream in bytes.
    pub stream_bytes: u64,
    /// Time from the first read to the flushed end of the stream.
    pub elapsed: Duration,
}

/// Writes the stream of `plan` read from `view` to `out`, and returns `out` with a
/// summary. `source` names the volume and snapshot(s) in the header; `name` names the
/// stream in errors. On error the stream has no trailer, so no import will accept it.
pub fn write_stream<W: Write>(
    view: &SnapshotView,
    source: StreamSource,
    plan: &ExportPlan<'_>,
    out: W,
    name: &str,
    progress: &dyn Progress,
) -> Result<(W, ExportSummary)> {
    let t0 = Instant::now();
    if view.size() != source.volume_size {
        return Err(StreamError::Invalid(format!(
            "{name}: the snapshot has {} bytes but the header says {}",
            view.size(),
            source.volume_size
        )));
    }
    let header = StreamHeader {
        source: source.clone(),
        totals: plan.totals(),
    };
    progress.start(header.totals.data_bytes);
    let result = write_records(view, header, plan, out, name, progress);
    progress.finish();
    let (out, trailer, stream_bytes) = result?;
    let summary = ExportSummary {
        source,
        trailer,
        stream_bytes,
        elapsed: t0.elapsed(),
    };
    tracing::debug!(stream = name, snapshot = %summary.source.snapshot.name, bytes = stream_bytes, "exported");
    Ok((out, summary))
}

fn write_records<W: Write>(
    view: &SnapshotView,
    header: StreamHeader,
    plan: &ExportPlan<'_>,
    out: W,
    name: &str,
    progress: &dyn Progress,
) -> Result<(W, Trailer, u64)> {
    let snapshot = header.source.snapshot.name.clone();
    let mut w = StreamWriter::new(out, name, header)?;
    let mut buf = vec![0u8; MAX_DATA_LEN as usize];
    for piece in plan.pieces() {
        match piece {
            Piece::Data(e) => {
                let end = e.offset + e.length;
                let mut off = e.offset;
                while off < end {
                    let n = (end - off).min(MAX_DATA_LEN) as usize;
                    view.read(off, &mut buf[..n])
                        .map_err(|err| StreamError::Engine {
                            stream: name.to_string(),
                            offset: w.position(),
                            context: format!(
                                "reading snapshot {snapshot:?} at volume offset {off} length {n}"
                            ),
                            err,
                        })?;
                    w.data(off, &buf[..n])?;
                    progress.advance(n as u64);
                    off += n as u64;
                }
            }
            Piece::Zero(e) => w.zero(e.offset, e.length)?,
        }
    }
    w.finish()
}

/// Exports snapshot `snapshot` of `volume` to `out`: a full stream, or with `since` an
/// incremental one holding only what changed after snapshot `since`. `name` names the
/// stream in errors. Works on a volume another thread is serving: the snapshot's layers
/// are frozen and held open for the whole export.
pub fn export_snapshot<W: Write>(
    volume: &Volume,
    snapshot: &str,
    since: Option<&str>,
    out: W,
    name: &str,
    progress: &dyn Progress,
) -> Result<(W, ExportSummary)> {
    PreparedExport::new(volume, snapshot, since)?.write(out, name, progress)
}

/// An export whose extents are worked out and whose snapshot layers are held open:
/// the daemon checks a request with it before it answers, then streams.
pub struct PreparedExport {
    view: SnapshotView,
    source: StreamSource,
    allocated: Vec<Extent>,
    changed: Option<Vec<Extent>>,
}

impl PreparedExport {
    /// Looks up snapshot `snapshot` (and base `since`) of `volume` and the extents to send.
    pub fn new(volume: &Volume, snapshot: &str, since: Option<&str>) -> Result<PreparedExport> {
        let ctx = |what: String| move |err: EngineError| StreamError::Volume { context: what, err };
        let vname = volume.name().to_string();
        let view = volume
            .snapshot_view(snapshot)
            .map_err(ctx(format!("volume {vname}")))?;
        let info = volume
            .snapshot_info(snapshot)
            .map_err(ctx(format!("volume {vname}")))?;
        let allocated = volume.allocated_extents(snapshot).map_err(ctx(format!(
            "volume {vname}: allocated blocks of {snapshot:?}"
        )))?;
        let (base, changed) = match since {
            None => (None, None),
            Some(base) => {
                let b = volume
                    .snapshot_info(base)
                    .map_err(ctx(format!("volume {vname}: base snapshot")))?;
                let changed = volume.changed_extents(base, snapshot).map_err(ctx(format!(
                    "volume {vname}: blocks changed from {base:?} to {snapshot:?}"
                )))?;
                (Some(snapshot_ref(&b)), Some(changed))
            }
        };
        let source = StreamSource {
            volume_id: volume.id(),
            // The snapshot's own size: the volume may have grown since.
            volume_size: info.size,
            block_size: volume.block_size(),
            snapshot: snapshot_ref(&info),
            base,
        };
        Ok(PreparedExport {
            view,
            source,
            allocated,
            changed,
        })
    }

    /// What the stream is a copy of.
    pub fn source(&self) -> &StreamSource {
        &self.source
    }

    fn plan(&self) -> ExportPlan<'_> {
        match &self.changed {
            None => ExportPlan::full(&self.allocated),
            Some(changed) => ExportPlan::incremental(changed, &self.allocated),
        }
    }

    /// What the stream will carry.
    pub fn totals(&self) -> Totals {
        self.plan().totals()
    }

    /// Writes the stream to `out` (see [`write_stream`]).
    pub fn write<W: Write>(
        &self,
        out: W,
        name: &str,
        progress: &dyn Progress,
    ) -> Result<(W, ExportSummary)> {
        write_stream(
            &self.view,
            self.source.clone(),
            &self.plan(),
            out,
            name,
            progress,
        )
    }
}

fn snapshot_ref(s: &SnapshotInfo) -> SnapshotRef {
    SnapshotRef {
        name: s.name.clone(),
        id: s.id,
        created_unix_ms: s.created_unix_ms,
    }
}
