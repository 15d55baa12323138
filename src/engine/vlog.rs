//! The volatile journal of a head layer: what survives the daemon's death but not the
//! machine's.
//!
//! A ublk device outlives its daemon (user recovery): after `kill -9` and `serve
//! --recover`, a mounted file system goes on trusting every write the daemon acknowledged,
//! flushed or not, exactly as it would trust a disk whose controller reset. So each
//! acknowledged write must be findable by the next daemon even before a FLUSH. The map
//! journal (`maplog`) is only written at FLUSH; this journal fills the gap.
//!
//! It is a ring in a file mapped `MAP_SHARED`: recording a change is a store into the page
//! cache, no system call, and the page cache outlives the process. It is trusted only in
//! the boot that wrote it (its header holds the kernel's boot id): after a power loss or a
//! reboot, unflushed writes may legally be lost, and this journal, whose pages may have
//! reached the disk in any order with the data, is ignored.
//!
//! It lives in shared memory (`/dev/shm`), where other local users can create files, so
//! it trusts nothing it did not make itself: it is created exclusively (`O_EXCL`,
//! `O_NOFOLLOW`, mode 0600); reopened without following a link, and only if it is a
//! regular file of ours, with one link, that no one else may write; and it must carry the
//! *incarnation* of its layer, a random value the manifest (readable by us alone) names
//! for the head, so a journal left by an earlier layer with the same id, or by anyone
//! else, is never replayed. Every field read from it is bounded (its size, ring size,
//! counters, block numbers) and read with `pread` before anything is mapped. Anything
//! else is discarded as stale.
//!
//! Its size is a budget (`SNAPBLK_VLOG_BUDGET`, 4 MiB by default: a container's /dev/shm
//! is often 64 MiB): the ring never overwrites a change no flush has covered; the layer
//! flushes when it is half full, and forces a flush when it is full. Pages are reserved
//! with `fallocate` before the mapping touches them, so a full tmpfs fails the write
//! that needed the page with ENOSPC instead of killing the process with SIGBUS.
//!
//! Layout (little endian), format version 2: a 128-byte header: magic `SNAPBLKV`, version
//! u32, reserved u32, layer id u64, boot id 16 bytes, `covered` u64 (entries up to this
//! sequence number are in the map journal already), flags u8 (must be 0), 7 bytes zero,
//! `next` u64 (the next sequence number), incarnation 16 bytes, capacity u64 (entries in
//! the ring), zeros; then `capacity` 24-byte entries: sequence u64 (0 = empty, written
//! last), kind u8 (1 written, 2 zeroed, 3 cleared, 4 written to slots), 3 bytes zero,
//! first block u32, last block u32, then for kind 4 the slot of the first block u32 (the
//! others follow it), else 4 bytes zero. Entry `seq` lives in slot `seq % capacity`; a slot is reused
//! once `covered` passes its sequence number.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::error::{EngineError, Result};
use super::layermap::LayerMap;

const MAGIC: &[u8; 8] = b"SNAPBLKV";
const VERSION: u32 = 2;
const HEADER: usize = 128;
const ENTRY: usize = 24;
const LAYER_AT: usize = 16;
const BOOT_AT: usize = 24;
const COVERED_AT: usize = 40;
const FLAGS_AT: usize = 48;
const NEXT_AT: usize = 56;
const INCARNATION_AT: usize = 64;
const CAPACITY_AT: usize = 80;

/// Budget of one head's journal when `SNAPBLK_VLOG_BUDGET` does not say: 4 MiB, about
/// 175 000 changes between two flushes.
pub const DEFAULT_BUDGET: u64 = 4 << 20;
/// Smallest budget accepted.
pub const MIN_BUDGET: u64 = 16 << 10;
/// Largest budget accepted.
pub const MAX_BUDGET: u64 = 1 << 30;
/// Sets the budget of each head's journal, in bytes (a `K`, `M` or `G` suffix is allowed).
pub const BUDGET_ENV: &str = "SNAPBLK_VLOG_BUDGET";
/// Space reserved ahead of the ring's write position at a time.
const RESERVE_STEP: u64 = 64 << 10;

/// The budget of a new journal: `$SNAPBLK_VLOG_BUDGET` within limits, or the default.
pub fn budget() -> u64 {
    let Some(raw) = std::env::var_os(BUDGET_ENV) else {
        return DEFAULT_BUDGET;
    };
    let text = raw.to_string_lossy();
    match super::fsutil::parse_size(&text) {
        Some(b) => b.clamp(MIN_BUDGET, MAX_BUDGET),
        None => {
            tracing::warn!(value = %text, "{BUDGET_ENV} is not a size in bytes; using the default of 4 MiB");
            DEFAULT_BUDGET
        }
    }
}

/// Ring entries of a journal of `budget` bytes.
fn capacity_for(budget: u64) -> u64 {
    (budget.clamp(MIN_BUDGET, MAX_BUDGET) - HEADER as u64) / ENTRY as u64
}

/// What an entry records for blocks `[first, last]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Written = 1,
    Zeroed = 2,
    Cleared = 3,
}

/// Changes found at open: (what, first block, last block, slot of the first block for a
/// write to a slotted layer), oldest first.
pub type Recovered = Vec<(Change, u32, u32, Option<u32>)>;

/// Why a change could not be recorded (the write must then not be acknowledged).
#[derive(Debug)]
pub enum RecordError {
    /// Every slot holds a change no flush has covered yet: flush, then record again.
    Full,
    /// Shared memory could not hold the journal's next page (a full tmpfs).
    NoSpace(std::io::Error),
}

/// A layer incarnation: a random value given to a head when it is created, kept in the
/// manifest and in the head's volatile journal, so a journal is replayed only into the
/// very layer that wrote it (never into a later layer that happens to reuse its id).
pub fn new_incarnation() -> String {
    super::volume::random_id()
}

/// The 16 bytes of an incarnation written as 32 hex digits.
pub fn parse_incarnation(s: &str) -> Option<[u8; 16]> {
    if s.len() != 32 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// An open volatile journal.
pub struct VolatileLog {
    map: *mut u8,
    len: usize,
    capacity: u64,
    path: PathBuf,
    file: File,
    /// Bytes from the start of the file that are allocated (fallocate): the mapping only
    /// touches pages below this.
    reserved: u64,
    next_seq: u64,
    covered: u64,
}

// SAFETY: the mapping is owned by this value and only touched through &mut self (the
// engine keeps it under the layer's state lock), except the `covered` and `next` words,
// written through atomics.
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

/// This boot's id, for the fuzz targets.
#[cfg(feature = "fuzzing")]
pub(crate) fn boot_id_for_fuzzing() -> [u8; 16] {
    boot_id()
}

/// Where the volatile journals live: tmpfs, which holds only page cache (so the journal
/// costs no disk I/O and never slows the fsyncs of a cut) and is emptied by a reboot.
const SHM: &str = "/dev/shm";
/// Overrides [`SHM`]; empty keeps the journals in each volume's layers folder.
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

/// Every volatile journal file of volume `volume_id` that exists, with its layer id, and
/// whether it is a regular file of this process's user (only those may tell which layer
/// ids were used: anyone can create a file in /dev/shm).
pub fn existing(volume_id: &str, layers_dir: &Path) -> Vec<(u64, PathBuf, bool)> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    let mut found = Vec::new();
    let mut scan = |dir: &Path, prefix: &str| {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            let id = name
                .strip_prefix(prefix)
                .and_then(|rest| rest.strip_suffix(".vlog"))
                .and_then(|id| id.parse::<u64>().ok());
            if let Some(id) = id {
                let ours = std::fs::symlink_metadata(e.path())
                    .is_ok_and(|m| m.file_type().is_file() && m.uid() == me);
                found.push((id, e.path(), ours));
            }
        }
    };
    if let Some(d) = shm_dir() {
        scan(&d, &format!("snapblk-{volume_id}-"));
    }
    // Journals in the layers folder: the fallback layout, or left by an older layout.
    scan(layers_dir, "");
    found
}

/// Removes every volatile journal of volume `volume_id` except the ones at `keep`.
pub fn remove_stale(volume_id: &str, layers_dir: &Path, keep: &[PathBuf]) {
    for (_, p, _) in existing(volume_id, layers_dir) {
        if keep.contains(&p) {
            continue;
        }
        match std::fs::remove_file(&p) {
            Ok(()) => tracing::debug!(file = %p.display(), "removed a stale volatile journal"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(file = %p.display(), error = %e, "cannot remove a stale volatile journal")
            }
        }
    }
}

/// Removes whatever is at `path` (a stale journal, a planted file or link) so a journal
/// can be created there exclusively.
fn discard(path: &Path, why: &str) -> Result<()> {
    tracing::info!(path = %path.display(), why, "discarding a volatile journal: unflushed writes it may name are not replayed");
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(EngineError::io(
            path,
            std::io::Error::new(
                e.kind(),
                format!("cannot remove a volatile journal that is not this layer's ({why}): {e}"),
            ),
        )),
    }
}

/// Why the file open at `file` cannot be trusted as our journal, if it cannot.
fn untrusted_file(file: &File) -> std::io::Result<Option<String>> {
    let md = file.metadata()?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    Ok(if !md.file_type().is_file() {
        Some("not a regular file".into())
    } else if md.uid() != me {
        Some(format!(
            "owned by uid {}, not by this process (uid {me})",
            md.uid()
        ))
    } else if md.mode() & 0o077 != 0 {
        Some(format!("mode {:o} lets other users in", md.mode() & 0o7777))
    } else if md.nlink() != 1 {
        Some(format!("{} links to it", md.nlink()))
    } else {
        None
    })
}

/// What a journal must match to be replayed.
struct Expect<'a> {
    layer_id: u64,
    incarnation: &'a [u8; 16],
    /// Blocks in the volume: no change may name one past it.
    blocks: u64,
}

/// A trusted journal's state and the changes to replay.
struct Found {
    capacity: u64,
    covered: u64,
    next: u64,
    changes: Recovered,
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(w)
}

/// Reads and checks a journal with pread (never through a mapping: a file shorter than
/// its header says must not kill the process). `Err(reason)` when it is not to be trusted.
fn read_trusted(file: &File, want: &Expect) -> std::result::Result<Found, String> {
    let len = file.metadata().map_err(|e| e.to_string())?.len();
    let mut h = [0u8; HEADER];
    if len < HEADER as u64 {
        return Err(format!("{len} bytes, shorter than its header"));
    }
    file.read_exact_at(&mut h, 0).map_err(|e| e.to_string())?;
    if &h[..8] != MAGIC {
        return Err("not a volatile journal".into());
    }
    if u32_at(&h, 8) != VERSION {
        return Err(format!("format version {}", u32_at(&h, 8)));
    }
    if u64_at(&h, LAYER_AT) != want.layer_id {
        return Err("another layer's".into());
    }
    if h[BOOT_AT..BOOT_AT + 16] != boot_id() {
        return Err("written before the last boot".into());
    }
    if &h[INCARNATION_AT..INCARNATION_AT + 16] != want.incarnation {
        return Err("an earlier layer's with the same id (another incarnation)".into());
    }
    if h[FLAGS_AT] != 0 {
        return Err("unknown flags".into());
    }
    let capacity = u64_at(&h, CAPACITY_AT);
    if capacity < capacity_for(MIN_BUDGET) || capacity > capacity_for(MAX_BUDGET) {
        return Err(format!("ring of {capacity} entries"));
    }
    let expected_len = HEADER as u64 + capacity * ENTRY as u64;
    if len != expected_len {
        return Err(format!(
            "{len} bytes, but its ring needs {expected_len} (truncated?)"
        ));
    }
    let covered = u64_at(&h, COVERED_AT);
    let next = u64_at(&h, NEXT_AT);
    if next == 0 || covered >= next || next - 1 - covered > capacity {
        return Err(format!(
            "counters out of bounds (covered {covered}, next {next}, ring {capacity})"
        ));
    }
    let mut ring = vec![0u8; capacity as usize * ENTRY];
    file.read_exact_at(&mut ring, HEADER as u64)
        .map_err(|e| e.to_string())?;
    let mut changes = Vec::new();
    for seq in covered + 1..next {
        let off = (seq % capacity) as usize * ENTRY;
        let e = &ring[off..off + ENTRY];
        if u64_at(e, 0) != seq {
            // Reserved but not finished when the process died: never acknowledged.
            continue;
        }
        let (kind, placed) = match e[8] {
            1 => (Change::Written, false),
            2 => (Change::Zeroed, false),
            3 => (Change::Cleared, false),
            4 => (Change::Written, true),
            k => return Err(format!("entry {seq} has unknown kind {k}")),
        };
        let (first, last) = (u32_at(e, 12), u32_at(e, 16));
        if first > last || u64::from(last) >= want.blocks {
            return Err(format!(
                "entry {seq} names blocks {first}..={last} of a volume of {} blocks",
                want.blocks
            ));
        }
        let slot = placed.then(|| u32_at(e, 20));
        if let Some(s) = slot {
            if u64::from(s) + u64::from(last - first) >= super::slots::MAX_SLOTS {
                return Err(format!("entry {seq} names slot {s}, past the slot space"));
            }
        }
        changes.push((kind, first, last, slot));
    }
    Ok(Found {
        capacity,
        covered,
        next,
        changes,
    })
}

/// Reserves `[from, to)` of `file` in the file system (tmpfs pages are allocated now, so
/// touching them through the mapping cannot fail later).
fn reserve(file: &File, from: u64, to: u64) -> std::io::Result<()> {
    if to <= from {
        return Ok(());
    }
    // SAFETY: fallocate on a valid descriptor; no memory is passed.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, from as i64, (to - from) as i64) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

impl VolatileLog {
    /// Creates the volatile journal of a new head layer at `path`, exclusively; anything
    /// found there first (a journal of a dead layer, a planted file) is removed.
    pub fn create(
        path: &Path,
        layer_id: u64,
        incarnation: &[u8; 16],
        budget: u64,
    ) -> Result<VolatileLog> {
        if std::fs::symlink_metadata(path).is_ok() {
            discard(path, "a file was already there")?;
        }
        Self::make(path, layer_id, incarnation, capacity_for(budget))
    }

    fn make(
        path: &Path,
        layer_id: u64,
        incarnation: &[u8; 16],
        capacity: u64,
    ) -> Result<VolatileLog> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)
            .map_err(|e| EngineError::io(path, e))?;
        let len = HEADER as u64 + capacity * ENTRY as u64;
        let made = (|| {
            file.set_len(len)?;
            reserve(&file, 0, RESERVE_STEP.min(len))
        })();
        if let Err(e) = made {
            let _ = std::fs::remove_file(path);
            tracing::error!(path = %path.display(), error = %e, "cannot make a volatile journal in shared memory; free /dev/shm or lower {BUDGET_ENV}");
            return Err(EngineError::io(path, e));
        }
        let mut log = Self::map(file, path, len, capacity, RESERVE_STEP.min(len))?;
        let boot = boot_id();
        let b = log.bytes_mut();
        b[..8].copy_from_slice(MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        b[LAYER_AT..LAYER_AT + 8].copy_from_slice(&layer_id.to_le_bytes());
        b[BOOT_AT..BOOT_AT + 16].copy_from_slice(&boot);
        b[INCARNATION_AT..INCARNATION_AT + 16].copy_from_slice(incarnation);
        b[CAPACITY_AT..CAPACITY_AT + 8].copy_from_slice(&capacity.to_le_bytes());
        log.word(NEXT_AT).store(1, Ordering::Release);
        log.next_seq = 1;
        Ok(log)
    }

    /// Maps `len` bytes of `file`, checking first that it has exactly that size (a
    /// mapping past the end of a file faults on access).
    fn map(file: File, path: &Path, len: u64, capacity: u64, reserved: u64) -> Result<Self> {
        let size = file.metadata().map_err(|e| EngineError::io(path, e))?.len();
        if size != len {
            return Err(EngineError::corrupt(
                path,
                format!("volatile journal is {size} bytes, expected {len}"),
            ));
        }
        let n = usize::try_from(len).map_err(|_| EngineError::corrupt(path, "too large"))?;
        // SAFETY: maps `n` bytes of a file checked to be `n` bytes long; the mapping is
        // unmapped in Drop and never handed out.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                n,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if map == libc::MAP_FAILED {
            return Err(EngineError::io(path, std::io::Error::last_os_error()));
        }
        Ok(VolatileLog {
            map: map.cast(),
            len: n,
            capacity,
            path: path.to_path_buf(),
            file,
            reserved,
            next_seq: 1,
            covered: 0,
        })
    }

    /// Opens the volatile journal of head layer `layer_id` (incarnation `incarnation`, of a
    /// volume of `blocks` blocks) at `path`, and returns the changes it holds that the map
    /// journal does not, oldest first. Only a journal of this boot, this incarnation and
    /// this user, whose every field is in bounds, is replayed; anything else at `path` is
    /// discarded and a new journal created.
    pub fn open(
        path: &Path,
        layer_id: u64,
        incarnation: &[u8; 16],
        blocks: u64,
        budget: u64,
    ) -> Result<(VolatileLog, Recovered)> {
        // No O_CREAT: only our own exclusive create makes a journal. O_NONBLOCK: a FIFO
        // planted at the path must not hang the open (it is refused as not a file).
        let opened = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
            .open(path);
        let file = match opened {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok((Self::create(path, layer_id, incarnation, budget)?, vec![]));
            }
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
                discard(path, "a symbolic link")?;
                return Ok((Self::create(path, layer_id, incarnation, budget)?, vec![]));
            }
            Err(e) => return Err(EngineError::io(path, e)),
        };
        let want = Expect {
            layer_id,
            incarnation,
            blocks,
        };
        let verdict = match untrusted_file(&file).map_err(|e| EngineError::io(path, e))? {
            Some(why) => Err(why),
            None => read_trusted(&file, &want),
        };
        let found = match verdict {
            Ok(found) => found,
            Err(why) => {
                drop(file);
                discard(path, &why)?;
                return Ok((Self::create(path, layer_id, incarnation, budget)?, vec![]));
            }
        };
        let len = HEADER as u64 + found.capacity * ENTRY as u64;
        // The pages this lap of the ring has written exist already, so reserving them
        // needs no new memory (a full /dev/shm does not stop a recovery); the rest is
        // reserved as the ring reaches it, like a new journal's.
        let reserved = (HEADER as u64 + (found.next % found.capacity) * ENTRY as u64)
            .div_ceil(4096)
            .saturating_mul(4096)
            .clamp(HEADER as u64, len);
        reserve(&file, 0, reserved).map_err(|e| EngineError::io(path, e))?;
        let mut log = Self::map(file, path, len, found.capacity, reserved)?;
        log.covered = found.covered;
        log.next_seq = found.next;
        Ok((log, found.changes))
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: the mapping is `len` bytes long and lives as long as self; &mut self
        // gives exclusive access; only reserved pages are written through it.
        unsafe { std::slice::from_raw_parts_mut(self.map, self.len) }
    }

    fn word(&self, at: usize) -> &AtomicU64 {
        // SAFETY: `at` is an 8-aligned offset inside the header of a page-aligned mapping;
        // header words are only accessed through atomics.
        unsafe { &*(self.map.add(at) as *const AtomicU64) }
    }

    /// Records a change; called under the layer's state lock, before the write is
    /// acknowledged. Refuses when the ring has no free slot or shared memory is full:
    /// the write must not be acknowledged then.
    /// `slot`: where a write to a slotted layer put block `first` (the others follow).
    pub fn record(
        &mut self,
        kind: Change,
        first: u32,
        last: u32,
        slot: Option<u32>,
    ) -> std::result::Result<(), RecordError> {
        let seq = self.next_seq;
        if seq - 1 - self.covered >= self.capacity {
            return Err(RecordError::Full);
        }
        let off = HEADER + (seq % self.capacity) as usize * ENTRY;
        let end = (off + ENTRY) as u64;
        if end > self.reserved {
            let to = (self.reserved + RESERVE_STEP).max(end).min(self.len as u64);
            reserve(&self.file, self.reserved, to).map_err(RecordError::NoSpace)?;
            self.reserved = to;
        }
        self.next_seq += 1;
        let e = &mut self.bytes_mut()[off..off + ENTRY];
        e[0..8].fill(0);
        e[8] = match (kind, slot) {
            (Change::Written, Some(_)) => 4,
            _ => kind as u8,
        };
        e[12..16].copy_from_slice(&first.to_le_bytes());
        e[16..20].copy_from_slice(&last.to_le_bytes());
        e[20..24].copy_from_slice(&slot.unwrap_or(0).to_le_bytes());
        // The sequence number goes in last: a half-written entry reads as empty.
        std::sync::atomic::fence(Ordering::Release);
        self.bytes_mut()[off..off + 8].copy_from_slice(&seq.to_le_bytes());
        self.word(NEXT_AT).store(seq + 1, Ordering::Release);
        Ok(())
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
    }

    /// When every change is covered, starts the ring over at its first slot (whose page
    /// was reserved at creation), so a journal that could not reserve more shared memory
    /// goes on within what it has. False when changes are still uncovered.
    pub fn rewind(&mut self) -> bool {
        if self.next_seq - 1 != self.covered {
            return false;
        }
        let next = (self.next_seq / self.capacity + 1) * self.capacity;
        // `next` first: a death between the two stores leaves counters out of bounds,
        // and such a journal is discarded, which loses nothing (everything was covered).
        self.next_seq = next;
        self.word(NEXT_AT).store(next, Ordering::Release);
        self.covered(next - 1);
        true
    }

    /// True when more than half the ring holds uncovered changes: time to flush.
    pub fn wants_flush(&self) -> bool {
        self.next_seq - 1 - self.covered > self.capacity / 2
    }

    /// Where the journal is, for error messages.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for VolatileLog {
    fn drop(&mut self) {
        // SAFETY: unmapping the mapping made in map(), exactly once.
        unsafe {
            libc::munmap(self.map.cast(), self.len);
        }
    }
}

/// Applies recovered changes to a map (and the placements to `slots`, for a slotted
/// layer); returns the blocks they touched.
pub fn apply(
    map: &mut LayerMap,
    mut slots: Option<&mut super::slots::SlotTable>,
    changes: &[(Change, u32, u32, Option<u32>)],
) -> roaring::RoaringBitmap {
    let mut touched = roaring::RoaringBitmap::new();
    for &(kind, first, last, slot) in changes {
        if let (Some(t), Some(s)) = (slots.as_deref_mut(), slot) {
            t.set_run((first, s, last - first + 1));
        }
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

    const INC: [u8; 16] = [7; 16];
    const BLOCKS: u64 = 1 << 20;

    fn open(p: &Path, id: u64) -> (VolatileLog, Recovered) {
        VolatileLog::open(p, id, &INC, BLOCKS, DEFAULT_BUDGET).expect("open")
    }

    #[test]
    fn changes_survive_a_reopen_until_covered() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("7.vlog");
        let (mut log, found) = open(&p, 7);
        assert!(found.is_empty());
        log.record(Change::Written, 0, 9, None).expect("record");
        log.record(Change::Zeroed, 5, 5, None).expect("record");
        let mark = log.mark();
        log.record(Change::Written, 100, 100, None).expect("record");
        drop(log);
        let (mut log, found) = open(&p, 7);
        assert_eq!(
            found,
            vec![
                (Change::Written, 0, 9, None),
                (Change::Zeroed, 5, 5, None),
                (Change::Written, 100, 100, None)
            ]
        );
        log.covered(mark);
        drop(log);
        let (log, found) = open(&p, 7);
        assert_eq!(found, vec![(Change::Written, 100, 100, None)]);
        assert_eq!(log.mark(), 3);
        let mut m = LayerMap::default();
        let t = apply(&mut m, None, &found);
        assert!(m.present.contains(100) && t.contains(100) && t.len() == 1);
    }

    #[test]
    fn another_layer_incarnation_or_boot_is_ignored() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("8.vlog");
        let (mut log, _) = open(&p, 8);
        log.record(Change::Written, 1, 2, None).expect("record");
        drop(log);
        let (_, found) = open(&p, 9);
        assert!(found.is_empty());
        let (mut log, _) = open(&p, 8);
        log.record(Change::Written, 1, 2, None).expect("record");
        drop(log);
        let (_, found) =
            VolatileLog::open(&p, 8, &[8; 16], BLOCKS, DEFAULT_BUDGET).expect("other incarnation");
        assert!(
            found.is_empty(),
            "another incarnation's journal was trusted"
        );
        let (mut log, _) = open(&p, 8);
        log.record(Change::Written, 1, 2, None).expect("record");
        drop(log);
        // Pretend another boot wrote it.
        let mut bytes = std::fs::read(&p).expect("read");
        bytes[30] ^= 0xff;
        std::fs::write(&p, &bytes).expect("write");
        let (_, found) = open(&p, 8);
        assert!(found.is_empty(), "a journal from another boot was trusted");
    }

    #[test]
    fn a_full_ring_refuses_instead_of_overwriting() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("9.vlog");
        let (mut log, _) = VolatileLog::open(&p, 9, &INC, BLOCKS, MIN_BUDGET).expect("open");
        let cap = capacity_for(MIN_BUDGET) as u32;
        for i in 0..cap {
            log.record(Change::Written, i, i, None).expect("record");
        }
        assert!(log.wants_flush());
        assert!(matches!(
            log.record(Change::Written, 0, 0, None),
            Err(RecordError::Full)
        ));
        drop(log);
        let (mut log, found) = VolatileLog::open(&p, 9, &INC, BLOCKS, MIN_BUDGET).expect("open");
        assert_eq!(
            found.len(),
            cap as usize,
            "every change of a full ring is kept"
        );
        let m = log.mark();
        log.covered(m);
        assert!(!log.wants_flush());
        log.record(Change::Written, 1, 1, None).expect("room again");
        assert_eq!(
            std::fs::metadata(&p).expect("stat").len(),
            (HEADER + cap as usize * ENTRY) as u64
        );
    }

    #[test]
    fn budgets_are_parsed_and_bounded() {
        assert_eq!(capacity_for(DEFAULT_BUDGET), (4 * 1024 * 1024 - 128) / 24);
        assert_eq!(capacity_for(1), capacity_for(MIN_BUDGET));
        assert!(parse_incarnation("00ff").is_none());
        assert!(parse_incarnation("zz0102030405060708090a0b0c0d0e0f").is_none());
        assert_eq!(
            parse_incarnation("000102030405060708090a0b0c0d0e0f"),
            Some([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15])
        );
    }
}
