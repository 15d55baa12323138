//! Import: a full stream and the incrementals that follow it, rebuilt as a new volume with
//! one snapshot per stream, named like the source's.
//!
//! All headers are read and the chain checked before anything is written. The volume is
//! built in a staging folder beside the target; each record is verified before it is
//! written, and each stream's trailer is checked before its snapshot is taken. Only when
//! every stream has passed is the folder renamed to the target; on any error it is
//! removed, so the target either is a whole volume or does not exist.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::engine::{CreateOptions, EngineError, Volume};

use super::chain::check_chain;
use super::error::{Result, StreamError};
use super::format::StreamHeader;
use super::progress::Progress;
use super::reader::{Record, StreamReader};
use super::staging::Staging;

/// One stream to import: its name (for messages) and where to read it from.
pub struct StreamInput<'a> {
    /// Names the stream in errors: a file name, or `stdin`.
    pub name: String,
    /// Where the stream's bytes come from.
    pub reader: Box<dyn Read + 'a>,
}

impl<'a> StreamInput<'a> {
    /// A named input.
    pub fn new(name: impl Into<String>, reader: impl Read + 'a) -> StreamInput<'a> {
        StreamInput {
            name: name.into(),
            reader: Box::new(reader),
        }
    }
}

/// What an import built, for the summary line.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ImportSummary {
    /// The new volume's folder.
    pub target: PathBuf,
    /// Id of the new volume (a new id: it is a copy, not the source).
    pub volume_id: String,
    /// Snapshots created, one per stream, oldest first.
    pub snapshots: Vec<String>,
    /// Data records applied, over all streams.
    pub data_records: u64,
    /// Zero records applied, over all streams.
    pub zero_records: u64,
    /// Bytes of data written.
    pub data_bytes: u64,
    /// Bytes zeroed.
    pub zero_bytes: u64,
    /// Bytes read from all streams.
    pub stream_bytes: u64,
    /// Whole time of the import, the final sync and rename included.
    pub elapsed: Duration,
}

/// Builds a new volume at `target` (which must not exist) from `inputs`, in order: a full
/// stream, then incrementals each based on the snapshot of the one before.
pub fn import_streams(
    target: &Path,
    inputs: Vec<StreamInput<'_>>,
    progress: &dyn Progress,
) -> Result<ImportSummary> {
    let t0 = Instant::now();
    if inputs.is_empty() {
        return Err(StreamError::Invalid("no stream to import".into()));
    }
    let staging = Staging::new(target)?;
    let mut readers = Vec::with_capacity(inputs.len());
    for input in inputs {
        readers.push(StreamReader::open(input.reader, &input.name)?);
    }
    let headers: Vec<(&str, &StreamHeader)> =
        readers.iter().map(|r| (r.name(), r.header())).collect();
    check_chain(&headers)?;
    let total = readers.iter().map(|r| r.header().totals.data_bytes).sum();
    progress.start(total);
    let built = build(staging.path(), &mut readers, progress);
    progress.finish();
    let volume_id = built?;
    staging.commit()?;
    let mut s = ImportSummary {
        target: target.to_path_buf(),
        volume_id,
        snapshots: Vec::new(),
        data_records: 0,
        zero_records: 0,
        data_bytes: 0,
        zero_bytes: 0,
        stream_bytes: 0,
        elapsed: Duration::ZERO,
    };
    for r in &readers {
        let c = r.counts();
        s.snapshots.push(r.header().source.snapshot.name.clone());
        s.data_records += c.data_records;
        s.zero_records += c.zero_records;
        s.data_bytes += c.data_bytes;
        s.zero_bytes += c.zero_bytes;
        s.stream_bytes += r.position();
    }
    s.elapsed = t0.elapsed();
    tracing::debug!(target = %target.display(), streams = readers.len(), "imported");
    Ok(s)
}

/// Creates the volume in `dir` and applies every stream; returns the new volume's id.
fn build<R: Read>(
    dir: &Path,
    readers: &mut [StreamReader<R>],
    progress: &dyn Progress,
) -> Result<String> {
    let first = readers
        .first()
        .map(|r| r.header().source.clone())
        .ok_or_else(|| StreamError::Invalid("no stream to import".into()))?;
    let engine = |what: String| move |err: EngineError| StreamError::Volume { context: what, err };
    let volume = Volume::create(
        dir,
        &CreateOptions {
            size: first.volume_size,
            block_size: first.block_size,
        },
    )
    .map_err(engine(format!("creating the volume in {}", dir.display())))?;
    for r in readers.iter_mut() {
        // The source grew between these snapshots: so does the copy (checked by the chain
        // rules: never smaller).
        let size = r.header().source.volume_size;
        if size > volume.size() {
            volume.resize(size).map_err(|err| StreamError::Engine {
                stream: r.name().to_string(),
                offset: r.position(),
                context: format!("growing the new volume to {size} bytes"),
                err,
            })?;
        }
        apply(&volume, r, progress)?;
        let name = r.header().source.snapshot.name.clone();
        let at = r.position();
        volume
            .create_snapshot(&name)
            .map_err(|err| StreamError::Engine {
                stream: r.name().to_string(),
                offset: at,
                context: format!("taking snapshot {name:?} of the new volume"),
                err,
            })?;
    }
    let id = volume.id();
    volume
        .close()
        .map_err(engine(format!("closing the volume in {}", dir.display())))?;
    Ok(id)
}

/// Writes every record of one stream to `volume`; returns once the trailer checked out.
fn apply<R: Read>(volume: &Volume, r: &mut StreamReader<R>, progress: &dyn Progress) -> Result<()> {
    while let Some(record) = r.next_record()? {
        let (result, offset, length) = match record {
            Record::Data { offset, data } => {
                let n = data.len() as u64;
                let res = volume.write(offset, data, false);
                progress.advance(n);
                (res, offset, n)
            }
            Record::Zero { offset, length } => {
                (volume.write_zeroes(offset, length), offset, length)
            }
        };
        result.map_err(|err| StreamError::Engine {
            stream: r.name().to_string(),
            offset: r.record_start(),
            context: format!("writing volume offset {offset} length {length} to the new volume"),
            err,
        })?;
    }
    Ok(())
}
