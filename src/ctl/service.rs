//! What the control socket does for one served volume: status, counters for metrics,
//! snapshots with freeze coordination, manual freeze/thaw. Blocking code (engine fsyncs, FIFREEZE): the server
//! runs it off its async runtime and off the ublk queue threads.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde_json::{json, Value};

use super::freeze::{self, FreezeGuard};
use super::protocol::{
    CloneArgs, Command, CtlError, ErrorCode, ExportArgs, FreezeArgs, FreezeMode, ResizeArgs,
    SnapshotCreateArgs, DEFAULT_FREEZE_TIMEOUT, MAX_FREEZE_TIMEOUT,
};
use crate::engine::{validate_snapshot_name, EngineError, SnapshotView, Volume};
use crate::stats::{Histogram, IoStats, VolumeStats, FREEZE_BOUNDS_NS};
use crate::stream::{PreparedExport, StreamError};

/// Exports streaming at once, at most (each holds a blocking thread of the server).
pub const MAX_EXPORTS: usize = 2;

/// Exports in progress and the snapshots they read (which must not be deleted meanwhile).
#[derive(Debug, Default)]
struct Exports {
    running: usize,
    pinned: BTreeMap<String, usize>,
}

/// An export checked and ready to stream; the snapshots it reads stay pinned (not
/// deletable) until it is dropped.
pub struct ExportJob {
    /// What to write.
    pub export: PreparedExport,
    exports: Arc<Mutex<Exports>>,
    names: Vec<String>,
}

impl Drop for ExportJob {
    fn drop(&mut self) {
        let mut ex = self.exports.lock();
        ex.running = ex.running.saturating_sub(1);
        for n in &self.names {
            if let Some(c) = ex.pinned.get_mut(n) {
                *c -= 1;
                if *c == 0 {
                    ex.pinned.remove(n);
                }
            }
        }
    }
}

/// Maps a stream error met while preparing an export to a protocol error.
fn export_error(e: StreamError) -> CtlError {
    match e {
        StreamError::Volume { err, context } => {
            let mut c = engine_error(err);
            c.message = format!("{context}: {}", c.message);
            c
        }
        other => CtlError::new(ErrorCode::Io, other.to_string()),
    }
}

/// Serves snapshots as read-only block devices. The daemon gives the service one backed
/// by the ublk layer; without it (the volume not served, host tests) `snapshot.expose`
/// is refused.
pub trait SnapshotExposer: Send + Sync {
    /// Serves `view`, snapshot `name`, until the returned handle is dropped.
    fn expose(&self, name: &str, view: SnapshotView) -> Result<Box<dyn Exposed>, CtlError>;
}

/// A snapshot being served read-only; dropping it removes the device (and waits for that).
pub trait Exposed: Send {
    /// The block device node (`/dev/ublkbN`).
    fn device(&self) -> &str;
}

/// Tells the kernel that the block device serving the volume has grown. The daemon gives
/// the service one backed by the ublk layer; without it (the volume not served as a
/// device, host tests) only the volume grows.
pub trait DeviceResizer: Send + Sync {
    /// Whether the live device can follow a grow; `Err` (with code `unsupported` and what
    /// to do instead) when it cannot, in which case the volume must not grow either.
    fn check(&self) -> Result<(), CtlError>;
    /// Sets the device's size to `size` bytes.
    fn resize(&self, size: u64) -> Result<(), CtlError>;
}

/// The block device serving the volume, as the control layer needs to know it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DeviceInfo {
    /// `/dev/ublkbN`.
    pub path: String,
    /// Its `major:minor`, to find its mounts.
    pub major: u32,
    pub minor: u32,
    /// `copy` or `zero-copy`.
    pub mode: String,
}

/// Maps an engine error to a protocol error.
pub fn engine_error(e: EngineError) -> CtlError {
    let code = match &e {
        EngineError::SnapshotNotFound(_)
        | EngineError::SnapshotIdNotFound(_)
        | EngineError::NotAVolume { .. } => ErrorCode::NotFound,
        EngineError::SnapshotExists(_) | EngineError::AlreadyExists { .. } => {
            ErrorCode::AlreadyExists
        }
        EngineError::InvalidName(_) => ErrorCode::InvalidName,
        EngineError::Invalid(_)
        | EngineError::Unrelated(_)
        | EngineError::OutOfRange { .. }
        | EngineError::Unaligned { .. } => ErrorCode::BadRequest,
        EngineError::Busy { .. } => ErrorCode::Busy,
        e if matches!(e.errno(), libc::ENOSPC | libc::EDQUOT) => ErrorCode::NoSpace,
        _ => ErrorCode::Io,
    };
    CtlError::new(code, e.to_string())
}

/// The control service of one volume.
pub struct VolumeService {
    volume: Volume,
    /// The volume's canonical folder, reported by `status` so that clients can check they
    /// reached the volume they name.
    dir: PathBuf,
    device: Option<DeviceInfo>,
    /// Program run as the freeze watchdog (this binary), if any.
    watchdog: Option<PathBuf>,
    /// Marker file naming what is frozen, read at start-up to thaw leftovers.
    marker: Option<PathBuf>,
    /// One snapshot operation at a time.
    snapshots: Mutex<()>,
    /// A freeze asked for with the `freeze` command: the connection id, the guard, and
    /// when the file system was frozen.
    manual: Mutex<Option<(u64, FreezeGuard, Instant)>>,
    /// Makes snapshot devices, if the daemon can.
    exposer: Option<Box<dyn SnapshotExposer>>,
    /// Snapshots served read-only, by name.
    exposed: Mutex<BTreeMap<String, Box<dyn Exposed>>>,
    /// Exports streaming now.
    exports: Arc<Mutex<Exports>>,
    /// Grows the device with the volume, if the daemon serves one.
    resizer: Option<Box<dyn DeviceResizer>>,
    /// The device's request counters, if the daemon serves one.
    io: Option<Arc<IoStats>>,
    /// How long each freeze window this service held lasted.
    freezes: Histogram,
    /// Snapshots this service cut.
    snapshots_created: AtomicU64,
    /// When counting started.
    started: Instant,
}

impl VolumeService {
    /// A service for `volume` served as `device`.
    pub fn new(
        volume: Volume,
        device: Option<DeviceInfo>,
        watchdog: Option<PathBuf>,
        marker: Option<PathBuf>,
    ) -> VolumeService {
        if let Some(m) = &marker {
            freeze::thaw_leftovers(m);
        }
        let dir =
            std::fs::canonicalize(volume.dir()).unwrap_or_else(|_| volume.dir().to_path_buf());
        VolumeService {
            volume,
            dir,
            device,
            watchdog,
            marker,
            snapshots: Mutex::new(()),
            manual: Mutex::new(None),
            exposer: None,
            exposed: Mutex::new(BTreeMap::new()),
            exports: Arc::default(),
            resizer: None,
            io: None,
            freezes: Histogram::new(&FREEZE_BOUNDS_NS),
            snapshots_created: AtomicU64::new(0),
            started: Instant::now(),
        }
    }

    /// The same service, reporting the device's request counters `io` in `stats`.
    pub fn with_io_stats(mut self, io: Arc<IoStats>) -> VolumeService {
        self.io = Some(io);
        self
    }

    /// Checks an export request and pins its snapshots; the caller streams it (the
    /// server, to the client's connection) and drops the job when done.
    pub fn prepare_export(&self, a: &ExportArgs) -> Result<ExportJob, CtlError> {
        let _one = self.snapshots.lock();
        if self.exports.lock().running >= MAX_EXPORTS {
            return Err(CtlError::new(
                ErrorCode::Busy,
                format!("{MAX_EXPORTS} exports are already streaming from this volume; retry when one ends"),
            ));
        }
        let export = PreparedExport::new(&self.volume, &a.snapshot, a.since.as_deref())
            .map_err(export_error)?;
        let mut names = vec![a.snapshot.clone()];
        names.extend(a.since.clone());
        let mut ex = self.exports.lock();
        ex.running += 1;
        for n in &names {
            *ex.pinned.entry(n.clone()).or_default() += 1;
        }
        drop(ex);
        Ok(ExportJob {
            export,
            exports: self.exports.clone(),
            names,
        })
    }

    /// The same service, able to expose snapshots through `exposer`.
    pub fn with_exposer(mut self, exposer: Box<dyn SnapshotExposer>) -> VolumeService {
        self.exposer = Some(exposer);
        self
    }

    /// The same service, growing the device through `resizer` when the volume grows.
    pub fn with_resizer(mut self, resizer: Box<dyn DeviceResizer>) -> VolumeService {
        self.resizer = Some(resizer);
        self
    }

    /// Removes every snapshot device (the daemon is stopping).
    pub fn unexpose_all(&self) {
        let all = std::mem::take(&mut *self.exposed.lock());
        for (name, dev) in all {
            tracing::info!(snapshot = %name, device = dev.device(), "unexposing snapshot");
            drop(dev);
        }
    }

    /// Runs `cmd` for connection `conn`; blocking.
    pub fn handle(&self, conn: u64, cmd: Command) -> Result<Value, CtlError> {
        match cmd {
            Command::Status => Ok(self.status()),
            Command::Stats => serde_json::to_value(self.stats())
                .map_err(|e| CtlError::new(ErrorCode::Internal, e.to_string())),
            Command::SnapshotList => Ok(json!({
                "snapshots": self.volume.list_snapshots(),
                "exposed": self.exposed_devices(),
            })),
            Command::SnapshotShow(a) => self
                .volume
                .snapshot_info(&a.name)
                .map(|s| json!({ "snapshot": s }))
                .map_err(engine_error),
            Command::SnapshotDelete(a) => {
                let _one = self.snapshots.lock();
                if let Some(dev) = self.exposed.lock().get(&a.name) {
                    return Err(CtlError::new(
                        ErrorCode::Busy,
                        format!(
                            "snapshot {:?} is exposed as {}; unexpose it first (snapblk snapshot unexpose)",
                            a.name,
                            dev.device()
                        ),
                    ));
                }
                if self.exports.lock().pinned.contains_key(&a.name) {
                    return Err(CtlError::new(
                        ErrorCode::Busy,
                        format!(
                            "snapshot {:?} is being exported; delete it once the export ends",
                            a.name
                        ),
                    ));
                }
                self.volume.delete_snapshot(&a.name).map_err(engine_error)?;
                Ok(json!({ "deleted": a.name }))
            }
            Command::SnapshotExpose(a) => self.expose(&a.name),
            Command::SnapshotUnexpose(a) => self.unexpose(&a.name),
            Command::SnapshotClone(a) => self.clone_snapshot(a),
            Command::VolumeResize(a) => self.resize(a),
            Command::Export(_) => Err(CtlError::new(
                ErrorCode::Internal,
                "export is streamed by the server, not answered here",
            )),
            Command::SnapshotCreate(a) => self.snapshot_create(a),
            Command::Freeze(a) => self.manual_freeze(conn, a),
            Command::Thaw(_) => self.manual_thaw(None),
        }
    }

    /// Thaws a manual freeze made by connection `conn` (called when it disconnects).
    pub fn connection_closed(&self, conn: u64) {
        if self
            .manual
            .lock()
            .as_ref()
            .is_some_and(|(c, _, _)| *c == conn)
        {
            tracing::warn!(
                conn,
                "the client that froze the file system disconnected: thawing"
            );
            let _ = self.manual_thaw(Some(conn));
        }
    }

    fn status(&self) -> Value {
        json!({
            "volume": self.volume.status(),
            "dir": self.dir,
            "device": self.device,
            "frozen": self.manual.lock().as_ref().map(|(_, g, _)| g.mounts().to_vec()),
            "exposed": self.exposed_devices(),
        })
    }

    /// The counters metrics are made of.
    pub fn stats(&self) -> VolumeStats {
        let st = self.volume.status();
        VolumeStats {
            volume_id: st.volume_id,
            uptime_seconds: self.started.elapsed().as_secs_f64(),
            size_bytes: st.size,
            stored_bytes: st.stored_bytes,
            snapshots: st.snapshots as u64,
            snapshots_created: self.snapshots_created.load(Ordering::Relaxed),
            freeze: self.freezes.snapshot(),
            io: self.io.as_ref().map(|s| s.snapshot()).unwrap_or_default(),
        }
    }

    /// Device of each exposed snapshot, by snapshot name.
    fn exposed_devices(&self) -> BTreeMap<String, String> {
        self.exposed
            .lock()
            .iter()
            .map(|(n, d)| (n.clone(), d.device().to_string()))
            .collect()
    }

    /// Serves snapshot `name` read-only; asking again returns the same device.
    fn expose(&self, name: &str) -> Result<Value, CtlError> {
        let _one = self.snapshots.lock();
        if let Some(dev) = self.exposed.lock().get(name) {
            return Ok(json!({ "snapshot": name, "device": dev.device(), "created": false }));
        }
        let exposer = self.exposer.as_ref().ok_or_else(|| {
            CtlError::new(
                ErrorCode::NotFound,
                "this daemon cannot serve snapshot devices (the volume is not served as a ublk device)",
            )
        })?;
        let view = self.volume.snapshot_view(name).map_err(engine_error)?;
        let dev = exposer.expose(name, view)?;
        let device = dev.device().to_string();
        tracing::info!(snapshot = name, device = %device, "snapshot exposed read-only");
        self.exposed.lock().insert(name.to_string(), dev);
        Ok(json!({ "snapshot": name, "device": device, "created": true }))
    }

    /// Removes the device of snapshot `name`.
    fn unexpose(&self, name: &str) -> Result<Value, CtlError> {
        let _one = self.snapshots.lock();
        let dev = self.exposed.lock().remove(name).ok_or_else(|| {
            CtlError::new(
                ErrorCode::NotFound,
                format!("snapshot {name:?} is not exposed"),
            )
        })?;
        let device = dev.device().to_string();
        drop(dev);
        tracing::info!(snapshot = name, device = %device, "snapshot unexposed");
        Ok(json!({ "snapshot": name, "device": device }))
    }

    /// Clones snapshot `a.name` into a new volume at `a.dir` (the daemon holds the source
    /// volume's lock, so this is the way to clone a served volume's snapshot).
    fn clone_snapshot(&self, a: CloneArgs) -> Result<Value, CtlError> {
        validate_snapshot_name(&a.name).map_err(engine_error)?;
        let dir = PathBuf::from(&a.dir);
        if !dir.is_absolute() {
            return Err(CtlError::new(
                ErrorCode::BadRequest,
                format!(
                    "dir {:?} must be an absolute path (the daemon's working folder is not the client's)",
                    a.dir
                ),
            ));
        }
        if dir.symlink_metadata().is_ok() {
            return Err(CtlError::new(
                ErrorCode::AlreadyExists,
                format!(
                    "{} already exists; a clone needs a new folder",
                    dir.display()
                ),
            ));
        }
        // Snapshot operations one at a time: the snapshot cannot be deleted meanwhile.
        let _one = self.snapshots.lock();
        let clone = self
            .volume
            .clone_snapshot(&a.name, &dir)
            .map_err(engine_error)?;
        let volume_id = clone.id();
        clone.close().map_err(engine_error)?;
        tracing::info!(snapshot = %a.name, clone = %dir.display(), volume_id = %volume_id, "snapshot cloned into a new volume");
        Ok(json!({ "snapshot": a.name, "dir": dir, "volume_id": volume_id }))
    }

    /// Grows the volume, then the device serving it. Refused before anything changes when
    /// the device cannot follow (a device smaller than the volume is safe, a larger one is
    /// not, so the volume grows first).
    fn resize(&self, a: ResizeArgs) -> Result<Value, CtlError> {
        let _one = self.snapshots.lock();
        let old = self.volume.size();
        if a.size < old {
            return Err(CtlError::new(
                ErrorCode::BadRequest,
                format!(
                    "cannot shrink the volume from {old} to {} bytes: volumes only grow",
                    a.size
                ),
            ));
        }
        let resizer = match (&self.device, &self.resizer) {
            (None, _) => None,
            (Some(_), Some(r)) => {
                r.check()?;
                Some(r)
            }
            (Some(dev), None) => {
                return Err(CtlError::new(
                    ErrorCode::Unsupported,
                    format!(
                        "this daemon cannot resize its device {}; the volume was not grown",
                        dev.path
                    ),
                ))
            }
        };
        self.volume.resize(a.size).map_err(engine_error)?;
        let Some(r) = resizer else {
            return Ok(json!({ "size": a.size, "device_resized": false }));
        };
        // Also when the size did not change: a device that missed an earlier grow catches
        // up, so asking again is the way to retry.
        if let Err(e) = r.resize(a.size) {
            let device = self
                .device
                .as_ref()
                .map_or("the device", |d| d.path.as_str());
            return Err(CtlError::new(
                e.code,
                format!(
                    "the volume grew to {} bytes, but {device} could not be resized: {}. \
                     This is safe: the device keeps its old size (the volume only has more \
                     room than the device shows) until the same request succeeds or the \
                     volume is served again",
                    a.size, e.message
                ),
            ));
        }
        tracing::info!(old, new = a.size, "volume and device grown");
        Ok(json!({ "size": a.size, "device_resized": true }))
    }

    fn device_path(&self) -> &Path {
        Path::new(self.device.as_ref().map_or("", |d| d.path.as_str()))
    }

    fn device_number(&self) -> Option<(u32, u32)> {
        self.device.as_ref().map(|d| (d.major, d.minor))
    }

    fn snapshot_create(&self, a: SnapshotCreateArgs) -> Result<Value, CtlError> {
        validate_snapshot_name(&a.name)
            .map_err(|e| CtlError::new(ErrorCode::InvalidName, e.to_string()))?;
        let timeout = freeze_timeout(a.freeze_timeout_ms)?;
        let _one = self.snapshots.lock();
        if let Ok(existing) = self.volume.snapshot_info(&a.name) {
            // Same name on the same volume: the same snapshot, so asking again is a success.
            return Ok(json!({ "snapshot": existing, "created": false }));
        }
        let manual_active = self.manual.lock().is_some();
        let mounts = match (a.freeze, self.device_number()) {
            (FreezeMode::None, _) => vec![],
            (FreezeMode::Auto, _) if manual_active => vec![],
            (FreezeMode::Auto, Some(dev)) => {
                freeze::targets(dev, self.device_path(), a.mount.as_deref().map(Path::new))?
            }
            (FreezeMode::Auto, None) => vec![],
        };
        // Step 1 of the cut (the new head's files) before anything is frozen; should the
        // freeze fail, dropping the prepared cut removes them.
        let prepared = self.volume.prepare_cut(&a.name).map_err(engine_error)?;
        let t0 = Instant::now();
        let guard = self.freeze(mounts, timeout)?;
        let frozen_at = Instant::now();
        // Writers wait from the first FIFREEZE (which syncs with them held) to the thaw.
        let holding_since = guard.holding_since().unwrap_or(frozen_at);
        // Only the manifest commit and the switch of writes need the file system frozen.
        let switched = self.volume.switch_cut(prepared);
        let expired = guard.expired();
        let frozen: Vec<PathBuf> = guard.mounts().to_vec();
        let thawed = guard.thaw();
        let (frozen_for, stall) = match &thawed {
            Ok(at) if !frozen.is_empty() => (
                at.duration_since(frozen_at),
                at.duration_since(holding_since),
            ),
            _ => (Duration::ZERO, Duration::ZERO),
        };
        let pending = switched.map_err(engine_error)?;
        // Drain and seal the old head once writers run again: a frozen file system had no
        // writes in flight to the device, and the snapshot is durable since the switch.
        let report = self.volume.finish_cut(pending);
        if expired {
            let _ = self.volume.delete_snapshot(&a.name);
            return Err(CtlError::new(
                ErrorCode::Timeout,
                format!("the snapshot took longer than the {} ms freeze deadline; it was discarded and the file system thawed", timeout.as_millis()),
            ));
        }
        let report = report.map_err(engine_error)?;
        thawed?;
        self.snapshots_created.fetch_add(1, Ordering::Relaxed);
        self.volume.merge_after_cut();
        if !frozen.is_empty() {
            self.freezes.record(stall);
        }
        let consistency = if !frozen.is_empty() || manual_active {
            "application-consistent: the file system was frozen for the cut"
        } else if a.freeze == FreezeMode::None {
            "crash-consistent (freeze none): every acknowledged write is in it"
        } else {
            "crash-consistent: no mounted file system found on the device; every acknowledged write is in it"
        };
        Ok(json!({
            "snapshot": report.snapshot,
            "created": true,
            "consistency": consistency,
            "frozen_mounts": frozen,
            "stall_ms": stall.as_secs_f64() * 1e3,
            "frozen_ms": frozen_for.as_secs_f64() * 1e3,
            "freeze_ms": (frozen_at - holding_since).as_secs_f64() * 1e3,
            "sync_ms": (holding_since - t0).as_secs_f64() * 1e3,
            "cut_ms": report.total.as_secs_f64() * 1e3,
            "prepare_ms": report.prepare.as_secs_f64() * 1e3,
            "switch_ms": report.switch.as_secs_f64() * 1e3,
            "seal_ms": report.seal.as_secs_f64() * 1e3,
            "drain_ms": report.drain.as_secs_f64() * 1e3,
        }))
    }

    /// Freezes `mounts` with this service's watchdog and marker.
    fn freeze(&self, mounts: Vec<PathBuf>, timeout: Duration) -> Result<FreezeGuard, CtlError> {
        FreezeGuard::freeze_on(
            self.device_number(),
            mounts,
            timeout,
            self.watchdog.as_deref(),
            self.marker.clone(),
        )
    }

    fn manual_freeze(&self, conn: u64, a: FreezeArgs) -> Result<Value, CtlError> {
        let timeout = freeze_timeout(a.timeout_ms)?;
        let dev = self.device_number().ok_or_else(|| {
            CtlError::new(ErrorCode::NotFound, "the volume is not served as a device")
        })?;
        let mut manual = self.manual.lock();
        if manual.is_some() {
            return Err(CtlError::new(
                ErrorCode::AlreadyFrozen,
                "already frozen through this socket; thaw first",
            ));
        }
        let mounts = freeze::targets(dev, self.device_path(), a.mount.as_deref().map(Path::new))?;
        if mounts.is_empty() {
            return Err(CtlError::new(
                ErrorCode::NotFound,
                "no file system is mounted from this volume's device",
            ));
        }
        let guard = self.freeze(mounts, timeout)?;
        let frozen = guard.mounts().to_vec();
        // The window recorded runs from the first FIFREEZE: writers wait from then on.
        let since = guard.holding_since().unwrap_or_else(Instant::now);
        *manual = Some((conn, guard, since));
        Ok(json!({ "frozen": frozen, "timeout_ms": timeout.as_millis() as u64 }))
    }

    fn manual_thaw(&self, only_conn: Option<u64>) -> Result<Value, CtlError> {
        let mut manual = self.manual.lock();
        match manual.take() {
            Some((c, g, since)) if only_conn.is_none_or(|o| o == c) => {
                let mounts = g.mounts().to_vec();
                let at = g.thaw()?;
                self.freezes.record(at.saturating_duration_since(since));
                Ok(json!({ "thawed": mounts }))
            }
            Some(other) => {
                *manual = Some(other);
                Ok(json!({ "thawed": [] }))
            }
            None => Err(CtlError::new(
                ErrorCode::NotFound,
                "nothing is frozen through this socket",
            )),
        }
    }
}

fn freeze_timeout(ms: Option<u64>) -> Result<Duration, CtlError> {
    let t = ms
        .map(Duration::from_millis)
        .unwrap_or(DEFAULT_FREEZE_TIMEOUT);
    if t.is_zero() || t > MAX_FREEZE_TIMEOUT {
        return Err(CtlError::new(
            ErrorCode::BadRequest,
            format!(
                "freeze timeout must be between 1 ms and {} s",
                MAX_FREEZE_TIMEOUT.as_secs()
            ),
        ));
    }
    Ok(t)
}

/// Where the marker of frozen mounts lives for the socket at `socket`.
pub fn marker_path(socket: &Path) -> PathBuf {
    socket.with_extension("frozen")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ctl::protocol::{NameArgs, ResizeArgs};
    use crate::engine::CreateOptions;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Hands out fake devices and counts the ones removed.
    struct FakeExposer {
        next: AtomicUsize,
        removed: Arc<AtomicUsize>,
        first_byte: Arc<Mutex<Option<u8>>>,
    }

    struct FakeDevice {
        path: String,
        _view: SnapshotView,
        removed: Arc<AtomicUsize>,
    }

    impl Exposed for FakeDevice {
        fn device(&self) -> &str {
            &self.path
        }
    }

    impl Drop for FakeDevice {
        fn drop(&mut self) {
            self.removed.fetch_add(1, Ordering::SeqCst);
        }
    }

    impl SnapshotExposer for FakeExposer {
        fn expose(&self, _name: &str, view: SnapshotView) -> Result<Box<dyn Exposed>, CtlError> {
            let n = self.next.fetch_add(1, Ordering::SeqCst);
            let mut buf = [0u8; 4096];
            view.read(0, &mut buf)
                .map_err(|e| CtlError::new(ErrorCode::Io, e.to_string()))?;
            *self.first_byte.lock() = Some(buf[0]);
            Ok(Box::new(FakeDevice {
                path: format!("/dev/fake{n}"),
                _view: view,
                removed: self.removed.clone(),
            }))
        }
    }

    /// A 1 MiB volume in `dir/v`.
    fn small_volume(dir: &std::path::Path) -> Volume {
        Volume::create(
            &dir.join("v"),
            &CreateOptions {
                size: 1 << 20,
                block_size: 4096,
            },
        )
        .expect("volume")
    }

    fn name(n: &str) -> NameArgs {
        NameArgs { name: n.into() }
    }

    fn create_args(n: &str) -> Command {
        Command::SnapshotCreate(SnapshotCreateArgs {
            name: n.into(),
            freeze: FreezeMode::None,
            mount: None,
            freeze_timeout_ms: None,
        })
    }

    /// A snapshot deleted right under the live head can only give back what the head
    /// covers; the next snapshot seals that head, and the rest is merged then, not left
    /// waiting for some later delete.
    #[test]
    fn a_cut_merges_what_a_delete_left_under_the_head() {
        let tmp = tempfile::tempdir().expect("tmp");
        let vol = small_volume(tmp.path());
        let svc = VolumeService::new(vol.clone(), None, None, None);
        vol.write(0, &[1u8; 4096], false).expect("write");
        vol.write(4096, &[2u8; 4096], false).expect("write");
        svc.handle(1, create_args("s1")).expect("s1");
        vol.write(0, &[3u8; 4096], false).expect("write");
        svc.handle(1, Command::SnapshotDelete(name("s1")))
            .expect("delete s1");
        // Block 1 is only in s1's layer: the live head still reads it from there.
        assert!(vol.has_pending_merges());
        assert_eq!(vol.status().layers, 2);

        svc.handle(1, create_args("s2")).expect("s2");
        let st = vol.status();
        assert_eq!(st.pending_merges, 0, "{st:?}");
        assert_eq!(st.layers, 2, "{st:?}");
        let mut buf = [0u8; 8192];
        vol.read_snapshot("s2", 0, &mut buf).expect("read s2");
        assert!(buf[..4096].iter().all(|&b| b == 3));
        assert!(buf[4096..].iter().all(|&b| b == 2));
        vol.read(0, &mut buf).expect("read head");
        assert!(buf[..4096].iter().all(|&b| b == 3));
        assert!(buf[4096..].iter().all(|&b| b == 2));
    }

    #[test]
    fn expose_unexpose_and_delete_rules() {
        let tmp = tempfile::tempdir().expect("tmp");
        let vol = small_volume(tmp.path());
        vol.write(0, &[7u8; 4096], false).expect("write");
        vol.create_snapshot("s1").expect("snapshot");
        vol.write(0, &[9u8; 4096], false).expect("write");

        // Without an exposer the request is refused with a reason.
        let plain = VolumeService::new(vol.clone(), None, None, None);
        let e = plain
            .handle(1, Command::SnapshotExpose(name("s1")))
            .expect_err("no exposer");
        assert_eq!(e.code, ErrorCode::NotFound);
        assert!(e.message.contains("not served"), "{}", e.message);

        let removed = Arc::new(AtomicUsize::new(0));
        let first_byte = Arc::new(Mutex::new(None));
        let svc =
            VolumeService::new(vol.clone(), None, None, None).with_exposer(Box::new(FakeExposer {
                next: AtomicUsize::new(0),
                removed: removed.clone(),
                first_byte: first_byte.clone(),
            }));
        let e = svc
            .handle(1, Command::SnapshotExpose(name("nope")))
            .expect_err("unknown snapshot");
        assert_eq!(e.code, ErrorCode::NotFound);

        let r = svc
            .handle(1, Command::SnapshotExpose(name("s1")))
            .expect("expose");
        assert_eq!(r["device"], "/dev/fake0");
        assert_eq!(r["created"], true);
        // Asking again gives the same device.
        let again = svc
            .handle(2, Command::SnapshotExpose(name("s1")))
            .expect("again");
        assert_eq!(again["device"], "/dev/fake0");
        assert_eq!(again["created"], false);
        let status = svc.handle(1, Command::Status).expect("status");
        assert_eq!(status["exposed"]["s1"], "/dev/fake0");

        // The device was given a view of the snapshot, not of the live volume.
        assert_eq!(*first_byte.lock(), Some(7));

        let e = svc
            .handle(1, Command::SnapshotDelete(name("s1")))
            .expect_err("delete while exposed");
        assert_eq!(e.code, ErrorCode::Busy);
        assert!(e.message.contains("/dev/fake0"), "{}", e.message);
        assert!(vol.snapshot_info("s1").is_ok());

        let r = svc
            .handle(1, Command::SnapshotUnexpose(name("s1")))
            .expect("unexpose");
        assert_eq!(r["device"], "/dev/fake0");
        assert_eq!(removed.load(Ordering::SeqCst), 1);
        let e = svc
            .handle(1, Command::SnapshotUnexpose(name("s1")))
            .expect_err("twice");
        assert_eq!(e.code, ErrorCode::NotFound);
        svc.handle(1, Command::SnapshotDelete(name("s1")))
            .expect("delete once unexposed");

        // Stopping the daemon removes what is still exposed.
        vol.create_snapshot("s2").expect("s2");
        svc.handle(1, Command::SnapshotExpose(name("s2")))
            .expect("expose s2");
        svc.unexpose_all();
        assert_eq!(removed.load(Ordering::SeqCst), 2);
        assert_eq!(svc.exposed_devices().len(), 0);
    }

    /// A device that can or cannot grow, and remembers the sizes it was given.
    struct FakeResizer {
        supported: bool,
        fail: bool,
        sizes: Arc<Mutex<Vec<u64>>>,
    }

    impl DeviceResizer for FakeResizer {
        fn check(&self) -> Result<(), CtlError> {
            if self.supported {
                Ok(())
            } else {
                Err(CtlError::new(ErrorCode::Unsupported, "needs Linux 6.16+"))
            }
        }
        fn resize(&self, size: u64) -> Result<(), CtlError> {
            if self.fail {
                return Err(CtlError::new(ErrorCode::Io, "driver said no"));
            }
            self.sizes.lock().push(size);
            Ok(())
        }
    }

    fn served(vol: &Volume, supported: bool, fail: bool) -> (VolumeService, Arc<Mutex<Vec<u64>>>) {
        let sizes = Arc::new(Mutex::new(vec![]));
        let device = DeviceInfo {
            path: "/dev/fake0".into(),
            major: 259,
            minor: 0,
            mode: "copy".into(),
        };
        let svc = VolumeService::new(vol.clone(), Some(device), None, None).with_resizer(Box::new(
            FakeResizer {
                supported,
                fail,
                sizes: sizes.clone(),
            },
        ));
        (svc, sizes)
    }

    fn resize(size: u64) -> Command {
        Command::VolumeResize(ResizeArgs { size })
    }

    #[test]
    fn resize_grows_the_volume_then_the_device_or_nothing() {
        let tmp = tempfile::tempdir().expect("tmp");
        let vol = small_volume(tmp.path());

        // The device cannot follow: refused, and the volume did not grow either.
        let (svc, sizes) = served(&vol, false, false);
        let e = svc.handle(1, resize(2 << 20)).expect_err("unsupported");
        assert_eq!(e.code, ErrorCode::Unsupported);
        assert_eq!(vol.size(), 1 << 20);
        assert!(sizes.lock().is_empty());

        // It can: both grow; shrinking and bad sizes are refused.
        let (svc, sizes) = served(&vol, true, false);
        let r = svc.handle(1, resize(2 << 20)).expect("grow");
        assert_eq!(r, json!({ "size": 2 << 20, "device_resized": true }));
        assert_eq!(vol.size(), 2 << 20);
        assert_eq!(*sizes.lock(), vec![2 << 20]);
        let e = svc.handle(1, resize(1 << 20)).expect_err("shrink");
        assert_eq!(e.code, ErrorCode::BadRequest);
        assert!(e.message.contains("shrink"), "{}", e.message);
        let e = svc.handle(1, resize((3 << 20) + 1)).expect_err("unaligned");
        assert_eq!(e.code, ErrorCode::BadRequest);
        assert_eq!(vol.size(), 2 << 20);

        // The device fails after the volume grew: said so, and a retry catches up.
        let (svc, _) = served(&vol, true, true);
        let e = svc.handle(1, resize(3 << 20)).expect_err("device failed");
        assert_eq!(e.code, ErrorCode::Io);
        assert!(e.message.contains("the volume grew"), "{}", e.message);
        assert!(e.message.contains("/dev/fake0"), "{}", e.message);
        assert_eq!(vol.size(), 3 << 20);
        let (svc, sizes) = served(&vol, true, false);
        svc.handle(1, resize(3 << 20)).expect("retry");
        assert_eq!(*sizes.lock(), vec![3 << 20]);

        // Not served as a device: only the volume grows.
        let plain = VolumeService::new(vol.clone(), None, None, None);
        let r = plain.handle(1, resize(4 << 20)).expect("grow");
        assert_eq!(r["device_resized"], false);
        assert_eq!(vol.size(), 4 << 20);
    }

    #[test]
    fn stats_report_snapshots_space_and_requests() {
        let tmp = tempfile::tempdir().expect("tmp");
        let vol = small_volume(tmp.path());
        vol.write(0, &[1u8; 8192], false).expect("write");
        let io = Arc::new(IoStats::new(2));
        io.queue(1).record(
            crate::stats::Direction::Write,
            8192,
            false,
            Duration::from_micros(50),
        );
        let svc = VolumeService::new(vol.clone(), None, None, None).with_io_stats(io.clone());
        let before: VolumeStats =
            serde_json::from_value(svc.handle(1, Command::Stats).expect("stats")).expect("parse");
        assert_eq!(before.volume_id, vol.status().volume_id);
        assert_eq!((before.snapshots, before.snapshots_created), (0, 0));
        assert_eq!(before.stored_bytes, 8192);
        assert_eq!(before.size_bytes, 1 << 20);
        assert_eq!(before.io["write"].requests, 1);
        assert_eq!(before.io["write"].bytes, 8192);
        assert_eq!(before.freeze.count(), 0);
        svc.handle(1, create_args("s1")).expect("snapshot");
        // The same name again is the same snapshot: not counted twice.
        svc.handle(1, create_args("s1")).expect("again");
        io.queue(0).record(
            crate::stats::Direction::Read,
            4096,
            false,
            Duration::from_micros(20),
        );
        let after = svc.stats();
        assert_eq!((after.snapshots, after.snapshots_created), (1, 1));
        assert_eq!(after.io["read"].requests, 1);
        assert!(after.uptime_seconds >= before.uptime_seconds);
        // Nothing mounted, nothing frozen.
        assert_eq!(after.freeze.count(), 0);

        // A daemon with no device reports no requests.
        let plain = VolumeService::new(vol, None, None, None);
        assert!(plain.stats().io.is_empty());
    }

    #[test]
    fn full_disk_errors_say_no_space() {
        let full = EngineError::Io {
            path: "/x/volume.tmp".into(),
            err: std::io::Error::from_raw_os_error(libc::ENOSPC),
        };
        assert_eq!(engine_error(full).code, ErrorCode::NoSpace);
        let failing = EngineError::Io {
            path: "/x/volume.tmp".into(),
            err: std::io::Error::from_raw_os_error(libc::EIO),
        };
        assert_eq!(engine_error(failing).code, ErrorCode::Io);
    }

    #[test]
    fn engine_errors_map_by_variant() {
        let e = engine_error(EngineError::InvalidName("snapshot name \"-x\"".into()));
        assert_eq!(e.code, ErrorCode::InvalidName);
        // Mentioning a snapshot name does not make an error an invalid name any more.
        let e = engine_error(EngineError::Invalid("the snapshot name is fine".into()));
        assert_eq!(e.code, ErrorCode::BadRequest);
        let e = engine_error(EngineError::AlreadyExists { path: "/x".into() });
        assert_eq!(e.code, ErrorCode::AlreadyExists);
    }
}
