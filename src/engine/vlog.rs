//! The volatile journal of a head layer: what survives the daemon's death but not the
//! machine's.
//!
//! A ublk device outlives its daemon (user recovery): after `kill -9` and `serve
//! --recover`, a mounted file system goes on trusting every write the daemon acknowledged,
//! flushed or not, exactly as it would trust a disk whose controller reset. So each
//! acknowledged write must be findable by the next daemon even before a FLUSH. The map
//! journal (`maplog`) is only written at FLUSH; this journal fills the gap.
//!
//! It is a fixed-size file mapped `MAP_SHARED`: recording a change is a store into the page
//! cache, no system call, and the page cache outlives the process. It is trusted only in
//! the boot that wrote it (its header holds the kernel's boot id): after a power loss or a
//! reboot, unflushed writes may legally be lost, and this journal, whose pages may have
//! reached the disk in any order with the data, is ignored.
//!
//! Layout (little endian): a 64-byte header: magic `SNAPBLKV`, version u32, reserved u32,
//! layer id u64, boot id 16 bytes, `covered` u64 (entries up to this sequence number are
//! in the map journal already), flags u8 (1: the ring overflowed), 7 bytes zero, `next`
//! u64 (the next sequence number); then 24-byte entries: sequence u64 (0 = empty, written
//! last), kind u8 (1 written, 2 zeroed, 3 cleared), 3 bytes zero, first block u32, last
//! block u32, 4 bytes zero. Entry `seq` lives in slot `seq % CAPACITY`; a slot is reused
//! once `covered` passes its sequence number.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::error::{EngineError, Result};
use super::layermap::LayerMap;

const MAGIC: &[u8; 8] = b"SNAPBLKV";
const VERSION: u32 = 1;
const HEADER: usize = 64;
const ENTRY: usize = 24;
/// Entries in the ring: with 24-byte entries, a 24 MiB file (sparse: only used pages cost).
pub const CAPACITY: usize = 1 << 20;
const FILE_LEN: usize = HEADER + CAPACITY * ENTRY;
const COVERED_AT: usize = 40;
const FLAGS_AT: usize = 48;
const NEXT_AT: usize = 56;

/// What an entry records for blocks `[first, last]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Written = 1,
    Zeroed = 2,
    Cleared = 3,
}

/// Changes found at open: (what, first block, last block), oldest first.
pub type Recovered = Vec<(Change, u32, u32)>;

/// An open volatile journal.
pub struct VolatileLog {
    map: *mut u8,
    path: PathBuf,
    _file: File,
    next_seq: u64,
    covered: u64,
    /// The ring ran over entries not yet covered: the journal is incomplete until the next
    /// flush covers everything, and a recovery must not trust it.
    overflowed: bool,
}

// SAFETY: the mapping is owned by this value and only touched through &mut self (the
// engine keeps it under the layer's state lock), except the `covered` word, written
// through an atomic.
unsafe impl Send for VolatileLog {}
// SAFETY: see Send; shared access only reads plain fields.
unsafe impl Sync for VolatileLog {}

/// This boot's id, from the kernel.
fn boot_id() -> [u8; 16] {
    let mut id = [0u8; 16];
    if let Ok(s) = std::fs::read_to_string("/proc/sys/kernel/random/boot_id") {
        let hex: Vec<u8> = s.bytes().filter(u8::is_ascii_hexdigit).collect();
        for (i, pair) in hex.chunks(2).take(16).enumerate() {
            let txt = std::str::from_utf8(pair).unwrap_or("0");
            id[i] = u8::from_str_radix(txt, 16).unwrap_or(0);
        }
    }
    id
}

/// Where the volatile journals live: tmpfs, which holds only page cache (so the journal
/// costs no disk I/O and never slows the fsyncs of a cut) and is emptied by a reboot.
const SHM: &str = "/dev/shm";
/// Overrides [`SHM`]; empty keeps the journals in each volume's layers folder (tests use
/// that, so the journals go away with their scratch folders).
pub const DIR_ENV: &str = "SNAPBLK_VLOG_DIR";

fn shm_dir() -> Option<PathBuf> {
    match std::env::var_os(DIR_ENV) {
        Some(d) if d.is_empty() => None,
        Some(d) => Some(PathBuf::from(d)),
        None => Path::new(SHM).is_dir().then(|| PathBuf::from(SHM)),
    }
}

/// Path of the volatile journal of layer `layer_id` of volume `volume_id`: in /dev/shm
/// (or `$SNAPBLK_VLOG_DIR`) where there is one, else in the volume's layers folder.
pub fn path_for(volume_id: &str, layer_id: u64, fallback_dir: &Path) -> PathBuf {
    match shm_dir() {
        Some(d) => d.join(format!("snapblk-{volume_id}-{layer_id}.vlog")),
        None => fallback_dir.join(format!("{layer_id}.vlog")),
    }
}

/// Removes the volatile journals of volume `volume_id`'s layers `ids` except the head's,
/// and any journal in the layers folder but the head's (left by sealed heads, or by an
/// older layout).
pub fn remove_stale(volume_id: &str, ids: impl Iterator<Item = u64>, head: u64, layers_dir: &Path) {
    let keep = path_for(volume_id, head, layers_dir);
    let mut stale: Vec<PathBuf> = ids
        .filter(|&id| id != head)
        .map(|id| path_for(volume_id, id, layers_dir))
        .collect();
    if let Ok(entries) = std::fs::read_dir(layers_dir) {
        stale.extend(
            entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "vlog") && *p != keep),
        );
    }
    for p in stale {
        match std::fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(file = %p.display(), error = %e, "cannot remove a stale volatile journal")
            }
        }
    }
}

impl VolatileLog {
    /// Opens (or creates) the volatile journal of head layer `layer_id` at `path`, and
    /// returns the changes it holds that the map journal does not, oldest first — only
    /// if it was written in this boot. A journal from another boot, or damaged, is reset.
    pub fn open(path: &Path, layer_id: u64) -> Result<(VolatileLog, Recovered)> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)
            .map_err(|e| EngineError::io(path, e))?;
        let mut header = [0u8; HEADER];
        let len = file.metadata().map_err(|e| EngineError::io(path, e))?.len();
        let trusted = len == FILE_LEN as u64
            && std::os::unix::fs::FileExt::read_exact_at(&file, &mut header, 0).is_ok()
            && &header[..8] == MAGIC
            && header[8..12] == VERSION.to_le_bytes()
            && header[16..24] == layer_id.to_le_bytes()
            && header[24..40] == boot_id()
            && header[FLAGS_AT] == 0;
        if !trusted {
            if &header[..8] == MAGIC {
                tracing::info!(
                    path = %path.display(),
                    "ignoring a volatile journal from another boot, or incomplete: unflushed writes lost in a power loss stay lost"
                );
            }
            // Empty the file without touching its pages: it becomes one sparse hole.
            file.set_len(0).map_err(|e| EngineError::io(path, e))?;
            file.set_len(FILE_LEN as u64)
                .map_err(|e| EngineError::io(path, e))?;
        }
        // SAFETY: maps FILE_LEN bytes of a file we just sized to FILE_LEN; the mapping is
        // unmapped in Drop and never handed out.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                FILE_LEN,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if map == libc::MAP_FAILED {
            return Err(EngineError::io(path, std::io::Error::last_os_error()));
        }
        let mut log = VolatileLog {
            map: map.cast(),
            path: path.to_path_buf(),
            _file: file,
            next_seq: 1,
            covered: 0,
            overflowed: false,
        };
        let changes = if trusted {
            log.recover()
        } else {
            let boot = boot_id();
            let b = log.bytes_mut();
            b[..8].copy_from_slice(MAGIC);
            b[8..12].copy_from_slice(&VERSION.to_le_bytes());
            b[16..24].copy_from_slice(&layer_id.to_le_bytes());
            b[24..40].copy_from_slice(&boot);
            log.word(NEXT_AT).store(1, Ordering::Release);
            vec![]
        };
        Ok((log, changes))
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: the mapping is FILE_LEN bytes long and lives as long as self.
        unsafe { std::slice::from_raw_parts(self.map, FILE_LEN) }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in bytes(), and &mut self gives exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.map, FILE_LEN) }
    }

    fn word(&self, at: usize) -> &AtomicU64 {
        // SAFETY: `at` is an 8-aligned offset inside the header of a page-aligned mapping;
        // header words are only accessed through atomics.
        unsafe { &*(self.map.add(at) as *const AtomicU64) }
    }

    /// The changes after `covered`, oldest first, from a journal of this boot.
    fn recover(&mut self) -> Recovered {
        let covered = self.word(COVERED_AT).load(Ordering::Acquire);
        let next = self.word(NEXT_AT).load(Ordering::Acquire).max(covered + 1);
        let b = self.bytes();
        let mut changes = Vec::new();
        for seq in covered + 1..next {
            let off = HEADER + (seq as usize % CAPACITY) * ENTRY;
            let e = &b[off..off + ENTRY];
            let word = |i: usize| u32::from_le_bytes([e[i], e[i + 1], e[i + 2], e[i + 3]]);
            if u64::from(word(0)) | (u64::from(word(4)) << 32) != seq {
                // Reserved but not finished when the process died: never acknowledged.
                continue;
            }
            let kind = match e[8] {
                1 => Change::Written,
                2 => Change::Zeroed,
                3 => Change::Cleared,
                _ => continue,
            };
            let (first, last) = (word(12), word(16));
            if first <= last {
                changes.push((kind, first, last));
            }
        }
        self.covered = covered;
        self.next_seq = next;
        changes
    }

    /// Records a change; called under the layer's state lock, before the write is
    /// acknowledged.
    pub fn record(&mut self, kind: Change, first: u32, last: u32) {
        let seq = self.next_seq;
        self.next_seq += 1;
        let slot = (seq as usize) % CAPACITY;
        let off = HEADER + slot * ENTRY;
        let old = {
            let b = self.bytes();
            u64::from_le_bytes([
                b[off],
                b[off + 1],
                b[off + 2],
                b[off + 3],
                b[off + 4],
                b[off + 5],
                b[off + 6],
                b[off + 7],
            ])
        };
        if old > self.covered && !self.overflowed {
            // The slot still holds a change no flush has covered: from now on this journal
            // cannot be trusted until a flush covers everything.
            self.overflowed = true;
            self.bytes_mut()[FLAGS_AT] = 1;
            tracing::warn!(path = %self.path.display(), "volatile journal full: until the next flush, a daemon crash may lose unflushed writes");
        }
        let e = &mut self.bytes_mut()[off..off + ENTRY];
        e[0..8].fill(0);
        e[8] = kind as u8;
        e[12..16].copy_from_slice(&first.to_le_bytes());
        e[16..20].copy_from_slice(&last.to_le_bytes());
        // The sequence number goes in last: a half-written entry reads as empty.
        std::sync::atomic::fence(Ordering::Release);
        self.bytes_mut()[off..off + 8].copy_from_slice(&seq.to_le_bytes());
        self.word(NEXT_AT).store(seq + 1, Ordering::Release);
    }

    /// The sequence number of the newest change recorded: a flush that captures the map
    /// now covers everything up to it.
    pub fn mark(&self) -> u64 {
        self.next_seq - 1
    }

    /// Declares every change up to `seq` durable in the map journal.
    pub fn covered(&mut self, seq: u64) {
        if seq > self.covered {
            self.covered = seq;
            self.word(COVERED_AT).store(seq, Ordering::Release);
        }
        if self.overflowed && seq + 1 >= self.next_seq {
            self.overflowed = false;
            self.bytes_mut()[FLAGS_AT] = 0;
        }
    }

    /// True when more than half the ring holds uncovered changes: time to flush.
    pub fn wants_flush(&self) -> bool {
        self.next_seq - 1 - self.covered > (CAPACITY / 2) as u64
    }
}

impl Drop for VolatileLog {
    fn drop(&mut self) {
        // SAFETY: unmapping the mapping made in open(), exactly once.
        unsafe {
            libc::munmap(self.map.cast(), FILE_LEN);
        }
    }
}

/// Applies recovered changes to a map; returns the blocks they touched.
pub fn apply(map: &mut LayerMap, changes: &[(Change, u32, u32)]) -> roaring::RoaringBitmap {
    let mut touched = roaring::RoaringBitmap::new();
    for &(kind, first, last) in changes {
        let end = u64::from(last) + 1;
        match kind {
            Change::Written => map.mark_written(first, end),
            Change::Zeroed => map.mark_zeroed(first, end),
            Change::Cleared => map.clear(first, end),
        }
        touched.insert_range(first..=last);
    }
    touched
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_survive_a_reopen_until_covered() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("7.vlog");
        let (mut log, found) = VolatileLog::open(&p, 7).expect("open");
        assert!(found.is_empty());
        log.record(Change::Written, 0, 9);
        log.record(Change::Zeroed, 5, 5);
        let mark = log.mark();
        log.record(Change::Written, 100, 100);
        drop(log);
        let (mut log, found) = VolatileLog::open(&p, 7).expect("reopen");
        assert_eq!(
            found,
            vec![
                (Change::Written, 0, 9),
                (Change::Zeroed, 5, 5),
                (Change::Written, 100, 100)
            ]
        );
        log.covered(mark);
        drop(log);
        let (log, found) = VolatileLog::open(&p, 7).expect("reopen");
        assert_eq!(found, vec![(Change::Written, 100, 100)]);
        assert_eq!(log.mark(), 3);
        let mut m = LayerMap::default();
        let t = apply(&mut m, &found);
        assert!(m.present.contains(100) && t.contains(100) && t.len() == 1);
    }

    #[test]
    fn another_layer_or_boot_is_ignored() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("8.vlog");
        let (mut log, _) = VolatileLog::open(&p, 8).expect("open");
        log.record(Change::Written, 1, 2);
        drop(log);
        let (_, found) = VolatileLog::open(&p, 9).expect("other layer");
        assert!(found.is_empty());
        let (mut log, _) = VolatileLog::open(&p, 8).expect("open");
        log.record(Change::Written, 1, 2);
        drop(log);
        // Pretend another boot wrote it.
        let mut bytes = std::fs::read(&p).expect("read");
        bytes[30] ^= 0xff;
        std::fs::write(&p, &bytes).expect("write");
        let (_, found) = VolatileLog::open(&p, 8).expect("other boot");
        assert!(found.is_empty(), "a journal from another boot was trusted");
    }

    #[test]
    fn an_overflowing_ring_is_not_trusted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("9.vlog");
        let (mut log, _) = VolatileLog::open(&p, 9).expect("open");
        for i in 0..(CAPACITY as u32 + 1) {
            log.record(Change::Written, i, i);
        }
        assert!(log.wants_flush());
        drop(log);
        let (mut log, found) = VolatileLog::open(&p, 9).expect("reopen");
        assert!(found.is_empty(), "an incomplete journal was trusted");
        log.record(Change::Written, 1, 1);
        let m = log.mark();
        log.covered(m);
        assert!(!log.wants_flush());
    }
}
