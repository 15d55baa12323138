//! The preparer: writes zeros ahead of a slotted head's slot frontier, so that the first
//! write of a block after a snapshot lands in space the file system has already
//! allocated and written (an overwrite), instead of allocating on the write path.
//!
//! One thread per open volume. It keeps up to the *reserve* (`SNAPBLK_HEAD_RESERVE`,
//! default 64 MiB, at most a quarter of the volume) of prepared slots ahead of the head's
//! frontier, in 4 MiB chunks, and gives a sealed head's unused reserve back (and turns
//! its slot table into the compact form of a layer that takes no more writes). The reserve
//! is the most a volume over-allocates; `status` shows it. A full file system stops it
//! (the writes then allocate, as in an identity layout) until space comes back: it
//! prepares only while the file system keeps 64 MiB or 5% of its size free after the
//! chunk, whichever is more, so it never takes the last free space from writes.

use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

use parking_lot::{Condvar, Mutex, RwLock};

use super::aligned::AlignedBuf;
use super::layer::Layer;
use super::slots::MAX_SLOTS;
use super::stack::Stack;

/// What the preparer shares with its volume (never the volume itself).
pub(crate) struct Shared {
    pub dir: PathBuf,
    pub block_size: u32,
    pub size: Arc<AtomicU64>,
    pub stack: Arc<RwLock<Stack>>,
    pub merge: Arc<Mutex<()>>,
    /// Bytes to keep prepared, or [`RESERVE_FROM_ENV`]; capped at a quarter of the volume.
    pub reserve: Arc<AtomicU64>,
}

/// Environment setting: the bytes of space a head keeps written ahead of need.
pub const RESERVE_ENV: &str = "SNAPBLK_HEAD_RESERVE";
/// Environment setting: `identity` makes new heads keep blocks at their own offsets (the
/// layout of older builds; first writes after a snapshot then allocate). Default `slots`.
pub const LAYOUT_ENV: &str = "SNAPBLK_HEAD_LAYOUT";
const DEFAULT_RESERVE: u64 = 64 << 20;
const CHUNK: u64 = 4 << 20;
/// Free space the preparer leaves to writes (or 5% of the file system, if more).
const KEEP_FREE: u64 = 64 << 20;
/// Zeros written per call.
const WRITE: usize = 1 << 20;
/// Zeroing writes in flight (threads, the preparer's own included). In the test VM (ext4
/// and xfs on a virtio disk), 1 MiB zeroing writes four at a time ran at about twice the
/// speed of one at a time, and 4 to 10 times the speed of the 128 KiB first writes into
/// holes that they spare (in three runs of four; see docs/engine.md).
const WRITERS: usize = 4;

/// True when new heads are slotted (the default).
pub fn slotted_heads() -> bool {
    match std::env::var(LAYOUT_ENV) {
        Ok(v) => v.trim() != "identity",
        Err(_) => true,
    }
}

/// The reserve for a volume of `size` bytes: the setting, at most a quarter of the volume.
pub fn reserve_for(size: u64) -> u64 {
    configured_reserve().min(size / 4)
}

/// The reserve setting (`SNAPBLK_HEAD_RESERVE`), before the cap.
fn configured_reserve() -> u64 {
    match std::env::var(RESERVE_ENV) {
        Ok(v) => super::fsutil::parse_size(&v).unwrap_or_else(|| {
            tracing::warn!(value = %v, "{RESERVE_ENV} is not a size in bytes; using the default of 64 MiB");
            DEFAULT_RESERVE
        }),
        Err(_) => DEFAULT_RESERVE,
    }
}

/// The reserve in bytes of a volume of `size` bytes whose setting is `setting` (bytes,
/// or [`RESERVE_FROM_ENV`]): at most a quarter of the volume.
pub(crate) fn resolve(setting: u64, size: u64) -> u64 {
    match setting {
        RESERVE_FROM_ENV => configured_reserve(),
        r => r,
    }
    .min(size / 4)
}

/// Marks the reserve as the setting's ([`Shared::reserve`]).
pub(crate) const RESERVE_FROM_ENV: u64 = u64::MAX;

/// Stops and joins the preparer thread when the volume is dropped, before its lock is
/// released: a later open of the same folder never races with zeros still being written.
pub(crate) struct Preparer {
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

impl Preparer {
    /// Starts the thread for the volume whose parts `shared` are.
    pub(crate) fn start(shared: Shared) -> Preparer {
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let s = stop.clone();
        let thread = std::thread::Builder::new()
            .name("snapblk-prep".into())
            .spawn(move || run(shared, s))
            .map_err(|e| tracing::warn!(error = %e, "cannot start the head preparer; first writes after a snapshot will allocate"))
            .ok();
        Preparer { stop, thread }
    }
}

impl Drop for Preparer {
    fn drop(&mut self) {
        *self.stop.0.lock() = true;
        self.stop.1.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(vol: Shared, stop: Arc<(Mutex<bool>, Condvar)>) {
    let zeros = AlignedBuf::new(WRITE);
    let failed = AtomicBool::new(false);
    loop {
        if *stop.0.lock() {
            return;
        }
        // Heads sealed by a cut whose reserve is still to give back: weak, so the preparer
        // never keeps a layer a merge waits to see unused. Found in the stack each time,
        // however many cuts came since the last look.
        let (head, depth, sealed) = {
            let stack = vol.stack.read();
            let sealed: Vec<Weak<Layer>> = stack
                .iter()
                .filter(|l| l.tidy.load(Ordering::SeqCst))
                .map(Arc::downgrade)
                .collect();
            (stack.last().cloned(), stack.len(), sealed)
        };
        let bs = u64::from(vol.block_size);
        let size = vol.size.load(Ordering::SeqCst);
        let room = super::disk::space(&vol.dir)
            .is_some_and(|(free, total)| free >= CHUNK + (KEEP_FREE.max(total / 20)));
        let Some(head) = head else {
            return;
        };
        for l in &sealed {
            trim(&vol, l, bs as u32);
        }
        let target = resolve(vol.reserve.load(Ordering::Relaxed), size) / bs;
        let claim = if !room || target == 0 {
            None
        } else {
            let mut st = head.state.write();
            // Blocks that never took a slot are all a head can still need slots for.
            let unplaced = (size / bs).saturating_sub(st.slots.as_ref().map_or(0, |t| t.len()));
            let target = target.min(unplaced);
            // No more slots than blocks are ever needed (a block keeps its slot), plus
            // one chunk of slack.
            let limit = size / bs + CHUNK / bs;
            // A new volume that was never written needs nothing yet; a head made by a
            // snapshot, or one that took slots, does.
            st.alloc
                .as_mut()
                .filter(|a| depth > 1 || a.next > 0)
                .and_then(|a| a.claim_next((CHUNK / bs).min(target), target, limit))
        };
        let Some((s, e)) = claim else {
            let mut g = stop.0.lock();
            if !*g {
                stop.1.wait_for(&mut g, Duration::from_millis(20));
            }
            continue;
        };
        let ok = {
            let _one = head.prep.lock();
            write_zeros(&head, &zeros, s * bs, (e - s) * bs, WRITERS)
        };
        let ok = match ok {
            Ok(()) => {
                failed.store(false, Ordering::Relaxed);
                true
            }
            Err(err) => {
                if !failed.swap(true, Ordering::Relaxed) {
                    tracing::warn!(layer = head.id, file = %head.data_path.display(), error = %err, "could not prepare space ahead of the head's writes; first writes allocate until it can");
                }
                false
            }
        };
        if let Some(a) = head.state.write().alloc.as_mut() {
            a.finish_claim(ok);
        }
        if !ok {
            let mut g = stop.0.lock();
            if !*g {
                stop.1.wait_for(&mut g, Duration::from_secs(1));
            }
        }
    }
}

/// Most of the reserve written when a cut makes its new head (before any freeze).
const FIRST: u64 = 16 << 20;

/// Writes the first part of the `reserve` (bytes) of `head`, a new slotted head of a
/// volume whose folder is `dir`, so that the first writes after the snapshot find
/// prepared space before the preparer gets to it. Best effort: on failure (a full disk)
/// those writes allocate.
pub(crate) fn prepare_first(head: &Layer, reserve: u64, block_size: u32, dir: &std::path::Path) {
    let bs = u64::from(block_size);
    let bytes = reserve.min(FIRST);
    let room = super::disk::space(dir)
        .is_some_and(|(free, total)| free >= bytes + KEEP_FREE.max(total / 20));
    if bytes < bs || !room {
        return;
    }
    let Some((s, e)) = head
        .state
        .write()
        .alloc
        .as_mut()
        .and_then(|a| a.claim_next(bytes / bs, bytes / bs, MAX_SLOTS))
    else {
        return;
    };
    let ok = {
        let _one = head.prep.lock();
        // One write at a time: this runs inside `snapshot create`, and in the test VM four
        // in flight made this step 10-15 ms slower (the preparer's speed-up is in
        // throughput, which a cut waiting on its own 16 MiB does not gain from).
        write_zeros(head, &AlignedBuf::new(WRITE), s * bs, (e - s) * bs, 1)
    };
    if let Err(err) = &ok {
        tracing::debug!(layer = head.id, error = %err, "could not prepare a new head's first space");
    }
    if let Some(a) = head.state.write().alloc.as_mut() {
        a.finish_claim(ok.is_ok());
    }
}

/// Gives back the unused reserve of the sealed head `prev`, if it is still in the stack
/// (a merge may have replaced it by a layer with more slots: that one is left alone), and
/// compacts its slot table. Under the merge lock, so no merge is adding slots to its file
/// meanwhile; while a merge runs, it leaves `prev` for the next round.
fn trim(vol: &Shared, prev: &Weak<Layer>, block_size: u32) {
    let Some(_merge) = vol.merge.try_lock() else {
        return;
    };
    let Some(prev) = prev.upgrade() else {
        return;
    };
    if !prev.tidy.swap(false, Ordering::SeqCst)
        || !vol.stack.read().iter().any(|l| Arc::ptr_eq(l, &prev))
    {
        return;
    }
    match prev.trim_reserve(block_size) {
        Ok(0) => {}
        Ok(n) => {
            tracing::debug!(
                layer = prev.id,
                bytes = n,
                "gave back a sealed head's unused reserve"
            )
        }
        Err(e) => {
            tracing::warn!(layer = prev.id, error = %e, "could not give back a sealed head's unused reserve")
        }
    }
    prev.compact_slots();
}

/// Writes zeros over `[offset, offset + len)` of `head`'s file, `writers` writes of up
/// to `zeros.len()` bytes at a time: a file system allocates and converts extents per
/// write, and several in flight keep the disk busy while one waits.
fn write_zeros(
    head: &Layer,
    zeros: &AlignedBuf,
    offset: u64,
    len: u64,
    writers: usize,
) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let piece = zeros.len() as u64;
    let pieces = len.div_ceil(piece);
    let next = AtomicU64::new(0);
    let write = || -> std::io::Result<()> {
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            if i >= pieces {
                return Ok(());
            }
            let n = (len - i * piece).min(piece) as usize;
            head.data.write_all_at(&zeros[..n], offset + i * piece)?;
        }
    };
    if pieces <= 1 || writers <= 1 {
        return write();
    }
    std::thread::scope(|s| {
        let helpers: Vec<_> = (1..writers.min(pieces as usize))
            .map(|_| s.spawn(write))
            .collect();
        let mut result = write();
        for h in helpers {
            let r = h
                .join()
                .unwrap_or_else(|_| Err(std::io::Error::other("a zeroing thread panicked")));
            result = result.and(r);
        }
        result
    })
}
