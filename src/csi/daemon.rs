//! The volume daemons of a node: one `snapblk serve` process per staged volume, started,
//! stopped and adopted by the node plugin.
//!
//! A daemon runs in a session of its own and outlives the node plugin: upgrading or
//! restarting the plugin must not disturb a mounted volume. Each daemon has a record in
//! `<state>/run/<key>.json` (pid, device, socket, staging path); at start the plugin adopts
//! every daemon whose socket still answers for the recorded device, and takes over the
//! device of one that died with ublk user recovery (`serve --recover`), so a file system
//! mounted on it carries on.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tonic::Status;

use crate::ctl::client::Client;
use crate::ctl::protocol::Command as CtlCommand;

/// How long a daemon may take to bring its device up (QEMU under emulation is slow).
const START_TIMEOUT: Duration = Duration::from_secs(90);
/// How long a daemon may take to flush and remove its device when asked to stop.
const STOP_TIMEOUT: Duration = Duration::from_secs(90);

/// What the plugin knows of one running daemon, kept in its record file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Served {
    pub key: String,
    pub pid: i32,
    /// `/dev/ublkbN`.
    pub device: String,
    pub dev_id: u32,
    pub socket: PathBuf,
    /// Where the volume is staged (its file system mounted, or for block access the
    /// folder the kubelet gave).
    pub staging_path: String,
    /// Staged for raw block access (no file system).
    pub block: bool,
}

/// Folders the daemons use under the node's state folder.
#[derive(Debug, Clone)]
pub struct Layout {
    pub volumes: PathBuf,
    pub run: PathBuf,
    pub sockets: PathBuf,
    pub logs: PathBuf,
}

impl Layout {
    /// The layout under `state`.
    pub fn new(state: &Path) -> Layout {
        Layout {
            volumes: state.join("volumes"),
            run: state.join("run"),
            sockets: state.join("sockets"),
            logs: state.join("logs"),
        }
    }

    /// Creates the folders (mode 0700: they hold tenants' data and control sockets).
    pub fn create(&self) -> std::io::Result<()> {
        use std::os::unix::fs::DirBuilderExt;
        for d in [&self.volumes, &self.run, &self.sockets, &self.logs] {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(d)?;
        }
        Ok(())
    }
}

/// The node's volume daemons.
pub struct Daemons {
    exe: PathBuf,
    layout: Layout,
    served: Mutex<HashMap<String, Served>>,
    /// Daemons this process started, so their exit can be collected.
    children: Mutex<HashMap<String, Child>>,
}

impl Daemons {
    /// The daemons of the node whose folders are `layout`; `exe` is the snapblk binary.
    pub fn new(exe: PathBuf, layout: Layout) -> Daemons {
        Daemons {
            exe,
            layout,
            served: Mutex::default(),
            children: Mutex::default(),
        }
    }

    /// The running daemon of volume `key`, if any.
    pub fn get(&self, key: &str) -> Option<Served> {
        self.served.lock().get(key).cloned()
    }

    /// Every running daemon.
    pub fn all(&self) -> Vec<Served> {
        self.served.lock().values().cloned().collect()
    }

    /// Lists `s` as running, as adoption would (for tests of what reads the list).
    #[cfg(test)]
    pub(crate) fn track(&self, s: Served) {
        self.served.lock().insert(s.key.clone(), s);
    }

    /// Whether the daemon of `key` runs and answers on its socket; the reason when not.
    pub fn check(&self, key: &str) -> Result<(), String> {
        let s = self
            .get(key)
            .ok_or_else(|| format!("no daemon serves volume {key}"))?;
        if let Some(child) = self.children.lock().get_mut(key) {
            if let Ok(Some(st)) = child.try_wait() {
                return Err(format!(
                    "the daemon of volume {key} exited ({st}); see {}",
                    self.log_path(key).display()
                ));
            }
        }
        query_device(&s.socket)
            .map_err(|e| format!("the daemon of volume {key} does not answer: {e}"))
            .and_then(|dev| {
                if dev == s.device {
                    Ok(())
                } else {
                    Err(format!(
                        "the daemon of volume {key} serves {dev}, not {}",
                        s.device
                    ))
                }
            })
    }

    /// The daemon of volume `key`: the running one when it answers; else its device taken
    /// over (the daemon died, the device waits for a new one); else a new daemon.
    pub fn ensure(&self, key: &str, staging_path: &str, block: bool) -> Result<Served, Status> {
        if let Some(s) = self.get(key) {
            match self.check(key) {
                Ok(()) => return Ok(s),
                Err(why) => {
                    tracing::warn!(
                        volume = key,
                        why,
                        "volume daemon unhealthy: taking its device over"
                    );
                    self.children.lock().remove(key);
                    self.served.lock().remove(key);
                    if Path::new(&format!("/dev/ublkc{}", s.dev_id)).exists() {
                        return self.spawn(key, staging_path, block, Some(s.dev_id));
                    }
                }
            }
        }
        self.start(key, staging_path, block)
    }

    /// Starts the daemon of volume `key` and waits until its device is live.
    pub fn start(&self, key: &str, staging_path: &str, block: bool) -> Result<Served, Status> {
        self.spawn(key, staging_path, block, None)
    }

    fn spawn(
        &self,
        key: &str,
        staging_path: &str,
        block: bool,
        recover: Option<u32>,
    ) -> Result<Served, Status> {
        let dir = self.layout.volumes.join(key);
        let socket = self.layout.sockets.join(format!("{key}.sock"));
        let log_path = self.log_path(key);
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| super::status::io(&format!("opening {}", log_path.display()), e))?;
        let log_start = log.metadata().map(|m| m.len()).unwrap_or(0);
        let log2 = log
            .try_clone()
            .map_err(|e| super::status::io("log file", e))?;
        let mut cmd = Command::new(&self.exe);
        cmd.arg("serve").arg(&dir).arg("--socket").arg(&socket);
        if let Some(id) = recover {
            cmd.arg("--recover").arg("--id").arg(id.to_string());
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2));
        // SAFETY: setsid is async-signal-safe; the closure touches nothing else. A session
        // of its own keeps the daemon out of the plugin's process group and terminal.
        unsafe {
            cmd.pre_exec(|| {
                nix::unistd::setsid().map_err(std::io::Error::from)?;
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| super::status::io(&format!("starting {} serve", self.exe.display()), e))?;
        let pid = child.id() as i32;
        let deadline = Instant::now() + START_TIMEOUT;
        let device = loop {
            if let Ok(Some(st)) = child.try_wait() {
                return Err(Status::internal(format!(
                    "the daemon of volume {key} exited ({st}) before its device was live: {}",
                    log_tail(&log_path, log_start)
                )));
            }
            if let Ok(dev) = query_device(&socket) {
                break dev;
            }
            if Instant::now() > deadline {
                let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
                return Err(Status::deadline_exceeded(format!(
                    "the daemon of volume {key} did not bring its device up within {}s: {}",
                    START_TIMEOUT.as_secs(),
                    log_tail(&log_path, log_start)
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let dev_id = dev_id_of(&device).ok_or_else(|| {
            Status::internal(format!(
                "the daemon of volume {key} reports device {device:?}"
            ))
        })?;
        let served = Served {
            key: key.to_string(),
            pid,
            device,
            dev_id,
            socket,
            staging_path: staging_path.to_string(),
            block,
        };
        self.save(&served)?;
        self.children.lock().insert(key.to_string(), child);
        self.served.lock().insert(key.to_string(), served.clone());
        tracing::info!(volume = key, device = %served.device, pid, recovered = recover.is_some(), "volume daemon started");
        Ok(served)
    }

    /// Stops the daemon of `key` (SIGTERM: it flushes the volume and removes the device)
    /// and waits for it to exit. Nothing to do when none runs.
    pub fn stop(&self, key: &str) -> Result<(), Status> {
        let Some(s) = self.get(key) else {
            return Ok(());
        };
        let pid = Pid::from_raw(s.pid);
        if is_daemon_of(s.pid, key) {
            let _ = kill(pid, Signal::SIGTERM);
            let deadline = Instant::now() + STOP_TIMEOUT;
            loop {
                if self.exited(key, s.pid) {
                    break;
                }
                if Instant::now() > deadline {
                    return Err(Status::deadline_exceeded(format!(
                        "the daemon of volume {key} (pid {}) did not stop within {}s; see {}",
                        s.pid,
                        STOP_TIMEOUT.as_secs(),
                        self.log_path(key).display()
                    )));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        self.children.lock().remove(key);
        self.served.lock().remove(key);
        let _ = fs::remove_file(self.record_path(key));
        let _ = fs::remove_file(&s.socket);
        tracing::info!(volume = key, device = %s.device, "volume daemon stopped");
        Ok(())
    }

    /// Updates the staging path recorded for a running daemon.
    pub fn set_staging(&self, key: &str, staging_path: &str) -> Result<(), Status> {
        let updated = {
            let mut m = self.served.lock();
            let Some(s) = m.get_mut(key) else {
                return Ok(());
            };
            s.staging_path = staging_path.to_string();
            s.clone()
        };
        self.save(&updated)
    }

    /// At start: adopts the daemons the records name that still serve their device, and
    /// takes over (user recovery) the devices of those that died. Records of devices that
    /// are gone (the node rebooted) are dropped: the kubelet stages those volumes again.
    pub fn adopt(&self) -> Vec<String> {
        let mut notes = vec![];
        let Ok(entries) = fs::read_dir(&self.layout.run) else {
            return notes;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            let rec: Served = match fs::read(&path)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
            {
                Some(r) => r,
                None => {
                    notes.push(format!("ignored unreadable record {}", path.display()));
                    continue;
                }
            };
            let key = rec.key.clone();
            if query_device(&rec.socket).ok().as_deref() == Some(rec.device.as_str()) {
                notes.push(format!(
                    "adopted the daemon of volume {key} ({})",
                    rec.device
                ));
                self.served.lock().insert(key, rec);
                continue;
            }
            if Path::new(&format!("/dev/ublkc{}", rec.dev_id)).exists() {
                match self.spawn(&key, &rec.staging_path, rec.block, Some(rec.dev_id)) {
                    Ok(s) => notes.push(format!(
                        "recovered volume {key}: its daemon had died; {} is served again",
                        s.device
                    )),
                    Err(e) => notes.push(format!(
                        "volume {key}: its daemon died and recovery of {} failed: {}",
                        rec.device,
                        e.message()
                    )),
                }
                continue;
            }
            let _ = fs::remove_file(&path);
            notes.push(format!(
                "volume {key} was staged at {}, but its device {} is gone (node restarted?): record dropped",
                rec.staging_path, rec.device
            ));
        }
        notes
    }

    fn exited(&self, key: &str, pid: i32) -> bool {
        if let Some(child) = self.children.lock().get_mut(key) {
            return !matches!(child.try_wait(), Ok(None));
        }
        // Adopted: not our child, unless we are the container's init and it was
        // re-parented to us; collect it then, so no zombie stays behind. A pid that now
        // belongs to another program (or a zombie, with no command line) has exited.
        let p = Pid::from_raw(pid);
        let _ = nix::sys::wait::waitpid(p, Some(nix::sys::wait::WaitPidFlag::WNOHANG));
        !is_daemon_of(pid, key)
    }

    /// Takes over the device of every daemon that died since it was started or adopted
    /// (user recovery), so a mounted file system carries on; volumes with an operation
    /// in progress are looked at next time. Returns what it did, for the log.
    pub fn supervise(&self, ops: &super::oplock::OpLocks) -> Vec<String> {
        let mut notes = vec![];
        for s in self.all() {
            let Ok(_guard) = ops.claim(&s.key, "supervision") else {
                continue;
            };
            if self.get(&s.key).is_none() || !self.exited(&s.key, s.pid) {
                continue;
            }
            self.children.lock().remove(&s.key);
            self.served.lock().remove(&s.key);
            if Path::new(&format!("/dev/ublkc{}", s.dev_id)).exists() {
                match self.spawn(&s.key, &s.staging_path, s.block, Some(s.dev_id)) {
                    Ok(n) => notes.push(format!(
                        "the daemon of volume {} died; {} is served again (user recovery)",
                        s.key, n.device
                    )),
                    Err(e) => notes.push(format!(
                        "the daemon of volume {} died and taking over {} failed: {}; see {}",
                        s.key,
                        s.device,
                        e.message(),
                        self.log_path(&s.key).display()
                    )),
                }
            } else {
                let _ = fs::remove_file(self.record_path(&s.key));
                notes.push(format!(
                    "the daemon of volume {} exited and removed {}: whatever is mounted from it gets I/O errors until the volume is staged again; see {}",
                    s.key,
                    s.device,
                    self.log_path(&s.key).display()
                ));
            }
        }
        notes
    }

    fn save(&self, s: &Served) -> Result<(), Status> {
        let path = self.record_path(&s.key);
        let tmp = path.with_extension("tmp");
        let body = serde_json::to_vec(s).map_err(|e| Status::internal(e.to_string()))?;
        fs::write(&tmp, body)
            .and_then(|()| File::open(&tmp)?.sync_all())
            .and_then(|()| fs::rename(&tmp, &path))
            .map_err(|e| super::status::io(&format!("writing {}", path.display()), e))
    }

    fn record_path(&self, key: &str) -> PathBuf {
        self.layout.run.join(format!("{key}.json"))
    }

    /// The log file of the daemon of `key`.
    pub fn log_path(&self, key: &str) -> PathBuf {
        self.layout.logs.join(format!("{key}.log"))
    }
}

/// Asks the daemon at `socket` which device it serves.
pub fn query_device(socket: &Path) -> Result<String, String> {
    let mut c = Client::connect(socket).map_err(|e| e.message)?;
    let v = c.call(CtlCommand::Status).map_err(|e| e.message)?;
    v.pointer("/device/path")
        .and_then(|p| p.as_str())
        .map(str::to_string)
        .ok_or_else(|| "its status names no device".to_string())
}

/// N of `/dev/ublkbN`.
fn dev_id_of(device: &str) -> Option<u32> {
    device.strip_prefix("/dev/ublkb")?.parse().ok()
}

/// Whether `pid` is a `snapblk serve` of volume `key` (not a reused pid).
fn is_daemon_of(pid: i32, key: &str) -> bool {
    let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
    args.iter().any(|a| *a == b"serve")
        && args
            .iter()
            .any(|a| Path::new(std::ffi::OsStr::from_bytes(a)).ends_with(key))
}

/// The last lines a daemon logged since `from`, for an error message.
fn log_tail(path: &Path, from: u64) -> String {
    let mut text = String::new();
    if let Ok(mut f) = File::open(path) {
        let _ = f.seek(SeekFrom::Start(from));
        let _ = f.take(64 * 1024).read_to_string(&mut text);
    }
    let lines: Vec<&str> = text.lines().rev().take(5).collect();
    if lines.is_empty() {
        return format!("nothing logged (see {})", path.display());
    }
    lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_ids_and_log_tails() {
        assert_eq!(dev_id_of("/dev/ublkb12"), Some(12));
        assert_eq!(dev_id_of("/dev/sda"), None);
        let tmp = tempfile::tempdir().expect("tempdir");
        let p = tmp.path().join("l.log");
        fs::write(&p, "old\nline1\nerror: the volume is damaged\n").expect("write");
        assert_eq!(log_tail(&p, 4), "line1 | error: the volume is damaged");
        assert!(log_tail(&tmp.path().join("none"), 0).starts_with("nothing logged"));
    }

    #[test]
    fn a_pid_is_a_daemon_only_with_serve_and_the_volume() {
        // This test process is not a daemon of any volume.
        assert!(!is_daemon_of(std::process::id() as i32, "k1"));
        assert!(!is_daemon_of(i32::MAX, "k1"));
    }
}
