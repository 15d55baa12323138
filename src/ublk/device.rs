//! Bringing a volume up as a ublk device, serving it until asked to stop, and taking
//! it down: add (or recover) the device, run the queue threads, wait for SIGTERM or
//! SIGINT, stop the device, flush the volume, delete the device.
//!
//! Exit with a mounted file system (libublk-rs issue 50): while the queues still serve,
//! the daemon syncs every file system it sees mounted on the device (bounded in time),
//! then stops the device; the file system then only gets I/O errors and the mount
//! lingers until it is unmounted. The device is deleted with DEL_DEV_ASYNC, which never
//! waits for that umount, so the daemon cannot hang on its own device. The daemon must
//! still not be the last process of a mount namespace holding such a mount (the kernel
//! would unmount it in the exiting daemon's context): run it in the host's mount
//! namespace.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use libublk::ctrl::{UblkCtrl, UblkCtrlBuilder};
use libublk::io::UblkDev;
use libublk::{sys, UblkFlags};
use parking_lot::Mutex;
use tracing::{error, info, info_span, warn, Span};

use crate::engine::{EngineError, SnapshotView, Volume, VolumeOpenOptions};
use crate::stats::IoStats;

use super::affinity::{self, QueueThreads};
use super::error::{describe_ublk_error, Result, UblkLayerError};
use super::features::{self, DataMode};
use super::mounts;
use super::params::{self, MAX_IO_BYTES};
use super::queue::{run_queue, QueueSetup};
use super::recover;
use super::signals;
use super::worker::{Workers, MISC_WORKERS};

/// The ublk control device node; its absence means the driver is not loaded.
pub const CONTROL_PATH: &str = "/dev/ublk-control";

/// Device name recorded by libublk (the "target type" of its json).
const TARGET_NAME: &str = "snapblk";

/// How long the daemon waits for a mounted file system to sync before stopping.
const SYNC_LIMIT: Duration = Duration::from_secs(30);

/// How long `--recover` waits for the killed daemon to release the volume.
const RECOVER_LOCK_WAIT: Duration = Duration::from_secs(10);

/// How often the main thread checks the queues while waiting for a stop signal.
const POLL: Duration = Duration::from_millis(200);

/// How to serve a volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServeOptions {
    /// The volume folder.
    pub volume_dir: PathBuf,
    /// Device id to create (or recover); None lets the driver choose (or, with
    /// `recover`, finds it in libublk's json).
    pub dev_id: Option<u32>,
    /// Number of hardware queues (one thread each).
    pub queues: u16,
    /// Requests in flight per queue.
    pub depth: u16,
    /// Take over a device whose daemon died instead of adding one.
    pub recover: bool,
    /// Use copy mode even if the driver offers zero copy.
    pub force_copy: bool,
    /// Read and write layer files through the page cache instead of with O_DIRECT.
    pub buffered: bool,
    /// Keep each queue thread on the CPUs of its hardware queue (libublk's placement)
    /// instead of letting it run on any CPU the daemon may use (see [`super::affinity`]).
    pub pin_queues: bool,
}

/// A device that is up and serving, as reported to the caller once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServingDevice {
    /// The device id N of /dev/ublkbN.
    pub dev_id: u32,
    /// The block device node.
    pub bdev_path: String,
    /// The volume's name.
    pub volume: String,
    /// Copy or zero copy.
    pub mode: DataMode,
    /// Whether this daemon took over an existing device.
    pub recovered: bool,
}

/// Why serving ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum StopReason {
    /// SIGTERM or SIGINT.
    Signal(i32),
    /// This many queue threads ended on their own.
    QueuesEnded(usize),
    /// The daemon asked (a snapshot device being unexposed).
    Asked,
    /// What the device needs once live (its control socket) could not be set up.
    NotReady,
}

/// Default queue count: one per CPU, at most 4.
pub fn default_queues() -> u16 {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    u16::try_from(cpus.clamp(1, 4)).unwrap_or(1)
}

pub(super) fn check_options(opts: &ServeOptions) -> Result<()> {
    if opts.queues == 0 || u32::from(opts.queues) > sys::UBLK_MAX_NR_QUEUES {
        return Err(UblkLayerError::InvalidOption(format!(
            "--queues must be between 1 and {}",
            sys::UBLK_MAX_NR_QUEUES
        )));
    }
    if opts.depth == 0 || u32::from(opts.depth) > sys::UBLK_MAX_QUEUE_DEPTH {
        return Err(UblkLayerError::InvalidOption(format!(
            "--depth must be between 1 and {}",
            sys::UBLK_MAX_QUEUE_DEPTH
        )));
    }
    if let Some(id) = opts.dev_id {
        if i32::try_from(id).is_err() {
            return Err(UblkLayerError::InvalidOption(format!(
                "--id {id} is too large"
            )));
        }
    }
    Ok(())
}

/// Serves `opts.volume_dir` as a ublk device until SIGTERM or SIGINT, then stops the
/// device, flushes the volume and deletes the device. `ready` is called once the
/// device is live, with the volume it serves and the counters of its requests (for the
/// layers above, such as the control socket); when it fails, the device is stopped and
/// removed at once and its error returned. Nothing is created when the volume cannot be
/// opened.
///
/// Must run on the process's main thread before it starts other threads: it blocks
/// SIGTERM/SIGINT so that every thread it starts inherits the mask.
pub fn serve<R>(opts: &ServeOptions, ready: R) -> Result<()>
where
    R: FnOnce(&ServingDevice, &Volume, &Arc<IoStats>) -> std::result::Result<(), String>
        + Send
        + Sync
        + 'static,
{
    check_options(opts)?;
    signals::block_stop_signals()?;
    if !Path::new(CONTROL_PATH).exists() {
        return Err(UblkLayerError::DriverMissing { path: CONTROL_PATH });
    }
    // The volume first: a missing or damaged folder must not leave a device behind.
    let volume = open_volume(opts)?;
    let volume_dir =
        std::fs::canonicalize(&opts.volume_dir).map_err(|source| UblkLayerError::Sys {
            op: "resolve the volume folder",
            source,
        })?;
    let params = params::device_params(volume.size(), volume.block_size(), MAX_IO_BYTES, false)?;
    // Snapshot devices of a daemon that died serve nothing any more.
    super::expose::remove_leftovers(&volume_dir);
    // The device id joins the span as soon as it is known (at once with --id).
    let span = info_span!("ublk", dev_id = tracing::field::Empty, volume = %volume.name());
    if let Some(id) = opts.dev_id {
        span.record("dev_id", id);
    }
    let _g = span.enter();
    info!(
        size = volume.size(),
        block_size = volume.block_size(),
        direct_io = volume.direct_io(),
        path = %volume_dir.display(),
        "opened volume"
    );

    let (ctrl, mode) = if opts.recover {
        recover_ctrl(opts, &volume, &volume_dir)?
    } else {
        add_ctrl(opts, true, recover::volume_tag(&volume.id()))?
    };
    let info = ctrl.dev_info();
    if opts.dev_id.is_none() && !opts.recover {
        span.record("dev_id", info.dev_id);
    }
    info!(
        queues = info.nr_hw_queues,
        depth = info.queue_depth,
        flags = format_args!("{:#x}", info.flags),
        "device {}",
        if opts.recover { "reattached" } else { "added" }
    );

    let serving = ServingDevice {
        dev_id: info.dev_id,
        bdev_path: ctrl.get_bdev_path(),
        volume: volume.name().to_string(),
        mode,
        recovered: opts.recover,
    };
    let stats = Arc::new(IoStats::new(usize::from(info.nr_hw_queues)));
    let spec = DeviceSpec {
        volume: volume.clone(),
        snapshot: None,
        mode,
        params,
        target: recover::target_json(&volume_dir, volume.name()),
        span: span.clone(),
        pin_queues: opts.pin_queues,
        stats: stats.clone(),
    };
    let live_volume = volume.clone();
    let not_ready: Arc<Mutex<Option<String>>> = Arc::default();
    let why = not_ready.clone();
    let run = run_device(&ctrl, spec, move |exited, nr_queues| {
        if let Err(e) = ready(&serving, &live_volume, &stats) {
            error!(error = %e, "the device cannot be served as asked: stopping it");
            *why.lock() = Some(e);
            return StopReason::NotReady;
        }
        wait_for_stop(exited, nr_queues)
    });
    let dev_id = info.dev_id;
    let reason = match run {
        Ok(reason) => reason,
        Err(e) => {
            abandon_device(&ctrl, opts.recover);
            return Err(e);
        }
    };
    let flushed = volume.flush();
    remove_device(&ctrl);
    if let Err(source) = flushed {
        error!(error = %source, "final flush failed");
        return Err(UblkLayerError::FinalFlush {
            volume: volume.name().to_string(),
            source,
        });
    }
    match reason {
        Some(StopReason::QueuesEnded(n)) => Err(UblkLayerError::QueueFailed { dev_id, queues: n }),
        Some(StopReason::NotReady) => Err(UblkLayerError::NotReady(
            not_ready.lock().take().unwrap_or_default(),
        )),
        _ => {
            info!("device removed, volume flushed");
            Ok(())
        }
    }
}

/// What a device added by [`run_device`] serves and how.
pub(super) struct DeviceSpec {
    /// The volume.
    pub volume: Volume,
    /// Set for a read-only device of this snapshot of the volume.
    pub snapshot: Option<SnapshotView>,
    /// Copy or zero copy (as the device was created).
    pub mode: DataMode,
    /// The block device parameters.
    pub params: sys::ublk_params,
    /// Target data for libublk's device json.
    pub target: serde_json::Value,
    /// The device's span (device id and volume).
    pub span: Span,
    /// Keep libublk's per-queue CPU pinning.
    pub pin_queues: bool,
    /// Where the queues count finished requests.
    pub stats: Arc<IoStats>,
}

/// Starts the queues of the device `ctrl` was built for and runs it: `live` is called on
/// its own thread once the device is live and returns when the device should stop; the
/// device is then stopped (a mounted file system synced first) and the queues joined.
/// Returns why it stopped (None if `live` never ran). On error, the caller undoes the
/// device ([`abandon_device`]).
pub(super) fn run_device<L>(
    ctrl: &UblkCtrl,
    spec: DeviceSpec,
    live: L,
) -> Result<Option<StopReason>>
where
    L: FnOnce(&AtomicUsize, usize) -> StopReason + Send + Sync + 'static,
{
    let span = spec.span.clone();
    let info = ctrl.dev_info();
    let workers = Workers::start(&spec.volume, &span, MISC_WORKERS)?;
    let Some(work) = workers.submitter() else {
        return Err(UblkLayerError::InvalidOption(
            "worker pool has no submitter".into(),
        ));
    };
    let exited = Arc::new(AtomicUsize::new(0));
    let threads = QueueThreads::default();
    // Read before libublk pins any queue thread: the CPUs the daemon may use.
    let cpus = if spec.pin_queues {
        None
    } else {
        affinity::own_cpus()
    };
    let setup = QueueSetup {
        volume: spec.volume.clone(),
        snapshot: spec.snapshot.clone(),
        work,
        mode: spec.mode,
        span: span.clone(),
        exited: exited.clone(),
        threads: threads.clone(),
        stats: spec.stats.clone(),
    };
    let stop: Arc<Mutex<Option<StopReason>>> = Arc::new(Mutex::new(None));
    let size = spec
        .snapshot
        .as_ref()
        .map_or_else(|| spec.volume.size(), SnapshotView::size);
    let (params, target, mode) = (spec.params, spec.target, spec.mode);
    let tgt_init = move |dev: &mut UblkDev| {
        dev.tgt.dev_size = size;
        dev.tgt.params = params;
        // Room for several ring ops per request (reads of many segments) and for
        // eventfd reads, without overflowing the completion queue.
        let depth = dev.dev_info.queue_depth;
        dev.tgt.sq_depth = depth.saturating_mul(2).min(8192);
        dev.tgt.cq_depth = depth.saturating_mul(4).min(16384);
        dev.set_target_json(target);
        Ok(())
    };
    let q_fn = move |qid: u16, dev: &UblkDev| run_queue(qid, dev, &setup);
    let device_fn = {
        let span = span.clone();
        let stop = stop.clone();
        let nr_queues = usize::from(info.nr_hw_queues);
        move |ctrl: &UblkCtrl| {
            let _g = span.enter();
            let bdev = ctrl.get_bdev_path();
            // libublk pinned every queue thread before starting the device.
            let queue_cpus = match &cpus {
                Some(set) => threads.allow(set),
                None => "pinned per queue".to_string(),
            };
            info!(mode = mode.name(), bdev = %bdev, queue_cpus = %queue_cpus, "device is live");
            let reason = live(&exited, nr_queues);
            *stop.lock() = Some(reason);
            stop_device(ctrl, &bdev, reason);
        }
    };
    if let Err(e) = ctrl.run_target(tgt_init, q_fn, device_fn) {
        error!(error = %describe_ublk_error(&e), "the device did not start");
        // Queue threads may still be parked in the driver: do not wait for them.
        workers.abandon();
        return Err(UblkLayerError::ublk("start device", e));
    }
    workers.shutdown();
    let reason = *stop.lock();
    Ok(reason)
}

/// Opens the volume. When recovering, waits a little for a dying predecessor to
/// release the volume's lock.
fn open_volume(opts: &ServeOptions) -> Result<Volume> {
    let deadline = Instant::now() + RECOVER_LOCK_WAIT;
    loop {
        // Direct I/O by default, as a block device server should: no second copy of
        // the data in the page cache, and reads and writes complete on the ring
        // instead of waiting for io_uring's worker threads.
        let open = VolumeOpenOptions {
            direct: !opts.buffered,
        };
        match Volume::open_with(&opts.volume_dir, &open) {
            Ok(v) => return Ok(v),
            Err(EngineError::Busy { .. }) if opts.recover && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(source) => {
                return Err(UblkLayerError::Volume {
                    path: opts.volume_dir.clone(),
                    source,
                })
            }
        }
    }
}

/// Sets the size of the live device `dev_id` to `size` bytes (UPDATE_SIZE): the kernel
/// then shows it, and a file system on it can grow. The caller checks first that the
/// driver offers it ([`features::can_update_size`]) and that the volume is at least
/// this large.
pub fn resize_device(dev_id: u32, size: u64) -> Result<()> {
    let id = i32::try_from(dev_id)
        .map_err(|_| UblkLayerError::InvalidOption(format!("device id {dev_id} is too large")))?;
    // A control opened by id only: dropping it leaves the device alone.
    let ctrl = UblkCtrl::new_simple(id).map_err(|e| UblkLayerError::ublk("open device", e))?;
    ctrl.update_size(size)
        .map_err(|e| UblkLayerError::ublk("update device size", e))?;
    info!(dev_id, size, "device resized");
    Ok(())
}

/// Adds a new device with the flags the driver allows. Without `recovery` (snapshot
/// devices), the device goes away with the daemon instead of waiting for a new one.
/// `tag` ([`recover::volume_tag`], 0 for none) is kept by the kernel with the device for
/// its whole life, so `--recover` can check whose device it takes over.
pub(super) fn add_ctrl(
    opts: &ServeOptions,
    recovery: bool,
    tag: u64,
) -> Result<(UblkCtrl, DataMode)> {
    let feats = features::query_driver_features();
    let mut chosen = features::choose_device_flags(feats, opts.force_copy);
    if !recovery {
        chosen.ctrl_flags &=
            !u64::from(sys::UBLK_F_USER_RECOVERY | sys::UBLK_F_USER_RECOVERY_REISSUE);
        chosen.missing.clear();
    }
    for name in &chosen.missing {
        warn!(
            flag = name,
            "the driver lacks a recovery feature: a killed daemon cannot be replaced cleanly"
        );
    }
    info!(
        mode = chosen.mode.name(),
        reason = chosen.reason,
        features = format_args!("{:#x}", feats.unwrap_or(0)),
        "data mode"
    );
    let id = opts.dev_id.map_or(-1, |id| i32::try_from(id).unwrap_or(-1));
    let ctrl = UblkCtrlBuilder::default()
        .name(TARGET_NAME)
        .id(id)
        .nr_queues(opts.queues)
        .depth(opts.depth)
        .io_buf_bytes(MAX_IO_BYTES)
        .ctrl_flags(chosen.ctrl_flags)
        .ctrl_target_flags(tag)
        .dev_flags(UblkFlags::UBLK_DEV_F_ADD_DEV | UblkFlags::UBLK_DEV_F_DEL_DEV_ASYNC)
        .build()
        .map_err(|e| UblkLayerError::ublk("add device", e))?;
    Ok((ctrl, chosen.mode))
}

/// Takes over a device whose daemon died: checks it, starts user recovery and builds
/// a control for it. The data mode is the one the device was created with.
fn recover_ctrl(
    opts: &ServeOptions,
    volume: &Volume,
    volume_dir: &Path,
) -> Result<(UblkCtrl, DataMode)> {
    let id = recover::choose_device(volume_dir, opts.dev_id)?;
    if opts.dev_id.is_none() {
        Span::current().record("dev_id", id);
    }
    let info = recover::wait_recoverable(id, volume.size(), volume.block_size())?;
    recover::check_owner(
        id,
        info.ublksrv_flags,
        recover::volume_tag(&volume.id()),
        recover::recorded_for(id, volume_dir),
        volume_dir,
    )?;
    let id_i32 = i32::try_from(id)
        .map_err(|_| UblkLayerError::InvalidOption(format!("device id {id} is too large")))?;
    let old = UblkCtrl::new_simple(id_i32).map_err(|e| UblkLayerError::ublk("open device", e))?;
    old.start_user_recover()
        .map_err(|e| UblkLayerError::ublk("start user recovery", e))?;
    drop(old);
    let mode = DataMode::of_device_flags(info.flags);
    if opts.force_copy && mode == DataMode::ZeroCopy {
        warn!("--copy ignored: a recovered device keeps the data mode it was created with");
    }
    info!(mode = mode.name(), "data mode (from the device)");
    let keep = u64::from(
        sys::UBLK_F_USER_RECOVERY
            | sys::UBLK_F_USER_RECOVERY_REISSUE
            | sys::UBLK_F_AUTO_BUF_REG
            | sys::UBLK_F_CMD_IOCTL_ENCODE,
    );
    let ctrl = UblkCtrlBuilder::default()
        .name(TARGET_NAME)
        .id(id_i32)
        .nr_queues(info.nr_hw_queues)
        .depth(info.queue_depth)
        .io_buf_bytes(info.max_io_buf_bytes)
        .ctrl_flags(info.flags & keep)
        .dev_flags(UblkFlags::UBLK_DEV_F_RECOVER_DEV | UblkFlags::UBLK_DEV_F_DEL_DEV_ASYNC)
        .build()
        .map_err(|e| UblkLayerError::ublk("reattach device", e))?;
    Ok((ctrl, mode))
}

/// Blocks until SIGTERM/SIGINT, or until a queue thread ends on its own.
fn wait_for_stop(exited: &AtomicUsize, nr_queues: usize) -> StopReason {
    loop {
        if let Some(sig) = signals::wait_stop_signal(POLL) {
            info!(signal = signals::signal_name(sig), "stopping");
            return StopReason::Signal(sig);
        }
        if let Some(ended) = queues_ended(exited, nr_queues) {
            return ended;
        }
    }
}

/// `QueuesEnded` (logged) once a queue thread has ended on its own: the device cannot
/// serve all its queues any more and must stop.
pub(super) fn queues_ended(exited: &AtomicUsize, nr_queues: usize) -> Option<StopReason> {
    let n = exited.load(Ordering::Acquire);
    if n == 0 {
        return None;
    }
    error!(
        queues = n,
        of = nr_queues,
        "queue thread(s) ended on their own; stopping the device"
    );
    Some(StopReason::QueuesEnded(n))
}

/// Stops the device while the queues still serve (the kernel flushes a mounted file
/// system through them first); the queues then end.
pub(super) fn stop_device(ctrl: &UblkCtrl, bdev_path: &str, reason: StopReason) {
    let mounted = mounts::mount_points(Path::new(bdev_path));
    if !mounted.is_empty() {
        warn!(
            mounts = ?mounted,
            ?reason,
            "stopping a device that is still mounted: syncing it first; afterwards it only \
             gets I/O errors; unmount it to release the device"
        );
        // Every mount of the device shares one file system: one sync writes it back.
        if let Some(m) = mounted.first() {
            sync_mount(m);
        }
    }
    if let Err(e) = ctrl.kill_dev() {
        warn!(error = %describe_ublk_error(&e), "stopping the device failed");
    }
}

/// Writes back a file system mounted on the device while the queues still serve it
/// (the driver fails all I/O once the device is stopped). Gives up after
/// [`SYNC_LIMIT`]; the stop then fails whatever is still pending.
fn sync_mount(mount_point: &str) {
    let (tx, rx) = std::sync::mpsc::channel();
    let path = mount_point.to_string();
    let spawned = std::thread::Builder::new()
        .name("snapblk-syncfs".into())
        .spawn(move || {
            let r = std::fs::File::open(&path).and_then(|f| {
                // SAFETY: syncfs on a descriptor we own for the duration of the call.
                let rc = unsafe { libc::syncfs(std::os::fd::AsRawFd::as_raw_fd(&f)) };
                if rc == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
            let _ = tx.send(r);
        });
    if let Err(e) = spawned {
        warn!(error = %e, mount = mount_point, "cannot start syncing the file system");
        return;
    }
    match rx.recv_timeout(SYNC_LIMIT) {
        Ok(Ok(())) => info!(mount = mount_point, "file system synced before the stop"),
        Ok(Err(e)) => warn!(error = %e, mount = mount_point, "syncing the file system failed"),
        Err(_) => warn!(
            mount = mount_point,
            secs = SYNC_LIMIT.as_secs(),
            "syncing the file system takes too long; stopping anyway"
        ),
    }
}

/// Undoes a device that never went live: a new one is deleted; a recovered one is left
/// waiting for a daemon (deleting it would fail the file system still mounted on it),
/// for another `--recover` to take over.
pub(super) fn abandon_device(ctrl: &UblkCtrl, recovering: bool) {
    if recovering {
        warn!("the device stays, waiting for a daemon: retry with --recover");
        ctrl.disown();
    } else {
        remove_device(ctrl);
    }
}

/// Stops (if still live) and deletes the device without waiting for its last user.
pub(super) fn remove_device(ctrl: &UblkCtrl) {
    let _ = ctrl.kill_dev();
    match ctrl.del_dev_async() {
        Ok(_) => info!("device deleted"),
        Err(e) => warn!(error = %describe_ublk_error(&e), "deleting the device failed"),
    }
    // Never let the control's drop try a synchronous delete, which would wait for a
    // file system still mounted on the device.
    ctrl.disown();
}
