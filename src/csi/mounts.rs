//! What the node plugin does to a node's block devices and mounts: find a device's file
//! system, make one (only where there is none), mount, bind, unmount and grow. File system
//! tools are the ones the node's distribution ships (blkid, mkfs.*, mount, resize2fs,
//! xfs_growfs); mounts and binds are system calls.

use std::path::Path;
use std::process::Command;

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use tonic::Status;

use crate::sys::mountinfo;

/// Runs a command; its stderr is the error.
fn run(cmd: &mut Command) -> Result<String, Status> {
    let shown = format!("{cmd:?}").replace('"', "");
    let out = cmd.output().map_err(|e| {
        Status::internal(format!(
            "cannot run {shown}: {e} (is it installed on the node?)"
        ))
    })?;
    if !out.status.success() {
        // The first lines say what went wrong; tools print their usage after them.
        let stderr = String::from_utf8_lossy(&out.stderr);
        let said: Vec<&str> = stderr.lines().take(3).collect();
        return Err(Status::internal(format!(
            "{shown} failed ({}): {}",
            out.status,
            said.join(" | ").trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The file system (or other signature: a partition table, LVM, RAID) on `device`, if any.
/// Anything found means the device holds data and must never be formatted.
pub fn signature(device: &str) -> Result<Option<String>, Status> {
    let out = Command::new("blkid")
        .args(["-p", "-o", "value", "-s", "TYPE", device])
        .output()
        .map_err(|e| Status::internal(format!("cannot run blkid: {e} (util-linux)")))?;
    match out.status.code() {
        Some(0) => {
            let t = String::from_utf8_lossy(&out.stdout).trim().to_string();
            // blkid says 0 with no TYPE for signatures it knows only by usage (e.g. a
            // partition table): still data.
            Ok(Some(if t.is_empty() { "unknown".into() } else { t }))
        }
        // 2: no signature found.
        Some(2) => Ok(None),
        _ => Err(Status::internal(format!(
            "blkid {device} failed ({}): {}; not formatting a device whose content is unknown",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))),
    }
}

/// Makes file system `fs` on the empty `device`.
pub fn mkfs(fs: &str, device: &str) -> Result<(), Status> {
    let mut cmd = match fs {
        // The device is new and thin: nothing to discard, and lazy init keeps the first
        // stage fast.
        "ext4" => {
            let mut c = Command::new("mkfs.ext4");
            c.args([
                "-q",
                "-F",
                "-E",
                "lazy_itable_init=1,lazy_journal_init=1,nodiscard",
                device,
            ]);
            c
        }
        "xfs" => {
            let mut c = Command::new("mkfs.xfs");
            c.args(["-q", "-K", device]);
            c
        }
        other => {
            return Err(Status::invalid_argument(format!(
                "file system {other:?} is not supported"
            )))
        }
    };
    run(&mut cmd).map(|_| ())
}

/// Mounts the file system `fs` of `device` on `target` with the CO's `flags`.
pub fn mount_fs(device: &str, target: &Path, fs: &str, flags: &[String]) -> Result<(), Status> {
    let mut opts: Vec<String> = flags.to_vec();
    // A restored or cloned XFS has its source's UUID, and both may be mounted here.
    if fs == "xfs" && !opts.iter().any(|o| o == "nouuid") {
        opts.push("nouuid".into());
    }
    let mut cmd = Command::new("mount");
    cmd.arg("-t").arg(fs);
    if !opts.is_empty() {
        cmd.arg("-o").arg(opts.join(","));
    }
    cmd.arg(device).arg(target);
    run(&mut cmd).map(|_| ())
}

/// Bind-mounts `source` on `target`, read-only when asked.
pub fn bind(source: &Path, target: &Path, readonly: bool) -> Result<(), Status> {
    let err = |what: &str, e: nix::Error| {
        Status::internal(format!(
            "{what} {} on {}: {e}",
            source.display(),
            target.display()
        ))
    };
    mount(
        Some(source),
        target,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(|e| err("bind-mounting", e))?;
    if readonly {
        let ro = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
        if let Err(e) = mount(None::<&str>, target, None::<&str>, ro, None::<&str>) {
            let _ = umount2(target, MntFlags::empty());
            return Err(err("making read-only the bind of", e));
        }
    }
    Ok(())
}

/// Unmounts everything mounted on `target` (nothing to do when nothing is).
pub fn unmount_all(target: &Path) -> Result<(), Status> {
    for _ in 0..16 {
        match mountinfo::at(target) {
            Ok(Some(_)) => {}
            Ok(None) => return Ok(()),
            Err(e) => return Err(Status::internal(format!("reading mountinfo: {e}"))),
        }
        if let Err(e) = umount2(target, MntFlags::empty()) {
            let code = if e == nix::Error::EBUSY {
                tonic::Code::FailedPrecondition
            } else {
                tonic::Code::Internal
            };
            return Err(Status::new(
                code,
                format!("unmounting {}: {e}", target.display()),
            ));
        }
    }
    Err(Status::internal(format!(
        "{} still has mounts after 16 unmounts",
        target.display()
    )))
}

/// Grows the file system `fs` of `device`, mounted at `mount_point`, to the device's size.
pub fn grow_fs(fs: &str, device: &str, mount_point: &Path) -> Result<(), Status> {
    let mut cmd = match fs {
        "ext4" | "ext3" | "ext2" => {
            let mut c = Command::new("resize2fs");
            c.arg(device);
            c
        }
        "xfs" => {
            let mut c = Command::new("xfs_growfs");
            c.arg(mount_point);
            c
        }
        other => {
            return Err(Status::invalid_argument(format!(
                "cannot grow file system {other:?}"
            )))
        }
    };
    run(&mut cmd).map(|_| ())
}

/// Size in bytes of the block device `device`.
pub fn device_size(device: &str) -> Result<u64, Status> {
    run(Command::new("blockdev").args(["--getsize64", device]))?
        .parse()
        .map_err(|e| Status::internal(format!("blockdev --getsize64 {device}: {e}")))
}
