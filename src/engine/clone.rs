//! Clones: a new, independent volume whose content is a snapshot's, made without copying
//! data. Frozen layers never change, so the clone hard-links them and the file system counts
//! the references; a merge never writes a layer file that has more than one link.

use std::fs;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use super::error::{EngineError, Result};
use super::fsutil;
use super::layer;
use super::manifest::{Ancestor, LayerEntry, Manifest, Origin, FORMAT};
use super::volume::{now_ms, random_id, write_new_volume, Volume};

impl Volume {
    /// Makes a new volume in `new_dir` holding snapshot `snapshot`'s content (and size: a
    /// snapshot taken before the volume grew gives a clone of the old size), and opens it.
    /// Atomic: after a crash `new_dir` either is a whole volume or does not exist.
    pub fn clone_snapshot(&self, snapshot: &str, new_dir: &Path) -> Result<Volume> {
        if new_dir.exists() {
            return Err(EngineError::AlreadyExists {
                path: new_dir.to_path_buf(),
            });
        }
        let file_name = new_dir.file_name().ok_or_else(|| {
            EngineError::Invalid(format!("{} is not a folder name", new_dir.display()))
        })?;
        let parent = new_dir
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or_else(|| Path::new("."));
        let tmp = parent.join(format!(".{}.clone-tmp", file_name.to_string_lossy()));
        if tmp.exists() {
            fs::remove_dir_all(&tmp).map_err(|e| EngineError::io(&tmp, e))?;
        }
        let tmp_layers = tmp.join(layer::LAYERS_DIR);
        fsutil::create_private_dir_all(&tmp_layers)?;

        let result = self.fill_clone(snapshot, &tmp);
        if let Err(e) = result {
            let _ = fs::remove_dir_all(&tmp);
            return Err(e);
        }
        fs::rename(&tmp, new_dir).map_err(|e| EngineError::io(new_dir, e))?;
        fsutil::sync_dir(parent)?;
        tracing::info!(volume = %self.inner.name, snapshot, clone = %new_dir.display(), "cloned snapshot");
        Volume::open(new_dir)
    }

    fn fill_clone(&self, snapshot: &str, tmp: &Path) -> Result<()> {
        let (manifest, layers) = {
            let mut meta = self.inner.meta.lock();
            let entry = meta
                .manifest
                .snapshot(snapshot)
                .cloned()
                .ok_or_else(|| EngineError::SnapshotNotFound(snapshot.to_string()))?;
            let stack = self.stack();
            let pos = stack
                .iter()
                .position(|l| l.id == entry.layer)
                .ok_or_else(|| {
                    EngineError::Invalid(format!(
                        "layer of snapshot {snapshot:?} is not in the stack"
                    ))
                })?;
            let layers: Vec<_> = stack[..=pos].to_vec();
            let size = entry.size_in(meta.manifest.size);
            // Link while holding the metadata lock, so no merge swaps these files meanwhile.
            for l in &layers {
                self.link_layer(l, tmp)?;
            }
            let head_id = meta.take_layer_id();
            // Each inherited layer keeps the lineage: the snapshot of this volume it was the
            // layer of, or the mark it inherited itself from an earlier clone.
            let source_id = meta.manifest.volume_id.clone();
            let mut entries: Vec<LayerEntry> = layers
                .iter()
                .map(|l| LayerEntry {
                    id: l.id,
                    merge_pending: false,
                    incarnation: None,
                    ancestor: match meta.manifest.snapshots.iter().find(|s| s.layer == l.id) {
                        Some(s) => Some(Ancestor {
                            volume_id: source_id.clone(),
                            snapshot_id: s.id,
                        }),
                        None => meta
                            .manifest
                            .layers
                            .iter()
                            .find(|e| e.id == l.id)
                            .and_then(|e| e.ancestor.clone()),
                    },
                })
                .collect();
            entries.push(LayerEntry {
                id: head_id,
                merge_pending: false,
                ancestor: None,
                incarnation: Some(super::vlog::new_incarnation()),
            });
            let m = Manifest {
                format: FORMAT,
                volume_id: random_id(),
                size,
                block_size: self.inner.block_size,
                created_unix_ms: now_ms(),
                next_layer_id: head_id + 1,
                next_snapshot_id: 1,
                layers: entries,
                snapshots: vec![],
                origin: Some(Origin {
                    volume_id: meta.manifest.volume_id.clone(),
                    snapshot: snapshot.to_string(),
                }),
            };
            (m, layers)
        };
        fsutil::sync_dir(&tmp.join(layer::LAYERS_DIR))?;
        drop(layers);
        write_new_volume(tmp, &manifest)
    }

    /// Puts frozen layer `l`'s files into the clone folder `tmp`: hard links, or a sparse
    /// copy of the blocks it holds when the clone lives on another file system.
    fn link_layer(&self, l: &layer::Layer, tmp: &Path) -> Result<()> {
        let src_map = layer::map_path(&self.inner.dir, l.id);
        fsutil::link_or_copy(&src_map, &layer::map_path(tmp, l.id))?;
        let dst = layer::data_path(tmp, l.id);
        match fs::hard_link(&l.data_path, &dst) {
            Ok(()) => Ok(()),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EXDEV) | Some(libc::EPERM)) => {
                let out = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(fsutil::PRIVATE_FILE)
                    .open(&dst)
                    .map_err(|e| EngineError::io(&dst, e))?;
                out.set_len(l.data_len()?)
                    .map_err(|e| EngineError::io(&dst, e))?;
                // The same offsets: the copied map journal names the same slots.
                let bs = u64::from(self.inner.block_size);
                let present = l.state.read().map.present.clone();
                for p in l.file_runs(&present) {
                    let off = u64::from(p.file_block) * bs;
                    fsutil::copy_range(&l.data, &out, &dst, off, off, u64::from(p.count) * bs)?;
                }
                fsutil::sync_data(&out, &dst)
            }
            Err(e) => Err(EngineError::io(&dst, e)),
        }
    }
}
