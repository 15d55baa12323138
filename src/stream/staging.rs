//! The temporary folder an import builds its volume in, beside the target, so the target
//! appears whole (one rename) or not at all.
//!
//! - The folder is `.<target name>.import-<unique>` in the target's parent, locked with
//!   `flock` while its import runs; dropping the [`Staging`] without committing removes it.
//! - An import killed outright (SIGKILL, power loss) cannot clean up: the next import to
//!   the same target removes such leftovers, recognised by a lock nobody holds and no
//!   change for a minute (so a folder just created by a concurrent import is never taken).
//! - The commit renames without replacing (`RENAME_NOREPLACE`), so two imports racing to
//!   one target cannot overwrite each other.

use std::ffi::CString;
use std::fs::{self, File};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::error::{Result, StreamError};

/// A leftover folder must be untouched this long before it is removed.
const STALE_AFTER: Duration = Duration::from_secs(60);

/// A temporary folder beside `target`, removed on drop unless committed.
pub struct Staging {
    dir: PathBuf,
    target: PathBuf,
    parent: PathBuf,
    /// Held open: its `flock` tells other imports this folder is alive.
    _lock: File,
    committed: bool,
}

fn staging_err(path: &Path) -> impl FnOnce(io::Error) -> StreamError + '_ {
    move |err| StreamError::Staging {
        path: path.to_path_buf(),
        err,
    }
}

/// Tries to take an exclusive `flock` on `f` without waiting.
fn try_lock(f: &File) -> bool {
    // SAFETY: flock on a valid open descriptor; no memory is passed.
    unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
}

impl Staging {
    /// Makes an empty, locked staging folder for `target`, which must not exist.
    pub fn new(target: &Path) -> Result<Staging> {
        let file_name = target
            .file_name()
            .ok_or_else(|| {
                StreamError::Invalid(format!("{} is not a folder name", target.display()))
            })?
            .to_string_lossy()
            .into_owned();
        if fs::symlink_metadata(target).is_ok() {
            return Err(StreamError::TargetExists {
                path: target.to_path_buf(),
            });
        }
        let parent = target
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or_else(|| Path::new("."))
            .to_path_buf();
        let prefix = format!(".{file_name}.import-");
        remove_leftovers(&parent, &prefix);
        let mut attempt = 0u32;
        loop {
            let dir = parent.join(format!("{prefix}{}", unique(attempt)));
            match fs::create_dir(&dir) {
                Ok(()) => {
                    let lock = File::open(&dir).map_err(staging_err(&dir))?;
                    if !try_lock(&lock) {
                        // Cannot happen for a folder we just made; refuse rather than guess.
                        let _ = fs::remove_dir(&dir);
                        return Err(StreamError::Staging {
                            path: dir,
                            err: io::Error::from(io::ErrorKind::WouldBlock),
                        });
                    }
                    return Ok(Staging {
                        dir,
                        target: target.to_path_buf(),
                        parent,
                        _lock: lock,
                        committed: false,
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && attempt < 16 => {
                    attempt += 1;
                }
                Err(e) => return Err(StreamError::Staging { path: dir, err: e }),
            }
        }
    }

    /// The folder to build in.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Moves the finished folder to the target (never replacing anything there) and
    /// makes the move durable.
    pub fn commit(mut self) -> Result<()> {
        rename_noreplace(&self.dir, &self.target)?;
        self.committed = true;
        File::open(&self.parent)
            .and_then(|d| d.sync_all())
            .map_err(staging_err(&self.parent))
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.committed {
            if let Err(e) = fs::remove_dir_all(&self.dir) {
                tracing::warn!(path = %self.dir.display(), error = %e, "could not remove the temporary import folder");
            }
        }
    }
}

/// A name part unlikely to collide: process id, time, attempt.
fn unique(attempt: u32) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{}-{nanos:x}-{attempt}", std::process::id())
}

/// Removes staging folders of earlier imports to the same target that were killed: no
/// process holds their lock and they have not changed for [`STALE_AFTER`]. Best effort.
fn remove_leftovers(parent: &Path, prefix: &str) {
    let Ok(entries) = fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        if !entry.file_name().to_string_lossy().starts_with(prefix) {
            continue;
        }
        let path = entry.path();
        let Ok(f) = File::open(&path) else { continue };
        let old = f
            .metadata()
            .ok()
            .filter(|m| m.is_dir())
            .and_then(|m| m.modified().ok())
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age >= STALE_AFTER);
        if old && try_lock(&f) {
            tracing::info!(path = %path.display(), "removing the folder of an interrupted import");
            if let Err(e) = fs::remove_dir_all(&path) {
                tracing::warn!(path = %path.display(), error = %e, "could not remove it");
            }
        }
    }
}

fn cstring(p: &Path) -> Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| StreamError::Invalid(format!("{}: path holds a NUL byte", p.display())))
}

/// `rename(from, to)` that fails if `to` exists. Falls back to a check and a plain rename
/// on file systems without RENAME_NOREPLACE.
fn rename_noreplace(from: &Path, to: &Path) -> Result<()> {
    let (f, t) = (cstring(from)?, cstring(to)?);
    // SAFETY: both are valid NUL-terminated paths that outlive the call.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            f.as_ptr(),
            libc::AT_FDCWD,
            t.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EEXIST) | Some(libc::ENOTEMPTY) => Err(StreamError::TargetExists {
            path: to.to_path_buf(),
        }),
        Some(libc::EINVAL) | Some(libc::ENOSYS) => {
            if fs::symlink_metadata(to).is_ok() {
                return Err(StreamError::TargetExists {
                    path: to.to_path_buf(),
                });
            }
            fs::rename(from, to).map_err(staging_err(to))
        }
        _ => Err(StreamError::Staging {
            path: to.to_path_buf(),
            err,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staging_is_removed_unless_committed() {
        let root = tempfile::tempdir().expect("tempdir");
        let target = root.path().join("vol");
        let s = Staging::new(&target).expect("staging");
        let tmp = s.path().to_path_buf();
        fs::write(tmp.join("f"), b"x").expect("write");
        drop(s);
        assert!(!tmp.exists());
        assert!(!target.exists());

        let s = Staging::new(&target).expect("staging");
        fs::write(s.path().join("f"), b"x").expect("write");
        s.commit().expect("commit");
        assert!(target.join("f").exists());
        assert_eq!(fs::read_dir(root.path()).expect("ls").count(), 1);
        assert!(matches!(
            Staging::new(&target),
            Err(StreamError::TargetExists { .. })
        ));
    }

    #[test]
    fn commit_never_replaces_a_folder_made_meanwhile() {
        let root = tempfile::tempdir().expect("tempdir");
        let target = root.path().join("vol");
        let s = Staging::new(&target).expect("staging");
        let tmp = s.path().to_path_buf();
        fs::create_dir(&target).expect("racing folder");
        assert!(matches!(s.commit(), Err(StreamError::TargetExists { .. })));
        assert!(!tmp.exists());
    }

    #[test]
    fn live_staging_folders_are_left_alone() {
        let root = tempfile::tempdir().expect("tempdir");
        let target = root.path().join("vol");
        let a = Staging::new(&target).expect("a");
        let b = Staging::new(&target).expect("b");
        assert_ne!(a.path(), b.path());
        assert!(a.path().exists() && b.path().exists());
    }

    #[test]
    fn leftovers_of_killed_imports_are_removed() {
        let root = tempfile::tempdir().expect("tempdir");
        let target = root.path().join("vol");
        let age = |dir: &Path| {
            let f = File::open(dir).expect("open");
            f.set_modified(SystemTime::now() - 2 * STALE_AFTER)
                .expect("set mtime");
            f
        };
        // Killed long ago: nobody holds its lock.
        let dead = root.path().join(".vol.import-1-dead");
        fs::create_dir_all(dead.join("layers")).expect("mkdir");
        drop(age(&dead));
        // Just made by an import that has not locked it yet: too young to judge.
        let young = root.path().join(".vol.import-2-young");
        fs::create_dir(&young).expect("mkdir");
        // Old but alive: its import holds the lock.
        let busy = Staging::new(&target).expect("busy");
        let _held = age(busy.path());
        // Another target's leftover is not ours to remove.
        let other = root.path().join(".other.import-3-dead");
        fs::create_dir(&other).expect("mkdir");
        drop(age(&other));

        let s = Staging::new(&target).expect("staging");
        assert!(!dead.exists());
        assert!(young.exists());
        assert!(busy.path().exists());
        assert!(other.exists());
        drop(s);
    }
}
