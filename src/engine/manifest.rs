//! The volume's manifest: its geometry, the stack of layers and the snapshot list.
//! Every metadata change (snapshot, delete, merge) is one atomic replacement of this file.
//!
//! `volume.json` holds one line of JSON and a second line `crc32c <8 hex digits>` over the
//! first line's bytes, so a damaged manifest is refused instead of half-trusted.
//!
//! Format changelog: version 1, the first; later within version 1, the optional `size` of
//! snapshot entries (volumes can grow; see docs/engine.md); later still, the optional
//! `ancestor` of layer entries (the lineage of clones, for changed-block tracking across
//! a restore); later still, the optional `incarnation` of layer entries (the volatile
//! journal a layer may replay).

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::error::{EngineError, Result};
use super::fsutil;

/// Manifest file name inside a volume folder.
pub const FILE: &str = "volume.json";
/// Manifest format this build writes and reads.
pub const FORMAT: u32 = 1;
/// Largest number of blocks: block indices are 32-bit in the roaring maps.
pub const MAX_BLOCKS: u64 = 1 << 32;

/// One layer of the stack (bottom first; the last one is the writable head).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerEntry {
    pub id: u64,
    /// The layer's snapshot was deleted: it waits to be merged into the layer above.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub merge_pending: bool,
    /// For a layer a clone inherited: the snapshot of the volume it came from whose own
    /// layer this was at the time (inherited along with the layer by clones of clones).
    /// Absent for a volume's own layers and in manifests written before clones kept it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ancestor: Option<Ancestor>,
    /// For the head, and for a layer whose seal may not have finished: the random value
    /// its volatile journal must carry to be replayed (32 hex digits). A journal left by
    /// any other layer, even one with the same id, is never trusted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub incarnation: Option<String>,
}

/// A snapshot of an earlier volume of a clone's lineage: its volume's `volume_id` and its
/// snapshot id there. Inherited layers never change in a clone (nothing merges them), so
/// the layers above the one marked with a snapshot are exactly what changed since it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Ancestor {
    pub volume_id: String,
    pub snapshot_id: u64,
}

/// A named snapshot: the content of the stack up to and including `layer`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotEntry {
    pub id: u64,
    pub name: String,
    pub layer: u64,
    pub created_unix_ms: u64,
    /// Size of the volume when the snapshot was taken. Absent in manifests written before
    /// volumes could grow: such a snapshot has the volume's size (a grow fills it in).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
}

impl SnapshotEntry {
    /// The snapshot's size in bytes, given the volume's.
    pub fn size_in(&self, volume_size: u64) -> u64 {
        self.size.unwrap_or(volume_size)
    }
}

/// Where a cloned volume came from (for information; the clone is independent).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Origin {
    pub volume_id: String,
    pub snapshot: String,
}

/// The whole persistent metadata of a volume.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub volume_id: String,
    pub size: u64,
    pub block_size: u32,
    pub created_unix_ms: u64,
    pub next_layer_id: u64,
    pub next_snapshot_id: u64,
    pub layers: Vec<LayerEntry>,
    pub snapshots: Vec<SnapshotEntry>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<Origin>,
}

impl Manifest {
    /// Path of the manifest in `dir`.
    pub fn path(dir: &Path) -> PathBuf {
        dir.join(FILE)
    }

    /// Reads and checks the manifest of the volume in `dir`.
    pub fn load(dir: &Path) -> Result<Manifest> {
        let path = Self::path(dir);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(EngineError::NotAVolume {
                    path: dir.to_path_buf(),
                    file: FILE,
                })
            }
            Err(e) => return Err(EngineError::io(&path, e)),
        };
        Self::decode(&path, &bytes)
    }

    /// Decodes and checks the bytes of a manifest read from `path` (named in errors).
    pub(crate) fn decode(path: &Path, bytes: &[u8]) -> Result<Manifest> {
        let path = path.to_path_buf();
        let text = std::str::from_utf8(bytes)
            .map_err(|_| EngineError::corrupt(&path, "not UTF-8 text"))?;
        let mut lines = text.lines();
        let body = lines.next().unwrap_or_default();
        let crc_line = lines.next().ok_or_else(|| {
            EngineError::corrupt(&path, "the checksum line is missing (truncated?)")
        })?;
        let want = crc_line
            .strip_prefix("crc32c ")
            .and_then(|h| u32::from_str_radix(h.trim(), 16).ok())
            .ok_or_else(|| EngineError::corrupt(&path, "malformed checksum line"))?;
        if crc32c::crc32c(body.as_bytes()) != want {
            return Err(EngineError::corrupt(&path, "checksum mismatch"));
        }
        let probe: serde_json::Value =
            serde_json::from_str(body).map_err(|e| EngineError::corrupt(&path, e.to_string()))?;
        let format = probe.get("format").and_then(|v| v.as_u64()).unwrap_or(0) as u32;
        if format != FORMAT {
            return Err(EngineError::UnsupportedVersion {
                path,
                found: format,
                supported: FORMAT,
            });
        }
        let m: Manifest = serde_json::from_value(probe)
            .map_err(|e| EngineError::corrupt(&path, e.to_string()))?;
        m.validate()
            .map_err(|reason| EngineError::corrupt(&path, reason))?;
        Ok(m)
    }

    /// Atomically replaces the manifest in `dir` with this one.
    pub fn store(&self, dir: &Path) -> Result<()> {
        self.validate().map_err(|r| {
            EngineError::Invalid(format!("refusing to write an inconsistent manifest: {r}"))
        })?;
        let body = serde_json::to_string(self).map_err(|e| EngineError::Invalid(e.to_string()))?;
        let text = format!("{body}\ncrc32c {:08x}\n", crc32c::crc32c(body.as_bytes()));
        fsutil::atomic_write(&Self::path(dir), text.as_bytes())
    }

    /// Checks the invariants every other part of the engine relies on.
    pub fn validate(&self) -> std::result::Result<(), String> {
        check_geometry(self.size, self.block_size)?;
        if !is_volume_id(&self.volume_id) {
            return Err(format!("volume id {:?} is malformed", self.volume_id));
        }
        let head = self.layers.last().ok_or("the layer stack is empty")?;
        if head.merge_pending {
            return Err("the head layer is marked for merging".into());
        }
        let mut ids = std::collections::HashSet::new();
        let mut ancestors = std::collections::HashSet::new();
        for l in &self.layers {
            if !ids.insert(l.id) {
                return Err(format!("layer {} appears twice", l.id));
            }
            if let Some(a) = &l.ancestor {
                if !ancestors.insert(a) {
                    return Err(format!(
                        "snapshot {} of volume {} marks two layers",
                        a.snapshot_id, a.volume_id
                    ));
                }
            }
            if let Some(inc) = &l.incarnation {
                if super::vlog::parse_incarnation(inc).is_none() {
                    return Err(format!("layer {} has a malformed incarnation", l.id));
                }
            }
            if l.id >= self.next_layer_id {
                return Err(format!(
                    "layer {} is not below next_layer_id {}",
                    l.id, self.next_layer_id
                ));
            }
        }
        let mut names = std::collections::HashSet::new();
        let mut snap_layers = std::collections::HashSet::new();
        for s in &self.snapshots {
            if !names.insert(s.name.as_str()) {
                return Err(format!("snapshot {:?} appears twice", s.name));
            }
            if s.layer == head.id {
                return Err(format!("snapshot {:?} points at the writable head", s.name));
            }
            match self.layers.iter().find(|l| l.id == s.layer) {
                None => {
                    return Err(format!(
                        "snapshot {:?} points at missing layer {}",
                        s.name, s.layer
                    ))
                }
                Some(l) if l.merge_pending => {
                    return Err(format!(
                        "snapshot {:?} points at a layer being merged",
                        s.name
                    ))
                }
                Some(_) => {}
            }
            if !snap_layers.insert(s.layer) {
                return Err(format!("layer {} is the layer of two snapshots", s.layer));
            }
            if let Some(size) = s.size {
                check_geometry(size, self.block_size)
                    .map_err(|e| format!("snapshot {:?}: {e}", s.name))?;
                if size > self.size {
                    return Err(format!(
                        "snapshot {:?} is {size} bytes, larger than the volume ({} bytes)",
                        s.name, self.size
                    ));
                }
            }
            if s.id >= self.next_snapshot_id {
                return Err(format!(
                    "snapshot id {} is not below next_snapshot_id",
                    s.id
                ));
            }
        }
        Ok(())
    }

    /// Position of layer `id` in the stack.
    pub fn layer_pos(&self, id: u64) -> Option<usize> {
        self.layers.iter().position(|l| l.id == id)
    }

    /// The snapshot called `name`.
    pub fn snapshot(&self, name: &str) -> Option<&SnapshotEntry> {
        self.snapshots.iter().find(|s| s.name == name)
    }

    /// The snapshot whose id is `id`.
    pub fn snapshot_by_id(&self, id: u64) -> Option<&SnapshotEntry> {
        self.snapshots.iter().find(|s| s.id == id)
    }
}

/// Whether `id` can be a volume id: 1 to 64 letters, digits, '_' or '-'. Ids are made
/// by the engine (32 hex digits), but a manifest is only checksummed, not trusted: the id
/// becomes part of the volatile journals' file names in shared memory, so an id that could
/// name another folder (`/`, `..`) is refused.
pub fn is_volume_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'))
}

/// Checks a volume size and block size.
pub fn check_geometry(size: u64, block_size: u32) -> std::result::Result<(), String> {
    if block_size != 512 && block_size != 4096 {
        return Err(format!("block size {block_size} is not 512 or 4096"));
    }
    if size == 0 || !size.is_multiple_of(u64::from(block_size)) {
        return Err(format!(
            "size {size} is not a positive multiple of the block size {block_size}"
        ));
    }
    if size / u64::from(block_size) > MAX_BLOCKS {
        return Err(format!(
            "size {size} exceeds the maximum of {} bytes for {block_size}-byte blocks",
            MAX_BLOCKS * u64::from(block_size)
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        Manifest {
            format: FORMAT,
            volume_id: "abc".into(),
            size: 1 << 20,
            block_size: 4096,
            created_unix_ms: 1,
            next_layer_id: 3,
            next_snapshot_id: 2,
            layers: vec![
                LayerEntry {
                    id: 1,
                    merge_pending: false,
                    ancestor: None,
                    incarnation: None,
                },
                LayerEntry {
                    id: 2,
                    merge_pending: false,
                    ancestor: None,
                    incarnation: None,
                },
            ],
            snapshots: vec![SnapshotEntry {
                id: 1,
                name: "a".into(),
                layer: 1,
                created_unix_ms: 5,
                size: None,
            }],
            origin: None,
        }
    }

    #[test]
    fn round_trip() {
        let dir = tempfile::tempdir().expect("tempdir");
        let m = sample();
        m.store(dir.path()).expect("store");
        assert_eq!(Manifest::load(dir.path()).expect("load"), m);
    }

    #[test]
    fn damaged_manifests_are_refused_with_the_file_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        sample().store(dir.path()).expect("store");
        let path = Manifest::path(dir.path());
        let text = fs::read_to_string(&path).expect("read");
        fs::write(&path, text.replacen("\"a\"", "\"b\"", 1)).expect("write");
        let e = Manifest::load(dir.path())
            .expect_err("must fail")
            .to_string();
        assert!(e.contains("volume.json") && e.contains("checksum"), "{e}");
        fs::write(&path, &text[..text.len() / 2]).expect("write");
        assert!(Manifest::load(dir.path()).is_err());
        fs::remove_file(&path).expect("rm");
        assert!(matches!(
            Manifest::load(dir.path()),
            Err(EngineError::NotAVolume { .. })
        ));
    }

    #[test]
    fn invariants_are_checked() {
        let mut m = sample();
        m.snapshots[0].layer = 2;
        assert!(m.validate().is_err(), "snapshot on head");
        let mut m = sample();
        m.layers[1].id = 1;
        assert!(m.validate().is_err(), "duplicate layer");
        let mut m = sample();
        m.block_size = 1000;
        assert!(m.validate().is_err(), "bad block size");
        let mut m = sample();
        m.size = 4096 * (MAX_BLOCKS + 1);
        assert!(m.validate().is_err(), "too large");
        let mut m = sample();
        m.snapshots[0].size = Some(2 << 20);
        assert!(m.validate().is_err(), "snapshot larger than the volume");
        let mut m = sample();
        m.snapshots[0].size = Some(1000);
        assert!(
            m.validate().is_err(),
            "snapshot size not a multiple of the block size"
        );
    }

    #[test]
    fn snapshot_size_is_optional_on_disk() {
        let dir = tempfile::tempdir().expect("tempdir");
        // A manifest written before snapshots recorded their size still loads, and such a
        // snapshot has the volume's size.
        let m = sample();
        m.store(dir.path()).expect("store");
        let text = fs::read_to_string(Manifest::path(dir.path())).expect("read");
        assert!(
            !text.contains("\"created_unix_ms\":5,\"size\""),
            "an absent size is not written: {text}"
        );
        let back = Manifest::load(dir.path()).expect("load");
        assert_eq!(back.snapshots[0].size, None);
        assert_eq!(back.snapshots[0].size_in(back.size), 1 << 20);
        let mut m = sample();
        m.size = 2 << 20;
        m.snapshots[0].size = Some(1 << 20);
        m.store(dir.path()).expect("store");
        let back = Manifest::load(dir.path()).expect("load");
        assert_eq!(back.snapshots[0].size_in(back.size), 1 << 20);
    }

    #[test]
    fn layer_ancestors_are_optional_and_unique() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut m = sample();
        m.layers[0].ancestor = Some(Ancestor {
            volume_id: "src".into(),
            snapshot_id: 4,
        });
        m.store(dir.path()).expect("store");
        assert_eq!(Manifest::load(dir.path()).expect("load"), m);
        // A manifest without them (an older build's) loads with none.
        sample().store(dir.path()).expect("store");
        let text = fs::read_to_string(Manifest::path(dir.path())).expect("read");
        assert!(!text.contains("ancestor"), "{text}");
        assert_eq!(
            Manifest::load(dir.path()).expect("load").layers[0].ancestor,
            None
        );
        let mut twice = m.clone();
        twice.layers[1].ancestor = twice.layers[0].ancestor.clone();
        assert!(twice.validate().is_err(), "one snapshot marking two layers");
    }
}
