//! Freezing a file system for a consistent snapshot, and making sure it never stays
//! frozen: FIFREEZE/FITHAW on the mount point, a watchdog process that thaws at the
//! deadline or as soon as the daemon dies, and a marker file that a restarted daemon
//! reads to thaw what a crash left frozen.
//!
//! FIFREEZE makes the file system flush everything through the device, so it must never
//! be called from a ublk queue thread; the queues keep serving while it is frozen.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use super::protocol::{CtlError, ErrorCode};
use crate::sys::mountinfo::{self, Mount, SeenMount};

const FIFREEZE: libc::c_ulong = 0xC004_5877;
/// Extra syncfs passes right before FIFREEZE, each writing back what the writers dirtied
/// during the previous one; they stop once a pass is shorter than [`SYNC_SHORT`] or no
/// quicker than the one before (writers faster than the device).
const SYNC_AGAIN: usize = 3;
const SYNC_SHORT: Duration = Duration::from_millis(5);
const FITHAW: libc::c_ulong = 0xC004_5878;

/// What a thaw found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Thawed {
    /// It was frozen and is thawed now.
    Thawed,
    /// It was not frozen (already thawed by someone).
    WasNotFrozen,
}

/// Opens the mount point `path`, checked to be on device `dev` when given.
fn open_on(path: &Path, dev: Option<(u32, u32)>) -> std::io::Result<File> {
    let dir = File::open(path)?;
    if let Some((major, minor)) = dev {
        // Checked on the open descriptor: what is frozen is what was checked, even when
        // the path leads through another mount namespace's root.
        use std::os::unix::fs::MetadataExt;
        let st = dir.metadata()?.dev();
        if (libc::major(st), libc::minor(st)) != (major, minor) {
            return Err(std::io::Error::other(format!(
                "{} is not on the volume's device {major}:{minor} but on {}:{} (another file \
                 system mounted over it?)",
                path.display(),
                libc::major(st),
                libc::minor(st)
            )));
        }
    }
    Ok(dir)
}

fn ioctl_path(path: &Path, req: libc::c_ulong, dev: Option<(u32, u32)>) -> std::io::Result<()> {
    let dir = open_on(path, dev)?;
    let mut arg: libc::c_int = 0;
    // SAFETY: FIFREEZE/FITHAW take an int argument; `dir` is an open descriptor.
    let rc = unsafe { libc::ioctl(dir.as_raw_fd(), req as _, &mut arg) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Writes the dirty data of the file system mounted at `path` back while its writers still
/// run (syncfs), so that FIFREEZE, which holds every writer while it syncs, has little
/// left to write: the application's stall is the freeze's own sync plus the cut, not the
/// time to write back its whole page cache. Failures are only logged: FIFREEZE syncs
/// anyway and reports what matters.
pub fn sync_before_freeze(path: &Path, dev: Option<(u32, u32)>) {
    let dir = match open_on(path, dev) {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!(mount = %path.display(), error = %e, "cannot open the mount point to sync it before the freeze");
            return;
        }
    };
    // SAFETY: syncfs takes an open descriptor, which `dir` is for this call.
    if unsafe { libc::syncfs(dir.as_raw_fd()) } != 0 {
        let e = std::io::Error::last_os_error();
        tracing::warn!(mount = %path.display(), error = %e, "syncing before the freeze failed; the freeze syncs again");
    }
}

/// Freezes the file system mounted at `path`.
pub fn freeze(path: &Path) -> Result<(), CtlError> {
    freeze_on(path, None)
}

/// Freezes the file system mounted at `path` after checking, when `dev` is given, that it
/// lives on device `dev` (`major:minor`).
pub fn freeze_on(path: &Path, dev: Option<(u32, u32)>) -> Result<(), CtlError> {
    ioctl_path(path, FIFREEZE, dev).map_err(|e| match e.raw_os_error() {
        Some(libc::EBUSY) => CtlError::new(
            ErrorCode::AlreadyFrozen,
            format!("{} is already frozen by someone else; thaw it (fsfreeze -u) or retry later", path.display()),
        ),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOTTY) | Some(libc::EINVAL) => CtlError::new(
            ErrorCode::FreezeUnsupported,
            format!(
                "the file system at {} cannot be frozen; use --freeze none for a crash-consistent snapshot",
                path.display()
            ),
        ),
        Some(libc::EPERM) | Some(libc::EACCES) => CtlError::new(
            ErrorCode::PermissionDenied,
            format!("not allowed to freeze {}: the daemon needs CAP_SYS_ADMIN", path.display()),
        ),
        _ => CtlError::new(ErrorCode::Io, format!("freezing {}: {e}", path.display())),
    })
}

/// Thaws the file system mounted at `path`; thawing one that is not frozen is no error.
pub fn thaw(path: &Path) -> Result<Thawed, CtlError> {
    match ioctl_path(path, FITHAW, None) {
        Ok(()) => Ok(Thawed::Thawed),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(Thawed::WasNotFrozen),
        Err(e) => Err(CtlError::new(
            ErrorCode::Io,
            format!("thawing {}: {e}", path.display()),
        )),
    }
}

/// The mount points to freeze for device `major:minor` (node `device`), or the one the
/// caller named, one per file system, after refusing what cannot be frozen. Without a
/// named mount, the device's mounts are looked up in every mount namespace this process
/// can see (the consumer's is seldom the daemon's: see
/// [`mountinfo::of_device_everywhere`]); when none is found although the device is held
/// open exclusively (a file system mounted where this process cannot see it), the freeze
/// is refused rather than silently skipped.
pub fn targets(
    dev: (u32, u32),
    device: &Path,
    named: Option<&Path>,
) -> Result<Vec<PathBuf>, CtlError> {
    if named.is_some() {
        let text = std::fs::read_to_string("/proc/self/mountinfo").map_err(|e| {
            CtlError::new(ErrorCode::Io, format!("reading /proc/self/mountinfo: {e}"))
        })?;
        return choose_targets(
            &mountinfo::parse(&text),
            &mountinfo::nfs_exports(),
            dev,
            named,
        );
    }
    let seen = mountinfo::of_device_everywhere(dev.0, dev.1);
    let busy = seen.is_empty() && mountinfo::held_exclusively(device);
    let holders = if busy {
        device
            .file_name()
            .map(|n| mountinfo::holders(&n.to_string_lossy()))
            .unwrap_or_default()
    } else {
        vec![]
    };
    choose_seen(&seen, &mountinfo::nfs_exports(), device, busy, &holders)
}

/// [`targets`] without a named mount, over the mounts seen in every namespace, whether
/// the device is held exclusively, and the devices stacked on it.
fn choose_seen(
    seen: &[SeenMount],
    exports: &[PathBuf],
    device: &Path,
    busy: bool,
    holders: &[String],
) -> Result<Vec<PathBuf>, CtlError> {
    for m in seen {
        if let Some(e) = exports.iter().find(|e| e.starts_with(&m.mount.mount_point)) {
            return Err(nfs_refusal(&format!(
                "{} (on this volume) is exported over NFS",
                e.display()
            )));
        }
    }
    if let Some(first) = seen.first() {
        // All mounts of one device share one file system: freezing one freezes all. The
        // daemon's own namespace comes first, then PID 1's.
        return Ok(vec![first.access.clone()]);
    }
    if !busy {
        return Ok(vec![]);
    }
    let what = if holders.is_empty() {
        "no mount of it is visible in any mount namespace this daemon can see (its own, the \
         host's through /proc/1, those of other processes through /proc/PID): a file system \
         may be mounted in a namespace no visible process is in, or a program holds the \
         device exclusively"
            .to_string()
    } else {
        format!(
            "it is held by {} (a device-mapper or md device on top: freeze the file system \
             on that device instead)",
            holders.join(", ")
        )
    };
    Err(CtlError::new(
        ErrorCode::FreezeUnsupported,
        format!(
            "{} is in use, but {what}. Refusing --freeze auto rather than taking a snapshot \
             that is only crash-consistent without saying so: name the mount point with \
             --mount, or use --freeze none for a crash-consistent snapshot",
            device.display()
        ),
    ))
}

/// [`targets`] over a parsed mount table and the NFS export list.
fn choose_targets(
    table: &[Mount],
    exports: &[PathBuf],
    dev: (u32, u32),
    named: Option<&Path>,
) -> Result<Vec<PathBuf>, CtlError> {
    let mounts: Vec<&Mount> = match named {
        Some(p) => {
            let m = table
                .iter()
                .rev()
                .find(|m| m.mount_point == p)
                .ok_or_else(|| {
                    CtlError::new(
                        ErrorCode::NotFound,
                        format!("{} is not a mount point", p.display()),
                    )
                })?;
            if mountinfo::is_nfs(m) {
                return Err(nfs_refusal(&format!(
                    "{} is an NFS client mount",
                    p.display()
                )));
            }
            if (m.major, m.minor) != dev {
                return Err(CtlError::new(
                    ErrorCode::NotFound,
                    format!(
                        "{} is not mounted from this volume's device ({}:{}), but from {}",
                        p.display(),
                        dev.0,
                        dev.1,
                        m.source
                    ),
                ));
            }
            vec![m]
        }
        None => table.iter().filter(|m| (m.major, m.minor) == dev).collect(),
    };
    for m in &mounts {
        if let Some(e) = exports.iter().find(|e| e.starts_with(&m.mount_point)) {
            return Err(nfs_refusal(&format!(
                "{} (on this volume) is exported over NFS",
                e.display()
            )));
        }
    }
    // All mounts of one device share one file system: freezing one freezes all.
    Ok(mounts
        .into_iter()
        .take(1)
        .map(|m| m.mount_point.clone())
        .collect())
}

fn nfs_refusal(what: &str) -> CtlError {
    CtlError::new(
        ErrorCode::NfsNotFreezable,
        format!(
            "{what}: NFS clients (ReadWriteMany consumers) keep their own caches, which no freeze on this node can flush, \
             so an application-consistent snapshot is impossible; use --freeze none for a crash-consistent snapshot"
        ),
    )
}

/// A freeze in progress: thaws on drop, and a watchdog process thaws at the deadline or
/// when this process dies.
pub struct FreezeGuard {
    mounts: Vec<PathBuf>,
    /// The device the mounts must be on, checked on the descriptor frozen.
    device: Option<(u32, u32)>,
    marker: Option<PathBuf>,
    watchdog: Option<(Child, ChildStdin)>,
    deadline: Instant,
    /// When the first FIFREEZE started: writers are held from then until the thaw.
    holding_since: Option<Instant>,
}

impl FreezeGuard {
    /// Freezes `mounts` for at most `timeout`. `watchdog` is the program (this binary)
    /// run as `PROGRAM freeze-watchdog --timeout-ms N MOUNT...`; `marker` is written
    /// with the mount points while they are frozen.
    pub fn freeze(
        mounts: Vec<PathBuf>,
        timeout: Duration,
        watchdog: Option<&Path>,
        marker: Option<PathBuf>,
    ) -> Result<FreezeGuard, CtlError> {
        Self::freeze_on(None, mounts, timeout, watchdog, marker)
    }

    /// [`FreezeGuard::freeze`], checking that each mount is on device `device`
    /// (`major:minor`) before freezing it.
    pub fn freeze_on(
        device: Option<(u32, u32)>,
        mounts: Vec<PathBuf>,
        timeout: Duration,
        watchdog: Option<&Path>,
        marker: Option<PathBuf>,
    ) -> Result<FreezeGuard, CtlError> {
        let sync_all = |mounts: &[PathBuf]| {
            for m in mounts {
                sync_before_freeze(m, device);
            }
        };
        // Before the deadline starts: writers are not held yet.
        sync_all(&mounts);
        let deadline = Instant::now() + timeout;
        let mut guard = FreezeGuard {
            device,
            mounts: vec![],
            marker,
            watchdog: None,
            deadline,
            holding_since: None,
        };
        if mounts.is_empty() {
            return Ok(guard);
        }
        if let Some(m) = &guard.marker {
            let text: String = mounts
                .iter()
                .map(|p| format!("{}\n", p.display()))
                .collect();
            if let Err(e) = std::fs::write(m, text) {
                tracing::warn!(marker = %m.display(), error = %e, "cannot write the freeze marker");
            }
        }
        // Its start-up (an exec) overlaps the syncs below; it must be watching before the
        // first FIFREEZE.
        let mut starting = None;
        if let Some(program) = watchdog {
            let (child, stdin, out) = spawn_watchdog(program, &mounts, timeout)?;
            guard.watchdog = Some((child, stdin));
            starting = Some(out);
        }
        // Writers went on during the first sync and the watchdog's start: write back what
        // they dirtied meanwhile, again while that keeps getting quicker, so that FIFREEZE
        // (which holds them) finds as little as possible.
        let mut last = Duration::MAX;
        for _ in 0..SYNC_AGAIN {
            let t = Instant::now();
            sync_all(&mounts);
            let took = t.elapsed();
            if took < SYNC_SHORT || took >= last || Instant::now() >= guard.deadline {
                break;
            }
            last = took;
        }
        if let Some(out) = starting {
            let t = Instant::now();
            let within = WATCHDOG_START.min(guard.deadline.saturating_duration_since(t));
            let ready = wait_ready(out, within).inspect_err(|_| {
                // Nothing is frozen yet; dropping the guard reaps it.
                if let Some((child, _)) = guard.watchdog.as_mut() {
                    let _ = child.kill();
                }
            })?;
            if !ready {
                tracing::warn!(
                    waited_ms = within.as_millis() as u64,
                    "the freeze watchdog is slow to start; freezing anyway (it thaws once it runs)"
                );
            }
            // Writers went on while it started: once more, what they dirtied meanwhile.
            if t.elapsed() >= SYNC_SHORT && Instant::now() < guard.deadline {
                sync_all(&mounts);
            }
        }
        guard.holding_since = Some(Instant::now());
        for m in mounts {
            freeze_on(&m, guard.device)?;
            guard.mounts.push(m);
            if Instant::now() >= guard.deadline {
                return Err(CtlError::new(
                    ErrorCode::Timeout,
                    format!(
                        "freezing took longer than the {} ms allowed; thawed",
                        timeout.as_millis()
                    ),
                ));
            }
        }
        Ok(guard)
    }

    /// When the first file system began to freeze (None if nothing was frozen): from then
    /// until the thaw its writers wait, FIFREEZE's own sync included.
    pub fn holding_since(&self) -> Option<Instant> {
        self.holding_since
    }

    /// The mounts frozen.
    pub fn mounts(&self) -> &[PathBuf] {
        &self.mounts
    }

    /// True once the deadline has passed (the watchdog may have thawed already).
    pub fn expired(&self) -> bool {
        Instant::now() >= self.deadline
    }

    /// Thaws everything now and returns when the last file system was thawed (before the
    /// watchdog is reaped); errors are logged and returned for the first mount.
    pub fn thaw(mut self) -> Result<Instant, CtlError> {
        self.release()
    }

    fn release(&mut self) -> Result<Instant, CtlError> {
        let mut first = Ok(());
        for m in self.mounts.drain(..) {
            if let Err(e) = thaw(&m) {
                tracing::error!(mount = %m.display(), error = %e, "thaw failed");
                if first.is_ok() {
                    first = Err(e);
                }
            }
        }
        let thawed_at = Instant::now();
        if let Some((mut child, mut stdin)) = self.watchdog.take() {
            // Tell the watchdog we are done, then reap it.
            let _ = stdin.write_all(b"done\n");
            drop(stdin);
            let _ = child.wait();
        }
        if let Some(m) = self.marker.take() {
            let _ = std::fs::remove_file(m);
        }
        first.map(|()| thawed_at)
    }
}

impl Drop for FreezeGuard {
    fn drop(&mut self) {
        let _ = self.release();
    }
}

/// What the watchdog prints once it watches its stdin: nothing is frozen before the
/// process that thaws it runs (one that exits at start, a binary replaced by an
/// incompatible one during an upgrade say, fails the freeze instead of leaving it
/// unguarded).
const WATCHDOG_READY: &[u8] = b"ready\n";
/// How long to wait for [`WATCHDOG_READY`]; past it the freeze goes ahead (a slow
/// watchdog still thaws, once it runs) with a warning.
const WATCHDOG_START: Duration = Duration::from_secs(2);

/// Starts the watchdog; its stdout is for [`wait_ready`].
fn spawn_watchdog(
    program: &Path,
    mounts: &[PathBuf],
    timeout: Duration,
) -> Result<(Child, ChildStdin, ChildStdout), CtlError> {
    let mut child = Command::new(program)
        .arg("freeze-watchdog")
        .arg("--timeout-ms")
        .arg(timeout.as_millis().to_string())
        .args(mounts)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| {
            CtlError::new(
                ErrorCode::Internal,
                format!(
                    "cannot start the freeze watchdog {}: {e}",
                    program.display()
                ),
            )
        })?;
    let stdin = child
        .stdin
        .take()
        .ok_or_else(|| CtlError::new(ErrorCode::Internal, "the freeze watchdog has no stdin"))?;
    let out = child
        .stdout
        .take()
        .ok_or_else(|| CtlError::new(ErrorCode::Internal, "the freeze watchdog has no stdout"))?;
    Ok((child, stdin, out))
}

/// Waits up to `within` for the watchdog's [`WATCHDOG_READY`] on `out`: Ok(false) when it
/// did not come in time, an error when the watchdog closed its output without it (it
/// exited) or printed something else (not a watchdog).
fn wait_ready(mut out: ChildStdout, within: Duration) -> Result<bool, CtlError> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::os::fd::AsFd;
    let gone = |why: String| {
        CtlError::new(
            ErrorCode::Internal,
            format!("the freeze watchdog did not start ({why}); nothing was frozen"),
        )
    };
    let deadline = Instant::now() + within;
    let mut got = Vec::with_capacity(WATCHDOG_READY.len());
    while got.len() < WATCHDOG_READY.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        let ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
        if ms == 0 {
            return Ok(false);
        }
        let mut fds = [PollFd::new(out.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(ms)) {
            Ok(0) => return Ok(false),
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(gone(format!("poll: {e}"))),
        }
        let mut buf = [0u8; 16];
        let want = WATCHDOG_READY.len() - got.len();
        match out.read(&mut buf[..want]) {
            Ok(0) => return Err(gone("no output".into())),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(gone(e.to_string())),
        }
    }
    if got == WATCHDOG_READY {
        Ok(true)
    } else {
        Err(gone(format!(
            "it printed {:?}",
            String::from_utf8_lossy(&got)
        )))
    }
}

/// The watchdog's body (`snapblk freeze-watchdog`): waits for `done` on stdin; if stdin
/// closes without it (the daemon died) or `timeout` passes, thaws `mounts` (retrying
/// until the daemon says done, since a freeze may still be completing).
pub fn run_watchdog(timeout: Duration, mounts: &[PathBuf]) -> i32 {
    let (tx, rx) = std::sync::mpsc::channel::<bool>();
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let mut stdin = std::io::stdin().lock();
        let _ = stdin.read_to_end(&mut buf);
        let _ = tx.send(buf.starts_with(b"done"));
    });
    // Watching stdin from now on: tell the daemon it may freeze. Should the daemon be gone
    // already, the write fails and stdin's end below thaws anything left.
    {
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(WATCHDOG_READY).and_then(|()| out.flush());
    }
    let deadline = Instant::now() + timeout;
    match rx.recv_timeout(timeout) {
        Ok(true) => return 0,
        Ok(false) | Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
            // The daemon died holding the freeze: thaw now.
            thaw_all(mounts, "the daemon exited while the file system was frozen");
            return 0;
        }
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
    }
    tracing::warn!(?mounts, "freeze deadline passed: thawing");
    loop {
        thaw_all(mounts, "the freeze deadline passed");
        match rx.recv_timeout(Duration::from_millis(50)) {
            Ok(_) | Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                thaw_all(mounts, "final check");
                return 0;
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                if deadline.elapsed() > Duration::from_secs(600) {
                    return 1;
                }
            }
        }
    }
}

fn thaw_all(mounts: &[PathBuf], why: &str) {
    for m in mounts {
        match thaw(m) {
            Ok(Thawed::Thawed) => {
                tracing::warn!(mount = %m.display(), why, "thawed by the freeze watchdog")
            }
            Ok(Thawed::WasNotFrozen) => {}
            Err(e) => {
                tracing::error!(mount = %m.display(), error = %e, "the freeze watchdog could not thaw")
            }
        }
    }
}

/// Thaws what a previous daemon left frozen (its marker file), at start-up.
pub fn thaw_leftovers(marker: &Path) {
    let Ok(text) = std::fs::read_to_string(marker) else {
        return;
    };
    for line in text.lines().filter(|l| !l.is_empty()) {
        match thaw(Path::new(line)) {
            Ok(Thawed::Thawed) => tracing::warn!(
                mount = line,
                "thawed a file system a previous daemon left frozen"
            ),
            Ok(Thawed::WasNotFrozen) => {}
            Err(e) => {
                tracing::error!(mount = line, error = %e, "could not thaw a file system left frozen")
            }
        }
    }
    let _ = std::fs::remove_file(marker);
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: &str = "\
22 1 259:2 / / rw,relatime shared:1 - ext4 /dev/vda2 rw
95 22 259:7 / /mnt/data rw,relatime shared:40 - xfs /dev/ublkb0 rw,attr2
96 22 259:7 /sub /var/lib/kubelet/pods/x/volumes/v rw - xfs /dev/ublkb0 rw
97 22 0:55 / /mnt/nfs rw,relatime shared:41 - nfs4 server:/export rw,vers=4.2
";

    fn choose(exports: &[&str], named: Option<&str>) -> Result<Vec<PathBuf>, CtlError> {
        let table = mountinfo::parse(TABLE);
        let exports: Vec<PathBuf> = exports.iter().map(PathBuf::from).collect();
        choose_targets(&table, &exports, (259, 7), named.map(Path::new))
    }

    #[test]
    fn one_mount_per_file_system_is_frozen() {
        assert_eq!(
            choose(&[], None).expect("ok"),
            vec![PathBuf::from("/mnt/data")]
        );
        assert_eq!(
            choose(&["/srv/other"], Some("/mnt/data")).expect("ok"),
            vec![PathBuf::from("/mnt/data")]
        );
        let table = mountinfo::parse(TABLE);
        assert!(choose_targets(&table, &[], (259, 9), None)
            .expect("ok")
            .is_empty());
    }

    #[test]
    fn nfs_consumers_are_refused_with_the_way_out() {
        for (exports, named, what) in [
            (vec!["/mnt/data/share"], None, "exported over NFS"),
            (vec!["/mnt/data"], Some("/mnt/data"), "exported over NFS"),
            (vec![], Some("/mnt/nfs"), "is an NFS client mount"),
        ] {
            let e = choose(&exports, named).expect_err("refused");
            assert_eq!(e.code, ErrorCode::NfsNotFreezable, "{e:?}");
            assert!(e.message.contains(what), "{}", e.message);
            assert!(e.message.contains("--freeze none"), "{}", e.message);
            assert!(e.message.contains("ReadWriteMany"), "{}", e.message);
        }
    }

    #[test]
    fn a_foreign_or_missing_mount_is_refused() {
        let e = choose(&[], Some("/")).expect_err("foreign");
        assert_eq!(e.code, ErrorCode::NotFound);
        assert!(
            e.message.contains("not mounted from this volume's device"),
            "{}",
            e.message
        );
        let e = choose(&[], Some("/nowhere")).expect_err("missing");
        assert_eq!(e.code, ErrorCode::NotFound);
        assert!(e.message.contains("is not a mount point"), "{}", e.message);
    }

    #[test]
    fn freezing_an_unfreezable_file_system_is_refused_clearly() {
        // /proc cannot be frozen on any kernel.
        let e = freeze(Path::new("/proc")).expect_err("froze /proc");
        assert!(
            matches!(
                e.code,
                ErrorCode::FreezeUnsupported | ErrorCode::PermissionDenied
            ),
            "{e:?}"
        );
    }

    const NO_DEVICE: &str = "/nonexistent/ublkb99";

    #[test]
    fn a_mount_of_another_device_is_refused() {
        let none = Path::new(NO_DEVICE);
        let e =
            targets((u32::MAX, u32::MAX), none, Some(Path::new("/proc"))).expect_err("accepted");
        assert_eq!(e.code, ErrorCode::NotFound, "{e:?}");
        let e = targets((1, 1), none, Some(Path::new("/definitely/not/mounted")))
            .expect_err("accepted");
        assert_eq!(e.code, ErrorCode::NotFound);
    }

    fn seen(pid: Option<u32>, mount_point: &str, access: &str) -> SeenMount {
        SeenMount {
            mount: Mount {
                major: 259,
                minor: 7,
                root: "/".into(),
                mount_point: mount_point.into(),
                fstype: "ext4".into(),
                source: "/dev/ublkb0".into(),
            },
            access: access.into(),
            pid,
        }
    }

    #[test]
    fn mounts_in_other_namespaces_are_frozen_through_their_root() {
        let dev = Path::new("/dev/ublkb0");
        let host = seen(Some(1), "/mnt/data", "/proc/1/root/mnt/data");
        assert_eq!(
            choose_seen(std::slice::from_ref(&host), &[], dev, true, &[]).expect("ok"),
            vec![PathBuf::from("/proc/1/root/mnt/data")]
        );
        // The daemon's own namespace comes first when it has one.
        let own = seen(None, "/stage", "/stage");
        assert_eq!(
            choose_seen(&[own, host.clone()], &[], dev, true, &[]).expect("ok"),
            vec![PathBuf::from("/stage")]
        );
        let e = choose_seen(&[host], &[PathBuf::from("/mnt/data")], dev, true, &[])
            .expect_err("exported");
        assert_eq!(e.code, ErrorCode::NfsNotFreezable);
    }

    #[test]
    fn a_device_in_use_without_a_visible_mount_refuses_auto() {
        let dev = Path::new("/dev/ublkb0");
        // Not in use: nothing to freeze, crash-consistent by nature.
        assert!(choose_seen(&[], &[], dev, false, &[])
            .expect("ok")
            .is_empty());
        let e = choose_seen(&[], &[], dev, true, &[]).expect_err("silently unfrozen");
        assert_eq!(e.code, ErrorCode::FreezeUnsupported);
        for want in [
            "/dev/ublkb0 is in use",
            "--freeze none",
            "--mount",
            "namespace",
        ] {
            assert!(e.message.contains(want), "{want}: {}", e.message);
        }
        let e = choose_seen(&[], &[], dev, true, &["dm-3".into()]).expect_err("held");
        assert!(e.message.contains("held by dm-3"), "{}", e.message);
    }

    #[test]
    fn a_path_on_another_device_is_not_frozen() {
        // /proc is not on device 1:1 (nor can it be frozen): refused before any ioctl.
        let e = freeze_on(Path::new("/proc"), Some((1, 1))).expect_err("froze");
        assert!(
            e.message.contains("not on the volume's device"),
            "{}",
            e.message
        );
    }

    #[test]
    fn a_watchdog_that_exits_at_start_fails_the_freeze_before_any_ioctl() {
        // `false` stands for a watchdog binary that cannot run: the freeze is refused
        // (the mount, which does not exist, is never opened for FIFREEZE).
        let e = FreezeGuard::freeze(
            vec![PathBuf::from("/nonexistent/mount")],
            Duration::from_secs(5),
            Some(Path::new("false")),
            None,
        )
        .err()
        .expect("froze without a watchdog");
        assert!(
            e.message.contains("watchdog did not start"),
            "{}",
            e.message
        );
    }

    #[test]
    fn no_mounts_means_nothing_to_freeze() {
        assert_eq!(
            targets((u32::MAX, u32::MAX), Path::new(NO_DEVICE), None).expect("lookup"),
            Vec::<PathBuf>::new()
        );
        let g =
            FreezeGuard::freeze(vec![], Duration::from_secs(1), None, None).expect("empty freeze");
        assert!(g.mounts().is_empty());
        g.thaw().expect("thaw nothing");
    }

    /// The output of `sh -c SCRIPT`, for [`wait_ready`].
    fn child_output(script: &str) -> (Child, ChildStdout) {
        let mut c = Command::new("sh")
            .args(["-c", script])
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn sh");
        let out = c.stdout.take().expect("stdout");
        (c, out)
    }

    #[test]
    fn the_freeze_waits_for_a_ready_watchdog() {
        let (mut c, out) = child_output("printf 're'; sleep 0.1; printf 'ady\\n'; sleep 5");
        assert!(wait_ready(out, Duration::from_secs(5)).expect("ready"));
        c.kill().ok();
        c.wait().ok();

        let (mut c, out) = child_output("sleep 5");
        let t = Instant::now();
        assert!(!wait_ready(out, Duration::from_millis(200)).expect("slow is no error"));
        assert!(
            t.elapsed() < Duration::from_secs(4),
            "waited {:?}",
            t.elapsed()
        );
        c.kill().ok();
        c.wait().ok();

        for script in ["exit 3", "printf 'nope!\\n'"] {
            let (mut c, out) = child_output(script);
            let e = wait_ready(out, Duration::from_secs(5)).expect_err(script);
            assert!(
                e.message.contains("nothing was frozen"),
                "{script}: {}",
                e.message
            );
            c.wait().ok();
        }
    }
}
