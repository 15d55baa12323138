//! Taking over a device whose daemon died (`--recover`): finding it through libublk's
//! per-device json, and checking that it waits for a new daemon, fits the volume, and was
//! made for this very volume. The last check does not trust the json (a file under /run
//! that may be gone or stale): each device carries its volume's tag in the
//! `ublksrv_flags` of its device info, which the kernel keeps unchanged from ADD_DEV to
//! the device's deletion, daemon deaths included.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use libublk::ctrl::UblkCtrl;
use libublk::sys;
use serde_json::{json, Value};
use tracing::{debug, info, warn};

use super::error::{Result, UblkLayerError};

/// How long to wait for the driver to notice that the old daemon is gone.
const QUIESCE_WAIT: Duration = Duration::from_secs(15);

/// Target data stored in libublk's device json: which volume the device serves.
pub fn target_json(volume_dir: &Path, name: &str) -> Value {
    json!({ "snapblk": { "volume": volume_dir.to_string_lossy(), "name": name } })
}

/// The volume folder named by a device json (as written by libublk).
pub fn volume_of_device_json(dev_json: &Value) -> Option<PathBuf> {
    dev_json
        .get("target_data")?
        .get("snapblk")?
        .get("volume")?
        .as_str()
        .map(PathBuf::from)
}

/// Where libublk keeps the json of device `id` under `run_dir`.
pub fn device_json_path(run_dir: &Path, id: u32) -> PathBuf {
    run_dir.join(format!("{id:04}.json"))
}

/// Reads the json libublk keeps for device `id` under `run_dir`.
pub fn read_device_json(run_dir: &Path, id: u32) -> Option<Value> {
    let text = std::fs::read_to_string(device_json_path(run_dir, id)).ok()?;
    serde_json::from_str(&text).ok()
}

/// Every device json under `run_dir` (files `NNNN.json`), with its device id.
pub fn device_jsons(run_dir: &Path) -> Vec<(u32, Value)> {
    let Ok(entries) = std::fs::read_dir(run_dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name();
            let id: u32 = name.to_str()?.strip_suffix(".json")?.parse().ok()?;
            Some((id, read_device_json(run_dir, id)?))
        })
        .collect()
}

/// Ids of the devices whose json under `run_dir` names `volume_dir`, ascending.
pub fn find_devices_for_volume(run_dir: &Path, volume_dir: &Path) -> Vec<u32> {
    let mut ids: Vec<u32> = device_jsons(run_dir)
        .into_iter()
        .filter(|(_, v)| volume_of_device_json(v).as_deref() == Some(volume_dir))
        .map(|(id, _)| id)
        .collect();
    ids.sort_unstable();
    ids
}

/// The folder where libublk keeps device json files.
pub fn run_dir() -> PathBuf {
    PathBuf::from(UblkCtrl::run_dir())
}

/// Picks the device to recover for `volume_dir`: `requested`, or the one libublk's
/// json names. Refuses a requested device whose json names another volume.
pub fn choose_device(volume_dir: &Path, requested: Option<u32>) -> Result<u32> {
    let dir = run_dir();
    if let Some(id) = requested {
        if let Some(other) = read_device_json(&dir, id).and_then(|v| volume_of_device_json(&v)) {
            if other != volume_dir {
                return Err(UblkLayerError::Recover(format!(
                    "device {id} serves volume {}, not {}",
                    other.display(),
                    volume_dir.display()
                )));
            }
        }
        return Ok(id);
    }
    match find_devices_for_volume(&dir, volume_dir).as_slice() {
        [] => Err(UblkLayerError::Recover(format!(
            "no ublk device for volume {} is recorded under {}; pass --id N",
            volume_dir.display(),
            dir.display()
        ))),
        [id] => Ok(*id),
        many => Err(UblkLayerError::Recover(format!(
            "several devices ({many:?}) are recorded for volume {}; pass --id N",
            volume_dir.display()
        ))),
    }
}

/// The identity tag of volume `volume_id` stored with its device: 64 bits of the SHA-256
/// of the id, never 0 (0 marks a device without a tag: a snapshot device, or one made by
/// an older snapblk).
pub fn volume_tag(volume_id: &str) -> u64 {
    use sha2::Digest;
    let d = sha2::Sha256::digest(volume_id.as_bytes());
    let mut b = [0u8; 8];
    b.copy_from_slice(&d[..8]);
    u64::from_le_bytes(b).max(1)
}

/// Whether libublk's json of device `id` names the volume in `volume_dir`.
pub fn recorded_for(id: u32, volume_dir: &Path) -> bool {
    read_device_json(&run_dir(), id)
        .and_then(|v| volume_of_device_json(&v))
        .as_deref()
        == Some(volume_dir)
}

/// Checks that device `id`, whose device info carries `found` (its `ublksrv_flags`), was
/// made for the volume whose tag is `want`. A device without a tag (made by an older
/// snapblk) is accepted only when libublk's json names this volume (`recorded`).
pub fn check_owner(
    id: u32,
    found: u64,
    want: u64,
    recorded: bool,
    volume_dir: &Path,
) -> Result<()> {
    if found == want || (found == 0 && recorded) {
        return Ok(());
    }
    let why = if found == 0 {
        format!(
            "it carries no volume identity (made by an older snapblk, or not by snapblk) and \
             no record under {} says it serves this volume",
            run_dir().display()
        )
    } else {
        format!(
            "it was made for another volume (identity tag {found:#018x}; this volume's is \
             {want:#018x})"
        )
    };
    Err(UblkLayerError::Recover(format!(
        "device {id} is not the device of volume {}: {why}; refusing to take it over",
        volume_dir.display()
    )))
}

/// Whether process `pid` exists.
fn process_alive(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    // SAFETY: kill with signal 0 only checks for the process.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Waits until device `id` has lost its daemon (QUIESCED, or FAIL_IO) and checks it
/// was created for recovery and matches the volume's geometry. Returns its info.
pub fn wait_recoverable(id: u32, size: u64, block_size: u32) -> Result<sys::ublksrv_ctrl_dev_info> {
    let id_i32 = i32::try_from(id)
        .map_err(|_| UblkLayerError::InvalidOption(format!("device id {id} is too large")))?;
    let ctrl = UblkCtrl::new_simple(id_i32).map_err(|e| {
        UblkLayerError::Recover(format!(
            "device {id} does not exist ({})",
            super::error::describe_ublk_error(&e)
        ))
    })?;
    let deadline = Instant::now() + QUIESCE_WAIT;
    let info = loop {
        ctrl.read_dev_info()
            .map_err(|e| UblkLayerError::ublk("read device info", e))?;
        let info = ctrl.dev_info();
        let state = u32::from(info.state);
        if state == sys::UBLK_S_DEV_QUIESCED || state == sys::UBLK_S_DEV_FAIL_IO {
            break info;
        }
        if state == sys::UBLK_S_DEV_DEAD {
            return Err(UblkLayerError::Recover(format!(
                "device {id} is stopped, not waiting for a new daemon"
            )));
        }
        if process_alive(info.ublksrv_pid) && info.ublksrv_pid != std::process::id() as i32 {
            return Err(UblkLayerError::Recover(format!(
                "device {id} is live, served by process {}",
                info.ublksrv_pid
            )));
        }
        if Instant::now() > deadline {
            return Err(UblkLayerError::Recover(format!(
                "device {id} is still live {}s after its daemon died",
                QUIESCE_WAIT.as_secs()
            )));
        }
        debug!(state, "waiting for the driver to quiesce the device");
        std::thread::sleep(Duration::from_millis(100));
    };
    if info.flags & u64::from(sys::UBLK_F_USER_RECOVERY) == 0 {
        return Err(UblkLayerError::Recover(format!(
            "device {id} was not created with UBLK_F_USER_RECOVERY"
        )));
    }
    let mut p = sys::ublk_params {
        len: std::mem::size_of::<sys::ublk_params>() as u32,
        types: sys::UBLK_PARAM_TYPE_BASIC,
        ..Default::default()
    };
    ctrl.get_params(&mut p)
        .map_err(|e| UblkLayerError::ublk("get device parameters", e))?;
    let want_sectors = size >> 9;
    let want_shift = block_size.trailing_zeros();
    // A device smaller than the volume is fine (the volume grew while the device waited
    // for a daemon, or a device resize failed): it just shows less until served anew.
    if p.basic.dev_sectors > want_sectors || u32::from(p.basic.logical_bs_shift) != want_shift {
        return Err(UblkLayerError::Recover(format!(
            "device {id} has {} sectors of {} bytes, the volume {} bytes in blocks of {block_size}",
            p.basic.dev_sectors,
            1u64 << p.basic.logical_bs_shift.min(63),
            size
        )));
    }
    if p.basic.dev_sectors < want_sectors {
        warn!(
            device_bytes = p.basic.dev_sectors << 9,
            volume_bytes = size,
            "the device is smaller than the volume (grown meanwhile): it keeps its size until \
             the volume is resized through the control socket or served anew"
        );
    }
    info!(
        queues = info.nr_hw_queues,
        depth = info.queue_depth,
        flags = format_args!("{:#x}", info.flags),
        "device is waiting for a new daemon"
    );
    Ok(info)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_json(dir: &Path, id: u32, v: &Value) {
        std::fs::write(device_json_path(dir, id), v.to_string()).expect("write");
    }

    #[test]
    fn finds_devices_by_volume() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let a = Path::new("/vols/a");
        let b = Path::new("/vols/b");
        write_json(
            tmp.path(),
            0,
            &json!({"dev_info": {}, "target_data": target_json(a, "a")}),
        );
        write_json(tmp.path(), 3, &json!({"target_data": target_json(b, "b")}));
        write_json(tmp.path(), 12, &json!({"target_data": target_json(a, "a")}));
        write_json(tmp.path(), 5, &json!({"target_data": {"loop": {}}}));
        std::fs::write(tmp.path().join("junk.json"), "{").expect("write");
        std::fs::write(tmp.path().join("0007.json"), "not json").expect("write");
        assert_eq!(find_devices_for_volume(tmp.path(), a), vec![0, 12]);
        assert_eq!(find_devices_for_volume(tmp.path(), b), vec![3]);
        assert!(find_devices_for_volume(tmp.path(), Path::new("/vols/c")).is_empty());
        assert!(find_devices_for_volume(Path::new("/nonexistent/run"), a).is_empty());
    }

    #[test]
    fn only_the_volume_s_own_device_is_taken_over() {
        let dir = Path::new("/vols/a");
        let a = volume_tag("0123456789abcdef0123456789abcdef");
        let b = volume_tag("fedcba9876543210fedcba9876543210");
        assert_ne!(a, b);
        assert_ne!(a, 0);
        assert_eq!(a, volume_tag("0123456789abcdef0123456789abcdef"));
        check_owner(3, a, a, false, dir).expect("its own device, json gone");
        let e = check_owner(3, b, a, false, dir).expect_err("another volume's device");
        assert!(e.to_string().contains("made for another volume"), "{e}");
        // Even a json naming this volume does not override the kernel's tag.
        check_owner(3, b, a, true, dir).expect_err("stale json");
        // Untagged (older) devices need the json.
        check_owner(3, 0, a, true, dir).expect("older device recorded for this volume");
        let e = check_owner(3, 0, a, false, dir).expect_err("unverifiable");
        assert!(e.to_string().contains("no volume identity"), "{e}");
    }

    #[test]
    fn json_round_trip() {
        let v = json!({"target_data": target_json(Path::new("/x/y z"), "y z")});
        assert_eq!(volume_of_device_json(&v), Some(PathBuf::from("/x/y z")));
        assert_eq!(volume_of_device_json(&json!({})), None);
    }
}
