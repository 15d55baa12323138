//! `snapblk serve`: serve a volume as a ublk block device until SIGTERM or SIGINT.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use clap::Args;
use parking_lot::Mutex;

use crate::ctl::protocol::{CtlError, ErrorCode};
use crate::ctl::server::{default_socket, Access, Bound, Limits, Server};
use crate::ctl::service::{
    marker_path, DeviceInfo, DeviceResizer, Exposed, SnapshotExposer, VolumeService,
};
use crate::engine::{SnapshotView, Volume};
use crate::stats::IoStats;
use crate::sys::mountinfo;
use crate::ublk::{self, ExposeOptions, ExposedDevice, ServeOptions, ServingDevice};

/// The control socket and its service, once the device is live.
type ControlSlot = Arc<Mutex<Option<(Server, Arc<VolumeService>)>>>;

/// Snapshot devices made by the ublk layer, for the control service.
struct UblkExposer {
    volume: Volume,
    opts: ExposeOptions,
}

impl SnapshotExposer for UblkExposer {
    fn expose(&self, name: &str, view: SnapshotView) -> Result<Box<dyn Exposed>, CtlError> {
        match ublk::expose(&self.volume, view, name, &self.opts) {
            Ok(dev) => Ok(Box::new(dev)),
            Err(e) => Err(CtlError::new(
                ErrorCode::Io,
                format!("cannot expose snapshot {name:?}: {e}"),
            )),
        }
    }
}

/// Grows the volume's ublk device, for the control service.
struct UblkResizer {
    dev_id: u32,
    path: String,
}

impl DeviceResizer for UblkResizer {
    fn check(&self) -> Result<(), CtlError> {
        if ublk::features::can_update_size(ublk::features::query_driver_features()) {
            return Ok(());
        }
        Err(CtlError::new(
            ErrorCode::Unsupported,
            format!(
                "growing a served volume needs Linux 6.16+ (the ublk driver's UBLK_F_UPDATE_SIZE, \
                 to tell the kernel {} has grown); this driver lacks it, so nothing was changed. \
                 Grow the volume while it is not served: stop the daemon, run \
                 `snapblk volume resize DIR --size SIZE`, and serve it again",
                self.path
            ),
        ))
    }

    fn resize(&self, size: u64) -> Result<(), CtlError> {
        ublk::resize_device(self.dev_id, size)
            .map_err(|e| CtlError::new(ErrorCode::Io, e.to_string()))
    }
}

impl Exposed for ExposedDevice {
    fn device(&self) -> &str {
        self.bdev_path()
    }
}

/// Arguments of `snapblk serve`.
///
/// Adds a ublk device for the volume (the ublk_drv module must be loaded), prints
/// `serving volume NAME as /dev/ublkbN` on stdout once it is live, and serves until
/// SIGTERM or SIGINT; then it stops the device, flushes the volume and deletes the
/// device. The logical block size is the volume's. Zero copy is used when the kernel
/// offers it (Linux 6.16+), copy mode otherwise. Nothing is created if the volume folder
/// is missing or damaged.
///
/// If the daemon is killed, the device stays (requests wait); `snapblk serve DIR
/// --recover` starts a new daemon on the same /dev/ublkbN, so a mounted file system
/// keeps working. If the device is still mounted when the daemon is stopped, the file
/// system is synced, then gets I/O errors until it is unmounted.
#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  snapblk serve /var/lib/snapblk/vol1\n  snapblk serve /var/lib/snapblk/vol1 --queues 2 --depth 64\n  snapblk serve /var/lib/snapblk/vol1 --recover          # after the daemon was killed\n  snapblk serve /var/lib/snapblk/vol1 --recover --id 3\n\nEnvironment:\n  SNAPBLK_HEAD_RESERVE  space written ahead of the head's first writes, so that writes\n                        after a snapshot are overwrites for the file system (default 64M,\n                        at most a quarter of the volume; 0 turns it off). `status` shows it.\n  SNAPBLK_VLOG_BUDGET   size of the head's volatile journal in /dev/shm (default 4M)\n\nLogs go to stderr; set RUST_LOG=debug for more."
)]
pub struct ServeArgs {
    /// The volume's folder (made with `snapblk volume create`).
    pub dir: PathBuf,

    /// Device id N for /dev/ublkbN [default: the driver picks a free one]. With
    /// --recover: the id of the device to take over [default: found from the json
    /// libublk keeps under /run/ublksrvd].
    #[arg(long, value_name = "N")]
    pub id: Option<u32>,

    /// Hardware queues, one serving thread each [default: number of CPUs, at most 4].
    #[arg(long, value_name = "N")]
    pub queues: Option<u16>,

    /// Requests in flight per queue.
    #[arg(long, value_name = "N", default_value_t = 128)]
    pub depth: u16,

    /// Take over the device of a daemon that died (killed, crashed) instead of adding
    /// a new one: same /dev/ublkbN, requests held meanwhile are sent again. Queues,
    /// depth and data mode are the device's. Only the device made for this volume is
    /// taken over: each device carries a tag of its volume's id that the kernel keeps
    /// with it (the device info's ublksrv_flags), checked even when libublk's json is
    /// gone; a device of another volume is refused.
    #[arg(long)]
    pub recover: bool,

    /// Copy request data through the daemon's memory even if the kernel offers zero
    /// copy (for comparisons).
    #[arg(long)]
    pub copy: bool,

    /// Read and write the layer files through the page cache. By default they use
    /// direct I/O (O_DIRECT) where the file system allows it for the volume's block
    /// size: no second cached copy of the data, and requests complete without
    /// io_uring's worker threads.
    #[arg(long)]
    pub buffered: bool,

    /// Keep each queue thread on the CPUs the kernel maps to its queue (libublk's
    /// placement: best locality when programs on every CPU submit I/O). By default a
    /// queue thread may run on any CPU the daemon may use (its own affinity, so
    /// taskset and cpusets still apply): when a queue maps to a single CPU, a pinned
    /// thread takes turns with the very program it serves instead of running beside it.
    #[arg(long)]
    pub pin_queues: bool,

    /// Control socket for snapshots, status and freezing [default:
    /// /run/snapblk/<hash>.sock, named by a hash of the volume's canonical folder, which
    /// `-V FOLDER` of the other commands finds]. The daemon binds it before it adds the
    /// device and does not serve without it (a socket another daemon answers on is
    /// refused). Mode 0600: only root (and the daemon's own user) may use it, unless
    /// --allow-uid/--allow-gid say otherwise.
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,

    /// Also let this uid use the control socket. Repeatable. The socket then carries a
    /// POSIX ACL granting each allowed uid and gid read and write (its file system must
    /// support ACLs: tmpfs, ext4 and xfs do), and the daemon checks each client's
    /// credentials (SO_PEERCRED) too. The socket's folders must be searchable by those
    /// users (/run/snapblk is created 0755).
    #[arg(long, value_name = "UID")]
    pub allow_uid: Vec<u32>,

    /// Also let members of this group (primary or supplementary) use the control socket.
    /// Repeatable. With a single --allow-gid and no --allow-uid the socket gets that group
    /// and mode 0660; otherwise a POSIX ACL, as for --allow-uid.
    #[arg(long, value_name = "GID")]
    pub allow_gid: Vec<u32>,
}

impl ServeArgs {
    /// The layer's options, with defaults filled in.
    pub fn options(&self) -> ServeOptions {
        ServeOptions {
            volume_dir: self.dir.clone(),
            dev_id: self.id,
            queues: self.queues.unwrap_or_else(ublk::default_queues),
            depth: self.depth,
            recover: self.recover,
            force_copy: self.copy,
            buffered: self.buffered,
            pin_queues: self.pin_queues,
        }
    }
}

/// The line printed once the device is live (scripts wait for it).
pub fn ready_line(dev: &ServingDevice) -> String {
    format!("serving volume {} as {}", dev.volume, dev.bdev_path)
}

/// Serves a volume; returns when the device has been removed.
pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    raise_open_file_limit();
    tune_allocator();
    let mut opts = args.options();
    // The volume by its canonical folder (`/x/vol/..` is named after what it resolves to);
    // a folder that cannot be resolved is reported by the ublk layer as before.
    if let Ok(dir) = std::fs::canonicalize(&args.dir) {
        opts.volume_dir = dir;
    }
    let control: ControlSlot = Arc::default();
    let slot = control.clone();
    let (force_copy, pin_queues) = (args.copy, args.pin_queues);
    let access = Access {
        uids: args.allow_uid.clone(),
        gids: args.allow_gid.clone(),
    };
    // The control socket is bound before the device is added: a daemon that cannot have
    // its socket (another daemon answers on it, a bad path) serves nothing. Clients that
    // connect meanwhile wait until the device is live.
    let path = match &args.socket {
        Some(p) => p.clone(),
        None => default_socket(&args.dir)?,
    };
    let bound = bind_control(&path, access, args.recover)?;
    let result = ublk::serve(&opts, move |dev, volume, io| {
        let expose = ExposeOptions {
            force_copy,
            pin_queues,
            ..ExposeOptions::default()
        };
        let server = start_control(dev, volume, io, bound, expose)
            .map_err(|e| format!("control socket {}: {e}", path.display()))?;
        *slot.lock() = Some(server);
        let mut out = std::io::stdout().lock();
        // A closed stdout must not stop the device: the line is informative.
        let _ = writeln!(out, "{}", ready_line(dev));
        let _ = out.flush();
        Ok(())
    });
    // The socket and the snapshot devices go away with the device.
    if let Some((server, service)) = control.lock().take() {
        drop(server);
        service.unexpose_all();
    }
    result?;
    Ok(())
}

/// How long `--recover` waits for a dying predecessor to let go of its socket.
const RECOVER_SOCKET_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Binds the control socket at `path`; with `recover`, waits a little for a dying
/// predecessor to release it.
fn bind_control(path: &std::path::Path, access: Access, recover: bool) -> anyhow::Result<Bound> {
    let deadline = std::time::Instant::now() + RECOVER_SOCKET_WAIT;
    loop {
        match Bound::bind(path, access.clone()) {
            Ok(b) => return Ok(b),
            Err(e)
                if e.code == ErrorCode::Busy && recover && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            Err(e) => anyhow::bail!("control socket {}: {e}; nothing was served", path.display()),
        }
    }
}

fn start_control(
    dev: &ServingDevice,
    volume: &Volume,
    io: &Arc<IoStats>,
    bound: Bound,
    expose: ExposeOptions,
) -> Result<(Server, Arc<VolumeService>), CtlError> {
    let path = bound.path().to_path_buf();
    let path = path.as_path();
    let (major, minor) =
        mountinfo::device_number(std::path::Path::new(&dev.bdev_path)).unwrap_or((0, 0));
    let device = DeviceInfo {
        path: dev.bdev_path.clone(),
        major,
        minor,
        mode: dev.mode.name().to_string(),
    };
    let watchdog = std::env::current_exe().ok();
    let exposer = UblkExposer {
        volume: volume.clone(),
        opts: expose,
    };
    let service = Arc::new(
        VolumeService::new(
            volume.clone(),
            Some(device),
            watchdog,
            Some(marker_path(path)),
        )
        .with_exposer(Box::new(exposer))
        .with_resizer(Box::new(UblkResizer {
            dev_id: dev.dev_id,
            path: dev.bdev_path.clone(),
        }))
        .with_io_stats(io.clone()),
    );
    let server = bound.serve(Limits::default(), service.clone())?;
    Ok((server, service))
}

/// A volume keeps its layer files open, one or two per snapshot: a thousand snapshots need
/// more than the usual soft limit of 1024 open files. The soft limit is raised to the hard
/// one (which only an administrator sets), as servers with many files do.
fn raise_open_file_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => tracing::debug!(from = soft, to = hard, "raised the open file limit"),
            Err(e) => {
                tracing::warn!(soft, hard, error = %e, "could not raise the open file limit; volumes with many snapshots may run out of file descriptors")
            }
        },
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "could not read the open file limit"),
    }
}

/// A daemon lives for months, so its memory should follow what it holds. glibc raises its
/// mmap threshold each time a large block is freed (up to 32 MiB), after which the
/// transient buffers of merges, streams and the head's preparer come from per-thread
/// arenas that seldom shrink, and the resident size drifts up with the threads that
/// happened to run. A fixed threshold keeps blocks of 256 KiB and more (those buffers,
/// and the copy-mode I/O buffers) in their own mappings, returned when freed; two arenas
/// per CPU bound what the many short-lived threads keep cached.
fn tune_allocator() {
    #[cfg(target_env = "gnu")]
    {
        const MMAP_THRESHOLD: libc::c_int = 256 * 1024;
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let arenas = libc::c_int::try_from(2 * cpus).unwrap_or(libc::c_int::MAX);
        // SAFETY: mallopt only sets allocator parameters (under glibc's own lock).
        let ok = unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
                && libc::mallopt(libc::M_ARENA_MAX, arenas) == 1
        };
        if !ok {
            tracing::debug!("could not set the allocator's parameters; keeping glibc's defaults");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Wrap {
        #[command(flatten)]
        args: ServeArgs,
    }

    #[test]
    fn defaults() {
        let w = Wrap::try_parse_from(["x", "/vols/a"]).expect("parse");
        let o = w.args.options();
        assert_eq!(o.volume_dir, PathBuf::from("/vols/a"));
        assert_eq!(o.dev_id, None);
        assert_eq!(o.depth, 128);
        assert!((1..=4).contains(&o.queues));
        assert!(!o.recover && !o.force_copy);
    }

    #[test]
    fn all_options() {
        let w = Wrap::try_parse_from([
            "x",
            "/vols/a",
            "--id",
            "3",
            "--queues",
            "2",
            "--depth",
            "64",
            "--recover",
            "--copy",
        ])
        .expect("parse");
        let o = w.args.options();
        assert_eq!(o.dev_id, Some(3));
        assert_eq!(o.queues, 2);
        assert_eq!(o.depth, 64);
        assert!(o.recover && o.force_copy);
    }

    #[test]
    fn ready_line_format() {
        let d = ServingDevice {
            dev_id: 0,
            bdev_path: "/dev/ublkb0".into(),
            volume: "vol1".into(),
            mode: ublk::DataMode::Copy,
            recovered: false,
        };
        assert_eq!(ready_line(&d), "serving volume vol1 as /dev/ublkb0");
    }
}
