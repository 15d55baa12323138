//! File-system plumbing with durability steps spelled out: atomic replace, directory
//! fsync, hole punching and in-kernel copies.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::aligned::AlignedBuf;
use super::error::{EngineError, Result};
use super::faults::crash_point;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};

/// Mode of every file of a volume: it holds a tenant's data, for its owner only.
pub(crate) const PRIVATE_FILE: u32 = 0o600;
/// Mode of a volume's folders.
pub(crate) const PRIVATE_DIR: u32 = 0o700;

/// Creates `dir` and any missing parents, mode 0700.
pub(crate) fn create_private_dir_all(dir: &Path) -> Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(PRIVATE_DIR)
        .create(dir)
        .map_err(|e| EngineError::io(dir, e))
}

/// Refuses a volume folder that another user could change: owned by someone else, or
/// writable by its group or by others. A volume holds a tenant's data, and a manifest or
/// journal planted by another user would be trusted.
pub(crate) fn check_private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let md = fs::metadata(dir).map_err(|e| EngineError::io(dir, e))?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if md.uid() != me {
        return Err(EngineError::Invalid(format!(
            "{} belongs to uid {}, not to this process (uid {me}): a volume folder must be its owner's alone",
            dir.display(),
            md.uid()
        )));
    }
    if md.mode() & 0o022 != 0 {
        return Err(EngineError::Invalid(format!(
            "{} can be written by other users (mode {:o}): a volume holds a tenant's data; run `chmod 700 {}`",
            dir.display(),
            md.mode() & 0o7777,
            dir.display()
        )));
    }
    Ok(())
}

/// Makes the directory entry changes in `dir` (create, rename, unlink) durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    crash_point("sync_dir")?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| EngineError::io(dir, e))
}

/// Replaces `path` with `bytes` so that a crash leaves either the old or the new content:
/// write a temporary file, fsync it, rename it over, fsync the directory.
pub(crate) fn atomic_write(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| EngineError::Invalid(format!("{} has no parent", path.display())))?;
    let tmp = path.with_extension("tmp");
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(PRIVATE_FILE)
        .open(&tmp)
        .map_err(|e| EngineError::io(&tmp, e))?;
    // A temporary file that did not make it (a full disk) is removed, not left to hold
    // the space it got.
    let written = f
        .write_all(bytes)
        .map_err(|e| EngineError::io(&tmp, e))
        .and_then(|()| crash_point("atomic_write:fsync"))
        .and_then(|()| {
            super::faults::commit_fault()
                .map_or(Ok(()), Err)
                .and_then(|()| f.sync_all())
                .map_err(|e| EngineError::io(&tmp, e))
        });
    if let Err(e) = written {
        if !e.is_injected_crash() {
            let _ = fs::remove_file(&tmp);
        }
        return Err(e);
    }
    crash_point("atomic_write:rename")?;
    fs::rename(&tmp, path).map_err(|e| EngineError::io(path, e))?;
    sync_dir(dir)
}

/// fdatasync with a crash point in front, for data files.
pub(crate) fn sync_data(file: &File, path: &Path) -> Result<()> {
    crash_point("sync_data")?;
    if let Some(e) = super::faults::sync_fault() {
        return Err(EngineError::io(path, e));
    }
    file.sync_data().map_err(|e| EngineError::io(path, e))
}

/// Frees the blocks of `[offset, offset+len)` in `file`; they read as zeros afterwards.
pub(crate) fn punch_hole(file: &File, path: &Path, offset: u64, len: u64) -> Result<()> {
    let off = i64::try_from(offset).map_err(|_| EngineError::Invalid("offset too large".into()))?;
    let l = i64::try_from(len).map_err(|_| EngineError::Invalid("length too large".into()))?;
    // SAFETY: fallocate on a valid, open file descriptor; no memory is passed.
    let rc = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off,
            l,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    match err.raw_os_error() {
        // A file system without hole punching: write zeros instead, so reads stay right.
        Some(libc::EOPNOTSUPP) => write_zeros(file, path, offset, len),
        _ => Err(EngineError::io(path, err)),
    }
}

/// Whether files in `dir` can be opened with O_DIRECT for I/O at multiples of
/// `block_size`, from memory that may be aligned to only 512 bytes (the pages of a
/// zero-copy request). Uses the file system's own figures (statx STATX_DIOALIGN, Linux
/// 6.1+); where it gives none, direct I/O is used only for 4 KiB blocks (and open
/// falls back to the page cache if O_DIRECT is refused).
pub(crate) fn direct_io_fits(dir: &Path, block_size: u32) -> bool {
    const STATX_DIOALIGN: u32 = 0x2000;
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: an all-zero statx is a valid value of this plain C struct.
    let mut st: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a live, writable statx buffer.
    let rc = unsafe { libc::statx(libc::AT_FDCWD, c.as_ptr(), 0, STATX_DIOALIGN, &mut st) };
    if rc != 0 || st.stx_mask & STATX_DIOALIGN == 0 || st.stx_dio_offset_align == 0 {
        return block_size >= 4096;
    }
    st.stx_dio_offset_align <= block_size && st.stx_dio_mem_align <= 512
}

fn write_zeros(file: &File, path: &Path, offset: u64, len: u64) -> Result<()> {
    const CHUNK: u64 = 1 << 20;
    // Aligned, so that it also suits a file opened with O_DIRECT.
    let zeros = AlignedBuf::new(CHUNK.min(len) as usize);
    let mut done = 0;
    while done < len {
        let n = CHUNK.min(len - done) as usize;
        file.write_all_at(&zeros[..n], offset + done)
            .map_err(|e| EngineError::io(path, e))?;
        done += n as u64;
    }
    Ok(())
}

/// Copies `len` bytes of `src` at `src_offset` to `dst` at `offset` inside the kernel
/// (copy_file_range: a reflink on XFS and btrfs), with a plain copy where it is refused.
pub(crate) fn copy_range(
    src: &File,
    dst: &File,
    dst_path: &Path,
    src_offset: u64,
    offset: u64,
    len: u64,
) -> Result<()> {
    let mut done = 0u64;
    while done < len {
        let mut off_in = (src_offset + done) as libc::loff_t;
        let mut off_out = (offset + done) as libc::loff_t;
        let want = (len - done).min(1 << 30) as usize;
        // SAFETY: both descriptors are open files; the offset pointers point to live locals.
        let n = unsafe {
            libc::copy_file_range(
                src.as_raw_fd(),
                &mut off_in,
                dst.as_raw_fd(),
                &mut off_out,
                want,
                0,
            )
        };
        if n > 0 {
            done += n as u64;
            continue;
        }
        if n == 0 {
            // The source ended early: the rest reads as zeros.
            return write_zeros(dst, dst_path, offset + done, len - done);
        }
        let err = std::io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EXDEV)
            | Some(libc::EINVAL)
            | Some(libc::ENOSYS)
            | Some(libc::EOPNOTSUPP) => {
                return copy_plain(
                    src,
                    dst,
                    dst_path,
                    src_offset + done,
                    offset + done,
                    len - done,
                );
            }
            Some(libc::EINTR) => continue,
            _ => return Err(EngineError::io(dst_path, err)),
        }
    }
    Ok(())
}

fn copy_plain(
    src: &File,
    dst: &File,
    dst_path: &Path,
    src_offset: u64,
    offset: u64,
    len: u64,
) -> Result<()> {
    const CHUNK: u64 = 1 << 20;
    let mut buf = AlignedBuf::new(CHUNK.min(len) as usize);
    let mut done = 0;
    while done < len {
        let n = CHUNK.min(len - done) as usize;
        read_full_at(src, &mut buf[..n], src_offset + done)
            .map_err(|e| EngineError::io(dst_path, e))?;
        dst.write_all_at(&buf[..n], offset + done)
            .map_err(|e| EngineError::io(dst_path, e))?;
        done += n as u64;
    }
    Ok(())
}

/// Reads exactly `buf.len()` bytes at `offset`; bytes past the end of the file read as zeros
/// (a layer file is sparse and may be shorter than the volume on some file systems).
pub(crate) fn read_full_at(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => {
                buf[done..].fill(0);
                return Ok(());
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Hard-links `src` to `dst`, or copies it where a link is impossible (another file system).
/// Returns true when it linked.
pub(crate) fn link_or_copy(src: &Path, dst: &Path) -> Result<bool> {
    match fs::hard_link(src, dst) {
        Ok(()) => Ok(true),
        Err(e)
            if e.raw_os_error() == Some(libc::EXDEV) || e.raw_os_error() == Some(libc::EPERM) =>
        {
            let s = File::open(src).map_err(|e| EngineError::io(src, e))?;
            let len = s.metadata().map_err(|e| EngineError::io(src, e))?.len();
            let d = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(PRIVATE_FILE)
                .open(dst)
                .map_err(|e| EngineError::io(dst, e))?;
            d.set_len(len).map_err(|e| EngineError::io(dst, e))?;
            copy_range(&s, &d, dst, 0, 0, len)?;
            crash_point("link_or_copy:fsync")?;
            d.sync_all().map_err(|e| EngineError::io(dst, e))?;
            Ok(false)
        }
        Err(e) => Err(EngineError::io(dst, e)),
    }
}

/// A size in bytes with an optional `K`, `M` or `G` suffix (powers of 1024), as the
/// environment settings take it; None if it is not one.
pub(crate) fn parse_size(text: &str) -> Option<u64> {
    let t = text.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, 'k' | 'K')) => (&t[..i], 1u64 << 10),
        Some((i, 'm' | 'M')) => (&t[..i], 1 << 20),
        Some((i, 'g' | 'G')) => (&t[..i], 1 << 30),
        _ => (t, 1),
    };
    num.parse::<u64>().ok().and_then(|n| n.checked_mul(mult))
}
