//! Background upkeep after snapshot deletes: merging a deleted snapshot's layer into the
//! layer above it, and freeing the blocks that the live head has overwritten.
//!
//! Safety rules:
//! - a frozen layer's file is only written at blocks its map does not name, and only when no
//!   clone shares it (link count 1); otherwise the merge writes a new file;
//! - the live head is never written by a merge: under the head, a deleted layer only gives
//!   back the blocks the head already covers durably, once no reader can still use them;
//! - every step leaves the volume readable with the same content if the process dies there.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::error::{EngineError, Result};
use super::fsutil;
use super::layer::{self, Layer};
use super::layermap::LayerMap;
use super::maplog::MapLog;
use super::volume::Volume;

impl Volume {
    /// After a cut: a deleted snapshot's layer right under the old head only gave back the
    /// blocks that head covered; the cut has sealed it, so the rest can be merged now. Call
    /// it once writers run again (after the thaw). A failure leaves the layer pending for
    /// the next delete; the snapshot stands.
    pub fn merge_after_cut(&self) {
        if !self.has_pending_merges() {
            return;
        }
        if let Err(e) = self.maintain() {
            tracing::warn!(volume = %self.name(), error = %e, "merging deleted snapshots after the cut failed; the next delete tries again");
        }
    }

    /// Merges every layer whose snapshot was deleted, as far as the live head allows.
    /// Safe to run while the volume serves I/O; one run at a time.
    pub fn maintain(&self) -> Result<()> {
        let _one = self.inner.merge.lock();
        self.remove_sealed_vlogs();
        loop {
            let (lower, upper, upper_live) = {
                let meta = self.inner.meta.lock();
                let stack = self.stack();
                let Some(entry) = meta.manifest.layers.iter().find(|l| l.merge_pending) else {
                    return Ok(());
                };
                let pos = stack.iter().position(|l| l.id == entry.id).ok_or_else(|| {
                    EngineError::Invalid(format!("pending layer {} is not in the stack", entry.id))
                })?;
                let upper = stack[pos + 1].clone();
                let live = pos + 1 == stack.len() - 1
                    || !upper.sealed.load(std::sync::atomic::Ordering::SeqCst);
                (stack[pos].clone(), upper, live)
            };
            if upper_live {
                return self.release_covered(&lower, &upper);
            }
            self.merge_into_upper(&lower, &upper)?;
        }
    }

    /// Removes the volatile journals of layers sealed since (their changes are in their
    /// sealed map journals). Under the metadata lock, so no cut is making a new head's
    /// journal meanwhile: every journal but those of the unsealed layers is stale.
    fn remove_sealed_vlogs(&self) {
        let meta = self.inner.meta.lock();
        let layers_dir = self.inner.dir.join(layer::LAYERS_DIR);
        let keep: Vec<_> = self
            .stack()
            .iter()
            .filter(|l| !l.sealed.load(std::sync::atomic::Ordering::SeqCst))
            .map(|l| super::vlog::path_for(&meta.manifest.volume_id, l.id, &layers_dir))
            .collect();
        super::vlog::remove_stale(&meta.manifest.volume_id, &layers_dir, &keep);
    }

    /// Frees the blocks of `lower` that the live `upper` covers durably: nothing can read
    /// them any more. The rest of `lower` waits for `upper` to be sealed by a snapshot.
    fn release_covered(&self, lower: &Arc<Layer>, upper: &Arc<Layer>) -> Result<()> {
        self.flush()?;
        let durable_cover = {
            let st = upper.state.read();
            &st.map.cover() - &st.touched
        };
        let (dead, new_map) = {
            let st = lower.state.read();
            let dead = &st.map.present & &durable_cover;
            let map = LayerMap {
                present: &st.map.present - &durable_cover,
                zeroed: &st.map.zeroed - &durable_cover,
            };
            (dead, map)
        };
        if new_map == lower.state.read().map || lower.is_shared()? {
            return Ok(());
        }
        // A slotted layer keeps its placements: the freed blocks' slots become holes.
        let slots = lower.state.read().slots.clone();
        MapLog::write_compacted(
            &layer::map_path(&self.inner.dir, lower.id),
            lower.id,
            &new_map,
            slots.as_ref(),
            true,
        )?;
        let replacement = Arc::new(lower.with_map(new_map, slots)?);
        self.replace_layers(&[lower.id], replacement, |_| {})?;
        // Reads planned before the swap may still use the old map: wait for them to finish
        // before the blocks become holes.
        if !wait_unused(lower, Duration::from_secs(10)) {
            tracing::warn!(volume = %self.inner.name, layer = lower.id, "layer still in use; its space will be freed by a later merge");
            return Ok(());
        }
        let bs = u64::from(self.inner.block_size);
        for p in lower.file_runs(&dead) {
            let off = u64::from(p.file_block) * bs;
            fsutil::punch_hole(&lower.data, &lower.data_path, off, u64::from(p.count) * bs)?;
        }
        tracing::info!(
            volume = %self.inner.name,
            layer = lower.id,
            freed_bytes = dead.len() * bs,
            "freed blocks of a deleted snapshot that the live volume has overwritten"
        );
        Ok(())
    }

    /// Merges the frozen `lower` (at stack position `pos`) into the frozen layer above it.
    fn merge_into_upper(&self, lower: &Arc<Layer>, upper: &Arc<Layer>) -> Result<()> {
        let t0 = Instant::now();
        // The merged map keeps its zeroed blocks even at the bottom of the stack: it is
        // written before the commit that removes `lower`, so it must stay right above it.
        let (copy, mut merged) = {
            let lo = lower.state.read();
            let up = upper.state.read();
            (&lo.map.present - &up.map.cover(), up.map.over(&lo.map))
        };
        merged.optimize();
        let bs = u64::from(self.inner.block_size);
        let dir = &self.inner.dir;
        let target = if upper.is_shared()? {
            // A clone shares the upper layer: build the merged layer in a new file, in the
            // identity layout.
            let id = self.inner.meta.lock().take_layer_id();
            // As long as the file it replaces, for an identity layer: the size the volume
            // had when it was sealed, so a clone of its snapshot can use it; a slotted
            // one's file says nothing of that size, so: up to its last block.
            let len = if upper.slotted {
                merged.present.max().map_or(0, |b| (u64::from(b) + 1) * bs)
            } else {
                upper.data_len()?
            };
            let built = (|| {
                let fresh = Layer::create_merge_target(dir, id, len, self.inner.direct)?;
                let present = upper.state.read().map.present.clone();
                for (src, blocks) in [(upper, &present), (lower, &copy)] {
                    for p in src.file_runs(blocks) {
                        fsutil::copy_range(
                            &src.data,
                            &fresh.data,
                            &fresh.data_path,
                            u64::from(p.file_block) * bs,
                            u64::from(p.block) * bs,
                            u64::from(p.count) * bs,
                        )?;
                    }
                }
                fsutil::sync_data(&fresh.data, &fresh.data_path)?;
                MapLog::write_compacted(&layer::map_path(dir, id), id, &merged, None, true)?;
                fresh.with_map(merged, None)
            })();
            match built {
                Ok(l) => Arc::new(l),
                Err(e) => {
                    // No manifest names the new layer: give its space back now (a full
                    // disk) rather than at the next open.
                    if !e.is_injected_crash() {
                        for p in [layer::data_path(dir, id), layer::map_path(dir, id)] {
                            let _ = std::fs::remove_file(p);
                        }
                    }
                    return Err(e);
                }
            }
        } else {
            // Blocks the upper map does not name are invisible: fill them in place (an
            // identity layer), or in new slots past the end of its file (a slotted one),
            // then switch the upper map; the content of every view stays the same
            // throughout, and a crash before the switch leaves only unnamed data behind.
            // The preparer's trim of a just-sealed head waits (same lock), and never comes
            // for this layer object: if the merge fails after its journal names the new
            // slots, this object's table lacks them, and a trim by it would cut them off.
            let _trim = upper.prep.lock();
            upper.tidy.store(false, std::sync::atomic::Ordering::SeqCst);
            let mut slots = upper.state.read().slots.clone();
            let mut next = match &slots {
                Some(t) => (upper.data_len()? / bs).max(t.end()),
                None => 0,
            };
            for p in lower.file_runs(&copy) {
                let dst = match &mut slots {
                    Some(t) => {
                        if next + u64::from(p.count) > super::slots::MAX_SLOTS {
                            return Err(EngineError::Invalid(format!(
                                "layer {} has no slots left for a merge",
                                upper.id
                            )));
                        }
                        t.set_run((p.block, next as u32, p.count));
                        next += u64::from(p.count);
                        next - u64::from(p.count)
                    }
                    None => u64::from(p.block),
                };
                fsutil::copy_range(
                    &lower.data,
                    &upper.data,
                    &upper.data_path,
                    u64::from(p.file_block) * bs,
                    dst * bs,
                    u64::from(p.count) * bs,
                )?;
            }
            fsutil::sync_data(&upper.data, &upper.data_path)?;
            MapLog::write_compacted(
                &layer::map_path(dir, upper.id),
                upper.id,
                &merged,
                slots.as_ref(),
                true,
            )?;
            Arc::new(upper.with_map(merged, slots)?)
        };
        let (lower_id, upper_id, target_id) = (lower.id, upper.id, target.id);
        self.replace_layers(&[lower_id, upper_id], target, |m| {
            for s in m.snapshots.iter_mut().filter(|s| s.layer == upper_id) {
                s.layer = target_id;
            }
        })?;
        for id in [lower_id]
            .into_iter()
            .chain((upper_id != target_id).then_some(upper_id))
        {
            for p in [layer::data_path(dir, id), layer::map_path(dir, id)] {
                if let Err(e) = std::fs::remove_file(&p) {
                    tracing::warn!(file = %p.display(), error = %e, "could not remove a merged layer file; it is removed at the next open");
                }
            }
        }
        tracing::info!(
            volume = %self.inner.name,
            merged = lower_id,
            into = target_id,
            copied_bytes = copy.len() * bs,
            ms = t0.elapsed().as_millis() as u64,
            "merged a deleted snapshot's layer"
        );
        Ok(())
    }

    /// Replaces the consecutive layers `ids` by `with` in the manifest (durably) and in the
    /// stack; `edit` adjusts the rest of the manifest in the same commit.
    fn replace_layers(
        &self,
        ids: &[u64],
        with: Arc<Layer>,
        edit: impl FnOnce(&mut super::manifest::Manifest),
    ) -> Result<()> {
        let mut meta = self.inner.meta.lock();
        let mut m = meta.manifest.clone();
        let first = m
            .layer_pos(ids[0])
            .ok_or_else(|| EngineError::Invalid(format!("layer {} is gone", ids[0])))?;
        let keep_pending = m.layers[first + ids.len() - 1].merge_pending;
        if m.layers[first..first + ids.len()]
            .iter()
            .any(|l| l.id == m.layers[m.layers.len() - 1].id)
        {
            return Err(EngineError::Invalid(
                "a merge may not replace the head layer".into(),
            ));
        }
        m.layers.splice(
            first..first + ids.len(),
            [super::manifest::LayerEntry {
                id: with.id,
                merge_pending: keep_pending,
                // Only a volume's own layers are merged; inherited ones never are.
                ancestor: None,
                // Merged layers are sealed: no volatile journal.
                incarnation: None,
            }],
        );
        edit(&mut m);
        m.next_layer_id = m.next_layer_id.max(meta.next_layer_id);
        m.store(&self.inner.dir)?;
        meta.manifest = m;
        // The stack changes only under the metadata lock, held here: the new one (and its
        // index, rebuilt above the merge) is made before readers are stopped to swap it in.
        let current = self.stack();
        let mut v = current.to_vec();
        let at = v
            .iter()
            .position(|l| l.id == ids[0])
            .ok_or_else(|| EngineError::Invalid(format!("layer {} is not in the stack", ids[0])))?;
        v.splice(at..at + ids.len(), [with]);
        let next = current.with_layers(v);
        *self.inner.stack.write() = next;
        Ok(())
    }
}

/// Waits until no stack or plan other than the caller's reference holds `layer`.
fn wait_unused(layer: &Arc<Layer>, limit: Duration) -> bool {
    let t0 = Instant::now();
    while Arc::strong_count(layer) > 1 {
        if t0.elapsed() > limit {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    true
}
