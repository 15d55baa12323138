//! A volume folder seen from outside: what its manifest says, read without opening the
//! volume, and removal of the whole folder. For callers that manage many volumes (the CSI
//! node plugin) and must list them whether or not a daemon serves them.

use std::fs;
use std::path::Path;

use super::error::{EngineError, Result};
use super::fsutil;
use super::layer;
use super::manifest::Manifest;
use super::vlog;
use super::volume::lock_volume;

/// What a volume's manifest says about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeSummary {
    pub volume_id: String,
    pub size: u64,
    pub block_size: u32,
    pub created_unix_ms: u64,
    /// Oldest first.
    pub snapshots: Vec<SnapshotSummary>,
}

/// One snapshot as the manifest lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotSummary {
    pub id: u64,
    pub name: String,
    pub created_unix_ms: u64,
    /// Size of the volume it captures, in bytes.
    pub size: u64,
}

/// Reads the manifest of the volume in `dir` without opening the volume: no lock is taken,
/// so it works while a daemon serves the volume (the manifest only ever changes by atomic
/// replacement, so what is read is one whole version of it).
pub fn summary(dir: &Path) -> Result<VolumeSummary> {
    let m = Manifest::load(dir)?;
    Ok(VolumeSummary {
        snapshots: m
            .snapshots
            .iter()
            .map(|s| SnapshotSummary {
                id: s.id,
                name: s.name.clone(),
                created_unix_ms: s.created_unix_ms,
                size: s.size_in(m.size),
            })
            .collect(),
        volume_id: m.volume_id,
        size: m.size,
        block_size: m.block_size,
        created_unix_ms: m.created_unix_ms,
    })
}

/// Removes the volume in `dir` with its volatile journals. Refused (`Busy`) while another
/// process has the volume open. The folder is first renamed to a hidden name next to it,
/// so a crash midway leaves no folder that looks like a volume; a damaged volume is
/// removed too.
pub fn destroy(dir: &Path) -> Result<()> {
    let lock = lock_volume(dir)?;
    let manifest = Manifest::load(dir).ok();
    let name = dir
        .file_name()
        .ok_or_else(|| EngineError::Invalid(format!("{} is not a folder name", dir.display())))?;
    let parent = dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or_else(|| Path::new("."));
    let doomed = parent.join(format!(".{}.removing", name.to_string_lossy()));
    if doomed.exists() {
        fs::remove_dir_all(&doomed).map_err(|e| EngineError::io(&doomed, e))?;
    }
    fs::rename(dir, &doomed).map_err(|e| EngineError::io(dir, e))?;
    fsutil::sync_dir(parent)?;
    drop(lock);
    if let Some(m) = manifest {
        let layers_dir = doomed.join(layer::LAYERS_DIR);
        vlog::remove_stale(&m.volume_id, &layers_dir, &[]);
    }
    fs::remove_dir_all(&doomed).map_err(|e| EngineError::io(&doomed, e))?;
    tracing::info!(volume = %dir.display(), "removed volume");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{CreateOptions, Volume};

    #[test]
    fn summary_reads_a_served_volume_and_destroy_waits_for_it() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("v1");
        let v = Volume::create(
            &dir,
            &CreateOptions {
                size: 1 << 20,
                block_size: 4096,
            },
        )
        .expect("create");
        v.create_snapshot("s1").expect("snapshot");
        let s = summary(&dir).expect("summary while open");
        assert_eq!(s.size, 1 << 20);
        assert_eq!(s.volume_id, v.id());
        assert_eq!(s.snapshots.len(), 1);
        assert_eq!(s.snapshots[0].name, "s1");
        assert!(matches!(destroy(&dir), Err(EngineError::Busy { .. })));
        assert!(dir.exists());
        v.close().expect("close");
        destroy(&dir).expect("destroy");
        assert!(!dir.exists());
        assert_eq!(fs::read_dir(tmp.path()).expect("ls").count(), 0);
        assert!(matches!(summary(&dir), Err(EngineError::NotAVolume { .. })));
    }
}
