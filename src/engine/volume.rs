//! A volume: the stack of layers, block I/O on it, flush, and opening/creating its folder.

use std::fs::{self, File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use parking_lot::{Mutex, RwLock};
use smallvec::SmallVec;

use super::aligned::AlignedBuf;
use super::error::{EngineError, Result};
use super::fsutil;
use super::layer::{self, Layer, Placed};
use super::manifest::{check_geometry, LayerEntry, Manifest, FORMAT};
use super::plan::{self, ReadPlan, ReadSource};
use super::vlog::Change;

/// Layer ids from files at or above this are not believed (a volume makes a few layers
/// per snapshot: this is never reached, and a planted name cannot exhaust the ids).
const MAX_LAYER_ID: u64 = 1 << 48;

/// Name of the lock file that keeps two processes from opening one volume.
const LOCK_FILE: &str = "lock";

/// How to create a volume.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// Size in bytes, a multiple of the block size.
    pub size: u64,
    /// Logical block size: 4096 (default) or 512.
    pub block_size: u32,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            size: 0,
            block_size: 4096,
        }
    }
}

/// How to open a volume.
#[derive(Debug, Clone, Default)]
pub struct VolumeOpenOptions {
    /// Open layer data files with O_DIRECT (bypassing the page cache) where the file
    /// system allows it; a block device server wants this, tests on tmpfs need not.
    pub direct: bool,
}

pub(crate) use super::stack::Stack;

/// Metadata state guarded by one lock: every change to the manifest, and flushes, go
/// through it one at a time.
pub(crate) struct Meta {
    pub manifest: Manifest,
    /// Next layer id to hand out; ahead of the manifest's while new layers are uncommitted.
    pub next_layer_id: u64,
}

impl Meta {
    /// A fresh layer id, never used in this volume's lineage.
    pub fn take_layer_id(&mut self) -> u64 {
        let id = self.next_layer_id.max(self.manifest.next_layer_id);
        self.next_layer_id = id.saturating_add(1);
        id
    }
}

pub(crate) struct Inner {
    pub dir: PathBuf,
    pub name: String,
    /// Size in bytes. Read on every request's bounds check; only [`Volume::resize`]
    /// changes it (grows it), under the metadata lock, after the manifest says so and the
    /// head's file can hold it.
    pub size: Arc<AtomicU64>,
    pub block_size: u32,
    pub direct: bool,
    /// Shared with the preparer (which must never hold the volume itself: the volume's
    /// lock is released when the last handle drops, on a caller's thread).
    pub stack: Arc<RwLock<Stack>>,
    pub meta: Mutex<Meta>,
    /// One merge at a time (shared with the preparer's trim).
    pub merge: Arc<Mutex<()>>,
    /// Disk errors seen: a full file system, I/O errors.
    pub disk: super::disk::DiskState,
    /// Writes zeros ahead of a slotted head's frontier. Declared before the lock, so it
    /// is stopped before the lock is released.
    prep: Mutex<Option<super::prepare::Preparer>>,
    /// The head reserve in bytes, or the setting's (shared with the preparer).
    reserve: Arc<AtomicU64>,
    _lock: File,
}

/// An open volume. Cheap to clone; every clone is the same volume. Safe to use from many
/// threads: reads and writes take only short locks on the maps.
#[derive(Clone)]
pub struct Volume {
    pub(crate) inner: Arc<Inner>,
}

/// A write reserved in the head layer by [`Volume::begin_write`]: write each of
/// [`WriteTicket::pieces`] to [`WriteTicket::fd`], then [`WriteTicket::complete`].
/// Dropping it uncompleted means the write failed and the map is left as it was.
pub struct WriteTicket {
    layer: Arc<Layer>,
    placed: SmallVec<[Placed; 2]>,
    block_size: u32,
}

impl WriteTicket {
    /// File descriptor of the head layer's data file.
    pub fn fd(&self) -> std::os::fd::RawFd {
        self.layer.data.as_raw_fd()
    }

    /// Where the request's bytes go: `(offset in the request, length, offset in the
    /// file)`, in request order. One piece unless the blocks' slots are not consecutive.
    pub fn pieces(&self) -> impl Iterator<Item = (u64, u64, u64)> + '_ {
        let bs = u64::from(self.block_size);
        let first = self.placed.first().map_or(0, |p| p.block);
        self.placed.iter().map(move |p| {
            (
                u64::from(p.block - first) * bs,
                u64::from(p.count) * bs,
                u64::from(p.file_block) * bs,
            )
        })
    }

    /// Records that the data is in the file: reads see it from now on, the volatile
    /// journal keeps it across the daemon's death, and the next flush makes it durable.
    /// Returns [`Volume::flush_advised`] for this layer, read under the same lock (a
    /// server calls both on every write). On error the write must not be acknowledged
    /// (shared memory is full, or a flush forced by a full journal failed).
    pub fn complete(self) -> Result<bool> {
        self.layer.record_write(&self.placed)
        // Drop runs leave().
    }
}

impl Drop for WriteTicket {
    fn drop(&mut self) {
        self.layer.leave();
    }
}

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A random 128-bit identifier in hex.
pub(crate) fn random_id() -> String {
    let mut b = [0u8; 16];
    // SAFETY: getrandom writes at most b.len() bytes into the live buffer.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != b.len() as isize {
        // Fall back to time and pid: unique enough for an identifier that is not a secret.
        let t = now_ms() ^ (u64::from(std::process::id()) << 40);
        b[..8].copy_from_slice(&t.to_le_bytes());
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub(crate) fn lock_volume(dir: &Path) -> Result<File> {
    let path = dir.join(LOCK_FILE);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(fsutil::PRIVATE_FILE)
        .open(&path)
        .map_err(|e| EngineError::io(&path, e))?;
    // SAFETY: flock on a valid open descriptor.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Err(EngineError::Busy {
                path: dir.to_path_buf(),
            });
        }
        return Err(EngineError::io(&path, err));
    }
    Ok(f)
}

impl Volume {
    /// Creates a new volume in `dir` (which must not exist, or be empty) and opens it.
    pub fn create(dir: &Path, opts: &CreateOptions) -> Result<Volume> {
        check_geometry(opts.size, opts.block_size).map_err(EngineError::Invalid)?;
        match fs::read_dir(dir) {
            Ok(mut entries) => {
                if entries.next().is_some() {
                    return Err(EngineError::AlreadyExists {
                        path: dir.to_path_buf(),
                    });
                }
                fs::set_permissions(dir, fs::Permissions::from_mode(fsutil::PRIVATE_DIR))
                    .map_err(|e| EngineError::io(dir, e))?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                fsutil::create_private_dir_all(dir)?;
            }
            Err(e) => return Err(EngineError::io(dir, e)),
        }
        let layers_dir = dir.join(layer::LAYERS_DIR);
        fsutil::create_private_dir_all(&layers_dir)?;
        let manifest = Manifest {
            format: FORMAT,
            volume_id: random_id(),
            size: opts.size,
            block_size: opts.block_size,
            created_unix_ms: now_ms(),
            next_layer_id: 2,
            next_snapshot_id: 1,
            layers: vec![LayerEntry {
                id: 1,
                merge_pending: false,
                ancestor: None,
                incarnation: Some(super::vlog::new_incarnation()),
            }],
            snapshots: vec![],
            origin: None,
        };
        write_new_volume(dir, &manifest)?;
        Volume::open(dir)
    }

    /// Opens the volume in `dir` with default options (buffered I/O).
    pub fn open(dir: &Path) -> Result<Volume> {
        Volume::open_with(dir, &VolumeOpenOptions::default())
    }

    /// Opens the volume in `dir`. Refuses a folder that is not a volume, a damaged file
    /// (naming it), or a volume another process has open.
    pub fn open_with(dir: &Path, opts: &VolumeOpenOptions) -> Result<Volume> {
        let md = fs::metadata(dir).map_err(|e| EngineError::io(dir, e))?;
        if !md.is_dir() {
            return Err(EngineError::NotAVolume {
                path: dir.to_path_buf(),
                file: super::manifest::FILE,
            });
        }
        if !Manifest::path(dir).exists() {
            return Err(EngineError::NotAVolume {
                path: dir.to_path_buf(),
                file: super::manifest::FILE,
            });
        }
        fsutil::check_private_dir(dir)?;
        let lock = lock_volume(dir)?;
        let mut manifest = Manifest::load(dir)?;
        remove_leftovers(dir, &mut manifest)?;
        let direct = opts.direct && fsutil::direct_io_fits(dir, manifest.block_size);
        let mut layers = Vec::with_capacity(manifest.layers.len());
        let top = manifest.layers.len() - 1;
        for (i, entry) in manifest.layers.iter().enumerate() {
            let l = match (&entry.incarnation, i == top) {
                (Some(inc), true) => Layer::open_head(
                    dir,
                    entry.id,
                    manifest.size,
                    manifest.block_size,
                    direct,
                    &manifest.volume_id,
                    inc,
                )?,
                (Some(inc), false) => open_maybe_unsealed(dir, &manifest, entry.id, inc, direct)?,
                (None, true) => {
                    return Err(EngineError::corrupt(
                        Manifest::path(dir),
                        "the head layer has no incarnation",
                    ))
                }
                (None, false) => {
                    Layer::open_frozen(dir, entry.id, manifest.size, manifest.block_size, direct)?
                }
            };
            layers.push(Arc::new(l));
        }
        // Every layer below the head is sealed now: the manifest says so, and only the
        // head's journal is live.
        if manifest.layers[..top]
            .iter()
            .any(|l| l.incarnation.is_some())
        {
            let mut m = manifest.clone();
            m.layers[..top]
                .iter_mut()
                .for_each(|l| l.incarnation = None);
            m.store(dir)?;
            manifest = m;
        }
        let layers_dir = dir.join(layer::LAYERS_DIR);
        let keep = [super::vlog::path_for(
            &manifest.volume_id,
            manifest.layers[top].id,
            &layers_dir,
        )];
        super::vlog::remove_stale(&manifest.volume_id, &layers_dir, &keep);
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| dir.display().to_string());
        tracing::debug!(volume = %name, layers = layers.len(), snapshots = manifest.snapshots.len(), direct, "opened volume");
        if opts.direct && !direct {
            tracing::info!(volume = %name, block_size = manifest.block_size, "layer files use the page cache: the file system's direct I/O alignment does not fit the volume's block size");
        }
        let vol = Volume {
            inner: Arc::new(Inner {
                dir: dir.to_path_buf(),
                name,
                size: Arc::new(AtomicU64::new(manifest.size)),
                block_size: manifest.block_size,
                direct,
                stack: Arc::new(RwLock::new(Stack::new(layers))),
                meta: Mutex::new(Meta {
                    next_layer_id: manifest.next_layer_id,
                    manifest,
                }),
                merge: Arc::new(Mutex::new(())),
                disk: super::disk::DiskState::default(),
                prep: Mutex::new(None),
                reserve: Arc::new(AtomicU64::new(super::prepare::RESERVE_FROM_ENV)),
                _lock: lock,
            }),
        };
        let prep = super::prepare::Preparer::start(super::prepare::Shared {
            dir: vol.inner.dir.clone(),
            block_size: vol.inner.block_size,
            size: vol.inner.size.clone(),
            stack: vol.inner.stack.clone(),
            merge: vol.inner.merge.clone(),
            reserve: vol.inner.reserve.clone(),
        });
        *vol.inner.prep.lock() = Some(prep);
        Ok(vol)
    }

    /// Sets how much space the head keeps written ahead of its first writes (None: the
    /// `SNAPBLK_HEAD_RESERVE` setting); at most a quarter of the volume either way. Space
    /// already prepared stays until the head is sealed.
    pub fn set_head_reserve(&self, bytes: Option<u64>) {
        let v = bytes.map_or(super::prepare::RESERVE_FROM_ENV, |b| b.min(u64::MAX - 1));
        self.inner.reserve.store(v, Ordering::Relaxed);
    }

    /// The head reserve in bytes for a volume of `size` bytes (see
    /// [`Volume::set_head_reserve`]).
    pub(crate) fn head_reserve(&self, size: u64) -> u64 {
        super::prepare::resolve(self.inner.reserve.load(Ordering::Relaxed), size)
    }

    /// Whether layer files bypass the page cache (O_DIRECT).
    pub fn direct_io(&self) -> bool {
        self.inner.direct
    }

    /// Size in bytes (it grows with [`Volume::resize`]).
    pub fn size(&self) -> u64 {
        // Acquire pairs with the store in `resize`, made once the head's file is long
        // enough: whoever sees the new size may write up to it.
        self.inner.size.load(Ordering::Acquire)
    }

    /// Logical block size in bytes.
    pub fn block_size(&self) -> u32 {
        self.inner.block_size
    }

    /// The volume's name: its folder's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The volume's folder.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// The volume's unique id (kept by its files; clones get a new one).
    pub fn id(&self) -> String {
        self.inner.meta.lock().manifest.volume_id.clone()
    }

    pub(crate) fn stack(&self) -> Stack {
        self.inner.stack.read().clone()
    }

    /// Checks a request and converts it to blocks `[start, end)`.
    pub(crate) fn blocks(&self, op: &'static str, offset: u64, len: u64) -> Result<(u32, u64)> {
        check_request(op, offset, len, self.size(), self.inner.block_size)
    }

    /// Where each part of the read of `[offset, offset+len)` comes from.
    pub fn plan_read(&self, offset: u64, len: u64) -> Result<ReadPlan> {
        let (start, end) = self.blocks("read", offset, len)?;
        Ok(plan::plan(self.stack(), start, end, self.inner.block_size))
    }

    /// Reserves a write of `[offset, offset+len)` in the head layer. Never blocks: a cut
    /// that starts meanwhile waits for this write instead.
    pub fn begin_write(&self, offset: u64, len: u64) -> Result<WriteTicket> {
        let (start, end) = self.blocks("write", offset, len)?;
        let stack = self.inner.stack.read();
        let head = stack[stack.len() - 1].clone();
        head.enter();
        drop(stack);
        let placed = match head.place_write(start, end, self.inner.block_size) {
            Ok(p) => p,
            Err(e) => {
                head.leave();
                return Err(self.noted(e));
            }
        };
        Ok(WriteTicket {
            layer: head,
            placed,
            block_size: self.inner.block_size,
        })
    }

    /// Reads `buf.len()` bytes at `offset` (a convenience for tools and tests).
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let plan = self.plan_read(offset, buf.len() as u64)?;
        read_plan(&plan, buf, self.inner.direct)
    }

    /// Writes `data` at `offset`; with `fua`, it is durable when this returns.
    pub fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        let ticket = self.begin_write(offset, data.len() as u64)?;
        let path = &ticket.layer.data_path;
        if let Some(e) = super::faults::write_fault() {
            // A write that stopped halfway (a full or failing disk), for tests.
            let half = (data.len() / 2) as u64 / u64::from(self.inner.block_size)
                * u64::from(self.inner.block_size);
            for (at, len, file_off) in ticket.pieces() {
                let len = len.min(half.saturating_sub(at));
                if len > 0 {
                    let _ = ticket
                        .layer
                        .data
                        .write_all_at(&data[at as usize..(at + len) as usize], file_off);
                }
            }
            return Err(self.noted(EngineError::io(path, e)));
        }
        let bounce;
        let data = if self.inner.direct && !AlignedBuf::is_aligned(data) {
            let mut b = AlignedBuf::new(data.len());
            b.copy_from_slice(data);
            bounce = b;
            &bounce[..]
        } else {
            data
        };
        for (at, len, file_off) in ticket.pieces() {
            ticket
                .layer
                .data
                .write_all_at(&data[at as usize..(at + len) as usize], file_off)
                .map_err(|e| self.noted(EngineError::io(path, e)))?;
        }
        ticket.complete().map_err(|e| self.noted(e))?;
        if fua {
            self.flush()?;
        }
        Ok(())
    }

    /// Counts `e` in the disk state `status` reports (a full or failing disk), and
    /// hands it back.
    pub(crate) fn noted(&self, e: EngineError) -> EngineError {
        self.inner.disk.note_error(&self.inner.dir, &e);
        e
    }

    /// Counts a request the server failed with `-errno` (a data write the ring could not
    /// store, a failed flush): ENOSPC marks the file system full, EIO counts as a disk
    /// error, in what `status` reports. Other errors are not the disk's.
    pub fn note_request_error(&self, neg_errno: i32, what: &str) {
        self.inner
            .disk
            .note(&self.inner.dir, neg_errno.saturating_neg(), what);
    }

    /// Discards `[offset, offset+len)`: it reads as zeros, older layers are hidden, and
    /// the head's space there is freed.
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.zero_range("discard", offset, len)
    }

    /// Writes zeros to `[offset, offset+len)` without storing them (same as discard).
    pub fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.zero_range("write_zeroes", offset, len)
    }

    fn zero_range(&self, op: &'static str, offset: u64, len: u64) -> Result<()> {
        let (start, end) = self.blocks(op, offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let stack = self.inner.stack.read();
        let head = stack[stack.len() - 1].clone();
        let bottom = stack.len() == 1;
        head.enter();
        drop(stack);
        // With nothing below to hide, forgetting the blocks is enough and costs no map.
        let kind = if bottom {
            Change::Cleared
        } else {
            Change::Zeroed
        };
        // A slotted head keeps the blocks' slots (a slot is never given to another block):
        // their space is punched, and a later write of the block goes there again.
        let punched = if head.slotted {
            let bs = u64::from(self.inner.block_size);
            let mut runs = SmallVec::<[Placed; 4]>::new();
            head.read_runs(start, (end - u64::from(start)) as u32, &mut runs);
            runs.iter().try_for_each(|p| {
                fsutil::punch_hole(
                    &head.data,
                    &head.data_path,
                    u64::from(p.file_block) * bs,
                    u64::from(p.count) * bs,
                )
            })
        } else {
            fsutil::punch_hole(&head.data, &head.data_path, offset, len)
        };
        let result = punched.and_then(|()| head.record(kind, start, end).map(|_| ()));
        head.leave();
        result.map_err(|e| self.noted(e))
    }

    /// Makes every write, discard and snapshot acknowledged before the call durable.
    /// Blocks on fsync: call it off latency-critical threads.
    pub fn flush(&self) -> Result<()> {
        let mut meta = self.inner.meta.lock();
        self.commit_stack(&mut meta).map_err(|e| self.noted(e))
    }

    /// True when unflushed changes pile up (the volatile journal is half full): a server
    /// should flush soon, even if its client does not ask.
    pub fn flush_advised(&self) -> bool {
        let stack = self.inner.stack.read();
        stack[stack.len() - 1].wants_flush()
    }

    /// Grows the volume to `new_size` bytes (a multiple of the block size); the same size
    /// is a no-op, a smaller one is refused. Safe while the volume serves I/O: requests see
    /// the new size as soon as this returns, and the new blocks read as zeros (no map names
    /// them). Snapshots keep the size they were taken with, and so do their clones.
    ///
    /// Crash-safe: the head's data file is extended first (a sparse `set_len`: only the
    /// writable head must hold blocks past the old end; frozen layers never receive writes,
    /// may be shared with clones, and stay as they are), then the manifest's `size` changes
    /// in one atomic commit. A crash before the commit leaves the old size (the open cuts a
    /// head file that is longer than the volume back: nothing past the size was written);
    /// after it, the new one (the open extends a head file that is too short).
    pub fn resize(&self, new_size: u64) -> Result<()> {
        let mut meta = self.inner.meta.lock();
        let old = meta.manifest.size;
        let bs = self.inner.block_size;
        if new_size == old {
            return Ok(());
        }
        if new_size < old {
            return Err(EngineError::Invalid(format!(
                "cannot shrink the volume from {old} to {new_size} bytes: volumes only grow (shrinking would cut off data a file system may use)"
            )));
        }
        check_geometry(new_size, bs).map_err(EngineError::Invalid)?;
        let mut m = meta.manifest.clone();
        // Snapshots taken before now keep the size they have (older manifests left it out).
        for s in &mut m.snapshots {
            s.size.get_or_insert(old);
        }
        m.size = new_size;
        // Holding the metadata lock: no cut or merge replaces the head meanwhile.
        let stack = self.stack();
        let head = &stack[stack.len() - 1];
        // A slotted head's file follows its slots, not the volume's size.
        if !head.slotted {
            head.data
                .set_len(new_size)
                .map_err(|e| self.noted(EngineError::io(&head.data_path, e)))?;
        }
        if let Err(e) = m.store(&self.inner.dir).map_err(|e| self.noted(e)) {
            // Not committed (or not known to be): keep serving the old size. Should the
            // commit have landed after all, the next open extends the head again.
            if !head.slotted {
                let _ = head.data.set_len(old);
            }
            return Err(e);
        }
        meta.manifest = m;
        self.inner.size.store(new_size, Ordering::Release);
        tracing::info!(volume = %self.inner.name, old, new = new_size, "volume grown");
        Ok(())
    }

    /// Flushes and closes the volume (dropping it without `close` is like a crash: what was
    /// not flushed may be lost).
    pub fn close(self) -> Result<()> {
        self.flush()
    }
}

/// Checks a request on a device of `size` bytes and converts it to blocks `[start, end)`.
pub(crate) fn check_request(
    op: &'static str,
    offset: u64,
    len: u64,
    size: u64,
    block_size: u32,
) -> Result<(u32, u64)> {
    let bs = u64::from(block_size);
    let end = offset
        .checked_add(len)
        .filter(|&e| e <= size)
        .ok_or(EngineError::OutOfRange {
            op,
            offset,
            len,
            size,
        })?;
    if !offset.is_multiple_of(bs) || !len.is_multiple_of(bs) {
        return Err(EngineError::Unaligned {
            op,
            offset,
            len,
            block_size,
        });
    }
    let (start, end) = (offset / bs, end / bs);
    if start == end {
        // Empty: at the very end of a 2^32-block volume, `start` does not fit a u32, and
        // a wrapped 0 would make the range the whole volume.
        let at = u32::try_from(start).unwrap_or(u32::MAX);
        return Ok((at, u64::from(at)));
    }
    // start < end <= 2^32 blocks, so start fits.
    Ok((start as u32, end))
}

/// Copies the data a plan names into `buf`, with pread (the synchronous path).
pub(crate) fn read_plan(plan: &ReadPlan, buf: &mut [u8], direct: bool) -> Result<()> {
    for seg in &plan.segments {
        let part = &mut buf[seg.buf_offset as usize..(seg.buf_offset + seg.len) as usize];
        match seg.source {
            ReadSource::Zero => part.fill(0),
            ReadSource::File { fd, offset } => {
                // SAFETY: the plan keeps the layer (and so the descriptor) open while we read;
                // ManuallyDrop keeps the borrowed descriptor from being closed here.
                let file = std::mem::ManuallyDrop::new(unsafe {
                    <File as std::os::fd::FromRawFd>::from_raw_fd(fd)
                });
                let res = if direct && !AlignedBuf::is_aligned(part) {
                    let mut bounce = AlignedBuf::new(part.len());
                    fsutil::read_full_at(&file, &mut bounce, offset)
                        .map(|()| part.copy_from_slice(&bounce))
                } else {
                    fsutil::read_full_at(&file, part, offset)
                };
                res.map_err(|e| EngineError::io(format!("layer file (fd {fd})"), e))?;
            }
        }
    }
    Ok(())
}

/// Writes the empty head layer of a new volume (over any base layers already in place)
/// and its manifest, durably.
pub(crate) fn write_new_volume(dir: &Path, manifest: &Manifest) -> Result<()> {
    let head = manifest
        .layers
        .last()
        .ok_or_else(|| EngineError::Invalid("a volume needs a head layer".into()))?;
    let incarnation = head
        .incarnation
        .as_deref()
        .ok_or_else(|| EngineError::Invalid("a new head needs an incarnation".into()))?;
    Layer::create_head(
        dir,
        head.id,
        manifest.size,
        false,
        &manifest.volume_id,
        incarnation,
    )?;
    fsutil::sync_dir(&dir.join(layer::LAYERS_DIR))?;
    manifest.store(dir)?;
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        fsutil::sync_dir(parent)?;
    }
    Ok(())
}

/// Removes files a crash left behind: temporary files and layer files of layers that no
/// manifest names (made by a cut, merge or clone that did not commit). Files that are not
/// named like layer files are left alone. First, so that no layer id is ever used twice
/// (a new layer must not meet anything an earlier one left), `next_layer_id` is moved
/// past every id those files and the volume's volatile journals show; and a head from an
/// older build gets an incarnation. Either change is committed before anything else.
fn remove_leftovers(dir: &Path, manifest: &mut Manifest) -> Result<()> {
    let _ = fs::remove_file(dir.join("volume.tmp"));
    let layers_dir = dir.join(layer::LAYERS_DIR);
    let mut stale = Vec::new();
    let mut seen = 0u64;
    let entries = fs::read_dir(&layers_dir).map_err(|e| EngineError::io(&layers_dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| EngineError::io(&layers_dir, e))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let Some((id, ext)) = name.split_once('.') else {
            continue;
        };
        let Ok(id) = id.parse::<u64>() else {
            continue;
        };
        seen = seen.max(id);
        let dead = match ext {
            "tmp" => true,
            "data" | "map" => manifest.layer_pos(id).is_none(),
            _ => false,
        };
        if dead {
            stale.push(entry.path());
        }
    }
    for (id, _, ours) in super::vlog::existing(&manifest.volume_id, &layers_dir) {
        if ours {
            seen = seen.max(id);
        }
    }
    let mut m = manifest.clone();
    if seen < MAX_LAYER_ID {
        m.next_layer_id = m.next_layer_id.max(seen + 1);
    }
    if let Some(head) = m.layers.last_mut() {
        if head.incarnation.is_none() {
            // Written by an older build: its journal (an older format) is not replayed.
            head.incarnation = Some(super::vlog::new_incarnation());
        }
    }
    if m != *manifest {
        m.store(dir)?;
        *manifest = m;
    }
    for p in stale {
        tracing::info!(file = %p.display(), "removing a file left over by an interrupted operation");
        fs::remove_file(&p).map_err(|e| EngineError::io(&p, e))?;
    }
    Ok(())
}

/// Opens layer `id` below the head whose manifest entry still names an incarnation: a
/// cut committed it, and the daemon may have died before it was sealed. A sealed one
/// opens as frozen; otherwise its map journal and its volatile journal are replayed (it
/// may hold acknowledged writes no flush covered) and it is sealed now.
fn open_maybe_unsealed(
    dir: &Path,
    manifest: &Manifest,
    id: u64,
    incarnation: &str,
    direct: bool,
) -> Result<Layer> {
    let (size, bs) = (manifest.size, manifest.block_size);
    match Layer::open_frozen(dir, id, size, bs, direct) {
        Ok(l) => return Ok(l),
        Err(EngineError::Corrupt { .. }) => {}
        Err(e) => return Err(e),
    }
    let l = Layer::open_head(dir, id, size, bs, direct, &manifest.volume_id, incarnation)?;
    tracing::info!(layer = id, "sealing a layer whose cut was interrupted");
    l.flush(true)?;
    drop(l);
    Layer::open_frozen(dir, id, size, bs, direct)
}

/// A volume's state, for `status` commands and logs.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct VolumeStatus {
    pub name: String,
    pub volume_id: String,
    pub size: u64,
    pub block_size: u32,
    pub snapshots: usize,
    /// Layers in the stack, the head included.
    pub layers: usize,
    /// Layers of deleted snapshots still waiting to be merged.
    pub pending_merges: usize,
    /// Bytes written to the head since the last snapshot.
    pub head_bytes: u64,
    /// Bytes of data held by all layers (what the volume uses on disk, at most).
    pub stored_bytes: u64,
    /// Memory of the layer maps (their serialized size, a close estimate) and of the
    /// slot tables of slotted layers.
    pub map_bytes: u64,
    /// Space the head holds written ahead of need (zeros for first writes after a
    /// snapshot): the volume's over-allocation, at most the reserve
    /// (`SNAPBLK_HEAD_RESERVE`, default 64 MiB, at most a quarter of the volume).
    #[serde(default)]
    pub reserved_bytes: u64,
    /// The head keeps blocks in slots (false: at their own offsets, an older layout).
    #[serde(default)]
    pub slotted_head: bool,
    /// Snapshot this volume was cloned from, as `volume-id/snapshot`.
    pub origin: Option<String>,
    /// Why flushes fail since a data sync failed (the volume must be reopened).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flush_failure: Option<String>,
    /// The file system under the folder: free space, full, I/O errors.
    #[serde(default)]
    pub disk: super::disk::DiskStatus,
}

impl Volume {
    /// Whether a deleted snapshot's layer still waits to be merged (cheap: the manifest).
    pub fn has_pending_merges(&self) -> bool {
        self.inner
            .meta
            .lock()
            .manifest
            .layers
            .iter()
            .any(|l| l.merge_pending)
    }

    /// The volume's state.
    pub fn status(&self) -> VolumeStatus {
        let meta = self.inner.meta.lock();
        let stack = self.stack();
        let bs = u64::from(self.inner.block_size);
        let (mut stored, mut map_bytes) = (0u64, 0u64);
        for l in stack.iter() {
            let st = l.state.read();
            stored += st.map.present.len() * bs;
            map_bytes += st.map.serialized_size() as u64
                + st.touched.serialized_size() as u64
                + st.slots.as_ref().map_or(0, |t| t.memory() as u64);
        }
        let head = &stack[stack.len() - 1];
        VolumeStatus {
            name: self.inner.name.clone(),
            volume_id: meta.manifest.volume_id.clone(),
            size: meta.manifest.size,
            block_size: self.inner.block_size,
            snapshots: meta.manifest.snapshots.len(),
            layers: stack.len(),
            pending_merges: meta
                .manifest
                .layers
                .iter()
                .filter(|l| l.merge_pending)
                .count(),
            head_bytes: head.present_blocks() * bs,
            stored_bytes: stored,
            map_bytes,
            reserved_bytes: head.reserve_bytes(self.inner.block_size),
            slotted_head: head.slotted,
            origin: meta
                .manifest
                .origin
                .as_ref()
                .map(|o| format!("{}/{}", o.volume_id, o.snapshot)),
            flush_failure: stack.iter().find_map(|l| l.flush_failure()),
            disk: self.inner.disk.status(&self.inner.dir),
        }
    }
}
