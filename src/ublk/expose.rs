//! Serving one snapshot of a served volume as a read-only ublk device, for a backup
//! tool to read or mount, beside the volume's own device and in the same daemon.
//!
//! A snapshot device has no user recovery: if the daemon dies it goes away (its I/O
//! fails) instead of waiting, and the next daemon of the volume deletes what is left of
//! it ([`remove_leftovers`]). Exposing again after a restart is the caller's choice.

use std::path::Path;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam::channel::{self, Receiver, RecvTimeoutError, Sender};
use libublk::ctrl::UblkCtrl;
use serde_json::{json, Value};
use tracing::{error, info, info_span, warn};

use crate::engine::{SnapshotView, Volume};
use crate::stats::IoStats;

use super::device::{
    abandon_device, add_ctrl, check_options, queues_ended, remove_device, run_device, DeviceSpec,
    ServeOptions, StopReason,
};
use super::error::{describe_ublk_error, Result, UblkLayerError};
use super::features::DataMode;
use super::params::{self, MAX_IO_BYTES};
use super::recover;

/// How long exposing waits for the new device to go live.
const START_LIMIT: Duration = Duration::from_secs(60);

/// How often the device thread checks its queues while exposed.
const POLL: Duration = Duration::from_millis(200);

/// Key of the target data that marks a device json as a snapshot device.
const JSON_KEY: &str = "snapblk-snapshot";

/// How to expose a snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExposeOptions {
    /// Hardware queues (one thread each).
    pub queues: u16,
    /// Requests in flight per queue.
    pub depth: u16,
    /// Copy mode even if the driver offers zero copy.
    pub force_copy: bool,
    /// Keep libublk's per-queue CPU pinning.
    pub pin_queues: bool,
}

impl Default for ExposeOptions {
    /// A reader's device: one queue is plenty for a backup stream or a mount.
    fn default() -> Self {
        ExposeOptions {
            queues: 1,
            depth: 64,
            force_copy: false,
            pin_queues: false,
        }
    }
}

/// A snapshot served as a read-only device until [`ExposedDevice::stop`] (or drop).
pub struct ExposedDevice {
    dev_id: u32,
    bdev_path: String,
    mode: DataMode,
    stop: Option<Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for ExposedDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExposedDevice")
            .field("dev_id", &self.dev_id)
            .field("bdev_path", &self.bdev_path)
            .finish()
    }
}

impl ExposedDevice {
    /// The device id N of /dev/ublkbN.
    pub fn dev_id(&self) -> u32 {
        self.dev_id
    }

    /// The block device node.
    pub fn bdev_path(&self) -> &str {
        &self.bdev_path
    }

    /// Copy or zero copy.
    pub fn mode(&self) -> DataMode {
        self.mode
    }

    /// Stops and deletes the device; returns once it is gone. A file system still
    /// mounted on it gets I/O errors until unmounted.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        // Dropping the sender wakes the device thread.
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                error!(bdev = %self.bdev_path, "the snapshot device thread panicked");
            }
        }
    }
}

impl Drop for ExposedDevice {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The device json's target data for snapshot `snapshot` of the volume in `volume_dir`
/// (a key of its own, so `--recover` never mistakes it for the volume's device).
fn target_json(volume_dir: &Path, snapshot: &str) -> Value {
    json!({ JSON_KEY: { "volume": volume_dir.to_string_lossy(), "snapshot": snapshot } })
}

/// Serves `view` (snapshot `snapshot` of `volume`) as a new read-only ublk device and
/// returns once it is live. Must be called from a thread that has SIGTERM/SIGINT blocked
/// (any thread started after [`super::serve`] began), like every daemon thread.
pub fn expose(
    volume: &Volume,
    view: SnapshotView,
    snapshot: &str,
    opts: &ExposeOptions,
) -> Result<ExposedDevice> {
    let serve_opts = ServeOptions {
        volume_dir: volume.dir().to_path_buf(),
        dev_id: None,
        queues: opts.queues,
        depth: opts.depth,
        recover: false,
        force_copy: opts.force_copy,
        buffered: false,
        pin_queues: opts.pin_queues,
    };
    check_options(&serve_opts)?;
    let volume_dir =
        std::fs::canonicalize(volume.dir()).unwrap_or_else(|_| volume.dir().to_path_buf());
    // The snapshot's own size: the volume may have grown since it was taken.
    let params = params::device_params(view.size(), volume.block_size(), MAX_IO_BYTES, true)?;
    let (ready_tx, ready_rx) = channel::bounded::<Result<(u32, String, DataMode)>>(1);
    let (stop_tx, stop_rx) = channel::bounded::<()>(0);
    let volume = volume.clone();
    let name = snapshot.to_string();
    let thread = std::thread::Builder::new()
        .name("snapblk-expose".into())
        .spawn(move || {
            run_exposed(
                &serve_opts,
                volume,
                view,
                &name,
                &volume_dir,
                params,
                ready_tx,
                stop_rx,
            )
        })
        .map_err(|source| UblkLayerError::Sys {
            op: "spawn the snapshot device thread",
            source,
        })?;
    let (dev_id, bdev_path, mode) = match ready_rx.recv_timeout(START_LIMIT) {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => {
            let _ = thread.join();
            return Err(e);
        }
        Err(_) => {
            // Left to finish on its own: it stops as soon as it sees no one holds the
            // stop channel.
            return Err(UblkLayerError::InvalidOption(format!(
                "the snapshot device did not come up within {} s",
                START_LIMIT.as_secs()
            )));
        }
    };
    Ok(ExposedDevice {
        dev_id,
        bdev_path,
        mode,
        stop: Some(stop_tx),
        thread: Some(thread),
    })
}

/// The body of a snapshot device's thread: add the device, serve until asked to stop
/// (or until a queue ends), delete it.
#[allow(clippy::too_many_arguments)]
fn run_exposed(
    opts: &ServeOptions,
    volume: Volume,
    view: SnapshotView,
    snapshot: &str,
    volume_dir: &Path,
    params: libublk::sys::ublk_params,
    ready: Sender<Result<(u32, String, DataMode)>>,
    stop: Receiver<()>,
) {
    let span =
        info_span!("ublk", dev_id = tracing::field::Empty, volume = %volume.name(), snapshot);
    let _g = span.enter();
    let (ctrl, mode) = match add_ctrl(opts, false, 0) {
        Ok(c) => c,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let info = ctrl.dev_info();
    span.record("dev_id", info.dev_id);
    let bdev = ctrl.get_bdev_path();
    let spec = DeviceSpec {
        volume,
        snapshot: Some(view),
        mode,
        params,
        target: target_json(volume_dir, snapshot),
        span: span.clone(),
        pin_queues: opts.pin_queues,
        // Counted but not reported: metrics cover the volume's own device.
        stats: Arc::new(IoStats::new(usize::from(info.nr_hw_queues))),
    };
    let ready_live = ready.clone();
    let live_bdev = bdev.clone();
    let dev_id = info.dev_id;
    let run = run_device(&ctrl, spec, move |exited, nr_queues| {
        info!("snapshot exposed read-only");
        let _ = ready_live.send(Ok((dev_id, live_bdev, mode)));
        wait_for_unexpose(&stop, exited, nr_queues)
    });
    match run {
        Ok(_) => {
            remove_device(&ctrl);
            info!("snapshot device removed");
        }
        Err(e) => {
            abandon_device(&ctrl, false);
            // Nobody waits any more if the device had gone live; then this only logs.
            let _ = ready.send(Err(e));
        }
    }
}

/// Blocks until the daemon unexposes the snapshot, or a queue thread ends on its own.
fn wait_for_unexpose(stop: &Receiver<()>, exited: &AtomicUsize, nr_queues: usize) -> StopReason {
    loop {
        match stop.recv_timeout(POLL) {
            Ok(()) | Err(RecvTimeoutError::Disconnected) => return StopReason::Asked,
            Err(RecvTimeoutError::Timeout) => {}
        }
        if let Some(ended) = queues_ended(exited, nr_queues) {
            return ended;
        }
    }
}

/// Deletes snapshot devices of the volume in `volume_dir` left by a daemon that died
/// (they no longer serve anything). Returns how many were deleted.
pub fn remove_leftovers(volume_dir: &Path) -> usize {
    let run_dir = recover::run_dir();
    let mut removed = 0;
    for (id, json) in recover::device_jsons(&run_dir) {
        let Some(t) = json.get("target_data").and_then(|t| t.get(JSON_KEY)) else {
            continue;
        };
        if t.get("volume").and_then(Value::as_str).map(Path::new) != Some(volume_dir) {
            continue;
        }
        let Ok(id_i32) = i32::try_from(id) else {
            continue;
        };
        match UblkCtrl::new_simple(id_i32) {
            Ok(ctrl) => {
                let snapshot = t.get("snapshot").and_then(|v| v.as_str()).unwrap_or("?");
                warn!(
                    dev_id = id,
                    snapshot,
                    "deleting a snapshot device left by a daemon that died; expose it again if needed"
                );
                remove_device(&ctrl);
                let _ = std::fs::remove_file(recover::device_json_path(&run_dir, id));
                removed += 1;
            }
            Err(err) => {
                warn!(dev_id = id, error = %describe_ublk_error(&err), "a leftover snapshot device cannot be opened");
            }
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_json_is_not_a_volume_device() {
        let j = json!({ "target_data": target_json(Path::new("/v/a"), "s1") });
        // `--recover` looks devices up by this; a snapshot device must never match.
        assert_eq!(recover::volume_of_device_json(&j), None);
        assert_eq!(j["target_data"][JSON_KEY]["snapshot"].as_str(), Some("s1"));
    }
}
