//! One layer of a volume: a sparse data file, its map, and for the writable head the
//! journal and the count of writes in flight that a cut drains.
//!
//! A layer keeps its blocks in one of two layouts. **Slotted** (every head made by this
//! build): block `b` lives in the slot its [`SlotTable`] names, and the file is as long as
//! its slots (plus the head's prepared reserve). **Identity** (layers of older builds and
//! merge results): block `b` at offset `b * block_size`; the head's file has the volume's
//! size, and a frozen layer's file keeps the size the volume had when it was sealed (a
//! volume only grows, and a frozen file may be shared with clones, so it is never
//! extended): at most the volume's size, and long enough for every block its map names.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex, RwLock};
use roaring::RoaringBitmap;
use smallvec::SmallVec;

use super::error::{EngineError, Result};
use super::layermap::LayerMap;
use super::maplog::MapLog;
use super::slots::{SlotAlloc, SlotRun, SlotTable};
use super::vlog::{self, Change, RecordError, VolatileLog};

/// Folder of the layer files inside a volume folder.
pub const LAYERS_DIR: &str = "layers";

/// Path of layer `id`'s data file.
pub fn data_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(LAYERS_DIR).join(format!("{id}.data"))
}

/// Path of layer `id`'s map log.
pub fn map_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(LAYERS_DIR).join(format!("{id}.map"))
}

/// A layer's map and, for the head, the blocks changed since the last flush.
#[derive(Default)]
pub struct LayerState {
    pub map: LayerMap,
    /// Blocks whose state changed since the last flush: their final state goes into the
    /// next journal record.
    pub touched: RoaringBitmap,
    /// The head's volatile journal: every change, recorded before it is acknowledged, so a
    /// new daemon finds it after this one dies (see [`vlog`]).
    pub vlog: Option<VolatileLog>,
    /// Where each block is in the data file (None: the identity layout).
    pub slots: Option<SlotTable>,
    /// Where a slotted head takes new slots from (None once sealed).
    pub alloc: Option<SlotAlloc>,
}

/// A part of a write: blocks `[block, block + count)` go to the file at `file_block`
/// (in blocks; the slot of `block`, or `block` itself in the identity layout).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placed {
    pub block: u32,
    pub file_block: u32,
    pub count: u32,
}

impl LayerState {
    /// True when the volatile journal is filling up: unflushed changes pile up.
    pub fn wants_flush(&self) -> bool {
        self.vlog.as_ref().is_some_and(VolatileLog::wants_flush)
    }

    /// Records a change of blocks `[start, end)` in the volatile journal, then in the map
    /// and the pending set. Nothing changes when the journal cannot record it.
    /// `slot`: where a write to a slotted layer put block `start` (the others follow).
    pub fn change(
        &mut self,
        kind: Change,
        start: u32,
        end: u64,
        slot: Option<u32>,
    ) -> std::result::Result<(), RecordError> {
        let Some(range) = super::extent::span(start, end) else {
            return Ok(());
        };
        if let Some(v) = &mut self.vlog {
            v.record(kind, *range.start(), *range.end(), slot)?;
        }
        if let (Some(t), Some(s)) = (&mut self.slots, slot) {
            t.set_run((start, s, range.end() - range.start() + 1));
        }
        match kind {
            Change::Written => self.map.mark_written(start, end),
            Change::Zeroed => self.map.mark_zeroed(start, end),
            Change::Cleared => self.map.clear(start, end),
        }
        self.touched.insert_range(range);
        Ok(())
    }
}

/// A layer of the stack. Frozen layers never change their map in place: a merge builds a
/// new `Layer` and swaps the stack.
pub struct Layer {
    pub id: u64,
    pub data: File,
    pub data_path: PathBuf,
    /// Blocks live in slots (see [`SlotTable`]), not at their own offsets.
    pub slotted: bool,
    pub state: RwLock<LayerState>,
    /// The map journal of a head, until its seal is durable (None for layers opened
    /// frozen, and once sealed: a volume with a thousand snapshots keeps one open file
    /// per layer, not two).
    log: Mutex<Option<MapLog>>,
    /// The journal ends with a seal: no write may land here any more.
    pub sealed: AtomicBool,
    /// A cut sealed this slotted head: the preparer is to give its unused reserve back and
    /// compact its slot table.
    pub tidy: AtomicBool,
    /// Why a flush of this layer failed. Linux reports a writeback error once per open
    /// file: a second fdatasync may return 0 although the data never reached the disk, so
    /// once a flush failed, every later one fails too, until the volume is reopened.
    failed: Mutex<Option<String>>,
    /// Held while the preparer writes zeros into this layer, and while its reserve is
    /// given back: the two never overlap.
    pub prep: Mutex<()>,
    inflight: AtomicU64,
    draining: AtomicBool,
    drain_lock: Mutex<()>,
    drained: Condvar,
}

/// Opens a data file for I/O, with O_DIRECT when asked and the file system allows it.
fn open_data(path: &Path, direct: bool, create_size: Option<u64>) -> Result<File> {
    let mut opts = OpenOptions::new();
    opts.read(true).write(true);
    if create_size.is_some() {
        opts.create_new(true).mode(super::fsutil::PRIVATE_FILE);
    }
    if direct {
        let mut d = opts.clone();
        d.custom_flags(libc::O_DIRECT);
        match d.open(path) {
            Ok(f) => return finish_data(f, path, create_size),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                tracing::debug!(path = %path.display(), "O_DIRECT refused by the file system; using buffered I/O");
            }
            Err(e) => return Err(EngineError::io(path, e)),
        }
    }
    let f = opts.open(path).map_err(|e| EngineError::io(path, e))?;
    finish_data(f, path, create_size)
}

fn finish_data(f: File, path: &Path, create_size: Option<u64>) -> Result<File> {
    if let Some(size) = create_size {
        f.set_len(size).map_err(|e| EngineError::io(path, e))?;
    }
    Ok(f)
}

impl Layer {
    fn new(
        id: u64,
        data: File,
        data_path: PathBuf,
        mut state: LayerState,
        log: Option<MapLog>,
        sealed: bool,
    ) -> Layer {
        if sealed {
            if let Some(t) = state.slots.as_mut() {
                t.freeze();
            }
        }
        Layer {
            id,
            data,
            data_path,
            slotted: state.slots.is_some(),
            state: RwLock::new(state),
            log: Mutex::new(log),
            sealed: AtomicBool::new(sealed),
            tidy: AtomicBool::new(false),
            inflight: AtomicU64::new(0),
            draining: AtomicBool::new(false),
            drain_lock: Mutex::new(()),
            drained: Condvar::new(),
            failed: Mutex::new(None),
            prep: Mutex::new(()),
        }
    }

    /// Creates the files of a new, empty head layer, whose volatile journal carries
    /// `incarnation` (the manifest must name the layer with it before any write to it is
    /// acknowledged). Only their folder entries must be made durable (sync the layers
    /// folder) before anything refers to the layer: the data file's size and the journal's
    /// header become durable with the layer's first flush, and [`Layer::open_head`]
    /// accepts a head whose creation a crash left incomplete.
    pub fn create_head(
        dir: &Path,
        id: u64,
        size: u64,
        direct: bool,
        volume_id: &str,
        incarnation: &str,
    ) -> Result<Layer> {
        let inc = incarnation_bytes(dir, id, incarnation)?;
        let dpath = data_path(dir, id);
        let slotted = super::prepare::slotted_heads();
        let data = open_data(&dpath, direct, Some(if slotted { 0 } else { size }))?;
        let log = MapLog::create(&map_path(dir, id), id, slotted)?;
        let vlog = VolatileLog::create(
            &vlog::path_for(volume_id, id, &dir.join(LAYERS_DIR)),
            id,
            &inc,
            vlog::budget(),
        )?;
        let state = LayerState {
            vlog: Some(vlog),
            slots: slotted.then(SlotTable::default),
            alloc: slotted.then(SlotAlloc::default),
            ..LayerState::default()
        };
        Ok(Layer::new(id, data, dpath, state, Some(log), false))
    }

    /// Creates an empty frozen layer with no journals: the target of a merge, whose map
    /// the caller writes; `size` is the length of the layer it replaces.
    pub fn create_merge_target(dir: &Path, id: u64, size: u64, direct: bool) -> Result<Layer> {
        let dpath = data_path(dir, id);
        let data = open_data(&dpath, direct, Some(size))?;
        Ok(Layer::new(
            id,
            data,
            dpath,
            LayerState::default(),
            None,
            true,
        ))
    }

    /// Opens the head layer `id` (or a layer whose seal a crash interrupted), replaying
    /// its map journal and the volatile journal of its incarnation `incarnation`.
    pub fn open_head(
        dir: &Path,
        id: u64,
        size: u64,
        block_size: u32,
        direct: bool,
        volume_id: &str,
        incarnation: &str,
    ) -> Result<Layer> {
        let inc = incarnation_bytes(dir, id, incarnation)?;
        let dpath = data_path(dir, id);
        let data = open_data(&dpath, direct, None)?;
        let len = data
            .metadata()
            .map_err(|e| EngineError::io(&dpath, e))?
            .len();
        // A journal whose creation was interrupted restarts as a slotted one: its layer
        // holds nothing flushed, whatever the length of its data file.
        let mpath = map_path(dir, id);
        let (log, replayed) = MapLog::open_head(&mpath, id, super::prepare::slotted_heads())?;
        // Before any length fix-up below: a map past the volume's end means the size in the
        // manifest is wrong, and cutting the file back to it would lose data.
        check_within(&replayed.map, &mpath, size, block_size)?;
        if replayed.slots.is_some() {
            // A slotted head's file is as long as its slots: checked after the replay.
        } else if len < size {
            // A head created just before a crash, whose size was never flushed, or a grow
            // that committed before the file's new length was durable: it holds no flushed
            // data past its end (data is synced before the map names it).
            tracing::info!(path = %dpath.display(), len, size, "extending a head layer whose creation or growth was interrupted");
            data.set_len(size).map_err(|e| EngineError::io(&dpath, e))?;
        } else if len > size {
            // A grow interrupted before its manifest commit: requests were checked against
            // the committed size, so nothing was written past it.
            tracing::info!(path = %dpath.display(), len, size, "cutting back a head layer whose growth did not commit");
            data.set_len(size).map_err(|e| EngineError::io(&dpath, e))?;
        }
        if replayed.slots.is_none() {
            check_size(&data, &dpath, size)?;
        }
        let mut map = replayed.map;
        let mut slots = replayed.slots;
        // Changes acknowledged by a daemon that died before flushing them (same boot only).
        let (vlog, changes) = VolatileLog::open(
            &vlog::path_for(volume_id, id, &dir.join(LAYERS_DIR)),
            id,
            &inc,
            size / u64::from(block_size),
            vlog::budget(),
        )?;
        let touched = vlog::apply(&mut map, slots.as_mut(), &changes);
        if !changes.is_empty() {
            tracing::info!(
                layer = id,
                changes = changes.len(),
                blocks = touched.len(),
                "recovered writes acknowledged but not flushed before the previous process ended"
            );
        }
        map.optimize();
        let alloc = match &slots {
            Some(t) => {
                check_slots(&map, t, &dpath, len, block_size)?;
                Some(SlotAlloc::open(&t.used(), len / u64::from(block_size)))
            }
            None => None,
        };
        let state = LayerState {
            map,
            touched,
            vlog: Some(vlog),
            slots: slots.take(),
            alloc,
        };
        Ok(Layer::new(id, data, dpath, state, Some(log), false))
    }

    /// Opens the frozen layer `id` of a volume of `size` bytes; its map must be whole and
    /// sealed, and its data file must hold every block the map names.
    pub fn open_frozen(
        dir: &Path,
        id: u64,
        size: u64,
        block_size: u32,
        direct: bool,
    ) -> Result<Layer> {
        let dpath = data_path(dir, id);
        let data = open_data(&dpath, direct, None)?;
        let len = data
            .metadata()
            .map_err(|e| EngineError::io(&dpath, e))?
            .len();
        let mpath = map_path(dir, id);
        let (mut map, slots) = MapLog::read_sealed(&mpath, id)?;
        check_within(&map, &mpath, size, block_size)?;
        if let Some(t) = &slots {
            check_slots(&map, t, &dpath, len, block_size)?;
        } else if len > size {
            return Err(EngineError::corrupt(
                &dpath,
                format!("layer data file is {len} bytes, larger than the volume ({size} bytes)"),
            ));
        } else if let Some(last) = map.present.max() {
            let need = (u64::from(last) + 1) * u64::from(block_size);
            if need > len {
                return Err(EngineError::corrupt(
                    &dpath,
                    format!(
                        "layer data file is {len} bytes, but its map names data up to byte {need}"
                    ),
                ));
            }
        }
        map.optimize();
        let state = LayerState {
            map,
            slots,
            ..LayerState::default()
        };
        Ok(Layer::new(id, data, dpath, state, None, true))
    }

    /// A frozen twin of this layer with another map and placements (same data file), for
    /// merges. `slots` must be None for an identity layer, Some for a slotted one.
    pub fn with_map(&self, map: LayerMap, slots: Option<SlotTable>) -> Result<Layer> {
        let data = self
            .data
            .try_clone()
            .map_err(|e| EngineError::io(&self.data_path, e))?;
        let state = LayerState {
            map,
            slots,
            ..LayerState::default()
        };
        Ok(Layer::new(
            self.id,
            data,
            self.data_path.clone(),
            state,
            None,
            true,
        ))
    }

    /// True when another volume (a clone) shares this layer's files: they must not change.
    pub fn is_shared(&self) -> Result<bool> {
        for p in [self.data_path.clone(), self.data_path.with_extension("map")] {
            let md = std::fs::metadata(&p).map_err(|e| EngineError::io(&p, e))?;
            if md.nlink() > 1 {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Counts a write that is about to land in this layer.
    pub fn enter(&self) {
        self.inflight.fetch_add(1, Ordering::SeqCst);
    }

    /// Ends a write counted by [`Layer::enter`], waking a cut that waits for the drain.
    pub fn leave(&self) {
        if self.inflight.fetch_sub(1, Ordering::SeqCst) == 1 && self.draining.load(Ordering::SeqCst)
        {
            let _g = self.drain_lock.lock();
            self.drained.notify_all();
        }
    }

    /// Waits until no write is in flight to this layer; returns how long it waited.
    pub fn wait_drained(&self) -> Duration {
        let start = Instant::now();
        self.draining.store(true, Ordering::SeqCst);
        let mut g = self.drain_lock.lock();
        let mut warned = start;
        while self.inflight.load(Ordering::SeqCst) != 0 {
            self.drained.wait_for(&mut g, Duration::from_millis(100));
            if warned.elapsed() > Duration::from_secs(5) {
                tracing::warn!(
                    layer = self.id,
                    inflight = self.inflight.load(Ordering::SeqCst),
                    waited_ms = start.elapsed().as_millis() as u64,
                    "still waiting for writes in flight to finish before sealing the layer"
                );
                warned = Instant::now();
            }
        }
        drop(g);
        self.draining.store(false, Ordering::SeqCst);
        start.elapsed()
    }

    /// Makes every change to this layer so far durable: data first, then the journal
    /// record of the touched blocks, so a block's map entry is never durable before its data.
    pub fn flush(&self, seal: bool) -> Result<()> {
        let mut journal = self.log.lock();
        let Some(log) = journal.as_mut() else {
            return Ok(());
        };
        if let Some(why) = self.failed.lock().as_ref() {
            return Err(EngineError::io(
                &self.data_path,
                std::io::Error::other(format!(
                    "an earlier flush failed ({why}); writes since may not be on disk: reopen the volume to go on"
                )),
            ));
        }
        let (touched, present, zeroed, placed, compact, mark) = {
            let mut st = self.state.write();
            if st.touched.is_empty() && !seal {
                return Ok(());
            }
            let mark = st.vlog.as_ref().map(VolatileLog::mark);
            let touched = std::mem::take(&mut st.touched);
            let present = &st.map.present & &touched;
            let zeroed = &st.map.zeroed & &touched;
            let placed: Vec<SlotRun> = st
                .slots
                .as_ref()
                .map(|t| t.runs_of(&touched))
                .unwrap_or_default();
            // A journal much larger than the map it describes is rewritten as one checkpoint,
            // taken here, under the same lock, so it matches what the data sync covers.
            let size =
                st.map.serialized_size() + st.slots.as_ref().map_or(0, |t| t.len() as usize * 12);
            let compact = (log.len() > 4 * size as u64 + (4 << 20))
                .then(|| (st.map.clone(), st.slots.clone()));
            (touched, present, zeroed, placed, compact, mark)
        };
        // Which failures latch (see `failed`): a failed data or journal sync (the kernel
        // may have dropped the pages it could not write, and reports that only once), or
        // a journal whose failed append could not be cut back. A journal append that
        // failed and was cut back (a full disk), or a compaction that did not replace the
        // journal, changed nothing durable: the next flush tries again.
        let mut latch = true;
        let result: Result<()> = (|| {
            super::fsutil::sync_data(&self.data, &self.data_path)?;
            match &compact {
                Some((map, slots)) => {
                    latch = false;
                    *log = MapLog::write_compacted(
                        &self.data_path.with_extension("map"),
                        self.id,
                        map,
                        slots.as_ref(),
                        seal,
                    )?;
                }
                None => {
                    latch = false;
                    if !touched.is_empty() {
                        log.append_delta(&touched, &present, &zeroed, &placed)?;
                    }
                    if seal {
                        log.append_seal()?;
                    }
                    latch = true;
                    log.sync()?;
                }
            }
            Ok(())
        })();
        match result {
            Ok(()) => {
                let mut st = self.state.write();
                if seal {
                    self.sealed.store(true, Ordering::SeqCst);
                    self.tidy.store(self.slotted, Ordering::SeqCst);
                    // Everything is in the sealed map journal: the volatile one is done. Its
                    // file is removed off the cut's path (by maintain, or at the next open).
                    st.vlog = None;
                    // No more slots are handed out; the preparer gives the reserve back.
                    st.alloc = None;
                    // Nothing is appended to a sealed journal: close it.
                    *journal = None;
                } else if let (Some(v), Some(m)) = (&mut st.vlog, mark) {
                    v.covered(m);
                }
                Ok(())
            }
            Err(e) => {
                // Keep the blocks pending so the next flush records them again.
                self.state.write().touched |= touched;
                // A simulated crash is a test's way of stopping the process, not a disk
                // error: the test reopens the volume after it.
                // A compaction that failed after its rename leaves the journal open here
                // unlinked: appending to it would be lost.
                let latch = latch || log.damaged() || !log.is_current();
                if e.is_injected_crash() {
                    // Nothing to record.
                } else if latch {
                    tracing::error!(layer = self.id, file = %self.data_path.display(), error = %e, "flush failed: every later flush of this volume fails until it is reopened");
                    self.failed.lock().get_or_insert_with(|| e.to_string());
                } else {
                    tracing::warn!(layer = self.id, file = %self.data_path.display(), error = %e, "flush failed before anything changed on disk (the map journal could not grow); the next flush tries again");
                }
                Err(e)
            }
        }
    }

    /// Records a change of blocks `[start, end)` (data already in the file), before it is
    /// acknowledged; returns whether a flush is advised. When the volatile journal is
    /// full (no flush kept up), flushes here and records again: the journal never drops
    /// a change it has not seen covered. Fails, and the change must not be acknowledged,
    /// when shared memory is full or the forced flush fails.
    pub fn record(&self, kind: Change, start: u32, end: u64) -> Result<bool> {
        self.record_at(kind, start, end, None)
    }

    /// Records a write of the parts `placed` (data already in the file); see
    /// [`Layer::record`].
    pub fn record_write(&self, placed: &[Placed]) -> Result<bool> {
        let mut advised = false;
        for p in placed {
            let slot = self.slotted.then_some(p.file_block);
            advised |= self.record_at(
                Change::Written,
                p.block,
                u64::from(p.block) + u64::from(p.count),
                slot,
            )?;
        }
        Ok(advised)
    }

    fn record_at(&self, kind: Change, start: u32, end: u64, slot: Option<u32>) -> Result<bool> {
        for _ in 0..4 {
            let mut st = self.state.write();
            match st.change(kind, start, end, slot) {
                Ok(()) => return Ok(st.wants_flush()),
                Err(RecordError::Full) => {
                    drop(st);
                    tracing::info!(
                        layer = self.id,
                        "volatile journal full: flushing to make room"
                    );
                    self.flush(false)?;
                }
                Err(RecordError::NoSpace(e)) => {
                    let path = st
                        .vlog
                        .as_ref()
                        .map(|v| v.path().to_path_buf())
                        .unwrap_or_else(|| self.data_path.clone());
                    drop(st);
                    // Shared memory is full: flush, and go on in the part of the ring
                    // already reserved.
                    self.flush(false)?;
                    let mut st = self.state.write();
                    if st.vlog.as_mut().is_some_and(VolatileLog::rewind) {
                        tracing::warn!(layer = self.id, file = %path.display(), error = %e, "no room in shared memory to grow the volatile journal: flushing more often");
                        continue;
                    }
                    tracing::error!(layer = self.id, file = %path.display(), error = %e, "no room in shared memory for the volatile journal: write refused; free /dev/shm or lower {}", vlog::BUDGET_ENV);
                    // The raw error, so the request fails with ENOSPC.
                    return Err(EngineError::io(path, e));
                }
            }
        }
        Err(EngineError::io(
            &self.data_path,
            std::io::Error::other("the volatile journal stays full after flushing"),
        ))
    }

    /// Why a flush of this layer failed, if one did.
    pub fn flush_failure(&self) -> Option<String> {
        self.failed.lock().clone()
    }

    /// True when the volatile journal is filling up and a flush would be wise.
    pub fn wants_flush(&self) -> bool {
        self.state.read().wants_flush()
    }

    /// Length of the data file in bytes.
    pub fn data_len(&self) -> Result<u64> {
        Ok(self
            .data
            .metadata()
            .map_err(|e| EngineError::io(&self.data_path, e))?
            .len())
    }

    /// Blocks with data in this layer.
    pub fn present_blocks(&self) -> u64 {
        self.state.read().map.present.len()
    }

    /// Where a write of blocks `[start, end)` goes in this (head) layer's file: the
    /// blocks' slots, new ones taken for blocks that have none, or the blocks' own
    /// offsets in the identity layout. Fails only when a slotted layer's slot space is
    /// used up.
    pub fn place_write(
        &self,
        start: u32,
        end: u64,
        block_size: u32,
    ) -> Result<SmallVec<[Placed; 2]>> {
        let count = (end - u64::from(start)) as u32;
        let mut out = SmallVec::new();
        if !self.slotted {
            out.push(Placed {
                block: start,
                file_block: start,
                count,
            });
            return Ok(out);
        }
        {
            // Overwrites (the common case) need only the read lock.
            let st = self.state.read();
            if let Some(t) = &st.slots {
                if runs_in(t, start, count, &mut out) {
                    return Ok(out);
                }
            }
        }
        out.clear();
        let extend = self.place_new(start, end, &mut out)?;
        // Outside the lock: a write that lands past the end meanwhile only extends the
        // file itself.
        if let Some(len) = extend {
            if let Err(e) = self.data.set_len(len * u64::from(block_size)) {
                tracing::debug!(layer = self.id, error = %e, "could not extend a head's file ahead of its writes");
            }
        }
        Ok(out)
    }

    /// [`Layer::place_write`] under the state lock, taking slots for blocks that have
    /// none; returns the length (in slots) to give the file, if it is too short.
    fn place_new(
        &self,
        start: u32,
        end: u64,
        out: &mut SmallVec<[Placed; 2]>,
    ) -> Result<Option<u64>> {
        let mut extend = None;
        let mut st = self.state.write();
        let LayerState { slots, alloc, .. } = &mut *st;
        let (Some(t), Some(a)) = (slots.as_mut(), alloc.as_mut()) else {
            // Sealed meanwhile: a write that entered before the seal cannot land here.
            return Err(EngineError::Invalid(format!(
                "layer {} is sealed: no write may land in it",
                self.id
            )));
        };
        let mut b = start;
        while u64::from(b) < end {
            if let Some(s) = t.get(b) {
                push_run(out, b, s, 1);
                b += 1;
                continue;
            }
            // A run of blocks without a slot: consecutive new slots, as many as one take
            // gives.
            let mut n = 1u32;
            while u64::from(b + n) < end && t.get(b + n).is_none() {
                n += 1;
            }
            let Some((first, got)) = a.take(n) else {
                return Err(EngineError::io(
                    &self.data_path,
                    std::io::Error::from_raw_os_error(libc::ENOSPC),
                ));
            };
            for i in 0..got {
                t.set(b + i, first + i);
            }
            push_run(out, b, first, got);
            b += got;
            // Writes past the file's end extend it one by one, serialized by the file
            // system: make the file longer ahead of them (sparse, costs no space).
            if let Some(len) = a.extend_to(u64::from(first) + u64::from(got), EXTEND_SLOTS) {
                extend = Some(len);
            }
        }
        Ok(extend)
    }

    /// Where the blocks of `blocks` that this layer holds are in its file, as runs.
    pub fn file_runs(&self, blocks: &RoaringBitmap) -> Vec<Placed> {
        let st = self.state.read();
        match &st.slots {
            Some(t) => t
                .runs_of(blocks)
                .into_iter()
                .map(|(block, file_block, count)| Placed {
                    block,
                    file_block,
                    count,
                })
                .collect(),
            None => super::extent::runs(blocks)
                .map(|(s, e)| Placed {
                    block: s,
                    file_block: s,
                    count: (e - u64::from(s)) as u32,
                })
                .collect(),
        }
    }

    /// Where blocks `[start, start + count)` are in the file, for a read of blocks this
    /// layer owns: runs in block order (a block with no slot, which open refuses, is
    /// left out and reads as zeros).
    pub fn read_runs(&self, start: u32, count: u32, out: &mut SmallVec<[Placed; 4]>) {
        if !self.slotted {
            out.push(Placed {
                block: start,
                file_block: start,
                count,
            });
            return;
        }
        let st = self.state.read();
        if let Some(t) = &st.slots {
            for b in start..start + count {
                if let Some(s) = t.get(b) {
                    match out.last_mut() {
                        Some(p) if p.block + p.count == b && p.file_block + p.count == s => {
                            p.count += 1
                        }
                        _ => out.push(Placed {
                            block: b,
                            file_block: s,
                            count: 1,
                        }),
                    }
                }
            }
        }
    }

    /// Slots prepared ahead of need and not handed out yet (bytes, with `block_size`).
    pub fn reserve_bytes(&self, block_size: u32) -> u64 {
        self.state
            .read()
            .alloc
            .as_ref()
            .map_or(0, |a| a.reserve() * u64::from(block_size))
    }

    /// Turns a sealed head's slot table into its compact form ([`SlotTable::freeze`]): a
    /// volume keeps every snapshot's table in memory. The copy is built under the read
    /// lock, so reads of the layer wait only for the swap.
    pub fn compact_slots(&self) {
        if !self.sealed.load(Ordering::SeqCst) {
            return;
        }
        let compact = match &self.state.read().slots {
            Some(t) if !t.is_frozen() => t.frozen_copy(),
            _ => return,
        };
        let mut st = self.state.write();
        if let Some(t) = st.slots.as_mut() {
            // A sealed table never changes; the check only guards that rule.
            if t.len() == compact.len() && t.end() == compact.end() {
                *t = compact;
            }
        }
    }

    /// Gives back the space of a sealed slotted layer's file that no block uses (the
    /// head's prepared reserve): punches unused slots and cuts the file after the last
    /// used one. Nothing reads those slots, so readers are not disturbed.
    pub fn trim_reserve(&self, block_size: u32) -> Result<u64> {
        let _one = self.prep.lock();
        if !self.sealed.load(Ordering::SeqCst) {
            return Ok(0);
        }
        let (used, end) = {
            let st = self.state.read();
            match &st.slots {
                Some(t) => (t.used(), t.end()),
                None => return Ok(0),
            }
        };
        let bs = u64::from(block_size);
        let len = self.data_len()?;
        let mut freed = 0;
        if len > end * bs {
            self.data
                .set_len(end * bs)
                .map_err(|e| EngineError::io(&self.data_path, e))?;
            freed += len - end * bs;
        }
        let mut at = 0u64;
        for (s, e) in super::extent::runs(&used) {
            if u64::from(s) > at {
                super::fsutil::punch_hole(
                    &self.data,
                    &self.data_path,
                    at * bs,
                    (u64::from(s) - at) * bs,
                )?;
                freed += (u64::from(s) - at) * bs;
            }
            at = e;
        }
        Ok(freed)
    }
}

/// How far past the slots in use a head's file is made long ahead of its writes.
const EXTEND_SLOTS: u64 = 16384;

/// Appends the run `(block, slot, n)` to `out`, merged with the last run when it follows.
fn push_run(out: &mut SmallVec<[Placed; 2]>, block: u32, slot: u32, n: u32) {
    match out.last_mut() {
        Some(p) if p.block + p.count == block && p.file_block + p.count == slot => p.count += n,
        _ => out.push(Placed {
            block,
            file_block: slot,
            count: n,
        }),
    }
}

/// The runs of blocks `[start, start + count)` in `t`; false if a block has no slot.
fn runs_in(t: &SlotTable, start: u32, count: u32, out: &mut SmallVec<[Placed; 2]>) -> bool {
    for b in start..start + count {
        match t.get(b) {
            Some(s) => push_run(out, b, s, 1),
            None => return false,
        }
    }
    true
}

/// Refuses a layer map (read from `path`) that names blocks past the end of a volume of
/// `size` bytes: no request reaches them, so only a wrong size in the manifest (one from
/// before a grow, say) or a map from another volume explains them. Serving on would show
/// a device too small for its data, and an identity head would be cut back to that size.
fn check_within(map: &LayerMap, path: &Path, size: u64, block_size: u32) -> Result<()> {
    let blocks = size / u64::from(block_size);
    let last = map.present.max().into_iter().chain(map.zeroed.max()).max();
    match last {
        Some(b) if u64::from(b) >= blocks => Err(EngineError::corrupt(
            path,
            format!(
                "the map names block {b}, past the end of the volume ({size} bytes, {blocks} \
                 blocks): the manifest's size is smaller than the data it describes (a \
                 manifest from before a grow?) or the map is another volume's"
            ),
        )),
        _ => Ok(()),
    }
}

/// Refuses a slotted layer whose placements do not fit its file or leave a block with
/// data but no slot.
fn check_slots(
    map: &LayerMap,
    t: &SlotTable,
    path: &Path,
    len: u64,
    block_size: u32,
) -> Result<()> {
    let need = t.end() * u64::from(block_size);
    if need > len {
        return Err(EngineError::corrupt(
            path,
            format!("layer data file is {len} bytes, but its map names slots up to byte {need}"),
        ));
    }
    if let Some(b) = map.present.iter().find(|&b| t.get(b).is_none()) {
        return Err(EngineError::corrupt(
            path,
            format!("block {b} has data in the layer but no slot in its file"),
        ));
    }
    Ok(())
}

/// The bytes of layer `id`'s incarnation, or a corruption report naming the manifest.
fn incarnation_bytes(dir: &Path, id: u64, incarnation: &str) -> Result<[u8; 16]> {
    vlog::parse_incarnation(incarnation).ok_or_else(|| {
        EngineError::corrupt(
            super::manifest::Manifest::path(dir),
            format!("layer {id} has a malformed incarnation {incarnation:?}"),
        )
    })
}

fn check_size(f: &File, path: &Path, size: u64) -> Result<()> {
    let len = f.metadata().map_err(|e| EngineError::io(path, e))?.len();
    if len != size {
        return Err(EngineError::corrupt(
            path,
            format!("layer data file is {len} bytes, the volume is {size} bytes"),
        ));
    }
    Ok(())
}
