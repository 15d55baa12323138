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
    /// Time spent waiting for writes in flight to the old head to finish.
    pub drain: Duration,
    /// Whole time of the cut: new head, drain, seal, manifest commit.
    pub total: Duration,
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
    /// before the call. Copies no data; new writes go to a new head at once and never wait.
    pub fn create_snapshot(&self, name: &str) -> Result<CutReport> {
        validate_snapshot_name(name)?;
        let t0 = Instant::now();
        let mut meta = self.inner.meta.lock();
        if meta.manifest.snapshot(name).is_some() {
            return Err(EngineError::SnapshotExists(name.to_string()));
        }
        let new_id = meta.take_layer_id();
        // The size only changes under the metadata lock, held here.
        let size = meta.manifest.size;
        let new_head = Arc::new(Layer::create_head(
            &self.inner.dir,
            new_id,
            size,
            self.inner.direct,
            &meta.manifest.volume_id,
        )?);
        fsutil::sync_dir(&self.inner.dir.join(layer::LAYERS_DIR))?;
        let old_head = {
            let mut stack = self.inner.stack.write();
            let old = stack[stack.len() - 1].clone();
            let mut v = stack.to_vec();
            v.push(new_head);
            *stack = stack.with_layers(v);
            old
        };
        let drain = old_head.wait_drained();
        let entry = SnapshotEntry {
            id: meta.manifest.next_snapshot_id,
            name: name.to_string(),
            layer: old_head.id,
            created_unix_ms: now_ms(),
            size: Some(size),
        };
        self.commit_stack(&mut meta, Some(entry.clone()))?;
        let total = t0.elapsed();
        // The sealed head's volatile journal is covered by its sealed map journal now.
        let layers_dir = self.inner.dir.join(layer::LAYERS_DIR);
        let _ = std::fs::remove_file(super::vlog::path_for(
            &meta.manifest.volume_id,
            old_head.id,
            &layers_dir,
        ));
        drop(meta);
        tracing::info!(
            volume = %self.inner.name,
            snapshot = name,
            drain_us = drain.as_micros() as u64,
            total_us = total.as_micros() as u64,
            "snapshot taken"
        );
        Ok(CutReport {
            snapshot: self.info(&entry, size, &old_head),
            drain,
            total,
        })
    }

    /// Makes the in-memory stack durable: seals every layer pushed since the last commit
    /// (after its writes drain), flushes the head, and writes the manifest if the stack or
    /// the snapshot list changed. A cut whose commit failed is retried here by the next flush.
    pub(crate) fn commit_stack(
        &self,
        meta: &mut Meta,
        snapshot: Option<SnapshotEntry>,
    ) -> Result<()> {
        let stack = self.stack();
        let committed_head = meta.manifest.layers[meta.manifest.layers.len() - 1].id;
        let start = stack
            .iter()
            .position(|l| l.id == committed_head)
            .ok_or_else(|| EngineError::Invalid("the committed head is not in the stack".into()))?;
        let top = stack.len() - 1;
        for l in &stack[start..top] {
            if !l.sealed.load(std::sync::atomic::Ordering::SeqCst) {
                l.wait_drained();
                l.flush(true)?;
            }
        }
        self.settle_stack(meta);
        stack[top].flush(false)?;
        if start == top && snapshot.is_none() {
            return Ok(());
        }
        let mut m = meta.manifest.clone();
        for l in &stack[start + 1..] {
            m.layers.push(LayerEntry {
                id: l.id,
                merge_pending: false,
                ancestor: None,
            });
        }
        if let Some(s) = snapshot {
            m.next_snapshot_id = m.next_snapshot_id.max(s.id + 1);
            m.snapshots.push(s);
        }
        for l in &stack[start..top] {
            let owned = m.snapshots.iter().any(|s| s.layer == l.id);
            if let Some(e) = m.layers.iter_mut().find(|e| e.id == l.id) {
                e.merge_pending = !owned;
            }
        }
        m.next_layer_id = m.next_layer_id.max(meta.next_layer_id);
        m.store(&self.inner.dir)?;
        meta.manifest = m;
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
            m.store(&self.inner.dir)?;
            meta.manifest = m;
        }
        tracing::info!(volume = %self.inner.name, snapshot = name, "snapshot deleted; merging its layer");
        self.maintain()
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
