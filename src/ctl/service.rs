//! What the control socket does for one served volume: status, snapshots with freeze
//! coordination, manual freeze/thaw. Blocking code (engine fsyncs, FIFREEZE): the server
//! runs it off its async runtime and off the ublk queue threads.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde_json::{json, Value};

use super::freeze::{self, FreezeGuard};
use super::protocol::{
    Command, CtlError, ErrorCode, FreezeArgs, FreezeMode, SnapshotCreateArgs,
    DEFAULT_FREEZE_TIMEOUT, MAX_FREEZE_TIMEOUT,
};
use crate::engine::{validate_snapshot_name, EngineError, Volume};

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
        EngineError::SnapshotNotFound(_) => ErrorCode::NotFound,
        EngineError::SnapshotExists(_) => ErrorCode::AlreadyExists,
        EngineError::Invalid(_) if e.to_string().contains("snapshot name") => {
            ErrorCode::InvalidName
        }
        EngineError::Invalid(_)
        | EngineError::OutOfRange { .. }
        | EngineError::Unaligned { .. } => ErrorCode::BadRequest,
        EngineError::Busy { .. } => ErrorCode::Busy,
        _ => ErrorCode::Io,
    };
    CtlError::new(code, e.to_string())
}

/// The control service of one volume.
pub struct VolumeService {
    volume: Volume,
    device: Option<DeviceInfo>,
    /// Program run as the freeze watchdog (this binary), if any.
    watchdog: Option<PathBuf>,
    /// Marker file naming what is frozen, read at start-up to thaw leftovers.
    marker: Option<PathBuf>,
    /// One snapshot operation at a time.
    snapshots: Mutex<()>,
    /// A freeze asked for with the `freeze` command, per connection id.
    manual: Mutex<Option<(u64, FreezeGuard)>>,
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
        VolumeService {
            volume,
            device,
            watchdog,
            marker,
            snapshots: Mutex::new(()),
            manual: Mutex::new(None),
        }
    }

    /// Runs `cmd` for connection `conn`; blocking.
    pub fn handle(&self, conn: u64, cmd: Command) -> Result<Value, CtlError> {
        match cmd {
            Command::Status => Ok(self.status()),
            Command::SnapshotList => Ok(json!({ "snapshots": self.volume.list_snapshots() })),
            Command::SnapshotShow(a) => self
                .volume
                .snapshot_info(&a.name)
                .map(|s| json!({ "snapshot": s }))
                .map_err(engine_error),
            Command::SnapshotDelete(a) => {
                let _one = self.snapshots.lock();
                self.volume.delete_snapshot(&a.name).map_err(engine_error)?;
                Ok(json!({ "deleted": a.name }))
            }
            Command::SnapshotCreate(a) => self.snapshot_create(a),
            Command::Freeze(a) => self.manual_freeze(conn, a),
            Command::Thaw(_) => self.manual_thaw(None),
        }
    }

    /// Thaws a manual freeze made by connection `conn` (called when it disconnects).
    pub fn connection_closed(&self, conn: u64) {
        if self.manual.lock().as_ref().is_some_and(|(c, _)| *c == conn) {
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
            "device": self.device,
            "frozen": self.manual.lock().as_ref().map(|(_, g)| g.mounts().to_vec()),
        })
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
                freeze::targets(dev, a.mount.as_deref().map(Path::new))?
            }
            (FreezeMode::Auto, None) => vec![],
        };
        let t0 = Instant::now();
        let guard = self.freeze(mounts, timeout)?;
        let frozen_at = Instant::now();
        let cut = self.volume.create_snapshot(&a.name);
        let expired = guard.expired();
        let frozen: Vec<PathBuf> = guard.mounts().to_vec();
        let thawed = guard.thaw();
        let frozen_for = match &thawed {
            Ok(at) if !frozen.is_empty() => at.duration_since(frozen_at),
            _ => Duration::ZERO,
        };
        let report = cut.map_err(engine_error)?;
        if expired {
            let _ = self.volume.delete_snapshot(&a.name);
            return Err(CtlError::new(
                ErrorCode::Timeout,
                format!("the snapshot took longer than the {} ms freeze deadline; it was discarded and the file system thawed", timeout.as_millis()),
            ));
        }
        thawed?;
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
            "frozen_ms": frozen_for.as_secs_f64() * 1e3,
            "freeze_ms": (frozen_at - t0).as_secs_f64() * 1e3,
            "cut_ms": report.total.as_secs_f64() * 1e3,
            "drain_ms": report.drain.as_secs_f64() * 1e3,
        }))
    }

    /// Freezes `mounts` with this service's watchdog and marker.
    fn freeze(&self, mounts: Vec<PathBuf>, timeout: Duration) -> Result<FreezeGuard, CtlError> {
        FreezeGuard::freeze(
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
        let mounts = freeze::targets(dev, a.mount.as_deref().map(Path::new))?;
        if mounts.is_empty() {
            return Err(CtlError::new(
                ErrorCode::NotFound,
                "no file system is mounted from this volume's device",
            ));
        }
        let guard = self.freeze(mounts, timeout)?;
        let frozen = guard.mounts().to_vec();
        *manual = Some((conn, guard));
        Ok(json!({ "frozen": frozen, "timeout_ms": timeout.as_millis() as u64 }))
    }

    fn manual_thaw(&self, only_conn: Option<u64>) -> Result<Value, CtlError> {
        let mut manual = self.manual.lock();
        match manual.take() {
            Some((c, g)) if only_conn.is_none_or(|o| o == c) => {
                let mounts = g.mounts().to_vec();
                g.thaw()?;
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
