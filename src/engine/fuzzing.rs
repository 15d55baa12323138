//! Entry points for the fuzz targets (`fuzz/`): the engine's on-disk decoders, fed bytes
//! that no writer made. Built only with the `fuzzing` feature; not an API.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use super::manifest::Manifest;
use super::maplog;
use super::vlog::{self, VolatileLog};

/// Decodes `bytes` as a manifest (`volume.json`).
pub fn manifest_decode(bytes: &[u8]) -> bool {
    Manifest::decode(Path::new("volume.json"), bytes).is_ok()
}

/// Replays `bytes` as the map log of layer `layer_id`, as a head (a torn tail allowed)
/// and as a frozen layer.
pub fn maplog_decode(bytes: &[u8], layer_id: u64) -> bool {
    let path = Path::new("1.map");
    let head = maplog::replay_bytes(bytes, path, layer_id, true).is_ok();
    let frozen = maplog::replay_bytes(bytes, path, layer_id, false).is_ok();
    head || frozen
}

/// Writes `bytes` as the volatile journal at `path` (made to look like this boot's and
/// this layer's, so the fuzzer gets past the checks that a stale journal fails), opens it
/// for a volume of `blocks` blocks, and records one change. Returns the changes found.
pub fn vlog_open(path: &Path, bytes: &[u8], blocks: u64) -> std::io::Result<usize> {
    const HEADER: usize = 128;
    let mut b = bytes.to_vec();
    let (layer_id, incarnation) = if b.len() >= HEADER {
        b[24..40].copy_from_slice(&vlog::boot_id_for_fuzzing());
        let mut id = [0u8; 8];
        id.copy_from_slice(&b[16..24]);
        let mut inc = [0u8; 16];
        inc.copy_from_slice(&b[64..80]);
        // The size its ring needs, when that is small, so a mutated header is not
        // refused only for its length.
        let mut cap = [0u8; 8];
        cap.copy_from_slice(&b[80..88]);
        let cap = u64::from_le_bytes(cap);
        if cap <= 1 << 16 {
            b.resize(HEADER + cap as usize * 24, 0);
        }
        (u64::from_le_bytes(id), inc)
    } else {
        (1, [0u8; 16])
    };
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(&b)?;
    drop(f);
    let budget = vlog::MIN_BUDGET;
    match VolatileLog::open(path, layer_id, &incarnation, blocks, budget) {
        Ok((mut log, changes)) => {
            let mut map = super::layermap::LayerMap::default();
            vlog::apply(&mut map, None, &changes);
            let _ = log.record(vlog::Change::Written, 0, 0, None);
            Ok(changes.len())
        }
        Err(e) => Err(std::io::Error::other(e.to_string())),
    }
}
