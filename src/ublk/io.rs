//! One ublk request in terms the ring understands: the request copied out of its
//! descriptor, the buffer its data lives in, the parts a transfer moves, the ring op
//! that moves one part, and what a completed op means for the request. The state
//! machine that drives requests through these is in [`super::tags`].

use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use io_uring::{opcode, squeue, types};
use libublk::io::with_task_io_ring_mut;
use libublk::sys;
use smallvec::SmallVec;
use tracing::warn;

use crate::engine::{EngineError, ReadSegment, ReadSource, SnapshotView, Volume};

use super::worker::WorkSubmitter;

/// How many times a request retries ring ops that return EAGAIN/EINTR before failing.
pub const MAX_RETRIES: u32 = 16;

/// The fields of a request descriptor, copied out of the shared descriptor page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Request {
    /// `UBLK_IO_OP_*`.
    pub op: u32,
    /// `UBLK_IO_F_*` (the whole op_flags word).
    pub flags: u32,
    /// Byte offset on the device.
    pub offset: u64,
    /// Byte length.
    pub len: u64,
}

impl Request {
    /// Copies a descriptor (the kernel rewrites it for the next request of the tag).
    pub fn from_iod(iod: &sys::ublksrv_io_desc) -> Request {
        Request {
            op: iod.op_flags & 0xff,
            flags: iod.op_flags,
            offset: iod.start_sector << 9,
            len: u64::from(iod.nr_sectors) << 9,
        }
    }

    /// Whether the request asks for Force Unit Access.
    pub fn fua(&self) -> bool {
        self.flags & sys::UBLK_IO_F_FUA != 0
    }

    /// Which way a transfer of this request moves data (only writes go to files).
    pub fn dir(&self) -> Dir {
        if self.op == sys::UBLK_IO_OP_WRITE {
            Dir::Write
        } else {
            Dir::Read
        }
    }
}

/// The request's data buffer.
#[derive(Debug, Clone, Copy)]
pub enum DataBuf {
    /// Copy mode: the tag's buffer in our memory (`ptr`, `len` bytes, page aligned).
    Copy { ptr: *mut u8, len: usize },
    /// Zero-copy mode: the request's pages, auto-registered at this fixed-buffer index.
    Fixed { index: u16 },
}

/// Direction of a data transfer between the request buffer and a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    /// File (or zeros) into the buffer.
    Read,
    /// Buffer into the file.
    Write,
}

/// One part of a transfer: where in the request's buffer, how long, which file.
pub type Piece = ReadSegment;

/// The parts of one transfer, inline up to four: no allocation per request.
pub type Pieces = SmallVec<[Piece; 4]>;

/// What every request of one queue is served with. Ring ops go to the calling
/// thread's io_uring (the queue's ring, set up by libublk).
pub struct IoCtx {
    /// The volume served.
    pub volume: Volume,
    /// Set when the device serves this snapshot of the volume, read-only.
    pub snapshot: Option<SnapshotView>,
    /// Where blocking calls go.
    pub work: WorkSubmitter,
    /// /dev/zero, read into registered buffers for zero parts in zero-copy mode.
    pub devzero: Option<OwnedFd>,
}

/// A negative errno for an engine error.
pub fn neg_errno(e: &EngineError) -> i32 {
    -e.errno().abs().max(1)
}

/// What to do after one ring op of a transfer completed with `res`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The piece is done.
    Done,
    /// The request fails with this -errno.
    Failed(i32),
    /// Move this (rest of the) piece again: EAGAIN/EINTR, a short transfer, or the end
    /// of a layer file (the rest reads as zeros).
    Again(Piece),
}

/// Whether a ring op that completed with `res` is worth submitting again as it was.
pub fn retryable(res: i32) -> bool {
    res == -libc::EAGAIN || res == -libc::EINTR
}

/// Decides what follows op result `res` for piece `p`.
pub fn outcome(dir: Dir, p: &Piece, res: i32) -> Outcome {
    match res {
        r if retryable(r) => Outcome::Again(*p),
        r if r < 0 => {
            warn!(?dir, source = ?p.source, len = p.len, res = r, "backing I/O failed");
            Outcome::Failed(r)
        }
        0 => match (dir, p.source) {
            (Dir::Read, ReadSource::File { .. }) => Outcome::Again(Piece {
                source: ReadSource::Zero,
                ..*p
            }),
            _ => Outcome::Failed(-libc::EIO),
        },
        r => {
            let done = u64::try_from(r).unwrap_or(0);
            if done >= p.len {
                return Outcome::Done;
            }
            Outcome::Again(Piece {
                buf_offset: p.buf_offset + done,
                len: p.len - done,
                source: match p.source {
                    ReadSource::File { fd, offset } => ReadSource::File {
                        fd,
                        offset: offset + done,
                    },
                    ReadSource::Zero => ReadSource::Zero,
                },
            })
        }
    }
}

/// Byte count as a request result (requests are at most a few MiB).
pub fn bytes_result(len: u64) -> i32 {
    i32::try_from(len).unwrap_or(-libc::EINVAL)
}

/// Queues `sqe` on this thread's ring; the queue loop submits it at its next wait.
///
/// # Safety
/// Every buffer and descriptor the entry names must stay valid until its completion
/// has been reaped.
pub unsafe fn push_op(sqe: &squeue::Entry) {
    with_task_io_ring_mut(|ring| loop {
        // SAFETY: the caller keeps what the entry names alive until it completes.
        if unsafe { ring.submission().push(sqe) }.is_ok() {
            break;
        }
        // Submission queue full: hand the queued entries to the kernel, then retry.
        if let Err(e) = ring.submit() {
            warn!(error = %e, "submitting to the queue ring failed; retrying");
        }
    });
}

/// Where piece `p` starts in a copy buffer of `cap` bytes at `ptr`; EINVAL if the
/// piece does not fit (a request longer than the buffer is refused, not overrun).
fn piece_in_buffer(ptr: *mut u8, cap: usize, p: &Piece) -> Result<*mut u8, i32> {
    let end = p.buf_offset.checked_add(p.len).ok_or(-libc::EINVAL)?;
    if end > cap as u64 {
        return Err(-libc::EINVAL);
    }
    // SAFETY: buf_offset + len <= cap (checked above), so the result stays inside the
    // buffer.
    Ok(unsafe { ptr.add(p.buf_offset as usize) })
}

impl IoCtx {
    /// Context for the requests of one queue thread.
    pub fn new(
        volume: Volume,
        snapshot: Option<SnapshotView>,
        work: WorkSubmitter,
        devzero: Option<OwnedFd>,
    ) -> Self {
        IoCtx {
            volume,
            snapshot,
            work,
            devzero,
        }
    }

    /// Builds the ring op moving `p` in direction `dir`; None for a zero part in copy
    /// mode, which is filled in place.
    pub fn build_op(
        &self,
        dir: Dir,
        buf: DataBuf,
        p: &Piece,
    ) -> Result<Option<squeue::Entry>, i32> {
        let len = u32::try_from(p.len).map_err(|_| -libc::EINVAL)?;
        let (fd, file_off): (RawFd, u64) = match p.source {
            ReadSource::File { fd, offset } => (fd, offset),
            ReadSource::Zero => match (dir, buf, &self.devzero) {
                (Dir::Read, DataBuf::Copy { ptr, len: cap }, _) => {
                    let at = piece_in_buffer(ptr, cap, p)?;
                    // SAFETY: the piece lies inside the tag's live buffer (checked), and no
                    // ring op targets that range.
                    unsafe { std::ptr::write_bytes(at, 0, p.len as usize) };
                    return Ok(None);
                }
                (Dir::Read, DataBuf::Fixed { .. }, Some(z)) => (z.as_raw_fd(), 0),
                _ => return Err(-libc::EIO),
            },
        };
        let sqe = match (dir, buf) {
            (dir, DataBuf::Copy { ptr, len: cap }) => {
                // The buffer outlives the op: a request completes only after all its
                // ops have.
                let at = piece_in_buffer(ptr, cap, p)?;
                match dir {
                    Dir::Read => opcode::Read::new(types::Fd(fd), at, len)
                        .offset(file_off)
                        .build(),
                    Dir::Write => opcode::Write::new(types::Fd(fd), at.cast_const(), len)
                        .offset(file_off)
                        .build(),
                }
            }
            // A registered kernel buffer is addressed from 0: the address is the offset
            // inside the request.
            (Dir::Read, DataBuf::Fixed { index }) => {
                opcode::ReadFixed::new(types::Fd(fd), p.buf_offset as *mut u8, len, index)
                    .offset(file_off)
                    .build()
            }
            (Dir::Write, DataBuf::Fixed { index }) => {
                opcode::WriteFixed::new(types::Fd(fd), p.buf_offset as *const u8, len, index)
                    .offset(file_off)
                    .build()
            }
        };
        Ok(Some(sqe))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_from_descriptor() {
        let iod = sys::ublksrv_io_desc {
            op_flags: sys::UBLK_IO_OP_WRITE | sys::UBLK_IO_F_FUA,
            nr_sectors: 16,
            start_sector: 8,
            addr: 0,
        };
        let r = Request::from_iod(&iod);
        assert_eq!(r.op, sys::UBLK_IO_OP_WRITE);
        assert!(r.fua());
        assert_eq!(r.offset, 4096);
        assert_eq!(r.len, 8192);
        let iod = sys::ublksrv_io_desc {
            op_flags: sys::UBLK_IO_OP_READ,
            nr_sectors: 1,
            start_sector: 0,
            addr: 0,
        };
        assert!(!Request::from_iod(&iod).fua());
    }

    #[test]
    fn outcomes_of_ring_results() {
        let p = Piece {
            buf_offset: 4096,
            len: 8192,
            source: ReadSource::File { fd: 3, offset: 0 },
        };
        assert_eq!(outcome(Dir::Read, &p, 8192), Outcome::Done);
        assert_eq!(outcome(Dir::Read, &p, -libc::EAGAIN), Outcome::Again(p));
        assert_eq!(
            outcome(Dir::Write, &p, -libc::EIO),
            Outcome::Failed(-libc::EIO)
        );
        assert_eq!(
            outcome(Dir::Read, &p, 4096),
            Outcome::Again(Piece {
                buf_offset: 8192,
                len: 4096,
                source: ReadSource::File {
                    fd: 3,
                    offset: 4096
                },
            })
        );
        // The end of a layer file: the rest reads as zeros; a write there is an error.
        assert_eq!(
            outcome(Dir::Read, &p, 0),
            Outcome::Again(Piece {
                source: ReadSource::Zero,
                ..p
            })
        );
        assert_eq!(outcome(Dir::Write, &p, 0), Outcome::Failed(-libc::EIO));
    }

    #[test]
    fn byte_results() {
        assert_eq!(bytes_result(4096), 4096);
        assert_eq!(bytes_result(u64::MAX), -libc::EINVAL);
    }
}
