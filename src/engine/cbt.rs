//! Changed-block tracking read from a volume folder's files: the allocated blocks of a
//! snapshot and the blocks changed between two snapshots of one lineage, as a lazy stream
//! of runs. For callers that answer many volumes (the CSI node plugin) and must answer
//! whether or not a daemon serves the volume, so nothing here opens or locks the volume.
//!
//! - Only the manifest and sealed map journals are read. Both change only by atomic
//!   replacement, and a merge keeps the union of the maps it combines, so any mix of old
//!   and new versions of the layers named by one manifest gives the same answer; a layer
//!   file that vanished (merged meanwhile) makes the read start over from the manifest.
//! - Runs are produced on demand by a sweep over the layers' bitmaps, never collected:
//!   memory is the maps themselves (at most one bit per block of the volume per layer),
//!   whatever the number of runs.
//! - Lineage: a clone's inherited layers carry the snapshot of its source they belonged
//!   to ([`Ancestor`]), so a snapshot of a volume is recognised as the base of a snapshot
//!   of a volume restored or cloned from it, at any depth, whatever was deleted or merged
//!   in the source since.

use std::path::Path;

use roaring::RoaringBitmap;

use super::error::{EngineError, Result};
use super::extent::Extent;
use super::layer;
use super::layermap::LayerMap;
use super::manifest::{Ancestor, Manifest};
use super::maplog::MapLog;

/// How many times a read starts over when a merge removes a layer under it.
const ATTEMPTS: usize = 8;

/// What the runs are made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Blocks whose topmost entry among the layers is data.
    Allocated,
    /// Blocks any of the layers names (data or zeros).
    Changed,
}

/// One bitmap of one layer, with the next run of it not yet passed.
struct Stream {
    /// Stack position of its layer among the streamed ones (higher is newer).
    layer: usize,
    present: bool,
    iter: roaring::bitmap::IntoIter,
    /// The next run `[start, end)` ending after the sweep's position; None when done.
    cur: Option<(u64, u64)>,
    /// Nothing was taken from `iter` yet.
    fresh: bool,
}

impl Stream {
    /// Moves to the first run that ends after `pos`, clipped to `limit`.
    fn refill(&mut self, pos: u64, limit: u64) {
        match self.cur {
            Some((a, e)) if e > pos => {
                self.cur = Some((a.max(pos), e));
                return;
            }
            // Done: the bitmap has nothing after the previous position.
            None if !self.fresh => return,
            _ => {}
        }
        self.fresh = false;
        if pos > u64::from(u32::MAX) {
            self.cur = None;
            return;
        }
        self.iter.advance_to(pos as u32);
        self.cur = self.iter.next_range().and_then(|r| {
            let (s, e) = (u64::from(*r.start()).max(pos), u64::from(*r.end()) + 1);
            (s < limit).then_some((s, e.min(limit)))
        });
    }
}

/// The runs of blocks of an answer, in increasing order, as byte extents; maximal (no two
/// touch) and never before the starting block. Lazy: each run is found when asked for.
pub struct BlockRuns {
    mode: Mode,
    streams: Vec<Stream>,
    block_size: u32,
    /// The snapshot's size in bytes (the target's, for changes).
    size: u64,
    /// One past the last block answered.
    limit: u64,
    /// The sweep's position, in blocks.
    pos: u64,
    pending: Option<(u64, u64)>,
}

impl BlockRuns {
    fn new(maps: Vec<LayerMap>, mode: Mode, size: u64, block_size: u32) -> BlockRuns {
        let mut streams = Vec::with_capacity(maps.len() * 2);
        for (layer, m) in maps.into_iter().enumerate() {
            for (present, bm) in [(true, m.present), (false, m.zeroed)] {
                if !bm.is_empty() {
                    streams.push(Stream {
                        layer,
                        present,
                        iter: bm.into_iter(),
                        cur: None,
                        fresh: true,
                    });
                }
            }
        }
        let mut runs = BlockRuns {
            mode,
            streams,
            block_size,
            size,
            limit: size / u64::from(block_size),
            pos: 0,
            pending: None,
        };
        runs.seek_block(0);
        runs
    }

    /// Runs of a stack of layer maps (bottom first; `present` and `zeroed` blocks of each):
    /// the allocated blocks of the snapshot they make when `allocated`, else every block
    /// any of them names. For tools and tests that build maps directly.
    pub fn from_maps(
        maps: Vec<(RoaringBitmap, RoaringBitmap)>,
        allocated: bool,
        size: u64,
        block_size: u32,
    ) -> BlockRuns {
        let maps = maps
            .into_iter()
            .map(|(present, zeroed)| LayerMap { present, zeroed })
            .collect();
        let mode = if allocated {
            Mode::Allocated
        } else {
            Mode::Changed
        };
        BlockRuns::new(maps, mode, size, block_size)
    }

    fn seek_block(&mut self, block: u64) {
        self.pos = block.min(self.limit);
        self.pending = None;
        let (pos, limit) = (self.pos, self.limit);
        for s in &mut self.streams {
            s.refill(pos, limit);
        }
    }

    /// Starts the answer at byte `offset` (rounded down to its block): no run ends at or
    /// before it, and a run that holds it starts at its block. Only before the first run
    /// is taken.
    pub fn starting_at(mut self, offset: u64) -> BlockRuns {
        self.seek_block(offset / u64::from(self.block_size));
        self
    }

    /// The snapshot's size in bytes (the target's, for changes).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The volume's block size.
    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    /// The next maximal run `[start, end)` in blocks.
    fn next_run(&mut self) -> Option<(u64, u64)> {
        loop {
            if self.pos >= self.limit {
                return self.pending.take();
            }
            let (pos, limit) = (self.pos, self.limit);
            let mut top: Option<(usize, bool)> = None;
            let mut active_end = u64::MAX;
            let mut next_start = u64::MAX;
            for s in &mut self.streams {
                if matches!(s.cur, Some((_, e)) if e <= pos) {
                    s.refill(pos, limit);
                }
                let Some((a, e)) = s.cur else { continue };
                if a <= pos {
                    active_end = active_end.min(e);
                    if top.is_none_or(|(l, _)| s.layer > l) {
                        top = Some((s.layer, s.present));
                    }
                } else {
                    next_start = next_start.min(a);
                }
            }
            let Some((_, present)) = top else {
                // A gap: jump to the next run of any layer.
                self.pos = next_start.min(limit);
                continue;
            };
            let seg_end = active_end.min(next_start).min(limit);
            self.pos = seg_end;
            if self.mode == Mode::Allocated && !present {
                continue;
            }
            match self.pending {
                Some((s, e)) if e == pos => self.pending = Some((s, seg_end)),
                Some(run) => {
                    self.pending = Some((pos, seg_end));
                    return Some(run);
                }
                None => self.pending = Some((pos, seg_end)),
            }
        }
    }
}

impl Iterator for BlockRuns {
    type Item = Extent;

    fn next(&mut self) -> Option<Extent> {
        let bs = u64::from(self.block_size);
        self.next_run().map(|(s, e)| Extent {
            offset: s * bs,
            length: (e - s) * bs,
        })
    }
}

/// The blocks of snapshot `snapshot_id` of the volume in `dir` that hold data (the rest
/// reads as zeros): what a full backup copies.
pub fn allocated_runs(dir: &Path, snapshot_id: u64) -> Result<BlockRuns> {
    with_retries(|| {
        let m = Manifest::load(dir)?;
        let (pos, size) = snapshot_pos(&m, snapshot_id)?;
        let maps = read_maps(dir, &m, 0, pos + 1)?;
        Ok(BlockRuns::new(maps, Mode::Allocated, size, m.block_size))
    })
}

/// The blocks written or discarded after snapshot `base_id` of the volume in `base_dir`
/// up to snapshot `target_id` of the volume in `target_dir`: what an incremental backup
/// copies. The two may be snapshots of one volume (the base older), or the target's
/// volume a restore or clone (at any depth) of a snapshot the base is older than or equal
/// to. Anything else is [`EngineError::Unrelated`]; a base or target that does not exist
/// is [`EngineError::SnapshotIdNotFound`].
pub fn changed_runs(
    base_dir: &Path,
    base_id: u64,
    target_dir: &Path,
    target_id: u64,
) -> Result<BlockRuns> {
    with_retries(|| {
        let mt = Manifest::load(target_dir)?;
        let (t, size) = snapshot_pos(&mt, target_id)?;
        let mb = Manifest::load(base_dir)?;
        let base = mb
            .snapshot_by_id(base_id)
            .ok_or(EngineError::SnapshotIdNotFound(base_id))?;
        let b = if mb.volume_id == mt.volume_id {
            let b = mt
                .layer_pos(base.layer)
                .ok_or_else(|| missing_layer(base.layer))?;
            if b >= t {
                return Err(EngineError::Invalid(format!(
                    "snapshot {base_id} is not older than snapshot {target_id}"
                )));
            }
            b
        } else {
            let mark = Ancestor {
                volume_id: mb.volume_id.clone(),
                snapshot_id: base_id,
            };
            mt.layers[..t]
                .iter()
                .position(|l| l.ancestor.as_ref() == Some(&mark))
                .ok_or_else(|| {
                    EngineError::Unrelated(format!(
                        "snapshot {target_id} does not descend from snapshot {base_id} of volume {}: its volume is neither that volume nor restored or cloned from it after that snapshot (or was, before restores kept their lineage)",
                        mb.volume_id
                    ))
                })?
        };
        let maps = read_maps(target_dir, &mt, b + 1, t + 1)?;
        Ok(BlockRuns::new(maps, Mode::Changed, size, mt.block_size))
    })
}

/// Stack position and size of snapshot `id`.
fn snapshot_pos(m: &Manifest, id: u64) -> Result<(usize, u64)> {
    let s = m
        .snapshot_by_id(id)
        .ok_or(EngineError::SnapshotIdNotFound(id))?;
    let pos = m.layer_pos(s.layer).ok_or_else(|| missing_layer(s.layer))?;
    Ok((pos, s.size_in(m.size)))
}

fn missing_layer(id: u64) -> EngineError {
    EngineError::Invalid(format!("layer {id} of a snapshot is not in the stack"))
}

/// The sealed maps of the manifest's layers `[from, to)`.
fn read_maps(dir: &Path, m: &Manifest, from: usize, to: usize) -> Result<Vec<LayerMap>> {
    m.layers[from..to]
        .iter()
        .map(|l| MapLog::read_sealed(&layer::map_path(dir, l.id), l.id).map(|(m, _)| m))
        .collect()
}

/// Runs `f` again while it fails on a file that vanished: a merge replaced layers after
/// the manifest was read.
fn with_retries<T>(mut f: impl FnMut() -> Result<T>) -> Result<T> {
    let mut attempt = 0;
    loop {
        match f() {
            Err(EngineError::Io { err, path })
                if err.kind() == std::io::ErrorKind::NotFound && attempt + 1 < ATTEMPTS =>
            {
                tracing::debug!(file = %path.display(), "a layer was merged while its map was read; reading again");
                attempt += 1;
            }
            r => return r,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bm(blocks: &[u32]) -> RoaringBitmap {
        blocks.iter().copied().collect()
    }

    fn runs(
        maps: Vec<(RoaringBitmap, RoaringBitmap)>,
        allocated: bool,
        from: u64,
    ) -> Vec<(u64, u64)> {
        BlockRuns::from_maps(maps, allocated, 1 << 20, 1)
            .starting_at(from)
            .map(|e| (e.offset, e.offset + e.length))
            .collect()
    }

    #[test]
    fn allocated_takes_the_topmost_entry() {
        let lower = (bm(&[0, 1, 2, 3, 10, 11]), bm(&[20]));
        let upper = (bm(&[3, 4, 20]), bm(&[1, 11]));
        let r = runs(vec![lower.clone(), upper.clone()], true, 0);
        assert_eq!(r, vec![(0, 1), (2, 5), (10, 11), (20, 21)]);
        let r = runs(vec![lower, upper], false, 0);
        assert_eq!(r, vec![(0, 5), (10, 12), (20, 21)]);
    }

    #[test]
    fn runs_merge_across_containers_and_start_where_asked() {
        let mut a = RoaringBitmap::new();
        a.insert_range(65_000..70_000);
        let mut b = RoaringBitmap::new();
        b.insert_range(70_000..70_010);
        b.insert(200_000);
        let maps = vec![(a, RoaringBitmap::new()), (b, RoaringBitmap::new())];
        assert_eq!(
            runs(maps.clone(), true, 0),
            vec![(65_000, 70_010), (200_000, 200_001)]
        );
        assert_eq!(
            runs(maps.clone(), false, 66_000),
            vec![(66_000, 70_010), (200_000, 200_001)]
        );
        assert_eq!(runs(maps.clone(), false, 70_010), vec![(200_000, 200_001)]);
        assert!(runs(maps, false, 200_001).is_empty());
    }

    #[test]
    fn runs_stop_at_the_size() {
        let maps = vec![(bm(&[5, 6, 7, 9]), RoaringBitmap::new())];
        let r: Vec<_> = BlockRuns::from_maps(maps, true, 7 * 512, 512).collect();
        assert_eq!(
            r,
            vec![Extent {
                offset: 5 * 512,
                length: 2 * 512
            }]
        );
    }

    #[test]
    fn the_last_block_index_is_handled() {
        let maps = vec![(bm(&[u32::MAX - 1, u32::MAX]), RoaringBitmap::new())];
        let r: Vec<_> = BlockRuns::from_maps(maps, false, 1 << 32, 1)
            .map(|e| (e.offset, e.length))
            .collect();
        assert_eq!(r, vec![(u64::from(u32::MAX) - 1, 2)]);
    }
}
