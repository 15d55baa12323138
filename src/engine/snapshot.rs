//! Snapshots: the cut that seals the head, the snapshot list, reading a snapshot, and
//! changed-block tracking between snapshots.

use std::sync::Arc;
use std::time::{Duration, Instant};

use roaring::RoaringBitmap;
use serde::{Deserialize, Serialize};

use super::error::{EngineError, Result};
use super::extent::{self, Extent};
use super::fsutil;
use super::layer::{self, Layer};
use super::manifest::{LayerEntry, SnapshotEntry};
use super::plan;
use super::volume::{check_request, now_ms, read_plan, Meta, Stack, Volume};

/// A moment between two steps of a cut where a test may stop it (nothing to do in a
/// production build).
fn fault_point(what: &'static str) -> Result<()> {
    super::faults::crash_point(what)
}

/// Removes the files of layer `id`, which no manifest names (best effort: the next open
/// removes what is left).
fn remove_layer_files(dir: &std::path::Path, volume_id: &str, id: u64) {
    let layers_dir = dir.join(layer::LAYERS_DIR);
    for p in [
        layer::data_path(dir, id),
        layer::map_path(dir, id),
        super::vlog::path_for(volume_id, id, &layers_dir),
    ] {
        match std::fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(file = %p.display(), error = %e, "cannot remove a layer file of a failed cut")
            }
        }
    }
}

/// What a snapshot is, as listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    pub id: u64,
    pub name: String,
    pub created_unix_ms: u64,
    /// Size of the volume when it was taken, in bytes (a later grow does not change it).
    pub size: u64,
    /// Bytes of data held by the snapshot's own layer (written between the previous
    /// snapshot and this one): what deleting it may give back.
    pub owned_bytes: u64,
}

/// The result of taking a snapshot, with the timings an operator wants to see.
#[derive(Debug, Clone, Serialize)]
pub struct CutReport {
    pub snapshot: SnapshotInfo,
    /// Time spent creating the new head's files (step 1 of the cut).
    pub prepare: Duration,
    /// Time spent committing the manifest and switching writes (steps 2 and 3): the only
    /// part a frozen file system has to wait for.
    pub switch: Duration,
    /// Time spent draining, sealing and recording the seal of the old head (steps 4 and 5).
    pub seal: Duration,
    /// Time spent waiting for writes in flight to the old head to finish (part of `seal`).
    pub drain: Duration,
    /// The three parts together (not the time between them).
    pub total: Duration,
}

/// A cut whose new head exists (step 1 of the cut) but which nothing refers to yet:
/// writes still go to the old head. [`Volume::switch_cut`] takes it on; dropped instead
/// (a freeze that failed or took too long), it removes the new head's files.
pub struct PreparedCut {
    volume: Volume,
    name: String,
    /// None once taken on by [`Volume::switch_cut`].
    head: Option<Arc<Layer>>,
    id: u64,
    incarnation: String,
    /// The volume's size the head was made for (a grow meanwhile is caught up with).
    size: u64,
    volume_id: String,
    /// Device and inode of the new head's volatile journal when it was made: a merge in
    /// the gap removes the journals of layers outside the stack, this one included.
    journal: Option<(u64, u64)>,
    prepare: Duration,
}

impl PreparedCut {
    /// The snapshot's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Forgets the new head without removing its files: after a simulated death, only the
    /// next open may clean up.
    fn disown(&mut self) {
        self.head = None;
    }

    /// Drops the prepared cut as a death would: its files stay for the next open to
    /// remove. For crash tests only.
    #[cfg(any(test, feature = "fault-injection"))]
    pub fn drop_as_in_a_death(mut self) {
        self.disown();
    }
}

impl Drop for PreparedCut {
    fn drop(&mut self) {
        if let Some(head) = self.head.take() {
            drop(head);
            remove_layer_files(&self.volume.inner.dir, &self.volume_id, self.id);
            tracing::info!(volume = %self.volume.inner.name, snapshot = %self.name, "prepared cut abandoned; its new head's files are removed");
        }
    }
}

/// A cut whose writes go to the new head already (steps 1 to 3 done): the snapshot exists
/// and is durable; [`Volume::finish_cut`] drains and seals the old head. Dropped instead,
/// the next flush or cut seals it.
pub struct PendingSeal {
    old_head: Arc<Layer>,
    entry: SnapshotEntry,
    size: u64,
    volume_id: String,
    prepare: Duration,
    switch: Duration,
}

impl PendingSeal {
    /// The snapshot's name.
    pub fn name(&self) -> &str {
        &self.entry.name
    }
}

/// Checks a snapshot name: 1 to 128 characters of `[A-Za-z0-9._-]`, not starting with
/// `.` or `-` (so it is also a safe file name and command-line argument).
pub fn validate_snapshot_name(name: &str) -> Result<()> {
    let ok_chars = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if name.is_empty() || name.len() > 128 || !ok_chars || name.starts_with(['.', '-']) {
        return Err(EngineError::InvalidName(format!(
            "snapshot name {name:?}: use 1 to 128 characters of letters, digits, '.', '_' and '-', not starting with '.' or '-'"
        )));
    }
    Ok(())
}

impl Volume {
    /// Takes a snapshot called `name`: the volume's content with every write acknowledged
    /// before the call. Copies no data; writes never wait for it (they only go on to the
    /// new head once the manifest names it).
    ///
    /// Order, so that every acknowledged write is, at every instant, in a layer the
    /// manifest names together with the volatile journal that holds it (the daemon may
    /// die anywhere): create the new head's files; commit the manifest naming the new head
    /// and the old head below it, both with their incarnations; only then switch writes to
    /// the new head; drain and seal the old one; remove its volatile journal. A failed
    /// commit switches nothing: writes keep going to the old head and the snapshot fails.
    ///
    /// The three parts are [`Volume::prepare_cut`], [`Volume::switch_cut`] and
    /// [`Volume::finish_cut`]: a caller that freezes a file system for the cut freezes it
    /// only around the switch.
    pub fn create_snapshot(&self, name: &str) -> Result<CutReport> {
        let prepared = self.prepare_cut(name)?;
        let pending = self.switch_cut(prepared)?;
        self.finish_cut(pending)
    }

    /// Step 1 of a cut: checks the name (refusing one in use) and creates the new head's
    /// files, then syncs the layers folder. Writes go on to the old head; nothing names the
    /// new files yet (should the daemon die, the open removes them).
    pub fn prepare_cut(&self, name: &str) -> Result<PreparedCut> {
        self.prepare(name).map_err(|e| self.noted(e))
    }

    fn prepare(&self, name: &str) -> Result<PreparedCut> {
        validate_snapshot_name(name)?;
        let t0 = Instant::now();
        let (new_id, size, volume_id) = {
            let mut meta = self.inner.meta.lock();
            if meta.manifest.snapshot(name).is_some() {
                return Err(EngineError::SnapshotExists(name.to_string()));
            }
            self.check_cut_allowed(&mut meta)?;
            // The size only changes under the metadata lock; a grow before the switch is
            // caught up with there.
            (
                meta.take_layer_id(),
                meta.manifest.size,
                meta.manifest.volume_id.clone(),
            )
        };
        let incarnation = super::vlog::new_incarnation();
        let layers_dir = self.inner.dir.join(layer::LAYERS_DIR);
        let created = Layer::create_head(
            &self.inner.dir,
            new_id,
            size,
            self.inner.direct,
            &volume_id,
            &incarnation,
        );
        let mut prepared = PreparedCut {
            volume: self.clone(),
            name: name.to_string(),
            head: None,
            id: new_id,
            incarnation,
            size,
            volume_id,
            journal: None,
            prepare: Duration::ZERO,
        };
        match created {
            Ok(l) => {
                // Space for the first writes after the snapshot, written now, before any
                // freeze (the preparer goes on once the head serves).
                let reserve = self.head_reserve(size);
                super::prepare::prepare_first(&l, reserve, self.inner.block_size, &self.inner.dir);
                prepared.head = Some(Arc::new(l));
            }
            Err(e) => {
                if !e.is_injected_crash() {
                    remove_layer_files(&self.inner.dir, &prepared.volume_id, new_id);
                }
                return Err(e);
            }
        }
        // The new files' folder entries are durable before a manifest names them.
        let synced = fsutil::sync_dir(&layers_dir).and_then(|()| fault_point("cut:prepared"));
        if let Err(e) = synced {
            if e.is_injected_crash() {
                prepared.disown();
            }
            return Err(e);
        }
        prepared.journal = self.journal_identity(new_id, &prepared.volume_id);
        prepared.prepare = t0.elapsed();
        Ok(prepared)
    }

    /// Device and inode of layer `id`'s volatile journal file, if it exists.
    fn journal_identity(&self, id: u64, volume_id: &str) -> Option<(u64, u64)> {
        use std::os::unix::fs::MetadataExt;
        let layers_dir = self.inner.dir.join(layer::LAYERS_DIR);
        std::fs::symlink_metadata(super::vlog::path_for(volume_id, id, &layers_dir))
            .ok()
            .map(|m| (m.dev(), m.ino()))
    }

    /// Seals a layer a failed cut left unsealed, and refuses after a failed data sync
    /// (that snapshot could not be made durable).
    fn check_cut_allowed(&self, meta: &mut Meta) -> Result<()> {
        self.seal_pending(meta)?;
        if let Some(why) = self.stack().iter().find_map(|l| l.flush_failure()) {
            return Err(EngineError::io(
                &self.inner.dir,
                std::io::Error::other(format!(
                    "an earlier flush failed ({why}): no snapshot until the volume is reopened"
                )),
            ));
        }
        Ok(())
    }

    /// Steps 2 and 3 of a cut: commits the manifest naming the snapshot and the new head,
    /// then switches writes to the new head. Checks again, under the metadata lock, what
    /// may have changed since [`Volume::prepare_cut`] (another snapshot of that name, a
    /// grow, a failed flush). On failure nothing switched, the new head's files are gone
    /// and writes never stopped going to the old head. The snapshot exists on success;
    /// its old head still has to be sealed ([`Volume::finish_cut`]).
    pub fn switch_cut(&self, prepared: PreparedCut) -> Result<PendingSeal> {
        self.switch(prepared).map_err(|e| self.noted(e))
    }

    fn switch(&self, mut prepared: PreparedCut) -> Result<PendingSeal> {
        if !Arc::ptr_eq(&prepared.volume.inner, &self.inner) {
            return Err(EngineError::Invalid(
                "a cut prepared on another volume".into(),
            ));
        }
        let t0 = Instant::now();
        let mut meta = self.inner.meta.lock();
        let name = prepared.name.clone();
        if meta.manifest.snapshot(&name).is_some() {
            return Err(EngineError::SnapshotExists(name));
        }
        self.check_cut_allowed(&mut meta)?;
        let size = meta.manifest.size;
        if prepared.journal.is_none()
            || self.journal_identity(prepared.id, &prepared.volume_id) != prepared.journal
        {
            // The new head's journal is gone (a merge in the gap removed it as a stale
            // one): writes acknowledged into it would not survive a death. Make the head
            // again, here, under the metadata lock, under which no merge removes it.
            tracing::info!(volume = %self.inner.name, snapshot = %name, "the prepared head's journal was removed meanwhile; making the new head again");
            drop(prepared.head.take());
            remove_layer_files(&self.inner.dir, &prepared.volume_id, prepared.id);
            let id = meta.take_layer_id();
            let incarnation = super::vlog::new_incarnation();
            prepared.id = id;
            let created = Layer::create_head(
                &self.inner.dir,
                id,
                size,
                self.inner.direct,
                &prepared.volume_id,
                &incarnation,
            );
            match created {
                Ok(l) => prepared.head = Some(Arc::new(l)),
                Err(e) => {
                    if !e.is_injected_crash() {
                        remove_layer_files(&self.inner.dir, &prepared.volume_id, id);
                    }
                    return Err(e);
                }
            }
            prepared.incarnation = incarnation;
            prepared.size = size;
            if let Err(e) = fsutil::sync_dir(&self.inner.dir.join(layer::LAYERS_DIR)) {
                if e.is_injected_crash() {
                    prepared.disown();
                }
                return Err(e);
            }
        }
        let new_id = prepared.id;
        let new_head = prepared
            .head
            .clone()
            .ok_or_else(|| EngineError::Invalid("a cut switched twice".into()))?;
        if size != prepared.size {
            // Grown since the head was made: an identity head's data file follows, as a
            // grow does (a slotted one's follows its slots).
            if !new_head.slotted {
                new_head
                    .data
                    .set_len(size)
                    .map_err(|e| EngineError::io(&new_head.data_path, e))?;
            }
            prepared.size = size;
        }
        let old_head = self
            .stack()
            .last()
            .cloned()
            .ok_or_else(|| EngineError::Invalid("the volume has no head layer".into()))?;
        let entry = SnapshotEntry {
            id: meta.manifest.next_snapshot_id,
            name: name.clone(),
            layer: old_head.id,
            created_unix_ms: now_ms(),
            size: Some(size),
        };
        let mut m = meta.manifest.clone();
        // Layers sealed since they were cut need their journals no more.
        let stack = self.stack();
        for e in &mut m.layers {
            let sealed = stack
                .iter()
                .find(|l| l.id == e.id)
                .is_some_and(|l| l.sealed.load(std::sync::atomic::Ordering::SeqCst));
            if sealed {
                e.incarnation = None;
            }
        }
        m.layers.push(LayerEntry {
            id: new_id,
            merge_pending: false,
            ancestor: None,
            incarnation: Some(prepared.incarnation.clone()),
        });
        m.next_snapshot_id = m.next_snapshot_id.max(entry.id + 1);
        m.snapshots.push(entry.clone());
        m.next_layer_id = m.next_layer_id.max(meta.next_layer_id);
        // From here the files are the commit's to keep or to remove (see `undo_cut`).
        prepared.disown();
        if let Err(e) = m.store(&self.inner.dir) {
            if !e.is_injected_crash() {
                self.undo_cut(&meta, new_id);
            }
            return Err(e);
        }
        meta.manifest = m;
        fault_point("cut:committed")?;
        {
            let mut stack = self.inner.stack.write();
            let mut v = stack.to_vec();
            v.push(new_head);
            *stack = stack.with_layers(v);
        }
        fault_point("cut:switched")?;
        Ok(PendingSeal {
            old_head,
            entry,
            size,
            volume_id: prepared.volume_id.clone(),
            prepare: prepared.prepare,
            switch: t0.elapsed(),
        })
    }

    /// Steps 4 and 5 of a cut: drains the writes in flight to the old head, flushes and
    /// seals it, then commits the manifest without its incarnation and removes its
    /// volatile journal. Needs no frozen file system: a frozen one has no writes in flight.
    pub fn finish_cut(&self, pending: PendingSeal) -> Result<CutReport> {
        self.finish(pending).map_err(|e| self.noted(e))
    }

    fn finish(&self, pending: PendingSeal) -> Result<CutReport> {
        let t0 = Instant::now();
        let PendingSeal {
            old_head,
            entry,
            size,
            volume_id,
            prepare,
            switch,
        } = pending;
        let mut meta = self.inner.meta.lock();
        // A flush since the switch may have sealed it already (see `seal_pending`).
        let drain = if old_head.sealed.load(std::sync::atomic::Ordering::SeqCst) {
            Duration::ZERO
        } else {
            let drain = old_head.wait_drained();
            old_head.flush(true)?;
            drain
        };
        self.settle_stack(&meta);
        fault_point("cut:sealed")?;
        // The manifest stops naming the old head's incarnation: from now on its map
        // journal must be whole and sealed, and damage to it is refused rather than taken
        // for an interrupted seal. Not needed for safety: if this fails, the next
        // manifest write drops it.
        let mut m = meta.manifest.clone();
        if let Some(e) = m.layers.iter_mut().find(|e| e.id == old_head.id) {
            e.incarnation = None;
        }
        match m.store(&self.inner.dir) {
            Ok(()) => meta.manifest = m,
            Err(e) if e.is_injected_crash() => return Err(e),
            Err(e) => {
                tracing::warn!(volume = %self.inner.name, error = %e, "cannot record that the snapshot's layer is sealed; the next manifest write does")
            }
        }
        let seal = t0.elapsed();
        // The sealed head's volatile journal is covered by its sealed map journal now.
        let layers_dir = self.inner.dir.join(layer::LAYERS_DIR);
        let _ = std::fs::remove_file(super::vlog::path_for(&volume_id, old_head.id, &layers_dir));
        drop(meta);
        let total = prepare + switch + seal;
        tracing::info!(
            volume = %self.inner.name,
            snapshot = %entry.name,
            prepare_us = prepare.as_micros() as u64,
            switch_us = switch.as_micros() as u64,
            drain_us = drain.as_micros() as u64,
            seal_us = seal.as_micros() as u64,
            total_us = total.as_micros() as u64,
            "snapshot taken"
        );
        Ok(CutReport {
            snapshot: self.info(&entry, size, &old_head),
            prepare,
            switch,
            seal,
            drain,
            total,
        })
    }

    /// After a cut's manifest commit failed: the commit may have reached the file (a
    /// failed folder sync after the rename), so the manifest in force is written again,
    /// and only then is the new head's files removed. Writes went on to the old head
    /// throughout.
    fn undo_cut(&self, meta: &Meta, new_id: u64) {
        let mut m = meta.manifest.clone();
        m.next_layer_id = m.next_layer_id.max(meta.next_layer_id);
        match m.store(&self.inner.dir) {
            Ok(()) => remove_layer_files(&self.inner.dir, &m.volume_id, new_id),
            // On a full disk the manifest cannot be written again either. If the file in
            // place does not name the new head, the failed commit never reached it (it
            // failed before its rename): nothing refers to the new files, whose space is
            // given back now.
            Err(e) => match super::manifest::Manifest::load(&self.inner.dir) {
                Ok(found) if found.layer_pos(new_id).is_none() => {
                    remove_layer_files(&self.inner.dir, &m.volume_id, new_id)
                }
                _ => {
                    tracing::error!(volume = %self.inner.name, error = %e, "cannot write the manifest back after a failed cut; the next open sorts it out");
                }
            },
        }
    }

    /// Makes every write acknowledged so far durable: seals the layers below the head
    /// that a cut could not seal, then flushes the head. The manifest already names every
    /// layer of the stack. The caller holds the metadata lock (`_meta`).
    pub(crate) fn commit_stack(&self, meta: &mut Meta) -> Result<()> {
        self.seal_pending(meta)?;
        let stack = self.stack();
        stack[stack.len() - 1].flush(false)
    }

    /// Seals the layers below the head that a cut could not seal (a failed or interrupted
    /// seal), after their writes drain. The caller holds the metadata lock (`_meta`).
    fn seal_pending(&self, meta: &mut Meta) -> Result<()> {
        let stack = self.stack();
        let top = stack.len() - 1;
        for l in &stack[..top] {
            if !l.sealed.load(std::sync::atomic::Ordering::SeqCst) {
                l.wait_drained();
                l.flush(true)?;
                self.settle_stack(meta);
            }
        }
        Ok(())
    }

    /// Extends the read index over layers sealed since the stack was made: a lookup no
    /// longer probes them one by one. `_meta` is the proof that the caller holds the
    /// metadata lock, under which alone the stack changes.
    fn settle_stack(&self, _meta: &Meta) {
        let current = self.stack();
        if let Some(settled) = current.settled() {
            *self.inner.stack.write() = settled;
        }
    }

    fn info(&self, entry: &SnapshotEntry, volume_size: u64, layer: &Layer) -> SnapshotInfo {
        SnapshotInfo {
            id: entry.id,
            name: entry.name.clone(),
            created_unix_ms: entry.created_unix_ms,
            size: entry.size_in(volume_size),
            owned_bytes: layer.present_blocks() * u64::from(self.inner.block_size),
        }
    }

    /// The snapshots, oldest first.
    pub fn list_snapshots(&self) -> Vec<SnapshotInfo> {
        let meta = self.inner.meta.lock();
        let stack = self.stack();
        meta.manifest
            .snapshots
            .iter()
            .filter_map(|s| {
                stack
                    .iter()
                    .find(|l| l.id == s.layer)
                    .map(|l| self.info(s, meta.manifest.size, l))
            })
            .collect()
    }

    /// One snapshot's description.
    pub fn snapshot_info(&self, name: &str) -> Result<SnapshotInfo> {
        self.list_snapshots()
            .into_iter()
            .find(|s| s.name == name)
            .ok_or_else(|| EngineError::SnapshotNotFound(name.to_string()))
    }

    /// Deletes a snapshot: it disappears at once (atomically), then its layer is merged
    /// into its neighbour and the space it alone held is freed. Other snapshots and the
    /// live volume read exactly as before.
    pub fn delete_snapshot(&self, name: &str) -> Result<()> {
        {
            let mut meta = self.inner.meta.lock();
            let entry = meta
                .manifest
                .snapshot(name)
                .cloned()
                .ok_or_else(|| EngineError::SnapshotNotFound(name.to_string()))?;
            let mut m = meta.manifest.clone();
            m.snapshots.retain(|s| s.name != name);
            if let Some(l) = m.layers.iter_mut().find(|l| l.id == entry.layer) {
                l.merge_pending = true;
            }
            m.store(&self.inner.dir).map_err(|e| self.noted(e))?;
            meta.manifest = m;
        }
        tracing::info!(volume = %self.inner.name, snapshot = name, "snapshot deleted; merging its layer");
        // The snapshot is gone (committed); its merge only gives space back, and one that
        // failed (a full or failing disk) left every view as it was: the next delete
        // tries it again.
        match self.maintain() {
            Err(e) if matches!(e.errno(), libc::ENOSPC | libc::EDQUOT | libc::EIO) => {
                let e = self.noted(e);
                tracing::warn!(volume = %self.inner.name, snapshot = name, error = %e, "the deleted snapshot's layer could not be merged yet; the next delete tries again");
                Ok(())
            }
            r => r,
        }
    }

    /// The layers that make up snapshot `name`, bottom first: a stable view for reading it.
    pub fn snapshot_view(&self, name: &str) -> Result<SnapshotView> {
        let meta = self.inner.meta.lock();
        let entry = meta
            .manifest
            .snapshot(name)
            .ok_or_else(|| EngineError::SnapshotNotFound(name.to_string()))?;
        let stack = self.stack();
        let pos = stack
            .iter()
            .position(|l| l.id == entry.layer)
            .ok_or_else(|| {
                EngineError::Invalid(format!("layer of snapshot {name:?} is not in the stack"))
            })?;
        Ok(SnapshotView {
            layers: stack.prefix(pos + 1),
            size: entry.size_in(meta.manifest.size),
            volume: self.clone(),
        })
    }

    /// Reads `buf.len()` bytes of snapshot `name` at `offset`.
    pub fn read_snapshot(&self, name: &str, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.snapshot_view(name)?.read(offset, buf)
    }

    /// Stack positions of two snapshots, checked to be in order.
    fn positions(&self, base: &str, target: &str) -> Result<(Stack, usize, usize)> {
        let meta = self.inner.meta.lock();
        let stack = self.stack();
        let pos = |name: &str| -> Result<usize> {
            let e = meta
                .manifest
                .snapshot(name)
                .ok_or_else(|| EngineError::SnapshotNotFound(name.to_string()))?;
            stack.iter().position(|l| l.id == e.layer).ok_or_else(|| {
                EngineError::Invalid(format!("layer of snapshot {name:?} is not in the stack"))
            })
        };
        let (b, t) = (pos(base)?, pos(target)?);
        if b >= t {
            return Err(EngineError::Invalid(format!(
                "snapshot {base:?} is not older than snapshot {target:?}"
            )));
        }
        Ok((stack, b, t))
    }

    /// Blocks written or discarded after snapshot `base` up to snapshot `target`, as sorted,
    /// merged extents: what an incremental backup must copy.
    pub fn changed_extents(&self, base: &str, target: &str) -> Result<Vec<Extent>> {
        let (stack, b, t) = self.positions(base, target)?;
        let mut changed = RoaringBitmap::new();
        for l in &stack[b + 1..=t] {
            let st = l.state.read();
            changed |= &st.map.present;
            changed |= &st.map.zeroed;
        }
        Ok(extent::extents(&changed, self.inner.block_size))
    }

    /// Blocks of snapshot `name` that hold data (everything else reads as zeros), as sorted,
    /// merged extents: what a full backup must copy.
    pub fn allocated_extents(&self, name: &str) -> Result<Vec<Extent>> {
        let view = self.snapshot_view(name)?;
        Ok(extent::extents(&view.allocated(), self.inner.block_size))
    }
}

/// A snapshot's layers, held open: reads through it stay valid while the volume changes.
#[derive(Clone)]
pub struct SnapshotView {
    layers: Stack,
    /// The snapshot's own size (the volume may have grown since).
    size: u64,
    volume: Volume,
}

impl SnapshotView {
    /// Reads `buf.len()` bytes of the snapshot at `offset`.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let plan = self.plan_read(offset, buf.len() as u64)?;
        read_plan(&plan, buf, self.volume.inner.direct)
    }

    /// Where each part of a read of the snapshot comes from.
    pub fn plan_read(&self, offset: u64, len: u64) -> Result<plan::ReadPlan> {
        let (start, end) = check_request("read", offset, len, self.size, self.volume.block_size())?;
        Ok(plan::plan(
            self.layers.clone(),
            start,
            end,
            self.volume.block_size(),
        ))
    }

    /// Blocks of the snapshot that hold data.
    pub fn allocated(&self) -> RoaringBitmap {
        let mut result = RoaringBitmap::new();
        let mut hidden = RoaringBitmap::new();
        for l in self.layers.iter().rev() {
            let st = l.state.read();
            result |= &st.map.present - &hidden;
            hidden |= &st.map.present;
            hidden |= &st.map.zeroed;
        }
        result
    }

    /// Size of the snapshot in bytes (the volume's when it was taken).
    pub fn size(&self) -> u64 {
        self.size
    }
}
